//! # labvisor (supervisor and CLI)
//!
//! Thin command line over `labvisor_supervisor`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use labvisor_supervisor::check::{self, AllowArgs};

/// labvisor: one agent container per device under test, from one TOML file per device.
#[derive(Debug, Parser)]
#[command(name = "labvisor", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate every SUT file in a directory (exit 0: all valid, 1: some invalid, 2: error).
    Check(CheckArgs),
    /// Convert a testflinger-docker SUT directory (`<sut>.conf`, `<sut>.yaml`,
    /// `<sut>_snappy.yaml`) into SUT files (exit 0: all imported, 1: some failed, 2: error).
    Import(labvisor_supervisor::import::ImportArgs),
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// The SUT directory (one `<name>.toml` per device).
    dir: PathBuf,
    /// Print a JSON report instead of `file: key: problem` lines.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    allow: AllowArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Import(args) => labvisor_supervisor::import::main(args),
        Command::Check(args) => {
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            match check::run(&args.dir, args.json, &args.allow.allow(), &mut out) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("labvisor check: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
