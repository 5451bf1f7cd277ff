//! [`LinkOptions`] (everything `MqttLink::start` needs, from a broker URL or field by field),
//! the [`DropHook`] called for dropped output, and their translation into rumqttc's options.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::LastWill;
use rumqttc::v5::MqttOptions;
use rumqttc::{TlsConfiguration, Transport};

use crate::broker_url;
use crate::error::{LinkError, UrlError};
use crate::message::{valid_topic, Message, PUBLISH_OVERHEAD};
use crate::outbox::INFLIGHT_UPPER_LIMIT;
use crate::tls::{self, SYSTEM_CA_BUNDLE};

/// Called with every message the outbox's overflow policy drops (always live output, see
/// [`crate::MqttLink::publish_output`]),
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

/// Everything [`crate::MqttLink::start`] needs. Build with [`LinkOptions::new`] or
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
    /// fill [`crate::Incoming`]. Default `None` (the broker's default, 65535).
    pub receive_maximum: Option<u16>,
    /// Capacity of the outbox, in messages. Default 1024. See the overflow policy in the
    /// module documentation.
    pub queue_capacity: usize,
    /// Capacity of the [`crate::Incoming`] channel. Default 256.
    pub incoming_capacity: usize,
    /// When true, incoming QoS 1 messages are acknowledged only by [`crate::MqttLink::ack`].
    pub manual_acks: bool,
    /// MQTT 5 clean start. Default true.
    pub clean_start: bool,
    /// MQTT 5 session expiry interval; `None` means the session ends with the connection.
    /// A persistent session needs `clean_start = false` *and* an expiry.
    pub session_expiry: Option<Duration>,
    /// Last will, published by the broker when the connection dies without a DISCONNECT.
    pub will: Option<Message>,
    /// Called for every message the overflow policy drops (live output only), besides the
    /// count in [`crate::LinkState::dropped`].
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
        let parsed = broker_url::parse_url(url)?;
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

/// rumqttc's options for `o`, after checking every field is in range.
pub(crate) fn rumqttc_options(o: &LinkOptions) -> Result<MqttOptions, LinkError> {
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
        if !valid_topic(&w.topic) {
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
            Some(pem) => tls::tls_config_pem(pem.as_bytes())?,
            None => tls::tls_config(&o.ca_file.clone().unwrap_or_else(|| SYSTEM_CA_BUNDLE.into()))?,
        };
        m.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(config),
        )));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_out_of_range_are_refused() {
        let ok = LinkOptions::new("c", "h", 1883);
        assert!(rumqttc_options(&ok).is_ok());
        type Break = fn(&mut LinkOptions);
        let cases: [(&str, Break); 6] = [
            ("client_id", |o| o.client_id.clear()),
            ("keep_alive", |o| o.keep_alive = Duration::from_secs(1)),
            ("backoff_min", |o| o.backoff_min = Duration::ZERO),
            ("max_packet_size", |o| o.max_packet_size = 10),
            ("queue_capacity", |o| o.queue_capacity = 0),
            ("receive_maximum", |o| o.receive_maximum = Some(1000)),
        ];
        for (field, break_it) in cases {
            let mut o = ok.clone();
            break_it(&mut o);
            let e = rumqttc_options(&o).unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
    }
}
