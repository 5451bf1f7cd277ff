//! The supervisor's payloads: its view of each SUT, its own status, and the managed broker's.

use serde::{Deserialize, Serialize};

use super::v1;
use crate::name::SutName;
use crate::topics::SupervisorId;

/// Docker's health of the SUT's container, as the supervisor last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    /// Within the start period, not yet judged.
    Starting,
    /// The last probes passed.
    Healthy,
    /// `retries` probes in a row failed.
    Unhealthy,
    /// No container, or not running.
    None,
}

/// `<sut>/supervisor` (retained): the supervisor's view of one SUT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SutView {
    /// Payload version.
    #[serde(default = "v1")]
    pub v: u32,
    /// The SUT.
    pub sut: SutName,
    /// The supervisor that owns it.
    pub supervisor: SupervisorId,
    /// The container's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// The image it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Hash of the config it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// Docker's health, or `unhealthy` when the supervisor judged the agent unhealthy itself
    /// (see `health_reason`).
    pub health: Health,
    /// Why the supervisor judges the agent unhealthy itself, whatever Docker's slower probe
    /// says: its agent published nothing for longer than `health.max_age` and the healthcheck
    /// run through `docker exec` found its heartbeat stale (`no heartbeat for 34 s: heartbeat
    /// is 34.2s old (max 30.0s): ...`), or its own fresh status says `crash-loop` or `stalled`.
    /// Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_reason: Option<String>,
    /// Restarts made by the supervisor (healing).
    pub restarts: u64,
    /// Whether the SUT is in a crash loop: its container was restarted `restart.crash_loop_after`
    /// times in a row without a healthy minute. The supervisor keeps restarting it, with backoff
    /// up to `restart.backoff_max` apart; a healthy minute clears the flag.
    #[serde(default)]
    pub crash_loop: bool,
    /// An action waiting (for example a recreation deferred while a job runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_action: Option<String>,
    /// The last error acting on this SUT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Problems of the SUT's file when it is invalid (the container keeps running as it was).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub config_problems: Vec<String>,
    // -- lab operations (helper ops): a person's stop.
    /// The container was stopped by a person (`docker stop`, `docker kill`, Portainer): the
    /// supervisor leaves it stopped until it is started again or its file changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_by_person: Option<StoppedByPerson>,
    // -- end of lab operations.
    /// The host its container runs on, or last ran on, when the runtime spans several hosts
    /// (Swarm: the node's hostname). Absent on the local engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Why it is down although it should run, as the runtime says (Swarm: `node rack3 is
    /// down`, `no suitable node: …`). Absent otherwise (and always on the local engine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down: Option<String>,
    /// When, ms since the epoch.
    pub time_ms: u64,
}

/// In a [`SutView`]: the SUT's container was stopped by a person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoppedByPerson {
    /// When it stopped (the container's `FinishedAt`), ms since the epoch; absent when Docker
    /// did not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_ms: Option<u64>,
}

/// A supervisor's life state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SupervisorState {
    /// Running.
    Online,
    /// Cleanly stopped.
    Offline,
    /// Gone without a clean stop (the last will).
    Lost,
}

/// SUT counts in a [`SupervisorStatus`]. The container counts come from the engine: `null`
/// (`None`) while it cannot be asked (Docker unreachable, or a lost supervisor's last will),
/// which means unknown, not zero.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SutCounts {
    /// Valid files in `sut/`.
    pub desired: u64,
    /// Containers running; `None`: unknown.
    #[serde(default)]
    pub running: Option<u64>,
    /// Containers healthy; `None`: unknown.
    #[serde(default)]
    pub healthy: Option<u64>,
    /// Containers unhealthy; `None`: unknown.
    #[serde(default)]
    pub unhealthy: Option<u64>,
    /// Invalid files.
    pub invalid: u64,
}

/// `labvisor/supervisors/<id>/status` (retained): a supervisor's birth, status and last will.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupervisorStatus {
    /// Payload version.
    #[serde(default = "v1")]
    pub v: u32,
    /// The supervisor.
    pub id: SupervisorId,
    /// Online, offline or lost.
    pub state: SupervisorState,
    /// Random id of this supervisor run.
    pub boot_id: String,
    /// labvisor version.
    pub version: String,
    /// Whether the Docker engine answers.
    pub docker_reachable: bool,
    /// SUT counts.
    #[serde(default)]
    pub suts: SutCounts,
    /// When, ms since the epoch.
    pub time_ms: u64,
    /// The managed broker (`labvisor supervise` without `--broker`); absent with an external
    /// broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_broker: Option<ManagedBrokerStatus>,
    /// Problems of the entries in the SUT directory that name no SUT (a file name that is not a
    /// valid SUT name, or not UTF-8), one `file: problem` line each. Problems of a file that
    /// names a SUT are on that SUT's `<sut>/supervisor` view ([`SutView::config_problems`]).
    #[serde(default)]
    pub file_problems: Vec<String>,
    /// How often an online supervisor republishes this status when nothing changed, ms (0:
    /// unknown, from a supervisor that publishes changes only). An online status much older
    /// than that is stale: the supervisor, or its link to the broker, is gone.
    #[serde(default)]
    pub refresh_ms: u64,
    /// Its agents run without MQTT (`--agent-broker none`): they publish no status, so a SUT
    /// without one is no problem. Absent (false) otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub agents_without_broker: bool,
}

/// The managed broker in a [`SupervisorStatus`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagedBrokerStatus {
    /// Whether mosquitto runs and listens (it is restarted when it dies).
    pub up: bool,
    /// How often it was restarted after it died, since the supervisor started.
    pub restarts: u64,
    /// How it last died (`signal: 9 (SIGKILL)`, `exit status: 1`), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
}
