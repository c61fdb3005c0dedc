//! EDUs across servers: what local users do that other servers must hear of (typing,
//! read receipts, presence, to-device messages) is queued for the servers concerned,
//! and the EDUs other servers send are checked (the user must belong to the sending
//! server, and to the room where it matters) and applied as local ones are.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use ruma::{
    MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedServerName, OwnedTransactionId, OwnedUserId, RoomId, ServerName,
    UInt, UserId,
    api::federation::transactions::edu::{
        DeviceListUpdateContent, DirectDeviceContent, Edu, PresenceContent, PresenceUpdate, ReceiptContent,
        ReceiptData, ReceiptMap, SigningKeyUpdateContent, TypingContent,
    },
    events::{
        AnyToDeviceEventContent, ToDeviceEventType,
        receipt::{Receipt, ReceiptThread},
    },
    presence::PresenceState,
    serde::Raw,
    to_device::DeviceIdOrAllDevices,
};
use serde_json::Value as JsonValue;

use crate::{
    error::{Error, Result},
    service::{Services, now_ms},
    storage::{NewToDevice, ReceiptRow},
};

/// How long a remote typing notice lasts when its server does not end it.
const REMOTE_TYPING: Duration = Duration::from_secs(30);
/// A typing EDU not sent within this long is dropped (it would be stale).
const TYPING_EDU_LIFETIME: Duration = Duration::from_secs(30);
/// A presence EDU not sent within this long is dropped.
const PRESENCE_EDU_LIFETIME: Duration = Duration::from_secs(300);
/// Most to-device messages taken from one EDU.
const MAX_TO_DEVICE_PER_EDU: usize = 10_000;

fn edu_json(edu: Edu) -> Result<JsonValue> {
    serde_json::to_value(edu).map_err(Error::internal)
}

impl Services {
    /// A local user's typing notice, for the other servers in the room.
    pub async fn federate_typing(&self, room_id: &RoomId, user: &UserId, typing: bool) -> Result<()> {
        let servers = self.room_remote_servers(room_id).await?;
        if servers.is_empty() {
            return Ok(());
        }
        let edu = edu_json(Edu::Typing(TypingContent::new(room_id.to_owned(), user.to_owned(), typing)))?;
        self.send_edu(servers.as_slice(), &edu, Some(TYPING_EDU_LIFETIME)).await
    }

    /// A local user's public read receipt, for the other servers in the room.
    pub async fn federate_receipt(
        &self,
        room_id: &RoomId,
        user: &UserId,
        event_id: &ruma::EventId,
        thread_id: Option<&str>,
    ) -> Result<()> {
        let servers = self.room_remote_servers(room_id).await?;
        if servers.is_empty() {
            return Ok(());
        }
        let mut receipt = Receipt::new(MilliSecondsSinceUnixEpoch::now());
        if let Some(thread) = thread_id {
            receipt.thread = match thread {
                "main" => ReceiptThread::Main,
                other => ReceiptThread::Thread(OwnedEventId::try_from(other).map_err(Error::internal)?),
            };
        }
        let read = BTreeMap::from([(user.to_owned(), ReceiptData::new(receipt, vec![event_id.to_owned()]))]);
        let edu =
            edu_json(Edu::Receipt(ReceiptContent::new(BTreeMap::from([(room_id.to_owned(), ReceiptMap::new(read))]))))?;
        self.send_edu(servers.as_slice(), &edu, None).await
    }

    /// A local user's presence, for the servers that share a room with them.
    pub async fn federate_presence(&self, user: &UserId, state: &str, status_msg: Option<&str>) -> Result<()> {
        let servers = self.servers_sharing_rooms_with(user).await?;
        if servers.is_empty() {
            return Ok(());
        }
        let presence = PresenceState::from(state);
        let mut update = PresenceUpdate::new(user.to_owned(), presence, UInt::MIN);
        update.status_msg = status_msg.map(str::to_owned);
        update.currently_active = state == "online";
        let edu = edu_json(Edu::Presence(PresenceContent::new(vec![update])))?;
        self.send_edu(servers.as_slice(), &edu, Some(PRESENCE_EDU_LIFETIME)).await
    }

    /// The remote part of a `sendToDevice`: one `m.direct_to_device` EDU per server,
    /// kept until delivered.
    pub async fn federate_to_device(
        &self,
        sender: &UserId,
        event_type: &str,
        message_id: &str,
        messages: &BTreeMap<OwnedUserId, BTreeMap<DeviceIdOrAllDevices, Raw<AnyToDeviceEventContent>>>,
    ) -> Result<()> {
        let mut by_server: HashMap<OwnedServerName, DirectDeviceContent> = HashMap::new();
        for (user, devices) in messages.iter().filter(|(u, _)| u.server_name() != self.server_name()) {
            let content = by_server.entry(user.server_name().to_owned()).or_insert_with(|| {
                DirectDeviceContent::new(
                    sender.to_owned(),
                    ToDeviceEventType::from(event_type),
                    OwnedTransactionId::from(message_id),
                )
            });
            content.messages.insert(user.clone(), devices.clone());
        }
        for (server, content) in by_server {
            let edu = edu_json(Edu::DirectToDevice(content))?;
            self.send_edu(&[server], &edu, None).await?;
        }
        Ok(())
    }

    /// The remote servers that share a joined room with `user`.
    async fn servers_sharing_rooms_with(&self, user: &UserId) -> Result<Vec<OwnedServerName>> {
        let mut servers = Vec::new();
        for room in self.joined_rooms(user).await? {
            servers.extend(self.room_remote_servers(&room).await?.iter().cloned());
        }
        servers.sort();
        servers.dedup();
        Ok(servers)
    }

    /// A local user's device appeared, changed keys or went away: the servers that
    /// share a room with them hear of it (`m.device_list_update`, with the stream id of
    /// the user's latest change and, as `prev_id`, the last id that server was given,
    /// so that it notices a gap, and only a gap, and asks again). One EDU per distinct
    /// `prev_id`.
    pub async fn federate_device_change(&self, user: &UserId, device_id: &str, keys: Option<&str>, deleted: bool) {
        let result = async {
            let servers = self.servers_sharing_rooms_with(user).await?;
            if servers.is_empty() {
                return Ok(());
            }
            let names: Vec<String> = servers.iter().map(|s| s.to_string()).collect();
            let (stream_id, given) = match self.store.take_device_list_update_ids(user.as_str(), &names).await? {
                Some(ids) => ids,
                None => {
                    // A server was given the latest id already (another update of the
                    // user's devices at the same time): this one gets an id of its own.
                    self.store.record_bare_device_list_change(user.as_str()).await?;
                    self.store
                        .take_device_list_update_ids(user.as_str(), &names)
                        .await?
                        .ok_or_else(|| Error::internal("no new device list id"))?
                }
            };
            let to_uint = |n: i64| UInt::new(n.max(0) as u64).unwrap_or_default();
            let mut by_prev: BTreeMap<Option<i64>, Vec<OwnedServerName>> = BTreeMap::new();
            for server in servers {
                by_prev.entry(given.get(server.as_str()).copied()).or_default().push(server);
            }
            for (prev_id, servers) in by_prev {
                let mut update = DeviceListUpdateContent::new(user.to_owned(), device_id.into(), to_uint(stream_id));
                update.prev_id = prev_id.into_iter().map(to_uint).collect();
                update.deleted = deleted.then_some(true);
                if let Some(keys) = keys {
                    let raw = serde_json::value::RawValue::from_string(keys.to_owned()).map_err(Error::internal)?;
                    update.keys = Some(Raw::from_json(raw));
                }
                let edu = edu_json(Edu::DeviceListUpdate(update))?;
                self.send_edu(&servers, &edu, None).await?;
            }
            Ok::<_, Error>(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(%user, error = %e, "could not queue a device list update for other servers");
        }
    }

    /// A local user's cross-signing keys changed: `m.signing_key_update` for the
    /// servers that share a room with them.
    pub async fn federate_signing_key_update(&self, user: &UserId) {
        let result = async {
            let servers = self.servers_sharing_rooms_with(user).await?;
            if servers.is_empty() {
                return Ok(());
            }
            let mut update = SigningKeyUpdateContent::new(user.to_owned());
            for (key_type, json) in self.store.get_cross_signing_keys(user.as_str()).await? {
                let raw = Raw::from_json(serde_json::value::RawValue::from_string(json).map_err(Error::internal)?);
                match key_type.as_str() {
                    "master" => update.master_key = Some(raw),
                    "self_signing" => update.self_signing_key = Some(raw),
                    _ => {}
                }
            }
            let edu = edu_json(Edu::SigningKeyUpdate(update))?;
            self.send_edu(&servers, &edu, None).await
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(%user, error = %e, "could not queue a signing key update for other servers");
        }
    }

    /// Applies one EDU from `origin`. EDUs about users of another server, or about
    /// rooms the user is not in, are ignored (logged), as the spec asks.
    pub async fn handle_edu(self: &Arc<Self>, origin: &ServerName, edu: &Raw<Edu>) -> Result<()> {
        let edu = match edu.deserialize() {
            Ok(edu) => edu,
            Err(e) => {
                tracing::debug!(%origin, error = %e, "ignoring a malformed EDU");
                return Ok(());
            }
        };
        match edu {
            Edu::Typing(t) => self.remote_typing(origin, t).await,
            Edu::Receipt(r) => self.remote_receipts(origin, r).await,
            Edu::Presence(p) => self.remote_presence(origin, p).await,
            Edu::DirectToDevice(d) => self.remote_to_device(origin, d).await,
            Edu::DeviceListUpdate(u) => {
                if u.user_id.server_name() == origin {
                    self.apply_device_list_update(&u).await?;
                }
                self.remote_device_list_change(origin, &u.user_id).await
            }
            Edu::SigningKeyUpdate(u) => {
                if u.user_id.server_name() == origin {
                    self.apply_signing_key_update(&u).await?;
                }
                self.remote_device_list_change(origin, &u.user_id).await
            }
            _ => Ok(()),
        }
    }

    /// Whether `user` belongs to `origin` and is joined to `room_id`.
    async fn remote_member(&self, origin: &ServerName, room_id: &RoomId, user: &UserId) -> Result<bool> {
        if user.server_name() != origin {
            tracing::debug!(%origin, %user, "ignoring an EDU about another server's user");
            return Ok(false);
        }
        if !self.server_allowed_in_room(room_id, origin).await? {
            return Ok(false);
        }
        let joined = self.store.get_membership(room_id.as_str(), user.as_str()).await?;
        Ok(joined.is_some_and(|m| m.membership == "join"))
    }

    async fn remote_typing(self: &Arc<Self>, origin: &ServerName, t: TypingContent) -> Result<()> {
        if !self.remote_member(origin, &t.room_id, &t.user_id).await? {
            return Ok(());
        }
        let until = t.typing.then(|| Instant::now() + REMOTE_TYPING);
        self.set_typing_notice(&t.room_id, &t.user_id, until).await
    }

    async fn remote_receipts(&self, origin: &ServerName, r: ReceiptContent) -> Result<()> {
        for (room_id, map) in r.receipts {
            let mut changed = false;
            for (user, data) in map.read {
                if !self.remote_member(origin, &room_id, &user).await? {
                    continue;
                }
                let thread_id = match &data.data.thread {
                    ReceiptThread::Main => "main".to_owned(),
                    ReceiptThread::Thread(id) => id.to_string(),
                    _ => String::new(),
                };
                let ts = data.data.ts.map_or_else(now_ms, |ts| i64::from(ts.get()));
                // One receipt per user and thread: the spec's list holds one event.
                let Some(event_id) = data.event_ids.last() else { continue };
                self.store
                    .set_receipt(&ReceiptRow {
                        room_id: room_id.to_string(),
                        user_id: user.to_string(),
                        receipt_type: "m.read".to_owned(),
                        thread_id,
                        event_id: event_id.to_string(),
                        ts,
                    })
                    .await?;
                changed = true;
            }
            if changed {
                self.notifier.notify_users(&self.joined_local_members(&room_id).await?);
            }
        }
        Ok(())
    }

    async fn remote_presence(&self, origin: &ServerName, p: PresenceContent) -> Result<()> {
        for update in p.push {
            if update.user_id.server_name() != origin {
                continue;
            }
            let state = match update.presence {
                PresenceState::Online => "online",
                PresenceState::Unavailable => "unavailable",
                _ => "offline",
            };
            let ago = i64::try_from(u64::from(update.last_active_ago)).unwrap_or(i64::MAX);
            let last_active = now_ms().saturating_sub(ago);
            let msg = update.status_msg.as_deref().filter(|m| m.len() <= 1024);
            self.store.set_presence(update.user_id.as_str(), state, Some(msg), last_active).await?;
            self.wake_room_peers(&update.user_id).await?;
        }
        Ok(())
    }

    async fn remote_to_device(&self, origin: &ServerName, d: DirectDeviceContent) -> Result<()> {
        if d.sender.server_name() != origin {
            tracing::debug!(%origin, sender = %d.sender, "ignoring to-device messages from another server's user");
            return Ok(());
        }
        let mut rows: Vec<(String, String, String)> = Vec::new();
        let mut to_wake = Vec::new();
        for (user, devices) in d.messages.iter().filter(|(u, _)| u.server_name() == self.server_name()) {
            for (target, content) in devices {
                let content = content.json().get().to_owned();
                match target {
                    DeviceIdOrAllDevices::DeviceId(device) => {
                        rows.push((user.to_string(), device.to_string(), content));
                    }
                    DeviceIdOrAllDevices::AllDevices => {
                        for device in self.store.list_devices(user.as_str()).await? {
                            rows.push((user.to_string(), device.device_id, content.clone()));
                        }
                    }
                }
            }
            to_wake.push(user.clone());
            if rows.len() > MAX_TO_DEVICE_PER_EDU {
                tracing::info!(%origin, "ignoring an m.direct_to_device EDU with too many messages");
                return Ok(());
            }
        }
        let queued: Vec<NewToDevice<'_>> =
            rows.iter().map(|(u, d, c)| NewToDevice { user_id: u, device_id: d, content: c }).collect();
        // The message id makes a resent EDU a no-op, as a client's transaction id does.
        let device_scope = format!("federation:{origin}");
        let pos = self
            .store
            .queue_to_device(
                d.sender.as_str(),
                &device_scope,
                d.message_id.as_str(),
                d.ev_type.to_string().as_str(),
                &queued,
            )
            .await?;
        if pos.is_some() {
            self.notifier.notify_users(&to_wake);
        }
        Ok(())
    }

    async fn remote_device_list_change(&self, origin: &ServerName, user: &UserId) -> Result<()> {
        if user.server_name() != origin {
            return Ok(());
        }
        self.store.record_remote_device_list_change(user.as_str()).await?;
        self.wake_room_peers(user).await
    }
}
