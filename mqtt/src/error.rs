//! The link's errors: refused URLs, refused messages, refused acks, and failures to start or
//! shut down.

use std::path::PathBuf;

/// Why a broker URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// No `scheme://`.
    #[error("broker URL {0:?} has no scheme: expected mqtt://host[:port] or mqtts://host[:port]")]
    MissingScheme(String),
    /// A scheme other than `mqtt` or `mqtts`.
    #[error("broker URL scheme {0:?} is not supported: use mqtt:// or mqtts://")]
    UnsupportedScheme(String),
    /// The host part is empty.
    #[error("broker URL {0:?} has no host")]
    MissingHost(String),
    /// The port is not a number in 1..=65535 (holds the port as written).
    #[error("broker URL port {0:?} is not a number between 1 and 65535")]
    InvalidPort(String),
    /// A path, query or fragment follows the authority.
    #[error("broker URL must not have a path, query or fragment; found {0:?}")]
    UnexpectedSuffix(String),
    /// A `%` escape in the user or password is malformed.
    #[error("broker URL user or password has an invalid percent escape")]
    InvalidEscape,
    /// An IPv6 host lacks its closing bracket.
    #[error("broker URL IPv6 host in {0:?} lacks its closing ']'")]
    UnclosedBracket(String),
    /// Anything else the URL parser refused (a character not allowed in a host, ...).
    #[error("broker URL {url:?} is not a valid URL: {reason}")]
    Invalid {
        /// The URL.
        url: String,
        /// The parser's reason.
        reason: String,
    },
}

/// Why a message was not accepted by [`crate::MqttLink::publish`] or
/// [`crate::MqttLink::set_sticky`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The message would exceed the maximum packet size; split it (see
    /// [`crate::MqttLink::max_payload`]).
    #[error("message on {topic:?} is {size} bytes with overhead, over the maximum packet size of {max} bytes")]
    Oversize {
        /// Topic of the refused message.
        topic: String,
        /// Topic + payload + [`PUBLISH_OVERHEAD`](crate::PUBLISH_OVERHEAD).
        size: usize,
        /// The effective maximum packet size.
        max: usize,
    },
    /// The topic is empty or contains a wildcard (`+`, `#`) or NUL.
    #[error("topic {0:?} is not a valid MQTT topic name")]
    InvalidTopic(String),
    /// The link was shut down or its task ended.
    #[error("the MQTT link is closed")]
    Closed,
}

/// Why [`crate::MqttLink::ack`] did not acknowledge a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    /// The connection the message arrived on is gone; the broker redelivers it if the session
    /// persists.
    #[error("the connection this message arrived on is gone")]
    Stale,
    /// The link was shut down or its task ended.
    #[error("the MQTT link is closed")]
    Closed,
}

/// Errors of starting or shutting down the link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// An option is out of range.
    #[error("invalid MQTT link option: {0}")]
    Options(String),
    /// The CA file cannot be read or holds no certificate.
    #[error("cannot load the TLS CA file {path}: {reason}")]
    CaFile {
        /// The CA file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The CA certificates given as PEM text ([`LinkOptions::ca_pem`](crate::LinkOptions::ca_pem)) hold no certificate or
    /// a malformed one.
    #[error("cannot load the TLS CA certificates given as PEM: {0}")]
    CaPem(String),
    /// The TLS configuration cannot be built.
    #[error("cannot configure TLS: {0}")]
    Tls(String),
    /// The deadline passed before the final messages were acknowledged and the DISCONNECT sent.
    #[error("MQTT link shutdown deadline passed; final messages may not have reached the broker")]
    ShutdownDeadline,
    /// The link was already shut down (or is being shut down by another handle).
    #[error("the MQTT link is closed")]
    Closed,
}
