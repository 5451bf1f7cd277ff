//! `labvisor supervise` against a real Docker engine and a real mosquitto.
//!
//! Every test runs its own supervisor process with a unique `--id`, `--name-prefix` and
//! `--extra-label` (its [`DockerScope`]), so tests never see each other's containers and
//! everything is removed by label when the scope drops. Agents run without a broker
//! (`--agent-broker none`): they still write heartbeats, so Docker's health checks pass. The
//! `--busy-wait` test is the exception: its agent runs a real job, over a mosquitto that also
//! listens on the network's gateway.

use std::process::Command;
use std::time::{Duration, Instant};

use labvisor_protocol::payloads::{
    AgentState, AgentStatus, Health, JobState, JobStatus, SupervisorState, SupervisorStatus,
};
mod common;

use common::{fast_sut, own_network, ps, tmp_sut_dir, views, wait_healthy, write, Sup};
use labvisor_tests::{
    docker, docker_ok, ensure_busybox_image, network_gateway, wait_until, DockerScope, Mosquitto,
    Subscriber, BUSYBOX_IMAGE,
};

/// A SUT file with fast health timings; `marker` changes its hash.
fn sut_file(marker: &str) -> String {
    let extra = format!(
        "[env]\nMARKER = \"{marker}\"\n[restart]\nbackoff_min = \"1s\"\nbackoff_max = \"4s\"\n"
    );
    fast_sut(BUSYBOX_IMAGE, &extra)
}

/// [`sut_file`] with `files = ["<sut>.yaml"]`: delivered by an upload, not inline.
fn sut_file_with_files(sut: &str, marker: &str) -> String {
    sut_file(marker).replacen(
        "[health]",
        &format!("files = [\"{sut}.yaml\"]\n[health]"),
        1,
    )
}

fn inspect(id: &str, format: &str) -> String {
    docker_ok(&["inspect", "--format", format, id])
}

const T: Duration = Duration::from_secs(30);

#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn add_edit_delete_files() {
    ensure_busybox_image();
    let scope = DockerScope::new("files");
    let (_t, dir) = tmp_sut_dir();
    write(&dir, "a.toml", &sut_file("1"));
    write(&dir, "b.yaml", "k: 1\n");
    write(&dir, "b.toml", &sut_file_with_files("b", "1"));
    let _sup = Sup::start(&scope, &dir, None, &[]);

    // Added: running and healthy, with the contract's labels, files and volume.
    let a1 = wait_healthy(&scope, "a", T);
    let b1 = wait_healthy(&scope, "b", T);
    assert_eq!(
        inspect(&a1, "{{index .Config.Labels \"io.labvisor.sut\"}}"),
        "a"
    );
    assert_eq!(
        inspect(
            &a1,
            "{{.HostConfig.Init}} {{.HostConfig.RestartPolicy.Name}}"
        ),
        "true unless-stopped"
    );
    // a has no `files`: its SUT file comes inline in the environment, nothing is uploaded.
    assert_eq!(
        docker_ok(&["exec", &a1, "sh", "-c", "echo \"$LABVISOR_CONFIG_TOML\""]),
        sut_file("1").trim_end()
    );
    assert!(!docker(&["exec", &a1, "test", "-e", "/labvisor/sut"])
        .status
        .success());
    // b has: its SUT file and its files are uploaded.
    assert_eq!(
        docker_ok(&["exec", &b1, "cat", "/labvisor/sut/b.toml"]),
        sut_file_with_files("b", "1").trim_end()
    );
    assert_eq!(
        docker_ok(&["exec", &b1, "cat", "/labvisor/sut/b.yaml"]),
        "k: 1"
    );
    assert!(docker(&[
        "exec",
        &b1,
        "sh",
        "-c",
        "test -z \"${LABVISOR_CONFIG_TOML+set}\""
    ])
    .status
    .success());
    // The heartbeat lives on a tmpfs that any image user can write.
    for id in [&a1, &b1] {
        assert_eq!(
            docker_ok(&[
                "exec",
                id,
                "sh",
                "-c",
                "stat -c %a /labvisor/run; grep ' /labvisor/run ' /proc/mounts | cut -d' ' -f3"
            ]),
            "1777\ntmpfs"
        );
    }
    let mut mounts: Vec<String> = inspect(
        &a1,
        "{{range .Mounts}}{{.Type}}:{{.Name}}:{{.Destination}}:{{.RW}} {{end}}",
    )
    .split_whitespace()
    .map(str::to_owned)
    .collect();
    mounts.sort();
    let tools = format!("{}{}.", scope.name("labvisor.tools."), scope.run_id());
    assert_eq!(mounts.len(), 2, "{mounts:?}");
    assert_eq!(
        mounts[0],
        format!(
            "volume:{}:/labvisor/data:true",
            scope.name("labvisor.sut.a")
        )
    );
    assert!(
        mounts[1].starts_with(&format!("volume:{tools}"))
            && mounts[1].ends_with(":/labvisor/bin:false"),
        "the binaries come from the read-only tools volume: {mounts:?}"
    );
    // Both agents share the one tools volume; its fill helper is gone.
    let b_mounts = inspect(&b1, "{{range .Mounts}}{{.Name}} {{end}}");
    let tools_name = mounts[1].split(':').nth(1).unwrap();
    assert!(b_mounts.contains(tools_name), "{b_mounts}");
    assert!(
        !docker_ok(&["ps", "-a", "--format", "{{.Names}}"]).contains(&format!("{tools_name}.fill")),
        "the fill helper is removed"
    );
    // The agent cannot write the shared binaries.
    assert!(!docker(&["exec", &a1, "touch", "/labvisor/bin/x"])
        .status
        .success());

    // Edited: recreated (new id); the other SUT is untouched.
    write(&dir, "a.toml", &sut_file("2"));
    let a2 = wait_until("a recreated", T, || {
        let (id, status) = ps(&scope).remove(&scope.name("a"))?;
        (id != a1 && status.starts_with("Up")).then_some(id)
    });
    assert_eq!(
        ps(&scope)[&scope.name("b")].0,
        b1,
        "b must keep its container"
    );
    // Only b's listed file changes: that changes b's hash too.
    write(&dir, "b.yaml", "k: 2\n");
    let b2 = wait_until("b recreated", T, || {
        let (id, status) = ps(&scope).remove(&scope.name("b"))?;
        (id != b1 && status.starts_with("Up")).then_some(id)
    });
    assert_eq!(
        docker_ok(&["exec", &b2, "cat", "/labvisor/sut/b.yaml"]),
        "k: 2"
    );
    assert_eq!(
        ps(&scope)[&scope.name("a")].0,
        a2,
        "a must keep its container"
    );

    // Deleted: removed, the volume is kept.
    std::fs::remove_file(dir.join("a.toml")).unwrap();
    wait_until("a removed", T, || {
        (!ps(&scope).contains_key(&scope.name("a"))).then_some(())
    });
    assert!(
        docker(&["volume", "inspect", &scope.name("labvisor.sut.a")])
            .status
            .success()
    );
    assert!(ps(&scope).contains_key(&scope.name("b")));
}

#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn invalid_file_and_foreign_container_are_left_alone() {
    ensure_busybox_image();
    let scope = DockerScope::new("invalid");
    let broker = Mosquitto::start();
    let sub = broker.subscribe("+/supervisor", &[]);
    let (_t, dir) = tmp_sut_dir();
    // A foreign container (only the test's cleanup label) holds c's name.
    let foreign = docker_ok(&[
        "run",
        "-d",
        "--pull",
        "never",
        "--name",
        &scope.name("c"),
        "--label",
        &scope.label(),
        BUSYBOX_IMAGE,
        "sleep",
        "300",
    ]);
    write(&dir, "a.toml", &sut_file("1"));
    write(&dir, "c.toml", &sut_file("1"));
    let _sup = Sup::start(&scope, &dir, Some(&broker.url()), &[]);
    let a1 = wait_healthy(&scope, "a", T);

    // The conflict is reported, the foreign container untouched.
    let v = wait_until("c reports a conflict", T, || {
        views(&sub, "c").into_iter().find(|v| {
            v.last_error
                .as_deref()
                .is_some_and(|e| e.contains("conflict"))
        })
    });
    assert_eq!(v.container_id, None);
    let (id, status) = ps(&scope).remove(&scope.name("c")).unwrap();
    assert_eq!(id, foreign);
    assert!(status.starts_with("Up"), "{status}");
    assert_eq!(
        inspect(&foreign, "{{.RestartCount}} {{.State.Running}}"),
        "0 true"
    );

    // An invalid file keeps its container as it is, and its problems are published.
    write(&dir, "a.toml", "image = \"\"\n");
    let v = wait_until("a's problems published", T, || {
        views(&sub, "a")
            .into_iter()
            .find(|v| !v.config_problems.is_empty())
    });
    assert!(v.config_problems[0].contains("image"), "{v:?}");
    assert_eq!(v.container_id.as_deref(), Some(a1.as_str()));
    assert_eq!(ps(&scope)[&scope.name("a")].0, a1);
    assert_eq!(inspect(&a1, "{{.State.Running}}"), "true");
}

/// Every supervisor status on `topic` that `sub` has seen, in order.
fn supervisor_statuses(sub: &Subscriber, topic: &str) -> Vec<SupervisorStatus> {
    let prefix = format!("{topic} ");
    sub.lines()
        .iter()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|p| serde_json::from_str(p).ok())
        .collect()
}

#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn sigkilled_supervisor_adopts_its_containers() {
    ensure_busybox_image();
    let scope = DockerScope::new("adopt");
    let broker = Mosquitto::start();
    let status_topic = format!("labvisor/supervisors/{}/status", scope.run_id());
    let sub = broker.subscribe(&status_topic, &[]);
    let (_t, dir) = tmp_sut_dir();
    for s in ["a", "b", "c"] {
        write(&dir, &format!("{s}.toml"), &sut_file("1"));
    }
    let mut sup = Sup::start(&scope, &dir, Some(&broker.url()), &[]);
    let before: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|s| wait_healthy(&scope, s, T))
        .collect();
    sup.kill();
    // A container of SUT d left `created` (as by a supervisor killed mid-create).
    write(&dir, "d.toml", &sut_file("1"));
    let half = docker_ok(&[
        "create",
        "--name",
        &scope.name("d"),
        "--label",
        &scope.label(),
        "--label",
        "io.labvisor.managed-by=labvisor",
        "--label",
        &format!("io.labvisor.supervisor={}", scope.run_id()),
        "--label",
        "io.labvisor.sut=d",
        "--label",
        "io.labvisor.config-hash=unknown",
        BUSYBOX_IMAGE,
        "true",
    ]);
    let statuses = |sub: &Subscriber| supervisor_statuses(sub, &status_topic);
    let first_boot = statuses(&sub)[0].boot_id.clone();

    let mut sup2 = Sup::start(&scope, &dir, Some(&broker.url()), &[]);
    let d = wait_healthy(&scope, "d", T);
    assert_ne!(d, half, "the half-made container is replaced");
    wait_until("the new supervisor online with 4 healthy", T, || {
        statuses(&sub)
            .into_iter()
            .find(|s| s.boot_id != first_boot && s.suts.healthy == Some(4))
    });
    let now = ps(&scope);
    assert_eq!(now.len(), 4, "no duplicates: {now:?}");
    for (s, id) in ["a", "b", "c"].iter().zip(&before) {
        assert_eq!(&now[&scope.name(s)].0, id, "{s} adopted, not recreated");
    }

    // SIGTERM: offline status, agents keep running.
    labvisor_tests::run_ok(Command::new("kill").args(["-TERM", &sup2.child.id().to_string()]));
    let exit = sup2.child.wait().unwrap();
    assert!(exit.success(), "{exit}\n{}", sup2.log());
    wait_until("offline status", T, || {
        statuses(&sub)
            .into_iter()
            .find(|s| s.state == SupervisorState::Offline)
    });
    let after = ps(&scope);
    assert_eq!(after.len(), 4);
    assert!(
        after.values().all(|(_, st)| st.starts_with("Up")),
        "{after:?}"
    );
}

/// SIGSTOPs the agent of container `id` from the host (PID 1 is docker-init): it hangs.
fn stop_agent(id: &str) {
    let top = docker_ok(&["top", id, "-eo", "pid,args"]);
    let pid = top
        .lines()
        .filter_map(|l| l.trim().split_once(' '))
        .find(|(_, args)| {
            args.trim_start()
                .starts_with("/labvisor/bin/labvisor-agent")
        })
        .map(|(pid, _)| pid)
        .unwrap_or_else(|| panic!("no agent in {top}"))
        .to_owned();
    labvisor_tests::run_ok(Command::new("kill").args(["-STOP", &pid]));
}

/// The engine goes away behind a proxy (every connection closed, the event stream too) and
/// comes back: the supervisor keeps running and says so in its status, a SUT added meanwhile is
/// created once the engine is back, the running agent is adopted as it was, and the event stream
/// is open again: with `--resync 1h`, only a `health_status` event can get a hung agent
/// restarted.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn docker_unreachable_then_back_is_reported_and_reconciled() {
    ensure_busybox_image();
    let scope = DockerScope::new("dockerdown");
    let broker = Mosquitto::start();
    let status_topic = format!("labvisor/supervisors/{}/status", scope.run_id());
    let sub = broker.subscribe(&status_topic, &[]);
    let statuses = || supervisor_statuses(&sub, &status_topic);
    let proxy = labvisor_tests::DockerProxy::start();
    let (_t, dir) = tmp_sut_dir();
    write(&dir, "a.toml", &sut_file("1"));
    let docker_host = format!("DOCKER_HOST={}", proxy.url());
    let mut sup = Sup::start_wrapped(
        &["env", &docker_host],
        &scope,
        &dir,
        Some(&broker.url()),
        &["--resync", "1h"],
    );
    let a1 = wait_healthy(&scope, "a", T);
    let seen = statuses().len();

    proxy.cut();
    wait_until("status: docker unreachable", T, || {
        statuses()[seen..]
            .iter()
            .find(|s| !s.docker_reachable)
            .cloned()
    });
    write(&dir, "b.toml", &sut_file("1"));
    let down = wait_until("b seen while docker is unreachable", T, || {
        statuses()
            .pop()
            .filter(|s| !s.docker_reachable && s.suts.desired == 2)
    });
    // What runs is unknown while the engine cannot be asked: not zero.
    assert_eq!(
        (down.suts.running, down.suts.healthy, down.suts.unhealthy),
        (None, None, None),
        "{down:?}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_labvisor"))
        .arg("status")
        .env("LABVISOR_BROKER", broker.url())
        .env_remove("LABVISOR_TOPIC_PREFIX")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("supervisor {}:", scope.run_id())))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains(
            "docker UNREACHABLE, 2 SUTs desired, running unknown, healthy unknown, 0 invalid files"
        ),
        "{line}"
    );
    assert!(
        sup.child.try_wait().unwrap().is_none(),
        "the supervisor keeps running"
    );
    assert!(!ps(&scope).contains_key(&scope.name("b")));

    proxy.restore();
    wait_healthy(&scope, "b", Duration::from_secs(60));
    wait_until("status: docker reachable, 2 healthy", T, || {
        statuses()
            .pop()
            .filter(|s| s.docker_reachable && s.suts.healthy == Some(2))
    });
    assert_eq!(ps(&scope)[&scope.name("a")].0, a1, "a adopted as it was");
    assert!(sup.log().contains("Docker is reachable again."));

    let started = inspect(&a1, "{{.State.StartedAt}}");
    stop_agent(&a1);
    wait_until("the hung agent restarted", Duration::from_secs(40), || {
        (inspect(&a1, "{{.State.StartedAt}}") != started).then_some(())
    });
    sup.kill();
}

#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn hung_agent_is_restarted() {
    ensure_busybox_image();
    let scope = DockerScope::new("hung");
    let broker = Mosquitto::start();
    let sub = broker.subscribe("+/supervisor", &[]);
    let (_t, dir) = tmp_sut_dir();
    write(&dir, "h.toml", &sut_file("1"));
    let _sup = Sup::start(&scope, &dir, Some(&broker.url()), &[]);
    let id = wait_healthy(&scope, "h", T);
    let started = inspect(&id, "{{.State.StartedAt}}");
    stop_agent(&id);
    wait_until("the hung agent restarted", Duration::from_secs(40), || {
        (inspect(&id, "{{.State.StartedAt}}") != started).then_some(())
    });
    wait_healthy(&scope, "h", T);
    assert_eq!(
        ps(&scope)[&scope.name("h")].0,
        id,
        "restarted, not recreated"
    );
    wait_until("restarts published", T, || {
        views(&sub, "h").into_iter().find(|v| v.restarts >= 1)
    });
}

#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn thirty_suts_cold_start() {
    ensure_busybox_image();
    let scope = DockerScope::new("cold");
    let (_t, dir) = tmp_sut_dir();
    let names: Vec<String> = (0..30).map(|i| format!("s{i:02}")).collect();
    for n in &names {
        write(&dir, &format!("{n}.toml"), &sut_file("1"));
    }
    let t0 = Instant::now();
    let _sup = Sup::start(&scope, &dir, None, &[]);
    wait_until("30 containers running", Duration::from_secs(90), || {
        let ps = ps(&scope);
        (names
            .iter()
            .filter(|n| {
                ps.get(&scope.name(n))
                    .is_some_and(|(_, s)| s.starts_with("Up"))
            })
            .count()
            == 30)
            .then_some(())
    });
    let running = t0.elapsed();
    wait_until("30 containers healthy", Duration::from_secs(90), || {
        let ps = ps(&scope);
        (names
            .iter()
            .filter(|n| {
                ps.get(&scope.name(n))
                    .is_some_and(|(_, s)| s.ends_with("(healthy)"))
            })
            .count()
            == 30)
            .then_some(())
    });
    eprintln!(
        "cold start of 30 SUTs: all running after {running:?}, all healthy after {:?}",
        t0.elapsed()
    );
    assert_eq!(ps(&scope).len(), 30);
}

/// A broker the agents reach: mosquitto listening on the gateway of the supervisor's network,
/// which is made first (labelled as the supervisor's own, so the supervisor adopts it). Returns
/// the broker and the URL to give agents (`--agent-broker`).
fn gateway_broker(scope: &DockerScope) -> (Mosquitto, String) {
    let net = own_network(scope, "labvisor.net");
    let gateway = network_gateway(&net);
    let broker = Mosquitto::start_with(&format!(
        "allow_anonymous true\npersistence false\nlistener {{port}} {gateway}\n"
    ));
    let url = format!("mqtt://{gateway}:{}", broker.port());
    (broker, url)
}

/// One SUT `j` whose real agent runs jobs over a broker on the network's gateway
/// ([`gateway_broker`]), under a supervisor started with `--busy-wait` and `--resync`; `j/#`
/// is subscribed. Fields drop in order: the supervisor first, the Docker scope last.
struct JobSut {
    _sup: Sup,
    sub: Subscriber,
    broker: Mosquitto,
    dir: std::path::PathBuf,
    _t: tempfile::TempDir,
    scope: DockerScope,
    /// The agent container.
    id: String,
}

impl JobSut {
    /// Starts it and waits until the agent is healthy and idle on the broker.
    fn start(test: &str, busy_wait: &str, resync: &str) -> JobSut {
        ensure_busybox_image();
        let scope = DockerScope::new(test);
        let (broker, agent_broker) = gateway_broker(&scope);
        let sub = broker.subscribe("j/#", &[]);
        let (t, dir) = tmp_sut_dir();
        write(&dir, "j.toml", &sut_file("1"));
        let sup = Sup::start(
            &scope,
            &dir,
            Some(&broker.url()),
            &[
                "--agent-broker",
                &agent_broker,
                "--busy-wait",
                busy_wait,
                "--resync",
                resync,
            ],
        );
        let id = wait_healthy(&scope, "j", T);
        let j = JobSut {
            _sup: sup,
            sub,
            broker,
            dir,
            _t: t,
            scope,
            id,
        };
        wait_until("the agent idle on the broker", T, || {
            j.agent_statuses()
                .into_iter()
                .find(|s| s.state == AgentState::Idle)
        });
        j
    }

    fn agent_statuses(&self) -> Vec<AgentStatus> {
        self.sub
            .lines()
            .iter()
            .filter_map(|l| l.strip_prefix("j/agent "))
            .filter_map(|p| serde_json::from_str(p).ok())
            .collect()
    }

    fn job_states(&self, job: &str) -> Vec<JobStatus> {
        let prefix = format!("j/jobs/{job} ");
        self.sub
            .lines()
            .iter()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(|p| serde_json::from_str(p).ok())
            .collect()
    }

    /// Submits `script` as job `job` and waits until the agent says it runs it.
    fn run_job(&self, job: &str, script: &str) -> AgentStatus {
        let payload = serde_json::json!({"id": job, "script": script}).to_string();
        let out = self.broker.publish("j/submit", &payload, &["-q", "1"]);
        assert!(out.status.success());
        wait_until("the agent busy with the job", T, || {
            self.agent_statuses().into_iter().find(|s| {
                s.state == AgentState::Busy && s.job.as_ref().is_some_and(|j| j.as_str() == job)
            })
        })
    }

    /// Edits `j.toml` and waits until its recreation is deferred; returns the pending action.
    fn edit_and_wait_deferral(&self) -> String {
        write(&self.dir, "j.toml", &sut_file("2"));
        let v = wait_until("recreation deferred", T, || {
            views(&self.sub, "j")
                .into_iter()
                .find(|v| v.pending_action.is_some())
        });
        assert_eq!(v.container_id.as_deref(), Some(self.id.as_str()));
        v.pending_action.unwrap()
    }

    /// Waits, up to `limit`, until `j` runs in a new container; returns its id.
    fn wait_recreated(&self, what: &str, limit: Duration) -> String {
        wait_until(what, limit, || {
            let (new, status) = ps(&self.scope).remove(&self.scope.name("j"))?;
            (new != self.id && status.starts_with("Up")).then_some(new)
        })
    }
}

/// A busy agent's recreation waits for its job, visibly; and it still waits when the broker
/// goes down in the middle, where the supervisor's view of the agent is stale: it asks the
/// agent itself through Docker, so the container is recreated once the job is over, not
/// before (the job ends `passed` in the agent's journal, not `lost`), and not only when the
/// busy wait (an hour here) runs out. Reconciling went on without the broker; once it is back,
/// the supervisor's view is published again.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn busy_agent_defers_recreation_also_while_the_broker_is_down() {
    let mut j = JobSut::start("busy", "1h", "2s");
    let job = Duration::from_secs(12);
    j.run_job("short", &format!("sleep {}", job.as_secs()));
    let busy_seen = Instant::now();
    assert!(j.edit_and_wait_deferral().starts_with("recreate"));

    // The broker goes away while the job runs: no more news from the agent over MQTT.
    j.broker.stop();
    let new = j.wait_recreated("recreated once the job is over", job + T);
    assert!(
        busy_seen.elapsed() >= job - Duration::from_secs(2),
        "recreated {:?} after the job was seen running, a {job:?} job",
        busy_seen.elapsed()
    );
    let journal = docker_ok(&["exec", &new, "cat", "/labvisor/data/jobs/journal.jsonl"]);
    let outcome = journal
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["op"] == "finished" && e["status"]["id"] == "short")
        .map(|e| e["status"]["state"].as_str().unwrap_or_default().to_owned())
        .collect::<Vec<_>>();
    assert_eq!(outcome, ["passed"], "{journal}");

    // The broker is back (empty: no persistence): the supervisor publishes its view again,
    // with the new container and nothing pending, and the new agent connects.
    j.broker.restart();
    let after = j.broker.subscribe("j/#", &[]);
    wait_until("j's view republished after the broker's return", T, || {
        views(&after, "j")
            .into_iter()
            .find(|v| v.container_id.as_deref() == Some(new.as_str()) && v.pending_action.is_none())
    });
    after.wait_for("the new agent's status", T, |l| {
        l.starts_with("j/agent ") && l.contains("\"state\":\"idle\"")
    });
}

/// Runs the rest of its command line in a new user namespace (mapped to the caller, so Docker's
/// socket and the files are reached as before) whose inotify instance limit is 0: there
/// `inotify_init` fails, so the supervisor's directory watch can only be `--poll`'s.
const NO_INOTIFY: &[&str] = &[
    "unshare",
    "--user",
    "--map-root-user",
    "sh",
    "-c",
    "echo 0 > /proc/sys/user/max_inotify_instances && exec \"$@\"",
    "no-inotify",
];

/// Waits until the supervisor's view of `sut` shows the container `id` healthy: the pass that
/// followed the container's last Docker event is over, so only the directory watch (or the
/// resync) can start another one.
fn wait_settled(sub: &Subscriber, sut: &str, id: &str) {
    wait_until(&format!("{sut}'s view healthy on {id}"), T, || {
        views(sub, sut)
            .last()
            .filter(|v| v.container_id.as_deref() == Some(id) && v.health == Health::Healthy)
            .map(|_| ())
    });
}

/// `--poll` (NFS and other mounts where inotify never fires): with inotify unavailable and the
/// periodic resync an hour away, an added, an edited and a deleted file are still acted on.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn poll_mode_sees_changes_without_inotify() {
    ensure_busybox_image();
    let scope = DockerScope::new("poll");
    let broker = Mosquitto::start();
    let sub = broker.subscribe("+/supervisor", &[]);
    let (_t, dir) = tmp_sut_dir();
    let no_resync = ["--resync", "1h"];

    // The premise: in that namespace, the inotify watch cannot even start.
    let control = Sup::start_wrapped(NO_INOTIFY, &scope, &dir, None, &no_resync);
    wait_until("the inotify watch refused without --poll", T, || {
        control
            .log()
            .contains("Cannot watch the SUT directory")
            .then_some(())
    });
    drop(control);

    // A SUT present from the start (created by the first pass) shows the supervisor is up.
    write(&dir, "base.toml", &sut_file("1"));
    let _sup = Sup::start_wrapped(
        NO_INOTIFY,
        &scope,
        &dir,
        Some(&broker.url()),
        &["--poll", no_resync[0], no_resync[1]],
    );
    let base = wait_healthy(&scope, "base", T);
    wait_settled(&sub, "base", &base);

    // Added: created and running.
    write(&dir, "a.toml", &sut_file("1"));
    let a1 = wait_healthy(&scope, "a", T);
    wait_settled(&sub, "a", &a1);

    // Edited: recreated (new id).
    write(&dir, "a.toml", &sut_file("2"));
    let a2 = wait_until("a recreated", T, || {
        let (id, status) = ps(&scope).remove(&scope.name("a"))?;
        (id != a1 && status.ends_with("(healthy)")).then_some(id)
    });
    assert_eq!(
        inspect(&a2, "{{range .Config.Env}}{{println .}}{{end}}")
            .lines()
            .find(|l| l.starts_with("MARKER=")),
        Some("MARKER=2")
    );
    wait_settled(&sub, "a", &a2);

    // Deleted: removed.
    std::fs::remove_file(dir.join("a.toml")).unwrap();
    wait_until("a removed", T, || {
        (!ps(&scope).contains_key(&scope.name("a"))).then_some(())
    });
    assert_eq!(
        ps(&scope)[&scope.name("base")].0,
        base,
        "base must keep its container"
    );
}

/// `--busy-wait`: an agent running a long job defers its recreation, visibly, but only that
/// long; then the container is recreated anyway and the interrupted job is reported `lost`.
/// The agent is real and reaches a real mosquitto on the network's gateway.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn busy_wait_expiry_recreates_anyway_and_the_job_is_lost() {
    let busy_wait = Duration::from_secs(5);
    // No periodic resync: the supervisor's own wake-up at the end of the wait must act.
    let j = JobSut::start("busywait", &format!("{}s", busy_wait.as_secs()), "1h");
    // A job far longer than the busy wait.
    let busy = j.run_job("long", "sleep 600");

    // Edited while busy: the recreation waits, and says for how long at most.
    let edited = Instant::now();
    let pending = j.edit_and_wait_deferral();
    assert!(
        pending.starts_with("recreate (waiting for the running job, at most "),
        "{pending}"
    );

    // The wait runs out while the job still runs: recreated anyway, not before.
    let new = j.wait_recreated("recreated once the busy wait ran out", busy_wait + T);
    let waited = edited.elapsed();
    assert!(
        waited >= busy_wait,
        "recreated {waited:?} after the edit, before the busy wait of {busy_wait:?}"
    );

    // The interrupted job is reported lost, having run at least the busy wait; the new agent
    // is idle and the deferral is over.
    let lost = wait_until("the job reported lost", T, || {
        j.job_states("long")
            .into_iter()
            .find(|s| s.state.is_final())
    });
    assert_eq!(lost.state, JobState::Lost, "{lost:?}");
    assert!(
        lost.duration_ms
            .is_some_and(|d| d >= busy_wait.as_millis() as u64),
        "{lost:?}"
    );
    wait_until("the new agent idle", T, || {
        j.agent_statuses()
            .into_iter()
            .find(|s| s.boot_id != busy.boot_id && s.state == AgentState::Idle)
    });
    wait_until("pending action cleared", T, || {
        views(&j.sub, "j")
            .last()
            .filter(|v| v.pending_action.is_none() && v.container_id.as_deref() == Some(&new))
            .map(|_| ())
    });
}

/// The tools volume: filled once and shared; a fill cut short (no marker) is redone on the next
/// start; an older tools volume of this supervisor is removed once no container uses it.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn tools_volume_is_refilled_when_incomplete_and_old_ones_go() {
    ensure_busybox_image();
    let scope = DockerScope::new("tools");
    let (_t, dir) = tmp_sut_dir();
    let label = scope.label();
    let supervisor_label = format!("io.labvisor.supervisor={}", scope.run_id());
    // A tools volume of this supervisor for binaries with another hash, as an earlier version
    // made it.
    let older_tools_volume = |hash: &str| {
        let name = format!("{}{}.{hash}", scope.name("labvisor.tools."), scope.run_id());
        docker_ok(&[
            "volume",
            "create",
            "--label",
            &label,
            "--label",
            "io.labvisor.managed-by=labvisor",
            "--label",
            &supervisor_label,
            "--label",
            "io.labvisor.role=tools",
            &name,
        ]);
        name
    };
    let old = older_tools_volume("0000000000000000");
    write(&dir, "a.toml", &sut_file("1"));
    let mut sup = Sup::start(&scope, &dir, None, &[]);
    let a1 = wait_healthy(&scope, "a", T);
    let tools = inspect(
        &a1,
        "{{range .Mounts}}{{if eq .Destination \"/labvisor/bin\"}}{{.Name}}{{end}}{{end}}",
    );
    assert!(tools.starts_with(&scope.name("labvisor.tools.")), "{tools}");
    wait_until("the old tools volume removed", T, || {
        (!docker(&["volume", "inspect", &old]).status.success()).then_some(())
    });

    // Cut the fill short: no container uses the volume, and it lost its marker and the agent.
    sup.kill();
    docker_ok(&["rm", "-f", &a1]);
    let wipe = format!("type=volume,source={tools},target=/t");
    docker_ok(&[
        "run",
        "--rm",
        "--label",
        &label,
        "--mount",
        &wipe,
        "--entrypoint",
        "/bin/rm",
        BUSYBOX_IMAGE,
        "/t/.labvisor-tools",
        "/t/labvisor-agent",
    ]);

    // An agent made by an earlier version (an older tools volume, another config hash) is busy
    // with a job when this supervisor starts: its tools volume stays while it is used, and goes
    // as soon as that agent is recreated, not only at the next supervisor start. Its
    // healthcheck is a script that answers `--state` from a file.
    let old2 = older_tools_volume("1111111111111111");
    let old2_mount = format!("type=volume,source={old2},target=/labvisor/bin");
    docker_ok(&[
        "run",
        "--rm",
        "--label",
        &label,
        "--mount",
        &old2_mount,
        "--entrypoint",
        "/bin/sh",
        BUSYBOX_IMAGE,
        "-c",
        "printf '#!/bin/sh\\necho state=$(cat /tmp/state)\\n' > /labvisor/bin/labvisor-healthcheck && chmod 755 /labvisor/bin/labvisor-healthcheck",
    ]);
    let old_b = docker_ok(&[
        "run",
        "-d",
        "--name",
        &scope.name("b"),
        "--label",
        &label,
        "--label",
        "io.labvisor.managed-by=labvisor",
        "--label",
        &supervisor_label,
        "--label",
        "io.labvisor.sut=b",
        "--label",
        "io.labvisor.config-hash=from-an-earlier-version",
        "--mount",
        &old2_mount,
        "--entrypoint",
        "/bin/sh",
        BUSYBOX_IMAGE,
        "-c",
        "echo busy > /tmp/state; exec sleep 600",
    ]);
    assert_eq!(
        docker_ok(&[
            "exec",
            &old_b,
            "/labvisor/bin/labvisor-healthcheck",
            "--state"
        ]),
        "state=busy"
    );
    write(&dir, "b.toml", &sut_file("1"));
    let _sup = Sup::start(&scope, &dir, None, &["--resync", "2s"]);
    let a2 = wait_healthy(&scope, "a", T);
    assert_ne!(a1, a2);
    assert_eq!(
        docker_ok(&["exec", &a2, "cat", "/labvisor/bin/.labvisor-tools"]),
        tools.rsplit('.').next().unwrap(),
        "the marker holds the binaries' hash"
    );
    // a's create made sure of the tools volume and collected the unused ones: not old2.
    assert!(docker(&["volume", "inspect", &old2]).status.success());
    assert_eq!(ps(&scope)[&scope.name("b")].0, old_b, "b waits for its job");

    docker_ok(&["exec", &old_b, "sh", "-c", "echo idle > /tmp/state"]);
    wait_until("b recreated once idle", T, || {
        let (id, status) = ps(&scope).remove(&scope.name("b"))?;
        (id != old_b && status.ends_with("(healthy)")).then_some(())
    });
    wait_until(
        "the older tools volume removed with its last user",
        T,
        || (!docker(&["volume", "inspect", &old2]).status.success()).then_some(()),
    );
}

/// The supervisor remembers the networks and images it has seen, so it does not inspect them
/// for every container; one removed behind its back is made again on the retry.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn a_network_removed_behind_its_back_is_made_again() {
    ensure_busybox_image();
    let scope = DockerScope::new("netgone");
    let (_t, dir) = tmp_sut_dir();
    write(&dir, "a.toml", &sut_file("1"));
    let _sup = Sup::start(&scope, &dir, None, &[]);
    wait_healthy(&scope, "a", T);
    std::fs::remove_file(dir.join("a.toml")).unwrap();
    wait_until("a removed", T, || {
        (!ps(&scope).contains_key(&scope.name("a"))).then_some(())
    });
    let net = scope.name("labvisor.net");
    docker_ok(&["network", "rm", &net]);
    write(&dir, "b.toml", &sut_file("1"));
    let b = wait_healthy(&scope, "b", Duration::from_secs(60));
    assert_eq!(
        inspect(&b, "{{.HostConfig.NetworkMode}}"),
        net,
        "b runs on the labvisor network, made again"
    );
}

/// Lines of `log` that contain every one of `parts`.
fn log_lines(log: &str, parts: &[&str]) -> usize {
    log.lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .count()
}

/// Waits until `sup` has logged `n` more reconcile passes than `before`; returns the count.
fn wait_passes(sup: &Sup, before: usize, n: usize) -> usize {
    wait_until(&format!("{n} more passes"), T, || {
        let now = log_lines(&sup.log(), &["Reconcile pass done."]);
        (now >= before + n).then_some(now)
    })
}

/// Entries of the SUT directory that are no SUT file, and a SUT file that turns invalid, are
/// logged once per change (not on every pass: `--resync 1s` makes a pass a second); the ones
/// that name no SUT (a bad name, a name that is not UTF-8) are on the supervisor's status and
/// shown by `labvisor status`; a directory named `x.toml` is on x's view.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn directory_problems_are_logged_once_per_change_and_published() {
    use std::os::unix::ffi::OsStrExt;
    ensure_busybox_image();
    let scope = DockerScope::new("problems");
    let broker = Mosquitto::start();
    let status_topic = format!("labvisor/supervisors/{}/status", scope.run_id());
    let sub = broker.subscribe(&status_topic, &[]);
    let views_sub = broker.subscribe("+/supervisor", &[]);
    let (_t, dir) = tmp_sut_dir();
    write(&dir, "a.toml", &sut_file("1"));
    write(&dir, "Bad_Name.toml", &sut_file("1"));
    std::fs::create_dir(dir.join("x.toml")).unwrap();
    let latin1 = dir.join(std::ffi::OsStr::from_bytes(b"caf\xe9.toml"));
    std::fs::write(&latin1, sut_file("1")).unwrap();
    let sup = Sup::start(&scope, &dir, Some(&broker.url()), &["--resync", "1s"]);
    wait_healthy(&scope, "a", T);

    let st = wait_until("the status with the file problems", T, || {
        supervisor_statuses(&sub, &status_topic)
            .pop()
            .filter(|s| s.file_problems.len() == 2)
    });
    assert_eq!(st.suts.invalid, 3, "{st:?}");
    assert!(
        st.file_problems[0].contains("Bad_Name.toml: name: "),
        "{:?}",
        st.file_problems
    );
    assert!(
        st.file_problems[1].contains("caf\u{fffd}.toml: name: the file name is not valid UTF-8"),
        "{:?}",
        st.file_problems
    );
    let x = wait_until("x's view", T, || views(&views_sub, "x").pop());
    assert_eq!(x.config_problems.len(), 1, "{x:?}");
    assert!(x.config_problems[0].contains("is a directory"), "{x:?}");

    // `labvisor status` shows them under the supervisor's line.
    let out = Command::new(env!("CARGO_BIN_EXE_labvisor"))
        .arg("status")
        .env("LABVISOR_BROKER", broker.url())
        .env_remove("LABVISOR_TOPIC_PREFIX")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let shown: Vec<&str> = text.lines().filter(|l| l.starts_with("  ")).collect();
    assert_eq!(shown.len(), 2, "{text}");
    assert!(shown[0].contains("Bad_Name.toml: name: "), "{text}");
    assert!(shown[1].contains("not valid UTF-8"), "{text}");

    // Each problem logged once, however many passes follow.
    let passes = wait_passes(&sup, log_lines(&sup.log(), &["Reconcile pass done."]), 3);
    let log = sup.log();
    assert_eq!(
        log_lines(&log, &["names no SUT", "Bad_Name.toml"]),
        1,
        "{log}"
    );
    assert_eq!(
        log_lines(&log, &["names no SUT", "not valid UTF-8"]),
        1,
        "{log}"
    );
    assert_eq!(
        log_lines(&log, &["Invalid SUT file", "sut=x", "is a directory"]),
        1,
        "{log}"
    );

    // A SUT file that turns invalid: logged once; changed problems: logged again; fixed: said.
    write(&dir, "a.toml", "image = \"\"\n");
    let passes = wait_passes(&sup, passes, 3);
    assert_eq!(
        log_lines(&sup.log(), &["Invalid SUT file", "sut=a"]),
        1,
        "{}",
        sup.log()
    );
    write(&dir, "a.toml", "image = 3\n");
    let passes = wait_passes(&sup, passes, 3);
    let log = sup.log();
    assert_eq!(log_lines(&log, &["Invalid SUT file", "sut=a"]), 2, "{log}");
    assert_eq!(
        log_lines(&log, &["Invalid SUT file", "sut=a", "image"]),
        2,
        "{log}"
    );
    write(&dir, "a.toml", &sut_file("1"));
    wait_passes(&sup, passes, 3);
    let log = sup.log();
    assert_eq!(
        log_lines(&log, &["The SUT file is valid again.", "a.toml"]),
        1,
        "{log}"
    );
    assert_eq!(log_lines(&log, &["Invalid SUT file", "sut=a"]), 2, "{log}");
}

/// The first line of `labvisor status` about supervisor `id`.
fn status_line(broker: &Mosquitto, id: &str) -> Option<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_labvisor"))
        .arg("status")
        .env("LABVISOR_BROKER", broker.url())
        .env_remove("LABVISOR_TOPIC_PREFIX")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with(&format!("supervisor {id}:")))
        .map(str::to_owned)
}

/// An idle supervisor (nothing changes, resync an hour away) still republishes its status every
/// `--status-interval`, identical but for its time; and when it hangs (SIGSTOP), `labvisor
/// status` calls it stale after three periods, long before the broker gives up on its link.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn the_status_is_republished_while_idle_and_a_hung_supervisor_is_stale() {
    let scope = DockerScope::new("refresh");
    let broker = Mosquitto::start();
    let status_topic = format!("labvisor/supervisors/{}/status", scope.run_id());
    let sub = broker.subscribe(&status_topic, &[]);
    let (_t, dir) = tmp_sut_dir();
    let sup = Sup::start(
        &scope,
        &dir,
        Some(&broker.url()),
        &["--resync", "1h", "--status-interval", "1s"],
    );
    let got = wait_until("three statuses", T, || {
        let s = supervisor_statuses(&sub, &status_topic);
        (s.len() >= 3).then_some(s)
    });
    let first = &got[0];
    assert_eq!(first.state, SupervisorState::Online);
    assert_eq!(first.refresh_ms, 1000);
    for pair in got.windows(2) {
        let gap = pair[1].time_ms - pair[0].time_ms;
        assert!(gap >= 900, "republished after {gap} ms: {got:?}");
        let mut same = pair[1].clone();
        same.time_ms = pair[0].time_ms;
        assert_eq!(same, pair[0], "only the time changes");
    }
    let line = status_line(&broker, scope.run_id()).unwrap();
    assert!(line.contains(": online, docker reachable"), "{line}");

    let pid = sup.child.id().to_string();
    labvisor_tests::run_ok(Command::new("kill").args(["-STOP", &pid]));
    let stale = wait_until("labvisor status says stale", T, || {
        status_line(&broker, scope.run_id()).filter(|l| l.contains("STALE"))
    });
    labvisor_tests::run_ok(Command::new("kill").args(["-CONT", &pid]));
    assert!(
        stale.contains(": STALE (last said online; its status comes every 1s), docker reachable"),
        "{stale}"
    );
}

/// What the broker retains under `filter`, read as a new subscriber sees it: everything
/// delivered before a retained probe on a private topic subscribed after `filter` (mosquitto
/// sends the retained messages of a subscription's topics in their order).
fn retained(broker: &Mosquitto, filter: &str) -> Vec<String> {
    let probe = format!("lvtest/probe/{}", labvisor_tests::unique_id("p"));
    assert!(broker
        .publish(&probe, "end", &["-r", "-q", "1"])
        .status
        .success());
    let sub = broker.subscribe(filter, &["-t", &probe]);
    let got = wait_until("the probe", T, || {
        let lines = sub.lines();
        let end = lines.iter().position(|l| l.starts_with(&probe))?;
        Some(lines[..end].to_vec())
    });
    assert!(broker
        .publish(&probe, "", &["-r", "-q", "1"])
        .status
        .success());
    got
}

/// A deleted SUT leaves nothing retained on the broker: its agent's `offline` status, its
/// supervisor view, last job, submit status and every job status are cleared, so `labvisor
/// status` no longer lists it and `labvisor jobs` says there is no such SUT. Another SUT's
/// retained topics stay.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn a_deleted_sut_leaves_no_retained_topics() {
    let j = JobSut::start("gone", "1h", "30s");
    for (topic, payload) in [
        ("other/agent", r#"{"state":"idle"}"#),
        ("other/jobs/x1", r#"{"id":"x1"}"#),
    ] {
        assert!(j
            .broker
            .publish(topic, payload, &["-r", "-q", "1"])
            .status
            .success());
    }
    for id in ["done-1", "done-2"] {
        let payload = serde_json::json!({"id": id, "script": "true"}).to_string();
        assert!(j
            .broker
            .publish("j/submit", &payload, &["-q", "1"])
            .status
            .success());
        wait_until(&format!("{id} passed"), T, || {
            j.job_states(id)
                .into_iter()
                .find(|s| s.state == JobState::Passed)
        });
    }
    let before = retained(&j.broker, "j/#");
    let topics = |lines: &[String]| -> Vec<String> {
        let mut t: Vec<String> = lines
            .iter()
            .filter_map(|l| l.split_once(' ').map(|(t, _)| t.to_owned()))
            .collect();
        t.sort();
        t
    };
    assert_eq!(
        topics(&before),
        [
            "j/agent",
            "j/jobs/done-1",
            "j/jobs/done-2",
            "j/last_job",
            "j/submit_status",
            "j/supervisor"
        ],
        "{before:?}"
    );

    std::fs::remove_file(j.dir.join("j.toml")).unwrap();
    wait_until("j's container removed", T, || {
        (!ps(&j.scope).contains_key(&j.scope.name("j"))).then_some(())
    });
    let after = wait_until("nothing of j retained", T, || {
        let r = retained(&j.broker, "j/#");
        r.is_empty().then_some(r)
    });
    assert_eq!(after, Vec::<String>::new());
    // A retained status that arrives late (as a last will the broker fires after the clear
    // would) is cleared as well.
    assert!(j
        .broker
        .publish("j/agent", r#"{"state":"lost"}"#, &["-r", "-q", "1"])
        .status
        .success());
    wait_until("the late status cleared", T, || {
        retained(&j.broker, "j/#").is_empty().then_some(())
    });
    assert_eq!(
        topics(&retained(&j.broker, "other/#")),
        ["other/agent", "other/jobs/x1"],
        "another SUT's retained topics stay"
    );

    let labvisor = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_labvisor"))
            .args(args)
            .env("LABVISOR_BROKER", j.broker.url())
            .env_remove("LABVISOR_TOPIC_PREFIX")
            .output()
            .unwrap()
    };
    let o = labvisor(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let suts: Vec<&str> = v["suts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["sut"].as_str())
        .collect();
    // (other's stand-in payload is no full agent status: status lists no SUT at all.)
    assert_eq!(suts, Vec::<&str>::new(), "{v}");
    let o = labvisor(&["jobs", "j"]);
    assert_eq!(
        o.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
