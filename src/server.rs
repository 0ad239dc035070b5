//! Starting the gateway from a [`Config`]: TLS set-up (creating the
//! development PKI on first start with the embedded defaults), the session
//! settings, and the shards runtime.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use shards::{Runtime, RuntimeConfig, StartError};

use crate::auth::authority::{Authority, AuthoritySettings, SigningKey};
use crate::auth::jwks::Jwks;
use crate::auth::jwks_fetch;
use crate::auth::jwt::{TokenValidator, ValidationSettings};
use crate::auth::oauth::HttpProvider;
use crate::auth::pki::{self, PkiError, PkiPaths};
use crate::auth::provider::{EmbeddedProvider, TokenProvider};
use crate::auth::tls::{self, TlsError, TlsFiles};
use crate::auth::validator::SharedValidator;
use crate::auth::ClientAuth;
use crate::config::Config;
use crate::config::HubKind;
use crate::gateway::{GatewayMessage, GatewayService, SenderSlot, ShardConnections};
use crate::hub::nats::{NatsError, NatsHub, NatsSettings};
use crate::hub::{Connections, Hub, MemoryHub, Protocol, StoreError, StoreSettings};
use crate::ocf;
use crate::session::SessionConfig;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create the development PKI: {0}")]
    Pki(#[from] PkiError),
    #[error("TLS configuration: {0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Start(#[from] StartError),
    #[error("authorization: {0}")]
    Auth(String),
    #[error("{0}")]
    Hub(#[from] StoreError),
    #[error("{0}")]
    Nats(#[from] NatsError),
}

/// How [`start_with_options`] runs the gateway beyond its [`Config`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StartOptions {
    /// `serve --memory`: the hub in memory only, no store opened.
    pub memory: bool,
}

/// How often the control plane expires pending commands (spec §7.4).
const EXPIRY_PERIOD: Duration = Duration::from_secs(1);
/// How often expired refresh grants and used codes are pruned.
const GRANT_PRUNE_PERIOD: Duration = Duration::from_secs(600);

/// The hub back end a gateway runs (`[hub] kind`).
#[derive(Debug, Clone)]
pub enum HubBackend {
    /// In process: durable in `<data_dir>/hub.redb`, or in memory.
    Embedded(Arc<MemoryHub>),
    /// NATS JetStream, shared with the other nodes (issue 6).
    Nats(Arc<NatsHub>),
}

impl HubBackend {
    /// The hub behind the trait the sessions and the API use.
    pub fn hub(&self) -> Arc<dyn Hub> {
        match self {
            HubBackend::Embedded(h) => h.clone(),
            HubBackend::Nats(h) => h.clone(),
        }
    }

    fn set_connections(&self, connections: Arc<dyn Connections>) {
        match self {
            HubBackend::Embedded(h) => h.set_connections(connections),
            HubBackend::Nats(h) => h.set_connections(connections),
        }
    }

    /// Shutdown: the embedded store commits and closes; the NATS hub
    /// hands what is queued to the broker (bounded by its timeout).
    fn close(&self) {
        match self {
            HubBackend::Embedded(h) => h.close(),
            HubBackend::Nats(h) => {
                if let Err(e) = h.flush() {
                    tracing::error!("the NATS hub could not hand its last changes over: {e}");
                }
            }
        }
    }
}

/// The embedded hub `[hub]` asks for: durable in `<data_dir>/hub.redb`, or
/// in memory with `memory`.
pub fn open_hub(config: &Config, memory: bool) -> Result<MemoryHub, StoreError> {
    if memory {
        tracing::warn!("the hub is in memory only (--memory): nothing survives a restart");
        return Ok(MemoryHub::new());
    }
    let settings = StoreSettings {
        event_retention: config.hub.event_retention,
        commit_interval: config.hub.commit_interval,
        ..StoreSettings::default()
    };
    let hub = MemoryHub::open_with(&config.hub.data_dir, settings)?;
    tracing::info!(
        path = %config.hub.data_dir.join(crate::hub::store::FILE_NAME).display(),
        "hub store opened"
    );
    Ok(hub)
}

/// The back end of `[hub] kind`, for the node `service_id`: the NATS hub
/// registers the node under it (spec §8.1, §8.4). `memory` (`serve
/// --memory`) runs the embedded hub in memory whatever the kind.
pub fn open_backend(
    config: &Config,
    memory: bool,
    service_id: &str,
) -> Result<HubBackend, ServeError> {
    match config.hub.kind {
        HubKind::Nats if !memory => {
            let mut settings = NatsSettings::from_config(&config.hub, service_id);
            // The grants bucket keeps refresh grants and used codes as long
            // as either may be needed.
            settings.grant_max_age = config
                .authority
                .refresh_token_ttl
                .max(config.authority.code_ttl);
            let hub = NatsHub::open(settings)?;
            Ok(HubBackend::Nats(Arc::new(hub)))
        }
        kind => {
            if kind == HubKind::Nats {
                tracing::warn!("--memory: hub.kind = \"nats\" is ignored");
            }
            Ok(HubBackend::Embedded(Arc::new(open_hub(config, memory)?)))
        }
    }
}

/// Unix ns of the wall clock: the control plane is the IO side.
#[allow(clippy::disallowed_methods)]
fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Creates the development PKI under `<data_dir>/pki` when the config uses
/// the default certificate paths and it does not exist yet (SURFACE.md:
/// first start with the embedded defaults). Returns what was created.
pub fn prepare_dev_pki(config: &Config) -> Result<Option<PkiPaths>, ServeError> {
    if config.coap.tls.enabled && config.uses_default_pki() {
        Ok(pki::ensure_dev_pki(&config.hub.pki_dir())?)
    } else {
        Ok(None)
    }
}

/// The TLS files in force (defaults resolved against the data directory).
pub fn tls_files(config: &Config) -> TlsFiles {
    let tls = &config.coap.tls;
    TlsFiles {
        ca: tls.ca.clone(),
        cert: tls.cert.clone(),
        key: tls.key.clone(),
    }
}

/// A running gateway: the shards, the hub they report to, the token
/// authority and validator, and the control plane's tokio runtime (OAuth
/// exchanges with external providers, key refresh).
pub struct Gateway {
    pub runtime: Runtime<GatewayMessage>,
    /// The hub, whichever the back end.
    pub hub: Arc<dyn Hub>,
    /// The same hub as its concrete back end.
    pub backend: HubBackend,
    /// The embedded authority as the OAuth provider devices name, when
    /// `[authority] enabled`.
    pub provider: Option<Arc<EmbeddedProvider>>,
    pub validator: Arc<SharedValidator>,
    /// This process's random ID (spec §8.1 `service_id`).
    pub service_id: String,
    /// Keeps the key fetcher of `authorization.jwks_url` running.
    _key_refresh: Option<jwks_fetch::KeyRefresh>,
    control: tokio::runtime::Runtime,
}

impl Gateway {
    /// The embedded token authority, when `[authority] enabled`.
    pub fn authority(&self) -> Option<&Arc<Authority>> {
        self.provider.as_ref().map(|p| p.authority())
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.runtime.local_addr()
    }

    /// The control plane's tokio runtime.
    pub fn control_plane(&self) -> tokio::runtime::Handle {
        self.control.handle().clone()
    }

    /// Starts the drain (Release to every device).
    pub fn shutdown(&self) {
        self.runtime.shutdown();
    }

    /// Waits until the shards stopped, then stops the control plane and
    /// commits and closes the hub's store.
    pub fn join(self) {
        self.runtime.join();
        self.control.shutdown_timeout(Duration::from_secs(1));
        self.backend.close();
    }

    /// The embedded hub, when `[hub] kind = "embedded"`.
    pub fn embedded_hub(&self) -> Option<&Arc<MemoryHub>> {
        match &self.backend {
            HubBackend::Embedded(h) => Some(h),
            HubBackend::Nats(_) => None,
        }
    }
}

/// The embedded authority with the key from `[authority] key_file` (created
/// on first use), the configured lifetimes and the claims `[authorization]`
/// checks.
pub fn load_authority(config: &Config) -> Result<Authority, String> {
    let key_file = config.authority_key_file();
    if let Some(parent) = key_file.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    let key = SigningKey::load_or_create(&key_file).map_err(|e| e.to_string())?;
    let mut settings = AuthoritySettings::new(config.authority_issuer());
    settings.access_token_ttl = config.authority.access_token_ttl;
    settings.code_ttl = config.authority.code_ttl;
    settings.owner_claim = config.authorization.owner_claim.clone();
    settings.device_id_claim = Some(config.authorization.device_id_claim.clone());
    settings.audience = Some(config.authorization.audience.clone());
    Authority::new(key, settings).map_err(|e| e.to_string())
}

/// `[authorization]` as validation settings; `iss` defaults to the embedded
/// authority's when tokens are checked against its keys.
pub fn validation_settings(config: &Config) -> ValidationSettings {
    let auth = &config.authorization;
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    let issuer = non_empty(&auth.issuer).or_else(|| {
        (config.authority.enabled && auth.jwks_url.is_empty()).then(|| config.authority_issuer())
    });
    ValidationSettings {
        issuer,
        audience: non_empty(&auth.audience),
        owner_claim: auth.owner_claim.clone(),
        device_id_claim: non_empty(&auth.device_id_claim),
        mode: auth.mode,
    }
}

/// What every shard's sessions share, from `[coap]` and `[authorization]`
/// and the services the caller built (also used by the benchmark's
/// in-memory transport, which drives the same sessions without sockets).
pub fn session_config(
    config: &Config,
    hub: Arc<dyn Hub>,
    validator: Arc<SharedValidator>,
    providers: Vec<Arc<dyn TokenProvider>>,
    service_id: &str,
    discovery_endpoint: Arc<OnceLock<String>>,
) -> SessionConfig {
    let tls_on = config.coap.tls.enabled;
    SessionConfig {
        max_message_size: config.coap.max_message_size,
        keepalive_timeout: config.coap.keepalive_timeout,
        owner_cache_expiration: config.authorization.owner_cache_expiration,
        certificate_device_id: tls_on && config.coap.tls.client_auth == ClientAuth::Identity,
        protocol: if tls_on {
            Protocol::CoapsTcp
        } else {
            Protocol::CoapTcp
        },
        service_id: Arc::from(service_id),
        discovery_endpoint,
        hub,
        validator,
        providers,
        require_batch_observe: config.coap.require_batch_observe,
        close_linger: config.coap.close_linger,
        // spec §3.5: only where certificates are asked for and checked.
        disconnect_on_expired_certificate: tls_on
            && config.coap.tls.disconnect_on_expired_certificate
            && config.coap.tls.client_auth != ClientAuth::None,
        ca_not_after: (tls_on && config.coap.tls.client_auth != ClientAuth::None)
            .then(|| crate::auth::tls::load_certificates(&config.coap.tls.ca).ok())
            .flatten()
            // With several CAs in the file, which one a device chains to is
            // not known here: only its own chain's expiry counts then.
            .filter(|certs| certs.len() == 1)
            .and_then(|certs| crate::auth::identity::earliest_not_after(&certs)),
    }
}

/// Starts the shards; the gateway serves until [`Gateway::shutdown`].
pub fn start(config: &Config) -> Result<Gateway, ServeError> {
    start_with_shutdown(config, Arc::new(AtomicBool::new(false)))
}

/// As [`start`], with a shutdown flag the caller created earlier (e.g. one
/// that signal handlers set).
pub fn start_with_shutdown(
    config: &Config,
    shutdown: Arc<AtomicBool>,
) -> Result<Gateway, ServeError> {
    start_with_options(config, shutdown, StartOptions::default())
}

/// As [`start_with_shutdown`], with [`StartOptions`].
pub fn start_with_options(
    config: &Config,
    shutdown: Arc<AtomicBool>,
    options: StartOptions,
) -> Result<Gateway, ServeError> {
    prepare_dev_pki(config)?;
    // spec §8.1: this process's random ID; the NATS hub's node ID.
    let service_id = uuid::Uuid::new_v4().to_string();
    // The hub first: it loads what the last run left (and marks its
    // devices OFFLINE) before any device can connect.
    let backend = open_backend(config, options.memory, &service_id)?;
    let hub = backend.hub();
    let tls = if config.coap.tls.enabled {
        Some(tls::server_config_with_crls(
            &tls_files(config),
            &config.coap.tls.crl,
            config.coap.tls.client_auth,
        )?)
    } else {
        tracing::warn!(
            "TLS is disabled: serving plain coap+tcp without device authentication \
             (for tests and debugging only)"
        );
        None
    };
    let control = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("control-plane")
        .enable_all()
        .build()
        .map_err(|e| ServeError::Auth(format!("cannot start the control plane: {e}")))?;

    let authority = if config.authority.enabled {
        Some(Arc::new(load_authority(config).map_err(ServeError::Auth)?))
    } else {
        None
    };
    let jwks_url = &config.authorization.jwks_url;
    let keys = match (&authority, jwks_url.is_empty()) {
        (Some(authority), true) => authority.key_set(),
        (_, false) => match jwks_fetch::fetch_keys_blocking(jwks_url, jwks_fetch::FETCH_TIMEOUT) {
            Ok(keys) => keys,
            Err(e) => {
                // Devices get 5.03 (and retry) until the periodic fetch
                // succeeds: a key server down at start-up does not keep
                // the gateway, and its devices' sessions, down.
                tracing::warn!(url = %jwks_url, "cannot fetch the token keys yet: {e}");
                Jwks::default()
            }
        },
        (None, true) => Jwks::default(),
    };
    let validator = TokenValidator::new(keys, validation_settings(config))
        .map_err(|e| ServeError::Auth(e.to_string()))?;
    let validator = Arc::new(SharedValidator::new(validator));
    let key_refresh = if jwks_url.is_empty() {
        None
    } else {
        Some(
            jwks_fetch::spawn_key_refresh(
                jwks_url.clone(),
                config.authorization.jwks_refresh,
                validator.clone(),
                control.handle(),
            )
            .map_err(|e| ServeError::Auth(format!("authorization.jwks_url: {e}")))?,
        )
    };

    // Refresh grants and used codes live in the hub (issue 13): durable
    // with it, shared by the nodes of a NATS hub.
    let provider = authority.map(|a| {
        Arc::new(EmbeddedProvider::with_grants(
            config.authority.provider_name.clone(),
            a,
            hub.grants(),
            config.authority.grant_policy(),
        ))
    });
    let mut providers: Vec<Arc<dyn TokenProvider>> = Vec::new();
    if let Some(p) = &provider {
        providers.push(p.clone());
    }
    for p in &config.authorization.providers {
        let external = HttpProvider::new(p, control.handle().clone())
            .map_err(|e| ServeError::Auth(e.to_string()))?;
        providers.push(Arc::new(external));
    }

    // spec §7.4: pending commands whose valid_until passed are expired.
    let expiring = Arc::downgrade(&hub);
    control.spawn(async move {
        let mut tick = tokio::time::interval(EXPIRY_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(hub) = expiring.upgrade() else {
                return;
            };
            hub.expire_commands(wall_ns());
        }
    });
    // Expired refresh grants and used codes are dropped (issue 13).
    let pruning = Arc::downgrade(&hub);
    control.spawn(async move {
        let mut tick = tokio::time::interval(GRANT_PRUNE_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(hub) = pruning.upgrade() else {
                return;
            };
            let grants = hub.grants();
            drop(hub);
            // A scan of the store: off the control plane's async threads.
            let now = wall_ns() / 1_000_000_000;
            let _ = tokio::task::spawn_blocking(move || grants.prune(now)).await;
        }
    });
    let sender = SenderSlot::default();
    backend.set_connections(Arc::new(ShardConnections {
        sender: sender.clone(),
    }));
    let discovery_endpoint = Arc::new(OnceLock::new());

    let mut runtime = RuntimeConfig::new(config.coap.address, tls);
    runtime.shards = config.coap.shards;
    runtime.max_connections = config.coap.max_connections;
    runtime.handshake_timeout = config.coap.handshake_timeout;
    runtime.max_pending_tx = config.coap.max_outbound_bytes;
    runtime.write_stall_timeout = config.coap.write_stall_timeout;
    runtime.max_handshakes = config.coap.max_handshakes_per_shard;
    runtime.shutdown = shutdown;
    let tls_on = config.coap.tls.enabled;
    let session = session_config(
        config,
        hub.clone(),
        validator.clone(),
        providers,
        &service_id,
        discovery_endpoint.clone(),
    );
    let slot = sender.clone();
    let rt = Runtime::start(runtime, move |_shard| {
        GatewayService::new(session.clone(), slot.clone())
    })?;
    let _ = sender.set(rt.sender());
    let external = if config.coap.external_address.is_empty() {
        rt.local_addr().to_string()
    } else {
        config.coap.external_address.clone()
    };
    let _ = discovery_endpoint.set(ocf::res::gateway_endpoint(tls_on, &external));
    Ok(Gateway {
        runtime: rt,
        hub,
        backend,
        provider,
        validator,
        service_id,
        _key_refresh: key_refresh,
        control,
    })
}

/// Where `certs device` output goes by default for a data dir.
pub fn default_device_dir(config: &Config) -> PathBuf {
    config.hub.data_dir.join("devices")
}
