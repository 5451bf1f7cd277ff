//! A testflinger lab's health, end to end with the stand-in (`tests/testflinger-standin/`) in
//! real containers under a real `labvisor supervise`: the agent reaches the server on the lab
//! host by name (`extra_hosts = ["tfserver:host-gateway"]`), and an exec probe (`[probe]
//! command`) turns an agent the server refuses unhealthy, with the reason in Docker's health
//! log, in `labvisor status` and on `<sut>/supervisor`, without the supervisor restarting it.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{ps, tmp_sut_dir, write, Sup};
use labvisor_tests::{standin_image, DockerScope, TfServer, STANDIN_TOKEN};

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
    let hosts = labvisor_tests::docker_ok(&["inspect", "-f", "{{.HostConfig.ExtraHosts}}", &name]);
    assert_eq!(hosts.trim(), "[tfserver:host-gateway]", "{}", sup.log());
    assert!(ps(&scope).contains_key(&name));
}
