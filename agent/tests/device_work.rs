//! The device's own work, with the agent as a plain process (no broker): `device.busy_glob`
//! makes it `busy` with `device_work` in the heartbeat; `labvisor-agent drain` (what the
//! supervisor runs through `docker exec`) sends `drain_signal` once to the device process, which
//! finishes and is not restarted; `drain --lift` starts it again. While a drain is asked, a
//! queued labvisor job waits (it runs once the drain is lifted, or in the next container).

mod common;

use std::process::Command;
use std::time::Duration;

use common::{sut_toml, AgentProc, Collector};
use labvisor_tests::{wait_until, Mosquitto};
use serde_json::Value;

const T: Duration = Duration::from_secs(10);

/// A device that, told to drain (SIGUSR1), exits once its work file is gone.
const DEVICE: &str = "d=0; trap 'd=1; echo drain-asked' USR1; echo device-up; \
    while true; do sleep 0.05; if [ $d = 1 ] && [ -z \"$(ls $WORK 2>/dev/null)\" ]; then echo device-done; exit 0; fi; done";

fn drain(agent: &AgentProc, lift: bool) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_labvisor-agent"));
    cmd.arg("--heartbeat-file")
        .arg(agent.path("run/heartbeat"))
        .arg("drain");
    if lift {
        cmd.arg("--lift");
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn device_work_is_busy_and_a_drain_lets_it_finish_then_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let toml = sut_toml(
        Some(DEVICE),
        &format!(
            "[env]\nWORK = \"{}/*/job.json\"\n[device]\nbusy_glob = [\"{}/*/job.json\"]\ndrain_signal = \"SIGUSR1\"\n",
            run.display(),
            run.display()
        ),
    );
    let agent = AgentProc::start("work-1", &toml, None, &[]);
    agent.wait_hb("child_alive", T, |v| v == "true");
    assert_eq!(agent.hb("state").as_deref(), Some("idle"));

    std::fs::create_dir_all(run.join("j1")).unwrap();
    let job = run.join("j1/job.json");
    std::fs::write(&job, "{}").unwrap();
    agent.wait_hb("device_work", T, |v| v == job.display().to_string());
    assert_eq!(agent.hb("state").as_deref(), Some("busy"));

    drain(&agent, false);
    agent.wait_hb("detail", T, |v| v.contains("draining: SIGUSR1"));
    wait_until("the device got the drain signal", T, || {
        String::from_utf8_lossy(&agent.log())
            .contains("drain-asked")
            .then_some(())
    });
    assert_eq!(
        agent.hb("child_alive").as_deref(),
        Some("true"),
        "its work goes on"
    );

    std::fs::remove_dir_all(run.join("j1")).unwrap();
    agent.wait_hb("child_alive", T, |v| v == "false");
    agent.wait_hb("state", T, |v| v == "idle");
    assert_eq!(agent.hb("device_work").as_deref(), Some(""));
    let log = String::from_utf8_lossy(&agent.log()).into_owned();
    assert!(log.contains("device-done"), "{log}");
    assert!(log.contains("drained: not restarted"), "{log}");
    assert_eq!(log.matches("device-up").count(), 1, "not restarted: {log}");

    drain(&agent, true);
    agent.wait_hb("child_alive", T, |v| v == "true");
    agent.wait_hb("child_restarts", T, |v| v == "1");
}

/// While a drain is asked, a job that is submitted is accepted and stays queued (the agent
/// stays `idle`, the job never starts); once the drain is lifted it runs.
#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn a_queued_job_waits_while_a_drain_is_asked() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let toml = sut_toml(
        Some(DEVICE),
        &format!(
            "[env]\nWORK = \"{0}/*/job.json\"\n[device]\nbusy_glob = [\"{0}/*/job.json\"]\ndrain_signal = \"SIGUSR1\"\n",
            run.display()
        ),
    );
    let broker = Mosquitto::start();
    let mqtt = Collector::start(broker.port(), &["work-2/#"]);
    let agent = AgentProc::start("work-2", &toml, Some(&broker.url()), &[]);
    let json = |text: &str| serde_json::from_str::<Value>(text).unwrap_or(Value::Null);
    mqtt.wait("work-2/agent", T, |m| {
        json(&m.text)["broker_connected"] == true
    });
    drain(&agent, false);
    agent.wait_hb("detail", T, |v| v.contains("draining: SIGUSR1"));

    let out = broker.publish(
        "work-2/submit",
        r#"{"id":"waits","script":"echo ran"}"#,
        &["-q", "1"],
    );
    assert!(out.status.success(), "{out:?}");
    let ack = mqtt.wait("work-2/submit_status", T, |m| {
        json(&m.text)["id"] == "waits"
    });
    assert_eq!(json(&ack.text)["result"], "accepted", "{}", ack.text);
    let queued_ms = json(&ack.text)["time_ms"].as_u64().unwrap_or_else(|| {
        let st = mqtt.wait("work-2/jobs/waits", T, |m| {
            json(&m.text)["state"] == "queued"
        });
        json(&st.text)["queued_ms"].as_u64().unwrap()
    });
    // Statuses made a second after it was queued: still queued, nothing started.
    let later = mqtt.wait("work-2/agent", T, |m| {
        json(&m.text)["time_ms"]
            .as_u64()
            .is_some_and(|t| t > queued_ms + 1000)
    });
    let st = json(&later.text);
    assert_eq!(
        (&st["queue_len"], &st["state"]),
        (&1.into(), &"idle".into()),
        "{st}"
    );
    let states: Vec<Value> = mqtt
        .on("work-2/jobs/waits")
        .iter()
        .map(|m| json(&m.text)["state"].clone())
        .collect();
    assert_eq!(states, ["queued"], "it did not start");

    drain(&agent, true);
    mqtt.wait("work-2/jobs/waits", T, |m| {
        json(&m.text)["state"] == "passed"
    });
}
