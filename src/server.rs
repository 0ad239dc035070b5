//! Starting the gateway from a [`Config`]: TLS set-up (creating the
//! development PKI on first start with the embedded defaults), the session
//! settings, and the shards runtime.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use shards::{Runtime, RuntimeConfig, StartError};

use crate::auth::pki::{self, PkiError, PkiPaths};
use crate::auth::tls::{self, TlsError, TlsFiles};
use crate::config::Config;
use crate::gateway::{GatewayMessage, GatewayService};
use crate::session::SessionConfig;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create the development PKI: {0}")]
    Pki(#[from] PkiError),
    #[error("TLS configuration: {0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Start(#[from] StartError),
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

/// Starts the shards; the gateway serves until `Runtime::shutdown`.
/// `Runtime::sender` reaches one device connection by its `ConnId`.
pub fn start(config: &Config) -> Result<Runtime<GatewayMessage>, ServeError> {
    start_with_shutdown(config, Arc::new(AtomicBool::new(false)))
}

/// As [`start`], with a shutdown flag the caller created earlier (e.g. one
/// that signal handlers set).
pub fn start_with_shutdown(
    config: &Config,
    shutdown: Arc<AtomicBool>,
) -> Result<Runtime<GatewayMessage>, ServeError> {
    prepare_dev_pki(config)?;
    let tls = if config.coap.tls.enabled {
        Some(tls::server_config(
            &tls_files(config),
            config.coap.tls.client_auth,
        )?)
    } else {
        tracing::warn!(
            "TLS is disabled: serving plain coap+tcp without device authentication \
             (for tests and debugging only)"
        );
        None
    };
    let mut runtime = RuntimeConfig::new(config.coap.address, tls);
    runtime.shards = config.coap.shards;
    runtime.max_connections = config.coap.max_connections;
    runtime.handshake_timeout = config.coap.handshake_timeout;
    runtime.shutdown = shutdown;
    let session = SessionConfig {
        max_message_size: config.coap.max_message_size,
        keepalive_timeout: config.coap.keepalive_timeout,
    };
    let rt = Runtime::start(runtime, move |_shard| GatewayService::new(session.clone()))?;
    Ok(rt)
}

/// Where `certs device` output goes by default for a data dir.
pub fn default_device_dir(config: &Config) -> PathBuf {
    config.hub.data_dir.join("devices")
}
