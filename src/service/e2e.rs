//! End-to-end encryption keys: what each device publishes (its identity keys, one-time
//! keys and fallback keys) and how other devices fetch and claim them. The server
//! checks who may publish what and hands keys out; it never sees message plaintext.

use std::collections::{BTreeMap, BTreeSet};

use ruma::{
    OwnedDeviceId, OwnedOneTimeKeyId, OwnedUserId, UInt, UserId,
    encryption::{CrossSigningKey, DeviceKeys, OneTimeKey},
    events::{AnyToDeviceEvent, AnyToDeviceEventContent},
    serde::Raw,
    to_device::DeviceIdOrAllDevices,
};
use serde_json::value::RawValue;
use sha2::Digest;

use super::{Services, Session, rooms::messages::membership_of};
use crate::{
    error::{Error, Result},
    storage::{NewKey, NewToDevice},
};

/// One-time keys a single upload may carry.
const MAX_KEYS_PER_UPLOAD: usize = 1000;

/// Devices one sendToDevice request may reach.
const MAX_TO_DEVICE: usize = 10_000;

/// Devices one `/keys/claim` may ask keys of.
const MAX_CLAIMS: usize = 1000;

/// Users one `/keys/query` may ask about.
const MAX_QUERY_USERS: usize = 1000;

/// Devices one `/keys/query` may name (an empty list, "all devices", counts as none).
const MAX_QUERY_DEVICES: usize = 1000;

/// What `/keys/query` answers: device keys and cross-signing keys by user.
#[derive(Default)]
pub struct QueriedKeys {
    pub device_keys: BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, Raw<DeviceKeys>>>,
    pub master_keys: BTreeMap<OwnedUserId, Raw<CrossSigningKey>>,
    pub self_signing_keys: BTreeMap<OwnedUserId, Raw<CrossSigningKey>>,
    pub user_signing_keys: BTreeMap<OwnedUserId, Raw<CrossSigningKey>>,
}

pub(super) fn new_keys(rows: &[(String, String, String)]) -> Vec<NewKey<'_>> {
    rows.iter().map(|(id, alg, json)| NewKey { key_id: id, algorithm: alg, json }).collect()
}

fn raw_from_json<T>(json: String) -> Result<Raw<T>> {
    Ok(Raw::from_json(RawValue::from_string(json).map_err(Error::internal)?))
}

impl Services {
    /// `POST /keys/upload`: stores the device's keys; answers its unclaimed one-time
    /// key counts.
    pub async fn upload_keys(
        &self,
        session: &Session,
        device_keys: Option<&Raw<DeviceKeys>>,
        one_time: &BTreeMap<OwnedOneTimeKeyId, Raw<OneTimeKey>>,
        fallback: &BTreeMap<OwnedOneTimeKeyId, Raw<OneTimeKey>>,
    ) -> Result<BTreeMap<ruma::OneTimeKeyAlgorithm, UInt>> {
        if let Some(raw) = device_keys {
            let keys: DeviceKeys =
                raw.deserialize().map_err(|e| Error::bad_json(format!("Invalid device_keys: {e}")))?;
            if keys.user_id != session.user_id || keys.device_id != session.device_id {
                return Err(Error::invalid_param("device_keys must be for the device making the request"));
            }
        }
        if one_time.len() + fallback.len() > MAX_KEYS_PER_UPLOAD {
            return Err(Error::too_large(format!("At most {MAX_KEYS_PER_UPLOAD} keys per upload")));
        }
        let as_rows = |keys: &BTreeMap<OwnedOneTimeKeyId, Raw<OneTimeKey>>| -> Vec<(String, String, String)> {
            keys.iter()
                .map(|(id, key)| (id.to_string(), id.algorithm().to_string(), key.json().get().to_owned()))
                .collect()
        };
        let (one_time, fallback) = (as_rows(one_time), as_rows(fallback));
        self.store
            .upload_e2e_keys(
                session.user_id.as_str(),
                session.device_id.as_str(),
                device_keys.map(|k| k.json().get()),
                &new_keys(&one_time),
                &new_keys(&fallback),
            )
            .await?;
        if let Some(keys) = device_keys {
            self.federate_device_change(&session.user_id, session.device_id.as_str(), Some(keys.json().get()), false)
                .await;
            self.wake_room_peers(&session.user_id).await?;
        }
        Ok(self.key_status(session).await?.0)
    }

    /// The session's device's unclaimed one-time keys by algorithm, and the
    /// algorithms of its fallback keys not handed out yet.
    pub async fn key_status(
        &self,
        session: &Session,
    ) -> Result<(BTreeMap<ruma::OneTimeKeyAlgorithm, UInt>, Vec<ruma::OneTimeKeyAlgorithm>)> {
        let (counts, fallback) =
            self.store.get_key_status(session.user_id.as_str(), session.device_id.as_str()).await?;
        let counts = counts
            .into_iter()
            .map(|(alg, n)| (alg.as_str().into(), UInt::new(n.max(0) as u64).unwrap_or_default()))
            .collect();
        Ok((counts, fallback.iter().map(|a| a.as_str().into()).collect()))
    }

    /// `POST /keys/query`: the device keys of local users (all their devices, or those
    /// named) and their cross-signing keys (user-signing keys only the requester's
    /// own), in two queries. Users of other servers are not reachable yet (no
    /// federation): they are left out. More than `MAX_QUERY_USERS` users, or more than
    /// `MAX_QUERY_DEVICES` named devices, is `M_TOO_LARGE`: clients split such
    /// queries.
    pub async fn query_keys(
        &self,
        requester: &UserId,
        requested: &BTreeMap<OwnedUserId, Vec<OwnedDeviceId>>,
    ) -> Result<QueriedKeys> {
        if requested.len() > MAX_QUERY_USERS {
            return Err(Error::too_large(format!("At most {MAX_QUERY_USERS} users per key query")));
        }
        if requested.values().map(Vec::len).sum::<usize>() > MAX_QUERY_DEVICES {
            return Err(Error::too_large(format!("At most {MAX_QUERY_DEVICES} named devices per key query")));
        }
        let local: Vec<&str> =
            requested.keys().filter(|u| u.server_name() == self.server_name()).map(|u| u.as_str()).collect();
        let mut found = QueriedKeys::default();
        for user in requested.keys().filter(|u| u.server_name() == self.server_name()) {
            found.device_keys.insert(user.clone(), BTreeMap::new());
        }
        for (user, device_id, json) in self.store.get_device_keys_of_users(&local).await? {
            let user = OwnedUserId::try_from(user).map_err(Error::internal)?;
            let device_id = OwnedDeviceId::from(device_id);
            let named = &requested[&user];
            if named.is_empty() || named.contains(&device_id) {
                found.device_keys.entry(user).or_default().insert(device_id, raw_from_json(json)?);
            }
        }
        for (user, key_type, json) in self.store.get_cross_signing_keys_of_users(&local).await? {
            let user = OwnedUserId::try_from(user).map_err(Error::internal)?;
            let map = match key_type.as_str() {
                "master" => &mut found.master_keys,
                "self_signing" => &mut found.self_signing_keys,
                "user_signing" if user == requester => &mut found.user_signing_keys,
                _ => continue,
            };
            map.insert(user, raw_from_json(json)?);
        }
        Ok(found)
    }

    /// Adds `unsigned.device_display_name` to the device keys of this server's users, as
    /// a local user's `/keys/query` shows them (for their own devices and others'; other
    /// servers are not told device names).
    pub async fn add_device_display_names(&self, found: &mut QueriedKeys) -> Result<()> {
        let local: Vec<&str> =
            found.device_keys.keys().filter(|u| u.server_name() == self.server_name()).map(|u| u.as_str()).collect();
        if local.is_empty() {
            return Ok(());
        }
        let names = self.store.get_device_names_of_users(&local).await?;
        for (user, device_id, name) in names {
            let Ok(user) = OwnedUserId::try_from(user) else { continue };
            let Some(keys) = found.device_keys.get_mut(&user).and_then(|d| d.get_mut(device_id.as_str())) else {
                continue;
            };
            let mut json: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(keys.json().get()).map_err(Error::internal)?;
            let unsigned = json.entry("unsigned").or_insert_with(|| serde_json::json!({}));
            if !unsigned.is_object() {
                *unsigned = serde_json::json!({});
            }
            unsigned["device_display_name"] = serde_json::Value::String(name);
            *keys = raw_from_json(serde_json::to_string(&json).map_err(Error::internal)?)?;
        }
        Ok(())
    }

    /// `POST /keys/claim`: one key per named device, a one-time key while any is left,
    /// else the device's fallback key; all in one transaction. The devices' waiting
    /// `/sync`s answer with their new key counts.
    pub async fn claim_keys(
        &self,
        wanted: &BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, ruma::OneTimeKeyAlgorithm>>,
    ) -> Result<BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, BTreeMap<OwnedOneTimeKeyId, Raw<OneTimeKey>>>>> {
        if wanted.values().map(BTreeMap::len).sum::<usize>() > MAX_CLAIMS {
            return Err(Error::too_large(format!("At most {MAX_CLAIMS} devices per claim")));
        }
        let targets: Vec<(&OwnedUserId, &OwnedDeviceId, &ruma::OneTimeKeyAlgorithm)> = wanted
            .iter()
            .filter(|(u, _)| u.server_name() == self.server_name())
            .flat_map(|(user, devices)| devices.iter().map(move |(device, algorithm)| (user, device, algorithm)))
            .collect();
        let rows: Vec<(&str, &str, &str)> =
            targets.iter().map(|(u, d, a)| (u.as_str(), d.as_str(), a.as_str())).collect();
        let keys = self.store.claim_keys(&rows).await?;
        let mut claimed: BTreeMap<OwnedUserId, BTreeMap<_, _>> = BTreeMap::new();
        for ((user, device, _), key) in targets.into_iter().zip(keys) {
            if let Some((key_id, json)) = key {
                let key_id = OwnedOneTimeKeyId::try_from(key_id).map_err(Error::internal)?;
                claimed
                    .entry(user.clone())
                    .or_default()
                    .insert(device.clone(), BTreeMap::from([(key_id, raw_from_json(json)?)]));
            }
        }
        // Wake the devices' syncs: they answer with the new counts, so the clients
        // upload more keys.
        self.notifier.notify_users(&claimed.keys().cloned().collect::<Vec<_>>());
        Ok(claimed)
    }

    /// Whether the device's keys were claimed after the stream position `since`.
    pub async fn keys_claimed_after(&self, session: &Session, since: i64) -> Result<bool> {
        let pos = self.store.get_key_claim_position(session.user_id.as_str(), session.device_id.as_str()).await?;
        Ok(pos > since)
    }

    /// `PUT /sendToDevice/{eventType}/{txnId}`: queues the messages for their devices
    /// (`*`: every device of the user) and wakes their syncs. A retried transaction id
    /// queues nothing again. Messages for users of other servers go to their servers.
    pub async fn send_to_device(
        &self,
        session: &Session,
        event_type: &str,
        txn_id: &str,
        messages: &BTreeMap<OwnedUserId, BTreeMap<DeviceIdOrAllDevices, Raw<AnyToDeviceEventContent>>>,
    ) -> Result<()> {
        let mut rows: Vec<(String, String, String)> = Vec::new();
        let mut to_wake = Vec::new();
        for (user, devices) in messages.iter().filter(|(u, _)| u.server_name() == self.server_name()) {
            for (target, content) in devices {
                let content = content.json().get();
                match target {
                    DeviceIdOrAllDevices::DeviceId(device) => {
                        rows.push((user.to_string(), device.to_string(), content.to_owned()));
                    }
                    DeviceIdOrAllDevices::AllDevices => {
                        for device in self.store.list_devices(user.as_str()).await? {
                            rows.push((user.to_string(), device.device_id, content.to_owned()));
                        }
                    }
                }
                if rows.len() > MAX_TO_DEVICE {
                    return Err(Error::too_large(format!("At most {MAX_TO_DEVICE} devices per request")));
                }
            }
            to_wake.push(user.clone());
        }
        let queued: Vec<NewToDevice<'_>> =
            rows.iter().map(|(u, d, c)| NewToDevice { user_id: u, device_id: d, content: c }).collect();
        let pos = self
            .store
            .queue_to_device(session.user_id.as_str(), session.device_id.as_str(), txn_id, event_type, &queued)
            .await?;
        if pos.is_some() {
            self.notifier.notify_users(&to_wake);
            // The remote part goes out only with the first use of the transaction id too.
            self.federate_to_device(&session.user_id, event_type, &remote_message_id(session, txn_id), messages)
                .await?;
        }
        Ok(())
    }

    /// The to-device events for the session's device in a sync answering from `since`
    /// up to `head`. Syncing from `since` acknowledges what earlier responses carried,
    /// which is then deleted.
    pub async fn to_device_events(
        &self,
        session: &Session,
        since: Option<i64>,
        head: i64,
    ) -> Result<Vec<Raw<AnyToDeviceEvent>>> {
        let (user, device) = (session.user_id.as_str(), session.device_id.as_str());
        let rows = self.store.get_to_device(user, device, head).await?;
        if let Some(acked) = since
            && rows.iter().any(|r| r.0 <= acked)
        {
            self.store.delete_to_device(user, device, acked).await?;
        }
        rows.into_iter()
            .filter(|r| since.is_none_or(|acked| r.0 > acked))
            .map(|(_, sender, event_type, content)| to_device_event(&sender, &event_type, &content))
            .collect()
    }

    /// What `user`'s clients should learn of other users' devices between two stream
    /// positions: `changed`, users whose devices changed (see
    /// `Store::get_device_list_changes`) or who newly share an encrypted room with
    /// `user`, and `left`, users with whom `user` no longer shares any encrypted room.
    /// `memberships_moved: false` says that no membership of the user, nor any member
    /// event in their rooms, happened in the span: the parts that only membership can
    /// change are then skipped.
    pub async fn device_list_changes(
        &self,
        user: &UserId,
        from: i64,
        to: i64,
        memberships_moved: bool,
    ) -> Result<(Vec<OwnedUserId>, Vec<OwnedUserId>)> {
        let mut changed: BTreeSet<String> =
            self.store.get_device_list_changes(user.as_str(), from, to).await?.into_iter().collect();
        if !memberships_moved {
            let ids = changed.into_iter().filter_map(|u| OwnedUserId::try_from(u).ok()).collect();
            return Ok((ids, Vec::new()));
        }
        // Joins in the span (a member event that only changed a profile is not one): a
        // user who joined is new to track, and so is everyone in a room the user joined.
        for (room, member, before) in self.store.get_encrypted_member_changes(user.as_str(), from, to).await? {
            if before.is_some_and(|json| membership_of(&json) == "join") {
                continue;
            }
            if member == user.as_str() {
                let members = self.store.get_room_members(&room, Some("join")).await?;
                changed.extend(members.into_iter().map(|m| m.user_id).filter(|u| u != user.as_str()));
            } else {
                changed.insert(member);
            }
        }
        let left: BTreeSet<String> =
            self.store.get_device_list_left(user.as_str(), from, to).await?.into_iter().collect();
        let ids = |users: BTreeSet<String>| users.into_iter().filter_map(|u| OwnedUserId::try_from(u).ok()).collect();
        Ok((ids(changed.difference(&left).cloned().collect()), ids(left)))
    }
}

/// A queued to-device message as clients receive it.
pub(super) fn to_device_event(sender: &str, event_type: &str, content: &str) -> Result<Raw<AnyToDeviceEvent>> {
    let sender = serde_json::to_string(sender).map_err(Error::internal)?;
    let event_type = serde_json::to_string(event_type).map_err(Error::internal)?;
    raw_from_json(format!(r#"{{"sender":{sender},"type":{event_type},"content":{content}}}"#))
}

/// The `message_id` of a `sendToDevice` request's EDUs: unique per device and
/// transaction, so the receiving server drops a copy sent twice.
fn remote_message_id(session: &Session, txn_id: &str) -> String {
    let digest = sha2::Sha256::digest(format!("{}\u{0}{}\u{0}{}", session.user_id, session.device_id, txn_id));
    base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, &digest[..18])
}
