//! The page's routes: the embedded files, the two event streams, login, and the actions.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use labvisor_protocol::payloads::AdminMode;
use labvisor_protocol::topics::SutTopic;
use labvisor_protocol::SutName;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;

use super::{lab, lock, Login, WebState};
use crate::cli::admin::AdminArgs;
use crate::cli::submit::SubmitArgs;
use crate::cli::BrokerArgs;

const INDEX: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/style.css");
const ICON: &str = include_str!("assets/favicon.svg");

/// The session cookie.
const COOKIE: &str = "labvisor_session";
/// How long a login lasts.
const SESSION_FOR: Duration = Duration::from_secs(12 * 3600);
/// The header every action must carry: a cross-site form cannot send it.
const ACTION_HEADER: &str = "x-labvisor-action";

/// The page's routes, on `state`. Serve them with `ConnectInfo<SocketAddr>` (loopback readers
/// are anonymous).
pub fn router(state: Arc<WebState>) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { page(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/app.js",
            get(|| async { page(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/style.css",
            get(|| async { page(STYLE, "text/css; charset=utf-8") }),
        )
        .route(
            "/favicon.svg",
            get(|| async { page(ICON, "image/svg+xml") }),
        )
        .route("/api/me", get(me))
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .route("/api/lab", get(lab_events))
        .route("/api/sut/{sut}", get(sut_events))
        .route("/api/sut/{sut}/submit", post(submit))
        .route("/api/sut/{sut}/cancel", post(cancel))
        .route("/api/sut/{sut}/admin", post(admin))
        .with_state(state)
}

fn page(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; object-src 'none'; frame-ancestors 'none'",
            ),
        ],
        body,
    )
        .into_response()
}

fn error(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

/// The session token in the request's cookies.
fn token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

impl WebState {
    /// The logged-in user of the request, if any.
    fn login(&self, headers: &HeaderMap) -> Option<Login> {
        let t = token(headers)?;
        let mut sessions = lock(&self.sessions);
        let now = Instant::now();
        sessions.retain(|_, l| l.until > now);
        sessions.get(&t).cloned()
    }

    /// Whether the request may read the lab: from loopback, or logged in.
    fn may_read(&self, peer: &SocketAddr, headers: &HeaderMap) -> bool {
        may_read_anonymously(peer, headers) || self.login(headers).is_some()
    }

    fn broker_args(&self, login: &Login) -> Option<BrokerArgs> {
        let b = self.broker.as_ref()?;
        Some(BrokerArgs {
            broker: b.url.clone(),
            username: Some(login.user.clone()),
            password: Some(login.password.clone()),
            ca_file: b.ca_file.clone(),
            topic_prefix: b.topic_prefix.clone(),
            state_dir: None,
        })
    }
}

/// Whether the request may read without a login: it comes from loopback, and it names the
/// listener by an address or `localhost` (or not at all). A page of another site whose name
/// was made to resolve to 127.0.0.1 (DNS rebinding) comes from loopback too, but with that
/// site's name as its `Host`.
fn may_read_anonymously(peer: &SocketAddr, headers: &HeaderMap) -> bool {
    is_loopback(peer)
        && match headers.get(header::HOST).map(|h| h.to_str()) {
            None => true,
            Some(Ok(host)) => is_local_host_name(host),
            Some(Err(_)) => false,
        }
}

/// Whether a `Host` header names this machine by address or as `localhost`.
fn is_local_host_name(host: &str) -> bool {
    let port_ok = |p: &str| {
        p.is_empty()
            || p.strip_prefix(':')
                .is_some_and(|n| n.parse::<u16>().is_ok())
    };
    if let Some(rest) = host.strip_prefix('[') {
        return rest
            .split_once(']')
            .is_some_and(|(ip, port)| ip.parse::<std::net::Ipv6Addr>().is_ok() && port_ok(port));
    }
    let (name, port) = host.find(':').map_or((host, ""), |i| host.split_at(i));
    port_ok(port)
        && (name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok())
}

#[cfg(test)]
mod host_tests {
    use super::*;

    fn headers(host: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(host) = host {
            h.insert(header::HOST, host.parse().unwrap());
        }
        h
    }

    #[test]
    fn anonymous_reading_needs_loopback_named_by_address_or_localhost() {
        let lo: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let lo6: SocketAddr = "[::1]:5000".parse().unwrap();
        let away: SocketAddr = "10.0.0.9:5000".parse().unwrap();
        for host in [
            None,
            Some("127.0.0.1:9464"),
            Some("127.0.0.1"),
            Some("localhost:9464"),
            Some("LOCALHOST"),
            Some("[::1]:9464"),
        ] {
            assert!(may_read_anonymously(&lo, &headers(host)), "{host:?}");
            assert!(may_read_anonymously(&lo6, &headers(host)), "{host:?}");
            assert!(!may_read_anonymously(&away, &headers(host)), "{host:?}");
        }
        // DNS rebinding: another site's name resolved to loopback.
        for host in [
            "evil.example:9464",
            "evil.example",
            "localhost.evil.example",
            "127.0.0.1.nip.io:9464",
            "[::1].evil:80",
        ] {
            assert!(!may_read_anonymously(&lo, &headers(Some(host))), "{host}");
        }
    }
}

fn is_loopback(peer: &SocketAddr) -> bool {
    match peer.ip() {
        std::net::IpAddr::V4(ip) => ip.is_loopback(),
        std::net::IpAddr::V6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

#[derive(Serialize)]
struct Me {
    user: Option<String>,
    anonymous_read: bool,
    broker: bool,
}

async fn me(
    State(state): State<Arc<WebState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    Json(Me {
        user: state.login(&headers).map(|l| l.user),
        anonymous_read: may_read_anonymously(&peer, &headers),
        broker: state.broker.is_some(),
    })
    .into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    username: String,
    password: String,
}

async fn login(State(state): State<Arc<WebState>>, Json(form): Json<LoginForm>) -> Response {
    if form.username.is_empty() {
        return error(StatusCode::BAD_REQUEST, "give a username");
    }
    let l = Login {
        user: form.username,
        password: form.password,
        until: Instant::now() + SESSION_FOR,
    };
    let Some(args) = state.broker_args(&l) else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this supervisor runs without a broker: there is nothing to log in to",
        );
    };
    // The broker decides: the login is good when it lets it connect, and it may read what
    // the page shows (every SUT's status), which its ACL says by what it delivers.
    let shown = lock(&state.lab).with_agent_status();
    let seen = match crate::cli::Session::snapshot(&args, |t| vec![t.agents_filter()]).await {
        Ok(mut s) => {
            let got = s.settle().await;
            s.close().await;
            got.iter()
                .filter(|r| !r.payload.is_empty())
                .filter_map(|r| match state.topics.parse(&r.topic) {
                    Some((sut, SutTopic::Agent)) => Some(sut),
                    _ => None,
                })
                .collect::<BTreeSet<_>>()
        }
        Err(e) => {
            return error(
                StatusCode::UNAUTHORIZED,
                format!("the broker refused {}: {e}", l.user),
            )
        }
    };
    if let Some(refusal) = reads_too_little(&l.user, &shown, &seen) {
        return error(StatusCode::FORBIDDEN, refusal);
    }
    let mut bytes = [0u8; 32];
    if getrandom::getrandom(&mut bytes).is_err() {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "no randomness for a session",
        );
    }
    let t: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let user = l.user.clone();
    lock(&state.sessions).insert(t.clone(), l);
    let cookie = format!(
        "{COOKIE}={t}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_FOR.as_secs()
    );
    (
        [(header::SET_COOKIE, cookie)],
        Json(serde_json::json!({ "user": user })),
    )
        .into_response()
}

/// Why `user` may not use the page, when the broker shows it fewer of the SUTs than the page
/// shows (`shown`): the page shows the whole lab, so a login that may read only part of it (an
/// agent's own login, confined to its SUT) would read the rest through the page.
fn reads_too_little(
    user: &str,
    shown: &BTreeSet<SutName>,
    seen: &BTreeSet<SutName>,
) -> Option<String> {
    let hidden: Vec<&str> = shown.difference(seen).map(SutName::as_str).collect();
    let first = hidden.first()?;
    Some(format!(
        "{user} may not read the whole lab: the broker shows it {} of the {} SUTs' statuses \
         this page shows (not {first}{}); the page shows every SUT, so it takes a login that may \
         read them all, such as a reader's, never an agent's",
        shown.len() - hidden.len(),
        shown.len(),
        if hidden.len() > 1 {
            format!(" and {} more", hidden.len() - 1)
        } else {
            String::new()
        },
    ))
}

async fn logout(State(state): State<Arc<WebState>>, headers: HeaderMap) -> Response {
    if let Some(t) = token(&headers) {
        lock(&state.sessions).remove(&t);
    }
    (
        [(
            header::SET_COOKIE,
            format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
        )],
        Json(serde_json::json!({})),
    )
        .into_response()
}

fn event<T: Serialize>(name: &str, data: &T) -> Event {
    Event::default()
        .event(name)
        .data(serde_json::to_string(data).unwrap_or_else(|_| "null".into()))
}

fn sse(s: impl Stream<Item = Event> + Send + 'static) -> Response {
    Sse::new(s.map(Ok::<_, Infallible>))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The lab view's stream: `lab` (a snapshot), then `row` and `gone`.
async fn lab_events(
    State(state): State<Arc<WebState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if !state.may_read(&peer, &headers) {
        return error(StatusCode::UNAUTHORIZED, "log in to see the lab");
    }
    let (first, rx) = {
        let lab = lock(&state.lab);
        (event("lab", &lab.snapshot()), state.updates.subscribe())
    };
    let rest = stream::unfold((state, rx), |(state, mut rx)| async move {
        loop {
            match rx.recv().await {
                Ok(u) if u.for_lab() => return Some((update_event(&u), (state, rx))),
                Ok(_) => continue,
                Err(RecvError::Lagged(_)) => {
                    let e = event("lab", &lock(&state.lab).snapshot());
                    return Some((e, (state, rx)));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    });
    sse(stream::once(async { first }).chain(rest))
}

fn update_event(u: &lab::Update) -> Event {
    let name = match u {
        lab::Update::Row { .. } => "row",
        lab::Update::Gone { .. } => "gone",
        lab::Update::Job { .. } => "job",
        lab::Update::Output { .. } => "output",
    };
    event(name, u)
}

fn sut_name(s: &str) -> Result<SutName, Refusal> {
    SutName::new(s).map_err(|e| (StatusCode::BAD_REQUEST, format!("{s:?}: {e}")))
}

/// Why a request is refused: the status and the words.
type Refusal = (StatusCode, String);

/// A SUT view's stream: `sut` (a snapshot), then its `row`, `gone`, `job` and `output`.
async fn sut_events(
    State(state): State<Arc<WebState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(sut): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !state.may_read(&peer, &headers) {
        return error(StatusCode::UNAUTHORIZED, "log in to see the lab");
    }
    let sut = match sut_name(&sut) {
        Ok(s) => s,
        Err((code, why)) => return error(code, why),
    };
    // Held by the stream: the page's hold on the SUT's output ends when the page goes.
    let watched = state.watch(&sut);
    let (first, rx) = {
        let lab = lock(&state.lab);
        (event("sut", &lab.sut(&sut)), state.updates.subscribe())
    };
    let rest = stream::unfold((state, rx, watched), |(state, mut rx, w)| async move {
        loop {
            match rx.recv().await {
                Ok(u) if u.sut() == w.sut.as_str() => {
                    return Some((update_event(&u), (state, rx, w)))
                }
                Ok(_) => continue,
                Err(RecvError::Lagged(_)) => {
                    let e = event("sut", &lock(&state.lab).sut(&w.sut));
                    return Some((e, (state, rx, w)));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    });
    sse(stream::once(async { first }).chain(rest))
}

/// What an action answers: the command line's exit status and what it printed.
#[derive(Serialize)]
struct Outcome {
    ok: bool,
    code: u8,
    message: String,
}

/// Runs a command-line action on a blocking thread (`f` runs it with `block_on` and returns
/// what it printed): the commands print to a `dyn Write`, which a handler's future cannot hold
/// across an await.
async fn blocking<F>(f: F) -> Response
where
    F: FnOnce(tokio::runtime::Handle) -> (Result<u8, crate::cli::ClientError>, Vec<u8>)
        + Send
        + 'static,
{
    let handle = tokio::runtime::Handle::current();
    match tokio::task::spawn_blocking(move || f(handle)).await {
        Ok((r, out)) => outcome(r, out),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the action failed: {e}"),
        ),
    }
}

fn outcome(r: Result<u8, crate::cli::ClientError>, out: Vec<u8>) -> Response {
    let (code, mut message) = match r {
        Ok(c) => (c, String::from_utf8_lossy(&out).trim().to_owned()),
        Err(e) => (e.exit_code(), e.to_string()),
    };
    if code == 4 && message.is_empty() {
        message = "no answer in time".into();
    }
    let status = if code == 0 {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    (
        status,
        Json(Outcome {
            ok: code == 0,
            code,
            message,
        }),
    )
        .into_response()
}

/// The login of an action request, or why it is refused.
fn actor(
    state: &WebState,
    sut: &str,
    headers: &HeaderMap,
) -> Result<(Login, BrokerArgs, SutName), Refusal> {
    if headers.get(ACTION_HEADER).is_none() {
        return Err((
            StatusCode::FORBIDDEN,
            format!("an action needs the {ACTION_HEADER} header"),
        ));
    }
    let Some(login) = state.login(headers) else {
        return Err((StatusCode::UNAUTHORIZED, "log in to act on a SUT".into()));
    };
    let Some(args) = state.broker_args(&login) else {
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "this supervisor runs without a broker".into(),
        ));
    };
    let sut = sut_name(sut)?;
    Ok((login, args, sut))
}

#[derive(Deserialize)]
struct SubmitForm {
    script: String,
    #[serde(default)]
    timeout: Option<String>,
}

async fn submit(
    State(state): State<Arc<WebState>>,
    Path(sut): Path<String>,
    headers: HeaderMap,
    Json(form): Json<SubmitForm>,
) -> Response {
    let (_, args, sut) = match actor(&state, &sut, &headers) {
        Ok(a) => a,
        Err((code, why)) => return error(code, why),
    };
    if form.script.trim().is_empty() {
        return error(StatusCode::BAD_REQUEST, "the script is empty");
    }
    let sa = SubmitArgs {
        sut: sut.to_string(),
        script: None,
        id: None,
        timeout: form.timeout.filter(|t| !t.is_empty()),
        output_timeout: None,
        env: Vec::new(),
        wait: false,
        follow: false,
        ack_timeout: Duration::from_secs(10).into(),
        json: true,
        cmd: Vec::new(),
        script_text: Some(form.script),
    };
    blocking(move |h| {
        let mut out = Vec::new();
        let r = h.block_on(crate::cli::submit::submit(&args, &sa, &mut out));
        (r, out)
    })
    .await
}

#[derive(Deserialize)]
struct CancelForm {
    #[serde(default)]
    job: Option<String>,
}

async fn cancel(
    State(state): State<Arc<WebState>>,
    Path(sut): Path<String>,
    headers: HeaderMap,
    Json(form): Json<CancelForm>,
) -> Response {
    let (_, args, sut) = match actor(&state, &sut, &headers) {
        Ok(a) => a,
        Err((code, why)) => return error(code, why),
    };
    let target = form.job.unwrap_or_else(|| "current".into());
    blocking(move |h| {
        let mut out = Vec::new();
        let r = h.block_on(crate::cli::cancel::cancel(
            &args,
            sut.as_str(),
            &target,
            false,
            Duration::from_secs(10),
            &mut out,
        ));
        (r, out)
    })
    .await
}

#[derive(Deserialize)]
struct AdminForm {
    mode: String,
    #[serde(default)]
    reason: Option<String>,
}

async fn admin(
    State(state): State<Arc<WebState>>,
    Path(sut): Path<String>,
    headers: HeaderMap,
    Json(form): Json<AdminForm>,
) -> Response {
    let (login, args, sut) = match actor(&state, &sut, &headers) {
        Ok(a) => a,
        Err((code, why)) => return error(code, why),
    };
    let mode = match form.mode.as_str() {
        "offline" => AdminMode::Offline,
        "maintenance" => AdminMode::Maintenance,
        "online" => AdminMode::Online,
        m => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("mode {m:?}: expected offline, maintenance or online"),
            )
        }
    };
    let aa = AdminArgs {
        sut: sut.to_string(),
        reason: form.reason.filter(|r| !r.trim().is_empty()),
        by: Some(format!("{} (web)", login.user)),
        json: false,
        timeout: Duration::from_secs(15).into(),
        broker: args,
    };
    blocking(move |h| {
        let mut out = Vec::new();
        let r = h.block_on(crate::cli::admin::admin(mode, &aa, &mut out));
        (r, out)
    })
    .await
}

#[cfg(test)]
#[path = "http_tests.rs"]
mod tests;
