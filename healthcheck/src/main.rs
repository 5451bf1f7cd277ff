//! # labvisor-healthcheck
//!
//! The Docker `HEALTHCHECK` of every labvisor agent container, run in exec form (no shell
//! needed, so it works in FROM-scratch images). It is std only and static: Docker runs it on
//! every probe of every SUT, so it must start in well under a millisecond and use almost no
//! memory.
//!
//! ## Theory of operation
//!
//! The agent's main loop writes a heartbeat file every `heartbeat` interval (format and
//! healthy-state rule: the std-only crate `labvisor-heartbeat`, its only dependency). This program
//! reads it and exits:
//!
//! - `0` when the heartbeat is fresh (age at most `max_age`) and the state is healthy;
//! - `1` otherwise, printing one line with the reason, which Docker keeps in the container's
//!   health log and Portainer shows: a stale heartbeat (the agent's loop is hung or dead), a
//!   crash-looping or stalled device process, a missing or corrupt file, or a failing exec
//!   probe (`probe.command`: the heartbeat's `unhealthy=` key carries its exit status and last
//!   output lines, so Docker's health log says why the agent does not work).
//!
//! It never talks to the broker: a broker outage must not turn every agent in the lab unhealthy
//! at once (the old stack's check waited for fresh MQTT messages).
//!
//! A SUT put offline or in maintenance (`labvisor offline`) stays healthy (its agent works), but
//! the line starts with `offline: REASON` (`maintenance: REASON`), so Docker's health log and
//! Portainer say why it takes no jobs.
//!
//! ## Usage
//!
//! `labvisor-healthcheck [--file PATH] [--max-age DURATION] [--state]`
//!
//! `--state` prints, for a fresh heartbeat in a healthy state, `state=<state>` (e.g.
//! `state=busy`) instead of the human line, and a second line `device_work=<what>` when the
//! device process is busy with work of its own (`device.busy_glob` matched), and a line
//! `draining=true` while the device process is drained (`labvisor-agent drain`): the
//! supervisor runs it with `docker exec` before recreating or removing a container, to learn
//! whether a job runs, and what it waits for, without asking the broker (and, after a restart
//! of its own, whether a drain is left that nothing needs any more).
//! A failing exec probe does not change that answer: the agent's loop is alive and its job
//! (if any) is real work to wait for.
//!
//! `--file` defaults to `$LABVISOR_HEARTBEAT_FILE`, then `/labvisor/run/heartbeat`.
//! `--max-age` (`30s`, `1500ms`, `2m`) defaults to the `max_age_ms` the agent wrote.

use std::fmt;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use labvisor_heartbeat::{is_healthy, is_healthy_status, Reading, DEFAULT_PATH};

const USAGE: &str = "usage: labvisor-healthcheck [--file PATH] [--max-age DURATION] [--state]";

/// The verdict on one heartbeat file.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// The line to print, and the answer to `--state` (`state=…`, then `device_work=…` if any).
    Healthy(String, String),
    Unhealthy(String),
    /// A fresh heartbeat in a healthy state that reports a reason to be unhealthy (a failing
    /// exec probe): the reason, and the answer to `--state` (it still answers).
    Failing(String, String),
}

#[derive(Debug)]
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

/// Why the command line was refused (printed as is, exit code 2). A hand-written `Display`,
/// not thiserror: the healthcheck's dependency graph stays std only.
#[derive(Debug, PartialEq, Eq)]
enum ArgError {
    /// `--file` without a path.
    NoFile,
    /// `--max-age` without a value.
    NoMaxAge,
    /// `--max-age` with something that is not a duration.
    BadMaxAge(String),
    /// `-h` or `--help`: the usage line.
    Help,
    /// An argument this program does not know.
    Unknown(String),
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgError::NoFile => f.write_str("--file needs a path"),
            ArgError::NoMaxAge => f.write_str("--max-age needs a duration"),
            ArgError::BadMaxAge(v) => write!(f, "--max-age {v:?} is not a duration like 30s"),
            ArgError::Help => f.write_str(USAGE),
            ArgError::Unknown(a) => write!(f, "unknown argument {a:?}"),
        }
    }
}

impl std::error::Error for ArgError {}

fn parse_args(mut argv: impl Iterator<Item = String>) -> Result<Args, ArgError> {
    let mut file = std::env::var("LABVISOR_HEARTBEAT_FILE").unwrap_or_else(|_| DEFAULT_PATH.into());
    let mut max_age = None;
    let mut state = false;
    while let Some(a) = argv.next() {
        match a.as_str() {
            "--state" => state = true,
            "--file" => file = argv.next().ok_or(ArgError::NoFile)?,
            "--max-age" => {
                let v = argv.next().ok_or(ArgError::NoMaxAge)?;
                max_age = Some(parse_duration(&v).ok_or(ArgError::BadMaxAge(v))?);
            }
            "-h" | "--help" => return Err(ArgError::Help),
            other => return Err(ArgError::Unknown(other.to_owned())),
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
    let Reading {
        time_ms,
        state,
        max_age: file_max_age,
        detail,
        child_alive,
        unhealthy,
        admin,
        device_work,
        draining,
    } = Reading::read(text);
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
    if !is_healthy(state) {
        let why = if detail.is_empty() {
            String::new()
        } else {
            format!(": {detail}")
        };
        return Verdict::Unhealthy(format!("agent state is {state}{why}"));
    }
    let (work, mut answer) = if device_work.is_empty() {
        (String::new(), format!("state={state}"))
    } else {
        (
            format!(", device work {device_work}"),
            format!("state={state}\ndevice_work={device_work}"),
        )
    };
    if draining {
        answer.push_str("\ndraining=true");
    }
    if !is_healthy_status(state, unhealthy) {
        return Verdict::Failing(unhealthy.trim().to_owned(), answer);
    }
    let child = match child_alive {
        "true" => ", device process running",
        "false" => ", device process not running",
        _ => "",
    };
    let admin = if admin.is_empty() {
        String::new()
    } else {
        format!("{admin}; ")
    };
    Verdict::Healthy(
        format!(
            "{admin}ok: {state}{child}{work}, heartbeat {} old",
            fmt_secs(age)
        ),
        answer,
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
    let (line, code) = report(verdict, args.state);
    println!("{line}");
    ExitCode::from(code)
}

/// What to print and the exit code for `verdict`; `state_mode` for `--state`.
fn report(verdict: Verdict, state_mode: bool) -> (String, u8) {
    match verdict {
        Verdict::Healthy(_, answer) | Verdict::Failing(_, answer) if state_mode => (answer, 0),
        Verdict::Healthy(line, _) => (line, 0),
        Verdict::Unhealthy(line) | Verdict::Failing(line, _) => (format!("unhealthy: {line}"), 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use labvisor_heartbeat::{Child, Heartbeat};

    const NOW: u64 = 1_795_000_000_000;

    /// A heartbeat as the agent writes it (`labvisor_protocol::heartbeat::render` fills the same
    /// struct from its status), `max_age` 30 s.
    fn status(state: &'static str, time_ms: u64) -> Heartbeat<'static> {
        Heartbeat {
            v: 1,
            sut: "x",
            state,
            time_ms,
            seq: 1,
            boot_id: "b",
            max_age: Duration::from_secs(30),
            child: Some(Child {
                pid: Some(3),
                alive: true,
                restarts: 0,
            }),
            broker_connected: false,
            output_dropped: 0,
            job: "",
            detail: "exited 5 times in 20s",
            unhealthy: "",
            admin: "",
            device_work: "",
            draining: false,
        }
    }

    /// The agent's renderer and this parser agree: the healthcheck reads what the agent writes.
    fn judge_status(hb: &Heartbeat, max_age: Duration) -> Verdict {
        let hb = Heartbeat {
            max_age,
            ..hb.clone()
        };
        judge(&hb.render(), NOW, None, "hb")
    }

    #[test]
    fn fresh_idle_heartbeat_is_healthy_even_without_broker() {
        let v = judge_status(&status("idle", NOW - 2_000), Duration::from_secs(30));
        assert_eq!(
            v,
            Verdict::Healthy(
                "ok: idle, device process running, heartbeat 2.0s old".into(),
                "state=idle".into()
            )
        );
    }

    #[test]
    fn an_offline_sut_is_healthy_and_says_why_first() {
        let hb = Heartbeat {
            admin: "offline: flaky usb hub",
            ..status("idle", NOW - 1_000)
        };
        assert_eq!(
            judge_status(&hb, Duration::from_secs(30)),
            Verdict::Healthy(
                "offline: flaky usb hub; ok: idle, device process running, heartbeat 1.0s old"
                    .into(),
                "state=idle".into()
            )
        );
    }

    #[test]
    fn stale_heartbeat_is_unhealthy_with_its_age() {
        let v = judge_status(&status("busy", NOW - 31_000), Duration::from_secs(30));
        assert_eq!(
            v,
            Verdict::Unhealthy(
                "heartbeat is 31.0s old (max 30.0s): the agent's loop is hung or dead (last state busy)"
                    .into()
            )
        );
    }

    /// The device's own work reaches the supervisor through `--state` (a second line) and
    /// Portainer through the human line.
    #[test]
    fn device_work_is_in_the_state_answer_and_the_line() {
        let work = "/tmp/testflinger/run/j1/testflinger.json";
        let hb = Heartbeat {
            device_work: work,
            ..status("busy", NOW - 1_000)
        };
        let v = judge_status(&hb, Duration::from_secs(30));
        assert_eq!(
            report(v, false).0,
            format!("ok: busy, device process running, device work {work}, heartbeat 1.0s old")
        );
        let v = judge_status(&hb, Duration::from_secs(30));
        assert_eq!(
            report(v, true),
            (format!("state=busy\ndevice_work={work}"), 0)
        );
        // Drained: a third line, so a restarted supervisor learns of a drain to lift.
        let hb = Heartbeat {
            draining: true,
            ..hb
        };
        let v = judge_status(&hb, Duration::from_secs(30));
        assert_eq!(
            report(v, true),
            (format!("state=busy\ndevice_work={work}\ndraining=true"), 0)
        );
    }

    /// A failing exec probe (the heartbeat's `unhealthy=`) makes a fresh, idle or busy agent
    /// unhealthy with the probe's reason; `--state` still answers with the state, so the
    /// supervisor waits for a job of an agent whose probe fails.
    #[test]
    fn a_failing_probe_is_unhealthy_with_its_reason_but_state_still_answers() {
        let reason = "probe failing: exit 1: ERROR: Agent not authorized to request jobs.";
        for state in ["idle", "busy"] {
            let hb = Heartbeat {
                unhealthy: reason,
                ..status(state, NOW - 1_000)
            };
            let v = judge_status(&hb, Duration::from_secs(30));
            assert_eq!(v, Verdict::Failing(reason.into(), format!("state={state}")));
            assert_eq!(report(v, false), (format!("unhealthy: {reason}"), 1));
            let v = judge_status(&hb, Duration::from_secs(30));
            assert_eq!(report(v, true), (format!("state={state}"), 0));
        }
        // A stale heartbeat is that first: the probe's last word may be old.
        let hb = Heartbeat {
            unhealthy: reason,
            ..status("idle", NOW - 31_000)
        };
        let v = judge_status(&hb, Duration::from_secs(30));
        assert!(
            matches!(&v, Verdict::Unhealthy(l) if l.contains("hung or dead")),
            "{v:?}"
        );
        assert_eq!(report(v, true).1, 1);
        // Passing again: healthy.
        let v = judge_status(&status("idle", NOW), Duration::from_secs(30));
        assert_eq!(report(v, false).1, 0);
    }

    #[test]
    fn crash_loop_and_stalled_are_unhealthy_with_detail() {
        for word in ["crash-loop", "stalled"] {
            let v = judge_status(&status(word, NOW), Duration::from_secs(30));
            assert_eq!(
                v,
                Verdict::Unhealthy(format!("agent state is {word}: exited 5 times in 20s"))
            );
        }
    }

    #[test]
    fn max_age_flag_overrides_the_file() {
        let text = status("idle", NOW - 5_000).render();
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
        let future = status("idle", NOW + 60_000).render();
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
        assert_eq!(
            parse_args(["--bogus".to_string()].into_iter()).err(),
            Some(ArgError::Unknown("--bogus".into()))
        );
        let err = parse_args(["--max-age", "soon"].map(String::from).into_iter()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--max-age \"soon\" is not a duration like 30s"
        );
        assert_eq!(
            parse_args(["--help".to_string()].into_iter())
                .err()
                .map(|e| e.to_string()),
            Some(USAGE.to_owned())
        );
    }
}
