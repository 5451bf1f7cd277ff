//! Unit and property tests of [`super::plan`].

use super::*;
use proptest::prelude::*;

fn sut(s: &str) -> SutName {
    SutName::new(s).unwrap()
}

fn want(s: &str, hash: &str) -> (SutName, Desired) {
    (
        sut(s),
        Desired {
            hash: hash.into(),
            name: format!("p-{s}"),
            heal: true,
        },
    )
}

fn owned(s: &str, id: &str, hash: &str) -> Actual {
    Actual {
        id: id.into(),
        name: format!("p-{s}"),
        sut: sut(s),
        owned: true,
        hash: Some(hash.into()),
        state: RunState::Running,
        health: Health::Healthy,
        busy: Busy::Idle,
        probe_only: false,
        finished_ms: None,
        node: None,
        down: None,
    }
}

#[test]
fn creates_recreates_removes_and_adopts() {
    let desired = BTreeMap::from([want("a", "h1"), want("b", "h2"), want("c", "h3")]);
    let actual = vec![
        owned("b", "idb", "old"),
        owned("c", "idc", "h3"),
        owned("gone", "idg", "h"),
    ];
    let actions = plan(&desired, &actual, &BTreeSet::new());
    assert_eq!(
        actions,
        vec![
            Action::Create { sut: sut("a") },
            Action::Recreate {
                sut: sut("b"),
                id: "idb".into(),
                reason: RecreateReason::ConfigChanged
            },
            Action::Remove {
                sut: sut("gone"),
                id: "idg".into(),
                sut_gone: true
            },
        ]
    );
}

#[test]
fn invalid_files_keep_their_containers() {
    let actual = vec![owned("bad", "id", "h")];
    let invalid = BTreeSet::from([sut("bad")]);
    assert!(plan(&BTreeMap::new(), &actual, &invalid).is_empty());
}

#[test]
fn foreign_container_with_the_name_is_a_conflict() {
    let desired = BTreeMap::from([want("a", "h")]);
    let mut foreign = owned("a", "x", "h");
    foreign.owned = false;
    foreign.hash = None;
    let actions = plan(&desired, &[foreign], &BTreeSet::new());
    assert_eq!(
        actions,
        vec![Action::Conflict {
            sut: sut("a"),
            id: "x".into(),
            name: "p-a".into()
        }]
    );
}

#[test]
fn busy_defers_until_expired() {
    let desired = BTreeMap::from([want("a", "new")]);
    let mut a = owned("a", "id", "old");
    a.busy = Busy::Busy;
    let actions = plan(&desired, std::slice::from_ref(&a), &BTreeSet::new());
    assert_eq!(
        actions,
        vec![Action::Defer {
            sut: sut("a"),
            id: "id".into(),
            action: Deferred::Recreate
        }]
    );
    a.busy = Busy::Expired;
    assert!(matches!(
        plan(&desired, &[a.clone()], &BTreeSet::new())[0],
        Action::Recreate { .. }
    ));
    // Removal waits too.
    a.busy = Busy::Busy;
    assert!(matches!(
        plan(&BTreeMap::new(), std::slice::from_ref(&a), &BTreeSet::new())[0],
        Action::Defer {
            action: Deferred::Remove,
            ..
        }
    ));
    // Every action that waits (or would wait) for a busy agent names its container: the
    // supervisor asks that agent; the others disrupt no job.
    a.busy = Busy::Idle;
    for actions in [
        plan(&desired, std::slice::from_ref(&a), &BTreeSet::new()),
        plan(&BTreeMap::new(), std::slice::from_ref(&a), &BTreeSet::new()),
    ] {
        assert_eq!(actions[0].disrupts(), Some("id"), "{actions:?}");
    }
    a.busy = Busy::Busy;
    assert_eq!(
        plan(&desired, std::slice::from_ref(&a), &BTreeSet::new())[0].disrupts(),
        Some("id")
    );
    a.state = RunState::Created;
    a.hash = Some("new".into());
    assert_eq!(
        plan(&desired, &[a], &BTreeSet::new())[0].disrupts(),
        None,
        "a container that never started runs no job"
    );
}

#[test]
fn never_started_is_recreated_even_when_busy_is_claimed() {
    let desired = BTreeMap::from([want("a", "h")]);
    let mut a = owned("a", "id", "h");
    a.state = RunState::Created;
    a.busy = Busy::Busy;
    assert_eq!(
        plan(&desired, &[a], &BTreeSet::new()),
        vec![Action::Recreate {
            sut: sut("a"),
            id: "id".into(),
            reason: RecreateReason::NeverStarted
        }]
    );
}

#[test]
fn heals_only_when_enabled_and_starts_dead() {
    let mut desired = BTreeMap::from([want("a", "h"), want("b", "h")]);
    let mut a = owned("a", "ida", "h");
    a.health = Health::Unhealthy;
    let mut b = owned("b", "idb", "h");
    b.state = RunState::Dead;
    let actions = plan(&desired, &[a.clone(), b.clone()], &BTreeSet::new());
    assert_eq!(
        actions,
        vec![
            Action::Restart {
                sut: sut("a"),
                id: "ida".into()
            },
            Action::Start {
                sut: sut("b"),
                id: "idb".into()
            }
        ]
    );
    desired.get_mut(&sut("a")).unwrap().heal = false;
    assert_eq!(plan(&desired, &[a, b], &BTreeSet::new()).len(), 1);
}

/// A container unhealthy only because its agent's exec probe fails is not restarted: a restart
/// mends no refused server and would cut the device's own work. Its config change still
/// recreates it (waiting for a job as always), and once the agent's word is stale it is healed.
#[test]
fn an_unhealthy_container_whose_exec_probe_fails_is_not_healed() {
    let desired = BTreeMap::from([want("a", "h")]);
    let mut a = owned("a", "ida", "h");
    a.health = Health::Unhealthy;
    a.probe_only = true;
    assert_eq!(plan(&desired, &[a.clone()], &BTreeSet::new()), vec![]);
    a.hash = Some("old".into());
    assert_eq!(
        plan(&desired, &[a.clone()], &BTreeSet::new()),
        vec![Action::Recreate {
            sut: sut("a"),
            id: "ida".into(),
            reason: RecreateReason::ConfigChanged
        }]
    );
    a.hash = Some("h".into());
    a.probe_only = false;
    assert_eq!(
        plan(&desired, &[a], &BTreeSet::new()),
        vec![Action::Restart {
            sut: sut("a"),
            id: "ida".into()
        }]
    );
}

#[test]
fn the_agents_word_on_its_probe_counts_within_max_age() {
    use tokio::time::{Duration, Instant};
    let now = Instant::now();
    let max_age = Duration::from_secs(30);
    assert!(classify::probe_only(Some(now), now, max_age));
    assert!(classify::probe_only(Some(now - max_age), now, max_age));
    assert!(!classify::probe_only(
        Some(now - max_age - Duration::from_millis(1)),
        now,
        max_age
    ));
    assert!(!classify::probe_only(None, now, max_age));
}

/// A container the runtime says is down (Swarm: its node is lost) is not a person's stop,
/// whatever state it is listed in.
#[test]
fn a_container_the_runtime_says_is_down_was_not_stopped_by_a_person() {
    let desired = BTreeMap::from([want("a", "h")]);
    let mut a = owned("a", "ida", "h");
    a.state = RunState::Exited;
    assert!(stopped_by_person(&a, desired.get(&sut("a"))));
    a.down = Some("node rack3 is down".into());
    a.node = Some("rack3".into());
    assert!(!stopped_by_person(&a, desired.get(&sut("a"))));
    assert_eq!(plan(&desired, &[a], &BTreeSet::new()), vec![]);
}

#[test]
fn a_person_s_stop_is_honoured_until_the_file_changes() {
    let desired = BTreeMap::from([want("a", "h")]);
    let mut a = owned("a", "ida", "h");
    a.state = RunState::Exited;
    a.health = Health::None;
    a.finished_ms = Some(1_000);
    assert!(stopped_by_person(&a, desired.get(&sut("a"))));
    assert_eq!(
        plan(&desired, std::slice::from_ref(&a), &BTreeSet::new()),
        vec![],
        "not started behind the person's back"
    );
    // Docker restarting it after a crash or an OOM kill, or running again: not a person's stop.
    for state in [RunState::Restarting, RunState::Running, RunState::Dead] {
        let mut b = a.clone();
        b.state = state;
        assert!(!stopped_by_person(&b, desired.get(&sut("a"))), "{state:?}");
    }
    // A changed file recreates it, as always (and the new container runs).
    let changed = BTreeMap::from([want("a", "h2")]);
    assert!(!stopped_by_person(&a, changed.get(&sut("a"))));
    assert_eq!(
        plan(&changed, std::slice::from_ref(&a), &BTreeSet::new()),
        vec![Action::Recreate {
            sut: sut("a"),
            id: "ida".into(),
            reason: RecreateReason::ConfigChanged
        }]
    );
    // Its file deleted: removed, as always.
    assert!(matches!(
        plan(&BTreeMap::new(), &[a], &BTreeSet::new())[..],
        [Action::Remove { .. }]
    ));
}

#[test]
fn surplus_owned_container_is_removed() {
    let desired = BTreeMap::from([want("a", "h")]);
    let mut old = owned("a", "old", "h");
    old.name = "oldprefix-a".into();
    let actions = plan(&desired, &[old, owned("a", "cur", "h")], &BTreeSet::new());
    assert_eq!(
        actions,
        vec![Action::Remove {
            sut: sut("a"),
            id: "old".into(),
            sut_gone: false
        }]
    );
}

// ---- property: applying the plan to a fake world, then planning again, changes nothing.

fn apply(world: &mut Vec<Actual>, desired: &BTreeMap<SutName, Desired>, actions: &[Action]) {
    let mut next_id = world.len() * 1000 + 1;
    for action in actions {
        match action {
            Action::Create { sut } | Action::Recreate { sut, .. } => {
                if let Action::Recreate { id, .. } = action {
                    world.retain(|a| &a.id != id);
                }
                let d = &desired[sut];
                next_id += 1;
                world.push(Actual {
                    id: format!("new{next_id}"),
                    name: d.name.clone(),
                    sut: sut.clone(),
                    owned: true,
                    hash: Some(d.hash.clone()),
                    state: RunState::Running,
                    health: Health::Starting,
                    busy: Busy::Idle,
                    probe_only: false,
                    finished_ms: None,
                    node: None,
                    down: None,
                });
            }
            Action::Remove { id, .. } => world.retain(|a| &a.id != id),
            Action::Start { id, .. } => {
                if let Some(a) = world.iter_mut().find(|a| &a.id == id) {
                    a.state = RunState::Running;
                    a.health = Health::Starting;
                }
            }
            Action::Restart { id, .. } => {
                if let Some(a) = world.iter_mut().find(|a| &a.id == id) {
                    a.health = Health::Starting;
                }
            }
            Action::Defer { .. } | Action::Conflict { .. } => {}
        }
    }
}

fn arb_state() -> impl Strategy<Value = RunState> {
    prop_oneof![
        Just(RunState::Created),
        Just(RunState::Running),
        Just(RunState::Paused),
        Just(RunState::Restarting),
        Just(RunState::Exited),
        Just(RunState::Dead),
    ]
}

fn arb_health() -> impl Strategy<Value = Health> {
    prop_oneof![
        Just(Health::Starting),
        Just(Health::Healthy),
        Just(Health::Unhealthy),
        Just(Health::None),
    ]
}

fn arb_busy() -> impl Strategy<Value = Busy> {
    prop_oneof![Just(Busy::Idle), Just(Busy::Busy), Just(Busy::Expired)]
}

prop_compose! {
    fn arb_actual()(s in 0..6u8, id in 0..1000u32, owned in any::<bool>(), other_name in any::<bool>(),
                    hash in 0..3u8, state in arb_state(), health in arb_health(), busy in arb_busy()) -> Actual {
        let name = if other_name { format!("q-s{s}") } else { format!("p-s{s}") };
        Actual {
            id: format!("c{id}"),
            name,
            sut: sut(&format!("s{s}")),
            owned,
            hash: owned.then(|| format!("h{hash}")),
            state,
            health,
            busy,
            probe_only: false,
            finished_ms: (state == RunState::Exited).then_some(1_000),
            node: None,
            down: None,
        }
    }
}

prop_compose! {
    fn arb_world()(desired in prop::collection::btree_map(0..6u8, (0..3u8, any::<bool>()), 0..6),
                   invalid in prop::collection::btree_set(0..6u8, 0..3),
                   actual in prop::collection::vec(arb_actual(), 0..10))
                   -> (BTreeMap<SutName, Desired>, BTreeSet<SutName>, Vec<Actual>) {
        let desired: BTreeMap<SutName, Desired> = desired.into_iter().filter(|(s, _)| !invalid.contains(s)).map(|(s, (h, heal))| {
            (sut(&format!("s{s}")), Desired { hash: format!("h{h}"), name: format!("p-s{s}"), heal })
        }).collect();
        let invalid = invalid.into_iter().map(|s| sut(&format!("s{s}"))).collect();
        // Docker names are unique: keep the first container of each name.
        let mut seen = BTreeSet::new();
        let mut ids = BTreeSet::new();
        let actual = actual.into_iter().filter(|a| seen.insert(a.name.clone()) && ids.insert(a.id.clone())).collect();
        (desired, invalid, actual)
    }
}

proptest! {
    #[test]
    fn planning_is_idempotent((desired, invalid, actual) in arb_world()) {
        let mut world = actual.clone();
        let first = plan(&desired, &world, &invalid);
        apply(&mut world, &desired, &first);
        let second = plan(&desired, &world, &invalid);
        // Only waiting and conflicts may remain, and exactly those of the first plan.
        let waiting: Vec<_> = first.iter().filter(|a| !a.mutates()).cloned().collect();
        prop_assert_eq!(second, waiting);
    }

    #[test]
    fn foreign_containers_are_never_touched((desired, invalid, actual) in arb_world()) {
        let foreign: BTreeSet<&str> = actual.iter().filter(|a| !a.owned).map(|a| a.id.as_str()).collect();
        for action in plan(&desired, &actual, &invalid) {
            match &action {
                Action::Recreate { id, .. } | Action::Remove { id, .. } | Action::Start { id, .. }
                | Action::Restart { id, .. } | Action::Defer { id, .. } => {
                    prop_assert!(!foreign.contains(id.as_str()), "{:?}", action)
                }
                Action::Create { .. } | Action::Conflict { .. } => {}
            }
        }
    }

    #[test]
    fn a_person_s_stop_is_never_undone((desired, invalid, actual) in arb_world()) {
        let held: BTreeSet<&str> = actual
            .iter()
            .filter(|a| is_primary(a, desired.get(&a.sut)) && stopped_by_person(a, desired.get(&a.sut)))
            .map(|a| a.id.as_str())
            .collect();
        for action in plan(&desired, &actual, &invalid) {
            if let Action::Start { id, .. } | Action::Restart { id, .. } = &action {
                prop_assert!(!held.contains(id.as_str()), "{:?}", action);
            }
            if let Action::Start { id, .. } = &action {
                let a = actual.iter().find(|a| &a.id == id).unwrap();
                prop_assert_eq!(a.state, RunState::Dead, "only a dead container is started: {:?}", action);
            }
        }
    }

    #[test]
    fn invalid_suts_are_left_alone((desired, invalid, actual) in arb_world()) {
        for action in plan(&desired, &actual, &invalid) {
            prop_assert!(!invalid.contains(action.sut()), "{:?}", action);
        }
    }
}
