//! Status publishing: the MQTT side of the loop.
//!
//! The supervisor's status (`labvisor/supervisors/<id>/status`: counts, Docker reachability,
//! file problems, the managed broker) is sent when it changes and every `status_every`; each
//! SUT's view (`<sut>/supervisor`: container, health, restarts, pending action, last error,
//! config problems) when it changes. Both are sticky (republished on reconnect). A removed
//! SUT's retained topics are cleared, also those that arrive later. At shutdown the status says
//! `offline`; the last will says `lost`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use labvisor_mqtt::{Incoming, Message, MqttLink, QoS};
use labvisor_protocol::config::Scan;
use labvisor_protocol::payloads::{
    self, Health, ManagedBrokerStatus, StoppedByPerson, SupervisorState, SupervisorStatus,
    SutCounts, SutView,
};
use labvisor_protocol::topics::SutTopic;
use labvisor_protocol::SutName;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Settings, SuperviseError};
use crate::plan::classify::stem;
use crate::plan::policy::SutState;
use crate::plan::{primary, stopped_by_person, Actual, Desired, RunState};

/// What a pass saw, for the status.
pub(super) struct Seen<'a> {
    /// The directory scan.
    pub scan: &'a Scan,
    /// The containers (empty while the engine cannot be asked).
    pub actual: &'a [Actual],
    /// The desired SUTs.
    pub desired: &'a BTreeMap<SutName, Desired>,
    /// Whether the engine answered.
    pub docker_reachable: bool,
    /// The managed broker's state.
    pub broker: Option<&'a ManagedBrokerStatus>,
}

/// Publishes the supervisor's status and the SUT views.
pub(super) struct Publisher {
    settings: Arc<Settings>,
    link: Option<MqttLink>,
    boot_id: String,
    /// The status last published (without `time_ms`).
    status: Option<SupervisorStatus>,
    /// When the status was last sent to the broker.
    sent_at: Option<Instant>,
    /// SUTs removed by this supervisor whose retained topics it cleared: whatever still
    /// arrives retained for them (a job status, a late last will) is cleared too.
    gone: BTreeSet<SutName>,
    /// The test seam [`super::Hooks::views`].
    views: Option<watch::Sender<BTreeMap<SutName, SutView>>>,
}

/// Starts the supervisor's broker link (with its `lost` last will) and subscribes to the
/// agents' status and last jobs; `(None, None)` without MQTT.
pub(super) fn start_link(
    settings: &Settings,
    boot_id: &str,
    broker: Option<ManagedBrokerStatus>,
) -> Result<(Option<MqttLink>, Option<Incoming>), SuperviseError> {
    let Some(opts) = &settings.mqtt else {
        return Ok((None, None));
    };
    let mut opts = opts.clone();
    let lost = status_json(
        settings,
        SupervisorState::Lost,
        boot_id,
        false,
        SutCounts::default(),
        broker,
    );
    let topic = settings.topics.supervisor_status(&settings.spec.supervisor);
    opts.will = Some(Message::state(topic, lost));
    let (link, incoming) = MqttLink::start(opts)?;
    link.subscribe(settings.topics.agents_filter(), QoS::AtLeastOnce)?;
    link.subscribe(settings.topics.last_jobs_filter(), QoS::AtLeastOnce)?;
    // Lab operations: rolling restart requests to this supervisor, and the progress an
    // earlier run of it left retained (ended as failed: a restart is not resumed).
    let id = &settings.spec.supervisor;
    link.subscribe(settings.topics.supervisor_restart(id), QoS::AtLeastOnce)?;
    link.subscribe(
        settings.topics.supervisor_restart_status(id),
        QoS::AtLeastOnce,
    )?;
    Ok((Some(link), Some(incoming)))
}

fn status_json(
    settings: &Settings,
    state: SupervisorState,
    boot_id: &str,
    docker_reachable: bool,
    suts: SutCounts,
    managed_broker: Option<ManagedBrokerStatus>,
) -> Vec<u8> {
    serde_json::to_vec(&SupervisorStatus {
        v: payloads::VERSION,
        id: settings.spec.supervisor.clone(),
        state,
        boot_id: boot_id.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        docker_reachable,
        suts,
        time_ms: payloads::now_ms(),
        managed_broker,
        file_problems: Vec::new(),
        refresh_ms: 0,
        agents_without_broker: settings.spec.agent_broker.is_none(),
    })
    .expect("status serialises")
}

/// The SUT counts of the status. The container counts are unknown (not zero) while the engine
/// cannot be asked.
fn counts(seen: &Seen<'_>) -> SutCounts {
    let known = Some(0).filter(|_| seen.docker_reachable);
    let mut counts = SutCounts {
        desired: seen.scan.valid.len() as u64,
        invalid: seen.scan.invalid.len() as u64,
        running: known,
        healthy: known,
        unhealthy: known,
    };
    for a in seen.actual.iter().filter(|a| a.owned) {
        let count = match a.health {
            Health::Healthy => &mut counts.healthy,
            Health::Unhealthy => &mut counts.unhealthy,
            _ => &mut None,
        };
        if let Some(n) = count {
            *n += 1;
        }
        if a.state == RunState::Running {
            if let Some(n) = &mut counts.running {
                *n += 1;
            }
        }
    }
    counts
}

/// The problems of the invalid entries: per SUT, and those of entries that name no SUT (they
/// have no `<sut>/supervisor` view, so they go on the supervisor's status).
fn problems(scan: &Scan) -> (BTreeMap<SutName, Vec<String>>, Vec<String>) {
    let mut per_sut = BTreeMap::new();
    let mut unnamed = Vec::new();
    for (path, probs) in &scan.invalid {
        let lines = probs.iter().map(|p| p.to_string());
        match stem(path) {
            Some(sut) => {
                per_sut.insert(sut, lines.collect());
            }
            None => unnamed.extend(lines),
        }
    }
    (per_sut, unnamed)
}

/// The view of `sut` on `<sut>/supervisor` (without `time_ms`).
fn view(
    settings: &Settings,
    sut: &SutName,
    st: &SutState,
    seen: &Seen<'_>,
    problems: Vec<String>,
) -> SutView {
    let primary = primary(seen.actual, seen.desired, sut);
    SutView {
        v: payloads::VERSION,
        sut: sut.clone(),
        supervisor: settings.spec.supervisor.clone(),
        container_id: primary.map(|a| a.id.clone()),
        image: seen.scan.valid.get(sut).map(|c| c.image.clone()),
        config_hash: primary.and_then(|a| a.hash.clone()),
        health: primary.map_or(Health::None, |a| a.health),
        health_reason: st.health_reason.clone(),
        restarts: st.heal.restarts,
        crash_loop: st.heal.crash_loop,
        pending_action: st.pending.clone(),
        last_error: st.conflict.clone().or_else(|| st.last_error.clone()),
        config_problems: problems,
        stopped_by_person: primary
            .filter(|a| {
                !st.in_flight
                    && st.stopped_itself.as_ref() != Some(&a.id)
                    && stopped_by_person(a, seen.desired.get(sut))
            })
            .map(|a| StoppedByPerson {
                at_ms: a.finished_ms,
            }),
        node: primary.and_then(|a| a.node.clone()),
        down: primary.and_then(|a| a.down.clone()),
        time_ms: 0,
    }
}

impl Publisher {
    /// A publisher on `link` (`None`: no MQTT) for the supervisor run `boot_id`.
    pub fn new(
        settings: Arc<Settings>,
        link: Option<MqttLink>,
        boot_id: String,
        views: Option<watch::Sender<BTreeMap<SutName, SutView>>>,
    ) -> Self {
        Self {
            settings,
            link,
            boot_id,
            status: None,
            sent_at: None,
            gone: BTreeSet::new(),
            views,
        }
    }

    /// The broker link (`None` without MQTT).
    pub fn link(&self) -> Option<&MqttLink> {
        self.link.as_ref()
    }

    /// The supervisor's status as last published.
    pub fn status(&self) -> Option<&SupervisorStatus> {
        self.status.as_ref()
    }

    /// When the unchanged supervisor status is due again (every `status_every`).
    pub fn due(&self) -> Option<Instant> {
        self.link.as_ref()?;
        self.sent_at.map(|at| at + self.settings.status_every)
    }

    /// Sends the latest supervisor status, stamped now.
    pub fn send_status(&mut self) {
        let (Some(link), Some(status)) = (&self.link, &self.status) else {
            return;
        };
        let mut s = status.clone();
        s.time_ms = payloads::now_ms();
        let _ = link.set_sticky(
            self.settings
                .topics
                .supervisor_status(&self.settings.spec.supervisor),
            serde_json::to_vec(&s).expect("status serialises"),
        );
        self.sent_at = Some(Instant::now());
    }

    /// Publishes what a pass saw: the supervisor's status, and (while the engine answers) each
    /// SUT's view that changed.
    pub fn publish(&mut self, seen: &Seen<'_>, suts: &mut BTreeMap<SutName, SutState>) {
        let (mut problems, file_problems) = problems(seen.scan);
        let status = SupervisorStatus {
            v: payloads::VERSION,
            id: self.settings.spec.supervisor.clone(),
            state: SupervisorState::Online,
            boot_id: self.boot_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            docker_reachable: seen.docker_reachable,
            suts: counts(seen),
            time_ms: 0,
            managed_broker: seen.broker.cloned(),
            file_problems,
            refresh_ms: self.settings.status_every.as_millis() as u64,
            agents_without_broker: self.settings.spec.agent_broker.is_none(),
        };
        if self.status.as_ref() != Some(&status) {
            self.status = Some(status);
            self.send_status();
        }
        if (self.link.is_none() && self.views.is_none()) || !seen.docker_reachable {
            return;
        }
        for (sut, st) in suts.iter_mut() {
            let view = view(
                &self.settings,
                sut,
                st,
                seen,
                problems.remove(sut).unwrap_or_default(),
            );
            if st.published.as_ref() == Some(&view) {
                continue;
            }
            if let Some(link) = &self.link {
                let mut v = view.clone();
                v.time_ms = payloads::now_ms();
                let _ = link.set_sticky(
                    self.settings.topics.supervisor(sut),
                    serde_json::to_vec(&v).expect("view serialises"),
                );
            }
            st.published = Some(view);
        }
        if let Some(views) = &self.views {
            views.send_replace(
                suts.iter()
                    .filter_map(|(s, st)| Some((s.clone(), st.published.clone()?)))
                    .collect(),
            );
        }
    }

    /// Clears every retained topic of the removed SUT `sut` (empty retained payloads): its
    /// fixed ones ([`labvisor_protocol::topics::Topics::sut_retained`]: agent status, probe,
    /// acknowledgements, last job, the supervisor's view) now, and its job statuses
    /// (`<sut>/jobs/<id>`) as the broker delivers them on the subscription made here. So a
    /// deleted SUT leaves `labvisor status` and `labvisor jobs`. Called in a span naming `sut`.
    pub fn clear_retained(&mut self, sut: &SutName) {
        let Some(link) = &self.link else {
            return;
        };
        let topics = &self.settings.topics;
        for topic in topics.sut_retained(sut) {
            // The view is sticky (republished on reconnect): replace it rather than queue a
            // clear that a reconnect would undo.
            let _ = if topic == topics.supervisor(sut) {
                link.set_sticky(topic, "")
            } else {
                link.publish(Message::state(topic, bytes::Bytes::new()))
            };
        }
        let _ = link.subscribe(topics.jobs_filter(sut), QoS::AtLeastOnce);
        info!("Cleared the retained topics of the removed SUT.");
        self.gone.insert(sut.clone());
    }

    /// SUTs that are back (in `known`) are no longer cleared.
    pub fn forget_gone(&mut self, known: &BTreeSet<SutName>) {
        self.gone.retain(|sut| !known.contains(sut));
    }

    /// Whether the message on `topic` is about a SUT this supervisor removed; a retained
    /// agent status, last job or job status of one is cleared.
    pub fn clear_if_gone(
        &self,
        topic: &str,
        sut: &SutName,
        kind: &SutTopic,
        payload: &[u8],
    ) -> bool {
        if !self.gone.contains(sut) || payload.is_empty() {
            return false;
        }
        if matches!(kind, SutTopic::Agent | SutTopic::LastJob | SutTopic::Job(_)) {
            if let Some(link) = &self.link {
                debug!(sut = %sut, topic = %topic, "Clearing a retained topic of a removed SUT.");
                let _ = link.publish(Message::state(topic.to_owned(), bytes::Bytes::new()));
            }
        }
        true
    }

    /// Publishes `offline` (with the last counts) and closes the link.
    pub async fn offline(self, docker_reachable: bool, broker: Option<ManagedBrokerStatus>) {
        let Some(link) = self.link else {
            return;
        };
        let counts = self.status.map(|s| s.suts).unwrap_or_default();
        let offline = status_json(
            &self.settings,
            SupervisorState::Offline,
            &self.boot_id,
            docker_reachable,
            counts,
            broker,
        );
        let topic = self
            .settings
            .topics
            .supervisor_status(&self.settings.spec.supervisor);
        if let Err(error) = link
            .shutdown(vec![Message::state(topic, offline)], Duration::from_secs(3))
            .await
        {
            warn!(error = %error, "Could not publish the offline status.");
        }
    }
}
