//! `docker-compose.yml` as Docker Compose reads it (`config`): every service restarts unless
//! stopped and has a healthcheck, the mounts are where the shipped configs expect them, plain
//! MQTT is published on loopback only and TLS on every interface. And the stack brought up for
//! real ([`stack_runs_jobs_through_the_shipped_acl_and_tls`]): a stand-in for
//! `eclipse-mosquitto:2` built from Debian's mosquitto (`tools/build-mosquitto-image.sh`; no
//! registry is needed), the supervisor image (`tools/build-supervisor-image.sh`), two SUTs on
//! `labvisor/busybox:local`, a submitter, a reader and a TLS client. The agents and the
//! supervisor log in on the broker's TLS listener only (its log says on which port each login
//! came), with the CA of `mosquitto/certs.sh`.
//!
//! Works with the `docker compose` plugin or the standalone `docker-compose` (v1.29 on Debian
//! 12); `tools/ensure-compose.sh` installs one. A missing Compose CLI is a failure, not a skip.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use labvisor_protocol::payloads::{AgentStatus, JobState, JobStatus, SubmitAck, SubmitResult};
use labvisor_tests::{
    docker, ensure_busybox_image, run, run_ok, static_bin, unique_id, workspace_root, DockerScope,
    Subscriber,
};
use serde_yaml_ng::Value;

const SECRET: &str = "compose-test-secret";

/// `docker compose` or `docker-compose`, whichever answers.
fn compose() -> Vec<&'static str> {
    if run(Command::new("docker").args(["compose", "version"]))
        .status
        .success()
    {
        return vec!["docker", "compose"];
    }
    let v1 = Command::new("docker-compose").arg("version").output();
    if v1.map(|o| o.status.success()).unwrap_or(false) {
        return vec!["docker-compose"];
    }
    panic!("no Docker Compose CLI: run tools/ensure-compose.sh (tools/test.sh does)");
}

/// What docker-compose.yml reads from the environment (and compose's own variables): a test
/// sets what it needs and nothing leaks in from the caller's environment.
const COMPOSE_ENV: [&str; 14] = [
    "LABVISOR_MQTT_PASSWORD",
    "LABVISOR_MQTT_PORT",
    "LABVISOR_MQTT_BIND",
    "LABVISOR_MQTTS_PORT",
    "LABVISOR_MOSQUITTO_FILES",
    "LABVISOR_SUT_DIR",
    "LABVISOR_ID",
    "LABVISOR_NAME_PREFIX",
    "LABVISOR_MOSQUITTO_IMAGE",
    "LABVISOR_SUPERVISOR_IMAGE",
    "LABVISOR_LOG",
    "COMPOSE_PROFILES",
    "COMPOSE_FILE",
    "COMPOSE_PROJECT_NAME",
];

/// `<compose> -f docker-compose.yml -p <project>`, run in the workspace with only `env` from
/// the variables of [`COMPOSE_ENV`].
fn compose_cmd(project: &str, env: &[(&str, &str)]) -> Command {
    let cmd = compose();
    let mut c = Command::new(cmd[0]);
    c.args(&cmd[1..])
        .args(["-f", "docker-compose.yml", "-p", project])
        .current_dir(workspace_root());
    for k in COMPOSE_ENV {
        c.env_remove(k);
    }
    c.envs(env.iter().copied());
    c
}

/// Runs `<compose> --profile portainer config` with `env`; returns (success, stdout, stderr).
fn config(env: &[(&str, &str)]) -> (bool, String, String) {
    let out =
        run(compose_cmd("labvisor-config-test", env).args(["--profile", "portainer", "config"]));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn parsed() -> Value {
    let (ok, stdout, stderr) = config(&[("LABVISOR_MQTT_PASSWORD", SECRET)]);
    assert!(ok, "compose config failed: {stderr}");
    serde_yaml_ng::from_str(&stdout).expect("compose config prints YAML")
}

/// A service's mounts as (source, target, read_only), from either the short form
/// (`src:dst:ro`, compose v1) or the long form (`type`, `source`, `target`, compose v2).
fn mounts(svc: &Value) -> Vec<(String, String, bool)> {
    let Some(Value::Sequence(vols)) = svc.get("volumes") else {
        return Vec::new();
    };
    vols.iter()
        .map(|v| match v {
            Value::String(s) => {
                let parts: Vec<&str> = s.split(':').collect();
                let ro = parts
                    .get(2)
                    .is_some_and(|m| m.split(',').any(|o| o == "ro"));
                (parts[0].to_owned(), parts[1].to_owned(), ro)
            }
            long => (
                long["source"].as_str().unwrap_or_default().to_owned(),
                long["target"].as_str().unwrap_or_default().to_owned(),
                long.get("read_only")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            ),
        })
        .collect()
}

fn has_mount(svc: &Value, name: &str, source: &str, target: &str, read_only: bool) {
    let m = mounts(svc);
    assert!(
        m.iter()
            .any(|(s, t, ro)| s == source && t == target && *ro == read_only),
        "{name}: no mount {source} -> {target} (read_only {read_only}) in {m:?}"
    );
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::Sequence(s) => s
            .iter()
            .map(|x| x.as_str().unwrap_or_default().to_owned())
            .collect(),
        Value::String(s) => vec![s.clone()],
        _ => Vec::new(),
    }
}

/// The value of `key` in the shipped mosquitto.conf.
fn mosquitto_conf(key: &str) -> String {
    let conf = std::fs::read_to_string(workspace_root().join("mosquitto/mosquitto.conf")).unwrap();
    conf.lines()
        .find_map(|l| l.strip_prefix(&format!("{key} ")))
        .unwrap_or_else(|| panic!("mosquitto.conf has no {key}"))
        .trim()
        .to_owned()
}

#[test]
#[ignore = "needs Docker Compose: tools/test.sh installs it"]
fn every_service_restarts_unless_stopped_and_has_a_healthcheck() {
    let c = parsed();
    let services = c["services"].as_mapping().expect("services");
    let names: BTreeSet<&str> = services.keys().filter_map(Value::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from(["labvisor", "mosquitto", "portainer"])
    );
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        assert_eq!(
            svc["restart"].as_str(),
            Some("unless-stopped"),
            "{name}: restart"
        );
        let hc = &svc["healthcheck"];
        assert_ne!(
            hc.get("disable").and_then(Value::as_bool),
            Some(true),
            "{name}"
        );
        let test = strings(&hc["test"]);
        assert!(
            test.len() >= 2 && (test[0] == "CMD" || test[0] == "CMD-SHELL"),
            "{name}: healthcheck test {test:?}"
        );
        for key in ["interval", "timeout", "retries"] {
            assert!(hc.get(key).is_some(), "{name}: healthcheck {key}");
        }
    }
    assert_eq!(
        strings(&c["services"]["portainer"]["profiles"]),
        ["portainer"],
        "Portainer only runs with --profile portainer"
    );
}

#[test]
#[ignore = "needs Docker Compose: tools/test.sh installs it"]
fn mosquitto_runs_the_shipped_config_with_persistence() {
    let c = parsed();
    let svc = &c["services"]["mosquitto"];
    assert_eq!(svc["image"].as_str(), Some("eclipse-mosquitto:2"));
    let root = workspace_root();
    let dir = root.join("mosquitto");
    let src = |f: &str| dir.join(f).display().to_string();
    has_mount(
        svc,
        "mosquitto",
        &src("mosquitto.conf"),
        "/mosquitto/config/mosquitto.conf",
        true,
    );
    // The password and ACL files land where the shipped mosquitto.conf looks for them.
    has_mount(
        svc,
        "mosquitto",
        &src("acl"),
        &mosquitto_conf("acl_file"),
        true,
    );
    has_mount(
        svc,
        "mosquitto",
        &src("passwd"),
        &mosquitto_conf("password_file"),
        true,
    );
    let data = mosquitto_conf("persistence_location");
    assert!(
        mounts(svc)
            .iter()
            .any(|(s, t, ro)| s == "mosquitto-data" && t == data.trim_end_matches('/') && !ro),
        "mosquitto: the persistence location {data} must be the mosquitto-data volume: {:?}",
        mounts(svc)
    );
    assert!(c["volumes"].get("mosquitto-data").is_some());
}

/// A service's published ports as (host address, host port, container port), from the short
/// form (`127.0.0.1:1883:1883/tcp`) or the long form (`host_ip`, `published`, `target`). An
/// empty host address means every interface.
fn ports(svc: &Value) -> Vec<(String, String, String)> {
    let Some(Value::Sequence(ports)) = svc.get("ports") else {
        return Vec::new();
    };
    let text = |v: &Value| match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        _ => String::new(),
    };
    ports
        .iter()
        .map(|p| match p {
            Value::String(s) => {
                let spec = s.split('/').next().unwrap_or_default();
                let mut parts: Vec<String> = spec.rsplitn(3, ':').map(str::to_owned).collect();
                parts.resize(3, String::new());
                (parts[2].clone(), parts[1].clone(), parts[0].clone())
            }
            long => (
                long.get("host_ip").map(text).unwrap_or_default(),
                long.get("published").map(text).unwrap_or_default(),
                long.get("target").map(text).unwrap_or_default(),
            ),
        })
        .map(|(ip, host, target)| {
            let ip = if ip == "0.0.0.0" { String::new() } else { ip };
            (ip, host, target)
        })
        .collect()
}

#[test]
#[ignore = "needs Docker Compose: tools/test.sh installs it"]
fn plain_mqtt_on_loopback_only_and_tls_for_remote_clients() {
    let c = parsed();
    let svc = &c["services"]["mosquitto"];
    let own =
        |ip: &str, host: &str, target: &str| (ip.to_owned(), host.to_owned(), target.to_owned());
    assert_eq!(
        ports(svc),
        [own("127.0.0.1", "1883", "1883"), own("", "8883", "8883")],
        "mosquitto: plain MQTT published on 127.0.0.1 only, TLS on every interface"
    );
    let conf = std::fs::read_to_string(workspace_root().join("mosquitto/mosquitto.conf")).unwrap();
    let listeners: Vec<&str> = conf
        .lines()
        .filter(|l| l.starts_with("listener "))
        .collect();
    assert_eq!(listeners, ["listener 1883", "listener 8883"]);
    // The TLS files are mounted where the shipped config reads them; the CA's key is not.
    let certs = mosquitto_conf("certfile");
    let dir = certs.rsplit_once('/').expect("an absolute certfile").0;
    for key in ["cafile", "keyfile"] {
        assert!(
            mosquitto_conf(key).starts_with(&format!("{dir}/")),
            "{key} is not in {dir}"
        );
    }
    let src = workspace_root()
        .join("mosquitto/certs")
        .display()
        .to_string();
    has_mount(svc, "mosquitto", &src, dir, true);
    assert!(
        !mounts(svc)
            .iter()
            .any(|(s, _, _)| s.contains("mosquitto/ca")),
        "the CA's directory must not reach the broker: {:?}",
        mounts(svc)
    );
    // Other ports move with the environment, never off loopback for plain MQTT by accident.
    let c = {
        let (ok, stdout, stderr) = config(&[
            ("LABVISOR_MQTT_PASSWORD", SECRET),
            ("LABVISOR_MQTT_PORT", "21883"),
            ("LABVISOR_MQTTS_PORT", "28883"),
        ]);
        assert!(ok, "{stderr}");
        serde_yaml_ng::from_str::<Value>(&stdout).unwrap()
    };
    assert_eq!(
        ports(&c["services"]["mosquitto"]),
        [own("127.0.0.1", "21883", "1883"), own("", "28883", "8883")]
    );
    assert!(ports(&c["services"]["labvisor"]).is_empty());
}

#[test]
#[ignore = "needs Docker Compose: tools/test.sh installs it"]
fn supervisor_gets_the_socket_the_sut_dir_and_credentials() {
    let c = parsed();
    let svc = &c["services"]["labvisor"];
    assert_eq!(svc["image"].as_str(), Some("labvisor/supervisor:local"));
    assert!(
        svc.get("build").is_none(),
        "the image is built by tools/, offline"
    );
    has_mount(
        svc,
        "labvisor",
        "/var/run/docker.sock",
        "/var/run/docker.sock",
        false,
    );
    has_mount(
        svc,
        "labvisor",
        &workspace_root().join("sut").display().to_string(),
        "/labvisor/sut-dir",
        true,
    );
    let cmd = strings(&svc["command"]);
    assert_eq!(
        cmd.first().map(String::as_str),
        Some("supervise"),
        "{cmd:?}"
    );
    let pairs: Vec<(String, String)> = cmd
        .windows(2)
        .map(|w| (w[0].clone(), w[1].clone()))
        .collect();
    for (flag, value) in [
        ("--sut-dir", "/labvisor/sut-dir"),
        // The supervisor and the agents use the TLS listener, trusting the broker's CA.
        ("--broker", "mqtts://mosquitto:8883"),
        ("--agent-broker", "mqtts://mosquitto:8883"),
        ("--mqtt-ca", "/labvisor/mqtt-ca.crt"),
        // Reachable from the healthcheck and the network, not only the container's loopback.
        ("--metrics-listen", "0.0.0.0:9464"),
    ] {
        assert!(
            pairs.contains(&(flag.to_owned(), value.to_owned())),
            "{flag} {value} not in {cmd:?}"
        );
    }
    // The CA's certificate is the only TLS file the supervisor gets: not the server's key, not
    // the CA's directory.
    let certs = workspace_root().join("mosquitto/certs");
    has_mount(
        svc,
        "labvisor",
        &certs.join("ca.crt").display().to_string(),
        "/labvisor/mqtt-ca.crt",
        true,
    );
    let tls_mounts: Vec<_> = mounts(svc)
        .into_iter()
        .filter(|(s, _, _)| s.contains("mosquitto/certs") || s.contains("mosquitto/ca"))
        .collect();
    assert_eq!(tls_mounts.len(), 1, "{tls_mounts:?}");
    // The FROM-scratch image probes its own /healthz with the static binary.
    assert_eq!(
        strings(&svc["healthcheck"]["test"]),
        ["CMD", "/labvisor/bin/labvisor", "healthz"]
    );
    assert_eq!(
        svc["environment"]["LABVISOR_MQTT_USERNAME"].as_str(),
        Some("labvisor.supervisor")
    );
    assert_eq!(
        svc["environment"]["LABVISOR_MQTT_PASSWORD"].as_str(),
        Some(SECRET)
    );
    // The broker and the agents share the labvisor network, where agents find mosquitto.
    for s in ["labvisor", "mosquitto"] {
        assert!(
            c["services"][s]["networks"].get("labvisor").is_some(),
            "{s} is not on the labvisor network"
        );
    }
    assert_eq!(
        c["networks"]["labvisor"]["name"].as_str(),
        Some("labvisor.net"),
        "the network the supervisor puts its agents on"
    );

    let portainer = &c["services"]["portainer"];
    has_mount(
        portainer,
        "portainer",
        "/var/run/docker.sock",
        "/var/run/docker.sock",
        false,
    );
}

#[test]
#[ignore = "needs Docker Compose: tools/test.sh installs it"]
fn config_refuses_to_run_without_the_supervisor_password() {
    let (ok, _, stderr) = config(&[]);
    assert!(
        !ok,
        "compose config accepted a missing LABVISOR_MQTT_PASSWORD"
    );
    assert!(stderr.contains("tools/deploy.sh"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// The stack, up for real

/// A compose project brought up by a test. On drop (also when the test failed) it goes in an
/// order that leaves nothing behind: the supervisor first (else it recreates its agents), then
/// the agents' containers and volumes (labelled with the supervisor's unique id), then `down -v`
/// (the broker, the network, `mosquitto-data`). The images go with the test's [`DockerScope`].
struct Stack {
    project: String,
    env: Vec<(String, String)>,
    supervisor_id: String,
}

impl Stack {
    fn compose(&self, args: &[&str]) -> Output {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        run(compose_cmd(&self.project, &env).args(args))
    }

    /// The broker's and the supervisor's logs, for failure messages.
    fn logs(&self) -> String {
        let out = self.compose(&["logs", "--no-color", "--tail", "60"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Polls `f` every 50 ms until it returns `Some`; after `limit`, fails naming `what`, with
    /// the stack's logs.
    fn wait<T>(&self, what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {limit:?} waiting for {what}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything labelled with this stack's supervisor id, of one kind (`ps -a`, `volume ls`...).
    fn owned(&self, list: &[&str]) -> Vec<String> {
        let filter = format!("label=io.labvisor.supervisor={}", self.supervisor_id);
        let out = docker(&[list, &["-q", "--filter", &filter]].concat());
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.compose(&["rm", "-s", "-f", "labvisor"]);
        for id in self.owned(&["ps", "-a"]) {
            let _ = docker(&["rm", "-f", "-v", &id]);
        }
        let _ = self.compose(&["down", "-v", "--remove-orphans", "-t", "5"]);
        for v in self.owned(&["volume", "ls"]) {
            let _ = docker(&["volume", "rm", "-f", &v]);
        }
        for n in self.owned(&["network", "ls"]) {
            let _ = docker(&["network", "rm", &n]);
        }
    }
}

/// `bash <script> <args>` from the workspace, which must succeed; returns stdout.
///
/// The environment is a shell's: a cargo started from inside `cargo test` would inherit the
/// test's `CARGO_PKG_*` and `CARGO_MANIFEST_*` variables, which build scripts (ring's) watch, and
/// build the release binaries again from scratch (minutes) instead of finding them fresh.
fn script(path: &str, args: &[&str]) -> String {
    let mut cmd = Command::new("bash");
    cmd.arg(workspace_root().join(path))
        .args(args)
        .current_dir(workspace_root());
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR" {
            cmd.env_remove(&*k);
        }
    }
    cmd.env_remove("LD_LIBRARY_PATH");
    run_ok(&mut cmd)
}

fn read_secret(dir: &Path, user: &str) -> String {
    std::fs::read_to_string(dir.join("secrets").join(user))
        .unwrap_or_else(|e| panic!("secrets/{user}: {e}"))
        .trim()
        .to_owned()
}

/// A non-loopback IPv4 address of this host (`hostname -I`), where remote clients would come.
fn host_address() -> String {
    let out = run_ok(Command::new("hostname").arg("-I"));
    out.split_whitespace()
        .filter_map(|a| a.parse::<std::net::Ipv4Addr>().ok())
        .find(|a| !a.is_loopback())
        .unwrap_or_else(|| panic!("no non-loopback IPv4 address in `hostname -I`: {out}"))
        .to_string()
}

/// Every login in a mosquitto 2.0 log as (user, listener port): the port from the
/// `New connection from ADDR on port PORT.` line of the login's client address, the user from
/// its `New client connected from ADDR as ID (..., u'USER').` line.
fn logins_by_port(log: &str) -> Vec<(String, String)> {
    let mut port_of = std::collections::HashMap::new();
    let mut logins = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split_once("New connection from ").map(|(_, r)| r) {
            if let Some((addr, port)) = rest.split_once(" on port ") {
                port_of.insert(addr.to_owned(), port.trim_end_matches('.').to_owned());
            }
        } else if let Some(rest) = line
            .split_once("New client connected from ")
            .map(|(_, r)| r)
        {
            let addr = rest.split(' ').next().unwrap_or_default();
            let user = rest
                .rsplit_once("u'")
                .and_then(|(_, u)| u.strip_suffix("').").or_else(|| u.strip_suffix("')")))
                .unwrap_or_default();
            let port = port_of.get(addr).cloned().unwrap_or_default();
            logins.push((user.to_owned(), port));
        }
    }
    logins
}

#[test]
fn logins_are_matched_to_their_listener() {
    let log = "\
mosquitto_1  | 2026-12-02T01:00:00: New connection from 172.30.0.3:41000 on port 8883.
mosquitto_1  | 2026-12-02T01:00:00: New connection from 127.0.0.1:50000 on port 1883.
mosquitto_1  | 2026-12-02T01:00:00: Client <unknown> disconnected, not authorised.
mosquitto_1  | 2026-12-02T01:00:01: New client connected from 172.30.0.3:41000 as agent-alpha (p2, c0, k30, u'alpha').
mosquitto_1  | 2026-12-02T01:00:02: New connection from 172.30.0.4:42000 on port 1883.
mosquitto_1  | 2026-12-02T01:00:02: New client connected from 172.30.0.4:42000 as agent-beta (p2, c0, k30, u'beta').
";
    let own = |u: &str, p: &str| (u.to_owned(), p.to_owned());
    assert_eq!(
        logins_by_port(log),
        [own("alpha", "8883"), own("beta", "1883")]
    );
}

/// The JSON payload of a `mosquitto_sub -v` line on `topic`, if it is one.
fn payload_on<'a>(line: &'a str, topic: &str) -> Option<&'a str> {
    line.strip_prefix(topic)?.strip_prefix(' ')
}

#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn stack_runs_jobs_through_the_shipped_acl_and_tls() {
    let started = Instant::now();
    ensure_busybox_image();
    let scope = DockerScope::new("compose");
    let id = scope.run_id().to_owned();

    // The images: the broker stand-in and the supervisor, under this test's names and label.
    let mosquitto_image = format!("{}:test", scope.name("mosquitto"));
    let supervisor_image = format!("{}:test", scope.name("supervisor"));
    script(
        "tools/build-mosquitto-image.sh",
        &["--tag", &mosquitto_image, "--label", &scope.label()],
    );
    script(
        "tools/build-supervisor-image.sh",
        &["--tag", &supervisor_image, "--label", &scope.label()],
    );
    let built = started.elapsed();

    // Two SUTs, their logins, the role users and the certificates, made by the shipped scripts.
    let files = tempfile::Builder::new()
        .prefix("labvisor-compose-")
        .tempdir()
        .unwrap();
    let dir = files.path();
    let sut = dir.join("sut");
    std::fs::create_dir(&sut).unwrap();
    for name in ["alpha", "beta"] {
        std::fs::write(
            sut.join(format!("{name}.toml")),
            format!("image = \"{}\"\n", labvisor_tests::BUSYBOX_IMAGE),
        )
        .unwrap();
    }
    let address = host_address();
    let root = run_ok(Command::new("id").arg("-u")).trim() == "0";
    // mosquitto reads its password file and TLS key as the image's user (1883) after dropping
    // root; without root here, the test's own throwaway files are made readable instead.
    let owner: &[&str] = if root { &["--owner", "1883:1883"] } else { &[] };
    let d = |p: &str| dir.join(p).display().to_string();
    script(
        "mosquitto/passwd.sh",
        &[
            &["--file", &d("passwd"), "--secrets", &d("secrets")],
            &["--sut-dir", &d("sut")][..],
            owner,
        ]
        .concat(),
    );
    script(
        "mosquitto/certs.sh",
        &[
            &[
                "--dir",
                &d("certs"),
                "--ca-dir",
                &d("ca"),
                "--host",
                &address,
            ][..],
            owner,
        ]
        .concat(),
    );
    if !root {
        for f in ["passwd", "certs/server.key"] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    let secret = |user: &str| read_secret(dir, user);

    let plain = labvisor_tests::free_port();
    let tls = labvisor_tests::free_port();
    let stack = Stack {
        project: id.clone(),
        supervisor_id: id.clone(),
        env: [
            ("LABVISOR_MQTT_PASSWORD", secret("labvisor.supervisor")),
            ("LABVISOR_MQTT_PORT", plain.to_string()),
            ("LABVISOR_MQTTS_PORT", tls.to_string()),
            ("LABVISOR_MOSQUITTO_FILES", dir.display().to_string()),
            ("LABVISOR_SUT_DIR", sut.display().to_string()),
            ("LABVISOR_ID", id.clone()),
            ("LABVISOR_NAME_PREFIX", format!("{id}-")),
            ("LABVISOR_MOSQUITTO_IMAGE", mosquitto_image.clone()),
            ("LABVISOR_SUPERVISOR_IMAGE", supervisor_image.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect(),
    };
    let up = stack.compose(&["up", "-d"]);
    assert!(
        up.status.success(),
        "compose up failed: {}{}",
        String::from_utf8_lossy(&up.stderr),
        stack.logs()
    );
    let up_at = started.elapsed();

    // A reader on the host's loopback sees both agents come up.
    let reader = ["-u", "labvisor.reader", "-P", &secret("labvisor.reader")].map(String::from);
    let reader: Vec<&str> = reader.iter().map(String::as_str).collect();
    let sub = Subscriber::start(plain, "alpha/#", &[&["-t", "beta/#"][..], &reader].concat());
    let online = |sut: &str| {
        sub.lines().iter().any(|l| {
            payload_on(l, &format!("{sut}/agent"))
                .and_then(|p| serde_json::from_str::<AgentStatus>(p).ok())
                .is_some_and(|s| s.broker_connected)
        })
    };
    stack.wait("both agents online", Duration::from_secs(120), || {
        (online("alpha") && online("beta")).then_some(())
    });
    let online_at = started.elapsed();
    // Each agent logged in as its own SUT, which the shipped ACL confines.
    let broker_log =
        String::from_utf8_lossy(&stack.compose(&["logs", "--no-color", "mosquitto"]).stdout)
            .into_owned();
    // Each of them logged in on the TLS listener (8883) and never on the plain one (1883): no
    // password crossed the shared network in plain text.
    let logins = logins_by_port(&broker_log);
    for user in ["alpha", "beta", "labvisor.supervisor"] {
        let ports: BTreeSet<&str> = logins
            .iter()
            .filter(|(u, _)| u == user)
            .map(|(_, p)| p.as_str())
            .collect();
        assert_eq!(
            ports,
            BTreeSet::from(["8883"]),
            "the listeners {user} logged in on, from the broker's log:\n{broker_log}"
        );
    }
    // The agents were given the TLS URL and the CA that certs.sh made, nothing else.
    let ca_pem = std::fs::read_to_string(dir.join("certs/ca.crt")).unwrap();
    for name in ["alpha", "beta"] {
        let container = format!("{id}-{name}");
        let out = docker(&["inspect", "--format", "{{json .Config.Env}}", &container]);
        assert!(out.status.success(), "docker inspect {container}: {out:?}");
        let env: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
        let broker: Vec<&str> = env
            .iter()
            .filter_map(|e| e.strip_prefix("LABVISOR_BROKER="))
            .collect();
        assert_eq!(broker, ["mqtts://mosquitto:8883"], "{container}");
        let ca: Vec<&str> = env
            .iter()
            .filter_map(|e| e.strip_prefix("LABVISOR_MQTT_CA_PEM="))
            .collect();
        assert_eq!(ca, [ca_pem.as_str()], "{container}");
    }

    // The submitter's job, sent with mosquitto_pub on the host's loopback, runs end to end.
    let submit = |user: &str, sut: &str, job: &str, script: &str| {
        let payload = format!(r#"{{"id": "{job}", "script": "{script}"}}"#);
        run_ok(Command::new("mosquitto_pub").args([
            "-h",
            "127.0.0.1",
            "-p",
            &plain.to_string(),
            "-u",
            user,
            "-P",
            &secret(user),
            "-q",
            "1",
            "-t",
            &format!("{sut}/submit"),
            "-m",
            &payload,
        ]));
    };
    let passed = |sut: &str, job: &str| {
        let topic = format!("{sut}/jobs/{job}");
        let what = format!("{topic} passed");
        stack.wait(&what, Duration::from_secs(60), || {
            sub.lines().iter().find_map(|l| {
                payload_on(l, &topic)
                    .and_then(|p| serde_json::from_str::<JobStatus>(p).ok())
                    .filter(|s| s.state == JobState::Passed)
            })
        })
    };
    let job = unique_id("job").replace('-', "_");
    let marker = unique_id("compose-output");
    submit("labvisor.submit", "alpha", &job, &format!("echo {marker}"));
    let ack = stack.wait(
        "the submitter's job to be accepted",
        Duration::from_secs(30),
        || {
            sub.lines().iter().find_map(|l| {
                payload_on(l, "alpha/submit_status")
                    .and_then(|p| serde_json::from_str::<SubmitAck>(p).ok())
                    .filter(|a| a.id.as_ref().map(|i| i.as_str()) == Some(job.as_str()))
            })
        },
    );
    assert_eq!(ack.result, SubmitResult::Accepted, "{ack:?}");
    let status = passed("alpha", &job);
    assert_eq!(status.exit_code, Some(0));
    let output_topic = format!("alpha/jobs/{job}/output");
    stack.wait("the job's output", Duration::from_secs(30), || {
        sub.lines()
            .iter()
            .any(|l| payload_on(l, &output_topic).is_some_and(|p| p.contains(&marker)))
            .then_some(())
    });

    // A reader's job never runs: the broker drops it, and a submitter's job sent after it
    // passes first and alone.
    let refused = unique_id("reader").replace('-', "_");
    submit("labvisor.reader", "beta", &refused, "echo reader");
    let control = unique_id("control").replace('-', "_");
    submit("labvisor.submit", "beta", &control, "echo control");
    passed("beta", &control);
    let leaked: Vec<String> = sub
        .lines()
        .into_iter()
        .filter(|l| l.contains(&refused))
        .collect();
    assert!(
        leaked.is_empty(),
        "the reader's job reached the agent: {leaked:?}"
    );

    // TLS from a non-loopback address of this host, trusting the generated CA: mosquitto_sub
    // and labvisor's own client (rustls) both get the agents' retained statuses.
    let ca = dir.join("certs/ca.crt").display().to_string();
    let out = run(Command::new("mosquitto_sub")
        .args([
            "--cafile",
            &ca,
            "-h",
            &address,
            "-p",
            &tls.to_string(),
            "-t",
            "alpha/agent",
            "-C",
            "1",
            "-W",
            "20",
        ])
        .args(&reader));
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"sut\":\"alpha\""),
        "TLS subscribe via {address}:{tls}: {out:?}\n{}",
        stack.logs()
    );
    let out = run(Command::new(static_bin("labvisor"))
        .args([
            "status",
            "--json",
            "--broker",
            &format!("mqtts://{address}:{tls}"),
        ])
        .args([
            "--ca-file",
            &ca,
            "--username",
            "labvisor.reader",
            "--password",
            &secret("labvisor.reader"),
        ])
        .env_remove("LABVISOR_BROKER")
        .env_remove("LABVISOR_TOPIC_PREFIX"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("alpha") && text.contains("beta"),
        "labvisor status over TLS: {out:?}"
    );
    // Plain MQTT from that address: nothing listens.
    let out = run(Command::new("mosquitto_pub").args([
        "-h",
        &address,
        "-p",
        &plain.to_string(),
        "-u",
        "labvisor.submit",
        "-P",
        &secret("labvisor.submit"),
        "-t",
        "alpha/cancel",
        "-m",
        "current",
    ]));
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        !out.status.success() && err.contains("refused"),
        "plain MQTT on {address}:{plain}: {out:?}"
    );

    eprintln!(
        "compose stack: images built in {built:?}, up in {:?}, agents online after {:?}, all done in {:?}",
        up_at - built,
        online_at - up_at,
        started.elapsed()
    );
    drop(stack);
    drop(scope);
}
