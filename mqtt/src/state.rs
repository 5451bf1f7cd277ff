//! The link's state, pure: the [`Outbox`] plus the connection's own bookkeeping
//! (subscriptions to re-issue, acks to send, connection epoch, effective packet limit, shutdown
//! progress, counters), and [`LinkCore::pump`], which moves what may go out into a [`Sink`]
//! without ever blocking. The handles ([`crate::MqttLink`]) and the polling task share one
//! `LinkCore` behind a mutex; the sink is rumqttc's `AsyncClient` (its `try_*` calls) in
//! production and a fake in the tests, so every rule here is tested without a broker.

use std::collections::VecDeque;

use tokio::time::Instant;
use tracing::warn;

use crate::error::{AckError, PublishError};
use crate::message::{valid_topic, Message, Publish, QoS, Received, PUBLISH_OVERHEAD};
use crate::options::DropHook;
use crate::outbox::{Keep, Outbox, Requeued};

/// Where [`LinkCore::pump`] puts what goes out: rumqttc's request channel. Each call returns
/// false when the channel is full (nothing was taken; the next event pumps again).
pub(crate) trait Sink {
    /// Acknowledges an incoming QoS 1 publish.
    fn ack(&self, p: &Publish) -> bool;
    /// Subscribes.
    fn subscribe(&self, sub: &Subscription) -> bool;
    /// Unsubscribes.
    fn unsubscribe(&self, filter: &str) -> bool;
    /// Publishes.
    fn publish(&self, m: &Message) -> bool;
    /// Sends DISCONNECT.
    fn disconnect(&self) -> bool;
}

/// A subscription, re-issued on every ConnAck.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Subscription {
    /// Topic filter.
    pub filter: String,
    /// Maximum QoS.
    pub qos: QoS,
    /// MQTT 5 retain-as-published.
    pub as_published: bool,
}

/// Whether `filter` is a topic filter the broker can take (MQTT's rules, and no NUL).
fn usable_filter(filter: &str) -> bool {
    rumqttc::v5::mqttbytes::valid_filter(filter) && !filter.contains('\0')
}

/// A change of the subscriptions waiting for the sink, in the order it was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SubChange {
    /// SUBSCRIBE.
    Subscribe(Subscription),
    /// UNSUBSCRIBE from a filter.
    Unsubscribe(String),
}

/// A snapshot of the link, published through a `tokio::sync::watch` channel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkState {
    /// A ConnAck was received and the connection has not failed since.
    pub connected: bool,
    /// Successful ConnAcks since start.
    pub connects: u64,
    /// Connection errors (failed attempts and lost connections), each followed by a backoff.
    pub errors: u64,
    /// Output messages (`MqttLink::publish_output`) dropped by the overflow policy; nothing
    /// else is dropped.
    pub dropped: u64,
    /// Queued sticky messages replaced by a newer value for the same topic before being sent.
    pub coalesced: u64,
    /// Messages refused (or, after the broker lowered its limit, discarded) as oversize.
    pub refused_oversize: u64,
    /// Messages in the outbox, not yet handed to rumqttc.
    pub queued: usize,
    /// Messages handed to rumqttc and not yet acknowledged (QoS 1) or written (QoS 0).
    pub in_flight: usize,
    /// The last connection error, kept after reconnecting.
    pub last_error: Option<String>,
    /// QoS 1 messages other than output and sticky states waiting in the outbox (see
    /// "Back-pressure" in the crate documentation).
    pub reliable_queued: usize,
    /// SUBACKs received on the current connection (0 again at every ConnAck, when the
    /// subscriptions are re-issued in the order they were made). A broker that answers
    /// subscriptions in order, as mosquitto does, has sent every retained message of the
    /// earlier subscriptions before the SUBACK of a later one; at QoS 0 nothing is held back
    /// for acknowledgements, so a QoS 0 subscriber has them all once it sees the SUBACK of its
    /// last subscription (what `labvisor status` waits for).
    pub subacks: u64,
}

/// State shared by the handles and the polling task.
#[derive(Debug)]
pub(crate) struct LinkCore {
    pub(crate) outbox: Outbox,
    subscriptions: Vec<Subscription>,
    subs_to_send: VecDeque<SubChange>,
    acks: VecDeque<Publish>,
    connected: bool,
    epoch: u64,
    /// Our maximum packet size.
    max_packet_size: usize,
    /// Effective maximum packet size: ours, or the broker's when smaller.
    limit: usize,
    closing: Option<Instant>,
    /// SUBACKs on the current connection.
    subacks: u64,
    disconnect_sent: bool,
    closed: bool,
    connects: u64,
    errors: u64,
    refused_oversize: u64,
    last_error: Option<String>,
    /// The polling task waits for room in the incoming channel.
    delivery_blocked: bool,
}

impl LinkCore {
    /// A disconnected link with an empty outbox of `capacity`.
    pub(crate) fn new(capacity: usize, max_packet_size: usize, on_drop: Option<DropHook>) -> Self {
        LinkCore {
            outbox: Outbox::new(capacity, on_drop),
            subscriptions: Vec::new(),
            subs_to_send: VecDeque::new(),
            acks: VecDeque::new(),
            connected: false,
            epoch: 0,
            max_packet_size,
            limit: max_packet_size,
            closing: None,
            subacks: 0,
            disconnect_sent: false,
            closed: false,
            connects: 0,
            errors: 0,
            refused_oversize: 0,
            last_error: None,
            delivery_blocked: false,
        }
    }

    /// Whether the application may take more incoming work (see "Back-pressure"): always while
    /// the task waits for it to take a message (waiting for room then would deadlock).
    pub(crate) fn has_room(&self) -> bool {
        self.delivery_blocked || self.outbox.has_room()
    }

    /// The checks every outgoing message passes before it is queued: a valid topic, a link that
    /// is not shut down (final messages pass while closing), and the size cap (counted).
    fn admit(&mut self, msg: &Message, keep: Keep) -> Result<(), PublishError> {
        if !valid_topic(&msg.topic) {
            return Err(PublishError::InvalidTopic(msg.topic.clone()));
        }
        if self.closed || (self.closing.is_some() && keep != Keep::Final) {
            return Err(PublishError::Closed);
        }
        let size = msg.encoded_size();
        if size > self.limit {
            self.refused_oversize += 1;
            return Err(PublishError::Oversize {
                topic: msg.topic.clone(),
                size,
                max: self.limit,
            });
        }
        Ok(())
    }

    /// Queues `msg` (an ordinary message or output) and pumps.
    pub(crate) fn publish(
        &mut self,
        msg: Message,
        keep: Keep,
        sink: &impl Sink,
    ) -> Result<(), PublishError> {
        self.admit(&msg, keep)?;
        self.outbox.push(msg, keep);
        self.pump(sink);
        Ok(())
    }

    /// Sets the sticky value of a topic (see `MqttLink::set_sticky`) and pumps.
    pub(crate) fn set_sticky(
        &mut self,
        msg: Message,
        sink: &impl Sink,
    ) -> Result<(), PublishError> {
        self.admit(&msg, Keep::Sticky)?;
        self.outbox.set_sticky(msg, self.connected);
        self.pump(sink);
        Ok(())
    }

    /// Queues a sticky value of which every value matters (see `MqttLink::publish_sticky`).
    pub(crate) fn publish_each(
        &mut self,
        msg: Message,
        sink: &impl Sink,
    ) -> Result<(), PublishError> {
        self.admit(&msg, Keep::Each)?;
        self.outbox.push_each(msg);
        self.pump(sink);
        Ok(())
    }

    /// Registers (or updates) a subscription, sent now when connected and after every ConnAck.
    pub(crate) fn subscribe(
        &mut self,
        sub: Subscription,
        sink: &impl Sink,
    ) -> Result<(), PublishError> {
        if !usable_filter(&sub.filter) {
            return Err(PublishError::InvalidTopic(sub.filter));
        }
        if self.closed || self.closing.is_some() {
            return Err(PublishError::Closed);
        }
        match self
            .subscriptions
            .iter_mut()
            .find(|s| s.filter == sub.filter)
        {
            Some(s) => *s = sub.clone(),
            None => self.subscriptions.push(sub.clone()),
        }
        if self.connected {
            self.subs_to_send.push_back(SubChange::Subscribe(sub));
            self.pump(sink);
        }
        Ok(())
    }

    /// Forgets the subscription to `filter` (no longer re-issued) and unsubscribes from it,
    /// now when connected, else on the next connection (a persistent session keeps it on the
    /// broker meanwhile). Unsubscribing from a filter never subscribed is no error.
    pub(crate) fn unsubscribe(
        &mut self,
        filter: String,
        sink: &impl Sink,
    ) -> Result<(), PublishError> {
        if !usable_filter(&filter) {
            return Err(PublishError::InvalidTopic(filter));
        }
        if self.closed || self.closing.is_some() {
            return Err(PublishError::Closed);
        }
        self.subscriptions.retain(|s| s.filter != filter);
        self.subs_to_send.push_back(SubChange::Unsubscribe(filter));
        self.pump(sink);
        Ok(())
    }

    /// Acknowledges `received` (with manual acks): only on the connection it arrived on.
    pub(crate) fn ack(
        &mut self,
        received: &Received,
        manual_acks: bool,
        sink: &impl Sink,
    ) -> Result<(), AckError> {
        if self.closed {
            return Err(AckError::Closed);
        }
        if received.qos == QoS::AtMostOnce || !manual_acks {
            return Ok(());
        }
        if received.epoch != self.epoch || !self.connected {
            return Err(AckError::Stale);
        }
        self.acks.push_back(received.publish.clone());
        self.pump(sink);
        Ok(())
    }

    /// Largest payload that fits one message on `topic` under the effective packet limit.
    pub(crate) fn max_payload(&self, topic: &str) -> usize {
        self.limit.saturating_sub(topic.len() + PUBLISH_OVERHEAD)
    }

    /// Starts the shutdown: queues `finals` (forced to QoS 1; invalid or oversize ones skipped),
    /// pumps and sends DISCONNECT when everything is acknowledged. `Err` when already closed.
    pub(crate) fn begin_shutdown(
        &mut self,
        finals: Vec<Message>,
        until: Instant,
        sink: &impl Sink,
    ) -> Result<(), PublishError> {
        if self.closed {
            return Err(PublishError::Closed);
        }
        self.closing = Some(until);
        for mut msg in finals {
            msg.qos = QoS::AtLeastOnce;
            if !valid_topic(&msg.topic) || msg.encoded_size() > self.limit {
                warn!(topic = %msg.topic, "Skipped an invalid or oversize final message.");
                continue;
            }
            self.outbox.push_final(msg);
        }
        self.pump(sink);
        Ok(())
    }

    /// Moves what it can from our queues into `sink` (acks, then subscriptions, then the
    /// outbox in order), without blocking; then sends DISCONNECT if shutting down and drained.
    pub(crate) fn pump(&mut self, sink: &impl Sink) {
        if self.connected && !self.disconnect_sent && self.pump_queues(sink) {
            self.maybe_disconnect(sink);
        }
    }

    /// Returns false when the sink is full.
    fn pump_queues(&mut self, sink: &impl Sink) -> bool {
        while let Some(p) = self.acks.front() {
            if !sink.ack(p) {
                return false;
            }
            self.acks.pop_front();
        }
        while let Some(change) = self.subs_to_send.front() {
            let taken = match change {
                SubChange::Subscribe(sub) => sink.subscribe(sub),
                SubChange::Unsubscribe(filter) => sink.unsubscribe(filter),
            };
            if !taken {
                return false;
            }
            self.subs_to_send.pop_front();
        }
        loop {
            if let Some(m) = self.outbox.pop_oversize(self.limit) {
                self.refused_oversize += 1;
                warn!(topic = %m.topic, size = m.encoded_size(), max = self.limit,
                    "Discarded a queued message over the broker's maximum packet size.");
                continue;
            }
            let Some(m) = self.outbox.sendable() else {
                return true;
            };
            if !sink.publish(m) {
                return false;
            }
            self.outbox.mark_handed();
        }
    }

    /// Sends DISCONNECT once shutting down and everything queued is acknowledged.
    fn maybe_disconnect(&mut self, sink: &impl Sink) {
        if self.closing.is_some() && self.outbox.drained() && sink.disconnect() {
            self.disconnect_sent = true;
        }
    }

    /// A ConnAck, with the broker's maximum packet size and receive maximum: a new connection
    /// epoch; subscriptions are re-issued and sticky values republished before anything else.
    pub(crate) fn connected(&mut self, broker_max_packet: Option<u32>, receive_max: Option<u16>) {
        self.connected = true;
        self.epoch += 1;
        self.connects += 1;
        self.disconnect_sent = false;
        self.acks.clear();
        self.limit = broker_max_packet.map_or(self.max_packet_size, |m| {
            (m as usize).min(self.max_packet_size)
        });
        // Unsubscriptions not sent yet go first (a persistent session may still hold them),
        // then every subscription again.
        self.subs_to_send
            .retain(|c| matches!(c, SubChange::Unsubscribe(_)));
        self.subs_to_send
            .extend(self.subscriptions.iter().cloned().map(SubChange::Subscribe));
        self.subacks = 0;
        self.outbox.connected(receive_max);
    }

    /// A SUBACK on the current connection.
    pub(crate) fn subscribed(&mut self) {
        self.subacks += 1;
    }

    /// A connection error: counted and kept as `last_error`.
    pub(crate) fn failed(&mut self, error: String) {
        self.connected = false;
        self.errors += 1;
        self.last_error = Some(error);
    }

    /// After a connection error and the events rumqttc had buffered: requeues what was not
    /// done (see [`Outbox::requeue`]); acks and subscriptions of the dead connection are dropped
    /// (subscriptions are re-issued on the next ConnAck), unsubscriptions kept for it.
    pub(crate) fn recover(&mut self, pending: Vec<Message>) -> Requeued {
        let r = self.outbox.requeue(pending);
        self.acks.clear();
        self.subs_to_send
            .retain(|c| matches!(c, SubChange::Unsubscribe(_)));
        r
    }

    /// The connection epoch (incoming messages carry it; acks are valid only in it).
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Successful ConnAcks since start.
    pub(crate) fn connects(&self) -> u64 {
        self.connects
    }

    /// Whether a ConnAck was received and the connection has not failed since.
    pub(crate) fn is_connected(&self) -> bool {
        self.connected
    }

    /// The shutdown deadline, once shutting down.
    pub(crate) fn closing(&self) -> Option<Instant> {
        self.closing
    }

    /// Shutting down while disconnected with nothing left to send: nothing to wait for.
    pub(crate) fn idle_shutdown(&self) -> bool {
        self.closing.is_some() && !self.connected && self.outbox.drained()
    }

    /// Nothing queued, nothing in flight.
    pub(crate) fn drained(&self) -> bool {
        self.outbox.drained()
    }

    /// The polling task waits (or stopped waiting) for room in the incoming channel.
    pub(crate) fn set_delivery_blocked(&mut self, blocked: bool) {
        self.delivery_blocked = blocked;
    }

    /// The polling task ended: disconnected, and closed if it was shutting down.
    pub(crate) fn task_ended(&mut self) {
        self.connected = false;
        if self.closing.is_some() {
            self.closed = true;
        }
    }

    /// The shutdown is over (cleanly or not): nothing is accepted any more.
    pub(crate) fn close(&mut self) {
        self.closed = true;
        self.connected = false;
    }

    /// The snapshot published to watchers.
    pub(crate) fn snapshot(&self) -> LinkState {
        LinkState {
            connected: self.connected,
            connects: self.connects,
            errors: self.errors,
            dropped: self.outbox.dropped(),
            coalesced: self.outbox.coalesced(),
            refused_oversize: self.refused_oversize,
            queued: self.outbox.queued(),
            in_flight: self.outbox.in_flight(),
            last_error: self.last_error.clone(),
            reliable_queued: self.outbox.reliable_queued(),
            subacks: self.subacks,
        }
    }
}

#[cfg(test)]
mod tests;
