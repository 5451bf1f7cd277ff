//! `labvisor supervise`'s Prometheus metrics, `/metrics` and `/healthz`, and the
//! `labvisor healthz` probe. The same listener serves the lab's web page ([`crate::web`]).
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
//! | `labvisor_sut_admin_state` | gauge | `sut`, `mode` | 1 for the SUT's admin mode (`online`, `offline`, `maintenance`, from its agent's status), 0 for the others |
//! | `labvisor_sut_admin_info` | gauge | `sut`, `mode`, `reason`, `by` | 1 while the SUT is offline or in maintenance: why, and who set it |
//!
//! `/metrics` answers in the OpenMetrics text format. `/healthz` answers `200 ok` when a pass
//! ran within twice the resync period and Docker was reachable then, and the managed broker (if
//! any) is up, else `503` and the reason on one line.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use labvisor_protocol::payloads::{
    AgentStatus, Health, JobState, JobStatus, ManagedBrokerStatus, SutCounts,
};
use labvisor_protocol::topics::JobId;
use labvisor_protocol::SutName;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Metric, Registry};

use crate::plan::Action;

mod admin;
mod health;
mod server;

pub use health::{Shared, Unhealthy};
pub use server::{serve, Listen, CONTENT_TYPE, DEFAULT_LISTEN};

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
    admin: admin::AdminMetrics,
}

impl Metrics {
    /// Empty metrics; `/healthz` fails when no pass ended within `2 × resync`.
    pub fn new(resync: Duration) -> Self {
        let mut r = Registry::default();
        // Counters get their `_total` suffix from the encoder.
        Metrics {
            admin: admin::AdminMetrics::register(&mut r),
            sut_health: register(
                &mut r,
                "labvisor_sut_health",
                "1 for the SUT's current Docker health, 0 for the others",
            ),
            sut_up: register(
                &mut r,
                "labvisor_sut_up",
                "1 while the SUT's agent container runs",
            ),
            restarts: register(
                &mut r,
                "labvisor_restarts",
                "Healing restarts of an unhealthy agent by the supervisor",
            ),
            child_restarts: register(
                &mut r,
                "labvisor_child_restarts",
                "Restarts of the device process by the agent, from its status",
            ),
            jobs: register(
                &mut r,
                "labvisor_jobs",
                "Finished jobs by outcome, each job id once",
            ),
            queue_length: register(
                &mut r,
                "labvisor_queue_length",
                "Jobs waiting in the agent's queue",
            ),
            output_dropped: register(
                &mut r,
                "labvisor_output_dropped",
                "Lines of output the agent lost on the way to <sut>/output since it started",
            ),
            actions: register(
                &mut r,
                "labvisor_reconcile_actions",
                "Container actions done by the reconcile loop",
            ),
            errors: register(
                &mut r,
                "labvisor_reconcile_errors",
                "Failed container actions (retried with backoff)",
            ),
            docker_reachable: register(
                &mut r,
                "labvisor_docker_reachable",
                "1 when the last pass could list the containers",
            ),
            suts: register(
                &mut r,
                "labvisor_suts",
                "SUTs by state: desired (valid files), running (containers), invalid (files)",
            ),
            last_pass: register(
                &mut r,
                "labvisor_last_pass_timestamp_seconds",
                "Unix time of the last reconcile pass",
            ),
            shared: Arc::new(Shared::new(r, resync.saturating_mul(2))),
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
            let r = shared.registry_mut();
            r.register(
                "labvisor_broker_up",
                "1 while the managed broker runs and listens, 0 while it is down",
                self.broker_up.clone(),
            );
            r.register(
                "labvisor_broker_restarts",
                "Restarts of the managed broker after it died",
                self.broker_restarts.clone(),
            );
        }
        self
    }

    /// The managed broker's state changed.
    pub fn on_broker(&self, b: &ManagedBrokerStatus) {
        self.shared.on_broker(b.up);
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
        self.shared.on_pass(docker_reachable);
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
                self.admin.remove(sut);
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
        self.admin.set(&s.sut, s.admin.as_ref());
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
        self.admin.remove(sut);
    }
}

/// A new metric of type `M`, registered as `name` with `help`.
fn register<M: Metric + Clone + Default>(r: &mut Registry, name: &str, help: &str) -> M {
    let m = M::default();
    r.register(name, help, m.clone());
    m
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::healthz::{get, ProbeError};
    use labvisor_protocol::payloads::{AdminMode, AdminState, AgentState, ChildStatus};

    fn sut(s: &str) -> SutName {
        SutName::new(s).unwrap()
    }

    fn job(s: &str, id: &str, state: JobState) -> JobStatus {
        JobStatus::accepted(sut(s), JobId::new(id).unwrap(), 0).with_state(state)
    }

    fn agent(s: &str, queue_len: u64, dropped: u64, child_restarts: u64) -> AgentStatus {
        AgentStatus::new(sut(s), "b", "0", 0)
            .with_state(AgentState::Busy)
            .with_child(Some(ChildStatus {
                pid: None,
                alive: true,
                restarts: child_restarts,
                last_exit: None,
            }))
            .with_jobs(None, queue_len)
            .with_broker_connected(true)
            .with_output_dropped(dropped)
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
        // Offline, then online: the mode gauge follows, the info series goes.
        let offline = AdminState {
            mode: AdminMode::Offline,
            reason: Some("flaky usb".into()),
            since_ms: 1,
            by: Some("al".into()),
        };
        m.observe_agent(
            &a,
            Some(&agent("a", 0, 9, 2).with_admin(Some(offline.clone()))),
        );
        let text = m.encode();
        for line in [
            r#"labvisor_sut_admin_state{sut="a",mode="offline"} 1"#,
            r#"labvisor_sut_admin_state{sut="a",mode="online"} 0"#,
            r#"labvisor_sut_admin_info{sut="a",mode="offline",reason="flaky usb",by="al"} 1"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
        let reason = AdminState {
            reason: Some("still flaky".into()),
            ..offline
        };
        m.observe_agent(&a, Some(&agent("a", 0, 9, 2).with_admin(Some(reason))));
        assert_eq!(samples(&m, "labvisor_sut_admin_info").len(), 1);
        m.observe_agent(&a, Some(&agent("a", 0, 9, 2)));
        assert!(samples(&m, "labvisor_sut_admin_info").is_empty());
        assert!(samples(&m, "labvisor_sut_admin_state")
            .contains(&r#"labvisor_sut_admin_state{sut="a",mode="online"} 1"#.to_owned()));
        // a's file is deleted and its container gone.
        m.observe_suts([(&b, Health::None, false)]);
        let text = m.encode();
        assert!(!text.contains(r#"sut="a""#), "{text}");
        assert!(text.contains(r#"labvisor_sut_health{sut="b",health="none"} 1"#));
    }

    #[test]
    fn healthz_needs_a_recent_pass_and_docker() {
        let m = Metrics::new(Duration::from_secs(30));
        assert_eq!(m.shared().health(), Err(Unhealthy::NoPass));
        m.on_pass(false);
        assert_eq!(m.shared().health(), Err(Unhealthy::DockerUnreachable));
        let m = Metrics::new(Duration::ZERO);
        m.on_pass(true);
        std::thread::sleep(Duration::from_millis(2));
        assert!(m.shared().health().unwrap_err().to_string().contains("ago"));
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
        assert_eq!(m.shared().health(), Err(Unhealthy::BrokerDown));
        assert_eq!(samples(&m, "labvisor_broker_up"), ["labvisor_broker_up 0"]);
        m.on_broker(&b(true, 1));
        m.on_broker(&b(true, 1));
        assert_eq!(m.shared().health(), Ok(()));
        assert_eq!(
            samples(&m, "labvisor_broker_restarts_total"),
            ["labvisor_broker_restarts_total 1"]
        );
    }

    #[tokio::test]
    async fn serves_metrics_and_healthz() {
        let m = Metrics::new(Duration::from_secs(30));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, m.shared(), None, async {
            let _ = rx.await;
        }));
        let get = |path: &'static str| {
            let url = format!("{url}{path}");
            async move { get(&url, Duration::from_secs(5)).await }
        };
        match get("/healthz").await {
            Err(ProbeError::Status { status, body, .. }) => {
                assert!(status.contains("503"), "{status}");
                assert_eq!(body, "no reconcile pass yet");
            }
            other => panic!("{other:?}"),
        }
        m.on_pass(true);
        assert_eq!(get("/healthz").await.unwrap(), "ok");
        let text = get("/metrics").await.unwrap();
        assert!(text.contains("labvisor_docker_reachable 1"), "{text}");
        assert!(matches!(
            get("/nothing").await,
            Err(ProbeError::Status { .. })
        ));
        tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
