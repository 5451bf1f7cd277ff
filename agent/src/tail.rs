//! Following the files matched by the SUT's `tail` globs.
//!
//! testflinger-agent writes each phase's output to `<rundir>/<job>/<phase>.log` and deletes the
//! whole directory once the outcome is uploaded, so the files appear and vanish within seconds,
//! sometimes faster than any rescan. So the tail thread does not rely on rescans alone:
//!
//! - An inotify watch (the `notify` crate) on each glob's fixed leading directory (recursive when
//!   the glob spans several levels) opens every matching file **as soon as it is created**, in
//!   the watcher's callback: the open handle keeps the content readable even if the file is
//!   deleted a moment later. Writes to a followed file wake the tail thread at once.
//! - A rescan of the globs every [`POLL`] is the fallback: a directory that did not exist yet
//!   (its watch is added by a later rescan), a file created in a brand-new subdirectory before
//!   the watch on it was in place, or a file system without inotify events.
//!
//! For each matched file:
//!
//! - a file seen at the very first scan is followed from its end (like `tail -f`); a file that
//!   appears later is read from its start;
//! - a file replaced under the same path (rotation: another inode) is read to the end through the
//!   old handle, then followed anew from the start of the new file;
//! - a file that shrank (truncation) is read again from its start;
//! - a file that vanished is read to its end through the handle we hold, then dropped.
//!
//! Every file is a [`Source`] of its own for the output mux, which interleaves whole lines only
//! and marks each switch between sources with a `==> path <==` header (see [`crate::output`]).
//! Unreadable globs are reported through [`TailErrors`] and the agent's status; the agent keeps
//! running.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use notify::{EventKind, RecursiveMode, Watcher};

use crate::output::{Sinks, Source, READ_CHUNK};

/// How often the globs are rescanned (the fallback; inotify events act at once).
pub const POLL: Duration = Duration::from_millis(250);

/// The current problems with the tail globs, shared with the status.
pub type TailErrors = Arc<Mutex<Vec<String>>>;

struct Followed {
    file: File,
    dev: u64,
    ino: u64,
    offset: u64,
}

/// What the watcher's callback tells the tail thread.
enum Seen {
    /// A matching file, opened the moment it appeared.
    Opened(PathBuf, File),
    /// Something changed: read the followed files (and rescan when `rescan`).
    Changed {
        /// A directory appeared, or an event may have been missed.
        rescan: bool,
    },
}

/// Follows the files matched by a set of globs.
pub struct Tailer {
    patterns: Vec<String>,
    files: BTreeMap<PathBuf, Followed>,
    first_scan: bool,
    errors: TailErrors,
    buf: Vec<u8>,
    /// Paths followed, shared with the watcher's callback (which opens only new ones).
    known: Arc<Mutex<HashSet<PathBuf>>>,
    watch: Option<Watch>,
}

/// The inotify side: the watcher, what it watches, and its channel.
struct Watch {
    watcher: notify::RecommendedWatcher,
    /// The directories to watch (one per glob) and whether they are watched yet.
    roots: Vec<(PathBuf, RecursiveMode, bool)>,
    rx: mpsc::Receiver<Seen>,
}

/// The fixed leading directory of an absolute glob and how deep matches can lie below it.
fn watch_root(pattern: &str) -> (PathBuf, RecursiveMode) {
    let wild = |s: &str| s.contains(['*', '?', '[']);
    let path = Path::new(pattern);
    let mut root = PathBuf::new();
    let mut below = 0;
    let mut deep = false;
    for c in path.components() {
        let s = c.as_os_str().to_string_lossy();
        if below > 0 || (matches!(c, Component::Normal(_)) && wild(&s)) {
            below += 1;
            deep |= s.contains("**");
        } else {
            root.push(c.as_os_str());
        }
    }
    if below == 0 {
        // A plain path: watch its directory.
        root.pop();
        below = 1;
    }
    let mode = if below > 1 || deep {
        RecursiveMode::Recursive
    } else {
        RecursiveMode::NonRecursive
    };
    (root, mode)
}

impl Tailer {
    /// A tailer for `patterns` (absolute globs), without inotify (scans only).
    pub fn new(patterns: Vec<String>) -> Self {
        Tailer {
            patterns,
            files: BTreeMap::new(),
            first_scan: true,
            errors: Arc::new(Mutex::new(Vec::new())),
            buf: vec![0; READ_CHUNK],
            known: Arc::default(),
            watch: None,
        }
    }

    /// Adds the inotify watcher (see the module documentation). Call after the first scan, so
    /// that files present at start are followed from their end.
    pub fn watch(&mut self) -> notify::Result<()> {
        let (tx, rx) = mpsc::channel();
        let globs: Vec<glob::Pattern> = self
            .patterns
            .iter()
            .filter_map(|p| glob::Pattern::new(p).ok())
            .collect();
        let known = self.known.clone();
        let handler = move |res: notify::Result<notify::Event>| {
            let ev = match res {
                Ok(ev) => ev,
                Err(_) => {
                    let _ = tx.send(Seen::Changed { rescan: true });
                    return;
                }
            };
            // Our own opens and reads of the followed files are events too: ignore them.
            if let EventKind::Access(a) = ev.kind {
                if a != notify::event::AccessKind::Close(notify::event::AccessMode::Write) {
                    return;
                }
            }
            let created = matches!(
                ev.kind,
                EventKind::Create(_) | EventKind::Modify(notify::event::ModifyKind::Name(_))
            );
            let mut rescan = ev.need_rescan();
            for p in &ev.paths {
                if !globs.iter().any(|g| g.matches_path(p)) {
                    rescan |= created;
                    continue;
                }
                let new = created || !known.lock().unwrap_or_else(|e| e.into_inner()).contains(p);
                if new && !matches!(ev.kind, EventKind::Remove(_)) {
                    // Open it now: the handle keeps the content even if the file goes.
                    match File::open(p) {
                        Ok(f) if f.metadata().is_ok_and(|m| m.is_file()) => {
                            let _ = tx.send(Seen::Opened(p.clone(), f));
                        }
                        Ok(_) => {}
                        Err(e) if matches!(ev.kind, EventKind::Create(_)) => {
                            tracing::warn!(path = %p.display(), error = %e,
                                "A file to follow was gone before the agent could open it; its content is lost.");
                        }
                        Err(_) => {}
                    }
                }
            }
            let _ = tx.send(Seen::Changed { rescan });
        };
        let watcher = notify::recommended_watcher(handler)?;
        let roots = self
            .patterns
            .iter()
            .map(|p| {
                let (root, mode) = watch_root(p);
                (root, mode, false)
            })
            .collect();
        self.watch = Some(Watch { watcher, roots, rx });
        self.add_watches();
        Ok(())
    }

    /// Watches the roots that exist and are not watched yet.
    fn add_watches(&mut self) {
        let Some(w) = self.watch.as_mut() else {
            return;
        };
        for (root, mode, watched) in w.roots.iter_mut() {
            if !*watched && root.is_dir() {
                *watched = w.watcher.watch(root, *mode).is_ok();
            }
        }
    }

    /// The problems found by the latest scan.
    pub fn errors(&self) -> TailErrors {
        self.errors.clone()
    }

    /// Waits up to `limit` for the watcher; follows the files it opened and reads what changed.
    /// Returns whether a rescan is due early (a directory appeared, events were lost).
    fn wait_events(&mut self, sinks: &Sinks, limit: Duration) -> bool {
        let Some(w) = self.watch.as_ref() else {
            std::thread::sleep(limit);
            return false;
        };
        let mut msgs = Vec::new();
        match w.rx.recv_timeout(limit) {
            Ok(m) => msgs.push(m),
            Err(_) => return false,
        }
        msgs.extend(w.rx.try_iter());
        let mut rescan = false;
        for m in msgs {
            match m {
                Seen::Opened(path, file) => self.adopt(path, file, sinks),
                Seen::Changed { rescan: r } => rescan |= r,
            }
        }
        let paths: Vec<PathBuf> = self.files.keys().cloned().collect();
        for p in paths {
            if let Some(mut f) = self.files.remove(&p) {
                self.read_new(&p, &mut f, sinks);
                self.files.insert(p, f);
            }
        }
        rescan
    }

    /// Follows `file`, opened by the watcher when `path` appeared, from its start (unless it is
    /// the file already followed there).
    fn adopt(&mut self, path: PathBuf, file: File, sinks: &Sinks) {
        let Ok(meta) = file.metadata() else { return };
        if let Some(old) = self.files.get(&path) {
            if (old.dev, old.ino) == (meta.dev(), meta.ino()) {
                return;
            }
            let mut old = self.files.remove(&path).expect("present");
            self.read_new(&path, &mut old, sinks);
            sinks.end(&Source::File(path.clone()));
        }
        self.follow(
            path,
            Followed {
                file,
                dev: meta.dev(),
                ino: meta.ino(),
                offset: 0,
            },
        );
    }

    fn follow(&mut self, path: PathBuf, f: Followed) {
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.clone());
        self.files.insert(path, f);
    }

    fn unfollow(&mut self, path: &Path, sinks: &Sinks) {
        self.files.remove(path);
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(path);
        sinks.end(&Source::File(path.to_path_buf()));
    }

    /// One scan: follows new files, reads new data, handles rotation, truncation and removal.
    /// Returns the bytes emitted.
    pub fn poll_once(&mut self, sinks: &Sinks) -> u64 {
        self.add_watches();
        let mut problems = Vec::new();
        let mut matched = Vec::new();
        for pat in &self.patterns {
            match glob::glob(pat) {
                Err(e) => problems.push(format!("tail {pat:?}: invalid pattern: {e}")),
                Ok(paths) => {
                    for entry in paths {
                        match entry {
                            Ok(p) if p.is_file() => matched.push(p),
                            Ok(_) => {}
                            Err(e) => problems.push(format!("tail {pat:?}: {e}")),
                        }
                    }
                }
            }
        }
        let mut emitted = 0;
        // Files no longer matched: drain what is left through our handle, then drop.
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !matched.contains(p))
            .cloned()
            .collect();
        for p in gone {
            if let Some(mut f) = self.files.remove(&p) {
                emitted += self.read_new(&p, &mut f, sinks);
                self.unfollow(&p, sinks);
            }
        }
        for p in matched {
            let meta = match std::fs::metadata(&p) {
                Ok(m) => m,
                Err(_) => continue,
            };
            let replaced = self
                .files
                .get(&p)
                .is_some_and(|f| (f.dev, f.ino) != (meta.dev(), meta.ino()));
            if replaced {
                if let Some(mut old) = self.files.remove(&p) {
                    emitted += self.read_new(&p, &mut old, sinks);
                    self.unfollow(&p, sinks);
                }
            }
            if !self.files.contains_key(&p) {
                match File::open(&p) {
                    Ok(file) => {
                        let offset = if self.first_scan { meta.len() } else { 0 };
                        self.follow(
                            p.clone(),
                            Followed {
                                file,
                                dev: meta.dev(),
                                ino: meta.ino(),
                                offset,
                            },
                        );
                    }
                    Err(e) => {
                        problems.push(format!("tail {}: {e}", p.display()));
                        continue;
                    }
                }
            }
            let mut f = self.files.remove(&p).expect("inserted above");
            if meta.len() < f.offset {
                f.offset = 0; // truncated: start again
            }
            emitted += self.read_new(&p, &mut f, sinks);
            self.files.insert(p, f);
        }
        self.first_scan = false;
        *self.errors.lock().unwrap_or_else(|e| e.into_inner()) = problems;
        emitted
    }

    fn read_new(&mut self, path: &Path, f: &mut Followed, sinks: &Sinks) -> u64 {
        if f.file.seek(SeekFrom::Start(f.offset)).is_err() {
            return 0;
        }
        let source = Source::File(path.to_path_buf());
        let mut total = 0;
        loop {
            let n = match f.file.read(&mut self.buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            sinks.write(&source, &self.buf[..n]);
            f.offset += n as u64;
            total += n as u64;
        }
        total
    }

    /// Runs until `stop` is set: scans once, starts the watcher, then follows events and
    /// rescans every [`POLL`].
    pub fn run(&mut self, sinks: &Sinks, stop: &AtomicBool) {
        self.poll_once(sinks);
        if let Err(e) = self.watch() {
            tracing::warn!(error = %e, "Cannot watch the tail globs with inotify; rescanning every {POLL:?} only.");
        }
        let mut next_scan = Instant::now() + POLL;
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= next_scan {
                self.poll_once(sinks);
                next_scan = Instant::now() + POLL;
                continue;
            }
            if self.wait_events(sinks, next_scan - now) {
                next_scan = Instant::now();
            }
        }
        self.poll_once(sinks);
    }
}

/// Runs `tailer` on its own thread until `stop` is set; returns the thread's handle.
pub fn spawn(
    mut tailer: Tailer,
    sinks: Arc<Sinks>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("tail".into())
        .spawn(move || tailer.run(&sinks, &stop))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logfile::RotatingFile;
    use crate::tap::{Tap, TapReceiver};
    use std::io::Write;

    fn setup() -> (tempfile::TempDir, Sinks, TapReceiver) {
        let d = tempfile::tempdir().unwrap();
        let (tap, rx) = Tap::new(1 << 20);
        let sinks = Sinks::new(
            false,
            Some(RotatingFile::open(&d.path().join("out/o.log"), 1 << 20, 2).unwrap()),
            tap,
        );
        (d, sinks, rx)
    }

    fn log(d: &Path, s: &Sinks) -> String {
        s.sync();
        std::fs::read_to_string(d.join("out/o.log")).unwrap()
    }

    fn append(p: &Path, s: &str) {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .unwrap()
            .write_all(s.as_bytes())
            .unwrap();
    }

    #[test]
    fn follows_new_files_rotation_truncation_and_removal() {
        let (d, sinks, _rx) = setup();
        let run = d.path().join("run");
        std::fs::create_dir_all(run.join("job1")).unwrap();
        let old = run.join("job1/setup.log");
        append(&old, "before the agent started\n");
        let mut t = Tailer::new(vec![format!("{}/*/*.log", run.display())]);
        t.poll_once(&sinks);
        assert_eq!(
            log(d.path(), &sinks),
            "",
            "existing content is skipped, like tail -f"
        );

        append(&old, "setup 1\n");
        let test_log = run.join("job1/test.log");
        append(&test_log, "test 1\n");
        t.poll_once(&sinks);
        // Rotation: replaced by a new inode; truncation; then the directory vanishes after a
        // last write that must still be read.
        std::fs::rename(&old, run.join("job1/setup.log.old")).unwrap();
        append(&old, "setup 2 (new file)\n");
        std::fs::write(&test_log, "t2\n").unwrap();
        t.poll_once(&sinks);
        append(&test_log, "last words\n");
        let mut held = File::open(&test_log).unwrap();
        let _ = held.read(&mut [0u8; 1]);
        std::fs::remove_dir_all(run.join("job1")).unwrap();
        t.poll_once(&sinks);
        let s = log(d.path(), &sinks);
        let setup = old.display();
        let test = test_log.display();
        assert_eq!(
            s,
            format!(
                "==> {setup} <==\nsetup 1\n==> {test} <==\ntest 1\n==> {setup} <==\nsetup 2 (new file)\n==> {test} <==\nt2\nlast words\n"
            )
        );
        assert!(t.errors().lock().unwrap().is_empty());
    }

    #[test]
    fn invalid_globs_are_reported_not_fatal() {
        let (_d, sinks, _rx) = setup();
        let mut t = Tailer::new(vec!["/tmp/[".into()]);
        t.poll_once(&sinks);
        let errs = t.errors().lock().unwrap().clone();
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].starts_with("tail \"/tmp/[\": invalid pattern"),
            "{errs:?}"
        );
    }

    /// How long a short-lived file exists: a fifth of the rescan period, so the periodic rescan
    /// alone would miss most of them (only the inotify watch reads them all), and still long
    /// enough for the tailer thread to be scheduled on a loaded machine (10 ms was not, at a load
    /// of 12 on two cores).
    const LIFE: Duration = Duration::from_millis(50);

    #[test]
    fn files_that_live_for_a_few_ms_are_read() {
        let (d, sinks, _rx) = setup();
        let run = d.path().join("run");
        std::fs::create_dir_all(run.join("job1")).unwrap();
        let sinks = Arc::new(sinks);
        let stop = Arc::new(AtomicBool::new(false));
        let mut t = Tailer::new(vec![format!("{}/*/*.log", run.display())]);
        t.poll_once(&sinks);
        t.watch().unwrap();
        let (s2, st2) = (sinks.clone(), stop.clone());
        let h = std::thread::spawn(move || {
            while !st2.load(Ordering::Relaxed) {
                if t.wait_events(&s2, POLL) {
                    t.poll_once(&s2);
                }
            }
            t.poll_once(&s2);
        });
        for f in 0..40 {
            let p = run.join(format!("job1/p{f}.log"));
            std::fs::write(&p, format!("file {f} line 1\nfile {f} line 2\n")).unwrap();
            std::thread::sleep(LIFE);
            std::fs::remove_file(&p).unwrap();
        }
        // Wait (with a deadline) until every file's last line is in the log.
        let missing = |s: &str| -> Vec<usize> {
            (0..40)
                .filter(|f| !s.contains(&format!("file {f} line 2\n")))
                .collect()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !missing(&log(d.path(), &sinks)).is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
        h.join().unwrap();
        let missed = missing(&log(d.path(), &sinks));
        assert!(missed.is_empty(), "missed {missed:?}");
    }
}
