//! The optional device probe (`[probe]`), run every `interval` within `timeout`.
//!
//! **URL probe** (`probe.url`, the old stack's `c3` check): a TCP connect or an HTTP GET, its
//! result retained on `<sut>/probe`; it does not change the SUT's health. What counts as
//! reachable:
//! - `tcp://host:port`: the connection opens;
//! - `http://…`: a GET (hyper's client, a new connection each time: no pooling) answers with a
//!   2xx or 3xx status; the body is not read;
//! - `https://…`: the TLS port accepts a TCP connection (no certificate store in a scratch image,
//!   so the handshake is not checked).
//!
//! Each probe, connect included, must finish within `timeout`.
//!
//! **Exec probe** (`probe.command`, as Kubernetes' exec probes): the argv runs inside the
//! container (the agent is in it), in its own process group with its output captured (not sent
//! to the logs). Exit 0 within `timeout` passes; a non-zero exit, a signal or no exit in time
//! (the group is killed) fails, and the failure's reason ([`ProbeFailure`]: the exit status
//! and the last [`REASON_LINES`] output lines, at most [`REASON_BYTES`] bytes) goes into the
//! agent's status (`probe_failure`) and the heartbeat (`unhealthy=`), which makes the SUT
//! unhealthy; the next pass clears it. The result is also retained on `<sut>/probe`.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use labvisor_protocol::config::{Probe, ProbeCheck, ProbeTarget};
use labvisor_protocol::payloads::{now_ms, ProbeResult, VERSION};
use labvisor_protocol::SutName;

use tracing::{info, warn};

use crate::child::{self, Exit};
use crate::mqtt::MqttLink;

/// Why a probe failed (the `error` of its [`ProbeResult`]).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The TCP connection did not open.
    #[error("connect {host}:{port}: {source}")]
    Connect {
        /// Host as written in the URL.
        host: String,
        /// Port (the scheme's default when the URL has none).
        port: u16,
        /// Why.
        source: std::io::Error,
    },
    /// The URL cannot be probed.
    #[error("invalid URL {url:?}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The HTTP request failed (connect, send or the response head).
    #[error("{}", chain(.0))]
    Http(#[from] hyper_util::client::legacy::Error),
    /// The server answered with a status other than 2xx or 3xx.
    #[error("HTTP status {:?}", .0.as_str())]
    Status(hyper::StatusCode),
    /// No answer within the probe's timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// An error and its sources, `: `-separated (hyper's own message names only the outer layer).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Probes one target.
pub struct Prober {
    http: Client<HttpConnector, Empty<Bytes>>,
}

impl Default for Prober {
    fn default() -> Self {
        let http = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build_http();
        Prober { http }
    }
}

impl Prober {
    /// Probes `target` once, within `timeout`.
    pub async fn probe(&self, target: &ProbeTarget, timeout: Duration) -> Result<(), ProbeError> {
        tokio::time::timeout(timeout, self.probe_once(target))
            .await
            .map_err(|_| ProbeError::Timeout(timeout))?
    }

    async fn probe_once(&self, target: &ProbeTarget) -> Result<(), ProbeError> {
        match target {
            ProbeTarget::Tcp { host, port } => connect(host, *port).await,
            ProbeTarget::Http { url } => {
                let bad = |reason: &str| ProbeError::Url {
                    url: url.clone(),
                    reason: reason.to_owned(),
                };
                let mut parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
                let host = parsed.host_str().ok_or_else(|| bad("no host"))?.to_owned();
                let port = parsed
                    .port_or_known_default()
                    .ok_or_else(|| bad("no port"))?;
                if parsed.scheme() == "https" {
                    // No certificate store in a scratch image: reachability of the TLS port only.
                    return connect(&host, port).await;
                }
                parsed.set_fragment(None);
                let uri: hyper::Uri = parsed
                    .as_str()
                    .parse()
                    .map_err(|e: hyper::http::uri::InvalidUri| bad(&e.to_string()))?;
                let req = hyper::Request::get(uri)
                    .header(hyper::header::USER_AGENT, "labvisor-agent")
                    .body(Empty::new())
                    .map_err(|e| bad(&e.to_string()))?;
                let status = self.http.request(req).await?.status();
                if status.is_success() || status.is_redirection() {
                    Ok(())
                } else {
                    Err(ProbeError::Status(status))
                }
            }
        }
    }
}

/// Opens (and closes) a TCP connection; `host` may be an IPv6 address in brackets.
async fn connect(host: &str, port: u16) -> Result<(), ProbeError> {
    let addr = host.trim_matches(['[', ']']);
    tokio::net::TcpStream::connect((addr, port))
        .await
        .map(drop)
        .map_err(|source| ProbeError::Connect {
            host: host.to_owned(),
            port,
            source,
        })
}

/// Why the exec probe fails, shared with the status reporter; `None` while it passes (or
/// before its first run).
pub type ProbeFailure = Arc<Mutex<Option<String>>>;

/// Output lines of a failing exec probe kept in its reason (the last ones).
pub const REASON_LINES: usize = 5;

/// Most bytes of output in a failing exec probe's reason (its end is kept).
pub const REASON_BYTES: usize = 512;

/// Output of an exec probe read at most (its end is kept); the rest is read and dropped.
const READ_KEEP: usize = 64 * 1024;

/// How long the output is read after the probe's group is gone (a process that left the group
/// may hold the pipe).
const DRAIN: Duration = Duration::from_secs(1);

/// Runs the probe every `probe.interval` until aborted. A URL probe's result is retained on
/// `topic` (it needs `link`); an exec probe's failure is kept in `failure` (and retained on
/// `topic` when there is a link).
pub async fn run(
    probe: Probe,
    link: Option<MqttLink>,
    topic: String,
    sut: SutName,
    failure: ProbeFailure,
) {
    let prober = Prober::default();
    let mut ticker = tokio::time::interval(probe.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let t0 = Instant::now();
        let (what, error) = match &probe.check {
            ProbeCheck::Url(target) => (
                target.to_string(),
                prober
                    .probe(target, probe.timeout)
                    .await
                    .err()
                    .map(|e| e.to_string()),
            ),
            ProbeCheck::Command(argv) => {
                let error = exec(argv, probe.timeout).await.err();
                note(&failure, error.clone());
                (argv.join(" "), error)
            }
        };
        let Some(link) = &link else { continue };
        let result = ProbeResult {
            v: VERSION,
            sut: sut.clone(),
            url: what,
            ok: error.is_none(),
            latency_ms: t0.elapsed().as_millis() as u64,
            error,
            time_ms: now_ms(),
        };
        let _ = link.set_sticky(
            topic.clone(),
            Bytes::from(serde_json::to_vec(&result).expect("serialises")),
        );
    }
}

/// Keeps an exec probe's outcome for the reporter, logging when it changes.
fn note(failure: &ProbeFailure, now: Option<String>) {
    let mut f = failure.lock().unwrap_or_else(|e| e.into_inner());
    match (&*f, &now) {
        (None, Some(reason)) => {
            warn!(reason = %reason, "The exec probe fails; the SUT is unhealthy.")
        }
        (Some(_), None) => info!("The exec probe passes again."),
        _ => {}
    }
    *f = now;
}

/// Runs the exec probe `argv` once within `timeout`: `Ok` on exit 0, else the reason (the exit
/// status or the timeout, then the last output lines).
pub async fn exec(argv: &[String], timeout: Duration) -> Result<(), String> {
    let program = argv.first().map_or("", String::as_str);
    let mut p = child::spawn_captured(argv).map_err(|e| format!("cannot run {program:?}: {e}"))?;
    let reader = p.output.take();
    let output = tokio::task::spawn_blocking(move || reader.map(read_end).unwrap_or_default());
    let exit = tokio::time::timeout(timeout, p.wait()).await.ok();
    // Whatever is left of the group goes: a timed-out probe, and what it started.
    p.kill_group();
    if exit.is_none() {
        p.wait().await;
    }
    let text = match tokio::time::timeout(DRAIN, output).await {
        Ok(Ok(t)) => t,
        _ => String::new(),
    };
    let status = match exit {
        Some(Exit::Code(0)) => return Ok(()),
        Some(e) => e.describe(),
        None => format!("no exit within {}", humantime::format_duration(timeout)),
    };
    Err(reason(&status, &text))
}

/// Reads `r` to its end, keeping the last [`READ_KEEP`] bytes.
fn read_end(mut r: impl Read) -> String {
    let mut kept: Vec<u8> = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > 2 * READ_KEEP {
                    kept.drain(..kept.len() - READ_KEEP);
                }
            }
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// `STATUS: line | line`, the last [`REASON_LINES`] non-blank lines of `output`, at most
/// [`REASON_BYTES`] bytes of them (their end; `…` marks a cut); `STATUS (no output)` without.
pub fn reason(status: &str, output: &str) -> String {
    let lines: Vec<&str> = output
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect();
    let last = &lines[lines.len().saturating_sub(REASON_LINES)..];
    if last.is_empty() {
        return format!("{status} (no output)");
    }
    let joined = last.join(" | ");
    if joined.len() <= REASON_BYTES {
        return format!("{status}: {joined}");
    }
    let mut cut = joined.len() - REASON_BYTES;
    while !joined.is_char_boundary(cut) {
        cut += 1;
    }
    format!("{status}: …{}", &joined[cut..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A one-shot HTTP server on loopback answering every connection with `answer`.
    fn serve(answer: &'static [u8]) -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = s.write_all(answer);
            }
        });
        port
    }

    fn http(url: String) -> ProbeTarget {
        ProbeTarget::Http { url }
    }

    #[tokio::test]
    async fn two_and_three_hundreds_are_up_the_rest_is_down() {
        let p = Prober::default();
        let t = Duration::from_secs(5);
        let ok = serve(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
        let moved = serve(b"HTTP/1.1 302 Found\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n");
        let err = serve(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
        let url = |port| http(format!("http://127.0.0.1:{port}/status#frag"));
        p.probe(&url(ok), t).await.unwrap();
        p.probe(&url(moved), t).await.unwrap();
        let e = p.probe(&url(err), t).await.unwrap_err();
        assert_eq!(e.to_string(), "HTTP status \"503\"");
    }

    #[tokio::test]
    async fn a_closed_port_fails_to_connect_and_a_silent_server_times_out() {
        let p = Prober::default();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let tcp = ProbeTarget::Tcp {
            host: "127.0.0.1".into(),
            port: closed,
        };
        let e = p.probe(&tcp, Duration::from_secs(5)).await.unwrap_err();
        assert!(e.to_string().starts_with("connect 127.0.0.1:"), "{e}");
        let e = p
            .probe(
                &http(format!("http://127.0.0.1:{closed}/")),
                Duration::from_secs(5),
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("onnect"), "{e}");
        // Accepts, never answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        let t = Duration::from_millis(200);
        let e = p
            .probe(&http(format!("http://127.0.0.1:{port}/")), t)
            .await
            .unwrap_err();
        assert!(matches!(e, ProbeError::Timeout(_)), "{e}");
        // https: the TLS port accepting is enough.
        p.probe(&http(format!("https://127.0.0.1:{port}/")), t)
            .await
            .unwrap();
    }

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    #[tokio::test]
    async fn an_exec_probe_passes_on_exit_zero_and_fails_with_its_last_lines() {
        let t = Duration::from_secs(10);
        exec(&sh("echo fine"), t).await.unwrap();
        let e = exec(
            &sh("for i in 1 2 3 4 5 6 7; do echo line $i; done; echo 403 Forbidden >&2; exit 3"),
            t,
        )
        .await
        .unwrap_err();
        assert_eq!(
            e, "exit 3: line 4 | line 5 | line 6 | line 7 | 403 Forbidden",
            "the last five lines, stderr with stdout"
        );
        assert_eq!(
            exec(&sh("exit 1"), t).await.unwrap_err(),
            "exit 1 (no output)"
        );
        let e = exec(&sh("kill -9 $$"), t).await.unwrap_err();
        assert_eq!(e, "signal 9 (no output)");
        let e = exec(&["/no/such/probe".to_owned()], t).await.unwrap_err();
        assert!(e.starts_with("cannot run \"/no/such/probe\""), "{e}");
    }

    /// A probe that does not exit in time fails, and its whole group is killed: a grandchild
    /// holding the output pipe does not hold the probe up.
    #[tokio::test]
    async fn a_probe_past_its_timeout_fails_and_its_group_is_killed() {
        let d = tempfile::tempdir().unwrap();
        let marker = d.path().join("survived");
        let script = format!(
            "echo waiting; (sleep 3; touch {}) & sleep 30",
            marker.display()
        );
        let t0 = std::time::Instant::now();
        let e = exec(&sh(&script), Duration::from_millis(300))
            .await
            .unwrap_err();
        assert_eq!(e, "no exit within 300ms: waiting");
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
        // The background child was killed with the group: it never touches the marker.
        tokio::time::sleep(Duration::from_millis(3500)).await;
        assert!(!marker.exists(), "a grandchild of the probe survived");
    }

    #[test]
    fn a_reason_is_bounded_and_keeps_the_end() {
        let long = format!("{}END", "x".repeat(2000));
        let r = reason("exit 1", &long);
        assert!(r.starts_with("exit 1: …"), "{r}");
        assert!(r.ends_with("END"));
        assert!(r.len() <= "exit 1: …".len() + REASON_BYTES);
        let r = reason("exit 1", &"é".repeat(600));
        assert!(
            r.len() <= "exit 1: …".len() + REASON_BYTES + 1,
            "{}",
            r.len()
        );
        assert_eq!(reason("exit 2", "\n  \n"), "exit 2 (no output)");
    }

    #[test]
    fn a_failure_is_kept_until_the_probe_passes() {
        let f = ProbeFailure::default();
        note(&f, Some("exit 1: 403".into()));
        assert_eq!(f.lock().unwrap().as_deref(), Some("exit 1: 403"));
        note(&f, None);
        assert_eq!(*f.lock().unwrap(), None);
    }
}
