//! The loop's timers: when each kind of wake-up is due (the trailing debounce of file events,
//! the next pass, retry, healing, busy-wait and hang-check deadlines, the periodic resync), and
//! the spacing of passes while actions run.

use std::time::Duration;

use tokio::time::Instant;

use super::{BUSY_PASS_INTERVAL, BUSY_PASS_PER_CONTAINER, DEBOUNCE};

/// When each kind of wake-up is due.
#[derive(Debug)]
pub(super) struct Timers {
    /// The end of the trailing debounce of file events.
    files: Option<Instant>,
    /// When the next pass is due.
    pass: Option<Instant>,
    /// Earliest retry, healing or busy-wait deadline.
    wake: Option<Instant>,
    /// The next periodic resync.
    resync: Instant,
    /// When the last pass ran.
    last_pass: Option<Instant>,
    /// Passes while actions run come at most this often (see [`Timers::lab_size`]).
    busy_interval: Duration,
}

impl Timers {
    /// Timers at `now`: a pass at once, a resync after `resync`.
    pub(super) fn new(now: Instant, resync: Duration) -> Self {
        Self {
            files: None,
            pass: Some(now),
            wake: None,
            resync: now + resync,
            last_pass: None,
            busy_interval: BUSY_PASS_INTERVAL,
        }
    }

    /// The last pass listed `containers`: passes while actions run are spaced by
    /// [`BUSY_PASS_INTERVAL`], or [`BUSY_PASS_PER_CONTAINER`] each if that is longer.
    pub(super) fn lab_size(&mut self, containers: usize) {
        let per =
            BUSY_PASS_PER_CONTAINER.saturating_mul(u32::try_from(containers).unwrap_or(u32::MAX));
        self.busy_interval = per.max(BUSY_PASS_INTERVAL);
    }

    /// A file changed: the pass waits for [`DEBOUNCE`] of quiet.
    pub(super) fn file_event(&mut self, now: Instant) {
        self.files = Some(now + DEBOUNCE);
    }

    /// A pass at `now + d`, unless one is due sooner.
    pub(super) fn pass_in(&mut self, now: Instant, d: Duration) {
        let at = now + d;
        self.pass = Some(self.pass.map_or(at, |p| p.min(at)));
    }

    /// A pass at `now`.
    pub(super) fn pass_now(&mut self, now: Instant) {
        self.pass = Some(now);
    }

    /// A pass at `at` (a retry, healing or busy-wait deadline), unless a wake-up comes sooner.
    pub(super) fn wake_at(&mut self, at: Instant) {
        self.wake = Some(self.wake.map_or(at, |w| w.min(at)));
    }

    /// The earliest timer (`status`: when the status is due again).
    pub(super) fn deadline(&self, status: Option<Instant>) -> Instant {
        [self.files, self.pass, self.wake, Some(self.resync), status]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(self.resync)
    }

    /// Fires the timers due at `now`; returns whether a pass runs now. While actions run
    /// (`busy`), passes come at most every busy interval ([`Timers::lab_size`]).
    pub(super) fn fire(&mut self, now: Instant, resync: Duration, busy: bool) -> bool {
        if self.files.is_some_and(|d| d <= now) {
            self.files = None;
            self.pass = Some(now);
        }
        if self.wake.is_some_and(|d| d <= now) {
            self.wake = None;
            self.pass = Some(now);
        }
        if self.resync <= now {
            self.resync = now + resync;
            self.pass = Some(now);
        }
        if self.pass.is_none_or(|d| d > now) {
            return false;
        }
        match self.last_pass.map(|l| l + self.busy_interval) {
            Some(next) if busy && now < next => {
                self.pass = Some(next);
                false
            }
            _ => {
                self.pass = None;
                self.last_pass = Some(now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const RESYNC: Duration = Duration::from_secs(30);

    #[test]
    fn file_events_are_debounced_until_quiet() {
        let t0 = Instant::now();
        let mut t = Timers::new(t0, RESYNC);
        assert!(t.fire(t0, RESYNC, false), "the first pass at once");
        for i in 0..5 {
            t.file_event(t0 + MS * 100 * i);
        }
        let quiet = t0 + MS * 400 + DEBOUNCE;
        assert_eq!(t.deadline(None), quiet);
        assert!(!t.fire(quiet - MS, RESYNC, false));
        assert!(t.fire(quiet, RESYNC, false));
        assert_eq!(t.deadline(None), t0 + RESYNC, "then only the resync");
    }

    #[test]
    fn passes_are_spaced_while_actions_run() {
        let t0 = Instant::now();
        let mut t = Timers::new(t0, RESYNC);
        assert!(t.fire(t0, RESYNC, true));
        t.pass_now(t0 + MS * 10);
        assert!(!t.fire(t0 + MS * 10, RESYNC, true));
        assert_eq!(t.deadline(None), t0 + BUSY_PASS_INTERVAL);
        assert!(t.fire(t0 + BUSY_PASS_INTERVAL, RESYNC, true));
        t.pass_now(t0 + BUSY_PASS_INTERVAL + MS);
        assert!(
            t.fire(t0 + BUSY_PASS_INTERVAL + MS, RESYNC, false),
            "idle: at once"
        );
    }

    #[test]
    fn a_large_lab_spaces_its_busy_passes_more() {
        let t0 = Instant::now();
        let mut t = Timers::new(t0, RESYNC);
        t.lab_size(50);
        assert!(t.fire(t0, RESYNC, true));
        t.pass_now(t0 + MS);
        assert!(!t.fire(t0 + MS, RESYNC, true));
        assert_eq!(t.deadline(None), t0 + BUSY_PASS_INTERVAL, "at least 1 s");
        t.lab_size(500);
        assert!(!t.fire(t0 + BUSY_PASS_INTERVAL, RESYNC, true));
        assert_eq!(
            t.deadline(None),
            t0 + Duration::from_secs(5),
            "10 ms per container"
        );
        t.pass_now(t0 + BUSY_PASS_INTERVAL);
        assert!(
            t.fire(t0 + BUSY_PASS_INTERVAL, RESYNC, false),
            "idle: at once"
        );
    }

    #[test]
    fn wake_ups_keep_the_earliest() {
        let t0 = Instant::now();
        let mut t = Timers::new(t0, RESYNC);
        assert!(t.fire(t0, RESYNC, false));
        t.wake_at(t0 + MS * 50);
        t.wake_at(t0 + MS * 20);
        t.pass_in(t0, MS * 30);
        t.pass_in(t0, MS * 40);
        assert_eq!(t.deadline(Some(t0 + MS * 10)), t0 + MS * 10);
        assert_eq!(t.deadline(None), t0 + MS * 20);
        assert!(t.fire(t0 + MS * 20, RESYNC, false));
    }
}
