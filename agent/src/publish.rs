//! Output on MQTT: the batcher between the [`Tap`](crate::tap::Tap) and the link.
//!
//! Every output topic (`<sut>/output`, and `<sut>/jobs/<id>/output` while a job runs) has a
//! [`TopicStream`] ([`stream`]): the pure part, which cuts whole lines into batches of at most [`BATCH_MAX`]
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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use labvisor_protocol::payloads::OutputMeta;
use labvisor_protocol::topics::Topics;
use labvisor_protocol::SutName;

use crate::mqtt::{DropHook, Message, MqttLink};
use crate::output::Target;
use crate::tap::{TapItem, TapReceiver};

pub mod stream;
pub use stream::{Out, TopicStream};

/// How often output batches go to MQTT at the latest.
pub const BATCH_EVERY: Duration = Duration::from_millis(50);
/// Largest output batch (payload bytes).
pub const BATCH_MAX: usize = crate::output::LINE_MAX;
/// Batches per topic waiting for the link; beyond it the oldest is dropped.
pub const PENDING_BATCHES: usize = 64;
/// Messages the link may hold (queued or unacknowledged, all topics) before output waits; at
/// most half the link's outbox, so output never crowds out acknowledgements and statuses.
pub const LINK_WINDOW: usize = 32;

/// One topic's stream in the batcher.
struct Topic {
    topic: String,
    target: Target,
    stream: TopicStream,
    due: Option<tokio::time::Instant>,
    ended: bool,
}

/// Output messages the link dropped from its outbox, as (topic, lines): filled by the link's
/// drop hook ([`Drops::hook`], for `LinkOptions::on_drop`), taken by the [`Batcher`].
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

/// The batcher: publishes the tap's output on MQTT (see the module documentation).
pub struct Batcher {
    /// The link (`None`: no broker; the output is drained and forgotten).
    pub link: Option<MqttLink>,
    /// The link's outbox size.
    pub queue_capacity: usize,
    /// Topic builder.
    pub topics: Topics,
    /// The SUT.
    pub sut: SutName,
    /// This agent run's id, in every message's [`OutputMeta`].
    pub boot: String,
    /// Lines lost on `<sut>/output` (the tap counts its own; the batcher adds its losses).
    pub dropped: Arc<AtomicU64>,
    /// What the link's `on_drop` hook fills.
    pub drops: Arc<Drops>,
}

/// The batcher at work: its streams, one per output topic.
struct Streams {
    cfg: Batcher,
    link: MqttLink,
    streams: Vec<Topic>,
    window: usize,
}

impl Batcher {
    /// Publishes the tap's output until the tap is closed and emptied.
    pub async fn run(self, mut rx: TapReceiver) {
        let Some(link) = self.link.clone() else {
            // No broker: drain and forget (stdout and the file already have everything).
            while rx.recv().await.is_some() {}
            return;
        };
        let window = LINK_WINDOW.min(self.queue_capacity / 2).max(1);
        let mut s = Streams {
            cfg: self,
            link,
            streams: Vec::new(),
            window,
        };
        let out_topic = s.cfg.topics.output(&s.cfg.sut);
        s.add(out_topic, Target::Sut);
        let mut state = s.link.watch_state();
        let mut open = true;
        loop {
            s.hand_off(!open);
            if !open {
                return;
            }
            let due = s.streams.iter().filter_map(|t| t.due).min();
            tokio::select! {
                item = rx.recv() => open = s.take(item),
                _ = async { tokio::time::sleep_until(due.expect("guarded")).await }, if due.is_some() => {
                    s.flush_due();
                }
                changed = state.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = s.cfg.drops.wake.notified() => {}
            }
        }
    }
}

impl Streams {
    /// A stream for `topic`, batches sized for what the link takes there.
    fn add(&mut self, topic: String, target: Target) {
        let max = BATCH_MAX.min(self.link.max_payload(&topic).saturating_sub(128));
        self.streams.push(Topic {
            stream: TopicStream::new(max, PENDING_BATCHES),
            topic,
            target,
            due: None,
            ended: false,
        });
    }

    /// Takes one item from the tap (`None`: the tap is closed and empty); returns whether the
    /// tap is still open.
    fn take(&mut self, item: Option<TapItem>) -> bool {
        let now = tokio::time::Instant::now();
        match item {
            None => {
                for t in self.streams.iter_mut() {
                    t.stream.flush();
                }
                return false;
            }
            Some(TapItem::Lines(chunk)) => {
                for t in self.targets(&chunk.target) {
                    t.stream.push(&chunk.text);
                    if t.stream.has_text() && t.due.is_none() {
                        t.due = Some(now + BATCH_EVERY);
                    }
                }
            }
            Some(TapItem::Lost { target, lines }) => {
                for t in self.targets(&target) {
                    t.stream.lose(lines);
                    // Reported by the next batch, or alone if none comes in time.
                    t.due.get_or_insert(now + BATCH_EVERY);
                }
            }
            Some(TapItem::End(target)) => {
                if let Some(t) = self.streams.iter_mut().find(|t| t.target == target) {
                    t.stream.flush();
                    t.due = None;
                    t.ended = true;
                }
            }
        }
        true
    }

    /// Cuts the batches whose time is up.
    fn flush_due(&mut self) {
        let now = tokio::time::Instant::now();
        for t in self.streams.iter_mut() {
            if t.due.is_some_and(|d| d <= now) {
                t.stream.flush();
                t.due = None;
            }
        }
    }

    /// The streams a chunk for `target` goes to: `<sut>/output`, and the job's topic (created
    /// on first use).
    fn targets(&mut self, target: &Target) -> impl Iterator<Item = &mut Topic> {
        if let Target::Job(id) = target {
            if !self.streams.iter().any(|t| t.target == *target) {
                let topic = self.cfg.topics.job_output(&self.cfg.sut, id);
                self.add(topic, target.clone());
            }
        }
        let target = target.clone();
        self.streams
            .iter_mut()
            .filter(move |t| t.target == Target::Sut || t.target == target)
    }

    /// Counts what the link dropped, hands messages to the link, one per topic in turn, while it
    /// holds fewer than `window` (or all of them, at the end), counts what the streams dropped,
    /// and forgets the streams of ended jobs once they are idle.
    fn hand_off(&mut self, all: bool) {
        for (topic, lines) in self.cfg.drops.take() {
            if let Some(t) = self.streams.iter_mut().find(|t| t.topic == topic) {
                t.stream.evicted(lines);
                if t.target == Target::Sut {
                    self.cfg.dropped.fetch_add(lines, Ordering::Relaxed);
                }
            }
        }
        self.publish(all);
        if let Some(t) = self.streams.iter_mut().find(|t| t.target == Target::Sut) {
            let lost = t.stream.take_discarded();
            self.cfg.dropped.fetch_add(lost, Ordering::Relaxed);
        }
        self.streams.retain(|t| !(t.ended && t.stream.is_idle()));
    }

    fn publish(&mut self, all: bool) {
        let st = self.link.state();
        let mut room = self.window.saturating_sub(st.queued + st.in_flight);
        loop {
            let mut any = false;
            for t in self.streams.iter_mut() {
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
                    boot: self.cfg.boot.clone(),
                };
                let _ = self.link.publish_output(
                    Message::event(t.topic.clone(), Bytes::from(out.text))
                        .with_properties(meta.to_properties()),
                );
            }
            if !any {
                return;
            }
        }
    }
}
