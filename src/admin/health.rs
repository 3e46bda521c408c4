//! `/healthz` (the process answers), `/readyz` (it should get traffic) and `/metrics`.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use std::time::Duration;

use super::Shared;

pub(super) async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Ready unless the core service is unavailable or the gateway is draining for shutdown.
pub(super) async fn readyz(State(s): State<Shared>) -> impl IntoResponse {
    let available = s.ctx.backend.is_available();
    let draining = s.ctx.shutdown.is_cancelled();
    let ready = available && !draining;
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = serde_json::json!({
        "ready": ready,
        "core_service": { "kind": s.ctx.backend.kind(), "available": available },
        "draining": draining,
    });
    (status, Json(body))
}

/// Prometheus text format; values that are read rather than counted are sampled first.
pub(super) async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    let ctx = &s.ctx;
    let m = &ctx.metrics;
    m.retained.set(i64::try_from(ctx.router.retained_count()).unwrap_or(i64::MAX));
    m.core_available.set(i64::from(ctx.backend.is_available()));
    if let Ok(lag) = tokio::time::timeout(Duration::from_secs(2), ctx.router.lag()).await {
        m.consumer_lag.set(i64::try_from(lag).unwrap_or(i64::MAX));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], m.encode())
}
