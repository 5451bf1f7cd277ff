//! Reading one device's triplet: the YAML files, and what `labvisor import` takes from them
//! (execution directory, timeouts, environment), with the problems and warnings found.

use std::collections::BTreeMap;
use std::path::Path;

use labvisor_protocol::config::{CONTAINER_FILES_DIR, MAX_DURATION, RESERVED_ENV_PREFIX};
use serde_yaml_ng::Value;

use super::{Triplet, DEFAULT_EXECUTION_BASEDIR, DEFAULT_LOGGING_BASEDIR};

/// The file names of one device's triplet.
pub(super) struct Names {
    pub conf: String,
    pub template: String,
    pub snappy: String,
}

impl Names {
    pub fn of(name: &str) -> Self {
        Names {
            conf: format!("{name}.conf"),
            template: format!("{name}.yaml"),
            snappy: format!("{name}{}", super::SNAPPY_SUFFIX),
        }
    }

    /// Agent config, job template, device-connector config.
    pub fn all(&self) -> [&str; 3] {
        [&self.conf, &self.template, &self.snappy]
    }
}

/// What a device's triplet gives its SUT file, and what is wrong with it.
pub(super) struct Device {
    /// testflinger's `execution_basedir`, without a trailing `/`.
    pub basedir: String,
    /// testflinger's `logging_basedir` (where `testflinger-agent.log` is), when it is a path the
    /// probe's shell command can hold as it is.
    pub log_dir: Option<String>,
    pub timeout: Option<String>,
    pub output_timeout: Option<String>,
    /// `server_address` as a URL (`http://` added when it has no scheme, as the agent does).
    pub server: Option<String>,
    pub env: BTreeMap<String, String>,
    /// Things to look at; the import goes on.
    pub warnings: Vec<String>,
    /// Things that stop the import of this device.
    pub problems: Vec<String>,
}

/// Why one of the triplet's YAML files cannot be used.
#[derive(Debug, thiserror::Error)]
enum YamlProblem {
    #[error("{file} is missing (the {what})")]
    Missing { file: String, what: &'static str },
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: not valid YAML ({what}): {source}")]
    Parse {
        file: String,
        what: &'static str,
        source: serde_yaml_ng::Error,
    },
    #[error("{file}: the {what} must be a YAML mapping, found {found}")]
    NotMapping {
        file: String,
        what: &'static str,
        found: String,
    },
}

/// Reads the triplet `t` of files `names`.
pub(super) fn device(t: &Triplet, names: &Names) -> Device {
    let mut d = Device {
        basedir: DEFAULT_EXECUTION_BASEDIR.to_owned(),
        log_dir: Some(DEFAULT_LOGGING_BASEDIR.to_owned()),
        timeout: None,
        output_timeout: None,
        server: None,
        env: BTreeMap::new(),
        warnings: Vec::new(),
        problems: Vec::new(),
    };
    let mut load = |path: Option<&Path>, file: &str, what| {
        load_yaml(path, file, what)
            .map_err(|p| d.problems.push(p.to_string()))
            .ok()
    };
    let conf = load(t.conf.as_deref(), &names.conf, "testflinger-agent config");
    let template = load(t.template.as_deref(), &names.template, "job template");
    let snappy = load(
        t.snappy.as_deref(),
        &names.snappy,
        "device-connector config",
    );
    if let Some(conf) = &conf {
        d.read_conf(conf, t.conf.as_deref(), names);
    }
    if template.is_some_and(|t| t.get("job_queue").is_none()) {
        d.problems.push(format!(
            "{}: `job_queue` is missing (testflinger-cli requires it)",
            names.template
        ));
    }
    if let Some(snappy) = &snappy {
        d.read_env(snappy, &names.snappy);
    }
    d
}

impl Device {
    /// The testflinger-agent config: required keys, `execution_basedir`, the timeouts, and
    /// whether its commands find the device-connector config where labvisor puts it.
    fn read_conf(&mut self, conf: &Value, path: Option<&Path>, names: &Names) {
        let conf_name = &names.conf;
        for key in ["agent_id", "server_address", "job_queues"] {
            if conf.get(key).is_none() {
                self.problems.push(format!(
                    "{conf_name}: `{key}` is missing (testflinger-agent requires it)"
                ));
            }
        }
        match conf.get("execution_basedir") {
            None => {}
            Some(Value::String(s)) if s.starts_with('/') && !s.contains(['*', '?', '[']) => {
                self.basedir = s.trim_end_matches('/').to_owned();
                if self.basedir.is_empty() {
                    self.basedir = "/".to_owned();
                }
            }
            Some(v) => self.problems.push(format!(
                "{conf_name}: `execution_basedir` must be an absolute path without glob characters, found {}",
                show(v)
            )),
        }
        self.read_log_dir(conf, conf_name);
        self.server = match conf.get("server_address") {
            Some(Value::String(a)) if a.contains("://") => Some(a.trim_end_matches('/').to_owned()),
            Some(Value::String(a)) if !a.is_empty() => Some(format!("http://{a}")),
            _ => None,
        };
        self.timeout = seconds(conf, "global_timeout", conf_name, &mut self.warnings);
        self.output_timeout = seconds(conf, "output_timeout", conf_name, &mut self.warnings);
        let snappy_name = &names.snappy;
        if let Some(text) = path.and_then(|p| std::fs::read_to_string(p).ok()) {
            let container_path = format!("{CONTAINER_FILES_DIR}/{snappy_name}");
            if text
                .replace(&container_path, "")
                .contains(snappy_name.as_str())
            {
                self.warnings.push(format!(
                    "{conf_name}: its commands refer to {snappy_name} elsewhere than {container_path}, where labvisor delivers it: update their -c paths"
                ));
            }
        }
    }

    /// `logging_basedir`, for the exec probe that reads the agent's log; one the probe's shell
    /// command cannot hold as it is (not absolute, or with characters other than letters,
    /// digits and `/._-`) leaves the SUT without the probe, with a warning.
    fn read_log_dir(&mut self, conf: &Value, conf_name: &str) {
        let Some(v) = conf.get("logging_basedir") else {
            return;
        };
        let plain = |s: &str| {
            s.starts_with('/')
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/._-".contains(c))
        };
        match v {
            Value::String(s) if plain(s) => {
                let dir = s.trim_end_matches('/');
                self.log_dir = Some(if dir.is_empty() { "" } else { dir }.to_owned());
            }
            other => {
                self.log_dir = None;
                self.warnings.push(format!(
                    "{conf_name}: `logging_basedir` {} is not a plain absolute path: no [probe] written",
                    show(other)
                ));
            }
        }
    }

    /// The device-connector config's `env`: valid names with scalar values.
    fn read_env(&mut self, snappy: &Value, snappy_name: &str) {
        let m = match snappy.get("env") {
            None | Some(Value::Null) => return,
            Some(Value::Mapping(m)) => m,
            Some(v) => {
                self.problems.push(format!(
                    "{snappy_name}: `env` must be a mapping, found {}",
                    show(v)
                ));
                return;
            }
        };
        for (k, v) in m {
            let key = match k {
                Value::String(s) => s.clone(),
                other => show(other),
            };
            if !valid_env_key(&key) {
                self.warnings.push(format!(
                    "{snappy_name}: env key {key:?} skipped: not a valid environment name (or reserved {RESERVED_ENV_PREFIX}*)"
                ));
                continue;
            }
            match scalar(v) {
                Some(value) => {
                    self.env.insert(key, value);
                }
                None => self.warnings.push(format!(
                    "{snappy_name}: env {key} skipped: its value is not a string, number or boolean"
                )),
            }
        }
    }
}

/// Reads `path` as a YAML mapping; the error names the file.
fn load_yaml(path: Option<&Path>, file: &str, what: &'static str) -> Result<Value, YamlProblem> {
    let file = file.to_owned();
    let Some(path) = path else {
        return Err(YamlProblem::Missing { file, what });
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(source) => return Err(YamlProblem::Read { file, source }),
    };
    match serde_yaml_ng::from_str(&text) {
        Ok(value @ Value::Mapping(_)) => Ok(value),
        Ok(other) => Err(YamlProblem::NotMapping {
            file,
            what,
            found: show(&other),
        }),
        Err(source) => Err(YamlProblem::Parse { file, what, source }),
    }
}

/// A positive whole number of seconds under `key`, as a duration string; a bad value is a
/// warning (the labvisor default applies).
fn seconds(conf: &Value, key: &str, file: &str, warnings: &mut Vec<String>) -> Option<String> {
    let v = conf.get(key)?;
    match v.as_u64() {
        Some(s) if s > 0 && s <= MAX_DURATION.as_secs() => Some(format!("{s}s")),
        _ => {
            warnings.push(format!(
                "{file}: `{key}` ignored: expected seconds between 1 and {}, found {}",
                MAX_DURATION.as_secs(),
                show(v)
            ));
            None
        }
    }
}

fn valid_env_key(k: &str) -> bool {
    let mut chars = k.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !k.starts_with(RESERVED_ENV_PREFIX)
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A short rendering of a YAML value for messages.
fn show(v: &Value) -> String {
    match v {
        Value::Null => "nothing".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Sequence(_) => "a list".to_owned(),
        Value::Mapping(_) => "a mapping".to_owned(),
        Value::Tagged(_) => "a tagged value".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_keys() {
        for ok in ["DEVICE_IP", "_x", "a1"] {
            assert!(valid_env_key(ok), "{ok}");
        }
        for bad in ["", "1A", "A-B", "LABVISOR_X", "A B"] {
            assert!(!valid_env_key(bad), "{bad}");
        }
    }
}
