//! `labvisor check <dir>`: validate every SUT file in a directory without touching Docker.
//!
//! Text output is one line per problem, `file: key: problem` (`file:LINE: problem` for TOML
//! syntax errors), then a summary line. `--json` prints one JSON object instead (see
//! [`CheckReport`]). The exit status is 0 when every file is valid, 1 when one is not, and 2 when
//! the directory cannot be read (see [`CheckError`]) or the command line is wrong.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use labvisor_protocol::config::{scan_dir, Allow, Problem, Runtime, Scan};
use serde::Serialize;

/// The `--allow-*` flags: which host-power settings SUT files may use. Shared by every
/// subcommand that loads SUT files (flatten it with `#[command(flatten)]`).
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct AllowArgs {
    /// Accept `privileged = true` (the container is root on the host).
    #[arg(long)]
    pub allow_privileged: bool,
    /// Accept `mounts` (host bind mounts).
    #[arg(long)]
    pub allow_host_mounts: bool,
    /// Accept `network = "host"`.
    #[arg(long)]
    pub allow_host_network: bool,
    /// Accept `devices` (host device nodes).
    #[arg(long)]
    pub allow_devices: bool,
    /// Accept `network = "<name>"` for a Docker network that is not labvisor's own. Every SUT
    /// naming it goes on that one network: it is not split past `--network-capacity` (a bridge
    /// takes at most 1023 ports; sizing it is the operator's concern).
    #[arg(long)]
    pub allow_network: bool,
    /// Accept `cap_add` (capabilities beyond the agents' default set, e.g. NET_RAW).
    #[arg(long)]
    pub allow_caps: bool,
    /// Accept `no_new_privileges = false`.
    #[arg(long)]
    pub allow_new_privileges: bool,
}

/// `--runtime`: which runtime the supervisor runs the SUTs on (`docker`, the default, or
/// `swarm`). Shared by `check` and `supervise`; what a SUT file may ask for depends on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RuntimeArg {
    /// The local Docker engine: one container per SUT.
    #[default]
    Docker,
    /// Docker Swarm (on a manager): one service per SUT; refuses `devices`, `privileged` and
    /// `[build]`.
    Swarm,
}

impl From<RuntimeArg> for Runtime {
    fn from(r: RuntimeArg) -> Self {
        match r {
            RuntimeArg::Docker => Runtime::Docker,
            RuntimeArg::Swarm => Runtime::Swarm,
        }
    }
}

impl AllowArgs {
    /// The policy these flags describe, on the local Docker runtime (see [`Allow::on`]).
    pub fn allow(&self) -> Allow {
        Allow {
            privileged: self.allow_privileged,
            host_mounts: self.allow_host_mounts,
            host_network: self.allow_host_network,
            devices: self.allow_devices,
            network: self.allow_network,
            caps: self.allow_caps,
            new_privileges: self.allow_new_privileges,
            runtime: Runtime::Docker,
        }
    }
}

/// `labvisor check` on the command line.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// The SUT directory (one `<name>.toml` per device).
    pub dir: PathBuf,
    /// Print a JSON report instead of `file: key: problem` lines.
    #[arg(long)]
    pub json: bool,
    /// The `--allow-*` flags.
    #[command(flatten)]
    pub allow: AllowArgs,
    /// Check for this runtime: `swarm` refuses `devices`, `privileged` and `[build]`.
    #[arg(long, value_enum, default_value_t)]
    pub runtime: RuntimeArg,
}

/// Runs `labvisor check` and returns the process exit status: 0 when every file is valid, 1
/// when one is not, 2 when the directory cannot be read.
pub fn main(args: &CheckArgs, out: &mut dyn Write) -> ExitCode {
    let allow = args.allow.allow().on(args.runtime.into());
    match run(&args.dir, args.json, &allow, out) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        // The reader went away (`labvisor check sut | head`): stop quietly.
        Err(CheckError::Write(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("labvisor check: {e}");
            ExitCode::from(2)
        }
    }
}

/// `check` could not do its job at all (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The directory could not be listed.
    #[error("cannot read the SUT directory {path}: {source}")]
    ReadDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The report could not be written.
    #[error("cannot write the report: {0}")]
    Write(#[from] io::Error),
}

/// One checked file in the `--json` report.
#[derive(Debug, Clone, Serialize)]
pub struct FileReport {
    /// The file's path.
    pub file: String,
    /// The SUT name, when the file name gives a valid one.
    pub sut: Option<String>,
    /// Whether the file is valid.
    pub valid: bool,
    /// The config hash of a valid file ([`labvisor_protocol::config::SutConfig::hash`]).
    pub hash: Option<String>,
    /// Every problem found (empty when valid).
    pub problems: Vec<Problem>,
}

/// The `--json` report.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// Every SUT file, sorted by path.
    pub files: Vec<FileReport>,
    /// Number of valid files.
    pub valid: usize,
    /// Number of invalid files.
    pub invalid: usize,
}

impl CheckReport {
    /// Builds the report of a scan of `dir`.
    pub fn from_scan(dir: &Path, scan: &Scan) -> Self {
        let mut files: Vec<FileReport> = scan
            .valid
            .iter()
            .map(|(name, cfg)| FileReport {
                file: Scan::path_of(dir, name).display().to_string(),
                sut: Some(name.to_string()),
                valid: true,
                hash: Some(cfg.hash()),
                problems: Vec::new(),
            })
            .chain(scan.invalid.iter().map(|(path, problems)| {
                FileReport {
                    file: path.display().to_string(),
                    sut: path
                        .file_stem()
                        .and_then(|s| s.to_str())
                        .and_then(|s| labvisor_protocol::SutName::new(s).ok())
                        .map(|n| n.to_string()),
                    valid: false,
                    hash: None,
                    problems: problems.clone(),
                }
            }))
            .collect();
        files.sort_by(|a, b| a.file.cmp(&b.file));
        Self {
            files,
            valid: scan.valid.len(),
            invalid: scan.invalid.len(),
        }
    }

    /// Whether every file is valid.
    pub fn all_valid(&self) -> bool {
        self.invalid == 0
    }
}

/// Checks `dir` and writes the report to `out`. Returns whether every file is valid.
pub fn run(dir: &Path, json: bool, allow: &Allow, out: &mut dyn Write) -> Result<bool, CheckError> {
    let scan = scan_dir(dir, allow).map_err(|source| CheckError::ReadDir {
        path: dir.to_owned(),
        source,
    })?;
    let report = CheckReport::from_scan(dir, &scan);
    if json {
        serde_json::to_writer_pretty(&mut *out, &report).map_err(io::Error::from)?;
        writeln!(out)?;
    } else {
        for file in &report.files {
            for p in &file.problems {
                writeln!(out, "{p}")?;
            }
        }
        let n = report.files.len();
        writeln!(
            out,
            "{n} file{} checked, {} invalid",
            if n == 1 { "" } else { "s" },
            report.invalid
        )?;
    }
    Ok(report.all_valid())
}
