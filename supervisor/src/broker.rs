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
//! - `127.0.0.1:<port>`, password-protected: the supervisor itself ([`SUPERVISOR_USER`], a
//!   password made at every start, kept in memory), and local tools run by the supervisor's
//!   user ([`LOCAL_USER`], password in [`LOCAL_PASSWORD_FILE`], 0600): `labvisor status`,
//!   `mosquitto_sub`, `mosquitto_pub` or MQTT Explorer on this machine. The CLI finds that login
//!   itself ([`local_login`]). No anonymous client gets in;
//! - `<bridge gateway>:<port>`, password-protected: the agents, which reach the host through the
//!   gateway of the labvisor bridge network (plain MQTT, or with `--agent-tls` only TLS, with
//!   the supervisor's own CA: [`crate::broker_tls`]). Each agent logs in as its own SUT with its own
//!   random password ([`AgentLogins`]), given in its environment, and the ACL
//!   (`managed_acl`) confines it to its own topics `[<prefix>/]<sut>/#` and writes to its reply
//!   space `labvisor/replies/<sut>/#`: a job running on one SUT cannot submit jobs to another. Any other container reaching that address cannot connect at all.
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
//!
//! **Persistence.** mosquitto keeps retained messages, persistent sessions and the QoS 1
//! messages queued for them in `mosquitto.db` in the state directory. It writes it every
//! [`AUTOSAVE_INTERVAL`] and when it stops on SIGTERM: [`ManagedBroker::stop`] (the supervisor's
//! shutdown, after its last publication) sends SIGTERM and waits up to [`STOP_GRACE`] before
//! SIGKILL. mosquitto runs in its own process group, so a Ctrl-C in the supervisor's terminal
//! does not reach it directly.
//!
//! **Watching.** A thread (`watch`) waits for mosquitto to exit. When it dies without being
//! asked to, the death is logged (error, with the exit status), the process is reaped, and
//! mosquitto is started again at once (then after 1 s, doubling up to 30 s, while it keeps
//! failing); each change is published on [`ManagedBroker::status`], which the supervisor shows in
//! its status, `/metrics` (`labvisor_broker_up`, `labvisor_broker_restarts_total`) and
//! `/healthz` (503 while it is down). The agents and the supervisor reconnect by themselves.

use std::io::Write;
use std::net::{IpAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use labvisor_protocol::payloads::ManagedBrokerStatus;
use labvisor_protocol::MAX_PACKET_SIZE;

/// The shared agent login of earlier labvisor versions, kept only where its password file
/// (`agent-password`) is already in the state directory.
pub const LEGACY_AGENT_USER: &str = "labvisor-agent";

/// The login of local tools (`labvisor status`, `logs`, `jobs`, `submit`, `cancel`,
/// `mosquitto_sub`) on the loopback listener; its password is in [`LOCAL_PASSWORD_FILE`].
pub const LOCAL_USER: &str = "labvisor.local";

/// The file (0600, the supervisor's user's) in the state directory with [`LOCAL_USER`]'s
/// password.
pub const LOCAL_PASSWORD_FILE: &str = "local-password";

/// The supervisor's own login; its password is made at every start and kept in memory only.
pub const SUPERVISOR_USER: &str = "labvisor.supervisor";

/// The directory of per-SUT passwords in the state directory (the `--agent-credentials` layout:
/// one file per SUT, named after it).
pub const AGENTS_DIR: &str = "agents";

/// How often mosquitto writes its in-memory state (retained messages, sessions, queued
/// messages) to `mosquitto.db`: a broker that crashes loses at most what changed in this window.
/// A clean stop (SIGTERM) writes it in full.
pub const AUTOSAVE_INTERVAL: Duration = Duration::from_secs(5);

/// How long a stop waits for mosquitto to write its persistence file and exit after SIGTERM,
/// before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

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

/// A password of 128 bits from the operating system's CSPRNG (getrandom(2)), as 32 hex digits.
fn random_password() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes)
        .map_err(|e| std::io::Error::other(format!("getrandom: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
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

/// A running managed mosquitto, watched: when it dies it is restarted (see the module docs). Stopped
/// (SIGTERM, then SIGKILL after [`STOP_GRACE`]) by [`ManagedBroker::stop`] or on drop.
pub struct ManagedBroker {
    watcher: Option<std::thread::JoinHandle<()>>,
    stop: Arc<StopFlag>,
    /// Whether it runs, and how often it was restarted.
    pub status: tokio::sync::watch::Receiver<ManagedBrokerStatus>,
    /// What the supervisor (and local tools) connect to.
    pub local_url: String,
    /// The supervisor's login (user, password) on [`ManagedBroker::local_url`].
    pub supervisor_login: (String, String),
    /// What the agents connect to.
    pub agent_url: String,
    /// The agents' logins, one per SUT.
    pub logins: Arc<AgentLogins>,
    dir: PathBuf,
    /// The CA certificate (PEM) the agents must trust, when their listener speaks TLS.
    pub agent_ca_pem: Option<String>,
}

impl ManagedBroker {
    /// Starts mosquitto on `port`, listening on loopback and on `gateway`, with its files in
    /// `state_dir`; agent logins confined by [`Topics::agent_acl_pattern`] and their reply space.
    /// With `agent_tls`, the listener on `gateway` speaks only TLS.
    ///
    /// [`Topics::agent_acl_pattern`]: labvisor_protocol::topics::Topics::agent_acl_pattern
    pub fn start(
        state_dir: &Path,
        port: u16,
        gateway: IpAddr,
        topics: &labvisor_protocol::topics::Topics,
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
            if !labvisor_protocol::SutName::new(user).is_ok_and(|n| !n.is_reserved()) {
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
        // The local tools' login: its password is kept (tools configured with it go on working).
        let local = state_dir.join(LOCAL_PASSWORD_FILE);
        let local_password = match std::fs::read_to_string(&local) {
            Ok(p) if p.trim().len() >= 16 => p.trim().to_owned(),
            _ => {
                let p = random_password().map_err(state(&local))?;
                write_private(&local, format!("{p}\n").as_bytes()).map_err(state(&local))?;
                p
            }
        };
        // Only the supervisor's user may read it, whoever made it.
        std::fs::set_permissions(&local, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(state(&local))?;
        logins.push((LOCAL_USER.to_owned(), local_password));
        let supervisor_password = random_password().map_err(state(state_dir))?;
        logins.push((SUPERVISOR_USER.to_owned(), supervisor_password.clone()));
        for (user, password) in &logins {
            add_login(&passwd_bin, &passwd, user, password).map_err(BrokerError::Start)?;
        }
        let acl = state_dir.join("acl");
        let mut acl_text = managed_acl(topics);
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
             autosave_interval {autosave}\n\
             autosave_on_changes false\n\
             log_dest stderr\n\
             log_type error\n\
             log_type warning\n\
             max_packet_size {MAX_PACKET_SIZE}\n\
             set_tcp_nodelay true\n\
             \n\
             listener {port} 127.0.0.1\n\
             allow_anonymous false\n\
             password_file {passwd}\n\
             acl_file {acl}\n\
             \n\
             listener {port} {gateway}\n\
             allow_anonymous false\n\
             password_file {passwd}\n\
             acl_file {acl}\n\
             {tls}",
            dir = state_dir.display(),
            autosave = AUTOSAVE_INTERVAL.as_secs(),
            passwd = passwd.display(),
            acl = acl.display(),
            tls = agent_tls.map(|t| t.listener_lines()).unwrap_or_default(),
        );
        write_private(&conf, text.as_bytes()).map_err(state(&conf))?;
        let log = state_dir.join("mosquitto.log");
        std::fs::File::create(&log).map_err(state(&log))?;
        hand_to_broker_user(state_dir).map_err(state(state_dir))?;
        let launch = Launch {
            bin,
            conf,
            dir: state_dir.to_path_buf(),
            port,
            gateway,
        };
        let child = launch.run(&|| false).map_err(BrokerError::Start)?;
        let logins = std::sync::Arc::new(AgentLogins {
            dir: agents,
            passwd,
            passwd_bin,
            state_dir: state_dir.to_path_buf(),
            legacy,
            pid: std::sync::Mutex::new(Some(child.id())),
        });
        let stop = Arc::new(StopFlag::default());
        let (status_tx, status) = tokio::sync::watch::channel(ManagedBrokerStatus {
            up: true,
            restarts: 0,
            last_exit: None,
        });
        let watcher = {
            let logins = logins.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("managed-broker".into())
                .spawn(move || watch(child, launch, logins, stop, status_tx))
                .map_err(|e| BrokerError::Start(format!("cannot start its watcher: {e}")))?
        };
        Ok(ManagedBroker {
            supervisor_login: (SUPERVISOR_USER.to_owned(), supervisor_password),
            watcher: Some(watcher),
            stop,
            status,
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

impl ManagedBroker {
    /// Stops mosquitto the way it saves everything: SIGTERM, which makes it write its
    /// persistence file (retained messages, sessions, queued QoS 1 messages) and exit; SIGKILL
    /// only if it has not exited within [`STOP_GRACE`]. Stops the watcher first, so it is not
    /// restarted, and blocks until it has been reaped. Does nothing the second time.
    pub fn stop(&mut self) {
        let Some(watcher) = self.watcher.take() else {
            return;
        };
        self.stop.set();
        // Under the lock, the watcher either already knows about the stop or has published
        // the pid of a mosquitto it has not reaped yet.
        if let Some(pid) = *self.logins.pid.lock().unwrap_or_else(|p| p.into_inner()) {
            signal(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = Instant::now() + STOP_GRACE;
        while !watcher.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !watcher.is_finished() {
            if let Some(pid) = *self.logins.pid.lock().unwrap_or_else(|p| p.into_inner()) {
                tracing::error!(grace = ?STOP_GRACE, "The managed broker did not exit after SIGTERM; killing it (what changed since its last autosave is lost).");
                signal(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
        let _ = watcher.join();
        let _ = std::fs::remove_file(self.dir.join("mosquitto.pid"));
    }
}

impl Drop for ManagedBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

/// Set once, when the broker is to stop; wakes the watcher's backoff sleep.
#[derive(Debug, Default)]
struct StopFlag {
    set: std::sync::Mutex<bool>,
    cond: std::sync::Condvar,
}

impl StopFlag {
    fn set(&self) {
        *self.set.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cond.notify_all();
    }

    fn is_set(&self) -> bool {
        *self.set.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sleeps `d` unless the flag is or gets set; whether it is.
    fn wait(&self, d: Duration) -> bool {
        let g = self.set.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = self
            .cond
            .wait_timeout_while(g, d, |set| !*set)
            .unwrap_or_else(|p| p.into_inner());
        *g
    }
}

/// How to run mosquitto, and when it counts as up.
struct Launch {
    bin: PathBuf,
    conf: PathBuf,
    dir: PathBuf,
    port: u16,
    gateway: IpAddr,
}

impl Launch {
    /// Starts mosquitto and waits (at most 10 s, or until `stop()` says so) until it listens on
    /// both addresses. Its stderr goes to `mosquitto.log` (appended), and its pid to
    /// `mosquitto.pid`.
    fn run(&self, stop: &dyn Fn() -> bool) -> Result<Child, String> {
        let log_path = self.dir.join("mosquitto.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("{}: {e}", log_path.display()))?;
        let log_len = log.metadata().map(|m| m.len()).unwrap_or(0);
        let mut child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.conf)
            // Its own process group: a Ctrl-C in the supervisor's terminal reaches the
            // supervisor only, which then stops the broker itself, after its last publications.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| e.to_string())?;
        let _ = std::fs::write(self.dir.join("mosquitto.pid"), child.id().to_string());
        let port = self.port;
        let gateway = self.gateway;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read(&log_path).unwrap_or_default();
                let new = log.get(log_len as usize..).unwrap_or_default();
                return Err(format!(
                    "exited with {status}: {}",
                    String::from_utf8_lossy(new).trim()
                ));
            }
            let up = |ip: IpAddr| std::net::TcpStream::connect((ip, port)).is_ok();
            if up(IpAddr::from([127, 0, 0, 1])) && up(gateway) {
                return Ok(child);
            }
            if stop() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "not listening on 127.0.0.1:{port} and {gateway}:{port} within 10 s"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// First restart at once, then doubling from 1 s up to this.
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The managed broker's watcher (a thread): waits for mosquitto to exit; unless it was told
/// to stop, logs the death (error, with the exit status), reaps it and starts it again (at
/// once, then with backoff while it keeps failing), publishing each change on `status`.
fn watch(
    mut child: Child,
    launch: Launch,
    logins: Arc<AgentLogins>,
    stop: Arc<StopFlag>,
    status: tokio::sync::watch::Sender<ManagedBrokerStatus>,
) {
    use nix::sys::wait::{waitid, Id, WaitPidFlag};
    loop {
        let pid = child.id();
        // Wait without reaping: until the pid is cleared below, it cannot be reused, so a
        // SIGHUP or SIGTERM sent under the lock reaches this mosquitto or a zombie of it.
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
        let id = || Id::Pid(nix::unistd::Pid::from_raw(pid as i32));
        while let Err(nix::errno::Errno::EINTR) = waitid(id(), flags) {}
        let exit = {
            let mut p = logins.pid.lock().unwrap_or_else(|p| p.into_inner());
            *p = None;
            child.wait()
        };
        let exit = match exit {
            Ok(s) => s.to_string(),
            Err(e) => format!("unknown ({e})"),
        };
        if stop.is_set() {
            tracing::info!(status = %exit, "The managed broker stopped.");
            return;
        }
        tracing::error!(pid, status = %exit, "The managed broker died; restarting it (agents and the supervisor reconnect by themselves).");
        status.send_modify(|s| {
            s.up = false;
            s.last_exit = Some(exit.clone());
        });
        let mut failures = 0u32;
        child = loop {
            let delay = if failures == 0 {
                Duration::ZERO
            } else {
                RESTART_BACKOFF_MAX.min(Duration::from_secs(1) * (1u32 << (failures - 1).min(5)))
            };
            if stop.wait(delay) {
                return;
            }
            match launch.run(&|| stop.is_set()) {
                Ok(c) => break c,
                Err(e) => {
                    failures += 1;
                    tracing::error!(error = %e, attempt = failures, "The managed broker could not be restarted; retrying.");
                }
            }
        };
        {
            let mut p = logins.pid.lock().unwrap_or_else(|p| p.into_inner());
            if stop.is_set() {
                // Stopped while it was starting: nobody else knows its pid.
                drop(p);
                signal(child.id(), nix::sys::signal::Signal::SIGTERM);
                let _ = child.wait();
                return;
            }
            *p = Some(child.id());
        }
        status.send_modify(|s| {
            s.up = true;
            s.restarts += 1;
        });
        tracing::warn!(
            pid = child.id(),
            restarts = status.borrow().restarts,
            "The managed broker was restarted and listens again."
        );
    }
}

/// The managed broker's ACL (mosquitto `acl_file`): the supervisor may do everything; local
/// tools read everything and may submit, cancel and publish their end marker; each agent
/// (logged in as its SUT) reads and writes its own topics and writes its reply space, nothing
/// else; a login named `labvisor` (never a SUT: the name is reserved) gets nothing.
fn managed_acl(topics: &labvisor_protocol::topics::Topics) -> String {
    let [local_space, local_replies] = topics.login_spaces(LOCAL_USER);
    let [sup_space, sup_replies] = topics.login_spaces(SUPERVISOR_USER);
    format!(
        "# Written by labvisor supervise (managed broker); rewritten at every start.\n\
         # In each list, deny rules are checked before grants; a user's own block comes before\n\
         # the patterns, which apply to every user.\n\
         \n\
         user {SUPERVISOR_USER}\n\
         topic readwrite #\n\
         topic deny {sup_space}\n\
         topic deny {sup_replies}\n\
         \n\
         # Local tools of the supervisor's user (password in {LOCAL_PASSWORD_FILE}, 0600).\n\
         user {LOCAL_USER}\n\
         topic read #\n\
         topic write {submit}\n\
         topic write {cancel}\n\
         topic write {probe}\n\
         topic deny {local_space}\n\
         topic deny {local_replies}\n\
         \n\
         # Never a SUT (the name is reserved): should such a login exist, it gets nothing.\n\
         user {reserved}\n\
         topic deny #\n\
         \n\
         # Each agent logs in as its SUT: its own topics, and its reply space.\n\
         pattern readwrite {own}\n\
         pattern write {replies}\n",
        submit = topics.submit_filter(),
        cancel = topics.cancel_filter(),
        probe = topics.cli_probe_filter(),
        reserved = labvisor_protocol::name::RESERVED_SUT_NAME,
        own = topics.agent_acl_pattern(),
        replies = topics.agent_reply_acl_pattern(),
    )
}

/// The local login of the managed broker whose state directory is `state_dir`, when `host:port`
/// is its loopback listener and this user can read the password file: `(user, password)`.
pub fn local_login(state_dir: &Path, host: &str, port: u16) -> Option<(String, String)> {
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return None;
    }
    // Only to the broker this state directory belongs to, not to whatever else listens here.
    let conf = std::fs::read_to_string(state_dir.join("mosquitto.conf")).ok()?;
    let ours = format!("listener {port} 127.0.0.1");
    if !conf.lines().any(|l| l.trim() == ours) {
        return None;
    }
    let password = std::fs::read_to_string(state_dir.join(LOCAL_PASSWORD_FILE)).ok()?;
    let password = password.trim();
    (password.len() >= 16).then(|| (LOCAL_USER.to_owned(), password.to_owned()))
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
    let gone = || {
        // Gone, or a zombie waiting for its (dead) parent's reaper: either way it has exited.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
    };
    let deadline = Instant::now() + STOP_GRACE;
    while !gone() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !gone() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        while !gone() && Instant::now() < deadline + Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
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
        // The agents' and the local tools' clear-text passwords and the CA are the
        // supervisor's user's, not the broker's.
        if e.file_name() != AGENTS_DIR
            && e.file_name() != LOCAL_PASSWORD_FILE
            && e.file_name() != crate::broker_tls::CA_DIR
        {
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
    fn passwords_come_from_the_os_csprng() {
        let a = random_password().unwrap();
        let b = random_password().unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()), "{a}");
        assert_ne!(a, b);
        // No non-cryptographic generator is at hand to make a secret with.
        let manifest = include_str!("../Cargo.toml");
        assert!(!manifest.contains("fastrand"), "{manifest}");
    }

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
