//! # labvisor-healthcheck
//!
//! The Docker `HEALTHCHECK` of every labvisor agent container, run in exec form (no shell
//! needed, so it works in FROM-scratch images). It is std only and static: Docker runs it on
//! every probe of every SUT, so it must start in well under a millisecond and use almost no
//! memory.
//!
//! ## Theory of operation
//!
//! The agent's main loop writes a heartbeat file every `heartbeat` interval (see
//! `labvisor_protocol::heartbeat`). This program reads it and exits:
//!
//! - `0` when the heartbeat is fresh (age at most `max_age`) and the state is healthy;
//! - `1` otherwise, printing one line with the reason, which Docker keeps in the container's
//!   health log and Portainer shows: a stale heartbeat (the agent's loop is hung or dead), a
//!   crash-looping or stalled device process, a missing or corrupt file.
//!
//! It never talks to the broker: a broker outage must not turn every agent in the lab unhealthy
//! at once (the old stack's check waited for fresh MQTT messages).
//!
//! ## Usage
//!
//! `labvisor-healthcheck [--file PATH] [--max-age DURATION] [--state]`
//!
//! `--state` prints, for a fresh heartbeat in a healthy state, `state=<state>` (e.g.
//! `state=busy`) instead of the human line: the supervisor runs it with `docker exec` before
//! recreating or removing a container, to learn whether a job runs without asking the broker.
//!
//! `--file` defaults to `$LABVISOR_HEARTBEAT_FILE`, then `/labvisor/run/heartbeat`.
//! `--max-age` (`30s`, `1500ms`, `2m`) defaults to the `max_age_ms` the agent wrote.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const DEFAULT_FILE: &str = "/labvisor/run/heartbeat";

/// States in which the agent is healthy; anything else (crash-loop, stalled, offline, lost) is not.
const HEALTHY_STATES: &[&str] = &["starting", "idle", "busy", "restarting", "stopping"];

/// The verdict on one heartbeat file.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// The line to print, and the agent's state (for `--state`).
    Healthy(String, String),
    Unhealthy(String),
}

struct Args {
    file: String,
    max_age: Option<Duration>,
    state: bool,
}

fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return None,
    })
}

fn parse_args(mut argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut file = std::env::var("LABVISOR_HEARTBEAT_FILE").unwrap_or_else(|_| DEFAULT_FILE.into());
    let mut max_age = None;
    let mut state = false;
    while let Some(a) = argv.next() {
        match a.as_str() {
            "--state" => state = true,
            "--file" => file = argv.next().ok_or("--file needs a path")?,
            "--max-age" => {
                let v = argv.next().ok_or("--max-age needs a duration")?;
                max_age = Some(
                    parse_duration(&v)
                        .ok_or_else(|| format!("--max-age {v:?} is not a duration like 30s"))?,
                );
            }
            "-h" | "--help" => {
                return Err(
                    "usage: labvisor-healthcheck [--file PATH] [--max-age DURATION] [--state]"
                        .into(),
                )
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Args {
        file,
        max_age,
        state,
    })
}

fn fmt_secs(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

/// Judges a heartbeat file's text at time `now_ms`.
fn judge(text: &str, now_ms: u64, max_age: Option<Duration>, file: &str) -> Verdict {
    let mut time_ms = None;
    let mut state = None;
    let mut file_max_age = None;
    let mut detail = "";
    let mut child_alive = "";
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        match k {
            "time_ms" => time_ms = v.parse::<u64>().ok(),
            "state" => state = Some(v),
            "max_age_ms" => file_max_age = v.parse::<u64>().ok().map(Duration::from_millis),
            "detail" => detail = v,
            "child_alive" => child_alive = v,
            _ => {}
        }
    }
    let (Some(time_ms), Some(state)) = (time_ms, state) else {
        return Verdict::Unhealthy(format!(
            "heartbeat file {file} is corrupt: no time_ms or state"
        ));
    };
    let Some(max_age) = max_age.or(file_max_age) else {
        return Verdict::Unhealthy(format!(
            "heartbeat file {file} has no max_age_ms and --max-age was not given"
        ));
    };
    let max_ms = max_age.as_millis() as u64;
    if time_ms > now_ms.saturating_add(max_ms) {
        return Verdict::Unhealthy(format!(
            "heartbeat is {} in the future: clock jumped or file corrupt",
            fmt_secs(time_ms - now_ms)
        ));
    }
    let age = now_ms.saturating_sub(time_ms);
    if age > max_ms {
        return Verdict::Unhealthy(format!(
            "heartbeat is {} old (max {}): the agent's loop is hung or dead (last state {state})",
            fmt_secs(age),
            fmt_secs(max_ms)
        ));
    }
    if !HEALTHY_STATES.contains(&state) {
        let why = if detail.is_empty() {
            String::new()
        } else {
            format!(": {detail}")
        };
        return Verdict::Unhealthy(format!("agent state is {state}{why}"));
    }
    let child = match child_alive {
        "true" => ", device process running",
        "false" => ", device process not running",
        _ => "",
    };
    Verdict::Healthy(
        format!("ok: {state}{child}, heartbeat {} old", fmt_secs(age)),
        state.to_owned(),
    )
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            println!("{e}");
            return ExitCode::from(2);
        }
    };
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let verdict = match std::fs::read_to_string(&args.file) {
        Ok(text) => judge(&text, now_ms, args.max_age, &args.file),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Verdict::Unhealthy(format!(
            "no heartbeat file at {}: the agent has not started or cannot write it",
            args.file
        )),
        Err(e) => Verdict::Unhealthy(format!("cannot read heartbeat file {}: {e}", args.file)),
    };
    match verdict {
        Verdict::Healthy(line, state) => {
            if args.state {
                println!("state={state}");
            } else {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Verdict::Unhealthy(line) => {
            println!("unhealthy: {line}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use labvisor_protocol::heartbeat;
    use labvisor_protocol::payloads::{AgentState, AgentStatus, ChildStatus};
    use labvisor_protocol::SutName;

    const NOW: u64 = 1_795_000_000_000;

    fn status(state: AgentState, time_ms: u64) -> AgentStatus {
        AgentStatus {
            v: 1,
            sut: SutName::new("x").unwrap(),
            state,
            time_ms,
            time: String::new(),
            seq: 1,
            boot_id: "b".into(),
            agent_version: "0".into(),
            child: Some(ChildStatus {
                pid: Some(3),
                alive: true,
                restarts: 0,
                last_exit: None,
            }),
            job: None,
            queue_len: 0,
            broker_connected: false,
            output_dropped: 0,
            detail: Some("exited 5 times in 20s".into()),
        }
    }

    /// The agent's renderer and this parser agree: the healthcheck reads what the agent writes.
    fn judge_status(st: &AgentStatus, max_age: Duration) -> Verdict {
        judge(&heartbeat::render(st, max_age), NOW, None, "hb")
    }

    #[test]
    fn fresh_idle_heartbeat_is_healthy_even_without_broker() {
        let v = judge_status(
            &status(AgentState::Idle, NOW - 2_000),
            Duration::from_secs(30),
        );
        assert_eq!(
            v,
            Verdict::Healthy(
                "ok: idle, device process running, heartbeat 2.0s old".into(),
                "idle".into()
            )
        );
    }

    #[test]
    fn stale_heartbeat_is_unhealthy_with_its_age() {
        let v = judge_status(
            &status(AgentState::Busy, NOW - 31_000),
            Duration::from_secs(30),
        );
        assert_eq!(
            v,
            Verdict::Unhealthy(
                "heartbeat is 31.0s old (max 30.0s): the agent's loop is hung or dead (last state busy)"
                    .into()
            )
        );
    }

    #[test]
    fn crash_loop_and_stalled_are_unhealthy_with_detail() {
        for (st, word) in [
            (AgentState::CrashLoop, "crash-loop"),
            (AgentState::Stalled, "stalled"),
        ] {
            let v = judge_status(&status(st, NOW), Duration::from_secs(30));
            assert_eq!(
                v,
                Verdict::Unhealthy(format!("agent state is {word}: exited 5 times in 20s"))
            );
        }
    }

    #[test]
    fn max_age_flag_overrides_the_file() {
        let text = heartbeat::render(
            &status(AgentState::Idle, NOW - 5_000),
            Duration::from_secs(30),
        );
        assert!(matches!(
            judge(&text, NOW, Some(Duration::from_secs(4)), "hb"),
            Verdict::Unhealthy(_)
        ));
    }

    #[test]
    fn corrupt_and_future_files_are_unhealthy() {
        assert_eq!(
            judge("garbage\n\0\0", NOW, None, "/hb"),
            Verdict::Unhealthy("heartbeat file /hb is corrupt: no time_ms or state".into())
        );
        assert!(matches!(
            judge("time_ms=1\nstate=idle\n", NOW, None, "/hb"),
            Verdict::Unhealthy(m) if m.contains("no max_age_ms")
        ));
        let future = heartbeat::render(
            &status(AgentState::Idle, NOW + 60_000),
            Duration::from_secs(30),
        );
        assert!(
            matches!(judge(&future, NOW, None, "hb"), Verdict::Unhealthy(m) if m.contains("future"))
        );
    }

    #[test]
    fn durations_and_args_parse() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("1500ms"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("x"), None);
        let a = parse_args(
            ["--file", "/f", "--max-age", "9s"]
                .map(String::from)
                .into_iter(),
        )
        .unwrap();
        assert_eq!(
            (a.file.as_str(), a.max_age),
            ("/f", Some(Duration::from_secs(9)))
        );
        assert!(!a.state);
        assert!(
            parse_args(["--state".to_string()].into_iter())
                .unwrap()
                .state
        );
        assert!(parse_args(["--bogus".to_string()].into_iter()).is_err());
    }
}
