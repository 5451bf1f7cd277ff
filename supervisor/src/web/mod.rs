//! The lab's live web page, served by `labvisor supervise` on the `/metrics` listener.
//!
//! # Theory of operation
//!
//! One task owns the page's own MQTT link (the supervisor's login, its own client id): it
//! subscribes at QoS 0 to every SUT's retained agent status, supervisor view and last job, and
//! to the supervisors' statuses, and feeds them into the pure [`lab::Lab`], which says what
//! changed as [`lab::Update`]s. Those go out on one broadcast channel; every open page holds a
//! Server-Sent Events stream that starts with a snapshot taken under the same lock (so nothing
//! falls between the snapshot and the first update) and then gets the updates it shows. A page
//! that falls behind the channel gets a fresh snapshot instead of the updates it missed.
//! Nothing is polled per SUT: the lab view is one stream, a SUT's view one more.
//!
//! A SUT's live output and job history come from `<sut>/output` and `<sut>/jobs/+`, which the
//! link subscribes to while a page shows that SUT and for [`watching::UNWATCH_AFTER`] after
//! its last page closed; then it unsubscribes and forgets what it kept of them. Output is kept
//! per SUT up to [`lab::OUTPUT_KEPT`] bytes for the next page that opens it; where lines were
//! lost on the way (the agent's `dropped` count, or a jump in `seq`) the page says so at that place.
//!
//! # Who may see and do what
//!
//! - The page itself (HTML, CSS, JavaScript, embedded in the binary) holds no data and is
//!   served to anyone who reaches the listener.
//! - Reading the lab (the event streams) is anonymous only for clients on loopback; anyone
//!   else logs in with an MQTT login of the lab, which the page checks by connecting to the
//!   broker with it. A session is a random token in an `HttpOnly`, `SameSite=Strict` cookie.
//! - Actions (submit, cancel, offline, maintenance, online) need a login, also on loopback,
//!   and a request header a cross-site form cannot send. Each runs as that login: the page
//!   publishes with the user's own credentials, through the same code as `labvisor submit`,
//!   `cancel` and `offline`, so the broker's ACL decides, as it does for the command line. A
//!   reader's submission never reaches the agent and is reported as not acknowledged.
//! - No secret reaches the page: rows and views carry what the retained topics carry, and
//!   those hold no credentials.

mod http;
pub mod lab;
pub mod watching;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use labvisor_mqtt::{Incoming, LinkOptions, MqttLink, QoS};
use labvisor_protocol::payloads::OutputMeta;
use labvisor_protocol::topics::Topics;
use labvisor_protocol::SutName;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

pub use http::router;

/// Updates a page may fall behind by before it gets a fresh snapshot instead.
const UPDATES_BUFFERED: usize = 4096;

/// Where the page's logins and actions go: the broker the supervisor uses.
#[derive(Debug, Clone)]
pub struct BrokerTarget {
    /// Its URL, `mqtt://host:port` or `mqtts://…`.
    pub url: String,
    /// The CA the supervisor trusts for it.
    pub ca_file: Option<std::path::PathBuf>,
    /// The lab's topic prefix.
    pub topic_prefix: Option<String>,
}

impl BrokerTarget {
    /// The target of the supervisor's link options `opts`, under `topics`.
    pub fn of(opts: &LinkOptions, topics: &Topics) -> Self {
        let scheme = if opts.tls { "mqtts" } else { "mqtt" };
        let prefix = topics.prefix().trim_end_matches('/');
        BrokerTarget {
            url: format!("{scheme}://{}", opts.broker()),
            ca_file: opts.ca_file.clone(),
            topic_prefix: (!prefix.is_empty()).then(|| prefix.to_owned()),
        }
    }
}

/// A logged-in user.
#[derive(Clone)]
pub(crate) struct Login {
    pub user: String,
    pub password: String,
    pub until: Instant,
}

/// What the page's handlers share.
pub struct WebState {
    lab: Mutex<lab::Lab>,
    updates: broadcast::Sender<Arc<lab::Update>>,
    link: Option<MqttLink>,
    watched: Mutex<watching::Watching>,
    topics: Topics,
    broker: Option<BrokerTarget>,
    sessions: Mutex<HashMap<String, Login>>,
}

impl std::fmt::Debug for WebState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebState")
            .field("broker", &self.broker)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl WebState {
    /// The state of a page with no broker: it serves the page, and its streams say there is
    /// nothing to show.
    pub fn without_broker(topics: Topics) -> Arc<Self> {
        Arc::new(WebState {
            lab: Mutex::new(lab::Lab::new(topics.clone())),
            updates: broadcast::channel(UPDATES_BUFFERED).0,
            link: None,
            watched: Mutex::new(watching::Watching::default()),
            topics,
            broker: None,
            sessions: Mutex::new(HashMap::new()),
        })
    }

    /// Test only: logs `user` in as session `token` until `until`, as `login` does once the
    /// broker accepts the login.
    #[cfg(test)]
    pub(crate) fn insert_session(&self, token: &str, user: &str, until: Instant) {
        let login = Login {
            user: user.to_owned(),
            password: String::new(),
            until,
        };
        lock(&self.sessions).insert(token.to_owned(), login);
    }

    /// A page shows `sut`: subscribes to its output and jobs unless they are, until the
    /// returned guard is dropped (and [`watching::UNWATCH_AFTER`] has passed).
    fn watch(self: &Arc<Self>, sut: &SutName) -> Watched {
        // The bookkeeping stays locked while the link is told, so a subscription and the
        // sweep's unsubscription of the same SUT reach the link in the order they were decided.
        let mut watched = lock(&self.watched);
        if watched.open(sut) {
            if let Some(link) = &self.link {
                let _ = link.subscribe(self.topics.output(sut), QoS::AtMostOnce);
                let _ = link.subscribe(self.topics.jobs_filter(sut), QoS::AtMostOnce);
            }
        }
        drop(watched);
        Watched {
            state: self.clone(),
            sut: sut.clone(),
        }
    }

    /// Unsubscribes from the SUTs no page has shown for a while, and forgets their output and
    /// jobs.
    fn unwatch_expired(&self, now: Instant) {
        // Locked throughout, as in `watch`: a page that opens one of these SUTs meanwhile
        // subscribes after this unsubscribes, never before.
        let mut watched = lock(&self.watched);
        for sut in watched.expired(now) {
            if let Some(link) = &self.link {
                let _ = link.unsubscribe(self.topics.output(&sut));
                let _ = link.unsubscribe(self.topics.jobs_filter(&sut));
            }
            lock(&self.lab).unwatch(&sut);
            debug!(%sut, "No page shows this SUT any more: its output and jobs are let go.");
        }
    }

    /// How many pages show `sut`, and whether its output and jobs are subscribed.
    #[cfg(test)]
    pub(crate) fn watching(&self, sut: &SutName) -> (usize, bool) {
        let w = lock(&self.watched);
        (w.pages(sut), w.watched(sut))
    }
}

/// A page's hold on a SUT's output and jobs ([`WebState::watch`]).
pub(crate) struct Watched {
    state: Arc<WebState>,
    /// The SUT shown.
    pub sut: SutName,
}

impl Drop for Watched {
    fn drop(&mut self) {
        lock(&self.state.watched).close(&self.sut, Instant::now());
    }
}

/// How often the feed task lets go of SUTs no page shows.
const UNWATCH_EVERY: Duration = Duration::from_secs(10);

/// Starts the page's MQTT link (a copy of the supervisor's `opts`, as client `client_id`) and
/// the task that feeds the lab from it until `stop`.
pub fn start(
    opts: &LinkOptions,
    client_id: String,
    topics: Topics,
    stop: CancellationToken,
) -> Result<Arc<WebState>, labvisor_mqtt::LinkError> {
    let mut opts = opts.clone();
    opts.client_id = client_id;
    opts.will = None;
    opts.clean_start = true;
    opts.session_expiry = None;
    opts.manual_acks = false;
    opts.incoming_capacity = opts.incoming_capacity.max(4096);
    let target = BrokerTarget::of(&opts, &topics);
    let (link, incoming) = MqttLink::start(opts)?;
    for f in [
        topics.agents_filter(),
        topics.sut_views_filter(),
        topics.last_jobs_filter(),
        topics.supervisor_status_filter(),
    ] {
        link.subscribe(f, QoS::AtMostOnce)
            .map_err(|e| labvisor_mqtt::LinkError::Options(e.to_string()))?;
    }
    let state = Arc::new(WebState {
        lab: Mutex::new(lab::Lab::new(topics.clone())),
        updates: broadcast::channel(UPDATES_BUFFERED).0,
        link: Some(link.clone()),
        watched: Mutex::new(watching::Watching::default()),
        topics,
        broker: Some(target),
        sessions: Mutex::new(HashMap::new()),
    });
    tokio::spawn(feed(state.clone(), link, incoming, stop));
    Ok(state)
}

/// The task that owns the page's MQTT event stream.
async fn feed(
    state: Arc<WebState>,
    link: MqttLink,
    mut incoming: Incoming,
    stop: CancellationToken,
) {
    let mut sweep = tokio::time::interval(UNWATCH_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let msg = tokio::select! {
            () = stop.cancelled() => break,
            _ = sweep.tick() => {
                state.unwatch_expired(Instant::now());
                continue;
            }
            m = incoming.recv() => match m {
                Some(m) => m,
                None => break,
            },
        };
        let meta = OutputMeta::from_properties(&msg.user_properties());
        let mut lab = lock(&state.lab);
        for u in lab.apply(&msg.topic, &msg.payload, meta) {
            // No page open is no error.
            let _ = state.updates.send(Arc::new(u));
        }
    }
    debug!("The web page's broker link stops.");
    if let Err(e) = link
        .shutdown(Vec::new(), std::time::Duration::from_secs(1))
        .await
    {
        warn!(error = %e, "The web page's broker link did not close cleanly.");
    }
}
