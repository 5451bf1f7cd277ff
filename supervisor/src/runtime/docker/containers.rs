//! The container operations of [`ContainerRuntime`] on Docker: list, create (with the SUT's
//! volume, the network and the tools volume made sure of), start, stop, restart, remove, the
//! exec that asks the agent whether it is busy, and the event stream.

use std::collections::HashMap;
use std::time::Duration;

use bollard::models::{ContainerCreateBody, ContainerSummaryStateEnum, MountType};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, EventsOptionsBuilder, ListContainersOptionsBuilder,
    ListVolumesOptionsBuilder, RemoveContainerOptionsBuilder, RemoveVolumeOptionsBuilder,
    RestartContainerOptionsBuilder, StartContainerOptions, StopContainerOptionsBuilder,
    UploadToContainerOptionsBuilder,
};
use futures_util::StreamExt;
use labvisor_protocol::payloads::{AgentState, Health};
use tracing::{debug, warn};

use super::{found, secs, DockerRuntime, Known};
use crate::plan::RunState;
use crate::runtime::{
    AgentAnswer, ContainerInfo, ContainerRuntime, EventStream, ImageOutcome, Progress,
    RuntimeError, RuntimeEvent,
};
use crate::spec::{
    ContainerSpec, ImageSpec, Named, AGENT_PATH, HEALTHCHECK_PATH, LABEL_MANAGED_BY, LABEL_ROLE,
    LABEL_SUT, MANAGED_BY,
};

impl ContainerRuntime for DockerRuntime {
    async fn ping(&self) -> Result<(), RuntimeError> {
        self.docker.ping().await?;
        Ok(())
    }

    async fn list(&self) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let opts = ListContainersOptionsBuilder::default().all(true).build();
        let list = self.docker.list_containers(Some(opts)).await?;
        let mut out: Vec<ContainerInfo> = list
            .into_iter()
            .filter_map(|c| {
                Some(ContainerInfo {
                    node: None,
                    down: None,
                    id: c.id?,
                    name: c
                        .names
                        .and_then(|n| n.into_iter().next())
                        .map(|n| n.trim_start_matches('/').to_owned())
                        .unwrap_or_default(),
                    labels: c.labels.unwrap_or_default().into_iter().collect(),
                    state: run_state(c.state),
                    health: health_from_status(c.status.as_deref().unwrap_or("")),
                    finished_ms: None,
                    network: c.host_config.and_then(|h| h.network_mode),
                })
            })
            .collect();
        for c in out.iter_mut().filter(|c| {
            c.state == RunState::Exited
                && c.labels.get(LABEL_MANAGED_BY).map(String::as_str) == Some(MANAGED_BY)
        }) {
            c.finished_ms = self.finished_ms(&c.id).await;
        }
        Ok(out)
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
        self.make_sure_of_image(spec, progress).await
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.docker
            .start_container(id, None::<StartContainerOptions>)
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
        found(self.docker.remove_container(id, Some(opts)).await)?;
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
        found(self.docker.remove_volume(name, Some(opts)).await)?;
        Ok(())
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

    async fn agent_busy(&self, id: &str) -> Result<AgentAnswer, RuntimeError> {
        let (code, out) = self.exec(id, vec![HEALTHCHECK_PATH, "--state"]).await?;
        busy_from_state_probe(code, &out)
    }

    async fn agent_drain(&self, id: &str, lift: bool) -> Result<(), RuntimeError> {
        let mut cmd = vec![AGENT_PATH, "drain"];
        if lift {
            cmd.push("--lift");
        }
        match self.exec(id, cmd).await? {
            (Some(0), _) => Ok(()),
            (code, out) => Err(RuntimeError::NoAnswer(format!(
                "labvisor-agent drain said {:?} (exit {code:?})",
                out.trim()
            ))),
        }
    }

    fn events(&self) -> EventStream {
        let mut filters: HashMap<&str, Vec<String>> = HashMap::new();
        filters.insert("type", vec!["container".into()]);
        filters.insert("label", self.own_labels(&[]));
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
                    sut: actor.attributes.and_then(|mut a| a.remove(LABEL_SUT)),
                }
            })
        }))
    }
}

impl DockerRuntime {
    /// Runs `cmd` in the container `id` (docker exec): its exit code and the first 4 KiB or so
    /// of its stdout.
    async fn exec(&self, id: &str, cmd: Vec<&str>) -> Result<(Option<i64>, String), RuntimeError> {
        let exec = self
            .docker
            .create_exec(
                id,
                bollard::exec::CreateExecOptions {
                    cmd: Some(cmd),
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
        Ok((code, out))
    }

    /// Whether the SUT volume of the old naming exists and carries the labels that make it
    /// this supervisor's volume of this SUT (and no role: the old tools volume's name was a
    /// possible SUT volume name). The volumes are listed once per process: labvisor never makes
    /// a volume of the old naming again.
    async fn legacy_volume_is_ours(&self, legacy: &Named) -> Result<bool, RuntimeError> {
        let mut cache = self.legacy_volumes.lock().await;
        if cache.is_none() {
            let filters = HashMap::from([("label".to_owned(), self.own_labels(&[LABEL_SUT]))]);
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

    /// Whether the volume `name` exists.
    async fn volume_exists(&self, name: &str) -> Result<bool, RuntimeError> {
        Ok(found(self.docker.inspect_volume(name).await)?.is_some())
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
            .start_container(id, None::<StartContainerOptions>)
            .await?;
        Ok(())
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

impl DockerRuntime {
    /// When the exited container `id` stopped (its `FinishedAt`), ms since the epoch; `None`
    /// when the inspect fails (it may be gone) or the time does not parse.
    async fn finished_ms(&self, id: &str) -> Option<u64> {
        let inspected = self.docker.inspect_container(id, None).await.ok()?;
        finished_at_ms(inspected.state?.finished_at.as_deref()?)
    }
}

/// Docker's `FinishedAt` (RFC 3339 with nanoseconds, UTC) as ms since the epoch; `None` for
/// Docker's zero time (`0001-01-01T00:00:00Z`, never finished) or anything unparsable.
pub fn finished_at_ms(s: &str) -> Option<u64> {
    let t = humantime::parse_rfc3339(s).ok()?;
    let ms = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis();
    u64::try_from(ms).ok().filter(|ms| *ms > 0)
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

/// Reads `labvisor-healthcheck --state`'s answer: exit 0 with `state=<state>` (busy or not) on
/// its first line, then `device_work=<what>` when the device works on its own and
/// `draining=true` while its device process is drained; exit
/// 1, an unhealthy agent (stale heartbeat: hung or dead), which runs no job worth waiting for
/// (its line, without the `unhealthy: ` prefix, is the answer's `unhealthy`).
/// Anything else, e.g. exit 2 from a healthcheck older than `--state` in a container made by an
/// earlier supervisor version, cannot tell.
pub fn busy_from_state_probe(
    exit_code: Option<i64>,
    stdout: &str,
) -> Result<AgentAnswer, RuntimeError> {
    let out = stdout.trim();
    let mut lines = out.lines();
    let state = lines.next().and_then(|l| l.strip_prefix("state="));
    let rest: Vec<&str> = lines.collect();
    match (exit_code, state) {
        (Some(0), Some(state)) => Ok(AgentAnswer {
            busy: state == AgentState::Busy.as_str(),
            device_work: rest
                .iter()
                .find_map(|l| l.strip_prefix("device_work="))
                .filter(|w| !w.is_empty())
                .map(str::to_owned),
            draining: rest.contains(&"draining=true"),
            unhealthy: None,
        }),
        (Some(1), _) => Ok(AgentAnswer {
            unhealthy: Some(out.strip_prefix("unhealthy: ").unwrap_or(out).to_owned()),
            ..AgentAnswer::default()
        }),
        _ => Err(RuntimeError::NoAnswer(format!(
            "labvisor-healthcheck --state said {out:?} (exit {exit_code:?})"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_at_as_docker_writes_it() {
        assert_eq!(
            finished_at_ms("2026-12-02T10:46:52.014379591Z"),
            Some(1_796_208_412_014)
        );
        assert_eq!(
            finished_at_ms("0001-01-01T00:00:00Z"),
            None,
            "never finished"
        );
        assert_eq!(finished_at_ms("yesterday"), None);
    }

    #[test]
    fn state_probe_answers() {
        let busy = |code, out| busy_from_state_probe(code, out).map(|a| a.busy);
        assert!(busy(Some(0), "state=busy\n").unwrap());
        assert!(!busy(Some(0), "state=idle\n").unwrap());
        // Unhealthy (a stale heartbeat): no job worth waiting for, and the reason.
        assert_eq!(
            busy_from_state_probe(Some(1), "unhealthy: heartbeat is 40.0s old\n").unwrap(),
            AgentAnswer {
                unhealthy: Some("heartbeat is 40.0s old".into()),
                ..AgentAnswer::default()
            }
        );
        // The device's own work comes on a second line.
        assert_eq!(
            busy_from_state_probe(
                Some(0),
                "state=busy\ndevice_work=/tmp/testflinger/run/j1/testflinger.json\n"
            )
            .unwrap(),
            AgentAnswer {
                busy: true,
                device_work: Some("/tmp/testflinger/run/j1/testflinger.json".into()),
                draining: false,
                unhealthy: None,
            }
        );
        // A drain on a third line (also without device work).
        assert_eq!(
            busy_from_state_probe(Some(0), "state=idle\ndraining=true\n").unwrap(),
            AgentAnswer {
                busy: false,
                device_work: None,
                draining: true,
                unhealthy: None,
            }
        );
        // A healthcheck older than --state, or no exit code: cannot tell.
        assert!(busy_from_state_probe(Some(2), "unknown argument \"--state\"").is_err());
        assert!(busy_from_state_probe(Some(0), "ok: busy, heartbeat 1.0s old").is_err());
        assert!(busy_from_state_probe(None, "").is_err());
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
