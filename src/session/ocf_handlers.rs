//! The OCF cloud resources of spec §5 on one session: sign-up (§5.2),
//! sign-off (§5.3), sign-in (§5.4), sign-out (§5.5), token refresh (§5.6),
//! publish / unpublish / selector (§5.7, §5.8) and discovery (§5.9), with
//! the checks of spec §4.5 in the order the spec lists them.

use std::time::{Duration, SystemTime};

use super::*;
use crate::auth::jwks::KeyLookupError;
use crate::auth::jwt::{
    expires_in, oauth_expiry, resolve_device_id, same_device_id, sign_in_deadline,
    CertificateDeviceId, JwtError, VerifiedToken,
};
use crate::auth::provider::Grant;
use crate::auth::validator::UnknownKey;
use crate::hub::{HubError, Online, StoredLink};
use crate::ocf::account::{SignOffQuery, SignUpRequest, SignUpResponse};
use crate::ocf::rd::{PublishRequest, SelectorResponse, UnpublishQuery};
use crate::ocf::res::{DeviceLinks, DiscoveryQuery, DiscoveryResponse};
use crate::ocf::session::{Credentials, SessionRequest, SignInResponse, SIGN_OUT_RESPONSE};
use crate::ocf::tokenrefresh::{TokenRefreshRequest, TokenRefreshResponse};

/// A signed-in connection's authorization (spec §4.6). Built only from a
/// [`VerifiedToken`] that passed the sign-in checks.
#[derive(Debug, Clone)]
pub(super) struct SignedIn {
    pub(super) ctx: AuthContext,
    /// The token the device signed in with (spec §4.6 `accessToken`).
    access_token: Box<str>,
    /// Unix seconds; `None` for a token without `exp` (spec §14 item 15).
    deadline: Option<u64>,
}

/// What an exchange is for, and what the waiting requests need.
#[derive(Debug, Clone, PartialEq, Eq)]
enum GrantKey {
    SignUp {
        provider: usize,
        code: String,
    },
    Refresh {
        provider: usize,
        refresh_token: String,
    },
}

/// A request waiting for an exchange's answer.
#[derive(Debug, Clone)]
struct Waiter {
    /// When the request came: waiting for keys ends a keepalive later.
    since: Instant,
    token: Vec<u8>,
    format: ContentFormat,
    /// The request's `di` (sign-up, refresh) and `uid` (refresh).
    device_id: String,
    user_id: String,
}

/// Tokens an exchange returned whose signing key is being fetched: the
/// provider has already spent the code or refresh token, so they are kept
/// and checked again when new keys may have come (spec §4.1), rather than
/// failing the device for good.
#[derive(Debug, Clone)]
struct AwaitingKeys {
    key: GrantKey,
    tokens: TokenSet,
    waiter: Waiter,
}

/// A session's OAuth exchanges (spec §4.8): those waiting for the driver,
/// those in flight, the last result, and tokens waiting for keys.
#[derive(Debug, Default)]
pub(super) struct Exchanges {
    pub(super) queued: Vec<Exchange>,
    pending: Vec<PendingExchange>,
    /// The last (code or refresh token → tokens) result of this
    /// connection, answered again to a retransmission.
    cache: Option<(GrantKey, TokenSet)>,
    awaiting_keys: Vec<AwaitingKeys>,
    next_id: u64,
}

impl Exchanges {
    fn is_empty(&self) -> bool {
        self.queued.is_empty()
            && self.pending.is_empty()
            && self.cache.is_none()
            && self.awaiting_keys.is_empty()
    }
}

/// How often kept tokens are checked again while their key is fetched.
const KEY_RETRY: Duration = Duration::from_millis(100);

/// An exchange in flight; identical requests share it (spec §4.8).
#[derive(Debug, Clone)]
struct PendingExchange {
    id: u64,
    key: GrantKey,
    waiters: Vec<Waiter>,
}

pub(super) fn unix(wall: SystemTime) -> u64 {
    wall.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(super) fn unix_ns(wall: SystemTime) -> u64 {
    wall.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// spec §5.12 + §5.0: a hub failure on the wire.
fn hub_error(e: HubError) -> SessionError {
    match e {
        HubError::InvalidArgument(m) => SessionError::Invalid(m),
        HubError::PermissionDenied(m) => SessionError::Denied(m),
        HubError::NotFound(m) => SessionError::Invalid(m),
        HubError::Unavailable(m) => SessionError::Unavailable(m),
    }
}

/// A token check failed: 4.01 (spec §4.5), except a key we do not know
/// yet while the key set is fetched again (spec §4.1): 5.03, so the device
/// retries instead of dropping its credentials. With the embedded keys, or
/// once a fetch came back without the key, it is 4.01.
fn token_error(config: &SessionConfig, e: JwtError) -> SessionError {
    if let JwtError::Key(KeyLookupError::UnknownKid(kid)) = &e {
        if config.validator.unknown_key(kid) == UnknownKey::Fetching {
            return SessionError::KeysPending(format!("cannot verify the token yet: {e}"));
        }
    }
    SessionError::Denied(format!("invalid token: {e}"))
}

impl Session {
    pub(super) fn is_signed_in(&self, wall: SystemTime) -> bool {
        // spec §4.6: valid while the deadline is zero or in the future.
        self.signed_in
            .as_ref()
            .is_some_and(|s| s.deadline.is_none_or(|d| d > unix(wall)))
    }

    fn certificate(&self) -> CertificateDeviceId<'_> {
        if self.config.certificate_device_id {
            CertificateDeviceId::Required(self.identity.device_id.as_deref())
        } else {
            CertificateDeviceId::NotRequired
        }
    }

    fn write_response(
        &mut self,
        code: Code,
        token: &[u8],
        format: Option<ContentFormat>,
        body: &[u8],
    ) {
        let mut response = MessageWriter::new(&mut self.out, code, token);
        if let Some(format) = format {
            response.option_uint(option::CONTENT_FORMAT, u32::from(format.number()));
        }
        if !body.is_empty() {
            response.payload(body);
        }
        response.finish();
    }

    /// Every request but `/x.plgd.dev/time` (spec §5.1).
    pub(super) fn handle_ocf_request(
        &mut self,
        wall: SystemTime,
        msg: MessageRef<'_>,
    ) -> Result<(), SessionError> {
        let security = if msg.uri_path_is(&["oic", "sec", "account"]) {
            Some(match msg.code {
                Code::POST => self.sign_up(wall, &msg),
                Code::DELETE => self.sign_off(wall, &msg),
                _ => Err(SessionError::MethodNotAllowed),
            })
        } else if msg.uri_path_is(&["oic", "sec", "session"]) {
            Some(match msg.code {
                Code::POST => self.sign_in_or_out(wall, &msg),
                _ => Err(SessionError::MethodNotAllowed),
            })
        } else if msg.uri_path_is(&["oic", "sec", "tokenrefresh"]) {
            Some(match msg.code {
                Code::POST => self.refresh(wall, &msg),
                _ => Err(SessionError::MethodNotAllowed),
            })
        } else {
            None
        };
        if let Some(result) = security {
            // spec §5.0: any failure on /oic/sec/* answers, then closes.
            if let Err(e) = result {
                let path = ["account", "session", "tokenrefresh"]
                    .into_iter()
                    .find(|last| msg.uri_path_is(&["oic", "sec", last]))
                    .unwrap_or("?");
                let request = match msg.code {
                    Code::POST => "POST",
                    Code::DELETE => "DELETE",
                    Code::GET => "GET",
                    Code::PUT => "PUT",
                    _ => "request",
                };
                self.refuse_security_request(
                    format_args!("{request} /oic/sec/{path}"),
                    &e,
                    msg.token,
                );
            }
            return Ok(());
        }
        // spec §4.6: everything else needs a valid session.
        if !self.is_signed_in(wall) {
            return Err(SessionError::Unauthorized);
        }
        if let Some(number) = msg.first_unknown_critical_option() {
            return Err(SessionError::BadOption(number));
        }
        if msg.uri_path_is(&["oic", "rd"]) {
            match msg.code {
                Code::POST => self.publish(wall, &msg),
                Code::DELETE => self.unpublish(wall, &msg),
                Code::GET => self.selector(&msg),
                _ => Err(SessionError::MethodNotAllowed),
            }
        } else if msg.uri_path_is(&["oic", "res"]) {
            match msg.code {
                Code::GET => self.discovery(wall, &msg),
                _ => Err(SessionError::MethodNotAllowed),
            }
        } else {
            Err(SessionError::UnknownPath)
        }
    }

    // -- sign-up (spec §5.2) ------------------------------------------------

    fn provider_index(&self, name: &str) -> Option<usize> {
        self.config.providers.iter().position(|p| p.name() == name)
    }

    fn sign_up(&mut self, wall: SystemTime, msg: &MessageRef<'_>) -> Result<(), SessionError> {
        if let Some(number) = msg.first_unknown_critical_option() {
            return Err(SessionError::BadOption(number));
        }
        let request =
            SignUpRequest::decode(msg.payload).map_err(|e| SessionError::Invalid(e.to_string()))?;
        let format = ContentFormat::from_accept(msg.accept())
            .ok_or(SessionError::BadRequest("unsupported accept"))?;
        let provider = self
            .provider_index(request.authorization_provider)
            .ok_or_else(|| {
                SessionError::Denied(format!(
                    "unknown authorization provider {:?}",
                    request.authorization_provider
                ))
            })?;
        let waiter = Waiter {
            since: self.now,
            token: msg.token.to_vec(),
            format,
            device_id: request.device_id.to_owned(),
            user_id: String::new(),
        };
        let key = GrantKey::SignUp {
            provider,
            code: request.authorization_code.to_owned(),
        };
        self.start_exchange(
            wall,
            key,
            Grant::AuthorizationCode(request.authorization_code.to_owned()),
            waiter,
        );
        Ok(())
    }

    /// spec §4.8: answered from the connection's cache, joined to an
    /// identical exchange in flight, or started.
    fn start_exchange(&mut self, wall: SystemTime, key: GrantKey, grant: Grant, waiter: Waiter) {
        // The device the grant is for: the certificate's with mTLS identity
        // certificates, else the request's `di` (spec §4.3).
        let device_id = match self.certificate() {
            CertificateDeviceId::Required(Some(id)) => id.to_owned(),
            _ => waiter.device_id.clone(),
        };
        let exchanges = self.exchanges.get_or_insert_with(Box::default);
        if let Some((cached, tokens)) = &exchanges.cache {
            if *cached == key {
                let tokens = tokens.clone();
                self.finish_exchange(wall, &key, Ok(tokens), waiter);
                return;
            }
        }
        if let Some(pending) = exchanges.pending.iter_mut().find(|p| p.key == key) {
            pending.waiters.push(waiter);
            return;
        }
        let id = exchanges.next_id;
        exchanges.next_id += 1;
        let provider = match &key {
            GrantKey::SignUp { provider, .. } | GrantKey::Refresh { provider, .. } => *provider,
        };
        exchanges.pending.push(PendingExchange {
            id,
            key,
            waiters: vec![waiter],
        });
        exchanges.queued.push(Exchange {
            id,
            provider,
            request: ExchangeRequest {
                grant,
                device_id,
                now_unix: unix(wall),
            },
        });
    }

    /// The answer to [`Exchange`] `id`.
    pub fn handle_exchange(
        &mut self,
        now: Instant,
        wall: SystemTime,
        id: u64,
        result: Result<TokenSet, OAuthError>,
    ) {
        self.now = now;
        self.wall = wall;
        let Some(exchanges) = self.exchanges.as_mut() else {
            return;
        };
        let Some(at) = exchanges.pending.iter().position(|p| p.id == id) else {
            return;
        };
        let pending = exchanges.pending.remove(at);
        if self.closed.is_some() {
            return;
        }
        if let Ok(tokens) = &result {
            exchanges.cache = Some((pending.key.clone(), tokens.clone()));
        }
        for waiter in pending.waiters {
            self.finish_exchange(wall, &pending.key, result.clone(), waiter);
        }
    }

    fn finish_exchange(
        &mut self,
        wall: SystemTime,
        key: &GrantKey,
        result: Result<TokenSet, OAuthError>,
        waiter: Waiter,
    ) {
        let tokens_kept = result.clone();
        let outcome = match result {
            // spec §5.2 / §5.6: a failed exchange is 5.03 (for refresh even
            // when the provider rejected the token: the quirk of §14 item 3
            // is kept, devices then retry rather than forget their
            // registration).
            Err(OAuthError::Unavailable(e)) => Err(SessionError::Unavailable(format!(
                "cannot reach the authorization provider: {e}"
            ))),
            Err(OAuthError::Rejected(e)) => Err(SessionError::ServiceUnavailable(format!(
                "the authorization provider refused: {e}"
            ))),
            Ok(tokens) => match key {
                GrantKey::SignUp { .. } => self.complete_sign_up(wall, &tokens, &waiter),
                GrantKey::Refresh { .. } => self.complete_refresh(wall, &tokens, &waiter),
            },
        };
        match outcome {
            Ok(()) => {}
            Err(SessionError::KeysPending(_))
                if self.now < waiter.since + self.config.keepalive_timeout =>
            {
                let Ok(tokens) = tokens_kept else { return };
                let exchanges = self.exchanges.get_or_insert_with(Box::default);
                exchanges.awaiting_keys.push(AwaitingKeys {
                    key: key.clone(),
                    tokens,
                    waiter,
                });
                self.timers[Timer::KeyRetry as usize] = Some(self.now + KEY_RETRY);
            }
            // spec §5.0: /oic/sec/* failures close the connection.
            Err(e) => {
                let request = match key {
                    GrantKey::SignUp { .. } => "POST /oic/sec/account",
                    GrantKey::Refresh { .. } => "POST /oic/sec/tokenrefresh",
                };
                self.refuse_security_request(format_args!("{request}"), &e, &waiter.token);
            }
        }
    }

    /// spec §5.0: a failed `/oic/sec/*` request is answered, then the
    /// connection closes. Logged with the device and the reason, since the
    /// device itself usually only reports "connection closed".
    fn refuse_security_request(
        &mut self,
        request: std::fmt::Arguments<'_>,
        error: &SessionError,
        token: &[u8],
    ) {
        let device_id = self
            .signed_in
            .as_ref()
            .map(|s| s.ctx.device_id.as_str())
            .or(self.identity.device_id.as_deref())
            .unwrap_or("");
        tracing::warn!(
            device_id,
            peer = %self.identity.remote,
            request = %request,
            answer = %match error.wire_action() {
                WireAction::Respond { code, .. } => code.to_string(),
                WireAction::Abort { .. } => "Abort".to_owned(),
            },
            reason = %error,
            "refused a security request; closing the connection"
        );
        self.apply_closing(error, token, true);
    }

    /// The key-retry timer: check the kept tokens again.
    pub(super) fn retry_awaiting_keys(&mut self) {
        let wall = self.wall;
        let kept = self
            .exchanges
            .as_mut()
            .map(|e| std::mem::take(&mut e.awaiting_keys))
            .unwrap_or_default();
        for kept in kept {
            self.finish_exchange(wall, &kept.key, Ok(kept.tokens), kept.waiter);
        }
    }

    fn complete_sign_up(
        &mut self,
        wall: SystemTime,
        tokens: &TokenSet,
        waiter: &Waiter,
    ) -> Result<(), SessionError> {
        let now = unix(wall);
        if tokens.refresh_token.is_empty() {
            return Err(SessionError::Denied(
                "the authorization provider returned no refresh token".into(),
            ));
        }
        let expiry = oauth_expiry(tokens.expires_in, now);
        if expiry.is_some_and(|e| e <= now) {
            return Err(SessionError::Denied(
                "the access token is already expired".into(),
            ));
        }
        let verified = self
            .config
            .validator
            .load()
            .validate(&tokens.access_token, now)
            .map_err(|e| token_error(&self.config, e))?;
        let ctx = self.authorize(&verified, &waiter.device_id)?;
        self.config.hub.add_device(&ctx).map_err(hub_error)?;
        let mut body = Vec::new();
        SignUpResponse {
            access_token: &tokens.access_token,
            user_id: &ctx.owner,
            refresh_token: &tokens.refresh_token,
            expires_in: expires_in(expiry, now),
            redirect_uri: "",
        }
        .encode(waiter.format, &mut body)
        .map_err(|_| SessionError::Internal("cannot encode the sign-up response"))?;
        tracing::info!(device_id = %ctx.device_id, owner = %ctx.owner, "device signed up");
        self.write_response(Code::CHANGED, &waiter.token, Some(waiter.format), &body);
        Ok(())
    }

    /// spec §4.3: the device a verified token speaks for, with the owner
    /// and the token's identity as the authorization context.
    fn authorize(
        &self,
        verified: &VerifiedToken,
        param_device_id: &str,
    ) -> Result<AuthContext, SessionError> {
        let owner = verified.owner();
        if owner.is_empty() {
            return Err(SessionError::Denied("the token has no owner".into()));
        }
        let device_id = resolve_device_id(verified, self.certificate(), param_device_id)
            .map_err(|e| SessionError::Denied(e.to_string()))?;
        Ok(AuthContext {
            owner: owner.to_owned(),
            device_id,
            subject: verified.subject().map(str::to_owned),
            token_id: verified.token_id().map(str::to_owned),
        })
    }

    // -- sign-off (spec §5.3) -----------------------------------------------

    fn session_credentials(&self, wall: SystemTime) -> Credentials<'_> {
        match &self.signed_in {
            Some(s) if self.is_signed_in(wall) => Credentials {
                device_id: &s.ctx.device_id,
                user_id: &s.ctx.owner,
                access_token: &s.access_token,
            },
            _ => Credentials::default(),
        }
    }

    /// spec §4.5 for sign-in, sign-out and sign-off: all three credentials
    /// given (4.00), the token valid, its owner the `uid`, and the device
    /// resolved (4.01).
    fn verify_credentials(
        &self,
        credentials: Credentials<'_>,
        now: u64,
    ) -> Result<(VerifiedToken, AuthContext), SessionError> {
        credentials
            .check()
            .map_err(|e| SessionError::Invalid(e.to_string()))?;
        let verified = self
            .config
            .validator
            .load()
            .validate(credentials.access_token, now)
            .map_err(|e| token_error(&self.config, e))?;
        if verified.owner() != credentials.user_id {
            return Err(SessionError::Denied(format!(
                "the token's owner is not the uid {:?}",
                credentials.user_id
            )));
        }
        let ctx = self.authorize(&verified, credentials.device_id)?;
        Ok((verified, ctx))
    }

    fn sign_off(&mut self, wall: SystemTime, msg: &MessageRef<'_>) -> Result<(), SessionError> {
        let now = unix(wall);
        let query = SignOffQuery::parse(msg.uri_queries())
            .map_err(|e| SessionError::BadQuery(e.to_string()))?;
        let credentials = query.credentials().or(self.session_credentials(wall));
        let (_, ctx) = self.verify_credentials(credentials, now)?;
        // Our own connection goes OFFLINE first, so that removing the
        // device does not close it (spec §5.3: the connection stays open).
        if let Some(signed_in) = self.signed_in.take() {
            self.leave_session(
                &signed_in.ctx,
                true,
                "the device signed off before it answered",
            );
            self.config
                .hub
                .set_offline(&signed_in.ctx.device_id, self.identity.connection);
        }
        self.timers[Timer::Deadline as usize] = None;
        self.config
            .hub
            .delete_device(&ctx.owner, &ctx.device_id)
            .map_err(|e| SessionError::Invalid(format!("cannot sign off: {e}")))?;
        for provider in &self.config.providers {
            provider.revoke_device(&ctx.device_id);
        }
        tracing::info!(device_id = %ctx.device_id, owner = %ctx.owner, "device signed off");
        self.write_response(Code::DELETED, msg.token, None, &[]);
        Ok(())
    }

    // -- sign-in and sign-out (spec §5.4, §5.5) -----------------------------

    fn sign_in_or_out(
        &mut self,
        wall: SystemTime,
        msg: &MessageRef<'_>,
    ) -> Result<(), SessionError> {
        if let Some(number) = msg.first_unknown_critical_option() {
            return Err(SessionError::BadOption(number));
        }
        let request = SessionRequest::decode(msg.payload)
            .map_err(|e| SessionError::Invalid(e.to_string()))?;
        if request.login {
            self.sign_in(wall, msg, request.credentials)
        } else {
            self.sign_out(wall, msg, request.credentials)
        }
    }

    fn sign_in(
        &mut self,
        wall: SystemTime,
        msg: &MessageRef<'_>,
        credentials: Credentials<'_>,
    ) -> Result<(), SessionError> {
        let now = unix(wall);
        credentials
            .check()
            .map_err(|e| SessionError::Invalid(e.to_string()))?;
        let format = ContentFormat::from_accept(msg.accept())
            .ok_or_else(|| SessionError::ServiceUnavailable("unsupported accept".into()))?;
        let (verified, ctx) = self.verify_credentials(credentials, now)?;
        let deadline = sign_in_deadline(
            verified.expires_at(),
            self.config.owner_cache_expiration,
            now,
        )
        .map_err(|e| SessionError::Denied(e.to_string()))?;
        if !self.config.hub.owns(&ctx.owner, &ctx.device_id) {
            return Err(SessionError::Denied(format!(
                "access to device {} denied: it is not registered to this owner",
                ctx.device_id
            )));
        }
        let previous = self.signed_in.take();
        let same = previous.as_ref().is_some_and(|p| {
            same_device_id(&p.ctx.device_id, &ctx.device_id) && p.ctx.owner == ctx.owner
        });
        if let (Some(previous), false) = (&previous, same) {
            // Another device or owner on this connection: the old one goes
            // OFFLINE. (The reference skips ONLINE for the new one, a quirk
            // only the hub sees; here the hub's view stays exact.)
            self.leave_session(
                &previous.ctx,
                true,
                "another device signed in on the connection before the device answered",
            );
            self.config
                .hub
                .set_offline(&previous.ctx.device_id, self.identity.connection);
        }
        let mut body = Vec::new();
        SignInResponse {
            expires_in: expires_in(deadline, now),
        }
        .encode(format, &mut body)
        .map_err(|_| SessionError::Internal("cannot encode the sign-in response"))?;
        self.signed_in = Some(SignedIn {
            ctx: ctx.clone(),
            access_token: credentials.access_token.into(),
            deadline,
        });
        self.arm_deadline(wall, deadline);
        // spec §4.8: a successful sign-in clears the exchange caches; an
        // idle session then keeps no exchange state at all.
        if let Some(exchanges) = self.exchanges.as_mut() {
            exchanges.cache = None;
            if exchanges.is_empty() {
                self.exchanges = None;
            }
        }
        if !same {
            // spec §8.1: ONLINE; the hub closes an older connection of the
            // same device (spec §14 item 13).
            let online = self.config.hub.set_online(
                &ctx,
                Online {
                    connection: self.identity.connection,
                    connected_at_ns: unix_ns(wall),
                    protocol: self.config.protocol,
                    service_id: self.config.service_id.to_string(),
                    connection_id: self.identity.remote.to_string(),
                },
            );
            if let Err(e) = online {
                self.signed_in = None;
                self.timers[Timer::Deadline as usize] = None;
                return Err(SessionError::Denied(format!(
                    "access to device denied: {e}"
                )));
            }
            tracing::info!(device_id = %ctx.device_id, owner = %ctx.owner, "device signed in");
        }
        self.write_response(Code::CHANGED, msg.token, Some(format), &body);
        if !same {
            // spec §8.1 local endpoints, §6.1 twin, §7.1 cold start, in
            // this order on the device's request queue (spec §2.6).
            self.enqueue(requests::Request::LocalEndpoints);
            self.start_twin(false);
            self.cold_start();
        }
        Ok(())
    }

    fn arm_deadline(&mut self, wall: SystemTime, deadline: Option<u64>) {
        self.timers[Timer::Deadline as usize] = deadline.map(|d| {
            let now = unix(wall);
            self.now + Duration::from_secs(d.saturating_sub(now))
        });
    }

    /// spec §8.1: the answer to `GET /oic/res?if=oic.if.ll&rt=oic.wk.d`
    /// (checklist item 28).
    pub(super) fn local_endpoints_answered(&mut self, msg: MessageRef<'_>) {
        let Some(signed_in) = &self.signed_in else {
            return;
        };
        if msg.code != Code::CONTENT {
            tracing::debug!(code = %msg.code, "the device did not list its /oic/d link");
            return;
        }
        let endpoints = first_link_endpoints(msg.payload);
        self.config.hub.set_local_endpoints(
            &signed_in.ctx.device_id,
            self.identity.connection,
            endpoints,
        );
    }

    fn sign_out(
        &mut self,
        wall: SystemTime,
        msg: &MessageRef<'_>,
        credentials: Credentials<'_>,
    ) -> Result<(), SessionError> {
        let now = unix(wall);
        // spec §5.5: missing values come from the session; without one → 4.00.
        if !self.is_signed_in(wall) {
            return Err(SessionError::Invalid("not signed in".into()));
        }
        let credentials = credentials.or(self.session_credentials(wall));
        self.verify_credentials(credentials, now)?;
        if let Some(signed_in) = self.signed_in.take() {
            self.leave_session(
                &signed_in.ctx,
                true,
                "the device signed out before it answered",
            );
            self.config
                .hub
                .set_offline(&signed_in.ctx.device_id, self.identity.connection);
            tracing::info!(device_id = %signed_in.ctx.device_id, "device signed out");
        }
        self.timers[Timer::Deadline as usize] = None;
        self.write_response(
            Code::CHANGED,
            msg.token,
            Some(ContentFormat::OcfCbor),
            SIGN_OUT_RESPONSE,
        );
        Ok(())
    }

    // -- token refresh (spec §5.6) ------------------------------------------

    fn refresh(&mut self, wall: SystemTime, msg: &MessageRef<'_>) -> Result<(), SessionError> {
        if let Some(number) = msg.first_unknown_critical_option() {
            return Err(SessionError::BadOption(number));
        }
        let request = TokenRefreshRequest::decode(msg.payload)
            .map_err(|e| SessionError::Invalid(e.to_string()))?;
        let format = ContentFormat::from_accept(msg.accept())
            .ok_or_else(|| SessionError::ServiceUnavailable("unsupported accept".into()))?;
        // spec §4.8 asks to try every provider when none is named; with one
        // provider per deployment in practice, the first configured one is
        // asked (the embedded authority when it runs).
        let provider = if request.authorization_provider.is_empty() {
            (!self.config.providers.is_empty()).then_some(0)
        } else {
            self.provider_index(request.authorization_provider)
        }
        .ok_or_else(|| {
            SessionError::Denied(format!(
                "unknown authorization provider {:?}",
                request.authorization_provider
            ))
        })?;
        let waiter = Waiter {
            since: self.now,
            token: msg.token.to_vec(),
            format,
            device_id: request.device_id.to_owned(),
            user_id: request.user_id.to_owned(),
        };
        self.start_exchange(
            wall,
            GrantKey::Refresh {
                provider,
                refresh_token: request.refresh_token.to_owned(),
            },
            Grant::RefreshToken(request.refresh_token.to_owned()),
            waiter,
        );
        Ok(())
    }

    fn complete_refresh(
        &mut self,
        wall: SystemTime,
        tokens: &TokenSet,
        waiter: &Waiter,
    ) -> Result<(), SessionError> {
        let now = unix(wall);
        if tokens.refresh_token.is_empty() {
            return Err(SessionError::Denied(
                "the authorization provider returned no refresh token".into(),
            ));
        }
        let verified = self
            .config
            .validator
            .load()
            .validate_with_owner_fallback(&tokens.access_token, &waiter.user_id, now)
            .map_err(|e| token_error(&self.config, e))?;
        let ctx = self.authorize(&verified, &waiter.device_id)?;
        if !self.config.hub.owns(&ctx.owner, &ctx.device_id) {
            return Err(SessionError::Denied(format!(
                "device {} is not registered",
                ctx.device_id
            )));
        }
        let expiry = oauth_expiry(tokens.expires_in, now);
        if expiry.is_some_and(|e| e <= now) {
            return Err(SessionError::Denied(
                "the access token is already expired".into(),
            ));
        }
        let mut body = Vec::new();
        TokenRefreshResponse {
            access_token: &tokens.access_token,
            refresh_token: &tokens.refresh_token,
            expires_in: expires_in(expiry, now),
        }
        .encode(waiter.format, &mut body)
        .map_err(|_| SessionError::Internal("cannot encode the refresh response"))?;
        // spec §4.7: the session takes the new token only if it is signed in.
        if self.is_signed_in(wall) {
            if let Some(signed_in) = &mut self.signed_in {
                if same_device_id(&signed_in.ctx.device_id, &ctx.device_id) {
                    signed_in.access_token = tokens.access_token.as_str().into();
                    signed_in.deadline = expiry;
                    signed_in.ctx = ctx;
                    self.arm_deadline(wall, expiry);
                }
            }
        }
        self.write_response(Code::CHANGED, &waiter.token, Some(waiter.format), &body);
        Ok(())
    }

    // -- resource directory (spec §5.7, §5.8) --------------------------------

    fn signed_in_ctx(&self) -> Result<AuthContext, SessionError> {
        self.signed_in
            .as_ref()
            .map(|s| s.ctx.clone())
            .ok_or(SessionError::Unauthorized)
    }

    fn publish(&mut self, wall: SystemTime, msg: &MessageRef<'_>) -> Result<(), SessionError> {
        let now = unix(wall);
        let ctx = self.signed_in_ctx()?;
        let request = PublishRequest::decode(msg.payload)
            .map_err(|e| SessionError::Invalid(e.to_string()))?;
        let format = ContentFormat::from_accept(msg.accept())
            .ok_or_else(|| SessionError::Failed("unsupported accept".into()))?;
        // spec §14 item 2, as recommended: a device publishes its own links
        // only (the reference does not check).
        if !same_device_id(request.device_id, &ctx.device_id) {
            return Err(SessionError::Invalid(format!(
                "cannot publish links of device {}: signed in as {}",
                request.device_id, ctx.device_id
            )));
        }
        let valid_until = (request.ttl > 0).then(|| now.saturating_add(request.ttl));
        let links = request
            .links
            .iter()
            .map(|l| {
                let mut link = StoredLink::from_link(l, valid_until);
                link.device_id.clone_from(&ctx.device_id);
                link
            })
            .collect::<Vec<_>>();
        self.config
            .hub
            .publish(&ctx, links.clone())
            .map_err(hub_error)?;
        let mut body = Vec::new();
        request
            .encode(format, &mut body)
            .map_err(|_| SessionError::Internal("cannot encode the publish response"))?;
        self.write_response(Code::CHANGED, msg.token, Some(format), &body);
        // spec §6.8: new links join the per-resource observations; spec
        // §7.1: commands waiting for them are delivered now.
        self.twin_published(&links);
        self.cold_start();
        Ok(())
    }

    fn unpublish(&mut self, wall: SystemTime, msg: &MessageRef<'_>) -> Result<(), SessionError> {
        let ctx = self.signed_in_ctx()?;
        let query = UnpublishQuery::parse(msg.uri_queries())
            .map_err(|e| SessionError::Invalid(e.to_string()))?;
        if !same_device_id(&query.device_id, &ctx.device_id) {
            return Err(SessionError::Invalid(format!(
                "cannot unpublish links of device {}: signed in as {}",
                query.device_id, ctx.device_id
            )));
        }
        let hrefs = self
            .config
            .hub
            .unpublish(&ctx, &query.instance_ids, unix(wall))
            .map_err(|e| {
                SessionError::Invalid(format!(
                    "cannot find observed resources using query {:?}: {e}",
                    query.instance_ids
                ))
            })?;
        self.write_response(Code::DELETED, msg.token, None, &[]);
        // spec §6.8: their observations are cancelled.
        self.twin_unpublished(&hrefs);
        Ok(())
    }

    fn selector(&mut self, msg: &MessageRef<'_>) -> Result<(), SessionError> {
        let format = ContentFormat::from_accept(msg.accept())
            .ok_or_else(|| SessionError::Failed("unsupported accept".into()))?;
        let mut body = Vec::new();
        SelectorResponse
            .encode(format, &mut body)
            .map_err(|_| SessionError::Internal("cannot encode the selector"))?;
        self.write_response(Code::CONTENT, msg.token, Some(format), &body);
        Ok(())
    }

    // -- discovery (spec §5.9) -----------------------------------------------

    fn discovery(&mut self, wall: SystemTime, msg: &MessageRef<'_>) -> Result<(), SessionError> {
        let ctx = self.signed_in_ctx()?;
        let query = DiscoveryQuery::parse(msg.uri_queries())
            .map_err(|e| SessionError::Invalid(e.to_string()))?;
        let format = ContentFormat::from_accept(msg.accept())
            .ok_or_else(|| SessionError::Failed("unsupported accept".into()))?;
        let device_ids: Vec<&str> = query.device_ids.iter().map(|d| d.as_ref()).collect();
        let resource_types: Vec<&str> = query.resource_types.iter().map(|r| r.as_ref()).collect();
        let stored = self
            .config
            .hub
            .links(&ctx.owner, &device_ids, &resource_types, unix(wall));
        let links: Vec<Vec<_>> = stored
            .iter()
            .map(|(_, links)| links.iter().map(StoredLink::as_link).collect())
            .collect();
        let devices: Vec<DeviceLinks<'_>> = stored
            .iter()
            .zip(&links)
            .map(|((device_id, _), links)| DeviceLinks { device_id, links })
            .collect();
        let endpoint = self
            .config
            .discovery_endpoint
            .get()
            .map_or("", String::as_str);
        let mut body = Vec::new();
        DiscoveryResponse {
            devices: &devices,
            endpoint,
        }
        .encode(format, &mut body)
        .map_err(|_| SessionError::Internal("cannot encode the discovery response"))?;
        self.write_response(Code::CONTENT, msg.token, Some(format), &body);
        Ok(())
    }
}

/// The `ep` of every entry of `eps` in the first link of a link list (spec
/// §8.1). IoTivity-Lite writes its CBOR with tinycbor, whose arrays and
/// maps are indefinite-length, and adds keys such as `anchor` and `lat`;
/// the OCF body walker reads both forms and ignores what it was not asked
/// for. An unreadable answer records no endpoints.
pub(super) fn first_link_endpoints(payload: &[u8]) -> Vec<String> {
    use crate::ocf::cbor::{Fields, Items, Key, BODY};
    const EPS: Key = Key {
        context: "links[]",
        name: "eps[]",
    };
    let read = || -> Result<Vec<String>, crate::ocf::cbor::BodyError> {
        let mut d = minicbor::Decoder::new(payload);
        let Some(link) = Items::new(&mut d, BODY)?.next().transpose()? else {
            return Ok(Vec::new());
        };
        let link = Fields::walk(&mut link.clone(), BODY, "links[]", ["eps"])?;
        let mut out = Vec::new();
        for ep in link.array("eps")?.into_iter().flatten() {
            let ep = Fields::walk(&mut ep?, EPS, "links[].eps[]", ["ep"])?;
            if let Some(uri) = ep.text("ep")? {
                out.push(uri.to_owned());
            }
        }
        Ok(out)
    };
    read().unwrap_or_else(|e| {
        tracing::debug!(error = %e, "the device's /oic/d link cannot be read");
        Vec::new()
    })
}
