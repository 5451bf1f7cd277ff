//! Output: from the device process, jobs and tailed files to three sinks.
//!
//! ```text
//!  child pipe ──► pump thread ──► Sinks: container stdout + rotating log file   (complete, raw bytes)
//!  job pipe   ──► pump thread ──┘   │
//!  tail files ──► tail thread ──┘   └─► Tap (4 MiB, merging,    ──► batcher task ──► MqttLink
//!                                        log.mqtt_rate)              50 ms / 16 KiB   (lossy UTF-8,
//!                                        full or over rate?                            seq numbers)
//!                                        drop + count
//! ```
//!
//! The pump threads do blocking reads of 64 KiB and write straight to stdout and the file, so the
//! only back-pressure the child can feel is from those two sinks, which must be complete anyway.
//! MQTT never slows it: the tap is a queue bounded in bytes where a writer never waits (small
//! writes coalesce while the batcher is behind; past the bound a chunk is dropped). The tap also
//! holds a token bucket (`log.mqtt_rate` bytes per second, a burst of one second's worth): a
//! flood beyond it is dropped right there, before any copy, so it costs neither the agent's CPU
//! nor the shared broker's, while stdout and the log file still get every byte. The link
//! drops the oldest batch when the broker is slow or gone. Both drops are counted, and a drop at
//! the tap skips a sequence number, so a consumer sees the gap.
//!
//! The sinks also record when a write started: a write blocked for long (disk full, nobody
//! draining stdout) makes the agent report `stalled`.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use labvisor_protocol::payloads::now_ms;
use labvisor_protocol::topics::JobId;

use crate::logfile::RotatingFile;

/// Size of one read from a pipe.
pub const READ_CHUNK: usize = 64 * 1024;

/// Where a chunk of output belongs on MQTT.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// `<sut>/output` only.
    Sut,
    /// `<sut>/output` and `<sut>/jobs/<id>/output`.
    Job(JobId),
}

/// A chunk of output on its way to MQTT.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// Where it goes.
    pub target: Target,
    /// The raw bytes.
    pub bytes: Bytes,
}

/// Container stdout and the rotating log file: the complete sinks.
pub struct Sinks {
    inner: Mutex<SinkInner>,
    /// ms since the epoch when the current write started; 0 when no write is under way.
    write_since_ms: AtomicU64,
    bytes: AtomicU64,
}

struct SinkInner {
    stdout: bool,
    file: Option<RotatingFile>,
    file_error: Option<String>,
}

impl Sinks {
    /// Sinks writing to stdout (when `stdout`) and to `file`.
    pub fn new(stdout: bool, file: Option<RotatingFile>) -> Self {
        Sinks {
            inner: Mutex::new(SinkInner {
                stdout,
                file,
                file_error: None,
            }),
            write_since_ms: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    /// Writes `bytes` to every sink. A failing sink is reported (see [`Sinks::error`]) and the
    /// others still get the bytes.
    pub fn write(&self, bytes: &[u8]) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        self.write_since_ms
            .store(now_ms().max(1), Ordering::Relaxed);
        if inner.stdout {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(bytes).and_then(|_| out.flush());
        }
        let mut failed = None;
        if let Some(f) = inner.file.as_mut() {
            if let Err(e) = f.write_all(bytes) {
                failed = Some(format!("cannot write {}: {e}", f.path().display()));
            }
        }
        if failed.is_some() {
            inner.file_error = failed;
        }
        self.write_since_ms.store(0, Ordering::Relaxed);
        self.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    }

    /// How long the write under way has been blocked, if one is.
    pub fn blocked_for(&self) -> Option<Duration> {
        match self.write_since_ms.load(Ordering::Relaxed) {
            0 => None,
            t => Some(Duration::from_millis(now_ms().saturating_sub(t))),
        }
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The last file error, if the log file cannot be written.
    pub fn error(&self) -> Option<String> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .file_error
            .clone()
    }

    /// Flushes and fsyncs the log file.
    pub fn sync(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = inner.file.as_mut() {
            let _ = f.sync();
        }
    }
}

/// The non-blocking hand-off from pump threads to the MQTT batcher: a queue bounded in bytes,
/// where consecutive chunks for the same target are merged. A writer never waits: when the
/// batcher is behind, small writes coalesce into one chunk, and only when the queue holds
/// `capacity` bytes is a chunk dropped (and counted).
#[derive(Clone)]
pub struct Tap {
    inner: Arc<TapInner>,
}

struct TapInner {
    queue: Mutex<TapQueue>,
    notify: tokio::sync::Notify,
    dropped: Arc<AtomicU64>,
    capacity: usize,
}

#[derive(Default)]
struct TapQueue {
    chunks: std::collections::VecDeque<(Target, bytes::BytesMut)>,
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
    at: std::time::Instant,
}

impl Bucket {
    fn new(rate: u64) -> Bucket {
        let rate = rate.max(1) as f64;
        Bucket {
            rate,
            tokens: rate,
            at: std::time::Instant::now(),
        }
    }

    fn take(&mut self, n: usize, now: std::time::Instant) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.rate);
        if self.tokens < 0.0 {
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
    /// drops and counts it if the queue is full.
    pub fn send(&self, chunk: Chunk) {
        let mut q = self.inner.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.closed {
            return;
        }
        let over_rate = |q: &mut TapQueue| {
            q.bucket
                .as_mut()
                .is_some_and(|b| !b.take(chunk.bytes.len(), std::time::Instant::now()))
        };
        if q.bytes + chunk.bytes.len() > self.inner.capacity || over_rate(&mut q) {
            drop(q);
            self.inner.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.bytes += chunk.bytes.len();
        match q.chunks.back_mut() {
            Some((t, buf)) if *t == chunk.target => buf.extend_from_slice(&chunk.bytes),
            _ => q
                .chunks
                .push_back((chunk.target, bytes::BytesMut::from(&chunk.bytes[..]))),
        }
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

    /// The shared drop counter.
    pub fn dropped_counter(&self) -> Arc<AtomicU64> {
        self.inner.dropped.clone()
    }

    /// Chunks dropped so far.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }
}

impl TapReceiver {
    /// Takes the oldest (merged) chunk without waiting.
    pub fn try_recv(&mut self) -> Option<Chunk> {
        let mut q = self.inner.queue.lock().unwrap_or_else(|p| p.into_inner());
        let (target, buf) = q.chunks.pop_front()?;
        q.bytes -= buf.len();
        Some(Chunk {
            target,
            bytes: buf.freeze(),
        })
    }

    /// Waits for the next (merged) chunk; `None` once the tap is closed and empty.
    pub async fn recv(&mut self) -> Option<Chunk> {
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

/// How far a pump got: bytes so far and when the last ones arrived (for `output_timeout`).
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes read so far.
    pub bytes: AtomicU64,
    /// ms since the epoch of the last read.
    pub last_ms: AtomicU64,
}

/// Reads `reader` to EOF on the calling thread, writing every chunk to `sinks` and `tap`.
/// Returns the number of bytes read.
pub fn pump(
    mut reader: impl Read,
    sinks: &Sinks,
    tap: &Tap,
    target: Target,
    progress: &Progress,
) -> u64 {
    let mut buf = vec![0u8; READ_CHUNK];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return total,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return total,
        };
        total += n as u64;
        progress.bytes.fetch_add(n as u64, Ordering::Relaxed);
        progress.last_ms.store(now_ms(), Ordering::Relaxed);
        sinks.write(&buf[..n]);
        tap.send(Chunk {
            target: target.clone(),
            bytes: Bytes::copy_from_slice(&buf[..n]),
        });
    }
}

/// Turns a byte stream into text batches for MQTT: lossy UTF-8 (a multi-byte character split
/// across chunks is kept whole), at most `max` bytes each, cut after a newline where possible.
#[derive(Debug)]
pub struct Batcher {
    max: usize,
    text: String,
    /// An incomplete UTF-8 sequence at the end of the bytes seen so far.
    tail: Vec<u8>,
}

impl Batcher {
    /// A batcher for batches of at most `max` bytes (at least 16).
    pub fn new(max: usize) -> Self {
        Batcher {
            max: max.max(16),
            text: String::new(),
            tail: Vec::new(),
        }
    }

    /// Whether text is waiting.
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// Adds bytes; returns the batches that became full.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut data = std::mem::take(&mut self.tail);
        data.extend_from_slice(bytes);
        // Keep an incomplete trailing sequence for the next push.
        let keep_from = incomplete_tail(&data);
        self.tail = data.split_off(keep_from);
        self.text.push_str(&String::from_utf8_lossy(&data));
        self.take(false)
    }

    /// The end of the batch that starts at `start`: at most `max` bytes, after the last newline
    /// in them if there is one, on a character boundary; the whole rest if it fits.
    fn boundary(&self, start: usize) -> usize {
        if self.text.len() - start <= self.max {
            return self.text.len();
        }
        let mut limit = start + self.max;
        while !self.text.is_char_boundary(limit) {
            limit -= 1;
        }
        self.text[start..limit]
            .rfind('\n')
            .map(|p| start + p + 1)
            .unwrap_or(limit)
    }

    /// Cuts right-sized batches by offset and drains the buffer once: linear in the text, and
    /// no batch keeps the capacity of a large backlog alive. With `all`, the rest goes too;
    /// without, only full batches.
    fn take(&mut self, all: bool) -> Vec<String> {
        let mut out = Vec::new();
        let mut start = 0;
        while self.text.len() - start >= self.max || (all && start < self.text.len()) {
            let end = self.boundary(start);
            out.push(self.text[start..end].to_owned());
            start = end;
        }
        self.text.drain(..start);
        if self.text.capacity() > self.max * 8 {
            self.text.shrink_to(self.max * 2);
        }
        out
    }

    /// Takes whatever text is waiting (the timer fired), as batches of at most `max` bytes. An
    /// incomplete trailing character stays for the next push.
    pub fn flush(&mut self) -> Vec<String> {
        self.take(true)
    }

    /// Takes everything, including an incomplete trailing character (lossy), at end of stream.
    pub fn finish(&mut self) -> Vec<String> {
        let tail = std::mem::take(&mut self.tail);
        self.text.push_str(&String::from_utf8_lossy(&tail));
        self.take(true)
    }
}

/// Where an incomplete UTF-8 sequence starts at the end of `data` (`data.len()` if none): a
/// leading byte followed by fewer continuation bytes than it announces.
fn incomplete_tail(data: &[u8]) -> usize {
    let len = data.len();
    for i in (len.saturating_sub(3)..len).rev() {
        let b = data[i];
        if b & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back
        }
        let need = match b {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return len,
        };
        return if len - i < need { i } else { len };
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cut_after_newlines_and_respect_the_limit() {
        let mut b = Batcher::new(16);
        let out = b.push(b"line one\nline two\nthree");
        assert_eq!(out, vec!["line one\n".to_string()]);
        assert_eq!(b.flush(), ["line two\nthree"]);
        assert!(b.flush().is_empty());
    }

    #[test]
    fn a_very_long_line_is_split_at_the_limit() {
        let mut b = Batcher::new(16);
        let out = b.push(&[b'x'; 40]);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|s| s.len() == 16));
        assert_eq!(b.flush().concat().len(), 8);
    }

    #[test]
    fn split_multibyte_characters_are_kept_whole() {
        let mut b = Batcher::new(1024);
        let s = "héllo €".as_bytes();
        for byte in s {
            assert!(b.push(&[*byte]).is_empty());
        }
        assert_eq!(b.flush(), ["héllo €"]);
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut b = Batcher::new(1024);
        b.push(b"ok \xff\xfe end\n");
        assert_eq!(b.flush(), ["ok \u{fffd}\u{fffd} end\n"]);
        // An incomplete sequence at the very end is held, then released lossily at finish.
        b.push(b"x\xe2\x82");
        assert_eq!(b.flush(), ["x"]);
        assert_eq!(b.finish(), ["\u{fffd}"]);
    }

    #[test]
    fn multibyte_text_never_exceeds_the_limit() {
        let mut b = Batcher::new(16);
        let text = "€".repeat(40);
        let mut got = String::new();
        for batch in b.push(text.as_bytes()) {
            assert!(batch.len() <= 16);
            got.push_str(&batch);
        }
        got.push_str(&b.flush().concat());
        assert_eq!(got, text);
    }

    #[test]
    fn a_large_backlog_is_cut_into_right_sized_batches_in_one_pass() {
        let mut b = Batcher::new(16 * 1024);
        let line = "a line of output that is about sixty bytes long, give or take\n";
        let text = line.repeat(4 * 1024 * 1024 / line.len());
        let batches = b.push(text.as_bytes());
        assert!(batches.len() > 200);
        for batch in &batches {
            assert!(batch.len() <= 16 * 1024 && batch.ends_with('\n'));
            assert!(
                batch.capacity() <= 16 * 1024,
                "a batch keeps only its own bytes"
            );
        }
        let rest = b.flush();
        assert_eq!(batches.concat() + &rest.concat(), text);
        assert!(
            b.text.capacity() <= 2 * 16 * 1024,
            "the backlog's buffer is released"
        );
    }

    #[test]
    fn finish_never_loses_text_over_the_limit() {
        let mut b = Batcher::new(16);
        b.push(b"0123456789abcde\xe2\x82");
        let out = b.finish();
        assert_eq!(out.concat(), "0123456789abcde\u{fffd}");
        assert!(out.iter().all(|s| s.len() <= 16), "{out:?}");
    }

    #[test]
    fn pump_writes_everything_to_the_file_and_drops_on_a_full_tap() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.log");
        let sinks = Sinks::new(false, Some(RotatingFile::open(&p, 1 << 30, 2).unwrap()));
        let (tap, mut rx) = Tap::new(2 * READ_CHUNK);
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let n = pump(&data[..], &sinks, &tap, Target::Sut, &Progress::default());
        assert_eq!(n, data.len() as u64);
        sinks.sync();
        assert_eq!(std::fs::read(&p).unwrap(), data);
        assert_eq!(sinks.bytes(), data.len() as u64);
        // A tap of 128 KiB: the first two 64 KiB reads merge into one chunk, the 14 others are
        // dropped and counted, and none blocked the pump.
        let merged = rx.try_recv().expect("one merged chunk");
        assert_eq!(merged.bytes.len(), 2 * READ_CHUNK);
        assert_eq!(&merged.bytes[..], &data[..2 * READ_CHUNK]);
        assert!(rx.try_recv().is_none());
        assert_eq!(tap.dropped(), 14);
        assert_eq!(sinks.blocked_for(), None);
    }

    #[test]
    fn bucket_passes_the_rate_with_one_second_of_burst() {
        let t0 = std::time::Instant::now();
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

    #[test]
    fn a_flood_over_the_rate_is_dropped_at_the_tap_and_the_file_gets_all() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.log");
        let sinks = Sinks::new(false, Some(RotatingFile::open(&p, 1 << 30, 2).unwrap()));
        // Room for everything, but 100 KiB/s: of 16 MiB written at once, the burst passes.
        let (tap, mut rx) = Tap::with_rate(64 << 20, Some(100 * 1024));
        let data = vec![b'x'; 16 << 20];
        pump(&data[..], &sinks, &tap, Target::Sut, &Progress::default());
        sinks.sync();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), data.len() as u64);
        let mut passed = 0;
        while let Some(c) = rx.try_recv() {
            passed += c.bytes.len();
        }
        assert!(
            (100 * 1024..=100 * 1024 + 2 * READ_CHUNK).contains(&passed),
            "about one second's worth passes, not {passed}"
        );
        assert!(tap.dropped() >= 200, "{}", tap.dropped());
    }
}
