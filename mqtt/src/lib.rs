//! # labvisor-mqtt: the MQTT link
//!
//! [`MqttLink`] is labvisor's only way to talk MQTT. It wraps `rumqttc::v5` (MQTT 5, so that
//! jobs can use the response-topic property; mosquitto serves 3.1.1 and 5 on one port) and fixes
//! what rumqttc leaves to its users (see `shared/notes/deps.md`, "Pitfalls"): reconnect delays,
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
//! sleeps first: `backoff_min * 2^(n-1)` capped at `backoff_max` (backon's exponential backoff),
//! ±20 % jitter, never above `backoff_max`, where `n` counts failures since the last ConnAck. A
//! shutdown request cuts the sleep short.
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
//! connection). An unsubscription not yet taken by rumqttc is kept for the next connection and
//! goes before the subscriptions re-issued there, since a persistent session may still hold it. Sticky messages are not requeued: ConnAck republishes their latest value.
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
//!
//! ## Layout
//!
//! It is a crate of its own because it knows no labvisor topic or payload (those are
//! `labvisor-protocol`'s) and is the only crate that needs rumqttc and rustls. The policy is
//! pure and apart from the network, as rumqttc keeps its `state.rs` apart from its event loop:
//!
//! - `outbox`: the outbox policy as a state machine without I/O: queueing, overflow (only
//!   output is dropped), back-pressure, in-flight tracking, requeue after an error, sticky
//!   republish on ConnAck. Unit-tested without a broker.
//! - `reconnect`: the reconnect delays (pure; backon plus ±20 % jitter given as an input).
//! - `state`: the outbox plus the connection's bookkeeping (subscriptions, acks, epoch, packet
//!   limit, shutdown), pumping into a `Sink` (rumqttc's request channel, or a fake in tests).
//! - `link`: [`MqttLink`], the handle; `task`: the polling task that owns the `EventLoop`.
//! - `message`, `options`, `broker_url` (parsed with `url`), `tls`, `error`: the types.
//!
//! The tests against a real mosquitto are in `tests/mqtt_link.rs`.

mod broker_url;
mod error;
mod link;
mod message;
mod options;
mod outbox;
mod reconnect;
mod state;
mod task;
mod tls;

pub use broker_url::{DEFAULT_PORT, DEFAULT_TLS_PORT};
pub use error::{AckError, LinkError, PublishError, UrlError};
pub use link::MqttLink;
pub use message::{Incoming, Message, Publish, QoS, Received, PUBLISH_OVERHEAD};
pub use options::{DropHook, LinkOptions};
pub use reconnect::BACKOFF_JITTER;
pub use state::LinkState;
pub use tls::{tls_config, tls_config_pem};
