//! A testflinger lab's health, end to end with the stand-in (`tests/testflinger-standin/`) in
//! real containers under a real `labvisor supervise`: the agent reaches the server on the lab
//! host by name (`extra_hosts = ["tfserver:host-gateway"]`), and an exec probe (`[probe]
//! command`) turns an agent the server refuses unhealthy, with the reason in Docker's health
//! log, in `labvisor status` and on `<sut>/supervisor`, without the supervisor restarting it.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{ps, tmp_sut_dir, views, wait_healthy, write, Sup};
use labvisor_protocol::payloads::Health;
use labvisor_tests::{
    docker, docker_ok, free_port, standin_image, static_bin, wait_until, DockerScope, KillOnDrop,
    Subscriber, TfServer, STANDIN_TOKEN,
};

/// Waits of the tests: the stand-in polls every 0.2 s and the health probes run every second.
const LIMIT: Duration = Duration::from_secs(40);

/// The stand-in agent's config for queue `queue` on `server`, reached by name.
fn agent_yaml(server: &TfServer, queue: &str) -> String {
    format!(
        "agent_id: {queue}-agent\nserver_address: {}\njob_queues: [{queue}]\n\
         polling_interval: 0.2\nexecution_basedir: /tmp/testflinger/run\n\
         logging_basedir: /tmp/testflinger/logs\n",
        server.container_url()
    )
}

/// A SUT running the stand-in agent with its config from `files`, reaching the server as
/// `tfserver`; `token` adds `--token-file` with the token file from `files`; `extra` is
/// appended (more tables).
fn tf_sut(image: &str, token: bool, extra: &str) -> String {
    let (token_arg, token_file) = if token {
        (
            ", \"--token-file\", \"/labvisor/sut/refresh_token\"",
            ", \"refresh_token\"",
        )
    } else {
        ("", "")
    };
    format!(
        r#"image = "{image}"
command = ["testflinger-agent", "-c", "/labvisor/sut/agent.yaml"{token_arg}]
files = ["agent.yaml"{token_file}]
extra_hosts = ["tfserver:host-gateway"]
[health]
heartbeat = "500ms"
max_age = "3s"
interval = "1s"
timeout = "900ms"
retries = 1
start_period = "0s"
{extra}"#
    )
}

/// Writes the agent's files (its config and the right token) into `dir`.
fn agent_files(dir: &Path, server: &TfServer, queue: &str) {
    write(dir, "agent.yaml", &agent_yaml(server, queue));
    write(dir, "refresh_token", STANDIN_TOKEN);
}

/// (a) `extra_hosts = ["tfserver:host-gateway"]` names the server on the lab host: the agent
/// in the container registers its queue at `http://tfserver:<port>`, with no IP in any file.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn an_agent_reaches_the_server_on_the_host_by_name() {
    let scope = DockerScope::new("tf-hosts");
    let server = TfServer::start();
    let image = standin_image(&scope);
    let (_t, dir) = tmp_sut_dir();
    agent_files(&dir, &server, "q-hosts");
    write(&dir, "tf-a.toml", &tf_sut(&image, true, ""));
    let sup = Sup::start(&scope, &dir, None, &[]);
    server.wait_queue("q-hosts", LIMIT);
    let name = scope.name("tf-a");
    let hosts = docker_ok(&["inspect", "-f", "{{.HostConfig.ExtraHosts}}", &name]);
    assert_eq!(hosts.trim(), "[tfserver:host-gateway]", "{}", sup.log());
    assert!(ps(&scope).contains_key(&name));
}

/// The exec probe a testflinger lab uses (the example copies it): the agent's own log says
/// whether its last poll of the server was refused (403: no or a wrong token) or failed (the
/// server unreachable). Its output, the matching lines, is the reason.
const TF_PROBE: &str = r#"[probe]
command = ["sh", "-c", "! tail -n 4 /tmp/testflinger/logs/testflinger-agent.log | grep -E '403|Unable to reach'"]
interval = "1s"
timeout = "900ms"
"#;

/// `labvisor supervise` with its managed broker on `port` (state in `state`): agents publish
/// their status, the supervisor its views.
fn supervise_managed(scope: &DockerScope, dir: &Path, state: &Path, port: u16) -> KillOnDrop {
    let log = dir.parent().unwrap().join("supervisor.log");
    let child = Command::new(env!("CARGO_BIN_EXE_labvisor"))
        .arg("supervise")
        .arg("--sut-dir")
        .arg(dir)
        .args(["--id", scope.run_id()])
        .args(["--name-prefix", &scope.name("")])
        .args(["--extra-label", &scope.label()])
        .args(["--broker-port", &port.to_string()])
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

/// `docker inspect -f FORMAT NAME`, trimmed (empty while there is no such container).
fn inspect(name: &str, format: &str) -> String {
    let out = docker(&["inspect", "-f", format, name]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The `labvisor status --json` row of `sut`.
fn status_row(state: &Path, port: u16, sut: &str) -> Option<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_labvisor"))
        .args([
            "status",
            "--json",
            "--broker",
            &format!("mqtt://127.0.0.1:{port}"),
        ])
        .env("LABVISOR_STATE_DIR", state)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let rows = v.get("suts").or(Some(&v))?.as_array()?.clone();
    rows.into_iter().find(|r| r["sut"] == sut)
}

/// (b) An agent the server refuses (no token file: 403 on every poll) is alive and idle, and
/// was healthy before exec probes. Its exec probe makes it unhealthy in Docker with the reason
/// in the health log (what Portainer shows), in `labvisor status` and on `<sut>/supervisor`;
/// the supervisor does not restart it (a restart mends no refused server). With the token
/// given (the file edited), its new container is healthy and registers its queue.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn an_exec_probe_turns_a_refused_agent_unhealthy_with_the_reason() {
    let scope = DockerScope::new("tf-probe");
    let server = TfServer::start();
    let image = standin_image(&scope);
    let (t, dir) = tmp_sut_dir();
    let state = t.path().join("state");
    agent_files(&dir, &server, "q-probe");
    write(&dir, "tf-b.toml", &tf_sut(&image, false, TF_PROBE));
    let port = free_port();
    let _sup = supervise_managed(&scope, &dir, &state, port);
    let name = scope.name("tf-b");

    // Docker: unhealthy, and the health log says why.
    let reason = wait_until("tf-b unhealthy in Docker", LIMIT, || {
        (inspect(&name, "{{.State.Health.Status}}") == "unhealthy")
            .then(|| inspect(&name, "{{range .State.Health.Log}}{{.Output}}{{end}}"))
    });
    assert!(
        reason.contains("unhealthy: probe failing: exit 1: ") && reason.contains("403"),
        "{reason}"
    );
    let id = inspect(&name, "{{.Id}}");

    // labvisor status: unhealthy, the probe's reason in the detail, the agent idle.
    let row = wait_until("labvisor status shows the probe failing", LIMIT, || {
        status_row(&state, port, "tf-b").filter(|r| {
            r["health"] == "unhealthy"
                && r["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("probe failing: exit 1: ") && d.contains("403"))
        })
    });
    assert_eq!(row["state"], "idle", "{row}");

    // The supervisor's view: unhealthy, and not restarted while Docker's probes keep failing.
    let pw = std::fs::read_to_string(state.join("local-password")).unwrap();
    let sub = Subscriber::start(
        port,
        "tf-b/supervisor",
        &["-u", "labvisor.local", "-P", pw.trim()],
    );
    wait_until("the view says unhealthy", LIMIT, || {
        views(&sub, "tf-b")
            .into_iter()
            .find(|v| v.health == Health::Unhealthy)
    });
    wait_until("three more failed probes", LIMIT, || {
        let streak: u32 = inspect(&name, "{{.State.Health.FailingStreak}}")
            .parse()
            .ok()?;
        (streak >= 4).then_some(())
    });
    let last = views(&sub, "tf-b").pop().unwrap();
    assert_eq!(
        (last.health, last.restarts),
        (Health::Unhealthy, 0),
        "{last:?}"
    );
    assert_eq!(last.container_id.as_deref(), Some(id.as_str()));
    assert_eq!(
        inspect(&name, "{{.Id}} {{.State.Running}}"),
        format!("{id} true")
    );

    // The token given: a new container, healthy, that registers its queue; status clears.
    write(&dir, "tf-b.toml", &tf_sut(&image, true, TF_PROBE));
    let new_id = wait_healthy(&scope, "tf-b", LIMIT);
    assert_ne!(new_id, id);
    server.wait_queue("q-probe", LIMIT);
    wait_until("labvisor status clears the probe failure", LIMIT, || {
        status_row(&state, port, "tf-b").filter(|r| {
            r["health"] == "healthy"
                && !r["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("probe failing"))
        })
    });
    assert!(ps(&scope).contains_key(&name));
}
