//! # labvisor-protocol
//!
//! The ground every labvisor binary stands on:
//!
//! - [`name`]: the validated SUT name ([`SutName`]), the one thing that becomes a container name
//!   and an MQTT topic level.
//! - [`config`]: the SUT config schema (one TOML file per device in `sut/`), parsed into types
//!   that cannot hold invalid values, with validation that reports every problem as
//!   `file: key: problem`.
//! - [`topics`]: the only place topic strings exist.
//! - [`payloads`]: the versioned JSON payloads carried on those topics.
//! - [`heartbeat`]: the heartbeat file the agent writes and `labvisor-healthcheck` reads.
//! - [`mqtt`]: [`mqtt::MqttLink`], a wrapper around rumqttc that fixes what rumqttc leaves to its
//!   users: reconnect backoff, resubscribe and birth on every ConnAck, our own bounded outbox,
//!   a packet-size cap enforced before sending, last will and a clean "offline".
//!
//! See [`topics`] for the topic table.

pub mod config;
pub mod heartbeat;
pub mod mqtt;
pub mod name;
pub mod payloads;
pub mod submit;
pub mod topics;

pub use name::{NameError, SutName};
