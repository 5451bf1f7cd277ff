//! The device process as one actor (modelled on watchexec's supervisor `Job`): a tokio task owns
//! the child and its restart policy; the rest of the agent holds a [`Device`] handle that sends
//! controls (signal, stop) and reads a [`Status`] the task publishes after every transition.
//!
//! The task's state is a [`State`]: `Pending` (waiting for its first start or a restart),
//! `Running`, `Ended` (exited under `on_child_exit = "exit"`: the agent stops) or `Stopped`
//! (after a stop control), or `NoCommand` when the SUT has no device process. A process that
//! exits is restarted after a capped exponential backoff ([`Backoff`], on `backon`); after
//! `crash_loop_after` quick failures in a row it is crash-looping until a run outlives
//! [`Backoff::quick`]. As PID 1 the task also reaps orphaned grandchildren, never its own child.
//!
//! Beside start and stop, the handle has the controls a lab needs to take the device out of
//! service without cutting its work: [`Device::signal`] (a signal to its group),
//! [`Device::hold`] and [`Device::release`] (stop it and keep it stopped: maintenance), and
//! [`Device::drain`] and [`Device::undrain`] (a signal once, e.g. testflinger's SIGUSR1, and no
//! restart after it exits: the device finishes its current work and takes no more, until the
//! drain is lifted). A process held for either reason starts again only when neither holds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use labvisor_protocol::config::{OnChildExit, RestartSettings};
use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, info_span, Instrument, Span};

use crate::child::{self, Exit, Running, Spec};
use crate::output::{Sinks, Source};

/// How long the pump may take to finish the pipe after the process exited.
pub const DRAIN: Duration = Duration::from_millis(500);

/// Restart policy of the device process: capped exponential backoff (no jitter), and crash-loop
/// after `crash_loop_after` quick failures in a row.
#[derive(Debug)]
pub struct Backoff {
    policy: ExponentialBuilder,
    delays: ExponentialBackoff,
    /// First delay.
    pub min: Duration,
    /// Largest delay.
    pub max: Duration,
    /// Quick failures in a row before the state is crash-loop.
    pub crash_loop_after: u32,
    /// A run shorter than this is a quick failure; a longer one resets the count.
    pub quick: Duration,
    quick_failures: u32,
}

impl Backoff {
    /// A policy with no failures yet.
    pub fn new(min: Duration, max: Duration, crash_loop_after: u32) -> Self {
        let max = max.max(min);
        let policy = ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(2.0)
            .without_max_times();
        Backoff {
            delays: policy.build(),
            policy,
            min,
            max,
            crash_loop_after: crash_loop_after.max(1),
            // A run that outlived the longest backoff (or 10 s) was not a quick failure.
            quick: max.clamp(Duration::from_secs(10), Duration::from_secs(60)),
            quick_failures: 0,
        }
    }

    /// Records an exit after `ran` and returns the delay before the next start. An exit after a
    /// long run (at least `quick`) is not a quick failure: it clears the count, and the next
    /// start comes after the shortest delay.
    pub fn on_exit(&mut self, ran: Duration) -> Duration {
        if ran >= self.quick {
            self.quick_failures = 0;
            self.delays = self.policy.build();
            return self.min;
        }
        self.quick_failures = self.quick_failures.saturating_add(1);
        self.delays.next().unwrap_or(self.max)
    }

    /// Whether the process is crash-looping.
    pub fn crash_loop(&self) -> bool {
        self.quick_failures >= self.crash_loop_after
    }

    /// Quick failures in a row.
    pub fn quick_failures(&self) -> u32 {
        self.quick_failures
    }
}

/// Where the device process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The SUT has no device process (`command` unset).
    NoCommand,
    /// Waiting for its first start, or for a restart after the backoff.
    Pending,
    /// Running.
    Running {
        /// Its pid (and process group id).
        pid: u32,
        /// When it started.
        started: Instant,
    },
    /// It exited under `on_child_exit = "exit"`: the agent ends.
    Ended(Exit),
    /// Stopped by [`Device::stop`].
    Stopped,
    /// Stopped and kept stopped by [`Device::hold`] (maintenance) until [`Device::release`].
    Held,
}

/// What the task publishes after every transition.
#[derive(Debug, Clone)]
pub struct Status {
    /// Where the process is.
    pub state: State,
    /// Starts after the first.
    pub restarts: u64,
    /// How the last run ended (or why it could not start).
    pub last_exit: Option<String>,
    /// Crash-looping: too many quick failures in a row. It stays set while a new run is younger
    /// than `quick`.
    pub crash_loop: bool,
    /// What the crash loop is about (set while `crash_loop`).
    pub crash_detail: Option<String>,
    /// A run shorter than this is a quick failure.
    pub quick: Duration,
}

impl Status {
    /// Whether the process runs.
    pub fn is_running(&self) -> bool {
        matches!(self.state, State::Running { .. })
    }

    /// Whether it crash-loops now: not running, or running for less than `quick` (a long enough
    /// run clears the crash loop; until then it stays visible).
    pub fn is_crash_looping(&self) -> bool {
        self.crash_loop
            && match self.state {
                State::Running { started, .. } => started.elapsed() < self.quick,
                _ => true,
            }
    }
}

/// What the handle asks of the task.
#[derive(Debug)]
enum Control {
    Signal(Signal),
    Stop {
        grace: Duration,
        reply: oneshot::Sender<Option<(Exit, bool)>>,
    },
    // -- hold/release (maintenance, helper admin) --
    Hold(Duration),
    HoldDrained(Signal),
    Release,
    // -- drain/undrain (the device's own work, helper work) --
    Drain(Signal),
    Undrain,
}

/// The handle to the device-process task.
pub struct Device {
    control: mpsc::Sender<Control>,
    status: watch::Receiver<Status>,
    task: JoinHandle<()>,
}

impl Device {
    /// Starts the task: it starts `spec` at once (if there is one), output going to `sinks`.
    /// `reap` makes it reap orphaned processes (the agent is PID 1).
    pub fn spawn(
        spec: Option<Spec>,
        restart: &RestartSettings,
        sinks: Arc<Sinks>,
        reap: bool,
    ) -> Device {
        Device::spawn_held(spec, restart, sinks, reap, false)
    }

    /// [`Device::spawn`], held from the start when `held` (the SUT is in maintenance): the
    /// process starts only at [`Device::release`].
    pub fn spawn_held(
        spec: Option<Spec>,
        restart: &RestartSettings,
        sinks: Arc<Sinks>,
        reap: bool,
        held: bool,
    ) -> Device {
        let held = held && spec.is_some();
        let backoff = Backoff::new(
            restart.backoff_min,
            restart.backoff_max,
            restart.crash_loop_after.get(),
        );
        let status = Status {
            state: match &spec {
                Some(_) if held => State::Held,
                Some(_) => State::Pending,
                None => State::NoCommand,
            },
            restarts: 0,
            last_exit: None,
            crash_loop: false,
            crash_detail: None,
            quick: backoff.quick,
        };
        let (status_tx, status_rx) = watch::channel(status);
        let (control, rx) = mpsc::channel(16);
        let sigchld = reap
            .then(|| tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()).ok())
            .flatten();
        let actor = Actor {
            phase: match &spec {
                Some(_) if held => Phase::Held,
                Some(_) => Phase::Pending(tokio::time::Instant::now()),
                None => Phase::Idle,
            },
            spec,
            on_exit: restart.on_child_exit,
            backoff,
            sinks,
            status: status_tx,
            sigchld,
            maintenance: held,
            draining: false,
        };
        let task = tokio::spawn(actor.run(rx).instrument(info_span!("device")));
        Device {
            control,
            status: status_rx,
            task,
        }
    }

    /// The latest status.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// A receiver that sees every new status.
    pub fn watch(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Sends `sig` to the process's group, if it runs.
    pub async fn signal(&self, sig: Signal) {
        let _ = self.control.send(Control::Signal(sig)).await;
    }

    /// Stops the process (TERM to its group, up to `grace`, KILL) and keeps it stopped, without
    /// restarts, until [`Device::release`]. Returns at once; the status says `Held` once it is.
    pub async fn hold(&self, grace: Duration) {
        let _ = self.control.send(Control::Hold(grace)).await;
    }

    /// Holds the process for maintenance without cutting its work: `sig` once to the process
    /// alone (as [`Device::drain`]; e.g. testflinger's SIGUSR1), it finishes its current work
    /// and exits, and is then held, not restarted, until [`Device::release`]. A restart that
    /// was only waiting for its backoff does not happen.
    pub async fn hold_drained(&self, sig: Signal) {
        let _ = self.control.send(Control::HoldDrained(sig)).await;
    }

    /// Starts a held process again, now. Nothing happens if it is not held (one still finishing
    /// its work after [`Device::hold_drained`] is restarted when it exits, as usual).
    pub async fn release(&self) {
        let _ = self.control.send(Control::Release).await;
    }

    // -- drain/undrain (the device's own work, helper work) --
    /// Drains the process: sends `sig` to it once, to the process alone and not its group (e.g.
    /// testflinger's SIGUSR1, "exit after the current job"; its work, in its group, must not
    /// get the signal) and does not restart it after it exits (also under
    /// `on_child_exit = "exit"`); its state is then [`State::Held`] until [`Device::undrain`].
    /// A restart that was only waiting for its backoff does not happen. While draining, a
    /// second drain sends nothing.
    pub async fn drain(&self, sig: Signal) {
        let _ = self.control.send(Control::Drain(sig)).await;
    }

    /// Lifts a drain: a process held by it starts again at once (unless held for maintenance);
    /// one still running after the signal is restarted when it exits, as usual.
    pub async fn undrain(&self) {
        let _ = self.control.send(Control::Undrain).await;
    }

    /// Stops the process (TERM to its group, up to `grace`, KILL) and ends the task. Returns how
    /// the process ended and whether it had to be killed, if it was running.
    pub async fn stop(self, grace: Duration) -> Option<(Exit, bool)> {
        let (reply, rx) = oneshot::channel();
        let sent = self.control.send(Control::Stop { grace, reply }).await;
        let stopped = match sent {
            Ok(()) => rx.await.ok().flatten(),
            Err(_) => None,
        };
        let _ = self.task.await;
        stopped
    }
}

/// The task's own state: the child itself lives here.
enum Phase {
    /// No device process.
    Idle,
    /// Starts at this instant.
    Pending(tokio::time::Instant),
    /// Running; its events go to its span.
    Running(Box<Running>, Span),
    /// Over (exited under `on_child_exit = "exit"`).
    Ended,
    /// Held: stopped until released.
    Held,
}

struct Actor {
    spec: Option<Spec>,
    phase: Phase,
    on_exit: OnChildExit,
    backoff: Backoff,
    sinks: Arc<Sinks>,
    status: watch::Sender<Status>,
    sigchld: Option<tokio::signal::unix::Signal>,
    /// Held for maintenance ([`Device::hold`]).
    maintenance: bool,
    /// Drained ([`Device::drain`]): not restarted after it exits.
    draining: bool,
}

impl Actor {
    async fn run(mut self, mut control: mpsc::Receiver<Control>) {
        loop {
            let next_start = match self.phase {
                Phase::Pending(at) => Some(at),
                _ => None,
            };
            tokio::select! {
                exit = wait(&mut self.phase) => self.on_exit(exit).await,
                _ = async { tokio::time::sleep_until(next_start.expect("guarded")).await }, if next_start.is_some() => {
                    self.start();
                }
                _ = async { self.sigchld.as_mut().expect("guarded").recv().await }, if self.sigchld.is_some() => {
                    let ours: Vec<u32> = match &self.phase {
                        Phase::Running(run, _) => vec![run.pid()],
                        _ => Vec::new(),
                    };
                    child::reap_orphans(&ours);
                }
                ctl = control.recv() => match ctl {
                    Some(Control::Signal(sig)) => {
                        if let Phase::Running(run, _) = &self.phase {
                            run.signal(sig);
                        }
                    }
                    Some(Control::Hold(grace)) => {
                        self.maintenance = true;
                        self.hold(grace).await;
                    }
                    Some(Control::HoldDrained(sig)) => {
                        // Signalled already by a drain (or held): nothing more to send.
                        let signalled = self.draining || self.maintenance;
                        self.maintenance = true;
                        if !signalled {
                            self.wind_down(sig, "maintenance: ");
                        }
                    }
                    Some(Control::Release) => {
                        self.maintenance = false;
                        self.resume();
                    }
                    Some(Control::Drain(sig)) => self.drain(sig),
                    Some(Control::Undrain) => {
                        self.draining = false;
                        self.resume();
                    }
                    Some(Control::Stop { grace, reply }) => {
                        let _ = reply.send(self.stop(grace).await);
                        return;
                    }
                    None => {
                        self.stop(Duration::ZERO).await;
                        return;
                    }
                },
            }
        }
    }

    fn start(&mut self) {
        let spec = self.spec.as_ref().expect("only pending with a command");
        let restart = self.status.borrow().last_exit.is_some();
        match child::spawn(spec, self.sinks.clone(), Source::Device) {
            Ok(run) => {
                let span = info_span!("run", pid = run.pid());
                info!(parent: &span, "Device process started.");
                let (pid, started) = (run.pid(), run.started());
                self.phase = Phase::Running(Box::new(run), span);
                self.status.send_modify(|s| {
                    s.restarts += u64::from(restart);
                    s.state = State::Running { pid, started };
                });
            }
            Err(e) => {
                let delay = self.backoff.on_exit(Duration::ZERO);
                let why = format!("cannot start {:?}: {e}", spec.argv[0]);
                let crash = self.backoff.crash_loop().then(|| why.clone());
                self.sinks.agent_line(&format!(
                    "cannot start the device process {:?}: {e}; retrying in {:.1}s",
                    spec.argv,
                    delay.as_secs_f64()
                ));
                self.phase = Phase::Pending(tokio::time::Instant::now() + delay);
                self.publish_exit(State::Pending, why, crash);
            }
        }
    }

    async fn on_exit(&mut self, exit: Exit) {
        let Phase::Running(mut run, span) = std::mem::replace(&mut self.phase, Phase::Ended) else {
            return;
        };
        let ran = run.started().elapsed();
        // Let the pump finish the pipe (a grandchild holding it open is left to its pump).
        let _ = run.drain(DRAIN).await;
        debug!(parent: &span, exit = %exit.describe(), "Device process ended.");
        let (what, secs) = (exit.describe(), ran.as_secs_f64());
        if self.draining || self.maintenance {
            // It finished its work and exited as asked; it stays down until the drain is
            // lifted or the maintenance ends (also under on_child_exit = "exit": a new
            // container would start it again).
            let why = if self.draining {
                "drained"
            } else {
                "maintenance"
            };
            self.sinks.agent_line(&format!(
                "device process ended ({what}) after {secs:.1}s; {why}: not restarted"
            ));
            self.phase = Phase::Held;
            self.status.send_modify(|s| {
                s.state = State::Held;
                s.last_exit = Some(what);
            });
            return;
        }
        if self.on_exit == OnChildExit::Exit {
            self.sinks.agent_line(&format!("device process ended ({what}) after {secs:.1}s; on_child_exit = \"exit\": the agent exits"));
            self.publish_exit(State::Ended(exit), what, None);
            return;
        }
        let delay = self.backoff.on_exit(ran);
        let crash = self.backoff.crash_loop().then(|| {
            let n = self.backoff.quick_failures();
            format!("device process failed {n} times in a row, last {what}")
        });
        self.sinks.agent_line(&format!(
            "device process ended ({what}) after {secs:.1}s; restarting in {:.1}s",
            delay.as_secs_f64()
        ));
        self.phase = Phase::Pending(tokio::time::Instant::now() + delay);
        self.publish_exit(State::Pending, what, crash);
    }

    fn publish_exit(&self, state: State, last_exit: String, crash_detail: Option<String>) {
        let crash_loop = self.backoff.crash_loop();
        self.status.send_modify(|s| {
            s.state = state;
            s.last_exit = Some(last_exit);
            s.crash_loop = crash_loop;
            s.crash_detail = crash_detail;
        });
    }

    /// Holds the process: stops it if it runs (TERM, `grace`, KILL), starts nothing until
    /// released, and clears the crash-loop count (whatever it was about is being worked on).
    async fn hold(&mut self, grace: Duration) {
        if matches!(self.phase, Phase::Idle | Phase::Ended | Phase::Held) {
            return;
        }
        let stopped = self.stop(grace).await;
        info!(
            stopped = stopped.is_some(),
            "Device process held (maintenance)."
        );
        self.phase = Phase::Held;
        let b = &self.backoff;
        self.backoff = Backoff::new(b.min, b.max, b.crash_loop_after);
        self.status.send_modify(|s| {
            s.state = State::Held;
            s.crash_loop = false;
            s.crash_detail = None;
        });
    }

    // -- drain/undrain (the device's own work, helper work) --
    /// A drain: the signal once to a running process, and no restart after it exits; a pending
    /// restart is called off at once.
    fn drain(&mut self, sig: Signal) {
        if std::mem::replace(&mut self.draining, true) || self.maintenance {
            // Signalled already, or held for maintenance (which signalled it or stopped it).
            return;
        }
        self.wind_down(sig, "");
    }

    /// The signal once to a running process (which is not restarted after it exits: the caller
    /// set `draining` or `maintenance`); a pending restart is called off at once. `why` starts
    /// the output line (`""` for a drain, `"maintenance: "`).
    fn wind_down(&mut self, sig: Signal, why: &str) {
        match &self.phase {
            Phase::Running(run, span) => {
                info!(parent: span, signal = %sig, why, "Draining the device process: it is not restarted after it exits.");
                self.sinks.agent_line(&format!(
                    "{why}draining the device process: {sig} sent; it is not restarted after it exits"
                ));
                // To the process alone, not its group: the group holds the device's work too
                // (testflinger's phase commands), which the signal must not reach (a shell
                // dies of SIGUSR1).
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(run.pid() as i32), sig);
            }
            Phase::Pending(_) => {
                self.phase = Phase::Held;
                self.status.send_modify(|s| {
                    s.state = State::Held;
                    s.crash_loop = false;
                    s.crash_detail = None;
                });
            }
            Phase::Idle | Phase::Held | Phase::Ended => {}
        }
    }

    /// A held process starts again once neither maintenance nor a drain holds it.
    fn resume(&mut self) {
        if matches!(self.phase, Phase::Held) && !self.maintenance && !self.draining {
            self.sinks
                .agent_line("device process released: starting it again");
            self.phase = Phase::Pending(tokio::time::Instant::now());
            self.status.send_modify(|s| s.state = State::Pending);
        }
    }

    /// Stops the running process, if any: TERM, `grace`, KILL.
    async fn stop(&mut self, grace: Duration) -> Option<(Exit, bool)> {
        let stopped = match std::mem::replace(&mut self.phase, Phase::Ended) {
            Phase::Running(mut run, span) => {
                let (exit, killed) = run.stop(grace).await;
                let _ = run.drain(DRAIN).await;
                debug!(parent: &span, exit = %exit.describe(), killed, "Device process stopped.");
                Some((exit, killed))
            }
            _ => None,
        };
        self.status.send_modify(|s| {
            s.state = State::Stopped;
            if let Some((exit, _)) = stopped {
                s.last_exit = Some(exit.describe());
            }
        });
        stopped
    }
}

/// Waits for the running process to exit; pends forever when none runs. Cancel-safe.
async fn wait(phase: &mut Phase) -> Exit {
    match phase {
        Phase::Running(run, _) => run.wait().await,
        _ => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
