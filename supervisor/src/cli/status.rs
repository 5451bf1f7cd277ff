//! `labvisor status`: a summary line, then one line per SUT (those with a problem first, each
//! group by name), from the retained agent statuses and supervisor views, then one line per
//! supervisor. `--problems` keeps only what has a problem. How SUTs are grouped and counted is
//! [`super::triage`].

use std::collections::BTreeMap;
use std::io::Write;

use labvisor_mqtt::Received;
use labvisor_protocol::payloads::{
    now_ms, AdminMode, AdminState, AgentStatus, SupervisorStatus, SutView,
};
use labvisor_protocol::topics::{SutTopic, Topics};
use labvisor_protocol::SutName;
use serde::Serialize;

use super::show::{age, age_at, parse, table, wire_name, write_json_pretty};
use super::triage::{self, Group, Problem, Summary};
use super::{BrokerArgs, ClientError, Session};

pub use super::triage::STALE_AFTER_PERIODS;

/// One SUT in `labvisor status`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusRow {
    /// The SUT.
    pub sut: String,
    /// Docker health from the supervisor's view (`none` without a view).
    pub health: String,
    /// The agent's state.
    pub state: String,
    /// The running job.
    pub job: Option<String>,
    /// Jobs waiting.
    pub queue: u64,
    /// Restarts: the supervisor's (container) plus the agent's (device process).
    pub restarts: u64,
    /// Age of the last heartbeat, ms.
    pub heartbeat_age_ms: Option<u64>,
    /// The supervisor that owns it.
    pub supervisor: Option<String>,
    /// The host its container runs or last ran on, when the runtime spans several (Swarm:
    /// [`SutView::node`]); absent on the local engine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// What is wrong, if anything.
    pub detail: Option<String>,
    /// The SUT's admin state (offline, maintenance, with the reason), as its agent reports it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminState>,
    /// Its problems ([`triage::problems`]); absent when none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<Problem>,
    /// The group it counts in on the summary line.
    #[serde(skip)]
    pub group: Group,
}

impl StatusRow {
    /// The admin mode's name (`online` when the agent reports none).
    fn admin_mode(&self) -> &'static str {
        self.admin.as_ref().map_or("online", |a| a.mode.as_str())
    }

    /// `offline: REASON (by WHO, 5m ago)` while not online.
    fn admin_detail(&self) -> Option<String> {
        let a = self
            .admin
            .as_ref()
            .filter(|a| a.mode != AdminMode::Online)?;
        let by =
            a.by.as_deref()
                .map(|b| format!("by {b}, "))
                .unwrap_or_default();
        Some(format!("{} ({by}{} ago)", a.summary()?, age(a.since_ms)))
    }
}

/// What the retained topics say: agent statuses and supervisor views by SUT, and the
/// supervisors' own statuses.
#[derive(Default)]
struct Retained {
    agents: BTreeMap<SutName, AgentStatus>,
    views: BTreeMap<SutName, SutView>,
    supervisors: Vec<SupervisorStatus>,
}

impl Retained {
    fn read(got: &[Received], topics: &Topics) -> Self {
        let mut r = Retained::default();
        for m in got {
            match topics.parse(&m.topic) {
                Some((sut, SutTopic::Agent)) => {
                    if let Some(a) = parse(m) {
                        r.agents.insert(sut, a);
                    }
                }
                Some((sut, SutTopic::Supervisor)) => {
                    if let Some(v) = parse(m) {
                        r.views.insert(sut, v);
                    }
                }
                _ => r.supervisors.extend(parse::<SupervisorStatus>(m)),
            }
        }
        r
    }

    /// One row per SUT that has an agent status or a supervisor view, by name.
    fn rows(&self) -> Vec<StatusRow> {
        let mut names: Vec<&SutName> = self.agents.keys().chain(self.views.keys()).collect();
        names.sort();
        names.dedup();
        // SUTs of a supervisor whose agents run without MQTT publish no agent status.
        let silent: Vec<&labvisor_protocol::topics::SupervisorId> = self
            .supervisors
            .iter()
            .filter(|s| s.agents_without_broker)
            .map(|s| &s.id)
            .collect();
        names
            .into_iter()
            .map(|n| {
                let v = self.views.get(n);
                let expect_agent = !v.is_some_and(|v| silent.contains(&&v.supervisor));
                row(n, self.agents.get(n), v, expect_agent)
            })
            .collect()
    }
}

/// A row's detail for a SUT in a crash loop (`SutView::crash_loop`): the healing gate keeps
/// restarting it, only further apart.
const CRASH_LOOP: &str =
    "restarting too often: the supervisor keeps restarting it with backoff, up to restart.backoff_max apart";

/// The row of `sut`; `expect_agent`: its agent publishes a status (false with `--agent-broker
/// none`), so none retained is a problem.
pub(crate) fn row(
    sut: &SutName,
    a: Option<&AgentStatus>,
    v: Option<&SutView>,
    expect_agent: bool,
) -> StatusRow {
    let mut problems = triage::problems(a, v);
    if !expect_agent {
        problems.retain(|p| *p != Problem::NoAgentStatus);
    }
    let mut detail: Vec<String> = Vec::new();
    detail.extend(a.and_then(|a| a.detail.clone()));
    detail.extend(
        a.and_then(|a| a.probe_failure.as_ref())
            .map(|p| format!("probe failing: {p}")),
    );
    if let Some(v) = v {
        detail.extend(v.down.iter().cloned());
        detail.extend(v.health_reason.iter().cloned());
        if let Some(stop) = &v.stopped_by_person {
            detail.push(stopped_by_person(stop.at_ms));
        }
        if v.crash_loop {
            detail.push(CRASH_LOOP.into());
        }
        detail.extend(v.config_problems.iter().cloned());
        detail.extend(v.pending_action.iter().map(|p| format!("pending: {p}")));
        detail.extend(v.last_error.iter().cloned());
    }
    if problems.contains(&Problem::NoAgentStatus) {
        detail.push("no agent status retained: its agent never reached the broker".into());
    }
    StatusRow {
        sut: sut.to_string(),
        health: v.map_or_else(|| "-".into(), |v| wire_name(&v.health)),
        state: a.map_or_else(|| "-".into(), |a| a.state.as_str().to_owned()),
        job: a.and_then(|a| a.job.as_ref().map(|j| j.to_string())),
        queue: a.map_or(0, |a| a.queue_len),
        restarts: v.map_or(0, |v| v.restarts)
            + a.and_then(|a| a.child.as_ref()).map_or(0, |c| c.restarts),
        heartbeat_age_ms: a.map(|a| now_ms().saturating_sub(a.time_ms)),
        supervisor: v.map(|v| v.supervisor.to_string()),
        node: v.and_then(|v| v.node.clone()),
        detail: (!detail.is_empty()).then(|| detail.join("; ")),
        admin: a.and_then(|a| a.admin.clone()),
        group: triage::group(&problems, a, v),
        problems,
    }
}

/// The detail of a SUT whose container a person stopped: `stopped by a person at <UTC time>
/// (5m ago)`, without the time when Docker did not say when.
fn stopped_by_person(at_ms: Option<u64>) -> String {
    let when = at_ms.map(|at| {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(at);
        format!(
            " at {} ({} ago)",
            humantime::format_rfc3339_seconds(t),
            age(at)
        )
    });
    format!(
        "stopped by a person{}; docker start it, or change its file, to run it again",
        when.unwrap_or_default()
    )
}

/// What `labvisor status` prints.
#[derive(Debug, Clone, Copy, Default)]
pub struct Show {
    /// JSON instead of the table.
    pub json: bool,
    /// Only the summary and what has a problem (SUTs and supervisors).
    pub problems_only: bool,
}

/// `labvisor status`: the summary line, one line per SUT from the retained agent and
/// supervisor topics (problems first), then one line per supervisor. Returns the exit status:
/// with `--problems`, 1 when a SUT or supervisor has a problem, else 0.
pub async fn status(args: &BrokerArgs, show: Show, out: &mut dyn Write) -> Result<u8, ClientError> {
    let mut s = Session::snapshot(args, |t| {
        vec![
            t.agents_filter(),
            t.sut_views_filter(),
            t.supervisor_status_filter(),
        ]
    })
    .await?;
    let got = s.settle().await;
    let topics = s.topics.clone();
    s.close().await;
    let retained = Retained::read(&got, &topics);
    let now = now_ms();
    let mut rows = retained.rows();
    let mut sups: Vec<(&SupervisorStatus, Option<&str>)> = retained
        .supervisors
        .iter()
        .map(|s| (s, triage::supervisor_problem(s, now)))
        .collect();
    let summary = Summary::of(
        rows.iter().map(|r| (r.group, r.problems.as_slice())),
        &sups.iter().map(|(_, p)| *p).collect::<Vec<_>>(),
    );
    if show.problems_only {
        rows.retain(|r| r.group == Group::Problem);
        sups.retain(|(_, p)| p.is_some());
    }
    let code = u8::from(show.problems_only && summary.any_problem());
    if show.json {
        let sups: Vec<_> = sups.iter().map(|(s, _)| s).collect();
        write_json_pretty(
            out,
            &serde_json::json!({ "summary": summary, "suts": rows, "supervisors": sups }),
        )?;
        return Ok(code);
    }
    if summary.suts == 0 {
        writeln!(
            out,
            "No SUTs on {} (is a supervisor or agent running? is --topic-prefix right?)",
            args.broker
        )?;
    } else {
        writeln!(out, "{}", summary.line())?;
        problems_first(&mut rows);
        if !rows.is_empty() {
            print_rows(&rows, now, out)?;
        }
    }
    for (sup, _) in sups {
        writeln!(out, "{}", supervisor_line(sup, now))?;
        for p in &sup.file_problems {
            writeln!(out, "  {p}")?;
        }
    }
    Ok(code)
}

/// SUTs with a problem first, then the others; by name within each.
fn problems_first(rows: &mut [StatusRow]) {
    rows.sort_by(|a, b| {
        (a.group != Group::Problem, &a.sut).cmp(&(b.group != Group::Problem, &b.sut))
    });
}

/// The SUT table, as of `now`. A NODE column (before SUPERVISOR) only when a row has a node
/// (a runtime that spans several hosts): the local engine's table stays as it was.
fn print_rows(rows: &[StatusRow], now: u64, out: &mut dyn Write) -> std::io::Result<()> {
    let dash = || "-".to_owned();
    let nodes = rows.iter().any(|r| r.node.is_some());
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut cells = vec![
                r.sut.clone(),
                r.health.clone(),
                r.state.clone(),
                r.admin_mode().to_owned(),
                r.job.clone().unwrap_or_else(dash),
                r.queue.to_string(),
                r.restarts.to_string(),
                r.heartbeat_age_ms
                    .map(|ms| age_at(now.saturating_sub(ms), now))
                    .unwrap_or_else(dash),
                r.supervisor.clone().unwrap_or_else(dash),
                [r.admin_detail(), r.detail.clone()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join("; "),
            ];
            if nodes {
                cells.insert(NODE_COLUMN, r.node.clone().unwrap_or_else(dash));
            }
            cells
        })
        .collect();
    let mut header = vec![
        "SUT",
        "HEALTH",
        "STATE",
        "ADMIN",
        "JOB",
        "QUEUE",
        "RESTARTS",
        "HEARTBEAT",
        "SUPERVISOR",
        "DETAIL",
    ];
    if nodes {
        header.insert(NODE_COLUMN, "NODE");
    }
    table(out, &header, &cells)
}

/// Where the NODE column goes: before SUPERVISOR.
const NODE_COLUMN: usize = 8;

/// The line `labvisor status` prints for a supervisor's status, as of `now` (ms since the
/// epoch). Container counts the supervisor could not know (Docker unreachable) say `unknown`.
/// An `online` status older than [`STALE_AFTER_PERIODS`] of the supervisor's refresh period
/// (`refresh_ms`) says `STALE`: the supervisor or its link to the broker is gone (or this
/// machine's clock is far off the supervisor's).
pub fn supervisor_line(sup: &SupervisorStatus, now: u64) -> String {
    let count = |n: Option<u64>| n.map_or_else(|| "unknown".to_owned(), |n| n.to_string());
    let state = wire_name(&sup.state);
    let state = if triage::is_stale(sup, now) {
        format!(
            "STALE (last said {state}; its status comes every {})",
            age_at(0, sup.refresh_ms)
        )
    } else {
        state
    };
    let broker = match &sup.managed_broker {
        Some(b) => format!(
            ", managed broker {} ({} restarts)",
            if b.up { "up" } else { "DOWN" },
            b.restarts
        ),
        None => String::new(),
    };
    format!(
        "supervisor {}: {}, docker {}{broker}, {} SUTs desired, running {}, healthy {}, {} invalid files, seen {} ago",
        sup.id,
        state,
        if sup.docker_reachable {
            "reachable"
        } else {
            "UNREACHABLE"
        },
        sup.suts.desired,
        count(sup.suts.running),
        count(sup.suts.healthy),
        sup.suts.invalid,
        age_at(sup.time_ms, now),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use labvisor_protocol::payloads::{SupervisorState, SutCounts, VERSION};
    use labvisor_protocol::topics::SupervisorId;

    fn status(docker_reachable: bool, suts: SutCounts) -> SupervisorStatus {
        SupervisorStatus {
            v: VERSION,
            id: SupervisorId::new("lab").unwrap(),
            state: SupervisorState::Online,
            boot_id: "b".into(),
            version: "0.1.0".into(),
            docker_reachable,
            suts,
            time_ms: 1_000_000,
            managed_broker: None,
            file_problems: Vec::new(),
            refresh_ms: 30_000,
            agents_without_broker: false,
        }
    }

    #[test]
    fn an_offline_sut_shows_its_mode_and_reason() {
        let sut = SutName::new("rpi4-01").unwrap();
        let admin = AdminState {
            mode: AdminMode::Maintenance,
            reason: Some("reflash".into()),
            since_ms: now_ms() - 120_000,
            by: Some("al".into()),
        };
        let a = AgentStatus::new(sut.clone(), "b", "1", now_ms())
            .with_state(labvisor_protocol::payloads::AgentState::Idle)
            .with_admin(Some(admin.clone()));
        let r = row(&sut, Some(&a), None, true);
        assert_eq!(r.admin.as_ref(), Some(&admin));
        assert_eq!(r.detail, None, "offline is not a problem");
        assert_eq!((r.group, r.problems.as_slice()), (Group::Offline, &[][..]));
        let summary = Summary::of([(r.group, r.problems.as_slice())], &[]);
        let mut out = Vec::new();
        print_rows(&[r], now_ms(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let line = text.lines().nth(1).unwrap();
        assert!(
            line.contains(" idle ") && line.contains(" maintenance "),
            "{text}"
        );
        assert!(
            line.ends_with("maintenance: reflash (by al, 2m ago)"),
            "{text}"
        );
        assert_eq!(
            summary.line(),
            "1 SUTs: 0 healthy, 0 busy, 1 offline, 0 problems"
        );
        let json = serde_json::to_value(row(&sut, Some(&a), None, true)).unwrap();
        assert_eq!(json["admin"]["mode"], "maintenance");
        assert_eq!(json["admin"]["reason"], "reflash");
    }

    /// With `--agent-broker none` no agent publishes a status: a SUT without one is no problem
    /// for its supervisor (every SUT was listed as a problem, and `--problems` exited 1).
    #[test]
    fn no_agent_status_is_a_problem_only_where_agents_publish() {
        let name = SutName::new("bare-1").unwrap();
        let view: SutView = serde_json::from_value(serde_json::json!({
            "sut": "bare-1", "supervisor": "lab", "health": "healthy", "restarts": 0,
            "time_ms": now_ms(),
        }))
        .unwrap();
        let mut r = Retained::default();
        r.views.insert(name.clone(), view);
        r.supervisors.push(status(true, SutCounts::default()));
        assert_eq!(r.rows()[0].problems, [Problem::NoAgentStatus]);
        r.supervisors[0].agents_without_broker = true;
        let rows = r.rows();
        assert_eq!(rows[0].problems, []);
        assert_eq!(rows[0].group, Group::Healthy);
    }

    #[test]
    fn a_crash_loop_says_the_restarts_go_on_with_backoff() {
        let sut = SutName::new("s").unwrap();
        let v: SutView = serde_json::from_value(serde_json::json!({
            "sut": "s", "supervisor": "lab", "container_id": "c",
            "health": "unhealthy", "restarts": 9, "time_ms": 1, "crash_loop": true,
        }))
        .unwrap();
        let detail = row(&sut, None, Some(&v), true).detail.unwrap();
        assert!(
            detail.contains("keeps restarting it with backoff, up to restart.backoff_max apart"),
            "{detail}"
        );
        assert!(!detail.contains("stopped restarting"), "{detail}");
    }

    #[test]
    fn problem_rows_come_first_then_the_rest_each_by_name() {
        let name = |s: &str| SutName::new(s).unwrap();
        let idle = |s: &str| {
            AgentStatus::new(name(s), "b", "1", now_ms())
                .with_state(labvisor_protocol::payloads::AgentState::Idle)
        };
        let view = |s: &str, health| -> SutView {
            serde_json::from_value(serde_json::json!({
                "sut": s, "supervisor": "lab", "health": health, "restarts": 0, "time_ms": now_ms(),
            }))
            .unwrap()
        };
        use labvisor_protocol::payloads::Health;
        let mut r = Retained::default();
        for s in ["b-ok", "a-ok", "c-bad"] {
            r.agents.insert(name(s), idle(s));
        }
        r.views
            .insert(name("c-bad"), view("c-bad", Health::Unhealthy));
        r.views.insert(name("z-bad"), view("z-bad", Health::None));
        r.views.insert(name("a-ok"), view("a-ok", Health::Healthy));
        let mut rows = r.rows();
        let names = |rows: &[StatusRow]| rows.iter().map(|r| r.sut.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(&rows),
            ["a-ok", "b-ok", "c-bad", "z-bad"],
            "JSON: by name"
        );
        problems_first(&mut rows);
        assert_eq!(names(&rows), ["c-bad", "z-bad", "a-ok", "b-ok"]);
        assert_eq!(rows[1].problems, [Problem::NoAgentStatus]);
        assert_eq!(
            rows[1].detail.as_deref(),
            Some("no agent status retained: its agent never reached the broker")
        );
        let json = serde_json::to_value(&rows[0]).unwrap();
        assert_eq!(json["problems"], serde_json::json!(["unhealthy"]));
        assert!(serde_json::to_value(&rows[2])
            .unwrap()
            .get("problems")
            .is_none());
    }

    /// The local engine's table has no NODE column (the table is exactly as before); as soon as
    /// a SUT has a node (Swarm), the column is there, `-` for a SUT without one.
    #[test]
    fn the_node_column_shows_only_when_a_sut_has_a_node() {
        let name = |s: &str| SutName::new(s).unwrap();
        let view = |s: &str, node: Option<&str>| -> SutView {
            let mut v: SutView = serde_json::from_value(serde_json::json!({
                "sut": s, "supervisor": "lab", "health": "healthy", "restarts": 0,
                "time_ms": now_ms(),
            }))
            .unwrap();
            v.node = node.map(str::to_owned);
            v
        };
        let idle = |s: &str| {
            AgentStatus::new(name(s), "b", "1", now_ms())
                .with_state(labvisor_protocol::payloads::AgentState::Idle)
        };
        let table = |r: &Retained| {
            let mut out = Vec::new();
            print_rows(&r.rows(), now_ms(), &mut out).unwrap();
            String::from_utf8(out).unwrap()
        };
        let mut r = Retained::default();
        for s in ["a", "b"] {
            r.agents.insert(name(s), idle(s));
            r.views.insert(name(s), view(s, None));
        }
        let local = table(&r);
        assert_eq!(
            local.lines().next().unwrap(),
            "SUT  HEALTH   STATE  ADMIN   JOB  QUEUE  RESTARTS  HEARTBEAT  SUPERVISOR  DETAIL"
        );
        assert!(!local.contains("NODE"), "{local}");
        assert!(serde_json::to_value(&r.rows()[0])
            .unwrap()
            .get("node")
            .is_none());
        r.views
            .insert(name("b"), view("b", Some("rack3-agent-host")));
        let swarm = table(&r);
        let lines: Vec<&str> = swarm.lines().collect();
        assert_eq!(
            lines[0],
            "SUT  HEALTH   STATE  ADMIN   JOB  QUEUE  RESTARTS  HEARTBEAT  NODE              SUPERVISOR  DETAIL"
        );
        assert!(lines[1].contains(" -                 lab"), "{swarm}");
        assert!(lines[2].contains(" rack3-agent-host  lab"), "{swarm}");
        assert_eq!(
            serde_json::to_value(&r.rows()[1]).unwrap()["node"],
            "rack3-agent-host"
        );
    }

    /// A SUT the runtime says is down (Swarm: its node is lost) is a problem, first in the
    /// table with the reason, counted on the summary line, and makes `--problems` exit 1.
    #[test]
    fn a_down_sut_is_a_problem_with_its_reason() {
        let name = |s: &str| SutName::new(s).unwrap();
        let mut r = Retained::default();
        for s in ["a-ok", "z-down"] {
            let mut v: SutView = serde_json::from_value(serde_json::json!({
                "sut": s, "supervisor": "lab", "health": "healthy", "restarts": 0,
                "time_ms": now_ms(),
            }))
            .unwrap();
            v.node = Some(format!("node-{s}"));
            r.views.insert(name(s), v);
            r.agents.insert(
                name(s),
                AgentStatus::new(name(s), "b", "1", now_ms())
                    .with_state(labvisor_protocol::payloads::AgentState::Idle),
            );
        }
        let down = r.views.get_mut(&name("z-down")).unwrap();
        down.health = labvisor_protocol::payloads::Health::None;
        down.down = Some("node node-z-down is down".into());
        let mut rows = r.rows();
        problems_first(&mut rows);
        assert_eq!(rows[0].sut, "z-down");
        assert_eq!(rows[0].problems, [Problem::Down]);
        assert_eq!(rows[0].group, Group::Problem);
        assert_eq!(rows[0].detail.as_deref(), Some("node node-z-down is down"));
        assert_eq!(rows[1].problems, []);
        let summary = Summary::of(rows.iter().map(|r| (r.group, r.problems.as_slice())), &[]);
        assert_eq!(
            summary.line(),
            "2 SUTs: 1 healthy, 0 busy, 0 offline, 1 problems (1 down)"
        );
        assert!(summary.any_problem(), "--problems exits 1");
        let mut out = Vec::new();
        print_rows(&rows, now_ms(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let first = text.lines().nth(1).unwrap();
        assert!(first.starts_with("z-down  none "), "{text}");
        assert!(
            first.ends_with("node-z-down  lab         node node-z-down is down"),
            "{text}"
        );
        let json = serde_json::to_value(&rows[0]).unwrap();
        assert_eq!(json["problems"], serde_json::json!(["down"]));
    }

    #[test]
    fn an_online_status_older_than_three_periods_is_stale() {
        let mut s = status(true, SutCounts::default());
        let line = |s: &SupervisorStatus, after_ms: u64| supervisor_line(s, s.time_ms + after_ms);
        assert!(line(&s, 90_000).starts_with("supervisor lab: online, docker"));
        assert!(line(&s, 90_001).starts_with(
            "supervisor lab: STALE (last said online; its status comes every 30s), docker"
        ));
        assert!(line(&s, 180_000).ends_with("seen 3m ago"));
        // Offline and lost are final: never stale. An older supervisor (no refresh_ms) is
        // not judged.
        s.state = SupervisorState::Offline;
        assert!(line(&s, 3_600_000).starts_with("supervisor lab: offline, docker"));
        s.state = SupervisorState::Online;
        s.refresh_ms = 0;
        assert!(line(&s, 3_600_000).starts_with("supervisor lab: online, docker"));
    }

    #[test]
    fn supervisor_line_says_unknown_while_docker_is_unreachable() {
        let up = status(
            true,
            SutCounts {
                desired: 3,
                running: Some(3),
                healthy: Some(2),
                unhealthy: Some(1),
                invalid: 1,
            },
        );
        assert_eq!(
            supervisor_line(&up, 1_005_000),
            "supervisor lab: online, docker reachable, 3 SUTs desired, running 3, healthy 2, 1 invalid files, seen 5s ago"
        );
        let down = status(
            false,
            SutCounts {
                desired: 3,
                invalid: 1,
                ..Default::default()
            },
        );
        assert_eq!(
            supervisor_line(&down, 1_005_000),
            "supervisor lab: online, docker UNREACHABLE, 3 SUTs desired, running unknown, healthy unknown, 1 invalid files, seen 5s ago"
        );
        let managed = SupervisorStatus {
            managed_broker: Some(labvisor_protocol::payloads::ManagedBrokerStatus {
                up: false,
                restarts: 2,
                last_exit: None,
            }),
            ..up
        };
        assert_eq!(
            supervisor_line(&managed, 1_005_000),
            "supervisor lab: online, docker reachable, managed broker DOWN (2 restarts), 3 SUTs desired, running 3, healthy 2, 1 invalid files, seen 5s ago"
        );
    }
}
