//! The build context of a `[build]` section: reading it, and the hashes that say when the image
//! must be rebuilt.
//!
//! The context is read as the engine receives it: every directory, regular file and symlink
//! below the context directory, with relative `/`-separated paths. Symlinks are kept as links
//! (never followed), so a link cannot pull files from outside the context into the build.
//! Other file types (sockets, FIFOs, devices) are refused.
//!
//! The **context hash** is SHA-256 over the entries sorted by path: for each, its kind, path,
//! permission bits and contents (or link target). File times and owners do not count. The
//! **build hash** covers the context hash, the Dockerfile's path and the build args; it is the
//! `io.labvisor.build-hash` label of the built image.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::hex;

/// Largest accepted build context (64 MiB of file contents).
pub const MAX_CONTEXT_SIZE: u64 = 64 * 1024 * 1024;

/// Most entries (files, directories, links) accepted in a build context.
pub const MAX_CONTEXT_ENTRIES: usize = 100_000;

/// One entry of a build context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextEntry {
    /// Path relative to the context directory, `/`-separated, never empty.
    pub path: String,
    /// Permission bits (`mode & 0o7777`); 0 for symlinks.
    pub mode: u32,
    /// What it is.
    pub kind: EntryKind,
}

/// What a [`ContextEntry`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file and its contents.
    File(Vec<u8>),
    /// A symbolic link and its target (not followed).
    Symlink(String),
}

/// Why a build context cannot be read; the message follows "the build context X".
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// A directory cannot be listed.
    #[error("cannot list {path}: {source}")]
    List {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A file or its metadata cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A symlink cannot be read.
    #[error("cannot read the link {path}: {source}")]
    ReadLink {
        /// The link.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A name that is not UTF-8.
    #[error("{0} has a file name that is not UTF-8")]
    NonUtf8Name(String),
    /// A symlink target that is not UTF-8.
    #[error("the link {0} is not UTF-8")]
    NonUtf8Link(String),
    /// Too many entries.
    #[error("has more than {MAX_CONTEXT_ENTRIES} files and directories")]
    TooManyEntries,
    /// Too many bytes of file contents.
    #[error("is larger than {max_bytes} bytes ({} MiB); keep only what the image needs in it", max_bytes / (1024 * 1024))]
    TooLarge {
        /// The limit.
        max_bytes: u64,
    },
    /// A socket, FIFO or device.
    #[error("{0:?} is not a regular file, directory or symlink (sockets, FIFOs and devices cannot be sent to the engine)")]
    Special(String),
}

/// Reads the whole context below `dir` (sorted by path), refusing more than `max_bytes` of file
/// contents or [`MAX_CONTEXT_ENTRIES`] entries.
pub fn read_context(dir: &Path, max_bytes: u64) -> Result<Vec<ContextEntry>, ContextError> {
    let mut walk = Walk {
        dir,
        max_bytes,
        total: 0,
        out: Vec::new(),
    };
    walk.dir_entries("")?;
    let mut out = walk.out;
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// One reading of a context: where it is, the limit, and what was read so far.
struct Walk<'a> {
    dir: &'a Path,
    max_bytes: u64,
    total: u64,
    out: Vec<ContextEntry>,
}

impl Walk<'_> {
    /// Reads the entries of the directory `rel` (relative to the context; `""` for itself).
    fn dir_entries(&mut self, rel: &str) -> Result<(), ContextError> {
        let here = if rel.is_empty() {
            self.dir.to_path_buf()
        } else {
            self.dir.join(rel)
        };
        let list = |source| ContextError::List {
            path: here.display().to_string(),
            source,
        };
        for entry in std::fs::read_dir(&here).map_err(list)? {
            let name = entry.map_err(list)?.file_name();
            let Some(name) = name.to_str() else {
                return Err(ContextError::NonUtf8Name(
                    here.join(&name).display().to_string(),
                ));
            };
            let path = if rel.is_empty() {
                name.to_owned()
            } else {
                format!("{rel}/{name}")
            };
            self.entry(path)?;
        }
        Ok(())
    }

    /// Reads one entry (and, for a directory, what is below it).
    fn entry(&mut self, path: String) -> Result<(), ContextError> {
        let full = self.dir.join(&path);
        let meta = std::fs::symlink_metadata(&full).map_err(|source| ContextError::Read {
            path: full.display().to_string(),
            source,
        })?;
        if self.out.len() >= MAX_CONTEXT_ENTRIES {
            return Err(ContextError::TooManyEntries);
        }
        let mode = meta.permissions().mode() & 0o7777;
        let ft = meta.file_type();
        let (mode, kind) = if ft.is_symlink() {
            (0, EntryKind::Symlink(link_target(&full)?))
        } else if ft.is_dir() {
            self.out.push(ContextEntry {
                path: path.clone(),
                mode,
                kind: EntryKind::Dir,
            });
            return self.dir_entries(&path);
        } else if ft.is_file() {
            (mode, EntryKind::File(self.file(&full, meta.len())?))
        } else {
            return Err(ContextError::Special(path));
        };
        self.out.push(ContextEntry { path, mode, kind });
        Ok(())
    }

    /// Reads a regular file of `len` bytes (as listed), counting it against the limit before
    /// and after reading (it may have grown).
    fn file(&mut self, full: &Path, len: u64) -> Result<Vec<u8>, ContextError> {
        self.total = self.total.saturating_add(len);
        self.check_size()?;
        let content = std::fs::read(full).map_err(|source| ContextError::Read {
            path: full.display().to_string(),
            source,
        })?;
        self.total = self
            .total
            .saturating_sub(len)
            .saturating_add(content.len() as u64);
        self.check_size()?;
        Ok(content)
    }

    fn check_size(&self) -> Result<(), ContextError> {
        if self.total > self.max_bytes {
            return Err(ContextError::TooLarge {
                max_bytes: self.max_bytes,
            });
        }
        Ok(())
    }
}

/// The target of the symlink `full`, as UTF-8.
fn link_target(full: &Path) -> Result<String, ContextError> {
    let target = std::fs::read_link(full).map_err(|source| ContextError::ReadLink {
        path: full.display().to_string(),
        source,
    })?;
    target
        .to_str()
        .map(str::to_owned)
        .ok_or_else(|| ContextError::NonUtf8Link(full.display().to_string()))
}

/// SHA-256 (hex) of a context as [`read_context`] returns it (the order of `entries` does not
/// matter).
pub fn context_hash(entries: &[ContextEntry]) -> String {
    let mut sorted: Vec<&ContextEntry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let mut h = Sha256::new();
    h.update(b"labvisor-build-context-v1\0");
    for e in sorted {
        let (tag, data): (u8, &[u8]) = match &e.kind {
            EntryKind::Dir => (b'd', &[]),
            EntryKind::File(c) => (b'f', c),
            EntryKind::Symlink(t) => (b'l', t.as_bytes()),
        };
        h.update([tag]);
        h.update((e.path.len() as u64).to_le_bytes());
        h.update(e.path.as_bytes());
        h.update(e.mode.to_le_bytes());
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    }
    hex(&h.finalize())
}

/// The build hash: what the `io.labvisor.build-hash` label of a built image says. Covers the
/// context hash, the Dockerfile's path in the context and the build args.
pub fn build_hash(context_hash: &str, dockerfile: &str, args: &BTreeMap<String, String>) -> String {
    let json = serde_json::json!({
        "context": context_hash,
        "dockerfile": dockerfile,
        "args": args,
    });
    hex(&Sha256::digest(json.to_string().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        for (p, c) in files {
            let full = t.path().join(p);
            fs::create_dir_all(full.parent().unwrap()).unwrap();
            fs::write(full, c).unwrap();
        }
        t
    }

    fn hash_of(dir: &Path) -> String {
        context_hash(&read_context(dir, MAX_CONTEXT_SIZE).unwrap())
    }

    #[test]
    fn entries_are_sorted_relative_paths_with_contents() {
        let t = tree(&[
            ("b.txt", "b"),
            ("a/x.txt", "x"),
            ("Dockerfile", "FROM scratch"),
        ]);
        let e = read_context(t.path(), MAX_CONTEXT_SIZE).unwrap();
        let paths: Vec<&str> = e.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["Dockerfile", "a", "a/x.txt", "b.txt"]);
        assert_eq!(e[2].kind, EntryKind::File(b"x".to_vec()));
        assert_eq!(e[1].kind, EntryKind::Dir);
    }

    #[test]
    fn hash_is_stable_and_independent_of_creation_order() {
        let a = tree(&[("x", "1"), ("d/y", "2")]);
        let b = tree(&[("d/y", "2"), ("x", "1")]);
        assert_eq!(hash_of(a.path()), hash_of(b.path()));
        assert_eq!(hash_of(a.path()), hash_of(a.path()));
        // Order of the slice does not matter either.
        let mut e = read_context(a.path(), MAX_CONTEXT_SIZE).unwrap();
        let h = context_hash(&e);
        e.reverse();
        assert_eq!(context_hash(&e), h);
    }

    #[test]
    fn hash_changes_with_content_names_additions_and_modes() {
        let t = tree(&[("x", "1"), ("d/y", "2")]);
        let h0 = hash_of(t.path());
        fs::write(t.path().join("x"), "changed").unwrap();
        let h1 = hash_of(t.path());
        assert_ne!(h0, h1);
        fs::write(t.path().join("new"), "").unwrap();
        let h2 = hash_of(t.path());
        assert_ne!(h1, h2);
        fs::rename(t.path().join("new"), t.path().join("renamed")).unwrap();
        let h3 = hash_of(t.path());
        assert_ne!(h2, h3);
        fs::set_permissions(t.path().join("x"), fs::Permissions::from_mode(0o755)).unwrap();
        let h4 = hash_of(t.path());
        assert_ne!(h3, h4);
        fs::create_dir(t.path().join("empty")).unwrap();
        assert_ne!(h4, hash_of(t.path()));
    }

    #[test]
    fn moving_content_between_files_changes_the_hash() {
        // No ambiguity from concatenation: ("ab","") differs from ("a","b").
        let a = tree(&[("p", "ab"), ("q", "")]);
        let b = tree(&[("p", "a"), ("q", "b")]);
        assert_ne!(hash_of(a.path()), hash_of(b.path()));
    }

    #[test]
    fn symlinks_are_kept_as_links_never_followed() {
        let outside = tree(&[("secret", "s3cr3t")]);
        let t = tree(&[("x", "1")]);
        std::os::unix::fs::symlink(outside.path().join("secret"), t.path().join("link")).unwrap();
        let e = read_context(t.path(), MAX_CONTEXT_SIZE).unwrap();
        let link = e.iter().find(|e| e.path == "link").unwrap();
        assert_eq!(
            link.kind,
            EntryKind::Symlink(outside.path().join("secret").display().to_string())
        );
        // Changing the outside file does not change the context.
        let h = context_hash(&e);
        fs::write(outside.path().join("secret"), "other").unwrap();
        assert_eq!(hash_of(t.path()), h);
    }

    #[test]
    fn size_cap_is_enforced() {
        let t = tree(&[("a", "12345"), ("b", "67890")]);
        assert!(read_context(t.path(), 10).is_ok());
        let e = read_context(t.path(), 9).unwrap_err().to_string();
        assert!(e.contains("is larger than 9 bytes"), "{e}");
    }

    #[test]
    fn special_files_are_refused() {
        let t = tree(&[("x", "1")]);
        let sock = t.path().join("sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let e = read_context(t.path(), MAX_CONTEXT_SIZE)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("is not a regular file, directory or symlink"),
            "{e}"
        );
    }

    #[test]
    fn build_hash_covers_dockerfile_and_args() {
        let mut args = BTreeMap::new();
        let h0 = build_hash("c", "Dockerfile", &args);
        assert_ne!(h0, build_hash("c2", "Dockerfile", &args));
        assert_ne!(h0, build_hash("c", "other/Dockerfile", &args));
        args.insert("A".into(), "1".into());
        assert_ne!(h0, build_hash("c", "Dockerfile", &args));
    }
}
