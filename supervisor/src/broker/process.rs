//! Running mosquitto: finding it, starting it until it listens ([`Launch`]), the watcher
//! thread that restarts it when it dies ([`spawn_watcher`]), and stopping one a killed
//! supervisor left behind ([`stop_leftover`]).

use std::net::IpAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use nix::sys::signal::Signal;
use tokio::sync::watch;

use super::{AgentLogins, ManagedBrokerStatus, MosquittoError, STOP_GRACE};

/// The `mosquitto` and `mosquitto_passwd` binaries, where Debian (or a local build) puts them.
pub(super) fn binaries() -> Option<(PathBuf, PathBuf)> {
    let find = |candidates: &[&str]| candidates.iter().map(PathBuf::from).find(|p| p.is_file());
    let bin = find(&[
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
        "/usr/bin/mosquitto",
    ])?;
    let passwd_bin = find(&[
        "/usr/bin/mosquitto_passwd",
        "/usr/local/bin/mosquitto_passwd",
    ])?;
    Some((bin, passwd_bin))
}

/// Sends `sig` to process `pid`; a process already gone is no error.
pub(super) fn signal(pid: u32, sig: Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

/// Polls `done` every 20 ms until it says so or `deadline` passes.
pub(super) fn wait_until(deadline: Instant, mut done: impl FnMut() -> bool) {
    while !done() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Set once, when the broker is to stop; wakes the watcher's backoff sleep.
#[derive(Debug, Default)]
pub(super) struct StopFlag {
    set: std::sync::Mutex<bool>,
    cond: std::sync::Condvar,
}

impl StopFlag {
    pub(super) fn set(&self) {
        *self.set.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cond.notify_all();
    }

    fn is_set(&self) -> bool {
        *self.set.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sleeps `d` unless the flag is or gets set; whether it is.
    fn wait(&self, d: Duration) -> bool {
        let g = self.set.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = self
            .cond
            .wait_timeout_while(g, d, |set| !*set)
            .unwrap_or_else(|p| p.into_inner());
        *g
    }
}

/// How to run mosquitto, and when it counts as up.
pub(super) struct Launch {
    pub bin: PathBuf,
    pub conf: PathBuf,
    pub dir: PathBuf,
    pub port: u16,
    pub gateway: IpAddr,
}

impl Launch {
    /// Starts mosquitto and waits (at most 10 s, or until `stop()` says so) until it listens on
    /// both addresses. Its stderr goes to `mosquitto.log` (appended), and its pid to
    /// `mosquitto.pid`.
    pub(super) fn run(&self, stop: &dyn Fn() -> bool) -> Result<Child, MosquittoError> {
        let log_path = self.dir.join("mosquitto.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|source| MosquittoError::Log {
                path: log_path.clone(),
                source,
            })?;
        let log_len = log.metadata().map(|m| m.len()).unwrap_or(0);
        let mut child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.conf)
            // Its own process group: a Ctrl-C in the supervisor's terminal reaches the
            // supervisor only, which then stops the broker itself, after its last publications.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(MosquittoError::Spawn)?;
        let _ = std::fs::write(self.dir.join("mosquitto.pid"), child.id().to_string());
        match self.wait_listening(&mut child, stop) {
            Ok(()) => Ok(child),
            Err(MosquittoError::Exited { status, .. }) => {
                let log = std::fs::read(&log_path).unwrap_or_default();
                let new = log.get(log_len as usize..).unwrap_or_default();
                Err(MosquittoError::Exited {
                    status,
                    log: String::from_utf8_lossy(new).trim().to_owned(),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Waits until `child` listens on both addresses; kills it when it does not within 10 s
    /// or `stop()` says so. [`MosquittoError::Exited`] comes without the log.
    fn wait_listening(
        &self,
        child: &mut Child,
        stop: &dyn Fn() -> bool,
    ) -> Result<(), MosquittoError> {
        let (port, gateway) = (self.port, self.gateway);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(MosquittoError::Exited {
                    status,
                    log: String::new(),
                });
            }
            let up = |ip: IpAddr| std::net::TcpStream::connect((ip, port)).is_ok();
            if up(IpAddr::from([127, 0, 0, 1])) && up(gateway) {
                return Ok(());
            }
            if stop() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(MosquittoError::NotListening { port, gateway });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// First restart at once, then doubling from 1 s up to this.
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Starts the watcher thread of `child` (see [`watch`]).
pub(super) fn spawn_watcher(
    child: Child,
    launch: Launch,
    logins: Arc<AgentLogins>,
    stop: Arc<StopFlag>,
    status: watch::Sender<ManagedBrokerStatus>,
) -> Result<JoinHandle<()>, MosquittoError> {
    std::thread::Builder::new()
        .name("managed-broker".into())
        .spawn(move || watch(child, launch, logins, stop, status))
        .map_err(MosquittoError::Watcher)
}

/// The managed broker's watcher (a thread): waits for mosquitto to exit; unless it was told
/// to stop, logs the death (error, with the exit status), reaps it and starts it again (at
/// once, then with backoff while it keeps failing), publishing each change on `status`.
fn watch(
    mut child: Child,
    launch: Launch,
    logins: Arc<AgentLogins>,
    stop: Arc<StopFlag>,
    status: watch::Sender<ManagedBrokerStatus>,
) {
    loop {
        let pid = child.id();
        let exit = wait_exit(&mut child, &logins);
        if stop.is_set() {
            tracing::info!(status = %exit, "The managed broker stopped.");
            return;
        }
        tracing::error!(pid, status = %exit, "The managed broker died; restarting it (agents and the supervisor reconnect by themselves).");
        status.send_modify(|s| {
            s.up = false;
            s.last_exit = Some(exit.clone());
        });
        let Some(restarted) = restart(&launch, &stop) else {
            return;
        };
        child = restarted;
        if !adopt(&mut child, &logins, &stop) {
            return;
        }
        status.send_modify(|s| {
            s.up = true;
            s.restarts += 1;
        });
        tracing::warn!(
            pid = child.id(),
            restarts = status.borrow().restarts,
            "The managed broker was restarted and listens again."
        );
    }
}

/// Waits for `child` to exit, then clears its pid and reaps it; how it exited.
fn wait_exit(child: &mut Child, logins: &AgentLogins) -> String {
    use nix::sys::wait::{waitid, Id, WaitPidFlag};
    let pid = child.id();
    // Wait without reaping: until the pid is cleared below, it cannot be reused, so a
    // SIGHUP or SIGTERM sent under the lock reaches this mosquitto or a zombie of it.
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
    let id = || Id::Pid(nix::unistd::Pid::from_raw(pid as i32));
    while let Err(nix::errno::Errno::EINTR) = waitid(id(), flags) {}
    let exit = {
        let mut p = logins.lock_pid();
        *p = None;
        child.wait()
    };
    match exit {
        Ok(s) => s.to_string(),
        Err(e) => format!("unknown ({e})"),
    }
}

/// Starts mosquitto again: at once, then after 1 s, doubling up to [`RESTART_BACKOFF_MAX`]
/// while it keeps failing. `None` when told to stop first.
fn restart(launch: &Launch, stop: &StopFlag) -> Option<Child> {
    let backoff = backon::ExponentialBuilder::new()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(RESTART_BACKOFF_MAX)
        .with_factor(2.0)
        .without_max_times()
        .build();
    let mut failures = 0u32;
    for delay in std::iter::once(Duration::ZERO).chain(backoff) {
        if stop.wait(delay) {
            return None;
        }
        match launch.run(&|| stop.is_set()) {
            Ok(c) => return Some(c),
            Err(e) => {
                failures += 1;
                tracing::error!(error = %e, attempt = failures, "The managed broker could not be restarted; retrying.");
            }
        }
    }
    None
}

/// Publishes the pid of the restarted `child`; when a stop came while it was starting, stops
/// it instead (nobody else knows its pid) and says so (`false`).
fn adopt(child: &mut Child, logins: &AgentLogins, stop: &StopFlag) -> bool {
    let mut p = logins.lock_pid();
    if stop.is_set() {
        drop(p);
        signal(child.id(), Signal::SIGTERM);
        let _ = child.wait();
        return false;
    }
    *p = Some(child.id());
    true
}

/// Stops a mosquitto left running on this state directory's config by a supervisor that was
/// killed (its pid is in `mosquitto.pid` and its command line names our config).
pub(super) fn stop_leftover(state_dir: &Path) {
    let Ok(pid) = std::fs::read_to_string(state_dir.join("mosquitto.pid")) else {
        return;
    };
    let Ok(pid) = pid.trim().parse::<u32>() else {
        return;
    };
    let conf = state_dir.join("mosquitto.conf").display().to_string();
    let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(&conf))
        .unwrap_or(false);
    if !ours {
        return;
    }
    signal(pid, Signal::SIGTERM);
    let gone = || {
        // Gone, or a zombie waiting for its (dead) parent's reaper: either way it has exited.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
    };
    let deadline = Instant::now() + STOP_GRACE;
    wait_until(deadline, gone);
    if !gone() {
        signal(pid, Signal::SIGKILL);
        wait_until(deadline + Duration::from_secs(5), gone);
    }
}
