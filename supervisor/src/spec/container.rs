//! The create request of an agent container, built in named steps from a validated
//! [`SutConfig`] and the supervisor's [`SpecContext`]: environment, labels, volumes and mounts,
//! network, healthcheck, resources and security posture, and the archive uploaded before start.

use std::collections::HashMap;

use bollard::models::{
    ContainerCreateBody, DeviceMapping, HealthConfig, HostConfig, Mount, MountType,
    MountVolumeOptions, RestartPolicy, RestartPolicyNameEnum,
};
use bytes::Bytes;
use labvisor_protocol::config::{Health, Network, SutConfig, CONTAINER_FILES_DIR};
use labvisor_protocol::SutName;

use super::{
    archive, ContainerSpec, Named, SpecContext, SpecError, ToolsVolume, AGENT_PATH, DATA_DIR,
    HEALTHCHECK_PATH, LABEL_CONFIG_HASH, LABEL_ROLE, LABEL_SUT, MAX_INLINE_CONFIG,
    NO_NEW_PRIVILEGES, ROLE_TOOLS, RUN_DIR, RUN_TMPFS_OPTIONS, TOOLS_DIR,
};

/// Builds the container of `cfg`, whose SUT file holds `file_bytes`, with hash `hash`.
pub fn container_spec(
    cfg: &SutConfig,
    file_bytes: &[u8],
    hash: &str,
    ctx: &SpecContext,
) -> Result<ContainerSpec, SpecError> {
    let sut = &cfg.name;
    let config_path = format!("{CONTAINER_FILES_DIR}/{sut}.toml");
    let inline = cfg.files.is_empty() && file_bytes.len() <= MAX_INLINE_CONFIG;
    let volume = sut_volume(ctx, sut);
    let tools = tools_volume(cfg, ctx);
    let (network_mode, network) = network(cfg, ctx);
    let uploads = upload(cfg, file_bytes, config_path.clone(), inline);
    let mut host_config = HostConfig {
        init: Some(true),
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
            maximum_retry_count: None,
        }),
        mounts: Some(mounts(cfg, &volume, &tools)),
        tmpfs: Some(HashMap::from([(
            RUN_DIR.to_owned(),
            RUN_TMPFS_OPTIONS.to_owned(),
        )])),
        network_mode: Some(network_mode),
        extra_hosts: extra_hosts(cfg),
        ..Default::default()
    };
    resources(cfg, &mut host_config);
    posture(cfg, &mut host_config);
    let body = ContainerCreateBody {
        hostname: (cfg.network != Network::Host).then(|| sut.to_string()),
        image: Some(cfg.image.clone()),
        entrypoint: Some(vec![AGENT_PATH.into()]),
        cmd: Some(vec![]),
        env: Some(env(cfg, file_bytes, &config_path, inline, ctx)?),
        labels: Some(labels(cfg, hash, ctx)),
        healthcheck: Some(healthcheck(&cfg.health)),
        host_config: Some(host_config),
        ..Default::default()
    };
    Ok(ContainerSpec {
        sut: sut.clone(),
        name: ctx.container_name(sut),
        hash: hash.to_owned(),
        body,
        volume,
        legacy_volume: ctx.legacy_volume(sut),
        network,
        tools,
        archive: upload_archive(&uploads)?,
        uploads,
        placement: cfg.placement.swarm_constraints(),
    })
}

/// The agent's environment: where its SUT file is (and its contents when `inline`), the
/// broker, its CA and login, the topic prefix, then the SUT's own `env`.
fn env(
    cfg: &SutConfig,
    file_bytes: &[u8],
    config_path: &str,
    inline: bool,
    ctx: &SpecContext,
) -> Result<Vec<String>, SpecError> {
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
    env.extend(login(&cfg.name, ctx)?);
    env.extend(cfg.env.iter().map(|(k, v)| format!("{k}={v}")));
    Ok(env)
}

/// The agent's MQTT login: its own (the SUT's name and its password file) with
/// `--agent-credentials`, else the shared user name and password when set.
fn login(sut: &SutName, ctx: &SpecContext) -> Result<Vec<String>, SpecError> {
    let mut env = Vec::new();
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
    Ok(env)
}

/// The container's labels: the SUT's own, then the supervisor's (which win), the SUT's name
/// and the config hash.
fn labels(cfg: &SutConfig, hash: &str, ctx: &SpecContext) -> HashMap<String, String> {
    let mut labels: HashMap<String, String> = cfg
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.extend(ctx.base_labels());
    labels.insert(LABEL_SUT.into(), cfg.name.to_string());
    labels.insert(LABEL_CONFIG_HASH.into(), hash.to_owned());
    labels
}

/// The SUT's named volume, labelled with the supervisor's labels and the SUT.
fn sut_volume(ctx: &SpecContext, sut: &SutName) -> Named {
    let mut labels = ctx.base_labels();
    labels.insert(LABEL_SUT.into(), sut.to_string());
    Named {
        name: ctx.volume_name(sut),
        labels,
    }
}

/// The tools volume, filled through a helper made from the SUT's own image.
fn tools_volume(cfg: &SutConfig, ctx: &SpecContext) -> ToolsVolume {
    let mut labels = ctx.base_labels();
    labels.insert(LABEL_ROLE.into(), ROLE_TOOLS.into());
    ToolsVolume {
        volume: Named {
            name: ctx.tools_volume_name(),
            labels,
        },
        tools: ctx.tools.clone(),
        helper_image: cfg.image.clone(),
        helper_name: ctx.tools_helper_name(),
    }
}

/// The SUT's volume at [`DATA_DIR`], the tools volume read-only at [`TOOLS_DIR`], then the
/// SUT's bind mounts.
fn mounts(cfg: &SutConfig, volume: &Named, tools: &ToolsVolume) -> Vec<Mount> {
    // The engine creates a missing volume with its labels as part of the create: no separate
    // call per container. The container may be created before the tools volume is filled,
    // and then makes it.
    let named = |target: &str, vol: &Named, read_only: bool| Mount {
        target: Some(target.into()),
        source: Some(vol.name.clone()),
        typ: Some(MountType::VOLUME),
        read_only: Some(read_only),
        volume_options: Some(MountVolumeOptions {
            labels: Some(vol.labels.clone()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut mounts = vec![
        named(DATA_DIR, volume, false),
        named(TOOLS_DIR, &tools.volume, true),
    ];
    mounts.extend(cfg.mounts.iter().map(|m| Mount {
        target: Some(m.target.clone()),
        source: Some(m.source.clone()),
        typ: Some(MountType::BIND),
        read_only: Some(m.read_only),
        ..Default::default()
    }));
    mounts
}

/// The network mode, and labvisor's own network to make sure of when it is that one (the
/// first agent network; [`ContainerSpec::on_agent_network`] puts the container on another).
fn network(cfg: &SutConfig, ctx: &SpecContext) -> (String, Option<Named>) {
    match &cfg.network {
        Network::Labvisor => {
            let n = ctx.agent_network(1);
            (n.name.clone(), Some(n))
        }
        Network::Host => ("host".to_owned(), None),
        Network::Named(n) => (n.clone(), None),
    }
}

/// `extra_hosts` as Docker's `HostConfig.ExtraHosts` (`name:address`, `host-gateway` left for
/// the engine to resolve); `None` when there are none.
fn extra_hosts(cfg: &SutConfig) -> Option<Vec<String>> {
    (!cfg.extra_hosts.is_empty()).then(|| cfg.extra_hosts.iter().map(ToString::to_string).collect())
}

/// Memory, CPU and pids limits from `[resources]`.
fn resources(cfg: &SutConfig, host: &mut HostConfig) {
    let r = &cfg.resources;
    host.memory = r.memory.map(|m| i64::try_from(m.get()).unwrap_or(i64::MAX));
    host.nano_cpus = r.cpus.map(|c| (c * 1e9) as i64);
    host.pids_limit = Some(i64::from(r.pids));
}

/// Privileges: every capability but the agents' default set (and the SUT's `cap_add`) dropped,
/// which a privileged container has anyway; `no-new-privileges` unless turned off; devices.
fn posture(cfg: &SutConfig, host: &mut HostConfig) {
    host.privileged = Some(cfg.privileged);
    host.cap_drop = (!cfg.privileged).then(|| vec!["ALL".to_owned()]);
    host.cap_add = (!cfg.privileged).then(|| {
        labvisor_protocol::config::DEFAULT_CAPABILITIES
            .iter()
            .map(|c| (*c).to_owned())
            .chain(cfg.cap_add.iter().cloned())
            .collect()
    });
    host.security_opt = cfg
        .no_new_privileges
        .then(|| vec![NO_NEW_PRIVILEGES.to_owned()]);
    host.devices = (!cfg.devices.is_empty()).then(|| {
        cfg.devices
            .iter()
            .map(|d| DeviceMapping {
                path_on_host: Some(d.clone()),
                path_in_container: Some(d.clone()),
                cgroup_permissions: Some("rwm".into()),
            })
            .collect()
    });
}

/// The healthcheck in exec form with the `[health]` timings, in nanoseconds. The supervisor
/// resolves an `auto` interval from the lab's size before (`crate::plan::hang`); one left
/// `auto` gets its floor.
fn healthcheck(h: &Health) -> HealthConfig {
    HealthConfig {
        test: Some(vec!["CMD".into(), HEALTHCHECK_PATH.into()]),
        interval: Some(nanos(h.interval.shortest())),
        timeout: Some(nanos(h.timeout)),
        retries: Some(i64::from(h.retries.get())),
        start_period: Some(if h.start_period.is_zero() {
            0
        } else {
            nanos(h.start_period)
        }),
        start_interval: None,
    }
}

fn nanos(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_nanos())
        .unwrap_or(i64::MAX)
        .max(1_000_000)
}

/// The archive of `uploads`; `None` when there is nothing to upload.
fn upload_archive(uploads: &[(String, u32, Bytes)]) -> Result<Option<Vec<Bytes>>, SpecError> {
    if uploads.is_empty() {
        return Ok(None);
    }
    Ok(Some(archive(uploads)?))
}

/// The files put into the container before start: the SUT file at `config_path` and its
/// `files`; none when the SUT file is passed `inline`.
fn upload(
    cfg: &SutConfig,
    file_bytes: &[u8],
    config_path: String,
    inline: bool,
) -> Vec<(String, u32, Bytes)> {
    if inline {
        return Vec::new();
    }
    let mut files: Vec<(String, u32, Bytes)> =
        vec![(config_path, 0o644, Bytes::copy_from_slice(file_bytes))];
    files.extend(cfg.files.iter().map(|f| {
        (
            f.container_path(),
            0o644,
            Bytes::copy_from_slice(&f.content),
        )
    }));
    files
}

#[cfg(test)]
mod tests {
    use super::*;
    use labvisor_protocol::config::{load_str, Allow};

    fn cfg(text: &str) -> SutConfig {
        let dir = tempfile::tempdir().unwrap();
        load_str("dut1.toml", text, dir.path(), &Allow::all()).unwrap()
    }

    #[test]
    fn healthcheck_timings_are_nanoseconds_of_at_least_a_millisecond() {
        let mut h = cfg("image = \"img\"\n").health;
        h.interval =
            labvisor_protocol::config::HealthInterval::Every(std::time::Duration::from_secs(2));
        h.timeout = std::time::Duration::from_micros(10);
        h.start_period = std::time::Duration::ZERO;
        let c = healthcheck(&h);
        assert_eq!(c.interval, Some(2_000_000_000));
        assert_eq!(
            c.timeout,
            Some(1_000_000),
            "clamped to Docker's 1 ms minimum"
        );
        assert_eq!(c.start_period, Some(0), "zero stays zero: no start period");
        assert_eq!(
            c.test,
            Some(vec!["CMD".to_owned(), HEALTHCHECK_PATH.to_owned()])
        );
    }

    #[test]
    fn posture_drops_capabilities_unless_privileged_and_maps_devices() {
        let mut host = HostConfig::default();
        posture(
            &cfg("image = \"img\"\ndevices = [\"/dev/null\"]\n"),
            &mut host,
        );
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(host.security_opt, Some(vec![NO_NEW_PRIVILEGES.to_owned()]));
        let devices = host.devices.unwrap();
        assert_eq!(devices[0].path_in_container.as_deref(), Some("/dev/null"));
        assert_eq!(devices[0].cgroup_permissions.as_deref(), Some("rwm"));
        let mut host = HostConfig::default();
        posture(&cfg("image = \"img\"\nprivileged = true\n"), &mut host);
        assert_eq!((host.privileged, host.cap_drop), (Some(true), None));
        assert_eq!(host.devices, None);
    }

    #[test]
    fn resources_become_engine_limits() {
        let mut host = HostConfig::default();
        resources(
            &cfg("image = \"img\"\n[resources]\ncpus = 1.5\npids = 64\n"),
            &mut host,
        );
        assert_eq!(host.nano_cpus, Some(1_500_000_000));
        assert_eq!(host.pids_limit, Some(64));
        assert_eq!(host.memory, None);
    }

    #[test]
    fn extra_hosts_become_docker_extra_hosts() {
        let c = cfg(
            "image = \"img\"\nextra_hosts = [\"tfserver:host-gateway\", \"dut:[2001:db8::5]\"]\n",
        );
        assert_eq!(
            extra_hosts(&c),
            Some(vec![
                "tfserver:host-gateway".to_owned(),
                "dut:2001:db8::5".to_owned()
            ])
        );
        assert_eq!(extra_hosts(&cfg("image = \"img\"\n")), None);
    }

    #[test]
    fn the_supervisors_labels_win_over_the_suts_own() {
        let c = cfg("image = \"img\"\n[labels]\nx = \"mine\"\nmine = \"1\"\n");
        let ctx = super::super::tests::ctx();
        let l = labels(&c, "h1", &ctx);
        assert_eq!(l[LABEL_SUT], "dut1");
        assert_eq!(l[LABEL_CONFIG_HASH], "h1");
        assert_eq!(l["mine"], "1");
        assert_eq!(l["x"], "y", "--extra-label wins over the SUT's own");
    }
}
