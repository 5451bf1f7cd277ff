//! The agents' MQTT link over TLS, with real Docker, a real mosquitto and real agents in their
//! containers:
//!
//! - `labvisor supervise --agent-tls`: the managed broker's agent listener speaks only TLS, with
//!   the supervisor's own CA (key private to the state directory) and a server certificate for
//!   the network's gateway; the agent connects over it and a job runs end to end; a plain MQTT
//!   connection to that listener is refused, even with the agent's own valid login; a restarted
//!   supervisor keeps the CA, so the agent's container is adopted and reconnects; turning
//!   `--agent-tls` on for a lab that ran without it recreates the agents' containers;
//! - an external `mqtts://` broker (mosquitto with a certificate from a test CA made with
//!   openssl): agents given that CA with `--mqtt-ca` connect, and a job runs end to end.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::own_network;
use labvisor_tests::{
    docker, docker_ok, ensure_busybox_image, free_port, network_gateway, static_bin, test_pki,
    wait_until, DockerScope, KillOnDrop, Mosquitto,
};

const T: Duration = Duration::from_secs(60);

/// A device process printing every second, fast health.
const SUT_TEXT: &str = "image = \"labvisor/busybox:local\"\ncommand = [\"/bin/sh\", \"-c\", \"while true; do echo up; sleep 1; done\"]\n[health]\nheartbeat = \"500ms\"\nmax_age = \"3s\"\ninterval = \"1s\"\ntimeout = \"500ms\"\nretries = 2\nstart_period = \"0s\"\n";

/// `labvisor supervise` scoped to the test, with `extra` arguments; killed on drop.
fn supervise(scope: &DockerScope, sut_dir: &Path, log: &Path, extra: &[&str]) -> KillOnDrop {
    let child = Command::new(env!("CARGO_BIN_EXE_labvisor"))
        .arg("supervise")
        .arg("--sut-dir")
        .arg(sut_dir)
        .args(["--id", scope.run_id()])
        .args(["--name-prefix", &scope.name("")])
        .args(["--extra-label", &scope.label()])
        .args(["--metrics-listen", "none"])
        .arg("--agent-bin")
        .arg(static_bin("labvisor-agent"))
        .arg("--healthcheck-bin")
        .arg(static_bin("labvisor-healthcheck"))
        .args(extra)
        .env_remove("LABVISOR_MQTT_CA")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    KillOnDrop(child)
}

/// `labvisor <args>` against the broker at `url` (plain, loopback), as a local tool of the
/// managed broker whose state directory is `state` (its local login).
fn labvisor(url: &str, state: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_labvisor"))
        .args(args)
        .env("LABVISOR_BROKER", url)
        .env("LABVISOR_STATE_DIR", state)
        .env_remove("LABVISOR_TOPIC_PREFIX")
        .env_remove("LABVISOR_MQTT_CA")
        .output()
        .unwrap()
}

/// `sut`'s row in `labvisor status --json`, once it is idle and healthy.
fn idle_and_healthy(url: &str, state: &Path, sut: &str) -> Option<serde_json::Value> {
    let out = labvisor(url, state, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let row = v["suts"]
        .as_array()?
        .iter()
        .find(|r| r["sut"] == sut)?
        .clone();
    (row["state"] == "idle" && row["health"] == "healthy").then_some(row)
}

/// Submits a two-line job to `sut` with `--follow`: its id and output, and exit status 0.
fn run_job(url: &str, state: &Path, sut: &str, id: &str) {
    let o = labvisor(
        url,
        state,
        &[
            "submit",
            sut,
            "--follow",
            "--id",
            id,
            "--",
            "sh",
            "-c",
            "echo over tls; echo done",
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("{id}\nover tls\ndone\n")
    );
    let o = labvisor(url, state, &["jobs", sut, "--json"]);
    let jobs: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let runs: Vec<&serde_json::Value> = jobs
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["id"] == id)
        .collect();
    assert_eq!(runs.len(), 1, "the job ran once: {jobs}");
    assert_eq!(runs[0]["state"], "passed", "{jobs}");
}

/// The value of `key` in the container's environment.
fn container_env(container: &str, key: &str) -> Option<String> {
    let env = docker_ok(&["inspect", "-f", "{{json .Config.Env}}", container]);
    let env: Vec<String> = serde_json::from_str(&env).unwrap();
    env.iter()
        .find_map(|e| e.strip_prefix(&format!("{key}=")).map(str::to_owned))
}

/// `mosquitto_sub -C 1` of `topic` at `host:port` with `extra` arguments: one retained message
/// within 5 s, or a failure.
fn sub_one(host: &str, port: u16, topic: &str, extra: &[&str]) -> Output {
    Command::new("mosquitto_sub")
        .args(["-h", host, "-p", &port.to_string(), "-V", "5"])
        .args(["-t", topic, "-C", "1", "-W", "5"])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn managed_broker_serves_agents_over_tls_only() {
    ensure_busybox_image();
    let scope = DockerScope::new("agenttls");
    let dir = tempfile::tempdir().unwrap();
    let sut_dir = dir.path().join("sut");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&sut_dir).unwrap();
    std::fs::write(sut_dir.join("tl-1.toml"), SUT_TEXT).unwrap();
    let port = free_port();
    let log = dir.path().join("supervisor.log");
    let args = [
        "--agent-tls",
        "--broker-port",
        &port.to_string(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    let mut sup = supervise(&scope, &sut_dir, &log, &args);
    let fail = |what: &str| -> String {
        format!(
            "{what}\n--- supervisor log ---\n{}\n--- mosquitto log ---\n{}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            std::fs::read_to_string(state.join("mosquitto.log")).unwrap_or_default()
        )
    };
    let local = format!("mqtt://127.0.0.1:{port}");
    wait_until(&fail("tl-1 idle and healthy"), T, || {
        idle_and_healthy(&local, &state, "tl-1")
    });

    // The agent was pointed at mqtts:// on the gateway and given the managed CA.
    let gateway = network_gateway(&scope.name("labvisor.net"));
    let container = scope.name("tl-1");
    assert_eq!(
        container_env(&container, "LABVISOR_BROKER").as_deref(),
        Some(format!("mqtts://{gateway}:{port}").as_str())
    );
    let ca_file = state.join("ca/ca.crt");
    let ca = std::fs::read_to_string(&ca_file).unwrap();
    assert_eq!(
        container_env(&container, "LABVISOR_MQTT_CA_PEM").as_deref(),
        Some(ca.as_str())
    );

    // The CA key stays private to the supervisor's user; mosquitto never gets it.
    let meta = |p: &Path| std::fs::metadata(p).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(meta(&state.join("ca")).permissions().mode() & 0o777, 0o700);
    let key = state.join("ca/ca.key");
    assert_eq!(meta(&key).permissions().mode() & 0o777, 0o600);
    assert_eq!(meta(&key).uid(), meta(Path::new("/proc/self")).uid());
    let conf = std::fs::read_to_string(state.join("mosquitto.conf")).unwrap();
    assert!(!conf.contains("ca.key"), "{conf}");

    // A job runs end to end: submitted on loopback, run by the agent connected over TLS.
    run_job(&local, &state, "tl-1", "tls-job-1");

    // On the gateway, the agent's own login over TLS (checking the certificate against the
    // CA and the gateway's address) reads its retained status ...
    let password = std::fs::read_to_string(state.join("agents/tl-1")).unwrap();
    let login = ["-u", "tl-1", "-P", password.trim()];
    let cafile = ["--cafile", ca_file.to_str().unwrap()];
    let tls = sub_one(
        &gateway,
        port,
        "tl-1/agent",
        &[&login[..], &cafile[..]].concat(),
    );
    assert!(
        tls.status.success() && String::from_utf8_lossy(&tls.stdout).contains("\"sut\":\"tl-1\""),
        "{}",
        fail(&String::from_utf8_lossy(&tls.stderr))
    );
    // ... while plain MQTT there is refused, with the same valid login.
    let plain = sub_one(&gateway, port, "tl-1/agent", &login);
    assert!(
        !plain.status.success() && plain.stdout.is_empty(),
        "plain MQTT on the agents' listener must be refused: {}",
        String::from_utf8_lossy(&plain.stdout)
    );
    // Anonymous over TLS is refused too.
    let anon = sub_one(&gateway, port, "tl-1/agent", &cafile);
    assert!(!anon.status.success() && anon.stdout.is_empty());

    // A restarted supervisor keeps the CA and makes a new server certificate: the agent's
    // container is adopted, not recreated, and reconnects over TLS.
    let id = docker_ok(&["inspect", "-f", "{{.Id}}", &container]);
    let server_cert = std::fs::read(state.join("server.crt")).unwrap();
    stop(&mut sup, &fail("a clean stop"));
    let log2 = dir.path().join("supervisor2.log");
    let _sup2 = supervise(&scope, &sut_dir, &log2, &args);
    wait_until(
        &fail("tl-1 back on the restarted broker with a fresh heartbeat"),
        T,
        || back_online(&local, &state, "tl-1"),
    );
    assert_eq!(docker_ok(&["inspect", "-f", "{{.Id}}", &container]), id);
    assert_eq!(
        std::fs::read_to_string(&ca_file).unwrap(),
        ca,
        "the CA is kept"
    );
    assert_ne!(
        std::fs::read(state.join("server.crt")).unwrap(),
        server_cert,
        "a new server certificate"
    );
    run_job(&local, &state, "tl-1", "tls-job-2");
}

/// Stops a supervisor with SIGTERM and checks it exits 0 (`what` on failure).
fn stop(sup: &mut KillOnDrop, what: &str) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sup.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(sup.wait().unwrap().success(), "{what}");
}

/// `sut` idle with a heartbeat under 3 s old, under an online supervisor.
fn back_online(url: &str, state: &Path, sut: &str) -> Option<()> {
    let v: serde_json::Value =
        serde_json::from_slice(&labvisor(url, state, &["status", "--json"]).stdout).ok()?;
    let online = v["supervisors"]
        .as_array()?
        .iter()
        .any(|s| s["state"] == "online");
    let row = v["suts"].as_array()?.iter().find(|r| r["sut"] == sut)?;
    (online && row["state"] == "idle" && row["heartbeat_age_ms"].as_u64()? < 3000).then_some(())
}

/// A lab that ran without TLS, restarted with `--agent-tls`: the agent's container is
/// recreated (its broker URL and CA changed), and the new agent connects over TLS.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn turning_agent_tls_on_recreates_the_agents() {
    ensure_busybox_image();
    let scope = DockerScope::new("tlson");
    let dir = tempfile::tempdir().unwrap();
    let sut_dir = dir.path().join("sut");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&sut_dir).unwrap();
    std::fs::write(sut_dir.join("to-1.toml"), SUT_TEXT).unwrap();
    let port = free_port();
    let plain = [
        "--broker-port",
        &port.to_string(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    let log = dir.path().join("supervisor.log");
    let log2 = dir.path().join("supervisor2.log");
    let fail = |what: &str| -> String {
        format!(
            "{what}\n--- supervisor log ---\n{}\n--- after the restart ---\n{}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            std::fs::read_to_string(&log2).unwrap_or_default(),
        )
    };
    let local = format!("mqtt://127.0.0.1:{port}");
    let mut sup = supervise(&scope, &sut_dir, &log, &plain);
    wait_until(&fail("to-1 idle and healthy"), T, || {
        idle_and_healthy(&local, &state, "to-1")
    });
    let container = scope.name("to-1");
    let id = docker_ok(&["inspect", "-f", "{{.Id}}", &container]);
    assert!(container_env(&container, "LABVISOR_BROKER")
        .unwrap()
        .starts_with("mqtt://"));
    stop(&mut sup, &fail("a clean stop"));

    let _sup2 = supervise(
        &scope,
        &sut_dir,
        &log2,
        &[&["--agent-tls"], &plain[..]].concat(),
    );
    // The retained status from before the restart may still look fresh: wait for a new
    // container first, then for its agent.
    wait_until(&fail("to-1 recreated"), T, || {
        let now = docker(&["inspect", "-f", "{{.Id}}", &container]);
        (now.status.success() && String::from_utf8_lossy(&now.stdout).trim() != id).then_some(())
    });
    wait_until(&fail("to-1 idle over TLS"), T, || {
        idle_and_healthy(&local, &state, "to-1")
    });
    assert!(container_env(&container, "LABVISOR_BROKER")
        .unwrap()
        .starts_with("mqtts://"));
    run_job(&local, &state, "to-1", "tls-on-job-1");
}

#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn agents_reach_an_external_mqtts_broker_with_the_given_ca() {
    ensure_busybox_image();
    let scope = DockerScope::new("exttls");
    // The supervisor's network, made first (labelled as its own, so it is adopted), so that
    // the broker can listen on its gateway.
    let net = own_network(&scope, "labvisor.net");
    let gateway = network_gateway(&net);
    let pki = tempfile::tempdir().unwrap();
    test_pki(pki.path(), &["ca"], &format!("IP:{gateway}"));
    // Plain on loopback (the supervisor and this test), TLS only on the gateway (the agents).
    let tls_port = free_port();
    let broker = Mosquitto::start_with(&format!(
        "allow_anonymous true\npersistence false\n\nlistener {tls_port} {gateway}\ncertfile {}\nkeyfile {}\n",
        pki.path().join("server.crt").display(),
        pki.path().join("server.key").display(),
    ));
    let dir = tempfile::tempdir().unwrap();
    let sut_dir = dir.path().join("sut");
    std::fs::create_dir_all(&sut_dir).unwrap();
    std::fs::write(sut_dir.join("tx-1.toml"), SUT_TEXT).unwrap();
    let log = dir.path().join("supervisor.log");
    let ca = pki.path().join("ca.crt");
    let agent_url = format!("mqtts://{gateway}:{tls_port}");
    let _sup = supervise(
        &scope,
        &sut_dir,
        &log,
        &[
            "--broker",
            &broker.url(),
            "--agent-broker",
            &agent_url,
            "--mqtt-ca",
            ca.to_str().unwrap(),
        ],
    );
    let fail = |what: &str| -> String {
        format!(
            "{what}\n--- supervisor log ---\n{}\n--- mosquitto log ---\n{}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            broker.log()
        )
    };
    wait_until(&fail("tx-1 idle and healthy"), T, || {
        idle_and_healthy(&broker.url(), dir.path(), "tx-1")
    });
    let container = scope.name("tx-1");
    assert_eq!(
        container_env(&container, "LABVISOR_BROKER").as_deref(),
        Some(agent_url.as_str())
    );
    assert_eq!(
        container_env(&container, "LABVISOR_MQTT_CA_PEM").as_deref(),
        Some(std::fs::read_to_string(&ca).unwrap().as_str())
    );
    run_job(&broker.url(), dir.path(), "tx-1", "ext-tls-job-1");
    // The gateway listener is TLS only: plain MQTT there is refused.
    let plain = sub_one(&gateway, tls_port, "tx-1/agent", &[]);
    assert!(!plain.status.success() && plain.stdout.is_empty());
}
