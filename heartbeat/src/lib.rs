//! # labvisor-heartbeat
//!
//! The heartbeat file the agent writes and `labvisor-healthcheck` reads, and the one rule of
//! which agent states are healthy.
//!
//! It is a crate of its own, std only, so that the healthcheck (a static binary Docker runs on
//! every probe of every SUT) can share the format and the rule with the agent without pulling
//! serde or tokio into its graph. `labvisor-protocol` re-exports it as `protocol::heartbeat`, adds
//! the rendering of its `AgentStatus`, and `AgentState::is_healthy` asks [`is_healthy`]: the
//! healthy-state rule exists here only.
//!
//! ## Theory of operation
//!
//! Every `heartbeat` interval the agent's main loop (the loop that supervises the child and pumps
//! its output, not an independent timer) renders its status ([`Heartbeat::render`]) into this
//! file with [`write_atomic`]: a temporary file in the same directory, then a rename. A reader
//! sees the old file or the new one, never half of one.
//!
//! The format is `key=value` lines, so the healthcheck parses it with std alone and starts in
//! well under a millisecond on every probe:
//!
//! ```text
//! # labvisor heartbeat
//! v=1
//! sut=rpi4-01
//! state=idle
//! time_ms=1795000000000
//! seq=42
//! boot_id=9f2c4e1a7b3d5f60
//! max_age_ms=30000
//! child_pid=17
//! child_alive=true
//! child_restarts=0
//! broker_connected=false
//! output_dropped=0
//! job=
//! detail=
//! unhealthy=
//! admin=
//! device_work=
//! draining=false
//! ```
//!
//! Values are single lines (newlines become spaces). Unknown keys are ignored by readers
//! ([`parse`], [`Reading::read`]). The healthcheck decides from `time_ms`, `max_age_ms`,
//! `state` and `unhealthy` alone ([`is_healthy_status`]): it never asks the broker, so a broker
//! outage cannot turn every agent in the lab unhealthy at once. `admin` (`offline: REASON`, `maintenance: REASON`, empty
//! while online) does not change the verdict: the healthcheck prints it, so Docker's health log
//! and Portainer show why a healthy SUT takes no jobs.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// Where the agent writes its heartbeat inside a container, unless told otherwise.
pub const DEFAULT_PATH: &str = "/labvisor/run/heartbeat";

/// The agent states (kebab-case, as in the heartbeat file and the JSON status) in which Docker
/// should consider the agent healthy. Anything else (`crash-loop`, `stalled`, `offline`, `lost`,
/// or a name this build does not know) is unhealthy.
pub const HEALTHY_STATES: &[&str] = &["starting", "idle", "busy", "restarting", "stopping"];

/// Whether an agent in the state named `state` is healthy: the one healthy-state rule, used by
/// the healthcheck and by `AgentState::is_healthy`.
pub fn is_healthy(state: &str) -> bool {
    HEALTHY_STATES.contains(&state)
}

/// The one healthy rule for a whole status: a healthy state ([`is_healthy`]) and no reason to be
/// unhealthy (`unhealthy`, the heartbeat's key of that name: a failing exec probe fills it, and
/// the agent may then be idle or busy, its loop fine, and still not working). Used by the
/// healthcheck and by `AgentStatus::is_healthy`.
pub fn is_healthy_status(state: &str, unhealthy: &str) -> bool {
    is_healthy(state) && unhealthy.trim().is_empty()
}

/// The device process as the heartbeat file records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Child {
    /// Its process id, if it runs or ran.
    pub pid: Option<u32>,
    /// Whether it is running.
    pub alive: bool,
    /// Restarts since the agent started.
    pub restarts: u64,
}

/// One heartbeat, as written to the file: the fields of the agent's status the file carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat<'a> {
    /// Payload version of the agent's status.
    pub v: u32,
    /// The SUT name.
    pub sut: &'a str,
    /// The agent state, kebab-case (`idle`, `crash-loop`, ...).
    pub state: &'a str,
    /// When the status was taken, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Sequence number of the status.
    pub seq: u64,
    /// Random id of this agent run.
    pub boot_id: &'a str,
    /// Age after which the healthcheck calls this heartbeat stale.
    pub max_age: Duration,
    /// The device process, if the agent has one.
    pub child: Option<Child>,
    /// Whether the agent is connected to its broker.
    pub broker_connected: bool,
    /// Output messages dropped on MQTT so far.
    pub output_dropped: u64,
    /// The running job's id, empty when idle.
    pub job: &'a str,
    /// Human detail (why a crash loop, ...), empty when none.
    pub detail: &'a str,
    /// Why the agent is unhealthy whatever its state (a failing exec probe, with its output),
    /// empty when nothing is ([`is_healthy_status`]).
    pub unhealthy: &'a str,
    // -- admin (lab operations) --
    /// The admin state, `offline: REASON` or `maintenance: REASON`; empty while online.
    pub admin: &'a str,
    /// The device process's own work (what `device.busy_glob` matched), empty when none.
    pub device_work: &'a str,
    /// Whether the device process is drained until the drain is lifted.
    pub draining: bool,
}

impl Heartbeat<'_> {
    /// The file's text: one `key=value` line per field, values made single-line.
    pub fn render(&self) -> String {
        fn one_line(s: &str) -> String {
            s.replace(['\n', '\r'], " ")
        }
        let child = self.child.as_ref();
        format!(
            "# labvisor heartbeat\nv={}\nsut={}\nstate={}\ntime_ms={}\nseq={}\nboot_id={}\nmax_age_ms={}\nchild_pid={}\nchild_alive={}\nchild_restarts={}\nbroker_connected={}\noutput_dropped={}\njob={}\ndetail={}\nunhealthy={}\nadmin={}\ndevice_work={}\ndraining={}\n",
            self.v,
            self.sut,
            self.state,
            self.time_ms,
            self.seq,
            one_line(self.boot_id),
            self.max_age.as_millis(),
            child.and_then(|c| c.pid).map(|p| p.to_string()).unwrap_or_default(),
            child.map(|c| c.alive.to_string()).unwrap_or_default(),
            child.map(|c| c.restarts.to_string()).unwrap_or_default(),
            self.broker_connected,
            self.output_dropped,
            self.job,
            one_line(self.detail),
            one_line(self.unhealthy),
            one_line(self.admin),
            one_line(self.device_work),
            self.draining,
        )
    }
}

/// Parses a heartbeat file into `(key, value)` pairs, in order; comments and blank lines skipped.
pub fn parse(text: &str) -> Vec<(&str, &str)> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .collect()
}

/// What the healthcheck reads from a heartbeat file; a field missing or malformed in the file is
/// `None` (or empty).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reading<'a> {
    /// `time_ms`.
    pub time_ms: Option<u64>,
    /// `state`.
    pub state: Option<&'a str>,
    /// `max_age_ms`.
    pub max_age: Option<Duration>,
    /// `detail` (empty when absent).
    pub detail: &'a str,
    /// `child_alive`: `true`, `false`, or empty when the agent has no device process.
    pub child_alive: &'a str,
    /// `unhealthy` (empty when absent).
    pub unhealthy: &'a str,
    /// `admin`: `offline: REASON`, `maintenance: REASON`, or empty while online.
    pub admin: &'a str,
    /// `device_work` (empty when absent or none).
    pub device_work: &'a str,
    /// `draining` (`true`; false when absent).
    pub draining: bool,
}

impl<'a> Reading<'a> {
    /// Reads the fields the healthcheck needs from a heartbeat file's text.
    pub fn read(text: &'a str) -> Self {
        let mut r = Reading::default();
        for (k, v) in parse(text) {
            match k {
                "time_ms" => r.time_ms = v.parse::<u64>().ok(),
                "state" => r.state = Some(v),
                "max_age_ms" => r.max_age = v.parse::<u64>().ok().map(Duration::from_millis),
                "detail" => r.detail = v,
                "child_alive" => r.child_alive = v,
                "unhealthy" => r.unhealthy = v,
                "admin" => r.admin = v,
                "device_work" => r.device_work = v,
                "draining" => r.draining = v == "true",
                _ => {}
            }
        }
        r
    }
}

/// Writes `text` to `path` atomically: a temporary file beside it, then a rename.
pub fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "heartbeat".into());
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    drop(f);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Heartbeat<'static> {
        Heartbeat {
            v: 1,
            sut: "rpi4-01",
            state: "crash-loop",
            time_ms: 1_795_000_000_000,
            seq: 42,
            boot_id: "b",
            max_age: Duration::from_secs(30),
            child: Some(Child {
                pid: Some(17),
                alive: false,
                restarts: 5,
            }),
            broker_connected: false,
            output_dropped: 3,
            job: "",
            detail: "exited 5 times\nin 10s",
            unhealthy: "probe failing: exit 1: 403\nForbidden",
            admin: "offline: flaky\nusb",
            device_work: "/tmp/testflinger/run/j1/testflinger.json",
            draining: true,
        }
    }

    #[test]
    fn renders_every_field_on_one_line_each() {
        let text = sample().render();
        let kv = parse(&text);
        let get = |k| kv.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
        assert_eq!(get("state"), Some("crash-loop"));
        assert_eq!(get("time_ms"), Some("1795000000000"));
        assert_eq!(get("max_age_ms"), Some("30000"));
        assert_eq!(get("child_pid"), Some("17"));
        assert_eq!(get("child_restarts"), Some("5"));
        assert_eq!(get("detail"), Some("exited 5 times in 10s"));
        assert_eq!(get("output_dropped"), Some("3"));
        assert_eq!(
            get("unhealthy"),
            Some("probe failing: exit 1: 403 Forbidden")
        );
        assert_eq!(get("admin"), Some("offline: flaky usb"));
        assert_eq!(
            get("device_work"),
            Some("/tmp/testflinger/run/j1/testflinger.json")
        );
        assert_eq!(get("draining"), Some("true"));
        assert_eq!(kv.len(), 18, "every field, no more");
    }

    #[test]
    fn a_reading_gets_back_what_was_rendered() {
        let text = sample().render();
        let r = Reading::read(&text);
        assert_eq!(r.time_ms, Some(1_795_000_000_000));
        assert_eq!(r.state, Some("crash-loop"));
        assert_eq!(r.max_age, Some(Duration::from_secs(30)));
        assert_eq!(r.detail, "exited 5 times in 10s");
        assert_eq!(r.child_alive, "false");
        assert_eq!(r.unhealthy, "probe failing: exit 1: 403 Forbidden");
        assert_eq!(r.admin, "offline: flaky usb");
        assert_eq!(r.device_work, "/tmp/testflinger/run/j1/testflinger.json");
        assert!(r.draining);
        let none = Heartbeat {
            child: None,
            ..sample()
        }
        .render();
        assert_eq!(Reading::read(&none).child_alive, "");
        assert_eq!(Reading::read("garbage\n\0"), Reading::default());
    }

    #[test]
    fn healthy_states_are_the_running_ones() {
        for s in ["starting", "idle", "busy", "restarting", "stopping"] {
            assert!(is_healthy(s), "{s}");
        }
        for s in ["crash-loop", "stalled", "offline", "lost", "", "Idle"] {
            assert!(!is_healthy(s), "{s}");
        }
    }

    #[test]
    fn a_reason_to_be_unhealthy_overrides_a_healthy_state() {
        assert!(is_healthy_status("idle", ""));
        assert!(is_healthy_status("busy", " "));
        assert!(!is_healthy_status("idle", "probe failing: exit 1"));
        assert!(!is_healthy_status("busy", "probe failing: timed out"));
        assert!(!is_healthy_status("crash-loop", ""));
        // A heartbeat from before the key existed has none: its state decides.
        assert_eq!(Reading::read("state=idle\n").unhealthy, "");
    }

    #[test]
    fn atomic_write_replaces_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("heartbeat");
        write_atomic(&p, "a=1\n").unwrap();
        write_atomic(&p, "a=2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "a=2\n");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
