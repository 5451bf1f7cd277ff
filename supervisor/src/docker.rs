//! The container runtime: the few Docker operations the supervisor needs, behind
//! [`ContainerRuntime`], with the bollard implementation ([`DockerRuntime`]) and an in-memory
//! fake ([`FakeRuntime`]) for tests of the reconcile loop.
//!
//! Health comes from the container list: on API 1.41 (Debian's Engine 20.10) the list has no
//! health field, but its status string ends in `(healthy)`, `(unhealthy)` or
//! `(health: starting)`, so one list call per resync gives every container's health without an
//! inspect per container.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::models::{ContainerSummaryStateEnum, NetworkCreateRequest, VolumeCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, EventsOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, RemoveVolumeOptionsBuilder, RestartContainerOptionsBuilder,
    StopContainerOptionsBuilder, UploadToContainerOptionsBuilder,
};
use bollard::Docker;
use futures_util::{Stream, StreamExt};
use labvisor_protocol::payloads::Health;
use tracing::{debug, warn};

use crate::plan::RunState;
use crate::spec::{ContainerSpec, Named, LABEL_MANAGED_BY, LABEL_SUPERVISOR, MANAGED_BY};

/// A failed runtime operation.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    /// The object does not exist (HTTP 404).
    #[error("not found: {0}")]
    NotFound(String),
    /// A name is taken or the object is in the wrong state (HTTP 409).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The engine refused the request.
    #[error("docker error {status}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Docker's message.
        message: String,
    },
    /// The engine could not be reached.
    #[error("docker unreachable: {0}")]
    Unreachable(String),
}

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

/// One container, from the container list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    /// Its id.
    pub id: String,
    /// Its name, without Docker's leading `/`.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its life state.
    pub state: RunState,
    /// Its health.
    pub health: Health,
}

/// A container event worth a resync (die, start, health change, destroy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeEvent {
    /// The container.
    pub id: String,
    /// Docker's action, e.g. `die` or `health_status: unhealthy`.
    pub action: String,
    /// The container's `io.labvisor.sut` label.
    pub sut: Option<String>,
}

/// A stream of runtime events; it ends (or yields an error) when the engine goes away.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<RuntimeEvent, RuntimeError>> + Send>>;

/// What the supervisor needs from a container engine.
pub trait ContainerRuntime: Send + Sync + 'static {
    /// Checks that the engine answers.
    fn ping(&self) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Every container (also stopped and foreign ones: conflicts are judged by the caller).
    fn list(&self) -> impl Future<Output = Result<Vec<ContainerInfo>, RuntimeError>> + Send;
    /// Makes sure of the network and volume, creates the container, uploads its archive and
    /// starts it; returns its id. A container made but not started is removed again on error.
    fn create(
        &self,
        spec: &ContainerSpec,
    ) -> impl Future<Output = Result<String, RuntimeError>> + Send;
    /// Starts a stopped container.
    fn start(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Stops a container (TERM, then KILL after `timeout`).
    fn stop(
        &self,
        id: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Removes a container (forced; its named volume is kept).
    fn remove(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Restarts a container (TERM, then KILL after `timeout`).
    fn restart(
        &self,
        id: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Removes a named volume.
    fn remove_volume(&self, name: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Container events of this supervisor's containers.
    fn events(&self) -> EventStream;
}

/// Parses the health suffix of a container list status (`Up 5 seconds (healthy)`).
pub fn health_from_status(status: &str) -> Health {
    if status.ends_with("(healthy)") {
        Health::Healthy
    } else if status.ends_with("(unhealthy)") {
        Health::Unhealthy
    } else if status.ends_with("(health: starting)") {
        Health::Starting
    } else {
        Health::None
    }
}

fn run_state(s: Option<ContainerSummaryStateEnum>) -> RunState {
    match s {
        Some(ContainerSummaryStateEnum::CREATED) => RunState::Created,
        Some(ContainerSummaryStateEnum::RUNNING) => RunState::Running,
        Some(ContainerSummaryStateEnum::PAUSED) => RunState::Paused,
        Some(ContainerSummaryStateEnum::RESTARTING) => RunState::Restarting,
        Some(ContainerSummaryStateEnum::REMOVING) => RunState::Removing,
        Some(ContainerSummaryStateEnum::DEAD) => RunState::Dead,
        Some(ContainerSummaryStateEnum::STOPPING) => RunState::Running,
        _ => RunState::Exited,
    }
}

/// The bollard implementation.
#[derive(Debug, Clone)]
pub struct DockerRuntime {
    docker: Docker,
    supervisor: String,
    /// Serialises network creation: Engine 20.10 happily creates two networks of one name.
    network_lock: Arc<tokio::sync::Mutex<()>>,
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
        })
    }

    async fn ensure_network(&self, net: &Named) -> Result<(), RuntimeError> {
        let _guard = self.network_lock.lock().await;
        match self
            .docker
            .inspect_network(
                &net.name,
                None::<bollard::query_parameters::InspectNetworkOptions>,
            )
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) => match RuntimeError::from(e) {
                RuntimeError::NotFound(_) => {}
                other => return Err(other),
            },
        }
        debug!(network = %net.name, "Creating the network.");
        self.docker
            .create_network(NetworkCreateRequest {
                name: net.name.clone(),
                driver: Some("bridge".into()),
                labels: Some(net.labels.clone()),
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    /// Makes sure of the network `net` and returns its IPv4 gateway: the host's address on that
    /// bridge, where agents on it reach services of the host (the managed broker).
    pub async fn network_gateway(
        &self,
        net: &Named,
    ) -> Result<Option<std::net::IpAddr>, RuntimeError> {
        self.ensure_network(net).await?;
        let n = self
            .docker
            .inspect_network(
                &net.name,
                None::<bollard::query_parameters::InspectNetworkOptions>,
            )
            .await?;
        Ok(n.ipam
            .and_then(|i| i.config)
            .into_iter()
            .flatten()
            .filter_map(|c| c.gateway)
            .filter_map(|g| g.parse::<std::net::IpAddr>().ok())
            .find(|ip| ip.is_ipv4()))
    }

    async fn ensure_volume(&self, vol: &Named) -> Result<(), RuntimeError> {
        // Creating an existing volume returns it unchanged.
        self.docker
            .create_volume(VolumeCreateRequest {
                name: Some(vol.name.clone()),
                labels: Some(vol.labels.clone()),
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    async fn finish(&self, id: &str, spec: &ContainerSpec) -> Result<(), RuntimeError> {
        let opts = UploadToContainerOptionsBuilder::default().path("/").build();
        let chunks = spec.archive.clone();
        self.docker
            .upload_to_container(
                id,
                Some(opts),
                bollard::body_stream(futures_util::stream::iter(chunks)),
            )
            .await?;
        self.docker
            .start_container(id, None::<bollard::query_parameters::StartContainerOptions>)
            .await?;
        Ok(())
    }
}

fn secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX)
}

impl ContainerRuntime for DockerRuntime {
    async fn ping(&self) -> Result<(), RuntimeError> {
        self.docker.ping().await?;
        Ok(())
    }

    async fn list(&self) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let opts = ListContainersOptionsBuilder::default().all(true).build();
        let list = self.docker.list_containers(Some(opts)).await?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                Some(ContainerInfo {
                    id: c.id?,
                    name: c
                        .names
                        .and_then(|n| n.into_iter().next())
                        .map(|n| n.trim_start_matches('/').to_owned())
                        .unwrap_or_default(),
                    labels: c.labels.unwrap_or_default().into_iter().collect(),
                    state: run_state(c.state),
                    health: health_from_status(c.status.as_deref().unwrap_or("")),
                })
            })
            .collect())
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        if let Some(net) = &spec.network {
            self.ensure_network(net).await?;
        }
        self.ensure_volume(&spec.volume).await?;
        let opts = CreateContainerOptionsBuilder::default()
            .name(&spec.name)
            .build();
        let id = self
            .docker
            .create_container(Some(opts), spec.body.clone())
            .await?
            .id;
        if let Err(e) = self.finish(&id, spec).await {
            // Never leave a half-made container; if this fails too, the next pass sees it
            // `created` and recreates it.
            let _ = self.remove(&id).await;
            return Err(e);
        }
        Ok(id)
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.docker
            .start_container(id, None::<bollard::query_parameters::StartContainerOptions>)
            .await?;
        Ok(())
    }

    async fn stop(&self, id: &str, timeout: Duration) -> Result<(), RuntimeError> {
        let opts = StopContainerOptionsBuilder::default()
            .t(secs(timeout))
            .build();
        // 304 (already stopped) counts as success in bollard.
        self.docker.stop_container(id, Some(opts)).await?;
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let opts = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(false)
            .build();
        match self.docker.remove_container(id, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(e) => match RuntimeError::from(e) {
                RuntimeError::NotFound(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn restart(&self, id: &str, timeout: Duration) -> Result<(), RuntimeError> {
        let opts = RestartContainerOptionsBuilder::default()
            .t(secs(timeout))
            .build();
        self.docker.restart_container(id, Some(opts)).await?;
        Ok(())
    }

    async fn remove_volume(&self, name: &str) -> Result<(), RuntimeError> {
        let opts = RemoveVolumeOptionsBuilder::default().force(false).build();
        match self.docker.remove_volume(name, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(e) => match RuntimeError::from(e) {
                RuntimeError::NotFound(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    fn events(&self) -> EventStream {
        let mut filters: HashMap<&str, Vec<String>> = HashMap::new();
        filters.insert("type", vec!["container".into()]);
        filters.insert(
            "label",
            vec![
                format!("{LABEL_MANAGED_BY}={MANAGED_BY}"),
                format!("{LABEL_SUPERVISOR}={}", self.supervisor),
            ],
        );
        filters.insert(
            "event",
            [
                "die",
                "start",
                "health_status",
                "destroy",
                "pause",
                "unpause",
            ]
            .map(String::from)
            .to_vec(),
        );
        let opts = EventsOptionsBuilder::default().filters(&filters).build();
        Box::pin(self.docker.events(Some(opts)).map(|r| {
            r.map_err(RuntimeError::from).map(|m| {
                let actor = m.actor.unwrap_or_default();
                RuntimeEvent {
                    id: actor.id.unwrap_or_default(),
                    action: m.action.unwrap_or_default(),
                    sut: actor
                        .attributes
                        .and_then(|mut a| a.remove(crate::spec::LABEL_SUT)),
                }
            })
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// The fake

/// A call recorded by [`FakeRuntime`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeCall {
    /// `create` of a container name.
    Create(String),
    /// `start` of an id.
    Start(String),
    /// `stop` of an id.
    Stop(String),
    /// `remove` of an id.
    Remove(String),
    /// `restart` of an id.
    Restart(String),
    /// `remove_volume` of a name.
    RemoveVolume(String),
}

#[derive(Debug, Default)]
struct FakeState {
    containers: Vec<ContainerInfo>,
    volumes: Vec<String>,
    calls: Vec<FakeCall>,
    fail_create: Vec<String>,
    down: bool,
    next_id: u64,
}

/// An in-memory container engine: containers are created running and healthy. Records calls,
/// can be made unreachable, and can fail the creation of chosen names.
#[derive(Debug, Clone, Default)]
pub struct FakeRuntime {
    state: Arc<Mutex<FakeState>>,
}

impl FakeRuntime {
    /// An empty engine.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<FakeCall> {
        self.with(|s| s.calls.clone())
    }

    /// The containers now.
    pub fn containers(&self) -> Vec<ContainerInfo> {
        self.with(|s| s.containers.clone())
    }

    /// The volumes now.
    pub fn volumes(&self) -> Vec<String> {
        self.with(|s| s.volumes.clone())
    }

    /// Adds a container as if someone else made it.
    pub fn insert(&self, c: ContainerInfo) {
        self.with(|s| s.containers.push(c));
    }

    /// Changes a container in place.
    pub fn update(&self, id: &str, f: impl FnOnce(&mut ContainerInfo)) {
        self.with(|s| {
            if let Some(c) = s.containers.iter_mut().find(|c| c.id == id) {
                f(c)
            }
        });
    }

    /// Makes `create` of `name` fail (or succeed again with `false`).
    pub fn fail_create(&self, name: &str, fail: bool) {
        self.with(|s| {
            s.fail_create.retain(|n| n != name);
            if fail {
                s.fail_create.push(name.to_owned());
            }
        });
    }

    /// Makes the engine unreachable (or reachable again).
    pub fn set_down(&self, down: bool) {
        self.with(|s| s.down = down);
    }

    fn up(&self) -> Result<(), RuntimeError> {
        if self.with(|s| s.down) {
            Err(RuntimeError::Unreachable("fake engine is down".into()))
        } else {
            Ok(())
        }
    }

    fn exists(&self, id: &str) -> Result<(), RuntimeError> {
        if self.with(|s| s.containers.iter().any(|c| c.id == id)) {
            Ok(())
        } else {
            Err(RuntimeError::NotFound(id.to_owned()))
        }
    }
}

impl ContainerRuntime for FakeRuntime {
    async fn ping(&self) -> Result<(), RuntimeError> {
        self.up()
    }

    async fn list(&self) -> Result<Vec<ContainerInfo>, RuntimeError> {
        self.up()?;
        Ok(self.containers())
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        self.up()?;
        self.with(|s| {
            s.calls.push(FakeCall::Create(spec.name.clone()));
            if s.fail_create.contains(&spec.name) {
                return Err(RuntimeError::Api {
                    status: 500,
                    message: format!("fake failure creating {}", spec.name),
                });
            }
            if s.containers.iter().any(|c| c.name == spec.name) {
                return Err(RuntimeError::Conflict(spec.name.clone()));
            }
            if !s.volumes.contains(&spec.volume.name) {
                s.volumes.push(spec.volume.name.clone());
            }
            s.next_id += 1;
            let id = format!("fake{:04}", s.next_id);
            s.containers.push(ContainerInfo {
                id: id.clone(),
                name: spec.name.clone(),
                labels: spec
                    .body
                    .labels
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .collect(),
                state: RunState::Running,
                health: Health::Healthy,
            });
            Ok(id)
        })
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.up()?;
        self.exists(id)?;
        self.with(|s| s.calls.push(FakeCall::Start(id.to_owned())));
        self.update(id, |c| c.state = RunState::Running);
        Ok(())
    }

    async fn stop(&self, id: &str, _timeout: Duration) -> Result<(), RuntimeError> {
        self.up()?;
        self.exists(id)?;
        self.with(|s| s.calls.push(FakeCall::Stop(id.to_owned())));
        self.update(id, |c| {
            c.state = RunState::Exited;
            c.health = Health::None;
        });
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.up()?;
        self.with(|s| {
            s.calls.push(FakeCall::Remove(id.to_owned()));
            s.containers.retain(|c| c.id != id);
        });
        Ok(())
    }

    async fn restart(&self, id: &str, _timeout: Duration) -> Result<(), RuntimeError> {
        self.up()?;
        self.exists(id)?;
        self.with(|s| s.calls.push(FakeCall::Restart(id.to_owned())));
        self.update(id, |c| {
            c.state = RunState::Running;
            c.health = Health::Starting;
        });
        Ok(())
    }

    async fn remove_volume(&self, name: &str) -> Result<(), RuntimeError> {
        self.up()?;
        self.with(|s| {
            s.calls.push(FakeCall::RemoveVolume(name.to_owned()));
            s.volumes.retain(|v| v != name);
        });
        Ok(())
    }

    fn events(&self) -> EventStream {
        Box::pin(futures_util::stream::pending())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_suffixes() {
        assert_eq!(
            health_from_status("Up 2 minutes (healthy)"),
            Health::Healthy
        );
        assert_eq!(
            health_from_status("Up 2 minutes (unhealthy)"),
            Health::Unhealthy
        );
        assert_eq!(
            health_from_status("Up 1 second (health: starting)"),
            Health::Starting
        );
        assert_eq!(health_from_status("Exited (0) 3 seconds ago"), Health::None);
    }
}
