//! `createRoom`: the create event, the creator's join, power levels, presets, alias,
//! initial state, name, topic and invites, in the order the spec gives.

use ruma::{OwnedRoomAliasId, OwnedRoomId, OwnedUserId, RoomAliasId, RoomVersionId, UserId, events::TimelineEventType};
use serde_json::{Map, Value as JsonValue, json};

use super::append::{LocalEvent, rules_for};
use crate::{
    error::{Error, Result},
    service::{Services, rooms_supported},
};

/// `createRoom`, as the service sees it.
#[derive(Default)]
pub struct CreateRoom {
    pub preset: Option<String>,
    pub public: bool,
    pub name: Option<String>,
    pub topic: Option<String>,
    pub room_alias_name: Option<String>,
    pub invite: Vec<OwnedUserId>,
    pub is_direct: bool,
    /// (type, state key, content) of `initial_state`.
    pub initial_state: Vec<(String, String, JsonValue)>,
    pub power_level_content_override: Option<Map<String, JsonValue>>,
    pub creation_content: Option<Map<String, JsonValue>>,
    pub room_version: Option<RoomVersionId>,
}

impl Services {
    pub async fn create_room(&self, creator: &UserId, req: CreateRoom) -> Result<OwnedRoomId> {
        let version = req.room_version.clone().unwrap_or_else(|| self.config.rooms.default_room_version.clone());
        if !rooms_supported(&version) {
            return Err(Error::matrix(
                axum::http::StatusCode::BAD_REQUEST,
                ruma::api::error::ErrorKind::UnsupportedRoomVersion,
                format!("Room version {version} is not supported; use 6 to 12"),
            ));
        }
        let rules = rules_for(&version)?;
        let preset = match req.preset.as_deref() {
            Some(p @ ("private_chat" | "public_chat" | "trusted_private_chat")) => p.to_owned(),
            Some(other) => return Err(Error::bad_json(format!("Unknown preset {other}"))),
            None if req.public => "public_chat".into(),
            None => "private_chat".into(),
        };
        let alias = match &req.room_alias_name {
            Some(name) => Some(self.check_new_alias(name).await?),
            None => None,
        };
        for invitee in &req.invite {
            if invitee.server_name() == self.server_name() && !self.store.user_exists(invitee.as_str()).await? {
                return Err(Error::not_found(format!("No user {invitee} on this server")));
            }
        }
        let trusted = preset == "trusted_private_chat";
        let creators_are_special = rules.authorization.explicitly_privilege_room_creators;

        // The create event.
        let mut create = req.creation_content.clone().unwrap_or_default();
        create.insert("room_version".into(), json!(version.as_str()));
        if !rules.authorization.use_room_create_sender {
            create.insert("creator".into(), json!(creator));
        } else {
            create.remove("creator");
        }
        if creators_are_special && trusted && !req.invite.is_empty() {
            create.insert("additional_creators".into(), json!(req.invite));
        }
        let room_id = self.append_create_event(creator, &version, JsonValue::Object(create)).await?.room_id;

        // The creator joins.
        self.set_membership(&room_id, creator, creator, membership("join")).await?;

        // Power levels: defaults, the preset, then the client's override.
        let mut users = Map::new();
        if !creators_are_special {
            users.insert(creator.to_string(), json!(100));
            if trusted {
                for invitee in &req.invite {
                    users.insert(invitee.to_string(), json!(100));
                }
            }
        }
        let mut power_levels = json!({
            "users": users,
            "users_default": 0,
            "events": {
                "m.room.name": 50, "m.room.avatar": 50, "m.room.topic": 50, "m.room.canonical_alias": 50,
                "m.room.power_levels": 100, "m.room.history_visibility": 100, "m.room.tombstone": 100,
                "m.room.server_acl": 100, "m.room.encryption": 100,
            },
            "events_default": 0,
            "state_default": 50,
            "ban": 50, "kick": 50, "redact": 50, "invite": 0,
            "notifications": {"room": 50},
        });
        if let Some(overrides) = &req.power_level_content_override {
            for (key, value) in overrides {
                power_levels[key] = value.clone();
            }
        }

        let mut state: Vec<(String, String, JsonValue)> =
            vec![("m.room.power_levels".into(), String::new(), power_levels)];
        if let Some(alias) = &alias {
            state.push(("m.room.canonical_alias".into(), String::new(), json!({"alias": alias})));
        }
        let join_rule = if preset == "public_chat" { "public" } else { "invite" };
        state.push(("m.room.join_rules".into(), String::new(), json!({"join_rule": join_rule})));
        state.push(("m.room.history_visibility".into(), String::new(), json!({"history_visibility": "shared"})));
        let guest_access = if preset == "public_chat" { "forbidden" } else { "can_join" };
        state.push(("m.room.guest_access".into(), String::new(), json!({"guest_access": guest_access})));
        for (event_type, state_key, content) in req.initial_state {
            if matches!(event_type.as_str(), "m.room.create" | "m.room.member") {
                return Err(Error::bad_json(format!("initial_state cannot contain {event_type}")));
            }
            upsert(&mut state, event_type, state_key, content);
        }
        if let Some(name) = req.name {
            upsert(&mut state, "m.room.name".into(), String::new(), json!({"name": name}));
        }
        if let Some(topic) = req.topic {
            upsert(&mut state, "m.room.topic".into(), String::new(), json!({"topic": topic}));
        }
        for (event_type, state_key, content) in state {
            self.append_event(
                &room_id,
                LocalEvent {
                    sender: creator,
                    kind: TimelineEventType::from(event_type.as_str()),
                    state_key: Some(state_key),
                    content,
                    txn: None,
                    redacts: None,
                },
            )
            .await?;
        }
        if let Some(alias) = &alias {
            self.store.create_room_alias(alias.as_str(), room_id.as_str(), creator.as_str()).await?;
        }
        if req.public {
            self.store.set_room_published(room_id.as_str(), true).await?;
        }
        for invitee in &req.invite {
            self.invite(&room_id, creator, invitee, None, req.is_direct).await?;
        }
        tracing::info!(room_id = %room_id, creator = %creator, version = %version, "created a room");
        Ok(room_id)
    }

    /// Checks that `#name:server` is free; `M_ROOM_IN_USE` if not.
    pub async fn check_new_alias(&self, localpart: &str) -> Result<OwnedRoomAliasId> {
        if localpart.is_empty() || localpart.contains(':') || localpart.chars().any(char::is_whitespace) {
            return Err(Error::invalid_param("An alias name may not be empty, nor contain ':' or spaces"));
        }
        let alias = RoomAliasId::parse(format!("#{localpart}:{}", self.server_name()))
            .map_err(|e| Error::invalid_param(format!("Invalid alias: {e}")))?;
        if self.store.get_room_alias(alias.as_str()).await?.is_some() {
            return Err(Error::matrix(
                axum::http::StatusCode::BAD_REQUEST,
                ruma::api::error::ErrorKind::RoomInUse,
                format!("The alias {alias} is taken"),
            ));
        }
        Ok(alias)
    }
}

fn membership(m: &str) -> Map<String, JsonValue> {
    let mut content = Map::new();
    content.insert("membership".into(), json!(m));
    content
}

fn upsert(state: &mut Vec<(String, String, JsonValue)>, event_type: String, state_key: String, content: JsonValue) {
    match state.iter_mut().find(|(t, k, _)| *t == event_type && *k == state_key) {
        Some(entry) => entry.2 = content,
        None => state.push((event_type, state_key, content)),
    }
}
