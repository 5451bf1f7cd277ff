//! `labvisor offline SUT --reason TEXT`, `labvisor maintenance SUT --reason TEXT` and
//! `labvisor online SUT`: lab operations over MQTT.
//!
//! The command is published on `<sut>/admin` (QoS 1, never retained) as an
//! [`AdminCommand`]; the agent saves it on the SUT's volume and shows it in its retained status
//! (`admin`). The command waits, up to `--timeout`, until a live status of the agent (not `lost`
//! nor `offline`) shows the mode, reason and `by` it sent, and prints that state. An agent that
//! is down gets the command when it comes back (its MQTT session is persistent); the command
//! then ends with exit status 4 and says so.

use std::io::Write;
use std::time::Duration;

use labvisor_protocol::payloads::{
    rfc3339, AdminCommand, AdminMode, AdminState, AgentState, AgentStatus,
};
use labvisor_protocol::SutName;

use super::show::{parse, sut_name, write_json};
use super::{BrokerArgs, ClientError, Session};

/// The flags of `offline`, `online` and `maintenance`.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminArgs {
    /// The SUT.
    pub sut: String,
    /// Why (required for offline and maintenance); shown in `labvisor status`, `/metrics`,
    /// Docker's health log, and the rejection of every new job.
    #[arg(long)]
    pub reason: Option<String>,
    /// Who asks (default `$USER@<hostname>`).
    #[arg(long)]
    pub by: Option<String>,
    /// Print the SUT's admin state as JSON.
    #[arg(long)]
    pub json: bool,
    /// How long to wait until the agent's status shows the change.
    #[arg(long, default_value = "15s")]
    pub timeout: humantime::Duration,
    /// The broker.
    #[command(flatten)]
    pub broker: BrokerArgs,
}

/// Puts `args.sut` in `mode` and prints its admin state once the agent shows it: exit status 0,
/// or an error (4: no confirmation within the timeout, 5: no such SUT on the broker).
pub async fn admin(
    mode: AdminMode,
    args: &AdminArgs,
    out: &mut dyn Write,
) -> Result<u8, ClientError> {
    let sut = sut_name(&args.sut)?;
    let cmd = command(mode, args)?;
    let mut s = Session::connect(&args.broker, |t| vec![t.agent(&sut)]).await?;
    let retained = s.settle().await;
    if !retained.iter().any(|r| parse::<AgentStatus>(r).is_some()) {
        s.close().await;
        return Err(ClientError::UnknownSut {
            sut: sut.to_string(),
            broker: args.broker.broker.clone(),
        });
    }
    let payload = serde_json::to_vec(&cmd).expect("serialises");
    s.publish(s.topics.admin(&sut), payload)?;
    let timeout: Duration = args.timeout.into();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last: Option<AgentStatus> = retained.iter().filter_map(parse).last();
    let state = loop {
        if let Some(st) = last.as_ref().and_then(|a| shows(a, &cmd)) {
            break st;
        }
        match s.next(Some(deadline)).await {
            Some(r) => {
                if let Some(a) = parse::<AgentStatus>(&r) {
                    last = Some(a);
                }
            }
            None => {
                s.close().await;
                return Err(no_answer(&sut, mode, timeout, last.as_ref()));
            }
        }
    };
    s.close().await;
    if args.json {
        write_json(out, &serde_json::json!({ "sut": sut, "admin": state }))?;
    } else {
        writeln!(out, "{}", describe(&sut, &state))?;
    }
    Ok(0)
}

/// The command the flags ask for, with the reason and `by` as the agent will keep them.
fn command(mode: AdminMode, args: &AdminArgs) -> Result<AdminCommand, ClientError> {
    let clean = |s: &Option<String>| {
        s.as_deref()
            .map(|s| s.trim().replace(['\n', '\r'], " "))
            .filter(|s| !s.is_empty())
    };
    let reason = clean(&args.reason);
    if mode != AdminMode::Online && reason.is_none() {
        return Err(ClientError::Usage(format!(
            "{} needs --reason TEXT (it is shown to everyone whose job is refused)",
            mode.as_str()
        )));
    }
    let by = clean(&args.by).or_else(default_by);
    Ok(AdminCommand::new(mode, reason, by))
}

/// `$USER@<hostname>`, as far as they are known.
fn default_by() -> Option<String> {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|u| !u.is_empty());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty());
    match (user, host) {
        (Some(u), Some(h)) => Some(format!("{u}@{h}")),
        (u, h) => u.or(h),
    }
}

/// The admin state of a live agent status that shows `cmd`, if it does.
fn shows(a: &AgentStatus, cmd: &AdminCommand) -> Option<AdminState> {
    if matches!(a.state, AgentState::Lost | AgentState::Offline) {
        return None;
    }
    let st = a.admin.as_ref()?;
    (st.mode == cmd.mode
        && st.by == cmd.by
        && (cmd.mode == AdminMode::Online || st.reason == cmd.reason))
        .then(|| st.clone())
}

/// Why no confirmation came, with what the agent last said.
fn no_answer(
    sut: &SutName,
    mode: AdminMode,
    timeout: Duration,
    last: Option<&AgentStatus>,
) -> ClientError {
    let now = match last {
        Some(a) if matches!(a.state, AgentState::Lost | AgentState::Offline) => format!(
            "its agent is {} (the command is delivered when it is back)",
            a.state.as_str()
        ),
        Some(a) => match a.admin.as_ref() {
            Some(st) => format!("its agent still shows {}", st.mode.as_str()),
            None => "its agent shows no admin state (an older agent?)".to_owned(),
        },
        None => "no status from its agent".to_owned(),
    };
    ClientError::NoAnswer(format!(
        "{sut}: sent `{}`, but {now} after {}",
        mode.as_str(),
        humantime::format_duration(timeout)
    ))
}

/// `rpi4-01: offline: REASON (since TIME by WHO)`.
pub(crate) fn describe(sut: &SutName, st: &AdminState) -> String {
    let reason = st
        .reason
        .as_deref()
        .map(|r| format!(": {r}"))
        .unwrap_or_default();
    let by = st
        .by
        .as_deref()
        .map(|b| format!(" by {b}"))
        .unwrap_or_default();
    format!(
        "{sut}: {}{reason} (since {}{by})",
        st.mode.as_str(),
        rfc3339(st.since_ms)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(reason: Option<&str>, by: Option<&str>) -> AdminArgs {
        AdminArgs {
            sut: "a".into(),
            reason: reason.map(String::from),
            by: by.map(String::from),
            json: false,
            timeout: Duration::from_secs(1).into(),
            broker: <BrokerArgs as clap::FromArgMatches>::from_arg_matches(
                &<BrokerArgs as clap::Args>::augment_args(clap::Command::new("t"))
                    .get_matches_from(["t"]),
            )
            .unwrap(),
        }
    }

    #[test]
    fn offline_and_maintenance_need_a_reason() {
        for mode in [AdminMode::Offline, AdminMode::Maintenance] {
            for reason in [None, Some("  \n ")] {
                let e = command(mode, &args(reason, None)).unwrap_err();
                assert_eq!(e.exit_code(), 2, "{e}");
                assert!(e.to_string().contains("needs --reason"), "{e}");
            }
        }
        let c = command(AdminMode::Online, &args(None, Some("ops"))).unwrap();
        assert_eq!((c.reason, c.by.as_deref()), (None, Some("ops")));
        let c = command(AdminMode::Offline, &args(Some(" a\nb "), Some("x"))).unwrap();
        assert_eq!(c.reason.as_deref(), Some("a b"));
    }

    #[test]
    fn only_a_live_status_with_the_same_state_confirms() {
        let sut = SutName::new("a").unwrap();
        let cmd = AdminCommand::new(AdminMode::Offline, Some("r".into()), Some("me".into()));
        let state = AdminState {
            mode: AdminMode::Offline,
            reason: Some("r".into()),
            since_ms: 1,
            by: Some("me".into()),
        };
        let status = AgentStatus::new(sut.clone(), "b", "1", 0).with_state(AgentState::Idle);
        assert_eq!(shows(&status, &cmd), None);
        let ok = status.clone().with_admin(Some(state.clone()));
        assert_eq!(shows(&ok, &cmd), Some(state.clone()));
        let lost = ok.clone().with_state(AgentState::Lost);
        assert_eq!(shows(&lost, &cmd), None);
        let other = AdminCommand::new(AdminMode::Offline, Some("other".into()), Some("me".into()));
        assert_eq!(shows(&ok, &other), None);
        assert_eq!(
            describe(&sut, &state),
            "a: offline: r (since 1970-01-01T00:00:00.001Z by me)"
        );
        let e = no_answer(
            &sut,
            AdminMode::Offline,
            Duration::from_secs(2),
            Some(&lost),
        );
        assert_eq!(
            e.to_string(),
            "a: sent `offline`, but its agent is lost (the command is delivered when it is back) after 2s"
        );
    }
}
