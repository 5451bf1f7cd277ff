//! [`Checker`]: collects the problems of one file, with the value checks every section shares
//! (durations, sizes, counts) and the small key and message helpers.

use std::num::{NonZeroU32, NonZeroU64};
use std::time::Duration;

use toml::de::DeTable;

use super::super::locate::{line_of, span_of, KeyPath};
use super::super::raw::{RawDuration, RawSize};
use super::super::units::{parse_duration, parse_size};
use super::super::{Problem, MAX_DURATION, MAX_SIZE};

/// Collects problems for one file.
pub(super) struct Checker<'a> {
    pub file: &'a str,
    pub text: &'a str,
    pub doc: &'a DeTable<'a>,
    pub problems: Vec<Problem>,
}

impl Checker<'_> {
    pub fn add(&mut self, key: &KeyPath, message: impl Into<String>) {
        let line = span_of(self.doc, key).map(|s| line_of(self.text, s.start));
        self.problems.push(Problem {
            file: self.file.to_owned(),
            key: key.to_string(),
            line,
            message: message.into(),
        });
    }

    /// A duration that must be more than zero (`allow_zero` for grace periods).
    pub fn duration(
        &mut self,
        key: KeyPath,
        raw: Option<&RawDuration>,
        default: Duration,
        allow_zero: bool,
    ) -> Duration {
        let Some(raw) = raw else { return default };
        match parse_duration(&raw.0) {
            Ok(d) if d.is_zero() && !allow_zero => {
                self.add(&key, "must be longer than zero");
                default
            }
            Ok(d) if d > MAX_DURATION => {
                self.add(
                    &key,
                    format!("is {}, longer than the 365 days accepted", raw.0.trim()),
                );
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.add(&key, e.to_string());
                default
            }
        }
    }

    /// A duration that must be at least `min` (when it was given and parsed); `why` says why.
    pub fn at_least(&mut self, key: KeyPath, given: bool, d: Duration, min: Duration, why: &str) {
        if given && !d.is_zero() && d < min {
            self.add(
                &key,
                format!(
                    "is {}, shorter than the {} accepted: {why}",
                    fmt_d(d),
                    fmt_d(min)
                ),
            );
        }
    }

    /// When `bad`, adds "is D, but must be RELATION (OTHER)EXTRA" at `key`: the shape of every
    /// check between two durations (`relation` names the other key, `extra` says why).
    pub fn order(
        &mut self,
        key: KeyPath,
        bad: bool,
        d: Duration,
        relation: &str,
        other: Duration,
        extra: &str,
    ) {
        if bad {
            self.add(
                &key,
                format!(
                    "is {}, but must be {relation} ({}){extra}",
                    fmt_d(d),
                    fmt_d(other)
                ),
            );
        }
    }

    /// Refuses the host-power setting at `key` unless `allowed`: "refused: WHAT WHY; start the
    /// supervisor with --FLAG to permit it".
    pub fn refuse_unless(&mut self, allowed: bool, key: KeyPath, power: Power<'_>) {
        if !allowed {
            let Power { what, why, flag } = power;
            self.add(
                &key,
                format!("refused: {what} {why}; start the supervisor with --{flag} to permit it"),
            );
        }
    }

    /// Refuses the setting at `key` under `--runtime swarm`: "refused under --runtime swarm:
    /// WHY; INSTEAD".
    pub fn refuse_under_swarm(&mut self, key: KeyPath, why: &str, instead: &str) {
        self.add(
            &key,
            format!("refused under --runtime swarm: {why}; {instead}"),
        );
    }

    /// A size in bytes, more than zero and at most `max` when given.
    pub fn size(
        &mut self,
        key: KeyPath,
        raw: Option<&RawSize>,
        max: Option<u64>,
    ) -> Option<NonZeroU64> {
        let bytes = match raw? {
            RawSize::Bytes(n) if *n <= 0 => {
                self.add(&key, format!("must be more than zero bytes, not {n}"));
                return None;
            }
            RawSize::Bytes(n) => u64::try_from(*n).ok()?,
            RawSize::Text(s) => match parse_size(s) {
                Ok(n) => n,
                Err(e) => {
                    self.add(&key, e.to_string());
                    return None;
                }
            },
        };
        let Some(bytes) = NonZeroU64::new(bytes) else {
            self.add(&key, "must be more than zero bytes");
            return None;
        };
        let max = max.unwrap_or(MAX_SIZE);
        if bytes.get() > max {
            self.add(
                &key,
                format!("is {bytes} bytes, at most {max} bytes are allowed"),
            );
            return None;
        }
        Some(bytes)
    }

    /// A count that must be at least 1.
    pub fn count(&mut self, key: KeyPath, raw: Option<u32>, default: u32) -> NonZeroU32 {
        let fallback = NonZeroU32::new(default).unwrap_or(NonZeroU32::MIN);
        match raw {
            None => fallback,
            Some(n) => NonZeroU32::new(n).unwrap_or_else(|| {
                self.add(&key, "must be at least 1");
                fallback
            }),
        }
    }
}

pub(super) const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

pub(super) fn fmt_d(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// The key path of a top-level key.
pub(super) fn k(key: &str) -> KeyPath {
    KeyPath::of(&[key])
}

/// The key path of `table.key`.
pub(super) fn kk(table: &str, key: &str) -> KeyPath {
    KeyPath::of(&[table, key])
}

/// A host-power setting and why it is refused without its flag (`--allow-…`).
pub(super) struct Power<'a> {
    /// What the setting does, as the message's subject.
    pub what: &'a str,
    /// Why that is dangerous.
    pub why: &'a str,
    /// The `--allow-*` flag, without the dashes.
    pub flag: &'a str,
}
