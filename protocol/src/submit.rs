//! Parsing what arrives on `<sut>/submit` and `<sut>/cancel`.
//!
//! A submission is either plain text (a script, as pasted into MQTT Explorer's raw mode) or a
//! JSON object ([`JobSubmit`]). The rules, each with its own rejection message:
//!
//! - an empty (or all-whitespace) payload is rejected;
//! - a payload over the SUT's `max_payload` is rejected ("payload of N bytes exceeds max_payload
//!   M"); the agent's link accepts packets up to [`MAX_PACKET_SIZE`](crate::MAX_PACKET_SIZE),
//!   as the brokers do, so every submission a broker takes reaches this check;
//! - text starting with `{` is JSON, and is rejected as invalid JSON if it does not parse (it is
//!   never run as a script);
//! - unknown fields and wrong types are rejected with serde's message naming the field;
//! - a JSON job needs exactly one of `script` and `argv`;
//! - `timeout` and `output_timeout` must be durations (`"30m"`), `env` keys valid names and not
//!   `LABVISOR_*`, `reply_to` a plain topic (no wildcards, not `$...`);
//! - non-UTF-8 plain text is rejected;
//! - the agent then rejects a `reply_to` or MQTT 5 response topic outside the SUT's reply space
//!   ([`check_reply_topic`]): the ACL would stop its answer there.

use std::time::Duration;

use crate::name::SutName;
use crate::payloads::JobSubmit;
use crate::topics::{JobId, TopicError, Topics};

/// A checked submission, ready to queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submission {
    /// The id given by the submitter, if any.
    pub id: Option<JobId>,
    /// What to run.
    pub run: JobRun,
    /// Extra environment.
    pub env: std::collections::BTreeMap<String, String>,
    /// Requested total time limit.
    pub timeout: Option<Duration>,
    /// Requested silence limit.
    pub output_timeout: Option<Duration>,
    /// Where to send the acknowledgement as well.
    pub reply_to: Option<String>,
}

/// What a job runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobRun {
    /// A script, run by the SUT's `[job] command` template.
    Script(String),
    /// An argv, run directly.
    Argv(Vec<String>),
}

/// Why a submission is rejected; the message is the reason sent back to the submitter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// Over the SUT's `max_payload`.
    #[error("payload of {len} bytes exceeds max_payload {max}")]
    TooLarge {
        /// Size of the payload.
        len: usize,
        /// The SUT's limit.
        max: usize,
    },
    /// Empty or all whitespace.
    #[error("empty payload: send a script as plain text or a JSON job")]
    Empty,
    /// Not UTF-8.
    #[error("payload is not UTF-8 text")]
    NotUtf8,
    /// Starts with `{` but does not parse as JSON.
    #[error("payload starts with '{{' but is not valid JSON: {0}")]
    NotJson(String),
    /// JSON, but not a valid job.
    #[error("invalid JSON job: {0}")]
    InvalidJob(#[from] JobError),
}

/// What is wrong with a JSON job ([`SubmitError::InvalidJob`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// Unknown field or wrong type: serde's message, which names the field.
    #[error("{0}")]
    Schema(String),
    /// Both `script` and `argv`.
    #[error("give `script` or `argv`, not both")]
    Both,
    /// Neither `script` nor `argv`.
    #[error("`script` or `argv` is required")]
    Neither,
    /// An empty script.
    #[error("`script` is empty")]
    EmptyScript,
    /// An argv without a program.
    #[error("`argv` needs a program as its first element")]
    NoProgram,
    /// An `env` key that is not a variable name.
    #[error("env key {0:?} is not a valid name")]
    EnvName(String),
    /// An `env` key labvisor sets itself.
    #[error("env key {0:?} is reserved (LABVISOR_*)")]
    EnvReserved(String),
    /// A zero `timeout` or `output_timeout`.
    #[error("`{0}` must be more than 0")]
    ZeroDuration(&'static str),
    /// A `timeout` or `output_timeout` that is not a duration.
    #[error("`{field}` {value:?} is not a duration like \"30m\": {reason}")]
    Duration {
        /// Which field.
        field: &'static str,
        /// As written.
        value: String,
        /// humantime's reason.
        reason: String,
    },
    /// A `reply_to` with wildcards or a `$` topic.
    #[error("`reply_to` {0:?} must be a plain topic (no wildcards, not $...)")]
    ReplyTo(String),
}

/// Parses a submission payload; the error is the rejection reason sent back to the submitter.
pub fn parse_submit(payload: &[u8], max_payload: usize) -> Result<Submission, SubmitError> {
    if payload.len() > max_payload {
        return Err(SubmitError::TooLarge {
            len: payload.len(),
            max: max_payload,
        });
    }
    if payload.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(SubmitError::Empty);
    }
    let Ok(text) = std::str::from_utf8(payload) else {
        return Err(SubmitError::NotUtf8);
    };
    if !text.trim_start().starts_with('{') {
        return Ok(Submission {
            id: None,
            run: JobRun::Script(text.to_owned()),
            env: Default::default(),
            timeout: None,
            output_timeout: None,
            reply_to: None,
        });
    }
    let job: JobSubmit = serde_json::from_str(text).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            SubmitError::NotJson(e.to_string())
        } else {
            JobError::Schema(e.to_string()).into()
        }
    })?;
    Ok(check_job(job)?)
}

/// Checks a JSON job as serde read it.
fn check_job(job: JobSubmit) -> Result<Submission, JobError> {
    let run = match (job.script, job.argv) {
        (Some(_), Some(_)) => return Err(JobError::Both),
        (None, None) => return Err(JobError::Neither),
        (Some(s), None) if s.trim().is_empty() => return Err(JobError::EmptyScript),
        (Some(s), None) => JobRun::Script(s),
        (None, Some(a)) if a.first().is_none_or(|p| p.is_empty()) => {
            return Err(JobError::NoProgram)
        }
        (None, Some(a)) => JobRun::Argv(a),
    };
    for k in job.env.keys() {
        let valid = !k.is_empty()
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(JobError::EnvName(k.clone()));
        }
        if k.starts_with("LABVISOR_") {
            return Err(JobError::EnvReserved(k.clone()));
        }
    }
    let timeout = job_duration("timeout", job.timeout)?;
    let output_timeout = job_duration("output_timeout", job.output_timeout)?;
    if let Some(r) = &job.reply_to {
        if r.is_empty() || r.contains(['+', '#']) || r.starts_with('$') {
            return Err(JobError::ReplyTo(r.clone()));
        }
    }
    Ok(Submission {
        id: job.id,
        run,
        env: job.env,
        timeout,
        output_timeout,
        reply_to: job.reply_to,
    })
}

/// A job's `timeout` or `output_timeout`: a duration more than zero, when given.
fn job_duration(field: &'static str, v: Option<String>) -> Result<Option<Duration>, JobError> {
    let Some(s) = v else { return Ok(None) };
    match humantime::parse_duration(&s) {
        Ok(d) if !d.is_zero() => Ok(Some(d)),
        Ok(_) => Err(JobError::ZeroDuration(field)),
        Err(e) => Err(JobError::Duration {
            field,
            value: s,
            reason: e.to_string(),
        }),
    }
}

/// A reply topic outside the SUT's reply space ([`check_reply_topic`]); the message is the
/// rejection reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{what} {topic:?} is outside this SUT's reply space: answers go to {reply_space} (or to a \
     topic of your own under {prefix}{sut}/), where the broker lets the agent publish"
)]
pub struct ReplyTopicError {
    /// `` `reply_to` `` or `the MQTT 5 response topic`.
    pub what: String,
    /// The topic.
    pub topic: String,
    /// The SUT's reply space.
    pub reply_space: String,
    /// The topic prefix with its `/`, or empty.
    pub prefix: String,
    /// The SUT.
    pub sut: SutName,
}

/// Checks a reply topic, `what` being `` `reply_to` `` or `the MQTT 5 response topic`: it must
/// lie in the SUT's reply space ([`Topics::reply_space`]) or under `<sut>/` outside labvisor's
/// own topics ([`Topics::is_allowed_reply`]). The error is the rejection reason.
pub fn check_reply_topic(
    topics: &Topics,
    sut: &SutName,
    what: &str,
    topic: &str,
) -> Result<(), ReplyTopicError> {
    if topics.is_allowed_reply(sut, topic) {
        return Ok(());
    }
    let prefix = match topics.prefix() {
        "" => String::new(),
        p => format!("{p}/"),
    };
    Err(ReplyTopicError {
        what: what.to_owned(),
        topic: topic.to_owned(),
        reply_space: topics.reply_space(sut),
        prefix,
        sut: sut.clone(),
    })
}

/// What a cancel request names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelTarget {
    /// The running job.
    Current,
    /// A job by id.
    Id(JobId),
}

/// Why a cancel request is rejected; the message is the reason sent back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CancelError {
    /// Not UTF-8.
    #[error("cancel payload is not UTF-8 text")]
    NotUtf8,
    /// Empty or all whitespace.
    #[error("empty cancel payload: send a job id or `current`")]
    Empty,
    /// `{...}` that is not `{"id": "..."}`.
    #[error("invalid cancel JSON: {0}")]
    Json(String),
    /// Not a valid job id.
    #[error(transparent)]
    Id(#[from] TopicError),
}

/// Parses a cancel payload: a job id, `current`, or `{"id": "..."}`.
pub fn parse_cancel(payload: &[u8]) -> Result<CancelTarget, CancelError> {
    let text = std::str::from_utf8(payload)
        .map_err(|_| CancelError::NotUtf8)?
        .trim();
    if text.is_empty() {
        return Err(CancelError::Empty);
    }
    let id = if text.starts_with('{') {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Cancel {
            id: String,
        }
        let c: Cancel = serde_json::from_str(text).map_err(|e| CancelError::Json(e.to_string()))?;
        c.id
    } else {
        text.to_owned()
    };
    if id == "current" {
        return Ok(CancelTarget::Current);
    }
    Ok(JobId::new(&id).map(CancelTarget::Id)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn err(p: &str) -> String {
        parse_submit(p.as_bytes(), 1000).unwrap_err().to_string()
    }

    #[test]
    fn plain_text_is_a_script() {
        let s = parse_submit(b"echo hi\nuname -a\n", 100).unwrap();
        assert_eq!(s.run, JobRun::Script("echo hi\nuname -a\n".into()));
        assert_eq!(s.id, None);
    }

    #[test]
    fn json_jobs_parse_with_every_field() {
        let s = parse_submit(
            br#"{"id":"ci-42","argv":["make","test"],"env":{"K":"v"},"timeout":"30m","output_timeout":"5m","reply_to":"ci/acks"}"#,
            1000,
        )
        .unwrap();
        assert_eq!(s.id.unwrap().as_str(), "ci-42");
        assert_eq!(s.run, JobRun::Argv(vec!["make".into(), "test".into()]));
        assert_eq!(s.timeout, Some(Duration::from_secs(1800)));
        assert_eq!(s.output_timeout, Some(Duration::from_secs(300)));
        assert_eq!(s.reply_to.as_deref(), Some("ci/acks"));
    }

    #[test]
    fn every_bad_input_has_its_own_message() {
        assert_eq!(
            err("   \n"),
            "empty payload: send a script as plain text or a JSON job"
        );
        assert_eq!(
            parse_submit(&[b'x'; 11], 10).unwrap_err().to_string(),
            "payload of 11 bytes exceeds max_payload 10"
        );
        assert!(err("{not json").starts_with("payload starts with '{' but is not valid JSON"));
        assert!(err(r#"{"script":"x","bogus":1}"#).contains("unknown field `bogus`"));
        assert!(err(r#"{"script":42}"#).contains("invalid type: integer `42`, expected a string"));
        assert_eq!(
            err(r#"{"env":{}}"#),
            "invalid JSON job: `script` or `argv` is required"
        );
        assert_eq!(
            err(r#"{"script":"a","argv":["b"]}"#),
            "invalid JSON job: give `script` or `argv`, not both"
        );
        assert!(err(r#"{"script":"a","timeout":"soon"}"#)
            .contains("`timeout` \"soon\" is not a duration"));
        assert!(err(r#"{"script":"a","env":{"LABVISOR_X":"1"}}"#).contains("reserved"));
        assert!(err(r#"{"script":"a","reply_to":"a/#"}"#).contains("plain topic"));
        assert!(err(r#"{"id":"a/b","script":"a"}"#).contains("job id"));
        assert_eq!(
            parse_submit(b"\xff\xfe", 10).unwrap_err().to_string(),
            "payload is not UTF-8 text"
        );
    }

    #[test]
    fn reply_topics_outside_the_reply_space_name_it() {
        let t = Topics::new();
        let s = SutName::new("dut1").unwrap();
        assert_eq!(
            check_reply_topic(&t, &s, "`reply_to`", "labvisor/replies/dut1/ci"),
            Ok(())
        );
        assert_eq!(
            check_reply_topic(&t, &s, "`reply_to`", "ci/acks")
                .unwrap_err()
                .to_string(),
            "`reply_to` \"ci/acks\" is outside this SUT's reply space: answers go to \
             labvisor/replies/dut1/# (or to a topic of your own under dut1/), where the broker \
             lets the agent publish"
        );
        let t = Topics::with_prefix(Some("lab")).unwrap();
        assert!(check_reply_topic(&t, &s, "x", "dut1/acks")
            .unwrap_err()
            .to_string()
            .contains("lab/labvisor/replies/dut1/# (or to a topic of your own under lab/dut1/)"));
    }

    #[test]
    fn cancel_payloads() {
        assert_eq!(parse_cancel(b"current"), Ok(CancelTarget::Current));
        assert_eq!(
            parse_cancel(b" job-1\n"),
            Ok(CancelTarget::Id(JobId::new("job-1").unwrap()))
        );
        assert_eq!(
            parse_cancel(br#"{"id":"job-2"}"#),
            Ok(CancelTarget::Id(JobId::new("job-2").unwrap()))
        );
        assert!(parse_cancel(b"").is_err());
        assert!(parse_cancel(b"a/b").is_err());
        assert!(parse_cancel(br#"{"job":"x"}"#)
            .unwrap_err()
            .to_string()
            .contains("unknown field"));
    }

    proptest! {
        #[test]
        fn no_payload_panics_the_parser(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_submit(&bytes, 200);
            let _ = parse_cancel(&bytes);
        }

        #[test]
        fn json_looking_text_is_never_a_script(s in "\\{[^}]{0,40}") {
            if let Ok(sub) = parse_submit(s.as_bytes(), 1000) {
                prop_assert!(!matches!(sub.run, JobRun::Script(ref t) if t == &s));
            }
        }
    }
}
