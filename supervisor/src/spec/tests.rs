use super::*;
use bollard::models::MountType;
use labvisor_protocol::config::{load_str, Allow};
use std::io::Read;

pub(super) fn ctx() -> SpecContext {
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
    let text = "image = \"img\"\n[env]\nA = \"1\"\n[health]\ninterval = \"2s\"\ntimeout = \"1s\"\n";
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

/// A container goes on agent network `n` (mode and the network made sure of, labelled as an
/// agent network); one on a named network or `host` stays there, with nothing to make.
#[test]
fn a_container_goes_on_its_agent_network() {
    let dir = tempfile::tempdir().unwrap();
    let allow = Allow {
        network: true,
        host_network: true,
        ..Allow::default()
    };
    let spec = |text: &str| {
        let cfg = load_str("dut1.toml", text, dir.path(), &allow).unwrap();
        container_spec(&cfg, text.as_bytes(), &cfg.hash(), &ctx()).unwrap()
    };
    let mode = |s: &ContainerSpec| s.body.host_config.as_ref().unwrap().network_mode.clone();
    let s = spec("image = \"img\"\n").on_agent_network(3, &ctx());
    assert_eq!(mode(&s).as_deref(), Some("t-labvisor.net.3"));
    let net = s.network.unwrap();
    assert_eq!(net.name, "t-labvisor.net.3");
    assert_eq!(net.labels[LABEL_ROLE], ROLE_NETWORK);
    assert_eq!(net.labels[LABEL_SUPERVISOR], "lab");
    assert_eq!(net.labels["x"], "y");
    for (text, want) in [
        ("image = \"img\"\nnetwork = \"lab-net\"\n", "lab-net"),
        ("image = \"img\"\nnetwork = \"host\"\n", "host"),
    ] {
        let s = spec(text).on_agent_network(3, &ctx());
        assert_eq!(mode(&s).as_deref(), Some(want));
        assert!(s.network.is_none());
    }
}
