//! `labvisor healthz`: probes a supervisor's `/healthz` (the healthcheck of the FROM-scratch
//! supervisor image): exit 0 and the body when the answer is 200, 1 with the reason otherwise.
//!
//! A GET through hyper's client (already in the graph through bollard and axum); the URL is
//! read by `url`.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::USER_AGENT;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The default `labvisor healthz --url`.
pub const DEFAULT_HEALTHZ_URL: &str = "http://127.0.0.1:9464/healthz";

/// The most of an answer's body that is read.
const MAX_BODY: usize = 64 * 1024;

/// `labvisor healthz` on the command line.
#[derive(Debug, Clone, clap::Args)]
pub struct HealthzArgs {
    /// The URL (plain http).
    #[arg(long, env = "LABVISOR_HEALTHZ_URL", default_value = DEFAULT_HEALTHZ_URL)]
    pub url: String,
    /// Connect and answer timeout.
    #[arg(long, default_value = "5s")]
    pub timeout: humantime::Duration,
}

/// Runs `labvisor healthz`: prints the body on `out` and exits 0 when the answer is 200, else
/// says why on stderr and exits 1.
pub fn run(args: &HealthzArgs, out: &mut dyn Write) -> ExitCode {
    match probe(&args.url, *args.timeout) {
        Ok(body) => {
            // A closed stdout does not change the answer (println! would panic).
            let _ = writeln!(out, "{body}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("labvisor healthz: {e}");
            ExitCode::from(1)
        }
    }
}

/// Why a `labvisor healthz` probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The URL is not `http://host[:port][/path]`.
    #[error("{0:?} is not an http://host[:port][/path] URL")]
    Url(String),
    /// No connection, or no complete answer.
    #[error("{url}: {error}")]
    Io {
        /// The URL.
        url: String,
        /// What failed.
        error: std::io::Error,
    },
    /// The server answered with another status than 200.
    #[error("{url}: {status}: {body}")]
    Status {
        /// The URL.
        url: String,
        /// The status line.
        status: String,
        /// The body's first line.
        body: String,
    },
}

/// A blocking [`get`] on a runtime of its own (not from inside a Tokio runtime).
pub fn probe(url: &str, timeout: Duration) -> Result<String, ProbeError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| ProbeError::Io {
            url: url.to_owned(),
            error,
        })?;
    rt.block_on(get(url, timeout))
}

/// A GET of `url` within `timeout`; `Ok(body)` (trimmed) when the answer is 200.
pub async fn get(url: &str, timeout: Duration) -> Result<String, ProbeError> {
    let uri = http_uri(url)?;
    let io = |error: std::io::Error| ProbeError::Io {
        url: url.to_owned(),
        error,
    };
    let answer = tokio::time::timeout(timeout, fetch(uri, timeout))
        .await
        .map_err(|_| io(std::io::ErrorKind::TimedOut.into()))?;
    let (version, status, body) = answer.map_err(io)?;
    let body = String::from_utf8_lossy(&body).trim().to_owned();
    if status == hyper::StatusCode::OK {
        return Ok(body);
    }
    Err(ProbeError::Status {
        url: url.to_owned(),
        status: format!("{version:?} {status}"),
        body: body.lines().next().unwrap_or_default().to_owned(),
    })
}

/// `url` as a request target, when it is `http://host[:port][/path]`.
fn http_uri(url: &str) -> Result<hyper::Uri, ProbeError> {
    let bad = || ProbeError::Url(url.to_owned());
    let parsed = url::Url::parse(url).map_err(|_| bad())?;
    // The WHATWG parser reads `http:///x` as the host `x`: an empty authority is refused here.
    let authority_given = url
        .get("http://".len()..)
        .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'));
    if parsed.scheme() != "http" || parsed.host().is_none() || !authority_given {
        return Err(bad());
    }
    parsed.as_str().parse().map_err(|_| bad())
}

/// The HTTP version, the status and the first [`MAX_BODY`] bytes of the body of a GET of `uri`.
async fn fetch(
    uri: hyper::Uri,
    timeout: Duration,
) -> std::io::Result<(hyper::Version, hyper::StatusCode, Vec<u8>)> {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(timeout));
    let client = Client::builder(TokioExecutor::new()).build::<_, Empty<Bytes>>(connector);
    let request = hyper::Request::get(uri)
        .header(USER_AGENT, "labvisor-healthz")
        .body(Empty::new())
        .map_err(std::io::Error::other)?;
    let response = client.request(request).await.map_err(io_error)?;
    let (version, status) = (response.version(), response.status());
    let mut body = response.into_body();
    let mut got = Vec::new();
    while got.len() < MAX_BODY {
        let Some(frame) = body.frame().await else {
            break;
        };
        if let Ok(data) = frame.map_err(io_error)?.into_data() {
            got.extend_from_slice(&data);
        }
    }
    got.truncate(MAX_BODY);
    Ok((version, status, got))
}

/// The I/O error under a client error (the message a refused connection had before hyper),
/// else the error's whole chain.
fn io_error(e: impl std::error::Error + 'static) -> std::io::Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    let mut chain = Vec::new();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return std::io::Error::new(io.kind(), io.to_string());
        }
        chain.push(s.to_string());
        source = s.source();
    }
    std::io::Error::other(chain.join(": "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_refuses_bad_urls() {
        for u in [
            "https://x/healthz",
            "127.0.0.1:9464",
            "http:///healthz",
            "http://",
        ] {
            assert!(
                matches!(probe(u, Duration::from_secs(1)), Err(ProbeError::Url(_))),
                "{u}"
            );
        }
        assert!(http_uri("http://[::1]:9464/healthz").is_ok());
        assert_eq!(
            http_uri("http://localhost").unwrap().to_string(),
            "http://localhost/"
        );
    }

    #[test]
    fn a_closed_port_is_an_io_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/healthz");
        match probe(&url, Duration::from_secs(5)) {
            Err(ProbeError::Io { error, .. }) => {
                assert_eq!(
                    error.kind(),
                    std::io::ErrorKind::ConnectionRefused,
                    "{error}"
                )
            }
            other => panic!("{other:?}"),
        }
    }
}
