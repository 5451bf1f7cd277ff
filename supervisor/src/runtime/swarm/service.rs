//! The Swarm service of an agent, and the configs and secret it needs: a pure translation of
//! the [`ContainerSpec`] the local runtime would create, so both runtimes run the same agent
//! from the same plan.
//!
//! What changes under Swarm:
//! - The binaries come as Docker configs, not from the tools volume. A config holds less than
//!   1000 KiB and the static agent is about 7 MiB, the static healthcheck about 1.2 MiB, so each
//!   travels in parts of at most [`PART_SIZE`] bytes with a manifest, at
//!   `/labvisor/bin/<name>.parts/`, and the tiny `labvisor-boot` (one config, mode 0555) is
//!   mounted at both `/labvisor/bin/labvisor-agent` and `/labvisor/bin/labvisor-healthcheck`:
//!   run under either name, it joins that name's parts in memory and executes them
//!   ([`Binaries`]). The command, the HEALTHCHECK and the paths are those of the local runtime.
//! - The uploaded files (the SUT file when not inline, its `files`) are one config each, at the
//!   same paths.
//! - The MQTT password leaves the environment (which `docker service inspect` shows) for a
//!   secret, named after a hash of its value, read through `LABVISOR_MQTT_PASSWORD_FILE`.
//! - The `/labvisor/run` tmpfs is a tmpfs mount; Swarm's own restart policy replaces Docker's
//!   `unless-stopped`; placement constraints come from `[placement]`; the endpoint mode is
//!   `dnsrr` (agents publish no ports, so no virtual IP is needed).
//! - Network: a task on labvisor's own network goes on its node's default bridge (no network
//!   attachment), which each node's engine must run with inter-container traffic off
//!   (`"icc": false` in its `daemon.json`). Swarm has no other way to give a task a bridge
//!   without that traffic: a swarm-scoped bridge network drops its driver options (traffic
//!   between its containers stays on, measured on Engine 20.10), and a `--config-only`
//!   network would have to be made on every node's own engine, which the manager cannot reach.
//!   `network = "host"` and a named network (`--allow-network`) attach as asked.
//! - Swarm on Engine 20.10 cannot pass devices or run privileged tasks: the config validation
//!   refuses both under this runtime, so they never reach here.

use std::collections::HashMap;

use base64::Engine as _;
use bollard::models::{
    EndpointSpec, EndpointSpecModeEnum, HealthConfig, Limit, Mount, MountTmpfsOptions, MountType,
    NetworkAttachmentConfig, ServiceSpec, ServiceSpecMode, ServiceSpecModeReplicated,
    ServiceSpecUpdateConfig, ServiceSpecUpdateConfigOrderEnum, TaskSpec, TaskSpecContainerSpec,
    TaskSpecContainerSpecConfigs, TaskSpecContainerSpecFile, TaskSpecContainerSpecFile1,
    TaskSpecContainerSpecPrivileges, TaskSpecContainerSpecSecrets, TaskSpecPlacement,
    TaskSpecResources, TaskSpecRestartPolicy, TaskSpecRestartPolicyConditionEnum,
};
use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::spec::{
    ContainerSpec, Tools, AGENT_PATH, HEALTHCHECK_PATH, LABEL_MANAGED_BY, LABEL_ROLE,
    LABEL_SUPERVISOR, LABEL_SUT, MANAGED_BY, RUN_DIR, TOOLS_DIR,
};

/// What `labvisor-boot`, run as `/x/name`, reads its parts from: `/x/name.parts/`.
pub const PARTS_SUFFIX: &str = ".parts";
/// The largest part of the agent binary: Engine 20.10 refuses a config of 1000 KiB or more
/// (1,023,999 bytes pass, 1,024,000 do not; measured), so a static agent of about 7 MB takes
/// 8 parts.
pub const PART_SIZE: usize = 960 * 1024;
/// The secret's file name under `/run/secrets`.
pub const PASSWORD_SECRET: &str = "labvisor-mqtt-password";
/// The agent's variable naming its password file.
pub const PASSWORD_FILE_ENV: &str = "LABVISOR_MQTT_PASSWORD_FILE";
/// The agent's variable holding its password (kept out of a service's environment).
const PASSWORD_ENV: &str = "LABVISOR_MQTT_PASSWORD=";
/// [`LABEL_ROLE`] of the binaries' configs.
pub const ROLE_BIN: &str = "bin";
/// [`LABEL_ROLE`] of a SUT's file configs.
pub const ROLE_FILE: &str = "file";
/// [`LABEL_ROLE`] of a SUT's login secret.
pub const ROLE_LOGIN: &str = "login";

/// A Docker config or secret to make sure of: its name is a hash of what it holds, so one of
/// that name that exists holds exactly this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    /// Its name.
    pub name: String,
    /// Its labels.
    pub labels: HashMap<String, String>,
    /// Its contents.
    pub data: Bytes,
}

impl Blob {
    /// Its contents as the API wants them (standard base64).
    pub fn data_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.data)
    }
}

/// The service of one agent and what must exist before it is created.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// The service.
    pub service: ServiceSpec,
    /// The configs it mounts, binaries first.
    pub configs: Vec<Blob>,
    /// The secret it mounts (the MQTT password), if any.
    pub secret: Option<Blob>,
}

/// The binaries as configs, named after their own hash: shared by every service of every
/// supervisor running these binaries.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The configs with their mount paths and modes: boot, healthcheck, the agent's manifest
    /// and parts.
    pub files: Vec<(Blob, String, u32)>,
}

impl Binaries {
    /// The configs of `tools` (which must hold the boot binary), labelled with `labels`.
    pub fn new(tools: &Tools, prefix: &str, labels: &HashMap<String, String>) -> Option<Binaries> {
        let boot = tools.boot.clone()?;
        let hash = short_hash(&[tools.hash.as_bytes(), &boot]);
        let mut labels = labels.clone();
        labels.insert(LABEL_ROLE.into(), ROLE_BIN.into());
        let blob = |what: &str, data: Bytes| Blob {
            name: format!("{prefix}labvisor.bin.{hash}.{what}"),
            labels: labels.clone(),
            data,
        };
        let mut files = Vec::new();
        for (what, path, program) in [
            ("agent", AGENT_PATH, &tools.agent),
            ("healthcheck", HEALTHCHECK_PATH, &tools.healthcheck),
        ] {
            // One config per mount: Swarm gets no config mounted twice.
            files.push((
                blob(&format!("{what}.boot"), boot.clone()),
                path.to_owned(),
                0o555,
            ));
            let dir = format!("{path}{PARTS_SUFFIX}");
            let parts: Vec<Bytes> = program
                .chunks(PART_SIZE)
                .map(Bytes::copy_from_slice)
                .collect();
            let manifest = format!("parts={}\nsize={}\n", parts.len(), program.len());
            files.push((
                blob(&format!("{what}.manifest"), Bytes::from(manifest)),
                format!("{dir}/manifest"),
                0o444,
            ));
            for (i, p) in parts.into_iter().enumerate() {
                files.push((
                    blob(&format!("{what}.{i:03}"), p),
                    format!("{dir}/{i:03}"),
                    0o444,
                ));
            }
        }
        Some(Binaries { files })
    }
}

/// The first 16 hex digits of a SHA-256 over `parts` (each length-prefixed).
fn short_hash(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What the runtime knows besides the spec.
#[derive(Debug, Clone)]
pub struct SwarmContext {
    /// `--name-prefix`.
    pub prefix: String,
    /// The supervisor's id.
    pub supervisor: String,
    /// Grace period before a stopped task is killed.
    pub stop_grace: std::time::Duration,
}

impl SwarmContext {
    fn labels(&self, role: &str, sut: Option<&str>) -> HashMap<String, String> {
        let mut l = HashMap::from([
            (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
            (LABEL_SUPERVISOR.to_owned(), self.supervisor.clone()),
            (LABEL_ROLE.to_owned(), role.to_owned()),
        ]);
        if let Some(s) = sut {
            l.insert(LABEL_SUT.to_owned(), s.to_owned());
        }
        l
    }
}

/// Why a spec cannot become a service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// The runtime was given no boot binary.
    #[error("the Swarm runtime needs the labvisor-boot binary (--boot-bin)")]
    NoBoot,
}

/// The service of `spec`, with the configs and secret it mounts.
pub fn deployment(
    spec: &ContainerSpec,
    bins: &Binaries,
    ctx: &SwarmContext,
) -> Result<Deployment, ServiceError> {
    let body = &spec.body;
    let host = body.host_config.clone().unwrap_or_default();
    let sut = spec.sut.as_str();
    let labels: HashMap<String, String> = body.labels.clone().unwrap_or_default();

    let mut env = Vec::new();
    let mut secret = None;
    for e in body.env.iter().flatten() {
        match e.strip_prefix(PASSWORD_ENV) {
            Some(password) => {
                secret = Some(Blob {
                    name: format!(
                        "{}labvisor.login.{}",
                        ctx.prefix,
                        short_hash(&[sut.as_bytes(), password.as_bytes()])
                    ),
                    labels: ctx.labels(ROLE_LOGIN, Some(sut)),
                    data: Bytes::copy_from_slice(password.as_bytes()),
                });
                env.push(format!(
                    "{PASSWORD_FILE_ENV}=/run/secrets/{PASSWORD_SECRET}"
                ));
            }
            None => env.push(e.clone()),
        }
    }

    let mut configs: Vec<Blob> = Vec::new();
    let mut config_refs = Vec::new();
    let mut add_config = |blob: &Blob, target: &str, mode: u32| {
        config_refs.push(TaskSpecContainerSpecConfigs {
            file: Some(TaskSpecContainerSpecFile1 {
                name: Some(target.to_owned()),
                uid: Some("0".into()),
                gid: Some("0".into()),
                mode: Some(mode),
            }),
            config_name: Some(blob.name.clone()),
            ..Default::default()
        });
        configs.push(blob.clone());
    };
    for (blob, target, mode) in &bins.files {
        add_config(blob, target, *mode);
    }
    for (path, mode, data) in &spec.uploads {
        let blob = Blob {
            name: format!(
                "{}labvisor.file.{}",
                ctx.prefix,
                short_hash(&[path.as_bytes(), data])
            ),
            labels: ctx.labels(ROLE_FILE, Some(sut)),
            data: data.clone(),
        };
        add_config(&blob, path, *mode);
    }

    let secrets = secret.as_ref().map(|s| {
        vec![TaskSpecContainerSpecSecrets {
            file: Some(TaskSpecContainerSpecFile {
                name: Some(PASSWORD_SECRET.into()),
                uid: Some("0".into()),
                gid: Some("0".into()),
                mode: Some(0o444),
            }),
            secret_name: Some(s.name.clone()),
            ..Default::default()
        }]
    });

    let container = TaskSpecContainerSpec {
        image: body.image.clone(),
        labels: Some(labels.clone()),
        command: Some(vec![AGENT_PATH.to_owned()]),
        args: Some(vec![]),
        hostname: body.hostname.clone(),
        env: Some(env),
        user: body.user.clone(),
        mounts: Some(mounts(&host)),
        stop_grace_period: Some(nanos(ctx.stop_grace)),
        health_check: body.healthcheck.clone().map(|h| HealthConfig {
            start_interval: None,
            ..h
        }),
        hosts: host.extra_hosts.as_ref().map(|h| hosts(h)),
        secrets,
        configs: Some(config_refs),
        init: host.init,
        capability_add: host.cap_add.clone(),
        capability_drop: host.cap_drop.clone(),
        // Not honoured by Engine 20.10 (API 1.41 has no such field), sent for newer engines;
        // the agent sets no_new_privs on itself in any case.
        privileges: host
            .security_opt
            .as_ref()
            .is_some_and(|o| o.iter().any(|o| o.starts_with("no-new-privileges")))
            .then(|| TaskSpecContainerSpecPrivileges {
                no_new_privileges: Some(true),
                ..Default::default()
            }),
        ..Default::default()
    };
    // labvisor's own network (`spec.network` set): the node's default bridge, no attachment.
    let networks = host
        .network_mode
        .as_ref()
        .filter(|m| spec.network.is_none() && m.as_str() != "default" && !m.is_empty())
        .map(|m| {
            vec![NetworkAttachmentConfig {
                target: Some(m.clone()),
                ..Default::default()
            }]
        });
    let task = TaskSpec {
        container_spec: Some(container),
        resources: Some(TaskSpecResources {
            limits: Some(Limit {
                nano_cpus: host.nano_cpus,
                memory_bytes: host.memory,
                pids: host.pids_limit,
            }),
            ..Default::default()
        }),
        restart_policy: Some(TaskSpecRestartPolicy {
            condition: Some(TaskSpecRestartPolicyConditionEnum::ANY),
            delay: Some(nanos(std::time::Duration::from_secs(2))),
            max_attempts: None,
            window: None,
        }),
        placement: (!spec.placement.is_empty()).then(|| TaskSpecPlacement {
            constraints: Some(spec.placement.clone()),
            ..Default::default()
        }),
        networks,
        ..Default::default()
    };
    let service = ServiceSpec {
        name: Some(spec.name.clone()),
        labels: Some(labels),
        task_template: Some(task),
        mode: Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated { replicas: Some(1) }),
            ..Default::default()
        }),
        // One agent per SUT at any time: the old task stops before the new one starts.
        update_config: Some(ServiceSpecUpdateConfig {
            parallelism: Some(1),
            order: Some(ServiceSpecUpdateConfigOrderEnum::STOP_FIRST),
            ..Default::default()
        }),
        endpoint_spec: Some(EndpointSpec {
            mode: Some(EndpointSpecModeEnum::DNSRR),
            ports: None,
        }),
        ..Default::default()
    };
    Ok(Deployment {
        service,
        configs,
        secret,
    })
}

/// The container's mounts without the tools volume (its binaries come as configs), plus the
/// `/labvisor/run` tmpfs.
fn mounts(host: &bollard::models::HostConfig) -> Vec<Mount> {
    let mut mounts: Vec<Mount> = host
        .mounts
        .iter()
        .flatten()
        .filter(|m| m.target.as_deref() != Some(TOOLS_DIR))
        .cloned()
        .collect();
    if host.tmpfs.as_ref().is_some_and(|t| t.contains_key(RUN_DIR)) {
        mounts.push(Mount {
            target: Some(RUN_DIR.into()),
            typ: Some(MountType::TMPFS),
            tmpfs_options: Some(MountTmpfsOptions {
                size_bytes: Some(1024 * 1024),
                mode: Some(0o1777),
                options: None,
            }),
            ..Default::default()
        });
    }
    mounts
}

/// Docker's `ExtraHosts` (`name:address`) as Swarm's `Hosts` (`address name`).
fn hosts(extra: &[String]) -> Vec<String> {
    extra
        .iter()
        .filter_map(|h| {
            h.split_once(':')
                .map(|(name, addr)| format!("{addr} {name}"))
        })
        .collect()
}

fn nanos(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// The configs and secret names a service spec mounts.
pub fn mounted_names(spec: &ServiceSpec) -> Vec<String> {
    let Some(c) = spec
        .task_template
        .as_ref()
        .and_then(|t| t.container_spec.as_ref())
    else {
        return Vec::new();
    };
    let configs = c
        .configs
        .iter()
        .flatten()
        .filter_map(|c| c.config_name.clone());
    let secrets = c
        .secrets
        .iter()
        .flatten()
        .filter_map(|s| s.secret_name.clone());
    configs.chain(secrets).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{container_spec, DATA_DIR};
    use labvisor_protocol::config::{load_str, Allow};

    fn spec_of(text: &str, files: &[(&str, &str)]) -> ContainerSpec {
        let dir = tempfile::tempdir().unwrap();
        for (n, c) in files {
            std::fs::write(dir.path().join(n), c).unwrap();
        }
        let cfg = load_str("dut1.toml", text, dir.path(), &Allow::all()).unwrap();
        let mut ctx = crate::runtime::fake::spec_context();
        ctx.agent_broker = Some("mqtt://10.0.0.1:1883".into());
        ctx.mqtt_username = Some("dut1".into());
        ctx.mqtt_password = Some("s3cret".into());
        let mut spec = container_spec(&cfg, text.as_bytes(), "h1", &ctx).unwrap();
        spec.placement = vec!["node.hostname==rack3".into()];
        spec
    }

    fn bins(agent_len: usize) -> Binaries {
        let tools = Tools::new(Bytes::from(vec![7u8; agent_len]), Bytes::from_static(b"HC"))
            .with_boot(Bytes::from_static(b"BOOT"));
        Binaries::new(&tools, "p-", &HashMap::new()).unwrap()
    }

    fn ctx() -> SwarmContext {
        SwarmContext {
            prefix: "p-".into(),
            supervisor: "fake".into(),
            stop_grace: std::time::Duration::from_secs(10),
        }
    }

    fn container(d: &Deployment) -> &TaskSpecContainerSpec {
        d.service
            .task_template
            .as_ref()
            .unwrap()
            .container_spec
            .as_ref()
            .unwrap()
    }

    #[test]
    fn the_agent_travels_in_parts_below_the_config_limit_with_a_manifest() {
        let b = bins(2 * PART_SIZE + 5);
        let names: Vec<&str> = b.files.iter().map(|(_, t, _)| t.as_str()).collect();
        assert_eq!(
            names,
            [
                AGENT_PATH,
                "/labvisor/bin/labvisor-agent.parts/manifest",
                "/labvisor/bin/labvisor-agent.parts/000",
                "/labvisor/bin/labvisor-agent.parts/001",
                "/labvisor/bin/labvisor-agent.parts/002",
                HEALTHCHECK_PATH,
                "/labvisor/bin/labvisor-healthcheck.parts/manifest",
                "/labvisor/bin/labvisor-healthcheck.parts/000",
            ]
        );
        assert!(b
            .files
            .iter()
            .all(|(blob, _, _)| blob.data.len() < 1_024_000));
        let manifest = &b.files[1].0.data;
        assert_eq!(
            &manifest[..],
            format!("parts=3\nsize={}\n", 2 * PART_SIZE + 5).as_bytes()
        );
        assert_eq!(b.files[4].0.data.len(), 5);
        assert_eq!(
            &b.files[5].0.data[..],
            b"BOOT",
            "the boot binary under both names"
        );
        assert_eq!(&b.files[7].0.data[..], b"HC");
        assert_eq!((b.files[0].2, b.files[2].2), (0o555, 0o444));
        assert!(b.files[5].0.name.ends_with(".healthcheck.boot"));
        assert!(b.files[3].0.name.starts_with("p-labvisor.bin."));
        assert!(b.files.iter().all(|(blob, _, _)| blob.name.len() <= 64));
        let no_boot = Tools::new(Bytes::from_static(b"A"), Bytes::from_static(b"H"));
        assert!(Binaries::new(&no_boot, "", &HashMap::new()).is_none());
    }

    #[test]
    fn the_password_leaves_the_environment_for_a_secret() {
        let d = deployment(&spec_of("image = \"img\"\n", &[]), &bins(10), &ctx()).unwrap();
        let env = container(&d).env.clone().unwrap();
        assert!(!env.iter().any(|e| e.contains("s3cret")), "{env:?}");
        assert!(env.contains(&format!(
            "{PASSWORD_FILE_ENV}=/run/secrets/{PASSWORD_SECRET}"
        )));
        assert!(env.contains(&"LABVISOR_MQTT_USERNAME=dut1".to_owned()));
        let secret = d.secret.unwrap();
        assert_eq!(&secret.data[..], b"s3cret");
        assert_eq!(secret.labels[LABEL_SUT], "dut1");
        let refs =
            container(&deployment(&spec_of("image = \"img\"\n", &[]), &bins(10), &ctx()).unwrap())
                .secrets
                .clone()
                .unwrap();
        assert_eq!(refs[0].secret_name.as_deref(), Some(secret.name.as_str()));
    }

    #[test]
    fn the_task_boots_from_configs_with_the_suts_mounts_and_limits() {
        let text = "image = \"img\"\nfiles = [\"a.yaml\"]\nextra_hosts = [\"dut:10.1.2.3\"]\n[resources]\npids = 64\n";
        let d = deployment(&spec_of(text, &[("a.yaml", "x: 1\n")]), &bins(10), &ctx()).unwrap();
        let c = container(&d);
        assert_eq!(c.command, Some(vec![AGENT_PATH.to_owned()]));
        assert_eq!(c.hostname.as_deref(), Some("dut1"));
        assert_eq!(c.hosts, Some(vec!["10.1.2.3 dut".to_owned()]));
        let mounts = c.mounts.clone().unwrap();
        let targets: Vec<_> = mounts.iter().filter_map(|m| m.target.as_deref()).collect();
        assert!(targets.contains(&DATA_DIR) && targets.contains(&RUN_DIR));
        assert!(!targets.contains(&TOOLS_DIR), "binaries come as configs");
        let targets: Vec<_> = c
            .configs
            .iter()
            .flatten()
            .filter_map(|r| r.file.as_ref()?.name.clone())
            .collect();
        assert!(
            targets.contains(&"/labvisor/sut/dut1.toml".to_owned()),
            "{targets:?}"
        );
        assert!(
            targets.contains(&"/labvisor/sut/a.yaml".to_owned()),
            "{targets:?}"
        );
        assert_eq!(d.configs.len(), 6 + 2);
        let t = d.service.task_template.as_ref().unwrap();
        assert_eq!(
            t.resources.as_ref().unwrap().limits.as_ref().unwrap().pids,
            Some(64)
        );
        assert_eq!(
            t.placement.as_ref().unwrap().constraints,
            Some(vec!["node.hostname==rack3".to_owned()])
        );
        assert_eq!(c.capability_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(
            d.service
                .mode
                .as_ref()
                .unwrap()
                .replicated
                .as_ref()
                .unwrap()
                .replicas,
            Some(1)
        );
        assert_eq!(
            d.service.endpoint_spec.as_ref().unwrap().mode,
            Some(EndpointSpecModeEnum::DNSRR)
        );
        let mut names = mounted_names(&d.service);
        names.sort();
        let mut made: Vec<String> = d.configs.iter().map(|c| c.name.clone()).collect();
        made.push(d.secret.as_ref().unwrap().name.clone());
        made.sort();
        assert_eq!(names, made);
    }
}
