//! The embedded provider's bookkeeping (issue 13): refresh grants and
//! redeemed sign-up codes, kept by a [`GrantStore`] so that they outlive
//! the process (the embedded hub's redb + write-ahead log) and are shared
//! by the nodes of a NATS hub.
//!
//! A grant is keyed by the SHA-256 of its refresh token ([`TokenHash`]);
//! the token itself is never a key. Refresh rotates: the old grant keeps,
//! for `refresh_reuse_window` after its rotation, the token pair its
//! successor was issued with, so that a device whose refresh answer was
//! lost gets the same pair again when it retries with the old token
//! (spec Appendix A item 8: a device that cannot refresh is locked out).
//!
//! The decisions ([`decide`], [`reuse`], [`rotated`]) are plain functions
//! shared by every store; a store only makes its read-decide-write atomic
//! (a lock in process, compare-and-set on NATS) and durable before it
//! answers. Answers come through a callback ([`Done`]), from any thread:
//! a store that writes to disk or to a broker answers late, never blocking
//! its caller (a shard).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard};

use super::provider::OAuthError;

/// SHA-256 of a refresh token.
pub type TokenHash = [u8; 32];

/// The key of a refresh token in a store.
pub fn token_hash(token: &str) -> TokenHash {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Lower-case hex of a hash (NATS keys, logs).
pub fn hash_hex(hash: &TokenHash) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

/// A refresh grant: what a refresh token means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRecord {
    pub owner: String,
    pub device_id: Option<String>,
    /// Unix seconds after which the refresh token no longer works. A
    /// rotated grant's is cut to the end of its reuse window (the record
    /// is pruned then).
    pub expires_at: u64,
    /// Set once the token was used: what it was rotated into.
    pub rotation: Option<Rotation>,
}

/// A grant's rotation: its successor's hash and the pair it was issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    /// Unix seconds.
    pub at: u64,
    pub successor: TokenHash,
    pub tokens: Minted,
}

/// A token pair the provider issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Minted {
    pub access_token: String,
    /// Unix seconds (the access token's `exp`).
    pub access_expires_at: u64,
    pub refresh_token: String,
}

/// `[authority] refresh_token_ttl` and `refresh_reuse_window`, seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantPolicy {
    pub ttl: u64,
    /// 0 disables reuse: a rotated token is deleted at once.
    pub reuse_window: u64,
}

impl Default for GrantPolicy {
    fn default() -> Self {
        GrantPolicy {
            ttl: 30 * 24 * 3600,
            reuse_window: 60,
        }
    }
}

/// A store's answer, from any thread.
pub type Done<T> = Box<dyn FnOnce(Result<T, OAuthError>) + Send>;

/// Issues the successor pair of a grant (JWT signing stays with the
/// provider); called at most once, while the store decides.
pub type Mint = Box<dyn FnOnce(&GrantRecord) -> Result<Minted, OAuthError> + Send>;

/// Where refresh grants and used codes are kept.
pub trait GrantStore: Send + Sync + fmt::Debug {
    /// Marks the code as used and records its grant, atomically: a code
    /// already used (here or on another node) is `Rejected`.
    fn redeem(&self, redemption: Redemption, done: Done<()>);

    /// The `refresh_token` grant of the token hashed `hash`: a new pair
    /// from `mint` (rotation), the same pair again within the reuse
    /// window, or `Rejected`.
    fn refresh(
        &self,
        hash: TokenHash,
        now: u64,
        policy: GrantPolicy,
        mint: Mint,
        done: Done<Minted>,
    );

    /// Sign-off: the device's grants stop working (durably, best effort:
    /// nobody waits for it).
    fn revoke_device(&self, device_id: &str);

    /// Drops expired grants and code records (called periodically).
    fn prune(&self, _now: u64) {}
}

/// A sign-up code's redemption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redemption {
    /// The code's `jti`.
    pub code_id: String,
    /// Unix seconds: the code record is kept until then (the authority
    /// refuses the code itself afterwards).
    pub code_expires_at: u64,
    /// The new refresh token's hash and grant.
    pub hash: TokenHash,
    pub grant: GrantRecord,
    pub now: u64,
}

/// What a presented token's record calls for.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// No such grant: rejected.
    Unknown,
    /// Expired (the record may be deleted): rejected.
    Expired(GrantRecord),
    /// Unused and valid: mint a successor and rotate.
    Rotate(GrantRecord),
    /// Rotated within the window: the same pair again, if the successor
    /// (this hash) is still unused; see [`reuse`].
    CheckSuccessor(TokenHash),
    /// Rotated, outside the window: rejected.
    Refuse(String),
}

/// The first step of a refresh.
pub fn decide(record: Option<&GrantRecord>, now: u64, policy: GrantPolicy) -> Decision {
    let Some(record) = record else {
        return Decision::Unknown;
    };
    if let Some(rotation) = &record.rotation {
        if policy.reuse_window == 0 || now > rotation.at.saturating_add(policy.reuse_window) {
            let why = format!(
                "refresh token reused {}s after its rotation (reuse window {}s)",
                now.saturating_sub(rotation.at),
                policy.reuse_window
            );
            warn_refused(record, &why);
            return Decision::Refuse(why);
        }
        return Decision::CheckSuccessor(rotation.successor);
    }
    if now >= record.expires_at {
        return Decision::Expired(record.clone());
    }
    Decision::Rotate(record.clone())
}

fn warn_refused(record: &GrantRecord, why: &str) {
    tracing::warn!(
        device_id = record.device_id.as_deref().unwrap_or(""),
        owner = %record.owner,
        "refresh refused: {why}"
    );
}

/// The second step of a reuse: `old`'s pair again if its successor is
/// still unused and valid.
pub fn reuse(
    old: &GrantRecord,
    successor: Option<&GrantRecord>,
    now: u64,
) -> Result<Minted, OAuthError> {
    let why = match (&old.rotation, successor) {
        (None, _) => "refresh token was not rotated",
        (Some(_), None) => "refresh token reused after its successor was revoked or expired",
        (Some(_), Some(s)) if s.rotation.is_some() => {
            "refresh token reused after its successor was used"
        }
        (Some(_), Some(s)) if now >= s.expires_at => {
            "refresh token reused after its successor expired"
        }
        (Some(rotation), Some(_)) => return Ok(rotation.tokens.clone()),
    };
    warn_refused(old, why);
    Err(OAuthError::Rejected(why.into()))
}

/// After a rotation of `old` into `minted` (hashed `successor`) at `now`:
/// the old record (`None` = delete it, no reuse window) and the new one.
pub fn rotated(
    old: &GrantRecord,
    minted: &Minted,
    successor: TokenHash,
    now: u64,
    policy: GrantPolicy,
) -> (Option<GrantRecord>, GrantRecord) {
    let new = GrantRecord {
        owner: old.owner.clone(),
        device_id: old.device_id.clone(),
        expires_at: now.saturating_add(policy.ttl),
        rotation: None,
    };
    let kept = (policy.reuse_window > 0).then(|| GrantRecord {
        expires_at: now.saturating_add(policy.reuse_window).min(old.expires_at),
        rotation: Some(Rotation {
            at: now,
            successor,
            tokens: minted.clone(),
        }),
        ..old.clone()
    });
    (kept, new)
}

/// Whether `record` is the device's (device IDs compare as UUIDs).
pub fn is_device(record: &GrantRecord, device_id: &str) -> bool {
    record
        .device_id
        .as_deref()
        .is_some_and(|d| super::jwt::same_device_id(d, device_id))
}

/// Grants and codes in memory: for tests and `serve --memory` (nothing
/// survives the process). Answers at once. Expired records are pruned on
/// access and by [`GrantStore::prune`], so memory follows the live grants.
#[derive(Debug, Default)]
pub struct MemoryGrants {
    state: Mutex<MemoryState>,
}

#[derive(Debug, Default)]
struct MemoryState {
    grants: HashMap<TokenHash, GrantRecord>,
    /// Code ID → its expiry.
    codes: HashMap<String, u64>,
    /// Access counter: a prune every so many calls.
    calls: u64,
}

impl MemoryGrants {
    pub fn new() -> MemoryGrants {
        MemoryGrants::default()
    }

    fn state(&self) -> MutexGuard<'_, MemoryState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Live grants (for tests).
    pub fn len(&self) -> usize {
        self.state().grants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl MemoryState {
    fn prune(&mut self, now: u64) {
        self.grants.retain(|_, g| g.expires_at > now);
        self.codes.retain(|_, exp| *exp >= now);
    }

    fn tick(&mut self, now: u64) {
        self.calls += 1;
        if self.calls.is_multiple_of(1024) {
            self.prune(now);
        }
    }
}

impl GrantStore for MemoryGrants {
    fn redeem(&self, r: Redemption, done: Done<()>) {
        let result = {
            let mut st = self.state();
            st.tick(r.now);
            if st.codes.get(&r.code_id).is_some_and(|exp| *exp >= r.now) {
                Err(OAuthError::Rejected(
                    "authorization code already used".into(),
                ))
            } else {
                st.codes.insert(r.code_id, r.code_expires_at);
                st.grants.insert(r.hash, r.grant);
                Ok(())
            }
        };
        done(result);
    }

    fn refresh(
        &self,
        hash: TokenHash,
        now: u64,
        policy: GrantPolicy,
        mint: Mint,
        done: Done<Minted>,
    ) {
        let result = {
            let mut st = self.state();
            st.tick(now);
            match decide(st.grants.get(&hash), now, policy) {
                Decision::Unknown => Err(OAuthError::Rejected("unknown refresh token".into())),
                Decision::Expired(_) => {
                    st.grants.remove(&hash);
                    Err(OAuthError::Rejected("refresh token expired".into()))
                }
                Decision::Refuse(why) => Err(OAuthError::Rejected(why)),
                Decision::CheckSuccessor(next) => match st.grants.get(&hash) {
                    Some(old) => reuse(old, st.grants.get(&next), now),
                    None => Err(OAuthError::Rejected("unknown refresh token".into())),
                },
                Decision::Rotate(old) => mint(&old).inspect(|minted| {
                    let successor = token_hash(&minted.refresh_token);
                    let (kept, new) = rotated(&old, minted, successor, now, policy);
                    match kept {
                        Some(kept) => st.grants.insert(hash, kept),
                        None => st.grants.remove(&hash),
                    };
                    st.grants.insert(successor, new);
                }),
            }
        };
        done(result);
    }

    fn revoke_device(&self, device_id: &str) {
        self.state().grants.retain(|_, g| !is_device(g, device_id));
    }

    fn prune(&self, now: u64) {
        self.state().prune(now);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Arc;

    const D: &str = "5bbc55bb-686f-4068-6c2d-75c4a8b4f49a";
    const NOW: u64 = 1_800_000_000;
    const POLICY: GrantPolicy = GrantPolicy {
        ttl: 1000,
        reuse_window: 60,
    };

    /// Waits for a store's answer (the tests' stores may answer late).
    pub(crate) fn wait<T: Send + 'static>(start: impl FnOnce(Done<T>)) -> Result<T, OAuthError> {
        let (tx, rx) = flume::bounded(1);
        start(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        rx.recv_timeout(std::time::Duration::from_secs(20))
            .unwrap_or_else(|_| Err(OAuthError::Unavailable("no answer".into())))
    }

    pub(crate) fn grant(device: &str, expires_at: u64) -> GrantRecord {
        GrantRecord {
            owner: "alice".into(),
            device_id: Some(device.into()),
            expires_at,
            rotation: None,
        }
    }

    fn mint_n(n: u64) -> Mint {
        Box::new(move |g: &GrantRecord| {
            Ok(Minted {
                access_token: format!("access-{n}-{}", g.owner),
                access_expires_at: NOW + 3600 + n,
                refresh_token: format!("refresh-{n}"),
            })
        })
    }

    pub(crate) fn refresh(
        store: &dyn GrantStore,
        token: &str,
        now: u64,
        policy: GrantPolicy,
        n: u64,
    ) -> Result<Minted, OAuthError> {
        wait(|done| store.refresh(token_hash(token), now, policy, mint_n(n), done))
    }

    pub(crate) fn redeem(
        store: &dyn GrantStore,
        code: &str,
        token: &str,
        device: &str,
        now: u64,
        ttl: u64,
    ) -> Result<(), OAuthError> {
        wait(|done| {
            store.redeem(
                Redemption {
                    code_id: code.into(),
                    code_expires_at: now + 600,
                    hash: token_hash(token),
                    grant: grant(device, now + ttl),
                    now,
                },
                done,
            )
        })
    }

    /// The behaviour every store must show; run on each of them.
    pub(crate) fn contract(store: Arc<dyn GrantStore>) {
        let s = store.as_ref();
        // One-time codes.
        redeem(s, "code-1", "r0", D, NOW, POLICY.ttl).unwrap();
        assert!(matches!(
            redeem(s, "code-1", "other", D, NOW, POLICY.ttl),
            Err(OAuthError::Rejected(_))
        ));
        assert!(matches!(
            refresh(s, "other", NOW, POLICY, 9),
            Err(OAuthError::Rejected(_))
        ));
        // Rotate.
        let first = refresh(s, "r0", NOW + 1, POLICY, 1).unwrap();
        assert_eq!(first.refresh_token, "refresh-1");
        // Reuse inside the window: the identical pair.
        let again = refresh(s, "r0", NOW + 30, POLICY, 2).unwrap();
        assert_eq!(again, first);
        // The successor works, and then the old one is refused even in
        // the window.
        let second = refresh(s, "refresh-1", NOW + 40, POLICY, 3).unwrap();
        assert_eq!(second.refresh_token, "refresh-3");
        assert!(matches!(
            refresh(s, "r0", NOW + 41, POLICY, 4),
            Err(OAuthError::Rejected(_))
        ));
        // Reuse after the window: refused.
        assert!(matches!(
            refresh(s, "refresh-1", NOW + 40 + 61, POLICY, 5),
            Err(OAuthError::Rejected(_))
        ));
        // Reuse after the window with the successor unused: refused too.
        redeem(s, "code-5", "r-w", D, NOW, 5000).unwrap();
        refresh(s, "r-w", NOW + 1, POLICY, 12).unwrap();
        assert!(matches!(
            refresh(s, "r-w", NOW + 62, POLICY, 13),
            Err(OAuthError::Rejected(_))
        ));
        assert!(refresh(s, "refresh-12", NOW + 63, POLICY, 14).is_ok());
        // Expiry: refresh-3 was issued at NOW+40 for ttl.
        assert!(matches!(
            refresh(s, "refresh-3", NOW + 40 + POLICY.ttl, POLICY, 6),
            Err(OAuthError::Rejected(_))
        ));
        // Revoke by device.
        redeem(
            s,
            "code-2",
            "r-other",
            "00000000-0000-0000-0000-000000000001",
            NOW,
            5000,
        )
        .unwrap();
        redeem(s, "code-3", "r-d", D, NOW, 5000).unwrap();
        s.revoke_device(&D.to_uppercase());
        // Nobody waits for a revocation: it shows soon.
        let mut tries = 0;
        while refresh(s, "r-d", NOW + 100, POLICY, 7).is_ok() {
            tries += 1;
            assert!(tries < 250, "the revoked grant still refreshes");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(matches!(
            refresh(s, "r-d", NOW + 100, POLICY, 7),
            Err(OAuthError::Rejected(_))
        ));
        assert!(refresh(s, "r-other", NOW + 100, POLICY, 8).is_ok());
        // No window: a used token is gone at once.
        let no_window = GrantPolicy {
            reuse_window: 0,
            ..POLICY
        };
        redeem(s, "code-4", "r-nw", D, NOW, 5000).unwrap();
        refresh(s, "r-nw", NOW + 1, no_window, 10).unwrap();
        assert!(matches!(
            refresh(s, "r-nw", NOW + 2, no_window, 11),
            Err(OAuthError::Rejected(_))
        ));
        s.prune(NOW + 1_000_000);
    }

    #[test]
    fn the_memory_store_keeps_the_contract() {
        contract(Arc::new(MemoryGrants::new()));
    }

    #[test]
    fn prune_drops_expired_grants_and_codes() {
        let m = MemoryGrants::new();
        redeem(&m, "c", "t", D, NOW, 100).unwrap();
        m.prune(NOW + 50);
        assert_eq!(m.len(), 1);
        m.prune(NOW + 100);
        assert!(m.is_empty());
        assert_eq!(m.state().codes.len(), 1);
        m.prune(NOW + 601);
        assert!(m.state().codes.is_empty());
    }

    #[test]
    fn decisions() {
        let g = grant(D, NOW + 10);
        assert_eq!(decide(None, NOW, POLICY), Decision::Unknown);
        assert_eq!(decide(Some(&g), NOW, POLICY), Decision::Rotate(g.clone()));
        assert!(matches!(
            decide(Some(&g), NOW + 10, POLICY),
            Decision::Expired(_)
        ));
        let minted = Minted {
            access_token: "a".into(),
            access_expires_at: NOW + 3600,
            refresh_token: "b".into(),
        };
        let (kept, new) = rotated(&g, &minted, token_hash("b"), NOW, POLICY);
        let kept = kept.unwrap();
        assert_eq!(new.expires_at, NOW + POLICY.ttl);
        assert_eq!(kept.expires_at, NOW + 10);
        assert_eq!(
            decide(Some(&kept), NOW + 5, POLICY),
            Decision::CheckSuccessor(token_hash("b"))
        );
        assert_eq!(reuse(&kept, Some(&new), NOW + 5), Ok(minted));
        assert!(reuse(&kept, None, NOW + 5).is_err());
        assert!(matches!(
            decide(Some(&kept), NOW + 61, POLICY),
            Decision::Refuse(_)
        ));
        assert_eq!(hash_hex(&token_hash("")).len(), 64);
    }
}
