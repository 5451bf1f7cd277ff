//! The testflinger stand-in (`tests/testflinger-standin/`) does what the notes record of the real
//! testflinger server, agent and CLI, so that issue 15's tests can rely on it: each test runs the
//! three roles as local python3 processes on a free port, in a temporary directory removed at the
//! end, with deadlines instead of sleeps.
//!
//! python3 is installed by `tools/test.sh`, not guaranteed in a plain `cargo test` environment:
//! the tests are in the same tier as the mosquitto ones.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use labvisor_tests::{free_port, wait_until, workspace_root, KillOnDrop};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(30);
const TOKEN: &str = "standin-refresh-token";

fn standin() -> PathBuf {
    workspace_root().join("tests/testflinger-standin/testflinger_standin.py")
}

/// A stand-in server on a free port requiring [`TOKEN`], and a directory for everything else.
struct Lab {
    dir: tempfile::TempDir,
    url: String,
    _server: KillOnDrop,
}

impl Lab {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let server = Command::new("python3")
            .arg(standin())
            .args(["server", "--host", "127.0.0.1", "--agent-token", TOKEN])
            .args(["--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("server.err")).expect("server.err"))
            .spawn()
            .expect("start the stand-in server");
        let lab = Lab {
            dir,
            url: format!("http://127.0.0.1:{port}"),
            _server: KillOnDrop(server),
        };
        wait_until("the stand-in server listens", LIMIT, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        std::fs::write(lab.path("token"), TOKEN).expect("token file");
        lab
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts an agent for queue `q1`; `token_file` is passed with `--token-file`.
    fn agent(&self, token_file: &Path, extra_config: &str) -> Agent {
        let config = self.path("agent.yaml");
        std::fs::write(
            &config,
            format!(
                "agent_id: standin-1\nserver_address: {}\njob_queues: [q1]\npolling_interval: 0.1\n\
                 execution_basedir: {}\nlogging_basedir: {}\n\
                 setup_command: echo setup-ran\ncleanup_command: echo cleanup-ran\n{extra_config}",
                self.url.trim_start_matches("http://"),
                self.path("run").display(),
                self.path("logs").display(),
            ),
        )
        .expect("agent config");
        let (out, err) = (self.path("agent.out"), self.path("agent.err"));
        let child =
            Command::new(workspace_root().join("tests/testflinger-standin/testflinger-agent"))
                .arg("-c")
                .arg(&config)
                .arg("--token-file")
                .arg(token_file)
                .stdout(std::fs::File::create(&out).expect("agent.out"))
                .stderr(std::fs::File::create(&err).expect("agent.err"))
                .spawn()
                .expect("start the stand-in agent");
        let agent = Agent {
            child: KillOnDrop(child),
            out,
            err,
        };
        if token_file.is_file() && extra_config.is_empty() {
            self.wait_registered();
        }
        agent
    }

    /// Waits until an agent has registered queue `q1` (before that, `submit` is refused).
    fn wait_registered(&self) {
        wait_until("queue q1 registered", LIMIT, || {
            let addr = self.url.trim_start_matches("http://");
            let mut conn = std::net::TcpStream::connect(addr).ok()?;
            let req = format!("GET /v1/queues/q1/agents HTTP/1.0\r\nHost: {addr}\r\n\r\n");
            conn.write_all(req.as_bytes()).ok()?;
            let mut reply = String::new();
            conn.read_to_string(&mut reply).ok()?;
            reply.starts_with("HTTP/1.0 200").then_some(())
        });
    }

    /// Runs `testflinger-cli ARGS` with the server from TESTFLINGER_SERVER and HOME in the lab.
    fn cli(&self, args: &[&str]) -> Output {
        Command::new(workspace_root().join("tests/testflinger-standin/testflinger-cli"))
            .args(args)
            .env("TESTFLINGER_SERVER", &self.url)
            .env("HOME", self.dir.path())
            .current_dir(self.dir.path())
            .output()
            .expect("run the stand-in CLI")
    }

    /// Writes a job for queue `q1` whose test phase runs `test_cmds`.
    fn job(&self, name: &str, test_cmds: &str) -> String {
        let body: String = test_cmds.lines().map(|l| format!("    {l}\n")).collect();
        let path = self.path(name);
        std::fs::write(
            &path,
            format!("job_queue: q1\ntest_data:\n  test_cmds: |\n{body}"),
        )
        .expect("job file");
        path.display().to_string()
    }

    /// `submit --quiet FILE`: the job id.
    fn submit(&self, file: &str) -> String {
        let out = self.cli(&["submit", "--quiet", file]);
        assert!(out.status.success(), "submit: {out:?}");
        stdout(&out).trim().to_owned()
    }

    fn results(&self, job_id: &str) -> Value {
        let out = self.cli(&["results", job_id]);
        assert!(out.status.success(), "results: {out:?}");
        serde_json::from_slice(&out.stdout).expect("results prints JSON")
    }

    fn status(&self, job_id: &str) -> String {
        stdout(&self.cli(&["status", job_id])).trim().to_owned()
    }

    fn wait_state(&self, job_id: &str, state: &str) {
        wait_until(&format!("job {job_id} in state {state}"), LIMIT, || {
            (self.status(job_id) == state).then_some(())
        });
    }

    /// A marker file the jobs below wait for, so the test decides when a phase ends.
    fn marker(&self) -> String {
        self.path("release").display().to_string()
    }
}

struct Agent {
    child: KillOnDrop,
    out: PathBuf,
    err: PathBuf,
}

impl Agent {
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), sig).expect("signal the agent");
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn wait_exit(&mut self) -> ExitStatus {
        wait_until("the agent exits", LIMIT, || {
            self.child.try_wait().ok().flatten()
        })
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `testflinger-cli submit --poll FILE` to its end, within the deadline.
fn submit_poll(lab: &Lab, file: &str) -> Output {
    let mut child =
        Command::new(workspace_root().join("tests/testflinger-standin/testflinger-cli"))
            .args(["submit", "--poll", file])
            .env("TESTFLINGER_SERVER", &lab.url)
            .env("HOME", lab.dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run submit --poll");
    wait_until("submit --poll ends", LIMIT, || {
        child.try_wait().ok().flatten()
    });
    child.wait_with_output().expect("submit --poll output")
}

fn job_id_of(out: &Output) -> String {
    let text = stdout(out);
    let line = text.lines().find_map(|l| l.strip_prefix("job_id: "));
    line.unwrap_or_else(|| panic!("no job_id in {text}"))
        .to_owned()
}

#[test]
#[ignore = "needs python3: tools/test.sh runs it"]
fn a_passing_job_runs_its_phases_and_the_agent_logs_only_to_stderr() {
    let lab = Lab::start();
    let agent = lab.agent(&lab.path("token"), "");
    let out = submit_poll(&lab, &lab.job("job.yaml", "echo hello-from-test"));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout(&out).contains("hello-from-test"), "{out:?}");
    let id = job_id_of(&out);
    let r = lab.results(&id);
    assert_eq!(r["job_state"], "complete", "{r}");
    assert_eq!(r["setup_status"], 0, "{r}");
    assert_eq!(r["test_status"], 0, "{r}");
    assert_eq!(r["cleanup_status"], 0, "{r}");
    assert_eq!(r["test_output"], "hello-from-test\n", "{r}");
    assert_eq!(r["cleanup_output"], "cleanup-ran\n", "{r}");
    assert!(
        r.get("provision_status").is_none(),
        "no provision_data: skipped: {r}"
    );
    // The agent's stdout stays empty; its log (stderr and the log file) never holds phase output.
    assert_eq!(std::fs::read_to_string(&agent.out).unwrap(), "");
    let err = agent.stderr();
    assert!(err.contains(&format!("Starting job {id}")), "{err}");
    assert!(!err.contains("hello-from-test"), "{err}");
    let logfile = std::fs::read_to_string(lab.path("logs/testflinger-agent.log")).unwrap();
    assert!(logfile.contains(&format!("Starting job {id}")), "{logfile}");
    // The CLI keeps its history under $HOME/.config.
    assert!(lab.path(".config/testflinger-cli-history.json").is_file());
}

#[test]
#[ignore = "needs python3: tools/test.sh runs it"]
fn a_failed_test_phase_still_exits_0_and_results_show_the_phase_status() {
    let lab = Lab::start();
    let _agent = lab.agent(&lab.path("token"), "");
    let out = submit_poll(&lab, &lab.job("job.yaml", "echo boom\nexit 3"));
    assert_eq!(out.status.code(), Some(0), "as the real CLI: {out:?}");
    let r = lab.results(&job_id_of(&out));
    assert_eq!(r["test_status"], 3, "{r}");
    assert_eq!(r["job_state"], "complete", "{r}");
    assert_eq!(r["cleanup_status"], 0, "cleanup always runs: {r}");
}

#[test]
#[ignore = "needs python3: tools/test.sh runs it"]
fn submit_to_a_queue_no_agent_has_registered_exits_1() {
    let lab = Lab::start();
    let out = lab.cli(&["submit", &lab.job("job.yaml", "true")]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Queue 'q1' does not exist"),
        "{out:?}"
    );
}

#[test]
#[ignore = "needs python3: tools/test.sh runs it"]
fn cancel_ends_the_server_job_and_stops_its_phase() {
    let lab = Lab::start();
    let mut agent = lab.agent(&lab.path("token"), "");
    let id = lab.submit(&lab.job("job.yaml", "echo started\nexec sleep 60"));
    lab.wait_state(&id, "test");
    let out = lab.cli(&["cancel", &id]);
    assert!(out.status.success(), "{out:?}");
    wait_until("the agent finishes the cancelled job", LIMIT, || {
        agent
            .stderr()
            .contains(&format!("Job {id} finished"))
            .then_some(())
    });
    assert_eq!(lab.status(&id), "cancelled");
    let r = lab.results(&id);
    assert_eq!(
        r["job_state"], "cancelled",
        "not overwritten by complete: {r}"
    );
    assert_ne!(r["test_status"], 0, "{r}");
    assert_eq!(r["cleanup_status"], 0, "{r}");
    assert!(!lab.path("run").join(&id).exists());
    assert_eq!(
        lab.cli(&["cancel", &id]).status.code(),
        Some(1),
        "a done job"
    );
    assert!(agent.alive());
}

#[test]
#[ignore = "needs python3: tools/test.sh runs it"]
fn phase_logs_exist_while_the_job_runs_and_are_deleted_after_upload() {
    let lab = Lab::start();
    let _agent = lab.agent(&lab.path("token"), "");
    let marker = lab.marker();
    let cmds = format!("echo line-1\nwhile [ ! -e {marker} ]; do sleep 0.05; done\necho line-2");
    let id = lab.submit(&lab.job("job.yaml", &cmds));
    let rundir = lab.path("run").join(&id);
    wait_until("test.log holds the first line", LIMIT, || {
        let log = std::fs::read_to_string(rundir.join("test.log")).ok()?;
        log.contains("line-1").then_some(())
    });
    assert_eq!(
        std::fs::read_to_string(rundir.join("setup.log")).unwrap(),
        "setup-ran\n"
    );
    let job: Value =
        serde_json::from_str(&std::fs::read_to_string(rundir.join("testflinger.json")).unwrap())
            .unwrap();
    assert_eq!(job["job_id"], id.as_str());
    std::fs::write(&marker, "").unwrap();
    wait_until("the job's directory is removed", LIMIT, || {
        (!rundir.exists()).then_some(())
    });
    let r = lab.results(&id);
    assert_eq!(
        r["test_output"], "line-1\nline-2\n",
        "uploaded before deletion: {r}"
    );
    assert_eq!(r["job_state"], "complete", "{r}");
}

#[test]
#[ignore = "needs python3: tools/test.sh runs it"]
fn sigterm_during_a_phase_stops_only_the_phase_and_the_agent_carries_on() {
    let lab = Lab::start();
    let mut agent = lab.agent(&lab.path("token"), "");
    let id = lab.submit(&lab.job("job.yaml", "echo started\nexec sleep 60"));
    lab.wait_state(&id, "test");
    agent.signal(Signal::SIGTERM);
    lab.wait_state(&id, "complete");
    let r = lab.results(&id);
    assert_eq!(
        r["test_status"], -15,
        "the phase command was terminated: {r}"
    );
    assert_eq!(r["cleanup_status"], 0, "{r}");
    assert!(agent.alive(), "{}", agent.stderr());
    let out = submit_poll(&lab, &lab.job("next.yaml", "echo next"));
    assert_eq!(lab.results(&job_id_of(&out))["test_status"], 0);
    // Idle and not PID 1, the agent stops on SIGTERM.
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait_exit().code(), Some(0));
}

#[test]
#[ignore = "needs python3: tools/test.sh runs it"]
fn sigusr1_exits_after_the_current_job() {
    let lab = Lab::start();
    let mut agent = lab.agent(&lab.path("token"), "");
    let marker = lab.marker();
    let cmds = format!("while [ ! -e {marker} ]; do sleep 0.05; done");
    let first = lab.submit(&lab.job("first.yaml", &cmds));
    lab.wait_state(&first, "test");
    let second = lab.submit(&lab.job("second.yaml", "true"));
    agent.signal(Signal::SIGUSR1);
    wait_until("the agent notes the restart", LIMIT, || {
        agent.stderr().contains("Received SIGUSR1").then_some(())
    });
    assert!(agent.alive());
    assert_eq!(lab.status(&first), "test");
    std::fs::write(&marker, "").unwrap();
    assert_eq!(agent.wait_exit().code(), Some(0));
    assert_eq!(lab.results(&first)["test_status"], 0);
    assert_eq!(lab.status(&first), "complete");
    assert_eq!(lab.status(&second), "waiting", "not taken after SIGUSR1");
}

#[test]
#[ignore = "needs python3: tools/test.sh runs it"]
fn without_a_readable_token_the_agent_logs_it_and_gets_403_on_every_poll() {
    let lab = Lab::start();
    let mut agent = lab.agent(&lab.path("no-such-token"), "");
    let err = wait_until("two refused polls", LIMIT, || {
        let err = agent.stderr();
        (err.matches("403 Client Error").count() >= 2).then_some(err)
    });
    assert!(err.contains("Failed to read token file"), "{err}");
    assert!(
        err.contains("Agent not authorized to request jobs."),
        "{err}"
    );
    assert!(err.contains("/v1/job?queue=q1"), "{err}");
    assert!(agent.alive(), "alive but useless");
    // Its queue never registers: a submit is refused as for a queue without agents.
    assert_eq!(
        lab.cli(&["submit", &lab.job("job.yaml", "true")])
            .status
            .code(),
        Some(1)
    );
}

#[test]
#[ignore = "needs python3: tools/test.sh runs it"]
fn an_unknown_config_key_makes_the_agent_exit_0_at_once() {
    let lab = Lab::start();
    let mut agent = lab.agent(&lab.path("token"), "no_such_key: 1\n");
    assert_eq!(agent.wait_exit().code(), Some(0));
    let err = agent.stderr();
    assert!(err.contains("extra keys not allowed"), "{err}");
}

/// The lab fixture of the end-to-end tests: the stand-in installed in an agent image reaches the
/// server on the host by the name `tfserver` (`--add-host tfserver:host-gateway`) and registers
/// its queue with the token from a file.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn the_standin_image_reaches_the_server_on_the_host_by_name() {
    use labvisor_tests::{docker_ok, standin_image, DockerScope, TfServer, STANDIN_TOKEN};
    let scope = DockerScope::new("tf-image");
    let server = TfServer::start();
    let image = standin_image(&scope);
    let config = format!(
        "agent_id: a1\\nserver_address: {}\\njob_queues: [\"q-image\"]\\npolling_interval: 1\\n",
        server.container_url()
    );
    let script = format!(
        "printf '{config}' > /tmp/a.yaml && printf '{STANDIN_TOKEN}' > /tmp/token && \
         exec testflinger-agent -c /tmp/a.yaml --token-file /tmp/token"
    );
    docker_ok(&[
        "run",
        "-d",
        "--init",
        "--label",
        &scope.label(),
        "--name",
        &scope.name("agent"),
        "--add-host",
        "tfserver:host-gateway",
        &image,
        "sh",
        "-c",
        &script,
    ]);
    server.wait_queue("q-image", LIMIT);
}

/// The device connector, as the phase commands of a real agent config call it
/// (`testflinger-device-connector TYPE PHASE -c CONFIG testflinger.json`): `runtest` runs the
/// job's `test_data.test_cmds` with the config's `env` and exits with their status; every other
/// phase does nothing, as `noprovision`.
#[test]
#[ignore = "needs python3: tools/test.sh runs it"]
fn the_device_connector_runs_test_cmds_with_the_configs_env() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("dev_snappy.yaml");
    std::fs::write(&cfg, "device_ip: 10.0.0.7\nenv:\n  DEVICE_IP: 10.0.0.7\n").unwrap();
    let job = dir.path().join("testflinger.json");
    std::fs::write(
        &job,
        r#"{"job_queue":"q","test_data":{"test_cmds":"echo on $DEVICE_IP\nexit 4\n"}}"#,
    )
    .unwrap();
    let connector = workspace_root().join("tests/testflinger-standin/testflinger-device-connector");
    let run = |phase: &str| {
        Command::new(&connector)
            .args(["noprovision", phase, "-c"])
            .arg(&cfg)
            .arg(&job)
            .output()
            .unwrap()
    };
    let o = run("runtest");
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "on 10.0.0.7\n");
    for phase in ["provision", "reserve"] {
        let o = run(phase);
        assert_eq!(o.status.code(), Some(0), "{phase}: {o:?}");
    }
}
