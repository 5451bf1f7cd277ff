//! The SUT config: one TOML file per device under test in the `sut/` directory.
//!
//! The file stem is the SUT's name (`sut/rpi4-01.toml` is SUT `rpi4-01`) and must be a valid
//! [`SutName`], other than the reserved `labvisor` ([`crate::name::RESERVED_SUT_NAME`]: a SUT's
//! login gets `<sut>/#`, and `labvisor/...` is the control plane). A file is read in two steps: serde reads it into raw structs that deny unknown
//! keys, then validation turns it into a [`SutConfig`] whose fields hold only checked values.
//! Validation reports every problem it finds as a [`Problem`], printed as `file: key: message`
//! (a TOML syntax error is printed as `file:LINE: message`). When serde itself fails (syntax,
//! unknown key, wrong type) only that one problem can be reported.
//!
//! Settings that hand the container power over the host or over other containers
//! (`privileged`, `devices`, `mounts`, `network = "host"` or another Docker network, `cap_add`,
//! `no_new_privileges = false`) are refused unless the supervisor was started with the matching
//! `--allow-*` flag (see [`Allow`]).
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
//! | `labels` | table of strings | `{}` | Extra Docker labels. Keys starting `io.labvisor.` are reserved. |
//! | `privileged` | bool | `false` | Run the container privileged. Needs `--allow-privileged`. |
//! | `cap_add` | array of strings | `[]` | Linux capabilities added to the agents' default set (CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, NET_BIND_SERVICE, SETGID, SETUID; every other one is dropped), e.g. `["NET_RAW"]`; `CAP_` optional. Needs `--allow-caps`. |
//! | `no_new_privileges` | bool | `true` | Docker's `no-new-privileges`: no process in the container gains privileges through setuid or file-capability binaries. `false` needs `--allow-new-privileges`. |
//! | `devices` | array of strings | `[]` | Host devices (absolute paths under `/dev/`, e.g. `/dev/ttyUSB0`) passed into the container at the same path. Needs `--allow-devices`. |
//! | `mounts` | array of tables | `[]` | Host bind mounts `{ source = "/abs/host/path", target = "/abs/container/path", read_only = true }`; `source` and `target` absolute, `read_only` defaults to `true`. Needs `--allow-host-mounts`. |
//! | `health.heartbeat` | duration | `"5s"` | How often the agent writes its heartbeat file; at least `100ms`. |
//! | `health.max_age` | duration | `"30s"` | A heartbeat older than this is unhealthy. Must be longer than `heartbeat`. |
//! | `health.interval` | duration | `"10s"` | Docker health-check interval; at least `1s`. At most `max_age`, so a stale heartbeat is seen by at least one probe. |
//! | `health.timeout` | duration | `"5s"` | Docker health-check timeout. Shorter than `interval`. |
//! | `health.retries` | integer ≥ 1 | `3` | Failed probes before Docker marks the container unhealthy. A hung agent is detected after at most `max_age + interval × retries` (see [`Health::detection_time`]). |
//! | `health.start_period` | duration | `"30s"` | Grace period after start during which failed probes do not count (may be `"0s"`). |
//! | `job.command` | array of strings | `["/bin/sh", "{job_file}"]` | argv template run for each job. Placeholders: `{job_file}`, `{job_dir}`, `{job_id}`, `{sut}`; `{{` and `}}` are literal braces; any other `{name}` is an error. |
//! | `job.template` | string | *none* | A job template file (e.g. a testflinger job YAML), one of `files`. A submitted script is merged into a copy of it as `test_data.test_cmds`, and that copy is the job's `{job_file}`. |
//! | `job.timeout` | duration | `"4h"` | A job running longer is stopped. |
//! | `job.output_timeout` | duration | `"15m"` | A job silent for longer is stopped. |
//! | `job.queue_limit` | integer ≥ 1 | `100` | Jobs waiting in the agent's queue; more are rejected. |
//! | `job.max_payload` | size | `"64KiB"` | Largest accepted job submission; more than 0, at most 8 MiB. |
//! | `job.requeue_lost` | bool | `false` | Requeue a job that was running when the agent died instead of reporting it lost. |
//! | `restart.on_unhealthy` | `"restart"` \| `"none"` | `"restart"` | What the supervisor does with an unhealthy container. |
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
//! | `probe.url` | string | *required in `[probe]`* | Optional reachability probe of the device: `tcp://host:port` or `http(s)://…`. |
//! | `probe.interval` | duration | `"60s"` | How often the device is probed; at least `1s`. |
//! | `probe.timeout` | duration | `"10s"` | Probe timeout; shorter than `probe.interval`. |
//! | `build.context` | string | *required in `[build]`* | Optional image build: a directory next to the SUT file (relative, no `..`, inside the sut directory after resolving symlinks, not the sut directory itself). With `[build]`, `image` is the tag the supervisor builds (classic builder) and runs; it rebuilds when the context, `dockerfile` or `args` change. The config hash covers every file of the context (paths, permission bits, contents; symlinks as links), at most 64 MiB in all. Without `[build]`, an absent image is pulled. |
//! | `build.dockerfile` | string | `"Dockerfile"` | The Dockerfile, relative to `build.context` (no `..`); must be a regular file inside the context. |
//! | `build.args` | table of strings | `{}` | Build args (`--build-arg KEY=VALUE`). Keys non-empty, without `=`. |
//!
//! Zero durations are refused everywhere except `health.start_period`; durations longer than 365
//! days are refused everywhere.

mod build;
mod locate;
mod raw;
mod template;
mod units;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::num::{NonZeroU32, NonZeroU64};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::name::SutName;
use units::ser_duration;

pub use build::{
    build_hash, context_hash, read_context, ContextEntry, EntryKind, MAX_CONTEXT_ENTRIES,
    MAX_CONTEXT_SIZE,
};
pub use template::{CommandTemplate, JobVars, TemplateError, JOB_PLACEHOLDERS};

/// Where the `files` of a SUT appear inside its container: `files = ["a.yaml"]` becomes
/// `/labvisor/sut/a.yaml`.
pub const CONTAINER_FILES_DIR: &str = "/labvisor/sut";

/// Largest accepted file listed in `files` (1 MiB).
pub const MAX_FILE_SIZE: u64 = 1024 * 1024;

/// Largest accepted SUT file itself (1 MiB).
pub const MAX_CONFIG_SIZE: u64 = 1024 * 1024;

/// Upper bound of `job.max_payload` (8 MiB).
pub const MAX_PAYLOAD_LIMIT: u64 = 8 * 1024 * 1024;

/// Longest accepted duration (365 days): keeps every duration far from overflow when the
/// supervisor hands it to Docker in nanoseconds.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Largest accepted size (`i64::MAX` bytes, Docker's own limit type).
pub const MAX_SIZE: u64 = i64::MAX as u64;

/// Name of the shared Docker bridge network labvisor creates for its agents and broker.
pub const LABVISOR_NETWORK: &str = "labvisor";

/// Prefix of the environment variables labvisor sets itself; refused in `env`.
pub const RESERVED_ENV_PREFIX: &str = "LABVISOR_";

/// Prefix of the Docker labels labvisor sets itself; refused in `labels`.
pub const RESERVED_LABEL_PREFIX: &str = "io.labvisor.";

/// Which host-power settings the supervisor accepts. All refused by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Allow {
    /// Accept `privileged = true` (`--allow-privileged`).
    pub privileged: bool,
    /// Accept `mounts` (`--allow-host-mounts`).
    pub host_mounts: bool,
    /// Accept `network = "host"` (`--allow-host-network`).
    pub host_network: bool,
    /// Accept `devices` (`--allow-devices`).
    pub devices: bool,
    /// Accept `network = "<any other Docker network>"` (`--allow-network`).
    pub network: bool,
    /// Accept `cap_add` (`--allow-caps`).
    pub caps: bool,
    /// Accept `no_new_privileges = false` (`--allow-new-privileges`).
    pub new_privileges: bool,
}

impl Allow {
    /// Everything allowed.
    pub fn all() -> Self {
        Self {
            privileged: true,
            host_mounts: true,
            host_network: true,
            devices: true,
            network: true,
            caps: true,
            new_privileges: true,
        }
    }
}

/// Linux capabilities `cap_add` may name (without the `CAP_` prefix).
pub const CAPABILITIES: &[&str] = &[
    "AUDIT_CONTROL",
    "AUDIT_READ",
    "AUDIT_WRITE",
    "BLOCK_SUSPEND",
    "BPF",
    "CHECKPOINT_RESTORE",
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "IPC_LOCK",
    "IPC_OWNER",
    "KILL",
    "LEASE",
    "LINUX_IMMUTABLE",
    "MAC_ADMIN",
    "MAC_OVERRIDE",
    "MKNOD",
    "NET_ADMIN",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_RAW",
    "PERFMON",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYSLOG",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_CHROOT",
    "SYS_MODULE",
    "SYS_NICE",
    "SYS_PACCT",
    "SYS_PTRACE",
    "SYS_RAWIO",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "WAKE_ALARM",
];

/// The capabilities every agent container keeps (all others are dropped): what a device agent
/// running as root needs to manage its own files and processes (Python, an ssh client, a TCP
/// serial console need nothing more). `NET_RAW` (raw and packet sockets: sniffing, ARP
/// spoofing), `MKNOD`, `SETFCAP`, `SETPCAP`, `SYS_CHROOT` and `AUDIT_WRITE`, which Docker grants
/// by default, are not kept; `cap_add` gives them back per SUT with `--allow-caps`.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "NET_BIND_SERVICE",
    "SETGID",
    "SETUID",
];

/// Default `resources.pids`: the most processes (and threads) a container may hold.
pub const DEFAULT_PIDS: u32 = 4096;
/// Smallest accepted `resources.pids`.
pub const MIN_PIDS: u32 = 16;
/// Largest accepted `resources.pids`.
pub const MAX_PIDS: u32 = 65536;
/// Smallest accepted `resources.memory` (Docker's own minimum on Engine 20.10 is 6 MiB).
pub const MIN_MEMORY: u64 = 6 * 1024 * 1024;
/// Smallest accepted `resources.cpus`.
pub const MIN_CPUS: f64 = 0.01;
/// Shortest accepted `health.heartbeat` (each beat writes the heartbeat file and may publish).
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(100);
/// Shortest accepted `health.interval` and `probe.interval` (each Docker probe is an exec).
pub const MIN_PROBE_INTERVAL: Duration = Duration::from_secs(1);

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

/// A validated SUT config. Built only by [`load_file`], [`load_str`] and [`scan_dir`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SutConfig {
    /// The SUT's name: the file stem.
    pub name: SutName,
    /// Docker image of the agent container.
    pub image: String,
    /// argv of the device's long-running process; `None` for a job-only agent.
    pub command: Option<Vec<String>>,
    /// Container environment (no `LABVISOR_*` keys).
    pub env: BTreeMap<String, String>,
    /// Files delivered into the container under [`CONTAINER_FILES_DIR`], with their contents.
    pub files: Vec<SutFile>,
    /// Absolute globs inside the container whose files are followed as job output.
    pub tail: Vec<String>,
    /// The container's network.
    pub network: Network,
    /// Extra Docker labels (no `io.labvisor.*` keys).
    pub labels: BTreeMap<String, String>,
    /// Privileged container (only if allowed).
    pub privileged: bool,
    /// Capabilities added to [`DEFAULT_CAPABILITIES`] (only if allowed), without `CAP_`.
    pub cap_add: Vec<String>,
    /// `no-new-privileges` (on unless allowed off).
    pub no_new_privileges: bool,
    /// Host device paths passed through (only if allowed).
    pub devices: Vec<String>,
    /// Host bind mounts (only if allowed).
    pub mounts: Vec<Mount>,
    /// Heartbeat and Docker health-check timings.
    pub health: Health,
    /// Job settings.
    pub job: JobSettings,
    /// Restart policy.
    pub restart: RestartSettings,
    /// Container resource limits.
    pub resources: Resources,
    /// Rotation of the per-SUT log file.
    pub log: LogSettings,
    /// Optional reachability probe of the device.
    pub probe: Option<Probe>,
    /// Optional image build (`[build]`); `image` is then the tag it produces. Left out of the
    /// serialisation (and so of the hash) when absent, so configs without it keep their hash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build: Option<Build>,
}

impl SutConfig {
    /// SHA-256 (lower-case hex) of the canonical JSON serialisation of the whole validated config,
    /// including the contents of `files`. Formatting and comments of the TOML do not matter; any
    /// effective change does.
    pub fn hash(&self) -> String {
        let json = serde_json::to_vec(self).expect("a SutConfig always serialises to JSON");
        hex(&Sha256::digest(&json))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A file listed in `files`, read at load time.
#[derive(Clone, PartialEq, Eq)]
pub struct SutFile {
    /// The normalised relative path (`a/b.yaml`), also its path under [`CONTAINER_FILES_DIR`].
    pub name: String,
    /// The file's contents.
    pub content: Vec<u8>,
}

impl SutFile {
    /// Where the file appears inside the container.
    pub fn container_path(&self) -> String {
        format!("{CONTAINER_FILES_DIR}/{}", self.name)
    }

    /// SHA-256 (hex) of the contents.
    pub fn sha256(&self) -> String {
        hex(&Sha256::digest(&self.content))
    }
}

impl fmt::Debug for SutFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SutFile")
            .field("name", &self.name)
            .field("size", &self.content.len())
            .finish()
    }
}

impl Serialize for SutFile {
    /// `{ "name", "size", "sha256" }`: the digest stands for the contents.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("SutFile", 3)?;
        st.serialize_field("name", &self.name)?;
        st.serialize_field("size", &self.content.len())?;
        st.serialize_field("sha256", &self.sha256())?;
        st.end()
    }
}

/// The container's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// The shared labvisor bridge network ([`LABVISOR_NETWORK`]).
    Labvisor,
    /// The host's network stack (only if allowed).
    Host,
    /// Another existing Docker network, by name.
    Named(String),
}

impl Network {
    /// The Docker network name.
    pub fn as_str(&self) -> &str {
        match self {
            Network::Labvisor => LABVISOR_NETWORK,
            Network::Host => "host",
            Network::Named(n) => n,
        }
    }
}

impl Serialize for Network {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A host bind mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mount {
    /// Absolute path on the host.
    pub source: String,
    /// Absolute path in the container.
    pub target: String,
    /// Mounted read-only (the default).
    pub read_only: bool,
}

/// Heartbeat and Docker health-check timings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Health {
    /// How often the agent writes its heartbeat.
    #[serde(serialize_with = "ser_duration")]
    pub heartbeat: Duration,
    /// A heartbeat older than this is unhealthy (> `heartbeat`).
    #[serde(serialize_with = "ser_duration")]
    pub max_age: Duration,
    /// Docker probe interval (≤ `max_age`).
    #[serde(serialize_with = "ser_duration")]
    pub interval: Duration,
    /// Docker probe timeout (< `interval`).
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// Failed probes before unhealthy.
    pub retries: NonZeroU32,
    /// Grace period after start.
    #[serde(serialize_with = "ser_duration")]
    pub start_period: Duration,
}

impl Health {
    /// Worst-case time from the agent's last heartbeat to Docker reporting the container
    /// unhealthy: the heartbeat goes stale after `max_age`, and Docker needs `retries` failed
    /// probes, `interval` apart: `max_age + interval × retries`.
    pub fn detection_time(&self) -> Duration {
        self.max_age
            .saturating_add(self.interval.saturating_mul(self.retries.get()))
    }
}

/// Job settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobSettings {
    /// argv template run for each job.
    pub command: CommandTemplate,
    /// Name of the job template file (one of `files`).
    pub template: Option<String>,
    /// Longest a job may run.
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// Longest a job may stay silent.
    #[serde(serialize_with = "ser_duration")]
    pub output_timeout: Duration,
    /// Jobs that may wait in the queue.
    pub queue_limit: NonZeroU32,
    /// Largest accepted job submission in bytes (≤ [`MAX_PAYLOAD_LIMIT`]).
    pub max_payload: NonZeroU64,
    /// Requeue a job lost to an agent crash.
    pub requeue_lost: bool,
}

/// What the supervisor does with an unhealthy container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnhealthy {
    /// Restart it (with backoff).
    Restart,
    /// Only report it.
    None,
}

/// What the agent does when the device process exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnChildExit {
    /// Restart the process (with backoff).
    Restart,
    /// Exit the agent; the supervisor restarts the container.
    Exit,
}

/// Restart policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestartSettings {
    /// What to do with an unhealthy container.
    pub on_unhealthy: OnUnhealthy,
    /// First restart delay.
    #[serde(serialize_with = "ser_duration")]
    pub backoff_min: Duration,
    /// Longest restart delay (≥ `backoff_min`).
    #[serde(serialize_with = "ser_duration")]
    pub backoff_max: Duration,
    /// What the agent does when the device process exits.
    pub on_child_exit: OnChildExit,
    /// Quick failures in a row before the state is crash-loop.
    pub crash_loop_after: NonZeroU32,
}

/// Container resource limits.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Resources {
    /// Memory limit in bytes.
    pub memory: Option<NonZeroU64>,
    /// CPU limit (finite, ≥ [`MIN_CPUS`]).
    pub cpus: Option<f64>,
    /// Most processes and threads ([`MIN_PIDS`]..=[`MAX_PIDS`]).
    pub pids: u32,
}

/// Rotation of the per-SUT log file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogSettings {
    /// Rotate at this size in bytes.
    pub max_size: NonZeroU64,
    /// Rotated files kept.
    pub keep: NonZeroU32,
    /// Output bytes per second published on MQTT; `None`: [`LogSettings::DEFAULT_MQTT_RATE`].
    /// Left out of the serialisation (and so of the hash) when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt_rate: Option<NonZeroU64>,
}

impl LogSettings {
    /// Default of `log.mqtt_rate`: 1 MiB/s.
    pub const DEFAULT_MQTT_RATE: u64 = 1 << 20;

    /// Output bytes per second published on MQTT.
    pub fn mqtt_rate(&self) -> u64 {
        self.mqtt_rate
            .map_or(Self::DEFAULT_MQTT_RATE, NonZeroU64::get)
    }
}

/// Reachability probe of the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Probe {
    /// What to probe.
    pub url: ProbeTarget,
    /// How often.
    #[serde(serialize_with = "ser_duration")]
    pub interval: Duration,
    /// Timeout of one probe (< `interval`).
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
}

/// The `[build]` section: how the SUT's image is built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Build {
    /// The context directory, normalised, relative to the sut directory.
    pub context: String,
    /// The Dockerfile, normalised, relative to the context.
    pub dockerfile: String,
    /// Build args.
    pub args: BTreeMap<String, String>,
    /// [`context_hash`] of the context when the config was loaded.
    pub context_hash: String,
    /// The context directory, resolved (absolute, symlinks resolved); not part of the hash, so
    /// moving the whole sut directory rebuilds nothing.
    #[serde(skip)]
    pub context_dir: PathBuf,
}

impl Build {
    /// The build hash ([`build_hash`]) of this build as loaded: the image label that says the
    /// image is up to date.
    pub fn hash(&self) -> String {
        build_hash(&self.context_hash, &self.dockerfile, &self.args)
    }
}

/// What a [`Probe`] connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeTarget {
    /// Open a TCP connection (`tcp://host:port`).
    Tcp {
        /// Host name or address (IPv6 in brackets).
        host: String,
        /// Port, never 0.
        port: u16,
    },
    /// An HTTP(S) GET that must answer (`http://…`, `https://…`).
    Http {
        /// The full URL.
        url: String,
    },
}

impl fmt::Display for ProbeTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeTarget::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            ProbeTarget::Http { url } => f.write_str(url),
        }
    }
}

impl Serialize for ProbeTarget {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Loads and validates the SUT file at `path`; its sut directory is the file's parent.
/// Problems name the file as `path` is displayed.
pub fn load_file(path: &Path, allow: &Allow) -> Result<SutConfig, Vec<Problem>> {
    load_path(path, allow, true)
}

/// Loads the SUT file at `path` as it is delivered into the agent's container: like
/// [`load_file`], except that `[build]` is only parsed (its context stays on the supervisor's
/// side and is not in the container), and the result's `build` is `None`.
pub fn load_delivered_file(path: &Path, allow: &Allow) -> Result<SutConfig, Vec<Problem>> {
    load_path(path, allow, false)
}

/// Validates `text` as the SUT file delivered at `path` in the agent's container, when its
/// contents came inline (the supervisor's `LABVISOR_CONFIG_TOML`) rather than as a file: the
/// name is `path`'s stem, `files` are looked up beside `path`, and `[build]` is handled as in
/// [`load_delivered_file`]. Problems name `path` as displayed.
pub fn load_delivered_str(
    path: &Path,
    text: &str,
    allow: &Allow,
) -> Result<SutConfig, Vec<Problem>> {
    if text.len() as u64 > MAX_CONFIG_SIZE {
        return Err(vec![Problem {
            file: path.display().to_string(),
            key: String::new(),
            line: None,
            message: format!("the file is larger than {MAX_CONFIG_SIZE} bytes"),
        }]);
    }
    load_text(path, text, allow, false)
}

fn load_text(
    path: &Path,
    text: &str,
    allow: &Allow,
    check_build: bool,
) -> Result<SutConfig, Vec<Problem>> {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let sut_dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    validate::load(
        &path.display().to_string(),
        &stem,
        text,
        sut_dir,
        allow,
        check_build,
    )
}

fn load_path(path: &Path, allow: &Allow, check_build: bool) -> Result<SutConfig, Vec<Problem>> {
    let display = path.display().to_string();
    let problem = |message: String| {
        vec![Problem {
            file: display.clone(),
            key: String::new(),
            line: None,
            message,
        }]
    };
    let bytes = match read_sut_file(path) {
        Ok(b) => b,
        Err(e) => return Err(problem(e.to_string())),
    };
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => return Err(problem(format!("the file is not UTF-8: {e}"))),
    };
    load_text(path, &text, allow, check_build)
}

/// Why a SUT file could not be read ([`read_sut_file`]).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file resolves (through symlinks) to a place outside its directory.
    #[error("refused: the file resolves to {resolved}, outside the sut directory {dir} (a SUT file may be a symlink only to a file inside it)")]
    Outside {
        /// Where it resolves to.
        resolved: String,
        /// The sut directory, resolved.
        dir: String,
    },
    /// Not a regular file.
    #[error("refused: not a regular file")]
    NotAFile,
    /// Larger than [`MAX_CONFIG_SIZE`].
    #[error("the file is larger than {MAX_CONFIG_SIZE} bytes")]
    TooLarge,
    /// Any other I/O error.
    #[error("cannot read the file: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads the SUT file at `path` (at most [`MAX_CONFIG_SIZE`] bytes), refusing, before reading a
/// byte, a file that is not a regular file inside `path`'s own directory after symlinks are
/// resolved: a supervisor running as root must not read (and report parse errors of) a
/// `sut/x.toml` that links to `/etc/shadow`. The place is checked again on the opened file, so
/// a swap between check and open is caught too.
pub fn read_sut_file(path: &Path) -> Result<Vec<u8>, ReadError> {
    use std::io::Read;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = dir.canonicalize()?;
    let inside = |resolved: &Path| -> Result<(), ReadError> {
        if resolved.starts_with(&dir) {
            Ok(())
        } else {
            Err(ReadError::Outside {
                resolved: resolved.display().to_string(),
                dir: dir.display().to_string(),
            })
        }
    };
    let resolved = path.canonicalize()?;
    inside(&resolved)?;
    if !std::fs::metadata(&resolved)?.is_file() {
        return Err(ReadError::NotAFile);
    }
    let file = std::fs::File::open(&resolved)?;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let opened = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
        inside(&opened)?;
    }
    if !file.metadata()?.is_file() {
        return Err(ReadError::NotAFile);
    }
    let mut buf = Vec::new();
    file.take(MAX_CONFIG_SIZE + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_CONFIG_SIZE {
        return Err(ReadError::TooLarge);
    }
    Ok(buf)
}

/// Validates `text` as the SUT file `file_name` (e.g. `rpi4-01.toml`, whose stem is the SUT name)
/// in `sut_dir`, where its `files` are looked up.
pub fn load_str(
    file_name: &str,
    text: &str,
    sut_dir: &Path,
    allow: &Allow,
) -> Result<SutConfig, Vec<Problem>> {
    let stem = Path::new(file_name)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    validate::load(file_name, &stem, text, sut_dir, allow, true)
}

/// Reads at most `limit` bytes; `None` if the file is larger.
pub(crate) fn read_limited(path: &Path, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::fs::File::open(path)?
        .take(limit + 1)
        .read_to_end(&mut buf)?;
    Ok((buf.len() as u64 <= limit).then_some(buf))
}

/// Whether `path` names a SUT file: `*.toml`, not hidden, not an editor's temporary file
/// (`*~`, `.#*`, `*.swp`, vim's `4913`).
pub fn is_sut_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    name.ends_with(".toml")
        && name.len() > ".toml".len()
        && !name.starts_with('.')
        && !name.ends_with('~')
        && !name.ends_with(".swp")
        && name != "4913"
}

/// The result of reading a whole sut directory.
#[derive(Debug, Default)]
pub struct Scan {
    /// Valid SUTs by name.
    pub valid: BTreeMap<SutName, SutConfig>,
    /// Invalid SUT files and their problems.
    pub invalid: BTreeMap<PathBuf, Vec<Problem>>,
}

impl Scan {
    /// The SUT file of a valid SUT in the scanned directory.
    pub fn path_of(dir: &Path, name: &SutName) -> PathBuf {
        dir.join(format!("{name}.toml"))
    }
}

/// Whether `path`'s name ends in `.toml` but is not valid UTF-8 (so [`is_sut_file`] refuses it):
/// meant as a SUT file, but no SUT can be named after it.
fn is_non_utf8_toml(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Some(name) = path.file_name() else {
        return false;
    };
    let b = name.as_bytes();
    name.to_str().is_none() && b.ends_with(b".toml") && !b.starts_with(b".")
}

/// Loads every SUT file (see [`is_sut_file`]) directly in `dir`. Entries named like a SUT file
/// that cannot be one are reported in [`Scan::invalid`] too, never silently skipped: a directory
/// (or anything else that is not a regular file, or a dangling symlink) named `x.toml`, and a
/// `.toml` name that is not UTF-8. Fails only if the directory cannot be listed.
pub fn scan_dir(dir: &Path, allow: &Allow) -> std::io::Result<Scan> {
    let mut paths = Vec::new();
    let mut scan = Scan::default();
    let problem = |path: &Path, key: &str, message: String| {
        vec![Problem {
            file: path.display().to_string(),
            key: key.to_owned(),
            line: None,
            message,
        }]
    };
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if is_non_utf8_toml(&path) {
            let p = problem(
                &path,
                "name",
                "the file name is not valid UTF-8, so it gives no SUT name; rename the file \
                 (SUT names are [a-z0-9][a-z0-9_-]*)"
                    .into(),
            );
            scan.invalid.insert(path, p);
            continue;
        }
        if !is_sut_file(&path) {
            continue;
        }
        // Follows symlinks: a symlink to a file is checked (and refused when it leads out of
        // the directory) when it is read.
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => paths.push(path),
            Ok(m) => {
                let what = if m.is_dir() {
                    "a directory"
                } else {
                    "not a regular file"
                };
                let p = problem(
                    &path,
                    "",
                    format!("is {what}, not a SUT file; rename or remove it"),
                );
                scan.invalid.insert(path, p);
            }
            Err(e) => {
                let p = problem(&path, "", format!("cannot read the file: {e}"));
                scan.invalid.insert(path, p);
            }
        }
    }
    paths.sort();
    for path in paths {
        match load_file(&path, allow) {
            Ok(cfg) => {
                scan.valid.insert(cfg.name.clone(), cfg);
            }
            Err(problems) => {
                scan.invalid.insert(path, problems);
            }
        }
    }
    Ok(scan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sut_file_names() {
        for ok in ["a.toml", "sut/rpi4-01.toml", "Bad.Name.toml"] {
            assert!(is_sut_file(Path::new(ok)), "{ok}");
        }
        for bad in [
            ".toml",
            ".hidden.toml",
            "a.toml~",
            ".#a.toml",
            "a.toml.swp",
            ".a.toml.swp",
            "4913",
            "a.yaml",
            "a.conf",
            "toml",
        ] {
            assert!(!is_sut_file(Path::new(bad)), "{bad}");
        }
    }

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
