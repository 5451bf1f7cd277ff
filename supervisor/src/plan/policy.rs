//! Policy: what the reconcile loop keeps per SUT between passes ([`SutState`]), and the gates on
//! acting that the plan leaves to the caller because they depend on time.
//!
//! - **Retry** ([`Retry`]): a failed action makes its SUT (and only it) wait, with exponential
//!   backoff from 1 s doubling to 60 s; a success resets it.
//! - **Healing** ([`Heal`]): the first restart of an unhealthy container happens at once, the
//!   next ones after `restart.backoff_min` doubling to `restart.backoff_max`; after
//!   `restart.crash_loop_after` restarts without a healthy minute in between the SUT is flagged
//!   `crash_loop` (restarts go on at the longest delay). A healthy minute resets both.
//! - **Busy wait** ([`Deferral`]): a recreation or removal waits for a busy agent at most
//!   `--busy-wait`; then it proceeds ([`Busy::Expired`]).
//!
//! Nothing here does I/O or reads a clock: every decision takes `now`, so it is unit-tested
//! with made-up instants. Every backoff is one [`Backoff`] (backon's exponential builder, no
//! jitter: delays are deterministic).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use labvisor_protocol::config::RestartSettings;
use labvisor_protocol::payloads::{Health, SutView};
use tokio::time::Instant;

use super::{Action, Busy, Deferred};

/// A container healthy this long resets its restart backoff and crash-loop flag.
pub const HEALTHY_WINDOW: Duration = Duration::from_secs(60);
/// First retry delay of a failed action (and of an unreachable engine).
pub const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest retry delay of a failed action.
pub const RETRY_MAX: Duration = Duration::from_secs(60);

/// Exponential backoff: `min`, doubling, capped at `max`, never giving up. A thin state holder
/// around [`backon::ExponentialBuilder`] (the workspace's one backoff), restartable with
/// [`Backoff::reset`].
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    steps: Option<ExponentialBackoff>,
}

impl Backoff {
    /// A backoff from `min` doubling to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            steps: None,
        }
    }

    /// The next delay: `min` after a reset, then twice the previous one, at most `max`.
    pub fn next_delay(&mut self) -> Duration {
        let (min, max) = (self.min, self.max);
        self.steps
            .get_or_insert_with(|| {
                ExponentialBuilder::new()
                    .with_min_delay(min)
                    .with_max_delay(max)
                    .without_max_times()
                    .build()
            })
            .next()
            .unwrap_or(max)
    }

    /// Starts again from `min`.
    pub fn reset(&mut self) {
        self.steps = None;
    }

    /// Changes the bounds (a SUT file's restart settings may change); a change starts again
    /// from the new `min`.
    pub fn set_bounds(&mut self, min: Duration, max: Duration) {
        if (min, max) != (self.min, self.max) {
            *self = Self::new(min, max);
        }
    }
}

/// Retry gating of one SUT's failed actions.
#[derive(Debug)]
pub struct Retry {
    backoff: Backoff,
    at: Option<Instant>,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            backoff: Backoff::new(RETRY_MIN, RETRY_MAX),
            at: None,
        }
    }
}

impl Retry {
    /// An action failed at `now`: the next one waits; returns how long.
    pub fn failed(&mut self, now: Instant) -> Duration {
        let delay = self.backoff.next_delay();
        self.at = Some(now + delay);
        delay
    }

    /// An action succeeded: no wait, and the next failure waits the shortest delay.
    pub fn succeeded(&mut self) {
        self.backoff.reset();
        self.at = None;
    }

    /// When the SUT may act again, if that is later than `now`.
    pub fn wait_until(&self, now: Instant) -> Option<Instant> {
        self.at.filter(|at| *at > now)
    }
}

/// Healing state of one SUT: restarts of its unhealthy container.
#[derive(Debug)]
pub struct Heal {
    /// Restarts by this supervisor so far (published).
    pub restarts: u64,
    /// Restarts since the container was last healthy for [`HEALTHY_WINDOW`].
    streak: u32,
    backoff: Backoff,
    /// No restart before this.
    next_at: Option<Instant>,
    /// Since when the container is healthy.
    healthy_since: Option<Instant>,
    /// `restart.crash_loop_after` restarts without a healthy minute (published).
    pub crash_loop: bool,
}

impl Default for Heal {
    fn default() -> Self {
        Self {
            restarts: 0,
            streak: 0,
            backoff: Backoff::new(Duration::ZERO, Duration::ZERO),
            next_at: None,
            healthy_since: None,
            crash_loop: false,
        }
    }
}

/// Whether an action may start now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// The SUT's previous action still runs.
    InFlight,
    /// Not before this instant (retry or healing backoff): the loop wakes then.
    Until(Instant),
    /// Go. `crash_loop_began`: this restart flags the SUT as crash-looping.
    Go {
        /// This restart is the one that makes the SUT crash-looping.
        crash_loop_began: bool,
    },
}

impl Heal {
    /// The SUT's container was seen with `health` (`None`: it has none) at `now`.
    pub fn observe(&mut self, health: Option<Health>, now: Instant) {
        if health != Some(Health::Healthy) {
            self.healthy_since = None;
            return;
        }
        let since = *self.healthy_since.get_or_insert(now);
        if now.duration_since(since) >= HEALTHY_WINDOW && self.streak > 0 {
            self.streak = 0;
            self.backoff.reset();
            self.crash_loop = false;
            self.next_at = None;
        }
    }

    /// Whether a restart may happen at `now` under `policy`; a `Go` counts as the restart
    /// happening (the next one waits the next delay).
    pub fn gate(&mut self, now: Instant, policy: &RestartSettings) -> Gate {
        if let Some(at) = self.next_at.filter(|at| *at > now) {
            return Gate::Until(at);
        }
        self.backoff
            .set_bounds(policy.backoff_min, policy.backoff_max);
        self.next_at = Some(now + self.backoff.next_delay());
        let mut began = false;
        if self.streak + 1 >= policy.crash_loop_after.get() {
            began = !self.crash_loop;
            self.crash_loop = true;
        }
        Gate::Go {
            crash_loop_began: began,
        }
    }

    /// A restart succeeded.
    pub fn restarted(&mut self) {
        self.restarts += 1;
        self.streak += 1;
        self.healthy_since = None;
    }
}

/// The busy wait of one SUT: since when a disruptive action waits for its agent's job.
#[derive(Debug, Default)]
pub struct Deferral {
    since: Option<Instant>,
}

/// A deferral noted by [`Deferral::waiting`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// The wait began with this pass.
    pub began: bool,
    /// When it runs out (the loop re-plans then).
    pub until: Instant,
    /// The `pending_action` text for the SUT's view.
    pub pending: String,
}

impl Deferral {
    /// A busy agent as the plan must see it: [`Busy::Busy`], or [`Busy::Expired`] once the
    /// deferral has lasted `busy_wait`.
    pub fn busy(&self, now: Instant, busy_wait: Duration) -> Busy {
        match self.since {
            Some(t) if now.duration_since(t) >= busy_wait => Busy::Expired,
            _ => Busy::Busy,
        }
    }

    /// The plan deferred `action` at `now`; `device_work` is the device's own work the agent
    /// reported (`device.busy_glob`), which the pending text names.
    pub fn waiting(
        &mut self,
        now: Instant,
        busy_wait: Duration,
        action: Deferred,
        device_work: Option<&str>,
    ) -> Waiting {
        let began = self.since.is_none();
        let since = *self.since.get_or_insert(now);
        let left = humantime::format_duration(Duration::from_secs(
            busy_wait
                .saturating_sub(now.duration_since(since))
                .as_secs(),
        ));
        let pending = match device_work {
            Some(work) => {
                format!("{action} waits for the device's own work: {work} (at most {left})")
            }
            None => format!("{action} (waiting for the running job, at most {left})"),
        };
        Waiting {
            began,
            until: since + busy_wait,
            pending,
        }
    }

    /// When the wait that runs runs out, if one runs.
    pub fn until(&self, busy_wait: Duration) -> Option<Instant> {
        self.since.map(|t| t + busy_wait)
    }

    /// The plan deferred nothing. While an expired wait's action is still due (`acting`), the
    /// start of the wait is kept.
    pub fn not_waiting(&mut self, acting: bool) {
        if !acting {
            self.since = None;
        }
    }
}

/// What the supervisor keeps per SUT between passes.
#[derive(Debug, Default)]
pub struct SutState {
    /// An action of this SUT runs (never two at once).
    pub in_flight: bool,
    /// Retry backoff after failed actions.
    pub retry: Retry,
    /// The last action's error (published until an action succeeds).
    pub last_error: Option<String>,
    /// A foreign container holds the SUT's name (published).
    pub conflict: Option<String>,
    /// The busy wait.
    pub deferral: Deferral,
    /// The deferred action (published as `pending_action`).
    pub pending: Option<String>,
    /// The container whose agent was asked to drain its device process (a deferral waits for
    /// the device's own work); the request is lifted if the deferral ends without the action.
    pub drained: Option<String>,
    /// The container whose agent was asked once, on first sight, whether its device process is
    /// drained (a drain left by an earlier run of the supervisor is lifted unless needed).
    pub drain_checked: Option<String>,
    /// The container this supervisor stopped for a rolling restart's recreation, or a healing
    /// restart, that then failed: exited with the wanted hash, it is started again rather than taken for a
    /// person's stop. Forgotten once it is not exited (or gone).
    pub stopped_itself: Option<String>,
    /// Healing.
    pub heal: Heal,
    /// Why the supervisor judges the agent unhealthy itself ([`super::hang`]; published).
    pub health_reason: Option<String>,
    /// The view last published on `<sut>/supervisor`.
    pub published: Option<SutView>,
}

impl SutState {
    /// Whether `action` may start at `now`; `restart` is the SUT's restart policy (used by
    /// [`Action::Restart`]). A `Go` marks the SUT in flight.
    pub fn gate(
        &mut self,
        action: &Action,
        now: Instant,
        restart: Option<&RestartSettings>,
    ) -> Gate {
        if self.in_flight {
            return Gate::InFlight;
        }
        if let Some(at) = self.retry.wait_until(now) {
            return Gate::Until(at);
        }
        let gate = match (action, restart) {
            (Action::Restart { .. }, Some(policy)) => self.heal.gate(now, policy),
            _ => Gate::Go {
                crash_loop_began: false,
            },
        };
        if let Gate::Go { .. } = gate {
            self.in_flight = true;
        }
        gate
    }

    /// `action` finished at `now`, with `error` if it failed; returns the retry delay then.
    pub fn finished(
        &mut self,
        action: &Action,
        error: Option<String>,
        now: Instant,
    ) -> Option<Duration> {
        self.in_flight = false;
        match error {
            None => {
                self.retry.succeeded();
                self.last_error = None;
                if let Action::Restart { .. } = action {
                    self.heal.restarted();
                }
                None
            }
            Some(error) => {
                self.last_error = Some(format!("{}: {error}", action.kind()));
                Some(self.retry.failed(now))
            }
        }
    }

    /// Notes the foreign container `(id, name)` holding the SUT's name, or none; returns whether
    /// the conflict is new (worth an error in the log).
    pub fn set_conflict(&mut self, conflict: Option<(&str, &str)>) -> bool {
        let new = conflict.is_some() && self.conflict.is_none();
        self.conflict = conflict.map(|(id, name)| {
            format!(
                "conflict: container {name} ({}) exists and is not managed by this supervisor; remove or rename it",
                &id[..id.len().min(12)]
            )
        });
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use labvisor_protocol::payloads::Health;
    use labvisor_protocol::SutName;
    use std::num::NonZeroU32;

    const S: Duration = Duration::from_secs(1);

    fn restart_policy(min: u64, max: u64, crash_loop_after: u32) -> RestartSettings {
        RestartSettings {
            on_unhealthy: labvisor_protocol::config::OnUnhealthy::Restart,
            backoff_min: S * min as u32,
            backoff_max: S * max as u32,
            on_child_exit: labvisor_protocol::config::OnChildExit::Restart,
            crash_loop_after: NonZeroU32::new(crash_loop_after).unwrap(),
        }
    }

    fn restart() -> Action {
        Action::Restart {
            sut: SutName::new("a").unwrap(),
            id: "id".into(),
        }
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new(S, S * 10);
        let delays: Vec<u64> = (0..6).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 10, 10]);
        b.reset();
        assert_eq!(b.next_delay(), S);
        b.set_bounds(S, S * 10);
        assert_eq!(b.next_delay(), S * 2, "same bounds: goes on");
        b.set_bounds(S * 3, S * 10);
        assert_eq!(b.next_delay(), S * 3, "new bounds: starts again");
    }

    #[test]
    fn a_failed_action_waits_with_backoff_until_one_succeeds() {
        let t0 = Instant::now();
        let mut st = SutState::default();
        let create = Action::Create {
            sut: SutName::new("a").unwrap(),
        };
        assert_eq!(
            st.gate(&create, t0, None),
            Gate::Go {
                crash_loop_began: false
            }
        );
        assert_eq!(st.gate(&create, t0, None), Gate::InFlight);
        assert_eq!(st.finished(&create, Some("boom".into()), t0), Some(S));
        assert_eq!(st.last_error.as_deref(), Some("create: boom"));
        assert_eq!(st.gate(&create, t0, None), Gate::Until(t0 + S));
        assert!(matches!(st.gate(&create, t0 + S, None), Gate::Go { .. }));
        assert_eq!(
            st.finished(&create, Some("boom".into()), t0 + S),
            Some(S * 2)
        );
        let delays: Vec<Duration> = (0..7).map(|_| st.retry.failed(t0)).collect();
        assert_eq!(delays.last(), Some(&RETRY_MAX), "{delays:?}");
        assert_eq!(st.finished(&create, None, t0), None);
        assert_eq!(st.last_error, None);
        assert_eq!(st.retry.wait_until(t0), None);
        assert_eq!(st.retry.failed(t0), S, "a success resets the backoff");
    }

    #[test]
    fn healing_backs_off_flags_a_crash_loop_and_a_healthy_minute_resets_it() {
        let policy = restart_policy(2, 8, 3);
        let t0 = Instant::now();
        let mut st = SutState::default();
        let mut now = t0;
        let mut gaps = Vec::new();
        let mut began = Vec::new();
        let mut last = None;
        while st.heal.restarts < 5 {
            st.heal.observe(Some(Health::Unhealthy), now);
            match st.gate(&restart(), now, Some(&policy)) {
                Gate::Go { crash_loop_began } => {
                    if let Some(l) = last {
                        gaps.push(now.duration_since(l).as_secs());
                    }
                    last = Some(now);
                    began.push(crash_loop_began);
                    st.finished(&restart(), None, now);
                }
                Gate::Until(at) => now = at,
                Gate::InFlight => unreachable!(),
            }
        }
        assert_eq!(
            gaps,
            vec![2, 4, 8, 8],
            "the first at once, then 2 s doubling to 8 s"
        );
        assert_eq!(began, vec![false, false, true, false, false]);
        assert!(st.heal.crash_loop);

        // Healthy, but not for a minute: nothing resets.
        st.heal.observe(Some(Health::Healthy), now);
        st.heal
            .observe(Some(Health::Healthy), now + HEALTHY_WINDOW - S);
        assert!(st.heal.crash_loop);
        // A minute: reset, and the next restart happens at once.
        now += HEALTHY_WINDOW;
        st.heal.observe(Some(Health::Healthy), now);
        assert!(!st.heal.crash_loop);
        assert_eq!(st.heal.restarts, 5, "the count is kept");
        assert!(matches!(
            st.gate(&restart(), now, Some(&policy)),
            Gate::Go {
                crash_loop_began: false
            }
        ));
        st.finished(&restart(), None, now);
        assert_eq!(
            st.gate(&restart(), now, Some(&policy)),
            Gate::Until(now + S * 2)
        );
    }

    #[test]
    fn an_unhealthy_report_restarts_the_healthy_window() {
        let policy = restart_policy(1, 1, 1);
        let t0 = Instant::now();
        let mut h = Heal::default();
        assert!(matches!(
            h.gate(t0, &policy),
            Gate::Go {
                crash_loop_began: true
            }
        ));
        h.restarted();
        h.observe(Some(Health::Healthy), t0);
        h.observe(None, t0 + S);
        h.observe(Some(Health::Healthy), t0 + S * 2);
        h.observe(Some(Health::Healthy), t0 + HEALTHY_WINDOW);
        assert!(h.crash_loop, "healthy since t0+2s only");
        h.observe(Some(Health::Healthy), t0 + HEALTHY_WINDOW + S * 2);
        assert!(!h.crash_loop);
    }

    #[test]
    fn a_deferral_expires_after_the_busy_wait() {
        let t0 = Instant::now();
        let wait = S * 90;
        let mut d = Deferral::default();
        assert_eq!(d.busy(t0, wait), Busy::Busy);
        let w = d.waiting(t0, wait, Deferred::Recreate, None);
        assert!(w.began);
        assert_eq!(w.until, t0 + wait);
        assert_eq!(
            w.pending,
            "recreate (waiting for the running job, at most 1m 30s)"
        );
        let w = d.waiting(t0 + S * 30, wait, Deferred::Recreate, None);
        assert!(!w.began);
        assert_eq!(
            w.pending,
            "recreate (waiting for the running job, at most 1m)"
        );
        // Waiting for the device's own work: the text says what for.
        let work = "/tmp/testflinger/run/j1/testflinger.json";
        let w = d.waiting(t0 + S * 60, wait, Deferred::Remove, Some(work));
        assert_eq!(
            w.pending,
            format!("remove waits for the device's own work: {work} (at most 30s)")
        );
        assert_eq!(d.busy(t0 + wait - S, wait), Busy::Busy);
        assert_eq!(d.busy(t0 + wait, wait), Busy::Expired);
        // The expired action is still due: the wait's start is kept until it runs.
        d.not_waiting(true);
        assert_eq!(d.busy(t0 + wait, wait), Busy::Expired);
        d.not_waiting(false);
        assert_eq!(d.busy(t0 + wait, wait), Busy::Busy);
    }

    #[test]
    fn conflicts_are_new_once() {
        let mut st = SutState::default();
        assert!(st.set_conflict(Some(("0123456789abcdef", "p-a"))));
        assert!(!st.set_conflict(Some(("0123456789abcdef", "p-a"))));
        assert_eq!(
            st.conflict.as_deref(),
            Some("conflict: container p-a (0123456789ab) exists and is not managed by this supervisor; remove or rename it")
        );
        assert!(!st.set_conflict(None));
        assert_eq!(st.conflict, None);
    }
}
