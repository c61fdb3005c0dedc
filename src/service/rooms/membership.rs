//! Membership changes: join, knock, invite, leave, kick, ban, unban, forget. Each is an
//! `m.room.member` event appended through `append_event`, so the room version's auth
//! rules decide who may do what; in rooms this server is not in, joins, knocks and
//! leaves go through another server (`federation/`).

use ruma::{OwnedUserId, RoomId, UserId, events::TimelineEventType};
use serde_json::{Value as JsonValue, json};

use super::append::{Appended, LocalEvent};
use crate::{
    error::{Error, Result},
    service::Services,
};

impl Services {
    /// Appends an `m.room.member` event for `target`, sent by `sender`.
    pub async fn set_membership(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        target: &UserId,
        mut content: serde_json::Map<String, JsonValue>,
    ) -> Result<Appended> {
        let membership = content.get("membership").and_then(|m| m.as_str()).unwrap_or_default().to_owned();
        if target.server_name() != self.server_name() {
            match membership.as_str() {
                "invite" => {
                    let event_id = self.invite_remote_user(room_id, sender, target, content).await?;
                    let stored = self.store.get_event(event_id.as_str()).await?;
                    return Ok(Appended {
                        event_id,
                        room_id: room_id.to_owned(),
                        stream_pos: stored.map_or(0, |e| e.stream_ordering),
                    });
                }
                "join" => return Err(Error::forbidden("Users of other servers join through their own server")),
                // Kicks, bans and unbans are events of this room like any other; the
                // user's server hears of them.
                _ => {}
            }
        } else if matches!(membership.as_str(), "join" | "invite" | "knock") {
            // Members carry their profile in the room, as clients expect.
            if let Some(profile) = self.store.get_profile(target.as_str()).await? {
                for field in ["displayname", "avatar_url"] {
                    if let Some(value) = profile.get(field) {
                        content.entry(field.to_owned()).or_insert_with(|| value.clone());
                    }
                }
            } else {
                return Err(Error::not_found(format!("No user {target} on this server")));
            }
        }
        self.append_event(
            room_id,
            LocalEvent {
                sender,
                kind: TimelineEventType::RoomMember,
                state_key: Some(target.to_string()),
                content: JsonValue::Object(content),
                txn: None,
                redacts: None,
            },
        )
        .await
    }

    pub async fn join_room(&self, room_id: &RoomId, user: &UserId, reason: Option<String>) -> Result<Appended> {
        self.room_version(room_id).await?;
        let mut content = membership_content("join", reason);
        if let Some(current) = self.membership(room_id, user).await?
            && current.membership == "join"
        {
            // Joining again is allowed; it refreshes the profile in the room.
            content.insert("membership".into(), json!("join"));
        }
        // A restricted room: a member here with the power to invite vouches for the join.
        if let Some(via) = self.restricted_join_authoriser(room_id, user).await? {
            content.insert(super::restricted::AUTHORISED_VIA.into(), json!(via));
        }
        self.set_membership(room_id, user, user, content).await
    }

    /// Joins `user` to a room: here when a local user is in it, else through another
    /// server (`via`, the room id's server, the server of whoever invited the user), one
    /// such join per room at a time.
    pub async fn join_room_via(
        &self,
        room_id: &RoomId,
        user: &UserId,
        reason: Option<String>,
        via: &[ruma::OwnedServerName],
    ) -> Result<()> {
        // One remote join per room at a time: a user who asks while another local user's
        // join is under way waits for it, and then joins here. (Two send_joins at once
        // would each set the room's state from their own answer.)
        let _joining = self.remote_joins.lock(room_id).await;
        let known = self.room_version(room_id).await.is_ok();
        if known && !self.joined_local_members(room_id).await?.is_empty() {
            self.join_room(room_id, user, reason).await?;
            return Ok(());
        }
        let mut servers = via.to_vec();
        if let Some(current) = self.membership(room_id, user).await?
            && current.membership == "invite"
            && let Some(invite) = self.store.get_event(&current.event_id).await?
            && let Ok(inviter) = OwnedUserId::try_from(invite.sender)
        {
            servers.push(inviter.server_name().to_owned());
        }
        let servers = crate::service::federation::membership::join_candidates(room_id, &servers);
        self.join_remote_room(room_id, user, &servers, reason).await?;
        Ok(())
    }

    /// Knocks on a room for `user` (asks to be invited): here when a local user is in
    /// it, else through another server (`via`, the room id's server). Who is joined,
    /// invited or banned cannot knock; the join rules must allow knocking (`knock`, or
    /// `knock_restricted` in room versions 10 and later), which the auth rules check.
    pub async fn knock_room_via(
        &self,
        room_id: &RoomId,
        user: &UserId,
        reason: Option<String>,
        via: &[ruma::OwnedServerName],
    ) -> Result<()> {
        if let Some(current) = self.membership(room_id, user).await? {
            match current.membership.as_str() {
                "join" => return Err(Error::forbidden("You are already in this room")),
                "invite" => return Err(Error::forbidden("You are already invited to this room: join it")),
                "ban" => return Err(Error::forbidden("You are banned from this room")),
                _ => {}
            }
        }
        if self.is_out_of_band(room_id).await? {
            let servers = crate::service::federation::membership::join_candidates(room_id, via);
            self.knock_remote_room(room_id, user, &servers, reason).await?;
            return Ok(());
        }
        let version = self.room_version(room_id).await?;
        if !super::append::rules_for(&version)?.authorization.knocking {
            return Err(Error::forbidden(format!("Room version {version} does not allow knocking")));
        }
        self.set_membership(room_id, user, user, membership_content("knock", reason)).await?;
        Ok(())
    }

    pub async fn invite(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        target: &UserId,
        reason: Option<String>,
        is_direct: bool,
    ) -> Result<Appended> {
        if let Some(current) = self.membership(room_id, target).await? {
            match current.membership.as_str() {
                "join" => return Err(Error::forbidden(format!("{target} is already in the room"))),
                "ban" => return Err(Error::forbidden(format!("{target} is banned from the room"))),
                _ => {}
            }
        }
        let mut content = membership_content("invite", reason);
        if is_direct {
            content.insert("is_direct".into(), json!(true));
        }
        self.set_membership(room_id, sender, target, content).await
    }

    pub async fn leave_room(&self, room_id: &RoomId, user: &UserId, reason: Option<String>) -> Result<Appended> {
        match self.membership(room_id, user).await? {
            Some(m) if matches!(m.membership.as_str(), "invite" | "knock") && self.is_out_of_band(room_id).await? => {
                // An invite to, or a knock on, a room of another server: declined or
                // retracted through a server of the room.
                let (event_id, stream_pos) = self.leave_out_of_band(room_id, user, &m, reason).await?;
                return Ok(Appended { event_id, room_id: room_id.to_owned(), stream_pos });
            }
            Some(m) if matches!(m.membership.as_str(), "join" | "invite" | "knock") => {}
            _ => return Err(Error::forbidden("You are not in this room")),
        }
        self.set_membership(room_id, user, user, membership_content("leave", reason)).await
    }

    pub async fn kick(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        target: &UserId,
        reason: Option<String>,
    ) -> Result<Appended> {
        match self.membership(room_id, target).await? {
            Some(m) if matches!(m.membership.as_str(), "join" | "invite" | "knock") => {}
            _ => return Err(Error::forbidden(format!("{target} is not in the room"))),
        }
        self.set_membership(room_id, sender, target, membership_content("leave", reason)).await
    }

    pub async fn ban(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        target: &UserId,
        reason: Option<String>,
    ) -> Result<Appended> {
        self.set_membership(room_id, sender, target, membership_content("ban", reason)).await
    }

    pub async fn unban(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        target: &UserId,
        reason: Option<String>,
    ) -> Result<Appended> {
        match self.membership(room_id, target).await? {
            Some(m) if m.membership == "ban" => {}
            _ => return Err(Error::forbidden(format!("{target} is not banned"))),
        }
        self.set_membership(room_id, sender, target, membership_content("leave", reason)).await
    }

    /// `POST /rooms/{roomId}/forget`: only after leaving.
    pub async fn forget_room(&self, room_id: &RoomId, user: &UserId) -> Result<()> {
        match self.membership(room_id, user).await? {
            Some(m) if matches!(m.membership.as_str(), "join" | "invite" | "knock") => {
                Err(Error::unknown(axum::http::StatusCode::BAD_REQUEST, "Leave the room before forgetting it"))
            }
            Some(_) => self.store.forget_room(room_id.as_str(), user.as_str()).await,
            None => Err(Error::not_found("You were never in this room")),
        }
    }

    /// Rooms the user is joined to.
    pub async fn joined_rooms(&self, user: &UserId) -> Result<Vec<ruma::OwnedRoomId>> {
        Ok(self
            .store
            .get_user_memberships(user.as_str())
            .await?
            .into_iter()
            .filter(|m| m.membership == "join")
            .filter_map(|m| ruma::OwnedRoomId::try_from(m.room_id).ok())
            .collect())
    }

    /// Parses a user id from a path or body, `M_INVALID_PARAM` if bad.
    pub fn parse_user_id(user: &str) -> Result<OwnedUserId> {
        OwnedUserId::try_from(user).map_err(|e| Error::invalid_param(format!("Invalid user id: {e}")))
    }
}

fn membership_content(membership: &str, reason: Option<String>) -> serde_json::Map<String, JsonValue> {
    let mut content = serde_json::Map::new();
    content.insert("membership".into(), json!(membership));
    if let Some(reason) = reason {
        content.insert("reason".into(), json!(reason));
    }
    content
}
