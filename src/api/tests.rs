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
    AuthContext, CommandKind, CommandResult, ConnectionRef, Connections, Content, Hub, HubMessage,
    MemoryHub, Online, Protocol, ResourceChange, Status, StoredLink,
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

/// A device connection's authorization: the token's subject and ID too.
fn ctx(owner: &str, device_id: &str) -> AuthContext {
    AuthContext {
        owner: owner.into(),
        device_id: device_id.into(),
        subject: Some(owner.into()),
        token_id: Some(format!("jti-{device_id}")),
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
        let hub = Arc::new(MemoryHub::new());
        let closed = Arc::new(Closed::default());
        hub.set_connections(closed.clone());
        Fixture::around(hub, closed)
    }

    /// A fixture whose hub reaches device connections through `device`.
    fn with_device(reply: Reply) -> (Fixture, Arc<DeviceDouble>) {
        Fixture::with_device_on(MemoryHub::new(), reply)
    }

    /// [`Fixture::with_device`] on `hub` (e.g. a durable one, which keeps
    /// the event log).
    fn with_device_on(hub: MemoryHub, reply: Reply) -> (Fixture, Arc<DeviceDouble>) {
        let hub = Arc::new(hub);
        let device = Arc::new(DeviceDouble {
            hub: Arc::downgrade(&hub),
            reply: Mutex::new(reply),
            received: Mutex::new(Vec::new()),
        });
        hub.set_connections(device.clone());
        (Fixture::around(hub, Arc::new(Closed::default())), device)
    }

    fn around(hub: Arc<MemoryHub>, closed: Arc<Closed>) -> Fixture {
        let authority = authority();
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
                "metadata": {
                    "connection": {
                        "status": "ONLINE",
                        "connectedAt": 1_800_000_000_123_456_789u64,
                        "protocol": "COAPS_TCP",
                        "serviceId": "svc-1",
                        "id": "127.0.0.1:40000",
                        "localEndpoints": ["coaps+tcp://127.0.0.1:5684"]
                    },
                    "twinSynchronization": {"state": "OUT_OF_SYNC"},
                    "twinEnabled": true
                }
            },
            {
                "id": D2,
                "owner": "alice",
                "metadata": {
                    "connection": {"status": "OFFLINE", "localEndpoints": []},
                    "twinSynchronization": {"state": "OUT_OF_SYNC"},
                    "twinEnabled": true
                }
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
    // The answer was lost: the old one again within the reuse window
    // gets the same pair.
    let retried = f
        .api
        .token_form(&[("grant_type", "refresh_token"), ("refresh_token", &refresh)]);
    assert_eq!(retried.status, 200, "{:?}", retried.body);
    assert_eq!(
        retried.body["refresh_token"],
        refreshed.body["refresh_token"]
    );
    assert_eq!(retried.body["access_token"], refreshed.body["access_token"]);
    // JSON bodies are accepted too.
    let json_refresh = f.api.post(
        "/oauth/token",
        None,
        "application/json",
        &json!({"grant_type": "refresh_token", "refresh_token": next}).to_string(),
    );
    assert_eq!(json_refresh.status, 200, "{:?}", json_refresh.body);
    // Its successor was used: the old one no more.
    let stale = f
        .api
        .token_form(&[("grant_type", "refresh_token"), ("refresh_token", &refresh)]);
    assert_eq!(stale.status, 400);
    assert_eq!(stale.body["error"], "invalid_grant");
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
    let token = user(&first);
    assert!(shared.load().validate(&token, now).is_err());
    assert_eq!(api.owner(&token, now).unwrap(), "alice");
    // Again: from the tokens that passed.
    assert_eq!(api.owner(&token, now).unwrap(), "alice");
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
    assert!(
        api.owner(&token, now).is_err(),
        "a token that passed before the refresh is checked again"
    );
    assert!(api.owner(&user(&first), now).is_err());
    assert!(api.owner(&user(&second), now).is_ok());
    // An expired token is not taken from the tokens that passed.
    let short = second
        .issue_user_token("alice", Duration::from_secs(60), now)
        .unwrap()
        .token;
    assert!(api.owner(&short, now).is_ok());
    assert!(api.owner(&short, now + 3600).is_err());
}

// -- the twin, commands, events and hub metrics -----------------------------

/// How the device double answers a command.
#[derive(Debug, Clone)]
enum Reply {
    /// `command_result` with this status and content, from another thread
    /// (as a session would, after the device's response).
    Answer(Status, Content),
    /// Takes the command and never answers.
    Silent,
}

/// A device connection as the hub sees it: takes every message, records
/// it, and answers commands as `reply` says.
struct DeviceDouble {
    hub: std::sync::Weak<MemoryHub>,
    reply: Mutex<Reply>,
    received: Mutex<Vec<HubMessage>>,
}

impl DeviceDouble {
    fn answer(&self, reply: Reply) {
        *self.reply.lock().unwrap() = reply;
    }

    fn taken(&self) -> Vec<HubMessage> {
        std::mem::take(&mut *self.received.lock().unwrap())
    }
}

impl Connections for DeviceDouble {
    fn close(&self, _: ConnectionRef, _: &str) {}

    fn deliver(&self, connection: ConnectionRef, message: HubMessage) -> Result<(), HubMessage> {
        self.received.lock().unwrap().push(message.clone());
        let reply = self.reply.lock().unwrap().clone();
        if let (HubMessage::Command(command), Reply::Answer(status, content)) = (message, reply) {
            let hub = self.hub.clone();
            std::thread::spawn(move || {
                if let Some(hub) = hub.upgrade() {
                    let result = CommandResult {
                        correlation_id: command.correlation_id.clone(),
                        status,
                        content,
                        etag: Some(vec![9, 9]),
                    };
                    hub.command_result(&ctx("alice", &command.device_id), connection, result);
                }
            });
        }
        Ok(())
    }
}

fn cbor(value: Value) -> Content {
    Content {
        data: super::content::json_to_cbor(&value),
        content_format: 10000,
    }
}

impl Api {
    fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        content_type: &str,
        body: &[u8],
    ) -> Answer {
        let request = ureq::http::Request::builder()
            .method(method)
            .uri(self.url(path));
        let request = match token {
            Some(token) => request.header("Authorization", format!("Bearer {token}")),
            None => request,
        };
        let request = if content_type.is_empty() {
            request
        } else {
            request.header("Content-Type", content_type)
        };
        Api::answer(self.agent.run(request.body(body.to_vec()).unwrap()))
    }

    fn put_json(&self, path: &str, token: &str, body: &str) -> Answer {
        self.send("PUT", path, Some(token), "", body.as_bytes())
    }
}

/// alice's D1 reports /light/1 (CBOR), /json (JSON) and /text (text).
fn report_twin(hub: &MemoryHub) {
    let change = |href: &str, content: Content, sequence| ResourceChange {
        href: href.into(),
        content,
        status: Status::Ok,
        etag: Some(vec![1, 2, 3, 4]),
        resource_types: vec!["core.light".into()],
        sequence,
    };
    hub.resources_changed(
        &ctx("alice", D1),
        ConnectionRef(7),
        vec![
            change("/light/1", cbor(json!({"state": false, "power": 10})), 1),
            change(
                "/json",
                Content {
                    data: br#"{"a":[1,2]}"#.to_vec(),
                    content_format: 50,
                },
                2,
            ),
            change(
                "/text",
                Content {
                    data: b"hello".to_vec(),
                    content_format: 0,
                },
                3,
            ),
        ],
    )
    .unwrap();
    // A second report of /light/1: version 1.
    hub.resources_changed(
        &ctx("alice", D1),
        ConnectionRef(7),
        vec![change(
            "/light/1",
            cbor(json!({"state": true, "power": 40, "raw": null})),
            4,
        )],
    )
    .unwrap();
}

#[test]
fn the_twin_is_read_as_json() {
    let f = Fixture::new();
    f.populate();
    report_twin(&f.hub);
    let alice = f.user_token("alice");
    let light = f.api.get(
        &format!("/api/v1/devices/{D1}/resources/light/1"),
        Some(&alice),
    );
    assert_eq!(light.status, 200, "{:?}", light.body);
    let updated_at = light.body["updatedAt"].as_u64().unwrap();
    assert!(updated_at > 1_600_000_000_000_000_000, "{updated_at}");
    assert_eq!(
        light.body,
        json!({
            "deviceId": D1,
            "href": "/light/1",
            "resourceTypes": ["core.light"],
            "status": "OK",
            "content": {"state": true, "power": 40, "raw": null},
            "contentType": "application/vnd.ocf+cbor",
            "etag": "AQIDBA==",
            "version": 1,
            "updatedAt": updated_at,
        })
    );
    // The href with its slash, and the device ID in capitals, name the same.
    let same = f.api.get(
        &format!("/api/v1/devices/{}/resources//light/1", D1.to_uppercase()),
        Some(&alice),
    );
    assert_eq!(same.body, light.body);

    let json = f.api.get(
        &format!("/api/v1/devices/{D1}/resources/json"),
        Some(&alice),
    );
    assert_eq!(json.body["content"], json!({"a": [1, 2]}));
    assert_eq!(json.body["contentType"], "application/json");
    let text = f.api.get(
        &format!("/api/v1/devices/{D1}/resources/text"),
        Some(&alice),
    );
    assert_eq!(text.body["content"], "hello");

    let all = f
        .api
        .get(&format!("/api/v1/devices/{D1}/resources"), Some(&alice));
    assert_eq!(all.status, 200);
    let hrefs: Vec<&str> = all
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["href"].as_str().unwrap())
        .collect();
    assert_eq!(hrefs, ["/json", "/light/1", "/text"]);
    assert_eq!(all.body[1], light.body);
    let none = f
        .api
        .get(&format!("/api/v1/devices/{D2}/resources"), Some(&alice));
    assert_eq!((none.status, none.body), (200, json!([])));

    // Published without a value yet; not published; no href at all.
    assert_json_error(
        &f.api.get(
            &format!("/api/v1/devices/{D1}/resources/oic/d"),
            Some(&alice),
        ),
        503,
    );
    assert_json_error(
        &f.api.get(
            &format!("/api/v1/devices/{D1}/resources/nope"),
            Some(&alice),
        ),
        404,
    );
    assert_json_error(
        &f.api
            .get(&format!("/api/v1/devices/{D1}/resources/"), Some(&alice)),
        400,
    );
    assert_json_error(
        &f.api.get(
            &format!("/api/v1/devices/{D1}/resources/light/1?twin=maybe"),
            Some(&alice),
        ),
        400,
    );
}

/// Every new route, with a body where it takes one.
fn new_routes(device: &str) -> Vec<(&'static str, String, &'static str)> {
    vec![
        ("GET", format!("/api/v1/devices/{device}/resources"), ""),
        (
            "GET",
            format!("/api/v1/devices/{device}/resources/light/1"),
            "",
        ),
        (
            "GET",
            format!("/api/v1/devices/{device}/resources/light/1?twin=false"),
            "",
        ),
        (
            "PUT",
            format!("/api/v1/devices/{device}/resources/light/1"),
            r#"{"state":true}"#,
        ),
        (
            "POST",
            format!("/api/v1/devices/{device}/resource-links/light"),
            r#"{"x":1}"#,
        ),
        (
            "DELETE",
            format!("/api/v1/devices/{device}/resource-links/light/1"),
            "",
        ),
        (
            "GET",
            format!("/api/v1/devices/{device}/pending-commands"),
            "",
        ),
        (
            "DELETE",
            format!("/api/v1/devices/{device}/pending-commands/c-1"),
            "",
        ),
        (
            "PUT",
            format!("/api/v1/devices/{device}/metadata"),
            r#"{"twinEnabled":false}"#,
        ),
    ]
}

#[test]
fn new_routes_are_401_without_a_token_and_404_for_another_owner() {
    let f = Fixture::new();
    f.populate();
    report_twin(&f.hub);
    let bob = f.user_token("bob");
    for (method, path, body) in new_routes(D1) {
        let missing = f.api.send(method, &path, None, "", body.as_bytes());
        assert_json_error(&missing, 401);
        let bad = f
            .api
            .send(method, &path, Some("garbage"), "", body.as_bytes());
        assert_json_error(&bad, 401);
        let other = f.api.send(method, &path, Some(&bob), "", body.as_bytes());
        assert_json_error(&other, 404);
        assert!(
            other.body["message"]
                .as_str()
                .unwrap()
                .contains("not found"),
            "{method} {path}: {:?}",
            other.body
        );
    }
    assert_json_error(&f.api.get("/api/v1/events", None), 401);
    assert_json_error(&f.api.get("/api/v1/events", Some("garbage")), 401);
    // Nothing reached alice's device.
    assert_eq!(
        f.hub
            .stats()
            .commands_submitted
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert!(f.hub.device("alice", D1).unwrap().twin.enabled);
}

#[test]
fn a_command_for_an_offline_device_waits_and_can_be_canceled() {
    let f = Fixture::new();
    f.populate();
    let alice = f.user_token("alice");
    let path = format!("/api/v1/devices/{D2}/resources/light/1");
    let before = now_unix() * 1_000_000_000;
    let put = f.api.put_json(
        &format!("{path}?timeToLive=30s&correlationId=c-1&interface=oic.if.baseline"),
        &alice,
        r#"{"state": true}"#,
    );
    assert_eq!(put.status, 202, "{:?}", put.body);
    assert_eq!(put.body["correlationId"], "c-1");
    assert_eq!(put.body["status"], "PENDING");
    let valid_until = put.body["validUntil"].as_u64().unwrap();
    assert!(valid_until >= before + 30_000_000_000, "{valid_until}");
    assert!(valid_until < before + 40_000_000_000, "{valid_until}");
    // The same correlation ID again while the first waits: refused.
    assert_json_error(
        &f.api
            .put_json(&format!("{path}?correlationId=c-1"), &alice, "{}"),
        400,
    );
    // Without a correlation ID the API picks a UUID.
    let second = f.api.send(
        "DELETE",
        &format!("/api/v1/devices/{D2}/resource-links/light/1"),
        Some(&alice),
        "",
        b"",
    );
    assert_eq!(second.status, 202, "{:?}", second.body);
    let second_id = second.body["correlationId"].as_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&second_id).is_ok(), "{second_id}");

    let list = f.api.get(
        &format!("/api/v1/devices/{D2}/pending-commands"),
        Some(&alice),
    );
    assert_eq!(list.status, 200);
    let issued_at = list.body[0]["issuedAt"].as_u64().unwrap();
    assert!(issued_at >= before);
    assert_eq!(
        list.body[0],
        json!({
            "correlationId": "c-1",
            "deviceId": D2,
            "href": "/light/1",
            "operation": "update",
            "interface": "oic.if.baseline",
            "content": {"state": true},
            "contentType": "application/vnd.ocf+cbor",
            "validUntil": valid_until,
            "issuedAt": issued_at,
        })
    );
    assert_eq!(list.body[1]["operation"], "delete");
    assert_eq!(list.body[1]["correlationId"], second_id.as_str());
    assert_eq!(list.body.as_array().unwrap().len(), 2);

    let cancel = f.api.delete(
        &format!("/api/v1/devices/{D2}/pending-commands/c-1"),
        &alice,
    );
    assert_eq!(
        (cancel.status, cancel.body),
        (200, json!({"correlationId": "c-1"}))
    );
    let list = f.api.get(
        &format!("/api/v1/devices/{D2}/pending-commands"),
        Some(&alice),
    );
    assert_eq!(list.body.as_array().unwrap().len(), 1);
    assert_eq!(list.body[0]["correlationId"], second_id.as_str());
    assert_json_error(
        &f.api.delete(
            &format!("/api/v1/devices/{D2}/pending-commands/c-1"),
            &alice,
        ),
        404,
    );
}

#[test]
fn bad_command_requests_are_400_or_415() {
    let f = Fixture::new();
    f.populate();
    let alice = f.user_token("alice");
    let path = format!("/api/v1/devices/{D2}/resources/light/1");
    for (query, content_type, body, status) in [
        ("", "", "", 400),
        ("", "", "{not json", 400),
        ("", "application/xml", "<a/>", 415),
        ("", "application/cbor", "\u{a1}", 400),
        ("?timeToLive=forever", "", "{}", 400),
        ("?timeToLive=0s", "", "{}", 400),
        ("?correlationId=", "", "{}", 400),
    ] {
        let answer = f.api.send(
            "PUT",
            &format!("{path}{query}"),
            Some(&alice),
            content_type,
            body.as_bytes(),
        );
        assert_json_error(&answer, status);
    }
    assert_json_error(
        &f.api.send(
            "PUT",
            &format!("/api/v1/devices/{D2}/resources/"),
            Some(&alice),
            "",
            b"{}",
        ),
        400,
    );
    assert_json_error(
        &f.api.send(
            "POST",
            &format!("/api/v1/devices/{D2}/resource-links/"),
            Some(&alice),
            "",
            b"{}",
        ),
        400,
    );
    assert!(f.hub.pending_commands("alice", D2).unwrap().is_empty());
}

#[test]
fn a_command_for_an_online_device_answers_with_the_devices_answer() {
    let (f, device) = Fixture::with_device(Reply::Answer(
        Status::Ok,
        cbor(json!({"state": true, "power": 40})),
    ));
    f.populate();
    let alice = f.user_token("alice");
    let path = format!("/api/v1/devices/{D1}/resources/light/1");
    let put = f.api.put_json(
        &format!("{path}?interface=oic.if.baseline&correlationId=u-1"),
        &alice,
        r#"{"state": true}"#,
    );
    assert_eq!(put.status, 200, "{:?}", put.body);
    assert_eq!(
        put.body,
        json!({
            "correlationId": "u-1",
            "deviceId": D1,
            "href": "/light/1",
            "status": "OK",
            "content": {"state": true, "power": 40},
            "contentType": "application/vnd.ocf+cbor",
            "etag": "CQk=",
        })
    );
    let sent = device.taken();
    let [HubMessage::Command(command)] = sent.as_slice() else {
        panic!("{sent:?}");
    };
    assert_eq!(command.href, "/light/1");
    assert_eq!(command.interface.as_deref(), Some("oic.if.baseline"));
    assert_eq!(
        command.kind,
        CommandKind::Update {
            content: cbor(json!({"state": true}))
        }
    );

    // What `curl -d '{"state":false}'` sends: read as JSON.
    let curl = f.api.send(
        "PUT",
        &path,
        Some(&alice),
        "application/x-www-form-urlencoded",
        br#"{"state":false}"#,
    );
    assert_eq!(curl.status, 200, "{:?}", curl.body);
    let sent = device.taken();
    let [HubMessage::Command(command)] = sent.as_slice() else {
        panic!("{sent:?}");
    };
    assert_eq!(
        command.kind,
        CommandKind::Update {
            content: cbor(json!({"state": false}))
        }
    );

    // Raw CBOR in: sent as it came, with its content format.
    let raw = super::content::json_to_cbor(&json!({"power": 1}));
    let put = f
        .api
        .send("PUT", &path, Some(&alice), "application/cbor", &raw);
    assert_eq!(put.status, 200, "{:?}", put.body);
    let sent = device.taken();
    let [HubMessage::Command(command)] = sent.as_slice() else {
        panic!("{sent:?}");
    };
    assert_eq!(
        command.kind,
        CommandKind::Update {
            content: Content {
                data: raw,
                content_format: 60
            }
        }
    );

    // A read from the device, a create and a delete.
    let read = f.api.get(&format!("{path}?twin=false"), Some(&alice));
    assert_eq!(read.status, 200, "{:?}", read.body);
    assert_eq!(read.body["content"], json!({"state": true, "power": 40}));
    let create = f.api.send(
        "POST",
        &format!("/api/v1/devices/{D1}/resource-links/switches"),
        Some(&alice),
        "",
        br#"{"rt": ["oic.r.switch.binary"]}"#,
    );
    assert_eq!(create.status, 200, "{:?}", create.body);
    let delete = f.api.send(
        "DELETE",
        &format!("/api/v1/devices/{D1}/resource-links/switches/1"),
        Some(&alice),
        "",
        b"",
    );
    assert_eq!(delete.status, 200, "{:?}", delete.body);
    let kinds: Vec<(String, &'static str)> = device
        .taken()
        .iter()
        .map(|m| match m {
            HubMessage::Command(c) => (c.href.clone(), c.kind.operation().as_str()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("/light/1".to_owned(), "retrieve"),
            ("/switches".to_owned(), "create"),
            ("/switches/1".to_owned(), "delete"),
        ]
    );

    // The device says 4.04 (NOT_FOUND): the API says 404, with the answer.
    device.answer(Reply::Answer(Status::NotFound, Content::none()));
    let missing = f.api.put_json(&path, &alice, "{}");
    assert_json_error(&missing, 404);
    assert_eq!(missing.body["status"], "NOT_FOUND");
    assert_eq!(missing.body["content"], Value::Null);
    assert!(missing.body["correlationId"].is_string());
    device.answer(Reply::Answer(Status::Unavailable, Content::none()));
    assert_json_error(&f.api.put_json(&path, &alice, "{}"), 503);
    assert!(f.hub.pending_commands("alice", D1).unwrap().is_empty());
}

#[test]
fn a_command_the_device_does_not_answer_is_504_and_stays_in_the_hub() {
    let (f, device) = Fixture::with_device(Reply::Silent);
    f.populate();
    let alice = f.user_token("alice");
    let put = f.api.put_json(
        &format!("/api/v1/devices/{D1}/resources/light/1?timeToLive=200ms&correlationId=s-1"),
        &alice,
        "{}",
    );
    assert_json_error(&put, 504);
    assert_eq!(put.body["correlationId"], "s-1");
    assert_eq!(device.taken().len(), 1);
    let list = f.api.get(
        &format!("/api/v1/devices/{D1}/pending-commands"),
        Some(&alice),
    );
    assert_eq!(list.body[0]["correlationId"], "s-1");
    // Sent to the device: too late to cancel.
    assert_json_error(
        &f.api.delete(
            &format!("/api/v1/devices/{D1}/pending-commands/s-1"),
            &alice,
        ),
        409,
    );
}

#[test]
fn a_device_deleted_while_its_command_waits_is_404() {
    let (f, _device) = Fixture::with_device(Reply::Silent);
    f.populate();
    let alice = f.user_token("alice");
    let hub = f.hub.clone();
    let deleter = std::thread::spawn(move || {
        // Bounded: at most 5 s for the command to arrive.
        for _ in 0..500 {
            if !hub.pending_commands("alice", D1).unwrap().is_empty() {
                hub.delete_device("alice", D1).unwrap();
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    });
    let put = f.api.put_json(
        &format!("/api/v1/devices/{D1}/resources/light/1?timeToLive=5s"),
        &alice,
        "{}",
    );
    assert!(deleter.join().unwrap());
    assert_json_error(&put, 404);
    assert!(put.body["message"]
        .as_str()
        .unwrap()
        .contains("deleted before it answered"));
}

#[test]
fn metadata_turns_the_twin_off_and_on() {
    let (f, device) = Fixture::with_device(Reply::Silent);
    f.populate();
    let alice = f.user_token("alice");
    let path = format!("/api/v1/devices/{D1}/metadata");
    let off = f.api.put_json(&path, &alice, r#"{"twinEnabled": false}"#);
    assert_eq!(off.status, 200, "{:?}", off.body);
    assert_eq!(off.body["metadata"]["twinEnabled"], false);
    assert_eq!(
        off.body["metadata"]["twinSynchronization"]["state"],
        "DISABLED"
    );
    assert!(!f.hub.device("alice", D1).unwrap().twin.enabled);
    let device_json = f.api.get(&format!("/api/v1/devices/{D1}"), Some(&alice));
    assert_eq!(device_json.body, off.body);
    // spec §7.5: the online device's session hears of it.
    assert_eq!(
        device.taken(),
        [HubMessage::Twin {
            enabled: false,
            force: false
        }]
    );
    let on = f.api.put_json(
        &path,
        &alice,
        r#"{"twinEnabled": true, "twinForceSynchronization": true}"#,
    );
    assert_eq!(on.body["metadata"]["twinEnabled"], true);
    assert_eq!(
        device.taken(),
        [HubMessage::Twin {
            enabled: true,
            force: true
        }]
    );
    // Force alone keeps the setting.
    let force = f
        .api
        .put_json(&path, &alice, r#"{"twinForceSynchronization": true}"#);
    assert_eq!(force.body["metadata"]["twinEnabled"], true);
    assert_eq!(
        device.taken(),
        [HubMessage::Twin {
            enabled: true,
            force: true
        }]
    );
    for bad in ["", "{}", r#"{"twinEnabled": "yes"}"#, r#"{"other": 1}"#] {
        assert_json_error(&f.api.put_json(&path, &alice, bad), 400);
    }
    assert!(device.taken().is_empty());
}

/// Reads one server-sent event (skipping comments) as (event, id, data).
fn next_event(reader: &mut impl std::io::BufRead) -> (String, String, Value) {
    let (mut event, mut id, mut data) = (String::new(), String::new(), String::new());
    // Bounded: an event is a few lines.
    for _ in 0..64 {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "stream ended");
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            if !data.is_empty() {
                return (event, id, serde_json::from_str(&data).unwrap());
            }
            continue;
        }
        if let Some(v) = line.strip_prefix("event: ") {
            event = v.into();
        } else if let Some(v) = line.strip_prefix("id: ") {
            id = v.into();
        } else if let Some(v) = line.strip_prefix("data: ") {
            data.push_str(v);
        }
    }
    panic!("no event in 64 lines");
}

#[test]
fn events_stream_the_callers_devices() {
    let f = Fixture::new();
    f.populate();
    let alice = f.user_token("alice");
    let response = f
        .api
        .agent
        .get(f.api.url("/api/v1/events"))
        .header("Authorization", format!("Bearer {alice}"))
        .call()
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut reader = std::io::BufReader::new(response.into_body().into_reader());

    // bob's change is not alice's business; alice's twin change is.
    f.hub.set_twin_enabled("bob", D3, false, false).unwrap();
    report_twin(&f.hub);
    let (event, id, data) = next_event(&mut reader);
    assert_eq!(event, "resource_changed");
    assert!(id.parse::<u64>().unwrap() > 0, "{id}");
    assert_eq!(data["deviceId"], D1);
    assert!(data["at"].as_u64().unwrap() > 0);
    assert_eq!(
        data["auth"],
        json!({"owner": "alice", "subject": "alice", "tokenId": format!("jti-{D1}")}),
        "a device's change names the token its connection signed in with"
    );
    assert_eq!(data["href"], "/light/1");
    assert_eq!(data["content"], json!({"state": false, "power": 10}));
    assert_eq!(data["contentType"], "application/vnd.ocf+cbor");
    assert_eq!(data["etag"], "AQIDBA==");
    assert_eq!(data["version"], 0);
    let (event, next_id, data) = next_event(&mut reader);
    assert_eq!(
        (event.as_str(), &data["href"]),
        ("resource_changed", &json!("/json"))
    );
    assert!(next_id.parse::<u64>().unwrap() > id.parse::<u64>().unwrap());

    // A filter by device.
    let response = f
        .api
        .agent
        .get(f.api.url(&format!("/api/v1/events?deviceId={D2}")))
        .header("Authorization", format!("Bearer {alice}"))
        .call()
        .unwrap();
    let mut only_d2 = std::io::BufReader::new(response.into_body().into_reader());
    f.hub.set_twin_enabled("alice", D1, false, false).unwrap();
    f.hub.set_twin_enabled("alice", D2, false, false).unwrap();
    let (event, _, data) = next_event(&mut only_d2);
    assert_eq!(event, "twin_enabled");
    assert_eq!(
        data,
        json!({"deviceId": D2, "at": data["at"], "auth": {"owner": "alice"}, "enabled": false})
    );

    // Stopping the API ends the open streams instead of waiting for them.
    let (done, stopped) = std::sync::mpsc::channel();
    let Fixture { api, .. } = f;
    std::thread::spawn(move || {
        api.server.stop();
        let _ = done.send(());
    });
    stopped
        .recv_timeout(Duration::from_secs(5))
        .expect("the API stopped with event streams open");
    drop((reader, only_d2));
}

#[test]
fn metrics_count_the_hubs_work() {
    let (f, _device) = Fixture::with_device(Reply::Answer(Status::Ok, Content::none()));
    f.populate();
    report_twin(&f.hub);
    let alice = f.user_token("alice");
    assert_eq!(
        f.api
            .put_json(
                &format!("/api/v1/devices/{D1}/resources/light/1"),
                &alice,
                "{}"
            )
            .status,
        200
    );
    assert_eq!(
        f.api
            .put_json(
                &format!("/api/v1/devices/{D2}/resources/light/1"),
                &alice,
                "{}"
            )
            .status,
        202
    );
    let text = f.api.get("/metrics", None).body;
    let text = text.as_str().unwrap();
    for line in [
        "coapgw_hub_sign_ins_total 1",
        "coapgw_hub_notifications_total 4",
        "coapgw_hub_twin_updates_total 4",
        "coapgw_hub_commands_submitted_total 2",
        "coapgw_hub_commands_answered_total{status=\"OK\"} 1",
        "coapgw_hub_commands_answered_total{status=\"NOT_FOUND\"} 0",
        "coapgw_hub_commands_expired_total 0",
        "coapgw_hub_commands_canceled_total 0",
        "coapgw_hub_commands_queue_full_total 0",
        "coapgw_hub_commands_pending 1",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
    }
}

#[test]
fn every_command_kinds_answer_content_is_in_its_command_answered_event() {
    // Issue 13: what the device answered goes into the event log (and the
    // events stream) for update, retrieve, create and delete alike.
    let dir = tempfile::tempdir().unwrap();
    let answer = json!({"state": true, "power": 40});
    let (f, _device) = Fixture::with_device_on(
        MemoryHub::open(dir.path()).unwrap(),
        Reply::Answer(Status::Ok, cbor(answer.clone())),
    );
    f.populate();
    let alice = f.user_token("alice");
    let light = format!("/api/v1/devices/{D1}/resources/light/1");
    let links = format!("/api/v1/devices/{D1}/resource-links");
    let calls = [
        f.api.put_json(&light, &alice, r#"{"state": true}"#),
        f.api.get(&format!("{light}?twin=false"), Some(&alice)),
        f.api.send(
            "POST",
            &format!("{links}/switches"),
            Some(&alice),
            "",
            b"{}",
        ),
        f.api.send(
            "DELETE",
            &format!("{links}/switches/1"),
            Some(&alice),
            "",
            b"",
        ),
    ];
    for call in &calls {
        assert_eq!(call.status, 200, "{:?}", call.body);
    }
    let answered: Vec<(String, Value)> = f
        .hub
        .events_after("alice", 0, 1000)
        .unwrap()
        .iter()
        .filter(|e| e.kind.name() == "command_answered")
        .map(|e| {
            let shown = super::events::event_json(e);
            (
                shown["operation"].as_str().unwrap_or("?").to_owned(),
                shown["content"].clone(),
            )
        })
        .collect();
    let kinds: Vec<&str> = answered.iter().map(|(op, _)| op.as_str()).collect();
    assert_eq!(kinds, ["update", "retrieve", "create", "delete"]);
    for (op, content) in &answered {
        assert_eq!(content, &answer, "{op}");
    }
}

#[test]
fn a_reconnecting_event_client_gets_what_it_missed_then_live_events() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Arc::new(MemoryHub::open(dir.path()).unwrap());
    let closed = Arc::new(Closed::default());
    hub.set_connections(closed.clone());
    let f = Fixture::around(hub, closed);
    let alice = f.user_token("alice");
    f.hub.add_device(&ctx("alice", D1)).unwrap();
    f.hub.add_device(&ctx("bob", D3)).unwrap();
    f.hub.set_twin_enabled("alice", D1, false, false).unwrap();
    f.hub.set_twin_enabled("alice", D1, true, false).unwrap();
    let open = |last: &str| {
        let response = f
            .api
            .agent
            .get(f.api.url("/api/v1/events"))
            .header("Authorization", format!("Bearer {alice}"))
            .header("Last-Event-ID", last)
            .call()
            .unwrap();
        assert_eq!(response.status(), 200);
        std::io::BufReader::new(response.into_body().into_reader())
    };

    // From the start of the log: alice's three events, not bob's.
    let mut all = open("0");
    let (kind, first, _) = next_event(&mut all);
    assert_eq!(kind, "device_registered");
    let (kind, _, data) = next_event(&mut all);
    assert_eq!(
        (kind.as_str(), &data["enabled"]),
        ("twin_enabled", &json!(false))
    );
    let (kind, third, data) = next_event(&mut all);
    assert_eq!(
        (kind.as_str(), &data["enabled"]),
        ("twin_enabled", &json!(true))
    );

    // Reconnecting after the first: the two after it, then a live one,
    // each once.
    let mut resumed = open(&first);
    assert_eq!(next_event(&mut resumed).0, "twin_enabled");
    assert_eq!(next_event(&mut resumed).1, third);
    f.hub.set_twin_enabled("alice", D1, false, false).unwrap();
    let (kind, live, _) = next_event(&mut resumed);
    assert_eq!(kind, "twin_enabled");
    assert!(live.parse::<u64>().unwrap() > third.parse::<u64>().unwrap());

    // A Last-Event-ID that is no id of ours is refused.
    let bad = f
        .api
        .agent
        .get(f.api.url("/api/v1/events"))
        .header("Authorization", format!("Bearer {alice}"))
        .header("Last-Event-ID", "yesterday")
        .call()
        .unwrap();
    assert_eq!(bad.status(), 400);
}
