//! Rooms: creating them, membership, sending events, reading state and history.
//! `build.rs` makes and checks every local event; `append.rs` stores one on top of a
//! room's state, `create.rs` a new room's first events at once; `pipeline/` checks
//! remote PDUs and places every event in the DAG, the stream and the room's state.

pub mod append;
pub mod build;
pub mod create;
pub mod format;
pub mod membership;
pub mod messages;
pub mod pdu;
pub mod pipeline;
pub mod relations;
pub mod reports;
pub mod restricted;
pub mod state;
pub mod summary;
pub mod timestamp;
pub mod upgrade;
pub mod validate;
pub mod visibility;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use super::Services;
use crate::error::Result;

/// One lock per room, so that a room's events are appended one at a time (each names
/// the previous one). Locks of idle rooms are dropped.
#[derive(Default)]
pub struct RoomLocks {
    locks: Mutex<HashMap<OwnedRoomId, Arc<AsyncMutex<()>>>>,
}

impl RoomLocks {
    pub async fn lock(&self, room_id: &RoomId) -> OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            if locks.len() > 10_000 {
                locks.retain(|_, l| Arc::strong_count(l) > 1);
            }
            locks.entry(room_id.to_owned()).or_default().clone()
        };
        lock.lock_owned().await
    }
}

/// Local joined members per room, for waking their `/sync`s. Dropped on every
/// membership change of the room and loaded again when next needed.
#[derive(Default)]
pub struct MemberCache {
    rooms: Mutex<HashMap<OwnedRoomId, Arc<Vec<OwnedUserId>>>>,
    /// Bumped on every membership change, so that a list read from the database
    /// before a change is not cached after it.
    generation: AtomicU64,
}

impl Services {
    /// The local users joined to a room.
    pub async fn joined_local_members(&self, room_id: &RoomId) -> Result<Arc<Vec<OwnedUserId>>> {
        let generation = {
            let cache = self.member_cache.rooms.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(members) = cache.get(room_id) {
                return Ok(members.clone());
            }
            self.member_cache.generation.load(Ordering::Acquire)
        };
        let rows = self.store.get_room_members(room_id.as_str(), Some("join")).await?;
        let members: Arc<Vec<OwnedUserId>> = Arc::new(
            rows.into_iter()
                .filter_map(|r| OwnedUserId::try_from(r.user_id).ok())
                .filter(|u| u.server_name() == self.server_name())
                .collect(),
        );
        let mut cache = self.member_cache.rooms.lock().unwrap_or_else(|e| e.into_inner());
        // A membership change since the read may have made this list stale: keep it
        // out of the cache then (the next call reads again).
        if self.member_cache.generation.load(Ordering::Acquire) == generation {
            cache.insert(room_id.to_owned(), members.clone());
        }
        Ok(members)
    }

    /// Wakes the syncs of `user` and of every local user who shares a joined room with
    /// them (for presence and device list changes).
    pub(crate) async fn wake_room_peers(&self, user: &UserId) -> Result<()> {
        let mut to_wake = vec![user.to_owned()];
        for room in self.joined_rooms(user).await? {
            to_wake.extend(self.joined_local_members(&room).await?.iter().cloned());
        }
        to_wake.sort();
        to_wake.dedup();
        self.notifier.notify_users(&to_wake);
        Ok(())
    }

    pub(crate) fn forget_member_cache(&self, room_id: &RoomId) {
        let mut cache = self.member_cache.rooms.lock().unwrap_or_else(|e| e.into_inner());
        cache.remove(room_id);
        self.member_cache.generation.fetch_add(1, Ordering::AcqRel);
        drop(cache);
        self.push_members_cache.forget(room_id);
        self.forget_room_servers(room_id);
    }

    /// A membership event of a local or remote `user` became the room's current state
    /// on top of the state before it (nothing else changed): the member caches take the
    /// change in place (a map update) rather than being read again from all members.
    pub(crate) fn member_changed(&self, room_id: &RoomId, user: &str, membership: &str, content: &str) {
        let Ok(user) = OwnedUserId::try_from(user) else { return self.forget_member_cache(room_id) };
        let joined = membership == "join";
        let local = user.server_name() == self.server_name();
        let mut cache = self.member_cache.rooms.lock().unwrap_or_else(|e| e.into_inner());
        self.member_cache.generation.fetch_add(1, Ordering::AcqRel);
        if local && let Some(members) = cache.get_mut(room_id) {
            let members = Arc::make_mut(members);
            members.retain(|m| *m != user);
            if joined {
                members.push(user.clone());
            }
        }
        drop(cache);
        let display_name = serde_json::from_str::<serde_json::Value>(content)
            .ok()
            .and_then(|c| c["displayname"].as_str().map(str::to_owned));
        self.push_members_cache.member_changed(room_id, &user, local, joined, display_name);
        if !local {
            // Whether the user's server is still in the room depends on its other users.
            self.forget_room_servers(room_id);
        }
    }

    /// Grows with every membership change: a list of members read when it was `n` is
    /// stale once it is not `n` any more.
    pub(crate) fn member_generation(&self) -> u64 {
        self.member_cache.generation.load(Ordering::Acquire)
    }
}
