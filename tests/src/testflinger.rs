//! The testflinger stand-in (`tests/testflinger-standin/`) as a lab for end-to-end tests: its
//! server on the host, its agent and CLI installed in an agent image, its CLI on the host.
//!
//! The server listens on the gateway of Docker's default `bridge` network: the address Docker's
//! `host-gateway` stands for in `extra_hosts`, so an agent container reaches it as
//! `http://tfserver:<port>` with `extra_hosts = ["tfserver:host-gateway"]`, and the host (the
//! CLI, the test) reaches it at the same address. Nothing listens on other interfaces.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::{docker, docker_ok, free_port, wait_until, workspace_root, DockerScope, KillOnDrop};

/// The agent token the stand-in server is started with ([`TfServer::start`]).
pub const STANDIN_TOKEN: &str = "standin-refresh-token";

/// The host name agent containers use for the stand-in server (`extra_hosts`).
pub const STANDIN_HOST: &str = "tfserver";

/// Name of the local image with busybox and Debian's Python 3 (`tools/build-images.sh tf-style`).
pub const TF_STYLE_IMAGE: &str = "labvisor/tf-style:local";

/// The stand-in's directory in the workspace.
pub fn standin_dir() -> PathBuf {
    workspace_root().join("tests/testflinger-standin")
}

/// The address `host-gateway` means inside containers (docker0's address unless dockerd was
/// told otherwise): asked of Docker once, from the `/etc/hosts` of a throw-away container.
pub fn host_gateway_ip() -> String {
    static IP: OnceLock<String> = OnceLock::new();
    IP.get_or_init(|| {
        crate::ensure_busybox_image();
        let hosts = docker_ok(&[
            "run",
            "--rm",
            "--label",
            &format!("{}=host-gateway", crate::TEST_LABEL),
            "--add-host",
            "labvisor-host-gateway:host-gateway",
            crate::BUSYBOX_IMAGE,
            "cat",
            "/etc/hosts",
        ]);
        hosts
            .lines()
            .find(|l| l.ends_with("labvisor-host-gateway"))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("no host-gateway entry in {hosts}"))
            .to_owned()
    })
    .clone()
}

/// Makes sure [`TF_STYLE_IMAGE`] exists, building it with `tools/build-images.sh` if needed.
pub fn ensure_tf_style_image() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| crate::docker::ensure_local_image(TF_STYLE_IMAGE, "tf-style"));
}

/// Builds, in `scope`, an image like a lab's testflinger agent image: [`TF_STYLE_IMAGE`] with the
/// stand-in's `testflinger-agent`, `testflinger-cli` and `testflinger-device-connector` on the
/// PATH (`/usr/local/bin`). Returns its tag (removed with the scope). Built from the working
/// tree, so a changed stand-in is used.
pub fn standin_image(scope: &DockerScope) -> String {
    ensure_tf_style_image();
    let ctx = tempfile::tempdir().expect("tempdir");
    for f in [
        "testflinger_standin.py",
        "testflinger-agent",
        "testflinger-cli",
        "testflinger-device-connector",
    ] {
        std::fs::copy(standin_dir().join(f), ctx.path().join(f)).expect("copy the stand-in");
    }
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!(
            "FROM {TF_STYLE_IMAGE}\n\
             COPY testflinger_standin.py testflinger-agent testflinger-cli testflinger-device-connector \
             /usr/local/bin/\n\
             ENV PATH=/usr/local/bin:/usr/bin:/bin\n"
        ),
    )
    .expect("Dockerfile");
    scope.build_image(ctx.path(), "tf-standin")
}

/// A stand-in testflinger server on the host, killed on drop, with a directory for the CLI's
/// HOME and the test's files.
pub struct TfServer {
    dir: tempfile::TempDir,
    ip: String,
    port: u16,
    _child: KillOnDrop,
}

impl TfServer {
    /// Starts the server on a free port of the `bridge` gateway, requiring [`STANDIN_TOKEN`]
    /// from agents, and waits until it listens.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ip = host_gateway_ip();
        let port = free_port();
        let child = Command::new("python3")
            .arg(standin_dir().join("testflinger_standin.py"))
            .args(["server", "--host", &ip, "--agent-token", STANDIN_TOKEN])
            .args(["--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("server.err")).expect("server.err"))
            .spawn()
            .expect("start the stand-in server (python3)");
        let server = TfServer {
            dir,
            ip,
            port,
            _child: KillOnDrop(child),
        };
        wait_until(
            "the stand-in server listens",
            Duration::from_secs(30),
            || std::net::TcpStream::connect((server.ip.as_str(), server.port)).ok(),
        );
        server
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL for the host (the CLI, the test).
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.ip, self.port)
    }

    /// The URL for agent containers with `extra_hosts = ["tfserver:host-gateway"]`.
    pub fn container_url(&self) -> String {
        format!("http://{STANDIN_HOST}:{}", self.port)
    }

    /// A directory for the test's files, removed with the server.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// What the server wrote to stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("server.err")).unwrap_or_default()
    }

    /// Runs the stand-in `testflinger-cli ARGS` on the host against this server.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(standin_dir().join("testflinger-cli"))
            .args(args)
            .env("TESTFLINGER_SERVER", self.url())
            .env("HOME", self.dir.path())
            .current_dir(self.dir.path())
            .output()
            .expect("run the stand-in CLI")
    }

    /// `GET path` on the server: the status line and the body.
    pub fn get(&self, path: &str) -> Option<(String, String)> {
        let mut conn = std::net::TcpStream::connect((self.ip.as_str(), self.port)).ok()?;
        let req = format!(
            "GET {path} HTTP/1.0\r\nHost: {}:{}\r\n\r\n",
            self.ip, self.port
        );
        conn.write_all(req.as_bytes()).ok()?;
        let mut reply = String::new();
        conn.read_to_string(&mut reply).ok()?;
        let (head, body) = reply.split_once("\r\n\r\n")?;
        Some((head.lines().next()?.to_owned(), body.to_owned()))
    }

    /// Waits until an agent has registered `queue`.
    pub fn wait_queue(&self, queue: &str, limit: Duration) {
        wait_until(&format!("queue {queue} registered"), limit, || {
            let (status, _) = self.get(&format!("/v1/queues/{queue}/agents"))?;
            status.contains(" 200").then_some(())
        });
    }

    /// `testflinger-cli status JOB`: the job's state (`test`, `complete`, `cancelled`, ...).
    pub fn job_state(&self, job_id: &str) -> String {
        String::from_utf8_lossy(&self.cli(&["status", job_id]).stdout)
            .trim()
            .to_owned()
    }

    /// `testflinger-cli results JOB`: the JSON text.
    pub fn results(&self, job_id: &str) -> String {
        String::from_utf8_lossy(&self.cli(&["results", job_id]).stdout).into_owned()
    }
}

/// `docker logs CONTAINER`: stdout and stderr together.
pub fn docker_logs(container: &str) -> String {
    let out = docker(&["logs", container]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
