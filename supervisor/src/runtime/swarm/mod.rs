//! The Docker Swarm implementation of [`ContainerRuntime`]: one replicated service (one
//! replica) per SUT, through a swarm manager's Engine API (bollard), so the same `sut/` tree
//! drives agents on many hosts.
//!
//! - [`service`]: the pure translation of a [`ContainerSpec`] into a service, its configs and
//!   its secret.
//! - [`state`]: the pure reading of services, tasks and nodes as containers, with the node and
//!   why one is down.
//! - this module: the I/O. Configs and secrets are named after a hash of their contents, made
//!   when missing and removed when no service of this supervisor mounts them any more.
//!
//! What differs from the local runtime, by design:
//! - Swarm replaces an unhealthy task itself from the same HEALTHCHECK
//!   ([`ContainerRuntime::heals_itself`]), so the supervisor's healing and hang detection step
//!   back.
//! - No `docker exec` reaches a task on another node: whether an agent is busy comes from its
//!   MQTT status alone ([`ContainerRuntime::agent_busy`] answers nothing), and drain requests
//!   are not sent.
//! - A changed file updates its service in place ([`ContainerRuntime::update`]): the service
//!   keeps its id, Swarm stops the old task before starting the new one.
//! - Images are not built or pulled by the supervisor: each node pulls (from the user's
//!   registry) or has the image; `[build]` is refused under this runtime by the validation.
//! - SUT volumes stay on their node; `--purge-volumes` cannot reach them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bollard::models::{ConfigSpec, SecretSpec, ServiceSpec};
use bollard::query_parameters::{
    EventsOptionsBuilder, InspectServiceOptions, ListConfigsOptionsBuilder, ListNodesOptions,
    ListSecretsOptionsBuilder, ListServicesOptions, ListTasksOptions, UpdateServiceOptionsBuilder,
};
use bollard::Docker;
use futures_util::StreamExt;
use tokio::sync::RwLock;
use tracing::{debug, info, warn};

use super::{
    AgentAnswer, ContainerInfo, ContainerRuntime, EventStream, ImageOutcome, Progress,
    RuntimeError, RuntimeEvent,
};
use crate::spec::{
    ContainerSpec, ImageSpec, Tools, LABEL_MANAGED_BY, LABEL_SUPERVISOR, MANAGED_BY,
};

pub mod service;
pub mod state;

use service::{deployment, mounted_names, Binaries, Blob, ServiceError, SwarmContext};

/// The Swarm runtime.
#[derive(Clone)]
pub struct SwarmRuntime {
    docker: Docker,
    ctx: SwarmContext,
    bins: Arc<Binaries>,
    /// Creations and updates hold it shared while their configs must stay; the removal of
    /// unused configs holds it alone, so it never removes one a service is about to mount.
    objects: Arc<RwLock<()>>,
}

impl std::fmt::Debug for SwarmRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwarmRuntime")
            .field("supervisor", &self.ctx.supervisor)
            .finish()
    }
}

impl SwarmRuntime {
    /// Connects with Docker's defaults (`DOCKER_HOST` or the local socket), negotiates the API
    /// version and checks that the engine is a swarm manager. `tools` must hold the boot
    /// binary.
    pub async fn connect(
        supervisor: &str,
        prefix: &str,
        tools: &Tools,
        stop_grace: Duration,
    ) -> Result<Self, RuntimeError> {
        let docker = Docker::connect_with_defaults()?;
        let docker = docker.negotiate_version().await?;
        let info = docker.info().await?;
        let manager = info
            .swarm
            .as_ref()
            .and_then(|s| s.control_available)
            .unwrap_or(false);
        if !manager {
            return Err(RuntimeError::Api {
                status: 503,
                message: "--runtime swarm: this Docker engine is not a swarm manager (run `docker swarm init` on it, or point DOCKER_HOST at a manager)".into(),
            });
        }
        let labels = HashMap::from([
            (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
            (LABEL_SUPERVISOR.to_owned(), supervisor.to_owned()),
        ]);
        let bins = Binaries::new(tools, prefix, &labels).ok_or_else(|| RuntimeError::Api {
            status: 400,
            message: ServiceError::NoBoot.to_string(),
        })?;
        Ok(SwarmRuntime {
            docker,
            ctx: SwarmContext {
                prefix: prefix.to_owned(),
                supervisor: supervisor.to_owned(),
                stop_grace,
            },
            bins: Arc::new(bins),
            objects: Arc::default(),
        })
    }

    fn own_filter(&self, extra: &[&str]) -> HashMap<String, Vec<String>> {
        let mut labels = vec![
            format!("{LABEL_MANAGED_BY}={MANAGED_BY}"),
            format!("{LABEL_SUPERVISOR}={}", self.ctx.supervisor),
        ];
        labels.extend(extra.iter().map(|e| (*e).to_owned()));
        HashMap::from([("label".to_owned(), labels)])
    }

    /// The ids of `configs` by name, made when missing (a config of that name holds exactly
    /// this: names are hashes of the contents).
    async fn ensure_configs(
        &self,
        configs: &[Blob],
    ) -> Result<HashMap<String, String>, RuntimeError> {
        let names: Vec<String> = configs.iter().map(|c| c.name.clone()).collect();
        let mut ids = self.config_ids(&names).await?;
        for c in configs {
            if ids.contains_key(&c.name) {
                continue;
            }
            let made = self
                .docker
                .create_config(ConfigSpec {
                    name: Some(c.name.clone()),
                    labels: Some(c.labels.clone()),
                    data: Some(c.data_base64()),
                    templating: None,
                })
                .await;
            match made.map_err(RuntimeError::from) {
                Ok(r) => {
                    ids.insert(c.name.clone(), r.id);
                }
                // Made meanwhile by another creation: same name, same contents.
                Err(RuntimeError::Conflict(_)) => {
                    ids.extend(self.config_ids(std::slice::from_ref(&c.name)).await?);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(ids)
    }

    async fn config_ids(&self, names: &[String]) -> Result<HashMap<String, String>, RuntimeError> {
        let filters = HashMap::from([("name".to_owned(), names.to_vec())]);
        let list = self
            .docker
            .list_configs(Some(
                ListConfigsOptionsBuilder::default()
                    .filters(&filters)
                    .build(),
            ))
            .await?;
        // The name filter matches prefixes: keep exact names only.
        Ok(list
            .into_iter()
            .filter_map(|c| Some((c.spec?.name?, c.id?)))
            .filter(|(n, _)| names.contains(n))
            .collect())
    }

    /// The id of `secret`, made when missing.
    async fn ensure_secret(&self, secret: &Blob) -> Result<String, RuntimeError> {
        let find = || async {
            let filters = HashMap::from([("name".to_owned(), vec![secret.name.clone()])]);
            let list = self
                .docker
                .list_secrets(Some(
                    ListSecretsOptionsBuilder::default()
                        .filters(&filters)
                        .build(),
                ))
                .await?;
            Ok::<_, RuntimeError>(list.into_iter().find_map(|s| {
                (s.spec.as_ref()?.name.as_deref() == Some(secret.name.as_str())).then_some(s.id?)
            }))
        };
        if let Some(id) = find().await? {
            return Ok(id);
        }
        let made = self
            .docker
            .create_secret(SecretSpec {
                name: Some(secret.name.clone()),
                labels: Some(secret.labels.clone()),
                data: Some(secret.data_base64()),
                ..Default::default()
            })
            .await;
        match made {
            Ok(r) => Ok(r.id),
            Err(e) => match find().await? {
                Some(id) => Ok(id),
                None => Err(e.into()),
            },
        }
    }

    /// The service spec of `spec`, with its network, configs and secret made sure of and
    /// their ids filled in (the API wants ids besides names).
    async fn prepare(&self, spec: &ContainerSpec) -> Result<ServiceSpec, RuntimeError> {
        let d = deployment(spec, &self.bins, &self.ctx).map_err(|e| RuntimeError::Api {
            status: 400,
            message: e.to_string(),
        })?;
        let ids = self.ensure_configs(&d.configs).await?;
        let secret_id = match &d.secret {
            Some(s) => Some(self.ensure_secret(s).await?),
            None => None,
        };
        let mut service = d.service;
        if let Some(c) = service
            .task_template
            .as_mut()
            .and_then(|t| t.container_spec.as_mut())
        {
            for r in c.configs.iter_mut().flatten() {
                r.config_id = r.config_name.as_ref().and_then(|n| ids.get(n)).cloned();
            }
            for r in c.secrets.iter_mut().flatten() {
                r.secret_id = secret_id.clone();
            }
        }
        Ok(service)
    }

    /// Removes this supervisor's configs and secrets that none of its services mounts.
    async fn remove_unused(&self) {
        let _alone = self.objects.write().await;
        if let Err(error) = self.remove_unused_locked().await {
            debug!(error = %error, "Could not remove unused configs and secrets; the next removal tries again.");
        }
    }

    async fn remove_unused_locked(&self) -> Result<(), RuntimeError> {
        let services = self
            .docker
            .list_services(Some(ListServicesOptions {
                filters: Some(self.own_filter(&[])),
                ..Default::default()
            }))
            .await?;
        let used: HashSet<String> = services
            .iter()
            .filter_map(|s| s.spec.as_ref())
            .flat_map(mounted_names)
            .collect();
        let configs = self
            .docker
            .list_configs(Some(
                ListConfigsOptionsBuilder::default()
                    .filters(&self.own_filter(&[]))
                    .build(),
            ))
            .await?;
        for c in configs {
            let (Some(id), Some(name)) = (c.id, c.spec.and_then(|s| s.name)) else {
                continue;
            };
            if !used.contains(&name) {
                // In use by another supervisor's service: the engine refuses, which is right.
                let _ = self.docker.delete_config(&id).await;
            }
        }
        let secrets = self
            .docker
            .list_secrets(Some(
                ListSecretsOptionsBuilder::default()
                    .filters(&self.own_filter(&[]))
                    .build(),
            ))
            .await?;
        for s in secrets {
            let (Some(id), Some(name)) = (s.id, s.spec.and_then(|s| s.name)) else {
                continue;
            };
            if !used.contains(&name) {
                let _ = self.docker.delete_secret(&id).await;
            }
        }
        Ok(())
    }

    /// Changes the spec of service `id` with `f` at its current version: the replicas (0:
    /// stopped, 1: running), a forced new task, or a whole new spec (an update).
    async fn change(&self, id: &str, f: impl FnOnce(&mut ServiceSpec)) -> Result<(), RuntimeError> {
        let s = self
            .docker
            .inspect_service(id, None::<InspectServiceOptions>)
            .await?;
        let version = s
            .version
            .and_then(|v| v.index)
            .ok_or_else(|| RuntimeError::NotFound(format!("service {id} has no version")))?;
        let mut spec = s.spec.unwrap_or_default();
        f(&mut spec);
        self.docker
            .update_service(
                id,
                spec,
                UpdateServiceOptionsBuilder::default()
                    .version(i32::try_from(version).unwrap_or(i32::MAX))
                    .build(),
                None,
            )
            .await?;
        Ok(())
    }
}

fn set_replicas(spec: &mut ServiceSpec, n: i64) {
    if let Some(r) = spec.mode.as_mut().and_then(|m| m.replicated.as_mut()) {
        r.replicas = Some(n);
    }
}

impl ContainerRuntime for SwarmRuntime {
    async fn ping(&self) -> Result<(), RuntimeError> {
        self.docker.ping().await?;
        Ok(())
    }

    async fn list(&self) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let services = self
            .docker
            .list_services(None::<ListServicesOptions>)
            .await?;
        let tasks = self.docker.list_tasks(None::<ListTasksOptions>).await?;
        let nodes = state::nodes(&self.docker.list_nodes(None::<ListNodesOptions>).await?);
        let networks: HashMap<String, String> = self
            .docker
            .list_networks(None::<bollard::query_parameters::ListNetworksOptions>)
            .await?
            .into_iter()
            .filter_map(|n| Some((n.id?, n.name?)))
            .collect();
        Ok(services
            .iter()
            .filter_map(|s| state::service_info(s, &tasks, &nodes, &networks))
            .collect())
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let _shared = self.objects.read().await;
        let service = self.prepare(spec).await?;
        let made = self.docker.create_service(service, None).await?;
        let id = made.id.unwrap_or_default();
        info!(service = %id, "Created the agent's service.");
        Ok(id)
    }

    async fn ensure_image(
        &self,
        _spec: &ImageSpec,
        _progress: &Progress,
    ) -> Result<ImageOutcome, RuntimeError> {
        // Each node pulls the image or has it; the manager cannot put it there.
        Ok(ImageOutcome::Present)
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.change(id, |s| set_replicas(s, 1)).await
    }

    async fn stop(&self, id: &str, _timeout: Duration) -> Result<(), RuntimeError> {
        self.change(id, |s| set_replicas(s, 0)).await
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        match self.docker.delete_service(id).await {
            Ok(()) => {}
            Err(e) => match RuntimeError::from(e) {
                RuntimeError::NotFound(_) => {}
                e => return Err(e),
            },
        }
        self.remove_unused().await;
        Ok(())
    }

    async fn restart(&self, id: &str, _timeout: Duration) -> Result<(), RuntimeError> {
        self.change(id, |s| {
            if let Some(t) = s.task_template.as_mut() {
                t.force_update = Some(t.force_update.unwrap_or(0) + 1);
            }
        })
        .await
    }

    async fn remove_volume(&self, name: &str) -> Result<(), RuntimeError> {
        warn!(volume = %name, "Under Swarm a SUT's volume stays on its node; remove it there (`docker volume rm` on that node).");
        Ok(())
    }

    async fn agent_busy(&self, _id: &str) -> Result<AgentAnswer, RuntimeError> {
        Err(RuntimeError::NoAnswer(
            "no docker exec reaches a Swarm task on another node; going by the agent's MQTT status"
                .into(),
        ))
    }

    async fn agent_drain(&self, _id: &str, _lift: bool) -> Result<(), RuntimeError> {
        Err(RuntimeError::NoAnswer(
            "no docker exec reaches a Swarm task on another node to drain its device".into(),
        ))
    }

    fn events(&self) -> EventStream {
        let filters: HashMap<&str, Vec<String>> =
            HashMap::from([("type", vec!["service".to_owned(), "node".to_owned()])]);
        let opts = EventsOptionsBuilder::default().filters(&filters).build();
        Box::pin(self.docker.events(Some(opts)).map(|r| {
            r.map_err(RuntimeError::from).map(|m| {
                let actor = m.actor.unwrap_or_default();
                RuntimeEvent {
                    id: actor.id.unwrap_or_default(),
                    action: m.action.unwrap_or_default(),
                    sut: None,
                }
            })
        }))
    }

    fn heals_itself(&self) -> bool {
        true
    }

    fn updates_in_place(&self) -> bool {
        true
    }

    async fn update(&self, id: &str, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        {
            let _shared = self.objects.read().await;
            let service = self.prepare(spec).await?;
            self.change(id, |s| *s = service).await?;
        }
        self.remove_unused().await;
        Ok(id.to_owned())
    }
}
