//! The validated SUT config ([`SutConfig`]) and its sections: what [`super::load_file`] returns.
//! Every field holds a checked value; the serialisation is what [`SutConfig::hash`] covers.

use std::collections::BTreeMap;
use std::fmt;
use std::num::{NonZeroU32, NonZeroU64};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};
use sha2::{Digest, Sha256};

use super::units::ser_duration;
use super::{build_hash, CommandTemplate, CONTAINER_FILES_DIR, LABVISOR_NETWORK};
use crate::name::SutName;

pub use super::device::{BusyGlob, DeviceSettings, DrainSignal};
pub use super::placement::{Constraint, ConstraintKey, NodeHost, Placement};

/// A validated SUT config. Built only by [`load_file`](super::load_file), [`load_str`](super::load_str) and [`scan_dir`](super::scan_dir).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SutConfig {
    /// The SUT's name: the file stem.
    pub name: SutName,
    /// Docker image of the agent container.
    pub image: String,
    /// argv of the device's long-running process; `None` for a job-only agent.
    pub command: Option<Vec<String>>,
    /// Container environment (no `LABVISOR_*` keys).
    pub env: BTreeMap<String, String>,
    /// Files delivered into the container under [`CONTAINER_FILES_DIR`], with their contents.
    pub files: Vec<SutFile>,
    /// Absolute globs inside the container whose files are followed as job output.
    pub tail: Vec<String>,
    /// The container's network.
    pub network: Network,
    /// Extra host names in the container's `/etc/hosts` (`extra_hosts`). Left out of the
    /// serialisation (and so of the hash) when empty, so configs without it keep their hash.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extra_hosts: Vec<ExtraHost>,
    /// Extra Docker labels (no `io.labvisor.*` keys).
    pub labels: BTreeMap<String, String>,
    /// Privileged container (only if allowed).
    pub privileged: bool,
    /// Capabilities added to [`DEFAULT_CAPABILITIES`](super::DEFAULT_CAPABILITIES) (only if allowed), without `CAP_`.
    pub cap_add: Vec<String>,
    /// `no-new-privileges` (on unless allowed off).
    pub no_new_privileges: bool,
    /// Host device paths passed through (only if allowed).
    pub devices: Vec<String>,
    /// Host bind mounts (only if allowed).
    pub mounts: Vec<Mount>,
    /// Heartbeat and Docker health-check timings.
    pub health: Health,
    /// Job settings.
    pub job: JobSettings,
    /// Restart policy.
    pub restart: RestartSettings,
    /// Container resource limits.
    pub resources: Resources,
    /// Rotation of the per-SUT log file.
    pub log: LogSettings,
    /// Optional reachability probe of the device.
    pub probe: Option<Probe>,
    /// Optional image build (`[build]`); `image` is then the tag it produces. Left out of the
    /// serialisation (and so of the hash) when absent, so configs without it keep their hash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build: Option<Build>,
    /// How labvisor learns that the device process is busy with work of its own (`[device]`).
    /// Left out of the serialisation (and so of the hash) when empty, so configs without it
    /// keep their hash.
    #[serde(skip_serializing_if = "DeviceSettings::is_empty")]
    pub device: DeviceSettings,
    /// Optional health-check job (`[health_check]`, helper healthjob). Left out of the
    /// serialisation (and so of the hash) when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Where the SUT's service runs in a swarm (`[placement]`); the local runtime ignores it.
    /// In the hash (moving a SUT to another node updates its service), but left out of the
    /// serialisation when empty, so configs without it keep their hash.
    #[serde(skip_serializing_if = "Placement::is_empty")]
    pub placement: Placement,
}

impl SutConfig {
    /// SHA-256 (lower-case hex) of the canonical JSON serialisation of the whole validated config,
    /// including the contents of `files`. Formatting and comments of the TOML do not matter; any
    /// effective change does.
    pub fn hash(&self) -> String {
        let json = serde_json::to_vec(self).expect("a SutConfig always serialises to JSON");
        hex(&Sha256::digest(&json))
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A file listed in `files`, read at load time.
#[derive(Clone, PartialEq, Eq)]
pub struct SutFile {
    /// The normalised relative path (`a/b.yaml`), also its path under [`CONTAINER_FILES_DIR`].
    pub name: String,
    /// The file's contents.
    pub content: Vec<u8>,
}

impl SutFile {
    /// Where the file appears inside the container.
    pub fn container_path(&self) -> String {
        format!("{CONTAINER_FILES_DIR}/{}", self.name)
    }

    /// SHA-256 (hex) of the contents.
    pub fn sha256(&self) -> String {
        hex(&Sha256::digest(&self.content))
    }
}

impl fmt::Debug for SutFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SutFile")
            .field("name", &self.name)
            .field("size", &self.content.len())
            .finish()
    }
}

impl Serialize for SutFile {
    /// `{ "name", "size", "sha256" }`: the digest stands for the contents.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("SutFile", 3)?;
        st.serialize_field("name", &self.name)?;
        st.serialize_field("size", &self.content.len())?;
        st.serialize_field("sha256", &self.sha256())?;
        st.end()
    }
}

/// The container's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// The shared labvisor bridge network ([`LABVISOR_NETWORK`]).
    Labvisor,
    /// The host's network stack (only if allowed).
    Host,
    /// Another existing Docker network, by name.
    Named(String),
}

impl Network {
    /// The Docker network name.
    pub fn as_str(&self) -> &str {
        match self {
            Network::Labvisor => LABVISOR_NETWORK,
            Network::Host => "host",
            Network::Named(n) => n,
        }
    }
}

impl Serialize for Network {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// One entry of `extra_hosts`: a host name and what it stands for, `name:address` as Docker's
/// `HostConfig.ExtraHosts` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraHost {
    /// The host name (RFC 1123 labels, dot-separated, at most 253 characters).
    pub name: String,
    /// The address it resolves to.
    pub address: HostAddress,
}

/// What an [`ExtraHost`] resolves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostAddress {
    /// Docker's `host-gateway`: the host's address on the default bridge (Engine 20.10 and
    /// later), where a server on the lab host listens for the agents.
    HostGateway,
    /// An IPv4 or IPv6 address.
    Ip(std::net::IpAddr),
}

impl fmt::Display for HostAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostAddress::HostGateway => f.write_str(HOST_GATEWAY),
            HostAddress::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

impl fmt::Display for ExtraHost {
    /// `name:address`, Docker's form (an IPv6 address unbracketed: Docker splits at the first
    /// `:`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.address)
    }
}

impl Serialize for ExtraHost {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Docker's name for the host's address on the default bridge, in `extra_hosts`.
pub const HOST_GATEWAY: &str = "host-gateway";

/// A host bind mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mount {
    /// Absolute path on the host.
    pub source: String,
    /// Absolute path in the container.
    pub target: String,
    /// Mounted read-only (the default).
    pub read_only: bool,
}

/// Heartbeat and Docker health-check timings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Health {
    /// How often the agent writes its heartbeat.
    #[serde(serialize_with = "ser_duration")]
    pub heartbeat: Duration,
    /// A heartbeat older than this is unhealthy (> `heartbeat`).
    #[serde(serialize_with = "ser_duration")]
    pub max_age: Duration,
    /// Docker probe interval: `auto` (chosen from the lab's size when the container is made)
    /// or as written.
    pub interval: HealthInterval,
    /// Docker probe timeout (< `interval`; with `auto`, < [`AUTO_INTERVAL_MIN`](super::AUTO_INTERVAL_MIN)).
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// Failed probes before unhealthy.
    pub retries: NonZeroU32,
    /// Grace period after start.
    #[serde(serialize_with = "ser_duration")]
    pub start_period: Duration,
}

impl Health {
    /// Worst-case time from the agent's last heartbeat to Docker itself reporting the container
    /// unhealthy, when Docker probes every `interval` (the container's own, see
    /// [`HealthInterval`]): the heartbeat goes stale after `max_age`, and Docker needs `retries`
    /// failed probes, `interval` apart: `max_age + interval × retries`. The supervisor acts on
    /// a hung agent sooner, within `max_age` of its last status (its own hang detection).
    pub fn detection_time(&self, interval: Duration) -> Duration {
        self.max_age
            .saturating_add(interval.saturating_mul(self.retries.get()))
    }
}

/// `health.interval`: how often Docker probes the container.
///
/// Docker's probe is an exec (work for dockerd and containerd), and the supervisor detects a
/// hung agent itself within `max_age`, so at scale Docker's interval may be long: `auto` (the
/// default) lets the supervisor choose it from the lab's size when it creates the container
/// (`clamp(SUTs / --healthcheck-rate, 10 s, 300 s)`).
///
/// The config hash covers `auto` as the word, not the interval it stands for (a growing lab
/// recreates nothing; a container keeps the interval it was made with until it is
/// recreated). An explicit interval is hashed as written, so writing one recreates the
/// container with it. A file that does not set the key hashes differently than before `auto`
/// (when the default was `"10s"`): upgrading recreates each such container once, when idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HealthInterval {
    /// Chosen by the supervisor from the lab's size, between
    /// [`AUTO_INTERVAL_MIN`](super::AUTO_INTERVAL_MIN) and
    /// [`AUTO_INTERVAL_MAX`](super::AUTO_INTERVAL_MAX).
    #[default]
    Auto,
    /// As written (at least [`MIN_PROBE_INTERVAL`](super::MIN_PROBE_INTERVAL)).
    Every(Duration),
}

impl HealthInterval {
    /// The interval as written; `None` for `auto`.
    pub fn explicit(self) -> Option<Duration> {
        match self {
            HealthInterval::Auto => None,
            HealthInterval::Every(d) => Some(d),
        }
    }

    /// The shortest interval Docker may get: as written, or the floor of `auto`. The timeout
    /// must be shorter.
    pub fn shortest(self) -> Duration {
        self.explicit().unwrap_or(super::AUTO_INTERVAL_MIN)
    }
}

impl Serialize for HealthInterval {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            HealthInterval::Auto => s.serialize_str("auto"),
            HealthInterval::Every(d) => ser_duration(d, s),
        }
    }
}

/// Job settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobSettings {
    /// argv template run for each job.
    pub command: CommandTemplate,
    /// Name of the job template file (one of `files`).
    pub template: Option<String>,
    /// Longest a job may run.
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// Longest a job may stay silent.
    #[serde(serialize_with = "ser_duration")]
    pub output_timeout: Duration,
    /// Jobs that may wait in the queue.
    pub queue_limit: NonZeroU32,
    /// Largest accepted job submission in bytes (≤ [`MAX_PAYLOAD_LIMIT`](super::MAX_PAYLOAD_LIMIT)).
    pub max_payload: NonZeroU64,
    /// Requeue a job lost to an agent crash.
    pub requeue_lost: bool,
}

/// What the supervisor does with an unhealthy container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnhealthy {
    /// Restart it (with backoff).
    Restart,
    /// Only report it.
    None,
}

/// What the agent does when the device process exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnChildExit {
    /// Restart the process (with backoff).
    Restart,
    /// Exit the agent; the supervisor restarts the container.
    Exit,
}

/// Restart policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestartSettings {
    /// What to do with an unhealthy container.
    pub on_unhealthy: OnUnhealthy,
    /// First restart delay.
    #[serde(serialize_with = "ser_duration")]
    pub backoff_min: Duration,
    /// Longest restart delay (≥ `backoff_min`).
    #[serde(serialize_with = "ser_duration")]
    pub backoff_max: Duration,
    /// What the agent does when the device process exits.
    pub on_child_exit: OnChildExit,
    /// Quick failures in a row before the state is crash-loop.
    pub crash_loop_after: NonZeroU32,
}

/// Container resource limits.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Resources {
    /// Memory limit in bytes.
    pub memory: Option<NonZeroU64>,
    /// CPU limit (finite, ≥ [`MIN_CPUS`](super::MIN_CPUS)).
    pub cpus: Option<f64>,
    /// Most processes and threads ([`MIN_PIDS`](super::MIN_PIDS)..=[`MAX_PIDS`](super::MAX_PIDS)).
    pub pids: u32,
}

/// Rotation of the per-SUT log file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogSettings {
    /// Rotate at this size in bytes.
    pub max_size: NonZeroU64,
    /// Rotated files kept.
    pub keep: NonZeroU32,
    /// Output bytes per second published on MQTT; `None`: [`LogSettings::DEFAULT_MQTT_RATE`].
    /// Left out of the serialisation (and so of the hash) when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt_rate: Option<NonZeroU64>,
}

impl LogSettings {
    /// Default of `log.mqtt_rate`: 1 MiB/s.
    pub const DEFAULT_MQTT_RATE: u64 = 1 << 20;

    /// Output bytes per second published on MQTT.
    pub fn mqtt_rate(&self) -> u64 {
        self.mqtt_rate
            .map_or(Self::DEFAULT_MQTT_RATE, NonZeroU64::get)
    }
}

/// The probe of the device (`[probe]`): a reachability check of a URL, or an exec probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Probe {
    /// What the probe does. Serialised as the key `url` or `command` (flattened), so a URL
    /// probe keeps the hash it had before exec probes existed.
    #[serde(flatten)]
    pub check: ProbeCheck,
    /// How often.
    #[serde(serialize_with = "ser_duration")]
    pub interval: Duration,
    /// Timeout of one probe (< `interval`).
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
}

/// What a [`Probe`] does: exactly one of `probe.url` and `probe.command`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeCheck {
    /// `probe.url`: connect or GET; the result is retained on `<sut>/probe` and does not
    /// change the SUT's health.
    Url(ProbeTarget),
    /// `probe.command`: an argv (non-empty, the program non-empty, no NUL) the agent runs
    /// inside the container; a non-zero exit or a timeout makes the SUT unhealthy, with the
    /// command's last output lines and exit status as the reason.
    Command(Vec<String>),
}

/// The `[build]` section: how the SUT's image is built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Build {
    /// The context directory, normalised, relative to the sut directory.
    pub context: String,
    /// The Dockerfile, normalised, relative to the context.
    pub dockerfile: String,
    /// Build args.
    pub args: BTreeMap<String, String>,
    /// [`context_hash`](super::context_hash) of the context when the config was loaded.
    pub context_hash: String,
    /// The context directory, resolved (absolute, symlinks resolved); not part of the hash, so
    /// moving the whole sut directory rebuilds nothing.
    #[serde(skip)]
    pub context_dir: PathBuf,
}

impl Build {
    /// The build hash ([`build_hash`]) of this build as loaded: the image label that says the
    /// image is up to date.
    pub fn hash(&self) -> String {
        build_hash(&self.context_hash, &self.dockerfile, &self.args)
    }
}

/// What a [`Probe`] connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeTarget {
    /// Open a TCP connection (`tcp://host:port`).
    Tcp {
        /// Host name or address (IPv6 in brackets).
        host: String,
        /// Port, never 0.
        port: u16,
    },
    /// An HTTP(S) GET that must answer (`http://…`, `https://…`).
    Http {
        /// The full URL.
        url: String,
    },
}

impl fmt::Display for ProbeTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeTarget::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            ProbeTarget::Http { url } => f.write_str(url),
        }
    }
}

impl Serialize for ProbeTarget {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The `[health_check]` section: a job the agent runs on its own, every `every` and/or after
/// `after_jobs` jobs; when it fails, the SUT goes offline with its reason. It holds at least one
/// of the two triggers: [`HealthCheck::new`] refuses neither.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    job: String,
    #[serde(serialize_with = "ser_opt_duration")]
    every: Option<Duration>,
    after_jobs: Option<NonZeroU32>,
    #[serde(serialize_with = "ser_duration")]
    timeout: Duration,
}

impl HealthCheck {
    /// A health check running the file `job` (one of the SUT's `files`, normalised), limited to
    /// `timeout`; `None` when neither `every` nor `after_jobs` says when it runs.
    pub fn new(
        job: String,
        every: Option<Duration>,
        after_jobs: Option<NonZeroU32>,
        timeout: Duration,
    ) -> Option<Self> {
        (every.is_some() || after_jobs.is_some()).then_some(Self {
            job,
            every,
            after_jobs,
            timeout,
        })
    }

    /// The job file: one of the SUT's `files` (normalised name). Its content is the job, as a
    /// submission would carry it (a script, or a JSON job).
    pub fn job(&self) -> &str {
        &self.job
    }

    /// Runs when this long has passed since the last health check ended.
    pub fn every(&self) -> Option<Duration> {
        self.every
    }

    /// Runs when this many jobs have run since the last health check.
    pub fn after_jobs(&self) -> Option<NonZeroU32> {
        self.after_jobs
    }

    /// The health check's time limit; it ends `timeout` (a failure) beyond it.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

fn ser_opt_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_duration(d, s),
        None => s.serialize_none(),
    }
}
