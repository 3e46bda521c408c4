//! Admin HTTP API (axum) on its own port: `/metrics`, `/healthz`, `/readyz`, the operator
//! console page `/ui` and the management endpoints under `/api/v1` (clients, sessions,
//! tokens, device credentials, messages).
//!
//! Everything but the health probes, `/metrics` and the page `/ui` (which holds no data and
//! asks its user for the token) needs `Authorization: Bearer <admin token>` (compared in
//! constant time); without a configured token the management routes are off (401
//! `admin_token_not_configured`). Errors have one JSON shape,
//! `{"error":{"code":"...","message":"..."}}` ([`ApiError`]). The routes are documented in
//! `docs/admin-openapi.yaml`; [`routes`] lists them for the test that keeps the two in step.
//!
//! This module translates HTTP into calls on the gateway's existing parts (registry,
//! authenticator, router, core service); it holds no state of its own and must not grow
//! MQTT or storage logic.

mod clients;
mod credentials;
mod error;
mod health;
mod messages;
pub mod probe;
mod query;
mod sessions;
mod tokens;
mod ui;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, MethodRouter};
use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;
use subtle::ConstantTimeEq as _;
use tokio_util::sync::CancellationToken;

pub use error::ApiError;

use crate::config::auth::Secret;
use crate::context::Context;

/// Requests served at once; more wait.
const MAX_CONCURRENT_REQUESTS: usize = 64;

/// What every handler gets.
pub(crate) struct AdminState {
    ctx: Arc<Context>,
    token: Option<Secret>,
}

type Shared = Arc<AdminState>;

/// One documented route: HTTP method (upper case) and path (OpenAPI template syntax).
pub type Route = (&'static str, &'static str);

/// Routes and whether they need the token, in one table next to their handlers.
fn table() -> Vec<(Route, bool, MethodRouter<Shared>)> {
    vec![
        (("GET", "/healthz"), false, get(health::healthz)),
        (("GET", "/readyz"), false, get(health::readyz)),
        (("GET", "/metrics"), false, get(health::metrics)),
        (("GET", "/ui"), false, get(ui::page)),
        (("GET", "/api/v1/clients"), true, get(clients::list)),
        (("GET", "/api/v1/clients/{client_id}"), true, get(clients::get_one)),
        (("DELETE", "/api/v1/clients/{client_id}"), true, delete(clients::kick)),
        (("POST", "/api/v1/tokens"), true, post(tokens::issue)),
        (("DELETE", "/api/v1/tokens/{jti}"), true, delete(tokens::revoke)),
        (("POST", "/api/v1/credentials"), true, post(credentials::register)),
        (("DELETE", "/api/v1/credentials/{access_key_id}"), true, delete(credentials::revoke)),
        (("POST", "/api/v1/messages"), true, post(messages::publish)),
        (("GET", "/api/v1/messages"), true, get(query::search)),
        (("GET", "/api/v1/messages/{msg_id}"), true, get(query::by_id)),
        (("GET", "/api/v1/messages/{msg_id}/trace"), true, get(query::trace)),
        (("GET", "/api/v1/sessions/{client_id}"), true, get(sessions::get_one)),
        (("DELETE", "/api/v1/sessions/{client_id}"), true, delete(sessions::delete_one)),
        (("POST", "/api/v1/sessions/{client_id}/reset"), true, post(sessions::reset)),
    ]
}

/// Every (method, path) the admin API serves.
pub fn routes() -> Vec<Route> {
    table().into_iter().map(|(r, _, _)| r).collect()
}

fn router(state: Shared) -> Router {
    let mut open = Router::new();
    let mut protected = Router::new();
    for ((_, path), needs_token, handler) in table() {
        if needs_token {
            protected = protected.route(path, handler);
        } else {
            open = open.route(path, handler);
        }
    }
    let protected = protected.route_layer(axum::middleware::from_fn_with_state(state.clone(), require_token));
    open.merge(protected)
        .fallback(|| async { ApiError::not_found("unknown_path", "no such endpoint (see docs/admin-openapi.yaml)") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(axum::http::StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed here")
        })
        .layer(tower::limit::ConcurrencyLimitLayer::new(MAX_CONCURRENT_REQUESTS))
        .with_state(state)
}

async fn require_token(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let Some(expected) = &s.token else {
        return ApiError::unauthorized(
            "admin_token_not_configured",
            "no admin token is configured (admin.token or its environment variable)",
        )
        .into_response();
    };
    let presented = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    match presented {
        Some(t) if bool::from(t.as_bytes().ct_eq(expected.expose().as_bytes())) => next.run(req).await,
        Some(_) => ApiError::unauthorized("invalid_token", "the bearer token is not the admin token").into_response(),
        None => ApiError::unauthorized("missing_token", "send Authorization: Bearer <admin token>").into_response(),
    }
}

/// Accept connections until `stop`, at most `max_connections` at once, each served by hyper's
/// HTTP/1 with a header-read timeout; on `stop` open connections finish the request they are
/// serving.
async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    (max_connections, header_read_timeout): (usize, std::time::Duration),
    stop: CancellationToken,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "admin API: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!("admin API: connection limit reached, connection closed");
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        connections.spawn(async move {
            let _permit = permit;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(header_read_timeout);
            let conn = http.serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
        while connections.try_join_next().is_some() {}
    }
    while connections.join_next().await.is_some() {}
}

/// Why [`AdminServer::start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("admin API cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin API: no local address: {0}")]
    LocalAddr(#[source] std::io::Error),
}

/// The running admin server.
pub struct AdminServer {
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl AdminServer {
    /// Bind `admin.bind` and serve until [`AdminServer::stop`]. Shutdown of the gateway turns
    /// `/readyz` false before this stops, so probes see the drain.
    pub async fn start(ctx: Arc<Context>) -> Result<AdminServer, StartError> {
        let bind = ctx.config.admin.bind_addr()?;
        let token = ctx.config.admin.resolved_token();
        if token.is_none() {
            tracing::warn!(
                "admin API: management routes (/api/v1) are off; set ${} (or admin.token) to enable them. /metrics, /healthz and /readyz are served",
                ctx.config.admin.token_env
            );
        }
        let listener =
            tokio::net::TcpListener::bind(bind).await.map_err(|source| StartError::Bind { addr: bind, source })?;
        let addr = listener.local_addr().map_err(StartError::LocalAddr)?;
        let stop = CancellationToken::new();
        // A client that trickles a request's headers cannot hold a connection; connections
        // beyond the cap are closed at once.
        let ctx_limits = (
            ctx.config.admin.max_connections.max(1),
            std::time::Duration::from_secs(ctx.config.admin.header_read_timeout_secs.max(1)),
        );
        let app = router(Arc::new(AdminState { ctx, token }));
        let task = tokio::spawn(serve(listener, app, ctx_limits, stop.clone()));
        tracing::info!(%addr, "admin API listening");
        Ok(AdminServer { addr, stop, task })
    }

    /// Stop serving (open requests get a moment to finish).
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.task).await;
    }
}
