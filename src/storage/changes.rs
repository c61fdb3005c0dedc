//! The change index: for each stream a `/sync` reads, and each key of it (a room, a
//! user), the latest stream position at which something changed, kept in memory so
//! that a woken sync skips the queries of streams that did not move past its `since`.
//!
//! Writers record a change right after they take its position, before their
//! transaction commits: the mark cannot pass the position before the record is in, so
//! a sync whose `head` covers a write always sees its record. A record whose
//! transaction then fails is a harmless "may have changed".
//!
//! `take_positions` records an `Any` change (every stream may have moved) unless the
//! writer says what it writes (`take_positions_for`): a writer nobody classified costs
//! reads, never a lost message.
//!
//! Memory is bounded: past `MAX_KEYS` keys the index forgets everything and raises its
//! floor to the highest position it had recorded. A `since` below the floor (a token
//! from before the start, or from before the index forgot) always reads the database.

use std::{
    collections::HashMap,
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
};

/// Keys remembered before the index forgets them all.
const MAX_KEYS: usize = 100_000;

/// A stream of `/sync`, as the index keys it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Something the index does not classify: every stream may have moved.
    Any,
    /// Events of a room (key: room id).
    Room,
    /// Account data, global and per room (key: user id).
    AccountData,
    /// Read receipts (key: room id).
    Receipts,
    /// A room's memberships (key: room id): a member event, or a state change that may
    /// change members; what the room summary (member counts, heroes) depends on.
    RoomMembers,
    /// To-device messages (key: recipient user id).
    ToDevice,
    /// Device-list changes of anyone (one key, "").
    DeviceLists,
    /// Presence of anyone (one key, "").
    Presence,
    /// One-time key claims (key: user id).
    KeyClaims,
    /// Not a stream: the `since` up to which a device's to-device messages were last
    /// deleted (key: `"{user} {device}"`), noted by `/sync`.
    ToDeviceAcked,
}

/// A key's changes as the index holds them (`ChangeIndex::stamp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    floor: i64,
    last: Option<i64>,
    any: Option<i64>,
}

impl Stamp {
    /// Whether every change the stamp names lies at or below `head`: committed, since
    /// changes are recorded before their commit and the mark passes them after it.
    pub fn covered_by(&self, head: i64) -> bool {
        self.last.is_none_or(|p| p <= head) && self.any.is_none_or(|p| p <= head)
    }
}

/// One change a writer is about to make.
#[derive(Clone, Debug)]
pub struct Change {
    pub kind: Kind,
    pub key: String,
}

impl Change {
    pub fn new(kind: Kind, key: impl Into<String>) -> Self {
        Change { kind, key: key.into() }
    }
}

#[derive(Debug)]
struct Inner {
    last: HashMap<(Kind, String), i64>,
    /// Nothing is known of positions up to here.
    floor: i64,
    /// The highest position recorded.
    top: i64,
}

/// See the module comment.
#[derive(Debug)]
pub struct ChangeIndex {
    inner: Mutex<Inner>,
    /// Answers "may have changed" to everything (tests measure the cost without it).
    off: AtomicBool,
}

impl ChangeIndex {
    /// An index that knows nothing at or below `floor` (the mark at start).
    pub(crate) fn new(floor: i64) -> Self {
        ChangeIndex {
            inner: Mutex::new(Inner { last: HashMap::new(), floor, top: floor }),
            off: AtomicBool::new(false),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `changes` at `position` (before the write commits).
    pub(crate) fn record(&self, changes: &[Change], position: i64) {
        let mut inner = self.inner();
        if inner.last.len() + changes.len() > MAX_KEYS {
            // Forget everything: what was forgotten is at or below the floor.
            inner.floor = inner.top;
            inner.last.clear();
        }
        inner.top = inner.top.max(position);
        for change in changes {
            let last = inner.last.entry((change.kind, change.key.clone())).or_insert(position);
            *last = (*last).max(position);
        }
    }

    /// Whether nothing of `kind` changed for any of `keys` after `since`, as far as
    /// writes covered by the caller's `head` go (read `head` before asking). `false`
    /// means "may have changed": read the database.
    pub fn unchanged<'a>(&self, kind: Kind, keys: impl IntoIterator<Item = &'a str>, since: i64) -> bool {
        if self.off.load(Ordering::Relaxed) {
            return false;
        }
        let inner = self.inner();
        let after = |kind: Kind, key: &str| inner.last.get(&(kind, key.to_owned())).is_some_and(|p| *p > since);
        since >= inner.floor && !after(Kind::Any, "") && !keys.into_iter().any(|key| after(kind, key))
    }

    /// Whether the index can tell what changed after `since` (its floor is below it and
    /// no unclassified write came after it): otherwise every answer is "may have changed".
    pub fn knows(&self, since: i64) -> bool {
        if self.off.load(Ordering::Relaxed) {
            return false;
        }
        let inner = self.inner();
        since >= inner.floor && inner.last.get(&(Kind::Any, String::new())).is_none_or(|p| *p <= since)
    }

    /// Notes `position` for one key (kept if higher than what is noted).
    pub fn note(&self, kind: Kind, key: &str, position: i64) {
        self.record(&[Change::new(kind, key)], position);
    }

    /// What is noted for one key, if the index still remembers it.
    pub fn noted(&self, kind: Kind, key: &str) -> Option<i64> {
        if self.off.load(Ordering::Relaxed) {
            return None;
        }
        self.inner().last.get(&(kind, key.to_owned())).copied()
    }

    /// What the index holds of one key's changes: equal stamps mean that nothing of
    /// `kind` was recorded for `key` between them (nor an unclassified change, nor a
    /// forgetting). `None` when the index is off.
    pub fn stamp(&self, kind: Kind, key: &str) -> Option<Stamp> {
        if self.off.load(Ordering::Relaxed) {
            return None;
        }
        let inner = self.inner();
        let last = |kind: Kind, key: &str| inner.last.get(&(kind, key.to_owned())).copied();
        Some(Stamp { floor: inner.floor, last: last(kind, key), any: last(Kind::Any, "") })
    }

    /// Turns the index's answers off (every stream is read) or on again: tests compare
    /// a sync's cost with and without it.
    #[doc(hidden)]
    pub fn set_off(&self, off: bool) {
        self.off.store(off, Ordering::Relaxed);
    }

    /// The floor (tests).
    #[doc(hidden)]
    pub fn floor(&self) -> i64 {
        self.inner().floor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_unchanged_only_for_what_it_knows() {
        let index = ChangeIndex::new(10);
        assert!(!index.unchanged(Kind::Room, ["!a:x"], 9), "below the floor: unknown");
        assert!(index.unchanged(Kind::Room, ["!a:x"], 10));
        index.record(&[Change::new(Kind::Room, "!a:x")], 12);
        assert!(!index.unchanged(Kind::Room, ["!a:x"], 11));
        assert!(index.unchanged(Kind::Room, ["!a:x"], 12));
        assert!(index.unchanged(Kind::Room, ["!b:x"], 11), "another room");
        assert!(index.unchanged(Kind::Receipts, ["!a:x"], 11), "another stream");
        index.record(&[Change::new(Kind::Any, "")], 13);
        assert!(!index.unchanged(Kind::Receipts, ["!a:x"], 12), "an unclassified write moves every stream");
        assert!(index.unchanged(Kind::Receipts, ["!a:x"], 13));
    }

    #[test]
    fn forgetting_raises_the_floor() {
        let index = ChangeIndex::new(0);
        for i in 0..MAX_KEYS {
            index.record(&[Change::new(Kind::Room, format!("!{i}:x"))], i as i64 + 1);
        }
        assert_eq!(index.floor(), 0);
        index.record(&[Change::new(Kind::Room, "!new:x")], MAX_KEYS as i64 + 1);
        assert_eq!(index.floor(), MAX_KEYS as i64);
        assert!(!index.unchanged(Kind::Room, ["!0:x"], 5), "forgotten: may have changed");
        assert!(index.unchanged(Kind::Room, ["!0:x"], MAX_KEYS as i64));
        assert!(!index.unchanged(Kind::Room, ["!new:x"], MAX_KEYS as i64));
    }
}
