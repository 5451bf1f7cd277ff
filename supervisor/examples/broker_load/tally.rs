//! What the consumers count (pure): each message once, by its own id, and only when it came
//! live. A retained message a consumer gets again on resubscribing after a reconnect is not a
//! delivery (it is counted apart), nor is a QoS 1 duplicate of a message already counted.
//!
//! Ids: a status by `(sut, boot_id, seq)` (its payload), a last job by its job id (its
//! payload), an output message by `(topic, boot, seq)` (its [`OutputMeta`] user properties).

use std::collections::{HashMap, HashSet};

use labvisor_protocol::payloads::{AgentStatus, JobStatus, OutputMeta};

/// Delivered messages of one kind.
#[derive(Debug, Default)]
pub struct Kind {
    /// Per stream (status: `sut boot`; output: `topic boot`; last job: one stream), the ids seen.
    seen: HashMap<String, HashSet<u64>>,
    /// Unique live deliveries.
    pub delivered: u64,
    /// Live deliveries of an id already counted (QoS 1 re-sends).
    pub duplicates: u64,
    /// Retained deliveries (after a (re)subscription): not counted as delivered.
    pub retained: u64,
    /// Payloads without a readable id.
    pub unreadable: u64,
}

impl Kind {
    /// Counts one delivery; true when it is a new, live one.
    fn record(&mut self, retained: bool, id: Option<(String, u64)>) -> bool {
        if retained {
            self.retained += 1;
            return false;
        }
        let Some((stream, n)) = id else {
            self.unreadable += 1;
            return false;
        };
        if self.seen.entry(stream).or_default().insert(n) {
            self.delivered += 1;
            true
        } else {
            self.duplicates += 1;
            false
        }
    }
}

/// Everything the two consumers counted.
#[derive(Debug, Default)]
pub struct Tally {
    pub status: Kind,
    pub last_job: Kind,
    pub output: Kind,
    /// Lines in the output messages counted as delivered.
    pub output_lines: u64,
    /// Every message received, whatever it was (for the rate out).
    pub received: u64,
}

impl Tally {
    /// A status on `<sut>/agent`: returns it when it is a new live delivery (for its latency).
    pub fn status(&mut self, payload: &[u8], retained: bool) -> Option<AgentStatus> {
        self.received += 1;
        let st = serde_json::from_slice::<AgentStatus>(payload).ok();
        let id = st
            .as_ref()
            .map(|s| (format!("{} {}", s.sut, s.boot_id), s.seq));
        self.status.record(retained, id).then_some(st).flatten()
    }

    /// A job's final status on `<sut>/last_job`.
    pub fn last_job(&mut self, payload: &[u8], retained: bool) -> bool {
        self.received += 1;
        let id = serde_json::from_slice::<JobStatus>(payload)
            .ok()
            .map(|j| (j.id.to_string(), 0));
        self.last_job.record(retained, id)
    }

    /// An output message on `topic`.
    pub fn output(
        &mut self,
        topic: &str,
        props: &[(String, String)],
        payload: &[u8],
        retained: bool,
    ) -> bool {
        self.received += 1;
        let id = OutputMeta::from_properties(props).map(|m| (format!("{topic} {}", m.boot), m.seq));
        let new = self.output.record(retained, id);
        if new {
            self.output_lines += payload.iter().filter(|b| **b == b'\n').count() as u64;
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model;
    use labvisor_protocol::topics::JobId;

    #[test]
    fn statuses_count_once_by_sut_boot_and_seq_and_retained_ones_not_at_all() {
        let mut t = Tally::default();
        let a = model::sut_name(0, 1);
        let b = model::sut_name(0, 2);
        let s = |sut, boot, seq| model::status(sut, boot, seq, 1, None);
        assert!(t.status(&s(&a, "x", 0), false).is_some());
        assert!(t.status(&s(&a, "x", 1), false).is_some());
        // The same seq of another agent, or of another boot, is another status.
        assert!(t.status(&s(&b, "x", 1), false).is_some());
        assert!(t.status(&s(&a, "y", 1), false).is_some());
        // A QoS 1 re-send, and the retained copy after a resubscription.
        assert!(t.status(&s(&a, "x", 1), false).is_none());
        assert!(t.status(&s(&a, "x", 1), true).is_none());
        // A retained status never seen live is not a delivery either.
        assert!(t.status(&s(&a, "x", 7), true).is_none());
        assert!(t.status(b"not json", false).is_none());
        assert_eq!(t.status.delivered, 4);
        assert_eq!(t.status.duplicates, 1);
        assert_eq!(t.status.retained, 2);
        assert_eq!(t.status.unreadable, 1);
        assert_eq!(t.received, 8);
    }

    #[test]
    fn last_jobs_count_once_by_job_id() {
        let mut t = Tally::default();
        let sut = model::sut_name(1, 3);
        let id = |c: char| JobId::new(&c.to_string().repeat(32)).unwrap();
        let done = |c| model::job_statuses(&sut, &id(c), 1, 2, 3)[2].clone();
        assert!(t.last_job(&done('a'), false));
        assert!(t.last_job(&done('b'), false));
        assert!(!t.last_job(&done('a'), false));
        assert!(!t.last_job(&done('b'), true));
        assert_eq!(
            (
                t.last_job.delivered,
                t.last_job.duplicates,
                t.last_job.retained
            ),
            (2, 1, 1)
        );
    }

    #[test]
    fn output_counts_messages_by_topic_boot_and_seq_and_their_lines() {
        let mut t = Tally::default();
        let batch = model::output_batch(3, 100, 0);
        let p = |seq| model::output_meta(seq, "boot");
        assert!(t.output("s/output", &p(0), batch.as_bytes(), false));
        assert!(t.output("s/output", &p(1), batch.as_bytes(), false));
        assert!(t.output("t/output", &p(1), batch.as_bytes(), false));
        assert!(!t.output("s/output", &p(1), batch.as_bytes(), false));
        assert!(!t.output("s/output", &[], batch.as_bytes(), false));
        assert_eq!(t.output.delivered, 3);
        assert_eq!(t.output_lines, 9);
        assert_eq!((t.output.duplicates, t.output.unreadable), (1, 1));
    }
}
