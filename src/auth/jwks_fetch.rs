//! Fetching the token issuer's keys from `[authorization] jwks_url` (spec
//! §4.1) on the control plane, and keeping the shards' validator current.
//!
//! `jwks_url` may name either document:
//!
//! 1. `GET jwks_url`. A JSON object with `keys` is the key set (RFC 7517
//!    §5). One with `jwks_uri` is an OpenID discovery document (OpenID
//!    Connect Discovery 1.0 §3); its `jwks_uri` is fetched once and must be
//!    a key set.
//! 2. Only if that answer was an HTTP error status, not JSON, or JSON of
//!    neither kind, and `jwks_url` neither ends in `.json` nor already is a
//!    discovery URL: `jwks_url` is taken as the issuer and
//!    `<jwks_url>/.well-known/openid-configuration` is read as in step 1
//!    (Discovery §4: the issuer plus the well-known path). A transport
//!    failure (refused, timed out) is not retried there: it is the same
//!    host.
//!
//! [`spawn_key_refresh`] fetches every `jwks_refresh` and on demand: a token
//! naming an unknown `kid` makes the session call
//! [`SharedValidator::request_refresh`], which wakes the fetcher (§4.1: "on
//! a cache miss the JWKS is re-fetched"). Requests coalesce — one fetch in
//! flight, at most one per second — so a flood of tokens with invented
//! `kid`s cannot turn the gateway into a load generator against the issuer.
//! A failed fetch keeps the old keys.
//!
//! Not here: the `issuer` of the discovery document is not checked against
//! `[authorization] issuer` (the validator checks `iss`), and the
//! `plgd_tokens_endpoint` trust verification of §4.1 is not implemented.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use serde_json::Value;
use tokio::runtime::Handle;
use tokio::sync::{watch, Notify};
use tokio::time::{Instant, MissedTickBehavior};

use super::jwks::{Jwks, JwksError};
use super::oauth::{http_client, read_body, HttpClientError};
use super::validator::SharedValidator;

/// OpenID Connect Discovery 1.0 §4.
const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

/// Budget for one document. Key sets are a few KiB (jwks.rs caps the
/// number of keys); discovery documents somewhat more.
const MAX_DOCUMENT: usize = 512 * 1024;

/// Bound on each request of a background fetch (the config's default HTTP
/// timeout, spec §10.2 `providers[].http.timeout`).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// On-demand fetches are at least this far apart (counted from the start
/// of the previous fetch).
pub const MIN_REFRESH_SPACING: Duration = Duration::from_secs(1);

/// Why no key set could be fetched. The text names the URL that failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// `jwks_url` or a `jwks_uri` is not an absolute http(s) URL.
    #[error("{url:?} is not an http:// or https:// URL")]
    InvalidUrl { url: String },
    /// A discovery document fetched over https names an http `jwks_uri`:
    /// following it would let anyone on the path substitute the keys.
    #[error("discovery document {url} names an insecure jwks_uri {jwks_uri}")]
    InsecureJwksUri { url: String, jwks_uri: String },
    /// No answer: connection refused, TLS failure, timeout, reset.
    #[error("GET {url}: {reason}")]
    Transport { url: String, reason: String },
    /// The server answered with a non-2xx status.
    #[error("GET {url}: HTTP {status}")]
    Status { url: String, status: u16 },
    /// The answer is longer than any key set or discovery document.
    #[error("GET {url}: answer longer than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    /// The answer is not JSON.
    #[error("GET {url}: not JSON: {source}")]
    NotJson {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    /// JSON, but neither a key set nor a discovery document.
    #[error("GET {url}: neither a key set (no \"keys\") nor an OpenID discovery document (no \"jwks_uri\")")]
    NotKeySet { url: String },
    /// A key set that cannot be used at all.
    #[error("GET {url}: {source}")]
    Jwks {
        url: String,
        #[source]
        source: JwksError,
    },
    /// `jwks_url` failed, and so did the discovery document tried after it.
    #[error("{first}; as an issuer: {discovery}")]
    Discovery {
        first: Box<FetchError>,
        discovery: Box<FetchError>,
    },
    /// The whole fetch (all its requests) took longer than allowed.
    #[error("key fetch did not finish within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] HttpClientError),
    /// The thread or runtime of [`fetch_keys_blocking`] could not be made.
    #[error("cannot run the key fetch: {0}")]
    Runtime(String),
}

impl FetchError {
    /// Whether trying `<url>/.well-known/openid-configuration` can help:
    /// the host answered, just not with keys.
    fn may_be_issuer(&self) -> bool {
        matches!(
            self,
            FetchError::Status { .. } | FetchError::NotJson { .. } | FetchError::NotKeySet { .. }
        )
    }
}

/// What one URL answered.
enum Document {
    Keys(Jwks),
    /// A discovery document's `jwks_uri`, resolved against its URL.
    Discovery(Url),
}

/// Fetches the key set `url` names (see the module text for the rules).
/// Each request is bounded by `client`'s timeout (see
/// [`super::oauth::http_client`]). Must run on a tokio runtime with IO and
/// time enabled.
pub async fn fetch_keys(client: &reqwest::Client, url: &str) -> Result<Jwks, FetchError> {
    let parsed = http_url(url)?;
    let first = match fetch_document(client, &parsed).await {
        Ok(document) => return follow(client, &parsed, document).await,
        Err(e) => e,
    };
    let path = parsed.path();
    if !first.may_be_issuer() || path.ends_with(".json") || path.ends_with(DISCOVERY_PATH) {
        return Err(first);
    }
    let mut discovery = parsed.clone();
    discovery.set_path(&format!("{}{DISCOVERY_PATH}", path.trim_end_matches('/')));
    discovery.set_query(None);
    discovery.set_fragment(None);
    match fetch_document(client, &discovery).await {
        Ok(document) => follow(client, &discovery, document).await,
        Err(second) => Err(FetchError::Discovery {
            first: Box::new(first),
            discovery: Box::new(second),
        }),
    }
}

/// Step 1's second half: a key set is the answer, a discovery document is
/// followed once (a `jwks_uri` naming another discovery document is not).
async fn follow(
    client: &reqwest::Client,
    from: &Url,
    document: Document,
) -> Result<Jwks, FetchError> {
    match document {
        Document::Keys(keys) => Ok(keys),
        Document::Discovery(jwks_uri) => {
            if from.scheme() == "https" && jwks_uri.scheme() != "https" {
                return Err(FetchError::InsecureJwksUri {
                    url: from.to_string(),
                    jwks_uri: jwks_uri.to_string(),
                });
            }
            match fetch_document(client, &jwks_uri).await? {
                Document::Keys(keys) => Ok(keys),
                Document::Discovery(_) => Err(FetchError::NotKeySet {
                    url: jwks_uri.to_string(),
                }),
            }
        }
    }
}

fn http_url(url: &str) -> Result<Url, FetchError> {
    match Url::parse(url) {
        Ok(parsed) if matches!(parsed.scheme(), "http" | "https") && parsed.has_host() => {
            Ok(parsed)
        }
        _ => Err(FetchError::InvalidUrl {
            url: url.to_owned(),
        }),
    }
}

async fn fetch_document(client: &reqwest::Client, url: &Url) -> Result<Document, FetchError> {
    let name = || url.to_string();
    let transport = |e: reqwest::Error| FetchError::Transport {
        url: name(),
        reason: error_chain(&e),
    };
    let mut response = client
        .get(url.clone())
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(transport)?;
    if !response.status().is_success() {
        return Err(FetchError::Status {
            url: name(),
            status: response.status().as_u16(),
        });
    }
    let body = read_body(&mut response, MAX_DOCUMENT)
        .await
        .map_err(transport)?
        .ok_or_else(|| FetchError::TooLarge {
            url: name(),
            limit: MAX_DOCUMENT,
        })?;
    let value: Value = serde_json::from_slice(&body).map_err(|source| FetchError::NotJson {
        url: name(),
        source,
    })?;
    if value.get("keys").is_some() {
        return Jwks::parse(&body)
            .map(Document::Keys)
            .map_err(|source| FetchError::Jwks {
                url: name(),
                source,
            });
    }
    if let Some(jwks_uri) = value.get("jwks_uri").and_then(Value::as_str) {
        // Discovery §3 wants an absolute URL; a relative one is resolved
        // against the document rather than refused.
        let resolved = url
            .join(jwks_uri)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| FetchError::InvalidUrl {
                url: jwks_uri.to_owned(),
            })?;
        if let Some(issuer) = value.get("issuer").and_then(Value::as_str) {
            tracing::debug!(%url, issuer, jwks_uri = %resolved, "OpenID discovery document");
        }
        return Ok(Document::Discovery(resolved));
    }
    Err(FetchError::NotKeySet { url: name() })
}

/// The text of a transport error with its causes ("error sending request"
/// alone says nothing).
fn error_chain(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        "timed out".to_owned()
    } else {
        e.to_string()
    };
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// [`fetch_keys`] for start-up, from a thread that is not in a tokio
/// runtime (or is: the fetch runs on a thread of its own with a small
/// current-thread runtime, so this never nests runtimes). `timeout` bounds
/// each request and the whole fetch.
pub fn fetch_keys_blocking(url: &str, timeout: Duration) -> Result<Jwks, FetchError> {
    let url = url.to_owned();
    let worker = std::thread::Builder::new()
        .name("jwks-fetch".to_owned())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| FetchError::Runtime(e.to_string()))?;
            let client = http_client(timeout)?;
            runtime.block_on(async {
                tokio::time::timeout(timeout, fetch_keys(&client, &url))
                    .await
                    .unwrap_or(Err(FetchError::Timeout(timeout)))
            })
        })
        .map_err(|e| FetchError::Runtime(e.to_string()))?;
    worker
        .join()
        .unwrap_or_else(|_| Err(FetchError::Runtime("the fetch thread panicked".to_owned())))
}

/// The running key refresh. Dropping it (or [`stop`](Self::stop)) ends the
/// task; the validator keeps the keys it has.
#[must_use = "dropping a KeyRefresh stops the key refresh"]
#[derive(Debug)]
pub struct KeyRefresh {
    task: tokio::task::JoinHandle<()>,
    installed: watch::Receiver<u64>,
}

impl KeyRefresh {
    /// Counts the key sets installed so far (0 at the start): `changed()`
    /// on the receiver waits for the next one. For readiness reporting and
    /// tests.
    pub fn installed(&self) -> watch::Receiver<u64> {
        self.installed.clone()
    }

    /// Ends the refresh task.
    pub fn stop(self) {}
}

impl Drop for KeyRefresh {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts keeping `validator`'s keys current from `url` on `runtime`: a
/// fetch every `every` (the first one `every` after the start — fetch the
/// initial set with [`fetch_keys_blocking`]), and one soon after each
/// [`SharedValidator::request_refresh`] (installed here as the validator's
/// refresh hook), at most one in flight and at most one per
/// [`MIN_REFRESH_SPACING`]. A fetched set replaces the keys; a failure is
/// logged and the old keys stay, and so does a set with no usable key when
/// the current one has keys (an issuer briefly publishing nothing must not
/// lock every device out).
///
/// Fails only when `url` is not an http(s) URL or the HTTP client cannot
/// be built.
pub fn spawn_key_refresh(
    url: String,
    every: Duration,
    validator: Arc<SharedValidator>,
    runtime: &Handle,
) -> Result<KeyRefresh, FetchError> {
    http_url(&url)?;
    let client = http_client(FETCH_TIMEOUT)?;
    let wake = Arc::new(Wake::default());
    {
        let wake = Arc::clone(&wake);
        validator.set_refresh_hook(Box::new(move || wake.request()));
    }
    let (installed_tx, installed) = watch::channel(0u64);
    let task = runtime.spawn(async move {
        let mut ticker = tokio::time::interval_at(Instant::now() + every, every);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_fetch: Option<Instant> = None;
        loop {
            let reason = tokio::select! {
                _ = ticker.tick() => "periodic",
                _ = wake.notify.notified() => {
                    if !wake.pending.load(Ordering::Acquire) {
                        // A fetch that started after the request served it.
                        continue;
                    }
                    if let Some(last) = last_fetch {
                        tokio::time::sleep_until(last + MIN_REFRESH_SPACING).await;
                    }
                    "requested"
                }
            };
            // Requests made from here on may want keys published after
            // this fetch's GET: they get a fetch of their own.
            wake.pending.store(false, Ordering::Release);
            last_fetch = Some(Instant::now());
            match fetch_keys(&client, &url).await {
                Ok(keys) => {
                    if install(&validator, keys, &url, reason) {
                        installed_tx.send_modify(|n| *n += 1);
                    }
                }
                Err(e) => {
                    tracing::warn!(%url, reason, error = %e, "key fetch failed; keeping the current keys");
                }
            }
            // The next periodic fetch is `every` after this one.
            ticker.reset();
        }
    });
    Ok(KeyRefresh { task, installed })
}

/// How [`SharedValidator::request_refresh`] reaches the refresh task.
/// `pending` says a request is not served yet; `notify` wakes the task (it
/// keeps one permit while the task is busy, so requests during a fetch or
/// its spacing wait wake it once; `pending` then tells whether a fetch
/// started since has already served them).
#[derive(Default)]
struct Wake {
    pending: AtomicBool,
    notify: Notify,
}

impl Wake {
    fn request(&self) {
        self.pending.store(true, Ordering::Release);
        self.notify.notify_one();
    }
}

/// Replaces the validator's keys unless that would trade usable keys for
/// none. Returns whether it did.
fn install(validator: &SharedValidator, keys: Jwks, url: &str, reason: &str) -> bool {
    for skipped in keys.skipped() {
        tracing::debug!(%url, kid = ?skipped.kid, reason = %skipped.reason, "key skipped");
    }
    if keys.is_empty() && !validator.load().keys().is_empty() {
        tracing::warn!(%url, reason, skipped = keys.skipped().len(), "fetched key set has no usable key; keeping the current keys");
        return false;
    }
    tracing::debug!(%url, reason, keys = keys.len(), "key set installed");
    validator.set_keys(keys);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    use axum::routing::get;
    use axum::{Json, Router};
    use serde_json::json;

    use crate::auth::authority::{Authority, AuthoritySettings, SigningKey};
    use crate::auth::jwt::{AuthorizationMode, TokenValidator};

    struct KeyServer {
        jwks: Mutex<Value>,
        base: String,
        hits: AtomicUsize,
        failing: AtomicBool,
    }

    async fn keys(State(s): State<Arc<KeyServer>>) -> axum::response::Response {
        s.hits.fetch_add(1, Ordering::SeqCst);
        if s.failing.load(Ordering::SeqCst) {
            return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
        }
        Json(s.jwks.lock().unwrap().clone()).into_response()
    }

    async fn discovery(State(s): State<Arc<KeyServer>>) -> Json<Value> {
        Json(json!({
            "issuer": "https://auth.test",
            "jwks_uri": format!("{}/keys.json", s.base),
        }))
    }

    fn authority() -> Authority {
        Authority::new(
            SigningKey::generate().unwrap(),
            AuthoritySettings::new("https://auth.test"),
        )
        .unwrap()
    }

    async fn start_server(jwks: Value) -> Arc<KeyServer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(KeyServer {
            jwks: Mutex::new(jwks),
            base,
            hits: AtomicUsize::new(0),
            failing: AtomicBool::new(false),
        });
        let app = Router::new()
            .route("/keys.json", get(keys))
            .route("/issuer/.well-known/openid-configuration", get(discovery))
            .route(
                "/relative/.well-known/openid-configuration",
                get(|| async { Json(json!({"jwks_uri": "/keys.json"})) }),
            )
            .route(
                "/html",
                get(|| async { (StatusCode::OK, "<html>login</html>") }),
            )
            .route(
                "/other.json",
                get(|| async { Json(json!({"hello": "world"})) }),
            )
            .with_state(Arc::clone(&state));
        tokio::spawn(async move { axum::serve(listener, app).await });
        state
    }

    fn kids(keys: &Jwks) -> Vec<String> {
        keys.keys()
            .iter()
            .filter_map(|k| k.kid().map(str::to_owned))
            .collect()
    }

    #[tokio::test]
    async fn key_set_directly_and_through_discovery() {
        let a = authority();
        let server = start_server(a.jwks()).await;
        let client = http_client(Duration::from_secs(5)).unwrap();
        let want = vec![a.signing_key().kid().to_owned()];
        let base = &server.base;
        for url in [
            format!("{base}/keys.json"),
            format!("{base}/issuer/.well-known/openid-configuration"),
            // The issuer: /issuer answers 404, its discovery document does.
            format!("{base}/issuer"),
            format!("{base}/issuer/"),
            format!("{base}/relative"),
        ] {
            let keys = fetch_keys(&client, &url)
                .await
                .unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(kids(&keys), want, "{url}");
        }
    }

    #[tokio::test]
    async fn fetch_errors_name_what_failed() {
        let server = start_server(json!({"keys": []})).await;
        let client = http_client(Duration::from_secs(5)).unwrap();
        let base = &server.base;

        // Not JSON, and no discovery document either: both reported.
        let err = fetch_keys(&client, &format!("{base}/html"))
            .await
            .unwrap_err();
        let FetchError::Discovery { first, discovery } = &err else {
            panic!("{err}");
        };
        assert!(matches!(**first, FetchError::NotJson { .. }), "{first}");
        assert!(
            matches!(**discovery, FetchError::Status { status: 404, .. }),
            "{discovery}"
        );
        assert!(err
            .to_string()
            .contains("/html/.well-known/openid-configuration"));

        // A `.json` URL is a key set or nothing.
        let err = fetch_keys(&client, &format!("{base}/other.json"))
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::NotKeySet { .. }), "{err}");
        let err = fetch_keys(&client, &format!("{base}/missing.json"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, FetchError::Status { status: 404, .. }),
            "{err}"
        );

        let err = fetch_keys(&client, "ftp://example/keys").await.unwrap_err();
        assert!(matches!(err, FetchError::InvalidUrl { .. }), "{err}");

        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = fetch_keys(&client, &format!("http://127.0.0.1:{port}/issuer"))
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::Transport { .. }), "{err}");

        // An empty set is a set (jwks.rs: an issuer mid-rotation).
        let keys = fetch_keys(&client, &format!("{base}/keys.json"))
            .await
            .unwrap();
        assert!(keys.is_empty());
    }

    #[test]
    fn blocking_fetch_from_a_plain_thread() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let a = authority();
        let server = runtime.block_on(start_server(a.jwks()));
        let url = format!("{}/issuer", server.base);
        // The server runs while this runtime waits for the blocking task.
        let keys = runtime
            .block_on(async {
                tokio::task::spawn_blocking(move || {
                    fetch_keys_blocking(&url, Duration::from_secs(5))
                })
                .await
            })
            .unwrap()
            .unwrap();
        assert_eq!(kids(&keys), vec![a.signing_key().kid().to_owned()]);

        // Nothing listening: an error, not a hang or a panic.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = fetch_keys_blocking(
            &format!("http://127.0.0.1:{port}/keys.json"),
            Duration::from_secs(2),
        )
        .unwrap_err();
        assert!(matches!(err, FetchError::Transport { .. }), "{err}");
    }

    fn validator_for(authority: &Authority) -> Arc<SharedValidator> {
        let validator = TokenValidator::new(
            authority.key_set(),
            authority.validation_settings(AuthorizationMode::DeviceIdClaim),
        )
        .unwrap();
        Arc::new(SharedValidator::new(validator))
    }

    async fn next_install(installed: &mut watch::Receiver<u64>) -> u64 {
        tokio::time::timeout(Duration::from_secs(5), installed.changed())
            .await
            .expect("a key set is installed in time")
            .unwrap();
        *installed.borrow_and_update()
    }

    #[tokio::test]
    async fn refresh_hook_fetches_and_replaces_the_keys() {
        let (old, new) = (authority(), authority());
        let server = start_server(new.jwks()).await;
        let validator = validator_for(&old);
        let refresh = spawn_key_refresh(
            format!("{}/issuer", server.base),
            Duration::from_secs(3600),
            Arc::clone(&validator),
            &Handle::current(),
        )
        .unwrap();
        let mut installed = refresh.installed();
        assert_eq!(kids(validator.load().keys()), vec![old.signing_key().kid()]);

        // A token with an unknown kid arrived: the session asks for keys.
        validator.request_refresh();
        assert_eq!(next_install(&mut installed).await, 1);
        assert_eq!(kids(validator.load().keys()), vec![new.signing_key().kid()]);
        let hits = server.hits.load(Ordering::SeqCst);
        assert_eq!(hits, 1);

        // A burst of requests: one more fetch, not before the spacing.
        #[allow(clippy::disallowed_methods)] // test: wall time between fetches
        let burst = std::time::Instant::now();
        for _ in 0..20 {
            validator.request_refresh();
        }
        assert_eq!(next_install(&mut installed).await, 2);
        assert!(burst.elapsed() >= MIN_REFRESH_SPACING - Duration::from_millis(100));
        tokio::time::sleep(MIN_REFRESH_SPACING + Duration::from_millis(300)).await;
        assert_eq!(server.hits.load(Ordering::SeqCst), hits + 1);
        assert_eq!(*installed.borrow(), 2);

        // A failing issuer: the fetch happens and the keys stay.
        server.failing.store(true, Ordering::SeqCst);
        validator.request_refresh();
        tokio::time::sleep(MIN_REFRESH_SPACING + Duration::from_millis(300)).await;
        assert_eq!(server.hits.load(Ordering::SeqCst), hits + 2);
        assert_eq!(kids(validator.load().keys()), vec![new.signing_key().kid()]);

        // An empty set does not replace usable keys.
        server.failing.store(false, Ordering::SeqCst);
        *server.jwks.lock().unwrap() = json!({"keys": []});
        validator.request_refresh();
        tokio::time::sleep(MIN_REFRESH_SPACING + Duration::from_millis(300)).await;
        assert_eq!(server.hits.load(Ordering::SeqCst), hits + 3);
        assert_eq!(kids(validator.load().keys()), vec![new.signing_key().kid()]);
        assert_eq!(*installed.borrow(), 2);
        refresh.stop();
    }

    #[tokio::test]
    async fn periodic_refresh_picks_up_rotated_keys() {
        let (first, second) = (authority(), authority());
        let server = start_server(first.jwks()).await;
        let validator = validator_for(&first);
        let refresh = spawn_key_refresh(
            format!("{}/keys.json", server.base),
            Duration::from_millis(150),
            Arc::clone(&validator),
            &Handle::current(),
        )
        .unwrap();
        let mut installed = refresh.installed();
        assert_eq!(next_install(&mut installed).await, 1);
        *server.jwks.lock().unwrap() = second.jwks();
        next_install(&mut installed).await;
        assert_eq!(
            kids(validator.load().keys()),
            vec![second.signing_key().kid()]
        );
        // Dropping the handle stops the task.
        drop(refresh);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let hits = server.hits.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(server.hits.load(Ordering::SeqCst), hits);
    }

    #[test]
    fn refresh_refuses_a_bad_url() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let validator = validator_for(&authority());
        let err = spawn_key_refresh(
            "not a url".into(),
            Duration::from_secs(60),
            validator,
            runtime.handle(),
        )
        .unwrap_err();
        assert!(matches!(err, FetchError::InvalidUrl { .. }));
    }
}
