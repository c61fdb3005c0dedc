//! Building a local event: check its content, choose its auth events from a given
//! state, hash, sign and name it, and check it against the room version's auth rules.
//! Nothing is stored here: `append.rs` stores one event on top of a room's current
//! state, `create.rs` a new room's first events all at once.

use std::collections::HashMap;

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, OwnedRoomId, RoomId, UserId,
    canonical_json::try_from_json_map,
    events::{StateEventType, TimelineEventType},
    room_version_rules::RoomVersionRules,
    signatures::{hash_and_sign_event, reference_hash},
    state_res::{auth_types_for_event, check_state_dependent_auth_rules, check_state_independent_auth_rules},
};
use serde_json::{Map, Value as JsonValue, value::to_raw_value};

use super::{append::LocalEvent, pdu::Pdu, validate};
use crate::{
    error::{Error, Result},
    service::{Services, now_ms},
};

/// Room state as the auth rules read it: (type, state key) to event.
pub type StateMap = HashMap<(StateEventType, String), Pdu>;

/// A signed event, checked against the auth rules, ready to be stored.
pub struct BuiltEvent {
    pub event_id: OwnedEventId,
    pub json: String,
    pub pdu: Pdu,
    pub depth: i64,
    pub prev_events: Vec<String>,
    pub auth_events: Vec<String>,
    /// For `m.room.member` events: the membership it sets.
    pub membership: Option<String>,
}

impl BuiltEvent {
    /// Where the event goes in a `StateMap`, if it is a state event.
    pub fn state_entry(&self) -> Option<(StateEventType, String)> {
        self.pdu.state_key.clone().map(|k| (self.pdu.kind.to_string().into(), k))
    }
}

fn to_canonical(value: JsonValue) -> Result<CanonicalJsonObject> {
    match value {
        JsonValue::Object(map) => {
            try_from_json_map(map).map_err(|e| Error::bad_json(format!("The event content is not canonical JSON: {e}")))
        }
        _ => Err(Error::bad_json("The event content must be a JSON object")),
    }
}

/// The content of `event` as it will be sent: since room v11 a redaction names its
/// target in the content.
fn final_content(event: &LocalEvent<'_>, rules: &RoomVersionRules) -> JsonValue {
    let mut content = event.content.clone();
    if let Some(target) = &event.redacts
        && rules.redaction.content_field_redacts
        && let JsonValue::Object(map) = &mut content
    {
        map.insert("redacts".into(), JsonValue::String(target.to_string()));
    }
    content
}

fn auth_types(
    event: &LocalEvent<'_>,
    content: &JsonValue,
    rules: &RoomVersionRules,
) -> Result<Vec<(StateEventType, String)>> {
    let content_raw = to_raw_value(content).map_err(Error::internal)?;
    auth_types_for_event(&event.kind, event.sender, event.state_key.as_deref(), &content_raw, &rules.authorization)
        .map_err(|e| Error::bad_json(format!("Invalid event content: {e}")))
}

/// The state keys whose events building `event` reads: its auth events, and the create
/// event (since room v12 it is not among the auth events, but the rules still read it).
pub fn auth_state_keys(event: &LocalEvent<'_>, rules: &RoomVersionRules) -> Result<Vec<(StateEventType, String)>> {
    let mut keys = auth_types(event, &final_content(event, rules), rules)?;
    let create = (StateEventType::RoomCreate, String::new());
    if !keys.contains(&create) {
        keys.push(create);
    }
    Ok(keys)
}

fn membership_of(pdu: &Pdu) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Membership {
        membership: String,
    }
    if pdu.kind != TimelineEventType::RoomMember {
        return None;
    }
    serde_json::from_str::<Membership>(pdu.content.get()).ok().map(|m| m.membership)
}

impl Services {
    /// Hashes, signs and names an event object; returns the event id.
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

    fn finish(&self, mut obj: CanonicalJsonObject, rules: &RoomVersionRules) -> Result<(OwnedEventId, String, Pdu)> {
        let event_id = self.seal_event(&mut obj, rules)?;
        let json = serde_json::to_string(&obj).map_err(Error::internal)?;
        let pdu = Pdu::parse(event_id.as_str(), &json)?;
        Ok((event_id, json, pdu))
    }

    /// The `m.room.create` event of a new room, sent at `ts`, and the room's id (in
    /// room version 12 the create event's hash).
    pub fn build_create_event(
        &self,
        sender: &UserId,
        rules: &RoomVersionRules,
        content: Map<String, JsonValue>,
        ts: i64,
    ) -> Result<(OwnedRoomId, BuiltEvent)> {
        validate::check_create_content(&content, rules)?;
        let mut obj = to_canonical(serde_json::json!({
            "type": "m.room.create",
            "state_key": "",
            "sender": sender,
            "content": content,
            "origin_server_ts": ts,
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
        let (event_id, json, pdu) = self.finish(obj, rules)?;
        let room_id = match room_id {
            Some(id) => id,
            None => RoomId::new_v2(event_id.as_str().trim_start_matches('$')).map_err(Error::internal)?,
        };
        check_state_independent_auth_rules(&rules.authorization, &pdu, |_: &ruma::EventId| None::<Pdu>)
            .map_err(|reason| Error::bad_json(format!("Invalid m.room.create event: {reason}")))?;
        let built = BuiltEvent {
            event_id,
            json,
            pdu,
            depth: 1,
            prev_events: Vec::new(),
            auth_events: Vec::new(),
            membership: None,
        };
        Ok((room_id, built))
    }

    /// Builds `event` on top of `prev` (event ids with depths) in a room whose state
    /// holds at least the entries `auth_state_keys` names, and checks it against the
    /// auth rules: `M_FORBIDDEN` with ruma's reason if they refuse it.
    pub fn build_event(
        &self,
        room_id: &RoomId,
        rules: &RoomVersionRules,
        prev: &[(String, i64)],
        event: &LocalEvent<'_>,
        state: &StateMap,
    ) -> Result<BuiltEvent> {
        let content = final_content(event, rules);
        validate::check_event(&event.kind, event.state_key.as_deref(), &content, rules)?;
        let auth_types = auth_types(event, &content, rules)?;
        let auth_events: Vec<&Pdu> = auth_types.iter().filter_map(|key| state.get(key)).collect();
        let depth = prev.iter().map(|e| e.1).max().unwrap_or(0) + 1;
        let prev_events: Vec<String> = prev.iter().map(|e| e.0.clone()).collect();

        let mut fields = serde_json::json!({
            "type": event.kind.to_string(),
            "sender": event.sender,
            "content": content,
            "origin_server_ts": now_ms(),
            "depth": depth,
            "prev_events": prev_events,
            "auth_events": auth_events.iter().map(|e| e.event_id.as_str()).collect::<Vec<_>>(),
            "room_id": room_id,
        });
        if let Some(state_key) = &event.state_key {
            fields["state_key"] = JsonValue::String(state_key.clone());
        }
        if let Some(target) = &event.redacts
            && !rules.redaction.content_field_redacts
        {
            // Before v11 `redacts` is a top-level key.
            fields["redacts"] = JsonValue::String(target.to_string());
        }
        let (event_id, json, pdu) = self.finish(to_canonical(fields)?, rules)?;

        // Since room v12 the rules find the create event by the room id, not among the
        // auth events.
        let create = state.get(&(StateEventType::RoomCreate, String::new()));
        let by_id: HashMap<&ruma::EventId, &Pdu> =
            auth_events.iter().copied().chain(create).map(|e| (e.event_id.as_ref(), e)).collect();
        check_state_independent_auth_rules(&rules.authorization, &pdu, |id: &ruma::EventId| {
            by_id.get(id).map(|e| (*e).clone())
        })
        .and_then(|()| {
            check_state_dependent_auth_rules(&rules.authorization, &pdu, |t: &StateEventType, k: &str| {
                state.get(&(t.clone(), k.to_owned())).cloned()
            })
        })
        .map_err(|reason| Error::forbidden(format!("The event is not allowed: {reason}")))?;

        let membership = membership_of(&pdu);
        let auth_events = pdu.auth_events.iter().map(|a| a.to_string()).collect();
        Ok(BuiltEvent { event_id, json, pdu, depth, prev_events, auth_events, membership })
    }
}
