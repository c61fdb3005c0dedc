//! Checks of a new local event before it is built: the spec's size limits on types and
//! state keys, and the content of the events that the auth rules (and clients) read.
//! Content that ruma's auth rules would read leniently, or not at all, can otherwise
//! be stored and break a room: `{"join_rule": 5}` makes every later join fail.

use ruma::{OwnedRoomId, OwnedUserId, events::TimelineEventType, room_version_rules::RoomVersionRules};
use serde_json::{Map, Value as JsonValue};

use crate::error::{Error, Result};

/// The spec's limit on event types, state keys and identifiers, in bytes.
pub const MAX_ID_BYTES: usize = 255;

/// Checks an event a local user wants to send (any type but `m.room.create`).
pub fn check_event(
    kind: &TimelineEventType,
    state_key: Option<&str>,
    content: &JsonValue,
    rules: &RoomVersionRules,
) -> Result<()> {
    let event_type = kind.to_string();
    if event_type.is_empty() || event_type.len() > MAX_ID_BYTES {
        return Err(Error::invalid_param(format!("Event types are 1 to {MAX_ID_BYTES} bytes long")));
    }
    if state_key.is_some_and(|k| k.len() > MAX_ID_BYTES) {
        return Err(Error::invalid_param(format!("State keys are at most {MAX_ID_BYTES} bytes long")));
    }
    let JsonValue::Object(content) = content else {
        return Err(Error::bad_json("The event content must be a JSON object"));
    };
    let content = Content { event_type: &event_type, map: content };
    match event_type.as_str() {
        "m.room.create" => return Err(Error::bad_json("A room has exactly one m.room.create event")),
        "m.room.join_rules" => check_join_rules(&content, rules)?,
        "m.room.power_levels" => check_power_levels(&content, rules)?,
        "m.room.member" => check_member(&content, state_key)?,
        "m.room.history_visibility" => {
            content.one_of("history_visibility", &["invited", "joined", "shared", "world_readable"])?;
        }
        "m.room.guest_access" => content.one_of("guest_access", &["can_join", "forbidden"])?,
        "m.room.name" => content.string("name", true)?,
        "m.room.topic" => content.string("topic", true)?,
        "m.room.avatar" => content.string("url", false)?,
        "m.room.encryption" => content.string("algorithm", true)?,
        _ => {}
    }
    Ok(())
}

/// Checks the content of a new room's `m.room.create` event.
pub fn check_create_content(content: &Map<String, JsonValue>, rules: &RoomVersionRules) -> Result<()> {
    let content = Content { event_type: "m.room.create", map: content };
    if let Some(federate) = content.map.get("m.federate")
        && !federate.is_boolean()
    {
        return Err(content.bad("m.federate", "must be true or false"));
    }
    content.string("type", false)?;
    if let Some(predecessor) = content.map.get("predecessor") {
        let room_id = predecessor.get("room_id").and_then(JsonValue::as_str);
        if room_id.is_none_or(|r| OwnedRoomId::try_from(r).is_err()) {
            return Err(content.bad("predecessor", "must be an object with the room_id of the old room"));
        }
    }
    if let Some(creators) = content.map.get("additional_creators") {
        if !rules.authorization.additional_room_creators {
            return Err(content.bad("additional_creators", "needs room version 12 or later"));
        }
        let valid = creators
            .as_array()
            .is_some_and(|list| list.iter().all(|c| c.as_str().is_some_and(|c| OwnedUserId::try_from(c).is_ok())));
        if !valid {
            return Err(content.bad("additional_creators", "must be a list of user ids"));
        }
    }
    Ok(())
}

/// The content of one event, for error messages that name the field.
struct Content<'a> {
    event_type: &'a str,
    map: &'a Map<String, JsonValue>,
}

impl Content<'_> {
    fn bad(&self, field: &str, why: &str) -> Error {
        Error::bad_json(format!("{}: `{field}` {why}", self.event_type))
    }

    /// `field` is a string (when present, or always when `required`).
    fn string(&self, field: &str, required: bool) -> Result<()> {
        match self.map.get(field) {
            Some(JsonValue::String(_)) => Ok(()),
            None if !required => Ok(()),
            _ => Err(self.bad(field, "must be a string")),
        }
    }

    /// `field` is one of `allowed`.
    fn one_of(&self, field: &str, allowed: &[&str]) -> Result<()> {
        match self.map.get(field).and_then(JsonValue::as_str) {
            Some(value) if allowed.contains(&value) => Ok(()),
            _ => Err(self.bad(field, &format!("must be one of {}", allowed.join(", ")))),
        }
    }

    /// `field`, when present, is a power level: an integer (or, before room version 10,
    /// a string holding one).
    fn power_level(&self, field: &str, value: &JsonValue, rules: &RoomVersionRules) -> Result<()> {
        let ok = match value {
            JsonValue::Number(n) => n.is_i64(),
            JsonValue::String(s) if !rules.authorization.integer_power_levels => s.trim().parse::<i64>().is_ok(),
            _ => false,
        };
        if ok { Ok(()) } else { Err(self.bad(field, "must hold integer power levels")) }
    }
}

fn check_join_rules(content: &Content<'_>, rules: &RoomVersionRules) -> Result<()> {
    let auth = &rules.authorization;
    let mut allowed = vec!["public", "invite", "private"];
    if auth.knocking {
        allowed.push("knock");
    }
    if auth.restricted_join_rule {
        allowed.push("restricted");
    }
    if auth.knock_restricted_join_rule {
        allowed.push("knock_restricted");
    }
    content.one_of("join_rule", &allowed)?;
    if let Some(allow) = content.map.get("allow") {
        let valid = allow.as_array().is_some_and(|conditions| {
            conditions.iter().all(|c| {
                c.get("type").and_then(JsonValue::as_str).is_some()
                    && c.get("room_id").is_none_or(|r| r.as_str().is_some_and(|r| OwnedRoomId::try_from(r).is_ok()))
            })
        });
        if !valid {
            return Err(content.bad("allow", "must be a list of conditions, each with a type"));
        }
    }
    Ok(())
}

fn check_power_levels(content: &Content<'_>, rules: &RoomVersionRules) -> Result<()> {
    for field in ["ban", "events_default", "invite", "kick", "redact", "state_default", "users_default"] {
        if let Some(value) = content.map.get(field) {
            content.power_level(field, value, rules)?;
        }
    }
    for field in ["events", "notifications", "users"] {
        let Some(value) = content.map.get(field) else { continue };
        let JsonValue::Object(map) = value else {
            return Err(content.bad(field, "must be an object"));
        };
        for (key, level) in map {
            content.power_level(field, level, rules)?;
            if field == "users" && OwnedUserId::try_from(key.as_str()).is_err() {
                return Err(content.bad("users", &format!("holds {key:?}, which is not a user id")));
            }
            if key.len() > MAX_ID_BYTES {
                return Err(content.bad(field, "holds a key longer than 255 bytes"));
            }
        }
    }
    Ok(())
}

fn check_member(content: &Content<'_>, state_key: Option<&str>) -> Result<()> {
    if state_key.is_none_or(|k| OwnedUserId::try_from(k).is_err()) {
        return Err(Error::bad_json("m.room.member: the state key must be a user id"));
    }
    content.one_of("membership", &["join", "invite", "leave", "ban", "knock"])?;
    for field in ["displayname", "avatar_url", "reason"] {
        match content.map.get(field) {
            None | Some(JsonValue::String(_) | JsonValue::Null) => {}
            Some(_) => return Err(content.bad(field, "must be a string")),
        }
    }
    if content.map.get("is_direct").is_some_and(|d| !d.is_boolean()) {
        return Err(content.bad("is_direct", "must be true or false"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use ruma::RoomVersionId;
    use serde_json::json;

    use super::*;

    fn check(kind: &str, state_key: &str, content: JsonValue, version: RoomVersionId) -> Result<()> {
        check_event(&TimelineEventType::from(kind), Some(state_key), &content, &version.rules().unwrap())
    }

    #[test]
    fn join_rules_and_history_visibility() {
        assert!(check("m.room.join_rules", "", json!({"join_rule": "invite"}), RoomVersionId::V12).is_ok());
        assert!(check("m.room.join_rules", "", json!({"join_rule": 5}), RoomVersionId::V12).is_err());
        assert!(check("m.room.join_rules", "", json!({"join_rule": "friends"}), RoomVersionId::V12).is_err());
        assert!(check("m.room.join_rules", "", json!({"join_rule": "knock"}), RoomVersionId::V6).is_err());
        assert!(check("m.room.join_rules", "", json!({"join_rule": "knock"}), RoomVersionId::V7).is_ok());
        let restricted =
            json!({"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": "!a:b"}]});
        assert!(check("m.room.join_rules", "", restricted, RoomVersionId::V9).is_ok());
        let bad_allow = json!({"join_rule": "restricted", "allow": "everyone"});
        assert!(check("m.room.join_rules", "", bad_allow, RoomVersionId::V9).is_err());
        assert!(
            check("m.room.history_visibility", "", json!({"history_visibility": "shared"}), RoomVersionId::V6).is_ok()
        );
        assert!(check("m.room.history_visibility", "", json!({"history_visibility": 1}), RoomVersionId::V6).is_err());
    }

    #[test]
    fn power_levels() {
        let good =
            json!({"ban": 50, "users": {"@a:b": 100}, "events": {"m.room.name": 50}, "notifications": {"room": 50}});
        assert!(check("m.room.power_levels", "", good, RoomVersionId::V12).is_ok());
        assert!(check("m.room.power_levels", "", json!({"ban": "50"}), RoomVersionId::V9).is_ok());
        assert!(check("m.room.power_levels", "", json!({"ban": "50"}), RoomVersionId::V10).is_err());
        assert!(check("m.room.power_levels", "", json!({"ban": 1.5}), RoomVersionId::V10).is_err());
        assert!(check("m.room.power_levels", "", json!({"users": {"alice": 100}}), RoomVersionId::V10).is_err());
        assert!(check("m.room.power_levels", "", json!({"users": []}), RoomVersionId::V10).is_err());
        assert!(
            check("m.room.power_levels", "", json!({"events": {"m.room.name": "high"}}), RoomVersionId::V10).is_err()
        );
    }

    #[test]
    fn members_types_and_sizes() {
        assert!(check("m.room.member", "@a:b", json!({"membership": "join"}), RoomVersionId::V12).is_ok());
        assert!(check("m.room.member", "@a:b", json!({"membership": "joined"}), RoomVersionId::V12).is_err());
        assert!(check("m.room.member", "a", json!({"membership": "join"}), RoomVersionId::V12).is_err());
        assert!(
            check("m.room.member", "@a:b", json!({"membership": "join", "displayname": 7}), RoomVersionId::V12)
                .is_err()
        );
        assert!(check("m.room.name", "", json!({"name": ["x"]}), RoomVersionId::V12).is_err());
        assert!(check(&"x".repeat(256), "", json!({}), RoomVersionId::V12).is_err());
        assert!(check(&"x".repeat(255), "", json!({}), RoomVersionId::V12).is_ok());
        assert!(check("m.custom", &"k".repeat(256), json!({}), RoomVersionId::V12).is_err());
        assert!(check("m.custom", "", json!([1]), RoomVersionId::V12).is_err());
    }

    #[test]
    fn create_content() {
        let v12 = RoomVersionId::V12.rules().unwrap();
        let v11 = RoomVersionId::V11.rules().unwrap();
        let map = |v: JsonValue| v.as_object().unwrap().clone();
        assert!(check_create_content(&map(json!({"m.federate": false})), &v12).is_ok());
        assert!(check_create_content(&map(json!({"m.federate": "no"})), &v12).is_err());
        assert!(check_create_content(&map(json!({"additional_creators": ["@a:b"]})), &v12).is_ok());
        assert!(check_create_content(&map(json!({"additional_creators": ["a"]})), &v12).is_err());
        assert!(check_create_content(&map(json!({"additional_creators": ["@a:b"]})), &v11).is_err());
        assert!(check_create_content(&map(json!({"predecessor": {"room_id": 3}})), &v12).is_err());
    }
}
