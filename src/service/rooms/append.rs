//! Appending a local event to a room: choose prev and auth events, hash, sign, compute
//! the event id, check the room version's auth rules against the current state, then
//! persist and wake the room's members. Every local event goes through here.

use std::collections::HashMap;

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, DeviceId, OwnedEventId, OwnedRoomId, RoomId, RoomVersionId, UserId,
    canonical_json::try_from_json_map,
    events::{StateEventType, TimelineEventType},
    room_version_rules::RoomVersionRules,
    signatures::{hash_and_sign_event, reference_hash},
    state_res::{auth_types_for_event, check_state_dependent_auth_rules, check_state_independent_auth_rules},
};
use serde_json::{Value as JsonValue, value::to_raw_value};

use super::pdu::Pdu;
use crate::{
    error::{Error, Result},
    service::{Services, now_ms},
    storage::NewEvent,
};

/// An event a local user wants to send.
pub struct LocalEvent<'a> {
    pub sender: &'a UserId,
    pub kind: TimelineEventType,
    pub state_key: Option<String>,
    pub content: JsonValue,
    /// Device and transaction id of a client send, for idempotence and echo.
    pub txn: Option<(&'a DeviceId, &'a str)>,
    /// For `m.room.redaction`: the event to redact.
    pub redacts: Option<OwnedEventId>,
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
    extremities: Vec<(String, i64)>,
    state_group: i64,
}

/// The heads of rooms that local events were appended to, so that appending does not
/// read them back from the database each time. Read and written only under the room's
/// lock (as every event of a room is stored), so an entry always equals the database;
/// dropped when storing fails. Whatever else stores events in a room later (federation)
/// must take the same lock and update or drop the entry.
#[derive(Default)]
pub struct RoomHeads {
    rooms: std::sync::Mutex<HashMap<OwnedRoomId, RoomHead>>,
}

impl RoomHeads {
    fn get(&self, room_id: &RoomId) -> Option<RoomHead> {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner()).get(room_id).cloned()
    }

    fn set(&self, room_id: &RoomId, head: RoomHead) {
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

fn to_canonical(value: JsonValue) -> Result<CanonicalJsonObject> {
    match value {
        JsonValue::Object(map) => {
            try_from_json_map(map).map_err(|e| Error::bad_json(format!("The event content is not canonical JSON: {e}")))
        }
        _ => Err(Error::bad_json("The event content must be a JSON object")),
    }
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

    /// Hashes, signs and names an event object; returns the event id and JSON.
    fn seal_event(&self, obj: &mut CanonicalJsonObject, rules: &RoomVersionRules) -> Result<OwnedEventId> {
        if serde_json::to_vec(obj).map_err(Error::internal)?.len() > 65_536 - 1024 {
            // Hashes and signatures take about a few hundred bytes more.
            return Err(Error::too_large("The event is larger than 64 KiB"));
        }
        hash_and_sign_event(self.server_name().as_str(), &self.signing_key, obj, &rules.redaction)
            .map_err(|e| Error::internal(format!("signing failed: {e}")))?;
        let hash = reference_hash(obj, rules).map_err(|e| match e {
            ruma::signatures::JsonError::PduTooLarge => Error::too_large("The event is larger than 64 KiB"),
            other => Error::internal(format!("reference hash failed: {other}")),
        })?;
        OwnedEventId::try_from(format!("${hash}")).map_err(Error::internal)
    }

    /// Creates the `m.room.create` event of a new room and stores the room.
    pub async fn append_create_event(
        &self,
        sender: &UserId,
        version: &RoomVersionId,
        content: JsonValue,
    ) -> Result<Appended> {
        let rules = rules_for(version)?;
        let mut obj = to_canonical(serde_json::json!({
            "type": "m.room.create",
            "state_key": "",
            "sender": sender,
            "content": content,
            "origin_server_ts": now_ms(),
            "depth": 1,
            "prev_events": [],
            "auth_events": [],
        }))?;
        let room_id = if rules.authorization.room_create_event_id_as_room_id {
            None
        } else {
            let room_id = RoomId::new_v1(self.server_name());
            obj.insert("room_id".into(), CanonicalJsonValue::String(room_id.to_string()));
            Some(room_id)
        };
        let event_id = self.seal_event(&mut obj, &rules)?;
        let room_id = match room_id {
            Some(id) => id,
            None => RoomId::new_v2(event_id.as_str().trim_start_matches('$')).map_err(Error::internal)?,
        };
        let json = serde_json::to_string(&obj).map_err(Error::internal)?;
        let pdu = Pdu::parse(event_id.as_str(), &json)?;
        check_state_independent_auth_rules(&rules.authorization, &pdu, |_: &ruma::EventId| None::<Pdu>)
            .map_err(|reason| Error::bad_json(format!("Invalid m.room.create event: {reason}")))?;
        let _guard = self.room_locks.lock(&room_id).await;
        let stream_pos = self
            .store
            .persist_event(NewEvent {
                event_id: event_id.as_str(),
                room_id: room_id.as_str(),
                sender: sender.as_str(),
                event_type: "m.room.create",
                state_key: Some(""),
                depth: 1,
                origin_server_ts: pdu.origin_server_ts.get().into(),
                json: &json,
                prev_events: &[],
                prev_state_group: None,
                membership: None,
                new_room_version: Some(version.as_str()),
                redaction: None,
                txn: None,
                push_actions: &[],
            })
            .await?;
        Ok(Appended { event_id, room_id, stream_pos })
    }

    /// Appends an event to an existing room after checking it against the auth rules.
    pub async fn append_event(&self, room_id: &RoomId, event: LocalEvent<'_>) -> Result<Appended> {
        let version = self.room_version(room_id).await?;
        let rules = rules_for(&version)?;
        let _guard = self.room_locks.lock(room_id).await;

        let head = match self.room_heads.get(room_id) {
            Some(head) => head,
            None => {
                let (extremities, state_group) = self.store.get_room_head(room_id.as_str()).await?;
                RoomHead { extremities, state_group: state_group.ok_or_else(|| Error::not_found("Unknown room"))? }
            }
        };
        let state_group = head.state_group;
        let mut extremities = head.extremities.clone();
        extremities.sort_by_key(|e| std::cmp::Reverse(e.1));
        extremities.truncate(MAX_PREV_EVENTS);
        let depth = extremities.iter().map(|e| e.1).max().unwrap_or(0) + 1;
        let prev_events: Vec<String> = extremities.into_iter().map(|e| e.0).collect();

        let mut event = event;
        if let Some(target) = &event.redacts
            && rules.redaction.content_field_redacts
            && let JsonValue::Object(content) = &mut event.content
        {
            // Since v11 `redacts` lives in the content.
            content.insert("redacts".into(), JsonValue::String(target.to_string()));
        }
        let content_raw = to_raw_value(&event.content).map_err(Error::internal)?;
        let auth_types = auth_types_for_event(
            &event.kind,
            event.sender,
            event.state_key.as_deref(),
            &content_raw,
            &rules.authorization,
        )
        .map_err(|e| Error::bad_json(format!("Invalid event content: {e}")))?;
        let mut keys: Vec<(String, String)> = auth_types.iter().map(|(t, k)| (t.to_string(), k.clone())).collect();
        // Since room v12 the create event is not listed in auth_events, but the
        // state-dependent rules still read it from the state: fetch it in the same query.
        let create_key = ("m.room.create".to_owned(), String::new());
        if !keys.contains(&create_key) {
            keys.push(create_key.clone());
        }
        let mut auth_state = self.store.get_current_state_entries(room_id.as_str(), &keys).await?;
        let mut by_key: HashMap<(StateEventType, String), Pdu> = HashMap::new();
        let mut by_id: HashMap<OwnedEventId, Pdu> = HashMap::new();
        for stored in &auth_state {
            let pdu = Pdu::from_stored(stored)?;
            by_key
                .insert((stored.event_type.as_str().into(), stored.state_key.clone().unwrap_or_default()), pdu.clone());
            by_id.insert(pdu.event_id.clone(), pdu);
        }
        let wanted: Vec<(String, String)> = auth_types.iter().map(|(t, k)| (t.to_string(), k.clone())).collect();
        auth_state.retain(|e| wanted.contains(&(e.event_type.clone(), e.state_key.clone().unwrap_or_default())));

        let mut fields = serde_json::json!({
            "type": event.kind.to_string(),
            "sender": event.sender,
            "content": event.content,
            "origin_server_ts": now_ms(),
            "depth": depth,
            "prev_events": prev_events,
            "auth_events": auth_state.iter().map(|e| e.event_id.clone()).collect::<Vec<_>>(),
            "room_id": room_id,
        });
        if let Some(state_key) = &event.state_key {
            fields["state_key"] = JsonValue::String(state_key.clone());
        }
        let redacts = event.redacts.as_ref().map(|r| r.to_string());
        if let Some(target) = &redacts
            && !rules.redaction.content_field_redacts
        {
            // Before v11 `redacts` is a top-level key.
            fields["redacts"] = JsonValue::String(target.clone());
        }
        let mut obj = to_canonical(fields)?;
        let event_id = self.seal_event(&mut obj, &rules)?;
        let json = serde_json::to_string(&obj).map_err(Error::internal)?;
        let pdu = Pdu::parse(event_id.as_str(), &json)?;

        check_state_independent_auth_rules(&rules.authorization, &pdu, |id: &ruma::EventId| by_id.get(id).cloned())
            .and_then(|()| {
                check_state_dependent_auth_rules(&rules.authorization, &pdu, |t: &StateEventType, k: &str| {
                    by_key.get(&(t.clone(), k.to_owned())).cloned()
                })
            })
            .map_err(|reason| Error::forbidden(format!("The event is not allowed: {reason}")))?;

        let membership =
            (event.kind == TimelineEventType::RoomMember).then(|| event_content_membership(&pdu)).flatten();
        let redaction = match &redacts {
            Some(target) => self.redacted_json_of(target, room_id, &rules).await?,
            None => None,
        };
        let push_actions = match self.push_actions_for(room_id, event.sender, &json, &by_key, &rules).await {
            Ok(actions) => actions,
            Err(e) => {
                // The event still goes out; only its notification counts are lost.
                tracing::warn!(%event_id, error = %e, "could not evaluate push rules");
                Vec::new()
            }
        };
        let stream_pos = self
            .store
            .persist_event(NewEvent {
                event_id: event_id.as_str(),
                room_id: room_id.as_str(),
                sender: event.sender.as_str(),
                event_type: &event.kind.to_string(),
                state_key: event.state_key.as_deref(),
                depth,
                origin_server_ts: pdu.origin_server_ts.get().into(),
                json: &json,
                prev_events: &prev_events,
                prev_state_group: Some(state_group),
                membership: membership.as_deref(),
                new_room_version: None,
                redaction: redaction.as_ref().map(|(id, json)| (id.as_str(), json.as_str())),
                txn: event.txn.map(|(d, t)| (d.as_str(), t)),
                push_actions: &push_actions,
            })
            .await;
        let stream_pos = match stream_pos {
            Ok(pos) => pos,
            Err(e) => {
                // Whatever happened, the database says what the head is.
                self.room_heads.forget(room_id);
                return Err(e);
            }
        };
        let mut extremities: Vec<(String, i64)> =
            head.extremities.into_iter().filter(|(id, _)| !prev_events.contains(id)).collect();
        extremities.push((event_id.to_string(), depth));
        let state_group = if event.state_key.is_some() { stream_pos } else { state_group };
        self.room_heads.set(room_id, RoomHead { extremities, state_group });
        drop(_guard);

        if membership.is_some() {
            self.forget_member_cache(room_id);
        }
        self.notifier.notify_users(&self.joined_local_members(room_id).await?);
        if let Some(target) = event.state_key.as_deref().filter(|_| membership.is_some())
            && let Ok(target) = ruma::OwnedUserId::try_from(target)
            && target.server_name() == self.server_name()
        {
            // Invited, left, kicked or banned users are no longer (or not yet) joined.
            self.notifier.notify_users(&[target]);
        }
        Ok(Appended { event_id, room_id: room_id.to_owned(), stream_pos })
    }

    /// The redacted JSON of `target`, if it is an event of this room not yet redacted.
    async fn redacted_json_of(
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

fn event_content_membership(pdu: &Pdu) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Membership {
        membership: String,
    }
    serde_json::from_str::<Membership>(pdu.content.get()).ok().map(|m| m.membership)
}
