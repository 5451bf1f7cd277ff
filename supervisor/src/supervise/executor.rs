//! The executor: runs the plan's actions as tasks, at most `parallelism` at a time (a
//! semaphore) and never two for one SUT, each in an `action` span (sut, action, container); a
//! finished action comes back to the loop as a [`Done`]. Which actions may start (retry and
//! healing backoff) is decided by [`crate::plan::policy`]. Also asks agents, through the
//! runtime, whether they run a job.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use labvisor_mqtt::MqttLink;
use labvisor_protocol::config::{self, HealthInterval, Scan, SutConfig, AUTO_INTERVAL_MIN};
use labvisor_protocol::SutName;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, error, field, info, info_span, warn, Instrument, Span};

use super::{ActionError, Settings, ASK_TIMEOUT};
use crate::plan::classify::Answer;
use crate::plan::hang::docker_interval;
use crate::plan::policy::{Gate, SutState};
use crate::plan::{Action, RecreateReason};
use crate::runtime::ContainerRuntime;
use crate::spec::{container_spec, ContainerSpec};

/// The result of a finished action, sent back to the loop.
pub(super) struct Done {
    /// The SUT.
    pub sut: SutName,
    /// What ran.
    pub action: Action,
    /// How it went.
    pub result: Result<(), ActionError>,
    /// The action's span: the loop logs the outcome in it.
    pub span: Span,
}

/// Runs actions as tasks.
pub(super) struct Executor<R> {
    exec: Arc<Exec<R>>,
    semaphore: Arc<Semaphore>,
    tasks: JoinSet<()>,
    done_tx: mpsc::UnboundedSender<Done>,
    /// The agent network of each SUT to create this pass, and of the creations in flight.
    networks: Networks,
}

/// Which agent network ([`crate::plan::networks`]) each creation goes on: those the pass
/// assigned, and those of the creations started and not finished (shared with their tasks,
/// which take themselves out when done).
#[derive(Default)]
struct Networks {
    assigned: BTreeMap<SutName, usize>,
    in_flight: Arc<std::sync::Mutex<BTreeMap<SutName, usize>>>,
}

impl<R: ContainerRuntime> Executor<R> {
    /// An executor whose finished actions go to `done_tx`; `link` receives image build lines.
    pub fn new(
        runtime: Arc<R>,
        settings: Arc<Settings>,
        link: Option<MqttLink>,
        done_tx: mpsc::UnboundedSender<Done>,
    ) -> Self {
        Self {
            semaphore: Arc::new(Semaphore::new(settings.parallelism.max(1))),
            exec: Arc::new(Exec {
                runtime,
                settings,
                link,
                auto_ms: AtomicU64::new(AUTO_INTERVAL_MIN.as_millis() as u64),
            }),
            tasks: JoinSet::new(),
            done_tx,
            networks: Networks::default(),
        }
    }

    /// Docker's interval for an `auto` `health.interval` of a container created from now on
    /// ([`crate::plan::hang::auto_interval`] of the lab's size).
    pub fn set_auto_interval(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.exec.auto_ms.store(ms, Ordering::Relaxed);
    }

    /// Whether no action runs.
    pub fn is_idle(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Waits for an action task to end (its [`Done`] was sent); pending while none runs.
    pub async fn join_next(&mut self) {
        if self.tasks.join_next().await.is_none() {
            std::future::pending::<()>().await;
        }
    }

    /// Waits at most `grace` for the running actions.
    pub async fn drain(&mut self, grace: Duration) {
        let _ = tokio::time::timeout(grace, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
    }

    /// Starts the mutating `actions` whose gates are open at `now` (see [`SutState::gate`]);
    /// returns the earliest instant a gated one may start.
    pub fn start_due(
        &mut self,
        actions: Vec<Action>,
        suts: &mut BTreeMap<SutName, SutState>,
        scan: &Scan,
        now: Instant,
    ) -> Option<Instant> {
        let mut wake: Option<Instant> = None;
        for action in actions.into_iter().filter(Action::mutates) {
            let sut = action.sut().clone();
            let st = suts.entry(sut.clone()).or_default();
            let restart = scan.valid.get(&sut).map(|c| &c.restart);
            match st.gate(&action, now, restart) {
                Gate::InFlight => {}
                Gate::Until(at) => wake = Some(wake.map_or(at, |w| w.min(at))),
                Gate::Go { crash_loop_began } => {
                    let span = action_span(&action);
                    if crash_loop_began {
                        span.in_scope(|| {
                            warn!(
                                restarts = st.heal.restarts + 1,
                                "The agent keeps turning unhealthy: crash loop."
                            );
                        });
                    }
                    self.spawn(action, span);
                }
            }
        }
        wake
    }

    /// The agent networks the pass assigned to the SUTs it creates (see [`Self::in_flight`]).
    pub fn assign_networks(&mut self, assigned: BTreeMap<SutName, usize>) {
        self.networks.assigned = assigned;
    }

    /// The agent network of each creation started and not finished.
    pub fn in_flight(&self) -> BTreeMap<SutName, usize> {
        self.networks
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn spawn(&mut self, action: Action, span: Span) {
        let exec = self.exec.clone();
        let sem = self.semaphore.clone();
        let tx = self.done_tx.clone();
        span.in_scope(|| debug!("Starting action."));
        let task_span = span.clone();
        let creates = matches!(action, Action::Create { .. } | Action::Recreate { .. });
        let net = creates
            .then(|| self.networks.assigned.get(action.sut()).copied())
            .flatten();
        let in_flight = self.networks.in_flight.clone();
        if let Some(n) = net {
            in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(action.sut().clone(), n);
        }
        self.tasks.spawn(
            async move {
                let result = match sem.acquire_owned().await {
                    Ok(_permit) => exec.execute(&action, net).await,
                    Err(_) => Ok(()),
                };
                if net.is_some() {
                    in_flight
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(action.sut());
                }
                let _ = tx.send(Done {
                    sut: action.sut().clone(),
                    action,
                    result,
                    span,
                });
            }
            .instrument(task_span),
        );
    }

    /// Asks the agents in the containers `ask` whether they run a job (through the runtime, so
    /// it works while the broker is down), `parallelism` at a time, each within
    /// [`ASK_TIMEOUT`].
    pub async fn ask_agents(&self, ask: Vec<(String, SutName)>) -> Vec<Answer> {
        let runtime = &self.exec.runtime;
        futures_util::stream::iter(ask)
            .map(|(id, sut)| {
                let span = tracing::debug_span!("ask", sut = %sut, container = %id);
                async move {
                    let answer = match tokio::time::timeout(ASK_TIMEOUT, runtime.agent_busy(&id))
                        .await
                    {
                        Ok(Ok(b)) => Some(b),
                        Ok(Err(error)) => {
                            debug!(error = %error, "Could not ask the agent whether it runs a job; going by the broker's view.");
                            None
                        }
                        Err(_) => {
                            debug!(timeout = ?ASK_TIMEOUT, "The agent did not say whether it runs a job; going by the broker's view.");
                            None
                        }
                    };
                    Answer {
                        id,
                        sut,
                        busy: answer.as_ref().map(|a| a.busy),
                        draining: answer.as_ref().is_some_and(|a| a.draining),
                        unhealthy: answer.as_ref().and_then(|a| a.unhealthy.clone()),
                        device_work: answer.and_then(|a| a.device_work),
                    }
                }
                .instrument(span)
            })
            .buffer_unordered(self.exec.settings.parallelism.max(1))
            .collect()
            .await
    }
}

/// What a drain request is for: the agent in container `id` of `sut` drains its device
/// process, or (`lift`) lets it run again.
pub(super) struct DrainRequest {
    pub id: String,
    pub sut: SutName,
    pub lift: bool,
}

impl<R: ContainerRuntime> Executor<R> {
    /// Asks agents to drain their device process, or lifts that (through the runtime, so it
    /// works while the broker is down), `parallelism` at a time, each within [`ASK_TIMEOUT`].
    /// Returns the requests that were carried out.
    pub async fn drain_agents(&self, requests: Vec<DrainRequest>) -> Vec<DrainRequest> {
        let runtime = &self.exec.runtime;
        futures_util::stream::iter(requests)
            .map(|r| {
                let span = tracing::debug_span!("drain", sut = %r.sut, container = %r.id, lift = r.lift);
                async move {
                    match tokio::time::timeout(ASK_TIMEOUT, runtime.agent_drain(&r.id, r.lift)).await {
                        Ok(Ok(())) => Some(r),
                        Ok(Err(error)) => {
                            warn!(error = %error, "Could not ask the agent to drain its device process (or lift it).");
                            None
                        }
                        Err(_) => {
                            warn!(timeout = ?ASK_TIMEOUT, "The agent did not take the drain request (or its lifting) in time.");
                            None
                        }
                    }
                }
                .instrument(span)
            })
            .buffer_unordered(self.exec.settings.parallelism.max(1))
            .filter_map(std::future::ready)
            .collect()
            .await
    }
}

/// The span of one action: its SUT, kind and the container it acts on (for a creation, filled
/// in once the container exists).
fn action_span(action: &Action) -> Span {
    let span = info_span!(
        "action",
        sut = %action.sut(),
        action = action.kind(),
        container = field::Empty
    );
    match action {
        Action::Recreate { id, .. }
        | Action::Remove { id, .. }
        | Action::Start { id, .. }
        | Action::Restart { id, .. } => {
            span.record("container", id.as_str());
        }
        Action::Create { .. } | Action::Defer { .. } | Action::Conflict { .. } => {}
    }
    span
}

/// What action tasks share.
struct Exec<R> {
    runtime: Arc<R>,
    settings: Arc<Settings>,
    /// Where image build lines are published (`<sut>/build`).
    link: Option<MqttLink>,
    /// Docker's interval for an `auto` `health.interval`, in ms, as the last pass chose it.
    auto_ms: AtomicU64,
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

    /// Creates `sut`'s container, on agent network `net` when the pass assigned one.
    async fn create(&self, sut: &SutName, net: Option<usize>) -> Result<String, ActionError> {
        let spec = self.prepare(sut, net).await?;
        Ok(self.runtime.create(&spec).await?)
    }

    /// Everything a new container of `sut` needs before the runtime makes it, shared by a
    /// creation and an update in place: the SUT file read again, its image made sure of, its
    /// broker login made, Docker's health-check interval chosen, and its spec (on agent
    /// network `net` when the pass assigned one).
    async fn prepare(
        &self,
        sut: &SutName,
        net: Option<usize>,
    ) -> Result<ContainerSpec, ActionError> {
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
        // Docker's interval is chosen now, after the hash (which it is not part of).
        let mut cfg = cfg;
        let auto = Duration::from_millis(self.auto_ms.load(Ordering::Relaxed));
        let interval = docker_interval(cfg.health.interval, auto);
        debug!(interval = ?interval, auto = cfg.health.interval == HealthInterval::Auto, "Docker's health-check interval.");
        cfg.health.interval = HealthInterval::Every(interval);
        let mut spec = container_spec(&cfg, &bytes, &hash, &self.settings.spec)?;
        if let Some(n) = net {
            spec = spec.on_agent_network(n, &self.settings.spec);
        }
        Ok(spec)
    }

    /// Stops (unless it never started) and removes the container `id` that a recreation
    /// replaces. A rolling restart's container keeps the wanted config hash: left exited after
    /// a failure here it would pass for a person's stop ([`crate::plan::stopped_by_person`])
    /// and stay down, so it is started again (best effort; the loop also remembers it, see
    /// [`crate::plan::policy::SutState::stopped_itself`]).
    async fn take_down(&self, id: &str, reason: RecreateReason) -> Result<(), ActionError> {
        let rt = &self.runtime;
        if reason == RecreateReason::NeverStarted {
            return Ok(rt.remove(id).await?);
        }
        let result = match rt.stop(id, self.settings.stop_timeout).await {
            Ok(()) => rt.remove(id).await,
            Err(error) => Err(error),
        };
        if let (Err(error), RecreateReason::Requested) = (&result, reason) {
            match rt.start(id).await {
                Ok(()) => {
                    warn!(error = %error, "The restart failed after stopping the container; started it again.")
                }
                Err(start) => {
                    error!(error = %error, start_error = %start, "The restart failed after stopping the container, and starting it again failed too; the next pass tries again.")
                }
            }
        }
        Ok(result?)
    }

    /// Runs `action` (in its span); a creation goes on agent network `net`.
    async fn execute(&self, action: &Action, net: Option<usize>) -> Result<(), ActionError> {
        let rt = &self.runtime;
        let t = self.settings.stop_timeout;
        match action {
            Action::Create { sut } => {
                let id = self.create(sut, net).await?;
                Span::current().record("container", id.as_str());
                info!("Created and started the agent container.");
            }
            Action::Recreate { sut, id, reason } if rt.updates_in_place() => {
                // The same spec as a creation, applied to the container in place (Swarm: a
                // service update), without stopping or removing it first.
                let spec = self.prepare(sut, net).await?;
                let new = rt.update(id, &spec).await?;
                info!(new_container = %new, reason = ?reason, "Updated the agent container in place.");
            }
            Action::Recreate { sut, id, reason } => {
                self.take_down(id, *reason).await?;
                let new = self.create(sut, net).await?;
                info!(new_container = %new, reason = ?reason, "Recreated the agent container.");
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
                info!("Removed the agent container.");
            }
            Action::Start { id, .. } => {
                rt.start(id).await?;
                info!("Started the stopped agent container.");
            }
            Action::Restart { id, .. } => {
                rt.restart(id, t).await?;
                warn!("Restarted the unhealthy agent container.");
            }
            Action::Defer { .. } | Action::Conflict { .. } => {}
        }
        Ok(())
    }
}
