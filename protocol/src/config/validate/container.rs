//! The container basics: `image`, `command`, `env`, `tail`, `network` and `labels`.

use std::collections::BTreeMap;

use super::super::{Allow, Network, LABVISOR_NETWORK, RESERVED_ENV_PREFIX, RESERVED_LABEL_PREFIX};
use super::checker::{k, Checker, Power};

/// `image`: required, not empty, no whitespace. Returned as given (empty when missing).
pub(super) fn image(c: &mut Checker<'_>, raw: Option<String>) -> String {
    match raw {
        None => {
            c.add(&k("image"), "missing: every SUT needs the Docker image of its agent, e.g. image = \"labvisor/agent:latest\"");
            String::new()
        }
        Some(i) if i.trim().is_empty() => {
            c.add(&k("image"), "must not be empty");
            i
        }
        Some(i) if i.chars().any(|ch| ch.is_whitespace() || ch.is_control()) => {
            c.add(&k("image"), format!("{i:?} must not contain whitespace"));
            i
        }
        Some(i) => i,
    }
}

/// `command`: when given, a non-empty argv with a program, no NUL anywhere.
pub(super) fn command(c: &mut Checker<'_>, raw: Option<&[String]>) {
    let Some(cmd) = raw else { return };
    match cmd.first() {
        None => c.add(
            &k("command"),
            "must not be empty; leave it out for a job-only agent",
        ),
        Some(p) if p.is_empty() => c.add(&k("command").index(0), "the program must not be empty"),
        Some(_) => {}
    }
    for (i, a) in cmd.iter().enumerate() {
        if a.contains('\0') {
            c.add(&k("command").index(i), "must not contain a NUL character");
        }
    }
}

/// `env`: valid names, none of labvisor's own, no NUL in values.
pub(super) fn env(c: &mut Checker<'_>, raw: &BTreeMap<String, String>) {
    for (key, value) in raw {
        let path = k("env").key(key);
        if !is_env_name(key) {
            c.add(
                &path,
                format!(
                    "{key:?} is not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)"
                ),
            );
        } else if key.starts_with(RESERVED_ENV_PREFIX) {
            c.add(
                &path,
                format!(
                    "reserved: variables starting with {RESERVED_ENV_PREFIX} are set by labvisor"
                ),
            );
        }
        if value.contains('\0') {
            c.add(&path, "the value must not contain a NUL character");
        }
    }
}

/// `tail`: absolute globs inside the container.
pub(super) fn tail(c: &mut Checker<'_>, raw: &[String]) {
    for (i, glob) in raw.iter().enumerate() {
        if !glob.starts_with('/') {
            c.add(&k("tail").index(i), format!("{glob:?} must be an absolute path (glob) inside the container, e.g. \"/tmp/testflinger/run/*/*.log\""));
        } else if glob.contains('\0') {
            c.add(&k("tail").index(i), "must not contain a NUL character");
        }
    }
}

/// `network`: labvisor's own, or `host` / another network when allowed; never `none` or
/// another container's.
pub(super) fn network(c: &mut Checker<'_>, raw: Option<&str>, allow: &Allow) -> Network {
    match raw {
        None | Some(LABVISOR_NETWORK) => Network::Labvisor,
        Some("host") => {
            c.refuse_unless(
                allow.host_network,
                k("network"),
                Power {
                    what: "host networking",
                    why: "gives the container the host's network stack",
                    flag: "allow-host-network",
                },
            );
            Network::Host
        }
        Some("none") => {
            c.add(&k("network"), "refused: \"none\" leaves the agent without a network, and it needs the MQTT broker");
            Network::Labvisor
        }
        Some(n) if n.starts_with("container:") => {
            c.add(&k("network"), format!("refused: {n:?} joins another container's network stack, which labvisor does not manage; use \"labvisor\" or a named network"));
            Network::Labvisor
        }
        Some(n) if is_network_name(n) => {
            c.refuse_unless(
                allow.network,
                k("network"),
                Power {
                    what: &format!("the Docker network {n:?}"),
                    why: "is not labvisor's own (\"labvisor\"): the agent would reach whatever else is on it",
                    flag: "allow-network",
                },
            );
            Network::Named(n.to_owned())
        }
        Some(n) => {
            c.add(
                &k("network"),
                format!("{n:?} is not a Docker network name ([A-Za-z0-9][A-Za-z0-9_.-]*)"),
            );
            Network::Labvisor
        }
    }
}

/// `labels`: non-empty keys, none of labvisor's own.
pub(super) fn labels(c: &mut Checker<'_>, raw: &BTreeMap<String, String>) {
    for key in raw.keys() {
        let path = k("labels").key(key);
        if key.is_empty() {
            c.add(&path, "a label key must not be empty");
        } else if key.starts_with(RESERVED_LABEL_PREFIX) {
            c.add(
                &path,
                format!(
                    "reserved: labels starting with {RESERVED_LABEL_PREFIX} are set by labvisor"
                ),
            );
        }
    }
}

fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_network_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}
