//! The reconcile loop's scenarios on the in-memory fake runtime with paused tokio time: no
//! Docker, no broker, each test a few milliseconds of real time however long it runs in
//! virtual time.
//!
//! The loop is started with [`supervise::run_with`]: file change notices are fed through
//! [`Hooks::file_events`] (each [`Sup::write`] writes the file and sends one, as notify would)
//! and the SUT views come back through [`Hooks::views`] (what `<sut>/supervisor` would say).
//! The fake's event stream is silent, so where Docker would send a `health_status` event the
//! test sends a file notice instead ([`Sup::nudge`]): either only wakes the loop.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use labvisor_mqtt::LinkState;
use labvisor_protocol::payloads::{
    now_ms, AgentState, AgentStatus, Health, RestartRequest, RestartState, RestartStatus,
    RestartStep, StoppedByPerson, SutView,
};
use labvisor_protocol::topics::Topics;
use labvisor_protocol::SutName;
use labvisor_supervisor::plan::RunState;
use labvisor_supervisor::runtime::fake::{self, FakeCall, FakeRuntime};
use labvisor_supervisor::supervise::{self, BrokerMessage, Hooks, Settings, DEBOUNCE};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

const SUT: &str = "image = \"img\"\n";
const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);
/// The virtual time a test may wait for one thing.
/// How often [`until`] looks (virtual time).
const STEP: Duration = Duration::from_millis(10);
const PATIENCE: Duration = Duration::from_secs(600);

fn settings(dir: &Path) -> Settings {
    fake::settings(dir)
}

/// A supervisor running on a fake engine, in this test's (paused) runtime.
struct Sup {
    rt: FakeRuntime,
    dir: tempfile::TempDir,
    files: mpsc::Sender<()>,
    views: watch::Receiver<BTreeMap<SutName, SutView>>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    /// Rolling restart requests in, their progress out.
    restarts: mpsc::Sender<RestartRequest>,
    restart_status: watch::Receiver<Option<RestartStatus>>,
    /// Broker messages in (agent statuses), and the state of the supervisor's broker link
    /// (down unless a test brings it up: hang detection is off then).
    messages: mpsc::Sender<BrokerMessage>,
    link: watch::Sender<LinkState>,
}

impl Sup {
    /// Writes `files` into a new SUT directory and starts the supervisor on it.
    fn start(files: &[(&str, &str)]) -> Sup {
        Self::start_with(files, |_| {})
    }

    fn start_with(files: &[(&str, &str)], tweak: impl FnOnce(&mut Settings)) -> Sup {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        Self::launch(FakeRuntime::new(), dir, tweak)
    }

    /// Starts a supervisor on the engine `rt` and the SUT directory `dir`.
    fn launch(rt: FakeRuntime, dir: tempfile::TempDir, tweak: impl FnOnce(&mut Settings)) -> Sup {
        let mut s = settings(dir.path());
        tweak(&mut s);
        let (files_tx, files_rx) = mpsc::channel(1);
        let (views_tx, views) = watch::channel(BTreeMap::new());
        let (stop, stopped) = oneshot::channel();
        let (restarts, restarts_rx) = mpsc::channel(4);
        let (restart_tx, restart_status) = watch::channel(None);
        let (messages, messages_rx) = mpsc::channel(64);
        let (link, link_rx) = watch::channel(LinkState::default());
        let hooks = Hooks {
            file_events: Some(files_rx),
            views: Some(views_tx),
            restarts: Some(restarts_rx),
            restart_status: Some(restart_tx),
            messages: Some(messages_rx),
            link_state: Some(link_rx),
        };
        let runtime = Arc::new(rt.clone());
        let task = tokio::spawn(async move {
            supervise::run_with(s, runtime, hooks, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Sup {
            rt,
            dir,
            files: files_tx,
            views,
            stop: Some(stop),
            task,
            restarts,
            restart_status,
            messages,
            link,
        }
    }

    /// Stops this supervisor and starts another on the same engine and directory.
    async fn restart(mut self) -> Sup {
        let _ = self.stop.take().unwrap().send(());
        (&mut self.task).await.unwrap();
        Self::launch(self.rt.clone(), self.dir, |_| {})
    }

    /// Writes a file of the SUT directory, and tells the loop as notify would.
    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.dir.path().join(name), text).unwrap();
        self.nudge();
    }

    /// Tells the loop that something changed (a file, or in Docker).
    fn nudge(&self) {
        let _ = self.files.try_send(());
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap();
    }

    fn view(&self, sut: &str) -> Option<SutView> {
        self.views
            .borrow()
            .get(&SutName::new(sut).unwrap())
            .cloned()
    }

    fn count(&self, call: &FakeCall) -> usize {
        self.rt.calls().iter().filter(|c| *c == call).count()
    }

    fn id(&self, name: &str) -> Option<String> {
        self.rt
            .containers()
            .into_iter()
            .find(|c| c.name == name)
            .map(|c| c.id)
    }
}

/// Waits (in virtual time, 1 ms steps) until `f` holds; returns when it first did.
async fn until(what: &str, mut f: impl FnMut() -> bool) -> Instant {
    let deadline = Instant::now() + PATIENCE;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(STEP).await;
    }
    Instant::now()
}

/// Lets the passes that follow a finished action end before the test edits files: a scan
/// running on a blocking thread could otherwise read a file while the test writes it.
async fn settle() {
    idle(S * 2).await;
}

/// Lets `d` of virtual time pass.
async fn idle(d: Duration) {
    tokio::time::sleep(d).await;
}

/// The agent in `id` hangs again: Docker says unhealthy (and sends an event). Returns when
/// the loop made its `n`th restart.
async fn unhealthy_restart(sup: &Sup, id: &str, n: usize) -> Instant {
    sup.rt.update(id, |c| c.health = Health::Unhealthy);
    sup.nudge();
    until("a restart", || {
        sup.count(&FakeCall::Restart(id.to_owned())) == n
    })
    .await
}

fn near(what: &str, got: Duration, want: Duration) {
    let slack = 60 * MS;
    assert!(
        got + slack >= want && got <= want + slack,
        "{what}: {got:?}, wanted {want:?}"
    );
}

/// A burst of writes to one SUT file (an editor saving, a script rewriting it) makes one
/// recreation, after the debounce's quiet period, of what the file finally says.
#[tokio::test(start_paused = true)]
async fn a_burst_of_file_writes_gives_one_action() {
    let sup = Sup::start(&[("a.toml", SUT)]);
    until("a created", || sup.id("p-a").is_some()).await;
    let first = sup.id("p-a").unwrap();
    settle().await;

    let mut last = Instant::now();
    for i in 0..6 {
        sup.write("a.toml", &format!("{SUT}[env]\nX = \"{i}\"\n"));
        last = Instant::now();
        idle(DEBOUNCE / 2).await;
    }
    let stopped = until("the old container stopped", || {
        sup.count(&FakeCall::Stop(first.clone())) == 1
    })
    .await;
    near("quiet period before the pass", stopped - last, DEBOUNCE);
    until("recreated", || sup.id("p-a").is_some_and(|id| id != first)).await;
    idle(S * 5).await;
    assert_eq!(
        sup.count(&FakeCall::Create("p-a".into())),
        2,
        "{:?}",
        sup.rt.calls()
    );
    assert_eq!(sup.rt.containers().len(), 1);
    sup.stop().await;
}

/// A recreation waits for a busy agent (asked through the runtime, there is no broker), shows
/// as `pending_action`, and goes ahead when `--busy-wait` runs out even though the job still
/// runs.
#[tokio::test(start_paused = true)]
async fn a_busy_agent_defers_the_recreation_until_the_busy_wait_runs_out() {
    let busy_wait = Duration::from_secs(120);
    let sup = Sup::start_with(&[("a.toml", SUT)], |s| s.busy_wait = busy_wait);
    until("a created", || sup.id("p-a").is_some()).await;
    let id = sup.id("p-a").unwrap();
    settle().await;
    sup.rt.set_busy(&id, true);

    sup.write("a.toml", &format!("{SUT}[env]\nX = \"1\"\n"));
    let edited = Instant::now();
    until("the agent asked", || {
        sup.count(&FakeCall::AgentBusy(id.clone())) > 0
    })
    .await;
    let pending = until("the pending action on the view", || {
        sup.view("a").is_some_and(|v| v.pending_action.is_some())
    })
    .await;
    let view = sup.view("a").unwrap();
    assert_eq!(
        view.pending_action.as_deref(),
        Some("recreate (waiting for the running job, at most 2m)"),
        "{view:?}"
    );
    assert_eq!(view.container_id.as_deref(), Some(id.as_str()));

    // Just before the wait runs out (resyncs and more notices in between), still waiting.
    sup.nudge();
    idle(busy_wait - S).await;
    assert_eq!(sup.count(&FakeCall::Stop(id.clone())), 0, "kept while busy");

    let stopped = until("recreated once the wait ran out", || {
        sup.count(&FakeCall::Stop(id.clone())) == 1
    })
    .await;
    near("the busy wait", stopped - pending, busy_wait);
    near("the wait began with the pass", pending - edited, DEBOUNCE);
    until("the new container", || {
        sup.id("p-a").is_some_and(|new| new != id)
    })
    .await;
    until("no pending action", || {
        sup.view("a").is_some_and(|v| v.pending_action.is_none())
    })
    .await;
    sup.stop().await;
}

/// Healing: the first restart of an unhealthy container at once, the next ones after
/// `backoff_min` doubling to `backoff_max`.
#[tokio::test(start_paused = true)]
async fn an_unhealthy_container_is_restarted_with_backoff() {
    let file = format!(
        "{SUT}[restart]\nbackoff_min = \"1s\"\nbackoff_max = \"4s\"\ncrash_loop_after = 100\n"
    );
    let sup = Sup::start(&[("a.toml", &file)]);
    until("a created", || sup.id("p-a").is_some()).await;
    let id = sup.id("p-a").unwrap();
    settle().await;
    let mut times = Vec::new();
    for n in 1..=5 {
        times.push(unhealthy_restart(&sup, &id, n).await);
    }
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    for (gap, want) in gaps.iter().zip([1, 2, 4, 4]) {
        near("the delay between restarts", *gap, S * want);
    }
    until("the restarts on the view", || {
        sup.view("a").is_some_and(|v| v.restarts == 5)
    })
    .await;
    assert!(!sup.view("a").unwrap().crash_loop);
    assert_eq!(
        sup.count(&FakeCall::Create("p-a".into())),
        1,
        "restarted, not recreated"
    );
    sup.stop().await;
}

/// A crash loop: after `crash_loop_after` restarts without a healthy minute the SUT is flagged
/// (restarts go on at the longest delay); a healthy minute clears the flag and the backoff.
#[tokio::test(start_paused = true)]
async fn a_crash_loop_is_flagged_and_a_healthy_minute_clears_it() {
    let file = format!(
        "{SUT}[restart]\nbackoff_min = \"1s\"\nbackoff_max = \"2s\"\ncrash_loop_after = 3\n"
    );
    let sup = Sup::start(&[("a.toml", &file)]);
    until("a created", || sup.id("p-a").is_some()).await;
    let id = sup.id("p-a").unwrap();
    settle().await;
    unhealthy_restart(&sup, &id, 1).await;
    unhealthy_restart(&sup, &id, 2).await;
    until("restarts on the view", || {
        sup.view("a").is_some_and(|v| v.restarts == 2)
    })
    .await;
    assert!(!sup.view("a").unwrap().crash_loop);
    let third = unhealthy_restart(&sup, &id, 3).await;
    until("the crash loop on the view", || {
        sup.view("a").is_some_and(|v| v.crash_loop)
    })
    .await;
    let fourth = unhealthy_restart(&sup, &id, 4).await;
    near("restarts go on at the longest delay", fourth - third, S * 2);

    // Healthy for a minute (resyncs every 30 s see it): the flag clears.
    sup.rt.update(&id, |c| c.health = Health::Healthy);
    sup.nudge();
    let healthy = Instant::now();
    idle(Duration::from_secs(59)).await;
    assert!(sup.view("a").unwrap().crash_loop, "not yet a minute");
    let cleared = until("the crash loop cleared", || {
        sup.view("a").is_some_and(|v| !v.crash_loop)
    })
    .await;
    assert!(cleared - healthy >= Duration::from_secs(60));
    assert_eq!(sup.view("a").unwrap().restarts, 4, "the count stays");
    // And the backoff: the next restart happens at once.
    let before = Instant::now();
    let fifth = unhealthy_restart(&sup, &id, 5).await;
    assert!(fifth - before < DEBOUNCE + 50 * MS, "{:?}", fifth - before);
    sup.stop().await;
}

/// Docker goes away: passes fail and are retried with backoff (1 s doubling), nothing is
/// touched meanwhile; when it is back the next retry reconciles what changed during the
/// outage, adopts what was there, and the backoff starts again from 1 s.
#[tokio::test(start_paused = true)]
async fn a_docker_outage_backs_off_and_recovers() {
    let sup = Sup::start(&[("a.toml", SUT)]);
    until("a created", || sup.id("p-a").is_some()).await;
    let a = sup.id("p-a").unwrap();
    settle().await;

    sup.rt.set_down(true);
    sup.write("b.toml", SUT);
    let down = Instant::now();
    // Failing passes at +0.15 s, then 1, 2, 4, 8 s later (+1.15, +3.15, +7.15, +15.15).
    idle(S * 10).await;
    assert!(sup.id("p-b").is_none());
    sup.rt.set_down(false);
    let created = until("b created after the outage", || sup.id("p-b").is_some()).await;
    near(
        "the retry after the outage",
        created - down,
        DEBOUNCE + S * (1 + 2 + 4 + 8),
    );
    assert_eq!(sup.id("p-a").as_deref(), Some(a.as_str()), "a adopted");
    assert_eq!(sup.count(&FakeCall::Create("p-a".into())), 1);

    // A second outage: the backoff starts again from 1 s.
    idle(S).await;
    sup.rt.set_down(true);
    sup.write("c.toml", SUT);
    let down = Instant::now();
    idle(DEBOUNCE + 10 * MS).await;
    sup.rt.set_down(false);
    let created = until("c created", || sup.id("p-c").is_some()).await;
    near("the first retry", created - down, DEBOUNCE + S);
    sup.stop().await;
}

/// A failed action is retried for its SUT alone with backoff (1 s doubling), the other SUTs
/// go on, and the error shows on the SUT's view until an attempt succeeds.
#[tokio::test(start_paused = true)]
async fn a_failing_sut_is_retried_with_backoff_and_alone() {
    let sup = Sup::start(&[("a.toml", SUT), ("b.toml", SUT)]);
    sup.rt.fail_create("p-b", true);
    until("a created", || sup.id("p-a").is_some()).await;
    let mut times = Vec::new();
    for n in 1..=4 {
        times.push(
            until("a create of b", || {
                sup.count(&FakeCall::Create("p-b".into())) == n
            })
            .await,
        );
    }
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    for (gap, want) in gaps.iter().zip([1, 2, 4]) {
        near("the retry delay", *gap, S * want);
    }
    let view = sup.view("b").unwrap();
    assert!(
        view.last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("create: ")),
        "{view:?}"
    );
    sup.rt.fail_create("p-b", false);
    until("b created", || sup.id("p-b").is_some()).await;
    until("the error cleared", || {
        sup.view("b").is_some_and(|v| v.last_error.is_none())
    })
    .await;
    sup.stop().await;
}

/// A person's `docker stop`: the container stays exited however many passes run (the engine
/// is listed again and again), also under a supervisor started meanwhile, and the view says
/// who stopped it and when; `docker start` brings the normal view back; a changed file
/// recreates it (running).
#[tokio::test(start_paused = true)]
async fn a_person_s_stop_is_honoured_until_started_or_the_file_changes() {
    let sup = Sup::start(&[("a.toml", SUT)]);
    until("a created", || sup.id("p-a").is_some()).await;
    let id = sup.id("p-a").unwrap();
    settle().await;

    let stopped_at = 1_796_000_000_000;
    sup.rt.update(&id, |c| {
        c.state = RunState::Exited;
        c.health = Health::None;
        c.finished_ms = Some(stopped_at);
    });
    sup.nudge();
    let lists = sup.rt.lists();
    for _ in 0..5 {
        sup.nudge();
        idle(DEBOUNCE * 2).await;
    }
    until("five more passes", || sup.rt.lists() >= lists + 5).await;
    let view = sup.view("a").unwrap();
    assert_eq!(
        view.stopped_by_person,
        Some(StoppedByPerson {
            at_ms: Some(stopped_at)
        })
    );
    assert_eq!(
        sup.count(&FakeCall::Start(id.clone())),
        0,
        "{:?}",
        sup.rt.calls()
    );

    // A supervisor started meanwhile does not start it either.
    let sup = sup.restart().await;
    let lists = sup.rt.lists();
    until("two passes of the new supervisor", || {
        sup.rt.lists() >= lists + 2
    })
    .await;
    until("its view", || sup.view("a").is_some()).await;
    assert!(sup.view("a").unwrap().stopped_by_person.is_some());
    assert_eq!(sup.count(&FakeCall::Start(id.clone())), 0);
    assert_eq!(
        sup.id("p-a").as_deref(),
        Some(id.as_str()),
        "adopted, not recreated"
    );

    // `docker start`: back to normal.
    sup.rt.update(&id, |c| {
        c.state = RunState::Running;
        c.health = Health::Healthy;
        c.finished_ms = None;
    });
    sup.nudge();
    until("the view without the stop", || {
        sup.view("a").is_some_and(|v| v.stopped_by_person.is_none())
    })
    .await;

    // Stopped again, then its file changes: recreated, and the new container runs.
    sup.rt.update(&id, |c| {
        c.state = RunState::Exited;
        c.finished_ms = Some(stopped_at);
    });
    sup.nudge();
    until("stopped by a person again", || {
        sup.view("a").is_some_and(|v| v.stopped_by_person.is_some())
    })
    .await;
    settle().await;
    sup.write("a.toml", &format!("{SUT}[env]\nX = \"1\"\n"));
    until("recreated", || sup.id("p-a").is_some_and(|n| n != id)).await;
    until("the view of the new container", || {
        sup.view("a")
            .is_some_and(|v| v.stopped_by_person.is_none() && v.container_id != Some(id.clone()))
    })
    .await;
    let new = sup.id("p-a").unwrap();
    let c = sup
        .rt
        .containers()
        .into_iter()
        .find(|c| c.id == new)
        .unwrap();
    assert_eq!(c.state, RunState::Running);
    assert_eq!(sup.count(&FakeCall::Start(id)), 0);
    sup.stop().await;
}

/// The device's own work (`device.busy_glob` matched, asked through the runtime): a
/// recreation waits for it, the view names it, and the agent is asked to drain its device
/// process; when the file is reverted the drain is lifted and nothing is recreated; edited
/// again, it waits again, and once the work is over the container is recreated (no lift: the
/// container is gone).
#[tokio::test(start_paused = true)]
async fn the_devices_own_work_defers_the_recreation_drains_and_lifts() {
    let sup = Sup::start(&[("a.toml", SUT)]);
    until("a created", || sup.id("p-a").is_some()).await;
    let id = sup.id("p-a").unwrap();
    settle().await;
    let work = "/tmp/testflinger/run/j1/testflinger.json";
    sup.rt.set_device_work(&id, Some(work));
    let drain = FakeCall::AgentDrain(id.clone(), false);
    let lift = FakeCall::AgentDrain(id.clone(), true);

    sup.write("a.toml", &format!("{SUT}[env]\nX = \"1\"\n"));
    until("the pending action on the view", || {
        sup.view("a").is_some_and(|v| v.pending_action.is_some())
    })
    .await;
    assert_eq!(
        sup.view("a").unwrap().pending_action.as_deref(),
        Some(format!("recreate waits for the device's own work: {work} (at most 10m)").as_str())
    );
    until("the drain asked", || sup.count(&drain) > 0).await;
    assert_eq!(sup.count(&lift), 0);

    // Reverted: nothing waits any more, the drain is lifted, nothing is recreated.
    settle().await;
    sup.write("a.toml", SUT);
    until("the drain lifted", || sup.count(&lift) == 1).await;
    until("no pending action", || {
        sup.view("a").is_some_and(|v| v.pending_action.is_none())
    })
    .await;
    assert_eq!(sup.count(&FakeCall::Stop(id.clone())), 0);

    // Edited again: it waits; the work ends: recreated at once, and no lift is sent.
    settle().await;
    sup.write("a.toml", &format!("{SUT}[env]\nX = \"2\"\n"));
    let asked = sup.count(&drain);
    until("the drain asked again", || sup.count(&drain) > asked).await;
    assert_eq!(
        sup.count(&FakeCall::Stop(id.clone())),
        0,
        "kept while it works"
    );
    sup.rt.set_device_work(&id, None);
    sup.nudge();
    until("recreated once the work is over", || {
        sup.count(&FakeCall::Stop(id.clone())) == 1
    })
    .await;
    until("the new container", || {
        sup.id("p-a").is_some_and(|new| new != id)
    })
    .await;
    settle().await;
    assert_eq!(sup.count(&lift), 1, "no lift for a container that is gone");
    sup.stop().await;
}

/// Notes the rolling restart's progress when it changed; returns the latest.
fn record(sup: &Sup, seen: &mut Vec<RestartStatus>) -> Option<RestartStatus> {
    let st = sup.restart_status.borrow().clone()?;
    if seen.last() != Some(&st) {
        seen.push(st.clone());
    }
    Some(st)
}

/// A rolling restart: the busy agent's recreation is deferred and the turn passes on, so the
/// two idle SUTs are recreated first, one at a time (each once the one before is healthy:
/// never two recreating or starting at once); the busy one follows when its job ends.
#[tokio::test(start_paused = true)]
async fn a_rolling_restart_goes_round_a_busy_agent() {
    let sup = Sup::start(&[("a.toml", SUT), ("b.toml", SUT), ("c.toml", SUT)]);
    until("all created", || {
        ["p-a", "p-b", "p-c"].iter().all(|n| sup.id(n).is_some())
    })
    .await;
    settle().await;
    let old: Vec<String> = ["p-a", "p-b", "p-c"]
        .iter()
        .map(|n| sup.id(n).unwrap())
        .collect();
    sup.rt.set_busy(&old[0], true);
    sup.restarts
        .send(RestartRequest {
            v: 1,
            id: "r1".into(),
            suts: ["a", "b", "c"]
                .iter()
                .map(|s| SutName::new(s).unwrap())
                .collect(),
            all: false,
            when_idle: true,
        })
        .await
        .unwrap();
    let mut seen: Vec<RestartStatus> = Vec::new();
    until("b and c restarted", || {
        record(&sup, &mut seen).is_some_and(|st| {
            st.suts[1].step == RestartStep::Done && st.suts[2].step == RestartStep::Done
        })
    })
    .await;
    assert_eq!(
        sup.id("p-a").as_deref(),
        Some(old[0].as_str()),
        "a waits for its job"
    );
    assert_ne!(sup.id("p-b").unwrap(), old[1]);
    assert_ne!(sup.id("p-c").unwrap(), old[2]);
    until("a's view says the restart waits", || {
        sup.view("a").is_some_and(|v| {
            v.pending_action
                .as_deref()
                .is_some_and(|p| p.starts_with("restart"))
        })
    })
    .await;
    assert_eq!(sup.count(&FakeCall::Stop(old[0].clone())), 0);

    sup.rt.set_busy(&old[0], false);
    sup.nudge();
    until("a restarted, the restart done", || {
        record(&sup, &mut seen).is_some_and(|st| st.state == RestartState::Done)
    })
    .await;
    assert_ne!(sup.id("p-a").unwrap(), old[0]);
    for st in &seen {
        let moving = st
            .suts
            .iter()
            .filter(|s| {
                matches!(
                    s.step,
                    RestartStep::Recreating | RestartStep::WaitingHealthy
                )
            })
            .count();
        assert!(moving <= 1, "{st:?}");
    }
    assert_eq!(sup.rt.containers().len(), 3);
    sup.stop().await;
}

/// Sends a rolling restart request for `suts`.
async fn request_restart(sup: &Sup, id: &str, suts: &[&str]) {
    sup.restarts
        .send(RestartRequest {
            v: 1,
            id: id.into(),
            suts: suts.iter().map(|s| SutName::new(s).unwrap()).collect(),
            all: false,
            when_idle: true,
        })
        .await
        .unwrap();
}

/// A rolling restart's recreation that fails after the stop (here the remove) starts the
/// container again: it keeps its config hash, so left exited it would pass for a person's stop
/// and stay down for good.
#[tokio::test(start_paused = true)]
async fn a_failed_restart_after_the_stop_starts_the_container_again() {
    let sup = Sup::start(&[("a.toml", SUT)]);
    until("a created", || sup.id("p-a").is_some()).await;
    let id = sup.id("p-a").unwrap();
    settle().await;
    sup.rt.fail_remove(&id, true);
    request_restart(&sup, "r1", &["a"]).await;
    until("the restart failed", || {
        sup.restart_status
            .borrow()
            .as_ref()
            .is_some_and(|st| st.state == RestartState::Failed)
    })
    .await;
    assert_eq!(sup.count(&FakeCall::Stop(id.clone())), 1);
    settle().await;
    let c = sup
        .rt
        .containers()
        .into_iter()
        .find(|c| c.id == id)
        .unwrap();
    assert_eq!(c.state, RunState::Running, "{:?}", sup.rt.calls());
    assert_eq!(sup.count(&FakeCall::Start(id.clone())), 1);
    let view = sup.view("a").unwrap();
    assert!(view.stopped_by_person.is_none(), "{view:?}");

    // Again, and starting it again fails too: the loop remembers that it stopped the
    // container itself and starts it (retrying) instead of leaving it as a person's stop.
    sup.rt.fail_start(&id, true);
    request_restart(&sup, "r2", &["a"]).await;
    until("the second restart failed", || {
        sup.restart_status
            .borrow()
            .as_ref()
            .is_some_and(|st| st.id == "r2" && st.state == RestartState::Failed)
    })
    .await;
    until("a start retried", || {
        sup.count(&FakeCall::Start(id.clone())) >= 3
    })
    .await;
    let view = sup.view("a").unwrap();
    assert!(view.stopped_by_person.is_none(), "{view:?}");
    sup.rt.fail_start(&id, false);
    until("running again", || {
        sup.rt
            .containers()
            .iter()
            .any(|c| c.id == id && c.state == RunState::Running)
    })
    .await;
    sup.stop().await;
}

/// A healing restart whose start fails after the stop (`docker restart` leaves the container
/// exited, with the wanted hash) does not pass for a person's stop: the loop starts the
/// container again, with backoff, until it runs.
#[tokio::test(start_paused = true)]
async fn a_failed_healing_restart_starts_the_container_again() {
    let sup = Sup::start(&[("a.toml", SUT)]);
    until("a created", || sup.id("p-a").is_some()).await;
    let id = sup.id("p-a").unwrap();
    settle().await;
    sup.rt.fail_start(&id, true);
    unhealthy_restart(&sup, &id, 1).await;
    until("a start tried", || {
        sup.count(&FakeCall::Start(id.clone())) >= 1
    })
    .await;
    until("a start retried", || {
        sup.count(&FakeCall::Start(id.clone())) >= 2
    })
    .await;
    let view = sup.view("a").unwrap();
    assert!(view.stopped_by_person.is_none(), "{view:?}");
    sup.rt.fail_start(&id, false);
    until("running again", || {
        sup.rt
            .containers()
            .iter()
            .any(|c| c.id == id && c.state == RunState::Running)
    })
    .await;
    settle().await;
    assert_eq!(
        sup.count(&FakeCall::Create("p-a".into())),
        1,
        "started, not recreated"
    );
    sup.stop().await;
}

/// A rolling restart of two SUTs whose devices both work on their own: the turn goes back and
/// forth between the two deferred recreations, and each SUT drained stays drained (no lift
/// while it is still to be restarted); each one's busy wait runs from its first deferral, so
/// both are recreated within `--busy-wait` (and a resync) although the work never ends.
#[tokio::test(start_paused = true)]
async fn a_rolling_restart_of_two_working_devices_drains_both_and_ends_within_the_busy_wait() {
    let busy_wait = Duration::from_secs(120);
    let sup = Sup::start_with(&[("a.toml", SUT), ("b.toml", SUT)], |s| {
        s.busy_wait = busy_wait
    });
    until("both created", || {
        sup.id("p-a").is_some() && sup.id("p-b").is_some()
    })
    .await;
    settle().await;
    let old = [sup.id("p-a").unwrap(), sup.id("p-b").unwrap()];
    for id in &old {
        sup.rt
            .set_device_work(id, Some("/tmp/testflinger/run/j/testflinger.json"));
    }
    let asked = Instant::now();
    request_restart(&sup, "r1", &["a", "b"]).await;
    until("both drained", || {
        old.iter()
            .all(|id| sup.count(&FakeCall::AgentDrain(id.clone(), false)) > 0)
    })
    .await;
    let done = until("the restart done", || {
        sup.restart_status
            .borrow()
            .as_ref()
            .is_some_and(|st| st.state == RestartState::Done)
    })
    .await;
    assert!(
        done - asked <= busy_wait + Duration::from_secs(31),
        "took {:?}",
        done - asked
    );
    for id in &old {
        assert_eq!(
            sup.count(&FakeCall::AgentDrain(id.clone(), true)),
            0,
            "{:?}",
            sup.rt.calls()
        );
        assert_eq!(sup.count(&FakeCall::Stop(id.clone())), 1);
    }
    sup.stop().await;
}

/// A drain left by an earlier run of the supervisor (it restarted while a recreation waited
/// for the device's own work, then the file was reverted) is lifted: the new run asks the
/// agent once, on first sight, whether it is drained, and nothing waits for the device.
#[tokio::test(start_paused = true)]
async fn a_drain_left_by_a_restarted_supervisor_is_lifted() {
    let file = "image = \"img\"\ncommand = [\"device\"]\n[device]\nbusy_glob = [\"/tmp/w/*\"]\ndrain_signal = \"SIGUSR1\"\n";
    let sup = Sup::start(&[("a.toml", file)]);
    until("a created", || sup.id("p-a").is_some()).await;
    let id = sup.id("p-a").unwrap();
    settle().await;
    sup.rt.set_device_work(&id, Some("/tmp/w/j1"));
    let drain = FakeCall::AgentDrain(id.clone(), false);
    let lift = FakeCall::AgentDrain(id.clone(), true);
    sup.write("a.toml", &format!("{file}[env]\nX = \"1\"\n"));
    until("the drain asked", || sup.count(&drain) > 0).await;

    // The supervisor restarts; meanwhile the file is reverted and the work ends.
    let sup = sup.restart().await;
    std::fs::write(sup.dir.path().join("a.toml"), file).unwrap();
    sup.rt.set_device_work(&id, None);
    sup.nudge();
    until("the drain lifted", || sup.count(&lift) == 1).await;
    settle().await;
    assert_eq!(sup.id("p-a").as_deref(), Some(id.as_str()), "kept");
    assert_eq!(sup.count(&FakeCall::Stop(id.clone())), 0);
    // Asked once: more passes ask no more.
    let asks = sup.count(&FakeCall::AgentBusy(id.clone()));
    for _ in 0..3 {
        sup.nudge();
        idle(DEBOUNCE * 2).await;
    }
    assert_eq!(sup.count(&FakeCall::AgentBusy(id.clone())), asks);
    assert_eq!(sup.count(&lift), 1);
    sup.stop().await;
}

// -- the supervisor's own hang detection (Docker's probe is slow at scale; see plan::hang) --

/// A SUT whose agent is judged quickly: heartbeat 1 s, max_age 4 s, no start period. Docker's
/// health (the fake's) stays `healthy` throughout: every restart below is the supervisor's own
/// judgement.
const QUICK: &str =
    "image = \"img\"\n[health]\nheartbeat = \"1s\"\nmax_age = \"4s\"\nstart_period = \"0s\"\n";
const MAX_AGE: Duration = Duration::from_secs(4);

/// A supervisor whose agents publish on a broker (the fake's have none by default): it
/// watches them for hangs.
fn watching(files: &[(&str, &str)]) -> Sup {
    Sup::start_with(files, |s| {
        s.spec.agent_broker = Some("mqtt://broker:1883".into());
    })
}

impl Sup {
    /// The supervisor's broker link is up (its `connects`th connection) or down.
    fn link(&self, up: bool, connects: u64) {
        self.link.send_replace(LinkState {
            connected: up,
            connects,
            ..LinkState::default()
        });
    }

    /// `sut`'s agent publishes a live status in `state` (as the broker would deliver it).
    async fn say(&self, sut: &str, state: AgentState) {
        say(&self.messages, sut, state, false).await;
    }

    /// `sut`'s agent publishes `idle` every second while the returned flag is true.
    fn heartbeats(&self, sut: &str) -> Arc<AtomicBool> {
        let alive = Arc::new(AtomicBool::new(true));
        let (flag, tx, sut) = (alive.clone(), self.messages.clone(), sut.to_owned());
        tokio::spawn(async move {
            while !tx.is_closed() {
                if flag.load(Ordering::SeqCst) {
                    say(&tx, &sut, AgentState::Idle, false).await;
                }
                tokio::time::sleep(S).await;
            }
        });
        alive
    }

    /// Every distinct `health_reason` the views of `sut` carry from now on.
    fn reasons(&self, sut: &str) -> Arc<std::sync::Mutex<Vec<String>>> {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (out, mut views, sut) = (seen.clone(), self.views.clone(), SutName::new(sut).unwrap());
        tokio::spawn(async move {
            while views.changed().await.is_ok() {
                let why = views
                    .borrow()
                    .get(&sut)
                    .and_then(|v| v.health_reason.clone());
                let mut out = out.lock().unwrap();
                if let Some(why) = why.filter(|w| out.last() != Some(w)) {
                    out.push(why);
                }
            }
        });
        seen
    }
}

async fn say(tx: &mpsc::Sender<BrokerMessage>, sut: &str, state: AgentState, retained: bool) {
    let sut = SutName::new(sut).unwrap();
    let status = AgentStatus::new(sut.clone(), "boot", "test", now_ms()).with_state(state);
    let _ = tx
        .send(BrokerMessage {
            topic: Topics::new().agent(&sut),
            payload: serde_json::to_vec(&status).unwrap(),
            retained,
        })
        .await;
}

/// A SUT whose agent published for a while, with the link up; returns the container id and the
/// agent's heartbeat switch.
async fn judged(sup: &Sup, sut: &str) -> (String, Arc<AtomicBool>) {
    let name = format!("p-{sut}");
    until("created", || sup.id(&name).is_some()).await;
    let id = sup.id(&name).unwrap();
    let beat = sup.heartbeats(sut);
    idle(MAX_AGE * 3).await;
    assert_eq!(
        sup.count(&FakeCall::AgentBusy(id.clone())),
        0,
        "an agent heard on the broker is never asked"
    );
    (id, beat)
}

/// A silent agent whose heartbeat the healthcheck finds stale is restarted within `max_age`
/// of its last status (plus the pass: here nothing, in virtual time), with the reason on its
/// view, after exactly one exec; once its new run publishes, nothing more happens.
#[tokio::test(start_paused = true)]
async fn a_silent_agent_confirmed_hung_is_restarted_within_max_age() {
    let sup = watching(&[("a.toml", QUICK)]);
    sup.link(true, 1);
    let (id, beat) = judged(&sup, "a").await;
    let reasons = sup.reasons("a");
    beat.store(false, Ordering::SeqCst);
    sup.rt.set_hung(&id, true);
    let hung = Instant::now();
    let restarted = until("the restart", || {
        sup.count(&FakeCall::Restart(id.clone())) == 1
    })
    .await;
    let took = restarted - hung;
    assert!(
        took >= MAX_AGE - S && took <= MAX_AGE + 100 * MS,
        "restarted {took:?} after the last heartbeat (max_age {MAX_AGE:?})"
    );
    assert_eq!(sup.count(&FakeCall::AgentBusy(id.clone())), 1, "one exec");
    until("the reason on the view", || {
        !reasons.lock().unwrap().is_empty()
    })
    .await;
    let why = reasons.lock().unwrap()[0].clone();
    assert!(
        why.starts_with("no heartbeat for ") && why.contains("hung or dead"),
        "{why}"
    );
    // The new run publishes again.
    sup.rt.set_hung(&id, false);
    beat.store(true, Ordering::SeqCst);
    idle(MAX_AGE * 10).await;
    assert_eq!(
        sup.count(&FakeCall::Restart(id.clone())),
        1,
        "exactly one restart"
    );
    assert_eq!(sup.count(&FakeCall::AgentBusy(id.clone())), 1);
    // Docker's probe (the fake's) says the new run is healthy.
    sup.rt.update(&id, |c| c.health = Health::Healthy);
    sup.nudge();
    idle(S).await;
    let view = sup.view("a").unwrap();
    assert_eq!((view.health, view.health_reason), (Health::Healthy, None));
    assert_eq!(view.restarts, 1);
    sup.stop().await;
}

/// An agent that is alive but off the broker (its heartbeat fresh) is not restarted: it is
/// asked at most once per `max_age` while it stays silent, and no more once it is heard.
#[tokio::test(start_paused = true)]
async fn an_agent_alive_but_off_the_broker_is_not_restarted() {
    let sup = watching(&[("a.toml", QUICK)]);
    sup.link(true, 1);
    let (id, beat) = judged(&sup, "a").await;
    beat.store(false, Ordering::SeqCst);
    idle(MAX_AGE * 15).await;
    let asked = sup.count(&FakeCall::AgentBusy(id.clone()));
    assert!(
        (13..=15).contains(&asked),
        "asked {asked} times in 15 max_age"
    );
    beat.store(true, Ordering::SeqCst);
    idle(MAX_AGE * 5).await;
    assert!(
        sup.count(&FakeCall::AgentBusy(id.clone())) <= asked + 1,
        "at most the one due"
    );
    assert_eq!(sup.count(&FakeCall::Restart(id.clone())), 0);
    assert_eq!(sup.view("a").unwrap().health_reason, None);
    sup.stop().await;
}

/// A silent agent that cannot be checked (every exec into its container fails) is asked once
/// per `max_age`, and the `health.retries`th failure in a row (3 by default) counts as a
/// confirmed hang: it is restarted, with a reason saying so.
#[tokio::test(start_paused = true)]
async fn a_silent_agent_that_cannot_be_checked_is_restarted_after_retries() {
    let sup = watching(&[("a.toml", QUICK)]);
    sup.link(true, 1);
    let (id, beat) = judged(&sup, "a").await;
    let reasons = sup.reasons("a");
    sup.rt.set_exec_fails(&id, true);
    beat.store(false, Ordering::SeqCst);
    let silent = Instant::now();
    let restarted = until("the restart", || {
        sup.count(&FakeCall::Restart(id.clone())) == 1
    })
    .await;
    let took = restarted - silent;
    assert!(
        took >= MAX_AGE * 3 - S && took <= MAX_AGE * 3 + 100 * MS,
        "restarted {took:?} after the last heartbeat (max_age {MAX_AGE:?})"
    );
    assert_eq!(
        sup.count(&FakeCall::AgentBusy(id.clone())),
        3,
        "three execs"
    );
    until("the reason on the view", || {
        !reasons.lock().unwrap().is_empty()
    })
    .await;
    let why = reasons.lock().unwrap()[0].clone();
    assert!(
        why.contains("the hang check could not run 3 times"),
        "{why}"
    );
    sup.stop().await;
}

/// While the supervisor's own broker link is down it judges nobody (every agent is silent to
/// it); once the link is back, silence counts from then: a hung agent is restarted `max_age`
/// after the reconnection, not before. A retained status (sent at subscription) is no sign of
/// life.
#[tokio::test(start_paused = true)]
async fn no_restart_while_the_supervisors_link_is_down() {
    let sup = watching(&[("a.toml", QUICK)]);
    sup.link(true, 1);
    let (id, beat) = judged(&sup, "a").await;
    sup.link(false, 1);
    beat.store(false, Ordering::SeqCst);
    sup.rt.set_hung(&id, true);
    idle(MAX_AGE * 15).await;
    assert_eq!(sup.count(&FakeCall::Restart(id.clone())), 0);
    assert_eq!(
        sup.count(&FakeCall::AgentBusy(id.clone())),
        0,
        "not even asked"
    );
    sup.link(true, 2);
    let back = Instant::now();
    say(&sup.messages, "a", AgentState::Idle, true).await;
    let restarted = until("the restart", || {
        sup.count(&FakeCall::Restart(id.clone())) == 1
    })
    .await;
    near("restart after the reconnection", restarted - back, MAX_AGE);
    sup.stop().await;
}

/// Every agent silent at once is a broker outage on the agents' side, not a lab of hung
/// agents: nothing is restarted and no agent is asked. When one agent is heard again, the one
/// still silent (and hung) is confirmed and restarted, alone.
#[tokio::test(start_paused = true)]
async fn every_agent_silent_at_once_restarts_nothing() {
    let sup = watching(&[("a.toml", QUICK), ("b.toml", QUICK)]);
    sup.link(true, 1);
    until("b created", || sup.id("p-b").is_some()).await;
    let b = sup.id("p-b").unwrap();
    let beat_b = sup.heartbeats("b");
    let (a, beat_a) = judged(&sup, "a").await;
    assert_eq!(sup.count(&FakeCall::AgentBusy(b.clone())), 0);
    beat_a.store(false, Ordering::SeqCst);
    beat_b.store(false, Ordering::SeqCst);
    sup.rt.set_hung(&a, true);
    sup.rt.set_hung(&b, true);
    idle(MAX_AGE * 15).await;
    for id in [&a, &b] {
        assert_eq!(sup.count(&FakeCall::Restart(id.clone())), 0);
        assert_eq!(sup.count(&FakeCall::AgentBusy(id.clone())), 0);
    }
    sup.rt.set_hung(&b, false);
    beat_b.store(true, Ordering::SeqCst);
    let heard = Instant::now();
    let restarted = until("a's restart", || {
        sup.count(&FakeCall::Restart(a.clone())) == 1
    })
    .await;
    assert!(
        restarted - heard <= MAX_AGE + 100 * MS,
        "{:?}",
        restarted - heard
    );
    // a's new run publishes.
    sup.rt.set_hung(&a, false);
    beat_a.store(true, Ordering::SeqCst);
    idle(MAX_AGE * 3).await;
    assert_eq!(sup.count(&FakeCall::Restart(a.clone())), 1);
    assert_eq!(sup.count(&FakeCall::Restart(b.clone())), 0);
    sup.stop().await;
}

/// An agent's own fresh status saying `crash-loop` makes its container unhealthy at once
/// (Docker's slow probe is not waited for): one restart; the new run's statuses end it.
#[tokio::test(start_paused = true)]
async fn an_agents_own_crash_loop_status_restarts_it_at_once() {
    let sup = watching(&[("a.toml", QUICK)]);
    sup.link(true, 1);
    let (id, beat) = judged(&sup, "a").await;
    beat.store(false, Ordering::SeqCst);
    sup.say("a", AgentState::CrashLoop).await;
    let said = Instant::now();
    let restarted = until("the restart", || {
        sup.count(&FakeCall::Restart(id.clone())) == 1
    })
    .await;
    assert!(restarted - said <= S, "{:?}", restarted - said);
    beat.store(true, Ordering::SeqCst);
    idle(MAX_AGE * 5).await;
    assert_eq!(sup.count(&FakeCall::Restart(id.clone())), 1);
    assert_eq!(
        sup.count(&FakeCall::AgentBusy(id.clone())),
        0,
        "no exec needed"
    );
    sup.stop().await;
}

/// A container paused (`docker pause`) for longer than `max_age` is not suspect the moment it
/// runs again: its frozen agent wrote no heartbeat, so its silence counts from the unpause, as
/// from a start. Here the thawed agent's heartbeat file is still stale at first; it publishes
/// again within `max_age`, so it is neither asked nor restarted.
#[tokio::test(start_paused = true)]
async fn an_unpaused_agent_counts_as_started_then() {
    let sup = watching(&[("a.toml", QUICK)]);
    sup.link(true, 1);
    let (id, beat) = judged(&sup, "a").await;
    beat.store(false, Ordering::SeqCst);
    sup.rt.update(&id, |c| c.state = RunState::Paused);
    sup.nudge();
    idle(MAX_AGE * 5).await;
    sup.rt.set_hung(&id, true);
    sup.rt.update(&id, |c| c.state = RunState::Running);
    sup.nudge();
    idle(MAX_AGE - S).await;
    assert_eq!(sup.count(&FakeCall::AgentBusy(id.clone())), 0, "not asked");
    sup.rt.set_hung(&id, false);
    beat.store(true, Ordering::SeqCst);
    idle(MAX_AGE * 5).await;
    assert_eq!(sup.count(&FakeCall::AgentBusy(id.clone())), 0, "not asked");
    assert_eq!(
        sup.count(&FakeCall::Restart(id.clone())),
        0,
        "not restarted"
    );
    sup.stop().await;
}

/// Agents without MQTT (`--agent-broker none`) are never heard, so the supervisor does not
/// watch them: a silent, hung agent is left to Docker's probe (no exec, no restart).
#[tokio::test(start_paused = true)]
async fn agents_without_mqtt_are_left_to_dockers_probe() {
    let sup = Sup::start(&[("a.toml", QUICK)]);
    sup.link(true, 1);
    until("created", || sup.id("p-a").is_some()).await;
    let id = sup.id("p-a").unwrap();
    sup.rt.set_hung(&id, true);
    idle(MAX_AGE * 15).await;
    assert_eq!(sup.count(&FakeCall::AgentBusy(id.clone())), 0);
    assert_eq!(sup.count(&FakeCall::Restart(id.clone())), 0);
    sup.stop().await;
}

// -- A runtime that heals itself and updates in place (Swarm, issue 17), on the fake.

/// A supervisor watching its agents on a broker (link up) on a fake engine that `heals_itself`
/// and/or `updates_in_place`.
fn on_runtime(files: &[(&str, &str)], heals_itself: bool, updates_in_place: bool) -> Sup {
    let rt = FakeRuntime::new();
    rt.set_heals_itself(heals_itself);
    rt.set_updates_in_place(updates_in_place);
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let sup = Sup::launch(rt, dir, |s| {
        s.spec.agent_broker = Some("mqtt://broker:1883".into());
    });
    sup.link(true, 1);
    sup
}

/// Under a runtime that heals itself, an unhealthy container (`restart.on_unhealthy` is
/// `restart` by default) gets no restart from the supervisor and no exec: the runtime replaces
/// it. The view still shows it unhealthy, as the runtime lists it, with no restart counted.
#[tokio::test(start_paused = true)]
async fn under_a_self_healing_runtime_an_unhealthy_container_is_not_restarted() {
    let sup = on_runtime(&[("a.toml", QUICK)], true, false);
    let (id, _beat) = judged(&sup, "a").await;
    sup.rt.update(&id, |c| c.health = Health::Unhealthy);
    sup.nudge();
    until("unhealthy on the view", || {
        sup.view("a").is_some_and(|v| v.health == Health::Unhealthy)
    })
    .await;
    idle(MAX_AGE * 10).await;
    assert_eq!(sup.count(&FakeCall::Restart(id.clone())), 0, "no restart");
    assert_eq!(sup.count(&FakeCall::AgentBusy(id.clone())), 0, "no exec");
    let view = sup.view("a").unwrap();
    assert_eq!(
        (view.health, view.restarts, view.health_reason, view.down),
        (Health::Unhealthy, 0, None, None)
    );
    // The same file on the local engine is restarted (the control).
    let local = on_runtime(&[("a.toml", QUICK)], false, false);
    let (lid, _lbeat) = judged(&local, "a").await;
    unhealthy_restart(&local, &lid, 1).await;
    local.stop().await;
    sup.stop().await;
}

/// Under a runtime that heals itself, a hung agent (silent on the broker, its heartbeat stale)
/// is not checked through exec and not restarted, nor is one whose own status says
/// `crash-loop`: the runtime's HEALTHCHECK and its replacement of the task do that.
#[tokio::test(start_paused = true)]
async fn under_a_self_healing_runtime_a_hung_agent_is_not_exec_checked() {
    let sup = on_runtime(&[("a.toml", QUICK)], true, false);
    let (id, beat) = judged(&sup, "a").await;
    beat.store(false, Ordering::SeqCst);
    sup.rt.set_hung(&id, true);
    idle(MAX_AGE * 15).await;
    sup.say("a", AgentState::CrashLoop).await;
    idle(MAX_AGE * 5).await;
    assert_eq!(sup.count(&FakeCall::AgentBusy(id.clone())), 0, "no exec");
    assert_eq!(sup.count(&FakeCall::Restart(id.clone())), 0, "no restart");
    let view = sup.view("a").unwrap();
    assert_eq!((view.health, view.health_reason), (Health::Healthy, None));
    sup.stop().await;
}

/// A task the runtime says is down (its node lost) shows `down` with the runtime's reason and
/// the node on its published view (not a person's stop, though it is listed exited), and the
/// supervisor does nothing to it; when it runs again (elsewhere), `down` goes and the new node
/// shows.
#[tokio::test(start_paused = true)]
async fn a_down_task_shows_down_and_its_node_on_the_view() {
    let sup = on_runtime(&[("a.toml", QUICK), ("b.toml", QUICK)], true, true);
    until("created", || {
        sup.id("p-a").is_some() && sup.id("p-b").is_some()
    })
    .await;
    let id = sup.id("p-a").unwrap();
    for c in sup.rt.containers() {
        sup.rt.update(&c.id, |c| c.node = Some("node1".into()));
    }
    sup.nudge();
    until("the node on the views", || {
        ["a", "b"].iter().all(|s| {
            sup.view(s)
                .is_some_and(|v| v.node.as_deref() == Some("node1"))
        })
    })
    .await;
    assert_eq!(sup.view("a").unwrap().down, None);
    let calls = sup.rt.calls().len();
    sup.rt.update(&id, |c| {
        c.node = Some("node3".into());
        c.down = Some("node node3 is down".into());
        c.state = RunState::Exited;
        c.health = Health::None;
    });
    sup.nudge();
    until("down on the view", || {
        sup.view("a").is_some_and(|v| v.down.is_some())
    })
    .await;
    let view = sup.view("a").unwrap();
    assert_eq!(view.down.as_deref(), Some("node node3 is down"));
    assert_eq!(view.node.as_deref(), Some("node3"));
    assert_eq!(view.stopped_by_person, None, "not a person's stop");
    assert_eq!(view.health, Health::None);
    let b = sup.view("b").unwrap();
    assert_eq!(
        (b.node.as_deref(), b.down),
        (Some("node1"), None),
        "untouched"
    );
    idle(S * 30).await;
    assert_eq!(sup.rt.calls().len(), calls, "{:?}", sup.rt.calls());
    // The runtime places it on another node.
    sup.rt.update(&id, |c| {
        c.node = Some("node2".into());
        c.down = None;
        c.state = RunState::Running;
        c.health = Health::Healthy;
    });
    sup.nudge();
    until("up again on node2", || {
        sup.view("a")
            .is_some_and(|v| v.down.is_none() && v.node.as_deref() == Some("node2"))
    })
    .await;
    sup.stop().await;
}

/// Under a runtime that updates in place, a changed file leads to exactly one `update` of the
/// container, with the new config hash, and no stop, remove or create: the container keeps
/// its id and its view the new hash.
#[tokio::test(start_paused = true)]
async fn a_changed_file_is_updated_in_place() {
    let sup = on_runtime(&[("a.toml", SUT)], true, true);
    until("a created", || sup.id("p-a").is_some()).await;
    let id = sup.id("p-a").unwrap();
    let hash = |sup: &Sup| {
        sup.rt.containers()[0]
            .labels
            .get("io.labvisor.config-hash")
            .cloned()
            .unwrap()
    };
    let old = hash(&sup);
    settle().await;
    sup.write("a.toml", &format!("{SUT}[env]\nX = \"1\"\n"));
    until("the update", || {
        sup.rt
            .calls()
            .iter()
            .any(|c| matches!(c, FakeCall::Update(..)))
    })
    .await;
    idle(S * 30).await;
    let updates: Vec<FakeCall> = sup
        .rt
        .calls()
        .into_iter()
        .filter(|c| matches!(c, FakeCall::Update(..)))
        .collect();
    let new = hash(&sup);
    assert_ne!(new, old);
    assert_eq!(updates, [FakeCall::Update(id.clone(), new.clone())]);
    assert_eq!(sup.count(&FakeCall::Stop(id.clone())), 0);
    assert_eq!(sup.count(&FakeCall::Remove(id.clone())), 0);
    assert_eq!(
        sup.count(&FakeCall::Create("p-a".into())),
        1,
        "the first only"
    );
    assert_eq!(sup.id("p-a"), Some(id));
    until("the new hash on the view", || {
        sup.view("a")
            .is_some_and(|v| v.config_hash.as_deref() == Some(new.as_str()))
    })
    .await;
    sup.stop().await;
}
