//! `labvisor supervise`'s Prometheus metrics, `/metrics` and `/healthz`, and the
//! `labvisor healthz` probe.
//!
//! # Theory of operation
//!
//! [`Metrics`] holds its own [`Registry`] (no global recorder, so tests build as many as they
//! like) and is owned by the reconcile loop, which feeds it through a few hooks: an action
//! finished or failed, an agent status or a last job arrived, a pass ended. The HTTP server
//! only reads it, through the [`Shared`] half (the registry and what `/healthz` needs).
//!
//! Per-SUT series exist while the supervisor knows the SUT (its file, or a container of its
//! own); they are removed when the SUT is forgotten, so a deleted file leaves no stale series.
//! Gauges copied from an agent's retained status keep its last value until the next one.
//!
//! **Jobs** are counted from the retained `<sut>/last_job` topic, once per job id (the
//! supervisor remembers the last few ids of each SUT). The first retained message of a SUT after
//! the supervisor starts is the *baseline*: a job that ended before this process watched it is
//! not counted. Later retained copies (after a broker reconnect) are counted when their id is
//! new, so a job that ended while the link was down still counts.
//!
//! # Metrics
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `labvisor_sut_health` | gauge | `sut`, `health` | 1 for the SUT's current Docker health (`starting`, `healthy`, `unhealthy`, `none`), 0 for the others |
//! | `labvisor_sut_up` | gauge | `sut` | 1 while the SUT's agent container runs |
//! | `labvisor_restarts_total` | counter | `sut` | healing restarts of an unhealthy agent by the supervisor |
//! | `labvisor_child_restarts` | gauge | `sut` | restarts of the device process by the agent, from its status (resets with the agent) |
//! | `labvisor_jobs_total` | counter | `sut`, `outcome` | finished jobs: `passed`, `failed`, `cancelled`, `timeout`, `lost` (each job id once) |
//! | `labvisor_queue_length` | gauge | `sut` | jobs waiting in the agent's queue |
//! | `labvisor_output_dropped` | gauge | `sut` | lines of output the agent lost on the way to `<sut>/output` since it started |
//! | `labvisor_reconcile_actions_total` | counter | `action` | container actions done: `create`, `recreate`, `remove`, `start`, `restart`; `defer` each time a change starts waiting for a busy agent |
//! | `labvisor_reconcile_errors_total` | counter | `sut` | failed container actions (each is retried with backoff) |
//! | `labvisor_docker_reachable` | gauge | | 1 when the last pass could list the containers |
//! | `labvisor_suts` | gauge | `state` | SUTs by `desired` (valid files), `running` (containers running; no series while Docker is unreachable), `invalid` (files) |
//! | `labvisor_last_pass_timestamp_seconds` | gauge | | Unix time of the last reconcile pass |
//! | `labvisor_broker_up` | gauge | | managed broker only: 1 while mosquitto runs and listens, 0 while it is down (being restarted) |
//! | `labvisor_broker_restarts_total` | counter | | managed broker only: restarts of mosquitto after it died |
//!
//! `/metrics` answers in the OpenMetrics text format. `/healthz` answers `200 ok` when a pass
//! ran within twice the resync period and Docker was reachable then, and the managed broker (if
//! any) is up, else `503` and the reason on one line.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use labvisor_protocol::payloads::{
    AgentStatus, Health, JobState, JobStatus, ManagedBrokerStatus, SutCounts,
};
use labvisor_protocol::topics::JobId;
use labvisor_protocol::SutName;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::plan::Action;

/// The default `--metrics-listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";
/// The default `labvisor healthz --url`.
pub const DEFAULT_HEALTHZ_URL: &str = "http://127.0.0.1:9464/healthz";
/// The content type of `/metrics`.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Where `labvisor supervise` serves `/metrics` and `/healthz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    /// The address.
    pub addr: std::net::SocketAddr,
    /// Whether failing to bind it is fatal (it was asked for), or only a warning (the default
    /// address, which may be taken on a developer's machine).
    pub required: bool,
}

/// Job ids remembered per SUT to count each job once.
const SEEN_JOBS: usize = 64;

const HEALTHS: [(Health, &str); 4] = [
    (Health::Starting, "starting"),
    (Health::Healthy, "healthy"),
    (Health::Unhealthy, "unhealthy"),
    (Health::None, "none"),
];
const OUTCOMES: [&str; 5] = ["passed", "failed", "cancelled", "timeout", "lost"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SutLabel {
    sut: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HealthLabels {
    sut: String,
    health: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    sut: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabel {
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

/// What the server reads: the registry and the loop's liveness.
#[derive(Debug)]
pub struct Shared {
    registry: Registry,
    /// When the last pass ended, ms since `started`; `u64::MAX`: none yet.
    last_pass_ms: AtomicU64,
    docker_reachable: AtomicBool,
    /// The managed broker is down (being restarted).
    broker_down: AtomicBool,
    started: Instant,
    /// A pass older than this makes `/healthz` fail.
    stale_after: Duration,
}

impl Shared {
    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// `Ok(())` when the loop is live and Docker reachable, else why not (one line).
    pub fn health(&self) -> Result<(), String> {
        let last = self.last_pass_ms.load(Ordering::Relaxed);
        if last == u64::MAX {
            return Err("no reconcile pass yet".to_owned());
        }
        let age = self
            .started
            .elapsed()
            .saturating_sub(Duration::from_millis(last));
        if age > self.stale_after {
            return Err(format!(
                "the last reconcile pass was {}s ago (limit {}s)",
                age.as_secs(),
                self.stale_after.as_secs()
            ));
        }
        if !self.docker_reachable.load(Ordering::Relaxed) {
            return Err("docker is unreachable".to_owned());
        }
        if self.broker_down.load(Ordering::Relaxed) {
            return Err("the managed broker is down (being restarted)".to_owned());
        }
        Ok(())
    }
}

/// Job ids already counted for one SUT.
#[derive(Debug, Default)]
struct SeenJobs {
    /// The first retained `last_job` was seen (see the module docs).
    baseline: bool,
    ids: VecDeque<JobId>,
}

/// The supervisor's metrics; see the module docs for the list.
#[derive(Debug)]
pub struct Metrics {
    shared: Arc<Shared>,
    sut_health: Family<HealthLabels, Gauge>,
    sut_up: Family<SutLabel, Gauge>,
    restarts: Family<SutLabel, Counter>,
    child_restarts: Family<SutLabel, Gauge>,
    jobs: Family<JobLabels, Counter>,
    queue_length: Family<SutLabel, Gauge>,
    output_dropped: Family<SutLabel, Gauge>,
    actions: Family<ActionLabel, Counter>,
    errors: Family<SutLabel, Counter>,
    docker_reachable: Gauge,
    suts: Family<StateLabel, Gauge>,
    last_pass: Gauge,
    /// SUTs with per-SUT series.
    known: BTreeSet<SutName>,
    /// The last status of each agent (also of SUTs not known yet).
    agents: BTreeMap<SutName, AgentStatus>,
    seen_jobs: BTreeMap<SutName, SeenJobs>,
    broker_up: Gauge,
    broker_restarts: Counter,
}

impl Metrics {
    /// Empty metrics; `/healthz` fails when no pass ended within `2 × resync`.
    pub fn new(resync: Duration) -> Self {
        let mut registry = Registry::default();
        let sut_health = Family::<HealthLabels, Gauge>::default();
        let sut_up = Family::<SutLabel, Gauge>::default();
        let restarts = Family::<SutLabel, Counter>::default();
        let child_restarts = Family::<SutLabel, Gauge>::default();
        let jobs = Family::<JobLabels, Counter>::default();
        let queue_length = Family::<SutLabel, Gauge>::default();
        let output_dropped = Family::<SutLabel, Gauge>::default();
        let actions = Family::<ActionLabel, Counter>::default();
        let errors = Family::<SutLabel, Counter>::default();
        let docker_reachable = Gauge::default();
        let suts = Family::<StateLabel, Gauge>::default();
        let last_pass = Gauge::default();
        registry.register(
            "labvisor_sut_health",
            "1 for the SUT's current Docker health, 0 for the others",
            sut_health.clone(),
        );
        registry.register(
            "labvisor_sut_up",
            "1 while the SUT's agent container runs",
            sut_up.clone(),
        );
        // Counters get their `_total` suffix from the encoder.
        registry.register(
            "labvisor_restarts",
            "Healing restarts of an unhealthy agent by the supervisor",
            restarts.clone(),
        );
        registry.register(
            "labvisor_child_restarts",
            "Restarts of the device process by the agent, from its status",
            child_restarts.clone(),
        );
        registry.register(
            "labvisor_jobs",
            "Finished jobs by outcome, each job id once",
            jobs.clone(),
        );
        registry.register(
            "labvisor_queue_length",
            "Jobs waiting in the agent's queue",
            queue_length.clone(),
        );
        registry.register(
            "labvisor_output_dropped",
            "Lines of output the agent lost on the way to <sut>/output since it started",
            output_dropped.clone(),
        );
        registry.register(
            "labvisor_reconcile_actions",
            "Container actions done by the reconcile loop",
            actions.clone(),
        );
        registry.register(
            "labvisor_reconcile_errors",
            "Failed container actions (retried with backoff)",
            errors.clone(),
        );
        registry.register(
            "labvisor_docker_reachable",
            "1 when the last pass could list the containers",
            docker_reachable.clone(),
        );
        registry.register(
            "labvisor_suts",
            "SUTs by state: desired (valid files), running (containers), invalid (files)",
            suts.clone(),
        );
        registry.register(
            "labvisor_last_pass_timestamp_seconds",
            "Unix time of the last reconcile pass",
            last_pass.clone(),
        );
        Metrics {
            shared: Arc::new(Shared {
                registry,
                last_pass_ms: AtomicU64::new(u64::MAX),
                docker_reachable: AtomicBool::new(false),
                broker_down: AtomicBool::new(false),
                started: Instant::now(),
                stale_after: resync.saturating_mul(2),
            }),
            sut_health,
            sut_up,
            restarts,
            child_restarts,
            jobs,
            queue_length,
            output_dropped,
            actions,
            errors,
            docker_reachable,
            suts,
            last_pass,
            known: BTreeSet::new(),
            agents: BTreeMap::new(),
            seen_jobs: BTreeMap::new(),
            broker_up: Gauge::default(),
            broker_restarts: Counter::default(),
        }
    }

    /// Adds the managed broker's series (`labvisor_broker_up`, `labvisor_broker_restarts_total`),
    /// fed by [`Metrics::on_broker`]. Call it before [`Metrics::shared`].
    pub fn with_managed_broker(mut self) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.registry.register(
                "labvisor_broker_up",
                "1 while the managed broker runs and listens, 0 while it is down",
                self.broker_up.clone(),
            );
            shared.registry.register(
                "labvisor_broker_restarts",
                "Restarts of the managed broker after it died",
                self.broker_restarts.clone(),
            );
        }
        self
    }

    /// The managed broker's state changed.
    pub fn on_broker(&self, b: &ManagedBrokerStatus) {
        self.shared.broker_down.store(!b.up, Ordering::Relaxed);
        self.broker_up.set(b.up.into());
        let counted = self.broker_restarts.get();
        if b.restarts > counted {
            self.broker_restarts.inc_by(b.restarts - counted);
        }
    }

    /// The half the HTTP server reads.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        self.shared.encode()
    }

    /// An action finished well (`Defer`: a change starts waiting for a busy agent).
    pub fn on_action(&self, action: &Action) {
        if matches!(action, Action::Conflict { .. }) {
            return;
        }
        self.actions
            .get_or_create(&ActionLabel {
                action: action.kind(),
            })
            .inc();
        if let Action::Restart { sut, .. } = action {
            self.restarts.get_or_create(&sut_label(sut)).inc();
        }
    }

    /// An action on `sut` failed.
    pub fn on_error(&self, sut: &SutName) {
        self.errors.get_or_create(&sut_label(sut)).inc();
    }

    /// A reconcile pass ended.
    pub fn on_pass(&self, docker_reachable: bool) {
        let s = &self.shared;
        s.docker_reachable
            .store(docker_reachable, Ordering::Relaxed);
        s.last_pass_ms
            .store(s.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.docker_reachable.set(docker_reachable.into());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.last_pass.set(now.as_secs() as i64);
    }

    /// The SUT counts of a pass. An unknown count (Docker unreachable) removes its series
    /// rather than report a stale or zero value.
    pub fn observe_counts(&self, counts: &SutCounts) {
        for (state, n) in [
            ("desired", Some(counts.desired)),
            ("running", counts.running),
            ("invalid", Some(counts.invalid)),
        ] {
            match n {
                Some(n) => {
                    self.suts.get_or_create(&StateLabel { state }).set(n as i64);
                }
                None => {
                    self.suts.remove(&StateLabel { state });
                }
            }
        }
    }

    /// Every SUT the supervisor knows after a pass, with its container's health and whether it
    /// runs. Series of SUTs not listed are removed.
    pub fn observe_suts<'a>(
        &mut self,
        suts: impl IntoIterator<Item = (&'a SutName, Health, bool)>,
    ) {
        let mut known = BTreeSet::new();
        for (sut, health, up) in suts {
            let name = sut.to_string();
            for (h, label) in HEALTHS {
                self.sut_health
                    .get_or_create(&HealthLabels {
                        sut: name.clone(),
                        health: label,
                    })
                    .set((h == health).into());
            }
            self.sut_up.get_or_create(&sut_label(sut)).set(up.into());
            // Present from the start, so rate() sees the first increase.
            let _ = self.restarts.get_or_create(&sut_label(sut));
            let _ = self.errors.get_or_create(&sut_label(sut));
            known.insert(sut.clone());
        }
        for gone in self.known.difference(&known) {
            self.remove_sut(gone);
        }
        self.known = known;
        let statuses: Vec<AgentStatus> = self
            .known
            .iter()
            .filter_map(|s| self.agents.get(s).cloned())
            .collect();
        for status in &statuses {
            self.set_agent(status);
        }
        self.seen_jobs
            .retain(|sut, _| self.known.contains(sut) || self.agents.contains_key(sut));
    }

    /// A SUT's retained agent status; `None` when it was cleared or cannot be read.
    pub fn observe_agent(&mut self, sut: &SutName, status: Option<&AgentStatus>) {
        match status {
            Some(s) => {
                self.agents.insert(sut.clone(), s.clone());
                if self.known.contains(sut) {
                    self.set_agent(s);
                }
            }
            None => {
                self.agents.remove(sut);
                let l = sut_label(sut);
                self.queue_length.remove(&l);
                self.output_dropped.remove(&l);
                self.child_restarts.remove(&l);
            }
        }
    }

    /// A SUT's `last_job`; `retained` as delivered. Counts a finished job once per id.
    pub fn observe_job(&mut self, sut: &SutName, job: &JobStatus, retained: bool) {
        let Some(outcome) = outcome(job.state) else {
            return;
        };
        let seen = self.seen_jobs.entry(sut.clone()).or_default();
        let baseline = !seen.baseline;
        seen.baseline = true;
        if seen.ids.contains(&job.id) {
            return;
        }
        if seen.ids.len() >= SEEN_JOBS {
            seen.ids.pop_front();
        }
        seen.ids.push_back(job.id.clone());
        if retained && baseline {
            return;
        }
        self.jobs
            .get_or_create(&JobLabels {
                sut: sut.to_string(),
                outcome,
            })
            .inc();
    }

    fn set_agent(&self, s: &AgentStatus) {
        let l = sut_label(&s.sut);
        self.queue_length.get_or_create(&l).set(s.queue_len as i64);
        self.output_dropped
            .get_or_create(&l)
            .set(s.output_dropped as i64);
        match &s.child {
            Some(c) => {
                self.child_restarts.get_or_create(&l).set(c.restarts as i64);
            }
            None => {
                self.child_restarts.remove(&l);
            }
        }
    }

    fn remove_sut(&self, sut: &SutName) {
        let l = sut_label(sut);
        for (_, health) in HEALTHS {
            self.sut_health.remove(&HealthLabels {
                sut: l.sut.clone(),
                health,
            });
        }
        for outcome in OUTCOMES {
            self.jobs.remove(&JobLabels {
                sut: l.sut.clone(),
                outcome,
            });
        }
        for f in [
            &self.sut_up,
            &self.child_restarts,
            &self.queue_length,
            &self.output_dropped,
        ] {
            f.remove(&l);
        }
        self.restarts.remove(&l);
        self.errors.remove(&l);
    }
}

fn sut_label(sut: &SutName) -> SutLabel {
    SutLabel {
        sut: sut.to_string(),
    }
}

fn outcome(state: JobState) -> Option<&'static str> {
    Some(match state {
        JobState::Queued | JobState::Running => return None,
        JobState::Passed => "passed",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
        JobState::Timeout => "timeout",
        JobState::Lost => "lost",
    })
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz_handler))
        .with_state(shared);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics_handler(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], shared.encode())
}

async fn healthz_handler(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    match shared.health() {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

/// Why a `labvisor healthz` probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The URL is not `http://host[:port][/path]`.
    #[error("{0:?} is not an http://host[:port][/path] URL")]
    Url(String),
    /// No connection, or no complete answer.
    #[error("{url}: {error}")]
    Io {
        /// The URL.
        url: String,
        /// What failed.
        error: std::io::Error,
    },
    /// The server answered with another status than 200.
    #[error("{url}: {status}: {body}")]
    Status {
        /// The URL.
        url: String,
        /// The status line.
        status: String,
        /// The body's first line.
        body: String,
    },
}

/// `labvisor healthz`: an HTTP/1.0 GET of `url`; `Ok(body)` when the answer is 200.
pub fn probe(url: &str, timeout: Duration) -> Result<String, ProbeError> {
    let bad = || ProbeError::Url(url.to_owned());
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(bad());
    }
    let addr = if authority.rsplit_once(':').is_some_and(|(_, p)| {
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !authority.ends_with(']')
    }) {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let io = |error: std::io::Error| ProbeError::Io {
        url: url.to_owned(),
        error,
    };
    let addrs: Vec<_> = addr.to_socket_addrs().map_err(io)?.collect();
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    let mut stream = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let mut stream = stream.ok_or_else(|| io(last))?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {authority}\r\nUser-Agent: labvisor-healthz\r\n\r\n"
    )
    .map_err(io)?;
    let mut answer = Vec::new();
    stream
        .take(64 * 1024)
        .read_to_end(&mut answer)
        .map_err(io)?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.lines().next().unwrap_or_default().trim();
    let body = body.trim().to_owned();
    match status.split_whitespace().nth(1) {
        Some("200") if status.starts_with("HTTP/") => Ok(body),
        _ => Err(ProbeError::Status {
            url: url.to_owned(),
            status: if status.is_empty() {
                "no answer".to_owned()
            } else {
                status.to_owned()
            },
            body: body.lines().next().unwrap_or_default().to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use labvisor_protocol::payloads::{AgentState, ChildStatus};

    fn sut(s: &str) -> SutName {
        SutName::new(s).unwrap()
    }

    fn job(s: &str, id: &str, state: JobState) -> JobStatus {
        JobStatus {
            v: 1,
            sut: sut(s),
            id: JobId::new(id).unwrap(),
            state,
            exit_code: None,
            signal: None,
            queued_ms: 0,
            started_ms: None,
            ended_ms: None,
            duration_ms: None,
            output_bytes: 0,
            reason: None,
        }
    }

    fn agent(s: &str, queue_len: u64, dropped: u64, child_restarts: u64) -> AgentStatus {
        AgentStatus {
            v: 1,
            sut: sut(s),
            state: AgentState::Busy,
            time_ms: 0,
            time: String::new(),
            seq: 0,
            boot_id: "b".to_owned(),
            agent_version: "0".to_owned(),
            child: Some(ChildStatus {
                pid: None,
                alive: true,
                restarts: child_restarts,
                last_exit: None,
            }),
            job: None,
            queue_len,
            broker_connected: true,
            output_dropped: dropped,
            detail: None,
        }
    }

    /// The exposition's sample lines starting with `name`, sorted (a family's series come in
    /// hash order).
    fn samples(m: &Metrics, name: &str) -> Vec<String> {
        let mut v: Vec<String> = m
            .encode()
            .lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .map(str::to_owned)
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_job_is_counted_once_per_id() {
        let mut m = Metrics::new(Duration::from_secs(30));
        let a = sut("a");
        m.observe_suts([(&a, Health::Healthy, true)]);
        m.observe_job(&a, &job("a", "j1", JobState::Running), false);
        m.observe_job(&a, &job("a", "j1", JobState::Passed), false);
        m.observe_job(&a, &job("a", "j1", JobState::Passed), false);
        // The same job again after a reconnect, retained: still once.
        m.observe_job(&a, &job("a", "j1", JobState::Passed), true);
        m.observe_job(&a, &job("a", "j2", JobState::Timeout), false);
        assert_eq!(
            samples(&m, "labvisor_jobs_total"),
            [
                r#"labvisor_jobs_total{sut="a",outcome="passed"} 1"#,
                r#"labvisor_jobs_total{sut="a",outcome="timeout"} 1"#,
            ]
        );
    }

    #[test]
    fn the_first_retained_job_is_a_baseline_not_a_count() {
        let mut m = Metrics::new(Duration::from_secs(30));
        let a = sut("a");
        m.observe_job(&a, &job("a", "old", JobState::Failed), true);
        assert!(samples(&m, "labvisor_jobs_total").is_empty());
        // A new job ended while the link was down: its retained copy counts.
        m.observe_job(&a, &job("a", "new", JobState::Failed), true);
        assert_eq!(
            samples(&m, "labvisor_jobs_total"),
            [r#"labvisor_jobs_total{sut="a",outcome="failed"} 1"#]
        );
    }

    #[test]
    fn health_actions_and_errors() {
        let mut m = Metrics::new(Duration::from_secs(30));
        let a = sut("a");
        m.observe_suts([(&a, Health::Unhealthy, true)]);
        m.on_action(&Action::Create { sut: a.clone() });
        m.on_action(&Action::Restart {
            sut: a.clone(),
            id: "c1".to_owned(),
        });
        m.on_action(&Action::Restart {
            sut: a.clone(),
            id: "c1".to_owned(),
        });
        m.on_error(&a);
        m.on_pass(true);
        m.observe_counts(&SutCounts {
            desired: 1,
            running: Some(1),
            ..Default::default()
        });
        let text = m.encode();
        for line in [
            r#"labvisor_sut_health{sut="a",health="unhealthy"} 1"#,
            r#"labvisor_sut_health{sut="a",health="healthy"} 0"#,
            r#"labvisor_sut_up{sut="a"} 1"#,
            r#"labvisor_restarts_total{sut="a"} 2"#,
            r#"labvisor_reconcile_actions_total{action="create"} 1"#,
            r#"labvisor_reconcile_actions_total{action="restart"} 2"#,
            r#"labvisor_reconcile_errors_total{sut="a"} 1"#,
            "labvisor_docker_reachable 1",
            r#"labvisor_suts{state="desired"} 1"#,
            r#"labvisor_suts{state="invalid"} 0"#,
            "# TYPE labvisor_restarts counter",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
        assert_eq!(m.shared().health(), Ok(()));
    }

    /// While Docker is unreachable the running count is unknown: no `running` series, rather
    /// than a stale or zero value; it is back with the next count.
    #[test]
    fn an_unknown_running_count_has_no_series() {
        let m = Metrics::new(Duration::from_secs(30));
        let running = |m: &Metrics| {
            m.encode()
                .lines()
                .filter(|l| l.starts_with(r#"labvisor_suts{state="running"}"#))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        m.observe_counts(&SutCounts {
            desired: 2,
            running: Some(2),
            ..Default::default()
        });
        assert_eq!(running(&m), [r#"labvisor_suts{state="running"} 2"#]);
        m.observe_counts(&SutCounts {
            desired: 2,
            ..Default::default()
        });
        assert_eq!(running(&m), Vec::<String>::new());
        assert!(m.encode().contains(r#"labvisor_suts{state="desired"} 2"#));
        m.observe_counts(&SutCounts {
            desired: 2,
            running: Some(1),
            ..Default::default()
        });
        assert_eq!(running(&m), [r#"labvisor_suts{state="running"} 1"#]);
    }

    #[test]
    fn agent_gauges_follow_the_status_and_a_forgotten_sut_leaves_no_series() {
        let mut m = Metrics::new(Duration::from_secs(30));
        let (a, b) = (sut("a"), sut("b"));
        // Before the SUT is known, the status is kept but not shown.
        m.observe_agent(&a, Some(&agent("a", 3, 7, 2)));
        assert!(samples(&m, "labvisor_queue_length").is_empty());
        m.observe_suts([(&a, Health::Healthy, true), (&b, Health::None, false)]);
        m.observe_job(&a, &job("a", "j", JobState::Lost), false);
        let text = m.encode();
        for line in [
            r#"labvisor_queue_length{sut="a"} 3"#,
            r#"labvisor_output_dropped{sut="a"} 7"#,
            r#"labvisor_child_restarts{sut="a"} 2"#,
            r#"labvisor_jobs_total{sut="a",outcome="lost"} 1"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
        m.observe_agent(&a, Some(&agent("a", 0, 9, 2)));
        assert_eq!(
            samples(&m, "labvisor_queue_length"),
            [r#"labvisor_queue_length{sut="a"} 0"#]
        );
        // a's file is deleted and its container gone.
        m.observe_suts([(&b, Health::None, false)]);
        let text = m.encode();
        assert!(!text.contains(r#"sut="a""#), "{text}");
        assert!(text.contains(r#"labvisor_sut_health{sut="b",health="none"} 1"#));
    }

    #[test]
    fn healthz_needs_a_recent_pass_and_docker() {
        let m = Metrics::new(Duration::from_secs(30));
        assert_eq!(m.shared().health(), Err("no reconcile pass yet".to_owned()));
        m.on_pass(false);
        assert_eq!(m.shared().health(), Err("docker is unreachable".to_owned()));
        let m = Metrics::new(Duration::ZERO);
        m.on_pass(true);
        std::thread::sleep(Duration::from_millis(2));
        assert!(m.shared().health().unwrap_err().contains("ago"));
    }

    #[test]
    fn a_managed_broker_down_fails_healthz_and_shows_in_metrics() {
        let plain = Metrics::new(Duration::from_secs(30));
        assert!(!plain.encode().contains("labvisor_broker"));
        let m = Metrics::new(Duration::from_secs(30)).with_managed_broker();
        m.on_pass(true);
        let b = |up, restarts| ManagedBrokerStatus {
            up,
            restarts,
            last_exit: None,
        };
        m.on_broker(&b(true, 0));
        assert_eq!(m.shared().health(), Ok(()));
        assert_eq!(samples(&m, "labvisor_broker_up"), ["labvisor_broker_up 1"]);
        m.on_broker(&b(false, 0));
        assert_eq!(
            m.shared().health(),
            Err("the managed broker is down (being restarted)".to_owned())
        );
        assert_eq!(samples(&m, "labvisor_broker_up"), ["labvisor_broker_up 0"]);
        m.on_broker(&b(true, 1));
        m.on_broker(&b(true, 1));
        assert_eq!(m.shared().health(), Ok(()));
        assert_eq!(
            samples(&m, "labvisor_broker_restarts_total"),
            ["labvisor_broker_restarts_total 1"]
        );
    }

    #[test]
    fn probe_refuses_bad_urls() {
        for u in ["https://x/healthz", "127.0.0.1:9464", "http:///healthz"] {
            assert!(
                matches!(probe(u, Duration::from_secs(1)), Err(ProbeError::Url(_))),
                "{u}"
            );
        }
    }

    #[tokio::test]
    async fn serves_metrics_and_healthz() {
        let m = Metrics::new(Duration::from_secs(30));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, m.shared(), async {
            let _ = rx.await;
        }));
        let get = |path: &'static str| {
            let url = format!("{url}{path}");
            tokio::task::spawn_blocking(move || probe(&url, Duration::from_secs(5)))
        };
        match get("/healthz").await.unwrap() {
            Err(ProbeError::Status { status, body, .. }) => {
                assert!(status.contains("503"), "{status}");
                assert_eq!(body, "no reconcile pass yet");
            }
            other => panic!("{other:?}"),
        }
        m.on_pass(true);
        assert_eq!(get("/healthz").await.unwrap().unwrap(), "ok");
        let text = get("/metrics").await.unwrap().unwrap();
        assert!(text.contains("labvisor_docker_reachable 1"), "{text}");
        assert!(matches!(
            get("/nothing").await.unwrap(),
            Err(ProbeError::Status { .. })
        ));
        tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
