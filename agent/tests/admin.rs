//! Admin commands on `<sut>/admin` sent by hand (`mosquitto_pub`, plain text) to a real agent
//! process: bad and retained commands change nothing and say why in the output; offline
//! rejects a new job naming the reason but still answers a duplicate as `duplicate`; the state
//! is on the volume (`admin.json`) and in the heartbeat, and outlives an agent restart until
//! `online`.

mod common;

use std::time::Duration;

use common::{sut_toml, AgentProc, Collector, Seen};
use labvisor_tests::{wait_until, Mosquitto};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(20);

fn json(s: &Seen) -> Value {
    serde_json::from_str(&s.text).unwrap_or(Value::Null)
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn admin_commands_by_hand_and_what_offline_refuses() {
    let broker = Mosquitto::start();
    let mqtt = Collector::start(broker.port(), &["ad-1/#"]);
    let mut agent = AgentProc::start(
        "ad-1",
        &sut_toml(None, ""),
        Some(&broker.url()),
        &["--grace", "500ms"],
    );
    let publish = |topic: &str, payload: &str, extra: &[&str]| {
        let mut args = vec!["-q", "1"];
        args.extend_from_slice(extra);
        let out = broker.publish(topic, payload, &args);
        assert!(out.status.success(), "{out:?}");
    };
    let log = |agent: &AgentProc| String::from_utf8_lossy(&agent.log()).into_owned();
    let ack = |pred: &dyn Fn(&Value) -> bool| -> Value {
        json(&mqtt.wait("ad-1/submit_status", LIMIT, |m| pred(&json(m))))
    };
    mqtt.wait("ad-1/agent", LIMIT, |m| json(m)["state"] == "idle");
    publish("ad-1/submit", r#"{"id":"acc-1","script":"true"}"#, &[]);
    mqtt.wait("ad-1/jobs/acc-1", LIMIT, |m| json(m)["state"] == "passed");

    // Retained, without a reason, or not a command: refused, with the reason in the output.
    publish("ad-1/admin", "offline retained by mistake", &["-r"]);
    publish("ad-1/admin", "offline", &[]);
    publish("ad-1/admin", "reboot now", &[]);
    wait_until("three refusals in the output", LIMIT, || {
        let l = log(&agent);
        (l.contains("admin command refused: a retained message on ad-1/admin is ignored")
            && l.contains("admin command refused: offline needs a reason")
            && l.contains("admin command refused: invalid admin command \"reboot now\""))
        .then_some(())
    });
    publish("ad-1/admin", "", &["-r"]);
    assert!(!agent.path("data/admin.json").exists());

    // Offline by hand: in the status, the heartbeat and on the volume.
    publish("ad-1/admin", "offline flaky usb hub", &[]);
    let st = json(&mqtt.wait("ad-1/agent", LIMIT, |m| {
        json(m)["admin"]["mode"] == "offline"
    }));
    assert_eq!(st["admin"]["reason"], "flaky usb hub", "{st}");
    agent.wait_hb("admin", LIMIT, |v| v == "offline: flaky usb hub");
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(agent.path("data/admin.json")).unwrap())
            .unwrap();
    assert_eq!((&file["v"], &file["mode"]), (&1.into(), &"offline".into()));

    // A redelivered accepted job is still a duplicate; a new one is rejected with the reason.
    publish("ad-1/submit", r#"{"id":"acc-1","script":"true"}"#, &[]);
    ack(&|a| a["id"] == "acc-1" && a["result"] == "duplicate");
    publish("ad-1/submit", r#"{"id":"new-1","script":"true"}"#, &[]);
    let a = ack(&|a| a["id"] == "new-1");
    assert_eq!(a["result"], "rejected", "{a}");
    let reason = a["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("the SUT is offline: flaky usb hub (since "),
        "{reason}"
    );

    // Restarted on the same volume: still offline, until online.
    agent.restart();
    let boot = st["boot_id"].clone();
    mqtt.wait("ad-1/agent", LIMIT, |m| {
        let s = json(m);
        s["boot_id"] != boot && s["state"] == "idle" && s["admin"]["reason"] == "flaky usb hub"
    });
    publish("ad-1/admin", r#"{"v":1,"mode":"online","by":"ops"}"#, &[]);
    mqtt.wait("ad-1/agent", LIMIT, |m| {
        json(m)["admin"]["mode"] == "online" && json(m)["admin"]["by"] == "ops"
    });
    agent.wait_hb("admin", LIMIT, str::is_empty);
    publish("ad-1/submit", r#"{"id":"new-2","script":"true"}"#, &[]);
    mqtt.wait("ad-1/jobs/new-2", LIMIT, |m| json(m)["state"] == "passed");
}
