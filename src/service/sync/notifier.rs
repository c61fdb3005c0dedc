//! The notifier wakes waiting `/sync` requests when something for their user
//! happens. It is keyed by user: a room event wakes the room's local members. It sits
//! behind a small trait so that a later backend (PostgreSQL LISTEN/NOTIFY) can carry
//! the same wake-ups between several Convo processes.
//!
//! A wake-up is for a write that has committed, but `/sync` reads only up to the
//! stream's persisted-up-to mark, which a transaction with a lower position still open
//! holds back. So a wake-up waits until the mark covers every write finished when it
//! was asked for: woken earlier, a request would find nothing, wait again, and miss
//! the write until something else woke it.
//!
//! `WaitingSyncs` counts the requests parked here, so that a test can wait until a
//! long-poll is waiting instead of sleeping and hoping.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use ruma::{OwnedUserId, UserId};
use tokio::sync::watch;

use crate::storage::StreamWatch;

pub trait Notifier: Send + Sync {
    /// A receiver that changes whenever something for `user` happens from now on.
    fn subscribe(&self, user: &UserId) -> watch::Receiver<u64>;
    /// Wakes every waiting request of these users, once the stream's mark covers what
    /// has been written so far.
    fn notify_users(&self, users: &[OwnedUserId]);
}

/// The users with a waiting request, each with a watch channel.
type Waiters = Arc<Mutex<HashMap<OwnedUserId, watch::Sender<u64>>>>;

/// The in-process notifier: one watch channel per user with a waiting request.
pub struct LocalNotifier {
    users: Waiters,
    stream: StreamWatch,
}

impl LocalNotifier {
    /// A notifier whose wake-ups wait for `stream`'s mark.
    pub fn new(stream: StreamWatch) -> Self {
        LocalNotifier { users: Arc::default(), stream }
    }
}

fn wake(users: &Waiters, to_wake: &[OwnedUserId]) {
    let mut users = users.lock().unwrap_or_else(|e| e.into_inner());
    // Nobody waits: nothing to look up (a message in a large room names every member).
    if users.is_empty() {
        return;
    }
    for user in to_wake {
        if let Some(sender) = users.get(user) {
            if sender.receiver_count() == 0 {
                users.remove(user);
            } else {
                sender.send_modify(|n| *n += 1);
            }
        }
    }
}

impl Notifier for LocalNotifier {
    fn subscribe(&self, user: &UserId) -> watch::Receiver<u64> {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        users.entry(user.to_owned()).or_insert_with(|| watch::channel(0).0).subscribe()
    }

    fn notify_users(&self, to_wake: &[OwnedUserId]) {
        // The write behind this wake-up has finished, so it is at or below `finished`.
        let finished = self.stream.finished();
        let runtime = tokio::runtime::Handle::try_current();
        match runtime {
            Ok(runtime) if self.stream.mark() < finished => {
                let (users, stream, to_wake) = (Arc::clone(&self.users), self.stream.clone(), to_wake.to_vec());
                runtime.spawn(async move {
                    stream.reached(finished).await;
                    wake(&users, &to_wake);
                });
            }
            _ => wake(&self.users, to_wake),
        }
    }
}

/// The `/sync` requests waiting for news, counted by user.
pub struct WaitingSyncs {
    counts: watch::Sender<HashMap<OwnedUserId, usize>>,
}

impl Default for WaitingSyncs {
    fn default() -> Self {
        WaitingSyncs { counts: watch::channel(HashMap::new()).0 }
    }
}

impl WaitingSyncs {
    /// Counts a request of `user` as waiting until the guard is dropped.
    pub fn enter(&self, user: &UserId) -> WaitingGuard<'_> {
        self.counts.send_modify(|c| *c.entry(user.to_owned()).or_default() += 1);
        WaitingGuard { syncs: self, user: user.to_owned() }
    }

    /// How many requests of `user` are waiting now.
    pub fn count(&self, user: &UserId) -> usize {
        self.counts.borrow().get(user).copied().unwrap_or(0)
    }

    /// Resolves once at least `n` requests of `user` are waiting.
    pub async fn wait_for(&self, user: &UserId, n: usize) {
        let mut rx = self.counts.subscribe();
        let _ = rx.wait_for(|c| c.get(user).copied().unwrap_or(0) >= n).await;
    }
}

/// A waiting request; it stops counting when dropped.
pub struct WaitingGuard<'a> {
    syncs: &'a WaitingSyncs,
    user: OwnedUserId,
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.syncs.counts.send_modify(|c| {
            if let Some(n) = c.get_mut(&self.user) {
                *n -= 1;
                if *n == 0 {
                    c.remove(&self.user);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wakes_only_the_named_users() {
        let notifier = LocalNotifier::new(StreamWatch::default());
        let alice: OwnedUserId = "@alice:x".try_into().unwrap();
        let bob: OwnedUserId = "@bob:x".try_into().unwrap();
        let mut a = notifier.subscribe(&alice);
        let mut b = notifier.subscribe(&bob);
        notifier.notify_users(std::slice::from_ref(&alice));
        assert!(a.has_changed().unwrap());
        assert!(!b.has_changed().unwrap());
        a.changed().await.unwrap();
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), b.changed()).await;
        assert!(waiting.is_err(), "bob is not woken");
    }

    #[tokio::test]
    async fn counts_waiting_requests() {
        let syncs = WaitingSyncs::default();
        let alice: OwnedUserId = "@alice:x".try_into().unwrap();
        let first = syncs.enter(&alice);
        let second = syncs.enter(&alice);
        assert_eq!(syncs.count(&alice), 2);
        tokio::time::timeout(std::time::Duration::from_secs(1), syncs.wait_for(&alice, 2)).await.unwrap();
        drop(first);
        assert_eq!(syncs.count(&alice), 1);
        let more = tokio::time::timeout(std::time::Duration::from_millis(50), syncs.wait_for(&alice, 2)).await;
        assert!(more.is_err(), "only one is waiting now");
        drop(second);
        assert_eq!(syncs.count(&alice), 0);
    }
}
