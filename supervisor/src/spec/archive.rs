//! The tar archives uploaded into containers through Docker's archive API: the SUT file and
//! its `files` (before an agent starts), and the tools (into the tools volume).

use bytes::Bytes;

use super::SpecError;

/// A tar archive (as chunks) holding `files` (absolute path, mode, contents) and every parent
/// directory (0755), in ustar headers with mtime 0. Paths are stored relative to `/`.
pub fn archive(files: &[(String, u32, Bytes)]) -> Result<Vec<Bytes>, SpecError> {
    let mut b = tar::Builder::new(Vec::new());
    for d in parent_dirs(files) {
        let h = header(tar::EntryType::Directory, &format!("{d}/"), 0o755, 0)?;
        b.append(&h, std::io::empty())?;
    }
    for (path, mode, content) in files {
        let path = path.trim_start_matches('/');
        let h = header(tar::EntryType::Regular, path, *mode, content.len())?;
        b.append(&h, &content[..])?;
    }
    Ok(vec![Bytes::from(b.into_inner()?)])
}

/// Every parent directory of `files`, relative to `/`, parents first, each once.
fn parent_dirs(files: &[(String, u32, Bytes)]) -> Vec<String> {
    let mut all_dirs: Vec<String> = Vec::new();
    for (path, _, _) in files {
        let rel = path.trim_start_matches('/');
        let mut acc = String::new();
        let parts: Vec<&str> = rel.split('/').collect();
        for p in &parts[..parts.len() - 1] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(p);
            if !all_dirs.contains(&acc) {
                all_dirs.push(acc.clone());
            }
        }
    }
    all_dirs
}

/// A ustar header (checksum set) of an entry of `size` bytes at `path`, which ustar splits into
/// prefix and name up to 255 bytes.
fn header(
    kind: tar::EntryType,
    path: &str,
    mode: u32,
    size: usize,
) -> Result<tar::Header, SpecError> {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_path(path).map_err(|e| SpecError::Path {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    h.set_mode(mode);
    h.set_size(size as u64);
    h.set_mtime(0);
    h.set_cksum();
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_come_after_their_parent_directories_in_ustar_blocks() {
        let files = [
            (
                "/a/b/c.toml".to_owned(),
                0o644,
                Bytes::from_static(b"x = 1"),
            ),
            ("/a/d".to_owned(), 0o600, Bytes::from_static(b"")),
        ];
        let bytes: Vec<u8> = archive(&files).unwrap().concat();
        // Two directories, two files (one data block for the first), two end blocks.
        assert_eq!(bytes.len(), 512 * (2 + 2 + 1 + 2));
        let mut ar = tar::Archive::new(&bytes[..]);
        let seen: Vec<(String, u32, u64)> = ar
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                let path = e.path().unwrap().display().to_string();
                (path, h.mode().unwrap(), h.mtime().unwrap())
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("a/".to_owned(), 0o755, 0),
                ("a/b/".to_owned(), 0o755, 0),
                ("a/b/c.toml".to_owned(), 0o644, 0),
                ("a/d".to_owned(), 0o600, 0),
            ]
        );
    }

    #[test]
    fn a_path_too_long_for_ustar_is_an_error() {
        let files = [(format!("/{}", "x".repeat(300)), 0o644, Bytes::new())];
        assert!(matches!(archive(&files), Err(SpecError::Path { .. })));
    }
}
