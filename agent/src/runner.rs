//! Jobs over MQTT: acknowledging submissions and cancels, running one job at a time from the
//! durable queue, and enforcing its time limits.
//!
//! A submission is parsed ([`labvisor_protocol::submit`]), then durably queued (journal fsync)
//! BEFORE the broker gets its PUBACK (the link runs with manual acks) and before the submitter
//! gets `accepted` on `<sut>/submit_status` (and on `reply_to` / the MQTT 5 response topic). A
//! duplicate id is acknowledged as `duplicate` and runs once. Bad input is rejected with a reason
//! and acknowledged too, so it is never redelivered and never stalls the queue.
//!
//! A job runs in its own process group and directory (`<data>/jobs/<id>/`), with its output going
//! to the same sinks as the device process and to `<sut>/jobs/<id>/output`. `timeout` and
//! `output_timeout` (and cancel) send TERM to the group, then KILL after the grace period,
//! without blocking the agent's loop. How the job ends (`passed`, `failed`, with what reason) is
//! decided in [`verdict`]: labvisor's own decision (cancel, a limit), else the verdict the job
//! wrote to `LABVISOR_RESULT`, else its exit status.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use labvisor_protocol::config::{JobVars, SutConfig};
use labvisor_protocol::payloads::{now_ms, JobState, JobStatus};
use labvisor_protocol::topics::{JobId, Topics};
use nix::sys::signal::Signal;
use tracing::{info, info_span, warn, Instrument, Span};

use crate::child::{self, Exit, Running, Spec};
use crate::jobs::{
    job_file, record_progress, JobFile, JobProgress, JobRecord, Store, TemplateError,
    PROGRESS_EVERY,
};
use crate::mqtt::{Message, MqttLink};
use crate::output::{Sinks, Source};

mod requests;
pub mod verdict;

/// Job directories kept on the volume (the newest); older ones are removed.
pub const KEEP_JOB_DIRS: usize = 20;

/// The job that is running.
pub struct ActiveJob {
    rec: JobRecord,
    run: Running,
    started_ms: u64,
    deadline: tokio::time::Instant,
    output_timeout: Duration,
    /// Set when we decided to end it (timeout, cancel, stop): the final state and why.
    ending: Option<(JobState, String)>,
    kill_at: Option<tokio::time::Instant>,
    /// Records its output byte count on the volume (see [`crate::jobs::PROGRESS_FILE`]).
    recorder: tokio::task::JoinHandle<()>,
    /// Its span: every event about it goes there (`job{job_id}`).
    span: Span,
}

impl Drop for ActiveJob {
    fn drop(&mut self) {
        self.recorder.abort();
    }
}

/// Writes the job's output byte count to the volume every [`PROGRESS_EVERY`] while it changes,
/// so that a job the agent dies under is reported `lost` with the bytes it printed.
async fn record_output(dir: PathBuf, id: JobId, progress: Arc<crate::output::Progress>) {
    let mut ticker = tokio::time::interval(PROGRESS_EVERY);
    let mut recorded = None;
    loop {
        ticker.tick().await;
        let output_bytes = progress.bytes.load(Ordering::Relaxed);
        if recorded != Some(output_bytes) {
            let p = JobProgress {
                id: id.clone(),
                output_bytes,
            };
            if let Err(e) = record_progress(&dir, &p) {
                warn!(error = %e, "Cannot record the job's output byte count.");
            }
            recorded = Some(output_bytes);
        }
    }
}

/// Jobs: the store, the running job and how to publish about them.
pub struct JobRunner {
    store: Store,
    active: Option<ActiveJob>,
    cfg: Arc<SutConfig>,
    topics: Topics,
    link: Option<MqttLink>,
    jobs_dir: PathBuf,
    grace: Duration,
    /// Final statuses not yet seen by the health checks (kept only when the SUT has one).
    finished: Vec<JobStatus>,
    /// Why new submissions are rejected (the SUT is offline), if they are (helper admin).
    refusal: Option<String>,
}

impl JobRunner {
    /// Opens the journal in `<data>/jobs/` and publishes what replaying it found (lost jobs).
    pub fn open(
        cfg: Arc<SutConfig>,
        data_dir: &Path,
        topics: Topics,
        link: Option<MqttLink>,
        grace: Duration,
    ) -> std::io::Result<Self> {
        let jobs_dir = data_dir.join("jobs");
        let (store, statuses) = Store::open(&jobs_dir, &cfg.name, cfg.job.requeue_lost, now_ms())?;
        let r = JobRunner {
            store,
            active: None,
            cfg,
            topics,
            link,
            jobs_dir,
            grace,
            finished: Vec::new(),
            refusal: None,
        };
        for s in &statuses {
            let span = info_span!("job", job_id = %s.id);
            warn!(parent: &span, state = ?s.state, "Job was running when the agent died.");
            r.publish_status(s, true);
        }
        Ok(r)
    }

    /// Rejects new submissions with `reason` (the SUT is offline), or takes them again (`None`).
    /// Duplicates of accepted jobs are still answered `duplicate`.
    pub fn refuse_new_jobs(&mut self, reason: Option<String>) {
        self.refusal = reason;
    }

    /// The running job's id.
    pub fn running(&self) -> Option<&JobId> {
        self.active.as_ref().map(|a| &a.rec.id)
    }

    /// Jobs waiting.
    pub fn queue_len(&self) -> usize {
        self.store.queue_len()
    }

    fn publish(&self, msg: Message) {
        if let Some(link) = &self.link {
            if let Err(e) = link.publish(msg) {
                warn!(error = %e, "Cannot publish.");
            }
        }
    }

    fn publish_status(&self, s: &JobStatus, last: bool) {
        let json = Bytes::from(serde_json::to_vec(s).expect("serialises"));
        self.publish(Message::state(self.topics.job(&s.sut, &s.id), json.clone()));
        if last {
            if let Some(link) = &self.link {
                // Every final status reaches last_job (readers count jobs there): never coalesced.
                if let Err(e) = link.publish_sticky(self.topics.last_job(&s.sut), json) {
                    warn!(error = %e, "Cannot publish.");
                }
            }
        }
    }

    /// Ends the running job: TERM to its group now, KILL after the grace period.
    fn end_active(&mut self, state: JobState, reason: String) {
        let grace = self.grace;
        if let Some(a) = self.active.as_mut() {
            if a.ending.is_none() {
                a.ending = Some((state, reason));
                a.run.signal(Signal::SIGTERM);
                a.kill_at = Some(tokio::time::Instant::now() + grace);
            }
        }
    }

    /// Starts the next queued job if none runs.
    pub fn start_next(&mut self, sinks: &Arc<Sinks>) {
        if self.active.is_some() {
            return;
        }
        let rec = match self.store.start_next(now_ms()) {
            Ok(Some(rec)) => rec,
            Ok(None) => return,
            Err(e) => {
                warn!(error = %e, "Cannot record the job start.");
                return;
            }
        };
        let started_ms = now_ms();
        let span = info_span!("job", job_id = %rec.id);
        match self.spawn(&rec, sinks) {
            Ok(run) => {
                info!(parent: &span, pid = run.pid(), "Job started.");
                let st = self.store.queued_status(&rec).started(started_ms);
                self.publish_status(&st, true);
                let recorder = tokio::spawn(
                    record_output(self.jobs_dir.clone(), rec.id.clone(), run.progress_handle())
                        .instrument(span.clone()),
                );
                self.active = Some(ActiveJob {
                    recorder,
                    span,
                    deadline: tokio::time::Instant::now() + Duration::from_millis(rec.timeout_ms),
                    output_timeout: Duration::from_millis(rec.output_timeout_ms),
                    rec,
                    run,
                    started_ms,
                    ending: None,
                    kill_at: None,
                });
            }
            Err(e) => {
                let st = JobStatus {
                    state: JobState::Failed,
                    started_ms: Some(started_ms),
                    ended_ms: Some(now_ms()),
                    duration_ms: Some(0),
                    reason: Some(format!("cannot start the job: {e}")),
                    ..self.store.queued_status(&rec)
                };
                self.finish(st, &span);
            }
        }
    }

    fn spawn(&self, rec: &JobRecord, sinks: &Arc<Sinks>) -> std::io::Result<Running> {
        let dir = self.jobs_dir.join(rec.id.as_str());
        std::fs::create_dir_all(&dir)?;
        let argv = match (&rec.job.argv, &rec.job.script) {
            (Some(argv), _) => argv.clone(),
            (None, script) => {
                let file = self
                    .job_file(script.as_deref().unwrap_or_default())
                    .map_err(std::io::Error::other)?;
                let path = dir.join(file.name());
                std::fs::write(&path, file.content())?;
                let file_s = path.display().to_string();
                let dir_s = dir.display().to_string();
                self.cfg.job.command.render(&JobVars {
                    job_file: &file_s,
                    job_dir: &dir_s,
                    job_id: rec.id.as_str(),
                    sut: self.cfg.name.as_str(),
                })
            }
        };
        // A result from an earlier run of this job (requeued after the agent died) is not its.
        let result = dir.join(verdict::RESULT_FILE);
        match std::fs::remove_file(&result) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut env = self.cfg.env.clone();
        env.extend(rec.job.env.clone());
        env.insert("LABVISOR_JOB_ID".into(), rec.id.to_string());
        env.insert("LABVISOR_SUT".into(), self.cfg.name.to_string());
        env.insert("LABVISOR_JOB_DIR".into(), dir.display().to_string());
        env.insert(verdict::RESULT_ENV.into(), result.display().to_string());
        let spec = Spec {
            argv,
            env,
            cwd: Some(dir),
        };
        child::spawn(&spec, sinks.clone(), Source::Job(rec.id.clone()))
    }

    /// The job file for a submitted script: the SUT's template decides with the script's
    /// content ([`crate::jobs::job_file`]).
    fn job_file(&self, script: &str) -> Result<JobFile, TemplateError> {
        let template = self.cfg.job.template.as_ref().and_then(|t| {
            self.cfg.files.iter().find(|f| {
                f.name == *t || f.name.trim_start_matches("./") == t.trim_start_matches("./")
            })
        });
        let text = template.map(|f| String::from_utf8_lossy(&f.content));
        job_file(text.as_deref(), script)
    }

    /// When the job's limits need looking at next (None when no job runs).
    pub fn next_check(&self) -> Option<tokio::time::Instant> {
        let a = self.active.as_ref()?;
        if let Some(k) = a.kill_at {
            return Some(k);
        }
        if a.ending.is_some() {
            return None;
        }
        let last = a.run.progress().last_ms.load(Ordering::Relaxed);
        let silent = Duration::from_millis(now_ms().saturating_sub(last));
        let silence_at = tokio::time::Instant::now() + a.output_timeout.saturating_sub(silent);
        Some(a.deadline.min(silence_at))
    }

    /// Enforces the running job's limits (call when [`JobRunner::next_check`] is due).
    pub fn check_limits(&mut self) {
        let now = tokio::time::Instant::now();
        let Some(a) = self.active.as_mut() else {
            return;
        };
        if let Some(k) = a.kill_at {
            if now >= k {
                a.run.signal(Signal::SIGKILL);
                a.kill_at = None;
            }
            return;
        }
        if a.ending.is_some() {
            return;
        }
        let last = a.run.progress().last_ms.load(Ordering::Relaxed);
        let silent = Duration::from_millis(now_ms().saturating_sub(last));
        if now >= a.deadline {
            let t = Duration::from_millis(a.rec.timeout_ms);
            self.end_active(
                JobState::Timeout,
                format!("timeout: ran longer than {}", humantime::format_duration(t)),
            );
        } else if silent >= a.output_timeout {
            let t = a.output_timeout;
            self.end_active(
                JobState::Timeout,
                format!(
                    "output_timeout: no output for {}",
                    humantime::format_duration(t)
                ),
            );
        }
    }

    /// Waits for the running job to exit. Cancel-safe; pends forever when none runs.
    pub async fn wait(&mut self) -> Exit {
        match self.active.as_mut() {
            Some(a) => a.run.wait().await,
            None => std::future::pending().await,
        }
    }

    /// Records the end of the running job after it exited with `exit`.
    pub async fn on_exit(&mut self, exit: Exit) {
        let Some(mut a) = self.active.take() else {
            return;
        };
        let _ = a.run.drain(Duration::from_millis(500)).await;
        a.run.signal(Signal::SIGKILL); // whatever is left of its group
        let ended = now_ms();
        let result = self
            .jobs_dir
            .join(a.rec.id.as_str())
            .join(verdict::RESULT_FILE);
        let (state, reason) = verdict::outcome(a.ending.take(), exit, verdict::read(&result));
        let (code, signal) = match exit {
            Exit::Code(c) => (Some(c), None),
            Exit::Signal(s) => (None, Some(s)),
        };
        let st = self
            .store
            .queued_status(&a.rec)
            .finished(state, a.started_ms, ended)
            .with_exit(code, signal)
            .with_output_bytes(a.run.progress().bytes.load(Ordering::Relaxed))
            .with_reason(reason);
        info!(parent: &a.span, state = ?st.state, "Job ended.");
        self.finish(st, &a.span);
    }

    /// Clears the retained status of a job that fell out of the history, so the broker does not
    /// keep every job's status forever.
    fn clear_status(&self, evicted: Option<JobId>) {
        if let Some(id) = evicted {
            self.publish(Message::state(
                self.topics.job(&self.cfg.name, &id),
                Bytes::new(),
            ));
        }
    }

    fn finish(&mut self, st: JobStatus, span: &Span) {
        match self.store.finish(st.clone()) {
            Ok(evicted) => self.clear_status(evicted),
            Err(e) => warn!(parent: span, error = %e, "Cannot record the job's end."),
        }
        self.publish_status(&st, true);
        self.prune_dirs();
        if self.cfg.health_check.is_some() {
            self.finished.push(st);
        }
    }

    // Health checks (helper healthjob; [`crate::healthjob`]).

    /// The final statuses since the last call (only kept when the SUT has a health check).
    pub fn take_finished(&mut self) -> Vec<JobStatus> {
        std::mem::take(&mut self.finished)
    }

    /// The recent finished jobs, oldest first.
    pub fn history(&self) -> impl DoubleEndedIterator<Item = &JobStatus> {
        self.store.history()
    }

    /// Whether a health check is queued or running.
    pub fn health_check_pending(&self) -> bool {
        self.store.health_check_pending()
    }

    /// Durably queues a health check first, and publishes its `queued` status.
    pub fn queue_health_check(&mut self, rec: JobRecord) -> std::io::Result<()> {
        self.store.accept_first(rec.clone())?;
        info_span!("job", job_id = %rec.id).in_scope(|| info!("Health check queued."));
        self.publish_status(&self.store.queued_status(&rec), false);
        Ok(())
    }

    /// Stops the running job because the agent stops: it is reported lost (and requeued when
    /// `requeue_lost`), like a job interrupted by a crash.
    pub async fn stop(&mut self) {
        let Some(mut a) = self.active.take() else {
            return;
        };
        let _ = a.run.stop(self.grace).await;
        let _ = a.run.drain(Duration::from_millis(500)).await;
        let ended = now_ms();
        let lost = self
            .store
            .queued_status(&a.rec)
            .finished(JobState::Lost, a.started_ms, ended)
            .with_output_bytes(a.run.progress().bytes.load(Ordering::Relaxed))
            .with_reason("the agent was stopped while the job was running".to_owned());
        match self
            .store
            .finish_lost(lost, self.cfg.job.requeue_lost, ended)
        {
            Ok(statuses) => {
                for s in statuses {
                    self.publish_status(&s, true);
                }
            }
            Err(e) => warn!(parent: &a.span, error = %e, "Cannot record the interrupted job."),
        }
    }

    fn prune_dirs(&self) {
        let Ok(rd) = std::fs::read_dir(&self.jobs_dir) else {
            return;
        };
        let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if dirs.len() <= KEEP_JOB_DIRS {
            return;
        }
        dirs.sort();
        let running = self.running().map(|id| self.jobs_dir.join(id.as_str()));
        for (_, d) in dirs.iter().take(dirs.len() - KEEP_JOB_DIRS) {
            if Some(d) != running.as_ref() {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
}
