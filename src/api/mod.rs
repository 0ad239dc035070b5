//! The HTTP API of the control plane (SURFACE.md "HTTP API"). It runs on
//! its own thread with a single-threaded tokio runtime, away from the
//! shards: it reads their counters (atomics) and calls the hub, whose calls
//! are short and synchronous.
//!
//! Routes (errors are JSON `{"code", "message"}` with the HTTP status,
//! except `/oauth/token`, which answers RFC 6749 §5.2 errors):
//!
//! | route | needs | answer |
//! |---|---|---|
//! | `GET /healthz` | | `{"status": "ok"}` |
//! | `GET /readyz` | | `{"status": "ready"}`, 503 before the listeners are up, while draining, or while the hub's back end (NATS) is unreachable |
//! | `GET /metrics` | | Prometheus (OpenMetrics) text |
//! | `GET /.well-known/openid-configuration`, `GET /.well-known/jwks.json` | authority | the embedded authority's discovery documents; 404 without it |
//! | `POST /oauth/token` | provider | RFC 6749 token endpoint, grants `authorization_code` and `refresh_token` (`oauth.rs`) |
//! | `GET /api/v1/devices` | bearer, hub | the caller's devices (shape in `devices.rs`, `DeviceJson`) |
//! | `GET /api/v1/devices/{id}` | bearer, hub | one device |
//! | `DELETE /api/v1/devices/{id}` | bearer, hub | removes it, disconnecting it: `{"deviceIds": [id]}` |
//! | `GET /api/v1/devices/{id}/resource-links` | bearer, hub | its published links, OCF link JSON |
//! | `PUT /api/v1/devices/{id}/metadata` | bearer, hub | `{"twinEnabled": bool, "twinForceSynchronization": true}` (either or both): the twin setting (spec §7.5); answers the device |
//! | `GET /api/v1/devices/{id}/resources` | bearer, hub | the twin: every resource with a value (`resources.rs`) |
//! | `GET /api/v1/devices/{id}/resources/{*href}` | bearer, hub | one resource of the twin as JSON; `?twin=false` reads from the device |
//! | `PUT /api/v1/devices/{id}/resources/{*href}` | bearer, hub | update on the device, waits for its answer (`commands.rs`) |
//! | `POST /api/v1/devices/{id}/resource-links/{*href}` | bearer, hub | create on the device |
//! | `DELETE /api/v1/devices/{id}/resource-links/{*href}` | bearer, hub | delete on the device |
//! | `GET /api/v1/devices/{id}/pending-commands` | bearer, hub | commands not yet answered |
//! | `DELETE /api/v1/devices/{id}/pending-commands/{correlationId}` | bearer, hub | cancel one not yet sent |
//! | `GET /api/v1/events` | bearer, hub | server-sent events of the caller's devices (`events.rs`) |
//! | `POST /api/v1/authorization-codes` | bearer, authority | `{"code", "expiresIn"}` for the caller, body `{"deviceId"}` optional |
//!
//! "bearer" routes take `Authorization: Bearer <access token>` (401 without
//! a valid one, `bearer.rs`) and are scoped to its owner: another owner's
//! device is 404. A route whose part was not given to [`ApiState`] answers
//! 503 saying which; the authority's routes answer 404 when the embedded
//! authority is not enabled. `{*href}` is the resource's href on the
//! device with or without its leading `/` (`/resources/light` and
//! `/resources//light` both name `/light`); an empty one is 400.

mod bearer;
mod codes;
mod commands;
mod content;
mod devices;
mod events;
mod metrics;
mod oauth;
mod resources;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use shards::ShardStats;

use crate::auth::authority::Authority;
use crate::auth::provider::EmbeddedProvider;
use crate::auth::validator::SharedValidator;
use crate::hub::Hub;

pub use metrics::{HubMetrics, ShardMetrics};

/// What the API reads.
#[derive(Clone)]
pub struct ApiState {
    /// The shards' counters, for `/metrics`.
    shard_stats: Vec<Arc<ShardStats>>,
    /// Set once the listeners are up.
    ready: Arc<AtomicBool>,
    /// The runtime's shutdown flag: a draining gateway is not ready.
    draining: Arc<AtomicBool>,
    /// The embedded token authority, whose discovery documents we publish.
    authority: Option<Arc<Authority>>,
    /// The device registry the device routes read and change.
    hub: Option<Arc<dyn Hub>>,
    /// The embedded authority's token exchange (`POST /oauth/token`).
    provider: Option<Arc<EmbeddedProvider>>,
    /// Checks bearer tokens.
    validator: Option<Arc<bearer::ApiValidator>>,
    /// How long a command waits for the device when the request names no
    /// `timeToLive` (spec §7.4).
    command_ttl: Duration,
    /// Set when the server stops: requests that wait (commands, event
    /// streams) end, so that the graceful shutdown does not wait for them.
    stopping: Arc<tokio::sync::watch::Sender<bool>>,
}

/// The default time to live of a command (`with_command_ttl`).
pub const DEFAULT_COMMAND_TTL: Duration = Duration::from_secs(10 * 60);

impl ApiState {
    pub fn new(stats: Vec<Arc<ShardStats>>, draining: Arc<AtomicBool>) -> ApiState {
        ApiState {
            shard_stats: stats,
            ready: Arc::new(AtomicBool::new(false)),
            draining,
            authority: None,
            hub: None,
            provider: None,
            validator: None,
            command_ttl: DEFAULT_COMMAND_TTL,
            stopping: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }

    /// How long a command may wait to be sent and for the device's answer
    /// when the request names no `timeToLive` (default 10 minutes).
    pub fn with_command_ttl(mut self, ttl: Duration) -> ApiState {
        self.command_ttl = ttl;
        self
    }

    /// The metrics registry as of now: the shards' counters and, with a
    /// hub, the hub's. Built per scrape (a few allocations) so that the
    /// builders need not thread a registry through.
    fn registry(&self) -> prometheus_client::registry::Registry {
        let mut registry = prometheus_client::registry::Registry::with_prefix("coapgw");
        registry.register_collector(Box::new(ShardMetrics::new(self.shard_stats.clone())));
        if let Some(hub) = &self.hub {
            registry.register_collector(Box::new(HubMetrics::new(hub.clone())));
        }
        registry
    }

    /// Publish the embedded authority's OpenID discovery document and key
    /// set, so that the gateway (or another node) can be pointed at it as at
    /// an external provider.
    pub fn with_authority(mut self, authority: Arc<Authority>) -> ApiState {
        self.authority = Some(authority);
        self
    }

    /// The hub behind the device routes (`/api/v1/devices...`).
    pub fn with_hub(mut self, hub: Arc<dyn Hub>) -> ApiState {
        self.hub = Some(hub);
        self
    }

    /// The embedded authority's token exchange for `POST /oauth/token`.
    /// Give the API the provider the shards use: one-time codes and refresh
    /// tokens are remembered by that object. Its authority also serves the
    /// discovery documents and issues codes unless
    /// [`with_authority`](Self::with_authority) named one.
    pub fn with_provider(mut self, provider: Arc<EmbeddedProvider>) -> ApiState {
        self.provider = Some(provider);
        self
    }

    /// The validator bearer tokens are checked with: the one the shards
    /// use, so that key refreshes reach the API too. The API does not ask
    /// for the device-ID claim whatever the `[authorization] mode`.
    pub fn with_validator(mut self, validator: Arc<SharedValidator>) -> ApiState {
        self.validator = Some(Arc::new(bearer::ApiValidator::new(validator)));
        self
    }

    /// The embedded authority, given directly or through the provider.
    fn embedded_authority(&self) -> Option<&Arc<Authority>> {
        self.authority
            .as_ref()
            .or_else(|| self.provider.as_ref().map(|p| p.authority()))
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
    let stopping = state.stopping.clone();
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot use the HTTP API listener");
                return;
            }
        };
        let shutdown = async move {
            let _ = stopped.await;
            // Waiting commands and event streams end now; the graceful
            // shutdown then waits for their answers only.
            stopping.send_replace(true);
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
        .route("/oauth/token", post(oauth::token))
        .route("/api/v1/devices", get(devices::list))
        .route(
            "/api/v1/devices/{id}",
            get(devices::get).delete(devices::delete),
        )
        .route(
            "/api/v1/devices/{id}/resource-links",
            get(devices::resource_links),
        )
        .route("/api/v1/devices/{id}/metadata", put(devices::metadata))
        .route("/api/v1/devices/{id}/resources", get(resources::list))
        .route(
            "/api/v1/devices/{id}/resources/",
            get(resources::empty_href).put(resources::empty_href),
        )
        .route(
            "/api/v1/devices/{id}/resources/{*href}",
            get(resources::get)
                .put(commands::update)
                .layer(DefaultBodyLimit::max(MAX_RESOURCE_BODY)),
        )
        .route(
            "/api/v1/devices/{id}/resource-links/",
            post(resources::empty_href).delete(resources::empty_href),
        )
        .route(
            "/api/v1/devices/{id}/resource-links/{*href}",
            post(commands::create)
                .delete(commands::delete)
                .layer(DefaultBodyLimit::max(MAX_RESOURCE_BODY)),
        )
        .route(
            "/api/v1/devices/{id}/pending-commands",
            get(commands::pending),
        )
        .route(
            "/api/v1/devices/{id}/pending-commands/{correlation_id}",
            axum::routing::delete(commands::cancel),
        )
        .route("/api/v1/events", get(events::stream))
        .route("/api/v1/authorization-codes", post(codes::issue))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // The request bodies are a few form or JSON parameters.
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// The largest request body the API reads (axum's default is 2 MiB).
const MAX_BODY: usize = 64 * 1024;

/// The largest resource representation a request may carry: the default
/// CoAP `max_message_size` (SURFACE.md `[coap]`).
const MAX_RESOURCE_BODY: usize = 256 * 1024;

/// The wall clock in Unix seconds, for the sans-IO token and hub code.
#[allow(clippy::disallowed_methods)] // The API is the IO side (clippy.toml): it reads the clock.
fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The wall clock in Unix nanoseconds, for command times (spec §7.4).
#[allow(clippy::disallowed_methods)] // The API is the IO side (clippy.toml): it reads the clock.
fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// An error answer of a route, for handlers that return `Result`.
#[derive(Debug)]
struct Failure {
    status: StatusCode,
    message: String,
}

impl Failure {
    fn new(status: StatusCode, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        error(self.status, &self.message)
    }
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
    if !state.ready.load(Ordering::SeqCst) || state.draining.load(Ordering::SeqCst) {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: listeners not up or shutting down",
        )
    } else if state.hub.as_ref().is_some_and(|hub| !hub.available()) {
        // issue 6: the hub's broker is unreachable.
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the hub's back end is unreachable",
        )
    } else {
        Json(serde_json::json!({ "status": "ready" })).into_response()
    }
}

async fn metrics_text(State(state): State<ApiState>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry()) {
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
    match state.embedded_authority() {
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
    match state.embedded_authority() {
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

async fn method_not_allowed() -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route",
    )
}
