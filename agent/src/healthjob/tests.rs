use std::num::NonZeroU32;
use std::sync::Arc;

use labvisor_protocol::config::{load_str, Allow};
use labvisor_protocol::topics::Topics;
use labvisor_protocol::SutName;

use super::*;
use crate::output::Sinks;
use crate::tap::Tap;

const H: u64 = 3_600_000;
const T: u64 = 1_795_000_000_000;

fn check(every_h: Option<u64>, after_jobs: Option<u32>) -> HealthCheck {
    HealthCheck::new(
        "hc.sh".into(),
        every_h.map(|h| Duration::from_millis(h * H)),
        after_jobs.and_then(NonZeroU32::new),
        Duration::from_secs(60),
    )
    .unwrap()
}

fn since(last_ms: u64, jobs: u32) -> Since {
    Since {
        last_ms: Some(last_ms),
        jobs,
    }
}

#[test]
fn one_is_due_when_none_ever_ran() {
    for c in [check(Some(6), None), check(None, Some(50))] {
        assert_eq!(due(&c, Since::default(), T), Some(Due::NeverRan));
    }
}

#[test]
fn every_counts_from_the_end_of_the_last_one() {
    let c = check(Some(6), None);
    assert_eq!(due(&c, since(T, 0), T), None);
    assert_eq!(
        due(&c, since(T, 1000), T + 6 * H - 1),
        None,
        "jobs do not count"
    );
    assert_eq!(due(&c, since(T, 0), T + 6 * H), Some(Due::Interval));
    assert_eq!(due(&c, since(T, 0), T + 60 * H), Some(Due::Interval));
    // A clock set back does not make it due.
    assert_eq!(due(&c, since(T, 0), T - H), None);
}

#[test]
fn after_jobs_counts_the_jobs_since_the_last_one() {
    let c = check(None, Some(3));
    assert_eq!(
        due(&c, since(T, 2), T + 1000 * H),
        None,
        "time does not count"
    );
    assert_eq!(due(&c, since(T, 3), T), Some(Due::Jobs));
    assert_eq!(due(&c, since(T, 4), T), Some(Due::Jobs));
}

#[test]
fn with_both_whichever_comes_first() {
    let c = check(Some(6), Some(3));
    assert_eq!(due(&c, since(T, 2), T + 5 * H), None);
    assert_eq!(due(&c, since(T, 3), T + H), Some(Due::Jobs));
    assert_eq!(due(&c, since(T, 0), T + 6 * H), Some(Due::Interval));
}

fn sut() -> SutName {
    SutName::new("s").unwrap()
}

fn ended(id: &str, state: JobState, started: bool, hc: bool, end: u64) -> JobStatus {
    let st = JobStatus::accepted(sut(), JobId::new(id).unwrap(), end - 10).with_health_check(hc);
    match started {
        true => st.finished(state, end - 5, end),
        false => st.with_state(state),
    }
}

#[test]
fn the_schedule_is_read_from_the_history() {
    assert_eq!(Since::from_history([].iter()), Since::default());
    let h = [
        ended("a", JobState::Passed, true, false, T),
        ended("hc1", JobState::Passed, true, true, T + 10),
        ended("b", JobState::Failed, true, false, T + 20),
        // Cancelled before it started: it did not run.
        ended("c", JobState::Cancelled, false, false, T + 30),
        ended("d", JobState::Lost, true, false, T + 40),
    ];
    assert_eq!(Since::from_history(h.iter()), since(T + 10, 2));
    // A failed or timed-out health check was judged: the schedule starts from it.
    for state in [JobState::Failed, JobState::Timeout] {
        let mut s = Since::from_history(h.iter());
        s.record(&ended("hc2", state, true, true, T + 50));
        assert_eq!(s, since(T + 50, 0), "{state:?}");
    }
    // A cancelled or lost one leaves the schedule as it was.
    for state in [JobState::Cancelled, JobState::Lost] {
        let mut s = Since::from_history(h.iter());
        s.record(&ended("hc2", state, true, true, T + 50));
        assert_eq!(s, since(T + 10, 2), "{state:?}");
    }
}

#[test]
fn only_a_failed_or_timed_out_health_check_takes_the_sut_offline() {
    let failed =
        ended("health-check-1", JobState::Failed, true, true, T).with_reason(Some("exit 3".into()));
    assert_eq!(
        failure(&failed).as_deref(),
        Some("health check health-check-1 failed: exit 3")
    );
    let timeout = ended("health-check-2", JobState::Timeout, true, true, T)
        .with_reason(Some("timeout: ran longer than 1m".into()));
    assert_eq!(
        failure(&timeout).as_deref(),
        Some("health check health-check-2 failed: timeout: ran longer than 1m")
    );
    for state in [JobState::Passed, JobState::Cancelled, JobState::Lost] {
        assert_eq!(
            failure(&ended("h", state, true, true, T)),
            None,
            "{state:?}"
        );
    }
    let plain = ended("j", JobState::Failed, true, false, T).with_reason(Some("exit 1".into()));
    assert_eq!(failure(&plain), None, "not a health check");
}

#[test]
fn ids_say_what_they_are() {
    let id = new_id();
    assert!(id.as_str().starts_with("health-check-"), "{id}");
    assert_ne!(id, new_id());
}

/// A recorder of the admin state.
#[derive(Default)]
struct FakeAdmin {
    offline: Option<(String, String)>,
}

impl OfflineState for FakeAdmin {
    fn is_offline(&self) -> bool {
        self.offline.is_some()
    }

    /// As the real one: a SUT offline already keeps its reason and who.
    fn set_offline(&mut self, reason: String, by: &str, _now_ms: u64) -> std::io::Result<bool> {
        if self.offline.is_some() {
            return Ok(false);
        }
        self.offline = Some((reason, by.to_owned()));
        Ok(true)
    }
}

/// A runner on a temporary volume for a SUT whose health check is `script`.
fn runner(dir: &std::path::Path, script: &str, section: &str) -> (SutConfig, JobRunner) {
    std::fs::write(dir.join("hc.sh"), script).unwrap();
    let text =
        format!("image = \"x\"\nfiles = [\"hc.sh\"]\n[health_check]\njob = \"hc.sh\"\n{section}");
    let cfg = load_str("s.toml", &text, dir, &Allow::default()).unwrap();
    let jobs = JobRunner::open(
        Arc::new(cfg.clone()),
        &dir.join("data"),
        Topics::new(),
        None,
        Duration::from_millis(200),
    )
    .unwrap();
    (cfg, jobs)
}

fn sinks() -> Arc<Sinks> {
    let (tap, _rx) = Tap::with_rate(1 << 20, None);
    Arc::new(Sinks::new(false, None, tap))
}

/// Runs the queued job to its end.
async fn run_one(jobs: &mut JobRunner, sinks: &Arc<Sinks>) {
    jobs.start_next(sinks);
    assert!(jobs.running().is_some(), "a job started");
    let exit = tokio::time::timeout(Duration::from_secs(10), jobs.wait())
        .await
        .expect("the job ends");
    jobs.on_exit(exit).await;
}

#[tokio::test]
async fn a_failing_health_check_takes_the_sut_offline_and_none_runs_until_online() {
    let d = tempfile::tempdir().unwrap();
    let (cfg, mut jobs) = runner(d.path(), "echo sick\nexit 3\n", "after_jobs = 5\n");
    let sinks = sinks();
    let mut admin = FakeAdmin::default();
    let mut h = HealthJobs::new(&cfg, &jobs, false).unwrap();
    // None ever ran: one is queued at once, and only one.
    h.tick(&mut jobs, &mut admin, false);
    assert!(jobs.health_check_pending());
    assert_eq!(jobs.queue_len(), 1);
    h.tick(&mut jobs, &mut admin, false);
    assert_eq!(jobs.queue_len(), 1);
    run_one(&mut jobs, &sinks).await;
    h.tick(&mut jobs, &mut admin, false);
    let (reason, by) = admin.offline.clone().expect("offline");
    assert!(
        reason.starts_with("health check health-check-") && reason.ends_with(" failed: exit 3"),
        "{reason}"
    );
    assert_eq!(by, "health-check");
    let last = jobs.history().last().unwrap().clone();
    assert!(last.health_check);
    assert_eq!(last.state, JobState::Failed);
    // Offline: nothing is queued, even when it is due.
    h.since.jobs = 100;
    h.tick(&mut jobs, &mut admin, false);
    assert_eq!(jobs.queue_len(), 0);
    // Online again: one runs first although the schedule alone would not ask for it.
    h.since.jobs = 0;
    admin.offline = None;
    h.tick(&mut jobs, &mut admin, false);
    assert!(jobs.health_check_pending(), "back online: one runs first");
}

#[tokio::test]
async fn a_passing_health_check_restarts_the_schedule_which_survives_a_restart() {
    let d = tempfile::tempdir().unwrap();
    let (cfg, mut jobs) = runner(d.path(), "echo fine\n", "every = \"6h\"\n");
    let sinks = sinks();
    let mut admin = FakeAdmin::default();
    let mut h = HealthJobs::new(&cfg, &jobs, false).unwrap();
    h.tick(&mut jobs, &mut admin, false);
    run_one(&mut jobs, &sinks).await;
    h.tick(&mut jobs, &mut admin, false);
    assert!(admin.offline.is_none());
    assert_eq!(jobs.queue_len(), 0, "not due again");
    let last = h.since.last_ms.expect("it counted");
    let wake = h.wake_at().expect("a wake-up for `every`");
    let ahead = wake - tokio::time::Instant::now();
    assert!(ahead > Duration::from_secs(6 * 3600 - 60), "{ahead:?}");
    // A restart reads the schedule back from the journal: nothing is due.
    drop(jobs);
    let (cfg, mut jobs) = runner(d.path(), "echo fine\n", "every = \"6h\"\n");
    let mut h = HealthJobs::new(&cfg, &jobs, false).unwrap();
    assert_eq!(h.since.last_ms, Some(last));
    h.tick(&mut jobs, &mut admin, false);
    assert_eq!(jobs.queue_len(), 0);
}

#[test]
fn a_sut_offline_at_start_runs_one_when_put_online() {
    let d = tempfile::tempdir().unwrap();
    let (cfg, mut jobs) = runner(d.path(), "true\n", "after_jobs = 5\n");
    let mut admin = FakeAdmin {
        offline: Some(("by hand".into(), "ops".into())),
    };
    let mut h = HealthJobs::new(&cfg, &jobs, true).unwrap();
    h.since = since(now_ms(), 0);
    h.tick(&mut jobs, &mut admin, false);
    assert_eq!(jobs.queue_len(), 0);
    admin.offline = None;
    h.tick(&mut jobs, &mut admin, false);
    assert!(jobs.health_check_pending());
}

/// Taken offline and online again while a health check runs: that health check counts as the
/// one that runs first, so no second one is queued right after it.
#[tokio::test]
async fn offline_and_online_during_a_health_check_do_not_queue_a_second_one() {
    let d = tempfile::tempdir().unwrap();
    let (cfg, mut jobs) = runner(d.path(), "sleep 0.3\n", "after_jobs = 5\n");
    let sinks = sinks();
    let mut admin = FakeAdmin::default();
    let mut h = HealthJobs::new(&cfg, &jobs, false).unwrap();
    h.tick(&mut jobs, &mut admin, false);
    assert!(jobs.health_check_pending());
    jobs.start_next(&sinks);
    assert!(jobs.running().is_some());
    admin.offline = Some(("usb".into(), "al".into()));
    h.tick(&mut jobs, &mut admin, false);
    admin.offline = None;
    h.tick(&mut jobs, &mut admin, false);
    let exit = tokio::time::timeout(Duration::from_secs(10), jobs.wait())
        .await
        .expect("the job ends");
    jobs.on_exit(exit).await;
    h.tick(&mut jobs, &mut admin, false);
    assert_eq!(jobs.history().last().unwrap().state, JobState::Passed);
    assert_eq!(jobs.queue_len(), 0, "no second health check");
    assert!(!jobs.health_check_pending());
}

/// While the device is busy with its own work or drained, a health check that is due waits; it
/// is queued once the device is free.
#[test]
fn a_busy_or_drained_device_gets_no_health_check_until_free() {
    let d = tempfile::tempdir().unwrap();
    let (cfg, mut jobs) = runner(d.path(), "true\n", "after_jobs = 5\n");
    let mut admin = FakeAdmin::default();
    let mut h = HealthJobs::new(&cfg, &jobs, false).unwrap();
    h.tick(&mut jobs, &mut admin, true);
    assert_eq!(
        jobs.queue_len(),
        0,
        "due (none ever ran) but the device is busy"
    );
    h.tick(&mut jobs, &mut admin, false);
    assert!(jobs.health_check_pending());
}
