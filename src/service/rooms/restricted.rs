//! Restricted joins: under the join rule `restricted` (room versions 8 and later) or
//! `knock_restricted` (10 and later), a user who is not invited may join when they are
//! joined to one of the rooms the rule allows (`m.room_membership`). Such a join names
//! a member of this server with the power to invite (`join_authorised_via_users_server`),
//! whose server signs it; the auth rules (ruma's) check the rest. This server vouches
//! for local users' joins, and, as the resident server, for other servers' users
//! (`make_join`, `send_join`) when it can see their membership in an allowed room.

use axum::http::StatusCode;
use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId, api::error::ErrorKind};
use serde_json::Value as JsonValue;

use super::append::rules_for;
use crate::{
    error::{Error, Result},
    service::Services,
};

/// The content key naming who vouches for a restricted join.
pub const AUTHORISED_VIA: &str = "join_authorised_via_users_server";

impl Services {
    /// Who of this server vouches for `user`'s join of `room_id`: `None` when the join
    /// needs nobody (the rule is not restricted, or the user is invited or joined).
    /// Refusals: `M_FORBIDDEN` when the user is in none of the allowed rooms this server
    /// knows; `400 M_UNABLE_TO_AUTHORISE_JOIN` when this server knows none of them (ask
    /// another); `400 M_UNABLE_TO_GRANT_JOIN` when no member here may invite.
    pub async fn restricted_join_authoriser(&self, room_id: &RoomId, user: &UserId) -> Result<Option<OwnedUserId>> {
        let rules = rules_for(&self.room_version(room_id).await?)?;
        let Some(event) = self.store.get_current_state_event(room_id.as_str(), "m.room.join_rules", "").await? else {
            return Ok(None);
        };
        let json: JsonValue = serde_json::from_str(&event.json).map_err(Error::internal)?;
        let content = &json["content"];
        let restricted = match content["join_rule"].as_str() {
            Some("restricted") => rules.authorization.restricted_join_rule,
            Some("knock_restricted") => rules.authorization.knock_restricted_join_rule,
            _ => false,
        };
        if !restricted {
            return Ok(None);
        }
        if self.membership(room_id, user).await?.is_some_and(|m| matches!(m.membership.as_str(), "invite" | "join")) {
            return Ok(None);
        }
        let allowed: Vec<OwnedRoomId> = content["allow"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["type"] == "m.room_membership")
            .filter_map(|a| a["room_id"].as_str().and_then(|r| OwnedRoomId::try_from(r).ok()))
            .collect();
        let mut known = false;
        let mut member = false;
        for room in &allowed {
            // This server sees who is in a room only when one of its users is.
            if self.is_out_of_band(room).await? {
                continue;
            }
            known = true;
            if self.membership(room, user).await?.is_some_and(|m| m.membership == "join") {
                member = true;
                break;
            }
        }
        if !member {
            return Err(if known || user.server_name() == self.server_name() {
                Error::forbidden("You are not in any of the rooms whose members may join this room")
            } else {
                Error::matrix(
                    StatusCode::BAD_REQUEST,
                    ErrorKind::UnableToAuthorizeJoin,
                    "This server is in none of the rooms whose members may join: ask another",
                )
            });
        }
        let (_, levels) = self.power_level(room_id, user).await?;
        let invite_level = levels["invite"].as_i64().unwrap_or(0);
        for local in self.joined_local_members(room_id).await?.iter() {
            if self.power_level(room_id, local).await?.0 >= invite_level {
                return Ok(Some(local.clone()));
            }
        }
        Err(Error::matrix(
            StatusCode::BAD_REQUEST,
            ErrorKind::UnableToGrantJoin,
            "No member of this server may invite to this room: ask another",
        ))
    }
}
