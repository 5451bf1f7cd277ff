//! The `[placement]` section of a validated SUT config: where the SUT's agent runs in a swarm
//! (a node's host name, Swarm placement constraints). The local runtime ignores it.

use std::fmt;

use serde::{Serialize, Serializer};

/// The `[placement]` section: on which swarm node the SUT's service runs. Holds only checked
/// values: a valid host name and constraints over the keys Swarm knows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Placement {
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    constraints: Vec<Constraint>,
}

impl Placement {
    /// A placement on node `host` (if given) and under `constraints`.
    pub fn new(host: Option<NodeHost>, constraints: Vec<Constraint>) -> Self {
        Self {
            host: host.map(|h| h.0),
            constraints,
        }
    }

    /// Neither a host nor constraints: the section is absent (and left out of the hash).
    pub fn is_empty(&self) -> bool {
        self.host.is_none() && self.constraints.is_empty()
    }

    /// The node's host name (`host`), if given.
    pub fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }

    /// The constraints (`constraints`), in the file's order.
    pub fn constraints(&self) -> &[Constraint] {
        &self.constraints
    }

    /// Swarm's `Placement.Constraints`: `node.hostname==<host>` first when `host` is given,
    /// then each constraint in its normalised form (`node.labels.rack==3`).
    pub fn swarm_constraints(&self) -> Vec<String> {
        self.host
            .iter()
            .map(|h| format!("node.hostname=={h}"))
            .chain(self.constraints.iter().map(Constraint::to_string))
            .collect()
    }
}

/// A node's host name: RFC 1123 labels (letters, digits, hyphens), dot-separated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeHost(String);

impl NodeHost {
    /// Checks `name` as an RFC 1123 host name; the error says what is wrong.
    pub fn new(name: &str) -> Result<Self, String> {
        super::validate::check_host_name(name)
            .map(|()| Self(name.to_owned()))
            .map_err(|why| format!("{name:?} is not a host name: {why}"))
    }

    /// The host name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A Swarm constraint key: the node attributes Swarm matches on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConstraintKey {
    /// `node.id`.
    NodeId,
    /// `node.hostname`.
    NodeHostname,
    /// `node.role` (`manager` or `worker`).
    NodeRole,
    /// `node.platform.os`.
    NodePlatformOs,
    /// `node.platform.arch`.
    NodePlatformArch,
    /// `node.labels.<name>`: a node label set by `docker node update --label-add`.
    NodeLabel(String),
    /// `engine.labels.<name>`: a label of the node's engine (`daemon.json`).
    EngineLabel(String),
}

impl fmt::Display for ConstraintKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConstraintKey::NodeId => f.write_str("node.id"),
            ConstraintKey::NodeHostname => f.write_str("node.hostname"),
            ConstraintKey::NodeRole => f.write_str("node.role"),
            ConstraintKey::NodePlatformOs => f.write_str("node.platform.os"),
            ConstraintKey::NodePlatformArch => f.write_str("node.platform.arch"),
            ConstraintKey::NodeLabel(n) => write!(f, "node.labels.{n}"),
            ConstraintKey::EngineLabel(n) => write!(f, "engine.labels.{n}"),
        }
    }
}

/// The keys a constraint may use, as the error names them.
const KEYS: &str = "node.id, node.hostname, node.role, node.platform.os, node.platform.arch, \
                    node.labels.<name> or engine.labels.<name>";

/// A checked Swarm placement constraint: `<key> == <value>` or `<key> != <value>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constraint {
    key: ConstraintKey,
    equal: bool,
    value: String,
}

impl Constraint {
    /// Parses `expr` as Swarm does (`==` looked for first, then `!=`; blanks around the key and
    /// the value ignored) and checks the key is one Swarm knows and the value one it accepts.
    pub fn parse(expr: &str) -> Result<Self, String> {
        let (key, equal, value) = if let Some((k, v)) = expr.split_once("==") {
            (k, true, v)
        } else if let Some((k, v)) = expr.split_once("!=") {
            (k, false, v)
        } else {
            return Err(format!(
                "{expr:?} is not `<key> == <value>` or `<key> != <value>`, e.g. \"node.labels.rack == 3\""
            ));
        };
        let (key, value) = (key.trim(), value.trim());
        let key = parse_key(key).map_err(|why| format!("{expr:?}: {why}"))?;
        if value.is_empty() {
            return Err(format!("{expr:?}: the value is empty"));
        }
        if let Some(bad) = value.chars().find(|c| !value_char(*c)) {
            return Err(format!(
                "{expr:?}: the value {value:?} has {bad:?}, which Swarm does not accept in a constraint value (letters, digits, spaces and : - _ . * ( ) ? + [ ] \\ ^ $ | /)"
            ));
        }
        if key == ConstraintKey::NodeRole && value != "manager" && value != "worker" {
            return Err(format!(
                "{expr:?}: node.role is \"manager\" or \"worker\", not {value:?}"
            ));
        }
        Ok(Self {
            key,
            equal,
            value: value.to_owned(),
        })
    }

    /// The key.
    pub fn key(&self) -> &ConstraintKey {
        &self.key
    }

    /// `true` for `==`, `false` for `!=`.
    pub fn is_equal(&self) -> bool {
        self.equal
    }

    /// The value, trimmed.
    pub fn value(&self) -> &str {
        &self.value
    }
}

/// Swarm's constraint key rules, restricted to the keys it matches on.
fn parse_key(key: &str) -> Result<ConstraintKey, String> {
    let label = |prefix: &str, make: fn(String) -> ConstraintKey| {
        key.strip_prefix(prefix).map(|name| {
            if name.is_empty() {
                Err(format!("{key:?} names no label: {prefix}<name>"))
            } else if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                Err(format!(
                    "the label name {name:?} may hold only letters, digits, -, _ and ."
                ))
            } else {
                Ok(make(name.to_owned()))
            }
        })
    };
    if let Some(k) = label("node.labels.", ConstraintKey::NodeLabel) {
        return k;
    }
    if let Some(k) = label("engine.labels.", ConstraintKey::EngineLabel) {
        return k;
    }
    match key {
        "node.id" => Ok(ConstraintKey::NodeId),
        "node.hostname" => Ok(ConstraintKey::NodeHostname),
        "node.role" => Ok(ConstraintKey::NodeRole),
        "node.platform.os" => Ok(ConstraintKey::NodePlatformOs),
        "node.platform.arch" => Ok(ConstraintKey::NodePlatformArch),
        "" => Err(format!("the key is empty; use {KEYS}")),
        other => Err(format!(
            "{other:?} is not a Swarm constraint key; use {KEYS}"
        )),
    }
}

/// A character Swarm accepts in a constraint value (its `valuePattern`).
fn value_char(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || c == ' '
        || matches!(
            c,
            ':' | '-'
                | '_'
                | '.'
                | '*'
                | '('
                | ')'
                | '?'
                | '+'
                | '['
                | ']'
                | '\\'
                | '^'
                | '$'
                | '|'
                | '/'
        )
}

impl fmt::Display for Constraint {
    /// The normalised form Swarm takes: `node.labels.rack==3`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = if self.equal { "==" } else { "!=" };
        write!(f, "{}{op}{}", self.key, self.value)
    }
}

impl Serialize for Constraint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(expr: &str) -> String {
        Constraint::parse(expr).unwrap().to_string()
    }

    fn err(expr: &str) -> String {
        Constraint::parse(expr).unwrap_err()
    }

    #[test]
    fn constraints_normalise() {
        assert_eq!(ok("node.labels.rack == 3"), "node.labels.rack==3");
        assert_eq!(ok("node.role != manager"), "node.role!=manager");
        assert_eq!(
            ok(" node.hostname==rack3-agent-host "),
            "node.hostname==rack3-agent-host"
        );
        assert_eq!(ok("engine.labels.usb==yes"), "engine.labels.usb==yes");
        assert_eq!(
            ok("node.platform.arch==x86_64"),
            "node.platform.arch==x86_64"
        );
        assert_eq!(ok("node.platform.os==linux"), "node.platform.os==linux");
        assert_eq!(ok("node.id==abc123"), "node.id==abc123");
        assert_eq!(ok("node.labels.site == lab 2"), "node.labels.site==lab 2");
    }

    #[test]
    fn bad_constraints_say_why() {
        assert!(err("node.labels.rack = 3").contains("is not `<key> == <value>`"));
        assert!(err("node.lables.rack == 3")
            .contains("\"node.lables.rack\" is not a Swarm constraint key"));
        assert!(err("node.ip == 10.0.0.1").contains("not a Swarm constraint key"));
        assert!(err("node.labels. == 3").contains("names no label"));
        assert!(err("node.labels.a b == 3").contains("may hold only"));
        assert!(err("node.role == boss").contains("\"manager\" or \"worker\""));
        assert!(err("node.labels.rack == ").contains("the value is empty"));
        assert!(err("node.labels.rack == 3!=4").contains("'!'"));
        assert!(err(" == 3").contains("the key is empty"));
    }

    #[test]
    fn swarm_constraints_put_the_host_first() {
        let p = Placement::new(
            Some(NodeHost::new("rack3-agent-host").unwrap()),
            vec![Constraint::parse("node.labels.rack == 3").unwrap()],
        );
        assert_eq!(
            p.swarm_constraints(),
            ["node.hostname==rack3-agent-host", "node.labels.rack==3"]
        );
        assert!(Placement::default().is_empty());
        assert!(Placement::default().swarm_constraints().is_empty());
        assert!(NodeHost::new("bad_host").is_err());
    }
}
