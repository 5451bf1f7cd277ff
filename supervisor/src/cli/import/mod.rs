//! `labvisor import <dir>`: convert a testflinger-docker SUT directory into labvisor SUT files.
//!
//! The old stack kept three files per device:
//!
//! - `<sut>.conf`: the testflinger-agent config (YAML): `agent_id`, `server_address`,
//!   `job_queues`, `execution_basedir`, `global_timeout`, `output_timeout`, the phase commands;
//! - `<sut>.yaml`: the testflinger-cli job template (`job_queue`, `provision_data`, `test_data`);
//! - `<sut>_snappy.yaml`: the device-connector config (`device_ip`, `node_id`, ..., `env`).
//!
//! For every device whose triplet is complete and readable, `import` copies the three files to
//! the output directory and writes `<sut>.toml` next to them:
//!
//! | SUT key | from |
//! |---|---|
//! | `image` | `--image` (default [`DEFAULT_IMAGE`]) |
//! | `command` | `testflinger-agent -c /labvisor/sut/<sut>.conf --token-file /labvisor/sut/<sut>.token` |
//! | `files` | the triplet, [`WRAPPER`] and `<sut>.token` |
//! | `tail` | `<execution_basedir>/*/*.log` (testflinger writes phase output only there; default basedir `/tmp/testflinger/run`) |
//! | `env` | the snappy file's `env` map, keys that are valid environment names, and `TESTFLINGER_SERVER` = the config's `server_address` |
//! | `job.command` | `python3 /labvisor/sut/tf-job {job_file}` |
//! | `job.template` | `<sut>.yaml` |
//! | `probe.command` | `! tail -n 4 <logging_basedir>/testflinger-agent.log \| grep -E '403\|Unable to reach'` (unhealthy while the server refuses the agent or cannot be reached) |
//! | `job.timeout`, `job.output_timeout` | `global_timeout`, `output_timeout` (seconds), when present |
//!
//! This is the shape of `examples/testflinger/` (a test compares them), except `extra_hosts`:
//! the server address stays as the old config has it. Next to the triplet it
//! writes [`WRAPPER`], the example's job wrapper (it judges the job by `testflinger-cli results`
//! and cancels the server job on cancel and timeout), and `<sut>.token`, the agent's credential,
//! with a placeholder the user replaces; an existing token file is never overwritten, not even
//! with `--force`, and one still holding the placeholder is named in a warning.
//!
//! Every written file is checked with [`labvisor_protocol::config::load_file`]; one that does
//! not pass is removed again and the device counts as failed. A device with a missing or
//! unreadable file, or a name that is not a valid SUT name, is reported by file name and
//! skipped; the others are still imported. Hidden files (such as the old CLI directory's
//! `.reference.yaml`) and other file types are ignored.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use labvisor_protocol::config::{load_file, load_str, Allow};
use labvisor_protocol::SutName;

use read::Names;
use render::{render, RenderInput};

mod read;
mod render;

/// The agent image written when `--image` is not given: an image with testflinger-agent,
/// testflinger-cli and the device connectors, which the lab builds itself.
pub const DEFAULT_IMAGE: &str = "testflinger-agent-host:latest";

/// The job wrapper's file name, written next to the SUT files.
pub const WRAPPER: &str = "tf-job";

/// The job wrapper: the example's (`examples/testflinger/tf-job`).
pub const WRAPPER_TEXT: &str = include_str!("../../../../examples/testflinger/tf-job");

/// What a new `<sut>.token` holds until the user puts the agent's credential there (the
/// example's placeholder too).
pub const TOKEN_PLACEHOLDER: &str = "REPLACE-WITH-THIS-AGENT-S-REFRESH-TOKEN\n";

/// testflinger-agent's default `logging_basedir`.
pub const DEFAULT_LOGGING_BASEDIR: &str = "/tmp/testflinger/logs";

/// testflinger-agent's default `execution_basedir`.
pub const DEFAULT_EXECUTION_BASEDIR: &str = "/tmp/testflinger/run";

/// `labvisor import` on the command line.
#[derive(Debug, Clone, clap::Args)]
pub struct ImportArgs {
    /// The old stack's SUT directory (`<sut>.conf`, `<sut>.yaml`, `<sut>_snappy.yaml`).
    pub dir: PathBuf,
    /// Where the SUT files and the copied triplets are written.
    #[arg(long, default_value = "sut")]
    pub out: PathBuf,
    /// The agent container image written into every SUT file.
    #[arg(long, default_value = DEFAULT_IMAGE)]
    pub image: String,
    /// Overwrite SUT files and triplet copies that already exist in `--out`.
    #[arg(long)]
    pub force: bool,
}

/// One device that was imported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    /// The SUT's name.
    pub sut: SutName,
    /// The written SUT file.
    pub toml: PathBuf,
    /// Things the user should look at (skipped env keys, ignored values, ...).
    pub warnings: Vec<String>,
}

/// One device that was not imported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    /// The device's name as found in the file names (may be an invalid SUT name).
    pub name: String,
    /// What is wrong, each naming the file concerned.
    pub problems: Vec<String>,
}

/// What an import did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImportReport {
    /// Imported devices, by name.
    pub imported: Vec<Imported>,
    /// Devices that failed, by name.
    pub failed: Vec<Failed>,
}

/// Errors that stop the whole import (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The input directory cannot be listed.
    #[error("cannot read {path}: {source}")]
    ReadDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The output directory cannot be created.
    #[error("cannot create {path}: {source}")]
    CreateOut {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// The three files of one device, as found in the directory.
#[derive(Debug, Default)]
struct Triplet {
    conf: Option<PathBuf>,
    template: Option<PathBuf>,
    snappy: Option<PathBuf>,
}

const SNAPPY_SUFFIX: &str = "_snappy.yaml";

/// Runs `labvisor import` and returns the process exit status: 0 when every device was
/// imported, 1 when one failed, 2 when the import could not run at all.
pub fn main(args: ImportArgs) -> std::process::ExitCode {
    let stdout = io::stdout();
    let stderr = io::stderr();
    match import_dir(&args.dir, &args.out, &args.image, args.force) {
        Ok(report) => {
            let _ = print_report(&report, &mut stdout.lock(), &mut stderr.lock());
            if report.failed.is_empty() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::from(1)
            }
        }
        Err(e) => {
            let _ = writeln!(stderr.lock(), "labvisor import: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Prints what was imported on `out` and what failed on `err`, then a summary on `out`.
pub fn print_report(
    report: &ImportReport,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> io::Result<()> {
    for i in &report.imported {
        writeln!(out, "imported {}: {}", i.sut, i.toml.display())?;
        for w in &i.warnings {
            writeln!(out, "  warning: {w}")?;
        }
    }
    for f in &report.failed {
        for p in &f.problems {
            writeln!(err, "labvisor import: {}: {p}", f.name)?;
        }
    }
    writeln!(
        out,
        "{} imported, {} failed",
        report.imported.len(),
        report.failed.len()
    )
}

/// Imports every device found in `dir` into `out` (created if missing).
pub fn import_dir(
    dir: &Path,
    out: &Path,
    image: &str,
    force: bool,
) -> Result<ImportReport, ImportError> {
    let read_dir = |source| ImportError::ReadDir {
        path: dir.to_path_buf(),
        source,
    };
    let mut devices: BTreeMap<String, Triplet> = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(read_dir)? {
        let path = entry.map_err(read_dir)?.path();
        let Some(file) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        if file.starts_with('.') || !path.is_file() {
            continue;
        }
        if let Some(name) = file.strip_suffix(SNAPPY_SUFFIX) {
            devices.entry(name.to_owned()).or_default().snappy = Some(path);
        } else if let Some(name) = file.strip_suffix(".conf") {
            devices.entry(name.to_owned()).or_default().conf = Some(path);
        } else if let Some(name) = file.strip_suffix(".yaml") {
            devices.entry(name.to_owned()).or_default().template = Some(path);
        }
    }
    std::fs::create_dir_all(out).map_err(|source| ImportError::CreateOut {
        path: out.to_path_buf(),
        source,
    })?;
    let mut report = ImportReport::default();
    for (name, triplet) in devices {
        if name.is_empty() {
            continue;
        }
        match import_one(&name, &triplet, out, image, force) {
            Ok(imported) => report.imported.push(imported),
            Err(problems) => report.failed.push(Failed { name, problems }),
        }
    }
    Ok(report)
}

/// A name close to `name` that is a valid SUT name, if there is one.
pub fn suggest_name(name: &str) -> Option<String> {
    let mut s: String = name
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    s = s
        .trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned();
    s.truncate(labvisor_protocol::name::MAX_NAME_LEN);
    SutName::new(&s).ok().map(|n| n.to_string())
}

/// Imports one device: reads its triplet, copies it to `out` and writes its SUT file; the
/// error lists every problem found, each naming its file.
fn import_one(
    name: &str,
    t: &Triplet,
    out: &Path,
    image: &str,
    force: bool,
) -> Result<Imported, Vec<String>> {
    let names = Names::of(name);
    let sut = SutName::new(name).map_err(|e| {
        let hint = match suggest_name(name) {
            Some(s) => format!(
                "; rename the files to {s}.conf, {s}.yaml and {s}{SNAPPY_SUFFIX} (and the queue inside them) and import again"
            ),
            None => String::new(),
        };
        format!("{name:?} is not a valid SUT name: {e}{hint}")
    });
    let device = read::device(t, &names);
    let sut = match sut {
        Ok(sut) if device.problems.is_empty() => sut,
        Ok(_) => return Err(device.problems),
        Err(p) => return Err([p].into_iter().chain(device.problems).collect()),
    };
    let toml_path = out.join(format!("{sut}.toml"));
    refuse_overwrite(&toml_path, force)?;
    copy_triplet(t, &names, out, force)?;
    write_wrapper(out, force)?;
    let token = format!("{sut}.token");
    let mut warnings = device.warnings;
    warnings.extend(write_token(out, &token)?);
    let text = render(&RenderInput {
        sut: &sut,
        image,
        files: names.all(),
        token: &token,
        server: device.server.as_deref(),
        basedir: &device.basedir,
        log_dir: device.log_dir.as_deref(),
        env: &device.env,
        timeout: device.timeout,
        output_timeout: device.output_timeout,
    });
    write_checked(&sut, &text, out, &toml_path)?;
    Ok(Imported {
        sut,
        toml: toml_path,
        warnings,
    })
}

/// Writes the job wrapper into `out`, unless the same is there; a different one is replaced
/// only with `force`.
fn write_wrapper(out: &Path, force: bool) -> Result<(), Vec<String>> {
    let path = out.join(WRAPPER);
    if std::fs::read(&path).is_ok_and(|b| b == WRAPPER_TEXT.as_bytes()) {
        return Ok(());
    }
    refuse_overwrite(&path, force)?;
    std::fs::write(&path, WRAPPER_TEXT)
        .map_err(|e| vec![format!("cannot write {}: {e}", path.display())])
}

/// Writes the placeholder credential `out/<name>` unless the file exists (never overwritten: it
/// is the user's); a warning when it still holds the placeholder.
fn write_token(out: &Path, name: &str) -> Result<Option<String>, Vec<String>> {
    let path = out.join(name);
    if !path.exists() {
        std::fs::write(&path, TOKEN_PLACEHOLDER)
            .map_err(|e| vec![format!("cannot write {}: {e}", path.display())])?;
    }
    let placeholder = std::fs::read(&path).is_ok_and(|b| b == TOKEN_PLACEHOLDER.as_bytes());
    Ok(placeholder.then(|| {
        format!(
            "{name}: put the refresh token the testflinger server gave this agent there              (the agent is refused with 403 until then)"
        )
    }))
}

/// Unless `force`, an error when `path` exists.
fn refuse_overwrite(path: &Path, force: bool) -> Result<(), Vec<String>> {
    if !force && path.exists() {
        return Err(vec![format!(
            "{} exists; pass --force to overwrite it, or another --out",
            path.display()
        )]);
    }
    Ok(())
}

/// Copies the triplet into `out` (unless it is there already).
fn copy_triplet(t: &Triplet, names: &Names, out: &Path, force: bool) -> Result<(), Vec<String>> {
    let sources = [&t.conf, &t.template, &t.snappy];
    for (src, file) in sources.into_iter().zip(names.all()) {
        let src = src
            .as_deref()
            .expect("a device with problems is not copied");
        let dst = out.join(file);
        if same_file(src, &dst) {
            continue;
        }
        refuse_overwrite(&dst, force)?;
        if let Err(e) = std::fs::copy(src, &dst) {
            return Err(vec![format!(
                "{file}: cannot copy to {}: {e}",
                dst.display()
            )]);
        }
    }
    Ok(())
}

/// Writes the SUT file `text` to `path` if it loads, and keeps it only if it loads from there
/// (with its files beside it).
fn write_checked(sut: &SutName, text: &str, out: &Path, path: &Path) -> Result<(), Vec<String>> {
    let allow = Allow::default();
    if let Err(ps) = load_str(&format!("{sut}.toml"), text, out, &allow) {
        return Err(ps
            .iter()
            .map(|p| format!("generated SUT file: {p}"))
            .collect());
    }
    if let Err(e) = std::fs::write(path, text) {
        return Err(vec![format!("cannot write {}: {e}", path.display())]);
    }
    if let Err(ps) = load_file(path, &allow) {
        let _ = std::fs::remove_file(path);
        return Err(ps.iter().map(ToString::to_string).collect());
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_are_valid_names() {
        assert_eq!(suggest_name("RPI4-01").as_deref(), Some("rpi4-01"));
        assert_eq!(suggest_name("Dell XPS.13").as_deref(), Some("dell-xps-13"));
        assert_eq!(suggest_name("_x").as_deref(), Some("x"));
        assert_eq!(suggest_name("..."), None);
    }
}
