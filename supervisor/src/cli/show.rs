//! Helpers every client command shares: reading payloads and names, and writing ages, tables
//! and JSON.

use std::io::Write;

use labvisor_mqtt::Received;
use labvisor_protocol::payloads::now_ms;
use labvisor_protocol::topics::JobId;
use labvisor_protocol::SutName;
use serde::Serialize;

use super::ClientError;

/// A message's JSON payload, or `None` when it is not a `T`.
pub(crate) fn parse<T: serde::de::DeserializeOwned>(r: &Received) -> Option<T> {
    serde_json::from_slice(&r.payload).ok()
}

/// A SUT name from the command line.
pub(crate) fn sut_name(s: &str) -> Result<SutName, ClientError> {
    SutName::new(s).map_err(|e| ClientError::Usage(format!("SUT {s:?}: {e}")))
}

/// A job id from the command line.
pub(crate) fn job_id(s: &str) -> Result<JobId, ClientError> {
    JobId::new(s).map_err(|e| ClientError::Usage(e.to_string()))
}

/// The name a unit enum has on the wire (`"passed"`, `"healthy"`, ...).
pub(crate) fn wire_name<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

/// Writes `v` as one line of JSON.
pub(crate) fn write_json(out: &mut dyn Write, v: &impl Serialize) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, v)?;
    writeln!(out)
}

/// Writes `v` as indented JSON.
pub(crate) fn write_json_pretty(out: &mut dyn Write, v: &impl Serialize) -> std::io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, v)?;
    writeln!(out)
}

/// How long ago the time `ms` (ms since the epoch) was, in its largest unit.
pub(crate) fn age(ms: u64) -> String {
    age_at(ms, now_ms())
}

/// How long before `now` the time `ms` was (both ms since the epoch), in its largest unit.
pub(crate) fn age_at(ms: u64, now: u64) -> String {
    let d = now.saturating_sub(ms) / 1000;
    match d {
        0..=59 => format!("{d}s"),
        60..=3599 => format!("{}m", d / 60),
        3600..=86399 => format!("{}h", d / 3600),
        _ => format!("{}d", d / 86400),
    }
}

/// Prints rows as aligned columns.
pub(crate) fn table(
    out: &mut dyn Write,
    header: &[&str],
    rows: &[Vec<String>],
) -> std::io::Result<()> {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
        }
        s.trim_end().to_owned()
    };
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    writeln!(out, "{}", line(&header))?;
    for r in rows {
        writeln!(out, "{}", line(r))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_use_their_largest_unit() {
        assert_eq!(age_at(0, 59_999), "59s");
        assert_eq!(age_at(0, 60_000), "1m");
        assert_eq!(age_at(0, 7_200_000), "2h");
        assert_eq!(age_at(0, 86_400_000 * 3), "3d");
        assert_eq!(age_at(10, 0), "0s");
    }

    #[test]
    fn tables_align_and_trim() {
        let mut out = Vec::new();
        let rows = [vec!["a".into(), "long value".into(), "".into()]];
        table(&mut out, &["X", "Y", "Z"], &rows).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "X  Y           Z\na  long value\n"
        );
    }
}
