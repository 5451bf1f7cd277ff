//! The durable job queue: an append-only journal on the SUT's volume.
//!
//! Every change is one JSON line in `<data>/jobs/journal.jsonl`, written and fsynced before
//! anything is acknowledged: an accepted job is on disk before the submitter hears "accepted" and
//! before the broker gets its PUBACK. On start the journal is replayed: queued jobs are queued
//! again in order, and a job that was running when the agent died is marked `lost` (or requeued
//! at the front when `requeue_lost` is set). Nothing is silently forgotten.
//!
//! The running job's output byte count is also kept on the volume, in [`PROGRESS_FILE`],
//! rewritten (not fsynced: it survives the agent's death, not a power cut) at most every
//! [`PROGRESS_EVERY`] while the count changes, so a job found running at replay is reported
//! `lost` with the bytes it had printed by then.
//!
//! The journal is compacted (rewritten to a temporary file, fsynced, renamed) when it grows past
//! [`COMPACT_AFTER`] lines, keeping the queue, the running job and the latest [`HISTORY`]
//! finished jobs, whose ids also serve to recognise duplicates.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};

use labvisor_protocol::payloads::{JobState, JobStatus, JobSubmit};
use labvisor_protocol::submit::{JobRun, Submission};
use labvisor_protocol::topics::JobId;
use labvisor_protocol::SutName;
use serde::{Deserialize, Serialize};

mod template;
pub use template::{job_file, JobFile, TemplateError};

/// Journal lines before a compaction.
pub const COMPACT_AFTER: usize = 4096;
/// Finished jobs remembered (for duplicates, `labvisor jobs` and status).
pub const HISTORY: usize = 500;
/// The running job's output byte count, in the jobs directory.
pub const PROGRESS_FILE: &str = "running.progress";
/// How often the running job's output byte count is recorded (when it changed).
pub const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// The running job's output so far, as recorded in [`PROGRESS_FILE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobProgress {
    /// The job.
    pub id: JobId,
    /// Output bytes it printed so far.
    pub output_bytes: u64,
}

/// Records `progress` in `dir`'s [`PROGRESS_FILE`] (written aside, then renamed: a reader sees
/// the old or the new count, never a torn one).
pub fn record_progress(dir: &Path, progress: &JobProgress) -> io::Result<()> {
    let tmp = dir.join(format!("{PROGRESS_FILE}.tmp"));
    std::fs::write(
        &tmp,
        serde_json::to_vec(progress).map_err(io::Error::other)?,
    )?;
    std::fs::rename(&tmp, dir.join(PROGRESS_FILE))
}

/// The output bytes recorded for job `id`, if the record is its own.
fn recorded_bytes(dir: &Path, id: &JobId) -> Option<u64> {
    let text = std::fs::read(dir.join(PROGRESS_FILE)).ok()?;
    let p: JobProgress = serde_json::from_slice(&text).ok()?;
    (p.id == *id).then_some(p.output_bytes)
}

/// An accepted job as stored: what was submitted, with the id it runs under and the limits the
/// SUT's capped. A journal line holds `id`, `script` or `argv`, `env` (the submission's own
/// fields) and `timeout_ms`, `output_timeout_ms`, `queued_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The job's id.
    pub id: JobId,
    /// What to run: `script` or `argv`, and `env`. Its `id` is always `None` (the record's
    /// [`JobRecord::id`] is the one), and so are its `timeout`, `output_timeout` (capped below)
    /// and `reply_to` (answered at acceptance).
    #[serde(flatten)]
    pub job: JobSubmit,
    /// Total time limit, ms (already capped by the SUT's limit).
    pub timeout_ms: u64,
    /// Silence limit, ms (already capped).
    pub output_timeout_ms: u64,
    /// When it was accepted.
    pub queued_ms: u64,
    /// A health check the agent queued itself ([`crate::healthjob`]); left out when false, so
    /// other jobs' lines are as before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub health_check: bool,
}

impl JobRecord {
    /// A record from a checked submission, with limits capped by the SUT's.
    pub fn new(
        id: JobId,
        sub: &Submission,
        max_timeout: std::time::Duration,
        max_output_timeout: std::time::Duration,
        now_ms: u64,
    ) -> Self {
        let cap = |req: Option<std::time::Duration>, max: std::time::Duration| {
            req.map_or(max, |r| r.min(max)).as_millis() as u64
        };
        let (script, argv) = match &sub.run {
            JobRun::Script(s) => (Some(s.clone()), None),
            JobRun::Argv(a) => (None, Some(a.clone())),
        };
        JobRecord {
            id,
            job: JobSubmit {
                script,
                argv,
                env: sub.env.clone(),
                ..JobSubmit::default()
            },
            timeout_ms: cap(sub.timeout, max_timeout),
            output_timeout_ms: cap(sub.output_timeout, max_output_timeout),
            queued_ms: now_ms,
            health_check: false,
        }
    }
}

/// One journal line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
enum Entry {
    Accepted {
        job: JobRecord,
        /// Queued first, not last (a health check); an older agent queues it last.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        first: bool,
    },
    Started {
        id: JobId,
        ms: u64,
    },
    Finished {
        status: JobStatus,
    },
    Requeued {
        id: JobId,
    },
}

/// Where a job is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Waiting, at this position (0 = next).
    Queued(usize),
    /// Running now.
    Running,
    /// Over.
    Finished(Box<JobStatus>),
    /// Never seen (or forgotten long ago).
    Unknown,
}

/// The queue, the running job and the recent history, backed by the journal.
pub struct Store {
    path: PathBuf,
    file: File,
    lines: usize,
    sut: SutName,
    queue: VecDeque<JobRecord>,
    running: Option<(JobRecord, u64)>,
    history: VecDeque<JobStatus>,
}

impl Store {
    /// Opens (or creates) the journal in `dir` and replays it. A job that was running is
    /// finished as `lost` (and requeued at the front when `requeue_lost`); the statuses to
    /// publish for it are returned.
    pub fn open(
        dir: &Path,
        sut: &SutName,
        requeue_lost: bool,
        now_ms: u64,
    ) -> io::Result<(Store, Vec<JobStatus>)> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("journal.jsonl");
        let mut queue: VecDeque<JobRecord> = VecDeque::new();
        let mut running: Option<(JobRecord, u64)> = None;
        let mut history: VecDeque<JobStatus> = VecDeque::new();
        let mut lines = 0;
        if let Ok(f) = File::open(&path) {
            for line in io::BufReader::new(f).lines() {
                let line = line?;
                lines += 1;
                // A torn last line (power cut mid-append) is skipped; it was never acknowledged.
                let Ok(entry) = serde_json::from_str::<Entry>(&line) else {
                    continue;
                };
                match entry {
                    Entry::Accepted { job, first: false } => queue.push_back(job),
                    Entry::Accepted { job, first: true } => queue.push_front(job),
                    Entry::Started { id, ms } => {
                        if let Some(pos) = queue.iter().position(|j| j.id == id) {
                            let job = queue.remove(pos).expect("position is valid");
                            running = Some((job, ms));
                        }
                    }
                    Entry::Finished { status } => {
                        if running.as_ref().is_some_and(|(j, _)| j.id == status.id) {
                            running = None;
                        }
                        queue.retain(|j| j.id != status.id);
                        history.push_back(status);
                        if history.len() > HISTORY {
                            history.pop_front();
                        }
                    }
                    Entry::Requeued { id } => {
                        if let Some((job, _)) = running.take_if(|(j, _)| j.id == id) {
                            queue.push_front(job);
                        }
                    }
                }
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let mut store = Store {
            path,
            file,
            lines,
            sut: sut.clone(),
            queue,
            running,
            history,
        };
        let mut statuses = Vec::new();
        if let Some((job, started)) = store.running.clone() {
            let mut lost = store.lost_status(
                &job,
                started,
                now_ms,
                "the agent died while the job was running",
            );
            lost.output_bytes = recorded_bytes(dir, &job.id).unwrap_or(0);
            statuses.extend(store.finish_lost(lost, requeue_lost, now_ms)?);
        }
        store.maybe_compact()?;
        Ok((store, statuses))
    }

    fn lost_status(&self, job: &JobRecord, started: u64, now_ms: u64, why: &str) -> JobStatus {
        self.queued_status(job)
            .finished(JobState::Lost, started, now_ms)
            .with_reason(why.to_owned())
    }

    /// Finishes the running job as lost; requeues it at the front when asked. Returns the
    /// statuses to publish.
    pub fn finish_lost(
        &mut self,
        mut lost: JobStatus,
        requeue: bool,
        now_ms: u64,
    ) -> io::Result<Vec<JobStatus>> {
        let Some((job, _)) = self.running.clone() else {
            return Ok(Vec::new());
        };
        if requeue {
            self.append(&Entry::Requeued { id: job.id.clone() })?;
            self.running = None;
            self.queue.push_front(job.clone());
            lost.reason = Some(format!(
                "{}; requeued (requeue_lost = true)",
                lost.reason.unwrap_or_default()
            ));
            let mut queued = self.queued_status(&job);
            queued.reason = Some("requeued after the agent restarted".into());
            let _ = now_ms;
            Ok(vec![lost, queued])
        } else {
            self.finish(lost.clone())?;
            Ok(vec![lost])
        }
    }

    fn append(&mut self, e: &Entry) -> io::Result<()> {
        let mut line = serde_json::to_vec(e).map_err(io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.file.sync_data()?;
        self.lines += 1;
        Ok(())
    }

    fn maybe_compact(&mut self) -> io::Result<()> {
        if self.lines < COMPACT_AFTER {
            return Ok(());
        }
        let tmp = self.path.with_extension("jsonl.tmp");
        let mut f = File::create(&tmp)?;
        let mut n = 0;
        let mut write = |e: &Entry| -> io::Result<()> {
            let mut line = serde_json::to_vec(e).map_err(io::Error::other)?;
            line.push(b'\n');
            n += 1;
            f.write_all(&line)
        };
        for s in &self.history {
            write(&Entry::Finished { status: s.clone() })?;
        }
        if let Some((job, ms)) = &self.running {
            write(&Entry::Accepted {
                job: job.clone(),
                first: false,
            })?;
            write(&Entry::Started {
                id: job.id.clone(),
                ms: *ms,
            })?;
        }
        for job in &self.queue {
            write(&Entry::Accepted {
                job: job.clone(),
                first: false,
            })?;
        }
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.lines = n;
        Ok(())
    }

    /// Whether `id` is queued, running or in the recent history.
    pub fn knows(&self, id: &JobId) -> bool {
        !matches!(self.lookup(id), Lookup::Unknown)
    }

    /// Where `id` is.
    pub fn lookup(&self, id: &JobId) -> Lookup {
        if let Some(p) = self.queue.iter().position(|j| &j.id == id) {
            return Lookup::Queued(p);
        }
        if self.running.as_ref().is_some_and(|(j, _)| &j.id == id) {
            return Lookup::Running;
        }
        match self.history.iter().rev().find(|s| &s.id == id) {
            Some(s) => Lookup::Finished(Box::new(s.clone())),
            None => Lookup::Unknown,
        }
    }

    /// Jobs waiting.
    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// The running job.
    pub fn running(&self) -> Option<&JobRecord> {
        self.running.as_ref().map(|(j, _)| j)
    }

    /// Durably queues `job` (fsynced before it returns). Returns its position (0 = next).
    pub fn accept(&mut self, job: JobRecord) -> io::Result<usize> {
        self.append(&Entry::Accepted {
            job: job.clone(),
            first: false,
        })?;
        self.queue.push_back(job);
        Ok(self.queue.len() - 1 + usize::from(self.running.is_some()))
    }

    /// Durably queues `job` first, before every waiting job (a health check that is due).
    pub fn accept_first(&mut self, job: JobRecord) -> io::Result<()> {
        self.append(&Entry::Accepted {
            job: job.clone(),
            first: true,
        })?;
        self.queue.push_front(job);
        Ok(())
    }

    /// Whether a health check is queued or running.
    pub fn health_check_pending(&self) -> bool {
        self.queue.iter().any(|j| j.health_check)
            || self.running.as_ref().is_some_and(|(j, _)| j.health_check)
    }

    /// Takes the next job and records that it started.
    pub fn start_next(&mut self, now_ms: u64) -> io::Result<Option<JobRecord>> {
        if self.running.is_some() {
            return Ok(None);
        }
        let Some(job) = self.queue.front().cloned() else {
            return Ok(None);
        };
        self.append(&Entry::Started {
            id: job.id.clone(),
            ms: now_ms,
        })?;
        self.queue.pop_front();
        self.running = Some((job.clone(), now_ms));
        Ok(Some(job))
    }

    /// Records a final status (of the running job, or of a queued job that was cancelled).
    /// Returns the job that fell out of the history, whose retained status can be cleared.
    pub fn finish(&mut self, status: JobStatus) -> io::Result<Option<JobId>> {
        self.append(&Entry::Finished {
            status: status.clone(),
        })?;
        if self
            .running
            .as_ref()
            .is_some_and(|(j, _)| j.id == status.id)
        {
            self.running = None;
        }
        self.queue.retain(|j| j.id != status.id);
        self.history.push_back(status);
        let evicted = if self.history.len() > HISTORY {
            self.history.pop_front().map(|s| s.id)
        } else {
            None
        };
        self.maybe_compact()?;
        Ok(evicted)
    }

    /// The queued job `id`, if it is queued.
    pub fn queued(&self, id: &JobId) -> Option<&JobRecord> {
        self.queue.iter().find(|j| &j.id == id)
    }

    /// The `queued` status of a job.
    pub fn queued_status(&self, job: &JobRecord) -> JobStatus {
        JobStatus::accepted(self.sut.clone(), job.id.clone(), job.queued_ms)
            .with_health_check(job.health_check)
    }

    /// The recent finished jobs, oldest first.
    pub fn history(&self) -> impl DoubleEndedIterator<Item = &JobStatus> {
        self.history.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sut() -> SutName {
        SutName::new("s").unwrap()
    }

    fn job(id: &str) -> JobRecord {
        let sub = labvisor_protocol::submit::parse_submit(b"echo hi", 100).unwrap();
        JobRecord::new(
            JobId::new(id).unwrap(),
            &sub,
            Duration::from_secs(60),
            Duration::from_secs(30),
            1,
        )
    }

    #[test]
    fn limits_are_capped_by_the_suts() {
        let sub = labvisor_protocol::submit::parse_submit(
            br#"{"script":"x","timeout":"2h","output_timeout":"1s"}"#,
            100,
        )
        .unwrap();
        let j = JobRecord::new(
            JobId::new("a").unwrap(),
            &sub,
            Duration::from_secs(60),
            Duration::from_secs(30),
            1,
        );
        assert_eq!((j.timeout_ms, j.output_timeout_ms), (60_000, 1_000));
    }

    /// The journal's format is the same as before the record embedded the submission: older
    /// journals replay, and older agents read newer ones.
    #[test]
    fn a_record_is_one_flat_json_object() {
        let line = r#"{"id":"a","script":"echo hi","timeout_ms":60000,"output_timeout_ms":30000,"queued_ms":1}"#;
        assert_eq!(serde_json::to_string(&job("a")).unwrap(), line);
        assert_eq!(serde_json::from_str::<JobRecord>(line).unwrap(), job("a"));
        let argv = r#"{"id":"b","argv":["x","y"],"env":{"K":"v"},"timeout_ms":1,"output_timeout_ms":2,"queued_ms":3}"#;
        let rec: JobRecord = serde_json::from_str(argv).unwrap();
        assert_eq!(
            rec.job.argv.as_deref(),
            Some(&["x".to_owned(), "y".to_owned()][..])
        );
        assert_eq!(rec.job.env["K"], "v");
        assert_eq!(rec.job.id, None);
        assert_eq!(serde_json::to_string(&rec).unwrap(), argv);
    }

    #[test]
    fn queue_survives_reopen_and_a_running_job_becomes_lost() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut s, lost) = Store::open(d.path(), &sut(), false, 10).unwrap();
            assert!(lost.is_empty());
            for i in 0..5 {
                assert_eq!(s.accept(job(&format!("j{i}"))).unwrap(), i);
            }
            assert_eq!(s.start_next(20).unwrap().unwrap().id.as_str(), "j0");
            // The agent dies here.
        }
        let (s, lost) = Store::open(d.path(), &sut(), false, 30).unwrap();
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].id.as_str(), "j0");
        assert_eq!(lost[0].state, JobState::Lost);
        assert_eq!(s.queue_len(), 4);
        assert_eq!(s.lookup(&JobId::new("j1").unwrap()), Lookup::Queued(0));
        assert!(matches!(
            s.lookup(&JobId::new("j0").unwrap()),
            Lookup::Finished(_)
        ));
        // Reopening again does not report it twice.
        drop(s);
        let (_, lost) = Store::open(d.path(), &sut(), false, 40).unwrap();
        assert!(lost.is_empty());
    }

    #[test]
    fn a_lost_job_carries_its_recorded_output_bytes() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Store::open(d.path(), &sut(), false, 0).unwrap();
            s.accept(job("printer")).unwrap();
            s.start_next(1).unwrap();
            let p = |n| JobProgress {
                id: JobId::new("printer").unwrap(),
                output_bytes: n,
            };
            record_progress(d.path(), &p(10)).unwrap();
            record_progress(d.path(), &p(4242)).unwrap();
            // The agent dies here.
        }
        let (mut s, lost) = Store::open(d.path(), &sut(), false, 2).unwrap();
        assert_eq!(lost[0].state, JobState::Lost);
        assert_eq!(lost[0].output_bytes, 4242);
        // A record of another job is not this one's.
        s.accept(job("silent")).unwrap();
        s.start_next(3).unwrap();
        drop(s);
        let (_, lost) = Store::open(d.path(), &sut(), false, 4).unwrap();
        assert_eq!((lost[0].id.as_str(), lost[0].output_bytes), ("silent", 0));
    }

    #[test]
    fn requeue_lost_puts_the_job_back_first() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Store::open(d.path(), &sut(), true, 0).unwrap();
            s.accept(job("a")).unwrap();
            s.accept(job("b")).unwrap();
            s.start_next(1).unwrap();
        }
        let (mut s, st) = Store::open(d.path(), &sut(), true, 2).unwrap();
        assert_eq!(
            st.iter().map(|s| s.state).collect::<Vec<_>>(),
            [JobState::Lost, JobState::Queued]
        );
        assert_eq!(s.start_next(3).unwrap().unwrap().id.as_str(), "a");
    }

    /// A health check queued first stays first across a restart, and its statuses say what it
    /// is; an older agent's line (no `first`, no `health_check`) replays as before.
    #[test]
    fn a_health_check_queued_first_survives_a_reopen() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Store::open(d.path(), &sut(), false, 0).unwrap();
            s.accept(job("a")).unwrap();
            assert!(!s.health_check_pending());
            let hc = JobRecord {
                health_check: true,
                ..job("health-check-1")
            };
            s.accept_first(hc).unwrap();
            assert!(s.health_check_pending());
        }
        let text = std::fs::read_to_string(d.path().join("journal.jsonl")).unwrap();
        assert!(!text.lines().next().unwrap().contains("first"), "{text}");
        let (mut s, _) = Store::open(d.path(), &sut(), false, 1).unwrap();
        let first = s.start_next(2).unwrap().unwrap();
        assert_eq!(first.id.as_str(), "health-check-1");
        assert!(s.health_check_pending(), "running");
        let st = s.queued_status(&first);
        assert!(st.health_check);
        assert!(!s.queued_status(&job("a")).health_check);
    }

    #[test]
    fn compaction_keeps_queue_and_history() {
        let d = tempfile::tempdir().unwrap();
        let (mut s, _) = Store::open(d.path(), &sut(), false, 0).unwrap();
        for i in 0..(COMPACT_AFTER / 3 + 10) {
            s.accept(job(&format!("j{i}"))).unwrap();
            let j = s.start_next(i as u64).unwrap().unwrap();
            let mut st = s.queued_status(&j);
            st.state = JobState::Passed;
            let evicted = s.finish(st).unwrap();
            assert_eq!(evicted.is_some(), i >= HISTORY, "job {i}");
        }
        s.accept(job("waiting")).unwrap();
        drop(s);
        let lines = std::fs::read_to_string(d.path().join("journal.jsonl"))
            .unwrap()
            .lines()
            .count();
        assert!(lines < COMPACT_AFTER, "{lines} lines: compaction happened");
        let (s, _) = Store::open(d.path(), &sut(), false, 0).unwrap();
        assert_eq!(s.queue_len(), 1);
        assert_eq!(s.history().count(), HISTORY);
        let last = format!("j{}", COMPACT_AFTER / 3 + 9);
        assert!(s.knows(&JobId::new(&last).unwrap()));
    }

    #[test]
    fn a_torn_last_line_is_ignored() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Store::open(d.path(), &sut(), false, 0).unwrap();
            s.accept(job("a")).unwrap();
        }
        let mut f = OpenOptions::new()
            .append(true)
            .open(d.path().join("journal.jsonl"))
            .unwrap();
        f.write_all(b"{\"op\":\"accepted\",\"job\":{\"id\":\"b\"")
            .unwrap();
        let (s, _) = Store::open(d.path(), &sut(), false, 0).unwrap();
        assert_eq!(s.queue_len(), 1);
    }
}
