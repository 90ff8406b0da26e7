//! The HTTP port: `/healthz` (the process is alive), `/readyz` (the database answers and the
//! schema is migrated), `/metrics` (OpenMetrics to scrapers that ask for it, the Prometheus text format otherwise) and the webhook ingress
//! `POST /ingest/{datasource_id}`. Served until the shutdown token is cancelled, over TLS when
//! the port has a certificate (`--http-tls-*`).

mod ingest;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use deadpool_postgres::Pool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::tls::{ServerTls, TlsIncoming};
use crate::connectors::webhook::Ingress;
use crate::telemetry::metrics::{self, Metrics};

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct HttpState {
    /// The pool.
    pub pool: Pool,
    /// The running webhook workers' inboxes.
    pub ingress: Ingress,
    /// What `/metrics` serves.
    pub metrics: Metrics,
    /// What `/readyz` answers.
    pub readiness: crate::api::ready::Readiness,
}

/// The HTTP router.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(scrape))
        .route("/ingest/{datasource_id}", post(ingest::ingest))
        .with_state(Arc::new(state))
}

/// How long a scrape waits for the outbox horizon reading.
const HORIZON_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

async fn readyz(State(state): State<Arc<HttpState>>) -> (StatusCode, String) {
    match state.readiness.check().await {
        Ok(()) => {
            let mut body = "ready\n".to_owned();
            for warning in state.readiness.warnings() {
                body.push_str(&format!("warning: {warning}\n"));
            }
            (StatusCode::OK, body)
        }
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

async fn scrape(State(state): State<Arc<HttpState>>, headers: axum::http::HeaderMap) -> Response {
    // The outbox horizon is read live, so a transaction holding it open shows while it does
    // (not only once its events are finally read). A database that does not answer in time
    // leaves the last reading.
    let read = async {
        let client = state.pool.get().await.ok()?;
        crate::db::repository::events::horizon_holder(&**client)
            .await
            .ok()
    };
    if let Ok(Some(holder)) = tokio::time::timeout(HORIZON_READ_TIMEOUT, read).await {
        state.metrics.outbox_horizon(holder);
    }
    match state.metrics.encode() {
        Ok(text) => {
            let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
            if metrics::wants_openmetrics(accept) {
                ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
            } else {
                let text = metrics::to_prometheus_text(&text);
                ([(header::CONTENT_TYPE, metrics::TEXT_CONTENT_TYPE)], text).into_response()
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "encoding the metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Serves `router` on `listener` until `shutdown` is cancelled: over TLS with `tls` (only),
/// plaintext without.
///
/// # Errors
/// The listener failed.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    if let Some(tls) = tls {
        let incoming = TlsIncoming::start(listener, tls, shutdown.child_token(), "http");
        return axum::serve(incoming, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    }
    // Small answers (202s, probes) go out at once, not after a delayed acknowledgement.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
