//! The test kit's simulated Swarm (tests/src/swarm.rs): three node containers, each its own
//! Docker engine, make a swarm of three Ready nodes with the right hostnames; an image of the
//! machine's engine reaches every node; a service pinned to a node runs there and reaches a
//! server on the host at the test network's gateway; and everything
//! the bed made is gone when its scope is dropped, also after a panic.

use std::io::Read;
use std::net::TcpListener;
use std::time::Duration;

use labvisor_tests::{
    docker_ok, ensure_busybox_image, wait_until, DockerScope, Swarm, BUSYBOX_IMAGE,
};

/// What carries `label` on the machine's engine: containers, volumes, networks.
fn leftovers(label: &str) -> Vec<String> {
    let filter = format!("label={label}");
    let mut all = Vec::new();
    for kind in ["container", "volume", "network"] {
        let mut args = vec![kind, "ls", "-q", "--filter", &filter];
        if kind == "container" {
            args.insert(2, "-a");
        }
        all.extend(
            docker_ok(&args)
                .split_whitespace()
                .map(|id| format!("{kind} {id}")),
        );
    }
    all
}

#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn three_nodes_ready_image_everywhere_pinned_service_on_its_node() {
    ensure_busybox_image();
    let label;
    {
        let scope = DockerScope::new("swarm-bed");
        label = scope.label();
        let swarm = Swarm::start(&scope, 3);
        eprintln!("3-node swarm started in {:?}", swarm.started_in());
        assert_eq!(swarm.hostnames(), ["node1", "node2", "node3"]);

        let nodes = swarm.docker_ok(
            swarm.manager(),
            &[
                "node",
                "ls",
                "--format",
                "{{.Hostname}} {{.Status}} {{.ManagerStatus}}",
            ],
        );
        let mut nodes: Vec<&str> = nodes.lines().map(str::trim).collect();
        nodes.sort_unstable();
        assert_eq!(nodes, ["node1 Ready Leader", "node2 Ready", "node3 Ready"]);

        swarm.load_image(BUSYBOX_IMAGE);
        for node in swarm.hostnames() {
            let id = swarm.docker_ok(&node, &["image", "inspect", "-f", "{{.Id}}", BUSYBOX_IMAGE]);
            assert_eq!(
                id,
                docker_ok(&["image", "inspect", "-f", "{{.Id}}", BUSYBOX_IMAGE]),
                "{node} has the machine's image"
            );
        }

        // A server on the host at the test network's gateway: the task says hello to it.
        let listener = TcpListener::bind((swarm.gateway(), 0)).expect("bind on the gateway");
        listener.set_nonblocking(true).expect("nonblocking");
        let server = listener.local_addr().expect("address");
        swarm.docker_ok(
            swarm.manager(),
            &[
                "service",
                "create",
                "-d",
                "--name",
                "pinned",
                "--constraint",
                "node.hostname==node3",
                "--env",
                "NODE={{.Node.Hostname}}",
                BUSYBOX_IMAGE,
                "sh",
                "-c",
                &format!(
                    "echo hello from $NODE | nc {} {}; exec sleep 600",
                    server.ip(),
                    server.port()
                ),
            ],
        );
        wait_until(
            "the pinned service's task runs",
            Duration::from_secs(30),
            || {
                let tasks = swarm.docker_ok(
                    swarm.manager(),
                    &[
                        "service",
                        "ps",
                        "--filter",
                        "desired-state=running",
                        "--format",
                        "{{.Node}} {{.CurrentState}}",
                        "pinned",
                    ],
                );
                tasks.starts_with("node3 Running").then_some(())
            },
        );
        // The task's container is on node3's engine, and on no other.
        for node in swarm.hostnames() {
            let here = swarm.docker_ok(
                &node,
                &[
                    "ps",
                    "-q",
                    "--filter",
                    "label=com.docker.swarm.service.name=pinned",
                ],
            );
            assert_eq!(
                !here.is_empty(),
                node == "node3",
                "the task's container on {node}"
            );
        }
        let (mut conn, _) = wait_until(
            "the task connects to the host's server",
            Duration::from_secs(30),
            || listener.accept().ok(),
        );
        conn.set_nonblocking(false).expect("blocking");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut hello = String::new();
        conn.read_to_string(&mut hello).expect("read the hello");
        assert_eq!(hello, "hello from node3\n");
        assert!(
            !leftovers(&label).is_empty(),
            "the bed carries its scope's label"
        );
    }
    assert_eq!(
        leftovers(&label),
        Vec::<String>::new(),
        "the scope removed the bed"
    );
}

#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn a_panicking_test_leaves_no_node_volume_or_network() {
    let mut label = String::new();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let scope = DockerScope::new("swarm-bed-panic");
        label = scope.label();
        let swarm = Swarm::start(&scope, 2);
        assert_eq!(
            leftovers(&label).len(),
            2 + 2 + 1,
            "2 nodes, 2 volumes, 1 network"
        );
        swarm.lose_node("node2");
        panic!("the test fails with its swarm up");
    }));
    assert!(outcome.is_err(), "the closure panicked");
    assert_eq!(leftovers(&label), Vec::<String>::new());
}
