//! Read caches of the store: answers to hot reads that change rarely (an access token's
//! session, a user's memberships, a device's key counts, what decides which events of
//! a room a user may see), kept in memory so that a request or a woken `/sync` does not
//! ask the database for them again.
//!
//! Correctness rests on an epoch and a count of writes in flight per cache. Every
//! writer of what a cache holds announces itself before the write (`begin`: the epoch
//! moves, the cache empties) and again when it ends, committed or not (the guard's
//! drop: the epoch moves, the cache empties). While a write is in flight the cache
//! answers nothing and keeps nothing. A reader notes the epoch before it reads the
//! database and keeps what it read only if the epoch has not moved since. So a cached
//! answer never misses a write that has committed: a reader that reads a stream's head
//! and then finds an answer knows that every write covered by that head is in it.
//!
//! Memory is bounded in entries: past its bound a cache starts over. A cache may also
//! have a time to live, for what another process can change in the database (the
//! `convo admin` commands reset passwords, which ends sessions).

use std::{
    borrow::Borrow,
    collections::HashMap,
    hash::Hash,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

struct Inner<K, V> {
    epoch: u64,
    writing: usize,
    entries: HashMap<K, (V, Instant)>,
}

/// One read cache (see the module comment).
pub(crate) struct ReadCache<K, V> {
    inner: Mutex<Inner<K, V>>,
    max_entries: usize,
    /// How long an entry answers (`None`: until a write).
    ttl: Option<Duration>,
}

impl<K: Eq + Hash, V: Clone> ReadCache<K, V> {
    pub(crate) fn new(max_entries: usize, ttl: Option<Duration>) -> Self {
        ReadCache { inner: Mutex::new(Inner { epoch: 0, writing: 0, entries: HashMap::new() }), max_entries, ttl }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<K, V>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The epoch to note before reading the database.
    pub(crate) fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    pub(crate) fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let inner = self.lock();
        if inner.writing > 0 {
            return None;
        }
        let (value, kept) = inner.entries.get(key)?;
        if self.ttl.is_some_and(|ttl| kept.elapsed() >= ttl) {
            return None;
        }
        Some(value.clone())
    }

    /// The cached answer for `key`, or else what `read` reads, kept unless a write began
    /// or ended while it read (`keep`).
    pub(crate) async fn get_or_read<E, Fut>(&self, key: K, read: impl FnOnce() -> Fut) -> Result<V, E>
    where
        Fut: std::future::Future<Output = Result<V, E>>,
    {
        if let Some(value) = self.get(&key) {
            return Ok(value);
        }
        let epoch = self.epoch();
        let value = read().await?;
        self.keep(key, value.clone(), epoch);
        Ok(value)
    }

    /// Keeps `value`, read from the database after the epoch was `epoch`, unless a
    /// write began or ended since.
    pub(crate) fn keep(&self, key: K, value: V, epoch: u64) {
        let mut inner = self.lock();
        if inner.epoch != epoch || inner.writing > 0 {
            return;
        }
        if inner.entries.len() >= self.max_entries {
            inner.entries.clear();
        }
        inner.entries.insert(key, (value, Instant::now()));
    }

    /// Changes a kept entry in place (a change that cannot make it wrong otherwise, such
    /// as a time it carries); nothing when the entry is not kept or a write is in
    /// flight.
    pub(crate) fn update<Q>(&self, key: &Q, change: impl FnOnce(&mut V))
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut inner = self.lock();
        if inner.writing > 0 {
            return;
        }
        if let Some((value, _)) = inner.entries.get_mut(key) {
            change(value);
        }
    }

    /// A write of what the cache holds begins; it ends when the guard drops.
    pub(crate) fn begin(&self) -> Writing<'_, K, V> {
        let mut inner = self.lock();
        inner.epoch += 1;
        inner.writing += 1;
        inner.entries.clear();
        Writing(self)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

/// A write in flight (see `ReadCache::begin`).
pub(crate) struct Writing<'a, K: Eq + Hash, V: Clone>(&'a ReadCache<K, V>);

impl<K: Eq + Hash, V: Clone> Drop for Writing<'_, K, V> {
    fn drop(&mut self) {
        let mut inner = self.0.lock();
        inner.epoch += 1;
        inner.writing -= 1;
        inner.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::ReadCache;

    #[test]
    fn a_read_overtaken_by_a_write_is_not_kept() {
        let cache: ReadCache<String, i64> = ReadCache::new(10, None);
        let before = cache.epoch();
        drop(cache.begin()); // a write began and ended while the read ran
        cache.keep("a".into(), 1, before);
        assert_eq!(cache.get("a"), None);
        let now = cache.epoch();
        cache.keep("a".into(), 2, now);
        assert_eq!(cache.get("a"), Some(2));
        let write = cache.begin();
        assert_eq!(cache.get("a"), None, "a write empties the cache");
        let during = cache.epoch();
        cache.keep("a".into(), 3, during);
        assert_eq!(cache.get("a"), None, "nothing is kept or answered while a write is in flight");
        drop(write);
        cache.keep("a".into(), 3, during);
        assert_eq!(cache.get("a"), None, "a read begun during a write is not kept after it");
    }

    #[test]
    fn an_entry_outlives_its_time_to_live_unanswered() {
        let cache: ReadCache<u32, u32> = ReadCache::new(3, Some(std::time::Duration::ZERO));
        let epoch = cache.epoch();
        cache.keep(1, 1, epoch);
        assert_eq!(cache.get(&1), None);
    }

    #[test]
    fn the_bound_holds() {
        let cache: ReadCache<u32, u32> = ReadCache::new(3, None);
        for i in 0..10 {
            let epoch = cache.epoch();
            cache.keep(i, i, epoch);
            assert!(cache.len() <= 3);
            assert_eq!(cache.get(&i), Some(i));
        }
    }
}
