//! Invites across servers. A local user inviting a user of another server: the invite
//! is built here, sent to the invitee's server (`PUT /invite/v2`) with the room's
//! stripped state, and stored once that server has signed it too. A user of this server
//! invited to a room of another: the invite is checked, signed and, when no local user
//! is in the room, kept with the stripped state it came with, so `/sync` can show it.

use axum::http::StatusCode;
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, RoomId, RoomVersionId, ServerName, UserId,
    api::{
        error::{ErrorKind, IncompatibleRoomVersionErrorData},
        federation::membership::{RawStrippedState, create_invite::v2 as create_invite},
    },
    events::TimelineEventType,
    signatures::Verified,
};
use serde_json::{Value as JsonValue, value::RawValue};

use crate::{
    error::{Error, Result},
    service::{
        SUPPORTED_ROOM_VERSIONS, Services,
        rooms::{
            append::{LocalEvent, rules_for},
            pipeline::{Arrival, PduOutcome},
        },
    },
};

/// The state event types sent along with an invite or a knock's answer (the spec's
/// list for stripped state).
const STRIPPED_STATE_TYPES: [&str; 7] = [
    "m.room.create",
    "m.room.join_rules",
    "m.room.name",
    "m.room.avatar",
    "m.room.topic",
    "m.room.canonical_alias",
    "m.room.encryption",
];
fn object_of(raw: &RawValue) -> Result<CanonicalJsonObject> {
    serde_json::from_str(raw.get()).map_err(|e| Error::bad_json(format!("The event is not canonical JSON: {e}")))
}

fn raw_of(object: &CanonicalJsonObject) -> Result<Box<RawValue>> {
    RawValue::from_string(serde_json::to_string(object).map_err(Error::internal)?).map_err(Error::internal)
}

fn field<'a>(object: &'a CanonicalJsonObject, key: &str) -> Option<&'a str> {
    object.get(key).and_then(|v| v.as_str())
}

fn incompatible(version: &RoomVersionId) -> Error {
    Error::matrix(
        StatusCode::BAD_REQUEST,
        ErrorKind::IncompatibleRoomVersion(IncompatibleRoomVersionErrorData::new(version.clone())),
        format!("This server does not support room version {version}"),
    )
}

impl Services {
    /// The room's current state events another server's user is shown before joining
    /// (`invite_room_state`, `knock_room_state`), as PDUs (the spec's format since
    /// Matrix 1.16), with `member`'s own member event (an inviter's) when given.
    pub(super) async fn stripped_state_pdus(
        &self,
        room_id: &RoomId,
        member: Option<&UserId>,
    ) -> Result<Vec<RawStrippedState>> {
        let mut keys: Vec<(String, String)> =
            STRIPPED_STATE_TYPES.iter().map(|t| ((*t).to_owned(), String::new())).collect();
        if let Some(member) = member {
            keys.push(("m.room.member".to_owned(), member.to_string()));
        }
        let mut state = Vec::new();
        for stored in self.store.get_current_state_entries(room_id.as_str(), &keys).await? {
            state.push(RawStrippedState::Pdu(RawValue::from_string(stored.json).map_err(Error::internal)?));
        }
        Ok(state)
    }

    /// `PUT /invite/v2/{roomId}/{eventId}`: a user of `origin` invites one of ours.
    /// Answers the invite with our signature added.
    pub async fn accept_remote_invite(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &ruma::EventId,
        version: &RoomVersionId,
        event: &RawValue,
        invite_room_state: &[RawStrippedState],
    ) -> Result<Box<RawValue>> {
        if !SUPPORTED_ROOM_VERSIONS.contains(version) {
            return Err(incompatible(version));
        }
        let rules = rules_for(version)?;
        let mut object = object_of(event)?;
        let membership = match object.get("content") {
            Some(CanonicalJsonValue::Object(c)) => c.get("membership").and_then(|m| m.as_str()),
            _ => None,
        };
        let sender = field(&object, "sender").and_then(|s| UserId::parse(s).ok());
        let invitee = field(&object, "state_key").and_then(|s| UserId::parse(s).ok());
        let (Some(sender), Some(invitee)) = (sender, invitee) else {
            return Err(Error::bad_json("An invite needs a sender and a state_key"));
        };
        if field(&object, "type") != Some("m.room.member")
            || membership != Some("invite")
            || field(&object, "room_id") != Some(room_id.as_str())
        {
            return Err(Error::bad_json(format!("Not an invite to {room_id}")));
        }
        if sender.server_name() != origin {
            return Err(Error::forbidden("A server may only send its own users' invites"));
        }
        if invitee.server_name() != self.server_name() || !self.store.user_exists(invitee.as_str()).await? {
            return Err(Error::not_found(format!("No user {invitee} on this server")));
        }
        let computed = ruma::signatures::reference_hash(&object, &rules)
            .map_err(|e| Error::bad_json(format!("Cannot compute the event id: {e}")))?;
        if computed != event_id.as_str().trim_start_matches('$') {
            return Err(Error::bad_json("The event id does not match the event"));
        }
        let servers = ruma::signatures::required_server_signatures_to_verify_event(&object, &rules.signatures)
            .map_err(|e| Error::bad_json(format!("Cannot verify the invite: {e}")))?;
        let keys = self.event_signing_keys(&servers).await?;
        match ruma::signatures::verify_event(&keys, &object, &rules) {
            Ok(Verified::All) => {}
            Ok(Verified::Signatures) => return Err(Error::bad_json("The invite's content hash does not match")),
            Err(e) => return Err(Error::forbidden(format!("Bad signature on the invite: {e}"))),
        }
        ruma::signatures::hash_and_sign_event(
            self.server_name().as_str(),
            &self.signing_key,
            &mut object,
            &rules.redaction,
        )
        .map_err(|e| Error::internal(format!("cannot sign the invite: {e}")))?;
        object.remove("unsigned");

        let resident =
            self.room_version(room_id).await.is_ok() && !self.joined_local_members(room_id).await?.is_empty();
        if !resident {
            // No local state to show: keep what the inviting server sent along.
            self.check_stripped_state_pdus(room_id, version, invite_room_state).await?;
            let (state, creator) = super::out_of_band::stripped_state_of(room_id, invite_room_state)?;
            let creator = creator.unwrap_or_else(|| sender.to_string());
            self.store.insert_room_if_missing(room_id.as_str(), version.as_str(), &creator).await?;
            self.store_out_of_band_membership(
                room_id,
                event_id.as_str(),
                &object,
                &invitee,
                "invite",
                Some(&state),
                false,
            )
            .await?;
        }
        // A room we are in: the invite reaches us again as a PDU of the room, through
        // `/send`, and takes its place in the room's state then.
        raw_of(&object)
    }

    /// A local user invites a user of another server (see the module comment).
    pub async fn invite_remote_user(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        target: &UserId,
        content: serde_json::Map<String, JsonValue>,
    ) -> Result<OwnedEventId> {
        let version = self.room_version(room_id).await?;
        let rules = rules_for(&version)?;
        let event = LocalEvent {
            sender,
            kind: TimelineEventType::RoomMember,
            state_key: Some(target.to_string()),
            content: JsonValue::Object(content),
            txn: None,
            redacts: None,
        };
        let built = self.build_on_current_state(room_id, &rules, &event).await?;
        let invite_state = self.stripped_state_pdus(room_id, Some(sender)).await?;
        let request = create_invite::Request::new(
            room_id.to_owned(),
            built.event_id.clone(),
            version.clone(),
            RawValue::from_string(built.json.clone()).map_err(Error::internal)?,
            invite_state,
        );
        let answer = self.send_federation_request(target.server_name(), request).await?;
        let signed = object_of(&answer.event)?;
        let computed = ruma::signatures::reference_hash(&signed, &rules)
            .map_err(|e| Error::federation(format!("{} sent back a broken invite: {e}", target.server_name())))?;
        if computed != built.event_id.as_str().trim_start_matches('$') {
            return Err(Error::federation(format!("{} sent back another event", target.server_name())));
        }
        let servers = ruma::signatures::required_server_signatures_to_verify_event(&signed, &rules.signatures)
            .map_err(Error::internal)?
            .into_iter()
            .chain([target.server_name().to_owned()])
            .collect();
        let keys = self.event_signing_keys(&servers).await?;
        ruma::signatures::verify_event(&keys, &signed, &rules)
            .map_err(|e| Error::federation(format!("{} signed the invite wrongly: {e}", target.server_name())))?;
        match self.handle_pdu(room_id, &version, signed, Arrival::Local).await? {
            PduOutcome::Accepted { event_id, position } => {
                if let Some(position) = position {
                    self.federate_local_event(room_id, event_id.as_str(), position, Some(target.as_str())).await;
                }
                Ok(event_id)
            }
            PduOutcome::Duplicate { event_id } => Ok(event_id),
            PduOutcome::Rejected { reason, .. } => {
                Err(Error::forbidden(format!("The invite is not allowed: {reason}")))
            }
            PduOutcome::SoftFailed { .. } => Err(Error::forbidden("The invite is not allowed by the room's state")),
        }
    }
}
