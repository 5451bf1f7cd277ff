//! The SUT config: one TOML file per device under test in the `sut/` directory.
//!
//! The file stem is the SUT's name (`sut/rpi4-01.toml` is SUT `rpi4-01`) and must be a valid
//! [`SutName`](crate::SutName), other than the reserved `labvisor` ([`crate::name::RESERVED_SUT_NAME`]: a SUT's
//! login gets `<sut>/#`, and `labvisor/...` is the control plane). A file is read in two steps: serde reads it into raw structs that deny unknown
//! keys, then validation turns it into a [`SutConfig`] whose fields hold only checked values.
//! Validation reports every problem it finds as a [`Problem`], printed as `file: key: message`
//! (a TOML syntax error is printed as `file:LINE: message`). When serde itself fails (syntax,
//! unknown key, wrong type) only that one problem can be reported.
//!
//! Settings that hand the container power over the host or over other containers
//! (`privileged`, `devices`, `mounts`, `network = "host"` or another Docker network, `cap_add`,
//! `no_new_privileges = false`) are refused unless the supervisor was started with the matching
//! `--allow-*` flag (see [`Allow`]). Under `--runtime swarm` ([`Runtime::Swarm`], carried in
//! [`Allow::runtime`]) `devices`, `privileged = true` and `[build]` are refused whatever the
//! flags say, each with the alternative; `[placement]` is read by the Swarm runtime only.
//!
//! Durations are strings parsed by `humantime` (`"10s"`, `"4h"`, `"1m 30s"`). Sizes are an integer
//! number of bytes or a string with a unit: `B`, `KB`, `MB`, `GB` (powers of 1000) or `KiB`, `MiB`,
//! `GiB` (powers of 1024), e.g. `"64KiB"`.
//!
//! # Config reference
//!
//! | Key | Type | Default | Meaning |
//! |---|---|---|---|
//! | `image` | string | *required* | Docker image of the agent container. Non-empty, no whitespace. |
//! | `command` | array of strings | *none* | argv of the device's long-running process (e.g. `testflinger-agent -c …`), supervised by the agent. Absent: a job-only agent. If present: non-empty, first element non-empty. |
//! | `env` | table of strings | `{}` | Environment of the container. Keys match `[A-Za-z_][A-Za-z0-9_]*`; keys starting `LABVISOR_` are reserved. |
//! | `files` | array of strings | `[]` | Files next to the SUT file, delivered into the container under `/labvisor/sut/<path>`. Relative paths, no `..`, must exist, must be regular files inside the sut directory after resolving symlinks, at most 1 MiB each. Read when the config is loaded; the config hash covers their contents. |
//! | `tail` | array of strings | `[]` | Absolute glob patterns inside the container whose files the agent follows into `docker logs`, the log file and `<sut>/output`, e.g. `/tmp/testflinger/run/*/*.log`. A new file is opened on its inotify event, so one deleted a few ms after it was written is still read (the globs are also rescanned every 250 ms); files existing at start are followed from their end. Lines interleave whole, under `==> path <==` headers. |
//! | `network` | string | `"labvisor"` | Docker network: `labvisor` (labvisor's own bridge, `[--name-prefix]labvisor.net`, with inter-container traffic off: an agent reaches the broker and the outside, not other agents), `host` (needs `--allow-host-network`), or the name of another existing Docker network (`[A-Za-z0-9][A-Za-z0-9_.-]*`, needs `--allow-network`). `none` and `container:…` are refused: the agent needs the broker. |
//! | `extra_hosts` | array of strings | `[]` | Extra host names in the container's `/etc/hosts`, each `"NAME:ADDRESS"` (Docker's `ExtraHosts`): an RFC 1123 host name (dot-separated labels of letters, digits and hyphens, at most 63 characters each, 253 in all; each name once) and an IPv4 or IPv6 address or `host-gateway`, the host's address on Docker's default bridge (Engine 20.10 and later), e.g. `["tfserver:host-gateway"]`: a server on the lab host listening on that address is reachable by name from every agent, with no IP in the file. |
//! | `labels` | table of strings | `{}` | Extra Docker labels. Keys starting `io.labvisor.` are reserved. |
//! | `privileged` | bool | `false` | Run the container privileged. Needs `--allow-privileged`. |
//! | `cap_add` | array of strings | `[]` | Linux capabilities added to the agents' default set (CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, NET_BIND_SERVICE, SETGID, SETUID; every other one is dropped), e.g. `["NET_RAW"]`; `CAP_` optional. Needs `--allow-caps`. |
//! | `no_new_privileges` | bool | `true` | Docker's `no-new-privileges`: no process in the container gains privileges through setuid or file-capability binaries. `false` needs `--allow-new-privileges`. |
//! | `devices` | array of strings | `[]` | Host devices (absolute paths under `/dev/`, e.g. `/dev/ttyUSB0`) passed into the container at the same path. Needs `--allow-devices`. |
//! | `mounts` | array of tables | `[]` | Host bind mounts `{ source = "/abs/host/path", target = "/abs/container/path", read_only = true }`; `source` and `target` absolute, `read_only` defaults to `true`. Needs `--allow-host-mounts`. |
//! | `health.heartbeat` | duration | `"5s"` | How often the agent writes its heartbeat file; at least `100ms`. |
//! | `health.max_age` | duration | `"30s"` | A heartbeat older than this is unhealthy. Must be longer than `heartbeat`. The supervisor acts on a hung agent within it: a running container whose agent published no status on `<sut>/agent` for longer than `max_age` (counted only while the supervisor's own broker link has been up that long, and not before the container ran `start_period + max_age`) is checked with one `labvisor-healthcheck` through `docker exec`; a stale heartbeat makes it unhealthy (and healed), an agent that is alive but off the broker is left running. |
//! | `health.interval` | `"auto"` \| duration | `"auto"` | Docker health-check interval (each probe is an exec, about 60 ms of dockerd and containerd CPU). `"auto"`: chosen by the supervisor when it creates the container, `N / --healthcheck-rate` seconds for a lab of N valid SUT files, at least 10 s and at most 300 s (at the default rate of 2 execs a second: 10 s for 5 SUTs, 50 s for 100, 250 s for 500). It is not in the config hash: a growing lab recreates no container, and a container keeps the interval it was made with until it is recreated (e.g. by `labvisor restart --when-idle`). Writing a duration changes the hash, so the container is recreated with it; a file without the key hashes differently than before `"auto"` existed, so upgrading from that version recreates each such container once, when its agent is idle. A duration: at least `1s`, and it may be longer than `max_age`, since the supervisor itself, not Docker, acts on a hung agent within `max_age` (Docker's verdict, slower, is what Portainer shows). |
//! | `health.timeout` | duration | `"5s"` | Docker health-check timeout. Shorter than `interval` (with `"auto"`, shorter than 10 s). |
//! | `health.retries` | integer ≥ 1 | `3` | Failed probes before Docker marks the container unhealthy: Docker itself sees a hung agent after at most `max_age + interval × retries` (see [`Health::detection_time`]); the supervisor acts sooner (see `max_age`). |
//! | `health.start_period` | duration | `"30s"` | Grace period after start during which failed probes do not count (may be `"0s"`). |
//! | `job.command` | array of strings | `["/bin/sh", "{job_file}"]` | argv template run for each job. Placeholders: `{job_file}`, `{job_dir}`, `{job_id}`, `{sut}`; `{{` and `}}` are literal braces; any other `{name}` is an error. The command may write its verdict to `$LABVISOR_RESULT`, which then decides over its exit code (README, Jobs). |
//! | `job.template` | string | *none* | A job template file (e.g. a testflinger job YAML), one of `files`. The submission's content decides: a complete testflinger job (YAML whose top level is a mapping with `job_queue`) is the job's `{job_file}` as it is; any other script is merged into a copy of the template as `test_data.test_cmds` (a YAML merge: the other keys keep their order, comments are not kept), and that copy is the job's `{job_file}`. A template that is not valid YAML fails the job with the parser's reason. |
//! | `job.timeout` | duration | `"4h"` | A job running longer is stopped. |
//! | `job.output_timeout` | duration | `"15m"` | A job silent for longer is stopped. |
//! | `job.queue_limit` | integer ≥ 1 | `100` | Jobs waiting in the agent's queue; more are rejected. |
//! | `job.max_payload` | size | `"64KiB"` | Largest accepted job submission; more than 0, at most 8 MiB. |
//! | `job.requeue_lost` | bool | `false` | Requeue a job that was running when the agent died instead of reporting it lost. |
//! | `restart.on_unhealthy` | `"restart"` \| `"none"` | `"restart"` | What the supervisor does with an unhealthy container. A container whose agent, on its latest status (received within `health.max_age`), is in a healthy state and unhealthy only because its exec probe (`probe.command`) fails is not restarted: a restart mends no refused or unreachable server and would cut the device's own work; it stays unhealthy, with the reason, until the probe passes. |
//! | `restart.backoff_min` | duration | `"1s"` | First delay between restarts. |
//! | `restart.backoff_max` | duration | `"5m"` | Longest delay between restarts; at least `backoff_min`. |
//! | `restart.on_child_exit` | `"restart"` \| `"exit"` | `"restart"` | What the agent does when the device process (`command`) exits: restart it, or exit (and let the supervisor restart the container). |
//! | `restart.crash_loop_after` | integer ≥ 1 | `5` | Quick failures in a row before the SUT's state becomes crash-loop. A quick failure is an exit after a run shorter than `backoff_max` (taken as 10 s at least, 60 s at most); the exit after a longer run is not one, and it clears the count. |
//! | `resources.memory` | size | *none* | Memory limit of the container; at least 6 MiB (Docker's minimum). |
//! | `resources.cpus` | float | *none* | CPU limit of the container (e.g. `1.5`); at least `0.01`. |
//! | `resources.pids` | integer | `4096` | Most processes and threads in the container (a fork bomb stops there); from 16 to 65536. |
//! | `log.max_size` | size | `"10MiB"` | Size at which the per-SUT log file is rotated; more than 0. |
//! | `log.keep` | integer ≥ 1 | `5` | Rotated log files kept. |
//! | `log.mqtt_rate` | size | `"1MiB"` | Bytes of output per second published on MQTT (`<sut>/output`, job output), with a burst of one second's worth. Output beyond it is dropped from MQTT only (counted, and seen as a gap in the sequence numbers); stdout and the log file always get all of it. Keeps one flooding device from saturating the shared broker. |
//! | `probe.url` | string | *one of `url` and `command` in `[probe]`* | Optional reachability probe of the device: `tcp://host:port` (an IPv6 address in brackets or not) or `http(s)://…`; a URL the parser refuses (a port over 65535, user info on `tcp://`) is a config error that says why. Its result is retained on `<sut>/probe`; it does not change the SUT's health. |
//! | `probe.command` | array of strings | *one of `url` and `command` in `[probe]`* | An exec probe, as Kubernetes runs them: an argv (non-empty, the program non-empty) the agent runs inside the container every `probe.interval`, e.g. `["sh", "-c", "! tail -n 4 /tmp/testflinger/logs/testflinger-agent.log \| grep -E '403\|Unable to reach'"]`. A non-zero exit, or no exit within `probe.timeout` (the probe's process group is killed), makes the SUT unhealthy: the reason (its exit status and last output lines, at most 5 lines and 512 bytes) is the agent status's `probe_failure`, the `labvisor-healthcheck` line in Docker's health log (what Portainer shows) and `labvisor status`'s detail. The next passing run clears it. The supervisor does not restart a container that is unhealthy only because of its exec probe (see `restart.on_unhealthy`). |
//! | `probe.interval` | duration | `"60s"` | How often the device is probed; at least `1s`. |
//! | `probe.timeout` | duration | `"10s"` | Probe timeout; shorter than `probe.interval`. |
//! | `build.context` | string | *required in `[build]`* | Optional image build: a directory next to the SUT file (relative, no `..`, inside the sut directory after resolving symlinks, not the sut directory itself). With `[build]`, `image` is the tag the supervisor builds (classic builder) and runs; it rebuilds when the context, `dockerfile` or `args` change. The config hash covers every file of the context (paths, permission bits, contents; symlinks as links), at most 64 MiB in all. Without `[build]`, an absent image is pulled. |
//! | `build.dockerfile` | string | `"Dockerfile"` | The Dockerfile, relative to `build.context` (no `..`); must be a regular file inside the context. |
//! | `build.args` | table of strings | `{}` | Build args (`--build-arg KEY=VALUE`). Keys non-empty, without `=`. |
//! | `device.busy_glob` | array of strings | `[]` | Absolute glob patterns inside the container whose matches mean the device process is busy with work labvisor did not start, e.g. testflinger's `/tmp/testflinger/run/*/testflinger.json`. The agent rescans them every 250 ms; while any matches it is `busy` (with `device_work`: the path, or the first path and how many more), so a recreation or removal waits for that work as for a labvisor job (at most `--busy-wait`). Each must be a valid glob. |
//! | `device.drain_signal` | signal name | *none* | A signal that makes the device process exit after its current work (`"SIGUSR1"` for testflinger's safe restart; one of SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, `SIG` optional). When a recreation or removal waits for the device's own work, the supervisor asks the agent to drain: it sends this signal once, to the device process itself (not its group, where the device's work runs), and does not restart the device process after it exits, so the device takes no new work; if the pending action goes away (the file is reverted), the device process is started again, also by a supervisor that restarted meanwhile (it asks each such agent once whether it is drained: `draining` in the agent status, `draining=true` from `labvisor-healthcheck --state`). While a drain is asked (also without this key) queued labvisor jobs wait (kept in the journal on the volume: the new container runs them), and while the device is busy with its own work or drained no health-check job is queued. Needs `command`. |
//! | `health_check.job` | string | *required in `[health_check]`* | Optional health-check job, run by the agent on its own as LAVA runs them: one of `files`, whose content is the job exactly as a submission would carry it (a script, a testflinger job YAML with the `job.template` rules, or a JSON job). It runs like any job (queue, output, `<sut>/jobs/<id>`, `last_job`), first in the queue when due and no job runs, with an id `health-check-…` and `health_check: true` in its status. One runs at the agent's start when none is in the job history on the SUT's volume, and when the SUT is put online after being offline. When it fails (`failed` or `timeout`), the SUT goes offline with the reason `health check <id> failed: <reason>` until a person puts it online (`labvisor online`). |
//! | `health_check.every` | duration | *none* | Run the health check when this long has passed since the last one ended (also counted across agent restarts); at least `1m`. At least one of `every` and `after_jobs` is required. |
//! | `health_check.after_jobs` | integer | *none* | Run the health check after this many jobs have run since the last one; from 1 to 500. |
//! | `health_check.timeout` | duration | `job.timeout` | The health check's time limit; beyond it, it ends `timeout` and the SUT goes offline. |
//! | `placement.host` | string | *none* | The swarm node the SUT's service runs on, by host name (an RFC 1123 host name, as `docker node ls` shows it), e.g. `"rack3-agent-host"`: the node the SUT's device is attached to. Swarm gets it as the constraint `node.hostname==<host>`, first. Under `--runtime swarm` only: the local runtime (`--runtime docker`, the default) ignores `[placement]`. In the config hash: changing it moves the SUT's service (after its running job; under the local runtime it recreates the container likewise). |
//! | `placement.constraints` | array of strings | `[]` | Swarm placement constraints, all of which a node must meet, each `<key> == <value>` or `<key> != <value>` with a key Swarm knows: `node.id`, `node.hostname`, `node.role` (`manager` or `worker`), `node.platform.os`, `node.platform.arch`, `node.labels.<name>`, `engine.labels.<name>`; e.g. `["node.labels.rack == 3", "node.role != manager"]`. Kept in Swarm's form (`node.labels.rack==3`). Ignored by the local runtime, in the config hash like `host`. |
//!
//! Zero durations are refused everywhere except `health.start_period`; durations longer than 365
//! days are refused everywhere.

mod build;
mod device;
mod limits;
mod load;
mod locate;
mod placement;
mod raw;
mod scan;
mod template;
mod types;
mod units;
mod validate;

use std::fmt;

use serde::Serialize;

pub use build::{
    build_hash, context_hash, read_context, ContextEntry, ContextError, EntryKind,
    MAX_CONTEXT_ENTRIES, MAX_CONTEXT_SIZE,
};
pub use limits::*;
pub(crate) use load::read_limited;
pub use load::{
    load_delivered_file, load_delivered_str, load_file, load_str, read_sut_file, ReadError,
};
pub use scan::{is_sut_file, scan_dir, Scan};
pub use template::{CommandTemplate, JobVars, TemplateError, JOB_PLACEHOLDERS};
pub(crate) use types::hex;
pub use types::*;

/// One thing wrong with a SUT file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The file, as it was named to the loader (a path for [`load_file`] and [`scan_dir`]).
    pub file: String,
    /// Dotted key path (`health.max_age`, `files[0]`, `mounts[1].source`, `name` for the file
    /// name); empty for a TOML syntax error.
    pub key: String,
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
    /// What is wrong, and when it helps, how to fix it.
    pub message: String,
}

impl fmt::Display for Problem {
    /// `file: key: message`, or `file:LINE: message` when there is no key (syntax errors).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.key[..], self.line) {
            ("", Some(line)) => write!(f, "{}:{line}: {}", self.file, self.message),
            ("", None) => write!(f, "{}: {}", self.file, self.message),
            (key, _) => write!(f, "{}: {key}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for Problem {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_display() {
        let p = Problem {
            file: "sut/a.toml".into(),
            key: "health.max_age".into(),
            line: Some(3),
            message: "too short".into(),
        };
        assert_eq!(p.to_string(), "sut/a.toml: health.max_age: too short");
        let p = Problem {
            key: String::new(),
            ..p
        };
        assert_eq!(p.to_string(), "sut/a.toml:3: too short");
    }
}
