//! The rolling restart in the loop: requests from the broker, the plan's extra action, the
//! progress on `labvisor/supervisors/<id>/restart_status` and in the SUT views. The decisions
//! are [`crate::plan::rolling`]'s.

use std::collections::BTreeMap;

use labvisor_mqtt::Message;
use labvisor_protocol::payloads::{self, RestartRequest, RestartStatus};
use labvisor_protocol::SutName;
use tracing::{error, info, warn};

use super::reconciler::Reconciler;
use crate::plan::rolling::Rolling;
use crate::plan::{Action, Actual, Desired, RecreateReason};
use crate::runtime::ContainerRuntime;

impl<R: ContainerRuntime> Reconciler<R> {
    /// Whether `topic` is this supervisor's restart request topic.
    pub(super) fn is_restart_request(&self, topic: &str) -> bool {
        topic
            == self
                .settings
                .topics
                .supervisor_restart(&self.settings.spec.supervisor)
    }

    /// Whether `topic` is this supervisor's restart progress topic.
    pub(super) fn is_restart_status(&self, topic: &str) -> bool {
        topic
            == self
                .settings
                .topics
                .supervisor_restart_status(&self.settings.spec.supervisor)
    }

    /// The retained progress on this supervisor's topic: when it is a restart that an earlier
    /// run left running (not this run's), it ends as failed, so that no one waits for it.
    pub(super) fn restart_left_over(&mut self, payload: &[u8]) {
        let Ok(mut status) = serde_json::from_slice::<RestartStatus>(payload) else {
            return;
        };
        let ours = self
            .rolling
            .as_ref()
            .is_some_and(|r| r.status.id == status.id);
        if ours || status.state.is_final() {
            return;
        }
        warn!(request = %status.id, "A rolling restart of an earlier run of this supervisor was cut short; marking it failed.");
        status.state = payloads::RestartState::Failed;
        status.reason = Some(
            "the supervisor restarted before the rolling restart ended; run labvisor restart again"
                .into(),
        );
        self.send_restart_status(&status, true);
    }

    /// A restart request arrived: kept for the next pass (which knows the SUT files).
    pub(super) fn restart_requested(&mut self, payload: &[u8]) {
        match serde_json::from_slice::<RestartRequest>(payload) {
            Ok(req) => self.restart_request(req),
            Err(error) => warn!(error = %error, "Ignoring a malformed restart request."),
        }
    }

    /// Keeps `req` for the next pass, which comes at once.
    pub(super) fn restart_request(&mut self, req: RestartRequest) {
        info!(request = %req.id, suts = ?req.suts, all = req.all, "Rolling restart requested.");
        self.restart_requests.push(req);
        self.timers
            .pass_in(tokio::time::Instant::now(), std::time::Duration::ZERO);
    }

    /// Before planning: starts (or rejects) the requests that came, and gives the turn.
    pub(super) fn rolling_choose(
        &mut self,
        actual: &[Actual],
        desired: &BTreeMap<SutName, Desired>,
    ) {
        for req in std::mem::take(&mut self.restart_requests) {
            match Rolling::accept(&req, desired, self.rolling.as_ref()) {
                Ok(r) => {
                    info!(request = %req.id, suts = r.status.suts.len(), "Rolling restart started.");
                    self.rolling = Some(r);
                    self.rolling_published = None;
                }
                Err(status) => {
                    warn!(request = %req.id, reason = status.reason.as_deref().unwrap_or(""), "Rolling restart rejected.");
                    self.send_restart_status(&status, false);
                }
            }
        }
        if let Some(r) = &mut self.rolling {
            r.choose(actual, desired);
        }
    }

    /// The rolling restart's recreation, added to the plan's `actions`.
    pub(super) fn rolling_action(
        &self,
        actual: &[Actual],
        desired: &BTreeMap<SutName, Desired>,
        actions: &mut Vec<Action>,
    ) {
        if let Some(action) = self
            .rolling
            .as_ref()
            .and_then(|r| r.action(actual, desired, actions))
        {
            actions.push(action);
        }
    }

    /// After planning: the restart's progress, the pending action of its SUTs' views, and its
    /// status when it changed.
    pub(super) fn rolling_observe(
        &mut self,
        actual: &[Actual],
        desired: &BTreeMap<SutName, Desired>,
        actions: &[Action],
    ) {
        let Some(r) = &mut self.rolling else {
            return;
        };
        let suts = &self.suts;
        r.observe(actual, desired, actions, |s| {
            suts.get(s).is_some_and(|st| st.in_flight)
        });
        for s in &r.status.suts {
            if let Some(st) = self.suts.get_mut(&s.sut) {
                if st.pending.is_none() {
                    st.pending = r.pending(&s.sut);
                }
            }
        }
        if self.rolling_published.as_ref() != Some(&r.status) {
            let status = r.status.clone();
            match status.state {
                payloads::RestartState::Done => {
                    info!(request = %status.id, "Rolling restart done.")
                }
                payloads::RestartState::Failed => {
                    error!(request = %status.id, reason = status.reason.as_deref().unwrap_or(""), "Rolling restart failed.")
                }
                _ => {}
            }
            self.send_restart_status(&status, true);
            self.rolling_published = Some(status);
        }
    }

    /// An action finished: a failed recreation of the restart stops it.
    pub(super) fn rolling_done(&mut self, action: &Action, error: Option<&str>) {
        if let (
            Some(r),
            Action::Recreate {
                sut,
                reason: RecreateReason::Requested,
                ..
            },
            Some(error),
        ) = (&mut self.rolling, action, error)
        {
            r.failed(sut, error);
        }
    }

    /// Publishes `status` (stamped now): retained (the restart's progress) or not (a
    /// rejection, which leaves the retained progress of the restart that runs).
    fn send_restart_status(&self, status: &RestartStatus, retained: bool) {
        if let Some(hook) = &self.restart_hook {
            hook.send_replace(Some(status.clone()));
        }
        let Some(link) = self.status.link() else {
            return;
        };
        let mut s = status.clone();
        s.time_ms = payloads::now_ms();
        let topic = self
            .settings
            .topics
            .supervisor_restart_status(&self.settings.spec.supervisor);
        let json = serde_json::to_vec(&s).expect("restart status serialises");
        let _ = if retained {
            // Sticky: republished when the link reconnects.
            link.set_sticky(topic, json)
        } else {
            link.publish(Message::event(topic, json))
        };
    }
}
