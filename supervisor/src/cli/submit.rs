//! `labvisor submit`: publishes a job, waits for the agent's acknowledgement and, with
//! `--wait` or `--follow`, for the job's final status (streaming its output with `--follow`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use labvisor_protocol::payloads::{
    new_job_id, JobState, JobStatus, JobSubmit, SubmitAck, SubmitResult,
};
use labvisor_protocol::topics::JobId;
use labvisor_protocol::SutName;

use super::show::{job_id, parse, sut_name, wire_name, write_json};
use super::{BrokerArgs, ClientError, Session};

/// `labvisor submit` options.
#[derive(Debug, Clone, clap::Args)]
pub struct SubmitArgs {
    /// The SUT.
    pub sut: String,
    /// A script file to run (by the SUT's `[job] command`, `/bin/sh` by default).
    #[arg(long, conflicts_with = "cmd")]
    pub script: Option<PathBuf>,
    /// The job id (generated when absent).
    #[arg(long)]
    pub id: Option<String>,
    /// Total time limit ("30m"), capped by the SUT's.
    #[arg(long)]
    pub timeout: Option<String>,
    /// Silence limit ("5m"), capped by the SUT's.
    #[arg(long)]
    pub output_timeout: Option<String>,
    /// Extra environment, `KEY=VALUE` (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Wait for the job to end and exit by its final state: 0 passed, a failed job's exit code
    /// (1 when it exited 0 but its verdict said failed; 128+N killed by signal N), 124
    /// timeout, 130 cancelled, 125 lost. The reason of a job that did not pass is printed.
    #[arg(long)]
    pub wait: bool,
    /// Stream the job's output until it ends (implies --wait).
    #[arg(long)]
    pub follow: bool,
    /// How long to wait for the acknowledgement.
    #[arg(long, default_value = "10s")]
    pub ack_timeout: humantime::Duration,
    /// Print JSON (the acknowledgement, and the final status with --wait).
    #[arg(long)]
    pub json: bool,
    /// A command to run instead of a script: everything after `--`.
    #[arg(last = true)]
    pub cmd: Vec<String>,
    /// The script's text, given by a caller that has no file (the web page).
    #[arg(skip)]
    pub script_text: Option<String>,
}

impl SubmitArgs {
    /// The submission these options describe.
    fn job(&self, id: &JobId) -> Result<JobSubmit, ClientError> {
        let (script, argv) = match (&self.script, self.cmd.is_empty()) {
            _ if self.script_text.is_some() => (self.script_text.clone(), None),
            (Some(p), _) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| ClientError::Usage(format!("--script {}: {e}", p.display())))?;
                (Some(text), None)
            }
            (None, false) => (None, Some(self.cmd.clone())),
            (None, true) => {
                return Err(ClientError::Usage(
                    "give --script FILE or a command after --".into(),
                ))
            }
        };
        let mut env = BTreeMap::new();
        for kv in &self.env {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| ClientError::Usage(format!("--env {kv:?}: expected KEY=VALUE")))?;
            env.insert(k.to_owned(), v.to_owned());
        }
        Ok(JobSubmit {
            id: Some(id.clone()),
            script,
            argv,
            env,
            timeout: self.timeout.clone(),
            output_timeout: self.output_timeout.clone(),
            reply_to: None,
        })
    }
}

/// The exit status `--wait` gives for a final job status: by its state, which the job's verdict
/// may have decided against its exit code (a `failed` job that exited 0 gives 1, a `passed`
/// one that exited 3 gives 0).
pub fn job_exit_code(st: &JobStatus) -> u8 {
    match st.state {
        JobState::Passed => 0,
        JobState::Timeout => 124,
        JobState::Lost => 125,
        JobState::Cancelled => 130,
        _ => match (st.exit_code, st.signal) {
            (Some(c), _) => c.clamp(1, 255) as u8,
            (None, Some(s)) => (128 + s).clamp(1, 255) as u8,
            _ => 1,
        },
    }
}

/// `labvisor submit`: returns the process exit status.
pub async fn submit(
    args: &BrokerArgs,
    sa: &SubmitArgs,
    out: &mut dyn Write,
) -> Result<u8, ClientError> {
    let sut = sut_name(&sa.sut)?;
    let id = sa.id.as_deref().map_or_else(|| Ok(new_job_id()), job_id)?;
    let job = sa.job(&id)?;
    let wait = sa.wait || sa.follow;
    let mut s = Session::connect(args, |t| {
        let mut f = vec![t.submit_status(&sut)];
        if wait {
            f.push(t.job(&sut, &id));
            f.push(t.job_output(&sut, &id));
        }
        f
    })
    .await?;
    s.settle().await;
    let payload = serde_json::to_vec(&job).expect("serialises");
    s.publish(s.topics.submit(&sut), payload)?;
    let ack = match await_ack(&mut s, &sut, &id, *sa.ack_timeout).await {
        Ok(ack) => ack,
        Err(e) => {
            s.close().await;
            return Err(e);
        }
    };
    if ack.result == SubmitResult::Rejected {
        s.close().await;
        if sa.json {
            write_json(out, &ack)?;
        }
        eprintln!(
            "labvisor submit: {sut} rejected the job: {}",
            ack.reason.as_deref().unwrap_or("no reason given")
        );
        return Ok(3);
    }
    if sa.json {
        write_json(out, &ack)?;
    } else {
        writeln!(out, "{id}")?;
    }
    out.flush()?;
    if !wait {
        s.close().await;
        return Ok(0);
    }
    let st = follow_to_end(&mut s, &sut, &id, sa.follow && !sa.json, out).await;
    s.close().await;
    let st = st?;
    if sa.json {
        write_json(out, &st)?;
    } else if st.state != JobState::Passed {
        let reason = st.reason.as_deref().map(|r| format!(": {r}"));
        eprintln!(
            "labvisor submit: job {id} {}{}",
            wire_name(&st.state),
            reason.unwrap_or_default()
        );
    }
    Ok(job_exit_code(&st))
}

/// The agent's acknowledgement of job `id`, within `timeout`.
async fn await_ack(
    s: &mut Session,
    sut: &SutName,
    id: &JobId,
    timeout: Duration,
) -> Result<SubmitAck, ClientError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let topic = s.topics.submit_status(sut);
    loop {
        let Some(r) = s.next(Some(deadline)).await else {
            return Err(ClientError::NoAnswer(format!(
                "no acknowledgement from {sut} within {}: is its agent running and connected?",
                humantime::format_duration(timeout)
            )));
        };
        if r.topic == topic {
            if let Some(a) = parse::<SubmitAck>(&r) {
                if a.id.as_ref() == Some(id) {
                    return Ok(a);
                }
            }
        }
    }
}

/// Waits for job `id`'s final status, writing its output to `out` if `print`.
async fn follow_to_end(
    s: &mut Session,
    sut: &SutName,
    id: &JobId,
    print: bool,
    out: &mut dyn Write,
) -> Result<JobStatus, ClientError> {
    let output_topic = s.topics.job_output(sut, id);
    let status_topic = s.topics.job(sut, id);
    let mut fin: Option<JobStatus> = None;
    loop {
        // After the final status, output still in flight arrives within a batch interval.
        let deadline = fin
            .as_ref()
            .map(|_| tokio::time::Instant::now() + Duration::from_millis(300));
        let Some(r) = s.next(deadline).await else {
            break;
        };
        if r.topic == output_topic {
            if print {
                out.write_all(&r.payload)?;
                out.flush()?;
            }
        } else if r.topic == status_topic {
            if let Some(st) = parse::<JobStatus>(&r) {
                if st.state.is_final() {
                    fin = Some(st);
                }
            }
        }
    }
    Ok(fin.expect("the loop only ends after the final status"))
}
