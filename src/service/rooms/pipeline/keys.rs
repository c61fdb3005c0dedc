//! Server keys trusted without asking anyone: our own, and test keys.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::RwLock,
};

use ruma::{OwnedServerName, serde::Base64, signatures::PublicKeyMap};

/// Keys known without asking anyone: our own, and any added with `add`.
pub struct KnownKeys {
    keys: RwLock<PublicKeyMap>,
}

impl KnownKeys {
    pub fn new(server: &str, key_id: &str, public_key: &[u8]) -> Self {
        let keys = KnownKeys { keys: RwLock::new(BTreeMap::new()) };
        keys.add(server, key_id, public_key);
        keys
    }

    /// Trusts `public_key` as `server`'s key `key_id` (such as "ed25519:1").
    pub fn add(&self, server: &str, key_id: &str, public_key: &[u8]) {
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        keys.entry(server.to_owned()).or_default().insert(key_id.to_owned(), Base64::new(public_key.to_vec()));
    }

    /// The known keys of those of `servers` that have some.
    pub fn public_keys(&self, servers: &BTreeSet<OwnedServerName>) -> PublicKeyMap {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.iter()
            .filter(|(s, _)| servers.iter().any(|n| n.as_str() == s.as_str()))
            .map(|(s, k)| (s.clone(), k.clone()))
            .collect()
    }
}
