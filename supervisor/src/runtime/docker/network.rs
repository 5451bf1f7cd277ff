//! labvisor's own bridge networks (`labvisor.net`, `labvisor.net.<n>`, see
//! [`crate::plan::networks`]): each made when missing (with traffic between its containers
//! off), once per process; older networks of this supervisor are removed once unused.

use std::collections::HashMap;

use bollard::models::NetworkCreateRequest;
use bollard::query_parameters::{InspectNetworkOptions, ListNetworksOptionsBuilder};
use tracing::{debug, warn};

use super::{found, DockerRuntime};
use crate::plan::networks::is_agent_network;
use crate::runtime::RuntimeError;
use crate::spec::{agent_network_of, Named, ICC_OPTION, NETWORK_OPTIONS};

impl DockerRuntime {
    /// Makes sure of the network `net` (once per process unless a create fails).
    pub(super) async fn ensure_network(&self, net: &Named) -> Result<(), RuntimeError> {
        if self.known().networks.contains(&net.name) {
            return Ok(());
        }
        let _guard = self.network_lock.lock().await;
        let found = self.ensure_network_locked(net).await;
        if found.is_ok() {
            self.known().networks.insert(net.name.clone());
        }
        found
    }

    async fn ensure_network_locked(&self, net: &Named) -> Result<(), RuntimeError> {
        let inspected = self
            .docker
            .inspect_network(&net.name, None::<InspectNetworkOptions>)
            .await;
        if let Some(n) = found(inspected)? {
            let icc = n.options.as_ref().and_then(|o| o.get(ICC_OPTION));
            if icc.map(String::as_str) != Some("false") {
                warn!(network = %net.name, "The network exists with traffic between its containers allowed (it was not made by labvisor, e.g. by docker-compose with the broker on it): agents on it can reach each other.");
            }
            self.set_current_network(&net.name);
            return Ok(());
        }
        debug!(network = %net.name, "Creating the network.");
        self.docker
            .create_network(NetworkCreateRequest {
                name: net.name.clone(),
                driver: Some("bridge".into()),
                labels: Some(net.labels.clone()),
                options: Some(
                    NETWORK_OPTIONS
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..Default::default()
            })
            .await?;
        self.set_current_network(&net.name);
        Ok(())
    }

    /// Notes the agent networks in use (by the name of the first, whichever `name` is); the
    /// first time, starts the removal of old ones.
    fn set_current_network(&self, name: &str) {
        let name = agent_network_of(name).map_or(name, |(first, _)| first);
        let first = self
            .current_network
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(name.to_owned())
            .is_none();
        if first {
            let rt = self.clone();
            tokio::spawn(async move { rt.remove_old_networks().await });
        }
    }

    /// Removes this supervisor's networks other than the agent networks in use
    /// ([`is_agent_network`]: the first, and the further ones labelled as agent networks), e.g.
    /// the bridge of earlier versions, with traffic between containers allowed; the engine
    /// refuses those a container (an agent not yet recreated) still uses, and they stay until
    /// it is gone.
    pub(super) async fn remove_old_networks(&self) {
        let Some(keep) = self
            .current_network
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return;
        };
        let filters = HashMap::from([("label".to_owned(), self.own_labels(&[]))]);
        let opts = ListNetworksOptionsBuilder::default()
            .filters(&filters)
            .build();
        let Ok(list) = self.docker.list_networks(Some(opts)).await else {
            return;
        };
        for n in list {
            let labels = n.labels.unwrap_or_default();
            let Some(name) = n
                .name
                .filter(|name| !is_agent_network(name, &labels, &keep))
            else {
                continue;
            };
            match self.docker.remove_network(&name).await {
                Ok(()) => debug!(network = %name, "Removed an old network."),
                Err(e) => debug!(network = %name, error = %e, "Old network kept."),
            }
        }
    }

    /// Makes sure of the network `net` and returns its IPv4 gateway: the host's address on that
    /// bridge, where agents on it reach services of the host (the managed broker).
    pub async fn network_gateway(
        &self,
        net: &Named,
    ) -> Result<Option<std::net::IpAddr>, RuntimeError> {
        self.ensure_network(net).await?;
        let n = self
            .docker
            .inspect_network(&net.name, None::<InspectNetworkOptions>)
            .await?;
        Ok(n.ipam
            .and_then(|i| i.config)
            .into_iter()
            .flatten()
            .filter_map(|c| c.gateway)
            .filter_map(|g| g.parse::<std::net::IpAddr>().ok())
            .find(|ip| ip.is_ipv4()))
    }
}
