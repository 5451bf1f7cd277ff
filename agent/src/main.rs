//! `labvisor-agent`: the entrypoint of each SUT's container (see the library docs).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use labvisor_agent::agent::{self, Control, Settings};
use labvisor_mqtt::LinkOptions;
use labvisor_protocol::config::{self, Allow};
use labvisor_protocol::topics::Topics;
use nix::sys::signal::Signal;
use tokio::signal::unix::{signal, SignalKind};

/// The labvisor agent: wraps a SUT's device process, tees its output to stdout, a rotating log
/// file and MQTT, writes heartbeats for the Docker healthcheck, and (later) runs jobs.
///
/// Exit status: 0 stopped cleanly; 1 internal error; 2 bad config or usage; 3 the device process
/// had to be killed after the grace period; 4 the device process exited under
/// `on_child_exit = "exit"`.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The SUT's config file (`<sut>.toml`); its `files` sit beside it.
    #[arg(long, env = "LABVISOR_CONFIG")]
    config: Option<PathBuf>,
    /// The SUT file's contents, when the supervisor passes them inline instead of copying the
    /// file in (SUTs without `files`). `--config` still names it (its stem is the SUT name).
    #[arg(long, env = "LABVISOR_CONFIG_TOML", hide_env_values = true)]
    config_toml: Option<String>,
    /// MQTT broker URL (`mqtt://host:1883`, `mqtts://host:8883`). Without it the agent runs
    /// without MQTT: output still reaches stdout and the log file.
    #[arg(long, env = "LABVISOR_BROKER")]
    broker: Option<String>,
    /// MQTT username.
    #[arg(long, env = "LABVISOR_MQTT_USERNAME")]
    username: Option<String>,
    /// MQTT password.
    #[arg(long, env = "LABVISOR_MQTT_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// CA certificate (PEM) for `mqtts://`.
    #[arg(long, env = "LABVISOR_MQTT_CA")]
    ca_file: Option<PathBuf>,
    /// CA certificate (PEM text, not a path) for `mqtts://`: how `labvisor supervise` hands
    /// its agents the CA of their broker. Takes precedence over --ca-file.
    #[arg(long, env = "LABVISOR_MQTT_CA_PEM", allow_hyphen_values = true)]
    ca_pem: Option<String>,
    /// Global topic prefix, so two labs can share a broker.
    #[arg(long, env = "LABVISOR_TOPIC_PREFIX")]
    topic_prefix: Option<String>,
    /// The SUT's volume: log files and the job queue.
    #[arg(long, env = "LABVISOR_DATA_DIR", default_value = "/labvisor/data")]
    data_dir: PathBuf,
    /// Where the heartbeat file is written (read by labvisor-healthcheck).
    #[arg(long, env = "LABVISOR_HEARTBEAT_FILE", default_value = labvisor_protocol::heartbeat::DEFAULT_PATH)]
    heartbeat_file: PathBuf,
    /// Grace period between TERM and KILL when stopping; keep it under Docker's stop timeout.
    #[arg(long, env = "LABVISOR_GRACE", default_value = "8s", value_parser = humantime_duration)]
    grace: Duration,
    /// Messages the MQTT link queues while the broker is slow or gone; beyond it the oldest
    /// output batch is dropped (and counted). Acknowledgements and statuses are never dropped:
    /// while this many wait, the agent takes no more submissions (the broker holds them).
    #[arg(long, env = "LABVISOR_MQTT_QUEUE", default_value_t = 1024)]
    mqtt_queue: usize,
    /// Do not copy output to stdout.
    #[arg(long)]
    no_stdout: bool,
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args = Args::parse();
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

    let Some(config_path) = args.config.clone() else {
        eprintln!("labvisor-agent: no config: pass --config FILE or set LABVISOR_CONFIG");
        return ExitCode::from(2);
    };
    // The supervisor already enforced its allow flags (and built the image); the agent runs
    // what it was given.
    let loaded = match &args.config_toml {
        Some(text) => config::load_delivered_str(&config_path, text, &Allow::all()),
        None => config::load_delivered_file(&config_path, &Allow::all()),
    };
    let config = match loaded {
        Ok(c) => c,
        Err(problems) => {
            let inline = if args.config_toml.is_some() {
                " (inline, from LABVISOR_CONFIG_TOML)"
            } else {
                ""
            };
            eprintln!(
                "labvisor-agent: invalid config {}{inline}:",
                config_path.display()
            );
            for p in problems {
                eprintln!("  {p}");
            }
            return ExitCode::from(2);
        }
    };
    let topics = match Topics::with_prefix(args.topic_prefix.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("labvisor-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let broker = match &args.broker {
        None => None,
        Some(url) => {
            let prefix = topics.prefix().replace('/', "-");
            let client_id = if prefix.is_empty() {
                format!("labvisor-agent-{}", config.name)
            } else {
                format!("labvisor-agent-{prefix}-{}", config.name)
            };
            match LinkOptions::from_url(url, client_id) {
                Ok(mut o) => {
                    if args.username.is_some() {
                        o.username = args.username.clone();
                    }
                    if args.password.is_some() {
                        o.password = args.password.clone();
                    }
                    o.queue_capacity = args.mqtt_queue.max(1);
                    if args.ca_file.is_some() {
                        o.ca_file = args.ca_file.clone();
                    }
                    o.ca_pem = args.ca_pem.clone();
                    Some(o)
                }
                Err(e) => {
                    eprintln!("labvisor-agent: --broker {url:?}: {e}");
                    return ExitCode::from(2);
                }
            }
        }
    };
    let settings = Settings {
        config,
        broker,
        topics,
        data_dir: args.data_dir,
        heartbeat_file: args.heartbeat_file,
        grace: args.grace,
        stdout: !args.no_stdout,
    };

    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("labvisor-agent: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let signals = tokio::spawn(forward_signals(tx));
        let res = agent::run(settings, rx).await;
        signals.abort();
        match res {
            Ok(outcome) => ExitCode::from(outcome.exit_code()),
            Err(e) => {
                eprintln!("labvisor-agent: {e}");
                ExitCode::from(1)
            }
        }
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
