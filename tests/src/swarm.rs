//! A Docker Swarm of its own for a test: `n` node containers of [`SWARM_NODE_IMAGE`] (one Docker
//! engine each, built offline from Debian's packages by `tools/build-images.sh swarm-node`) on a
//! bridge network of their own, node1 the manager, the others workers. The machine's engine never
//! joins a swarm. Every container, volume and network carries the [`DockerScope`]'s label, so the
//! scope removes the whole swarm when dropped, also when the test failed.
//!
//! Each node's engine listens on `tcp://<node ip>:2375` without TLS (reachable from the host
//! and the test network only). Tasks on a node reach the host at [`Swarm::gateway`], where a
//! broker started by the test listens.

use crate::{docker_ok, network_gateway, run, run_ok, wait_until, DockerScope};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The node image: Debian's docker.io (Engine 20.10), containerd, runc and iptables.
pub const SWARM_NODE_IMAGE: &str = "labvisor/swarm-node:local";

/// How long a node's engine may take to answer, and the swarm to have every node Ready.
const START_LIMIT: Duration = Duration::from_secs(60);

/// Makes sure [`SWARM_NODE_IMAGE`] exists in its current version: `tools/build-images.sh
/// swarm-node` keeps an image of that version and rebuilds an older one.
pub fn ensure_swarm_node_image() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        crate::run_ok(
            std::process::Command::new("bash")
                .arg(crate::workspace_root().join("tools/build-images.sh"))
                .arg("swarm-node"),
        );
    });
}

/// One node: its hostname (`node1`…), container name and address on the test network.
#[derive(Debug, Clone)]
pub struct SwarmNode {
    /// `node1`…: the node's hostname, as the swarm names it.
    pub hostname: String,
    /// The node container's name on the machine's engine.
    pub container: String,
    /// The node's address on the test network.
    pub ip: String,
}

impl SwarmNode {
    /// `tcp://<ip>:2375`, for `DOCKER_HOST` or `docker -H`.
    pub fn url(&self) -> String {
        format!("tcp://{}:2375", self.ip)
    }
}

/// A running swarm of node containers; see the module docs. Removed with its scope.
#[derive(Debug)]
pub struct Swarm {
    network: String,
    gateway: String,
    nodes: Vec<SwarmNode>,
    started_in: Duration,
}

impl Swarm {
    /// Starts `n` nodes (hostnames `node1`..`nodeN`), makes node1 the manager (advertising its
    /// address on the test network) and the others workers, and waits until every node is Ready.
    pub fn start(scope: &DockerScope, n: usize) -> Swarm {
        assert!(n >= 1, "a swarm needs at least one node");
        ensure_swarm_node_image();
        let t0 = Instant::now();
        let label = scope.label();
        let network = scope.name("swarm");
        docker_ok(&["network", "create", "--label", &label, &network]);
        let gateway = network_gateway(&network);
        let mut nodes = Vec::with_capacity(n);
        for i in 1..=n {
            let hostname = format!("node{i}");
            let container = scope.name(&hostname);
            let volume = format!("type=volume,dst=/var/lib/docker,volume-label={label}");
            docker_ok(&[
                "run",
                "-d",
                "--name",
                &container,
                "--hostname",
                &hostname,
                "--label",
                &label,
                "--network",
                &network,
                // Not --privileged: it asks for every capability, and runc fails ("unable to
                // apply caps") where the machine's bounding set lacks one (CAP_SYS_RESOURCE
                // here). What a nested engine needs instead; the node's entrypoint makes /sys
                // and its cgroups writable.
                "--cap-add",
                "ALL",
                "--cap-drop",
                "SYS_RESOURCE",
                "--security-opt",
                "seccomp=unconfined",
                "--security-opt",
                "apparmor=unconfined",
                "--security-opt",
                "systempaths=unconfined",
                "--device-cgroup-rule",
                "a *:* rwm",
                // The inner engine's overlay2 needs a real filesystem, not the outer overlay.
                "--mount",
                &volume,
                SWARM_NODE_IMAGE,
            ]);
            let ip = docker_ok(&[
                "inspect",
                "-f",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                &container,
            ]);
            nodes.push(SwarmNode {
                hostname,
                container,
                ip,
            });
        }
        let mut swarm = Swarm {
            network,
            gateway,
            nodes,
            started_in: Duration::ZERO,
        };
        for node in &swarm.nodes {
            swarm.wait_engine(node);
        }
        let manager = swarm.nodes[0].clone();
        swarm.docker_ok(
            &manager.hostname,
            &["swarm", "init", "--advertise-addr", &manager.ip],
        );
        let token = swarm.docker_ok(&manager.hostname, &["swarm", "join-token", "-q", "worker"]);
        let addr = format!("{}:2377", manager.ip);
        for node in &swarm.nodes[1..] {
            swarm.docker_ok(
                &node.hostname,
                &[
                    "swarm",
                    "join",
                    "--advertise-addr",
                    &node.ip,
                    "--token",
                    &token,
                    &addr,
                ],
            );
        }
        for node in swarm.nodes.clone() {
            swarm.wait_node_status(&node.hostname, "ready", START_LIMIT);
        }
        swarm.started_in = t0.elapsed();
        swarm
    }

    /// How long [`Swarm::start`] took.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The manager's engine (node1), `tcp://<ip>:2375`: `DOCKER_HOST` for a swarm runtime.
    pub fn manager_url(&self) -> String {
        self.nodes[0].url()
    }

    /// The manager's hostname (`node1`).
    pub fn manager(&self) -> &str {
        &self.nodes[0].hostname
    }

    /// The host's address on the test network: where tasks on any node reach a server (a
    /// broker) that the test started on the host bound to this address or to 0.0.0.0.
    pub fn gateway(&self) -> &str {
        &self.gateway
    }

    /// The test network's name.
    pub fn network(&self) -> &str {
        &self.network
    }

    /// The nodes, node1 first.
    pub fn nodes(&self) -> &[SwarmNode] {
        &self.nodes
    }

    /// The nodes' hostnames, node1 first.
    pub fn hostnames(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.hostname.clone()).collect()
    }

    /// The node named `hostname`; panics if there is none.
    pub fn node(&self, hostname: &str) -> &SwarmNode {
        self.nodes
            .iter()
            .find(|n| n.hostname == hostname)
            .unwrap_or_else(|| panic!("no swarm node {hostname}"))
    }

    /// Runs the docker CLI against `node`'s engine (`docker -H tcp://<ip>:2375 args…`).
    pub fn docker(&self, node: &str, args: &[&str]) -> Output {
        let url = self.node(node).url();
        run(Command::new("docker")
            .env_remove("DOCKER_CONTEXT")
            .args(["-H", &url])
            .args(args))
    }

    /// Like [`Swarm::docker`], panics unless it succeeds; returns trimmed stdout.
    pub fn docker_ok(&self, node: &str, args: &[&str]) -> String {
        let url = self.node(node).url();
        run_ok(
            Command::new("docker")
                .env_remove("DOCKER_CONTEXT")
                .args(["-H", &url])
                .args(args),
        )
        .trim()
        .to_owned()
    }

    /// Copies `image` from the machine's engine into every node's engine (`docker save`, then
    /// `docker load` on each node).
    pub fn load_image(&self, image: &str) {
        let dir = tempfile::tempdir().expect("tempdir");
        let tar = dir.path().join("image.tar");
        let tar = tar.display().to_string();
        docker_ok(&["save", "-o", &tar, image]);
        std::thread::scope(|s| {
            for node in &self.nodes {
                let tar = &tar;
                s.spawn(move || self.docker_ok(&node.hostname, &["load", "-q", "-i", tar]));
            }
        });
    }

    /// Adds (or changes) the node label `key=value` on `node`, through the manager.
    pub fn label_node(&self, node: &str, key: &str, value: &str) {
        self.docker_ok(
            self.manager(),
            &[
                "node",
                "update",
                "--label-add",
                &format!("{key}={value}"),
                node,
            ],
        );
    }

    /// Removes the node label `key` from `node`, through the manager.
    pub fn unlabel_node(&self, node: &str, key: &str) {
        self.docker_ok(self.manager(), &["node", "update", "--label-rm", key, node]);
    }

    /// The manager's view of `node`'s status: `ready`, `down`, `unknown`…
    pub fn node_status(&self, node: &str) -> String {
        let out = self.docker(
            self.manager(),
            &["node", "inspect", "-f", "{{.Status.State}}", node],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Waits until the manager reports `node` in `status` (`ready`, `down`).
    pub fn wait_node_status(&self, node: &str, status: &str, limit: Duration) {
        wait_until(&format!("swarm node {node} {status}"), limit, || {
            (self.node_status(node) == status).then_some(())
        });
    }

    /// The node vanishes as a lost host would: its container is killed (its engine and tasks
    /// die with it, nothing is reported to the manager). The manager shows it `down` some
    /// seconds later ([`Swarm::wait_node_status`]). Must not be the manager.
    pub fn lose_node(&self, node: &str) {
        assert_ne!(node, self.manager(), "losing the manager loses the swarm");
        docker_ok(&["kill", &self.node(node).container]);
    }

    /// A lost node comes back: its container starts again with its engine's state (the
    /// swarm's too), and the manager shows it `ready`.
    pub fn restore_node(&self, node: &str) {
        let n = self.node(node);
        docker_ok(&["start", &n.container]);
        let ip = docker_ok(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &n.container,
        ]);
        assert_eq!(ip, n.ip, "node {node} came back with another address");
        self.wait_engine(n);
        self.wait_node_status(node, "ready", START_LIMIT);
    }

    fn wait_engine(&self, node: &SwarmNode) {
        wait_until(
            &format!("the engine of swarm node {} answers", node.hostname),
            START_LIMIT,
            || {
                let addr = format!("{}:2375", node.ip).parse().ok()?;
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
                self.docker(&node.hostname, &["version", "-f", "{{.Server.Version}}"])
                    .status
                    .success()
                    .then_some(())
            },
        );
    }
}
