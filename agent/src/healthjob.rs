//! Health-check jobs, as LAVA runs them: a SUT's `[health_check]` names a job (one of its
//! `files`) that the agent runs on its own every `every` and/or after `after_jobs` jobs; when it
//! fails, the SUT goes offline with its reason, so a broken board stops taking the lab's jobs.
//!
//! # Theory of operation
//!
//! - **When one is due** is a pure decision ([`due`]) over where the schedule stands
//!   ([`Since`]: when the last health check ended, how many jobs ran since) and the time. The
//!   schedule is read from the job history in the journal at start, so it survives agent and
//!   container restarts (a recreation keeps the volume), and is then updated with every job
//!   that ends. A health check counts when it was judged: passed, failed or timeout. A cancelled
//!   or lost one leaves the schedule as it was (when it was due, it is due again at once, as
//!   LAVA schedules a new one).
//! - **At agent start** one is due only when none is in the job history (the latest 500 jobs:
//!   a new SUT, a `[health_check]` just added, or more jobs than that since the last one) or
//!   when the schedule says so (time passed while the agent was down counts). A restart alone
//!   does not run one, so a restarting agent does not spend its device on health checks.
//! - **Back online**: when the SUT goes from offline (or maintenance) to online, a health check
//!   runs first, before any queued job (LAVA runs one when a device comes back from
//!   maintenance); its end starts the schedule again (`every` counts from it, `after_jobs` from
//!   zero).
//! - **How it runs**: when one is due, no job runs, none is queued or running already, the
//!   SUT is online and its device is not busy with its own work (`device_work`) nor drained,
//!   the agent queues it through the journal (so a restart does not lose it),
//!   first in the queue, and it runs like any job: output, `<sut>/jobs/<id>`, `last_job`, the
//!   `[job] command` and template rules. Its id is `health-check-<a new job id>` and its status
//!   says `health_check: true`. Its time limit is `health_check.timeout`.
//! - **When it fails** (`failed`, `timeout`), the SUT goes offline with the reason
//!   `health check <id> failed: <reason>`, by `health-check`, through the admin state
//!   ([`OfflineState`]): new jobs are refused with that reason, queued ones wait, until a person
//!   puts the SUT online. A SUT taken offline or into maintenance while the health check ran
//!   keeps that state (mode, reason, who); the failure is only logged.

use std::time::Duration;

use labvisor_protocol::config::{HealthCheck, SutConfig};
use labvisor_protocol::payloads::{new_job_id, now_ms, JobState, JobStatus};
use labvisor_protocol::submit::parse_submit;
use labvisor_protocol::topics::JobId;
use tracing::{info, warn};

use crate::jobs::JobRecord;
use crate::runner::JobRunner;

/// Who takes the SUT offline when a health check fails (the admin state's `by`).
pub const BY: &str = "health-check";

/// How a health check's job id starts.
pub const ID_PREFIX: &str = "health-check-";

/// What the health checks need of the SUT's admin state (online, offline, maintenance).
pub trait OfflineState {
    /// Whether the SUT takes no jobs now (offline or in maintenance).
    fn is_offline(&self) -> bool;
    /// Takes an online SUT offline with `reason`, by `by`, at `now_ms`; persisted. One that is
    /// offline or in maintenance already keeps its state; returns whether it changed.
    fn set_offline(&mut self, reason: String, by: &str, now_ms: u64) -> std::io::Result<bool>;
}

/// Where the schedule stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Since {
    /// When the last health check that was judged ended, ms since the epoch; `None`: none has.
    pub last_ms: Option<u64>,
    /// Jobs that ran (started) since then.
    pub jobs: u32,
}

impl Since {
    /// The schedule as the job history (oldest first) leaves it.
    pub fn from_history<'a>(history: impl Iterator<Item = &'a JobStatus>) -> Since {
        let mut since = Since::default();
        for st in history {
            since.record(st);
        }
        since
    }

    /// Counts a job that ended as `st`.
    pub fn record(&mut self, st: &JobStatus) {
        if !st.health_check {
            if st.started_ms.is_some() {
                self.jobs = self.jobs.saturating_add(1);
            }
        } else if judged(st) {
            *self = Since {
                last_ms: Some(st.ended_ms.unwrap_or(st.queued_ms)),
                jobs: 0,
            };
        }
    }
}

/// Whether a health check's end says anything about the device: passed, failed or timeout.
fn judged(st: &JobStatus) -> bool {
    matches!(
        st.state,
        JobState::Passed | JobState::Failed | JobState::Timeout
    )
}

/// Why a health check is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// None has run on this SUT (none is in its job history).
    NeverRan,
    /// `after_jobs` jobs ran since the last one.
    Jobs,
    /// `every` passed since the last one ended.
    Interval,
    /// The SUT was put online again.
    Online,
}

/// Whether a health check is due at `now_ms`, and why.
pub fn due(check: &HealthCheck, since: Since, now_ms: u64) -> Option<Due> {
    let Some(last) = since.last_ms else {
        return Some(Due::NeverRan);
    };
    if check.after_jobs().is_some_and(|n| since.jobs >= n.get()) {
        return Some(Due::Jobs);
    }
    let every_at = next_interval_ms(check, last)?;
    (now_ms >= every_at).then_some(Due::Interval)
}

/// When `every` makes one due after a health check that ended at `last_ms`.
fn next_interval_ms(check: &HealthCheck, last_ms: u64) -> Option<u64> {
    let every = u64::try_from(check.every()?.as_millis()).unwrap_or(u64::MAX);
    Some(last_ms.saturating_add(every))
}

/// The reason to take the SUT offline for a job that ended as `st`: only a health check that
/// failed or timed out has one.
pub fn failure(st: &JobStatus) -> Option<String> {
    if !st.health_check || !matches!(st.state, JobState::Failed | JobState::Timeout) {
        return None;
    }
    let reason = st.reason.clone().unwrap_or_else(|| match st.state {
        JobState::Timeout => "timeout".to_owned(),
        _ => "failed".to_owned(),
    });
    Some(format!("health check {} failed: {reason}", st.id))
}

/// A new health check's id: `health-check-<job id>`.
pub fn new_id() -> JobId {
    JobId::new(&format!("{ID_PREFIX}{}", new_job_id())).expect("a prefix and a job id are an id")
}

/// The health checks of one SUT, driven by the agent's loop: [`HealthJobs::tick`] every pass
/// (before a queued job may start), and a wake-up at [`HealthJobs::wake_at`].
pub struct HealthJobs {
    check: HealthCheck,
    /// The job file's content: the job, as a submission carries it.
    job: Vec<u8>,
    output_timeout: Duration,
    since: Since,
    /// The SUT came back online: one runs first.
    back_online: bool,
    was_offline: bool,
}

impl HealthJobs {
    /// The SUT's health checks (`None` without `[health_check]`), the schedule read from the job
    /// history; `offline` is the admin state at start.
    pub fn new(cfg: &SutConfig, jobs: &JobRunner, offline: bool) -> Option<HealthJobs> {
        let check = cfg.health_check.clone()?;
        let file = cfg.files.iter().find(|f| f.name == check.job());
        let Some(file) = file else {
            warn!(
                file = check.job(),
                "The health check's job file is not among the files."
            );
            return None;
        };
        let since = Since::from_history(jobs.history());
        Some(HealthJobs {
            job: file.content.clone(),
            output_timeout: cfg.job.output_timeout,
            check,
            since,
            back_online: false,
            was_offline: offline,
        })
    }

    /// Counts the jobs that ended (taking the SUT offline for a failed health check), notices
    /// the SUT coming back online, and queues a health check when one is due and can run.
    /// `device_busy`: the device is busy with its own work (`device_work`) or is being drained
    /// (or held by a drain): no health check is queued meanwhile.
    pub fn tick(&mut self, jobs: &mut JobRunner, admin: &mut impl OfflineState, device_busy: bool) {
        let now = now_ms();
        for st in jobs.take_finished() {
            self.since.record(&st);
            if st.health_check && judged(&st) {
                // It ran after (or while) the SUT came back online: it was the one that runs
                // first, whether it was queued before or after.
                self.back_online = false;
            }
            if let Some(reason) = failure(&st) {
                match admin.set_offline(reason.clone(), BY, now) {
                    Ok(true) => {
                        warn!(job_id = %st.id, reason = %reason, "Health check failed: the SUT goes offline.");
                    }
                    Ok(false) => {
                        warn!(job_id = %st.id, reason = %reason, "Health check failed; the SUT is offline or in maintenance already: its state is kept.");
                    }
                    Err(e) => {
                        warn!(job_id = %st.id, reason = %reason, error = %e, "Health check failed: the SUT goes offline, but the state could not be saved on the volume.");
                    }
                }
            }
        }
        let offline = admin.is_offline();
        if self.was_offline && !offline {
            info!("The SUT is online again: a health check runs first.");
            self.back_online = true;
        }
        self.was_offline = offline;
        if offline || device_busy || jobs.running().is_some() || jobs.health_check_pending() {
            return;
        }
        let why = match self.back_online {
            true => Some(Due::Online),
            false => due(&self.check, self.since, now),
        };
        let Some(why) = why else { return };
        let Some(rec) = self.record(now) else { return };
        info!(job_id = %rec.id, due = ?why, "A health check is due.");
        match jobs.queue_health_check(rec) {
            Ok(()) => self.back_online = false,
            Err(e) => warn!(error = %e, "Cannot queue the health check."),
        }
    }

    /// When `every` makes the next health check due, if that is still ahead (one that is due
    /// already waits for the job, the queue or the admin state that holds it, whose change
    /// wakes the loop anyway).
    pub fn wake_at(&self) -> Option<tokio::time::Instant> {
        let at = next_interval_ms(&self.check, self.since.last_ms?)?;
        let ahead = at.checked_sub(now_ms()).filter(|d| *d > 0)?;
        Some(tokio::time::Instant::now() + Duration::from_millis(ahead))
    }

    /// The health check's journal record: the job file as a submission, with its time limit.
    fn record(&self, now: u64) -> Option<JobRecord> {
        let sub = match parse_submit(&self.job, usize::MAX) {
            Ok(sub) => sub,
            Err(e) => {
                // Checked when the config was loaded; kept from looping on it all the same.
                warn!(error = %e, "The health check's job file is not a job.");
                return None;
            }
        };
        let rec = JobRecord::new(
            new_id(),
            &sub,
            self.check.timeout(),
            self.output_timeout,
            now,
        );
        Some(JobRecord {
            health_check: true,
            ..rec
        })
    }
}

impl OfflineState for crate::admin::Admin {
    fn is_offline(&self) -> bool {
        crate::admin::Admin::is_offline(self)
    }

    fn set_offline(&mut self, reason: String, by: &str, now_ms: u64) -> std::io::Result<bool> {
        crate::admin::Admin::set_offline(self, reason, by, now_ms)
    }
}

#[cfg(test)]
mod tests;
