//! The rolling restart (`labvisor restart SUT... | --all --when-idle`): the request a client
//! sends to a supervisor, and the progress the supervisor publishes.
//!
//! A supervisor runs one rolling restart at a time: it recreates the SUTs' containers one by
//! one (a recreation picks up a rebuilt image of the same tag), each only when its agent is
//! idle (its own jobs and, where the SUT says how, the device's own work), and goes on to the
//! next once the new container is healthy.

use serde::{Deserialize, Serialize};

use super::v1;
use crate::name::SutName;

/// `labvisor/supervisors/<id>/restart`: a rolling restart request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartRequest {
    /// Payload version.
    #[serde(default = "v1")]
    pub v: u32,
    /// The request's id, chosen by the client; the progress carries it.
    pub id: String,
    /// The SUTs, in order (empty with `all`).
    #[serde(default)]
    pub suts: Vec<SutName>,
    /// Every SUT of the supervisor, by name.
    #[serde(default)]
    pub all: bool,
    /// Wait for each agent to be idle (the only mode a supervisor accepts).
    #[serde(default)]
    pub when_idle: bool,
}

/// Where a rolling restart is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartState {
    /// Going on.
    Running,
    /// Every SUT was restarted (or skipped, with the reason).
    Done,
    /// Stopped at a SUT that failed (`reason`); the SUTs after it were not restarted.
    Failed,
    /// Not started (`reason`): another one runs, or the request is wrong. Sent not retained.
    Rejected,
}

impl RestartState {
    /// Whether the restart is over.
    pub fn is_final(self) -> bool {
        self != RestartState::Running
    }
}

/// Where one SUT of a rolling restart is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartStep {
    /// Its turn has not come.
    Queued,
    /// Its turn: waiting until its agent is idle.
    WaitingIdle,
    /// Its container is being recreated.
    Recreating,
    /// Recreated: waiting until the new container is healthy.
    WaitingHealthy,
    /// Restarted: the new container is healthy.
    Done,
    /// Not restarted (`detail` says why: its file is gone, a person stopped it).
    Skipped,
    /// Its recreation failed, or the new container turned unhealthy (`detail`).
    Failed,
}

/// One SUT in a [`RestartStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartSut {
    /// The SUT.
    pub sut: SutName,
    /// Where it is.
    pub step: RestartStep,
    /// The container before the restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_container: Option<String>,
    /// The container after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_container: Option<String>,
    /// Why it waits, was skipped or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `labvisor/supervisors/<id>/restart_status` (retained): a rolling restart's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartStatus {
    /// Payload version.
    #[serde(default = "v1")]
    pub v: u32,
    /// The request's id.
    pub id: String,
    /// Where it is.
    pub state: RestartState,
    /// Its SUTs, in the order of the request.
    #[serde(default)]
    pub suts: Vec<RestartSut>,
    /// Why it failed or was rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When, ms since the epoch.
    pub time_ms: u64,
}
