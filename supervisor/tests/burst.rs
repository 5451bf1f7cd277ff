//! A submission burst against a real agent container under `labvisor supervise`, with a real
//! mosquitto on the network's gateway and a paho client: 1000 payloads of mixed kind published
//! at full speed get exactly 1000 answers, `labvisor_jobs_total` equals the jobs that ran, and
//! the agent is never restarted.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{own_network, tmp_sut_dir, wait_healthy, write, Sup};
use labvisor_supervisor::cli::healthz::probe;
use labvisor_tests::{
    docker_ok, ensure_busybox_image, free_port, network_gateway, static_bin, wait_until,
    DockerScope, Mosquitto, BUSYBOX_IMAGE,
};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn a_thousand_mixed_payloads_get_a_thousand_answers_and_the_metric_agrees() {
    ensure_busybox_image();
    let scope = DockerScope::new("burst");
    // The supervisor's network, made first so the broker can listen on its gateway.
    let net = own_network(&scope, "labvisor.net");
    let gateway = network_gateway(&net);
    let broker = Mosquitto::start_with(&format!(
        "allow_anonymous true\npersistence false\nlistener {{port}} {gateway}\n"
    ));
    let sub = broker.subscribe(
        "f/submit_status",
        &["-t", "f/agent", "-t", "f/jobs/+", "-t", "f/last_job"],
    );
    let (_t, dir) = tmp_sut_dir();
    write(
        &dir,
        "f.toml",
        &format!(
            "image = \"{BUSYBOX_IMAGE}\"\n[job]\nqueue_limit = 1000\n[health]\nheartbeat = \"1s\"\nmax_age = \"5s\"\ninterval = \"2s\"\ntimeout = \"1s\"\nretries = 2\nstart_period = \"0s\"\n"
        ),
    );
    let metrics = format!("127.0.0.1:{}", free_port());
    let log = dir.parent().unwrap().join("supervisor.log");
    let child = Command::new(env!("CARGO_BIN_EXE_labvisor"))
        .arg("supervise")
        .arg("--sut-dir")
        .arg(&dir)
        .args(["--id", scope.run_id()])
        .args(["--name-prefix", &scope.name("")])
        .args(["--extra-label", &scope.label()])
        .args(["--stop-timeout", "2s"])
        .args(["--metrics-listen", &metrics])
        .args(["--broker", &broker.url()])
        .args([
            "--agent-broker",
            &format!("mqtt://{gateway}:{}", broker.port()),
        ])
        .arg("--agent-bin")
        .arg(static_bin("labvisor-agent"))
        .arg("--healthcheck-bin")
        .arg(static_bin("labvisor-healthcheck"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _sup = Sup { child, log };
    let container = wait_healthy(&scope, "f", T);
    let lines = |prefix: &str| -> Vec<Value> {
        sub.lines()
            .iter()
            .filter_map(|l| l.strip_prefix(prefix))
            .filter_map(|p| serde_json::from_str(p).ok())
            .collect()
    };
    let boot = wait_until("the agent idle on the broker", T, || {
        lines("f/agent ")
            .into_iter()
            .find(|s| s["state"] == "idle" && s["broker_connected"] == true)
            .map(|s| s["boot_id"].clone())
    });

    let script = format!(
        r##"
import random, sys
try:
    import paho.mqtt.client as mqtt
except ImportError:
    sys.exit("paho-mqtt is not installed: run tools/test.sh, which installs it")
rnd = random.Random(7)
payloads = []
for i in range(250):
    b = bytearray(rnd.randrange(256) for _ in range(rnd.randrange(1, 200)))
    b.insert(rnd.randrange(len(b) + 1), 0xFF)
    payloads.append(bytes(b))
    text = "".join(chr(rnd.choice([rnd.randrange(0x20, 0x7F), rnd.randrange(0xA0, 0xD7FF)])) for _ in range(rnd.randrange(1, 80)))
    payloads.append(("# " + text + "\necho utf8-%d\n" % i).encode())
    full = '{{"id":"trunc-%d","script":"echo trunc-%d"}}' % (i, i)
    payloads.append(full[:rnd.randrange(1, len(full))].encode())
    payloads.append(('{{"id":"job-%d","script":"echo job-%d"}}' % (i, i)).encode())
rnd.shuffle(payloads)
payloads.append(b'{{"id":"marker","script":"echo marker"}}')
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="burst")
c.max_inflight_messages_set(100)
c.max_queued_messages_set(0)
c.connect("127.0.0.1", {port})
c.loop_start()
infos = [c.publish("f/submit", p, qos=1) for p in payloads]
for info in infos:
    info.wait_for_publish(60)
    assert info.is_published()
c.disconnect()
c.loop_stop()
print(len(infos))
"##,
        port = broker.port()
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
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1001");
    // The marker was published last: once it has run, every earlier answer has arrived.
    wait_until("the marker job passed", Duration::from_secs(300), || {
        lines("f/jobs/marker ")
            .into_iter()
            .find(|s| s["state"] == "passed")
    });
    let answers = lines("f/submit_status ");
    assert_eq!(answers.len(), 1001, "one answer per payload");
    let rejected = |r: &str| {
        answers
            .iter()
            .filter(|a| a["result"] == "rejected" && a["reason"].as_str().unwrap_or("").contains(r))
            .count()
    };
    assert_eq!(rejected("not UTF-8"), 250);
    assert_eq!(rejected("not valid JSON"), 250);
    let accepted: std::collections::BTreeSet<String> = answers
        .iter()
        .filter(|a| a["result"] == "accepted")
        .map(|a| a["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        accepted.len(),
        501,
        "250 jobs, 250 UTF-8 scripts, the marker"
    );
    let finals: std::collections::BTreeSet<String> = lines("f/last_job ")
        .into_iter()
        .filter(|s| s["state"] == "passed" || s["state"] == "failed")
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(finals, accepted, "each accepted job ran and ended once");
    // labvisor_jobs_total counts the same jobs.
    let base = format!("http://{metrics}");
    let total = |text: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with("labvisor_jobs_total{") && l.contains("sut=\"f\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let text = wait_until("labvisor_jobs_total to reach 501", T, || {
        let text = probe(&format!("{base}/metrics"), Duration::from_secs(5)).ok()?;
        (total(&text) >= 501).then_some(text)
    });
    assert_eq!(total(&text), 501, "{text}");
    // Never restarted: the same container, no restart, the same agent boot.
    let restarts = docker_ok(&["inspect", "-f", "{{.RestartCount}}", &container]);
    assert_eq!(restarts.trim(), "0");
    assert!(lines("f/agent ").iter().all(|s| s["boot_id"] == boot));
}
