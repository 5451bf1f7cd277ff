//! An in-memory container engine for tests of the reconcile loop: containers are created
//! running and healthy, every call is recorded ([`FakeCall`]), and failures (an engine down, a
//! failed create, pull, build, remove or start, a busy agent) are set by hand. An agent asked
//! to drain says so (`draining`) until the drain is lifted.
//!
//! Compiled only for the crate's unit tests and under the `fake-runtime` feature (which the
//! supervisor's own integration tests enable through a dev-dependency on the crate itself):
//! it is not in the release binary.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use labvisor_protocol::payloads::Health;

use super::{
    AgentAnswer, ContainerInfo, ContainerRuntime, EventStream, ImageOutcome, Progress, RuntimeError,
};
use crate::plan::RunState;
use crate::spec::{ContainerSpec, ImageSpec};

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
    /// A build of an image (`ensure_image` with `[build]` and a stale or absent image).
    Build(String),
    /// A pull of an absent image.
    Pull(String),
    /// `agent_busy` of an id.
    AgentBusy(String),
    /// `agent_drain` of an id (`true`: lifted).
    AgentDrain(String, bool),
    /// `update` (in place, see [`FakeRuntime::set_updates_in_place`]) of an id, with the new
    /// spec's config-hash label.
    Update(String, String),
}

#[derive(Debug, Default)]
struct FakeState {
    containers: Vec<ContainerInfo>,
    volumes: Vec<String>,
    calls: Vec<FakeCall>,
    fail_create: Vec<String>,
    fail_remove: Vec<String>,
    fail_start: Vec<String>,
    absent: Vec<String>,
    unpullable: Vec<String>,
    built: BTreeMap<String, String>,
    fail_build: Vec<String>,
    busy: Vec<String>,
    hung: Vec<String>,
    exec_fails: Vec<String>,
    device_work: BTreeMap<String, String>,
    draining: Vec<String>,
    create_delay: BTreeMap<String, Duration>,
    lists: u64,
    down: bool,
    next_id: u64,
    heals_itself: bool,
    updates_in_place: bool,
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
        self.with(|s| set(&mut s.fail_create, name, fail));
    }

    /// Makes `remove` of the container `id` fail (or succeed again with `false`).
    pub fn fail_remove(&self, id: &str, fail: bool) {
        self.with(|s| set(&mut s.fail_remove, id, fail));
    }

    /// Makes `start` of the container `id` fail (or succeed again with `false`).
    pub fn fail_start(&self, id: &str, fail: bool) {
        self.with(|s| set(&mut s.fail_start, id, fail));
    }

    /// Makes `image` absent locally (or present again). Images are present unless made absent
    /// here; images with `[build]` are absent until built.
    pub fn set_absent(&self, image: &str, absent: bool) {
        self.with(|s| set(&mut s.absent, image, absent));
    }

    /// Makes the pull of `image` fail as if no registry were reachable (or succeed again).
    pub fn fail_pull(&self, image: &str, fail: bool) {
        self.with(|s| set(&mut s.unpullable, image, fail));
    }

    /// Makes builds of `image` fail (or succeed again).
    pub fn fail_build(&self, image: &str, fail: bool) {
        self.with(|s| set(&mut s.fail_build, image, fail));
    }

    /// The build hash each built image carries.
    pub fn built(&self) -> BTreeMap<String, String> {
        self.with(|s| s.built.clone())
    }

    /// Makes `create` of `name` take `delay`, as an engine under load does.
    pub fn set_create_delay(&self, name: &str, delay: Duration) {
        self.with(|s| s.create_delay.insert(name.to_owned(), delay));
    }

    /// How many times the containers were listed (one per reconcile pass).
    pub fn lists(&self) -> u64 {
        self.with(|s| s.lists)
    }

    /// Makes the agent in container `id` report a running job to `agent_busy` (or none).
    pub fn set_busy(&self, id: &str, busy: bool) {
        self.with(|s| set(&mut s.busy, id, busy));
    }

    /// Makes the agent in container `id` hang (or run again): its heartbeat goes stale, so
    /// `agent_busy` (the healthcheck through exec) answers unhealthy.
    pub fn set_hung(&self, id: &str, hung: bool) {
        self.with(|s| set(&mut s.hung, id, hung));
    }

    /// Makes `agent_busy` (an exec) into container `id` fail (or work again), as when dockerd
    /// cannot exec into it; the call is still recorded.
    pub fn set_exec_fails(&self, id: &str, fails: bool) {
        self.with(|s| set(&mut s.exec_fails, id, fails));
    }

    /// Makes the device in container `id` work on its own (`work`: what its busy globs match;
    /// the agent is busy then), or stop working (`None`).
    pub fn set_device_work(&self, id: &str, work: Option<&str>) {
        self.with(|s| match work {
            Some(w) => s.device_work.insert(id.to_owned(), w.to_owned()),
            None => s.device_work.remove(id),
        });
    }

    /// Makes the engine one that replaces unhealthy containers itself
    /// ([`ContainerRuntime::heals_itself`], as Swarm does), or not (the default). Read once by
    /// the supervisor at start.
    pub fn set_heals_itself(&self, heals: bool) {
        self.with(|s| s.heals_itself = heals);
    }

    /// Makes the engine one that updates containers in place
    /// ([`ContainerRuntime::updates_in_place`], as Swarm updates a service), or not (the
    /// default): `update` then replaces the container's labels and network, keeps its id, and
    /// is recorded as [`FakeCall::Update`].
    pub fn set_updates_in_place(&self, in_place: bool) {
        self.with(|s| s.updates_in_place = in_place);
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

    /// An operation on the existing container `id`: recorded as `call`, then `f` on it.
    fn act(
        &self,
        id: &str,
        call: fn(String) -> FakeCall,
        f: impl FnOnce(&mut ContainerInfo),
    ) -> Result<(), RuntimeError> {
        self.up()?;
        self.exists(id)?;
        self.with(|s| s.calls.push(call(id.to_owned())));
        self.update(id, f);
        Ok(())
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
        self.with(|s| s.lists += 1);
        Ok(self.containers())
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        self.up()?;
        if let Some(d) = self.with(|s| s.create_delay.get(&spec.name).copied()) {
            tokio::time::sleep(d).await;
        }
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
                node: None,
                down: None,
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
                finished_ms: None,
                network: spec
                    .body
                    .host_config
                    .as_ref()
                    .and_then(|h| h.network_mode.clone()),
            });
            Ok(id)
        })
    }

    async fn ensure_image(
        &self,
        spec: &ImageSpec,
        progress: &Progress,
    ) -> Result<ImageOutcome, RuntimeError> {
        self.up()?;
        let image = spec.image.clone();
        let Some(b) = &spec.build else {
            let (absent, unpullable) =
                self.with(|s| (s.absent.contains(&image), s.unpullable.contains(&image)));
            if !absent {
                return Ok(ImageOutcome::Present);
            }
            self.with(|s| s.calls.push(FakeCall::Pull(image.clone())));
            if unpullable {
                return Err(RuntimeError::ImageUnavailable {
                    image,
                    reason: "fake registry unreachable".into(),
                });
            }
            progress(&format!("fake pull of {image}"));
            self.set_absent(&image, false);
            return Ok(ImageOutcome::Pulled);
        };
        if self.with(|s| s.built.get(&image) == Some(&b.hash)) {
            return Ok(ImageOutcome::Present);
        }
        self.with(|s| s.calls.push(FakeCall::Build(image.clone())));
        progress(&format!("Step 1/1 : fake build of {image}"));
        if self.with(|s| s.fail_build.contains(&image)) {
            return Err(RuntimeError::BuildFailed {
                image,
                message: "fake build failure".into(),
            });
        }
        let n = self.with(|s| {
            s.built.insert(image.clone(), b.hash.clone());
            s.next_id += 1;
            s.next_id
        });
        Ok(ImageOutcome::Built(format!("sha256:fakeimage{n:04}")))
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        if self.with(|s| s.fail_start.iter().any(|f| f == id)) {
            self.with(|s| s.calls.push(FakeCall::Start(id.to_owned())));
            return Err(RuntimeError::Api {
                status: 500,
                message: format!("fake failure starting {id}"),
            });
        }
        self.act(id, FakeCall::Start, |c| c.state = RunState::Running)
    }

    async fn stop(&self, id: &str, _timeout: Duration) -> Result<(), RuntimeError> {
        self.act(id, FakeCall::Stop, |c| {
            c.state = RunState::Exited;
            c.health = Health::None;
        })
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.up()?;
        self.with(|s| {
            s.calls.push(FakeCall::Remove(id.to_owned()));
            if s.fail_remove.iter().any(|f| f == id) {
                return Err(RuntimeError::Api {
                    status: 500,
                    message: format!("fake failure removing {id}"),
                });
            }
            s.containers.retain(|c| c.id != id);
            Ok(())
        })
    }

    async fn restart(&self, id: &str, _timeout: Duration) -> Result<(), RuntimeError> {
        if self.with(|s| s.fail_start.iter().any(|f| f == id)) {
            // As `docker restart` whose start fails: the container is left stopped.
            self.act(id, FakeCall::Restart, |c| {
                c.state = RunState::Exited;
                c.health = Health::None;
            })?;
            return Err(RuntimeError::Api {
                status: 500,
                message: format!("fake failure restarting {id}"),
            });
        }
        self.act(id, FakeCall::Restart, |c| {
            c.state = RunState::Running;
            c.health = Health::Starting;
        })
    }

    async fn remove_volume(&self, name: &str) -> Result<(), RuntimeError> {
        self.up()?;
        self.with(|s| {
            s.calls.push(FakeCall::RemoveVolume(name.to_owned()));
            s.volumes.retain(|v| v != name);
        });
        Ok(())
    }

    async fn agent_busy(&self, id: &str) -> Result<AgentAnswer, RuntimeError> {
        self.up()?;
        self.exists(id)?;
        let failed = self.with(|s| {
            s.calls.push(FakeCall::AgentBusy(id.to_owned()));
            s.exec_fails.iter().any(|f| f == id)
        });
        if failed {
            return Err(RuntimeError::Api {
                status: 500,
                message: format!("fake failure executing in {id}"),
            });
        }
        Ok(self.with(|s| {
            if s.hung.iter().any(|h| h == id) {
                return AgentAnswer {
                    unhealthy: Some("heartbeat is 31.0s old (max 30.0s): the agent's loop is hung or dead (last state idle)".into()),
                    ..AgentAnswer::default()
                };
            }
            let device_work = s.device_work.get(id).cloned();
            AgentAnswer {
                busy: s.busy.iter().any(|b| b == id) || device_work.is_some(),
                device_work,
                draining: s.draining.iter().any(|d| d == id),
                unhealthy: None,
            }
        }))
    }

    async fn agent_drain(&self, id: &str, lift: bool) -> Result<(), RuntimeError> {
        self.up()?;
        self.exists(id)?;
        self.with(|s| {
            s.calls.push(FakeCall::AgentDrain(id.to_owned(), lift));
            // The agent keeps the request until it is lifted (in the container's tmpfs).
            set(&mut s.draining, id, !lift);
        });
        Ok(())
    }

    fn events(&self) -> EventStream {
        Box::pin(futures_util::stream::pending())
    }

    fn heals_itself(&self) -> bool {
        self.with(|s| s.heals_itself)
    }

    fn updates_in_place(&self) -> bool {
        self.with(|s| s.updates_in_place)
    }

    async fn update(&self, id: &str, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        self.up()?;
        self.exists(id)?;
        let labels: BTreeMap<String, String> = spec
            .body
            .labels
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let hash = labels
            .get(crate::spec::LABEL_CONFIG_HASH)
            .cloned()
            .unwrap_or_default();
        self.with(|s| s.calls.push(FakeCall::Update(id.to_owned(), hash)));
        let network = spec
            .body
            .host_config
            .as_ref()
            .and_then(|h| h.network_mode.clone());
        self.with(|s| {
            if let Some(c) = s.containers.iter_mut().find(|c| c.id == id) {
                c.labels = labels;
                c.network = network;
                c.state = RunState::Running;
                c.health = Health::Healthy;
            }
        });
        Ok(id.to_owned())
    }
}

/// Puts `name` in `list` (once) or takes it out.
fn set(list: &mut Vec<String>, name: &str, on: bool) {
    list.retain(|n| n != name);
    if on {
        list.push(name.to_owned());
    }
}

/// The container context a supervisor on the fake runtime is tested with: supervisor id `fake`,
/// name prefix `p-`, no broker, placeholder binaries.
pub fn spec_context() -> crate::spec::SpecContext {
    crate::spec::SpecContext {
        supervisor: labvisor_protocol::topics::SupervisorId::new("fake").expect("a valid id"),
        name_prefix: "p-".into(),
        extra_labels: BTreeMap::new(),
        agent_broker: None,
        topic_prefix: None,
        mqtt_username: None,
        mqtt_password: None,
        agent_credentials: None,
        tools: crate::spec::Tools::new(
            bytes::Bytes::from_static(b"agent"),
            bytes::Bytes::from_static(b"hc"),
        ),
        agent_ca: None,
    }
}

/// Settings of a supervisor on the fake runtime watching `sut_dir`: [`spec_context`], no broker,
/// no metrics, no managed broker; tests override what they exercise.
pub fn settings(sut_dir: &std::path::Path) -> crate::supervise::Settings {
    crate::supervise::Settings {
        sut_dir: sut_dir.to_owned(),
        allow: labvisor_protocol::config::Allow::default(),
        spec: spec_context(),
        topics: labvisor_protocol::topics::Topics::new(),
        mqtt: None,
        busy_wait: Duration::from_secs(600),
        resync: Duration::from_secs(30),
        stop_timeout: Duration::from_secs(1),
        parallelism: 4,
        network_capacity: crate::plan::networks::DEFAULT_CAPACITY,
        purge_volumes: false,
        logins: None,
        poll: None,
        metrics_listen: None,
        managed_broker: None,
        status_every: Duration::from_secs(30),
        healthcheck_rate: crate::plan::hang::HealthcheckRate::DEFAULT,
    }
}
