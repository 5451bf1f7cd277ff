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
//!   the supervisor's own CA: [`tls`]). Each agent logs in as its own SUT with its own
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
//! **Watching.** A thread (`process::watch`) waits for mosquitto to exit. When it dies without being
//! asked to, the death is logged (error, with the exit status), the process is reaped, and
//! mosquitto is started again at once (then after 1 s, doubling up to 30 s, while it keeps
//! failing); each change is published on [`ManagedBroker::status`], which the supervisor shows in
//! its status, `/metrics` (`labvisor_broker_up`, `labvisor_broker_restarts_total`) and
//! `/healthz` (503 while it is down). The agents and the supervisor reconnect by themselves.
//!
//! # Layout
//!
//! - this module: [`ManagedBroker`] (start, stop) and the errors;
//! - `state`: the state directory: the files written at every start (mosquitto's password
//!   file, the ACL, `mosquitto.conf`, the local tools' password), who owns them, and
//!   [`local_login`] for the CLI;
//! - `logins`: [`AgentLogins`], the per-SUT agent logins made while the broker runs;
//! - `process`: running mosquitto, the watcher thread that restarts it, and stopping a
//!   leftover one;
//! - [`tls`]: the agent listener's CA and server certificate (`--agent-tls`).

mod logins;
mod process;
mod state;
pub mod tls;

use std::net::{IpAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use labvisor_protocol::payloads::ManagedBrokerStatus;
pub use logins::AgentLogins;
pub use state::{default_state_dir, local_login, managed_acl, mosquitto_conf};

use process::{Launch, StopFlag};

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
    /// mosquitto failed. (Not a `#[source]`: the message already says it, and `{:#}` would
    /// say it twice.)
    #[error("mosquitto did not start: {0}")]
    Start(MosquittoError),
    /// A SUT's login could not be made.
    #[error("cannot make the broker login of {sut}: {reason}")]
    Login {
        /// The SUT.
        sut: String,
        /// Why.
        reason: String,
    },
}

/// What went wrong running `mosquitto` or `mosquitto_passwd`.
#[derive(Debug, thiserror::Error)]
pub enum MosquittoError {
    /// Its log file cannot be opened.
    #[error("{path}: {source}")]
    Log {
        /// The log file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It cannot be run.
    #[error("{0}")]
    Spawn(#[source] std::io::Error),
    /// It exited while starting; `log` is what it wrote then.
    #[error("exited with {status}: {log}")]
    Exited {
        /// How it exited.
        status: ExitStatus,
        /// Its stderr since it was started.
        log: String,
    },
    /// It did not listen in time.
    #[error("not listening on 127.0.0.1:{port} and {gateway}:{port} within 10 s")]
    NotListening {
        /// The port.
        port: u16,
        /// The agents' address.
        gateway: IpAddr,
    },
    /// `mosquitto_passwd` cannot be run.
    #[error("mosquitto_passwd: {0}")]
    PasswdSpawn(#[source] std::io::Error),
    /// `mosquitto_passwd` failed; what it said.
    #[error("mosquitto_passwd: {0}")]
    Passwd(String),
    /// The watcher thread cannot be started.
    #[error("cannot start its watcher: {0}")]
    Watcher(#[source] std::io::Error),
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
        agent_tls: Option<&tls::AgentTls>,
    ) -> Result<Self, BrokerError> {
        let (bin, passwd_bin) = process::binaries().ok_or(BrokerError::NotInstalled)?;
        // A supervisor killed with SIGKILL leaves its mosquitto behind: stop that one first.
        process::stop_leftover(state_dir);
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            return Err(BrokerError::PortTaken { port });
        }
        let prepared = state::prepare(state_dir, &passwd_bin, (port, gateway), topics, agent_tls)?;
        let launch = Launch {
            bin,
            conf: prepared.conf,
            dir: state_dir.to_path_buf(),
            port,
            gateway,
        };
        let child = launch.run(&|| false).map_err(BrokerError::Start)?;
        let logins = Arc::new(AgentLogins::new(
            prepared.agents,
            prepared.passwd,
            passwd_bin,
            state_dir.to_path_buf(),
            prepared.legacy,
            child.id(),
        ));
        let stop = Arc::new(StopFlag::default());
        let (status_tx, status) = tokio::sync::watch::channel(ManagedBrokerStatus {
            up: true,
            restarts: 0,
            last_exit: None,
        });
        let watcher =
            process::spawn_watcher(child, launch, logins.clone(), stop.clone(), status_tx)
                .map_err(BrokerError::Start)?;
        Ok(ManagedBroker {
            supervisor_login: (SUPERVISOR_USER.to_owned(), prepared.supervisor_password),
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
        self.logins
            .with_pid(|pid| process::signal(pid, nix::sys::signal::Signal::SIGTERM));
        process::wait_until(Instant::now() + STOP_GRACE, || watcher.is_finished());
        if !watcher.is_finished() {
            self.logins.with_pid(|pid| {
                tracing::error!(grace = ?STOP_GRACE, "The managed broker did not exit after SIGTERM; killing it (what changed since its last autosave is lost).");
                process::signal(pid, nix::sys::signal::Signal::SIGKILL);
            });
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
