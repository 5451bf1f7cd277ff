//! The pure reconcile plan: what to do so that Docker matches the SUT directory.
//!
//! [`plan`] compares the *desired* SUTs (the valid files, each with its config hash) with the
//! *actual* containers (every container this supervisor owns, plus foreign containers that use a
//! wanted name) and returns [`Action`]s. It does no I/O and keeps no state, so it is tested
//! without Docker; the caller supplies everything that depends on time (is a job running, has the
//! busy wait run out).
//!
//! Rules, per SUT:
//! - A foreign container (without our managed-by and supervisor labels) is never touched. If it
//!   uses the name a desired SUT wants, that SUT gets [`Action::Conflict`].
//! - An invalid file keeps whatever container it has, exactly as it is: no action at all.
//! - No owned container with the wanted name: [`Action::Create`].
//! - Owned, but another config hash, or never started (`created`, e.g. a supervisor killed
//!   mid-create, whose files may be incomplete): [`Action::Recreate`], or [`Action::Defer`] while
//!   the agent is busy with a job and the busy wait has not run out.
//! - Owned, same hash, stopped (`exited`, `dead`): [`Action::Start`].
//! - Owned, same hash, running and unhealthy, healing enabled: [`Action::Restart`] (the caller
//!   applies the restart backoff).
//! - Owned containers of a SUT whose file is gone, and extra owned containers of a SUT (another
//!   name, e.g. after a `--name-prefix` change): [`Action::Remove`] (or deferred while busy).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use labvisor_protocol::payloads::Health;
use labvisor_protocol::SutName;

/// What the supervisor wants for one valid SUT file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// The config hash ([`labvisor_protocol::config::SutConfig::hash`], through
    /// [`crate::spec::SpecContext::container_hash`]).
    pub hash: String,
    /// The container name (`[--name-prefix]<sut>`).
    pub name: String,
    /// Restart the container when Docker says it is unhealthy (`restart.on_unhealthy`).
    pub heal: bool,
}

/// A container's life state, as Docker lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Created, never started.
    Created,
    /// Running.
    Running,
    /// Paused (left alone: someone paused it on purpose, and health probes catch a hang).
    Paused,
    /// Docker's restart policy is restarting it.
    Restarting,
    /// Being removed.
    Removing,
    /// Stopped.
    Exited,
    /// Dead.
    Dead,
}

/// Whether the agent is running a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Busy {
    /// No job (or unknown).
    #[default]
    Idle,
    /// A job runs: disruptive actions wait.
    Busy,
    /// A job runs, but the busy wait ran out: proceed anyway.
    Expired,
}

/// One container as the supervisor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actual {
    /// Docker's container id.
    pub id: String,
    /// The container name (without Docker's leading `/`).
    pub name: String,
    /// The SUT it belongs to: its `io.labvisor.sut` label when owned, else the SUT whose wanted
    /// name it uses.
    pub sut: SutName,
    /// Whether it carries this supervisor's labels (managed-by and supervisor id).
    pub owned: bool,
    /// Its `io.labvisor.config-hash` label.
    pub hash: Option<String>,
    /// Its life state.
    pub state: RunState,
    /// Docker's health.
    pub health: Health,
    /// Whether its agent is busy.
    pub busy: Busy,
}

/// Why a container is recreated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecreateReason {
    /// The config hash changed.
    ConfigChanged,
    /// The container was created but never started (possibly incomplete).
    NeverStarted,
}

/// A disruptive action that waits for the agent's job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deferred {
    /// A recreation.
    Recreate,
    /// A removal.
    Remove,
}

impl fmt::Display for Deferred {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Deferred::Recreate => "recreate",
            Deferred::Remove => "remove",
        })
    }
}

impl Action {
    /// The container whose agent's job this action would disrupt, if the action waits for a
    /// busy agent: a recreation after a config change, a removal, and either of them deferred.
    /// (A container that never started runs no job.)
    pub fn disrupts(&self) -> Option<&str> {
        match self {
            Action::Recreate {
                id,
                reason: RecreateReason::ConfigChanged,
                ..
            }
            | Action::Remove { id, .. }
            | Action::Defer { id, .. } => Some(id),
            _ => None,
        }
    }
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create and start the SUT's container.
    Create {
        /// The SUT.
        sut: SutName,
    },
    /// Stop and remove the container `id`, then create and start a new one.
    Recreate {
        /// The SUT.
        sut: SutName,
        /// The old container.
        id: String,
        /// Why.
        reason: RecreateReason,
    },
    /// Stop and remove the container `id` (the SUT's volume is kept).
    Remove {
        /// The SUT.
        sut: SutName,
        /// The container.
        id: String,
        /// Whether the SUT's file is gone (so its status is cleared), or only this container is
        /// surplus.
        sut_gone: bool,
    },
    /// Start the stopped container `id`.
    Start {
        /// The SUT.
        sut: SutName,
        /// The container.
        id: String,
    },
    /// Restart the unhealthy container `id` (healing).
    Restart {
        /// The SUT.
        sut: SutName,
        /// The container.
        id: String,
    },
    /// A recreation or removal waits while the agent is busy.
    Defer {
        /// The SUT.
        sut: SutName,
        /// The container.
        id: String,
        /// What waits.
        action: Deferred,
    },
    /// A foreign container uses the SUT's name: nothing is done, the SUT reports an error.
    Conflict {
        /// The SUT.
        sut: SutName,
        /// The foreign container.
        id: String,
        /// Its name.
        name: String,
    },
}

impl Action {
    /// The SUT the action is about.
    pub fn sut(&self) -> &SutName {
        match self {
            Action::Create { sut }
            | Action::Recreate { sut, .. }
            | Action::Remove { sut, .. }
            | Action::Start { sut, .. }
            | Action::Restart { sut, .. }
            | Action::Defer { sut, .. }
            | Action::Conflict { sut, .. } => sut,
        }
    }

    /// Whether the action changes Docker (`Defer` and `Conflict` do not).
    pub fn mutates(&self) -> bool {
        !matches!(self, Action::Defer { .. } | Action::Conflict { .. })
    }

    /// A short name for logs (`create`, `recreate`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Create { .. } => "create",
            Action::Recreate { .. } => "recreate",
            Action::Remove { .. } => "remove",
            Action::Start { .. } => "start",
            Action::Restart { .. } => "restart",
            Action::Defer { .. } => "defer",
            Action::Conflict { .. } => "conflict",
        }
    }
}

/// Plans the actions that make `actual` match `desired`. `invalid` names the SUTs whose file
/// exists but is invalid; their containers are left exactly as they are. See the module docs for
/// the rules. Actions come sorted by SUT.
pub fn plan(
    desired: &BTreeMap<SutName, Desired>,
    actual: &[Actual],
    invalid: &BTreeSet<SutName>,
) -> Vec<Action> {
    let mut by_sut: BTreeMap<&SutName, Vec<&Actual>> = BTreeMap::new();
    for a in actual {
        by_sut.entry(&a.sut).or_default().push(a);
    }
    let suts: BTreeSet<&SutName> = desired.keys().chain(by_sut.keys().copied()).collect();
    let mut actions = Vec::new();
    for sut in suts {
        if invalid.contains(sut) && !desired.contains_key(sut) {
            continue;
        }
        let containers = by_sut.get(sut).map(Vec::as_slice).unwrap_or_default();
        let owned = containers.iter().filter(|a| a.owned);
        let disruptive = |a: &Actual, action: Action, deferred: Deferred| {
            if a.busy == Busy::Busy {
                Action::Defer {
                    sut: sut.clone(),
                    id: a.id.clone(),
                    action: deferred,
                }
            } else {
                action
            }
        };
        let Some(want) = desired.get(sut) else {
            for a in owned {
                actions.push(disruptive(
                    a,
                    Action::Remove {
                        sut: sut.clone(),
                        id: a.id.clone(),
                        sut_gone: true,
                    },
                    Deferred::Remove,
                ));
            }
            continue;
        };
        let mut primary = None;
        for a in owned {
            if a.name == want.name && primary.is_none() {
                primary = Some(*a);
            } else {
                actions.push(disruptive(
                    a,
                    Action::Remove {
                        sut: sut.clone(),
                        id: a.id.clone(),
                        sut_gone: false,
                    },
                    Deferred::Remove,
                ));
            }
        }
        let Some(a) = primary else {
            match containers.iter().find(|a| !a.owned && a.name == want.name) {
                Some(foreign) => actions.push(Action::Conflict {
                    sut: sut.clone(),
                    id: foreign.id.clone(),
                    name: foreign.name.clone(),
                }),
                None => actions.push(Action::Create { sut: sut.clone() }),
            }
            continue;
        };
        let reason = if a.hash.as_deref() != Some(want.hash.as_str()) {
            Some(RecreateReason::ConfigChanged)
        } else if a.state == RunState::Created {
            Some(RecreateReason::NeverStarted)
        } else {
            None
        };
        if let Some(reason) = reason {
            // A container that never started runs no job: never wait for it.
            let action = Action::Recreate {
                sut: sut.clone(),
                id: a.id.clone(),
                reason,
            };
            actions.push(if reason == RecreateReason::NeverStarted {
                action
            } else {
                disruptive(a, action, Deferred::Recreate)
            });
            continue;
        }
        match a.state {
            RunState::Exited | RunState::Dead => actions.push(Action::Start {
                sut: sut.clone(),
                id: a.id.clone(),
            }),
            RunState::Running if want.heal && a.health == Health::Unhealthy => {
                actions.push(Action::Restart {
                    sut: sut.clone(),
                    id: a.id.clone(),
                })
            }
            _ => {}
        }
    }
    actions
}

#[cfg(test)]
mod tests {
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
    fn heals_only_when_enabled_and_starts_stopped() {
        let mut desired = BTreeMap::from([want("a", "h"), want("b", "h")]);
        let mut a = owned("a", "ida", "h");
        a.health = Health::Unhealthy;
        let mut b = owned("b", "idb", "h");
        b.state = RunState::Exited;
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
        fn invalid_suts_are_left_alone((desired, invalid, actual) in arb_world()) {
            for action in plan(&desired, &actual, &invalid) {
                prop_assert!(!invalid.contains(action.sut()), "{:?}", action);
            }
        }
    }
}
