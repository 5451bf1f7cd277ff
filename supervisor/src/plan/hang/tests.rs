//! Tests of the hang rules and the auto interval, with made-up instants.

use super::*;

const S: Duration = Duration::from_secs(1);
const T: Timing = Timing {
    heartbeat: Duration::from_secs(5),
    max_age: Duration::from_secs(30),
    start_period: Duration::from_secs(10),
    retries: 3,
};

fn sut(s: &str) -> SutName {
    SutName::new(s).unwrap()
}

#[test]
fn the_auto_interval_scales_with_the_lab_between_10_s_and_5_min() {
    let r = HealthcheckRate::DEFAULT;
    assert_eq!(auto_interval(0, r, true), 10 * S);
    assert_eq!(auto_interval(5, r, true), 10 * S);
    assert_eq!(auto_interval(20, r, true), 10 * S);
    assert_eq!(auto_interval(100, r, true), 50 * S);
    assert_eq!(auto_interval(500, r, true), 250 * S);
    assert_eq!(auto_interval(5000, r, true), 300 * S);
    let slow = HealthcheckRate::new(0.5).unwrap();
    assert_eq!(auto_interval(20, slow, true), 40 * S);
    let tiny = HealthcheckRate::new(f64::MIN_POSITIVE).unwrap();
    assert_eq!(auto_interval(1, tiny, true), 300 * S, "no overflow");
    assert_eq!(
        auto_interval(500, r, false),
        10 * S,
        "not watched: Docker alone"
    );
    assert_eq!(
        docker_interval(HealthInterval::Every(400 * S), 50 * S),
        400 * S,
        "an explicit interval as written"
    );
    assert_eq!(docker_interval(HealthInterval::Auto, 50 * S), 50 * S);
}

#[test]
fn the_rate_is_a_number_above_zero() {
    assert_eq!("2".parse::<HealthcheckRate>().unwrap().get(), 2.0);
    assert_eq!(" 0.25 ".parse::<HealthcheckRate>().unwrap().get(), 0.25);
    for bad in ["0", "-1", "NaN", "inf", "two", ""] {
        assert!(bad.parse::<HealthcheckRate>().is_err(), "{bad}");
    }
}

/// An agent of container `c` started at `t0`, heard at `t0 + heard`.
fn agent(t0: Instant, heard: Option<Duration>) -> Agent {
    let mut a = Agent::default();
    a.running("c", t0);
    if let Some(h) = heard {
        a.heard(t0 + h, AgentState::Idle, None);
    }
    a
}

#[test]
fn an_agent_is_suspect_once_silent_for_max_age() {
    let t0 = Instant::now();
    let link = Some(t0);
    let a = agent(t0, Some(60 * S));
    assert_eq!(a.suspect_at(link, T), Some(t0 + 90 * S));
    assert_eq!(a.verdict("c", t0 + 89 * S, link, T), Verdict::Fine);
    assert_eq!(a.verdict("c", t0 + 90 * S, link, T), Verdict::Suspect);
}

#[test]
fn nothing_is_suspect_while_the_link_is_down_or_just_back() {
    let t0 = Instant::now();
    let a = agent(t0, Some(60 * S));
    assert_eq!(a.suspect_at(None, T), None);
    assert_eq!(a.verdict("c", t0 + 600 * S, None, T), Verdict::Fine);
    // The link came back at 500 s: silence counts from there.
    let back = Some(t0 + 500 * S);
    assert_eq!(a.verdict("c", t0 + 529 * S, back, T), Verdict::Fine);
    assert_eq!(a.verdict("c", t0 + 530 * S, back, T), Verdict::Suspect);
}

#[test]
fn a_new_container_gets_its_start_period_and_max_age() {
    let t0 = Instant::now();
    let link = Some(t0);
    // Never heard: suspect after start_period + max_age.
    let a = agent(t0, None);
    assert_eq!(a.suspect_at(link, T), Some(t0 + 40 * S));
    // A restart of the same container, or another container, starts the count again.
    let mut a = agent(t0, Some(S));
    a.started("c", t0 + 100 * S);
    assert_eq!(a.suspect_at(link, T), Some(t0 + 140 * S));
    a.running("d", t0 + 200 * S);
    assert_eq!(a.suspect_at(link, T), Some(t0 + 240 * S));
    a.running("d", t0 + 300 * S);
    assert_eq!(a.suspect_at(link, T), Some(t0 + 240 * S), "same container");
}

#[test]
fn a_container_seen_paused_counts_as_started_when_it_runs_again() {
    let t0 = Instant::now();
    let link = Some(t0);
    let mut a = agent(t0, Some(20 * S));
    a.paused("c");
    a.running("c", t0 + 500 * S);
    assert_eq!(
        a.suspect_at(link, T),
        Some(t0 + 540 * S),
        "from the unpause"
    );
    assert_eq!(a.verdict("c", t0 + 500 * S, link, T), Verdict::Fine);
    a.running("c", t0 + 600 * S);
    assert_eq!(a.suspect_at(link, T), Some(t0 + 540 * S), "once");
}

#[test]
fn a_last_will_is_no_sign_of_life() {
    let t0 = Instant::now();
    let mut lab = Lab::default();
    lab.link(true, 1, t0);
    lab.agent(&sut("a")).running("c", t0);
    assert!(!lab.heard(&sut("a"), t0 + 50 * S, AgentState::Lost, None));
    let link = lab.link_since();
    assert_eq!(
        lab.agent(&sut("a")).verdict("c", t0 + 50 * S, link, T),
        Verdict::Suspect
    );
}

#[test]
fn a_confirmed_hang_is_unhealthy_until_heard_or_restarted() {
    let t0 = Instant::now();
    let link = Some(t0);
    let mut a = agent(t0, Some(60 * S));
    let now = t0 + 94 * S;
    let hung = a.confirm("c", now, Check::Failed("heartbeat is 34.0s old".into()), T);
    let why = "no heartbeat for 34 s: heartbeat is 34.0s old".to_owned();
    assert_eq!(hung, Confirmed::Hung(why.clone()));
    assert_eq!(a.verdict("c", now, link, T), Verdict::Unhealthy(why));
    assert_eq!(a.suspect_at(link, T), None, "no more wake-ups for it");
    assert_eq!(
        a.verdict("other", now, link, T),
        Verdict::Fine,
        "not a new container's"
    );
    let mut heard = a.clone();
    assert!(heard.heard(now + S, AgentState::Idle, None));
    assert_eq!(heard.verdict("c", now + S, link, T), Verdict::Fine);
    a.started("c", now + S);
    assert_eq!(a.verdict("c", now + S, link, T), Verdict::Fine);
}

#[test]
fn an_agent_alive_but_silent_is_asked_again_after_max_age_and_said_once() {
    let t0 = Instant::now();
    let link = Some(t0);
    let mut a = agent(t0, Some(60 * S));
    assert_eq!(
        a.confirm("c", t0 + 90 * S, Check::Alive, T),
        Confirmed::Alive { first: true }
    );
    assert_eq!(a.verdict("c", t0 + 119 * S, link, T), Verdict::Fine);
    assert_eq!(a.verdict("c", t0 + 120 * S, link, T), Verdict::Suspect);
    assert_eq!(
        a.confirm("c", t0 + 120 * S, Check::Alive, T),
        Confirmed::Alive { first: false }
    );
    assert_eq!(
        a.confirm("c", t0 + 150 * S, Check::Unknown, T),
        Confirmed::Unknown
    );
    assert_eq!(a.suspect_at(link, T), Some(t0 + 180 * S));
    a.heard(t0 + 151 * S, AgentState::Busy, None);
    assert_eq!(
        a.confirm("c", t0 + 190 * S, Check::Alive, T),
        Confirmed::Alive { first: true }
    );
}

#[test]
fn a_silent_agent_that_cannot_be_checked_retries_times_is_hung() {
    let t0 = Instant::now();
    let link = Some(t0);
    let mut a = agent(t0, Some(60 * S));
    let unknown = |a: &mut Agent, at| a.confirm("c", t0 + at * S, Check::Unknown, T);
    assert_eq!(unknown(&mut a, 90), Confirmed::Unknown);
    assert_eq!(a.suspect_at(link, T), Some(t0 + 120 * S), "asked again");
    assert_eq!(unknown(&mut a, 120), Confirmed::Unknown);
    // A live status starts the count again.
    let mut heard = a.clone();
    heard.heard(t0 + 130 * S, AgentState::Idle, None);
    assert_eq!(unknown(&mut heard, 160), Confirmed::Unknown);
    assert_eq!(unknown(&mut heard, 190), Confirmed::Unknown);
    // So does a check that ran.
    let mut alive = a.clone();
    alive.confirm("c", t0 + 150 * S, Check::Alive, T);
    assert_eq!(unknown(&mut alive, 180), Confirmed::Unknown);
    assert_eq!(unknown(&mut alive, 210), Confirmed::Unknown);
    // The third in a row: hung.
    let why = "no heartbeat for 90 s: the hang check could not run 3 times in a row \
               (docker exec failed or timed out)"
        .to_owned();
    assert_eq!(unknown(&mut a, 150), Confirmed::Hung(why.clone()));
    assert_eq!(
        a.verdict("c", t0 + 150 * S, link, T),
        Verdict::Unhealthy(why)
    );
    // A restart starts the count again.
    a.started("c", t0 + 151 * S);
    assert_eq!(unknown(&mut a, 200), Confirmed::Unknown);
}

#[test]
fn its_own_unhealthy_word_counts_at_once_for_max_age() {
    let t0 = Instant::now();
    let link = Some(t0);
    let mut a = agent(t0, Some(S));
    assert!(a.heard(t0 + 2 * S, AgentState::CrashLoop, Some("exited 5 times")));
    let why = "the agent says crash-loop: exited 5 times".to_owned();
    assert_eq!(
        a.verdict("c", t0 + 2 * S, link, T),
        Verdict::Unhealthy(why.clone())
    );
    assert_eq!(
        a.verdict("c", t0 + 32 * S, link, T),
        Verdict::Unhealthy(why)
    );
    assert_eq!(a.verdict("c", t0 + 33 * S, link, T), Verdict::Fine);
    // A restart ends it; so does a healthy word.
    let mut restarted = a.clone();
    restarted.started("c", t0 + 3 * S);
    assert_eq!(restarted.verdict("c", t0 + 3 * S, link, T), Verdict::Fine);
    assert!(a.heard(t0 + 4 * S, AgentState::Idle, None));
    assert_eq!(a.verdict("c", t0 + 4 * S, link, T), Verdict::Fine);
    assert!(
        !a.heard(t0 + 5 * S, AgentState::Stopping, None),
        "stopping is healthy"
    );
    assert!(a.heard(t0 + 6 * S, AgentState::Stalled, None));
}

#[test]
fn a_lab_of_silent_agents_is_a_broker_outage() {
    let t0 = Instant::now();
    let q = quiet([
        T,
        Timing {
            heartbeat: 2 * S,
            ..T
        },
    ]);
    assert_eq!(q, 10 * S, "twice the longest heartbeat");
    let mut lab = Lab::default();
    assert_eq!(lab.silent(5, t0 + 600 * S, q), None, "no link");
    lab.link(true, 1, t0);
    lab.heard(&sut("a"), t0 + 10 * S, AgentState::Idle, None);
    assert_eq!(lab.silent(5, t0 + 19 * S, q), None);
    assert_eq!(lab.silent(5, t0 + 20 * S, q), Some(true));
    assert_eq!(lab.silent(5, t0 + 21 * S, q), Some(false), "said once");
    assert_eq!(
        lab.silent(1, t0 + 41 * S, q),
        None,
        "one agent: its check decides"
    );
    assert!(!lab.heard(&sut("a"), t0 + 42 * S, AgentState::Lost, None));
    assert_eq!(
        lab.silent(5, t0 + 42 * S, q),
        Some(false),
        "a last will is no sign of life"
    );
    lab.heard(&sut("b"), t0 + 50 * S, AgentState::Idle, None);
    assert_eq!(lab.silent(5, t0 + 51 * S, q), None);
    assert_eq!(lab.silent(5, t0 + 60 * S, q), Some(true), "said again");
    // A reconnect counts from its own moment.
    lab.link(true, 2, t0 + 100 * S);
    assert_eq!(lab.silent(5, t0 + 101 * S, q), None);
    lab.link(false, 2, t0 + 102 * S);
    assert_eq!(lab.link_since(), None);
    // A postponed check looks again after max_age.
    let mut a = agent(t0, Some(10 * S));
    a.postpone(t0 + 40 * S);
    assert_eq!(a.suspect_at(Some(t0), T), Some(t0 + 70 * S));
}

#[test]
fn the_check_reads_the_agents_answer() {
    let answer = |busy, unhealthy: Option<&str>| Answer {
        id: "c".into(),
        sut: sut("a"),
        busy,
        device_work: None,
        draining: false,
        unhealthy: unhealthy.map(str::to_owned),
    };
    assert_eq!(check(&answer(Some(false), None)), Check::Alive);
    assert_eq!(check(&answer(Some(true), None)), Check::Alive);
    assert_eq!(
        check(&answer(Some(false), Some("heartbeat is 9.0s old"))),
        Check::Failed("heartbeat is 9.0s old".into())
    );
    assert_eq!(check(&answer(None, None)), Check::Unknown);
}

#[test]
fn containers_count_as_started_when_the_engine_is_back() {
    let t0 = Instant::now();
    let mut lab = Lab::new(true);
    lab.link(true, 1, t0);
    lab.agent(&sut("a")).running("c", t0);
    lab.heard(&sut("a"), t0 + S, AgentState::Idle, None);
    let link = lab.link_since();
    assert_eq!(lab.agent(&sut("a")).suspect_at(link, T), Some(t0 + 40 * S));
    lab.engine_back(t0 + 100 * S);
    assert_eq!(
        lab.agent(&sut("a")).suspect_at(link, T),
        Some(t0 + 140 * S),
        "start_period + max_age from then"
    );
}

#[test]
fn a_healthy_word_since_the_start_vouches_for_a_starting_container() {
    let t0 = Instant::now();
    let mut a = agent(t0, None);
    assert!(!a.vouches("c", t0, T), "nothing heard yet");
    a.heard(t0 + 2 * S, AgentState::Idle, None);
    assert!(
        a.heard_healthy(t0 + 2 * S, Duration::ZERO, true),
        "turned healthy"
    );
    assert!(
        !a.heard_healthy(t0 + 7 * S, Duration::ZERO, true),
        "already healthy"
    );
    assert!(a.vouches("c", t0 + 8 * S, T));
    assert!(!a.vouches("other", t0 + 8 * S, T), "another container");
    assert!(!a.vouches("c", t0 + 38 * S, T), "older than max_age");
    // A failing probe (or an unhealthy state) withdraws it.
    assert!(!a.heard_healthy(t0 + 9 * S, Duration::ZERO, false));
    assert!(!a.vouches("c", t0 + 9 * S, T));
    assert!(
        a.heard_healthy(t0 + 10 * S, Duration::ZERO, true),
        "healthy again"
    );
    // A restart: only a word heard since counts.
    a.started("c", t0 + 11 * S);
    assert!(!a.vouches("c", t0 + 12 * S, T));
    a.heard(t0 + 13 * S, AgentState::CrashLoop, Some("exit 1"));
    a.heard_healthy(t0 + 13 * S, Duration::ZERO, false);
    assert!(!a.vouches("c", t0 + 13 * S, T), "crash-loop");
}

#[test]
fn a_late_word_of_the_previous_run_does_not_vouch_for_the_new_one() {
    let t0 = Instant::now();
    let mut a = agent(t0, None);
    a.heard(t0 + 2 * S, AgentState::Idle, None);
    a.heard_healthy(t0 + 2 * S, Duration::ZERO, true);
    a.started("c", t0 + 10 * S);
    // The old run's status, sent at 9 s, heard after the start.
    a.heard(t0 + 11 * S, AgentState::Idle, None);
    assert!(a.heard_healthy(t0 + 11 * S, 2 * S, true));
    assert!(!a.vouches("c", t0 + 11 * S, T), "the old run's word");
    // The new run's, sent since the start.
    a.heard(t0 + 12 * S, AgentState::Idle, None);
    assert!(!a.heard_healthy(t0 + 12 * S, S, true), "still healthy");
    assert!(a.vouches("c", t0 + 12 * S, T));
    // max_age counts from when it was sent.
    a.heard_healthy(t0 + 13 * S, 3 * S, true);
    assert!(a.vouches("c", t0 + 40 * S, T));
    assert!(!a.vouches("c", t0 + 41 * S, T), "sent 31 s ago");
}
