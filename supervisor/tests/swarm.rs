//! `labvisor supervise --runtime swarm` against a swarm of the test's own: node containers,
//! each running its own Docker engine (`labvisor_tests::swarm`), never the machine's engine.
//! The supervisor runs on the host with its managed broker listening on the test network's
//! gateway, which tasks on every node reach; it talks to the manager's engine over TCP.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use labvisor_tests::Swarm;
use labvisor_tests::{
    ensure_busybox_image, free_port, static_bin, wait_until, DockerScope, KillOnDrop,
};

const T: Duration = Duration::from_secs(120);

/// A SUT file pinned by `placement`: a device process printing every second, fast health.
fn sut_text(placement: &str) -> String {
    sut_text_with("", placement)
}

/// [`sut_text`] with `top` (top-level keys) first.
fn sut_text_with(top: &str, placement: &str) -> String {
    format!(
        "{top}image = \"labvisor/busybox:local\"\ncommand = [\"/bin/sh\", \"-c\", \"while true; do echo up; sleep 1; done\"]\n[health]\nheartbeat = \"500ms\"\nmax_age = \"3s\"\ninterval = \"1s\"\ntimeout = \"500ms\"\nretries = 2\nstart_period = \"0s\"\n[placement]\n{placement}\n"
    )
}

/// The lab: a swarm of `n` nodes with the busybox image on each, a `sut/` directory, a
/// supervisor on the swarm with its managed broker.
struct Lab {
    swarm: Swarm,
    scope: DockerScope,
    tmp: tempfile::TempDir,
    port: u16,
    sup: Option<KillOnDrop>,
    runs: usize,
}

impl Lab {
    fn new(name: &str, nodes: usize, suts: &[(&str, String)]) -> Lab {
        ensure_busybox_image();
        let scope = DockerScope::new(name);
        let swarm = Swarm::start(&scope, nodes);
        swarm.load_image("labvisor/busybox:local");
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("sut")).unwrap();
        let mut lab = Lab {
            swarm,
            scope,
            tmp,
            port: free_port(),
            sup: None,
            runs: 0,
        };
        for (s, text) in suts {
            lab.write(s, text);
        }
        lab.start();
        lab
    }

    fn dir(&self) -> PathBuf {
        self.tmp.path().join("sut")
    }

    fn state(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    fn log(&self) -> PathBuf {
        self.tmp.path().join(format!("supervisor{}.log", self.runs))
    }

    fn write(&self, sut: &str, text: &str) {
        std::fs::write(self.dir().join(format!("{sut}.toml")), text).unwrap();
    }

    /// Starts the supervisor (again).
    fn start(&mut self) {
        self.runs += 1;
        let child = Command::new(env!("CARGO_BIN_EXE_labvisor"))
            .arg("supervise")
            .args(["--runtime", "swarm"])
            .args(["--agent-listen", self.swarm.gateway()])
            .arg("--sut-dir")
            .arg(self.dir())
            .args(["--id", self.scope.run_id()])
            .args(["--extra-label", &self.scope.label()])
            .args(["--broker-port", &self.port.to_string()])
            .args(["--metrics-listen", "none"])
            .args(["--stop-timeout", "2s"])
            .args(["--resync", "2s"])
            .arg("--state-dir")
            .arg(self.state())
            .arg("--agent-bin")
            .arg(static_bin("labvisor-agent"))
            .arg("--healthcheck-bin")
            .arg(static_bin("labvisor-healthcheck"))
            .arg("--boot-bin")
            .arg(static_bin("labvisor-boot"))
            .env("DOCKER_HOST", self.swarm.manager_url())
            .env("LABVISOR_LOG", "info,labvisor_supervisor=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.log()).unwrap())
            .spawn()
            .unwrap();
        self.sup = Some(KillOnDrop(child));
    }

    /// Stops the supervisor cleanly (SIGTERM), with its broker.
    fn stop(&mut self) {
        let mut sup = self.sup.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(sup.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        assert!(sup.wait().unwrap().success(), "{}", self.fail("clean stop"));
    }

    fn fail(&self, what: &str) -> String {
        format!(
            "{what}\n--- supervisor log ---\n{}",
            std::fs::read_to_string(self.log()).unwrap_or_default()
        )
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        // The broker right after the command: `submit`'s job command follows `--`.
        Command::new(env!("CARGO_BIN_EXE_labvisor"))
            .arg(args[0])
            .args(["--broker", &format!("mqtt://127.0.0.1:{}", self.port)])
            .args(&args[1..])
            .env("LABVISOR_STATE_DIR", self.state())
            .output()
            .unwrap()
    }

    /// `labvisor status --json`'s rows by SUT, once the supervisor is online.
    fn rows(&self) -> BTreeMap<String, serde_json::Value> {
        let out = self.cli(&["status", "--json"]);
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
            return BTreeMap::new();
        };
        let online = v["supervisors"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["state"] == "online"));
        if !online {
            return BTreeMap::new();
        }
        v["suts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|r| Some((r["sut"].as_str()?.to_owned(), r)))
            .collect()
    }

    /// Waits until `suts` are all idle and healthy, each on the node given.
    fn wait_idle_on(&self, suts: &[(&str, &str)]) {
        wait_until(
            &self.fail(&format!("{suts:?} idle, healthy, on their nodes")),
            T,
            || {
                let rows = self.rows();
                suts.iter()
                    .all(|(s, node)| {
                        rows.get(*s).is_some_and(|r| {
                            r["state"] == "idle"
                                && r["health"] == "healthy"
                                && self.node_of(s).as_deref() == Some(*node)
                        })
                    })
                    .then_some(())
            },
        );
    }

    /// The service of `sut` (the scope's name prefix is not used: service names are the SUTs').
    fn manager(&self, args: &[&str]) -> String {
        self.swarm.docker_ok(self.swarm.manager(), args)
    }

    /// The node `sut`'s running task is on, as Swarm says.
    fn node_of(&self, sut: &str) -> Option<String> {
        let out = self.swarm.docker(
            self.swarm.manager(),
            &[
                "service",
                "ps",
                "--filter",
                "desired-state=running",
                "--format",
                "{{.Node}} {{.CurrentState}}",
                sut,
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find(|l| l.contains("Running"))
            .and_then(|l| l.split_whitespace().next())
            .map(String::from)
    }

    /// The running task's id of `sut`.
    fn task_of(&self, sut: &str) -> String {
        self.manager(&[
            "service",
            "ps",
            "-q",
            "--filter",
            "desired-state=running",
            sut,
        ])
    }

    fn version_of(&self, sut: &str) -> String {
        self.manager(&["service", "inspect", "-f", "{{.Version.Index}}", sut])
    }
}

/// Three nodes, three SUTs: one pinned to node2 by `host`, one to node3, one by a node label
/// on node1. Each runs its job through the shared broker with its output streamed back; the
/// label moved to node3 moves its SUT there; an agent made unhealthy is replaced by Swarm
/// (the supervisor restarts nothing); a restarted supervisor adopts every service without
/// updating one.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn a_swarm_lab_places_runs_moves_heals_and_is_adopted() {
    let suts = [
        ("s1", sut_text("host = \"node2\"")),
        ("s2", sut_text("host = \"node3\"")),
        ("s3", sut_text("constraints = [\"node.labels.rack == r1\"]")),
    ];
    let mut lab = Lab::new("swarm", 3, &[]);
    lab.swarm.label_node("node1", "rack", "r1");
    for (s, text) in &suts {
        lab.write(s, text);
    }
    lab.wait_idle_on(&[("s1", "node2"), ("s2", "node3"), ("s3", "node1")]);

    // The status shows each SUT's node.
    let rows = lab.rows();
    for (s, node) in [("s1", "node2"), ("s2", "node3"), ("s3", "node1")] {
        assert_eq!(rows[s]["node"], node, "{s}: {}", rows[s]);
    }
    // The password is a secret, not in the service's environment.
    let env = lab.manager(&[
        "service",
        "inspect",
        "-f",
        "{{range .Spec.TaskTemplate.ContainerSpec.Env}}{{println .}}{{end}}",
        "s1",
    ]);
    assert!(!env.contains("LABVISOR_MQTT_PASSWORD="), "{env}");
    assert!(
        env.contains("LABVISOR_MQTT_PASSWORD_FILE=/run/secrets/"),
        "{env}"
    );

    // A job on every node, its output streamed back through the shared broker.
    for (s, _) in &suts {
        let marker = format!("hello-from-{s}");
        let out = lab.cli(&["submit", s, "--follow", "--", "echo", &marker]);
        assert!(
            out.status.success(),
            "{}",
            lab.fail(&String::from_utf8_lossy(&out.stderr))
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(stdout.matches(&marker).count(), 1, "{s}: {stdout}");
    }

    // Moving the label moves s3 (Swarm's constraint enforcer), and the status follows.
    let s1_task = lab.task_of("s1");
    lab.swarm.unlabel_node("node1", "rack");
    lab.swarm.label_node("node3", "rack", "r1");
    lab.wait_idle_on(&[("s3", "node3")]);
    wait_until(&lab.fail("s3 shown on node3"), T, || {
        (lab.rows()["s3"]["node"] == "node3").then_some(())
    });

    // s2 and s3 now share node3: a job on s3 reaches neither s2's agent (the node's bridge has
    // inter-container traffic off) nor the manager's engine API; its process cannot gain
    // privileges (the agent set no_new_privs: Engine 20.10 has no such service option).
    let node3 = lab.swarm.node("node3").container.clone();
    let s2_ctr = lab.swarm.docker_ok(
        "node3",
        &["ps", "-q", "--filter", "label=io.labvisor.sut=s2"],
    );
    let s2_ip = lab.swarm.docker_ok(
        "node3",
        &[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &s2_ctr,
        ],
    );
    lab.swarm.docker_ok(
        "node3",
        &[
            "exec", "-d", &s2_ctr, "httpd", "-f", "-p", "7000", "-h", "/",
        ],
    );
    wait_until("s2's listener, seen from its node", T, || {
        labvisor_tests::docker(&["exec", &node3, "nc", "-w", "2", &s2_ip, "7000"])
            .status
            .success()
            .then_some(())
    });
    let manager_ip = lab.swarm.node("node1").ip.clone();
    let probe = format!(
        "for t in {s2_ip}:7000 {manager_ip}:2375; do if nc -w 3 ${{t%:*}} ${{t#*:}} </dev/null; then echo reached $t; else echo blocked $t; fi; done; grep NoNewPrivs /proc/self/status"
    );
    let out = lab.cli(&["submit", "s3", "--follow", "--", "sh", "-c", &probe]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("blocked {s2_ip}:7000")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("blocked {manager_ip}:2375")),
        "{stdout}"
    );
    assert!(!stdout.contains("reached"), "{stdout}");
    assert!(stdout.contains("NoNewPrivs:\t1"), "{stdout}");

    // s1's agent stops (SIGSTOP): its heartbeat goes stale, Docker's probe fails, Swarm
    // replaces the task on the same node. The supervisor restarts nothing itself.
    let container = lab.swarm.docker_ok(
        "node2",
        &["ps", "-q", "--filter", "label=io.labvisor.sut=s1"],
    );
    assert_eq!(container.lines().count(), 1, "{container}");
    // Every process of the task but its init (the agent and its device process) stops.
    lab.swarm
        .docker_ok("node2", &["exec", &container, "kill", "-s", "STOP", "-1"]);
    wait_until(&lab.fail("a new task for s1"), T, || {
        let t = lab.task_of("s1");
        (!t.is_empty() && t != s1_task).then_some(())
    });
    let history = lab.manager(&[
        "service",
        "ps",
        "--no-trunc",
        "--format",
        "{{.Error}}",
        "s1",
    ]);
    assert!(history.contains("unhealthy container"), "{history}");
    lab.wait_idle_on(&[("s1", "node2")]);
    assert_eq!(
        lab.rows()["s1"]["restarts"],
        0,
        "Swarm healed it, not the supervisor"
    );

    // A restarted supervisor adopts every service as it is.
    let versions: Vec<String> = suts.iter().map(|(s, _)| lab.version_of(s)).collect();
    let tasks: Vec<String> = suts.iter().map(|(s, _)| lab.task_of(s)).collect();
    lab.stop();
    lab.start();
    lab.wait_idle_on(&[("s1", "node2"), ("s2", "node3"), ("s3", "node3")]);
    // Passes after it is online (a resync every 2 s): still nothing updated.
    wait_until(&lab.fail("three passes after adoption"), T, || {
        std::fs::read_to_string(lab.log())
            .unwrap_or_default()
            .contains("pass{n=3}")
            .then_some(())
    });
    let versions2: Vec<String> = suts.iter().map(|(s, _)| lab.version_of(s)).collect();
    let tasks2: Vec<String> = suts.iter().map(|(s, _)| lab.task_of(s)).collect();
    assert_eq!(
        (versions, tasks),
        (versions2, tasks2),
        "{}",
        lab.fail("adopted")
    );

    // A changed file updates its service in place (same id, new hash, one new task).
    let id = lab.manager(&["service", "inspect", "-f", "{{.ID}}", "s2"]);
    lab.write(
        "s2",
        &sut_text_with("env = { X = \"2\" }\n", "host = \"node3\""),
    );
    wait_until(&lab.fail("s2 updated"), T, || {
        let env = lab.manager(&[
            "service",
            "inspect",
            "-f",
            "{{range .Spec.TaskTemplate.ContainerSpec.Env}}{{println .}}{{end}}",
            "s2",
        ]);
        env.contains("X=2").then_some(())
    });
    assert_eq!(
        lab.manager(&["service", "inspect", "-f", "{{.ID}}", "s2"]),
        id
    );
    lab.wait_idle_on(&[("s2", "node3")]);
    lab.stop();
}

/// A node lost: its SUT shows down with the node's reason; the SUT on another node keeps its
/// task, untouched.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn a_lost_node_shows_its_suts_down_and_leaves_the_others_alone() {
    let mut lab = Lab::new(
        "swarmlost",
        3,
        &[
            ("k1", sut_text("host = \"node2\"")),
            ("k2", sut_text("host = \"node3\"")),
        ],
    );
    lab.wait_idle_on(&[("k1", "node2"), ("k2", "node3")]);
    let k1_task = lab.task_of("k1");
    lab.swarm.lose_node("node3");
    wait_until(&lab.fail("k2 down with its node's reason"), T, || {
        let rows = lab.rows();
        let r = rows.get("k2")?;
        let down = r["detail"].as_str()?;
        let problems = r["problems"].as_array()?;
        (down.starts_with("node node3 is down") && problems.iter().any(|p| p == "down"))
            .then(|| down.to_owned())
    });
    let rows = lab.rows();
    assert_eq!(rows["k2"]["node"], "node3");
    assert!(rows["k1"]["problems"].is_null(), "{}", rows["k1"]);
    assert_eq!(
        (rows["k1"]["state"].as_str(), rows["k1"]["health"].as_str()),
        (Some("idle"), Some("healthy"))
    );
    assert_eq!(lab.task_of("k1"), k1_task, "k1 untouched");
    let out = lab.cli(&["status", "--problems"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("k2") && text.contains("node3"), "{text}");
    assert!(!text.lines().any(|l| l.starts_with("k1")), "{text}");
    lab.stop();
}

/// `--runtime swarm` with the managed broker needs `--agent-listen` (agents on other hosts
/// cannot use a local bridge's gateway), and `--agent-listen` is for Swarm only: both are usage
/// errors before anything starts.
#[test]
fn agent_listen_is_required_under_swarm_and_refused_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_labvisor"))
            .arg("supervise")
            .args(args)
            .arg("--sut-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--runtime", "swarm"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--runtime swarm with the managed broker needs --agent-listen IP"),
        "{err}"
    );
    let (code, err) = run(&["--agent-listen", "10.0.0.1"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--agent-listen is for --runtime swarm"),
        "{err}"
    );
}
