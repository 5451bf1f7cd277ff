//! The reconcile loop in-process, against the in-memory [`FakeRuntime`] (no Docker, no broker).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use labvisor_protocol::payloads::Health;
use labvisor_supervisor::runtime::fake::{self, FakeCall, FakeRuntime};
use labvisor_supervisor::supervise::{self, Settings};
use tokio::sync::oneshot;

const SUT: &str = "image = \"img\"\n[restart]\nbackoff_min = \"1s\"\nbackoff_max = \"2s\"\n";

fn settings(dir: &Path) -> Settings {
    Settings {
        busy_wait: Duration::from_secs(3600),
        parallelism: 6,
        ..fake::settings(dir)
    }
}

struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start(dir: &Path, rt: &FakeRuntime) -> Running {
        let (tx, rx) = oneshot::channel();
        let s = settings(dir);
        let rt = Arc::new(rt.clone());
        let task = tokio::spawn(async move {
            supervise::run(s, rt, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Running {
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap();
    }
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn has(rt: &FakeRuntime, name: &str) -> bool {
    rt.containers().iter().any(|c| c.name == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_sut_does_not_block_the_others_and_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    for s in ["a", "b", "c"] {
        std::fs::write(dir.path().join(format!("{s}.toml")), SUT).unwrap();
    }
    let rt = FakeRuntime::new();
    rt.fail_create("p-b", true);
    let sup = Running::start(dir.path(), &rt);
    until("a and c created", || has(&rt, "p-a") && has(&rt, "p-c")).await;
    until("b retried", || {
        rt.calls()
            .iter()
            .filter(|c| **c == FakeCall::Create("p-b".into()))
            .count()
            >= 2
    })
    .await;
    assert!(!has(&rt, "p-b"));
    rt.fail_create("p-b", false);
    until("b created after its backoff", || has(&rt, "p-b")).await;
    sup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_adopts_and_heals_and_survives_docker_outage() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.toml"), SUT).unwrap();
    let rt = FakeRuntime::new();
    let sup = Running::start(dir.path(), &rt);
    until("a created", || has(&rt, "p-a")).await;
    sup.stop().await;
    let id = rt.containers()[0].id.clone();

    // Docker down at start: the supervisor keeps running and reconciles once it is back.
    rt.set_down(true);
    let sup = Running::start(dir.path(), &rt);
    std::fs::write(dir.path().join("b.toml"), SUT).unwrap();
    // An outage window (not synchronisation): passes fail and back off meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;
    rt.set_down(false);
    until("b created after the outage", || has(&rt, "p-b")).await;
    // a was adopted: never created again.
    let creates: Vec<_> = rt
        .calls()
        .into_iter()
        .filter(|c| matches!(c, FakeCall::Create(_)))
        .collect();
    assert_eq!(
        creates,
        vec![
            FakeCall::Create("p-a".into()),
            FakeCall::Create("p-b".into())
        ]
    );
    assert!(rt.containers().iter().any(|c| c.id == id));

    // Unhealthy: restarted; a config change: recreated; a deleted file: removed, volume kept.
    rt.update(&id, |c| c.health = Health::Unhealthy);
    std::fs::write(
        dir.path().join("b.toml"),
        format!("{SUT}[env]\nX = \"1\"\n"),
    )
    .unwrap();
    until("a restarted", || {
        rt.calls().contains(&FakeCall::Restart(id.clone()))
    })
    .await;
    until("b recreated", || {
        rt.calls()
            .iter()
            .filter(|c| **c == FakeCall::Create("p-b".into()))
            .count()
            == 2
    })
    .await;
    std::fs::remove_file(dir.path().join("a.toml")).unwrap();
    until("a removed", || !has(&rt, "p-a")).await;
    assert!(rt.volumes().contains(&"p-labvisor.sut.a".to_owned()));
    sup.stop().await;
}

/// Without a broker (`mqtt: None`), the supervisor asks the agent itself (through the runtime)
/// before disrupting it: a busy agent's recreation and removal wait; an idle one is not asked
/// twice for nothing, and a new SUT's creation never asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_broker_a_busy_agent_is_asked_and_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.toml"), SUT).unwrap();
    let rt = FakeRuntime::new();
    let sup = Running::start(dir.path(), &rt);
    until("a created", || has(&rt, "p-a")).await;
    let id = rt.containers()[0].id.clone();
    let asked = |rt: &FakeRuntime| {
        rt.calls()
            .iter()
            .filter(|c| **c == FakeCall::AgentBusy(id.clone()))
            .count()
    };
    assert_eq!(asked(&rt), 0, "creation never asks");

    // Busy: the edit is seen and asked about, but a's container stays.
    rt.set_busy(&id, true);
    std::fs::write(
        dir.path().join("a.toml"),
        format!("{SUT}[env]\nX = \"1\"\n"),
    )
    .unwrap();
    until("the agent asked", || asked(&rt) >= 1).await;
    assert!(
        rt.containers().iter().any(|c| c.id == id),
        "kept while busy"
    );
    assert!(!rt.calls().contains(&FakeCall::Stop(id.clone())));

    // The job ends: the next pass (the 30 s resync, or here the next file event) recreates.
    rt.set_busy(&id, false);
    std::fs::write(
        dir.path().join("a.toml"),
        format!("{SUT}[env]\nX = \"2\"\n"),
    )
    .unwrap();
    until("a recreated", || {
        has(&rt, "p-a") && !rt.containers().iter().any(|c| c.id == id)
    })
    .await;

    // A removal waits the same way.
    let id2 = rt.containers()[0].id.clone();
    rt.set_busy(&id2, true);
    std::fs::remove_file(dir.path().join("a.toml")).unwrap();
    until("the new agent asked", || {
        rt.calls().contains(&FakeCall::AgentBusy(id2.clone()))
    })
    .await;
    assert!(has(&rt, "p-a"), "kept while busy");
    rt.set_busy(&id2, false);
    std::fs::write(dir.path().join("touch.txt"), "wake").unwrap();
    until("a removed once idle", || !has(&rt, "p-a")).await;
    sup.stop().await;
}

/// A burst of creations (an engine under load, so they end one after another) does not make a
/// pass, with its container list, per finished action: while actions run, passes come at most
/// once a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_creations_makes_few_passes() {
    let dir = tempfile::tempdir().unwrap();
    let rt = FakeRuntime::new();
    let names: Vec<String> = (0..12).map(|i| format!("s{i:02}")).collect();
    for (i, n) in names.iter().enumerate() {
        std::fs::write(dir.path().join(format!("{n}.toml")), SUT).unwrap();
        rt.set_create_delay(
            &format!("p-{n}"),
            Duration::from_millis(150 * (i as u64 + 1)),
        );
    }
    let started = std::time::Instant::now();
    let sup = Running::start(dir.path(), &rt);
    until("all 12 created", || {
        names.iter().all(|n| has(&rt, &format!("p-{n}")))
    })
    .await;
    let burst = started.elapsed();
    let lists = rt.lists();
    // One pass at the start, then at most one a second while creations run.
    let allowed = 2 + burst.as_secs();
    assert!(
        lists <= allowed,
        "{lists} passes during a {burst:?} burst of 12 creations (at most {allowed})"
    );
    sup.stop().await;
}
