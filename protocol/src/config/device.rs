//! The `[device]` section of a validated SUT config: the device process's own work (busy
//! globs) and the signal that drains it.

use std::fmt;

use serde::{Serialize, Serializer};

/// The `[device]` section: the device process's own work, which labvisor did not start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeviceSettings {
    /// Absolute globs inside the container: while any matches, the device process is busy
    /// (e.g. testflinger's `/tmp/testflinger/run/*/testflinger.json`).
    pub busy_glob: Vec<BusyGlob>,
    /// The signal that makes the device process exit after its current work (testflinger's
    /// safe restart: `SIGUSR1`), sent when a recreation or removal waits for that work.
    pub drain_signal: Option<DrainSignal>,
}

impl DeviceSettings {
    /// Neither globs nor a drain signal: the section is absent.
    pub fn is_empty(&self) -> bool {
        self.busy_glob.is_empty() && self.drain_signal.is_none()
    }
}

/// An absolute glob pattern inside the container that the `glob` crate accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct BusyGlob(String);

impl BusyGlob {
    /// Checks `pattern`: absolute, no NUL, a valid glob. The error says what is wrong.
    pub fn new(pattern: &str) -> Result<Self, String> {
        if !pattern.starts_with('/') {
            return Err(format!("{pattern:?} must be an absolute path (glob) inside the container, e.g. \"/tmp/testflinger/run/*/testflinger.json\""));
        }
        if pattern.contains('\0') {
            return Err("must not contain a NUL character".into());
        }
        glob::Pattern::new(pattern).map_err(|e| {
            format!(
                "{pattern:?} is not a valid glob: {} (at character {})",
                e.msg, e.pos
            )
        })?;
        Ok(BusyGlob(pattern.to_owned()))
    }

    /// The pattern.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A signal the agent may send the device process to make it drain (exit after its current
/// work). SIGKILL and SIGSTOP are not among them: a drain must let the work finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainSignal {
    /// SIGHUP.
    Hup,
    /// SIGINT.
    Int,
    /// SIGQUIT.
    Quit,
    /// SIGTERM.
    Term,
    /// SIGUSR1 (testflinger's safe restart).
    Usr1,
    /// SIGUSR2.
    Usr2,
}

impl DrainSignal {
    /// Every accepted signal.
    pub const ALL: [DrainSignal; 6] = [
        DrainSignal::Hup,
        DrainSignal::Int,
        DrainSignal::Quit,
        DrainSignal::Term,
        DrainSignal::Usr1,
        DrainSignal::Usr2,
    ];

    /// The signal's name, `SIGUSR1`.
    pub fn as_str(self) -> &'static str {
        match self {
            DrainSignal::Hup => "SIGHUP",
            DrainSignal::Int => "SIGINT",
            DrainSignal::Quit => "SIGQUIT",
            DrainSignal::Term => "SIGTERM",
            DrainSignal::Usr1 => "SIGUSR1",
            DrainSignal::Usr2 => "SIGUSR2",
        }
    }

    /// Parses `SIGUSR1` or `USR1` (any case).
    pub fn parse(name: &str) -> Option<Self> {
        let upper = name.trim().to_ascii_uppercase();
        let full = if upper.starts_with("SIG") {
            upper
        } else {
            format!("SIG{upper}")
        };
        Self::ALL.into_iter().find(|s| s.as_str() == full)
    }
}

impl fmt::Display for DrainSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for DrainSignal {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}
