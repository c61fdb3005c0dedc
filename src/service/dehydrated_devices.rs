//! Dehydrated devices (MSC3814, as Element uses it): a device the user's clients keep
//! on the server, its private keys encrypted in `device_data`, so that it receives
//! to-device messages (room keys) while none of the user's clients is online. A new
//! login rehydrates it: fetches `device_data`, then the messages queued for it.

use std::collections::BTreeMap;

use ruma::{
    OwnedDeviceId, OwnedOneTimeKeyId, UserId,
    encryption::{DeviceKeys, OneTimeKey},
    events::AnyToDeviceEvent,
    serde::Raw,
};
use serde_json::value::RawValue;

use super::{
    Services,
    e2e::{new_keys, to_device_event},
};
use crate::error::{Error, Result};

/// Messages one `dehydrated_device/{deviceId}/events` answer carries at most.
const EVENTS_PER_BATCH: usize = 100;

/// What `PUT /dehydrated_device` carries.
pub struct NewDehydratedDevice<'a> {
    pub device_id: &'a OwnedDeviceId,
    pub display_name: Option<&'a str>,
    pub device_data: &'a Raw<ruma::api::client::dehydrated_device::DehydratedDeviceData>,
    pub device_keys: &'a Raw<DeviceKeys>,
    pub one_time_keys: &'a BTreeMap<OwnedOneTimeKeyId, Raw<OneTimeKey>>,
    pub fallback_keys: &'a BTreeMap<OwnedOneTimeKeyId, Raw<OneTimeKey>>,
}

impl Services {
    /// `PUT /dehydrated_device`: the user's new dehydrated device (the previous one is
    /// deleted), with its keys.
    pub async fn put_dehydrated_device(&self, user: &UserId, new: NewDehydratedDevice<'_>) -> Result<()> {
        let keys: DeviceKeys =
            new.device_keys.deserialize().map_err(|e| Error::bad_json(format!("Invalid device_keys: {e}")))?;
        if keys.user_id != user || keys.device_id != *new.device_id {
            return Err(Error::invalid_param("device_keys must be for the dehydrated device"));
        }
        let data: serde_json::Value = serde_json::from_str(new.device_data.json().get())
            .map_err(|e| Error::bad_json(format!("Invalid device_data: {e}")))?;
        if !data.is_object() || !data["algorithm"].is_string() {
            return Err(Error::bad_json("device_data must be an object with an algorithm"));
        }
        if new.one_time_keys.len() + new.fallback_keys.len() > 1000 {
            return Err(Error::too_large("At most 1000 keys per upload"));
        }
        let now = super::now_ms();
        let device_id = new.device_id.as_str();
        let replaced = self
            .store
            .put_dehydrated_device(user.as_str(), device_id, new.display_name, new.device_data.json().get(), now)
            .await?;
        // Other servers hear of the replaced device's deletion (each change they are
        // told of is one they can chain the next to).
        if let Some(replaced) = replaced {
            self.federate_device_change(user, &replaced, None, true).await;
        }
        let as_rows = |keys: &BTreeMap<OwnedOneTimeKeyId, Raw<OneTimeKey>>| -> Vec<(String, String, String)> {
            keys.iter()
                .map(|(id, key)| (id.to_string(), id.algorithm().to_string(), key.json().get().to_owned()))
                .collect()
        };
        let (one_time, fallback) = (as_rows(new.one_time_keys), as_rows(new.fallback_keys));
        let device_keys = new.device_keys.json().get();
        self.store
            .upload_e2e_keys(user.as_str(), device_id, Some(device_keys), &new_keys(&one_time), &new_keys(&fallback))
            .await?;
        self.federate_device_change(user, device_id, Some(device_keys), false).await;
        self.wake_room_peers(user).await
    }

    /// `GET /dehydrated_device`: its id and `device_data`.
    pub async fn get_dehydrated_device(
        &self,
        user: &UserId,
    ) -> Result<(OwnedDeviceId, Raw<ruma::api::client::dehydrated_device::DehydratedDeviceData>)> {
        let (device_id, data) = self
            .store
            .get_dehydrated_device(user.as_str())
            .await?
            .ok_or_else(|| Error::not_found("No dehydrated device"))?;
        let data = Raw::from_json(RawValue::from_string(data).map_err(Error::internal)?);
        Ok((device_id.into(), data))
    }

    /// `DELETE /dehydrated_device`: answers the deleted device's id.
    pub async fn delete_dehydrated_device(&self, user: &UserId) -> Result<OwnedDeviceId> {
        let device_id = self
            .store
            .delete_dehydrated_device(user.as_str())
            .await?
            .ok_or_else(|| Error::not_found("No dehydrated device"))?;
        self.federate_device_change(user, &device_id, None, true).await;
        self.wake_room_peers(user).await?;
        Ok(device_id.into())
    }

    /// `POST /dehydrated_device/{deviceId}/events`: the to-device messages queued for
    /// the user's dehydrated device, a batch at a time. `next_batch` from the previous
    /// answer acknowledges (deletes) what it carried.
    pub async fn dehydrated_device_events(
        &self,
        user: &UserId,
        device_id: &str,
        next_batch: Option<&str>,
    ) -> Result<(Vec<Raw<AnyToDeviceEvent>>, String)> {
        let current = self.store.get_dehydrated_device(user.as_str()).await?;
        if current.is_none_or(|(id, _)| id != device_id) {
            return Err(Error::forbidden("That is not your dehydrated device"));
        }
        let acked = match next_batch {
            Some(token) => token.parse::<i64>().map_err(|_| Error::invalid_param("Invalid next_batch"))?,
            None => 0,
        };
        if acked > 0 {
            self.store.delete_to_device(user.as_str(), device_id, acked).await?;
        }
        let head = self.store.current_stream_position().await?;
        let rows = self.store.get_to_device(user.as_str(), device_id, head).await?;
        let mut events = Vec::new();
        let mut last = acked;
        for (pos, sender, event_type, content) in rows.into_iter().filter(|r| r.0 > acked) {
            // Whole positions only, so the token acknowledges exactly what was sent.
            if events.len() >= EVENTS_PER_BATCH && pos != last {
                break;
            }
            events.push(to_device_event(&sender, &event_type, &content)?);
            last = pos;
        }
        Ok((events, last.to_string()))
    }
}
