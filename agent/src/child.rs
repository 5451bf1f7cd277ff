//! Processes the agent runs: the device process and jobs.
//!
//! Each runs in its own process group (`process_group(0)`), with stdout and stderr on one pipe
//! (so their interleaving is exactly what the process wrote), read by a pump thread into the
//! output sinks. Signals go to the whole group, and a stop is TERM, a grace period, then KILL of
//! the whole group, so no grandchild survives its parent's stop.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::output::{pump, Progress, Sinks, Source};

/// What to run.
#[derive(Debug, Clone)]
pub struct Spec {
    /// argv; the first element is the program.
    pub argv: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub cwd: Option<PathBuf>,
}

/// A running process group with its output pump.
pub struct Running {
    child: Child,
    pid: u32,
    started: Instant,
    progress: Arc<Progress>,
    pump: Option<std::thread::JoinHandle<u64>>,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl Exit {
    fn from_status(s: ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (s.code(), s.signal()) {
            (Some(c), _) => Exit::Code(c),
            (None, Some(sig)) => Exit::Signal(sig),
            (None, None) => Exit::Code(-1),
        }
    }

    /// `exit 1`, `signal 9`.
    pub fn describe(self) -> String {
        match self {
            Exit::Code(c) => format!("exit {c}"),
            Exit::Signal(s) => format!("signal {s}"),
        }
    }
}

/// The pids of the processes [`spawn`] started and their owners have not waited for yet (the
/// device process, a job): [`reap_orphans`] leaves them alone. Locked across a spawn and across
/// a reaping pass, so a child is listed before the reaper can see it exit.
static OURS: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

fn ours() -> MutexGuard<'static, BTreeSet<u32>> {
    OURS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Spawns `cmd` and records its pid as ours, holding the record's lock across the spawn so the
/// PID-1 reaper cannot take the exit status before the pid is known.
fn spawn_ours(cmd: &mut Command) -> std::io::Result<Child> {
    let mut ours = ours();
    let child = cmd.spawn()?;
    ours.extend(child.id());
    Ok(child)
}

/// Starts `spec` in a new process group, pumping its output to `sinks` as `source`.
pub fn spawn(spec: &Spec, sinks: Arc<Sinks>, source: Source) -> std::io::Result<Running> {
    let Some((prog, args)) = spec.argv.split_first() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "empty command",
        ));
    };
    let (reader, writer) = std::io::pipe()?;
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .envs(&spec.env)
        .stdin(Stdio::null())
        .stdout(writer.try_clone()?)
        .stderr(writer)
        .process_group(0)
        .kill_on_drop(false);
    if let Some(cwd) = &spec.cwd {
        cmd.current_dir(cwd);
    }
    let child = spawn_ours(&mut cmd)?;
    // `cmd` holds the parent's copies of the write end: drop it, or the pump never sees EOF.
    drop(cmd);
    let pid = child.id().unwrap_or(0);
    let progress = Arc::new(Progress::default());
    progress.last_ms.store(
        labvisor_protocol::payloads::now_ms(),
        std::sync::atomic::Ordering::Relaxed,
    );
    let p2 = progress.clone();
    let pump = std::thread::Builder::new()
        .name(format!("pump-{pid}"))
        .spawn(move || pump(reader, &sinks, &source, &p2))?;
    Ok(Running {
        child,
        pid,
        started: Instant::now(),
        progress,
        pump: Some(pump),
    })
}

impl Running {
    /// The process's pid, which is also its process group id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// When it started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Its output so far.
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// Its output so far, as a handle that outlives `self`.
    pub fn progress_handle(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// Waits for it to exit. Cancel-safe.
    pub async fn wait(&mut self) -> Exit {
        let exit = match self.child.wait().await {
            Ok(s) => Exit::from_status(s),
            Err(_) => Exit::Code(-1),
        };
        ours().remove(&self.pid);
        exit
    }

    /// Sends `sig` to the whole process group.
    pub fn signal(&self, sig: Signal) {
        signal_group(self.pid, sig);
    }

    /// TERM to the group, up to `grace` for the process to exit, then KILL to the group.
    /// Whatever is left of the group is killed either way. Returns how it ended and whether it
    /// had to be killed.
    pub async fn stop(&mut self, grace: Duration) -> (Exit, bool) {
        self.signal(Signal::SIGTERM);
        let (exit, killed) = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(s)) => {
                ours().remove(&self.pid);
                (Exit::from_status(s), false)
            }
            _ => {
                self.signal(Signal::SIGKILL);
                (self.wait().await, true)
            }
        };
        self.signal(Signal::SIGKILL);
        (exit, killed)
    }

    /// Waits (up to `limit`) for the pump to drain the pipe after the process exited; returns
    /// the bytes pumped. A grandchild that keeps the pipe open past `limit` is left to its pump.
    pub async fn drain(&mut self, limit: Duration) -> Option<u64> {
        let handle = self.pump.take()?;
        let joined = tokio::task::spawn_blocking(move || handle.join());
        match tokio::time::timeout(limit, joined).await {
            Ok(Ok(Ok(n))) => Some(n),
            _ => None,
        }
    }
}

/// Sends `sig` to process group `pgid`, ignoring a group that is already gone.
pub fn signal_group(pgid: u32, sig: Signal) {
    if pgid > 1 {
        let _ = killpg(Pid::from_raw(pgid as i32), sig);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Not waited for: tokio reaps it once it exits; nobody needs its status.
        ours().remove(&self.pid);
    }
}

/// When the agent is PID 1 (a container without Docker's init), orphaned grandchildren are
/// re-parented to it and must be reaped, or they stay zombies. Reaps every exited child that is
/// not one of `ours` nor one [`spawn`] started (those are waited for by their owners: the device
/// task, the job runner), without disturbing them.
pub fn reap_orphans(ours: &[u32]) -> usize {
    use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
    let spawned = self::ours();
    let mut reaped = 0;
    loop {
        // Peek (WNOWAIT) at one exited child.
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        let pid = match waitid(Id::All, flags) {
            Ok(WaitStatus::StillAlive) | Err(_) => return reaped,
            Ok(st) => match st.pid() {
                Some(p) => p,
                None => return reaped,
            },
        };
        let pid_u32 = pid.as_raw() as u32;
        if ours.contains(&pid_u32) || spawned.contains(&pid_u32) {
            // Ours is first in line; its owner reaps it, and we look again next time.
            return reaped;
        }
        if waitpid(pid, Some(WaitPidFlag::WNOHANG)).is_ok() {
            reaped += 1;
        } else {
            return reaped;
        }
    }
}

// --- helper probe: exec probes (issue 15) ---
/// A process started by [`spawn_captured`] (an exec probe): in its own process group, its
/// stdout and stderr on one pipe for the caller to read, listed among the processes [`spawn`]
/// started until it is waited for, so the PID-1 reaper leaves its exit status to the caller.
pub struct Captured {
    child: Child,
    pid: u32,
    /// Its stdout and stderr, on one pipe (`None` once taken).
    pub output: Option<std::io::PipeReader>,
}

/// Starts `argv` in a new process group with stdin from /dev/null and its output captured.
pub fn spawn_captured(argv: &[String]) -> std::io::Result<Captured> {
    let Some((prog, args)) = argv.split_first() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "empty command",
        ));
    };
    let (reader, writer) = std::io::pipe()?;
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(writer.try_clone()?)
        .stderr(writer)
        .process_group(0)
        .kill_on_drop(false);
    let child = spawn_ours(&mut cmd)?;
    // The parent's copies of the write end go, so the reader sees EOF when the group is done.
    drop(cmd);
    let pid = child.id().unwrap_or(0);
    Ok(Captured {
        child,
        pid,
        output: Some(reader),
    })
}

impl Captured {
    /// Waits for it to exit. Cancel-safe.
    pub async fn wait(&mut self) -> Exit {
        let exit = match self.child.wait().await {
            Ok(s) => Exit::from_status(s),
            Err(_) => Exit::Code(-1),
        };
        ours().remove(&self.pid);
        exit
    }

    /// KILL to its whole process group (whatever is left of it).
    pub fn kill_group(&self) {
        signal_group(self.pid, Signal::SIGKILL);
    }
}

impl Drop for Captured {
    fn drop(&mut self) {
        self.kill_group();
        ours().remove(&self.pid);
    }
}
// --- end helper probe ---

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logfile::RotatingFile;

    fn sinks(dir: &std::path::Path) -> Arc<Sinks> {
        Arc::new(Sinks::new(
            false,
            Some(RotatingFile::open(&dir.join("o.log"), 1 << 20, 2).unwrap()),
            crate::tap::Tap::new(8).0,
        ))
    }

    fn sh(script: &str) -> Spec {
        Spec {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: BTreeMap::new(),
            cwd: None,
        }
    }

    #[tokio::test]
    async fn stdout_and_stderr_reach_the_file_in_order() {
        let d = tempfile::tempdir().unwrap();
        let s = sinks(d.path());
        let mut r = spawn(
            &sh("echo out; echo err >&2; echo out2; exit 3"),
            s.clone(),
            Source::Device,
        )
        .unwrap();
        assert_eq!(r.wait().await, Exit::Code(3));
        assert_eq!(r.drain(Duration::from_secs(5)).await, Some(13));
        s.sync();
        assert_eq!(
            std::fs::read_to_string(d.path().join("o.log")).unwrap(),
            "out\nerr\nout2\n"
        );
    }

    #[tokio::test]
    async fn stop_kills_the_whole_group_after_the_grace_period() {
        let d = tempfile::tempdir().unwrap();
        let s = sinks(d.path());
        // The shell ignores TERM and has a grandchild; both must be gone after stop.
        let pidfile = d.path().join("gc.pid");
        let script = format!(
            "trap '' TERM; sleep 1000 & echo $! > {}; echo ready; wait",
            pidfile.display()
        );
        let mut r = spawn(&sh(&script), s.clone(), Source::Device).unwrap();
        let gc: i32 =
            labvisor_wait(|| std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok()).await;
        let t0 = Instant::now();
        let (exit, killed) = r.stop(Duration::from_millis(300)).await;
        assert!(killed);
        assert_eq!(exit, Exit::Signal(9));
        assert!(t0.elapsed() < Duration::from_secs(5));
        // The grandchild is gone too (kill(pid, 0) fails once it is reaped by init or dead).
        labvisor_wait(|| {
            let alive = nix::sys::signal::kill(Pid::from_raw(gc), None).is_ok()
                && !std::fs::read_to_string(format!("/proc/{gc}/stat"))
                    .map(|st| st.contains(") Z"))
                    .unwrap_or(true);
            (!alive).then_some(())
        })
        .await;
    }

    /// As PID 1 the agent reaps orphans on every SIGCHLD, in the device task, while jobs run
    /// beside it: a job's (or the device process's) own exit status is never taken from its
    /// owner, whatever `ours` the reaper was given.
    #[tokio::test]
    async fn the_orphan_reaper_never_takes_a_child_of_ours() {
        let d = tempfile::tempdir().unwrap();
        let mut r = spawn(&sh("exit 3"), sinks(d.path()), Source::Device).unwrap();
        let pid = r.pid();
        // Exited, not yet waited for: a zombie.
        labvisor_wait(|| {
            let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            st.contains(") Z").then_some(())
        })
        .await;
        reap_orphans(&[]);
        assert_eq!(r.wait().await, Exit::Code(3));
    }

    async fn labvisor_wait<T>(mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(Instant::now() < deadline, "condition not met within 10 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
