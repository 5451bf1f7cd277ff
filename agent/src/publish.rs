//! Output on MQTT: the batcher between the [`Tap`](crate::tap::Tap) and the link.
//!
//! Every output topic (`<sut>/output`, and `<sut>/jobs/<id>/output` while a job runs) has a
//! [`TopicStream`]: the pure part, which cuts whole lines into batches of at most [`BATCH_MAX`]
//! bytes, keeps a bounded queue of batches waiting for the link, and numbers what it hands out.
//! Each message carries MQTT 5 user properties ([`OutputMeta`]): `seq`, which counts messages
//! per topic from 0 for each agent run (`boot`), and `dropped`, the lines lost on this topic so
//! far. Every loss makes the next message's `seq` jump, and `dropped` grows by the lines lost:
//!
//! - lines dropped at the tap (the queue was full, or the output ran over `log.mqtt_rate`);
//! - batches dropped here, oldest first, when more than [`PENDING_BATCHES`] wait because the
//!   link is slow or the broker stalled or gone;
//! - a message the link dropped from its outbox after taking it (its `seq` is missing; the
//!   next message's `dropped` counts its lines).
//!
//! When a loss is not followed by more output, a message with an empty payload reports it.
//!
//! Output is published with QoS 1, and only while the link holds fewer than [`LINK_WINDOW`]
//! messages: the broker acknowledges each batch, a batch not acknowledged when the connection
//! breaks is sent again (a consumer may see a `seq` twice), and the backlog of a slow or absent
//! broker stays here, where dropping it is counted, instead of vanishing in a socket buffer.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use labvisor_mqtt::{DropHook, Message, MqttLink};
use labvisor_protocol::payloads::OutputMeta;
use labvisor_protocol::topics::Topics;
use labvisor_protocol::SutName;

use crate::output::Target;
use crate::tap::{TapItem, TapReceiver};

/// How often output batches go to MQTT at the latest.
pub const BATCH_EVERY: Duration = Duration::from_millis(50);
/// Largest output batch (payload bytes).
pub const BATCH_MAX: usize = crate::output::LINE_MAX;
/// Batches per topic waiting for the link; beyond it the oldest is dropped.
pub const PENDING_BATCHES: usize = 64;
/// Messages the link may hold (queued or unacknowledged, all topics) before output waits; at
/// most half the link's outbox, so output never crowds out acknowledgements and statuses.
pub const LINK_WINDOW: usize = 32;

/// One output message, as [`TopicStream::next`] hands it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Out {
    /// Its sequence number on the topic.
    pub seq: u64,
    /// Lines lost on the topic before it.
    pub dropped: u64,
    /// Whole lines (empty: the message only reports a loss).
    pub text: String,
    /// How many lines.
    pub lines: u64,
}

#[derive(Debug)]
enum Item {
    Batch(String, u64),
    Lost(u64),
}

/// The batching, dropping and numbering of one output topic (pure: no I/O, no clock).
#[derive(Debug)]
pub struct TopicStream {
    max: usize,
    cap: usize,
    /// Whole lines not yet cut into a batch.
    text: String,
    lines: u64,
    queue: VecDeque<Item>,
    batches: usize,
    next_seq: u64,
    /// Lines lost before the next message.
    dropped: u64,
    /// `dropped` of the last message handed out.
    reported: u64,
    /// A loss since the last message: the next one skips a `seq`.
    jump: bool,
    /// Lines of the batches dropped here, not yet taken by [`TopicStream::take_discarded`].
    discarded: u64,
    /// [`TopicStream::flush`] was called since the last line or loss came: a loss may be
    /// reported alone.
    flushed: bool,
}

impl TopicStream {
    /// A stream of batches of at most `max` bytes (at least 64) with at most `cap` batches
    /// waiting.
    pub fn new(max: usize, cap: usize) -> Self {
        TopicStream {
            max: max.max(64),
            cap: cap.max(1),
            text: String::new(),
            lines: 0,
            queue: VecDeque::new(),
            batches: 0,
            next_seq: 0,
            dropped: 0,
            reported: 0,
            jump: false,
            discarded: 0,
            flushed: false,
        }
    }

    /// Adds whole lines (each ending with a newline). Full batches are cut at line boundaries;
    /// a line longer than a batch is split into pieces ending with the split marker.
    pub fn push(&mut self, text: &str) {
        for line in text.split_inclusive('\n') {
            if line.len() <= self.max {
                self.add_line(line);
            } else {
                let mut pieces = String::new();
                let body = line.strip_suffix('\n').unwrap_or(line);
                push_pieces(&mut pieces, body, self.max);
                for piece in pieces.split_inclusive('\n') {
                    self.add_line(piece);
                }
            }
        }
    }

    fn add_line(&mut self, line: &str) {
        self.flushed = false;
        if self.text.len() + line.len() > self.max {
            self.cut();
        }
        self.text.push_str(line);
        self.lines += 1;
    }

    /// Cuts what is waiting into a batch, and lets [`TopicStream::next`] report a loss that no
    /// batch follows (the timer fired, or the stream ends).
    pub fn flush(&mut self) {
        self.cut();
        self.flushed = true;
    }

    /// Cuts what is waiting into a batch (it is full, or a loss must be placed after it).
    fn cut(&mut self) {
        if self.text.is_empty() {
            return;
        }
        let text = std::mem::take(&mut self.text);
        let lines = std::mem::take(&mut self.lines);
        self.queue.push_back(Item::Batch(text, lines));
        self.batches += 1;
        while self.batches > self.cap {
            self.drop_oldest();
        }
    }

    /// `lines` were lost at this point of the stream, before they reached it.
    pub fn lose(&mut self, lines: u64) {
        if lines == 0 {
            return;
        }
        self.cut();
        self.push_lost(lines);
        self.flushed = false;
    }

    /// A message handed out earlier, holding `lines`, was lost afterwards: its `seq` is missing,
    /// and the next message counts its lines.
    pub fn evicted(&mut self, lines: u64) {
        self.dropped += lines;
    }

    fn push_lost(&mut self, lines: u64) {
        match self.queue.back_mut() {
            Some(Item::Lost(n)) => *n += lines,
            _ => self.queue.push_back(Item::Lost(lines)),
        }
    }

    fn drop_oldest(&mut self) {
        let Some(i) = self
            .queue
            .iter()
            .position(|it| matches!(it, Item::Batch(..)))
        else {
            return;
        };
        let Some(Item::Batch(_, lines)) = self.queue.remove(i) else {
            return;
        };
        self.batches -= 1;
        self.discarded += lines;
        // Put a loss record in its place, merged with its neighbours.
        let mut n = lines;
        if let Some(Item::Lost(m)) = self.queue.get(i) {
            n += m;
            self.queue.remove(i);
        }
        if i > 0 {
            if let Some(Item::Lost(m)) = self.queue.get_mut(i - 1) {
                *m += n;
                return;
            }
        }
        self.queue.insert(i, Item::Lost(n));
    }

    /// The next message to publish, if any: the oldest waiting batch, or, when nothing waits
    /// after a [`TopicStream::flush`] and a loss was not reported yet, an empty message that
    /// reports it.
    pub fn next_message(&mut self) -> Option<Out> {
        while let Some(item) = self.queue.pop_front() {
            match item {
                Item::Lost(n) => {
                    self.dropped += n;
                    self.jump = true;
                }
                Item::Batch(text, lines) => {
                    self.batches -= 1;
                    return Some(self.emit(text, lines));
                }
            }
        }
        if self.flushed && self.dropped != self.reported && self.text.is_empty() {
            return Some(self.emit(String::new(), 0));
        }
        None
    }

    fn emit(&mut self, text: String, lines: u64) -> Out {
        if self.jump {
            self.next_seq += 1;
            self.jump = false;
        }
        let out = Out {
            seq: self.next_seq,
            dropped: self.dropped,
            text,
            lines,
        };
        self.next_seq += 1;
        self.reported = self.dropped;
        out
    }

    /// Lines of the batches this stream dropped since the last call.
    pub fn take_discarded(&mut self) -> u64 {
        std::mem::take(&mut self.discarded)
    }

    /// Nothing waits and every loss was reported.
    pub fn is_idle(&self) -> bool {
        self.text.is_empty() && self.queue.is_empty() && self.dropped == self.reported
    }

    /// Whether whole lines wait for the timer.
    pub fn has_text(&self) -> bool {
        !self.text.is_empty()
    }
}

/// Splits `line` (without its newline) into pieces of at most `max` bytes with the split marker.
fn push_pieces(out: &mut String, line: &str, max: usize) {
    let marker = crate::output::SPLIT_MARKER;
    let room = max.saturating_sub(marker.len() + 1).max(4);
    let mut rest = line;
    while rest.len() + 1 > max {
        let mut cut = room.min(rest.len());
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        out.push_str(&rest[..cut]);
        out.push_str(marker);
        out.push('\n');
        rest = &rest[cut..];
    }
    out.push_str(rest);
    out.push('\n');
}

/// One topic's stream in the batcher.
struct Topic {
    topic: String,
    target: Target,
    stream: TopicStream,
    due: Option<tokio::time::Instant>,
    ended: bool,
}

/// Output messages the link dropped from its outbox, as (topic, lines): filled by the link's
/// drop hook ([`Drops::hook`], for `LinkOptions::on_drop`), taken by [`run`].
#[derive(Default)]
pub struct Drops {
    lost: Mutex<Vec<(String, u64)>>,
    wake: tokio::sync::Notify,
}

impl Drops {
    /// The hook to set as the link's `on_drop`.
    pub fn hook(self: &Arc<Self>) -> DropHook {
        let me = self.clone();
        DropHook::new(move |m: &Message| {
            if OutputMeta::from_properties(&m.user_properties).is_some() {
                let lines = m.payload.iter().filter(|b| **b == b'\n').count() as u64;
                me.lost
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((m.topic.clone(), lines));
                me.wake.notify_one();
            }
        })
    }

    fn take(&self) -> Vec<(String, u64)> {
        std::mem::take(&mut *self.lost.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Publishes the tap's output on MQTT until the tap is closed and emptied (see the module
/// documentation). `dropped` counts the lines lost on `<sut>/output` (the tap counts its own);
/// `queue_capacity` is the link's outbox size; `drops` is what the link's `on_drop` hook fills.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    mut rx: TapReceiver,
    link: Option<MqttLink>,
    queue_capacity: usize,
    topics: Topics,
    sut: SutName,
    boot: String,
    dropped: Arc<AtomicU64>,
    drops: Arc<Drops>,
) {
    let Some(link) = link else {
        // No broker: drain and forget (stdout and the file already have everything).
        while rx.recv().await.is_some() {}
        return;
    };
    let max_for = |topic: &str| BATCH_MAX.min(link.max_payload(topic).saturating_sub(128));
    let out_topic = topics.output(&sut);
    let mut streams = vec![Topic {
        stream: TopicStream::new(max_for(&out_topic), PENDING_BATCHES),
        topic: out_topic,
        target: Target::Sut,
        due: None,
        ended: false,
    }];
    let window = LINK_WINDOW.min(queue_capacity / 2).max(1);
    let mut state = link.watch_state();
    let mut open = true;
    loop {
        for (topic, lines) in drops.take() {
            if let Some(t) = streams.iter_mut().find(|t| t.topic == topic) {
                t.stream.evicted(lines);
                if t.target == Target::Sut {
                    dropped.fetch_add(lines, Ordering::Relaxed);
                }
            }
        }
        hand_off(&link, &mut streams, &boot, window, !open);
        if let Some(t) = streams.iter_mut().find(|t| t.target == Target::Sut) {
            dropped.fetch_add(t.stream.take_discarded(), Ordering::Relaxed);
        }
        streams.retain(|t| !(t.ended && t.stream.is_idle()));
        if !open {
            return;
        }
        let due = streams.iter().filter_map(|t| t.due).min();
        tokio::select! {
            item = rx.recv() => match item {
                None => {
                    open = false;
                    for t in streams.iter_mut() {
                        t.stream.flush();
                    }
                }
                Some(TapItem::Lines(chunk)) => {
                    for t in targets(&mut streams, &chunk.target, &topics, &sut, &max_for) {
                        t.stream.push(&chunk.text);
                        if t.stream.has_text() && t.due.is_none() {
                            t.due = Some(tokio::time::Instant::now() + BATCH_EVERY);
                        }
                    }
                }
                Some(TapItem::Lost { target, lines }) => {
                    for t in targets(&mut streams, &target, &topics, &sut, &max_for) {
                        t.stream.lose(lines);
                        // Reported by the next batch, or alone if none comes in time.
                        t.due.get_or_insert(tokio::time::Instant::now() + BATCH_EVERY);
                    }
                }
                Some(TapItem::End(target)) => {
                    if let Some(t) = streams.iter_mut().find(|t| t.target == target) {
                        t.stream.flush();
                        t.due = None;
                        t.ended = true;
                    }
                }
            },
            _ = async { tokio::time::sleep_until(due.expect("guarded")).await }, if due.is_some() => {
                let now = tokio::time::Instant::now();
                for t in streams.iter_mut() {
                    if t.due.is_some_and(|d| d <= now) {
                        t.stream.flush();
                        t.due = None;
                    }
                }
            }
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = drops.wake.notified() => {}
        }
    }
}

/// The streams a chunk for `target` goes to: `<sut>/output`, and the job's topic (created on
/// first use).
fn targets<'a>(
    streams: &'a mut Vec<Topic>,
    target: &Target,
    topics: &Topics,
    sut: &SutName,
    max_for: &dyn Fn(&str) -> usize,
) -> impl Iterator<Item = &'a mut Topic> {
    if let Target::Job(id) = target {
        if !streams.iter().any(|t| t.target == *target) {
            let topic = topics.job_output(sut, id);
            streams.push(Topic {
                stream: TopicStream::new(max_for(&topic), PENDING_BATCHES),
                topic,
                target: target.clone(),
                due: None,
                ended: false,
            });
        }
    }
    let target = target.clone();
    streams
        .iter_mut()
        .filter(move |t| t.target == Target::Sut || t.target == target)
}

/// Hands messages to the link, one per topic in turn, while it holds fewer than `window`
/// (or all of them, at the end).
fn hand_off(link: &MqttLink, streams: &mut [Topic], boot: &str, window: usize, all: bool) {
    let st = link.state();
    let mut room = window.saturating_sub(st.queued + st.in_flight);
    loop {
        let mut any = false;
        for t in streams.iter_mut() {
            if room == 0 && !all {
                return;
            }
            let Some(out) = t.stream.next_message() else {
                continue;
            };
            any = true;
            room = room.saturating_sub(1);
            let meta = OutputMeta {
                seq: out.seq,
                dropped: out.dropped,
                boot: boot.to_owned(),
            };
            let _ = link.publish_output(
                Message::event(t.topic.clone(), Bytes::from(out.text))
                    .with_properties(meta.to_properties()),
            );
        }
        if !any {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(from: usize, n: usize) -> String {
        (from..from + n).map(|i| format!("L{i}\n")).collect()
    }

    fn all(s: &mut TopicStream) -> Vec<Out> {
        std::iter::from_fn(|| s.next_message()).collect()
    }

    /// What a consumer can check: every line once, in order; a `seq` jump exactly where
    /// lines were lost, and `dropped` growing by exactly the lines lost there.
    fn check(outs: &[Out], total: usize) {
        let mut expect = 0usize;
        let mut last: Option<&Out> = None;
        for o in outs {
            let lost_before = o.dropped - last.map_or(0, |l| l.dropped);
            let next_seq = last.map_or(0, |l| l.seq + 1);
            if lost_before > 0 {
                assert!(o.seq > next_seq, "a loss without a seq jump at {o:?}");
            } else {
                assert_eq!(o.seq, next_seq, "a seq jump without a loss at {o:?}");
            }
            expect += lost_before as usize;
            assert_eq!(o.lines, o.text.matches('\n').count() as u64);
            for l in o.text.lines() {
                assert_eq!(l, format!("L{expect}"), "a line out of place");
                expect += 1;
            }
            last = Some(o);
        }
        assert_eq!(expect, total, "received + dropped must be every line");
    }

    #[test]
    fn batches_end_at_line_boundaries_within_the_limit() {
        let mut s = TopicStream::new(100, 1000);
        s.push(&lines(0, 1000));
        s.flush();
        let outs = all(&mut s);
        assert!(outs.len() > 40, "{} batches", outs.len());
        for o in &outs {
            assert!(o.text.len() <= 100 && o.text.ends_with('\n'), "{o:?}");
        }
        check(&outs, 1000);
        assert!(outs.iter().all(|o| o.dropped == 0));
        assert!(s.is_idle());
    }

    #[test]
    fn a_loss_is_a_seq_jump_in_its_place_and_dropped_counts_its_lines() {
        let mut s = TopicStream::new(1000, 1000);
        s.push(&lines(0, 10));
        s.lose(5);
        s.push(&lines(15, 10));
        s.flush();
        let outs = all(&mut s);
        assert_eq!(
            outs.iter()
                .map(|o| (o.seq, o.dropped, o.lines))
                .collect::<Vec<_>>(),
            [(0, 0, 10), (2, 5, 10)]
        );
        check(&outs, 25);
    }

    #[test]
    fn a_loss_at_the_end_is_reported_by_an_empty_message() {
        let mut s = TopicStream::new(1000, 1000);
        s.push(&lines(0, 3));
        s.flush();
        assert_eq!(s.next_message().unwrap().seq, 0);
        s.lose(7);
        assert!(!s.is_idle());
        assert!(
            s.next_message().is_none(),
            "a batch may still come to report it"
        );
        s.flush();
        let notice = s.next_message().unwrap();
        assert_eq!(
            (notice.seq, notice.dropped, notice.text.as_str()),
            (2, 7, "")
        );
        assert!(s.next_message().is_none());
        assert!(s.is_idle());
    }

    #[test]
    fn a_backlog_over_the_cap_drops_the_oldest_batches_whole() {
        let mut s = TopicStream::new(64, 4);
        s.push(&lines(0, 300));
        s.flush();
        let discarded = s.take_discarded();
        let outs = all(&mut s);
        // Only 4 batches wait; the lines of the others were dropped here, counted.
        assert_eq!(outs.len(), 4);
        assert!(discarded > 0);
        assert_eq!(outs[0].dropped, discarded);
        check(&outs, 300);
    }

    #[test]
    fn a_message_evicted_after_hand_off_is_counted_by_the_next() {
        let mut s = TopicStream::new(1000, 1000);
        s.push(&lines(0, 4));
        s.flush();
        let first = s.next_message().unwrap();
        s.evicted(first.lines);
        s.push(&lines(4, 2));
        s.flush();
        let next = s.next_message().unwrap();
        // Its seq follows (the evicted message's own seq is the gap), dropped counts it.
        assert_eq!((next.seq, next.dropped), (1, 4));
        s.evicted(2);
        s.flush();
        let notice = s.next_message().unwrap();
        assert_eq!((notice.seq, notice.dropped, notice.lines), (2, 6, 0));
    }

    #[test]
    fn a_line_longer_than_a_batch_is_split_with_the_marker() {
        let mut s = TopicStream::new(100, 100);
        let long = "x".repeat(250);
        s.push(&format!("{long}\nshort\n"));
        s.flush();
        let text: String = all(&mut s).into_iter().map(|o| o.text).collect();
        let got: Vec<&str> = text.lines().collect();
        let marker = crate::output::SPLIT_MARKER;
        let (short, pieces) = got.split_last().unwrap();
        assert_eq!(*short, "short");
        let (last, marked) = pieces.split_last().unwrap();
        assert!(marked.len() >= 3);
        assert!(marked.iter().all(|l| l.ends_with(marker) && l.len() < 100));
        let mut joined: String = marked
            .iter()
            .map(|l| l.strip_suffix(marker).unwrap())
            .collect();
        joined.push_str(last);
        assert_eq!(joined, long);
    }

    /// Random interleavings of output, losses at the tap, slow hand-off and evictions.
    #[test]
    fn any_mix_of_losses_keeps_the_books_exact() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..200 {
            let mut s = TopicStream::new(rng.usize(64..400), rng.usize(1..8));
            let mut outs = Vec::new();
            let mut n = 0;
            for _ in 0..rng.usize(1..60) {
                match rng.u8(0..10) {
                    0..=4 => {
                        let k = rng.usize(1..40);
                        s.push(&lines(n, k));
                        n += k;
                    }
                    5 => {
                        let k = rng.usize(1..40);
                        s.lose(k as u64);
                        n += k;
                    }
                    6 => s.flush(),
                    _ => {
                        for _ in 0..rng.usize(0..4) {
                            outs.extend(s.next_message());
                        }
                    }
                }
            }
            s.flush();
            outs.extend(all(&mut s));
            check(&outs, n);
        }
    }
}
