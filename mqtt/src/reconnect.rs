//! The reconnect policy, pure: how long the polling task sleeps after a connection error.
//!
//! rumqttc reconnects as soon as `poll()` is called after an error, so the delay is ours:
//! `backoff_min * 2^(n-1)` capped at `backoff_max` (backon's [`ExponentialBuilder`], the one
//! backoff of the workspace), then scaled by ±[`BACKOFF_JITTER`] and capped at `backoff_max`
//! again, where `n` counts failures since the last ConnAck. backon's own jitter is not used: it
//! only adds (up to 100 %) and may exceed the cap, and the link's delays have always been ±20 %
//! and never above `backoff_max`. The jitter is an input, so tests are deterministic.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Fraction of the delay added or removed at random.
pub const BACKOFF_JITTER: f64 = 0.2;

/// Reconnect delays since the last successful connection.
#[derive(Debug)]
pub(crate) struct Reconnect {
    builder: ExponentialBuilder,
    max: Duration,
    delays: <ExponentialBuilder as BackoffBuilder>::Backoff,
}

impl Reconnect {
    /// Delays from `min`, doubling, capped at `max`.
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::new()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(2.0)
            .without_max_times();
        Reconnect {
            builder,
            max,
            delays: builder.build(),
        }
    }

    /// A connection succeeded (ConnAck): the next failure waits `min` again.
    pub(crate) fn connected(&mut self) {
        self.delays = self.builder.build();
    }

    /// The delay before the next attempt, after one more failure; `jitter` in `-1.0..=1.0`
    /// (clamped) scales it by `1 + BACKOFF_JITTER * jitter`.
    pub(crate) fn next_delay(&mut self, jitter: f64) -> Duration {
        let base = self.delays.next().unwrap_or(self.max).min(self.max);
        let factor = 1.0 + BACKOFF_JITTER * jitter.clamp(-1.0, 1.0);
        base.mul_f64(factor).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// backon computes in `f32` seconds: compare to the millisecond.
    fn rounded(d: Duration) -> Duration {
        ms((d.as_secs_f64() * 1000.0).round() as u64)
    }

    fn delays(r: &mut Reconnect, n: usize, jitter: f64) -> Vec<Duration> {
        (0..n).map(|_| rounded(r.next_delay(jitter))).collect()
    }

    #[test]
    fn backoff_grows_doubles_and_caps() {
        let mut r = Reconnect::new(ms(100), ms(10_000));
        let want = [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000].map(ms);
        assert_eq!(delays(&mut r, 9, 0.0), want);
        // It stays at the cap however long the broker stays away.
        assert!(delays(&mut r, 1000, 0.0).iter().all(|d| *d == ms(10_000)));
    }

    #[test]
    fn a_connection_resets_the_backoff() {
        let mut r = Reconnect::new(ms(100), ms(10_000));
        delays(&mut r, 5, 0.0);
        r.connected();
        assert_eq!(delays(&mut r, 2, 0.0), [ms(100), ms(200)]);
    }

    #[test]
    fn backoff_jitter_is_bounded() {
        let mut r = Reconnect::new(ms(100), ms(10_000));
        assert_eq!(rounded(r.next_delay(1.0)), ms(120));
        let mut r = Reconnect::new(ms(100), ms(10_000));
        assert_eq!(rounded(r.next_delay(-1.0)), ms(80));
        let mut r = Reconnect::new(ms(100), ms(10_000));
        delays(&mut r, 2, 0.0);
        assert_eq!(rounded(r.next_delay(5.0)), ms(480)); // clamped to +20 %
        let mut r = Reconnect::new(ms(100), ms(10_000));
        delays(&mut r, 19, 0.0);
        assert_eq!(rounded(r.next_delay(1.0)), ms(10_000)); // never above max
        assert_eq!(rounded(r.next_delay(-1.0)), ms(8_000));
        for _ in 0..1000 {
            let mut r = Reconnect::new(ms(100), ms(10_000));
            r.next_delay(0.0);
            let d = rounded(r.next_delay(fastrand::f64() * 2.0 - 1.0));
            assert!(d >= ms(160) && d <= ms(240), "{d:?}");
        }
    }
}
