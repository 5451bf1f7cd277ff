//! The agent's status: what the heartbeat file and the retained `<sut>/agent` message say.
//!
//! The agent's loop calls [`Reporter::report`] on every pass (at least every `heartbeat`): it
//! looks at the device process, the jobs, the output sinks and the broker link, renders one
//! [`AgentStatus`], writes the heartbeat file (atomically) and publishes the same status. A hung
//! loop therefore means a stale heartbeat, and a blocked output write means `stalled`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use labvisor_protocol::heartbeat;
use labvisor_protocol::payloads::{now_ms, AdminState, AgentState, AgentStatus, ChildStatus};
use labvisor_protocol::topics::Topics;
use labvisor_protocol::SutName;
use tracing::warn;

use crate::device::{self, State};
use crate::mqtt::{Message, MqttLink};
use crate::output::Sinks;
use crate::probe::ProbeFailure;
use crate::runner::JobRunner;
use crate::tail::TailErrors;
use crate::tap::Tap;

/// Renders, writes and publishes the agent's status.
pub struct Reporter {
    sut: SutName,
    boot_id: String,
    topics: Topics,
    heartbeat_file: PathBuf,
    max_age: Duration,
    sinks: Arc<Sinks>,
    tap: Tap,
    /// The broker link, once it is up (`None` without a broker).
    pub link: Option<MqttLink>,
    /// Problems of the `tail` globs, reported in `detail`.
    pub tail_errors: Option<TailErrors>,
    /// The exec probe's failure, reported as `probe_failure` (an exec probe only).
    pub probe_failure: Option<ProbeFailure>,
    seq: u64,
    // -- admin (lab operations) --
    /// The SUT's admin state, reported as `admin` (set by the loop before each report).
    pub admin: Option<AdminState>,
    /// Why the admin state could not be saved, reported in `detail`.
    pub admin_unsaved: Option<String>,
    // [device] (helper work): the device's own work, as `busy_glob` last matched it
    // (`device_work`; the state is busy while set), and the detail of a drain in progress.
    /// What `device.busy_glob` matched at the last look.
    pub device_work: Option<String>,
    /// Set while the device process is being drained.
    pub drain_detail: Option<String>,
}

impl Reporter {
    /// A reporter for `sut` in this agent run (`boot_id`).
    pub fn new(
        config: &labvisor_protocol::config::SutConfig,
        topics: Topics,
        heartbeat_file: PathBuf,
        boot_id: String,
        sinks: Arc<Sinks>,
        tap: Tap,
    ) -> Self {
        if let Some(dir) = heartbeat_file.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        Reporter {
            sut: config.name.clone(),
            boot_id,
            topics,
            heartbeat_file,
            max_age: config.health.max_age,
            sinks,
            tap,
            link: None,
            tail_errors: None,
            probe_failure: None,
            seq: 0,
            admin: None,
            admin_unsaved: None,
            device_work: None,
            drain_detail: None,
        }
    }

    /// This agent run's id.
    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    fn base(&self) -> AgentStatus {
        let version = env!("CARGO_PKG_VERSION");
        AgentStatus::new(self.sut.clone(), &self.boot_id, version, now_ms())
    }

    /// The link's last will: the retained `lost` status.
    pub fn will(&self) -> Message {
        let lost = self.base().with_state(AgentState::Lost);
        Message::state(self.topics.agent(&self.sut), payload(&lost))
    }

    /// The agent's state from the device process, the sinks and whether a job runs.
    pub fn state(&self, dev: &device::Status, busy: bool) -> AgentState {
        let stall_after = self.max_age / 2;
        if self.sinks.blocked_for().is_some_and(|d| d >= stall_after) {
            return AgentState::Stalled;
        }
        if dev.crash_loop && !dev.is_running() {
            return AgentState::CrashLoop;
        }
        if busy {
            return AgentState::Busy;
        }
        match dev.state {
            State::NoCommand => AgentState::Idle,
            State::Running { .. } if dev.is_crash_looping() => AgentState::CrashLoop,
            State::Running { .. } => AgentState::Idle,
            State::Held => AgentState::Idle,
            _ if dev.last_exit.is_some() => AgentState::Restarting,
            _ => AgentState::Starting,
        }
    }

    /// Writes the heartbeat file and publishes the same status on `<sut>/agent`.
    pub fn report(&mut self, dev: &device::Status, jobs: &JobRunner, state: AgentState) {
        let mut details = Vec::new();
        if let Some(d) = dev
            .crash_detail
            .as_ref()
            .filter(|_| state == AgentState::CrashLoop)
        {
            details.push(d.clone());
        }
        if let Some(b) = self
            .sinks
            .blocked_for()
            .filter(|_| state == AgentState::Stalled)
        {
            details.push(format!(
                "writing output has been blocked for {:.0}s (disk full, or stdout not drained)",
                b.as_secs_f64()
            ));
        }
        details.extend(self.sinks.error());
        details.extend(self.admin_unsaved.clone());
        details.extend(self.drain_detail.clone());
        if let Some(errs) = &self.tail_errors {
            details.extend(
                errs.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .cloned(),
            );
        }
        let status = self
            .base()
            .with_state(state)
            .with_seq(self.seq)
            .with_child(child_status(dev))
            .with_jobs(jobs.running().cloned(), jobs.queue_len() as u64)
            .with_broker_connected(self.link.as_ref().is_some_and(|l| l.state().connected))
            .with_output_dropped(self.tap.dropped())
            .with_detail((!details.is_empty()).then(|| details.join("; ")))
            .with_probe_failure(
                self.probe_failure
                    .as_ref()
                    .and_then(|f| f.lock().unwrap_or_else(|e| e.into_inner()).clone()),
            )
            .with_admin(self.admin.clone())
            .with_device_work(self.device_work.clone())
            .with_draining(self.drain_detail.is_some());
        self.seq += 1;
        self.write_heartbeat(&status);
        if let Some(link) = &self.link {
            let _ = link.set_sticky(self.topics.agent(&self.sut), payload(&status));
        }
    }

    fn write_heartbeat(&self, status: &AgentStatus) {
        let text = heartbeat::render(status, self.max_age);
        if let Err(e) = heartbeat::write_atomic(&self.heartbeat_file, &text) {
            warn!(error = %e, "Cannot write the heartbeat file.");
        }
    }

    /// The last status: `offline`, in the heartbeat file and on `<sut>/agent`; then the link
    /// sends what it still holds and disconnects (within 2 s).
    pub async fn offline(self, dev: &device::Status) {
        let offline = self
            .base()
            .with_state(AgentState::Offline)
            .with_seq(self.seq)
            .with_child(child_status(dev))
            .with_admin(self.admin.clone());
        let _ = heartbeat::write_atomic(
            &self.heartbeat_file,
            &heartbeat::render(&offline, self.max_age),
        );
        if let Some(link) = self.link {
            let msg = Message::state(self.topics.agent(&self.sut), payload(&offline));
            let _ = link.shutdown(vec![msg], Duration::from_secs(2)).await;
        }
    }
}

fn child_status(dev: &device::Status) -> Option<ChildStatus> {
    if dev.state == State::NoCommand {
        return None;
    }
    let pid = match dev.state {
        State::Running { pid, .. } => Some(pid),
        _ => None,
    };
    Some(ChildStatus {
        pid,
        alive: pid.is_some(),
        restarts: dev.restarts,
        last_exit: dev.last_exit.clone(),
    })
}

fn payload(st: &AgentStatus) -> Bytes {
    Bytes::from(serde_json::to_vec(st).expect("status serialises"))
}
