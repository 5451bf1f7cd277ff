//! `[health_check]`: a job the agent runs on its own (its file is one of `files`, and its content
//! must be a job a submission could carry), and when: `every`, `after_jobs`, or both.

use std::collections::BTreeSet;
use std::time::Duration;

use super::super::raw::RawHealthCheck;
use super::super::{HealthCheck, SutFile, MAX_HEALTH_AFTER_JOBS, MIN_HEALTH_EVERY};
use super::checker::{k, kk, Checker};
use super::paths::normalise;
use crate::submit::parse_submit;

/// What `[health_check]` is checked against: the SUT's `files` as listed and as loaded, and the
/// `[job]` settings it falls back to.
pub(super) struct Context<'a> {
    /// `files` as written in the SUT file.
    pub listed: &'a [String],
    /// The files that were read (a file with a problem of its own is missing here).
    pub loaded: &'a [SutFile],
    /// `job.timeout`: the health check's default time limit.
    pub job_timeout: Duration,
    /// `job.max_payload`: the largest job a submission may carry.
    pub max_payload: u64,
}

/// `[health_check]`: `None` when its job or both triggers are missing (the problem is reported).
pub(super) fn health_check(
    c: &mut Checker<'_>,
    h: &RawHealthCheck,
    cx: &Context<'_>,
) -> Option<HealthCheck> {
    let key = |name| kk("health_check", name);
    let job = job_file(c, h.job.as_deref(), cx);
    let every = h
        .every
        .as_ref()
        .map(|raw| c.duration(key("every"), Some(raw), MIN_HEALTH_EVERY, false));
    if let Some(d) = every {
        c.at_least(
            key("every"),
            true,
            d,
            MIN_HEALTH_EVERY,
            "each health check is a job that takes the device from the lab's own jobs",
        );
    }
    let after_jobs = h.after_jobs.map(|n| c.count(key("after_jobs"), Some(n), 1));
    if let Some(n) = after_jobs.filter(|n| n.get() > MAX_HEALTH_AFTER_JOBS) {
        c.add(
            &key("after_jobs"),
            format!(
                "is {n}, more than the {MAX_HEALTH_AFTER_JOBS} accepted: the agent counts the jobs \
                 since the last health check in the history it keeps (the latest \
                 {MAX_HEALTH_AFTER_JOBS} jobs)"
            ),
        );
    }
    let timeout = c.duration(key("timeout"), h.timeout.as_ref(), cx.job_timeout, false);
    if every.is_none() && after_jobs.is_none() {
        c.add(
            &k("health_check"),
            "says not when the health check runs: give `every` (a duration such as \"6h\"), \
             `after_jobs` (a number of jobs), or both",
        );
    }
    HealthCheck::new(job?, every, after_jobs, timeout)
}

/// `health_check.job`: one of `files` (by normalised path), whose content is a valid job.
fn job_file(c: &mut Checker<'_>, raw: Option<&str>, cx: &Context<'_>) -> Option<String> {
    let key = kk("health_check", "job");
    let Some(raw) = raw else {
        c.add(
            &key,
            "missing: name one of `files`, whose content is the job (a script, a testflinger job, \
             or a JSON job, as a submission would carry it)",
        );
        return None;
    };
    let listed: BTreeSet<String> = cx.listed.iter().filter_map(|f| normalise(f)).collect();
    let name = normalise(raw).filter(|n| listed.contains(n));
    let Some(name) = name else {
        c.add(
            &key,
            format!("{raw:?} must be one of `files` (add it there so it is delivered and hashed)"),
        );
        return None;
    };
    // A file that could not be read has its own problem under `files`.
    if let Some(f) = cx.loaded.iter().find(|f| f.name == name) {
        let max = usize::try_from(cx.max_payload).unwrap_or(usize::MAX);
        if let Err(e) = parse_submit(&f.content, max) {
            c.add(
                &key,
                format!("{raw:?} is not a job a submission could carry: {e}"),
            );
            return None;
        }
    }
    Some(name)
}
