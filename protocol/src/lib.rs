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
//! - [`heartbeat`]: the heartbeat file the agent writes and `labvisor-healthcheck` reads, and
//!   the healthy-state rule (the std-only crate `labvisor-heartbeat`, re-exported).
//! - [`MAX_PACKET_SIZE`]: the largest MQTT packet labvisor's brokers and links accept.
//!
//! The MQTT link itself (`MqttLink`, over rumqttc) is the crate `labvisor-mqtt`: it knows no
//! topic or payload, and this crate does not depend on it.
//!
//! See [`topics`] for the topic table.

pub mod config;
pub mod heartbeat;
pub mod name;
pub mod payloads;
pub mod submit;
pub mod topics;

pub use name::{NameError, SutName};

/// Largest MQTT packet a labvisor broker must accept, and the `max_packet_size` of the agent's
/// and the client's `labvisor_mqtt::LinkOptions`: the largest job submission
/// ([`MAX_PAYLOAD_LIMIT`](config::MAX_PAYLOAD_LIMIT), 8 MiB) plus 64 KiB for the topic,
/// properties and header. The shipped `mosquitto/mosquitto.conf` sets `max_packet_size` to it.
pub const MAX_PACKET_SIZE: usize = 8 * 1024 * 1024 + 64 * 1024;
const _: () = assert!(MAX_PACKET_SIZE >= config::MAX_PAYLOAD_LIMIT as usize + 64 * 1024);
