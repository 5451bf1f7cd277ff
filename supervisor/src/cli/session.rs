//! The MQTT session of one client command: the broker flags every command shares
//! ([`BrokerArgs`]), connecting with them, and reading "everything retained" up to an end
//! marker (see the [module docs](super)).

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use labvisor_mqtt::{Incoming, LinkOptions, Message, MqttLink, QoS, Received};
use labvisor_protocol::payloads::random_id;
use labvisor_protocol::topics::Topics;
use tokio::time::Instant;

use super::ClientError;

/// How long a command waits for the broker's ConnAck.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Without an end marker (a broker that does not order its answers), reading the retained
/// messages ends after this long without a new one. Live messages (not retained) do not count:
/// at 500 SUTs the agents' statuses come every few milliseconds.
const QUIET: Duration = Duration::from_millis(500);

/// After the SUBACK of the last subscription, reading ends after this long without a retained
/// message: mosquitto may write retained messages after that SUBACK while the connection is
/// busy (a large lab, a slow or TLS link), and they come back to back.
const TAIL: Duration = Duration::from_millis(100);

/// Reading the retained messages ends after this long in any case.
const SETTLE_MAX: Duration = Duration::from_secs(5);

/// Broker options shared by every client command (flags with env fallbacks).
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// MQTT broker URL.
    #[arg(long, env = "LABVISOR_BROKER", default_value = "mqtt://127.0.0.1:1883")]
    pub broker: String,
    /// MQTT username.
    #[arg(long, env = "LABVISOR_MQTT_USERNAME")]
    pub username: Option<String>,
    /// MQTT password.
    #[arg(long, env = "LABVISOR_MQTT_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// CA certificate (PEM) for `mqtts://`.
    #[arg(long, env = "LABVISOR_MQTT_CA")]
    pub ca_file: Option<PathBuf>,
    /// Global topic prefix of the lab.
    #[arg(long, env = "LABVISOR_TOPIC_PREFIX")]
    pub topic_prefix: Option<String>,
    /// The state directory of the managed broker (`labvisor supervise --state-dir`). With no
    /// username or password, a command talking to that broker on this machine logs in with its
    /// local login (`labvisor.local`, password in `local-password` there), if this user can
    /// read it.
    #[arg(long, env = "LABVISOR_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

impl BrokerArgs {
    /// The link options these flags describe, for a client called `client_id`.
    fn link_options(&self, client_id: &str) -> Result<LinkOptions, ClientError> {
        let mut opts = LinkOptions::from_url(&self.broker, client_id.to_owned())
            .map_err(|e| ClientError::Usage(format!("--broker {:?}: {e}", self.broker)))?;
        if self.username.is_some() {
            opts.username = self.username.clone();
        }
        if self.password.is_some() {
            opts.password = self.password.clone();
        }
        if opts.username.is_none() && opts.password.is_none() {
            // The managed broker of this machine: its local login, if this user can read it.
            let dir = self
                .state_dir
                .clone()
                .unwrap_or_else(crate::broker::default_state_dir);
            if let Some((user, password)) = crate::broker::local_login(&dir, &opts.host, opts.port)
            {
                opts.username = Some(user);
                opts.password = Some(password);
            }
        }
        if self.ca_file.is_some() {
            opts.ca_file = self.ca_file.clone();
        }
        opts.backoff_max = Duration::from_secs(1);
        // A submission may be as large as the largest max_payload: the broker and the agent
        // take it, so must the client.
        opts.max_packet_size = labvisor_protocol::MAX_PACKET_SIZE;
        Ok(opts)
    }

    fn unreachable(&self, reason: String) -> ClientError {
        ClientError::Broker {
            broker: self.broker.clone(),
            reason,
        }
    }
}

/// An MQTT session of one client command.
pub struct Session {
    link: MqttLink,
    incoming: Incoming,
    /// The lab's topics.
    pub topics: Topics,
    probe: String,
    /// The QoS of every subscription.
    qos: QoS,
    /// How many subscriptions were made (the filters and the probe's).
    subscriptions: u64,
}

impl Session {
    /// Connects and subscribes to `filters` with QoS 1.
    pub async fn connect(
        args: &BrokerArgs,
        filters: impl Fn(&Topics) -> Vec<String>,
    ) -> Result<Session, ClientError> {
        Self::connect_with(args, QoS::AtLeastOnce, filters).await
    }

    /// Connects and subscribes to `filters` with QoS 0, for a command that only reads what is
    /// retained ([`Session::settle`]) and prints it: the broker then holds nothing back for
    /// acknowledgements (mosquitto's default queue, 1000 QoS 1 messages per client, would drop
    /// the rest of a large lab), and the SUBACK of the last subscription ends the read.
    pub async fn snapshot(
        args: &BrokerArgs,
        filters: impl Fn(&Topics) -> Vec<String>,
    ) -> Result<Session, ClientError> {
        Self::connect_with(args, QoS::AtMostOnce, filters).await
    }

    async fn connect_with(
        args: &BrokerArgs,
        qos: QoS,
        filters: impl Fn(&Topics) -> Vec<String>,
    ) -> Result<Session, ClientError> {
        let topics = Topics::with_prefix(args.topic_prefix.as_deref())
            .map_err(|e| ClientError::Usage(e.to_string()))?;
        let client_id = format!("labvisor-cli-{}", random_id());
        let opts = args.link_options(&client_id)?;
        let (link, incoming) =
            MqttLink::start(opts).map_err(|e| args.unreachable(e.to_string()))?;
        let probe = topics.cli_probe(&client_id);
        let mut subscriptions = 0;
        for f in filters(&topics).into_iter().chain([probe.clone()]) {
            link.subscribe(f, qos)
                .map_err(|e| ClientError::Usage(e.to_string()))?;
            subscriptions += 1;
        }
        if !wait_connected(&link).await {
            let reason = link
                .state()
                .last_error
                .unwrap_or_else(|| "no connection within 5s".into());
            return Err(args.unreachable(reason));
        }
        let _ = link.publish(Message::event(probe.clone(), "probe"));
        Ok(Session {
            link,
            incoming,
            topics,
            probe,
            qos,
            subscriptions,
        })
    }

    /// Collects what the subscriptions delivered up to now (the retained messages), until the
    /// first end marker: the probe coming back (where the ACL lets this login publish it), or
    /// [`TAIL`] without a retained message after the SUBACK of the last subscription (QoS 0
    /// sessions, [`Session::snapshot`]). Without either, [`QUIET`] without a retained message
    /// ends it; [`SETTLE_MAX`] in any case.
    pub async fn settle(&mut self) -> Vec<Received> {
        let mut got = Vec::new();
        let end = Instant::now() + SETTLE_MAX;
        let mut quiet = Instant::now() + QUIET;
        let mut state = self.link.watch_state();
        // Only at QoS 0 does nothing retained come after the SUBACK (see LinkState::subacks).
        let by_suback = self.qos == QoS::AtMostOnce;
        let mut acked = false;
        loop {
            if by_suback && !acked && state.borrow_and_update().subacks >= self.subscriptions {
                // mosquitto queues the SUBACK after the retained messages of a subscription,
                // but while the connection is busy it may write the SUBACKs of later
                // subscriptions before their retained messages: after the last one, a short
                // quiet without a retained message (or the probe, queued behind them) ends it.
                acked = true;
                quiet = Instant::now() + TAIL;
            }
            let until = quiet.min(end);
            tokio::select! {
                r = self.incoming.recv() => match r {
                    Some(r) if r.topic == self.probe => return got,
                    Some(r) => {
                        if r.retain {
                            quiet = Instant::now() + if acked { TAIL } else { QUIET };
                        }
                        got.push(r);
                    }
                    None => return got,
                },
                changed = state.changed(), if by_suback && !acked => {
                    if changed.is_err() {
                        return got;
                    }
                }
                _ = tokio::time::sleep_until(until) => return got,
            }
        }
    }

    /// The next message, or `None` at `deadline`.
    pub async fn next(&mut self, deadline: Option<Instant>) -> Option<Received> {
        loop {
            let r = match deadline {
                Some(d) => tokio::time::timeout_at(d, self.incoming.recv())
                    .await
                    .ok()??,
                None => self.incoming.recv().await?,
            };
            if r.topic != self.probe {
                return Some(r);
            }
        }
    }

    /// Publishes QoS 1.
    pub fn publish(&self, topic: String, payload: Vec<u8>) -> Result<(), ClientError> {
        self.link
            .publish(Message::event(topic, Bytes::from(payload)))
            .map_err(|e| ClientError::Usage(e.to_string()))
    }

    /// Delivers what is queued and disconnects.
    pub async fn close(self) {
        let _ = self.link.shutdown(Vec::new(), Duration::from_secs(2)).await;
    }
}

/// Whether the link connects within [`CONNECT_TIMEOUT`].
async fn wait_connected(link: &MqttLink) -> bool {
    let mut watch = link.watch_state();
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, async {
        loop {
            if watch.borrow_and_update().connected {
                return;
            }
            if watch.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    connected.is_ok() && link.state().connected
}
