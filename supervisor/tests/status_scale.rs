//! `labvisor status` at scale, against a real mosquitto: 200 SUTs' retained agent statuses and
//! supervisor views and one supervisor status (the lab of `support/retained_lab.rs`, built with
//! the protocol's payload types, published with QoS 1 and acknowledged), read by the real
//! binary as an anonymous reader that may not publish (so no probe: the end of the retained
//! messages is the SUBACK of its last subscription) while agent statuses keep coming live.
//! The acceptance test: every SUT listed, the summary exact, the problems first,
//! `--problems` showing only them, and the command done in under 1 s.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use labvisor_protocol::topics::Topics;
use labvisor_tests::{run_ok, Mosquitto, Subscriber};

#[allow(dead_code)]
mod support {
    pub mod retained_lab;
}
use support::retained_lab::{self, Kind, Mix};

const SUTS: usize = 200;

/// The bound for `labvisor status` (it asks for it at 500 SUTs).
const FAST: Duration = Duration::from_secs(1);

/// The summary line of the lab below.
const SUMMARY: &str = "200 SUTs: 184 healthy, 6 busy, 3 offline, 7 problems \
    (2 unhealthy, 1 crash-loop, 1 invalid file, 1 failing action, 2 no agent status)";

/// The SUTs with a problem, by name: `Mix::suts` puts them at the end of the alphabet, every
/// seventh name from `sut-0200` down, so listing them first reorders the table.
const PROBLEMS: [&str; 7] = [
    "sut-0158", "sut-0165", "sut-0172", "sut-0179", "sut-0186", "sut-0193", "sut-0200",
];

fn mix() -> Mix {
    Mix {
        busy: 6,
        offline: 3,
        problems: vec![
            (Kind::Unhealthy, 2),
            (Kind::CrashLoop, 1),
            (Kind::InvalidFile, 1),
            (Kind::PendingFailing, 1),
            (Kind::NoAgent, 2),
        ],
    }
}

/// A broker where anonymous clients may only read, and `writer` (password `pw`) may write.
fn broker() -> (Mosquitto, tempfile::TempDir) {
    let files = tempfile::tempdir().unwrap();
    let passwd = files.path().join("passwd");
    run_ok(
        Command::new("mosquitto_passwd")
            .args(["-b", "-c"])
            .arg(&passwd)
            .args(["writer", "pw"]),
    );
    let acl = files.path().join("acl");
    std::fs::write(&acl, "topic read #\n\nuser writer\ntopic readwrite #\n").unwrap();
    let m = Mosquitto::start_with(&format!(
        "allow_anonymous true\npersistence false\npassword_file {}\nacl_file {}\n",
        passwd.display(),
        acl.display()
    ));
    (m, files)
}

/// Runs `labvisor status ARGS` as the anonymous reader; its output and wall time.
fn status(m: &Mosquitto, state_dir: &std::path::Path, args: &[&str]) -> (Output, Duration) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_labvisor"));
    cmd.arg("status")
        .args(args)
        .env("LABVISOR_BROKER", m.url())
        .env("LABVISOR_STATE_DIR", state_dir)
        .env_remove("LABVISOR_TOPIC_PREFIX")
        .env_remove("LABVISOR_MQTT_USERNAME")
        .env_remove("LABVISOR_MQTT_PASSWORD");
    let start = Instant::now();
    let out = cmd.output().unwrap();
    let took = start.elapsed();
    eprintln!("labvisor status {}: {took:?}", args.join(" "));
    (out, took)
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The SUT names of the table rows, in order.
fn rows(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| l.starts_with("sut-"))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect()
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn status_of_200_suts_is_complete_sorted_and_under_a_second() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (m, _files) = broker();
    let state_dir = tempfile::tempdir().unwrap();
    let writer = format!("mqtt://writer:pw@127.0.0.1:{}", m.port());
    let lab = mix().suts(SUTS);
    assert_eq!(retained_lab::summary_line(&lab), SUMMARY);
    let mut problem_suts: Vec<String> = lab
        .iter()
        .filter(|(_, k)| !matches!(k, Kind::Healthy | Kind::Busy | Kind::Offline))
        .map(|(s, _)| s.to_string())
        .collect();
    problem_suts.sort();
    assert_eq!(problem_suts, PROBLEMS);

    let msgs = retained_lab::messages(&Topics::new(), "lab", &lab);
    assert_eq!(msgs.len(), 2 * SUTS - 2 + 1, "no agent status for 2 SUTs");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(retained_lab::publish(
        &writer,
        msgs.clone(),
        Duration::from_secs(30),
    ))
    .unwrap();
    // The agents' statuses keep coming, as heartbeats do (every 5 s from each of 500 agents is
    // 100 a second): unchanged values, retained, one every 5 ms until the test ends.
    let live: Vec<_> = msgs
        .into_iter()
        .filter(|(t, _)| t.ends_with("/agent"))
        .collect();
    rt.spawn(retained_lab::republish(
        writer,
        live,
        Duration::from_millis(5),
    ));
    let watch = Subscriber::start(m.port(), "sut-0001/agent", &[]);
    watch.wait_lines(3, Duration::from_secs(20));

    let (o, took) = status(&m, state_dir.path(), &[]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(took < FAST, "labvisor status took {took:?}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some(SUMMARY));
    assert!(lines.next().unwrap().starts_with("SUT "), "{out}");
    let names = rows(&out);
    assert_eq!(names.len(), SUTS, "{out}");
    assert_eq!(names[..PROBLEMS.len()], PROBLEMS, "problems first: {out}");
    let rest = &names[PROBLEMS.len()..];
    assert!(rest.is_sorted(), "then the others by name: {out}");
    assert!(out
        .lines()
        .last()
        .unwrap()
        .starts_with("supervisor lab: online, docker reachable, 199 SUTs desired"));

    let (o, took) = status(&m, state_dir.path(), &["--problems"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "problems: exit 1: {out}");
    assert!(took < FAST, "labvisor status --problems took {took:?}");
    assert_eq!(rows(&out), PROBLEMS, "{out}");
    assert_eq!(
        out.lines().count(),
        2 + PROBLEMS.len(),
        "summary, header, the problem rows, no supervisor line: {out}"
    );

    let (o, took) = status(&m, state_dir.path(), &["--json"]);
    assert!(took < FAST, "labvisor status --json took {took:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["suts"].as_array().unwrap().len(), SUTS);
    assert_eq!(v["summary"]["suts"], SUTS);
    assert_eq!(v["summary"]["problems"], PROBLEMS.len());
    assert_eq!(v["summary"]["by_problem"]["no-agent-status"], 2);
    assert_eq!(v["supervisors"].as_array().unwrap().len(), 1);
}
