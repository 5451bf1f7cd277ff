//! The SUT file exactly as serde reads it: every table denies unknown keys, almost everything is
//! optional so that semantic validation (which reports every problem) sees as much as possible.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use super::{OnChildExit, OnUnhealthy};

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a SUT config table")]
pub(crate) struct RawConfig {
    pub image: Option<String>,
    pub command: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    pub files: Vec<String>,
    pub tail: Vec<String>,
    pub network: Option<String>,
    pub extra_hosts: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub privileged: bool,
    pub cap_add: Vec<String>,
    pub no_new_privileges: Option<bool>,
    pub devices: Vec<String>,
    pub mounts: Vec<RawMount>,
    pub health: RawHealth,
    pub job: RawJob,
    pub restart: RawRestart,
    pub resources: RawResources,
    pub log: RawLog,
    pub probe: Option<RawProbe>,
    pub build: Option<RawBuild>,
    pub device: Option<RawDevice>,
    // [health_check] (helper healthjob)
    pub health_check: Option<RawHealthCheck>,
    pub placement: Option<RawPlacement>,
}

/// `[placement]`: where the SUT's service runs in a swarm.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [placement] table")]
pub(crate) struct RawPlacement {
    pub host: Option<String>,
    pub constraints: Vec<String>,
}

/// `[device]`: how labvisor learns that the device process is busy with its own work.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [device] table")]
pub(crate) struct RawDevice {
    pub busy_glob: Vec<String>,
    pub drain_signal: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [health_check] table")]
pub(crate) struct RawHealthCheck {
    pub job: Option<String>,
    pub every: Option<RawDuration>,
    pub after_jobs: Option<u32>,
    pub timeout: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [build] table")]
pub(crate) struct RawBuild {
    pub context: Option<String>,
    pub dockerfile: Option<String>,
    pub args: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(
    default,
    deny_unknown_fields,
    expecting = "a mount table { source = \"/abs/host/path\", target = \"/abs/container/path\", read_only = true }"
)]
pub(crate) struct RawMount {
    pub source: Option<String>,
    pub target: Option<String>,
    pub read_only: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [health] table")]
pub(crate) struct RawHealth {
    pub heartbeat: Option<RawDuration>,
    pub max_age: Option<RawDuration>,
    pub interval: Option<RawDuration>,
    pub timeout: Option<RawDuration>,
    pub retries: Option<u32>,
    pub start_period: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [job] table")]
pub(crate) struct RawJob {
    pub command: Option<Vec<String>>,
    pub template: Option<String>,
    pub timeout: Option<RawDuration>,
    pub output_timeout: Option<RawDuration>,
    pub queue_limit: Option<u32>,
    pub max_payload: Option<RawSize>,
    pub requeue_lost: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [restart] table")]
pub(crate) struct RawRestart {
    pub on_unhealthy: Option<OnUnhealthy>,
    pub backoff_min: Option<RawDuration>,
    pub backoff_max: Option<RawDuration>,
    pub on_child_exit: Option<OnChildExit>,
    pub crash_loop_after: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [resources] table")]
pub(crate) struct RawResources {
    pub memory: Option<RawSize>,
    pub cpus: Option<f64>,
    pub pids: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [log] table")]
pub(crate) struct RawLog {
    pub max_size: Option<RawSize>,
    pub keep: Option<u32>,
    pub mqtt_rate: Option<RawSize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a [probe] table")]
pub(crate) struct RawProbe {
    pub url: Option<String>,
    pub command: Option<Vec<String>>,
    pub interval: Option<RawDuration>,
    pub timeout: Option<RawDuration>,
}

/// A duration string, parsed later (so that a bad one is one problem among others).
#[derive(Debug)]
pub(crate) struct RawDuration(pub String);

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string like \"10s\" or \"1m 30s\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawDuration, E> {
                Ok(RawDuration(v.to_owned()))
            }
        }
        d.deserialize_str(V)
    }
}

/// A size: integer bytes or a size string, parsed later.
#[derive(Debug)]
pub(crate) enum RawSize {
    Bytes(i128),
    Text(String),
}

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size: a number of bytes or a string like \"64KiB\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawSize, E> {
                Ok(RawSize::Bytes(v.into()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawSize, E> {
                Ok(RawSize::Bytes(v.into()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawSize, E> {
                Ok(RawSize::Text(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}
