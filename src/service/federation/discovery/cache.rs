//! The resolver's memory: a bounded map from a name to its last outcome and when that
//! outcome expires, with one slot per name so that concurrent lookups of one name wait
//! for the first instead of repeating it. It knows nothing of DNS or HTTP.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// One name's outcome: its value, until when it holds, and how many lookups in a row
/// have failed (for the backoff).
pub(super) struct Entry<V> {
    pub value: V,
    pub expires: Instant,
    pub failures: u32,
}

impl<V> Entry<V> {
    pub fn is_fresh(&self, now: Instant) -> bool {
        now < self.expires
    }
}

/// A name's slot. Whoever holds its lock is the one looking the name up; the others
/// wait for it and then read what it stored.
pub(super) type Slot<V> = tokio::sync::Mutex<Option<Entry<V>>>;

pub(super) struct Cache<K, V> {
    slots: Mutex<HashMap<K, Arc<Slot<V>>>>,
    capacity: usize,
}

impl<K: Clone + Eq + Hash, V> Cache<K, V> {
    pub fn new(capacity: usize) -> Self {
        Self { slots: Mutex::new(HashMap::new()), capacity: capacity.max(1) }
    }

    /// The slot of `key`, made if there is none. When the cache is full, expired
    /// outcomes are dropped first, then the one that expires soonest; a slot in use
    /// is only dropped from the map (its lookup still finishes, uncached).
    pub fn slot(&self, key: &K) -> Arc<Slot<V>> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.get(key) {
            return slot.clone();
        }
        if slots.len() >= self.capacity {
            let now = Instant::now();
            slots.retain(|_, slot| match slot.try_lock() {
                Ok(entry) => entry.as_ref().is_some_and(|e| e.is_fresh(now)),
                Err(_) => true,
            });
            if slots.len() >= self.capacity {
                let victim = slots
                    .iter()
                    .min_by_key(|(_, slot)| match slot.try_lock() {
                        Ok(entry) => entry.as_ref().map_or(now, |e| e.expires),
                        Err(_) => now + Duration::from_secs(u32::MAX.into()),
                    })
                    .map(|(k, _)| k.clone());
                if let Some(victim) = victim {
                    slots.remove(&victim);
                }
            }
        }
        let slot = Arc::new(Slot::new(None));
        slots.insert(key.clone(), slot.clone());
        slot
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.slots.lock().unwrap().len()
    }

    /// Makes every stored outcome stale, as if its time had passed (tests).
    #[cfg(test)]
    pub fn expire_all(&self) {
        let now = Instant::now();
        for slot in self.slots.lock().unwrap().values() {
            if let Some(entry) = slot.try_lock().unwrap().as_mut() {
                entry.expires = now;
            }
        }
    }
}

/// How long a name that failed `failures` times in a row (at least once) is not
/// looked up again: `first`, doubled with each further failure, at most `cap`.
pub(super) fn backoff(failures: u32, first: Duration, cap: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(20);
    first.saturating_mul(1 << doublings).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let (first, cap) = (Duration::from_secs(30), Duration::from_secs(3600));
        let steps: Vec<u64> = (1..=10).map(|n| backoff(n, first, cap).as_secs()).collect();
        assert_eq!(steps, [30, 60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]);
        assert_eq!(backoff(u32::MAX, first, cap), cap);
    }

    #[tokio::test]
    async fn a_full_cache_drops_expired_then_soonest_expiring_entries() {
        let cache: Cache<u32, ()> = Cache::new(3);
        let now = Instant::now();
        for (key, secs) in [(1, 100), (2, 10), (3, 1000)] {
            *cache.slot(&key).lock().await =
                Some(Entry { value: (), expires: now + Duration::from_secs(secs), failures: 0 });
        }
        // Full: 2 expires soonest and goes.
        cache.slot(&4);
        assert_eq!(cache.len(), 3);
        assert!(cache.slots.lock().unwrap().contains_key(&1));
        assert!(!cache.slots.lock().unwrap().contains_key(&2));
        // Expired and empty slots go first, all at once.
        cache.expire_all();
        cache.slot(&5);
        assert_eq!(cache.len(), 1);
        // The same key gives the same slot.
        assert!(Arc::ptr_eq(&cache.slot(&5), &cache.slot(&5)));
    }
}
