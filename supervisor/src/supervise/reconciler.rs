//! The loop: one task owns all state and turns [`Input`]s into passes.
//!
//! Its inputs are one `select!` ([`Inputs::next`]): shutdown (a future given by the caller),
//! file change notices, Docker event wake-ups, finished actions, broker messages (agent status,
//! last jobs), the managed broker's state, and the earliest of its [`Timers`]. Inputs only move
//! timers or note state; the pass itself runs when the pass timer fires (see
//! [`super::pass`]).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use labvisor_mqtt::{Incoming, Received};
use labvisor_protocol::payloads::{self, AgentState, AgentStatus, JobStatus, ManagedBrokerStatus};
use labvisor_protocol::topics::SutTopic;
use labvisor_protocol::SutName;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};
use tracing::{debug, error, info, warn};

use super::executor::{Done, Executor};
use super::pass::Reach;
use super::status::{start_link, Publisher};
use super::watchers::{docker_events, DirWatch};
use super::{Hooks, Settings, SuperviseError, BUSY_PASS_INTERVAL, DEBOUNCE, EVENT_DELAY};
use crate::metrics::{self, Metrics};
use crate::plan::policy::SutState;
use crate::plan::{Action, RecreateReason};
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

/// When each kind of wake-up is due.
#[derive(Debug)]
pub(super) struct Timers {
    /// The end of the trailing debounce of file events.
    files: Option<Instant>,
    /// When the next pass is due.
    pass: Option<Instant>,
    /// Earliest retry, healing or busy-wait deadline.
    wake: Option<Instant>,
    /// The next periodic resync.
    resync: Instant,
    /// When the last pass ran.
    last_pass: Option<Instant>,
}

impl Timers {
    /// Timers at `now`: a pass at once, a resync after `resync`.
    fn new(now: Instant, resync: Duration) -> Self {
        Self {
            files: None,
            pass: Some(now),
            wake: None,
            resync: now + resync,
            last_pass: None,
        }
    }

    /// A file changed: the pass waits for [`DEBOUNCE`] of quiet.
    fn file_event(&mut self, now: Instant) {
        self.files = Some(now + DEBOUNCE);
    }

    /// A pass at `now + d`, unless one is due sooner.
    pub(super) fn pass_in(&mut self, now: Instant, d: Duration) {
        let at = now + d;
        self.pass = Some(self.pass.map_or(at, |p| p.min(at)));
    }

    /// A pass at `now`.
    fn pass_now(&mut self, now: Instant) {
        self.pass = Some(now);
    }

    /// A pass at `at` (a retry, healing or busy-wait deadline), unless a wake-up comes sooner.
    pub(super) fn wake_at(&mut self, at: Instant) {
        self.wake = Some(self.wake.map_or(at, |w| w.min(at)));
    }

    /// The earliest timer (`status`: when the status is due again).
    fn deadline(&self, status: Option<Instant>) -> Instant {
        [self.files, self.pass, self.wake, Some(self.resync), status]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(self.resync)
    }

    /// Fires the timers due at `now`; returns whether a pass runs now. While actions run
    /// (`busy`), passes come at most every [`BUSY_PASS_INTERVAL`].
    fn fire(&mut self, now: Instant, resync: Duration, busy: bool) -> bool {
        if self.files.is_some_and(|d| d <= now) {
            self.files = None;
            self.pass = Some(now);
        }
        if self.wake.is_some_and(|d| d <= now) {
            self.wake = None;
            self.pass = Some(now);
        }
        if self.resync <= now {
            self.resync = now + resync;
            self.pass = Some(now);
        }
        if self.pass.is_none_or(|d| d > now) {
            return false;
        }
        match self.last_pass.map(|l| l + BUSY_PASS_INTERVAL) {
            Some(next) if busy && now < next => {
                self.pass = Some(next);
                false
            }
            _ => {
                self.pass = None;
                self.last_pass = Some(now);
                true
            }
        }
    }
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
            Some(req) = recv_restart(self.restarts.as_mut()) => Input::Restart(req),
            () = exec.join_next(), if !exec.is_idle() => Input::Joined,
            () = sleep_until(deadline) => Input::Deadline,
        }
    }
}

/// The next state of the managed broker; `None` without one or once its sender is gone.
async fn changed(
    rx: Option<&mut watch::Receiver<ManagedBrokerStatus>>,
) -> Option<ManagedBrokerStatus> {
    let rx = rx?;
    rx.changed().await.ok()?;
    Some(rx.borrow_and_update().clone())
}

/// The next rolling restart request of the test seam; `None` without one.
async fn recv_restart(
    rx: Option<&mut mpsc::Receiver<labvisor_protocol::payloads::RestartRequest>>,
) -> Option<labvisor_protocol::payloads::RestartRequest> {
    rx?.recv().await
}

/// The next broker message; `None` without a link.
async fn recv(incoming: Option<&mut Incoming>) -> Option<Received> {
    incoming?.recv().await
}

/// Binds the metrics address and serves `/metrics` and `/healthz` there until the returned
/// token is cancelled; `None` when not asked for (or the default address is taken).
async fn serve_metrics(
    settings: &Settings,
    metrics: &Metrics,
) -> Result<
    Option<(
        tokio_util::sync::CancellationToken,
        tokio::task::JoinHandle<std::io::Result<()>>,
    )>,
    SuperviseError,
> {
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
    let server = tokio::spawn(metrics::serve(
        listener,
        metrics.shared(),
        stop.clone().cancelled_owned(),
    ));
    Ok(Some((stop, server)))
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
    let metrics = Metrics::new(settings.resync);
    let metrics = match &broker {
        Some(b) => {
            let m = metrics.with_managed_broker();
            m.on_broker(b);
            m
        }
        None => metrics,
    };
    let metrics_server = serve_metrics(&settings, &metrics).await?;
    let (link, incoming) = start_link(&settings, &boot_id, broker.clone())?;
    let (fs_tx, fs_rx) = mpsc::channel::<()>(1);
    let (files, fs_tx) = match hooks.file_events {
        Some(fed) => (fed, None),
        None => (fs_rx, Some(fs_tx)),
    };
    let (docker_tx, docker) = mpsc::channel::<()>(1);
    let (done_tx, done) = mpsc::unbounded_channel::<Done>();
    let events = tokio::spawn(docker_events(runtime.clone(), docker_tx));
    let mut inputs = Inputs {
        files,
        docker,
        done,
        broker: broker_rx,
        incoming,
        restarts: hooks.restarts,
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
    info!(dir = %sup.settings.sut_dir.display(), supervisor = %sup.settings.spec.supervisor, "Supervising.");
    sup.run(&mut inputs, shutdown).await;
    info!("Shutting down; agents keep running.");
    events.abort();
    if let Some((stop, server)) = metrics_server {
        stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    }
    sup.exec
        .drain(sup.settings.stop_timeout + Duration::from_secs(5))
        .await;
    sup.status.offline(sup.docker.reachable, sup.broker).await;
    Ok(())
}

impl<R: ContainerRuntime> Reconciler<R> {
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
                if let Action::Remove { sut_gone: true, .. } = done.action {
                    // The SUT is gone: clear what the broker retains of it.
                    self.suts.remove(&done.sut);
                    self.status.clear_retained(&done.sut);
                }
            }
            Some(delay) => {
                if let Action::Recreate {
                    id,
                    reason: RecreateReason::Requested,
                    ..
                } = &done.action
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

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const RESYNC: Duration = Duration::from_secs(30);

    #[test]
    fn file_events_are_debounced_until_quiet() {
        let t0 = Instant::now();
        let mut t = Timers::new(t0, RESYNC);
        assert!(t.fire(t0, RESYNC, false), "the first pass at once");
        for i in 0..5 {
            t.file_event(t0 + MS * 100 * i);
        }
        let quiet = t0 + MS * 400 + DEBOUNCE;
        assert_eq!(t.deadline(None), quiet);
        assert!(!t.fire(quiet - MS, RESYNC, false));
        assert!(t.fire(quiet, RESYNC, false));
        assert_eq!(t.deadline(None), t0 + RESYNC, "then only the resync");
    }

    #[test]
    fn passes_are_spaced_while_actions_run() {
        let t0 = Instant::now();
        let mut t = Timers::new(t0, RESYNC);
        assert!(t.fire(t0, RESYNC, true));
        t.pass_now(t0 + MS * 10);
        assert!(!t.fire(t0 + MS * 10, RESYNC, true));
        assert_eq!(t.deadline(None), t0 + BUSY_PASS_INTERVAL);
        assert!(t.fire(t0 + BUSY_PASS_INTERVAL, RESYNC, true));
        t.pass_now(t0 + BUSY_PASS_INTERVAL + MS);
        assert!(
            t.fire(t0 + BUSY_PASS_INTERVAL + MS, RESYNC, false),
            "idle: at once"
        );
    }

    #[test]
    fn wake_ups_keep_the_earliest() {
        let t0 = Instant::now();
        let mut t = Timers::new(t0, RESYNC);
        assert!(t.fire(t0, RESYNC, false));
        t.wake_at(t0 + MS * 50);
        t.wake_at(t0 + MS * 20);
        t.pass_in(t0, MS * 30);
        t.pass_in(t0, MS * 40);
        assert_eq!(t.deadline(Some(t0 + MS * 10)), t0 + MS * 10);
        assert_eq!(t.deadline(None), t0 + MS * 20);
        assert!(t.fire(t0 + MS * 20, RESYNC, false));
    }
}
