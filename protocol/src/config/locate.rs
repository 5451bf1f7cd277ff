//! Key paths, and the mapping between them and positions in the TOML text.
//!
//! serde's errors carry a byte span but no key; semantic problems carry a key but no span. The
//! spanned document (`toml::de::DeTable`) links the two.

use std::fmt;
use std::ops::Range;

use toml::de::{DeTable, DeValue};

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// A key path such as `health.max_age`, `files[2]` or `labels."io.labvisor.x"`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KeyPath(pub Vec<Seg>);

impl KeyPath {
    /// A path of plain keys: `KeyPath::of(&["health", "max_age"])`.
    pub fn of(keys: &[&str]) -> Self {
        Self(keys.iter().map(|k| Seg::Key((*k).to_owned())).collect())
    }

    /// This path with one more key.
    pub fn key(&self, k: &str) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Key(k.to_owned()));
        p
    }

    /// This path with an array index.
    pub fn index(&self, i: usize) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }
}

fn is_bare(k: &str) -> bool {
    !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    if is_bare(k) {
                        f.write_str(k)?;
                    } else {
                        write!(f, "{k:?}")?;
                    }
                }
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// 1-based line of byte offset `pos` in `text`.
pub(crate) fn line_of(text: &str, pos: usize) -> usize {
    let end = pos.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// The span of the value (or, failing that, the key) at `path`.
pub(crate) fn span_of(table: &DeTable<'_>, path: &KeyPath) -> Option<Range<usize>> {
    let (first, rest) = path.0.split_first()?;
    let Seg::Key(k) = first else { return None };
    let (key, value) = table.iter().find(|(key, _)| key.get_ref().as_ref() == k)?;
    let mut span = Some(key.span());
    let mut current = value;
    for seg in rest {
        let next = match (seg, current.get_ref()) {
            (Seg::Key(k), DeValue::Table(t)) => t
                .iter()
                .find(|(key, _)| key.get_ref().as_ref() == k)
                .map(|(key, v)| {
                    span = Some(key.span());
                    v
                }),
            (Seg::Index(i), DeValue::Array(a)) => a.get(*i).inspect(|v| span = Some(v.span())),
            _ => None,
        };
        match next {
            Some(v) => current = v,
            None => break,
        }
    }
    span
}

/// The deepest key path whose key or value contains byte offset `pos`.
pub(crate) fn path_at(table: &DeTable<'_>, pos: usize) -> Option<KeyPath> {
    let mut path = KeyPath::default();
    if find_in_table(table, pos, &mut path) {
        Some(path)
    } else {
        None
    }
}

fn contains(span: &Range<usize>, pos: usize) -> bool {
    span.start <= pos && (pos < span.end || span.is_empty() && pos == span.start)
}

fn find_in_table(table: &DeTable<'_>, pos: usize, path: &mut KeyPath) -> bool {
    for (key, value) in table.iter() {
        path.0.push(Seg::Key(key.get_ref().to_string()));
        if contains(&key.span(), pos) || find_in_value(value.get_ref(), pos, path) {
            return true;
        }
        if contains(&value.span(), pos) {
            return true;
        }
        path.0.pop();
    }
    false
}

fn find_in_value(value: &DeValue<'_>, pos: usize, path: &mut KeyPath) -> bool {
    match value {
        DeValue::Table(t) => find_in_table(t, pos, path),
        DeValue::Array(a) => {
            for (i, item) in a.iter().enumerate() {
                path.0.push(Seg::Index(i));
                if find_in_value(item.get_ref(), pos, path) || contains(&item.span(), pos) {
                    return true;
                }
                path.0.pop();
            }
            false
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_non_bare_keys() {
        let p = KeyPath::of(&["labels", "io.labvisor.x"]);
        assert_eq!(p.to_string(), "labels.\"io.labvisor.x\"");
        assert_eq!(KeyPath::of(&["files"]).index(2).to_string(), "files[2]");
        assert_eq!(
            KeyPath::of(&["mounts"]).index(0).key("source").to_string(),
            "mounts[0].source"
        );
    }

    #[test]
    fn finds_paths_and_spans() {
        let text = "image = \"x\"\n[health]\nretries = 3\n[[mounts]]\nsource = \"/a\"\n";
        let doc = DeTable::parse(text).unwrap();
        let pos = text.find("3\n").unwrap();
        assert_eq!(
            path_at(doc.get_ref(), pos).unwrap().to_string(),
            "health.retries"
        );
        let pos = text.find("\"/a\"").unwrap();
        assert_eq!(
            path_at(doc.get_ref(), pos).unwrap().to_string(),
            "mounts[0].source"
        );
        let span = span_of(doc.get_ref(), &KeyPath::of(&["health", "retries"])).unwrap();
        assert_eq!(line_of(text, span.start), 3);
        let span = span_of(
            doc.get_ref(),
            &KeyPath::of(&["mounts"]).index(0).key("source"),
        );
        assert_eq!(line_of(text, span.unwrap().start), 5);
    }
}
