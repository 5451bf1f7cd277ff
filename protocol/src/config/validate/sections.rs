//! The timing and limit sections: `[health]`, `[job]`, `[restart]`, `[resources]` and `[log]`.
//! Each falls back to its default where a value is wrong, so that every problem is reported.

use std::collections::BTreeSet;
use std::num::NonZeroU64;

use super::super::raw::{RawHealth, RawJob, RawLog, RawResources, RawRestart};
use super::super::{
    CommandTemplate, Health, HealthInterval, JobSettings, LogSettings, OnChildExit, OnUnhealthy,
    Resources, RestartSettings, TemplateError, DEFAULT_PIDS, MAX_PAYLOAD_LIMIT, MAX_PIDS, MIN_CPUS,
    MIN_HEARTBEAT, MIN_MEMORY, MIN_PIDS, MIN_PROBE_INTERVAL,
};
use super::checker::{kk, secs, Checker};
use super::paths::normalise;

/// `[health]`: the heartbeat is written more often than it goes stale, and Docker's probe
/// ends before the next one. The interval may be longer than `max_age`: the supervisor, not
/// Docker, acts on a stale heartbeat within `max_age` (Docker's own verdict, slower, is what
/// Portainer shows).
pub(super) fn health(c: &mut Checker<'_>, h: &RawHealth) -> Health {
    let key = |name| kk("health", name);
    let heartbeat = c.duration(key("heartbeat"), h.heartbeat.as_ref(), secs(5), false);
    let max_age = c.duration(key("max_age"), h.max_age.as_ref(), secs(30), false);
    let interval = health_interval(c, h);
    let timeout = c.duration(key("timeout"), h.timeout.as_ref(), secs(5), false);
    let retries = c.count(key("retries"), h.retries, 3);
    let start_period = c.duration(key("start_period"), h.start_period.as_ref(), secs(30), true);
    c.at_least(
        key("heartbeat"),
        h.heartbeat.is_some(),
        heartbeat,
        MIN_HEARTBEAT,
        "each beat writes the heartbeat file and publishes the agent's status on the broker",
    );
    c.order(
        key("max_age"),
        max_age <= heartbeat,
        max_age,
        "longer than health.heartbeat",
        heartbeat,
        ", or every heartbeat is already stale",
    );
    let why = match interval {
        HealthInterval::Every(_) => "",
        HealthInterval::Auto => ", the shortest an \"auto\" interval gets",
    };
    c.order(
        key("timeout"),
        timeout >= interval.shortest(),
        timeout,
        "shorter than health.interval",
        interval.shortest(),
        why,
    );
    Health {
        heartbeat,
        max_age,
        interval,
        timeout,
        retries,
        start_period,
    }
}

/// `health.interval`: `"auto"` (the default) or a duration of at least
/// [`MIN_PROBE_INTERVAL`].
fn health_interval(c: &mut Checker<'_>, h: &RawHealth) -> HealthInterval {
    let key = || kk("health", "interval");
    match &h.interval {
        None => HealthInterval::Auto,
        Some(raw) if raw.0.trim() == "auto" => HealthInterval::Auto,
        Some(raw) => {
            // A refused value stands in as 10 s (the old default), so the timeout is judged.
            let d = c.duration(key(), Some(raw), secs(10), false);
            c.at_least(
                key(),
                true,
                d,
                MIN_PROBE_INTERVAL,
                "each Docker health probe is an exec into the container, work for dockerd",
            );
            HealthInterval::Every(d)
        }
    }
}

/// `[job]`; `files` are the SUT's listed files, of which `template` must be one.
pub(super) fn job(c: &mut Checker<'_>, j: &RawJob, files: &[String]) -> JobSettings {
    let key = |name| kk("job", name);
    let command = job_command(c, j.command.clone());
    // The template is compared by normalised path (`./a.yaml` is `a.yaml`).
    let listed: BTreeSet<String> = files.iter().filter_map(|f| normalise(f)).collect();
    let template = j.template.as_ref().map(|t| {
        let name = normalise(t);
        if !name.as_ref().is_some_and(|n| listed.contains(n)) {
            c.add(
                &key("template"),
                format!(
                    "{t:?} must be one of `files` (add it there so it is delivered and hashed)"
                ),
            );
        }
        name.unwrap_or_else(|| t.clone())
    });
    let timeout = c.duration(key("timeout"), j.timeout.as_ref(), secs(4 * 3600), false);
    let output_timeout = c.duration(
        key("output_timeout"),
        j.output_timeout.as_ref(),
        secs(15 * 60),
        false,
    );
    let queue_limit = c.count(key("queue_limit"), j.queue_limit, 100);
    let max_payload = c
        .size(
            key("max_payload"),
            j.max_payload.as_ref(),
            Some(MAX_PAYLOAD_LIMIT),
        )
        .unwrap_or(NonZeroU64::new(64 * 1024).unwrap_or(NonZeroU64::MIN));
    JobSettings {
        command,
        template,
        timeout,
        output_timeout,
        queue_limit,
        max_payload,
        requeue_lost: j.requeue_lost.unwrap_or(false),
    }
}

/// `job.command`: a valid template, or the default one (with the problems reported).
fn job_command(c: &mut Checker<'_>, raw: Option<Vec<String>>) -> CommandTemplate {
    let Some(argv) = raw else {
        return CommandTemplate::default_command();
    };
    CommandTemplate::new(argv).unwrap_or_else(|errors| {
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
    })
}

/// `[restart]`: the backoff bounds are in order.
pub(super) fn restart(c: &mut Checker<'_>, r: &RawRestart) -> RestartSettings {
    let key = |name| kk("restart", name);
    let backoff_min = c.duration(key("backoff_min"), r.backoff_min.as_ref(), secs(1), false);
    let backoff_max = c.duration(key("backoff_max"), r.backoff_max.as_ref(), secs(300), false);
    c.order(
        key("backoff_max"),
        backoff_max < backoff_min,
        backoff_max,
        "at least restart.backoff_min",
        backoff_min,
        "",
    );
    RestartSettings {
        on_unhealthy: r.on_unhealthy.unwrap_or(OnUnhealthy::Restart),
        backoff_min,
        backoff_max,
        on_child_exit: r.on_child_exit.unwrap_or(OnChildExit::Restart),
        crash_loop_after: c.count(key("crash_loop_after"), r.crash_loop_after, 5),
    }
}

/// `[resources]`: limits Docker accepts and an agent can run in.
pub(super) fn resources(c: &mut Checker<'_>, raw: &RawResources) -> Resources {
    let key = |name| kk("resources", name);
    let memory = c.size(key("memory"), raw.memory.as_ref(), None);
    if let Some(m) = memory.filter(|m| m.get() < MIN_MEMORY) {
        c.add(
            &key("memory"),
            format!(
                "is {m} bytes, less than the {MIN_MEMORY} bytes (6 MiB) accepted: Docker refuses a smaller limit, and an agent cannot run in it"
            ),
        );
    }
    let cpus = match raw.cpus {
        Some(n) if !(n.is_finite() && n > 0.0) => {
            c.add(
                &key("cpus"),
                format!("must be a number of CPUs more than zero, not {n}"),
            );
            None
        }
        Some(n) if n < MIN_CPUS => {
            c.add(
                &key("cpus"),
                format!("is {n}, less than the {MIN_CPUS} CPUs accepted: Docker would treat it as no limit at all"),
            );
            None
        }
        other => other,
    };
    let pids = match raw.pids {
        None => DEFAULT_PIDS,
        Some(n) if n < i64::from(MIN_PIDS) || n > i64::from(MAX_PIDS) => {
            c.add(
                &key("pids"),
                format!("is {n}; give from {MIN_PIDS} (the agent, a shell and a job need that many) to {MAX_PIDS} processes"),
            );
            DEFAULT_PIDS
        }
        Some(n) => u32::try_from(n).unwrap_or(DEFAULT_PIDS),
    };
    Resources { memory, cpus, pids }
}

/// `[log]`: rotation and the MQTT output rate.
pub(super) fn log(c: &mut Checker<'_>, raw: &RawLog) -> LogSettings {
    LogSettings {
        max_size: c
            .size(kk("log", "max_size"), raw.max_size.as_ref(), None)
            .unwrap_or(NonZeroU64::new(10 << 20).unwrap_or(NonZeroU64::MIN)),
        keep: c.count(kk("log", "keep"), raw.keep, 5),
        mqtt_rate: c.size(kk("log", "mqtt_rate"), raw.mqtt_rate.as_ref(), None),
    }
}
