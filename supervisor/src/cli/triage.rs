//! How `labvisor status` sorts a lab: what is wrong with each SUT ([`problems`]), the one group
//! each SUT counts in ([`group`]), the summary line ([`Summary`]) and which supervisors need a
//! look ([`supervisor_problem`]). Pure: the payloads in, no I/O.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use labvisor_protocol::payloads::{
    AdminMode, AgentState, AgentStatus, Health, SupervisorState, SupervisorStatus, SutView,
};
use serde::Serialize;

/// An online supervisor whose status is older than this many of its refresh periods is shown
/// as stale.
pub const STALE_AFTER_PERIODS: u64 = 3;

/// Something wrong with a SUT, from its agent status and its supervisor view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Problem {
    /// The runtime says its container is down although it should run (Swarm: its node is
    /// lost, or no node fits its placement): [`SutView::down`].
    Down,
    /// Docker says unhealthy, the exec probe fails, or the agent is stalled.
    Unhealthy,
    /// The device process restarts too often: the agent's `crash-loop`, or the supervisor gave
    /// up restarting the container for now.
    CrashLoop,
    /// The SUT's file is invalid (the container keeps running as it was).
    InvalidFile,
    /// The supervisor's last action on the SUT failed (a pending recreation, a create).
    FailingAction,
    /// A person stopped the container; it stays stopped until started or its file changes.
    Stopped,
    /// The agent stopped (`offline`) or is gone (`lost`).
    AgentDown,
    /// A supervisor view but no agent status: the agent never reached the broker.
    NoAgentStatus,
}

impl Problem {
    /// How the summary line names it.
    pub fn label(self) -> &'static str {
        match self {
            Problem::Down => "down",
            Problem::Unhealthy => "unhealthy",
            Problem::CrashLoop => "crash-loop",
            Problem::InvalidFile => "invalid file",
            Problem::FailingAction => "failing action",
            Problem::Stopped => "stopped by a person",
            Problem::AgentDown => "agent down",
            Problem::NoAgentStatus => "no agent status",
        }
    }
}

/// What is wrong with a SUT, from its agent status `a` and supervisor view `v` (none, most of
/// the time). A crash loop is not also counted as unhealthy. A pending action is not a problem
/// by itself (a recreation waiting for a job is how it should be), only once an attempt failed.
pub fn problems(a: Option<&AgentStatus>, v: Option<&SutView>) -> Vec<Problem> {
    let state = a.map(|a| a.state);
    let mut p = Vec::new();
    if v.is_some_and(|v| v.down.is_some()) {
        p.push(Problem::Down);
    }
    let crash_loop = state == Some(AgentState::CrashLoop) || v.is_some_and(|v| v.crash_loop);
    if crash_loop {
        p.push(Problem::CrashLoop);
    } else if v.is_some_and(|v| v.health == Health::Unhealthy)
        || a.is_some_and(|a| a.probe_failure.is_some())
        || state == Some(AgentState::Stalled)
    {
        p.push(Problem::Unhealthy);
    }
    if v.is_some_and(|v| !v.config_problems.is_empty()) {
        p.push(Problem::InvalidFile);
    }
    if v.is_some_and(|v| v.last_error.is_some()) {
        p.push(Problem::FailingAction);
    }
    if v.is_some_and(|v| v.stopped_by_person.is_some()) {
        p.push(Problem::Stopped);
    }
    if matches!(state, Some(AgentState::Offline | AgentState::Lost)) {
        p.push(Problem::AgentDown);
    }
    if a.is_none() && v.is_some() {
        p.push(Problem::NoAgentStatus);
    }
    p.sort();
    p
}

/// The one group a SUT counts in on the summary line, checked in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Group {
    /// It has a [`Problem`].
    Problem,
    /// Put offline or in maintenance by a person.
    Offline,
    /// Passing through: the agent starting, restarting its device process or stopping, or
    /// Docker's health still starting.
    Starting,
    /// Running a job.
    Busy,
    /// Everything else: idle and well.
    Healthy,
}

/// The group of a SUT with `problems`, its agent status `a` and view `v`.
pub fn group(problems: &[Problem], a: Option<&AgentStatus>, v: Option<&SutView>) -> Group {
    let state = a.map(|a| a.state);
    if !problems.is_empty() {
        Group::Problem
    } else if a
        .and_then(|a| a.admin.as_ref())
        .is_some_and(|ad| ad.mode != AdminMode::Online)
    {
        Group::Offline
    } else if matches!(
        state,
        Some(AgentState::Starting | AgentState::Restarting | AgentState::Stopping)
    ) || v.is_some_and(|v| v.health == Health::Starting)
    {
        Group::Starting
    } else if state == Some(AgentState::Busy) {
        Group::Busy
    } else {
        Group::Healthy
    }
}

/// What is wrong with a supervisor, as of `now` (ms since the epoch): lost, stale (an `online`
/// status older than [`STALE_AFTER_PERIODS`] refresh periods), Docker unreachable, its managed
/// broker down, or directory entries that name no SUT. A cleanly stopped (`offline`) supervisor
/// is not a problem: it was stopped on purpose.
pub fn supervisor_problem(sup: &SupervisorStatus, now: u64) -> Option<&'static str> {
    if sup.state == SupervisorState::Lost {
        Some("lost")
    } else if is_stale(sup, now) {
        Some("stale")
    } else if sup.state == SupervisorState::Offline {
        None
    } else if !sup.docker_reachable {
        Some("docker unreachable")
    } else if sup.managed_broker.as_ref().is_some_and(|b| !b.up) {
        Some("managed broker down")
    } else if !sup.file_problems.is_empty() {
        Some("invalid files")
    } else {
        None
    }
}

/// Whether `sup` says `online` but is older than [`STALE_AFTER_PERIODS`] of its refresh period
/// (an older supervisor that does not say its period is never stale).
pub fn is_stale(sup: &SupervisorStatus, now: u64) -> bool {
    sup.state == SupervisorState::Online
        && sup.refresh_ms > 0
        && now.saturating_sub(sup.time_ms) > STALE_AFTER_PERIODS * sup.refresh_ms
}

/// The lab in numbers: SUTs per [`Group`], problem SUTs per [`Problem`] (a SUT with two
/// problems counts under both), and supervisors with a problem.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// SUTs.
    pub suts: usize,
    /// Idle and well.
    pub healthy: usize,
    /// Running a job.
    pub busy: usize,
    /// Starting, restarting or stopping.
    pub starting: usize,
    /// Offline or in maintenance.
    pub offline: usize,
    /// With a problem.
    pub problems: usize,
    /// Problem SUTs per problem.
    pub by_problem: BTreeMap<Problem, usize>,
    /// Supervisors.
    pub supervisors: usize,
    /// Supervisors with a problem ([`supervisor_problem`]).
    pub supervisor_problems: usize,
}

impl Summary {
    /// The summary of SUTs given as their group and problems, and of `supervisors`, the
    /// problem of each.
    pub fn of<'a>(
        suts: impl IntoIterator<Item = (Group, &'a [Problem])>,
        supervisors: &[Option<&str>],
    ) -> Summary {
        let mut s = Summary {
            supervisors: supervisors.len(),
            supervisor_problems: supervisors.iter().flatten().count(),
            ..Summary::default()
        };
        for (group, problems) in suts {
            s.suts += 1;
            *match group {
                Group::Problem => &mut s.problems,
                Group::Offline => &mut s.offline,
                Group::Starting => &mut s.starting,
                Group::Busy => &mut s.busy,
                Group::Healthy => &mut s.healthy,
            } += 1;
            for p in problems {
                *s.by_problem.entry(*p).or_default() += 1;
            }
        }
        s
    }

    /// Whether anything needs a look: a SUT or a supervisor with a problem.
    pub fn any_problem(&self) -> bool {
        self.problems + self.supervisor_problems > 0
    }

    /// `500 SUTs: 480 healthy, 12 busy, 3 offline, 5 problems (2 unhealthy, 3 crash-loop)`,
    /// with `, N starting` after busy when some are, and `; 1 of 2 supervisors with problems`
    /// when one has.
    pub fn line(&self) -> String {
        let mut line = format!(
            "{} SUTs: {} healthy, {} busy",
            self.suts, self.healthy, self.busy
        );
        if self.starting > 0 {
            let _ = write!(line, ", {} starting", self.starting);
        }
        let _ = write!(
            line,
            ", {} offline, {} problems",
            self.offline, self.problems
        );
        if !self.by_problem.is_empty() {
            let kinds: Vec<String> = self
                .by_problem
                .iter()
                .map(|(p, n)| format!("{n} {}", p.label()))
                .collect();
            let _ = write!(line, " ({})", kinds.join(", "));
        }
        if self.supervisor_problems > 0 {
            let _ = write!(
                line,
                "; {} of {} supervisors with problems",
                self.supervisor_problems, self.supervisors
            );
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use labvisor_protocol::payloads::{
        AdminState, ManagedBrokerStatus, StoppedByPerson, SutCounts, VERSION,
    };
    use labvisor_protocol::topics::SupervisorId;
    use labvisor_protocol::SutName;

    fn agent(state: AgentState) -> AgentStatus {
        AgentStatus::new(SutName::new("s").unwrap(), "b", "1", 1).with_state(state)
    }

    /// A view of `s` with `health` and nothing wrong (from JSON: every other field defaults).
    fn view(health: Health) -> SutView {
        serde_json::from_value(serde_json::json!({
            "sut": "s", "supervisor": "lab", "container_id": "c",
            "health": health, "restarts": 0, "time_ms": 1,
        }))
        .unwrap()
    }

    fn offline() -> Option<AdminState> {
        Some(AdminState {
            mode: AdminMode::Offline,
            reason: Some("cable".into()),
            since_ms: 1,
            by: None,
        })
    }

    #[test]
    fn each_problem_comes_from_the_agent_status_or_the_view() {
        let idle = agent(AgentState::Idle);
        let healthy = view(Health::Healthy);
        let p = |a: Option<&AgentStatus>, v: Option<&SutView>| problems(a, v);
        assert_eq!(p(Some(&idle), Some(&healthy)), []);
        assert_eq!(p(Some(&idle), None), [], "an agent without a supervisor");
        assert_eq!(
            p(Some(&idle), Some(&view(Health::Unhealthy))),
            [Problem::Unhealthy]
        );
        let probe = idle.clone().with_probe_failure(Some("exit 1".into()));
        assert_eq!(p(Some(&probe), Some(&healthy)), [Problem::Unhealthy]);
        let stalled = agent(AgentState::Stalled);
        assert_eq!(p(Some(&stalled), Some(&healthy)), [Problem::Unhealthy]);
        // A crash loop makes the container unhealthy too: it counts once, as a crash loop.
        let looping = agent(AgentState::CrashLoop);
        assert_eq!(
            p(Some(&looping), Some(&view(Health::Unhealthy))),
            [Problem::CrashLoop]
        );
        // The runtime says the container is down (Swarm: its node is lost).
        let down = SutView {
            down: Some("node rack3 is down".into()),
            node: Some("rack3".into()),
            ..view(Health::None)
        };
        assert_eq!(p(Some(&idle), Some(&down)), [Problem::Down]);
        let on_node = SutView {
            node: Some("rack3".into()),
            ..healthy.clone()
        };
        assert_eq!(p(Some(&idle), Some(&on_node)), [], "a node alone is fine");
        let gave_up = SutView {
            crash_loop: true,
            ..view(Health::Unhealthy)
        };
        assert_eq!(p(Some(&idle), Some(&gave_up)), [Problem::CrashLoop]);
        // A pending action is how it should be until an attempt fails.
        let pending = SutView {
            pending_action: Some("recreate".into()),
            ..healthy.clone()
        };
        assert_eq!(p(Some(&idle), Some(&pending)), []);
        let failing = SutView {
            last_error: Some("create: no such image".into()),
            config_problems: vec!["image: missing".into()],
            ..pending
        };
        assert_eq!(
            p(Some(&idle), Some(&failing)),
            [Problem::InvalidFile, Problem::FailingAction]
        );
        let stopped = SutView {
            stopped_by_person: Some(StoppedByPerson { at_ms: None }),
            ..view(Health::None)
        };
        assert_eq!(
            p(Some(&agent(AgentState::Offline)), Some(&stopped)),
            [Problem::Stopped, Problem::AgentDown]
        );
        assert_eq!(
            p(Some(&agent(AgentState::Lost)), Some(&healthy)),
            [Problem::AgentDown]
        );
        assert_eq!(p(None, Some(&healthy)), [Problem::NoAgentStatus]);
    }

    #[test]
    fn a_sut_counts_in_one_group_problems_before_offline_before_the_rest() {
        let healthy = view(Health::Healthy);
        let g = |a: &AgentStatus, v: &SutView| group(&problems(Some(a), Some(v)), Some(a), Some(v));
        assert_eq!(g(&agent(AgentState::Idle), &healthy), Group::Healthy);
        assert_eq!(g(&agent(AgentState::Busy), &healthy), Group::Busy);
        for st in [
            AgentState::Starting,
            AgentState::Restarting,
            AgentState::Stopping,
        ] {
            assert_eq!(g(&agent(st), &healthy), Group::Starting, "{st:?}");
        }
        assert_eq!(
            g(&agent(AgentState::Idle), &view(Health::Starting)),
            Group::Starting
        );
        let off = agent(AgentState::Busy).with_admin(offline());
        assert_eq!(g(&off, &healthy), Group::Offline);
        assert_eq!(g(&off, &view(Health::Unhealthy)), Group::Problem);
        let online_again = agent(AgentState::Idle).with_admin(Some(AdminState::default()));
        assert_eq!(g(&online_again, &healthy), Group::Healthy);
    }

    #[test]
    fn the_summary_line_counts_groups_and_problems() {
        let unhealthy = [Problem::Unhealthy];
        let two = [Problem::InvalidFile, Problem::FailingAction];
        let suts: Vec<(Group, &[Problem])> = vec![
            (Group::Healthy, &[]),
            (Group::Healthy, &[]),
            (Group::Busy, &[]),
            (Group::Offline, &[]),
            (Group::Problem, &unhealthy),
            (Group::Problem, &unhealthy),
            (Group::Problem, &two),
        ];
        let s = Summary::of(suts.clone(), &[None]);
        assert_eq!((s.suts, s.problems, s.supervisors), (7, 3, 1));
        assert_eq!(
            s.line(),
            "7 SUTs: 2 healthy, 1 busy, 1 offline, 3 problems (2 unhealthy, 1 invalid file, 1 failing action)"
        );
        assert!(s.any_problem());
        let mut more = suts;
        more.push((Group::Starting, &[]));
        let s = Summary::of(more, &[None, Some("stale")]);
        assert_eq!(
            s.line(),
            "8 SUTs: 2 healthy, 1 busy, 1 starting, 1 offline, 3 problems (2 unhealthy, 1 invalid file, 1 failing action); 1 of 2 supervisors with problems"
        );
        let calm = Summary::of([(Group::Healthy, &[][..])], &[None]);
        assert_eq!(
            calm.line(),
            "1 SUTs: 1 healthy, 0 busy, 0 offline, 0 problems"
        );
        assert!(!calm.any_problem());
        assert!(Summary::of([], &[Some("lost")]).any_problem());
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["by_problem"]["invalid-file"], 1);
        assert_eq!(json["problems"], 3);
    }

    #[test]
    fn lost_stale_and_broken_supervisors_are_problems_a_stopped_one_is_not() {
        let ok = SupervisorStatus {
            v: VERSION,
            id: SupervisorId::new("lab").unwrap(),
            state: SupervisorState::Online,
            boot_id: "b".into(),
            version: "0.1.0".into(),
            docker_reachable: true,
            suts: SutCounts::default(),
            time_ms: 1_000_000,
            managed_broker: None,
            file_problems: Vec::new(),
            refresh_ms: 30_000,
            agents_without_broker: false,
        };
        let at = |s: &SupervisorStatus, after: u64| supervisor_problem(s, s.time_ms + after);
        assert_eq!(at(&ok, 90_000), None);
        assert_eq!(at(&ok, 90_001), Some("stale"));
        let with = |f: &dyn Fn(&mut SupervisorStatus)| {
            let mut s = ok.clone();
            f(&mut s);
            at(&s, 0)
        };
        assert_eq!(with(&|s| s.state = SupervisorState::Lost), Some("lost"));
        assert_eq!(with(&|s| s.state = SupervisorState::Offline), None);
        assert_eq!(
            with(&|s| s.docker_reachable = false),
            Some("docker unreachable")
        );
        assert_eq!(
            with(&|s| s.managed_broker = Some(ManagedBrokerStatus::default())),
            Some("managed broker down")
        );
        assert_eq!(
            with(&|s| s.file_problems = vec!["x.txt: not a SUT file".into()]),
            Some("invalid files")
        );
    }
}
