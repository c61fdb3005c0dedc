//! The notifier wakes waiting `/sync` requests when something for their user
//! happens. It is keyed by user: a room event wakes the room's local members. It sits
//! behind a small trait so that a later backend (PostgreSQL LISTEN/NOTIFY) can carry
//! the same wake-ups between several Convo processes.

use std::{collections::HashMap, sync::Mutex};

use ruma::{OwnedUserId, UserId};
use tokio::sync::watch;

pub trait Notifier: Send + Sync {
    /// A receiver that changes whenever something for `user` happens from now on.
    fn subscribe(&self, user: &UserId) -> watch::Receiver<u64>;
    /// Wakes every waiting request of these users.
    fn notify_users(&self, users: &[OwnedUserId]);
}

/// The in-process notifier: one watch channel per user with a waiting request.
#[derive(Default)]
pub struct LocalNotifier {
    users: Mutex<HashMap<OwnedUserId, watch::Sender<u64>>>,
}

impl Notifier for LocalNotifier {
    fn subscribe(&self, user: &UserId) -> watch::Receiver<u64> {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        users.entry(user.to_owned()).or_insert_with(|| watch::channel(0).0).subscribe()
    }

    fn notify_users(&self, to_wake: &[OwnedUserId]) {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wakes_only_the_named_users() {
        let notifier = LocalNotifier::default();
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
}
