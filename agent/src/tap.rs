//! The tap: the non-blocking, byte-bounded and rate-capped hand-off of output lines from the mux
//! ([`crate::output::Sinks`]) to the MQTT batcher ([`crate::publish`]). What it cannot take is
//! dropped in whole chunks and recorded as lost lines, never blocking the pumps.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::output::{Chunk, Target};

/// The non-blocking hand-off from the mux to the MQTT batcher: a queue bounded in bytes,
/// where consecutive chunks for the same target are merged. A writer never waits: when the
/// batcher is behind, small writes coalesce into one chunk, and only when the queue holds
/// `capacity` bytes, or the output runs over the rate, is a chunk dropped, leaving a record of
/// its lines in its place.
#[derive(Clone)]
pub struct Tap {
    inner: Arc<TapInner>,
}

struct TapInner {
    queue: Mutex<TapQueue>,
    notify: tokio::sync::Notify,
    /// Lines lost on `<sut>/output` (at the tap, and by the batcher).
    dropped: Arc<AtomicU64>,
    capacity: usize,
}

/// What the batcher takes from the tap, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapItem {
    /// Whole lines.
    Lines(Chunk),
    /// Lines dropped at this point (the queue was full, or the output over the rate).
    Lost {
        /// Where they would have gone.
        target: Target,
        /// How many.
        lines: u64,
    },
    /// A job's output ended.
    End(Target),
}

#[derive(Default)]
struct TapQueue {
    items: std::collections::VecDeque<TapItem>,
    bytes: usize,
    closed: bool,
    bucket: Option<Bucket>,
}

/// A token bucket in bytes: `rate` per second, at most one second's worth saved up. A chunk
/// passes while the bucket is not in debt, and may take it into debt (so a chunk larger than
/// the burst still passes, once the bucket is full).
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u64) -> Bucket {
        let rate = rate.max(1) as f64;
        Bucket {
            rate,
            tokens: rate,
            at: Instant::now(),
        }
    }

    /// Refills the bucket up to `now`; true when it is in debt (a chunk would not pass).
    fn in_debt(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.rate);
        self.tokens < 0.0
    }

    fn take(&mut self, n: usize, now: Instant) -> bool {
        if self.in_debt(now) {
            return false;
        }
        self.tokens -= n as f64;
        true
    }
}

/// The batcher's end of a [`Tap`].
pub struct TapReceiver {
    inner: Arc<TapInner>,
}

impl Tap {
    /// A tap holding at most `capacity` bytes, without a rate limit, and the batcher's
    /// receiving end.
    pub fn new(capacity: usize) -> (Tap, TapReceiver) {
        Tap::with_rate(capacity, None)
    }

    /// A tap holding at most `capacity` bytes that passes at most `rate` bytes per second
    /// (`None`: no limit), and the batcher's receiving end.
    pub fn with_rate(capacity: usize, rate: Option<u64>) -> (Tap, TapReceiver) {
        let inner = Arc::new(TapInner {
            queue: Mutex::new(TapQueue {
                bucket: rate.map(Bucket::new),
                ..TapQueue::default()
            }),
            notify: tokio::sync::Notify::new(),
            dropped: Arc::new(AtomicU64::new(0)),
            capacity: capacity.max(1),
        });
        (
            Tap {
                inner: inner.clone(),
            },
            TapReceiver { inner },
        )
    }

    /// Hands `chunk` to the batcher, merging it with the previous one for the same target, or
    /// drops it (recording its lines in its place) if the queue is full or the output is over
    /// the rate.
    pub fn send(&self, chunk: Chunk) {
        let mut q = self.inner.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.closed || chunk.lines == 0 {
            return;
        }
        let len = chunk.text.len();
        let over_rate = |q: &mut TapQueue| {
            q.bucket
                .as_mut()
                .is_some_and(|b| !b.take(len, Instant::now()))
        };
        if q.bytes + len > self.inner.capacity || over_rate(&mut q) {
            self.record_lost(&mut q, chunk.target, chunk.lines);
        } else {
            q.bytes += len;
            match q.items.back_mut() {
                Some(TapItem::Lines(c)) if c.target == chunk.target => {
                    c.text.push_str(&chunk.text);
                    c.lines += chunk.lines;
                }
                _ => q.items.push_back(TapItem::Lines(chunk)),
            }
        }
        drop(q);
        self.inner.notify.notify_one();
    }

    /// Drops `lines()` lines for `target` (recording them as lost) when a chunk of at least
    /// `min_len` bytes would be dropped by [`Tap::send`] now: the queue is full even for it, or
    /// the output is over the rate. True when the chunk need not be built (also when closed).
    pub fn drop_if_over(
        &self,
        target: Target,
        min_len: usize,
        lines: impl FnOnce() -> u64,
    ) -> bool {
        let mut q = self.inner.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.closed {
            return true;
        }
        let over = q.bytes + min_len > self.inner.capacity
            || q.bucket.as_mut().is_some_and(|b| b.in_debt(Instant::now()));
        if !over {
            return false;
        }
        let lines = lines();
        if lines > 0 {
            self.record_lost(&mut q, target, lines);
            drop(q);
            self.inner.notify.notify_one();
        }
        true
    }

    fn record_lost(&self, q: &mut TapQueue, target: Target, lines: u64) {
        self.inner.dropped.fetch_add(lines, Ordering::Relaxed);
        match q.items.back_mut() {
            Some(TapItem::Lost {
                target: t,
                lines: l,
            }) if *t == target => *l += lines,
            _ => q.items.push_back(TapItem::Lost { target, lines }),
        }
    }

    /// `target`'s output ended (never dropped).
    pub fn end(&self, target: Target) {
        let mut q = self.inner.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.closed {
            return;
        }
        q.items.push_back(TapItem::End(target));
        drop(q);
        self.inner.notify.notify_one();
    }

    /// No more chunks: the receiver ends once it has taken what is queued.
    pub fn close(&self) {
        self.inner
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .closed = true;
        self.inner.notify.notify_one();
    }

    /// The shared counter of lines lost on `<sut>/output`.
    pub fn dropped_counter(&self) -> Arc<AtomicU64> {
        self.inner.dropped.clone()
    }

    /// Lines lost on `<sut>/output` so far (at the tap, and by the batcher).
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }
}

impl TapReceiver {
    /// Takes the oldest item without waiting.
    pub fn try_recv(&mut self) -> Option<TapItem> {
        let mut q = self.inner.queue.lock().unwrap_or_else(|p| p.into_inner());
        let item = q.items.pop_front()?;
        if let TapItem::Lines(c) = &item {
            q.bytes -= c.text.len();
        }
        Some(item)
    }

    /// Waits for the next item; `None` once the tap is closed and empty.
    pub async fn recv(&mut self) -> Option<TapItem> {
        loop {
            if let Some(c) = self.try_recv() {
                return Some(c);
            }
            if self
                .inner
                .queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .closed
            {
                return None;
            }
            // notify_one keeps a permit when nobody waits, so a send between the check above and
            // this await is not missed.
            self.inner.notify.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_passes_the_rate_with_one_second_of_burst() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000);
        b.at = t0;
        // A full bucket: 1000 bytes of burst, and a chunk may take it into debt.
        assert!(b.take(600, t0));
        assert!(b.take(600, t0));
        assert!(!b.take(1, t0), "in debt: dropped");
        // 0.3 s later the debt (200) is paid and 100 bytes are back.
        assert!(b.take(50, t0 + Duration::from_millis(300)));
        // Idle for a minute: never more than one second's worth.
        assert!(b.take(1001, t0 + Duration::from_secs(60)));
        assert!(!b.take(1, t0 + Duration::from_secs(60)));
    }
}
