//! The agent over TLS (`mqtts://`), against a real mosquitto with a TLS listener whose
//! certificate is signed by a CA made for the test (openssl): with that CA given
//! (`--ca-file`), the agent connects and publishes its retained status; with another CA it
//! refuses the broker, says why in its log, and keeps running: output still reaches the log file.
//! The CA may also be given as PEM text (`--ca-pem`, `LABVISOR_MQTT_CA_PEM`), as the supervisor
//! gives it to its agents.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::AgentProc;
use labvisor_tests::{test_pki, wait_until, Mosquitto};

/// A test CA, a server certificate for 127.0.0.1 signed by it, and an unrelated CA.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        test_pki(
            dir.path(),
            &["ca", "other-ca"],
            "IP:127.0.0.1,DNS:localhost",
        );
        Pki { dir }
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    /// A mosquitto whose only listener speaks TLS with the server certificate.
    fn broker(&self) -> Mosquitto {
        Mosquitto::start_with(&format!(
            "certfile {}\nkeyfile {}\nallow_anonymous true",
            self.path("server.crt").display(),
            self.path("server.key").display()
        ))
    }
}

const TOML: &str = r#"image = "unused"
command = ["/bin/sh", "-c", "while true; do echo tls-tick; sleep 0.2; done"]
[health]
heartbeat = "300ms"
max_age = "10s"
"#;

fn heartbeat(agent: &AgentProc, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(agent.path("run/heartbeat")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_owned))
}

/// The retained `<sut>/agent` status as read over TLS with `mosquitto_sub --cafile`.
fn retained_status(broker: &Mosquitto, ca: &Path, sut: &str) -> Option<String> {
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &broker.port().to_string()])
        .arg("--cafile")
        .arg(ca)
        .args(["-t", &format!("{sut}/agent"), "-C", "1", "-W", "3"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An agent for `sut` on `mqtts://` to `broker`, trusting the CA in `ca`.
fn start_agent(broker: &Mosquitto, sut: &str, ca: &Path) -> AgentProc {
    let url = format!("mqtts://127.0.0.1:{}", broker.port());
    AgentProc::start(sut, TOML, Some(&url), &["--ca-file", ca.to_str().unwrap()])
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn agent_connects_over_tls_with_the_given_ca() {
    let pki = Pki::new();
    let broker = pki.broker();
    let ca = pki.path("ca.crt");
    let agent = start_agent(&broker, "tls-ok", &ca);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while heartbeat(&agent, "broker_connected").as_deref() != Some("true") {
        assert!(
            std::time::Instant::now() < deadline,
            "broker_connected=true over TLS within 20 s; agent log:\n{}\nheartbeat:\n{:?}",
            agent.stderr(),
            std::fs::read_to_string(agent.path("run/heartbeat"))
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = wait_until(
        "the retained status, read over TLS",
        Duration::from_secs(20),
        || retained_status(&broker, &ca, "tls-ok"),
    );
    assert!(status.contains("\"sut\":\"tls-ok\""), "{status}");
}

/// The CA given as PEM text (`--ca-pem`, what the supervisor puts in `LABVISOR_MQTT_CA_PEM`)
/// is the one trusted, also over a `--ca-file` of another CA.
#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn agent_connects_over_tls_with_the_ca_given_as_pem_text() {
    let pki = Pki::new();
    let broker = pki.broker();
    let ca = pki.path("ca.crt");
    let pem = std::fs::read_to_string(&ca).unwrap();
    let url = format!("mqtts://127.0.0.1:{}", broker.port());
    let other = pki.path("other-ca.crt");
    let agent = AgentProc::start(
        "tls-pem",
        TOML,
        Some(&url),
        &["--ca-pem", &pem, "--ca-file", other.to_str().unwrap()],
    );
    let status = wait_until(
        "the retained status of the agent given its CA as PEM, read over TLS",
        Duration::from_secs(20),
        || retained_status(&broker, &ca, "tls-pem"),
    );
    assert!(status.contains("\"sut\":\"tls-pem\""), "{status}");
    wait_until(
        "broker_connected=true in the heartbeat",
        Duration::from_secs(20),
        || (heartbeat(&agent, "broker_connected").as_deref() == Some("true")).then_some(()),
    );
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn agent_refuses_a_broker_its_ca_did_not_sign_and_keeps_running() {
    let pki = Pki::new();
    let broker = pki.broker();
    let agent = start_agent(&broker, "tls-bad", &pki.path("other-ca.crt"));
    // The refusal is logged with its cause.
    let stderr = wait_until(
        "a certificate error in the agent's log",
        Duration::from_secs(20),
        || {
            let s = std::fs::read_to_string(agent.path("stderr")).ok()?;
            s.to_lowercase().contains("certificate").then_some(s)
        },
    );
    assert!(
        stderr.to_lowercase().contains("unknownissuer") || stderr.contains("UnknownIssuer"),
        "the cause is named: {stderr}"
    );
    // The device's output still reaches the log file, and the agent says it is not connected.
    wait_until("output in the log file", Duration::from_secs(20), || {
        String::from_utf8_lossy(&agent.log())
            .contains("tls-tick")
            .then_some(())
    });
    assert_eq!(
        heartbeat(&agent, "broker_connected").as_deref(),
        Some("false")
    );
    // Nothing reached the broker under this SUT.
    assert_eq!(
        retained_status(&broker, &pki.path("ca.crt"), "tls-bad"),
        None,
        "an agent that refused the broker published nothing"
    );
}
