//! One reconcile pass, in a `pass` span: scan the directory, list the containers, classify
//! them, plan (asking agents before a disruption), note what the plan says per SUT (deferrals,
//! conflicts, health), start the actions whose gates are open, publish the status.

use std::collections::{BTreeMap, BTreeSet};

use labvisor_protocol::config::{scan_dir, Scan};
use labvisor_protocol::payloads::{AgentState, Health};
use labvisor_protocol::SutName;
use tokio::time::Instant;
use tracing::{debug, error, info, info_span, warn, Instrument};

use super::executor::DrainRequest;
use super::reconciler::Reconciler;
use super::status::Seen;
use super::DOCKER_RETRY_MAX;
use crate::plan::classify::{self, stem};
use crate::plan::networks::Networks;
use crate::plan::policy::{Backoff, RETRY_MIN};
use crate::plan::{plan, primary, Action, Actual, Busy, Desired, RunState};
use crate::runtime::{ContainerInfo, ContainerRuntime};

/// Whether the engine answers, and the backoff of passes while it does not (1 s doubling to
/// 30 s).
#[derive(Debug)]
pub(super) struct Reach {
    /// The last container list succeeded.
    pub reachable: bool,
    backoff: Backoff,
}

impl Default for Reach {
    fn default() -> Self {
        Self {
            reachable: true,
            backoff: Backoff::new(RETRY_MIN, DOCKER_RETRY_MAX),
        }
    }
}

/// What one pass works on.
struct Planned {
    scan: Scan,
    desired: BTreeMap<SutName, Desired>,
    invalid: BTreeSet<SutName>,
    actual: Vec<Actual>,
    actions: Vec<Action>,
    /// The device's own work per SUT: the broker's view, over which the agents' own answers go.
    work: BTreeMap<SutName, String>,
    /// The SUTs whose device process is drained: the broker's view, over which the agents' own
    /// answers go.
    draining: BTreeSet<SutName>,
}

impl Planned {
    /// The SUTs an action of this plan changes in Docker ([`Action::mutates`]).
    fn acting(&self) -> BTreeSet<&SutName> {
        self.actions
            .iter()
            .filter(|a| a.mutates())
            .map(Action::sut)
            .collect()
    }
}

impl<R: ContainerRuntime> Reconciler<R> {
    /// One pass, in its span.
    pub(super) async fn pass(&mut self) {
        self.passes += 1;
        let span = info_span!("pass", n = self.passes);
        async {
            self.pass_inner().await;
            self.metrics.on_pass(self.docker.reachable);
            debug!(
                docker_reachable = self.docker.reachable,
                "Reconcile pass done."
            );
        }
        .instrument(span)
        .await
    }

    async fn pass_inner(&mut self) {
        let now = Instant::now();
        self.watch.ensure();
        let Some(scan) = self.scan(now).await else {
            return;
        };
        self.watch.watch_contexts(&scan);
        self.log_problems(&scan);
        // Taken before the list: a creation that ends meanwhile is then listed.
        let in_flight = self.exec.in_flight();
        let Some(list) = self.list(now).await else {
            self.publish(&scan, &[], &BTreeMap::new());
            return;
        };
        let s = &self.settings;
        let mut nets = Networks::new(s.network_capacity, &list, &in_flight, &s.spec);
        let p = self.classify_and_plan(scan, list, now).await;
        let known = self.note_plan(&p, now);
        self.rolling_observe(&p.actual, &p.desired, &p.actions);
        self.drain(&p).await;
        self.forget(&known);
        let assigned = nets.assign_creations(&p.actions, &p.scan);
        self.exec.assign_networks(assigned);
        let wake = self.exec.start_due(p.actions, &mut self.suts, &p.scan, now);
        if let Some(at) = wake {
            self.timers.wake_at(at);
        }
        self.publish(&p.scan, &p.actual, &p.desired);
        self.observe_metrics(&p.actual, &p.desired);
    }

    /// Publishes what the pass saw (see [`super::status`]).
    fn publish(&mut self, scan: &Scan, actual: &[Actual], desired: &BTreeMap<SutName, Desired>) {
        let seen = Seen {
            scan,
            actual,
            desired,
            docker_reachable: self.docker.reachable,
            broker: self.broker.as_ref(),
        };
        self.status.publish(&seen, &mut self.suts);
    }

    /// Scans the SUT directory; `None` (changing nothing, retried later) when it cannot be read.
    async fn scan(&mut self, now: Instant) -> Option<Scan> {
        let dir = self.settings.sut_dir.clone();
        let allow = self.settings.allow;
        match tokio::task::spawn_blocking(move || scan_dir(&dir, &allow)).await {
            Ok(Ok(scan)) => Some(scan),
            Ok(Err(error)) => {
                error!(dir = %self.settings.sut_dir.display(), error = %error, "Cannot read the SUT directory; changing nothing.");
                self.timers.wake_at(now + RETRY_MIN * 5);
                None
            }
            Err(error) => {
                error!(error = %error, "The directory scan panicked.");
                None
            }
        }
    }

    /// Lists the containers; `None` while the engine is unreachable (the pass is retried with
    /// backoff).
    async fn list(&mut self, now: Instant) -> Option<Vec<ContainerInfo>> {
        match self.runtime.list().await {
            Ok(list) => {
                self.timers.lab_size(list.len());
                if !self.docker.reachable {
                    info!("Docker is reachable again.");
                    // Its containers may have restarted unseen (a daemon restart).
                    self.hang.engine_back(now);
                }
                self.docker.reachable = true;
                self.docker.backoff.reset();
                Some(list)
            }
            Err(error) => {
                let delay = self.docker.backoff.next_delay();
                if self.docker.reachable {
                    error!(error = %error, "Docker is unreachable; retrying with backoff.");
                }
                self.docker.reachable = false;
                self.timers.wake_at(now + delay);
                None
            }
        }
    }

    /// A SUT's agent as the plan sees it: idle, unless the broker says busy (then busy, or
    /// expired once the busy wait ran out).
    fn busy(&self, sut: &SutName, now: Instant, said_busy: bool) -> Busy {
        if !said_busy {
            return Busy::Idle;
        }
        self.suts.get(sut).map_or(Busy::Busy, |st| {
            st.deferral.busy(now, self.settings.busy_wait)
        })
    }

    /// Classifies the containers and plans. Before disrupting a running agent (or while waiting
    /// for it), asks the agent itself, through Docker, whether a job runs: the broker's view may
    /// be stale or missing (the broker, or the agent's link, is down).
    async fn classify_and_plan(
        &mut self,
        scan: Scan,
        list: Vec<ContainerInfo>,
        now: Instant,
    ) -> Planned {
        let desired = classify::desired(&scan, &self.settings.spec, self.healing);
        let invalid = classify::invalid(&scan);
        let mut actual = classify::classify(list, &self.settings.spec, &desired, |sut| {
            self.busy(sut, now, self.agents.get(sut) == Some(&AgentState::Busy))
        });
        for a in &mut actual {
            let max_age = scan.valid.get(&a.sut).map(|c| c.health.max_age);
            a.probe_only = max_age.is_some_and(|m| {
                classify::probe_only(self.probe_failing.get(&a.sut).copied(), now, m)
            });
        }
        self.judge_hangs(&scan, &desired, &mut actual, now).await;
        self.rolling_choose(&actual, &desired);
        let mut actions = self.plan_all(&desired, &actual, &invalid);
        let mut work = self.device_work.clone();
        let mut draining = self.draining.clone();
        let ask = classify::to_ask(&actual, &actions);
        self.check_drains(&scan, &actual, &desired, &ask, &mut draining)
            .await;
        if !ask.is_empty() {
            let answers = self.exec.ask_agents(ask).await;
            for answer in answers.iter().filter(|a| a.busy.is_some()) {
                match &answer.device_work {
                    Some(w) => work.insert(answer.sut.clone(), w.clone()),
                    None => work.remove(&answer.sut),
                };
                if answer.draining {
                    draining.insert(answer.sut.clone());
                } else {
                    draining.remove(&answer.sut);
                }
            }
            let changed =
                classify::apply_answers(&mut actual, answers, |sut| self.busy(sut, now, true));
            for (id, broker_view) in &changed {
                debug!(container = %id, broker_view = ?broker_view, "The agent's own answer differs from the broker's view.");
            }
            if !changed.is_empty() {
                actions = self.plan_all(&desired, &actual, &invalid);
            }
        }
        Planned {
            scan,
            desired,
            invalid,
            actual,
            actions,
            work,
            draining,
        }
    }

    /// Asks once, on first sight, the agent of each running container whose SUT can drain its
    /// device process (`device.drain_signal`) whether it is drained: a supervisor keeps its
    /// drains in memory, so one that restarted meanwhile would never lift a drain an earlier run
    /// left (the agent keeps it until lifted). Containers in `ask` are asked anyway. Notes the
    /// drained ones in `draining`. Not under [`crate::plan::Healing::Runtime`] (no exec, and no
    /// drain is ever sent there).
    async fn check_drains(
        &mut self,
        scan: &Scan,
        actual: &[Actual],
        desired: &BTreeMap<SutName, Desired>,
        ask: &[(String, SutName)],
        draining: &mut BTreeSet<SutName>,
    ) {
        if !self.healing.by_supervisor() {
            return;
        }
        let check: Vec<(String, SutName)> = scan
            .valid
            .iter()
            .filter(|(_, cfg)| cfg.device.drain_signal.is_some())
            .filter_map(|(sut, _)| primary(actual, desired, sut))
            .filter(|a| a.state == RunState::Running && !ask.iter().any(|(id, _)| *id == a.id))
            .filter(|a| {
                self.suts.get(&a.sut).is_none_or(|st| {
                    st.drained.is_none() && st.drain_checked.as_ref() != Some(&a.id)
                })
            })
            .map(|a| (a.id.clone(), a.sut.clone()))
            .collect();
        if check.is_empty() {
            return;
        }
        // Once per container, answered or not (an agent that cannot answer, e.g. of an older
        // version, is not asked on every pass; the broker's view still counts).
        for answer in self.exec.ask_agents(check).await {
            if answer.draining {
                draining.insert(answer.sut.clone());
            }
            self.suts.entry(answer.sut).or_default().drain_checked = Some(answer.id);
        }
    }

    /// The plan, the rolling restart's recreation, and the start of a container the supervisor
    /// stopped itself in a recreation that failed
    /// ([`crate::plan::policy::SutState::stopped_itself`]): exited with the wanted hash, the
    /// plan alone would take it for a person's stop.
    fn plan_all(
        &self,
        desired: &BTreeMap<SutName, Desired>,
        actual: &[Actual],
        invalid: &BTreeSet<SutName>,
    ) -> Vec<Action> {
        let mut actions = plan(desired, actual, invalid);
        self.rolling_action(actual, desired, &mut actions);
        for (sut, st) in &self.suts {
            let Some(id) = &st.stopped_itself else {
                continue;
            };
            let exited = primary(actual, desired, sut)
                .is_some_and(|a| &a.id == id && a.state == RunState::Exited);
            if exited && !actions.iter().any(|a| a.sut() == sut) {
                actions.push(Action::Start {
                    sut: sut.clone(),
                    id: id.clone(),
                });
            }
        }
        actions
    }

    /// Bookkeeping that is not an action: deferrals, conflicts, healthy windows. Returns the
    /// SUTs the pass knows of (a file, or an owned container).
    fn note_plan(&mut self, p: &Planned, now: Instant) -> BTreeSet<SutName> {
        let of = |pick: fn(&Action) -> bool| -> BTreeMap<&SutName, &Action> {
            p.actions
                .iter()
                .filter(|a| pick(a))
                .map(|a| (a.sut(), a))
                .collect()
        };
        let deferred = of(|a| matches!(a, Action::Defer { .. }));
        let conflicts = of(|a| matches!(a, Action::Conflict { .. }));
        let acting = p.acting();
        let known: BTreeSet<SutName> = p
            .desired
            .keys()
            .chain(p.invalid.iter())
            .chain(p.actual.iter().filter(|a| a.owned).map(|a| &a.sut))
            .cloned()
            .collect();
        let busy_wait = self.settings.busy_wait;
        let rolling = self.rolling.as_ref();
        let rolling_waits =
            |sut: &SutName| rolling.is_some_and(|r| r.waits_for(sut, &p.actual, &p.desired));
        for sut in &known {
            let _span = info_span!("sut", sut = %sut).entered();
            let st = self.suts.entry(sut.clone()).or_default();
            match deferred.get(sut) {
                Some(defer @ Action::Defer { action, .. }) => {
                    let work = p.work.get(sut).map(String::as_str);
                    let w = st.deferral.waiting(now, busy_wait, *action, work);
                    if w.began {
                        self.metrics.on_action(defer);
                    }
                    st.pending = Some(w.pending);
                    debug!(action = %action, "Deferred while the agent is busy.");
                    // Re-plan when the wait runs out.
                    self.timers.wake_at(w.until);
                }
                // Deferred by the rolling restart, whose turn is elsewhere now: the wait
                // goes on (its pending text is the restart's).
                _ if rolling_waits(sut) => {
                    st.pending = None;
                    if let Some(until) = st.deferral.until(busy_wait) {
                        self.timers.wake_at(until);
                    }
                }
                _ => {
                    st.deferral.not_waiting(acting.contains(sut));
                    st.pending = None;
                }
            }
            let conflict = match conflicts.get(sut) {
                Some(Action::Conflict { id, name, .. }) => Some((id.as_str(), name.as_str())),
                _ => None,
            };
            if st.set_conflict(conflict) {
                if let Some((id, name)) = conflict {
                    error!(container = %id, "A container not managed by this supervisor holds the name {name}; leaving it alone.");
                }
            }
            let own = primary(&p.actual, &p.desired, sut);
            if own.is_none_or(|a| {
                Some(&a.id) != st.stopped_itself.as_ref() || a.state != RunState::Exited
            }) {
                st.stopped_itself = None;
            }
            st.heal.observe(own.map(|a| a.health), now);
        }
        known
    }

    /// While a recreation or removal waits for the device's own work, asks the agent to drain
    /// its device process (on every such pass: the request lives in the container's tmpfs, so a
    /// restarted container needs it again; the agent acts on it once). When the SUT no longer
    /// waits and nothing is done to its container (the file was reverted), the request is
    /// lifted and the device process runs again. Not under [`Healing::Runtime`]: the drain goes
    /// through `docker exec`, which does not reach a task on another host (it would fail, and
    /// warn, on every pass); the recreation then waits for the device's work as it would without
    /// `device.drain_signal`.
    ///
    /// [`Healing::Runtime`]: crate::plan::Healing::Runtime
    async fn drain(&mut self, p: &Planned) {
        if !self.healing.by_supervisor() {
            return;
        }
        let mut requests = Vec::new();
        // A SUT still to be restarted by the rolling restart waits too, also while the turn
        // is elsewhere.
        let mut waiting: BTreeSet<SutName> = self
            .suts
            .keys()
            .filter(|s| {
                self.rolling
                    .as_ref()
                    .is_some_and(|r| r.waits_for(s, &p.actual, &p.desired))
            })
            .cloned()
            .collect();
        for a in &p.actions {
            if let Action::Defer { sut, id, .. } = a {
                waiting.insert(sut.clone());
                if p.work.contains_key(sut) {
                    requests.push(DrainRequest {
                        id: id.clone(),
                        sut: sut.clone(),
                        lift: false,
                    });
                }
            }
        }
        let acting = p.acting();
        // A drain the agent reports that this run did not ask for (an earlier run did, then
        // restarted): lifted below like any drain nothing needs.
        for sut in p.draining.iter().filter(|s| !waiting.contains(*s)) {
            let st = self.suts.entry(sut.clone()).or_default();
            if st.drained.is_none() {
                st.drained = primary(&p.actual, &p.desired, sut).map(|a| a.id.clone());
            }
        }
        for (sut, st) in &mut self.suts {
            let Some(id) = st.drained.clone().filter(|_| !waiting.contains(sut)) else {
                continue;
            };
            let running = p
                .actual
                .iter()
                .any(|a| a.id == id && a.state == RunState::Running);
            if running && !acting.contains(sut) {
                requests.push(DrainRequest {
                    id,
                    sut: sut.clone(),
                    lift: true,
                });
            } else {
                st.drained = None;
            }
        }
        if requests.is_empty() {
            return;
        }
        for done in self.exec.drain_agents(requests).await {
            let _span = info_span!("sut", sut = %done.sut).entered();
            let st = self.suts.entry(done.sut.clone()).or_default();
            if done.lift {
                info!(container = %done.id, "Nothing waits for the device any more: lifted the drain, its process runs again.");
                st.drained = None;
                // The broker's view says so until the agent reports again.
                self.draining.remove(&done.sut);
            } else if st.drained.as_deref() != Some(done.id.as_str()) {
                info!(container = %done.id, "A disruption waits for the device's own work: asked the agent to drain its device process.");
                st.drained = Some(done.id);
            }
        }
    }

    /// Forgets SUTs with no file and no container (clearing their retained view); a SUT that
    /// is back is no longer cleared.
    fn forget(&mut self, known: &BTreeSet<SutName>) {
        let stale: Vec<SutName> = self
            .suts
            .iter()
            .filter(|(sut, st)| !known.contains(*sut) && !st.in_flight)
            .map(|(sut, _)| sut.clone())
            .collect();
        for sut in stale {
            if let Some(st) = self.suts.remove(&sut) {
                if st.published.is_some() {
                    let _span = info_span!("sut", sut = %sut).entered();
                    self.status.clear_retained(&sut);
                }
            }
        }
        self.status.forget_gone(known);
    }

    /// Per-SUT health and the SUT counts, after a full pass.
    fn observe_metrics(&mut self, actual: &[Actual], desired: &BTreeMap<SutName, Desired>) {
        self.metrics.observe_suts(self.suts.keys().map(|sut| {
            let p = primary(actual, desired, sut);
            (
                sut,
                p.map_or(Health::None, |a| a.health),
                p.is_some_and(|a| a.state == RunState::Running),
            )
        }));
        if let Some(status) = self.status.status() {
            self.metrics.observe_counts(&status.suts);
        }
    }

    /// Logs the problems of the directory's invalid entries once per change: a new or changed
    /// set of problems (one line each), and an entry that is fixed or gone.
    fn log_problems(&mut self, scan: &Scan) {
        for (path, problems) in &scan.invalid {
            let lines: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
            if self.logged_problems.get(path) == Some(&lines) {
                continue;
            }
            let sut = stem(path);
            for line in &lines {
                match &sut {
                    Some(sut) => {
                        let _span = info_span!("sut", sut = %sut).entered();
                        warn!(problem = %line, "Invalid SUT file; its container, if any, is left as it is.")
                    }
                    None => {
                        warn!(problem = %line, "An entry of the SUT directory names no SUT; ignored.")
                    }
                }
            }
            self.logged_problems.insert(path.clone(), lines);
        }
        let fixed: Vec<_> = self
            .logged_problems
            .keys()
            .filter(|p| !scan.invalid.contains_key(*p))
            .cloned()
            .collect();
        for path in fixed {
            self.logged_problems.remove(&path);
            if stem(&path).is_some_and(|s| scan.valid.contains_key(&s)) {
                info!(file = %path.display(), "The SUT file is valid again.");
            } else {
                info!(file = %path.display(), "The invalid entry of the SUT directory is gone.");
            }
        }
    }
}
