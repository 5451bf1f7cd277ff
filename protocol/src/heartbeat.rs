//! The heartbeat file: written by the agent, read by `labvisor-healthcheck`.
//!
//! Everything here but [`render`] is the std-only crate `labvisor-heartbeat`, re-exported: the
//! file format, the atomic write, and the healthy-state rule ([`is_healthy`], which
//! [`AgentState::is_healthy`](crate::payloads::AgentState::is_healthy) asks). See that crate for
//! the format and the theory of operation. [`render`] turns an [`AgentStatus`] into the file.

use std::time::Duration;

pub use labvisor_heartbeat::*;

use crate::payloads::AgentStatus;

/// The heartbeat's `unhealthy` value of `status`: why the agent is unhealthy whatever its state
/// (a failing exec probe), empty when nothing is.
pub fn unhealthy_of(status: &AgentStatus) -> String {
    status
        .probe_failure
        .as_deref()
        .map(|r| format!("probe failing: {r}"))
        .unwrap_or_default()
}

/// Renders `status` as a heartbeat file, with `max_age` for the healthcheck.
pub fn render(status: &AgentStatus, max_age: Duration) -> String {
    let unhealthy = unhealthy_of(status);
    let admin = status
        .admin
        .as_ref()
        .and_then(|a| a.summary())
        .unwrap_or_default();
    Heartbeat {
        v: status.v,
        sut: status.sut.as_str(),
        state: status.state.as_str(),
        time_ms: status.time_ms,
        seq: status.seq,
        boot_id: &status.boot_id,
        max_age,
        child: status.child.as_ref().map(|c| Child {
            pid: c.pid,
            alive: c.alive,
            restarts: c.restarts,
        }),
        broker_connected: status.broker_connected,
        output_dropped: status.output_dropped,
        job: status.job.as_ref().map(|j| j.as_str()).unwrap_or_default(),
        detail: status.detail.as_deref().unwrap_or_default(),
        unhealthy: &unhealthy,
        admin: &admin,
        device_work: status.device_work.as_deref().unwrap_or_default(),
        draining: status.draining,
    }
    .render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payloads::{AgentState, ChildStatus};
    use crate::SutName;

    fn status(state: AgentState) -> AgentStatus {
        AgentStatus {
            v: 1,
            sut: SutName::new("rpi4-01").unwrap(),
            state,
            time_ms: 1_795_000_000_000,
            time: String::new(),
            seq: 42,
            boot_id: "b".into(),
            agent_version: "0.1.0".into(),
            child: Some(ChildStatus {
                pid: Some(17),
                alive: false,
                restarts: 5,
                last_exit: Some("exit 1".into()),
            }),
            job: None,
            queue_len: 0,
            broker_connected: false,
            output_dropped: 3,
            detail: Some("exited 5 times\nin 10s".into()),
            probe_failure: None,
            admin: Some(crate::payloads::AdminState {
                mode: crate::payloads::AdminMode::Maintenance,
                reason: Some("reflash".into()),
                since_ms: 1,
                by: None,
            }),
            device_work: None,
            draining: false,
        }
    }

    #[test]
    fn renders_every_field_on_one_line_each() {
        let text = render(&status(AgentState::CrashLoop), Duration::from_secs(30));
        let kv = parse(&text);
        let get = |k| kv.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
        assert_eq!(get("sut"), Some("rpi4-01"));
        assert_eq!(get("state"), Some("crash-loop"));
        assert_eq!(get("time_ms"), Some("1795000000000"));
        assert_eq!(get("max_age_ms"), Some("30000"));
        assert_eq!(get("child_pid"), Some("17"));
        assert_eq!(get("child_alive"), Some("false"));
        assert_eq!(get("child_restarts"), Some("5"));
        assert_eq!(get("job"), Some(""));
        assert_eq!(get("detail"), Some("exited 5 times in 10s"));
        assert_eq!(get("output_dropped"), Some("3"));
        assert_eq!(get("admin"), Some("maintenance: reflash"));
    }

    /// The healthy-state rule exists once (`labvisor_heartbeat::is_healthy`); this pins what it
    /// says for every variant, and that every healthy name is a state the agent can be in. The
    /// `match` has no wildcard, so a new variant does not compile until it is listed here.
    #[test]
    fn every_agent_state_agrees_with_the_healthy_state_rule() {
        for st in AgentState::ALL {
            let want = match st {
                AgentState::Starting
                | AgentState::Idle
                | AgentState::Busy
                | AgentState::Restarting
                | AgentState::Stopping => true,
                AgentState::CrashLoop
                | AgentState::Stalled
                | AgentState::Offline
                | AgentState::Lost => false,
            };
            assert_eq!(st.is_healthy(), want, "{st:?}");
            assert_eq!(is_healthy(st.as_str()), want, "{st:?}");
            assert_eq!(AgentState::parse(st.as_str()), Some(st));
        }
        for name in HEALTHY_STATES {
            let st = AgentState::parse(name).unwrap_or_else(|| panic!("{name} is no AgentState"));
            assert!(st.is_healthy(), "{name}");
        }
        let healthy = AgentState::ALL.iter().filter(|s| s.is_healthy()).count();
        assert_eq!(healthy, HEALTHY_STATES.len());
    }
}
