//! The payloads carried on labvisor's topics (see [`crate::topics`] for which goes where).
//!
//! State is JSON, readable in MQTT Explorer, and every JSON payload carries `"v": 1`, the
//! payload version: a consumer that sees a higher version knows the shape changed. Fields are
//! only ever added within a version; optional fields are left out when empty. Output is plain
//! UTF-8 text, with its sequence number in MQTT 5 user properties ([`OutputMeta`]).
//!
//! Every payload is frozen by a snapshot test (`protocol/tests/payloads.rs`).
//!
//! This module holds the version, the agent's own payloads (status, output metadata, probe
//! result) and the ids; `job` holds the job payloads (submission, acknowledgements, status) with
//! the [`JobStatus`] constructors, and `supervisor` the supervisor's (per-SUT view, its own
//! status, the managed broker's). Everything is re-exported here.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::name::SutName;
use crate::topics::JobId;

mod admin;
mod job;
mod supervisor;
// -- lab operations (helper ops): the rolling restart.
mod restart;
pub use restart::*;
// -- end of lab operations.

pub use admin::*;
pub use job::*;
pub use supervisor::*;

/// The payload version every JSON payload carries as `"v"`.
pub const VERSION: u32 = 1;

fn v1() -> u32 {
    VERSION
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// RFC 3339 UTC time with milliseconds, for humans reading payloads.
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// What an agent is doing. The healthcheck treats `crash-loop`, `stalled`, `lost` and `offline`
/// as unhealthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentState {
    /// Started, the device process not yet running.
    Starting,
    /// Running, no job.
    Idle,
    /// Running a job: disruptive actions (recreation) wait.
    Busy,
    /// The device process exited and is being restarted after a backoff.
    Restarting,
    /// The device process failed quickly too many times in a row.
    CrashLoop,
    /// The agent's own loop is alive but output pumping or the child handling is stuck.
    Stalled,
    /// Shutting down.
    Stopping,
    /// Cleanly stopped (published by the agent itself).
    Offline,
    /// Gone without a clean stop (the retained last will).
    Lost,
}

impl AgentState {
    /// Every state, in the order of the enum.
    pub const ALL: [AgentState; 9] = [
        AgentState::Starting,
        AgentState::Idle,
        AgentState::Busy,
        AgentState::Restarting,
        AgentState::CrashLoop,
        AgentState::Stalled,
        AgentState::Stopping,
        AgentState::Offline,
        AgentState::Lost,
    ];

    /// Whether Docker should consider an agent in this state healthy ([`crate::heartbeat::is_healthy`]).
    pub fn is_healthy(self) -> bool {
        crate::heartbeat::is_healthy(self.as_str())
    }

    /// The kebab-case name, as in the JSON and the heartbeat file.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Starting => "starting",
            AgentState::Idle => "idle",
            AgentState::Busy => "busy",
            AgentState::Restarting => "restarting",
            AgentState::CrashLoop => "crash-loop",
            AgentState::Stalled => "stalled",
            AgentState::Stopping => "stopping",
            AgentState::Offline => "offline",
            AgentState::Lost => "lost",
        }
    }

    /// Parses the kebab-case name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// The device process as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildStatus {
    /// Its pid, while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Whether it is running now.
    pub alive: bool,
    /// How many times the agent restarted it.
    pub restarts: u64,
    /// How its last run ended (`exit 1`, `signal 9`), if it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
}

/// `<sut>/agent` (retained) and the heartbeat file: the agent's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// Payload version.
    #[serde(default = "v1")]
    pub v: u32,
    /// The SUT.
    pub sut: SutName,
    /// What the agent is doing.
    pub state: AgentState,
    /// When this status was made, ms since the epoch.
    pub time_ms: u64,
    /// The same time, RFC 3339, for humans.
    pub time: String,
    /// Heartbeat sequence number, from 0 at each agent start.
    pub seq: u64,
    /// Random id of this agent run: a `lost` with another boot id is about an older run.
    pub boot_id: String,
    /// labvisor version of the agent.
    pub agent_version: String,
    /// The device process; absent for a job-only agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub child: Option<ChildStatus>,
    /// The running job, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobId>,
    /// Jobs waiting in the queue.
    #[serde(default)]
    pub queue_len: u64,
    /// Whether the agent is connected to the broker (always true in a published status).
    pub broker_connected: bool,
    /// Lines of output lost on the way to `<sut>/output` since the agent started (at the rate
    /// cap, when the queues were full, or while the broker was slow or gone).
    #[serde(default)]
    pub output_dropped: u64,
    /// Why the state is what it is, or what is wrong (unreadable `tail` globs, crash-loop cause).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    // --- helper probe: the exec probe (issue 15) ---
    /// Why the exec probe (`probe.command`) fails: its exit status (or timeout) and last output
    /// lines; absent while it passes or there is none. The agent is then unhealthy
    /// ([`AgentStatus::is_healthy`]) whatever its state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_failure: Option<String>,
    // --- end helper probe ---
    // -- admin (lab operations) --
    /// The SUT's admin state (offline, maintenance, with the reason); absent while it is online
    /// and was never put offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminState>,
    /// The device process's own work, seen through `device.busy_glob`: the matching path, or
    /// the first one and how many more. Absent when nothing matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_work: Option<String>,
    // -- draining (fixsup) --
    /// Whether the device process is drained (`labvisor-agent drain`: signalled, and not
    /// restarted after it exits) until the drain is lifted. A supervisor that finds a drain no
    /// deferred action needs (it restarted meanwhile) lifts it. Absent when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

impl AgentStatus {
    /// The status an agent run (`boot_id`, labvisor version `agent_version`) starts from at
    /// `time_ms`: `starting`, heartbeat 0, no device process or job, not connected. The `with_*`
    /// methods fill in the rest, e.g.
    /// `AgentStatus::new(sut, boot, version, now_ms()).with_state(AgentState::Idle)`.
    pub fn new(
        sut: SutName,
        boot_id: impl Into<String>,
        agent_version: impl Into<String>,
        time_ms: u64,
    ) -> Self {
        Self {
            v: VERSION,
            sut,
            state: AgentState::Starting,
            time_ms,
            time: rfc3339(time_ms),
            seq: 0,
            boot_id: boot_id.into(),
            agent_version: agent_version.into(),
            child: None,
            job: None,
            queue_len: 0,
            broker_connected: false,
            output_dropped: 0,
            detail: None,
            probe_failure: None,
            admin: None,
            device_work: None,
            draining: false,
        }
    }

    /// With `state`.
    pub fn with_state(self, state: AgentState) -> Self {
        Self { state, ..self }
    }

    /// With heartbeat sequence number `seq`.
    pub fn with_seq(self, seq: u64) -> Self {
        Self { seq, ..self }
    }

    /// With the device process's status (`None` for a job-only agent).
    pub fn with_child(self, child: Option<ChildStatus>) -> Self {
        Self { child, ..self }
    }

    /// With the running job and the number of jobs waiting.
    pub fn with_jobs(self, job: Option<JobId>, queue_len: u64) -> Self {
        Self {
            job,
            queue_len,
            ..self
        }
    }

    /// Connected to the broker or not.
    pub fn with_broker_connected(self, broker_connected: bool) -> Self {
        Self {
            broker_connected,
            ..self
        }
    }

    /// With the count of output lines lost on the way to MQTT.
    pub fn with_output_dropped(self, output_dropped: u64) -> Self {
        Self {
            output_dropped,
            ..self
        }
    }

    /// With the detail that explains the state.
    pub fn with_detail(self, detail: Option<String>) -> Self {
        Self { detail, ..self }
    }

    /// With the exec probe's failure (`None`: it passes, or there is none).
    pub fn with_probe_failure(self, probe_failure: Option<String>) -> Self {
        Self {
            probe_failure,
            ..self
        }
    }

    /// Whether Docker should consider this agent healthy (the one rule,
    /// [`crate::heartbeat::is_healthy_status`]): a healthy state and no failing exec probe.
    pub fn is_healthy(&self) -> bool {
        crate::heartbeat::is_healthy_status(
            self.state.as_str(),
            &crate::heartbeat::unhealthy_of(self),
        )
    }

    /// With the SUT's admin state (`None` while online and never changed).
    pub fn with_admin(self, admin: Option<AdminState>) -> Self {
        Self { admin, ..self }
    }

    /// With the device's own work (what `device.busy_glob` matched), if any.
    pub fn with_device_work(self, device_work: Option<String>) -> Self {
        Self {
            device_work,
            ..self
        }
    }

    /// Draining its device process, or not.
    pub fn with_draining(self, draining: bool) -> Self {
        Self { draining, ..self }
    }
}

/// Where a piece of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputStream {
    /// The device process (stdout and stderr).
    Child,
    /// A file matched by `tail`.
    Tail,
    /// A job.
    Job,
    /// The agent itself (restarts, errors).
    Agent,
}

impl OutputStream {
    /// The kebab-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputStream::Child => "child",
            OutputStream::Tail => "tail",
            OutputStream::Job => "job",
            OutputStream::Agent => "agent",
        }
    }
}

/// The MQTT 5 user properties of an output batch on `<sut>/output` or `<sut>/jobs/<id>/output`.
///
/// The payload itself stays plain text, so MQTT Explorer and `mosquitto_sub` show it as it was
/// printed. `seq` counts batches per topic from 0 at agent start (`boot` tells runs apart), so
/// a consumer sees a gap; `dropped` is how many batches the agent dropped before this one on that
/// topic because the broker was slow or gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputMeta {
    /// Message sequence number on this topic, from 0 for each agent run; it jumps where output
    /// was lost.
    pub seq: u64,
    /// Lines lost on this topic so far in this agent run, before this message.
    pub dropped: u64,
    /// The agent run ([`AgentStatus::boot_id`]).
    pub boot: String,
}

impl OutputMeta {
    /// As MQTT 5 user properties.
    pub fn to_properties(&self) -> Vec<(String, String)> {
        vec![
            ("seq".into(), self.seq.to_string()),
            ("dropped".into(), self.dropped.to_string()),
            ("boot".into(), self.boot.clone()),
        ]
    }

    /// From MQTT 5 user properties; `None` unless `seq` is there.
    pub fn from_properties(props: &[(String, String)]) -> Option<Self> {
        let get = |k: &str| {
            props
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        Some(OutputMeta {
            seq: get("seq")?.parse().ok()?,
            dropped: get("dropped").and_then(|d| d.parse().ok()).unwrap_or(0),
            boot: get("boot").unwrap_or_default().to_owned(),
        })
    }
}

/// `<sut>/probe` (retained): the latest result of the optional upstream probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// Payload version.
    #[serde(default = "v1")]
    pub v: u32,
    /// The SUT.
    pub sut: SutName,
    /// What was probed (`tcp://host:port` or `http://...`).
    pub url: String,
    /// Whether it answered.
    pub ok: bool,
    /// How long it took, ms.
    pub latency_ms: u64,
    /// What went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When, ms since the epoch.
    pub time_ms: u64,
}

/// A random id (16 hex digits) for boot ids and generated job ids' tails.
pub fn random_id() -> String {
    format!("{:016x}", fastrand::u64(..))
}

/// A new job id: time-ordered (ms since the epoch, base 32) then random, like a ULID.
pub fn new_job_id() -> JobId {
    const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let mut s = String::with_capacity(26);
    let t = now_ms();
    for i in (0..10).rev() {
        s.push(ALPHABET[((t >> (i * 5)) & 31) as usize] as char);
    }
    for _ in 0..16 {
        s.push(ALPHABET[fastrand::usize(..32)] as char);
    }
    JobId::new(&s).expect("generated ids use the safe alphabet")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failing exec probe makes an idle or busy agent unhealthy (the one rule); without one
    /// the state decides, and the field is absent from the JSON.
    #[test]
    fn a_probe_failure_makes_a_status_unhealthy_and_is_left_out_when_none() {
        let sut = SutName::new("tf-1").unwrap();
        let idle = AgentStatus::new(sut, "b", "0", 0).with_state(AgentState::Idle);
        assert!(idle.is_healthy());
        assert!(!serde_json::to_string(&idle)
            .unwrap()
            .contains("probe_failure"));
        let failing = idle.clone().with_probe_failure(Some("exit 1: 403".into()));
        assert!(!failing.is_healthy());
        let json = serde_json::to_string(&failing).unwrap();
        assert!(json.contains(r#""probe_failure":"exit 1: 403""#), "{json}");
        let back: AgentStatus = serde_json::from_str(&json).unwrap();
        assert_eq!(back, failing);
        assert!(!idle.with_state(AgentState::CrashLoop).is_healthy());
    }

    #[test]
    fn states_round_trip_their_names() {
        for s in [
            AgentState::Starting,
            AgentState::CrashLoop,
            AgentState::Lost,
            AgentState::Busy,
        ] {
            assert_eq!(AgentState::parse(s.as_str()), Some(s));
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        assert!(!AgentState::CrashLoop.is_healthy());
        assert!(!AgentState::Stalled.is_healthy());
        assert!(AgentState::Busy.is_healthy());
    }

    #[test]
    fn job_ids_are_sortable_by_time_and_unique() {
        let a = new_job_id();
        let b = new_job_id();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 26);
        // The first 10 characters are the time: never decreasing.
        assert!(a.as_str()[..10] <= b.as_str()[..10]);
    }

    #[test]
    fn output_meta_round_trips() {
        let m = OutputMeta {
            seq: 7,
            dropped: 2,
            boot: "ab".into(),
        };
        assert_eq!(OutputMeta::from_properties(&m.to_properties()), Some(m));
        assert_eq!(OutputMeta::from_properties(&[]), None);
    }

    #[test]
    fn job_status_builders_fill_what_each_state_needs() {
        let sut = SutName::new("dut").unwrap();
        let id = JobId::new("j1").unwrap();
        let queued = JobStatus::accepted(sut, id, 10);
        assert_eq!(queued.state, JobState::Queued);
        let running = queued.clone().started(15);
        assert_eq!(
            (running.state, running.started_ms),
            (JobState::Running, Some(15))
        );
        let done = running
            .finished(JobState::Failed, 15, 40)
            .with_exit(Some(2), None)
            .with_output_bytes(7)
            .with_reason("exit 2".to_owned());
        assert_eq!(done.duration_ms, Some(25));
        assert_eq!(done.ended_ms, Some(40));
        assert_eq!(done.reason.as_deref(), Some("exit 2"));
        assert_eq!(done.queued_ms, queued.queued_ms);
        let sample = queued.clone().with_state(JobState::Passed);
        assert_eq!((sample.state, sample.ended_ms), (JobState::Passed, None));
    }

    #[test]
    fn agent_status_starts_starting_and_takes_the_rest() {
        let st = AgentStatus::new(SutName::new("dut").unwrap(), "b", "1.0", 0)
            .with_state(AgentState::Idle)
            .with_seq(3)
            .with_jobs(None, 2)
            .with_broker_connected(true);
        assert_eq!(st.time, "1970-01-01T00:00:00.000Z");
        assert_eq!((st.state, st.seq, st.queue_len), (AgentState::Idle, 3, 2));
        assert!(st.broker_connected && st.child.is_none() && st.detail.is_none());
    }

    #[test]
    fn unknown_submit_fields_are_refused() {
        let e = serde_json::from_str::<JobSubmit>(r#"{"script":"true","sript":"x"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `sript`"), "{e}");
    }
}
