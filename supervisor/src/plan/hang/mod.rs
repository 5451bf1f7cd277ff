//! Hang detection by the supervisor, and Docker's health-check interval: the pure rules.
//!
//! Docker's health probe is an exec into the container, about 60 ms of dockerd and containerd
//! CPU each; 500 SUTs probed every 10 s cost about three cores. The supervisor hears every
//! agent anyway (each publishes its status on `<sut>/agent` every `health.heartbeat`), so it
//! detects a hung agent itself and Docker's interval can grow with the lab:
//!
//! - **Docker's interval** ([`docker_interval`]): an explicit `health.interval` as written;
//!   `auto` (the default) is `clamp(N / rate, 10 s, 300 s)`, N the number of valid SUT files
//!   and rate `--healthcheck-rate` ([`HealthcheckRate`], execs per second across the lab,
//!   default 2): 10 s up to 20 SUTs, 50 s at 100, 250 s at 500 ([`auto_interval`]). It is
//!   chosen when a container is created and is not in its config hash, so a growing lab
//!   recreates nothing; older containers keep theirs until they are recreated. When the
//!   supervisor cannot hear the agents (they run without MQTT, or it does), none of the rest
//!   applies and `auto` is 10 s: Docker's probe is then the only hang detector.
//! - **Silence** ([`Agent::since`]): an agent is *suspect* once it has published nothing live
//!   (a retained status sent at subscription is no sign of life, nor is its last will `lost`)
//!   for `health.max_age`, counted from the latest of: its last live status, the last time the
//!   hang check found it alive, the moment the supervisor's own broker link (re)connected, and
//!   its container's start plus `health.start_period` (a start the supervisor made or saw:
//!   its own action, Docker's start or unpause event, first sight, the first sight running
//!   after a pass saw it paused, or the engine answering again after an outage,
//!   [`Lab::engine_back`]). So nothing is suspect while the link is down, nor in the
//!   first `max_age` after it comes back, nor before a container has run for
//!   `start_period + max_age`.
//! - **Confirmation** ([`check`], [`Agent::confirm`]): a suspect is confirmed with one
//!   `labvisor-healthcheck --state` through `docker exec` (it reads the heartbeat file, not the
//!   broker). A hung agent's heartbeat is stale, so the check fails: the hang is confirmed and
//!   the plan sees the container unhealthy until it restarts or the agent is heard again. An
//!   agent that is alive but lost its broker connection passes: it is not restarted, and its
//!   silence counts again from then (one exec per `max_age` at most). A check that cannot run
//!   (the exec fails or times out) is tried again after `max_age`; after `health.retries` of
//!   them in a row, with the agent still silent, the hang counts as confirmed (its reason says
//!   the check could not run).
//! - **Its own word** ([`Agent::heard`]): a fresh live status that is itself unhealthy
//!   (`crash-loop`, `stalled`) makes the container unhealthy at once, for `max_age`.
//! - **A silent lab** ([`Lab::silent`]): when two or more running agents are judged and none
//!   of them was heard for twice the longest heartbeat ([`quiet`]), the broker's path from the
//!   agents is down (not every agent hung at once): nothing is confirmed, so a broker outage
//!   costs no exec storm and restarts nothing (each suspect is looked at again after
//!   `max_age`). Docker's own probe still runs.
//!
//! Time is passed in ([`Instant`]s), so every rule is tested with made-up instants.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use labvisor_protocol::config::{HealthInterval, AUTO_INTERVAL_MAX, AUTO_INTERVAL_MIN};
use labvisor_protocol::payloads::AgentState;
use labvisor_protocol::SutName;
use tokio::time::Instant;

use super::classify::Answer;

/// `--healthcheck-rate`: Docker health-check execs per second across the lab, which an `auto`
/// `health.interval` aims at. Finite and above zero.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthcheckRate(f64);

impl HealthcheckRate {
    /// The default: 2 execs a second (about 0.12 of a core of dockerd and containerd).
    pub const DEFAULT: HealthcheckRate = HealthcheckRate(2.0);

    /// The rate of `per_second` execs; `None` unless finite and above zero.
    pub fn new(per_second: f64) -> Option<Self> {
        (per_second.is_finite() && per_second > 0.0).then_some(Self(per_second))
    }

    /// Execs per second.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl Default for HealthcheckRate {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for HealthcheckRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A `--healthcheck-rate` that is no number above zero.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a number of execs per second above zero (e.g. 2 or 0.5)")]
pub struct RateError(String);

impl FromStr for HealthcheckRate {
    type Err = RateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim()
            .parse::<f64>()
            .ok()
            .and_then(Self::new)
            .ok_or_else(|| RateError(s.to_owned()))
    }
}

/// Docker's interval for an `auto` `health.interval` in a lab of `lab_size` SUTs at `rate`:
/// `lab_size / rate` seconds, at least [`AUTO_INTERVAL_MIN`], at most [`AUTO_INTERVAL_MAX`].
/// Unless the supervisor `watches` the agents on the broker (agents without MQTT, or a
/// supervisor without it): then Docker's probe is the only hang detector and gets the floor.
pub fn auto_interval(lab_size: usize, rate: HealthcheckRate, watches: bool) -> Duration {
    if !watches {
        return AUTO_INTERVAL_MIN;
    }
    let secs = lab_size as f64 / rate.get();
    Duration::try_from_secs_f64(secs)
        .unwrap_or(AUTO_INTERVAL_MAX)
        .clamp(AUTO_INTERVAL_MIN, AUTO_INTERVAL_MAX)
}

/// Docker's interval for `interval`: as written, or `auto` ([`auto_interval`]).
pub fn docker_interval(interval: HealthInterval, auto: Duration) -> Duration {
    interval.explicit().unwrap_or(auto)
}

/// A SUT's health timings as the hang rule needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// `health.heartbeat`: how often a live agent publishes.
    pub heartbeat: Duration,
    /// `health.max_age`.
    pub max_age: Duration,
    /// `health.start_period`.
    pub start_period: Duration,
    /// `health.retries`: hang checks in a row that cannot run before a silent agent counts as
    /// hung ([`Agent::confirm`]).
    pub retries: u32,
}

impl From<&labvisor_protocol::config::Health> for Timing {
    fn from(h: &labvisor_protocol::config::Health) -> Self {
        Self {
            heartbeat: h.heartbeat,
            max_age: h.max_age,
            start_period: h.start_period,
            retries: h.retries.get(),
        }
    }
}

/// How long the lab may be quiet before it counts as silent ([`Lab::silent`]): twice the
/// longest `health.heartbeat` of its judged agents, in which every live agent publishes at
/// least once. In a broker outage every agent falls silent within one heartbeat, so by the
/// time the first one is suspect (`max_age` after its last status) the lab has been quiet for
/// `max_age` less one heartbeat: longer than this when `max_age` is over three heartbeats (the
/// default is six); otherwise the first suspects are asked, which only costs an exec each.
pub fn quiet(timings: impl IntoIterator<Item = Timing>) -> Duration {
    timings
        .into_iter()
        .map(|t| t.heartbeat.saturating_mul(2))
        .max()
        .unwrap_or_default()
}

/// What the hang check ([`check`]) found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// The heartbeat is fresh and the state healthy: the agent's loop is alive.
    Alive,
    /// The check failed: its line (a stale heartbeat, a missing file, an unhealthy state).
    Failed(String),
    /// No answer (the exec failed or timed out).
    Unknown,
}

/// What an agent's answer to `labvisor-healthcheck --state` says about a hang.
pub fn check(answer: &Answer) -> Check {
    match (&answer.unhealthy, answer.busy) {
        (Some(line), _) => Check::Failed(line.clone()),
        (None, Some(_)) => Check::Alive,
        (None, None) => Check::Unknown,
    }
}

/// What became of a confirmation ([`Agent::confirm`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirmed {
    /// The hang is confirmed: the container is unhealthy, for this reason.
    Hung(String),
    /// The agent is alive, only silent on the broker; `first`: the first time since it was
    /// last heard (said once).
    Alive {
        /// Not said before.
        first: bool,
    },
    /// The check gave no answer; asked again after `max_age` (after `health.retries` in a row
    /// the hang counts as confirmed: [`Confirmed::Hung`]).
    Unknown,
}

/// What the supervisor knows of one SUT's agent for the hang rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Agent {
    /// When its last live status arrived.
    live: Option<Instant>,
    /// When the hang check last found it alive, or could not tell.
    checked: Option<Instant>,
    /// Its running container as last seen, and since when it runs as far as the supervisor
    /// knows (its own start or restart, Docker's start event, or first sight).
    container: Option<(String, Instant)>,
    /// Its latest live status was unhealthy (`crash-loop`, `stalled`): when, and why.
    says_unhealthy: Option<(Instant, String)>,
    /// A confirmed hang: the container, and why.
    hung: Option<(String, String)>,
    /// It was found alive but silent, and that was said.
    warned: bool,
    /// When its latest live status, which said it was healthy by the one rule (a healthy
    /// state and no failing exec probe), was sent (by its own `time_ms`).
    healthy: Option<Instant>,
    /// The container a pass saw paused: running again, it counts as started then.
    paused: Option<String>,
    /// Hang checks in a row that could not run while it stayed silent.
    unknowns: u32,
}

/// How a SUT's agent stands at a given instant ([`Agent::verdict`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to do.
    Fine,
    /// Silent for `max_age` or more: to be confirmed with the hang check.
    Suspect,
    /// Unhealthy, for this reason: a confirmed hang, or its own fresh status.
    Unhealthy(String),
}

impl Agent {
    /// A live status in `state` (with `detail`) arrived at `now`. Returns whether that changes
    /// the verdict (a hang or an unhealthy word began or ended). The last will (`lost`) is the
    /// broker's word, not the agent's: it is no sign of life.
    pub fn heard(&mut self, now: Instant, state: AgentState, detail: Option<&str>) -> bool {
        if state == AgentState::Lost {
            return false;
        }
        let before = (self.hung.is_some(), self.says_unhealthy.is_some());
        self.live = Some(now);
        self.hung = None;
        self.warned = false;
        self.unknowns = 0;
        self.says_unhealthy =
            matches!(state, AgentState::CrashLoop | AgentState::Stalled).then(|| {
                let why = detail.map(|d| format!(": {d}")).unwrap_or_default();
                (now, format!("the agent says {}{why}", state.as_str()))
            });
        before != (self.hung.is_some(), self.says_unhealthy.is_some())
    }

    /// Its latest live status, heard at `now` just before and sent `age` earlier (its own
    /// `time_ms`, read on the host's clock: the agent runs on the same kernel), says whether it
    /// is `healthy` (the one rule: [`labvisor_protocol::payloads::AgentStatus::is_healthy`]).
    /// Returns whether it turned healthy (the first time since its container started, or after
    /// an unhealthy word). When it was sent, not heard, is what counts: a late status of the
    /// previous run, heard after the container's start, was sent before it.
    pub fn heard_healthy(&mut self, now: Instant, age: Duration, healthy: bool) -> bool {
        let sent = now.checked_sub(age).filter(|_| healthy);
        let turned = sent.is_some() && self.healthy.is_none();
        self.healthy = sent;
        turned
    }

    /// Whether its running container `id` may be shown healthy at `now` while Docker's first
    /// probe has not run yet (`Health::Starting`): a live status sent since the container's
    /// start (as far as the supervisor knows it), within `max_age`, said healthy. With a long `auto` interval Docker's first probe
    /// comes minutes after the start; the agent's word is as good (the healthcheck reads the
    /// same status), and a rolling restart waits for it.
    pub fn vouches(&self, id: &str, now: Instant, t: Timing) -> bool {
        let Some((_, since)) = self.container.as_ref().filter(|(c, _)| c == id) else {
            return false;
        };
        self.hung.is_none()
            && self.says_unhealthy.is_none()
            && self
                .healthy
                .is_some_and(|at| at >= *since && now.saturating_duration_since(at) <= t.max_age)
    }

    /// Its container `id` was (re)started at `now`: what was said or found about the previous
    /// run no longer holds.
    pub fn started(&mut self, id: &str, now: Instant) {
        self.container = Some((id.to_owned(), now));
        self.healthy = None;
        self.hung = None;
        self.says_unhealthy = None;
        self.warned = false;
        self.paused = None;
        self.unknowns = 0;
    }

    /// Its container `id` is running at `now`: a container not seen before, or seen paused
    /// ([`Agent::paused`]), counts as started now.
    pub fn running(&mut self, id: &str, now: Instant) {
        let thawed = self.paused.as_deref() == Some(id);
        if thawed || self.container.as_ref().is_none_or(|(c, _)| c != id) {
            self.started(id, now);
        }
    }

    /// Its container `id` is paused (`docker pause`): a frozen agent writes no heartbeat, so
    /// once it runs again its silence counts from then, as after a start (also when the
    /// `unpause` event was missed).
    pub fn paused(&mut self, id: &str) {
        self.paused = Some(id.to_owned());
    }

    /// Since when its silence counts, with the link up since `link`.
    pub fn since(&self, link: Instant, t: Timing) -> Instant {
        [
            self.live,
            self.checked,
            Some(link),
            self.container.as_ref().map(|(_, at)| *at + t.start_period),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(link)
    }

    /// When it becomes suspect (if nothing is heard meanwhile), with the link up since `link`
    /// (`None`: down, never); `None` too once its hang is confirmed.
    pub fn suspect_at(&self, link: Option<Instant>, t: Timing) -> Option<Instant> {
        if self.hung.is_some() {
            return None;
        }
        Some(self.since(link?, t) + t.max_age)
    }

    /// How its running container `id` stands at `now`, with the link up since `link`.
    pub fn verdict(&self, id: &str, now: Instant, link: Option<Instant>, t: Timing) -> Verdict {
        if let Some((_, why)) = self.hung.as_ref().filter(|(c, _)| c == id) {
            return Verdict::Unhealthy(why.clone());
        }
        if let Some((_, why)) = self
            .says_unhealthy
            .as_ref()
            .filter(|(at, _)| now.saturating_duration_since(*at) <= t.max_age)
        {
            return Verdict::Unhealthy(why.clone());
        }
        match self.suspect_at(link, t) {
            Some(at) if at <= now => Verdict::Suspect,
            _ => Verdict::Fine,
        }
    }

    /// Its check is put off at `now` (the whole lab is silent, see [`Lab::silent`]): its
    /// silence counts again from then, as after a check that could not tell.
    pub fn postpone(&mut self, now: Instant) {
        self.checked = Some(now);
    }

    /// The hang check of its container `id` found `check` at `now`, with `t.retries`: a
    /// failed check confirms the hang; so do `retries` checks in a row that could not run (the
    /// exec failed or timed out) while the agent stayed silent, since Docker's own probe, an
    /// exec too, may be minutes away at an `auto` interval. A live status or a check that ran
    /// starts the count again.
    pub fn confirm(&mut self, id: &str, now: Instant, check: Check, t: Timing) -> Confirmed {
        match check {
            Check::Failed(line) => {
                self.unknowns = 0;
                self.confirmed(id, now, &line)
            }
            Check::Alive => {
                self.unknowns = 0;
                self.checked = Some(now);
                let first = !self.warned;
                self.warned = true;
                Confirmed::Alive { first }
            }
            Check::Unknown => {
                self.unknowns += 1;
                if self.unknowns >= t.retries {
                    let line = format!(
                        "the hang check could not run {} times in a row (docker exec failed or timed out)",
                        self.unknowns
                    );
                    return self.confirmed(id, now, &line);
                }
                self.checked = Some(now);
                Confirmed::Unknown
            }
        }
    }

    /// Its hang in container `id` is confirmed at `now`, for `line`.
    fn confirmed(&mut self, id: &str, now: Instant, line: &str) -> Confirmed {
        let last = [self.live, self.container.as_ref().map(|(_, at)| *at)]
            .into_iter()
            .flatten()
            .max();
        let silent = last.map_or_else(
            || "never heard".to_owned(),
            |t| {
                format!(
                    "no heartbeat for {} s",
                    now.saturating_duration_since(t).as_secs()
                )
            },
        );
        let why = format!("{silent}: {line}");
        self.hung = Some((id.to_owned(), why.clone()));
        Confirmed::Hung(why)
    }
}

/// The hang rule's state for the whole lab: the supervisor's own link, and each agent.
#[derive(Debug, Clone, Default)]
pub struct Lab {
    /// Whether the supervisor watches the agents at all: they publish on a broker it hears.
    watches: bool,
    /// Since when the supervisor's broker link is connected (`None`: down, or no broker).
    link: Option<Instant>,
    /// The link's connection count last seen (a reconnect between two looks counts).
    connects: u64,
    /// When any agent's live status last arrived.
    last_any: Option<Instant>,
    /// The agents, by SUT.
    agents: BTreeMap<SutName, Agent>,
    /// A silent lab was said (once until an agent is heard again).
    silent_warned: bool,
}

impl Lab {
    /// The rule's state for a lab whose agents the supervisor hears on a broker (`watches`);
    /// without that the rule is off and Docker's probe is the only hang detector.
    pub fn new(watches: bool) -> Self {
        Self {
            watches,
            ..Self::default()
        }
    }

    /// Whether the supervisor watches the agents (see [`Lab::new`]).
    pub fn watches(&self) -> bool {
        self.watches
    }

    /// The supervisor's link is `connected`, after `connects` connections, at `now`.
    pub fn link(&mut self, connected: bool, connects: u64, now: Instant) {
        if !connected {
            self.link = None;
        } else if self.link.is_none() || connects != self.connects {
            self.link = Some(now);
        }
        self.connects = connects;
    }

    /// Since when the link is up.
    pub fn link_since(&self) -> Option<Instant> {
        self.link
    }

    /// A live status of `sut`'s agent (see [`Agent::heard`]).
    pub fn heard(
        &mut self,
        sut: &SutName,
        now: Instant,
        state: AgentState,
        detail: Option<&str>,
    ) -> bool {
        if state != AgentState::Lost {
            self.last_any = Some(now);
            self.silent_warned = false;
        }
        self.agents
            .entry(sut.clone())
            .or_default()
            .heard(now, state, detail)
    }

    /// The engine answers again at `now` after it did not: every container may have been
    /// restarted meanwhile (a daemon restart) without a start event reaching the supervisor,
    /// so each counts as started now.
    pub fn engine_back(&mut self, now: Instant) {
        for agent in self.agents.values_mut() {
            if let Some(id) = agent.container.as_ref().map(|(id, _)| id.clone()) {
                agent.started(&id, now);
            }
        }
    }

    /// `sut`'s agent.
    pub fn agent(&mut self, sut: &SutName) -> &mut Agent {
        self.agents.entry(sut.clone()).or_default()
    }

    /// Forgets SUTs not in `keep`.
    pub fn retain(&mut self, keep: impl Fn(&SutName) -> bool) {
        self.agents.retain(|s, _| keep(s));
    }

    /// Whether the lab is silent at `now`: of its `judged` running agents (two or more), none
    /// was heard for `quiet` since the link came up ([`quiet`]: twice the longest heartbeat, in
    /// which every live agent publishes). Returns `Some(first)` when silent (`first`: not said
    /// before).
    pub fn silent(&mut self, judged: usize, now: Instant, quiet: Duration) -> Option<bool> {
        let link = self.link?;
        let since = self.last_any.map_or(link, |t| t.max(link));
        if judged < 2 || now.saturating_duration_since(since) < quiet {
            return None;
        }
        let first = !self.silent_warned;
        self.silent_warned = true;
        Some(first)
    }
}

#[cfg(test)]
mod tests;
