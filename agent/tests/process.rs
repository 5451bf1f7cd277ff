//! The agent as a plain process, against a real mosquitto: output completeness on all three
//! sinks, a broker outage mid-stream, heartbeats, restarts, signals and bad input.

mod common;

use std::time::{Duration, Instant};

use common::{healthcheck, sut_toml, AgentProc, Collector};
use labvisor_tests::{wait_until, Mosquitto};
use nix::sys::signal::Signal;

/// What the output test's child prints: many lines, a partial line, invalid UTF-8, a long line.
fn expected_output() -> Vec<u8> {
    let mut v = Vec::new();
    for i in 0..3000 {
        v.extend_from_slice(format!("line {i} of the device output\n").as_bytes());
    }
    v.extend_from_slice(&[b'x'; 40000]);
    v.push(b'\n');
    v.extend_from_slice(b"bad bytes \xff\xfe here\n");
    v.extend_from_slice(b"partial line without newline");
    v
}

const OUTPUT_SCRIPT: &str = r#"i=0; while [ $i -lt 3000 ]; do echo "line $i of the device output"; i=$((i+1)); done; head -c 40000 /dev/zero | tr '\0' x; echo; printf 'bad bytes \377\376 here\n'; printf 'partial line without newline'; exec sleep 3600"#;

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn output_reaches_stdout_the_file_and_mqtt_complete_and_in_sequence() {
    let broker = Mosquitto::start();
    let sut = "out-1";
    let mqtt = Collector::start(broker.port(), &[&format!("{sut}/output")]);
    let agent = AgentProc::start(
        sut,
        &sut_toml(Some(OUTPUT_SCRIPT), ""),
        Some(&broker.url()),
        &[],
    );
    let expected = expected_output();
    wait_until(
        "the whole output in the log file",
        Duration::from_secs(30),
        || (agent.log() == expected).then_some(()),
    );
    wait_until(
        "the whole output on stdout",
        Duration::from_secs(10),
        || (agent.stdout() == expected).then_some(()),
    );
    // On MQTT: whole lines; the 40000-byte line in pieces that end with the split marker, and
    // the partial line, written after waiting for its end, ends with it too.
    let marker = labvisor_agent::output::SPLIT_MARKER;
    let mut want = String::new();
    for i in 0..3000 {
        want.push_str(&format!("line {i} of the device output\n"));
    }
    let piece = labvisor_agent::output::LINE_MAX - marker.len() - 1;
    want.push_str(&format!("{}{marker}\n", "x".repeat(piece)).repeat(2));
    want.push_str(&format!("{}\n", "x".repeat(40000 - 2 * piece)));
    want.push_str("bad bytes \u{fffd}\u{fffd} here\n");
    want.push_str(&format!("partial line without newline{marker}\n"));
    let topic = format!("{sut}/output");
    let got = wait_until("the whole output on MQTT", Duration::from_secs(10), || {
        let msgs = mqtt.on(&topic);
        let text: String = msgs.iter().map(|m| m.text.as_str()).collect();
        (text == want).then_some(msgs)
    });
    // Every batch ends at a line boundary.
    assert!(got.iter().all(|m| m.text.ends_with('\n')));
    // Sequence numbers are contiguous from 0, nothing was dropped, and batches stay small.
    for (i, m) in got.iter().enumerate() {
        let meta = m.meta.as_ref().expect("output carries seq properties");
        assert_eq!(meta.seq, i as u64);
        assert_eq!(meta.dropped, 0);
        assert!(m.text.len() <= 16 * 1024, "batch of {} bytes", m.text.len());
        assert!(!m.retain);
    }
    assert!(
        got.len() > 3,
        "output was batched into {} messages",
        got.len()
    );
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn broker_outage_never_blocks_the_child_and_the_gap_is_visible() {
    let mut broker = Mosquitto::start();
    let sut = "outage-1";
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    // 200000 lines (3.3 MB): more than the rate lets through and the backlog the agent keeps.
    let script = format!(
        "while [ ! -e {go} ]; do sleep 0.05; done; awk 'BEGIN {{ for (i = 0; i < 200000; i++) print \"burst line \" i }}'; echo done-bursting; while true; do echo tick; sleep 0.1; done",
        go = go.display()
    );
    let mqtt = Collector::start(broker.port(), &[&format!("{sut}/output")]);
    let agent = AgentProc::start(
        sut,
        &sut_toml(Some(&script), ""),
        Some(&broker.url()),
        &["--mqtt-queue", "8"],
    );
    agent.wait_hb("broker_connected", Duration::from_secs(10), |v| v == "true");
    broker.stop();
    agent.wait_hb("broker_connected", Duration::from_secs(10), |v| {
        v == "false"
    });
    // With the broker gone, the child bursts 200000 lines: it must finish, and every byte must
    // reach the file, while the broker is still down.
    std::fs::write(&go, b"").unwrap();
    wait_until(
        "the burst in the log file with the broker down",
        Duration::from_secs(60),
        || {
            String::from_utf8_lossy(&agent.log())
                .contains("done-bursting")
                .then_some(())
        },
    );
    let log = String::from_utf8_lossy(&agent.log()).into_owned();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines[200000], "done-bursting");
    for (i, l) in lines.iter().take(200000).enumerate() {
        assert_eq!(*l, format!("burst line {i}"));
    }
    broker.restart();
    agent.wait_hb("broker_connected", Duration::from_secs(15), |v| v == "true");
    // After the reconnect, MQTT output resumes (the child keeps ticking); the burst was more
    // than the rate and the backlog kept during the outage, so lines were dropped and the
    // sequence shows it.
    let topic = format!("{sut}/output");
    let resumed = mqtt.wait(&topic, Duration::from_secs(15), |m| {
        m.text.contains("tick") && m.meta.as_ref().is_some_and(|meta| meta.dropped > 0)
    });
    assert!(resumed.meta.unwrap().seq > 0);
    let seqs: Vec<u64> = mqtt
        .on(&topic)
        .iter()
        .filter_map(|m| m.meta.as_ref().map(|m| m.seq))
        .collect();
    let contiguous = seqs.windows(2).all(|w| w[1] == w[0] + 1) && seqs.first() == Some(&0);
    assert!(!contiguous, "a gap must be visible in {seqs:?}");
    let dropped: u64 = agent.hb("output_dropped").unwrap().parse().unwrap();
    assert!(dropped > 0, "the drop is counted in the heartbeat");
}

#[test]
#[ignore = "needs the static binaries: tools/test.sh builds them"]
fn a_frozen_agent_turns_unhealthy_within_max_age() {
    let agent = AgentProc::start(
        "frozen-1",
        &sut_toml(Some("exec sleep 3600"), ""),
        None,
        &[],
    );
    let hb = agent.path("run/heartbeat");
    wait_until("healthy", Duration::from_secs(10), || {
        (healthcheck(&hb).0 == 0).then_some(())
    });
    let (_, line) = healthcheck(&hb);
    assert!(
        line.starts_with("ok: idle, device process running"),
        "{line}"
    );
    agent.signal(Signal::SIGSTOP);
    let t0 = Instant::now();
    let line = wait_until("unhealthy after SIGSTOP", Duration::from_secs(5), || {
        let (code, line) = healthcheck(&hb);
        (code == 1).then_some(line)
    });
    // max_age is 2s; a heartbeat every 200ms means at most 2.2s from freeze to unhealthy.
    assert!(
        t0.elapsed() <= Duration::from_millis(2600),
        "{:?}",
        t0.elapsed()
    );
    assert!(line.contains("the agent's loop is hung or dead"), "{line}");
    agent.signal(Signal::SIGCONT);
    wait_until("healthy again", Duration::from_secs(5), || {
        (healthcheck(&hb).0 == 0).then_some(())
    });
}

#[test]
fn a_killed_child_is_restarted_with_backoff_and_counted() {
    let agent = AgentProc::start(
        "restart-1",
        &sut_toml(
            Some("exec sleep 3600"),
            "[restart]\nbackoff_min = \"300ms\"\nbackoff_max = \"5s\"\ncrash_loop_after = 3\n",
        ),
        None,
        &[],
    );
    let first: i32 = agent
        .wait_hb("child_pid", Duration::from_secs(10), |v| !v.is_empty())
        .parse()
        .unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first), Signal::SIGKILL).unwrap();
    let second: i32 = agent
        .wait_hb("child_pid", Duration::from_secs(10), |v| {
            !v.is_empty() && v != first.to_string()
        })
        .parse()
        .unwrap();
    assert_eq!(agent.hb("child_restarts").as_deref(), Some("1"));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(second), Signal::SIGKILL).unwrap();
    agent.wait_hb("child_restarts", Duration::from_secs(10), |v| v == "2");
    let log = String::from_utf8_lossy(&agent.log()).into_owned();
    assert!(log.contains("device process ended (signal 9)"), "{log}");
    // The second quick failure waits twice as long as the first.
    assert!(log.contains("restarting in 0.3s"), "{log}");
    assert!(log.contains("restarting in 0.6s"), "{log}");
}

#[test]
#[ignore = "needs the static binaries: tools/test.sh builds them"]
fn a_crash_looping_child_is_reported_and_unhealthy() {
    let agent = AgentProc::start(
        "crash-1",
        &sut_toml(
            Some("echo boom; exit 7"),
            "[restart]\nbackoff_min = \"50ms\"\nbackoff_max = \"200ms\"\ncrash_loop_after = 3\n",
        ),
        None,
        &[],
    );
    agent.wait_hb("state", Duration::from_secs(10), |v| v == "crash-loop");
    let detail = agent.hb("detail").unwrap();
    assert!(
        detail.contains("failed") && detail.contains("exit 7"),
        "{detail}"
    );
    let (code, line) = healthcheck(&agent.path("run/heartbeat"));
    assert_eq!(code, 1);
    assert!(
        line.starts_with("unhealthy: agent state is crash-loop"),
        "{line}"
    );
}

#[test]
fn sigterm_stops_the_whole_group_within_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let gc = dir.path().join("gc.pid");
    let script = format!(
        "trap '' TERM; sleep 1000 & echo $! > {}; wait; wait",
        gc.display()
    );
    let mut agent = AgentProc::start(
        "term-1",
        &sut_toml(Some(&script), ""),
        None,
        &["--grace", "500ms"],
    );
    let gc_pid: i32 = wait_until("grandchild started", Duration::from_secs(10), || {
        std::fs::read_to_string(&gc).ok()?.trim().parse().ok()
    });
    agent.wait_hb("child_alive", Duration::from_secs(5), |v| v == "true");
    let t0 = Instant::now();
    agent.signal(Signal::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(5));
    // The shell ignored TERM: killed after the grace period, exit status 3 says so.
    assert_eq!(status.code(), Some(3), "{}", agent.stderr());
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert!(t0.elapsed() >= Duration::from_millis(500));
    wait_until("grandchild gone", Duration::from_secs(5), || {
        let stat = std::fs::read_to_string(format!("/proc/{gc_pid}/stat")).unwrap_or_default();
        (stat.is_empty() || stat.contains(") Z")).then_some(())
    });
    assert_eq!(agent.hb("state").as_deref(), Some("offline"));
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn sigterm_with_a_cooperative_child_exits_zero_and_publishes_offline() {
    let broker = Mosquitto::start();
    let sut = "term-2";
    let mqtt = Collector::start(broker.port(), &[&format!("{sut}/agent")]);
    let mut agent = AgentProc::start(
        sut,
        &sut_toml(Some("exec sleep 3600"), ""),
        Some(&broker.url()),
        &[],
    );
    let topic = format!("{sut}/agent");
    mqtt.wait(&topic, Duration::from_secs(10), |m| {
        m.text.contains("\"state\":\"idle\"")
    });
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait_exit(Duration::from_secs(5)).code(), Some(0));
    let last = wait_until("offline on MQTT", Duration::from_secs(5), || {
        mqtt.on(&topic)
            .last()
            .cloned()
            .filter(|m| m.text.contains("offline"))
    });
    assert!(last.text.contains("\"state\":\"offline\""), "{}", last.text);
    // Retained: a late subscriber sees offline, not the will ("lost").
    let late = broker.subscribe(&topic, &["-C", "1", "-W", "5"]);
    let line = late.wait_lines(1, Duration::from_secs(6)).remove(0);
    assert!(line.contains("\"state\":\"offline\""), "{line}");
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn a_killed_agent_leaves_its_retained_will_lost() {
    let broker = Mosquitto::start();
    let sut = "will-1";
    let mqtt = Collector::start(broker.port(), &[&format!("{sut}/agent")]);
    let mut agent = AgentProc::start(sut, &sut_toml(None, ""), Some(&broker.url()), &[]);
    let topic = format!("{sut}/agent");
    mqtt.wait(&topic, Duration::from_secs(10), |m| {
        m.text.contains("\"state\":\"idle\"")
    });
    agent.signal(Signal::SIGKILL);
    agent.wait_exit(Duration::from_secs(5));
    let will = mqtt.wait(&topic, Duration::from_secs(10), |m| {
        m.text.contains("\"state\":\"lost\"")
    });
    assert!(will.text.contains("\"sut\":\"will-1\""), "{}", will.text);
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn a_flooding_child_still_gets_fresh_heartbeats() {
    let broker = Mosquitto::start();
    let agent = AgentProc::start(
        "flood-1",
        &sut_toml(
            Some("exec yes flooding-the-agent"),
            "[log]\nmax_size = \"4MiB\"\nkeep = 1\n",
        ),
        Some(&broker.url()),
        &["--no-stdout"],
    );
    let hb = agent.path("run/heartbeat");
    agent.wait_hb("child_alive", Duration::from_secs(10), |v| v == "true");
    // Over some 15 heartbeats of flooding, each one arrives in time and the check stays healthy.
    let mut last_seq: u64 = agent.hb("seq").unwrap().parse().unwrap();
    for _ in 0..5 {
        let next = wait_until(
            "heartbeat advances under flood",
            Duration::from_secs(2),
            || {
                let s: u64 = agent.hb("seq")?.parse().ok()?;
                (s >= last_seq + 3).then_some(s)
            },
        );
        last_seq = next;
        let (code, line) = healthcheck(&hb);
        assert_eq!(code, 0, "{line}");
    }
    let rotated = std::fs::metadata(agent.path("data/log/flood-1.log.1")).map(|m| m.len());
    let total = agent.log().len() as u64 + rotated.unwrap_or(0);
    assert!(
        total > 1_000_000,
        "the flood reaches the file ({total} bytes)"
    );
}

#[test]
fn an_invalid_config_exits_2_naming_the_problem() {
    let mut agent = AgentProc::start("bad-1", "image = \"\"\nbogus = 1\n", None, &[]);
    let status = agent.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(2));
    let err = agent.stderr();
    assert!(err.contains("invalid config"), "{err}");
    assert!(err.contains("bad-1.toml"), "{err}");
    assert!(err.contains("bogus"), "{err}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_labvisor-agent"))
        .env_remove("LABVISOR_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no config"));
}

/// The agent's own log lines carry no ANSI escape codes when stdout and stderr are pipes (as
/// under `docker logs`).
#[test]
fn log_lines_are_plain_text_on_a_pipe() {
    // Nothing listens on this port: the agent logs its failed connections.
    let broker = format!("mqtt://127.0.0.1:{}", labvisor_tests::free_port());
    let agent = AgentProc::start(
        "plain-1",
        &sut_toml(Some("echo device says hi; exec sleep 3600"), ""),
        Some(&broker),
        &[],
    );
    wait_until(
        "a failed connection logged",
        Duration::from_secs(10),
        || {
            agent
                .stderr()
                .contains("MQTT connection failed")
                .then_some(())
        },
    );
    wait_until(
        "the device output on stdout",
        Duration::from_secs(10),
        || {
            String::from_utf8_lossy(&agent.stdout())
                .contains("device says hi")
                .then_some(())
        },
    );
    let err = agent.stderr();
    assert!(
        !err.contains('\x1b'),
        "escape codes in the agent's log: {err:?}"
    );
    assert!(!agent.stdout().contains(&0x1b), "escape codes on stdout");
}

#[test]
#[ignore = "needs the static binaries: tools/test.sh builds them"]
fn a_bad_tail_glob_is_reported_and_the_agent_keeps_running() {
    let agent = AgentProc::start(
        "tail-1",
        &sut_toml(Some("exec sleep 3600"), "tail = [\"/tmp/[unclosed\"]\n"),
        None,
        &[],
    );
    let detail = agent.wait_hb("detail", Duration::from_secs(10), |v| {
        v.contains("invalid pattern")
    });
    assert!(detail.contains("/tmp/[unclosed"), "{detail}");
    let seq: u64 = agent.hb("seq").unwrap().parse().unwrap();
    agent.wait_hb("seq", Duration::from_secs(5), |v| {
        v.parse::<u64>().unwrap_or(0) > seq
    });
    assert_eq!(healthcheck(&agent.path("run/heartbeat")).0, 0);
}

/// An exec probe runs without a broker; its failure (exit status and output) makes the agent
/// unhealthy in the healthcheck while the agent stays idle, and the next passing run clears it.
#[test]
#[ignore = "needs the static binaries: tools/test.sh builds them"]
fn a_failing_exec_probe_makes_the_agent_unhealthy_until_it_passes() {
    let dir = tempfile::tempdir().unwrap();
    let refused = dir.path().join("refused");
    std::fs::write(&refused, "").unwrap();
    let probe = format!(
        "[probe]\ncommand = [\"/bin/sh\", \"-c\", \"if [ -e {0} ]; then echo 403 refused; exit 2; fi\"]\ninterval = \"1s\"\ntimeout = \"500ms\"\n",
        refused.display()
    );
    let agent = AgentProc::start("exec-probe-1", &sut_toml(None, &probe), None, &[]);
    let hb = agent.path("run/heartbeat");
    let line = wait_until(
        "unhealthy: the probe fails",
        Duration::from_secs(10),
        || {
            let (code, line) = healthcheck(&hb);
            (code == 1 && line.contains("probe failing")).then_some(line)
        },
    );
    assert_eq!(line, "unhealthy: probe failing: exit 2: 403 refused");
    assert_eq!(agent.hb("state").as_deref(), Some("idle"));
    std::fs::remove_file(&refused).unwrap();
    let line = wait_until("healthy: the probe passes", Duration::from_secs(10), || {
        let (code, line) = healthcheck(&hb);
        (code == 0).then_some(line)
    });
    assert!(line.starts_with("ok: idle"), "{line}");
    assert_eq!(agent.hb("unhealthy").as_deref(), Some(""));
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn the_upstream_probe_reports_reachable_and_unreachable_targets() {
    let broker = Mosquitto::start();
    // A tiny HTTP server on a free loopback port that answers 200 once.
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http_port = http.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut s in http.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
        }
    });
    let closed = labvisor_tests::free_port();
    let cases = [
        (
            "probe-tcp",
            format!("tcp://127.0.0.1:{}", broker.port()),
            true,
        ),
        (
            "probe-http",
            format!("http://127.0.0.1:{http_port}/status"),
            true,
        ),
        ("probe-down", format!("tcp://127.0.0.1:{closed}"), false),
    ];
    let mqtt = Collector::start(broker.port(), &["+/probe"]);
    let _agents: Vec<AgentProc> = cases
        .iter()
        .map(|(sut, url, _)| {
            let extra =
                format!("[probe]\nurl = \"{url}\"\ninterval = \"1s\"\ntimeout = \"500ms\"\n");
            AgentProc::start(sut, &sut_toml(None, &extra), Some(&broker.url()), &[])
        })
        .collect();
    for (sut, url, ok) in &cases {
        let m = mqtt.wait(&format!("{sut}/probe"), Duration::from_secs(15), |_| true);
        let v: serde_json::Value = serde_json::from_str(&m.text).unwrap();
        assert_eq!(v["url"], url.as_str());
        assert_eq!(v["ok"], *ok, "{sut}: {v}");
        if !ok {
            assert!(v["error"].as_str().unwrap().contains("connect"), "{v}");
        }
        // Retained: a late subscriber gets the latest result at once.
        let late = broker.subscribe(&format!("{sut}/probe"), &["-C", "1", "-W", "5"]);
        assert!(late.wait_lines(1, Duration::from_secs(6))[0].contains(url.as_str()));
    }
}

#[test]
fn sigusr1_and_sighup_reach_the_device_process_group() {
    let script = "trap 'echo got usr1' USR1; trap 'echo got hup' HUP; echo ready; while true; do sleep 0.1; done";
    let agent = AgentProc::start("usr1-1", &sut_toml(Some(script), ""), None, &[]);
    wait_until("the child is ready", Duration::from_secs(10), || {
        String::from_utf8_lossy(&agent.log())
            .contains("ready")
            .then_some(())
    });
    agent.signal(Signal::SIGUSR1);
    wait_until("USR1 forwarded", Duration::from_secs(5), || {
        String::from_utf8_lossy(&agent.log())
            .contains("got usr1")
            .then_some(())
    });
    agent.signal(Signal::SIGHUP);
    wait_until("HUP forwarded", Duration::from_secs(5), || {
        String::from_utf8_lossy(&agent.log())
            .contains("got hup")
            .then_some(())
    });
    // The agent itself is unaffected: still alive, still beating.
    let seq: u64 = agent.hb("seq").unwrap().parse().unwrap();
    agent.wait_hb("seq", Duration::from_secs(5), |v| {
        v.parse::<u64>().unwrap_or(0) > seq
    });
    assert_eq!(agent.hb("child_restarts").as_deref(), Some("0"));
}

/// `log.mqtt_rate` reaches the agent's tap: a burst far above the rate is dropped from MQTT
/// (counted in the heartbeat) while the log file gets every byte.
#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn output_above_mqtt_rate_is_dropped_from_mqtt_only() {
    let broker = Mosquitto::start();
    let agent = AgentProc::start(
        "rate-1",
        &sut_toml(
            Some("head -c 3000000 /dev/zero | tr '\\0' x; exec sleep 3600"),
            "[log]\nmax_size = \"64MiB\"\nkeep = 1\nmqtt_rate = \"64KiB\"\n",
        ),
        Some(&broker.url()),
        &["--no-stdout"],
    );
    wait_until("all 3 MB in the log file", Duration::from_secs(20), || {
        (agent.log().len() == 3_000_000).then_some(())
    });
    agent.wait_hb("broker_connected", Duration::from_secs(10), |v| v == "true");
    let dropped = agent.wait_hb("output_dropped", Duration::from_secs(10), |v| {
        v.parse::<u64>().is_ok_and(|n| n > 0)
    });
    // 3 MB at 64 KiB/s with a 64 KiB burst: nearly every 64 KiB read is over the rate.
    assert!(dropped.parse::<u64>().unwrap() >= 10, "dropped {dropped}");
}

/// `LABVISOR_MQTT_PASSWORD_FILE` (a Docker secret's path): an unreadable or empty file, or
/// a password given both ways, stops the agent at start with exit status 2, naming the
/// variable and the path.
#[test]
fn a_bad_password_file_exits_2_naming_the_variable_and_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("mqtt-password");
    let run = |password: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_labvisor-agent"));
        cmd.env("LABVISOR_CONFIG", dir.path().join("pw-1.toml"))
            .env("LABVISOR_CONFIG_TOML", "image = \"x\"\n")
            .env("LABVISOR_BROKER", "mqtt://127.0.0.1:1")
            .env("LABVISOR_DATA_DIR", dir.path().join("data"))
            .env("LABVISOR_HEARTBEAT_FILE", dir.path().join("heartbeat"))
            .env("LABVISOR_MQTT_PASSWORD_FILE", &secret)
            .env_remove("LABVISOR_MQTT_PASSWORD");
        if let Some(p) = password {
            cmd.env("LABVISOR_MQTT_PASSWORD", p);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(None);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.starts_with(&format!(
            "labvisor-agent: LABVISOR_MQTT_PASSWORD_FILE (--password-file) {}: cannot read it: No such file",
            secret.display()
        )),
        "{err}"
    );
    std::fs::write(&secret, "").unwrap();
    let (code, err) = run(None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("it is empty"), "{err}");
    std::fs::write(&secret, "pw\n").unwrap();
    let (code, err) = run(Some("pw"));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("both LABVISOR_MQTT_PASSWORD (--password) and LABVISOR_MQTT_PASSWORD_FILE"),
        "{err}"
    );
}
