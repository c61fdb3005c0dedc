//! Knocking across servers. As the resident server: `make_knock` answers a template of
//! a remote user's knock built on the room's head (room versions 7 and later; the join
//! rules, bans and memberships decide through the auth rules), and `send_knock` takes
//! the signed knock through the event pipeline and answers the room's stripped state.
//! As the knocking server: `knock_remote_room` asks a resident server for a template,
//! signs it, sends it, and keeps the knock with the stripped state that came back, out
//! of band (`out_of_band.rs`): the room's state is not here. A knock is accepted by an
//! invite (`invites.rs`), refused by a kick that reaches us through `/send`, and
//! retracted by leaving through a resident server.

use axum::http::StatusCode;
use ruma::{
    OwnedEventId, OwnedServerName, RoomId, RoomVersionId, ServerName, UserId,
    api::{
        error::{ErrorKind, IncompatibleRoomVersionErrorData},
        federation::membership::{
            RawStrippedState, create_knock_event::v1 as send_knock, prepare_knock_event::v1 as make_knock,
        },
    },
};
use serde_json::value::RawValue;

use super::{membership::to_raw, out_of_band::stripped_state_of};
use crate::{
    error::{Error, Result},
    service::{SUPPORTED_ROOM_VERSIONS, Services, rooms::append::rules_for},
};

fn incompatible(version: &RoomVersionId, why: &str) -> Error {
    Error::matrix(
        StatusCode::BAD_REQUEST,
        ErrorKind::IncompatibleRoomVersion(IncompatibleRoomVersionErrorData::new(version.clone())),
        format!("The room has version {version}, {why}"),
    )
}

impl Services {
    /// `GET /make_knock/{roomId}/{userId}?ver=`: a knock template for a user of
    /// `origin`, checked against the room's auth rules.
    pub async fn make_knock_template(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        user: &UserId,
        versions: &[RoomVersionId],
    ) -> Result<(RoomVersionId, Box<RawValue>)> {
        self.membership_template(origin, room_id, user, "knock", Some(versions)).await
    }

    /// `PUT /send_knock/{roomId}/{eventId}`: takes a remote user's signed knock through
    /// the event pipeline (then on to the room's other servers) and answers the room's
    /// stripped state for the knocking user's client.
    pub async fn accept_send_knock(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &ruma::EventId,
        pdu: &RawValue,
    ) -> Result<Vec<RawStrippedState>> {
        self.accept_membership(origin, room_id, event_id, pdu, "knock").await?;
        self.stripped_state_pdus(room_id, None).await
    }

    /// Knocks for `user` on a room this server is not in, through the first of `via`
    /// that answers (see the module comment). Answers the knock's event id.
    pub async fn knock_remote_room(
        &self,
        room_id: &RoomId,
        user: &UserId,
        via: &[OwnedServerName],
        reason: Option<String>,
    ) -> Result<OwnedEventId> {
        let (resident, template) = self
            .first_template(via, "knock", || {
                let mut request = make_knock::Request::new(room_id.to_owned(), user.to_owned());
                request.ver = SUPPORTED_ROOM_VERSIONS.to_vec();
                request
            })
            .await?;
        let version = template.room_version;
        if !SUPPORTED_ROOM_VERSIONS.contains(&version) {
            return Err(incompatible(&version, "which this server does not support"));
        }
        let rules = rules_for(&version)?;
        if !rules.authorization.knocking {
            return Err(incompatible(&version, "which does not allow knocking"));
        }
        let extra = self.own_membership_extra(user, reason).await?;
        let (event_id, event) = self.sign_template(&template.event, room_id, user, "knock", &rules, extra)?;
        let request = send_knock::Request::new(room_id.to_owned(), event_id.clone(), to_raw(&event)?);
        let answer = self.send_federation_request(&resident, request).await?;
        self.check_stripped_state_pdus(room_id, &version, &answer.knock_room_state).await?;
        let (state, creator) = stripped_state_of(room_id, &answer.knock_room_state)?;
        // The room's creator as its create event in the stripped state says (the spec
        // requires it there; the column is only a record for a room of another server).
        let creator = creator.unwrap_or_else(|| user.to_string());
        self.store.insert_room_if_missing(room_id.as_str(), version.as_str(), &creator).await?;
        self.store_out_of_band_membership(room_id, event_id.as_str(), &event, user, "knock", Some(&state), false)
            .await?;
        Ok(event_id)
    }
}
