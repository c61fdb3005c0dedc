//! Rooms: creating them, membership, sending events, reading state and history.
//! `append.rs` is the one path by which local events are made and stored.

pub mod append;
pub mod create;
pub mod format;
pub mod membership;
pub mod messages;
pub mod pdu;
pub mod state;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use ruma::{OwnedRoomId, OwnedUserId, RoomId};
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
}

impl Services {
    /// The local users joined to a room.
    pub async fn joined_local_members(&self, room_id: &RoomId) -> Result<Vec<OwnedUserId>> {
        if let Some(members) = self.member_cache.rooms.lock().unwrap_or_else(|e| e.into_inner()).get(room_id) {
            return Ok(members.as_ref().clone());
        }
        let rows = self.store.get_room_members(room_id.as_str(), Some("join")).await?;
        let members: Vec<OwnedUserId> = rows
            .into_iter()
            .filter_map(|r| OwnedUserId::try_from(r.user_id).ok())
            .filter(|u| u.server_name() == self.server_name())
            .collect();
        self.member_cache
            .rooms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(room_id.to_owned(), Arc::new(members.clone()));
        Ok(members)
    }

    pub(crate) fn forget_member_cache(&self, room_id: &RoomId) {
        self.member_cache.rooms.lock().unwrap_or_else(|e| e.into_inner()).remove(room_id);
    }
}
