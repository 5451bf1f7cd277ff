//! `labvisor logs <sut> -f [--job ID]`: follows a SUT's (or one job's) live output, noting
//! output lost on the way and skipping QoS 1 resends.

use std::io::Write;

use labvisor_protocol::payloads::OutputMeta;
use labvisor_protocol::topics::Topics;

use super::show::{job_id, sut_name};
use super::{BrokerArgs, ClientError, Session};

/// What `labvisor logs` says without `-f` (exit status 2): MQTT has no history.
pub const FOLLOW_ONLY: &str = "MQTT carries live output only: use -f to follow it; the history is in the SUT's log file (/labvisor/data/log/<sut>.log on its volume)";

/// `labvisor logs <sut> -f [--job ID]`: follows the live output.
pub async fn logs(
    args: &BrokerArgs,
    sut: &str,
    job: Option<&str>,
    out: &mut dyn Write,
) -> Result<(), ClientError> {
    let sut = sut_name(sut)?;
    let job = job.map(job_id).transpose()?;
    let topic_of = |t: &Topics| match &job {
        Some(j) => t.job_output(&sut, j),
        None => t.output(&sut),
    };
    let mut s = Session::connect(args, |t| vec![topic_of(t)]).await?;
    let mut last: Option<OutputMeta> = None;
    while let Some(r) = s.next(None).await {
        let props = r.user_properties();
        if let Some(meta) = OutputMeta::from_properties(&props) {
            let (show, note) = output_step(last.as_ref(), &meta);
            if let Some(note) = note {
                eprintln!("{note}");
            }
            if !show {
                continue;
            }
            last = Some(meta);
        }
        out.write_all(&r.payload)?;
        out.flush()?;
    }
    Ok(())
}

/// What `labvisor logs` does with an output message after `last`: whether to print it (a QoS 1
/// resend of a message already printed is not), and a note about output lost before it.
pub(crate) fn output_step(last: Option<&OutputMeta>, meta: &OutputMeta) -> (bool, Option<String>) {
    let Some(prev) = last.filter(|p| p.boot == meta.boot) else {
        return (true, None);
    };
    if meta.seq <= prev.seq {
        return (false, None);
    }
    let lost = meta.dropped.saturating_sub(prev.dropped);
    let note = if lost > 0 {
        Some(format!(
            "[labvisor: {lost} lines lost here ({} lost by the agent so far)]",
            meta.dropped
        ))
    } else if meta.seq > prev.seq + 1 {
        Some(format!(
            "[labvisor: {} messages missing here (lost between the broker and this client)]",
            meta.seq - prev.seq - 1
        ))
    } else {
        None
    };
    (true, note)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(seq: u64, dropped: u64, boot: &str) -> OutputMeta {
        OutputMeta {
            seq,
            dropped,
            boot: boot.into(),
        }
    }

    #[test]
    fn logs_notes_lost_lines_and_skips_resends() {
        let a = meta(4, 10, "b1");
        assert_eq!(output_step(None, &a), (true, None));
        assert_eq!(output_step(Some(&a), &meta(5, 10, "b1")), (true, None));
        // A resend (QoS 1) of what was printed.
        assert_eq!(output_step(Some(&a), &meta(4, 10, "b1")), (false, None));
        // A loss at the agent: the seq jumps and dropped says how many lines.
        let (show, note) = output_step(Some(&a), &meta(6, 25, "b1"));
        assert!(show);
        assert_eq!(
            note.unwrap(),
            "[labvisor: 15 lines lost here (25 lost by the agent so far)]"
        );
        // A jump without a loss at the agent.
        let (_, note) = output_step(Some(&a), &meta(7, 10, "b1"));
        assert!(note.unwrap().contains("2 messages missing"));
        // A new agent run starts over.
        assert_eq!(output_step(Some(&a), &meta(0, 0, "b2")), (true, None));
    }
}
