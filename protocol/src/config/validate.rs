//! From text to a [`SutConfig`]: syntax, serde, then semantic checks that collect every problem.

use std::collections::{BTreeMap, BTreeSet};
use std::num::{NonZeroU32, NonZeroU64};
use std::path::{Component, Path};
use std::time::Duration;

use toml::de::DeTable;

use super::locate::{line_of, path_at, span_of, KeyPath};
use super::raw::{RawBuild, RawConfig, RawDuration, RawSize};
use super::units::{parse_duration, parse_size};
use super::*;

/// Collects problems for one file.
struct Checker<'a> {
    file: &'a str,
    text: &'a str,
    doc: &'a DeTable<'a>,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn add(&mut self, key: &KeyPath, message: impl Into<String>) {
        let line = span_of(self.doc, key).map(|s| line_of(self.text, s.start));
        self.problems.push(Problem {
            file: self.file.to_owned(),
            key: key.to_string(),
            line,
            message: message.into(),
        });
    }

    /// A duration that must be more than zero (`allow_zero` for grace periods).
    fn duration(
        &mut self,
        key: KeyPath,
        raw: Option<&RawDuration>,
        default: Duration,
        allow_zero: bool,
    ) -> Duration {
        let Some(raw) = raw else { return default };
        match parse_duration(&raw.0) {
            Ok(d) if d.is_zero() && !allow_zero => {
                self.add(&key, "must be longer than zero");
                default
            }
            Ok(d) if d > MAX_DURATION => {
                self.add(
                    &key,
                    format!("is {}, longer than the 365 days accepted", raw.0.trim()),
                );
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.add(&key, e);
                default
            }
        }
    }

    /// A duration that must be at least `min` (when it was given and parsed); `why` says why.
    fn at_least(&mut self, key: KeyPath, given: bool, d: Duration, min: Duration, why: &str) {
        if given && !d.is_zero() && d < min {
            self.add(
                &key,
                format!(
                    "is {}, shorter than the {} accepted: {why}",
                    fmt_d(d),
                    fmt_d(min)
                ),
            );
        }
    }

    /// A size in bytes, more than zero and at most `max` when given.
    fn size(
        &mut self,
        key: KeyPath,
        raw: Option<&RawSize>,
        max: Option<u64>,
    ) -> Option<NonZeroU64> {
        let bytes = match raw? {
            RawSize::Bytes(n) if *n <= 0 => {
                self.add(&key, format!("must be more than zero bytes, not {n}"));
                return None;
            }
            RawSize::Bytes(n) => u64::try_from(*n).ok()?,
            RawSize::Text(s) => match parse_size(s) {
                Ok(n) => n,
                Err(e) => {
                    self.add(&key, e);
                    return None;
                }
            },
        };
        let Some(bytes) = NonZeroU64::new(bytes) else {
            self.add(&key, "must be more than zero bytes");
            return None;
        };
        let max = max.unwrap_or(MAX_SIZE);
        {
            if bytes.get() > max {
                self.add(
                    &key,
                    format!("is {bytes} bytes, at most {max} bytes are allowed"),
                );
                return None;
            }
        }
        Some(bytes)
    }

    /// A count that must be at least 1.
    fn count(&mut self, key: KeyPath, raw: Option<u32>, default: u32) -> NonZeroU32 {
        let fallback = NonZeroU32::new(default).unwrap_or(NonZeroU32::MIN);
        match raw {
            None => fallback,
            Some(n) => NonZeroU32::new(n).unwrap_or_else(|| {
                self.add(&key, "must be at least 1");
                fallback
            }),
        }
    }
}

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn fmt_d(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

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
    let name = match SutName::new(stem) {
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
    };

    let raw: RawConfig = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            let span = e.span();
            let key = span
                .as_ref()
                .and_then(|s| path_at(c.doc, s.start))
                .map(|p| p.to_string())
                .unwrap_or_default();
            let line = span.map(|s| line_of(text, s.start));
            let mut message = e.message().trim().to_owned();
            if key.is_empty() {
                message = format!("invalid config: {message}");
            }
            c.problems.push(Problem {
                file: display.to_owned(),
                key,
                line,
                message,
            });
            return Err(c.problems);
        }
    };

    let config = build(&mut c, name, raw, sut_dir, allow, check_build);
    match config {
        Some(cfg) if c.problems.is_empty() => Ok(cfg),
        _ => Err(c.problems),
    }
}

fn k(key: &str) -> KeyPath {
    KeyPath::of(&[key])
}

fn kk(table: &str, key: &str) -> KeyPath {
    KeyPath::of(&[table, key])
}

fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_network_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn refusal(what: &str, why: &str, flag: &str) -> String {
    format!("refused: {what} {why}; start the supervisor with --{flag} to permit it")
}

fn build(
    c: &mut Checker<'_>,
    name: Option<SutName>,
    raw: RawConfig,
    sut_dir: &Path,
    allow: &Allow,
    check_build: bool,
) -> Option<SutConfig> {
    // image
    let image = match raw.image {
        None => {
            c.add(&k("image"), "missing: every SUT needs the Docker image of its agent, e.g. image = \"labvisor/agent:latest\"");
            String::new()
        }
        Some(i) if i.trim().is_empty() => {
            c.add(&k("image"), "must not be empty");
            i
        }
        Some(i) if i.chars().any(|ch| ch.is_whitespace() || ch.is_control()) => {
            c.add(&k("image"), format!("{i:?} must not contain whitespace"));
            i
        }
        Some(i) => i,
    };

    // command
    if let Some(cmd) = &raw.command {
        match cmd.first() {
            None => c.add(
                &k("command"),
                "must not be empty; leave it out for a job-only agent",
            ),
            Some(p) if p.is_empty() => {
                c.add(&k("command").index(0), "the program must not be empty")
            }
            Some(_) => {}
        }
        for (i, a) in cmd.iter().enumerate() {
            if a.contains('\0') {
                c.add(&k("command").index(i), "must not contain a NUL character");
            }
        }
    }

    // env
    for (key, value) in &raw.env {
        let path = k("env").key(key);
        if !is_env_name(key) {
            c.add(
                &path,
                format!(
                    "{key:?} is not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)"
                ),
            );
        } else if key.starts_with(RESERVED_ENV_PREFIX) {
            c.add(
                &path,
                format!(
                    "reserved: variables starting with {RESERVED_ENV_PREFIX} are set by labvisor"
                ),
            );
        }
        if value.contains('\0') {
            c.add(&path, "the value must not contain a NUL character");
        }
    }

    // files
    let files = check_files(c, &raw.files, sut_dir);

    // tail
    for (i, glob) in raw.tail.iter().enumerate() {
        if !glob.starts_with('/') {
            c.add(&k("tail").index(i), format!("{glob:?} must be an absolute path (glob) inside the container, e.g. \"/tmp/testflinger/run/*/*.log\""));
        } else if glob.contains('\0') {
            c.add(&k("tail").index(i), "must not contain a NUL character");
        }
    }

    // network
    let network = match raw.network.as_deref() {
        None | Some(LABVISOR_NETWORK) => Network::Labvisor,
        Some("host") => {
            if !allow.host_network {
                c.add(
                    &k("network"),
                    refusal(
                        "host networking",
                        "gives the container the host's network stack",
                        "allow-host-network",
                    ),
                );
            }
            Network::Host
        }
        Some("none") => {
            c.add(&k("network"), "refused: \"none\" leaves the agent without a network, and it needs the MQTT broker");
            Network::Labvisor
        }
        Some(n) if n.starts_with("container:") => {
            c.add(&k("network"), format!("refused: {n:?} joins another container's network stack, which labvisor does not manage; use \"labvisor\" or a named network"));
            Network::Labvisor
        }
        Some(n) if is_network_name(n) => {
            if !allow.network {
                c.add(
                    &k("network"),
                    refusal(
                        &format!("the Docker network {n:?}"),
                        "is not labvisor's own (\"labvisor\"): the agent would reach whatever else is on it",
                        "allow-network",
                    ),
                );
            }
            Network::Named(n.to_owned())
        }
        Some(n) => {
            c.add(
                &k("network"),
                format!("{n:?} is not a Docker network name ([A-Za-z0-9][A-Za-z0-9_.-]*)"),
            );
            Network::Labvisor
        }
    };

    // labels
    for key in raw.labels.keys() {
        let path = k("labels").key(key);
        if key.is_empty() {
            c.add(&path, "a label key must not be empty");
        } else if key.starts_with(RESERVED_LABEL_PREFIX) {
            c.add(
                &path,
                format!(
                    "reserved: labels starting with {RESERVED_LABEL_PREFIX} are set by labvisor"
                ),
            );
        }
    }

    // host power
    if raw.privileged && !allow.privileged {
        c.add(
            &k("privileged"),
            refusal(
                "privileged mode",
                "makes the container root on the host",
                "allow-privileged",
            ),
        );
    }
    let mut cap_add: Vec<String> = Vec::new();
    if !raw.cap_add.is_empty() && !allow.caps {
        c.add(
            &k("cap_add"),
            refusal(
                "adding capabilities",
                "gives jobs powers the default posture takes away (NET_RAW: sniffing and spoofing other containers' traffic)",
                "allow-caps",
            ),
        );
    }
    for (i, cap) in raw.cap_add.iter().enumerate() {
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
        } else if cap_add.iter().any(|c| c == name) {
            c.add(&k("cap_add").index(i), format!("{cap:?} is listed twice"));
        } else {
            cap_add.push(name.to_owned());
        }
    }
    let no_new_privileges = raw.no_new_privileges.unwrap_or(true);
    if !no_new_privileges && !allow.new_privileges {
        c.add(
            &k("no_new_privileges"),
            refusal(
                "turning no-new-privileges off",
                "lets a job's process gain privileges through setuid and file-capability binaries",
                "allow-new-privileges",
            ),
        );
    }
    if !raw.devices.is_empty() && !allow.devices {
        c.add(
            &k("devices"),
            refusal(
                "devices",
                "give the container direct access to host hardware",
                "allow-devices",
            ),
        );
    }
    let mut seen_devices = BTreeSet::new();
    for (i, d) in raw.devices.iter().enumerate() {
        if !d.starts_with("/dev/") || d.contains("/../") || d.ends_with("/..") {
            c.add(
                &k("devices").index(i),
                format!(
                    "{d:?} must be an absolute host device path under /dev/, e.g. \"/dev/ttyUSB0\""
                ),
            );
        } else if !seen_devices.insert(d) {
            c.add(&k("devices").index(i), format!("{d:?} is listed twice"));
        }
    }
    if !raw.mounts.is_empty() && !allow.host_mounts {
        c.add(
            &k("mounts"),
            refusal(
                "host bind mounts",
                "expose host files to the container",
                "allow-host-mounts",
            ),
        );
    }
    let mut mounts = Vec::new();
    for (i, m) in raw.mounts.iter().enumerate() {
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
        mounts.push(Mount {
            source,
            target,
            read_only: m.read_only.unwrap_or(true),
        });
    }

    // health
    let h = &raw.health;
    let heartbeat = c.duration(
        kk("health", "heartbeat"),
        h.heartbeat.as_ref(),
        secs(5),
        false,
    );
    let max_age = c.duration(kk("health", "max_age"), h.max_age.as_ref(), secs(30), false);
    let interval = c.duration(
        kk("health", "interval"),
        h.interval.as_ref(),
        secs(10),
        false,
    );
    let timeout = c.duration(kk("health", "timeout"), h.timeout.as_ref(), secs(5), false);
    let retries = c.count(kk("health", "retries"), h.retries, 3);
    let start_period = c.duration(
        kk("health", "start_period"),
        h.start_period.as_ref(),
        secs(30),
        true,
    );
    c.at_least(
        kk("health", "heartbeat"),
        h.heartbeat.is_some(),
        heartbeat,
        MIN_HEARTBEAT,
        "each beat writes the heartbeat file and publishes the agent's status on the broker",
    );
    c.at_least(
        kk("health", "interval"),
        h.interval.is_some(),
        interval,
        MIN_PROBE_INTERVAL,
        "each Docker health probe is an exec into the container, work for dockerd",
    );
    if max_age <= heartbeat {
        c.add(&kk("health", "max_age"), format!("is {}, but must be longer than health.heartbeat ({}), or every heartbeat is already stale", fmt_d(max_age), fmt_d(heartbeat)));
    }
    if timeout >= interval {
        c.add(
            &kk("health", "timeout"),
            format!(
                "is {}, but must be shorter than health.interval ({})",
                fmt_d(timeout),
                fmt_d(interval)
            ),
        );
    }
    if interval > max_age {
        c.add(&kk("health", "interval"), format!("is {}, but must be at most health.max_age ({}), so that a stale heartbeat is seen by a probe", fmt_d(interval), fmt_d(max_age)));
    }
    let health = Health {
        heartbeat,
        max_age,
        interval,
        timeout,
        retries,
        start_period,
    };

    // job
    let j = &raw.job;
    let command = match j.command.clone() {
        None => CommandTemplate::default_command(),
        Some(argv) => CommandTemplate::new(argv).unwrap_or_else(|errors| {
            for e in errors {
                let key = match &e {
                    TemplateError::UnknownPlaceholder { index, .. } => {
                        kk("job", "command").index(*index)
                    }
                    _ => kk("job", "command"),
                };
                c.add(&key, e.to_string());
            }
            CommandTemplate::default_command()
        }),
    };
    // The template is compared by normalised path (`./a.yaml` is `a.yaml`).
    let listed: BTreeSet<String> = raw.files.iter().filter_map(|f| normalise(f)).collect();
    let template = j.template.as_ref().map(|t| {
        let name = normalise(t);
        if !name.as_ref().is_some_and(|n| listed.contains(n)) {
            c.add(
                &kk("job", "template"),
                format!(
                    "{t:?} must be one of `files` (add it there so it is delivered and hashed)"
                ),
            );
        }
        name.unwrap_or_else(|| t.clone())
    });
    let job_timeout = c.duration(
        kk("job", "timeout"),
        j.timeout.as_ref(),
        secs(4 * 3600),
        false,
    );
    let output_timeout = c.duration(
        kk("job", "output_timeout"),
        j.output_timeout.as_ref(),
        secs(15 * 60),
        false,
    );
    let queue_limit = c.count(kk("job", "queue_limit"), j.queue_limit, 100);
    let max_payload = c
        .size(
            kk("job", "max_payload"),
            j.max_payload.as_ref(),
            Some(MAX_PAYLOAD_LIMIT),
        )
        .unwrap_or(NonZeroU64::new(64 * 1024).unwrap_or(NonZeroU64::MIN));
    let job = JobSettings {
        command,
        template,
        timeout: job_timeout,
        output_timeout,
        queue_limit,
        max_payload,
        requeue_lost: j.requeue_lost.unwrap_or(false),
    };

    // restart
    let r = &raw.restart;
    let backoff_min = c.duration(
        kk("restart", "backoff_min"),
        r.backoff_min.as_ref(),
        secs(1),
        false,
    );
    let backoff_max = c.duration(
        kk("restart", "backoff_max"),
        r.backoff_max.as_ref(),
        secs(300),
        false,
    );
    if backoff_max < backoff_min {
        c.add(
            &kk("restart", "backoff_max"),
            format!(
                "is {}, but must be at least restart.backoff_min ({})",
                fmt_d(backoff_max),
                fmt_d(backoff_min)
            ),
        );
    }
    let restart = RestartSettings {
        on_unhealthy: r.on_unhealthy.unwrap_or(OnUnhealthy::Restart),
        backoff_min,
        backoff_max,
        on_child_exit: r.on_child_exit.unwrap_or(OnChildExit::Restart),
        crash_loop_after: c.count(kk("restart", "crash_loop_after"), r.crash_loop_after, 5),
    };

    // resources
    let memory = c.size(
        kk("resources", "memory"),
        raw.resources.memory.as_ref(),
        None,
    );
    if let Some(m) = memory.filter(|m| m.get() < MIN_MEMORY) {
        c.add(
            &kk("resources", "memory"),
            format!(
                "is {m} bytes, less than the {MIN_MEMORY} bytes (6 MiB) accepted: Docker refuses a smaller limit, and an agent cannot run in it"
            ),
        );
    }
    let cpus = match raw.resources.cpus {
        Some(n) if !(n.is_finite() && n > 0.0) => {
            c.add(
                &kk("resources", "cpus"),
                format!("must be a number of CPUs more than zero, not {n}"),
            );
            None
        }
        Some(n) if n < MIN_CPUS => {
            c.add(
                &kk("resources", "cpus"),
                format!("is {n}, less than the {MIN_CPUS} CPUs accepted: Docker would treat it as no limit at all"),
            );
            None
        }
        other => other,
    };
    let pids = match raw.resources.pids {
        None => DEFAULT_PIDS,
        Some(n) if n < i64::from(MIN_PIDS) || n > i64::from(MAX_PIDS) => {
            c.add(
                &kk("resources", "pids"),
                format!("is {n}; give from {MIN_PIDS} (the agent, a shell and a job need that many) to {MAX_PIDS} processes"),
            );
            DEFAULT_PIDS
        }
        Some(n) => u32::try_from(n).unwrap_or(DEFAULT_PIDS),
    };
    let resources = Resources { memory, cpus, pids };

    // log
    let log = LogSettings {
        max_size: c
            .size(kk("log", "max_size"), raw.log.max_size.as_ref(), None)
            .unwrap_or(NonZeroU64::new(10 << 20).unwrap_or(NonZeroU64::MIN)),
        keep: c.count(kk("log", "keep"), raw.log.keep, 5),
        mqtt_rate: c.size(kk("log", "mqtt_rate"), raw.log.mqtt_rate.as_ref(), None),
    };

    // probe
    let probe = raw.probe.as_ref().and_then(|p| {
        let interval = c.duration(
            kk("probe", "interval"),
            p.interval.as_ref(),
            secs(60),
            false,
        );
        c.at_least(
            kk("probe", "interval"),
            p.interval.is_some(),
            interval,
            MIN_PROBE_INTERVAL,
            "each probe opens a connection to the device",
        );
        let timeout = c.duration(kk("probe", "timeout"), p.timeout.as_ref(), secs(10), false);
        if timeout >= interval {
            c.add(
                &kk("probe", "timeout"),
                format!(
                    "is {}, but must be shorter than probe.interval ({})",
                    fmt_d(timeout),
                    fmt_d(interval)
                ),
            );
        }
        let url = match p.url.as_deref() {
            None => {
                c.add(
                    &kk("probe", "url"),
                    "missing: give tcp://host:port or http://…",
                );
                None
            }
            Some(u) => match parse_probe_url(u) {
                Ok(t) => Some(t),
                Err(e) => {
                    c.add(&kk("probe", "url"), e);
                    None
                }
            },
        }?;
        Some(Probe {
            url,
            interval,
            timeout,
        })
    });

    // build
    let build = raw
        .build
        .as_ref()
        .filter(|_| check_build)
        .and_then(|b| self::check_build(c, b, sut_dir));

    Some(SutConfig {
        name: name?,
        image,
        command: raw.command,
        env: raw.env,
        files,
        tail: raw.tail,
        network,
        labels: raw.labels,
        privileged: raw.privileged,
        cap_add,
        no_new_privileges,
        devices: raw.devices,
        mounts,
        health,
        job,
        restart,
        resources,
        log,
        probe,
        build,
    })
}

fn parse_probe_url(u: &str) -> Result<ProbeTarget, String> {
    if u.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
        return Err(format!("{u:?} must not contain whitespace"));
    }
    if let Some(rest) = u.strip_prefix("tcp://") {
        let bad = || format!("{u:?} is not tcp://host:port with a port from 1 to 65535");
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() || port == 0 || host.contains('/') {
            return Err(bad());
        }
        return Ok(ProbeTarget::Tcp {
            host: host.to_owned(),
            port,
        });
    }
    for scheme in ["http://", "https://"] {
        if let Some(rest) = u.strip_prefix(scheme) {
            if rest.is_empty() || rest.starts_with('/') {
                return Err(format!("{u:?} has no host"));
            }
            return Ok(ProbeTarget::Http { url: u.to_owned() });
        }
    }
    Err(format!("{u:?} must start with tcp://, http:// or https://"))
}

/// `a/./b` → `a/b`; `None` for anything that is not a plain relative path.
fn normalise(p: &str) -> Option<String> {
    let mut parts = Vec::new();
    for comp in Path::new(p).components() {
        match comp {
            Component::Normal(s) => parts.push(s.to_str()?),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

fn check_files(c: &mut Checker<'_>, raw: &[String], sut_dir: &Path) -> Vec<SutFile> {
    let mut out = Vec::new();
    if raw.is_empty() {
        return out;
    }
    let canon_dir = match sut_dir.canonicalize() {
        Ok(d) => d,
        Err(e) => {
            c.add(
                &k("files"),
                format!(
                    "cannot resolve the sut directory {}: {e}",
                    sut_dir.display()
                ),
            );
            return out;
        }
    };
    let mut seen = BTreeMap::new();
    for (i, f) in raw.iter().enumerate() {
        let key = k("files").index(i);
        let name = match lexical(f, "files", "the sut directory") {
            Ok(n) => n,
            Err(e) => {
                c.add(&key, e);
                continue;
            }
        };
        if let Some(first) = seen.insert(name.clone(), i) {
            c.add(&key, format!("{f:?} is already listed as files[{first}]"));
            continue;
        }
        let resolved = match resolve_inside(f, &name, &canon_dir, sut_dir, "the sut directory") {
            Ok(p) => p,
            Err(e) => {
                c.add(&key, e);
                continue;
            }
        };
        match std::fs::metadata(&resolved) {
            Ok(m) if !m.is_file() => {
                c.add(&key, format!("{f:?} is not a regular file"));
                continue;
            }
            Err(e) => {
                c.add(&key, format!("cannot read {f:?}: {e}"));
                continue;
            }
            Ok(_) => {}
        }
        match read_limited(&resolved, MAX_FILE_SIZE) {
            Ok(Some(content)) => out.push(SutFile { name, content }),
            Ok(None) => c.add(
                &key,
                format!("{f:?} is larger than {MAX_FILE_SIZE} bytes (1 MiB)"),
            ),
            Err(e) => c.add(&key, format!("cannot read {f:?}: {e}")),
        }
    }
    out
}

/// The lexical path rules of `files` and `[build]`: not empty, no NUL, relative, no `..`;
/// returns the normalised path. `what` names the setting, `inside` where it must stay.
fn lexical(f: &str, what: &str, inside: &str) -> Result<String, String> {
    if f.is_empty() {
        return Err("must not be empty".into());
    }
    if f.contains('\0') {
        return Err("must not contain a NUL character".into());
    }
    let path = Path::new(f);
    if path.has_root() || path.is_absolute() {
        return Err(format!(
            "{f:?} is an absolute path; {what} must be relative to {inside}"
        ));
    }
    if path.components().any(|comp| comp == Component::ParentDir) {
        return Err(format!(
            "{f:?} contains a `..` component; {what} must stay inside {inside}"
        ));
    }
    normalise(f).ok_or_else(|| format!("{f:?} does not name a file"))
}

/// Resolves `name` (normalised from `f`) below the canonical `base` (shown as `shown`, named
/// `inside`), following symlinks, and refuses anything that ends up outside it.
fn resolve_inside(
    f: &str,
    name: &str,
    base: &Path,
    shown: &Path,
    inside: &str,
) -> Result<std::path::PathBuf, String> {
    let resolved = match base.join(name).canonicalize() {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "{f:?} does not exist in {inside} {}",
                shown.display()
            ))
        }
        Err(e) => return Err(format!("cannot resolve {f:?}: {e}")),
    };
    if !resolved.starts_with(base) {
        return Err(format!(
            "{f:?} resolves to {}, outside {inside} {} (symlink escape refused)",
            resolved.display(),
            base.display()
        ));
    }
    Ok(resolved)
}

fn check_build(c: &mut Checker<'_>, raw: &RawBuild, sut_dir: &Path) -> Option<Build> {
    let key = kk("build", "context");
    for (k2, v) in &raw.args {
        let path = kk("build", "args").key(k2);
        if k2.is_empty() || k2.contains('=') || k2.contains('\0') {
            c.add(
                &path,
                format!("{k2:?} is not a build arg name (non-empty, no `=`)"),
            );
        }
        if v.contains('\0') {
            c.add(&path, "the value must not contain a NUL character");
        }
    }
    let Some(context) = raw.context.as_deref() else {
        c.add(
            &key,
            "missing: give the build context, a directory next to the SUT file, e.g. context = \"images/rpi4\"",
        );
        return None;
    };
    let sut_dir_itself = format!("{context:?} is the sut directory itself; use a subdirectory, or every SUT file would be part of the build");
    if !context.is_empty()
        && Path::new(context)
            .components()
            .all(|p| p == Component::CurDir)
    {
        c.add(&key, sut_dir_itself);
        return None;
    }
    let name = match lexical(context, "the build context", "the sut directory") {
        Ok(n) => n,
        Err(e) => {
            c.add(&key, e);
            return None;
        }
    };
    let canon_dir = match sut_dir.canonicalize() {
        Ok(d) => d,
        Err(e) => {
            c.add(
                &key,
                format!(
                    "cannot resolve the sut directory {}: {e}",
                    sut_dir.display()
                ),
            );
            return None;
        }
    };
    let context_dir = match resolve_inside(context, &name, &canon_dir, sut_dir, "the sut directory")
    {
        Ok(p) => p,
        Err(e) => {
            c.add(&key, e);
            return None;
        }
    };
    if context_dir == canon_dir {
        c.add(&key, sut_dir_itself);
        return None;
    }
    if !context_dir.is_dir() {
        c.add(&key, format!("{context:?} is not a directory"));
        return None;
    }
    let dkey = kk("build", "dockerfile");
    let raw_df = raw.dockerfile.as_deref().unwrap_or("Dockerfile");
    let dockerfile = match lexical(raw_df, "the Dockerfile", "the build context") {
        Ok(n) => n,
        Err(e) => {
            c.add(&dkey, e);
            return None;
        }
    };
    let df_shown = Path::new(sut_dir).join(&name);
    match resolve_inside(
        raw_df,
        &dockerfile,
        &context_dir,
        &df_shown,
        "the build context",
    ) {
        Ok(p) if !p.is_file() => {
            c.add(&dkey, format!("{raw_df:?} is not a regular file"));
            return None;
        }
        Ok(_) => {}
        Err(e) => {
            c.add(&dkey, e);
            return None;
        }
    }
    let entries = match read_context(&context_dir, MAX_CONTEXT_SIZE) {
        Ok(e) => e,
        Err(e) => {
            c.add(&key, format!("the build context {context:?} {e}"));
            return None;
        }
    };
    Some(Build {
        context: name,
        dockerfile,
        args: raw.args.clone(),
        context_hash: context_hash(&entries),
        context_dir,
    })
}
