//! A job's own verdict, and how a job's end becomes its final state.
//!
//! Every job gets `LABVISOR_RESULT`, the path of [`RESULT_FILE`] in its directory. A command
//! that knows better than its exit code (a wrapper of `testflinger-cli submit --poll`, which
//! exits 0 when a phase failed) writes `{"verdict": "passed"|"failed", "reason": "..."}` there,
//! and that verdict decides, whatever the exit code (both ways: `failed` with exit 0 ends
//! `failed`, `passed` with exit 1 ends `passed`); the exit code or signal is still reported.
//! A result file that cannot be read, is not a regular file (a FIFO, a symlink: never opened in
//! a way that could block the agent's loop) or is not such an object ends the job `failed`,
//! with a reason naming the file and the problem. Without a result file the exit code decides.
//! Cancel and the time limits decide before any of it: a job labvisor ended is `cancelled` or
//! `timeout`, and the result file's reason, if any, is added to that reason.

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use labvisor_protocol::payloads::JobState;
use serde::Deserialize;

use crate::child::Exit;

/// The result file's name in the job's directory.
pub const RESULT_FILE: &str = "labvisor-result.json";
/// The environment variable that names it.
pub const RESULT_ENV: &str = "LABVISOR_RESULT";
/// The largest result file read.
pub const MAX_RESULT_BYTES: u64 = 64 * 1024;
/// The longest reason kept from a result file (characters); the rest is cut, marked `…`.
pub const MAX_REASON_CHARS: usize = 2000;

/// What the job said about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// `passed` (true) or `failed`.
    pub passed: bool,
    /// Why, if it said so.
    pub reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVerdict {
    verdict: Kind,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Passed,
    Failed,
}

/// Why a result file gives no verdict.
#[derive(Debug, thiserror::Error)]
pub enum VerdictError {
    /// It cannot be read.
    #[error("cannot read the job's result file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It is not a regular file (a FIFO, a symlink, a directory...): not read.
    #[error("the job's result file {path} is not a regular file ({kind}); it is not read")]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is.
        kind: String,
    },
    /// It is too large.
    #[error("the job's result file {path} is larger than {MAX_RESULT_BYTES} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// It is not a verdict.
    #[error(
        "the job's result file {path} is not {{\"verdict\": \"passed\"|\"failed\", \"reason\": \
         \"...\"}}: {source}"
    )]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        #[source]
        source: serde_json::Error,
    },
}

/// Reads the result file `path`: `Ok(None)` when there is none. The job controls the file, and
/// the agent's loop reads it, so only a regular file is read: a FIFO (an open would wait for a
/// writer forever), a symlink (it could point anywhere), a device or a directory is refused,
/// and the open itself neither follows a symlink nor blocks (`O_NOFOLLOW | O_NONBLOCK`), in
/// case the file was swapped after the check.
pub fn read(path: &Path) -> Result<Option<Verdict>, VerdictError> {
    let err = |source| VerdictError::Read {
        path: path.to_owned(),
        source,
    };
    let not_regular = |kind: &str| VerdictError::NotRegular {
        path: path.to_owned(),
        kind: kind.to_owned(),
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => {}
        Ok(m) => return Err(not_regular(kind(&m.file_type()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e)),
    }
    let flags = nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits())
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
            return Err(not_regular("a symlink"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    let ft = file.metadata().map_err(err)?.file_type();
    if !ft.is_file() {
        return Err(not_regular(kind(&ft)));
    }
    let mut bytes = Vec::new();
    file.take(MAX_RESULT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(err)?;
    if bytes.len() as u64 > MAX_RESULT_BYTES {
        return Err(VerdictError::TooLarge {
            path: path.to_owned(),
        });
    }
    parse(path, &bytes).map(Some)
}

/// What a file that is not a regular file is.
fn kind(ft: &std::fs::FileType) -> &'static str {
    if ft.is_symlink() {
        "a symlink"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() || ft.is_char_device() {
        "a device"
    } else {
        "not a file"
    }
}

/// Parses a result file's contents (`path` is for the error).
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Verdict, VerdictError> {
    let raw: RawVerdict =
        serde_json::from_slice(bytes).map_err(|source| VerdictError::Invalid {
            path: path.to_owned(),
            source,
        })?;
    let reason = raw
        .reason
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty())
        .map(|r| cut(&r));
    Ok(Verdict {
        passed: matches!(raw.verdict, Kind::Passed),
        reason,
    })
}

fn cut(r: &str) -> String {
    match r.char_indices().nth(MAX_REASON_CHARS) {
        Some((i, _)) => format!("{}…", &r[..i]),
        None => r.to_owned(),
    }
}

/// The final state and reason of a job that exited with `exit`: what labvisor decided when it
/// ended the job (`ending`), else the job's verdict, else its exit status.
pub fn outcome(
    ending: Option<(JobState, String)>,
    exit: Exit,
    verdict: Result<Option<Verdict>, VerdictError>,
) -> (JobState, Option<String>) {
    match (ending, verdict) {
        (
            Some((state, reason)),
            Ok(Some(Verdict {
                reason: Some(r), ..
            })),
        ) => (state, Some(format!("{reason}; the job's result: {r}"))),
        (Some((state, reason)), _) => (state, Some(reason)),
        (None, Err(e)) => (JobState::Failed, Some(e.to_string())),
        (None, Ok(Some(v))) if v.passed => (JobState::Passed, v.reason),
        (None, Ok(Some(v))) => (
            JobState::Failed,
            Some(v.reason.unwrap_or_else(|| {
                format!("the job's result file says failed ({})", describe(exit))
            })),
        ),
        (None, Ok(None)) => match exit {
            Exit::Code(0) => (JobState::Passed, None),
            other => (JobState::Failed, Some(describe(other))),
        },
    }
}

/// `exit 3`, `killed by signal 9`.
fn describe(exit: Exit) -> String {
    match exit {
        Exit::Code(c) => format!("exit {c}"),
        Exit::Signal(s) => format!("killed by signal {s}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("/jobs/j1/labvisor-result.json")
    }

    fn v(passed: bool, reason: Option<&str>) -> Verdict {
        Verdict {
            passed,
            reason: reason.map(str::to_owned),
        }
    }

    #[test]
    fn verdicts_parse() {
        let ok = |s: &str| parse(p(), s.as_bytes()).unwrap();
        assert_eq!(ok(r#"{"verdict":"passed"}"#), v(true, None));
        assert_eq!(
            ok(r#"{"verdict":"failed","reason":"test phase failed (test_status 3)"}"#),
            v(false, Some("test phase failed (test_status 3)"))
        );
        assert_eq!(ok(r#"{"verdict":"failed","reason":"  "}"#), v(false, None));
        let long = "x".repeat(MAX_REASON_CHARS + 10);
        let cut = ok(&format!(r#"{{"verdict":"failed","reason":"{long}"}}"#));
        assert_eq!(cut.reason.unwrap().chars().count(), MAX_REASON_CHARS + 1);
    }

    #[test]
    fn invalid_files_name_the_file_and_the_problem() {
        for (text, problem) in [
            ("", "EOF while parsing"),
            ("passed", "expected value"),
            (r#"{"verdict":"ok"}"#, "unknown variant `ok`"),
            (r#"{"reason":"x"}"#, "missing field `verdict`"),
            (r#"{"verdict":"failed","why":"x"}"#, "unknown field `why`"),
            (r#"{"verdict":"failed","reason":3}"#, "invalid type"),
        ] {
            let e = parse(p(), text.as_bytes()).unwrap_err().to_string();
            assert!(e.contains("/jobs/j1/labvisor-result.json"), "{e}");
            assert!(e.contains(problem), "{text:?}: {e}");
        }
    }

    #[test]
    fn reading_absent_unreadable_and_oversized_files() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join(RESULT_FILE);
        assert!(
            read(&f).unwrap().is_none(),
            "no file: the exit code decides"
        );
        std::fs::write(&f, r#"{"verdict":"failed","reason":"r"}"#).unwrap();
        assert_eq!(read(&f).unwrap(), Some(v(false, Some("r"))));
        std::fs::write(&f, vec![b' '; MAX_RESULT_BYTES as usize + 1]).unwrap();
        let e = read(&f).unwrap_err().to_string();
        assert!(e.contains("larger than 65536 bytes"), "{e}");
        // A directory where the file should be: not read, naming it.
        std::fs::remove_file(&f).unwrap();
        std::fs::create_dir(&f).unwrap();
        let e = read(&f).unwrap_err().to_string();
        assert!(e.contains("is not a regular file (a directory)"), "{e}");
        assert!(e.contains(RESULT_FILE), "{e}");
    }

    /// Reads `path` on a thread; `None` when it did not return within 5 s (it hangs).
    fn read_in_time(path: &Path) -> Option<Result<Option<Verdict>, VerdictError>> {
        let (tx, rx) = std::sync::mpsc::channel();
        let path = path.to_owned();
        std::thread::spawn(move || {
            let _ = tx.send(read(&path));
        });
        rx.recv_timeout(std::time::Duration::from_secs(5)).ok()
    }

    /// A FIFO (which would block an open for reading until a writer comes) and a symlink (to a
    /// FIFO, or to a file outside the job's directory) are refused at once, naming the file.
    #[test]
    fn a_fifo_or_a_symlink_is_not_read_and_does_not_hang() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join(RESULT_FILE);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = read_in_time(&fifo).expect("no hang on a FIFO").unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("not a regular file") && e.contains(RESULT_FILE),
            "{e}"
        );

        let real = d.path().join("elsewhere.json");
        std::fs::write(&real, r#"{"verdict":"passed"}"#).unwrap();
        let link = d.path().join("link.json");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = read_in_time(&link)
            .expect("in time")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not a regular file") && e.contains("link.json"),
            "{e}"
        );
        let to_fifo = d.path().join("to-fifo.json");
        std::os::unix::fs::symlink(&fifo, &to_fifo).unwrap();
        let e = read_in_time(&to_fifo)
            .expect("no hang")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn the_verdict_overrides_the_exit_code_both_ways() {
        let failed = Ok(Some(v(false, Some("test phase failed (test_status 3)"))));
        assert_eq!(
            outcome(None, Exit::Code(0), failed),
            (
                JobState::Failed,
                Some("test phase failed (test_status 3)".into())
            )
        );
        assert_eq!(
            outcome(None, Exit::Code(0), Ok(Some(v(false, None)))),
            (
                JobState::Failed,
                Some("the job's result file says failed (exit 0)".into())
            )
        );
        assert_eq!(
            outcome(
                None,
                Exit::Code(1),
                Ok(Some(v(true, Some("flaky, retried"))))
            ),
            (JobState::Passed, Some("flaky, retried".into()))
        );
        assert_eq!(
            outcome(None, Exit::Signal(9), Ok(Some(v(true, None)))),
            (JobState::Passed, None)
        );
    }

    #[test]
    fn without_a_verdict_the_exit_code_decides_and_a_bad_file_fails() {
        assert_eq!(
            outcome(None, Exit::Code(0), Ok(None)),
            (JobState::Passed, None)
        );
        assert_eq!(
            outcome(None, Exit::Code(5), Ok(None)),
            (JobState::Failed, Some("exit 5".into()))
        );
        assert_eq!(
            outcome(None, Exit::Signal(9), Ok(None)),
            (JobState::Failed, Some("killed by signal 9".into()))
        );
        let bad = parse(p(), b"{").map(Some);
        let (state, reason) = outcome(None, Exit::Code(0), bad);
        assert_eq!(state, JobState::Failed);
        assert!(reason.unwrap().contains("labvisor-result.json"));
    }

    #[test]
    fn cancel_and_timeout_decide_first_and_keep_the_jobs_reason() {
        let cancelled = || Some((JobState::Cancelled, "cancelled on request".to_owned()));
        let said = Ok(Some(v(false, Some("server job 7 cancelled"))));
        assert_eq!(
            outcome(cancelled(), Exit::Code(143), said),
            (
                JobState::Cancelled,
                Some("cancelled on request; the job's result: server job 7 cancelled".into())
            )
        );
        assert_eq!(
            outcome(cancelled(), Exit::Code(0), Ok(Some(v(true, None)))),
            (JobState::Cancelled, Some("cancelled on request".into()))
        );
        let timeout = Some((JobState::Timeout, "timeout: ran longer than 3s".to_owned()));
        assert_eq!(
            outcome(timeout, Exit::Signal(9), parse(p(), b"").map(Some)),
            (
                JobState::Timeout,
                Some("timeout: ran longer than 3s".into())
            )
        );
    }
}
