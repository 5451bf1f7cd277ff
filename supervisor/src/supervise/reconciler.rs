//! The loop: one task owns all state and turns [`Input`]s into passes.
//!
//! Its inputs are one `select!` ([`Inputs::next`]): shutdown (a future given by the caller),
//! file change notices, Docker event wake-ups (and container starts), finished actions, broker
//! messages (agent status, last jobs), the managed broker's state, the broker link's state, and
//! the earliest of its [`Timers`]. Inputs only move timers or note state; the pass itself runs
//! when the pass timer fires (see [`super::pass`]).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use labvisor_mqtt::{Incoming, LinkState, Received};
use labvisor_protocol::payloads::{self, AgentState, AgentStatus, JobStatus, ManagedBrokerStatus};
use labvisor_protocol::topics::SutTopic;
use labvisor_protocol::SutName;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};
use tracing::{debug, error, info, warn};

use super::executor::{Done, Executor};
use super::pass::Reach;
use super::status::{start_link, Publisher};
use super::timers::Timers;
use super::watchers::{docker_events, DirWatch};
use super::{BrokerMessage, Hooks, Settings, SuperviseError, EVENT_DELAY};
use crate::metrics::{self, Metrics};
use crate::plan::policy::SutState;
use crate::plan::{Action, Healing, RecreateReason};
use crate::runtime::ContainerRuntime;

/// The loop's state.
pub(super) struct Reconciler<R> {
    pub(super) settings: Arc<Settings>,
    pub(super) runtime: Arc<R>,
    pub(super) exec: Executor<R>,
    pub(super) status: Publisher,
    pub(super) watch: DirWatch,
    pub(super) suts: BTreeMap<SutName, SutState>,
    /// Each agent's state as the broker last said.
    pub(super) agents: BTreeMap<SutName, AgentState>,
    /// Each agent's `device_work` as the broker last said (only agents that report some).
    pub(super) device_work: BTreeMap<SutName, String>,
    /// The agents whose device process is drained, as the broker last said (`draining`).
    pub(super) draining: BTreeSet<SutName>,
    /// When each agent last said, in a healthy state, that its exec probe fails (helper probe):
    /// such a container is not healed while that word is recent.
    pub(super) probe_failing: BTreeMap<SutName, Instant>,
    /// The supervisor's own hang detection: when each agent was last heard live, its
    /// container's start, confirmed hangs, the link's uptime (see [`crate::plan::hang`]).
    pub(super) hang: crate::plan::hang::Lab,
    /// Who heals unhealthy containers, from the runtime at start
    /// ([`ContainerRuntime::heals_itself`]): under [`Healing::Runtime`] the plan restarts
    /// nothing, the hang rule is off and no drain is sent (see [`Healing`]).
    pub(super) healing: Healing,
    pub(super) docker: Reach,
    pub(super) timers: Timers,
    pub(super) metrics: Metrics,
    /// The managed broker's last known state.
    pub(super) broker: Option<ManagedBrokerStatus>,
    /// The problems of each invalid entry of the SUT directory, as last logged: each is logged
    /// once when it appears or changes, not on every pass.
    pub(super) logged_problems: BTreeMap<PathBuf, Vec<String>>,
    /// Passes so far (the `n` of the `pass` span).
    pub(super) passes: u64,
    // -- lab operations: the rolling restart (see `super::rolling`).
    /// Restart requests not yet seen by a pass.
    pub(super) restart_requests: Vec<labvisor_protocol::payloads::RestartRequest>,
    /// The rolling restart running, or the last one.
    pub(super) rolling: Option<crate::plan::rolling::Rolling>,
    /// Its status as last published.
    pub(super) rolling_published: Option<labvisor_protocol::payloads::RestartStatus>,
    /// The test seam [`super::Hooks::restart_status`].
    pub(super) restart_hook:
        Option<watch::Sender<Option<labvisor_protocol::payloads::RestartStatus>>>,
}

/// What woke the loop.
enum Input {
    Shutdown,
    /// Something in the SUT directory changed.
    Files,
    /// A Docker event worth a pass (or the event stream was reopened).
    Docker,
    /// The managed broker's state changed.
    Broker(ManagedBrokerStatus),
    /// An action finished.
    Done(Done),
    /// A broker message (agent status, last job, a removed SUT's retained topic).
    Message(Received),
    /// An action task ended (its `Done` was sent before).
    Joined,
    /// A rolling restart request through the test seam.
    Restart(labvisor_protocol::payloads::RestartRequest),
    /// The supervisor's broker link changed (connected, reconnected, lost).
    Link(LinkState),
    /// A broker message fed through the test seam.
    Fed(BrokerMessage),
    /// Docker started a SUT's container (its id).
    Started(SutName, String),
    /// The earliest timer.
    Deadline,
}

/// The loop's input channels.
struct Inputs {
    files: mpsc::Receiver<()>,
    docker: mpsc::Receiver<()>,
    done: mpsc::UnboundedReceiver<Done>,
    broker: Option<watch::Receiver<ManagedBrokerStatus>>,
    incoming: Option<Incoming>,
    /// The test seam [`super::Hooks::restarts`].
    restarts: Option<mpsc::Receiver<labvisor_protocol::payloads::RestartRequest>>,
    /// The broker link's state (or the test seam [`super::Hooks::link_state`]).
    link: Option<watch::Receiver<LinkState>>,
    /// The test seam [`super::Hooks::messages`].
    fed: Option<mpsc::Receiver<BrokerMessage>>,
    /// Containers Docker started: their SUT and id.
    starts: mpsc::UnboundedReceiver<(SutName, String)>,
}

impl Inputs {
    /// The next input (a closed channel is no input).
    async fn next<R: ContainerRuntime>(
        &mut self,
        shutdown: &mut Pin<&mut impl Future<Output = ()>>,
        exec: &mut Executor<R>,
        deadline: Instant,
    ) -> Input {
        tokio::select! {
            () = shutdown.as_mut() => Input::Shutdown,
            Some(()) = self.files.recv() => Input::Files,
            Some(()) = self.docker.recv() => Input::Docker,
            Some(b) = changed(self.broker.as_mut()) => Input::Broker(b),
            Some(done) = self.done.recv() => Input::Done(done),
            Some(msg) = recv(self.incoming.as_mut()) => Input::Message(msg),
            Some(req) = recv_fed(self.restarts.as_mut()) => Input::Restart(req),
            Some(state) = changed(self.link.as_mut()) => Input::Link(state),
            Some(msg) = recv_fed(self.fed.as_mut()) => Input::Fed(msg),
            Some((sut, id)) = self.starts.recv() => Input::Started(sut, id),
            () = exec.join_next(), if !exec.is_idle() => Input::Joined,
            () = sleep_until(deadline) => Input::Deadline,
        }
    }
}

/// The next state of a watched value (the managed broker, the broker link); `None` without
/// one or once its sender is gone.
async fn changed<T: Clone>(rx: Option<&mut watch::Receiver<T>>) -> Option<T> {
    let rx = rx?;
    rx.changed().await.ok()?;
    Some(rx.borrow_and_update().clone())
}

/// The next input of a test seam (restart requests, broker messages); `None` without one.
async fn recv_fed<T>(rx: Option<&mut mpsc::Receiver<T>>) -> Option<T> {
    rx?.recv().await
}

/// The next broker message; `None` without a link.
async fn recv(incoming: Option<&mut Incoming>) -> Option<Received> {
    incoming?.recv().await
}

/// The metrics server's stop token and task.
type MetricsServer = (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<std::io::Result<()>>,
);

/// Binds the metrics address and serves `/metrics` and `/healthz` there until the returned
/// token is cancelled; `None` when not asked for (or the default address is taken).
async fn serve_metrics(
    settings: &Settings,
    metrics: &Metrics,
) -> Result<Option<MetricsServer>, SuperviseError> {
    let Some(listen) = settings.metrics_listen else {
        return Ok(None);
    };
    let listener = match tokio::net::TcpListener::bind(listen.addr).await {
        Ok(l) => l,
        Err(error) if listen.required => {
            return Err(SuperviseError::MetricsListen {
                addr: listen.addr,
                error,
            })
        }
        Err(error) => {
            warn!(listen = %listen.addr, error = %error, "Cannot serve /metrics and /healthz; going on without them (see --metrics-listen).");
            return Ok(None);
        }
    };
    if let Ok(addr) = listener.local_addr() {
        info!(listen = %addr, "Serving /metrics and /healthz.");
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let page = crate::web::router(web_state(settings, stop.clone())?);
    let server = tokio::spawn(metrics::serve(
        listener,
        metrics.shared(),
        Some(page),
        stop.clone().cancelled_owned(),
    ));
    Ok(Some((stop, server)))
}

/// The web page's state: fed by its own link to the supervisor's broker until `stop`, or
/// without one when the supervisor runs without a broker.
fn web_state(
    settings: &Settings,
    stop: tokio_util::sync::CancellationToken,
) -> Result<Arc<crate::web::WebState>, SuperviseError> {
    let Some(opts) = &settings.mqtt else {
        return Ok(crate::web::WebState::without_broker(
            settings.topics.clone(),
        ));
    };
    let client_id = format!(
        "labvisor-web-{}-{}",
        settings.spec.supervisor,
        payloads::random_id()
    );
    Ok(crate::web::start(
        opts,
        client_id,
        settings.topics.clone(),
        stop,
    )?)
}

/// Sets up the loop (metrics, broker link, watchers) and runs it until `shutdown`.
pub(super) async fn run<R: ContainerRuntime>(
    settings: Settings,
    runtime: Arc<R>,
    hooks: Hooks,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SuperviseError> {
    let settings = Arc::new(settings);
    let boot_id = payloads::random_id();
    let mut broker_rx = settings.managed_broker.clone();
    let broker = broker_rx.as_mut().map(|r| r.borrow_and_update().clone());
    let metrics = new_metrics(&settings, broker.as_ref());
    let metrics_server = serve_metrics(&settings, &metrics).await?;
    let (link, incoming) = start_link(&settings, &boot_id, broker.clone())?;
    let mut link_state = hooks
        .link_state
        .or_else(|| link.as_ref().map(|l| l.watch_state()));
    let first_link = link_state.as_mut().map(|l| l.borrow_and_update().clone());
    let healing = Healing::of(runtime.heals_itself());
    // The agents publish on a broker the supervisor hears: it can watch them for hangs, unless
    // the runtime heals them itself (and the supervisor cannot exec into them to confirm one).
    let watches =
        settings.spec.agent_broker.is_some() && first_link.is_some() && healing.by_supervisor();
    let (fs_tx, fs_rx) = mpsc::channel::<()>(1);
    let (files, fs_tx) = match hooks.file_events {
        Some(fed) => (fed, None),
        None => (fs_rx, Some(fs_tx)),
    };
    let (docker_tx, docker) = mpsc::channel::<()>(1);
    let (done_tx, done) = mpsc::unbounded_channel::<Done>();
    let (starts_tx, starts) = mpsc::unbounded_channel();
    let events = tokio::spawn(docker_events(runtime.clone(), docker_tx, starts_tx));
    let mut inputs = Inputs {
        files,
        docker,
        done,
        broker: broker_rx,
        incoming,
        restarts: hooks.restarts,
        link: link_state,
        fed: hooks.messages,
        starts,
    };
    let now = Instant::now();
    let mut sup = Reconciler {
        exec: Executor::new(runtime.clone(), settings.clone(), link.clone(), done_tx),
        status: Publisher::new(settings.clone(), link, boot_id, hooks.views),
        watch: DirWatch::new(
            settings.sut_dir.clone(),
            settings.poll,
            settings.resync,
            fs_tx,
        ),
        timers: Timers::new(now, settings.resync),
        runtime,
        suts: BTreeMap::new(),
        agents: BTreeMap::new(),
        device_work: BTreeMap::new(),
        draining: BTreeSet::new(),
        probe_failing: BTreeMap::new(),
        hang: crate::plan::hang::Lab::new(watches),
        healing,
        docker: Reach::default(),
        metrics,
        broker,
        logged_problems: BTreeMap::new(),
        passes: 0,
        restart_requests: Vec::new(),
        rolling: None,
        rolling_published: None,
        restart_hook: hooks.restart_status,
        settings,
    };
    if let Some(state) = first_link {
        sup.link_changed(&state, now);
    }
    info!(dir = %sup.settings.sut_dir.display(), supervisor = %sup.settings.spec.supervisor, "Supervising.");
    sup.run(&mut inputs, shutdown).await;
    info!("Shutting down; agents keep running.");
    events.abort();
    sup.finish(metrics_server).await;
    Ok(())
}

/// The supervisor's metrics, with the managed broker's when it runs one.
fn new_metrics(settings: &Settings, broker: Option<&ManagedBrokerStatus>) -> Metrics {
    let metrics = Metrics::new(settings.resync);
    match broker {
        Some(b) => {
            let m = metrics.with_managed_broker();
            m.on_broker(b);
            m
        }
        None => metrics,
    }
}

impl<R: ContainerRuntime> Reconciler<R> {
    /// After the loop: stops the metrics server, waits for the actions under way, then
    /// publishes the offline status.
    async fn finish(mut self, metrics_server: Option<MetricsServer>) {
        if let Some((stop, server)) = metrics_server {
            stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
        }
        self.exec
            .drain(self.settings.stop_timeout + Duration::from_secs(5))
            .await;
        self.status
            .offline(self.docker.reachable, self.broker)
            .await;
    }

    /// The loop, until `shutdown`.
    async fn run(&mut self, inputs: &mut Inputs, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let deadline = self.timers.deadline(self.status.due());
            let input = inputs.next(&mut shutdown, &mut self.exec, deadline).await;
            let now = Instant::now();
            match input {
                Input::Shutdown => break,
                Input::Files => self.timers.file_event(now),
                Input::Docker => self.timers.pass_in(now, EVENT_DELAY),
                Input::Broker(b) => {
                    self.metrics.on_broker(&b);
                    self.broker = Some(b);
                    // The status says so at once (queued while the broker is down).
                    self.timers.pass_in(now, Duration::ZERO);
                }
                Input::Done(done) => self.finished(done, now),
                Input::Message(msg) => self.message(&msg.topic, &msg.payload, msg.retain),
                Input::Joined => {}
                Input::Restart(req) => self.restart_request(req),
                Input::Link(state) => self.link_changed(&state, now),
                Input::Fed(m) => self.message(&m.topic, &m.payload, m.retained),
                Input::Started(sut, id) => self.hang.agent(&sut).started(&id, now),
                Input::Deadline => self.deadline(now).await,
            }
        }
    }

    /// The earliest timer fired: the status, a pass.
    async fn deadline(&mut self, now: Instant) {
        let pass = self
            .timers
            .fire(now, self.settings.resync, !self.exec.is_idle());
        if self.status.due().is_some_and(|d| d <= now) {
            self.status.send_status();
        }
        if pass {
            self.pass().await;
        }
    }

    fn message(&mut self, topic: &str, payload: &[u8], retained: bool) {
        if self.is_restart_request(topic) {
            if !retained {
                self.restart_requested(payload);
            }
            return;
        }
        if self.is_restart_status(topic) {
            if retained {
                self.restart_left_over(payload);
            }
            return;
        }
        let parsed = self.settings.topics.parse(topic);
        if let Some((sut, kind)) = &parsed {
            if self.status.clear_if_gone(topic, sut, kind, payload) {
                return;
            }
        }
        match parsed {
            Some((sut, SutTopic::Agent)) => self.agent_message(sut, payload, retained),
            Some((sut, SutTopic::LastJob)) => {
                if let Ok(job) = serde_json::from_slice::<JobStatus>(payload) {
                    self.metrics.observe_job(&sut, &job, retained);
                }
            }
            _ => {}
        }
    }

    fn agent_message(&mut self, sut: SutName, payload: &[u8], retained: bool) {
        let status = serde_json::from_slice::<AgentStatus>(payload).ok();
        self.metrics.observe_agent(&sut, status.as_ref());
        self.agent_heard(&sut, status.as_ref(), retained);
        let work = status.as_ref().and_then(|s| s.device_work.clone());
        let had_work = match work {
            Some(w) => self.device_work.insert(sut.clone(), w),
            None => self.device_work.remove(&sut),
        }
        .is_some();
        let draining = status.as_ref().is_some_and(|s| s.draining);
        let was_draining = if draining {
            !self.draining.insert(sut.clone())
        } else {
            self.draining.remove(&sut)
        };
        if had_work != self.device_work.contains_key(&sut) || draining != was_draining {
            // A deferral may now wait for the device's own work (and drain it), or no longer; a
            // drain may be left that nothing needs (lifted).
            self.timers.pass_in(Instant::now(), EVENT_DELAY);
        }
        let failing = status
            .as_ref()
            .is_some_and(|s| s.probe_failure.is_some() && s.state.is_healthy());
        let was_failing = if failing {
            self.probe_failing
                .insert(sut.clone(), Instant::now())
                .is_some()
        } else {
            self.probe_failing.remove(&sut).is_some()
        };
        if failing != was_failing {
            debug!(sut = %sut, probe_failing = failing, "Agent's exec probe changed.");
            self.timers.pass_in(Instant::now(), EVENT_DELAY);
        }
        let state = status.map(|s| s.state);
        let before = match state {
            Some(s) => self.agents.insert(sut.clone(), s),
            None => self.agents.remove(&sut),
        };
        let was_busy = before == Some(AgentState::Busy);
        let is_busy = state == Some(AgentState::Busy);
        if was_busy != is_busy {
            debug!(sut = %sut, busy = is_busy, "Agent busy state changed.");
            self.timers.pass_in(Instant::now(), EVENT_DELAY);
        }
    }

    /// An action finished: its outcome is logged in its span; a failure makes its SUT retry
    /// with backoff; either way a pass follows.
    fn finished(&mut self, done: Done, now: Instant) {
        let _span = done.span.enter();
        let st = self.suts.entry(done.sut.clone()).or_default();
        let error = done.result.as_ref().err().map(ToString::to_string);
        let failed = error.clone();
        match st.finished(&done.action, error, now) {
            None => {
                self.metrics.on_action(&done.action);
                self.hang_action_done(&done.action, now);
                if let Action::Remove { sut_gone: true, .. } = done.action {
                    // The SUT is gone: clear what the broker retains of it.
                    self.suts.remove(&done.sut);
                    self.status.clear_retained(&done.sut);
                }
            }
            Some(delay) => {
                // A rolling restart's recreation or a healing restart that failed may have
                // stopped the container: exited with the wanted hash, it would pass for a
                // person's stop and stay down (the pass forgets this unless it is exited).
                if let Action::Recreate {
                    id,
                    reason: RecreateReason::Requested,
                    ..
                }
                | Action::Restart { id, .. } = &done.action
                {
                    st.stopped_itself = Some(id.clone());
                }
                self.rolling_done(&done.action, failed.as_deref());
                self.metrics.on_error(&done.sut);
                if let Err(error) = &done.result {
                    error!(error = %error, retry_in = ?delay, "Action failed; will retry.");
                }
                self.timers.wake_at(now + delay);
            }
        }
        self.timers.pass_now(now);
    }
}
