//! `labvisor status`: one line per SUT, from the retained agent statuses and supervisor views,
//! then one line per supervisor.

use std::collections::BTreeMap;
use std::io::Write;

use labvisor_mqtt::Received;
use labvisor_protocol::payloads::{
    now_ms, AdminMode, AdminState, AgentStatus, SupervisorState, SupervisorStatus, SutView,
};
use labvisor_protocol::topics::{SutTopic, Topics};
use labvisor_protocol::SutName;
use serde::Serialize;

use super::show::{age, age_at, parse, table, wire_name, write_json_pretty};
use super::{BrokerArgs, ClientError, Session};

/// An online supervisor whose status is older than this many of its refresh periods is shown
/// as stale.
pub const STALE_AFTER_PERIODS: u64 = 3;

/// One SUT in `labvisor status`.
#[derive(Debug, Serialize)]
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
    /// What is wrong, if anything.
    pub detail: Option<String>,
    /// The SUT's admin state (offline, maintenance, with the reason), as its agent reports it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminState>,
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
        names
            .into_iter()
            .map(|n| row(n, self.agents.get(n), self.views.get(n)))
            .collect()
    }
}

fn row(sut: &SutName, a: Option<&AgentStatus>, v: Option<&SutView>) -> StatusRow {
    let mut detail: Vec<String> = Vec::new();
    detail.extend(a.and_then(|a| a.detail.clone()));
    detail.extend(
        a.and_then(|a| a.probe_failure.as_ref())
            .map(|p| format!("probe failing: {p}")),
    );
    if let Some(v) = v {
        detail.extend(v.health_reason.iter().cloned());
        if let Some(stop) = &v.stopped_by_person {
            detail.push(stopped_by_person(stop.at_ms));
        }
        detail.extend(v.config_problems.iter().cloned());
        detail.extend(v.pending_action.iter().map(|p| format!("pending: {p}")));
        detail.extend(v.last_error.iter().cloned());
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
        detail: (!detail.is_empty()).then(|| detail.join("; ")),
        admin: a.and_then(|a| a.admin.clone()),
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

/// `labvisor status`: one line per SUT from the retained agent and supervisor topics.
pub async fn status(args: &BrokerArgs, json: bool, out: &mut dyn Write) -> Result<(), ClientError> {
    let mut s = Session::connect(args, |t| {
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
    let rows = retained.rows();
    let sups = &retained.supervisors;
    if json {
        write_json_pretty(
            out,
            &serde_json::json!({ "suts": rows, "supervisors": sups }),
        )?;
        return Ok(());
    }
    if rows.is_empty() {
        writeln!(
            out,
            "No SUTs on {} (is a supervisor or agent running? is --topic-prefix right?)",
            args.broker
        )?;
    } else {
        print_rows(&rows, out)?;
    }
    for sup in sups {
        writeln!(out, "{}", supervisor_line(sup, now_ms()))?;
        for p in &sup.file_problems {
            writeln!(out, "  {p}")?;
        }
    }
    Ok(())
}

/// The SUT table and its summary line.
fn print_rows(rows: &[StatusRow], out: &mut dyn Write) -> std::io::Result<()> {
    let dash = || "-".to_owned();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.sut.clone(),
                r.health.clone(),
                r.state.clone(),
                r.admin_mode().to_owned(),
                r.job.clone().unwrap_or_else(dash),
                r.queue.to_string(),
                r.restarts.to_string(),
                r.heartbeat_age_ms
                    .map(|ms| age(now_ms() - ms))
                    .unwrap_or_else(dash),
                r.supervisor.clone().unwrap_or_else(dash),
                [r.admin_detail(), r.detail.clone()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join("; "),
            ]
        })
        .collect();
    let header = [
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
    table(out, &header, &cells)?;
    let count = |f: &dyn Fn(&StatusRow) -> bool| rows.iter().filter(|r| f(r)).count();
    writeln!(
        out,
        "{} SUTs: {} healthy, {} unhealthy, {} busy, {} offline, {} with problems",
        rows.len(),
        count(&|r| r.health == "healthy"),
        count(&|r| r.health == "unhealthy"),
        count(&|r| r.state == "busy"),
        count(&|r| r.admin_mode() != "online"),
        count(&|r| r.detail.is_some()),
    )
}

/// The line `labvisor status` prints for a supervisor's status, as of `now` (ms since the
/// epoch). Container counts the supervisor could not know (Docker unreachable) say `unknown`.
/// An `online` status older than [`STALE_AFTER_PERIODS`] of the supervisor's refresh period
/// (`refresh_ms`) says `STALE`: the supervisor or its link to the broker is gone (or this
/// machine's clock is far off the supervisor's).
pub fn supervisor_line(sup: &SupervisorStatus, now: u64) -> String {
    let count = |n: Option<u64>| n.map_or_else(|| "unknown".to_owned(), |n| n.to_string());
    let state = wire_name(&sup.state);
    let stale = sup.state == SupervisorState::Online
        && sup.refresh_ms > 0
        && now.saturating_sub(sup.time_ms) > STALE_AFTER_PERIODS * sup.refresh_ms;
    let state = if stale {
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
    use labvisor_protocol::payloads::{SutCounts, VERSION};
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
        let r = row(&sut, Some(&a), None);
        assert_eq!(r.admin.as_ref(), Some(&admin));
        assert_eq!(r.detail, None, "offline is not a problem");
        let mut out = Vec::new();
        print_rows(&[r], &mut out).unwrap();
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
        assert!(
            text.contains("1 SUTs: 0 healthy, 0 unhealthy, 0 busy, 1 offline, 0 with problems"),
            "{text}"
        );
        let json = serde_json::to_value(row(&sut, Some(&a), None)).unwrap();
        assert_eq!(json["admin"]["mode"], "maintenance");
        assert_eq!(json["admin"]["reason"], "reflash");
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
