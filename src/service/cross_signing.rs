//! Cross-signing: each user's master, self-signing and user-signing keys, and the
//! signatures devices and users make over each other's keys. Clients do the
//! cryptography; the server stores what the user uploads and serves it to others.

use std::collections::BTreeMap;

use ruma::{OwnedUserId, api::client::uiaa::AuthData, encryption::CrossSigningKey, serde::Raw};
use serde_json::{Value as JsonValue, value::RawValue};

use super::{Services, Session};
use crate::{
    error::{Error, Result},
    storage::SignedKeyChanges,
};

/// Key types as stored, with the usage each key must declare.
const KEY_TYPES: [(&str, &str); 3] =
    [("master", "master"), ("self_signing", "self_signing"), ("user_signing", "user_signing")];

impl Services {
    /// `POST /keys/device_signing/upload`. Replacing an existing master key needs the
    /// user's password (UIA); publishing the first one does not (as the spec allows,
    /// so that clients can set up cross-signing right after registering).
    pub async fn upload_signing_keys(
        &self,
        session: &Session,
        auth: Option<&AuthData>,
        keys: [Option<&Raw<CrossSigningKey>>; 3],
        client_ip: &str,
    ) -> Result<()> {
        let user = &session.user_id;
        let existing = self.store.get_cross_signing_keys(user.as_str()).await?;
        let has_master = existing.iter().any(|(t, _)| t == "master");
        if has_master {
            self.require_password_uiaa("device_signing", user, auth, client_ip).await?;
        }
        let mut to_store = Vec::new();
        for ((key_type, usage), raw) in KEY_TYPES.iter().zip(keys) {
            let Some(raw) = raw else { continue };
            let key: CrossSigningKey =
                raw.deserialize().map_err(|e| Error::bad_json(format!("Invalid {key_type} key: {e}")))?;
            if key.user_id != *user {
                return Err(Error::invalid_param(format!("The {key_type} key must be your own")));
            }
            if !key.usage.iter().any(|u| u.as_str() == *usage) {
                return Err(Error::invalid_param(format!("The {key_type} key must have usage {usage}")));
            }
            to_store.push((*key_type, raw.json().get()));
        }
        if to_store.is_empty() {
            return Ok(());
        }
        if !has_master && !to_store.iter().any(|(t, _)| *t == "master") {
            return Err(Error::invalid_param("Upload a master key first"));
        }
        // Without the password, only if there is still no master key when storing:
        // a concurrent first upload does not let a second one replace it unchecked.
        if !self.store.store_cross_signing_keys(user.as_str(), &to_store, !has_master).await? {
            self.require_password_uiaa("device_signing", user, auth, client_ip).await?;
            self.store.store_cross_signing_keys(user.as_str(), &to_store, false).await?;
        }
        self.federate_signing_key_update(user).await;
        self.wake_room_peers(user).await
    }

    /// `POST /keys/signatures/upload`: merges the signatures the user made into the
    /// stored keys they sign: their own devices and cross-signing keys, or another
    /// user's master key (signed with the user-signing key). Returns failures by user
    /// and key id. Each user's keys are read, merged and written in one transaction,
    /// so concurrent uploads lose nothing.
    pub async fn upload_signatures(
        &self,
        session: &Session,
        signed: &BTreeMap<OwnedUserId, Vec<(String, Box<RawValue>)>>,
    ) -> Result<BTreeMap<OwnedUserId, BTreeMap<String, JsonValue>>> {
        let mut failures: BTreeMap<OwnedUserId, BTreeMap<String, JsonValue>> = BTreeMap::new();
        for (user, objects) in signed {
            let mut user_failures = BTreeMap::new();
            let changed = self
                .store
                .update_signed_keys(user.as_str(), |devices, cross| {
                    let devices: BTreeMap<String, String> = devices.iter().cloned().collect();
                    let cross: BTreeMap<String, String> = cross.iter().cloned().collect();
                    let (merged, fails) = merge_signatures(session, user, objects, &devices, &cross)?;
                    user_failures = fails;
                    Ok(merged)
                })
                .await?;
            if !user_failures.is_empty() {
                failures.insert(user.clone(), user_failures);
            }
            if changed {
                self.wake_room_peers(user).await?;
            }
        }
        Ok(failures)
    }
}

/// Merges the signer's signatures in `objects` into `user`'s stored keys; answers the
/// changed keys and the failures by key id.
fn merge_signatures(
    session: &Session,
    user: &OwnedUserId,
    objects: &[(String, Box<RawValue>)],
    devices: &BTreeMap<String, String>,
    cross: &BTreeMap<String, String>,
) -> Result<(SignedKeyChanges, BTreeMap<String, JsonValue>)> {
    let signer = session.user_id.as_str();
    let own = user == &session.user_id;
    let mut failures = BTreeMap::new();
    // Keys being changed, by (is_cross, name), as merged so far.
    let mut changed: BTreeMap<(bool, String), JsonValue> = BTreeMap::new();
    for (key_id, object) in objects {
        let mut fail = |message: &str| {
            failures.insert(key_id.clone(), serde_json::json!({"errcode": "M_INVALID_SIGNATURE", "error": message}));
        };
        let Ok(uploaded) = serde_json::from_str::<JsonValue>(object.get()) else {
            fail("Not a JSON object");
            continue;
        };
        let Some(new_sigs) = uploaded["signatures"][signer].as_object() else {
            fail("No signature of yours on it");
            continue;
        };
        // The stored object this signs: a device of the user, or one of their
        // cross-signing keys, named by its public key.
        let target = match devices.get(key_id.as_str()) {
            Some(json) if own => Some((false, key_id.clone(), json.clone())),
            _ => cross
                .iter()
                .filter(|(t, _)| own || t.as_str() == "master")
                .find(|(_, json)| {
                    serde_json::from_str::<JsonValue>(json).is_ok_and(|k| {
                        k["keys"].as_object().is_some_and(|keys| keys.contains_key(&format!("ed25519:{key_id}")))
                    })
                })
                .map(|(t, json)| (true, t.clone(), json.clone())),
        };
        let Some((is_cross, name, json)) = target else {
            fail("No such key of that user, or not one you may sign");
            continue;
        };
        let stored = match changed.entry((is_cross, name)) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(serde_json::from_str(&json).map_err(Error::internal)?)
            }
        };
        if !stored["signatures"].is_object() {
            stored["signatures"] = serde_json::json!({});
        }
        if !stored["signatures"][signer].is_object() {
            stored["signatures"][signer] = serde_json::json!({});
        }
        for (sig_key, sig) in new_sigs {
            stored["signatures"][signer][sig_key] = sig.clone();
        }
    }
    let mut merged = SignedKeyChanges::default();
    for ((is_cross, name), value) in changed {
        let json = serde_json::to_string(&value).map_err(Error::internal)?;
        if is_cross { merged.cross_signing.push((name, json)) } else { merged.devices.push((name, json)) }
    }
    Ok((merged, failures))
}
