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
//! - Owned, same hash, `exited`: **stopped by a person** ([`stopped_by_person`]), left alone
//!   until someone starts it or its file changes. `dead`: [`Action::Start`].
//! - Owned, same hash, running and unhealthy, healing enabled: [`Action::Restart`] (the caller
//!   applies the restart backoff), unless its agent is unhealthy only because its exec probe
//!   fails ([`Actual::probe_only`]): then nothing.
//! - Owned containers of a SUT whose file is gone, and extra owned containers of a SUT (another
//!   name, e.g. after a `--name-prefix` change): [`Action::Remove`] (or deferred while busy).
//!
//! Beside it, the other decisions of the reconcile loop that need no I/O, each unit-tested:
//! - [`classify`]: what the loop's inputs mean before planning: the desired SUTs of a directory
//!   scan, which listed containers are whose ([`Actual`]), which agents to ask before a
//!   disruption, which Docker events are news.
//! - [`rolling`]: the rolling restart (`labvisor restart`): whose turn it is, its
//!   recreation behind the busy gate, its progress.
//! - [`networks`]: which of labvisor's agent networks (`labvisor.net`, `.2`, …) a new
//!   container goes on: the first with room under `--network-capacity`.
//! - [`hang`]: the supervisor's own hang detection (an agent silent on the broker for
//!   `health.max_age`, confirmed with the healthcheck through `docker exec`) and Docker's
//!   `auto` health-check interval.
//! - [`policy`]: what the loop keeps per SUT between passes and the gates on acting: retry
//!   backoff after a failed action, the healing backoff and crash-loop flag, the busy wait.
//!   Every backoff is [`policy::Backoff`] (backon's exponential builder).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use labvisor_protocol::payloads::Health;
use labvisor_protocol::SutName;

pub mod classify;
pub mod hang;
pub mod networks;
pub mod policy;
pub mod rolling;

/// Who heals unhealthy containers: the one switch, taken from the runtime at start
/// ([`crate::runtime::ContainerRuntime::heals_itself`]), by which the supervisor's own healing
/// steps back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Healing {
    /// The supervisor (the local engine): it restarts unhealthy containers
    /// (`restart.on_unhealthy`), confirms a silent agent's hang through `docker exec`
    /// ([`hang`]) and asks agents to drain their device process through exec.
    #[default]
    Supervisor,
    /// The runtime replaces unhealthy containers itself (Swarm, from the same HEALTHCHECK), and
    /// the supervisor cannot exec into them (they run on other hosts): it issues no
    /// [`Action::Restart`] ([`classify::desired`] leaves `heal` off), its hang rule is off
    /// (Docker's probe is the only hang detector), and it sends no drain requests. Status,
    /// jobs and output are as under [`Healing::Supervisor`].
    Runtime,
}

impl Healing {
    /// The healing of a runtime that `heals_itself` or not.
    pub fn of(heals_itself: bool) -> Self {
        if heals_itself {
            Healing::Runtime
        } else {
            Healing::Supervisor
        }
    }

    /// Whether the supervisor heals (and may exec into agent containers).
    pub fn by_supervisor(self) -> bool {
        self == Healing::Supervisor
    }
}

/// What the supervisor wants for one valid SUT file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// The config hash ([`labvisor_protocol::config::SutConfig::hash`], through
    /// [`crate::spec::SpecContext::container_hash`]).
    pub hash: String,
    /// The container name (`[--name-prefix]<sut>`).
    pub name: String,
    /// Restart the container when Docker says it is unhealthy (`restart.on_unhealthy`, and the
    /// supervisor heals: [`Healing::Supervisor`]).
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
    /// Whether its agent said recently that it is unhealthy only because its exec probe fails
    /// ([`classify::probe_only`]): healing leaves it alone, since a restart mends no refused or
    /// unreachable server and would cut the device's own work.
    pub probe_only: bool,
    /// When it stopped (Docker's `FinishedAt`, ms since the epoch), for an exited container.
    pub finished_ms: Option<u64>,
    /// The host it runs or last ran on, when the runtime spans several
    /// ([`crate::runtime::ContainerInfo::node`]); shown on the SUT's view, never planned on.
    pub node: Option<String>,
    /// Why it is down although it should run, as the runtime says
    /// ([`crate::runtime::ContainerInfo::down`]); shown on the SUT's view, never planned on.
    pub down: Option<String>,
}

/// Why a container is recreated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecreateReason {
    /// The config hash changed.
    ConfigChanged,
    /// The container was created but never started (possibly incomplete).
    NeverStarted,
    /// A rolling restart asked for it (`labvisor restart`, see [`rolling`]).
    Requested,
}

/// A disruptive action that waits for the agent's job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deferred {
    /// A recreation.
    Recreate,
    /// A removal.
    Remove,
    /// A rolling restart's recreation ([`rolling`]).
    Restart,
}

impl fmt::Display for Deferred {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Deferred::Recreate => "recreate",
            Deferred::Remove => "remove",
            Deferred::Restart => "restart",
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
                reason: RecreateReason::ConfigChanged | RecreateReason::Requested,
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

/// Whether `a` is the container that serves its SUT: owned and, when the SUT is wanted
/// (`want`), using the wanted name. Of several such containers the first counts ([`primary`]).
pub fn is_primary(a: &Actual, want: Option<&Desired>) -> bool {
    a.owned && want.is_none_or(|d| d.name == a.name)
}

/// The container that serves `sut` (its state, health and id are the SUT's): the first owned
/// container of `sut` with the wanted name, or, for a SUT whose file is gone, its first owned
/// container. The one lookup used by the plan, the healing bookkeeping, the status views and the
/// metrics.
pub fn primary<'a>(
    actual: &'a [Actual],
    desired: &BTreeMap<SutName, Desired>,
    sut: &SutName,
) -> Option<&'a Actual> {
    actual
        .iter()
        .find(|a| &a.sut == sut && is_primary(a, desired.get(sut)))
}

/// Whether `a`, the SUT's own container (see [`primary`]) with the wanted config, was stopped
/// by a person (`docker stop` or `docker kill`, Portainer's stop): the supervisor leaves it
/// stopped, as Docker's own restart policy does, until it is started again or its file
/// changes (then it is recreated, as a changed file always is).
///
/// The rule needs no memory, so it holds across supervisor restarts: every agent container is
/// created with the restart policy `unless-stopped`, so on Engine 20.10 one that is `exited`
/// is one Docker decided not to restart, which it does only after a `docker stop` or
/// `docker kill` (any signal: both set the container's manually-stopped flag, which
/// `docker start` clears). A crash or an OOM kill is restarted by Docker (`restarting` during
/// its backoff, then `running`); a daemon restart stops the containers without that flag and
/// brings them back; a container created but never started (`created`) is recreated and
/// started by the supervisor. The supervisor itself only stops a container to remove or
/// restart it; when a rolling restart's recreation fails after that stop, it starts the
/// container again, and the loop remembers it ([`policy::SutState::stopped_itself`]) in case
/// that fails too, or when a healing restart (`docker restart`) fails after its stop.
///
/// A container the runtime says is down ([`Actual::down`]: Swarm, its node lost) was not
/// stopped by a person, whatever its state.
pub fn stopped_by_person(a: &Actual, want: Option<&Desired>) -> bool {
    a.owned
        && a.down.is_none()
        && a.state == RunState::Exited
        && want.is_some_and(|d| d.name == a.name && a.hash.as_deref() == Some(d.hash.as_str()))
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
        match desired.get(sut) {
            None => plan_gone(containers, &mut actions),
            Some(want) => plan_wanted(sut, want, containers, &mut actions),
        }
    }
    actions
}

/// `action` on `a`, or [`Action::Defer`] while `a`'s agent is busy and the wait has not run out.
fn unless_busy(a: &Actual, action: Action, deferred: Deferred) -> Action {
    if a.busy == Busy::Busy {
        Action::Defer {
            sut: a.sut.clone(),
            id: a.id.clone(),
            action: deferred,
        }
    } else {
        action
    }
}

/// A removal of the owned container `a`.
fn remove(a: &Actual, sut_gone: bool) -> Action {
    unless_busy(
        a,
        Action::Remove {
            sut: a.sut.clone(),
            id: a.id.clone(),
            sut_gone,
        },
        Deferred::Remove,
    )
}

/// The SUT's file is gone: every owned container goes.
fn plan_gone(containers: &[&Actual], actions: &mut Vec<Action>) {
    for a in containers.iter().filter(|a| a.owned) {
        actions.push(remove(a, true));
    }
}

/// A wanted SUT: surplus owned containers go, then the primary is created, recreated, started
/// or healed (or the name is held by a foreign container: a conflict).
fn plan_wanted(sut: &SutName, want: &Desired, containers: &[&Actual], actions: &mut Vec<Action>) {
    let primary = containers
        .iter()
        .copied()
        .find(|a| is_primary(a, Some(want)));
    let is_it = |a: &Actual| primary.is_some_and(|p| std::ptr::eq(p, a));
    for a in containers.iter().filter(|a| a.owned && !is_it(a)) {
        actions.push(remove(a, false));
    }
    let Some(a) = primary else {
        actions.push(
            match containers.iter().find(|a| !a.owned && a.name == want.name) {
                Some(foreign) => Action::Conflict {
                    sut: sut.clone(),
                    id: foreign.id.clone(),
                    name: foreign.name.clone(),
                },
                None => Action::Create { sut: sut.clone() },
            },
        );
        return;
    };
    actions.extend(plan_primary(a, want));
}

/// What the SUT's own container needs: a recreation (other hash, never started), a start
/// (dead) or a restart (unhealthy, healing on). An exited one was stopped by a person: nothing.
fn plan_primary(a: &Actual, want: &Desired) -> Option<Action> {
    let reason = if a.hash.as_deref() != Some(want.hash.as_str()) {
        Some(RecreateReason::ConfigChanged)
    } else if a.state == RunState::Created {
        Some(RecreateReason::NeverStarted)
    } else {
        None
    };
    let (sut, id) = (a.sut.clone(), a.id.clone());
    if let Some(reason) = reason {
        let action = Action::Recreate { sut, id, reason };
        // A container that never started runs no job: never wait for it.
        return Some(if reason == RecreateReason::NeverStarted {
            action
        } else {
            unless_busy(a, action, Deferred::Recreate)
        });
    }
    match a.state {
        // `exited`: stopped by a person (see `stopped_by_person`), left so.
        RunState::Dead => Some(Action::Start { sut, id }),
        RunState::Running if want.heal && a.health == Health::Unhealthy && !a.probe_only => {
            Some(Action::Restart { sut, id })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;
