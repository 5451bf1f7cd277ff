use super::*;
use crate::logfile::RotatingFile;
use std::collections::BTreeMap;

#[test]
fn backoff_grows_caps_and_resets_after_a_long_run() {
    let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8), 3);
    let quick = Duration::from_millis(100);
    let delays: Vec<_> = (0..5).map(|_| b.on_exit(quick).as_secs()).collect();
    assert_eq!(delays, [1, 2, 4, 8, 8]);
    assert!(b.crash_loop());
    assert_eq!(b.on_exit(Duration::from_secs(3600)), Duration::from_secs(1));
    assert!(!b.crash_loop());
}

/// The exit that ends a long healthy run is not a quick failure: it counts nothing, so it can
/// neither start a crash loop on its own nor bring one closer.
#[test]
fn an_exit_after_a_long_run_is_not_a_quick_failure() {
    let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8), 1);
    assert_eq!(b.quick, Duration::from_secs(10));
    assert_eq!(b.on_exit(Duration::from_secs(339)), Duration::from_secs(1));
    assert_eq!(b.quick_failures(), 0);
    assert!(
        !b.crash_loop(),
        "one long run then an exit is no crash loop"
    );
    // Exactly at the threshold counts as long; just under it as quick.
    assert_eq!(b.on_exit(b.quick), Duration::from_secs(1));
    assert_eq!(b.quick_failures(), 0);
    let under = b.quick - Duration::from_millis(1);
    assert_eq!(b.on_exit(under), Duration::from_secs(1));
    assert_eq!(b.quick_failures(), 1);
    assert!(b.crash_loop());

    // With crash_loop_after = 3: two quick failures, a long run, two quick failures: no crash
    // loop (the count restarted at the long run), and the delays restarted too.
    let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8), 3);
    let quick = Duration::from_millis(100);
    let delays: Vec<u64> = [quick, quick, Duration::from_secs(339), quick, quick]
        .into_iter()
        .map(|ran| b.on_exit(ran).as_secs())
        .collect();
    assert_eq!(delays, [1, 2, 1, 1, 2]);
    assert_eq!(b.quick_failures(), 2);
    assert!(!b.crash_loop());
    assert_eq!(b.on_exit(quick), Duration::from_secs(4));
    assert!(b.crash_loop());
}

/// Millisecond delays come out exact (the restart line prints them with one decimal).
#[test]
fn sub_second_delays_double_exactly_enough() {
    let mut b = Backoff::new(Duration::from_millis(300), Duration::from_secs(5), 3);
    let d: Vec<String> = (0..6)
        .map(|_| format!("{:.1}", b.on_exit(Duration::ZERO).as_secs_f64()))
        .collect();
    assert_eq!(d, ["0.3", "0.6", "1.2", "2.4", "4.8", "5.0"]);
}

fn sinks(dir: &std::path::Path) -> Arc<Sinks> {
    Arc::new(Sinks::new(
        false,
        Some(RotatingFile::open(&dir.join("o.log"), 1 << 20, 2).unwrap()),
        crate::tap::Tap::new(8).0,
    ))
}

fn restart(on_child_exit: OnChildExit, crash_loop_after: u32) -> RestartSettings {
    RestartSettings {
        on_unhealthy: labvisor_protocol::config::OnUnhealthy::None,
        on_child_exit,
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(80),
        crash_loop_after: crash_loop_after.try_into().unwrap(),
    }
}

fn sh(script: &str) -> Option<Spec> {
    Some(Spec {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: BTreeMap::new(),
        cwd: None,
    })
}

async fn until(rx: &mut watch::Receiver<Status>, f: impl Fn(&Status) -> bool) -> Status {
    let s = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| f(s)))
        .await
        .expect("in time")
        .expect("task alive");
    s.clone()
}

#[tokio::test]
async fn a_failing_process_is_restarted_until_it_crash_loops() {
    let d = tempfile::tempdir().unwrap();
    let dev = Device::spawn(
        sh("echo boom; exit 7"),
        &restart(OnChildExit::Restart, 3),
        sinks(d.path()),
        false,
    );
    let mut rx = dev.watch();
    let s = until(&mut rx, |s| s.crash_loop).await;
    assert!(s.is_crash_looping());
    assert_eq!(s.last_exit.as_deref(), Some("exit 7"));
    assert!(s.restarts >= 2, "{s:?}");
    assert!(
        s.crash_detail
            .as_deref()
            .unwrap()
            .contains("failed 3 times in a row, last exit 7"),
        "{s:?}"
    );
    dev.stop(Duration::from_secs(1)).await;
    let log = std::fs::read_to_string(d.path().join("o.log")).unwrap();
    assert!(
        log.contains("[labvisor-agent] device process ended (exit 7)"),
        "{log}"
    );
}

#[tokio::test]
async fn under_on_child_exit_exit_the_first_exit_ends_it() {
    let d = tempfile::tempdir().unwrap();
    let dev = Device::spawn(
        sh("exit 4"),
        &restart(OnChildExit::Exit, 3),
        sinks(d.path()),
        false,
    );
    let s = until(&mut dev.watch(), |s| matches!(s.state, State::Ended(_))).await;
    assert_eq!(s.state, State::Ended(Exit::Code(4)));
    assert_eq!(s.restarts, 0);
    assert_eq!(dev.stop(Duration::from_secs(1)).await, None);
}

#[tokio::test]
async fn signals_reach_the_process_and_stop_terms_it() {
    let d = tempfile::tempdir().unwrap();
    let dev = Device::spawn(
        sh("trap 'echo got usr1' USR1; trap 'exit 0' TERM; echo ready; while true; do sleep 0.05; done"),
        &restart(OnChildExit::Restart, 3),
        sinks(d.path()),
        false,
    );
    until(&mut dev.watch(), Status::is_running).await;
    let log = || std::fs::read_to_string(d.path().join("o.log")).unwrap_or_default();
    let t0 = Instant::now();
    while !log().contains("ready") {
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    dev.signal(Signal::SIGUSR1).await;
    while !log().contains("got usr1") {
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut rx = dev.watch();
    let (exit, killed) = dev.stop(Duration::from_secs(5)).await.unwrap();
    assert_eq!((exit, killed), (Exit::Code(0), false));
    let s = rx.borrow_and_update().clone();
    assert_eq!(s.state, State::Stopped);
    assert_eq!(s.last_exit.as_deref(), Some("exit 0"));
}

#[tokio::test]
async fn without_a_command_there_is_nothing_to_stop() {
    let d = tempfile::tempdir().unwrap();
    let dev = Device::spawn(
        None,
        &restart(OnChildExit::Restart, 3),
        sinks(d.path()),
        false,
    );
    assert_eq!(dev.status().state, State::NoCommand);
    assert_eq!(dev.stop(Duration::from_secs(1)).await, None);
}

// -- hold/release (maintenance, helper admin) --

/// Held: the process is stopped and not restarted (no backoff start comes), and a crash loop
/// is forgotten; released: it starts again at once. Started held: it starts only when released.
#[tokio::test]
async fn a_held_process_stays_stopped_until_released() {
    let d = tempfile::tempdir().unwrap();
    let dev = Device::spawn(
        sh("exit 3"),
        &restart(OnChildExit::Restart, 2),
        sinks(d.path()),
        false,
    );
    let mut rx = dev.watch();
    until(&mut rx, |s| s.crash_loop).await;
    dev.hold(Duration::from_secs(1)).await;
    let s = until(&mut rx, |s| s.state == State::Held).await;
    assert!(!s.crash_loop && s.crash_detail.is_none(), "{s:?}");
    let restarts = s.restarts;
    // Far longer than the longest backoff (80 ms): nothing starts.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let s = dev.status();
    assert_eq!((s.state, s.restarts), (State::Held, restarts));
    dev.release().await;
    until(&mut rx, |s| s.restarts > restarts).await;
    dev.stop(Duration::from_secs(1)).await;

    let dev = Device::spawn_held(
        sh("echo started; while true; do sleep 0.05; done"),
        &restart(OnChildExit::Restart, 2),
        sinks(d.path()),
        false,
        true,
    );
    assert_eq!(dev.status().state, State::Held);
    let mut rx = dev.watch();
    dev.release().await;
    until(&mut rx, Status::is_running).await;
    dev.hold(Duration::from_secs(1)).await;
    let s = until(&mut rx, |s| s.state == State::Held).await;
    assert!(s.last_exit.is_some(), "{s:?}");
    assert_eq!(dev.stop(Duration::from_secs(1)).await, None);
}

// -- drain/undrain (the device's own work, helper work) --

/// Waits until the log file holds `needle`.
async fn logged(dir: &std::path::Path, needle: &str) {
    let t0 = Instant::now();
    loop {
        let log = std::fs::read_to_string(dir.join("o.log")).unwrap_or_default();
        if log.contains(needle) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no {needle:?} in {log}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A drain sends the signal once and lets the process finish (as testflinger's SIGUSR1 does):
/// after it exits it is held, not restarted, even under `on_child_exit = "exit"`; a second
/// drain sends nothing; lifting the drain starts it again.
#[tokio::test]
async fn a_drained_process_finishes_and_stays_down_until_released() {
    let d = tempfile::tempdir().unwrap();
    let done = d.path().join("done");
    let dev = Device::spawn(
        sh(&format!(
            "n=0; trap 'n=$((n+1)); echo usr1-$n' USR1; echo run-$$; \
             sh -c 'while [ ! -e {0} ]; do sleep 0.05; done; echo work-done' & \
             while [ ! -e {0} ]; do sleep 0.05; done; wait; echo finished",
            done.display()
        )),
        &restart(OnChildExit::Exit, 3),
        sinks(d.path()),
        false,
    );
    let mut rx = dev.watch();
    until(&mut rx, Status::is_running).await;
    logged(d.path(), "run-").await;
    dev.drain(Signal::SIGUSR1).await;
    dev.drain(Signal::SIGUSR1).await;
    logged(d.path(), "usr1-1").await;
    // Still running: the drain lets it finish its work.
    assert!(dev.status().is_running());
    std::fs::write(&done, "").unwrap();
    let s = until(&mut rx, |s| s.state == State::Held).await;
    assert_eq!(s.restarts, 0);
    assert!(!s.crash_loop);
    let log = std::fs::read_to_string(d.path().join("o.log")).unwrap();
    assert!(log.contains("finished"), "{log}");
    assert!(
        log.contains("work-done"),
        "the work in its group did not get the signal: {log}"
    );
    assert!(!log.contains("usr1-2"), "the signal goes once: {log}");
    assert!(log.contains("drained: not restarted"), "{log}");
    std::fs::remove_file(&done).unwrap();
    dev.undrain().await;
    let s = until(&mut rx, Status::is_running).await;
    assert_eq!(s.restarts, 1);
    dev.stop(Duration::from_secs(1)).await;
}

/// Maintenance and a drain hold the process each on their own: lifting one leaves it held by
/// the other.
#[tokio::test]
async fn a_drain_lifted_during_maintenance_does_not_start_the_process() {
    let d = tempfile::tempdir().unwrap();
    let dev = Device::spawn(
        sh("while true; do sleep 0.05; done"),
        &restart(OnChildExit::Restart, 3),
        sinks(d.path()),
        false,
    );
    let mut rx = dev.watch();
    until(&mut rx, Status::is_running).await;
    dev.hold(Duration::from_secs(1)).await;
    until(&mut rx, |s| s.state == State::Held).await;
    dev.drain(Signal::SIGUSR1).await;
    dev.undrain().await;
    dev.drain(Signal::SIGUSR1).await;
    dev.release().await;
    // Both controls were handled in order before this status: still held by the drain.
    let s = dev.status();
    assert_eq!(s.state, State::Held);
    dev.undrain().await;
    until(&mut rx, Status::is_running).await;
    dev.stop(Duration::from_secs(1)).await;
}

/// Maintenance on a device with a drain signal: the signal once, the device finishes its work
/// (its group is not signalled, nothing is TERMed), exits, and is then held, not restarted;
/// released, it starts again.
#[tokio::test]
async fn maintenance_by_drain_lets_the_work_finish_then_holds() {
    let d = tempfile::tempdir().unwrap();
    let done = d.path().join("done");
    let dev = Device::spawn(
        sh(&format!(
            "trap 'echo usr1' USR1; trap 'echo termed; exit 9' TERM; echo run-$$; \
             sh -c 'while [ ! -e {0} ]; do sleep 0.05; done; echo work-done' & \
             while [ ! -e {0} ]; do sleep 0.05; done; wait; echo finished",
            done.display()
        )),
        &restart(OnChildExit::Restart, 3),
        sinks(d.path()),
        false,
    );
    let mut rx = dev.watch();
    until(&mut rx, Status::is_running).await;
    logged(d.path(), "run-").await;
    dev.hold_drained(Signal::SIGUSR1).await;
    logged(d.path(), "usr1").await;
    assert!(dev.status().is_running(), "it finishes its work first");
    std::fs::write(&done, "").unwrap();
    let s = until(&mut rx, |s| s.state == State::Held).await;
    assert_eq!((s.restarts, s.last_exit.as_deref()), (0, Some("exit 0")));
    let log = std::fs::read_to_string(d.path().join("o.log")).unwrap();
    assert!(
        log.contains("work-done") && log.contains("finished"),
        "{log}"
    );
    assert!(!log.contains("termed"), "{log}");
    // Far longer than the longest backoff (80 ms): nothing starts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(dev.status().state, State::Held);
    std::fs::remove_file(&done).unwrap();
    dev.release().await;
    let s = until(&mut rx, Status::is_running).await;
    assert_eq!(s.restarts, 1);
    dev.stop(Duration::from_secs(1)).await;
}
