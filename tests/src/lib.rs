//! # labvisor test kit
//!
//! What labvisor's integration tests share, so that every test runs against real components
//! and cleans up after itself:
//!
//! - [`Mosquitto`]: a real mosquitto broker on a free loopback port, with its own generated
//!   config, killed on drop. Tests never hard-code a port.
//! - [`DockerScope`]: a unique run label and name prefix for every container, volume and network a
//!   test creates; on drop (also when the test panics) everything carrying the label is removed.
//! - [`DockerProxy`]: the engine's socket behind a proxy a test can cut and restore, for "Docker
//!   is unreachable" without stopping the engine under other tests.
//! - [`wait_until`]: wait for a condition with a deadline, never a bare sleep.
//! - [`Swarm`]: a Docker Swarm of node containers (one engine each) for the swarm runtime's
//!   tests, never the machine's own engine.
//! - [`Browser`]: a real headless Chromium driven through WebDriver (chromedriver), for the web
//!   pages' tests: clicks, text, console errors, screenshots; no process left on drop.
//! - [`static_bin`] and [`ensure_busybox_image`]: the static agent/healthcheck binaries and the
//!   local busybox image, built by `tools/test.sh` (no registry is needed).
//!
//! Missing mosquitto or Docker is a loud failure, never a skip: `tools/test.sh` installs and
//! starts both.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Label key put on every Docker object a test creates; its value is the test's unique run id.
pub const TEST_LABEL: &str = "io.labvisor.test.run";

/// Name of the local busybox image (a `docker import` of Debian's busybox-static).
pub const BUSYBOX_IMAGE: &str = "labvisor/busybox:local";

/// Root of the workspace checkout.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A string unique to this call within the whole machine (pid, time, counter).
pub fn unique_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros()
        % 1_000_000_000;
    format!("{prefix}-{}-{t}-{n}", std::process::id())
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port on 127.0.0.1")
        .port()
}

/// Polls `f` every 20 ms until it returns `Some`, or panics after `limit` naming `what`.
pub fn wait_until<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command and returns its output; panics if it cannot be started.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command, panics unless it exits 0, and returns its stdout as a string.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The program's path on `PATH` (or in /usr/sbin, /sbin), or `None`.
pub(crate) fn find_program(name: &str) -> Option<PathBuf> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .flat_map(|dir| [dir, "/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

pub(crate) fn require_program(name: &str) -> PathBuf {
    if let Some(p) = find_program(name) {
        return p;
    }
    panic!("{name} is not installed: run tools/test.sh, which installs and starts everything the tests need");
}

mod browser;
mod docker;
mod mosquitto;
mod pki;
mod swarm;
mod testflinger;

pub use browser::*;
pub use docker::*;
pub use mosquitto::*;
pub use pki::test_pki;
pub use swarm::*;
pub use testflinger::*;

/// A child process that is stopped (and reaped) when dropped, also when the test panics:
/// SIGTERM first, so it can stop what it started (a supervisor its managed broker), then
/// SIGKILL after 10 s.
pub struct KillOnDrop(pub std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Writes `bytes` to a file in a fresh temporary directory and returns both.
pub fn temp_file(name: &str, bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join(name);
    std::fs::File::create(&p)
        .and_then(|mut f| f.write_all(bytes))
        .expect("write temp file");
    (dir, p)
}
