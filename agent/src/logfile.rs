//! The per-SUT log file, rotated by size, keeping N files.
//!
//! `<dir>/<sut>.log` is the live file; rotation renames `.log.(N-1)` to `.log.N` and so on down
//! to `.log` → `.log.1`, then opens a fresh `.log`. Nothing is ever truncated: the old stack
//! zeroed its 300 MB log, losing everything at once.
//!
//! Rotation happens at a line boundary: once the live file has reached `max_size`, the next write
//! puts everything up to and including its first newline into the old file, rotates, and writes
//! the rest into the new one. A line is only split across files when it alone is longer than
//! `max_size` (the file is then rotated at twice `max_size` whatever the content), so no line is
//! lost or torn at rotation in ordinary output.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A size-rotated, append-only log file.
pub struct RotatingFile {
    path: PathBuf,
    file: File,
    size: u64,
    max_size: u64,
    keep: u32,
    rotations: u64,
}

impl RotatingFile {
    /// Opens (appending to) `path`, creating its directory.
    pub fn open(path: &Path, max_size: u64, keep: u32) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingFile {
            path: path.to_path_buf(),
            file,
            size,
            max_size: max_size.max(1),
            keep: keep.max(1),
            rotations: 0,
        })
    }

    /// The live file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many times the file was rotated since it was opened.
    pub fn rotations(&self) -> u64 {
        self.rotations
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut s = self.path.clone().into_os_string();
        s.push(format!(".{n}"));
        PathBuf::from(s)
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file.flush()?;
        // Shift .keep-1 → .keep (overwriting the oldest), ..., .log → .log.1.
        for n in (1..self.keep).rev() {
            let from = self.rotated(n);
            if from.exists() {
                std::fs::rename(&from, self.rotated(n + 1))?;
            }
        }
        std::fs::rename(&self.path, self.rotated(1))?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = 0;
        self.rotations += 1;
        Ok(())
    }

    /// Appends `buf`, rotating at a line boundary when the file is full.
    pub fn write_all(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            if self.size >= self.max_size {
                // Finish the current line in the old file, unless the line is absurdly long.
                let cut = buf.iter().position(|b| *b == b'\n').map(|p| p + 1);
                match cut {
                    Some(cut) if self.size + cut as u64 <= self.max_size * 2 => {
                        self.append(&buf[..cut])?;
                        buf = &buf[cut..];
                        self.rotate()?;
                        continue;
                    }
                    _ if self.size >= self.max_size * 2 => {
                        self.rotate()?;
                        continue;
                    }
                    _ => {
                        // No newline yet: keep writing the line into this file, up to 2×max.
                        let room = (self.max_size * 2 - self.size) as usize;
                        let n = room.min(buf.len());
                        self.append(&buf[..n])?;
                        buf = &buf[n..];
                        continue;
                    }
                }
            }
            let room = (self.max_size - self.size) as usize;
            if buf.len() <= room {
                return self.append(buf);
            }
            // Fill to max_size, then the loop finishes the line and rotates.
            self.append(&buf[..room])?;
            buf = &buf[room..];
        }
        Ok(())
    }

    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        self.file.write_all(buf)?;
        self.size += buf.len() as u64;
        Ok(())
    }

    /// Flushes to the OS.
    pub fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }

    /// Flushes and fsyncs.
    pub fn sync(&mut self) -> io::Result<()> {
        self.file.flush()?;
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(p: &Path) -> Vec<u8> {
        std::fs::read(p).unwrap_or_default()
    }

    #[test]
    fn appends_to_an_existing_file_and_never_truncates() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.log");
        std::fs::write(&p, b"old\n").unwrap();
        let mut f = RotatingFile::open(&p, 1000, 3).unwrap();
        f.write_all(b"new\n").unwrap();
        assert_eq!(read(&p), b"old\nnew\n");
    }

    #[test]
    fn rotates_at_line_boundaries_keeping_n_files_and_every_line() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.log");
        let mut f = RotatingFile::open(&p, 100, 3).unwrap();
        let mut all = Vec::new();
        for i in 0..100 {
            let line = format!("line {i:03} {}\n", "x".repeat(i % 17));
            all.extend_from_slice(line.as_bytes());
            // Write in awkward pieces to cross boundaries mid-line.
            let (a, b) = line.as_bytes().split_at(line.len() / 2);
            f.write_all(a).unwrap();
            f.write_all(b).unwrap();
        }
        f.flush().unwrap();
        assert!(f.rotations() > 3);
        // Only .log, .log.1 .. .log.3 exist.
        let mut names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["x.log", "x.log.1", "x.log.2", "x.log.3"]);
        // Every file holds whole lines, and the kept files are the tail of the output in order.
        let mut kept = Vec::new();
        for n in ["x.log.3", "x.log.2", "x.log.1", "x.log"] {
            let b = read(&d.path().join(n));
            assert!(b.is_empty() || b.ends_with(b"\n"), "{n} ends mid-line");
            assert!(b.len() <= 200, "{n} has {} bytes", b.len());
            kept.extend_from_slice(&b);
        }
        assert!(
            all.ends_with(&kept),
            "kept files are not the tail of the output"
        );
        assert!(kept.starts_with(b"line "));
    }

    #[test]
    fn a_line_longer_than_twice_the_limit_is_split_not_lost() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.log");
        let mut f = RotatingFile::open(&p, 10, 5).unwrap();
        let long = vec![b'a'; 45];
        f.write_all(&long).unwrap();
        f.write_all(b"\n").unwrap();
        let mut total = 0;
        for n in ["x.log.2", "x.log.1", "x.log"] {
            total += read(&d.path().join(n)).len();
        }
        assert_eq!(total, 46);
    }
}
