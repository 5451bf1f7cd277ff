//! Paths next to the SUT file: the lexical rules (relative, no `..`), resolving below a
//! directory with symlink escapes refused, and the `files` section that uses both.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use super::super::{read_limited, SutFile, MAX_FILE_SIZE};
use super::checker::{k, Checker};

/// Why a path in `files` or `[build]` is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum PathError {
    #[error("must not be empty")]
    Empty,
    #[error("must not contain a NUL character")]
    Nul,
    #[error("{path:?} is an absolute path; {what} must be relative to {inside}")]
    Absolute {
        path: String,
        what: String,
        inside: String,
    },
    #[error("{path:?} contains a `..` component; {what} must stay inside {inside}")]
    Parent {
        path: String,
        what: String,
        inside: String,
    },
    #[error("{0:?} does not name a file")]
    NoName(String),
    #[error("{path:?} does not exist in {inside} {shown}")]
    Missing {
        path: String,
        inside: String,
        shown: String,
    },
    #[error("cannot resolve {path:?}: {error}")]
    Resolve { path: String, error: String },
    #[error("{path:?} resolves to {resolved}, outside {inside} {base} (symlink escape refused)")]
    Escape {
        path: String,
        resolved: String,
        inside: String,
        base: String,
    },
}

/// `a/./b` → `a/b`; `None` for anything that is not a plain relative path.
pub(super) fn normalise(p: &str) -> Option<String> {
    let mut parts = Vec::new();
    for comp in Path::new(p).components() {
        match comp {
            Component::Normal(s) => parts.push(s.to_str()?),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// The lexical path rules of `files` and `[build]`: not empty, no NUL, relative, no `..`;
/// returns the normalised path. `what` names the setting, `inside` where it must stay.
pub(super) fn lexical(f: &str, what: &str, inside: &str) -> Result<String, PathError> {
    if f.is_empty() {
        return Err(PathError::Empty);
    }
    if f.contains('\0') {
        return Err(PathError::Nul);
    }
    let path = Path::new(f);
    if path.has_root() || path.is_absolute() {
        return Err(PathError::Absolute {
            path: f.to_owned(),
            what: what.to_owned(),
            inside: inside.to_owned(),
        });
    }
    if path.components().any(|comp| comp == Component::ParentDir) {
        return Err(PathError::Parent {
            path: f.to_owned(),
            what: what.to_owned(),
            inside: inside.to_owned(),
        });
    }
    normalise(f).ok_or_else(|| PathError::NoName(f.to_owned()))
}

/// Resolves `name` (normalised from `f`) below the canonical `base` (shown as `shown`, named
/// `inside`), following symlinks, and refuses anything that ends up outside it.
pub(super) fn resolve_inside(
    f: &str,
    name: &str,
    base: &Path,
    shown: &Path,
    inside: &str,
) -> Result<PathBuf, PathError> {
    let resolved = match base.join(name).canonicalize() {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(PathError::Missing {
                path: f.to_owned(),
                inside: inside.to_owned(),
                shown: shown.display().to_string(),
            })
        }
        Err(e) => {
            return Err(PathError::Resolve {
                path: f.to_owned(),
                error: e.to_string(),
            })
        }
    };
    if !resolved.starts_with(base) {
        return Err(PathError::Escape {
            path: f.to_owned(),
            resolved: resolved.display().to_string(),
            inside: inside.to_owned(),
            base: base.display().to_string(),
        });
    }
    Ok(resolved)
}

/// The sut directory, resolved; the problem goes to `key` when it cannot be.
pub(super) fn canonical_sut_dir(
    c: &mut Checker<'_>,
    key: &super::super::locate::KeyPath,
    sut_dir: &Path,
) -> Option<PathBuf> {
    match sut_dir.canonicalize() {
        Ok(d) => Some(d),
        Err(e) => {
            c.add(
                key,
                format!(
                    "cannot resolve the sut directory {}: {e}",
                    sut_dir.display()
                ),
            );
            None
        }
    }
}

/// `files`: each a regular file inside the sut directory, listed once, at most
/// [`MAX_FILE_SIZE`]; read now.
pub(super) fn files(c: &mut Checker<'_>, raw: &[String], sut_dir: &Path) -> Vec<SutFile> {
    let mut out = Vec::new();
    if raw.is_empty() {
        return out;
    }
    let Some(canon_dir) = canonical_sut_dir(c, &k("files"), sut_dir) else {
        return out;
    };
    let mut seen = BTreeMap::new();
    for (i, f) in raw.iter().enumerate() {
        let key = k("files").index(i);
        let name = match lexical(f, "files", "the sut directory") {
            Ok(n) => n,
            Err(e) => {
                c.add(&key, e.to_string());
                continue;
            }
        };
        if let Some(first) = seen.insert(name.clone(), i) {
            c.add(&key, format!("{f:?} is already listed as files[{first}]"));
            continue;
        }
        match read_file(f, &name, &canon_dir, sut_dir) {
            Ok(content) => out.push(SutFile { name, content }),
            Err(e) => c.add(&key, e.to_string()),
        }
    }
    out
}

/// Why an entry of `files` cannot be delivered.
#[derive(Debug, thiserror::Error)]
enum FileError {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("{0:?} is not a regular file")]
    NotAFile(String),
    #[error("cannot read {path:?}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{0:?} is larger than {MAX_FILE_SIZE} bytes (1 MiB)")]
    TooLarge(String),
}

/// Reads one entry of `files` (`f`, normalised to `name`).
fn read_file(f: &str, name: &str, canon_dir: &Path, sut_dir: &Path) -> Result<Vec<u8>, FileError> {
    let resolved = resolve_inside(f, name, canon_dir, sut_dir, "the sut directory")?;
    let read = |error| FileError::Read {
        path: f.to_owned(),
        error,
    };
    match std::fs::metadata(&resolved) {
        Ok(m) if !m.is_file() => return Err(FileError::NotAFile(f.to_owned())),
        Err(e) => return Err(read(e)),
        Ok(_) => {}
    }
    read_limited(&resolved, MAX_FILE_SIZE)
        .map_err(read)?
        .ok_or_else(|| FileError::TooLarge(f.to_owned()))
}
