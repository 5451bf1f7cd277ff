//! Broker load for many agents: `--agents N` simulated agents in `--hosts H` groups, each with
//! its own MQTT connection, client id and login, publish what labvisor agents publish (the
//! rates and payloads of [`model`]) to a real mosquitto configured as the managed broker is
//! (`labvisor_supervisor::broker::{mosquitto_conf, managed_acl}`: a password file with one
//! login per SUT, the supervisor's and the local tools', the per-SUT ACL, persistence). In a
//! process of their own (this binary with `--consume`, see `consume.rs`), one client
//! subscribes as the supervisor does (`+/agent`, `+/last_job`, QoS 1, its own login) and one
//! follows `+/output` (QoS 1, as `labvisor logs -f` over every SUT would); every 20 s a client
//! of this process reads every retained status as `labvisor status` does (QoS 0, local login).
//!
//! Measured over a steady window after all agents connected (default 60 s): mosquitto's CPU
//! (utime + stime from `/proc/<pid>/stat`, as a share of one core), RSS, PSS and peak RSS, its
//! open files, messages in and out per second (our counters), the connect storm (all logins
//! at once), the status delivery latency to the supervisor-like client, and exact delivery
//! counts: statuses and last jobs the agents' links had acknowledged against the unique live
//! ones the supervisor-like client received, output messages and lines sent against those the
//! follower received (retained re-deliveries and duplicates apart, `tally.rs`), and the
//! consumers' reconnects. Prints
//! one JSON object on stdout. The agents connect to the agents' listener (`127.0.0.2`), the
//! other clients to loopback (`127.0.0.1`), as with the managed broker.
//!
//! `cargo run --release -p labvisor --example broker_load -- --agents 1000 --hosts 10`
//! (tools/bench.sh runs it in its `broker-1000` group, with `ulimit -n` raised). mosquitto's
//! soft open-files limit is raised to its hard limit (`ulimit -n $(ulimit -Hn)` in the shell
//! that starts it); this tool refuses to start when its own limit is below what N connections
//! need.

mod consume;
mod model;
mod tally;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use labvisor_mqtt::{LinkOptions, Message, MqttLink, QoS};
use labvisor_protocol::payloads::{new_job_id, now_ms, random_id};
use labvisor_protocol::topics::{JobId, SutTopic, Topics};
use labvisor_protocol::{SutName, MAX_PACKET_SIZE};
use labvisor_supervisor::broker::{managed_acl, mosquitto_conf, LOCAL_USER, SUPERVISOR_USER};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use model::Profile;

/// The agents' listener (the managed broker's second listener, on the agents' gateway).
const AGENT_HOST: &str = "127.0.0.2";

#[derive(Parser, Debug)]
#[command(about = "Broker load of N labvisor agents against a real mosquitto")]
struct Args {
    /// Simulated agents.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Hosts (groups of agents; names h00-sut0000...).
    #[arg(long, default_value_t = 10)]
    hosts: usize,
    /// The measured window, after all agents connected and a warm-up of one heartbeat.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Share of agents running jobs back to back.
    #[arg(long, default_value_t = 0.3)]
    busy_share: f64,
    /// Lines a job prints per second.
    #[arg(long, default_value_t = 10.0)]
    lines_per_sec: f64,
    /// Bytes per output line, newline included.
    #[arg(long, default_value_t = 100)]
    line_bytes: usize,
    /// Job length.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    job: Duration,
    /// `health.heartbeat`.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// Run mosquitto without logins and ACL (anonymous, one listener): the ACL's cost.
    #[arg(long)]
    no_acl: bool,
    /// mosquitto.
    #[arg(long, default_value = "mosquitto")]
    mosquitto: PathBuf,
    /// mosquitto_passwd.
    #[arg(long, default_value = "mosquitto_passwd")]
    mosquitto_passwd: PathBuf,
    /// mosquitto's soft open-files limit (default: raised to its hard limit); e.g. 1024, the
    /// usual default, to see what a broker left at it does with more agents.
    #[arg(long)]
    broker_nofile: Option<u64>,
    /// Run as the consumers' process (started by the load tool itself, see `consume.rs`).
    #[arg(long, hide = true)]
    consume: bool,
    /// The broker's port, with `--consume`.
    #[arg(long, hide = true)]
    port: Option<u16>,
}

/// What every task counts.
#[derive(Default)]
struct Counters {
    connected: AtomicU64,
    status_sent: AtomicU64,
    output_sent: AtomicU64,
    /// `<sut>/output` only (what the follower gets).
    output_sut_sent: AtomicU64,
    /// Lines in the `<sut>/output` messages.
    output_sut_lines: AtomicU64,
    job_sent: AtomicU64,
    last_job_sent: AtomicU64,
    bytes_sent: AtomicU64,
}

impl Counters {
    fn sent(&self) -> u64 {
        self.status_sent.load(Ordering::Relaxed)
            + self.output_sent.load(Ordering::Relaxed)
            + self.job_sent.load(Ordering::Relaxed)
            + self.last_job_sent.load(Ordering::Relaxed)
    }
}

struct Shared {
    port: u16,
    topics: Topics,
    profile: Profile,
    agents: usize,
    no_acl: bool,
    c: Counters,
    start: tokio::sync::watch::Receiver<bool>,
    stop: CancellationToken,
}

/// One simulated agent.
struct AgentSpec {
    index: usize,
    sut: SutName,
    password: String,
    busy: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.consume {
        let port = args.port.context("--consume needs --port")?;
        return tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(consume::run(port, args.no_acl));
    }
    if args.agents == 0 || args.hosts == 0 || args.hosts > args.agents {
        bail!("need 1 <= hosts <= agents");
    }
    let need = args.agents as u64 + 256;
    let soft = open_files_limit("self")?;
    if soft < need {
        bail!("open files limit {soft} < {need}: raise it first (ulimit -n {need})");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let work = tempfile::tempdir()?;
    let profile = Profile {
        heartbeat: args.heartbeat,
        lines_per_sec: args.lines_per_sec,
        line_bytes: args.line_bytes,
        job: args.job,
    };
    let topics = Topics::new();
    let busy = model::busy_agents(args.agents, args.busy_share);
    let per_host = args.agents.div_ceil(args.hosts);
    let specs: Vec<AgentSpec> = (0..args.agents)
        .map(|i| AgentSpec {
            index: i,
            sut: model::sut_name(i / per_host, i),
            password: random_id(),
            // Busy agents spread over the hosts.
            busy: (i * busy) / args.agents != ((i + 1) * busy) / args.agents,
        })
        .collect();
    let sup_password = random_id();
    let local_password = random_id();

    // 1. The broker's files, as the managed broker writes them.
    let t_passwd = Instant::now();
    let port = free_port()?;
    let conf = write_broker_files(
        work.path(),
        &args,
        port,
        &topics,
        &specs,
        &sup_password,
        &local_password,
    )?;
    let passwd_secs = t_passwd.elapsed().as_secs_f64();
    let mut broker = start_mosquitto(
        &args.mosquitto,
        &conf,
        (work.path(), port),
        args.broker_nofile,
    )
    .await?;
    let pid = broker.id().context("mosquitto pid")?;
    let tck = clock_ticks()?;

    let (start_tx, start_rx) = tokio::sync::watch::channel(false);
    let shared = Arc::new(Shared {
        port,
        topics: topics.clone(),
        profile: profile.clone(),
        agents: args.agents,
        no_acl: args.no_acl,
        c: Counters::default(),
        start: start_rx,
        stop: CancellationToken::new(),
    });

    // 2. The supervisor-like subscriber and the output follower, in a process of their own,
    //    subscribed before the agents start.
    let mut consumer = Consumer::start(port, args.no_acl, &sup_password, &local_password).await?;

    // 3. The connect storm: every agent at once.
    let cpu0 = proc_cpu_ticks(pid)?;
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(args.agents);
    for spec in specs {
        let s = shared.clone();
        tasks.push(tokio::spawn(agent(spec, s)));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while shared.c.connected.load(Ordering::Relaxed) < args.agents as u64 {
        if Instant::now() > deadline {
            let log =
                std::fs::read_to_string(work.path().join("mosquitto.log")).unwrap_or_default();
            let open = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
            let limit = open_files_limit(&pid.to_string()).unwrap_or(0);
            bail!(
                "only {} of {} agents connected within 120 s (mosquitto: {open} open files, \
                 limit {limit}); mosquitto's log:\n{}",
                shared.c.connected.load(Ordering::Relaxed),
                args.agents,
                log_summary(&log)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let storm = t0.elapsed();
    let storm_cpu = (proc_cpu_ticks(pid)? - cpu0) as f64 / tck;

    // 4. Warm-up of one heartbeat, then the window.
    start_tx.send_replace(true);
    tokio::time::sleep(profile.heartbeat).await;
    let readers = tokio::spawn(status_readers(
        shared.clone(),
        local_password.clone(),
        args.window,
    ));
    consumer.send("measure").await?;
    let (sent0, bytes0) = (shared.c.sent(), shared.c.bytes_sent.load(Ordering::Relaxed));
    let by_kind0 = kinds(&shared.c);
    let (cpu_a, self_a) = (proc_cpu_ticks(pid)?, proc_cpu_ticks_self()?);
    let w0 = Instant::now();
    let mut rss_max_kib = 0;
    while w0.elapsed() < args.window {
        tokio::time::sleep(Duration::from_secs(1).min(args.window)).await;
        rss_max_kib = rss_max_kib.max(status_kib(pid, "VmRSS")?);
    }
    let secs = w0.elapsed().as_secs_f64();
    let (cpu_b, self_b) = (proc_cpu_ticks(pid)?, proc_cpu_ticks_self()?);
    consumer.send("end").await?;
    let (sent1, bytes1) = (shared.c.sent(), shared.c.bytes_sent.load(Ordering::Relaxed));
    let by_kind1 = kinds(&shared.c);
    let rss_kib = status_kib(pid, "VmRSS")?;
    let hwm_kib = status_kib(pid, "VmHWM")?;
    let pss_kib = pss_kib(pid).unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    let fd_limit = open_files_limit(&pid.to_string())?;
    let reads = readers.await??;

    // 5. Stop publishing; wait until every link has its messages acknowledged, then until the
    //    subscribers have everything (or nothing more comes for 5 s).
    shared.stop.cancel();
    let mut links = Vec::with_capacity(tasks.len());
    for t in tasks {
        links.push(t.await??);
    }
    let drain_deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pending: usize = links
            .iter()
            .map(|l| {
                let s = l.state();
                s.queued + s.in_flight
            })
            .sum();
        if pending == 0 {
            break;
        }
        if Instant::now() > drain_deadline {
            bail!("{pending} messages still unacknowledged after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (mut coalesced, mut dropped, mut connects, mut errors) = (0, 0, 0, 0);
    for l in &links {
        let s = l.state();
        coalesced += s.coalesced;
        dropped += s.dropped;
        connects += s.connects;
        errors += s.errors;
    }
    let c = &shared.c;
    let want_status = c.status_sent.load(Ordering::Relaxed) - coalesced;
    let want_last = c.last_job_sent.load(Ordering::Relaxed);
    let want_output = c.output_sut_sent.load(Ordering::Relaxed);
    let want_lines = c.output_sut_lines.load(Ordering::Relaxed);
    let consumed = consumer
        .finish(&format!("finish {want_status} {want_last} {want_output}"))
        .await?;
    let model = model::lab(&profile, args.agents, args.busy_share);
    let cpu_share = (cpu_b - cpu_a) as f64 / tck / secs;
    let self_share = (self_b - self_a) as f64 / tck / secs;
    let mut read_ms: Vec<u64> = reads.iter().map(|(ms, _)| *ms).collect();
    read_ms.sort_unstable();
    let out = json!({
        "agents": args.agents,
        "hosts": args.hosts,
        "busy_agents": busy,
        "acl": !args.no_acl,
        "window_s": secs,
        "profile": {
            "heartbeat_s": profile.heartbeat.as_secs_f64(),
            "lines_per_sec": profile.lines_per_sec,
            "line_bytes": profile.line_bytes,
            "job_s": profile.job.as_secs_f64(),
            "lines_per_batch": model::lines_per_batch(profile.lines_per_sec, profile.line_bytes),
        },
        "model_msgs_per_s": {"status": model.status, "output": model.output, "job": model.job,
                             "total": model.total()},
        "passwd_file_s": passwd_secs,
        "connect_storm_s": storm.as_secs_f64(),
        "connect_storm_cpu_s": storm_cpu,
        "mosquitto": {
            "cpu_share_of_one_core": cpu_share,
            "rss_kib": rss_kib,
            "rss_max_kib": rss_max_kib.max(rss_kib),
            "hwm_kib": hwm_kib,
            "pss_kib": pss_kib,
            "open_files": fds,
            "open_files_limit": fd_limit,
        },
        "load_tool_cpu_share": self_share,
        "msgs_in_per_s": (sent1 - sent0) as f64 / secs,
        "msgs_out_per_s": consumed["window_msgs"].as_f64().unwrap_or(0.0)
            / consumed["window_s"].as_f64().unwrap_or(f64::NAN),
        "bytes_in_per_s": (bytes1 - bytes0) as f64 / secs,
        "in_by_kind_per_s": {
            "status": (by_kind1[0] - by_kind0[0]) as f64 / secs,
            "output": (by_kind1[1] - by_kind0[1]) as f64 / secs,
            "job": (by_kind1[2] - by_kind0[2]) as f64 / secs,
        },
        "status_latency_ms": consumed["status_latency_ms"],
        "status_reads": reads.iter().map(|(ms, n)| json!({"ms": ms, "statuses": n})).collect::<Vec<_>>(),
        // Unique live deliveries against what the agents' links had acknowledged (statuses,
        // last jobs) or sent (output, less what their links dropped); retained re-deliveries
        // and duplicates apart.
        "delivery": {
            "status": consumed["status"],
            "status_coalesced": coalesced,
            "last_job": consumed["last_job"],
            "output": consumed["output"],
            "output_sent": want_output,
            "output_dropped_by_link": dropped,
            "output_lines": {"sent": want_lines, "received": consumed["output_lines_received"]},
        },
        "consumer_process_cpu_share": consumed["cpu_share_of_one_core"],
        "subscribers": consumed["subscribers"],
        "link_connects": connects,
        "link_errors": errors,
    });
    println!("{out}");
    drop(links);
    stop_mosquitto(&mut broker).await;
    Ok(())
}

fn kinds(c: &Counters) -> [u64; 3] {
    [
        c.status_sent.load(Ordering::Relaxed),
        c.output_sent.load(Ordering::Relaxed),
        c.job_sent.load(Ordering::Relaxed) + c.last_job_sent.load(Ordering::Relaxed),
    ]
}

fn options(s: &Shared, client_id: &str, host: &str, login: (&str, &str)) -> LinkOptions {
    let mut o = LinkOptions::new(client_id, host, s.port);
    if !s.no_acl {
        o.username = Some(login.0.to_owned());
        o.password = Some(login.1.to_owned());
    }
    o.max_packet_size = MAX_PACKET_SIZE;
    o
}

/// The consumers' process (`--consume`, see `consume.rs`): this binary again.
struct Consumer {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Consumer {
    /// Starts it and waits until both its clients are subscribed.
    async fn start(
        port: u16,
        no_acl: bool,
        sup_password: &str,
        local_password: &str,
    ) -> Result<Self> {
        use tokio::io::AsyncBufReadExt;
        let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
        cmd.arg("--consume").arg("--port").arg(port.to_string());
        if no_acl {
            cmd.arg("--no-acl");
        }
        let mut child = cmd
            .env(consume::SUPERVISOR_PASSWORD_ENV, sup_password)
            .env(consume::LOCAL_PASSWORD_ENV, local_password)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the consumers' process")?;
        let stdin = child.stdin.take().context("stdin")?;
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
        let ready = tokio::time::timeout(Duration::from_secs(15), stdout.next_line())
            .await
            .context("the consumers' process was not ready within 15 s")??;
        if ready.as_deref() != Some("ready") {
            bail!("the consumers' process said {ready:?}, not `ready`");
        }
        Ok(Consumer {
            child,
            stdin,
            stdout,
        })
    }

    async fn send(&mut self, line: &str) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        self.stdin.write_all(format!("{line}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// Sends `finish ...` and returns its report.
    async fn finish(mut self, line: &str) -> Result<serde_json::Value> {
        self.send(line).await?;
        let report = tokio::time::timeout(Duration::from_secs(120), self.stdout.next_line())
            .await
            .context("no report from the consumers' process within 120 s")??
            .context("the consumers' process ended without a report")?;
        let st = self.child.wait().await?;
        if !st.success() {
            bail!("the consumers' process failed: {st}");
        }
        Ok(serde_json::from_str(&report)?)
    }
}

/// mosquitto's log, each distinct line once with its count (a full broker repeats its error
/// per refused connection).
fn log_summary(log: &str) -> String {
    let mut seen: Vec<(String, u64)> = Vec::new();
    for line in log.lines() {
        // Drop the leading timestamp ("1764700000: ...").
        let text = line
            .split_once(": ")
            .filter(|(t, _)| t.chars().all(|c| c.is_ascii_digit()))
            .map_or(line, |(_, rest)| rest);
        match seen.iter_mut().find(|(l, _)| l == text) {
            Some((_, n)) => *n += 1,
            None => seen.push((text.to_owned(), 1)),
        }
    }
    seen.iter()
        .map(|(l, n)| format!("{n} x {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every 20 s of the window, a client reads every retained status as `labvisor status` does:
/// (ms until every agent's status came, statuses seen).
async fn status_readers(
    s: Arc<Shared>,
    password: String,
    window: Duration,
) -> Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let t0 = Instant::now();
    let mut k = 0;
    loop {
        let started = Instant::now();
        let o = options(
            &s,
            &format!("labvisor-status-bench-{k}"),
            "127.0.0.1",
            (LOCAL_USER, &password),
        );
        let (link, mut incoming) = MqttLink::start(o)?;
        let t = &s.topics;
        for f in [
            t.agents_filter(),
            t.last_jobs_filter(),
            t.sut_views_filter(),
            t.supervisor_status_filter(),
        ] {
            link.subscribe(f, QoS::AtMostOnce)?;
        }
        let mut seen = std::collections::HashSet::new();
        let until = Instant::now() + Duration::from_secs(10);
        while seen.len() < s.agents && Instant::now() < until {
            match tokio::time::timeout_at(until.into(), incoming.recv()).await {
                Ok(Some(m))
                    if m.retain && matches!(t.parse(&m.topic), Some((_, SutTopic::Agent))) =>
                {
                    seen.insert(m.topic);
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        out.push((started.elapsed().as_millis() as u64, seen.len() as u64));
        let _ = link.shutdown(Vec::new(), Duration::from_secs(2)).await;
        k += 1;
        let next = Duration::from_secs(20) * k;
        if next + Duration::from_secs(5) >= window {
            break;
        }
        tokio::time::sleep_until((t0 + next).into()).await;
    }
    Ok(out)
}

/// One agent: connects as its SUT (the agent's link options), publishes its birth, then its
/// heartbeat and, when busy, jobs back to back with their output, until `stop`. Returns its link,
/// so the caller can wait for its acknowledgements.
async fn agent(a: AgentSpec, s: Arc<Shared>) -> Result<MqttLink> {
    let t = &s.topics;
    let p = &s.profile;
    let boot = random_id();
    let mut o = options(
        &s,
        &format!("labvisor-agent-{}", a.sut),
        AGENT_HOST,
        (a.sut.as_str(), &a.password),
    );
    o.will = Some(Message::state(
        t.agent(&a.sut),
        model::will(&a.sut, &boot, now_ms()),
    ));
    o.manual_acks = true;
    o.clean_start = false;
    o.session_expiry = Some(Duration::from_secs(7 * 24 * 3600));
    o.receive_maximum = Some(16);
    let (link, mut incoming) = MqttLink::start(o)?;
    link.subscribe_as_published(t.submit(&a.sut), QoS::AtLeastOnce)?;
    link.subscribe_as_published(t.cancel(&a.sut), QoS::AtLeastOnce)?;
    link.subscribe_as_published(t.admin(&a.sut), QoS::AtLeastOnce)?;
    tokio::spawn(async move { while incoming.recv().await.is_some() {} });
    let mut st = link.watch_state();
    while !st.borrow_and_update().connected {
        st.changed().await?;
    }
    s.c.connected.fetch_add(1, Ordering::Relaxed);
    let mut seq = 0;
    let status = |seq: &mut u64, job: Option<&JobId>| {
        let body = model::status(&a.sut, &boot, *seq, now_ms(), job);
        *seq += 1;
        s.c.status_sent.fetch_add(1, Ordering::Relaxed);
        s.c.bytes_sent
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        let _ = link.set_sticky(t.agent(&a.sut), body);
    };
    status(&mut seq, None);
    let mut start = s.start.clone();
    while !*start.borrow_and_update() {
        start.changed().await?;
    }
    // Heartbeats spread evenly over one period; first jobs end spread over one job length.
    let frac = a.index as f64 / s.agents as f64;
    let mut beat = tokio::time::interval_at(
        tokio::time::Instant::now() + p.heartbeat.mul_f64(frac),
        p.heartbeat,
    );
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let gap = model::batch_interval(p);
    let lines = model::lines_per_batch(p.lines_per_sec, p.line_bytes);
    let mut first_job = true;
    // Output messages on each topic, from 0 for the agent's run (as `OutputMeta::seq`).
    let mut n = 0u64;
    loop {
        let job = a.busy.then(new_job_id);
        let job_end = tokio::time::Instant::now()
            + if first_job {
                p.job.mul_f64(frac.max(0.05))
            } else {
                p.job
            };
        first_job = false;
        let mut out_tick = tokio::time::interval(gap);
        let (t_start, mut job_bytes) = (now_ms(), 0u64);
        if let Some(id) = &job {
            let [queued, running, _] = model::job_statuses(&a.sut, id, t_start, t_start, 0);
            publish(
                &s,
                &link,
                t.submit_status(&a.sut),
                model::submit_ack(&a.sut, id, t_start),
            );
            publish(&s, &link, t.job(&a.sut, id), queued);
            status(&mut seq, Some(id));
            publish(&s, &link, t.job(&a.sut, id), running);
        }
        loop {
            tokio::select! {
                _ = s.stop.cancelled() => return Ok(link.clone()),
                _ = beat.tick() => status(&mut seq, job.as_ref()),
                _ = out_tick.tick(), if job.is_some() => {
                    let id = job.as_ref().expect("guarded");
                    let text = model::output_batch(lines, p.line_bytes, n);
                    for topic in [t.output(&a.sut), t.job_output(&a.sut, id)] {
                        let sut_topic = !topic.contains("/jobs/");
                        let m = Message::event(topic, text.clone().into_bytes())
                            .with_properties(model::output_meta(n, &boot));
                        s.c.output_sent.fetch_add(1, Ordering::Relaxed);
                        if sut_topic {
                            s.c.output_sut_sent.fetch_add(1, Ordering::Relaxed);
                            s.c.output_sut_lines.fetch_add(lines, Ordering::Relaxed);
                        }
                        s.c.bytes_sent.fetch_add(text.len() as u64, Ordering::Relaxed);
                        let _ = link.publish_output(m);
                    }
                    job_bytes += text.len() as u64;
                    n += 1;
                }
                _ = tokio::time::sleep_until(job_end), if job.is_some() => break,
            }
        }
        if let Some(id) = &job {
            let [_, _, done] = model::job_statuses(&a.sut, id, t_start, now_ms(), job_bytes);
            publish(&s, &link, t.job(&a.sut, id), done.clone());
            s.c.last_job_sent.fetch_add(1, Ordering::Relaxed);
            s.c.bytes_sent
                .fetch_add(done.len() as u64, Ordering::Relaxed);
            let _ = link.publish_sticky(t.last_job(&a.sut), done);
            status(&mut seq, None);
        }
    }
}

/// A retained QoS 1 job message.
fn publish(s: &Shared, link: &MqttLink, topic: String, body: Vec<u8>) {
    s.c.job_sent.fetch_add(1, Ordering::Relaxed);
    s.c.bytes_sent
        .fetch_add(body.len() as u64, Ordering::Relaxed);
    let _ = link.publish(Message::state(topic, body));
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The password file (every login, hashed by `mosquitto_passwd -U` as `-b` hashes them one by
/// one in the managed broker), the ACL and `mosquitto.conf`; handed to mosquitto's user when
/// run as root, as the managed broker does. Returns the config's path.
fn write_broker_files(
    dir: &Path,
    args: &Args,
    port: u16,
    topics: &Topics,
    specs: &[AgentSpec],
    sup_password: &str,
    local_password: &str,
) -> Result<PathBuf> {
    let conf = dir.join("mosquitto.conf");
    if args.no_acl {
        std::fs::write(
            &conf,
            format!(
                "per_listener_settings true\npersistence true\npersistence_location {}/\n\
                 autosave_interval 5\nautosave_on_changes false\nlog_dest stderr\n\
                 log_type error\nlog_type warning\nmax_packet_size {MAX_PACKET_SIZE}\n\
                 set_tcp_nodelay true\nmax_queued_messages 10000\n\
                 listener {port} 127.0.0.1\nallow_anonymous true\n\
                 listener {port} {AGENT_HOST}\nallow_anonymous true\n",
                dir.display()
            ),
        )?;
    } else {
        let passwd = dir.join("passwd");
        let mut text = String::new();
        for a in specs {
            text.push_str(&format!("{}:{}\n", a.sut, a.password));
        }
        text.push_str(&format!("{SUPERVISOR_USER}:{sup_password}\n"));
        text.push_str(&format!("{LOCAL_USER}:{local_password}\n"));
        std::fs::write(&passwd, text)?;
        let st = std::process::Command::new(&args.mosquitto_passwd)
            .arg("-U")
            .arg(&passwd)
            .status()
            .with_context(|| format!("running {}", args.mosquitto_passwd.display()))?;
        if !st.success() {
            bail!("mosquitto_passwd -U failed: {st}");
        }
        let acl = dir.join("acl");
        std::fs::write(&acl, managed_acl(topics))?;
        let gateway = AGENT_HOST.parse().expect("an address");
        std::fs::write(
            &conf,
            mosquitto_conf(dir, (port, gateway), (&passwd, &acl), None),
        )?;
    }
    hand_to_mosquitto(dir)?;
    Ok(conf)
}

/// As root, mosquitto drops to its own user: give it the directory.
fn hand_to_mosquitto(dir: &Path) -> Result<()> {
    if !std::fs::read_to_string("/proc/self/status")?
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
    {
        return Ok(());
    }
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    let Some((uid, gid)) = passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&"mosquitto") && f.len() > 3)
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .flatten()
    }) else {
        return Ok(());
    };
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
    for e in std::fs::read_dir(dir)? {
        std::os::unix::fs::chown(e?.path(), Some(uid), Some(gid))?;
    }
    Ok(())
}

/// Starts mosquitto with its soft open-files limit raised to the hard one (or set to
/// `nofile`), and waits until it listens.
async fn start_mosquitto(
    bin: &Path,
    conf: &Path,
    (dir, port): (&Path, u16),
    nofile: Option<u64>,
) -> Result<tokio::process::Child> {
    let log = std::fs::File::create(dir.join("mosquitto.log"))?;
    let limit = nofile.map_or_else(|| "\"$(ulimit -Hn)\"".to_owned(), |n| n.to_string());
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n {limit} && exec \"$0\" -c \"$1\""))
        .arg(bin)
        .arg(conf)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting mosquitto")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = child.try_wait()? {
            let log = std::fs::read_to_string(dir.join("mosquitto.log")).unwrap_or_default();
            bail!("mosquitto exited ({st}): {log}");
        }
        let a = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
        let b = tokio::net::TcpStream::connect((AGENT_HOST, port)).await;
        if a.is_ok() && b.is_ok() {
            return Ok(child);
        }
        if Instant::now() > deadline {
            bail!("mosquitto did not listen on port {port} within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn stop_mosquitto(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

fn clock_ticks() -> Result<f64> {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// utime + stime of a process, in clock ticks.
fn proc_cpu_ticks(pid: u32) -> Result<u64> {
    stat_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat"))?)
}

fn proc_cpu_ticks_self() -> Result<u64> {
    stat_ticks(&std::fs::read_to_string("/proc/self/stat")?)
}

fn stat_ticks(stat: &str) -> Result<u64> {
    // Fields after the command's closing parenthesis: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find(|l| l.starts_with(&format!("{key}:")))
        .and_then(|l| l.split_whitespace().nth(1))
        .context("no such key")?
        .parse()
        .map_err(Into::into)
}

fn pss_kib(pid: u32) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    text.lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .context("no Pss")?
        .parse()
        .map_err(Into::into)
}

/// The soft "Max open files" of a process (`self` or a pid).
fn open_files_limit(pid: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no open files limit")?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()
        .context("limit")?;
    Ok(if soft == "unlimited" {
        u64::MAX
    } else {
        soft.parse()?
    })
}
