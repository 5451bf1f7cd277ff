//! Lab operations end to end: `labvisor offline`, `online` and `maintenance` against real agent
//! containers under `labvisor supervise` with its managed broker (the CLI logs in as the local
//! tools' login, which the managed ACL lets write `+/admin`).
//!
//! An offline SUT refuses a new job naming the reason, lets the running job finish `passed`,
//! keeps the queued one until it is online again, and shows the reason in `labvisor status`,
//! `/metrics` and Docker's health log; it stays offline across `docker restart`, a recreation
//! (file edit) and a supervisor killed and started again. Maintenance also stops the device
//! process (gone from the container's process list, also after a restart) until `online`.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{ps, wait_healthy, write};
use labvisor_tests::{
    docker_ok, ensure_busybox_image, free_port, static_bin, wait_until, DockerScope, KillOnDrop,
    Subscriber, BUSYBOX_IMAGE,
};
use serde_json::Value;

const T: Duration = Duration::from_secs(40);

/// A SUT whose device process is `sleep 86399` (easy to find in `docker top`), with fast
/// health timings; `env` adds an environment table (a change recreates the container).
fn sut_text(env: &str) -> String {
    format!(
        "image = \"{BUSYBOX_IMAGE}\"\ncommand = [\"/bin/sleep\", \"86399\"]\nenv = {{ {env} }}\n[health]\nheartbeat = \"500ms\"\nmax_age = \"3s\"\ninterval = \"1s\"\ntimeout = \"500ms\"\nretries = 2\nstart_period = \"0s\"\n"
    )
}

/// One test's lab: a SUT directory, a supervisor with its managed broker, its metrics port.
struct Lab {
    sup: Option<KillOnDrop>,
    scope: DockerScope,
    dir: tempfile::TempDir,
    port: u16,
    metrics: u16,
}

impl Lab {
    fn new(test: &str, sut: &str) -> Lab {
        ensure_busybox_image();
        let scope = DockerScope::new(test);
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sut")).unwrap();
        write(
            &dir.path().join("sut"),
            &format!("{sut}.toml"),
            &sut_text(""),
        );
        let mut lab = Lab {
            sup: None,
            scope,
            dir,
            port: free_port(),
            metrics: free_port(),
        };
        lab.supervise();
        lab
    }

    fn sut_dir(&self) -> PathBuf {
        self.dir.path().join("sut")
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("supervisor.log")).unwrap_or_default()
    }

    /// Starts `labvisor supervise` (appending to the same log).
    fn supervise(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("supervisor.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_labvisor"))
            .arg("supervise")
            .arg("--sut-dir")
            .arg(self.sut_dir())
            .args(["--id", self.scope.run_id()])
            .args(["--name-prefix", &self.scope.name("")])
            .args(["--extra-label", &self.scope.label()])
            .args(["--stop-timeout", "2s"])
            .args(["--broker-port", &self.port.to_string()])
            .args(["--metrics-listen", &format!("127.0.0.1:{}", self.metrics)])
            .arg("--state-dir")
            .arg(self.state())
            .arg("--agent-bin")
            .arg(static_bin("labvisor-agent"))
            .arg("--healthcheck-bin")
            .arg(static_bin("labvisor-healthcheck"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.sup = Some(KillOnDrop(child));
    }

    /// SIGKILLs the supervisor alone (its managed broker lives on until the next start).
    fn kill_supervisor(&mut self) {
        if let Some(mut s) = self.sup.take() {
            let _ = s.0.kill();
            let _ = s.0.wait();
        }
    }

    /// `labvisor <args>` as a local tool of this lab's supervisor.
    fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_labvisor"))
            .args(args)
            .env("LABVISOR_STATE_DIR", self.state())
            .env("LABVISOR_BROKER", format!("mqtt://127.0.0.1:{}", self.port))
            .env_remove("LABVISOR_TOPIC_PREFIX")
            .env_remove("LABVISOR_MQTT_USERNAME")
            .env_remove("LABVISOR_MQTT_PASSWORD")
            .output()
            .unwrap()
    }

    /// `labvisor <args>`, which must exit 0; its stdout.
    fn cli_ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert_eq!(
            o.status.code(),
            Some(0),
            "labvisor {args:?}: {}{}\n--- supervisor log ---\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            self.log()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `mosquitto_sub` of `topic` with the local login, once the broker takes it.
    fn sub(&self, topic: &str) -> Subscriber {
        let password = wait_until("the managed broker's local password", T, || {
            std::fs::read_to_string(self.state().join("local-password")).ok()
        });
        let auth = ["-u", "labvisor.local", "-P", password.trim(), "-q", "1"];
        Subscriber::start(self.port, topic, &auth)
    }

    /// The agent statuses `sub` (subscribed to `<sut>/agent`) has seen, oldest first.
    fn statuses(sub: &Subscriber, sut: &str) -> Vec<Value> {
        let prefix = format!("{sut}/agent ");
        sub.lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l.strip_prefix(&prefix)?).ok())
            .collect()
    }

    /// The `/metrics` text, if the supervisor serves it.
    fn metrics(&self) -> Option<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        Some(text.split_once("\r\n\r\n")?.1.to_owned())
    }

    fn container(&self, sut: &str) -> String {
        self.scope.name(sut)
    }

    /// What `docker top` lists for the SUT's container.
    fn top(&self, sut: &str) -> String {
        docker_ok(&["top", &self.container(sut)])
    }

    /// The outputs of Docker's health log of the SUT's container (the last five probes).
    fn health_log(&self, sut: &str) -> Vec<String> {
        let json = docker_ok(&[
            "inspect",
            "--format",
            "{{json .State.Health}}",
            &self.container(sut),
        ]);
        let v: Value = serde_json::from_str(&json).unwrap_or_default();
        v["Log"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["ExitCode"] == 0)
            .filter_map(|e| e["Output"].as_str().map(str::to_owned))
            .collect()
    }
}

/// A live status (not `lost` nor `offline`) with `mode` as its admin mode.
fn live_in(s: &Value, mode: &str) -> bool {
    !matches!(s["state"].as_str(), Some("lost" | "offline")) && s["admin"]["mode"] == mode
}

#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn an_offline_sut_refuses_new_jobs_finishes_the_running_one_and_keeps_the_queue() {
    let lab = Lab::new("offline", "of-1");
    let container = wait_healthy(&lab.scope, "of-1", T);
    let sub = lab.sub("of-1/#");
    sub.wait_for("of-1 idle on the broker", T, |l| {
        l.starts_with("of-1/agent ") && l.contains("\"state\":\"idle\"")
    });
    let wait_go = "while [ ! -e /tmp/go ]; do sleep 0.1; done; echo released";
    lab.cli_ok(&[
        "submit",
        "of-1",
        "--id",
        "running-1",
        "--",
        "sh",
        "-c",
        wait_go,
    ]);
    sub.wait_for("running-1 running", T, |l| {
        l.starts_with("of-1/jobs/running-1 ") && l.contains("\"state\":\"running\"")
    });
    lab.cli_ok(&[
        "submit",
        "of-1",
        "--id",
        "queued-1",
        "--",
        "echo",
        "queued ran",
    ]);

    let out = lab.cli_ok(&[
        "offline",
        "of-1",
        "--reason",
        "usb hub flaky",
        "--by",
        "tester",
    ]);
    assert!(
        out.starts_with("of-1: offline: usb hub flaky (since ") && out.contains(" by tester)"),
        "{out}"
    );
    // A new job is refused, naming the reason.
    let o = lab.cli(&["submit", "of-1", "--id", "new-1", "--", "true"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains("rejected the job: the SUT is offline: usb hub flaky"),
        "{err}"
    );
    // The running job finishes and passes; the queued one stays queued.
    docker_ok(&["exec", &container, "touch", "/tmp/go"]);
    let passed = "of-1/jobs/running-1 ";
    sub.wait_for("running-1 passed", T, |l| {
        l.starts_with(passed) && l.contains("\"state\":\"passed\"")
    });
    wait_until("a status after running-1: no job, one queued", T, || {
        let lines = sub.lines();
        let done = lines
            .iter()
            .position(|l| l.starts_with(passed) && l.contains("\"state\":\"passed\""))?;
        lines[done..]
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l.strip_prefix("of-1/agent ")?).ok())
            .find(|s| s["job"].is_null() && s["queue_len"] == 1 && live_in(s, "offline"))
    });
    assert!(
        !sub.lines()
            .iter()
            .any(|l| l.starts_with("of-1/jobs/queued-1 ") && l.contains("running")),
        "queued-1 started while offline"
    );

    // `labvisor status`, /metrics and Docker's health log say why.
    let v: Value = serde_json::from_str(&lab.cli_ok(&["status", "--json"])).unwrap();
    let row = &v["suts"][0];
    assert_eq!(
        (&row["sut"], &row["admin"]["mode"]),
        (&"of-1".into(), &"offline".into()),
        "{v}"
    );
    assert_eq!(row["admin"]["reason"], "usb hub flaky", "{v}");
    let human = lab.cli_ok(&["status"]);
    assert!(
        human.contains("offline: usb hub flaky (by tester, "),
        "{human}"
    );
    let info = r#"labvisor_sut_admin_info{sut="of-1",mode="offline",reason="usb hub flaky",by="tester"} 1"#;
    wait_until("the admin info metric", T, || {
        lab.metrics()?.lines().any(|l| l == info).then_some(())
    });
    let health = wait_until("the reason in Docker's health log", T, || {
        lab.health_log("of-1")
            .into_iter()
            .find(|o| o.starts_with("offline: usb hub flaky; ok: idle"))
    });
    assert!(health.contains("device process running"), "{health}");
    wait_healthy(&lab.scope, "of-1", T);

    // Online: the queued job runs, new jobs are taken again.
    let out = lab.cli_ok(&["online", "of-1", "--by", "tester"]);
    assert!(out.starts_with("of-1: online (since "), "{out}");
    sub.wait_for("queued-1 passed", T, |l| {
        l.starts_with("of-1/jobs/queued-1 ") && l.contains("\"state\":\"passed\"")
    });
    lab.cli_ok(&["submit", "of-1", "--wait", "--", "true"]);
    let online = r#"labvisor_sut_admin_state{sut="of-1",mode="online"} 1"#;
    wait_until("the admin state metric back online", T, || {
        let m = lab.metrics()?;
        (m.lines().any(|l| l == online) && !m.contains("labvisor_sut_admin_info{")).then_some(())
    });
}

#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn offline_survives_docker_restart_recreation_and_a_supervisor_restart() {
    let mut lab = Lab::new("offkeep", "ok-1");
    let first = wait_healthy(&lab.scope, "ok-1", T);
    let sub = lab.sub("ok-1/agent");
    sub.wait_for("ok-1 idle on the broker", T, |l| {
        l.contains("\"state\":\"idle\"")
    });
    let reason = "board sent back to the vendor";
    lab.cli_ok(&["offline", "ok-1", "--reason", reason, "--by", "tester"]);
    let boot_of = |s: &Value| s["boot_id"].as_str().unwrap_or_default().to_owned();
    let boot = boot_of(Lab::statuses(&sub, "ok-1").last().unwrap());
    // An agent run other than `seen` shows it offline, with the reason.
    let offline_in_new_run = |sub: &Subscriber, seen: &[String], what: &str| -> String {
        wait_until(what, T, || {
            Lab::statuses(sub, "ok-1")
                .into_iter()
                .find(|s| {
                    !seen.contains(&boot_of(s))
                        && live_in(s, "offline")
                        && s["admin"]["reason"] == reason
                })
                .map(|s| boot_of(&s))
        })
    };

    // The container restarted: a new agent run on the same volume.
    docker_ok(&["restart", "-t", "2", &lab.container("ok-1")]);
    let restarted = offline_in_new_run(
        &sub,
        std::slice::from_ref(&boot),
        "offline after docker restart",
    );

    // Recreated by a file edit: a new container, the same volume.
    write(&lab.sut_dir(), "ok-1.toml", &sut_text("EDITED = \"1\""));
    wait_until("ok-1 recreated and healthy", T, || {
        let (id, status) = ps(&lab.scope).remove(&lab.container("ok-1"))?;
        (id != first && status.ends_with("(healthy)")).then_some(())
    });
    offline_in_new_run(&sub, &[boot, restarted], "offline after the recreation");

    // The supervisor killed and started again (it replaces its broker too).
    lab.kill_supervisor();
    lab.supervise();
    wait_until("labvisor status: ok-1 still offline", T, || {
        let o = lab.cli(&["status", "--json"]);
        let v: Value = serde_json::from_slice(&o.stdout).ok()?;
        let row = v["suts"]
            .as_array()?
            .iter()
            .find(|r| r["sut"] == "ok-1")?
            .clone();
        (row["state"] == "idle" && row["admin"]["reason"] == reason).then_some(())
    });
    let o = lab.cli(&["submit", "ok-1", "--", "true"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}\n{}", lab.log());
    assert!(err.contains(reason), "{err}");
    // Until someone puts it online.
    lab.cli_ok(&["online", "ok-1"]);
    lab.cli_ok(&["submit", "ok-1", "--wait", "--", "true"]);
}

#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn maintenance_stops_the_device_process_until_online() {
    let lab = Lab::new("maint", "mt-1");
    wait_healthy(&lab.scope, "mt-1", T);
    let device = "86399";
    wait_until("the device process running", T, || {
        lab.top("mt-1").contains(device).then_some(())
    });
    let sub = lab.sub("mt-1/agent");
    let out = lab.cli_ok(&[
        "maintenance",
        "mt-1",
        "--reason",
        "reflashing",
        "--by",
        "tester",
    ]);
    assert!(
        out.starts_with("mt-1: maintenance: reflashing (since "),
        "{out}"
    );
    wait_until("the device process stopped", T, || {
        (!lab.top("mt-1").contains(device)).then_some(())
    });
    let o = lab.cli(&["submit", "mt-1", "--", "true"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains("the SUT is in maintenance: reflashing"),
        "{err}"
    );
    wait_until("maintenance in Docker's health log", T, || {
        lab.health_log("mt-1").into_iter().find(|o| {
            o.starts_with("maintenance: reflashing; ok: idle, device process not running")
        })
    });

    // Restarted in maintenance: the device process is not started at all.
    let boots: Vec<Value> = Lab::statuses(&sub, "mt-1");
    let old = boots.last().unwrap()["boot_id"].clone();
    docker_ok(&["restart", "-t", "2", &lab.container("mt-1")]);
    wait_until("the restarted agent in maintenance", T, || {
        Lab::statuses(&sub, "mt-1").into_iter().find(|s| {
            s["boot_id"] != old && live_in(s, "maintenance") && s["child"]["alive"] == false
        })
    });
    assert!(!lab.top("mt-1").contains(device), "{}", lab.top("mt-1"));
    wait_healthy(&lab.scope, "mt-1", T);

    // Online: it starts again.
    lab.cli_ok(&["online", "mt-1"]);
    wait_until("the device process running again", T, || {
        lab.top("mt-1").contains(device).then_some(())
    });
    lab.cli_ok(&["submit", "mt-1", "--wait", "--", "true"]);
}
