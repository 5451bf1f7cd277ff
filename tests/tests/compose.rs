//! `docker-compose.yml` as Docker Compose reads it (`config`): every service restarts unless
//! stopped and has a healthcheck, and the mounts are where the shipped configs expect them.
//!
//! Works with the `docker compose` plugin or the standalone `docker-compose` (v1.29 on Debian
//! 12); `tools/ensure-compose.sh` installs one. A missing Compose CLI is a failure, not a skip.

use std::collections::BTreeSet;
use std::process::Command;

use labvisor_tests::{run, workspace_root};
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

/// Runs `<compose> --profile portainer config` with `env`; returns (success, stdout, stderr).
fn config(env: &[(&str, &str)]) -> (bool, String, String) {
    let cmd = compose();
    let out = run(Command::new(cmd[0])
        .args(&cmd[1..])
        .args(["-f", "docker-compose.yml", "-p", "labvisor-config-test"])
        .args(["--profile", "portainer", "config"])
        .current_dir(workspace_root())
        .env_remove("LABVISOR_MQTT_PASSWORD")
        .env_remove("COMPOSE_PROFILES")
        .envs(env.iter().copied()));
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
        ("--broker", "mqtt://mosquitto:1883"),
        // Reachable from the healthcheck and the network, not only the container's loopback.
        ("--metrics-listen", "0.0.0.0:9464"),
    ] {
        assert!(
            pairs.contains(&(flag.to_owned(), value.to_owned())),
            "{flag} {value} not in {cmd:?}"
        );
    }
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
    assert_eq!(c["networks"]["labvisor"]["name"].as_str(), Some("labvisor"));

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
fn config_refuses_to_run_without_the_supervisor_password() {
    let (ok, _, stderr) = config(&[]);
    assert!(
        !ok,
        "compose config accepted a missing LABVISOR_MQTT_PASSWORD"
    );
    assert!(stderr.contains("tools/deploy.sh"), "{stderr}");
}
