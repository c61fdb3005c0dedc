//! Ephemeral and per-user room data: typing notices (in memory, with expiry), read
//! receipts and read markers, and presence.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ruma::{EventId, OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde_json::{Value as JsonValue, json};

use super::{Services, now_ms};
use crate::{
    error::{Error, Result},
    storage::{PresenceRow, ReceiptRow},
};

/// Who is typing where, until when. `serial` grows with every change, so a sync token
/// can say which changes a client has seen. Notices run out by themselves: one expiry
/// worker per server (started with the first notice) sleeps until the earliest end,
/// drops what has ended and wakes those rooms' syncs. No task per request.
/// Per room: the serial of its last change, and who is typing until when.
type TypingRooms = HashMap<OwnedRoomId, (u64, HashMap<OwnedUserId, Instant>)>;

#[derive(Default)]
pub struct Typing {
    rooms: Mutex<TypingRooms>,
    serial: AtomicU64,
    /// Tells the worker that a notice was set, which may end before what it waits for.
    wake_worker: std::sync::Arc<tokio::sync::Notify>,
    worker_started: AtomicBool,
}

/// A user's activity (`last_active_ts`) is written again when what is stored is older
/// than this; sooner, an unchanged presence writes nothing. Below `IDLE_AFTER_MS`, so
/// that a syncing user never reads as idle.
const ACTIVITY_REFRESH_MS: i64 = 3 * 60 * 1000;

/// Local users' presence as this process last wrote or read it, so that a `/sync`
/// that changes nothing reads nothing either. Bounded: past `PRESENCE_SEEN_MAX` users
/// it starts again empty (a miss costs one read).
#[derive(Default)]
pub struct PresenceSeen {
    rows: Mutex<HashMap<OwnedUserId, PresenceRow>>,
}

const PRESENCE_SEEN_MAX: usize = 100_000;

impl PresenceSeen {
    fn rows(&self) -> std::sync::MutexGuard<'_, HashMap<OwnedUserId, PresenceRow>> {
        self.rows.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, user: &UserId) -> Option<PresenceRow> {
        self.rows().get(user).cloned()
    }

    fn put(&self, user: &UserId, row: PresenceRow) {
        let mut rows = self.rows();
        if rows.len() >= PRESENCE_SEEN_MAX && !rows.contains_key(user) {
            rows.clear();
        }
        rows.insert(user.to_owned(), row);
    }

    fn forget(&self, user: &UserId) {
        self.rows().remove(user);
    }
}

/// Longest presence `status_msg`, in bytes.
const MAX_STATUS_MSG_BYTES: usize = 1024;
/// Longest typing timeout honoured.
const MAX_TYPING: Duration = Duration::from_secs(120);
/// After this long without activity, "online" reads as "unavailable"...
const IDLE_AFTER_MS: i64 = 5 * 60 * 1000;
/// ...and after this long, as "offline" (the client stopped syncing).
const OFFLINE_AFTER_MS: i64 = 30 * 60 * 1000;

impl Typing {
    pub fn serial(&self) -> u64 {
        self.serial.load(Ordering::SeqCst)
    }

    /// The users typing in a room now, if it changed after `since` (or always when `since` is `None`).
    pub fn typing_since(&self, room_id: &RoomId, since: Option<u64>) -> Option<Vec<OwnedUserId>> {
        let rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let (changed, users) = rooms.get(room_id)?;
        if since.is_some_and(|s| *changed <= s && s <= self.serial()) {
            return None;
        }
        let now = Instant::now();
        Some(users.iter().filter(|(_, until)| **until > now).map(|(u, _)| u.clone()).collect())
    }

    /// Sets or clears a user's typing; returns whether anything changed.
    fn set(&self, room_id: &RoomId, user: &UserId, until: Option<Instant>) -> bool {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let entry = rooms.entry(room_id.to_owned()).or_default();
        let now = Instant::now();
        let was = entry.1.get(user).is_some_and(|u| *u > now);
        match until {
            Some(until) => {
                entry.1.insert(user.to_owned(), until);
            }
            None => {
                entry.1.remove(user);
            }
        }
        entry.1.retain(|_, u| *u > now);
        if was != until.is_some() || until.is_some() {
            entry.0 = self.serial.fetch_add(1, Ordering::SeqCst) + 1;
            true
        } else {
            false
        }
    }

    /// When the first notice still running ends.
    fn next_expiry(&self) -> Option<Instant> {
        let rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        rooms.values().flat_map(|(_, users)| users.values()).min().copied()
    }

    /// Drops the notices that have ended by `now`; returns the rooms where one did.
    fn expire_due(&self, now: Instant) -> Vec<OwnedRoomId> {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed = Vec::new();
        for (room_id, (serial, users)) in rooms.iter_mut() {
            let before = users.len();
            users.retain(|_, until| *until > now);
            if users.len() != before {
                *serial = self.serial.fetch_add(1, Ordering::SeqCst) + 1;
                changed.push(room_id.clone());
            }
        }
        changed
    }

    /// Notices under way, across all rooms (for tests and metrics).
    pub fn active(&self) -> usize {
        let rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        rooms.values().map(|(_, users)| users.values().filter(|u| **u > now).count()).sum()
    }
}

impl Services {
    /// `PUT /rooms/{roomId}/typing/{userId}`.
    pub async fn set_typing(
        self: &std::sync::Arc<Self>,
        room_id: &RoomId,
        user: &UserId,
        timeout: Option<Duration>,
    ) -> Result<()> {
        self.require_joined(room_id, user).await?;
        let until = timeout.map(|t| Instant::now() + t.min(MAX_TYPING));
        self.set_typing_notice(room_id, user, until).await?;
        if let Err(e) = self.federate_typing(room_id, user, until.is_some()).await {
            tracing::warn!(%room_id, error = %e, "could not queue a typing notice for other servers");
        }
        Ok(())
    }

    /// Sets or ends a typing notice (local or remote) and wakes the room's syncs.
    pub(crate) async fn set_typing_notice(
        self: &std::sync::Arc<Self>,
        room_id: &RoomId,
        user: &UserId,
        until: Option<Instant>,
    ) -> Result<()> {
        if self.typing.set(room_id, user, until) {
            self.notifier.notify_users(&self.joined_local_members(room_id).await?);
        }
        if until.is_some() {
            self.start_typing_worker();
            self.typing.wake_worker.notify_one();
        }
        Ok(())
    }

    /// Starts the typing expiry worker once. It holds no strong reference to the
    /// services between rounds, and ends when the server shuts down.
    fn start_typing_worker(self: &Arc<Self>) {
        if self.typing.worker_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let services = Arc::downgrade(self);
        let wake = Arc::clone(&self.typing.wake_worker);
        let mut shutdown = self.shutting_down.subscribe();
        tokio::spawn(async move {
            tracing::debug!("typing expiry worker started");
            loop {
                let Some(next) = services.upgrade().map(|s| s.typing.next_expiry()) else { return };
                let sleep = async {
                    match next {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = shutdown.wait_for(|down| *down) => return,
                    _ = wake.notified() => continue,
                    _ = sleep => {}
                }
                let Some(services) = services.upgrade() else { return };
                for room_id in services.typing.expire_due(Instant::now()) {
                    match services.joined_local_members(&room_id).await {
                        Ok(members) => services.notifier.notify_users(&members),
                        Err(e) => tracing::warn!(room_id = %room_id, error = %e, "could not wake a room's syncs"),
                    }
                }
            }
        });
    }

    /// `POST /rooms/{roomId}/receipt/{type}/{eventId}`.
    pub async fn set_receipt(
        &self,
        room_id: &RoomId,
        user: &UserId,
        receipt_type: &str,
        event_id: &EventId,
        thread_id: Option<&str>,
    ) -> Result<()> {
        if !matches!(receipt_type, "m.read" | "m.read.private" | "m.fully_read") {
            return Err(Error::invalid_param(format!("Unknown receipt type {receipt_type}")));
        }
        self.require_joined(room_id, user).await?;
        let event = self.store.get_event(event_id.as_str()).await?;
        // Events outside the stream (outliers, rejected, soft-failed) are not the client's.
        if event.as_ref().is_none_or(|e| e.room_id != room_id.as_str() || e.position.is_none()) {
            return Err(Error::not_found("No such event in this room"));
        }
        if receipt_type == "m.fully_read" {
            return self.set_fully_read(room_id, user, event_id).await;
        }
        self.check_receipt_thread(event_id.as_str(), thread_id).await?;
        let unread_before = self.unread_for_badge(user).await;
        let position = self
            .store
            .set_receipt(&ReceiptRow {
                room_id: room_id.to_string(),
                user_id: user.to_string(),
                receipt_type: receipt_type.to_owned(),
                thread_id: thread_id.unwrap_or_default().to_owned(),
                event_id: event_id.to_string(),
                ts: now_ms(),
            })
            .await?;
        self.push_badge_after_read(user, unread_before, position).await;
        let to_wake = if receipt_type == "m.read.private" {
            vec![user.to_owned()]
        } else {
            if let Err(e) = self.federate_receipt(room_id, user, event_id, thread_id).await {
                tracing::warn!(%room_id, error = %e, "could not queue a receipt for other servers");
            }
            self.joined_local_members(room_id).await?.as_ref().clone()
        };
        self.notifier.notify_users(&to_wake);
        Ok(())
    }

    /// The `m.fully_read` marker, kept as room account data.
    pub async fn set_fully_read(&self, room_id: &RoomId, user: &UserId, event_id: &EventId) -> Result<()> {
        let content = json!({"event_id": event_id}).to_string();
        self.store.set_account_data(user.as_str(), room_id.as_str(), "m.fully_read", &content).await?;
        self.notifier.notify_users(&[user.to_owned()]);
        Ok(())
    }

    /// The `m.receipt` events of each room for a sync: receipts after `since` (up to
    /// `until`) in the user's joined rooms, the user's own private receipts included,
    /// others' left out.
    /// A user's unthreaded and threaded receipts on one event do not fit in one content
    /// map (one slot per event, type and user), so the second goes in another event.
    pub async fn receipt_events(
        &self,
        user: &UserId,
        since: i64,
        until: i64,
    ) -> Result<HashMap<String, Vec<JsonValue>>> {
        let receipts = self.store.get_receipts_for_user_rooms(user.as_str(), since, until).await?;
        let mut by_room: HashMap<String, Vec<JsonValue>> = HashMap::new();
        for r in receipts.iter().filter(|r| r.receipt_type != "m.read.private" || r.user_id == user.as_str()) {
            let mut entry = json!({"ts": r.ts});
            if !r.thread_id.is_empty() {
                entry["thread_id"] = json!(r.thread_id);
            }
            let contents = by_room.entry(r.room_id.clone()).or_default();
            let free = contents.iter().position(|c| c[&r.event_id][&r.receipt_type].get(&r.user_id).is_none());
            let content = match free {
                Some(i) => &mut contents[i],
                None => {
                    contents.push(json!({}));
                    contents.last_mut().expect("just pushed")
                }
            };
            let by_type = content.as_object_mut().expect("an object").entry(r.event_id.clone()).or_insert(json!({}));
            by_type[&r.receipt_type][&r.user_id] = entry;
        }
        Ok(by_room
            .into_iter()
            .map(|(room, contents)| {
                (room, contents.into_iter().map(|c| json!({"type": "m.receipt", "content": c})).collect())
            })
            .collect())
    }

    /// `PUT /presence/{userId}/status` and `set_presence` on sync. Writes only on a
    /// change, or to refresh activity once a minute.
    pub async fn set_presence(&self, user: &UserId, state: &str, status_msg: Option<Option<&str>>) -> Result<()> {
        if !matches!(state, "online" | "unavailable" | "offline") {
            return Err(Error::invalid_param(format!("Unknown presence {state}")));
        }
        if status_msg.flatten().is_some_and(|m| m.len() > MAX_STATUS_MSG_BYTES) {
            return Err(Error::invalid_param(format!("status_msg is {MAX_STATUS_MSG_BYTES} bytes at most")));
        }
        let now = now_ms();
        let current = match self.presence_seen.get(user) {
            Some(row) => Some(row),
            None => {
                let row = self.store.get_presence(user.as_str()).await?;
                if let Some(row) = &row {
                    self.presence_seen.put(user, row.clone());
                }
                row
            }
        };
        let msg = match (status_msg, &current) {
            (Some(m), _) => m.map(str::to_owned),
            (None, Some(c)) => c.status_msg.clone(),
            (None, None) => None,
        };
        if let Some(c) = current.filter(|c| effective_state(c, now) == state && c.status_msg == msg) {
            if now - c.last_active_ts < ACTIVITY_REFRESH_MS {
                return Ok(());
            }
            // Only the activity is older: refresh it where it is stored, without a
            // stream position and without waking anyone (what clients show of it,
            // `last_active_ago`, is computed when read).
            if self.store.refresh_presence(user.as_str(), &c.state, c.status_msg.as_deref(), now).await? {
                self.presence_seen.put(user, PresenceRow { last_active_ts: now, ..c });
                if let Err(e) = self.federate_presence(user, state, msg.as_deref()).await {
                    tracing::warn!(%user, error = %e, "could not queue presence for other servers");
                }
                return Ok(());
            }
            // The stored presence is not what this process last saw: write it whole.
        }
        self.presence_seen.forget(user);
        // A sync's refresh (`status_msg` not given) keeps whatever message is stored
        // when it writes, not the one read above, so it cannot undo a concurrent change.
        self.store.set_presence(user.as_str(), state, status_msg.map(|_| msg.as_deref()), now).await?;
        if status_msg.is_some() {
            let row = PresenceRow {
                user_id: user.to_string(),
                state: state.to_owned(),
                status_msg: msg.clone(),
                last_active_ts: now,
            };
            self.presence_seen.put(user, row);
        }
        if let Err(e) = self.federate_presence(user, state, msg.as_deref()).await {
            tracing::warn!(%user, error = %e, "could not queue presence for other servers");
        }
        self.wake_room_peers(user).await
    }

    /// `GET /presence/{userId}/status`: one's own, or that of a user who shares a
    /// joined room with `requester` (anyone's with `presence.visible_without_shared_room`);
    /// otherwise `M_FORBIDDEN`, as the spec allows.
    pub async fn get_presence(&self, requester: &UserId, user: &UserId) -> Result<JsonValue> {
        if requester != user
            && !self.config.presence.visible_without_shared_room
            && !self.store.users_share_room(requester.as_str(), user.as_str()).await?
        {
            return Err(Error::forbidden("You do not share a room with that user"));
        }
        // A user of another server: what their server last told us (if anything).
        if user.server_name() == self.server_name() && !self.store.user_exists(user.as_str()).await? {
            return Err(Error::not_found("No such user"));
        }
        let row = self.store.get_presence(user.as_str()).await?;
        Ok(match row {
            Some(p) => presence_content(&p, now_ms()),
            None => json!({"presence": "offline"}),
        })
    }

    /// Presence events for a sync: changes after `since`, up to `until`, of the senders
    /// `wanted` keeps. Serialised straight from the rows (a sync in a large room can
    /// carry thousands).
    pub async fn presence_events<T>(
        &self,
        user: &UserId,
        since: i64,
        until: i64,
        wanted: impl Fn(&str) -> bool,
    ) -> Result<Vec<ruma::serde::Raw<T>>> {
        let now = now_ms();
        let rows = self.store.get_presence_since(user.as_str(), since, until).await?;
        rows.iter()
            .filter(|p| wanted(&p.user_id))
            .map(|p| {
                let event =
                    PresenceEvent { kind: "m.presence", sender: &p.user_id, content: PresenceContent::of(p, now) };
                serde_json::value::to_raw_value(&event).map(ruma::serde::Raw::from_json).map_err(Error::internal)
            })
            .collect()
    }
}

/// An `m.presence` event as `/sync` sends it.
#[derive(serde::Serialize)]
struct PresenceEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    sender: &'a str,
    content: PresenceContent<'a>,
}

/// What clients see of a user's presence (`GET /presence/{userId}/status` and
/// `m.presence`): the stored state, gone idle or offline with time.
#[derive(serde::Serialize)]
struct PresenceContent<'a> {
    presence: &'a str,
    last_active_ago: i64,
    currently_active: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status_msg: Option<&'a str>,
}

impl<'a> PresenceContent<'a> {
    fn of(p: &'a PresenceRow, now: i64) -> Self {
        let state = effective_state(p, now);
        PresenceContent {
            presence: state,
            last_active_ago: (now - p.last_active_ts).max(0),
            currently_active: state == "online",
            status_msg: p.status_msg.as_deref(),
        }
    }
}

fn effective_state(p: &PresenceRow, now: i64) -> &str {
    let idle = now - p.last_active_ts;
    match p.state.as_str() {
        "online" | "unavailable" if idle > OFFLINE_AFTER_MS => "offline",
        "online" if idle > IDLE_AFTER_MS => "unavailable",
        state => state,
    }
}

fn presence_content(p: &PresenceRow, now: i64) -> JsonValue {
    serde_json::to_value(PresenceContent::of(p, now)).unwrap_or_else(|_| json!({"presence": "offline"}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_goes_idle_then_offline() {
        let row = |state: &str, last_active_ts| PresenceRow {
            user_id: "@a:x".into(),
            state: state.into(),
            status_msg: None,
            last_active_ts,
        };
        let now = 100 * 60 * 1000;
        assert_eq!(effective_state(&row("online", now - 1000), now), "online");
        assert_eq!(effective_state(&row("online", now - IDLE_AFTER_MS - 1), now), "unavailable");
        assert_eq!(effective_state(&row("online", now - OFFLINE_AFTER_MS - 1), now), "offline");
        assert_eq!(effective_state(&row("unavailable", now - OFFLINE_AFTER_MS - 1), now), "offline");
        assert_eq!(effective_state(&row("offline", now), now), "offline");
    }
}
