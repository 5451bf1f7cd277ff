//! Options, messages, errors and the pure helpers (URL parser, backoff) of the MQTT link.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

/// Bytes reserved for the fixed header, the packet id and the properties of a PUBLISH packet
/// when checking a message against the maximum packet size.
pub const PUBLISH_OVERHEAD: usize = 64;

/// Default MQTT port for `mqtt://`.
pub const DEFAULT_PORT: u16 = 1883;

/// Default MQTT port for `mqtts://`.
pub const DEFAULT_TLS_PORT: u16 = 8883;

/// Delivery guarantee of a message. QoS 2 is not offered: it costs two more round trips and buys
/// nothing end to end (see `shared/notes/deps.md` §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QoS {
    /// Fire and forget (QoS 0).
    AtMostOnce,
    /// Acknowledged by the broker, possibly delivered more than once (QoS 1).
    AtLeastOnce,
}

impl QoS {
    pub(crate) fn to_rumqttc(self) -> rumqttc::v5::mqttbytes::QoS {
        match self {
            QoS::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
            QoS::AtLeastOnce => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        }
    }

    /// Maps rumqttc's QoS to ours; QoS 2 (never requested by the link) maps to `AtLeastOnce`.
    pub(crate) fn from_rumqttc(qos: rumqttc::v5::mqttbytes::QoS) -> QoS {
        match qos {
            rumqttc::v5::mqttbytes::QoS::AtMostOnce => QoS::AtMostOnce,
            _ => QoS::AtLeastOnce,
        }
    }
}

/// One outgoing MQTT message. The link is topic-agnostic: topics are built by `labvisor_protocol::topics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic name (no wildcards).
    pub topic: String,
    /// Payload bytes.
    pub payload: Bytes,
    /// Delivery guarantee.
    pub qos: QoS,
    /// Whether the broker keeps this as the topic's retained message.
    pub retain: bool,
    /// MQTT 5 user properties (for example output sequence numbers).
    pub user_properties: Vec<(String, String)>,
    /// MQTT 5 correlation data, echoed when answering a request's response topic.
    pub correlation_data: Option<Bytes>,
}

impl Message {
    /// A message with every field given.
    pub fn new(
        topic: impl Into<String>,
        payload: impl Into<Bytes>,
        qos: QoS,
        retain: bool,
    ) -> Self {
        Message {
            topic: topic.into(),
            payload: payload.into(),
            qos,
            retain,
            user_properties: Vec::new(),
            correlation_data: None,
        }
    }

    /// The same message with these MQTT 5 user properties.
    pub fn with_properties(mut self, props: Vec<(String, String)>) -> Self {
        self.user_properties = props;
        self
    }

    /// The same message with this MQTT 5 correlation data.
    pub fn with_correlation(mut self, data: Option<Bytes>) -> Self {
        self.correlation_data = data;
        self
    }

    /// Whether the message carries MQTT 5 properties.
    pub fn has_properties(&self) -> bool {
        !self.user_properties.is_empty() || self.correlation_data.is_some()
    }

    /// A state message: QoS 1 and retained (status, last will, "offline").
    pub fn state(topic: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self::new(topic, payload, QoS::AtLeastOnce, true)
    }

    /// An event: QoS 1, not retained (job acknowledgements and progress).
    pub fn event(topic: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self::new(topic, payload, QoS::AtLeastOnce, false)
    }

    /// A stream item: QoS 0, not retained (heartbeats, output lines).
    pub fn stream(topic: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self::new(topic, payload, QoS::AtMostOnce, false)
    }

    /// Size this message is accounted for against the maximum packet size.
    pub fn encoded_size(&self) -> usize {
        self.topic.len()
            + self.payload.len()
            + PUBLISH_OVERHEAD
            + self
                .user_properties
                .iter()
                .map(|(k, v)| k.len() + v.len() + 5)
                .sum::<usize>()
            + self.correlation_data.as_ref().map_or(0, |c| c.len() + 3)
    }
}

/// Called with every message the outbox's overflow policy drops (always live output, see
/// [`super::MqttLink::publish_output`]),
/// under the link's lock: count, never call the link from it. See [`LinkOptions::on_drop`].
#[derive(Clone)]
pub struct DropHook(Arc<dyn Fn(&Message) + Send + Sync>);

impl DropHook {
    /// A hook calling `f`.
    pub fn new(f: impl Fn(&Message) + Send + Sync + 'static) -> Self {
        DropHook(Arc::new(f))
    }

    pub(crate) fn call(&self, msg: &Message) {
        (self.0)(msg)
    }
}

impl std::fmt::Debug for DropHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DropHook")
    }
}

/// Everything [`super::MqttLink::start`] needs. Build with [`LinkOptions::new`] or
/// [`LinkOptions::from_url`], then adjust the public fields.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// Broker host name or IP address.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Use TLS (rustls with ring).
    pub tls: bool,
    /// PEM file with the CA certificate(s) to trust for TLS. Without it, TLS uses
    /// `/etc/ssl/certs/ca-certificates.crt` when present.
    pub ca_file: Option<PathBuf>,
    /// The CA certificate(s) to trust for TLS as PEM text (what `labvisor supervise` gives its
    /// agents in `LABVISOR_MQTT_CA_PEM`); takes precedence over `ca_file`.
    pub ca_pem: Option<String>,
    /// MQTT client id; required and stable (agents use `labvisor-agent-<sut>`).
    pub client_id: String,
    /// User name for broker authentication.
    pub username: Option<String>,
    /// Password for broker authentication (sent only with a user name).
    pub password: Option<String>,
    /// Keep-alive interval (at least 5 s, rumqttc's minimum). Default 15 s: a half-open
    /// connection is detected within about one and a half intervals.
    pub keep_alive: Duration,
    /// Time allowed for TCP, TLS and CONNECT/CONNACK (whole seconds, at least 1). Default 5 s.
    pub connect_timeout: Duration,
    /// First reconnect delay, and the delay after a successful ConnAck. Default 100 ms.
    pub backoff_min: Duration,
    /// Cap of the exponential reconnect delay. Default 10 s.
    pub backoff_max: Duration,
    /// Maximum MQTT packet size, both directions. Default 256 KiB.
    pub max_packet_size: usize,
    /// MQTT 5 receive maximum announced to the broker: it sends at most this many QoS 1
    /// messages that the link has not acknowledged. With `manual_acks` this bounds what is read
    /// ahead of the application; keep it at most `incoming_capacity`, so QoS 1 deliveries never
    /// fill [`super::Incoming`]. Default `None` (the broker's default, 65535).
    pub receive_maximum: Option<u16>,
    /// Capacity of the outbox, in messages. Default 1024. See the overflow policy in the
    /// module documentation.
    pub queue_capacity: usize,
    /// Capacity of the [`super::Incoming`] channel. Default 256.
    pub incoming_capacity: usize,
    /// When true, incoming QoS 1 messages are acknowledged only by [`super::MqttLink::ack`].
    pub manual_acks: bool,
    /// MQTT 5 clean start. Default true.
    pub clean_start: bool,
    /// MQTT 5 session expiry interval; `None` means the session ends with the connection.
    /// A persistent session needs `clean_start = false` *and* an expiry.
    pub session_expiry: Option<Duration>,
    /// Last will, published by the broker when the connection dies without a DISCONNECT.
    pub will: Option<Message>,
    /// Called for every message the overflow policy drops (live output only), besides the
    /// count in [`super::LinkState::dropped`].
    pub on_drop: Option<DropHook>,
}

impl LinkOptions {
    /// Options for a plain TCP broker at `host:port`, with every default.
    pub fn new(client_id: impl Into<String>, host: impl Into<String>, port: u16) -> Self {
        LinkOptions {
            host: host.into(),
            port,
            tls: false,
            ca_file: None,
            ca_pem: None,
            client_id: client_id.into(),
            username: None,
            password: None,
            keep_alive: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            max_packet_size: 256 * 1024,
            receive_maximum: None,
            queue_capacity: 1024,
            incoming_capacity: 256,
            manual_acks: false,
            clean_start: true,
            session_expiry: None,
            will: None,
            on_drop: None,
        }
    }

    /// Parses `mqtt://[user[:password]@]host[:port]` or `mqtts://…` (default ports 1883 and
    /// 8883). User and password may be percent-encoded; IPv6 hosts go in brackets.
    pub fn from_url(url: &str, client_id: impl Into<String>) -> Result<Self, UrlError> {
        let parsed = parse_url(url)?;
        let mut o = LinkOptions::new(client_id, parsed.host, parsed.port);
        o.tls = parsed.tls;
        o.username = parsed.username;
        o.password = parsed.password;
        Ok(o)
    }

    /// `host:port`, as logged in the `broker` field.
    pub fn broker(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

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
    /// The port is not a number in 1..=65535.
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
}

/// The parts of a broker URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParsedUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
}

pub(crate) fn parse_url(url: &str) -> Result<ParsedUrl, UrlError> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| UrlError::MissingScheme(url.to_owned()))?;
    let (tls, default_port) = match scheme.to_ascii_lowercase().as_str() {
        "mqtt" | "tcp" => (false, DEFAULT_PORT),
        "mqtts" | "ssl" => (true, DEFAULT_TLS_PORT),
        _ => return Err(UrlError::UnsupportedScheme(scheme.to_owned())),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, suffix) = rest.split_at(end);
    if !(suffix.is_empty() || suffix == "/") {
        return Err(UrlError::UnexpectedSuffix(suffix.to_owned()));
    }
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (username, password) = match userinfo {
        None => (None, None),
        Some(u) => match u.split_once(':') {
            Some((user, pass)) => (Some(percent_decode(user)?), Some(percent_decode(pass)?)),
            None => (Some(percent_decode(u)?), None),
        },
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| UrlError::UnclosedBracket(url.to_owned()))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| UrlError::InvalidPort(p.to_owned()))?,
            ),
        };
        (host, port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err(UrlError::MissingHost(url.to_owned()));
    }
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(UrlError::InvalidPort(p.to_owned())),
        },
    };
    Ok(ParsedUrl {
        tls,
        host: host.to_owned(),
        port,
        username: username.filter(|u| !u.is_empty()),
        password,
    })
}

fn percent_decode(s: &str) -> Result<String, UrlError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(UrlError::InvalidEscape)?;
            let hex = std::str::from_utf8(hex).map_err(|_| UrlError::InvalidEscape)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| UrlError::InvalidEscape)?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| UrlError::InvalidEscape)
}

/// Fraction of the delay added or removed at random.
pub const BACKOFF_JITTER: f64 = 0.2;

/// Delay before reconnect attempt number `failures` (1 after the first failure): `min * 2^(n-1)`
/// capped at `max`, then scaled by `1 + 0.2 * jitter` (`jitter` in `-1.0..=1.0`), and capped at
/// `max` again.
pub fn backoff_delay(failures: u32, min: Duration, max: Duration, jitter: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let base = min.saturating_mul(1u32 << exp).min(max);
    let factor = 1.0 + BACKOFF_JITTER * jitter.clamp(-1.0, 1.0);
    base.mul_f64(factor).min(max)
}

/// Why a message was not accepted by [`super::MqttLink::publish`] or
/// [`super::MqttLink::set_sticky`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The message would exceed the maximum packet size; split it (see
    /// [`super::MqttLink::max_payload`]).
    #[error("message on {topic:?} is {size} bytes with overhead, over the maximum packet size of {max} bytes")]
    Oversize {
        /// Topic of the refused message.
        topic: String,
        /// Topic + payload + [`PUBLISH_OVERHEAD`].
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

/// Why [`super::MqttLink::ack`] did not acknowledge a message.
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
    /// The CA certificates given as PEM text ([`LinkOptions::ca_pem`]) hold no certificate or
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

/// Is `topic` a topic name rumqttc will accept for publishing?
pub(crate) fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0']) && topic.len() <= u16::MAX as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn url_plain_with_default_port() {
        let p = parse_url("mqtt://broker.lab").unwrap();
        assert_eq!(
            p,
            ParsedUrl {
                tls: false,
                host: "broker.lab".into(),
                port: 1883,
                username: None,
                password: None
            }
        );
    }

    #[test]
    fn url_tls_with_credentials_and_port() {
        let p = parse_url("mqtts://agent:s%3Acr%40t@10.0.0.1:9883/").unwrap();
        assert!(p.tls);
        assert_eq!(p.host, "10.0.0.1");
        assert_eq!(p.port, 9883);
        assert_eq!(p.username.as_deref(), Some("agent"));
        assert_eq!(p.password.as_deref(), Some("s:cr@t"));
        assert_eq!(parse_url("mqtts://h").unwrap().port, 8883);
    }

    #[test]
    fn url_ipv6_and_user_only() {
        let p = parse_url("mqtt://user@[::1]:1884").unwrap();
        assert_eq!(p.host, "::1");
        assert_eq!(p.port, 1884);
        assert_eq!(p.username.as_deref(), Some("user"));
        assert_eq!(p.password, None);
        assert_eq!(parse_url("mqtt://[fe80::2]").unwrap().port, 1883);
        let o = LinkOptions::from_url("mqtt://[::1]:1884", "c").unwrap();
        assert_eq!(o.broker(), "[::1]:1884");
        assert_eq!(o.client_id, "c");
    }

    #[test]
    fn url_errors() {
        use UrlError::*;
        assert!(matches!(parse_url("broker:1883"), Err(MissingScheme(_))));
        assert!(matches!(parse_url("http://h"), Err(UnsupportedScheme(s)) if s == "http"));
        assert!(matches!(parse_url("mqtt://"), Err(MissingHost(_))));
        assert!(matches!(parse_url("mqtt://:1883"), Err(MissingHost(_))));
        assert!(matches!(parse_url("mqtt://h:0"), Err(InvalidPort(_))));
        assert!(matches!(parse_url("mqtt://h:70000"), Err(InvalidPort(_))));
        assert!(matches!(parse_url("mqtt://h:x"), Err(InvalidPort(_))));
        assert!(matches!(
            parse_url("mqtt://h/topic"),
            Err(UnexpectedSuffix(_))
        ));
        assert!(matches!(
            parse_url("mqtt://h?client_id=x"),
            Err(UnexpectedSuffix(_))
        ));
        assert!(matches!(parse_url("mqtt://u:%zz@h"), Err(InvalidEscape)));
        assert!(matches!(parse_url("mqtt://[::1"), Err(UnclosedBracket(_))));
        assert!(matches!(parse_url("mqtt://[::1]x"), Err(InvalidPort(_))));
        // Errors read as sentences naming the culprit.
        let e = parse_url("http://h").unwrap_err().to_string();
        assert!(e.contains("\"http\"") && e.contains("mqtts://"), "{e}");
    }

    #[test]
    fn backoff_grows_doubles_and_caps() {
        let (min, max) = (ms(100), ms(10_000));
        assert_eq!(backoff_delay(1, min, max, 0.0), ms(100));
        assert_eq!(backoff_delay(2, min, max, 0.0), ms(200));
        assert_eq!(backoff_delay(4, min, max, 0.0), ms(800));
        assert_eq!(backoff_delay(8, min, max, 0.0), ms(10_000));
        assert_eq!(backoff_delay(u32::MAX, min, max, 0.0), ms(10_000));
        // attempt 0 (no failure yet) behaves like the first failure
        assert_eq!(backoff_delay(0, min, max, 0.0), ms(100));
    }

    #[test]
    fn backoff_jitter_is_bounded() {
        let (min, max) = (ms(100), ms(10_000));
        assert_eq!(backoff_delay(1, min, max, 1.0), ms(120));
        assert_eq!(backoff_delay(1, min, max, -1.0), ms(80));
        assert_eq!(backoff_delay(3, min, max, 5.0), ms(480)); // clamped to +20 %
        assert_eq!(backoff_delay(20, min, max, 1.0), ms(10_000)); // never above max
        assert_eq!(backoff_delay(20, min, max, -1.0), ms(8_000));
        for _ in 0..1000 {
            let d = backoff_delay(2, min, max, fastrand::f64() * 2.0 - 1.0);
            assert!(d >= ms(160) && d <= ms(240), "{d:?}");
        }
    }

    #[test]
    fn message_helpers() {
        let s = Message::state("a/status", "ready");
        assert_eq!((s.qos, s.retain), (QoS::AtLeastOnce, true));
        let e = Message::event("a/job", "x");
        assert_eq!((e.qos, e.retain), (QoS::AtLeastOnce, false));
        let t = Message::stream("a/output", "line");
        assert_eq!((t.qos, t.retain), (QoS::AtMostOnce, false));
        assert_eq!(t.encoded_size(), 8 + 4 + PUBLISH_OVERHEAD);
    }

    #[test]
    fn topic_validation() {
        assert!(valid_topic("a/b"));
        assert!(!valid_topic(""));
        assert!(!valid_topic("a/+"));
        assert!(!valid_topic("a/#"));
        assert!(!valid_topic("a\0b"));
    }
}
