//! [`MqttLink`], the handle: cheap to clone, synchronous, never blocking. Every call locks the
//! shared [`LinkCore`], applies the change, pumps into rumqttc's request channel (through the
//! [`Sink`] below, rumqttc's `try_*` calls) and publishes the new [`LinkState`]. The polling task
//! that owns the network is [`crate::task`].

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Filter, PublishProperties};
use rumqttc::v5::AsyncClient;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::error::{AckError, LinkError, PublishError};
use crate::message::{Incoming, Message, Publish, QoS, Received};
use crate::options::{rumqttc_options, LinkOptions};
use crate::outbox::Keep;
use crate::state::{LinkCore, LinkState, Sink, Subscription};
use crate::task::Task;

/// Capacity of rumqttc's request channel: small, so that our outbox (with its overflow policy)
/// holds the backlog, not rumqttc.
const REQUEST_CHANNEL_CAPACITY: usize = 16;

/// rumqttc's client is the sink: its `try_*` calls never block (no lock is held across an
/// `.await`, and the polling task cannot deadlock on its own channel, rumqtt#263).
impl Sink for AsyncClient {
    fn ack(&self, p: &Publish) -> bool {
        self.try_ack(p).is_ok()
    }

    fn subscribe(&self, sub: &Subscription) -> bool {
        let mut f = Filter::new(sub.filter.clone(), sub.qos.to_rumqttc());
        f.preserve_retain = sub.as_published;
        self.try_subscribe_many(std::iter::once(f)).is_ok()
    }

    fn unsubscribe(&self, filter: &str) -> bool {
        self.try_unsubscribe(filter.to_owned()).is_ok()
    }

    fn publish(&self, m: &Message) -> bool {
        let (topic, qos, payload) = (m.topic.clone(), m.qos.to_rumqttc(), m.payload.clone());
        let sent = if m.has_properties() {
            let props = PublishProperties {
                user_properties: m.user_properties.clone(),
                correlation_data: m.correlation_data.clone(),
                ..Default::default()
            };
            self.try_publish_with_properties(topic, qos, m.retain, payload, props)
        } else {
            self.try_publish(topic, qos, m.retain, payload)
        };
        sent.is_ok()
    }

    fn disconnect(&self) -> bool {
        self.try_disconnect().is_ok()
    }
}

/// What the handles and the polling task share.
pub(crate) struct Shared {
    core: Mutex<LinkCore>,
    state_tx: watch::Sender<LinkState>,
    /// [`LinkCore::has_room`], changed only when it flips.
    room_tx: watch::Sender<bool>,
    pub(crate) client: AsyncClient,
    /// Wakes the polling task while it is not connected (shutdown requested).
    pub(crate) wake: Notify,
    task: Mutex<Option<JoinHandle<()>>>,
    pub(crate) broker: String,
    pub(crate) client_id: String,
    manual_acks: bool,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, LinkCore> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn publish_state(&self, core: &LinkCore) {
        let room = core.has_room();
        self.room_tx
            .send_if_modified(|r| std::mem::replace(r, room) != room);
        let new = core.snapshot();
        self.state_tx.send_if_modified(|s| {
            if *s == new {
                false
            } else {
                *s = new;
                true
            }
        });
    }

    /// Runs `f` on the locked state with the client as sink, then publishes the state.
    fn with<T>(&self, f: impl FnOnce(&mut LinkCore, &AsyncClient) -> T) -> T {
        let mut core = self.lock();
        let out = f(&mut core, &self.client);
        self.publish_state(&core);
        out
    }
}

/// Dropped with the last [`MqttLink`] clone: tells the task that nobody is left.
struct Guard {
    _alive: watch::Sender<()>,
}

/// Handle to the MQTT link; cheap to clone. See the crate documentation.
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
        let mqtt = rumqttc_options(&opts)?;
        let (client, eventloop) = AsyncClient::new(mqtt, REQUEST_CHANNEL_CAPACITY);
        let core = LinkCore::new(
            opts.queue_capacity,
            opts.max_packet_size,
            opts.on_drop.clone(),
        );
        let (state_tx, _) = watch::channel(core.snapshot());
        let (room_tx, _) = watch::channel(core.has_room());
        let shared = Arc::new(Shared {
            core: Mutex::new(core),
            state_tx,
            room_tx,
            client,
            wake: Notify::new(),
            task: Mutex::new(None),
            broker: opts.broker(),
            client_id: opts.client_id.clone(),
            manual_acks: opts.manual_acks,
        });
        let (alive_tx, alive_rx) = watch::channel(());
        let (incoming_tx, incoming_rx) = mpsc::channel(opts.incoming_capacity);
        let task = Task::new(eventloop, shared.clone(), alive_rx, incoming_tx, &opts);
        let span = tracing::info_span!("mqtt_link", broker = %shared.broker,
            client_id = %shared.client_id);
        let handle = tokio::spawn(task.run().instrument(span));
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
    /// "Overflow policy" and "Back-pressure" in the crate documentation).
    pub fn publish(&self, msg: Message) -> Result<(), PublishError> {
        self.shared.with(|core, c| core.publish(msg, Keep::No, c))
    }

    /// Queues live output like [`MqttLink::publish`] (any QoS), except that it is the only kind
    /// of message the overflow policy drops (oldest first, counted in [`LinkState::dropped`] and
    /// handed to [`LinkOptions::on_drop`]), and that it never counts against
    /// [`MqttLink::has_room`]: output cannot close the intake nor push out an answer.
    pub fn publish_output(&self, msg: Message) -> Result<(), PublishError> {
        self.shared
            .with(|core, c| core.publish(msg, Keep::Output, c))
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
        self.shared.with(|core, c| core.set_sticky(msg, c))
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
        self.shared.with(|core, c| core.publish_each(msg, c))
    }

    /// Whether the application should take more incoming work: false while `queue_capacity` or
    /// more QoS 1 messages other than output wait in the outbox (see "Back-pressure" in the
    /// crate documentation).
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

    /// Unsubscribes from `filter` (as given to [`MqttLink::subscribe`]) and stops re-issuing it
    /// after a reconnect. Messages already on their way may still arrive on [`Incoming`].
    pub fn unsubscribe(&self, filter: impl Into<String>) -> Result<(), PublishError> {
        let filter = filter.into();
        self.shared.with(|core, c| core.unsubscribe(filter, c))
    }

    fn subscribe_with(
        &self,
        filter: String,
        qos: QoS,
        as_published: bool,
    ) -> Result<(), PublishError> {
        let sub = Subscription {
            filter,
            qos,
            as_published,
        };
        self.shared.with(|core, c| core.subscribe(sub, c))
    }

    /// Acknowledges a QoS 1 message received with `manual_acks` (a no-op for QoS 0 or without
    /// `manual_acks`). Call it after the message is durably recorded. Fails with
    /// [`AckError::Stale`] when the connection it arrived on is gone.
    pub fn ack(&self, received: &Received) -> Result<(), AckError> {
        let manual = self.shared.manual_acks;
        self.shared.with(|core, c| core.ack(received, manual, c))
    }

    /// Largest payload that fits one message on `topic` under the effective maximum packet
    /// size; split output accordingly.
    pub fn max_payload(&self, topic: &str) -> usize {
        self.shared.lock().max_payload(topic)
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
        self.shared
            .with(|core, c| core.begin_shutdown(finals, until, c))
            .map_err(|_| LinkError::Closed)?;
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
        self.shared.with(|core, _| core.close());
        if clean {
            Ok(())
        } else {
            Err(LinkError::ShutdownDeadline)
        }
    }
}
