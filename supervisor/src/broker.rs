//! The managed broker: what `labvisor supervise` runs when no `--broker` is given.
//!
//! It is a mosquitto child process (Debian's `mosquitto` package), not an in-process broker. The
//! in-process candidate, rumqttd 0.20, serves MQTT 3.1.1 and 5 on separate ports, keeps retained
//! messages and sessions in memory only, and cannot be shut down; labvisor's agents rely on MQTT 5
//! (user properties on output, response topics, persistent sessions for job submission) and on
//! retained state surviving a broker restart. mosquitto does all of that on one port, with on-disk
//! persistence, and is what a production lab runs anyway (see `mosquitto/`).
//!
//! Two listeners, one port:
//!
//! - `127.0.0.1:<port>`, anonymous: the supervisor itself, and `labvisor status`,
//!   `mosquitto_sub`, `mosquitto_pub` or MQTT Explorer on this machine;
//! - `<bridge gateway>:<port>`, password-protected: the agents, which reach the host through the
//!   gateway of the labvisor bridge network (plain MQTT, or with `--agent-tls` only TLS, with
//!   the supervisor's own CA: [`crate::broker_tls`]). Each agent logs in as its own SUT with its own
//!   random password ([`AgentLogins`]), given in its environment, and the ACL pattern
//!   `[<prefix>/]%u/#` confines it to its own topics: a job running on one SUT cannot submit
//!   jobs to another. Any other container reaching that address cannot connect at all.
//!
//! A SUT's login is made when its container is first created (the password file and mosquitto's
//! password file are updated, then mosquitto reloads them on SIGHUP). The passwords
//! (`agents/<sut>`, 0600), the config, and the broker's persistence live in the state directory
//! ([`default_state_dir`]: `/var/lib/labvisor/broker` as root, since mosquitto drops to its own
//! user, which must reach it; else `~/.local/state/labvisor/broker`), so a restarted
//! supervisor reuses them and adopted
//! agents keep connecting. A state directory from an earlier labvisor, whose agents shared one
//! login (`labvisor-agent`, password in `agent-password`), keeps that login working for the
//! containers made then, until they are recreated.

use std::io::Write;
use std::net::{IpAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The shared agent login of earlier labvisor versions, kept only where its password file
/// (`agent-password`) is already in the state directory.
pub const LEGACY_AGENT_USER: &str = "labvisor-agent";

/// The directory of per-SUT passwords in the state directory (the `--agent-credentials` layout:
/// one file per SUT, named after it).
pub const AGENTS_DIR: &str = "agents";

/// Why the managed broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// mosquitto is not installed.
    #[error("no --broker given and mosquitto is not installed: install it (apt-get install mosquitto) or pass --broker mqtt://host:port")]
    NotInstalled,
    /// The port is taken.
    #[error("port {port} on 127.0.0.1 is taken (another broker?): pass --broker mqtt://127.0.0.1:{port} to use the broker listening there, or --broker-port to pick another port")]
    PortTaken {
        /// The port.
        port: u16,
    },
    /// The state directory or a file in it cannot be written.
    #[error("cannot prepare {path}: {source}")]
    State {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// mosquitto failed.
    #[error("mosquitto did not start: {0}")]
    Start(String),
    /// A SUT's login could not be made.
    #[error("cannot make the broker login of {sut}: {reason}")]
    Login {
        /// The SUT.
        sut: String,
        /// Why.
        reason: String,
    },
}

/// The per-SUT agent logins of the managed broker: a password file per SUT in
/// [`AGENTS_DIR`], mirrored into mosquitto's password file.
#[derive(Debug)]
pub struct AgentLogins {
    dir: PathBuf,
    passwd: PathBuf,
    passwd_bin: PathBuf,
    state_dir: PathBuf,
    legacy: bool,
    /// mosquitto's pid, signalled to reload; serialises changes too.
    pid: std::sync::Mutex<Option<u32>>,
}

impl AgentLogins {
    /// The directory of per-SUT passwords (what `--agent-credentials` takes).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes sure `sut` has a login: when it has none yet, makes a random password, adds it to
    /// mosquitto's password file and has mosquitto reload it. Returns whether it was new.
    pub fn ensure(&self, sut: &labvisor_protocol::SutName) -> Result<bool, BrokerError> {
        let pid = self.pid.lock().unwrap_or_else(|p| p.into_inner());
        let file = self.dir.join(sut.as_str());
        if std::fs::read_to_string(&file).is_ok_and(|p| p.trim().len() >= 16) {
            return Ok(false);
        }
        let err = |reason: String| BrokerError::Login {
            sut: sut.to_string(),
            reason,
        };
        if self.legacy && sut.as_str() == LEGACY_AGENT_USER {
            return Err(err(format!(
                "{LEGACY_AGENT_USER} is the shared agent login of this broker's state directory; \
                 rename the SUT file"
            )));
        }
        let password = random_password();
        write_private(&file, password.as_bytes())
            .map_err(|e| err(format!("{}: {e}", file.display())))?;
        add_login(&self.passwd_bin, &self.passwd, sut.as_str(), &password).map_err(err)?;
        hand_to_broker_user(&self.state_dir).map_err(|e| err(e.to_string()))?;
        if let Some(pid) = *pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGHUP,
            );
        }
        Ok(true)
    }
}

fn random_password() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

/// Adds (or replaces) `user` in mosquitto's password file `passwd`.
fn add_login(passwd_bin: &Path, passwd: &Path, user: &str, password: &str) -> Result<(), String> {
    let out = Command::new(passwd_bin)
        .args(["-b"])
        .arg(passwd)
        .args([user, password])
        .output()
        .map_err(|e| format!("mosquitto_passwd: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "mosquitto_passwd: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// A running managed mosquitto; killed on drop.
pub struct ManagedBroker {
    child: Child,
    /// What the supervisor (and local tools) connect to.
    pub local_url: String,
    /// What the agents connect to.
    pub agent_url: String,
    /// The agents' logins, one per SUT.
    pub logins: std::sync::Arc<AgentLogins>,
    dir: PathBuf,
    /// The CA certificate (PEM) the agents must trust, when their listener speaks TLS.
    pub agent_ca_pem: Option<String>,
}

impl ManagedBroker {
    /// Starts mosquitto on `port`, listening on loopback and on `gateway`, with its files in
    /// `state_dir`; agent logins confined by `acl_pattern` ([`Topics::agent_acl_pattern`]).
    /// With `agent_tls`, the listener on `gateway` speaks only TLS.
    ///
    /// [`Topics::agent_acl_pattern`]: labvisor_protocol::topics::Topics::agent_acl_pattern
    pub fn start(
        state_dir: &Path,
        port: u16,
        gateway: IpAddr,
        acl_pattern: &str,
        agent_tls: Option<&crate::broker_tls::AgentTls>,
    ) -> Result<Self, BrokerError> {
        let bin = [
            "/usr/sbin/mosquitto",
            "/usr/local/sbin/mosquitto",
            "/usr/bin/mosquitto",
        ]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or(BrokerError::NotInstalled)?;
        let passwd_bin = [
            "/usr/bin/mosquitto_passwd",
            "/usr/local/bin/mosquitto_passwd",
        ]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or(BrokerError::NotInstalled)?;
        // A supervisor killed with SIGKILL leaves its mosquitto behind: stop that one first.
        stop_leftover(state_dir);
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            return Err(BrokerError::PortTaken { port });
        }
        let state = |path: &Path| {
            let path = path.to_path_buf();
            move |source| BrokerError::State { path, source }
        };
        std::fs::create_dir_all(state_dir).map_err(state(state_dir))?;
        let agents = state_dir.join(AGENTS_DIR);
        std::fs::create_dir_all(&agents).map_err(state(&agents))?;
        std::fs::set_permissions(&agents, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(state(&agents))?;
        // mosquitto's password file is rebuilt from the per-SUT files at every start.
        let passwd = state_dir.join("passwd");
        write_private(&passwd, b"").map_err(state(&passwd))?;
        let mut logins: Vec<(String, String)> = Vec::new();
        for e in std::fs::read_dir(&agents).map_err(state(&agents))? {
            let path = e.map_err(state(&agents))?.path();
            let user = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if labvisor_protocol::SutName::new(user).is_err() {
                continue;
            }
            match std::fs::read_to_string(&path) {
                Ok(p) if p.trim().len() >= 16 => logins.push((user.to_owned(), p.trim().into())),
                _ => {}
            }
        }
        let secret = state_dir.join("agent-password");
        let legacy = match std::fs::read_to_string(&secret) {
            Ok(p) if p.trim().len() >= 16 => {
                logins.push((LEGACY_AGENT_USER.to_owned(), p.trim().to_owned()));
                true
            }
            _ => false,
        };
        for (user, password) in &logins {
            add_login(&passwd_bin, &passwd, user, password).map_err(BrokerError::Start)?;
        }
        let acl = state_dir.join("acl");
        let mut acl_text = format!(
            "# Written by labvisor supervise (managed broker); rewritten at every start.\n\
             # Each agent logs in as its SUT and may use only its own topics.\n\
             pattern readwrite {acl_pattern}\n"
        );
        if legacy {
            acl_text.push_str(&format!(
                "# The shared login of agents made by an earlier labvisor.\n\
                 user {LEGACY_AGENT_USER}\ntopic readwrite #\n"
            ));
        }
        write_private(&acl, acl_text.as_bytes()).map_err(state(&acl))?;
        let conf = state_dir.join("mosquitto.conf");
        let text = format!(
            "# Written by labvisor supervise (managed broker); rewritten at every start.\n\
             per_listener_settings true\n\
             persistence true\n\
             persistence_location {dir}/\n\
             log_dest stderr\n\
             log_type error\n\
             log_type warning\n\
             max_packet_size 1048576\n\
             set_tcp_nodelay true\n\
             \n\
             listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             \n\
             listener {port} {gateway}\n\
             allow_anonymous false\n\
             password_file {passwd}\n\
             acl_file {acl}\n\
             {tls}",
            dir = state_dir.display(),
            passwd = passwd.display(),
            acl = acl.display(),
            tls = agent_tls.map(|t| t.listener_lines()).unwrap_or_default(),
        );
        write_private(&conf, text.as_bytes()).map_err(state(&conf))?;
        let log =
            std::fs::File::create(state_dir.join("mosquitto.log")).map_err(state(state_dir))?;
        hand_to_broker_user(state_dir).map_err(state(state_dir))?;
        let mut child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| BrokerError::Start(e.to_string()))?;
        let pid_file = state_dir.join("mosquitto.pid");
        let _ = std::fs::write(&pid_file, child.id().to_string());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log =
                    std::fs::read_to_string(state_dir.join("mosquitto.log")).unwrap_or_default();
                return Err(BrokerError::Start(format!(
                    "exited with {status}: {}",
                    log.trim()
                )));
            }
            let up = |ip: IpAddr| std::net::TcpStream::connect((ip, port)).is_ok();
            if up(IpAddr::from([127, 0, 0, 1])) && up(gateway) {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(BrokerError::Start(format!(
                    "not listening on 127.0.0.1:{port} and {gateway}:{port} within 10 s"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let logins = std::sync::Arc::new(AgentLogins {
            dir: agents,
            passwd,
            passwd_bin,
            state_dir: state_dir.to_path_buf(),
            legacy,
            pid: std::sync::Mutex::new(Some(child.id())),
        });
        Ok(ManagedBroker {
            child,
            local_url: format!("mqtt://127.0.0.1:{port}"),
            agent_url: format!(
                "{}://{gateway}:{port}",
                if agent_tls.is_some() { "mqtts" } else { "mqtt" }
            ),
            logins,
            dir: state_dir.to_path_buf(),
            agent_ca_pem: agent_tls.map(|t| t.ca_pem.clone()),
        })
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for ManagedBroker {
    fn drop(&mut self) {
        // No SIGHUP to a pid that may be reused.
        *self.logins.pid.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(self.dir.join("mosquitto.pid"));
    }
}

/// Stops a mosquitto left running on this state directory's config by a supervisor that was
/// killed (its pid is in `mosquitto.pid` and its command line names our config).
fn stop_leftover(state_dir: &Path) {
    let Ok(pid) = std::fs::read_to_string(state_dir.join("mosquitto.pid")) else {
        return;
    };
    let Ok(pid) = pid.trim().parse::<i32>() else {
        return;
    };
    let conf = state_dir.join("mosquitto.conf").display().to_string();
    let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(&conf))
        .unwrap_or(false);
    if !ours {
        return;
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

/// The default state directory: as root `/var/lib/labvisor/broker` (a root home is not
/// reachable by the `mosquitto` user the broker drops to); otherwise
/// `$XDG_STATE_HOME/labvisor/broker`, else `~/.local/state/labvisor/broker`, else
/// `/var/lib/labvisor/broker`.
pub fn default_state_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/labvisor/broker");
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("labvisor/broker");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h).join(".local/state/labvisor/broker");
    }
    PathBuf::from("/var/lib/labvisor/broker")
}

fn is_root() -> bool {
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// Whether a process of `uid`/`gid` can reach `dir`: every directory above it must let it
/// through (search permission for its owner, group or others, whichever applies). The error is
/// the first one that does not.
fn reachable_by(dir: &Path, uid: u32, gid: u32) -> Result<(), PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    for a in dir.ancestors().skip(1) {
        let Ok(m) = std::fs::metadata(a) else {
            return Err(a.to_owned());
        };
        let bit = if m.uid() == uid {
            0o100
        } else if m.gid() == gid {
            0o010
        } else {
            0o001
        };
        if m.mode() & bit == 0 {
            return Err(a.to_owned());
        }
    }
    Ok(())
}

/// Started as root, mosquitto drops to its own user (`mosquitto`) before reading the password
/// file and writing its persistence: the state directory and its files must then be that user's.
/// (The broker is not kept running as root.)
fn hand_to_broker_user(dir: &Path) -> std::io::Result<()> {
    if !is_root() {
        return Ok(());
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let Some((uid, gid)) = passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&"mosquitto") && f.len() > 3)
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .flatten()
    }) else {
        return Ok(()); // no such user: mosquitto stays root and can read everything
    };
    if let Err(blocking) = reachable_by(dir, uid, gid) {
        return Err(std::io::Error::other(format!(
            "the broker runs as the mosquitto user, which cannot reach {}: {} does not let it \
             through; pass a --state-dir it can reach, e.g. under /var/lib",
            dir.display(),
            blocking.display()
        )));
    }
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        // The agents' clear-text passwords and the CA are the supervisor's, not the broker's.
        if e.file_name() != AGENTS_DIR && e.file_name() != crate::broker_tls::CA_DIR {
            std::os::unix::fs::chown(e.path(), Some(uid), Some(gid))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_closed_directory_above_the_state_dir_is_named() {
        let top = tempfile::tempdir().unwrap();
        let state = top.path().join("home/labvisor/broker");
        std::fs::create_dir_all(&state).unwrap();
        let home = top.path().join("home");
        // A user that owns nothing here, so "others" bits apply.
        let (uid, gid) = (4_000_000, 4_000_000);
        std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(reachable_by(&state, uid, gid), Ok(()));
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(
            reachable_by(&state, uid, gid),
            Err(std::fs::canonicalize(&home).unwrap())
        );
        // Its owner may pass.
        let m = std::fs::metadata(&home).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(reachable_by(&state, m.uid(), 4_000_000), Ok(()));
    }
}
