//! The validated SUT name.
//!
//! A SUT's name is the stem of its file in `sut/`. It becomes a container name, a hostname, a
//! Docker label value and an MQTT topic level, so it is checked once, here, and the rest of
//! labvisor only ever handles a [`SutName`].

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest accepted SUT name (a DNS label, so it also works as a hostname).
pub const MAX_NAME_LEN: usize = 63;

/// The name no SUT may have: `labvisor/...` is labvisor's control plane (the supervisors'
/// status, the agents' reply spaces), and a SUT's login gets `<sut>/#` on the broker.
pub const RESERVED_SUT_NAME: &str = "labvisor";

/// Why a string is not a valid SUT name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("name is empty")]
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`].
    #[error("name is {0} characters long, at most {MAX_NAME_LEN} are allowed")]
    TooLong(usize),
    /// The first character is not a lowercase letter or a digit.
    #[error("name must start with a lowercase letter or a digit, not {0:?}")]
    BadStart(char),
    /// A character outside `[a-z0-9_-]`.
    #[error("name contains {0:?}; only lowercase letters, digits, '-' and '_' are allowed")]
    BadChar(char),
}

/// A SUT name: `[a-z0-9][a-z0-9_-]{0,62}`.
///
/// Safe as a container name, a hostname label, a Docker label value and an MQTT topic level:
/// it cannot hold `/`, `+`, `#`, `$`, dots, spaces or upper case.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SutName(String);

impl SutName {
    /// Checks `s` and wraps it.
    pub fn new(s: &str) -> Result<Self, NameError> {
        let mut chars = s.chars();
        let first = chars.next().ok_or(NameError::Empty)?;
        let len = s.chars().count();
        if len > MAX_NAME_LEN {
            return Err(NameError::TooLong(len));
        }
        if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
            return Err(NameError::BadStart(first));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
        {
            return Err(NameError::BadChar(c));
        }
        Ok(Self(s.to_owned()))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is [`RESERVED_SUT_NAME`], a well-formed name that no SUT may have (a
    /// supervisor id may: `--id labvisor` is the default).
    pub fn is_reserved(&self) -> bool {
        self.0 == RESERVED_SUT_NAME
    }
}

impl fmt::Display for SutName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for SutName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SutName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(&s)
    }
}

impl From<SutName> for String {
    fn from(n: SutName) -> String {
        n.0
    }
}

impl std::str::FromStr for SutName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_lab_names() {
        for ok in ["rpi4-01", "0board", "x", "dell_xps_13", &"a".repeat(63)] {
            assert!(SutName::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_topic_and_container_hazards() {
        assert_eq!(SutName::new(""), Err(NameError::Empty));
        assert_eq!(SutName::new("-a"), Err(NameError::BadStart('-')));
        assert_eq!(SutName::new("_a"), Err(NameError::BadStart('_')));
        assert_eq!(SutName::new("Rpi"), Err(NameError::BadStart('R')));
        assert_eq!(SutName::new(&"a".repeat(64)), Err(NameError::TooLong(64)));
        for (bad, c) in [
            ("a/b", '/'),
            ("a+", '+'),
            ("a#", '#'),
            ("a$", '$'),
            ("a.b", '.'),
            ("a b", ' '),
            ("aB", 'B'),
            ("a\u{e9}", '\u{e9}'),
        ] {
            assert_eq!(SutName::new(bad), Err(NameError::BadChar(c)), "{bad}");
        }
        assert_eq!(SutName::new("$sys"), Err(NameError::BadStart('$')));
    }

    proptest! {
        #[test]
        fn valid_names_are_safe_topic_levels(s in "\\PC{0,80}") {
            if let Ok(n) = SutName::new(&s) {
                let n = n.as_str();
                prop_assert!(!n.contains(['/', '+', '#', '$', '.', ' ']));
                prop_assert!(n.len() <= MAX_NAME_LEN && !n.is_empty());
            }
        }
    }
}
