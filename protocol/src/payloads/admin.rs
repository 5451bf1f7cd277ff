//! Lab operations: the command on `<sut>/admin` ([`AdminCommand`]) and the admin state an agent
//! reports in its status ([`AdminState`], `AgentStatus::admin`).
//!
//! A SUT is `online` (takes jobs), `offline` (refuses new jobs with the reason; the running job
//! finishes; queued jobs wait) or in `maintenance` (offline, and the device process is stopped
//! until the SUT is put online). The agent keeps the state on the SUT's volume, so it outlives
//! agent, container and supervisor restarts.
//!
//! What arrives on `<sut>/admin` is JSON (`{"v":1,"mode":"offline","reason":"...","by":"..."}`)
//! or, for `mosquitto_pub` by hand, plain text: `offline REASON`, `maintenance REASON` or
//! `online`. Offline and maintenance need a reason; `by` says who asked (the broker does not
//! tell the agent who published, so it is what the sender says).

use serde::{Deserialize, Serialize};

use super::{v1, VERSION};

/// Longest reason (and `by`) in characters; longer ones are refused.
pub const MAX_ADMIN_TEXT: usize = 1024;

/// The admin mode of a SUT.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum AdminMode {
    /// Takes jobs.
    #[default]
    Online,
    /// Refuses new jobs; the running job finishes, queued jobs wait.
    Offline,
    /// Offline, and the device process is stopped.
    Maintenance,
}

impl AdminMode {
    /// Every mode.
    pub const ALL: [AdminMode; 3] = [
        AdminMode::Online,
        AdminMode::Offline,
        AdminMode::Maintenance,
    ];

    /// The kebab-case name, as in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            AdminMode::Online => "online",
            AdminMode::Offline => "offline",
            AdminMode::Maintenance => "maintenance",
        }
    }

    /// Parses the name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.as_str() == s)
    }
}

/// `<sut>/admin`: put the SUT online, offline or in maintenance. Unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminCommand {
    /// Payload version.
    #[serde(default = "v1")]
    pub v: u32,
    /// The mode wanted.
    pub mode: AdminMode,
    /// Why (required for offline and maintenance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Who asks, as the sender says (for example `alice@lab-host`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

impl AdminCommand {
    /// A command for `mode`.
    pub fn new(mode: AdminMode, reason: Option<String>, by: Option<String>) -> Self {
        AdminCommand {
            v: VERSION,
            mode,
            reason,
            by,
        }
    }
}

/// The admin state of a SUT: in the agent's status (`admin`, absent while online and never
/// changed) and in `/labvisor/data/admin.json` on its volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminState {
    /// The mode.
    pub mode: AdminMode,
    /// Why it is in this mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Since when, ms since the epoch (0: never changed).
    #[serde(default)]
    pub since_ms: u64,
    /// Who put it there, as the command said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

impl AdminState {
    /// Whether the SUT takes new jobs and runs queued ones.
    pub fn takes_jobs(&self) -> bool {
        self.mode == AdminMode::Online
    }

    /// `offline: REASON` (`maintenance: REASON`), or `None` while online: what the healthcheck
    /// prints and the heartbeat's `admin=` holds.
    pub fn summary(&self) -> Option<String> {
        if self.mode == AdminMode::Online {
            return None;
        }
        let reason = self.reason.as_deref().unwrap_or("no reason given");
        Some(format!("{}: {}", self.mode.as_str(), one_line(reason)))
    }
}

/// Why an admin command is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// Not JSON of the right shape.
    #[error("invalid admin command JSON: {0}")]
    Json(String),
    /// Plain text that is not `offline|maintenance REASON` or `online`.
    #[error("invalid admin command {0:?}: send `offline REASON`, `maintenance REASON`, `online` or the JSON form")]
    Text(String),
    /// Offline or maintenance without a reason.
    #[error("{0} needs a reason")]
    NoReason(&'static str),
    /// A reason or `by` over [`MAX_ADMIN_TEXT`] characters.
    #[error("{0} is longer than {MAX_ADMIN_TEXT} characters")]
    TooLong(&'static str),
    /// A payload version this build does not know.
    #[error("admin command version {0} is not supported (this agent speaks {VERSION})")]
    Version(u32),
}

/// Parses what arrived on `<sut>/admin`: JSON ([`AdminCommand`]) or plain text.
pub fn parse_admin(payload: &[u8]) -> Result<AdminCommand, AdminError> {
    let text = String::from_utf8_lossy(payload);
    let text = text.trim();
    let cmd = if text.starts_with('{') {
        serde_json::from_str::<AdminCommand>(text).map_err(|e| AdminError::Json(e.to_string()))?
    } else {
        let (word, rest) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
        let mode = AdminMode::parse(word).ok_or_else(|| AdminError::Text(text.to_owned()))?;
        let rest = rest.trim();
        AdminCommand::new(mode, (!rest.is_empty()).then(|| rest.to_owned()), None)
    };
    check(cmd)
}

fn check(mut cmd: AdminCommand) -> Result<AdminCommand, AdminError> {
    if cmd.v > VERSION {
        return Err(AdminError::Version(cmd.v));
    }
    let trimmed = |s: Option<String>| s.map(|s| one_line(s.trim())).filter(|s| !s.is_empty());
    cmd.reason = trimmed(cmd.reason);
    cmd.by = trimmed(cmd.by);
    if cmd.mode != AdminMode::Online && cmd.reason.is_none() {
        return Err(AdminError::NoReason(cmd.mode.as_str()));
    }
    for (what, s) in [("reason", &cmd.reason), ("by", &cmd.by)] {
        if s.as_ref()
            .is_some_and(|s| s.chars().count() > MAX_ADMIN_TEXT)
        {
            return Err(AdminError::TooLong(what));
        }
    }
    Ok(cmd)
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_text_commands_parse() {
        let c =
            parse_admin(br#"{"v":1,"mode":"offline","reason":"broken\nboard","by":"al"}"#).unwrap();
        assert_eq!(c.mode, AdminMode::Offline);
        assert_eq!(c.reason.as_deref(), Some("broken board"));
        assert_eq!(c.by.as_deref(), Some("al"));
        let c = parse_admin(b"  maintenance  reflash the board \n").unwrap();
        assert_eq!(
            (c.mode, c.reason.as_deref()),
            (AdminMode::Maintenance, Some("reflash the board"))
        );
        assert_eq!(parse_admin(b"online").unwrap().mode, AdminMode::Online);
        assert_eq!(parse_admin(br#"{"mode":"online"}"#).unwrap().v, 1);
    }

    #[test]
    fn bad_commands_are_refused_with_a_reason() {
        assert_eq!(
            parse_admin(b"offline").unwrap_err(),
            AdminError::NoReason("offline")
        );
        assert_eq!(
            parse_admin(br#"{"mode":"maintenance","reason":"  "}"#).unwrap_err(),
            AdminError::NoReason("maintenance")
        );
        assert!(matches!(
            parse_admin(b"reboot now"),
            Err(AdminError::Text(_))
        ));
        assert!(matches!(parse_admin(b""), Err(AdminError::Text(_))));
        let e = parse_admin(br#"{"mode":"online","why":"x"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `why`"), "{e}");
        assert_eq!(
            parse_admin(br#"{"v":2,"mode":"online"}"#).unwrap_err(),
            AdminError::Version(2)
        );
        let long = format!("offline {}", "x".repeat(MAX_ADMIN_TEXT + 1));
        assert_eq!(
            parse_admin(long.as_bytes()).unwrap_err(),
            AdminError::TooLong("reason")
        );
    }

    #[test]
    fn summary_names_the_mode_and_reason_unless_online() {
        let mut s = AdminState::default();
        assert_eq!(s.summary(), None);
        assert!(s.takes_jobs());
        s.mode = AdminMode::Offline;
        s.reason = Some("flaky usb".into());
        assert_eq!(s.summary().as_deref(), Some("offline: flaky usb"));
        assert!(!s.takes_jobs());
        for m in AdminMode::ALL {
            assert_eq!(AdminMode::parse(m.as_str()), Some(m));
        }
    }
}
