//! `[health_check]`: a job file among `files` whose content is a valid job, and at least one of
//! `every` (not too short) and `after_jobs` (1 to 500); every problem names its key.

use std::fs;
use std::num::NonZeroU32;
use std::path::Path;
use std::time::Duration;

use labvisor_protocol::config::{
    load_str, Allow, Problem, SutConfig, MAX_HEALTH_AFTER_JOBS, MIN_HEALTH_EVERY,
};

fn sut_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("hc.sh"), "echo healthy\n").unwrap();
    fs::write(
        d.path().join("bad.json"),
        "{\"script\": \"x\", \"bogus\": 1}\n",
    )
    .unwrap();
    d
}

fn load(dir: &Path, section: &str) -> Result<SutConfig, Vec<Problem>> {
    let text =
        format!("image = \"x\"\nfiles = [\"hc.sh\", \"bad.json\"]\n\n[health_check]\n{section}");
    load_str("hc.toml", &text, dir, &Allow::default())
}

/// The problems of `section`, as `key: message`.
fn problems(section: &str) -> Vec<String> {
    let d = sut_dir();
    load(d.path(), section)
        .expect_err("refused")
        .iter()
        .map(|p| format!("{}: {}", p.key, p.message))
        .collect()
}

#[test]
fn a_valid_section_is_read_with_its_defaults() {
    let d = sut_dir();
    let cfg = load(
        d.path(),
        "job = \"./hc.sh\"\nevery = \"6h\"\nafter_jobs = 50\n",
    )
    .unwrap();
    let hc = cfg.health_check.clone().expect("a health check");
    assert_eq!(hc.job(), "hc.sh");
    assert_eq!(hc.every(), Some(Duration::from_secs(6 * 3600)));
    assert_eq!(hc.after_jobs(), NonZeroU32::new(50));
    assert_eq!(hc.timeout(), cfg.job.timeout, "defaults to job.timeout");
    let json = serde_json::to_value(&cfg).unwrap();
    assert_eq!(
        json["health_check"],
        serde_json::json!({"job": "hc.sh", "every": "6h", "after_jobs": 50, "timeout": "4h"})
    );

    let only_jobs = load(
        d.path(),
        "job = \"hc.sh\"\nafter_jobs = 1\ntimeout = \"5m\"\n",
    )
    .unwrap();
    let hc = only_jobs.health_check.unwrap();
    assert_eq!((hc.every(), hc.timeout()), (None, Duration::from_secs(300)));
    let at_min = format!(
        "job = \"hc.sh\"\nevery = \"{}\"\n",
        humantime::format_duration(MIN_HEALTH_EVERY)
    );
    assert!(load(d.path(), &at_min).is_ok(), "the lower bound itself");
    let upper = format!("job = \"hc.sh\"\nafter_jobs = {MAX_HEALTH_AFTER_JOBS}\n");
    assert!(load(d.path(), &upper).is_ok(), "the upper bound itself");
}

/// A SUT without the section serialises as before it existed, so its hash (and container) stays.
#[test]
fn a_sut_without_the_section_keeps_its_serialisation() {
    let d = sut_dir();
    let cfg = load_str("x.toml", "image = \"x\"\n", d.path(), &Allow::default()).unwrap();
    assert!(cfg.health_check.is_none());
    let json = serde_json::to_value(&cfg).unwrap();
    assert!(json.get("health_check").is_none(), "{json}");
}

#[test]
fn a_section_without_a_trigger_is_refused_at_its_name() {
    assert_eq!(
        problems("job = \"hc.sh\"\n"),
        ["health_check: says not when the health check runs: give `every` (a duration such as \"6h\"), `after_jobs` (a number of jobs), or both"]
    );
}

#[test]
fn the_job_must_be_a_listed_file_holding_a_valid_job() {
    assert_eq!(
        problems("every = \"6h\"\n"),
        ["health_check.job: missing: name one of `files`, whose content is the job (a script, a testflinger job, or a JSON job, as a submission would carry it)"]
    );
    assert_eq!(
        problems("job = \"other.sh\"\nevery = \"6h\"\n"),
        ["health_check.job: \"other.sh\" must be one of `files` (add it there so it is delivered and hashed)"]
    );
    let p = problems("job = \"bad.json\"\nevery = \"6h\"\n");
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].starts_with("health_check.job: \"bad.json\" is not a job a submission could carry: ")
            && p[0].contains("bogus"),
        "{p:?}"
    );
}

#[test]
fn bounds_of_every_and_after_jobs_name_their_key() {
    let short = problems("job = \"hc.sh\"\nevery = \"500ms\"\n");
    assert_eq!(
        short,
        [format!(
            "health_check.every: is 500ms, shorter than the {} accepted: each health check is a job that takes the device from the lab's own jobs",
            humantime::format_duration(MIN_HEALTH_EVERY)
        )]
    );
    assert_eq!(
        problems("job = \"hc.sh\"\nevery = \"0s\"\n"),
        ["health_check.every: must be longer than zero"]
    );
    assert_eq!(
        problems("job = \"hc.sh\"\nevery = \"soon\"\n").len(),
        1,
        "a bad duration is one problem"
    );
    assert_eq!(
        problems("job = \"hc.sh\"\nafter_jobs = 0\n"),
        ["health_check.after_jobs: must be at least 1"]
    );
    assert_eq!(
        problems("job = \"hc.sh\"\nafter_jobs = 501\n"),
        ["health_check.after_jobs: is 501, more than the 500 accepted: the agent counts the jobs since the last health check in the history it keeps (the latest 500 jobs)"]
    );
    assert_eq!(
        problems("job = \"hc.sh\"\nafter_jobs = 5\ntimeout = \"0s\"\n"),
        ["health_check.timeout: must be longer than zero"]
    );
}

#[test]
fn unknown_keys_and_several_problems_are_reported() {
    let p = problems("job = \"hc.sh\"\nevery = \"6h\"\nafter = 3\n");
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].starts_with("health_check.after: unknown field"),
        "{p:?}"
    );
    let p = problems("job = \"nope\"\nevery = \"1ms\"\nafter_jobs = 0\n");
    let keys: Vec<&str> = p.iter().map(|s| s.split(": ").next().unwrap()).collect();
    assert_eq!(
        keys,
        [
            "health_check.job",
            "health_check.every",
            "health_check.after_jobs"
        ],
        "{p:?}"
    );
}
