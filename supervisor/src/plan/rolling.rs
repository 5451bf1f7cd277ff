//! The rolling restart (`labvisor restart SUT... | --all --when-idle`), as pure state.
//!
//! A supervisor runs one at a time. Its SUTs take turns: a turn goes to the first SUT left
//! whose agent the broker shows idle (else whose busy wait ran out, else to the first left),
//! and is its container's recreation ([`Action::Recreate`] with [`RecreateReason::Requested`])
//! behind the plan's busy gate: while the agent is busy (its own job, or the device's own work
//! where the SUT says how) the recreation is deferred like a config change's, at most
//! `--busy-wait`, and the turn passes to the next SUT (the deferred one goes to the back). A
//! deferred SUT keeps waiting while the turn is elsewhere ([`Rolling::waits_for`]): its busy
//! wait runs on from its first deferral and its drained device stays drained. Once recreated,
//! the turn stays
//! until the new container is healthy; then the next SUT's turn begins. A SUT whose file is
//! gone or invalid, or whose container a person stopped, is skipped (with the reason). A failed
//! recreation, or a new container that turns unhealthy, stops the whole restart: the SUTs
//! after it keep their containers.
//!
//! Nothing here does I/O or reads a clock: the reconcile pass calls [`Rolling::choose`] before
//! planning, [`Rolling::action`] with the plan, [`Rolling::observe`] after it, and
//! [`Rolling::failed`] when the recreation fails.

use std::collections::{BTreeMap, BTreeSet};

use labvisor_protocol::payloads::{
    Health, RestartRequest, RestartState, RestartStatus, RestartStep, RestartSut,
};
use labvisor_protocol::SutName;

use super::{
    primary, stopped_by_person, unless_busy, Action, Actual, Busy, Deferred, Desired,
    RecreateReason,
};

/// A rolling restart in progress (or finished: its status is kept until the next one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rolling {
    /// The progress, as published (`time_ms` 0).
    pub status: RestartStatus,
    /// The indexes (into `status.suts`) still to restart, in the order they are tried.
    order: Vec<usize>,
    /// The SUT whose turn it is: its index and the container to replace.
    turn: Option<(usize, String)>,
}

/// A request's rejection: its status (state rejected, with the reason).
fn rejected(req: &RestartRequest, reason: String) -> RestartStatus {
    RestartStatus {
        v: labvisor_protocol::payloads::VERSION,
        id: req.id.clone(),
        state: RestartState::Rejected,
        suts: Vec::new(),
        reason: Some(reason),
        time_ms: 0,
    }
}

impl Rolling {
    /// Starts the restart `req` asks for, over the valid SUT files `desired`; `running` is the
    /// restart in progress, if any. A rejection comes back as its status.
    pub fn accept(
        req: &RestartRequest,
        desired: &BTreeMap<SutName, Desired>,
        running: Option<&Rolling>,
    ) -> Result<Rolling, RestartStatus> {
        if let Some(r) = running.filter(|r| !r.status.state.is_final()) {
            return Err(rejected(
                req,
                format!(
                    "rolling restart {} is running; wait for it to end",
                    r.status.id
                ),
            ));
        }
        if !req.when_idle {
            return Err(rejected(
                req,
                "only a restart that waits for each agent to be idle is supported (--when-idle)"
                    .into(),
            ));
        }
        let suts: Vec<SutName> = if req.all {
            desired.keys().cloned().collect()
        } else {
            let mut seen = BTreeSet::new();
            req.suts
                .iter()
                .filter(|s| seen.insert(*s))
                .cloned()
                .collect()
        };
        let unknown: Vec<&str> = suts
            .iter()
            .filter(|s| !desired.contains_key(*s))
            .map(SutName::as_str)
            .collect();
        if !unknown.is_empty() {
            return Err(rejected(
                req,
                format!(
                    "no valid SUT file for {} on this supervisor",
                    unknown.join(", ")
                ),
            ));
        }
        if suts.is_empty() {
            return Err(rejected(req, "no SUTs to restart".into()));
        }
        Ok(Rolling {
            order: (0..suts.len()).collect(),
            status: RestartStatus {
                v: labvisor_protocol::payloads::VERSION,
                id: req.id.clone(),
                state: RestartState::Running,
                suts: suts
                    .into_iter()
                    .map(|sut| RestartSut {
                        sut,
                        step: RestartStep::Queued,
                        old_container: None,
                        new_container: None,
                        detail: None,
                    })
                    .collect(),
                reason: None,
                time_ms: 0,
            },
            turn: None,
        })
    }

    /// Whether it still goes on.
    pub fn is_running(&self) -> bool {
        !self.status.state.is_final()
    }

    /// Whether `sut` waits for its turn again: its recreation was deferred and its container
    /// is still the one the restart is to replace. It keeps waiting while the turn is
    /// elsewhere, so its busy wait runs on and its drained device stays drained. (A container
    /// replaced meanwhile, e.g. by a config change, starts a wait of its own at its turn.)
    pub fn waits_for(
        &self,
        sut: &SutName,
        actual: &[Actual],
        desired: &BTreeMap<SutName, Desired>,
    ) -> bool {
        let Some(now) = primary(actual, desired, sut) else {
            return false;
        };
        self.is_running()
            && self.order.iter().any(|i| {
                let s = &self.status.suts[*i];
                s.sut == *sut && s.old_container.as_deref() == Some(now.id.as_str())
            })
    }

    /// The SUT whose turn it is.
    pub fn turn(&self) -> Option<&SutName> {
        self.turn.as_ref().map(|(i, _)| &self.status.suts[*i].sut)
    }

    fn set(&mut self, i: usize, step: RestartStep, detail: Option<String>) {
        let s = &mut self.status.suts[i];
        s.step = step;
        s.detail = detail;
    }

    /// Before planning: gives the turn, when no SUT has it, to the first SUT left whose agent
    /// the broker shows idle (else to the first whose busy wait ran out, else to the first
    /// left); skips the SUTs that cannot be restarted;
    /// ends the restart when none is left.
    pub fn choose(&mut self, actual: &[Actual], desired: &BTreeMap<SutName, Desired>) {
        if !self.is_running() || self.turn.is_some() {
            return;
        }
        let mut left = Vec::new();
        for i in std::mem::take(&mut self.order) {
            let sut = self.status.suts[i].sut.clone();
            let want = desired.get(&sut);
            let p = primary(actual, desired, &sut);
            match (want, p) {
                (None, _) => self.set(
                    i,
                    RestartStep::Skipped,
                    Some("its file is gone or invalid".into()),
                ),
                (Some(w), Some(a)) if stopped_by_person(a, Some(w)) => self.set(
                    i,
                    RestartStep::Skipped,
                    Some("stopped by a person: left stopped".into()),
                ),
                // Being created (or failing to be): nothing to restart, and nothing to wait for.
                (Some(_), None) => self.set(
                    i,
                    RestartStep::Skipped,
                    Some("it has no container (yet)".into()),
                ),
                (Some(_), Some(_)) => left.push(i),
            }
        }
        self.order = left;
        let busy = |i: &usize, busy: Busy| {
            primary(actual, desired, &self.status.suts[*i].sut).is_some_and(|a| a.busy == busy)
        };
        // An idle agent first, then one whose busy wait ran out, else the first left.
        let Some(pos) = self
            .order
            .iter()
            .position(|i| busy(i, Busy::Idle))
            .or_else(|| self.order.iter().position(|i| busy(i, Busy::Expired)))
            .or((!self.order.is_empty()).then_some(0))
        else {
            self.status.state = RestartState::Done;
            return;
        };
        let i = self.order.remove(pos);
        let old = primary(actual, desired, &self.status.suts[i].sut)
            .map(|a| a.id.clone())
            .unwrap_or_default();
        self.status.suts[i].old_container = Some(old.clone());
        self.set(i, RestartStep::WaitingIdle, None);
        self.turn = Some((i, old));
    }

    /// The recreation of the SUT whose turn it is, unless the plan (`actions`) acts on it
    /// already or it was recreated: to be added to the plan.
    pub fn action(
        &self,
        actual: &[Actual],
        desired: &BTreeMap<SutName, Desired>,
        actions: &[Action],
    ) -> Option<Action> {
        let (i, old) = self.turn.as_ref()?;
        let sut = &self.status.suts[*i].sut;
        if actions.iter().any(|a| a.sut() == sut) {
            return None;
        }
        let a = primary(actual, desired, sut).filter(|a| &a.id == old)?;
        Some(unless_busy(
            a,
            Action::Recreate {
                sut: sut.clone(),
                id: a.id.clone(),
                reason: RecreateReason::Requested,
            },
            Deferred::Restart,
        ))
    }

    /// After a pass that planned `actions` and left `in_flight` SUTs acting: notes where the
    /// SUT whose turn it is stands. A deferred one goes to the back; a recreated one whose new
    /// container is healthy is done (the turn ends), unhealthy fails the restart. Returns
    /// whether the status changed.
    pub fn observe(
        &mut self,
        actual: &[Actual],
        desired: &BTreeMap<SutName, Desired>,
        actions: &[Action],
        in_flight: impl Fn(&SutName) -> bool,
    ) -> bool {
        let before = self.status.clone();
        if let Some((i, old)) = self.turn.clone() {
            let sut = self.status.suts[i].sut.clone();
            let deferred = actions
                .iter()
                .any(|a| matches!(a, Action::Defer { sut: s, .. } if *s == sut));
            let p = primary(actual, desired, &sut).filter(|a| a.id != old);
            if deferred {
                self.set(
                    i,
                    RestartStep::WaitingIdle,
                    Some("waiting for the running job".into()),
                );
                self.order.push(i);
                self.turn = None;
            } else if let Some(new) = p.filter(|_| !in_flight(&sut)) {
                self.status.suts[i].new_container = Some(new.id.clone());
                match new.health {
                    Health::Healthy => {
                        self.set(i, RestartStep::Done, None);
                        self.turn = None;
                    }
                    Health::Unhealthy => {
                        self.fail(i, "the new container is unhealthy".into());
                    }
                    _ => self.set(i, RestartStep::WaitingHealthy, None),
                }
            } else if in_flight(&sut) {
                self.set(i, RestartStep::Recreating, None);
            }
        }
        if self.is_running() && self.turn.is_none() && self.order.is_empty() {
            self.status.state = RestartState::Done;
        }
        self.status != before
    }

    /// The recreation of `sut` failed with `error`: the restart stops there.
    pub fn failed(&mut self, sut: &SutName, error: &str) {
        let i = self.turn.as_ref().map(|(i, _)| *i);
        if let Some(i) = i.filter(|i| self.status.suts[*i].sut == *sut) {
            self.fail(i, format!("recreate failed: {error}"));
        }
    }

    fn fail(&mut self, i: usize, why: String) {
        let sut = self.status.suts[i].sut.clone();
        self.set(i, RestartStep::Failed, Some(why.clone()));
        self.status.state = RestartState::Failed;
        let left = self.order.len();
        self.status.reason = Some(format!(
            "{sut}: {why}; the rolling restart stopped ({left} SUT(s) not restarted)"
        ));
        self.turn = None;
        self.order.clear();
    }

    /// What `sut`'s view shows as its pending action, while the restart waits for it.
    pub fn pending(&self, sut: &SutName) -> Option<String> {
        if !self.is_running() {
            return None;
        }
        let s = self.status.suts.iter().find(|s| &s.sut == sut)?;
        let id = &self.status.id;
        Some(match s.step {
            RestartStep::Queued | RestartStep::WaitingIdle => {
                format!("restart (rolling restart {id}: waiting for its turn and an idle agent)")
            }
            RestartStep::Recreating => format!("restart (rolling restart {id}: recreating)"),
            RestartStep::WaitingHealthy => {
                format!(
                    "restart (rolling restart {id}: waiting for the new container to be healthy)"
                )
            }
            RestartStep::Done | RestartStep::Skipped | RestartStep::Failed => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::RunState;

    fn sut(s: &str) -> SutName {
        SutName::new(s).unwrap()
    }

    fn desired(names: &[&str]) -> BTreeMap<SutName, Desired> {
        names
            .iter()
            .map(|s| {
                (
                    sut(s),
                    Desired {
                        hash: "h".into(),
                        name: format!("p-{s}"),
                        heal: true,
                    },
                )
            })
            .collect()
    }

    fn running(s: &str, id: &str) -> Actual {
        Actual {
            id: id.into(),
            name: format!("p-{s}"),
            sut: sut(s),
            owned: true,
            hash: Some("h".into()),
            state: RunState::Running,
            health: Health::Healthy,
            busy: Busy::Idle,
            finished_ms: None,
            node: None,
            down: None,
            probe_only: false,
        }
    }

    fn request(suts: &[&str]) -> RestartRequest {
        RestartRequest {
            v: 1,
            id: "r1".into(),
            suts: suts.iter().map(|s| sut(s)).collect(),
            all: false,
            when_idle: true,
        }
    }

    /// One pass: choose, plan the restart's action, observe (nothing in flight).
    fn pass(r: &mut Rolling, actual: &[Actual], d: &BTreeMap<SutName, Desired>) -> Option<Action> {
        r.choose(actual, d);
        let action = r.action(actual, d, &[]);
        let actions: Vec<Action> = action.iter().cloned().collect();
        r.observe(actual, d, &actions, |_| false);
        action
    }

    fn steps(r: &Rolling) -> Vec<RestartStep> {
        r.status.suts.iter().map(|s| s.step).collect()
    }

    #[test]
    fn requests_are_checked() {
        let d = desired(&["a", "b"]);
        let reason = |req: &RestartRequest, running: Option<&Rolling>| {
            Rolling::accept(req, &d, running)
                .unwrap_err()
                .reason
                .unwrap()
        };
        let mut no_wait = request(&["a"]);
        no_wait.when_idle = false;
        assert!(reason(&no_wait, None).contains("--when-idle"));
        assert!(reason(&request(&["a", "x"]), None).contains("no valid SUT file for x"));
        assert!(reason(&request(&[]), None).contains("no SUTs"));
        let r = Rolling::accept(&request(&["b", "a", "b"]), &d, None).unwrap();
        let order: Vec<&str> = r.status.suts.iter().map(|s| s.sut.as_str()).collect();
        assert_eq!(order, vec!["b", "a"], "in the request's order, once each");
        assert!(reason(&request(&["a"]), Some(&r)).contains("rolling restart r1 is running"));
        let mut all = request(&[]);
        all.all = true;
        assert_eq!(
            Rolling::accept(&all, &d, None).unwrap().status.suts.len(),
            2
        );
    }

    #[test]
    fn one_at_a_time_each_when_idle_the_next_once_healthy() {
        let d = desired(&["a", "b", "c"]);
        let mut world = vec![running("a", "a1"), running("b", "b1"), running("c", "c1")];
        world[0].busy = Busy::Busy;
        let mut r = Rolling::accept(&request(&["a", "b", "c"]), &d, None).unwrap();

        // a is busy: b (the first idle one) goes first.
        let action = pass(&mut r, &world, &d).unwrap();
        assert_eq!(
            action,
            Action::Recreate {
                sut: sut("b"),
                id: "b1".into(),
                reason: RecreateReason::Requested
            }
        );
        assert_eq!(action.disrupts(), Some("b1"), "the agent is asked first");
        // Recreated, starting: the turn stays with b, nothing else is recreated.
        world[1] = running("b", "b2");
        world[1].health = Health::Starting;
        assert_eq!(pass(&mut r, &world, &d), None);
        assert_eq!(r.status.suts[1].step, RestartStep::WaitingHealthy);
        assert_eq!(r.turn(), Some(&sut("b")));
        world[1].health = Health::Healthy;
        assert_eq!(pass(&mut r, &world, &d), None);
        assert_eq!(r.status.suts[1].step, RestartStep::Done);
        assert_eq!(r.status.suts[1].new_container.as_deref(), Some("b2"));

        // Then c; a still busy.
        assert!(
            matches!(pass(&mut r, &world, &d), Some(Action::Recreate { sut: s, .. }) if s == sut("c"))
        );
        world[2] = running("c", "c2");
        pass(&mut r, &world, &d);
        // Only a is left: its turn, deferred behind the busy gate while its job runs.
        assert!(matches!(
            pass(&mut r, &world, &d),
            Some(Action::Defer {
                action: Deferred::Restart,
                ..
            })
        ));
        assert_eq!(r.status.suts[0].step, RestartStep::WaitingIdle);
        assert!(r.pending(&sut("a")).is_some());
        assert!(r.is_running());
        world[0].busy = Busy::Idle;
        assert!(matches!(
            pass(&mut r, &world, &d),
            Some(Action::Recreate { .. })
        ));
        world[0] = running("a", "a2");
        pass(&mut r, &world, &d);
        assert_eq!(steps(&r), vec![RestartStep::Done; 3]);
        assert_eq!(r.status.state, RestartState::Done);
        assert!(r.pending(&sut("a")).is_none());
    }

    #[test]
    fn skips_what_cannot_be_restarted_and_stops_at_a_failure() {
        let d = desired(&["a", "b", "c"]);
        let mut world = vec![running("a", "a1"), running("b", "b1"), running("c", "c1")];
        world[0].state = RunState::Exited;
        let mut r = Rolling::accept(&request(&["a", "b", "c"]), &d, None).unwrap();
        // a was stopped by a person: skipped, left stopped.
        let d2 = desired(&["a", "c"]);
        assert!(pass(&mut r, &world, &d2).is_some());
        assert_eq!(r.status.suts[0].step, RestartStep::Skipped);
        assert_eq!(
            r.status.suts[1].step,
            RestartStep::Skipped,
            "b's file is gone"
        );
        let mut r2 = Rolling::accept(&request(&["c"]), &d, None).unwrap();
        assert_eq!(pass(&mut r2, &[], &d), None);
        assert_eq!(
            r2.status.suts[0].detail.as_deref(),
            Some("it has no container (yet)")
        );
        assert_eq!(r2.status.state, RestartState::Done);
        assert_eq!(r.turn(), Some(&sut("c")));
        // c's new container turns unhealthy: the restart stops there.
        world[2] = running("c", "c2");
        world[2].health = Health::Unhealthy;
        pass(&mut r, &world, &d);
        assert_eq!(r.status.state, RestartState::Failed);
        assert!(r
            .status
            .reason
            .as_deref()
            .unwrap()
            .contains("c: the new container is unhealthy"));

        // A failed recreation stops it too, with the error.
        let mut r = Rolling::accept(&request(&["b", "c"]), &d, None).unwrap();
        let world = vec![running("b", "b1"), running("c", "c1")];
        pass(&mut r, &world, &d);
        r.failed(&sut("b"), "docker error 500: boom");
        assert_eq!(r.status.state, RestartState::Failed);
        assert_eq!(steps(&r), vec![RestartStep::Failed, RestartStep::Queued]);
        assert!(r
            .status
            .reason
            .as_deref()
            .unwrap()
            .contains("1 SUT(s) not restarted"));
        assert_eq!(pass(&mut r, &world, &d), None, "nothing more happens");
    }

    #[test]
    fn a_deferred_sut_waits_while_the_turn_is_elsewhere_and_an_expired_wait_goes_first() {
        let d = desired(&["a", "b"]);
        let mut world = vec![running("a", "a1"), running("b", "b1")];
        world[0].busy = Busy::Busy;
        world[1].busy = Busy::Busy;
        let mut r = Rolling::accept(&request(&["a", "b"]), &d, None).unwrap();
        assert!(matches!(
            pass(&mut r, &world, &d),
            Some(Action::Defer { .. })
        ));
        assert!(
            r.waits_for(&sut("a"), &world, &d),
            "deferred, back in the queue"
        );
        // b's turn: a still waits.
        r.choose(&world, &d);
        assert_eq!(r.turn(), Some(&sut("b")));
        assert!(r.waits_for(&sut("a"), &world, &d));
        assert!(!r.waits_for(&sut("b"), &world, &d), "its turn");
        let action = r.action(&world, &d, &[]).unwrap();
        r.observe(&world, &d, &[action], |_| false);
        // b's busy wait ran out: b goes before a, the first in the queue.
        world[1].busy = Busy::Expired;
        let action = pass(&mut r, &world, &d);
        assert!(
            matches!(&action, Some(Action::Recreate { sut: s, .. }) if *s == sut("b")),
            "{action:?}"
        );
        assert!(!r.waits_for(&sut("b"), &world, &d));
        assert!(r.waits_for(&sut("a"), &world, &d));
        // a's container replaced meanwhile (a config change): its wait is over.
        world[0] = running("a", "a9");
        assert!(!r.waits_for(&sut("a"), &world, &d));
    }

    #[test]
    fn the_plans_own_action_comes_first() {
        let d = desired(&["a"]);
        let world = vec![running("a", "a1")];
        let mut r = Rolling::accept(&request(&["a"]), &d, None).unwrap();
        r.choose(&world, &d);
        let config_change = Action::Recreate {
            sut: sut("a"),
            id: "a1".into(),
            reason: RecreateReason::ConfigChanged,
        };
        assert_eq!(r.action(&world, &d, &[config_change]), None);
    }
}
