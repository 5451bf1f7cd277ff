//! The supervisor's own hang detection against the real engine and a real mosquitto: Docker's
//! health-check interval is long (`auto` at a small `--healthcheck-rate`), so Docker would not
//! notice a hung agent for minutes; the supervisor sees the agent fall silent on the broker,
//! confirms the stale heartbeat with one `docker exec labvisor-healthcheck`, and restarts the
//! container within `max_age` + 5 s, while Docker's own health never said unhealthy.

mod common;

use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{agent_pid, own_network, tmp_sut_dir, views, write, Stopped, Sup};
use labvisor_protocol::payloads::{AgentStatus, Health};
use labvisor_supervisor::runtime::docker::containers::finished_at_ms;
use labvisor_tests::{
    docker, ensure_busybox_image, network_gateway, wait_until, DockerScope, Mosquitto, Subscriber,
    BUSYBOX_IMAGE,
};

/// `health.max_age` of both SUTs (heartbeat 1 s).
const MAX_AGE: Duration = Duration::from_secs(4);
/// The supervisor's `--stop-timeout` (see `common::Sup`): a SIGSTOPped agent ignores the TERM
/// of a restart, so Docker kills it after this.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);
const T: Duration = Duration::from_secs(60);

/// A SUT with a device process, heartbeat 1 s, `max_age` 4 s, Docker's interval `auto`.
fn sut() -> String {
    format!(
        r#"image = "{BUSYBOX_IMAGE}"
command = ["/bin/sh", "-c", "while true; do sleep 5; done"]
[health]
heartbeat = "1s"
max_age = "4s"
timeout = "1s"
retries = 1
start_period = "0s"
"#
    )
}

/// `docker inspect -f FORMAT NAME`, trimmed.
fn inspect(name: &str, format: &str) -> String {
    let out = docker(&["inspect", "-f", format, name]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The agent's latest status on the broker (with `sub` on `+/agent`).
fn agent(sub: &Subscriber, sut: &str) -> Option<AgentStatus> {
    let prefix = format!("{sut}/agent ");
    sub.lines()
        .iter()
        .rev()
        .filter_map(|l| l.strip_prefix(&prefix))
        .find_map(|p| serde_json::from_str(p).ok())
}

/// Waits until `sut`'s agent, in a run other than `not_boot`, has published for longer than
/// `max_age` (its heartbeat `seq` counts seconds from its start); returns its boot id.
fn settled(sub: &Subscriber, sut: &str, not_boot: Option<&str>) -> String {
    wait_until(&format!("{sut}'s agent publishing for max_age"), T, || {
        let a = agent(sub, sut)?;
        (Some(a.boot_id.as_str()) != not_boot && a.seq > MAX_AGE.as_secs() + 1).then_some(a.boot_id)
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn a_sigstopped_agent_is_restarted_within_max_age_while_docker_still_says_nothing() {
    ensure_busybox_image();
    let scope = DockerScope::new("hang");
    let net = own_network(&scope, "labvisor.net");
    let gateway = network_gateway(&net);
    let broker = Mosquitto::start_with(&format!(
        "allow_anonymous true\npersistence false\nlistener {{port}} {gateway}\n"
    ));
    let agents = broker.subscribe("+/agent", &[]);
    let views_sub = broker.subscribe("+/supervisor", &[]);
    let (_t, dir) = tmp_sut_dir();
    write(&dir, "hung.toml", &sut());
    write(&dir, "calm.toml", &sut());
    let agent_url = format!("mqtt://{gateway}:{}", broker.port());
    // 2 SUTs at 0.01 execs a second: Docker probes each every 200 s.
    let sup = Sup::start(
        &scope,
        &dir,
        Some(&broker.url()),
        &["--agent-broker", &agent_url, "--healthcheck-rate", "0.01"],
    );
    let (hung, calm) = (scope.name("hung"), scope.name("calm"));
    let boot = settled(&agents, "hung", None);
    settled(&agents, "calm", None);
    for name in [&hung, &calm] {
        assert_eq!(
            inspect(name, "{{.Config.Healthcheck.Interval}}"),
            "3m20s",
            "auto: 2 SUTs / 0.01 per second"
        );
    }
    // The supervisor shows them healthy on the agents' word, minutes before Docker's first
    // probe (what a rolling restart waits for).
    for (sut, name) in [("hung", &hung), ("calm", &calm)] {
        wait_until(&format!("{sut} healthy on its view"), T, || {
            let last = views(&views_sub, sut).pop()?;
            (last.health == Health::Healthy).then_some(())
        });
        assert_eq!(inspect(name, "{{.State.Health.Status}}"), "starting");
    }
    let started = inspect(&hung, "{{.State.StartedAt}}");
    let calm_started = inspect(&calm, "{{.State.StartedAt}}");

    let stopped = Stopped(agent_pid(&hung));
    assert!(Command::new("kill")
        .args(["-STOP", &stopped.0])
        .status()
        .unwrap()
        .success());
    let stop_ms = now_ms();
    let t_stop = Instant::now();
    // Until the supervisor acts, Docker's own probe never ran (its interval is 200 s): its
    // health is `starting` with an empty log, never `unhealthy`.
    let (new_run, old_end) = loop {
        let seen = inspect(
            &hung,
            "{{.State.StartedAt}} {{.State.FinishedAt}} {{.State.Status}} {{.State.Health.Status}} {{len .State.Health.Log}}",
        );
        let f: Vec<&str> = seen.split(' ').collect();
        assert_eq!(f.len(), 5, "{seen}");
        if f[0] != started {
            break (f[0].to_owned(), f[1].to_owned());
        }
        // While the hung run still runs (the restart's stop is the supervisor acting).
        if f[2] == "running" {
            assert_eq!(
                (f[3], f[4]),
                ("starting", "0"),
                "Docker's health before the restart: {seen}"
            );
        }
        assert!(t_stop.elapsed() < T, "no restart within {T:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    // The old run ended (killed after the stop timeout of the supervisor's restart) within
    // max_age + 5 s of the SIGSTOP, plus that stop timeout.
    let ended = finished_at_ms(&old_end).expect("FinishedAt of the old run");
    let acted = Duration::from_millis(ended.saturating_sub(stop_ms));
    assert!(
        acted <= MAX_AGE + Duration::from_secs(5) + STOP_TIMEOUT,
        "the hung run ended {acted:?} after the SIGSTOP"
    );
    eprintln!(
        "the hung run ended {acted:?} after the SIGSTOP (stop timeout {STOP_TIMEOUT:?}); its new run was seen {:?} after it",
        t_stop.elapsed()
    );
    assert!(
        sup.log().contains("its heartbeat is stale: it is hung"),
        "the supervisor's own hang detection restarted it"
    );
    // The view said why.
    let reason = wait_until("the reason on hung's view", T, || {
        views(&views_sub, "hung")
            .into_iter()
            .find_map(|v| v.health_reason)
    });
    assert!(
        reason.starts_with("no heartbeat for ") && reason.contains("hung or dead"),
        "{reason}"
    );
    // The new run publishes for longer than max_age: nothing more happens, to either SUT.
    settled(&agents, "hung", Some(&boot));
    let restarts = |sut: &str| views(&views_sub, sut).last().map(|v| v.restarts);
    wait_until("one restart on hung's view", T, || {
        (restarts("hung") == Some(1)).then_some(())
    });
    assert_eq!(
        restarts("calm"),
        Some(0),
        "the other SUT was never restarted"
    );
    assert_eq!(inspect(&calm, "{{.State.StartedAt}}"), calm_started);
    assert_eq!(
        inspect(&hung, "{{.State.StartedAt}}"),
        new_run,
        "exactly one restart"
    );
    assert_eq!(
        inspect(&calm, "{{len .State.Health.Log}}"),
        "0",
        "Docker never probed"
    );
    drop(stopped);
}
