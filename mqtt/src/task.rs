//! The polling task: the only owner of rumqttc's `EventLoop`. It loops on `poll()`, turns each
//! event into a call on the shared [`crate::state::LinkCore`] (which pumps the outbox), delivers
//! incoming publishes, and after a connection error recovers what rumqttc would lose and sleeps
//! as the [`Reconnect`] policy says. `poll()` is never cancelled while connected (it is not
//! cancel-safe mid-write); it is raced only against "every handle dropped", the shutdown
//! deadline, and, while not connected, a shutdown request.

use std::sync::Arc;

use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{ConnectionError, Event, EventLoop, Request};
use rumqttc::Outgoing;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::link::Shared;
use crate::message::{Message, Publish, QoS, Received};
use crate::options::LinkOptions;
use crate::reconnect::Reconnect;

/// What the loop does after an event.
enum Flow {
    Continue,
    Stop,
}

/// The polling task: owns the `EventLoop`.
pub(crate) struct Task {
    eventloop: EventLoop,
    shared: Arc<Shared>,
    alive: watch::Receiver<()>,
    incoming: mpsc::Sender<Received>,
    reconnect: Reconnect,
    incoming_full_logged: bool,
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

impl Task {
    pub(crate) fn new(
        eventloop: EventLoop,
        shared: Arc<Shared>,
        alive: watch::Receiver<()>,
        incoming: mpsc::Sender<Received>,
        opts: &LinkOptions,
    ) -> Self {
        Task {
            eventloop,
            shared,
            alive,
            incoming,
            reconnect: Reconnect::new(opts.backoff_min, opts.backoff_max),
            incoming_full_logged: false,
        }
    }

    /// Polls until every handle is dropped, the shutdown deadline passes, or the shutdown is
    /// done (DISCONNECT sent, or nothing left to send while disconnected).
    pub(crate) async fn run(mut self) {
        loop {
            let (deadline, connected) = {
                let core = self.shared.lock();
                (core.closing(), core.is_connected())
            };
            let polled = tokio::select! {
                biased;
                _ = self.alive.changed() => {
                    debug!("Every link handle was dropped; closing the connection without DISCONNECT.");
                    break;
                }
                _ = sleep_until_opt(deadline) => {
                    warn!("Shutdown deadline passed; closing the connection.");
                    break;
                }
                _ = self.shared.wake.notified(), if !connected => {
                    if self.shared.lock().idle_shutdown() { break; }
                    continue;
                }
                polled = self.eventloop.poll() => polled,
            };
            let flow = match polled {
                Ok(event) => self.handle(event).await,
                Err(error) => self.fail(&error).await,
            };
            if let Flow::Stop = flow {
                break;
            }
        }
        let mut core = self.shared.lock();
        core.task_ended();
        self.shared.publish_state(&core);
    }

    /// After a `poll()` error: recovers, then sleeps out the backoff (cut short by the end of
    /// the link, the shutdown deadline, or a shutdown request).
    async fn fail(&mut self, error: &ConnectionError) -> Flow {
        if let Flow::Stop = self.recover(error).await {
            return Flow::Stop;
        }
        if self.shared.lock().idle_shutdown() {
            return Flow::Stop;
        }
        let delay = self.reconnect.next_delay(fastrand::f64() * 2.0 - 1.0);
        warn!(error = %error, backoff_ms = delay.as_millis() as u64,
            "MQTT connection failed; reconnecting after a backoff.");
        let deadline = self.shared.lock().closing();
        tokio::select! {
            biased;
            _ = self.alive.changed() => Flow::Stop,
            _ = sleep_until_opt(deadline) => Flow::Stop,
            // A shutdown request cuts the backoff short: finals go out as soon as possible.
            _ = self.shared.wake.notified() => {
                if self.shared.lock().idle_shutdown() { Flow::Stop } else { Flow::Continue }
            }
            _ = tokio::time::sleep(delay) => Flow::Continue,
        }
    }

    async fn handle(&mut self, event: Event) -> Flow {
        match event {
            Event::Incoming(Packet::Publish(p)) => return self.deliver(p).await,
            Event::Incoming(Packet::ConnAck(ack)) => {
                self.reconnect.connected();
                let props = ack.properties.as_ref();
                let mut core = self.shared.lock();
                core.connected(
                    props.and_then(|p| p.max_packet_size),
                    props.and_then(|p| p.receive_max),
                );
                info!(
                    session_present = ack.session_present,
                    connects = core.connects(),
                    "Connected to the MQTT broker."
                );
            }
            Event::Incoming(Packet::SubAck(_)) => self.shared.lock().subscribed(),
            Event::Incoming(Packet::PubAck(ack)) => {
                let known = self.shared.lock().outbox.acked(ack.pkid);
                if !known {
                    debug!(
                        pkid = ack.pkid,
                        "PubAck for a publish the link does not track."
                    );
                }
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let known = self.shared.lock().outbox.written(pkid);
                if !known {
                    debug!(pkid, "Wrote a publish the link does not track.");
                }
            }
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                warn!(pkid, "rumqttc parked a publish on a packet-id collision.");
                self.shared.lock().outbox.collided();
            }
            Event::Outgoing(Outgoing::Disconnect) if self.shared.lock().closing().is_some() => {
                info!("Disconnected cleanly from the MQTT broker.");
                return Flow::Stop;
            }
            _ => {}
        }
        let mut core = self.shared.lock();
        core.pump(&self.shared.client);
        self.shared.publish_state(&core);
        Flow::Continue
    }

    /// Hands an incoming publish to the application; waits for room when [`crate::Incoming`] is
    /// full (see "Incoming" in the crate documentation), unless shutting down.
    async fn deliver(&mut self, p: Publish) -> Flow {
        let (epoch, closing) = {
            let core = self.shared.lock();
            (core.epoch(), core.closing().is_some())
        };
        let Some(received) = Received::new(p, epoch) else {
            warn!("Dropped an incoming message whose topic is not UTF-8.");
            return Flow::Continue;
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
            warn!("The incoming channel is full; the link waits for the application to drain it.");
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
        let mut core = self.shared.lock();
        core.set_delivery_blocked(blocked);
        self.shared.publish_state(&core);
    }

    /// After a `poll()` error: handles the events rumqttc buffered, drains its `pending` queue
    /// (which it would silently clear on a ConnAck without a session), and requeues every
    /// unacknowledged message at the front of the outbox in original order.
    async fn recover(&mut self, error: &ConnectionError) -> Flow {
        {
            let mut core = self.shared.lock();
            core.failed(error.to_string());
            self.shared.publish_state(&core);
        }
        // Events rumqttc queued before failing (acks read in the same batch, publishes written).
        let stale: Vec<Event> = self.eventloop.state.events.drain(..).collect();
        for event in stale {
            if let Flow::Stop = self.handle(event).await {
                return Flow::Stop;
            }
        }
        let mut publishes = Vec::new();
        let mut discarded = 0usize;
        for request in self.eventloop.pending.drain(..) {
            match request {
                Request::Publish(p) => match String::from_utf8(p.topic.to_vec()) {
                    Ok(topic) => publishes.push(Message::new(
                        topic,
                        p.payload,
                        QoS::from_rumqttc(p.qos),
                        p.retain,
                    )),
                    Err(_) => discarded += 1,
                },
                // Subscriptions are re-issued on ConnAck; acks and pings belong to the dead
                // connection.
                _ => discarded += 1,
            }
        }
        let mut core = self.shared.lock();
        let r = core.recover(publishes);
        if r.unknown > 0 {
            warn!(
                count = r.unknown,
                "Requeued publishes rumqttc held that the link did not track."
            );
        }
        if r.requeued > 0 || discarded > 0 {
            debug!(
                requeued = r.requeued,
                discarded_requests = discarded,
                "Recovered unacknowledged messages after a connection error."
            );
        }
        self.shared.publish_state(&core);
        Flow::Continue
    }
}
