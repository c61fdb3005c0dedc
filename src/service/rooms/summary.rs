//! Room summaries (`GET /v1/room_summary/{roomIdOrAlias}`, MSC3266's unstable path
//! too): name, topic, avatar, alias, type, members, join rule, history, guest access,
//! encryption and version of a room this server is in, for users who are in it (joined,
//! invited, knocking) or who could join or read it (public, knock, a restricted room
//! through an allowed room, world-readable history). Unauthenticated callers see only
//! public, knockable and world-readable rooms. Others, and rooms this server is not in,
//! are `404 M_NOT_FOUND` (no summaries asked over federation yet).

use ruma::{
    OwnedRoomId, RoomOrAliasId, UserId,
    events::room::member::MembershipState,
    room::{JoinRule, JoinRuleSummary, RoomSummary},
};
use serde_json::Value as JsonValue;

use crate::{
    error::{Error, Result},
    service::Services,
};

impl Services {
    /// The summary of a room, and the caller's membership in it when authenticated.
    pub async fn room_summary_for(
        &self,
        user: Option<&UserId>,
        room: &RoomOrAliasId,
    ) -> Result<(RoomSummary, Option<MembershipState>)> {
        let not_found = || Error::not_found("No such room, or you may not see its summary");
        let room_id: OwnedRoomId = match <&ruma::RoomId>::try_from(room) {
            Ok(id) => id.to_owned(),
            Err(alias) => self.resolve_alias(alias).await.map_err(|_| not_found())?,
        };
        let state = self
            .store
            .get_current_state_events(
                room_id.as_str(),
                &[
                    "m.room.create",
                    "m.room.name",
                    "m.room.topic",
                    "m.room.avatar",
                    "m.room.canonical_alias",
                    "m.room.join_rules",
                    "m.room.history_visibility",
                    "m.room.guest_access",
                    "m.room.encryption",
                ],
            )
            .await?;
        let content = |event_type: &str| -> JsonValue {
            state
                .iter()
                .find(|e| e.event_type == event_type && e.state_key.as_deref() == Some(""))
                .and_then(|e| serde_json::from_str::<JsonValue>(&e.json).ok())
                .map(|mut pdu| pdu["content"].take())
                .unwrap_or(JsonValue::Null)
        };
        let create = content("m.room.create");
        if create.is_null() {
            return Err(not_found());
        }
        let join_rule: JoinRuleSummary = serde_json::from_value::<JoinRule>(content("m.room.join_rules"))
            .map(JoinRuleSummary::from)
            .unwrap_or(JoinRuleSummary::Invite);
        let world_readable = content("m.room.history_visibility")["history_visibility"] == "world_readable";
        let membership = match user {
            Some(user) => Some(
                self.store
                    .get_membership(room_id.as_str(), user.as_str())
                    .await?
                    .map_or(MembershipState::Leave, |m| MembershipState::from(m.membership.as_str())),
            ),
            None => None,
        };
        let open = world_readable
            || matches!(
                join_rule,
                JoinRuleSummary::Public | JoinRuleSummary::Knock | JoinRuleSummary::KnockRestricted(_)
            );
        let member =
            matches!(membership, Some(MembershipState::Join | MembershipState::Invite | MembershipState::Knock));
        let mut allowed = open || member;
        if !allowed && let (Some(user), JoinRuleSummary::Restricted(r)) = (user, &join_rule) {
            for allowed_room in &r.allowed_room_ids {
                let m = self.store.get_membership(allowed_room.as_str(), user.as_str()).await?;
                if m.is_some_and(|m| m.membership == "join") {
                    allowed = true;
                    break;
                }
            }
        }
        if !allowed {
            return Err(not_found());
        }
        let (joined, _) = self.store.count_room_members(room_id.as_str()).await?;
        let guest_can_join = content("m.room.guest_access")["guest_access"] == "can_join";
        let mut summary = RoomSummary::new(
            room_id.clone(),
            join_rule,
            guest_can_join,
            ruma::UInt::try_from(joined.max(0) as u64).unwrap_or_default(),
            world_readable,
        );
        let text = |v: &JsonValue| v.as_str().filter(|s| !s.is_empty()).map(str::to_owned);
        summary.name = text(&content("m.room.name")["name"]);
        summary.topic = text(&content("m.room.topic")["topic"]);
        summary.avatar_url = text(&content("m.room.avatar")["url"]).map(Into::into);
        summary.canonical_alias =
            text(&content("m.room.canonical_alias")["alias"]).and_then(|a| ruma::OwnedRoomAliasId::try_from(a).ok());
        summary.room_type = text(&create["type"]).map(|t| ruma::room::RoomType::from(t.as_str()));
        summary.encryption = text(&content("m.room.encryption")["algorithm"]).map(|a| a.as_str().into());
        summary.room_version = Some(self.room_version(&room_id).await?);
        Ok((summary, membership))
    }
}
