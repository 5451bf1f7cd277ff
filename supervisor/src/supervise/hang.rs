//! The I/O side of the supervisor's own hang detection (the rules are pure, in
//! [`crate::plan::hang`]): what the loop notes (live agent statuses, its own link, container
//! starts), and the step of each pass that judges the running agents, confirms the suspects
//! with the healthcheck through `docker exec`, and makes the plan see a confirmed hang (or an
//! agent's own unhealthy word) as `Health::Unhealthy`.

use std::collections::BTreeMap;
use std::time::Duration;

use labvisor_mqtt::LinkState;
use labvisor_protocol::config::Scan;
use labvisor_protocol::payloads::{now_ms, AgentStatus, Health};
use labvisor_protocol::SutName;
use tokio::time::Instant;
use tracing::{debug, info_span, warn};

use super::reconciler::Reconciler;
use super::EVENT_DELAY;
use crate::plan::hang::{auto_interval, check, quiet, Check, Confirmed, Timing, Verdict};
use crate::plan::{is_primary, Action, Actual, Desired, RunState};
use crate::runtime::ContainerRuntime;

impl<R: ContainerRuntime> Reconciler<R> {
    /// The supervisor's own broker link changed: silence counts only while it is up.
    pub(super) fn link_changed(&mut self, state: &LinkState, now: Instant) {
        let was = self.hang.link_since();
        self.hang.link(state.connected, state.connects, now);
        if was != self.hang.link_since() {
            // A pass arms the hang-check timer from the new link's uptime.
            self.timers.pass_in(now, EVENT_DELAY);
            debug!(
                connected = state.connected,
                "The supervisor's broker link changed; agents' silence counts only while it is up."
            );
        }
    }

    /// An agent status arrived on `<sut>/agent`. Only a live one (not the retained value sent
    /// at subscription) is a sign of life; one that changes the agent's verdict (a hang or an
    /// unhealthy word begins or ends) triggers a pass.
    pub(super) fn agent_heard(
        &mut self,
        sut: &SutName,
        status: Option<&AgentStatus>,
        retained: bool,
    ) {
        let Some(status) = status.filter(|_| !retained) else {
            return;
        };
        let now = Instant::now();
        let changed = self
            .hang
            .heard(sut, now, status.state, status.detail.as_deref());
        let age = Duration::from_millis(now_ms().saturating_sub(status.time_ms));
        let turned = self
            .hang
            .agent(sut)
            .heard_healthy(now, age, status.is_healthy());
        if changed || turned {
            self.timers.pass_in(now, EVENT_DELAY);
        }
    }

    /// An action on `sut` succeeded at `now`: a restart or start begins a new run of the
    /// container (a created one is new when a pass first sees it).
    pub(super) fn hang_action_done(&mut self, action: &Action, now: Instant) {
        if let Action::Restart { sut, id } | Action::Start { sut, id } = action {
            self.hang.agent(sut).started(id, now);
        }
    }

    /// Judges the running agents of the pass (`actual`, planned from `scan`): confirms the
    /// suspects with the healthcheck through `docker exec`, marks the containers of hung or
    /// self-declared unhealthy agents `Health::Unhealthy` (with the reason in their SUT's
    /// view), and arms the timer for the earliest moment another agent could become suspect.
    /// Also tells the executor Docker's interval for an `auto` `health.interval` (from the
    /// lab's size). Does nothing else when the supervisor does not watch the agents (they run
    /// without MQTT, or it does).
    pub(super) async fn judge_hangs(
        &mut self,
        scan: &Scan,
        desired: &BTreeMap<SutName, Desired>,
        actual: &mut [Actual],
        now: Instant,
    ) {
        let rate = self.settings.healthcheck_rate;
        let auto = auto_interval(scan.valid.len(), rate, self.hang.watches());
        self.exec.set_auto_interval(auto);
        if !self.hang.watches() {
            return;
        }
        self.hang.retain(|s| scan.valid.contains_key(s));
        let link = self.hang.link_since();
        for a in actual.iter() {
            if a.state == RunState::Paused && is_primary(a, desired.get(&a.sut)) {
                self.hang.agent(&a.sut).paused(&a.id);
            }
        }
        let judged: Vec<(SutName, String, Timing)> = actual
            .iter()
            .filter(|a| a.state == RunState::Running && is_primary(a, desired.get(&a.sut)))
            .filter_map(|a| {
                let cfg = scan.valid.get(&a.sut)?;
                Some((a.sut.clone(), a.id.clone(), Timing::from(&cfg.health)))
            })
            .collect();
        let mut reasons: BTreeMap<String, (SutName, String)> = BTreeMap::new();
        let mut suspects = Vec::new();
        for (sut, id, t) in &judged {
            let agent = self.hang.agent(sut);
            agent.running(id, now);
            match agent.verdict(id, now, link, *t) {
                Verdict::Fine => {}
                Verdict::Suspect => suspects.push((sut.clone(), id.clone(), *t)),
                Verdict::Unhealthy(why) => {
                    reasons.insert(id.clone(), (sut.clone(), why));
                }
            }
        }
        self.confirm_hangs(suspects, &judged, now, &mut reasons)
            .await;
        for a in actual.iter_mut() {
            if reasons.contains_key(&a.id) {
                a.health = Health::Unhealthy;
            } else if a.health == Health::Starting {
                let vouched = judged
                    .iter()
                    .any(|(sut, id, t)| *id == a.id && self.hang.agent(sut).vouches(id, now, *t));
                if vouched {
                    a.health = Health::Healthy;
                }
            }
        }
        for st in self.suts.values_mut() {
            st.health_reason = None;
        }
        for (sut, why) in reasons.into_values() {
            self.suts.entry(sut).or_default().health_reason = Some(why);
        }
        let next = judged
            .iter()
            .filter_map(|(sut, _, t)| self.hang.agent(sut).suspect_at(link, *t))
            .min();
        if let Some(at) = next {
            self.timers.wake_at(at);
        }
    }

    /// Confirms each suspect with one healthcheck through `docker exec` (unless the whole lab
    /// is silent: the broker's path from the agents is down, not every agent hung); notes the
    /// confirmed hangs in `reasons` (container id → SUT, why).
    async fn confirm_hangs(
        &mut self,
        suspects: Vec<(SutName, String, Timing)>,
        judged: &[(SutName, String, Timing)],
        now: Instant,
        reasons: &mut BTreeMap<String, (SutName, String)>,
    ) {
        if suspects.is_empty() {
            return;
        }
        if let Some(first) = self
            .hang
            .silent(judged.len(), now, quiet(judged.iter().map(|j| j.2)))
        {
            if first {
                warn!(agents = judged.len(), suspects = suspects.len(), "No agent published a status for two heartbeats: the broker's path from the agents is down, not every agent hung; no container is restarted for it (Docker's own health check still runs).");
            }
            for (sut, _, _) in &suspects {
                self.hang.agent(sut).postpone(now);
            }
            return;
        }
        let ask = suspects.into_iter().map(|(sut, id, _)| (id, sut)).collect();
        for answer in self.exec.ask_agents(ask).await {
            let _span = info_span!("sut", sut = %answer.sut).entered();
            let found = check(&answer);
            let ran = found != Check::Unknown;
            let Some(t) = judged.iter().find(|j| j.1 == answer.id).map(|j| j.2) else {
                continue;
            };
            match self
                .hang
                .agent(&answer.sut)
                .confirm(&answer.id, now, found, t)
            {
                Confirmed::Hung(why) if ran => {
                    warn!(container = %answer.id, reason = %why, "The agent published no status for longer than health.max_age and its heartbeat is stale: it is hung.");
                    reasons.insert(answer.id, (answer.sut, why));
                }
                Confirmed::Hung(why) => {
                    warn!(container = %answer.id, reason = %why, "The agent published no status for longer than health.max_age and the hang check could not run health.retries times in a row: taken as hung.");
                    reasons.insert(answer.id, (answer.sut, why));
                }
                Confirmed::Alive { first: true } => {
                    warn!(container = %answer.id, "The agent published no status for longer than health.max_age, but its heartbeat is fresh: it is alive and only off the broker; not restarted.");
                }
                Confirmed::Alive { first: false } => {
                    debug!(container = %answer.id, "The agent is still alive and off the broker.");
                }
                Confirmed::Unknown => {
                    debug!(container = %answer.id, "Could not ask the agent whether it is hung; asking again after health.max_age (after health.retries such failures in a row it counts as hung).");
                }
            }
        }
    }
}
