//! The local-Docker implementation of [`ContainerRuntime`] (bollard).
//!
//! Health comes from the container list: on API 1.41 (Debian's Engine 20.10) the list has no
//! health field, but its status string ends in `(healthy)`, `(unhealthy)` or
//! `(health: starting)`, so one list call per resync gives every container's health without an
//! inspect per container.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerSummaryStateEnum, HostConfig, Mount, MountType,
    NetworkCreateRequest, VolumeCreateRequest,
};
use bollard::query_parameters::{
    BuildImageOptionsBuilder, CreateContainerOptionsBuilder, CreateImageOptionsBuilder,
    DownloadFromContainerOptionsBuilder, EventsOptionsBuilder, ListContainersOptionsBuilder,
    ListNetworksOptionsBuilder, ListVolumesOptionsBuilder, RemoveContainerOptionsBuilder,
    RemoveImageOptionsBuilder, RemoveVolumeOptionsBuilder, RestartContainerOptionsBuilder,
    StopContainerOptionsBuilder, UploadToContainerOptionsBuilder,
};
use bollard::Docker;
use futures_util::StreamExt;
use labvisor_protocol::payloads::{AgentState, Health};
use tracing::{debug, warn};

use crate::plan::RunState;
use crate::spec::{
    ContainerSpec, ImageSpec, Named, ToolsVolume, HEALTHCHECK_PATH, ICC_OPTION, LABEL_BUILD_HASH,
    LABEL_MANAGED_BY, LABEL_ROLE, LABEL_SUPERVISOR, MANAGED_BY, NETWORK_OPTIONS, ROLE_TOOLS,
    TOOLS_DIR, TOOLS_MARKER,
};

use super::{
    ContainerInfo, ContainerRuntime, EventStream, ImageOutcome, Progress, RuntimeError,
    RuntimeEvent,
};

/// Lines of build output kept for the error message of a failed build.
const BUILD_ERROR_TAIL: usize = 12;

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

/// Reads `labvisor-healthcheck --state`'s answer: exit 0 with `state=<state>` (busy or not);
/// exit 1, an unhealthy agent (stale heartbeat: hung or dead), which runs no job worth waiting
/// for. Anything else, e.g. exit 2 from a healthcheck older than `--state` in a container made
/// by an earlier supervisor version, cannot tell.
pub fn busy_from_state_probe(exit_code: Option<i64>, stdout: &str) -> Result<bool, RuntimeError> {
    let out = stdout.trim();
    match (exit_code, out.strip_prefix("state=")) {
        (Some(0), Some(state)) => Ok(state == AgentState::Busy.as_str()),
        (Some(1), _) => Ok(false),
        _ => Err(RuntimeError::NoAnswer(format!(
            "labvisor-healthcheck --state said {out:?} (exit {exit_code:?})"
        ))),
    }
}

/// The bollard implementation.
#[derive(Debug, Clone)]
pub struct DockerRuntime {
    docker: Docker,
    supervisor: String,
    /// Serialises network creation: Engine 20.10 happily creates two networks of one name.
    network_lock: Arc<tokio::sync::Mutex<()>>,
    /// Tools volumes known to be complete; the lock also serialises their fill, so a cold
    /// start of many SUTs fills the volume once while the other creates wait.
    tools_ready: Arc<tokio::sync::Mutex<std::collections::HashSet<String>>>,
    /// The tools volume in use, once made sure of: after a container is removed, older tools
    /// volumes of this supervisor that no container uses any more are removed.
    current_tools: Arc<Mutex<Option<String>>>,
    /// labvisor's own network, once made sure of: older networks of this supervisor are
    /// removed when no container uses them any more.
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
    networks: std::collections::HashSet<String>,
    images: std::collections::HashSet<String>,
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

    /// Whether the SUT volume of the old naming exists and carries the labels that make it
    /// this supervisor's volume of this SUT (and no role: the old tools volume's name was a
    /// possible SUT volume name). The volumes are listed once per process: labvisor never makes
    /// a volume of the old naming again.
    async fn legacy_volume_is_ours(&self, legacy: &Named) -> Result<bool, RuntimeError> {
        let mut cache = self.legacy_volumes.lock().await;
        if cache.is_none() {
            let mut filters: HashMap<String, Vec<String>> = HashMap::new();
            filters.insert(
                "label".into(),
                vec![
                    format!("{LABEL_MANAGED_BY}={MANAGED_BY}"),
                    format!("{LABEL_SUPERVISOR}={}", self.supervisor),
                    crate::spec::LABEL_SUT.to_owned(),
                ],
            );
            let opts = ListVolumesOptionsBuilder::default()
                .filters(&filters)
                .build();
            let list = self.docker.list_volumes(Some(opts)).await?;
            *cache = Some(
                list.volumes
                    .unwrap_or_default()
                    .into_iter()
                    .map(|v| (v.name, v.labels))
                    .collect(),
            );
        }
        let volumes = cache.as_ref().expect("filled above");
        Ok(volumes.get(&legacy.name).is_some_and(|labels| {
            !labels.contains_key(LABEL_ROLE)
                && legacy
                    .labels
                    .iter()
                    .all(|(k, want)| labels.get(k) == Some(want))
        }))
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn ensure_network(&self, net: &Named) -> Result<(), RuntimeError> {
        if self.known().networks.contains(&net.name) {
            return Ok(());
        }
        let _guard = self.network_lock.lock().await;
        let found = self.ensure_network_locked(net).await;
        if found.is_ok() {
            self.known().networks.insert(net.name.clone());
        }
        found
    }

    async fn ensure_network_locked(&self, net: &Named) -> Result<(), RuntimeError> {
        match self
            .docker
            .inspect_network(
                &net.name,
                None::<bollard::query_parameters::InspectNetworkOptions>,
            )
            .await
        {
            Ok(n) => {
                let icc = n.options.as_ref().and_then(|o| o.get(ICC_OPTION));
                if icc.map(String::as_str) != Some("false") {
                    warn!(network = %net.name, "The network exists with traffic between its containers allowed (it was not made by labvisor, e.g. by docker-compose with the broker on it): agents on it can reach each other.");
                }
                self.set_current_network(&net.name);
                return Ok(());
            }
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
                options: Some(
                    NETWORK_OPTIONS
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..Default::default()
            })
            .await?;
        self.set_current_network(&net.name);
        Ok(())
    }

    fn set_current_network(&self, name: &str) {
        let first = self
            .current_network
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(name.to_owned())
            .is_none();
        if first {
            let rt = self.clone();
            tokio::spawn(async move { rt.remove_old_networks().await });
        }
    }

    /// Removes this supervisor's networks other than the one in use (the bridge of earlier
    /// versions, with traffic between containers allowed); the engine refuses those a
    /// container (an agent not yet recreated) still uses, and they stay until it is gone.
    async fn remove_old_networks(&self) {
        let Some(keep) = self
            .current_network
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return;
        };
        let mut filters: HashMap<String, Vec<String>> = HashMap::new();
        filters.insert(
            "label".into(),
            vec![
                format!("{LABEL_MANAGED_BY}={MANAGED_BY}"),
                format!("{LABEL_SUPERVISOR}={}", self.supervisor),
            ],
        );
        let opts = ListNetworksOptionsBuilder::default()
            .filters(&filters)
            .build();
        let Ok(list) = self.docker.list_networks(Some(opts)).await else {
            return;
        };
        for n in list {
            let Some(name) = n.name.filter(|name| *name != keep) else {
                continue;
            };
            match self.docker.remove_network(&name).await {
                Ok(()) => debug!(network = %name, "Removed an old network."),
                Err(e) => debug!(network = %name, error = %e, "Old network kept."),
            }
        }
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

    /// Whether the volume `name` exists.
    async fn volume_exists(&self, name: &str) -> Result<bool, RuntimeError> {
        match self.docker.inspect_volume(name).await {
            Ok(_) => Ok(true),
            Err(e) => match RuntimeError::from(e) {
                RuntimeError::NotFound(_) => Ok(false),
                other => Err(other),
            },
        }
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

    /// Makes sure the tools volume exists and holds the binaries: once per volume and process,
    /// a helper container (never started) mounts it, the marker is read back, and when it is
    /// missing or holds another hash the archive is uploaded. Then older tools volumes of this
    /// supervisor are removed where no container uses them any more.
    async fn ensure_tools(&self, t: &ToolsVolume) -> Result<(), RuntimeError> {
        let mut ready = self.tools_ready.lock().await;
        if ready.contains(&t.volume.name) {
            return Ok(());
        }
        self.ensure_volume(&t.volume).await?;
        // A helper left by a supervisor killed mid-fill.
        self.remove(&t.helper_name).await?;
        let body = ContainerCreateBody {
            image: Some(t.helper_image.clone()),
            entrypoint: Some(vec![crate::spec::AGENT_PATH.into()]),
            cmd: Some(vec![]),
            labels: Some(t.volume.labels.clone()),
            network_disabled: Some(true),
            host_config: Some(HostConfig {
                network_mode: Some("none".into()),
                mounts: Some(vec![Mount {
                    target: Some(TOOLS_DIR.into()),
                    source: Some(t.volume.name.clone()),
                    typ: Some(MountType::VOLUME),
                    read_only: Some(false),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let opts = CreateContainerOptionsBuilder::default()
            .name(&t.helper_name)
            .build();
        let helper = self.docker.create_container(Some(opts), body).await?.id;
        let filled = self.fill_tools(&helper, t).await;
        let removed = self.remove(&helper).await;
        let filled = filled?;
        removed?;
        if filled {
            debug!(volume = %t.volume.name, hash = %t.tools.hash, "Filled the tools volume.");
        }
        ready.insert(t.volume.name.clone());
        drop(ready);
        *self.current_tools.lock().unwrap_or_else(|p| p.into_inner()) = Some(t.volume.name.clone());
        self.remove_old_tools(&t.volume.name).await;
        Ok(())
    }

    /// Uploads the tools into the helper's volume unless its marker already holds the hash;
    /// whether it uploaded.
    async fn fill_tools(&self, helper: &str, t: &ToolsVolume) -> Result<bool, RuntimeError> {
        let marker = format!("{TOOLS_DIR}/{TOOLS_MARKER}");
        let opts = DownloadFromContainerOptionsBuilder::default()
            .path(&marker)
            .build();
        let mut tar = Vec::new();
        let mut stream = self.docker.download_from_container(helper, Some(opts));
        let mut present = true;
        while let Some(chunk) = stream.next().await {
            match chunk.map_err(RuntimeError::from) {
                Ok(c) => tar.extend_from_slice(&c),
                Err(RuntimeError::NotFound(_)) => {
                    present = false;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        if present && marker_hash(&tar).as_deref() == Some(t.tools.hash.as_str()) {
            return Ok(false);
        }
        let opts = UploadToContainerOptionsBuilder::default()
            .path(TOOLS_DIR)
            .build();
        self.docker
            .upload_to_container(
                helper,
                Some(opts),
                bollard::body_stream(futures_util::stream::iter(t.tools.archive.clone())),
            )
            .await?;
        Ok(true)
    }

    /// Removes this supervisor's tools volumes other than `keep`; the engine refuses those a
    /// container (of an agent not yet recreated) still uses, and they stay.
    async fn remove_old_tools(&self, keep: &str) {
        let mut filters: HashMap<String, Vec<String>> = HashMap::new();
        filters.insert(
            "label".into(),
            vec![
                format!("{LABEL_MANAGED_BY}={MANAGED_BY}"),
                format!("{LABEL_SUPERVISOR}={}", self.supervisor),
                format!("{LABEL_ROLE}={ROLE_TOOLS}"),
            ],
        );
        let opts = ListVolumesOptionsBuilder::default()
            .filters(&filters)
            .build();
        let Ok(list) = self.docker.list_volumes(Some(opts)).await else {
            return;
        };
        for v in list.volumes.unwrap_or_default() {
            if v.name != keep {
                match self.remove_volume(&v.name).await {
                    Ok(()) => debug!(volume = %v.name, "Removed an old tools volume."),
                    Err(e) => debug!(volume = %v.name, error = %e, "Old tools volume kept."),
                }
            }
        }
    }

    /// Removes the volume a failed create made; if that fails too (still in use by a container
    /// that could not be removed), it is only logged: the retry uses it again.
    async fn remove_made_volume(&self, name: &str) {
        match self.remove_volume(name).await {
            Ok(()) => debug!(volume = %name, "Removed the volume of the failed create."),
            Err(e) => {
                warn!(volume = %name, error = %e, "Cannot remove the volume of the failed create.")
            }
        }
    }

    async fn finish(&self, id: &str, spec: &ContainerSpec) -> Result<(), RuntimeError> {
        if let Some(chunks) = spec.archive.clone() {
            let opts = UploadToContainerOptionsBuilder::default().path("/").build();
            self.docker
                .upload_to_container(
                    id,
                    Some(opts),
                    bollard::body_stream(futures_util::stream::iter(chunks)),
                )
                .await?;
        }
        self.docker
            .start_container(id, None::<bollard::query_parameters::StartContainerOptions>)
            .await?;
        Ok(())
    }
}

impl DockerRuntime {
    /// The image's build-hash and managed-by labels and its id; `None` when it is absent.
    async fn image_state(&self, image: &str) -> Result<Option<ImageState>, RuntimeError> {
        match self.docker.inspect_image(image).await {
            Ok(i) => {
                let labels = i.config.and_then(|c| c.labels).unwrap_or_default();
                Ok(Some(ImageState {
                    id: i.id.unwrap_or_default(),
                    build_hash: labels.get(LABEL_BUILD_HASH).cloned(),
                    managed: labels.get(LABEL_MANAGED_BY).map(String::as_str) == Some(MANAGED_BY),
                }))
            }
            Err(e) => match RuntimeError::from(e) {
                RuntimeError::NotFound(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn pull(&self, image: &str, progress: &Progress) -> Result<(), RuntimeError> {
        let (repo, tag) = split_reference(image);
        let opts = CreateImageOptionsBuilder::default()
            .from_image(repo)
            .tag(tag)
            .build();
        let unavailable = |reason: String| RuntimeError::ImageUnavailable {
            image: image.to_owned(),
            reason,
        };
        let mut stream = self.docker.create_image(Some(opts), None, None);
        let mut last = String::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(message) = info.error_detail.and_then(|d| d.message) {
                        return Err(unavailable(message));
                    }
                    if let Some(status) = info.status {
                        let line = match info.id {
                            Some(id) => format!("{id}: {status}"),
                            None => status,
                        };
                        // Download progress repeats the same status many times.
                        if line != last {
                            progress(&line);
                            last = line;
                        }
                    }
                }
                Err(BollardError::DockerResponseServerError { message, .. }) => {
                    return Err(unavailable(message))
                }
                Err(BollardError::DockerStreamError { error }) => return Err(unavailable(error)),
                Err(other) => {
                    return Err(match RuntimeError::from(other) {
                        RuntimeError::Unreachable(m) => RuntimeError::Unreachable(m),
                        e => unavailable(e.to_string()),
                    })
                }
            }
        }
        match self.image_state(image).await? {
            Some(_) => Ok(()),
            None => Err(unavailable(
                "the pull ended without error, but the image is still missing".into(),
            )),
        }
    }

    async fn build(
        &self,
        image: &str,
        build: &crate::spec::BuildSpec,
        old: Option<ImageState>,
        progress: &Progress,
    ) -> Result<ImageOutcome, RuntimeError> {
        let failed = |message: String| RuntimeError::BuildFailed {
            image: image.to_owned(),
            message,
        };
        // Read and pack the context as it is now; the label says what was actually sent.
        let dir = build.context_dir.clone();
        let (context_hash, tar) = tokio::task::spawn_blocking(move || {
            let entries = labvisor_protocol::config::read_context(
                &dir,
                labvisor_protocol::config::MAX_CONTEXT_SIZE,
            )
            .map_err(|e| format!("the build context {} {e}", dir.display()))?;
            let tar = context_tar(&entries)?;
            Ok::<_, String>((labvisor_protocol::config::context_hash(&entries), tar))
        })
        .await
        .map_err(|e| failed(format!("reading the build context panicked: {e}")))?
        .map_err(failed)?;
        let hash =
            labvisor_protocol::config::build_hash(&context_hash, &build.dockerfile, &build.args);
        if old.as_ref().and_then(|o| o.build_hash.as_deref()) == Some(hash.as_str()) {
            return Ok(ImageOutcome::Present);
        }
        let mut labels = build.labels.clone();
        labels.insert(LABEL_BUILD_HASH.into(), hash.clone());
        let args: HashMap<String, String> = build
            .args
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let opts = BuildImageOptionsBuilder::default()
            .dockerfile(&build.dockerfile)
            .t(image)
            .rm(true)
            .forcerm(true)
            .buildargs(&args)
            .labels(&labels)
            .build();
        let mut stream = self
            .docker
            .build_image(opts, None, Some(bollard::body_full(tar.into())));
        let mut tail: std::collections::VecDeque<String> = Default::default();
        let mut built_id: Option<String> = None;
        let with_tail = |message: &str, tail: &std::collections::VecDeque<String>| {
            if tail.is_empty() {
                message.trim().to_owned()
            } else {
                let lines: Vec<&str> = tail.iter().map(String::as_str).collect();
                format!("{}; last output: {}", message.trim(), lines.join(" | "))
            }
        };
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    for text in [info.stream, info.status].into_iter().flatten() {
                        for line in text.lines() {
                            let line = line.trim_end();
                            if line.is_empty() {
                                continue;
                            }
                            progress(line);
                            if tail.len() == BUILD_ERROR_TAIL {
                                tail.pop_front();
                            }
                            tail.push_back(line.to_owned());
                        }
                    }
                    if let Some(id) = info.aux.and_then(|a| a.id) {
                        built_id = Some(id);
                    }
                    if let Some(message) = info.error_detail.and_then(|d| d.message) {
                        return Err(failed(with_tail(&message, &tail)));
                    }
                }
                Err(BollardError::DockerStreamError { error }) => {
                    return Err(failed(with_tail(&error, &tail)))
                }
                Err(BollardError::DockerResponseServerError { message, .. }) => {
                    return Err(failed(with_tail(&message, &tail)))
                }
                // bollard#560: a spurious framing error after the last message.
                Err(e) if built_id.is_some() && e.to_string().contains("bytes remaining") => {
                    debug!(image, error = %e, "Ignoring a framing error after the build finished.");
                    break;
                }
                Err(other) => {
                    return Err(match RuntimeError::from(other) {
                        RuntimeError::Unreachable(m) => RuntimeError::Unreachable(m),
                        e => failed(with_tail(&e.to_string(), &tail)),
                    })
                }
            }
        }
        let new = self.image_state(image).await?;
        let new = match new {
            Some(n) if n.build_hash.as_deref() == Some(hash.as_str()) => n,
            _ => {
                return Err(failed(with_tail(
                    "the build ended without error, but the tagged image does not carry the new build hash",
                    &tail,
                )))
            }
        };
        // The superseded image of an earlier build is now untagged: remove it (this fails,
        // harmlessly, while a container still uses it).
        if let Some(old) = old.filter(|o| o.managed && o.id != new.id && !o.id.is_empty()) {
            let opts = RemoveImageOptionsBuilder::default().force(false).build();
            match self.docker.remove_image(&old.id, Some(opts), None).await {
                Ok(_) => debug!(image, old = %old.id, "Removed the superseded image."),
                Err(error) => {
                    debug!(image, old = %old.id, error = %error, "Kept the superseded image.")
                }
            }
        }
        Ok(ImageOutcome::Built(new.id))
    }
}

/// What [`DockerRuntime`] needs to know about a local image.
#[derive(Debug, Clone)]
struct ImageState {
    id: String,
    build_hash: Option<String>,
    managed: bool,
}

/// `repo[:tag]` or `repo@digest` → (repo, tag or digest); the tag defaults to `latest`. A `:`
/// before the last `/` belongs to a registry's port.
pub fn split_reference(r: &str) -> (&str, &str) {
    if let Some((repo, digest)) = r.split_once('@') {
        return (repo, digest);
    }
    let name_start = r.rfind('/').map_or(0, |i| i + 1);
    match r[name_start..].rfind(':') {
        Some(i) => (&r[..name_start + i], &r[name_start + i + 1..]),
        None => (r, "latest"),
    }
}

/// Mounts the volume `to` where `body` mounts the volume `from` (as is: an existing volume is
/// not relabelled).
fn use_volume(body: &mut ContainerCreateBody, from: &str, to: &str) {
    let mounts = body.host_config.as_mut().and_then(|h| h.mounts.as_mut());
    for m in mounts.into_iter().flatten() {
        if m.typ == Some(MountType::VOLUME) && m.source.as_deref() == Some(from) {
            m.source = Some(to.to_owned());
            m.volume_options = None;
        }
    }
}

/// The hash in a downloaded tools marker (a tar archive of the one file).
fn marker_hash(tar: &[u8]) -> Option<String> {
    use std::io::Read;
    let mut ar = tar::Archive::new(tar);
    let mut e = ar.entries().ok()?.next()?.ok()?;
    let mut s = String::new();
    e.read_to_string(&mut s).ok()?;
    Some(s.trim().to_owned())
}

/// The build context as the tar archive the engine expects (GNU headers, so long paths work).
pub fn context_tar(entries: &[labvisor_protocol::config::ContextEntry]) -> Result<Vec<u8>, String> {
    use labvisor_protocol::config::EntryKind;
    let mut b = tar::Builder::new(Vec::new());
    let err = |p: &str, e: std::io::Error| format!("cannot pack {p:?} into the build context: {e}");
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(e.mode);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        match &e.kind {
            EntryKind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, format!("{}/", e.path), std::io::empty())
                    .map_err(|x| err(&e.path, x))?;
            }
            EntryKind::File(content) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(content.len() as u64);
                b.append_data(&mut h, &e.path, &content[..])
                    .map_err(|x| err(&e.path, x))?;
            }
            EntryKind::Symlink(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, &e.path, target)
                    .map_err(|x| err(&e.path, x))?;
            }
        }
    }
    b.into_inner().map_err(|x| err("", x))
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
        let mut body = spec.body.clone();
        let mut volume = spec.volume.name.as_str();
        if self.legacy_volume_is_ours(&spec.legacy_volume).await? {
            use_volume(&mut body, &spec.volume.name, &spec.legacy_volume.name);
            volume = spec.legacy_volume.name.as_str();
        }
        let opts = CreateContainerOptionsBuilder::default()
            .name(&spec.name)
            .build();
        // The create makes the SUT's volume when it is the first: a create that fails removes
        // the volume it made (a volume that was there before, with its spool, logs and job
        // state, is kept).
        let volume_made = !self.volume_exists(volume).await?;
        let id = match self.docker.create_container(Some(opts), body).await {
            Ok(r) => r.id,
            Err(e) => {
                // The image (or network) may have gone: look again on the retry.
                *self.known() = Known::default();
                if volume_made {
                    self.remove_made_volume(volume).await;
                }
                return Err(e.into());
            }
        };
        // The binaries are needed at start, not at create: the first containers are created
        // while the tools volume is filled (the create makes the volume, labelled, when it is
        // the first).
        let ready = match self.ensure_tools(&spec.tools).await {
            Ok(()) => self.finish(&id, spec).await,
            Err(e) => Err(e),
        };
        if let Err(e) = ready {
            // Never leave a half-made container; if this fails too, the next pass sees it
            // `created` and recreates it.
            let _ = self.remove(&id).await;
            if volume_made {
                self.remove_made_volume(volume).await;
            }
            // The engine checks the network only at start.
            *self.known() = Known::default();
            return Err(e);
        }
        Ok(id)
    }

    async fn ensure_image(
        &self,
        spec: &ImageSpec,
        progress: &Progress,
    ) -> Result<ImageOutcome, RuntimeError> {
        if spec.build.is_none() && self.known().images.contains(&spec.image) {
            return Ok(ImageOutcome::Present);
        }
        let current = self.image_state(&spec.image).await?;
        match &spec.build {
            None if current.is_some() => {
                self.known().images.insert(spec.image.clone());
                Ok(ImageOutcome::Present)
            }
            None => {
                self.pull(&spec.image, progress).await?;
                Ok(ImageOutcome::Pulled)
            }
            Some(b) if current.as_ref().and_then(|c| c.build_hash.as_deref()) == Some(&b.hash) => {
                Ok(ImageOutcome::Present)
            }
            Some(b) => self.build(&spec.image, b, current, progress).await,
        }
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
            Ok(()) => {}
            Err(e) => match RuntimeError::from(e) {
                RuntimeError::NotFound(_) => {}
                other => return Err(other),
            },
        }
        // That may have been the last user of an older tools volume (an agent made by an
        // earlier supervisor version).
        let current = self
            .current_tools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(keep) = current {
            self.remove_old_tools(&keep).await;
        }
        self.remove_old_networks().await;
        Ok(())
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

    async fn remove_legacy_volume(&self, legacy: &Named) -> Result<(), RuntimeError> {
        if self.legacy_volume_is_ours(legacy).await? {
            self.remove_volume(&legacy.name).await?;
            if let Some(v) = self.legacy_volumes.lock().await.as_mut() {
                v.remove(&legacy.name);
            }
        }
        Ok(())
    }

    async fn agent_busy(&self, id: &str) -> Result<bool, RuntimeError> {
        let exec = self
            .docker
            .create_exec(
                id,
                bollard::exec::CreateExecOptions {
                    cmd: Some(vec![HEALTHCHECK_PATH, "--state"]),
                    attach_stdout: Some(true),
                    attach_stderr: Some(false),
                    ..Default::default()
                },
            )
            .await?;
        let mut out = String::new();
        if let bollard::exec::StartExecResults::Attached { mut output, .. } =
            self.docker.start_exec(&exec.id, None).await?
        {
            while let Some(chunk) = output.next().await {
                out.push_str(&String::from_utf8_lossy(&chunk?.into_bytes()));
                if out.len() > 4096 {
                    break;
                }
            }
        }
        let code = self.docker.inspect_exec(&exec.id).await?.exit_code;
        busy_from_state_probe(code, &out)
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
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references_split_into_repo_and_tag() {
        assert_eq!(split_reference("busybox"), ("busybox", "latest"));
    }

    #[test]
    fn state_probe_answers() {
        assert!(busy_from_state_probe(Some(0), "state=busy\n").unwrap());
        assert!(!busy_from_state_probe(Some(0), "state=idle\n").unwrap());
        // Unhealthy (a stale heartbeat): no job worth waiting for.
        assert!(!busy_from_state_probe(Some(1), "unhealthy: heartbeat is 40.0s old").unwrap());
        // A healthcheck older than --state, or no exit code: cannot tell.
        assert!(busy_from_state_probe(Some(2), "unknown argument \"--state\"").is_err());
        assert!(busy_from_state_probe(Some(0), "ok: busy, heartbeat 1.0s old").is_err());
        assert!(busy_from_state_probe(None, "").is_err());
        assert_eq!(
            split_reference("labvisor/busybox:local"),
            ("labvisor/busybox", "local")
        );
        assert_eq!(
            split_reference("no-such-registry.invalid/nothing:1"),
            ("no-such-registry.invalid/nothing", "1")
        );
        assert_eq!(
            split_reference("localhost:5000/x/y"),
            ("localhost:5000/x/y", "latest")
        );
        assert_eq!(
            split_reference("localhost:5000/y:2"),
            ("localhost:5000/y", "2")
        );
        assert_eq!(split_reference("a/b@sha256:abc"), ("a/b", "sha256:abc"));
    }

    #[test]
    fn context_tar_holds_dirs_files_and_links() {
        use labvisor_protocol::config::{ContextEntry, EntryKind};
        let long = format!("d/{}", "x".repeat(200));
        let entries = vec![
            ContextEntry {
                path: "Dockerfile".into(),
                mode: 0o644,
                kind: EntryKind::File(b"FROM scratch".to_vec()),
            },
            ContextEntry {
                path: "d".into(),
                mode: 0o755,
                kind: EntryKind::Dir,
            },
            ContextEntry {
                path: long.clone(),
                mode: 0o755,
                kind: EntryKind::File(b"#!".to_vec()),
            },
            ContextEntry {
                path: "l".into(),
                mode: 0,
                kind: EntryKind::Symlink("/etc/passwd".into()),
            },
        ];
        let tar = context_tar(&entries).unwrap();
        let mut ar = tar::Archive::new(&tar[..]);
        let mut seen = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().display().to_string();
            let kind = e.header().entry_type();
            let mode = e.header().mode().unwrap();
            let link = e.link_name().unwrap().map(|l| l.display().to_string());
            let mut content = String::new();
            std::io::Read::read_to_string(&mut e, &mut content).unwrap();
            seen.push((path, kind, mode, link, content));
        }
        assert_eq!(seen.len(), 4);
        assert_eq!(seen[0].0, "Dockerfile");
        assert_eq!(seen[0].4, "FROM scratch");
        assert_eq!(seen[1].1, tar::EntryType::Directory);
        assert_eq!(seen[2].0, long);
        assert_eq!(seen[2].2, 0o755);
        assert_eq!(seen[3].1, tar::EntryType::Symlink);
        assert_eq!(seen[3].3.as_deref(), Some("/etc/passwd"));
    }

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
