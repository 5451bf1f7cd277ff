//! The load model (pure): what one agent publishes, how often and how large, built with the
//! protocol crate's constructors, so the benchmark sends what agents send.
//!
//! - Status: the retained QoS 1 [`AgentStatus`] on `<sut>/agent`, at least every
//!   `health.heartbeat` (default 5 s, `agent/src/agent.rs`: a report after every pass), and on
//!   each change: a job's submission and its end add one each.
//! - Output: plain text on `<sut>/output` and, while a job runs, the same lines on
//!   `<sut>/jobs/<id>/output` (`agent/src/publish.rs`): a batch closes [`BATCH_EVERY`] after its
//!   first line, at most [`BATCH_MAX`] bytes, QoS 1, with the [`OutputMeta`] user properties.
//! - A job's life: `<sut>/submit_status` (retained), `<sut>/jobs/<id>` queued, running,
//!   finished (retained) and `<sut>/last_job` (retained): five messages per job.

use std::time::Duration;

use labvisor_protocol::payloads::{
    AgentState, AgentStatus, ChildStatus, JobState, JobStatus, OutputMeta, SubmitAck, SubmitResult,
};
use labvisor_protocol::topics::JobId;
use labvisor_protocol::SutName;

/// The batcher's delay (`agent/src/publish.rs` `BATCH_EVERY`).
pub const BATCH_EVERY: Duration = Duration::from_millis(50);
/// The batcher's largest batch (`agent/src/publish.rs` `BATCH_MAX`, the output's `LINE_MAX`).
pub const BATCH_MAX: usize = 16 * 1024;
/// Status reports a job adds to the heartbeat's: its submission (queued, then busy) and its end.
pub const STATUS_PER_JOB: f64 = 2.0;
/// Messages of a job's life other than output and status (see the module documentation).
pub const JOB_MESSAGES: f64 = 5.0;
/// Output topics while a job runs: `<sut>/output` and `<sut>/jobs/<id>/output`.
pub const OUTPUT_TOPICS_IN_JOB: f64 = 2.0;

/// What one agent does.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// `health.heartbeat`.
    pub heartbeat: Duration,
    /// Lines a running job prints per second, evenly spaced.
    pub lines_per_sec: f64,
    /// Bytes per line, newline included.
    pub line_bytes: usize,
    /// How long a job runs; a busy agent runs them back to back.
    pub job: Duration,
}

/// Lines in one output message at `lines_per_sec`: those that come within [`BATCH_EVERY`] of
/// the batch's first line, at most [`BATCH_MAX`] bytes, at least one.
pub fn lines_per_batch(lines_per_sec: f64, line_bytes: usize) -> u64 {
    let by_time = (lines_per_sec * BATCH_EVERY.as_secs_f64()).ceil().max(1.0) as u64;
    let by_size = (BATCH_MAX / line_bytes.max(1)).max(1) as u64;
    by_time.min(by_size)
}

/// Time between two output messages on one topic.
pub fn batch_interval(p: &Profile) -> Duration {
    let lines = lines_per_batch(p.lines_per_sec, p.line_bytes) as f64;
    Duration::from_secs_f64(lines / p.lines_per_sec.max(f64::MIN_POSITIVE))
}

/// Messages per second one agent (or a lab) sends, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    /// `<sut>/agent`.
    pub status: f64,
    /// `<sut>/output` and `<sut>/jobs/<id>/output`.
    pub output: f64,
    /// `<sut>/submit_status`, `<sut>/jobs/<id>`, `<sut>/last_job`.
    pub job: f64,
}

impl Rates {
    /// All kinds together.
    pub fn total(&self) -> f64 {
        self.status + self.output + self.job
    }
}

/// An idle agent: its heartbeat.
pub fn idle(p: &Profile) -> Rates {
    Rates {
        status: 1.0 / p.heartbeat.as_secs_f64(),
        ..Rates::default()
    }
}

/// An agent running jobs back to back, each printing `lines_per_sec`.
pub fn busy(p: &Profile) -> Rates {
    let job = p.job.as_secs_f64();
    Rates {
        status: 1.0 / p.heartbeat.as_secs_f64() + STATUS_PER_JOB / job,
        output: OUTPUT_TOPICS_IN_JOB / batch_interval(p).as_secs_f64(),
        job: JOB_MESSAGES / job,
    }
}

/// How many of `agents` run jobs at `busy_share`.
pub fn busy_agents(agents: usize, busy_share: f64) -> usize {
    ((agents as f64 * busy_share.clamp(0.0, 1.0)).round() as usize).min(agents)
}

/// A lab of `agents` of which [`busy_agents`] run jobs.
pub fn lab(p: &Profile, agents: usize, busy_share: f64) -> Rates {
    let b = busy_agents(agents, busy_share) as f64;
    let i = agents as f64 - b;
    let (ri, rb) = (idle(p), busy(p));
    Rates {
        status: i * ri.status + b * rb.status,
        output: i * ri.output + b * rb.output,
        job: i * ri.job + b * rb.job,
    }
}

/// The SUT name of agent `i` on host `h`: `h<hh>-sut<iiii>`.
pub fn sut_name(host: usize, i: usize) -> SutName {
    SutName::new(&format!("h{host:02}-sut{i:04}")).expect("a valid SUT name")
}

/// The status an agent publishes: idle, or busy with `job`.
pub fn status(sut: &SutName, boot: &str, seq: u64, now_ms: u64, job: Option<&JobId>) -> Vec<u8> {
    let state = if job.is_some() {
        AgentState::Busy
    } else {
        AgentState::Idle
    };
    let st = AgentStatus::new(sut.clone(), boot, env!("CARGO_PKG_VERSION"), now_ms)
        .with_state(state)
        .with_seq(seq)
        .with_child(Some(ChildStatus {
            pid: Some(7),
            alive: true,
            restarts: 0,
            last_exit: None,
        }))
        .with_jobs(job.cloned(), 0)
        .with_broker_connected(true);
    serde_json::to_vec(&st).expect("status serialises")
}

/// The retained `lost` status, the agent's last will.
pub fn will(sut: &SutName, boot: &str, now_ms: u64) -> Vec<u8> {
    let st = AgentStatus::new(sut.clone(), boot, env!("CARGO_PKG_VERSION"), now_ms)
        .with_state(AgentState::Lost);
    serde_json::to_vec(&st).expect("status serialises")
}

/// The acknowledgement of an accepted submission.
pub fn submit_ack(sut: &SutName, id: &JobId, now_ms: u64) -> Vec<u8> {
    let ack = SubmitAck {
        v: 1,
        sut: sut.clone(),
        result: SubmitResult::Accepted,
        id: Some(id.clone()),
        position: Some(0),
        reason: None,
        time_ms: now_ms,
    };
    serde_json::to_vec(&ack).expect("ack serialises")
}

/// A job's statuses: queued, running, passed.
pub fn job_statuses(sut: &SutName, id: &JobId, t0: u64, t1: u64, bytes: u64) -> [Vec<u8>; 3] {
    let queued = JobStatus::accepted(sut.clone(), id.clone(), t0);
    let running = queued.clone().started(t0);
    let done = running
        .clone()
        .finished(JobState::Passed, t0, t1)
        .with_exit(Some(0), None)
        .with_output_bytes(bytes);
    [queued, running, done].map(|j| serde_json::to_vec(&j).expect("job serialises"))
}

/// One output batch: `lines` lines of `line_bytes` bytes (newline included).
pub fn output_batch(lines: u64, line_bytes: usize, n: u64) -> String {
    let mut out = String::new();
    for k in 0..lines {
        let head = format!("[{n:08}.{k:02}] ");
        let fill = line_bytes.saturating_sub(head.len() + 1);
        out.push_str(&head);
        out.extend(std::iter::repeat_n('x', fill));
        out.push('\n');
    }
    out
}

/// The output message's user properties.
pub fn output_meta(seq: u64, boot: &str) -> Vec<(String, String)> {
    OutputMeta {
        seq,
        dropped: 0,
        boot: boot.to_owned(),
    }
    .to_properties()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(lines: f64) -> Profile {
        Profile {
            heartbeat: Duration::from_secs(5),
            lines_per_sec: lines,
            line_bytes: 100,
            job: Duration::from_secs(60),
        }
    }

    #[test]
    fn slow_output_is_one_line_per_message() {
        assert_eq!(lines_per_batch(10.0, 100), 1);
        assert_eq!(lines_per_batch(20.0, 100), 1);
        assert_eq!(batch_interval(&profile(10.0)), Duration::from_millis(100));
    }

    #[test]
    fn fast_output_is_batched_every_50ms_and_capped_by_size() {
        assert_eq!(lines_per_batch(100.0, 100), 5);
        assert_eq!(lines_per_batch(1000.0, 100), 50);
        assert_eq!(lines_per_batch(10_000.0, 1000), 16);
        // At most one message per 50 ms and topic, whatever the line rate (up to the size cap).
        let r = busy(&profile(1000.0));
        assert!((r.output - 40.0).abs() < 1e-9, "{r:?}");
    }

    #[test]
    fn idle_and_busy_rates() {
        let p = profile(10.0);
        assert_eq!(idle(&p).total(), 0.2);
        let b = busy(&p);
        assert!((b.status - (0.2 + 2.0 / 60.0)).abs() < 1e-9);
        assert!((b.output - 20.0).abs() < 1e-9);
        assert!((b.job - 5.0 / 60.0).abs() < 1e-9);
    }

    #[test]
    fn a_lab_is_the_sum_of_its_agents() {
        let p = profile(10.0);
        assert_eq!(busy_agents(1000, 0.3), 300);
        assert_eq!(busy_agents(100, 2.0), 100);
        let l = lab(&p, 1000, 0.3);
        assert!((l.status - (700.0 * 0.2 + 300.0 * (0.2 + 2.0 / 60.0))).abs() < 1e-6);
        assert!((l.output - 6000.0).abs() < 1e-6);
        assert!((l.total() - (l.status + l.output + l.job)).abs() < 1e-9);
    }

    #[test]
    fn payloads_have_the_protocol_shapes_and_realistic_sizes() {
        let sut = sut_name(3, 42);
        assert_eq!(sut.as_str(), "h03-sut0042");
        let id = JobId::new("0123456789abcdef0123456789abcdef").unwrap();
        let idle = status(&sut, "boot", 9, 1_700_000_000_000, None);
        let busy = status(&sut, "boot", 9, 1_700_000_000_000, Some(&id));
        for s in [&idle, &busy] {
            let back: AgentStatus = serde_json::from_slice(s).unwrap();
            assert_eq!(back.sut, sut);
        }
        assert!((150..600).contains(&idle.len()), "{}", idle.len());
        assert!(busy.len() > idle.len());
        let [q, r, d] = job_statuses(&sut, &id, 1, 2, 3);
        let d: JobStatus = serde_json::from_slice(&d).unwrap();
        assert_eq!(d.state, JobState::Passed);
        assert!(q.len() < r.len());
        let ack: SubmitAck = serde_json::from_slice(&submit_ack(&sut, &id, 1)).unwrap();
        assert_eq!(ack.id, Some(id));
        let b = output_batch(3, 100, 7);
        assert_eq!(b.len(), 300);
        assert_eq!(b.lines().count(), 3);
        let meta = OutputMeta::from_properties(&output_meta(5, "boot")).unwrap();
        assert_eq!(meta.seq, 5);
        let lost: AgentStatus = serde_json::from_slice(&will(&sut, "b", 1)).unwrap();
        assert_eq!(lost.state, AgentState::Lost);
    }
}
