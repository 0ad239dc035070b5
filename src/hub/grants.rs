//! The embedded hub's [`GrantStore`] (issue 13): refresh grants and used
//! sign-up codes in redb, written through the store's write-ahead log and
//! group commits like every other record (so a restart and a replay
//! after a crash restore them).
//!
//! A refresh reads the grant from redb (a point read) under one lock that
//! serialises the grant store's decisions; its writes go to the persister
//! without waiting ([`super::store::Side`]) and the answer is given once
//! they are durable and readable, from the persister's thread. Writes
//! queued but not yet in redb are kept in a small overlay that reads look
//! at first: its size is the writes in flight, not the grants.
//! Sign-off finds a device's grants through an index table
//! (device key, grant hash).
//!
//! Expired grants are dropped when they are read and by
//! [`GrantStore::prune`], which the control plane calls periodically (a
//! scan of the grants table: rkyv reads without copies, about 0.1 s per
//! million grants).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use rkyv::rancor;
use rkyv::util::AlignedVec;

use super::store::{Op, Side};
use crate::auth::grants::{
    decide, reuse, rotated, token_hash, Decision, Done, GrantPolicy, GrantRecord, GrantStore, Mint,
    Minted, Redemption, Rotation, TokenHash,
};
use crate::auth::provider::OAuthError;

/// The version byte in front of a grant's rkyv bytes.
const GRANT_FORMAT: u8 = 1;

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct GrantRec {
    owner: String,
    device_id: Option<String>,
    expires_at: u64,
    rotation: Option<RotationRec>,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct RotationRec {
    at: u64,
    successor: [u8; 32],
    access_token: String,
    access_expires_at: u64,
    refresh_token: String,
}

/// A grant as stored (redb value, NATS KV value).
pub(crate) fn encode_grant(g: &GrantRecord) -> Result<Vec<u8>, String> {
    let rec = GrantRec {
        owner: g.owner.clone(),
        device_id: g.device_id.clone(),
        expires_at: g.expires_at,
        rotation: g.rotation.as_ref().map(|r| RotationRec {
            at: r.at,
            successor: r.successor,
            access_token: r.tokens.access_token.clone(),
            access_expires_at: r.tokens.access_expires_at,
            refresh_token: r.tokens.refresh_token.clone(),
        }),
    };
    let bytes = super::store::encode(&rec)?;
    let mut out = Vec::with_capacity(bytes.len() + 1);
    out.push(GRANT_FORMAT);
    out.extend_from_slice(&bytes);
    Ok(out)
}

pub(crate) fn decode_grant(bytes: &[u8]) -> Result<GrantRecord, String> {
    let Some((&GRANT_FORMAT, body)) = bytes.split_first() else {
        return Err("a grant of an unknown format".into());
    };
    let mut buf = AlignedVec::<16>::new();
    buf.extend_from_slice(body);
    let rec = rkyv::from_bytes::<GrantRec, rancor::Error>(&buf)
        .map_err(|e| format!("undecodable grant ({e})"))?;
    Ok(GrantRecord {
        owner: rec.owner,
        device_id: rec.device_id,
        expires_at: rec.expires_at,
        rotation: rec.rotation.map(|r| Rotation {
            at: r.at,
            successor: r.successor,
            tokens: Minted {
                access_token: r.access_token,
                access_expires_at: r.access_expires_at,
                refresh_token: r.refresh_token,
            },
        }),
    })
}

/// Device IDs are UUIDs: `ABC…` and `abc…` are one device (as the hub's
/// device keys).
pub(crate) fn device_key(device_id: &str) -> String {
    match uuid::Uuid::parse_str(device_id) {
        Ok(id) => id.hyphenated().to_string(),
        Err(_) => device_id.to_owned(),
    }
}

/// The grant store of the durable embedded hub.
pub(crate) struct StoreGrants {
    side: Side,
    overlay: Mutex<Overlay>,
    me: Weak<StoreGrants>,
}

impl std::fmt::Debug for StoreGrants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreGrants").finish_non_exhaustive()
    }
}

/// Writes queued but not yet readable from redb, each with the number of
/// the write that made it (`None` = deleted).
#[derive(Default)]
struct Overlay {
    grants: HashMap<TokenHash, (u64, Option<GrantRecord>)>,
    codes: HashMap<String, (u64, Option<u64>)>,
    gen: u64,
}

/// Clears a write's overlay entries once it is in redb (or failed) and
/// tells its caller: `done(true)` after the commit, `done(false)` when the
/// write was dropped uncommitted.
struct Finish {
    store: Weak<StoreGrants>,
    gen: u64,
    grants: Vec<TokenHash>,
    codes: Vec<String>,
    done: Option<Box<dyn FnOnce(bool) + Send>>,
}

impl Finish {
    fn finish(&mut self, ok: bool) {
        if let Some(store) = self.store.upgrade() {
            let mut ov = store.lock();
            for h in &self.grants {
                if ov.grants.get(h).is_some_and(|(g, _)| *g == self.gen) {
                    ov.grants.remove(h);
                }
            }
            for c in &self.codes {
                if ov.codes.get(c).is_some_and(|(g, _)| *g == self.gen) {
                    ov.codes.remove(c);
                }
            }
        }
        if let Some(done) = self.done.take() {
            done(ok);
        }
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        if self.done.is_some() {
            self.finish(false);
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> OAuthError {
    tracing::error!("the grant store failed: {e}");
    OAuthError::Unavailable(format!("the token store failed: {e}"))
}

fn not_recorded() -> OAuthError {
    OAuthError::Unavailable("the token store could not record the grant".into())
}

impl StoreGrants {
    pub(crate) fn new(side: Side) -> Arc<StoreGrants> {
        Arc::new_cyclic(|me| StoreGrants {
            side,
            overlay: Mutex::new(Overlay::default()),
            me: me.clone(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Overlay> {
        self.overlay.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn grant(&self, ov: &Overlay, hash: &TokenHash) -> Result<Option<GrantRecord>, OAuthError> {
        match ov.grants.get(hash) {
            Some((_, g)) => Ok(g.clone()),
            None => self.side.grant(hash).map_err(unavailable),
        }
    }

    fn code(&self, ov: &Overlay, id: &str) -> Result<Option<u64>, OAuthError> {
        match ov.codes.get(id) {
            Some((_, c)) => Ok(*c),
            None => self.side.code(id).map_err(unavailable),
        }
    }

    /// Queues `ops` (their overlay entries made now, under `ov`) and
    /// arranges `done` for when they are committed. What the store
    /// refused is returned, to be dropped after the lock is released (its
    /// [`Finish`] takes the lock).
    #[must_use]
    fn write(
        &self,
        ov: &mut Overlay,
        mut ops: Vec<Op>,
        done: Box<dyn FnOnce(bool) + Send>,
    ) -> Option<Vec<Op>> {
        ov.gen += 1;
        let gen = ov.gen;
        let mut finish = Finish {
            store: self.me.clone(),
            gen,
            grants: Vec::new(),
            codes: Vec::new(),
            done: Some(done),
        };
        for op in &ops {
            match op {
                Op::PutGrant { hash, record, .. } => {
                    ov.grants.insert(*hash, (gen, Some(record.clone())));
                    finish.grants.push(*hash);
                }
                Op::RemoveGrant { hash, .. } => {
                    ov.grants.insert(*hash, (gen, None));
                    finish.grants.push(*hash);
                }
                Op::PutCode { id, expires_at } => {
                    ov.codes.insert(id.clone(), (gen, Some(*expires_at)));
                    finish.codes.push(id.clone());
                }
                Op::RemoveCode { id } => {
                    ov.codes.insert(id.clone(), (gen, None));
                    finish.codes.push(id.clone());
                }
                _ => {}
            }
        }
        ops.push(Op::Call(Box::new(move || finish.finish(true))));
        match self.side.send(ops) {
            Ok(()) => None,
            Err((e, ops)) => {
                tracing::warn!("a grant was not recorded: {e}");
                Some(ops)
            }
        }
    }

    fn put(hash: TokenHash, record: GrantRecord) -> Op {
        Op::PutGrant {
            hash,
            device_key: record.device_id.as_deref().map(device_key),
            record,
        }
    }

    fn remove(hash: TokenHash, record: Option<&GrantRecord>) -> Op {
        Op::RemoveGrant {
            hash,
            device_key: record.and_then(|r| r.device_id.as_deref()).map(device_key),
        }
    }
}

/// `done` with `value` once committed, unavailable otherwise.
fn after_commit<T: Send + 'static>(done: Done<T>, value: T) -> Box<dyn FnOnce(bool) + Send> {
    Box::new(move |ok| done(if ok { Ok(value) } else { Err(not_recorded()) }))
}

impl GrantStore for StoreGrants {
    fn redeem(&self, r: Redemption, done: Done<()>) {
        let mut ov = self.lock();
        let used = match self.code(&ov, &r.code_id) {
            Ok(used) => used.is_some_and(|exp| exp >= r.now),
            Err(e) => {
                drop(ov);
                return done(Err(e));
            }
        };
        if used {
            drop(ov);
            return done(Err(OAuthError::Rejected(
                "authorization code already used".into(),
            )));
        }
        let ops = vec![
            Op::PutCode {
                id: r.code_id,
                expires_at: r.code_expires_at,
            },
            Self::put(r.hash, r.grant),
        ];
        let refused = self.write(&mut ov, ops, after_commit(done, ()));
        drop(ov);
        drop(refused);
    }

    fn refresh(
        &self,
        hash: TokenHash,
        now: u64,
        policy: GrantPolicy,
        mint: Mint,
        done: Done<Minted>,
    ) {
        let mut ov = self.lock();
        let record = match self.grant(&ov, &hash) {
            Ok(r) => r,
            Err(e) => {
                drop(ov);
                return done(Err(e));
            }
        };
        let answer = match decide(record.as_ref(), now, policy) {
            Decision::Unknown => Err(OAuthError::Rejected("unknown refresh token".into())),
            Decision::Refuse(why) => Err(OAuthError::Rejected(why)),
            Decision::Expired(old) => {
                let refused = self.write(
                    &mut ov,
                    vec![Self::remove(hash, Some(&old))],
                    Box::new(|_| {}),
                );
                drop(ov);
                drop(refused);
                return done(Err(OAuthError::Rejected("refresh token expired".into())));
            }
            Decision::CheckSuccessor(next) => {
                let successor = self.grant(&ov, &next);
                match (record.as_ref(), successor) {
                    (Some(old), Ok(successor)) => {
                        let in_flight =
                            ov.grants.contains_key(&hash) || ov.grants.contains_key(&next);
                        match reuse(old, successor.as_ref(), now) {
                            // A rotation still on its way to the disk: the
                            // pair is handed out once it is there.
                            Ok(pair) if in_flight => {
                                let refused =
                                    self.write(&mut ov, Vec::new(), after_commit(done, pair));
                                drop(ov);
                                drop(refused);
                                return;
                            }
                            other => other,
                        }
                    }
                    (_, Err(e)) => Err(e),
                    (None, _) => Err(OAuthError::Rejected("unknown refresh token".into())),
                }
            }
            Decision::Rotate(old) => match mint(&old) {
                Err(e) => Err(e),
                Ok(minted) => {
                    let successor = token_hash(&minted.refresh_token);
                    let (kept, new) = rotated(&old, &minted, successor, now, policy);
                    let mut ops = vec![Self::put(successor, new)];
                    ops.push(match kept {
                        Some(kept) => Self::put(hash, kept),
                        None => Self::remove(hash, Some(&old)),
                    });
                    let refused = self.write(&mut ov, ops, after_commit(done, minted));
                    drop(ov);
                    drop(refused);
                    return;
                }
            },
        };
        drop(ov);
        done(answer);
    }

    fn revoke_device(&self, device_id: &str) {
        let key = device_key(device_id);
        let mut ov = self.lock();
        let mut hashes = match self.side.device_grants(&key) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(device_id, "cannot revoke the device's refresh tokens: {e}");
                return;
            }
        };
        hashes.extend(ov.grants.iter().filter_map(|(h, (_, g))| {
            g.as_ref()
                .is_some_and(|g| crate::auth::grants::is_device(g, device_id))
                .then_some(*h)
        }));
        hashes.sort_unstable();
        hashes.dedup();
        let ops = hashes
            .into_iter()
            .map(|hash| Op::RemoveGrant {
                hash,
                device_key: Some(key.clone()),
            })
            .collect();
        let refused = self.write(&mut ov, ops, Box::new(|_| {}));
        drop(ov);
        drop(refused);
    }

    fn prune(&self, now: u64) {
        let (grants, codes) = match self.side.expired(now) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("cannot prune the refresh grants: {e}");
                return;
            }
        };
        if grants.is_empty() && codes.is_empty() {
            return;
        }
        let mut ov = self.lock();
        // A record with a write in flight is that write's to decide.
        let mut ops: Vec<Op> = grants
            .into_iter()
            .filter(|(h, _)| !ov.grants.contains_key(h))
            .map(|(hash, device_key)| Op::RemoveGrant { hash, device_key })
            .collect();
        ops.extend(
            codes
                .into_iter()
                .filter(|id| !ov.codes.contains_key(id))
                .map(|id| Op::RemoveCode { id }),
        );
        let pruned = ops.len();
        let refused = self.write(&mut ov, ops, Box::new(|_| {}));
        drop(ov);
        drop(refused);
        tracing::debug!(pruned, "pruned expired refresh grants and used codes");
    }
}
