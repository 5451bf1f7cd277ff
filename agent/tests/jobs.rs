//! Jobs over MQTT against a real mosquitto, submitted with real clients (`mosquitto_pub`, and
//! paho-mqtt for the MQTT 5 response topic): acknowledgements, order, durability across an agent
//! kill, duplicates, cancel, timeouts and every bad input.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{sut_toml, AgentProc, Collector, Seen};
use labvisor_tests::{wait_until, Mosquitto};
use nix::sys::signal::Signal;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(20);

fn json(s: &Seen) -> Value {
    serde_json::from_str(&s.text).unwrap_or(Value::Null)
}

fn submit(broker: &Mosquitto, sut: &str, payload: &str) {
    let out = broker.publish(&format!("{sut}/submit"), payload, &["-q", "1"]);
    assert!(out.status.success(), "{out:?}");
}

struct Lab {
    broker: Mosquitto,
    mqtt: Collector,
    agent: AgentProc,
    sut: String,
}

impl Lab {
    fn new(sut: &str, extra: &str) -> Lab {
        Lab::with_args(sut, extra, &[])
    }

    /// A lab whose agent gets `args` besides `--grace 500ms`.
    fn with_args(sut: &str, extra: &str, args: &[&str]) -> Lab {
        let broker = Mosquitto::start();
        let mqtt = Collector::start(broker.port(), &[&format!("{sut}/#")]);
        let mut all = vec!["--grace", "500ms"];
        all.extend_from_slice(args);
        let agent = AgentProc::start(sut, &sut_toml(None, extra), Some(&broker.url()), &all);
        let lab = Lab {
            broker,
            mqtt,
            agent,
            sut: sut.to_owned(),
        };
        lab.wait_idle();
        lab
    }

    fn t(&self, leaf: &str) -> String {
        format!("{}/{leaf}", self.sut)
    }

    fn wait_idle(&self) {
        self.mqtt.wait(&self.t("agent"), LIMIT, |m| {
            json(m)["state"] == "idle" && json(m)["broker_connected"] == true
        });
    }

    /// The acknowledgement (on submit_status) whose JSON satisfies `pred`.
    fn ack(&self, pred: impl Fn(&Value) -> bool) -> Value {
        json(
            &self
                .mqtt
                .wait(&self.t("submit_status"), LIMIT, |m| pred(&json(m))),
        )
    }

    fn accepted_id(&self, n: usize) -> String {
        let acks: Vec<Value> = wait_until(&format!("{n} acknowledgements"), LIMIT, || {
            let a: Vec<Value> = self
                .mqtt
                .on(&self.t("submit_status"))
                .iter()
                .map(json)
                .collect();
            (a.len() >= n).then_some(a)
        });
        assert_eq!(acks[n - 1]["result"], "accepted", "{}", acks[n - 1]);
        acks[n - 1]["id"].as_str().unwrap().to_owned()
    }

    /// Waits for job `id` to reach a final state and returns its status.
    fn final_status(&self, id: &str) -> Value {
        json(&self.mqtt.wait(&self.t(&format!("jobs/{id}")), LIMIT, |m| {
            matches!(
                json(m)["state"].as_str(),
                Some("passed" | "failed" | "cancelled" | "timeout" | "lost")
            )
        }))
    }
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn a_plain_text_job_from_mosquitto_pub_runs_with_output_and_last_job() {
    let lab = Lab::new("job-plain", "");
    submit(
        &lab.broker,
        &lab.sut,
        "echo hello from the job\necho \"id=$LABVISOR_JOB_ID sut=$LABVISOR_SUT\"\nexit 3\n",
    );
    let id = lab.accepted_id(1);
    let st = lab.final_status(&id);
    assert_eq!(st["state"], "failed");
    assert_eq!(st["exit_code"], 3);
    assert!(st["output_bytes"].as_u64().unwrap() > 20);
    let out = lab
        .mqtt
        .wait(&lab.t(&format!("jobs/{id}/output")), LIMIT, |m| {
            m.text.contains("sut=job-plain")
        });
    assert!(out.text.contains(&format!("id={id}")), "{}", out.text);
    lab.mqtt.wait(&lab.t("output"), LIMIT, |m| {
        m.text.contains("hello from the job")
    });
    // last_job is retained: a late subscriber sees the final status.
    let late = lab
        .broker
        .subscribe(&lab.t("last_job"), &["-C", "1", "-W", "5"]);
    let line = late.wait_lines(1, Duration::from_secs(6)).remove(0);
    assert!(
        line.contains(&id) && line.contains("\"state\":\"failed\""),
        "{line}"
    );
    assert!(String::from_utf8_lossy(&lab.agent.log()).contains("hello from the job"));
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn fifty_jobs_in_a_burst_all_run_once_in_order() {
    let lab = Lab::new("job-burst", "[job]\nqueue_limit = 100\n");
    let lines: String = (0..50)
        .map(|i| format!("{{\"id\":\"burst-{i:02}\",\"script\":\"echo ran burst-{i:02}\"}}\n"))
        .collect();
    // One client, 50 QoS 1 messages back to back (-l: one message per stdin line).
    let mut child = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &lab.broker.port().to_string(),
            "-q",
            "1",
            "-l",
            "-t",
            &lab.t("submit"),
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    for i in 0..50 {
        assert_eq!(
            lab.final_status(&format!("burst-{i:02}"))["state"],
            "passed"
        );
    }
    let log = String::from_utf8_lossy(&lab.agent.log()).into_owned();
    let ran: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("ran burst-"))
        .collect();
    let want: Vec<String> = (0..50).map(|i| format!("ran burst-{i:02}")).collect();
    assert_eq!(ran, want, "every job ran once, in submission order");
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn an_agent_killed_with_queued_jobs_runs_them_after_restart_and_reports_the_lost_one() {
    let mut lab = Lab::new("job-crash", "[job]\nqueue_limit = 20\n");
    submit(
        &lab.broker,
        &lab.sut,
        r#"{"id":"long","script":"echo started long; sleep 60"}"#,
    );
    for i in 0..10 {
        submit(
            &lab.broker,
            &lab.sut,
            &format!(r#"{{"id":"after-{i}","script":"echo ran after-{i}"}}"#),
        );
    }
    lab.ack(|a| a["id"] == "after-9" && a["result"] == "accepted");
    lab.mqtt.wait(&lab.t("jobs/long"), LIMIT, |m| {
        json(m)["state"] == "running"
    });
    lab.agent.signal(Signal::SIGKILL);
    lab.agent.wait_exit(Duration::from_secs(5));
    lab.agent.kill_orphans();
    // Restart on the same volume and the same broker, as Docker restarts the container.
    lab.agent.restart();
    let lost = lab.final_status("long");
    assert_eq!(lost["state"], "lost");
    assert!(
        lost["reason"].as_str().unwrap().contains("agent died"),
        "{lost}"
    );
    for i in 0..10 {
        assert_eq!(lab.final_status(&format!("after-{i}"))["state"], "passed");
    }
    let log = String::from_utf8_lossy(&lab.agent.log()).into_owned();
    let ran: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("ran after-"))
        .collect();
    let want: Vec<String> = (0..10).map(|i| format!("ran after-{i}")).collect();
    assert_eq!(ran, want, "each queued job ran once, in order");
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn a_duplicate_id_is_acknowledged_and_runs_once() {
    let lab = Lab::new("job-dup", "");
    let job = r#"{"id":"same-1","script":"echo ran same-1"}"#;
    submit(&lab.broker, &lab.sut, job);
    lab.ack(|a| a["id"] == "same-1" && a["result"] == "accepted");
    submit(&lab.broker, &lab.sut, job);
    lab.ack(|a| a["id"] == "same-1" && a["result"] == "duplicate");
    assert_eq!(lab.final_status("same-1")["state"], "passed");
    // A marker job proves the queue moved on, then the log shows one run only.
    submit(
        &lab.broker,
        &lab.sut,
        r#"{"id":"marker","script":"echo marker"}"#,
    );
    lab.final_status("marker");
    let log = String::from_utf8_lossy(&lab.agent.log()).into_owned();
    assert_eq!(log.lines().filter(|l| *l == "ran same-1").count(), 1);
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn cancel_works_for_a_queued_and_a_running_job() {
    let lab = Lab::new("job-cancel", "");
    submit(
        &lab.broker,
        &lab.sut,
        r#"{"id":"runner","script":"echo running; sleep 60"}"#,
    );
    submit(
        &lab.broker,
        &lab.sut,
        r#"{"id":"waiter","script":"echo must not run"}"#,
    );
    lab.ack(|a| a["id"] == "waiter" && a["result"] == "accepted" && a["position"] == 1);
    lab.mqtt.wait(&lab.t("jobs/runner"), LIMIT, |m| {
        json(m)["state"] == "running"
    });
    lab.mqtt.wait(&lab.t("agent"), LIMIT, |m| {
        json(m)["state"] == "busy" && json(m)["job"] == "runner"
    });

    lab.broker.publish(&lab.t("cancel"), "waiter", &["-q", "1"]);
    let st = lab.final_status("waiter");
    assert_eq!(st["state"], "cancelled");
    lab.mqtt.wait(&lab.t("cancel_status"), LIMIT, |m| {
        json(m)["id"] == "waiter" && json(m)["result"] == "cancelled"
    });

    lab.broker
        .publish(&lab.t("cancel"), "current", &["-q", "1"]);
    let st = lab.final_status("runner");
    assert_eq!(st["state"], "cancelled");
    assert_eq!(st["signal"], 15, "TERM ended it: {st}");
    lab.mqtt.wait(&lab.t("cancel_status"), LIMIT, |m| {
        json(m)["id"] == "runner" && json(m)["result"] == "cancelled"
    });

    lab.broker.publish(&lab.t("cancel"), "runner", &["-q", "1"]);
    lab.mqtt.wait(&lab.t("cancel_status"), LIMIT, |m| {
        json(m)["result"] == "already-finished"
    });
    lab.broker
        .publish(&lab.t("cancel"), "nosuchjob", &["-q", "1"]);
    let nf = lab.mqtt.wait(&lab.t("cancel_status"), LIMIT, |m| {
        json(m)["result"] == "not-found"
    });
    assert_eq!(json(&nf)["reason"], "no job nosuchjob");
    assert!(!String::from_utf8_lossy(&lab.agent.log()).contains("must not run"));
    lab.wait_idle();
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn timeout_and_output_timeout_stop_the_job() {
    let lab = Lab::new("job-timeouts", "");
    submit(
        &lab.broker,
        &lab.sut,
        r#"{"id":"slow","script":"while true; do echo still here; sleep 0.1; done","timeout":"1s"}"#,
    );
    let st = lab.final_status("slow");
    assert_eq!(st["state"], "timeout");
    assert!(
        st["reason"]
            .as_str()
            .unwrap()
            .starts_with("timeout: ran longer than 1s"),
        "{st}"
    );
    submit(
        &lab.broker,
        &lab.sut,
        r#"{"id":"quiet","script":"echo one line; sleep 60","output_timeout":"1s"}"#,
    );
    let st = lab.final_status("quiet");
    assert_eq!(st["state"], "timeout");
    assert!(
        st["reason"]
            .as_str()
            .unwrap()
            .starts_with("output_timeout: no output for 1s"),
        "{st}"
    );
    // A job that ignores TERM is killed after the grace period.
    submit(
        &lab.broker,
        &lab.sut,
        r#"{"id":"stubborn","script":"trap '' TERM; echo x; while true; do sleep 0.1; done","timeout":"1s"}"#,
    );
    let st = lab.final_status("stubborn");
    assert_eq!(
        (st["state"].as_str(), st["signal"].as_i64()),
        (Some("timeout"), Some(9)),
        "{st}"
    );
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn every_bad_input_gets_its_own_rejection_and_the_agent_keeps_going() {
    let lab = Lab::new(
        "job-bad",
        "[job]\nqueue_limit = 1\nmax_payload = \"100B\"\n",
    );
    let cases: &[(&str, &str)] = &[
        ("", "empty payload"),
        (
            &"x".repeat(101),
            "payload of 101 bytes exceeds max_payload 100",
        ),
        ("{not json", "payload starts with '{' but is not valid JSON"),
        (
            r#"{"script":"true","colour":"red"}"#,
            "unknown field `colour`",
        ),
        (r#"{"script":["true"]}"#, "invalid type"),
    ];
    for (i, (payload, reason)) in cases.iter().enumerate() {
        submit(&lab.broker, &lab.sut, payload);
        let a = wait_until(&format!("rejection {i}"), LIMIT, || {
            let acks: Vec<Value> = lab
                .mqtt
                .on(&lab.t("submit_status"))
                .iter()
                .map(json)
                .collect();
            acks.get(i).cloned()
        });
        assert_eq!(a["result"], "rejected", "{payload}: {a}");
        assert!(
            a["reason"].as_str().unwrap().contains(reason),
            "{payload}: {a}"
        );
    }
    // A full queue: one job runs, one waits (queue_limit 1), the third is refused.
    submit(&lab.broker, &lab.sut, r#"{"id":"q1","script":"sleep 60"}"#);
    lab.mqtt
        .wait(&lab.t("jobs/q1"), LIMIT, |m| json(m)["state"] == "running");
    submit(&lab.broker, &lab.sut, r#"{"id":"q2","script":"true"}"#);
    submit(&lab.broker, &lab.sut, r#"{"id":"q3","script":"true"}"#);
    let full = lab.ack(|a| a["id"] == "q3");
    assert_eq!(full["result"], "rejected");
    assert!(
        full["reason"]
            .as_str()
            .unwrap()
            .starts_with("queue is full"),
        "{full}"
    );
    lab.broker.publish(&lab.t("cancel"), "", &["-q", "1"]);
    lab.mqtt.wait(&lab.t("cancel_status"), LIMIT, |m| {
        json(m)["result"] == "rejected"
    });
    // Still alive and working: cancel the sleeper, q2 runs.
    lab.broker.publish(&lab.t("cancel"), "q1", &["-q", "1"]);
    assert_eq!(lab.final_status("q2")["state"], "passed");
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn a_job_sent_while_the_agent_is_down_runs_when_it_comes_back() {
    let mut lab = Lab::new("job-offline", "");
    lab.agent.signal(Signal::SIGTERM);
    assert_eq!(lab.agent.wait_exit(Duration::from_secs(5)).code(), Some(0));
    lab.mqtt
        .wait(&lab.t("agent"), LIMIT, |m| json(m)["state"] == "offline");
    submit(
        &lab.broker,
        &lab.sut,
        r#"{"id":"while-down","script":"echo ran while-down"}"#,
    );
    lab.agent.restart();
    assert_eq!(lab.final_status("while-down")["state"], "passed");
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn the_mqtt5_response_topic_gets_the_acknowledgement() {
    let lab = Lab::new("job-v5", "");
    let script = format!(
        r#"
import sys, time, json
try:
    import paho.mqtt.client as mqtt
    from paho.mqtt.properties import Properties
    from paho.mqtt.packettypes import PacketTypes
except ImportError:
    sys.exit("paho-mqtt is not installed: run tools/test.sh, which installs it")
got = []
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="v5-test", protocol=mqtt.MQTTv5)
c.on_message = lambda cl, u, m: got.append((m.payload.decode(), m.properties.CorrelationData))
c.connect("127.0.0.1", {port})
c.subscribe("labvisor/replies/job-v5/v5-test", qos=1)
c.loop_start()
time.sleep(0.5)
p = Properties(PacketTypes.PUBLISH)
p.ResponseTopic = "labvisor/replies/job-v5/v5-test"
p.CorrelationData = b"corr-7"
c.publish("job-v5/submit", "echo via paho", qos=1, properties=p)
deadline = time.time() + 15
while not got and time.time() < deadline:
    time.sleep(0.05)
c.loop_stop()
if not got:
    sys.exit("no acknowledgement on the response topic")
payload, corr = got[0]
print(json.dumps({{"ack": json.loads(payload), "corr": corr.decode()}}))
"#,
        port = lab.broker.port()
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ack"]["result"], "accepted", "{v}");
    assert_eq!(v["corr"], "corr-7");
    let id = v["ack"]["id"].as_str().unwrap().to_owned();
    assert_eq!(lab.final_status(&id)["state"], "passed");
}

/// Runs a paho-mqtt script (python3) with `{port}` replaced; panics unless it exits 0, and
/// returns its stdout.
fn paho(script: &str, port: u16) -> String {
    let script = format!(
        "import sys\ntry:\n    import paho.mqtt.client as mqtt\nexcept ImportError:\n    sys.exit('paho-mqtt is not installed: run tools/test.sh, which installs it')\n{}",
        script.replace("{port}", &port.to_string())
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn a_thousand_mixed_payloads_at_full_speed_get_a_thousand_answers() {
    // A small outbox (16) makes the burst overflow it many times over: the agent must stop
    // taking submissions instead of dropping answers.
    let lab = Lab::with_args(
        "job-fuzz",
        "[job]\nqueue_limit = 1000\n",
        &["--mqtt-queue", "16"],
    );
    let boot = json(&lab.mqtt.on(&lab.t("agent"))[0])["boot_id"].clone();
    let pid = lab.agent.pid();
    // 250 each of: random bytes (never UTF-8), UTF-8 text (a script), truncated JSON, valid
    // JSON jobs; shuffled, published back to back with QoS 1 by one paho client.
    let sent = paho(
        r##"
import random, time
rnd = random.Random(12)
payloads = []
for i in range(250):
    b = bytearray(rnd.randrange(256) for _ in range(rnd.randrange(1, 200)))
    b.insert(rnd.randrange(len(b) + 1), 0xFF)
    payloads.append(bytes(b))
    text = "".join(chr(rnd.choice([rnd.randrange(0x20, 0x7F), rnd.randrange(0xA0, 0xD7FF)])) for _ in range(rnd.randrange(1, 80)))
    payloads.append(("# " + text.replace("\n", " ") + "\necho utf8-%d\n" % i).encode())
    full = '{"id":"trunc-%d","script":"echo trunc-%d"}' % (i, i)
    payloads.append(full[:rnd.randrange(1, len(full))].encode())
    payloads.append(('{"id":"job-%d","script":"echo job-%d"}' % (i, i)).encode())
rnd.shuffle(payloads)
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fuzz-burst")
c.max_inflight_messages_set(100)
c.max_queued_messages_set(0)
c.connect("127.0.0.1", {port})
c.loop_start()
infos = [c.publish("job-fuzz/submit", p, qos=1) for p in payloads]
for info in infos:
    info.wait_for_publish(60)
    assert info.is_published()
c.disconnect()
c.loop_stop()
print(len(infos))
"##,
        lab.broker.port(),
    );
    assert_eq!(sent.trim(), "1000");
    // A marker sent after the burst: once it has run, every answer for the burst has arrived.
    submit(
        &lab.broker,
        &lab.sut,
        r#"{"id":"marker","script":"echo marker"}"#,
    );
    let limit = Duration::from_secs(180);
    json(&lab.mqtt.wait(&lab.t("jobs/marker"), limit, |m| {
        json(m)["state"] == "passed"
    }));
    let answers: Vec<Value> = lab
        .mqtt
        .on(&lab.t("submit_status"))
        .iter()
        .map(json)
        .collect();
    assert_eq!(
        answers.len(),
        1001,
        "one answer per payload, plus the marker"
    );
    let count = |pred: &dyn Fn(&Value) -> bool| answers.iter().filter(|a| pred(a)).count();
    let reason = |a: &Value, r: &str| {
        a["result"] == "rejected" && a["reason"].as_str().unwrap_or("").contains(r)
    };
    let id = |a: &Value, p: &str| a["id"].as_str().is_some_and(|i| i.starts_with(p));
    assert_eq!(count(&|a| reason(a, "not UTF-8")), 250, "random bytes");
    assert_eq!(
        count(&|a| reason(a, "not valid JSON")),
        250,
        "truncated JSON"
    );
    assert_eq!(
        count(&|a| a["result"] == "accepted" && id(a, "job-")),
        250,
        "valid jobs"
    );
    let utf8 = count(&|a| a["result"] == "accepted" && !id(a, "job-") && !id(a, "marker"));
    assert_eq!(utf8, 250, "UTF-8 scripts");
    // Every accepted job ran once: a final status on its own topic and on last_job (what
    // labvisor_jobs_total counts, once per id), and the log has each valid job's line once.
    let accepted: std::collections::BTreeSet<String> = answers
        .iter()
        .filter(|a| a["result"] == "accepted")
        .map(|a| a["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(accepted.len(), 501);
    let finals = |topic: &dyn Fn(&str) -> Option<String>| -> std::collections::BTreeSet<String> {
        lab.mqtt
            .all()
            .iter()
            .filter(|m| {
                matches!(
                    json(m)["state"].as_str(),
                    Some("passed" | "failed" | "timeout" | "cancelled" | "lost")
                )
            })
            .filter_map(|m| topic(&m.topic).map(|_| json(m)["id"].as_str().unwrap().to_owned()))
            .collect()
    };
    let prefix = format!("{}/jobs/", lab.sut);
    let job_topics = finals(&|t| {
        t.strip_prefix(&prefix)
            .filter(|r| !r.contains('/'))
            .map(str::to_owned)
    });
    assert_eq!(job_topics, accepted, "a final status for each accepted job");
    let last_job_topic = lab.t("last_job");
    let last_jobs = finals(&|t| (t == last_job_topic).then(String::new));
    assert_eq!(last_jobs, accepted, "each job's final status on last_job");
    let log = String::from_utf8_lossy(&lab.agent.log()).into_owned();
    for i in 0..250 {
        let n = log.lines().filter(|l| *l == format!("job-{i}")).count();
        assert_eq!(n, 1, "job-{i} ran {n} times");
    }
    // No restart: the same process and boot id throughout; its memory stayed bounded.
    assert_eq!(lab.agent.pid(), pid);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    eprintln!("agent peak resident memory: {peak_kib} KiB");
    assert!(peak_kib < 64 * 1024, "peak resident memory {peak_kib} KiB");
    let statuses = lab.mqtt.on(&lab.t("agent"));
    assert!(statuses.iter().all(|m| json(m)["boot_id"] == boot));
    assert!(
        !lab.agent.stderr().contains("panicked"),
        "{}",
        lab.agent.stderr()
    );
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn large_submissions_run_up_to_max_payload_and_larger_ones_are_rejected_with_the_reason() {
    // The broker as shipped: packets up to MAX_PACKET_SIZE (8 MiB + 64 KiB).
    let max_packet = labvisor_protocol::MAX_PACKET_SIZE;
    let broker = Mosquitto::start_with(&format!(
        "allow_anonymous true\npersistence false\nmax_packet_size {max_packet}\n"
    ));
    let sut = "job-large";
    let mqtt = Collector::start(broker.port(), &[&format!("{sut}/#")]);
    let agent = AgentProc::start(
        sut,
        &sut_toml(None, "[job]\nmax_payload = \"2MiB\"\n"),
        Some(&broker.url()),
        &["--grace", "500ms"],
    );
    mqtt.wait(&format!("{sut}/agent"), LIMIT, |m| {
        json(m)["state"] == "idle" && json(m)["broker_connected"] == true
    });
    // Plain-text scripts of exactly these sizes: a long comment line, then an echo.
    let script = |size: usize, tag: &str| {
        let tail = format!("\necho ran {tag}\n");
        format!("#{}{tail}", "x".repeat(size - 1 - tail.len()))
    };
    let sizes = [(300_000, "300k"), (1_000_000, "1m"), (3_000_000, "3m")];
    for (size, tag) in sizes {
        let (_dir, file) = labvisor_tests::temp_file("job.sh", script(size, tag).as_bytes());
        let out = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &broker.port().to_string()])
            .args(["-q", "1", "-t", &format!("{sut}/submit"), "-f"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(out.status.success(), "{tag}: {out:?}");
    }
    let answers: Vec<Value> = wait_until("3 answers", LIMIT, || {
        let a: Vec<Value> = mqtt
            .on(&format!("{sut}/submit_status"))
            .iter()
            .map(json)
            .collect();
        (a.len() >= 3).then_some(a)
    });
    assert_eq!(answers[0]["result"], "accepted", "{}", answers[0]);
    assert_eq!(answers[1]["result"], "accepted", "{}", answers[1]);
    assert_eq!(answers[2]["result"], "rejected", "{}", answers[2]);
    assert_eq!(
        answers[2]["reason"],
        "payload of 3000000 bytes exceeds max_payload 2097152"
    );
    for a in &answers[..2] {
        let id = a["id"].as_str().unwrap();
        let st = json(&mqtt.wait(&format!("{sut}/jobs/{id}"), LIMIT, |m| {
            json(m)["state"] == "passed"
        }));
        assert_eq!(st["state"], "passed");
    }
    let log = String::from_utf8_lossy(&agent.log()).into_owned();
    assert_eq!(log.lines().filter(|l| *l == "ran 300k").count(), 1);
    assert_eq!(log.lines().filter(|l| *l == "ran 1m").count(), 1);
    assert!(!log.contains("ran 3m"));
    assert_eq!(mqtt.on(&format!("{sut}/submit_status")).len(), 3);
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn reply_topics_must_lie_in_the_reply_space_under_the_shipped_acl() {
    // The shipped ACL; every client logs in: the agent as its SUT, the submitter and the
    // collector with their roles.
    let sut = "job-reply";
    let files = tempfile::tempdir().unwrap();
    let passwd = files.path().join("passwd");
    for (i, (user, pw)) in [
        (sut, "pw-agent"),
        ("labvisor.submit", "pw-submit"),
        ("labvisor.supervisor", "pw-supervisor"),
    ]
    .iter()
    .enumerate()
    {
        let mut cmd = Command::new("mosquitto_passwd");
        if i == 0 {
            cmd.arg("-c");
        }
        let out = cmd
            .arg("-b")
            .arg(&passwd)
            .args([user, pw])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    // mosquitto started as root reads it as the user it drops to.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(files.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&passwd, std::fs::Permissions::from_mode(0o644)).unwrap();
    let acl = labvisor_tests::workspace_root().join("mosquitto/acl");
    let broker = Mosquitto::start_with(&format!(
        "allow_anonymous false\npersistence false\npassword_file {}\nacl_file {}\n",
        passwd.display(),
        acl.display()
    ));
    let space = format!("labvisor/replies/{sut}");
    let mqtt = Collector::start_as(
        broker.port(),
        &[&format!("{sut}/#"), "labvisor/replies/#", "ci/#"],
        Some(("labvisor.supervisor", "pw-supervisor")),
    );
    let _agent = AgentProc::start(
        sut,
        &sut_toml(None, ""),
        Some(&broker.url()),
        &[
            "--grace",
            "500ms",
            "--username",
            sut,
            "--password",
            "pw-agent",
        ],
    );
    mqtt.wait(&format!("{sut}/agent"), LIMIT, |m| {
        json(m)["state"] == "idle" && json(m)["broker_connected"] == true
    });
    let submit = |payload: &str| {
        let out = broker.publish(
            &format!("{sut}/submit"),
            payload,
            &["-q", "1", "-u", "labvisor.submit", "-P", "pw-submit"],
        );
        assert!(out.status.success(), "{out:?}");
    };
    // In the reply space: the answer arrives there.
    submit(&format!(
        r#"{{"id":"in-space","script":"echo ran in-space","reply_to":"{space}/ci-1"}}"#
    ));
    let a = json(&mqtt.wait(&format!("{space}/ci-1"), LIMIT, |_| true));
    assert_eq!(
        (a["id"].as_str(), a["result"].as_str()),
        (Some("in-space"), Some("accepted"))
    );
    // Elsewhere: rejected at once on submit_status, naming the allowed space; never run.
    submit(r#"{"id":"elsewhere","script":"echo ran elsewhere","reply_to":"ci/acks"}"#);
    let status = format!("{sut}/submit_status");
    let a = json(&mqtt.wait(&status, LIMIT, |m| json(m)["id"] == "elsewhere"));
    assert_eq!(a["result"], "rejected", "{a}");
    assert!(
        a["reason"].as_str().unwrap().contains(&format!(
            "\"ci/acks\" is outside this SUT's reply space: answers go to {space}/#"
        )),
        "{a}"
    );
    // The MQTT 5 response topic, with paho: in the space it answers with the correlation data,
    // elsewhere the job is rejected.
    let out = paho(
        &format!(
            r#"
import json, time
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes
got = []
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="reply-v5", protocol=mqtt.MQTTv5)
c.username_pw_set("labvisor.submit", "pw-submit")
c.on_message = lambda cl, u, m: got.append((m.topic, m.payload.decode(), m.properties.CorrelationData))
c.connect("127.0.0.1", {{port}})
c.subscribe("{space}/v5", qos=1)
c.loop_start()
time.sleep(0.5)
for topic, job in [("{space}/v5", "v5-in"), ("ci/v5", "v5-out")]:
    p = Properties(PacketTypes.PUBLISH)
    p.ResponseTopic = topic
    p.CorrelationData = job.encode()
    c.publish("{sut}/submit", json.dumps({{"id": job, "script": "echo ran " + job}}), qos=1, properties=p).wait_for_publish(10)
deadline = time.time() + 15
while not got and time.time() < deadline:
    time.sleep(0.05)
c.loop_stop()
print(json.dumps([[t, json.loads(p), cd.decode()] for t, p, cd in got]))
"#
        ),
        broker.port(),
    );
    let got: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(got[0][0], format!("{space}/v5"));
    assert_eq!(got[0][1]["id"], "v5-in");
    assert_eq!(got[0][1]["result"], "accepted");
    assert_eq!(got[0][2], "v5-in");
    let a = json(&mqtt.wait(&status, LIMIT, |m| json(m)["id"] == "v5-out"));
    assert_eq!(a["result"], "rejected", "{a}");
    assert!(
        a["reason"]
            .as_str()
            .unwrap()
            .starts_with("the MQTT 5 response topic \"ci/v5\" is outside this SUT's reply space"),
        "{a}"
    );
    // The accepted jobs ran; the rejected ones never did; nothing was answered outside.
    for id in ["in-space", "v5-in"] {
        mqtt.wait(&format!("{sut}/jobs/{id}"), LIMIT, |m| {
            json(m)["state"] == "passed"
        });
    }
    let log = String::from_utf8_lossy(&_agent.log()).into_owned();
    assert!(
        !log.contains("ran elsewhere") && !log.contains("ran v5-out"),
        "{log}"
    );
    assert_eq!(mqtt.on(&status).len(), 4);
    assert!(mqtt.all().iter().all(|m| !m.topic.starts_with("ci/")));
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn a_retained_job_never_runs_also_after_a_restart() {
    let mut lab = Lab::new("job-retained", "");
    let status = lab.t("submit_status");
    let retained = |a: &Value| {
        a["result"] == "rejected"
            && a["id"] == "kept"
            && a["reason"]
                .as_str()
                .unwrap_or("")
                .starts_with("retained message on job-retained/submit: a job must be published without the retain flag")
    };
    // Published retained while the agent is online ...
    let out = lab.broker.publish(
        &lab.t("submit"),
        r#"{"id":"kept","script":"echo ran kept"}"#,
        &["-q", "1", "-r"],
    );
    assert!(out.status.success(), "{out:?}");
    lab.mqtt.wait(&status, LIMIT, |m| retained(&json(m)));
    // ... and delivered again, as retained, when the agent comes back.
    lab.agent.signal(Signal::SIGTERM);
    assert_eq!(lab.agent.wait_exit(Duration::from_secs(5)).code(), Some(0));
    lab.agent.restart();
    wait_until("a second rejection", LIMIT, || {
        let n = lab
            .mqtt
            .on(&status)
            .iter()
            .filter(|m| retained(&json(m)))
            .count();
        (n == 2).then_some(())
    });
    // A retained cancel is ignored too.
    let out = lab
        .broker
        .publish(&lab.t("cancel"), "current", &["-q", "1", "-r"]);
    assert!(out.status.success(), "{out:?}");
    lab.mqtt.wait(&lab.t("cancel_status"), LIMIT, |m| {
        json(m)["result"] == "rejected"
            && json(m)["reason"]
                .as_str()
                .unwrap_or("")
                .starts_with("retained message on job-retained/cancel")
    });
    // A marker job runs; the retained one never did.
    submit(
        &lab.broker,
        &lab.sut,
        r#"{"id":"marker","script":"echo marker"}"#,
    );
    assert_eq!(lab.final_status("marker")["state"], "passed");
    assert!(!String::from_utf8_lossy(&lab.agent.log()).contains("ran kept"));
    assert!(lab.mqtt.on(&lab.t("jobs/kept")).is_empty());
    let answers = lab.mqtt.on(&status);
    assert_eq!(answers.len(), 3, "two rejections and the marker");
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn a_job_lost_with_the_agent_reports_the_bytes_it_printed() {
    let mut lab = Lab::new("job-lost-bytes", "");
    // 3 lines of 1000 bytes (999 characters and a newline), then silence.
    submit(
        &lab.broker,
        &lab.sut,
        r#"{"id":"printer","script":"for i in 1 2 3; do printf '%0999d\\n' $i; done; sleep 60"}"#,
    );
    lab.mqtt.wait(&lab.t("jobs/printer"), LIMIT, |m| {
        json(m)["state"] == "running"
    });
    // The agent records the count on its volume within 100 ms of the output.
    let progress = lab.agent.path("data/jobs/running.progress");
    wait_until("the recorded count", LIMIT, || {
        let v: Value = serde_json::from_slice(&std::fs::read(&progress).ok()?).ok()?;
        (v["output_bytes"] == 3000).then_some(())
    });
    lab.agent.signal(Signal::SIGKILL);
    lab.agent.wait_exit(Duration::from_secs(5));
    lab.agent.kill_orphans();
    lab.agent.restart();
    let lost = lab.final_status("printer");
    assert_eq!(lost["state"], "lost", "{lost}");
    assert_eq!(lost["output_bytes"], 3000, "{lost}");
    // The agent's own log agrees: the three lines were printed.
    let log = String::from_utf8_lossy(&lab.agent.log()).into_owned();
    assert_eq!(log.lines().filter(|l| l.len() == 999).count(), 3);
}

/// A job that makes its result file a FIFO (an open for reading would wait for a writer
/// forever) ends `failed`, naming the file, and the agent goes on: the next job runs.
#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn a_fifo_as_the_result_file_fails_the_job_and_does_not_hang_the_agent() {
    let lab = Lab::new("job-fifo", "");
    submit(
        &lab.broker,
        &lab.sut,
        r#"{"id":"fifo","script":"mkfifo \"$LABVISOR_RESULT\"\n"}"#,
    );
    submit(&lab.broker, &lab.sut, r#"{"id":"after","script":"true\n"}"#);
    let st = lab.final_status("fifo");
    assert_eq!(st["state"], "failed", "{st}");
    let reason = st["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("labvisor-result.json") && reason.contains("not a regular file"),
        "{reason}"
    );
    let after = lab.final_status("after");
    assert_eq!(after["state"], "passed", "{after}");
}
