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
//! - [`static_bin`] and [`ensure_busybox_image`]: the static agent/healthcheck binaries and the
//!   local busybox image, built by `tools/test.sh` (no registry is needed).
//!
//! Missing mosquitto or Docker is a loud failure, never a skip: `tools/test.sh` installs and
//! starts both.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
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

fn require_program(name: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        for d in [dir, "/usr/sbin", "/sbin"] {
            let p = Path::new(d).join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!("{name} is not installed: run tools/test.sh, which installs and starts everything the tests need");
}

// ---------------------------------------------------------------------------------------------
// mosquitto

/// A real mosquitto broker on a free loopback port, stopped on drop.
pub struct Mosquitto {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    conf: PathBuf,
}

impl Mosquitto {
    /// Starts an anonymous, non-persistent broker.
    pub fn start() -> Self {
        Self::start_with("allow_anonymous true\npersistence false\n")
    }

    /// Starts a broker with `extra` appended to a generated config that has only a listener.
    /// `extra` may use `{dir}` for the broker's private temporary directory and `{port}` for the
    /// broker's port (for another listener on the same port, on another address).
    pub fn start_with(extra: &str) -> Self {
        let bin = require_program("mosquitto");
        let dir = tempfile::Builder::new()
            .prefix("labvisor-mosquitto-")
            .tempdir()
            .expect("tempdir");
        let conf = dir.path().join("mosquitto.conf");
        let mut m = Mosquitto {
            child: None,
            port: 0,
            dir,
            conf,
        };
        let mut last_err = String::new();
        for _ in 0..20 {
            m.port = free_port();
            let text = format!(
                "listener {} 127.0.0.1\nlog_dest stderr\n{}\n",
                m.port,
                extra
                    .replace("{dir}", &m.dir.path().display().to_string())
                    .replace("{port}", &m.port.to_string())
            );
            std::fs::write(&m.conf, text).expect("write mosquitto.conf");
            match m.spawn(&bin) {
                Ok(()) => return m,
                Err(e) => last_err = e,
            }
        }
        panic!("mosquitto did not start: {last_err}");
    }

    fn spawn(&mut self, bin: &Path) -> Result<(), String> {
        let log = std::fs::File::create(self.dir.path().join("mosquitto.log")).expect("log file");
        let mut child = Command::new(bin)
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn {bin:?}: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return Err(format!("mosquitto exited with {status}: {}", self.log()));
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "mosquitto did not listen within 10 s: {}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The broker's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The broker's private directory (config, log, password files a test writes).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What the broker logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// Kills the broker (SIGKILL), as a crash would.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The broker's process id (for `kill -STOP`), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the broker again on the same port with the same config.
    pub fn restart(&mut self) {
        self.stop();
        let bin = require_program("mosquitto");
        // The port was ours a moment ago; retry briefly in case the kernel still holds it.
        wait_until(
            "mosquitto to restart on its port",
            Duration::from_secs(10),
            || self.spawn(&bin).ok(),
        );
    }

    /// `mosquitto_pub` with the given extra arguments (for example `-q 1 -r`).
    pub fn publish(&self, topic: &str, payload: &str, extra: &[&str]) -> Output {
        let bin = require_program("mosquitto_pub");
        run(Command::new(bin)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-t",
                topic,
                "-m",
                payload,
            ])
            .args(extra))
    }

    /// Starts `mosquitto_sub -v` on `topic` in the background; see [`Subscriber`].
    pub fn subscribe(&self, topic: &str, extra: &[&str]) -> Subscriber {
        Subscriber::start(self.port, topic, extra)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A background `mosquitto_sub -v` whose lines (`topic payload`) are collected as they arrive.
pub struct Subscriber {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Subscriber {
    /// `mosquitto_sub -v` on `topic` against the broker on `127.0.0.1:port` (one of this kit's,
    /// or another, such as a container's published port), with `extra` arguments.
    pub fn start(port: u16, topic: &str, extra: &[&str]) -> Self {
        let bin = require_program("mosquitto_sub");
        let id = unique_id("sub");
        let mut child = Command::new(bin)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-v",
                "-t",
                topic,
                "-i",
                &id,
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto_sub");
        let mut out = child.stdout.take().expect("stdout");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let l2 = lines.clone();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            while let Ok(n) = out.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let s = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                    l2.lock().unwrap().push(s);
                }
            }
        });
        // mosquitto_sub has no "subscribed" signal on stdout; a retained probe message on a
        // private topic would need the topic filter to match. Tests that need a live
        // subscription before publishing call `wait_subscribed` with a probe topic.
        Subscriber { child, lines }
    }

    /// Lines received so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits until at least `n` lines arrived.
    pub fn wait_lines(&self, n: usize, limit: Duration) -> Vec<String> {
        wait_until(&format!("{n} MQTT messages"), limit, || {
            let l = self.lines();
            (l.len() >= n).then_some(l)
        })
    }

    /// Waits until a line satisfies `pred`, and returns it.
    pub fn wait_for(&self, what: &str, limit: Duration, pred: impl Fn(&str) -> bool) -> String {
        wait_until(what, limit, || self.lines().into_iter().find(|l| pred(l)))
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Docker

/// Panics (never skips) unless a Docker engine answers.
pub fn require_docker() {
    static OK: OnceLock<()> = OnceLock::new();
    OK.get_or_init(|| {
        let out = run(Command::new(require_program("docker")).args([
            "version",
            "--format",
            "{{.Server.APIVersion}}",
        ]));
        assert!(
            out.status.success(),
            "no Docker engine answers ({}): run tools/test.sh, which starts dockerd",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    });
}

/// Runs the docker CLI with `args`.
pub fn docker(args: &[&str]) -> Output {
    require_docker();
    run(Command::new("docker").args(args))
}

/// Runs the docker CLI with `args`, panics unless it succeeds, and returns trimmed stdout.
pub fn docker_ok(args: &[&str]) -> String {
    require_docker();
    run_ok(Command::new("docker").args(args)).trim().to_owned()
}

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

/// A unix-socket proxy in front of the Docker engine's socket, which a test can cut (every
/// open connection closed, new ones closed at once) and restore: "the daemon is unreachable,
/// then back", seen through `DOCKER_HOST=`[`DockerProxy::url`], without stopping the engine under
/// the other tests' containers. Stopped on drop.
pub struct DockerProxy {
    _dir: tempfile::TempDir,
    path: PathBuf,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::os::unix::net::UnixStream>>>,
}

impl DockerProxy {
    /// Listens on a fresh socket and forwards each connection to `/var/run/docker.sock`.
    pub fn start() -> Self {
        use std::os::unix::net::{UnixListener, UnixStream};
        use std::sync::atomic::AtomicBool;
        use std::sync::{Arc, Mutex};
        require_docker();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("docker.sock");
        let listener = UnixListener::bind(&path).expect("bind the proxy socket");
        let up = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        let (up2, stop2, conns2) = (up.clone(), stop.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                if !up2.load(Ordering::SeqCst) {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(engine) = UnixStream::connect("/var/run/docker.sock") else {
                    continue;
                };
                let pipe = |mut from: UnixStream, mut to: UnixStream| {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                };
                let mut held = conns2.lock().unwrap_or_else(|p| p.into_inner());
                for s in [&client, &engine] {
                    if let Ok(c) = s.try_clone() {
                        held.push(c);
                    }
                }
                if let (Ok(c), Ok(e)) = (client.try_clone(), engine.try_clone()) {
                    pipe(c, engine);
                    pipe(e, client);
                }
            }
        });
        DockerProxy {
            _dir: dir,
            path,
            up,
            stop,
            conns,
        }
    }

    /// `unix://…`, for `DOCKER_HOST`.
    pub fn url(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    /// The engine becomes unreachable: open connections (the event stream too) are closed,
    /// new ones are closed at once.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.close_all();
    }

    /// The engine is reachable again.
    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    fn close_all(&self) {
        let mut held = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        for s in held.drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for DockerProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.close_all();
        // Wakes the accept loop so that it sees `stop`.
        let _ = std::os::unix::net::UnixStream::connect(&self.path);
    }
}

/// The IPv4 gateway of the Docker network `name`: the host's address on that bridge.
pub fn network_gateway(name: &str) -> String {
    docker_ok(&[
        "network",
        "inspect",
        "-f",
        "{{range .IPAM.Config}}{{.Gateway}}{{end}}",
        name,
    ])
}

/// A unique label and name prefix for one test's Docker objects. On drop, every container,
/// volume and network carrying the label is removed, also when the test failed.
pub struct DockerScope {
    run: String,
}

impl DockerScope {
    /// A new scope; `test` becomes part of the names, to make leftovers easy to trace.
    pub fn new(test: &str) -> Self {
        require_docker();
        DockerScope {
            run: unique_id(&format!("lvt-{test}")),
        }
    }

    /// The run id, the value of [`TEST_LABEL`].
    pub fn run_id(&self) -> &str {
        &self.run
    }

    /// `io.labvisor.test.run=<run id>`, for `--label` and `--filter label=`.
    pub fn label(&self) -> String {
        format!("{TEST_LABEL}={}", self.run)
    }

    /// A Docker object name unique to this scope.
    pub fn name(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.run)
    }

    /// Builds an image from a context directory holding a Dockerfile, labelled with this scope
    /// (so it is removed with the scope), and returns its tag.
    pub fn build_image(&self, context: &Path, suffix: &str) -> String {
        let tag = format!("{}:test", self.name(suffix));
        docker_ok(&[
            "build",
            "-q",
            "--label",
            &self.label(),
            "-t",
            &tag,
            &context.display().to_string(),
        ]);
        tag
    }

    /// Removes every container, volume, network and image carrying this scope's label.
    pub fn cleanup(&self) {
        let filter = format!("label={}", self.label());
        let ids = docker(&["ps", "-aq", "--filter", &filter]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = docker(&["rm", "-f", "-v", id]);
        }
        let vols = docker(&["volume", "ls", "-q", "--filter", &filter]);
        for v in String::from_utf8_lossy(&vols.stdout).split_whitespace() {
            let _ = docker(&["volume", "rm", "-f", v]);
        }
        let nets = docker(&["network", "ls", "-q", "--filter", &filter]);
        for n in String::from_utf8_lossy(&nets.stdout).split_whitespace() {
            let _ = docker(&["network", "rm", n]);
        }
        let images = docker(&["image", "ls", "-q", "--filter", &filter]);
        for i in String::from_utf8_lossy(&images.stdout).split_whitespace() {
            let _ = docker(&["image", "rm", "-f", i]);
        }
    }
}

impl Drop for DockerScope {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Path of a static binary built by `cargo static` (`tools/test.sh` builds them first), under
/// `$CARGO_TARGET_DIR` when set, else the workspace's `target/`.
pub fn static_bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| {
            if t.is_absolute() {
                t
            } else {
                workspace_root().join(t)
            }
        })
        .unwrap_or_else(|| workspace_root().join("target"));
    let p = target.join("x86_64-unknown-linux-gnu/release").join(name);
    assert!(
        p.is_file(),
        "{} is missing: run `cargo static` (tools/test.sh does)",
        p.display()
    );
    p
}

/// Makes sure [`BUSYBOX_IMAGE`] exists, building it with `tools/build-images.sh` if needed.
pub fn ensure_busybox_image() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        if docker(&["image", "inspect", BUSYBOX_IMAGE])
            .status
            .success()
        {
            return;
        }
        run_ok(
            Command::new("bash")
                .arg(workspace_root().join("tools/build-images.sh"))
                .arg("busybox"),
        );
    });
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

/// A test PKI made with openssl in `dir`: for each name in `cas` a self-signed CA (`<name>.crt`,
/// `<name>.key`), and `server.crt`/`server.key` signed by the first, with `subject_alt_name`
/// (e.g. `IP:127.0.0.1,DNS:localhost`). Files are world-readable: mosquitto started as root drops
/// to its own user before reading the key.
pub fn test_pki(dir: &Path, cas: &[&str], subject_alt_name: &str) {
    use std::os::unix::fs::PermissionsExt;
    let ossl = |args: &[&str]| {
        run_ok(Command::new("openssl").current_dir(dir).args(args));
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for ca in cas {
        let (key, crt, subj) = (
            format!("{ca}.key"),
            format!("{ca}.crt"),
            format!("/CN=labvisor test {ca}"),
        );
        let mut a = vec!["req", "-x509"];
        a.extend(ec);
        a.extend(["-keyout", &key, "-out", &crt, "-days", "2", "-subj", &subj]);
        ossl(&a);
    }
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=labvisor test server",
    ]);
    ossl(&a);
    std::fs::write(
        dir.join("ext.cnf"),
        format!("subjectAltName={subject_alt_name}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"),
    )
    .unwrap();
    let (ca_crt, ca_key) = (format!("{}.crt", cas[0]), format!("{}.key", cas[0]));
    ossl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        &ca_crt,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    for f in ["server.key", "server.crt"]
        .into_iter()
        .map(String::from)
        .chain(cas.iter().map(|c| format!("{c}.crt")))
    {
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}
