//! The admin state of each SUT (lab operations) as metrics: `labvisor_sut_admin_state` (1 for
//! the current mode, 0 for the others) and `labvisor_sut_admin_info` (1, with the reason and who
//! set it as labels, while the SUT is offline or in maintenance), from the agents' statuses.

use std::collections::BTreeMap;
use std::sync::Mutex;

use labvisor_protocol::payloads::{AdminMode, AdminState};
use labvisor_protocol::SutName;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::register;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    sut: String,
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    sut: String,
    mode: &'static str,
    reason: String,
    by: String,
}

/// The admin series.
#[derive(Debug)]
pub(super) struct AdminMetrics {
    state: Family<ModeLabels, Gauge>,
    info: Family<InfoLabels, Gauge>,
    /// The info series each SUT has now, to remove it when the state changes.
    shown: Mutex<BTreeMap<SutName, InfoLabels>>,
}

impl AdminMetrics {
    pub(super) fn register(r: &mut Registry) -> Self {
        AdminMetrics {
            state: register(
                r,
                "labvisor_sut_admin_state",
                "1 for the SUT's admin mode (online, offline, maintenance), 0 for the others",
            ),
            info: register(
                r,
                "labvisor_sut_admin_info",
                "1 while the SUT is offline or in maintenance, with the reason and who set it",
            ),
            shown: Mutex::new(BTreeMap::new()),
        }
    }

    /// The admin state an agent reports (`None`: online, never changed).
    pub(super) fn set(&self, sut: &SutName, admin: Option<&AdminState>) {
        let mode = admin.map_or(AdminMode::Online, |a| a.mode);
        for m in AdminMode::ALL {
            self.state
                .get_or_create(&ModeLabels {
                    sut: sut.to_string(),
                    mode: m.as_str(),
                })
                .set((m == mode).into());
        }
        let info = admin
            .filter(|a| a.mode != AdminMode::Online)
            .map(|a| InfoLabels {
                sut: sut.to_string(),
                mode: a.mode.as_str(),
                reason: a.reason.clone().unwrap_or_default(),
                by: a.by.clone().unwrap_or_default(),
            });
        let mut shown = self.shown.lock().unwrap_or_else(|e| e.into_inner());
        let old = match &info {
            Some(l) => shown.insert(sut.clone(), l.clone()),
            None => shown.remove(sut),
        };
        if let Some(old) = old.filter(|o| Some(o) != info.as_ref()) {
            self.info.remove(&old);
        }
        if let Some(l) = info {
            self.info.get_or_create(&l).set(1);
        }
    }

    /// Removes every series of `sut`.
    pub(super) fn remove(&self, sut: &SutName) {
        for m in AdminMode::ALL {
            self.state.remove(&ModeLabels {
                sut: sut.to_string(),
                mode: m.as_str(),
            });
        }
        let mut shown = self.shown.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = shown.remove(sut) {
            self.info.remove(&old);
        }
    }
}
