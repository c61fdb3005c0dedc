//! End-to-end encryption across servers: a client's `/keys/query` and `/keys/claim`
//! for users of other servers ask those servers (all at once, each bounded in time, an
//! unreachable one reported in `failures`), and this server answers other servers'
//! `user/keys/query`, `user/keys/claim` and `user/devices` for its own users.

use std::{collections::BTreeMap, time::Duration};

use futures_util::future::join_all;
use ruma::{
    OwnedDeviceId, OwnedServerName, OwnedUserId, UInt, UserId,
    api::federation::{
        device::get_devices::v1 as get_devices,
        keys::{claim_keys::v1 as fed_claim, get_keys::v1 as fed_query},
    },
};
use serde_json::{Value as JsonValue, json};

use crate::{
    error::{Error, Result},
    service::Services,
};

/// The longest a client's key query waits for other servers (the client may ask less).
pub const MAX_REMOTE_KEY_WAIT: Duration = Duration::from_secs(10);

/// Groups `map`'s remote users by server.
fn by_server<V: Clone>(
    own: &ruma::ServerName,
    map: &BTreeMap<OwnedUserId, V>,
) -> BTreeMap<OwnedServerName, BTreeMap<OwnedUserId, V>> {
    let mut servers: BTreeMap<OwnedServerName, BTreeMap<OwnedUserId, V>> = BTreeMap::new();
    for (user, v) in map.iter().filter(|(u, _)| u.server_name() != own) {
        servers.entry(user.server_name().to_owned()).or_default().insert(user.clone(), v.clone());
    }
    servers
}

fn failure(e: &Error) -> JsonValue {
    json!({"errcode": e.errcode(), "error": e.to_string()})
}

impl Services {
    /// `POST /keys/query` for local and remote users: remote ones are asked of their
    /// servers; what a server says of another server's users is ignored.
    pub async fn query_keys_everywhere(
        &self,
        requester: &UserId,
        requested: &BTreeMap<OwnedUserId, Vec<OwnedDeviceId>>,
        wait: Duration,
    ) -> Result<(crate::service::e2e::QueriedKeys, BTreeMap<String, JsonValue>)> {
        let mut found = self.query_keys(requester, requested).await?;
        self.add_device_display_names(&mut found).await?;
        let (remote, failures) = self.query_remote_keys(requested, wait).await;
        for (server, response) in remote {
            let theirs = |u: &OwnedUserId| u.server_name() == server && requested.contains_key(u);
            found.device_keys.extend(response.device_keys.into_iter().filter(|(u, _)| theirs(u)));
            found.master_keys.extend(response.master_keys.into_iter().filter(|(u, _)| theirs(u)));
            found.self_signing_keys.extend(response.self_signing_keys.into_iter().filter(|(u, _)| theirs(u)));
        }
        Ok((found, failures))
    }

    /// Other servers' users' device and cross-signing keys: from the copies kept here
    /// (`devices.rs`), else asked of their servers, at once, each for at most `wait`.
    /// Answers what arrived and the servers that failed.
    pub async fn query_remote_keys(
        &self,
        requested: &BTreeMap<OwnedUserId, Vec<OwnedDeviceId>>,
        wait: Duration,
    ) -> (Vec<(OwnedServerName, fed_query::Response)>, BTreeMap<String, JsonValue>) {
        // Users whose device lists are kept here are answered from the copies.
        let (mut found, rest) = self.remote_keys_from_copies(requested.clone(), wait.min(MAX_REMOTE_KEY_WAIT)).await;
        let servers = by_server(self.server_name(), &rest);
        let calls = servers.into_iter().map(|(server, users)| async move {
            let request = fed_query::Request::new(users);
            let answer =
                tokio::time::timeout(wait.min(MAX_REMOTE_KEY_WAIT), self.send_federation_request(&server, request))
                    .await
                    .unwrap_or_else(|_| Err(Error::federation(format!("{server} did not answer in time"))));
            (server, answer)
        });
        let mut failures = BTreeMap::new();
        for (server, answer) in join_all(calls).await {
            match answer {
                Ok(response) => found.push((server, response)),
                Err(e) => {
                    tracing::info!(%server, error = %e, "remote key query failed");
                    failures.insert(server.to_string(), failure(&e));
                }
            }
        }
        (found, failures)
    }

    /// Claims one-time keys of other servers' users, as `query_remote_keys` does.
    pub async fn claim_remote_keys(
        &self,
        wanted: &BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, ruma::OneTimeKeyAlgorithm>>,
        wait: Duration,
    ) -> (fed_claim::OneTimeKeys, BTreeMap<String, JsonValue>) {
        let servers = by_server(self.server_name(), wanted);
        let calls = servers.into_iter().map(|(server, users)| async move {
            let request = fed_claim::Request::new(users);
            let answer =
                tokio::time::timeout(wait.min(MAX_REMOTE_KEY_WAIT), self.send_federation_request(&server, request))
                    .await
                    .unwrap_or_else(|_| Err(Error::federation(format!("{server} did not answer in time"))));
            (server, answer)
        });
        let mut claimed = fed_claim::OneTimeKeys::new();
        let mut failures = BTreeMap::new();
        for (server, answer) in join_all(calls).await {
            match answer {
                Ok(response) => {
                    // Only keys of that server's own users count.
                    claimed.extend(response.one_time_keys.into_iter().filter(|(u, _)| u.server_name() == server));
                }
                Err(e) => {
                    tracing::info!(%server, error = %e, "remote key claim failed");
                    failures.insert(server.to_string(), failure(&e));
                }
            }
        }
        (claimed, failures)
    }

    /// `GET /_matrix/federation/v1/user/devices/{userId}`: a local user's devices with
    /// their keys, and the user's master and self-signing keys. Device names are not
    /// shared with other servers.
    /// The `stream_id` given is recorded as the last one `origin` has (the next device
    /// list update it gets names it as `prev_id`).
    pub async fn federation_user_devices(
        &self,
        origin: &ruma::ServerName,
        user: &UserId,
    ) -> Result<get_devices::Response> {
        if user.server_name() != self.server_name() || !self.store.user_exists(user.as_str()).await? {
            return Err(Error::not_found("No such user on this server"));
        }
        let stream_id = self.store.give_device_list_stream_id(user.as_str(), origin.as_str()).await?;
        let mut response =
            get_devices::Response::new(user.to_owned(), UInt::new(stream_id.max(0) as u64).unwrap_or_default());
        let keys = self.query_keys(user, &BTreeMap::from([(user.to_owned(), Vec::new())])).await?;
        if let Some(devices) = keys.device_keys.get(user) {
            for (device_id, keys) in devices {
                response.devices.push(get_devices::UserDevice::new(device_id.clone(), keys.clone()));
            }
        }
        response.master_key = keys.master_keys.get(user).cloned();
        response.self_signing_key = keys.self_signing_keys.get(user).cloned();
        Ok(response)
    }
}
