//! The flags of `labvisor supervise` (clap), with their value parsers.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use labvisor_supervisor::cli::check::{AllowArgs, RuntimeArg};

#[derive(Debug, clap::Args)]
pub(crate) struct SuperviseArgs {
    /// The SUT directory (one `<name>.toml` per device), watched for changes.
    #[arg(long, env = "LABVISOR_SUT_DIR")]
    pub(crate) sut_dir: PathBuf,
    /// The MQTT broker (`mqtt://host:1883`). Without it (and without --agent-broker),
    /// labvisor runs a managed mosquitto: anonymous on 127.0.0.1 for local tools, and with a
    /// password on the labvisor network's gateway for the agents. `none`: no MQTT at all.
    #[arg(long, env = "LABVISOR_BROKER")]
    pub(crate) broker: Option<String>,
    /// Port of the managed broker.
    #[arg(long, env = "LABVISOR_BROKER_PORT", default_value_t = 1883)]
    pub(crate) broker_port: u16,
    /// The managed broker's listener for agents (on the labvisor network's gateway, same port)
    /// speaks only TLS: the supervisor makes its own CA (kept in the state directory, key 0600)
    /// and a server certificate for the gateway's address, gives the agents the CA and an
    /// `mqtts://` URL. Plain MQTT then stays on 127.0.0.1 only, for local tools.
    #[arg(long, env = "LABVISOR_AGENT_TLS")]
    pub(crate) agent_tls: bool,
    /// CA certificate (PEM file) of an external `mqtts://` broker: trusted by the supervisor's
    /// own link and given to the agents (as `LABVISOR_MQTT_CA_PEM`).
    #[arg(long, env = "LABVISOR_MQTT_CA")]
    pub(crate) mqtt_ca: Option<PathBuf>,
    /// A directory of per-SUT MQTT passwords (`<dir>/<sut>`, as `mosquitto/passwd.sh` writes
    /// them in mosquitto/secrets/): each agent logs in as its own SUT, which the shipped ACL
    /// confines to `<sut>/#`. Without it, agents get --mqtt-username/--mqtt-password.
    #[arg(long, env = "LABVISOR_AGENT_CREDENTIALS")]
    pub(crate) agent_credentials: Option<PathBuf>,
    /// Where the managed broker keeps its config, password and persistence.
    #[arg(long, env = "LABVISOR_STATE_DIR")]
    pub(crate) state_dir: Option<PathBuf>,
    /// The broker URL as agents see it from their containers, or `none` (agents run without
    /// MQTT). Default: `--broker`. On the labvisor bridge network, use the bridge gateway's
    /// address (the broker must listen there); with `network = "host"`, loopback works.
    #[arg(long, env = "LABVISOR_AGENT_BROKER")]
    pub(crate) agent_broker: Option<String>,
    /// This supervisor's id: owner label of its containers and its status topic.
    #[arg(long, env = "LABVISOR_ID", default_value = "labvisor")]
    pub(crate) id: String,
    /// Prefix of container, volume and network names.
    #[arg(long, env = "LABVISOR_NAME_PREFIX", default_value = "")]
    pub(crate) name_prefix: String,
    /// Global MQTT topic prefix (also given to agents).
    #[arg(long, env = "LABVISOR_TOPIC_PREFIX")]
    pub(crate) topic_prefix: Option<String>,
    /// MQTT user name (also given to agents).
    #[arg(long, env = "LABVISOR_MQTT_USERNAME")]
    pub(crate) mqtt_username: Option<String>,
    /// MQTT password (also given to agents).
    #[arg(long, env = "LABVISOR_MQTT_PASSWORD", hide_env_values = true)]
    pub(crate) mqtt_password: Option<String>,
    /// Poll the directory instead of watching it with inotify (NFS, FUSE, 9p and other mounts
    /// where inotify never fires): `--poll` every second, `--poll=5s` every 5 s (at least
    /// 100ms). Each poll reads the SUT files to compare their contents.
    #[arg(long, value_name = "INTERVAL", num_args = 0..=1, require_equals = true,
          default_missing_value = "1s", value_parser = poll_interval)]
    pub(crate) poll: Option<Duration>,
    /// Longest wait for a busy agent's job before recreating or removing its container anyway.
    #[arg(long, default_value = "4h")]
    pub(crate) busy_wait: humantime::Duration,
    /// Period of the full resync.
    #[arg(long, default_value = "30s")]
    pub(crate) resync: humantime::Duration,
    /// How often the supervisor's status is republished when nothing changed, so that
    /// `labvisor status` can tell a live supervisor from a gone one (at least 1s).
    #[arg(long, default_value = "30s", value_parser = status_interval)]
    pub(crate) status_interval: Duration,
    /// Grace period of stop and restart before the container is killed (longer than the
    /// agent's own grace, 8 s).
    #[arg(long, default_value = "10s")]
    pub(crate) stop_timeout: humantime::Duration,
    /// Container actions running at once.
    #[arg(long, default_value_t = 6)]
    pub(crate) parallelism: usize,
    /// The most agent containers put on one of labvisor's networks: past it, new ones go on
    /// `labvisor.net.2`, `.3`, … (a Linux bridge takes at most 1023 ports). Not for SUTs on a
    /// named network (`--allow-network`), which stay on it.
    #[arg(long, env = "LABVISOR_NETWORK_CAPACITY", default_value_t = labvisor_supervisor::plan::networks::DEFAULT_CAPACITY,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub(crate) network_capacity: usize,
    /// Docker health-check execs per second across the lab (above 0), from which an `auto`
    /// `health.interval` is chosen when a container is created: SUTs / rate seconds, 10 s to
    /// 300 s. The supervisor itself acts on a hung agent within `health.max_age`.
    #[arg(long, env = "LABVISOR_HEALTHCHECK_RATE", default_value = "2")]
    pub(crate) healthcheck_rate: labvisor_supervisor::plan::hang::HealthcheckRate,
    /// Remove a SUT's volume with its container when its file is deleted.
    #[arg(long)]
    pub(crate) purge_volumes: bool,
    /// A label `KEY=VALUE` put on every container, volume and network created (repeatable).
    #[arg(long = "extra-label", value_parser = key_value)]
    pub(crate) extra_labels: Vec<(String, String)>,
    /// The static agent binary. Default: `labvisor-agent` next to this executable, then in
    /// `target/x86_64-unknown-linux-gnu/release/`.
    #[arg(long, env = "LABVISOR_AGENT_BIN")]
    pub(crate) agent_bin: Option<PathBuf>,
    /// The static healthcheck binary (same defaults, `labvisor-healthcheck`).
    #[arg(long, env = "LABVISOR_HEALTHCHECK_BIN")]
    pub(crate) healthcheck_bin: Option<PathBuf>,
    /// Where to serve Prometheus `/metrics` and `/healthz` (`IP:PORT`; `0.0.0.0:9464` in a
    /// container), or `none`. Default: 127.0.0.1:9464, skipped with a warning when taken.
    #[arg(long, env = "LABVISOR_METRICS_LISTEN")]
    pub(crate) metrics_listen: Option<String>,
    #[command(flatten)]
    pub(crate) allow: AllowArgs,
    /// The runtime: `docker` (the local engine, one container per SUT) or `swarm` (a swarm
    /// manager's engine, one service per SUT; refuses `devices`, `privileged` and `[build]`).
    #[arg(long, env = "LABVISOR_RUNTIME", value_enum, default_value_t)]
    pub(crate) runtime: RuntimeArg,
    /// The static boot binary the Swarm runtime delivers with the agent (same defaults,
    /// `labvisor-boot`); unused by the local runtime.
    #[arg(long, env = "LABVISOR_BOOT_BIN")]
    pub(crate) boot_bin: Option<PathBuf>,
    /// Under `--runtime swarm` with the managed broker: the address of this host that every
    /// node reaches, where the broker's agent listener listens and which agents are given
    /// (the local runtime uses its network's gateway instead).
    #[arg(long, env = "LABVISOR_AGENT_LISTEN")]
    pub(crate) agent_listen: Option<std::net::Ipv4Addr>,
}

/// A `--poll` interval: at least 100ms.
fn poll_interval(s: &str) -> anyhow::Result<Duration> {
    let d = *s.parse::<humantime::Duration>()?;
    if d < Duration::from_millis(100) {
        bail!("{s:?} is shorter than 100ms");
    }
    Ok(d)
}

/// A `--status-interval`: at least 1s.
fn status_interval(s: &str) -> anyhow::Result<Duration> {
    let d = *s.parse::<humantime::Duration>()?;
    if d < Duration::from_secs(1) {
        bail!("{s:?} is shorter than 1s");
    }
    Ok(d)
}

fn key_value(s: &str) -> anyhow::Result<(String, String)> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => bail!("{s:?} is not KEY=VALUE"),
    }
}
