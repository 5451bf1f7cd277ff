//! Reading one SUT file: from a path (refusing symlink escapes before reading a byte), from a
//! string, or as delivered into the agent's container; then [`super::validate`].

use std::path::Path;

use super::{validate, Allow, Problem, SutConfig, MAX_CONFIG_SIZE};

/// Loads and validates the SUT file at `path`; its sut directory is the file's parent.
/// Problems name the file as `path` is displayed.
pub fn load_file(path: &Path, allow: &Allow) -> Result<SutConfig, Vec<Problem>> {
    load_path(path, allow, true)
}

/// Loads the SUT file at `path` as it is delivered into the agent's container: like
/// [`load_file`], except that `[build]` is only parsed (its context stays on the supervisor's
/// side and is not in the container), and the result's `build` is `None`.
pub fn load_delivered_file(path: &Path, allow: &Allow) -> Result<SutConfig, Vec<Problem>> {
    load_path(path, allow, false)
}

/// Validates `text` as the SUT file delivered at `path` in the agent's container, when its
/// contents came inline (the supervisor's `LABVISOR_CONFIG_TOML`) rather than as a file: the
/// name is `path`'s stem, `files` are looked up beside `path`, and `[build]` is handled as in
/// [`load_delivered_file`]. Problems name `path` as displayed.
pub fn load_delivered_str(
    path: &Path,
    text: &str,
    allow: &Allow,
) -> Result<SutConfig, Vec<Problem>> {
    if text.len() as u64 > MAX_CONFIG_SIZE {
        return Err(vec![Problem {
            file: path.display().to_string(),
            key: String::new(),
            line: None,
            message: format!("the file is larger than {MAX_CONFIG_SIZE} bytes"),
        }]);
    }
    load_text(path, text, allow, false)
}

fn load_text(
    path: &Path,
    text: &str,
    allow: &Allow,
    check_build: bool,
) -> Result<SutConfig, Vec<Problem>> {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let sut_dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    validate::load(
        &path.display().to_string(),
        &stem,
        text,
        sut_dir,
        allow,
        check_build,
    )
}

fn load_path(path: &Path, allow: &Allow, check_build: bool) -> Result<SutConfig, Vec<Problem>> {
    let display = path.display().to_string();
    let problem = |message: String| {
        vec![Problem {
            file: display.clone(),
            key: String::new(),
            line: None,
            message,
        }]
    };
    let bytes = match read_sut_file(path) {
        Ok(b) => b,
        Err(e) => return Err(problem(e.to_string())),
    };
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => return Err(problem(format!("the file is not UTF-8: {e}"))),
    };
    load_text(path, &text, allow, check_build)
}

/// Why a SUT file could not be read ([`read_sut_file`]).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file resolves (through symlinks) to a place outside its directory.
    #[error("refused: the file resolves to {resolved}, outside the sut directory {dir} (a SUT file may be a symlink only to a file inside it)")]
    Outside {
        /// Where it resolves to.
        resolved: String,
        /// The sut directory, resolved.
        dir: String,
    },
    /// Not a regular file.
    #[error("refused: not a regular file")]
    NotAFile,
    /// Larger than [`MAX_CONFIG_SIZE`].
    #[error("the file is larger than {MAX_CONFIG_SIZE} bytes")]
    TooLarge,
    /// Any other I/O error.
    #[error("cannot read the file: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads the SUT file at `path` (at most [`MAX_CONFIG_SIZE`] bytes), refusing, before reading a
/// byte, a file that is not a regular file inside `path`'s own directory after symlinks are
/// resolved: a supervisor running as root must not read (and report parse errors of) a
/// `sut/x.toml` that links to `/etc/shadow`. The place is checked again on the opened file, so
/// a swap between check and open is caught too.
pub fn read_sut_file(path: &Path) -> Result<Vec<u8>, ReadError> {
    use std::io::Read;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = dir.canonicalize()?;
    let inside = |resolved: &Path| -> Result<(), ReadError> {
        if resolved.starts_with(&dir) {
            Ok(())
        } else {
            Err(ReadError::Outside {
                resolved: resolved.display().to_string(),
                dir: dir.display().to_string(),
            })
        }
    };
    let resolved = path.canonicalize()?;
    inside(&resolved)?;
    if !std::fs::metadata(&resolved)?.is_file() {
        return Err(ReadError::NotAFile);
    }
    let file = std::fs::File::open(&resolved)?;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let opened = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
        inside(&opened)?;
    }
    if !file.metadata()?.is_file() {
        return Err(ReadError::NotAFile);
    }
    let mut buf = Vec::new();
    file.take(MAX_CONFIG_SIZE + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_CONFIG_SIZE {
        return Err(ReadError::TooLarge);
    }
    Ok(buf)
}

/// Validates `text` as the SUT file `file_name` (e.g. `rpi4-01.toml`, whose stem is the SUT name)
/// in `sut_dir`, where its `files` are looked up.
pub fn load_str(
    file_name: &str,
    text: &str,
    sut_dir: &Path,
    allow: &Allow,
) -> Result<SutConfig, Vec<Problem>> {
    let stem = Path::new(file_name)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    validate::load(file_name, &stem, text, sut_dir, allow, true)
}

/// Reads at most `limit` bytes; `None` if the file is larger.
pub(crate) fn read_limited(path: &Path, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::fs::File::open(path)?
        .take(limit + 1)
        .read_to_end(&mut buf)?;
    Ok((buf.len() as u64 <= limit).then_some(buf))
}
