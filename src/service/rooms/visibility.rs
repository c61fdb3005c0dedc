//! History visibility: which events of a room a user may see, from the user's own
//! membership events and the room's `m.room.history_visibility` changes, read in one
//! query per request. `visible_ranges` turns them into the stretches of the stream the
//! user may read, so that paging skips what they may not see without reading it.
//! Where the stream and the DAG disagree (backfilled history, whose positions come
//! before everything; a remote room's visibility known only from its join's state),
//! `visible_by_state` also applies the rules to each event's own state: its state
//! group's history visibility and the user's membership in it.

use ruma::{RoomId, UserId};
use serde_json::Value as JsonValue;

use crate::{error::Result, service::Services, storage::StoredEvent};

/// What decides which events of a room a user may see.
pub struct Visibility {
    /// (stream position, membership) of the user's member events in the room, in order.
    pub memberships: Vec<(i64, String)>,
    /// (stream position, history visibility) of the room's visibility changes, in order.
    changes: Vec<(i64, String)>,
}

/// A string field of an event's content (from its JSON), empty when absent.
pub(crate) fn content_field(json: &str, field: &str) -> String {
    serde_json::from_str::<JsonValue>(json)
        .ok()
        .and_then(|v| v["content"][field].as_str().map(str::to_owned))
        .unwrap_or_default()
}

impl Visibility {
    /// The user's membership just before stream position `pos`.
    fn membership_before(&self, pos: i64) -> &str {
        self.memberships.iter().rev().find(|(p, _)| *p < pos).map_or("leave", |(_, m)| m.as_str())
    }

    /// The room's history visibility just before `pos` (`shared` when never set).
    fn history_before(&self, pos: i64) -> &str {
        self.changes.iter().rev().find(|(p, _)| *p < pos).map_or("shared", |(_, h)| h.as_str())
    }

    /// Whether an event at stream position `pos` (not the user's own member event) is
    /// visible: the spec's rules, with the room's state just before the event.
    fn visible_at(&self, pos: i64) -> bool {
        let membership = self.membership_before(pos);
        if membership == "join" {
            return true;
        }
        match self.history_before(pos) {
            "world_readable" => true,
            "invited" => membership == "invite",
            "joined" => false,
            // `shared` and anything unknown: visible if the user joined at any point after.
            _ => self.memberships.iter().any(|(p, m)| *p >= pos && m == "join"),
        }
    }

    /// Whether the user was joined at or after stream position `pos` (for `shared`).
    fn joined_since(&self, pos: i64) -> bool {
        self.memberships.iter().any(|(p, m)| *p >= pos && m == "join")
    }

    /// Whether `user` may see `event`.
    pub fn may_see(&self, user: &UserId, event: &StoredEvent) -> bool {
        // One's own membership events are always visible.
        (event.event_type == "m.room.member" && event.state_key.as_deref() == Some(user.as_str()))
            || self.visible_at(event.stream_ordering)
    }

    /// The stretches `(after, up_to]` of the stream in which the user may see events,
    /// oldest first. Visibility only changes at the user's member events and at the
    /// room's visibility changes, so between two of those it is constant; the user's
    /// own member events are visible whatever the rest.
    pub fn visible_ranges(&self) -> Vec<(i64, i64)> {
        let mut breaks: Vec<i64> = self.memberships.iter().chain(&self.changes).map(|(p, _)| *p).collect();
        breaks.sort_unstable();
        breaks.dedup();
        let mut ranges: Vec<(i64, i64)> = Vec::new();
        let mut push = |after: i64, up_to: i64| match ranges.last_mut() {
            Some(last) if last.1 >= after => last.1 = last.1.max(up_to),
            _ => ranges.push((after, up_to)),
        };
        let mut after = i64::MIN;
        for &point in breaks.iter().chain(std::iter::once(&i64::MAX)) {
            // Every position in (after, point] sees the same memberships and changes.
            if self.visible_at(point) {
                push(after, point);
            } else if self.memberships.iter().any(|(p, _)| *p == point) {
                push(point - 1, point);
            }
            after = point;
        }
        ranges
    }
}

impl Services {
    /// Loads what decides which events of a room `user` may see, in one query.
    pub async fn visibility_for(&self, room_id: &RoomId, user: &UserId) -> Result<Visibility> {
        let (mut memberships, mut changes) = (Vec::new(), Vec::new());
        for (pos, event_type, json) in self.store.get_visibility_events(room_id.as_str(), user.as_str()).await?.iter() {
            if event_type == "m.room.member" {
                memberships.push((*pos, content_field(json, "membership")));
            } else {
                changes.push((*pos, content_field(json, "history_visibility")));
            }
        }
        Ok(Visibility { memberships, changes })
    }
}

impl Services {
    /// The ids of those of `events` (all of one room) that `user` may see by the state
    /// at each: the history visibility and the user's membership in the event's state
    /// group (after it; one's own member events are always visible). One query per
    /// distinct state group and one for the events those name.
    pub async fn visible_by_state(
        &self,
        user: &UserId,
        vis: &Visibility,
        events: &[&StoredEvent],
    ) -> Result<std::collections::HashSet<String>> {
        let keys = [
            ("m.room.member".to_owned(), user.as_str().to_owned()),
            ("m.room.history_visibility".to_owned(), String::new()),
        ];
        // (membership, history visibility) in each state group: a group never changes, and
        // a redaction keeps both fields, so what is cached stays true.
        let mut groups: std::collections::HashMap<i64, (Option<String>, Option<String>)> = Default::default();
        let mut read: std::collections::HashMap<i64, (Option<String>, Option<String>)> = Default::default();
        for event in events {
            if event.state_group == 0
                || groups.contains_key(&event.state_group)
                || read.contains_key(&event.state_group)
            {
                continue;
            }
            if let Some(known) = self.group_visibility.get(&(event.state_group, user.to_owned())) {
                groups.insert(event.state_group, known);
                continue;
            }
            let mut entry = (None, None);
            for (event_type, _, id) in self.store.get_state_group_entries(event.state_group, &keys).await? {
                if event_type == "m.room.member" {
                    entry.0 = Some(id);
                } else {
                    entry.1 = Some(id);
                }
            }
            read.insert(event.state_group, entry);
        }
        if !read.is_empty() {
            let ids: Vec<String> = read.values().flat_map(|(m, h)| m.iter().chain(h)).cloned().collect();
            let contents: std::collections::HashMap<String, String> =
                self.store.get_events_by_ids(&ids).await?.into_iter().map(|e| (e.event_id, e.json)).collect();
            let field = |id: &Option<String>, name: &str| {
                id.as_ref().and_then(|id| contents.get(id)).map(|json| content_field(json, name))
            };
            for (group, (member, history)) in read {
                let known = (field(&member, "membership"), field(&history, "history_visibility"));
                self.group_visibility.insert((group, user.to_owned()), known.clone());
                groups.insert(group, known);
            }
        }
        let mut visible = std::collections::HashSet::new();
        for event in events {
            let own = event.event_type == "m.room.member" && event.state_key.as_deref() == Some(user.as_str());
            // A visibility change is judged by the visibility before it (the stream's
            // rule), not by the one it sets.
            let own = own || event.event_type == "m.room.history_visibility";
            let allowed = own
                || match groups.get(&event.state_group) {
                    // No state known: the stream's answer stands.
                    None => true,
                    Some((membership, history)) => {
                        let membership = membership.as_deref().unwrap_or("leave");
                        let history = history.as_deref().unwrap_or("shared");
                        membership == "join"
                            || match history {
                                "world_readable" => true,
                                "invited" => membership == "invite",
                                "joined" => false,
                                _ => vis.joined_since(event.stream_ordering),
                            }
                    }
                };
            if allowed {
                visible.insert(event.event_id.clone());
            }
        }
        Ok(visible)
    }
}

/// (state group, user) -> the user's membership and the room's history visibility in
/// that group (`None`: no such state), bounded in bytes (`cache::shares::GROUP_VISIBILITY`).
pub type GroupVisibility = crate::service::cache::ByteCache<(i64, ruma::OwnedUserId), (Option<String>, Option<String>)>;

/// What an entry of `GroupVisibility` takes, roughly.
pub fn weigh_group_visibility(key: &(i64, ruma::OwnedUserId), value: &(Option<String>, Option<String>)) -> usize {
    use crate::service::cache::{ENTRY_OVERHEAD, heap_str};
    let text = |s: &Option<String>| s.as_deref().map_or(0, heap_str);
    heap_str(key.1.as_str()) + text(&value.0) + text(&value.1) + 64 + ENTRY_OVERHEAD
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The estimates of a cache's entries are not below the heap the cache takes (its
    /// map's slots included), nor far above.
    #[test]
    fn group_visibility_estimate_is_not_below_the_heap_taken() {
        use crate::service::cache::heap::bytes_of;
        let values = [(None, None), (Some("join"), Some("shared")), (Some("leave"), None)];
        let mut estimate = 0;
        let taken = bytes_of(|| {
            let cache = GroupVisibility::new(usize::MAX, weigh_group_visibility);
            for i in 0..3_000 {
                let key = (i as i64, ruma::OwnedUserId::try_from(format!("@user{i}:example.org")).unwrap());
                let (membership, history) = values[i % 3];
                let value = (membership.map(str::to_owned), history.map(str::to_owned));
                estimate += weigh_group_visibility(&key, &value);
                cache.insert(key, value);
            }
            cache
        });
        assert!(estimate >= taken && estimate < 3 * taken, "estimate {estimate}, taken {taken}");
    }

    fn vis(memberships: &[(i64, &str)], changes: &[(i64, &str)]) -> Visibility {
        let own = |list: &[(i64, &str)]| list.iter().map(|(p, s)| (*p, (*s).to_owned())).collect();
        Visibility { memberships: own(memberships), changes: own(changes) }
    }

    #[test]
    fn shared_history_is_visible_to_later_joiners() {
        let v = vis(&[(50, "join")], &[(3, "shared")]);
        assert_eq!(v.visible_ranges(), vec![(i64::MIN, i64::MAX)]);
    }

    #[test]
    fn joined_history_starts_at_the_join() {
        let v = vis(&[(40, "invite"), (50, "join")], &[(3, "joined")]);
        // Before the visibility is first set it is `shared`.
        assert_eq!(v.visible_ranges(), vec![(i64::MIN, 3), (39, 40), (49, i64::MAX)]);
        assert!(!v.visible_at(45) && !v.visible_at(50) && v.visible_at(51));
    }

    #[test]
    fn invited_visibility_and_leaving() {
        let v = vis(&[(40, "invite"), (50, "join"), (70, "leave")], &[(3, "invited")]);
        assert_eq!(v.visible_ranges(), vec![(i64::MIN, 3), (39, 70)]);
        assert!(v.visible_at(41) && v.visible_at(70) && !v.visible_at(71));
    }

    #[test]
    fn visibility_changes_midway() {
        // World readable until 20, joined-only after; the user joined at 30 and left at 60.
        let v = vis(&[(30, "join"), (60, "leave")], &[(5, "world_readable"), (20, "joined")]);
        assert_eq!(v.visible_ranges(), vec![(i64::MIN, 20), (29, 60)]);
    }
}
