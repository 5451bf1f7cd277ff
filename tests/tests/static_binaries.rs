//! The agent and the healthcheck are fully static, so they run inside ANY image: this proves it
//! in a FROM-scratch image (no libc, no shell, nothing) and in the busybox image.

use std::process::Command;

use labvisor_tests::{
    docker, ensure_busybox_image, run_ok, static_bin, DockerScope, BUSYBOX_IMAGE,
};

fn scratch_image(scope: &DockerScope) -> String {
    let ctx = tempfile::tempdir().unwrap();
    for b in ["labvisor-agent", "labvisor-healthcheck"] {
        std::fs::copy(static_bin(b), ctx.path().join(b)).unwrap();
    }
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\nCOPY labvisor-agent labvisor-healthcheck /labvisor/bin/\n",
    )
    .unwrap();
    scope.build_image(ctx.path(), "scratch")
}

#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn static_agent_runs_in_a_from_scratch_image() {
    let scope = DockerScope::new("static");
    let image = scratch_image(&scope);
    let out = run_ok(Command::new("docker").args([
        "run",
        "--rm",
        "--label",
        &scope.label(),
        "--entrypoint",
        "/labvisor/bin/labvisor-agent",
        &image,
        "--version",
    ]));
    assert_eq!(
        out.trim(),
        format!("labvisor-agent {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn static_healthcheck_runs_in_scratch_and_busybox_and_reports_why() {
    let scope = DockerScope::new("static-hc");
    let scratch = scratch_image(&scope);
    ensure_busybox_image();
    for image in [scratch.as_str(), BUSYBOX_IMAGE] {
        // No heartbeat file: exit 1 with a one-line reason, as Docker's health log will show it.
        let mut args = vec!["run", "--rm", "--label"];
        let label = scope.label();
        args.push(&label);
        let hc = static_bin("labvisor-healthcheck");
        let mount = format!("type=bind,source={},target=/lvhc,readonly", hc.display());
        if image == BUSYBOX_IMAGE {
            args.extend(["--mount", &mount, "--entrypoint", "/lvhc"]);
        } else {
            args.extend(["--entrypoint", "/labvisor/bin/labvisor-healthcheck"]);
        }
        args.extend([image, "--file", "/nope/heartbeat"]);
        let out = docker(&args);
        assert_eq!(out.status.code(), Some(1), "{image}: {out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "unhealthy: no heartbeat file at /nope/heartbeat: the agent has not started or cannot write it",
            "{image}"
        );
    }
}
