//! The page's model of the lab, fed by the broker's messages: pure (topic and payload in,
//! [`Update`]s out), so it is tested without a broker or a browser.
//!
//! A row is what `labvisor status` shows for a SUT ([`crate::cli::status`]: the same problems,
//! groups and details), plus what the page shows beyond it: the heartbeat's time (the page ages
//! it itself), the device's own work, the last job, the image and container.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use labvisor_protocol::payloads::{
    now_ms, AgentStatus, JobStatus, OutputMeta, SupervisorStatus, SutView,
};
use labvisor_protocol::topics::{JobId, SutTopic, Topics};
use labvisor_protocol::SutName;
use serde::Serialize;

use crate::cli::status::{row, StatusRow};
use crate::cli::triage::{self, Group, Summary};

/// Output kept per SUT for a page that opens its view, in bytes.
pub const OUTPUT_KEPT: usize = 256 * 1024;
/// Jobs kept per SUT in its history.
pub const JOBS_KEPT: usize = 50;

/// One SUT's row on the lab view.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What `labvisor status` shows.
    #[serde(flatten)]
    pub status: StatusRow,
    /// The group it counts in on the summary line.
    pub group: Group,
    /// When its agent's latest status was made, ms since the epoch (the page shows its age).
    pub heartbeat_ms: Option<u64>,
    /// The device's own work, when it is busy with it.
    pub device_work: Option<String>,
    /// Its latest job.
    pub last_job: Option<JobStatus>,
    /// The image its container runs.
    pub image: Option<String>,
    /// Its container.
    pub container_id: Option<String>,
    /// An action waiting, and why.
    pub pending_action: Option<String>,
    /// The problems of its file, when that is invalid.
    pub config_problems: Vec<String>,
}

/// A piece of a SUT's live output, or a note where output was lost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Chunk {
    /// The text (whole lines, as the agent sent them).
    pub text: String,
    /// Output lost before this piece, said in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gap: Option<String>,
}

/// What changed, for the pages that watch.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Update {
    /// A SUT's row changed (or is new).
    Row {
        /// The row.
        row: Box<Row>,
        /// The lab's summary after the change.
        summary: Summary,
    },
    /// A SUT is gone (its retained topics were cleared).
    Gone {
        /// The SUT.
        sut: SutName,
        /// The lab's summary after the change.
        summary: Summary,
    },
    /// A job's status.
    Job {
        /// The SUT.
        sut: SutName,
        /// The status.
        job: Box<JobStatus>,
    },
    /// Live output.
    Output {
        /// The SUT.
        sut: SutName,
        /// The piece.
        chunk: Chunk,
    },
}

impl Update {
    /// The SUT it is about.
    pub fn sut(&self) -> &str {
        match self {
            Update::Row { row, .. } => &row.status.sut,
            Update::Gone { sut, .. } | Update::Job { sut, .. } | Update::Output { sut, .. } => {
                sut.as_str()
            }
        }
    }

    /// Whether the lab view shows it (rows and removals; not jobs and output).
    pub fn for_lab(&self) -> bool {
        matches!(self, Update::Row { .. } | Update::Gone { .. })
    }
}

/// The whole lab, for a lab view that starts or fell behind.
#[derive(Debug, Clone, Serialize)]
pub struct LabSnapshot {
    /// The server's clock, ms since the epoch (the page ages heartbeats against it).
    pub now_ms: u64,
    /// Every SUT, problems first, then by name.
    pub rows: Vec<Row>,
    /// The summary line's numbers.
    pub summary: Summary,
    /// The summary line.
    pub line: String,
    /// The supervisors, with what is wrong with each.
    pub supervisors: Vec<SupervisorLine>,
}

/// A supervisor on the lab view.
#[derive(Debug, Clone, Serialize)]
pub struct SupervisorLine {
    /// Its status.
    pub status: SupervisorStatus,
    /// What is wrong with it.
    pub problem: Option<&'static str>,
}

/// One SUT, for its view.
#[derive(Debug, Clone, Serialize)]
pub struct SutSnapshot {
    /// The server's clock.
    pub now_ms: u64,
    /// Its row; absent when the broker knows nothing of it.
    pub row: Option<Row>,
    /// The supervisor's view of it (container, image, pending action).
    pub view: Option<SutView>,
    /// Its jobs, newest first.
    pub jobs: Vec<JobStatus>,
    /// Its recent output, oldest first.
    pub output: Vec<Chunk>,
}

#[derive(Debug, Default)]
struct Sut {
    agent: Option<AgentStatus>,
    view: Option<SutView>,
    last_job: Option<JobStatus>,
    jobs: BTreeMap<JobId, JobStatus>,
    output: VecDeque<Chunk>,
    output_bytes: usize,
    last_meta: Option<OutputMeta>,
}

impl Sut {
    fn is_empty(&self) -> bool {
        self.agent.is_none() && self.view.is_none() && self.last_job.is_none()
    }
}

/// The lab as the broker tells it.
#[derive(Debug)]
pub struct Lab {
    topics: Topics,
    suts: BTreeMap<SutName, Sut>,
    supervisors: BTreeMap<String, SupervisorStatus>,
}

impl Lab {
    /// An empty lab on `topics`.
    pub fn new(topics: Topics) -> Self {
        Lab {
            topics,
            suts: BTreeMap::new(),
            supervisors: BTreeMap::new(),
        }
    }

    /// Takes one message (`meta`: an output message's properties) and says what changed.
    pub fn apply(&mut self, topic: &str, payload: &[u8], meta: Option<OutputMeta>) -> Vec<Update> {
        let Some((sut, what)) = self.topics.parse(topic) else {
            if let Ok(s) = serde_json::from_slice::<SupervisorStatus>(payload) {
                self.supervisors.insert(s.id.to_string(), s);
            }
            return Vec::new();
        };
        let entry = self.suts.entry(sut.clone()).or_default();
        let row_changed = match what {
            SutTopic::Agent => {
                entry.agent = serde_json::from_slice(payload).ok();
                true
            }
            SutTopic::Supervisor => {
                entry.view = serde_json::from_slice(payload).ok();
                true
            }
            SutTopic::LastJob => {
                entry.last_job = serde_json::from_slice(payload).ok();
                true
            }
            SutTopic::Job(id) => {
                let Ok(job) = serde_json::from_slice::<JobStatus>(payload) else {
                    entry.jobs.remove(&id);
                    return Vec::new();
                };
                entry.jobs.insert(id, job.clone());
                while entry.jobs.len() > JOBS_KEPT {
                    let oldest = entry
                        .jobs
                        .iter()
                        .min_by_key(|(_, j)| j.queued_ms)
                        .map(|(id, _)| id.clone());
                    if let Some(id) = oldest {
                        entry.jobs.remove(&id);
                    }
                }
                return vec![Update::Job {
                    sut,
                    job: Box::new(job),
                }];
            }
            SutTopic::Output => {
                return Self::output(entry, payload, meta)
                    .map(|chunk| Update::Output { sut, chunk })
                    .into_iter()
                    .collect();
            }
            _ => false,
        };
        if !row_changed {
            return Vec::new();
        }
        if entry.is_empty() {
            self.suts.remove(&sut);
            return vec![Update::Gone {
                sut,
                summary: self.summary(),
            }];
        }
        let row = self.row(&sut);
        row.map(|row| Update::Row {
            row: Box::new(row),
            summary: self.summary(),
        })
        .into_iter()
        .collect()
    }

    /// Keeps an output message (skipping a resend) and returns it, with a note of what was lost
    /// before it.
    fn output(entry: &mut Sut, payload: &[u8], meta: Option<OutputMeta>) -> Option<Chunk> {
        let mut gap = None;
        if let Some(meta) = meta {
            let (show, note) = crate::cli::logs::output_step(entry.last_meta.as_ref(), &meta);
            if !show {
                return None;
            }
            gap = note;
            entry.last_meta = Some(meta);
        }
        if payload.is_empty() && gap.is_none() {
            return None;
        }
        let chunk = Chunk {
            text: String::from_utf8_lossy(payload).into_owned(),
            gap,
        };
        entry.output_bytes += chunk.text.len();
        entry.output.push_back(chunk.clone());
        while entry.output_bytes > OUTPUT_KEPT {
            match entry.output.pop_front() {
                Some(old) => entry.output_bytes -= old.text.len(),
                None => break,
            }
        }
        Some(chunk)
    }

    fn expects_agent(&self, v: Option<&SutView>) -> bool {
        !v.is_some_and(|v| {
            self.supervisors
                .get(v.supervisor.as_str())
                .is_some_and(|s| s.agents_without_broker)
        })
    }

    /// `sut`'s row, if the broker knows it.
    pub fn row(&self, sut: &SutName) -> Option<Row> {
        let s = self.suts.get(sut)?;
        if s.agent.is_none() && s.view.is_none() {
            return None;
        }
        let (a, v) = (s.agent.as_ref(), s.view.as_ref());
        let status = row(sut, a, v, self.expects_agent(v));
        Some(Row {
            group: status.group,
            status,
            heartbeat_ms: a.map(|a| a.time_ms),
            device_work: a.and_then(|a| a.device_work.clone()),
            last_job: s.last_job.clone(),
            image: v.and_then(|v| v.image.clone()),
            container_id: v.and_then(|v| v.container_id.clone()),
            pending_action: v.and_then(|v| v.pending_action.clone()),
            config_problems: v.map(|v| v.config_problems.clone()).unwrap_or_default(),
        })
    }

    fn rows(&self) -> Vec<Row> {
        let mut rows: Vec<Row> = self.suts.keys().filter_map(|n| self.row(n)).collect();
        rows.sort_by(|a, b| {
            (a.group != Group::Problem, &a.status.sut)
                .cmp(&(b.group != Group::Problem, &b.status.sut))
        });
        rows
    }

    /// The summary line's numbers.
    pub fn summary(&self) -> Summary {
        let now = now_ms();
        let rows: Vec<Row> = self.suts.keys().filter_map(|n| self.row(n)).collect();
        let sups: Vec<Option<&str>> = self
            .supervisors
            .values()
            .map(|s| triage::supervisor_problem(s, now))
            .collect();
        Summary::of(
            rows.iter().map(|r| (r.group, r.status.problems.as_slice())),
            &sups,
        )
    }

    /// The whole lab.
    pub fn snapshot(&self) -> LabSnapshot {
        let now = now_ms();
        let summary = self.summary();
        LabSnapshot {
            now_ms: now,
            rows: self.rows(),
            line: summary.line(),
            summary,
            supervisors: self
                .supervisors
                .values()
                .map(|s| SupervisorLine {
                    problem: triage::supervisor_problem(s, now),
                    status: s.clone(),
                })
                .collect(),
        }
    }

    /// One SUT, for its view.
    pub fn sut(&self, sut: &SutName) -> SutSnapshot {
        let s = self.suts.get(sut);
        let mut jobs: Vec<JobStatus> = s
            .map(|s| s.jobs.values().cloned().collect())
            .unwrap_or_default();
        jobs.sort_by(|a, b| b.queued_ms.cmp(&a.queued_ms).then(b.id.cmp(&a.id)));
        SutSnapshot {
            now_ms: now_ms(),
            row: self.row(sut),
            view: s.and_then(|s| s.view.clone()),
            jobs,
            output: s
                .map(|s| s.output.iter().cloned().collect())
                .unwrap_or_default(),
        }
    }

    /// Forgets `sut`'s output and jobs (no page shows it any more); its row stays.
    pub fn unwatch(&mut self, sut: &SutName) {
        if let Some(s) = self.suts.get_mut(sut) {
            s.output.clear();
            s.output_bytes = 0;
            s.last_meta = None;
            s.jobs.clear();
            if s.is_empty() {
                self.suts.remove(sut);
            }
        }
    }

    /// Whether the broker knows `sut`.
    pub fn knows(&self, sut: &SutName) -> bool {
        self.suts.contains_key(sut)
    }

    /// The SUTs whose agent status the page holds: what a login must be able to read to see
    /// the page's lab.
    pub fn with_agent_status(&self) -> BTreeSet<SutName> {
        self.suts
            .iter()
            .filter(|(_, s)| s.agent.is_some())
            .map(|(n, _)| n.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use labvisor_protocol::payloads::{AgentState, Health, VERSION};

    fn agent(sut: &str, state: AgentState) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "v": VERSION, "sut": sut, "state": state, "time_ms": now_ms(), "time": "",
            "seq": 1, "boot_id": "b", "agent_version": "0", "queue_len": 2,
            "broker_connected": true, "output_dropped": 0,
        }))
        .unwrap()
    }

    fn view(sut: &str, health: Health) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "v": VERSION, "sut": sut, "supervisor": "s1", "health": health, "restarts": 1,
            "time_ms": now_ms(), "image": "img:1",
        }))
        .unwrap()
    }

    fn meta(seq: u64, dropped: u64) -> Option<OutputMeta> {
        Some(OutputMeta {
            seq,
            dropped,
            boot: "b".into(),
        })
    }

    #[test]
    fn a_row_is_the_status_row_with_the_pages_extras_and_problems_come_first() {
        let mut lab = Lab::new(Topics::new());
        let u = lab.apply("b/agent", &agent("b", AgentState::Idle), None);
        let [Update::Row { row, summary }] = u.as_slice() else {
            panic!("{u:?}")
        };
        assert_eq!(row.group, Group::Healthy);
        assert_eq!(row.status.queue, 2);
        assert!(row.heartbeat_ms.is_some());
        assert_eq!(summary.healthy, 1);
        lab.apply("a/agent", &agent("a", AgentState::Idle), None);
        lab.apply("b/supervisor", &view("b", Health::Unhealthy), None);
        let snap = lab.snapshot();
        let names: Vec<_> = snap.rows.iter().map(|r| r.status.sut.as_str()).collect();
        assert_eq!(names, ["b", "a"], "the unhealthy one first");
        assert_eq!(snap.rows[0].group, Group::Problem);
        assert_eq!(snap.rows[0].image.as_deref(), Some("img:1"));
        assert_eq!(snap.summary.problems, 1);
        assert!(snap.line.starts_with("2 SUTs: 1 healthy"), "{}", snap.line);
    }

    #[test]
    fn cleared_topics_remove_the_sut() {
        let mut lab = Lab::new(Topics::new());
        lab.apply("a/agent", &agent("a", AgentState::Idle), None);
        lab.apply("a/supervisor", &view("a", Health::Healthy), None);
        assert!(matches!(
            lab.apply("a/agent", b"", None).as_slice(),
            [Update::Row { .. }]
        ));
        let u = lab.apply("a/supervisor", b"", None);
        assert!(matches!(u.as_slice(), [Update::Gone { summary, .. }] if summary.suts == 0));
        assert!(lab.snapshot().rows.is_empty());
    }

    #[test]
    fn output_skips_resends_and_says_where_lines_were_lost() {
        let mut lab = Lab::new(Topics::new());
        let sut = SutName::new("a").unwrap();
        let texts = |u: Vec<Update>| -> Vec<Chunk> {
            u.into_iter()
                .filter_map(|u| match u {
                    Update::Output { chunk, .. } => Some(chunk),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(texts(lab.apply("a/output", b"one\n", meta(0, 0))).len(), 1);
        assert!(texts(lab.apply("a/output", b"one\n", meta(0, 0))).is_empty());
        let c = texts(lab.apply("a/output", b"four\n", meta(1, 2)));
        assert_eq!(c[0].text, "four\n");
        assert!(
            c[0].gap.as_deref().unwrap().contains("2 lines lost"),
            "{c:?}"
        );
        let c = texts(lab.apply("a/output", b"six\n", meta(3, 2)));
        assert!(c[0].gap.as_deref().unwrap().contains("1 messages missing"));
        let snap = lab.sut(&sut);
        assert_eq!(snap.output.len(), 3);
        assert!(snap.row.is_none(), "output alone makes no row");
    }

    #[test]
    fn output_keeps_a_bounded_tail() {
        let mut lab = Lab::new(Topics::new());
        let line = "x".repeat(1023) + "\n";
        for seq in 0..(OUTPUT_KEPT / 1024 + 10) as u64 {
            lab.apply("a/output", line.as_bytes(), meta(seq, 0));
        }
        let snap = lab.sut(&SutName::new("a").unwrap());
        assert_eq!(snap.output.len(), OUTPUT_KEPT / 1024);
    }

    #[test]
    fn jobs_are_kept_newest_first_and_bounded() {
        let mut lab = Lab::new(Topics::new());
        let sut = SutName::new("a").unwrap();
        for i in 0..(JOBS_KEPT as u64 + 5) {
            let id = JobId::new(&format!("j{i:03}")).unwrap();
            let job = JobStatus::accepted(sut.clone(), id.clone(), 1000 + i);
            let u = lab.apply(
                &format!("a/jobs/{id}"),
                &serde_json::to_vec(&job).unwrap(),
                None,
            );
            assert!(matches!(u.as_slice(), [Update::Job { .. }]));
        }
        let jobs = lab.sut(&sut).jobs;
        assert_eq!(jobs.len(), JOBS_KEPT);
        assert_eq!(jobs[0].id.as_str(), "j054");
    }

    #[test]
    fn an_unwatched_sut_keeps_its_row_and_forgets_its_output_and_jobs() {
        let mut lab = Lab::new(Topics::new());
        let sut = SutName::new("a").unwrap();
        lab.apply("a/agent", &agent("a", AgentState::Idle), None);
        lab.apply("a/output", b"line\n", meta(0, 0));
        let job = JobStatus::accepted(sut.clone(), JobId::new("j1").unwrap(), 1000);
        lab.apply("a/jobs/j1", &serde_json::to_vec(&job).unwrap(), None);
        let snap = lab.sut(&sut);
        assert_eq!((snap.output.len(), snap.jobs.len()), (1, 1));
        lab.unwatch(&sut);
        let snap = lab.sut(&sut);
        assert!(snap.row.is_some());
        assert_eq!((snap.output.len(), snap.jobs.len()), (0, 0));
        // A SUT the lab knew only by its output is gone.
        lab.apply("b/output", b"line\n", meta(0, 0));
        lab.unwatch(&SutName::new("b").unwrap());
        assert!(!lab.knows(&SutName::new("b").unwrap()));
    }
}
