//! The token validator every shard uses, swappable as a whole when the
//! control plane fetches new keys (spec §4.1: keys refreshed, and fetched
//! again once on an unknown `kid`). Reads are lock-free (`arc-swap`): a
//! sign-in loads the current validator and verifies on the shard.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;

use super::jwks::Jwks;
use super::jwt::TokenValidator;

/// Asks the control plane to fetch the keys again now.
pub type RefreshHook = Box<dyn Fn() + Send + Sync>;

pub struct SharedValidator {
    current: ArcSwap<TokenValidator>,
    refresh: OnceLock<RefreshHook>,
    /// Key sets installed so far.
    installed: AtomicU64,
    /// Unknown `kid`s, with the key-set count when first seen.
    missing: Mutex<HashMap<String, u64>>,
}

/// What to tell a device whose token names a key we do not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownKey {
    /// A fetch of the key set was asked for: try again shortly (5.03).
    Fetching,
    /// No fetcher, or the key set was fetched since this key was first
    /// missed and still lacks it: the token is bad (4.01).
    Unknown,
}

/// Bound on remembered unknown `kid`s (tokens can name any string).
const MAX_MISSING: usize = 1024;

impl std::fmt::Debug for SharedValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedValidator")
            .field("keys", &self.current.load().keys().len())
            .finish_non_exhaustive()
    }
}

impl SharedValidator {
    pub fn new(validator: TokenValidator) -> SharedValidator {
        SharedValidator {
            current: ArcSwap::from_pointee(validator),
            refresh: OnceLock::new(),
            installed: AtomicU64::new(0),
            missing: Mutex::new(HashMap::new()),
        }
    }

    /// The validator in force.
    pub fn load(&self) -> Arc<TokenValidator> {
        self.current.load_full()
    }

    /// Replaces the key set; the settings stay.
    pub fn set_keys(&self, keys: Jwks) {
        let mut next = TokenValidator::clone(&self.current.load());
        next.set_keys(keys);
        self.current.store(Arc::new(next));
        self.installed.fetch_add(1, Ordering::Release);
    }

    /// Installs how [`request_refresh`](Self::request_refresh) reaches the
    /// key fetcher (once; the fetcher starts after the validator exists).
    pub fn set_refresh_hook(&self, hook: RefreshHook) {
        if self.refresh.set(hook).is_err() {
            tracing::warn!("key refresh hook set twice; keeping the first");
        }
    }

    /// A token named a key we do not have: fetch the set again (spec §4.1).
    /// Without a fetcher (embedded keys) this does nothing.
    pub fn request_refresh(&self) {
        if let Some(hook) = self.refresh.get() {
            hook();
        }
    }

    /// A token names `kid`, which the key set lacks (spec §4.1: "on a cache
    /// miss the JWKS is re-fetched once"). The first miss asks for a fetch;
    /// a miss after a key set was installed since is final.
    pub fn unknown_key(&self, kid: &str) -> UnknownKey {
        if self.refresh.get().is_none() {
            return UnknownKey::Unknown;
        }
        let installed = self.installed.load(Ordering::Acquire);
        let mut missing = self.missing.lock().unwrap_or_else(|p| p.into_inner());
        if missing.len() >= MAX_MISSING && !missing.contains_key(kid) {
            missing.clear();
        }
        let first_seen = *missing.entry(kid.to_owned()).or_insert(installed);
        drop(missing);
        if first_seen < installed {
            UnknownKey::Unknown
        } else {
            self.request_refresh();
            UnknownKey::Fetching
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::jwt::ValidationSettings;

    fn shared() -> SharedValidator {
        SharedValidator::new(
            TokenValidator::new(Jwks::default(), ValidationSettings::default()).unwrap(),
        )
    }

    #[test]
    fn without_a_fetcher_an_unknown_key_is_final() {
        assert_eq!(shared().unknown_key("k"), UnknownKey::Unknown);
    }

    #[test]
    fn an_unknown_key_is_fetched_once_then_final() {
        let v = shared();
        let asked = Arc::new(AtomicU64::new(0));
        let counter = asked.clone();
        v.set_refresh_hook(Box::new(move || {
            counter.fetch_add(1, Ordering::Relaxed);
        }));
        assert_eq!(v.unknown_key("k"), UnknownKey::Fetching);
        assert_eq!(v.unknown_key("k"), UnknownKey::Fetching, "no fetch yet");
        v.set_keys(Jwks::default());
        assert_eq!(v.unknown_key("k"), UnknownKey::Unknown);
        assert_eq!(v.unknown_key("other"), UnknownKey::Fetching);
        assert_eq!(asked.load(Ordering::Relaxed), 3);
    }
}
