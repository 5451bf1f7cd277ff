//! `labvisor supervise` without `--broker`: it runs a managed mosquitto, its agents connect
//! through the labvisor network's gateway, each with its own login confined to its topics,
//! local tools connect on loopback with the local login they find in the state directory,
//! anonymous clients are refused on both listeners, a killed supervisor's broker is replaced on
//! the next start, an earlier version's shared agent login keeps working, what the broker
//! acknowledged survives a supervisor stop, a broker that dies is restarted, a client
//! subscribing at QoS 1 gets every one of a large lab's retained messages, and a SIGTERM while
//! the supervisor starts stops its broker too.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use labvisor_tests::{
    docker_ok, ensure_busybox_image, free_port, network_gateway, static_bin, wait_until,
    DockerScope, KillOnDrop,
};

#[allow(dead_code)]
mod support {
    pub mod retained_lab;
}

/// A supervisor process, killed (with its managed broker) if the test fails.
fn supervise(
    scope: &DockerScope,
    sut_dir: &Path,
    state: &Path,
    port: u16,
    log: &Path,
) -> KillOnDrop {
    supervise_with(scope, sut_dir, state, port, log, "none")
}

/// [`supervise`], serving `/metrics` and `/healthz` on `metrics` (or `none`).
fn supervise_with(
    scope: &DockerScope,
    sut_dir: &Path,
    state: &Path,
    port: u16,
    log: &Path,
    metrics: &str,
) -> KillOnDrop {
    let child = Command::new(env!("CARGO_BIN_EXE_labvisor"))
        .arg("supervise")
        .arg("--sut-dir")
        .arg(sut_dir)
        .args(["--id", scope.run_id()])
        .args(["--name-prefix", &scope.name("")])
        .args(["--extra-label", &scope.label()])
        .args(["--broker-port", &port.to_string()])
        .args(["--metrics-listen", metrics])
        .arg("--state-dir")
        .arg(state)
        .arg("--agent-bin")
        .arg(static_bin("labvisor-agent"))
        .arg("--healthcheck-bin")
        .arg(static_bin("labvisor-healthcheck"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        // Its own process group, as a shell gives a foreground job: a Ctrl-C is sent to it.
        .process_group(0)
        .spawn()
        .unwrap();
    KillOnDrop(child)
}

/// The local tools' login of the managed broker in `state`, as `mosquitto_pub`/`_sub`
/// arguments (none when the state directory has no such file).
fn local_auth(state: &Path) -> Vec<String> {
    match std::fs::read_to_string(state.join("local-password")) {
        Ok(p) => vec![
            "-u".into(),
            "labvisor.local".into(),
            "-P".into(),
            p.trim().to_owned(),
        ],
        Err(_) => Vec::new(),
    }
}

/// `labvisor <args>` as a local tool of the supervisor whose state directory is `state`.
fn cli(state: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_labvisor"))
        .args(args)
        .env("LABVISOR_STATE_DIR", state)
        .output()
        .unwrap()
}

/// Every retained message on the managed broker (`topic` → payload), read as a local tool:
/// `mosquitto_sub --retained-only` ends at the first live message, a probe published once it is
/// subscribed (the broker sends the retained messages of a subscription before anything
/// published after it).
fn retained(port: u16, state: &Path) -> Option<BTreeMap<String, String>> {
    let auth = local_auth(state);
    let probe = format!("labvisor/cli/{}/probe", labvisor_tests::unique_id("probe"));
    let mut sub = KillOnDrop(
        Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-v"])
            .args(["--retained-only", "-t", "#", "-t", &probe])
            .args(&auth)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while matches!(sub.try_wait(), Ok(None)) {
        if std::time::Instant::now() > deadline {
            return None;
        }
        let _ = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-t", &probe, "-m", "end"])
            .args(&auth)
            .output();
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut out = String::new();
    std::io::Read::read_to_string(sub.stdout.as_mut()?, &mut out).ok()?;
    let map: BTreeMap<String, String> = out
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(t, p)| (t.to_owned(), p.to_owned()))
        .collect();
    (!map.is_empty()).then_some(map)
}

/// The SUT's state in `labvisor status --json` (run with the local login), if it is listed.
fn sut_state(port: u16, state: &Path, sut: &str) -> Option<String> {
    let v = status_json(port, state)?;
    let row = v["suts"].as_array()?.iter().find(|r| r["sut"] == sut)?;
    row["state"].as_str().map(String::from)
}

fn status_json(port: u16, state: &Path) -> Option<serde_json::Value> {
    let out = cli(
        state,
        &[
            "status",
            "--json",
            "--broker",
            &format!("mqtt://127.0.0.1:{port}"),
        ],
    );
    serde_json::from_slice(&out.stdout).ok()
}

/// `mosquitto_sub -C 1` of `topic` on the managed broker's gateway listener, with `extra`
/// arguments (a login): one retained message within 5 s, or a failure.
fn gateway_sub(gateway: &str, port: u16, topic: &str, extra: &[&str]) -> std::process::Output {
    Command::new("mosquitto_sub")
        .args([
            "-h",
            gateway,
            "-p",
            &port.to_string(),
            "-V",
            "5",
            "-t",
            topic,
            "-C",
            "1",
            "-W",
            "5",
        ])
        .args(extra)
        .output()
        .unwrap()
}

/// The SUT file of these tests: a device process printing every second, fast health.
const SUT_TEXT: &str = "image = \"labvisor/busybox:local\"\ncommand = [\"/bin/sh\", \"-c\", \"while true; do echo up; sleep 1; done\"]\n[health]\nheartbeat = \"500ms\"\nmax_age = \"3s\"\ninterval = \"1s\"\ntimeout = \"500ms\"\nretries = 2\nstart_period = \"0s\"\n";

/// A state directory from a first-session labvisor, whose agents shared one login
/// (`labvisor-agent`, password in `agent-password`): that login keeps working, with its old
/// access, for the containers made then; a wrong password is refused; new agents still get
/// their own confined logins.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn a_legacy_shared_agent_login_keeps_working() {
    ensure_busybox_image();
    let scope = DockerScope::new("legacy");
    let dir = tempfile::tempdir().unwrap();
    let sut_dir = dir.path().join("sut");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&sut_dir).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    let legacy = "legacy-shared-password-0123456789";
    std::fs::write(state.join("agent-password"), format!("{legacy}\n")).unwrap();
    std::fs::write(sut_dir.join("lg-1.toml"), SUT_TEXT).unwrap();
    let port = free_port();
    let log = dir.path().join("supervisor.log");
    let _sup = supervise(&scope, &sut_dir, &state, port, &log);
    let fail = |what: &str| -> String {
        format!(
            "{what}\n--- supervisor log ---\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    };
    wait_until(&fail("lg-1 idle"), Duration::from_secs(60), || {
        (sut_state(port, &state, "lg-1")? == "idle").then_some(())
    });
    let gateway = network_gateway(&scope.name("labvisor.net"));
    let status_topic = format!("labvisor/supervisors/{}/status", scope.run_id());

    // The shared login reads beyond one SUT's topics (the old ACL), as the old agents did.
    let out = gateway_sub(
        &gateway,
        port,
        &status_topic,
        &["-u", "labvisor-agent", "-P", legacy],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wrong = gateway_sub(
        &gateway,
        port,
        &status_topic,
        &["-u", "labvisor-agent", "-P", "wrong-password-0123456789"],
    );
    assert!(!wrong.status.success(), "a wrong password must be refused");

    // The new agent has its own login, confined to its topics.
    let own = std::fs::read_to_string(state.join("agents/lg-1")).unwrap();
    let mine = gateway_sub(
        &gateway,
        port,
        "lg-1/agent",
        &["-u", "lg-1", "-P", own.trim()],
    );
    assert!(
        mine.status.success(),
        "{}",
        String::from_utf8_lossy(&mine.stderr)
    );
    let beyond = gateway_sub(
        &gateway,
        port,
        &status_topic,
        &["-u", "lg-1", "-P", own.trim()],
    );
    assert!(
        !beyond.status.success() && beyond.stdout.is_empty(),
        "lg-1 must not read the supervisor's topics"
    );
}

#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn agents_reach_the_managed_broker_and_strangers_do_not() {
    ensure_busybox_image();
    let scope = DockerScope::new("managed");
    let dir = tempfile::tempdir().unwrap();
    let sut_dir = dir.path().join("sut");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&sut_dir).unwrap();
    let sut_text = SUT_TEXT;
    std::fs::write(sut_dir.join("mb-1.toml"), sut_text).unwrap();
    std::fs::write(sut_dir.join("mb-2.toml"), sut_text).unwrap();
    let port = free_port();
    let log = dir.path().join("supervisor.log");
    let mut sup = supervise(&scope, &sut_dir, &state, port, &log);
    let fail = |what: &str| -> String {
        format!(
            "{what}\n--- supervisor log ---\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    };

    // Each agent, inside its container, connects to the broker on the gateway: its retained
    // status says so, read by `labvisor status` on loopback (anonymous).
    let connected = |sut: &str| {
        let v = status_json(port, &state)?;
        let row = v["suts"]
            .as_array()?
            .iter()
            .find(|r| r["sut"] == sut)?
            .clone();
        (row["state"] == "idle" && row["health"] == "healthy").then_some(row)
    };
    let row = wait_until(
        &fail("mb-1 idle and connected"),
        Duration::from_secs(60),
        || connected("mb-1"),
    );
    assert_eq!(row["supervisor"], scope.run_id());
    wait_until(
        &fail("mb-2 idle and connected"),
        Duration::from_secs(60),
        || connected("mb-2"),
    );

    // Each agent has its own password, private to the state directory.
    let mode = |p: &Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
    };
    let agents = state.join("agents");
    assert_eq!(mode(&agents) & 0o077, 0, "the agents' directory is private");
    assert_eq!(
        mode(&agents.join("mb-1")) & 0o077,
        0,
        "agent password file is private"
    );
    let password = std::fs::read_to_string(agents.join("mb-1")).unwrap();
    let password2 = std::fs::read_to_string(agents.join("mb-2")).unwrap();
    assert_ne!(password, password2);
    assert!(!state.join("agent-password").exists(), "no shared login");

    // On the gateway, an anonymous client is refused and the agents' credentials work.
    let net = scope.name("labvisor.net");
    let gateway = network_gateway(&net);
    let sub = |topic: &str, extra: &[&str]| gateway_sub(&gateway, port, topic, extra);
    let anon = sub("mb-1/agent", &[]);
    assert!(
        !anon.status.success(),
        "anonymous on the gateway must be refused"
    );
    let mb1 = ["-u", "mb-1", "-P", password.trim()];
    let own = sub("mb-1/agent", &mb1);
    assert!(
        own.status.success(),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );
    // mb-2's retained status is there (mb-2 is connected), but mb-1 may not read it.
    let other = sub("mb-2/agent", &mb1);
    assert!(
        !other.status.success() && other.stdout.is_empty(),
        "mb-1 must not read mb-2's topics: {}",
        String::from_utf8_lossy(&other.stdout)
    );

    // SIGKILL the supervisor: its broker is orphaned; the next supervisor stops it and starts
    // its own on the same port, and the agent (same container) reconnects with the same password.
    let id_before = docker_ok(&["ps", "-q", "--filter", &format!("label={}", scope.label())]);
    sup.kill().unwrap();
    sup.wait().unwrap();
    let log2 = dir.path().join("supervisor2.log");
    let mut sup2 = supervise(&scope, &sut_dir, &state, port, &log2);
    wait_until(
        "mb-1 reported again after the supervisor restart",
        Duration::from_secs(60),
        || {
            let v = status_json(port, &state)?;
            let sups = v["supervisors"].as_array()?;
            let online = sups.iter().any(|s| s["state"] == "online");
            let row = v["suts"]
                .as_array()?
                .iter()
                .find(|r| r["sut"] == "mb-1")?
                .clone();
            (online && row["state"] == "idle" && row["heartbeat_age_ms"].as_u64()? < 3000)
                .then_some(())
        },
    );
    let id_after = docker_ok(&["ps", "-q", "--filter", &format!("label={}", scope.label())]);
    assert_eq!(
        id_before, id_after,
        "the agent containers were adopted, not recreated"
    );

    // A SUT added while the broker runs gets its login (mosquitto reloads its password file)
    // and its agent connects.
    std::fs::write(sut_dir.join("mb-3.toml"), sut_text).unwrap();
    wait_until(
        &fail("mb-3 idle and connected"),
        Duration::from_secs(60),
        || connected("mb-3"),
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sup2.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let status = sup2.wait().unwrap();
    assert!(status.success(), "{status}");
    // A clean stop takes the managed broker down with it.
    wait_until(
        "the managed broker stopped",
        Duration::from_secs(10),
        || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .is_err()
                .then_some(())
        },
    );
}

/// Sends `sig` to a process, or to its process group with `group`.
fn signal(pid: u32, sig: nix::sys::signal::Signal, group: bool) {
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    if group {
        nix::sys::signal::killpg(pid, sig).unwrap();
    } else {
        nix::sys::signal::kill(pid, sig).unwrap();
    }
}

/// Whether process `pid` has exited (gone, or a zombie waiting to be reaped).
fn exited(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// [`SUT_TEXT`] with the supervisor's healing off: an agent paused on purpose, or slowed down
/// by a loaded machine, is never restarted under the test.
const CALM_SUT_TEXT: &str = "image = \"labvisor/busybox:local\"\ncommand = [\"/bin/sh\", \"-c\", \"while true; do echo up; sleep 1; done\"]\n[health]\nheartbeat = \"500ms\"\nmax_age = \"3s\"\ninterval = \"1s\"\ntimeout = \"500ms\"\nretries = 2\nstart_period = \"0s\"\n[restart]\non_unhealthy = \"none\"\n";

/// A QoS 1 job the broker acknowledged (PUBACK) while its agent was paused runs exactly once
/// after the supervisor, and with it the managed broker, was stopped with SIGTERM, with SIGINT
/// (to its process group, as Ctrl-C does), or SIGKILLed together with its mosquitto (a crash)
/// once an autosave had passed; and every retained job status, `last_job` and status survives.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn acknowledged_jobs_and_retained_state_survive_supervisor_stops() {
    use nix::sys::signal::Signal;
    ensure_busybox_image();
    let scope = DockerScope::new("persist");
    let dir = tempfile::tempdir().unwrap();
    let sut_dir = dir.path().join("sut");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&sut_dir).unwrap();
    std::fs::write(sut_dir.join("ps-1.toml"), CALM_SUT_TEXT).unwrap();
    let port = free_port();
    let url = format!("mqtt://127.0.0.1:{port}");
    let mut n = 0;
    let mut log = dir.path().join("supervisor0.log");
    let mut sup = supervise(&scope, &sut_dir, &state, port, &log);
    let fail = |what: &str, log: &Path| -> String {
        format!(
            "{what}\n--- supervisor log ---\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        )
    };
    wait_until(&fail("ps-1 idle", &log), Duration::from_secs(60), || {
        (sut_state(port, &state, "ps-1")? == "idle").then_some(())
    });
    let container = docker_ok(&["ps", "-q", "--filter", &format!("label={}", scope.label())]);
    assert_eq!(container.lines().count(), 1, "{container}");
    // A history: two jobs run through the CLI.
    let submit_and_wait = |log: &Path| {
        let out = cli(
            &state,
            &["submit", "ps-1", "--wait", "--broker", &url, "--", "true"],
        );
        assert!(
            out.status.success(),
            "{}",
            fail(&String::from_utf8_lossy(&out.stderr), log)
        );
    };
    submit_and_wait(&log);
    submit_and_wait(&log);
    let jobs = |m: &BTreeMap<String, String>| {
        m.keys()
            .filter(|t| t.starts_with("ps-1/jobs/") && !t.ends_with("/output"))
            .count()
    };
    let mut expected = 2;
    let before = wait_until("the retained messages", Duration::from_secs(20), || {
        retained(port, &state).filter(|m| jobs(m) == expected)
    });
    assert!(before.contains_key("ps-1/last_job"), "{before:?}");
    assert!(before.contains_key("ps-1/agent"), "{before:?}");

    for how in ["sigterm", "sigint", "sigkill"] {
        docker_ok(&["pause", &container]);
        let id = format!("persist-{how}");
        let job = serde_json::json!({
            "id": id,
            "script": format!("echo ran >> /labvisor/data/runs-{id}"),
        })
        .to_string();
        let published = SystemTime::now();
        let out = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
            .args(["-t", "ps-1/submit", "-m", &job])
            .args(local_auth(&state))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "the broker acknowledges the job: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        match how {
            "sigterm" => signal(sup.id(), Signal::SIGTERM, false),
            "sigint" => signal(sup.id(), Signal::SIGINT, true),
            _ => {
                // A crash of both: only what mosquitto's autosave wrote survives.
                let db = state.join("mosquitto.db");
                wait_until(
                    "an autosave after the publication",
                    Duration::from_secs(30),
                    || {
                        let m = std::fs::metadata(&db).ok()?.modified().ok()?;
                        (m > published).then_some(())
                    },
                );
                let broker: i32 = std::fs::read_to_string(state.join("mosquitto.pid"))
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap();
                signal(sup.id(), Signal::SIGKILL, false);
                signal(broker as u32, Signal::SIGKILL, false);
                wait_until("mosquitto killed", Duration::from_secs(10), || {
                    exited(broker).then_some(())
                });
            }
        }
        let status = sup.wait().unwrap();
        if how != "sigkill" {
            assert!(status.success(), "{how}: {status}\n{}", fail("", &log));
            assert!(
                std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
                "{how}: the managed broker stopped with the supervisor"
            );
        }
        n += 1;
        log = dir.path().join(format!("supervisor{n}.log"));
        sup = supervise(&scope, &sut_dir, &state, port, &log);
        // Before the agent runs again: everything retained is still there.
        let after = wait_until(
            &fail(&format!("{how}: the retained messages"), &log),
            Duration::from_secs(30),
            || retained(port, &state).filter(|m| m.contains_key("ps-1/agent")),
        );
        assert_eq!(jobs(&after), expected, "{how}: {after:?}");
        assert!(after.contains_key("ps-1/last_job"), "{how}: {after:?}");
        assert!(after.contains_key("ps-1/supervisor"), "{how}: {after:?}");
        docker_ok(&["unpause", &container]);
        let topic = format!("ps-1/jobs/{id}");
        let seen = std::cell::RefCell::new(None);
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        loop {
            let m = retained(port, &state);
            let passed = m
                .as_ref()
                .and_then(|m| m.get(&topic))
                .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok())
                .is_some_and(|v| v["state"] == "passed");
            if passed {
                break;
            }
            *seen.borrow_mut() = m;
            if std::time::Instant::now() > deadline {
                let agent = labvisor_tests::docker(&["logs", "--tail", "60", &container]);
                panic!(
                    "{}\n--- retained ---\n{:#?}\n--- agent ---\n{}{}",
                    fail(&format!("{how}: the job passed"), &log),
                    seen.borrow(),
                    String::from_utf8_lossy(&agent.stdout),
                    String::from_utf8_lossy(&agent.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // Whatever the broker still had for the agent was delivered before this job's.
        submit_and_wait(&log);
        expected += 2;
        let runs = docker_ok(&[
            "exec",
            &container,
            "cat",
            &format!("/labvisor/data/runs-{id}"),
        ]);
        assert_eq!(runs.lines().count(), 1, "{how}: the job ran exactly once");
    }
    let end = retained(port, &state).unwrap();
    assert_eq!(jobs(&end), expected, "{end:?}");
    assert_eq!(expected, 8);
}

/// Whether `pid` is a zombie child of `parent` (exited, never reaped).
fn zombie_of(pid: i32, parent: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        let Some((_, rest)) = s.rsplit_once(')') else {
            return false;
        };
        let mut f = rest.split_whitespace();
        f.next() == Some("Z") && f.next() == Some(parent.to_string().as_str())
    })
}

fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, text.split_once("\r\n\r\n")?.1.to_owned()))
}

/// The value of an unlabelled sample in `/metrics`.
fn metric(port: u16, name: &str) -> Option<u64> {
    let (_, body) = http_get(port, "/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
}

/// `kill -9` of the managed mosquitto: the supervisor logs it (error, with the exit status),
/// reaps it, and has it listening again within 2 s; `/metrics` counts the restart. A broker
/// that cannot start again (its config broken for the test) is retried with backoff while
/// `/healthz` answers 503 with the reason and `labvisor_broker_up` is 0; once it can, it is
/// back, and an agent's output reaches MQTT again.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn a_killed_managed_broker_is_restarted() {
    ensure_busybox_image();
    let scope = DockerScope::new("brokerkill");
    let dir = tempfile::tempdir().unwrap();
    let sut_dir = dir.path().join("sut");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&sut_dir).unwrap();
    std::fs::write(sut_dir.join("bk-1.toml"), SUT_TEXT).unwrap();
    let port = free_port();
    let mport = free_port();
    let log = dir.path().join("supervisor.log");
    let sup = supervise_with(
        &scope,
        &sut_dir,
        &state,
        port,
        &log,
        &format!("127.0.0.1:{mport}"),
    );
    let fail = |what: &str| -> String {
        format!(
            "{what}\n--- supervisor log ---\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    };
    wait_until(&fail("bk-1 idle"), Duration::from_secs(60), || {
        (sut_state(port, &state, "bk-1")? == "idle").then_some(())
    });
    wait_until(&fail("healthz ok"), Duration::from_secs(30), || {
        (http_get(mport, "/healthz")?.0 == 200).then_some(())
    });
    assert_eq!(metric(mport, "labvisor_broker_up"), Some(1));
    assert_eq!(metric(mport, "labvisor_broker_restarts_total"), Some(0));
    let broker_pid = || -> Option<i32> {
        std::fs::read_to_string(state.join("mosquitto.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };

    // 1. kill -9: listening again within 2 s, reaped, logged, counted.
    let first = broker_pid().unwrap();
    let killed = std::time::Instant::now();
    signal(first as u32, nix::sys::signal::Signal::SIGKILL, false);
    wait_until(
        &fail("a new broker listens within 2 s"),
        Duration::from_secs(2),
        || {
            (broker_pid()? != first && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
                .then_some(())
        },
    );
    eprintln!("listening again {:?} after the kill", killed.elapsed());
    wait_until(
        &fail("the killed broker is reaped"),
        Duration::from_secs(2),
        || (!zombie_of(first, sup.id())).then_some(()),
    );
    wait_until(
        &fail("one restart counted"),
        Duration::from_secs(10),
        || {
            (metric(mport, "labvisor_broker_restarts_total")? == 1
                && metric(mport, "labvisor_broker_up")? == 1)
                .then_some(())
        },
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let died: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("The managed broker died"))
        .collect();
    assert_eq!(died.len(), 1, "{text}");
    assert!(
        died[0].contains("ERROR") && died[0].contains("SIGKILL"),
        "{}",
        died[0]
    );
    assert_eq!(
        text.lines()
            .filter(|l| l.contains("The managed broker was restarted"))
            .count(),
        1,
        "{text}"
    );

    // 2. A broker that cannot start: down, and /healthz and /metrics say so, until it can.
    let conf = state.join("mosquitto.conf");
    let good = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(&conf, format!("{good}no_such_option true\n")).unwrap();
    let second = broker_pid().unwrap();
    signal(second as u32, nix::sys::signal::Signal::SIGKILL, false);
    let (code, reason) = wait_until(&fail("healthz 503"), Duration::from_secs(10), || {
        http_get(mport, "/healthz").filter(|(c, _)| *c == 503)
    });
    assert_eq!(code, 503);
    assert!(reason.contains("managed broker is down"), "{reason}");
    assert_eq!(metric(mport, "labvisor_broker_up"), Some(0));
    wait_until(
        &fail("a failed restart logged"),
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(&log)
                .ok()?
                .contains("could not be restarted")
                .then_some(())
        },
    );
    std::fs::write(&conf, &good).unwrap();
    wait_until(&fail("up again"), Duration::from_secs(40), || {
        (http_get(mport, "/healthz")?.0 == 200
            && metric(mport, "labvisor_broker_up")? == 1
            && metric(mport, "labvisor_broker_restarts_total")? == 2)
            .then_some(())
    });
    assert!(!zombie_of(second, sup.id()));

    // The agent's output reaches MQTT again, and the supervisor's status tells the story.
    let auth = local_auth(&state);
    let auth: Vec<&str> = auth.iter().map(String::as_str).collect();
    let sub = labvisor_tests::Subscriber::start(port, "bk-1/output", &auth);
    sub.wait_for(
        &fail("bk-1's output after the restarts"),
        Duration::from_secs(30),
        |l| l.starts_with("bk-1/output ") && l.contains("up"),
    );
    let v = wait_until(
        &fail("the supervisor's status"),
        Duration::from_secs(30),
        || {
            let v = status_json(port, &state)?;
            let s = v["supervisors"].as_array()?.first()?.clone();
            (s["managed_broker"]["restarts"] == 2).then_some(s)
        },
    );
    assert_eq!(v["managed_broker"]["up"], true, "{v}");
    assert!(
        v["managed_broker"]["last_exit"]
            .as_str()
            .is_some_and(|e| e.contains("SIGKILL")),
        "{v}"
    );
}

/// The loopback listener of the managed broker refuses anonymous clients: a job published
/// anonymously never runs; the local login (password in `local-password`, 0600, the
/// supervisor's user's) is what `labvisor submit` and `status` use with no credentials given.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn the_loopback_listener_needs_the_local_login() {
    ensure_busybox_image();
    let scope = DockerScope::new("local");
    let dir = tempfile::tempdir().unwrap();
    let sut_dir = dir.path().join("sut");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&sut_dir).unwrap();
    std::fs::write(sut_dir.join("lo-1.toml"), SUT_TEXT).unwrap();
    let port = free_port();
    let url = format!("mqtt://127.0.0.1:{port}");
    let log = dir.path().join("supervisor.log");
    let _sup = supervise(&scope, &sut_dir, &state, port, &log);
    let fail = |what: &str| -> String {
        format!(
            "{what}\n--- supervisor log ---\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    };
    // `labvisor status` with no credentials: the local login, picked up from the state
    // directory (LABVISOR_STATE_DIR, as `labvisor supervise --state-dir` got it).
    wait_until(&fail("lo-1 idle"), Duration::from_secs(60), || {
        (sut_state(port, &state, "lo-1")? == "idle").then_some(())
    });
    // Anonymous: refused at CONNECT, so nothing is published.
    let job = r#"{"id": "anonymous-1", "script": "echo ran >> /labvisor/data/runs-anonymous-1"}"#;
    let anon = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(["-t", "lo-1/submit", "-m", job])
        .output()
        .unwrap();
    assert!(
        !anon.status.success(),
        "an anonymous publish must be refused"
    );
    assert!(
        String::from_utf8_lossy(&anon.stderr).contains("not authorised"),
        "{}",
        String::from_utf8_lossy(&anon.stderr)
    );
    // A wrong password too.
    let wrong = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(["-u", "labvisor.local", "-P", "not-the-password-0123456789"])
        .args(["-t", "lo-1/submit", "-m", job])
        .output()
        .unwrap();
    assert!(!wrong.status.success(), "a wrong password must be refused");

    let file = state.join("local-password");
    let meta = std::fs::metadata(&file).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // The supervisor's user (this test's), not the broker's.
    let me = std::fs::metadata("/proc/self").unwrap().uid();
    assert_eq!(meta.uid(), me);
    let human = cli(&state, &["status", "--broker", &url]);
    assert!(
        human.status.success(),
        "{}",
        String::from_utf8_lossy(&human.stderr)
    );
    assert!(String::from_utf8_lossy(&human.stdout).contains("lo-1"));

    // `labvisor submit --wait` with no credentials works; the agent handles submissions in
    // order, so once it is done, the anonymous job would have been seen.
    let out = cli(
        &state,
        &["submit", "lo-1", "--wait", "--broker", &url, "--", "true"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all = retained(port, &state).unwrap();
    let jobs: Vec<&String> = all.keys().filter(|t| t.starts_with("lo-1/jobs/")).collect();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert!(!all.contains_key("lo-1/jobs/anonymous-1"));
    let container = docker_ok(&["ps", "-q", "--filter", &format!("label={}", scope.label())]);
    let runs =
        labvisor_tests::docker(&["exec", &container, "cat", "/labvisor/data/runs-anonymous-1"]);
    assert!(!runs.status.success(), "the anonymous job never ran");

    // Without the state directory (another user's tools), there is no login: refused.
    let out = Command::new(env!("CARGO_BIN_EXE_labvisor"))
        .args(["status", "--json", "--broker", &url])
        .env("LABVISOR_STATE_DIR", dir.path().join("elsewhere"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// On the managed broker an agent's login writes its own topics and its reply space
/// `labvisor/replies/<sut>/#`, and nothing else: not the supervisors' status under
/// `labvisor/`, not another SUT's `submit`.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn an_agent_login_cannot_write_the_control_plane_or_another_sut() {
    ensure_busybox_image();
    let scope = DockerScope::new("aclplane");
    let dir = tempfile::tempdir().unwrap();
    let sut_dir = dir.path().join("sut");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&sut_dir).unwrap();
    std::fs::write(sut_dir.join("ac-1.toml"), SUT_TEXT).unwrap();
    // A SUT named `labvisor` would log in as `labvisor` and get `labvisor/#`: refused.
    std::fs::write(sut_dir.join("labvisor.toml"), SUT_TEXT).unwrap();
    let port = free_port();
    let log = dir.path().join("supervisor.log");
    let _sup = supervise(&scope, &sut_dir, &state, port, &log);
    let fail = |what: &str| -> String {
        format!(
            "{what}\n--- supervisor log ---\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    };
    wait_until(
        &fail("ac-1 idle, labvisor.toml invalid"),
        Duration::from_secs(60),
        || {
            let v = status_json(port, &state)?;
            let counts = v["supervisors"].as_array()?.first()?["suts"].clone();
            let idle = v["suts"]
                .as_array()?
                .iter()
                .any(|r| r["sut"] == "ac-1" && r["state"] == "idle");
            (idle && counts["desired"] == 1 && counts["invalid"] == 1).then_some(())
        },
    );
    assert!(!state.join("agents/labvisor").exists());
    let reserved = docker_ok(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label={}", scope.label()),
        "--filter",
        "label=io.labvisor.sut=labvisor",
    ]);
    assert_eq!(reserved, "", "no container for the reserved name");
    let password = std::fs::read_to_string(state.join("agents/ac-1")).unwrap();
    let gateway = network_gateway(&scope.name("labvisor.net"));
    let auth = local_auth(&state);
    let mut args: Vec<&str> = auth.iter().map(String::as_str).collect();
    let targets = [
        "labvisor/supervisors/x/status",
        "labvisor/replies/ac-2/x",
        "ac-2/submit",
        "labvisor/replies/ac-1/x",
        "ac-1/x",
    ];
    for t in &targets[1..] {
        args.extend(["-t", t]);
    }
    let sub = labvisor_tests::Subscriber::start(port, targets[0], &args);
    let publish = |topic: &str, payload: &str| {
        Command::new("mosquitto_pub")
            .args([
                "-h",
                &gateway,
                "-p",
                &port.to_string(),
                "-V",
                "5",
                "-q",
                "1",
            ])
            .args(["-u", "ac-1", "-P", password.trim()])
            .args(["-t", topic, "-m", payload])
            .output()
            .unwrap()
    };
    // Allowed: its own topic; repeated until the subscriber sees it (then it is subscribed).
    wait_until("the subscriber is live", Duration::from_secs(20), || {
        publish("ac-1/x", "ready");
        sub.lines()
            .iter()
            .any(|l| l == "ac-1/x ready")
            .then_some(())
    });
    for t in &targets[..3] {
        publish(t, "forbidden");
    }
    publish("labvisor/replies/ac-1/x", "reply");
    publish("ac-1/x", "last");
    sub.wait_for("the last allowed message", Duration::from_secs(10), |l| {
        l == "ac-1/x last"
    });
    let lines = sub.lines();
    let forbidden: Vec<&String> = lines.iter().filter(|l| l.ends_with(" forbidden")).collect();
    assert!(forbidden.is_empty(), "{forbidden:?}");
    assert_eq!(
        lines
            .iter()
            .filter(|l| *l == "labvisor/replies/ac-1/x reply")
            .count(),
        1,
        "{lines:?}"
    );
    let acl = std::fs::read_to_string(state.join("acl")).unwrap();
    assert!(acl.contains("user labvisor\ntopic deny #\n"), "{acl}");
}

/// A lab of 1500 SUTs has 1500 retained messages on a topic pattern such as `+/agent`; a
/// client subscribing to it at QoS 1 (the supervisor does, to `+/agent` and `+/last_job`)
/// is sent all of them at once. With mosquitto's default `max_queued_messages` (1000 per
/// client, plus 20 in flight) the broker dropped the rest: a supervisor of more than about
/// 500 SUTs missed agents' statuses. The managed broker now queues 10000 per client, as the
/// shipped `mosquitto.conf` does.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn a_qos1_subscriber_gets_all_of_a_large_labs_retained_messages() {
    const N: usize = 1500;
    let scope = DockerScope::new("queue");
    let dir = tempfile::tempdir().unwrap();
    let sut_dir = dir.path().join("sut");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&sut_dir).unwrap();
    let port = free_port();
    let log = dir.path().join("supervisor.log");
    let _sup = supervise(&scope, &sut_dir, &state, port, &log);
    let fail = |what: &str| -> String {
        format!(
            "{what}\n--- supervisor log ---\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    };
    let password = wait_until(&fail("the local login"), Duration::from_secs(60), || {
        let p = std::fs::read_to_string(state.join("local-password")).ok()?;
        status_json(port, &state).map(|_| p.trim().to_owned())
    });
    // Retained messages the local tools' login may write: one admin command per SUT.
    let prefix = labvisor_tests::unique_id("q");
    let msgs: Vec<(String, Vec<u8>)> = (0..N)
        .map(|i| {
            let topic = format!("{prefix}-{i:04}/admin");
            (topic, br#"{"mode":"online","by":"test"}"#.to_vec())
        })
        .collect();
    let url = format!("mqtt://labvisor.local:{password}@127.0.0.1:{port}");
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(support::retained_lab::publish(
            &url,
            msgs,
            Duration::from_secs(60),
        ))
        .expect("the broker acknowledged every retained message");
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(["-t", "+/admin"])
        .args(local_auth(&state))
        .args(["--retained-only", "-C", &N.to_string(), "-W", "20"])
        .output()
        .unwrap();
    let got = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(got, N, "retained messages received at QoS 1");
}

/// A SIGTERM that reaches the supervisor while it is still starting, its managed broker
/// already running, is a clean stop: the supervisor exits 0 and its mosquitto is stopped with
/// it. (It used to take over SIGTERM only once its loop first ran, so a SIGTERM in between
/// killed it by the default action and left mosquitto running on its own.)
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn a_sigterm_while_starting_stops_the_managed_broker_too() {
    use std::os::unix::process::ExitStatusExt;
    let scope = DockerScope::new("termstart");
    let dir = tempfile::tempdir().unwrap();
    let sut_dir = dir.path().join("sut");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&sut_dir).unwrap();
    let log = dir.path().join("supervisor.log");
    let mut sup = supervise(&scope, &sut_dir, &state, free_port(), &log);
    // The moment the broker's pid is written (the broker runs, the loop has not begun), the
    // signal goes: polled every millisecond, since the window is short.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let broker: i32 = loop {
        if let Some(pid) = std::fs::read_to_string(state.join("mosquitto.pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok())
        {
            break pid;
        }
        assert!(
            std::time::Instant::now() < deadline && sup.try_wait().unwrap().is_none(),
            "no managed broker started:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    signal(sup.id(), nix::sys::signal::Signal::SIGTERM, false);
    let status = sup.wait().unwrap();
    let broker_left = !exited(broker);
    if broker_left {
        // Not left behind by the test either.
        signal(broker as u32, nix::sys::signal::Signal::SIGKILL, false);
    }
    assert_eq!(
        (status.code(), status.signal(), broker_left),
        (Some(0), None, false),
        "the supervisor's exit, and whether its mosquitto was left running:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}
