//! Classification: what the reconcile loop's inputs mean, before [`super::plan`] runs.
//!
//! All of it is pure (no I/O, no clock): the desired SUTs of a directory scan, which listed
//! containers are whose ([`classify`]), which agents to ask before a disruption ([`to_ask`]) and
//! how their answers change the picture ([`apply_answers`]), and which Docker events are worth
//! a pass ([`HealthSeen`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

use labvisor_protocol::config::{OnUnhealthy, Scan};
use labvisor_protocol::SutName;

use super::{Action, Actual, Busy, Desired, Healing, RunState};
use crate::runtime::{ContainerInfo, RuntimeEvent};
use crate::spec::MANAGED_BY;
use crate::spec::{SpecContext, LABEL_CONFIG_HASH, LABEL_MANAGED_BY, LABEL_SUPERVISOR, LABEL_SUT};

/// The SUT an entry of the SUT directory is named after (`<sut>.toml`), if its name is one.
pub fn stem(p: &Path) -> Option<SutName> {
    p.file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| SutName::new(s).ok())
}

/// What the supervisor wants for each valid SUT file of `scan`. Under [`Healing::Runtime`] no
/// SUT is healed by the supervisor (`heal` is off), whatever its `restart.on_unhealthy`.
pub fn desired(scan: &Scan, ctx: &SpecContext, healing: Healing) -> BTreeMap<SutName, Desired> {
    scan.valid
        .iter()
        .map(|(name, cfg)| {
            (
                name.clone(),
                Desired {
                    hash: ctx.container_hash(&cfg.hash()),
                    name: ctx.container_name(name),
                    heal: healing.by_supervisor()
                        && cfg.restart.on_unhealthy == OnUnhealthy::Restart,
                },
            )
        })
        .collect()
}

/// The SUTs whose file exists but is invalid (their containers are left alone).
pub fn invalid(scan: &Scan) -> BTreeSet<SutName> {
    scan.invalid.keys().filter_map(|p| stem(p)).collect()
}

/// Whose container `c` is: `(sut, owned)`. Owned: it carries this supervisor's managed-by and
/// supervisor labels, and its SUT label names the SUT. Foreign: it uses the name a desired SUT
/// wants (a conflict). Anything else is none of the supervisor's business: `None`.
pub fn owner(
    c: &ContainerInfo,
    ctx: &SpecContext,
    desired: &BTreeMap<SutName, Desired>,
) -> Option<(SutName, bool)> {
    let owned = c.labels.get(LABEL_MANAGED_BY).map(String::as_str) == Some(MANAGED_BY)
        && c.labels.get(LABEL_SUPERVISOR).map(String::as_str) == Some(ctx.supervisor.as_str());
    if owned {
        let sut = c.labels.get(LABEL_SUT).and_then(|s| SutName::new(s).ok())?;
        return Some((sut, true));
    }
    let sut = c
        .name
        .strip_prefix(&ctx.name_prefix)
        .and_then(|s| SutName::new(s).ok())
        .filter(|s| desired.contains_key(s))?;
    Some((sut, false))
}

/// The containers of `list` the plan must see, as [`Actual`]s; `busy` is the broker's view of
/// each SUT's agent.
pub fn classify(
    list: Vec<ContainerInfo>,
    ctx: &SpecContext,
    desired: &BTreeMap<SutName, Desired>,
    busy: impl Fn(&SutName) -> Busy,
) -> Vec<Actual> {
    list.into_iter()
        .filter_map(|c| {
            let (sut, owned) = owner(&c, ctx, desired)?;
            Some(Actual {
                busy: busy(&sut),
                hash: c.labels.get(LABEL_CONFIG_HASH).cloned(),
                id: c.id,
                name: c.name,
                sut,
                owned,
                state: c.state,
                health: c.health,
                probe_only: false,
                finished_ms: c.finished_ms,
                node: c.node,
                down: c.down,
            })
        })
        .collect()
}

/// Whether a SUT's container is unhealthy only because its agent's exec probe fails: its agent
/// said so (in a healthy state) at `said`, no longer than `max_age` (the SUT's
/// `health.max_age`) before `now`. An older word may be the last of a hung agent, which healing
/// must restart; without one (no broker) the container is healed as any other.
pub fn probe_only(said: Option<Instant>, now: Instant, max_age: Duration) -> bool {
    said.is_some_and(|t| now.saturating_duration_since(t) <= max_age)
}

/// The running containers whose agents `actions` would disrupt (or wait for), unless their
/// busy wait already ran out: their agents are asked whether they run a job.
pub fn to_ask(actual: &[Actual], actions: &[Action]) -> Vec<(String, SutName)> {
    actions
        .iter()
        .filter_map(Action::disrupts)
        .filter_map(|id| {
            actual
                .iter()
                .find(|a| a.id == id && a.state == RunState::Running && a.busy != Busy::Expired)
                .map(|a| (a.id.clone(), a.sut.clone()))
        })
        .collect()
}

/// An agent's answer to "do you run a job?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The container asked.
    pub id: String,
    /// Its SUT.
    pub sut: SutName,
    /// Whether a job runs; `None`: the agent could not tell (exec failed, no answer in time).
    pub busy: Option<bool>,
    /// The device's own work, when the agent saw some (`device.busy_glob`).
    pub device_work: Option<String>,
    /// Its device process is drained (until the drain is lifted).
    pub draining: bool,
    /// The healthcheck failed: its line (a stale heartbeat, an unhealthy state); the agent
    /// then counts as idle ([`super::hang::check`] reads it as a confirmed hang).
    pub unhealthy: Option<String>,
}

/// Applies the agents' own answers over the broker's view, which may be stale (the broker or
/// the agent's link is down): busy (`if_busy` of the SUT: busy, or expired once the busy wait
/// is over) or idle. An agent that could not answer keeps the broker's view; one that answers
/// with a stale heartbeat (hung) answered idle. Returns the containers whose view changed, with
/// the broker's view they had.
pub fn apply_answers(
    actual: &mut [Actual],
    answers: Vec<Answer>,
    if_busy: impl Fn(&SutName) -> Busy,
) -> Vec<(String, Busy)> {
    let mut changed = Vec::new();
    for answer in answers {
        let busy = match answer.busy {
            Some(true) => if_busy(&answer.sut),
            Some(false) => Busy::Idle,
            None => continue,
        };
        if let Some(a) = actual.iter_mut().find(|a| a.id == answer.id) {
            if a.busy != busy {
                changed.push((a.id.clone(), a.busy));
                a.busy = busy;
            }
        }
    }
    changed
}

/// Which Docker events are worth a pass. Engine 20.10 emits `health_status: …` on every probe,
/// not only on changes: with 100 SUTs that is several events a second, each of which used to
/// trigger a full pass. Only a change of a container's health (or any other event) is worth one.
#[derive(Debug, Default)]
pub struct HealthSeen(HashMap<String, String>);

impl HealthSeen {
    /// Whether `ev` is news: any event but a repeated health report of the same container.
    pub fn worth_a_pass(&mut self, ev: &RuntimeEvent) -> bool {
        if ev.action.starts_with("health_status") {
            return self.0.insert(ev.id.clone(), ev.action.clone()).as_deref() != Some(&ev.action);
        }
        // die, start, destroy...: the next health report is news again.
        self.0.remove(&ev.id);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use labvisor_protocol::payloads::Health;

    fn sut(s: &str) -> SutName {
        SutName::new(s).unwrap()
    }

    fn ctx() -> SpecContext {
        crate::runtime::fake::spec_context()
    }

    fn container(id: &str, name: &str, labels: &[(&str, &str)]) -> ContainerInfo {
        ContainerInfo {
            node: None,
            down: None,
            id: id.into(),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            state: RunState::Running,
            health: Health::Healthy,
            finished_ms: None,
            network: None,
        }
    }

    fn ours(id: &str, name: &str, s: &str) -> ContainerInfo {
        container(
            id,
            name,
            &[
                (LABEL_MANAGED_BY, MANAGED_BY),
                (LABEL_SUPERVISOR, "fake"),
                (LABEL_SUT, s),
                (LABEL_CONFIG_HASH, "h"),
            ],
        )
    }

    fn want(name: &str) -> Desired {
        Desired {
            hash: "h".into(),
            name: name.into(),
            heal: true,
        }
    }

    /// Under a runtime that heals itself no SUT is healed by the supervisor, whatever its
    /// `restart.on_unhealthy`; under the supervisor's healing the file decides.
    #[test]
    fn a_self_healing_runtime_turns_the_supervisors_healing_off() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.toml"), "image = \"img\"\n").unwrap();
        std::fs::write(
            dir.path().join("b.toml"),
            "image = \"img\"\n[restart]\non_unhealthy = \"none\"\n",
        )
        .unwrap();
        let scan = labvisor_protocol::config::scan_dir(dir.path(), &Default::default()).unwrap();
        let heal = |h: Healing| -> Vec<bool> {
            desired(&scan, &ctx(), h).values().map(|d| d.heal).collect()
        };
        assert_eq!(heal(Healing::Supervisor), [true, false]);
        assert_eq!(heal(Healing::Runtime), [false, false]);
        assert_eq!(Healing::of(true), Healing::Runtime);
        assert_eq!(Healing::of(false), Healing::default());
    }

    #[test]
    fn owned_foreign_and_unrelated_containers() {
        let ctx = ctx();
        let desired = BTreeMap::from([(sut("a"), want("p-a"))]);
        let other_supervisor = container(
            "o",
            "p-b",
            &[
                (LABEL_MANAGED_BY, MANAGED_BY),
                (LABEL_SUPERVISOR, "other"),
                (LABEL_SUT, "b"),
            ],
        );
        let list = vec![
            ours("1", "old-a", "a"),
            container("2", "p-a", &[]),
            container("3", "p-c", &[]),
            other_supervisor,
            ours("4", "p-x", "Not A Sut"),
        ];
        let busy = |s: &SutName| {
            if s.as_str() == "a" {
                Busy::Busy
            } else {
                Busy::Idle
            }
        };
        let actual = classify(list, &ctx, &desired, busy);
        let seen: Vec<(&str, &str, bool, Busy)> = actual
            .iter()
            .map(|a| (a.id.as_str(), a.sut.as_str(), a.owned, a.busy))
            .collect();
        assert_eq!(
            seen,
            vec![("1", "a", true, Busy::Busy), ("2", "a", false, Busy::Busy)],
            "ours by label whatever its name; a foreign one only under a wanted name"
        );
        assert_eq!(actual[0].hash.as_deref(), Some("h"));
        assert_eq!(actual[1].hash, None);
    }

    #[test]
    fn only_running_disrupted_agents_not_yet_expired_are_asked() {
        let ctx = ctx();
        let desired = BTreeMap::new();
        let mut actual = classify(
            vec![
                ours("1", "p-a", "a"),
                ours("2", "p-b", "b"),
                ours("3", "p-c", "c"),
            ],
            &ctx,
            &desired,
            |_| Busy::Idle,
        );
        actual[1].state = RunState::Exited;
        actual[2].busy = Busy::Expired;
        let actions = super::super::plan(&desired, &actual, &BTreeSet::new());
        assert_eq!(actions.len(), 3, "all three are removed");
        assert_eq!(to_ask(&actual, &actions), vec![("1".into(), sut("a"))]);
    }

    #[test]
    fn answers_override_the_broker_view_unless_there_is_none() {
        let ctx = ctx();
        let mut actual = classify(
            vec![
                ours("1", "p-a", "a"),
                ours("2", "p-b", "b"),
                ours("3", "p-c", "c"),
            ],
            &ctx,
            &BTreeMap::new(),
            |s| {
                if s.as_str() == "b" {
                    Busy::Busy
                } else {
                    Busy::Idle
                }
            },
        );
        let answers = vec![
            Answer {
                id: "1".into(),
                sut: sut("a"),
                busy: Some(true),
                device_work: None,
                draining: false,
                unhealthy: None,
            },
            Answer {
                id: "2".into(),
                sut: sut("b"),
                busy: Some(false),
                device_work: None,
                draining: false,
                unhealthy: None,
            },
            Answer {
                id: "3".into(),
                sut: sut("c"),
                busy: None,
                device_work: None,
                draining: false,
                unhealthy: None,
            },
        ];
        let changed = apply_answers(&mut actual, answers, |_| Busy::Expired);
        assert_eq!(
            changed,
            vec![("1".into(), Busy::Idle), ("2".into(), Busy::Busy)]
        );
        let now: Vec<Busy> = actual.iter().map(|a| a.busy).collect();
        assert_eq!(now, vec![Busy::Expired, Busy::Idle, Busy::Idle]);
    }

    #[test]
    fn only_health_changes_and_other_events_wake_the_loop() {
        let ev = |id: &str, action: &str| RuntimeEvent {
            id: id.into(),
            action: action.into(),
            sut: None,
        };
        let mut h = HealthSeen::default();
        assert!(h.worth_a_pass(&ev("a", "health_status: healthy")));
        assert!(!h.worth_a_pass(&ev("a", "health_status: healthy")));
        assert!(h.worth_a_pass(&ev("b", "health_status: healthy")));
        assert!(h.worth_a_pass(&ev("a", "health_status: unhealthy")));
        assert!(!h.worth_a_pass(&ev("a", "health_status: unhealthy")));
        assert!(h.worth_a_pass(&ev("a", "die")));
        assert!(h.worth_a_pass(&ev("a", "health_status: unhealthy")));
    }
}
