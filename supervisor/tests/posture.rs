//! The agent container's security posture, attacked from inside a job's shoes (`docker exec`
//! as the agent's user) against a real Docker engine and a real supervisor.
//!
//! Every test runs its own supervisor with a unique `--id`, `--name-prefix` and
//! `--extra-label` ([`DockerScope`]); everything is removed by label when the scope drops.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

use common::{fast_sut, own_network, ps, tmp_sut_dir, views, wait_healthy, write, Sup};
use labvisor_tests::{
    docker, docker_ok, ensure_busybox_image, free_port, network_gateway, static_bin, wait_until,
    DockerScope, KillOnDrop, Mosquitto, BUSYBOX_IMAGE,
};

const T: Duration = Duration::from_secs(45);

fn inspect(id: &str, format: &str) -> String {
    docker_ok(&["inspect", "-f", format, id])
}

/// The volume mounted at `dest` in container `id`.
fn volume_at(id: &str, dest: &str) -> String {
    inspect(
        id,
        &format!("{{{{range .Mounts}}}}{{{{if eq .Destination \"{dest}\"}}}}{{{{.Name}}}}:{{{{.RW}}}}{{{{end}}}}{{{{end}}}}"),
    )
}

/// Runs `script` with `sh -c` in container `id`; (exit success, stdout + stderr).
fn sh(id: &str, script: &str) -> (bool, String) {
    let o = docker(&["exec", id, "sh", "-c", script]);
    let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&o.stderr));
    (o.status.success(), text.trim().to_owned())
}

/// A SUT named like the tools volume under the old naming (`tools-<id>-<hash>`: the name is
/// readable from /proc/self/mountinfo in any agent) gets a volume of its own, never the tools
/// volume, also when a volume of that old name exists; no agent can write the tools volume
/// (read-only: EROFS). A SUT volume of the old naming that carries this supervisor's and this
/// SUT's labels keeps being used, with its data.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn a_sut_named_like_the_tools_volume_gets_its_own_volume() {
    ensure_busybox_image();
    let scope = DockerScope::new("names");
    let (_t, dir) = tmp_sut_dir();
    let label = scope.label();
    let supervisor_label = format!("io.labvisor.supervisor={}", scope.run_id());
    // A SUT volume of the old naming (an earlier version's), with its labels and some data.
    let old_data = scope.name("labvisor-legacy");
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
        "io.labvisor.sut=legacy",
        &old_data,
    ]);
    docker_ok(&[
        "run",
        "--rm",
        "--label",
        &label,
        "--mount",
        &format!("type=volume,source={old_data},target=/d"),
        "--entrypoint",
        "/bin/sh",
        BUSYBOX_IMAGE,
        "-c",
        "echo kept > /d/old-data",
    ]);

    let read = |b: &str| bytes::Bytes::from(std::fs::read(static_bin(b)).unwrap());
    let hash =
        labvisor_supervisor::spec::Tools::new(read("labvisor-agent"), read("labvisor-healthcheck"))
            .hash;
    // The tools volume under the old naming, as an earlier version made it for these binaries,
    // still used by one of its containers (so it stays).
    let old_tools = format!("{}{}-{hash}", scope.name("labvisor-tools-"), scope.run_id());
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
        &old_tools,
    ]);
    let holder = docker_ok(&[
        "create",
        "--label",
        &label,
        "--mount",
        &format!("type=volume,source={old_tools},target=/labvisor/bin,readonly"),
        BUSYBOX_IMAGE,
        "true",
    ]);
    write(&dir, "a.toml", &fast_sut(BUSYBOX_IMAGE, ""));
    let _sup = Sup::start(&scope, &dir, None, &[]);
    let a = wait_healthy(&scope, "a", T);
    let (tools, rw) = volume_at(&a, "/labvisor/bin")
        .split_once(':')
        .map(|(n, rw)| (n.to_owned(), rw.to_owned()))
        .expect("a tools volume");
    assert_eq!(rw, "false", "the tools volume is mounted read-only");
    assert!(tools.ends_with(&hash), "{tools} {hash}");
    let marker = sh(&a, "cat /labvisor/bin/.labvisor-tools").1;
    assert_eq!(marker, hash);

    let evil = format!("tools-{}-{hash}", scope.run_id());
    write(&dir, &format!("{evil}.toml"), &fast_sut(BUSYBOX_IMAGE, ""));
    write(&dir, "legacy.toml", &fast_sut(BUSYBOX_IMAGE, ""));
    let e = wait_healthy(&scope, &evil, T);
    let l = wait_healthy(&scope, "legacy", T);

    assert_eq!(
        volume_at(&e, "/labvisor/data"),
        format!("{}:true", scope.name(&format!("labvisor.sut.{evil}"))),
        "the SUT's own volume, of its own kind"
    );
    assert_eq!(volume_at(&e, "/labvisor/bin"), format!("{tools}:false"));
    let (ok, out) = sh(
        &e,
        "ls -A /labvisor/data; echo x > /labvisor/bin/labvisor-healthcheck",
    );
    assert!(!ok, "{out}");
    assert!(
        out.ends_with("Read-only file system"),
        "a job cannot write the tools volume: {out}"
    );
    assert!(
        !out.contains(".labvisor-tools"),
        "the data volume is not the tools volume: {out}"
    );
    assert_eq!(sh(&e, "cat /labvisor/bin/.labvisor-tools").1, hash);
    assert_eq!(sh(&a, "cat /labvisor/bin/.labvisor-tools").1, hash);

    // The old SUT volume is used, with its data; the old tools volume was not taken.
    assert_eq!(volume_at(&l, "/labvisor/data"), format!("{old_data}:true"));
    assert_eq!(sh(&l, "cat /labvisor/data/old-data").1, "kept");
    let users = docker_ok(&[
        "ps",
        "-a",
        "--no-trunc",
        "--filter",
        &format!("volume={old_tools}"),
        "--format",
        "{{.ID}}",
    ]);
    assert_eq!(users, holder, "no agent mounts the old tools volume");
}

/// A supervisor with its managed broker (no `--broker`): the broker listens on the gateway of
/// labvisor's network, as in production. Killed on drop.
fn supervise_managed(
    scope: &DockerScope,
    dir: &Path,
    state: &Path,
    port: u16,
    log: &Path,
) -> KillOnDrop {
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

/// The bits of the capabilities every agent keeps (CHOWN 0, DAC_OVERRIDE 1, FOWNER 3, FSETID 4,
/// KILL 5, SETGID 6, SETUID 7, NET_BIND_SERVICE 10), as /proc/self/status shows them.
const DEFAULT_CAP_MASK: &str = "00000000000004fb";

/// The attacks of a root job on a shared lab network: no raw or packet socket (ARP spoofing,
/// sniffing), no connection to another agent on labvisor's network, while the broker (on the
/// host's side of the bridge) stays reachable; no new privileges; a pids limit; the image's
/// own user. The bridge of earlier versions (traffic between containers on) is removed.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn a_job_cannot_open_raw_sockets_or_reach_another_agent() {
    ensure_busybox_image();
    let scope = DockerScope::new("posture");
    let (t, dir) = tmp_sut_dir();
    let state = t.path().join("state");
    std::fs::create_dir(&state).unwrap();
    // The bridge an earlier version made: labelled as this supervisor's, ICC on.
    let old_net = own_network(&scope, "labvisor");
    write(&dir, "a.toml", &fast_sut(BUSYBOX_IMAGE, ""));
    write(
        &dir,
        "b.toml",
        &fast_sut(BUSYBOX_IMAGE, "[resources]\npids = 24\n"),
    );
    let port = free_port();
    let log = t.path().join("supervisor.log");
    let _sup = supervise_managed(&scope, &dir, &state, port, &log);
    let a = wait_healthy(&scope, "a", T);
    let b = wait_healthy(&scope, "b", T);
    let net = scope.name("labvisor.net");
    assert_eq!(
        docker_ok(&[
            "network",
            "inspect",
            "-f",
            "{{index .Options \"com.docker.network.bridge.enable_icc\"}}",
            &net,
        ]),
        "false"
    );
    wait_until("the old bridge removed", T, || {
        (!docker(&["network", "inspect", &old_net]).status.success()).then_some(())
    });
    let gateway = network_gateway(&net);

    // Capabilities, no-new-privileges, user.
    assert_eq!(
        sh(
            &a,
            "grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status | tr -s '\\t' ' '"
        )
        .1,
        format!("CapEff: {DEFAULT_CAP_MASK}\nCapBnd: {DEFAULT_CAP_MASK}\nNoNewPrivs: 1")
    );
    assert_eq!(inspect(&a, "{{.Config.User}}"), "", "the image's own user");
    assert_eq!(sh(&a, "id -u").1, "0");

    // No raw or packet sockets: ARP (the spoofing tool's socket) and ICMP echo both refused.
    let (ok, out) = sh(&a, &format!("arping -c 1 -w 1 {gateway}"));
    assert!(!ok, "{out}");
    assert_eq!(out, "arping: socket: Operation not permitted");
    let (ok, out) = sh(&a, &format!("ping -c 1 -W 1 {gateway}"));
    assert!(!ok, "{out}");
    assert!(
        out.ends_with("ping: permission denied (are you root?)"),
        "{out}"
    );

    // Another agent's listener: reachable from the host (so it is up), not from agent a.
    let b_ip = inspect(
        &b,
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
    );
    docker_ok(&["exec", "-d", &b, "httpd", "-f", "-p", "7000", "-h", "/"]);
    let b_addr: SocketAddr = format!("{b_ip}:7000").parse().unwrap();
    wait_until("b's listener up, seen from the host", T, || {
        TcpStream::connect_timeout(&b_addr, Duration::from_secs(1))
            .ok()
            .map(|_| ())
    });
    let (ok, out) = sh(&a, &format!("nc -w 3 {b_ip} 7000 </dev/null"));
    assert!(!ok, "agent a reached agent b: {out}");
    assert_eq!(out, "nc: timed out");
    // The managed broker, on the host's side of the bridge, stays reachable.
    let (ok, out) = sh(&a, &format!("nc -w 3 {gateway} {port} </dev/null"));
    assert!(ok, "the broker is unreachable from agent a: {out}");

    // The pids limit: b may hold 24 processes and threads, no more.
    assert_eq!(inspect(&b, "{{.HostConfig.PidsLimit}}"), "24");
    assert_eq!(inspect(&a, "{{.HostConfig.PidsLimit}}"), "4096");
    let (_, out) = sh(&b, "for i in $(seq 40); do sleep 30 & done; wait");
    assert!(
        out.contains("can't fork: Resource temporarily unavailable"),
        "{out}"
    );
}

/// A Docker network that is not labvisor's own is refused unless the supervisor runs with
/// `--allow-network`: no container, and the SUT's problem is published; with the flag the
/// agent runs on that network.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn another_docker_network_needs_allow_network() {
    ensure_busybox_image();
    let scope = DockerScope::new("othernet");
    let other = scope.name("other");
    docker_ok(&["network", "create", "--label", &scope.label(), &other]);
    let broker = Mosquitto::start();
    let sub = broker.subscribe("+/supervisor", &[]);
    let (_t, dir) = tmp_sut_dir();
    write(&dir, "a.toml", &fast_sut(BUSYBOX_IMAGE, ""));
    write(
        &dir,
        "n.toml",
        &format!("network = \"{other}\"\n{}", fast_sut(BUSYBOX_IMAGE, "")),
    );
    let mut sup = Sup::start(&scope, &dir, Some(&broker.url()), &[]);
    wait_healthy(&scope, "a", T);
    let v = wait_until("n's problem published", T, || {
        views(&sub, "n")
            .into_iter()
            .find(|v| !v.config_problems.is_empty())
    });
    assert_eq!(v.config_problems.len(), 1, "{v:?}");
    assert!(
        v.config_problems[0].ends_with(&format!(
            "network: refused: the Docker network \"{other}\" is not labvisor's own (\"labvisor\"): the agent would reach whatever else is on it; start the supervisor with --allow-network to permit it"
        )),
        "{v:?}"
    );
    assert_eq!(v.container_id, None);
    assert!(!ps(&scope).contains_key(&scope.name("n")));
    sup.kill();

    let _sup = Sup::start(&scope, &dir, Some(&broker.url()), &["--allow-network"]);
    let n = wait_healthy(&scope, "n", T);
    assert_eq!(inspect(&n, "{{.HostConfig.NetworkMode}}"), other);
}

/// The image with what a testflinger-style agent uses (Python 3, an ssh client), built by
/// `tools/build-images.sh tf-style` from this host's Debian packages when missing.
const TF_STYLE_IMAGE: &str = "labvisor/tf-style:local";

fn ensure_tf_style_image() {
    if docker(&["image", "inspect", TF_STYLE_IMAGE])
        .status
        .success()
    {
        return;
    }
    labvisor_tests::run_ok(
        Command::new("bash")
            .arg(labvisor_tests::workspace_root().join("tools/build-images.sh"))
            .arg("tf-style"),
    );
}

/// The device process of a testflinger-style agent, in Python: a serial console over TCP
/// (read the prompt, answer it) and an ssh connection to the device.
const TF_SCRIPT: &str = r#"
import socket, subprocess, sys, time
gw, serial, ssh = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((gw, serial), timeout=20)
prompt = s.makefile("r").readline()
s.sendall(("serial got " + prompt).encode())
s.close()
r = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                    "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=20",
                    "-p", str(ssh), "ubuntu@" + gw, "true"], capture_output=True, text=True)
print("ssh exited", r.returncode, flush=True)
while True:
    time.sleep(60)
"#;

/// Under the default posture (capabilities dropped, no-new-privileges, pids limit, the
/// inter-container-traffic-free bridge), a testflinger-style device process still works: Python
/// runs, talks to a serial console over TCP, and the OpenSSH client connects to the device and
/// speaks SSH. The "device" is the test itself, on the host's side of the bridge, as a lab's
/// devices are outside it.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn a_testflinger_style_agent_works_under_the_defaults() {
    ensure_busybox_image();
    ensure_tf_style_image();
    let scope = DockerScope::new("tfstyle");
    let (_t, dir) = tmp_sut_dir();
    write(&dir, "a.toml", &fast_sut(BUSYBOX_IMAGE, ""));
    let _sup = Sup::start(&scope, &dir, None, &[]);
    wait_healthy(&scope, "a", T);
    let gateway = network_gateway(&scope.name("labvisor.net"));
    let serial = std::net::TcpListener::bind((gateway.as_str(), 0)).unwrap();
    let ssh = std::net::TcpListener::bind((gateway.as_str(), 0)).unwrap();
    let port = |l: &std::net::TcpListener| l.local_addr().unwrap().port().to_string();
    let command = serde_json::to_string(&[
        "python3",
        "-c",
        TF_SCRIPT,
        &gateway,
        &port(&serial),
        &port(&ssh),
    ])
    .unwrap();
    let text = fast_sut(TF_STYLE_IMAGE, "").replacen(
        "command = [\"/bin/sh\", \"-c\", \"while true; do sleep 5; done\"]",
        &format!("command = {command}"),
        1,
    );
    assert!(text.contains("python3"), "{text}");
    write(&dir, "tf.toml", &text);

    use std::io::{BufRead, BufReader, Write};
    let accept = |l: &std::net::TcpListener| {
        l.set_nonblocking(true).unwrap();
        let (c, _) = wait_until("the agent connects", T, || l.accept().ok());
        c.set_nonblocking(false).unwrap();
        c.set_read_timeout(Some(T)).unwrap();
        c
    };
    let mut console = accept(&serial);
    console.write_all(b"ubuntu login: \n").unwrap();
    let mut answer = String::new();
    BufReader::new(&console).read_line(&mut answer).unwrap();
    assert_eq!(answer, "serial got ubuntu login: \n");

    let mut device = accept(&ssh);
    device
        .write_all(b"SSH-2.0-labvisor-test-device\r\n")
        .unwrap();
    let mut banner = String::new();
    BufReader::new(&device).read_line(&mut banner).unwrap();
    assert!(
        banner.starts_with("SSH-2.0-OpenSSH_"),
        "the ssh client speaks SSH: {banner:?}"
    );
    drop(device);
    let tf = wait_healthy(&scope, "tf", T);
    assert_eq!(
        inspect(&tf, "{{.HostConfig.CapDrop}} {{.HostConfig.SecurityOpt}}"),
        "[ALL] [no-new-privileges:true]"
    );
}
