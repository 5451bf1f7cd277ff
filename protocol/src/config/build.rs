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

/// Reads the whole context below `dir` (sorted by path), refusing more than `max_bytes` of file
/// contents or [`MAX_CONTEXT_ENTRIES`] entries. The error says what is wrong, for humans.
pub fn read_context(dir: &Path, max_bytes: u64) -> Result<Vec<ContextEntry>, String> {
    let mut out = Vec::new();
    let mut total = 0u64;
    walk(dir, "", max_bytes, &mut total, &mut out)?;
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

fn walk(
    dir: &Path,
    rel: &str,
    max_bytes: u64,
    total: &mut u64,
    out: &mut Vec<ContextEntry>,
) -> Result<(), String> {
    let here = if rel.is_empty() {
        dir.to_path_buf()
    } else {
        dir.join(rel)
    };
    let entries =
        std::fs::read_dir(&here).map_err(|e| format!("cannot list {}: {e}", here.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot list {}: {e}", here.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(format!(
                "{} has a file name that is not UTF-8",
                here.join(&name).display()
            ));
        };
        let path = if rel.is_empty() {
            name.to_owned()
        } else {
            format!("{rel}/{name}")
        };
        let full = dir.join(&path);
        let meta = std::fs::symlink_metadata(&full)
            .map_err(|e| format!("cannot read {}: {e}", full.display()))?;
        if out.len() >= MAX_CONTEXT_ENTRIES {
            return Err(format!(
                "has more than {MAX_CONTEXT_ENTRIES} files and directories"
            ));
        }
        let mode = meta.permissions().mode() & 0o7777;
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = std::fs::read_link(&full)
                .map_err(|e| format!("cannot read the link {}: {e}", full.display()))?;
            let target = target
                .to_str()
                .ok_or_else(|| format!("the link {} is not UTF-8", full.display()))?
                .to_owned();
            out.push(ContextEntry {
                path,
                mode: 0,
                kind: EntryKind::Symlink(target),
            });
        } else if ft.is_dir() {
            out.push(ContextEntry {
                path: path.clone(),
                mode,
                kind: EntryKind::Dir,
            });
            walk(dir, &path, max_bytes, total, out)?;
        } else if ft.is_file() {
            *total = total.saturating_add(meta.len());
            if *total > max_bytes {
                return Err(format!(
                    "is larger than {max_bytes} bytes ({} MiB); keep only what the image needs in it",
                    max_bytes / (1024 * 1024)
                ));
            }
            let content =
                std::fs::read(&full).map_err(|e| format!("cannot read {}: {e}", full.display()))?;
            *total = total
                .saturating_sub(meta.len())
                .saturating_add(content.len() as u64);
            if *total > max_bytes {
                return Err(format!(
                    "is larger than {max_bytes} bytes ({} MiB); keep only what the image needs in it",
                    max_bytes / (1024 * 1024)
                ));
            }
            out.push(ContextEntry {
                path,
                mode,
                kind: EntryKind::File(content),
            });
        } else {
            return Err(format!(
                "{path:?} is not a regular file, directory or symlink (sockets, FIFOs and devices cannot be sent to the engine)"
            ));
        }
    }
    Ok(())
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
        let e = read_context(t.path(), 9).unwrap_err();
        assert!(e.contains("is larger than 9 bytes"), "{e}");
    }

    #[test]
    fn special_files_are_refused() {
        let t = tree(&[("x", "1")]);
        let sock = t.path().join("sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let e = read_context(t.path(), MAX_CONTEXT_SIZE).unwrap_err();
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
