//! Cross-signing: each user's master, self-signing and user-signing keys, and the
//! signatures devices and users make over each other's keys. Clients do the
//! cryptography; the server stores what the user uploads and serves it to others.

use std::collections::BTreeMap;

use ruma::{
    CanonicalJsonObject, OwnedUserId, SigningKeyAlgorithm,
    api::client::uiaa::AuthData,
    encryption::CrossSigningKey,
    serde::{Base64, Raw, base64::Standard},
};
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
    /// stored keys they sign: their own devices (signed with their self-signing key),
    /// their master key (signed by one of their devices or by itself), or another
    /// user's master key (signed with their user-signing key). Each signature is
    /// checked against the signing key; bad ones are not stored and come back as
    /// failures by user and key id. Each user's keys are read, merged and written in
    /// one transaction, so concurrent uploads lose nothing.
    pub async fn upload_signatures(
        &self,
        session: &Session,
        signed: &BTreeMap<OwnedUserId, Vec<(String, Box<RawValue>)>>,
    ) -> Result<BTreeMap<OwnedUserId, BTreeMap<String, JsonValue>>> {
        let mut failures: BTreeMap<OwnedUserId, BTreeMap<String, JsonValue>> = BTreeMap::new();
        // The signer's own keys, for signatures of other users' keys (read once; the
        // signer's keys are checked as they are at the time of the upload).
        let (signer_devices, signer_cross) = if signed.keys().any(|u| u != &session.user_id) {
            let devices = self.store.get_device_keys_of_users(&[session.user_id.as_str()]).await?;
            let cross = self.store.get_cross_signing_keys(session.user_id.as_str()).await?;
            (devices.into_iter().map(|(_, d, json)| (d, json)).collect(), cross.into_iter().collect())
        } else {
            (BTreeMap::new(), BTreeMap::new())
        };
        for (user, objects) in signed {
            let mut user_failures = BTreeMap::new();
            let changed = self
                .store
                .update_signed_keys(user.as_str(), |devices, cross| {
                    let devices: BTreeMap<String, String> = devices.iter().cloned().collect();
                    let cross: BTreeMap<String, String> = cross.iter().cloned().collect();
                    let signer_keys = (&signer_devices, &signer_cross);
                    let (merged, fails) = merge_signatures(session, user, objects, &devices, &cross, signer_keys)?;
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

/// The keys that may sign a key of `user` for `signer`, by key id (`ed25519:...`)
/// and public key (unpadded base64): the signer's self-signing key for their own
/// devices; for their own master key, their devices and the master key itself; the
/// signer's user-signing key for another user's master key.
fn allowed_signers(
    own: bool,
    is_device: bool,
    signer_devices: &BTreeMap<String, String>,
    signer_cross: &BTreeMap<String, String>,
    target_master: Option<&JsonValue>,
) -> BTreeMap<String, String> {
    let ed25519_keys = |json: &JsonValue| -> Vec<(String, String)> {
        json["keys"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(id, _)| id.starts_with("ed25519:"))
            .filter_map(|(id, key)| Some((id.clone(), key.as_str()?.to_owned())))
            .collect()
    };
    let cross_key = |key_type: &str| -> Vec<(String, String)> {
        signer_cross
            .get(key_type)
            .and_then(|json| serde_json::from_str::<JsonValue>(json).ok())
            .map(|k| ed25519_keys(&k))
            .unwrap_or_default()
    };
    match (own, is_device) {
        (true, true) => cross_key("self_signing").into_iter().collect(),
        (true, false) => {
            let mut allowed: BTreeMap<String, String> =
                target_master.map(ed25519_keys).unwrap_or_default().into_iter().collect();
            for (device_id, json) in signer_devices {
                let Ok(keys) = serde_json::from_str::<JsonValue>(json) else { continue };
                let id = format!("ed25519:{device_id}");
                if let Some(key) = keys["keys"][&id].as_str() {
                    allowed.insert(id, key.to_owned());
                }
            }
            allowed
        }
        (false, _) => cross_key("user_signing").into_iter().collect(),
    }
}

/// Checks one signature (`signature`, unpadded base64) by `public_key` over the
/// stored key object without its `signatures` and `unsigned`.
fn signature_verifies(stored: &JsonValue, public_key: &str, signature: &str) -> bool {
    let Ok(object) = serde_json::from_value::<CanonicalJsonObject>(stored.clone()) else { return false };
    let Ok(canonical) = ruma::signatures::to_canonical_json_string_for_signing(&object) else { return false };
    let (Ok(public_key), Ok(signature)) = (Base64::<Standard>::parse(public_key), Base64::<Standard>::parse(signature))
    else {
        return false;
    };
    ruma::signatures::verify_canonical_json_bytes(
        &SigningKeyAlgorithm::Ed25519,
        public_key.as_bytes(),
        signature.as_bytes(),
        canonical.as_bytes(),
    )
    .is_ok()
}

/// Merges the signer's valid signatures in `objects` into `user`'s stored keys;
/// answers the changed keys and the failures by key id. Each signature must be made by
/// a key allowed to sign that key (see `allowed_signers`) and verify over the stored
/// key, so a signature over anything else than what others will fetch is refused.
/// A key with any bad signature keeps none of the upload's.
fn merge_signatures(
    session: &Session,
    user: &OwnedUserId,
    objects: &[(String, Box<RawValue>)],
    devices: &BTreeMap<String, String>,
    cross: &BTreeMap<String, String>,
    signer_keys: (&BTreeMap<String, String>, &BTreeMap<String, String>),
) -> Result<(SignedKeyChanges, BTreeMap<String, JsonValue>)> {
    let signer = session.user_id.as_str();
    let own = user == &session.user_id;
    let (signer_devices, signer_cross) = if own { (devices, cross) } else { signer_keys };
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
        // The stored object this signs: a device of the user, or their master key
        // (or, for the user's own keys, any of their cross-signing keys), named by its
        // public key.
        let target = match devices.get(key_id.as_str()) {
            Some(json) if own => Some((false, key_id.clone(), json.clone())),
            _ => cross
                .iter()
                .filter(|(t, _)| t.as_str() == "master")
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
        let allowed = allowed_signers(own, !is_cross, signer_devices, signer_cross, is_cross.then_some(&*stored));
        let mut valid = Vec::new();
        let mut bad = None;
        for (sig_key, sig) in new_sigs {
            let Some(public_key) = allowed.get(sig_key) else { continue };
            let already = stored["signatures"][signer][sig_key] == *sig;
            match sig.as_str() {
                Some(sig) if already || signature_verifies(stored, public_key, sig) => {
                    valid.push((sig_key.clone(), sig.to_owned()));
                }
                _ => bad = Some(sig_key.clone()),
            }
        }
        if let Some(sig_key) = bad {
            fail(&format!("The signature by {sig_key} does not verify"));
            continue;
        }
        if valid.is_empty() {
            fail("No signature by a key that may sign this key");
            continue;
        }
        if !stored["signatures"].is_object() {
            stored["signatures"] = serde_json::json!({});
        }
        if !stored["signatures"][signer].is_object() {
            stored["signatures"][signer] = serde_json::json!({});
        }
        for (sig_key, sig) in valid {
            stored["signatures"][signer][sig_key] = JsonValue::String(sig);
        }
    }
    let mut merged = SignedKeyChanges::default();
    for ((is_cross, name), value) in changed {
        let json = serde_json::to_string(&value).map_err(Error::internal)?;
        if is_cross { merged.cross_signing.push((name, json)) } else { merged.devices.push((name, json)) }
    }
    Ok((merged, failures))
}
