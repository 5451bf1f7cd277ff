//! `labvisor import <dir>`: convert a testflinger-docker SUT directory into labvisor SUT files.
//!
//! The old stack kept three files per device:
//!
//! - `<sut>.conf`: the testflinger-agent config (YAML): `agent_id`, `server_address`,
//!   `job_queues`, `execution_basedir`, `global_timeout`, `output_timeout`, the phase commands;
//! - `<sut>.yaml`: the testflinger-cli job template (`job_queue`, `provision_data`, `test_data`);
//! - `<sut>_snappy.yaml`: the device-connector config (`device_ip`, `node_id`, ..., `env`).
//!
//! For every device whose triplet is complete and readable, `import` copies the three files to
//! the output directory and writes `<sut>.toml` next to them:
//!
//! | SUT key | from |
//! |---|---|
//! | `image` | `--image` (default [`DEFAULT_IMAGE`]) |
//! | `command` | `testflinger-agent -c /labvisor/sut/<sut>.conf` |
//! | `files` | the triplet |
//! | `tail` | `<execution_basedir>/*/*.log` (testflinger writes phase output only there; default basedir `/tmp/testflinger/run`) |
//! | `env` | the snappy file's `env` map, keys that are valid environment names |
//! | `job.command` | `testflinger-cli submit --poll {job_file}` |
//! | `job.template` | `<sut>.yaml` |
//! | `job.timeout`, `job.output_timeout` | `global_timeout`, `output_timeout` (seconds), when present |
//!
//! Every written file is checked with [`labvisor_protocol::config::load_file`]; one that does
//! not pass is removed again and the device counts as failed. A device with a missing or
//! unreadable file, or a name that is not a valid SUT name, is reported by file name and
//! skipped; the others are still imported. Hidden files (such as the old CLI directory's
//! `.reference.yaml`) and other file types are ignored.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use labvisor_protocol::config::{
    load_file, load_str, Allow, CONTAINER_FILES_DIR, MAX_DURATION, RESERVED_ENV_PREFIX,
};
use labvisor_protocol::SutName;
use serde_yaml_ng::Value;

/// The agent image written when `--image` is not given: an image with testflinger-agent,
/// testflinger-cli and the device connectors, which the lab builds itself.
pub const DEFAULT_IMAGE: &str = "testflinger-agent-host:latest";

/// testflinger-agent's default `execution_basedir`.
pub const DEFAULT_EXECUTION_BASEDIR: &str = "/tmp/testflinger/run";

/// `labvisor import` on the command line.
#[derive(Debug, Clone, clap::Args)]
pub struct ImportArgs {
    /// The old stack's SUT directory (`<sut>.conf`, `<sut>.yaml`, `<sut>_snappy.yaml`).
    pub dir: PathBuf,
    /// Where the SUT files and the copied triplets are written.
    #[arg(long, default_value = "sut")]
    pub out: PathBuf,
    /// The agent container image written into every SUT file.
    #[arg(long, default_value = DEFAULT_IMAGE)]
    pub image: String,
    /// Overwrite SUT files and triplet copies that already exist in `--out`.
    #[arg(long)]
    pub force: bool,
}

/// One device that was imported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    /// The SUT's name.
    pub sut: SutName,
    /// The written SUT file.
    pub toml: PathBuf,
    /// Things the user should look at (skipped env keys, ignored values, ...).
    pub warnings: Vec<String>,
}

/// One device that was not imported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    /// The device's name as found in the file names (may be an invalid SUT name).
    pub name: String,
    /// What is wrong, each naming the file concerned.
    pub problems: Vec<String>,
}

/// What an import did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImportReport {
    /// Imported devices, by name.
    pub imported: Vec<Imported>,
    /// Devices that failed, by name.
    pub failed: Vec<Failed>,
}

/// Errors that stop the whole import (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The input directory cannot be listed.
    #[error("cannot read {path}: {source}")]
    ReadDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The output directory cannot be created.
    #[error("cannot create {path}: {source}")]
    CreateOut {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// The three files of one device, as found in the directory.
#[derive(Debug, Default)]
struct Triplet {
    conf: Option<PathBuf>,
    template: Option<PathBuf>,
    snappy: Option<PathBuf>,
}

const SNAPPY_SUFFIX: &str = "_snappy.yaml";

/// Runs `labvisor import` and returns the process exit status: 0 when every device was
/// imported, 1 when one failed, 2 when the import could not run at all.
pub fn main(args: ImportArgs) -> std::process::ExitCode {
    let stdout = io::stdout();
    let stderr = io::stderr();
    match import_dir(&args.dir, &args.out, &args.image, args.force) {
        Ok(report) => {
            let _ = print_report(&report, &mut stdout.lock(), &mut stderr.lock());
            if report.failed.is_empty() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::from(1)
            }
        }
        Err(e) => {
            let _ = writeln!(stderr.lock(), "labvisor import: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Prints what was imported on `out` and what failed on `err`, then a summary on `out`.
pub fn print_report(
    report: &ImportReport,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> io::Result<()> {
    for i in &report.imported {
        writeln!(out, "imported {}: {}", i.sut, i.toml.display())?;
        for w in &i.warnings {
            writeln!(out, "  warning: {w}")?;
        }
    }
    for f in &report.failed {
        for p in &f.problems {
            writeln!(err, "labvisor import: {}: {p}", f.name)?;
        }
    }
    writeln!(
        out,
        "{} imported, {} failed",
        report.imported.len(),
        report.failed.len()
    )
}

/// Imports every device found in `dir` into `out` (created if missing).
pub fn import_dir(
    dir: &Path,
    out: &Path,
    image: &str,
    force: bool,
) -> Result<ImportReport, ImportError> {
    let read_dir = |source| ImportError::ReadDir {
        path: dir.to_path_buf(),
        source,
    };
    let mut devices: BTreeMap<String, Triplet> = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(read_dir)? {
        let path = entry.map_err(read_dir)?.path();
        let Some(file) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        if file.starts_with('.') || !path.is_file() {
            continue;
        }
        if let Some(name) = file.strip_suffix(SNAPPY_SUFFIX) {
            devices.entry(name.to_owned()).or_default().snappy = Some(path);
        } else if let Some(name) = file.strip_suffix(".conf") {
            devices.entry(name.to_owned()).or_default().conf = Some(path);
        } else if let Some(name) = file.strip_suffix(".yaml") {
            devices.entry(name.to_owned()).or_default().template = Some(path);
        }
    }
    std::fs::create_dir_all(out).map_err(|source| ImportError::CreateOut {
        path: out.to_path_buf(),
        source,
    })?;
    let mut report = ImportReport::default();
    for (name, triplet) in devices {
        if name.is_empty() {
            continue;
        }
        match import_one(&name, &triplet, out, image, force) {
            Ok(imported) => report.imported.push(imported),
            Err(problems) => report.failed.push(Failed { name, problems }),
        }
    }
    Ok(report)
}

/// A name close to `name` that is a valid SUT name, if there is one.
pub fn suggest_name(name: &str) -> Option<String> {
    let mut s: String = name
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    s = s
        .trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned();
    s.truncate(labvisor_protocol::name::MAX_NAME_LEN);
    SutName::new(&s).ok().map(|n| n.to_string())
}

fn import_one(
    name: &str,
    t: &Triplet,
    out: &Path,
    image: &str,
    force: bool,
) -> Result<Imported, Vec<String>> {
    let conf_name = format!("{name}.conf");
    let template_name = format!("{name}.yaml");
    let snappy_name = format!("{name}{SNAPPY_SUFFIX}");
    let mut problems = Vec::new();

    let sut = match SutName::new(name) {
        Ok(s) => Some(s),
        Err(e) => {
            let hint = match suggest_name(name) {
                Some(s) => format!(
                    "; rename the files to {s}.conf, {s}.yaml and {s}{SNAPPY_SUFFIX} (and the queue inside them) and import again"
                ),
                None => String::new(),
            };
            problems.push(format!("{name:?} is not a valid SUT name: {e}{hint}"));
            None
        }
    };

    let mut warnings = Vec::new();
    let conf = load_yaml(t.conf.as_deref(), &conf_name, "testflinger-agent config")
        .map_err(|p| problems.push(p))
        .ok();
    let template = load_yaml(t.template.as_deref(), &template_name, "job template")
        .map_err(|p| problems.push(p))
        .ok();
    let snappy = load_yaml(t.snappy.as_deref(), &snappy_name, "device-connector config")
        .map_err(|p| problems.push(p))
        .ok();

    let mut basedir = DEFAULT_EXECUTION_BASEDIR.to_owned();
    let mut timeout = None;
    let mut output_timeout = None;
    if let Some(conf) = &conf {
        for key in ["agent_id", "server_address", "job_queues"] {
            if conf.get(key).is_none() {
                problems.push(format!(
                    "{conf_name}: `{key}` is missing (testflinger-agent requires it)"
                ));
            }
        }
        match conf.get("execution_basedir") {
            None => {}
            Some(Value::String(s)) if s.starts_with('/') && !s.contains(['*', '?', '[']) => {
                basedir = s.trim_end_matches('/').to_owned();
                if basedir.is_empty() {
                    basedir = "/".to_owned();
                }
            }
            Some(v) => problems.push(format!(
                "{conf_name}: `execution_basedir` must be an absolute path without glob characters, found {}",
                show(v)
            )),
        }
        timeout = seconds(conf, "global_timeout", &conf_name, &mut warnings);
        output_timeout = seconds(conf, "output_timeout", &conf_name, &mut warnings);
        if let Some(text) = t
            .conf
            .as_deref()
            .and_then(|p| std::fs::read_to_string(p).ok())
        {
            let container_path = format!("{CONTAINER_FILES_DIR}/{snappy_name}");
            if text.replace(&container_path, "").contains(&snappy_name) {
                warnings.push(format!(
                    "{conf_name}: its commands refer to {snappy_name} elsewhere than {container_path}, where labvisor delivers it: update their -c paths"
                ));
            }
        }
    }
    if let Some(template) = &template {
        if template.get("job_queue").is_none() {
            problems.push(format!(
                "{template_name}: `job_queue` is missing (testflinger-cli requires it)"
            ));
        }
    }
    let mut env = BTreeMap::new();
    if let Some(snappy) = &snappy {
        match snappy.get("env") {
            None | Some(Value::Null) => {}
            Some(Value::Mapping(m)) => {
                for (k, v) in m {
                    let key = match k {
                        Value::String(s) => s.clone(),
                        other => show(other),
                    };
                    if !valid_env_key(&key) {
                        warnings.push(format!(
                            "{snappy_name}: env key {key:?} skipped: not a valid environment name (or reserved {RESERVED_ENV_PREFIX}*)"
                        ));
                        continue;
                    }
                    match scalar(v) {
                        Some(value) => {
                            env.insert(key, value);
                        }
                        None => warnings.push(format!(
                            "{snappy_name}: env {key} skipped: its value is not a string, number or boolean"
                        )),
                    }
                }
            }
            Some(v) => problems.push(format!(
                "{snappy_name}: `env` must be a mapping, found {}",
                show(v)
            )),
        }
    }

    let Some(sut) = sut else {
        return Err(problems);
    };
    if !problems.is_empty() {
        return Err(problems);
    }

    let toml_path = out.join(format!("{sut}.toml"));
    if !force && toml_path.exists() {
        return Err(vec![format!(
            "{} exists; pass --force to overwrite it, or another --out",
            toml_path.display()
        )]);
    }
    let sources = [
        (t.conf.as_deref(), &conf_name),
        (t.template.as_deref(), &template_name),
        (t.snappy.as_deref(), &snappy_name),
    ];
    for (src, file) in sources {
        let src = src.expect("checked above");
        let dst = out.join(file);
        if same_file(src, &dst) {
            continue;
        }
        if !force && dst.exists() {
            return Err(vec![format!(
                "{} exists; pass --force to overwrite it, or another --out",
                dst.display()
            )]);
        }
        if let Err(e) = std::fs::copy(src, &dst) {
            return Err(vec![format!(
                "{file}: cannot copy to {}: {e}",
                dst.display()
            )]);
        }
    }

    let text = render(&RenderInput {
        sut: &sut,
        image,
        files: [&conf_name, &template_name, &snappy_name],
        basedir: &basedir,
        env: &env,
        timeout,
        output_timeout,
    });
    let allow = Allow::default();
    if let Err(ps) = load_str(&format!("{sut}.toml"), &text, out, &allow) {
        return Err(ps
            .iter()
            .map(|p| format!("generated SUT file: {p}"))
            .collect());
    }
    if let Err(e) = std::fs::write(&toml_path, &text) {
        return Err(vec![format!("cannot write {}: {e}", toml_path.display())]);
    }
    if let Err(ps) = load_file(&toml_path, &allow) {
        let _ = std::fs::remove_file(&toml_path);
        return Err(ps.iter().map(ToString::to_string).collect());
    }
    Ok(Imported {
        sut,
        toml: toml_path,
        warnings,
    })
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Reads `path` as a YAML mapping; the error names the file.
fn load_yaml(path: Option<&Path>, file: &str, what: &str) -> Result<Value, String> {
    let Some(path) = path else {
        return Err(format!("{file} is missing (the {what})"));
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("{file}: cannot read: {e}"))?;
    let value: Value = serde_yaml_ng::from_str(&text)
        .map_err(|e| format!("{file}: not valid YAML ({what}): {e}"))?;
    match value {
        Value::Mapping(_) => Ok(value),
        other => Err(format!(
            "{file}: the {what} must be a YAML mapping, found {}",
            show(&other)
        )),
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

/// A TOML basic string.
fn q(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn array(items: &[&str]) -> String {
    let items: Vec<String> = items.iter().map(|s| q(s)).collect();
    format!("[{}]", items.join(", "))
}

struct RenderInput<'a> {
    sut: &'a SutName,
    image: &'a str,
    files: [&'a str; 3],
    basedir: &'a str,
    env: &'a BTreeMap<String, String>,
    timeout: Option<String>,
    output_timeout: Option<String>,
}

fn render(r: &RenderInput<'_>) -> String {
    let [conf, template, snappy] = r.files;
    let conf_in_container = format!("{CONTAINER_FILES_DIR}/{conf}");
    let tail = if r.basedir == "/" {
        "/*/*.log".to_owned()
    } else {
        format!("{}/*/*.log", r.basedir)
    };
    let mut s = String::new();
    s.push_str(&format!(
        "# {sut}: imported by `labvisor import` from the testflinger-docker files\n\
         # {conf}, {template} and {snappy}, copied next to this file.\n\
         # Check it with `labvisor check <dir>`.\n\n",
        sut = r.sut
    ));
    s.push_str("# An image with testflinger-agent, testflinger-cli and the device connectors.\n");
    s.push_str(&format!("image = {}\n\n", q(r.image)));
    s.push_str("# The device's long-running process: the testflinger agent, polling for jobs.\n");
    s.push_str(&format!(
        "command = {}\n\n",
        array(&["testflinger-agent", "-c", &conf_in_container])
    ));
    s.push_str(&format!(
        "# Delivered into the container under {CONTAINER_FILES_DIR}/.\nfiles = {}\n\n",
        array(&[conf, template, snappy])
    ));
    s.push_str(
        "# testflinger writes phase output only to <execution_basedir>/<job_id>/<phase>.log.\n",
    );
    s.push_str(&format!("tail = {}\n", array(&[&tail])));
    if !r.env.is_empty() {
        s.push_str(&format!("\n# From {snappy}'s env.\n[env]\n"));
        for (k, v) in r.env {
            s.push_str(&format!("{k} = {}\n", q(v)));
        }
    }
    s.push_str("\n[job]\n# A job is a testflinger job YAML, submitted to the server.\n");
    s.push_str(&format!(
        "command = {}\n",
        array(&["testflinger-cli", "submit", "--poll", "{job_file}"])
    ));
    s.push_str(&format!("template = {}\n", q(template)));
    if let Some(t) = &r.timeout {
        s.push_str(&format!("timeout = {}  # global_timeout of {conf}\n", q(t)));
    }
    if let Some(t) = &r.output_timeout {
        s.push_str(&format!(
            "output_timeout = {}  # output_timeout of {conf}\n",
            q(t)
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_are_valid_names() {
        assert_eq!(suggest_name("RPI4-01").as_deref(), Some("rpi4-01"));
        assert_eq!(suggest_name("Dell XPS.13").as_deref(), Some("dell-xps-13"));
        assert_eq!(suggest_name("_x").as_deref(), Some("x"));
        assert_eq!(suggest_name("..."), None);
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(q("a\"b\\c\nd\u{1}"), "\"a\\\"b\\\\c\\nd\\u0001\"");
        let text = format!("k = {}\n", q("x\"y\\z\t\u{7f}"));
        let v: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(v["k"].as_str(), Some("x\"y\\z\t\u{7f}"));
    }

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
