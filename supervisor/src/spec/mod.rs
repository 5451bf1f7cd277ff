//! What an agent container looks like: the Docker create request and the files copied into it.
//!
//! This module holds the names, labels and types; [`container_spec`] builds the create request
//! in named steps (`container.rs`) and [`archive`] the tar archives uploaded into containers
//! (`archive.rs`).
//!
//! Pure functions of a validated [`SutConfig`], its file's bytes and the supervisor's settings
//! ([`SpecContext`]); the [`crate::runtime`] carries them out.
//!
//! # The container contract
//!
//! - Name `[--name-prefix]<sut>`, hostname `<sut>` (not with `network = "host"`), the SUT's image.
//! - Entrypoint `/labvisor/bin/labvisor-agent`, no cmd. Healthcheck in exec form
//!   `["CMD", "/labvisor/bin/labvisor-healthcheck"]` with the `[health]` timings, in
//!   nanoseconds as the Docker API wants them.
//! - Names: every Docker object labvisor names, other than an agent container, is
//!   `[--name-prefix]labvisor.<kind>.…`. A SUT name has no `.`, so no SUT can produce the name
//!   of another kind of object (its volume is `labvisor.sut.<sut>`, the tools volume
//!   `labvisor.tools.<id>.<hash>`, its fill helper `labvisor.tools.<id>.<hash>.fill`).
//! - The static agent and healthcheck binaries come from the tools volume
//!   `[--name-prefix]labvisor.tools.<id>.<hash>` ([`Tools`]), mounted read-only at
//!   `/labvisor/bin`. The supervisor fills it once, through Docker's archive API and a helper
//!   container that is never started, and every agent container shares it: 7 MB are copied
//!   once per supervisor and binary version, not once per container. The hash is that of the
//!   binaries, so a new supervisor version gets a new volume; old ones are removed at start
//!   when unused, and otherwise as soon as the last container using one is removed.
//! - The SUT file reaches the agent without a bind mount of single files and without a host
//!   path, so this works with any image and when the supervisor itself runs in a container:
//!   - a SUT without `files` whose file is at most [`MAX_INLINE_CONFIG`] bytes: its contents
//!     in `LABVISOR_CONFIG_TOML`, and nothing is uploaded (on Engine 20.10 an upload costs
//!     about as much as a start);
//!   - otherwise, before start, one small tar archive is uploaded to `/` through Docker's
//!     archive API: the SUT file as `/labvisor/sut/<sut>.toml` and each of its `files` as
//!     `/labvisor/sut/<name>`.
//! - A tmpfs at `/labvisor/run` (mode 1777, so any image user can write it) for the heartbeat:
//!   it starts empty at every start, so a heartbeat from before a restart is never read.
//! - Environment: `LABVISOR_CONFIG` (where the SUT file is, or would be: its stem is the SUT
//!   name), `LABVISOR_CONFIG_TOML` when inline, `LABVISOR_BROKER` (unless agents run without a broker),
//!   `LABVISOR_MQTT_CA_PEM` (the broker's CA certificate, with `--agent-tls` or `--mqtt-ca`),
//!   `LABVISOR_TOPIC_PREFIX`, `LABVISOR_MQTT_USERNAME`/`PASSWORD` when set, then the SUT's `env`.
//! - Init on, restart policy unless-stopped, memory and CPU limits from `[resources]`, the named
//!   volume `[--name-prefix]labvisor.sut.<sut>` at `/labvisor/data` (logs, job queue; it survives
//!   recreation; a volume of the old naming `[--name-prefix]labvisor-<sut>` is used instead
//!   when it carries this supervisor's and this SUT's labels), privileged/devices/mounts from the (already policy-checked) config. The
//!   Docker socket is never mounted.
//! - Posture: every capability dropped but [`labvisor_protocol::config::DEFAULT_CAPABILITIES`]
//!   (plus the SUT's `cap_add`; none of this for a privileged container), `no-new-privileges`
//!   (unless the SUT turns it off), a pids limit (`resources.pids`), the image's own user.
//! - Network: labvisor's own bridge `[--name-prefix]labvisor.net` or, past
//!   `--network-capacity` containers, `labvisor.net.<n>` ([`crate::plan::networks`]; created
//!   when missing, with inter-container traffic off), a named network, or `host`.
//! - Labels on the container, the volume and the network: `io.labvisor.managed-by=labvisor`,
//!   `io.labvisor.supervisor=<id>`, `io.labvisor.sut=<sut>` (not on the network),
//!   `io.labvisor.config-hash=<hash>` (container only), the `--extra-label`s, and on the
//!   container the SUT's own `labels`.
//! - Image ([`ImageSpec`], made sure of before create): used as is when present locally, else
//!   pulled. With `[build]`, built (classic builder) when absent or when its
//!   `io.labvisor.build-hash` label differs from the config's build hash; a built image is
//!   labelled managed-by, supervisor, SUT, build hash and the `--extra-label`s.

use std::collections::{BTreeMap, HashMap};

mod archive;
mod container;

pub use archive::archive;
pub use container::container_spec;

use bollard::models::ContainerCreateBody;
use bytes::Bytes;
use labvisor_protocol::config::SutConfig;
use labvisor_protocol::topics::SupervisorId;
use labvisor_protocol::SutName;

/// Label: who manages the object (`labvisor`).
pub const LABEL_MANAGED_BY: &str = "io.labvisor.managed-by";
/// Label: the owning supervisor's id.
pub const LABEL_SUPERVISOR: &str = "io.labvisor.supervisor";
/// Label: the SUT's name.
pub const LABEL_SUT: &str = "io.labvisor.sut";
/// Label: the config hash the container was created from.
pub const LABEL_CONFIG_HASH: &str = "io.labvisor.config-hash";
/// Label of a built image: the build hash ([`labvisor_protocol::config::build_hash`]) it was
/// built from.
pub const LABEL_BUILD_HASH: &str = "io.labvisor.build-hash";
/// Value of [`LABEL_MANAGED_BY`].
pub const MANAGED_BY: &str = "labvisor";

/// Where the agent binary is put in the container.
pub const AGENT_PATH: &str = "/labvisor/bin/labvisor-agent";
/// Where the healthcheck binary is put in the container.
pub const HEALTHCHECK_PATH: &str = "/labvisor/bin/labvisor-healthcheck";
/// Mount point of the SUT's volume.
pub const DATA_DIR: &str = "/labvisor/data";
/// Mount point of the per-container tmpfs that holds the heartbeat file.
pub const RUN_DIR: &str = "/labvisor/run";
/// Options of the [`RUN_DIR`] tmpfs: writable by any image user, small (the heartbeat is a few
/// hundred bytes).
pub const RUN_TMPFS_OPTIONS: &str = "mode=1777,size=1m";
/// Largest SUT file passed inline in `LABVISOR_CONFIG_TOML`; a larger one is uploaded (Linux
/// caps one environment string at 128 KiB).
pub const MAX_INLINE_CONFIG: usize = 64 * 1024;
/// Mount point of the tools volume (read-only): the agent and healthcheck binaries.
pub const TOOLS_DIR: &str = "/labvisor/bin";
/// The file in the tools volume that holds its hash; written last, so a fill cut short is
/// detected and redone.
pub const TOOLS_MARKER: &str = ".labvisor-tools";
/// Label of the tools volume (and of its helper container): `tools`.
pub const LABEL_ROLE: &str = "io.labvisor.role";
/// Value of [`LABEL_ROLE`] on the tools volume and its fill helper.
pub const ROLE_TOOLS: &str = "tools";

/// Value of [`LABEL_ROLE`] on labvisor's agent networks (`labvisor.net`, `labvisor.net.<n>`).
pub const ROLE_NETWORK: &str = "network";

/// The agent network a network name is, `(first network's name, n)`: `(name, 1)` for a name
/// ending in `labvisor.net`, `(head, n)` for `head.<n>` with `n` ≥ 2 and `head` one; `None`
/// for any other name (a named network, `host`, an old-style bridge).
pub fn agent_network_of(name: &str) -> Option<(&str, usize)> {
    if name.ends_with("labvisor.net") {
        return Some((name, 1));
    }
    let (head, tail) = name.rsplit_once('.')?;
    let digits = !tail.is_empty() && tail.bytes().all(|b| b.is_ascii_digit());
    let n: usize = tail.parse().ok().filter(|n| digits && *n >= 2)?;
    head.ends_with("labvisor.net").then_some((head, n))
}

/// Docker's bridge option for inter-container traffic.
pub const ICC_OPTION: &str = "com.docker.network.bridge.enable_icc";
/// Driver options of labvisor's own network: no traffic between its containers (each agent
/// reaches the host, where the managed broker listens, and the outside, but no other agent).
pub const NETWORK_OPTIONS: &[(&str, &str)] = &[(ICC_OPTION, "false")];
/// The `security_opt` of every agent container unless its SUT turns it off.
pub const NO_NEW_PRIVILEGES: &str = "no-new-privileges:true";

/// The static agent and healthcheck binaries, as the tar archive that fills the tools volume.
#[derive(Clone)]
pub struct Tools {
    /// The first 16 hex digits of the SHA-256 of both binaries.
    pub hash: String,
    /// The archive for the volume's root: both binaries (0755), then the marker holding `hash`.
    pub archive: Vec<Bytes>,
    /// The static agent binary.
    pub agent: Bytes,
    /// The static healthcheck binary.
    pub healthcheck: Bytes,
    /// The static boot binary (`labvisor-boot`), which joins the agent's parts under Swarm
    /// ([`crate::runtime::swarm`]); `None` under the local runtime, which does not need it.
    pub boot: Option<Bytes>,
}

impl Tools {
    /// The tools of the binaries `agent` and `healthcheck`.
    pub fn new(agent: Bytes, healthcheck: Bytes) -> Tools {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for b in [&agent, &healthcheck] {
            h.update((b.len() as u64).to_le_bytes());
            h.update(b);
        }
        let hash: String = h.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let files = [
            (format!("/{}", bin_name(AGENT_PATH)), 0o755, agent.clone()),
            (
                format!("/{}", bin_name(HEALTHCHECK_PATH)),
                0o755,
                healthcheck.clone(),
            ),
            (
                format!("/{TOOLS_MARKER}"),
                0o644,
                Bytes::from(hash.clone().into_bytes()),
            ),
        ];
        let archive = archive(&files).expect("short fixed paths fit a tar header");
        Tools {
            hash,
            archive,
            agent,
            healthcheck,
            boot: None,
        }
    }

    /// These tools with the boot binary, which the Swarm runtime needs.
    pub fn with_boot(mut self, boot: Bytes) -> Tools {
        self.boot = Some(boot);
        self
    }
}

impl std::fmt::Debug for Tools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tools").field("hash", &self.hash).finish()
    }
}

fn bin_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The tools volume a container needs: made sure of, and filled when its marker is missing,
/// before the container is created.
#[derive(Debug, Clone)]
pub struct ToolsVolume {
    /// The volume (name and labels).
    pub volume: Named,
    /// The binaries.
    pub tools: Tools,
    /// The image the fill helper is created from (the SUT's own: it is present by then).
    pub helper_image: String,
    /// The fill helper's container name.
    pub helper_name: String,
}

/// The supervisor's settings that shape every container.
#[derive(Debug, Clone)]
pub struct SpecContext {
    /// The supervisor's id (label and status topic).
    pub supervisor: SupervisorId,
    /// Prefix of container, volume and network names.
    pub name_prefix: String,
    /// Labels put on everything created (`--extra-label`).
    pub extra_labels: BTreeMap<String, String>,
    /// The broker URL given to agents; `None`: agents run without MQTT.
    pub agent_broker: Option<String>,
    /// The global topic prefix.
    pub topic_prefix: Option<String>,
    /// MQTT user name given to agents.
    pub mqtt_username: Option<String>,
    /// MQTT password given to agents.
    pub mqtt_password: Option<String>,
    /// A directory of per-SUT passwords (`<dir>/<sut>`, as `mosquitto/passwd.sh` writes them):
    /// each agent then logs in as its own SUT, which the shipped ACL confines to `<sut>/#`.
    /// Takes precedence over `mqtt_username`/`mqtt_password`.
    pub agent_credentials: Option<std::path::PathBuf>,
    /// The static agent and healthcheck binaries.
    pub tools: Tools,
    /// The CA certificate (PEM text) agents trust for an `mqtts://` broker: the managed
    /// broker's own CA under `--agent-tls`, or `--mqtt-ca`'s file.
    pub agent_ca: Option<String>,
}

impl SpecContext {
    /// The `io.labvisor.config-hash` of a container made from a SUT file whose hash is
    /// `file_hash`: that hash itself, or, when the agents are given a broker CA (`--agent-tls`,
    /// `--mqtt-ca`), a hash of it with the broker URL and the CA. So turning TLS on or off, or a
    /// new CA, recreates the containers (an adopted agent would otherwise keep a broker URL or a
    /// CA that no longer works), and a lab without TLS keeps the hashes it had.
    pub fn container_hash(&self, file_hash: &str) -> String {
        use sha2::Digest;
        match (&self.agent_broker, &self.agent_ca) {
            (Some(url), Some(ca)) => {
                let mut h = sha2::Sha256::new();
                for part in [file_hash, url, ca] {
                    h.update((part.len() as u64).to_le_bytes());
                    h.update(part.as_bytes());
                }
                h.finalize().iter().map(|b| format!("{b:02x}")).collect()
            }
            _ => file_hash.to_owned(),
        }
    }

    /// The container name of `sut`.
    pub fn container_name(&self, sut: &SutName) -> String {
        format!("{}{sut}", self.name_prefix)
    }

    /// The volume name of `sut`: `[--name-prefix]labvisor.sut.<sut>`.
    ///
    /// Every name labvisor makes besides an agent container's is `labvisor.<kind>.…`: a SUT
    /// name cannot hold a `.`, so no SUT can produce another kind's name (the tools volume's,
    /// a helper container's), and no two kinds share a prefix.
    pub fn volume_name(&self, sut: &SutName) -> String {
        format!("{}labvisor.sut.{sut}", self.name_prefix)
    }

    /// The volume name of `sut` before names had kinds (`[--name-prefix]labvisor-<sut>`). Such a
    /// volume keeps being used, but only when its labels say it is this supervisor's volume of
    /// exactly this SUT ([`ContainerSpec::legacy_volume`]): the name alone could be another
    /// kind's (SUT `tools-<id>-<hash>` named the old tools volume).
    pub fn legacy_volume_name(&self, sut: &SutName) -> String {
        format!("{}labvisor-{sut}", self.name_prefix)
    }

    /// The SUT volume of the old naming, with the labels it must carry to be `sut`'s.
    pub fn legacy_volume(&self, sut: &SutName) -> Named {
        Named {
            name: self.legacy_volume_name(sut),
            labels: HashMap::from([
                (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
                (LABEL_SUPERVISOR.to_owned(), self.supervisor.to_string()),
                (LABEL_SUT.to_owned(), sut.to_string()),
            ]),
        }
    }

    /// The name of labvisor's own bridge network: `[--name-prefix]labvisor.net`, created with
    /// inter-container traffic off ([`NETWORK_OPTIONS`]).
    pub fn network_name(&self) -> String {
        format!("{}labvisor.net", self.name_prefix)
    }

    /// The name of labvisor's agent network `n` (from 1): the first is [`Self::network_name`]
    /// (existing labs keep theirs), then `[--name-prefix]labvisor.net.<n>`, a name no SUT can
    /// produce (it holds a `.`). See [`crate::plan::networks`].
    pub fn agent_network_name(&self, n: usize) -> String {
        match n {
            0 | 1 => self.network_name(),
            n => format!("{}.{n}", self.network_name()),
        }
    }

    /// Agent network `n`, as created when missing: bridge, inter-container traffic off
    /// ([`NETWORK_OPTIONS`]), this supervisor's labels and [`LABEL_ROLE`] = [`ROLE_NETWORK`].
    pub fn agent_network(&self, n: usize) -> Named {
        let mut labels = self.base_labels();
        labels.insert(LABEL_ROLE.into(), ROLE_NETWORK.into());
        Named {
            name: self.agent_network_name(n),
            labels,
        }
    }

    /// The bridge network of earlier versions (`[--name-prefix]labvisor`), made with
    /// inter-container traffic on: removed once no container uses it.
    pub fn legacy_network_name(&self) -> String {
        format!(
            "{}{}",
            self.name_prefix,
            labvisor_protocol::config::LABVISOR_NETWORK
        )
    }

    /// The name of the tools volume (per supervisor and binary hash):
    /// `[--name-prefix]labvisor.tools.<id>.<hash>`.
    pub fn tools_volume_name(&self) -> String {
        format!(
            "{}labvisor.tools.{}.{}",
            self.name_prefix, self.supervisor, self.tools.hash
        )
    }

    /// The name of the tools volume's fill helper container:
    /// `[--name-prefix]labvisor.tools.<id>.<hash>.fill` (an agent container, named after its
    /// SUT, can never have it).
    pub fn tools_helper_name(&self) -> String {
        format!("{}.fill", self.tools_volume_name())
    }

    /// Labels of every object this supervisor creates (managed-by, supervisor, extra labels).
    pub fn base_labels(&self) -> HashMap<String, String> {
        let mut l: HashMap<String, String> = self
            .extra_labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        l.insert(LABEL_MANAGED_BY.into(), MANAGED_BY.into());
        l.insert(LABEL_SUPERVISOR.into(), self.supervisor.to_string());
        l
    }
}

/// A Docker object to make sure of before creating the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    /// Its name.
    pub name: String,
    /// Its labels, when labvisor creates it.
    pub labels: HashMap<String, String>,
}

/// Everything needed to create one agent container.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    /// The SUT.
    pub sut: SutName,
    /// The container name.
    pub name: String,
    /// The config hash (also in the labels).
    pub hash: String,
    /// The create request.
    pub body: ContainerCreateBody,
    /// The SUT's volume, created (labelled) by the engine with the container when missing.
    pub volume: Named,
    /// The SUT's volume under its name from before names had kinds
    /// ([`SpecContext::legacy_volume_name`]), with the labels it must carry to be used instead
    /// of [`ContainerSpec::volume`]: it is used only when it exists with exactly these values of
    /// these labels and no [`LABEL_ROLE`].
    pub legacy_volume: Named,
    /// The labvisor bridge network, created when missing (`None` for host or a named network).
    pub network: Option<Named>,
    /// The tools volume, mounted read-only at [`TOOLS_DIR`].
    pub tools: ToolsVolume,
    /// The tar archive uploaded to `/` before start, as chunks: the SUT file and its `files`;
    /// `None` when the SUT file is passed inline and there is nothing to upload.
    pub archive: Option<Vec<Bytes>>,
    /// The files of [`ContainerSpec::archive`] one by one (absolute path in the container,
    /// mode, contents): the Swarm runtime delivers each as a Docker config. Empty when inline.
    pub uploads: Vec<(String, u32, Bytes)>,
    /// Where the SUT's agent may run, as Swarm placement constraints (`node.hostname==rack3`),
    /// from its `[placement]` section; the local runtime ignores them.
    pub placement: Vec<String>,
}

impl ContainerSpec {
    /// The container on labvisor's agent network `n` instead of the first, when it is on
    /// labvisor's own network at all (a named network or `host` stays as it is).
    pub fn on_agent_network(mut self, n: usize, ctx: &SpecContext) -> ContainerSpec {
        if self.network.is_some() {
            let net = ctx.agent_network(n);
            if let Some(h) = self.body.host_config.as_mut() {
                h.network_mode = Some(net.name.clone());
            }
            self.network = Some(net);
        }
        self
    }
}

/// The image a SUT's container needs, and how to get it when it is absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// The SUT.
    pub sut: SutName,
    /// The image reference (with `[build]`: the tag the build produces).
    pub image: String,
    /// How to build it; `None`: pull it when absent.
    pub build: Option<BuildSpec>,
}

/// How to build a SUT's image (from its `[build]` section).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildSpec {
    /// The context directory (resolved).
    pub context_dir: std::path::PathBuf,
    /// The Dockerfile, relative to the context.
    pub dockerfile: String,
    /// Build args.
    pub args: BTreeMap<String, String>,
    /// The build hash the image must carry in [`LABEL_BUILD_HASH`] (as loaded; the runtime
    /// recomputes it from the context it actually sends).
    pub hash: String,
    /// Labels of the built image: managed-by, supervisor, SUT, the `--extra-label`s (the build
    /// hash is added by the runtime).
    pub labels: HashMap<String, String>,
}

/// The image of `cfg`.
pub fn image_spec(cfg: &SutConfig, ctx: &SpecContext) -> ImageSpec {
    ImageSpec {
        sut: cfg.name.clone(),
        image: cfg.image.clone(),
        build: cfg.build.as_ref().map(|b| {
            let mut labels = ctx.base_labels();
            labels.insert(LABEL_SUT.into(), cfg.name.to_string());
            BuildSpec {
                context_dir: b.context_dir.clone(),
                dockerfile: b.dockerfile.clone(),
                args: b.args.clone(),
                hash: b.hash(),
                labels,
            }
        }),
    }
}

/// Why a container spec cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A file path does not fit a tar header.
    #[error("cannot put {path:?} into the container archive: {reason}")]
    Path {
        /// The path.
        path: String,
        /// Why.
        reason: String,
    },
    /// Writing an archive failed.
    #[error("cannot write the container archive: {0}")]
    Archive(#[from] std::io::Error),
    /// `--agent-credentials` has no password for this SUT.
    #[error("no MQTT password for {sut} in {file}: create it with `mosquitto/passwd.sh {sut}` (and reload the broker)")]
    Credentials {
        /// The SUT.
        sut: String,
        /// The file looked for.
        file: String,
    },
}

/// Whether `path` is an ELF executable without an interpreter (`PT_INTERP`): a static binary
/// that runs in any image.
pub fn is_static_elf(path: &std::path::Path) -> bool {
    let Ok(b) = std::fs::read(path) else {
        return false;
    };
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return false; // not a 64-bit ELF
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        // PT_INTERP = 3: a dynamic binary names its loader.
        b.get(o..o + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().expect("4 bytes")) != 3)
    })
}

#[cfg(test)]
mod tests;
