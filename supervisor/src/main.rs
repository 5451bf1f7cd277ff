//! # labvisor (supervisor and CLI)
//!
//! Thin command line over `labvisor_supervisor`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use labvisor_supervisor::check::{self, AllowArgs};
use labvisor_supervisor::client::{self, BrokerArgs, ClientError, SubmitArgs};

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
    /// One line per SUT: health, state, current job, restarts, heartbeat age, supervisor.
    Status {
        #[command(flatten)]
        broker: BrokerArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Follow a SUT's live output (or one job's, with --job).
    Logs {
        /// The SUT.
        sut: String,
        /// Follow the live output (required: the history is in the SUT's log file on its volume).
        #[arg(short, long)]
        follow: bool,
        /// Only this job's output.
        #[arg(long)]
        job: Option<String>,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Submit a job; prints its id. `--wait` exits with the job's exit code, `--follow` streams
    /// its output.
    Submit {
        #[command(flatten)]
        job: SubmitArgs,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// A SUT's recent jobs.
    Jobs {
        /// The SUT.
        sut: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Cancel a queued or running job (`current` for the running one).
    Cancel {
        /// The SUT.
        sut: String,
        /// The job id, or `current`.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// How long to wait for the agent's answer.
        #[arg(long, default_value = "10s", value_parser = client::parse_duration)]
        timeout: std::time::Duration,
        #[command(flatten)]
        broker: BrokerArgs,
    },
}

/// Runs a client command on a small runtime, mapping errors to exit statuses.
fn client_main<F>(name: &str, f: impl FnOnce() -> F) -> ExitCode
where
    F: std::future::Future<Output = Result<u8, ClientError>>,
{
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("labvisor {name}: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(f()) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("labvisor {name}: {e}");
            ExitCode::from(e.exit_code())
        }
    }
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
    let stdout = std::io::stdout();
    match cli.command {
        Command::Status { broker, json } => client_main("status", || async move {
            client::status(&broker, json, &mut stdout.lock())
                .await
                .map(|()| 0)
        }),
        Command::Logs {
            sut,
            follow,
            job,
            broker,
        } => {
            if !follow {
                eprintln!("labvisor logs: MQTT carries live output only: use -f to follow it; the history is in the SUT's log file (/labvisor/data/log/<sut>.log on its volume)");
                return ExitCode::from(2);
            }
            client_main("logs", || async move {
                client::logs(&broker, &sut, job.as_deref(), &mut stdout.lock())
                    .await
                    .map(|()| 0)
            })
        }
        Command::Submit { job, broker } => client_main("submit", || async move {
            client::submit(&broker, &job, &mut stdout.lock()).await
        }),
        Command::Jobs { sut, json, broker } => client_main("jobs", || async move {
            client::jobs(&broker, &sut, json, &mut stdout.lock())
                .await
                .map(|()| 0)
        }),
        Command::Cancel {
            sut,
            id,
            json,
            timeout,
            broker,
        } => client_main("cancel", || async move {
            client::cancel(&broker, &sut, &id, json, timeout, &mut stdout.lock()).await
        }),
        Command::Check(args) => {
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
