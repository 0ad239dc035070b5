//! The API over a loopback socket: an [`ApiServer`] on `127.0.0.1:0` with a
//! [`MemoryHub`] filled directly, the embedded authority with a fresh key,
//! and `ureq` as the client.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use super::bearer::ApiValidator;
use super::{now_unix, ApiServer, ApiState};
use crate::auth::authority::{Authority, AuthoritySettings, SigningKey};
use crate::auth::jwt::{AuthorizationMode, TokenValidator};
use crate::auth::provider::EmbeddedProvider;
use crate::auth::validator::SharedValidator;
use crate::hub::{
    AuthContext, ConnectionRef, Connections, Hub, MemoryHub, Online, Protocol, StoredLink,
};
use crate::ocf::rd::Policy;

const ISSUER: &str = "https://auth.test";
const D1: &str = "5bbc55bb-686f-4068-6c2d-75c4a8b4f49a";
const D2: &str = "6ccc55bb-686f-4068-6c2d-75c4a8b4f49b";
const D3: &str = "7ddd55bb-686f-4068-6c2d-75c4a8b4f49c";

/// Records the connections the hub closes.
#[derive(Default)]
struct Closed(Mutex<Vec<(ConnectionRef, String)>>);

impl Connections for Closed {
    fn close(&self, connection: ConnectionRef, reason: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((connection, reason.to_owned()));
    }

    fn deliver(
        &self,
        _: ConnectionRef,
        message: crate::hub::HubMessage,
    ) -> Result<(), crate::hub::HubMessage> {
        Err(message)
    }
}

impl Closed {
    fn taken(&self) -> Vec<(ConnectionRef, String)> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

fn authority() -> Arc<Authority> {
    Arc::new(
        Authority::new(
            SigningKey::generate().unwrap(),
            AuthoritySettings::new(ISSUER),
        )
        .unwrap(),
    )
}

/// The validator the shards would use: device-ID-claim mode, which the
/// API must not apply to its bearer tokens.
fn device_validator(authority: &Authority) -> Arc<SharedValidator> {
    let validator = TokenValidator::new(
        authority.key_set(),
        authority.validation_settings(AuthorizationMode::DeviceIdClaim),
    )
    .unwrap();
    Arc::new(SharedValidator::new(validator))
}

fn ctx(owner: &str, device_id: &str) -> AuthContext {
    AuthContext {
        owner: owner.into(),
        device_id: device_id.into(),
        ..AuthContext::default()
    }
}

struct Api {
    server: ApiServer,
    agent: ureq::Agent,
}

struct Answer {
    status: u16,
    headers: axum::http::HeaderMap,
    body: Value,
}

impl Api {
    fn start(state: ApiState) -> Api {
        let server = ApiServer::start("127.0.0.1:0".parse().unwrap(), state).unwrap();
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .new_agent();
        Api { server, agent }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.local_addr())
    }

    fn answer(response: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Answer {
        let mut response = response.unwrap();
        let status = response.status().as_u16();
        let mut headers = axum::http::HeaderMap::new();
        for (name, value) in response.headers() {
            headers.append(
                axum::http::HeaderName::from_bytes(name.as_str().as_bytes()).unwrap(),
                axum::http::HeaderValue::from_bytes(value.as_bytes()).unwrap(),
            );
        }
        let text = response.body_mut().read_to_string().unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Answer {
            status,
            headers,
            body,
        }
    }

    fn get(&self, path: &str, token: Option<&str>) -> Answer {
        let mut request = self.agent.get(self.url(path));
        if let Some(token) = token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        Api::answer(request.call())
    }

    fn get_with_authorization(&self, path: &str, authorization: &str) -> Answer {
        Api::answer(
            self.agent
                .get(self.url(path))
                .header("Authorization", authorization)
                .call(),
        )
    }

    fn delete(&self, path: &str, token: &str) -> Answer {
        Api::answer(
            self.agent
                .delete(self.url(path))
                .header("Authorization", format!("Bearer {token}"))
                .call(),
        )
    }

    fn post(&self, path: &str, token: Option<&str>, content_type: &str, body: &str) -> Answer {
        let mut request = self.agent.post(self.url(path));
        if let Some(token) = token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        if !content_type.is_empty() {
            request = request.content_type(content_type);
        }
        Api::answer(request.send(body))
    }

    fn token_form(&self, pairs: &[(&str, &str)]) -> Answer {
        Api::answer(
            self.agent
                .post(self.url("/oauth/token"))
                .send_form(pairs.iter().copied()),
        )
    }
}

/// A gateway's API with every part: hub, provider, validator.
struct Fixture {
    api: Api,
    hub: Arc<MemoryHub>,
    authority: Arc<Authority>,
    validator: Arc<SharedValidator>,
    closed: Arc<Closed>,
}

impl Fixture {
    fn new() -> Fixture {
        let authority = authority();
        let hub = Arc::new(MemoryHub::new());
        let closed = Arc::new(Closed::default());
        hub.set_connections(closed.clone());
        let validator = device_validator(&authority);
        let provider = Arc::new(EmbeddedProvider::new("plgd", authority.clone()));
        let state = ApiState::new(Vec::new(), Arc::new(AtomicBool::new(false)))
            .with_authority(authority.clone())
            .with_hub(hub.clone())
            .with_provider(provider)
            .with_validator(validator.clone());
        Fixture {
            api: Api::start(state),
            hub,
            authority,
            validator,
            closed,
        }
    }

    /// What `coap-gateway token user --owner` prints: no device-ID claim.
    fn user_token(&self, owner: &str) -> String {
        self.authority
            .issue_user_token(owner, Duration::from_secs(3600), now_unix())
            .unwrap()
            .token
    }

    /// alice: D1 online (connection 7) with two links, D2 never connected;
    /// bob: D3.
    fn populate(&self) {
        let hub = &self.hub;
        hub.add_device(&ctx("alice", D1)).unwrap();
        hub.add_device(&ctx("alice", D2)).unwrap();
        hub.add_device(&ctx("bob", D3)).unwrap();
        hub.set_online(
            &ctx("alice", D1),
            Online {
                connection: ConnectionRef(7),
                connected_at_ns: 1_800_000_000_123_456_789,
                protocol: Protocol::CoapsTcp,
                service_id: "svc-1".into(),
                connection_id: "127.0.0.1:40000".into(),
            },
        )
        .unwrap();
        hub.set_local_endpoints(
            D1,
            ConnectionRef(7),
            vec!["coaps+tcp://127.0.0.1:5684".into()],
        );
        let link = |href: &str, rt: &str| StoredLink {
            href: href.into(),
            device_id: D1.into(),
            instance_id: crate::ocf::rd::instance_id(href),
            resource_types: Some(vec![rt.into()]),
            interfaces: Some(vec!["oic.if.baseline".into()]),
            policy: Some(Policy {
                bit_mask: 3,
                ..Policy::default()
            }),
            endpoints: Some(vec![("coaps+tcp://127.0.0.1:5684".into(), Some(1))]),
            ..StoredLink::default()
        };
        hub.publish(
            &ctx("alice", D1),
            vec![link("/light/1", "core.light"), link("/oic/d", "oic.wk.d")],
        )
        .unwrap();
        // Expired: not shown.
        hub.publish(
            &ctx("alice", D1),
            vec![StoredLink {
                valid_until: Some(1),
                ..link("/gone", "x.gone")
            }],
        )
        .unwrap();
    }
}

fn assert_json_error(answer: &Answer, status: u16) {
    assert_eq!(answer.status, status, "{:?}", answer.body);
    assert_eq!(answer.body["code"], status, "{:?}", answer.body);
    assert!(answer.body["message"].is_string(), "{:?}", answer.body);
}

#[test]
fn requests_without_a_valid_bearer_token_are_401() {
    let f = Fixture::new();
    f.populate();
    let missing = f.api.get("/api/v1/devices", None);
    assert_json_error(&missing, 401);
    assert_eq!(
        missing.headers["www-authenticate"],
        r#"Bearer realm="coap-gateway""#
    );
    let basic = f
        .api
        .get_with_authorization("/api/v1/devices", "Basic YWxpY2U6eA==");
    assert_json_error(&basic, 401);

    let expired = f
        .authority
        .issue_user_token("alice", Duration::from_secs(60), now_unix() - 3600)
        .unwrap()
        .token;
    let foreign = authority()
        .issue_user_token("alice", Duration::from_secs(60), now_unix())
        .unwrap()
        .token;
    let code = f.authority.issue_code("alice", None, now_unix()).unwrap();
    for bad in [
        "garbage",
        "a.b.c",
        expired.as_str(),
        foreign.as_str(),
        code.as_str(),
    ] {
        for path in [
            "/api/v1/devices".to_owned(),
            format!("/api/v1/devices/{D1}"),
            format!("/api/v1/devices/{D1}/resource-links"),
        ] {
            let answer = f.api.get(&path, Some(bad));
            assert_json_error(&answer, 401);
            assert!(answer.headers["www-authenticate"]
                .to_str()
                .unwrap()
                .contains(r#"error="invalid_token""#));
        }
        assert_json_error(&f.api.delete(&format!("/api/v1/devices/{D1}"), bad), 401);
        assert_json_error(
            &f.api.post("/api/v1/authorization-codes", Some(bad), "", ""),
            401,
        );
    }
    assert!(f.hub.device("alice", D1).is_some(), "nothing was deleted");
    assert!(f.closed.taken().is_empty());
}

#[test]
fn devices_are_listed_and_read_per_owner() {
    let f = Fixture::new();
    f.populate();
    let alice = f.user_token("alice");
    let list = f.api.get("/api/v1/devices", Some(&alice));
    assert_eq!(list.status, 200, "{:?}", list.body);
    assert_eq!(
        list.body,
        json!([
            {
                "id": D1,
                "owner": "alice",
                "metadata": {"connection": {
                    "status": "ONLINE",
                    "connectedAt": 1_800_000_000_123_456_789u64,
                    "protocol": "COAPS_TCP",
                    "serviceId": "svc-1",
                    "id": "127.0.0.1:40000",
                    "localEndpoints": ["coaps+tcp://127.0.0.1:5684"]
                }}
            },
            {
                "id": D2,
                "owner": "alice",
                "metadata": {"connection": {"status": "OFFLINE", "localEndpoints": []}}
            }
        ])
    );
    let one = f.api.get(&format!("/api/v1/devices/{D1}"), Some(&alice));
    assert_eq!(one.status, 200);
    assert_eq!(one.body, list.body[0]);
    // Device IDs are UUIDs: either case names the device.
    let upper = f.api.get(
        &format!("/api/v1/devices/{}", D1.to_uppercase()),
        Some(&alice),
    );
    assert_eq!(upper.body, list.body[0]);

    // Another owner's device does not exist for alice, and the other way.
    assert_json_error(
        &f.api.get(&format!("/api/v1/devices/{D3}"), Some(&alice)),
        404,
    );
    let bob = f.user_token("bob");
    let bobs = f.api.get("/api/v1/devices", Some(&bob));
    assert_eq!(bobs.body.as_array().unwrap().len(), 1);
    assert_eq!(bobs.body[0]["id"], D3);
    assert_json_error(
        &f.api.get(&format!("/api/v1/devices/{D1}"), Some(&bob)),
        404,
    );
    assert_json_error(
        &f.api.get("/api/v1/devices/no-such-device", Some(&bob)),
        404,
    );
    let nobody = f.api.get("/api/v1/devices", Some(&f.user_token("carol")));
    assert_eq!((nobody.status, nobody.body), (200, json!([])));
}

#[test]
fn delete_removes_the_device_and_closes_its_connection() {
    let f = Fixture::new();
    f.populate();
    let alice = f.user_token("alice");
    let bob = f.user_token("bob");

    // bob cannot delete alice's device, nor learn that it exists.
    assert_json_error(&f.api.delete(&format!("/api/v1/devices/{D1}"), &bob), 404);
    assert!(f.closed.taken().is_empty());
    assert!(f.hub.device("alice", D1).is_some());

    let deleted = f.api.delete(&format!("/api/v1/devices/{D1}"), &alice);
    assert_eq!(deleted.status, 200, "{:?}", deleted.body);
    assert_eq!(deleted.body, json!({ "deviceIds": [D1] }));
    assert_eq!(
        f.closed.taken(),
        vec![(ConnectionRef(7), "device deleted".to_owned())]
    );
    assert!(f.hub.device("alice", D1).is_none());
    assert_json_error(
        &f.api.get(&format!("/api/v1/devices/{D1}"), Some(&alice)),
        404,
    );
    assert_json_error(&f.api.delete(&format!("/api/v1/devices/{D1}"), &alice), 404);

    // An offline device is removed without closing anything.
    let deleted = f.api.delete(&format!("/api/v1/devices/{D2}"), &alice);
    assert_eq!(deleted.status, 200);
    assert!(f.closed.taken().is_empty());
    let list = f.api.get("/api/v1/devices", Some(&alice));
    assert_eq!(list.body, json!([]));
    assert!(f.hub.device("bob", D3).is_some());
}

#[test]
fn resource_links_are_the_published_ocf_links() {
    let f = Fixture::new();
    f.populate();
    let alice = f.user_token("alice");
    let links = f.api.get(
        &format!("/api/v1/devices/{D1}/resource-links"),
        Some(&alice),
    );
    assert_eq!(links.status, 200, "{:?}", links.body);
    let link = |href: &str, rt: &str| {
        json!({
            "href": href,
            "rt": [rt],
            "if": ["oic.if.baseline"],
            "p": {"bm": 3},
            "eps": [{"ep": "coaps+tcp://127.0.0.1:5684", "pri": 1}],
            "di": D1,
            "ins": crate::ocf::rd::instance_id(href),
        })
    };
    // In href order; the expired link is not shown.
    assert_eq!(
        links.body,
        json!([link("/light/1", "core.light"), link("/oic/d", "oic.wk.d")])
    );
    let none = f.api.get(
        &format!("/api/v1/devices/{D2}/resource-links"),
        Some(&alice),
    );
    assert_eq!((none.status, none.body), (200, json!([])));
    assert_json_error(
        &f.api.get(
            &format!("/api/v1/devices/{D1}/resource-links"),
            Some(&f.user_token("bob")),
        ),
        404,
    );
    assert_json_error(
        &f.api.get(
            &format!("/api/v1/devices/{D3}/resource-links"),
            Some(&alice),
        ),
        404,
    );
}

#[test]
fn a_code_from_the_api_is_redeemed_and_refreshed_at_the_token_endpoint() {
    let f = Fixture::new();
    let alice = f.user_token("alice");
    let issued = f
        .api
        .post("/api/v1/authorization-codes", Some(&alice), "", "");
    assert_eq!(issued.status, 200, "{:?}", issued.body);
    assert_eq!(issued.body["expiresIn"], 600);
    let code = issued.body["code"].as_str().unwrap().to_owned();

    let tokens = f.api.token_form(&[
        ("grant_type", "authorization_code"),
        ("code", &code),
        ("client_id", "ignored"),
    ]);
    assert_eq!(tokens.status, 200, "{:?}", tokens.body);
    assert_eq!(tokens.headers["cache-control"], "no-store");
    assert_eq!(tokens.headers["pragma"], "no-cache");
    assert_eq!(tokens.body["token_type"], "Bearer");
    assert_eq!(tokens.body["expires_in"], 3600);
    let access = tokens.body["access_token"].as_str().unwrap().to_owned();
    let refresh = tokens.body["refresh_token"].as_str().unwrap().to_owned();
    // The access token is alice's and works as a bearer token.
    assert_eq!(f.api.get("/api/v1/devices", Some(&access)).status, 200);

    // One-time codes.
    let again = f
        .api
        .token_form(&[("grant_type", "authorization_code"), ("code", &code)]);
    assert_eq!(again.status, 400);
    assert_eq!(again.body["error"], "invalid_grant");

    // Refresh rotates: the new one works, the old one no more.
    let refreshed = f
        .api
        .token_form(&[("grant_type", "refresh_token"), ("refresh_token", &refresh)]);
    assert_eq!(refreshed.status, 200, "{:?}", refreshed.body);
    let next = refreshed.body["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(next, refresh);
    assert_eq!(
        f.api
            .get("/api/v1/devices", refreshed.body["access_token"].as_str())
            .status,
        200
    );
    let stale = f
        .api
        .token_form(&[("grant_type", "refresh_token"), ("refresh_token", &refresh)]);
    assert_eq!(stale.status, 400);
    assert_eq!(stale.body["error"], "invalid_grant");
    // JSON bodies are accepted too.
    let json_refresh = f.api.post(
        "/oauth/token",
        None,
        "application/json",
        &json!({"grant_type": "refresh_token", "refresh_token": next}).to_string(),
    );
    assert_eq!(json_refresh.status, 200, "{:?}", json_refresh.body);
}

#[test]
fn a_code_bound_to_a_device_needs_that_device_at_the_token_endpoint() {
    let f = Fixture::new();
    let alice = f.user_token("alice");
    let issued = f.api.post(
        "/api/v1/authorization-codes",
        Some(&alice),
        "application/json",
        &json!({ "deviceId": D1 }).to_string(),
    );
    assert_eq!(issued.status, 200, "{:?}", issued.body);
    let code = issued.body["code"].as_str().unwrap().to_owned();
    for device in [None, Some(D2)] {
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
        ];
        form.extend(device.map(|d| ("device_id", d)));
        let refused = f.api.token_form(&form);
        assert_eq!(refused.status, 400, "{:?}", refused.body);
        assert_eq!(refused.body["error"], "invalid_grant");
        let description = refused.body["error_description"].as_str().unwrap();
        assert!(
            description.contains(D1) && !description.contains('"'),
            "{description}"
        );
    }
    let tokens = f.api.token_form(&[
        ("grant_type", "authorization_code"),
        ("code", &code),
        ("device_id", D1),
    ]);
    assert_eq!(tokens.status, 200, "{:?}", tokens.body);
    // A device token: the shards' validator (device-ID-claim mode) takes it.
    let verified = f
        .validator
        .load()
        .validate(tokens.body["access_token"].as_str().unwrap(), now_unix())
        .unwrap();
    assert_eq!(verified.owner(), "alice");
    assert_eq!(verified.device_id_claim(), Some(D1));

    // Deleting the device also ends its refresh tokens.
    f.hub.add_device(&ctx("alice", D1)).unwrap();
    assert_eq!(
        f.api
            .delete(&format!("/api/v1/devices/{D1}"), &alice)
            .status,
        200
    );
    let refresh = tokens.body["refresh_token"].as_str().unwrap();
    let revoked = f
        .api
        .token_form(&[("grant_type", "refresh_token"), ("refresh_token", refresh)]);
    assert_eq!(revoked.body["error"], "invalid_grant");

    let bad_body = f.api.post(
        "/api/v1/authorization-codes",
        Some(&alice),
        "application/json",
        "{\"deviceId\": 5}",
    );
    assert_json_error(&bad_body, 400);
    let empty_id = f.api.post(
        "/api/v1/authorization-codes",
        Some(&alice),
        "application/json",
        "{\"deviceId\": \"\"}",
    );
    assert_json_error(&empty_id, 400);
}

#[test]
fn token_endpoint_errors_follow_rfc_6749() {
    let f = Fixture::new();
    let expired_code = f
        .authority
        .issue_code("alice", None, now_unix() - 3600)
        .unwrap();
    let cases: [(&[(&str, &str)], &str); 6] = [
        (&[], "invalid_request"),
        (&[("code", "x")], "invalid_request"),
        (&[("grant_type", "password")], "unsupported_grant_type"),
        (&[("grant_type", "authorization_code")], "invalid_request"),
        (
            &[("grant_type", "authorization_code"), ("code", "not-a-code")],
            "invalid_grant",
        ),
        (
            &[
                ("grant_type", "authorization_code"),
                ("code", &expired_code),
            ],
            "invalid_grant",
        ),
    ];
    for (form, error) in cases {
        let answer = f.api.token_form(form);
        assert_eq!(answer.status, 400, "{form:?}: {:?}", answer.body);
        assert_eq!(answer.body["error"], error, "{form:?}: {:?}", answer.body);
        assert!(answer.body["error_description"].is_string());
    }
    let unknown_refresh = f
        .api
        .token_form(&[("grant_type", "refresh_token"), ("refresh_token", "nope")]);
    assert_eq!(unknown_refresh.body["error"], "invalid_grant");
    let missing_refresh = f.api.token_form(&[("grant_type", "refresh_token")]);
    assert_eq!(missing_refresh.body["error"], "invalid_request");
    let repeated = f.api.post(
        "/oauth/token",
        None,
        "application/x-www-form-urlencoded",
        "grant_type=refresh_token&grant_type=authorization_code",
    );
    assert_eq!(repeated.body["error"], "invalid_request");
    let text = f.api.post(
        "/oauth/token",
        None,
        "text/plain",
        "grant_type=refresh_token",
    );
    assert_eq!(
        (text.status, &text.body["error"]),
        (400, &json!("invalid_request"))
    );
    let not_json = f.api.post("/oauth/token", None, "application/json", "{");
    assert_eq!(not_json.body["error"], "invalid_request");
}

#[test]
fn routes_whose_parts_are_missing_say_so() {
    let draining = Arc::new(AtomicBool::new(false));
    let bare = Api::start(ApiState::new(Vec::new(), draining.clone()));
    assert_json_error(&bare.get("/api/v1/devices", Some("x")), 503);
    // Without the embedded authority its routes do not exist.
    assert_json_error(
        &bare.token_form(&[("grant_type", "refresh_token"), ("refresh_token", "x")]),
        404,
    );
    assert_json_error(&bare.get("/.well-known/jwks.json", None), 404);

    let authority = authority();
    let token = authority
        .issue_user_token("alice", Duration::from_secs(60), now_unix())
        .unwrap()
        .token;
    let no_hub = Api::start(
        ApiState::new(Vec::new(), draining.clone())
            .with_authority(authority.clone())
            .with_validator(device_validator(&authority)),
    );
    assert_json_error(&no_hub.get("/api/v1/devices", Some(&token)), 503);
    assert_json_error(
        &no_hub.delete(&format!("/api/v1/devices/{D1}"), &token),
        503,
    );
    // An authority but no provider to exchange tokens with.
    assert_json_error(
        &no_hub.token_form(&[("grant_type", "refresh_token"), ("refresh_token", "x")]),
        503,
    );
    // Codes only need the authority.
    let code = no_hub.post("/api/v1/authorization-codes", Some(&token), "", "");
    assert_eq!(code.status, 200, "{:?}", code.body);

    // The authority of a provider serves the discovery documents too.
    let via_provider = Api::start(
        ApiState::new(Vec::new(), draining)
            .with_provider(Arc::new(EmbeddedProvider::new("plgd", authority.clone())))
            .with_validator(device_validator(&authority)),
    );
    assert_eq!(via_provider.get("/.well-known/jwks.json", None).status, 200);
    let no_authority = Api::start(
        ApiState::new(Vec::new(), Arc::new(AtomicBool::new(false)))
            .with_validator(device_validator(&authority)),
    );
    assert_json_error(
        &no_authority.post("/api/v1/authorization-codes", Some(&token), "", ""),
        404,
    );
}

#[test]
fn the_other_routes_keep_working() {
    let f = Fixture::new();
    assert_eq!(f.api.get("/healthz", None).body, json!({"status": "ok"}));
    assert_json_error(&f.api.get("/readyz", None), 503);
    assert_eq!(
        f.api.get("/.well-known/openid-configuration", None).body["issuer"],
        ISSUER
    );
    assert_json_error(&f.api.get("/no/such/route", None), 404);
    let wrong_method = f.api.post("/api/v1/devices", None, "", "");
    assert_json_error(&wrong_method, 405);
    assert_eq!(wrong_method.headers["allow"], "GET,HEAD");
}

#[test]
fn the_api_validator_follows_key_refreshes_and_ignores_the_device_claim() {
    let first = authority();
    let shared = device_validator(&first);
    let api = ApiValidator::new(shared.clone());
    let now = now_unix();
    let user = |a: &Authority| {
        a.issue_user_token("alice", Duration::from_secs(60), now)
            .unwrap()
            .token
    };
    // The shards' validator refuses a user token; the API takes it.
    assert!(shared.load().validate(&user(&first), now).is_err());
    assert_eq!(api.validate(&user(&first), now).unwrap().owner(), "alice");
    let a = api.current().unwrap();
    assert!(Arc::ptr_eq(&a, &api.current().unwrap()), "cached");
    assert_eq!(a.settings().mode, AuthorizationMode::ValidToken);

    // New keys (same issuer): the next request uses them.
    let second = Arc::new(
        Authority::new(
            SigningKey::generate().unwrap(),
            AuthoritySettings::new(ISSUER),
        )
        .unwrap(),
    );
    shared.set_keys(second.key_set());
    assert!(!Arc::ptr_eq(&a, &api.current().unwrap()));
    assert!(api.validate(&user(&first), now).is_err());
    assert!(api.validate(&user(&second), now).is_ok());
}
