//! The SUT's admin state (lab operations): online, offline or maintenance, with the reason, since
//! when and by whom, kept in `<data>/admin.json` on the SUT's volume.
//!
//! # Theory of operation
//!
//! [`Admin::open`] reads the file at start; a missing file means online. The file lives on the
//! SUT's volume (`/labvisor/data`), which outlives the agent, the container (a recreation keeps
//! the volume) and the supervisor, so a SUT put offline stays offline until someone puts it
//! online. Every change is written atomically (a temporary file, fsync, rename, fsync of the
//! directory) before the agent acts on it. A file that cannot be read or parsed is taken as
//! offline, with the problem as the reason: a lab that cannot tell whether a board was taken out
//! of service must not hand it jobs; `labvisor online` writes a good file again.
//!
//! The agent's loop asks [`Admin::takes_jobs`] before it starts a queued job (offline and
//! maintenance keep the queue: queued jobs run once the SUT is online again, a running job
//! finishes), hands [`Admin::refusal`] to the runner (new submissions are rejected with it), and
//! holds the device process while [`Admin::holds_device`] (maintenance): drained when the SUT
//! has `device.drain_signal` (the signal, its current work finishes, it exits and stays down),
//! else stopped (TERM, grace, KILL of its group, which cuts its work).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use labvisor_protocol::payloads::{
    now_ms, parse_admin, rfc3339, AdminCommand, AdminMode, AdminState, VERSION,
};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::device::Device;
use crate::mqtt::Received;
use crate::output::Sinks;

/// The file's name in the data directory.
pub const ADMIN_FILE: &str = "admin.json";

/// The file: the state with its payload version.
#[derive(Debug, Serialize, Deserialize)]
struct AdminFile {
    v: u32,
    #[serde(flatten)]
    state: AdminState,
}

/// What a command changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The mode before.
    pub from: AdminMode,
    /// The mode now.
    pub to: AdminMode,
}

/// The admin state and where it is kept.
#[derive(Debug)]
pub struct Admin {
    path: PathBuf,
    state: AdminState,
    /// Why the last change could not be saved (it applies until the agent stops).
    unsaved: Option<String>,
}

impl Admin {
    /// Reads `<data_dir>/admin.json`: online when it is missing, offline (with the problem as
    /// the reason) when it cannot be read.
    pub fn open(data_dir: &Path, now_ms: u64) -> Admin {
        let path = data_dir.join(ADMIN_FILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<AdminFile>(&bytes) {
                Ok(f) => f.state,
                Err(e) => unreadable(&path, &e.to_string(), now_ms),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => AdminState::default(),
            Err(e) => unreadable(&path, &e.to_string(), now_ms),
        };
        Admin {
            path,
            state,
            unsaved: None,
        }
    }

    /// The state.
    pub fn state(&self) -> &AdminState {
        &self.state
    }

    /// The state for the agent's status: `None` while online and never changed.
    pub fn reported(&self) -> Option<AdminState> {
        (self.state.mode != AdminMode::Online || self.state.since_ms != 0)
            .then(|| self.state.clone())
    }

    /// Whether queued jobs may start (online).
    pub fn takes_jobs(&self) -> bool {
        self.state.takes_jobs()
    }

    /// Whether the SUT is offline or in maintenance.
    pub fn is_offline(&self) -> bool {
        !self.takes_jobs()
    }

    /// Whether the device process must be stopped and kept stopped (maintenance).
    pub fn holds_device(&self) -> bool {
        self.state.mode == AdminMode::Maintenance
    }

    /// Why a new submission is rejected (`None` while online).
    pub fn refusal(&self) -> Option<String> {
        let s = &self.state;
        let what = match s.mode {
            AdminMode::Online => return None,
            AdminMode::Offline => "offline",
            AdminMode::Maintenance => "in maintenance",
        };
        let by =
            s.by.as_deref()
                .map(|b| format!(" by {b}"))
                .unwrap_or_default();
        Some(format!(
            "the SUT is {what}: {} (since {}{by}); new jobs are refused until it is put online",
            s.reason.as_deref().unwrap_or("no reason given"),
            rfc3339(s.since_ms),
        ))
    }

    /// Why the last change could not be saved on the volume, if it could not.
    pub fn unsaved(&self) -> Option<&str> {
        self.unsaved.as_deref()
    }

    /// Applies `cmd` at `now_ms` and saves it. The mode's `since` is kept when the mode does not
    /// change (a new reason replaces the old one). A change that cannot be saved still applies
    /// (until the agent stops); the error says why it was not saved.
    pub fn apply(&mut self, cmd: &AdminCommand, now_ms: u64) -> (Transition, std::io::Result<()>) {
        let from = self.state.mode;
        let since_ms = if from == cmd.mode && self.state.since_ms != 0 {
            self.state.since_ms
        } else {
            now_ms
        };
        self.state = AdminState {
            mode: cmd.mode,
            reason: cmd.reason.clone(),
            since_ms,
            by: cmd.by.clone(),
        };
        let saved = self.save();
        self.unsaved = saved
            .as_ref()
            .err()
            .map(|e| format!("admin state not saved to {}: {e}", self.path.display()));
        (Transition { from, to: cmd.mode }, saved)
    }

    /// Puts an online SUT offline (for the agent's own reasons, such as a failed health-check
    /// job). A SUT that is offline or in maintenance already keeps its state (mode, reason, by,
    /// since): the agent's reason must not replace a person's, nor end maintenance (which would
    /// leave the device process held with nothing to release it). Returns whether it changed.
    pub fn set_offline(&mut self, reason: String, by: &str, now_ms: u64) -> std::io::Result<bool> {
        if self.is_offline() {
            return Ok(false);
        }
        let cmd = AdminCommand::new(AdminMode::Offline, Some(reason), Some(by.to_owned()));
        self.apply(&cmd, now_ms).1.map(|()| true)
    }

    fn save(&self) -> std::io::Result<()> {
        let file = AdminFile {
            v: VERSION,
            state: self.state.clone(),
        };
        let mut json = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
        json.push(b'\n');
        write_durably(&self.path, &json)
    }
}

/// Handles a message on `<sut>/admin`: applies the command (saved first), says so in the
/// output, and holds or releases the device process when maintenance starts or ends (held:
/// drained with `drain`, the SUT's `device.drain_signal`, so its work finishes; else stopped,
/// TERM, `grace`, KILL). A
/// retained or malformed command changes nothing; the output says why. The caller acknowledges
/// the message to the broker afterwards.
pub async fn on_command(
    admin: &mut Admin,
    device: &Device,
    sinks: &Sinks,
    r: &Received,
    grace: Duration,
    drain: Option<Signal>,
) {
    let cmd = if r.retain {
        Err(format!(
            "a retained message on {0} is ignored (it would act again at every agent restart); \
             clear it with an empty retained message (mosquitto_pub -r -n -t {0})",
            r.topic
        ))
    } else {
        parse_admin(&r.payload).map_err(|e| e.to_string())
    };
    match cmd {
        Ok(cmd) => apply_command(admin, device, sinks, &cmd, grace, drain).await,
        Err(why) => {
            warn!(reason = %why, "Admin command refused.");
            sinks.agent_line(&format!("admin command refused: {why}"));
        }
    }
}

/// Applies a command that was accepted: saved first, said in the output, and the device process
/// held or released as the new mode asks.
pub(crate) async fn apply_command(
    admin: &mut Admin,
    device: &Device,
    sinks: &Sinks,
    cmd: &AdminCommand,
    grace: Duration,
    drain: Option<Signal>,
) {
    let held = admin.holds_device();
    let (t, saved) = admin.apply(cmd, now_ms());
    if let Err(e) = saved {
        warn!(error = %e, "Cannot save the admin state; it applies until the agent stops.");
    }
    let (reason, by) = (
        cmd.reason.as_deref().unwrap_or(""),
        cmd.by.as_deref().unwrap_or(""),
    );
    info!(
        from = t.from.as_str(),
        to = t.to.as_str(),
        reason,
        by,
        "Admin state changed."
    );
    let by = cmd
        .by
        .as_deref()
        .map(|b| format!(" by {b}"))
        .unwrap_or_default();
    let reason = cmd
        .reason
        .as_deref()
        .map(|r| format!(": {r}"))
        .unwrap_or_default();
    sinks.agent_line(&format!("admin: {}{reason}{by}", t.to.as_str()));
    // Released whenever the new mode does not hold it, not only when it held it before: the
    // device may be held although the mode did not say so (release is a no-op when it is not).
    match (held, admin.holds_device()) {
        (false, true) => match drain {
            Some(sig) => device.hold_drained(sig).await,
            None => device.hold(grace).await,
        },
        (true, true) => {}
        (_, false) => device.release().await,
    }
}

/// The state of an unreadable file: offline, naming the problem.
fn unreadable(path: &Path, why: &str, now_ms: u64) -> AdminState {
    AdminState {
        mode: AdminMode::Offline,
        reason: Some(format!(
            "cannot read {}: {why} (put the SUT online to write it again)",
            path.display()
        )),
        since_ms: now_ms,
        by: Some("labvisor-agent".into()),
    }
}

/// Writes `bytes` to `path` so that a crash leaves the old file or the new one: a temporary file
/// beside it, fsync, rename, fsync of the directory.
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{ADMIN_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(mode: AdminMode, reason: Option<&str>, by: Option<&str>) -> AdminCommand {
        AdminCommand::new(mode, reason.map(str::to_owned), by.map(str::to_owned))
    }

    #[test]
    fn a_fresh_volume_is_online_and_reports_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let a = Admin::open(dir.path(), 5);
        assert!(a.takes_jobs() && !a.is_offline() && !a.holds_device());
        assert_eq!(a.reported(), None);
        assert_eq!(a.refusal(), None);
        assert!(!dir.path().join(ADMIN_FILE).exists(), "nothing written");
    }

    #[test]
    fn offline_maintenance_and_online_move_the_state_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Admin::open(dir.path(), 0);
        let (t, saved) = a.apply(
            &cmd(AdminMode::Offline, Some("flaky usb"), Some("al")),
            1000,
        );
        saved.unwrap();
        assert_eq!(
            t,
            Transition {
                from: AdminMode::Online,
                to: AdminMode::Offline
            }
        );
        assert!(!a.takes_jobs() && !a.holds_device());
        let why = a.refusal().unwrap();
        assert!(
            why.contains("offline: flaky usb") && why.contains("by al"),
            "{why}"
        );

        // Reopened (a new agent on the same volume): the same state.
        let b = Admin::open(dir.path(), 9999);
        assert_eq!(b.state(), a.state());
        assert_eq!(b.state().since_ms, 1000);

        // Same mode, new reason: the reason changes, `since` stays.
        a.apply(&cmd(AdminMode::Offline, Some("still flaky"), None), 2000)
            .1
            .unwrap();
        assert_eq!(a.state().since_ms, 1000);
        assert_eq!(a.state().reason.as_deref(), Some("still flaky"));

        let (t, _) = a.apply(&cmd(AdminMode::Maintenance, Some("reflash"), None), 3000);
        assert_eq!(t.to, AdminMode::Maintenance);
        assert!(a.holds_device() && a.is_offline());
        assert!(a.refusal().unwrap().contains("in maintenance: reflash"));
        assert_eq!(a.state().since_ms, 3000);

        let (t, _) = a.apply(&cmd(AdminMode::Online, None, Some("bo")), 4000);
        assert_eq!((t.from, t.to), (AdminMode::Maintenance, AdminMode::Online));
        assert!(a.takes_jobs() && a.refusal().is_none());
        // Who put it online, and when, is reported.
        let r = a.reported().unwrap();
        assert_eq!(
            (r.mode, r.since_ms, r.by.as_deref()),
            (AdminMode::Online, 4000, Some("bo"))
        );
        assert_eq!(Admin::open(dir.path(), 0).state(), a.state());
        // The file is the versioned state, and no temporary file is left.
        let text = std::fs::read_to_string(dir.path().join(ADMIN_FILE)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (v["v"].as_u64(), v["mode"].as_str()),
            (Some(1), Some("online"))
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn an_unreadable_file_means_offline_with_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(ADMIN_FILE), b"{not json").unwrap();
        let mut a = Admin::open(dir.path(), 7);
        assert!(a.is_offline());
        let reason = a.state().reason.clone().unwrap();
        assert!(
            reason.starts_with("cannot read ") && reason.contains("admin.json"),
            "{reason}"
        );
        assert!(a.refusal().unwrap().contains("cannot read"));
        // Putting it online writes a good file again.
        a.apply(&cmd(AdminMode::Online, None, None), 8).1.unwrap();
        assert!(Admin::open(dir.path(), 9).takes_jobs());
    }

    /// A device process running `sleep`, and the sinks its output goes to.
    fn device() -> (Device, Sinks) {
        device_running(vec!["sleep".into(), "600".into()])
    }

    /// A device process running `argv` (restarted after 20–80 ms), and the sinks its output
    /// goes to.
    fn device_running(argv: Vec<String>) -> (Device, Sinks) {
        let spec = crate::child::Spec {
            argv,
            env: Default::default(),
            cwd: None,
        };
        let restart = labvisor_protocol::config::RestartSettings {
            on_unhealthy: labvisor_protocol::config::OnUnhealthy::None,
            on_child_exit: labvisor_protocol::config::OnChildExit::Restart,
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_millis(80),
            crash_loop_after: 3.try_into().unwrap(),
        };
        let (tap, _rx) = crate::tap::Tap::with_rate(1 << 20, None);
        let sinks = std::sync::Arc::new(Sinks::new(false, None, tap.clone()));
        let dev = Device::spawn(Some(spec), &restart, sinks, false);
        (dev, Sinks::new(false, None, tap))
    }

    /// Waits (10 s at most) until the device process is `running` (or not).
    async fn until_running(dev: &Device, running: bool) {
        let mut rx = dev.watch();
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|s| s.is_running() == running),
        )
        .await;
        assert!(
            r.is_ok(),
            "running should be {running}: {:?}",
            dev.status().state
        );
    }

    const GRACE: Duration = Duration::from_millis(200);

    /// A failing health check during maintenance keeps the maintenance (mode, reason, by), so
    /// `online` releases the held device process; a person's offline keeps its reason too.
    #[tokio::test]
    async fn a_health_check_failure_keeps_maintenance_and_online_releases_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Admin::open(dir.path(), 0);
        let (dev, sinks) = device();
        until_running(&dev, true).await;
        let maint = cmd(AdminMode::Maintenance, Some("reflash"), Some("al"));
        apply_command(&mut a, &dev, &sinks, &maint, GRACE, None).await;
        until_running(&dev, false).await;
        let _ = a.set_offline("health check h failed: exit 3".into(), "health-check", 5);
        let s = a.state().clone();
        assert_eq!(
            (s.mode, s.reason.as_deref(), s.by.as_deref()),
            (AdminMode::Maintenance, Some("reflash"), Some("al")),
            "maintenance kept"
        );
        assert_eq!(Admin::open(dir.path(), 9).state(), &s, "and on the volume");
        let online = cmd(AdminMode::Online, None, Some("bo"));
        apply_command(&mut a, &dev, &sinks, &online, GRACE, None).await;
        until_running(&dev, true).await;

        // A person's offline keeps its reason and who.
        let off = cmd(AdminMode::Offline, Some("flaky usb"), Some("cy"));
        apply_command(&mut a, &dev, &sinks, &off, GRACE, None).await;
        let _ = a.set_offline("health check h2 failed: exit 3".into(), "health-check", 6);
        let s = a.state();
        assert_eq!(
            (s.mode, s.reason.as_deref(), s.by.as_deref()),
            (AdminMode::Offline, Some("flaky usb"), Some("cy"))
        );
        dev.stop(GRACE).await;
    }

    /// A mode that does not hold the device releases it, whatever the mode before said (here it
    /// was changed without the device: the old path of a health check during maintenance).
    #[tokio::test]
    async fn online_releases_a_held_device_whatever_the_mode_before() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Admin::open(dir.path(), 0);
        let (dev, sinks) = device();
        until_running(&dev, true).await;
        let maint = cmd(AdminMode::Maintenance, Some("reflash"), None);
        apply_command(&mut a, &dev, &sinks, &maint, GRACE, None).await;
        until_running(&dev, false).await;
        a.apply(&cmd(AdminMode::Offline, Some("x"), None), 7)
            .1
            .unwrap();
        let online = cmd(AdminMode::Online, None, None);
        apply_command(&mut a, &dev, &sinks, &online, GRACE, None).await;
        until_running(&dev, true).await;
        dev.stop(GRACE).await;
    }

    /// With a drain signal, maintenance drains the device process (it exits on its own after
    /// the signal) instead of TERMing it; online starts it again.
    #[tokio::test]
    async fn maintenance_with_a_drain_signal_drains_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Admin::open(dir.path(), 0);
        // The script says when its traps are set: a signal before that would kill the shell.
        let ready = dir.path().join("ready");
        let script = format!(
            "trap 'exit 5' USR1; trap 'exit 9' TERM; : > {}; while :; do sleep 0.05; done",
            ready.display()
        );
        let (dev, sinks) = device_running(vec!["/bin/sh".into(), "-c".into(), script]);
        until_running(&dev, true).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the script never set its traps"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let maint = cmd(AdminMode::Maintenance, Some("reflash"), None);
        let usr1 = Some(Signal::SIGUSR1);
        apply_command(&mut a, &dev, &sinks, &maint, GRACE, usr1).await;
        until_running(&dev, false).await;
        let s = dev.status();
        assert_eq!(
            (s.state, s.last_exit.as_deref()),
            (crate::device::State::Held, Some("exit 5")),
            "drained, not TERMed"
        );
        let online = cmd(AdminMode::Online, None, None);
        apply_command(&mut a, &dev, &sinks, &online, GRACE, usr1).await;
        until_running(&dev, true).await;
        dev.stop(GRACE).await;
    }

    #[test]
    fn a_change_that_cannot_be_saved_still_applies_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        // The data directory is a file: nothing can be written under it.
        let blocked = dir.path().join("data");
        std::fs::write(&blocked, b"").unwrap();
        let mut a = Admin::open(&blocked, 0);
        assert!(a.is_offline(), "it cannot be read either");
        let (_, saved) = a.apply(&cmd(AdminMode::Online, None, None), 1);
        assert!(saved.is_err());
        assert!(a.takes_jobs(), "online until the agent stops");
        let e = a.set_offline("health check failed".into(), "health-check", 2);
        assert!(e.is_err());
        assert!(a.is_offline());
        assert_eq!(a.state().by.as_deref(), Some("health-check"));
        assert!(a.unsaved().unwrap().contains("admin state not saved"));
    }
}
