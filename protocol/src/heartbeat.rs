//! The heartbeat file: written by the agent, read by `labvisor-healthcheck`.
//!
//! Every `heartbeat` interval the agent's main loop (the loop that supervises the child and pumps
//! its output, not an independent timer) renders its [`AgentStatus`] into this file, atomically:
//! a temporary file in the same directory, then a rename. A reader sees the old file or the new
//! one, never half of one.
//!
//! The format is `key=value` lines, so the healthcheck parses it with std alone and starts in
//! well under a millisecond on every probe:
//!
//! ```text
//! # labvisor heartbeat
//! v=1
//! sut=rpi4-01
//! state=idle
//! time_ms=1795000000000
//! seq=42
//! boot_id=9f2c4e1a7b3d5f60
//! max_age_ms=30000
//! child_pid=17
//! child_alive=true
//! child_restarts=0
//! broker_connected=false
//! output_dropped=0
//! job=
//! detail=
//! ```
//!
//! Values are single lines (newlines become spaces). Unknown keys are ignored by readers.
//! The healthcheck decides from `time_ms`, `max_age_ms` and `state` alone: it never asks the
//! broker, so a broker outage cannot turn every agent in the lab unhealthy at once.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use crate::payloads::AgentStatus;

/// Where the agent writes its heartbeat inside a container, unless told otherwise.
pub const DEFAULT_PATH: &str = "/labvisor/run/heartbeat";

/// Renders `status` as a heartbeat file, with `max_age` for the healthcheck.
pub fn render(status: &AgentStatus, max_age: Duration) -> String {
    fn one_line(s: &str) -> String {
        s.replace(['\n', '\r'], " ")
    }
    let child = status.child.as_ref();
    format!(
        "# labvisor heartbeat\nv={}\nsut={}\nstate={}\ntime_ms={}\nseq={}\nboot_id={}\nmax_age_ms={}\nchild_pid={}\nchild_alive={}\nchild_restarts={}\nbroker_connected={}\noutput_dropped={}\njob={}\ndetail={}\n",
        status.v,
        status.sut,
        status.state.as_str(),
        status.time_ms,
        status.seq,
        one_line(&status.boot_id),
        max_age.as_millis(),
        child.and_then(|c| c.pid).map(|p| p.to_string()).unwrap_or_default(),
        child.map(|c| c.alive.to_string()).unwrap_or_default(),
        child.map(|c| c.restarts.to_string()).unwrap_or_default(),
        status.broker_connected,
        status.output_dropped,
        status.job.as_ref().map(|j| j.as_str()).unwrap_or_default(),
        one_line(status.detail.as_deref().unwrap_or_default()),
    )
}

/// Parses a heartbeat file into `(key, value)` pairs, in order; comments and blank lines skipped.
pub fn parse(text: &str) -> Vec<(&str, &str)> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .collect()
}

/// Writes `text` to `path` atomically: a temporary file beside it, then a rename.
pub fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "heartbeat".into());
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    drop(f);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payloads::{AgentState, ChildStatus};
    use crate::SutName;

    #[test]
    fn renders_every_field_on_one_line_each() {
        let st = AgentStatus {
            v: 1,
            sut: SutName::new("rpi4-01").unwrap(),
            state: AgentState::CrashLoop,
            time_ms: 1_795_000_000_000,
            time: String::new(),
            seq: 42,
            boot_id: "b".into(),
            agent_version: "0.1.0".into(),
            child: Some(ChildStatus {
                pid: Some(17),
                alive: false,
                restarts: 5,
                last_exit: Some("exit 1".into()),
            }),
            job: None,
            queue_len: 0,
            broker_connected: false,
            output_dropped: 3,
            detail: Some("exited 5 times\nin 10s".into()),
        };
        let text = render(&st, Duration::from_secs(30));
        let kv = parse(&text);
        let get = |k| kv.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
        assert_eq!(get("state"), Some("crash-loop"));
        assert_eq!(get("time_ms"), Some("1795000000000"));
        assert_eq!(get("max_age_ms"), Some("30000"));
        assert_eq!(get("child_pid"), Some("17"));
        assert_eq!(get("detail"), Some("exited 5 times in 10s"));
        assert_eq!(get("output_dropped"), Some("3"));
    }

    #[test]
    fn atomic_write_replaces_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("heartbeat");
        write_atomic(&p, "a=1\n").unwrap();
        write_atomic(&p, "a=2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "a=2\n");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
