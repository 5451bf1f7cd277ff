//! `labvisor restart SUT... | --all --when-idle`: a rolling restart, for upgrades.
//!
//! The command asks the supervisor that owns the SUTs (from their retained `<sut>/supervisor`
//! views; with `--all`, every online supervisor) over MQTT, on
//! `labvisor/supervisors/<id>/restart`, which the shipped ACLs let submitters and the local
//! tools write. The supervisor recreates the containers one at a time (a recreation picks up
//! a rebuilt image of the same tag), each only when its agent is idle, and the next once the
//! new container is healthy (see `plan::rolling`). The command follows the progress on
//! `labvisor/supervisors/<id>/restart_status` and exits 0 when every SUT is restarted, 1 when
//! the restart failed or was rejected (with the reason), 4 when a supervisor does not answer or
//! goes away, 5 for an unknown SUT, 2 without `--when-idle`: a restart that cuts running jobs
//! is not offered (`docker restart` does that).

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use labvisor_protocol::payloads::{
    random_id, RestartRequest, RestartState, RestartStatus, RestartStep, SupervisorState,
    SupervisorStatus, SutView, VERSION,
};
use labvisor_protocol::topics::{SupervisorId, SutTopic};
use labvisor_protocol::SutName;

use super::show::{parse, sut_name, wire_name, write_json};
use super::{BrokerArgs, ClientError, Session};

/// How long a supervisor may take to take up the request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// What `--when-idle` is for, when it is missing.
pub const WHEN_IDLE_ONLY: &str = "restart waits for each agent to be idle: pass --when-idle \
     (a restart now would cut running jobs; `docker restart` does that)";

/// `labvisor restart` flags.
#[derive(Debug, clap::Args)]
pub struct RestartArgs {
    /// The SUTs, restarted in this order as their agents become idle.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub suts: Vec<String>,
    /// Every SUT of every online supervisor.
    #[arg(long)]
    pub all: bool,
    /// Wait for each agent's job (its own, or the device's own work) to end before
    /// recreating its container. Required.
    #[arg(long)]
    pub when_idle: bool,
    /// Print each status change as one line of JSON.
    #[arg(long)]
    pub json: bool,
    /// The broker.
    #[command(flatten)]
    pub broker: BrokerArgs,
}

/// One supervisor asked: its request and what it last said.
struct Asked {
    request: String,
    boot_id: Option<String>,
    status: Option<RestartStatus>,
}

/// Which supervisors to ask, and which SUTs of each (empty: all of them).
fn targets(
    args: &RestartArgs,
    views: &BTreeMap<SutName, SutView>,
    sups: &BTreeMap<SupervisorId, SupervisorStatus>,
) -> Result<BTreeMap<SupervisorId, Vec<SutName>>, ClientError> {
    let mut out: BTreeMap<SupervisorId, Vec<SutName>> = BTreeMap::new();
    if args.all {
        for (id, s) in sups {
            if s.state == SupervisorState::Online {
                out.insert(id.clone(), Vec::new());
            }
        }
        if out.is_empty() {
            return Err(ClientError::NoAnswer(format!(
                "no online supervisor on {}",
                args.broker.broker
            )));
        }
        return Ok(out);
    }
    for s in &args.suts {
        let sut = sut_name(s)?;
        let Some(v) = views.get(&sut) else {
            return Err(ClientError::UnknownSut {
                sut: sut.to_string(),
                broker: args.broker.broker.clone(),
            });
        };
        out.entry(v.supervisor.clone()).or_default().push(sut);
    }
    Ok(out)
}

/// `labvisor restart`: returns the exit status.
pub async fn restart(args: &RestartArgs, out: &mut dyn Write) -> Result<u8, ClientError> {
    if !args.when_idle {
        return Err(ClientError::Usage(WHEN_IDLE_ONLY.into()));
    }
    let mut s = Session::connect(&args.broker, |t| {
        vec![
            t.sut_views_filter(),
            t.supervisor_status_filter(),
            t.supervisor_restart_status_filter(),
        ]
    })
    .await?;
    let mut views = BTreeMap::new();
    let mut sups = BTreeMap::new();
    for r in s.settle().await {
        if let Some((sut, SutTopic::Supervisor)) = s.topics.parse(&r.topic) {
            views.extend(parse::<SutView>(&r).map(|v| (sut, v)));
        } else if let Some(st) = parse::<SupervisorStatus>(&r) {
            sups.insert(st.id.clone(), st);
        }
    }
    let targets = targets(args, &views, &sups)?;
    let mut asked: BTreeMap<SupervisorId, Asked> = BTreeMap::new();
    for (sup, suts) in targets {
        let req = RestartRequest {
            v: VERSION,
            id: random_id(),
            all: suts.is_empty(),
            suts,
            when_idle: true,
        };
        let payload = serde_json::to_vec(&req).expect("request serialises");
        s.publish(s.topics.supervisor_restart(&sup), payload)?;
        let boot_id = sups.get(&sup).map(|st| st.boot_id.clone());
        asked.insert(
            sup,
            Asked {
                request: req.id,
                boot_id,
                status: None,
            },
        );
    }
    let code = follow(&mut s, &mut asked, args.json, out).await;
    s.close().await;
    code
}

/// Follows the supervisors' progress until every restart is over.
async fn follow(
    s: &mut Session,
    asked: &mut BTreeMap<SupervisorId, Asked>,
    json: bool,
    out: &mut dyn Write,
) -> Result<u8, ClientError> {
    let answer_by = tokio::time::Instant::now() + ANSWER_TIMEOUT;
    while asked
        .values()
        .any(|a| !a.status.as_ref().is_some_and(|st| st.state.is_final()))
    {
        let unanswered = asked.values().any(|a| a.status.is_none());
        let Some(r) = s.next(unanswered.then_some(answer_by)).await else {
            let who: Vec<String> = asked
                .iter()
                .filter(|(_, a)| a.status.is_none())
                .map(|(id, _)| id.to_string())
                .collect();
            return Err(ClientError::NoAnswer(format!(
                "supervisor {} did not take up the restart within {}: is it running, and may this login write {}?",
                who.join(", "),
                humantime::format_duration(ANSWER_TIMEOUT),
                s.topics.supervisor_restart_filter()
            )));
        };
        if let Some(st) = parse::<SupervisorStatus>(&r).filter(|_| r.topic.ends_with("/status")) {
            if let Some(a) = asked.get(&st.id) {
                let gone = st.state != SupervisorState::Online
                    || a.boot_id.as_ref().is_some_and(|b| *b != st.boot_id);
                if gone && !a.status.as_ref().is_some_and(|x| x.state.is_final()) {
                    return Err(ClientError::NoAnswer(format!(
                        "supervisor {} went {} (or restarted) before the restart ended; run it again",
                        st.id,
                        wire_name(&st.state)
                    )));
                }
            }
            continue;
        }
        let Some(st) = parse::<RestartStatus>(&r) else {
            continue;
        };
        let Some((sup, a)) = asked.iter_mut().find(|(_, a)| a.request == st.id) else {
            continue;
        };
        show(sup, a.status.as_ref(), &st, json, out)?;
        a.status = Some(st);
    }
    let mut code = 0;
    for (sup, a) in asked.iter() {
        let st = a.status.as_ref().expect("every restart ended");
        if st.state != RestartState::Done {
            code = 1;
            eprintln!(
                "labvisor restart: supervisor {sup}: {}: {}",
                wire_name(&st.state),
                st.reason.as_deref().unwrap_or("no reason given")
            );
        }
    }
    Ok(code)
}

/// Prints what changed between `before` and `now`: one line per SUT step, and the end.
fn show(
    sup: &SupervisorId,
    before: Option<&RestartStatus>,
    now: &RestartStatus,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), ClientError> {
    if json {
        write_json(out, now)?;
        return Ok(());
    }
    for s in &now.suts {
        let was = before.and_then(|b| b.suts.iter().find(|x| x.sut == s.sut));
        if was == Some(s) || (was.is_none() && s.step == RestartStep::Queued) {
            continue;
        }
        let mut line = format!("{}: {}", s.sut, wire_name(&s.step));
        if s.step == RestartStep::Done {
            if let Some(new) = &s.new_container {
                line.push_str(&format!(" (new container {})", &new[..new.len().min(12)]));
            }
        }
        if let Some(d) = &s.detail {
            line.push_str(&format!(" ({d})"));
        }
        writeln!(out, "{line}")?;
    }
    if now.state.is_final() && before.is_none_or(|b| !b.state.is_final()) {
        writeln!(
            out,
            "restart {} on {sup}: {}",
            now.id,
            wire_name(&now.state)
        )?;
    }
    Ok(())
}
