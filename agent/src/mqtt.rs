//! The agent's one door to the MQTT link: every other module takes the link's types from here,
//! so the link's crate (`labvisor_mqtt`) is named in one `use`. Also how the
//! agent opens its link: last will, persistent session, manual acks, subscriptions.

use std::time::Duration;

pub use labvisor_mqtt::{
    DropHook, Incoming, LinkError, LinkOptions, Message, MqttLink, PublishError, QoS, Received,
    UrlError,
};
use labvisor_protocol::topics::Topics;
use labvisor_protocol::SutName;
pub use labvisor_protocol::MAX_PACKET_SIZE;

/// How long the broker keeps the agent's session (and the submissions sent to it) while the
/// agent is gone.
pub const SESSION_EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);
/// MQTT 5 receive maximum of the agent's connection: submissions and cancels the broker sends
/// before the agent has answered (and acknowledged) the earlier ones. The broker holds the rest;
/// the agent stops taking them while its outbox of answers is full (see the link's
/// "Back-pressure").
pub const RECEIVE_MAXIMUM: u16 = 16;

/// Why the link could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The broker link could not start.
    #[error("cannot start the MQTT link: {0}")]
    Link(#[from] LinkError),
    /// A subscription was refused by the link.
    #[error("cannot subscribe: {0}")]
    Subscribe(#[from] PublishError),
}

/// Starts the agent's link to the broker: `will` is its last will (the retained `lost`
/// status), `on_drop` hears of every output message the link drops, and the link subscribes to
/// the SUT's submissions, cancels and admin commands.
pub fn connect(
    mut opts: LinkOptions,
    will: Message,
    on_drop: DropHook,
    topics: &Topics,
    sut: &SutName,
) -> Result<(MqttLink, Incoming), ConnectError> {
    opts.will = Some(will);
    // Submissions are acknowledged to the broker only once they are on disk, and a persistent
    // session keeps the ones sent while the agent is down.
    opts.manual_acks = true;
    opts.clean_start = false;
    opts.session_expiry = Some(SESSION_EXPIRY);
    opts.receive_maximum = Some(RECEIVE_MAXIMUM);
    // Every packet a labvisor broker accepts must reach the agent, which answers it (a
    // submission over max_payload is rejected with the reason): a smaller maximum makes an
    // MQTT 5 broker drop larger submissions without a word.
    opts.max_packet_size = MAX_PACKET_SIZE;
    // Only output is ever dropped; the batcher counts its lines.
    opts.on_drop = Some(on_drop);
    let (link, incoming) = MqttLink::start(opts)?;
    // Retain-as-published: a job or cancel published retained is seen as such, and refused (it
    // would run again at every restart), also when the agent was online.
    link.subscribe_as_published(topics.submit(sut), QoS::AtLeastOnce)?;
    link.subscribe_as_published(topics.cancel(sut), QoS::AtLeastOnce)?;
    link.subscribe_as_published(topics.admin(sut), QoS::AtLeastOnce)?;
    Ok((link, incoming))
}
