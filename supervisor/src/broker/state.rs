//! The managed broker's state directory: what is written there at every start (mosquitto's
//! password file rebuilt from the stored logins, the local tools' password, the ACL,
//! `mosquitto.conf`), who owns it (mosquitto's user, when started as root), where it is by
//! default, and [`local_login`], how the CLI finds the local tools' login in it.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use labvisor_protocol::topics::Topics;
use labvisor_protocol::MAX_PACKET_SIZE;

use super::logins::{add_login, random_password};
use super::tls::AgentTls;
use super::{
    BrokerError, AGENTS_DIR, AUTOSAVE_INTERVAL, LEGACY_AGENT_USER, LOCAL_PASSWORD_FILE, LOCAL_USER,
    SUPERVISOR_USER,
};

/// What [`prepare`] wrote, for the start that follows.
pub(super) struct Prepared {
    /// The directory of per-SUT passwords.
    pub agents: PathBuf,
    /// mosquitto's password file.
    pub passwd: PathBuf,
    /// mosquitto's config.
    pub conf: PathBuf,
    /// Whether the shared login of earlier versions is kept.
    pub legacy: bool,
    /// The supervisor's login's password, new at every start.
    pub supervisor_password: String,
}

/// A [`BrokerError::State`] about `path`.
fn state(path: &Path) -> impl FnOnce(std::io::Error) -> BrokerError {
    let path = path.to_path_buf();
    move |source| BrokerError::State { path, source }
}

/// Writes everything mosquitto needs into `state_dir` for a broker on `port` of loopback and
/// `gateway` (`listen`), with `passwd_bin` for its password file, and hands the directory to
/// mosquitto's user.
pub(super) fn prepare(
    state_dir: &Path,
    passwd_bin: &Path,
    listen: (u16, IpAddr),
    topics: &Topics,
    agent_tls: Option<&AgentTls>,
) -> Result<Prepared, BrokerError> {
    std::fs::create_dir_all(state_dir).map_err(state(state_dir))?;
    let agents = state_dir.join(AGENTS_DIR);
    std::fs::create_dir_all(&agents).map_err(state(&agents))?;
    set_mode(&agents, 0o700).map_err(state(&agents))?;
    // mosquitto's password file is rebuilt from the per-SUT files at every start.
    let passwd = state_dir.join("passwd");
    write_private(&passwd, b"", 0o600).map_err(state(&passwd))?;
    let (mut logins, legacy) = stored_logins(state_dir, &agents)?;
    logins.push((LOCAL_USER.to_owned(), local_password(state_dir)?));
    let supervisor_password = random_password().map_err(state(state_dir))?;
    logins.push((SUPERVISOR_USER.to_owned(), supervisor_password.clone()));
    for (user, password) in &logins {
        add_login(passwd_bin, &passwd, user, password).map_err(BrokerError::Start)?;
    }
    let acl = state_dir.join("acl");
    write_private(&acl, acl_text(topics, legacy).as_bytes(), 0o600).map_err(state(&acl))?;
    let conf = state_dir.join("mosquitto.conf");
    let text = mosquitto_conf(state_dir, listen, (&passwd, &acl), agent_tls);
    write_private(&conf, text.as_bytes(), 0o600).map_err(state(&conf))?;
    let log = state_dir.join("mosquitto.log");
    std::fs::File::create(&log).map_err(state(&log))?;
    hand_to_broker_user(state_dir).map_err(state(state_dir))?;
    Ok(Prepared {
        agents,
        passwd,
        conf,
        legacy,
        supervisor_password,
    })
}

/// The agents' logins kept in `agents` (one file per SUT), and the shared login of earlier
/// versions when its password file is there (then `true`).
fn stored_logins(
    state_dir: &Path,
    agents: &Path,
) -> Result<(Vec<(String, String)>, bool), BrokerError> {
    let mut logins: Vec<(String, String)> = Vec::new();
    for e in std::fs::read_dir(agents).map_err(state(agents))? {
        let path = e.map_err(state(agents))?.path();
        let user = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !labvisor_protocol::SutName::new(user).is_ok_and(|n| !n.is_reserved()) {
            continue;
        }
        if let Some(p) = read_password(&path) {
            logins.push((user.to_owned(), p));
        }
    }
    let legacy = match read_password(&state_dir.join("agent-password")) {
        Some(p) => {
            logins.push((LEGACY_AGENT_USER.to_owned(), p));
            true
        }
        None => false,
    };
    Ok((logins, legacy))
}

/// The password in `path`, trimmed, when it is one (16 characters at least).
fn read_password(path: &Path) -> Option<String> {
    let p = std::fs::read_to_string(path).ok()?;
    let p = p.trim();
    (p.len() >= 16).then(|| p.to_owned())
}

/// The local tools' password: kept (tools configured with it go on working), or made.
fn local_password(state_dir: &Path) -> Result<String, BrokerError> {
    let local = state_dir.join(LOCAL_PASSWORD_FILE);
    let password = match read_password(&local) {
        Some(p) => p,
        None => {
            let p = random_password().map_err(state(&local))?;
            write_private(&local, format!("{p}\n").as_bytes(), 0o600).map_err(state(&local))?;
            p
        }
    };
    // Only the supervisor's user may read it, whoever made it.
    set_mode(&local, 0o600).map_err(state(&local))?;
    Ok(password)
}

/// The ACL file: [`managed_acl`], plus the shared login of earlier versions when `legacy`.
fn acl_text(topics: &Topics, legacy: bool) -> String {
    let mut acl = managed_acl(topics);
    if legacy {
        acl.push_str(&format!(
            "# The shared login of agents made by an earlier labvisor.\n\
             user {LEGACY_AGENT_USER}\ntopic readwrite #\n"
        ));
    }
    acl
}

/// QoS 1 messages the managed broker queues per client beyond those in flight (mosquitto's
/// default is 1000): a client subscribing to `+/agent` is sent every SUT's retained status at
/// once, and a submitter's backlog waits here while an agent is busy. As the shipped
/// `mosquitto.conf`.
const MAX_QUEUED: u32 = 10_000;

/// `mosquitto.conf`: persistence in `state_dir`, the loopback listener and the agents' one on
/// `gateway` (TLS with `agent_tls`), both with the password file and ACL (`files`). Public for
/// the broker-load benchmark (`examples/broker_load`), which runs a mosquitto configured alike.
pub fn mosquitto_conf(
    state_dir: &Path,
    (port, gateway): (u16, IpAddr),
    (passwd, acl): (&Path, &Path),
    agent_tls: Option<&AgentTls>,
) -> String {
    format!(
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
         max_queued_messages {MAX_QUEUED}\n\
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
    )
}

/// The managed broker's ACL (mosquitto `acl_file`): the supervisor may do everything; local
/// tools read everything and may submit, cancel, send admin commands (offline, online,
/// maintenance), ask for a rolling restart and publish their end marker; each agent
/// (logged in as its SUT) reads and writes its own topics and writes its reply space, nothing
/// else; a login named `labvisor` (never a SUT: the name is reserved) gets nothing.
pub fn managed_acl(topics: &Topics) -> String {
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
         topic write {admin}\n\
         topic write {probe}\n\
         topic write {restart}\n\
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
        admin = topics.admin_filter(),
        probe = topics.cli_probe_filter(),
        restart = topics.supervisor_restart_filter(),
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
    let password = read_password(&state_dir.join(LOCAL_PASSWORD_FILE))?;
    Some((LOCAL_USER.to_owned(), password))
}

/// Sets the permission bits of `path`.
pub(super) fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
}

/// Writes `bytes` to `path` through a temporary file created with `mode` and renamed over it:
/// a reader never sees half a file, and a secret never has wider permissions, not even for a
/// moment. The error names the temporary file when that is what failed.
pub(super) fn write_private(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
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
pub(super) fn hand_to_broker_user(dir: &Path) -> std::io::Result<()> {
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
            && e.file_name() != super::tls::CA_DIR
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

    #[test]
    fn private_files_are_replaced_whole_with_their_mode() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("secret");
        std::fs::write(&f, "old, world-readable").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&f, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"new");
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!dir.path().join("secret.tmp").exists());
    }
}
