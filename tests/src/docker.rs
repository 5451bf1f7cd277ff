//! Docker for tests: the engine must answer ([`require_docker`]), the docker CLI, a unique
//! label and name prefix per test that removes everything it made on drop ([`DockerScope`]), a
//! proxy that cuts the engine's socket ([`DockerProxy`]), and the static binaries and local
//! image the containers use.

use crate::{require_program, run, run_ok, unique_id, workspace_root, BUSYBOX_IMAGE, TEST_LABEL};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::Ordering;
use std::sync::OnceLock;

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
    ///
    /// The label goes into the Dockerfile right after each `FROM`, not through `--label` (which
    /// the builder adds as the last step). So every layer above the base is this scope's own:
    /// two tests building the same Dockerfile at once share no cached intermediate image, and
    /// one scope's cleanup (which prunes its image's untagged parents) cannot remove a layer
    /// that another build is just using ("failed to get digest ...: no such file").
    pub fn build_image(&self, context: &Path, suffix: &str) -> String {
        let tag = format!("{}:test", self.name(suffix));
        let dockerfile = context.join("Dockerfile");
        let text = std::fs::read_to_string(&dockerfile)
            .unwrap_or_else(|e| panic!("read {}: {e}", dockerfile.display()));
        std::fs::write(&dockerfile, label_each_stage(&text, &self.label()))
            .unwrap_or_else(|e| panic!("write {}: {e}", dockerfile.display()));
        docker_ok(&["build", "-q", "-t", &tag, &context.display().to_string()]);
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

/// `text` with `LABEL <label>` inserted after every `FROM` line.
fn label_each_stage(text: &str, label: &str) -> String {
    let mut out = String::with_capacity(text.len() + 64);
    for line in text.lines() {
        out.push_str(line);
        out.push('\n');
        let first = line.split_whitespace().next().unwrap_or("");
        if first.eq_ignore_ascii_case("FROM") {
            out.push_str(&format!("LABEL {label}\n"));
        }
    }
    out
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
    DONE.get_or_init(|| ensure_local_image(BUSYBOX_IMAGE, "busybox"));
}

/// Builds the local image `image` with `tools/build-images.sh KIND` unless it exists.
pub(crate) fn ensure_local_image(image: &str, kind: &str) {
    if docker(&["image", "inspect", image]).status.success() {
        return;
    }
    run_ok(
        Command::new("bash")
            .arg(workspace_root().join("tools/build-images.sh"))
            .arg(kind),
    );
}
