//! `labvisor-boot`: the entrypoint of an agent task under Docker Swarm.
//!
//! # Why it exists
//!
//! Under `labvisor supervise --runtime swarm` each SUT is a Swarm service whose task may run on
//! any node. The static agent (several MiB) must reach every node, but:
//!
//! - a Docker config, the one thing Swarm delivers to every node on its own, holds less than
//!   1000 KiB (Engine 20.10 refuses 1,024,000 bytes; the static agent is about 7 MiB, the static
//!   healthcheck about 1.2 MiB);
//! - labvisor runs no registry of its own, and lab images stay the lab's;
//! - a host path would need the binary installed on every node beforehand;
//! - a task's filesystem may be read-only or `noexec`, so the agent cannot be written to a
//!   file and run from there.
//!
//! So the supervisor cuts the agent into numbered parts, one config each (mounted read-only
//! under `/labvisor/bin/labvisor-agent.parts/`), next to a `manifest` config, and mounts this
//! small binary (itself one config, mode 0555) at `/labvisor/bin/labvisor-agent`, the task's
//! entrypoint. It concatenates the parts in order into an anonymous memory file
//! (`memfd_create(<its base name>, MFD_CLOEXEC)`), checks the size against the manifest, and
//! executes that file (`execveat(fd, "", …, AT_EMPTY_PATH)`) with its own arguments (its name
//! included) and environment. The healthcheck, too large for one config as well, travels the
//! same way: the same binary at `/labvisor/bin/labvisor-healthcheck` joins
//! `/labvisor/bin/labvisor-healthcheck.parts/`, so Docker's HEALTHCHECK and `docker exec` run
//! the paths they run under the local runtime.
//! No writable or executable filesystem is needed; the agent's process replaces this one (same
//! PID, same signals).
//!
//! No hash is checked: Swarm configs are immutable and the supervisor names them by the hash of
//! their contents, so a part cannot change under a given name; the size check catches a
//! manifest paired with the wrong parts.
//!
//! # Why `no_std`
//!
//! The binary must fit in one config itself. A static glibc program is about 670 KiB before any
//! Rust (glibc's own floor), and Rust's std on musl about 440 KiB; so the binary
//! (`src/main.rs`) uses neither: it is `no_std`, `no_main`, starts at its own `_start` and makes
//! its eight system calls itself (x86_64 Linux), a few KiB in all. This library, `no_std` too,
//! holds what can be tested without it: the manifest, part names, the join and the messages.
//! The binary is built only by `cargo static-boot` (`tools/build-static.sh`): it needs
//! `-C panic=abort` (the workspace profiles unwind) and its own link flags (`build.rs`), so it
//! is behind the `static` feature and a plain `cargo build` leaves it out.
//!
//! # The parts directory
//!
//! The directory `<argv[0]>.parts` ([`parts_dir_of`]; `LABVISOR_BOOT_PARTS` overrides it) holds `000`, `001`, … (three digits
//! at least) and `manifest`, whose lines are `key=value`: `parts=<n>` (how many parts, 1 to
//! [`MAX_PARTS`]) and `size=<bytes>` (their total size). Empty lines are skipped; any other line
//! is an error.
//!
//! # Errors
//!
//! Every failure (no directory, a missing part, a size mismatch, the exec itself) is one line on
//! stderr, `labvisor-boot: …`, and exit status [`EXIT_FAILURE`] (125, as `docker run` uses for
//! its own failures), so it is told apart from the agent's own exit statuses.

#![no_std]

#[cfg(test)]
extern crate std;

use core::fmt;

/// What is appended to the binary's own path (`argv[0]`) to name its parts directory:
/// `/labvisor/bin/labvisor-agent` reads `/labvisor/bin/labvisor-agent.parts/`.
pub const PARTS_SUFFIX: &str = ".parts";

/// The variable that overrides the parts directory (`<argv[0]>.parts`).
pub const PARTS_ENV: &str = "LABVISOR_BOOT_PARTS";

/// Writes `<argv0>.parts` into `buf` and returns its length; a path too long for `buf` (less
/// one byte for a NUL) is cut, and then names no directory.
pub fn parts_dir_of(argv0: &[u8], buf: &mut [u8]) -> usize {
    let room = buf.len().saturating_sub(1);
    let mut n = 0;
    for b in argv0.iter().chain(PARTS_SUFFIX.as_bytes()).take(room) {
        buf[n] = *b;
        n += 1;
    }
    n
}

/// The name of the manifest file in the parts directory.
pub const MANIFEST: &str = "manifest";

/// The largest manifest read (bytes).
pub const MAX_MANIFEST: usize = 256;

/// The exit status of every failure of the boot binary itself.
pub const EXIT_FAILURE: u8 = 125;

/// The most parts a manifest may name (part names stay within [`PartName`]'s buffer).
pub const MAX_PARTS: u32 = 99_999;

/// The parsed `manifest`: how many parts, and their total size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Manifest {
    /// Number of parts (`parts=`), from 1 to [`MAX_PARTS`].
    pub parts: u32,
    /// Total size in bytes (`size=`).
    pub size: u64,
}

/// What is wrong with a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestError {
    /// Line `n` is not `key=value`.
    NotKeyValue(usize),
    /// Line `n` has a key other than `parts` and `size`.
    UnknownKey(usize),
    /// Line `n` gives its key a second time.
    Twice(usize),
    /// Line `n`'s value is not a whole number.
    NotNumber(usize),
    /// No `parts=` line.
    NoParts,
    /// No `size=` line.
    NoSize,
    /// `parts=` is 0 or more than [`MAX_PARTS`].
    PartsRange(u64),
    /// The manifest is not UTF-8 or longer than [`MAX_MANIFEST`].
    Text,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManifestError::NotKeyValue(n) => write!(f, "line {n} is not key=value"),
            ManifestError::UnknownKey(n) => write!(f, "line {n}: unknown key (parts, size)"),
            ManifestError::Twice(n) => write!(f, "line {n}: a key given twice"),
            ManifestError::NotNumber(n) => write!(f, "line {n}: not a whole number"),
            ManifestError::NoParts => f.write_str("no parts= line"),
            ManifestError::NoSize => f.write_str("no size= line"),
            ManifestError::PartsRange(p) => {
                write!(f, "parts={p}: give from 1 to {MAX_PARTS}")
            }
            ManifestError::Text => write!(f, "not text of at most {MAX_MANIFEST} bytes"),
        }
    }
}

impl Manifest {
    /// Parses the manifest: `parts=<n>` and `size=<bytes>`, each once, in any order; empty
    /// lines skipped; a trailing `\r` ignored.
    pub fn parse(text: &[u8]) -> Result<Self, ManifestError> {
        let text = core::str::from_utf8(text).map_err(|_| ManifestError::Text)?;
        let (mut parts, mut size) = (None, None);
        for (n, line) in text.lines().enumerate() {
            let n = n + 1;
            let line = line.trim_end_matches('\r');
            if line.is_empty() {
                continue;
            }
            let (key, value) = line.split_once('=').ok_or(ManifestError::NotKeyValue(n))?;
            let slot = match key {
                "parts" => &mut parts,
                "size" => &mut size,
                _ => return Err(ManifestError::UnknownKey(n)),
            };
            if slot.is_some() {
                return Err(ManifestError::Twice(n));
            }
            *slot = Some(
                value
                    .parse::<u64>()
                    .map_err(|_| ManifestError::NotNumber(n))?,
            );
        }
        let parts = parts.ok_or(ManifestError::NoParts)?;
        let size = size.ok_or(ManifestError::NoSize)?;
        let parts = u32::try_from(parts)
            .ok()
            .filter(|p| (1..=MAX_PARTS).contains(p))
            .ok_or(ManifestError::PartsRange(parts))?;
        Ok(Self { parts, size })
    }
}

/// A part's file name, `000`, `001`, …, `999`, `1000`, …, NUL-terminated for `openat`.
#[derive(Debug, Clone, Copy)]
pub struct PartName {
    buf: [u8; 8],
    len: usize,
}

impl PartName {
    /// The name of part `i` (at most [`MAX_PARTS`]).
    pub fn new(i: u32) -> Self {
        let mut digits = [0u8; 8];
        let (mut n, mut k) = (i, 0);
        while n > 0 || k < 3 {
            digits[k] = b'0' + (n % 10) as u8;
            n /= 10;
            k += 1;
        }
        let mut buf = [0u8; 8];
        for j in 0..k {
            buf[j] = digits[k - 1 - j];
        }
        Self { buf, len: k }
    }

    /// The name, without the NUL.
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }

    /// The name with its terminating NUL.
    pub fn as_c_bytes(&self) -> &[u8] {
        &self.buf[..=self.len]
    }
}

/// An error number from the kernel (`errno`), shown as its name where known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            1 => "operation not permitted (EPERM)",
            2 => "no such file or directory (ENOENT)",
            5 => "input/output error (EIO)",
            8 => "exec format error (ENOEXEC)",
            12 => "out of memory (ENOMEM)",
            13 => "permission denied (EACCES)",
            20 => "not a directory (ENOTDIR)",
            21 => "is a directory (EISDIR)",
            22 => "invalid argument (EINVAL)",
            24 => "too many open files (EMFILE)",
            28 => "no space left (ENOSPC)",
            38 => "function not implemented (ENOSYS)",
            _ => return write!(f, "errno {}", self.0),
        };
        f.write_str(name)
    }
}

/// Why the agent could not be started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootError {
    /// The parts directory cannot be opened.
    NoDir(Errno),
    /// The manifest cannot be read.
    NoManifest(Errno),
    /// The manifest is malformed.
    Manifest(ManifestError),
    /// A part is missing or unreadable.
    Part(PartName, Errno),
    /// The parts' total size differs from the manifest's.
    Size {
        /// What the manifest says.
        expected: u64,
        /// What the parts hold.
        actual: u64,
    },
    /// The memory file cannot be made or written.
    Memfd(Errno),
    /// The joined program cannot be executed.
    Exec(Errno),
}

impl PartialEq for PartName {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for PartName {}

impl fmt::Display for BootError {
    /// The message after `labvisor-boot: <parts directory>: `.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootError::NoDir(e) => write!(
                f,
                "no parts directory ({e}); deliver the parts at <this binary's path>.parts or set {PARTS_ENV}"
            ),
            BootError::NoManifest(e) => write!(f, "cannot read its {MANIFEST}: {e}"),
            BootError::Manifest(e) => write!(f, "bad {MANIFEST}: {e}"),
            BootError::Part(p, e) => write!(f, "missing agent part {}: {e}", p.as_str()),
            BootError::Size { expected, actual } => write!(
                f,
                "size mismatch: the parts hold {actual} bytes, the {MANIFEST} says {expected}"
            ),
            BootError::Memfd(e) => write!(f, "cannot make the agent's memory file: {e}"),
            BootError::Exec(e) => write!(f, "cannot execute the agent: {e}"),
        }
    }
}

/// The I/O the join needs: reading the parts, writing the memory file.
pub trait JoinIo {
    /// An open part.
    type Part;
    /// Opens part `name` of the parts directory.
    fn open(&mut self, name: &PartName) -> Result<Self::Part, Errno>;
    /// Reads from `part` into `buf`; 0 at its end.
    fn read(&mut self, part: &mut Self::Part, buf: &mut [u8]) -> Result<usize, Errno>;
    /// Closes `part`.
    fn close(&mut self, part: Self::Part);
    /// Writes all of `buf` to the output.
    fn write_all(&mut self, buf: &[u8]) -> Result<(), Errno>;
}

/// Copies the parts named by `manifest` in order to the output, through `buf`, and checks their
/// total size against the manifest; returns the size.
pub fn join<I: JoinIo>(io: &mut I, manifest: &Manifest, buf: &mut [u8]) -> Result<u64, BootError> {
    let mut total = 0u64;
    for i in 0..manifest.parts {
        let name = PartName::new(i);
        let mut part = io.open(&name).map_err(|e| BootError::Part(name, e))?;
        let copied = copy(io, &mut part, buf, &name);
        io.close(part);
        total += copied?;
        if total > manifest.size {
            break;
        }
    }
    if total != manifest.size {
        return Err(BootError::Size {
            expected: manifest.size,
            actual: total,
        });
    }
    Ok(total)
}

fn copy<I: JoinIo>(
    io: &mut I,
    part: &mut I::Part,
    buf: &mut [u8],
    name: &PartName,
) -> Result<u64, BootError> {
    let mut n = 0u64;
    loop {
        let got = io.read(part, buf).map_err(|e| BootError::Part(*name, e))?;
        if got == 0 {
            return Ok(n);
        }
        io.write_all(&buf[..got]).map_err(BootError::Memfd)?;
        n += got as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::string::{String, ToString};
    use std::vec::Vec;

    #[test]
    fn manifest_lines_parse_in_any_order() {
        let m = Manifest::parse(b"parts=3\nsize=1200\n").unwrap();
        assert_eq!(
            m,
            Manifest {
                parts: 3,
                size: 1200
            }
        );
        let m = Manifest::parse(b"\nsize=0\r\nparts=1\r\n\n").unwrap();
        assert_eq!(m, Manifest { parts: 1, size: 0 });
    }

    #[test]
    fn bad_manifests_say_why() {
        let err = |t: &str| Manifest::parse(t.as_bytes()).unwrap_err().to_string();
        assert_eq!(err("size=3\n"), "no parts= line");
        assert_eq!(err("parts=3\n"), "no size= line");
        assert_eq!(err("parts=0\nsize=1"), "parts=0: give from 1 to 99999");
        assert_eq!(
            err("parts=100000\nsize=1"),
            "parts=100000: give from 1 to 99999"
        );
        assert_eq!(
            err("parts=1\nsize=1\nsha256=ab\n"),
            "line 3: unknown key (parts, size)"
        );
        assert_eq!(err("parts=1\nparts=2\n"), "line 2: a key given twice");
        assert_eq!(err("parts=x\nsize=1"), "line 1: not a whole number");
        assert_eq!(err("parts=-1\nsize=1"), "line 1: not a whole number");
        assert_eq!(err("parts 1"), "line 1 is not key=value");
        assert_eq!(
            Manifest::parse(b"parts=\xff").unwrap_err(),
            ManifestError::Text
        );
    }

    #[test]
    fn part_names_have_three_digits_at_least() {
        for (i, want) in [
            (0, "000"),
            (7, "007"),
            (42, "042"),
            (999, "999"),
            (1000, "1000"),
            (99_999, "99999"),
        ] {
            let n = PartName::new(i);
            assert_eq!(n.as_str(), want);
            assert_eq!(n.as_c_bytes().last(), Some(&0));
            assert_eq!(n.as_c_bytes().len(), want.len() + 1);
        }
    }

    /// Parts in memory; the output collected.
    struct Mem {
        parts: BTreeMap<String, Vec<u8>>,
        out: Vec<u8>,
        open: usize,
    }

    impl JoinIo for Mem {
        type Part = (Vec<u8>, usize);
        fn open(&mut self, name: &PartName) -> Result<Self::Part, Errno> {
            let part = self.parts.get(name.as_str()).ok_or(Errno(2))?;
            self.open += 1;
            Ok((part.clone(), 0))
        }
        fn read(&mut self, part: &mut Self::Part, buf: &mut [u8]) -> Result<usize, Errno> {
            let n = buf.len().min(part.0.len() - part.1);
            buf[..n].copy_from_slice(&part.0[part.1..part.1 + n]);
            part.1 += n;
            Ok(n)
        }
        fn close(&mut self, _: Self::Part) {
            self.open -= 1;
        }
        fn write_all(&mut self, buf: &[u8]) -> Result<(), Errno> {
            self.out.extend_from_slice(buf);
            Ok(())
        }
    }

    fn mem(parts: &[(&str, &str)]) -> Mem {
        Mem {
            parts: parts
                .iter()
                .map(|(n, c)| (n.to_string(), c.as_bytes().to_vec()))
                .collect(),
            out: Vec::new(),
            open: 0,
        }
    }

    #[test]
    fn join_concatenates_in_order_and_checks_the_size() {
        // A buffer smaller than a part: the copy loops.
        let mut buf = [0u8; 2];
        let mut io = mem(&[("002", "cc"), ("000", "a"), ("001", "bbb")]);
        let n = join(&mut io, &Manifest { parts: 3, size: 6 }, &mut buf).unwrap();
        assert_eq!((n, &io.out[..], io.open), (6, &b"abbbcc"[..], 0));

        let mut io = mem(&[("000", "a"), ("001", "bbb"), ("002", "cc")]);
        let e = join(&mut io, &Manifest { parts: 3, size: 7 }, &mut buf).unwrap_err();
        assert_eq!(
            e.to_string(),
            "size mismatch: the parts hold 6 bytes, the manifest says 7"
        );

        let mut io = mem(&[("000", "a"), ("001", "bbb"), ("002", "cc")]);
        let e = join(&mut io, &Manifest { parts: 4, size: 6 }, &mut buf).unwrap_err();
        assert_eq!(
            e.to_string(),
            "missing agent part 003: no such file or directory (ENOENT)"
        );
        assert_eq!(io.open, 0, "every part closed");

        // Too much: stops at the first part beyond the size.
        let mut io = mem(&[("000", "aaaa"), ("001", "b")]);
        let e = join(&mut io, &Manifest { parts: 3, size: 2 }, &mut buf).unwrap_err();
        assert_eq!(
            e,
            BootError::Size {
                expected: 2,
                actual: 4
            }
        );
    }
}
