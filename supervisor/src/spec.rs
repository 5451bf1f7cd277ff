//! What an agent container looks like: the Docker create request and the files copied into it.
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
//! - Network: labvisor's own bridge `[--name-prefix]labvisor.net` (created when missing, with
//!   inter-container traffic off), a named network, or `host`.
//! - Labels on the container, the volume and the network: `io.labvisor.managed-by=labvisor`,
//!   `io.labvisor.supervisor=<id>`, `io.labvisor.sut=<sut>` (not on the network),
//!   `io.labvisor.config-hash=<hash>` (container only), the `--extra-label`s, and on the
//!   container the SUT's own `labels`.
//! - Image ([`ImageSpec`], made sure of before create): used as is when present locally, else
//!   pulled. With `[build]`, built (classic builder) when absent or when its
//!   `io.labvisor.build-hash` label differs from the config's build hash; a built image is
//!   labelled managed-by, supervisor, SUT, build hash and the `--extra-label`s.

use std::collections::{BTreeMap, HashMap};

use bollard::models::{
    ContainerCreateBody, DeviceMapping, HealthConfig, HostConfig, Mount, MountType,
    MountVolumeOptions, RestartPolicy, RestartPolicyNameEnum,
};
use bytes::Bytes;
use labvisor_protocol::config::{Network, SutConfig, CONTAINER_FILES_DIR};
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
            (format!("/{}", bin_name(AGENT_PATH)), 0o755, agent),
            (
                format!("/{}", bin_name(HEALTHCHECK_PATH)),
                0o755,
                healthcheck,
            ),
            (
                format!("/{TOOLS_MARKER}"),
                0o644,
                Bytes::from(hash.clone().into_bytes()),
            ),
        ];
        let archive = archive(&files).expect("short fixed paths fit a tar header");
        Tools { hash, archive }
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

fn nanos(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_nanos())
        .unwrap_or(i64::MAX)
        .max(1_000_000)
}

/// Builds the container of `cfg`, whose SUT file holds `file_bytes`, with hash `hash`.
pub fn container_spec(
    cfg: &SutConfig,
    file_bytes: &[u8],
    hash: &str,
    ctx: &SpecContext,
) -> Result<ContainerSpec, SpecError> {
    let sut = &cfg.name;
    let name = ctx.container_name(sut);
    let config_path = format!("{CONTAINER_FILES_DIR}/{sut}.toml");

    let inline = cfg.files.is_empty() && file_bytes.len() <= MAX_INLINE_CONFIG;
    let mut env = vec![format!("LABVISOR_CONFIG={config_path}")];
    if inline {
        // Validated as UTF-8 when it was loaded.
        env.push(format!(
            "LABVISOR_CONFIG_TOML={}",
            String::from_utf8_lossy(file_bytes)
        ));
    }
    if let Some(b) = &ctx.agent_broker {
        env.push(format!("LABVISOR_BROKER={b}"));
    }
    if let (Some(_), Some(ca)) = (&ctx.agent_broker, &ctx.agent_ca) {
        env.push(format!("LABVISOR_MQTT_CA_PEM={ca}"));
    }
    if let Some(p) = ctx.topic_prefix.as_deref().filter(|p| !p.is_empty()) {
        env.push(format!("LABVISOR_TOPIC_PREFIX={p}"));
    }
    match &ctx.agent_credentials {
        Some(dir) => {
            let file = dir.join(sut.as_str());
            let password = std::fs::read_to_string(&file)
                .ok()
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .ok_or_else(|| SpecError::Credentials {
                    sut: sut.to_string(),
                    file: file.display().to_string(),
                })?;
            env.push(format!("LABVISOR_MQTT_USERNAME={sut}"));
            env.push(format!("LABVISOR_MQTT_PASSWORD={password}"));
        }
        None => {
            if let Some(u) = &ctx.mqtt_username {
                env.push(format!("LABVISOR_MQTT_USERNAME={u}"));
            }
            if let Some(p) = &ctx.mqtt_password {
                env.push(format!("LABVISOR_MQTT_PASSWORD={p}"));
            }
        }
    }
    env.extend(cfg.env.iter().map(|(k, v)| format!("{k}={v}")));

    let mut labels: HashMap<String, String> = cfg
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.extend(ctx.base_labels());
    labels.insert(LABEL_SUT.into(), sut.to_string());
    labels.insert(LABEL_CONFIG_HASH.into(), hash.to_owned());

    let mut volume_labels = ctx.base_labels();
    volume_labels.insert(LABEL_SUT.into(), sut.to_string());
    let volume = Named {
        name: ctx.volume_name(sut),
        labels: volume_labels,
    };

    let legacy_volume = ctx.legacy_volume(sut);

    let mut tools_labels = ctx.base_labels();
    tools_labels.insert(LABEL_ROLE.into(), ROLE_TOOLS.into());
    let tools = ToolsVolume {
        volume: Named {
            name: ctx.tools_volume_name(),
            labels: tools_labels,
        },
        tools: ctx.tools.clone(),
        helper_image: cfg.image.clone(),
        helper_name: ctx.tools_helper_name(),
    };

    let mut mounts = vec![
        Mount {
            target: Some(DATA_DIR.into()),
            source: Some(volume.name.clone()),
            typ: Some(MountType::VOLUME),
            read_only: Some(false),
            // The engine creates a missing volume with these labels as part of the create: no
            // separate call per container.
            volume_options: Some(MountVolumeOptions {
                labels: Some(volume.labels.clone()),
                ..Default::default()
            }),
            ..Default::default()
        },
        Mount {
            target: Some(TOOLS_DIR.into()),
            source: Some(tools.volume.name.clone()),
            typ: Some(MountType::VOLUME),
            read_only: Some(true),
            // The container may be created before the volume is filled, and then makes it.
            volume_options: Some(MountVolumeOptions {
                labels: Some(tools.volume.labels.clone()),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    mounts.extend(cfg.mounts.iter().map(|m| Mount {
        target: Some(m.target.clone()),
        source: Some(m.source.clone()),
        typ: Some(MountType::BIND),
        read_only: Some(m.read_only),
        ..Default::default()
    }));

    let (network_mode, network) = match &cfg.network {
        Network::Labvisor => {
            let n = ctx.network_name();
            (
                n.clone(),
                Some(Named {
                    name: n,
                    labels: ctx.base_labels(),
                }),
            )
        }
        Network::Host => ("host".to_owned(), None),
        Network::Named(n) => (n.clone(), None),
    };

    let h = &cfg.health;
    let host_config = HostConfig {
        init: Some(true),
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
            maximum_retry_count: None,
        }),
        memory: cfg
            .resources
            .memory
            .map(|m| i64::try_from(m.get()).unwrap_or(i64::MAX)),
        nano_cpus: cfg.resources.cpus.map(|c| (c * 1e9) as i64),
        mounts: Some(mounts),
        tmpfs: Some(HashMap::from([(
            RUN_DIR.to_owned(),
            RUN_TMPFS_OPTIONS.to_owned(),
        )])),
        network_mode: Some(network_mode),
        privileged: Some(cfg.privileged),
        // Every capability but the agents' default set is dropped; a privileged container has
        // them all anyway.
        cap_drop: (!cfg.privileged).then(|| vec!["ALL".to_owned()]),
        cap_add: (!cfg.privileged).then(|| {
            labvisor_protocol::config::DEFAULT_CAPABILITIES
                .iter()
                .map(|c| (*c).to_owned())
                .chain(cfg.cap_add.iter().cloned())
                .collect()
        }),
        security_opt: cfg
            .no_new_privileges
            .then(|| vec![NO_NEW_PRIVILEGES.to_owned()]),
        pids_limit: Some(i64::from(cfg.resources.pids)),
        devices: (!cfg.devices.is_empty()).then(|| {
            cfg.devices
                .iter()
                .map(|d| DeviceMapping {
                    path_on_host: Some(d.clone()),
                    path_in_container: Some(d.clone()),
                    cgroup_permissions: Some("rwm".into()),
                })
                .collect()
        }),
        ..Default::default()
    };

    let body = ContainerCreateBody {
        hostname: (cfg.network != Network::Host).then(|| sut.to_string()),
        image: Some(cfg.image.clone()),
        entrypoint: Some(vec![AGENT_PATH.into()]),
        cmd: Some(vec![]),
        env: Some(env),
        labels: Some(labels),
        healthcheck: Some(HealthConfig {
            test: Some(vec!["CMD".into(), HEALTHCHECK_PATH.into()]),
            interval: Some(nanos(h.interval)),
            timeout: Some(nanos(h.timeout)),
            retries: Some(i64::from(h.retries.get())),
            start_period: Some(if h.start_period.is_zero() {
                0
            } else {
                nanos(h.start_period)
            }),
            start_interval: None,
        }),
        host_config: Some(host_config),
        ..Default::default()
    };

    let archive = if inline {
        None
    } else {
        let mut files: Vec<(String, u32, Bytes)> =
            vec![(config_path, 0o644, Bytes::copy_from_slice(file_bytes))];
        files.extend(cfg.files.iter().map(|f| {
            (
                f.container_path(),
                0o644,
                Bytes::copy_from_slice(&f.content),
            )
        }));
        Some(archive(&files)?)
    };

    Ok(ContainerSpec {
        sut: sut.clone(),
        name,
        hash: hash.to_owned(),
        body,
        volume,
        legacy_volume,
        network,
        tools,
        archive,
    })
}

/// A tar archive (as chunks) holding `files` (absolute path, mode, contents) and every parent
/// directory (0755). Paths are stored relative to `/`.
pub fn archive(files: &[(String, u32, Bytes)]) -> Result<Vec<Bytes>, SpecError> {
    let mut all_dirs: Vec<String> = Vec::new();
    for (path, _, _) in files {
        let rel = path.trim_start_matches('/');
        let mut acc = String::new();
        let parts: Vec<&str> = rel.split('/').collect();
        for p in &parts[..parts.len() - 1] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(p);
            if !all_dirs.contains(&acc) {
                all_dirs.push(acc.clone());
            }
        }
    }
    let mut chunks = Vec::new();
    for d in &all_dirs {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        set_path(&mut h, &format!("{d}/"))?;
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(0);
        h.set_cksum();
        chunks.push(Bytes::copy_from_slice(h.as_bytes()));
    }
    for (path, mode, content) in files {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        set_path(&mut h, path.trim_start_matches('/'))?;
        h.set_mode(*mode);
        h.set_size(content.len() as u64);
        h.set_mtime(0);
        h.set_cksum();
        chunks.push(Bytes::copy_from_slice(h.as_bytes()));
        chunks.push(content.clone());
        let pad = (512 - content.len() % 512) % 512;
        if pad > 0 {
            chunks.push(Bytes::from(vec![0u8; pad]));
        }
    }
    chunks.push(Bytes::from(vec![0u8; 1024]));
    Ok(chunks)
}

fn set_path(h: &mut tar::Header, path: &str) -> Result<(), SpecError> {
    // ustar splits paths up to 255 bytes into prefix and name.
    h.set_path(path).map_err(|e| SpecError::Path {
        path: path.to_owned(),
        reason: e.to_string(),
    })
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
mod tests {
    use super::*;
    use labvisor_protocol::config::{load_str, Allow};
    use std::io::Read;

    fn ctx() -> SpecContext {
        SpecContext {
            supervisor: SupervisorId::new("lab").unwrap(),
            name_prefix: "t-".into(),
            extra_labels: BTreeMap::from([("x".into(), "y".into())]),
            agent_broker: Some("mqtt://10.0.0.1:1883".into()),
            topic_prefix: None,
            mqtt_username: None,
            mqtt_password: None,
            agent_credentials: None,
            tools: Tools::new(Bytes::from_static(b"AGENT"), Bytes::from_static(b"HC")),
            agent_ca: None,
        }
    }

    #[test]
    fn the_brokers_ca_reaches_the_agent_only_with_a_broker() {
        let text = "image = \"img\"\n";
        let dir = tempfile::tempdir().unwrap();
        let cfg = load_str("dut1.toml", text, dir.path(), &Allow::default()).unwrap();
        let ca = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let mut c = ctx();
        c.agent_broker = Some("mqtts://10.0.0.1:1883".into());
        c.agent_ca = Some(ca.into());
        let s = container_spec(&cfg, text.as_bytes(), &cfg.hash(), &c).unwrap();
        let env = s.body.env.unwrap();
        let given: Vec<&String> = env
            .iter()
            .filter(|e| e.starts_with("LABVISOR_MQTT_CA"))
            .collect();
        assert_eq!(given, [&format!("LABVISOR_MQTT_CA_PEM={ca}")]);
        c.agent_broker = None;
        let s = container_spec(&cfg, text.as_bytes(), &cfg.hash(), &c).unwrap();
        let env = s.body.env.unwrap();
        assert!(!env.iter().any(|e| e.starts_with("LABVISOR_MQTT_CA")));
        // The CA and the URL are part of the container's hash, so a change recreates it.
        c.agent_broker = Some("mqtts://10.0.0.1:1883".into());
        let with_ca = c.container_hash("h");
        assert_ne!(with_ca, "h");
        c.agent_ca = Some(ca.replace("MIIB", "MIIC"));
        assert_ne!(c.container_hash("h"), with_ca);
        c.agent_broker = Some("mqtts://10.0.0.2:1883".into());
        assert_ne!(c.container_hash("h"), with_ca);
        // Without a CA (plain MQTT), nothing is added: existing containers keep their spec and
        // their hash.
        assert_eq!(ctx().container_hash("h"), "h");
        let s = container_spec(&cfg, text.as_bytes(), &cfg.hash(), &ctx()).unwrap();
        assert!(!s
            .body
            .env
            .unwrap()
            .iter()
            .any(|e| e.starts_with("LABVISOR_MQTT_CA")));
    }

    #[test]
    fn per_sut_credentials_confine_each_agent_to_its_own_login() {
        let text = "image = \"img\"\n";
        let dir = tempfile::tempdir().unwrap();
        let secrets = tempfile::tempdir().unwrap();
        std::fs::write(secrets.path().join("dut1"), "s3cret\n").unwrap();
        let mut c = ctx();
        c.mqtt_username = Some("labvisor.supervisor".into());
        c.mqtt_password = Some("root-ish".into());
        c.agent_credentials = Some(secrets.path().to_path_buf());
        let cfg = load_str("dut1.toml", text, dir.path(), &Allow::default()).unwrap();
        let s = container_spec(&cfg, text.as_bytes(), &cfg.hash(), &c).unwrap();
        let env = s.body.env.clone().unwrap();
        assert!(
            env.contains(&"LABVISOR_MQTT_USERNAME=dut1".to_owned()),
            "{env:?}"
        );
        assert!(
            env.contains(&"LABVISOR_MQTT_PASSWORD=s3cret".to_owned()),
            "{env:?}"
        );
        assert!(
            !env.iter().any(|e| e.contains("root-ish")),
            "the supervisor's password never reaches an agent"
        );
        let cfg2 = load_str("dut2.toml", text, dir.path(), &Allow::default()).unwrap();
        let e = container_spec(&cfg2, text.as_bytes(), &cfg2.hash(), &c).unwrap_err();
        assert!(
            e.to_string().starts_with("no MQTT password for dut2 in "),
            "{e}"
        );
        assert!(e.to_string().contains("mosquitto/passwd.sh dut2"), "{e}");
    }

    #[test]
    fn a_sut_with_files_or_a_large_file_is_uploaded_not_inlined() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), "k: v\n").unwrap();
        let text = "image = \"img\"\nfiles = [\"a.yaml\"]\n";
        let cfg = load_str("dut1.toml", text, dir.path(), &Allow::default()).unwrap();
        let s = container_spec(&cfg, text.as_bytes(), &cfg.hash(), &ctx()).unwrap();
        let env = s.body.env.as_ref().unwrap();
        assert!(!env.iter().any(|e| e.starts_with("LABVISOR_CONFIG_TOML=")));
        assert!(env.contains(&"LABVISOR_CONFIG=/labvisor/sut/dut1.toml".to_owned()));
        let seen = untar(s.archive.as_ref().expect("uploaded"));
        assert_eq!(seen["labvisor/sut/dut1.toml"].1, text);
        assert_eq!(seen["labvisor/sut/a.yaml"].1, "k: v\n");
        assert!(
            !seen.keys().any(|p| p.starts_with("labvisor/bin")),
            "the binaries come from the tools volume: {:?}",
            seen.keys()
        );

        // Just over the inline limit: uploaded; at the limit: inline.
        for (len, inline) in [(MAX_INLINE_CONFIG + 1, false), (MAX_INLINE_CONFIG, true)] {
            let head = "image = \"img\"\n#";
            let text = format!("{head}{}\n", "x".repeat(len - head.len() - 1));
            assert_eq!(text.len(), len);
            let cfg = load_str("dut1.toml", &text, dir.path(), &Allow::default()).unwrap();
            let s = container_spec(&cfg, text.as_bytes(), &cfg.hash(), &ctx()).unwrap();
            assert_eq!(s.archive.is_none(), inline, "{len} bytes");
            let env = s.body.env.as_ref().unwrap();
            assert_eq!(
                env.iter().any(|e| e.starts_with("LABVISOR_CONFIG_TOML=")),
                inline
            );
        }
    }

    #[test]
    fn spec_follows_the_contract() {
        let text =
            "image = \"img\"\n[env]\nA = \"1\"\n[health]\ninterval = \"2s\"\ntimeout = \"1s\"\n";
        let dir = tempfile::tempdir().unwrap();
        let cfg = load_str("dut1.toml", text, dir.path(), &Allow::default()).unwrap();
        let s = container_spec(&cfg, text.as_bytes(), &cfg.hash(), &ctx()).unwrap();
        assert_eq!(s.name, "t-dut1");
        assert_eq!(s.volume.name, "t-labvisor.sut.dut1");
        assert_eq!(s.legacy_volume.name, "t-labvisor-dut1");
        assert_eq!(s.legacy_volume.labels[LABEL_SUT], "dut1");
        assert_eq!(s.legacy_volume.labels[LABEL_SUPERVISOR], "lab");
        assert_eq!(s.network.as_ref().unwrap().name, "t-labvisor.net");
        let b = &s.body;
        assert_eq!(b.entrypoint.as_deref(), Some(&[AGENT_PATH.to_owned()][..]));
        let env = b.env.as_ref().unwrap();
        assert!(env.contains(&"LABVISOR_CONFIG=/labvisor/sut/dut1.toml".to_owned()));
        assert!(env.contains(&"LABVISOR_BROKER=mqtt://10.0.0.1:1883".to_owned()));
        assert!(env.contains(&"A=1".to_owned()));
        let hc = b.healthcheck.as_ref().unwrap();
        assert_eq!(hc.interval, Some(2_000_000_000));
        assert_eq!(hc.timeout, Some(1_000_000_000));
        let labels = b.labels.as_ref().unwrap();
        assert_eq!(labels[LABEL_SUT], "dut1");
        assert_eq!(labels[LABEL_SUPERVISOR], "lab");
        assert_eq!(labels["x"], "y");
        let hcfg = b.host_config.as_ref().unwrap();
        assert_eq!(hcfg.init, Some(true));
        assert_eq!(hcfg.network_mode.as_deref(), Some("t-labvisor.net"));
        // The posture.
        assert_eq!(hcfg.cap_drop.as_deref(), Some(&["ALL".to_owned()][..]));
        let caps = hcfg.cap_add.clone().unwrap();
        assert!(!caps.contains(&"NET_RAW".to_owned()), "{caps:?}");
        assert_eq!(caps.len(), 8, "{caps:?}");
        assert_eq!(
            hcfg.security_opt.as_deref(),
            Some(&[NO_NEW_PRIVILEGES.to_owned()][..])
        );
        assert_eq!(hcfg.pids_limit, Some(4096));
        assert_eq!(b.user, None, "the image's own user");

        // No `files`: the SUT file goes inline, nothing is uploaded.
        assert!(s.archive.is_none());
        assert!(env.contains(&format!("LABVISOR_CONFIG_TOML={text}")));
        assert_eq!(
            hcfg.tmpfs.as_ref().unwrap()[RUN_DIR],
            RUN_TMPFS_OPTIONS,
            "the heartbeat's directory"
        );
        assert!(labvisor_protocol::heartbeat::DEFAULT_PATH.starts_with(&format!("{RUN_DIR}/")));

        let tools_mount = hcfg
            .mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.target.as_deref() == Some(TOOLS_DIR))
            .expect("the tools volume is mounted");
        assert_eq!(tools_mount.read_only, Some(true));
        assert_eq!(tools_mount.typ, Some(MountType::VOLUME));
        let vol = &s.tools.volume;
        assert_eq!(tools_mount.source.as_deref(), Some(vol.name.as_str()));
        assert_eq!(
            vol.name,
            format!("t-labvisor.tools.lab.{}", s.tools.tools.hash)
        );
        assert_eq!(vol.labels[LABEL_ROLE], ROLE_TOOLS);
        assert_eq!(
            tools_mount
                .volume_options
                .as_ref()
                .and_then(|o| o.labels.as_ref()),
            Some(&vol.labels),
            "a create that makes the tools volume labels it"
        );
        assert_eq!(vol.labels[LABEL_SUPERVISOR], "lab");
        assert_eq!(vol.labels["x"], "y");
        assert_eq!(s.tools.helper_image, "img");
        assert_eq!(s.tools.helper_name, format!("{}.fill", vol.name));
    }

    #[test]
    fn relaxations_reach_the_container() {
        let text = "image = \"img\"\ncap_add = [\"CAP_NET_RAW\"]\nno_new_privileges = false\n[resources]\npids = 100\n";
        let dir = tempfile::tempdir().unwrap();
        let cfg = load_str("dut1.toml", text, dir.path(), &Allow::all()).unwrap();
        let s = container_spec(&cfg, text.as_bytes(), &cfg.hash(), &ctx()).unwrap();
        let h = s.body.host_config.unwrap();
        let caps = h.cap_add.unwrap();
        assert_eq!(caps.len(), 9, "{caps:?}");
        assert_eq!(caps.last().map(String::as_str), Some("NET_RAW"));
        assert_eq!(h.security_opt, None);
        assert_eq!(h.pids_limit, Some(100));
        let text = "image = \"img\"\nprivileged = true\n";
        let cfg = load_str("dut1.toml", text, dir.path(), &Allow::all()).unwrap();
        let s = container_spec(&cfg, text.as_bytes(), &cfg.hash(), &ctx()).unwrap();
        let h = s.body.host_config.unwrap();
        assert_eq!((h.cap_drop, h.cap_add), (None, None));
    }

    #[test]
    fn no_sut_name_produces_another_kinds_name() {
        // The attack: a SUT named like the tools volume (minus the prefix) got that volume.
        let c = ctx();
        let tools = c.tools_volume_name();
        let helper = c.tools_helper_name();
        let candidates = [
            tools.trim_start_matches("t-").to_owned(),
            tools.trim_start_matches("t-labvisor.").to_owned(),
            tools.trim_start_matches("t-labvisor.sut.").to_owned(),
            format!("tools-lab-{}", c.tools.hash),
            format!("labvisor-tools-lab-{}-fill", c.tools.hash),
        ];
        for name in candidates {
            let Ok(sut) = SutName::new(&name) else {
                continue; // not even a SUT name
            };
            for made in [c.volume_name(&sut), c.container_name(&sut)] {
                assert_ne!(made, tools, "{name}");
                assert_ne!(made, helper, "{name}");
            }
        }
        // By construction: every SUT-derived name has no '.' after the prefix but the kind's.
        let sut = SutName::new("tools-lab-0123456789abcdef").unwrap();
        assert_eq!(
            c.volume_name(&sut),
            "t-labvisor.sut.tools-lab-0123456789abcdef"
        );
        assert!(!c.container_name(&sut)["t-".len()..].contains('.'));
        assert!(c.volume_name(&sut).starts_with("t-labvisor.sut."));
        assert!(tools.starts_with("t-labvisor.tools."));
    }

    fn untar(chunks: &[Bytes]) -> BTreeMap<String, (u32, String)> {
        let bytes: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        let mut ar = tar::Archive::new(&bytes[..]);
        let mut seen = BTreeMap::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let p = e.path().unwrap().display().to_string();
            let mode = e.header().mode().unwrap();
            let mut content = String::new();
            e.read_to_string(&mut content).unwrap();
            seen.insert(p, (mode, content));
        }
        seen
    }

    #[test]
    fn tools_archive_holds_both_binaries_then_the_marker() {
        let t = Tools::new(Bytes::from_static(b"AGENT"), Bytes::from_static(b"HC"));
        assert_eq!(t.hash.len(), 16);
        let seen = untar(&t.archive);
        assert_eq!(seen["labvisor-agent"], (0o755, "AGENT".into()));
        assert_eq!(seen["labvisor-healthcheck"], (0o755, "HC".into()));
        assert_eq!(seen[TOOLS_MARKER], (0o644, t.hash.clone()));
        // The marker is written last: a fill cut short has none.
        let bytes: Vec<u8> = t.archive.iter().flat_map(|c| c.iter().copied()).collect();
        let mut ar = tar::Archive::new(&bytes[..]);
        let last = ar.entries().unwrap().last().unwrap().unwrap();
        assert_eq!(last.path().unwrap().display().to_string(), TOOLS_MARKER);
        // The hash follows the contents, and the boundary between the binaries.
        let other = Tools::new(Bytes::from_static(b"AGENTH"), Bytes::from_static(b"C"));
        assert_ne!(t.hash, other.hash);
        assert!(!format!("{t:?}").contains("AGENT"), "Debug shows no bytes");
    }
}
