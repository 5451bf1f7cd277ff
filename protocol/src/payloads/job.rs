//! The job payloads: a submission in its JSON form, its acknowledgement, a job's status (with
//! constructors for each step of its life), and a cancel request's acknowledgement.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{v1, VERSION};
use crate::name::SutName;
use crate::topics::JobId;

/// `<sut>/submit` in its JSON form (plain text is a script). Unknown fields are refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSubmit {
    /// The job id; generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<JobId>,
    /// A script, run by the SUT's job command (`/bin/sh` by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    /// An argv, run directly (exclusive with `script`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    /// Extra environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Total time limit ("30m"), capped by the SUT's `[job] timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Silence limit ("5m"), capped by the SUT's `[job] output_timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_timeout: Option<String>,
    /// A topic for the acknowledgement, besides `<sut>/submit_status`: in the SUT's reply space
    /// `[<prefix>/]labvisor/replies/<sut>/#` (or under `<sut>/`, outside labvisor's own topics);
    /// any other topic gets the job rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
}

/// The outcome of a submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SubmitResult {
    /// Durably queued.
    Accepted,
    /// The id was seen before; the job runs once.
    Duplicate,
    /// Refused; see `reason`.
    Rejected,
}

/// `<sut>/submit_status` (retained) and `reply_to`: the acknowledgement of a submission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitAck {
    /// Payload version.
    #[serde(default = "v1")]
    pub v: u32,
    /// The SUT.
    pub sut: SutName,
    /// Accepted, duplicate or rejected.
    pub result: SubmitResult,
    /// The job's id (absent when the payload was too broken to have one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<JobId>,
    /// 0 = runs next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
    /// Why it was rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When, ms since the epoch.
    pub time_ms: u64,
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    /// Waiting in the queue.
    Queued,
    /// Running.
    Running,
    /// Exited 0.
    Passed,
    /// Exited non-zero or was killed by a signal.
    Failed,
    /// Cancelled on request.
    Cancelled,
    /// Killed by `timeout` or `output_timeout`.
    Timeout,
    /// Was running when the agent died.
    Lost,
}

impl JobState {
    /// Whether the job is over.
    pub fn is_final(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }
}

/// `<sut>/jobs/<id>` and `<sut>/last_job` (retained): a job's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    /// Payload version.
    #[serde(default = "v1")]
    pub v: u32,
    /// The SUT.
    pub sut: SutName,
    /// The job.
    pub id: JobId,
    /// Where it is.
    pub state: JobState,
    /// Exit code, once exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Signal that killed it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// When it was accepted, ms since the epoch.
    pub queued_ms: u64,
    /// When it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<u64>,
    /// Run time, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Bytes of output so far.
    #[serde(default)]
    pub output_bytes: u64,
    /// Why it ended as it did (timeout kind, cancel, lost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A health check the agent ran on its own (`[health_check]`), not a submitted job: when
    /// it fails, the SUT goes offline. Absent (false) for every other job.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub health_check: bool,
}

impl JobStatus {
    /// A job accepted into the queue at `queued_ms`: `queued`, nothing else known yet. The
    /// other states follow from it: [`JobStatus::started`], [`JobStatus::finished`].
    pub fn accepted(sut: SutName, id: JobId, queued_ms: u64) -> Self {
        Self {
            v: VERSION,
            sut,
            id,
            state: JobState::Queued,
            exit_code: None,
            signal: None,
            queued_ms,
            started_ms: None,
            ended_ms: None,
            duration_ms: None,
            output_bytes: 0,
            reason: None,
            health_check: false,
        }
    }

    /// The job running since `started_ms`.
    pub fn started(self, started_ms: u64) -> Self {
        Self {
            state: JobState::Running,
            started_ms: Some(started_ms),
            ..self
        }
    }

    /// The job ended in `state` (passed, failed, lost, …) at `ended_ms`, having started at
    /// `started_ms`; the duration is the difference.
    pub fn finished(self, state: JobState, started_ms: u64, ended_ms: u64) -> Self {
        Self {
            state,
            started_ms: Some(started_ms),
            ended_ms: Some(ended_ms),
            duration_ms: Some(ended_ms.saturating_sub(started_ms)),
            ..self
        }
    }

    /// In `state`, nothing else changed: for samples (tests, fixtures) that need a job in a
    /// given state without its times.
    pub fn with_state(self, state: JobState) -> Self {
        Self { state, ..self }
    }

    /// With how the process ended: its exit code, or the signal that killed it.
    pub fn with_exit(self, exit_code: Option<i32>, signal: Option<i32>) -> Self {
        Self {
            exit_code,
            signal,
            ..self
        }
    }

    /// With the bytes of output so far.
    pub fn with_output_bytes(self, output_bytes: u64) -> Self {
        Self {
            output_bytes,
            ..self
        }
    }

    /// Marked as a health check (`true`) or not.
    pub fn with_health_check(self, health_check: bool) -> Self {
        Self {
            health_check,
            ..self
        }
    }

    /// With the reason it ended as it did (`None` for none).
    pub fn with_reason(self, reason: impl Into<Option<String>>) -> Self {
        Self {
            reason: reason.into(),
            ..self
        }
    }
}

/// The outcome of a cancel request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CancelResult {
    /// The job was queued or running and is cancelled.
    Cancelled,
    /// No such job (or no current job).
    NotFound,
    /// The job had already ended.
    AlreadyFinished,
    /// The request was not understood.
    Rejected,
}

/// `<sut>/cancel_status` (retained): the acknowledgement of a cancel request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelAck {
    /// Payload version.
    #[serde(default = "v1")]
    pub v: u32,
    /// The SUT.
    pub sut: SutName,
    /// What was asked for (an id or `current`).
    pub request: String,
    /// The job that was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<JobId>,
    /// The outcome.
    pub result: CancelResult,
    /// Details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When, ms since the epoch.
    pub time_ms: u64,
}
