//! The agent's main loop: one task that starts the agent's parts, serves submissions, cancels and
//! signals, pumps the heartbeat and drives shutdown.
//!
//! The parts, each in its own module: the device process ([`Device`], an actor), the jobs
//! ([`JobRunner`]), the output sinks and threads ([`output`], [`tail`]), the MQTT batcher
//! ([`publish`]), the upstream probe ([`probe`]) and the status reports ([`Reporter`]).
//!
//! The heartbeat comes from this loop, not from an independent timer: every pass (at least every
//! `heartbeat`) it reports the status. If this loop hangs, the heartbeat goes stale and the
//! healthcheck says so; if the output pump is stuck in a write, the state says `stalled`. (The old
//! stack sent "ok" from a timer thread while the agent was dead.)

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use labvisor_protocol::config::{ProbeCheck, SutConfig};
use labvisor_protocol::payloads::{now_ms, random_id, AgentState};
use labvisor_protocol::topics::{SutTopic, Topics};
use nix::sys::signal::Signal;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, info_span, Instrument};

use crate::admin::Admin;
use crate::child::{Exit, Spec};
use crate::device::{Device, State};
use crate::device_work::{self, Watch};
use crate::healthjob::HealthJobs;
use crate::logfile::RotatingFile;
use crate::mqtt::{self, ConnectError, Incoming, LinkOptions, MqttLink, Received};
use crate::output::{self, Sinks};
use crate::probe;
use crate::publish;
use crate::runner::JobRunner;
use crate::status::Reporter;
use crate::tail::{self, Tailer};
use crate::tap::Tap;

/// Output bytes waiting for the batcher before chunks are dropped.
pub const TAP_BYTES: usize = 4 * 1024 * 1024;

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
    #[error(transparent)]
    Link(#[from] ConnectError),
    /// The job journal cannot be opened.
    #[error("cannot open the job journal in {path}: {source}")]
    Jobs {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Runs the agent until `control` says stop (or the device process exits under
/// `on_child_exit = "exit"`).
pub async fn run(
    settings: Settings,
    control: mpsc::Receiver<Control>,
) -> Result<Outcome, AgentError> {
    let span = info_span!("agent", sut = %settings.config.name);
    async move {
        let mut agent = Agent::start(settings)?;
        let outcome = agent.serve(control).await;
        Ok(agent.shutdown(outcome).await)
    }
    .instrument(span)
    .await
}

/// The agent's parts while it runs.
struct Agent {
    settings: Settings,
    sinks: Arc<Sinks>,
    tap: Tap,
    link: Option<MqttLink>,
    incoming: Option<Incoming>,
    jobs: JobRunner,
    device: Device,
    reporter: Reporter,
    batcher: JoinHandle<()>,
    threads: Threads,
    probe: Option<JoinHandle<()>>,
    /// Online, offline or maintenance (lab operations; [`crate::admin`]).
    admin: Admin,
    /// The device's own work and the drain request (`[device]`).
    device_watch: Option<Watch>,
    /// The SUT's health-check jobs, if it has `[health_check]` ([`crate::healthjob`]).
    health: Option<HealthJobs>,
}

impl Agent {
    /// Opens the log file, the broker link and the job journal, and starts every part.
    fn start(settings: Settings) -> Result<Agent, AgentError> {
        let cfg = &settings.config;
        if cfg.no_new_privileges {
            // The container may lack `no-new-privileges` (a Swarm service on Engine 20.10
            // cannot ask for it): set on the agent itself, the device process and every job
            // inherit it, so no setuid program in them gains privileges.
            if let Err(error) = nix::sys::prctl::set_no_new_privs() {
                tracing::warn!(error = %error, "Could not set no_new_privs on the agent.");
            }
        }
        let (sinks, tap, tap_rx) = open_sinks(&settings)?;
        let mut reporter = Reporter::new(
            cfg,
            settings.topics.clone(),
            settings.heartbeat_file.clone(),
            random_id(),
            sinks.clone(),
            tap.clone(),
        );
        let drops = Arc::new(publish::Drops::default());
        let (link, incoming) = match &settings.broker {
            Some(opts) => {
                let will = reporter.will();
                let (link, incoming) = mqtt::connect(
                    opts.clone(),
                    will,
                    drops.hook(),
                    &settings.topics,
                    &cfg.name,
                )?;
                (Some(link), Some(incoming))
            }
            None => (None, None),
        };
        reporter.link = link.clone();
        let jobs = JobRunner::open(
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
        let batcher = tokio::spawn(
            publish::Batcher {
                link: link.clone(),
                queue_capacity: settings.broker.as_ref().map_or(1, |o| o.queue_capacity),
                topics: settings.topics.clone(),
                sut: cfg.name.clone(),
                boot: reporter.boot_id().to_owned(),
                dropped: tap.dropped_counter(),
                drops,
            }
            .run(tap_rx),
        );
        let threads = Threads::spawn(cfg, &sinks, &mut reporter);
        let probe = spawn_probe(&settings, link.as_ref(), &mut reporter);
        let admin = Admin::open(&settings.data_dir, now_ms());
        if let Some(why) = admin.refusal() {
            sinks.agent_line(&why);
        }
        let device = spawn_device(cfg, &sinks, admin.holds_device());
        let device_watch = Watch::new(&cfg.device, &settings.heartbeat_file);
        let health = HealthJobs::new(cfg, &jobs, admin.is_offline());
        Ok(Agent {
            settings,
            sinks,
            tap,
            link,
            incoming,
            jobs,
            device,
            reporter,
            batcher,
            threads,
            probe,
            admin,
            device_watch,
            health,
        })
    }

    /// The loop: jobs, submissions and cancels, device-process changes, signals; a status
    /// report after every pass. Returns when the agent must stop.
    async fn serve(&mut self, mut control: mpsc::Receiver<Control>) -> Outcome {
        let mut ticker = tokio::time::interval(self.settings.config.health.heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Back-pressure: while the outbox of answers is full, submissions stay with the broker.
        let mut room_rx = self.link.as_ref().map(|l| l.watch_room());
        let mut dev_rx = Some(self.device.watch());
        let mut work_tick = self
            .device_watch
            .is_some()
            .then(|| tokio::time::interval(device_work::POLL));
        loop {
            let watch = self.device_watch.as_ref();
            let device_busy = watch.is_some_and(Watch::busy);
            let drained = watch.is_some_and(Watch::holds_jobs);
            if let Some(h) = self.health.as_mut() {
                h.tick(&mut self.jobs, &mut self.admin, device_busy);
            }
            // Offline or in maintenance: new jobs are refused, queued ones wait. While a drain
            // is requested they wait too (kept in the journal for the next container).
            self.jobs.refuse_new_jobs(self.admin.refusal());
            if self.admin.takes_jobs() && !drained {
                self.jobs.start_next(&self.sinks);
            }
            let job_check = self.jobs.next_check();
            let health_at = self.health.as_ref().and_then(HealthJobs::wake_at);
            let room = room_rx.as_mut().is_none_or(|r| *r.borrow_and_update());
            tokio::select! {
                _ = ticker.tick() => {}
                changed = async { room_rx.as_mut().expect("guarded").changed().await }, if !room && room_rx.is_some() => {
                    if changed.is_err() {
                        room_rx = None;
                    }
                    continue;
                }
                msg = async { self.incoming.as_mut().expect("guarded").recv().await }, if self.incoming.is_some() && room => {
                    match msg {
                        Some(r) => self.on_message(&r).await,
                        None => self.incoming = None,
                    }
                }
                exit = self.jobs.wait() => self.jobs.on_exit(exit).await,
                _ = async { tokio::time::sleep_until(job_check.expect("guarded")).await }, if job_check.is_some() => {
                    self.jobs.check_limits();
                }
                _ = async { tokio::time::sleep_until(health_at.expect("guarded")).await }, if health_at.is_some() => {}
                changed = async { dev_rx.as_mut().expect("guarded").changed().await }, if dev_rx.is_some() => {
                    if changed.is_err() {
                        dev_rx = None;
                    }
                }
                _ = async { work_tick.as_mut().expect("guarded").tick().await }, if work_tick.is_some() => {
                    if !self.on_device_tick().await {
                        continue;
                    }
                }
                ctl = control.recv() => match ctl {
                    Some(Control::Forward(sig)) => {
                        self.device.signal(sig).await;
                        continue;
                    }
                    Some(Control::Stop) | None => return Outcome::Stopped,
                },
            }
            // Every pass refreshes the status; the ticker guarantees one at least every
            // `heartbeat`.
            let dev = self.device.status();
            // Checked on every pass, not only when the watch wakes this loop: an exit seen first
            // by another branch must not be reported as `restarting` before `stopping`.
            if let State::Ended(exit) = dev.state {
                return Outcome::ChildExited(exit);
            }
            self.reporter.admin = self.admin.reported();
            self.reporter.admin_unsaved = self.admin.unsaved().map(str::to_owned);
            let busy = self.jobs.running().is_some() || self.reporter.device_work.is_some();
            let state = self.reporter.state(&dev, busy);
            self.reporter.report(&dev, &self.jobs, state);
        }
    }

    /// Looks at the device's own work and the drain request; drains or releases the device
    /// process as asked. Returns whether anything changed (the status is reported at once).
    async fn on_device_tick(&mut self) -> bool {
        let Some(watch) = self.device_watch.as_mut() else {
            return false;
        };
        let t = watch.tick();
        if let Some(sig) = t.drain {
            match sig.as_str().parse::<Signal>() {
                Ok(sig) => self.device.drain(sig).await,
                Err(e) => self
                    .sinks
                    .agent_line(&format!("cannot drain with {sig}: {e}")),
            }
        }
        if t.release {
            self.device.undrain().await;
        }
        self.reporter.device_work = watch.seen.clone();
        self.reporter.drain_detail = watch.detail();
        t.changed
    }

    /// A message on a subscribed topic: a submission, a cancel, an admin command, or nothing of
    /// ours.
    async fn on_message(&mut self, r: &Received) {
        match self.settings.topics.parse(&r.topic) {
            Some((_, SutTopic::Submit)) => self.jobs.on_submit(r),
            Some((_, SutTopic::Cancel)) => self.jobs.on_cancel(r),
            Some((_, SutTopic::Admin)) => {
                // Maintenance drains the device process when the SUT has a drain signal.
                let drain = self.settings.config.device.drain_signal;
                let drain = drain.and_then(|s| s.as_str().parse::<Signal>().ok());
                crate::admin::on_command(
                    &mut self.admin,
                    &self.device,
                    &self.sinks,
                    r,
                    self.settings.grace,
                    drain,
                )
                .await;
                if let Some(l) = &self.link {
                    let _ = l.ack(r);
                }
            }
            _ => {
                if let Some(l) = &self.link {
                    let _ = l.ack(r);
                }
            }
        }
    }

    /// Stops every part: the status says so first, then the device process and a running job
    /// stop side by side within one grace period, the output is flushed, and `offline` is the
    /// last status.
    async fn shutdown(mut self, outcome: Outcome) -> Outcome {
        let dev = self.device.status();
        self.reporter.report(&dev, &self.jobs, AgentState::Stopping);
        let dev_rx = self.device.watch();
        let (stopped, ()) = tokio::join!(self.device.stop(self.settings.grace), self.jobs.stop());
        let outcome = match stopped {
            Some((_, true)) if outcome == Outcome::Stopped => Outcome::Killed,
            _ => outcome,
        };
        self.threads.join().await;
        // Whatever a source still holds (an incomplete last line) goes out before the end.
        self.sinks.flush_idle(Duration::ZERO);
        if let Some(p) = self.probe {
            p.abort();
        }
        // The batcher takes the last output and ends; then MQTT is flushed.
        self.tap.close();
        drop(self.tap);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.batcher).await;
        self.sinks.sync();
        let dev = dev_rx.borrow().clone();
        self.reporter.offline(&dev).await;
        info!(outcome = ?outcome, "Agent stopped.");
        outcome
    }
}

/// The device probe, when one is configured: a URL probe when there is a broker to report to;
/// an exec probe always (its failure reaches the heartbeat through `reporter`).
fn spawn_probe(
    settings: &Settings,
    link: Option<&MqttLink>,
    reporter: &mut Reporter,
) -> Option<JoinHandle<()>> {
    let cfg = &settings.config;
    let probe = cfg.probe.clone()?;
    if matches!(probe.check, ProbeCheck::Url(_)) && link.is_none() {
        return None;
    }
    let failure = probe::ProbeFailure::default();
    if matches!(probe.check, ProbeCheck::Command(_)) {
        reporter.probe_failure = Some(failure.clone());
    }
    let topic = settings.topics.probe(&cfg.name);
    let task = probe::run(probe, link.cloned(), topic, cfg.name.clone(), failure);
    Some(tokio::spawn(task.in_current_span()))
}

/// The device-process actor (held from the start in maintenance); as PID 1 it also reaps
/// orphans.
fn spawn_device(cfg: &SutConfig, sinks: &Arc<Sinks>, held: bool) -> Device {
    let pid1 = std::process::id() == 1;
    if pid1 {
        info!("Running as PID 1: orphaned processes are reaped by the agent.");
    }
    let spec = cfg.command.clone().map(|argv| Spec {
        argv,
        env: cfg.env.clone(),
        cwd: None,
    });
    Device::spawn_held(spec, &cfg.restart, sinks.clone(), pid1, held)
}

/// The log file, the tap and the sinks that feed them.
fn open_sinks(
    settings: &Settings,
) -> Result<(Arc<Sinks>, Tap, crate::tap::TapReceiver), AgentError> {
    let cfg = &settings.config;
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
    Ok((sinks, tap, tap_rx))
}

/// The output threads: the `tail` follower (when globs are set) and the idle flusher.
struct Threads {
    stop: Arc<AtomicBool>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl Threads {
    fn spawn(cfg: &SutConfig, sinks: &Arc<Sinks>, reporter: &mut Reporter) -> Threads {
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        if !cfg.tail.is_empty() {
            let t = Tailer::new(cfg.tail.clone());
            reporter.tail_errors = Some(t.errors());
            handles.extend(tail::spawn(t, sinks.clone(), stop.clone()).ok());
        }
        handles.extend(output::spawn_idle_flusher(sinks.clone(), stop.clone()).ok());
        Threads { stop, handles }
    }

    async fn join(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.handles {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}
