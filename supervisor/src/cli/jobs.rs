//! `labvisor jobs <sut>`: a SUT's recent jobs, from their retained statuses.

use std::io::Write;

use labvisor_protocol::payloads::JobStatus;
use labvisor_protocol::topics::SutTopic;

use super::show::{age, parse, sut_name, table, wire_name, write_json_pretty};
use super::{BrokerArgs, ClientError, Session};

/// `labvisor jobs <sut>`: the SUT's recent jobs from their retained statuses. A SUT that the
/// broker knows nothing of (no retained agent status, supervisor view or job) is an error
/// ([`ClientError::UnknownSut`]), not an empty list.
pub async fn jobs(
    args: &BrokerArgs,
    sut: &str,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), ClientError> {
    let sut = sut_name(sut)?;
    let mut s = Session::snapshot(args, |t| {
        vec![t.jobs_filter(&sut), t.agent(&sut), t.supervisor(&sut)]
    })
    .await?;
    let got = s.settle().await;
    let topics = s.topics.clone();
    s.close().await;
    let mut known = false;
    let mut jobs: Vec<JobStatus> = Vec::new();
    for r in got.iter().filter(|r| !r.payload.is_empty()) {
        match topics.parse(&r.topic) {
            Some((_, SutTopic::Job(_))) => {
                known = true;
                jobs.extend(parse::<JobStatus>(r));
            }
            Some((_, SutTopic::Agent | SutTopic::Supervisor)) => known = true,
            _ => {}
        }
    }
    if !known {
        return Err(ClientError::UnknownSut {
            sut: sut.to_string(),
            broker: args.broker.clone(),
        });
    }
    jobs.sort_by_key(|j| (j.queued_ms, j.id.clone()));
    if json {
        write_json_pretty(out, &jobs)?;
        return Ok(());
    }
    print_jobs(&jobs, out)?;
    Ok(())
}

/// The jobs table and its count.
fn print_jobs(jobs: &[JobStatus], out: &mut dyn Write) -> std::io::Result<()> {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.to_string(),
                wire_name(&j.state),
                j.exit_code
                    .map(|c| c.to_string())
                    .or(j.signal.map(|s| format!("sig {s}")))
                    .unwrap_or_else(|| "-".into()),
                format!("{} ago", age(j.queued_ms)),
                j.duration_ms
                    .map(|d| format!("{:.1}s", d as f64 / 1000.0))
                    .unwrap_or_else(|| "-".into()),
                j.output_bytes.to_string(),
                j.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let header = [
        "ID", "STATE", "EXIT", "QUEUED", "DURATION", "OUTPUT", "REASON",
    ];
    table(out, &header, &rows)?;
    writeln!(out, "{} jobs", rows.len())
}
