//! The agent's main loop: one task that supervises the device process, pumps the heartbeat and
//! drives shutdown.
//!
//! The heartbeat comes from this loop, not from an independent timer: every tick it looks at the
//! child, the output sinks and the broker link, renders an [`AgentStatus`], writes the heartbeat
//! file and publishes the status. If this loop hangs, the heartbeat goes stale and the
//! healthcheck says so; if the output pump is stuck in a write, the state says `stalled`. (The old
//! stack sent "ok" from a timer thread while the agent was dead.)

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use labvisor_mqtt::{LinkOptions, Message, MqttLink, QoS};
use labvisor_protocol::config::{OnChildExit, ProbeTarget, SutConfig};
use labvisor_protocol::heartbeat;
use labvisor_protocol::payloads::{
    now_ms, random_id, rfc3339, AgentState, AgentStatus, ChildStatus, ProbeResult, VERSION,
};
use labvisor_protocol::topics::{SutTopic, Topics};
use labvisor_protocol::MAX_PACKET_SIZE;
use nix::sys::signal::Signal;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::child::{self, Backoff, Exit, Running, Spec};
use crate::logfile::RotatingFile;
use crate::output::{self, Sinks, Source};
use crate::publish;
use crate::runner::JobRunner;
use crate::tail::{self, TailErrors, Tailer};
use crate::tap::Tap;

/// How long the broker keeps the agent's session (and the submissions sent to it) while the
/// agent is gone.
pub const SESSION_EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);
/// Output bytes waiting for the batcher before chunks are dropped.
pub const TAP_BYTES: usize = 4 * 1024 * 1024;
/// MQTT 5 receive maximum of the agent's connection: submissions and cancels the broker sends
/// before the agent has answered (and acknowledged) the earlier ones. The broker holds the rest;
/// the agent stops taking them while its outbox of answers is full (see the link's
/// "Back-pressure").
pub const RECEIVE_MAXIMUM: u16 = 16;

/// Everything the agent needs to run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The SUT's validated config.
    pub config: SutConfig,
    /// The broker; `None` runs without MQTT (output still reaches stdout and the file).
    pub broker: Option<LinkOptions>,
    /// Topic builder (with the optional prefix).
    pub topics: Topics,
    /// The SUT's volume: `log/<sut>.log` and, later, the job queue.
    pub data_dir: PathBuf,
    /// Where the heartbeat file goes.
    pub heartbeat_file: PathBuf,
    /// Grace period between TERM and KILL when stopping; keep it under Docker's stop timeout.
    pub grace: Duration,
    /// Whether output is copied to the agent's stdout (the container's log).
    pub stdout: bool,
}

/// Requests from outside the loop (signals, tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Stop: TERM the device process, grace, KILL; flush; publish offline; return.
    Stop,
    /// Forward a signal to the device process's group.
    Forward(Signal),
}

/// How the agent ended; maps to the process exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Stopped on request; the device process ended within the grace period.
    Stopped,
    /// Stopped on request; the device process had to be killed after the grace period.
    Killed,
    /// The device process exited and `on_child_exit = "exit"`.
    ChildExited(Exit),
}

impl Outcome {
    /// The agent's exit status: 0 stopped, 3 killed after the grace period, 4 the device process
    /// exited under `on_child_exit = "exit"`. (1 is an internal error, 2 a bad config or usage.)
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Stopped => 0,
            Outcome::Killed => 3,
            Outcome::ChildExited(_) => 4,
        }
    }
}

/// Errors that stop the agent before it runs.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The data directory or log file cannot be created.
    #[error("cannot open the log file {path}: {source}")]
    LogFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The broker link could not start.
    #[error("cannot start the MQTT link: {0}")]
    Link(#[from] labvisor_mqtt::LinkError),
    /// A subscription was refused by the link.
    #[error("cannot subscribe: {0}")]
    Subscribe(#[from] labvisor_mqtt::PublishError),
    /// The job journal cannot be opened.
    #[error("cannot open the job journal in {path}: {source}")]
    Jobs {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// What the loop knows about the device process.
struct ChildState {
    spec: Option<Spec>,
    running: Option<Running>,
    next_start: Option<tokio::time::Instant>,
    backoff: Backoff,
    restarts: u64,
    last_exit: Option<String>,
    crash_detail: Option<String>,
}

/// Runs the agent until `control` says stop (or the device process exits under
/// `on_child_exit = "exit"`).
pub async fn run(
    settings: Settings,
    mut control: mpsc::Receiver<Control>,
) -> Result<Outcome, AgentError> {
    let cfg = &settings.config;
    let sut = cfg.name.clone();
    let boot_id = random_id();
    let log_path = settings
        .data_dir
        .join("log")
        .join(format!("{}.log", cfg.name));
    let file = RotatingFile::open(&log_path, cfg.log.max_size.get(), cfg.log.keep.get()).map_err(
        |source| AgentError::LogFile {
            path: log_path.clone(),
            source,
        },
    )?;
    let (tap, tap_rx) = Tap::with_rate(TAP_BYTES, Some(cfg.log.mqtt_rate()));
    let sinks = Arc::new(Sinks::new(settings.stdout, Some(file), tap.clone()));
    if let Some(dir) = settings.heartbeat_file.parent() {
        let _ = std::fs::create_dir_all(dir);
    }

    // The broker link: last will = retained "lost" status.
    let drops = Arc::new(publish::Drops::default());
    let (link, mut incoming) = match &settings.broker {
        Some(opts) => {
            let mut opts = opts.clone();
            let lost = status_payload(&AgentStatus {
                state: AgentState::Lost,
                broker_connected: false,
                ..base_status(&settings, &boot_id)
            });
            opts.will = Some(Message::state(settings.topics.agent(&sut), lost));
            // Submissions are acknowledged to the broker only once they are on disk, and a
            // persistent session keeps the ones sent while the agent is down.
            opts.manual_acks = true;
            opts.clean_start = false;
            opts.session_expiry = Some(SESSION_EXPIRY);
            opts.receive_maximum = Some(RECEIVE_MAXIMUM);
            // Every packet a labvisor broker accepts must reach the agent, which answers it
            // (a submission over max_payload is rejected with the reason): a smaller maximum
            // makes an MQTT 5 broker drop larger submissions without a word.
            opts.max_packet_size = MAX_PACKET_SIZE;
            // Only output is ever dropped; the batcher counts its lines.
            opts.on_drop = Some(drops.hook());
            let (link, incoming) = MqttLink::start(opts)?;
            // Retain-as-published: a job or cancel published retained is seen as such, and
            // refused (it would run again at every restart), also when the agent was online.
            link.subscribe_as_published(settings.topics.submit(&sut), QoS::AtLeastOnce)?;
            link.subscribe_as_published(settings.topics.cancel(&sut), QoS::AtLeastOnce)?;
            (Some(link), Some(incoming))
        }
        None => (None, None),
    };
    let mut jobs = JobRunner::open(
        Arc::new(cfg.clone()),
        &settings.data_dir,
        settings.topics.clone(),
        link.clone(),
        settings.grace,
    )
    .map_err(|source| AgentError::Jobs {
        path: settings.data_dir.join("jobs"),
        source,
    })?;
    let batcher = tokio::spawn(publish::run(
        tap_rx,
        link.clone(),
        settings.broker.as_ref().map_or(1, |o| o.queue_capacity),
        settings.topics.clone(),
        sut.clone(),
        boot_id.clone(),
        tap.dropped_counter(),
        drops,
    ));

    // Tail thread and probe task.
    let tail_stop = Arc::new(AtomicBool::new(false));
    let mut tail_errors: Option<TailErrors> = None;
    let tail_thread = if cfg.tail.is_empty() {
        None
    } else {
        let t = Tailer::new(cfg.tail.clone());
        tail_errors = Some(t.errors());
        tail::spawn(t, sinks.clone(), tail_stop.clone()).ok()
    };
    let idle_flusher = output::spawn_idle_flusher(sinks.clone(), tail_stop.clone()).ok();
    let probe_task = match (&cfg.probe, &link) {
        (Some(p), Some(link)) => Some(tokio::spawn(run_probe(
            p.url.clone(),
            p.interval,
            p.timeout,
            link.clone(),
            settings.topics.probe(&sut),
            sut.clone(),
        ))),
        _ => None,
    };

    let mut ch = ChildState {
        spec: cfg.command.clone().map(|argv| Spec {
            argv,
            env: cfg.env.clone(),
            cwd: None,
        }),
        running: None,
        next_start: Some(tokio::time::Instant::now()),
        backoff: Backoff::new(
            cfg.restart.backoff_min,
            cfg.restart.backoff_max,
            cfg.restart.crash_loop_after.get(),
        ),
        restarts: 0,
        last_exit: None,
        crash_detail: None,
    };
    if ch.spec.is_none() {
        ch.next_start = None;
    }
    let pid1 = std::process::id() == 1;
    if pid1 {
        info!(sut = %sut, "Running as PID 1: orphaned processes are reaped by the agent.");
    }
    let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()).ok();

    let mut seq: u64 = 0;
    let mut ticker = tokio::time::interval(cfg.health.heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stall_after = cfg.health.max_age / 2;
    let mut state = AgentState::Starting;

    let reporter = Reporter {
        settings: &settings,
        link: &link,
        sinks: &sinks,
        tap: &tap,
        tail_errors: &tail_errors,
        boot_id: &boot_id,
    };
    // Back-pressure: while the outbox of answers is full, submissions stay with the broker.
    let mut room_rx = link.as_ref().map(|l| l.watch_room());
    let outcome = loop {
        jobs.start_next(&sinks);
        let next_start = ch.next_start;
        let job_check = jobs.next_check();
        let room = room_rx.as_mut().is_none_or(|r| *r.borrow_and_update());
        tokio::select! {
            _ = ticker.tick() => {}
            changed = async { room_rx.as_mut().expect("guarded").changed().await }, if !room && room_rx.is_some() => {
                if changed.is_err() {
                    room_rx = None;
                }
                continue;
            }
            msg = async { incoming.as_mut().expect("guarded").recv().await }, if incoming.is_some() && room => {
                match msg {
                    Some(r) => match settings.topics.parse(&r.topic) {
                        Some((_, SutTopic::Submit)) => jobs.on_submit(&r),
                        Some((_, SutTopic::Cancel)) => jobs.on_cancel(&r),
                        _ => {
                            if let Some(l) = &link {
                                let _ = l.ack(&r);
                            }
                        }
                    },
                    None => incoming = None,
                }
            }
            exit = jobs.wait() => jobs.on_exit(exit).await,
            _ = async { tokio::time::sleep_until(job_check.expect("guarded")).await }, if job_check.is_some() => {
                jobs.check_limits();
            }
            exit = async { ch.running.as_mut().expect("guarded").wait().await }, if ch.running.is_some() => {
                let mut run = ch.running.take().expect("guarded");
                let ran = run.started().elapsed();
                // Let the pump finish the pipe (a grandchild holding it open is left to its pump).
                let _ = run.drain(Duration::from_millis(500)).await;
                ch.last_exit = Some(exit.describe());
                if cfg.restart.on_child_exit == OnChildExit::Exit {
                    agent_line(&sinks, &format!("device process ended ({}) after {:.1}s; on_child_exit = \"exit\": the agent exits", exit.describe(), ran.as_secs_f64()));
                    break Outcome::ChildExited(exit);
                }
                let delay = ch.backoff.on_exit(ran);
                ch.crash_detail = ch.backoff.crash_loop().then(|| format!(
                    "device process failed {} times in a row, last {}", ch.backoff.quick_failures(), exit.describe()));
                agent_line(&sinks, &format!("device process ended ({}) after {:.1}s; restarting in {:.1}s", exit.describe(), ran.as_secs_f64(), delay.as_secs_f64()));
                ch.next_start = Some(tokio::time::Instant::now() + delay);
            }
            _ = async { tokio::time::sleep_until(next_start.expect("guarded")).await }, if next_start.is_some() && ch.running.is_none() => {
                ch.next_start = None;
                let spec = ch.spec.as_ref().expect("only scheduled with a command");
                match child::spawn(spec, sinks.clone(), Source::Device) {
                    Ok(run) => {
                        if ch.last_exit.is_some() {
                            ch.restarts += 1;
                        }
                        info!(sut = %sut, pid = run.pid(), "Device process started.");
                        ch.running = Some(run);
                    }
                    Err(e) => {
                        let delay = ch.backoff.on_exit(Duration::ZERO);
                        ch.last_exit = Some(format!("cannot start {:?}: {e}", spec.argv[0]));
                        ch.crash_detail = ch.backoff.crash_loop().then(|| ch.last_exit.clone().unwrap_or_default());
                        agent_line(&sinks, &format!("cannot start the device process {:?}: {e}; retrying in {:.1}s", spec.argv, delay.as_secs_f64()));
                        ch.next_start = Some(tokio::time::Instant::now() + delay);
                    }
                }
            }
            _ = async { sigchld.as_mut().expect("guarded").recv().await }, if pid1 && sigchld.is_some() => {
                let ours: Vec<u32> = ch.running.iter().map(|r| r.pid()).collect();
                child::reap_orphans(&ours);
                continue;
            }
            ctl = control.recv() => match ctl {
                Some(Control::Forward(sig)) => {
                    if let Some(r) = &ch.running {
                        r.signal(sig);
                    }
                    continue;
                }
                Some(Control::Stop) | None => break Outcome::Stopped,
            },
        }
        // Every pass through the loop refreshes the status; the ticker guarantees one at least
        // every `heartbeat`.
        state = derive_state(&ch, &sinks, stall_after, jobs.running().is_some());
        publish_status(&reporter, &ch, &jobs, seq, state);
        seq += 1;
    };

    // Stop: the status says so first, then the device process gets TERM, grace, KILL.
    let _ = state;
    publish_status(&reporter, &ch, &jobs, seq, AgentState::Stopping);
    let mut outcome = outcome;
    // The device process and a running job stop side by side, within one grace period.
    let grace = settings.grace;
    let stop_child = async {
        match ch.running.take() {
            Some(mut run) => {
                let (exit, killed) = run.stop(grace).await;
                let _ = run.drain(Duration::from_millis(500)).await;
                Some((exit, killed))
            }
            None => None,
        }
    };
    let (stopped, ()) = tokio::join!(stop_child, jobs.stop());
    if let Some((exit, killed)) = stopped {
        ch.last_exit = Some(exit.describe());
        if killed && outcome == Outcome::Stopped {
            outcome = Outcome::Killed;
        }
    }
    tail_stop.store(true, Ordering::Relaxed);
    if let Some(t) = tail_thread {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    if let Some(t) = idle_flusher {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    // Whatever a source still holds (an incomplete last line) goes out before the end.
    sinks.flush_idle(Duration::ZERO);
    if let Some(p) = probe_task {
        p.abort();
    }
    // The batcher takes the last output and ends; then MQTT is flushed.
    tap.close();
    drop(tap);
    let _ = tokio::time::timeout(Duration::from_secs(2), batcher).await;
    sinks.sync();
    let offline = AgentStatus {
        state: AgentState::Offline,
        seq: seq + 1,
        child: child_status(&ch),
        ..base_status(&settings, &boot_id)
    };
    let _ = heartbeat::write_atomic(
        &settings.heartbeat_file,
        &heartbeat::render(&offline, settings.config.health.max_age),
    );
    if let Some(link) = link {
        let msg = Message::state(settings.topics.agent(&sut), status_payload(&offline));
        let _ = link.shutdown(vec![msg], Duration::from_secs(2)).await;
    }
    info!(sut = %sut, outcome = ?outcome, "Agent stopped.");
    Ok(outcome)
}

fn derive_state(ch: &ChildState, sinks: &Sinks, stall_after: Duration, busy: bool) -> AgentState {
    if sinks.blocked_for().is_some_and(|d| d >= stall_after) {
        return AgentState::Stalled;
    }
    if ch.backoff.crash_loop() && ch.running.is_none() {
        return AgentState::CrashLoop;
    }
    if busy {
        return AgentState::Busy;
    }
    if ch.spec.is_none() {
        return AgentState::Idle;
    }
    if ch.running.is_some() {
        // A long enough run clears the crash-loop; until then it stays visible.
        if ch.backoff.crash_loop()
            && ch
                .running
                .as_ref()
                .is_some_and(|r| r.started().elapsed() < ch.backoff.quick)
        {
            return AgentState::CrashLoop;
        }
        return AgentState::Idle;
    }
    if ch.backoff.crash_loop() {
        AgentState::CrashLoop
    } else if ch.last_exit.is_some() {
        AgentState::Restarting
    } else {
        AgentState::Starting
    }
}

fn base_status(settings: &Settings, boot_id: &str) -> AgentStatus {
    let t = now_ms();
    AgentStatus {
        v: VERSION,
        sut: settings.config.name.clone(),
        state: AgentState::Starting,
        time_ms: t,
        time: rfc3339(t),
        seq: 0,
        boot_id: boot_id.to_owned(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        child: None,
        job: None,
        queue_len: 0,
        broker_connected: false,
        output_dropped: 0,
        detail: None,
    }
}

fn child_status(ch: &ChildState) -> Option<ChildStatus> {
    ch.spec.as_ref()?;
    Some(ChildStatus {
        pid: ch.running.as_ref().map(|r| r.pid()),
        alive: ch.running.is_some(),
        restarts: ch.restarts,
        last_exit: ch.last_exit.clone(),
    })
}

fn status_payload(st: &AgentStatus) -> Bytes {
    Bytes::from(serde_json::to_vec(st).expect("status serialises"))
}

/// What every status report reads besides the child and the jobs.
struct Reporter<'a> {
    settings: &'a Settings,
    link: &'a Option<MqttLink>,
    sinks: &'a Sinks,
    tap: &'a Tap,
    tail_errors: &'a Option<TailErrors>,
    boot_id: &'a str,
}

/// Writes the heartbeat file and publishes the same status on `<sut>/agent`.
fn publish_status(
    r: &Reporter<'_>,
    ch: &ChildState,
    jobs: &JobRunner,
    seq: u64,
    state: AgentState,
) {
    let Reporter {
        settings,
        link,
        sinks,
        tap,
        tail_errors,
        boot_id,
    } = *r;
    let link_state = link.as_ref().map(|l| l.state());
    let mut details = Vec::new();
    if let Some(d) = &ch.crash_detail {
        if state == AgentState::CrashLoop {
            details.push(d.clone());
        }
    }
    if state == AgentState::Stalled {
        if let Some(b) = sinks.blocked_for() {
            details.push(format!(
                "writing output has been blocked for {:.0}s (disk full, or stdout not drained)",
                b.as_secs_f64()
            ));
        }
    }
    if let Some(e) = sinks.error() {
        details.push(e);
    }
    if let Some(errs) = tail_errors {
        details.extend(
            errs.lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned(),
        );
    }
    let status = AgentStatus {
        state,
        seq,
        child: child_status(ch),
        job: jobs.running().cloned(),
        queue_len: jobs.queue_len() as u64,
        broker_connected: link_state.as_ref().is_some_and(|s| s.connected),
        output_dropped: tap.dropped(),
        detail: (!details.is_empty()).then(|| details.join("; ")),
        ..base_status(settings, boot_id)
    };
    if let Err(e) = heartbeat::write_atomic(
        &settings.heartbeat_file,
        &heartbeat::render(&status, settings.config.health.max_age),
    ) {
        warn!(sut = %status.sut, error = %e, "Cannot write the heartbeat file.");
    }
    if let Some(link) = link {
        let _ = link.set_sticky(settings.topics.agent(&status.sut), status_payload(&status));
    }
}

/// Writes a line from the agent itself into the output (file, stdout, MQTT).
fn agent_line(sinks: &Sinks, text: &str) {
    let line = format!("[labvisor-agent] {text}\n");
    sinks.write(&Source::Agent, line.as_bytes());
}

/// The optional upstream probe (the old stack's `c3` check): a TCP connect or an HTTP GET every
/// `interval`, its result retained on `<sut>/probe`.
async fn run_probe(
    target: ProbeTarget,
    interval: Duration,
    timeout: Duration,
    link: MqttLink,
    topic: String,
    sut: labvisor_protocol::SutName,
) {
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        let t0 = Instant::now();
        let res = tokio::time::timeout(timeout, probe_once(&target)).await;
        let (ok, error) = match res {
            Ok(Ok(())) => (true, None),
            Ok(Err(e)) => (false, Some(e)),
            Err(_) => (false, Some(format!("no answer within {timeout:?}"))),
        };
        let result = ProbeResult {
            v: VERSION,
            sut: sut.clone(),
            url: target.to_string(),
            ok,
            latency_ms: t0.elapsed().as_millis() as u64,
            error,
            time_ms: now_ms(),
        };
        let _ = link.set_sticky(
            topic.clone(),
            Bytes::from(serde_json::to_vec(&result).expect("serialises")),
        );
    }
}

async fn probe_once(target: &ProbeTarget) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    match target {
        ProbeTarget::Tcp { host, port } => tokio::net::TcpStream::connect((host.as_str(), *port))
            .await
            .map(|_| ())
            .map_err(|e| format!("connect {host}:{port}: {e}")),
        ProbeTarget::Http { .. } => {
            let url = target.to_string();
            let (https, rest) = match url.split_once("://") {
                Some(("https", r)) => (true, r),
                Some((_, r)) => (false, r),
                None => (false, url.as_str()),
            };
            let (hostport, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            let default_port = if https { 443 } else { 80 };
            let (host, port) = match hostport.rsplit_once(':') {
                Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                    (h.to_owned(), p.parse().unwrap_or(default_port))
                }
                _ => (hostport.to_owned(), default_port),
            };
            let mut s = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
                .await
                .map_err(|e| format!("connect {host}:{port}: {e}"))?;
            if https {
                // No certificate store in a scratch image: reachability of the TLS port only.
                return Ok(());
            }
            let req = format!(
                "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: labvisor-agent\r\n\r\n"
            );
            s.write_all(req.as_bytes())
                .await
                .map_err(|e| format!("send: {e}"))?;
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
            let line = String::from_utf8_lossy(&buf[..n]);
            let code = line.split_whitespace().nth(1).unwrap_or("");
            if code.starts_with('2') || code.starts_with('3') {
                Ok(())
            } else {
                Err(format!("HTTP status {code:?}"))
            }
        }
    }
}
