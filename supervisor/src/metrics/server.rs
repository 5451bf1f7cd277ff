//! The HTTP side of `labvisor supervise`'s metrics: `/metrics` (the OpenMetrics text) and
//! `/healthz` (200 `ok`, or 503 and the reason), served by axum from the [`Shared`] half.

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::Shared;

/// The default `--metrics-listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";
/// The content type of `/metrics`.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Where `labvisor supervise` serves `/metrics` and `/healthz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    /// The address.
    pub addr: std::net::SocketAddr,
    /// Whether failing to bind it is fatal (it was asked for), or only a warning (the default
    /// address, which may be taken on a developer's machine).
    pub required: bool,
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown` resolves.
///
/// `page`: more routes on the same listener (the lab's web page, [`crate::web::router`]); the
/// handlers can ask for the client's address (`ConnectInfo<SocketAddr>`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    page: Option<Router>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz_handler))
        .with_state(shared);
    if let Some(page) = page {
        app = app.merge(page);
    }
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

async fn metrics_handler(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], shared.encode())
}

async fn healthz_handler(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    match shared.health() {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}
