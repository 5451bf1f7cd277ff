//! What the supervisor sees of a service: one [`ContainerInfo`] per service, from the
//! service, its tasks and the nodes (pure).
//!
//! - A service scaled to 0 replicas was stopped by a person (`docker service scale x=0`, the
//!   Swarm form of `docker stop`): [`RunState::Exited`], as a stopped container is.
//! - Otherwise the task Swarm wants running decides: `running` is running and healthy (Swarm
//!   reports a task with a HEALTHCHECK running only once it is healthy, and fails it when it
//!   turns unhealthy), `starting` is running with its health still starting, and anything
//!   earlier or later (pending, preparing, failed and being replaced) is
//!   [`RunState::Restarting`]: Swarm is at work, the plan leaves it alone.
//! - `down` says why a service that should run does not: its node is down, or no node
//!   satisfies its placement (the task's own error).

use std::collections::HashMap;

use bollard::models::{Node, NodeState, Service, Task, TaskState};
use labvisor_protocol::payloads::Health;

use crate::plan::RunState;
use crate::runtime::docker::containers::finished_at_ms;
use crate::runtime::ContainerInfo;

/// A node as the services see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// Its hostname.
    pub hostname: String,
    /// Whether the manager sees it ready.
    pub ready: bool,
    /// Its state and message when not ready (`down: heartbeat failure`).
    pub why: String,
}

/// The nodes by id.
pub fn nodes(list: &[Node]) -> HashMap<String, NodeView> {
    list.iter()
        .filter_map(|n| {
            let id = n.id.clone()?;
            let hostname = n
                .description
                .as_ref()
                .and_then(|d| d.hostname.clone())
                .unwrap_or_else(|| id.clone());
            let status = n.status.as_ref();
            let state = status.and_then(|s| s.state);
            let message = status.and_then(|s| s.message.clone()).unwrap_or_default();
            let ready = state == Some(NodeState::READY);
            let why = match state {
                Some(s) if message.is_empty() => s.to_string(),
                Some(s) => format!("{s}: {message}"),
                None => "unknown".to_owned(),
            };
            Some((
                id,
                NodeView {
                    hostname,
                    ready,
                    why,
                },
            ))
        })
        .collect()
}

/// The service's tasks, newest first (by their version index, which grows with each change).
fn newest_first<'a>(service: &str, tasks: &'a [Task]) -> Vec<&'a Task> {
    let mut mine: Vec<&Task> = tasks
        .iter()
        .filter(|t| t.service_id.as_deref() == Some(service))
        .collect();
    mine.sort_by_key(|t| std::cmp::Reverse(t.version.as_ref().and_then(|v| v.index).unwrap_or(0)));
    mine
}

/// The service as a container, judged from its tasks and the nodes; `networks` maps network
/// ids to names.
pub fn service_info(
    service: &Service,
    tasks: &[Task],
    nodes: &HashMap<String, NodeView>,
    networks: &HashMap<String, String>,
) -> Option<ContainerInfo> {
    let id = service.id.clone()?;
    let spec = service.spec.as_ref()?;
    let replicas = spec
        .mode
        .as_ref()
        .and_then(|m| m.replicated.as_ref())
        .and_then(|r| r.replicas)
        .unwrap_or(1);
    let mine = newest_first(&id, tasks);
    // The task Swarm wants running, else the newest.
    let current = mine
        .iter()
        .find(|t| t.desired_state == Some(TaskState::RUNNING))
        .or_else(|| mine.first())
        .copied();
    let state_of = |t: &Task| t.status.as_ref().and_then(|s| s.state);
    // The node it runs on, or last ran on: a task waiting for a node has none yet.
    let node = current
        .and_then(|t| t.node_id.as_ref())
        .or_else(|| mine.iter().find_map(|t| t.node_id.as_ref()))
        .and_then(|n| nodes.get(n));
    let (state, health) = if replicas == 0 {
        (RunState::Exited, Health::None)
    } else {
        match current.and_then(state_of) {
            Some(TaskState::RUNNING) if node.is_none_or(|n| n.ready) => {
                (RunState::Running, Health::Healthy)
            }
            Some(TaskState::STARTING) if node.is_none_or(|n| n.ready) => {
                (RunState::Running, Health::Starting)
            }
            _ => (RunState::Restarting, Health::None),
        }
    };
    let down = (replicas > 0 && state == RunState::Restarting)
        .then(|| down_reason(current, node))
        .flatten();
    let network = spec
        .task_template
        .as_ref()
        .and_then(|t| t.networks.as_ref())
        .and_then(|n| n.first())
        .and_then(|n| n.target.clone())
        .map(|t| networks.get(&t).cloned().unwrap_or(t));
    let finished_ms = (replicas == 0)
        .then(|| current.and_then(|t| finished_at_ms(t.status.as_ref()?.timestamp.as_deref()?)))
        .flatten();
    Some(ContainerInfo {
        id,
        name: spec.name.clone().unwrap_or_default(),
        labels: spec
            .labels
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        state,
        health,
        finished_ms,
        network,
        node: node.map(|n| n.hostname.clone()),
        down,
    })
}

/// Why the service's current task does not run: its node is down, or the task's own error
/// (`no suitable node (…)`), or its state while Swarm is still at it.
fn down_reason(task: Option<&Task>, node: Option<&NodeView>) -> Option<String> {
    let node_down = node
        .filter(|n| !n.ready)
        .map(|n| format!("node {} is {}", n.hostname, n.why));
    let status = task.and_then(|t| t.status.as_ref());
    let task_says = status.and_then(|s| {
        let err = s.err.clone().filter(|e| !e.is_empty());
        match (s.state, err) {
            (_, Some(e)) => Some(e),
            (Some(TaskState::PENDING), None) => s.message.clone().filter(|m| !m.is_empty()),
            _ => None,
        }
    });
    match (node_down, task_says) {
        (Some(n), Some(t)) => Some(format!("{n}; {t}")),
        (n, t) => n.or(t),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{
        NodeDescription, NodeStatus, ObjectVersion, ServiceSpec, ServiceSpecMode,
        ServiceSpecModeReplicated, TaskStatus,
    };

    fn node(id: &str, host: &str, state: NodeState) -> Node {
        Node {
            id: Some(id.into()),
            description: Some(NodeDescription {
                hostname: Some(host.into()),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                state: Some(state),
                message: Some(if state == NodeState::DOWN {
                    "heartbeat failure".into()
                } else {
                    String::new()
                }),
                addr: None,
            }),
            ..Default::default()
        }
    }

    fn service(replicas: i64) -> Service {
        Service {
            id: Some("s1".into()),
            spec: Some(ServiceSpec {
                name: Some("dut1".into()),
                labels: Some(HashMap::from([("io.labvisor.sut".into(), "dut1".into())])),
                mode: Some(ServiceSpecMode {
                    replicated: Some(ServiceSpecModeReplicated {
                        replicas: Some(replicas),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn task(index: u64, node: &str, state: TaskState, desired: TaskState, err: &str) -> Task {
        Task {
            id: Some(format!("t{index}")),
            version: Some(ObjectVersion { index: Some(index) }),
            service_id: Some("s1".into()),
            node_id: (!node.is_empty()).then(|| node.to_owned()),
            desired_state: Some(desired),
            status: Some(TaskStatus {
                state: Some(state),
                err: (!err.is_empty()).then(|| err.to_owned()),
                timestamp: Some("2026-12-02T10:00:00.5Z".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn info(s: &Service, tasks: &[Task], nodes_: &[Node]) -> ContainerInfo {
        service_info(s, tasks, &nodes(nodes_), &HashMap::new()).unwrap()
    }

    #[test]
    fn a_running_task_is_running_and_healthy_on_its_node() {
        let n = [node("n1", "rack1", NodeState::READY)];
        let old = task(
            3,
            "n1",
            TaskState::FAILED,
            TaskState::SHUTDOWN,
            "unhealthy container",
        );
        let cur = task(7, "n1", TaskState::RUNNING, TaskState::RUNNING, "");
        let i = info(&service(1), &[old, cur], &n);
        assert_eq!((i.state, i.health), (RunState::Running, Health::Healthy));
        assert_eq!(i.node.as_deref(), Some("rack1"));
        assert_eq!((i.name.as_str(), i.down), ("dut1", None));
        assert_eq!(i.labels["io.labvisor.sut"], "dut1");
    }

    #[test]
    fn a_starting_task_is_running_with_its_health_starting() {
        let n = [node("n1", "rack1", NodeState::READY)];
        let i = info(
            &service(1),
            &[task(2, "n1", TaskState::STARTING, TaskState::RUNNING, "")],
            &n,
        );
        assert_eq!((i.state, i.health), (RunState::Running, Health::Starting));
    }

    #[test]
    fn scaled_to_zero_is_a_persons_stop_with_its_time() {
        let n = [node("n1", "rack1", NodeState::READY)];
        let i = info(
            &service(0),
            &[task(4, "n1", TaskState::SHUTDOWN, TaskState::SHUTDOWN, "")],
            &n,
        );
        assert_eq!(i.state, RunState::Exited);
        assert_eq!(i.finished_ms, Some(1_796_205_600_500));
        assert_eq!(i.down, None);
    }

    #[test]
    fn a_task_on_a_lost_node_is_down_with_the_nodes_reason() {
        let n = [node("n3", "rack3", NodeState::DOWN)];
        let i = info(
            &service(1),
            &[task(5, "n3", TaskState::RUNNING, TaskState::RUNNING, "")],
            &n,
        );
        assert_eq!(i.state, RunState::Restarting);
        assert_eq!(i.node.as_deref(), Some("rack3"));
        assert_eq!(
            i.down.as_deref(),
            Some("node rack3 is down: heartbeat failure")
        );
    }

    #[test]
    fn a_sut_pinned_to_a_lost_node_says_which_node_and_what_swarm_says() {
        let n = [node("n3", "rack3", NodeState::DOWN)];
        let err = "no suitable node (scheduling constraints not satisfied on 2 nodes; 1 node not available for new tasks)";
        let stale = task(5, "n3", TaskState::RUNNING, TaskState::SHUTDOWN, "");
        let waiting = task(6, "", TaskState::PENDING, TaskState::RUNNING, err);
        let i = info(&service(1), &[stale, waiting], &n);
        assert_eq!(i.state, RunState::Restarting);
        assert_eq!(i.node.as_deref(), Some("rack3"));
        assert_eq!(
            i.down,
            Some(format!("node rack3 is down: heartbeat failure; {err}"))
        );
    }

    #[test]
    fn a_task_no_node_can_take_says_so() {
        let err = "no suitable node (scheduling constraints not satisfied on 3 nodes)";
        let i = info(
            &service(1),
            &[task(6, "", TaskState::PENDING, TaskState::RUNNING, err)],
            &[],
        );
        assert_eq!(i.state, RunState::Restarting);
        assert_eq!((i.node, i.down.as_deref()), (None, Some(err)));
    }

    #[test]
    fn the_wanted_task_wins_over_a_newer_one_being_shut_down() {
        let n = [
            node("n1", "rack1", NodeState::READY),
            node("n2", "rack2", NodeState::READY),
        ];
        let cur = task(8, "n2", TaskState::RUNNING, TaskState::RUNNING, "");
        let old = task(9, "n1", TaskState::RUNNING, TaskState::SHUTDOWN, "");
        let i = info(&service(1), &[old, cur], &n);
        assert_eq!(i.node.as_deref(), Some("rack2"));
    }
}
