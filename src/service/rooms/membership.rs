//! Membership changes: join, invite, leave, kick, ban, unban, forget. Each is an
//! `m.room.member` event appended through `append_event`, so the room version's auth
//! rules decide who may do what.

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
        } else if matches!(membership.as_str(), "join" | "invite") {
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
            Some(m) if m.membership == "invite" && self.joined_local_members(room_id).await?.is_empty() => {
                // An invite to a room of another server: declined through the inviter's
                // server (it may be unreachable: the invite is declined here anyway).
                if let Some(invite) = self.store.get_event(&m.event_id).await?
                    && let Ok(inviter) = OwnedUserId::try_from(invite.sender)
                    && let Err(e) = self.leave_remote_room(room_id, user, inviter.server_name()).await
                {
                    tracing::info!(%room_id, error = %e, "could not tell the inviting server of a declined invite");
                }
                let stream_pos = self.store.decline_remote_invite(room_id.as_str(), user.as_str(), &m.event_id).await?;
                self.notifier.notify_users(&[user.to_owned()]);
                let event_id = ruma::OwnedEventId::try_from(m.event_id).map_err(Error::internal)?;
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
