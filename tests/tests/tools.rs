//! `tools/nuke.sh` removes only labvisor-labelled objects of the supervisor it is given, lists
//! them without removing anything unless `--yes`, and leaves volumes alone unless `--volumes`.
//!
//! Every object here also carries the test kit's run label, and nuke always runs with a
//! `--supervisor` id unique to this test: it can never reach other tests' or real objects.

use std::process::Command;

use labvisor_tests::{
    docker, docker_ok, ensure_busybox_image, run, workspace_root, DockerScope, BUSYBOX_IMAGE,
};

const MANAGED: &str = "io.labvisor.managed-by=labvisor";

fn nuke(args: &[&str]) -> (i32, String, String) {
    assert!(
        args.windows(2).any(|w| w[0] == "--supervisor"),
        "tests never run nuke without --supervisor"
    );
    let out = run(Command::new("bash")
        .arg(workspace_root().join("tools/nuke.sh"))
        .args(args));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn container_exists(name: &str) -> bool {
    docker(&["container", "inspect", name]).status.success()
}

fn volume_exists(name: &str) -> bool {
    docker(&["volume", "inspect", name]).status.success()
}

fn network_exists(name: &str) -> bool {
    docker(&["network", "inspect", name]).status.success()
}

/// Labels for an object: the scope's run label plus `extra`.
fn labels<'a>(scope_label: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["--label", scope_label];
    for l in extra {
        v.extend(["--label", l]);
    }
    v
}

#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn nuke_removes_only_the_given_supervisors_labelled_objects() {
    ensure_busybox_image();
    let scope = DockerScope::new("nuke");
    let label = scope.label();
    let ours = scope.name("sup");
    let other = scope.name("other-sup");
    let ours_label = format!("io.labvisor.supervisor={ours}");
    let other_label = format!("io.labvisor.supervisor={other}");

    let mine = labels(&label, &[MANAGED, &ours_label]);
    let theirs = labels(&label, &[MANAGED, &other_label]);
    let plain = labels(&label, &[]);

    let c_mine = scope.name("agent");
    let c_theirs = scope.name("other-agent");
    let c_plain = scope.name("unlabelled");
    for (name, l) in [(&c_mine, &mine), (&c_theirs, &theirs), (&c_plain, &plain)] {
        let mut args = vec!["create", "--name", name];
        args.extend(l.iter().copied());
        args.extend([BUSYBOX_IMAGE, "true"]);
        docker_ok(&args);
    }
    let v_mine = scope.name("vol");
    let v_theirs = scope.name("other-vol");
    let v_plain = scope.name("unlabelled-vol");
    let n_mine = scope.name("net");
    let n_theirs = scope.name("other-net");
    for (v, n, l) in [
        (&v_mine, &n_mine, &mine),
        (&v_theirs, &n_theirs, &theirs),
        (&v_plain, &scope.name("unlabelled-net"), &plain),
    ] {
        let mut args = vec!["volume", "create"];
        args.extend(l.iter().copied());
        args.push(v);
        docker_ok(&args);
        let mut args = vec!["network", "create"];
        args.extend(l.iter().copied());
        args.push(n);
        docker_ok(&args);
    }
    let untouched = || {
        assert!(
            container_exists(&c_theirs),
            "another supervisor's container was removed"
        );
        assert!(
            container_exists(&c_plain),
            "an unlabelled container was removed"
        );
        assert!(volume_exists(&v_theirs) && volume_exists(&v_plain));
        assert!(network_exists(&n_theirs));
        assert!(network_exists(&scope.name("unlabelled-net")));
    };

    // Dry run (the default): lists exactly ours, removes nothing.
    let (code, out, err) = nuke(&["--supervisor", &ours, "--volumes"]);
    assert_eq!(code, 0, "{out}{err}");
    for line in [
        format!("would remove container {c_mine}"),
        format!("would remove volume {v_mine}"),
        format!("would remove network {n_mine}"),
    ] {
        assert!(out.contains(&line), "{line:?} not in: {out}");
    }
    for name in [&c_theirs, &c_plain, &v_theirs, &v_plain, &n_theirs] {
        assert!(!out.contains(name.as_str()), "dry run lists {name}: {out}");
    }
    assert!(out.contains("pass --yes"), "{out}");
    assert!(container_exists(&c_mine) && volume_exists(&v_mine) && network_exists(&n_mine));
    untouched();

    // --yes without --volumes: containers and networks go, volumes stay.
    let (code, out, err) = nuke(&["--supervisor", &ours, "--yes"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("removed container {c_mine}")),
        "{out}"
    );
    assert!(out.contains(&format!("removed network {n_mine}")), "{out}");
    assert!(!container_exists(&c_mine));
    assert!(!network_exists(&n_mine));
    assert!(
        volume_exists(&v_mine),
        "a volume was removed without --volumes"
    );
    untouched();

    // --volumes --yes: the volume goes too; then there is nothing left of ours.
    let (code, out, err) = nuke(&["--supervisor", &ours, "--volumes", "--yes"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("removed volume {v_mine}")), "{out}");
    assert!(!volume_exists(&v_mine));
    untouched();
    let (code, out, _) = nuke(&["--supervisor", &ours, "--volumes"]);
    assert_eq!(code, 0);
    assert!(out.contains("no labvisor-managed objects"), "{out}");
    untouched();
}

#[test]
fn nuke_refuses_unknown_arguments_and_an_empty_supervisor() {
    for args in [
        &["--supervisor", "x-never-used", "--all"][..],
        &["--supervisor", "", "--yes"][..],
    ] {
        let (code, out, err) = nuke(args);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(!out.contains("removed"), "{out}");
    }
}
