//! Sign-up, sign-in and token refresh against an external OAuth2 provider
//! (spec §4.8, §5.2, §5.6) whose signing keys the gateway finds through
//! OpenID discovery (spec §4.1); checklist items 17–19 and 35–36 with a
//! real token endpoint on loopback instead of the embedded authority, and
//! a signing-key rotation at that issuer.
//!
//! [`ExternalIssuer`] is the provider: axum on a tokio runtime of its own
//! serving `POST /oauth/token` (authorization-code and refresh-token
//! grants, one-time codes, opaque rotating refresh tokens, access tokens
//! signed by an [`Authority`] with `sub` = owner and the device-ID claim),
//! `GET /.well-known/openid-configuration` and `GET /.well-known/jwks.json`.
//! It records every token request, and can be told to refuse
//! (`400 invalid_grant`), to fail (`500`), or to stop listening.
//!
//! What it does not do: check client credentials (the tests read the form
//! fields it recorded instead) or speak TLS.

// Tests are the IO side: they time real sockets (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use coap_gateway::auth::authority::{Authority, AuthoritySettings, SigningKey};
use coap_gateway::auth::ClientAuth;
use coap_gateway::coap::{option, Code};
use coap_gateway::config::{Config, OAuthProviderConfig};
use common::ocf::{
    body, jwt_claims, now_unix, option_uint, text, OcfDevice, Request, DEVICE_ID_CLAIM, OCF_CBOR,
    OWNER,
};
use common::{Msg, TestGateway, TestPki, DEVICE_ID};
use serde_json::{json, Value};

/// The `authprovider` devices name (spec §5.2).
const EXT: &str = "ext";
/// The gateway's OAuth client ID at the provider.
const CLIENT_ID: &str = "gw";
/// Bound on one token-endpoint call (`providers[].timeout`).
const PROVIDER_TIMEOUT: Duration = Duration::from_secs(2);
/// spec §5.0: failures on `/oic/sec/*` close the connection ~10 ms after
/// the error response.
/// The gateway lingers `coap.close_linger` (2 s by default) after such an
/// answer so that the device reads it before the close (spec Appendix A.7).
const CLOSE_LIMIT: Duration = Duration::from_secs(4);
/// spec §5.0: the diagnostic prefix of a transient failure.
const TEMPORARY: &str = "temporary error: ";

// ---------------------------------------------------------------------------
// The external issuer.

/// How the token endpoint answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Grants what it knows, `400 invalid_grant` for what it does not.
    Tokens,
    /// `400 {"error":"invalid_grant"}` whatever the request.
    InvalidGrant,
    /// `500` with a text body.
    ServerError,
}

/// Who a code or refresh token was issued to.
#[derive(Debug, Clone)]
struct Grantee {
    owner: String,
    device_id: String,
}

/// One `POST /oauth/token` as the provider saw it.
#[derive(Debug, Clone)]
struct TokenRequest {
    content_type: Option<String>,
    /// The form fields in the order sent (RFC 6749 Appendix B encoding).
    fields: Vec<(String, String)>,
}

impl TokenRequest {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The fields sorted by name, for exact comparisons.
    fn sorted(&self) -> Vec<(String, String)> {
        let mut f = self.fields.clone();
        f.sort();
        f
    }
}

/// What a successful token response handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TokenPair {
    access: String,
    refresh: String,
}

/// The provider's state, shared with its handlers.
struct IssuerState {
    base_url: String,
    /// Signs the access tokens; replaced by a key rotation.
    authority: Mutex<Arc<Authority>>,
    /// What `/.well-known/jwks.json` serves.
    jwks: Mutex<Value>,
    answer: Mutex<Answer>,
    /// How long the token endpoint waits before answering.
    delay: Mutex<Duration>,
    codes: Mutex<HashMap<String, Grantee>>,
    refresh_tokens: Mutex<HashMap<String, Grantee>>,
    token_requests: Mutex<Vec<TokenRequest>>,
    issued: Mutex<Vec<TokenPair>>,
    discovery_fetches: AtomicUsize,
    jwks_fetches: AtomicUsize,
}

/// A poisoned lock means a handler panicked; the test fails on its own.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An OAuth2 authorization server on `127.0.0.1:<port>`; its issuer (and
/// base URL) is `http://127.0.0.1:<port>`.
struct ExternalIssuer {
    state: Arc<IssuerState>,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    // Last: the runtime goes after the handles of its tasks.
    runtime: tokio::runtime::Runtime,
}

impl ExternalIssuer {
    fn start() -> ExternalIssuer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("external-issuer")
            .enable_all()
            .build()
            .expect("tokio runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind the token server");
        let addr = listener.local_addr().expect("token server addr");
        let base_url = format!("http://{addr}");
        let authority = new_authority(&base_url);
        let state = Arc::new(IssuerState {
            jwks: Mutex::new(authority.jwks()),
            authority: Mutex::new(Arc::new(authority)),
            base_url,
            answer: Mutex::new(Answer::Tokens),
            delay: Mutex::new(Duration::ZERO),
            codes: Mutex::default(),
            refresh_tokens: Mutex::default(),
            token_requests: Mutex::default(),
            issued: Mutex::default(),
            discovery_fetches: AtomicUsize::new(0),
            jwks_fetches: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/oauth/token", post(token_endpoint))
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/.well-known/jwks.json", get(jwks))
            .with_state(Arc::clone(&state));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = runtime.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        });
        ExternalIssuer {
            state,
            addr,
            stop: Some(stop),
            server: Some(server),
            runtime,
        }
    }

    /// The issuer, as `iss` and as the gateway's `jwks_url` (spec §4.1:
    /// discovery under the issuer).
    fn issuer(&self) -> &str {
        &self.state.base_url
    }

    fn token_url(&self) -> String {
        format!("{}/oauth/token", self.state.base_url)
    }

    /// A one-time authorization code for `owner`'s [`DEVICE_ID`].
    fn issue_code(&self, owner: &str) -> String {
        let code = format!("code-{}", uuid::Uuid::new_v4());
        lock(&self.state.codes).insert(
            code.clone(),
            Grantee {
                owner: owner.to_owned(),
                device_id: DEVICE_ID.to_owned(),
            },
        );
        code
    }

    fn authority(&self) -> Arc<Authority> {
        Arc::clone(&lock(&self.state.authority))
    }

    fn answer(&self, answer: Answer) {
        *lock(&self.state.answer) = answer;
    }

    fn delay(&self, delay: Duration) {
        *lock(&self.state.delay) = delay;
    }

    fn token_requests(&self) -> Vec<TokenRequest> {
        lock(&self.state.token_requests).clone()
    }

    fn issued(&self) -> Vec<TokenPair> {
        lock(&self.state.issued).clone()
    }

    fn jwks_fetches(&self) -> usize {
        self.state.jwks_fetches.load(Ordering::SeqCst)
    }

    fn discovery_fetches(&self) -> usize {
        self.state.discovery_fetches.load(Ordering::SeqCst)
    }

    /// Key rotation: a new key (same issuer) signs from now on, and the
    /// key set lists the old and the new key.
    fn rotate_key(&self) -> Arc<Authority> {
        let next = Arc::new(new_authority(&self.state.base_url));
        let previous = self.authority();
        let mut keys = Vec::new();
        for authority in [&previous, &next] {
            keys.extend(
                authority.jwks()["keys"]
                    .as_array()
                    .expect("a JWKS has keys")
                    .iter()
                    .cloned(),
            );
        }
        *lock(&self.state.jwks) = json!({ "keys": keys });
        *lock(&self.state.authority) = Arc::clone(&next);
        next
    }

    /// Stops listening: the accept loop ends, idle connections (the
    /// gateway's pooled one) are closed, and the port refuses.
    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let done = self
                .runtime
                .block_on(async { tokio::time::timeout(Duration::from_secs(3), server).await });
            assert!(done.is_ok(), "the token server did not stop within 3 s");
        }
        assert!(
            TcpStream::connect(self.addr).is_err(),
            "the token server's port still accepts connections"
        );
    }
}

fn new_authority(issuer: &str) -> Authority {
    let key = SigningKey::generate().expect("signing key");
    // Default settings: `sub` = owner, the device ID in
    // `https://plgd.dev/deviceId`, no audience, one hour of life.
    let settings = AuthoritySettings::new(issuer);
    assert_eq!(settings.device_id_claim.as_deref(), Some(DEVICE_ID_CLAIM));
    Authority::new(key, settings).expect("external authority")
}

async fn discovery(State(state): State<Arc<IssuerState>>) -> Json<Value> {
    state.discovery_fetches.fetch_add(1, Ordering::SeqCst);
    let authority = Arc::clone(&lock(&state.authority));
    Json(authority.openid_configuration(&state.base_url))
}

async fn jwks(State(state): State<Arc<IssuerState>>) -> Json<Value> {
    state.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    Json(lock(&state.jwks).clone())
}

fn refuse(error: &str) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": error }))).into_response()
}

/// RFC 6749 §4.1.3 and §6, answered per §5.1 / §5.2.
async fn token_endpoint(
    State(state): State<Arc<IssuerState>>,
    headers: HeaderMap,
    form: String,
) -> Response {
    let request = TokenRequest {
        content_type: headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        fields: form_urlencoded::parse(form.as_bytes())
            .into_owned()
            .collect(),
    };
    lock(&state.token_requests).push(request.clone());
    let delay = *lock(&state.delay);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match *lock(&state.answer) {
        Answer::Tokens => {}
        Answer::InvalidGrant => return refuse("invalid_grant"),
        Answer::ServerError => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "database down").into_response()
        }
    }
    // Codes and refresh tokens are good for one use (refresh rotates).
    let grantee = match request.field("grant_type") {
        Some("authorization_code") => request
            .field("code")
            .and_then(|c| lock(&state.codes).remove(c)),
        Some("refresh_token") => request
            .field("refresh_token")
            .and_then(|r| lock(&state.refresh_tokens).remove(r)),
        _ => return refuse("unsupported_grant_type"),
    };
    let Some(grantee) = grantee else {
        return refuse("invalid_grant");
    };
    let authority = Arc::clone(&lock(&state.authority));
    let now = now_unix();
    let access = authority
        .issue_access_token(&grantee.owner, Some(&grantee.device_id), now)
        .expect("access token");
    let refresh = authority.issue_refresh_token().expect("refresh token");
    lock(&state.refresh_tokens).insert(refresh.clone(), grantee);
    lock(&state.issued).push(TokenPair {
        access: access.token.clone(),
        refresh: refresh.clone(),
    });
    Json(json!({
        "access_token": access.token,
        "token_type": "Bearer",
        "refresh_token": refresh,
        "expires_in": access.expires_at - now,
    }))
    .into_response()
}

// ---------------------------------------------------------------------------
// The gateway and the device.

fn provider(token_url: String) -> OAuthProviderConfig {
    OAuthProviderConfig {
        name: EXT.to_owned(),
        token_url,
        client_id: CLIENT_ID.to_owned(),
        timeout: PROVIDER_TIMEOUT,
        ..OAuthProviderConfig::default()
    }
}

/// Mutual TLS with identity certificates, no embedded authority: tokens
/// come from `issuer` (keys by discovery under its URL) through provider
/// [`EXT`].
fn external_config(pki: &TestPki, issuer: &ExternalIssuer) -> Config {
    let mut config = pki.config(ClientAuth::Identity);
    config.authority.enabled = false;
    config.authorization.jwks_url = issuer.issuer().to_owned();
    // Long enough that every fetch during a test is a start-up or an
    // on-demand one.
    config.authorization.jwks_refresh = Duration::from_secs(300);
    config.authorization.issuer = issuer.issuer().to_owned();
    config.authorization.providers = vec![provider(issuer.token_url())];
    config
}

/// The sign-up body IoTivity-Lite sends (spec Appendix A), for [`EXT`].
fn sign_up_body(code: &str) -> Value {
    json!({"di": DEVICE_ID, "accesstoken": code, "authprovider": EXT, "devicetype": "device"})
}

fn sign_up_request(code: &str) -> Request {
    Request::post("/oic/sec/account", &sign_up_body(code))
}

fn refresh_request(refresh_token: &str) -> Request {
    Request::post(
        "/oic/sec/tokenrefresh",
        &json!({
            "di": DEVICE_ID,
            "uid": OWNER,
            "refreshtoken": refresh_token,
            "authprovider": EXT,
            "granttype": "refresh_token",
        }),
    )
}

/// A sign-up or refresh answer's text field `key`.
fn field(b: &Value, key: &str) -> String {
    b[key]
        .as_str()
        .unwrap_or_else(|| panic!("no text {key} in {b}"))
        .to_owned()
}

/// A 2.04 sign-up answer: `(accesstoken, refreshtoken)`.
fn sign_up_ok(m: &Msg) -> TokenPair {
    assert_eq!(m.code, Code::CHANGED, "sign-up: {:?}", text(m));
    let b = body(m);
    TokenPair {
        access: field(&b, "accesstoken"),
        refresh: field(&b, "refreshtoken"),
    }
}

/// A 5.03 with the spec §5.0 diagnostic rules, `transient` saying whether
/// the `temporary error: ` prefix is due.
fn assert_5_03(m: &Msg, transient: bool, what: &str) {
    assert_eq!(m.code, Code::SERVICE_UNAVAILABLE, "{what}: {:?}", text(m));
    assert_eq!(
        option_uint(m, option::CONTENT_FORMAT),
        None,
        "{what}: spec §5.0, error responses carry no Content-Format"
    );
    assert_eq!(
        text(m).starts_with(TEMPORARY),
        transient,
        "{what}: spec §5.0 prefix rule; diagnostic {:?}",
        text(m)
    );
}

fn form(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut f: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    f.sort();
    f
}

/// Connects, signs up through [`EXT`] and signs in.
fn signed_in(gw: &TestGateway, pki: &TestPki, issuer: &ExternalIssuer) -> (OcfDevice, TokenPair) {
    let mut dev = OcfDevice::connect(gw, pki);
    let tokens = sign_up_ok(&dev.request(&sign_up_request(&issuer.issue_code(OWNER))));
    let m = dev.sign_in(OWNER, &tokens.access);
    assert_eq!(m.code, Code::CHANGED, "sign-in: {:?}", text(&m));
    dev.settle(Duration::from_millis(200));
    (dev, tokens)
}

// ---------------------------------------------------------------------------
// Sign-up (spec §5.2).

/// Checklist item 17 through an external provider: 2.04 with the
/// provider's tokens, the owner claim as `uid`, its `expires_in`, an empty
/// `redirecturi`; the token endpoint got exactly the RFC 6749 §4.1.3 form.
#[test]
fn item_17_sign_up_through_the_external_provider() {
    let pki = TestPki::new();
    let issuer = ExternalIssuer::start();
    let mut config = external_config(&pki, &issuer);
    // A confidential client with everything spec §4.8 lists.
    let secret = pki.data_dir().join("client-secret");
    std::fs::write(&secret, "s3cret &=+\n").expect("secret file");
    let ext = &mut config.authorization.providers[0];
    ext.client_secret_file = secret;
    ext.redirect_url = "https://app.example/cb?x=1".to_owned();
    ext.scopes = vec!["openid".to_owned(), "offline_access".to_owned()];
    let gw = TestGateway::start(&config);
    assert!(
        issuer.discovery_fetches() >= 1 && issuer.jwks_fetches() >= 1,
        "spec §4.1: keys found through {}/.well-known/openid-configuration",
        issuer.issuer()
    );

    let mut dev = OcfDevice::connect(&gw, &pki);
    let code = issuer.issue_code(OWNER);
    let m = dev.request(&sign_up_request(&code));
    assert_eq!(m.code, Code::CHANGED, "sign-up: {:?}", text(&m));
    assert_eq!(option_uint(&m, option::CONTENT_FORMAT), Some(OCF_CBOR));
    let b = body(&m);
    let issued = issuer.issued();
    assert_eq!(issued.len(), 1, "one token response");
    assert_eq!(field(&b, "accesstoken"), issued[0].access, "{b}");
    assert_eq!(field(&b, "refreshtoken"), issued[0].refresh, "{b}");
    assert_eq!(field(&b, "uid"), OWNER, "the owner (sub) claim: {b}");
    assert_eq!(b["redirecturi"], json!(""), "{b}");
    // spec §4.7: the provider's expires_in (3600), no margin.
    let expires_in = b["expiresin"].as_i64().expect("integer expiresin");
    assert!(
        (3590..=3600).contains(&expires_in),
        "expiresin {expires_in}"
    );
    let claims = jwt_claims(&issued[0].access);
    assert_eq!(claims["iss"], json!(issuer.issuer()));
    assert_eq!(claims[DEVICE_ID_CLAIM], json!(DEVICE_ID));

    let requests = issuer.token_requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(
        requests[0].content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(
        requests[0].sorted(),
        form(&[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("client_id", CLIENT_ID),
            ("client_secret", "s3cret &=+"),
            // The device redeeming the code (src/auth/oauth.rs: RFC 6749
            // §3.2 servers ignore what they do not know).
            ("device_id", DEVICE_ID),
            ("redirect_uri", "https://app.example/cb?x=1"),
            ("scope", "openid offline_access"),
        ]),
    );
    // spec §4.5: sign-up registers the device with its owner, and (§5.2)
    // does not sign the connection in, nor close it.
    assert!(gw.hub().owns(OWNER, DEVICE_ID));
    dev.assert_open();
    let m = dev.request(&Request::get("/oic/rd"));
    assert_eq!(m.code, Code::UNAUTHORIZED, "not signed in: {:?}", text(&m));
}

/// Checklist item 18 (hub issue #396): the same code twice on one
/// connection gives identical tokens from one exchange; two identical
/// sign-ups in flight at once share one exchange too (spec §4.8).
#[test]
fn item_18_same_code_twice_on_one_connection_is_exchanged_once() {
    let pki = TestPki::new();
    let issuer = ExternalIssuer::start();
    let gw = TestGateway::start(&external_config(&pki, &issuer));

    // One after the other. The provider's codes are one-time: a second
    // exchange would be refused.
    let mut dev = OcfDevice::connect(&gw, &pki);
    let code = issuer.issue_code(OWNER);
    let first = dev.request(&sign_up_request(&code));
    let second = dev.request(&sign_up_request(&code));
    assert_eq!(sign_up_ok(&first), sign_up_ok(&second));
    assert_eq!(first.payload, second.payload, "identical answers");
    assert_eq!(issuer.token_requests().len(), 1, "one exchange");
    dev.assert_open();

    // Both in flight while the provider takes its time.
    issuer.delay(Duration::from_millis(400));
    let mut dev = OcfDevice::connect(&gw, &pki);
    let code = issuer.issue_code(OWNER);
    let (t1, t2) = ([0xe1u8], [0xe2u8]);
    let mut both = sign_up_request(&code).encode(&t1);
    both.extend(sign_up_request(&code).encode(&t2));
    dev.send_raw(&both);
    let mut answers: HashMap<Vec<u8>, Msg> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while answers.len() < 2 {
        assert!(Instant::now() < deadline, "answers so far {answers:?}");
        let m = dev.dev.recv().expect("sign-up answers");
        if m.code.is_response() {
            answers.insert(m.token.clone(), m);
        }
    }
    let (a1, a2) = (&answers[&t1[..]], &answers[&t2[..]]);
    assert_eq!(sign_up_ok(a1), sign_up_ok(a2));
    assert_eq!(
        issuer.token_requests().len(),
        2,
        "one exchange for the two concurrent sign-ups: {:?}",
        issuer.token_requests()
    );
}

/// Checklist item 19: the provider unreachable → 5.03 (transient), then
/// the connection closes (spec §5.0).
#[test]
fn item_19_sign_up_with_the_token_endpoint_down_is_5_03_and_closes() {
    let pki = TestPki::new();
    let mut issuer = ExternalIssuer::start();
    let gw = TestGateway::start(&external_config(&pki, &issuer));
    let code = issuer.issue_code(OWNER);
    issuer.stop();
    let mut dev = OcfDevice::connect(&gw, &pki);
    let started = Instant::now();
    let m = dev.request(&sign_up_request(&code));
    assert_5_03(&m, true, "sign-up, provider down");
    assert!(
        started.elapsed() < PROVIDER_TIMEOUT + Duration::from_secs(1),
        "a refused connection is answered at once, took {:?}",
        started.elapsed()
    );
    dev.expect_closed(CLOSE_LIMIT);
    assert!(!gw.hub().owns(OWNER, DEVICE_ID));
}

/// spec §5.0: an OAuth HTTP 500 is transient → 5.03 `temporary error: `.
#[test]
fn sign_up_when_the_token_endpoint_answers_500_is_5_03_and_closes() {
    let pki = TestPki::new();
    let issuer = ExternalIssuer::start();
    let gw = TestGateway::start(&external_config(&pki, &issuer));
    issuer.answer(Answer::ServerError);
    let mut dev = OcfDevice::connect(&gw, &pki);
    let m = dev.request(&sign_up_request(&issuer.issue_code(OWNER)));
    assert_5_03(&m, true, "sign-up, provider 500");
    dev.expect_closed(CLOSE_LIMIT);
    assert_eq!(issuer.token_requests().len(), 1);
}

/// spec §5.2 table: a failed OAuth exchange is 5.03 — also when the
/// provider refuses the code (`400 invalid_grant`); being a 400, it is not
/// transient (§5.0), so no `temporary error: ` prefix.
#[test]
fn sign_up_with_a_refused_code_is_5_03_and_closes() {
    let pki = TestPki::new();
    let issuer = ExternalIssuer::start();
    let gw = TestGateway::start(&external_config(&pki, &issuer));
    // The provider refuses everything.
    issuer.answer(Answer::InvalidGrant);
    let mut dev = OcfDevice::connect(&gw, &pki);
    let m = dev.request(&sign_up_request(&issuer.issue_code(OWNER)));
    assert_5_03(&m, false, "sign-up, invalid_grant");
    dev.expect_closed(CLOSE_LIMIT);
    // A code the provider never issued.
    issuer.answer(Answer::Tokens);
    let mut dev = OcfDevice::connect(&gw, &pki);
    let m = dev.request(&sign_up_request("code-nobody-issued"));
    assert_5_03(&m, false, "sign-up, unknown code");
    dev.expect_closed(CLOSE_LIMIT);
    assert_eq!(issuer.token_requests().len(), 2);
    assert!(!gw.hub().owns(OWNER, DEVICE_ID));
}

// ---------------------------------------------------------------------------
// Sign-in and refresh (spec §5.4, §5.6).

/// Checklist item 35 through an external provider: sign-in with the
/// sign-up's token, then a refresh is a `refresh_token` grant (RFC 6749
/// §6) whose tokens come back in a 2.04 and sign in again.
#[test]
fn item_35_sign_in_then_refresh_through_the_external_provider() {
    let pki = TestPki::new();
    let issuer = ExternalIssuer::start();
    let gw = TestGateway::start(&external_config(&pki, &issuer));
    let mut dev = OcfDevice::connect(&gw, &pki);
    let code = issuer.issue_code(OWNER);
    let signed_up = sign_up_ok(&dev.request(&sign_up_request(&code)));
    let expires_in = dev.sign_in_ok(OWNER, &signed_up.access);
    // spec §4.7: exp − 2 × ownerCacheExpiration (1 min).
    assert!(
        (3470..=3480).contains(&expires_in),
        "sign-in expiresin {expires_in}"
    );
    dev.settle(Duration::from_millis(200));

    let m = dev.request(&refresh_request(&signed_up.refresh));
    assert_eq!(m.code, Code::CHANGED, "refresh: {:?}", text(&m));
    assert_eq!(option_uint(&m, option::CONTENT_FORMAT), Some(OCF_CBOR));
    let b = body(&m);
    let issued = issuer.issued();
    assert_eq!(issued.len(), 2, "sign-up and refresh");
    let refreshed = TokenPair {
        access: field(&b, "accesstoken"),
        refresh: field(&b, "refreshtoken"),
    };
    assert_eq!(refreshed, issued[1], "the provider's new tokens");
    assert_ne!(refreshed.access, signed_up.access);
    assert_ne!(refreshed.refresh, signed_up.refresh);
    let expires_in = b["expiresin"].as_i64().expect("integer expiresin");
    assert!(
        (3590..=3600).contains(&expires_in),
        "refresh expiresin {expires_in}"
    );

    let requests = issuer.token_requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(
        requests[0].sorted(),
        form(&[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("client_id", CLIENT_ID),
            ("device_id", DEVICE_ID),
        ]),
        "a public client without redirect URL or scopes"
    );
    assert_eq!(
        requests[1].content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(
        requests[1].sorted(),
        form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", &signed_up.refresh),
            ("client_id", CLIENT_ID),
        ]),
    );
    // IoTivity-Lite signs in again with the new token on the same
    // connection (spec §4.7).
    dev.sign_in_ok(OWNER, &refreshed.access);
    dev.assert_open();
}

/// Checklist item 36: refresh while the provider is down → 5.03
/// (transient), then the connection closes.
#[test]
fn item_36_refresh_with_the_token_endpoint_down_is_5_03_and_closes() {
    let pki = TestPki::new();
    let mut issuer = ExternalIssuer::start();
    let gw = TestGateway::start(&external_config(&pki, &issuer));
    let (mut dev, tokens) = signed_in(&gw, &pki, &issuer);
    issuer.stop();
    let m = dev.request(&refresh_request(&tokens.refresh));
    assert_5_03(&m, true, "refresh, provider down");
    dev.expect_closed(CLOSE_LIMIT);
}

/// spec §5.6 quirk (§14 item 3, kept): a refresh token the provider
/// refuses (`400 invalid_grant`) is 5.03, not 4.01; a 500 is 5.03 too.
/// On the way, the per-connection refresh cache (spec §4.8).
#[test]
fn refresh_refused_or_failing_at_the_provider_is_5_03_and_closes() {
    let pki = TestPki::new();
    let issuer = ExternalIssuer::start();
    let gw = TestGateway::start(&external_config(&pki, &issuer));
    let (mut dev, tokens) = signed_in(&gw, &pki, &issuer);
    let m = dev.request(&refresh_request(&tokens.refresh));
    assert_eq!(m.code, Code::CHANGED, "first refresh: {:?}", text(&m));
    let refreshed = TokenPair {
        access: field(&body(&m), "accesstoken"),
        refresh: field(&body(&m), "refreshtoken"),
    };
    // spec §4.8 refresh cache: the same refresh token again on this
    // connection is answered from the cache, without the provider (which
    // has rotated it away and would refuse it).
    let again = dev.request(&refresh_request(&tokens.refresh));
    assert_eq!(
        again.code,
        Code::CHANGED,
        "cached refresh: {:?}",
        text(&again)
    );
    assert_eq!(again.payload, m.payload, "the cached answer");
    assert_eq!(issuer.token_requests().len(), 2, "sign-up and one refresh");
    // A successful sign-in clears the cache (spec §4.8); now the rotated
    // refresh token reaches the provider, which refuses it.
    dev.sign_in_ok(OWNER, &refreshed.access);
    let m = dev.request(&refresh_request(&tokens.refresh));
    assert_5_03(&m, false, "refresh, invalid_grant");
    dev.expect_closed(CLOSE_LIMIT);
    assert_eq!(issuer.token_requests().len(), 3);
    let fresh = refreshed.refresh;

    issuer.answer(Answer::ServerError);
    let mut dev = OcfDevice::connect(&gw, &pki);
    let m = dev.request(&refresh_request(&fresh));
    assert_5_03(&m, true, "refresh, provider 500");
    dev.expect_closed(CLOSE_LIMIT);
}

// ---------------------------------------------------------------------------
// Key rotation at the issuer (spec §4.1).

/// The issuer rotates to a new key and publishes old + new; a token
/// signed with the new key names a `kid` the gateway has not seen, which
/// makes it fetch the key set again (spec §4.1). The device may get 5.03
/// first (and, the connection being closed, reconnects); within a few
/// seconds a sign-in succeeds, without waiting for the periodic refresh.
#[test]
fn a_token_signed_by_a_rotated_key_signs_in_after_the_refetch() {
    let pki = TestPki::new();
    let issuer = ExternalIssuer::start();
    let gw = TestGateway::start(&external_config(&pki, &issuer));
    let old_key = issuer.authority();
    {
        let mut dev = OcfDevice::connect(&gw, &pki);
        sign_up_ok(&dev.request(&sign_up_request(&issuer.issue_code(OWNER))));
    }
    let fetches_before = issuer.jwks_fetches();
    let new_key = issuer.rotate_key();
    assert_ne!(old_key.signing_key().kid(), new_key.signing_key().kid());
    let token = new_key
        .issue_access_token(OWNER, Some(DEVICE_ID), now_unix())
        .expect("token of the new key")
        .token;

    let (mut dev, _, failures) = retry_until_changed(&gw, &pki, "sign-in after rotation", |dev| {
        dev.sign_in(OWNER, &token)
    });
    for (code, diagnostic) in &failures {
        // A key the gateway does not know yet is transient, not 4.01.
        assert!(
            diagnostic.starts_with(TEMPORARY),
            "{code}: spec §5.0 prefix; {diagnostic:?}"
        );
    }
    assert!(
        issuer.jwks_fetches() > fetches_before,
        "the key set was fetched again on the unknown kid"
    );
    dev.settle(Duration::from_millis(200));

    // The old key is still published: its tokens still verify.
    let old_token = old_key
        .issue_access_token(OWNER, Some(DEVICE_ID), now_unix())
        .expect("token of the old key")
        .token;
    dev.sign_in_ok(OWNER, &old_token);
    // And the provider's tokens, now signed with the new key, refresh.
    let code = issuer.issue_code(OWNER);
    let tokens = sign_up_ok(&dev.request(&sign_up_request(&code)));
    let m = dev.request(&refresh_request(&tokens.refresh));
    assert_eq!(m.code, Code::CHANGED, "refresh: {:?}", text(&m));
    dev.sign_in_ok(OWNER, &field(&body(&m), "accesstoken"));
}

/// Retries `attempt` on a new connection each time (a 5.03 on
/// `/oic/sec/*` closes, spec §5.0) until it answers 2.04 or 5 s pass, as
/// IoTivity-Lite retries 5.03. Returns the connection of the success and
/// the failed attempts.
fn retry_until_changed(
    gw: &TestGateway,
    pki: &TestPki,
    what: &str,
    mut attempt: impl FnMut(&mut OcfDevice) -> Msg,
) -> (OcfDevice, Msg, Vec<(Code, String)>) {
    let started = Instant::now();
    let mut failures = Vec::new();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{what}: no 2.04 within 5 s; failed attempts {failures:?}"
        );
        let mut dev = OcfDevice::connect(gw, pki);
        let m = attempt(&mut dev);
        if m.code == Code::CHANGED {
            eprintln!(
                "{what}: 2.04 after {:?}; failed attempts {failures:?}",
                started.elapsed()
            );
            return (dev, m, failures);
        }
        failures.push((m.code, text(&m)));
        // Anything but 5.03 would make IoTivity-Lite give up (4.01: drop
        // its credentials) instead of retrying.
        assert_eq!(
            m.code,
            Code::SERVICE_UNAVAILABLE,
            "{what}: failed attempts {failures:?}"
        );
        dev.expect_closed(CLOSE_LIMIT);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A sign-up right after the issuer rotated its key: the exchanged token
/// names a `kid` the gateway has not fetched yet. The provider's code is
/// one-time, so the tokens of that first exchange are the only ones the
/// device can get for it; spec §4.1 (re-fetch on a cache miss, then
/// verify) lets the sign-up succeed, at worst after a retry.
///
/// The gateway answers 5.03 and closes, losing the exchanged tokens with
/// the connection's cache; every retry then gets `invalid_grant` (5.03)
/// and the device never signs up with that code.
#[test]
fn sign_up_after_a_key_rotation_succeeds() {
    let pki = TestPki::new();
    let issuer = ExternalIssuer::start();
    let gw = TestGateway::start(&external_config(&pki, &issuer));
    issuer.rotate_key();
    let code = issuer.issue_code(OWNER);
    let (_dev, m, _) = retry_until_changed(&gw, &pki, "sign-up after rotation", |dev| {
        dev.request(&sign_up_request(&code))
    });
    sign_up_ok(&m);
    assert!(gw.hub().owns(OWNER, DEVICE_ID));
}

/// The same for a refresh (spec §5.6): the provider rotates the refresh
/// token, so the answer to the first refresh after the key rotation is
/// the only one the device's refresh token can buy.
#[test]
fn refresh_after_a_key_rotation_succeeds() {
    let pki = TestPki::new();
    let issuer = ExternalIssuer::start();
    let gw = TestGateway::start(&external_config(&pki, &issuer));
    let (dev, tokens) = signed_in(&gw, &pki, &issuer);
    drop(dev);
    issuer.rotate_key();
    let (mut dev, m, _) = retry_until_changed(&gw, &pki, "refresh after rotation", |dev| {
        dev.request(&refresh_request(&tokens.refresh))
    });
    dev.sign_in_ok(OWNER, &field(&body(&m), "accesstoken"));
}
