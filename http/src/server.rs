//! What the daemons serve: the `/metrics` route and the listener that
//! serves a router until shutdown.

use crate::METRICS_PATH;
use crate::admin::HEALTH_PATH;
use axum::Router;
use axum::routing::get;
use iim_proto::metrics::Render;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A router with `/metrics` serving `metrics`, and `/health`.
pub fn metrics_router(metrics: Arc<dyn Render>) -> Router {
    Router::new()
        .route(
            METRICS_PATH,
            get(move || {
                let m = metrics.clone();
                async move { ([("content-type", "text/plain; version=0.0.4")], m.render()) }
            }),
        )
        .route(HEALTH_PATH, get(|| async { "ok" }))
}

/// Serve `router` on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
