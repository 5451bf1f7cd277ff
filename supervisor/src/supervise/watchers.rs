//! The watchers: what wakes the loop up besides its timers and the broker.
//!
//! - [`DirWatch`]: notify on the SUT directory (non-recursive; editors save by rename), or
//!   notify's `PollWatcher` with `--poll`, plus the build contexts of valid SUTs (recursive).
//!   The callback only `try_send`s into a channel of one; the loop debounces. Each pass calls
//!   [`DirWatch::ensure`], which re-adds the watch when the directory was replaced or
//!   reappeared. When the caller feeds file events itself ([`super::Hooks::file_events`]),
//!   nothing is watched.
//! - [`docker_events`]: the runtime's event stream, filtered by [`HealthSeen`], reopened with
//!   backoff when the engine goes away; every reopening triggers a pass.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use labvisor_protocol::config::Scan;
use labvisor_protocol::SutName;
use notify::Watcher;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::DOCKER_RETRY_MAX;
use crate::plan::classify::HealthSeen;
use crate::plan::policy::{Backoff, RETRY_MIN};
use crate::runtime::{ContainerRuntime, RuntimeEvent};

/// The watch on the SUT directory and the build contexts.
pub(super) struct DirWatch {
    dir: PathBuf,
    /// `--poll`: poll at this interval instead of inotify.
    poll: Option<Duration>,
    /// The periodic resync (named in the warning when watching fails).
    resync: Duration,
    /// Where change notices go; `None`: the caller feeds them, nothing is watched.
    tx: Option<mpsc::Sender<()>>,
    /// The watcher and the inode of the directory it watches.
    watcher: Option<(Box<dyn Watcher + Send>, Option<u64>)>,
    /// The last attempt to watch the directory failed (and was logged).
    failed: bool,
    /// Build contexts (`[build]`) watched recursively with the directory's watcher.
    contexts: BTreeSet<PathBuf>,
}

impl DirWatch {
    /// A watch of `dir` sending notices to `tx` (`None`: none, the caller feeds them).
    pub fn new(
        dir: PathBuf,
        poll: Option<Duration>,
        resync: Duration,
        tx: Option<mpsc::Sender<()>>,
    ) -> Self {
        Self {
            dir,
            poll,
            resync,
            tx,
            watcher: None,
            failed: false,
            contexts: BTreeSet::new(),
        }
    }

    /// Watches the directory unless it is watched already (same inode); said once when it
    /// cannot be watched, until it can.
    pub fn ensure(&mut self) {
        let Some(tx) = self.tx.clone() else {
            return;
        };
        let ino = std::fs::metadata(&self.dir).ok().map(|m| m.ino());
        if let Some((_, watched)) = &self.watcher {
            if *watched == ino && ino.is_some() {
                return;
            }
        }
        self.watcher = None;
        self.contexts.clear();
        if ino.is_none() {
            return;
        }
        match self.watcher(tx).and_then(|mut w| {
            w.watch(&self.dir, notify::RecursiveMode::NonRecursive)
                .map(|()| w)
        }) {
            Ok(w) => {
                debug!(dir = %self.dir.display(), "Watching the SUT directory.");
                self.watcher = Some((w, ino));
                self.failed = false;
            }
            Err(error) => {
                // Retried on every pass; said once until it works again.
                if !self.failed {
                    warn!(dir = %self.dir.display(), error = %error, resync = ?self.resync,
                        "Cannot watch the SUT directory (inotify limit reached? see /proc/sys/fs/inotify/max_user_instances); relying on the periodic resync. --poll watches without inotify.");
                } else {
                    debug!(dir = %self.dir.display(), error = %error, "Still cannot watch the SUT directory.");
                }
                self.failed = true;
            }
        }
    }

    fn watcher(&self, tx: mpsc::Sender<()>) -> notify::Result<Box<dyn Watcher + Send>> {
        let handler = move |res: notify::Result<notify::Event>| {
            // Reading the files (our own scans) produces access events: not a change.
            if let Ok(ev) = &res {
                if matches!(ev.kind, notify::EventKind::Access(_)) {
                    return;
                }
            }
            let _ = tx.try_send(());
        };
        match self.poll {
            Some(every) => notify::PollWatcher::new(
                handler,
                notify::Config::default()
                    .with_poll_interval(every)
                    .with_compare_contents(true),
            )
            .map(|w| Box::new(w) as Box<dyn Watcher + Send>),
            None => {
                notify::recommended_watcher(handler).map(|w| Box::new(w) as Box<dyn Watcher + Send>)
            }
        }
    }

    /// Watches the build contexts of valid SUTs recursively (they live in subdirectories the
    /// directory watch does not see), so a changed context rebuilds without waiting for the
    /// resync.
    pub fn watch_contexts(&mut self, scan: &Scan) {
        let Some((w, _)) = &mut self.watcher else {
            return;
        };
        let wanted: BTreeSet<PathBuf> = scan
            .valid
            .values()
            .filter_map(|c| c.build.as_ref().map(|b| b.context_dir.clone()))
            .collect();
        for gone in self.contexts.difference(&wanted) {
            let _ = w.unwatch(gone);
        }
        self.contexts.retain(|c| wanted.contains(c));
        for dir in wanted {
            if self.contexts.contains(&dir) {
                continue;
            }
            match w.watch(&dir, notify::RecursiveMode::Recursive) {
                Ok(()) => {
                    debug!(dir = %dir.display(), "Watching a build context.");
                    self.contexts.insert(dir);
                }
                Err(error) => {
                    warn!(dir = %dir.display(), error = %error, "Cannot watch a build context; relying on the periodic resync.");
                }
            }
        }
    }
}

/// Forwards Docker events as wake-ups, and each start or unpause of a SUT's container (its SUT
/// and id, [`run_began`]) to `starts` (the hang rule counts a container's silence from its
/// start); reopens the stream
/// with backoff (1 s doubling to 30 s) when it ends.
pub(super) async fn docker_events<R: ContainerRuntime>(
    runtime: Arc<R>,
    tx: mpsc::Sender<()>,
    starts: mpsc::UnboundedSender<(SutName, String)>,
) {
    let mut backoff = Backoff::new(RETRY_MIN, DOCKER_RETRY_MAX);
    loop {
        let mut stream = runtime.events();
        let mut health = HealthSeen::default();
        // Whatever happened while the stream was down is caught by the pass this triggers.
        let _ = tx.try_send(());
        while let Some(item) = stream.next().await {
            match item {
                Ok(ev) => {
                    backoff.reset();
                    debug!(container = %ev.id, sut = ?ev.sut, event = %ev.action, "Docker event.");
                    if let Some(run) = run_began(&ev) {
                        let _ = starts.send(run);
                    }
                    if health.worth_a_pass(&ev) {
                        let _ = tx.try_send(());
                    }
                }
                Err(error) => {
                    debug!(error = %error, "Docker event stream failed.");
                    break;
                }
            }
        }
        let delay = backoff.next_delay();
        debug!(delay = ?delay, "Docker event stream ended; reopening.");
        tokio::time::sleep(delay).await;
    }
}

/// The SUT and container whose run `ev` begins: a `start`, or an `unpause` (a frozen agent
/// wrote no heartbeat while paused, so its silence counts from the thaw, as from a start).
fn run_began(ev: &RuntimeEvent) -> Option<(SutName, String)> {
    if !matches!(ev.action.as_str(), "start" | "unpause") {
        return None;
    }
    let sut = SutName::new(ev.sut.as_deref()?).ok()?;
    Some((sut, ev.id.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(action: &str, sut: Option<&str>) -> RuntimeEvent {
        RuntimeEvent {
            id: "c1".into(),
            action: action.into(),
            sut: sut.map(Into::into),
        }
    }

    #[test]
    fn a_start_or_an_unpause_begins_a_run() {
        let a = SutName::new("a").unwrap();
        for action in ["start", "unpause"] {
            assert_eq!(
                run_began(&event(action, Some("a"))),
                Some((a.clone(), "c1".into())),
                "{action}"
            );
        }
        for action in ["pause", "die", "health_status: healthy", "destroy"] {
            assert_eq!(run_began(&event(action, Some("a"))), None, "{action}");
        }
        assert_eq!(run_began(&event("start", None)), None, "not a SUT's");
        assert_eq!(run_began(&event("start", Some("Not A Name!"))), None);
    }
}
