//! `ByteCache`: the one in-memory cache type of the services, bounded in (estimated)
//! bytes, with the ceiling set by `[caches] memory_mb` (`CacheBudget` splits it). It owns
//! only eviction and the bookkeeping of bytes; what an entry costs is the caller's
//! estimate (`weigh`), and what is cached is the caller's business.
//!
//! Two generations, as a cheap stand-in for an LRU: entries are inserted into the
//! current one; when it would pass half the bound it becomes the previous one and the
//! old previous one is dropped. A hit in the previous generation moves the entry back
//! into the current one, so what is used survives and what is not goes within two
//! turns. Both halves stay under half the bound each, so the whole stays under it; an
//! entry heavier than half the bound is not kept at all.
//!
//! Every change (`remove`, `update`, `invalidate`) bumps a counter under the lock: a
//! value read from the database is kept only if nothing changed since the caller's
//! `stamp()` taken before the read (`insert_at`), so a read that raced a change can never
//! put a stale value in the cache.

use std::{
    borrow::Borrow,
    collections::HashMap,
    hash::Hash,
    sync::{Mutex, MutexGuard},
};

use crate::config::Caches;

/// What one map entry costs beyond its key and value (hash table slot, control bytes,
/// the allocator's headers), roughly.
pub const ENTRY_OVERHEAD: usize = 48;

/// A cache bounded in estimated bytes, with two generations (see the module comment).
pub struct ByteCache<K, V> {
    inner: Mutex<Generations<K, V>>,
    max_bytes: usize,
    weigh: fn(&K, &V) -> usize,
}

struct Generations<K, V> {
    current: HashMap<K, (V, usize)>,
    previous: HashMap<K, (V, usize)>,
    current_bytes: usize,
    previous_bytes: usize,
    /// Bumped on every change (see the module comment).
    changes: u64,
}

impl<K, V> Generations<K, V> {
    fn rotate(&mut self) {
        self.previous = std::mem::take(&mut self.current);
        self.previous_bytes = std::mem::take(&mut self.current_bytes);
    }
}

impl<K: Eq + Hash, V: Clone> ByteCache<K, V> {
    /// A cache of at most `max_bytes`, each entry weighing `weigh(key, value)` (an estimate
    /// of its heap and map bytes).
    pub fn new(max_bytes: usize, weigh: fn(&K, &V) -> usize) -> Self {
        let inner = Generations {
            current: HashMap::new(),
            previous: HashMap::new(),
            current_bytes: 0,
            previous_bytes: 0,
            changes: 0,
        };
        ByteCache { inner: Mutex::new(inner), max_bytes, weigh }
    }

    fn lock(&self) -> MutexGuard<'_, Generations<K, V>> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn half(&self) -> usize {
        self.max_bytes / 2
    }

    /// The cached value of `key`, if any.
    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.find(&mut self.lock(), key)
    }

    /// The values of `keys` found in the cache (the others are `None`), under one lock.
    pub fn get_many<'k, Q>(&self, keys: impl IntoIterator<Item = &'k Q>) -> Vec<Option<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized + 'k,
    {
        let mut g = self.lock();
        keys.into_iter().map(|key| self.find(&mut g, key)).collect()
    }

    /// A hit in the previous generation moves back into the current one.
    fn find<Q>(&self, g: &mut Generations<K, V>, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some((value, _)) = g.current.get(key) {
            return Some(value.clone());
        }
        let (key, (value, size)) = g.previous.remove_entry(key)?;
        g.previous_bytes -= size;
        if g.current_bytes + size > self.half() {
            g.rotate();
        }
        g.current_bytes += size;
        g.current.insert(key, (value.clone(), size));
        Some(value)
    }

    /// The counter of changes, to take before reading what `insert_at` will keep.
    pub fn stamp(&self) -> u64 {
        self.lock().changes
    }

    /// Keeps `value`, unless something changed since `stamp` (it may be stale then).
    pub fn insert_at(&self, stamp: u64, key: K, value: V) {
        let mut g = self.lock();
        if g.changes == stamp {
            self.put(&mut g, key, value);
        }
    }

    /// Keeps `value` (a value that is right whatever happened before, such as one made
    /// from immutable data).
    pub fn insert(&self, key: K, value: V) {
        let mut g = self.lock();
        self.put(&mut g, key, value);
    }

    /// The cached value of `key`, or `make()` kept and answered (under one lock: two
    /// callers get the same value).
    pub fn get_or_insert_with(&self, key: K, make: impl FnOnce() -> V) -> V {
        let mut g = self.lock();
        if let Some(value) = self.find(&mut g, &key) {
            return value;
        }
        let value = make();
        self.put(&mut g, key, value.clone());
        value
    }

    /// Keeps each `(key, value)` under one lock.
    pub fn insert_many(&self, entries: impl IntoIterator<Item = (K, V)>) {
        let mut g = self.lock();
        for (key, value) in entries {
            self.put(&mut g, key, value);
        }
    }

    fn put(&self, g: &mut Generations<K, V>, key: K, value: V) {
        Self::take(g, &key);
        let size = (self.weigh)(&key, &value);
        if size > self.half() {
            return;
        }
        if g.current_bytes + size > self.half() {
            g.rotate();
        }
        g.current_bytes += size;
        g.current.insert(key, (value, size));
    }

    /// Takes `key` out of both generations.
    fn take<Q>(g: &mut Generations<K, V>, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut found = None;
        if let Some((value, size)) = g.current.remove(key) {
            g.current_bytes -= size;
            found = Some(value);
        }
        if let Some((value, size)) = g.previous.remove(key) {
            g.previous_bytes -= size;
            found = found.or(Some(value));
        }
        found
    }

    /// Drops `key` (a change: see `stamp`).
    pub fn remove<Q>(&self, key: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut g = self.lock();
        g.changes += 1;
        Self::take(&mut g, key);
    }

    /// Changes the value of `key` in place when it is cached (a change either way: see
    /// `stamp`). The entry is weighed again; if it no longer fits its half, it is dropped.
    pub fn update<Q>(&self, key: &Q, change: impl FnOnce(&mut V))
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut g = self.lock();
        let g = &mut *g;
        g.changes += 1;
        let half = self.half();
        for (map, bytes) in [(&mut g.current, &mut g.current_bytes), (&mut g.previous, &mut g.previous_bytes)] {
            if let Some((stored_key, (mut value, size))) = map.remove_entry(key) {
                *bytes -= size;
                change(&mut value);
                let size = (self.weigh)(&stored_key, &value);
                if *bytes + size <= half {
                    *bytes += size;
                    map.insert(stored_key, (value, size));
                }
                return;
            }
        }
    }

    /// Counts a change without touching any entry (what `stamp` guards against happened
    /// elsewhere, such as a change to an entry that is not cached by this key).
    pub fn invalidate(&self) {
        self.lock().changes += 1;
    }

    /// Estimated bytes held.
    pub fn bytes(&self) -> usize {
        let g = self.lock();
        g.current_bytes + g.previous_bytes
    }

    /// The bound, in estimated bytes.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        let g = self.lock();
        g.current.len() + g.previous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How `[caches] memory_mb` is shared among the caches, in percent. They add up to 100.
pub mod shares {
    /// `rooms/format.rs`: the client form of recently served events.
    pub const CLIENT_FORMS: u64 = 35;
    /// `storage/live.rs`: each room's newest events and its members' unread counts (a
    /// woken `/sync` reads them from memory).
    pub const LIVE_TAILS: u64 = 10;
    /// `rooms/visibility.rs`: membership and history visibility in each state group,
    /// by user (paging history).
    pub const GROUP_VISIBILITY: u64 = 5;
    /// `notifications.rs`: push rulesets of recent recipients of events.
    pub const PUSH_RULESETS: u64 = 10;
    /// `notifications.rs`: the distinct ruleset templates (the parsed rules, shared by
    /// the users whose rules are equal but for their ids).
    pub const PUSH_TEMPLATES: u64 = 15;
    /// `notifications.rs`: each room's joined count and local members' display names.
    pub const PUSH_MEMBERS: u64 = 15;
    /// `rooms/mod.rs`: each room's joined local members.
    pub const ROOM_MEMBERS: u64 = 10;
}

/// The byte bounds of the caches, from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct CacheBudget {
    total_bytes: u64,
}

impl CacheBudget {
    pub fn new(config: &Caches) -> Self {
        let bytes = (config.memory_mb.max(0.0) * 1_048_576.0).min(u64::MAX as f64 / 2.0);
        CacheBudget { total_bytes: bytes as u64 }
    }

    /// The bound of a cache with `share` percent of the total.
    pub fn bytes(&self, share: u64) -> usize {
        usize::try_from(self.total_bytes / 100 * share + self.total_bytes % 100 * share / 100).unwrap_or(usize::MAX)
    }
}

/// Bytes a string's heap part takes, roughly (the allocator rounds up to 16).
pub fn heap_str(s: &str) -> usize {
    if s.is_empty() { 0 } else { s.len().next_multiple_of(16) + 16 }
}

/// Live heap bytes of the unit tests' process, to check the caches' estimates against
/// what their entries really take. nextest runs each test in its own process; a test
/// that measures does it on one thread, between two readings.
#[cfg(test)]
pub(crate) mod heap {
    use std::{
        alloc::{GlobalAlloc, Layout, System},
        cell::Cell,
    };

    struct Counting;

    thread_local! {
        /// Bytes live on this thread's account: other threads' allocations (the test
        /// harness, runtimes of other tests) never move a reading taken here.
        static LIVE: Cell<isize> = const { Cell::new(0) };
    }

    fn count(delta: isize) {
        // `try_with` fails only while the thread is being torn down: not counted then.
        let _ = LIVE.try_with(|live| live.set(live.get() + delta));
    }

    // SAFETY: every call goes to the system allocator unchanged; only the sizes are
    // counted, in a const-initialised thread local that never allocates.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            count(layout.size() as isize);
            unsafe { System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            count(-(layout.size() as isize));
            unsafe { System.dealloc(ptr, layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            count(new_size as isize - layout.size() as isize);
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    /// The heap bytes that `make`'s result holds (it is kept until the second reading),
    /// as allocated on the calling thread.
    pub fn bytes_of<T>(make: impl FnOnce() -> T) -> usize {
        let before = LIVE.with(Cell::get);
        let value = make();
        let after = LIVE.with(Cell::get);
        drop(value);
        (after - before).max(0) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::ptr_arg)] // the signature `ByteCache::new` takes
    fn weigh(key: &String, value: &Vec<u8>) -> usize {
        key.len() + value.len()
    }

    #[test]
    fn stays_under_its_bound_and_keeps_what_is_used() {
        let cache: ByteCache<String, Vec<u8>> = ByteCache::new(1000, weigh);
        cache.insert("hot".to_owned(), vec![0; 47]);
        for i in 0..1000 {
            cache.insert(format!("k{i:04}"), vec![i as u8; 45]);
            assert!(cache.bytes() <= 1000, "{} bytes after {i}", cache.bytes());
            // Used at every step: never evicted.
            assert_eq!(cache.get("hot").map(|v| v.len()), Some(47));
        }
        assert!(cache.len() < 25);
        // The newest entries are there, the oldest went.
        assert_eq!(cache.get("k0999"), Some(vec![(999 % 256) as u8; 45]));
        assert_eq!(cache.get("k0000"), None);
    }

    #[test]
    fn too_heavy_entries_are_not_kept() {
        let cache: ByteCache<String, Vec<u8>> = ByteCache::new(100, weigh);
        cache.insert("a".to_owned(), vec![0; 60]);
        assert_eq!(cache.get("a"), None);
        assert_eq!(cache.bytes(), 0);
        let off: ByteCache<String, Vec<u8>> = ByteCache::new(0, weigh);
        off.insert("a".to_owned(), Vec::new());
        assert!(off.is_empty());
    }

    #[test]
    fn a_read_that_raced_a_change_is_not_kept() {
        let cache: ByteCache<String, Vec<u8>> = ByteCache::new(1000, weigh);
        let stamp = cache.stamp();
        cache.remove("a");
        cache.insert_at(stamp, "a".to_owned(), vec![1]);
        assert_eq!(cache.get("a"), None);
        let stamp = cache.stamp();
        cache.insert_at(stamp, "a".to_owned(), vec![2]);
        assert_eq!(cache.get("a"), Some(vec![2]));
        let stamp = cache.stamp();
        cache.update("b", |v| v.push(1));
        cache.insert_at(stamp, "b".to_owned(), vec![3]);
        assert_eq!(cache.get("b"), None);
    }

    #[test]
    fn updates_in_place_in_either_generation_and_reweigh() {
        let cache: ByteCache<String, Vec<u8>> = ByteCache::new(100, weigh);
        cache.insert("a".to_owned(), vec![1; 10]);
        cache.insert("b".to_owned(), vec![2; 39]);
        // "a" is in the previous generation now.
        cache.update("a", |v| v.push(3));
        assert_eq!(cache.get("a").map(|v| v.len()), Some(11));
        assert_eq!(cache.bytes(), 12 + 40);
        // Growing past its half drops it.
        cache.update("a", |v| v.extend([0; 60]));
        assert_eq!(cache.get("a"), None);
        assert_eq!(cache.bytes(), 40);
        cache.update("missing", |v| v.push(1));
        assert_eq!(cache.get("missing"), None);
    }

    #[test]
    fn shares_add_up_and_split_the_ceiling() {
        use shares::*;
        assert_eq!(
            CLIENT_FORMS + LIVE_TAILS + GROUP_VISIBILITY + PUSH_RULESETS + PUSH_TEMPLATES + PUSH_MEMBERS + ROOM_MEMBERS,
            100
        );
        let budget = CacheBudget::new(&Caches { memory_mb: 64.0 });
        assert_eq!(budget.bytes(50), 32 << 20);
        assert_eq!(budget.bytes(100), 64 << 20);
        assert_eq!(CacheBudget::new(&Caches { memory_mb: 0.0 }).bytes(50), 0);
    }
}
