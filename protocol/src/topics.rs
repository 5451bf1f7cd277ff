//! MQTT topics: the only place topic strings exist.
//!
//! Every topic lives under the SUT's name, as in the old testflinger-docker stack, so its users
//! find `<sut>/agent`, `<sut>/output`, `<sut>/submit`, `<sut>/submit_status` and `<sut>/last_job`
//! where they were. An optional global prefix (`--topic-prefix lab1`) puts everything under
//! `lab1/...`, so two labs can share one broker.
//!
//! # Topic table
//!
//! | topic | direction | QoS | retained | payload |
//! |---|---|---|---|---|
//! | `<sut>/agent` | agent → all | 1 | yes | [`AgentStatus`](crate::payloads::AgentStatus) JSON: birth on every connect, every heartbeat, last will `lost`, `offline` on a clean stop |
//! | `<sut>/output` | agent → all | 1 | no | plain UTF-8 text (lossy), batched; MQTT 5 user properties `seq`, `dropped`, `boot` ([`OutputMeta`](crate::payloads::OutputMeta)) |
//! | `<sut>/probe` | agent → all | 1 | yes | [`ProbeResult`](crate::payloads::ProbeResult) JSON (the upstream probe, the old stack's `c3`) |
//! | `<sut>/submit` | submitter → agent | 1 | never | plain text (a shell script) or [`JobSubmit`](crate::payloads::JobSubmit) JSON |
//! | `<sut>/submit_status` | agent → submitter | 1 | yes (latest) | [`SubmitAck`](crate::payloads::SubmitAck) JSON; also sent to `reply_to` / the MQTT 5 response topic |
//! | `<sut>/cancel` | submitter → agent | 1 | never | a job id, `current`, or `{"id": ...}` |
//! | `<sut>/cancel_status` | agent → submitter | 1 | yes (latest) | [`CancelAck`](crate::payloads::CancelAck) JSON |
//! | `<sut>/jobs/<id>` | agent → all | 1 | yes | [`JobStatus`](crate::payloads::JobStatus) JSON |
//! | `<sut>/jobs/<id>/output` | agent → all | 1 | no | plain text, as `<sut>/output` (the job's lines only) |
//! | `<sut>/last_job` | agent → all | 1 | yes | [`JobStatus`](crate::payloads::JobStatus) JSON of the latest job |
//! | `<sut>/build` | supervisor → all | 0 | no | plain UTF-8 text: one line of the SUT's image build (`[build]`), as the engine streams it |
//! | `<sut>/supervisor` | supervisor → all | 1 | yes | [`SutView`](crate::payloads::SutView) JSON: the supervisor's view of that SUT |
//! | `labvisor/supervisors/<id>/status` | supervisor → all | 1 | yes | [`SupervisorStatus`](crate::payloads::SupervisorStatus) JSON: birth, last will `lost`, counts |
//!
//! SUT names ([`SutName`]), job ids ([`JobId`]) and supervisor ids ([`SupervisorId`]) are
//! validated types that cannot contain `/`, `+`, `#` or `$`, so a topic built here always has
//! exactly the levels shown.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::name::{NameError, SutName};

/// Why a topic part is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The prefix has an empty level, a wildcard, `$` or a trailing `/`.
    #[error("topic prefix {0:?} is invalid: use levels of letters, digits, '-' and '_' separated by '/'")]
    BadPrefix(String),
    /// A job id with characters outside `[A-Za-z0-9_-]`, empty, or longer than 64.
    #[error("job id {0:?} is invalid: 1 to 64 characters of letters, digits, '-' and '_'")]
    BadJobId(String),
}

/// A job id: 1 to 64 characters of `[A-Za-z0-9_-]`, so it is a safe topic level and file name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobId(String);

impl JobId {
    /// Checks `s` and wraps it.
    pub fn new(s: &str) -> Result<Self, TopicError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok {
            Ok(JobId(s.to_owned()))
        } else {
            Err(TopicError::BadJobId(s.to_owned()))
        }
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for JobId {
    type Error = TopicError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        JobId::new(&s)
    }
}

impl From<JobId> for String {
    fn from(j: JobId) -> String {
        j.0
    }
}

/// A supervisor's id (`--id`), with the same rules as a SUT name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SupervisorId(String);

impl SupervisorId {
    /// Checks `s` and wraps it.
    pub fn new(s: &str) -> Result<Self, NameError> {
        SutName::new(s).map(|n| SupervisorId(n.as_str().to_owned()))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SupervisorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for SupervisorId {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        SupervisorId::new(&s)
    }
}

impl From<SupervisorId> for String {
    fn from(j: SupervisorId) -> String {
        j.0
    }
}

/// What a topic under a SUT carries; returned by [`Topics::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SutTopic {
    /// `<sut>/agent`
    Agent,
    /// `<sut>/output`
    Output,
    /// `<sut>/probe`
    Probe,
    /// `<sut>/submit`
    Submit,
    /// `<sut>/submit_status`
    SubmitStatus,
    /// `<sut>/cancel`
    Cancel,
    /// `<sut>/cancel_status`
    CancelStatus,
    /// `<sut>/last_job`
    LastJob,
    /// `<sut>/supervisor`
    Supervisor,
    /// `<sut>/build`
    Build,
    /// `<sut>/jobs/<id>`
    Job(JobId),
    /// `<sut>/jobs/<id>/output`
    JobOutput(JobId),
}

/// Builds (and parses) every topic, with the optional global prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topics {
    /// `""` or `"<prefix>/"`.
    prefix: String,
}

impl Topics {
    /// Topics with no prefix.
    pub fn new() -> Self {
        Self::default()
    }

    /// Topics under `prefix` (for example `lab1` or `site/lab1`); `None` or `""` means none.
    pub fn with_prefix(prefix: Option<&str>) -> Result<Self, TopicError> {
        let p = match prefix {
            None | Some("") => return Ok(Self::new()),
            Some(p) => p,
        };
        let ok = p.split('/').all(|level| {
            !level.is_empty()
                && !level.starts_with('$')
                && level
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
        if !ok {
            return Err(TopicError::BadPrefix(p.to_owned()));
        }
        Ok(Topics {
            prefix: format!("{p}/"),
        })
    }

    /// The prefix without its trailing `/` (`""` when there is none).
    pub fn prefix(&self) -> &str {
        self.prefix.trim_end_matches('/')
    }

    /// The mosquitto ACL pattern that confines an agent, logged in as its SUT's name, to its
    /// own topics: `[<prefix>/]%u/#` (`%u` is the user name).
    pub fn agent_acl_pattern(&self) -> String {
        format!("{}%u/#", self.prefix)
    }

    fn sut(&self, sut: &SutName, leaf: &str) -> String {
        format!("{}{}/{leaf}", self.prefix, sut)
    }

    /// `<sut>/agent`: the agent's retained status and heartbeat.
    pub fn agent(&self, sut: &SutName) -> String {
        self.sut(sut, "agent")
    }
    /// `<sut>/output`: the device process's and jobs' output.
    pub fn output(&self, sut: &SutName) -> String {
        self.sut(sut, "output")
    }
    /// `<sut>/probe`: the upstream probe's latest result.
    pub fn probe(&self, sut: &SutName) -> String {
        self.sut(sut, "probe")
    }
    /// `<sut>/submit`: where jobs are submitted.
    pub fn submit(&self, sut: &SutName) -> String {
        self.sut(sut, "submit")
    }
    /// `<sut>/submit_status`: the latest submission's acknowledgement.
    pub fn submit_status(&self, sut: &SutName) -> String {
        self.sut(sut, "submit_status")
    }
    /// `<sut>/cancel`: cancel requests.
    pub fn cancel(&self, sut: &SutName) -> String {
        self.sut(sut, "cancel")
    }
    /// `<sut>/cancel_status`: the latest cancel request's acknowledgement.
    pub fn cancel_status(&self, sut: &SutName) -> String {
        self.sut(sut, "cancel_status")
    }
    /// `<sut>/last_job`: the latest job's status.
    pub fn last_job(&self, sut: &SutName) -> String {
        self.sut(sut, "last_job")
    }
    /// `<sut>/supervisor`: the supervisor's view of the SUT.
    pub fn supervisor(&self, sut: &SutName) -> String {
        self.sut(sut, "supervisor")
    }
    /// `<sut>/build`: the progress lines of the SUT's image build.
    pub fn build(&self, sut: &SutName) -> String {
        self.sut(sut, "build")
    }
    /// `<sut>/jobs/<id>`: one job's status.
    pub fn job(&self, sut: &SutName, id: &JobId) -> String {
        format!("{}{}/jobs/{}", self.prefix, sut, id)
    }
    /// `<sut>/jobs/<id>/output`: one job's output.
    pub fn job_output(&self, sut: &SutName, id: &JobId) -> String {
        format!("{}{}/jobs/{}/output", self.prefix, sut, id)
    }
    /// `<sut>/jobs/+`: filter for every job status of a SUT.
    pub fn jobs_filter(&self, sut: &SutName) -> String {
        format!("{}{}/jobs/+", self.prefix, sut)
    }
    /// `labvisor/supervisors/<id>/status`: a supervisor's retained status.
    pub fn supervisor_status(&self, id: &SupervisorId) -> String {
        format!("{}labvisor/supervisors/{}/status", self.prefix, id)
    }
    /// `labvisor/supervisors/+/status`: filter for every supervisor's status.
    pub fn supervisor_status_filter(&self) -> String {
        format!("{}labvisor/supervisors/+/status", self.prefix)
    }
    /// `+/agent`: filter for every agent's status.
    pub fn agents_filter(&self) -> String {
        format!("{}+/agent", self.prefix)
    }
    /// `+/last_job`: filter for every SUT's last finished job.
    pub fn last_jobs_filter(&self) -> String {
        format!("{}+/last_job", self.prefix)
    }
    /// `+/supervisor`: filter for every SUT's supervisor view.
    pub fn sut_views_filter(&self) -> String {
        format!("{}+/supervisor", self.prefix)
    }

    /// Splits a topic built by this [`Topics`] into its SUT and kind; `None` for anything else.
    pub fn parse(&self, topic: &str) -> Option<(SutName, SutTopic)> {
        let rest = topic.strip_prefix(self.prefix.as_str())?;
        let mut levels = rest.split('/');
        let sut = SutName::new(levels.next()?).ok()?;
        let kind = match (levels.next()?, levels.next(), levels.next(), levels.next()) {
            ("agent", None, ..) => SutTopic::Agent,
            ("output", None, ..) => SutTopic::Output,
            ("probe", None, ..) => SutTopic::Probe,
            ("submit", None, ..) => SutTopic::Submit,
            ("submit_status", None, ..) => SutTopic::SubmitStatus,
            ("cancel", None, ..) => SutTopic::Cancel,
            ("cancel_status", None, ..) => SutTopic::CancelStatus,
            ("last_job", None, ..) => SutTopic::LastJob,
            ("supervisor", None, ..) => SutTopic::Supervisor,
            ("build", None, ..) => SutTopic::Build,
            ("jobs", Some(id), None, _) => SutTopic::Job(JobId::new(id).ok()?),
            ("jobs", Some(id), Some("output"), None) => SutTopic::JobOutput(JobId::new(id).ok()?),
            _ => return None,
        };
        Some((sut, kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sut(s: &str) -> SutName {
        SutName::new(s).unwrap()
    }

    #[test]
    fn builds_the_old_stacks_names() {
        let t = Topics::new();
        let s = sut("rpi4-01");
        assert_eq!(t.agent(&s), "rpi4-01/agent");
        assert_eq!(t.output(&s), "rpi4-01/output");
        assert_eq!(t.submit(&s), "rpi4-01/submit");
        assert_eq!(t.submit_status(&s), "rpi4-01/submit_status");
        assert_eq!(t.last_job(&s), "rpi4-01/last_job");
        assert_eq!(t.build(&s), "rpi4-01/build");
        assert_eq!(t.parse("rpi4-01/build"), Some((s.clone(), SutTopic::Build)));
        let id = JobId::new("01J9Z").unwrap();
        assert_eq!(t.job(&s, &id), "rpi4-01/jobs/01J9Z");
        assert_eq!(t.job_output(&s, &id), "rpi4-01/jobs/01J9Z/output");
        assert_eq!(
            t.supervisor_status(&SupervisorId::new("lab-a").unwrap()),
            "labvisor/supervisors/lab-a/status"
        );
    }

    #[test]
    fn prefix_applies_everywhere() {
        let t = Topics::with_prefix(Some("site/lab1")).unwrap();
        let s = sut("x1");
        assert_eq!(t.agent(&s), "site/lab1/x1/agent");
        assert_eq!(t.agents_filter(), "site/lab1/+/agent");
        assert_eq!(
            t.supervisor_status_filter(),
            "site/lab1/labvisor/supervisors/+/status"
        );
        assert_eq!(t.parse("site/lab1/x1/submit"), Some((s, SutTopic::Submit)));
        assert_eq!(t.parse("x1/submit"), None);
    }

    #[test]
    fn bad_prefixes_and_job_ids_are_refused() {
        for p in ["a//b", "a/", "/a", "+", "a/#", "$SYS", "a b"] {
            assert!(Topics::with_prefix(Some(p)).is_err(), "{p}");
        }
        for j in ["", "a/b", "a+", "#", &"x".repeat(65), "a.b"] {
            assert!(JobId::new(j).is_err(), "{j}");
        }
    }

    #[test]
    fn parse_rejects_foreign_topics() {
        let t = Topics::new();
        for bad in [
            "x",
            "x/unknown",
            "X/agent",
            "x/jobs",
            "x/jobs/a/b",
            "x/agent/more",
        ] {
            assert_eq!(t.parse(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn every_built_topic_parses_back(name in "[a-z0-9][a-z0-9_-]{0,20}", id in "[A-Za-z0-9_-]{1,20}") {
            let t = Topics::with_prefix(Some("lab")).unwrap();
            let s = sut(&name);
            let j = JobId::new(&id).unwrap();
            prop_assert_eq!(t.parse(&t.agent(&s)), Some((s.clone(), SutTopic::Agent)));
            prop_assert_eq!(t.parse(&t.submit(&s)), Some((s.clone(), SutTopic::Submit)));
            prop_assert_eq!(t.parse(&t.job(&s, &j)), Some((s.clone(), SutTopic::Job(j.clone()))));
            prop_assert_eq!(t.parse(&t.job_output(&s, &j)), Some((s.clone(), SutTopic::JobOutput(j))));
            prop_assert_eq!(t.agent(&s).split('/').count(), 3);
        }
    }
}
