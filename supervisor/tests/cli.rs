//! The `labvisor` client commands against a real mosquitto and a real agent process: submit
//! (with --wait and --follow), jobs, cancel, status, and their failures.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use assert_cmd::cargo::CommandCargoExt;
use labvisor_tests::{free_port, static_bin, wait_until, Mosquitto};

struct Agent {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Agent {
    /// TERM first: the agent stops its device process and job groups, so nothing is left behind.
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent(broker: &Mosquitto, sut: &str, extra: &str) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join(format!("{sut}.toml"));
    std::fs::write(
        &cfg,
        format!("image = \"labvisor/busybox:local\"\n{extra}\n[health]\nheartbeat = \"200ms\"\nmax_age = \"2s\"\ninterval = \"1s\"\ntimeout = \"500ms\"\n"),
    )
    .unwrap();
    let child = Command::new(static_bin("labvisor-agent"))
        .arg("--config")
        .arg(&cfg)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--heartbeat-file")
        .arg(dir.path().join("hb"))
        .arg("--broker")
        .arg(broker.url())
        .arg("--grace")
        .arg("300ms")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Ready once its retained status says idle.
    let sub = broker.subscribe(&format!("{sut}/agent"), &[]);
    sub.wait_for("agent idle", Duration::from_secs(15), |l| {
        l.contains("\"state\":\"idle\"")
    });
    Agent { child, _dir: dir }
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

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn submit_wait_exits_with_the_jobs_code_and_follow_streams_output() {
    let broker = Mosquitto::start();
    let _a = agent(&broker, "cli-1", "");
    let o = labvisor(
        &broker,
        &[
            "submit",
            "cli-1",
            "--wait",
            "--",
            "sh",
            "-c",
            "echo hi; exit 5",
        ],
    );
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    let id = stdout(&o).lines().next().unwrap().to_owned();
    assert_eq!(id.len(), 26, "a generated id: {id}");

    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(script.path(), "echo line one\necho line two\n").unwrap();
    let o = labvisor(
        &broker,
        &[
            "submit",
            "cli-1",
            "--follow",
            "--id",
            "follow-1",
            "--script",
            script.path().to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "follow-1\nline one\nline two\n");

    let o = labvisor(&broker, &["jobs", "cli-1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("ID"), "{out}");
    assert!(
        out.contains(&id) && out.contains("failed") && out.contains("follow-1"),
        "{out}"
    );
    assert!(out.contains("2 jobs"), "{out}");
    let o = labvisor(&broker, &["jobs", "cli-1", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn cancel_the_current_job_and_see_it_in_status() {
    let broker = Mosquitto::start();
    let _a = agent(&broker, "cli-2", "");
    let o = labvisor(
        &broker,
        &["submit", "cli-2", "--id", "sleeper", "--", "sleep", "60"],
    );
    assert_eq!(stdout(&o), "sleeper\n", "{}", stderr(&o));
    let sub = broker.subscribe("cli-2/agent", &[]);
    sub.wait_for("busy", Duration::from_secs(10), |l| {
        l.contains("\"state\":\"busy\"")
    });

    let o = labvisor(&broker, &["status"]);
    let out = stdout(&o);
    let line = out
        .lines()
        .find(|l| l.starts_with("cli-2"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("busy") && line.contains("sleeper"), "{line}");
    let o = labvisor(&broker, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["suts"][0]["sut"], "cli-2");
    assert_eq!(v["suts"][0]["job"], "sleeper");

    let o = labvisor(&broker, &["cancel", "cli-2", "current"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "sleeper: cancelled\n");
    let o = labvisor(&broker, &["cancel", "cli-2", "nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stdout(&o), "nope: not-found (no job nope)\n");
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn rejections_and_unreachable_parties_have_their_own_exit_codes() {
    let broker = Mosquitto::start();
    let _a = agent(&broker, "cli-3", "");
    let o = labvisor(
        &broker,
        &["submit", "cli-3", "--timeout", "soon", "--", "true"],
    );
    assert_eq!(o.status.code(), Some(3));
    assert!(
        stderr(&o).contains("rejected the job: invalid JSON job: `timeout` \"soon\""),
        "{}",
        stderr(&o)
    );

    let o = labvisor(
        &broker,
        &["submit", "no-such-sut", "--ack-timeout", "1s", "--", "true"],
    );
    assert_eq!(o.status.code(), Some(4));
    assert!(
        stderr(&o).contains("no acknowledgement from no-such-sut within 1s"),
        "{}",
        stderr(&o)
    );

    let dead = format!("mqtt://127.0.0.1:{}", free_port());
    let o = Command::cargo_bin("labvisor")
        .unwrap()
        .args(["status", "--broker", &dead])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4));
    assert!(
        stderr(&o).contains("cannot reach the broker at"),
        "{}",
        stderr(&o)
    );

    let o = labvisor(&broker, &["submit", "Bad/Name", "--", "true"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn logs_follow_prints_live_output() {
    let broker = Mosquitto::start();
    let _a = agent(&broker, "cli-4", "command = [\"/bin/sh\", \"-c\", \"i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.1; done\"]");
    let mut child = labvisor_tests::KillOnDrop(
        Command::cargo_bin("labvisor")
            .unwrap()
            .args(["logs", "cli-4", "-f"])
            .env("LABVISOR_BROKER", broker.url())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut out = child.stdout.take().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let s2 = seen.clone();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            s2.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    wait_until("three ticks followed", Duration::from_secs(15), || {
        (seen.lock().unwrap().matches("tick ").count() >= 3).then_some(())
    });
    let _ = child.kill();
    let _ = child.wait();
    let o = labvisor(&broker, &["logs", "cli-4"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("use -f"));
}

/// `--poll` takes an optional interval, with a floor: a busy loop over NFS is refused at once.
#[test]
fn supervise_refuses_a_poll_interval_under_100ms() {
    let err = supervise_refused(&["--poll=10ms"]);
    assert!(
        err.contains("--poll") && err.contains("\"10ms\" is shorter than 100ms"),
        "{err}"
    );
}

/// Runs `labvisor supervise` on an empty SUT directory with `flags`, asserts that it refuses to
/// start (exit status 2) and returns its stderr.
fn supervise_refused(flags: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::cargo_bin("labvisor")
        .unwrap()
        .arg("supervise")
        .arg("--sut-dir")
        .arg(dir.path())
        .args(flags)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    stderr(&o)
}

/// Runs `labvisor args` with its stdout a pipe whose reader is already gone (as under
/// `| head` once head has its lines).
fn labvisor_into_closed_pipe(broker: &Mosquitto, args: &[&str]) -> std::process::Output {
    let mut child = Command::cargo_bin("labvisor")
        .unwrap()
        .args(args)
        .env("LABVISOR_BROKER", broker.url())
        .env_remove("LABVISOR_TOPIC_PREFIX")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The command writes only once the broker answered: its reader is gone by then.
    drop(child.stdout.take());
    child.wait_with_output().unwrap()
}

/// `labvisor jobs` of a SUT the broker knows nothing of is an error naming it (exit 5), while
/// a known SUT without jobs says `0 jobs`; and output into a pipe whose reader is gone ends
/// quietly with status 0 (`labvisor jobs x | head`), for `jobs`, `status` and `check`.
#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn jobs_of_an_unknown_sut_fail_and_a_closed_pipe_ends_quietly() {
    let broker = Mosquitto::start();
    let _a = agent(&broker, "cli-5", "");
    let o = labvisor(&broker, &["jobs", "cli-5"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).ends_with("\n0 jobs\n"), "{}", stdout(&o));

    for args in [&["jobs", "nosuch"][..], &["jobs", "nosuch", "--json"]] {
        let o = labvisor(&broker, args);
        assert_eq!(o.status.code(), Some(5), "{args:?}: {}", stderr(&o));
        assert_eq!(stdout(&o), "", "{args:?}");
        assert_eq!(
            stderr(&o).lines().collect::<Vec<_>>(),
            [format!(
                "labvisor jobs: no SUT named nosuch on {}: no agent status, supervisor view or job of it is retained there (see `labvisor status`; is --topic-prefix right?)",
                broker.url()
            )],
            "{args:?}"
        );
    }

    let o = labvisor(&broker, &["submit", "cli-5", "--wait", "--", "true"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    for args in [
        &["jobs", "cli-5"][..],
        &["jobs", "cli-5", "--json"],
        &["status"],
        &["status", "--json"],
    ] {
        let o = labvisor_into_closed_pipe(&broker, args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o), "", "{args:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.toml"), "image = \"x\"\n").unwrap();
    let o = labvisor_into_closed_pipe(&broker, &["check", dir.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stderr(&o), "");
}

/// `labvisor supervise` with its log going into a pipe (as under systemd, `docker logs` or
/// `| tee`) writes plain text: no ANSI colour codes, also on WARN lines.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn supervise_logs_into_a_pipe_without_colour_codes() {
    use std::io::Read;
    let scope = labvisor_tests::DockerScope::new("nocolour");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("Bad_Name.toml"), "image = \"x\"\n").unwrap();
    let mut child = labvisor_tests::KillOnDrop(
        Command::cargo_bin("labvisor")
            .unwrap()
            .arg("supervise")
            .arg("--sut-dir")
            .arg(dir.path())
            .args(["--broker", "none", "--metrics-listen", "none"])
            .args(["--id", scope.run_id(), "--name-prefix", &scope.name("")])
            .args(["--extra-label", &scope.label()])
            .arg("--agent-bin")
            .arg(static_bin("labvisor-agent"))
            .arg("--healthcheck-bin")
            .arg(static_bin("labvisor-healthcheck"))
            .env("LABVISOR_LOG", "info")
            .env_remove("NO_COLOR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut err = child.stderr.take().unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let l2 = log.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            l2.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    wait_until("the bad name logged", Duration::from_secs(30), || {
        String::from_utf8_lossy(&log.lock().unwrap())
            .contains("names no SUT")
            .then_some(())
    });
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    assert!(child.wait().unwrap().success());
    reader.join().unwrap();
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    let log = log.lock().unwrap().clone();
    let text = String::from_utf8_lossy(&log);
    assert_eq!(out, b"", "the log goes to stderr");
    assert!(!log.contains(&0x1b), "ANSI escape in the log:\n{text:?}");
    let levels: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(levels, ["INFO", "WARN", "INFO"], "{text}");
}

/// `--status-interval` has a floor of 1s, checked when the flags are read.
#[test]
fn supervise_refuses_a_status_interval_under_1s() {
    let err = supervise_refused(&["--status-interval", "500ms"]);
    assert!(err.contains("\"500ms\" is shorter than 1s"), "{err}");
}

/// Serves one HTTP answer `head` + `body` on a port of its own; returns the base URL.
fn one_answer(head: &'static str, body: &'static str) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf);
        let _ = write!(
            s,
            "{head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    });
    url
}

/// `labvisor healthz`: 0 and the body on 200; 1 and the status line and reason otherwise, on
/// a closed port and on a URL that is not plain http. No broker or Docker needed.
#[test]
fn healthz_exit_codes_and_messages() {
    let healthz = |url: &str| {
        Command::cargo_bin("labvisor")
            .unwrap()
            .args(["healthz", "--url", url, "--timeout", "5s"])
            .output()
            .unwrap()
    };
    let o = healthz(&format!(
        "{}/healthz",
        one_answer("HTTP/1.1 200 OK", "ok\n")
    ));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "ok\n");
    let url = format!(
        "{}/healthz",
        one_answer(
            "HTTP/1.1 503 Service Unavailable",
            "docker is unreachable\n"
        )
    );
    let o = healthz(&url);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        format!(
            "labvisor healthz: {url}: HTTP/1.1 503 Service Unavailable: docker is unreachable\n"
        )
    );
    let o = healthz(&format!("http://127.0.0.1:{}/healthz", free_port()));
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("Connection refused"), "{}", stderr(&o));
    let o = healthz("https://127.0.0.1/healthz");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("is not an http://host[:port][/path] URL"),
        "{}",
        stderr(&o)
    );
}

/// A `--broker` URL the link refuses is a usage error (exit 2) that names the culprit: for a
/// bad port, the port as written. No broker needed: nothing is connected.
#[test]
fn a_bad_broker_url_is_a_usage_error_naming_the_port() {
    let o = Command::cargo_bin("labvisor")
        .unwrap()
        .args(["status", "--broker", "mqtt://u:pw@h:x"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o),
        "labvisor status: --broker \"mqtt://u:pw@h:x\": broker URL port \"x\" is not a number between 1 and 65535\n"
    );
}
