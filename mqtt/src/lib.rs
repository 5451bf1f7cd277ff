//! # The MQTT link
//!
//! [`MqttLink`] is labvisor's only way to talk MQTT. It wraps `rumqttc::v5` (MQTT 5, so that
//! jobs can use the response-topic property; mosquitto serves 3.1.1 and 5 on one port) and fixes
//! what rumqttc leaves to its users (see `shared/notes/deps.md` §1): reconnect delays,
//! resubscription, republishing retained state, a packet-size cap enforced before sending, a
//! bounded queue that never blocks the caller, and messages that rumqttc would silently drop on
//! reconnect.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use labvisor_mqtt::{LinkOptions, Message, MqttLink, QoS};
//! use std::time::Duration;
//!
//! let mut opts = LinkOptions::from_url("mqtt://127.0.0.1:1883", "labvisor-agent-dut1")?;
//! opts.will = Some(Message::state("dut1/status", r#"{"state":"lost"}"#));
//! let (link, mut incoming) = MqttLink::start(opts)?;
//! link.subscribe("dut1/submit", QoS::AtLeastOnce)?;
//! link.set_sticky("dut1/status", r#"{"state":"ready"}"#)?;
//! link.publish(Message::stream("dut1/heartbeat", "{}"))?;
//! while let Some(msg) = incoming.recv().await {
//!     println!("{} {:?}", msg.topic, msg.payload);
//! #   break;
//! }
//! link.shutdown(
//!     vec![Message::state("dut1/status", r#"{"state":"disconnected"}"#)],
//!     Duration::from_secs(3),
//! )
//! .await?;
//! # Ok(()) }
//! ```
//!
//! ## Theory of operation
//!
//! **One task owns the `EventLoop`.** [`MqttLink::start`] creates the rumqttc client with a small
//! request channel (16 requests) and spawns one task that loops on `EventLoop::poll`. Handles
//! ([`MqttLink`], cheap to clone) share a mutex-protected state with that task; no lock is held
//! across an `.await`, and no client call is ever awaited (only `try_publish`, `try_subscribe`,
//! `try_ack`, `try_disconnect`), so the polling task cannot deadlock on its own channel
//! (rumqtt#263). `poll()` is never cancelled while connected (it is not cancel-safe mid-write);
//! it is raced only against "every handle dropped", the shutdown deadline, and, while
//! connecting, a shutdown request.
//!
//! **Outbox.** [`MqttLink::publish`] is synchronous and never blocks: it checks the message,
//! appends it to our own bounded outbox and returns. Messages move from the outbox into rumqttc
//! in FIFO order, only while connected, only while rumqttc's request channel has room, and only
//! while fewer QoS 1 messages are in flight than the broker's receive maximum (minus one, capped
//! at 31), which also keeps rumqttc away from packet-id collisions. The polling task moves them
//! after every event (ConnAck, PubAck, a publish written, ...); `publish` itself also moves them
//! right away, under the same lock, when the link is connected (the fast path), so a new message
//! does not wait for the next network event.
//!
//! **Overflow policy.** Only live output is ever dropped, and output is marked as such by its
//! producer: [`MqttLink::publish_output`] (QoS 0 or 1) rather than [`MqttLink::publish`]. When the
//! outbox holds more than `queue_capacity` messages, the *oldest output* message is dropped,
//! counted in [`LinkState::dropped`] and handed to [`LinkOptions::on_drop`] (once per message).
//! Everything else (acknowledgements, job statuses, heartbeats: anything given to `publish`),
//! sticky state messages ([`MqttLink::set_sticky`], at most one queued per topic),
//! [`MqttLink::publish_sticky`] values and the final messages of [`MqttLink::shutdown`] are never
//! dropped: with no output left to drop the outbox grows past its capacity instead. Producers of
//! bulk output should split and rate-limit themselves; the heartbeat is never starved by output
//! because it is never dropped and dropping favours the newest output.
//!
//! **Back-pressure.** What bounds the backlog of answers is the application:
//! [`MqttLink::has_room`] is false while `queue_capacity` or more QoS 1 messages other than output
//! and sticky states wait in the outbox (output never counts: it cannot close the intake), and an
//! application
//! whose QoS 1 messages answer incoming work (the agent answers every submission) stops taking
//! from [`Incoming`] until it is true again ([`MqttLink::watch_room`] says when). With manual acks
//! and `receive_maximum` (MQTT 5; the broker sends at most that many unacknowledged QoS 1
//! messages), the broker then holds every further message: nothing is read that cannot be
//! answered. While the incoming channel is full and the task waits for the application,
//! `has_room` is true regardless: the task cannot move the outbox until the application takes a
//! message, so waiting for room would deadlock.
//!
//! **ConnAck.** On every ConnAck the task (1) resets the backoff, (2) takes the effective
//! maximum packet size as the smaller of ours and the broker's, (3) re-issues every subscription
//! registered with [`MqttLink::subscribe`] (rumqttc never does, and with clean start the broker
//! forgot them), before any publish, then (4) puts the latest payload of every sticky topic at
//! the front of the outbox (retained, QoS 1), replacing older queued values. That is how the
//! agent's retained birth/status is republished after every reconnect, including after a
//! broker restart that lost its retained store.
//!
//! **Reconnect.** rumqttc reconnects as soon as `poll()` is called after an error. The task
//! sleeps first: `backoff_min * 2^(n-1)` capped at `backoff_max`, ±20 % jitter, where `n`
//! counts failures since the last ConnAck.
//!
//! **Pending-queue drain.** rumqttc moves unacknowledged publishes and the requests still in
//! its channel into `EventLoop::pending` on a connection error, and silently clears `pending`
//! when the next ConnAck says `session_present = false` (always, with clean start or after a
//! broker restart). So after every `poll()` error the task processes the events rumqttc had
//! already buffered, empties `eventloop.pending` itself, and puts every message that was handed
//! to rumqttc but not acknowledged (QoS 1) or not yet written (QoS 0) back at the *front* of
//! the outbox, in its original order. The link tracks what it handed over (by sequence number
//! and packet id), so the order is ours, not rumqttc's packet-id order; a publish found in
//! `pending` that the link does not know is requeued as well. Subscribes, acks and pings in
//! `pending` are dropped (subscriptions are re-issued on ConnAck; acks belong to the dead
//! connection). Sticky messages are not requeued: ConnAck republishes their latest value.
//!
//! **Delivery guarantees.** QoS 1 messages accepted by `publish` are delivered *at least once*
//! as long as the link is not shut down and the message is not dropped by the overflow policy:
//! a message the broker received but whose PUBACK was lost is sent again after the reconnect
//! (a duplicate, with a new packet id). QoS 0 messages are sent at most once once written to the
//! socket, but are kept while the broker is down. Order is preserved per link, except that
//! requeued messages may be preceded by the sticky republish. A successful `publish` means
//! "queued", never "delivered": application-level acknowledgements (job status) are the real
//! end-to-end signal.
//!
//! **Packet size.** `max_packet_size` is set on rumqttc for incoming packets (and announced to
//! the broker); outgoing messages are checked by the link (`topic + payload + 64` bytes) against
//! the smaller of it and the broker's announced maximum, and refused with
//! [`PublishError::Oversize`]. An oversize packet handed to rumqttc would kill the connection
//! and lose the next queued message.
//!
//! **Incoming.** Publishes on subscribed topics arrive on [`Incoming`], a bounded channel
//! (`incoming_capacity`). When it is full, the task *waits* for the application to make room:
//! the broker then sees TCP back-pressure, outgoing traffic and keep-alives of this link pause
//! too, and a consumer that stalls longer than about 1.5 keep-alives gets the connection dropped
//! by the broker (QoS 1 messages not yet acknowledged are redelivered with a persistent session).
//! Dropping or buffering without bound were rejected: one loses job submissions, the other
//! memory. So drain [`Incoming`] from a dedicated task. With `manual_acks`, QoS 1 messages are
//! acknowledged only by [`MqttLink::ack`], after the application has recorded them durably.
//!
//! **Shutdown and last will.** The will (`LinkOptions::will`, typically a retained "lost")
//! is published by the broker when the connection dies without a DISCONNECT, which is what
//! happens when every handle is dropped without calling [`MqttLink::shutdown`]. A clean
//! DISCONNECT suppresses the will, so [`MqttLink::shutdown`] first queues the final messages
//! (QoS 1, e.g. a retained "disconnected" status that also replaces the sticky value for that
//! topic), waits until everything queued before them and the final messages themselves are
//! acknowledged, then sends DISCONNECT. It is bounded by its deadline: with the broker down it
//! returns [`LinkError::ShutdownDeadline`] after the deadline.

mod options;

pub use options::{
    backoff_delay, AckError, DropHook, LinkError, LinkOptions, Message, PublishError, QoS,
    UrlError, BACKOFF_JITTER, DEFAULT_PORT, DEFAULT_TLS_PORT, PUBLISH_OVERHEAD,
};
/// rumqttc's MQTT 5 PUBLISH packet, as carried by [`Received::publish`].
pub use rumqttc::v5::mqttbytes::v5::Publish;

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Request};
use rumqttc::{Outgoing, TlsConfiguration, Transport};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Capacity of rumqttc's request channel: small, so that our outbox (with its overflow policy)
/// holds the backlog, not rumqttc.
const REQUEST_CHANNEL_CAPACITY: usize = 16;

/// Upper limit of QoS 1 publishes in flight (rumqttc's `outgoing_inflight_upper_limit`).
const INFLIGHT_UPPER_LIMIT: u16 = 32;

/// CA bundle used for TLS when no `ca_file` is given.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A snapshot of the link, published through a `tokio::sync::watch` channel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkState {
    /// A ConnAck was received and the connection has not failed since.
    pub connected: bool,
    /// Successful ConnAcks since start.
    pub connects: u64,
    /// Connection errors (failed attempts and lost connections), each followed by a backoff.
    pub errors: u64,
    /// Output messages ([`MqttLink::publish_output`]) dropped by the overflow policy; nothing
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
    /// "Back-pressure" in the module documentation).
    pub reliable_queued: usize,
}

/// An incoming publish on a subscribed topic.
#[derive(Debug, Clone)]
pub struct Received {
    /// Topic name.
    pub topic: String,
    /// Payload bytes.
    pub payload: Bytes,
    /// QoS the message was delivered with.
    pub qos: QoS,
    /// Whether it was delivered as a retained message.
    pub retain: bool,
    /// MQTT 5 response topic, if the sender set one.
    pub response_topic: Option<String>,
    /// MQTT 5 correlation data, if the sender set it.
    pub correlation_data: Option<Bytes>,
    /// The raw packet (user properties, content type, ...).
    pub publish: Publish,
    /// Connection epoch the message arrived on (acks are valid only on that connection).
    epoch: u64,
}

impl Received {
    /// The MQTT 5 user properties of the message (empty when it had none).
    pub fn user_properties(&self) -> Vec<(String, String)> {
        self.publish
            .properties
            .as_ref()
            .map(|p| p.user_properties.clone())
            .unwrap_or_default()
    }
}

/// Receiver of incoming publishes; see "Incoming" in the module documentation.
pub type Incoming = mpsc::Receiver<Received>;

/// Whether an outbox entry may be dropped by the overflow policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// An ordinary message.
    No,
    /// Live output ([`MqttLink::publish_output`]): the only kind the overflow policy drops.
    Output,
    /// The current value of a sticky topic.
    Sticky,
    /// A final message of `shutdown`.
    Final,
    /// A value of [`MqttLink::publish_sticky`]: sent in order like an event, never coalesced.
    Each,
}

#[derive(Debug, Clone)]
struct Entry {
    seq: u64,
    msg: Message,
    keep: Keep,
}

/// State shared by the handles and the polling task.
struct Inner {
    outbox: VecDeque<Entry>,
    capacity: usize,
    next_seq: u64,
    /// Latest payload per sticky topic, in first-set order.
    sticky: Vec<(String, Bytes)>,
    /// Filter, QoS, retain-as-published.
    subscriptions: Vec<(String, QoS, bool)>,
    subs_to_send: VecDeque<(String, QoS, bool)>,
    acks: VecDeque<Publish>,
    /// Handed to rumqttc's channel, not yet seen written (FIFO, matches `Outgoing::Publish`).
    handed: VecDeque<Entry>,
    /// QoS 1 publishes written, by packet id, awaiting PUBACK.
    inflight: HashMap<u16, Entry>,
    /// A publish rumqttc parked on a packet-id collision (should not happen: see `window`).
    collided: Option<Entry>,
    /// Max QoS 1 messages in `handed` + `inflight` + `collided`.
    window: usize,
    connected: bool,
    epoch: u64,
    /// Effective maximum packet size.
    limit: usize,
    closing: Option<Instant>,
    disconnect_sent: bool,
    closed: bool,
    connects: u64,
    errors: u64,
    dropped: u64,
    coalesced: u64,
    refused_oversize: u64,
    last_error: Option<String>,
    /// The polling task waits for room in the incoming channel.
    delivery_blocked: bool,
    on_drop: Option<DropHook>,
}

impl Inner {
    fn new(capacity: usize, limit: usize, on_drop: Option<DropHook>) -> Self {
        Inner {
            outbox: VecDeque::new(),
            capacity,
            next_seq: 0,
            sticky: Vec::new(),
            subscriptions: Vec::new(),
            subs_to_send: VecDeque::new(),
            acks: VecDeque::new(),
            handed: VecDeque::new(),
            inflight: HashMap::new(),
            collided: None,
            window: 1,
            connected: false,
            epoch: 0,
            limit,
            closing: None,
            disconnect_sent: false,
            closed: false,
            connects: 0,
            errors: 0,
            dropped: 0,
            coalesced: 0,
            refused_oversize: 0,
            last_error: None,
            delivery_blocked: false,
            on_drop,
        }
    }

    /// QoS 1 messages waiting in the outbox that are never dropped: output is excepted (it is
    /// dropped instead), and so are sticky state messages (at most one each).
    fn reliable_queued(&self) -> usize {
        self.outbox
            .iter()
            .filter(|e| {
                e.msg.qos == QoS::AtLeastOnce && !matches!(e.keep, Keep::Sticky | Keep::Output)
            })
            .count()
    }

    /// Whether the application may take more incoming work (see "Back-pressure").
    fn has_room(&self) -> bool {
        self.delivery_blocked || self.reliable_queued() < self.capacity
    }

    fn qos1_out(&self) -> usize {
        self.handed
            .iter()
            .chain(self.inflight.values())
            .chain(self.collided.iter())
            .filter(|e| e.msg.qos == QoS::AtLeastOnce)
            .count()
    }

    fn entry(&mut self, msg: Message, keep: Keep) -> Entry {
        self.next_seq += 1;
        Entry {
            seq: self.next_seq,
            msg,
            keep,
        }
    }

    /// Drops the oldest live output ([`Keep::Output`], whatever its QoS) until the outbox fits its
    /// capacity, or none is left: nothing else (acknowledgements, statuses) is ever dropped.
    fn enforce_capacity(&mut self) {
        while self.outbox.len() > self.capacity {
            let victim = self.outbox.iter().position(|e| e.keep == Keep::Output);
            let Some(i) = victim else { break };
            let e = self.outbox.remove(i).expect("position is valid");
            self.dropped += 1;
            if let Some(hook) = &self.on_drop {
                hook.call(&e.msg);
            }
        }
    }

    /// Moves what it can from our queues into rumqttc's channel, without blocking.
    fn pump(&mut self, client: &AsyncClient) {
        if !self.connected || self.disconnect_sent {
            return;
        }
        while let Some(p) = self.acks.front() {
            if client.try_ack(p).is_err() {
                return;
            }
            self.acks.pop_front();
        }
        while let Some((filter, qos, as_published)) = self.subs_to_send.front() {
            let mut f = rumqttc::v5::mqttbytes::v5::Filter::new(filter.clone(), qos.to_rumqttc());
            f.preserve_retain = *as_published;
            if client.try_subscribe_many(std::iter::once(f)).is_err() {
                return;
            }
            self.subs_to_send.pop_front();
        }
        let mut qos1_out = self.qos1_out();
        while let Some(front) = self.outbox.front() {
            if front.msg.encoded_size() > self.limit {
                let e = self.outbox.pop_front().expect("front exists");
                self.refused_oversize += 1;
                warn!(topic = %e.msg.topic, size = e.msg.encoded_size(), max = self.limit,
                    "Discarded a queued message over the broker's maximum packet size.");
                continue;
            }
            let qos1 = front.msg.qos == QoS::AtLeastOnce;
            if qos1 && qos1_out >= self.window {
                return;
            }
            let m = &front.msg;
            let sent = if m.has_properties() {
                let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
                    user_properties: m.user_properties.clone(),
                    correlation_data: m.correlation_data.clone(),
                    ..Default::default()
                };
                client.try_publish_with_properties(
                    m.topic.clone(),
                    m.qos.to_rumqttc(),
                    m.retain,
                    m.payload.clone(),
                    props,
                )
            } else {
                client.try_publish(
                    m.topic.clone(),
                    m.qos.to_rumqttc(),
                    m.retain,
                    m.payload.clone(),
                )
            };
            if sent.is_err() {
                return; // the channel is full; the next event pumps again
            }
            let e = self.outbox.pop_front().expect("front exists");
            if qos1 {
                qos1_out += 1;
            }
            self.handed.push_back(e);
        }
    }

    /// Sends DISCONNECT once shutting down and everything queued is acknowledged.
    fn maybe_disconnect(&mut self, client: &AsyncClient) {
        if self.closing.is_some()
            && self.connected
            && !self.disconnect_sent
            && self.drained()
            && client.try_disconnect().is_ok()
        {
            self.disconnect_sent = true;
        }
    }

    fn drained(&self) -> bool {
        self.outbox.is_empty()
            && self.handed.is_empty()
            && self.inflight.is_empty()
            && self.collided.is_none()
    }

    fn snapshot(&self) -> LinkState {
        LinkState {
            connected: self.connected,
            connects: self.connects,
            errors: self.errors,
            dropped: self.dropped,
            coalesced: self.coalesced,
            refused_oversize: self.refused_oversize,
            queued: self.outbox.len(),
            in_flight: self.handed.len()
                + self.inflight.len()
                + usize::from(self.collided.is_some()),
            last_error: self.last_error.clone(),
            reliable_queued: self.reliable_queued(),
        }
    }
}

struct Shared {
    inner: Mutex<Inner>,
    state_tx: watch::Sender<LinkState>,
    /// [`Inner::has_room`], changed only when it flips.
    room_tx: watch::Sender<bool>,
    client: AsyncClient,
    /// Wakes the polling task while it is not connected (shutdown requested).
    wake: Notify,
    task: Mutex<Option<JoinHandle<()>>>,
    broker: String,
    client_id: String,
    max_packet_size: usize,
    manual_acks: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish_state(&self, inner: &Inner) {
        let room = inner.has_room();
        self.room_tx
            .send_if_modified(|r| std::mem::replace(r, room) != room);
        let new = inner.snapshot();
        self.state_tx.send_if_modified(|s| {
            if *s == new {
                false
            } else {
                *s = new;
                true
            }
        });
    }
}

/// Dropped with the last [`MqttLink`] clone: tells the task that nobody is left.
struct Guard {
    _alive: watch::Sender<()>,
}

/// Handle to the MQTT link; cheap to clone. See the module documentation.
///
/// Dropping every clone without [`MqttLink::shutdown`] ends the task and closes the socket
/// without DISCONNECT, so the broker publishes the last will.
#[derive(Clone)]
pub struct MqttLink {
    shared: Arc<Shared>,
    _guard: Arc<Guard>,
}

impl std::fmt::Debug for MqttLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttLink")
            .field("broker", &self.shared.broker)
            .field("client_id", &self.shared.client_id)
            .finish_non_exhaustive()
    }
}

impl MqttLink {
    /// Validates `opts`, spawns the polling task (which connects right away, and reconnects
    /// forever with backoff) and returns the handle and the receiver of incoming publishes.
    /// Must be called inside a tokio runtime.
    pub fn start(opts: LinkOptions) -> Result<(MqttLink, Incoming), LinkError> {
        let mqtt = mqtt_options(&opts)?;
        let (client, eventloop) = AsyncClient::new(mqtt, REQUEST_CHANNEL_CAPACITY);
        let inner = Inner::new(
            opts.queue_capacity,
            opts.max_packet_size,
            opts.on_drop.clone(),
        );
        let (state_tx, _) = watch::channel(inner.snapshot());
        let (room_tx, _) = watch::channel(inner.has_room());
        let shared = Arc::new(Shared {
            inner: Mutex::new(inner),
            state_tx,
            room_tx,
            client,
            wake: Notify::new(),
            task: Mutex::new(None),
            broker: opts.broker(),
            client_id: opts.client_id.clone(),
            max_packet_size: opts.max_packet_size,
            manual_acks: opts.manual_acks,
        });
        let (alive_tx, alive_rx) = watch::channel(());
        let (incoming_tx, incoming_rx) = mpsc::channel(opts.incoming_capacity);
        let task = Task {
            eventloop,
            shared: shared.clone(),
            alive: alive_rx,
            incoming: incoming_tx,
            backoff_min: opts.backoff_min,
            backoff_max: opts.backoff_max,
            failures: 0,
            incoming_full_logged: false,
        };
        let handle = tokio::spawn(task.run());
        *shared.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        let link = MqttLink {
            shared,
            _guard: Arc::new(Guard { _alive: alive_tx }),
        };
        Ok((link, incoming_rx))
    }

    /// Queues `msg` for publishing and returns at once (never blocks, never awaits).
    ///
    /// `Ok` means "queued", not "delivered". Refuses invalid topics, messages over the
    /// maximum packet size (counted in [`LinkState::refused_oversize`]) and publishing after
    /// shutdown. It is never dropped: only [`MqttLink::publish_output`] messages are (see
    /// "Overflow policy" and "Back-pressure" in the module documentation).
    pub fn publish(&self, msg: Message) -> Result<(), PublishError> {
        self.enqueue(msg, Keep::No)
    }

    /// Queues live output like [`MqttLink::publish`] (any QoS), except that it is the only kind
    /// of message the overflow policy drops (oldest first, counted in [`LinkState::dropped`] and
    /// handed to [`LinkOptions::on_drop`]), and that it never counts against
    /// [`MqttLink::has_room`]: output cannot close the intake nor push out an answer.
    pub fn publish_output(&self, msg: Message) -> Result<(), PublishError> {
        self.enqueue(msg, Keep::Output)
    }

    /// The checks every outgoing message passes before it is queued: a valid topic, a link that
    /// is not shut down (final messages pass while closing), and the size cap (counted). Returns
    /// the locked state to queue it in.
    fn admit(&self, msg: &Message, keep: Keep) -> Result<MutexGuard<'_, Inner>, PublishError> {
        if !options::valid_topic(&msg.topic) {
            return Err(PublishError::InvalidTopic(msg.topic.clone()));
        }
        let mut inner = self.shared.lock();
        if inner.closed || (inner.closing.is_some() && keep != Keep::Final) {
            return Err(PublishError::Closed);
        }
        let size = msg.encoded_size();
        if size > inner.limit {
            inner.refused_oversize += 1;
            self.shared.publish_state(&inner);
            return Err(PublishError::Oversize {
                topic: msg.topic.clone(),
                size,
                max: inner.limit,
            });
        }
        Ok(inner)
    }

    fn enqueue(&self, msg: Message, keep: Keep) -> Result<(), PublishError> {
        let mut inner = self.admit(&msg, keep)?;
        let e = inner.entry(msg, keep);
        inner.outbox.push_back(e);
        inner.enforce_capacity();
        inner.pump(&self.shared.client);
        self.shared.publish_state(&inner);
        Ok(())
    }

    /// Sets the retained state of `topic` (QoS 1, retained): published now when connected, and
    /// again after every reconnect. A value still queued for the same topic is replaced
    /// (counted in [`LinkState::coalesced`]). Sticky messages are never dropped.
    pub fn set_sticky(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> Result<(), PublishError> {
        let msg = Message::state(topic, payload);
        let mut inner = self.admit(&msg, Keep::Sticky)?;
        match inner.sticky.iter_mut().find(|(t, _)| *t == msg.topic) {
            Some((_, p)) => *p = msg.payload.clone(),
            None => inner.sticky.push((msg.topic.clone(), msg.payload.clone())),
        }
        let queued = inner
            .outbox
            .iter_mut()
            .find(|e| e.keep == Keep::Sticky && e.msg.topic == msg.topic);
        if let Some(e) = queued {
            e.msg.payload = msg.payload;
            inner.coalesced += 1;
        } else if inner.connected {
            let e = inner.entry(msg, Keep::Sticky);
            inner.outbox.push_back(e);
            inner.pump(&self.shared.client);
        }
        self.shared.publish_state(&inner);
        Ok(())
    }

    /// Publishes a retained QoS 1 state of which every value matters (each job's final status on
    /// `<sut>/last_job`, counted by readers): queued in order like an event, never dropped and
    /// never coalesced, unlike [`MqttLink::set_sticky`]. Its latest value is republished after
    /// every reconnect like a sticky one (unless values of the topic are still queued: the last
    /// of them is the latest).
    pub fn publish_sticky(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> Result<(), PublishError> {
        let msg = Message::state(topic, payload);
        let mut inner = self.admit(&msg, Keep::Each)?;
        match inner.sticky.iter_mut().find(|(t, _)| *t == msg.topic) {
            Some((_, p)) => *p = msg.payload.clone(),
            None => inner.sticky.push((msg.topic.clone(), msg.payload.clone())),
        }
        let e = inner.entry(msg, Keep::Each);
        inner.outbox.push_back(e);
        inner.pump(&self.shared.client);
        self.shared.publish_state(&inner);
        Ok(())
    }

    /// Whether the application should take more incoming work: false while `queue_capacity` or
    /// more QoS 1 messages other than output wait in the outbox (see "Back-pressure" in the
    /// module documentation).
    pub fn has_room(&self) -> bool {
        *self.shared.room_tx.borrow()
    }

    /// A receiver of [`MqttLink::has_room`] that sees each change.
    pub fn watch_room(&self) -> watch::Receiver<bool> {
        self.shared.room_tx.subscribe()
    }

    /// Subscribes to `filter` now (when connected) and again after every reconnect. Incoming
    /// publishes arrive on [`Incoming`]. Subscribing twice to the same filter updates its QoS.
    /// [`Received::retain`] is true only for retained messages sent because of the subscription.
    pub fn subscribe(&self, filter: impl Into<String>, qos: QoS) -> Result<(), PublishError> {
        self.subscribe_with(filter.into(), qos, false)
    }

    /// As [`MqttLink::subscribe`], with the MQTT 5 option retain-as-published:
    /// [`Received::retain`] is also true for a message its sender published retained while the
    /// subscription was live (the agent refuses retained jobs).
    pub fn subscribe_as_published(
        &self,
        filter: impl Into<String>,
        qos: QoS,
    ) -> Result<(), PublishError> {
        self.subscribe_with(filter.into(), qos, true)
    }

    fn subscribe_with(
        &self,
        filter: String,
        qos: QoS,
        as_published: bool,
    ) -> Result<(), PublishError> {
        if !rumqttc::v5::mqttbytes::valid_filter(&filter) || filter.contains('\0') {
            return Err(PublishError::InvalidTopic(filter));
        }
        let mut inner = self.shared.lock();
        if inner.closed || inner.closing.is_some() {
            return Err(PublishError::Closed);
        }
        match inner.subscriptions.iter_mut().find(|(f, ..)| *f == filter) {
            Some((_, q, p)) => (*q, *p) = (qos, as_published),
            None => inner
                .subscriptions
                .push((filter.clone(), qos, as_published)),
        }
        if inner.connected {
            inner.subs_to_send.push_back((filter, qos, as_published));
            inner.pump(&self.shared.client);
        }
        Ok(())
    }

    /// Acknowledges a QoS 1 message received with `manual_acks` (a no-op for QoS 0 or without
    /// `manual_acks`). Call it after the message is durably recorded. Fails with
    /// [`AckError::Stale`] when the connection it arrived on is gone.
    pub fn ack(&self, received: &Received) -> Result<(), AckError> {
        let mut inner = self.shared.lock();
        if inner.closed {
            return Err(AckError::Closed);
        }
        if received.qos == QoS::AtMostOnce || !self.shared.manual_acks {
            return Ok(());
        }
        if received.epoch != inner.epoch || !inner.connected {
            return Err(AckError::Stale);
        }
        inner.acks.push_back(received.publish.clone());
        inner.pump(&self.shared.client);
        Ok(())
    }

    /// Largest payload that fits one message on `topic` under the effective maximum packet
    /// size; split output accordingly.
    pub fn max_payload(&self, topic: &str) -> usize {
        self.shared
            .lock()
            .limit
            .saturating_sub(topic.len() + PUBLISH_OVERHEAD)
    }

    /// The current state.
    pub fn state(&self) -> LinkState {
        self.shared.state_tx.borrow().clone()
    }

    /// A receiver that sees every state change.
    pub fn watch_state(&self) -> watch::Receiver<LinkState> {
        self.shared.state_tx.subscribe()
    }

    /// Publishes `finals` (forced to QoS 1; e.g. a retained "disconnected" status, which also
    /// replaces the sticky value of its topic), waits until they and everything queued before
    /// them are acknowledged, sends DISCONNECT (so the broker discards the will) and ends the
    /// task. Returns [`LinkError::ShutdownDeadline`] when `deadline` passes first (for example
    /// while the broker is down); the task is then stopped without DISCONNECT.
    pub async fn shutdown(
        &self,
        finals: Vec<Message>,
        deadline: Duration,
    ) -> Result<(), LinkError> {
        let handle = self
            .shared
            .task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(mut handle) = handle else {
            return Err(LinkError::Closed);
        };
        let until = Instant::now() + deadline;
        {
            let mut inner = self.shared.lock();
            if inner.closed {
                return Err(LinkError::Closed);
            }
            inner.closing = Some(until);
            for mut msg in finals {
                msg.qos = QoS::AtLeastOnce;
                if !options::valid_topic(&msg.topic) || msg.encoded_size() > inner.limit {
                    warn!(topic = %msg.topic, "Skipped an invalid or oversize final message.");
                    continue;
                }
                inner.sticky.retain(|(t, _)| *t != msg.topic);
                inner
                    .outbox
                    .retain(|e| !(e.keep == Keep::Sticky && e.msg.topic == msg.topic));
                let e = inner.entry(msg, Keep::Final);
                inner.outbox.push_back(e);
            }
            inner.pump(&self.shared.client);
            inner.maybe_disconnect(&self.shared.client);
            self.shared.publish_state(&inner);
        }
        self.shared.wake.notify_one();
        let clean = match tokio::time::timeout_at(until, &mut handle).await {
            // The task ended on its own: after DISCONNECT, or disconnected with nothing to send.
            Ok(_) => self.shared.lock().drained(),
            Err(_) => {
                handle.abort();
                let _ = handle.await;
                false
            }
        };
        let mut inner = self.shared.lock();
        inner.closed = true;
        inner.connected = false;
        self.shared.publish_state(&inner);
        if clean {
            Ok(())
        } else {
            Err(LinkError::ShutdownDeadline)
        }
    }
}

fn mqtt_options(o: &LinkOptions) -> Result<MqttOptions, LinkError> {
    let bad = |s: &str| Err(LinkError::Options(s.to_owned()));
    if o.client_id.is_empty() {
        return bad("client_id must not be empty");
    }
    if o.host.is_empty() {
        return bad("host must not be empty");
    }
    if o.keep_alive < Duration::from_secs(5) || o.keep_alive > Duration::from_secs(65535) {
        return bad("keep_alive must be between 5 s and 65535 s");
    }
    if o.backoff_min.is_zero() || o.backoff_min > o.backoff_max {
        return bad("backoff_min must be positive and not above backoff_max");
    }
    if o.max_packet_size <= PUBLISH_OVERHEAD || o.max_packet_size > u32::MAX as usize {
        return bad("max_packet_size must be above 64 bytes and fit in 32 bits");
    }
    if o.queue_capacity == 0 || o.incoming_capacity == 0 {
        return bad("queue_capacity and incoming_capacity must be at least 1");
    }
    let mut m = MqttOptions::new(o.client_id.clone(), o.host.clone(), o.port);
    m.set_keep_alive(o.keep_alive);
    // Small packets (acks, statuses, job submissions) must not wait for Nagle's algorithm and
    // the peer's delayed ACK: that alone added ~40 ms to every job dispatch.
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    m.set_network_options(net);
    m.set_clean_start(o.clean_start);
    m.set_connection_timeout(o.connect_timeout.as_secs().max(1));
    m.set_max_packet_size(Some(o.max_packet_size as u32));
    m.set_manual_acks(o.manual_acks);
    m.set_outgoing_inflight_upper_limit(INFLIGHT_UPPER_LIMIT);
    if let Some(max) = o.receive_maximum {
        if max == 0 || max as usize > o.incoming_capacity {
            return bad("receive_maximum must be between 1 and incoming_capacity");
        }
        m.set_receive_maximum(Some(max));
    }
    if let Some(exp) = o.session_expiry {
        m.set_session_expiry_interval(Some(exp.as_secs().min(u32::MAX as u64) as u32));
    }
    if let Some(user) = &o.username {
        m.set_credentials(user.clone(), o.password.clone().unwrap_or_default());
    }
    if let Some(w) = &o.will {
        if !options::valid_topic(&w.topic) {
            return bad("the will topic is not a valid topic name");
        }
        m.set_last_will(LastWill::new(
            w.topic.clone(),
            w.payload.to_vec(),
            w.qos.to_rumqttc(),
            w.retain,
            None,
        ));
    }
    if o.tls {
        let config = match &o.ca_pem {
            Some(pem) => tls_config_pem(pem.as_bytes())?,
            None => tls_config(&o.ca_file.clone().unwrap_or_else(|| SYSTEM_CA_BUNDLE.into()))?,
        };
        m.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(config),
        )));
    }
    Ok(m)
}

/// A rustls client config trusting the certificates in the PEM file at `ca_file`, with the ring
/// provider given explicitly (no process-wide default provider is needed).
pub fn tls_config(ca_file: &Path) -> Result<rustls::ClientConfig, LinkError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let err = |reason: String| LinkError::CaFile {
        path: ca_file.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(ca_file).map_err(|e| err(e.to_string()))?;
    client_config(certs.map(|c| c.map_err(|e| e.to_string()))).map_err(|e| match e {
        ConfigError::Ca(reason) => err(reason),
        ConfigError::Tls(reason) => LinkError::Tls(reason),
    })
}

/// Like [`tls_config`], with the CA certificate(s) given as PEM text.
pub fn tls_config_pem(pem: &[u8]) -> Result<rustls::ClientConfig, LinkError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let certs = CertificateDer::pem_slice_iter(pem).map(|c| c.map_err(|e| e.to_string()));
    client_config(certs).map_err(|e| match e {
        ConfigError::Ca(reason) => LinkError::CaPem(reason),
        ConfigError::Tls(reason) => LinkError::Tls(reason),
    })
}

enum ConfigError {
    Ca(String),
    Tls(String),
}

fn client_config<'a>(
    certs: impl Iterator<Item = Result<rustls_pki_types::CertificateDer<'a>, String>>,
) -> Result<rustls::ClientConfig, ConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert.map_err(ConfigError::Ca)?)
            .map_err(|e| ConfigError::Ca(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(ConfigError::Ca("no certificate found".into()));
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::Tls(e.to_string()))
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

/// What the loop does after an event.
enum Flow {
    Continue,
    Stop,
}

/// The polling task: owns the `EventLoop`.
struct Task {
    eventloop: EventLoop,
    shared: Arc<Shared>,
    alive: watch::Receiver<()>,
    incoming: mpsc::Sender<Received>,
    backoff_min: Duration,
    backoff_max: Duration,
    failures: u32,
    incoming_full_logged: bool,
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

impl Task {
    async fn run(mut self) {
        let (broker, client_id) = (self.shared.broker.clone(), self.shared.client_id.clone());
        loop {
            let (deadline, connected) = {
                let inner = self.shared.lock();
                (inner.closing, inner.connected)
            };
            let polled = tokio::select! {
                biased;
                _ = self.alive.changed() => {
                    debug!(broker = %broker, client_id = %client_id,
                        "Every link handle was dropped; closing the connection without DISCONNECT.");
                    break;
                }
                _ = sleep_until_opt(deadline) => {
                    warn!(broker = %broker, client_id = %client_id,
                        "Shutdown deadline passed; closing the connection.");
                    break;
                }
                _ = self.shared.wake.notified(), if !connected => {
                    if self.idle_shutdown() { break; }
                    continue;
                }
                polled = self.eventloop.poll() => polled,
            };
            match polled {
                Ok(event) => {
                    if let Flow::Stop = self.handle(event).await {
                        break;
                    }
                }
                Err(error) => {
                    if let Flow::Stop = self.recover(&error).await {
                        break;
                    }
                    if self.idle_shutdown() {
                        break;
                    }
                    self.failures = self.failures.saturating_add(1);
                    let delay = backoff_delay(
                        self.failures,
                        self.backoff_min,
                        self.backoff_max,
                        fastrand::f64() * 2.0 - 1.0,
                    );
                    warn!(broker = %broker, client_id = %client_id, error = %error,
                        backoff_ms = delay.as_millis() as u64,
                        "MQTT connection failed; reconnecting after a backoff.");
                    tokio::select! {
                        biased;
                        _ = self.alive.changed() => break,
                        _ = sleep_until_opt(deadline) => break,
                        _ = self.shared.wake.notified() => {
                            if self.idle_shutdown() { break; }
                        }
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        let mut inner = self.shared.lock();
        inner.connected = false;
        if inner.closing.is_some() {
            inner.closed = true;
        }
        self.shared.publish_state(&inner);
    }

    /// Shutting down while disconnected with nothing left to send: nothing to wait for.
    fn idle_shutdown(&self) -> bool {
        let inner = self.shared.lock();
        inner.closing.is_some() && !inner.connected && inner.drained()
    }

    async fn handle(&mut self, event: Event) -> Flow {
        let shared = self.shared.clone();
        match event {
            Event::Incoming(Packet::Publish(p)) => return self.deliver(p).await,
            Event::Incoming(Packet::ConnAck(ack)) => {
                self.failures = 0;
                let mut inner = shared.lock();
                inner.connected = true;
                inner.epoch += 1;
                inner.connects += 1;
                inner.disconnect_sent = false;
                inner.acks.clear();
                let props = ack.properties.as_ref();
                inner.limit = props
                    .and_then(|p| p.max_packet_size)
                    .map_or(shared.max_packet_size, |m| {
                        (m as usize).min(shared.max_packet_size)
                    });
                let receive_max = props
                    .and_then(|p| p.receive_max)
                    .unwrap_or(u16::MAX)
                    .min(INFLIGHT_UPPER_LIMIT);
                inner.window = (receive_max as usize).saturating_sub(1).max(1);
                inner.subs_to_send = inner.subscriptions.iter().cloned().collect();
                inner.outbox.retain(|e| e.keep != Keep::Sticky);
                let sticky = inner.sticky.clone();
                for (topic, payload) in sticky.into_iter().rev() {
                    let queued = |e: &Entry| e.keep == Keep::Each && e.msg.topic == topic;
                    if inner.outbox.iter().any(queued) {
                        continue; // the last queued value is the latest, and goes out in order
                    }
                    let e = inner.entry(Message::state(topic, payload), Keep::Sticky);
                    inner.outbox.push_front(e);
                }
                info!(broker = %shared.broker, client_id = %shared.client_id,
                    session_present = ack.session_present, connects = inner.connects,
                    "Connected to the MQTT broker.");
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                let mut inner = shared.lock();
                if inner.inflight.remove(&ack.pkid).is_none() {
                    debug!(
                        pkid = ack.pkid,
                        "PubAck for a publish the link does not track."
                    );
                }
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let mut inner = shared.lock();
                let entry = match inner.collided.take() {
                    Some(e) => Some(e),
                    None => inner.handed.pop_front(),
                };
                match entry {
                    Some(e) if e.msg.qos == QoS::AtLeastOnce => {
                        inner.inflight.insert(pkid, e);
                    }
                    Some(_) => {} // QoS 0: written, done
                    None => debug!(pkid, "Wrote a publish the link does not track."),
                }
            }
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                let mut inner = shared.lock();
                warn!(pkid, "rumqttc parked a publish on a packet-id collision.");
                inner.collided = inner.handed.pop_front();
            }
            Event::Outgoing(Outgoing::Disconnect) => {
                let inner = shared.lock();
                if inner.closing.is_some() {
                    info!(broker = %shared.broker, client_id = %shared.client_id,
                        "Disconnected cleanly from the MQTT broker.");
                    return Flow::Stop;
                }
            }
            _ => {}
        }
        let mut inner = shared.lock();
        inner.pump(&shared.client);
        inner.maybe_disconnect(&shared.client);
        shared.publish_state(&inner);
        Flow::Continue
    }

    async fn deliver(&mut self, p: Publish) -> Flow {
        let Ok(topic) = String::from_utf8(p.topic.to_vec()) else {
            warn!("Dropped an incoming message whose topic is not UTF-8.");
            return Flow::Continue;
        };
        let (epoch, closing) = {
            let inner = self.shared.lock();
            (inner.epoch, inner.closing.is_some())
        };
        let props = p.properties.clone().unwrap_or_default();
        let received = Received {
            topic,
            payload: p.payload.clone(),
            qos: QoS::from_rumqttc(p.qos),
            retain: p.retain,
            response_topic: props.response_topic,
            correlation_data: props.correlation_data,
            publish: p,
            epoch,
        };
        let received = match self.incoming.try_send(received) {
            Ok(()) => return Flow::Continue,
            Err(mpsc::error::TrySendError::Closed(_)) => return Flow::Continue,
            Err(mpsc::error::TrySendError::Full(r)) => r,
        };
        if closing {
            debug!("Dropped an incoming message during shutdown: the receiver is full.");
            return Flow::Continue;
        }
        if !self.incoming_full_logged {
            self.incoming_full_logged = true;
            warn!(client_id = %self.shared.client_id,
                "The incoming channel is full; the link waits for the application to drain it.");
        }
        self.set_delivery_blocked(true);
        let flow = tokio::select! {
            _ = self.incoming.send(received) => Flow::Continue,
            _ = self.alive.changed() => Flow::Stop,
        };
        self.set_delivery_blocked(false);
        flow
    }

    fn set_delivery_blocked(&self, blocked: bool) {
        let mut inner = self.shared.lock();
        inner.delivery_blocked = blocked;
        self.shared.publish_state(&inner);
    }

    /// After a `poll()` error: handles the events rumqttc buffered, drains `pending`, and
    /// requeues every unacknowledged message at the front of the outbox in original order.
    async fn recover(&mut self, error: &ConnectionError) -> Flow {
        {
            let mut inner = self.shared.lock();
            inner.connected = false;
            inner.errors += 1;
            inner.last_error = Some(error.to_string());
            self.shared.publish_state(&inner);
        }
        // Events rumqttc queued before failing (acks read in the same batch, publishes written).
        let stale: Vec<Event> = self.eventloop.state.events.drain(..).collect();
        for event in stale {
            if let Flow::Stop = self.handle(event).await {
                return Flow::Stop;
            }
        }
        let pending: Vec<Request> = self.eventloop.pending.drain(..).collect();
        let mut inner = self.shared.lock();
        let mut tracked: Vec<Entry> = inner.handed.drain(..).collect();
        tracked.extend(inner.inflight.drain().map(|(_, e)| e));
        tracked.extend(inner.collided.take());
        tracked.sort_by_key(|e| e.seq);
        // Publishes in `pending` the link does not know about (should not happen) are kept too.
        let mut unmatched: Vec<bool> = vec![true; tracked.len()];
        let mut unknown = Vec::new();
        let mut dropped_requests = 0usize;
        for request in pending {
            let Request::Publish(p) = request else {
                dropped_requests += 1;
                continue;
            };
            let found = tracked.iter().enumerate().position(|(i, e)| {
                unmatched[i]
                    && e.msg.topic.as_bytes() == &p.topic[..]
                    && e.msg.payload == p.payload
                    && e.msg.retain == p.retain
            });
            match found {
                Some(i) => unmatched[i] = false,
                None => match String::from_utf8(p.topic.to_vec()) {
                    Ok(topic) => unknown.push(Message::new(
                        topic,
                        p.payload,
                        QoS::from_rumqttc(p.qos),
                        p.retain,
                    )),
                    Err(_) => dropped_requests += 1,
                },
            }
        }
        if !unknown.is_empty() {
            warn!(
                count = unknown.len(),
                "Requeued publishes rumqttc held that the link did not track."
            );
        }
        let sticky_topics: Vec<String> = inner.sticky.iter().map(|(t, _)| t.clone()).collect();
        let is_sticky = |m: &Message| m.retain && sticky_topics.contains(&m.topic);
        let mut requeue: Vec<Entry> = Vec::new();
        for m in unknown {
            if !is_sticky(&m) {
                let e = inner.entry(m, Keep::No);
                requeue.push(e);
            }
        }
        requeue.extend(tracked.into_iter().filter(|e| e.keep != Keep::Sticky));
        let count = requeue.len();
        for e in requeue.into_iter().rev() {
            inner.outbox.push_front(e);
        }
        inner.enforce_capacity();
        inner.acks.clear();
        inner.subs_to_send.clear();
        if count > 0 || dropped_requests > 0 {
            debug!(
                requeued = count,
                discarded_requests = dropped_requests,
                "Recovered unacknowledged messages after a connection error."
            );
        }
        self.shared.publish_state(&inner);
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    //! The outbox policy, without a broker.
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn push(inner: &mut Inner, msg: Message, keep: Keep) {
        let e = inner.entry(msg, keep);
        inner.outbox.push_back(e);
        inner.enforce_capacity();
    }

    #[test]
    fn a_burst_of_acks_past_capacity_drops_only_output_and_closes_the_intake() {
        let count = Arc::new(AtomicU64::new(0));
        let c2 = count.clone();
        let hook = DropHook::new(move |m: &Message| {
            assert_eq!(m.topic, "s/output", "only output is dropped");
            c2.fetch_add(1, Ordering::Relaxed);
        });
        let mut inner = Inner::new(8, 1 << 20, Some(hook));
        assert!(inner.has_room());
        // 1000 submissions answered while nothing drains: an ack each, and output in between.
        for i in 0..1000 {
            push(
                &mut inner,
                Message::event("s/submit_status", format!("ack {i}")),
                Keep::No,
            );
            // Output is QoS 1 as well: marked as output, it is dropped and never counted.
            push(
                &mut inner,
                Message::event("s/output", format!("line {i}")),
                Keep::Output,
            );
            if i == 6 {
                assert!(inner.has_room(), "7 acks wait, capacity 8");
            }
            if i == 7 {
                assert!(!inner.has_room(), "8 acks wait: take no more submissions");
            }
        }
        let acks: Vec<String> = inner
            .outbox
            .iter()
            .filter(|e| e.keep == Keep::No)
            .map(|e| String::from_utf8_lossy(&e.msg.payload).into_owned())
            .collect();
        let want: Vec<String> = (0..1000).map(|i| format!("ack {i}")).collect();
        assert_eq!(acks, want, "every ack kept, in order");
        assert_eq!(inner.outbox.len(), 1000, "no output left: only acks");
        assert_eq!(inner.dropped, 1000);
        assert_eq!(count.load(Ordering::Relaxed), 1000, "on_drop saw each drop");
        let s = inner.snapshot();
        assert_eq!((s.reliable_queued, s.queued, s.dropped), (1000, 1000, 1000));
        assert!(!inner.has_room());
        // The task blocked on a full incoming channel opens the intake (no deadlock) ...
        inner.delivery_blocked = true;
        assert!(inner.has_room());
        inner.delivery_blocked = false;
        // ... and so does the backlog draining below the capacity.
        inner.outbox.drain(..993);
        assert!(inner.has_room());
    }

    #[test]
    fn output_under_capacity_is_kept_and_the_oldest_goes_first() {
        let mut inner = Inner::new(3, 1 << 20, None);
        for i in 0..5 {
            push(
                &mut inner,
                Message::stream("s/output", format!("{i}")),
                Keep::Output,
            );
        }
        let left: Vec<&[u8]> = inner.outbox.iter().map(|e| &e.msg.payload[..]).collect();
        assert_eq!(left, [&b"2"[..], b"3", b"4"]);
        assert_eq!(inner.dropped, 2);
        assert!(inner.has_room(), "output never closes the intake");
        // A QoS 0 message that is not output (a heartbeat) is never dropped: output goes.
        for i in 0..3 {
            push(
                &mut inner,
                Message::stream("s/heartbeat", format!("h{i}")),
                Keep::No,
            );
        }
        let left: Vec<&[u8]> = inner.outbox.iter().map(|e| &e.msg.payload[..]).collect();
        assert_eq!(left, [&b"h0"[..], b"h1", b"h2"]);
        push(&mut inner, Message::stream("s/heartbeat", "h3"), Keep::No);
        assert_eq!(
            inner.outbox.len(),
            4,
            "no output left to drop: the outbox grows"
        );
        assert_eq!(inner.dropped, 5);
    }

    #[test]
    fn sticky_states_do_not_count_against_the_intake_but_each_values_do() {
        let mut inner = Inner::new(2, 1 << 20, None);
        for _ in 0..3 {
            let e = inner.entry(Message::state("s/agent", "x"), Keep::Sticky);
            inner.outbox.push_back(e);
        }
        assert!(inner.has_room());
        for _ in 0..2 {
            let e = inner.entry(Message::state("s/last_job", "y"), Keep::Each);
            inner.outbox.push_back(e);
        }
        assert!(!inner.has_room());
        inner.enforce_capacity();
        assert_eq!(inner.outbox.len(), 5, "nothing but output is dropped");
    }
}
