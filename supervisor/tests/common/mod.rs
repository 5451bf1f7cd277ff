//! What the supervisor's Docker tests share: a real `labvisor supervise` process scoped to one
//! test (unique `--id`, `--name-prefix` and `--extra-label`), and helpers to read Docker's and the
//! broker's view of its SUTs.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use labvisor_protocol::payloads::SutView;
use labvisor_tests::{docker_ok, static_bin, wait_until, DockerScope, Subscriber};

/// A running `labvisor supervise`, killed on drop.
pub struct Sup {
    pub child: Child,
    pub log: PathBuf,
}

impl Sup {
    /// Starts `labvisor supervise` on `dir` with `--broker broker` (if given) and `extra`
    /// arguments. Agents run without MQTT (`--agent-broker none`) unless `extra` has
    /// `--agent-broker`.
    pub fn start(scope: &DockerScope, dir: &Path, broker: Option<&str>, extra: &[&str]) -> Sup {
        Sup::start_wrapped(&[], scope, dir, broker, extra)
    }

    /// Like [`Sup::start`], but through `wrapper`: a program and its arguments, to which the
    /// supervisor's command line is appended, and which must `exec` it (so that the child's pid
    /// is the supervisor's).
    pub fn start_wrapped(
        wrapper: &[&str],
        scope: &DockerScope,
        dir: &Path,
        broker: Option<&str>,
        extra: &[&str],
    ) -> Sup {
        let log = dir.parent().expect("sut dir has a parent").join(format!(
            "supervisor-{}.log",
            labvisor_tests::unique_id("log")
        ));
        let labvisor = env!("CARGO_BIN_EXE_labvisor");
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(labvisor);
                c
            }
            None => Command::new(labvisor),
        };
        cmd.arg("supervise")
            .arg("--sut-dir")
            .arg(dir)
            .args(["--id", scope.run_id()])
            .args(["--name-prefix", &scope.name("")])
            .args(["--extra-label", &scope.label()])
            .args(["--stop-timeout", "2s"])
            .arg("--agent-bin")
            .arg(static_bin("labvisor-agent"))
            .arg("--healthcheck-bin")
            .arg(static_bin("labvisor-healthcheck"))
            .args(extra)
            .env("LABVISOR_LOG", "info,labvisor_supervisor=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        if !extra.contains(&"--metrics-listen") {
            cmd.args(["--metrics-listen", "none"]);
        }
        if !extra.contains(&"--agent-broker") {
            cmd.args(["--agent-broker", "none"]);
        }
        if let Some(b) = broker {
            cmd.args(["--broker", b]);
        }
        let child = cmd.spawn().expect("spawn labvisor supervise");
        Sup { child, log }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Sup {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- supervisor log ---\n{}", self.log());
        }
    }
}

/// A SUT file for `image` running a sleeping shell, with fast health timings (probe every 2 s,
/// unhealthy after one failure) and `extra` appended (more tables).
pub fn fast_sut(image: &str, extra: &str) -> String {
    format!(
        r#"image = "{image}"
command = ["/bin/sh", "-c", "while true; do sleep 5; done"]
[health]
heartbeat = "1s"
max_age = "3s"
interval = "2s"
timeout = "1s"
retries = 1
start_period = "0s"
{extra}"#
    )
}

/// Waits until something accepts TCP connections on `addr` (a supervisor's `--metrics-listen`).
pub fn wait_listening(addr: &str, limit: Duration) {
    wait_until(&format!("something listening on {addr}"), limit, || {
        std::net::TcpStream::connect(addr).ok().map(|_| ())
    });
}

/// Writes like an editor: a hidden temporary file renamed over the target.
/// Makes the bridge `name` (scoped) labelled as the scope's supervisor's own, so the supervisor
/// adopts it; made before the supervisor when a broker must listen on its gateway.
pub fn own_network(scope: &DockerScope, name: &str) -> String {
    let net = scope.name(name);
    docker_ok(&[
        "network",
        "create",
        "--label",
        &scope.label(),
        "--label",
        "io.labvisor.managed-by=labvisor",
        "--label",
        &format!("io.labvisor.supervisor={}", scope.run_id()),
        &net,
    ]);
    net
}

pub fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// The scope's containers: name → (id, status).
pub fn ps(scope: &DockerScope) -> BTreeMap<String, (String, String)> {
    docker_ok(&[
        "ps",
        "-a",
        "--no-trunc",
        "--filter",
        &format!("label={}", scope.label()),
        "--format",
        "{{.Names}}\t{{.ID}}\t{{.Status}}",
    ])
    .lines()
    .filter_map(|l| {
        let mut it = l.split('\t');
        Some((
            it.next()?.to_owned(),
            (it.next()?.to_owned(), it.next()?.to_owned()),
        ))
    })
    .collect()
}

/// Waits until the SUT's container runs and is healthy; returns its id.
pub fn wait_healthy(scope: &DockerScope, sut: &str, limit: Duration) -> String {
    let name = scope.name(sut);
    wait_until(&format!("{name} running and healthy"), limit, || {
        let (id, status) = ps(scope).remove(&name)?;
        status.ends_with("(healthy)").then_some(id)
    })
}

/// The latest retained view of `sut` as seen by `sub` (subscribed to `+/supervisor`).
pub fn views(sub: &Subscriber, sut: &str) -> Vec<SutView> {
    let prefix = format!("{sut}/supervisor ");
    sub.lines()
        .iter()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|p| serde_json::from_str(p).ok())
        .collect()
}

/// A fresh `sut/` directory inside a temporary directory (the supervisor's log goes beside it).
pub fn tmp_sut_dir() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("sut");
    std::fs::create_dir(&d).unwrap();
    (t, d)
}

/// The agent process of the container `name`: the only child of its `docker-init` (PID 1 of
/// the container, `State.Pid` on the host).
pub fn agent_pid(name: &str) -> String {
    let init = docker_ok(&["inspect", "-f", "{{.State.Pid}}", name]);
    let children = std::fs::read_to_string(format!("/proc/{init}/task/{init}/children"))
        .expect("the children of docker-init");
    let pid = children
        .split_whitespace()
        .next()
        .expect("an agent process")
        .to_owned();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_eq!(comm.trim(), "labvisor-agent", "pid {pid} is the agent");
    pid
}

/// Sends `SIGCONT` to a process stopped by the test when dropped (a failed test leaves no
/// stopped process behind; a killed one is gone anyway).
pub struct Stopped(pub String);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.0])
            .stderr(std::process::Stdio::null())
            .status();
    }
}
