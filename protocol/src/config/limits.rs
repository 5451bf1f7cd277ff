//! The limits and fixed names of the SUT config: sizes, durations, reserved prefixes, the
//! capabilities, and [`Allow`], which host-power settings the supervisor accepts (and on which
//! [`Runtime`]).

use std::time::Duration;

use serde::Serialize;

/// Where the `files` of a SUT appear inside its container: `files = ["a.yaml"]` becomes
/// `/labvisor/sut/a.yaml`.
pub const CONTAINER_FILES_DIR: &str = "/labvisor/sut";

/// Largest accepted file listed in `files` (1 MiB).
pub const MAX_FILE_SIZE: u64 = 1024 * 1024;

/// Largest accepted SUT file itself (1 MiB).
pub const MAX_CONFIG_SIZE: u64 = 1024 * 1024;

/// Upper bound of `job.max_payload` (8 MiB).
pub const MAX_PAYLOAD_LIMIT: u64 = 8 * 1024 * 1024;

/// Longest accepted duration (365 days): keeps every duration far from overflow when the
/// supervisor hands it to Docker in nanoseconds.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Largest accepted size (`i64::MAX` bytes, Docker's own limit type).
pub const MAX_SIZE: u64 = i64::MAX as u64;

/// Name of the shared Docker bridge network labvisor creates for its agents and broker.
pub const LABVISOR_NETWORK: &str = "labvisor";

/// Prefix of the environment variables labvisor sets itself; refused in `env`.
pub const RESERVED_ENV_PREFIX: &str = "LABVISOR_";

/// Prefix of the Docker labels labvisor sets itself; refused in `labels`.
pub const RESERVED_LABEL_PREFIX: &str = "io.labvisor.";

/// Which runtime the supervisor runs the SUTs on (`--runtime`): what a SUT file may ask for
/// depends on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// The local Docker engine: one container per SUT (the default).
    #[default]
    Docker,
    /// Docker Swarm: one service per SUT. Refuses what a Swarm service cannot do (`devices`,
    /// `privileged`) and `[build]` (the nodes cannot get an image the supervisor builds),
    /// whatever the `--allow-*` flags say.
    Swarm,
}

/// Which host-power settings the supervisor accepts, and on which runtime. All refused by
/// default, on the local Docker runtime.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Allow {
    /// Accept `privileged = true` (`--allow-privileged`).
    pub privileged: bool,
    /// Accept `mounts` (`--allow-host-mounts`).
    pub host_mounts: bool,
    /// Accept `network = "host"` (`--allow-host-network`).
    pub host_network: bool,
    /// Accept `devices` (`--allow-devices`).
    pub devices: bool,
    /// Accept `network = "<any other Docker network>"` (`--allow-network`).
    pub network: bool,
    /// Accept `cap_add` (`--allow-caps`).
    pub caps: bool,
    /// Accept `no_new_privileges = false` (`--allow-new-privileges`).
    pub new_privileges: bool,
    /// The supervisor's runtime (`--runtime`); [`Runtime::Swarm`] refuses more.
    pub runtime: Runtime,
}

impl Allow {
    /// This policy on `runtime`.
    pub fn on(self, runtime: Runtime) -> Self {
        Self { runtime, ..self }
    }

    /// Everything allowed, on the local Docker runtime.
    pub fn all() -> Self {
        Self {
            privileged: true,
            host_mounts: true,
            host_network: true,
            devices: true,
            network: true,
            caps: true,
            new_privileges: true,
            runtime: Runtime::Docker,
        }
    }
}

/// Linux capabilities `cap_add` may name (without the `CAP_` prefix).
pub const CAPABILITIES: &[&str] = &[
    "AUDIT_CONTROL",
    "AUDIT_READ",
    "AUDIT_WRITE",
    "BLOCK_SUSPEND",
    "BPF",
    "CHECKPOINT_RESTORE",
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "IPC_LOCK",
    "IPC_OWNER",
    "KILL",
    "LEASE",
    "LINUX_IMMUTABLE",
    "MAC_ADMIN",
    "MAC_OVERRIDE",
    "MKNOD",
    "NET_ADMIN",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_RAW",
    "PERFMON",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYSLOG",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_CHROOT",
    "SYS_MODULE",
    "SYS_NICE",
    "SYS_PACCT",
    "SYS_PTRACE",
    "SYS_RAWIO",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "WAKE_ALARM",
];

/// The capabilities every agent container keeps (all others are dropped): what a device agent
/// running as root needs to manage its own files and processes (Python, an ssh client, a TCP
/// serial console need nothing more). `NET_RAW` (raw and packet sockets: sniffing, ARP
/// spoofing), `MKNOD`, `SETFCAP`, `SETPCAP`, `SYS_CHROOT` and `AUDIT_WRITE`, which Docker grants
/// by default, are not kept; `cap_add` gives them back per SUT with `--allow-caps`.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "NET_BIND_SERVICE",
    "SETGID",
    "SETUID",
];

/// Default `resources.pids`: the most processes (and threads) a container may hold.
pub const DEFAULT_PIDS: u32 = 4096;
/// Smallest accepted `resources.pids`.
pub const MIN_PIDS: u32 = 16;
/// Largest accepted `resources.pids`.
pub const MAX_PIDS: u32 = 65536;
/// Smallest accepted `resources.memory` (Docker's own minimum on Engine 20.10 is 6 MiB).
pub const MIN_MEMORY: u64 = 6 * 1024 * 1024;
/// Smallest accepted `resources.cpus`.
pub const MIN_CPUS: f64 = 0.01;
/// Shortest accepted `health.heartbeat` (each beat writes the heartbeat file and may publish).
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(100);
/// Shortest accepted `health.interval` and `probe.interval` (each Docker probe is an exec).
pub const MIN_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Shortest Docker health-check interval an `auto` `health.interval` gets (a lab of up to
/// `AUTO_INTERVAL_MIN × --healthcheck-rate` SUTs: 20 at the default rate).
pub const AUTO_INTERVAL_MIN: Duration = Duration::from_secs(10);
/// Longest Docker health-check interval an `auto` `health.interval` gets.
pub const AUTO_INTERVAL_MAX: Duration = Duration::from_secs(300);

// [health_check] (helper healthjob)
/// Shortest accepted `health_check.every`: a health check is a job that takes the device from
/// the lab's own jobs. Builds with the `short-health-intervals` feature (only the agent's own
/// tests turn it on, through their dev-dependency) accept 1 s, so a test sees the interval at
/// work in seconds.
pub const MIN_HEALTH_EVERY: Duration = if cfg!(feature = "short-health-intervals") {
    Duration::from_secs(1)
} else {
    Duration::from_secs(60)
};
/// Largest accepted `health_check.after_jobs`: the agent counts the jobs since the last health
/// check in the job history its journal keeps (the latest 500 finished jobs).
pub const MAX_HEALTH_AFTER_JOBS: u32 = 500;
