//! Issue 15, "busy is also the device's own work", end to end: the testflinger stand-in's agent
//! runs in a container under a real `labvisor supervise` (a broker on the scope's network
//! gateway), takes a job submitted with the stand-in `testflinger-cli` on the host from the
//! stand-in server, and the SUT file is edited while the job's test phase waits on a marker
//! inside the container. With `device.busy_glob` on the agent's `execution_basedir`, the
//! container is not recreated while the server job runs (before `[device]` it was: the job hung
//! in `test`), the view and `labvisor status` say what the recreation waits for, and it
//! happens once the job is `complete`. With `drain_signal = "SIGUSR1"` the old device takes no
//! second job: it exits after the first, the recreation follows at once, and the new container
//! runs the second job.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use assert_cmd::cargo::CommandCargoExt;
use common::{own_network, ps, tmp_sut_dir, views, wait_healthy, write, Sup};
use labvisor_tests::{
    docker_logs, docker_ok, network_gateway, standin_image, unique_id, wait_until, DockerScope,
    Mosquitto, Subscriber, TfServer, STANDIN_HOST, STANDIN_TOKEN,
};

const T: Duration = Duration::from_secs(30);
const MARKER: &str = "/tmp/labvisor-test-release";

/// One SUT `t` running the stand-in agent against `server`, under a supervisor whose agents
/// reach a broker on their network's gateway. Fields drop in order: the supervisor first, the
/// Docker scope last.
struct Lab {
    _sup: Sup,
    sub: Subscriber,
    broker: Mosquitto,
    dir: std::path::PathBuf,
    _t: tempfile::TempDir,
    server: TfServer,
    scope: DockerScope,
    queue: String,
    sut_text: String,
    /// The agent container.
    id: String,
}

impl Lab {
    /// Starts the lab; `device` is the SUT's `[device]` body. Waits until the container is
    /// healthy and the stand-in registered its queue.
    fn start(test: &str, device: &str) -> Lab {
        let scope = DockerScope::new(test);
        let image = standin_image(&scope);
        let server = TfServer::start();
        let net = own_network(&scope, "labvisor.net");
        let gateway = network_gateway(&net);
        let broker = Mosquitto::start_with(&format!(
            "allow_anonymous true\npersistence false\nlistener {{port}} {gateway}\n"
        ));
        let agent_broker = format!("mqtt://{gateway}:{}", broker.port());
        let sub = broker.subscribe("t/#", &[]);
        let (t, dir) = tmp_sut_dir();
        let queue = unique_id("q");
        write(
            &dir,
            "agent.yaml",
            &format!(
                "agent_id: {queue}-agent\nserver_address: {}\njob_queues: [{queue}]\n\
                 polling_interval: 0.2\nexecution_basedir: /tmp/testflinger/run\n\
                 logging_basedir: /tmp/testflinger/logs\n",
                server.container_url()
            ),
        );
        write(&dir, "token", STANDIN_TOKEN);
        let sut_text = format!(
            r#"image = "{image}"
command = ["testflinger-agent", "-c", "/labvisor/sut/agent.yaml", "--token-file", "/labvisor/sut/token"]
files = ["agent.yaml", "token"]
extra_hosts = ["{STANDIN_HOST}:host-gateway"]
[health]
heartbeat = "1s"
max_age = "5s"
interval = "2s"
timeout = "1s"
start_period = "0s"
[device]
busy_glob = ["/tmp/testflinger/run/*/testflinger.json"]
{device}
"#
        );
        write(&dir, "t.toml", &sut_text);
        let sup = Sup::start(
            &scope,
            &dir,
            Some(&broker.url()),
            &[
                "--agent-broker",
                &agent_broker,
                "--busy-wait",
                "10m",
                "--resync",
                "2s",
            ],
        );
        let id = wait_healthy(&scope, "t", T);
        server.wait_queue(&queue, T);
        Lab {
            _sup: sup,
            sub,
            broker,
            dir,
            _t: t,
            server,
            scope,
            queue,
            sut_text,
            id,
        }
    }

    /// Submits a job with the host's `testflinger-cli` whose test phase runs `cmds`; its id.
    fn submit(&self, name: &str, cmds: &str) -> String {
        let path = self.server.path(name);
        std::fs::write(
            &path,
            format!(
                "job_queue: {}\ntest_data:\n  test_cmds: |\n    {cmds}\n",
                self.queue
            ),
        )
        .unwrap();
        let out = self
            .server
            .cli(&["submit", "--quiet", path.to_str().unwrap()]);
        assert!(out.status.success(), "submit: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A job whose test phase waits for [`MARKER`] inside the container.
    fn submit_waiting(&self, name: &str) -> String {
        self.submit(
            name,
            &format!("while [ ! -e {MARKER} ]; do sleep 0.1; done; echo released"),
        )
    }

    fn wait_state(&self, job: &str, state: &str, limit: Duration) {
        wait_until(&format!("server job {job} in {state}"), limit, || {
            (self.server.job_state(job) == state).then_some(())
        });
    }

    /// Edits `t.toml` (an env change: the container must be recreated) and waits until the
    /// recreation is deferred; returns the pending action.
    fn edit_and_wait_deferral(&self) -> String {
        write(
            &self.dir,
            "t.toml",
            &format!("{}[env]\nEDITED = \"1\"\n", self.sut_text),
        );
        let v = wait_until("the recreation deferred", T, || {
            views(&self.sub, "t")
                .into_iter()
                .rev()
                .find(|v| v.pending_action.is_some())
        });
        assert_eq!(v.container_id.as_deref(), Some(self.id.as_str()));
        v.pending_action.unwrap()
    }

    /// The scope's container of `t` now: (id, status).
    fn container(&self) -> Option<(String, String)> {
        ps(&self.scope).remove(&self.scope.name("t"))
    }

    /// Waits until `t` runs in a new container; returns its id.
    fn wait_recreated(&self, limit: Duration) -> String {
        wait_until("t recreated", limit, || {
            let (new, status) = self.container()?;
            (new != self.id && status.starts_with("Up")).then_some(new)
        })
    }

    /// `labvisor status` against the broker.
    fn status(&self) -> String {
        let out = Command::cargo_bin("labvisor")
            .unwrap()
            .arg("status")
            .env("LABVISOR_BROKER", self.broker.url())
            .env_remove("LABVISOR_TOPIC_PREFIX")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Without a drain signal: the recreation waits for the server job, visibly (view, status,
/// the healthcheck's `--state`), for as long as the job is in `test`, and follows its end.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn an_edit_waits_for_the_devices_own_job() {
    let lab = Lab::start("tfdw-wait", "");
    let job = lab.submit_waiting("job1.yaml");
    lab.wait_state(&job, "test", T);
    let work = format!("/tmp/testflinger/run/{job}/testflinger.json");

    let pending = lab.edit_and_wait_deferral();
    assert!(
        pending.starts_with(&format!("recreate waits for the device's own work: {work}")),
        "{pending}"
    );
    let status = wait_until("labvisor status names the work", T, || {
        let s = lab.status();
        s.contains(&work).then_some(s)
    });
    assert!(
        status.contains("pending: recreate waits for the device's own work"),
        "{status}"
    );
    // The healthcheck's --state (the supervisor's probe without the broker) carries it.
    let state = docker_ok(&[
        "exec",
        &lab.id,
        "/labvisor/bin/labvisor-healthcheck",
        "--state",
    ]);
    assert_eq!(state.trim(), format!("state=busy\ndevice_work={work}"));

    // Several resyncs (2 s) and heartbeats later the container is the same and the job still
    // in its test phase.
    let watch_until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < watch_until {
        let (id, _) = lab.container().expect("t's container");
        assert_eq!(id, lab.id, "recreated while the device's job runs");
        assert_eq!(lab.server.job_state(&job), "test");
    }

    docker_ok(&["exec", &lab.id, "touch", MARKER]);
    lab.wait_state(&job, "complete", T);
    let new = lab.wait_recreated(T);
    let results: serde_json::Value = serde_json::from_str(&lab.server.results(&job)).unwrap();
    assert_eq!(results["test_status"], 0, "{results}");
    wait_until("nothing pending on the new container", T, || {
        views(&lab.sub, "t")
            .into_iter()
            .rev()
            .find(|v| v.container_id.as_deref() == Some(new.as_str()))
            .filter(|v| v.pending_action.is_none())
    });
}

/// With `drain_signal = "SIGUSR1"`: the waiting recreation drains the device, which finishes
/// its job and takes no other; the container is recreated right after, and the second job
/// queued on the server runs in the new one.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn a_drained_device_takes_no_second_job_and_the_recreation_follows_the_first() {
    let lab = Lab::start("tfdw-drain", "drain_signal = \"SIGUSR1\"");
    let first = lab.submit_waiting("job1.yaml");
    lab.wait_state(&first, "test", T);
    let second = lab.submit("job2.yaml", "echo second-job");
    assert_eq!(lab.server.job_state(&second), "waiting");

    let pending = lab.edit_and_wait_deferral();
    assert!(
        pending.starts_with("recreate waits for the device's own work"),
        "{pending}"
    );
    wait_until("the stand-in got SIGUSR1", T, || {
        docker_logs(&lab.id)
            .contains("Received SIGUSR1")
            .then_some(())
    });
    assert_eq!(lab.server.job_state(&first), "test", "the job goes on");

    docker_ok(&["exec", &lab.id, "touch", MARKER]);
    lab.wait_state(&first, "complete", T);
    let done = Instant::now();
    let new = lab.wait_recreated(T);
    assert!(
        done.elapsed() < Duration::from_secs(15),
        "recreated {:?} after the first job ended",
        done.elapsed()
    );
    lab.wait_state(&second, "complete", T);
    let logs = docker_logs(&new);
    assert!(
        logs.contains(&format!("Starting job {second}")),
        "the new container ran the second job: {logs}"
    );
}
