//! The settings that hand the container power over the host: `privileged`, `cap_add`,
//! `no_new_privileges`, `devices` and `mounts`, each refused without its `--allow-*` flag;
//! `privileged` and `devices` refused under `--runtime swarm` whatever the flags say.

use std::collections::BTreeSet;

use super::super::raw::{RawConfig, RawMount};
use super::super::{Allow, Mount, Runtime, CAPABILITIES, DEFAULT_CAPABILITIES};
use super::checker::{k, Checker, Power};

/// The checked host-power settings.
pub(super) struct Posture {
    pub cap_add: Vec<String>,
    pub no_new_privileges: bool,
    pub mounts: Vec<Mount>,
}

/// Checks every host-power setting of `raw`, in the order of the config reference.
pub(super) fn posture(c: &mut Checker<'_>, raw: &RawConfig, allow: &Allow) -> Posture {
    let swarm = allow.runtime == Runtime::Swarm;
    if swarm && raw.privileged {
        c.refuse_under_swarm(
            k("privileged"),
            "Swarm services on Engine 20.10 cannot be privileged",
            "run this SUT under a supervisor with the local runtime on its host \
             (`labvisor supervise --runtime docker --allow-privileged`)",
        );
    }
    c.refuse_unless(
        !raw.privileged || allow.privileged || swarm,
        k("privileged"),
        Power {
            what: "privileged mode",
            why: "makes the container root on the host",
            flag: "allow-privileged",
        },
    );
    let cap_add = cap_add(c, &raw.cap_add, allow);
    let no_new_privileges = raw.no_new_privileges.unwrap_or(true);
    c.refuse_unless(
        no_new_privileges || allow.new_privileges,
        k("no_new_privileges"),
        Power {
            what: "turning no-new-privileges off",
            why: "lets a job's process gain privileges through setuid and file-capability binaries",
            flag: "allow-new-privileges",
        },
    );
    devices(c, &raw.devices, allow);
    let mounts = mounts(c, &raw.mounts, allow);
    Posture {
        cap_add,
        no_new_privileges,
        mounts,
    }
}

/// `cap_add`: known capabilities, not kept by default anyway, each once; without `CAP_`.
fn cap_add(c: &mut Checker<'_>, raw: &[String], allow: &Allow) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    c.refuse_unless(
        raw.is_empty() || allow.caps,
        k("cap_add"),
        Power {
            what: "adding capabilities",
            why: "gives jobs powers the default posture takes away (NET_RAW: sniffing and spoofing other containers' traffic)",
            flag: "allow-caps",
        },
    );
    for (i, cap) in raw.iter().enumerate() {
        let name = cap.strip_prefix("CAP_").unwrap_or(cap);
        if !CAPABILITIES.contains(&name) {
            c.add(
                &k("cap_add").index(i),
                format!("{cap:?} is not a Linux capability name (e.g. \"NET_RAW\", upper case, CAP_ optional)"),
            );
        } else if DEFAULT_CAPABILITIES.contains(&name) {
            c.add(
                &k("cap_add").index(i),
                format!("{cap:?} is kept by default; leave it out"),
            );
        } else if out.iter().any(|c| c == name) {
            c.add(&k("cap_add").index(i), format!("{cap:?} is listed twice"));
        } else {
            out.push(name.to_owned());
        }
    }
    out
}

/// `devices`: absolute paths under `/dev/`, each once.
fn devices(c: &mut Checker<'_>, raw: &[String], allow: &Allow) {
    let swarm = allow.runtime == Runtime::Swarm;
    if swarm && !raw.is_empty() {
        c.refuse_under_swarm(
            k("devices"),
            "Swarm services cannot pass host devices (moby/swarmkit#1244)",
            "run this SUT under a supervisor with the local runtime on the device's host \
             (`labvisor supervise --runtime docker --allow-devices`), or reach the device over \
             the network",
        );
    }
    c.refuse_unless(
        raw.is_empty() || allow.devices || swarm,
        k("devices"),
        Power {
            what: "devices",
            why: "give the container direct access to host hardware",
            flag: "allow-devices",
        },
    );
    let mut seen = BTreeSet::new();
    for (i, d) in raw.iter().enumerate() {
        if !d.starts_with("/dev/") || d.contains("/../") || d.ends_with("/..") {
            c.add(
                &k("devices").index(i),
                format!(
                    "{d:?} must be an absolute host device path under /dev/, e.g. \"/dev/ttyUSB0\""
                ),
            );
        } else if !seen.insert(d) {
            c.add(&k("devices").index(i), format!("{d:?} is listed twice"));
        }
    }
}

/// `mounts`: absolute `source` and `target`, never the container's root; read-only by default.
fn mounts(c: &mut Checker<'_>, raw: &[RawMount], allow: &Allow) -> Vec<Mount> {
    c.refuse_unless(
        raw.is_empty() || allow.host_mounts,
        k("mounts"),
        Power {
            what: "host bind mounts",
            why: "expose host files to the container",
            flag: "allow-host-mounts",
        },
    );
    let mut out = Vec::new();
    for (i, m) in raw.iter().enumerate() {
        let base = k("mounts").index(i);
        let mut abs = |field: &str, v: &Option<String>| -> String {
            match v {
                None => {
                    c.add(&base.key(field), "missing: give an absolute path");
                    String::new()
                }
                Some(p) if !p.starts_with('/') => {
                    c.add(&base.key(field), format!("{p:?} must be an absolute path"));
                    p.clone()
                }
                Some(p) => p.clone(),
            }
        };
        let source = abs("source", &m.source);
        let target = abs("target", &m.target);
        if target == "/" {
            c.add(
                &base.key("target"),
                "must not be the container's root directory",
            );
        }
        out.push(Mount {
            source,
            target,
            read_only: m.read_only.unwrap_or(true),
        });
    }
    out
}
