//! Room upgrades (`POST /rooms/{roomId}/upgrade`): a new room of the requested version
//! whose create event names its predecessor, with the old room's transferable state
//! (name, topic, avatar, join rules, history visibility, guest access, encryption,
//! server ACL, power levels with the users' levels) and bans; the old room's local
//! aliases, canonical alias and directory listing move over; a tombstone ends the old
//! room, whose power levels are then raised so that only moderators can talk. Upgrades
//! of one room run one at a time; once a room is tombstoned, upgrading it again answers
//! its replacement.

use ruma::{OwnedRoomId, RoomId, RoomVersionId, UserId};
use serde_json::{Map, Value as JsonValue, json};

use super::{append::rules_for, create::CreateRoom};
use crate::{
    error::{Error, Result},
    service::{Services, rooms_supported},
};

/// The state events copied to the new room, besides power levels.
const TRANSFERRED: [&str; 8] = [
    "m.room.server_acl",
    "m.room.encryption",
    "m.room.name",
    "m.room.avatar",
    "m.room.topic",
    "m.room.guest_access",
    "m.room.history_visibility",
    "m.room.join_rules",
];

fn content_of(json: &str) -> Result<JsonValue> {
    Ok(serde_json::from_str::<JsonValue>(json).map_err(Error::internal)?["content"].take())
}

impl Services {
    /// Upgrades a room; returns the new room's id.
    pub async fn upgrade_room(
        &self,
        user: &UserId,
        old_room: &RoomId,
        new_version: &RoomVersionId,
        additional_creators: &[ruma::OwnedUserId],
    ) -> Result<OwnedRoomId> {
        if !rooms_supported(new_version) {
            return Err(Error::matrix(
                axum::http::StatusCode::BAD_REQUEST,
                ruma::api::error::ErrorKind::UnsupportedRoomVersion,
                format!("Room version {new_version} is not supported; use 6 to 12"),
            ));
        }
        let membership = self.store.get_membership(old_room.as_str(), user.as_str()).await?;
        if membership.is_none_or(|m| m.membership != "join") {
            return Err(Error::forbidden("You are not in this room"));
        }
        // One upgrade of a room at a time; a room already upgraded answers the room
        // that replaced it (upgrades sent at once make one new room).
        let _upgrading = self.upgrades.lock(old_room).await;
        if let Some(tombstone) =
            self.store.get_current_state_events(old_room.as_str(), &["m.room.tombstone"]).await?.first()
            && let Some(replacement) = content_of(&tombstone.json)?["replacement_room"].as_str()
        {
            return OwnedRoomId::try_from(replacement).map_err(Error::internal);
        }
        // The power to send the tombstone, checked up front (the tombstone itself is
        // sent last, and the auth rules check it again then).
        let (level, power_levels) = self.power_level(old_room, user).await?;
        let needed = power_levels["events"]["m.room.tombstone"]
            .as_i64()
            .or_else(|| power_levels["state_default"].as_i64())
            .unwrap_or(50);
        if level < needed {
            return Err(Error::forbidden(
                "You may not upgrade this room (it takes the power to send m.room.tombstone)",
            ));
        }
        let new_rules = rules_for(new_version)?;
        let old_state = self
            .store
            .get_current_state_events(
                old_room.as_str(),
                &["m.room.create", "m.room.power_levels", "m.room.canonical_alias", "m.room.member"],
            )
            .await?;
        let mut create = Map::new();
        let mut canonical_alias = None;
        let mut banned = Vec::new();
        for event in &old_state {
            match event.event_type.as_str() {
                "m.room.create" => {
                    let old_create = content_of(&event.json)?;
                    if let Some(room_type) = old_create.get("type") {
                        create.insert("type".into(), room_type.clone());
                    }
                    let mut predecessor = json!({ "room_id": old_room });
                    predecessor["event_id"] = json!(self.last_event_id(old_room).await?);
                    create.insert("predecessor".into(), predecessor);
                }
                "m.room.canonical_alias" => canonical_alias = Some(content_of(&event.json)?),
                "m.room.member" if membership_is(&event.json, "ban") => {
                    if let Some(target) = event.state_key.as_deref().and_then(|k| ruma::OwnedUserId::try_from(k).ok()) {
                        banned.push(target);
                    }
                }
                _ => {}
            }
        }
        if new_rules.authorization.explicitly_privilege_room_creators && !additional_creators.is_empty() {
            create.insert("additional_creators".into(), json!(additional_creators));
        }
        let mut initial_state = Vec::new();
        for event in self.store.get_current_state_events(old_room.as_str(), &TRANSFERRED).await? {
            if event.state_key.as_deref() == Some("") {
                initial_state.push((event.event_type.clone(), String::new(), content_of(&event.json)?));
            }
        }
        // The users' levels come along; the upgrading user needs to stay able to manage
        // the new room: in versions whose creators rank above everyone they are left out
        // of `users` (the auth rules refuse them there), elsewhere at least 100.
        let mut new_levels = power_levels.as_object().cloned().unwrap_or_default();
        let mut users = new_levels.get("users").and_then(|u| u.as_object()).cloned().unwrap_or_default();
        if new_rules.authorization.explicitly_privilege_room_creators {
            users.remove(user.as_str());
            for creator in additional_creators {
                users.remove(creator.as_str());
            }
        } else {
            let kept = users.get(user.as_str()).and_then(|l| l.as_i64()).unwrap_or(0);
            users.insert(user.to_string(), json!(kept.clamp(100, i64::MAX)));
        }
        new_levels.insert("users".into(), JsonValue::Object(users));
        let request = CreateRoom {
            preset: Some("private_chat".into()),
            initial_state,
            power_level_content_override: Some(new_levels),
            creation_content: Some(create),
            room_version: Some(new_version.clone()),
            ..CreateRoom::default()
        };
        let new_room = self.create_room(user, request).await?;
        for target in &banned {
            if let Err(e) = self.ban(&new_room, user, target, None).await {
                tracing::warn!(room_id = %new_room, user = %target, error = %e, "could not carry a ban over to the upgraded room");
            }
        }
        // Aliases and the directory listing move to the new room.
        self.store.move_room_aliases(old_room.as_str(), new_room.as_str()).await?;
        if let Some(content) = canonical_alias.filter(|c| c.as_object().is_some_and(|o| !o.is_empty())) {
            self.send_state(&new_room, user, "m.room.canonical_alias", "", content).await?;
            self.send_state(old_room, user, "m.room.canonical_alias", "", json!({})).await?;
        }
        if self.store.is_room_published(old_room.as_str()).await? == Some(true) {
            self.store.set_room_published(new_room.as_str(), true).await?;
            self.store.set_room_published(old_room.as_str(), false).await?;
        }
        self.send_state(
            old_room,
            user,
            "m.room.tombstone",
            "",
            json!({ "body": "This room has been replaced", "replacement_room": new_room }),
        )
        .await?;
        // Only moderators can talk in the old room, and nobody new is invited.
        let mut restricted = power_levels.as_object().cloned().unwrap_or_default();
        let users_default = power_levels["users_default"].as_i64().unwrap_or(0);
        let moderator = 50.max(users_default.saturating_add(1));
        restricted.insert("events_default".into(), json!(moderator));
        restricted.insert("invite".into(), json!(moderator));
        if let Err(e) = self.send_state(old_room, user, "m.room.power_levels", "", JsonValue::Object(restricted)).await
        {
            // The upgrade is done; a user who may tombstone but not change power levels
            // leaves the old room's levels as they were.
            tracing::info!(room_id = %old_room, error = %e, "could not restrict the old room's power levels");
        }
        tracing::info!(old = %old_room, new = %new_room, version = %new_version, "upgraded a room");
        Ok(new_room)
    }

    /// The id of a room's newest event (the predecessor's last event, as the create event
    /// of its replacement names it).
    async fn last_event_id(&self, room_id: &RoomId) -> Result<String> {
        let head = self.store.get_room_head(room_id.as_str()).await?;
        head.into_iter()
            .max_by_key(|(_, depth, _)| *depth)
            .map(|(id, _, _)| id)
            .ok_or_else(|| Error::internal("a room without events"))
    }
}

fn membership_is(json: &str, membership: &str) -> bool {
    content_of(json).is_ok_and(|c| c["membership"] == membership)
}
