//! Appending a local event to an existing room: under the room's lock, take the room's
//! head (forward extremities and state group), read the state the auth rules need,
//! build and check the event (`build.rs`), then place and store it through the persist
//! pipeline (`pipeline/`) and wake the room's members. Every local event of an
//! existing room goes through here.

use std::collections::HashMap;

use ruma::{
    CanonicalJsonObject, DeviceId, OwnedEventId, OwnedRoomId, RoomId, RoomVersionId, UserId, events::TimelineEventType,
    room_version_rules::RoomVersionRules,
};
use serde_json::Value as JsonValue;

use super::{
    build::{StateMap, auth_state_keys},
    pdu::Pdu,
    pipeline::{Before, Placing},
};
use crate::{
    error::{Error, Result},
    service::Services,
    storage::{EventTxn, Persisted, Position, PushOutcome, Redaction},
};

/// An event a local user wants to send.
pub struct LocalEvent<'a> {
    pub sender: &'a UserId,
    pub kind: TimelineEventType,
    pub state_key: Option<String>,
    pub content: JsonValue,
    /// The transaction of a client send, for idempotence and echo.
    pub txn: Option<ClientTxn<'a>>,
    /// For `m.room.redaction`: the event to redact.
    pub redacts: Option<OwnedEventId>,
}

/// A client's transaction id, unique per device and endpoint path (`scope`, such as
/// `send/{roomId}/{eventType}`): the spec scopes transaction ids to both.
pub struct ClientTxn<'a> {
    pub device_id: &'a DeviceId,
    pub scope: String,
    pub txn_id: &'a str,
}

/// What appending produced.
pub struct Appended {
    pub event_id: OwnedEventId,
    pub room_id: OwnedRoomId,
    pub stream_pos: i64,
}

/// Where a room's next event goes: its forward extremities (event ids with depths)
/// and its current state group.
#[derive(Clone)]
pub struct RoomHead {
    pub extremities: Vec<(String, i64)>,
    pub state_group: i64,
}

/// The heads of rooms that events were stored in, so that appending does not read them
/// back from the database each time. Read and written only under the room's lock by
/// the persist pipeline (`pipeline/`), which every event of a room, local or remote,
/// goes through, so an entry always equals the database; dropped when storing fails.
/// `state_group` is the group of the room's current state (resolved over the forward
/// extremities when there are several).
#[derive(Default)]
pub struct RoomHeads {
    rooms: std::sync::Mutex<HashMap<OwnedRoomId, RoomHead>>,
}

impl RoomHeads {
    pub(crate) fn get(&self, room_id: &RoomId) -> Option<RoomHead> {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner()).get(room_id).cloned()
    }

    pub fn set(&self, room_id: &RoomId, head: RoomHead) {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner()).insert(room_id.to_owned(), head);
    }

    pub fn forget(&self, room_id: &RoomId) {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner()).remove(room_id);
    }
}

/// Largest number of prev_events an event names.
const MAX_PREV_EVENTS: usize = 10;

pub(crate) fn rules_for(version: &RoomVersionId) -> Result<RoomVersionRules> {
    version.rules().ok_or_else(|| Error::internal(format!("no rules for room version {version}")))
}

impl Services {
    /// The version of a room; `M_NOT_FOUND` if the server does not know the room.
    pub async fn room_version(&self, room_id: &RoomId) -> Result<RoomVersionId> {
        if let Some(version) = self.room_versions.lock().unwrap_or_else(|e| e.into_inner()).get(room_id) {
            return Ok(version.clone());
        }
        let version =
            self.store.get_room_version(room_id.as_str()).await?.ok_or_else(|| Error::not_found("Unknown room"))?;
        let version = RoomVersionId::try_from(version.as_str()).map_err(Error::internal)?;
        // A room's version never changes.
        self.room_versions.lock().unwrap_or_else(|e| e.into_inner()).insert(room_id.to_owned(), version.clone());
        Ok(version)
    }

    /// Appends an event to an existing room after checking it against the auth rules.
    /// A client send whose transaction id the device already used on the same endpoint
    /// answers with the event first sent.
    pub async fn append_event(&self, room_id: &RoomId, event: LocalEvent<'_>) -> Result<Appended> {
        let version = self.room_version(room_id).await?;
        let rules = rules_for(&version)?;
        let keys = auth_state_keys(&event, &rules)?;
        let _guard = self.room_locks.lock(room_id).await;

        let head = self.room_head(room_id, &rules).await?;
        let mut prev = head.extremities.clone();
        prev.sort_by_key(|e| std::cmp::Reverse(e.1));
        prev.truncate(MAX_PREV_EVENTS);

        let keys: Vec<(String, String)> = keys.into_iter().map(|(t, k)| (t.to_string(), k)).collect();
        let mut state = StateMap::new();
        for stored in self.store.get_current_state_entries(room_id.as_str(), &keys).await? {
            let pdu = Pdu::from_stored(&stored)?;
            state.insert((stored.event_type.as_str().into(), stored.state_key.clone().unwrap_or_default()), pdu);
        }
        let built = self.build_event(room_id, &rules, &prev, &event, &state)?;

        let redaction = match &event.redacts {
            Some(target) => self.redacted_json_of(target.as_str(), room_id, &rules).await?,
            None => None,
        };
        let push_actions = match self.push_actions_for(room_id, event.sender, &built.json, &state, &rules).await {
            Ok(actions) => actions,
            Err(e) => {
                // The event still goes out; only its notification counts are lost.
                tracing::warn!(event_id = %built.event_id, error = %e, "could not evaluate push rules");
                PushOutcome::default()
            }
        };
        // The event names every forward extremity (up to `MAX_PREV_EVENTS`): the state
        // before it is then the current state.
        let before = if prev.len() == head.extremities.len() {
            Before::Group(head.state_group)
        } else {
            let groups = self.store.get_state_groups_of(&built.prev_events).await?;
            let mut states = Vec::with_capacity(groups.len());
            for (_, group) in groups {
                states.push(self.group_state(group).await?);
            }
            Before::Resolved(self.resolve_states(room_id, &rules, states, None).await?)
        };
        let redactions: Vec<Redaction<'_>> =
            redaction.iter().map(|(target, redacted_json)| Redaction::Apply { target, redacted_json }).collect();
        let persisted = self
            .place_event(
                room_id,
                &rules,
                head,
                before,
                None,
                Placing {
                    event_id: built.event_id.as_str(),
                    json: &built.json,
                    pdu: &built.pdu,
                    membership: built.membership.as_deref(),
                    redactions: &redactions,
                    txn: event.txn.as_ref().map(|t| EventTxn {
                        device_id: t.device_id.as_str(),
                        scope: &t.scope,
                        txn_id: t.txn_id,
                    }),
                    push: &push_actions,
                    position: Position::Live,
                    rejected_reason: None,
                    soft_failed: false,
                    local: true,
                    from_outlier: false,
                },
            )
            .await;
        let stream_pos = match persisted {
            Ok(Persisted::Stored(at)) => at.position.unwrap_or(0),
            Ok(Persisted::TxnTaken) => {
                // A concurrent retry of the same client send won the race; nothing changed.
                let txn = event.txn.as_ref().ok_or_else(|| Error::internal("transaction conflict without one"))?;
                let existing = self
                    .store
                    .find_txn_event(event.sender.as_str(), txn.device_id.as_str(), &txn.scope, txn.txn_id)
                    .await?
                    .ok_or_else(|| Error::internal("transaction conflict, but no event"))?;
                let existing =
                    self.store.get_event(&existing).await?.ok_or_else(|| Error::internal("event vanished"))?;
                let event_id = OwnedEventId::try_from(existing.event_id).map_err(Error::internal)?;
                return Ok(Appended { event_id, room_id: room_id.to_owned(), stream_pos: existing.stream_ordering });
            }
            Ok(Persisted::Duplicate(pos)) => {
                // The very same event is stored already: nothing to do.
                return Ok(Appended { event_id: built.event_id, room_id: room_id.to_owned(), stream_pos: pos });
            }
            Err(e) => return Err(e),
        };
        drop(_guard);
        self.wake_for_event(room_id, event.state_key.as_deref(), built.membership.is_some()).await?;
        let target = event.state_key.as_deref().filter(|_| built.membership.is_some());
        self.federate_local_event(room_id, built.event_id.as_str(), stream_pos, target).await;
        Ok(Appended { event_id: built.event_id, room_id: room_id.to_owned(), stream_pos })
    }

    /// The redacted JSON of `target`, if it is an event of this room not yet redacted.
    pub(crate) async fn redacted_json_of(
        &self,
        target: &str,
        room_id: &RoomId,
        rules: &RoomVersionRules,
    ) -> Result<Option<(String, String)>> {
        let Some(stored) = self.store.get_event(target).await? else { return Ok(None) };
        if stored.room_id != room_id.as_str() || stored.redacted_by.is_some() {
            return Ok(None);
        }
        let obj: CanonicalJsonObject = serde_json::from_str(&stored.json).map_err(Error::internal)?;
        let redacted = ruma::canonical_json::redact(obj, &rules.redaction, None).map_err(Error::internal)?;
        Ok(Some((stored.event_id, serde_json::to_string(&redacted).map_err(Error::internal)?)))
    }
}
