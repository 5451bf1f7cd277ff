//! labvisor's own network split past `--network-capacity` agents (one Linux bridge takes at
//! most 1023 ports): `labvisor.net`, then `labvisor.net.2`, `.3`, … each made with
//! inter-container traffic off. In-process against the fake runtime (creations in flight are
//! counted), and against a real Docker engine with the managed broker, which agents on every
//! network reach on the first network's gateway.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use labvisor_supervisor::runtime::fake::{self, FakeRuntime};
use labvisor_supervisor::supervise;
use labvisor_tests::{
    docker, docker_ok, ensure_busybox_image, free_port, static_bin, wait_until, DockerScope,
    KillOnDrop,
};

/// Capacity 2, three SUTs whose creations take a while, and two more (sorting before them)
/// added while those are in flight and not listed: the pass of the two must count the three
/// where they go, which gives 2, 2 and 1 containers on networks 1, 2 and 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creations_in_flight_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let rt = FakeRuntime::new();
    let sut = "image = \"img\"\n";
    for s in ["x", "y", "z"] {
        rt.set_create_delay(&format!("p-{s}"), Duration::from_secs(4));
        std::fs::write(dir.path().join(format!("{s}.toml")), sut).unwrap();
    }
    let settings = supervise::Settings {
        network_capacity: 2,
        ..fake::settings(dir.path())
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runtime = Arc::new(rt.clone());
    let task = tokio::spawn(async move {
        supervise::run(settings, runtime, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    // Once the first pass listed (and started the three creations), two more SUTs come:
    // their pass runs while the first three are in flight, not listed yet.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    until("the first pass", deadline, || rt.lists() >= 1).await;
    for s in ["a", "b"] {
        std::fs::write(dir.path().join(format!("{s}.toml")), sut).unwrap();
    }
    let has = |name: &str| rt.containers().iter().any(|c| c.name == name);
    until("a and b created", deadline, || has("p-a") && has("p-b")).await;
    assert!(!has("p-x"), "a and b came while x was in flight");
    until("five containers", deadline, || rt.containers().len() == 5).await;
    let mut per_net: BTreeMap<String, usize> = BTreeMap::new();
    for c in rt.containers() {
        *per_net.entry(c.network.unwrap_or_default()).or_default() += 1;
    }
    assert_eq!(
        per_net,
        BTreeMap::from([
            ("p-labvisor.net".to_owned(), 2),
            ("p-labvisor.net.2".to_owned(), 2),
            ("p-labvisor.net.3".to_owned(), 1),
        ])
    );
    let _ = stop.send(());
    task.await.unwrap();
}

/// A capacity of 0 is a usage error, before anything starts.
#[test]
fn a_network_capacity_of_zero_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_labvisor"))
        .args(["supervise", "--network-capacity", "0", "--sut-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid value '0' for '--network-capacity"),
        "{err}"
    );
}

/// Waits until `f` holds, failing at `deadline`.
async fn until(what: &str, deadline: tokio::time::Instant, f: impl Fn() -> bool) {
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A SUT file: a device process printing every second, fast health, no healing (a loaded
/// machine must not restart anything under the test).
const SUT_TEXT: &str = "image = \"labvisor/busybox:local\"\ncommand = [\"/bin/sh\", \"-c\", \"while true; do echo up; sleep 1; done\"]\n[health]\nheartbeat = \"500ms\"\nmax_age = \"3s\"\ninterval = \"1s\"\ntimeout = \"500ms\"\nretries = 2\nstart_period = \"0s\"\n[restart]\non_unhealthy = \"none\"\n";

const CAPACITY_2: [&str; 2] = ["--network-capacity", "2"];

const T: Duration = Duration::from_secs(90);

/// A supervisor with its managed broker (no `--broker`) and `extra` arguments.
fn supervise(
    scope: &DockerScope,
    dir: &Path,
    state: &Path,
    port: u16,
    log: &Path,
    extra: &[&str],
) -> KillOnDrop {
    let child = Command::new(env!("CARGO_BIN_EXE_labvisor"))
        .arg("supervise")
        .arg("--sut-dir")
        .arg(dir)
        .args(["--id", scope.run_id()])
        .args(["--name-prefix", &scope.name("")])
        .args(["--extra-label", &scope.label()])
        .args(["--broker-port", &port.to_string()])
        .args(extra)
        .args(["--metrics-listen", "none"])
        .args(["--stop-timeout", "2s"])
        .arg("--state-dir")
        .arg(state)
        .arg("--agent-bin")
        .arg(static_bin("labvisor-agent"))
        .arg("--healthcheck-bin")
        .arg(static_bin("labvisor-healthcheck"))
        .env("LABVISOR_LOG", "info,labvisor_supervisor=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    KillOnDrop(child)
}

/// `labvisor <args>` as a local tool of the supervisor whose state directory is `state`.
fn cli(state: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_labvisor"))
        .args(args)
        .env("LABVISOR_STATE_DIR", state)
        .output()
        .unwrap()
}

/// The SUTs `labvisor status --json` shows idle and healthy, once the supervisor is online.
fn idle_suts(port: u16, state: &Path) -> Vec<String> {
    let url = format!("mqtt://127.0.0.1:{port}");
    let out = cli(state, &["status", "--json", "--broker", &url]);
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return Vec::new();
    };
    let online = v["supervisors"]
        .as_array()
        .is_some_and(|s| s.iter().any(|s| s["state"] == "online"));
    let rows = v["suts"].as_array().cloned().unwrap_or_default();
    rows.iter()
        .filter(|r| online && r["state"] == "idle" && r["health"] == "healthy")
        .filter_map(|r| r["sut"].as_str().map(String::from))
        .collect()
}

/// The scope's agent containers: SUT → (id, network).
fn agents(scope: &DockerScope) -> BTreeMap<String, (String, String)> {
    let filter = format!("label={}", scope.label());
    let ids = docker_ok(&["ps", "-aq", "--no-trunc", "--filter", &filter]);
    ids.lines()
        .map(|id| {
            let f = "{{index .Config.Labels \"io.labvisor.sut\"}} {{.HostConfig.NetworkMode}}";
            let out = docker_ok(&["inspect", "-f", f, id]);
            let (sut, net) = out.split_once(' ').unwrap();
            (sut.to_owned(), (id.to_owned(), net.to_owned()))
        })
        .collect()
}

/// The networks of this supervisor (by its id label), sorted.
fn own_networks(scope: &DockerScope) -> Vec<String> {
    let filter = format!("label=io.labvisor.supervisor={}", scope.run_id());
    let mut v: Vec<String> = docker_ok(&[
        "network",
        "ls",
        "--filter",
        &filter,
        "--format",
        "{{.Name}}",
    ])
    .lines()
    .map(String::from)
    .collect();
    v.sort();
    v
}

/// Whether container `from` reaches a listener on port 7000 of container `to` (started here;
/// it answers the host, so it is up).
fn reaches(from: &str, to: &str) -> bool {
    let ip = docker_ok(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        to,
    ]);
    let _ = docker(&["exec", "-d", to, "httpd", "-f", "-p", "7000", "-h", "/"]);
    let addr: SocketAddr = format!("{ip}:7000").parse().unwrap();
    wait_until("the listener up, seen from the host", T, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(1))
            .ok()
            .map(|_| ())
    });
    let o = docker(&["exec", from, "nc", "-w", "3", &ip, "7000"]);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success() || out.contains("timed out"), "{out}");
    o.status.success()
}

/// Five SUTs with capacity 2: three networks of this supervisor (2, 2 and 1 agents), each with
/// inter-container traffic off; every agent healthy and running one job through the managed
/// broker on the first network's gateway; no agent reaches another, on its network or on
/// another; a restarted supervisor adopts them all where they are, removes an old-style network
/// and keeps an (empty) agent network; a sixth SUT goes on the third network.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn agents_are_spread_over_networks_and_all_reach_the_broker() {
    ensure_busybox_image();
    let scope = DockerScope::new("nets");
    let t = tempfile::tempdir().unwrap();
    let (dir, state) = (t.path().join("sut"), t.path().join("state"));
    std::fs::create_dir_all(&dir).unwrap();
    let suts = ["n1", "n2", "n3", "n4", "n5"];
    for s in suts {
        std::fs::write(dir.join(format!("{s}.toml")), SUT_TEXT).unwrap();
    }
    let port = free_port();
    let log = t.path().join("supervisor.log");
    let mut sup = supervise(&scope, &dir, &state, port, &log, &CAPACITY_2);
    let fail = |what: &str, log: &Path| {
        format!(
            "{what}\n--- supervisor log ---\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        )
    };
    wait_until(
        &fail("all five idle, healthy and connected", &log),
        T,
        || (idle_suts(port, &state).len() == 5).then_some(()),
    );

    // Three networks: 2, 2 and 1 agents; traffic between containers off on each.
    let net = |n: usize| match n {
        1 => scope.name("labvisor.net"),
        n => scope.name(&format!("labvisor.net.{n}")),
    };
    assert_eq!(own_networks(&scope), [net(1), net(2), net(3)]);
    let before = agents(&scope);
    let on = |n: usize| -> Vec<String> {
        before
            .iter()
            .filter(|(_, (_, nw))| *nw == net(n))
            .map(|(_, (id, _))| id.clone())
            .collect()
    };
    assert_eq!(
        (on(1).len(), on(2).len(), on(3).len()),
        (2, 2, 1),
        "{before:?}"
    );
    for n in 1..=3 {
        let icc = "{{index .Options \"com.docker.network.bridge.enable_icc\"}}";
        assert_eq!(
            docker_ok(&["network", "inspect", "-f", icc, &net(n)]),
            "false"
        );
    }

    // One job per SUT, through the broker on the first network's gateway.
    let url = format!("mqtt://127.0.0.1:{port}");
    for s in suts {
        let out = cli(
            &state,
            &["submit", s, "--wait", "--broker", &url, "--", "true"],
        );
        assert!(
            out.status.success(),
            "{}",
            fail(&String::from_utf8_lossy(&out.stderr), &log)
        );
    }
    let mut passed = 0;
    for s in suts {
        let out = cli(&state, &["jobs", s, "--json", "--broker", &url]);
        let jobs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(jobs.len(), 1, "{s}: {jobs:?}");
        passed += jobs.iter().filter(|j| j["state"] == "passed").count();
    }
    assert_eq!(passed, 5);

    // Isolation: an agent on network 2 reaches neither its neighbour nor the agent on 3.
    let (two, three) = (on(2), on(3));
    assert!(!reaches(&two[0], &two[1]), "same network");
    assert!(!reaches(&two[0], &three[0]), "network 3 from network 2");

    // A restarted supervisor adopts every container where it is. Of this supervisor's unused
    // networks it removes an old-style one (the bridge of earlier versions) and keeps an agent
    // network.
    sup.kill().unwrap();
    sup.wait().unwrap();
    let old = scope.name("labvisor");
    for (name, extra) in [
        (&old, "io.labvisor.test.old=1"),
        (&net(4), "io.labvisor.role=network"),
    ] {
        let supervisor = format!("io.labvisor.supervisor={}", scope.run_id());
        let labels = [
            scope.label(),
            "io.labvisor.managed-by=labvisor".into(),
            supervisor,
            extra.into(),
        ];
        let args: Vec<&str> = labels
            .iter()
            .flat_map(|l| ["--label", l.as_str()])
            .collect();
        docker_ok(&[&["network", "create"][..], &args, &[name.as_str()]].concat());
    }
    let log2 = t.path().join("supervisor2.log");
    let sup2 = supervise(&scope, &dir, &state, port, &log2, &CAPACITY_2);
    wait_until(&fail("all five idle again", &log2), T, || {
        (idle_suts(port, &state).len() == 5).then_some(())
    });
    assert_eq!(agents(&scope), before, "same ids, same networks");
    wait_until(&fail("the old bridge removed", &log2), T, || {
        (!docker(&["network", "inspect", &old]).status.success()).then_some(())
    });
    assert_eq!(own_networks(&scope), [net(1), net(2), net(3), net(4)]);

    // A sixth SUT goes on the third network, the first with room.
    std::fs::write(dir.join("n6.toml"), SUT_TEXT).unwrap();
    wait_until(&fail("n6 idle", &log2), T, || {
        idle_suts(port, &state)
            .contains(&"n6".to_owned())
            .then_some(())
    });
    assert_eq!(agents(&scope)["n6"].1, net(3));

    // A clean stop, with its broker; the scope removes the rest by label.
    stop(sup2);
    let supervisor = format!("label=io.labvisor.supervisor={}", scope.run_id());
    drop(scope);
    for ls in [&["network", "ls"][..], &["volume", "ls"], &["ps", "-a"]] {
        let left = docker_ok(&[ls, &["-q", "--filter", &supervisor]].concat());
        assert!(left.is_empty(), "left by {ls:?}: {left}");
    }
}

/// With `--agent-tls`, the one certificate (its SAN the first network's gateway) serves the
/// agents of every network: capacity 1, two SUTs on two networks, each given the same
/// `mqtts://` URL, each runs a job.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn over_tls_one_certificate_serves_every_network() {
    ensure_busybox_image();
    let scope = DockerScope::new("netstls");
    let t = tempfile::tempdir().unwrap();
    let (dir, state) = (t.path().join("sut"), t.path().join("state"));
    std::fs::create_dir_all(&dir).unwrap();
    for s in ["t1", "t2"] {
        std::fs::write(dir.join(format!("{s}.toml")), SUT_TEXT).unwrap();
    }
    let port = free_port();
    let log = t.path().join("supervisor.log");
    let extra = ["--agent-tls", "--network-capacity", "1"];
    let sup = supervise(&scope, &dir, &state, port, &log, &extra);
    let fail = |what: &str| {
        format!(
            "{what}\n--- supervisor log ---\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    };
    wait_until(&fail("both idle, healthy and connected"), T, || {
        (idle_suts(port, &state).len() == 2).then_some(())
    });
    let nets: Vec<String> = agents(&scope).into_values().map(|(_, n)| n).collect();
    assert_eq!(
        nets,
        [scope.name("labvisor.net"), scope.name("labvisor.net.2")]
    );
    let gateway = labvisor_tests::network_gateway(&scope.name("labvisor.net"));
    let url = format!("mqtt://127.0.0.1:{port}");
    for (s, (id, _)) in agents(&scope) {
        let env = docker_ok(&[
            "inspect",
            "-f",
            "{{range .Config.Env}}{{println .}}{{end}}",
            &id,
        ]);
        assert!(
            env.lines()
                .any(|l| l == format!("LABVISOR_BROKER=mqtts://{gateway}:{port}")),
            "{s}: {env}"
        );
        let out = cli(
            &state,
            &["submit", &s, "--wait", "--broker", &url, "--", "true"],
        );
        assert!(
            out.status.success(),
            "{}",
            fail(&String::from_utf8_lossy(&out.stderr))
        );
    }
    stop(sup);
}

/// Stops the supervisor `sup` cleanly (SIGTERM), which stops its managed broker too.
fn stop(mut sup: KillOnDrop) {
    let pid = nix::unistd::Pid::from_raw(sup.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(sup.wait().unwrap().success());
}
