//! OAuth2 token providers as the sessions use them (spec §4.8): sign-up
//! exchanges an authorization code for tokens, refresh exchanges a refresh
//! token. The embedded authority validates and signs on the shard and
//! answers once its grant store has the grant (at once in memory, later
//! with a durable store); an external provider answers later, from the
//! control plane. Late answers go through a [`Completion`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::authority::{Authority, AuthorityError};
use super::grants::{
    token_hash, Done, GrantPolicy, GrantRecord, GrantStore, MemoryGrants, Mint, Minted, Redemption,
};

/// The name devices send in `authprovider` for the embedded authority
/// unless configured otherwise (IoTivity-Lite's `cloud_server` sends
/// `plgd`, spec Appendix A).
pub const DEFAULT_EMBEDDED_PROVIDER: &str = "plgd";

/// What a provider hands back (spec §5.2 / §5.6 responses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSet {
    pub access_token: String,
    /// Empty when the provider sent none (sign-up then fails with 4.01).
    pub refresh_token: String,
    /// The token endpoint's `expires_in`, seconds; `None` = no expiry.
    pub expires_in: Option<u64>,
}

/// The grant a session asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    AuthorizationCode(String),
    RefreshToken(String),
}

/// One exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeRequest {
    pub grant: Grant,
    /// The device asking: the certificate's ID with mutual TLS, else the
    /// request's `di` (spec §4.3). A code bound to a device must match it.
    pub device_id: String,
    /// Unix seconds.
    pub now_unix: u64,
}

/// Why an exchange failed. Sign-up and refresh answer 5.03 either way
/// (spec §5.2, §5.6 and its quirk, §14 item 3 kept); the distinction is
/// for the diagnostic and the `temporary error: ` prefix of spec §5.0.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OAuthError {
    /// The provider answered and refused (OAuth `invalid_grant` and the
    /// like, HTTP 400/401/403/404/409).
    #[error("{0}")]
    Rejected(String),
    /// The provider could not be reached or failed (network, timeout, 5xx).
    #[error("{0}")]
    Unavailable(String),
}

/// Where a late answer goes: called once, from any thread.
pub type Completion = Box<dyn FnOnce(Result<TokenSet, OAuthError>) + Send>;

/// An OAuth2 provider (spec §4.8).
pub trait TokenProvider: Send + Sync {
    /// The name devices use in `authprovider`.
    fn name(&self) -> &str;

    /// Starts an exchange. `Some` is the answer now (and `done` is
    /// dropped); `None` means `done` will be called with it later.
    fn exchange(
        &self,
        request: ExchangeRequest,
        done: Completion,
    ) -> Option<Result<TokenSet, OAuthError>>;

    /// Sign-off: forget the refresh tokens of a device (best effort).
    fn revoke_device(&self, _device_id: &str) {}
}

/// How long the blocking helpers ([`EmbeddedProvider::redeem`],
/// [`EmbeddedProvider::refresh`]) wait for the grant store.
const BLOCKING_WAIT: Duration = Duration::from_secs(15);

/// The embedded authority as an OAuth2 provider: codes from `coap-gateway
/// token code` become access tokens (with the owner and device-ID claims)
/// and opaque refresh tokens; refresh rotates the refresh token, with a
/// reuse window for a device whose answer was lost. The same object
/// serves `POST /oauth/token` on the API.
///
/// Validation and signing happen here, on the caller's thread; the
/// bookkeeping (used codes, refresh grants) is the [`GrantStore`]'s: the
/// hub's store (durable, shared by NATS nodes) or [`MemoryGrants`]. A
/// durable store answers late, so [`TokenProvider::exchange`] then
/// returns `None` and completes from the store's thread.
pub struct EmbeddedProvider {
    name: String,
    authority: Arc<Authority>,
    grants: Arc<dyn GrantStore>,
    policy: GrantPolicy,
}

impl std::fmt::Debug for EmbeddedProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedProvider")
            .field("name", &self.name)
            .field("grants", &self.grants)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl EmbeddedProvider {
    /// With grants in memory only (tests, `serve --memory`) and the
    /// default policy.
    pub fn new(name: impl Into<String>, authority: Arc<Authority>) -> EmbeddedProvider {
        EmbeddedProvider::with_grants(
            name,
            authority,
            Arc::new(MemoryGrants::new()),
            GrantPolicy::default(),
        )
    }

    /// With grants kept by `grants` (the hub's, see `Hub::grants`).
    pub fn with_grants(
        name: impl Into<String>,
        authority: Arc<Authority>,
        grants: Arc<dyn GrantStore>,
        policy: GrantPolicy,
    ) -> EmbeddedProvider {
        EmbeddedProvider {
            name: name.into(),
            authority,
            grants,
            policy,
        }
    }

    pub fn authority(&self) -> &Arc<Authority> {
        &self.authority
    }

    pub fn grants(&self) -> &Arc<dyn GrantStore> {
        &self.grants
    }

    pub fn policy(&self) -> GrantPolicy {
        self.policy
    }

    /// The `authorization_code` grant. `device_id` is the device redeeming
    /// the code (`None` from the HTTP token endpoint when the client sent
    /// none; a code bound to a device then fails). `done` is called once,
    /// maybe before this returns, maybe later from the store's thread.
    pub fn start_redeem(
        &self,
        code: &str,
        device_id: Option<&str>,
        now_unix: u64,
        done: Done<TokenSet>,
    ) {
        let rejected = |e: AuthorityError| OAuthError::Rejected(e.to_string());
        let issued = (|| {
            let grant = self.authority.redeem_code(code, device_id, now_unix)?;
            // The access token names the device the code is bound to, else
            // the device redeeming it.
            let device = grant.device_id().or(device_id).map(str::to_owned);
            let access =
                self.authority
                    .issue_access_token(grant.owner(), device.as_deref(), now_unix)?;
            let refresh_token = self.authority.issue_refresh_token()?;
            Ok::<_, AuthorityError>((grant, device, access, refresh_token))
        })();
        let (grant, device, access, refresh_token) = match issued {
            Ok(v) => v,
            Err(e) => return done(Err(rejected(e))),
        };
        let redemption = Redemption {
            code_id: grant.code_id().to_owned(),
            code_expires_at: grant.expires_at(),
            hash: token_hash(&refresh_token),
            grant: GrantRecord {
                owner: grant.owner().to_owned(),
                device_id: device,
                expires_at: now_unix.saturating_add(self.policy.ttl),
                rotation: None,
            },
            now: now_unix,
        };
        let tokens = TokenSet {
            expires_in: Some(access.expires_at.saturating_sub(now_unix)),
            access_token: access.token,
            refresh_token,
        };
        self.grants
            .redeem(redemption, Box::new(move |r| done(r.map(|()| tokens))));
    }

    /// The `refresh_token` grant: a new access token and a new refresh
    /// token; the old refresh token stops working (rotation), except that
    /// within the reuse window, while its successor is unused, it gets the
    /// same pair again. `done` as for [`EmbeddedProvider::start_redeem`].
    pub fn start_refresh(&self, refresh_token: &str, now_unix: u64, done: Done<TokenSet>) {
        let authority = self.authority.clone();
        let mint: Mint = Box::new(move |grant: &GrantRecord| {
            let rejected = |e: AuthorityError| OAuthError::Rejected(e.to_string());
            let access = authority
                .issue_access_token(&grant.owner, grant.device_id.as_deref(), now_unix)
                .map_err(rejected)?;
            let refresh_token = authority.issue_refresh_token().map_err(rejected)?;
            Ok(Minted {
                access_token: access.token,
                access_expires_at: access.expires_at,
                refresh_token,
            })
        });
        self.grants.refresh(
            token_hash(refresh_token),
            now_unix,
            self.policy,
            mint,
            Box::new(move |r| {
                done(r.map(|m| TokenSet {
                    // Recomputed from the access token's `exp`: a reused
                    // pair is older than `now`.
                    expires_in: Some(m.access_expires_at.saturating_sub(now_unix)),
                    access_token: m.access_token,
                    refresh_token: m.refresh_token,
                }))
            }),
        );
    }

    /// [`EmbeddedProvider::start_redeem`], waiting for the answer: for
    /// tests and tools, never on a shard thread.
    pub fn redeem(
        &self,
        code: &str,
        device_id: Option<&str>,
        now_unix: u64,
    ) -> Result<TokenSet, OAuthError> {
        let (done, rx) = channel();
        self.start_redeem(code, device_id, now_unix, done);
        rx.recv_timeout(BLOCKING_WAIT)
            .unwrap_or_else(|_| Err(no_answer()))
    }

    /// [`EmbeddedProvider::start_refresh`], waiting for the answer: for
    /// tests and tools, never on a shard thread.
    pub fn refresh(&self, refresh_token: &str, now_unix: u64) -> Result<TokenSet, OAuthError> {
        let (done, rx) = channel();
        self.start_refresh(refresh_token, now_unix, done);
        rx.recv_timeout(BLOCKING_WAIT)
            .unwrap_or_else(|_| Err(no_answer()))
    }

    /// [`EmbeddedProvider::start_redeem`] for async callers (the HTTP API).
    pub async fn redeem_async(
        &self,
        code: &str,
        device_id: Option<&str>,
        now_unix: u64,
    ) -> Result<TokenSet, OAuthError> {
        let (done, rx) = channel();
        self.start_redeem(code, device_id, now_unix, done);
        rx.recv_async().await.unwrap_or_else(|_| Err(no_answer()))
    }

    /// [`EmbeddedProvider::start_refresh`] for async callers (the HTTP API).
    pub async fn refresh_async(
        &self,
        refresh_token: &str,
        now_unix: u64,
    ) -> Result<TokenSet, OAuthError> {
        let (done, rx) = channel();
        self.start_refresh(refresh_token, now_unix, done);
        rx.recv_async().await.unwrap_or_else(|_| Err(no_answer()))
    }
}

type Answer = Result<TokenSet, OAuthError>;

fn channel() -> (Done<TokenSet>, flume::Receiver<Answer>) {
    let (tx, rx) = flume::bounded(1);
    (
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
        rx,
    )
}

fn no_answer() -> OAuthError {
    OAuthError::Unavailable("the token store did not answer".into())
}

impl TokenProvider for EmbeddedProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn exchange(
        &self,
        request: ExchangeRequest,
        done: Completion,
    ) -> Option<Result<TokenSet, OAuthError>> {
        // An answer before `start_*` returns is handed back at once; a
        // later one goes to `done`. The lock is held only to hand over.
        let (tx, rx) = flume::bounded::<Answer>(1);
        let late: Arc<Mutex<Option<Completion>>> = Arc::new(Mutex::new(None));
        let slot = late.clone();
        let answer: Done<TokenSet> = Box::new(move |r| {
            let mut waiting = slot.lock().unwrap_or_else(|p| p.into_inner());
            match waiting.take() {
                Some(done) => {
                    drop(waiting);
                    done(r);
                }
                None => {
                    let _ = tx.send(r);
                }
            }
        });
        match &request.grant {
            Grant::AuthorizationCode(code) => {
                let device = Some(request.device_id.as_str()).filter(|d| !d.is_empty());
                self.start_redeem(code, device, request.now_unix, answer);
            }
            Grant::RefreshToken(token) => self.start_refresh(token, request.now_unix, answer),
        }
        let mut waiting = late.lock().unwrap_or_else(|p| p.into_inner());
        if let Ok(r) = rx.try_recv() {
            return Some(r);
        }
        *waiting = Some(done);
        None
    }

    fn revoke_device(&self, device_id: &str) {
        self.grants.revoke_device(device_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::authority::{AuthoritySettings, SigningKey};

    const D: &str = "5bbc55bb-686f-4068-6c2d-75c4a8b4f49a";
    const NOW: u64 = 1_800_000_000;

    fn provider() -> EmbeddedProvider {
        let authority = Authority::new(
            SigningKey::generate().unwrap(),
            AuthoritySettings::new("https://auth.test"),
        )
        .unwrap();
        EmbeddedProvider::new("plgd", Arc::new(authority))
    }

    #[test]
    fn a_code_is_redeemed_once_and_refresh_rotates() {
        let p = provider();
        let code = p.authority().issue_code("alice", None, NOW).unwrap();
        let tokens = p.redeem(&code, Some(D), NOW).unwrap();
        assert!(!tokens.access_token.is_empty() && !tokens.refresh_token.is_empty());
        assert_eq!(tokens.expires_in, Some(3600));
        assert!(matches!(
            p.redeem(&code, Some(D), NOW),
            Err(OAuthError::Rejected(_))
        ));
        let next = p.refresh(&tokens.refresh_token, NOW + 10).unwrap();
        assert_ne!(next.refresh_token, tokens.refresh_token);
        // The answer was lost: the old token again, within the window.
        assert_eq!(
            p.refresh(&tokens.refresh_token, NOW + 11).unwrap(),
            TokenSet {
                expires_in: Some(3599),
                ..next.clone()
            }
        );
        let third = p.refresh(&next.refresh_token, NOW + 12).unwrap();
        // The successor was used: the old one is refused.
        assert!(p.refresh(&tokens.refresh_token, NOW + 13).is_err());
        p.revoke_device(D);
        assert!(p.refresh(&third.refresh_token, NOW + 20).is_err());
    }

    #[test]
    fn a_bound_code_needs_its_device() {
        let p = provider();
        let code = p.authority().issue_code("alice", Some(D), NOW).unwrap();
        assert!(p
            .redeem(&code, Some("00000000-0000-0000-0000-000000000001"), NOW)
            .is_err());
        assert!(p.redeem(&code, Some(D), NOW).is_ok());
    }

    /// A store that answers from another thread, as a durable one does.
    #[derive(Debug, Default)]
    struct Late(Arc<MemoryGrants>);

    impl GrantStore for Late {
        fn redeem(&self, r: Redemption, done: Done<()>) {
            let inner = self.0.clone();
            std::thread::spawn(move || inner.redeem(r, done));
        }
        fn refresh(
            &self,
            hash: crate::auth::grants::TokenHash,
            now: u64,
            policy: GrantPolicy,
            mint: Mint,
            done: Done<Minted>,
        ) {
            let inner = self.0.clone();
            std::thread::spawn(move || inner.refresh(hash, now, policy, mint, done));
        }
        fn revoke_device(&self, device_id: &str) {
            self.0.revoke_device(device_id);
        }
    }

    #[test]
    fn a_late_store_answers_through_the_completion() {
        let authority = Authority::new(
            SigningKey::generate().unwrap(),
            AuthoritySettings::new("https://auth.test"),
        )
        .unwrap();
        let p = EmbeddedProvider::with_grants(
            "plgd",
            Arc::new(authority),
            Arc::new(Late::default()),
            GrantPolicy::default(),
        );
        let code = p.authority().issue_code("alice", None, NOW).unwrap();
        let (tx, rx) = flume::bounded(1);
        let request = ExchangeRequest {
            grant: Grant::AuthorizationCode(code),
            device_id: D.into(),
            now_unix: NOW,
        };
        let now = p.exchange(
            request,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        let tokens = match now {
            Some(r) => r.unwrap(),
            None => rx
                .recv_timeout(std::time::Duration::from_secs(5))
                .unwrap()
                .unwrap(),
        };
        // Refresh twice with the same token (a lost answer): same pair.
        let a = p.refresh(&tokens.refresh_token, NOW + 5).unwrap();
        let b = p.refresh(&tokens.refresh_token, NOW + 6).unwrap();
        assert_eq!(
            (&a.access_token, &a.refresh_token),
            (&b.access_token, &b.refresh_token)
        );
        assert_eq!(a.expires_in, Some(3600));
        assert_eq!(b.expires_in, Some(3599));
    }

    #[test]
    fn an_immediate_store_answers_at_once() {
        let p = provider();
        let code = p.authority().issue_code("alice", None, NOW).unwrap();
        let request = ExchangeRequest {
            grant: Grant::AuthorizationCode(code),
            device_id: D.into(),
            now_unix: NOW,
        };
        assert!(matches!(p.exchange(request, Box::new(|_| {})), Some(Ok(_))));
    }
}
