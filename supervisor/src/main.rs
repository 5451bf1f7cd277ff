//! # labvisor (supervisor and CLI)
//!
//! Thin command line over `labvisor_supervisor`: the clap definitions, `supervise`'s wiring
//! (flags to [`Settings`], the managed broker, the runtime), and a dispatch to
//! `labvisor_supervisor::cli` for every other command.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use labvisor_mqtt::LinkOptions;
use labvisor_protocol::config::Runtime;
use labvisor_protocol::payloads::AdminMode;
use labvisor_protocol::topics::{SupervisorId, Topics};
use labvisor_supervisor::broker::tls::AgentTls;
use labvisor_supervisor::broker::{self, ManagedBroker};
use labvisor_supervisor::cli::check;
use labvisor_supervisor::cli::submit::SubmitArgs;
use labvisor_supervisor::cli::{self, healthz, import, BrokerArgs};
use labvisor_supervisor::metrics::{self, Listen};
use labvisor_supervisor::runtime::{DockerRuntime, SwarmRuntime};
use labvisor_supervisor::spec::{self, SpecContext, Tools};
use labvisor_supervisor::supervise::{self, Settings};

mod supervise_args;
use supervise_args::SuperviseArgs;

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
    Check(check::CheckArgs),
    /// A summary line, then one line per SUT (problems first): health, state, current job,
    /// restarts, heartbeat age, supervisor; then one per supervisor.
    Status {
        #[command(flatten)]
        broker: BrokerArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Only the summary and the SUTs and supervisors with a problem (exit 1 when there is
        /// one, 0 when none).
        #[arg(long)]
        problems: bool,
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
        #[arg(long, default_value = "10s")]
        timeout: humantime::Duration,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// A rolling restart (for upgrades): recreate the SUTs' containers one at a time, each
    /// when its agent is idle, the next once the new one is healthy.
    Restart(cli::restart::RestartArgs),
    // -- lab operations (helper admin) --
    /// Put a SUT offline: new jobs are refused with the reason, the running job finishes,
    /// queued jobs wait; it stays offline across restarts until `labvisor online`.
    Offline(cli::admin::AdminArgs),
    /// Put a SUT online again: it takes jobs and runs the queued ones (after maintenance, its
    /// device process starts again).
    Online(cli::admin::AdminArgs),
    /// Offline, and the SUT's device process is stopped until `labvisor online` (drained with
    /// `device.drain_signal`: its current work finishes; else TERM, grace, KILL).
    Maintenance(cli::admin::AdminArgs),
    /// Keep one agent container per valid SUT file, live, through the Docker API.
    Supervise(Box<SuperviseArgs>),
    /// Probe a supervisor's /healthz (exit 0: healthy, 1: not, or no answer): the healthcheck
    /// of the FROM-scratch supervisor image.
    Healthz(healthz::HealthzArgs),
    /// Convert a testflinger-docker SUT directory (`<sut>.conf`, `<sut>.yaml`,
    /// `<sut>_snappy.yaml`) into SUT files (exit 0: all imported, 1: some failed, 2: error).
    Import(import::ImportArgs),
}

/// Finds a static binary: the flag, next to this executable, then the static build's output.
fn find_bin(flag: Option<PathBuf>, name: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p);
    }
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        candidates.push(dir.join(name));
        candidates.push(dir.join("../x86_64-unknown-linux-gnu/release").join(name));
    }
    candidates.push(Path::new("target/x86_64-unknown-linux-gnu/release").join(name));
    // A dynamically linked build (target/release) would not run inside a busybox or scratch
    // image: only a static one will do.
    let found: Vec<PathBuf> = candidates.into_iter().filter(|p| p.is_file()).collect();
    if let Some(p) = found.iter().find(|p| spec::is_static_elf(p)) {
        return Ok(p.clone());
    }
    match found.first() {
        Some(p) => bail!(
            "{} is dynamically linked and would not run in the agents' images: build the static one with `cargo static` (tools/build-static.sh) or pass its path",
            p.display()
        ),
        None => bail!("cannot find {name}: pass its path, or build it with `cargo static`"),
    }
}

fn supervise(args: SuperviseArgs) -> anyhow::Result<()> {
    let id = SupervisorId::new(&args.id).with_context(|| format!("--id {:?}", args.id))?;
    let managed = (args.broker.is_none() && args.agent_broker.is_none()).then(|| ManagedArgs {
        state_dir: args
            .state_dir
            .clone()
            .unwrap_or_else(broker::default_state_dir),
        port: args.broker_port,
        agent_tls: args.agent_tls,
        listen: args.agent_listen,
    });
    let swarm = Runtime::from(args.runtime) == Runtime::Swarm;
    if swarm && managed.as_ref().is_some_and(|m| m.listen.is_none()) {
        bail!("--runtime swarm with the managed broker needs --agent-listen IP: an address of this host that every swarm node reaches (agents on other hosts cannot use a local bridge's gateway); or give an external broker with --broker and --agent-broker");
    }
    if !swarm && args.agent_listen.is_some() {
        bail!("--agent-listen is for --runtime swarm; the local runtime's broker listens on its network's gateway");
    }
    let settings = settings(args, &id, managed.is_some())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_supervisor(settings, id, managed))
}

/// The flags of `supervise` as the reconcile loop's [`Settings`] (before a managed broker, if
/// any, fills in its part).
fn settings(args: SuperviseArgs, id: &SupervisorId, managed: bool) -> anyhow::Result<Settings> {
    let topics = Topics::with_prefix(args.topic_prefix.as_deref())?;
    let agent_bin = find_bin(args.agent_bin.clone(), "labvisor-agent")?;
    let healthcheck_bin = find_bin(args.healthcheck_bin.clone(), "labvisor-healthcheck")?;
    if args.agent_tls && !managed {
        bail!("--agent-tls is for the managed broker (no --broker, no --agent-broker); for an external broker, give agents an mqtts:// --agent-broker and its CA with --mqtt-ca");
    }
    let read = |p: &Path| {
        std::fs::read(p)
            .map(bytes::Bytes::from)
            .with_context(|| format!("cannot read {}", p.display()))
    };
    let mqtt_ca = mqtt_ca(&args)?;
    let broker = args.broker.clone().filter(|b| b != "none");
    let mqtt = match &broker {
        Some(url) => Some(external_link(&args, url, id, mqtt_ca.is_some())?),
        None => None,
    };
    let agent_broker = agent_broker(args.agent_broker.as_deref(), broker)?;
    if !args.sut_dir.is_dir() {
        bail!("--sut-dir {} is not a directory", args.sut_dir.display());
    }
    let metrics_listen = metrics_listen(args.metrics_listen.as_deref())?;
    let tools = tools(&args, read(&agent_bin)?, read(&healthcheck_bin)?)?;
    Ok(Settings {
        sut_dir: args.sut_dir,
        allow: args.allow.allow().on(args.runtime.into()),
        spec: SpecContext {
            supervisor: id.clone(),
            name_prefix: args.name_prefix,
            extra_labels: args.extra_labels.into_iter().collect(),
            agent_broker,
            topic_prefix: args.topic_prefix,
            mqtt_username: args.mqtt_username,
            mqtt_password: args.mqtt_password,
            agent_credentials: args.agent_credentials,
            tools,
            agent_ca: mqtt_ca,
        },
        topics,
        mqtt,
        busy_wait: args.busy_wait.into(),
        resync: args.resync.into(),
        stop_timeout: args.stop_timeout.into(),
        parallelism: args.parallelism,
        network_capacity: args.network_capacity,
        purge_volumes: args.purge_volumes,
        poll: args.poll,
        metrics_listen,
        logins: None,
        managed_broker: None,
        status_every: args.status_interval,
        healthcheck_rate: args.healthcheck_rate,
    })
}

/// The agent binaries; under `--runtime swarm` with the boot binary that joins the agent's
/// parts on each node.
fn tools(args: &SuperviseArgs, agent: bytes::Bytes, hc: bytes::Bytes) -> anyhow::Result<Tools> {
    let tools = Tools::new(agent, hc);
    if Runtime::from(args.runtime) != Runtime::Swarm {
        return Ok(tools);
    }
    let boot = find_bin(args.boot_bin.clone(), "labvisor-boot")?;
    let bytes = std::fs::read(&boot).with_context(|| format!("cannot read {}", boot.display()))?;
    Ok(tools.with_boot(bytes.into()))
}

/// `--mqtt-ca`'s PEM, unless the managed broker's own CA replaces it (`--agent-tls`).
fn mqtt_ca(args: &SuperviseArgs) -> anyhow::Result<Option<String>> {
    match &args.mqtt_ca {
        Some(_) if args.agent_tls => {
            tracing::warn!("--mqtt-ca is ignored under --agent-tls: the managed broker's agents trust its own CA.");
            Ok(None)
        }
        Some(p) => Ok(Some(
            std::fs::read_to_string(p).with_context(|| format!("--mqtt-ca {}", p.display()))?,
        )),
        None => Ok(None),
    }
}

/// The supervisor's own link to an external broker at `url`.
fn external_link(
    args: &SuperviseArgs,
    url: &str,
    id: &SupervisorId,
    with_ca: bool,
) -> anyhow::Result<LinkOptions> {
    let mut o = LinkOptions::from_url(url, format!("labvisor-supervisor-{id}"))
        .with_context(|| format!("--broker {url:?}"))?;
    if args.mqtt_username.is_some() {
        o.username = args.mqtt_username.clone();
    }
    if args.mqtt_password.is_some() {
        o.password = args.mqtt_password.clone();
    }
    if with_ca {
        o.ca_file = args.mqtt_ca.clone();
    }
    Ok(o)
}

/// The broker URL given to agents: `--agent-broker` (`none`: no MQTT), else `broker`. Warns
/// when it is a loopback address, which agents on a bridge network cannot reach.
fn agent_broker(flag: Option<&str>, broker: Option<String>) -> anyhow::Result<Option<String>> {
    let agent_broker = match flag {
        Some("none") => None,
        Some(url) => {
            LinkOptions::from_url(url, "check")
                .with_context(|| format!("--agent-broker {url:?}"))?;
            Some(url.to_owned())
        }
        None => broker,
    };
    if let Some(url) = &agent_broker {
        let host = LinkOptions::from_url(url, "check")
            .map(|o| o.host)
            .unwrap_or_default();
        if host == "localhost" || host.starts_with("127.") || host == "::1" {
            tracing::warn!(broker = %url, "Agents on a bridge network cannot reach a loopback broker: pass --agent-broker with the bridge gateway's address (or a routable name), or use network = \"host\".");
        }
    }
    Ok(agent_broker)
}

/// `--metrics-listen`: `none`, an address (required), or the default (skipped when taken).
fn metrics_listen(flag: Option<&str>) -> anyhow::Result<Option<Listen>> {
    if flag == Some("none") {
        return Ok(None);
    }
    let a = flag.unwrap_or(metrics::DEFAULT_LISTEN);
    Ok(Some(Listen {
        addr: a
            .parse()
            .with_context(|| format!("--metrics-listen {a:?}: expected IP:PORT or none"))?,
        required: flag.is_some(),
    }))
}

/// What the managed broker needs from the flags.
struct ManagedArgs {
    state_dir: PathBuf,
    port: u16,
    agent_tls: bool,
    /// `--agent-listen` (Swarm): where the agents' listener listens.
    listen: Option<std::net::Ipv4Addr>,
}

/// Runs the reconcile loop until SIGTERM or SIGINT, with the managed broker if any.
async fn run_supervisor(
    mut settings: Settings,
    id: SupervisorId,
    managed: Option<ManagedArgs>,
) -> anyhow::Result<()> {
    // Before anything is started: a SIGTERM while the supervisor is still starting, its
    // managed broker already running, must be a clean stop (the loop sees it at once and the
    // broker is stopped after it), not the default action, which would leave mosquitto behind.
    let shutdown = shutdown_signal().context("the supervisor cannot handle SIGTERM and SIGINT")?;
    if settings.allow.runtime == Runtime::Swarm {
        let runtime = Arc::new(
            SwarmRuntime::connect(
                id.as_str(),
                &settings.spec.name_prefix,
                &settings.spec.tools,
                settings.stop_timeout,
            )
            .await?,
        );
        let managed_broker = match managed {
            Some(m) => {
                let listen = m.listen.context("--agent-listen")?;
                Some(start_managed_broker(&mut settings, listen.into(), &id, &m)?)
            }
            None => None,
        };
        return finish(
            supervise::run(settings, runtime, shutdown).await,
            managed_broker,
        )
        .await;
    }
    let runtime = Arc::new(DockerRuntime::connect(id.as_str()).await?);
    let managed_broker = match managed {
        Some(m) => {
            // Agents on every agent network reach this gateway (ARCHITECTURE.md, broker section).
            let net = settings.spec.agent_network(1);
            let gateway = runtime
                .network_gateway(&net)
                .await
                .with_context(|| format!("the managed broker listens on the gateway of the {} network, which cannot be created or inspected", net.name))?
                .with_context(|| format!("the {} network has no IPv4 gateway", net.name))?;
            Some(start_managed_broker(&mut settings, gateway, &id, &m)?)
        }
        None => None,
    };
    finish(
        supervise::run(settings, runtime, shutdown).await,
        managed_broker,
    )
    .await
}

/// After the supervisor's last publications: stops the managed broker (SIGTERM, so mosquitto
/// saves its state), then returns the loop's result.
async fn finish(
    result: Result<(), supervise::SuperviseError>,
    managed_broker: Option<ManagedBroker>,
) -> anyhow::Result<()> {
    if let Some(mut b) = managed_broker {
        let _ = tokio::task::spawn_blocking(move || b.stop()).await;
    }
    result?;
    Ok(())
}

/// Starts mosquitto with its agents' listener on `gateway` (the labvisor network's gateway,
/// or `--agent-listen` under Swarm) and points the supervisor and the agents at it.
fn start_managed_broker(
    settings: &mut Settings,
    gateway: std::net::IpAddr,
    id: &SupervisorId,
    m: &ManagedArgs,
) -> anyhow::Result<ManagedBroker> {
    let tls = match m.agent_tls {
        true => Some(AgentTls::prepare(&m.state_dir, gateway)?),
        false => None,
    };
    let b = ManagedBroker::start(
        &m.state_dir,
        m.port,
        gateway,
        &settings.topics,
        tls.as_ref(),
    )?;
    if let Some(t) = &tls {
        tracing::info!(ca = %t.ca_file.display(), "The agents' listener speaks TLS only, with the managed broker's own CA.");
    }
    tracing::info!(broker = %b.local_url, agents = %b.agent_url, state_dir = %b.dir().display(),
        "Managed mosquitto running. Try `labvisor status`, or `mosquitto_sub -h 127.0.0.1 -p {} -u {} -P \"$(cat {})\" -t '#' -v`.",
        m.port, broker::LOCAL_USER, b.dir().join(broker::LOCAL_PASSWORD_FILE).display());
    let mut opts = LinkOptions::from_url(&b.local_url, format!("labvisor-supervisor-{id}"))?;
    opts.username = Some(b.supervisor_login.0.clone());
    opts.password = Some(b.supervisor_login.1.clone());
    settings.mqtt = Some(opts);
    settings.spec.agent_broker = Some(b.agent_url.clone());
    settings.spec.agent_ca = b.agent_ca_pem.clone();
    if settings.spec.agent_credentials.is_some() {
        tracing::warn!("--agent-credentials is for an external broker; the managed broker makes a login per SUT itself.");
    }
    // Each agent logs in as its SUT, with a password made when its container is first
    // created, and may use only its own topics.
    settings.spec.agent_credentials = Some(b.logins.dir().to_path_buf());
    settings.logins = Some(b.logins.clone());
    settings.managed_broker = Some(b.status.clone());
    Ok(b)
}

/// Takes over SIGTERM and SIGINT now (from here on neither ends the process by itself) and
/// returns what resolves on the first of them, also one that arrived before it is polled.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// `labvisor supervise`: logs on stderr (`LABVISOR_LOG`, default `info`), exit 2 on an error.
fn supervise_main(args: SuperviseArgs) -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LABVISOR_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    match supervise(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("labvisor supervise: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let stdout = std::io::stdout();
    match cli.command {
        Command::Status {
            broker,
            json,
            problems,
        } => cli::run_client("status", || async move {
            let show = cli::status::Show {
                json,
                problems_only: problems,
            };
            cli::status::status(&broker, show, &mut stdout.lock()).await
        }),
        Command::Logs {
            sut,
            follow,
            job,
            broker,
        } => {
            if !follow {
                eprintln!("labvisor logs: {}", cli::logs::FOLLOW_ONLY);
                return ExitCode::from(2);
            }
            cli::run_client("logs", || async move {
                let job = job.as_deref();
                cli::logs::logs(&broker, &sut, job, &mut stdout.lock())
                    .await
                    .map(|()| 0)
            })
        }
        Command::Submit { job, broker } => cli::run_client("submit", || async move {
            cli::submit::submit(&broker, &job, &mut stdout.lock()).await
        }),
        Command::Jobs { sut, json, broker } => cli::run_client("jobs", || async move {
            cli::jobs::jobs(&broker, &sut, json, &mut stdout.lock())
                .await
                .map(|()| 0)
        }),
        Command::Cancel {
            sut,
            id,
            json,
            timeout,
            broker,
        } => cli::run_client("cancel", || async move {
            cli::cancel::cancel(&broker, &sut, &id, json, *timeout, &mut stdout.lock()).await
        }),
        Command::Restart(args) => cli::run_client("restart", || async move {
            cli::restart::restart(&args, &mut stdout.lock()).await
        }),
        Command::Offline(a) => admin_main(AdminMode::Offline, a),
        Command::Online(a) => admin_main(AdminMode::Online, a),
        Command::Maintenance(a) => admin_main(AdminMode::Maintenance, a),
        Command::Supervise(args) => supervise_main(*args),
        Command::Import(args) => import::main(args),
        Command::Healthz(args) => healthz::run(&args, &mut stdout.lock()),
        Command::Check(args) => check::main(&args, &mut stdout.lock()),
    }
}

/// `labvisor offline|online|maintenance`.
fn admin_main(mode: AdminMode, args: cli::admin::AdminArgs) -> ExitCode {
    cli::run_client(mode.as_str(), || async move {
        cli::admin::admin(mode, &args, &mut std::io::stdout().lock()).await
    })
}
