//! The optional upstream probe (the old stack's `c3` check): every `interval`, a TCP connect or an
//! HTTP GET, its result retained on `<sut>/probe`.
//!
//! What counts as reachable:
//! - `tcp://host:port`: the connection opens;
//! - `http://…`: a GET (hyper's client, a new connection each time: no pooling) answers with a
//!   2xx or 3xx status; the body is not read;
//! - `https://…`: the TLS port accepts a TCP connection (no certificate store in a scratch image,
//!   so the handshake is not checked).
//!
//! Each probe, connect included, must finish within `timeout`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use labvisor_protocol::config::{Probe, ProbeTarget};
use labvisor_protocol::payloads::{now_ms, ProbeResult, VERSION};
use labvisor_protocol::SutName;

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

/// Probes `probe.url` every `probe.interval` and keeps the latest result retained on `topic`.
/// Runs until aborted.
pub async fn run(probe: Probe, link: MqttLink, topic: String, sut: SutName) {
    let prober = Prober::default();
    let mut ticker = tokio::time::interval(probe.interval);
    loop {
        ticker.tick().await;
        let t0 = Instant::now();
        let error = prober.probe(&probe.url, probe.timeout).await.err();
        let result = ProbeResult {
            v: VERSION,
            sut: sut.clone(),
            url: probe.url.to_string(),
            ok: error.is_none(),
            latency_ms: t0.elapsed().as_millis() as u64,
            error: error.map(|e| e.to_string()),
            time_ms: now_ms(),
        };
        let _ = link.set_sticky(
            topic.clone(),
            Bytes::from(serde_json::to_vec(&result).expect("serialises")),
        );
    }
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
}
