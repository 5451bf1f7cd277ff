//! Lab operations against a real Docker engine and a real mosquitto: a person's `docker stop`
//! honoured, and the rolling restart (`labvisor restart --when-idle`).
//!
//! Each test runs its own supervisor ([`Sup`], a [`DockerScope`]) and broker; everything is
//! removed by label when the scope drops. Passes are counted from the supervisor's own log
//! (`Reconcile pass done.`, with `--resync 1s`), never waited for with a sleep.

use std::process::Command;
use std::time::Duration;

use assert_cmd::cargo::CommandCargoExt;
use labvisor_protocol::payloads::{
    AgentState, AgentStatus, JobState, JobStatus, RestartState, RestartStatus, RestartStep, SutView,
};
mod common;

use common::{fast_sut, own_network, ps, tmp_sut_dir, views, wait_healthy, write, Sup};
use labvisor_tests::{
    docker_ok, ensure_busybox_image, network_gateway, wait_until, DockerScope, Mosquitto,
    Subscriber, BUSYBOX_IMAGE,
};

const T: Duration = Duration::from_secs(30);

/// A SUT file with fast health timings; `marker` changes its hash.
fn sut_file(marker: &str) -> String {
    fast_sut(BUSYBOX_IMAGE, &format!("[env]\nMARKER = \"{marker}\"\n"))
}

/// Reconcile passes `sup` has logged so far.
fn passes(sup: &Sup) -> usize {
    sup.log()
        .lines()
        .filter(|l| l.contains("Reconcile pass done."))
        .count()
}

/// Waits until `sup` has made `n` more passes than now.
fn wait_passes(sup: &Sup, n: usize) {
    let before = passes(sup);
    wait_until(&format!("{n} more passes"), T, || {
        (passes(sup) >= before + n).then_some(())
    });
}

/// The latest view of `sut` that `sub` saw.
fn last_view(sub: &Subscriber, sut: &str) -> Option<SutView> {
    views(sub, sut).pop()
}

/// `docker ps`'s status of the scope's container `sut`.
fn status_of(scope: &DockerScope, sut: &str) -> (String, String) {
    let mut all = ps(scope);
    all.remove(&scope.name(sut))
        .unwrap_or_else(|| panic!("no container {} in {all:?}", scope.name(sut)))
}

fn labvisor(broker: &Mosquitto, args: &[&str]) -> std::process::Output {
    Command::cargo_bin("labvisor")
        .unwrap()
        .args(args)
        .env("LABVISOR_BROKER", broker.url())
        .env_remove("LABVISOR_TOPIC_PREFIX")
        .output()
        .unwrap()
}

/// A person's `docker stop` is honoured: the container stays exited over several passes and
/// across a supervisor restart, the view and `labvisor status` say it was stopped by a person;
/// `docker start` is back to normal; a changed file recreates it.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn a_person_s_docker_stop_is_honoured() {
    ensure_busybox_image();
    let scope = DockerScope::new("ops-stop");
    let broker = Mosquitto::start();
    let sub = broker.subscribe("+/supervisor", &[]);
    let (_t, dir) = tmp_sut_dir();
    write(&dir, "a.toml", &sut_file("1"));
    let args = ["--resync", "1s"];
    let mut sup = Sup::start(&scope, &dir, Some(&broker.url()), &args);
    let id = wait_healthy(&scope, "a", T);

    docker_ok(&["stop", "-t", "2", &id]);
    let v = wait_until("the view says stopped by a person", T, || {
        last_view(&sub, "a").filter(|v| v.stopped_by_person.is_some())
    });
    let at = v.stopped_by_person.unwrap().at_ms.expect("when");
    let now = labvisor_protocol::payloads::now_ms();
    assert!(at <= now && at + 60_000 > now, "FinishedAt {at}, now {now}");
    wait_passes(&sup, 4);
    let (still, status) = status_of(&scope, "a");
    assert_eq!(still, id);
    assert!(status.starts_with("Exited"), "{status}");
    let out = labvisor(&broker, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("a ") && l.contains("stopped by a person at")),
        "{text}"
    );

    // A supervisor started meanwhile leaves it stopped too.
    sup.kill();
    let sup = Sup::start(&scope, &dir, Some(&broker.url()), &args);
    wait_passes(&sup, 4);
    let (still, status) = status_of(&scope, "a");
    assert_eq!(still, id);
    assert!(status.starts_with("Exited"), "{status}");

    // docker start: back to normal.
    docker_ok(&["start", &id]);
    assert_eq!(wait_healthy(&scope, "a", T), id);
    wait_until("the view without the stop", T, || {
        last_view(&sub, "a").filter(|v| v.stopped_by_person.is_none())
    });

    // Stopped again, then its file changes: recreated (a new container, running).
    docker_ok(&["stop", "-t", "2", &id]);
    wait_until("stopped by a person again", T, || {
        last_view(&sub, "a").filter(|v| v.stopped_by_person.is_some())
    });
    write(&dir, "a.toml", &sut_file("2"));
    let new = wait_until("a new container, healthy", T, || {
        let (new, status) = ps(&scope).remove(&scope.name("a"))?;
        (new != id && status.ends_with("(healthy)")).then_some(new)
    });
    wait_until("the view of the new container", T, || {
        last_view(&sub, "a").filter(|v| {
            v.container_id.as_deref() == Some(new.as_str()) && v.stopped_by_person.is_none()
        })
    });
}

/// A broker the agents reach: mosquitto listening on the gateway of the supervisor's network
/// (made first, labelled as the supervisor's own). Returns it and the URL for agents.
fn gateway_broker(scope: &DockerScope) -> (Mosquitto, String) {
    let net = own_network(scope, "labvisor.net");
    let gateway = network_gateway(&net);
    let broker = Mosquitto::start_with(&format!(
        "allow_anonymous true\npersistence false\nlistener {{port}} {gateway}\n"
    ));
    let url = format!("mqtt://{gateway}:{}", broker.port());
    (broker, url)
}

/// The JSON payloads `sub` saw on `topic`, in order.
fn payloads<T: serde::de::DeserializeOwned>(sub: &Subscriber, topic: &str) -> Vec<T> {
    let prefix = format!("{topic} ");
    sub.lines()
        .iter()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|p| serde_json::from_str(p).ok())
        .collect()
}

/// A rolling restart of three SUTs, one of them busy with a job that waits for a marker: the
/// two idle ones are recreated (new container ids) one at a time, the busy one only after its
/// job ended `passed`, and `labvisor restart` exits 0 at the end.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn a_rolling_restart_waits_for_the_busy_agent() {
    ensure_busybox_image();
    let scope = DockerScope::new("ops-roll");
    let (broker, agent_broker) = gateway_broker(&scope);
    let sub = broker.subscribe("#", &[]);
    let (_t, dir) = tmp_sut_dir();
    for s in ["r1", "r2", "r3"] {
        write(&dir, &format!("{s}.toml"), &sut_file("1"));
    }
    let sup = Sup::start(
        &scope,
        &dir,
        Some(&broker.url()),
        &["--agent-broker", &agent_broker, "--resync", "1s"],
    );
    let old: Vec<String> = ["r1", "r2", "r3"]
        .iter()
        .map(|s| wait_healthy(&scope, s, T))
        .collect();
    for s in ["r1", "r2", "r3"] {
        wait_until(&format!("{s} idle on the broker"), T, || {
            payloads::<AgentStatus>(&sub, &format!("{s}/agent"))
                .into_iter()
                .find(|a| a.state == AgentState::Idle)
        });
    }
    // r2 runs a job until the marker exists.
    let job = serde_json::json!({
        "id": "waits",
        "script": "while [ ! -f /tmp/go ]; do sleep 0.2; done; echo done",
    })
    .to_string();
    assert!(broker
        .publish("r2/submit", &job, &["-q", "1"])
        .status
        .success());
    wait_until("r2 busy", T, || {
        payloads::<AgentStatus>(&sub, "r2/agent")
            .into_iter()
            .find(|a| a.state == AgentState::Busy)
    });

    let cli = Command::cargo_bin("labvisor")
        .unwrap()
        .args(["restart", "r1", "r2", "r3", "--when-idle"])
        .env("LABVISOR_BROKER", broker.url())
        .env_remove("LABVISOR_TOPIC_PREFIX")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut cli = labvisor_tests::KillOnDrop(cli);
    let restart_topic = format!("labvisor/supervisors/{}/restart_status", scope.run_id());

    // r1 and r3 are recreated, r2 keeps its container while its job runs.
    let new_of = |i: usize, s: &str| {
        let (id, status) = ps(&scope).remove(&scope.name(s))?;
        (id != old[i] && status.ends_with("(healthy)")).then_some(id)
    };
    let n1 = wait_until("r1 recreated", T, || new_of(0, "r1"));
    let n3 = wait_until("r3 recreated", T, || new_of(2, "r3"));
    wait_until("r2's restart waits for its job", T, || {
        payloads::<RestartStatus>(&sub, &restart_topic)
            .into_iter()
            .rev()
            .find(|r| {
                [0, 2].iter().all(|i| r.suts[*i].step == RestartStep::Done)
                    && r.suts[1].step == RestartStep::WaitingIdle
            })
    });
    wait_until("r2's view says it waits", T, || {
        last_view(&sub, "r2").filter(|v| {
            v.pending_action
                .as_deref()
                .is_some_and(|p| p.starts_with("restart"))
        })
    });
    wait_passes(&sup, 2);
    assert_eq!(
        ps(&scope)[&scope.name("r2")].0,
        old[1],
        "r2 waits for its job"
    );
    assert!(cli.0.try_wait().unwrap().is_none(), "the CLI waits too");

    // The job ends: passed, then r2 is recreated and the CLI exits 0.
    docker_ok(&["exec", &old[1], "touch", "/tmp/go"]);
    wait_until("the job passed", T, || {
        payloads::<JobStatus>(&sub, "r2/jobs/waits")
            .into_iter()
            .find(|j| j.state == JobState::Passed)
    });
    let n2 = wait_until("r2 recreated", T, || new_of(1, "r2"));
    let out = wait_until("the CLI exits", T, || cli.0.try_wait().unwrap());
    let mut stdout = String::new();
    std::io::Read::read_to_string(cli.0.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    assert!(out.success(), "{out:?}\n{stdout}");
    assert!(stdout.contains("r2: done"), "{stdout}");
    assert_ne!(n1, n3);
    assert_ne!(n2, old[1]);

    // One at a time: no status shows two SUTs being recreated or starting at once.
    let statuses = payloads::<RestartStatus>(&sub, &restart_topic);
    assert_eq!(statuses.last().unwrap().state, RestartState::Done);
    for st in &statuses {
        let busy = st
            .suts
            .iter()
            .filter(|s| {
                matches!(
                    s.step,
                    RestartStep::Recreating | RestartStep::WaitingHealthy
                )
            })
            .count();
        assert!(busy <= 1, "{st:?}");
    }
    // And the job was never cut: it passed (not lost), once.
    let finals: Vec<JobState> = payloads::<JobStatus>(&sub, "r2/jobs/waits")
        .into_iter()
        .map(|j| j.state)
        .filter(|s| *s != JobState::Running && *s != JobState::Queued)
        .collect();
    assert_eq!(finals, vec![JobState::Passed]);
}

/// Without `--when-idle`, `labvisor restart` refuses before it talks to anyone (exit 2).
#[test]
fn a_restart_that_would_cut_jobs_is_refused() {
    let out = Command::cargo_bin("labvisor")
        .unwrap()
        .args(["restart", "r1", "--broker", "mqtt://127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--when-idle"), "{err}");
}

/// `labvisor restart --all --when-idle` with no credentials, against the managed broker: the
/// local tools login may ask for it (the managed ACL), every SUT is recreated, exit 0.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn the_local_login_restarts_all_through_the_managed_broker() {
    ensure_busybox_image();
    let scope = DockerScope::new("ops-all");
    let t = tempfile::tempdir().unwrap();
    let (dir, state) = (t.path().join("sut"), t.path().join("state"));
    std::fs::create_dir_all(&dir).unwrap();
    for s in ["m1", "m2"] {
        write(&dir, &format!("{s}.toml"), &sut_file("1"));
    }
    let port = labvisor_tests::free_port();
    let url = format!("mqtt://127.0.0.1:{port}");
    let log = t.path().join("supervisor.log");
    // The managed broker runs when neither --broker nor --agent-broker is given.
    let _sup = labvisor_tests::KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_labvisor"))
            .arg("supervise")
            .arg("--sut-dir")
            .arg(&dir)
            .args(["--id", scope.run_id()])
            .args(["--name-prefix", &scope.name("")])
            .args(["--extra-label", &scope.label()])
            .args(["--broker-port", &port.to_string()])
            .args(["--metrics-listen", "none", "--stop-timeout", "2s"])
            .arg("--state-dir")
            .arg(&state)
            .arg("--agent-bin")
            .arg(labvisor_tests::static_bin("labvisor-agent"))
            .arg("--healthcheck-bin")
            .arg(labvisor_tests::static_bin("labvisor-healthcheck"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let old = [wait_healthy(&scope, "m1", T), wait_healthy(&scope, "m2", T)];
    let out = Command::cargo_bin("labvisor")
        .unwrap()
        .args(["restart", "--all", "--when-idle", "--broker", &url])
        .env("LABVISOR_STATE_DIR", &state)
        .env_remove("LABVISOR_TOPIC_PREFIX")
        .env_remove("LABVISOR_MQTT_USERNAME")
        .env_remove("LABVISOR_MQTT_PASSWORD")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}\n--- supervisor log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        stdout.contains("m1: done") && stdout.contains("m2: done"),
        "{stdout}"
    );
    // Each turn ended once the new agent said it was healthy (the supervisor's view); Docker's
    // own first probe follows one interval after the start.
    for (i, s) in ["m1", "m2"].iter().enumerate() {
        let (id, _) = status_of(&scope, s);
        assert_ne!(id, old[i], "{s} recreated");
        assert_eq!(
            wait_healthy(&scope, s, T),
            id,
            "{s}: the new container turns healthy"
        );
    }
}

/// A supervisor restarted during a rolling restart does not resume it: the new run marks the
/// progress it finds retained as failed, and `labvisor restart` exits non-zero with why; the
/// busy SUT keeps its container and its job.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn a_supervisor_restart_ends_its_rolling_restart_as_failed() {
    ensure_busybox_image();
    let scope = DockerScope::new("ops-cut");
    let (broker, agent_broker) = gateway_broker(&scope);
    let sub = broker.subscribe("#", &[]);
    let (_t, dir) = tmp_sut_dir();
    write(&dir, "b1.toml", &sut_file("1"));
    let args = ["--agent-broker", agent_broker.as_str(), "--resync", "1s"];
    let mut sup = Sup::start(&scope, &dir, Some(&broker.url()), &args);
    let id = wait_healthy(&scope, "b1", T);
    wait_until("b1 idle on the broker", T, || {
        payloads::<AgentStatus>(&sub, "b1/agent")
            .into_iter()
            .find(|a| a.state == AgentState::Idle)
    });
    let job =
        serde_json::json!({"id": "long", "script": "while [ ! -f /tmp/go ]; do sleep 0.2; done"});
    assert!(broker
        .publish("b1/submit", &job.to_string(), &["-q", "1"])
        .status
        .success());
    wait_until("b1 busy", T, || {
        payloads::<AgentStatus>(&sub, "b1/agent")
            .into_iter()
            .find(|a| a.state == AgentState::Busy)
    });
    let mut cli = labvisor_tests::KillOnDrop(
        Command::cargo_bin("labvisor")
            .unwrap()
            .args(["restart", "b1", "--when-idle"])
            .env("LABVISOR_BROKER", broker.url())
            .env_remove("LABVISOR_TOPIC_PREFIX")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let topic = format!("labvisor/supervisors/{}/restart_status", scope.run_id());
    wait_until("the restart waits for b1's job", T, || {
        payloads::<RestartStatus>(&sub, &topic)
            .into_iter()
            .find(|r| r.suts[0].step == RestartStep::WaitingIdle)
    });

    sup.kill();
    let _sup = Sup::start(&scope, &dir, Some(&broker.url()), &args);
    let failed = wait_until("the restart marked failed", T, || {
        payloads::<RestartStatus>(&sub, &topic)
            .into_iter()
            .find(|r| r.state == RestartState::Failed)
    });
    assert!(
        failed
            .reason
            .as_deref()
            .unwrap()
            .contains("supervisor restarted"),
        "{failed:?}"
    );
    let code = wait_until("the CLI exits", T, || cli.0.try_wait().unwrap());
    assert!(!code.success(), "{code:?}");
    let mut err = String::new();
    std::io::Read::read_to_string(cli.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("supervisor"), "{err}");
    wait_passes(&_sup, 3);
    assert_eq!(status_of(&scope, "b1").0, id, "b1 keeps its container");
}
