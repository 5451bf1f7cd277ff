//! Reading a whole sut directory ([`scan_dir`]): which names are SUT files, which are skipped
//! (editor temporaries, hidden files), and which are reported because they look like a SUT file
//! but cannot be one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{load_file, Allow, Problem, SutConfig};
use crate::name::SutName;

/// Whether `path` names a SUT file: `*.toml`, not hidden, not an editor's temporary file
/// (`*~`, `.#*`, `*.swp`, vim's `4913`).
pub fn is_sut_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    name.ends_with(".toml")
        && name.len() > ".toml".len()
        && !name.starts_with('.')
        && !name.ends_with('~')
        && !name.ends_with(".swp")
        && name != "4913"
}

/// The result of reading a whole sut directory.
#[derive(Debug, Default)]
pub struct Scan {
    /// Valid SUTs by name.
    pub valid: BTreeMap<SutName, SutConfig>,
    /// Invalid SUT files and their problems.
    pub invalid: BTreeMap<PathBuf, Vec<Problem>>,
}

impl Scan {
    /// The SUT file of a valid SUT in the scanned directory.
    pub fn path_of(dir: &Path, name: &SutName) -> PathBuf {
        dir.join(format!("{name}.toml"))
    }
}

/// Whether `path`'s name ends in `.toml` but is not valid UTF-8 (so [`is_sut_file`] refuses it):
/// meant as a SUT file, but no SUT can be named after it.
fn is_non_utf8_toml(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Some(name) = path.file_name() else {
        return false;
    };
    let b = name.as_bytes();
    name.to_str().is_none() && b.ends_with(b".toml") && !b.starts_with(b".")
}

/// Loads every SUT file (see [`is_sut_file`]) directly in `dir`. Entries named like a SUT file
/// that cannot be one are reported in [`Scan::invalid`] too, never silently skipped: a directory
/// (or anything else that is not a regular file, or a dangling symlink) named `x.toml`, and a
/// `.toml` name that is not UTF-8. Fails only if the directory cannot be listed.
pub fn scan_dir(dir: &Path, allow: &Allow) -> std::io::Result<Scan> {
    let mut paths = Vec::new();
    let mut scan = Scan::default();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        match classify(&path) {
            Entry::Skipped => {}
            Entry::SutFile => paths.push(path),
            Entry::Refused(key, message) => {
                let problem = Problem {
                    file: path.display().to_string(),
                    key: key.to_owned(),
                    line: None,
                    message,
                };
                scan.invalid.insert(path, vec![problem]);
            }
        }
    }
    paths.sort();
    for path in paths {
        match load_file(&path, allow) {
            Ok(cfg) => {
                scan.valid.insert(cfg.name.clone(), cfg);
            }
            Err(problems) => {
                scan.invalid.insert(path, problems);
            }
        }
    }
    Ok(scan)
}

/// What [`scan_dir`] makes of a directory entry.
enum Entry {
    /// Not named like a SUT file (another extension, hidden, an editor's temporary file).
    Skipped,
    /// A SUT file to load.
    SutFile,
    /// Named like a SUT file but cannot be one: the problem's key and message.
    Refused(&'static str, String),
}

/// Sorts the entry at `path` by its name and, for a SUT file's name, by what it is. Follows
/// symlinks: a symlink to a file is checked (and refused when it leads out of the directory)
/// when it is read.
fn classify(path: &Path) -> Entry {
    if is_non_utf8_toml(path) {
        return Entry::Refused(
            "name",
            "the file name is not valid UTF-8, so it gives no SUT name; rename the file \
             (SUT names are [a-z0-9][a-z0-9_-]*)"
                .into(),
        );
    }
    if !is_sut_file(path) {
        return Entry::Skipped;
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Entry::SutFile,
        Ok(m) => {
            let what = if m.is_dir() {
                "a directory"
            } else {
                "not a regular file"
            };
            Entry::Refused(
                "",
                format!("is {what}, not a SUT file; rename or remove it"),
            )
        }
        Err(e) => Entry::Refused("", format!("cannot read the file: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sut_file_names() {
        for ok in ["a.toml", "sut/rpi4-01.toml", "Bad.Name.toml"] {
            assert!(is_sut_file(Path::new(ok)), "{ok}");
        }
        for bad in [
            ".toml",
            ".hidden.toml",
            "a.toml~",
            ".#a.toml",
            "a.toml.swp",
            ".a.toml.swp",
            "4913",
            "a.yaml",
            "a.conf",
            "toml",
        ] {
            assert!(!is_sut_file(Path::new(bad)), "{bad}");
        }
    }
}
