//! The room directory and aliases, and the user directory.

use ruma::{OwnedRoomId, RoomAliasId, RoomId, UserId};
use serde_json::{Value as JsonValue, json};

use super::Services;
use crate::error::{Error, Result};

/// The longest search term of the room and user directories, in characters.
pub const MAX_SEARCH_TERM: usize = 256;

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

    /// `publicRooms`: published rooms, filtered by a search term, paged by offset in
    /// the database.
    pub async fn public_rooms(
        &self,
        search: Option<&str>,
        since: Option<&str>,
        limit: Option<usize>,
    ) -> Result<(Vec<PublicRoom>, Option<String>, Option<String>, usize)> {
        let needle = search.map(str::to_lowercase).filter(|s| !s.is_empty());
        if needle.as_ref().is_some_and(|n| n.chars().count() > MAX_SEARCH_TERM) {
            return Err(Error::invalid_param(format!("Search terms are at most {MAX_SEARCH_TERM} characters")));
        }
        let offset: usize = match since {
            Some(token) => {
                token.trim_start_matches('o').parse().map_err(|_| Error::invalid_param("Invalid since token"))?
            }
            None => 0,
        };
        let limit = limit.unwrap_or(100).clamp(1, 500);
        let (rows, total) = self.store.get_published_rooms(needle.as_deref(), offset as i64, limit as i64).await?;
        let total = total.max(0) as usize;
        let page = rows
            .into_iter()
            .map(|r| {
                Ok(PublicRoom {
                    room_id: OwnedRoomId::try_from(r.room_id).map_err(Error::internal)?,
                    joined: r.joined,
                    name: r.name,
                    topic: r.topic,
                    canonical_alias: r.canonical_alias,
                    avatar_url: r.avatar_url,
                    world_readable: r.history_visibility.as_deref() == Some("world_readable"),
                    guest_can_join: r.guest_access.as_deref() == Some("can_join"),
                    join_rule: r.join_rule,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let next = (offset + page.len() < total).then(|| format!("o{}", offset + page.len()));
        let prev = (offset > 0).then(|| format!("o{}", offset.saturating_sub(limit)));
        Ok((page, next, prev, total))
    }

    /// `user_directory/search`: users who share a room with the searcher or sit in a
    /// published room, whose id or display name contains the term.
    pub async fn search_users(&self, user: &UserId, term: &str, limit: usize) -> Result<(Vec<JsonValue>, bool)> {
        let limit = limit.clamp(1, 100);
        if term.chars().count() > MAX_SEARCH_TERM {
            return Err(Error::invalid_param(format!("Search terms are at most {MAX_SEARCH_TERM} characters")));
        }
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
