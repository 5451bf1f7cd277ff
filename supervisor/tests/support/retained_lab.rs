//! A lab of N SUTs as `labvisor status` reads it, without containers or agents: for each SUT a
//! retained agent status (`<sut>/agent`) and supervisor view (`<sut>/supervisor`), plus one
//! supervisor status, built with the protocol's payload types and published retained with
//! QoS 1 ([`publish`] returns once the broker acknowledged every message).
//!
//! Shared by `tests/status_scale.rs` and the example `retained_lab` (what the benchmark runs to
//! fill a broker before timing `labvisor status`).

use std::time::Duration;

use labvisor_mqtt::{LinkOptions, Message, MqttLink};
use labvisor_protocol::payloads::{
    now_ms, AdminMode, AdminState, AgentState, AgentStatus, Health, SupervisorState,
    SupervisorStatus, SutCounts, SutView, VERSION,
};
use labvisor_protocol::topics::{JobId, SupervisorId, Topics};
use labvisor_protocol::SutName;

/// What one SUT of the lab looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Idle and healthy.
    Healthy,
    /// Running a job, healthy.
    Busy,
    /// Put offline by a person, with a reason.
    Offline,
    /// Docker says unhealthy (a failing exec probe).
    Unhealthy,
    /// The device process restarts too often.
    CrashLoop,
    /// Its file is invalid (the container keeps running as it was).
    InvalidFile,
    /// A deferred action whose last attempt failed.
    PendingFailing,
    /// A supervisor view but no agent status.
    NoAgent,
}

/// How many SUTs of each kind other than [`Kind::Healthy`] (the rest are healthy).
#[derive(Debug, Clone, Default)]
pub struct Mix {
    /// Busy SUTs.
    pub busy: usize,
    /// Offline SUTs.
    pub offline: usize,
    /// Each problem kind, with its count.
    pub problems: Vec<(Kind, usize)>,
}

impl Mix {
    /// A plausible lab of `n`: 1 in 40 busy, 1 in 100 offline, and one SUT of each problem kind
    /// per 100 (at least one each).
    pub fn typical(n: usize) -> Mix {
        let per_100 = (n / 100).max(1);
        Mix {
            busy: n / 40,
            offline: n / 100,
            problems: [
                Kind::Unhealthy,
                Kind::CrashLoop,
                Kind::InvalidFile,
                Kind::PendingFailing,
                Kind::NoAgent,
            ]
            .into_iter()
            .map(|k| (k, per_100))
            .collect(),
        }
    }

    /// The SUTs `sut-0001` … of a lab of `n` with this mix. The special SUTs are spread from
    /// the end of the alphabet backwards (problems first, then offline, then busy), every
    /// seventh name, so that sorting problems first visibly reorders the list.
    pub fn suts(&self, n: usize) -> Vec<(SutName, Kind)> {
        let mut kinds = vec![Kind::Healthy; n];
        let specials = self
            .problems
            .iter()
            .flat_map(|&(k, c)| std::iter::repeat_n(k, c))
            .chain(std::iter::repeat_n(Kind::Offline, self.offline))
            .chain(std::iter::repeat_n(Kind::Busy, self.busy));
        let mut free: Vec<usize> = (0..n).rev().step_by(7).collect();
        free.extend((0..n).rev().filter(|i| !(n - 1 - i).is_multiple_of(7)));
        for (kind, i) in specials.zip(free) {
            kinds[i] = kind;
        }
        kinds
            .into_iter()
            .enumerate()
            .map(|(i, k)| (name(i + 1), k))
            .collect()
    }
}

/// `sut-0042`.
pub fn name(i: usize) -> SutName {
    SutName::new(&format!("sut-{i:04}")).expect("a valid SUT name")
}

/// The retained messages of the lab `suts`, owned by supervisor `sup`: topic and payload.
pub fn messages(topics: &Topics, sup: &str, suts: &[(SutName, Kind)]) -> Vec<(String, Vec<u8>)> {
    let sup = SupervisorId::new(sup).expect("a valid supervisor id");
    let now = now_ms();
    let mut out = Vec::new();
    for (sut, kind) in suts {
        if *kind != Kind::NoAgent {
            let a = agent(sut, *kind, now);
            out.push((topics.agent(sut), serde_json::to_vec(&a).expect("json")));
        }
        let v = view(sut, &sup, *kind, now);
        out.push((
            topics.supervisor(sut),
            serde_json::to_vec(&v).expect("json"),
        ));
    }
    let invalid = count(suts, Kind::InvalidFile) as u64;
    let running = suts.len() as u64 - count(suts, Kind::NoAgent) as u64;
    let unhealthy = count(suts, Kind::Unhealthy) as u64;
    let status = SupervisorStatus {
        v: VERSION,
        id: sup.clone(),
        state: SupervisorState::Online,
        boot_id: "retained-lab".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        docker_reachable: true,
        suts: SutCounts {
            desired: suts.len() as u64 - invalid,
            running: Some(running),
            healthy: Some(running - unhealthy),
            unhealthy: Some(unhealthy),
            invalid,
        },
        time_ms: now,
        managed_broker: None,
        file_problems: Vec::new(),
        refresh_ms: 3_600_000,
        agents_without_broker: false,
    };
    out.push((
        topics.supervisor_status(&sup),
        serde_json::to_vec(&status).expect("json"),
    ));
    out
}

/// The summary line `labvisor status` prints for the lab `suts` (alone on its broker).
pub fn summary_line(suts: &[(SutName, Kind)]) -> String {
    let n = |k: Kind| count(suts, k);
    let problems = suts.len() - n(Kind::Healthy) - n(Kind::Busy) - n(Kind::Offline);
    let kinds: Vec<String> = [
        (Kind::Unhealthy, "unhealthy"),
        (Kind::CrashLoop, "crash-loop"),
        (Kind::InvalidFile, "invalid file"),
        (Kind::PendingFailing, "failing action"),
        (Kind::NoAgent, "no agent status"),
    ]
    .into_iter()
    .filter(|(k, _)| n(*k) > 0)
    .map(|(k, label)| format!("{} {label}", n(k)))
    .collect();
    let kinds = if kinds.is_empty() {
        String::new()
    } else {
        format!(" ({})", kinds.join(", "))
    };
    format!(
        "{} SUTs: {} healthy, {} busy, {} offline, {problems} problems{kinds}",
        suts.len(),
        n(Kind::Healthy),
        n(Kind::Busy),
        n(Kind::Offline),
    )
}

fn count(suts: &[(SutName, Kind)], kind: Kind) -> usize {
    suts.iter().filter(|(_, k)| *k == kind).count()
}

fn agent(sut: &SutName, kind: Kind, now: u64) -> AgentStatus {
    let state = match kind {
        Kind::Busy => AgentState::Busy,
        Kind::CrashLoop => AgentState::CrashLoop,
        _ => AgentState::Idle,
    };
    let a = AgentStatus::new(sut.clone(), "boot", env!("CARGO_PKG_VERSION"), now)
        .with_state(state)
        .with_broker_connected(true);
    match kind {
        Kind::Busy => a.with_jobs(Some(JobId::new("job-1").expect("a job id")), 0),
        Kind::Offline => a.with_admin(Some(AdminState {
            mode: AdminMode::Offline,
            reason: Some("cable swap".into()),
            since_ms: now,
            by: Some("al".into()),
        })),
        Kind::Unhealthy => a.with_probe_failure(Some("exit 1: no device".into())),
        Kind::CrashLoop => a.with_detail(Some("device exited 5 times in 10s".into())),
        _ => a,
    }
}

fn view(sut: &SutName, sup: &SupervisorId, kind: Kind, now: u64) -> SutView {
    let problem = |k: Kind, s: &str| (kind == k).then(|| s.to_owned());
    let health = match kind {
        Kind::Unhealthy | Kind::CrashLoop => Health::Unhealthy,
        Kind::NoAgent => Health::None,
        _ => Health::Healthy,
    };
    // The fields that matter here; any other (a newer optional one) takes its default.
    let mut v: SutView = serde_json::from_value(serde_json::json!({
        "v": VERSION, "sut": sut, "supervisor": sup, "health": health,
        "restarts": u64::from(kind == Kind::CrashLoop) * 3, "time_ms": now,
    }))
    .expect("a SutView");
    v.container_id = (kind != Kind::NoAgent).then(|| format!("c-{sut}"));
    v.image = Some("labvisor/busybox:local".into());
    v.config_hash = Some("hash".into());
    v.crash_loop = kind == Kind::CrashLoop;
    v.pending_action = problem(Kind::PendingFailing, "recreate (config changed)");
    v.last_error = problem(Kind::PendingFailing, "create: no such image");
    v.config_problems = problem(Kind::InvalidFile, "image: missing")
        .into_iter()
        .collect();
    v
}

/// Publishes `msgs` retained with QoS 1 on the broker at `url` and returns once the broker
/// acknowledged every one (or says why not within `limit`).
pub async fn publish(
    url: &str,
    msgs: Vec<(String, Vec<u8>)>,
    limit: Duration,
) -> Result<(), String> {
    let mut opts = LinkOptions::from_url(url, format!("retained-lab-{}", std::process::id()))
        .map_err(|e| e.to_string())?;
    opts.max_packet_size = labvisor_protocol::MAX_PACKET_SIZE;
    let (link, _incoming) = MqttLink::start(opts).map_err(|e| e.to_string())?;
    let mut state = link.watch_state();
    tokio::time::timeout(limit, state.wait_for(|s| s.connected))
        .await
        .map_err(|_| format!("no connection to {url} within {limit:?}"))?
        .map_err(|e| e.to_string())?;
    for (topic, payload) in msgs {
        link.publish(Message::state(topic, payload))
            .map_err(|e| e.to_string())?;
    }
    link.shutdown(Vec::new(), limit)
        .await
        .map_err(|e| format!("not every message was acknowledged within {limit:?}: {e}"))
}

/// Publishes `msgs` retained again and again, one every `every`, on the broker at `url`, as
/// live agent statuses (heartbeats) come; until the runtime ends.
pub async fn republish(url: String, msgs: Vec<(String, Vec<u8>)>, every: Duration) {
    let opts = LinkOptions::from_url(&url, format!("retained-lab-live-{}", std::process::id()))
        .expect("a broker URL");
    let (link, _incoming) = MqttLink::start(opts).expect("a link");
    for (topic, payload) in msgs.iter().cycle() {
        let _ = link.publish(Message::state(topic.clone(), payload.clone()));
        tokio::time::sleep(every).await;
    }
}
