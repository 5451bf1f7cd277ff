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
//! | `<sut>/probe` | agent → all | 1 | yes | [`ProbeResult`](crate::payloads::ProbeResult) JSON (the upstream probe, the old stack's `c3`; for an exec probe, its command in `url` and the reason in `error`) |
//! | `<sut>/submit` | submitter → agent | 1 | never (a retained job is rejected, never run) | plain text (a shell script) or [`JobSubmit`](crate::payloads::JobSubmit) JSON |
//! | `<sut>/submit_status` | agent → submitter | 1 | yes (latest) | [`SubmitAck`](crate::payloads::SubmitAck) JSON; also sent to `reply_to` / the MQTT 5 response topic |
//! | `labvisor/replies/<sut>/...` | agent → submitter | 1 | no | the SUT's reply space (`Topics::reply_space`): a submission's `reply_to` / MQTT 5 response topic must lie here (or under `<sut>/`, outside labvisor's own topics), where both shipped ACLs let the agent write |
//! | `<sut>/cancel` | submitter → agent | 1 | never | a job id, `current`, or `{"id": ...}` |
//! | `<sut>/cancel_status` | agent → submitter | 1 | yes (latest) | [`CancelAck`](crate::payloads::CancelAck) JSON |
//! | `<sut>/admin` | admin → agent | 1 | never (a retained command is ignored) | [`AdminCommand`](crate::payloads::AdminCommand) JSON, or plain text `offline REASON`, `maintenance REASON`, `online`; the agent's answer is its status on `<sut>/agent` (`admin`) |
//! | `<sut>/jobs/<id>` | agent → all | 1 | yes | [`JobStatus`](crate::payloads::JobStatus) JSON |
//! | `<sut>/jobs/<id>/output` | agent → all | 1 | no | plain text, as `<sut>/output` (the job's lines only) |
//! | `<sut>/last_job` | agent → all | 1 | yes | [`JobStatus`](crate::payloads::JobStatus) JSON of the latest job |
//! | `<sut>/build` | supervisor → all | 0 | no | plain UTF-8 text: one line of the SUT's image build (`[build]`), as the engine streams it |
//! | `<sut>/supervisor` | supervisor → all | 1 | yes | [`SutView`](crate::payloads::SutView) JSON: the supervisor's view of that SUT |
//! | `labvisor/supervisors/<id>/status` | supervisor → all | 1 | yes | [`SupervisorStatus`](crate::payloads::SupervisorStatus) JSON: birth, last will `lost`, counts, problems of directory entries that name no SUT; republished every `refresh_ms` when unchanged; `agents_without_broker: true` when its agents run without MQTT (`labvisor status` then expects no agent status) |
//! | `labvisor/supervisors/<id>/restart` | submitter → supervisor | 1 | never | [`RestartRequest`](crate::payloads::RestartRequest) JSON: a rolling restart (`labvisor restart`) |
//! | `labvisor/supervisors/<id>/restart_status` | supervisor → all | 1 | yes (the running or last restart; a rejection is sent not retained) | [`RestartStatus`](crate::payloads::RestartStatus) JSON: the rolling restart's progress |
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
    /// `<sut>/admin`: offline, online, maintenance.
    Admin,
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

    /// The mosquitto ACL pattern of an agent's reply space: `[<prefix>/]labvisor/replies/%u/#`.
    pub fn agent_reply_acl_pattern(&self) -> String {
        format!("{}labvisor/replies/%u/#", self.prefix)
    }

    /// What the agents' ACL patterns would give a login named `login`: `[<prefix>/]<login>/#`
    /// and `[<prefix>/]labvisor/replies/<login>/#` (a role login denies both).
    pub fn login_spaces(&self, login: &str) -> [String; 2] {
        [
            format!("{}{login}/#", self.prefix),
            format!("{}labvisor/replies/{login}/#", self.prefix),
        ]
    }

    /// `+/submit`: every SUT's submission topic.
    pub fn submit_filter(&self) -> String {
        format!("{}+/submit", self.prefix)
    }

    /// `+/cancel`: every SUT's cancel topic.
    pub fn cancel_filter(&self) -> String {
        format!("{}+/cancel", self.prefix)
    }

    /// `+/admin`: every SUT's admin topic (offline, online, maintenance).
    pub fn admin_filter(&self) -> String {
        format!("{}+/admin", self.prefix)
    }

    /// `labvisor/cli/<client>/probe`: a client command's end-of-retained marker.
    pub fn cli_probe(&self, client: &str) -> String {
        format!("{}labvisor/cli/{client}/probe", self.prefix)
    }

    /// `labvisor/cli/+/probe`: every client command's marker topic.
    pub fn cli_probe_filter(&self) -> String {
        format!("{}labvisor/cli/+/probe", self.prefix)
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
    /// `<sut>/admin`: the SUT's admin commands (offline, online, maintenance).
    pub fn admin(&self, sut: &SutName) -> String {
        self.sut(sut, "admin")
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
    /// Every retained topic of a SUT with a fixed name (not the `<sut>/jobs/<id>` statuses,
    /// see [`Topics::jobs_filter`]): what is left to clear when the SUT is removed.
    pub fn sut_retained(&self, sut: &SutName) -> Vec<String> {
        [
            "agent",
            "probe",
            "submit_status",
            "cancel_status",
            "last_job",
            "supervisor",
        ]
        .into_iter()
        .map(|leaf| self.sut(sut, leaf))
        .collect()
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

    // -- lab operations (helper ops): the rolling restart.
    /// `labvisor/supervisors/<id>/restart`: a rolling restart request to a supervisor
    /// ([`RestartRequest`](crate::payloads::RestartRequest)), written by submitters and local
    /// tools.
    pub fn supervisor_restart(&self, id: &SupervisorId) -> String {
        format!("{}labvisor/supervisors/{}/restart", self.prefix, id)
    }
    /// `labvisor/supervisors/+/restart`: every supervisor's restart request topic (the ACLs).
    pub fn supervisor_restart_filter(&self) -> String {
        format!("{}labvisor/supervisors/+/restart", self.prefix)
    }
    /// `labvisor/supervisors/<id>/restart_status`: the progress of a supervisor's rolling
    /// restart ([`RestartStatus`](crate::payloads::RestartStatus)), retained.
    pub fn supervisor_restart_status(&self, id: &SupervisorId) -> String {
        format!("{}labvisor/supervisors/{}/restart_status", self.prefix, id)
    }
    /// `labvisor/supervisors/+/restart_status`: every supervisor's restart progress.
    pub fn supervisor_restart_status_filter(&self) -> String {
        format!("{}labvisor/supervisors/+/restart_status", self.prefix)
    }
    // -- end of lab operations.

    /// `[<prefix>/]labvisor/replies/<sut>/#`: the SUT's reply space, where a submitter's
    /// `reply_to` or MQTT 5 response topic must lie (the shipped ACL lets the agent, logged in
    /// as its SUT, write there and nowhere else outside `<sut>/`).
    pub fn reply_space(&self, sut: &SutName) -> String {
        format!("{}labvisor/replies/{}/#", self.prefix, sut)
    }
    /// Whether `topic` (a topic name) lies in [`Topics::reply_space`] of `sut`.
    pub fn is_reply_topic(&self, sut: &SutName, topic: &str) -> bool {
        let root = format!("{}labvisor/replies/{}", self.prefix, sut);
        let plain = !topic.contains(['+', '#', '\0']);
        plain
            && topic
                .strip_prefix(&root)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }
    /// Whether an agent may answer on `topic`: in its [reply space](Topics::reply_space), or
    /// under `<sut>/` but not one of labvisor's own topics there (an answer on `<sut>/submit`
    /// would be taken for a job, one on `<sut>/agent` for a status).
    pub fn is_allowed_reply(&self, sut: &SutName, topic: &str) -> bool {
        if self.is_reply_topic(sut, topic) {
            return true;
        }
        let own = format!("{}{}/", self.prefix, sut);
        !topic.contains(['+', '#', '\0'])
            && topic.strip_prefix(&own).is_some_and(|rest| {
                !rest.is_empty()
                    && !rest.split('/').any(str::is_empty)
                    && !rest.starts_with("jobs/")
                    && rest != "jobs"
            })
            && self.parse(topic).is_none()
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
    /// `+/output`: filter for every SUT's output (a follower of the whole lab).
    pub fn outputs_filter(&self) -> String {
        format!("{}+/output", self.prefix)
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
            ("admin", None, ..) => SutTopic::Admin,
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
        assert_eq!(t.admin(&s), "rpi4-01/admin");
        assert_eq!(t.admin_filter(), "+/admin");
        assert_eq!(t.parse("rpi4-01/admin"), Some((s.clone(), SutTopic::Admin)));
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
    fn a_suts_retained_topics_are_the_tables_retained_rows() {
        let t = Topics::with_prefix(Some("lab")).unwrap();
        let s = sut("a");
        assert_eq!(
            t.sut_retained(&s),
            [
                "lab/a/agent",
                "lab/a/probe",
                "lab/a/submit_status",
                "lab/a/cancel_status",
                "lab/a/last_job",
                "lab/a/supervisor"
            ]
        );
        // Every row of the topic table under <sut>/ that is retained, except the per-job
        // statuses, is in the list.
        let doc = include_str!("topics.rs");
        let retained_rows: Vec<&str> = doc
            .lines()
            .filter(|l| l.starts_with("//! | `<sut>/") && !l.contains("/jobs/"))
            .filter(|l| {
                l.split('|')
                    .nth(4)
                    .is_some_and(|c| c.trim().starts_with("yes"))
            })
            .filter_map(|l| l.split('`').nth(1))
            .collect();
        let listed: Vec<String> = t
            .sut_retained(&sut("x"))
            .iter()
            .map(|t| t.replacen("lab/x/", "<sut>/", 1))
            .collect();
        assert_eq!(retained_rows, listed);
    }

    #[test]
    fn prefix_applies_everywhere() {
        let t = Topics::with_prefix(Some("site/lab1")).unwrap();
        let s = sut("x1");
        assert_eq!(t.agent(&s), "site/lab1/x1/agent");
        assert_eq!(t.agents_filter(), "site/lab1/+/agent");
        assert_eq!(t.outputs_filter(), "site/lab1/+/output");
        assert_eq!(
            t.supervisor_status_filter(),
            "site/lab1/labvisor/supervisors/+/status"
        );
        assert_eq!(t.parse("site/lab1/x1/submit"), Some((s, SutTopic::Submit)));
        assert_eq!(t.parse("x1/submit"), None);
    }

    #[test]
    fn restart_topics_are_under_the_supervisors_namespace() {
        let id = SupervisorId::new("lab-a").unwrap();
        for (t, p) in [
            (Topics::new(), ""),
            (Topics::with_prefix(Some("lab1")).unwrap(), "lab1/"),
        ] {
            assert_eq!(
                t.supervisor_restart(&id),
                format!("{p}labvisor/supervisors/lab-a/restart")
            );
            assert_eq!(
                t.supervisor_restart_status(&id),
                format!("{p}labvisor/supervisors/lab-a/restart_status")
            );
            assert_eq!(
                t.supervisor_restart_filter(),
                format!("{p}labvisor/supervisors/+/restart")
            );
            assert_eq!(
                t.supervisor_restart_status_filter(),
                format!("{p}labvisor/supervisors/+/restart_status")
            );
            // Never a SUT's topic (`labvisor` is no SUT), so an agent's ACL pattern never
            // reaches them.
            assert_eq!(t.parse(&t.supervisor_restart(&id)), None);
            assert_eq!(t.parse(&t.supervisor_restart_status(&id)), None);
        }
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
    fn replies_go_to_the_reply_space_or_unclaimed_topics_under_the_sut() {
        let s = sut("rpi4-01");
        for t in [
            Topics::new(),
            Topics::with_prefix(Some("site/lab1")).unwrap(),
        ] {
            let p = t.prefix.clone();
            assert_eq!(t.reply_space(&s), format!("{p}labvisor/replies/rpi4-01/#"));
            assert_eq!(
                t.agent_reply_acl_pattern(),
                format!("{p}labvisor/replies/%u/#")
            );
            for ok in ["labvisor/replies/rpi4-01", "labvisor/replies/rpi4-01/ci/42"] {
                assert!(t.is_reply_topic(&s, &format!("{p}{ok}")), "{p}{ok}");
                assert!(t.is_allowed_reply(&s, &format!("{p}{ok}")), "{p}{ok}");
            }
            assert!(t.is_allowed_reply(&s, &format!("{p}rpi4-01/acks")));
            for bad in [
                "ci/acks",
                "labvisor/replies/rpi4-02/x",
                "labvisor/replies/rpi4-011/x",
                "labvisor/replies/rpi4-01/+",
                "labvisor/supervisors/a/status",
                "rpi4-01",
                "rpi4-01/",
                "rpi4-01/submit",
                "rpi4-01/admin",
                "rpi4-01/agent",
                "rpi4-01/last_job",
                "rpi4-01/jobs/x",
                "rpi4-01/jobs/x/output",
                "rpi4-01/jobs/x/y",
                "rpi4-01/a//b",
                "rpi4-02/acks",
            ] {
                assert!(!t.is_allowed_reply(&s, &format!("{p}{bad}")), "{p}{bad}");
            }
        }
        // Without the prefix, a prefixed lab's reply space is foreign.
        let t = Topics::with_prefix(Some("lab")).unwrap();
        assert!(!t.is_allowed_reply(&s, "labvisor/replies/rpi4-01/x"));
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
