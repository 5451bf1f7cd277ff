//! Which of labvisor's agent networks a new container goes on.
//!
//! One Linux bridge takes at most 1023 ports, so labvisor's own network is several bridges:
//! `[--name-prefix]labvisor.net` (network 1, the name of earlier versions), then
//! `[--name-prefix]labvisor.net.2`, `.3`, … ([`crate::spec::SpecContext::agent_network_name`]),
//! each holding at most `--network-capacity` containers.
//!
//! A pass assigns each container it creates to the first network with room ([`Networks::assign`]),
//! counting:
//! - every listed container on that network (also a stopped or a foreign one: each takes a
//!   bridge port once running), by the network the runtime reports for it;
//! - the creations still in flight from earlier passes (their container may not be listed yet;
//!   one that is listed already is not counted twice);
//! - the ones assigned before it in the same pass (creations run several at a time).
//!
//! A container keeps its network for life: adoption never moves one (the network is not part
//! of the config hash), and the recreation of a SUT's container puts the new one on the old
//! one's network, whatever the counts (a lowered capacity never moves a container).
//!
//! Pure: no I/O, no clock.

use std::collections::BTreeMap;

use labvisor_protocol::config::{Network, Scan};
use labvisor_protocol::SutName;

use super::Action;
use crate::runtime::ContainerInfo;
use crate::spec::{agent_network_of, SpecContext, LABEL_MANAGED_BY, LABEL_SUPERVISOR, LABEL_SUT};
use crate::spec::{MANAGED_BY, ROLE_NETWORK};

/// The default `--network-capacity`: with about 1000 agents a network keeps well below a
/// bridge's 1023 ports (the broker and anything else on it take some too).
pub const DEFAULT_CAPACITY: usize = 1000;

/// How full labvisor's agent networks are, as one pass sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Networks {
    /// The most containers put on one network (at least 1).
    capacity: usize,
    /// The containers on each network (numbered from 1).
    counts: BTreeMap<usize, usize>,
    /// The network of each SUT's (owned) container, or the one assigned to it.
    of_sut: BTreeMap<SutName, usize>,
}

impl Networks {
    /// The networks as the container `list` and the creations `in_flight` (SUT → network)
    /// fill them, for a supervisor of context `ctx` putting at most `capacity` on each.
    pub fn new(
        capacity: usize,
        list: &[ContainerInfo],
        in_flight: &BTreeMap<SutName, usize>,
        ctx: &SpecContext,
    ) -> Networks {
        let mut n = Networks {
            capacity: capacity.max(1),
            counts: BTreeMap::new(),
            of_sut: BTreeMap::new(),
        };
        let first = ctx.network_name();
        for c in list {
            let Some(net) = c
                .network
                .as_deref()
                .and_then(agent_network_of)
                .filter(|(base, _)| *base == first)
                .map(|(_, net)| net)
            else {
                continue;
            };
            *n.counts.entry(net).or_default() += 1;
            if let Some(sut) = owned_sut(c, ctx) {
                n.of_sut.entry(sut).or_insert(net);
            }
        }
        for (sut, &net) in in_flight {
            if n.of_sut.get(sut) != Some(&net) {
                *n.counts.entry(net).or_default() += 1;
                n.of_sut.insert(sut.clone(), net);
            }
        }
        n
    }

    /// The network of `sut`'s new container: that of its container already on one of
    /// labvisor's networks (a recreation: the new one replaces it there), or the one assigned
    /// to it before; else the first with room, which then counts it.
    pub fn assign(&mut self, sut: &SutName) -> usize {
        if let Some(&net) = self.of_sut.get(sut) {
            return net;
        }
        let net = (1..)
            .find(|n| self.count(*n) < self.capacity)
            .expect("some network has room");
        *self.counts.entry(net).or_default() += 1;
        self.of_sut.insert(sut.clone(), net);
        net
    }

    /// Assigns a network to each SUT whose container `actions` create or recreate, when its
    /// valid file in `scan` puts it on labvisor's own network.
    pub fn assign_creations(
        &mut self,
        actions: &[Action],
        scan: &Scan,
    ) -> BTreeMap<SutName, usize> {
        actions
            .iter()
            .filter(|a| matches!(a, Action::Create { .. } | Action::Recreate { .. }))
            .map(Action::sut)
            .filter(|sut| {
                scan.valid
                    .get(*sut)
                    .is_some_and(|c| c.network == Network::Labvisor)
            })
            .map(|sut| (sut.clone(), self.assign(sut)))
            .collect()
    }

    /// The containers counted on network `n`.
    pub fn count(&self, n: usize) -> usize {
        self.counts.get(&n).copied().unwrap_or(0)
    }
}

/// The SUT of `c` when it is this supervisor's agent container.
fn owned_sut(c: &ContainerInfo, ctx: &SpecContext) -> Option<SutName> {
    let owned = c.labels.get(LABEL_MANAGED_BY).map(String::as_str) == Some(MANAGED_BY)
        && c.labels.get(LABEL_SUPERVISOR).map(String::as_str) == Some(ctx.supervisor.as_str());
    let sut = c.labels.get(LABEL_SUT).filter(|_| owned)?;
    SutName::new(sut).ok()
}

/// Whether a network named `name` with `labels` is one of the agent networks whose first is
/// `first`, so kept while old networks are removed: `first` itself (an earlier version made
/// it without [`ROLE_NETWORK`]), or `first.<n>` labelled [`ROLE_NETWORK`].
pub fn is_agent_network(
    name: &str,
    labels: &std::collections::HashMap<String, String>,
    first: &str,
) -> bool {
    match agent_network_of(name) {
        Some((base, 1)) => base == first,
        Some((base, _)) => {
            base == first
                && labels.get(crate::spec::LABEL_ROLE).map(String::as_str) == Some(ROLE_NETWORK)
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::plan::RunState;
    use crate::runtime::fake::spec_context;
    use crate::spec::LABEL_ROLE;
    use labvisor_protocol::payloads::Health;

    fn sut(s: &str) -> SutName {
        SutName::new(s).unwrap()
    }

    /// A container of SUT `s` on network `net`, this supervisor's (`fake`) or another's.
    fn on(s: &str, net: &str, supervisor: &str) -> ContainerInfo {
        ContainerInfo {
            node: None,
            down: None,
            id: format!("id-{s}-{supervisor}"),
            name: format!("p-{s}"),
            labels: [
                (LABEL_MANAGED_BY, MANAGED_BY),
                (LABEL_SUPERVISOR, supervisor),
                (LABEL_SUT, s),
            ]
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
            state: RunState::Running,
            health: Health::Healthy,
            finished_ms: None,
            network: Some(net.to_owned()),
        }
    }

    fn assign_all(n: &mut Networks, suts: &[&str]) -> Vec<usize> {
        suts.iter().map(|s| n.assign(&sut(s))).collect()
    }

    #[test]
    fn names_of_the_agent_networks() {
        let ctx = spec_context();
        assert_eq!(ctx.agent_network_name(1), "p-labvisor.net");
        assert_eq!(ctx.agent_network_name(2), "p-labvisor.net.2");
        assert_eq!(ctx.agent_network_name(12), "p-labvisor.net.12");
        let net = ctx.agent_network(3);
        assert_eq!(net.labels.get(LABEL_ROLE).unwrap(), ROLE_NETWORK);
        assert_eq!(net.labels.get(LABEL_SUPERVISOR).unwrap(), "fake");
        assert_eq!(
            agent_network_of("p-labvisor.net"),
            Some(("p-labvisor.net", 1))
        );
        assert_eq!(
            agent_network_of("labvisor.net.7"),
            Some(("labvisor.net", 7))
        );
        for other in [
            "labvisor.net.1",
            "labvisor.net.0",
            "labvisor.net.",
            "labvisor.net.+2",
            "labvisor.net.2x",
            "p-labvisor",
            "host",
            "my.net.2",
            "default",
        ] {
            assert_eq!(agent_network_of(other), None, "{other}");
        }
    }

    /// Fresh: the first network fills up to the capacity, then the next, in one pass.
    #[test]
    fn a_pass_fills_the_first_network_with_room() {
        let ctx = spec_context();
        let mut n = Networks::new(2, &[], &BTreeMap::new(), &ctx);
        assert_eq!(
            assign_all(&mut n, &["a", "b", "c", "d", "e"]),
            [1, 1, 2, 2, 3]
        );
        assert_eq!((n.count(1), n.count(2), n.count(3)), (2, 2, 1));
        // Asked again in the same pass, a SUT keeps what it got.
        assert_eq!(n.assign(&sut("c")), 2);
        assert_eq!(n.count(2), 2);
    }

    /// Listed containers count wherever they are (foreign and other supervisors' ones too; a
    /// network of another prefix or a named one does not); a gap is filled first.
    #[test]
    fn listed_containers_count_and_a_gap_is_filled_first() {
        let ctx = spec_context();
        let list = [
            on("a", "p-labvisor.net", "fake"),
            on("b", "p-labvisor.net", "other"),
            on("c", "p-labvisor.net.2", "fake"),
            on("d", "p-labvisor.net.3", "fake"),
            on("e", "p-labvisor.net.3", "fake"),
            on("f", "q-labvisor.net.2", "fake"),
            on("g", "lab-net", "fake"),
            on("h", "host", "fake"),
        ];
        let mut n = Networks::new(2, &list, &BTreeMap::new(), &ctx);
        assert_eq!((n.count(1), n.count(2), n.count(3)), (2, 1, 2));
        assert_eq!(assign_all(&mut n, &["x", "y", "z"]), [2, 4, 4]);
    }

    /// A recreation keeps the old container's network, also over the capacity (never moved);
    /// a SUT whose container is on a named network gets a place like a new one.
    #[test]
    fn a_container_keeps_its_network() {
        let ctx = spec_context();
        let list = [
            on("a", "p-labvisor.net", "fake"),
            on("b", "p-labvisor.net", "fake"),
            on("c", "p-labvisor.net", "fake"),
            on("d", "p-labvisor.net.2", "fake"),
            on("e", "lab-net", "fake"),
        ];
        let mut n = Networks::new(1, &list, &BTreeMap::new(), &ctx);
        assert_eq!(assign_all(&mut n, &["c", "d", "e"]), [1, 2, 3]);
        assert_eq!(n.count(1), 3);
    }

    /// A creation in flight counts until its container is listed, and then only once.
    #[test]
    fn creations_in_flight_count_once() {
        let ctx = spec_context();
        let in_flight = BTreeMap::from([(sut("a"), 1), (sut("b"), 1), (sut("c"), 2)]);
        let list = [on("a", "p-labvisor.net", "fake")];
        let mut n = Networks::new(2, &list, &in_flight, &ctx);
        assert_eq!((n.count(1), n.count(2)), (2, 1));
        assert_eq!(assign_all(&mut n, &["b", "d", "e"]), [1, 2, 3]);
    }

    /// Only creations and recreations of SUTs on labvisor's own network get one.
    #[test]
    fn creations_on_labvisors_network_are_assigned() {
        let dir = tempfile::tempdir().unwrap();
        for (s, extra) in [
            ("a", ""),
            ("b", "network = \"lab-net\"\n"),
            ("c", ""),
            ("d", ""),
        ] {
            let text = format!("image = \"img\"\n{extra}");
            std::fs::write(dir.path().join(format!("{s}.toml")), text).unwrap();
        }
        let allow = labvisor_protocol::config::Allow {
            network: true,
            ..Default::default()
        };
        let scan = labvisor_protocol::config::scan_dir(dir.path(), &allow).unwrap();
        let actions = [
            Action::Create { sut: sut("a") },
            Action::Create { sut: sut("b") },
            Action::Recreate {
                sut: sut("c"),
                id: "c1".into(),
                reason: crate::plan::RecreateReason::ConfigChanged,
            },
            Action::Start {
                sut: sut("d"),
                id: "d1".into(),
            },
            Action::Create { sut: sut("e") },
        ];
        let mut n = Networks::new(1, &[], &BTreeMap::new(), &spec_context());
        let got = n.assign_creations(&actions, &scan);
        assert_eq!(got, BTreeMap::from([(sut("a"), 1), (sut("c"), 2)]));
    }

    #[test]
    fn a_capacity_of_zero_counts_as_one() {
        let ctx = spec_context();
        let mut n = Networks::new(0, &[], &BTreeMap::new(), &ctx);
        assert_eq!(assign_all(&mut n, &["a", "b"]), [1, 2]);
    }

    /// Old-network removal keeps the first network (labelled or not) and the labelled further
    /// ones of the same prefix; anything else of this supervisor goes.
    #[test]
    fn which_networks_are_kept() {
        let role = HashMap::from([(LABEL_ROLE.to_owned(), ROLE_NETWORK.to_owned())]);
        let none = HashMap::new();
        let first = "p-labvisor.net";
        assert!(is_agent_network("p-labvisor.net", &none, first));
        assert!(is_agent_network("p-labvisor.net", &role, first));
        assert!(is_agent_network("p-labvisor.net.2", &role, first));
        assert!(!is_agent_network("p-labvisor.net.2", &none, first));
        assert!(!is_agent_network("q-labvisor.net.2", &role, first));
        assert!(!is_agent_network("q-labvisor.net", &role, first));
        assert!(!is_agent_network("p-labvisor", &none, first));
    }
}
