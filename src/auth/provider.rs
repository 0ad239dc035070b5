//! OAuth2 token providers as the sessions use them (spec §4.8): sign-up
//! exchanges an authorization code for tokens, refresh exchanges a refresh
//! token. The embedded authority answers at once, on the shard; an external
//! provider answers later, from the control plane, through a
//! [`Completion`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::authority::{Authority, AuthorityError};

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

/// A refresh token's meaning, kept by the embedded provider.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RefreshGrant {
    owner: String,
    device_id: Option<String>,
}

#[derive(Debug, Default)]
struct EmbeddedState {
    /// Redeemed codes by `jti`, with their expiry: a code is redeemed once.
    used_codes: HashMap<String, u64>,
    refresh: HashMap<String, RefreshGrant>,
}

/// The embedded authority as an OAuth2 provider: codes from `coap-gateway
/// token code` become access tokens (with the owner and device-ID claims)
/// and opaque refresh tokens; refresh rotates the refresh token. The same
/// object serves `POST /oauth/token` on the API.
///
/// Refresh tokens live in memory: a restart invalidates them (devices then
/// sign up again). The durable hub will keep them.
pub struct EmbeddedProvider {
    name: String,
    authority: Arc<Authority>,
    state: Mutex<EmbeddedState>,
}

impl std::fmt::Debug for EmbeddedProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedProvider")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl EmbeddedProvider {
    pub fn new(name: impl Into<String>, authority: Arc<Authority>) -> EmbeddedProvider {
        EmbeddedProvider {
            name: name.into(),
            authority,
            state: Mutex::new(EmbeddedState::default()),
        }
    }

    pub fn authority(&self) -> &Arc<Authority> {
        &self.authority
    }

    fn state(&self) -> MutexGuard<'_, EmbeddedState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The `authorization_code` grant. `device_id` is the device redeeming
    /// the code (`None` from the HTTP token endpoint when the client sent
    /// none; a code bound to a device then fails).
    pub fn redeem(
        &self,
        code: &str,
        device_id: Option<&str>,
        now_unix: u64,
    ) -> Result<TokenSet, OAuthError> {
        let rejected = |e: AuthorityError| OAuthError::Rejected(e.to_string());
        let grant = self
            .authority
            .redeem_code(code, device_id, now_unix)
            .map_err(rejected)?;
        // The access token names the device the code is bound to, else the
        // device redeeming it.
        let device = grant.device_id().or(device_id).map(str::to_owned);
        let access = self
            .authority
            .issue_access_token(grant.owner(), device.as_deref(), now_unix)
            .map_err(rejected)?;
        let refresh_token = self.authority.issue_refresh_token().map_err(rejected)?;
        let mut state = self.state();
        state.used_codes.retain(|_, exp| *exp >= now_unix);
        if state.used_codes.contains_key(grant.code_id()) {
            return Err(OAuthError::Rejected(
                "authorization code already used".into(),
            ));
        }
        state
            .used_codes
            .insert(grant.code_id().to_owned(), grant.expires_at());
        state.refresh.insert(
            refresh_token.clone(),
            RefreshGrant {
                owner: grant.owner().to_owned(),
                device_id: device,
            },
        );
        Ok(TokenSet {
            expires_in: Some(access.expires_at.saturating_sub(now_unix)),
            access_token: access.token,
            refresh_token,
        })
    }

    /// The `refresh_token` grant: a new access token and a new refresh
    /// token; the old refresh token stops working (rotation).
    pub fn refresh(&self, refresh_token: &str, now_unix: u64) -> Result<TokenSet, OAuthError> {
        let rejected = |e: AuthorityError| OAuthError::Rejected(e.to_string());
        let mut state = self.state();
        let grant = state
            .refresh
            .remove(refresh_token)
            .ok_or_else(|| OAuthError::Rejected("unknown refresh token".into()))?;
        let issued = self
            .authority
            .issue_access_token(&grant.owner, grant.device_id.as_deref(), now_unix)
            .and_then(|access| Ok((access, self.authority.issue_refresh_token()?)));
        let (access, new_refresh) = match issued {
            Ok(v) => v,
            Err(e) => {
                // Keep the old one usable: nothing was handed out.
                state.refresh.insert(refresh_token.to_owned(), grant);
                return Err(rejected(e));
            }
        };
        state.refresh.insert(new_refresh.clone(), grant);
        Ok(TokenSet {
            expires_in: Some(access.expires_at.saturating_sub(now_unix)),
            access_token: access.token,
            refresh_token: new_refresh,
        })
    }
}

impl TokenProvider for EmbeddedProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn exchange(
        &self,
        request: ExchangeRequest,
        _done: Completion,
    ) -> Option<Result<TokenSet, OAuthError>> {
        Some(match &request.grant {
            Grant::AuthorizationCode(code) => {
                let device = Some(request.device_id.as_str()).filter(|d| !d.is_empty());
                self.redeem(code, device, request.now_unix)
            }
            Grant::RefreshToken(token) => self.refresh(token, request.now_unix),
        })
    }

    fn revoke_device(&self, device_id: &str) {
        self.state().refresh.retain(|_, g| {
            !g.device_id
                .as_deref()
                .is_some_and(|d| super::jwt::same_device_id(d, device_id))
        });
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
        assert!(p.refresh(&tokens.refresh_token, NOW + 10).is_err());
        p.revoke_device(D);
        assert!(p.refresh(&next.refresh_token, NOW + 20).is_err());
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
}
