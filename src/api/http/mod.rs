//! The HTTP port: `/healthz` (the process is alive) and `/readyz` (the database answers and
//! the schema is migrated). Served until the shutdown token is cancelled.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use deadpool_postgres::Pool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::db;

/// What `/readyz` checks.
#[derive(Clone)]
pub struct Readiness {
    /// The pool to ping.
    pub pool: Pool,
}

impl Readiness {
    /// Whether the registry can serve: the database answers and holds the latest schema.
    pub async fn check(&self) -> Result<(), String> {
        let probe = async {
            let client = self
                .pool
                .get()
                .await
                .map_err(|e| format!("database unreachable: {e}"))?;
            let applied = db::migrations::current_version(&client)
                .await
                .map_err(|e| format!("database unreachable: {e}"))?;
            let wanted = db::migrations::latest_known();
            if applied < wanted {
                return Err(format!("schema at migration {applied}, {wanted} expected"));
            }
            Ok(())
        };
        tokio::time::timeout(Duration::from_secs(2), probe)
            .await
            .unwrap_or_else(|_| Err("database did not answer within 2s".to_owned()))
    }
}

/// The HTTP router.
pub fn router(readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Arc::new(readiness))
}

async fn readyz(State(readiness): State<Arc<Readiness>>) -> (StatusCode, String) {
    match readiness.check().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

/// Serves `router` on `listener` until `shutdown` is cancelled.
///
/// # Errors
/// The listener failed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
