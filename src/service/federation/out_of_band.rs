//! Memberships of local users in rooms this server is not in ("out of band": no state
//! of the room is here to place them in). An invite received, a knock sent, a declined
//! invite or retracted knock, and a refused knock or rescinded invite (a kick or ban
//! another server sends us through `/send`) are each kept as an outlier with the
//! user's membership and, for invites and knocks, the stripped state that came along,
//! which `/sync` shows. Nothing here judges the room's auth rules: the resident
//! servers did; this server only checks who signed.

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, OwnedServerName, OwnedUserId, RoomId, RoomVersionId,
    ServerName, UserId, api::federation::membership::RawStrippedState, signatures::Verified,
};
use serde_json::{Value as JsonValue, json};

use crate::{
    error::{Error, Result},
    service::{Services, now_ms, rooms::append::rules_for},
    storage::{MembershipRow, RemoteMembership},
};

/// Most stripped state events kept with an invite or a knock.
const MAX_STRIPPED_STATE: usize = 50;

fn integer(object: &CanonicalJsonObject, key: &str) -> Option<i64> {
    match object.get(key) {
        Some(CanonicalJsonValue::Integer(i)) => Some(i64::from(*i)),
        _ => None,
    }
}

fn field<'a>(object: &'a CanonicalJsonObject, key: &str) -> Option<&'a str> {
    object.get(key).and_then(|v| v.as_str())
}

/// A stripped state event (`type`, `state_key`, `sender`, `content`) from what another
/// server sent about `room_id`: a full PDU (since Matrix 1.16) or already stripped.
/// A PDU of another room is left out.
pub(crate) fn stripped(room_id: &RoomId, state: &RawStrippedState) -> Option<JsonValue> {
    let (raw, pdu) = match state {
        RawStrippedState::Pdu(pdu) => (pdu.get(), true),
        #[allow(deprecated)]
        RawStrippedState::Stripped(event) => (event.json().get(), false),
        _ => return None,
    };
    let value: JsonValue = serde_json::from_str(raw).ok()?;
    if pdu && value.get("room_id").and_then(|r| r.as_str()).is_some_and(|r| r != room_id.as_str()) {
        return None;
    }
    let (kind, key, sender) = (value.get("type")?.as_str()?, value.get("state_key")?.as_str()?, value.get("sender")?);
    Some(json!({"type": kind, "state_key": key, "sender": sender, "content": value.get("content")?}))
}

/// The stripped state of `room_id` in what another server sent, as stored with an
/// invite or a knock (a JSON array), and the room's creator it names, if any.
pub(crate) fn stripped_state_of(room_id: &RoomId, state: &[RawStrippedState]) -> Result<(String, Option<String>)> {
    let state: Vec<JsonValue> = state.iter().filter_map(|s| stripped(room_id, s)).take(MAX_STRIPPED_STATE).collect();
    let creator =
        state.iter().find(|s| s["type"] == "m.room.create").and_then(|s| s["sender"].as_str()).map(str::to_owned);
    Ok((serde_json::to_string(&state).map_err(Error::internal)?, creator))
}

/// Room versions for which the spec leaves checking stripped state optional (1 to 11);
/// every later one gets the checks of `check_stripped_state_pdus`.
fn stripped_state_checks_optional(version: &RoomVersionId) -> bool {
    use RoomVersionId::*;
    matches!(version, V1 | V2 | V3 | V4 | V5 | V6 | V7 | V8 | V9 | V10 | V11)
}

impl Services {
    /// The checks Matrix 1.16 asks of the stripped state sent with an invite or a knock
    /// (`invite_room_state`, `knock_room_state`) in room versions after 11: the room's
    /// create event is there, each entry is a PDU of the room version's format, of this
    /// room (the create event's own id names the room since version 12), and signed
    /// by the servers that must sign it, with a content hash that matches.
    /// `M_INVALID_PARAM` when one fails. Earlier versions are not checked (the
    /// spec's "MAY"; servers sent stripped events there).
    pub(crate) async fn check_stripped_state_pdus(
        &self,
        room_id: &RoomId,
        version: &RoomVersionId,
        state: &[RawStrippedState],
    ) -> Result<()> {
        if stripped_state_checks_optional(version) {
            return Ok(());
        }
        let rules = rules_for(version)?;
        let invalid = |why: String| Error::invalid_param(format!("Invalid stripped state: {why}"));
        let mut has_create = false;
        for (i, entry) in state.iter().enumerate().take(MAX_STRIPPED_STATE) {
            let RawStrippedState::Pdu(raw) = entry else {
                return Err(invalid(format!("entry {i} is not a PDU")));
            };
            let object: CanonicalJsonObject =
                serde_json::from_str(raw.get()).map_err(|e| invalid(format!("entry {i}: {e}")))?;
            ruma::state_res::check_pdu_format(&object, &rules.event_format)
                .map_err(|e| invalid(format!("entry {i}: {e}")))?;
            let is_create = field(&object, "type") == Some("m.room.create") && field(&object, "state_key") == Some("");
            let of_room = if is_create && rules.authorization.room_create_event_id_as_room_id {
                ruma::signatures::reference_hash(&object, &rules)
                    .is_ok_and(|hash| room_id.as_str().strip_prefix('!') == Some(hash.as_str()))
            } else {
                field(&object, "room_id") == Some(room_id.as_str())
            };
            if !of_room {
                return Err(invalid(format!("entry {i} is not of room {room_id}")));
            }
            has_create |= is_create;
            let servers = ruma::signatures::required_server_signatures_to_verify_event(&object, &rules.signatures)
                .map_err(|e| invalid(format!("entry {i}: {e}")))?;
            let keys = self.event_signing_keys(&servers).await?;
            match ruma::signatures::verify_event(&keys, &object, &rules) {
                Ok(Verified::All) => {}
                Ok(Verified::Signatures) => return Err(invalid(format!("entry {i}'s content hash does not match"))),
                Err(e) => return Err(invalid(format!("entry {i} has a bad signature: {e}"))),
            }
        }
        if !has_create {
            return Err(invalid("it lacks the room's create event".to_owned()));
        }
        Ok(())
    }

    /// Stores `event`, a signed membership event of local `user` in a room this server
    /// is not in (see the module comment), and wakes the user's `/sync`. `stripped`:
    /// the state to show with an invite or a knock. `only_if_pending`: change the
    /// membership only while it is an invite or a knock. Answers whether it changed.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn store_out_of_band_membership(
        &self,
        room_id: &RoomId,
        event_id: &str,
        event: &CanonicalJsonObject,
        user: &UserId,
        membership: &str,
        stripped: Option<&str>,
        only_if_pending: bool,
    ) -> Result<bool> {
        let json = serde_json::to_string(event).map_err(Error::internal)?;
        let stored = self
            .store
            .store_remote_membership(&RemoteMembership {
                event_id,
                room_id: room_id.as_str(),
                sender: field(event, "sender").unwrap_or(user.as_str()),
                user_id: user.as_str(),
                membership,
                depth: integer(event, "depth").unwrap_or(0),
                origin_server_ts: integer(event, "origin_server_ts").unwrap_or_else(now_ms),
                json: &json,
                stripped_state: stripped,
                only_if_pending,
            })
            .await?;
        if stored.is_some() {
            self.notifier.notify_users(&[user.to_owned()]);
        }
        Ok(stored.is_some())
    }

    /// Whether `room_id` is a room this server is not in (no local user joined): a
    /// local user's membership there is out of band.
    pub(crate) async fn is_out_of_band(&self, room_id: &RoomId) -> Result<bool> {
        Ok(self.room_version(room_id).await.is_err() || self.joined_local_members(room_id).await?.is_empty())
    }

    /// A PDU from `origin` (through `/send`) of a room this server is not in: when it is
    /// a kick or ban of a local user whose invite or knock is pending here (a refused
    /// knock, a rescinded invite), sent by a user of `origin` and signed as the room
    /// version requires, the user's membership ends with it. Answers `None` when the
    /// PDU is not such an event (it goes the usual way).
    pub(crate) async fn receive_out_of_band_membership(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        version: &RoomVersionId,
        event_id: &str,
        object: &CanonicalJsonObject,
    ) -> Result<Option<Result<(), String>>> {
        let membership = match object.get("content") {
            Some(CanonicalJsonValue::Object(content)) => content.get("membership").and_then(|m| m.as_str()),
            _ => None,
        };
        let target = field(object, "state_key").and_then(|k| OwnedUserId::try_from(k).ok());
        let (Some(membership @ ("leave" | "ban")), Some(target)) = (membership, target) else { return Ok(None) };
        if field(object, "type") != Some("m.room.member") || target.server_name() != self.server_name() {
            return Ok(None);
        }
        let pending = self.store.get_membership(room_id.as_str(), target.as_str()).await?;
        if !pending.is_some_and(|m| matches!(m.membership.as_str(), "invite" | "knock"))
            || !self.is_out_of_band(room_id).await?
        {
            return Ok(None);
        }
        let sender = field(object, "sender").and_then(|s| UserId::parse(s).ok());
        if sender.as_ref().is_none_or(|s| s.server_name() != origin) {
            return Ok(Some(Err("The sender is not a user of the sending server".to_owned())));
        }
        let rules = rules_for(version)?;
        let servers = ruma::signatures::required_server_signatures_to_verify_event(object, &rules.signatures)
            .map_err(|e| Error::bad_json(format!("Cannot verify the event: {e}")))?;
        let keys = self.event_signing_keys(&servers).await?;
        match ruma::signatures::verify_event(&keys, object, &rules) {
            Ok(Verified::All) => {}
            Ok(Verified::Signatures) => return Ok(Some(Err("The content hash does not match".to_owned()))),
            Err(e) => return Ok(Some(Err(format!("Bad signature: {e}")))),
        }
        self.store_out_of_band_membership(room_id, event_id, object, &target, membership, None, true).await?;
        Ok(Some(Ok(())))
    }

    /// Ends local `user`'s pending invite or knock (`pending`) in a room this server is
    /// not in: a leave through a server of the room (the inviter's, those that sent the
    /// stripped state, the room id's), kept as the user's membership. When no server
    /// can be told, the invite or knock is ended here anyway. Answers the event that
    /// ended it (the leave, or the pending event itself) and the stream position.
    pub(crate) async fn leave_out_of_band(
        &self,
        room_id: &RoomId,
        user: &UserId,
        pending: &MembershipRow,
        reason: Option<String>,
    ) -> Result<(OwnedEventId, i64)> {
        let mut senders: Vec<String> = Vec::new();
        if let Some(event) = self.store.get_event(&pending.event_id).await? {
            senders.push(event.sender);
        }
        if let Some(state) = self.store.get_invite_state(&pending.event_id).await? {
            let state: Vec<JsonValue> = serde_json::from_str(&state).unwrap_or_default();
            senders.extend(state.iter().filter_map(|s| s["sender"].as_str().map(str::to_owned)));
        }
        let mut servers: Vec<OwnedServerName> = Vec::new();
        for server in senders.iter().filter_map(|s| UserId::parse(s).ok()).map(|u| u.server_name().to_owned()) {
            if !servers.contains(&server) {
                servers.push(server);
            }
        }
        let servers = super::membership::join_candidates(room_id, &servers);
        match self.leave_remote_room(room_id, user, &servers, reason).await {
            Ok((event_id, event)) => {
                self.store_out_of_band_membership(room_id, event_id.as_str(), &event, user, "leave", None, true)
                    .await?;
                let position = self.store.get_membership(room_id.as_str(), user.as_str()).await?;
                Ok((event_id, position.map_or(0, |m| m.stream_ordering)))
            }
            Err(e) => {
                tracing::info!(%room_id, error = %e, "could not tell a server of the room of a declined invite or knock");
                let position =
                    self.store.decline_remote_membership(room_id.as_str(), user.as_str(), &pending.event_id).await?;
                self.notifier.notify_users(&[user.to_owned()]);
                Ok((OwnedEventId::try_from(pending.event_id.as_str()).map_err(Error::internal)?, position))
            }
        }
    }
}
