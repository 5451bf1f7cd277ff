//! The tools volume: the static agent and healthcheck binaries every agent container mounts
//! read-only. Filled once per volume and process through a helper container that is never
//! started; older tools volumes of this supervisor are removed once no container uses them.

use std::collections::HashMap;

use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType, VolumeCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, DownloadFromContainerOptionsBuilder, ListVolumesOptionsBuilder,
    UploadToContainerOptionsBuilder,
};
use futures_util::StreamExt;
use tracing::debug;

use super::DockerRuntime;
use crate::runtime::{ContainerRuntime, RuntimeError};
use crate::spec::{
    Named, ToolsVolume, AGENT_PATH, LABEL_ROLE, ROLE_TOOLS, TOOLS_DIR, TOOLS_MARKER,
};

impl DockerRuntime {
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
    pub(super) async fn ensure_tools(&self, t: &ToolsVolume) -> Result<(), RuntimeError> {
        let mut ready = self.tools_ready.lock().await;
        if ready.contains(&t.volume.name) {
            return Ok(());
        }
        self.ensure_volume(&t.volume).await?;
        // A helper left by a supervisor killed mid-fill.
        self.remove(&t.helper_name).await?;
        let body = ContainerCreateBody {
            image: Some(t.helper_image.clone()),
            entrypoint: Some(vec![AGENT_PATH.into()]),
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
    pub(super) async fn remove_old_tools(&self, keep: &str) {
        let role = format!("{LABEL_ROLE}={ROLE_TOOLS}");
        let filters = HashMap::from([("label".to_owned(), self.own_labels(&[&role]))]);
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
