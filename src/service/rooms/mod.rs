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
    sync::{Arc, Mutex},
};

use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use super::{
    Services,
    cache::{ByteCache, ENTRY_OVERHEAD, heap_str},
};
use crate::error::Result;

/// One lock per room, so that a room's events are appended one at a time (each names
/// the previous one). A room's entry goes when its last holder lets go and nobody waits
/// (see `RoomGuard`), so the map holds only rooms in use, not every room ever touched.
#[derive(Default)]
pub struct RoomLocks {
    locks: Mutex<LockMap>,
}

#[derive(Default)]
struct LockMap {
    rooms: HashMap<OwnedRoomId, Arc<AsyncMutex<()>>>,
    /// The size at which entries left behind (by a waiter that gave up: it held a clone
    /// and went without taking the lock) are swept: twice the size after the last sweep.
    sweep_at: usize,
}

/// Past this many entries, entries that nobody holds are swept (see `LockMap`).
const LOCKS_SWEEP_MIN: usize = 1024;

/// A room's lock, held; dropping it lets the room go, and drops the room's entry when
/// nobody else holds or waits for it.
pub struct RoomGuard<'a> {
    guard: Option<OwnedMutexGuard<()>>,
    room_id: OwnedRoomId,
    locks: &'a RoomLocks,
}

impl RoomLocks {
    fn map(&self) -> std::sync::MutexGuard<'_, LockMap> {
        self.locks.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub async fn lock(&self, room_id: &RoomId) -> RoomGuard<'_> {
        let lock = {
            let mut map = self.map();
            if map.rooms.len() >= map.sweep_at.max(LOCKS_SWEEP_MIN) {
                map.rooms.retain(|_, l| Arc::strong_count(l) > 1);
                map.sweep_at = map.rooms.len() * 2;
            }
            map.rooms.entry(room_id.to_owned()).or_default().clone()
        };
        RoomGuard { guard: Some(lock.lock_owned().await), room_id: room_id.to_owned(), locks: self }
    }

    /// Rooms with an entry (tests).
    pub fn len(&self) -> usize {
        self.map().rooms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for RoomGuard<'_> {
    fn drop(&mut self) {
        let Some(guard) = self.guard.take() else { return };
        let mut map = self.locks.map();
        // Held by the map and this guard alone: nobody else holds or waits for it. A
        // task that looks the room up next (under the map's lock, so after this) makes a
        // new entry, which is free: what this guard protected is over.
        if let Some(lock) = map.rooms.get(&self.room_id)
            && Arc::ptr_eq(lock, OwnedMutexGuard::mutex(&guard))
            && Arc::strong_count(lock) == 2
        {
            map.rooms.remove(&self.room_id);
        }
        drop(map);
        drop(guard);
    }
}

/// Local joined members per room, for waking their `/sync`s, bounded in estimated
/// bytes (`cache::shares::ROOM_MEMBERS`). Changed in place on a member's change, dropped
/// on other changes of the room's membership, and loaded again when next needed.
pub struct MemberCache {
    rooms: ByteCache<OwnedRoomId, Arc<Vec<OwnedUserId>>>,
}

fn weigh_members(room_id: &OwnedRoomId, members: &Arc<Vec<OwnedUserId>>) -> usize {
    // Each user id is a boxed string, held by the vector (its capacity: it may have
    // grown by changes in place), in an `Arc`.
    let ids: usize = members.iter().map(|u| heap_str(u.as_str())).sum();
    let slots = members.capacity() * std::mem::size_of::<OwnedUserId>();
    heap_str(room_id.as_str()) + ids + slots + 64 + ENTRY_OVERHEAD
}

impl MemberCache {
    pub fn new(max_bytes: usize) -> Self {
        MemberCache { rooms: ByteCache::new(max_bytes, weigh_members) }
    }

    /// Estimated bytes held, and the bound (tests).
    pub fn bytes(&self) -> (usize, usize) {
        (self.rooms.bytes(), self.rooms.max_bytes())
    }
}

impl Services {
    /// The local users joined to a room.
    pub async fn joined_local_members(&self, room_id: &RoomId) -> Result<Arc<Vec<OwnedUserId>>> {
        if let Some(members) = self.member_cache.rooms.get(room_id) {
            return Ok(members);
        }
        // A membership change after this stamp may make the list read below stale: it
        // is not kept then (the next call reads again).
        let stamp = self.member_cache.rooms.stamp();
        let rows = self.store.get_room_members(room_id.as_str(), Some("join")).await?;
        let members: Arc<Vec<OwnedUserId>> = Arc::new(
            rows.into_iter()
                .filter_map(|r| OwnedUserId::try_from(r.user_id).ok())
                .filter(|u| u.server_name() == self.server_name())
                .collect(),
        );
        self.member_cache.rooms.insert_at(stamp, room_id.to_owned(), members.clone());
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
        self.member_cache.rooms.remove(room_id);
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
        // A change either way (see `ByteCache::stamp`), also for a remote user.
        self.member_cache.rooms.update(room_id, |members| {
            if local {
                let members = Arc::make_mut(members);
                members.retain(|m| *m != user);
                if joined {
                    members.push(user.clone());
                }
            }
        });
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
        self.member_cache.rooms.stamp()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ruma::{owned_room_id, room_id};

    use super::*;

    /// A room's entry goes when its lock is let go and nobody waits; it stays while
    /// someone waits, and one left by a waiter that gave up is swept.
    #[tokio::test]
    async fn room_locks_keep_only_rooms_in_use() {
        let locks = RoomLocks::default();
        for i in 0..3000 {
            let room = OwnedRoomId::try_from(format!("!room{i}:example.org")).unwrap();
            drop(locks.lock(&room).await);
        }
        assert_eq!(locks.len(), 0);

        let room = room_id!("!busy:example.org");
        let held = locks.lock(room).await;
        let waiter = async { drop(locks.lock(room).await) };
        // The waiter gives up while the lock is held: its clone goes without a guard.
        assert!(tokio::time::timeout(Duration::from_millis(20), waiter).await.is_err());
        let second = locks.lock(room_id!("!other:example.org"));
        let second = second.await;
        assert_eq!(locks.len(), 2);
        drop(second);
        drop(held);
        assert_eq!(locks.len(), 0);

        // One held while another task waits: the entry stays for the waiter.
        let held = locks.lock(room).await;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let waiting = async {
            let guard = locks.lock(room).await;
            tx.send(locks.len()).unwrap();
            drop(guard);
        };
        let release = async {
            tokio::task::yield_now().await;
            drop(held);
        };
        tokio::join!(waiting, release);
        assert_eq!(rx.await.unwrap(), 1);
        assert_eq!(locks.len(), 0);
    }

    /// Entries left behind past the sweep size are swept (a waiter that gave up).
    #[tokio::test]
    async fn room_locks_sweep_what_was_left_behind() {
        let locks = RoomLocks::default();
        let mut held = Vec::new();
        for i in 0..LOCKS_SWEEP_MIN + 10 {
            let room = OwnedRoomId::try_from(format!("!room{i}:example.org")).unwrap();
            // Left behind: a clone taken, then dropped without locking.
            let lock = locks.map().rooms.entry(room.clone()).or_default().clone();
            drop(lock);
            if i < 5 {
                held.push(locks.lock(&room).await);
            }
        }
        assert_eq!(locks.len(), LOCKS_SWEEP_MIN + 10);
        drop(locks.lock(&owned_room_id!("!new:example.org")).await);
        assert_eq!(locks.len(), 5, "only the held ones stay");
        drop(held);
        assert_eq!(locks.len(), 0);
    }

    /// The estimate of a member list is not below the heap it takes, nor far above.
    #[test]
    fn member_list_estimate_is_not_below_the_heap_taken() {
        use crate::service::cache::heap::bytes_of;
        for n in [0, 1, 10, 1000] {
            let mut estimate = 0;
            let taken = bytes_of(|| {
                let room = owned_room_id!("!abcdefghijklmnop:example.org");
                let members: Arc<Vec<OwnedUserId>> =
                    Arc::new((0..n).map(|i| OwnedUserId::try_from(format!("@user{i}:example.org")).unwrap()).collect());
                estimate = weigh_members(&room, &members);
                (room, members)
            });
            eprintln!("{n} members: estimate {estimate}, taken {taken}");
            assert!(
                estimate >= taken && estimate < 3 * taken.max(64),
                "{n} members: estimate {estimate}, taken {taken}"
            );
        }
    }
}
