//! `labvisor-agent`: the entrypoint of each SUT's container (see the library docs).

mod cli;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use labvisor_agent::agent::{self, Control, Outcome, Settings};
use nix::sys::signal::Signal;
use tokio::signal::unix::{signal, SignalKind};

fn main() -> ExitCode {
    let args = cli::Args::parse();
    // Colour only on a terminal: `docker logs` (and any pipe or file) gets plain text.
    let ansi = std::io::stdout().is_terminal() && std::io::stderr().is_terminal();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LABVISOR_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Some(command) = &args.command {
        return match args.run_command(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("labvisor-agent: {e}");
                ExitCode::from(1)
            }
        };
    }
    let settings = match args.settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("labvisor-agent: {e}");
            return ExitCode::from(2);
        }
    };
    match serve(settings) {
        Ok(outcome) => ExitCode::from(outcome.exit_code()),
        Err(e) => {
            eprintln!("labvisor-agent: {e}");
            ExitCode::from(1)
        }
    }
}

/// Runs the agent on its runtime, with the process's signals as its controls.
fn serve(settings: Settings) -> anyhow::Result<Outcome> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the runtime: {e}"))?;
    rt.block_on(async move {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let signals = tokio::spawn(forward_signals(tx));
        let res = agent::run(settings, rx).await;
        signals.abort();
        Ok(res?)
    })
}

/// SIGTERM and SIGINT stop the agent; SIGUSR1 and SIGHUP go to the device process's group.
async fn forward_signals(tx: tokio::sync::mpsc::Sender<Control>) {
    let (Ok(mut term), Ok(mut int), Ok(mut usr1), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::user_defined1()),
        signal(SignalKind::hangup()),
    ) else {
        return;
    };
    loop {
        let ctl = tokio::select! {
            _ = term.recv() => Control::Stop,
            _ = int.recv() => Control::Stop,
            _ = usr1.recv() => Control::Forward(Signal::SIGUSR1),
            _ = hup.recv() => Control::Forward(Signal::SIGHUP),
        };
        if tx.send(ctl).await.is_err() {
            return;
        }
    }
}
