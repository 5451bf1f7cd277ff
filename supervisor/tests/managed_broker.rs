//! `labvisor supervise` without `--broker`: it runs a managed mosquitto, its agents connect
//! through the labvisor network's gateway with a password, local tools connect anonymously on
//! loopback, anonymous clients on the gateway are refused, and a killed supervisor's broker is
//! replaced on the next start.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use labvisor_tests::{
    docker_ok, ensure_busybox_image, free_port, static_bin, wait_until, DockerScope,
};

fn supervise(scope: &DockerScope, sut_dir: &Path, state: &Path, port: u16, log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_labvisor"))
        .arg("supervise")
        .arg("--sut-dir")
        .arg(sut_dir)
        .args(["--id", scope.run_id()])
        .args(["--name-prefix", &scope.name("")])
        .args(["--extra-label", &scope.label()])
        .args(["--broker-port", &port.to_string()])
        .args(["--metrics-listen", "none"])
        .arg("--state-dir")
        .arg(state)
        .arg("--agent-bin")
        .arg(static_bin("labvisor-agent"))
        .arg("--healthcheck-bin")
        .arg(static_bin("labvisor-healthcheck"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn status_json(port: u16) -> Option<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_labvisor"))
        .args([
            "status",
            "--json",
            "--broker",
            &format!("mqtt://127.0.0.1:{port}"),
        ])
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

#[test]
fn agents_reach_the_managed_broker_and_strangers_do_not() {
    ensure_busybox_image();
    let scope = DockerScope::new("managed");
    let dir = tempfile::tempdir().unwrap();
    let sut_dir = dir.path().join("sut");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&sut_dir).unwrap();
    std::fs::write(
        sut_dir.join("mb-1.toml"),
        "image = \"labvisor/busybox:local\"\ncommand = [\"/bin/sh\", \"-c\", \"while true; do echo up; sleep 1; done\"]\n[health]\nheartbeat = \"500ms\"\nmax_age = \"3s\"\ninterval = \"1s\"\ntimeout = \"500ms\"\nretries = 2\nstart_period = \"0s\"\n",
    )
    .unwrap();
    let port = free_port();
    let log = dir.path().join("supervisor.log");
    let mut sup = supervise(&scope, &sut_dir, &state, port, &log);
    let fail = |what: &str| -> String {
        format!(
            "{what}\n--- supervisor log ---\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    };

    // The agent, inside its container, connects to the broker on the gateway: its retained
    // status says so, read by `labvisor status` on loopback (anonymous).
    let row = wait_until(
        &fail("mb-1 idle and connected"),
        Duration::from_secs(60),
        || {
            let v = status_json(port)?;
            let row = v["suts"]
                .as_array()?
                .iter()
                .find(|r| r["sut"] == "mb-1")?
                .clone();
            (row["state"] == "idle" && row["health"] == "healthy").then_some(row)
        },
    );
    assert_eq!(row["supervisor"], scope.run_id());

    // The agents' password is private to the state directory.
    let secret = state.join("agent-password");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&secret).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "agent password file is private");
    let password = std::fs::read_to_string(&secret).unwrap();

    // On the gateway, an anonymous client is refused and the agents' credentials work.
    let net = scope.name("labvisor");
    let gateway = docker_ok(&[
        "network",
        "inspect",
        "-f",
        "{{range .IPAM.Config}}{{.Gateway}}{{end}}",
        &net,
    ]);
    let sub = |extra: &[&str]| {
        Command::new("mosquitto_sub")
            .args([
                "-h",
                &gateway,
                "-p",
                &port.to_string(),
                "-t",
                "mb-1/agent",
                "-C",
                "1",
                "-W",
                "5",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let anon = sub(&[]);
    assert!(
        !anon.status.success(),
        "anonymous on the gateway must be refused"
    );
    let agent = sub(&["-u", "labvisor-agent", "-P", password.trim()]);
    assert!(
        agent.status.success(),
        "{}",
        String::from_utf8_lossy(&agent.stderr)
    );

    // SIGKILL the supervisor: its broker is orphaned; the next supervisor stops it and starts
    // its own on the same port, and the agent (same container) reconnects with the same password.
    let id_before = docker_ok(&["ps", "-q", "--filter", &format!("label={}", scope.label())]);
    sup.kill().unwrap();
    sup.wait().unwrap();
    let log2 = dir.path().join("supervisor2.log");
    let mut sup2 = supervise(&scope, &sut_dir, &state, port, &log2);
    wait_until(
        "mb-1 reported again after the supervisor restart",
        Duration::from_secs(60),
        || {
            let v = status_json(port)?;
            let sups = v["supervisors"].as_array()?;
            let online = sups.iter().any(|s| s["state"] == "online");
            let row = v["suts"]
                .as_array()?
                .iter()
                .find(|r| r["sut"] == "mb-1")?
                .clone();
            (online && row["state"] == "idle" && row["heartbeat_age_ms"].as_u64()? < 3000)
                .then_some(())
        },
    );
    let id_after = docker_ok(&["ps", "-q", "--filter", &format!("label={}", scope.label())]);
    assert_eq!(
        id_before, id_after,
        "the agent container was adopted, not recreated"
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sup2.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let status = sup2.wait().unwrap();
    assert!(status.success(), "{status}");
    // A clean stop takes the managed broker down with it.
    wait_until(
        "the managed broker stopped",
        Duration::from_secs(10),
        || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .is_err()
                .then_some(())
        },
    );
}
