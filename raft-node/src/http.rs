//! The HTTP side door: Prometheus `/metrics`, `/healthz` (liveness) and `/readyz` (readiness).

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::shared::NodeShared;

pub(crate) async fn serve(
    shared: Arc<NodeShared>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let metrics = shared.clone();
    let ready = shared.clone();
    let health = shared.clone();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.metrics.render(),
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let s = health.clone();
                async move {
                    match s.fatal.borrow().clone() {
                        None => (StatusCode::OK, "ok\n".to_string()).into_response(),
                        Some(reason) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("failed: {reason}\n"),
                        )
                            .into_response(),
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let s = ready.clone();
                async move {
                    match s.readiness() {
                        Ok(()) => (StatusCode::OK, "ready\n".to_string()).into_response(),
                        Err(reason) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {reason}\n"),
                        )
                            .into_response(),
                    }
                }
            }),
        );
    let stop = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!(error = %e, "metrics server stopped");
    }
}
