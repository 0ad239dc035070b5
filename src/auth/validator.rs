//! The token validator every shard uses, swappable as a whole when the
//! control plane fetches new keys (spec §4.1: keys refreshed, and fetched
//! again once on an unknown `kid`). Reads are lock-free (`arc-swap`): a
//! sign-in loads the current validator and verifies on the shard.

use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;

use super::jwks::Jwks;
use super::jwt::TokenValidator;

/// Asks the control plane to fetch the keys again now.
pub type RefreshHook = Box<dyn Fn() + Send + Sync>;

pub struct SharedValidator {
    current: ArcSwap<TokenValidator>,
    refresh: OnceLock<RefreshHook>,
}

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
}
