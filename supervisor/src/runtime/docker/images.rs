//! The SUT's image before its container is created: used as is when present locally; with
//! `[build]`, built (classic builder) when absent or when its build-hash label differs; else
//! pulled. Build and pull output streams to a [`Progress`] line by line.

use std::collections::{HashMap, VecDeque};

use bollard::errors::Error as BollardError;
use bollard::query_parameters::{
    BuildImageOptionsBuilder, CreateImageOptionsBuilder, RemoveImageOptionsBuilder,
};
use futures_util::StreamExt;
use labvisor_protocol::config::{
    build_hash, context_hash, read_context, ContextEntry, EntryKind, MAX_CONTEXT_SIZE,
};
use tracing::debug;

use super::{found, DockerRuntime};
use crate::runtime::{ImageOutcome, Progress, RuntimeError};
use crate::spec::{BuildSpec, ImageSpec, LABEL_BUILD_HASH, LABEL_MANAGED_BY, MANAGED_BY};

/// Lines of build output kept for the error message of a failed build.
const BUILD_ERROR_TAIL: usize = 12;

/// What [`DockerRuntime`] needs to know about a local image.
#[derive(Debug, Clone)]
struct ImageState {
    id: String,
    build_hash: Option<String>,
    managed: bool,
}

/// Why the build context cannot be sent.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// The context directory cannot be read (or is too large).
    #[error("the build context {dir} {reason}")]
    Read {
        /// The context directory.
        dir: String,
        /// Why.
        reason: String,
    },
    /// An entry does not fit the tar archive.
    #[error("cannot pack {path:?} into the build context: {source}")]
    Pack {
        /// The entry's path in the context.
        path: String,
        /// The archive writer's error.
        source: std::io::Error,
    },
    /// The blocking task reading the context panicked.
    #[error("reading the build context panicked: {0}")]
    Panicked(#[from] tokio::task::JoinError),
}

impl DockerRuntime {
    /// [`ContainerRuntime::ensure_image`](crate::runtime::ContainerRuntime::ensure_image) on
    /// Docker: a pulled image seen present once is not inspected again.
    pub(super) async fn make_sure_of_image(
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

    /// The image's build-hash and managed-by labels and its id; `None` when it is absent.
    async fn image_state(&self, image: &str) -> Result<Option<ImageState>, RuntimeError> {
        Ok(found(self.docker.inspect_image(image).await)?.map(|i| {
            let labels = i.config.and_then(|c| c.labels).unwrap_or_default();
            ImageState {
                id: i.id.unwrap_or_default(),
                build_hash: labels.get(LABEL_BUILD_HASH).cloned(),
                managed: labels.get(LABEL_MANAGED_BY).map(String::as_str) == Some(MANAGED_BY),
            }
        }))
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
            let info = item.map_err(|e| stream_error(e, unavailable))?;
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
        match self.image_state(image).await? {
            Some(_) => Ok(()),
            None => Err(unavailable(
                "the pull ended without error, but the image is still missing".into(),
            )),
        }
    }

    /// Builds `image` from `build` unless `old` already carries the hash of the context as it
    /// is now; then removes the superseded image of an earlier build.
    async fn build(
        &self,
        image: &str,
        build: &BuildSpec,
        old: Option<ImageState>,
        progress: &Progress,
    ) -> Result<ImageOutcome, RuntimeError> {
        let failed = |message: String| RuntimeError::BuildFailed {
            image: image.to_owned(),
            message,
        };
        // Read and pack the context as it is now; the label says what was actually sent.
        let (context_hash, tar) = pack_context(build.context_dir.clone())
            .await
            .map_err(|e| failed(e.to_string()))?;
        let hash = build_hash(&context_hash, &build.dockerfile, &build.args);
        if old.as_ref().and_then(|o| o.build_hash.as_deref()) == Some(hash.as_str()) {
            return Ok(ImageOutcome::Present);
        }
        let tail = self.run_build(image, build, &hash, tar, progress).await?;
        let new = match self.image_state(image).await? {
            Some(n) if n.build_hash.as_deref() == Some(hash.as_str()) => n,
            _ => {
                return Err(failed(tail.with(
                    "the build ended without error, but the tagged image does not carry the new build hash",
                )))
            }
        };
        if let Some(old) = old.filter(|o| o.managed && o.id != new.id && !o.id.is_empty()) {
            self.remove_superseded(image, &old.id).await;
        }
        Ok(ImageOutcome::Built(new.id))
    }

    /// Sends the context `tar` to the engine's build of `image` labelled with `hash`, streaming
    /// its output to `progress`; the last lines of output, for an error message.
    async fn run_build(
        &self,
        image: &str,
        build: &BuildSpec,
        hash: &str,
        tar: Vec<u8>,
        progress: &Progress,
    ) -> Result<Tail, RuntimeError> {
        let mut labels = build.labels.clone();
        labels.insert(LABEL_BUILD_HASH.into(), hash.to_owned());
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
        let mut tail = Tail::default();
        let mut built_id: Option<String> = None;
        let failed = |message: String| RuntimeError::BuildFailed {
            image: image.to_owned(),
            message,
        };
        while let Some(item) = stream.next().await {
            let info = match item {
                Ok(info) => info,
                Err(
                    e @ (BollardError::DockerStreamError { .. }
                    | BollardError::DockerResponseServerError { .. }),
                ) => return Err(stream_error(e, |m| failed(tail.with(&m)))),
                // bollard#560: a spurious framing error after the last message.
                Err(e) if built_id.is_some() && e.to_string().contains("bytes remaining") => {
                    debug!(image, error = %e, "Ignoring a framing error after the build finished.");
                    break;
                }
                Err(e) => return Err(stream_error(e, |m| failed(tail.with(&m)))),
            };
            for text in [info.stream, info.status].into_iter().flatten() {
                tail.record(&text, progress);
            }
            if let Some(id) = info.aux.and_then(|a| a.id) {
                built_id = Some(id);
            }
            if let Some(message) = info.error_detail.and_then(|d| d.message) {
                return Err(failed(tail.with(&message)));
            }
        }
        Ok(tail)
    }

    /// Removes the superseded image of an earlier build, now untagged (this fails, harmlessly,
    /// while a container still uses it).
    async fn remove_superseded(&self, image: &str, old: &str) {
        let opts = RemoveImageOptionsBuilder::default().force(false).build();
        match self.docker.remove_image(old, Some(opts), None).await {
            Ok(_) => debug!(image, old = %old, "Removed the superseded image."),
            Err(error) => {
                debug!(image, old = %old, error = %error, "Kept the superseded image.")
            }
        }
    }
}

/// The error of a pull or build stream: the engine's message through `fail`, unless the engine
/// could not be reached.
fn stream_error(e: BollardError, fail: impl FnOnce(String) -> RuntimeError) -> RuntimeError {
    match e {
        BollardError::DockerResponseServerError { message, .. } => fail(message),
        BollardError::DockerStreamError { error } => fail(error),
        other => match RuntimeError::from(other) {
            RuntimeError::Unreachable(m) => RuntimeError::Unreachable(m),
            e => fail(e.to_string()),
        },
    }
}

/// The last [`BUILD_ERROR_TAIL`] lines of build output.
#[derive(Debug, Default)]
struct Tail(VecDeque<String>);

impl Tail {
    /// Passes each non-empty line of `text` to `progress` and keeps it.
    fn record(&mut self, text: &str, progress: &Progress) {
        for line in text.lines() {
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            progress(line);
            if self.0.len() == BUILD_ERROR_TAIL {
                self.0.pop_front();
            }
            self.0.push_back(line.to_owned());
        }
    }

    /// `message`, followed by the kept lines when there are any.
    fn with(&self, message: &str) -> String {
        if self.0.is_empty() {
            message.trim().to_owned()
        } else {
            let lines: Vec<&str> = self.0.iter().map(String::as_str).collect();
            format!("{}; last output: {}", message.trim(), lines.join(" | "))
        }
    }
}

/// Reads the context directory (off the async threads) and packs it: its hash and its tar.
async fn pack_context(dir: std::path::PathBuf) -> Result<(String, Vec<u8>), ContextError> {
    tokio::task::spawn_blocking(move || {
        let entries = read_context(&dir, MAX_CONTEXT_SIZE).map_err(|e| ContextError::Read {
            dir: dir.display().to_string(),
            reason: e.to_string(),
        })?;
        let tar = context_tar(&entries)?;
        Ok((context_hash(&entries), tar))
    })
    .await?
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

/// The build context as the tar archive the engine expects (GNU headers, so long paths work).
pub fn context_tar(entries: &[ContextEntry]) -> Result<Vec<u8>, ContextError> {
    let mut b = tar::Builder::new(Vec::new());
    let err = |p: &str, source: std::io::Error| ContextError::Pack {
        path: p.to_owned(),
        source,
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references_split_into_repo_and_tag() {
        assert_eq!(split_reference("busybox"), ("busybox", "latest"));
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
}
