//! The swarm-50 benchmark's driver (`bench/lvbench/figures/swarm_50.py`, run by
//! `tools/bench.sh --only swarm-50`): the cold start of N SUTs under `labvisor supervise
//! --runtime swarm` against a sequential loop of `POST /services/create` with the same spec, in
//! the same run, on a simulated swarm (`labvisor_tests::Swarm`: node containers, each its own
//! Docker engine, never the machine's engine).
//!
//! `swarm_cold_start --supervisor BIN --agent-bin BIN --healthcheck-bin BIN --boot-bin BIN
//!  [--n 50] [--rounds 3] [--nodes 3] [--interval 10s]`
//!
//! A round is one labvisor trial and one baseline trial, in the order L B, then B L, then L B…
//! (so drift hits both alike):
//! - labvisor: every config and secret on the swarm removed first (a cold start: the binaries'
//!   configs are made again), N SUT files written, the supervisor started (managed broker on the
//!   swarm network's gateway, a fresh state directory); timed from its spawn until each of its N
//!   services has a task in state `running` (polled on the manager every 100 ms), and until
//!   `labvisor status --json` shows all N idle and healthy. Its CPU time (utime + stime) and peak
//!   RSS (VmHWM) come from /proc at both instants. One service's spec is kept (`GET
//!   /services/<id>`), the supervisor stopped (SIGTERM) and its services removed.
//! - baseline: N copies of the last kept spec, created one after the other through bollard
//!   (`POST /services/create`) as a script would; each copy is the kept spec with the SUT's name
//!   replaced by the copy's (service name, labels, hostname, volume, environment), so the image,
//!   command, healthcheck, configs (the ones labvisor made, still present), secret, mounts,
//!   resources and restart policy are labvisor's own. Timed from just before the first create
//!   until each has a `running` task; then removed.
//!
//! After each trial the services are removed and the driver waits until the swarm lists no task
//! and no node holds a container, and removes the SUTs' volumes on every node.
//!
//! Prints one JSON object per line: `{"scope": LABEL}` first (every node container, volume and
//! network on the machine's engine carries it; the scope removes them on exit, also on panic),
//! then one per trial. Exits non-zero (a panic) when a trial fails.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bollard::models::ServiceSpec;
use bollard::query_parameters::{
    InspectServiceOptions, ListConfigsOptions, ListSecretsOptions, ListServicesOptions,
    ListTasksOptions,
};
use bollard::Docker;
use clap::Parser;
use labvisor_tests::{free_port, wait_until, DockerScope, KillOnDrop, Swarm, BUSYBOX_IMAGE};

/// The cold start of N SUTs on a simulated swarm, labvisor against a `POST /services/create`
/// loop of the same spec.
#[derive(Parser)]
struct Args {
    /// The static `labvisor` binary.
    #[arg(long)]
    supervisor: PathBuf,
    /// The static agent.
    #[arg(long)]
    agent_bin: PathBuf,
    /// The static healthcheck.
    #[arg(long)]
    healthcheck_bin: PathBuf,
    /// The boot binary.
    #[arg(long)]
    boot_bin: PathBuf,
    /// SUTs (and baseline services) per trial.
    #[arg(long, default_value_t = 50)]
    n: usize,
    /// Rounds, each one labvisor and one baseline trial.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Nodes of the swarm (node1 the manager).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// The SUTs' `[health] interval`. At 2 s, 50 probes (each a `docker exec` through a nested
    /// engine) saturate 2 cores: probes time out and Swarm replaces healthy tasks in a cascade,
    /// which is then what a trial measures.
    #[arg(long, default_value = "10s")]
    interval: String,
    /// Seconds a trial may take to reach its goal.
    #[arg(long, default_value_t = 240)]
    limit: u64,
}

/// How long a teardown may take to finish.
const LIMIT: Duration = Duration::from_secs(240);
/// The polling period of the manager's task list.
const POLL: Duration = Duration::from_millis(100);
/// The SUT label (`io.labvisor.sut`).
const LABEL_SUT: &str = "io.labvisor.sut";
/// The supervisor label (`io.labvisor.supervisor`).
const LABEL_SUPERVISOR: &str = "io.labvisor.supervisor";
/// The label the baseline's copies carry in place of the supervisor's id.
const BASELINE: &str = "sbench-baseline";

/// A job-only SUT: busybox, the agent's heartbeat every second, Docker's probe every `interval`.
fn sut_text(interval: &str) -> String {
    format!(
        "image = \"{BUSYBOX_IMAGE}\"\n[health]\nheartbeat = \"1s\"\nmax_age = \"60s\"\ninterval = \"{interval}\"\ntimeout = \"1s\"\nretries = 1\nstart_period = \"0s\"\n"
    )
}

/// The SUT names of a labvisor trial: `lvbNNN`, a string found nowhere else in a spec.
fn sut_name(i: usize) -> String {
    format!("lvb{i:03}")
}

/// The name of the baseline's copy `i`.
fn copy_name(i: usize) -> String {
    format!("cpy{i:03}")
}

fn emit(v: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{v}").expect("stdout");
    out.flush().expect("stdout");
}

/// CPU seconds (utime + stime) and peak RSS in KiB of process `pid`.
fn proc_usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // USER_HZ: /proc counts in 1/100 s on Linux.
    let hz = 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (ticks as f64 / hz, hwm)
}

struct Bench {
    args: Args,
    scope: DockerScope,
    swarm: Swarm,
    rt: tokio::runtime::Runtime,
    docker: Docker,
    tmp: tempfile::TempDir,
    /// The spec of one service labvisor made (its SUT's name in `sut`), for the baseline.
    kept: Option<(String, serde_json::Value)>,
}

impl Bench {
    fn limit(&self) -> Duration {
        Duration::from_secs(self.args.limit)
    }

    fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Service id → name of the services whose label `key` is `value`.
    fn services(&self, key: &str, value: &str) -> HashMap<String, String> {
        let filters = HashMap::from([("label".to_owned(), vec![format!("{key}={value}")])]);
        let opts = ListServicesOptions {
            filters: Some(filters),
            ..Default::default()
        };
        self.block(self.docker.list_services(Some(opts)))
            .expect("list services")
            .into_iter()
            .filter_map(|s| Some((s.id?, s.spec?.name?)))
            .collect()
    }

    /// How many of the services labelled `key=value` have a task in state `running`.
    fn running(&self, key: &str, value: &str) -> usize {
        let services = self.services(key, value);
        let filters = HashMap::from([("desired-state".to_owned(), vec!["running".to_owned()])]);
        let opts = ListTasksOptions {
            filters: Some(filters),
        };
        let tasks = self
            .block(self.docker.list_tasks(Some(opts)))
            .expect("list tasks");
        let up: HashSet<String> = tasks
            .into_iter()
            .filter(|t| {
                t.status
                    .as_ref()
                    .and_then(|s| s.state)
                    .is_some_and(|s| s == bollard::models::TaskState::RUNNING)
            })
            .filter_map(|t| t.service_id)
            .filter(|id| services.contains_key(id))
            .collect();
        up.len()
    }

    /// Waits until `n` services labelled `key=value` have a running task; the seconds since `t0`.
    fn until_running(
        &self,
        key: &str,
        value: &str,
        t0: Instant,
        alive: &mut dyn FnMut(bool),
    ) -> f64 {
        let n = self.args.n;
        let deadline = t0 + self.limit();
        loop {
            alive(false);
            let up = self.running(key, value);
            let at = t0.elapsed();
            if up >= n {
                return at.as_secs_f64();
            }
            if Instant::now() >= deadline {
                alive(true);
                let tasks = self.swarm.docker(self.swarm.manager(), &["node", "ls"]);
                let services = self.swarm.docker(self.swarm.manager(), &["service", "ls"]);
                panic!(
                    "only {up} of {n} services labelled {key}={value} running after {:?}\n{}\n{}{}",
                    self.limit(),
                    String::from_utf8_lossy(&services.stdout),
                    String::from_utf8_lossy(&tasks.stdout),
                    String::from_utf8_lossy(&tasks.stderr),
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Removes every service, waits until no task is listed and no node holds a container, then
    /// removes the SUTs' volumes on every node.
    fn remove_services(&self) {
        let all = self
            .block(self.docker.list_services(None::<ListServicesOptions>))
            .expect("list services");
        for s in all {
            if let Some(id) = s.id {
                let _ = self.block(self.docker.delete_service(&id));
            }
        }
        wait_until("the swarm lists no task", LIMIT, || {
            let tasks = self
                .block(self.docker.list_tasks(None::<ListTasksOptions>))
                .ok()?;
            tasks.is_empty().then_some(())
        });
        for node in self.swarm.hostnames() {
            wait_until(&format!("{node} holds no container"), LIMIT, || {
                self.swarm
                    .docker_ok(&node, &["ps", "-aq"])
                    .is_empty()
                    .then_some(())
            });
            let vols = self.swarm.docker_ok(
                &node,
                &[
                    "volume",
                    "ls",
                    "-q",
                    "--filter",
                    &format!("label={LABEL_SUT}"),
                ],
            );
            let vols: Vec<&str> = vols.split_whitespace().collect();
            if !vols.is_empty() {
                let mut a = vec!["volume", "rm"];
                a.extend(vols);
                self.swarm.docker_ok(&node, &a);
            }
        }
    }

    /// Removes every config and secret on the swarm (all were made by this run).
    fn remove_configs(&self) {
        let configs = self
            .block(self.docker.list_configs(None::<ListConfigsOptions>))
            .expect("list configs");
        for c in configs.into_iter().filter_map(|c| c.id) {
            self.block(self.docker.delete_config(&c))
                .expect("remove config");
        }
        let secrets = self
            .block(self.docker.list_secrets(None::<ListSecretsOptions>))
            .expect("list secrets");
        for s in secrets.into_iter().filter_map(|s| s.id) {
            self.block(self.docker.delete_secret(&s))
                .expect("remove secret");
        }
    }

    fn labvisor(&mut self, round: usize) {
        self.remove_configs();
        let dir = self.tmp.path().join(format!("l{round}"));
        let sut_dir = dir.join("sut");
        std::fs::create_dir_all(&sut_dir).expect("sut dir");
        let text = sut_text(&self.args.interval);
        for i in 0..self.args.n {
            std::fs::write(sut_dir.join(format!("{}.toml", sut_name(i))), &text).expect("sut");
        }
        let id = format!("{}-l{round}", self.scope.run_id());
        let port = free_port();
        let state = dir.join("state");
        let log = dir.join("supervisor.log");
        let t0 = Instant::now();
        let child = Command::new(&self.args.supervisor)
            .arg("supervise")
            .args(["--runtime", "swarm"])
            .args(["--agent-listen", self.swarm.gateway()])
            .arg("--sut-dir")
            .arg(&sut_dir)
            .args(["--id", &id])
            .args(["--extra-label", &self.scope.label()])
            .args(["--broker-port", &port.to_string()])
            .args(["--metrics-listen", "none"])
            .args(["--stop-timeout", "2s"])
            .arg("--state-dir")
            .arg(&state)
            .arg("--agent-bin")
            .arg(&self.args.agent_bin)
            .arg("--healthcheck-bin")
            .arg(&self.args.healthcheck_bin)
            .arg("--boot-bin")
            .arg(&self.args.boot_bin)
            .env("DOCKER_HOST", self.swarm.manager_url())
            .env("LABVISOR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn the supervisor");
        let mut sup = KillOnDrop(child);
        let pid = sup.id();
        let log_tail = |log: &Path| {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        let mut alive = |dump: bool| {
            if let Ok(Some(st)) = sup.0.try_wait() {
                panic!("the supervisor exited ({st}):\n{}", log_tail(&log));
            }
            if dump {
                eprintln!("--- supervisor log ---\n{}", log_tail(&log));
            }
        };
        let running = self.until_running(LABEL_SUPERVISOR, &id, t0, &mut alive);
        let (cpu_running, rss_running) = proc_usage(pid);
        let n = self.args.n;
        let deadline = t0 + self.limit();
        // Not reaching it is a result (reported as `healthy_s: null` with the count), not a
        // failure of the harness: the running figure and the baseline still stand.
        let (healthy, healthy_count) = loop {
            alive(false);
            let ok = status_rows(&self.args.supervisor, port, &state);
            let at = t0.elapsed();
            if ok >= n {
                break (Some(at.as_secs_f64()), ok);
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "only {ok} of {n} SUTs idle and healthy after {:?}:\n{}",
                    self.limit(),
                    log_tail(&log)
                );
                break (None, ok);
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        let (cpu_healthy, rss_healthy) = proc_usage(pid);
        // Keep one service's spec for the baseline.
        let sut = sut_name(0);
        let services = self.services(LABEL_SUT, &sut);
        let sid = services.keys().next().expect("a service of lvb000").clone();
        let svc = self
            .block(
                self.docker
                    .inspect_service(&sid, None::<InspectServiceOptions>),
            )
            .expect("inspect service");
        let spec = serde_json::to_value(svc.spec.expect("spec")).expect("spec json");
        self.kept = Some((sut, spec));
        let pidn = nix::unistd::Pid::from_raw(pid as i32);
        nix::sys::signal::kill(pidn, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let st = sup.0.wait().expect("wait");
        assert!(st.success(), "supervisor stop: {st}:\n{}", log_tail(&log));
        emit(serde_json::json!({
            "round": round, "kind": "labvisor", "n": n,
            "running_s": running, "healthy_s": healthy, "healthy_count": healthy_count,
            "cpu_running_s": cpu_running, "rss_running_kib": rss_running,
            "cpu_healthy_s": cpu_healthy, "rss_peak_kib": rss_healthy,
        }));
        self.remove_services();
    }

    fn baseline(&self, round: usize) {
        let (sut, spec) = self.kept.clone().expect("a labvisor trial ran first");
        let text = spec.to_string();
        let specs: Vec<ServiceSpec> = (0..self.args.n)
            .map(|i| {
                let mut v: serde_json::Value =
                    serde_json::from_str(&text.replace(&sut, &copy_name(i))).expect("json");
                for path in ["/Labels", "/TaskTemplate/ContainerSpec/Labels"] {
                    if let Some(labels) = v.pointer_mut(path) {
                        labels[LABEL_SUPERVISOR] = serde_json::Value::from(BASELINE);
                    }
                }
                serde_json::from_value(v).expect("service spec")
            })
            .collect();
        let t0 = Instant::now();
        for s in specs {
            let name = s.name.clone().unwrap_or_default();
            self.block(self.docker.create_service(s, None))
                .unwrap_or_else(|e| panic!("create service {name}: {e}"));
        }
        let created = t0.elapsed().as_secs_f64();
        let running = self.until_running(LABEL_SUPERVISOR, BASELINE, t0, &mut |_| {});
        emit(serde_json::json!({
            "round": round, "kind": "baseline", "n": self.args.n,
            "created_s": created, "running_s": running,
        }));
        self.remove_services();
    }
}

/// How many rows of `labvisor status --json` are idle and healthy, once a supervisor is online.
fn status_rows(bin: &Path, port: u16, state: &Path) -> usize {
    let Ok(out) = Command::new(bin)
        .args(["status", "--json"])
        .args(["--broker", &format!("mqtt://127.0.0.1:{port}")])
        .env("LABVISOR_STATE_DIR", state)
        .stderr(Stdio::null())
        .output()
    else {
        return 0;
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return 0;
    };
    let online = v["supervisors"]
        .as_array()
        .is_some_and(|s| s.iter().any(|s| s["state"] == "online"));
    if !online {
        return 0;
    }
    v["suts"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter(|r| r["state"] == "idle" && r["health"] == "healthy")
                .count()
        })
        .unwrap_or(0)
}

fn main() {
    let args = Args::parse();
    labvisor_tests::ensure_busybox_image();
    let scope = DockerScope::new("swarm50");
    emit(serde_json::json!({ "scope": scope.label() }));
    let t = Instant::now();
    let swarm = Swarm::start(&scope, args.nodes);
    swarm.load_image(BUSYBOX_IMAGE);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let docker = rt.block_on(async {
        Docker::connect_with_http(&swarm.manager_url(), 120, bollard::API_DEFAULT_VERSION)
            .expect("connect")
            .negotiate_version()
            .await
            .expect("negotiate")
    });
    emit(serde_json::json!({
        "swarm": { "nodes": args.nodes, "ready_s": swarm.started_in().as_secs_f64(),
                   "with_image_s": t.elapsed().as_secs_f64() } }));
    let mut b = Bench {
        args,
        scope,
        swarm,
        rt,
        docker,
        tmp: tempfile::tempdir().expect("tempdir"),
        kept: None,
    };
    for round in 0..b.args.rounds {
        if round % 2 == 0 {
            b.labvisor(round);
            b.baseline(round);
        } else {
            b.baseline(round);
            b.labvisor(round);
        }
    }
}
