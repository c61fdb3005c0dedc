//! Placing a checked event in the DAG, the stream and the room's state.

use ruma::{OwnedUserId, RoomId, room_version_rules::RoomVersionRules};

use super::{IdState, to_entries};
use crate::service::rooms::{append::RoomHead, pdu::Pdu};
use crate::{
    error::{Error, Result},
    service::Services,
    storage::{
        CurrentChange, Dag, ExtremityChange, NewEvent, Persisted, Position, Redaction, StateBefore, StateEntry,
        StoredAt,
    },
};

/// An event ready to be placed: checked, with what to store alongside it.
pub(crate) struct Placing<'a> {
    pub event_id: &'a str,
    pub json: &'a str,
    pub pdu: &'a Pdu,
    pub membership: Option<&'a str>,
    pub redactions: &'a [Redaction<'a>],
    pub txn: Option<crate::storage::EventTxn<'a>>,
    pub push: &'a crate::storage::PushOutcome,
    pub position: Position,
    pub rejected_reason: Option<&'a str>,
    pub soft_failed: bool,
    /// Built here on top of the forward extremities it names (no child can exist).
    pub local: bool,
    /// Stored as an outlier until now.
    pub from_outlier: bool,
}

/// The state before an event, as the pipeline found it.
pub(crate) enum Before {
    /// A state group (the state after the one prev, or the current state).
    Group(i64),
    /// Resolved from several prevs' states.
    Resolved(IdState),
}

impl Services {
    /// The full state of a group.
    pub(crate) async fn group_state(&self, group: i64) -> Result<IdState> {
        Ok(self.store.get_state_group(group, None, None).await?.into_iter().map(|(t, k, id)| ((t, k), id)).collect())
    }

    /// The room's head: cached, or read back (forward extremities with depths, and the
    /// current state's group: the one extremity's, or resolved over several and written
    /// as a group). Call under the room's lock.
    pub(crate) async fn room_head(&self, room_id: &RoomId, rules: &RoomVersionRules) -> Result<RoomHead> {
        if let Some(head) = self.room_heads.get(room_id) {
            return Ok(head);
        }
        let rows = self.store.get_room_head(room_id.as_str()).await?;
        let mut groups: Vec<i64> = rows.iter().map(|r| r.2).filter(|g| *g != 0).collect();
        groups.sort_unstable();
        groups.dedup();
        let state_group = match groups.as_slice() {
            [] => return Err(Error::not_found("Unknown room")),
            [one] => *one,
            several => {
                let mut states = Vec::with_capacity(several.len());
                for group in several {
                    states.push(self.group_state(*group).await?);
                }
                let resolved = self.resolve_states(room_id, rules, states, None).await?;
                self.store.insert_state_group(room_id.as_str(), &to_entries(&resolved)).await?
            }
        };
        let head = RoomHead { extremities: rows.into_iter().map(|r| (r.0, r.1)).collect(), state_group };
        self.room_heads.set(room_id, head.clone());
        Ok(head)
    }

    /// Places a checked event in the DAG, the stream and the room's state, and stores
    /// it: the state before it (`before`, whose full state `before_state` the caller may
    /// already have read), its extremities, and the room's new current state (unchanged,
    /// the event's own state when it becomes the only forward extremity, or resolved over
    /// several). Updates `RoomHeads` (dropped when storing fails). Call under the room's
    /// lock with its head.
    pub(crate) async fn place_event(
        &self,
        room_id: &RoomId,
        rules: &RoomVersionRules,
        head: RoomHead,
        before: Before,
        before_state: Option<IdState>,
        e: Placing<'_>,
    ) -> Result<Persisted> {
        let accepted = e.rejected_reason.is_none() && !e.soft_failed;
        let prevs: Vec<String> = e.pdu.prev_events.iter().map(|p| p.to_string()).collect();
        let auths: Vec<String> = e.pdu.auth_events.iter().map(|p| p.to_string()).collect();
        let event_type = e.pdu.kind.to_string();
        let state_key = e.pdu.state_key.as_deref();
        let depth = i64::try_from(u64::from(e.pdu.depth)).unwrap_or(i64::MAX);

        // The forward extremities after it: its prevs are no longer any. Backfilled
        // history never becomes one: it comes oldest first, ahead of its children, and
        // is older than the room's head.
        let mut extremities: Vec<(String, i64)> = head.extremities.clone();
        let backfilled = matches!(e.position, Position::Backfill);
        let becomes_extremity =
            accepted && !backfilled && (e.local || !self.store.has_stored_children(e.event_id).await?);
        if accepted {
            extremities.retain(|(id, _)| !prevs.contains(id));
            if becomes_extremity {
                extremities.push((e.event_id.to_owned(), depth));
            }
        }
        let unchanged_extremities = extremities.is_empty() || {
            let mut a: Vec<&str> = extremities.iter().map(|x| x.0.as_str()).collect();
            let mut b: Vec<&str> = head.extremities.iter().map(|x| x.0.as_str()).collect();
            a.sort_unstable();
            b.sort_unstable();
            a == b
        };
        let linear =
            matches!(before, Before::Group(g) if g == head.state_group) && extremities.len() == 1 && becomes_extremity;

        // The room's current state after it, as a delta.
        let mut before_state = before_state;
        let mut set: Vec<StateEntry> = Vec::new();
        let mut removed: Vec<(String, String)> = Vec::new();
        let mut memberships: Vec<(String, String, String)> = Vec::new();
        let mut current_group: Option<Vec<StateEntry>> = None;
        let resolve_current = accepted && !linear && !unchanged_extremities;
        if resolve_current {
            let mut after = match before_state.take() {
                Some(state) => state,
                None => match &before {
                    Before::Group(g) => self.group_state(*g).await?,
                    Before::Resolved(state) => state.clone(),
                },
            };
            before_state = Some(after.clone());
            if let Some(k) = state_key {
                after.insert((event_type.clone(), k.to_owned()), e.event_id.to_owned());
            }
            let new_current = if extremities.len() == 1 && becomes_extremity {
                after
            } else {
                let mut states = Vec::with_capacity(extremities.len());
                let groups = self
                    .store
                    .get_state_groups_of(&extremities.iter().map(|x| x.0.clone()).collect::<Vec<_>>())
                    .await?;
                for (id, group) in groups {
                    if id == e.event_id {
                        continue;
                    }
                    states.push(self.group_state(group).await?);
                }
                if becomes_extremity {
                    states.push(after);
                }
                let resolved = self.resolve_states(room_id, rules, states, Some(e.pdu)).await?;
                current_group = Some(to_entries(&resolved));
                resolved
            };
            let old = self.group_state(head.state_group).await?;
            for (key, id) in &new_current {
                if old.get(key) != Some(id) {
                    set.push((key.0.clone(), key.1.clone(), id.clone()));
                }
            }
            removed = old.keys().filter(|k| !new_current.contains_key(*k)).cloned().collect();
            let member_ids: Vec<String> =
                set.iter().filter(|(t, _, _)| t == "m.room.member").map(|(_, _, id)| id.clone()).collect();
            for event in self.store.get_events_by_ids(&member_ids).await? {
                if let Some(user) = event.state_key.clone() {
                    memberships.push((
                        user,
                        crate::service::rooms::messages::membership_of(&event.json),
                        event.event_id.clone(),
                    ));
                }
            }
            if e.membership.is_some() && member_ids.iter().any(|id| id == e.event_id) {
                // Its own row is written from `set` too (the event is not stored yet, or
                // stored as an outlier).
                if let (Some(user), Some(m)) = (state_key, e.membership) {
                    memberships.retain(|(u, _, _)| u != user);
                    memberships.push((user.to_owned(), m.to_owned(), e.event_id.to_owned()));
                }
            }
        }
        let replaces_state = match (state_key, &before_state, linear) {
            (Some(k), Some(state), _) => Some(state.get(&(event_type.clone(), k.to_owned())).map(String::as_str)),
            (Some(_), None, true) => None,
            (Some(k), None, false) => {
                let state = match &before {
                    Before::Group(g) => self.group_state(*g).await?,
                    Before::Resolved(state) => state.clone(),
                };
                before_state = Some(state);
                let state = before_state.as_ref().expect("just set");
                Some(state.get(&(event_type.clone(), k.to_owned())).map(String::as_str))
            }
            (None, _, _) => Some(None),
        };
        let resolved_before = match &before {
            Before::Resolved(state) => Some(to_entries(state)),
            Before::Group(_) => None,
        };
        let dag = Dag {
            position: e.position,
            outlier: false,
            rejected_reason: e.rejected_reason,
            soft_failed: e.soft_failed,
            state_before: match (&before, &resolved_before) {
                _ if e.rejected_reason.is_some() => StateBefore::None,
                (Before::Group(g), _) => StateBefore::Group(*g),
                (Before::Resolved(_), Some(entries)) => StateBefore::Resolved(entries),
                (Before::Resolved(_), None) => StateBefore::None,
            },
            current: if !accepted || (unchanged_extremities && !linear) {
                CurrentChange::Unchanged
            } else if linear {
                CurrentChange::Append
            } else {
                CurrentChange::Delta {
                    set: &set,
                    removed: &removed,
                    memberships: &memberships,
                    group: current_group.as_deref(),
                }
            },
            extremities: match (accepted, backfilled, e.local && !resolve_current) {
                (false, _, _) => ExtremityChange::Unchanged,
                (true, true, _) => ExtremityChange::Backward,
                (true, false, true) => ExtremityChange::Linear,
                (true, false, false) => ExtremityChange::General,
            },
            replaces_state,
            from_outlier: e.from_outlier,
            current_before: head.state_group,
        };
        let persisted = self
            .store
            .persist_event(NewEvent {
                event_id: e.event_id,
                room_id: room_id.as_str(),
                sender: e.pdu.sender.as_str(),
                event_type: &event_type,
                state_key,
                depth,
                origin_server_ts: e.pdu.origin_server_ts.get().into(),
                json: e.json,
                prev_events: &prevs,
                auth_events: &auths,
                membership: e.membership,
                redactions: e.redactions,
                txn: e.txn,
                push: e.push,
                dag,
            })
            .await;
        match &persisted {
            Ok(Persisted::Stored(StoredAt { state_group, current_group, .. })) => {
                // Its pushes are queued (committed): their pushers send them.
                self.wake_pushers(e.push.own.iter().filter(|a| a.notifies).map(|a| a.user_id.as_str()));
                if !e.push.groups.is_empty() {
                    self.wake_room_pushers(room_id);
                }
                if !e.push.spans.is_empty() {
                    self.push_members_cache.spans_moved(room_id, &e.push.spans);
                }
                if accepted {
                    let state_group = if linear || (extremities.len() == 1 && becomes_extremity) {
                        state_group.unwrap_or(head.state_group)
                    } else {
                        current_group.unwrap_or(head.state_group)
                    };
                    self.room_heads.set(room_id, RoomHead { extremities, state_group });
                }
                if accepted && (e.membership.is_some() || !memberships.is_empty()) {
                    match (state_key, e.membership) {
                        // The event is the room's state on top of the state before it.
                        (Some(user), Some(m)) if linear && memberships.is_empty() => {
                            self.member_changed(room_id, user, m, e.pdu.content.get())
                        }
                        _ => self.forget_member_cache(room_id),
                    }
                    let mut changed: Vec<(&str, &str)> =
                        memberships.iter().map(|(u, m, _)| (u.as_str(), m.as_str())).collect();
                    if let (Some(user), Some(m)) = (state_key, e.membership) {
                        changed.push((user, m));
                    }
                    self.device_lists_after_membership(room_id, &changed).await;
                }
            }
            // Whatever happened, the database says what the head is.
            _ => self.room_heads.forget(room_id),
        }
        persisted
    }

    /// Wakes the `/sync`s of the room's local members (and of a local member event's
    /// target, who may not be joined).
    pub(crate) async fn wake_for_event(
        &self,
        room_id: &RoomId,
        state_key: Option<&str>,
        is_member: bool,
    ) -> Result<()> {
        self.notifier.notify_users(&self.joined_local_members(room_id).await?);
        if let Some(target) = state_key.filter(|_| is_member)
            && let Ok(target) = OwnedUserId::try_from(target)
            && target.server_name() == self.server_name()
        {
            // Invited, left, kicked or banned users are no longer (or not yet) joined.
            self.notifier.notify_users(&[target]);
        }
        Ok(())
    }
}
