//! The local-Docker implementation of [`ContainerRuntime`](super::ContainerRuntime) (bollard),
//! by concern:
//!
//! - [`containers`]: the trait's container operations (list, create, start, stop, remove,
//!   exec of the agent's state probe, events) and the SUT volumes they use;
//! - `network`: labvisor's own bridge network, made when missing, old ones removed;
//! - `tools`: the tools volume holding the static agent and healthcheck binaries;
//! - [`images`]: the SUT's image before create: used when present, else pulled or built.
//!
//! Health comes from the container list: on API 1.41 (Debian's Engine 20.10) the list has no
//! health field, but its status string ends in `(healthy)`, `(unhealthy)` or
//! `(health: starting)`, so one list call per resync gives every container's health without an
//! inspect per container.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::Docker;
use tracing::warn;

use super::RuntimeError;
use crate::spec::{LABEL_MANAGED_BY, LABEL_SUPERVISOR, MANAGED_BY};

pub mod containers;
pub mod images;
mod network;
mod tools;

pub use containers::{busy_from_state_probe, health_from_status};
pub use images::{context_tar, split_reference, ContextError};

/// The bollard implementation.
#[derive(Debug, Clone)]
pub struct DockerRuntime {
    docker: Docker,
    supervisor: String,
    /// Serialises network creation: Engine 20.10 happily creates two networks of one name.
    network_lock: Arc<tokio::sync::Mutex<()>>,
    /// Tools volumes known to be complete; the lock also serialises their fill, so a cold
    /// start of many SUTs fills the volume once while the other creates wait.
    tools_ready: Arc<tokio::sync::Mutex<HashSet<String>>>,
    /// The tools volume in use, once made sure of: after a container is removed, older tools
    /// volumes of this supervisor that no container uses any more are removed.
    current_tools: Arc<Mutex<Option<String>>>,
    /// The name of the first of labvisor's agent networks, once one is made sure of: other
    /// networks of this supervisor, but the agent networks, are removed when no container
    /// uses them any more.
    current_network: Arc<Mutex<Option<String>>>,
    /// This supervisor's SUT volumes (name → labels), listed at the first create, to find
    /// those of the old naming.
    legacy_volumes: Arc<tokio::sync::Mutex<Option<VolumeLabels>>>,
    /// Networks and (pulled, not built) images seen present: no inspect per container. A
    /// failed create forgets them, so one removed behind our back is made again on the retry.
    known: Arc<Mutex<Known>>,
}

/// Volume names and their labels.
type VolumeLabels = HashMap<String, HashMap<String, String>>;

#[derive(Debug, Default)]
struct Known {
    networks: HashSet<String>,
    images: HashSet<String>,
}

impl DockerRuntime {
    /// Connects with Docker's defaults (`DOCKER_HOST` or the local socket) and negotiates the
    /// API version; when the engine is down, keeps the unnegotiated client (bollard 0.21.1 sends
    /// no version anyway) and lets the supervisor retry.
    pub async fn connect(supervisor: &str) -> Result<Self, RuntimeError> {
        let docker = Docker::connect_with_defaults()?;
        let docker = match docker.clone().negotiate_version().await {
            Ok(d) => d,
            Err(error) => {
                warn!(error = %error, "Could not negotiate the Docker API version; will retry requests.");
                docker
            }
        };
        Ok(DockerRuntime {
            docker,
            supervisor: supervisor.to_owned(),
            network_lock: Arc::new(tokio::sync::Mutex::new(())),
            tools_ready: Arc::default(),
            current_tools: Arc::default(),
            current_network: Arc::default(),
            legacy_volumes: Arc::default(),
            known: Arc::default(),
        })
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The label filters that select this supervisor's objects (managed-by and supervisor),
    /// then `extra`.
    fn own_labels(&self, extra: &[&str]) -> Vec<String> {
        let mut labels = vec![
            format!("{LABEL_MANAGED_BY}={MANAGED_BY}"),
            format!("{LABEL_SUPERVISOR}={}", self.supervisor),
        ];
        labels.extend(extra.iter().map(|l| (*l).to_owned()));
        labels
    }
}

/// The engine's answer by HTTP status: 404 is [`RuntimeError::NotFound`], 409
/// [`RuntimeError::Conflict`]; no answer at all is [`RuntimeError::Unreachable`].
impl From<BollardError> for RuntimeError {
    fn from(e: BollardError) -> Self {
        match e {
            BollardError::DockerResponseServerError {
                status_code: 404,
                message,
            } => RuntimeError::NotFound(message),
            BollardError::DockerResponseServerError {
                status_code: 409,
                message,
            } => RuntimeError::Conflict(message),
            BollardError::DockerResponseServerError {
                status_code,
                message,
            } => RuntimeError::Api {
                status: status_code,
                message,
            },
            other => RuntimeError::Unreachable(other.to_string()),
        }
    }
}

/// The answer of a request about one object, `None` when the engine says it does not exist
/// (HTTP 404).
fn found<T>(answer: Result<T, BollardError>) -> Result<Option<T>, RuntimeError> {
    match answer {
        Ok(v) => Ok(Some(v)),
        Err(e) => match RuntimeError::from(e) {
            RuntimeError::NotFound(_) => Ok(None),
            other => Err(other),
        },
    }
}

fn secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX)
}
