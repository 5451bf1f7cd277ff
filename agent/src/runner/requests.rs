//! Requests over MQTT: submissions on `<sut>/submit` and cancels on `<sut>/cancel`, each
//! answered on its acknowledgement topic (and on `reply_to` / the MQTT 5 response topic) and
//! acknowledged to the broker once the decision is on disk.

use bytes::Bytes;
use labvisor_protocol::payloads::{
    new_job_id, now_ms, CancelAck, CancelResult, JobState, SubmitAck, SubmitResult, VERSION,
};
use labvisor_protocol::submit::{
    check_reply_topic, parse_cancel, parse_submit, CancelTarget, Submission,
};
use labvisor_protocol::topics::JobId;
use tracing::{info, info_span, warn};

use super::JobRunner;
use crate::jobs::{JobRecord, Lookup};
use crate::mqtt::{Message, Received};

impl JobRunner {
    /// Why a request's reply topics cannot be answered (`reply_to`, then the MQTT 5 response
    /// topic), if one of them is outside the SUT's reply space.
    fn bad_reply_topic(&self, r: &Received, reply_to: Option<&str>) -> Option<String> {
        let check = |what: &str, t: Option<&str>| {
            t.and_then(|t| check_reply_topic(&self.topics, &self.cfg.name, what, t).err())
                .map(|e| e.to_string())
        };
        check("`reply_to`", reply_to)
            .or_else(|| check("the MQTT 5 response topic", r.response_topic.as_deref()))
    }

    /// Answers on the acknowledgement topic, and on `reply_to` and the MQTT 5 response topic
    /// where they are allowed ([`Topics::is_allowed_reply`](labvisor_protocol::topics::Topics::is_allowed_reply)).
    fn reply(&self, retained_topic: String, json: Bytes, r: &Received, reply_to: Option<&str>) {
        self.publish(Message::state(retained_topic, json.clone()));
        let allowed = |t: &str| self.topics.is_allowed_reply(&self.cfg.name, t);
        let reply_to = reply_to.filter(|t| allowed(t));
        if let Some(t) = reply_to {
            self.publish(Message::event(t, json.clone()));
        }
        if let Some(t) = r.response_topic.as_ref().filter(|t| allowed(t)) {
            if Some(t.as_str()) != reply_to {
                self.publish(
                    Message::event(t.clone(), json).with_correlation(r.correlation_data.clone()),
                );
            }
        }
    }

    /// Handles a message on `<sut>/submit`: parse, durably queue, ack, acknowledge.
    pub fn on_submit(&mut self, r: &Received) {
        let (ack, reply_to) = self.decide_submit(r);
        // The job is on disk (or refused): now the broker may forget the message.
        if let Some(link) = &self.link {
            let _ = link.ack(r);
        }
        if ack.result == SubmitResult::Rejected {
            warn!(
                reason = ack.reason.as_deref().unwrap_or(""),
                "Submission rejected."
            );
        }
        let json = Bytes::from(serde_json::to_vec(&ack).expect("serialises"));
        let topic = self.topics.submit_status(&self.cfg.name);
        self.reply(topic, json, r, reply_to.as_deref());
    }

    /// The answer to a submission, and where else it goes (`reply_to`).
    fn decide_submit(&mut self, r: &Received) -> (SubmitAck, Option<String>) {
        let parsed = if r.retain {
            Err(format!(
                "retained message on {}: a job must be published without the retain flag (a \
                 retained job would run again at every agent restart); it was not run. Clear it \
                 with an empty retained message (mosquitto_pub -r -n -t {0})",
                r.topic
            ))
        } else {
            parse_submit(&r.payload, self.cfg.job.max_payload.get() as usize)
                .map_err(|e| e.to_string())
        };
        let sub = match parsed {
            Ok(sub) => sub,
            Err(reason) => {
                // Name the job (and answer its reply_to) whenever the payload says which it is.
                let v: Option<serde_json::Value> = serde_json::from_slice(&r.payload).ok();
                let field = |k: &str| v.as_ref()?.get(k)?.as_str().map(str::to_owned);
                let id = field("id").and_then(|i| JobId::new(&i).ok());
                let reply_to =
                    field("reply_to").filter(|t| !t.is_empty() && !t.contains(['+', '#']));
                return (
                    self.ack(SubmitResult::Rejected, id, None, Some(reason)),
                    reply_to,
                );
            }
        };
        let ack = match self.bad_reply_topic(r, sub.reply_to.as_deref()) {
            // Rejected at once: nobody would hear how the job went.
            Some(reason) => self.ack(SubmitResult::Rejected, sub.id.clone(), None, Some(reason)),
            None => self.queue(&sub),
        };
        (ack, sub.reply_to)
    }

    /// Queues a checked submission, unless it is a duplicate or the queue is full.
    fn queue(&mut self, sub: &Submission) -> SubmitAck {
        let id = sub.id.clone().unwrap_or_else(new_job_id);
        let limit = self.cfg.job.queue_limit;
        match self.store.lookup(&id) {
            Lookup::Queued(p) => self.ack(SubmitResult::Duplicate, Some(id), Some(p as u64), None),
            Lookup::Running => self.ack(SubmitResult::Duplicate, Some(id), Some(0), None),
            Lookup::Finished(_) => self.ack(SubmitResult::Duplicate, Some(id), None, None),
            Lookup::Unknown if self.refusal.is_some() => {
                let reason = self.refusal.clone();
                self.ack(SubmitResult::Rejected, Some(id), None, reason)
            }
            Lookup::Unknown if self.store.queue_len() >= limit.get() as usize => {
                let waiting = self.store.queue_len();
                let reason = format!("queue is full ({waiting} jobs waiting, queue_limit {limit})");
                self.ack(SubmitResult::Rejected, Some(id), None, Some(reason))
            }
            Lookup::Unknown => {
                let job = &self.cfg.job;
                let rec =
                    JobRecord::new(id.clone(), sub, job.timeout, job.output_timeout, now_ms());
                match self.store.accept(rec.clone()) {
                    Ok(pos) => {
                        info_span!("job", job_id = %id)
                            .in_scope(|| info!(position = pos, "Job accepted."));
                        self.publish_status(&self.store.queued_status(&rec), false);
                        self.ack(SubmitResult::Accepted, Some(id), Some(pos as u64), None)
                    }
                    Err(e) => {
                        let reason = format!("cannot store the job on the volume: {e}");
                        self.ack(SubmitResult::Rejected, Some(id), None, Some(reason))
                    }
                }
            }
        }
    }

    fn ack(
        &self,
        result: SubmitResult,
        id: Option<JobId>,
        position: Option<u64>,
        reason: Option<String>,
    ) -> SubmitAck {
        SubmitAck {
            v: VERSION,
            sut: self.cfg.name.clone(),
            result,
            id,
            position,
            reason,
            time_ms: now_ms(),
        }
    }

    /// Handles a message on `<sut>/cancel`.
    pub fn on_cancel(&mut self, r: &Received) {
        let request = String::from_utf8_lossy(&r.payload).trim().to_owned();
        let parsed = match self.bad_reply_topic(r, None) {
            Some(reason) => Err(reason),
            None if r.retain => Err(format!(
                "retained message on {}: a cancel must be published without the retain flag (it \
                 would act again at every agent restart); it was ignored",
                r.topic
            )),
            None => parse_cancel(&r.payload).map_err(|e| e.to_string()),
        };
        let (result, id, reason) = match parsed {
            Err(reason) => (CancelResult::Rejected, None, Some(reason)),
            Ok(CancelTarget::Current) => match self.running().cloned() {
                Some(id) => {
                    self.end_active(JobState::Cancelled, "cancelled on request".into());
                    (CancelResult::Cancelled, Some(id), None)
                }
                None => (
                    CancelResult::NotFound,
                    None,
                    Some("no job is running".into()),
                ),
            },
            Ok(CancelTarget::Id(id)) => match self.store.lookup(&id) {
                Lookup::Running => {
                    self.end_active(JobState::Cancelled, "cancelled on request".into());
                    (CancelResult::Cancelled, Some(id), None)
                }
                Lookup::Queued(_) => {
                    let rec = self.store.queued(&id).cloned().expect("queued");
                    let mut st = self.store.queued_status(&rec);
                    st.state = JobState::Cancelled;
                    st.ended_ms = Some(now_ms());
                    st.reason = Some("cancelled on request before it started".into());
                    match self.store.finish(st.clone()) {
                        Ok(evicted) => {
                            self.clear_status(evicted);
                            self.publish_status(&st, false);
                            (CancelResult::Cancelled, Some(id), None)
                        }
                        Err(e) => (
                            CancelResult::Rejected,
                            Some(id),
                            Some(format!("cannot record the cancel: {e}")),
                        ),
                    }
                }
                Lookup::Finished(s) => (
                    CancelResult::AlreadyFinished,
                    Some(id),
                    Some(format!("the job already ended: {:?}", s.state).to_lowercase()),
                ),
                Lookup::Unknown => (
                    CancelResult::NotFound,
                    Some(id.clone()),
                    Some(format!("no job {id}")),
                ),
            },
        };
        if let Some(link) = &self.link {
            let _ = link.ack(r);
        }
        let ack = CancelAck {
            v: VERSION,
            sut: self.cfg.name.clone(),
            request,
            id,
            result,
            reason,
            time_ms: now_ms(),
        };
        let json = Bytes::from(serde_json::to_vec(&ack).expect("serialises"));
        self.reply(self.topics.cancel_status(&self.cfg.name), json, r, None);
    }
}
