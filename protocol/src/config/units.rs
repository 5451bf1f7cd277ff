//! Durations and byte sizes as written in SUT files, and how they are serialised back.

use std::time::Duration;

use serde::Serializer;

/// Why a duration or size string is refused; the message names the value as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum UnitError {
    /// Not a humantime duration.
    #[error("{input:?} is not a duration ({reason}); write a string like \"10s\", \"15m\" or \"1m 30s\"")]
    Duration { input: String, reason: String },
    /// Not an integer with a known unit.
    #[error("{0:?} is not a size; write a number of bytes or a string like \"64KiB\" (units: B, KB, MB, GB, KiB, MiB, GiB)")]
    Size(String),
    /// More bytes than a `u64` holds.
    #[error("{0:?} is too large")]
    TooLarge(String),
}

/// Parses a human duration (`"10s"`, `"4h"`, `"1m 30s"`) with `humantime`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    humantime::parse_duration(s.trim()).map_err(|e| UnitError::Duration {
        input: s.to_owned(),
        reason: e.to_string(),
    })
}

/// Units accepted in a size string, with their factor in bytes.
const UNITS: &[(&str, u64)] = &[
    ("", 1),
    ("B", 1),
    ("KB", 1000),
    ("MB", 1000 * 1000),
    ("GB", 1000 * 1000 * 1000),
    ("KiB", 1024),
    ("MiB", 1024 * 1024),
    ("GiB", 1024 * 1024 * 1024),
];

/// Parses a size string: an integer followed by an optional unit (`B`, `KB`, `MB`, `GB`, `KiB`,
/// `MiB`, `GiB`), e.g. `"64KiB"` or `"10 MiB"`.
pub(crate) fn parse_size(s: &str) -> Result<u64, UnitError> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let unit = unit.trim();
    let bad = || UnitError::Size(s.to_owned());
    if number.is_empty() {
        return Err(bad());
    }
    let factor = UNITS
        .iter()
        .find(|(name, _)| *name == unit)
        .map(|(_, f)| *f)
        .ok_or_else(bad)?;
    let n: u64 = number.parse().map_err(|_| bad())?;
    n.checked_mul(factor)
        .ok_or_else(|| UnitError::TooLarge(s.to_owned()))
}

/// Serialises a duration as a humantime string (`"1m 30s"`).
pub(crate) fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("10 MiB"), Ok(10 << 20));
        assert_eq!(parse_size("5"), Ok(5));
        assert_eq!(parse_size("3KB"), Ok(3000));
        assert_eq!(parse_size("0B"), Ok(0));
        assert!(parse_size("KiB").is_err());
        assert!(parse_size("1.5MiB").is_err());
        assert!(parse_size("4 parsecs").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
        assert!(parse_size("18446744073709551615GiB").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("4h"), Ok(Duration::from_secs(4 * 3600)));
        assert!(parse_duration("soon")
            .unwrap_err()
            .to_string()
            .contains("\"soon\""));
    }
}
