//! From text to a [`SutConfig`]: syntax, serde, then semantic checks that collect every problem.
//!
//! [`load`] parses; [`build`] runs one check per section, in the order of the config reference
//! (so problems come out in that order), each in the module of its concern:
//!
//! - [`checker`]: the problem collector and the value checks every section shares;
//! - [`container`]: `image`, `command`, `env`, `tail`, `network`, `labels`;
//! - [`hosts`]: the `extra_hosts` key;
//! - [`posture`]: the host-power settings and their `--allow-*` refusals;
//! - [`paths`]: paths next to the SUT file and `files`;
//! - [`sections`]: `[health]`, `[job]`, `[restart]`, `[resources]`, `[log]`;
//! - [`probe`]: `[probe]`, its URL or its exec command;
//! - [`build_section`]: the `[build]` section;
//! - [`device`]: the `[device]` section (the device's own work);
//! - [`health_check`]: the `[health_check]` section;
//! - [`placement`]: the `[placement]` section (where a SUT runs in a swarm).

mod build_section;
mod checker;
mod container;
mod device;
mod health_check;
mod hosts;
mod paths;
mod placement;
mod posture;
mod probe;
mod sections;

use std::path::Path;

use toml::de::DeTable;

use super::locate::{line_of, path_at, KeyPath};
use super::raw::RawConfig;
use super::{Allow, Problem, Runtime, SutConfig};
use crate::name::SutName;
use checker::Checker;
pub(crate) use hosts::check_host_name;

/// Parses and validates one SUT file. `display` names the file in problems, `stem` is the SUT name.
pub(crate) fn load(
    display: &str,
    stem: &str,
    text: &str,
    sut_dir: &Path,
    allow: &Allow,
    check_build: bool,
) -> Result<SutConfig, Vec<Problem>> {
    let (doc, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        return Err(syntax
            .into_iter()
            .map(|e| Problem {
                file: display.to_owned(),
                key: String::new(),
                line: Some(e.span().map_or(1, |s| line_of(text, s.start))),
                message: format!("TOML syntax error: {}", e.message()),
            })
            .collect());
    }
    let mut c = Checker {
        file: display,
        text,
        doc: doc.get_ref(),
        problems: Vec::new(),
    };
    // The name is checked even if the contents do not parse.
    let name = sut_name(&mut c, stem);
    let raw: RawConfig = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            let problem = serde_problem(&c, &e);
            c.problems.push(problem);
            return Err(c.problems);
        }
    };
    let config = build(&mut c, name, raw, sut_dir, allow, check_build);
    match config {
        Some(cfg) if c.problems.is_empty() => Ok(cfg),
        _ => Err(c.problems),
    }
}

/// The SUT name the file stem gives, if it is a valid one and not reserved.
fn sut_name(c: &mut Checker<'_>, stem: &str) -> Option<SutName> {
    match SutName::new(stem) {
        Ok(n) if n.is_reserved() => {
            c.add(
                &KeyPath::of(&["name"]),
                format!(
                    "the file name gives SUT name {stem:?}, which is reserved: labvisor/... is \
                     the control plane's topic space (supervisor status, reply spaces), which a \
                     SUT's login would be given; rename the file"
                ),
            );
            None
        }
        Ok(n) => Some(n),
        Err(e) => {
            c.add(
                &KeyPath::of(&["name"]),
                format!("the file name gives SUT name {stem:?}, which is not valid: {e}; rename the file"),
            );
            None
        }
    }
}

/// The one problem of a file serde cannot read (unknown key, wrong type), at its key.
fn serde_problem(c: &Checker<'_>, e: &toml::de::Error) -> Problem {
    let span = e.span();
    let key = span
        .as_ref()
        .and_then(|s| path_at(c.doc, s.start))
        .map(|p| p.to_string())
        .unwrap_or_default();
    let line = span.map(|s| line_of(c.text, s.start));
    let mut message = e.message().trim().to_owned();
    if key.is_empty() {
        message = format!("invalid config: {message}");
    }
    Problem {
        file: c.file.to_owned(),
        key,
        line,
        message,
    }
}

/// Checks every section of `raw`; `None` if the name or a required value is missing.
fn build(
    c: &mut Checker<'_>,
    name: Option<SutName>,
    mut raw: RawConfig,
    sut_dir: &Path,
    allow: &Allow,
    check_build: bool,
) -> Option<SutConfig> {
    let image = container::image(c, raw.image.take());
    container::command(c, raw.command.as_deref());
    container::env(c, &raw.env);
    let files = paths::files(c, &raw.files, sut_dir);
    container::tail(c, &raw.tail);
    let network = container::network(c, raw.network.as_deref(), allow);
    let extra_hosts = hosts::extra_hosts(c, &raw.extra_hosts);
    container::labels(c, &raw.labels);
    let posture = posture::posture(c, &raw, allow);
    let health = sections::health(c, &raw.health);
    let job = sections::job(c, &raw.job, &raw.files);
    let restart = sections::restart(c, &raw.restart);
    let resources = sections::resources(c, &raw.resources);
    let log = sections::log(c, &raw.log);
    let probe = raw.probe.as_ref().and_then(|p| probe::probe(c, p));
    let build = match raw.build.as_ref() {
        Some(_) if allow.runtime == Runtime::Swarm => {
            c.refuse_under_swarm(
                KeyPath::of(&["build"]),
                "Swarm nodes cannot get an image built by the supervisor",
                "build it on each node, or push it to your registry, name it in `image` and \
                 drop [build]",
            );
            None
        }
        Some(b) if check_build => build_section::build(c, b, sut_dir),
        _ => None,
    };
    let device = device::device(c, raw.device.as_ref(), raw.command.is_some());
    let health_check = raw.health_check.as_ref().and_then(|h| {
        let cx = health_check::Context {
            listed: &raw.files,
            loaded: &files,
            job_timeout: job.timeout,
            max_payload: job.max_payload.get(),
        };
        health_check::health_check(c, h, &cx)
    });
    let placement = placement::placement(c, raw.placement.as_ref());
    Some(SutConfig {
        name: name?,
        image,
        command: raw.command,
        env: raw.env,
        files,
        tail: raw.tail,
        network,
        extra_hosts,
        labels: raw.labels,
        privileged: raw.privileged,
        cap_add: posture.cap_add,
        no_new_privileges: posture.no_new_privileges,
        devices: raw.devices,
        mounts: posture.mounts,
        health,
        job,
        restart,
        resources,
        log,
        probe,
        build,
        device,
        health_check,
        placement,
    })
}
