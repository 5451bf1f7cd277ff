//! `labvisor supervise --metrics-listen` against a real Docker engine and a real mosquitto:
//! `/healthz`, `/metrics` as the SUT comes up, agent and job figures fed over MQTT, series
//! removed with the SUT's file, `labvisor healthz` exit codes, and the server stopping with the
//! supervisor.
//!
//! The agents run without a broker (`--agent-broker none`), so the test itself publishes the
//! `<sut>/agent` and `<sut>/last_job` payloads the supervisor reads.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use labvisor_protocol::payloads::{AgentState, AgentStatus, ChildStatus, JobState, JobStatus};
use labvisor_protocol::topics::JobId;
use labvisor_protocol::SutName;
use labvisor_supervisor::cli::healthz::{probe, ProbeError};
use labvisor_tests::{
    ensure_busybox_image, free_port, static_bin, wait_until, DockerScope, Mosquitto, BUSYBOX_IMAGE,
};

const T: Duration = Duration::from_secs(30);

/// A running `labvisor supervise`, killed on drop.
struct Sup {
    child: Child,
    log: PathBuf,
}

impl Drop for Sup {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- supervisor log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

fn supervise(scope: &DockerScope, dir: &Path, broker: &str, listen: &str) -> Sup {
    let log = dir.parent().unwrap().join("supervisor.log");
    let child = Command::new(env!("CARGO_BIN_EXE_labvisor"))
        .arg("supervise")
        .arg("--sut-dir")
        .arg(dir)
        .args(["--id", scope.run_id()])
        .args(["--name-prefix", &scope.name("")])
        .args(["--extra-label", &scope.label()])
        .args(["--broker", broker])
        .args(["--agent-broker", "none"])
        .args(["--stop-timeout", "2s"])
        .args(["--metrics-listen", listen])
        .arg("--agent-bin")
        .arg(static_bin("labvisor-agent"))
        .arg("--healthcheck-bin")
        .arg(static_bin("labvisor-healthcheck"))
        .env("LABVISOR_LOG", "info,labvisor_supervisor=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Sup { child, log }
}

fn agent_status(sut: &str) -> String {
    serde_json::to_string(&AgentStatus {
        v: 1,
        sut: SutName::new(sut).unwrap(),
        state: AgentState::Idle,
        time_ms: 0,
        time: String::new(),
        seq: 0,
        boot_id: "test".to_owned(),
        agent_version: "test".to_owned(),
        child: Some(ChildStatus {
            pid: None,
            alive: true,
            restarts: 4,
            last_exit: None,
        }),
        job: None,
        queue_len: 2,
        broker_connected: true,
        output_dropped: 5,
        detail: None,
    })
    .unwrap()
}

fn last_job(sut: &str, id: &str, state: JobState) -> String {
    serde_json::to_string(&JobStatus {
        v: 1,
        sut: SutName::new(sut).unwrap(),
        id: JobId::new(id).unwrap(),
        state,
        exit_code: None,
        signal: None,
        queued_ms: 0,
        started_ms: None,
        ended_ms: None,
        duration_ms: None,
        output_bytes: 0,
        reason: None,
    })
    .unwrap()
}

/// `GET base + path`, the body when the answer is 200.
fn get(base: &str, path: &str) -> Result<String, ProbeError> {
    probe(&format!("{base}{path}"), Duration::from_secs(5))
}

/// Polls `/metrics` until it has every line of `lines`; returns the exposition.
fn wait_metrics(base: &str, what: &str, lines: &[&str]) -> String {
    wait_until(what, T, || {
        let text = get(base, "/metrics").ok()?;
        lines
            .iter()
            .all(|want| text.lines().any(|l| l == *want))
            .then_some(text)
    })
}

fn healthz_cli(url: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_labvisor"))
        .args(["healthz", "--url", url, "--timeout", "5s"])
        .output()
        .unwrap()
}

#[test]
fn metrics_and_healthz_follow_the_supervisor() {
    ensure_busybox_image();
    let scope = DockerScope::new("metrics");
    let broker = Mosquitto::start();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("sut");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("a.toml"), common::fast_sut(BUSYBOX_IMAGE, "")).unwrap();
    // Retained before the supervisor starts: the agent's figures, and a job that ended before
    // the supervisor watched (the baseline, never counted).
    let ok = |o: std::process::Output| assert!(o.status.success(), "{o:?}");
    ok(broker.publish("a/agent", &agent_status("a"), &["-r", "-q", "1"]));
    ok(broker.publish(
        "a/last_job",
        &last_job("a", "old", JobState::Cancelled),
        &["-r", "-q", "1"],
    ));
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut sup = supervise(&scope, &dir, &broker.url(), &format!("127.0.0.1:{port}"));

    // Live: /healthz answers ok once a pass ran with Docker reachable.
    let body = wait_until("/healthz answers 200", T, || get(&base, "/healthz").ok());
    assert_eq!(body, "ok");

    // The SUT comes up: created once, healthy, with the agent's figures.
    let text = wait_metrics(
        &base,
        "a healthy in /metrics",
        &[
            r#"labvisor_sut_health{sut="a",health="healthy"} 1"#,
            r#"labvisor_sut_up{sut="a"} 1"#,
            r#"labvisor_queue_length{sut="a"} 2"#,
            r#"labvisor_output_dropped{sut="a"} 5"#,
            r#"labvisor_child_restarts{sut="a"} 4"#,
        ],
    );
    for line in [
        r#"labvisor_reconcile_actions_total{action="create"} 1"#,
        r#"labvisor_sut_health{sut="a",health="unhealthy"} 0"#,
        r#"labvisor_restarts_total{sut="a"} 0"#,
        r#"labvisor_reconcile_errors_total{sut="a"} 0"#,
        r#"labvisor_suts{state="desired"} 1"#,
        r#"labvisor_suts{state="invalid"} 0"#,
        "labvisor_docker_reachable 1",
        "# EOF",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} missing in\n{text}"
        );
    }

    // Jobs: the same finished job published again and again (until the supervisor's
    // subscription shows it, then more) counts once; the baseline never.
    let j1 = last_job("a", "j1", JobState::Passed);
    wait_until("job j1 counted", T, || {
        ok(broker.publish("a/last_job", &j1, &["-q", "1"]));
        get(&base, "/metrics")
            .ok()?
            .lines()
            .any(|l| l == r#"labvisor_jobs_total{sut="a",outcome="passed"} 1"#)
            .then_some(())
    });
    for _ in 0..3 {
        ok(broker.publish("a/last_job", &j1, &["-q", "1"]));
    }
    ok(broker.publish(
        "a/last_job",
        &last_job("a", "j2", JobState::Failed),
        &["-q", "1"],
    ));
    let text = wait_metrics(
        &base,
        "job j2 counted",
        &[r#"labvisor_jobs_total{sut="a",outcome="failed"} 1"#],
    );
    assert!(
        text.lines()
            .any(|l| l == r#"labvisor_jobs_total{sut="a",outcome="passed"} 1"#),
        "{text}"
    );
    assert!(!text.contains(r#"outcome="cancelled""#), "{text}");

    // `labvisor healthz`: 0 against the supervisor, 1 against a closed port.
    let out = healthz_cli(&format!("{base}/healthz"));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    let closed = format!("http://127.0.0.1:{}/healthz", free_port());
    let out = healthz_cli(&closed);
    assert_eq!(out.status.code(), Some(1), "{out:?}");

    // The file is deleted: the container is removed and a's series are gone.
    std::fs::remove_file(dir.join("a.toml")).unwrap();
    let text = wait_metrics(
        &base,
        "a removed",
        &[
            r#"labvisor_reconcile_actions_total{action="remove"} 1"#,
            r#"labvisor_suts{state="desired"} 0"#,
        ],
    );
    let text = if text.contains(r#"sut="a""#) {
        wait_until("a's series removed", T, || {
            get(&base, "/metrics")
                .ok()
                .filter(|t| !t.contains(r#"sut="a""#))
        })
    } else {
        text
    };
    assert!(!text.contains(r#"sut="a""#), "{text}");

    // SIGTERM: the supervisor exits and the server with it.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sup.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = wait_until("the supervisor exits", T, || sup.child.try_wait().unwrap());
    assert!(status.success(), "{status:?}");
    let out = healthz_cli(&format!("{base}/healthz"));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}
