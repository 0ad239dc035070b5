//! The NATS hub's [`GrantStore`] (issue 13): the embedded authority's
//! refresh grants and used sign-up codes in the bucket `<p>-grants`, so
//! that any node refreshes a device that signed up on another one.
//!
//! | key | value |
//! |---|---|
//! | `g.<sha256 hex of the refresh token>` | the grant ([`super::super::grants::encode_grant`]) |
//! | `c.<code jti>` | a used code: its expiry, Unix seconds (u64 LE) |
//! | `d.<device>.<sha256 hex>` | empty: the device's grants, for sign-off |
//!
//! A code is used once across nodes: its key is written with `create`,
//! which fails when the key exists. A rotation is a compare-and-set
//! (`update` with the revision read) of the old grant, after the
//! successor was created: a node that loses the race deletes its
//! successor and decides again (the winner's pair is then reused).
//!
//! Expiry: nats-server 2.9 (Debian's) has no per-key TTL, so every read
//! checks the record's own expiry (and deletes what expired), and the
//! bucket's `max_age` is the longest a record must live
//! ([`super::NatsSettings::grant_max_age`]: the refresh token TTL, or the
//! code TTL if longer) so that the broker drops old records by itself.
//! Every record is rewritten at most at its rotation, after which it
//! needs to live only for the reuse window, shorter than the TTL.
//!
//! Sign-off lists `d.<device>.>` (one filtered read of the bucket's
//! stream) and deletes those grants; markers of grants that were rotated
//! away are left to `max_age`.

use std::sync::Arc;

use async_nats::jetstream::kv;
use bytes::Bytes;

use super::super::grants::{decode_grant, device_key, encode_grant};
use super::records::token;
use super::{Inner, CAS_TRIES};
use crate::auth::grants::{
    decide, hash_hex, reuse, rotated, token_hash, Decision, Done, GrantPolicy, GrantRecord,
    GrantStore, Mint, Minted, Redemption, TokenHash,
};
use crate::auth::provider::OAuthError;

pub(super) struct NatsGrants {
    pub(super) inner: Arc<Inner>,
    pub(super) handle: tokio::runtime::Handle,
}

impl std::fmt::Debug for NatsGrants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsGrants").finish_non_exhaustive()
    }
}

fn grant_key(hash: &TokenHash) -> String {
    format!("g.{}", hash_hex(hash))
}

fn code_key(id: &str) -> String {
    format!("c.{}", token(id))
}

fn device_prefix(device_id: &str) -> String {
    format!("d.{}", token(&device_key(device_id)))
}

fn marker_key(record: &GrantRecord, hash: &TokenHash) -> Option<String> {
    let device = record.device_id.as_deref()?;
    Some(format!("{}.{}", device_prefix(device), hash_hex(hash)))
}

fn broker(e: impl std::fmt::Display) -> OAuthError {
    OAuthError::Unavailable(format!("the NATS broker: {e}"))
}

impl NatsGrants {
    fn store(&self) -> &kv::Store {
        &self.inner.grants
    }

    /// Runs `work` on the hub's runtime, bounded by `request_timeout`,
    /// and hands its result to `done` there: the caller never waits.
    fn spawn<T, F>(&self, work: F, done: Done<T>)
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, OAuthError>> + Send + 'static,
    {
        let limit = self.inner.settings.request_timeout;
        self.handle.spawn(async move {
            let result = tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
                Err(OAuthError::Unavailable(
                    "the NATS broker did not answer in time".into(),
                ))
            });
            done(result);
        });
    }
}

/// The grant under `hash` and its revision.
async fn read(
    store: &kv::Store,
    hash: &TokenHash,
) -> Result<Option<(GrantRecord, u64)>, OAuthError> {
    match store.entry(grant_key(hash)).await.map_err(broker)? {
        Some(e) if e.operation == kv::Operation::Put => {
            let grant = decode_grant(&e.value).map_err(OAuthError::Unavailable)?;
            Ok(Some((grant, e.revision)))
        }
        _ => Ok(None),
    }
}

async fn create_grant(
    store: &kv::Store,
    hash: &TokenHash,
    g: &GrantRecord,
) -> Result<(), OAuthError> {
    let bytes = encode_grant(g).map_err(OAuthError::Unavailable)?;
    store
        .create(grant_key(hash), Bytes::from(bytes))
        .await
        .map_err(broker)?;
    if let Some(marker) = marker_key(g, hash) {
        store.put(marker, Bytes::new()).await.map_err(broker)?;
    }
    Ok(())
}

async fn refresh(
    store: kv::Store,
    hash: TokenHash,
    now: u64,
    policy: GrantPolicy,
    mint: Mint,
) -> Result<Minted, OAuthError> {
    let mut mint = Some(mint);
    // Minted once: a lost race reuses the winner's pair, never mints again.
    let mut minted: Option<Minted> = None;
    for _ in 0..CAS_TRIES {
        let found = read(&store, &hash).await?;
        let record = found.as_ref().map(|(g, _)| g);
        match decide(record, now, policy) {
            Decision::Unknown => {
                return Err(OAuthError::Rejected("unknown refresh token".into()));
            }
            Decision::Refuse(why) => return Err(OAuthError::Rejected(why)),
            Decision::Expired(_) => {
                if let Some((_, revision)) = found {
                    let _ = store
                        .delete_expect_revision(grant_key(&hash), Some(revision))
                        .await;
                }
                return Err(OAuthError::Rejected("refresh token expired".into()));
            }
            Decision::CheckSuccessor(next) => {
                let successor = read(&store, &next).await?;
                let Some((old, _)) = found else {
                    return Err(OAuthError::Rejected("unknown refresh token".into()));
                };
                return reuse(&old, successor.as_ref().map(|(g, _)| g), now);
            }
            Decision::Rotate(old) => {
                let Some((_, revision)) = found else {
                    return Err(OAuthError::Rejected("unknown refresh token".into()));
                };
                let pair = match (minted.take(), mint.take()) {
                    (Some(pair), _) => pair,
                    (None, Some(mint)) => mint(&old)?,
                    (None, None) => {
                        return Err(OAuthError::Unavailable("the grant keeps changing".into()))
                    }
                };
                let successor = token_hash(&pair.refresh_token);
                let (kept, new) = rotated(&old, &pair, successor, now, policy);
                create_grant(&store, &successor, &new).await?;
                let swapped = match &kept {
                    Some(kept) => {
                        let bytes = encode_grant(kept).map_err(OAuthError::Unavailable)?;
                        store
                            .update(grant_key(&hash), Bytes::from(bytes), revision)
                            .await
                            .map(|_| ())
                            .map_err(|e| {
                                (
                                    e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                                    e.to_string(),
                                )
                            })
                    }
                    None => store
                        .delete_expect_revision(grant_key(&hash), Some(revision))
                        .await
                        .map_err(|e| {
                            (
                                e.kind() == kv::DeleteErrorKind::WrongLastRevision,
                                e.to_string(),
                            )
                        }),
                };
                match swapped {
                    Ok(()) => return Ok(pair),
                    Err((lost_race, e)) => {
                        // The successor must not outlive a failed rotation.
                        let _ = store.purge(grant_key(&successor)).await;
                        if let Some(marker) = marker_key(&new, &successor) {
                            let _ = store.purge(marker).await;
                        }
                        if !lost_race {
                            return Err(broker(e));
                        }
                        minted = Some(pair);
                    }
                }
            }
        }
    }
    Err(OAuthError::Unavailable(
        "the refresh grant keeps changing".into(),
    ))
}

impl GrantStore for NatsGrants {
    fn redeem(&self, r: Redemption, done: Done<()>) {
        let store = self.store().clone();
        self.spawn(
            async move {
                let key = code_key(&r.code_id);
                let expires = Bytes::copy_from_slice(&r.code_expires_at.to_le_bytes());
                match store.create(&key, expires.clone()).await {
                    Ok(_) => {}
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                        // A record of a code that expired since (the
                        // broker's max_age keeps it a while) does not
                        // count; the authority refuses expired codes.
                        let entry = store.entry(&key).await.map_err(broker)?;
                        let live = entry.as_ref().is_some_and(|e| {
                            <[u8; 8]>::try_from(e.value.as_ref())
                                .map(u64::from_le_bytes)
                                .map_or(true, |exp| exp >= r.now)
                        });
                        let Some(entry) = entry.filter(|_| !live) else {
                            return Err(OAuthError::Rejected(
                                "authorization code already used".into(),
                            ));
                        };
                        store
                            .update(&key, expires, entry.revision)
                            .await
                            .map_err(|_| {
                                OAuthError::Rejected("authorization code already used".into())
                            })?;
                    }
                    Err(e) => return Err(broker(e)),
                }
                create_grant(&store, &r.hash, &r.grant).await
            },
            done,
        );
    }

    fn refresh(
        &self,
        hash: TokenHash,
        now: u64,
        policy: GrantPolicy,
        mint: Mint,
        done: Done<Minted>,
    ) {
        let store = self.store().clone();
        self.spawn(refresh(store, hash, now, policy, mint), done);
    }

    fn revoke_device(&self, device_id: &str) {
        let inner = self.inner.clone();
        let prefix = device_prefix(device_id);
        let device_id = device_id.to_owned();
        self.spawn(
            async move {
                let markers = inner
                    .scan(&inner.grants, &format!("{prefix}.>"))
                    .await
                    .map_err(|e| OAuthError::Unavailable(e.to_string()))?;
                for (key, _, _) in markers {
                    if let Some(hex) = key.rsplit('.').next() {
                        inner
                            .grants
                            .purge(format!("g.{hex}"))
                            .await
                            .map_err(broker)?;
                    }
                    inner.grants.purge(&key).await.map_err(broker)?;
                }
                Ok(())
            },
            Box::new(move |r: Result<(), OAuthError>| {
                if let Err(e) = r {
                    tracing::error!(%device_id, "cannot revoke the device's refresh tokens: {e}");
                }
            }),
        );
    }
}
