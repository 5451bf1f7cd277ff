//! Following the files matched by the SUT's `tail` globs.
//!
//! testflinger-agent writes each phase's output to `<rundir>/<job>/<phase>.log` and deletes the
//! whole directory once the outcome is uploaded, so the files appear and vanish within seconds.
//! A tail thread rescans the globs every [`POLL`] and, for each matched file:
//!
//! - a file seen at the very first scan is followed from its end (like `tail -f`); a file that
//!   appears later is read from its start;
//! - a file replaced under the same path (rotation: another inode) is read to the end through the
//!   old handle, then followed anew from the start of the new file;
//! - a file that shrank (truncation) is read again from its start;
//! - a file that vanished is read to its end through the handle we hold, then dropped.
//!
//! When output switches from one file to another, a `==> path <==` line (as `tail -f` prints)
//! marks the source. Unreadable globs are reported through [`TailErrors`] and the agent's status;
//! the agent keeps running.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use crate::output::{Chunk, Sinks, Tap, Target, READ_CHUNK};

/// How often the globs are rescanned and files read.
pub const POLL: Duration = Duration::from_millis(250);

/// The current problems with the tail globs, shared with the status.
pub type TailErrors = Arc<Mutex<Vec<String>>>;

struct Followed {
    file: File,
    dev: u64,
    ino: u64,
    offset: u64,
}

/// Follows the files matched by a set of globs.
pub struct Tailer {
    patterns: Vec<String>,
    files: BTreeMap<PathBuf, Followed>,
    first_scan: bool,
    last_source: Option<PathBuf>,
    errors: TailErrors,
    buf: Vec<u8>,
}

impl Tailer {
    /// A tailer for `patterns` (absolute globs).
    pub fn new(patterns: Vec<String>) -> Self {
        Tailer {
            patterns,
            files: BTreeMap::new(),
            first_scan: true,
            last_source: None,
            errors: Arc::new(Mutex::new(Vec::new())),
            buf: vec![0; READ_CHUNK],
        }
    }

    /// The problems found by the latest scan.
    pub fn errors(&self) -> TailErrors {
        self.errors.clone()
    }

    /// One scan: follows new files, reads new data, handles rotation, truncation and removal.
    /// Returns the bytes emitted.
    pub fn poll_once(&mut self, sinks: &Sinks, tap: &Tap) -> u64 {
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
                emitted += self.read_new(&p, &mut f, sinks, tap);
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
                    emitted += self.read_new(&p, &mut old, sinks, tap);
                }
            }
            if !self.files.contains_key(&p) {
                match File::open(&p) {
                    Ok(file) => {
                        let offset = if self.first_scan { meta.len() } else { 0 };
                        self.files.insert(
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
            emitted += self.read_new(&p, &mut f, sinks, tap);
            self.files.insert(p, f);
        }
        self.first_scan = false;
        *self.errors.lock().unwrap_or_else(|e| e.into_inner()) = problems;
        emitted
    }

    fn read_new(&mut self, path: &Path, f: &mut Followed, sinks: &Sinks, tap: &Tap) -> u64 {
        if f.file.seek(SeekFrom::Start(f.offset)).is_err() {
            return 0;
        }
        let mut total = 0;
        loop {
            let n = match f.file.read(&mut self.buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if self.last_source.as_deref() != Some(path) {
                let header = format!("==> {} <==\n", path.display());
                emit(header.as_bytes(), sinks, tap);
                self.last_source = Some(path.to_path_buf());
            }
            emit(&self.buf[..n], sinks, tap);
            f.offset += n as u64;
            total += n as u64;
        }
        total
    }
}

fn emit(bytes: &[u8], sinks: &Sinks, tap: &Tap) {
    sinks.write(bytes);
    tap.send(Chunk {
        target: Target::Sut,
        bytes: Bytes::copy_from_slice(bytes),
    });
}

/// Runs `tailer` on its own thread until `stop` is set; returns the thread's handle.
pub fn spawn(
    mut tailer: Tailer,
    sinks: Arc<Sinks>,
    tap: Tap,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("tail".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                tailer.poll_once(&sinks, &tap);
                std::thread::sleep(POLL);
            }
            tailer.poll_once(&sinks, &tap);
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logfile::RotatingFile;
    use std::io::Write;

    fn setup() -> (tempfile::TempDir, Sinks, Tap) {
        let d = tempfile::tempdir().unwrap();
        let sinks = Sinks::new(
            false,
            Some(RotatingFile::open(&d.path().join("out/o.log"), 1 << 20, 2).unwrap()),
        );
        let (tap, rx) = Tap::new(1 << 20);
        std::mem::forget(rx);
        (d, sinks, tap)
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
        let (d, sinks, tap) = setup();
        let run = d.path().join("run");
        std::fs::create_dir_all(run.join("job1")).unwrap();
        let old = run.join("job1/setup.log");
        append(&old, "before the agent started\n");
        let mut t = Tailer::new(vec![format!("{}/*/*.log", run.display())]);
        t.poll_once(&sinks, &tap);
        assert_eq!(
            log(d.path(), &sinks),
            "",
            "existing content is skipped, like tail -f"
        );

        append(&old, "setup 1\n");
        let test_log = run.join("job1/test.log");
        append(&test_log, "test 1\n");
        t.poll_once(&sinks, &tap);
        // Rotation: replaced by a new inode; truncation; then the directory vanishes after a
        // last write that must still be read.
        std::fs::rename(&old, run.join("job1/setup.log.old")).unwrap();
        append(&old, "setup 2 (new file)\n");
        std::fs::write(&test_log, "t2\n").unwrap();
        t.poll_once(&sinks, &tap);
        append(&test_log, "last words\n");
        let mut held = File::open(&test_log).unwrap();
        let _ = held.read(&mut [0u8; 1]);
        std::fs::remove_dir_all(run.join("job1")).unwrap();
        t.poll_once(&sinks, &tap);
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
        let (_d, sinks, tap) = setup();
        let mut t = Tailer::new(vec!["/tmp/[".into()]);
        t.poll_once(&sinks, &tap);
        let errs = t.errors().lock().unwrap().clone();
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].starts_with("tail \"/tmp/[\": invalid pattern"),
            "{errs:?}"
        );
    }
}
