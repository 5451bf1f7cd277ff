//! The outbox policy, pure (no I/O, no rumqttc): what is queued, what the overflow policy drops,
//! what counts against back-pressure, what is in flight, and what is replayed after a
//! connection error or a ConnAck. rumqttc keeps its `MqttState` apart from the network in the
//! same way; [`crate::state`] drives this from the link's events, and the tests below drive it
//! directly.
//!
//! An [`Entry`] goes through: the queue (FIFO, [`Outbox::push`] and friends) → handed to
//! rumqttc ([`Outbox::mark_handed`]) → written (QoS 0: done; QoS 1: in flight by packet id,
//! [`Outbox::written`]) → acknowledged ([`Outbox::acked`]). A connection error puts every entry
//! handed over and not done back at the front of the queue, in its original order
//! ([`Outbox::requeue`]); a ConnAck puts the latest value of every sticky topic at the very
//! front ([`Outbox::connected`]). See the crate documentation for the policy in prose.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

use crate::message::{Message, QoS};
use crate::options::DropHook;

/// Upper limit of QoS 1 publishes in flight (rumqttc's `outgoing_inflight_upper_limit`).
pub(crate) const INFLIGHT_UPPER_LIMIT: u16 = 32;

/// Whether an outbox entry may be dropped by the overflow policy, and how it is replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keep {
    /// An ordinary message: never dropped.
    No,
    /// Live output (`MqttLink::publish_output`): the only kind the overflow policy drops.
    Output,
    /// The current value of a sticky topic: at most one queued per topic, not requeued after an
    /// error (the ConnAck republishes the latest value).
    Sticky,
    /// A final message of `shutdown`.
    Final,
    /// A value of `MqttLink::publish_sticky`: sent in order like an event, never coalesced.
    Each,
}

/// One queued or in-flight message.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Order of acceptance: requeued entries are sorted by it.
    seq: u64,
    msg: Message,
    keep: Keep,
}

/// The queue, the sticky values and the messages handed to rumqttc.
#[derive(Debug)]
pub(crate) struct Outbox {
    queue: VecDeque<Entry>,
    capacity: usize,
    next_seq: u64,
    /// Latest payload per sticky topic, in first-set order.
    sticky: Vec<(String, Bytes)>,
    /// Handed to rumqttc's channel, not yet seen written (FIFO, matches `Outgoing::Publish`).
    handed: VecDeque<Entry>,
    /// QoS 1 publishes written, by packet id, awaiting PUBACK.
    inflight: HashMap<u16, Entry>,
    /// A publish rumqttc parked on a packet-id collision (should not happen: see `window`).
    collided: Option<Entry>,
    /// Max QoS 1 messages in `handed` + `inflight` + `collided`.
    window: usize,
    dropped: u64,
    coalesced: u64,
    on_drop: Option<DropHook>,
}

impl Outbox {
    /// An empty outbox holding up to `capacity` messages before output is dropped.
    pub(crate) fn new(capacity: usize, on_drop: Option<DropHook>) -> Self {
        Outbox {
            queue: VecDeque::new(),
            capacity,
            next_seq: 0,
            sticky: Vec::new(),
            handed: VecDeque::new(),
            inflight: HashMap::new(),
            collided: None,
            window: 1,
            dropped: 0,
            coalesced: 0,
            on_drop,
        }
    }

    fn entry(&mut self, msg: Message, keep: Keep) -> Entry {
        self.next_seq += 1;
        Entry {
            seq: self.next_seq,
            msg,
            keep,
        }
    }

    /// Queues `msg` at the back, then applies the overflow policy.
    pub(crate) fn push(&mut self, msg: Message, keep: Keep) {
        let e = self.entry(msg, keep);
        self.queue.push_back(e);
        self.enforce_capacity();
    }

    fn remember_sticky(&mut self, msg: &Message) {
        match self.sticky.iter_mut().find(|(t, _)| *t == msg.topic) {
            Some((_, p)) => *p = msg.payload.clone(),
            None => self.sticky.push((msg.topic.clone(), msg.payload.clone())),
        }
    }

    /// Sets the sticky value of `msg.topic`: replaces a queued value (coalesced), or queues it
    /// when `connected` (when not, the next ConnAck sends it).
    pub(crate) fn set_sticky(&mut self, msg: Message, connected: bool) {
        self.remember_sticky(&msg);
        let queued = self
            .queue
            .iter_mut()
            .find(|e| e.keep == Keep::Sticky && e.msg.topic == msg.topic);
        if let Some(e) = queued {
            e.msg.payload = msg.payload;
            self.coalesced += 1;
        } else if connected {
            let e = self.entry(msg, Keep::Sticky);
            self.queue.push_back(e);
        }
    }

    /// Queues a sticky value of which every value matters ([`Keep::Each`]).
    pub(crate) fn push_each(&mut self, msg: Message) {
        self.remember_sticky(&msg);
        let e = self.entry(msg, Keep::Each);
        self.queue.push_back(e);
    }

    /// Queues a final message of shutdown; it replaces the sticky value of its topic (which is
    /// forgotten, so no ConnAck republishes the old value after it).
    pub(crate) fn push_final(&mut self, msg: Message) {
        self.sticky.retain(|(t, _)| *t != msg.topic);
        self.queue
            .retain(|e| !(e.keep == Keep::Sticky && e.msg.topic == msg.topic));
        let e = self.entry(msg, Keep::Final);
        self.queue.push_back(e);
    }

    /// Drops the oldest live output ([`Keep::Output`], whatever its QoS) until the queue fits its
    /// capacity, or none is left: nothing else (acknowledgements, statuses) is ever dropped.
    fn enforce_capacity(&mut self) {
        while self.queue.len() > self.capacity {
            let victim = self.queue.iter().position(|e| e.keep == Keep::Output);
            let Some(i) = victim else { break };
            let e = self.queue.remove(i).expect("position is valid");
            self.dropped += 1;
            if let Some(hook) = &self.on_drop {
                hook.call(&e.msg);
            }
        }
    }

    /// QoS 1 messages waiting that are never dropped: output is excepted (it is dropped
    /// instead), and so are sticky state messages (at most one each).
    pub(crate) fn reliable_queued(&self) -> usize {
        self.queue
            .iter()
            .filter(|e| {
                e.msg.qos == QoS::AtLeastOnce && !matches!(e.keep, Keep::Sticky | Keep::Output)
            })
            .count()
    }

    /// Whether fewer than `capacity` reliable messages wait (see "Back-pressure").
    pub(crate) fn has_room(&self) -> bool {
        self.reliable_queued() < self.capacity
    }

    fn qos1_out(&self) -> usize {
        self.handed
            .iter()
            .chain(self.inflight.values())
            .chain(self.collided.iter())
            .filter(|e| e.msg.qos == QoS::AtLeastOnce)
            .count()
    }

    /// Removes the front message when it is over `limit` (the broker lowered its maximum after
    /// it was queued), and returns it.
    pub(crate) fn pop_oversize(&mut self, limit: usize) -> Option<Message> {
        if self.queue.front()?.msg.encoded_size() <= limit {
            return None;
        }
        self.queue.pop_front().map(|e| e.msg)
    }

    /// The next message to hand to rumqttc: the front one, unless it is QoS 1 and the in-flight
    /// window is full.
    pub(crate) fn sendable(&self) -> Option<&Message> {
        let front = &self.queue.front()?.msg;
        let blocked = front.qos == QoS::AtLeastOnce && self.qos1_out() >= self.window;
        (!blocked).then_some(front)
    }

    /// The front message was accepted by rumqttc's channel.
    pub(crate) fn mark_handed(&mut self) {
        if let Some(e) = self.queue.pop_front() {
            self.handed.push_back(e);
        }
    }

    /// rumqttc wrote a publish with packet id `pkid` (the oldest handed, or the collided one).
    /// Returns false when the link does not track it.
    pub(crate) fn written(&mut self, pkid: u16) -> bool {
        let entry = match self.collided.take() {
            Some(e) => Some(e),
            None => self.handed.pop_front(),
        };
        match entry {
            Some(e) if e.msg.qos == QoS::AtLeastOnce => {
                self.inflight.insert(pkid, e);
                true
            }
            Some(_) => true, // QoS 0: written, done
            None => false,
        }
    }

    /// rumqttc parked the oldest handed publish on a packet-id collision.
    pub(crate) fn collided(&mut self) {
        self.collided = self.handed.pop_front();
    }

    /// PUBACK for `pkid`; false when the link does not track it.
    pub(crate) fn acked(&mut self, pkid: u16) -> bool {
        self.inflight.remove(&pkid).is_some()
    }

    /// On ConnAck: sets the in-flight window from the broker's receive maximum, and puts the
    /// latest value of every sticky topic at the front, replacing queued values (a topic with a
    /// [`Keep::Each`] value still queued is skipped: that value is the latest, and goes out in
    /// order).
    pub(crate) fn connected(&mut self, receive_max: Option<u16>) {
        let receive_max = receive_max.unwrap_or(u16::MAX).min(INFLIGHT_UPPER_LIMIT);
        self.window = (receive_max as usize).saturating_sub(1).max(1);
        self.queue.retain(|e| e.keep != Keep::Sticky);
        let sticky = self.sticky.clone();
        for (topic, payload) in sticky.into_iter().rev() {
            let queued = |e: &Entry| e.keep == Keep::Each && e.msg.topic == topic;
            if self.queue.iter().any(queued) {
                continue;
            }
            let e = self.entry(Message::state(topic, payload), Keep::Sticky);
            self.queue.push_front(e);
        }
    }

    /// After a connection error: puts every message handed to rumqttc and not done back at the
    /// front of the queue, in its original order, then applies the overflow policy. `pending`
    /// holds the publishes rumqttc still had (its `pending` queue); those the link does not
    /// track (should not happen) are requeued first, unless they are sticky values. Sticky
    /// entries are not requeued: the ConnAck republishes their latest value. Returns how many
    /// were requeued and how many of them were unknown.
    pub(crate) fn requeue(&mut self, pending: Vec<Message>) -> Requeued {
        let mut tracked: Vec<Entry> = self.handed.drain(..).collect();
        tracked.extend(self.inflight.drain().map(|(_, e)| e));
        tracked.extend(self.collided.take());
        tracked.sort_by_key(|e| e.seq);
        let mut unmatched: Vec<bool> = vec![true; tracked.len()];
        let mut unknown = Vec::new();
        for m in pending {
            let found = tracked.iter().enumerate().position(|(i, e)| {
                unmatched[i]
                    && e.msg.topic == m.topic
                    && e.msg.payload == m.payload
                    && e.msg.retain == m.retain
            });
            match found {
                Some(i) => unmatched[i] = false,
                None => unknown.push(m),
            }
        }
        let unknown_count = unknown.len();
        let is_sticky = |m: &Message| m.retain && self.sticky.iter().any(|(t, _)| *t == m.topic);
        let unknown: Vec<Message> = unknown.into_iter().filter(|m| !is_sticky(m)).collect();
        let mut requeue: Vec<Entry> = unknown
            .into_iter()
            .map(|m| self.entry(m, Keep::No))
            .collect();
        requeue.extend(tracked.into_iter().filter(|e| e.keep != Keep::Sticky));
        let requeued = requeue.len();
        for e in requeue.into_iter().rev() {
            self.queue.push_front(e);
        }
        self.enforce_capacity();
        Requeued {
            requeued,
            unknown: unknown_count,
        }
    }

    /// Nothing queued, nothing in flight.
    pub(crate) fn drained(&self) -> bool {
        self.queue.is_empty()
            && self.handed.is_empty()
            && self.inflight.is_empty()
            && self.collided.is_none()
    }

    /// Messages queued, not yet handed to rumqttc.
    pub(crate) fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Messages handed to rumqttc and not yet acknowledged (QoS 1) or written (QoS 0).
    pub(crate) fn in_flight(&self) -> usize {
        self.handed.len() + self.inflight.len() + usize::from(self.collided.is_some())
    }

    /// Output messages dropped by the overflow policy.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Queued sticky values replaced by a newer one.
    pub(crate) fn coalesced(&self) -> u64 {
        self.coalesced
    }
}

/// What [`Outbox::requeue`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Requeued {
    /// Messages put back at the front of the queue.
    pub requeued: usize,
    /// Publishes rumqttc held that the link did not track.
    pub unknown: usize,
}

#[cfg(test)]
mod tests;
