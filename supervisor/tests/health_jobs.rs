//! A health-check job in a real agent container under `labvisor supervise` with its managed
//! broker: the job file is delivered with `files`, the first health check runs at once and
//! fails, the SUT goes offline with its reason (`labvisor status`), `labvisor submit` is refused
//! naming it; `labvisor online` runs a health check first, which passes, and jobs run again.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{wait_healthy, write};
use labvisor_tests::{
    docker_ok, ensure_busybox_image, free_port, static_bin, wait_until, DockerScope, KillOnDrop,
    Subscriber, BUSYBOX_IMAGE,
};
use serde_json::Value;

const T: Duration = Duration::from_secs(40);

/// Fails until `/labvisor/data/healthy` exists in the container.
const HEALTH_CHECK: &str = "if [ -e /labvisor/data/healthy ]; then echo healthy; \
                            else echo the board is sick; exit 3; fi\n";

struct Lab {
    _sup: KillOnDrop,
    scope: DockerScope,
    dir: tempfile::TempDir,
    port: u16,
}

impl Lab {
    fn new(test: &str, sut: &str) -> Lab {
        ensure_busybox_image();
        let scope = DockerScope::new(test);
        let dir = tempfile::tempdir().unwrap();
        let sut_dir = dir.path().join("sut");
        std::fs::create_dir(&sut_dir).unwrap();
        write(&sut_dir, "hc.sh", HEALTH_CHECK);
        let text = format!(
            "image = \"{BUSYBOX_IMAGE}\"\ncommand = [\"/bin/sleep\", \"86399\"]\nfiles = [\"hc.sh\"]\n[health]\nheartbeat = \"500ms\"\nmax_age = \"3s\"\ninterval = \"1s\"\ntimeout = \"500ms\"\nretries = 2\nstart_period = \"0s\"\n[health_check]\njob = \"hc.sh\"\nafter_jobs = 50\n"
        );
        write(&sut_dir, &format!("{sut}.toml"), &text);
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("supervisor.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_labvisor"))
            .arg("supervise")
            .arg("--sut-dir")
            .arg(&sut_dir)
            .args(["--id", scope.run_id()])
            .args(["--name-prefix", &scope.name("")])
            .args(["--extra-label", &scope.label()])
            .args(["--stop-timeout", "2s"])
            .args(["--broker-port", &port.to_string()])
            .args(["--metrics-listen", "none"])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--agent-bin")
            .arg(static_bin("labvisor-agent"))
            .arg("--healthcheck-bin")
            .arg(static_bin("labvisor-healthcheck"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Lab {
            _sup: KillOnDrop(child),
            scope,
            dir,
            port,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("supervisor.log")).unwrap_or_default()
    }

    /// `labvisor <args>` as a local tool of this lab's supervisor.
    fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_labvisor"))
            .args(args)
            .env("LABVISOR_STATE_DIR", self.dir.path().join("state"))
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
        let state = self.dir.path().join("state");
        let password = wait_until("the managed broker's local password", T, || {
            std::fs::read_to_string(state.join("local-password")).ok()
        });
        let auth = ["-u", "labvisor.local", "-P", password.trim(), "-q", "1"];
        Subscriber::start(self.port, topic, &auth)
    }
}

/// The final statuses on `<sut>/last_job` that `sub` saw, in order.
fn finals(sub: &Subscriber, sut: &str) -> Vec<Value> {
    let prefix = format!("{sut}/last_job ");
    sub.lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l.strip_prefix(&prefix)?).ok())
        .filter(|s| s["state"] != "running")
        .collect()
}

#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn a_failing_health_check_takes_the_container_s_sut_offline_until_online_runs_one_that_passes() {
    let lab = Lab::new("healthjob", "hj-1");
    let container = wait_healthy(&lab.scope, "hj-1", T);
    let sub = lab.sub("hj-1/#");
    // The first health check ran at start (none had) and failed.
    let failed = wait_until("the first health check's end", T, || {
        finals(&sub, "hj-1").first().cloned()
    });
    let id = failed["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("health-check-"), "{failed}");
    assert_eq!(
        (&failed["state"], &failed["health_check"]),
        (&"failed".into(), &true.into()),
        "{failed}"
    );
    let reason = format!("health check {id} failed: exit 3");
    let status = wait_until("labvisor status showing the SUT offline", T, || {
        let v: Value = serde_json::from_str(&lab.cli_ok(&["status", "--json"])).ok()?;
        let row = v["suts"][0].clone();
        (row["admin"]["mode"] == "offline").then_some(row)
    });
    assert_eq!(status["admin"]["reason"], reason.as_str(), "{status}");
    assert_eq!(status["admin"]["by"], "health-check", "{status}");
    let o = lab.cli(&["submit", "hj-1", "--", "true"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains(&reason), "{err}");

    // Repaired: online runs a health check first; it passes, and jobs run again.
    docker_ok(&["exec", &container, "touch", "/labvisor/data/healthy"]);
    lab.cli_ok(&["online", "hj-1", "--by", "tester"]);
    lab.cli_ok(&["submit", "hj-1", "--wait", "--", "echo", "after"]);
    let all = finals(&sub, "hj-1");
    let shape: Vec<(bool, &str)> = all
        .iter()
        .map(|s| (s["health_check"] == true, s["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        shape,
        [(true, "failed"), (true, "passed"), (false, "passed")],
        "{all:#?}"
    );
}
