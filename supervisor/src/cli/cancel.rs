//! `labvisor cancel <sut> <id|current>`: asks the agent to cancel a queued or running job and
//! prints its answer.

use std::io::Write;
use std::time::Duration;

use labvisor_protocol::payloads::{now_ms, CancelAck, CancelResult};

use super::show::{parse, sut_name, wire_name, write_json};
use super::{BrokerArgs, ClientError, Session};

/// `labvisor cancel <sut> <id|current>`: returns the exit status (0 cancelled, 1 otherwise).
pub async fn cancel(
    args: &BrokerArgs,
    sut: &str,
    target: &str,
    json: bool,
    timeout: Duration,
    out: &mut dyn Write,
) -> Result<u8, ClientError> {
    let sut = sut_name(sut)?;
    let mut s = Session::connect(args, |t| vec![t.cancel_status(&sut)]).await?;
    s.settle().await;
    let sent_ms = now_ms();
    s.publish(s.topics.cancel(&sut), target.as_bytes().to_vec())?;
    let deadline = tokio::time::Instant::now() + timeout;
    let ack: CancelAck = loop {
        let Some(r) = s.next(Some(deadline)).await else {
            s.close().await;
            return Err(ClientError::NoAnswer(format!(
                "no answer from {sut} within {}: is its agent running and connected?",
                humantime::format_duration(timeout)
            )));
        };
        if let Some(a) = parse::<CancelAck>(&r) {
            if a.request == target.trim() && a.time_ms + 1000 >= sent_ms {
                break a;
            }
        }
    };
    s.close().await;
    if json {
        write_json(out, &ack)?;
    } else {
        let id = ack.id.as_ref().map(|i| i.to_string());
        let reason = ack.reason.as_deref().map(|r| format!(" ({r})"));
        writeln!(
            out,
            "{}: {}{}",
            id.unwrap_or_else(|| target.to_owned()),
            wire_name(&ack.result),
            reason.unwrap_or_default()
        )?;
    }
    Ok(u8::from(ack.result != CancelResult::Cancelled))
}
