//! Freezes every MQTT payload: a change to a field name, a state spelling or an omission rule
//! fails here before it reaches a lab's dashboards. Each sample is also parsed back.

use labvisor_protocol::payloads::*;
use labvisor_protocol::topics::{JobId, SupervisorId};
use labvisor_protocol::SutName;
use serde::de::DeserializeOwned;
use serde::Serialize;

const T: u64 = 1_795_000_000_000;

fn sut() -> SutName {
    SutName::new("rpi4-01").unwrap()
}

fn job() -> JobId {
    JobId::new("01JCZ8Q4X2R7W3M5N6P8T9V0AB").unwrap()
}

fn round_trip<P: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(p: &P) {
    let json = serde_json::to_string(p).unwrap();
    let back: P = serde_json::from_str(&json).unwrap();
    assert_eq!(&back, p);
}

fn agent_status(state: AgentState) -> AgentStatus {
    AgentStatus::new(sut(), "9f2c4e1a7b3d5f60", "0.1.0", T)
        .with_state(state)
        .with_seq(42)
        .with_child(Some(ChildStatus {
            pid: Some(17),
            alive: true,
            restarts: 1,
            last_exit: Some("exit 1".into()),
        }))
        .with_jobs(Some(job()), 2)
        .with_broker_connected(true)
}

#[test]
fn agent_status_busy() {
    let p = agent_status(AgentState::Busy);
    round_trip(&p);
    insta::assert_json_snapshot!(p);
}

#[test]
fn agent_status_lost_will_minimal() {
    let p = agent_status(AgentState::Lost)
        .with_child(None)
        .with_jobs(None, 0)
        .with_broker_connected(false);
    round_trip(&p);
    insta::assert_json_snapshot!(p);
}

#[test]
fn probe_result() {
    let p = ProbeResult {
        v: VERSION,
        sut: sut(),
        url: "tcp://10.0.0.5:22".into(),
        ok: false,
        latency_ms: 3000,
        error: Some("connect timed out".into()),
        time_ms: T,
    };
    round_trip(&p);
    insta::assert_json_snapshot!(p);
}

#[test]
fn job_submit_full() {
    let p = JobSubmit {
        id: Some(job()),
        script: Some("echo hi\n".into()),
        argv: None,
        env: [("K".to_string(), "V".to_string())].into(),
        timeout: Some("30m".into()),
        output_timeout: Some("5m".into()),
        reply_to: Some("ci/replies/7".into()),
    };
    round_trip(&p);
    insta::assert_json_snapshot!(p);
}

#[test]
fn submit_acks() {
    let accepted = SubmitAck {
        v: VERSION,
        sut: sut(),
        result: SubmitResult::Accepted,
        id: Some(job()),
        position: Some(0),
        reason: None,
        time_ms: T,
    };
    let rejected = SubmitAck {
        result: SubmitResult::Rejected,
        id: None,
        position: None,
        reason: Some("payload is not valid JSON: expected value at line 1 column 2".into()),
        ..accepted.clone()
    };
    round_trip(&accepted);
    round_trip(&rejected);
    insta::assert_json_snapshot!("submit_ack_accepted", accepted);
    insta::assert_json_snapshot!("submit_ack_rejected", rejected);
}

#[test]
fn job_status_passed() {
    let p = JobStatus::accepted(sut(), job(), T)
        .finished(JobState::Passed, T + 5, T + 1005)
        .with_exit(Some(0), None)
        .with_output_bytes(3);
    round_trip(&p);
    insta::assert_json_snapshot!(p);
}

/// A health check's status carries `health_check: true` (other jobs leave it out) and an id
/// that says so.
#[test]
fn job_status_health_check_failed() {
    let id = JobId::new("health-check-01JCZ8Q4X2R7W3M5N6P8T9V0AB").unwrap();
    let p = JobStatus::accepted(sut(), id, T)
        .with_health_check(true)
        .finished(JobState::Failed, T + 5, T + 1005)
        .with_exit(Some(1), None)
        .with_reason("exit 1".to_owned());
    round_trip(&p);
    insta::assert_json_snapshot!(p);
}

#[test]
fn cancel_ack() {
    let p = CancelAck {
        v: VERSION,
        sut: sut(),
        request: "current".into(),
        id: Some(job()),
        result: CancelResult::Cancelled,
        reason: None,
        time_ms: T,
    };
    round_trip(&p);
    insta::assert_json_snapshot!(p);
}

#[test]
fn sut_view() {
    let p = SutView {
        v: VERSION,
        sut: sut(),
        supervisor: SupervisorId::new("lab-a").unwrap(),
        container_id: Some("3f1e".into()),
        image: Some("labvisor/busybox:local".into()),
        config_hash: Some("ab12".into()),
        health: Health::Healthy,
        restarts: 0,
        health_reason: None,
        crash_loop: false,
        pending_action: Some("recreate (waiting for job 01JCZ8Q4X2R7W3M5N6P8T9V0AB)".into()),
        last_error: None,
        config_problems: vec!["sut/rpi4-01.toml: image: missing".into()],
        stopped_by_person: None,
        node: None,
        down: None,
        time_ms: T,
    };
    round_trip(&p);
    insta::assert_json_snapshot!(p);
}

#[test]
fn sut_view_stopped_by_person() {
    let p = SutView {
        v: VERSION,
        sut: sut(),
        supervisor: SupervisorId::new("lab-a").unwrap(),
        container_id: Some("3f1e".into()),
        image: Some("labvisor/busybox:local".into()),
        config_hash: Some("ab12".into()),
        health: Health::None,
        health_reason: None,
        restarts: 0,
        crash_loop: false,
        pending_action: None,
        last_error: None,
        config_problems: vec![],
        stopped_by_person: Some(StoppedByPerson {
            at_ms: Some(T - 60_000),
        }),
        node: None,
        down: None,
        time_ms: T,
    };
    round_trip(&p);
    insta::assert_json_snapshot!(p);
}

/// A hang the supervisor found itself: unhealthy, and why.
#[test]
fn sut_view_hung() {
    let p = SutView {
        v: VERSION,
        sut: sut(),
        supervisor: SupervisorId::new("lab-a").unwrap(),
        container_id: Some("3f1e".into()),
        image: Some("labvisor/busybox:local".into()),
        config_hash: Some("ab12".into()),
        health: Health::Unhealthy,
        health_reason: Some("no heartbeat for 34 s: heartbeat is 34.2s old (max 30.0s): the agent's loop is hung or dead (last state idle)".into()),
        restarts: 1,
        crash_loop: false,
        pending_action: None,
        last_error: None,
        config_problems: vec![],
        stopped_by_person: None,
        node: None,
        down: None,
        time_ms: T,
    };
    round_trip(&p);
    insta::assert_json_snapshot!(p);
}

/// A SUT on a Swarm node that is lost: where it ran, and why it is down.
#[test]
fn sut_view_node_down() {
    let p = SutView {
        v: VERSION,
        sut: sut(),
        supervisor: SupervisorId::new("lab-a").unwrap(),
        container_id: Some("3f1e".into()),
        image: Some("labvisor/busybox:local".into()),
        config_hash: Some("ab12".into()),
        health: Health::None,
        health_reason: None,
        restarts: 0,
        crash_loop: false,
        pending_action: None,
        last_error: None,
        config_problems: vec![],
        stopped_by_person: None,
        node: Some("rack3-agent-host".into()),
        down: Some("node rack3-agent-host is down".into()),
        time_ms: T,
    };
    round_trip(&p);
    insta::assert_json_snapshot!(p);
}

#[test]
fn supervisor_status() {
    let p = SupervisorStatus {
        v: VERSION,
        id: SupervisorId::new("lab-a").unwrap(),
        state: SupervisorState::Online,
        boot_id: "00ff".into(),
        version: "0.1.0".into(),
        docker_reachable: true,
        suts: SutCounts {
            desired: 3,
            running: Some(3),
            healthy: Some(2),
            unhealthy: Some(1),
            invalid: 1,
        },
        time_ms: T,
        managed_broker: Some(ManagedBrokerStatus {
            up: false,
            restarts: 2,
            last_exit: Some("signal: 9 (SIGKILL)".into()),
        }),
        refresh_ms: 30_000,
        agents_without_broker: false,
        file_problems: vec!["sut/Bad_Name.toml: name: the file name gives SUT name \"Bad_Name\", which is not valid".into()],
    };
    round_trip(&p);
    insta::assert_json_snapshot!(p);
}

/// While the engine cannot be asked, the container counts are unknown (`null`), not zero; a
/// status from an older supervisor (numbers, no newer fields) still parses.
#[test]
fn supervisor_status_counts_unknown_while_docker_is_unreachable() {
    let counts = SutCounts {
        desired: 2,
        invalid: 0,
        ..Default::default()
    };
    assert_eq!(
        serde_json::to_value(&counts).unwrap(),
        serde_json::json!({"desired": 2, "running": null, "healthy": null, "unhealthy": null, "invalid": 0})
    );
    let old: SupervisorStatus = serde_json::from_str(
        r#"{"id":"a","state":"online","boot_id":"1","version":"0.1.0","docker_reachable":true,
            "suts":{"desired":1,"running":1,"healthy":1,"unhealthy":0,"invalid":0},"time_ms":1}"#,
    )
    .unwrap();
    assert_eq!(old.suts.running, Some(1));
    assert!(old.file_problems.is_empty());
    assert_eq!(old.refresh_ms, 0);
}

#[test]
fn supervisor_status_without_a_managed_broker_omits_it() {
    let text = r#"{"v":1,"id":"lab-a","state":"online","boot_id":"00ff","version":"0.1.0","docker_reachable":true,"time_ms":1}"#;
    let p: SupervisorStatus = serde_json::from_str(text).unwrap();
    assert_eq!(p.managed_broker, None);
    assert!(!serde_json::to_string(&p)
        .unwrap()
        .contains("managed_broker"));
}

#[test]
fn older_payloads_without_v_still_parse() {
    let p: CancelAck =
        serde_json::from_str(r#"{"sut":"a","request":"x","result":"not-found","time_ms":1}"#)
            .unwrap();
    assert_eq!(p.v, VERSION);
}

// -- lab operations (helper ops): the rolling restart.

#[test]
fn restart_request() {
    let p = RestartRequest {
        v: VERSION,
        id: "9f2c".into(),
        suts: vec![sut(), SutName::new("rpi4-02").unwrap()],
        all: false,
        when_idle: true,
    };
    round_trip(&p);
    insta::assert_json_snapshot!(p);
}

#[test]
fn restart_status() {
    let p = RestartStatus {
        v: VERSION,
        id: "9f2c".into(),
        state: RestartState::Running,
        suts: vec![
            RestartSut {
                sut: sut(),
                step: RestartStep::Done,
                old_container: Some("3f1e".into()),
                new_container: Some("77ab".into()),
                detail: None,
            },
            RestartSut {
                sut: SutName::new("rpi4-02").unwrap(),
                step: RestartStep::WaitingIdle,
                old_container: Some("5c0d".into()),
                new_container: None,
                detail: Some("waiting for the running job".into()),
            },
        ],
        reason: None,
        time_ms: T,
    };
    round_trip(&p);
    insta::assert_json_snapshot!(p);
}

#[test]
fn admin_command() {
    let p = AdminCommand::new(
        AdminMode::Offline,
        Some("usb hub flaky, replacing it".into()),
        Some("alice@lab-host".into()),
    );
    round_trip(&p);
    insta::assert_json_snapshot!(p);
    assert_eq!(parse_admin(&serde_json::to_vec(&p).unwrap()), Ok(p));
}

#[test]
fn agent_status_admin_maintenance() {
    let p = agent_status(AgentState::Idle).with_admin(Some(AdminState {
        mode: AdminMode::Maintenance,
        reason: Some("reflashing the board".into()),
        since_ms: T - 60_000,
        by: Some("alice@lab-host".into()),
    }));
    round_trip(&p);
    insta::assert_json_snapshot!(p);
}

#[test]
fn agent_status_device_work_draining() {
    let p = agent_status(AgentState::Busy)
        .with_jobs(None, 0)
        .with_device_work(Some("/tmp/testflinger/run/j1/testflinger.json".into()))
        .with_draining(true);
    round_trip(&p);
    insta::assert_json_snapshot!(p);
    let idle = agent_status(AgentState::Idle);
    let json = serde_json::to_string(&idle).unwrap();
    assert!(!json.contains("draining"), "absent when false: {json}");
}
