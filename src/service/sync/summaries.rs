//! Room summaries' member figures kept per room: joined and invited counts and the
//! first members by position (the heroes are taken from them). A member event wakes
//! every member's `/sync`, and each sends the room's changed summary: without this each
//! of them counted the room again (1 ms in a room of 10,000, so about 10 s of CPU for
//! one join that 10,000 long-polls saw). Now the first sync after a change counts and
//! the others reuse it.
//!
//! The first members are read only when a sync needs heroes (the room has neither a
//! name nor a canonical alias), once per entry.
//!
//! An entry holds while the change index's stamp of the room's memberships is the one
//! it was counted under (`ChangeIndex::stamp`). Writers record a change before they
//! commit, so an entry is only kept when everything its stamp names is covered by the
//! reader's `head`, which lies after those commits: a count read after `head` then
//! includes them.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use crate::{
    error::Result,
    service::Services,
    storage::changes::{Kind, Stamp},
};

/// Rooms kept before the cache forgets them all.
const MAX_ROOMS: usize = 20_000;

/// Members taken for heroes: five, and one more in case the syncing user is among them.
const FIRST_MEMBERS: i64 = 6;

/// One room's member figures.
#[derive(Debug, Default)]
pub(crate) struct MemberSummary {
    pub joined: i64,
    pub invited: i64,
    /// The first joined or invited members by the position of their membership, read
    /// when a sync first needs heroes (a named room never does).
    first: tokio::sync::OnceCell<Vec<String>>,
}

/// See the module comment.
#[derive(Default)]
pub struct Summaries {
    rooms: Mutex<HashMap<String, (Stamp, Arc<MemberSummary>)>>,
}

impl Summaries {
    fn get(&self, room_id: &str, stamp: &Stamp) -> Option<Arc<MemberSummary>> {
        let rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        rooms.get(room_id).filter(|(s, _)| s == stamp).map(|(_, m)| m.clone())
    }

    fn put(&self, room_id: &str, stamp: Stamp, summary: Arc<MemberSummary>) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        if rooms.len() >= MAX_ROOMS && !rooms.contains_key(room_id) {
            rooms.clear();
        }
        rooms.insert(room_id.to_owned(), (stamp, summary));
    }
}

impl Services {
    /// The member figures of `room_ids` as of `head` (or later): kept ones where the
    /// room's memberships did not move since they were counted, counted otherwise.
    pub(crate) async fn member_summaries(
        &self,
        room_ids: &[&str],
        head: i64,
    ) -> Result<HashMap<String, Arc<MemberSummary>>> {
        let changes = self.store.changes();
        let mut out = HashMap::with_capacity(room_ids.len());
        let mut missing = Vec::new();
        for &room in room_ids {
            let stamp = changes.stamp(Kind::RoomMembers, room);
            match stamp.as_ref().and_then(|s| self.summaries.get(room, s)) {
                Some(summary) => {
                    out.insert(room.to_owned(), summary);
                }
                None => missing.push((room, stamp)),
            }
        }
        if missing.is_empty() {
            return Ok(out);
        }
        let rooms: Vec<&str> = missing.iter().map(|(r, _)| *r).collect();
        let mut counts = self.store.count_members_in_rooms(&rooms).await?;
        for (room, stamp) in missing {
            let (joined, invited) = counts.remove(room).unwrap_or_default();
            let summary = Arc::new(MemberSummary { joined, invited, first: Default::default() });
            if let Some(stamp) = stamp.filter(|s| s.covered_by(head)) {
                self.summaries.put(room, stamp, summary.clone());
            }
            out.insert(room.to_owned(), summary);
        }
        Ok(out)
    }

    /// The first joined or invited members of the room `summary` is of: read once per
    /// summary (under the same stamp, so as of the count or later).
    pub(crate) async fn first_members<'a>(&self, room_id: &str, summary: &'a MemberSummary) -> Result<&'a [String]> {
        // No user id is "": the first members, whoever syncs.
        let first = summary.first.get_or_try_init(|| self.store.get_room_heroes(room_id, "", FIRST_MEMBERS)).await?;
        Ok(first)
    }
}
