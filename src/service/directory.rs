//! The room directory and aliases, and the user directory.

use ruma::{OwnedRoomId, RoomAliasId, RoomId, UserId};
use serde_json::{Value as JsonValue, json};

use super::Services;
use crate::error::{Error, Result};

/// One entry of `publicRooms`.
pub struct PublicRoom {
    pub room_id: OwnedRoomId,
    pub joined: i64,
    pub name: Option<String>,
    pub topic: Option<String>,
    pub canonical_alias: Option<String>,
    pub avatar_url: Option<String>,
    pub world_readable: bool,
    pub guest_can_join: bool,
    pub join_rule: Option<String>,
}

impl Services {
    /// `PUT /directory/room/{alias}`.
    pub async fn create_alias(&self, user: &UserId, alias: &RoomAliasId, room_id: &RoomId) -> Result<()> {
        if alias.server_name() != self.server_name() {
            return Err(Error::invalid_param("Aliases of other servers cannot be created here"));
        }
        self.room_version(room_id).await?;
        self.require_joined(room_id, user).await?;
        self.store.create_room_alias(alias.as_str(), room_id.as_str(), user.as_str()).await
    }

    /// `GET /directory/room/{alias}`.
    pub async fn resolve_alias(&self, alias: &RoomAliasId) -> Result<OwnedRoomId> {
        let (room_id, _) = self
            .store
            .get_room_alias(alias.as_str())
            .await?
            .ok_or_else(|| Error::not_found(format!("No room has the alias {alias}")))?;
        OwnedRoomId::try_from(room_id).map_err(Error::internal)
    }

    /// `DELETE /directory/room/{alias}`: its creator, or a user with power to change
    /// the room's canonical alias.
    pub async fn delete_alias(&self, user: &UserId, alias: &RoomAliasId) -> Result<()> {
        let (room_id, creator) = self
            .store
            .get_room_alias(alias.as_str())
            .await?
            .ok_or_else(|| Error::not_found(format!("No room has the alias {alias}")))?;
        if creator != user.as_str() {
            let room_id = OwnedRoomId::try_from(room_id.as_str()).map_err(Error::internal)?;
            let (level, pl) = self.power_level(&room_id, user).await?;
            let needed = pl["events"]["m.room.canonical_alias"].as_i64().or(pl["state_default"].as_i64()).unwrap_or(50);
            if level < needed || self.membership(&room_id, user).await?.is_none_or(|m| m.membership != "join") {
                return Err(Error::forbidden("You may not remove this alias"));
            }
        }
        self.store.delete_room_alias(alias.as_str()).await?;
        Ok(())
    }

    /// `GET /rooms/{roomId}/aliases`: for members.
    pub async fn room_aliases(&self, user: &UserId, room_id: &RoomId) -> Result<Vec<String>> {
        self.require_joined(room_id, user).await?;
        self.store.get_aliases_of_room(room_id.as_str()).await
    }

    /// `PUT /directory/list/room/{roomId}`: who may publish: users with power to send
    /// `m.room.canonical_alias`.
    pub async fn set_room_visibility(&self, user: &UserId, room_id: &RoomId, public: bool) -> Result<()> {
        self.require_joined(room_id, user).await?;
        let (level, pl) = self.power_level(room_id, user).await?;
        let needed = pl["events"]["m.room.canonical_alias"].as_i64().or(pl["state_default"].as_i64()).unwrap_or(50);
        if level < needed {
            return Err(Error::forbidden("You may not change whether this room is published"));
        }
        self.store.set_room_published(room_id.as_str(), public).await
    }

    pub async fn room_visibility(&self, room_id: &RoomId) -> Result<bool> {
        self.store.is_room_published(room_id.as_str()).await?.ok_or_else(|| Error::not_found("Unknown room"))
    }

    /// `publicRooms`: published rooms, filtered by a search term, paged by offset.
    pub async fn public_rooms(
        &self,
        search: Option<&str>,
        since: Option<&str>,
        limit: Option<usize>,
    ) -> Result<(Vec<PublicRoom>, Option<String>, Option<String>, usize)> {
        let rooms = self.store.list_published_rooms().await?;
        let needle = search.map(str::to_lowercase).filter(|s| !s.is_empty());
        let mut matching = Vec::new();
        for (room_id, joined) in rooms {
            let room_id = OwnedRoomId::try_from(room_id).map_err(Error::internal)?;
            let entry = self.public_room_entry(&room_id, joined).await?;
            let text = format!(
                "{} {} {}",
                entry.name.as_deref().unwrap_or_default(),
                entry.topic.as_deref().unwrap_or_default(),
                entry.canonical_alias.as_deref().unwrap_or_default()
            )
            .to_lowercase();
            if needle.as_ref().is_none_or(|n| text.contains(n.as_str())) {
                matching.push(entry);
            }
        }
        let total = matching.len();
        let offset: usize = match since {
            Some(token) => {
                token.trim_start_matches('o').parse().map_err(|_| Error::invalid_param("Invalid since token"))?
            }
            None => 0,
        };
        let limit = limit.unwrap_or(100).clamp(1, 500);
        let page: Vec<PublicRoom> = matching.into_iter().skip(offset).take(limit).collect();
        let next = (offset + page.len() < total).then(|| format!("o{}", offset + page.len()));
        let prev = (offset > 0).then(|| format!("o{}", offset.saturating_sub(limit)));
        Ok((page, next, prev, total))
    }

    async fn public_room_entry(&self, room_id: &RoomId, joined: i64) -> Result<PublicRoom> {
        let state = self
            .store
            .get_current_state_events(
                room_id.as_str(),
                &[
                    "m.room.name",
                    "m.room.topic",
                    "m.room.canonical_alias",
                    "m.room.avatar",
                    "m.room.history_visibility",
                    "m.room.guest_access",
                    "m.room.join_rules",
                ],
            )
            .await?;
        let get = |t: &str, field: &str| -> Option<String> {
            state.iter().find(|e| e.event_type == t).and_then(|e| {
                serde_json::from_str::<JsonValue>(&e.json).ok()?["content"][field].as_str().map(str::to_owned)
            })
        };
        Ok(PublicRoom {
            room_id: room_id.to_owned(),
            joined,
            name: get("m.room.name", "name"),
            topic: get("m.room.topic", "topic"),
            canonical_alias: get("m.room.canonical_alias", "alias"),
            avatar_url: get("m.room.avatar", "url"),
            world_readable: get("m.room.history_visibility", "history_visibility").as_deref() == Some("world_readable"),
            guest_can_join: get("m.room.guest_access", "guest_access").as_deref() == Some("can_join"),
            join_rule: get("m.room.join_rules", "join_rule"),
        })
    }

    /// `user_directory/search`: users who share a room with the searcher or sit in a
    /// published room, whose id or display name contains the term.
    pub async fn search_users(&self, user: &UserId, term: &str, limit: usize) -> Result<(Vec<JsonValue>, bool)> {
        let limit = limit.clamp(1, 100);
        let rows = self.store.search_user_directory(user.as_str(), &term.to_lowercase(), (limit + 1) as i64).await?;
        let limited = rows.len() > limit;
        let results = rows
            .into_iter()
            .take(limit)
            .map(|(user_id, displayname, avatar_url)| {
                let mut entry = json!({"user_id": user_id});
                if let Some(d) = displayname {
                    entry["display_name"] = json!(d);
                }
                if let Some(a) = avatar_url {
                    entry["avatar_url"] = json!(a);
                }
                entry
            })
            .collect();
        Ok((results, limited))
    }
}
