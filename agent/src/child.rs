//! Processes the agent runs: the device process and jobs.
//!
//! Each runs in its own process group (`process_group(0)`), with stdout and stderr on one pipe
//! (so their interleaving is exactly what the process wrote), read by a pump thread into the
//! output sinks. Signals go to the whole group, and a stop is TERM, a grace period, then KILL of
//! the whole group, so no grandchild survives its parent's stop.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
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
    let child = cmd.spawn()?;
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
        match self.child.wait().await {
            Ok(s) => Exit::from_status(s),
            Err(_) => Exit::Code(-1),
        }
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
            Ok(Ok(s)) => (Exit::from_status(s), false),
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

/// Restart policy of the device process: capped exponential backoff, and crash-loop after
/// `crash_loop_after` quick failures in a row.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// First delay.
    pub min: Duration,
    /// Largest delay.
    pub max: Duration,
    /// Quick failures in a row before the state is crash-loop.
    pub crash_loop_after: u32,
    /// A run shorter than this is a quick failure; a longer one resets the count.
    pub quick: Duration,
    quick_failures: u32,
}

impl Backoff {
    /// A policy with no failures yet.
    pub fn new(min: Duration, max: Duration, crash_loop_after: u32) -> Self {
        Backoff {
            min,
            max: max.max(min),
            crash_loop_after: crash_loop_after.max(1),
            // A run that outlived the longest backoff (or 10 s) was not a quick failure.
            quick: max.clamp(Duration::from_secs(10), Duration::from_secs(60)),
            quick_failures: 0,
        }
    }

    /// Records an exit after `ran` and returns the delay before the next start. An exit after a
    /// long run (at least `quick`) is not a quick failure: it clears the count, and the next
    /// start comes after the shortest delay.
    pub fn on_exit(&mut self, ran: Duration) -> Duration {
        if ran >= self.quick {
            self.quick_failures = 0;
            return self.min;
        }
        self.quick_failures = self.quick_failures.saturating_add(1);
        let exp = self.quick_failures.saturating_sub(1).min(20);
        self.min.saturating_mul(1u32 << exp).min(self.max)
    }

    /// Whether the process is crash-looping.
    pub fn crash_loop(&self) -> bool {
        self.quick_failures >= self.crash_loop_after
    }

    /// Quick failures in a row.
    pub fn quick_failures(&self) -> u32 {
        self.quick_failures
    }
}

/// When the agent is PID 1 (a container without Docker's init), orphaned grandchildren are
/// re-parented to it and must be reaped, or they stay zombies. Reaps every exited child that is
/// not one of `ours` (those are waited for by their owners), without disturbing `ours`.
pub fn reap_orphans(ours: &[u32]) -> usize {
    use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
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
        if ours.contains(&(pid.as_raw() as u32)) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logfile::RotatingFile;

    #[test]
    fn backoff_grows_caps_and_resets_after_a_long_run() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8), 3);
        let quick = Duration::from_millis(100);
        let delays: Vec<_> = (0..5).map(|_| b.on_exit(quick).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 8]);
        assert!(b.crash_loop());
        assert_eq!(b.on_exit(Duration::from_secs(3600)), Duration::from_secs(1));
        assert!(!b.crash_loop());
    }

    /// The exit that ends a long healthy run is not a quick failure: it counts nothing, so it
    /// can neither start a crash loop on its own nor bring one closer.
    #[test]
    fn an_exit_after_a_long_run_is_not_a_quick_failure() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8), 1);
        assert_eq!(b.quick, Duration::from_secs(10));
        assert_eq!(b.on_exit(Duration::from_secs(339)), Duration::from_secs(1));
        assert_eq!(b.quick_failures(), 0);
        assert!(
            !b.crash_loop(),
            "one long run then an exit is no crash loop"
        );
        // Exactly at the threshold counts as long; just under it as quick.
        assert_eq!(b.on_exit(b.quick), Duration::from_secs(1));
        assert_eq!(b.quick_failures(), 0);
        let under = b.quick - Duration::from_millis(1);
        assert_eq!(b.on_exit(under), Duration::from_secs(1));
        assert_eq!(b.quick_failures(), 1);
        assert!(b.crash_loop());

        // With crash_loop_after = 3: two quick failures, a long run, two quick failures: no
        // crash loop (the count restarted at the long run), and the delays restarted too.
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8), 3);
        let quick = Duration::from_millis(100);
        let delays: Vec<u64> = [quick, quick, Duration::from_secs(339), quick, quick]
            .into_iter()
            .map(|ran| b.on_exit(ran).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 1, 1, 2]);
        assert_eq!(b.quick_failures(), 2);
        assert!(!b.crash_loop());
        assert_eq!(b.on_exit(quick), Duration::from_secs(4));
        assert!(b.crash_loop());
    }

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
