//! [`AgentLogins`]: the per-SUT agent logins of the managed broker, made while it runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use super::process::signal;
use super::state::{hand_to_broker_user, write_private};
use super::{BrokerError, MosquittoError, LEGACY_AGENT_USER};

/// The per-SUT agent logins of the managed broker: a password file per SUT in
/// [`AGENTS_DIR`](super::AGENTS_DIR), mirrored into mosquitto's password file.
#[derive(Debug)]
pub struct AgentLogins {
    dir: PathBuf,
    passwd: PathBuf,
    passwd_bin: PathBuf,
    state_dir: PathBuf,
    legacy: bool,
    /// mosquitto's pid, signalled to reload; serialises changes too.
    pid: Mutex<Option<u32>>,
}

impl AgentLogins {
    /// The logins in `dir` mirrored into mosquitto's password file `passwd` (with the
    /// `mosquitto_passwd` at `passwd_bin`), of the broker with pid `pid` and state directory
    /// `state_dir`; `legacy` when that has the shared login of earlier versions.
    pub(super) fn new(
        dir: PathBuf,
        passwd: PathBuf,
        passwd_bin: PathBuf,
        state_dir: PathBuf,
        legacy: bool,
        pid: u32,
    ) -> Self {
        Self {
            dir,
            passwd,
            passwd_bin,
            state_dir,
            legacy,
            pid: Mutex::new(Some(pid)),
        }
    }

    /// The lock on mosquitto's pid (`None` while it is not running).
    pub(super) fn lock_pid(&self) -> MutexGuard<'_, Option<u32>> {
        self.pid.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` with mosquitto's pid, when it runs, under the pid lock; whether it ran. The
    /// watcher clears the pid under the same lock before it reaps the process, so a signal sent
    /// in `f` reaches that mosquitto (or its zombie), never a process that reused its pid.
    pub(super) fn with_pid(&self, f: impl FnOnce(u32)) -> bool {
        let pid = self.lock_pid();
        match *pid {
            Some(pid) => {
                f(pid);
                true
            }
            None => false,
        }
    }

    /// The directory of per-SUT passwords (what `--agent-credentials` takes).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes sure `sut` has a login: when it has none yet, makes a random password, adds it to
    /// mosquitto's password file and has mosquitto reload it. Returns whether it was new.
    pub fn ensure(&self, sut: &labvisor_protocol::SutName) -> Result<bool, BrokerError> {
        let pid = self.lock_pid();
        let file = self.dir.join(sut.as_str());
        if std::fs::read_to_string(&file).is_ok_and(|p| p.trim().len() >= 16) {
            return Ok(false);
        }
        let err = |reason: String| BrokerError::Login {
            sut: sut.to_string(),
            reason,
        };
        if sut.is_reserved() {
            return Err(err(format!(
                "{sut} is reserved for labvisor's control plane and never a SUT's login"
            )));
        }
        if self.legacy && sut.as_str() == LEGACY_AGENT_USER {
            return Err(err(format!(
                "{LEGACY_AGENT_USER} is the shared agent login of this broker's state directory; \
                 rename the SUT file"
            )));
        }
        let password = random_password().map_err(|e| err(e.to_string()))?;
        write_private(&file, password.as_bytes(), 0o600)
            .map_err(|e| err(format!("{}: {e}", file.display())))?;
        add_login(&self.passwd_bin, &self.passwd, sut.as_str(), &password)
            .map_err(|e| err(e.to_string()))?;
        hand_to_broker_user(&self.state_dir).map_err(|e| err(e.to_string()))?;
        if let Some(pid) = *pid {
            signal(pid, nix::sys::signal::Signal::SIGHUP);
        }
        Ok(true)
    }
}

/// A password of 128 bits from the operating system's CSPRNG (getrandom(2)), as 32 hex digits.
pub(super) fn random_password() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes)
        .map_err(|e| std::io::Error::other(format!("getrandom: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Adds (or replaces) `user` in mosquitto's password file `passwd`.
pub(super) fn add_login(
    passwd_bin: &Path,
    passwd: &Path,
    user: &str,
    password: &str,
) -> Result<(), MosquittoError> {
    let out = Command::new(passwd_bin)
        .args(["-b"])
        .arg(passwd)
        .args([user, password])
        .output()
        .map_err(MosquittoError::PasswdSpawn)?;
    if !out.status.success() {
        return Err(MosquittoError::Passwd(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mosquitto_is_signalled_under_the_pid_lock() {
        let logins = AgentLogins::new(
            PathBuf::new(),
            PathBuf::new(),
            PathBuf::new(),
            PathBuf::new(),
            false,
            4242,
        );
        let ran = logins.with_pid(|pid| {
            assert_eq!(pid, 4242);
            // Were the lock free here, the watcher could reap mosquitto and its pid be reused
            // before the signal is sent.
            assert!(logins.pid.try_lock().is_err(), "the pid lock is held");
        });
        assert!(ran);
        *logins.lock_pid() = None;
        assert!(!logins.with_pid(|_| unreachable!("no mosquitto runs")));
    }

    #[test]
    fn passwords_come_from_the_os_csprng() {
        let a = random_password().unwrap();
        let b = random_password().unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()), "{a}");
        assert_ne!(a, b);
        // No non-cryptographic generator is at hand to make a secret with.
        let manifest = include_str!("../../Cargo.toml");
        assert!(!manifest.contains("fastrand"), "{manifest}");
    }
}
