//! Typed gateway configuration: the keys this release honours, their
//! defaults, environment overrides and validation.
//!
//! Sources, later wins: built-in defaults, the TOML file (`--config`), then
//! `COAP_GATEWAY__SECTION__KEY` environment variables. The result is
//! validated once, so the rest of the gateway reads typed values
//! (`SocketAddr`, `Duration`) and never checks them again.
//!
//! What this module does not do: read `RUST_LOG` (the logging setup does and
//! lets it win over `log.level`), create the development PKI or check that the
//! certificate files exist (`serve` does, at start), or map errors to exit
//! codes (the CLI does: 2 for every [`ConfigError`]).
//!
//! Adding a section is a small change: a struct with
//! `#[serde(default, deny_unknown_fields)]`, a `Default`, a `validate`, one
//! field in [`Config`] (with `#[serde(default)]`), and its keys with comments
//! in `config/gateway.toml`. Environment overrides learn the new keys by
//! themselves: they are checked against the serialized defaults.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::{Table, Value};

use crate::auth::jwt::AuthorizationMode;
use crate::auth::ClientAuth;

/// Environment variables whose name starts with this override config keys:
/// `COAP_GATEWAY__COAP__TLS__CLIENT_AUTH=none` sets `coap.tls.client_auth`.
pub const ENV_PREFIX: &str = "COAP_GATEWAY__";

/// Separates the parts of a key's path in an environment variable name. A
/// double underscore, because single underscores occur inside key names.
const ENV_SEPARATOR: &str = "__";

/// `coap.max_message_size` must be greater than this (spec §10.2: "> 64"):
/// a smaller limit could not hold a sign-in request.
pub const MESSAGE_SIZE_FLOOR: usize = 64;

/// Upper bound for `coap.max_message_size`: 16 MiB. OCF resources are small
/// (the default is 256 KiB); the bound keeps a typo (an extra digit or three)
/// from letting one device make the gateway buffer gigabytes per connection.
pub const MESSAGE_SIZE_CEILING: usize = 16 * 1024 * 1024;

/// Upper bound for `coap.shards`. One shard is one thread; more than this is
/// a typo rather than a machine.
pub const MAX_SHARDS: usize = 1024;

/// Upper bound for `coap.close_linger`.
const MAX_CLOSE_LINGER: Duration = Duration::from_secs(30);

/// Lower bound for `coap.keepalive_timeout` (spec §2.4: "minimum 1 s").
pub const MIN_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(1);

/// Directory under `hub.data_dir` that holds the development PKI.
pub const PKI_DIR: &str = "pki";
/// File name of the CA certificate in the development PKI.
pub const PKI_CA_FILE: &str = "ca.pem";
/// File name of the gateway certificate in the development PKI.
pub const PKI_CERT_FILE: &str = "gateway.pem";
/// File name of the gateway's private key in the development PKI.
pub const PKI_KEY_FILE: &str = "gateway-key.pem";

/// Where the text being parsed came from when it is not a file.
const STRING_ORIGIN: &str = "<config text>";

/// The gateway's whole configuration.
///
/// Built by [`Config::load`] / [`Config::load_with_env`] /
/// [`Config::from_toml_str`], which fill in derived defaults and validate;
/// a value you get from them is ready to use.
///
/// Fields carry `#[serde(default)]` one by one rather than on the struct, so
/// that a missing section gets its section default (TLS paths still empty,
/// to be derived from the *loaded* `hub.data_dir`), not the resolved
/// [`Config::default`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[log]`
    #[serde(default)]
    pub log: LogConfig,
    /// `[coap]`, with `[coap.tls]`
    #[serde(default)]
    pub coap: CoapConfig,
    /// `[hub]`
    #[serde(default)]
    pub hub: HubConfig,
    /// `[api]`
    #[serde(default)]
    pub api: ApiConfig,
    /// `[authority]`
    #[serde(default)]
    pub authority: AuthorityConfig,
    /// `[authorization]`, with `[[authorization.providers]]`
    #[serde(default)]
    pub authorization: AuthorizationConfig,
}

/// `[log]`: what is logged and how (logs go to stderr).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A level (`trace`, `debug`, `info`, `warn`, `error`, `off`) or
    /// `tracing` filter directives (`"warn,coap_gateway::session=debug"`).
    /// `RUST_LOG` wins when set. Default `info`.
    pub level: String,
    /// Line format. Default `text`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

impl LogConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
        let level = self.level.trim();
        if level.is_empty() {
            return Err(invalid("log.level", "must not be empty (e.g. \"info\")"));
        }
        // A lone word is meant as a level; rejecting anything else catches
        // "inof". (The filter parser would take it as a target name and
        // quietly log nothing useful.)
        let is_single_word = !level.contains([',', '=', '[', ':']);
        if is_single_word && !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(invalid(
                "log.level",
                format!("unknown level `{level}`; expected one of {} or filter directives like \"warn,coap_gateway=debug\"", LEVELS.join(", ")),
            ));
        }
        tracing_subscriber::EnvFilter::try_new(level)
            .map(|_| ())
            .map_err(|e| invalid("log.level", format!("`{level}` is not a valid filter: {e}")))
    }
}

/// `log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Parses the same spellings as the config file, so `--log-format` on the
/// command line and `log.format` accept the same words.
impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "unknown log format `{other}`; expected `text` or `json`"
            )),
        }
    }
}

/// `[coap]`: the device listener (spec §2, §10.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoapConfig {
    /// Address the listener binds: an IP address and a port; host names are
    /// not resolved. Port 0 lets the OS choose (tests, `bench --spawn`).
    /// Default `0.0.0.0:5684`.
    pub address: SocketAddr,
    /// Listener shards (one thread each); 0 = one per core. See
    /// [`CoapConfig::shard_count`]. Default 0.
    pub shards: usize,
    /// Largest inbound frame, in bytes. A frame whose Len announces more is
    /// refused (Abort + close) before anything is allocated for it
    /// (spec §2.2). Must be in `MESSAGE_SIZE_FLOOR + 1 ..= MESSAGE_SIZE_CEILING`.
    /// Default 262144.
    pub max_message_size: usize,
    /// A device silent for half of this is pinged, and closed when still
    /// silent (spec §2.4). At least 1 s. Default 20 s.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Time a new connection has to finish the TLS handshake. Greater than
    /// zero. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Most concurrent device connections; 0 = unlimited (bounded by the
    /// OS). See [`CoapConfig::connection_limit`]. Default 0.
    pub max_connections: usize,
    /// `host:port` devices and clients reach this gateway at, used in the
    /// `eps` of cloud discovery (spec §5.9). Empty = the listener's address.
    pub external_address: String,
    /// Twin synchronisation needs a batch-observable `/oic/res` (spec §6.6,
    /// `requireBatchObserveEnabled`): a device without one is disconnected
    /// right after sign-in. When false, such a device is observed resource
    /// by resource. Default false (the reference defaults to true, which
    /// disconnects IoTivity-Lite built with its default options, spec §14
    /// item 14).
    pub require_batch_observe: bool,
    /// After an answer that ends the connection (4.01 before sign-in, a
    /// failed `/oic/sec/*` request, an Abort), how long the gateway waits
    /// for the device to close before it closes itself. A device that gets
    /// the answer and the close in one read drops the answer (spec
    /// Appendix A.7); inbound data is ignored meanwhile. 0 = close at once.
    /// At most 30 s. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub close_linger: Duration,
    /// Most bytes one connection may have waiting for its socket. At the
    /// bound the gateway stops reading from that device (TCP backpressure),
    /// so a peer that sends without reading what it is answered cannot grow
    /// the gateway's memory. At least 65536. Default 262144.
    pub max_outbound_bytes: usize,
    /// A connection held at `max_outbound_bytes` whose peer reads none of
    /// it for this long is closed. Greater than zero. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub write_stall_timeout: Duration,
    /// Most TLS handshakes in progress per shard; at the limit the shard
    /// stops accepting and new connections wait in the kernel's listen
    /// backlog until a handshake ends (a reconnect storm is admitted at
    /// the pace the CPU can do handshakes). 0 = no limit. Default 256.
    pub max_handshakes_per_shard: usize,
    /// `[coap.tls]`
    pub tls: TlsConfig,
}

impl Default for CoapConfig {
    fn default() -> Self {
        Self {
            address: SocketAddr::from(([0, 0, 0, 0], 5684)),
            shards: 0,
            max_message_size: 262_144,
            keepalive_timeout: Duration::from_secs(20),
            handshake_timeout: Duration::from_secs(10),
            max_connections: 0,
            external_address: String::new(),
            require_batch_observe: false,
            close_linger: Duration::from_secs(2),
            max_outbound_bytes: 262_144,
            write_stall_timeout: Duration::from_secs(30),
            max_handshakes_per_shard: 256,
            tls: TlsConfig::default(),
        }
    }
}

impl CoapConfig {
    /// The configured number of shards, or `None` for "one per core" (the
    /// runtime asks the OS how many cores there are).
    pub fn shard_count(&self) -> Option<NonZeroUsize> {
        NonZeroUsize::new(self.shards)
    }

    /// The connection limit, or `None` for unlimited.
    pub fn connection_limit(&self) -> Option<NonZeroUsize> {
        NonZeroUsize::new(self.max_connections)
    }

    /// How long a device may stay silent before the gateway pings it: half
    /// the keepalive timeout. Spec §2.4: `timeout / (maxRetries + 1)` with
    /// `maxRetries = 1` on TCP.
    pub fn keepalive_ping_after(&self) -> Duration {
        self.keepalive_timeout / 2
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.shards > MAX_SHARDS {
            return Err(invalid(
                "coap.shards",
                format!(
                    "{} is more than {MAX_SHARDS}; use 0 for one per core",
                    self.shards
                ),
            ));
        }
        if self.max_message_size <= MESSAGE_SIZE_FLOOR
            || self.max_message_size > MESSAGE_SIZE_CEILING
        {
            return Err(invalid(
                "coap.max_message_size",
                format!(
                    "{} bytes is out of range; it must be greater than {MESSAGE_SIZE_FLOOR} \
                     and at most {MESSAGE_SIZE_CEILING} (16 MiB)",
                    self.max_message_size
                ),
            ));
        }
        if self.keepalive_timeout < MIN_KEEPALIVE_TIMEOUT {
            return Err(invalid(
                "coap.keepalive_timeout",
                format!(
                    "{} is too short; it must be at least 1s",
                    humantime::format_duration(self.keepalive_timeout)
                ),
            ));
        }
        if self.handshake_timeout.is_zero() {
            return Err(invalid(
                "coap.handshake_timeout",
                "must be greater than 0 (e.g. \"10s\")",
            ));
        }
        if self.max_outbound_bytes < shards::MIN_PENDING_TX {
            return Err(invalid(
                "coap.max_outbound_bytes",
                format!(
                    "{} bytes is too small; it must be at least {} (a few TLS records)",
                    self.max_outbound_bytes,
                    shards::MIN_PENDING_TX
                ),
            ));
        }
        if self.write_stall_timeout.is_zero() {
            return Err(invalid(
                "coap.write_stall_timeout",
                "must be greater than 0 (e.g. \"30s\")",
            ));
        }
        if self.close_linger > MAX_CLOSE_LINGER {
            return Err(invalid(
                "coap.close_linger",
                format!(
                    "{} is too long; it must be at most 30s (a lingering connection \
                     holds its slot)",
                    humantime::format_duration(self.close_linger)
                ),
            ));
        }
        self.tls.validate()
    }
}

/// `[coap.tls]`: TLS on the device listener (spec §3).
///
/// The three paths default to the development PKI under `hub.data_dir`:
/// a path left out or empty becomes `<data_dir>/pki/<file>` when the config
/// is loaded, whatever `data_dir` ends up being (file or environment). An
/// explicit path is kept as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// TLS on the listener; `false` = plain CoAP over TCP (`coap+tcp`).
    /// Default `true` (spec §2.1).
    pub enabled: bool,
    /// Client certificate policy. Default `identity`.
    pub client_auth: ClientAuth,
    /// CA certificate(s) device certificates must chain to (PEM).
    /// Default `<data_dir>/pki/ca.pem`.
    pub ca: PathBuf,
    /// The gateway's certificate chain (PEM).
    /// Default `<data_dir>/pki/gateway.pem`.
    pub cert: PathBuf,
    /// The gateway's private key (PEM). Default `<data_dir>/pki/gateway-key.pem`.
    pub key: PathBuf,
    /// Certificate revocation lists (PEM `X509 CRL` blocks or one DER CRL
    /// per file), paths as written. Modes `identity` and `any` refuse a
    /// device whose certificate, or an intermediate of its chain, one of
    /// them revokes (spec §3.2 step 2, checklist item 11); a certificate
    /// whose issuer has no CRL here is allowed. The files are read at start
    /// (`serve` fails on a bad one, naming it). Default empty: no check.
    pub crl: Vec<PathBuf>,
    /// Close a connection (Release) when the device's certificate chain or
    /// the CA expires (spec §3.5, checklist item 12): a handshake with it
    /// would fail by then. Default `true` (the reference defaults to
    /// false and keeps such devices connected).
    pub disconnect_on_expired_certificate: bool,
}

/// The paths are empty here: "not configured, derive from `hub.data_dir`".
/// [`Config::default`] and the loaders fill them in.
impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            client_auth: ClientAuth::default(),
            ca: PathBuf::new(),
            cert: PathBuf::new(),
            key: PathBuf::new(),
            crl: Vec::new(),
            disconnect_on_expired_certificate: true,
        }
    }
}

impl TlsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        for (key, path) in [
            ("coap.tls.ca", &self.ca),
            ("coap.tls.cert", &self.cert),
            ("coap.tls.key", &self.key),
        ] {
            if path.as_os_str().is_empty() {
                return Err(invalid(
                    key,
                    "must name a file when coap.tls.enabled = true",
                ));
            }
        }
        if self.crl.iter().any(|path| path.as_os_str().is_empty()) {
            return Err(invalid(
                "coap.tls.crl",
                "an entry is empty; name a CRL file (PEM or DER) or leave the list empty",
            ));
        }
        Ok(())
    }
}

/// `hub.kind`: which hub back end the gateway runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HubKind {
    /// In process, kept in `<data_dir>/hub.redb`.
    #[default]
    Embedded,
    /// NATS JetStream, shared between gateway nodes (`[hub.nats]`).
    Nats,
}

/// `[hub]`: the back end devices are connected to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HubConfig {
    /// The back end. Default `embedded`; `nats` uses `[hub.nats]`.
    pub kind: HubKind,
    /// Where the embedded defaults keep their state: the embedded hub's
    /// store `<data_dir>/hub.redb`, the development PKI in
    /// `<data_dir>/pki`. Default `data`.
    pub data_dir: PathBuf,
    /// Events the embedded hub keeps in its log; older ones are pruned.
    /// At least 1. Default 100000.
    pub event_retention: u64,
    /// How long the embedded hub collects device-side changes before it
    /// commits them in one write (a crash loses at most this much of
    /// them; API changes are committed before the call returns). At most
    /// 1 s. Default 2 ms.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// How long a command waits for an offline device when the request
    /// names no deadline (spec §7.4). Greater than zero. Default 10 min.
    #[serde(with = "humantime_serde")]
    pub command_time_to_live: Duration,
    /// `[hub.nats]`: the broker of `kind = "nats"` (ignored otherwise).
    pub nats: NatsConfig,
}

/// `[hub.nats]`: how a node reaches NATS JetStream, which the nodes of one
/// deployment share (ARCHITECTURE.md "Scale-out").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// The servers, comma-separated (`nats://h1:4222,nats://h2:4222`; a
    /// `tls://` server is reached over TLS). Default `nats://127.0.0.1:4222`.
    pub url: String,
    /// A NATS `.creds` file (user JWT and nkey seed); empty for none.
    pub credentials_file: PathBuf,
    /// An auth token; empty for none. Not together with `credentials_file`.
    pub token: String,
    /// A CA certificate (PEM) the `tls://` servers are checked against;
    /// empty for the system's roots.
    pub tls_ca: PathBuf,
    /// Replicas of every JetStream stream and bucket (3 on a 3-node
    /// cluster). 1 to 5. Default 1.
    pub replicas: usize,
    /// Prefix of every subject, stream and bucket name, so that several
    /// deployments (or tests) share one server. Letters, digits, `_`, `-`.
    /// Default `coapgw`.
    pub prefix: String,
    /// Bound of every call to the broker; past it the call fails as
    /// unavailable (5.03, spec §5.0). Default 2 s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Node liveness (spec §8.4): a node that did not heartbeat for this
    /// long has its devices marked OFFLINE by the others. At least 1 s.
    /// Default 6 s.
    #[serde(with = "humantime_serde")]
    pub heartbeat_ttl: Duration,
    /// Device-side changes that may wait for the broker (during an outage)
    /// before the shards are held back. At least 1. Default 65536.
    pub buffer: usize,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".to_owned(),
            credentials_file: PathBuf::new(),
            token: String::new(),
            tls_ca: PathBuf::new(),
            replicas: 1,
            prefix: "coapgw".to_owned(),
            request_timeout: Duration::from_secs(2),
            heartbeat_ttl: Duration::from_secs(6),
            buffer: 65_536,
        }
    }
}

/// Most replicas JetStream supports for a stream.
const MAX_NATS_REPLICAS: usize = 5;
/// The longest `hub.nats.request_timeout`: a hub call holds a shard or an
/// API request that long at most.
const MAX_NATS_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// The shortest `hub.nats.heartbeat_ttl`.
const MIN_NATS_HEARTBEAT_TTL: Duration = Duration::from_secs(1);
/// The largest `hub.nats.buffer`: past it an outage holds gigabytes.
const MAX_NATS_BUFFER: usize = 16 * 1024 * 1024;

impl NatsConfig {
    /// The servers of `url`, trimmed, in order.
    pub fn servers(&self) -> Vec<String> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let servers = self.servers();
        if servers.is_empty() {
            return Err(invalid(
                "hub.nats.url",
                "must name at least one server (e.g. \"nats://127.0.0.1:4222\")",
            ));
        }
        for server in &servers {
            let rest = match server.split_once("://") {
                Some((scheme, rest)) => {
                    if !matches!(scheme, "nats" | "tls") {
                        return Err(invalid(
                            "hub.nats.url",
                            format!("{server:?}: the scheme must be nats:// or tls://"),
                        ));
                    }
                    rest
                }
                None => server.as_str(),
            };
            // `user:pass@host:port` is allowed; what counts is a host.
            let host_port = rest.rsplit('@').next().unwrap_or_default();
            if host_port.is_empty() || host_port.starts_with(':') || host_port.contains('/') {
                return Err(invalid(
                    "hub.nats.url",
                    format!("{server:?} is not a server address (e.g. nats://127.0.0.1:4222)"),
                ));
            }
        }
        if !self.credentials_file.as_os_str().is_empty() && !self.token.is_empty() {
            return Err(invalid(
                "hub.nats.token",
                "set either credentials_file or token, not both",
            ));
        }
        if !(1..=MAX_NATS_REPLICAS).contains(&self.replicas) {
            return Err(invalid(
                "hub.nats.replicas",
                format!("must be between 1 and {MAX_NATS_REPLICAS}"),
            ));
        }
        if self.prefix.is_empty()
            || !self
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(invalid(
                "hub.nats.prefix",
                "must be letters, digits, '_' or '-' (it names subjects, streams and buckets)",
            ));
        }
        if self.request_timeout.is_zero() || self.request_timeout > MAX_NATS_REQUEST_TIMEOUT {
            return Err(invalid(
                "hub.nats.request_timeout",
                format!(
                    "must be greater than zero and at most {}",
                    humantime::format_duration(MAX_NATS_REQUEST_TIMEOUT)
                ),
            ));
        }
        if self.heartbeat_ttl < MIN_NATS_HEARTBEAT_TTL {
            return Err(invalid(
                "hub.nats.heartbeat_ttl",
                format!(
                    "must be at least {}",
                    humantime::format_duration(MIN_NATS_HEARTBEAT_TTL)
                ),
            ));
        }
        if !(1..=MAX_NATS_BUFFER).contains(&self.buffer) {
            return Err(invalid(
                "hub.nats.buffer",
                format!("must be between 1 and {MAX_NATS_BUFFER}"),
            ));
        }
        Ok(())
    }
}

/// `[authority]`: the embedded token authority, which issues sign-up codes,
/// device access tokens and API tokens (`coap-gateway token ...`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthorityConfig {
    /// Whether the embedded authority runs (issues codes and tokens, is the
    /// provider `provider_name`). Default `true`.
    pub enabled: bool,
    /// The `authprovider` name devices send to sign up with it (spec §5.2).
    /// Default `plgd`, what IoTivity-Lite's examples send.
    pub provider_name: String,
    /// Lifetime of the access tokens it issues. Default `1h`.
    #[serde(with = "humantime_serde")]
    pub access_token_ttl: Duration,
    /// Lifetime of a sign-up code. Default `10m`.
    #[serde(with = "humantime_serde")]
    pub code_ttl: Duration,
    /// The ES256 signing key (PKCS#8 PEM), created on first use. Empty =
    /// `<hub.data_dir>/authority-key.pem`. Nodes that share devices share it.
    pub key_file: PathBuf,
    /// The `iss` of its tokens. Empty = `http://<api.address>`.
    pub issuer: String,
    /// How long a refresh token works after it was issued (each rotation
    /// issues a new one with a fresh lifetime). Default `30d`: a device
    /// that refreshes at every reconnect or token expiry (hourly with the
    /// default access token) never gets near it, while a device that is
    /// gone for a month must be provisioned again, and the store holds at
    /// most a month of abandoned grants.
    #[serde(with = "humantime_serde")]
    pub refresh_token_ttl: Duration,
    /// How long after a refresh the old refresh token still gets the same
    /// new pair again, while that pair's refresh token is unused (a device
    /// whose answer was lost retries with the old token). Default `60s`;
    /// `0s` disables it.
    #[serde(with = "humantime_serde")]
    pub refresh_reuse_window: Duration,
}

impl Default for AuthorityConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            provider_name: crate::auth::provider::DEFAULT_EMBEDDED_PROVIDER.to_owned(),
            access_token_ttl: Duration::from_secs(3600),
            code_ttl: Duration::from_secs(600),
            key_file: PathBuf::new(),
            issuer: String::new(),
            refresh_token_ttl: Duration::from_secs(30 * 24 * 3600),
            refresh_reuse_window: Duration::from_secs(60),
        }
    }
}

impl AuthorityConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.enabled && self.provider_name.trim().is_empty() {
            return Err(invalid(
                "authority.provider_name",
                "must not be empty (devices name it in `authprovider`, e.g. \"plgd\")",
            ));
        }
        if self.access_token_ttl < Duration::from_secs(1) {
            return Err(invalid(
                "authority.access_token_ttl",
                "must be at least 1s (e.g. \"1h\")",
            ));
        }
        if self.code_ttl < Duration::from_secs(1) {
            return Err(invalid(
                "authority.code_ttl",
                "must be at least 1s (e.g. \"10m\")",
            ));
        }
        if self.refresh_token_ttl < Duration::from_secs(1) {
            return Err(invalid(
                "authority.refresh_token_ttl",
                "must be at least 1s (e.g. \"30d\")",
            ));
        }
        if self.refresh_reuse_window >= self.refresh_token_ttl {
            return Err(invalid(
                "authority.refresh_reuse_window",
                "must be shorter than authority.refresh_token_ttl (e.g. \"60s\"; \"0s\" disables it)",
            ));
        }
        Ok(())
    }

    /// The grant policy of the embedded provider, in seconds.
    pub fn grant_policy(&self) -> crate::auth::grants::GrantPolicy {
        crate::auth::grants::GrantPolicy {
            ttl: self.refresh_token_ttl.as_secs().max(1),
            reuse_window: self.refresh_reuse_window.as_secs(),
        }
    }
}

/// `[authorization]`: how device access tokens are checked (spec §4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthorizationConfig {
    /// `device-id-claim` or `valid-token` (spec §4.4). Default
    /// `device-id-claim`.
    pub mode: AuthorizationMode,
    /// Claim holding the device ID. Default `https://plgd.dev/deviceId`.
    pub device_id_claim: String,
    /// Claim holding the owner. Default `sub`.
    pub owner_claim: String,
    /// The spec's `ownerCacheExpiration`: sign-in needs 2× this much token
    /// lifetime left, and the session ends 2× this before `exp` (§4.7).
    /// Default `1m`.
    #[serde(with = "humantime_serde")]
    pub owner_cache_expiration: Duration,
    /// Required `iss`; empty = the embedded authority's issuer (or any
    /// issuer whose key is in `jwks_url`'s set).
    pub issuer: String,
    /// Required `aud` member; empty = not checked.
    pub audience: String,
    /// Where the token issuer's keys are: a JWKS URL or an OpenID issuer
    /// (its `/.well-known/openid-configuration` names `jwks_uri`). Empty =
    /// the embedded authority's keys.
    pub jwks_url: String,
    /// How often the keys from `jwks_url` are fetched again. Default `5m`.
    #[serde(with = "humantime_serde")]
    pub jwks_refresh: Duration,
    /// External OAuth2 providers devices may name in `authprovider`.
    pub providers: Vec<OAuthProviderConfig>,
}

impl Default for AuthorizationConfig {
    fn default() -> Self {
        Self {
            mode: AuthorizationMode::DeviceIdClaim,
            device_id_claim: crate::auth::jwt::DEFAULT_DEVICE_ID_CLAIM.to_owned(),
            owner_claim: crate::auth::jwt::DEFAULT_OWNER_CLAIM.to_owned(),
            owner_cache_expiration: Duration::from_secs(60),
            issuer: String::new(),
            audience: String::new(),
            jwks_url: String::new(),
            jwks_refresh: Duration::from_secs(300),
            providers: Vec::new(),
        }
    }
}

impl AuthorizationConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.owner_claim.trim().is_empty() {
            return Err(invalid(
                "authorization.owner_claim",
                "must not be empty (e.g. \"sub\")",
            ));
        }
        if self.mode == AuthorizationMode::DeviceIdClaim && self.device_id_claim.trim().is_empty() {
            return Err(invalid(
                "authorization.device_id_claim",
                "must not be empty with mode = \"device-id-claim\" (or use mode = \"valid-token\")",
            ));
        }
        if self.owner_cache_expiration < Duration::from_secs(1) {
            return Err(invalid(
                "authorization.owner_cache_expiration",
                "must be at least 1s (e.g. \"1m\")",
            ));
        }
        if self.jwks_refresh < Duration::from_secs(1) {
            return Err(invalid(
                "authorization.jwks_refresh",
                "must be at least 1s (e.g. \"5m\")",
            ));
        }
        let is_http = |url: &str| url.starts_with("http://") || url.starts_with("https://");
        if !self.jwks_url.is_empty() && !is_http(&self.jwks_url) {
            return Err(invalid(
                "authorization.jwks_url",
                "must be an http:// or https:// URL",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for p in &self.providers {
            p.validate()?;
            if !names.insert(p.name.as_str()) {
                return Err(invalid(
                    "authorization.providers",
                    format!("provider name `{}` appears twice", p.name),
                ));
            }
        }
        Ok(())
    }
}

/// One `[[authorization.providers]]`: an external OAuth2 token endpoint
/// (spec §4.8, grant types `authorization_code` and `refresh_token`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OAuthProviderConfig {
    /// The `authprovider` value devices send.
    pub name: String,
    /// The token endpoint, e.g. `https://auth.example.com/oauth/token`.
    pub token_url: String,
    pub client_id: String,
    /// File holding the client secret (trailing newline ignored); empty =
    /// public client.
    pub client_secret_file: PathBuf,
    /// `redirect_uri` sent with the code, when the provider wants one.
    pub redirect_url: String,
    /// `scope` values sent with the code.
    pub scopes: Vec<String>,
    /// Bound on one token-endpoint call. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for OAuthProviderConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            token_url: String::new(),
            client_id: String::new(),
            client_secret_file: PathBuf::new(),
            redirect_url: String::new(),
            scopes: Vec::new(),
            timeout: Duration::from_secs(10),
        }
    }
}

impl OAuthProviderConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.name.trim().is_empty() {
            return Err(invalid("authorization.providers.name", "must not be empty"));
        }
        let is_http =
            self.token_url.starts_with("http://") || self.token_url.starts_with("https://");
        if !is_http {
            return Err(invalid(
                "authorization.providers.token_url",
                format!(
                    "provider `{}`: must be an http:// or https:// URL",
                    self.name
                ),
            ));
        }
        if self.timeout < Duration::from_millis(1) {
            return Err(invalid(
                "authorization.providers.timeout",
                "must be more than 0",
            ));
        }
        Ok(())
    }
}

/// `[api]`: the HTTP API of the control plane (health, readiness, metrics).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Address of the HTTP API; port 0 picks a free port (logged at start).
    /// Default `127.0.0.1:8080`: loopback, since it carries no TLS yet.
    pub address: SocketAddr,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            address: SocketAddr::from(([127, 0, 0, 1], 8080)),
        }
    }
}

/// The longest `hub.commit_interval`: past it, device-side changes wait too
/// long in memory.
const COMMIT_INTERVAL_CEILING: Duration = Duration::from_secs(1);

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            kind: HubKind::Embedded,
            data_dir: PathBuf::from("data"),
            event_retention: 100_000,
            commit_interval: Duration::from_millis(2),
            command_time_to_live: Duration::from_secs(600),
            nats: NatsConfig::default(),
        }
    }
}

impl HubConfig {
    /// `<data_dir>/pki`: where the development PKI lives.
    pub fn pki_dir(&self) -> PathBuf {
        self.data_dir.join(PKI_DIR)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.kind == HubKind::Nats {
            self.nats.validate()?;
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("hub.data_dir", "must not be empty (e.g. \"data\")"));
        }
        if self.event_retention == 0 {
            return Err(invalid("hub.event_retention", "must be at least 1"));
        }
        if self.commit_interval > COMMIT_INTERVAL_CEILING {
            return Err(invalid(
                "hub.commit_interval",
                format!(
                    "must be at most {}",
                    humantime::format_duration(COMMIT_INTERVAL_CEILING)
                ),
            ));
        }
        if self.command_time_to_live.is_zero() {
            return Err(invalid(
                "hub.command_time_to_live",
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

/// Why a configuration could not be loaded. Every variant names where the
/// problem is: the file, the environment variable or the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The text is not TOML, or does not fit the schema (unknown key, wrong
    /// type, bad duration or address). `message` is toml's, which names the
    /// line, the column and the key.
    #[error("{origin}: {message}")]
    Parse {
        /// The file's path, or `<config text>`.
        origin: String,
        /// What is wrong, and where.
        message: String,
    },
    /// A `COAP_GATEWAY__…` variable names no key, or its value does not fit.
    #[error("environment variable {var}: {message}")]
    Env {
        /// The variable's name.
        var: String,
        /// What is wrong.
        message: String,
    },
    /// A value has the right type but is out of range or inconsistent.
    #[error("invalid `{key}`: {message}")]
    Invalid {
        /// Dotted key, e.g. `coap.max_message_size`.
        key: String,
        /// What is wrong and what is accepted.
        message: String,
    },
    /// The configuration cannot be written as TOML (a path that is not
    /// UTF-8, which only a hand-built config can hold).
    #[error("cannot write the configuration as TOML: {message}")]
    Serialize {
        /// toml's message.
        message: String,
    },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        message: message.into(),
    }
}

fn parse_error(origin: &str, error: &toml::de::Error) -> ConfigError {
    ConfigError::Parse {
        origin: origin.to_owned(),
        // toml's messages end in a newline; the caller adds its own.
        message: error.to_string().trim_end().to_owned(),
    }
}

/// The documented defaults, with the TLS paths derived from the default
/// `hub.data_dir` (`data/pki/…`). Equal to what `config/gateway.toml` loads.
impl Default for Config {
    fn default() -> Self {
        let mut config = Self {
            log: LogConfig::default(),
            coap: CoapConfig::default(),
            hub: HubConfig::default(),
            api: ApiConfig::default(),
            authority: AuthorityConfig::default(),
            authorization: AuthorizationConfig::default(),
        };
        config.fill_derived_paths();
        config
    }
}

impl Config {
    /// Defaults, with `hub.data_dir` set to `data_dir` and the TLS paths
    /// derived from it. For tests and for `--data-dir` style options.
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        let mut config = Self {
            log: LogConfig::default(),
            coap: CoapConfig::default(),
            hub: HubConfig {
                data_dir: data_dir.into(),
                ..HubConfig::default()
            },
            api: ApiConfig::default(),
            authority: AuthorityConfig::default(),
            authorization: AuthorizationConfig::default(),
        };
        config.fill_derived_paths();
        config
    }

    /// Parses, fills in defaults and validates TOML text. No environment
    /// overrides.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        Self::build(text, STRING_ORIGIN, Vec::new())
    }

    /// Loads the file at `path` (`None` = defaults only), applies the
    /// process environment's `COAP_GATEWAY__…` overrides and validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(path, process_overrides()?)
    }

    /// [`Config::load`] with the environment given as name/value pairs, so
    /// tests need not touch the process environment. Pairs whose name does
    /// not start with [`ENV_PREFIX`] are ignored.
    pub fn load_with_env<I>(path: Option<&Path>, env: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let overrides: Vec<(String, String)> = env
            .into_iter()
            .filter(|(name, _)| name.starts_with(ENV_PREFIX))
            .collect();
        match path {
            None => Self::build("", "<defaults>", overrides),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
                    path: path.to_owned(),
                    source,
                })?;
                Self::build(&text, &path.display().to_string(), overrides)
            }
        }
    }

    /// Checks ranges and consistency. The loaders call it; call it again
    /// after changing a `Config` by hand.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.log.validate()?;
        self.coap.validate()?;
        self.hub.validate()?;
        self.authority.validate()?;
        self.authorization.validate()?;
        if !self.authority.enabled && self.authorization.providers.is_empty() {
            return Err(invalid(
                "authorization.providers",
                "with authority.enabled = false, configure at least one [[authorization.providers]] so devices can sign up",
            ));
        }
        if !self.authority.enabled && self.authorization.jwks_url.is_empty() {
            return Err(invalid(
                "authorization.jwks_url",
                "with authority.enabled = false, set the key set (or OpenID discovery) URL of the token issuer",
            ));
        }
        let embedded = self
            .authority
            .enabled
            .then_some(self.authority.provider_name.as_str());
        if let Some(dup) = self
            .authorization
            .providers
            .iter()
            .map(|p| p.name.as_str())
            .find(|name| Some(*name) == embedded)
        {
            return Err(invalid(
                "authorization.providers",
                format!("provider name `{dup}` is already the embedded authority's (authority.provider_name)"),
            ));
        }
        Ok(())
    }

    /// The authority's signing key file in force (`authority.key_file`, or
    /// `<hub.data_dir>/authority-key.pem` when empty).
    pub fn authority_key_file(&self) -> PathBuf {
        if self.authority.key_file.as_os_str().is_empty() {
            self.hub.data_dir.join("authority-key.pem")
        } else {
            self.authority.key_file.clone()
        }
    }

    /// The authority's issuer in force (`authority.issuer`, or
    /// `http://<api.address>` when empty).
    pub fn authority_issuer(&self) -> String {
        if self.authority.issuer.is_empty() {
            format!("http://{}", self.api.address)
        } else {
            self.authority.issuer.clone()
        }
    }

    /// Whether the TLS files are the development PKI's:
    /// `<data_dir>/pki/{ca.pem, gateway.pem, gateway-key.pem}`, compared
    /// path by path as written (no file system access). Only then may
    /// `serve` create the development PKI on first start: files the operator
    /// named are never generated over.
    pub fn uses_default_pki(&self) -> bool {
        let pki = self.hub.pki_dir();
        let tls = &self.coap.tls;
        tls.ca == pki.join(PKI_CA_FILE)
            && tls.cert == pki.join(PKI_CERT_FILE)
            && tls.key == pki.join(PKI_KEY_FILE)
    }

    /// The effective configuration as TOML, every key written out (derived
    /// paths included). Parsing it gives back an equal `Config`.
    pub fn to_toml_string(&self) -> Result<String, ConfigError> {
        toml::to_string_pretty(self).map_err(|e| ConfigError::Serialize {
            message: e.to_string(),
        })
    }

    /// Turns empty TLS paths into `<data_dir>/pki/<file>`; explicit paths
    /// are kept. Runs after all sources are merged, so the paths follow
    /// whichever `data_dir` won.
    fn fill_derived_paths(&mut self) {
        let pki = self.hub.pki_dir();
        let tls = &mut self.coap.tls;
        for (path, file) in [
            (&mut tls.ca, PKI_CA_FILE),
            (&mut tls.cert, PKI_CERT_FILE),
            (&mut tls.key, PKI_KEY_FILE),
        ] {
            if path.as_os_str().is_empty() {
                *path = pki.join(file);
            }
        }
    }

    fn build(
        text: &str,
        origin: &str,
        overrides: Vec<(String, String)>,
    ) -> Result<Self, ConfigError> {
        // Deserialize the text itself first, even when overrides follow:
        // only then do toml's errors carry line, column and the key's name.
        let from_text: Config = toml::from_str(text).map_err(|e| parse_error(origin, &e))?;
        let mut config = if overrides.is_empty() {
            from_text
        } else {
            let table: Table = text.parse().map_err(|e| parse_error(origin, &e))?;
            apply_overrides(table, overrides)?
        };
        config.fill_derived_paths();
        config.validate()?;
        Ok(config)
    }
}

/// One `COAP_GATEWAY__…` variable, resolved against the schema.
struct Override {
    var: String,
    path: Vec<String>,
    value: Value,
}

/// The prefixed variables of the process environment. Other variables are
/// not ours and may hold anything; ours must be UTF-8.
fn process_overrides() -> Result<Vec<(String, String)>, ConfigError> {
    let mut vars = Vec::new();
    for (name, value) in std::env::vars_os() {
        if !name.as_encoded_bytes().starts_with(ENV_PREFIX.as_bytes()) {
            continue;
        }
        let name = name.into_string().map_err(|name| ConfigError::Env {
            var: name.to_string_lossy().into_owned(),
            message: "the name is not valid UTF-8".to_owned(),
        })?;
        let value = value.into_string().map_err(|_| ConfigError::Env {
            var: name.clone(),
            message: "the value is not valid UTF-8".to_owned(),
        })?;
        vars.push((name, value));
    }
    Ok(vars)
}

/// Merges the overrides into the file's table and deserializes the result.
fn apply_overrides(file: Table, vars: Vec<(String, String)>) -> Result<Config, ConfigError> {
    // Every key the schema knows, with its default value: the serialized
    // defaults. Built from `Config` itself, so new sections need no list.
    let schema = Table::try_from(Config::default()).map_err(|e| ConfigError::Serialize {
        message: e.to_string(),
    })?;
    let mut overrides = vars
        .into_iter()
        .map(|(var, raw)| resolve_override(&schema, var, &raw))
        .collect::<Result<Vec<_>, _>>()?;
    // The environment has no order; sorting makes the result and the error
    // reported first the same on every run.
    overrides.sort_by(|a, b| a.var.cmp(&b.var));

    let mut merged = file.clone();
    for o in &overrides {
        insert(&mut merged, o)?;
    }
    match merged.try_into::<Config>() {
        Ok(config) => Ok(config),
        Err(all) => {
            // A table has no line numbers, so name the variable instead:
            // find the override that fails on its own.
            for o in &overrides {
                let mut single = file.clone();
                insert(&mut single, o)?;
                if let Err(e) = single.try_into::<Config>() {
                    return Err(ConfigError::Env {
                        var: o.var.clone(),
                        message: one_line(&e),
                    });
                }
            }
            Err(ConfigError::Env {
                var: overrides
                    .iter()
                    .map(|o| o.var.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                message: one_line(&all),
            })
        }
    }
}

/// toml's message for a table (no line numbers; it ends with "in `key`"
/// on a line of its own) on one line, to follow the variable's name.
fn one_line(error: &toml::de::Error) -> String {
    error.to_string().trim_end().replace('\n', " ")
}

/// Checks the variable names a key of the schema and converts its value.
fn resolve_override(schema: &Table, var: String, raw: &str) -> Result<Override, ConfigError> {
    let env_error = |message: String| ConfigError::Env {
        var: var.clone(),
        message,
    };
    let path: Vec<String> = var[ENV_PREFIX.len()..]
        .split(ENV_SEPARATOR)
        .map(str::to_ascii_lowercase)
        .collect();
    if path.iter().any(String::is_empty) {
        return Err(env_error(format!(
            "expected {ENV_PREFIX}SECTION__KEY, e.g. {ENV_PREFIX}COAP__KEEPALIVE_TIMEOUT"
        )));
    }

    let mut section = schema;
    let mut default = None;
    for (depth, part) in path.iter().enumerate() {
        let dotted = path[..=depth].join(".");
        let is_last = depth + 1 == path.len();
        match section.get(part) {
            None => {
                let known = section
                    .keys()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ");
                let place = if depth == 0 {
                    "the configuration".to_owned()
                } else {
                    format!("[{}]", path[..depth].join("."))
                };
                return Err(env_error(format!(
                    "unknown key `{dotted}`; {place} has: {known}"
                )));
            }
            Some(Value::Table(inner)) if !is_last => section = inner,
            Some(Value::Table(inner)) => {
                let known = inner
                    .keys()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(env_error(format!(
                    "`{dotted}` is a section, not a key; name one of its keys: {known}"
                )));
            }
            Some(value) if is_last => default = Some(value),
            Some(_) => {
                return Err(env_error(format!("`{dotted}` is a key, not a section")));
            }
        }
    }

    let value = match default {
        // Text keys take the value verbatim: `data_dir=2024` is a directory
        // name, not a number, and no quotes are needed.
        Some(Value::String(_)) => Value::String(raw.to_owned()),
        // Other keys take it as a TOML value (numbers, booleans); what does
        // not parse stays text, and deserialization reports the type clash.
        _ => raw
            .parse::<Value>()
            .unwrap_or_else(|_| Value::String(raw.to_owned())),
    };
    Ok(Override { var, path, value })
}

/// Sets `o.path` in `table`, creating sections the file left out.
fn insert(table: &mut Table, o: &Override) -> Result<(), ConfigError> {
    let Some((key, sections)) = o.path.split_last() else {
        // resolve_override never yields an empty path; refuse rather than panic.
        return Err(ConfigError::Env {
            var: o.var.clone(),
            message: "names no key".to_owned(),
        });
    };
    let mut current = table;
    for (depth, part) in sections.iter().enumerate() {
        let entry = current
            .entry(part.clone())
            .or_insert_with(|| Value::Table(Table::new()));
        current = match entry {
            Value::Table(inner) => inner,
            // The file passed typed deserialization, so a section is a
            // table there; kept as an error for safety, not reachable.
            _ => {
                return Err(ConfigError::Env {
                    var: o.var.clone(),
                    message: format!(
                        "the config file sets `{}` to a value, but it is a section",
                        sections[..=depth].join(".")
                    ),
                })
            }
        };
    }
    current.insert(key.clone(), o.value.clone());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn load_text_with_env(text: &str, pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().map_err(|source| ConfigError::Io {
            path: PathBuf::from("<tempdir>"),
            source,
        })?;
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, text).map_err(|source| ConfigError::Io {
            path: path.clone(),
            source,
        })?;
        Config::load_with_env(Some(&path), env(pairs))
    }

    fn invalid_key(result: Result<Config, ConfigError>) -> String {
        match result {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an Invalid error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_the_documented_table() {
        let c = Config::default();
        assert_eq!(c.log.level, "info");
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(
            c.coap.address,
            "0.0.0.0:5684".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(c.coap.shards, 0);
        assert_eq!(c.coap.shard_count(), None);
        assert_eq!(c.coap.max_message_size, 262_144);
        assert_eq!(c.coap.keepalive_timeout, Duration::from_secs(20));
        assert_eq!(c.coap.keepalive_ping_after(), Duration::from_secs(10));
        assert_eq!(c.coap.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.coap.max_connections, 0);
        assert_eq!(c.coap.connection_limit(), None);
        assert!(!c.coap.require_batch_observe);
        assert!(c.coap.tls.enabled);
        assert_eq!(c.coap.tls.client_auth, ClientAuth::Identity);
        assert_eq!(c.coap.tls.ca, Path::new("data/pki/ca.pem"));
        assert_eq!(c.coap.tls.cert, Path::new("data/pki/gateway.pem"));
        assert_eq!(c.coap.tls.key, Path::new("data/pki/gateway-key.pem"));
        assert_eq!(c.hub.data_dir, Path::new("data"));
        assert!(c.uses_default_pki());
        c.validate().unwrap();
    }

    #[test]
    fn refresh_token_keys_have_defaults_and_are_checked() {
        let c = Config::default();
        assert_eq!(
            c.authority.refresh_token_ttl,
            Duration::from_secs(30 * 24 * 3600)
        );
        assert_eq!(c.authority.refresh_reuse_window, Duration::from_secs(60));
        assert_eq!(c.authority.grant_policy().reuse_window, 60);
        let c = Config::from_toml_str(
            "[authority]\nrefresh_token_ttl = \"2h\"\nrefresh_reuse_window = \"0s\"\n",
        )
        .unwrap();
        assert_eq!(c.authority.grant_policy().ttl, 7200);
        assert_eq!(c.authority.grant_policy().reuse_window, 0);
        c.validate().unwrap();
        assert_eq!(
            invalid_key(Config::from_toml_str(
                "[authority]\nrefresh_token_ttl = \"0s\"\n"
            )),
            "authority.refresh_token_ttl"
        );
        assert_eq!(
            invalid_key(Config::from_toml_str(
                "[authority]\nrefresh_token_ttl = \"1m\"\nrefresh_reuse_window = \"1m\"\n",
            )),
            "authority.refresh_reuse_window"
        );
    }

    #[test]
    fn empty_text_and_no_file_give_defaults() {
        assert_eq!(Config::from_toml_str("").unwrap(), Config::default());
        assert_eq!(
            Config::load_with_env(None, Vec::new()).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn shipped_gateway_toml_equals_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.toml");
        let loaded = Config::load_with_env(Some(&path), Vec::new()).unwrap();
        assert_eq!(loaded, Config::default());
    }

    #[test]
    fn file_values_override_defaults_and_the_rest_stay() {
        let c = Config::from_toml_str(
            r#"
            [log]
            format = "json"

            [coap]
            address = "127.0.0.1:15684"
            shards = 4
            max_message_size = 65536
            keepalive_timeout = "1m"
            handshake_timeout = "500ms"
            max_connections = 10000
            require_batch_observe = true

            [coap.tls]
            client_auth = "any"
            "#,
        )
        .unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.log.level, "info");
        assert_eq!(
            c.coap.address,
            "127.0.0.1:15684".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(c.coap.shard_count(), NonZeroUsize::new(4));
        assert!(c.coap.require_batch_observe);
        assert_eq!(c.coap.max_message_size, 65536);
        assert_eq!(c.coap.keepalive_timeout, Duration::from_secs(60));
        assert_eq!(c.coap.handshake_timeout, Duration::from_millis(500));
        assert_eq!(c.coap.connection_limit(), NonZeroUsize::new(10000));
        assert_eq!(c.coap.tls.client_auth, ClientAuth::Any);
        assert!(c.coap.tls.enabled);
        assert!(c.uses_default_pki());
    }

    #[test]
    fn env_overrides_numbers_strings_durations_and_nested_tls() {
        let c = load_text_with_env(
            "[coap]\nshards = 2\n",
            &[
                ("COAP_GATEWAY__COAP__SHARDS", "8"),
                ("COAP_GATEWAY__COAP__MAX_CONNECTIONS", "500"),
                ("COAP_GATEWAY__COAP__KEEPALIVE_TIMEOUT", "5s"),
                ("COAP_GATEWAY__COAP__ADDRESS", "[::1]:5684"),
                ("COAP_GATEWAY__COAP__TLS__CLIENT_AUTH", "none"),
                ("COAP_GATEWAY__COAP__TLS__ENABLED", "false"),
                ("COAP_GATEWAY__LOG__LEVEL", "debug"),
                ("COAP_GATEWAY__LOG__FORMAT", "json"),
                ("PATH", "/usr/bin"),
                ("COAP_GATEWAY_CONFIG", "ignored: single underscore"),
            ],
        )
        .unwrap();
        assert_eq!(c.coap.shards, 8, "the environment wins over the file");
        assert_eq!(c.coap.max_connections, 500);
        assert_eq!(c.coap.keepalive_timeout, Duration::from_secs(5));
        assert_eq!(c.coap.address, "[::1]:5684".parse::<SocketAddr>().unwrap());
        assert_eq!(c.coap.tls.client_auth, ClientAuth::None);
        assert!(!c.coap.tls.enabled);
        assert_eq!(c.log.level, "debug");
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn env_overrides_apply_without_a_file() {
        let c = Config::load_with_env(
            None,
            env(&[("COAP_GATEWAY__COAP__MAX_MESSAGE_SIZE", "1152")]),
        )
        .unwrap();
        assert_eq!(c.coap.max_message_size, 1152);
        assert_eq!(c.coap.tls, Config::default().coap.tls);
    }

    #[test]
    fn env_text_keys_take_the_value_verbatim() {
        let c =
            Config::load_with_env(None, env(&[("COAP_GATEWAY__HUB__DATA_DIR", "2024")])).unwrap();
        assert_eq!(c.hub.data_dir, Path::new("2024"));
        assert_eq!(c.coap.tls.ca, Path::new("2024/pki/ca.pem"));
    }

    #[test]
    fn unknown_key_in_file_is_named_with_the_file() {
        let err = load_text_with_env("[coap]\nadress = \"0.0.0.0:1\"\n", &[]).unwrap_err();
        let ConfigError::Parse { origin, message } = &err else {
            panic!("expected a Parse error, got {err:?}");
        };
        assert!(origin.ends_with("gateway.toml"), "{origin}");
        assert!(message.contains("adress"), "{message}");
        assert!(message.contains("line 2"), "{message}");
        assert!(err.to_string().contains("gateway.toml"), "{err}");
    }

    #[test]
    fn unknown_section_and_nested_key_are_errors() {
        let err = Config::from_toml_str("[coapp]\nshards = 1\n").unwrap_err();
        assert!(
            matches!(&err, ConfigError::Parse { message, .. } if message.contains("coapp")),
            "{err}"
        );
        let err = Config::from_toml_str("[coap.tls]\nclient_auht = \"any\"\n").unwrap_err();
        assert!(
            matches!(&err, ConfigError::Parse { message, .. } if message.contains("client_auht")),
            "{err}"
        );
    }

    #[test]
    fn syntax_error_names_the_line() {
        let err = Config::from_toml_str("[log]\nlevel = \n").unwrap_err();
        assert!(
            matches!(&err, ConfigError::Parse { message, .. } if message.contains("line 2")),
            "{err}"
        );
    }

    #[test]
    fn unknown_env_key_is_an_error_naming_the_variable() {
        for (var, needle) in [
            ("COAP_GATEWAY__COAP__KEEPALIVE", "coap.keepalive"),
            ("COAP_GATEWAY__COAPP__SHARDS", "coapp"),
            ("COAP_GATEWAY__COAP__TLS__CA_FILE", "coap.tls.ca_file"),
            ("COAP_GATEWAY__COAP__TLS", "section"),
            ("COAP_GATEWAY__COAP__SHARDS__X", "not a section"),
            ("COAP_GATEWAY__", "SECTION__KEY"),
            ("COAP_GATEWAY__COAP____SHARDS", "SECTION__KEY"),
        ] {
            let err = Config::load_with_env(None, env(&[(var, "1")])).unwrap_err();
            let ConfigError::Env {
                var: named,
                message,
            } = &err
            else {
                panic!("{var}: expected an Env error, got {err:?}");
            };
            assert_eq!(named, var);
            assert!(message.contains(needle), "{var}: {message}");
        }
    }

    #[test]
    fn env_value_of_the_wrong_type_names_the_variable() {
        let err = Config::load_with_env(
            None,
            env(&[
                ("COAP_GATEWAY__LOG__LEVEL", "warn"),
                ("COAP_GATEWAY__COAP__SHARDS", "many"),
            ]),
        )
        .unwrap_err();
        let ConfigError::Env { var, message } = &err else {
            panic!("expected an Env error, got {err:?}");
        };
        assert_eq!(var, "COAP_GATEWAY__COAP__SHARDS");
        assert!(message.contains("coap.shards"), "{message}");

        let err = Config::load_with_env(
            None,
            env(&[("COAP_GATEWAY__COAP__HANDSHAKE_TIMEOUT", "10")]),
        )
        .unwrap_err();
        assert!(
            matches!(&err, ConfigError::Env { var, .. } if var == "COAP_GATEWAY__COAP__HANDSHAKE_TIMEOUT"),
            "{err}"
        );
    }

    #[test]
    fn env_values_are_validated_too() {
        let result = Config::load_with_env(
            None,
            env(&[("COAP_GATEWAY__COAP__KEEPALIVE_TIMEOUT", "0s")]),
        );
        assert_eq!(invalid_key(result), "coap.keepalive_timeout");
    }

    #[test]
    fn bad_duration_is_a_parse_error() {
        for text in [
            "[coap]\nkeepalive_timeout = \"20\"\n",
            "[coap]\nkeepalive_timeout = \"soon\"\n",
            "[coap]\nhandshake_timeout = 10\n",
        ] {
            let err = Config::from_toml_str(text).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Parse { message, .. } if message.contains("timeout")),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn bad_address_is_a_parse_error() {
        for address in ["localhost:5684", "0.0.0.0", "0.0.0.0:99999", ""] {
            let text = format!("[coap]\naddress = \"{address}\"\n");
            let err = Config::from_toml_str(&text).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Parse { message, .. } if message.contains("address")),
                "{address}: {err}"
            );
        }
    }

    #[test]
    fn max_message_size_range() {
        let size = |n: usize| Config::from_toml_str(&format!("[coap]\nmax_message_size = {n}\n"));
        assert_eq!(invalid_key(size(10)), "coap.max_message_size");
        assert_eq!(invalid_key(size(64)), "coap.max_message_size");
        assert_eq!(
            invalid_key(size(MESSAGE_SIZE_CEILING + 1)),
            "coap.max_message_size"
        );
        size(65).unwrap();
        size(MESSAGE_SIZE_CEILING).unwrap();
        let err = size(10).unwrap_err().to_string();
        assert!(
            err.contains("coap.max_message_size") && err.contains("64"),
            "{err}"
        );
    }

    #[test]
    fn negative_numbers_are_refused() {
        let err = Config::from_toml_str("[coap]\nmax_connections = -1\n").unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    }

    #[test]
    fn keepalive_must_be_at_least_one_second() {
        let keepalive =
            |d: &str| Config::from_toml_str(&format!("[coap]\nkeepalive_timeout = \"{d}\"\n"));
        assert_eq!(invalid_key(keepalive("0s")), "coap.keepalive_timeout");
        assert_eq!(invalid_key(keepalive("999ms")), "coap.keepalive_timeout");
        assert_eq!(
            keepalive("1s").unwrap().coap.keepalive_timeout,
            Duration::from_secs(1)
        );
    }

    #[test]
    fn handshake_timeout_must_be_positive() {
        let result = Config::from_toml_str("[coap]\nhandshake_timeout = \"0s\"\n");
        assert_eq!(invalid_key(result), "coap.handshake_timeout");
    }

    #[test]
    fn shards_are_bounded() {
        let result = Config::from_toml_str("[coap]\nshards = 100000\n");
        assert_eq!(invalid_key(result), "coap.shards");
    }

    #[test]
    fn log_level_typos_are_caught_and_directives_accepted() {
        let level = |l: &str| Config::from_toml_str(&format!("[log]\nlevel = \"{l}\"\n"));
        assert_eq!(invalid_key(level("inof")), "log.level");
        assert_eq!(invalid_key(level("")), "log.level");
        level("WARN").unwrap();
        level("warn,coap_gateway::session=debug").unwrap();
        let err = Config::from_toml_str("[log]\nformat = \"yaml\"\n").unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }));
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert!("yaml".parse::<LogFormat>().is_err());
    }

    #[test]
    fn data_dir_moves_the_default_pki_paths() {
        let c = Config::from_toml_str("[hub]\ndata_dir = \"/var/lib/coap-gateway\"\n").unwrap();
        assert_eq!(c.coap.tls.ca, Path::new("/var/lib/coap-gateway/pki/ca.pem"));
        assert_eq!(
            c.coap.tls.cert,
            Path::new("/var/lib/coap-gateway/pki/gateway.pem")
        );
        assert_eq!(
            c.coap.tls.key,
            Path::new("/var/lib/coap-gateway/pki/gateway-key.pem")
        );
        assert!(c.uses_default_pki());
        assert_eq!(c, Config::with_data_dir("/var/lib/coap-gateway"));

        // Empty means "derived" as well (the shipped file writes them so).
        let c =
            Config::from_toml_str("[coap.tls]\nca = \"\"\n[hub]\ndata_dir = \"state\"\n").unwrap();
        assert_eq!(c.coap.tls.ca, Path::new("state/pki/ca.pem"));

        // The environment's data_dir moves the paths the file left out.
        let c = load_text_with_env(
            "[coap]\nshards = 1\n",
            &[("COAP_GATEWAY__HUB__DATA_DIR", "/srv/gw")],
        )
        .unwrap();
        assert_eq!(c.coap.tls.key, Path::new("/srv/gw/pki/gateway-key.pem"));
        assert!(c.uses_default_pki());
    }

    #[test]
    fn explicit_pki_paths_are_kept() {
        let c = Config::from_toml_str(
            "[coap.tls]\nca = \"/etc/gw/ca.pem\"\n[hub]\ndata_dir = \"/srv/gw\"\n",
        )
        .unwrap();
        assert_eq!(c.coap.tls.ca, Path::new("/etc/gw/ca.pem"));
        assert_eq!(c.coap.tls.cert, Path::new("/srv/gw/pki/gateway.pem"));
        assert!(!c.uses_default_pki());

        // Written-out default paths stay put when data_dir changes later.
        let c = Config::from_toml_str(
            "[coap.tls]\nca = \"data/pki/ca.pem\"\n[hub]\ndata_dir = \"other\"\n",
        )
        .unwrap();
        assert_eq!(c.coap.tls.ca, Path::new("data/pki/ca.pem"));
        assert!(!c.uses_default_pki());
    }

    #[test]
    fn tls_paths_are_required_only_with_tls() {
        let mut c = Config::default();
        c.coap.tls.cert = PathBuf::new();
        let err = c.validate().unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { key, .. } if key == "coap.tls.cert"),
            "{err}"
        );
        c.coap.tls.enabled = false;
        c.validate().unwrap();
    }

    #[test]
    fn crl_files_are_a_list_kept_as_written() {
        assert!(Config::default().coap.tls.crl.is_empty());
        let c = Config::from_toml_str(
            "[coap.tls]\ncrl = [\"/etc/gw/ca.crl\", \"crl/intermediate.der\"]\n",
        )
        .unwrap();
        assert_eq!(
            c.coap.tls.crl,
            [
                PathBuf::from("/etc/gw/ca.crl"),
                PathBuf::from("crl/intermediate.der")
            ]
        );
        let err = Config::from_toml_str("[coap.tls]\ncrl = [\"\"]\n").unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { key, .. } if key == "coap.tls.crl"),
            "{err}"
        );
        let err = Config::from_toml_str("[coap.tls]\ncrl = \"ca.crl\"\n").unwrap_err();
        assert!(matches!(&err, ConfigError::Parse { .. }), "{err}");
    }

    #[test]
    fn empty_data_dir_is_invalid() {
        let result = Config::from_toml_str("[hub]\ndata_dir = \"\"\n");
        assert_eq!(invalid_key(result), "hub.data_dir");
    }

    #[test]
    fn hub_keys_parse_and_are_checked() {
        let c = Config::from_toml_str(
            "[hub]\nkind = \"embedded\"\nevent_retention = 5\ncommit_interval = \"10ms\"\ncommand_time_to_live = \"1h\"\n",
        )
        .unwrap();
        assert_eq!(c.hub.kind, HubKind::Embedded);
        assert_eq!(c.hub.event_retention, 5);
        assert_eq!(c.hub.commit_interval, Duration::from_millis(10));
        assert_eq!(c.hub.command_time_to_live, Duration::from_secs(3600));
        let d = Config::default();
        assert_eq!(d.hub.event_retention, 100_000);
        assert_eq!(d.hub.commit_interval, Duration::from_millis(2));
        assert_eq!(d.hub.command_time_to_live, Duration::from_secs(600));
        assert_eq!(
            Config::with_data_dir("x").hub.command_time_to_live,
            Duration::from_secs(600)
        );
        for (text, key) in [
            ("event_retention = 0", "hub.event_retention"),
            ("commit_interval = \"2s\"", "hub.commit_interval"),
            ("command_time_to_live = \"0s\"", "hub.command_time_to_live"),
        ] {
            let result = Config::from_toml_str(&format!("[hub]\n{text}\n"));
            assert_eq!(invalid_key(result), key, "{text}");
        }
        assert!(Config::from_toml_str("[hub]\nkind = \"redis\"\n").is_err());
    }

    #[test]
    fn hub_nats_keys_parse_and_are_checked() {
        let c = Config::from_toml_str(
            "[hub]\nkind = \"nats\"\n[hub.nats]\nurl = \"nats://10.0.0.1:4222, tls://10.0.0.2:4222\"\nreplicas = 3\nprefix = \"t-1\"\nrequest_timeout = \"500ms\"\nheartbeat_ttl = \"3s\"\nbuffer = 10\ntoken = \"s3cret\"\n",
        )
        .unwrap();
        assert_eq!(c.hub.kind, HubKind::Nats);
        assert_eq!(
            c.hub.nats.servers(),
            vec!["nats://10.0.0.1:4222", "tls://10.0.0.2:4222"]
        );
        assert_eq!(c.hub.nats.replicas, 3);
        assert_eq!(c.hub.nats.prefix, "t-1");
        assert_eq!(c.hub.nats.request_timeout, Duration::from_millis(500));
        assert_eq!(c.hub.nats.heartbeat_ttl, Duration::from_secs(3));
        assert_eq!(c.hub.nats.buffer, 10);
        assert_eq!(c.hub.nats.token, "s3cret");
        let d = Config::from_toml_str("[hub]\nkind = \"nats\"\n").unwrap();
        assert_eq!(d.hub.nats, NatsConfig::default());
        assert_eq!(d.hub.nats.url, "nats://127.0.0.1:4222");
        assert_eq!(d.hub.nats.prefix, "coapgw");
        assert_eq!(d.hub.nats.heartbeat_ttl, Duration::from_secs(6));
        assert_eq!(d.hub.nats.buffer, 65_536);
        let env = Config::load_with_env(
            None,
            vec![
                ("COAP_GATEWAY__HUB__KIND".to_owned(), "nats".to_owned()),
                (
                    "COAP_GATEWAY__HUB__NATS__URL".to_owned(),
                    "nats://127.0.0.1:5222".to_owned(),
                ),
            ],
        )
        .unwrap();
        assert_eq!(env.hub.nats.url, "nats://127.0.0.1:5222");
        for (text, key) in [
            ("url = \"\"", "hub.nats.url"),
            ("url = \"http://x:1\"", "hub.nats.url"),
            ("url = \"nats://\"", "hub.nats.url"),
            ("replicas = 0", "hub.nats.replicas"),
            ("replicas = 6", "hub.nats.replicas"),
            ("prefix = \"a.b\"", "hub.nats.prefix"),
            ("prefix = \"\"", "hub.nats.prefix"),
            ("request_timeout = \"0s\"", "hub.nats.request_timeout"),
            ("request_timeout = \"2m\"", "hub.nats.request_timeout"),
            ("heartbeat_ttl = \"500ms\"", "hub.nats.heartbeat_ttl"),
            ("buffer = 0", "hub.nats.buffer"),
            (
                "token = \"t\"\ncredentials_file = \"/x.creds\"",
                "hub.nats.token",
            ),
        ] {
            let result =
                Config::from_toml_str(&format!("[hub]\nkind = \"nats\"\n[hub.nats]\n{text}\n"));
            assert_eq!(invalid_key(result), key, "{text}");
        }
        // Checked only when the NATS hub runs.
        assert!(Config::from_toml_str("[hub.nats]\nreplicas = 0\n").is_ok());
        assert!(Config::from_toml_str("[hub.nats]\nbogus = 1\n").is_err());
    }

    #[test]
    fn to_toml_string_round_trips() {
        let custom = Config::from_toml_str(
            r#"
            [log]
            level = "warn,coap_gateway=debug"
            format = "json"
            [coap]
            address = "[::]:5684"
            keepalive_timeout = "1m 30s"
            handshake_timeout = "750ms"
            max_connections = 7
            [coap.tls]
            enabled = false
            client_auth = "none"
            key = "/etc/gw/key.pem"
            [hub]
            data_dir = "/srv/gw"
            "#,
        )
        .unwrap();
        for config in [Config::default(), custom] {
            let text = config.to_toml_string().unwrap();
            assert_eq!(Config::from_toml_str(&text).unwrap(), config, "{text}");
        }
        let text = Config::default().to_toml_string().unwrap();
        assert!(text.contains("keepalive_timeout = \"20s\""), "{text}");
        assert!(text.contains("ca = \"data/pki/ca.pem\""), "{text}");
    }

    #[test]
    fn missing_file_is_an_io_error_naming_it() {
        let err = Config::load_with_env(Some(Path::new("/nonexistent/gateway.toml")), Vec::new())
            .unwrap_err();
        assert!(
            matches!(&err, ConfigError::Io { path, .. } if path == Path::new("/nonexistent/gateway.toml"))
        );
        assert!(
            err.to_string().contains("/nonexistent/gateway.toml"),
            "{err}"
        );
    }
}
