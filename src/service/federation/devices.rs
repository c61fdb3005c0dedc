//! Other servers' users' device lists, kept here while a local user shares a room with
//! them (their servers then send every change): a client's `/keys/query` for such a
//! user is answered from the copy. The copy is fetched whole with `user/devices` when
//! it is missing or stale, and kept current by `m.device_list_update` (applied when we
//! have seen one of its `prev_id`s, else the copy turns stale) and
//! `m.signing_key_update`. A membership change that may have made us miss updates (the
//! user joins a room with us, or a local user leaves a room) makes it stale too.

use std::collections::BTreeMap;

use futures_util::future::join_all;
use ruma::{
    OwnedDeviceId, OwnedServerName, OwnedUserId, RoomId, UserId,
    api::federation::{
        device::get_devices::v1 as get_devices,
        keys::get_keys::v1 as fed_query,
        transactions::edu::{DeviceListUpdateContent, SigningKeyUpdateContent},
    },
    serde::Raw,
};
use serde_json::{Map, Value as JsonValue, value::RawValue};

use crate::{
    error::{Error, Result},
    service::Services,
    storage::{DeviceUpdate, RemoteDeviceList},
};

/// Most users whose lists one query fetches at once.
const MAX_RESYNCS: usize = 50;

fn raw<T>(json: &str) -> Option<Raw<T>> {
    RawValue::from_string(json.to_owned()).ok().map(Raw::from_json)
}

/// Whether a key object (device keys or a cross-signing key) names `user`.
fn names_user(json: &str, user: &UserId) -> bool {
    serde_json::from_str::<JsonValue>(json).is_ok_and(|v| v["user_id"] == user.as_str())
}

impl Services {
    /// Splits the remote users of a key query into those answered from the copies kept
    /// here (fetching missing or stale copies of users we share a room with, at once,
    /// within `wait`), as one answer per server, and the rest, to ask as usual.
    pub(crate) async fn remote_keys_from_copies(
        &self,
        requested: BTreeMap<OwnedUserId, Vec<OwnedDeviceId>>,
        wait: std::time::Duration,
    ) -> (Vec<(OwnedServerName, fed_query::Response)>, BTreeMap<OwnedUserId, Vec<OwnedDeviceId>>) {
        let mut rest = BTreeMap::new();
        let mut copies: Vec<(OwnedUserId, Vec<OwnedDeviceId>, RemoteDeviceList)> = Vec::new();
        let mut to_fetch: Vec<(OwnedUserId, Vec<OwnedDeviceId>)> = Vec::new();
        for (user, devices) in requested {
            if user.server_name() == self.server_name() {
                continue;
            }
            match self.store.shares_room_with_local_user(user.as_str()).await {
                Ok(true) => match self.store.get_remote_device_list(user.as_str()).await {
                    Ok(Some(list)) if !list.stale => copies.push((user, devices, list)),
                    Ok(_) if to_fetch.len() < MAX_RESYNCS => to_fetch.push((user, devices)),
                    _ => {
                        rest.insert(user, devices);
                    }
                },
                _ => {
                    rest.insert(user, devices);
                }
            }
        }
        let fetches = to_fetch.into_iter().map(|(user, devices)| async move {
            let fetched = tokio::time::timeout(wait, self.resync_device_list(&user)).await;
            (user, devices, fetched)
        });
        for (user, devices, fetched) in join_all(fetches).await {
            match fetched {
                Ok(Ok(list)) => copies.push((user, devices, list)),
                Ok(Err(e)) => {
                    tracing::info!(%user, error = %e, "fetching a remote device list failed");
                    rest.insert(user, devices);
                }
                Err(_) => {
                    rest.insert(user, devices);
                }
            }
        }
        let mut answers: BTreeMap<OwnedServerName, fed_query::Response> = BTreeMap::new();
        for (user, wanted, list) in copies {
            let answer = answers.entry(user.server_name().to_owned()).or_default();
            let devices: Map<String, JsonValue> = serde_json::from_str(&list.devices).unwrap_or_default();
            let mut keys = BTreeMap::new();
            for (device_id, device) in devices {
                if (wanted.is_empty() || wanted.iter().any(|d| d.as_str() == device_id))
                    && let Some(k) = raw(&device.to_string())
                {
                    keys.insert(OwnedDeviceId::from(device_id), k);
                }
            }
            answer.device_keys.insert(user.clone(), keys);
            if let Some(k) = list.master_key.as_deref().and_then(raw) {
                answer.master_keys.insert(user.clone(), k);
            }
            if let Some(k) = list.self_signing_key.as_deref().and_then(raw) {
                answer.self_signing_keys.insert(user, k);
            }
        }
        (answers.into_iter().collect(), rest)
    }

    /// Fetches a remote user's whole device list (`user/devices`) and keeps it.
    async fn resync_device_list(&self, user: &UserId) -> Result<RemoteDeviceList> {
        let response =
            self.send_federation_request(user.server_name(), get_devices::Request::new(user.to_owned())).await?;
        if response.user_id != user {
            return Err(Error::federation(format!("{} answered for another user", user.server_name())));
        }
        let mut devices = Map::new();
        for device in response.devices {
            let keys: JsonValue = serde_json::from_str(device.keys.json().get())
                .map_err(|e| Error::federation(format!("bad device keys: {e}")))?;
            if keys["user_id"] == user.as_str() && keys["device_id"] == device.device_id.as_str() {
                devices.insert(device.device_id.to_string(), keys);
            }
        }
        let key = |k: Option<Raw<ruma::encryption::CrossSigningKey>>| {
            k.map(|k| k.json().get().to_owned()).filter(|json| names_user(json, user))
        };
        let list = RemoteDeviceList {
            stream_id: i64::try_from(u64::from(response.stream_id)).unwrap_or(i64::MAX),
            devices: JsonValue::Object(devices).to_string(),
            master_key: key(response.master_key),
            self_signing_key: key(response.self_signing_key),
            stale: false,
        };
        self.store.put_remote_device_list(user.as_str(), &list).await?;
        Ok(list)
    }

    /// Applies an `m.device_list_update` to the copy kept here, if any.
    pub(crate) async fn apply_device_list_update(&self, update: &DeviceListUpdateContent) -> Result<()> {
        let to_i64 = |n: ruma::UInt| i64::try_from(u64::from(n)).unwrap_or(i64::MAX);
        let prev_ids: Vec<i64> = update.prev_id.iter().copied().map(to_i64).collect();
        let keys = update.keys.as_ref().map(|k| k.json().get().to_owned());
        let change = DeviceUpdate {
            stream_id: to_i64(update.stream_id),
            prev_ids: &prev_ids,
            device_id: update.device_id.as_str(),
            keys: keys.as_deref(),
            deleted: update.deleted.unwrap_or(false),
        };
        let user = &update.user_id;
        self.store
            .apply_remote_device_update(user.as_str(), &change, |devices| {
                let mut devices: Map<String, JsonValue> = serde_json::from_str(devices).unwrap_or_default();
                if change.deleted {
                    devices.remove(change.device_id);
                } else if let Some(keys) = change.keys {
                    let keys: JsonValue =
                        serde_json::from_str(keys).map_err(|e| Error::bad_json(format!("bad device keys: {e}")))?;
                    if keys["user_id"] != user.as_str() || keys["device_id"] != change.device_id {
                        return Err(Error::bad_json("The device keys name another user or device"));
                    }
                    devices.insert(change.device_id.to_owned(), keys);
                }
                Ok(JsonValue::Object(devices).to_string())
            })
            .await?;
        Ok(())
    }

    /// Applies an `m.signing_key_update` to the copy kept here, if any.
    pub(crate) async fn apply_signing_key_update(&self, update: &SigningKeyUpdateContent) -> Result<()> {
        let user = &update.user_id;
        let key = |k: &Option<Raw<ruma::encryption::CrossSigningKey>>| {
            k.as_ref().map(|k| k.json().get().to_owned()).filter(|json| names_user(json, user))
        };
        self.store
            .update_remote_signing_keys(
                user.as_str(),
                key(&update.master_key).as_deref(),
                key(&update.self_signing_key).as_deref(),
            )
            .await
    }

    /// After membership changes in `room_id` (user, new membership): the kept copies we
    /// may have missed updates for turn stale: a remote user's whose membership changed,
    /// and, when a local user is no longer joined, those of the room's remote members.
    pub(crate) async fn device_lists_after_membership(&self, room_id: &RoomId, changed: &[(&str, &str)]) {
        let own = |u: &str| u.split_once(':').is_some_and(|(_, s)| s == self.server_name().as_str());
        let remote: Vec<String> = changed.iter().filter(|(u, _)| !own(u)).map(|(u, _)| (*u).to_owned()).collect();
        let local_left = changed.iter().any(|(u, m)| own(u) && *m != "join");
        let result = async {
            self.store.mark_remote_device_lists_stale(&remote).await?;
            if local_left {
                self.store.mark_room_remote_device_lists_stale(room_id.as_str()).await?;
            }
            Ok::<_, Error>(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(%room_id, error = %e, "could not mark remote device lists stale");
        }
    }
}
