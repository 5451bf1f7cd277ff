//! A create that fails after the engine made the SUT's volume (here: the container is made, but
//! its start fails on a device node that does not exist) removes that volume again, and only
//! that one: the volume of a SUT that had one before is kept, with its data. Against a real
//! Docker engine, with the supervisor's scope labels (see `supervise.rs`).

use std::process::Command;
use std::time::Duration;

mod common;

use common::{fast_sut, ps, tmp_sut_dir, wait_healthy, write, Sup};
use labvisor_tests::{
    docker, docker_ok, ensure_busybox_image, wait_until, DockerScope, BUSYBOX_IMAGE,
};

const T: Duration = Duration::from_secs(30);

/// A device the engine accepts at create and refuses at start.
const BAD_DEVICE: &str = "devices = [\"/dev/labvisor-test-no-such-device\"]\n";

fn volume_exists(name: &str) -> bool {
    docker(&["volume", "inspect", name]).status.success()
}

/// Lines of the supervisor's log saying the action on `sut` failed.
fn failures(sup: &Sup, sut: &str) -> usize {
    let needle = format!("sut={sut} ");
    sup.log()
        .lines()
        .filter(|l| l.contains("Action failed; will retry.") && l.contains(&needle))
        .count()
}

#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn a_failed_create_removes_only_the_volume_it_made() {
    ensure_busybox_image();
    let scope = DockerScope::new("failcreate");
    let (_t, dir) = tmp_sut_dir();
    write(&dir, "y.toml", &fast_sut(BUSYBOX_IMAGE, ""));
    let mut sup = Sup::start(&scope, &dir, None, &["--allow-devices"]);
    let y = wait_healthy(&scope, "y", T);
    assert!(
        volume_exists(&scope.name("labvisor.sut.y")),
        "y's volume name"
    );
    docker_ok(&["exec", &y, "sh", "-c", "echo kept > /labvisor/data/marker"]);

    // x is new: its create makes its volume, then fails. y's recreation fails the same way,
    // on the volume it had.
    write(
        &dir,
        "x.toml",
        &fast_sut(BUSYBOX_IMAGE, "").replacen("[health]", &format!("{BAD_DEVICE}[health]"), 1),
    );
    write(
        &dir,
        "y.toml",
        &fast_sut(BUSYBOX_IMAGE, "").replacen("[health]", &format!("{BAD_DEVICE}[health]"), 1),
    );
    wait_until("both creates failed", T, || {
        (failures(&sup, "x") >= 1 && failures(&sup, "y") >= 1).then_some(())
    });
    // SIGTERM: the supervisor lets a retry that runs now finish (with its cleanup) and exits.
    labvisor_tests::run_ok(Command::new("kill").args(["-TERM", &sup.child.id().to_string()]));
    let exit = sup.child.wait().unwrap();
    assert!(exit.success(), "{exit}\n{}", sup.log());
    let log = sup.log();
    assert!(
        log.contains("labvisor-test-no-such-device"),
        "the failures are the start's: {log}"
    );

    assert!(ps(&scope).is_empty(), "no container left: {:?}", ps(&scope));
    assert!(
        !volume_exists(&scope.name("labvisor.sut.x")),
        "x's volume, made by the failed create, is gone"
    );
    assert!(
        volume_exists(&scope.name("labvisor.sut.y")),
        "y's volume is kept"
    );
    let data = docker_ok(&[
        "run",
        "--rm",
        "--pull",
        "never",
        "--label",
        &scope.label(),
        "-v",
        &format!("{}:/d", scope.name("labvisor.sut.y")),
        BUSYBOX_IMAGE,
        "cat",
        "/d/marker",
    ]);
    assert_eq!(data, "kept");
}
