//! The static agent in real containers: Docker's own health check turning healthy then unhealthy
//! when the agent is frozen (FROM scratch), and orphaned grandchildren reaped both with Docker's
//! init and with the agent as PID 1 (busybox).

use std::path::Path;
use std::time::Duration;

use labvisor_tests::{
    docker, docker_ok, ensure_busybox_image, static_bin, wait_until, DockerScope, BUSYBOX_IMAGE,
};

fn health(container: &str) -> String {
    docker_ok(&["inspect", "-f", "{{.State.Health.Status}}", container])
}

/// A FROM-scratch image holding only the two static binaries and a job-only SUT config, with an
/// exec-form HEALTHCHECK, as the supervisor sets it up.
fn scratch_agent_image(scope: &DockerScope) -> String {
    let ctx = tempfile::tempdir().unwrap();
    for b in ["labvisor-agent", "labvisor-healthcheck"] {
        std::fs::copy(static_bin(b), ctx.path().join(b)).unwrap();
    }
    std::fs::write(
        ctx.path().join("scratch-1.toml"),
        "image = \"scratch-agent\"\n[health]\nheartbeat = \"500ms\"\nmax_age = \"3s\"\ninterval = \"1s\"\ntimeout = \"500ms\"\nretries = 1\nstart_period = \"0s\"\n",
    )
    .unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\n\
         COPY labvisor-agent labvisor-healthcheck /labvisor/bin/\n\
         COPY scratch-1.toml /labvisor/sut/\n\
         ENV LABVISOR_CONFIG=/labvisor/sut/scratch-1.toml\n\
         HEALTHCHECK --interval=1s --timeout=1s --retries=1 CMD [\"/labvisor/bin/labvisor-healthcheck\"]\n\
         ENTRYPOINT [\"/labvisor/bin/labvisor-agent\"]\n",
    )
    .unwrap();
    scope.build_image(ctx.path(), "agent-scratch")
}

#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn docker_health_turns_healthy_then_unhealthy_when_the_agent_is_frozen() {
    let scope = DockerScope::new("agent-health");
    let image = scratch_agent_image(&scope);
    let name = scope.name("health");
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &name,
        "--label",
        &scope.label(),
        &image,
    ]);
    wait_until("healthy in docker inspect", Duration::from_secs(20), || {
        (health(&name) == "healthy").then_some(())
    });
    let pid = docker_ok(&["inspect", "-f", "{{.State.Pid}}", &name]);
    let pid = nix::unistd::Pid::from_raw(pid.parse().unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    wait_until(
        "unhealthy in docker inspect",
        Duration::from_secs(20),
        || (health(&name) == "unhealthy").then_some(()),
    );
    let log = docker_ok(&[
        "inspect",
        "-f",
        "{{range .State.Health.Log}}{{.Output}}{{end}}",
        &name,
    ]);
    assert!(log.contains("the agent's loop is hung or dead"), "{log}");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    wait_until("healthy again", Duration::from_secs(20), || {
        (health(&name) == "healthy").then_some(())
    });
    // `docker stop` sends SIGTERM to the agent: a clean stop, exit status 0, well within 10 s.
    docker_ok(&["stop", "-t", "10", &name]);
    assert_eq!(
        docker_ok(&["inspect", "-f", "{{.State.ExitCode}}", &name]),
        "0"
    );
}

/// Runs the agent in the busybox image with a device process that orphans a short-lived
/// grandchild, and checks the orphan does not stay a zombie.
fn orphan_is_reaped(init: bool) {
    ensure_busybox_image();
    let scope = DockerScope::new(if init { "reap-init" } else { "reap-pid1" });
    let sut = tempfile::tempdir().unwrap();
    std::fs::write(
        sut.path().join("reaper.toml"),
        "image = \"labvisor/busybox:local\"\ncommand = [\"/bin/sh\", \"-c\", \"(sleep 0.3 & echo $! > /tmp/orphan.pid); while true; do sleep 1; done\"]\n",
    )
    .unwrap();
    let bin_dir = static_bin("labvisor-agent").parent().unwrap().to_path_buf();
    let name = scope.name("reaper");
    let mount =
        |src: &Path, dst: &str| format!("type=bind,source={},target={dst},readonly", src.display());
    let mut args = vec![
        "run".to_string(),
        "-d".into(),
        "--name".into(),
        name.clone(),
        "--label".into(),
        scope.label(),
        "--mount".into(),
        mount(&bin_dir, "/labvisor/bin"),
        "--mount".into(),
        mount(sut.path(), "/labvisor/sut"),
        "-e".into(),
        "LABVISOR_CONFIG=/labvisor/sut/reaper.toml".into(),
        "--entrypoint".into(),
        "/labvisor/bin/labvisor-agent".into(),
    ];
    if init {
        args.push("--init".into());
    }
    args.push(BUSYBOX_IMAGE.into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    docker_ok(&args);
    let orphan = wait_until("the orphan's pid", Duration::from_secs(10), || {
        let out = docker(&["exec", &name, "cat", "/tmp/orphan.pid"]);
        let pid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (out.status.success() && !pid.is_empty()).then_some(pid)
    });
    // The orphan exits after 0.3 s; unreaped, /proc/<pid> would stay (as a zombie) forever.
    wait_until("the orphan reaped", Duration::from_secs(10), || {
        let out = docker(&["exec", &name, "test", "-e", &format!("/proc/{orphan}")]);
        (out.status.code() == Some(1)).then_some(())
    });
    let pid1 = docker_ok(&["exec", &name, "cat", "/proc/1/comm"]);
    assert_eq!(
        pid1,
        if init {
            "docker-init"
        } else {
            "labvisor-agent"
        }
    );
}

#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn orphans_are_reaped_with_dockers_init() {
    orphan_is_reaped(true);
}

#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn orphans_are_reaped_by_the_agent_as_pid_1() {
    orphan_is_reaped(false);
}
