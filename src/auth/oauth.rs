//! External OAuth2 providers (spec §4.8): the token endpoint of an
//! authorization server, reached over HTTP from the control plane (tokio).
//!
//! [`HttpProvider`] implements [`TokenProvider`] for the two grants a device
//! drives: sign-up sends an authorization code (RFC 6749 §4.1.3), refresh
//! sends a refresh token (RFC 6749 §6). The call never runs on a shard:
//! [`TokenProvider::exchange`] returns `None` at once and the answer reaches
//! the session through its [`Completion`], called exactly once from a tokio
//! worker — also when the runtime shuts down under the call.
//!
//! What this module does not do: de-duplicate identical concurrent codes or
//! cache results per connection (the session does, spec §4.8), try every
//! provider for a refresh without `authprovider` (the session), the
//! `clientCredentials` grant (not configurable yet), or revoke tokens at the
//! provider on sign-off (RFC 7009 is not implemented; `revoke_device` is the
//! trait's no-op).
//!
//! The HTTP client is reqwest on rustls with ring as the one crypto provider
//! (FIELD-NOTES.md: no aws-lc-rs) and the platform's trust store;
//! [`http_client`] builds it, and the key fetcher in
//! [`super::jwks_fetch`] uses the same.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::runtime::Handle;

use super::provider::{Completion, ExchangeRequest, Grant, OAuthError, TokenProvider, TokenSet};
use crate::config::OAuthProviderConfig;

/// Budget for a token endpoint's answer. Real answers are a few KiB (two
/// tokens and some fields); a provider streaming more is broken, and the
/// gateway must not buffer it (rustls/src/manual/implvulns.rs: budgets for
/// legal-but-abusive peers).
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;

/// At most this much of an error body goes into a diagnostic that reaches
/// the device (spec §5.0 error payloads are short text).
const MAX_DIAGNOSTIC: usize = 200;

/// Why an [`HttpProvider`] cannot be built from its configuration. Start-up
/// reports it and stops: a provider that cannot authenticate would fail
/// every sign-up later, far from the cause.
#[derive(Debug, thiserror::Error)]
pub enum OAuthConfigError {
    /// `client_secret_file` could not be read.
    #[error("provider `{provider}`: cannot read client_secret_file {}: {source}", path.display())]
    SecretFile {
        provider: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `client_secret_file` holds nothing but a newline: an empty secret
    /// would be sent as `client_secret=` and refused by every provider.
    #[error("provider `{provider}`: client_secret_file {} is empty (leave client_secret_file unset for a public client)", path.display())]
    EmptySecret { provider: String, path: PathBuf },
    /// `token_url` is not an http(s) URL.
    #[error("provider `{provider}`: token_url {url:?} is not an http:// or https:// URL")]
    TokenUrl { provider: String, url: String },
    /// The HTTP client could not be built (TLS trust store, ...).
    #[error("provider `{provider}`: cannot build the HTTP client: {source}")]
    Client {
        provider: String,
        #[source]
        source: HttpClientError,
    },
}

/// Why the control plane's HTTP client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum HttpClientError {
    /// The platform trust store could not be loaded into a verifier.
    #[error("TLS verifier: {0}")]
    Tls(#[from] rustls::Error),
    /// reqwest refused the configuration.
    #[error("{0}")]
    Build(#[from] reqwest::Error),
}

/// The HTTP client for the control plane's OAuth and OpenID calls: rustls
/// with the ring provider passed explicitly (no process-wide default is
/// installed or needed; FIELD-NOTES.md, one crypto library), server
/// certificates checked against the platform trust store, HTTP/1.1 only,
/// proxies from the environment (`HTTPS_PROXY`, `NO_PROXY`), and `timeout`
/// bounding each whole request (connect, send, answer, body).
///
/// Build the client once and keep it: it pools connections. A client
/// belongs to the runtime it is first used on (its pooled connections are
/// tasks there).
pub fn http_client(timeout: Duration) -> Result<reqwest::Client, HttpClientError> {
    use rustls_platform_verifier::BuilderVerifierExt;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_platform_verifier()?
        .with_no_client_auth();
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(timeout)
        .connect_timeout(timeout)
        // RFC 6749 §3.2 names no redirects for the token endpoint, and
        // following one would turn the POST into a GET; a 3xx is reported.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("coap-gateway/", env!("CARGO_PKG_VERSION")))
        .build()?;
    Ok(client)
}

/// Reads a response body of at most `limit` bytes; `None` when it is
/// longer. Chunk by chunk, so an endless body costs at most `limit`.
pub(crate) async fn read_body(
    response: &mut reqwest::Response,
    limit: usize,
) -> Result<Option<Vec<u8>>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// An external OAuth2 provider (spec §4.8, grant `authorizationCode`).
///
/// The client authenticates with `client_secret_post` (RFC 6749 §2.3.1:
/// `client_id` and `client_secret` in the form body), or as a public
/// client (`client_id` only) when no secret file is configured.
pub struct HttpProvider {
    inner: Arc<Endpoint>,
    runtime: Handle,
}

/// What one exchange needs, shared with the spawned call.
struct Endpoint {
    name: String,
    token_url: String,
    client_id: String,
    client_secret: Option<String>,
    redirect_url: String,
    scopes: Vec<String>,
    timeout: Duration,
    client: reqwest::Client,
}

impl std::fmt::Debug for HttpProvider {
    // Never prints the client secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpProvider")
            .field("name", &self.inner.name)
            .field("token_url", &self.inner.token_url)
            .field("client_id", &self.inner.client_id)
            .field("public_client", &self.inner.client_secret.is_none())
            .finish_non_exhaustive()
    }
}

impl HttpProvider {
    /// Builds the provider from `[[authorization.providers]]`: reads the
    /// client secret (trailing newline ignored) and builds the HTTP client.
    /// Exchanges run on `runtime` (the control plane), so this may be called
    /// from any thread.
    pub fn new(
        config: &OAuthProviderConfig,
        runtime: Handle,
    ) -> Result<HttpProvider, OAuthConfigError> {
        let provider = config.name.clone();
        if !(config.token_url.starts_with("http://") || config.token_url.starts_with("https://")) {
            return Err(OAuthConfigError::TokenUrl {
                provider,
                url: config.token_url.clone(),
            });
        }
        let client_secret = if config.client_secret_file.as_os_str().is_empty() {
            None
        } else {
            Some(read_secret(&provider, &config.client_secret_file)?)
        };
        let client = http_client(config.timeout).map_err(|source| OAuthConfigError::Client {
            provider: provider.clone(),
            source,
        })?;
        Ok(HttpProvider {
            inner: Arc::new(Endpoint {
                name: provider,
                token_url: config.token_url.clone(),
                client_id: config.client_id.clone(),
                client_secret,
                redirect_url: config.redirect_url.clone(),
                scopes: config.scopes.clone(),
                timeout: config.timeout,
                client,
            }),
            runtime,
        })
    }

    /// One call to the token endpoint, awaited. Must run on a tokio runtime
    /// with IO and time enabled (the one the client is used on).
    /// [`TokenProvider::exchange`] spawns this.
    pub async fn request_tokens(&self, grant: &Grant) -> Result<TokenSet, OAuthError> {
        self.inner.request(grant, "").await
    }
}

fn read_secret(provider: &str, path: &std::path::Path) -> Result<String, OAuthConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| OAuthConfigError::SecretFile {
        provider: provider.to_owned(),
        path: path.to_owned(),
        source,
    })?;
    // Files written by `echo` or an editor end in a newline that is not
    // part of the secret (config.rs: "trailing newline ignored").
    let secret = text.trim_end_matches(['\n', '\r']);
    if secret.is_empty() {
        return Err(OAuthConfigError::EmptySecret {
            provider: provider.to_owned(),
            path: path.to_owned(),
        });
    }
    Ok(secret.to_owned())
}

impl Endpoint {
    /// The form body of the token request (RFC 6749 §4.1.3 and §6,
    /// `application/x-www-form-urlencoded` per Appendix B).
    ///
    /// With the code goes `device_id`, the device redeeming it: RFC 6749
    /// §3.2 has servers ignore parameters they do not know, and an
    /// authority that binds tokens to devices (this gateway's own
    /// `/oauth/token`) puts it in the device-ID claim that
    /// `mode = "device-id-claim"` requires.
    fn form(&self, grant: &Grant, device_id: &str) -> String {
        let mut form = form_urlencoded::Serializer::new(String::new());
        match grant {
            Grant::AuthorizationCode(code) => {
                form.append_pair("grant_type", "authorization_code");
                form.append_pair("code", code);
                self.append_client(&mut form);
                if !device_id.is_empty() {
                    form.append_pair("device_id", device_id);
                }
                if !self.redirect_url.is_empty() {
                    form.append_pair("redirect_uri", &self.redirect_url);
                }
                if !self.scopes.is_empty() {
                    // RFC 6749 §3.3: space-delimited.
                    form.append_pair("scope", &self.scopes.join(" "));
                }
            }
            Grant::RefreshToken(token) => {
                form.append_pair("grant_type", "refresh_token");
                form.append_pair("refresh_token", token);
                self.append_client(&mut form);
            }
        }
        form.finish()
    }

    fn append_client(&self, form: &mut form_urlencoded::Serializer<'_, String>) {
        form.append_pair("client_id", &self.client_id);
        if let Some(secret) = &self.client_secret {
            form.append_pair("client_secret", secret);
        }
    }

    async fn request(&self, grant: &Grant, device_id: &str) -> Result<TokenSet, OAuthError> {
        let kind = match grant {
            Grant::AuthorizationCode(_) => "authorization_code",
            Grant::RefreshToken(_) => "refresh_token",
        };
        // reqwest's own timeout covers the request too; this one also
        // bounds the body read, whatever reqwest does, and gives one text.
        let result = match tokio::time::timeout(self.timeout, self.post(grant, device_id)).await {
            Ok(result) => result,
            Err(_) => Err(OAuthError::Unavailable(format!(
                "token endpoint did not answer within {}",
                humantime::format_duration(self.timeout)
            ))),
        };
        match &result {
            Ok(_) => {
                tracing::debug!(provider = %self.name, grant = kind, "token exchange succeeded")
            }
            // Never logs codes or tokens: only the provider's own text.
            Err(e) => {
                tracing::info!(provider = %self.name, grant = kind, error = %e, "token exchange failed")
            }
        }
        result
    }

    async fn post(&self, grant: &Grant, device_id: &str) -> Result<TokenSet, OAuthError> {
        let mut response = self
            .client
            .post(&self.token_url)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(reqwest::header::ACCEPT, "application/json")
            .body(self.form(grant, device_id))
            .send()
            .await
            .map_err(|e| OAuthError::Unavailable(describe_transport_error(&e)))?;
        let status = response.status();
        let body = read_body(&mut response, MAX_TOKEN_RESPONSE)
            .await
            .map_err(|e| OAuthError::Unavailable(describe_transport_error(&e)))?
            .ok_or_else(|| {
                OAuthError::Unavailable(format!(
                    "token endpoint answer is longer than {MAX_TOKEN_RESPONSE} bytes"
                ))
            })?;
        classify(status.as_u16(), &body)
    }
}

/// The text of a transport error, with its causes ("error sending request"
/// alone says nothing).
fn describe_transport_error(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "token endpoint timed out"
    } else if e.is_connect() {
        "cannot connect to the token endpoint"
    } else {
        "token endpoint request failed"
    };
    let mut text = what.to_owned();
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Maps a token endpoint answer to the result (RFC 6749 §5.1, §5.2).
///
/// Spec §5.0: OAuth HTTP errors 400/401/403/404/409 are the provider's
/// refusal (`Rejected`); every other failure status (3xx, 429, other 4xx,
/// 5xx) and an answer that is not a token response count as transient
/// (`Unavailable`, answered 5.03 "temporary error").
fn classify(status: u16, body: &[u8]) -> Result<TokenSet, OAuthError> {
    match status {
        200..=299 => parse_token_response(body),
        400 | 401 | 403 | 404 | 409 => Err(OAuthError::Rejected(format!(
            "token endpoint refused ({status}): {}",
            error_text(body)
        ))),
        _ => Err(OAuthError::Unavailable(format!(
            "token endpoint answered HTTP {status}: {}",
            error_text(body)
        ))),
    }
}

/// The provider's `error` and `error_description` (RFC 6749 §5.2), else the
/// start of the body.
fn error_text(body: &[u8]) -> String {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    let field = |name: &str| {
        json.as_ref()
            .and_then(|v| v.get(name))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let text = match (field("error"), field("error_description")) {
        (Some(error), Some(description)) => format!("{error}: {description}"),
        (Some(error), None) => error.to_owned(),
        (None, Some(description)) => description.to_owned(),
        (None, None) => {
            let raw = String::from_utf8_lossy(body);
            let raw = raw.trim();
            if raw.is_empty() {
                "(no body)".to_owned()
            } else {
                raw.to_owned()
            }
        }
    };
    truncate(text, MAX_DIAGNOSTIC)
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// A successful token response (RFC 6749 §5.1): `access_token` required,
/// `refresh_token` and `expires_in` optional. `expires_in` is a number of
/// seconds; some providers send it as a numeric string, which is accepted.
fn parse_token_response(body: &[u8]) -> Result<TokenSet, OAuthError> {
    let unusable = |why: &str| OAuthError::Unavailable(format!("token endpoint answer {why}"));
    let value: Value =
        serde_json::from_slice(body).map_err(|e| unusable(&format!("is not JSON: {e}")))?;
    if !value.is_object() {
        return Err(unusable("is not a JSON object"));
    }
    let access_token = match value.get("access_token").and_then(Value::as_str) {
        Some(token) if !token.is_empty() => token.to_owned(),
        _ => {
            // A 200 carrying an OAuth error is a refusal in the wrong
            // envelope; anything else is a broken answer.
            if value.get("error").and_then(Value::as_str).is_some() {
                return Err(OAuthError::Rejected(format!(
                    "token endpoint refused: {}",
                    error_text(body)
                )));
            }
            return Err(unusable("has no access_token"));
        }
    };
    let refresh_token = match value.get("refresh_token") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(token)) => token.clone(),
        Some(_) => return Err(unusable("has a refresh_token that is not a string")),
    };
    let expires_in = match value.get("expires_in") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            seconds(v).ok_or_else(|| unusable("has an expires_in that is not a whole number"))?,
        ),
    };
    Ok(TokenSet {
        access_token,
        refresh_token,
        expires_in,
    })
}

/// `expires_in` as seconds: a non-negative integer, as a JSON number or a
/// string of digits.
fn seconds(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Calls the completion exactly once: with the result, or — if the task is
/// dropped before it finishes (runtime shut down, task cancelled, panic) —
/// with `Unavailable`, so a session never waits for an answer that cannot
/// come.
struct CompletionGuard(Option<Completion>);

impl CompletionGuard {
    fn complete(mut self, result: Result<TokenSet, OAuthError>) {
        if let Some(done) = self.0.take() {
            done(result);
        }
    }
}

impl Drop for CompletionGuard {
    fn drop(&mut self) {
        if let Some(done) = self.0.take() {
            done(Err(OAuthError::Unavailable(
                "token exchange abandoned: the gateway is shutting down".to_owned(),
            )));
        }
    }
}

impl TokenProvider for HttpProvider {
    fn name(&self) -> &str {
        &self.inner.name
    }

    /// Always answers later: the call is spawned on the control-plane
    /// runtime and `done` gets its result, once (spec §4.8).
    fn exchange(
        &self,
        request: ExchangeRequest,
        done: Completion,
    ) -> Option<Result<TokenSet, OAuthError>> {
        let endpoint = Arc::clone(&self.inner);
        let guard = CompletionGuard(Some(done));
        // A runtime that has shut down drops the future unpolled, and the
        // guard answers `Unavailable`.
        drop(self.runtime.spawn(async move {
            let result = endpoint.request(&request.grant, &request.device_id).await;
            guard.complete(result);
        }));
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
    use std::sync::Mutex;

    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    use axum::routing::post;
    use axum::{Json, Router};
    use serde_json::json;
    use tokio::sync::oneshot;

    const SECRET: &str = "s3cret&=+ é";

    /// How the test token endpoint answers.
    const OK: u8 = 0;
    const INVALID_GRANT: u8 = 1;
    const SERVER_ERROR: u8 = 2;
    const SLOW: u8 = 3;
    const GARBAGE: u8 = 4;

    #[derive(Default)]
    struct TokenServer {
        mode: AtomicU8,
        bodies: Mutex<Vec<String>>,
    }

    async fn token_endpoint(
        State(server): State<Arc<TokenServer>>,
        headers: axum::http::HeaderMap,
        body: String,
    ) -> axum::response::Response {
        server.bodies.lock().unwrap().push(body.clone());
        match server.mode.load(Ordering::SeqCst) {
            INVALID_GRANT => {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"error": "invalid_grant", "error_description": "code expired"})),
                )
                    .into_response()
            }
            SERVER_ERROR => {
                return (StatusCode::INTERNAL_SERVER_ERROR, "database down").into_response()
            }
            SLOW => tokio::time::sleep(Duration::from_secs(3)).await,
            GARBAGE => return (StatusCode::OK, "<html>hello</html>").into_response(),
            _ => {}
        }
        let content_type = headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        if content_type != Some("application/x-www-form-urlencoded") {
            return (StatusCode::UNSUPPORTED_MEDIA_TYPE, "form expected").into_response();
        }
        let fields: std::collections::HashMap<String, String> =
            form_urlencoded::parse(body.as_bytes())
                .into_owned()
                .collect();
        let field = |name: &str| fields.get(name).map(String::as_str);
        let refuse = |error: &str| {
            (StatusCode::BAD_REQUEST, Json(json!({ "error": error }))).into_response()
        };
        if field("client_id") != Some("gateway") || field("client_secret") != Some(SECRET) {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "invalid_client"})),
            )
                .into_response();
        }
        match field("grant_type") {
            Some("authorization_code") => {
                if field("code") != Some("c0de +&=/?é") {
                    return refuse("invalid_grant");
                }
                if field("redirect_uri") != Some("https://app.example/cb?x=1")
                    || field("scope") != Some("openid offline_access")
                {
                    return refuse("invalid_request");
                }
                Json(json!({
                    "access_token": "AT-1",
                    "refresh_token": "RT-1",
                    "token_type": "Bearer",
                    "expires_in": 3600,
                }))
                .into_response()
            }
            Some("refresh_token") => {
                if field("refresh_token") != Some("RT-1")
                    || fields.contains_key("scope")
                    || fields.contains_key("redirect_uri")
                {
                    return refuse("invalid_grant");
                }
                // A numeric string, as some providers send.
                Json(json!({"access_token": "AT-2", "refresh_token": "RT-2", "expires_in": "1800"}))
                    .into_response()
            }
            _ => refuse("unsupported_grant_type"),
        }
    }

    async fn start_server() -> (Arc<TokenServer>, String) {
        let state = Arc::new(TokenServer::default());
        let app = Router::new()
            .route("/oauth/token", post(token_endpoint))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (state, format!("http://{addr}/oauth/token"))
    }

    fn secret_file() -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut file, format!("{SECRET}\n").as_bytes()).unwrap();
        file
    }

    fn config(token_url: &str, secret: &tempfile::NamedTempFile) -> OAuthProviderConfig {
        OAuthProviderConfig {
            name: "ext".into(),
            token_url: token_url.into(),
            client_id: "gateway".into(),
            client_secret_file: secret.path().to_owned(),
            redirect_url: "https://app.example/cb?x=1".into(),
            scopes: vec!["openid".into(), "offline_access".into()],
            timeout: Duration::from_secs(5),
        }
    }

    fn request(grant: Grant) -> ExchangeRequest {
        ExchangeRequest {
            grant,
            device_id: "5bbc55bb-686f-4068-6c2d-75c4a8b4f49a".into(),
            now_unix: 1_800_000_000,
        }
    }

    fn code() -> Grant {
        Grant::AuthorizationCode("c0de +&=/?é".into())
    }

    /// Runs one exchange through the trait and returns what the completion
    /// got, checking it was called exactly once.
    async fn exchange(provider: &HttpProvider, grant: Grant) -> Result<TokenSet, OAuthError> {
        let calls = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = oneshot::channel();
        let counter = Arc::clone(&calls);
        let done: Completion = Box::new(move |result| {
            counter.fetch_add(1, Ordering::SeqCst);
            let _ = tx.send(result);
        });
        assert!(provider.exchange(request(grant), done).is_none());
        let result = rx.await.expect("completion called");
        // Let any stray second call happen before counting.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1, "completion called once");
        result
    }

    #[tokio::test]
    async fn code_exchange_sends_the_form_and_returns_tokens() {
        let (server, url) = start_server().await;
        let secret = secret_file();
        let provider = HttpProvider::new(&config(&url, &secret), Handle::current()).unwrap();
        assert_eq!(provider.name(), "ext");
        let tokens = exchange(&provider, code()).await.unwrap();
        assert_eq!(
            tokens,
            TokenSet {
                access_token: "AT-1".into(),
                refresh_token: "RT-1".into(),
                expires_in: Some(3600),
            }
        );
        // Exact bytes: reserved characters percent-encoded, spaces as `+`
        // (application/x-www-form-urlencoded), the secret's newline gone.
        let bodies = server.bodies.lock().unwrap();
        assert_eq!(
            bodies[0],
            "grant_type=authorization_code&code=c0de+%2B%26%3D%2F%3F%C3%A9\
             &client_id=gateway&client_secret=s3cret%26%3D%2B+%C3%A9\
             &device_id=5bbc55bb-686f-4068-6c2d-75c4a8b4f49a\
             &redirect_uri=https%3A%2F%2Fapp.example%2Fcb%3Fx%3D1&scope=openid+offline_access"
        );
    }

    #[tokio::test]
    async fn refresh_grant_succeeds_with_a_string_expiry() {
        let (server, url) = start_server().await;
        let secret = secret_file();
        let provider = HttpProvider::new(&config(&url, &secret), Handle::current()).unwrap();
        let tokens = exchange(&provider, Grant::RefreshToken("RT-1".into()))
            .await
            .unwrap();
        assert_eq!(tokens.access_token, "AT-2");
        assert_eq!(tokens.refresh_token, "RT-2");
        assert_eq!(tokens.expires_in, Some(1800));
        assert_eq!(
            server.bodies.lock().unwrap()[0],
            "grant_type=refresh_token&refresh_token=RT-1&client_id=gateway\
             &client_secret=s3cret%26%3D%2B+%C3%A9"
        );
    }

    #[tokio::test]
    async fn public_client_sends_no_secret() {
        let (server, url) = start_server().await;
        let secret = secret_file();
        let mut cfg = config(&url, &secret);
        cfg.client_secret_file = PathBuf::new();
        cfg.redirect_url.clear();
        cfg.scopes.clear();
        let provider = HttpProvider::new(&cfg, Handle::current()).unwrap();
        // The test server wants the secret: 401 invalid_client → Rejected.
        let err = exchange(&provider, code()).await.unwrap_err();
        assert_eq!(
            err,
            OAuthError::Rejected("token endpoint refused (401): invalid_client".into())
        );
        assert_eq!(
            server.bodies.lock().unwrap()[0],
            "grant_type=authorization_code&code=c0de+%2B%26%3D%2F%3F%C3%A9&client_id=gateway\
             &device_id=5bbc55bb-686f-4068-6c2d-75c4a8b4f49a"
        );
    }

    #[tokio::test]
    async fn invalid_grant_is_rejected_with_the_providers_text() {
        let (server, url) = start_server().await;
        server.mode.store(INVALID_GRANT, Ordering::SeqCst);
        let secret = secret_file();
        let provider = HttpProvider::new(&config(&url, &secret), Handle::current()).unwrap();
        let err = exchange(&provider, code()).await.unwrap_err();
        assert_eq!(
            err,
            OAuthError::Rejected(
                "token endpoint refused (400): invalid_grant: code expired".into()
            )
        );
        // A wrong refresh token, refused by the server's own check.
        server.mode.store(OK, Ordering::SeqCst);
        let err = exchange(&provider, Grant::RefreshToken("RT-old".into()))
            .await
            .unwrap_err();
        assert!(matches!(err, OAuthError::Rejected(ref t) if t.contains("invalid_grant")));
    }

    #[tokio::test]
    async fn server_error_and_garbage_are_unavailable() {
        let (server, url) = start_server().await;
        let secret = secret_file();
        let provider = HttpProvider::new(&config(&url, &secret), Handle::current()).unwrap();
        server.mode.store(SERVER_ERROR, Ordering::SeqCst);
        let err = exchange(&provider, code()).await.unwrap_err();
        assert_eq!(
            err,
            OAuthError::Unavailable("token endpoint answered HTTP 500: database down".into())
        );
        server.mode.store(GARBAGE, Ordering::SeqCst);
        let err = exchange(&provider, code()).await.unwrap_err();
        assert!(
            matches!(err, OAuthError::Unavailable(ref t) if t.contains("is not JSON")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn unreachable_endpoint_is_unavailable() {
        // A port nobody listens on: bind, note, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let secret = secret_file();
        let url = format!("http://127.0.0.1:{port}/oauth/token");
        let provider = HttpProvider::new(&config(&url, &secret), Handle::current()).unwrap();
        let err = exchange(&provider, code()).await.unwrap_err();
        assert!(
            matches!(err, OAuthError::Unavailable(ref t) if t.starts_with("cannot connect")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn slow_endpoint_times_out_as_unavailable() {
        let (server, url) = start_server().await;
        server.mode.store(SLOW, Ordering::SeqCst);
        let secret = secret_file();
        let mut cfg = config(&url, &secret);
        cfg.timeout = Duration::from_millis(200);
        let provider = HttpProvider::new(&cfg, Handle::current()).unwrap();
        #[allow(clippy::disallowed_methods)] // test: measures the wall time the timeout took
        let started = std::time::Instant::now();
        let err = exchange(&provider, code()).await.unwrap_err();
        assert!(matches!(err, OAuthError::Unavailable(_)), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn completion_is_called_when_the_runtime_is_gone() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let handle = runtime.handle().clone();
        let secret = secret_file();
        let provider = HttpProvider::new(&config("http://127.0.0.1:9/t", &secret), handle).unwrap();
        drop(runtime);
        let (tx, rx) = std::sync::mpsc::channel();
        let done: Completion = Box::new(move |result| tx.send(result).unwrap());
        assert!(provider.exchange(request(code()), done).is_none());
        let result = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(matches!(result, Err(OAuthError::Unavailable(_))));
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
    }

    #[test]
    fn secret_file_errors_name_the_file() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-secret");
        let mut cfg = OAuthProviderConfig {
            name: "ext".into(),
            token_url: "https://auth.example/token".into(),
            client_id: "gateway".into(),
            client_secret_file: missing.clone(),
            ..OAuthProviderConfig::default()
        };
        let err = HttpProvider::new(&cfg, runtime.handle().clone()).unwrap_err();
        assert!(err.to_string().contains(&missing.display().to_string()));
        assert!(err.to_string().contains("`ext`"));

        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        cfg.client_secret_file = empty;
        let err = HttpProvider::new(&cfg, runtime.handle().clone()).unwrap_err();
        assert!(matches!(err, OAuthConfigError::EmptySecret { .. }), "{err}");

        cfg.client_secret_file = PathBuf::new();
        cfg.token_url = "ftp://auth.example/token".into();
        let err = HttpProvider::new(&cfg, runtime.handle().clone()).unwrap_err();
        assert!(matches!(err, OAuthConfigError::TokenUrl { .. }), "{err}");
    }

    #[test]
    fn token_responses() {
        let ok = classify(200, br#"{"access_token":"a","expires_in":60}"#).unwrap();
        assert_eq!(ok.refresh_token, "");
        assert_eq!(ok.expires_in, Some(60));
        let none = classify(200, br#"{"access_token":"a","refresh_token":null}"#).unwrap();
        assert_eq!(none.expires_in, None);
        assert!(matches!(
            classify(200, br#"{"access_token":"a","expires_in":-5}"#),
            Err(OAuthError::Unavailable(_))
        ));
        assert!(matches!(
            classify(200, br#"{"access_token":"a","expires_in":"soon"}"#),
            Err(OAuthError::Unavailable(_))
        ));
        assert!(matches!(
            classify(200, br#"{"token":"a"}"#),
            Err(OAuthError::Unavailable(_))
        ));
        assert!(matches!(
            classify(200, br#"{"error":"access_denied"}"#),
            Err(OAuthError::Rejected(_))
        ));
        for status in [400, 401, 403, 404, 409] {
            assert!(matches!(
                classify(status, b""),
                Err(OAuthError::Rejected(_))
            ));
        }
        for status in [302, 408, 429, 500, 502, 503] {
            assert!(matches!(
                classify(status, b""),
                Err(OAuthError::Unavailable(_))
            ));
        }
        let long = "x".repeat(1000);
        let Err(OAuthError::Unavailable(text)) = classify(503, long.as_bytes()) else {
            panic!("503 is unavailable");
        };
        assert!(text.len() < 300);
    }
}
