//! Lab operations against a real Docker engine and a real mosquitto: a person's `docker stop`
//! honoured, and the rolling restart (`labvisor restart --when-idle`).
//!
//! Each test runs its own supervisor ([`Sup`], a [`DockerScope`]) and broker; everything is
//! removed by label when the scope drops. Passes are counted from the supervisor's own log
//! (`Reconcile pass done.`, with `--resync 1s`), never waited for with a sleep.

use std::process::Command;
use std::time::Duration;

use assert_cmd::cargo::CommandCargoExt;
use labvisor_protocol::payloads::SutView;
mod common;

use common::{fast_sut, ps, tmp_sut_dir, views, wait_healthy, write, Sup};
use labvisor_tests::{
    docker_ok, ensure_busybox_image, wait_until, DockerScope, Mosquitto, Subscriber, BUSYBOX_IMAGE,
};

const T: Duration = Duration::from_secs(30);

/// A SUT file with fast health timings; `marker` changes its hash.
fn sut_file(marker: &str) -> String {
    fast_sut(BUSYBOX_IMAGE, &format!("[env]\nMARKER = \"{marker}\"\n"))
}

/// Reconcile passes `sup` has logged so far.
fn passes(sup: &Sup) -> usize {
    sup.log()
        .lines()
        .filter(|l| l.contains("Reconcile pass done."))
        .count()
}

/// Waits until `sup` has made `n` more passes than now.
fn wait_passes(sup: &Sup, n: usize) {
    let before = passes(sup);
    wait_until(&format!("{n} more passes"), T, || {
        (passes(sup) >= before + n).then_some(())
    });
}

/// The latest view of `sut` that `sub` saw.
fn last_view(sub: &Subscriber, sut: &str) -> Option<SutView> {
    views(sub, sut).pop()
}

/// `docker ps`'s status of the scope's container `sut`.
fn status_of(scope: &DockerScope, sut: &str) -> (String, String) {
    let mut all = ps(scope);
    all.remove(&scope.name(sut))
        .unwrap_or_else(|| panic!("no container {} in {all:?}", scope.name(sut)))
}

fn labvisor(broker: &Mosquitto, args: &[&str]) -> std::process::Output {
    Command::cargo_bin("labvisor")
        .unwrap()
        .args(args)
        .env("LABVISOR_BROKER", broker.url())
        .env_remove("LABVISOR_TOPIC_PREFIX")
        .output()
        .unwrap()
}

/// A person's `docker stop` is honoured: the container stays exited over several passes and
/// across a supervisor restart, the view and `labvisor status` say it was stopped by a person;
/// `docker start` is back to normal; a changed file recreates it.
#[test]
#[ignore = "needs Docker: tools/test.sh runs it"]
fn a_person_s_docker_stop_is_honoured() {
    ensure_busybox_image();
    let scope = DockerScope::new("ops-stop");
    let broker = Mosquitto::start();
    let sub = broker.subscribe("+/supervisor", &[]);
    let (_t, dir) = tmp_sut_dir();
    write(&dir, "a.toml", &sut_file("1"));
    let args = ["--resync", "1s"];
    let mut sup = Sup::start(&scope, &dir, Some(&broker.url()), &args);
    let id = wait_healthy(&scope, "a", T);

    docker_ok(&["stop", "-t", "2", &id]);
    let v = wait_until("the view says stopped by a person", T, || {
        last_view(&sub, "a").filter(|v| v.stopped_by_person.is_some())
    });
    let at = v.stopped_by_person.unwrap().at_ms.expect("when");
    let now = labvisor_protocol::payloads::now_ms();
    assert!(at <= now && at + 60_000 > now, "FinishedAt {at}, now {now}");
    wait_passes(&sup, 4);
    let (still, status) = status_of(&scope, "a");
    assert_eq!(still, id);
    assert!(status.starts_with("Exited"), "{status}");
    let out = labvisor(&broker, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("a ") && l.contains("stopped by a person at")),
        "{text}"
    );

    // A supervisor started meanwhile leaves it stopped too.
    sup.kill();
    let sup = Sup::start(&scope, &dir, Some(&broker.url()), &args);
    wait_passes(&sup, 4);
    let (still, status) = status_of(&scope, "a");
    assert_eq!(still, id);
    assert!(status.starts_with("Exited"), "{status}");

    // docker start: back to normal.
    docker_ok(&["start", &id]);
    assert_eq!(wait_healthy(&scope, "a", T), id);
    wait_until("the view without the stop", T, || {
        last_view(&sub, "a").filter(|v| v.stopped_by_person.is_none())
    });

    // Stopped again, then its file changes: recreated (a new container, running).
    docker_ok(&["stop", "-t", "2", &id]);
    wait_until("stopped by a person again", T, || {
        last_view(&sub, "a").filter(|v| v.stopped_by_person.is_some())
    });
    write(&dir, "a.toml", &sut_file("2"));
    let new = wait_until("a new container, healthy", T, || {
        let (new, status) = ps(&scope).remove(&scope.name("a"))?;
        (new != id && status.ends_with("(healthy)")).then_some(new)
    });
    wait_until("the view of the new container", T, || {
        last_view(&sub, "a").filter(|v| {
            v.container_id.as_deref() == Some(new.as_str()) && v.stopped_by_person.is_none()
        })
    });
}
