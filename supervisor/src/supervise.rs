//! `labvisor supervise`: keep exactly one healthy agent container per valid file in `sut/`.
//!
//! # Theory of operation
//!
//! One task owns all state and runs *passes*. A pass is level-triggered and idempotent: it
//! rescans the whole SUT directory ([`scan_dir`]), lists the containers, asks the pure
//! [`plan`] what to do, and spawns the actions. What only wakes the loop up:
//!
//! - **Files.** A notify watcher on the *directory* (non-recursive; editors save by rename),
//!   or notify's `PollWatcher` with `--poll` (NFS and similar mounts). The callback only
//!   `try_send`s into a channel of one; the loop waits for a quiet period (trailing debounce,
//!   150 ms) before the pass. Each pass checks the directory's inode and re-adds the watch when
//!   the directory was replaced or reappeared.
//! - **Docker events** (die, start, health_status, destroy, pause, unpause of this supervisor's
//!   containers). The stream is reopened with backoff when the engine goes away, and every
//!   reopening triggers a pass.
//! - **Agent status.** The supervisor subscribes to `+/agent` (retained [`AgentStatus`]); an
//!   agent whose state is `busy` runs a job, and its recreation or removal waits
//!   ([`Action::Defer`]), at most `--busy-wait`, visible as `pending_action` on
//!   `<sut>/supervisor`. A change of an agent's busy state triggers a pass. The broker's view
//!   can be stale or missing (the broker or the agent's link is down, or there is no broker),
//!   so before a recreation or removal of a running container, and while one waits, the
//!   supervisor asks the agent itself: `labvisor-healthcheck --state` through a Docker exec,
//!   which reads the agent's heartbeat. That answer wins; when there is none (exec failed),
//!   the broker's view decides; a hung agent (stale heartbeat) counts as idle.
//! - **A periodic resync** (30 s), finished actions, and retry or healing deadlines.
//!
//! **Actions** run as tasks, at most `parallelism` at a time (a semaphore), and never two for
//! the same SUT. A failed action is logged and published as `last_error`; that SUT alone is
//! retried with capped exponential backoff (1 s doubling to 60 s), the others go on.
//!
//! **Healing.** Docker marks a hung agent unhealthy but never restarts it. A running,
//! unhealthy container whose SUT has `restart.on_unhealthy = "restart"` is restarted: the first
//! time at once, then with exponential backoff from `restart.backoff_min` to
//! `restart.backoff_max`; after `restart.crash_loop_after` restarts without a healthy minute in
//! between, the SUT is flagged `crash_loop` (restarts go on at the longest delay). A healthy
//! minute resets both. Restart counts are published on `<sut>/supervisor`.
//!
//! **Adoption and crashes.** Containers are created with their final labels, so a restarted
//! supervisor adopts what it finds: same hash, nothing happens, ids stay. A container left
//! `created` (the supervisor was killed between create and start, so its files may be
//! incomplete) is recreated. Unowned containers are never touched; one holding a wanted name
//! is reported as a conflict.
//!
//! # How agents reach the broker
//!
//! The supervisor connects to `--broker`; agents get `--agent-broker` (default: the same URL;
//! `none` runs them without MQTT) as `LABVISOR_BROKER`, because the broker's address as seen
//! from a container is often not the supervisor's:
//!
//! - **Bridge network** (the default `labvisor` network, or a named one): a broker bound to
//!   `127.0.0.1` on the host is unreachable from containers. Either make mosquitto listen on
//!   the bridge gateway (`docker network inspect labvisor` → `Gateway`, e.g.
//!   `listener 1883 172.20.0.1`) and pass `--agent-broker mqtt://172.20.0.1:1883`, or run the
//!   broker as a container on the same network and pass `--agent-broker mqtt://mosquitto:1883`
//!   (Docker's DNS resolves container names on user-defined networks).
//! - **Host network** (`network = "host"`, needs `--allow-host-network`): the agent shares the
//!   host's stack, so `mqtt://127.0.0.1:1883` works as it does for the supervisor.
//!
//! A loopback `--agent-broker` logs a warning at startup.
//!
//! **Metrics.** With `metrics_listen`, [`crate::metrics`] serves `/metrics` and `/healthz`
//! there until shutdown; the loop feeds it through a few hooks (`self.metrics.on_*`,
//! `observe_*`). For job outcomes the supervisor also subscribes to `+/last_job`.
//!
//! **Faults.** Docker unreachable: the pass is retried with backoff, the status says
//! `docker_reachable: false`. An unreadable SUT directory changes nothing. Broker down:
//! reconciling goes on; retained status is republished on reconnect ([`MqttLink`] sticky
//! topics). Shutdown waits briefly for running actions, publishes `offline` and leaves every
//! agent running.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use labvisor_mqtt::{Incoming, LinkOptions, Message, MqttLink, QoS};
use labvisor_protocol::config::{self, scan_dir, Allow, OnUnhealthy, Scan, SutConfig};
use labvisor_protocol::payloads::{
    self, AgentState, AgentStatus, Health, JobStatus, ManagedBrokerStatus, SupervisorState,
    SupervisorStatus, SutCounts, SutView,
};
use labvisor_protocol::topics::{SutTopic, Topics};
use labvisor_protocol::SutName;
use notify::Watcher;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};
use tracing::{debug, error, info, warn};

use crate::metrics::Metrics;
use crate::plan::{plan, Action, Actual, Busy, Desired, RecreateReason};
use crate::runtime::{ContainerRuntime, RuntimeError, RuntimeEvent};
use crate::spec::{
    container_spec, SpecContext, SpecError, LABEL_CONFIG_HASH, LABEL_MANAGED_BY, LABEL_SUPERVISOR,
    LABEL_SUT, MANAGED_BY,
};

/// Trailing debounce of file events.
pub const DEBOUNCE: Duration = Duration::from_millis(150);
/// Delay before a pass after a Docker event or an agent status change (coalesces bursts).
const EVENT_DELAY: Duration = Duration::from_millis(50);
/// While actions run, passes (each a directory scan and a container list) come at most this
/// often. A cold start of 50 SUTs would otherwise make one pass per finished action and per
/// start event, each listing every container on an engine that is busy creating them.
const BUSY_PASS_INTERVAL: Duration = Duration::from_secs(1);
/// A container healthy this long resets its restart backoff and crash-loop flag.
const HEALTHY_WINDOW: Duration = Duration::from_secs(60);
/// Retry backoff of failed actions and of an unreachable engine.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
const DOCKER_RETRY_MAX: Duration = Duration::from_secs(30);
/// Longest wait for an agent's answer to "do you run a job?" (an exec in its container).
const ASK_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything `supervise` needs besides the runtime.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The SUT directory.
    pub sut_dir: PathBuf,
    /// Which host-power settings SUT files may use.
    pub allow: Allow,
    /// How containers are built.
    pub spec: SpecContext,
    /// Topic builder (with the global prefix).
    pub topics: Topics,
    /// The supervisor's own broker connection; `None`: no MQTT at all.
    pub mqtt: Option<LinkOptions>,
    /// Longest wait for a busy agent before recreating or removing it anyway.
    pub busy_wait: Duration,
    /// Period of the full resync.
    pub resync: Duration,
    /// Grace period of `docker stop`/`restart` before KILL.
    pub stop_timeout: Duration,
    /// Actions running at once.
    pub parallelism: usize,
    /// Remove a SUT's volume with its container when its file is deleted.
    pub purge_volumes: bool,
    /// Poll the directory at this interval instead of watching it with inotify.
    pub poll: Option<Duration>,
    /// Where `/metrics` and `/healthz` are served; `None`: not at all.
    pub metrics_listen: Option<crate::metrics::Listen>,
    /// The managed broker's per-SUT logins, made before a SUT's container is created (its
    /// password file is then in `spec.agent_credentials`); `None` with an external broker.
    pub logins: Option<std::sync::Arc<crate::broker::AgentLogins>>,
    /// The managed broker's state (it is restarted when it dies), shown in the supervisor's
    /// status, `/metrics` and `/healthz`; `None` with an external broker.
    pub managed_broker: Option<tokio::sync::watch::Receiver<ManagedBrokerStatus>>,
    /// How often the supervisor status is republished when nothing changed (its `time_ms`
    /// then tells readers the supervisor is alive).
    pub status_every: Duration,
}

/// A fatal error: the supervisor cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    /// The MQTT link could not be started.
    #[error("cannot start the MQTT link: {0}")]
    Mqtt(#[from] labvisor_mqtt::LinkError),
    /// A topic could not be subscribed.
    #[error("cannot subscribe: {0}")]
    Subscribe(#[from] labvisor_mqtt::PublishError),
    /// The metrics address cannot be bound.
    #[error("cannot serve metrics on {addr}: {error} (pass another --metrics-listen, or none)")]
    MetricsListen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        error: std::io::Error,
    },
}

/// Why one action failed (the SUT is retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// The engine failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The SUT file could not be read again, or turned invalid, just before creating.
    #[error("the SUT file changed or became unreadable: {0}")]
    File(String),
    /// The container could not be described.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The SUT's broker login could not be made.
    #[error(transparent)]
    Login(#[from] crate::broker::BrokerError),
}

#[derive(Debug, Default)]
struct HealState {
    restarts: u64,
    streak: u32,
    backoff: Duration,
    next_at: Option<Instant>,
    healthy_since: Option<Instant>,
    crash_loop: bool,
}

#[derive(Debug, Default)]
struct SutState {
    in_flight: bool,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<String>,
    conflict: Option<String>,
    deferred_since: Option<Instant>,
    pending: Option<String>,
    heal: HealState,
    published: Option<SutView>,
}

/// The result of a finished action, sent back to the loop.
struct Done {
    sut: SutName,
    action: Action,
    result: Result<(), ActionError>,
}

/// Shared by action tasks.
struct Exec<R> {
    runtime: Arc<R>,
    settings: Settings,
    /// Where image build lines are published (`<sut>/build`).
    link: Option<MqttLink>,
}

fn backoff(failures: u32, min: Duration, max: Duration) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    min.saturating_mul(1u32 << exp).min(max)
}

impl<R: ContainerRuntime> Exec<R> {
    /// Re-reads the SUT file right before creating, so the labels carry the hash of exactly what
    /// is delivered into the container.
    async fn load(&self, sut: &SutName) -> Result<(SutConfig, Vec<u8>), ActionError> {
        let path = Scan::path_of(&self.settings.sut_dir, sut);
        let dir = self.settings.sut_dir.clone();
        let allow = self.settings.allow;
        tokio::task::spawn_blocking(move || {
            let bytes =
                config::read_sut_file(&path).map_err(|e| ActionError::File(e.to_string()))?;
            let text =
                String::from_utf8(bytes.clone()).map_err(|e| ActionError::File(e.to_string()))?;
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let cfg = config::load_str(&name, &text, &dir, &allow).map_err(|p| {
                ActionError::File(
                    p.iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join("; "),
                )
            })?;
            Ok((cfg, bytes))
        })
        .await
        .map_err(|e| ActionError::File(e.to_string()))?
    }

    async fn create(&self, sut: &SutName) -> Result<String, ActionError> {
        let (cfg, bytes) = self.load(sut).await?;
        crate::runtime::image::ensure(
            &*self.runtime,
            &cfg,
            &self.settings.spec,
            &self.settings.topics,
            self.link.as_ref(),
        )
        .await?;
        if let Some(logins) = self.settings.logins.clone() {
            let sut = sut.clone();
            tokio::task::spawn_blocking(move || logins.ensure(&sut))
                .await
                .map_err(|e| ActionError::File(e.to_string()))??;
        }
        let hash = self.settings.spec.container_hash(&cfg.hash());
        let spec = container_spec(&cfg, &bytes, &hash, &self.settings.spec)?;
        Ok(self.runtime.create(&spec).await?)
    }

    async fn execute(&self, action: &Action) -> Result<(), ActionError> {
        let rt = &self.runtime;
        let t = self.settings.stop_timeout;
        match action {
            Action::Create { sut } => {
                let id = self.create(sut).await?;
                info!(sut = %sut, container = %id, action = "create", "Created and started the agent container.");
            }
            Action::Recreate { sut, id, reason } => {
                if *reason == RecreateReason::ConfigChanged {
                    rt.stop(id, t).await?;
                }
                rt.remove(id).await?;
                let new = self.create(sut).await?;
                info!(sut = %sut, container = %new, old = %id, action = "recreate", reason = ?reason, "Recreated the agent container.");
            }
            Action::Remove { sut, id, sut_gone } => {
                rt.stop(id, t).await?;
                rt.remove(id).await?;
                if *sut_gone && self.settings.purge_volumes {
                    rt.remove_volume(&self.settings.spec.volume_name(sut))
                        .await?;
                    rt.remove_legacy_volume(&self.settings.spec.legacy_volume(sut))
                        .await?;
                }
                info!(sut = %sut, container = %id, action = "remove", "Removed the agent container.");
            }
            Action::Start { sut, id } => {
                rt.start(id).await?;
                info!(sut = %sut, container = %id, action = "start", "Started the stopped agent container.");
            }
            Action::Restart { sut, id } => {
                rt.restart(id, t).await?;
                warn!(sut = %sut, container = %id, action = "restart", "Restarted the unhealthy agent container.");
            }
            Action::Defer { .. } | Action::Conflict { .. } => {}
        }
        Ok(())
    }
}

/// The loop's state.
struct Supervisor<R> {
    exec: Arc<Exec<R>>,
    link: Option<MqttLink>,
    semaphore: Arc<Semaphore>,
    tasks: JoinSet<()>,
    done_tx: mpsc::UnboundedSender<Done>,
    suts: BTreeMap<SutName, SutState>,
    agents: BTreeMap<SutName, AgentState>,
    docker_reachable: bool,
    docker_failures: u32,
    published_status: Option<SupervisorStatus>,
    /// When the supervisor status was last sent to the broker.
    status_sent_at: Option<Instant>,
    /// SUTs removed by this supervisor whose retained topics it cleared: whatever still
    /// arrives retained for them (a job status, a late last will) is cleared too.
    gone: BTreeSet<SutName>,
    boot_id: String,
    watch: Option<(Box<dyn Watcher + Send>, Option<u64>)>,
    /// The last attempt to watch the directory failed (and was logged).
    watch_failed: bool,
    fs_tx: mpsc::Sender<()>,
    /// When the next pass is due.
    pass_due: Option<Instant>,
    /// Earliest retry or healing deadline.
    wake_at: Option<Instant>,
    metrics: Metrics,
    /// Build contexts (`[build]`) watched recursively with the directory's watcher.
    contexts: BTreeSet<PathBuf>,
    /// The managed broker's last known state.
    broker: Option<ManagedBrokerStatus>,
    /// The problems of each invalid entry of the SUT directory, as last logged: each is logged
    /// once when it appears or changes, not on every pass.
    logged_problems: BTreeMap<PathBuf, Vec<String>>,
}

/// Runs the supervisor until `shutdown` resolves. Leaves the agents running.
pub async fn run<R: ContainerRuntime>(
    settings: Settings,
    runtime: Arc<R>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SuperviseError> {
    let boot_id = payloads::random_id();
    let mut broker_rx = settings.managed_broker.clone();
    let broker = broker_rx.as_mut().map(|r| r.borrow_and_update().clone());
    let metrics = match &broker {
        Some(b) => {
            let m = Metrics::new(settings.resync).with_managed_broker();
            m.on_broker(b);
            m
        }
        None => Metrics::new(settings.resync),
    };
    let listener = match settings.metrics_listen {
        Some(listen) => match tokio::net::TcpListener::bind(listen.addr).await {
            Ok(l) => Some(l),
            Err(error) if listen.required => {
                return Err(SuperviseError::MetricsListen {
                    addr: listen.addr,
                    error,
                })
            }
            Err(error) => {
                warn!(listen = %listen.addr, error = %error, "Cannot serve /metrics and /healthz; going on without them (see --metrics-listen).");
                None
            }
        },
        None => None,
    };
    let metrics_server = match listener {
        Some(listener) => {
            if let Ok(addr) = listener.local_addr() {
                info!(listen = %addr, "Serving /metrics and /healthz.");
            }
            let stop = tokio_util::sync::CancellationToken::new();
            let server = tokio::spawn(crate::metrics::serve(
                listener,
                metrics.shared(),
                stop.clone().cancelled_owned(),
            ));
            Some((stop, server))
        }
        None => None,
    };
    let status_topic = settings.topics.supervisor_status(&settings.spec.supervisor);
    let (link, mut incoming): (Option<MqttLink>, Option<Incoming>) = match &settings.mqtt {
        Some(opts) => {
            let mut opts = opts.clone();
            let lost = status_json(
                &settings,
                SupervisorState::Lost,
                &boot_id,
                false,
                SutCounts::default(),
                broker.clone(),
            );
            opts.will = Some(Message::state(status_topic.clone(), lost));
            let (link, incoming) = MqttLink::start(opts)?;
            link.subscribe(settings.topics.agents_filter(), QoS::AtLeastOnce)?;
            link.subscribe(settings.topics.last_jobs_filter(), QoS::AtLeastOnce)?;
            (Some(link), Some(incoming))
        }
        None => (None, None),
    };
    let (fs_tx, mut fs_rx) = mpsc::channel::<()>(1);
    let (docker_tx, mut docker_rx) = mpsc::channel::<()>(1);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let events = tokio::spawn(watch_events(runtime.clone(), docker_tx));

    let mut sup = Supervisor {
        semaphore: Arc::new(Semaphore::new(settings.parallelism.max(1))),
        exec: Arc::new(Exec {
            runtime,
            settings,
            link: link.clone(),
        }),
        link,
        tasks: JoinSet::new(),
        done_tx,
        suts: BTreeMap::new(),
        agents: BTreeMap::new(),
        docker_reachable: true,
        docker_failures: 0,
        published_status: None,
        status_sent_at: None,
        gone: BTreeSet::new(),
        boot_id,
        watch: None,
        watch_failed: false,
        fs_tx,
        pass_due: Some(Instant::now()),
        wake_at: None,
        metrics,
        contexts: BTreeSet::new(),
        broker,
        logged_problems: BTreeMap::new(),
    };
    info!(dir = %sup.exec.settings.sut_dir.display(), supervisor = %sup.exec.settings.spec.supervisor, "Supervising.");
    let mut fs_due: Option<Instant> = None;
    let mut last_pass: Option<Instant> = None;
    let mut next_resync = Instant::now() + sup.exec.settings.resync;
    tokio::pin!(shutdown);
    loop {
        let deadline = [
            fs_due,
            sup.pass_due,
            sup.wake_at,
            Some(next_resync),
            sup.status_due(),
        ]
        .into_iter()
        .flatten()
        .min()
        .expect("resync is always set");
        tokio::select! {
            () = &mut shutdown => break,
            Some(()) = fs_rx.recv() => {
                fs_due = Some(Instant::now() + DEBOUNCE);
            }
            Some(()) = docker_rx.recv() => sup.due_in(EVENT_DELAY),
            Ok(()) = async { match broker_rx.as_mut() { Some(r) => r.changed().await, None => std::future::pending().await } } => {
                if let Some(r) = broker_rx.as_mut() {
                    let b = r.borrow_and_update().clone();
                    sup.metrics.on_broker(&b);
                    sup.broker = Some(b);
                    // The status says so at once (queued while the broker is down).
                    sup.due_in(Duration::ZERO);
                }
            }
            Some(done) = done_rx.recv() => sup.finished(done),
            Some(msg) = async { match incoming.as_mut() { Some(i) => i.recv().await, None => std::future::pending().await } } => {
                sup.message(&msg.topic, &msg.payload, msg.retain);
            }
            Some(_) = sup.tasks.join_next(), if !sup.tasks.is_empty() => {}
            () = sleep_until(deadline) => {
                let now = Instant::now();
                if fs_due.is_some_and(|d| d <= now) {
                    fs_due = None;
                    sup.pass_due = Some(now);
                }
                if sup.wake_at.is_some_and(|d| d <= now) {
                    sup.wake_at = None;
                    sup.pass_due = Some(now);
                }
                if next_resync <= now {
                    next_resync = now + sup.exec.settings.resync;
                    sup.pass_due = Some(now);
                }
                if sup.status_due().is_some_and(|d| d <= now) {
                    sup.send_status();
                }
                if sup.pass_due.is_some_and(|d| d <= now) {
                    match last_pass.map(|l| l + BUSY_PASS_INTERVAL) {
                        Some(next) if !sup.tasks.is_empty() && now < next => {
                            sup.pass_due = Some(next);
                        }
                        _ => {
                            sup.pass_due = None;
                            last_pass = Some(now);
                            sup.pass().await;
                            sup.metrics.on_pass(sup.docker_reachable);
                            debug!(docker_reachable = sup.docker_reachable, "Reconcile pass done.");
                        }
                    }
                }
            }
        }
    }
    info!("Shutting down; agents keep running.");
    events.abort();
    if let Some((stop, server)) = metrics_server {
        stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    }
    let grace = sup.exec.settings.stop_timeout + Duration::from_secs(5);
    let _ = tokio::time::timeout(grace, async {
        while sup.tasks.join_next().await.is_some() {}
    })
    .await;
    if let Some(link) = sup.link.take() {
        let counts = sup
            .published_status
            .as_ref()
            .map(|s| s.suts.clone())
            .unwrap_or_default();
        let offline = status_json(
            &sup.exec.settings,
            SupervisorState::Offline,
            &sup.boot_id,
            sup.docker_reachable,
            counts,
            sup.broker.clone(),
        );
        if let Err(error) = link
            .shutdown(
                vec![Message::state(status_topic, offline)],
                Duration::from_secs(3),
            )
            .await
        {
            warn!(error = %error, "Could not publish the offline status.");
        }
    }
    Ok(())
}

fn status_json(
    settings: &Settings,
    state: SupervisorState,
    boot_id: &str,
    docker_reachable: bool,
    suts: SutCounts,
    managed_broker: Option<ManagedBrokerStatus>,
) -> Vec<u8> {
    serde_json::to_vec(&SupervisorStatus {
        v: payloads::VERSION,
        id: settings.spec.supervisor.clone(),
        state,
        boot_id: boot_id.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        docker_reachable,
        suts,
        time_ms: payloads::now_ms(),
        managed_broker,
        file_problems: Vec::new(),
        refresh_ms: 0,
    })
    .expect("status serialises")
}

/// An agent's answer to "do you run a job?": container id, SUT, yes/no or why it could not tell.
type Answer = (String, SutName, Result<bool, String>);

/// Asks the agents in the containers `ask` whether they run a job (through the runtime, so it
/// works while the broker is down), `parallelism` at a time, each within [`ASK_TIMEOUT`].
async fn ask_agents<R: ContainerRuntime>(
    runtime: Arc<R>,
    parallelism: usize,
    ask: Vec<(String, SutName)>,
) -> Vec<Answer> {
    futures_util::stream::iter(ask)
        .map(|(id, sut)| {
            let runtime = runtime.clone();
            async move {
                let answer = match tokio::time::timeout(ASK_TIMEOUT, runtime.agent_busy(&id)).await
                {
                    Ok(Ok(b)) => Ok(b),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {ASK_TIMEOUT:?}")),
                };
                (id, sut, answer)
            }
        })
        .buffer_unordered(parallelism.max(1))
        .collect()
        .await
}

/// Forwards Docker events as wake-ups; reopens the stream with backoff when it ends.
async fn watch_events<R: ContainerRuntime>(runtime: Arc<R>, tx: mpsc::Sender<()>) {
    let mut failures = 0u32;
    loop {
        let mut stream = runtime.events();
        let mut health = HealthSeen::default();
        // Whatever happened while the stream was down is caught by the pass this triggers.
        let _ = tx.try_send(());
        while let Some(item) = stream.next().await {
            match item {
                Ok(ev) => {
                    failures = 0;
                    debug!(container = %ev.id, sut = ?ev.sut, event = %ev.action, "Docker event.");
                    if health.worth_a_pass(&ev) {
                        let _ = tx.try_send(());
                    }
                }
                Err(error) => {
                    debug!(error = %error, "Docker event stream failed.");
                    break;
                }
            }
        }
        failures += 1;
        let delay = backoff(failures, RETRY_MIN, DOCKER_RETRY_MAX);
        debug!(delay = ?delay, "Docker event stream ended; reopening.");
        tokio::time::sleep(delay).await;
    }
}

/// Engine 20.10 emits `health_status: …` on every probe, not only on changes: with 100 SUTs
/// that is several events a second, each of which used to trigger a full pass. Only a change of
/// a container's health (or any other event) is worth a pass.
#[derive(Debug, Default)]
struct HealthSeen(std::collections::HashMap<String, String>);

impl HealthSeen {
    fn worth_a_pass(&mut self, ev: &RuntimeEvent) -> bool {
        if ev.action.starts_with("health_status") {
            return self.0.insert(ev.id.clone(), ev.action.clone()).as_deref() != Some(&ev.action);
        }
        // die, start, destroy...: the next health report is news again.
        self.0.remove(&ev.id);
        true
    }
}

impl<R: ContainerRuntime> Supervisor<R> {
    fn due_in(&mut self, d: Duration) {
        let at = Instant::now() + d;
        self.pass_due = Some(self.pass_due.map_or(at, |p| p.min(at)));
    }

    fn wake(&mut self, at: Instant) {
        self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
    }

    /// Clears every retained topic of the removed SUT `sut` (empty retained payloads): its
    /// fixed ones ([`Topics::sut_retained`]: agent status, probe, acknowledgements, last job,
    /// the supervisor's view) now, and its job statuses (`<sut>/jobs/<id>`) as the broker
    /// delivers them on the subscription made here. So a deleted SUT leaves `labvisor status`
    /// and `labvisor jobs`.
    fn clear_retained(&mut self, sut: &SutName) {
        let Some(link) = &self.link else {
            return;
        };
        let topics = &self.exec.settings.topics;
        for topic in topics.sut_retained(sut) {
            // The view is sticky (republished on reconnect): replace it rather than queue a
            // clear that a reconnect would undo.
            let _ = if topic == topics.supervisor(sut) {
                link.set_sticky(topic, "")
            } else {
                link.publish(Message::state(topic, bytes::Bytes::new()))
            };
        }
        let _ = link.subscribe(topics.jobs_filter(sut), QoS::AtLeastOnce);
        info!(sut = %sut, "Cleared the retained topics of the removed SUT.");
        self.gone.insert(sut.clone());
    }

    fn message(&mut self, topic: &str, payload: &[u8], retained: bool) {
        let parsed = self.exec.settings.topics.parse(topic);
        if let Some((sut, kind)) = &parsed {
            if self.gone.contains(sut) && !payload.is_empty() {
                if matches!(kind, SutTopic::Agent | SutTopic::LastJob | SutTopic::Job(_)) {
                    if let Some(link) = &self.link {
                        debug!(sut = %sut, topic = %topic, "Clearing a retained topic of a removed SUT.");
                        let _ = link.publish(Message::state(topic.to_owned(), bytes::Bytes::new()));
                    }
                }
                return;
            }
        }
        match parsed {
            Some((sut, SutTopic::Agent)) => self.agent_message(sut, payload),
            Some((sut, SutTopic::LastJob)) => {
                if let Ok(job) = serde_json::from_slice::<JobStatus>(payload) {
                    self.metrics.observe_job(&sut, &job, retained);
                }
            }
            _ => {}
        }
    }

    fn agent_message(&mut self, sut: SutName, payload: &[u8]) {
        let status = serde_json::from_slice::<AgentStatus>(payload).ok();
        self.metrics.observe_agent(&sut, status.as_ref());
        let state = status.map(|s| s.state);
        let before = self.agents.get(&sut).copied();
        match state {
            Some(s) => self.agents.insert(sut.clone(), s),
            None => self.agents.remove(&sut),
        };
        let was_busy = before == Some(AgentState::Busy);
        let is_busy = state == Some(AgentState::Busy);
        if was_busy != is_busy {
            debug!(sut = %sut, busy = is_busy, "Agent busy state changed.");
            self.due_in(EVENT_DELAY);
        }
    }

    fn finished(&mut self, done: Done) {
        let now = Instant::now();
        let st = self.suts.entry(done.sut.clone()).or_default();
        st.in_flight = false;
        match done.result {
            Ok(()) => {
                self.metrics.on_action(&done.action);
                st.failures = 0;
                st.retry_at = None;
                st.last_error = None;
                if let Action::Restart { .. } = done.action {
                    st.heal.restarts += 1;
                    st.heal.streak += 1;
                    st.heal.healthy_since = None;
                }
                if let Action::Remove { sut_gone: true, .. } = done.action {
                    // The SUT is gone: clear what the broker retains of it.
                    self.suts.remove(&done.sut);
                    self.clear_retained(&done.sut);
                }
            }
            Err(error) => {
                self.metrics.on_error(&done.sut);
                st.failures += 1;
                let delay = backoff(st.failures, RETRY_MIN, RETRY_MAX);
                st.retry_at = Some(now + delay);
                st.last_error = Some(format!("{}: {error}", done.action.kind()));
                error!(sut = %done.sut, action = done.action.kind(), error = %error, retry_in = ?delay, "Action failed; will retry.");
                self.wake(now + delay);
            }
        }
        self.pass_due = Some(now);
    }

    fn ensure_watch(&mut self) {
        let dir = self.exec.settings.sut_dir.clone();
        let ino = std::fs::metadata(&dir).ok().map(|m| m.ino());
        if let Some((_, watched)) = &self.watch {
            if *watched == ino && ino.is_some() {
                return;
            }
        }
        self.watch = None;
        self.contexts.clear();
        if ino.is_none() {
            return;
        }
        let tx = self.fs_tx.clone();
        let handler = move |res: notify::Result<notify::Event>| {
            // Reading the files (our own scans) produces access events: not a change.
            if let Ok(ev) = &res {
                if matches!(ev.kind, notify::EventKind::Access(_)) {
                    return;
                }
            }
            let _ = tx.try_send(());
        };
        let watcher: notify::Result<Box<dyn Watcher + Send>> =
            if let Some(every) = self.exec.settings.poll {
                notify::PollWatcher::new(
                    handler,
                    notify::Config::default()
                        .with_poll_interval(every)
                        .with_compare_contents(true),
                )
                .map(|w| Box::new(w) as Box<dyn Watcher + Send>)
            } else {
                notify::recommended_watcher(handler).map(|w| Box::new(w) as Box<dyn Watcher + Send>)
            };
        match watcher.and_then(|mut w| {
            w.watch(&dir, notify::RecursiveMode::NonRecursive)
                .map(|()| w)
        }) {
            Ok(w) => {
                debug!(dir = %dir.display(), "Watching the SUT directory.");
                self.watch = Some((w, ino));
                self.watch_failed = false;
            }
            Err(error) => {
                // Retried on every pass; said once until it works again.
                if !self.watch_failed {
                    warn!(dir = %dir.display(), error = %error, resync = ?self.exec.settings.resync,
                        "Cannot watch the SUT directory (inotify limit reached? see /proc/sys/fs/inotify/max_user_instances); relying on the periodic resync. --poll watches without inotify.");
                } else {
                    debug!(dir = %dir.display(), error = %error, "Still cannot watch the SUT directory.");
                }
                self.watch_failed = true;
            }
        }
    }

    /// Watches the build contexts of valid SUTs recursively (they live in subdirectories the
    /// directory watch does not see), so a changed context rebuilds without waiting for the
    /// resync.
    fn watch_contexts(&mut self, scan: &Scan) {
        let Some((w, _)) = &mut self.watch else {
            return;
        };
        let wanted: BTreeSet<PathBuf> = scan
            .valid
            .values()
            .filter_map(|c| c.build.as_ref().map(|b| b.context_dir.clone()))
            .collect();
        for gone in self.contexts.difference(&wanted) {
            let _ = w.unwatch(gone);
        }
        self.contexts.retain(|c| wanted.contains(c));
        for dir in wanted {
            if self.contexts.contains(&dir) {
                continue;
            }
            match w.watch(&dir, notify::RecursiveMode::Recursive) {
                Ok(()) => {
                    debug!(dir = %dir.display(), "Watching a build context.");
                    self.contexts.insert(dir);
                }
                Err(error) => {
                    warn!(dir = %dir.display(), error = %error, "Cannot watch a build context; relying on the periodic resync.");
                }
            }
        }
    }

    /// Logs the problems of the directory's invalid entries once per change: a new or changed
    /// set of problems (one line each), and an entry that is fixed or gone.
    fn log_problems(&mut self, scan: &Scan) {
        for (path, problems) in &scan.invalid {
            let lines: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
            if self.logged_problems.get(path) == Some(&lines) {
                continue;
            }
            let sut = stem(path);
            for line in &lines {
                match &sut {
                    Some(sut) => {
                        warn!(sut = %sut, problem = %line, "Invalid SUT file; its container, if any, is left as it is.")
                    }
                    None => {
                        warn!(problem = %line, "An entry of the SUT directory names no SUT; ignored.")
                    }
                }
            }
            self.logged_problems.insert(path.clone(), lines);
        }
        let fixed: Vec<PathBuf> = self
            .logged_problems
            .keys()
            .filter(|p| !scan.invalid.contains_key(*p))
            .cloned()
            .collect();
        for path in fixed {
            self.logged_problems.remove(&path);
            let valid = stem(&path).is_some_and(|s| scan.valid.contains_key(&s));
            if valid {
                info!(file = %path.display(), "The SUT file is valid again.");
            } else {
                info!(file = %path.display(), "The invalid entry of the SUT directory is gone.");
            }
        }
    }

    /// The running containers whose agents `actions` would disrupt (or wait for), unless their
    /// busy wait already ran out: their agents are asked ([`ask_agents`]).
    fn to_ask(actual: &[Actual], actions: &[Action]) -> Vec<(String, SutName)> {
        actions
            .iter()
            .filter_map(Action::disrupts)
            .filter_map(|id| {
                actual
                    .iter()
                    .find(|a| {
                        a.id == id
                            && a.state == crate::plan::RunState::Running
                            && a.busy != Busy::Expired
                    })
                    .map(|a| (a.id.clone(), a.sut.clone()))
            })
            .collect()
    }

    /// A busy agent of `sut`: [`Busy::Busy`], or [`Busy::Expired`] once its deferral has lasted
    /// `--busy-wait`.
    fn busy_or_expired(&self, sut: &SutName, now: Instant) -> Busy {
        match self.suts.get(sut).and_then(|s| s.deferred_since) {
            Some(t) if now.duration_since(t) >= self.exec.settings.busy_wait => Busy::Expired,
            _ => Busy::Busy,
        }
    }

    /// Applies the agents' own answers over the broker's view, which may be stale (the broker
    /// or the agent's link is down): busy (or expired once the busy wait is over) or idle. An
    /// agent that could not answer keeps the broker's view; one that answers with a stale
    /// heartbeat (hung) is idle. Returns whether anything changed.
    fn apply_answers(&self, actual: &mut [Actual], answers: Vec<Answer>, now: Instant) -> bool {
        let mut changed = false;
        for (id, sut, answer) in answers {
            let busy = match answer {
                Ok(true) => self.busy_or_expired(&sut, now),
                Ok(false) => Busy::Idle,
                Err(error) => {
                    debug!(sut = %sut, container = %id, error = %error, "Could not ask the agent whether it runs a job; going by the broker's view.");
                    continue;
                }
            };
            if let Some(a) = actual.iter_mut().find(|a| a.id == id) {
                if a.busy != busy {
                    debug!(sut = %sut, container = %id, busy = ?busy, broker_view = ?a.busy, "The agent's own answer differs from the broker's view.");
                    a.busy = busy;
                    changed = true;
                }
            }
        }
        changed
    }

    async fn pass(&mut self) {
        let now = Instant::now();
        self.ensure_watch();
        let exec = self.exec.clone();
        let settings = &exec.settings;
        let dir = settings.sut_dir.clone();
        let allow = settings.allow;
        let scan = match tokio::task::spawn_blocking(move || scan_dir(&dir, &allow)).await {
            Ok(Ok(scan)) => scan,
            Ok(Err(error)) => {
                error!(dir = %settings.sut_dir.display(), error = %error, "Cannot read the SUT directory; changing nothing.");
                self.wake(now + RETRY_MIN * 5);
                return;
            }
            Err(error) => {
                error!(error = %error, "The directory scan panicked.");
                return;
            }
        };
        self.watch_contexts(&scan);
        self.log_problems(&scan);
        let list = match self.exec.runtime.list().await {
            Ok(l) => {
                if !self.docker_reachable {
                    info!("Docker is reachable again.");
                }
                self.docker_reachable = true;
                self.docker_failures = 0;
                l
            }
            Err(error) => {
                self.docker_failures += 1;
                let delay = backoff(self.docker_failures, RETRY_MIN, DOCKER_RETRY_MAX);
                if self.docker_reachable {
                    error!(error = %error, "Docker is unreachable; retrying with backoff.");
                }
                self.docker_reachable = false;
                self.wake(now + delay);
                self.publish(&scan, &[], &BTreeMap::new());
                return;
            }
        };
        let ctx = &settings.spec;
        let desired: BTreeMap<SutName, Desired> = scan
            .valid
            .iter()
            .map(|(name, cfg)| {
                (
                    name.clone(),
                    Desired {
                        hash: ctx.container_hash(&cfg.hash()),
                        name: ctx.container_name(name),
                        heal: cfg.restart.on_unhealthy == OnUnhealthy::Restart,
                    },
                )
            })
            .collect();
        let invalid: BTreeSet<SutName> = scan.invalid.keys().filter_map(|p| stem(p)).collect();
        let supervisor = ctx.supervisor.to_string();
        let mut actual = Vec::new();
        for c in list {
            let owned = c.labels.get(LABEL_MANAGED_BY).map(String::as_str) == Some(MANAGED_BY)
                && c.labels.get(LABEL_SUPERVISOR) == Some(&supervisor);
            let sut = if owned {
                match c.labels.get(LABEL_SUT).and_then(|s| SutName::new(s).ok()) {
                    Some(s) => s,
                    None => continue,
                }
            } else {
                match c
                    .name
                    .strip_prefix(&ctx.name_prefix)
                    .and_then(|s| SutName::new(s).ok())
                    .filter(|s| desired.contains_key(s))
                {
                    Some(s) => s,
                    None => continue,
                }
            };
            let busy = if self.agents.get(&sut) == Some(&AgentState::Busy) {
                self.busy_or_expired(&sut, now)
            } else {
                Busy::Idle
            };
            actual.push(Actual {
                id: c.id,
                name: c.name,
                sut,
                owned,
                hash: c.labels.get(LABEL_CONFIG_HASH).cloned(),
                state: c.state,
                health: c.health,
                busy,
            });
        }
        let mut actions = plan(&desired, &actual, &invalid);
        // Before disrupting a running agent (or while waiting for it), ask the agent itself,
        // through Docker, whether a job runs: the broker's view may be stale or missing (the
        // broker, or the agent's link, is down).
        let ask = Self::to_ask(&actual, &actions);
        if !ask.is_empty() {
            let answers = ask_agents(
                self.exec.runtime.clone(),
                self.exec.settings.parallelism,
                ask,
            )
            .await;
            if self.apply_answers(&mut actual, answers, now) {
                actions = plan(&desired, &actual, &invalid);
            }
        }

        // Bookkeeping that is not an action: deferrals, conflicts, healthy windows.
        let deferred: BTreeMap<&SutName, &Action> = actions
            .iter()
            .filter(|a| matches!(a, Action::Defer { .. }))
            .map(|a| (a.sut(), a))
            .collect();
        let conflicts: BTreeMap<&SutName, &Action> = actions
            .iter()
            .filter(|a| matches!(a, Action::Conflict { .. }))
            .map(|a| (a.sut(), a))
            .collect();
        let acting: BTreeSet<&SutName> = actions
            .iter()
            .filter(|a| a.mutates())
            .map(Action::sut)
            .collect();
        let known: BTreeSet<SutName> = desired
            .keys()
            .chain(invalid.iter())
            .chain(actual.iter().filter(|a| a.owned).map(|a| &a.sut))
            .cloned()
            .collect();
        for sut in &known {
            let st = self.suts.entry(sut.clone()).or_default();
            match deferred.get(sut) {
                Some(defer @ Action::Defer { action, .. }) => {
                    if st.deferred_since.is_none() {
                        self.metrics.on_action(defer);
                    }
                    let since = *st.deferred_since.get_or_insert(now);
                    let wait = settings.busy_wait.saturating_sub(now.duration_since(since));
                    st.pending = Some(format!(
                        "{action} (waiting for the running job, at most {})",
                        humantime::format_duration(Duration::from_secs(wait.as_secs()))
                    ));
                    debug!(sut = %sut, action = %action, "Deferred while the agent is busy.");
                    // Re-plan when the wait runs out.
                    self.wake_at = Some(self.wake_at.map_or(since + settings.busy_wait, |w| {
                        w.min(since + settings.busy_wait)
                    }));
                }
                _ => {
                    // Keep the start of the wait while an expired wait's action is still due.
                    if !acting.contains(sut) {
                        st.deferred_since = None;
                    }
                    st.pending = None;
                }
            }
            st.conflict = match conflicts.get(sut) {
                Some(Action::Conflict { id, name, .. }) => {
                    if st.conflict.is_none() {
                        error!(sut = %sut, container = %id, "A container not managed by this supervisor holds the name {name}; leaving it alone.");
                    }
                    Some(format!(
                        "conflict: container {name} ({}) exists and is not managed by this supervisor; remove or rename it",
                        &id[..id.len().min(12)]
                    ))
                }
                _ => None,
            };
            let primary = actual.iter().find(|a| {
                a.owned && &a.sut == sut && desired.get(sut).is_none_or(|d| d.name == a.name)
            });
            match primary.map(|a| a.health) {
                Some(Health::Healthy) => {
                    let since = *st.heal.healthy_since.get_or_insert(now);
                    if now.duration_since(since) >= HEALTHY_WINDOW && st.heal.streak > 0 {
                        st.heal.streak = 0;
                        st.heal.backoff = Duration::ZERO;
                        st.heal.crash_loop = false;
                        st.heal.next_at = None;
                    }
                }
                _ => st.heal.healthy_since = None,
            }
        }

        // Forget SUTs with no file and no container; clear their retained view.
        let stale: Vec<SutName> = self
            .suts
            .iter()
            .filter(|(sut, st)| !known.contains(*sut) && !st.in_flight)
            .map(|(sut, _)| sut.clone())
            .collect();
        for sut in stale {
            if let Some(st) = self.suts.remove(&sut) {
                if st.published.is_some() {
                    self.clear_retained(&sut);
                }
            }
        }
        // A SUT that is back is no longer cleared.
        self.gone.retain(|sut| !known.contains(sut));

        // Spawn what can run now.
        for action in actions.into_iter().filter(Action::mutates) {
            let sut = action.sut().clone();
            let st = self.suts.entry(sut.clone()).or_default();
            if st.in_flight {
                continue;
            }
            if let Some(at) = st.retry_at {
                if at > now {
                    self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
                    continue;
                }
            }
            if let Action::Restart { .. } = action {
                if let Some(at) = st.heal.next_at.filter(|at| *at > now) {
                    self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
                    continue;
                }
                let r = &scan.valid[&sut].restart;
                st.heal.backoff = if st.heal.backoff.is_zero() {
                    r.backoff_min
                } else {
                    (st.heal.backoff * 2).min(r.backoff_max)
                };
                st.heal.next_at = Some(now + st.heal.backoff);
                if st.heal.streak + 1 >= r.crash_loop_after.get() {
                    if !st.heal.crash_loop {
                        warn!(sut = %sut, restarts = st.heal.restarts + 1, "The agent keeps turning unhealthy: crash loop.");
                    }
                    st.heal.crash_loop = true;
                }
            }
            st.in_flight = true;
            let exec = self.exec.clone();
            let sem = self.semaphore.clone();
            let tx = self.done_tx.clone();
            debug!(sut = %sut, action = action.kind(), "Starting action.");
            self.tasks.spawn(async move {
                let result = match sem.acquire_owned().await {
                    Ok(_permit) => exec.execute(&action).await,
                    Err(_) => Ok(()),
                };
                let _ = tx.send(Done {
                    sut,
                    action,
                    result,
                });
            });
        }
        self.publish(&scan, &actual, &desired);
        self.observe_metrics(&actual, &desired);
    }

    /// Per-SUT health and the SUT counts, after a full pass.
    fn observe_metrics(&mut self, actual: &[Actual], desired: &BTreeMap<SutName, Desired>) {
        let primary = |sut: &SutName| {
            actual.iter().find(|a| {
                a.owned && &a.sut == sut && desired.get(sut).is_none_or(|d| d.name == a.name)
            })
        };
        self.metrics.observe_suts(self.suts.keys().map(|sut| {
            let p = primary(sut);
            (
                sut,
                p.map_or(Health::None, |a| a.health),
                p.is_some_and(|a| a.state == crate::plan::RunState::Running),
            )
        }));
        if let Some(status) = &self.published_status {
            self.metrics.observe_counts(&status.suts);
        }
    }

    /// When the unchanged supervisor status is due again (every `status_every`).
    fn status_due(&self) -> Option<Instant> {
        self.link.as_ref()?;
        self.status_sent_at
            .map(|at| at + self.exec.settings.status_every)
    }

    /// Sends the latest supervisor status, stamped now.
    fn send_status(&mut self) {
        let (Some(link), Some(status)) = (&self.link, &self.published_status) else {
            return;
        };
        let settings = &self.exec.settings;
        let mut s = status.clone();
        s.time_ms = payloads::now_ms();
        let _ = link.set_sticky(
            settings.topics.supervisor_status(&settings.spec.supervisor),
            serde_json::to_vec(&s).expect("status serialises"),
        );
        self.status_sent_at = Some(Instant::now());
    }

    fn publish(&mut self, scan: &Scan, actual: &[Actual], desired: &BTreeMap<SutName, Desired>) {
        let exec = self.exec.clone();
        let settings = &exec.settings;
        // The container counts are unknown (not zero) while the engine cannot be asked.
        let known = Some(0).filter(|_| self.docker_reachable);
        let mut counts = SutCounts {
            desired: scan.valid.len() as u64,
            invalid: scan.invalid.len() as u64,
            running: known,
            healthy: known,
            unhealthy: known,
        };
        let problems: BTreeMap<SutName, Vec<String>> = scan
            .invalid
            .iter()
            .filter_map(|(p, probs)| {
                Some((stem(p)?, probs.iter().map(|p| p.to_string()).collect()))
            })
            .collect();
        // Entries that name no SUT have no `<sut>/supervisor` view: their problems go on the
        // supervisor's status.
        let file_problems: Vec<String> = scan
            .invalid
            .iter()
            .filter(|(p, _)| stem(p).is_none())
            .flat_map(|(_, probs)| probs.iter().map(|p| p.to_string()))
            .collect();
        for a in actual.iter().filter(|a| a.owned) {
            let count = match a.health {
                Health::Healthy => &mut counts.healthy,
                Health::Unhealthy => &mut counts.unhealthy,
                _ => &mut None,
            };
            if let Some(n) = count {
                *n += 1;
            }
            if a.state == crate::plan::RunState::Running {
                if let Some(n) = &mut counts.running {
                    *n += 1;
                }
            }
        }
        let status = SupervisorStatus {
            v: payloads::VERSION,
            id: settings.spec.supervisor.clone(),
            state: SupervisorState::Online,
            boot_id: self.boot_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            docker_reachable: self.docker_reachable,
            suts: counts,
            time_ms: 0,
            managed_broker: self.broker.clone(),
            file_problems,
            refresh_ms: settings.status_every.as_millis() as u64,
        };
        if self.published_status.as_ref() != Some(&status) {
            self.published_status = Some(status);
            self.send_status();
        }
        let Some(link) = &self.link else {
            return;
        };
        if !self.docker_reachable {
            return;
        }
        for (sut, st) in self.suts.iter_mut() {
            let primary = actual.iter().find(|a| {
                a.owned && &a.sut == sut && desired.get(sut).is_none_or(|d| d.name == a.name)
            });
            let view = SutView {
                v: payloads::VERSION,
                sut: sut.clone(),
                supervisor: settings.spec.supervisor.clone(),
                container_id: primary.map(|a| a.id.clone()),
                image: scan.valid.get(sut).map(|c| c.image.clone()),
                config_hash: primary.and_then(|a| a.hash.clone()),
                health: primary.map_or(Health::None, |a| a.health),
                restarts: st.heal.restarts,
                crash_loop: st.heal.crash_loop,
                pending_action: st.pending.clone(),
                last_error: st.conflict.clone().or_else(|| st.last_error.clone()),
                config_problems: problems.get(sut).cloned().unwrap_or_default(),
                time_ms: 0,
            };
            if st.published.as_ref() != Some(&view) {
                let mut v = view.clone();
                v.time_ms = payloads::now_ms();
                let _ = link.set_sticky(
                    settings.topics.supervisor(sut),
                    serde_json::to_vec(&v).expect("view serialises"),
                );
                st.published = Some(view);
            }
        }
    }
}

fn stem(p: &Path) -> Option<SutName> {
    p.file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| SutName::new(s).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_health_changes_and_other_events_wake_the_loop() {
        let ev = |id: &str, action: &str| RuntimeEvent {
            id: id.into(),
            action: action.into(),
            sut: None,
        };
        let mut h = HealthSeen::default();
        assert!(h.worth_a_pass(&ev("a", "health_status: healthy")));
        assert!(!h.worth_a_pass(&ev("a", "health_status: healthy")));
        assert!(h.worth_a_pass(&ev("b", "health_status: healthy")));
        assert!(h.worth_a_pass(&ev("a", "health_status: unhealthy")));
        assert!(!h.worth_a_pass(&ev("a", "health_status: unhealthy")));
        assert!(h.worth_a_pass(&ev("a", "die")));
        assert!(h.worth_a_pass(&ev("a", "health_status: unhealthy")));
    }
}
