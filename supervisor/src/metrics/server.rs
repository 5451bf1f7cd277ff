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
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz_handler))
        .with_state(shared);
    axum::serve(listener, app)
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
