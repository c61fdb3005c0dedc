//! Sessions: access tokens, refresh tokens and devices. Turns a bearer token into the
//! user and device behind it.

use std::time::Duration;

use ruma::{OwnedDeviceId, OwnedUserId, api::client::device::Device};

use super::{
    Services,
    ids::{generate_access_token, generate_device_id, generate_refresh_token, hash_token},
    now_ms,
};
use crate::{
    error::{Error, Result},
    storage::{DeviceInfo, NewSession},
};

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Session {
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
}

/// Tokens handed out at login, registration or refresh.
#[derive(Clone, Debug)]
pub struct IssuedSession {
    pub device_id: OwnedDeviceId,
    pub access_token: String,
    pub refresh_token: Option<String>,
    pub expires_in: Option<Duration>,
}

/// How often a device's "last seen" is written at most.
const LAST_SEEN_GRANULARITY_MS: i64 = 60_000;

/// Longest device display name, in characters.
const MAX_DEVICE_NAME_CHARS: usize = 100;
/// Longest device id a client may choose, in bytes.
const MAX_DEVICE_ID_BYTES: usize = 255;

/// The rules for a device id a client chose and a device display name
/// (`M_INVALID_PARAM`).
pub(super) fn check_device_fields(device_id: Option<&str>, display_name: Option<&str>) -> Result<()> {
    if let Some(id) = device_id
        && (id.is_empty() || id.len() > MAX_DEVICE_ID_BYTES)
    {
        return Err(Error::invalid_param(format!("Device ids are 1 to {MAX_DEVICE_ID_BYTES} bytes")));
    }
    if display_name.is_some_and(|n| n.chars().count() > MAX_DEVICE_NAME_CHARS) {
        return Err(Error::invalid_param(format!("Device names are {MAX_DEVICE_NAME_CHARS} characters at most")));
    }
    Ok(())
}

impl Services {
    /// Resolves an access token. Unknown or revoked: `M_UNKNOWN_TOKEN`; expired:
    /// `M_UNKNOWN_TOKEN` with `soft_logout`.
    pub async fn authenticate(&self, token: &str, client_ip: Option<&str>) -> Result<Session> {
        let hash = hash_token(token);
        let info = self.store.find_access_token(&hash).await?.ok_or_else(|| Error::unknown_token(false))?;
        let now = now_ms();
        if info.deactivated {
            return Err(Error::unknown_token(false));
        }
        if info.expires_ts.is_some_and(|expires| expires <= now) {
            return Err(Error::unknown_token(true));
        }
        if let Some(prev) = &info.prev_refresh_hash {
            self.store.retire_previous_refresh(&hash, prev).await?;
        }
        if info.last_seen_ts.is_none_or(|seen| now - seen > LAST_SEEN_GRANULARITY_MS) {
            self.store.touch_device(&hash, &info.user_id, &info.device_id, now, client_ip).await?;
        }
        Ok(Session {
            user_id: OwnedUserId::try_from(info.user_id.as_str()).map_err(Error::internal)?,
            device_id: info.device_id.as_str().into(),
        })
    }

    /// Prepares the tokens for a new login on `device_id` (or a new device).
    pub(super) fn new_tokens(&self, device_id: Option<OwnedDeviceId>, refresh: bool) -> IssuedSession {
        let lifetime = self.config.sessions.access_token_lifetime_ms;
        IssuedSession {
            device_id: device_id.unwrap_or_else(|| generate_device_id().into()),
            access_token: generate_access_token(),
            refresh_token: refresh.then(generate_refresh_token),
            expires_in: refresh.then(|| Duration::from_millis(lifetime)),
        }
    }

    /// Hashes of `issued`'s tokens, in the shape storage takes.
    pub(super) fn session_row<'a>(
        &self,
        user_id: &'a str,
        issued: &'a IssuedSession,
        hashes: &'a (String, Option<String>),
        display_name: Option<&'a str>,
        ip: &'a str,
    ) -> NewSession<'a> {
        let now = now_ms();
        NewSession {
            user_id,
            device_id: issued.device_id.as_str(),
            display_name,
            access_token_hash: &hashes.0,
            refresh_token_hash: hashes.1.as_deref(),
            expires_ts: issued.expires_in.map(|d| now + d.as_millis() as i64),
            created_ts: now,
            ip: Some(ip),
        }
    }

    /// Stores a new login for an existing user.
    pub async fn issue_session(
        &self,
        user_id: &str,
        device_id: Option<OwnedDeviceId>,
        display_name: Option<&str>,
        refresh: bool,
        ip: &str,
    ) -> Result<IssuedSession> {
        check_device_fields(device_id.as_deref().map(|d| d.as_str()), display_name)?;
        let issued = self.new_tokens(device_id, refresh);
        let hashes = (hash_token(&issued.access_token), issued.refresh_token.as_deref().map(hash_token));
        self.store.create_session(self.session_row(user_id, &issued, &hashes, display_name, ip)).await?;
        Ok(issued)
    }

    /// `POST /refresh`: a new access token and refresh token for a refresh token.
    pub async fn refresh(&self, refresh_token: &str) -> Result<IssuedSession> {
        let lifetime = self.config.sessions.access_token_lifetime_ms;
        let now = now_ms();
        let access_token = generate_access_token();
        let new_refresh = generate_refresh_token();
        let found = self
            .store
            .refresh_session(
                &hash_token(refresh_token),
                &hash_token(&access_token),
                &hash_token(&new_refresh),
                now + lifetime as i64,
                now,
            )
            .await?;
        let (_, device_id) = found.ok_or_else(|| Error::unknown_token(false))?;
        Ok(IssuedSession {
            device_id: device_id.into(),
            access_token,
            refresh_token: Some(new_refresh),
            expires_in: Some(Duration::from_millis(lifetime)),
        })
    }

    /// `POST /logout`: the device and all its tokens go.
    pub async fn logout(&self, session: &Session) -> Result<()> {
        self.delete_devices(session.user_id.as_str(), &[session.device_id.as_str()]).await
    }

    /// `POST /logout/all`.
    pub async fn logout_all(&self, user_id: &str) -> Result<()> {
        let devices = self.store.list_devices(user_id).await?;
        self.store.delete_all_devices(user_id).await?;
        // The tasks of the pushers that went with the devices end.
        self.wake_pushers(std::iter::once(user_id));
        self.federate_deleted_devices(user_id, devices.iter().map(|d| d.device_id.as_str())).await;
        Ok(())
    }

    /// Tells other servers that share a room with the user that devices went away.
    async fn federate_deleted_devices(&self, user_id: &str, device_ids: impl Iterator<Item = &str>) {
        let Ok(user) = ruma::UserId::parse(user_id) else { return };
        for device_id in device_ids {
            self.federate_device_change(&user, device_id, None, true).await;
        }
    }

    pub async fn list_devices(&self, user_id: &str) -> Result<Vec<Device>> {
        Ok(self.store.list_devices(user_id).await?.into_iter().map(to_device).collect())
    }

    pub async fn get_device(&self, user_id: &str, device_id: &str) -> Result<Device> {
        self.store
            .get_device(user_id, device_id)
            .await?
            .map(to_device)
            .ok_or_else(|| Error::not_found("No such device"))
    }

    pub async fn rename_device(&self, user_id: &str, device_id: &str, name: Option<&str>) -> Result<()> {
        check_device_fields(None, name)?;
        if !self.store.rename_device(user_id, device_id, name).await? {
            return Err(Error::not_found("No such device"));
        }
        Ok(())
    }

    pub async fn delete_devices(&self, user_id: &str, device_ids: &[&str]) -> Result<()> {
        self.store.delete_devices(user_id, device_ids).await?;
        self.wake_pushers(std::iter::once(user_id));
        self.federate_deleted_devices(user_id, device_ids.iter().copied()).await;
        Ok(())
    }
}

fn to_device(d: DeviceInfo) -> Device {
    let mut device = Device::new(d.device_id.into());
    device.display_name = d.display_name;
    device.last_seen_ip = d.last_seen_ip;
    device.last_seen_ts =
        d.last_seen_ts.and_then(|ts| ruma::UInt::new(ts as u64)).map(ruma::MilliSecondsSinceUnixEpoch);
    device
}
