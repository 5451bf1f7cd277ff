//! `labvisor supervise` without `--broker`: it runs a managed mosquitto, its agents connect
//! through the labvisor network's gateway, each with its own login confined to its topics,
//! local tools connect anonymously on loopback, anonymous clients on the gateway are refused, a
//! killed supervisor's broker is replaced on the next start, and an earlier version's shared
//! agent login keeps working.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use labvisor_tests::{
    docker_ok, ensure_busybox_image, free_port, network_gateway, static_bin, wait_until,
    DockerScope, KillOnDrop,
};

/// A supervisor process, killed (with its managed broker) if the test fails.
fn supervise(
    scope: &DockerScope,
    sut_dir: &Path,
    state: &Path,
    port: u16,
    log: &Path,
) -> KillOnDrop {
    let child = Command::new(env!("CARGO_BIN_EXE_labvisor"))
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
        .unwrap();
    KillOnDrop(child)
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

/// `mosquitto_sub -C 1` of `topic` on the managed broker's gateway listener, with `extra`
/// arguments (a login): one retained message within 5 s, or a failure.
fn gateway_sub(gateway: &str, port: u16, topic: &str, extra: &[&str]) -> std::process::Output {
    Command::new("mosquitto_sub")
        .args([
            "-h",
            gateway,
            "-p",
            &port.to_string(),
            "-V",
            "5",
            "-t",
            topic,
            "-C",
            "1",
            "-W",
            "5",
        ])
        .args(extra)
        .output()
        .unwrap()
}

/// The SUT file of these tests: a device process printing every second, fast health.
const SUT_TEXT: &str = "image = \"labvisor/busybox:local\"\ncommand = [\"/bin/sh\", \"-c\", \"while true; do echo up; sleep 1; done\"]\n[health]\nheartbeat = \"500ms\"\nmax_age = \"3s\"\ninterval = \"1s\"\ntimeout = \"500ms\"\nretries = 2\nstart_period = \"0s\"\n";

/// A state directory from a first-session labvisor, whose agents shared one login
/// (`labvisor-agent`, password in `agent-password`): that login keeps working, with its old
/// access, for the containers made then; a wrong password is refused; new agents still get
/// their own confined logins.
#[test]
fn a_legacy_shared_agent_login_keeps_working() {
    ensure_busybox_image();
    let scope = DockerScope::new("legacy");
    let dir = tempfile::tempdir().unwrap();
    let sut_dir = dir.path().join("sut");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&sut_dir).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    let legacy = "legacy-shared-password-0123456789";
    std::fs::write(state.join("agent-password"), format!("{legacy}\n")).unwrap();
    std::fs::write(sut_dir.join("lg-1.toml"), SUT_TEXT).unwrap();
    let port = free_port();
    let log = dir.path().join("supervisor.log");
    let _sup = supervise(&scope, &sut_dir, &state, port, &log);
    let fail = |what: &str| -> String {
        format!(
            "{what}\n--- supervisor log ---\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    };
    wait_until(&fail("lg-1 idle"), Duration::from_secs(60), || {
        let v = status_json(port)?;
        let row = v["suts"]
            .as_array()?
            .iter()
            .find(|r| r["sut"] == "lg-1")?
            .clone();
        (row["state"] == "idle").then_some(())
    });
    let gateway = network_gateway(&scope.name("labvisor.net"));
    let status_topic = format!("labvisor/supervisors/{}/status", scope.run_id());

    // The shared login reads beyond one SUT's topics (the old ACL), as the old agents did.
    let out = gateway_sub(
        &gateway,
        port,
        &status_topic,
        &["-u", "labvisor-agent", "-P", legacy],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wrong = gateway_sub(
        &gateway,
        port,
        &status_topic,
        &["-u", "labvisor-agent", "-P", "wrong-password-0123456789"],
    );
    assert!(!wrong.status.success(), "a wrong password must be refused");

    // The new agent has its own login, confined to its topics.
    let own = std::fs::read_to_string(state.join("agents/lg-1")).unwrap();
    let mine = gateway_sub(
        &gateway,
        port,
        "lg-1/agent",
        &["-u", "lg-1", "-P", own.trim()],
    );
    assert!(
        mine.status.success(),
        "{}",
        String::from_utf8_lossy(&mine.stderr)
    );
    let beyond = gateway_sub(
        &gateway,
        port,
        &status_topic,
        &["-u", "lg-1", "-P", own.trim()],
    );
    assert!(
        !beyond.status.success() && beyond.stdout.is_empty(),
        "lg-1 must not read the supervisor's topics"
    );
}

#[test]
fn agents_reach_the_managed_broker_and_strangers_do_not() {
    ensure_busybox_image();
    let scope = DockerScope::new("managed");
    let dir = tempfile::tempdir().unwrap();
    let sut_dir = dir.path().join("sut");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&sut_dir).unwrap();
    let sut_text = SUT_TEXT;
    std::fs::write(sut_dir.join("mb-1.toml"), sut_text).unwrap();
    std::fs::write(sut_dir.join("mb-2.toml"), sut_text).unwrap();
    let port = free_port();
    let log = dir.path().join("supervisor.log");
    let mut sup = supervise(&scope, &sut_dir, &state, port, &log);
    let fail = |what: &str| -> String {
        format!(
            "{what}\n--- supervisor log ---\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    };

    // Each agent, inside its container, connects to the broker on the gateway: its retained
    // status says so, read by `labvisor status` on loopback (anonymous).
    let connected = |sut: &str| {
        let v = status_json(port)?;
        let row = v["suts"]
            .as_array()?
            .iter()
            .find(|r| r["sut"] == sut)?
            .clone();
        (row["state"] == "idle" && row["health"] == "healthy").then_some(row)
    };
    let row = wait_until(
        &fail("mb-1 idle and connected"),
        Duration::from_secs(60),
        || connected("mb-1"),
    );
    assert_eq!(row["supervisor"], scope.run_id());
    wait_until(
        &fail("mb-2 idle and connected"),
        Duration::from_secs(60),
        || connected("mb-2"),
    );

    // Each agent has its own password, private to the state directory.
    let mode = |p: &Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
    };
    let agents = state.join("agents");
    assert_eq!(mode(&agents) & 0o077, 0, "the agents' directory is private");
    assert_eq!(
        mode(&agents.join("mb-1")) & 0o077,
        0,
        "agent password file is private"
    );
    let password = std::fs::read_to_string(agents.join("mb-1")).unwrap();
    let password2 = std::fs::read_to_string(agents.join("mb-2")).unwrap();
    assert_ne!(password, password2);
    assert!(!state.join("agent-password").exists(), "no shared login");

    // On the gateway, an anonymous client is refused and the agents' credentials work.
    let net = scope.name("labvisor.net");
    let gateway = network_gateway(&net);
    let sub = |topic: &str, extra: &[&str]| gateway_sub(&gateway, port, topic, extra);
    let anon = sub("mb-1/agent", &[]);
    assert!(
        !anon.status.success(),
        "anonymous on the gateway must be refused"
    );
    let mb1 = ["-u", "mb-1", "-P", password.trim()];
    let own = sub("mb-1/agent", &mb1);
    assert!(
        own.status.success(),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );
    // mb-2's retained status is there (mb-2 is connected), but mb-1 may not read it.
    let other = sub("mb-2/agent", &mb1);
    assert!(
        !other.status.success() && other.stdout.is_empty(),
        "mb-1 must not read mb-2's topics: {}",
        String::from_utf8_lossy(&other.stdout)
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
        "the agent containers were adopted, not recreated"
    );

    // A SUT added while the broker runs gets its login (mosquitto reloads its password file)
    // and its agent connects.
    std::fs::write(sut_dir.join("mb-3.toml"), sut_text).unwrap();
    wait_until(
        &fail("mb-3 idle and connected"),
        Duration::from_secs(60),
        || connected("mb-3"),
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
