//! The device process's own work: what `device.busy_glob` matches, and the drain request the
//! supervisor leaves for the agent.
//!
//! **Seeing the work.** A device such as testflinger's agent takes jobs from its own server;
//! labvisor did not start them, but a recreation must wait for them as for its own. While any
//! `busy_glob` matches (testflinger: `<execution_basedir>/*/testflinger.json`, which exists from
//! the start of a job until its outcome is uploaded), the agent is `busy` and says what it saw in
//! `device_work`. The agent's loop rescans the globs every [`POLL`] and reports at once when the
//! answer changes, so the heartbeat that `labvisor-healthcheck --state` reads lags a new job by
//! at most [`POLL`]. A rescan, not inotify: the directory a glob lives in (testflinger's
//! `run/`) may not exist until the first job, so an inotify watch would need this rescan as a
//! fallback anyway (as `tail` has); a glob over one directory every 250 ms costs microseconds,
//! and bounds the lag just as well for work that lasts minutes.
//!
//! **Draining.** `labvisor-agent drain` (run by the supervisor through `docker exec` when a
//! recreation or removal waits for the device's work) leaves a request file beside the
//! heartbeat file ([`request_path`]); `labvisor-agent drain --lift` removes it. The loop sees
//! it on the same rescan: with `device.drain_signal` set, it drains the device process (the
//! signal once, no restart after it exits) and, when the request is gone, releases it. While
//! the request is there (with a drain signal or without) no queued labvisor job starts: they
//! stay in the journal on the volume, and the new container runs them. Through
//! the container, not MQTT: it works while the broker is down, as the busy probe does, and the
//! request lives in the tmpfs `/labvisor/run`, so it never outlives the container's run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use labvisor_protocol::config::{BusyGlob, DeviceSettings, DrainSignal};

/// How often the globs and the drain request are looked at.
pub const POLL: Duration = Duration::from_millis(250);

/// The name of the drain request file, beside the heartbeat file.
pub const REQUEST_FILE: &str = "drain";

/// The SUT's `busy_glob` patterns.
#[derive(Debug, Clone)]
pub struct DeviceWork {
    patterns: Vec<String>,
}

impl DeviceWork {
    /// The globs to watch; `None` when there are none.
    pub fn new(globs: &[BusyGlob]) -> Option<Self> {
        (!globs.is_empty()).then(|| DeviceWork {
            patterns: globs.iter().map(|g| g.as_str().to_owned()).collect(),
        })
    }

    /// What the globs match now, described ([`describe`]); `None` when nothing matches.
    pub fn scan(&self) -> Option<String> {
        let mut found: Vec<PathBuf> = self
            .patterns
            .iter()
            .filter_map(|p| glob::glob(p).ok())
            .flat_map(|paths| paths.filter_map(Result::ok))
            .collect();
        found.sort();
        found.dedup();
        describe(&found)
    }
}

/// One match is named by its path; several by the first and how many more.
pub fn describe(found: &[PathBuf]) -> Option<String> {
    let first = found.first()?.display();
    Some(match found.len() {
        1 => first.to_string(),
        n => format!("{first} and {} more", n - 1),
    })
}

/// Where the drain request lives for an agent whose heartbeat file is `heartbeat_file`.
pub fn request_path(heartbeat_file: &Path) -> PathBuf {
    heartbeat_file
        .parent()
        .unwrap_or(Path::new("."))
        .join(REQUEST_FILE)
}

/// Leaves (`lift = false`) or removes the drain request at `path`. Removing one that is not
/// there is no error.
pub fn request(path: &Path, lift: bool) -> std::io::Result<()> {
    if lift {
        return match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    labvisor_protocol::heartbeat::write_atomic(path, "drain requested by labvisor\n")
}

/// Whether a drain is requested at `path`.
pub fn requested(path: &Path) -> bool {
    path.exists()
}

/// What one look at the globs and the drain request asks of the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tick {
    /// The device's work (or the drain) changed: report at once.
    pub changed: bool,
    /// Drain the device process with this signal.
    pub drain: Option<DrainSignal>,
    /// Release the device process (the drain request was lifted).
    pub release: bool,
}

/// The loop's view of the device's own work and of the drain request.
#[derive(Debug)]
pub struct Watch {
    work: Option<DeviceWork>,
    request: PathBuf,
    signal: Option<DrainSignal>,
    /// What the globs matched at the last look.
    pub seen: Option<String>,
    /// Whether the device process is being drained.
    pub draining: bool,
    /// Whether a drain is requested (with or without a drain signal).
    pub requested: bool,
}

impl Watch {
    /// A watch for `device` (the SUT's `[device]`), with the drain request beside
    /// `heartbeat_file`. `None` when the section is empty: nothing to look at.
    pub fn new(device: &DeviceSettings, heartbeat_file: &Path) -> Option<Self> {
        (!device.is_empty()).then(|| Watch {
            work: DeviceWork::new(&device.busy_glob),
            request: request_path(heartbeat_file),
            signal: device.drain_signal,
            seen: None,
            draining: false,
            requested: false,
        })
    }

    /// Looks at the globs and the drain request.
    pub fn tick(&mut self) -> Tick {
        let seen = self.work.as_ref().and_then(DeviceWork::scan);
        let mut t = Tick {
            changed: seen != self.seen,
            ..Tick::default()
        };
        self.seen = seen;
        let wanted = requested(&self.request);
        self.requested = wanted;
        let Some(signal) = self.signal else {
            return t;
        };
        if wanted != self.draining {
            self.draining = wanted;
            t.changed = true;
            if wanted {
                t.drain = Some(signal);
            } else {
                t.release = true;
            }
        }
        t
    }

    /// Whether queued labvisor jobs must wait: a drain is requested (the supervisor waits to
    /// recreate or remove the container) or holds the device. They stay queued in the journal;
    /// the new container runs them.
    pub fn holds_jobs(&self) -> bool {
        self.requested || self.draining
    }

    /// Whether the device is busy with its own work or drained: no health check is queued.
    pub fn busy(&self) -> bool {
        self.seen.is_some() || self.holds_jobs()
    }

    /// The status detail while draining.
    pub fn detail(&self) -> Option<String> {
        let sig = self.signal.filter(|_| self.draining)?;
        Some(format!(
            "draining: {sig} sent to the device process, which is not restarted after it exits"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn globs(dir: &Path, pats: &[&str]) -> DeviceWork {
        let g: Vec<BusyGlob> = pats
            .iter()
            .map(|p| BusyGlob::new(&format!("{}/{p}", dir.display())).unwrap())
            .collect();
        DeviceWork::new(&g).unwrap()
    }

    #[test]
    fn no_globs_no_watcher() {
        assert!(DeviceWork::new(&[]).is_none());
    }

    /// testflinger's rundir: nothing before the first job (not even the directory), the job's
    /// `testflinger.json` while it runs, nothing once it is uploaded; two at once are counted.
    #[test]
    fn matches_mean_work_and_are_described() {
        let d = tempfile::tempdir().unwrap();
        let w = globs(d.path(), &["run/*/testflinger.json"]);
        assert_eq!(w.scan(), None, "no run directory yet");
        let run = d.path().join("run");
        std::fs::create_dir_all(run.join("j1")).unwrap();
        assert_eq!(w.scan(), None, "a job directory without its job file");
        std::fs::write(run.join("j1/testflinger.json"), "{}").unwrap();
        std::fs::write(run.join("j1/test.log"), "").unwrap();
        let one = run.join("j1/testflinger.json").display().to_string();
        assert_eq!(w.scan(), Some(one.clone()));
        std::fs::create_dir_all(run.join("j2")).unwrap();
        std::fs::write(run.join("j2/testflinger.json"), "{}").unwrap();
        assert_eq!(w.scan(), Some(format!("{one} and 1 more")));
        std::fs::remove_dir_all(run.join("j1")).unwrap();
        std::fs::remove_dir_all(run.join("j2")).unwrap();
        assert_eq!(w.scan(), None, "uploaded: the directory is gone");
    }

    /// Two globs matching the same file count it once.
    #[test]
    fn overlapping_globs_count_a_file_once() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("busy"), "").unwrap();
        let w = globs(d.path(), &["busy", "bu*"]);
        assert_eq!(w.scan(), Some(d.path().join("busy").display().to_string()));
    }

    #[test]
    fn a_drain_request_is_left_beside_the_heartbeat_and_lifted() {
        let d = tempfile::tempdir().unwrap();
        let path = request_path(&d.path().join("heartbeat"));
        assert_eq!(path, d.path().join("drain"));
        assert!(!requested(&path));
        request(&path, false).unwrap();
        request(&path, false).unwrap();
        assert!(requested(&path));
        request(&path, true).unwrap();
        assert!(!requested(&path));
        request(&path, true).unwrap();
    }

    /// A drain is asked once when the request appears and released once when it goes; without
    /// a drain signal the request is ignored.
    #[test]
    fn the_watch_drains_and_releases_on_the_request() {
        let d = tempfile::tempdir().unwrap();
        let hb = d.path().join("heartbeat");
        let glob = BusyGlob::new(&format!("{}/busy*", d.path().display())).unwrap();
        let mut settings = DeviceSettings {
            busy_glob: vec![glob],
            drain_signal: Some(DrainSignal::Usr1),
        };
        let mut w = Watch::new(&settings, &hb).unwrap();
        assert_eq!(w.tick(), Tick::default());
        std::fs::write(d.path().join("busy1"), "").unwrap();
        assert!(w.tick().changed);
        assert_eq!(w.tick(), Tick::default(), "unchanged");
        request(&request_path(&hb), false).unwrap();
        assert!(w.busy() && !w.holds_jobs(), "busy with its own work");
        let t = w.tick();
        assert_eq!((t.drain, t.release), (Some(DrainSignal::Usr1), false));
        assert!(w.holds_jobs() && w.busy());
        assert!(w.detail().unwrap().contains("SIGUSR1"));
        assert_eq!(w.tick(), Tick::default(), "asked once");
        request(&request_path(&hb), true).unwrap();
        let t = w.tick();
        assert_eq!((t.drain, t.release), (None, true));
        assert_eq!(w.detail(), None);
        assert!(!w.holds_jobs(), "lifted");

        settings.drain_signal = None;
        let mut w = Watch::new(&settings, &hb).unwrap();
        request(&request_path(&hb), false).unwrap();
        let t = w.tick();
        assert_eq!((t.drain, t.release), (None, false));
        assert!(
            w.holds_jobs(),
            "queued jobs wait for the recreation all the same"
        );
        assert!(Watch::new(&DeviceSettings::default(), &hb).is_none());
    }
}
