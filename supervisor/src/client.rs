//! The `labvisor` client commands: `status`, `logs -f`, `submit`, `jobs`, `cancel`.
//!
//! They speak MQTT only, and are built from the retained topics the agents and supervisors
//! publish, so they work from any machine that reaches the broker, with any of the roles in the
//! shipped ACL (a reader can run `status`, `jobs` and `logs`; `submit` and `cancel` need a
//! submitter). Every command has `--json`.
//!
//! Reading "everything retained" needs an end marker, which MQTT lacks: the client subscribes,
//! then publishes a probe on a private topic and stops when its own probe comes back (the broker
//! delivers retained messages of earlier subscriptions first). Where the ACL does not let it
//! publish, it stops after a short quiet period instead.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use labvisor_mqtt::{Incoming, LinkOptions, Message, MqttLink, QoS, Received};
use labvisor_protocol::payloads::{
    new_job_id, now_ms, random_id, AgentStatus, CancelAck, CancelResult, JobState, JobStatus,
    JobSubmit, OutputMeta, SubmitAck, SubmitResult, SupervisorState, SupervisorStatus, SutView,
};
use labvisor_protocol::topics::{JobId, SutTopic, Topics};
use labvisor_protocol::SutName;
use serde::Serialize;

/// Broker options shared by every client command (flags with env fallbacks).
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// MQTT broker URL.
    #[arg(long, env = "LABVISOR_BROKER", default_value = "mqtt://127.0.0.1:1883")]
    pub broker: String,
    /// MQTT username.
    #[arg(long, env = "LABVISOR_MQTT_USERNAME")]
    pub username: Option<String>,
    /// MQTT password.
    #[arg(long, env = "LABVISOR_MQTT_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// CA certificate (PEM) for `mqtts://`.
    #[arg(long, env = "LABVISOR_MQTT_CA")]
    pub ca_file: Option<PathBuf>,
    /// Global topic prefix of the lab.
    #[arg(long, env = "LABVISOR_TOPIC_PREFIX")]
    pub topic_prefix: Option<String>,
    /// The state directory of the managed broker (`labvisor supervise --state-dir`). With no
    /// username or password, a command talking to that broker on this machine logs in with its
    /// local login (`labvisor.local`, password in `local-password` there), if this user can
    /// read it.
    #[arg(long, env = "LABVISOR_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

/// What a client command can fail with; each maps to an exit status.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Bad flags or values.
    #[error("{0}")]
    Usage(String),
    /// The broker cannot be reached.
    #[error("cannot reach the broker at {broker}: {reason}")]
    Broker {
        /// The URL.
        broker: String,
        /// Why.
        reason: String,
    },
    /// No answer from the agent.
    #[error("{0}")]
    NoAnswer(String),
    /// Nothing on the broker knows the SUT.
    #[error("no SUT named {sut} on {broker}: no agent status, supervisor view or job of it is retained there (see `labvisor status`; is --topic-prefix right?)")]
    UnknownSut {
        /// The SUT asked for.
        sut: String,
        /// The broker URL.
        broker: String,
    },
    /// Writing the output failed.
    #[error("cannot write output: {0}")]
    Io(#[from] std::io::Error),
}

impl ClientError {
    /// The exit status for this error: 2 usage, 4 broker or agent unreachable, 5 no such SUT,
    /// 1 other.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Usage(_) => 2,
            ClientError::Broker { .. } | ClientError::NoAnswer(_) => 4,
            ClientError::UnknownSut { .. } => 5,
            ClientError::Io(_) => 1,
        }
    }

    /// Whether the output's reader went away (`labvisor jobs x | head`): the command stops
    /// quietly, as if it had finished.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, ClientError::Io(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

/// An MQTT session of one client command.
pub struct Session {
    link: MqttLink,
    incoming: Incoming,
    /// The lab's topics.
    pub topics: Topics,
    probe: String,
}

impl Session {
    /// Connects and subscribes to `filters`.
    pub async fn connect(
        args: &BrokerArgs,
        filters: impl Fn(&Topics) -> Vec<String>,
    ) -> Result<Session, ClientError> {
        let topics = Topics::with_prefix(args.topic_prefix.as_deref())
            .map_err(|e| ClientError::Usage(e.to_string()))?;
        let client_id = format!("labvisor-cli-{}", random_id());
        let mut opts = LinkOptions::from_url(&args.broker, client_id.clone())
            .map_err(|e| ClientError::Usage(format!("--broker {:?}: {e}", args.broker)))?;
        if args.username.is_some() {
            opts.username = args.username.clone();
        }
        if args.password.is_some() {
            opts.password = args.password.clone();
        }
        if opts.username.is_none() && opts.password.is_none() {
            // The managed broker of this machine: its local login, if this user can read it.
            let dir = args
                .state_dir
                .clone()
                .unwrap_or_else(crate::broker::default_state_dir);
            if let Some((user, password)) = crate::broker::local_login(&dir, &opts.host, opts.port)
            {
                opts.username = Some(user);
                opts.password = Some(password);
            }
        }
        if args.ca_file.is_some() {
            opts.ca_file = args.ca_file.clone();
        }
        opts.backoff_max = Duration::from_secs(1);
        // A submission may be as large as the largest max_payload: the broker and the agent
        // take it, so must the client.
        opts.max_packet_size = labvisor_protocol::MAX_PACKET_SIZE;
        let (link, incoming) = MqttLink::start(opts).map_err(|e| ClientError::Broker {
            broker: args.broker.clone(),
            reason: e.to_string(),
        })?;
        let probe = topics.cli_probe(&client_id);
        for f in filters(&topics) {
            link.subscribe(f, QoS::AtLeastOnce)
                .map_err(|e| ClientError::Usage(e.to_string()))?;
        }
        link.subscribe(probe.clone(), QoS::AtLeastOnce)
            .map_err(|e| ClientError::Usage(e.to_string()))?;
        let mut watch = link.watch_state();
        let connected = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if watch.borrow_and_update().connected {
                    return;
                }
                if watch.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        if connected.is_err() || !link.state().connected {
            let reason = link
                .state()
                .last_error
                .unwrap_or_else(|| "no connection within 5s".into());
            return Err(ClientError::Broker {
                broker: args.broker.clone(),
                reason,
            });
        }
        let _ = link.publish(Message::event(probe.clone(), "probe"));
        Ok(Session {
            link,
            incoming,
            topics,
            probe,
        })
    }

    /// Collects what the subscriptions delivered up to now (the retained messages): until the
    /// probe comes back, or 500 ms of quiet (at most 5 s).
    pub async fn settle(&mut self) -> Vec<Received> {
        let mut got = Vec::new();
        let start = Instant::now();
        loop {
            let quiet = Duration::from_millis(500);
            match tokio::time::timeout(quiet, self.incoming.recv()).await {
                Ok(Some(r)) if r.topic == self.probe => return got,
                Ok(Some(r)) => got.push(r),
                Ok(None) => return got,
                Err(_) => return got,
            }
            if start.elapsed() > Duration::from_secs(5) {
                return got;
            }
        }
    }

    /// The next message, or `None` at `deadline`.
    pub async fn next(&mut self, deadline: Option<tokio::time::Instant>) -> Option<Received> {
        loop {
            let r = match deadline {
                Some(d) => tokio::time::timeout_at(d, self.incoming.recv())
                    .await
                    .ok()??,
                None => self.incoming.recv().await?,
            };
            if r.topic != self.probe {
                return Some(r);
            }
        }
    }

    /// Publishes QoS 1.
    pub fn publish(&self, topic: String, payload: Vec<u8>) -> Result<(), ClientError> {
        self.link
            .publish(Message::event(topic, Bytes::from(payload)))
            .map_err(|e| ClientError::Usage(e.to_string()))
    }

    /// Delivers what is queued and disconnects.
    pub async fn close(self) {
        let _ = self.link.shutdown(Vec::new(), Duration::from_secs(2)).await;
    }
}

fn parse<T: serde::de::DeserializeOwned>(r: &Received) -> Option<T> {
    serde_json::from_slice(&r.payload).ok()
}

fn age(ms: u64) -> String {
    age_at(ms, now_ms())
}

/// How long before `now` the time `ms` was (both ms since the epoch), in its largest unit.
fn age_at(ms: u64, now: u64) -> String {
    let d = now.saturating_sub(ms) / 1000;
    match d {
        0..=59 => format!("{d}s"),
        60..=3599 => format!("{}m", d / 60),
        3600..=86399 => format!("{}h", d / 3600),
        _ => format!("{}d", d / 86400),
    }
}

/// Prints rows as aligned columns.
fn table(out: &mut dyn Write, header: &[&str], rows: &[Vec<String>]) -> std::io::Result<()> {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
        }
        s.trim_end().to_owned()
    };
    writeln!(
        out,
        "{}",
        line(header.iter().map(|h| h.to_string()).collect())
    )?;
    for r in rows {
        writeln!(out, "{}", line(r.clone()))?;
    }
    Ok(())
}

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
    let mut agents: BTreeMap<SutName, AgentStatus> = BTreeMap::new();
    let mut views: BTreeMap<SutName, SutView> = BTreeMap::new();
    let mut sups: Vec<SupervisorStatus> = Vec::new();
    for r in &got {
        match topics.parse(&r.topic) {
            Some((sut, SutTopic::Agent)) => {
                if let Some(a) = parse(r) {
                    agents.insert(sut, a);
                }
            }
            Some((sut, SutTopic::Supervisor)) => {
                if let Some(v) = parse(r) {
                    views.insert(sut, v);
                }
            }
            _ => {
                if let Some(st) = parse::<SupervisorStatus>(r) {
                    sups.push(st);
                }
            }
        }
    }
    let mut names: Vec<SutName> = agents.keys().chain(views.keys()).cloned().collect();
    names.sort();
    names.dedup();
    let rows: Vec<StatusRow> = names
        .iter()
        .map(|n| {
            let a = agents.get(n);
            let v = views.get(n);
            let mut detail: Vec<String> = Vec::new();
            if let Some(d) = a.and_then(|a| a.detail.clone()) {
                detail.push(d);
            }
            if let Some(v) = v {
                detail.extend(v.config_problems.iter().cloned());
                if let Some(p) = &v.pending_action {
                    detail.push(format!("pending: {p}"));
                }
                if let Some(e) = &v.last_error {
                    detail.push(e.clone());
                }
            }
            StatusRow {
                sut: n.to_string(),
                health: v
                    .map(|v| {
                        serde_json::to_value(v.health)
                            .ok()
                            .and_then(|h| h.as_str().map(String::from))
                            .unwrap_or_default()
                    })
                    .unwrap_or_else(|| "-".into()),
                state: a
                    .map(|a| a.state.as_str().to_owned())
                    .unwrap_or_else(|| "-".into()),
                job: a.and_then(|a| a.job.as_ref().map(|j| j.to_string())),
                queue: a.map_or(0, |a| a.queue_len),
                restarts: v.map_or(0, |v| v.restarts)
                    + a.and_then(|a| a.child.as_ref()).map_or(0, |c| c.restarts),
                heartbeat_age_ms: a.map(|a| now_ms().saturating_sub(a.time_ms)),
                supervisor: v.map(|v| v.supervisor.to_string()),
                detail: (!detail.is_empty()).then(|| detail.join("; ")),
            }
        })
        .collect();
    if json {
        serde_json::to_writer_pretty(
            &mut *out,
            &serde_json::json!({ "suts": rows, "supervisors": sups }),
        )
        .map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    if rows.is_empty() {
        writeln!(
            out,
            "No SUTs on {} (is a supervisor or agent running? is --topic-prefix right?)",
            args.broker
        )?;
    } else {
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.sut.clone(),
                    r.health.clone(),
                    r.state.clone(),
                    r.job.clone().unwrap_or_else(|| "-".into()),
                    r.queue.to_string(),
                    r.restarts.to_string(),
                    r.heartbeat_age_ms
                        .map(|ms| age(now_ms() - ms))
                        .unwrap_or_else(|| "-".into()),
                    r.supervisor.clone().unwrap_or_else(|| "-".into()),
                    r.detail.clone().unwrap_or_default(),
                ]
            })
            .collect();
        table(
            out,
            &[
                "SUT",
                "HEALTH",
                "STATE",
                "JOB",
                "QUEUE",
                "RESTARTS",
                "HEARTBEAT",
                "SUPERVISOR",
                "DETAIL",
            ],
            &cells,
        )?;
        let count = |f: &dyn Fn(&StatusRow) -> bool| rows.iter().filter(|r| f(r)).count();
        writeln!(
            out,
            "{} SUTs: {} healthy, {} unhealthy, {} busy, {} with problems",
            rows.len(),
            count(&|r| r.health == "healthy"),
            count(&|r| r.health == "unhealthy"),
            count(&|r| r.state == "busy"),
            count(&|r| r.detail.is_some()),
        )?;
    }
    for sup in &sups {
        writeln!(out, "{}", supervisor_line(sup, now_ms()))?;
        for p in &sup.file_problems {
            writeln!(out, "  {p}")?;
        }
    }
    Ok(())
}

/// An online supervisor whose status is older than this many of its refresh periods is shown
/// as stale.
pub const STALE_AFTER_PERIODS: u64 = 3;

/// The line `labvisor status` prints for a supervisor's status, as of `now` (ms since the
/// epoch). Container counts the supervisor could not know (Docker unreachable) say `unknown`.
/// An `online` status older than [`STALE_AFTER_PERIODS`] of the supervisor's refresh period
/// (`refresh_ms`) says `STALE`: the supervisor or its link to the broker is gone (or this
/// machine's clock is far off the supervisor's).
pub fn supervisor_line(sup: &SupervisorStatus, now: u64) -> String {
    let count = |n: Option<u64>| n.map_or_else(|| "unknown".to_owned(), |n| n.to_string());
    let state = serde_json::to_value(sup.state)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default();
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

fn sut_name(s: &str) -> Result<SutName, ClientError> {
    SutName::new(s).map_err(|e| ClientError::Usage(format!("SUT {s:?}: {e}")))
}

/// `labvisor logs <sut> -f [--job ID]`: follows the live output.
pub async fn logs(
    args: &BrokerArgs,
    sut: &str,
    job: Option<&str>,
    out: &mut dyn Write,
) -> Result<(), ClientError> {
    let sut = sut_name(sut)?;
    let job = job
        .map(|j| JobId::new(j).map_err(|e| ClientError::Usage(e.to_string())))
        .transpose()?;
    let topic_of = |t: &Topics| match &job {
        Some(j) => t.job_output(&sut, j),
        None => t.output(&sut),
    };
    let mut s = Session::connect(args, |t| vec![topic_of(t)]).await?;
    let mut last: Option<OutputMeta> = None;
    while let Some(r) = s.next(None).await {
        let props = r.user_properties();
        if let Some(meta) = OutputMeta::from_properties(&props) {
            let (show, note) = output_step(last.as_ref(), &meta);
            if let Some(note) = note {
                eprintln!("{note}");
            }
            if !show {
                continue;
            }
            last = Some(meta);
        }
        out.write_all(&r.payload)?;
        out.flush()?;
    }
    Ok(())
}

/// What `labvisor logs` does with an output message after `last`: whether to print it (a QoS 1
/// resend of a message already printed is not), and a note about output lost before it.
fn output_step(last: Option<&OutputMeta>, meta: &OutputMeta) -> (bool, Option<String>) {
    let Some(prev) = last.filter(|p| p.boot == meta.boot) else {
        return (true, None);
    };
    if meta.seq <= prev.seq {
        return (false, None);
    }
    let lost = meta.dropped.saturating_sub(prev.dropped);
    let note = if lost > 0 {
        Some(format!(
            "[labvisor: {lost} lines lost here ({} lost by the agent so far)]",
            meta.dropped
        ))
    } else if meta.seq > prev.seq + 1 {
        Some(format!(
            "[labvisor: {} messages missing here (lost between the broker and this client)]",
            meta.seq - prev.seq - 1
        ))
    } else {
        None
    };
    (true, note)
}

/// `labvisor submit` options.
#[derive(Debug, Clone, clap::Args)]
pub struct SubmitArgs {
    /// The SUT.
    pub sut: String,
    /// A script file to run (by the SUT's `[job] command`, `/bin/sh` by default).
    #[arg(long, conflicts_with = "cmd")]
    pub script: Option<PathBuf>,
    /// The job id (generated when absent).
    #[arg(long)]
    pub id: Option<String>,
    /// Total time limit ("30m"), capped by the SUT's.
    #[arg(long)]
    pub timeout: Option<String>,
    /// Silence limit ("5m"), capped by the SUT's.
    #[arg(long)]
    pub output_timeout: Option<String>,
    /// Extra environment, `KEY=VALUE` (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Wait for the job to end and exit with its exit code (124 timeout, 130 cancelled,
    /// 125 lost, 128+N killed by signal N).
    #[arg(long)]
    pub wait: bool,
    /// Stream the job's output until it ends (implies --wait).
    #[arg(long)]
    pub follow: bool,
    /// How long to wait for the acknowledgement.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub ack_timeout: Duration,
    /// Print JSON (the acknowledgement, and the final status with --wait).
    #[arg(long)]
    pub json: bool,
    /// A command to run instead of a script: everything after `--`.
    #[arg(last = true)]
    pub cmd: Vec<String>,
}

/// Parses a human duration ("10s").
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// The exit status `--wait` gives for a final job status.
pub fn job_exit_code(st: &JobStatus) -> u8 {
    match st.state {
        JobState::Passed => 0,
        JobState::Timeout => 124,
        JobState::Lost => 125,
        JobState::Cancelled => 130,
        _ => match (st.exit_code, st.signal) {
            (Some(c), _) => c.clamp(1, 255) as u8,
            (None, Some(s)) => (128 + s).clamp(1, 255) as u8,
            _ => 1,
        },
    }
}

/// `labvisor submit`: returns the process exit status.
pub async fn submit(
    args: &BrokerArgs,
    sa: &SubmitArgs,
    out: &mut dyn Write,
) -> Result<u8, ClientError> {
    let sut = sut_name(&sa.sut)?;
    let id = match &sa.id {
        Some(i) => JobId::new(i).map_err(|e| ClientError::Usage(e.to_string()))?,
        None => new_job_id(),
    };
    let (script, argv) = match (&sa.script, sa.cmd.is_empty()) {
        (Some(p), _) => (
            Some(
                std::fs::read_to_string(p)
                    .map_err(|e| ClientError::Usage(format!("--script {}: {e}", p.display())))?,
            ),
            None,
        ),
        (None, false) => (None, Some(sa.cmd.clone())),
        (None, true) => {
            return Err(ClientError::Usage(
                "give --script FILE or a command after --".into(),
            ))
        }
    };
    let mut env = BTreeMap::new();
    for kv in &sa.env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| ClientError::Usage(format!("--env {kv:?}: expected KEY=VALUE")))?;
        env.insert(k.to_owned(), v.to_owned());
    }
    let job = JobSubmit {
        id: Some(id.clone()),
        script,
        argv,
        env,
        timeout: sa.timeout.clone(),
        output_timeout: sa.output_timeout.clone(),
        reply_to: None,
    };
    let wait = sa.wait || sa.follow;
    let mut s = Session::connect(args, |t| {
        let mut f = vec![t.submit_status(&sut)];
        if wait {
            f.push(t.job(&sut, &id));
            f.push(t.job_output(&sut, &id));
        }
        f
    })
    .await?;
    s.settle().await;
    let payload = serde_json::to_vec(&job).expect("serialises");
    s.publish(s.topics.submit(&sut), payload)?;
    let deadline = tokio::time::Instant::now() + sa.ack_timeout;
    let ack: SubmitAck = loop {
        let Some(r) = s.next(Some(deadline)).await else {
            s.close().await;
            return Err(ClientError::NoAnswer(format!(
                "no acknowledgement from {sut} within {}: is its agent running and connected?",
                humantime::format_duration(sa.ack_timeout)
            )));
        };
        if r.topic == s.topics.submit_status(&sut) {
            if let Some(a) = parse::<SubmitAck>(&r) {
                if a.id.as_ref() == Some(&id) {
                    break a;
                }
            }
        }
    };
    if ack.result == SubmitResult::Rejected {
        s.close().await;
        if sa.json {
            serde_json::to_writer(&mut *out, &ack).map_err(std::io::Error::from)?;
            writeln!(out)?;
        }
        eprintln!(
            "labvisor submit: {sut} rejected the job: {}",
            ack.reason.as_deref().unwrap_or("no reason given")
        );
        return Ok(3);
    }
    if sa.json {
        serde_json::to_writer(&mut *out, &ack).map_err(std::io::Error::from)?;
        writeln!(out)?;
    } else {
        writeln!(out, "{id}")?;
    }
    out.flush()?;
    if !wait {
        s.close().await;
        return Ok(0);
    }
    let output_topic = s.topics.job_output(&sut, &id);
    let status_topic = s.topics.job(&sut, &id);
    let mut fin: Option<JobStatus> = None;
    loop {
        // After the final status, output still in flight arrives within a batch interval.
        let deadline = fin
            .as_ref()
            .map(|_| tokio::time::Instant::now() + Duration::from_millis(300));
        let Some(r) = s.next(deadline).await else {
            break;
        };
        if r.topic == output_topic {
            if sa.follow && !sa.json {
                out.write_all(&r.payload)?;
                out.flush()?;
            }
        } else if r.topic == status_topic {
            if let Some(st) = parse::<JobStatus>(&r) {
                if st.state.is_final() {
                    fin = Some(st);
                }
            }
        }
    }
    s.close().await;
    let st = fin.expect("the loop only ends after the final status");
    if sa.json {
        serde_json::to_writer(&mut *out, &st).map_err(std::io::Error::from)?;
        writeln!(out)?;
    } else if st.state != JobState::Passed {
        eprintln!(
            "labvisor submit: job {id} {}{}",
            serde_json::to_value(st.state)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            st.reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
    }
    Ok(job_exit_code(&st))
}

/// `labvisor jobs <sut>`: the SUT's recent jobs from their retained statuses. A SUT that the
/// broker knows nothing of (no retained agent status, supervisor view or job) is an error
/// ([`ClientError::UnknownSut`]), not an empty list.
pub async fn jobs(
    args: &BrokerArgs,
    sut: &str,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), ClientError> {
    let sut = sut_name(sut)?;
    let mut s = Session::connect(args, |t| {
        vec![t.jobs_filter(&sut), t.agent(&sut), t.supervisor(&sut)]
    })
    .await?;
    let got = s.settle().await;
    let topics = s.topics.clone();
    s.close().await;
    let mut known = false;
    let mut jobs: Vec<JobStatus> = Vec::new();
    for r in got.iter().filter(|r| !r.payload.is_empty()) {
        match topics.parse(&r.topic) {
            Some((_, SutTopic::Job(_))) => {
                known = true;
                jobs.extend(parse::<JobStatus>(r));
            }
            Some((_, SutTopic::Agent | SutTopic::Supervisor)) => known = true,
            _ => {}
        }
    }
    if !known {
        return Err(ClientError::UnknownSut {
            sut: sut.to_string(),
            broker: args.broker.clone(),
        });
    }
    jobs.sort_by_key(|j| (j.queued_ms, j.id.clone()));
    if json {
        serde_json::to_writer_pretty(&mut *out, &jobs).map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.to_string(),
                serde_json::to_value(j.state)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default(),
                j.exit_code
                    .map(|c| c.to_string())
                    .or(j.signal.map(|s| format!("sig {s}")))
                    .unwrap_or_else(|| "-".into()),
                format!("{} ago", age(j.queued_ms)),
                j.duration_ms
                    .map(|d| format!("{:.1}s", d as f64 / 1000.0))
                    .unwrap_or_else(|| "-".into()),
                j.output_bytes.to_string(),
                j.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        out,
        &[
            "ID", "STATE", "EXIT", "QUEUED", "DURATION", "OUTPUT", "REASON",
        ],
        &rows,
    )?;
    writeln!(out, "{} jobs", rows.len())?;
    Ok(())
}

/// `labvisor cancel <sut> <id|current>`: returns the exit status (0 cancelled, 1 otherwise).
pub async fn cancel(
    args: &BrokerArgs,
    sut: &str,
    target: &str,
    json: bool,
    timeout: Duration,
    out: &mut dyn Write,
) -> Result<u8, ClientError> {
    let sut = sut_name(sut)?;
    let mut s = Session::connect(args, |t| vec![t.cancel_status(&sut)]).await?;
    s.settle().await;
    let sent_ms = now_ms();
    s.publish(s.topics.cancel(&sut), target.as_bytes().to_vec())?;
    let deadline = tokio::time::Instant::now() + timeout;
    let ack: CancelAck = loop {
        let Some(r) = s.next(Some(deadline)).await else {
            s.close().await;
            return Err(ClientError::NoAnswer(format!(
                "no answer from {sut} within {}: is its agent running and connected?",
                humantime::format_duration(timeout)
            )));
        };
        if let Some(a) = parse::<CancelAck>(&r) {
            if a.request == target.trim() && a.time_ms + 1000 >= sent_ms {
                break a;
            }
        }
    };
    s.close().await;
    if json {
        serde_json::to_writer(&mut *out, &ack).map_err(std::io::Error::from)?;
        writeln!(out)?;
    } else {
        writeln!(
            out,
            "{}: {}{}",
            ack.id
                .as_ref()
                .map(|i| i.to_string())
                .unwrap_or_else(|| target.to_owned()),
            serde_json::to_value(ack.result)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            ack.reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        )?;
    }
    Ok(u8::from(ack.result != CancelResult::Cancelled))
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

    fn meta(seq: u64, dropped: u64, boot: &str) -> OutputMeta {
        OutputMeta {
            seq,
            dropped,
            boot: boot.into(),
        }
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

    #[test]
    fn logs_notes_lost_lines_and_skips_resends() {
        let a = meta(4, 10, "b1");
        assert_eq!(output_step(None, &a), (true, None));
        assert_eq!(output_step(Some(&a), &meta(5, 10, "b1")), (true, None));
        // A resend (QoS 1) of what was printed.
        assert_eq!(output_step(Some(&a), &meta(4, 10, "b1")), (false, None));
        // A loss at the agent: the seq jumps and dropped says how many lines.
        let (show, note) = output_step(Some(&a), &meta(6, 25, "b1"));
        assert!(show);
        assert_eq!(
            note.unwrap(),
            "[labvisor: 15 lines lost here (25 lost by the agent so far)]"
        );
        // A jump without a loss at the agent.
        let (_, note) = output_step(Some(&a), &meta(7, 10, "b1"));
        assert!(note.unwrap().contains("2 messages missing"));
        // A new agent run starts over.
        assert_eq!(output_step(Some(&a), &meta(0, 0, "b2")), (true, None));
    }
}
