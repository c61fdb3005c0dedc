//! Each room's live tail, kept in memory: its newest events and its members' whole-room
//! unread counts (the `""` rows of `unread_counts`), so that a `/sync` woken by a
//! message reads neither from the database.
//!
//! The writers of both (storing events, receipts, redactions) keep them current while
//! they hold the room (`begin`): an event that commits is appended to the tail and
//! counted in the kept counts before the writer lets go, and anything less simple
//! (a redaction, a membership that ends, a receipt's recount) drops what it touches.
//! A writer that does not `settle` (it failed or was cancelled, perhaps after its
//! commit) drops its rooms' tails and counts.
//! The room is announced before its stream position is taken, so the mark cannot pass
//! a write of the room while the tail lacks it: readers answer from memory only when no
//! write of the room is in flight, and otherwise read the database.
//!
//! What a reader reads from the database is kept only if no write of the room began or
//! ended while it read (a clock, as in `read_cache.rs`, but per room: a message in one
//! room does not empty the others).
//!
//! A tail holds every event of the room in the stream after its `from` (at most
//! `TAIL_LEN`); a kept count row is exactly the stored row (or its absence). Memory is
//! bounded in bytes: past the bound, tails and counts are dropped (dropping never makes
//! an answer wrong), and past `MAX_ROOMS` rooms the rooms themselves are forgotten (and
//! nothing read before is kept).

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
};

use super::StoredEvent;

/// Events kept per room: a woken sync needs the newest one or two, an initial sync its
/// timeline limit (clients ask for 10 to 20) plus one.
pub(crate) const TAIL_LEN: usize = 21;

/// The bound until the services set it from `[caches] memory_mb`.
pub(crate) const DEFAULT_MAX_BYTES: usize = 8 << 20;

/// Rooms remembered (mostly their clocks) before all are forgotten.
const MAX_ROOMS: usize = 100_000;

/// What a room entry, a tail entry and a count entry cost beyond their strings, roughly.
const ROOM_OVERHEAD: usize = 160;
const EVENT_OVERHEAD: usize = 220;
const COUNT_OVERHEAD: usize = 80;

/// A user's `""` row of `unread_counts` in a room, as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct UnreadRow {
    pub after_pos: i64,
    pub notifs: i64,
    pub highlights: i64,
    /// The template whose group rows count for the user too, and its cumulative counts
    /// when the row last took them in.
    pub template: Option<i64>,
    pub base_notifs: i64,
    pub base_highlights: i64,
}

impl UnreadRow {
    /// The user's counts, given their template's cumulative counts now (`group`).
    pub(crate) fn counts(&self, group: (i64, i64)) -> (i64, i64) {
        match self.template {
            Some(_) => (self.notifs + group.0 - self.base_notifs, self.highlights + group.1 - self.base_highlights),
            None => (self.notifs, self.highlights),
        }
    }
}

#[derive(Default)]
struct Tail {
    /// Every event of the room with a stream position above `from` is in `events`.
    from: i64,
    /// Oldest first.
    events: VecDeque<Arc<StoredEvent>>,
}

#[derive(Default)]
struct Room {
    /// The clock at this room's latest `begin` or end of a write.
    epoch: u64,
    writing: usize,
    tail: Option<Tail>,
    /// User -> their `""` row (`None`: no row is stored).
    unread: HashMap<String, Option<UnreadRow>>,
    /// Template -> its cumulative counts in the room now (`push_groups`), where known:
    /// a row that follows a template not here is read from the database.
    groups: HashMap<i64, (i64, i64)>,
    bytes: usize,
}

impl Room {
    /// Drops the tail and counts (the room's clock stays).
    fn clear(&mut self) {
        self.tail = None;
        self.unread = HashMap::new();
        self.groups = HashMap::new();
        self.bytes = ROOM_OVERHEAD;
    }
}

struct Inner {
    /// Moves at every begin and end of a write, and when everything was dropped.
    clock: u64,
    /// The clock when rooms were last forgotten, or a write of every room began or
    /// ended: nothing read before is kept.
    cleared_at: u64,
    /// Writes that may touch any room (a held redaction, whose room is not known).
    writing_all: usize,
    rooms: HashMap<String, Room>,
    bytes: usize,
}

/// See the module comment.
pub(crate) struct Live {
    inner: Mutex<Inner>,
    max_bytes: AtomicUsize,
}

fn event_bytes(e: &StoredEvent) -> usize {
    EVENT_OVERHEAD + e.json.len() + e.event_id.len() + e.room_id.len() + e.sender.len() + e.event_type.len()
}

impl Live {
    pub(crate) fn new(max_bytes: usize) -> Self {
        Live {
            inner: Mutex::new(Inner { clock: 0, cleared_at: 0, writing_all: 0, rooms: HashMap::new(), bytes: 0 }),
            max_bytes: AtomicUsize::new(max_bytes),
        }
    }

    /// Sets the bound (from the configuration, once the services know it).
    pub(crate) fn set_max_bytes(&self, max_bytes: usize) {
        self.max_bytes.store(max_bytes, Ordering::Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A write of `rooms` begins; it ends when the guard drops. Take it before the
    /// write's stream position.
    pub(crate) fn begin(&self, rooms: impl IntoIterator<Item = impl Into<String>>) -> LiveWriting<'_> {
        let mut inner = self.lock();
        inner.forget_rooms_if_too_many();
        let mut held: Vec<String> = Vec::new();
        for room in rooms {
            let room = room.into();
            if held.contains(&room) {
                continue;
            }
            inner.clock += 1;
            let clock = inner.clock;
            if !inner.rooms.contains_key(&room) {
                inner.bytes += ROOM_OVERHEAD;
            }
            let entry =
                inner.rooms.entry(room.clone()).or_insert_with(|| Room { bytes: ROOM_OVERHEAD, ..Room::default() });
            entry.writing += 1;
            entry.epoch = clock;
            held.push(room);
        }
        LiveWriting { live: self, rooms: held, all: false, settled: false }
    }

    /// A write that may touch any room begins (everything kept is dropped, now and when
    /// it ends).
    pub(crate) fn begin_all(&self) -> LiveWriting<'_> {
        let mut inner = self.lock();
        inner.writing_all += 1;
        inner.drop_everything();
        LiveWriting { live: self, rooms: Vec::new(), all: true, settled: false }
    }

    /// The clock to note before reading the database.
    pub(crate) fn note(&self) -> u64 {
        self.lock().clock
    }

    /// Whether what is read of the room now may be kept: no write of it in flight.
    pub(crate) fn may_keep(&self, room: &str) -> bool {
        let inner = self.lock();
        inner.writing_all == 0 && inner.rooms.get(room).is_none_or(|r| r.writing == 0)
    }

    /// The room's events with stream positions in `(after, until]`, newest first, at
    /// most `limit`: `None` unless the tail holds them all.
    pub(crate) fn tail_events(&self, room: &str, after: i64, until: i64, limit: usize) -> Option<Vec<StoredEvent>> {
        let inner = self.lock();
        let entry = inner.readable(room)?;
        let tail = entry.tail.as_ref()?;
        let mut found = Vec::new();
        for e in tail.events.iter().rev() {
            if e.stream_ordering > until {
                continue;
            }
            if e.stream_ordering <= after || found.len() == limit {
                return Some(found);
            }
            found.push(StoredEvent::clone(e));
        }
        (tail.from <= after || found.len() == limit).then_some(found)
    }

    /// Keeps a room's tail read from the database after `noted`: its newest events,
    /// newest first, as many as `TAIL_LEN` asked (fewer: the room has no more).
    pub(crate) fn keep_tail(&self, room: &str, newest_first: Vec<StoredEvent>, noted: u64) {
        let mut inner = self.lock();
        let Some(entry) = inner.keepable(room, noted) else { return };
        let from =
            if newest_first.len() < TAIL_LEN { 0 } else { newest_first.last().map_or(0, |e| e.stream_ordering - 1) };
        let events: VecDeque<Arc<StoredEvent>> = newest_first.into_iter().rev().map(Arc::new).collect();
        let added: usize = events.iter().map(|e| event_bytes(e)).sum();
        let removed = entry.tail.take().map_or(0, |t| t.events.iter().map(|e| event_bytes(e)).sum());
        entry.tail = Some(Tail { from, events });
        entry.bytes = entry.bytes + added - removed;
        inner.bytes = inner.bytes + added - removed;
        self.bound(&mut inner);
    }

    /// A user's counts in `rooms` (notifications, highlights; `None`: no row is
    /// stored) where they are known, and the rooms to read.
    #[allow(clippy::type_complexity)]
    pub(crate) fn unread(&self, user: &str, rooms: &[&str]) -> (Vec<(String, Option<(i64, i64)>)>, Vec<String>) {
        let inner = self.lock();
        let (mut known, mut missing) = (Vec::new(), Vec::new());
        for room in rooms {
            let counts = inner.readable(room).and_then(|r| match r.unread.get(user)? {
                None => Some(None),
                Some(row) => match row.template {
                    None => Some(Some(row.counts((0, 0)))),
                    Some(t) => r.groups.get(&t).map(|g| Some(row.counts(*g))),
                },
            });
            match counts {
                Some(counts) => known.push(((*room).to_owned(), counts)),
                None => missing.push((*room).to_owned()),
            }
        }
        (known, missing)
    }

    /// Keeps a user's row in a room read from the database after `noted`, with the
    /// cumulative counts of its template read with it.
    pub(crate) fn keep_unread(
        &self,
        user: &str,
        room: &str,
        row: Option<UnreadRow>,
        group: Option<(i64, i64)>,
        noted: u64,
    ) {
        let mut inner = self.lock();
        let Some(entry) = inner.keepable(room, noted) else { return };
        let mut added = 0;
        if let (Some(template), Some(group)) = (row.and_then(|r| r.template), group)
            && entry.groups.insert(template, group).is_none()
        {
            added += COUNT_OVERHEAD;
        }
        if entry.unread.insert(user.to_owned(), row).is_none() {
            added += COUNT_OVERHEAD + user.len();
        }
        entry.bytes += added;
        inner.bytes += added;
        self.bound(&mut inner);
    }

    /// Drops tails and counts (never the rooms' clocks) until the whole is under three
    /// quarters of the bound.
    fn bound(&self, inner: &mut Inner) {
        let max = self.max_bytes.load(Ordering::Relaxed);
        if inner.bytes <= max {
            return;
        }
        let target = max / 4 * 3;
        let mut freed = 0;
        for room in inner.rooms.values_mut() {
            if inner.bytes - freed <= target {
                break;
            }
            freed += room.bytes - ROOM_OVERHEAD;
            room.clear();
        }
        inner.bytes -= freed;
        if inner.bytes > max {
            // The rooms' clocks alone pass the bound: forget the idle rooms (and so keep
            // nothing read before).
            inner.rooms.retain(|_, r| r.writing > 0 || r.tail.is_some() || !r.unread.is_empty());
            inner.clock += 1;
            inner.cleared_at = inner.clock;
            inner.bytes = inner.rooms.values().map(|r| r.bytes).sum();
        }
    }

    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

impl Inner {
    /// The room, if it may answer: no write of it (or of every room) in flight.
    fn readable(&self, room: &str) -> Option<&Room> {
        if self.writing_all > 0 {
            return None;
        }
        self.rooms.get(room).filter(|r| r.writing == 0)
    }

    /// The room, if what was read after `noted` may be kept in it: no write of it began
    /// or ended since, and nothing was forgotten.
    fn keepable(&mut self, room: &str, noted: u64) -> Option<&mut Room> {
        if self.writing_all > 0 || self.cleared_at > noted {
            return None;
        }
        if !self.rooms.contains_key(room) {
            self.forget_rooms_if_too_many();
            if self.cleared_at > noted {
                return None;
            }
            self.bytes += ROOM_OVERHEAD;
        }
        let clock = self.clock;
        let entry = self.rooms.entry(room.to_owned()).or_insert_with(|| Room {
            epoch: clock,
            bytes: ROOM_OVERHEAD,
            ..Room::default()
        });
        (entry.writing == 0 && entry.epoch <= noted).then_some(entry)
    }

    fn forget_rooms_if_too_many(&mut self) {
        if self.rooms.len() < MAX_ROOMS {
            return;
        }
        // Rooms being written keep their entries (their writers' guards count on them).
        self.rooms.retain(|_, r| r.writing > 0);
        self.drop_everything();
    }

    /// Drops every tail and count; nothing read before is kept.
    fn drop_everything(&mut self) {
        self.clock += 1;
        self.cleared_at = self.clock;
        self.rooms.values_mut().for_each(Room::clear);
        self.bytes = self.rooms.len() * ROOM_OVERHEAD;
    }

    fn room_mut(&mut self, room: &str) -> Option<&mut Room> {
        self.rooms.get_mut(room)
    }
}

/// A write of some rooms in flight (see `Live::begin`): what it changes in them it
/// applies through the guard before the guard drops. A guard dropped unsettled (the
/// writer failed or was cancelled: whether it committed is not known) drops its rooms'
/// tails and counts.
pub(crate) struct LiveWriting<'a> {
    live: &'a Live,
    rooms: Vec<String>,
    all: bool,
    settled: bool,
}

impl LiveWriting<'_> {
    /// The tails and counts of the rooms are what the database holds (the write's
    /// changes are applied, or it wrote nothing).
    pub(crate) fn settle(mut self) {
        self.settled = true;
    }

    fn with_room(&self, room: &str, change: impl FnOnce(&mut Room) -> isize) {
        debug_assert!(self.all || self.rooms.iter().any(|r| r == room), "a change of a room not begun");
        let mut inner = self.live.lock();
        let Some(entry) = inner.room_mut(room) else { return };
        let delta = change(entry);
        entry.bytes = entry.bytes.saturating_add_signed(delta);
        inner.bytes = inner.bytes.saturating_add_signed(delta);
        self.live.bound(&mut inner);
    }

    /// `event` committed at its stream position: appended to the room's tail (and its
    /// parent, if it relates to one kept there, now has a child). A tail that the event
    /// does not follow is dropped.
    pub(crate) fn append(&self, event: StoredEvent, parent: Option<&str>) {
        let room = event.room_id.clone();
        self.with_room(&room, |r| {
            let Some(tail) = r.tail.as_mut() else { return 0 };
            if tail.events.back().is_some_and(|last| last.stream_ordering >= event.stream_ordering) {
                let freed: usize = tail.events.iter().map(|e| event_bytes(e)).sum();
                r.tail = None;
                return -(freed as isize);
            }
            if let Some(parent) = parent
                && let Some(kept) = tail.events.iter_mut().find(|e| e.event_id == parent)
                && !kept.related
            {
                let mut related = StoredEvent::clone(kept);
                related.related = true;
                *kept = Arc::new(related);
            }
            let mut delta = event_bytes(&event) as isize;
            tail.events.push_back(Arc::new(event));
            while tail.events.len() > TAIL_LEN {
                if let Some(old) = tail.events.pop_front() {
                    tail.from = old.stream_ordering;
                    delta -= event_bytes(&old) as isize;
                }
            }
            delta
        });
    }

    /// Drops the room's tail (its events changed in a way not followed here).
    pub(crate) fn drop_tail(&self, room: &str) {
        self.with_room(room, |r| {
            let freed: usize = r.tail.take().map_or(0, |t| t.events.iter().map(|e| event_bytes(e)).sum());
            -(freed as isize)
        });
    }

    /// Drops the room's kept counts (all users'), or one user's.
    pub(crate) fn drop_unread(&self, room: &str, user: Option<&str>) {
        self.with_room(room, |r| {
            let gone: Vec<String> = match user {
                Some(user) => r.unread.remove_entry(user).map(|(u, _)| u).into_iter().collect(),
                None => r.unread.drain().map(|(u, _)| u).collect(),
            };
            -(gone.iter().map(|u| COUNT_OVERHEAD + u.len()).sum::<usize>() as isize)
        });
    }

    /// An event at stream position `pos` was counted for `users` (with what it adds to
    /// each one's notifications and highlights) as `count_push_actions!` does in the
    /// `""` rows: a row counts it if it counts from before it; a user without a row got
    /// one (dropped here: its values are the database's).
    pub(crate) fn count(&self, room: &str, pos: i64, users: &[(&str, (i64, i64))]) {
        self.with_room(room, |r| {
            let mut freed = 0;
            for (user, (notifs, highlights)) in users {
                match r.unread.get_mut(*user) {
                    Some(Some(row)) if row.after_pos < pos => {
                        row.notifs += notifs;
                        row.highlights += highlights;
                    }
                    Some(Some(_)) | None => {}
                    Some(None) => {
                        r.unread.remove(*user);
                        freed += COUNT_OVERHEAD + user.len();
                    }
                }
            }
            -(freed as isize)
        });
    }
}

impl LiveWriting<'_> {
    /// An event got a row for each of these templates (with whether it highlights):
    /// their cumulative counts moved by one, where known.
    pub(crate) fn count_groups(&self, room: &str, groups: &[(i64, bool)]) {
        self.with_room(room, |r| {
            for (template, highlight) in groups {
                if let Some(counts) = r.groups.get_mut(template) {
                    counts.0 += 1;
                    counts.1 += i64::from(*highlight);
                }
            }
            0
        });
    }
}

impl Drop for LiveWriting<'_> {
    fn drop(&mut self) {
        let mut inner = self.live.lock();
        if self.all {
            inner.writing_all -= 1;
            inner.drop_everything();
            return;
        }
        let mut freed = 0;
        for room in &self.rooms {
            inner.clock += 1;
            let clock = inner.clock;
            if let Some(entry) = inner.rooms.get_mut(room) {
                entry.writing -= 1;
                entry.epoch = clock;
                if !self.settled {
                    freed += entry.bytes - ROOM_OVERHEAD;
                    entry.clear();
                }
            }
        }
        inner.bytes -= freed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(room: &str, pos: i64) -> StoredEvent {
        StoredEvent {
            stream_ordering: pos,
            position: Some(pos),
            event_id: format!("$e{pos}"),
            room_id: room.to_owned(),
            sender: "@a:x".to_owned(),
            event_type: "m.room.message".to_owned(),
            state_key: None,
            depth: pos,
            origin_server_ts: pos,
            state_group: 1,
            json: "{}".to_owned(),
            redacted_by: None,
            txn_device_id: None,
            txn_id: None,
            replaces_state: None,
            rejected_reason: None,
            related: false,
        }
    }

    fn positions(events: &[StoredEvent]) -> Vec<i64> {
        events.iter().map(|e| e.stream_ordering).collect()
    }

    #[test]
    fn a_tail_answers_only_what_it_holds_whole() {
        let live = Live::new(1 << 20);
        let noted = live.note();
        live.keep_tail("!r", (1..=3).rev().map(|p| event("!r", p * 10)).collect(), noted);
        assert_eq!(positions(&live.tail_events("!r", 10, 30, 5).unwrap()), [30, 20]);
        assert_eq!(positions(&live.tail_events("!r", 0, 25, 5).unwrap()), [20, 10], "a short tail is the whole room");
        assert_eq!(positions(&live.tail_events("!r", 0, 30, 1).unwrap()), [30]);
        assert!(live.tail_events("!other", 0, 30, 5).is_none());

        // A full tail knows nothing before its oldest event.
        let noted = live.note();
        live.keep_tail("!f", (1..=TAIL_LEN as i64).rev().map(|p| event("!f", p + 100)).collect(), noted);
        assert!(live.tail_events("!f", 0, 1000, 100).is_none());
        assert_eq!(live.tail_events("!f", 100, 1000, 100).unwrap().len(), TAIL_LEN);
        assert_eq!(live.tail_events("!f", 0, 1000, 3).unwrap().len(), 3);
    }

    #[test]
    fn writers_keep_tails_and_counts_current_and_readers_wait_for_them() {
        let live = Live::new(1 << 20);
        let noted = live.note();
        live.keep_tail("!r", vec![event("!r", 5)], noted);
        let row =
            UnreadRow { after_pos: 5, notifs: 0, highlights: 0, template: None, base_notifs: 0, base_highlights: 0 };
        live.keep_unread("@b:x", "!r", Some(row), None, noted);
        live.keep_unread("@c:x", "!r", None, None, noted);
        // A member of template 9, whose rows had counted 4 (1 highlight) when the row took them in.
        let grouped = UnreadRow { template: Some(9), base_notifs: 4, base_highlights: 1, ..row };
        live.keep_unread("@d:x", "!r", Some(grouped), Some((6, 1)), noted);
        // Template 8's counts were not read with the row: it is read again.
        live.keep_unread("@e:x", "!r", Some(UnreadRow { template: Some(8), ..row }), None, noted);
        assert_eq!(live.unread("@d:x", &["!r"]).0, [("!r".to_owned(), Some((2, 0)))]);
        assert_eq!(live.unread("@e:x", &["!r"]).1, ["!r"]);

        let write = live.begin(["!r"]);
        assert!(live.tail_events("!r", 0, 100, 10).is_none(), "nothing is answered while the room is written");
        assert_eq!(live.unread("@b:x", &["!r"]).1, ["!r"]);
        write.append(event("!r", 7), Some("$e5"));
        write.count("!r", 7, &[("@b:x", (1, 1)), ("@c:x", (1, 0))]);
        write.count_groups("!r", &[(9, true), (8, false)]);
        write.settle();

        let events = live.tail_events("!r", 0, 100, 10).unwrap();
        assert_eq!(positions(&events), [7, 5]);
        assert!(events[1].related, "the parent now has a child");
        let (known, missing) = live.unread("@b:x", &["!r"]);
        assert_eq!(known, [("!r".to_owned(), Some((1, 1)))]);
        assert!(missing.is_empty());
        assert_eq!(live.unread("@d:x", &["!r"]).0, [("!r".to_owned(), Some((3, 1)))], "its template's row counts");
        assert_eq!(live.unread("@e:x", &["!r"]).1, ["!r"], "a template not known stays unknown");
        assert_eq!(live.unread("@c:x", &["!r"]).1, ["!r"], "a row made by the database is read from it");
    }

    #[test]
    fn a_read_overtaken_by_a_write_is_not_kept() {
        let live = Live::new(1 << 20);
        let noted = live.note();
        drop(live.begin(["!r"]));
        live.keep_tail("!r", vec![event("!r", 5)], noted);
        live.keep_unread("@b:x", "!r", None, None, noted);
        assert!(live.tail_events("!r", 0, 100, 10).is_none());
        assert_eq!(live.unread("@b:x", &["!r"]).1, ["!r"]);

        // Another room's write does not stop it.
        let noted = live.note();
        drop(live.begin(["!other"]));
        live.keep_tail("!r", vec![event("!r", 5)], noted);
        assert!(live.tail_events("!r", 0, 100, 10).is_some());

        // A write of every room does.
        let noted = live.note();
        let all = live.begin_all();
        assert!(live.tail_events("!r", 0, 100, 10).is_none());
        drop(all);
        live.keep_tail("!r", vec![event("!r", 5)], noted);
        assert!(live.tail_events("!r", 0, 100, 10).is_none());
    }

    #[test]
    fn an_event_out_of_order_drops_the_tail_and_the_tail_stays_short() {
        let live = Live::new(1 << 20);
        let noted = live.note();
        live.keep_tail("!r", vec![event("!r", 50)], noted);
        let write = live.begin(["!r"]);
        write.append(event("!r", 40), None);
        write.settle();
        assert!(live.tail_events("!r", 0, 100, 10).is_none());

        let noted = live.note();
        live.keep_tail("!r", vec![event("!r", 50)], noted);
        let write = live.begin(["!r"]);
        for p in 51..51 + TAIL_LEN as i64 {
            write.append(event("!r", p), None);
        }
        write.settle();
        assert!(live.tail_events("!r", 0, 1000, 100).is_none(), "the oldest went: the tail no longer reaches 0");
        assert_eq!(live.tail_events("!r", 50, 1000, 100).unwrap().len(), TAIL_LEN);
    }

    #[test]
    fn a_writer_that_did_not_settle_leaves_nothing_kept() {
        let live = Live::new(1 << 20);
        let noted = live.note();
        live.keep_tail("!r", vec![event("!r", 5)], noted);
        live.keep_unread("@b:x", "!r", None, None, noted);
        let write = live.begin(["!r"]);
        write.append(event("!r", 7), None);
        drop(write); // failed after its commit, perhaps
        assert!(live.tail_events("!r", 0, 100, 10).is_none());
        assert_eq!(live.unread("@b:x", &["!r"]).1, ["!r"]);
        assert_eq!(live.bytes(), ROOM_OVERHEAD);
    }

    #[test]
    fn the_bound_holds() {
        let live = Live::new(20_000);
        for i in 0..200 {
            let room = format!("!{i}");
            let noted = live.note();
            live.keep_tail(&room, (1..=5).rev().map(|p| event(&room, p)).collect(), noted);
            assert!(live.bytes() <= 20_000, "{} bytes", live.bytes());
        }
        let kept = (0..200).filter(|i| live.tail_events(&format!("!{i}"), 0, 10, 10).is_some()).count();
        assert!(kept > 0 && kept < 200, "{kept}");
    }
}
