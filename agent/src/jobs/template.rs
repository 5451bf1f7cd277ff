//! A job's file, decided by what was submitted: with a `[job] template` (a testflinger job
//! YAML), a submission that is already a complete testflinger job (a YAML mapping with
//! `job_queue`) is used as it is, and anything else is a script placed into a copy of the
//! template as `test_data.test_cmds`. Without a template, a submission is a script, as given.

use serde_yaml_ng::{Mapping, Value};

/// The key that makes a YAML mapping a complete testflinger job (testflinger-cli requires it).
pub const JOB_QUEUE_KEY: &str = "job_queue";

/// Why a job template cannot take the script.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// It is not YAML.
    #[error("the job template is not valid YAML: {0}")]
    Yaml(#[from] serde_yaml_ng::Error),
    /// Its top level is not a mapping.
    #[error("the job template's top level is not a mapping of keys")]
    NotAMapping,
}

/// The file a job's command gets as `{job_file}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobFile {
    /// A script, as submitted (no template): `job.sh`.
    Script(String),
    /// A testflinger job: the submission itself when it was a complete job, or the template
    /// with the script as `test_cmds`: `job.yaml`.
    Job(String),
}

impl JobFile {
    /// Its file name in the job's directory.
    pub fn name(&self) -> &'static str {
        match self {
            JobFile::Script(_) => "job.sh",
            JobFile::Job(_) => "job.yaml",
        }
    }

    /// Its contents.
    pub fn content(&self) -> &str {
        match self {
            JobFile::Script(s) | JobFile::Job(s) => s,
        }
    }
}

/// The job file for `submitted` (a script or a job YAML), with the SUT's `template` if it has
/// one.
pub fn job_file(template: Option<&str>, submitted: &str) -> Result<JobFile, TemplateError> {
    match template {
        None => Ok(JobFile::Script(submitted.to_owned())),
        Some(_) if is_complete_job(submitted) => Ok(JobFile::Job(submitted.to_owned())),
        Some(t) => merge_template(t, submitted).map(JobFile::Job),
    }
}

/// Whether `text` is a complete testflinger job: YAML whose top level is a mapping that has
/// `job_queue`. A shell script is not (it is not YAML, a plain string, or a mapping without it).
pub fn is_complete_job(text: &str) -> bool {
    matches!(
        serde_yaml_ng::from_str::<Value>(text),
        Ok(Value::Mapping(m)) if m.contains_key(JOB_QUEUE_KEY)
    )
}

/// Merges a script into a testflinger-style job template (YAML): the template's top-level
/// `test_data` is replaced by one whose `test_cmds` is the script, last in the document. The
/// other keys stay as they are, in their order (comments are not kept).
pub fn merge_template(template: &str, script: &str) -> Result<String, TemplateError> {
    let mut doc = match serde_yaml_ng::from_str::<Value>(template)? {
        Value::Null => Mapping::new(),
        Value::Mapping(m) => m,
        _ => return Err(TemplateError::NotAMapping),
    };
    // shift_remove: `remove` would move the last key into its place.
    doc.shift_remove("test_data");
    // Every line of the script ends with a newline, as a `|` block gives it.
    let cmds: String = script.lines().flat_map(|l| [l, "\n"]).collect();
    let mut test_data = Mapping::new();
    test_data.insert("test_cmds".into(), Value::String(cmds));
    doc.insert("test_data".into(), Value::Mapping(test_data));
    Ok(serde_yaml_ng::to_string(&doc)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = "job_queue: rpi4\nprovision_data:\n  distro: noble\n";

    #[test]
    fn template_merge_replaces_test_data() {
        let t = "job_queue: rpi4\nprovision_data:\n  distro: noble\ntest_data:\n  test_cmds: old\n  attachments: []\nreserve_data:\n  timeout: 60\n";
        let m = merge_template(t, "echo one\necho two").unwrap();
        assert_eq!(
            m,
            "job_queue: rpi4\nprovision_data:\n  distro: noble\nreserve_data:\n  timeout: 60\ntest_data:\n  test_cmds: |\n    echo one\n    echo two\n"
        );
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&m).unwrap();
        assert_eq!(value["test_data"]["test_cmds"], "echo one\necho two\n");
    }

    /// The other keys keep their order wherever `test_data` stood (as the old line edit did).
    #[test]
    fn template_merge_keeps_the_order_of_the_other_keys() {
        let t = "test_data:\n  test_cmds: old\njob_queue: rpi4\nprovision_data:\n  distro: noble\nreserve_data:\n  timeout: 60\n";
        let m = merge_template(t, "true").unwrap();
        assert_eq!(
            m,
            "job_queue: rpi4\nprovision_data:\n  distro: noble\nreserve_data:\n  timeout: 60\ntest_data:\n  test_cmds: |\n    true\n"
        );
    }

    #[test]
    fn template_merge_takes_an_empty_template_and_refuses_a_list() {
        let m = merge_template("# only a comment\n", "true\n").unwrap();
        assert_eq!(m, "test_data:\n  test_cmds: |\n    true\n");
        assert!(matches!(
            merge_template("- a\n- b\n", "true"),
            Err(TemplateError::NotAMapping)
        ));
        assert!(merge_template("a: [\n", "true").is_err());
    }

    /// The case: a complete job YAML was wrapped again as a script, and the phase
    /// failed with `job_queue:: not found`.
    #[test]
    fn a_complete_job_is_used_as_it_is_with_a_template() {
        let job = "# my job\njob_queue: other-queue\ntest_data:\n  test_cmds: |\n    uname -a\n";
        let f = job_file(Some(TEMPLATE), job).unwrap();
        assert_eq!(
            f,
            JobFile::Job(job.to_owned()),
            "byte for byte, comments kept"
        );
        assert_eq!(f.name(), "job.yaml");
    }

    #[test]
    fn a_script_is_placed_into_the_template() {
        for script in [
            "echo hi\nexit 3\n",
            "#!/bin/sh\nset -e\nmake test\n",
            // YAML mappings, but not testflinger jobs.
            "echo a: b\n",
            "test_data:\n  test_cmds: x\n",
            // A list of commands mentioning job_queue is not a job either.
            "- job_queue: q\n",
            // Not YAML at all.
            "a: [\n",
        ] {
            let f = job_file(Some(TEMPLATE), script).unwrap();
            let JobFile::Job(text) = &f else {
                panic!("{script:?}: {f:?}")
            };
            let v: Value = serde_yaml_ng::from_str(text).unwrap();
            assert_eq!(v["job_queue"], "rpi4", "{script:?}");
            let cmds = v["test_data"]["test_cmds"].as_str().unwrap();
            assert_eq!(
                cmds.lines().collect::<Vec<_>>(),
                script.lines().collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn without_a_template_everything_is_a_script() {
        let job = "job_queue: q\ntest_data:\n  test_cmds: true\n";
        let f = job_file(None, job).unwrap();
        assert_eq!(f, JobFile::Script(job.to_owned()));
        assert_eq!((f.name(), f.content()), ("job.sh", job));
    }

    #[test]
    fn complete_jobs_are_recognised() {
        assert!(is_complete_job("job_queue: q\n"));
        assert!(is_complete_job("{\"job_queue\": \"q\", \"test_data\": {}}"));
        assert!(!is_complete_job("job_queue\n"));
        assert!(!is_complete_job(""));
        assert!(!is_complete_job("queue: q\n"));
    }
}
