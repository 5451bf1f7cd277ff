//! What travels over the link: [`Message`] (outgoing), [`Received`] (incoming), [`QoS`], and the
//! checks every topic and message passes ([`valid_topic`], [`Message::encoded_size`]).
//!
//! The link is topic-agnostic: topics are built by `labvisor_protocol::topics`.

use bytes::Bytes;
use tokio::sync::mpsc;

/// rumqttc's MQTT 5 PUBLISH packet, as carried by [`Received::publish`].
pub use rumqttc::v5::mqttbytes::v5::Publish;

/// Bytes reserved for the fixed header, the packet id and the properties of a PUBLISH packet
/// when checking a message against the maximum packet size.
pub const PUBLISH_OVERHEAD: usize = 64;

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
    pub(crate) epoch: u64,
}

impl Received {
    /// The message of `p`, received on connection `epoch`; `None` when its topic is not UTF-8.
    pub(crate) fn new(p: Publish, epoch: u64) -> Option<Self> {
        let topic = String::from_utf8(p.topic.to_vec()).ok()?;
        let props = p.properties.clone().unwrap_or_default();
        Some(Received {
            topic,
            payload: p.payload.clone(),
            qos: QoS::from_rumqttc(p.qos),
            retain: p.retain,
            response_topic: props.response_topic,
            correlation_data: props.correlation_data,
            publish: p,
            epoch,
        })
    }

    /// The MQTT 5 user properties of the message (empty when it had none).
    pub fn user_properties(&self) -> Vec<(String, String)> {
        self.publish
            .properties
            .as_ref()
            .map(|p| p.user_properties.clone())
            .unwrap_or_default()
    }
}

/// Receiver of incoming publishes; see "Incoming" in the crate documentation.
pub type Incoming = mpsc::Receiver<Received>;

/// Whether rumqttc accepts `topic` as a topic name for publishing: not empty, no wildcard
/// (`+`, `#`) nor NUL, at most 65535 bytes.
pub(crate) fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0']) && topic.len() <= u16::MAX as usize
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn a_received_message_keeps_its_properties_and_epoch() {
        let mut p = Publish::new(
            "s/submit",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            "x",
            None,
        );
        p.properties = Some(rumqttc::v5::mqttbytes::v5::PublishProperties {
            response_topic: Some("s/reply".into()),
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        });
        let r = Received::new(p, 7).unwrap();
        assert_eq!(
            (r.topic.as_str(), r.qos, r.epoch),
            ("s/submit", QoS::AtLeastOnce, 7)
        );
        assert_eq!(r.response_topic.as_deref(), Some("s/reply"));
        assert_eq!(r.user_properties(), [("k".to_string(), "v".to_string())]);
        let mut bad = Publish::new("", rumqttc::v5::mqttbytes::QoS::AtMostOnce, "", None);
        bad.topic = Bytes::from_static(&[0xff, 0xfe]);
        assert!(Received::new(bad, 1).is_none());
    }
}
