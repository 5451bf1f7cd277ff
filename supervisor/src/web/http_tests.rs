//! The page's access rules, driven through [`router`] in process: who may read, who may act,
//! what a bad SUT name, the static files and `/api/me` answer. No broker, no socket: the peer
//! is the `ConnectInfo` a request carries, a login is a session put straight into the state.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, Method, Request, StatusCode};
use axum::response::Response;
use labvisor_protocol::topics::Topics;
use tower::ServiceExt;

use super::{router, ACTION_HEADER, COOKIE};
use crate::web::WebState;

/// Peers that read anonymously: IPv4 loopback (all of 127/8), IPv6 `::1`, and IPv4 loopback
/// mapped into IPv6 (a dual-stack listener sees `127.0.0.1` so).
const LOOPBACK: [&str; 4] = [
    "127.0.0.1:40000",
    "127.1.2.3:40000",
    "[::1]:40000",
    "[::ffff:127.0.0.1]:40000",
];

/// Peers that do not: private LAN and Docker bridge addresses, mapped or not, and a global
/// IPv6 address.
const REMOTE: [&str; 5] = [
    "10.0.0.5:40000",
    "172.17.0.2:40000",
    "192.168.1.20:40000",
    "[::ffff:10.0.0.5]:40000",
    "[2001:db8::1]:40000",
];

/// A session token the tests log in with.
const TOKEN: &str = "0123456789abcdef";

/// The three actions, each with a body its handler accepts (an unparsable body would be
/// refused by the JSON extractor before the access rules are reached).
const ACTIONS: [(&str, &str); 3] = [
    ("/api/sut/tf-1/submit", r#"{"script":"echo hi"}"#),
    ("/api/sut/tf-1/cancel", r#"{}"#),
    ("/api/sut/tf-1/admin", r#"{"mode":"offline"}"#),
];

fn state() -> Arc<WebState> {
    WebState::without_broker(Topics::new())
}

/// A state with `TOKEN` logged in as `alice` for the next hour.
fn logged_in() -> Arc<WebState> {
    let s = state();
    s.insert_session(TOKEN, "alice", Instant::now() + Duration::from_secs(3600));
    s
}

fn peer(p: &str) -> SocketAddr {
    p.parse().expect("a socket address")
}

/// What a test sends: method, path, peer, optional cookie, optional action header, body.
struct Req<'a> {
    method: Method,
    uri: &'a str,
    peer: &'a str,
    cookie: Option<String>,
    action: bool,
    json: Option<&'a str>,
}

impl<'a> Req<'a> {
    fn get(uri: &'a str, peer: &'a str) -> Self {
        Req {
            method: Method::GET,
            uri,
            peer,
            cookie: None,
            action: false,
            json: None,
        }
    }

    fn post(uri: &'a str, peer: &'a str, json: &'a str) -> Self {
        Req {
            method: Method::POST,
            json: Some(json),
            ..Req::get(uri, peer)
        }
    }

    /// With the session cookie `token`, among another cookie as a browser may send it.
    fn session(mut self, token: &str) -> Self {
        self.cookie = Some(format!("theme=dark; {COOKIE}={token}"));
        self
    }

    fn action_header(mut self) -> Self {
        self.action = true;
        self
    }

    async fn send(self, state: &Arc<WebState>) -> Response {
        let mut b = Request::builder().method(self.method).uri(self.uri);
        if let Some(c) = &self.cookie {
            b = b.header(header::COOKIE, c);
        }
        if self.action {
            b = b.header(ACTION_HEADER, "1");
        }
        let body = match self.json {
            Some(j) => {
                b = b.header(header::CONTENT_TYPE, "application/json");
                Body::from(j.to_owned())
            }
            None => Body::empty(),
        };
        let mut req = b.body(body).expect("a request");
        req.extensions_mut().insert(ConnectInfo(peer(self.peer)));
        router(state.clone())
            .oneshot(req)
            .await
            .expect("the router is infallible")
    }
}

/// The body of a finite (non-SSE) response as JSON.
async fn json(r: Response) -> serde_json::Value {
    let bytes = axum::body::to_bytes(r.into_body(), 1 << 20)
        .await
        .expect("a body");
    serde_json::from_slice(&bytes).expect("a JSON body")
}

/// The `error` of a JSON error response.
async fn error_of(r: Response) -> String {
    let v = json(r).await;
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error in {v}"))
        .to_owned()
}

/// Asserts `r` is an open event stream. Its body never ends, so it is not read.
fn assert_stream(r: &Response, what: &str) {
    assert_eq!(r.status(), StatusCode::OK, "{what}");
    let ct = r
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    assert_eq!(ct, Some("text/event-stream"), "{what}");
}

async fn assert_refused(r: Response, code: StatusCode, what: &str) -> String {
    assert_eq!(r.status(), code, "{what}");
    error_of(r).await
}

#[tokio::test]
async fn loopback_peers_read_both_streams_anonymously() {
    let s = state();
    for p in LOOPBACK {
        for uri in ["/api/lab", "/api/sut/tf-1"] {
            let r = Req::get(uri, p).send(&s).await;
            assert_stream(&r, &format!("GET {uri} from {p}"));
        }
    }
}

#[tokio::test]
async fn remote_peers_without_a_session_may_not_read() {
    let s = state();
    for p in REMOTE {
        for uri in ["/api/lab", "/api/sut/tf-1"] {
            let r = Req::get(uri, p).send(&s).await;
            let why = assert_refused(r, StatusCode::UNAUTHORIZED, &format!("{uri} from {p}")).await;
            assert!(why.contains("log in"), "{why}");
        }
    }
}

#[tokio::test]
async fn remote_peers_read_with_a_session() {
    let s = logged_in();
    for p in REMOTE {
        for uri in ["/api/lab", "/api/sut/tf-1"] {
            let r = Req::get(uri, p).session(TOKEN).send(&s).await;
            assert_stream(&r, &format!("GET {uri} from {p} logged in"));
        }
    }
}

#[tokio::test]
async fn an_unknown_session_token_is_no_login() {
    let s = logged_in();
    let p = "10.0.0.5:40000";
    for uri in ["/api/lab", "/api/sut/tf-1"] {
        let r = Req::get(uri, p).session("not-a-session").send(&s).await;
        assert_refused(r, StatusCode::UNAUTHORIZED, uri).await;
    }
    // A cookie of another name carrying the token is not the session cookie either.
    let mut r = Req::get("/api/lab", p);
    r.cookie = Some(format!("other={TOKEN}"));
    assert_refused(r.send(&s).await, StatusCode::UNAUTHORIZED, "other cookie").await;
    let me = json(Req::get("/api/me", p).session("nope").send(&s).await).await;
    assert_eq!(me["user"], serde_json::Value::Null, "{me}");
}

#[tokio::test]
async fn an_expired_session_is_no_login() {
    let s = state();
    let past = Instant::now()
        .checked_sub(Duration::from_secs(1))
        .expect("the clock is past its first second");
    s.insert_session(TOKEN, "alice", past);
    let p = "10.0.0.5:40000";
    for uri in ["/api/lab", "/api/sut/tf-1"] {
        let r = Req::get(uri, p).session(TOKEN).send(&s).await;
        assert_refused(r, StatusCode::UNAUTHORIZED, uri).await;
    }
    for (uri, body) in ACTIONS {
        let r = Req::post(uri, "127.0.0.1:40000", body)
            .session(TOKEN)
            .action_header()
            .send(&s)
            .await;
        assert_refused(r, StatusCode::UNAUTHORIZED, uri).await;
    }
    let me = json(Req::get("/api/me", p).session(TOKEN).send(&s).await).await;
    assert_eq!(me["user"], serde_json::Value::Null, "{me}");
}

#[tokio::test]
async fn an_action_without_the_header_is_forbidden_even_logged_in_on_loopback() {
    let s = logged_in();
    for (uri, body) in ACTIONS {
        for p in ["127.0.0.1:40000", "10.0.0.5:40000"] {
            let r = Req::post(uri, p, body).session(TOKEN).send(&s).await;
            let why = assert_refused(r, StatusCode::FORBIDDEN, &format!("{uri} from {p}")).await;
            assert!(why.contains(ACTION_HEADER), "{why}");
            // Without the header and without a login: the header is checked first.
            let r = Req::post(uri, p, body).send(&s).await;
            assert_refused(r, StatusCode::FORBIDDEN, &format!("{uri} bare from {p}")).await;
        }
    }
}

#[tokio::test]
async fn an_action_without_a_login_is_unauthorized_even_on_loopback() {
    let s = logged_in();
    for (uri, body) in ACTIONS {
        for p in LOOPBACK.iter().chain(REMOTE.iter()) {
            let r = Req::post(uri, p, body).action_header().send(&s).await;
            let why = assert_refused(r, StatusCode::UNAUTHORIZED, &format!("{uri} from {p}")).await;
            assert!(why.contains("log in"), "{why}");
            let r = Req::post(uri, p, body)
                .session("not-a-session")
                .action_header()
                .send(&s)
                .await;
            assert_refused(r, StatusCode::UNAUTHORIZED, &format!("{uri} unknown token")).await;
        }
    }
}

#[tokio::test]
async fn an_allowed_action_without_a_broker_is_503_not_a_panic() {
    let s = logged_in();
    for (uri, body) in ACTIONS {
        for p in ["127.0.0.1:40000", "10.0.0.5:40000"] {
            let r = Req::post(uri, p, body)
                .session(TOKEN)
                .action_header()
                .send(&s)
                .await;
            let why = assert_refused(
                r,
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("{uri} from {p}"),
            )
            .await;
            assert!(why.contains("without a broker"), "{why}");
        }
    }
}

#[tokio::test]
async fn logging_in_without_a_broker_is_503() {
    let s = state();
    let r = Req::post(
        "/api/login",
        "127.0.0.1:40000",
        r#"{"username":"alice","password":"pw"}"#,
    )
    .send(&s)
    .await;
    let why = assert_refused(r, StatusCode::SERVICE_UNAVAILABLE, "login").await;
    assert!(why.contains("without a broker"), "{why}");
}

#[tokio::test]
async fn a_bad_sut_name_is_a_400_that_names_it_and_the_problem() {
    let s = state();
    let long = "a".repeat(64);
    let cases = [
        ("Tf-1".to_owned(), "must start with a lowercase letter"),
        ("tf.1".to_owned(), "contains '.'"),
        ("tf%201".to_owned(), "contains ' '"),
        (long.clone(), "64 characters long"),
    ];
    for (name, problem) in cases {
        let uri = format!("/api/sut/{name}");
        let r = Req::get(&uri, "127.0.0.1:40000").send(&s).await;
        let why = assert_refused(r, StatusCode::BAD_REQUEST, &uri).await;
        let shown = name.replace("%20", " ");
        assert!(why.contains(&format!("{shown:?}")), "{why}");
        assert!(why.contains(problem), "{why}");
    }
    // The name is checked after the access rule: a remote reader learns nothing from it.
    let r = Req::get("/api/sut/Tf-1", "10.0.0.5:40000").send(&s).await;
    assert_refused(r, StatusCode::UNAUTHORIZED, "bad name from remote").await;
}

#[tokio::test]
async fn static_files_are_served_to_anyone_with_a_content_security_policy() {
    let s = state();
    let files = [
        ("/", "text/html; charset=utf-8"),
        ("/app.js", "text/javascript; charset=utf-8"),
        ("/style.css", "text/css; charset=utf-8"),
        ("/favicon.svg", "image/svg+xml"),
    ];
    for (uri, ct) in files {
        for p in ["127.0.0.1:40000", "10.0.0.5:40000"] {
            let r = Req::get(uri, p).send(&s).await;
            assert_eq!(r.status(), StatusCode::OK, "{uri} from {p}");
            let h = r.headers();
            assert_eq!(h[header::CONTENT_TYPE], ct, "{uri}");
            let csp = h
                .get(header::CONTENT_SECURITY_POLICY)
                .unwrap_or_else(|| panic!("{uri} has no CSP"))
                .to_str()
                .expect("an ASCII CSP");
            for d in [
                "default-src 'self'",
                "object-src 'none'",
                "frame-ancestors 'none'",
            ] {
                assert!(csp.contains(d), "{uri}: {csp}");
            }
        }
    }
}

#[tokio::test]
async fn me_grants_anonymous_reading_only_on_loopback() {
    let s = logged_in();
    for p in LOOPBACK {
        let me = json(Req::get("/api/me", p).send(&s).await).await;
        assert_eq!(me["anonymous_read"], true, "{p}: {me}");
        assert_eq!(me["user"], serde_json::Value::Null, "{p}: {me}");
        assert_eq!(me["broker"], false, "{p}: {me}");
    }
    for p in REMOTE {
        let me = json(Req::get("/api/me", p).send(&s).await).await;
        assert_eq!(me["anonymous_read"], false, "{p}: {me}");
        let me = json(Req::get("/api/me", p).session(TOKEN).send(&s).await).await;
        assert_eq!(me["anonymous_read"], false, "{p}: {me}");
        assert_eq!(me["user"], "alice", "{p}: {me}");
    }
}

#[tokio::test]
async fn logout_ends_the_session() {
    let s = logged_in();
    let p = "10.0.0.5:40000";
    assert_stream(
        &Req::get("/api/lab", p).session(TOKEN).send(&s).await,
        "before logout",
    );
    let r = Req::post("/api/logout", p, "{}")
        .session(TOKEN)
        .send(&s)
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let cookie = r.headers()[header::SET_COOKIE]
        .to_str()
        .expect("an ASCII cookie");
    assert!(
        cookie.starts_with(&format!("{COOKIE}=;")) && cookie.contains("Max-Age=0"),
        "{cookie}"
    );
    // The old cookie, still sent, no longer logs in.
    let r = Req::get("/api/lab", p).session(TOKEN).send(&s).await;
    assert_refused(r, StatusCode::UNAUTHORIZED, "after logout").await;
    let r = Req::post(ACTIONS[0].0, p, ACTIONS[0].1)
        .session(TOKEN)
        .action_header()
        .send(&s)
        .await;
    assert_refused(r, StatusCode::UNAUTHORIZED, "action after logout").await;
    let me = json(Req::get("/api/me", p).session(TOKEN).send(&s).await).await;
    assert_eq!(me["user"], serde_json::Value::Null, "{me}");
}

/// A page's hold on a SUT lives as long as its stream: two pages count twice, and a closed page
/// no longer counts (the link lets go of the SUT a while later: `watching`'s tests).
#[tokio::test]
async fn a_suts_stream_holds_its_output_while_the_page_is_open() {
    let s = state();
    let sut = labvisor_protocol::SutName::new("tf-1").unwrap();
    assert_eq!(s.watching(&sut), (0, false));
    let first = Req::get("/api/sut/tf-1", LOOPBACK[0]).send(&s).await;
    assert_eq!(first.status(), StatusCode::OK);
    let second = Req::get("/api/sut/tf-1", LOOPBACK[0]).send(&s).await;
    assert_eq!(s.watching(&sut), (2, true));
    drop(first);
    assert_eq!(s.watching(&sut), (1, true));
    drop(second);
    assert_eq!(
        s.watching(&sut),
        (0, true),
        "kept for a while after the last page"
    );
    // The lab's stream holds no SUT.
    let lab = Req::get("/api/lab", LOOPBACK[0]).send(&s).await;
    assert_eq!(lab.status(), StatusCode::OK);
    assert_eq!(s.watching(&sut), (0, true));
}
