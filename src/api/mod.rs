//! The HTTP API of the control plane (SURFACE.md): liveness (`/healthz`),
//! readiness (`/readyz`) and Prometheus metrics (`/metrics`). It runs on its
//! own thread with a single-threaded tokio runtime, away from the shards:
//! it only reads their counters, which are atomics.
//!
//! With the embedded authority it also publishes
//! `/.well-known/openid-configuration` and `/.well-known/jwks.json`. The
//! device, twin, command and token routes arrive with the hub.

mod metrics;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use shards::ShardStats;

use crate::auth::authority::Authority;

pub use metrics::ShardMetrics;

/// What the API reads.
#[derive(Clone)]
pub struct ApiState {
    metrics: Arc<prometheus_client::registry::Registry>,
    /// Set once the listeners are up.
    ready: Arc<AtomicBool>,
    /// The runtime's shutdown flag: a draining gateway is not ready.
    draining: Arc<AtomicBool>,
    /// The embedded token authority, whose discovery documents we publish.
    authority: Option<Arc<Authority>>,
}

impl ApiState {
    pub fn new(stats: Vec<Arc<ShardStats>>, draining: Arc<AtomicBool>) -> ApiState {
        let mut registry = prometheus_client::registry::Registry::with_prefix("coapgw");
        registry.register_collector(Box::new(ShardMetrics::new(stats)));
        ApiState {
            metrics: Arc::new(registry),
            ready: Arc::new(AtomicBool::new(false)),
            draining,
            authority: None,
        }
    }

    /// Publish the embedded authority's OpenID discovery document and key
    /// set, so that the gateway (or another node) can be pointed at it as at
    /// an external provider.
    pub fn with_authority(mut self, authority: Arc<Authority>) -> ApiState {
        self.authority = Some(authority);
        self
    }

    /// Readiness as the load balancer sees it: set once the listeners are
    /// up, cleared when a shutdown starts so traffic moves away first.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot listen on {0} for the HTTP API: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("cannot start the HTTP API thread: {0}")]
    Thread(std::io::Error),
}

/// A running API server; stops when [`ApiServer::stop`] is called or it is
/// dropped.
pub struct ApiServer {
    local_addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiServer {
    /// Binds `address` now (so a taken port is reported at start-up) and
    /// serves on a thread of its own.
    pub fn start(address: SocketAddr, state: ApiState) -> Result<ApiServer, ApiError> {
        let listener =
            std::net::TcpListener::bind(address).map_err(|e| ApiError::Bind(address, e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| ApiError::Bind(address, e))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| ApiError::Bind(address, e))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || serve(listener, state, stopped))
            .map_err(ApiError::Thread)?;
        Ok(ApiServer {
            local_addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn serve(
    listener: std::net::TcpListener,
    state: ApiState,
    stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the HTTP API runtime");
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot use the HTTP API listener");
                return;
            }
        };
        let shutdown = async {
            let _ = stopped.await;
        };
        if let Err(e) = axum::serve(listener, router(state))
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "HTTP API stopped");
        }
    });
}

/// The routes; public so tests can drive it without a socket.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route(
            "/.well-known/openid-configuration",
            get(openid_configuration),
        )
        .route("/.well-known/jwks.json", get(jwks))
        .fallback(not_found)
        .with_state(state)
}

/// SURFACE.md: errors are JSON `{"code": ..., "message": ...}` with the
/// matching HTTP status.
fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        Json(serde_json::json!({ "code": status.as_u16(), "message": message })),
    )
        .into_response()
}

async fn healthz() -> Response {
    Json(serde_json::json!({ "status": "ok" })).into_response()
}

async fn readyz(State(state): State<ApiState>) -> Response {
    if state.ready.load(Ordering::SeqCst) && !state.draining.load(Ordering::SeqCst) {
        Json(serde_json::json!({ "status": "ready" })).into_response()
    } else {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: listeners not up or shutting down",
        )
    }
}

async fn metrics_text(State(state): State<ApiState>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.metrics) {
        Ok(()) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics"),
    }
}

async fn openid_configuration(State(state): State<ApiState>) -> Response {
    match &state.authority {
        Some(authority) => {
            let issuer = authority.settings().issuer.clone();
            Json(authority.openid_configuration(&issuer)).into_response()
        }
        None => error(
            StatusCode::NOT_FOUND,
            "the embedded authority is not enabled",
        ),
    }
}

async fn jwks(State(state): State<ApiState>) -> Response {
    match &state.authority {
        Some(authority) => Json(authority.jwks()).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "the embedded authority is not enabled",
        ),
    }
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such route")
}
