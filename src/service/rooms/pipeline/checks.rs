//! The checks on receipt: format, signatures, content hash, and the auth rules against
//! an event's auth events and a state.

use std::collections::HashMap;

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, EventId, OwnedEventId, RoomId,
    events::{StateEventType, TimelineEventType},
    room_version_rules::RoomVersionRules,
    signatures::Verified,
    state_res,
};

use super::{Arrival, MAX_FETCH};
use crate::service::rooms::{build::StateMap, pdu::Pdu};
use crate::{
    error::{Error, Result},
    service::Services,
};

impl Services {
    /// Format, event id and room of a PDU, before its signatures are checked.
    pub(super) fn check_pdu(
        &self,
        room_id: &RoomId,
        rules: &RoomVersionRules,
        pdu: CanonicalJsonObject,
        arrival: Arrival,
    ) -> Result<PendingPdu> {
        state_res::check_pdu_format(&pdu, &rules.event_format)
            .map_err(|e| Error::bad_json(format!("Invalid PDU: {e}")))?;
        match pdu.get("room_id") {
            Some(CanonicalJsonValue::String(id)) if id == room_id.as_str() => {}
            None if rules.authorization.room_create_event_id_as_room_id => {}
            _ => return Err(Error::bad_json("The PDU belongs to another room")),
        }
        let hash =
            ruma::signatures::reference_hash(&pdu, rules).map_err(|e| Error::bad_json(format!("Invalid PDU: {e}")))?;
        let event_id = OwnedEventId::try_from(format!("${hash}")).map_err(Error::internal)?;
        Ok(PendingPdu { event_id, pdu, rules: rules.clone(), trusted: arrival == Arrival::Local })
    }

    /// The auth events of a PDU as a state map (with the create event, which since room
    /// v12 is not among them), or why it must be rejected.
    pub(super) async fn load_auth_events(
        &self,
        room_id: &RoomId,
        rules: &RoomVersionRules,
        pdu: &Pdu,
    ) -> Result<std::result::Result<StateMap, String>> {
        let mut ids: Vec<String> = pdu.auth_events.iter().map(|a| a.to_string()).collect();
        if let Some(create) = create_event_id(room_id, rules) {
            ids.push(create.to_string());
        }
        let mut stored = self.store.get_events_by_ids(&ids).await?;
        let missing: Vec<OwnedEventId> = pdu
            .auth_events
            .iter()
            .filter(|a| !stored.iter().any(|s| s.event_id == a.as_str()))
            .take(MAX_FETCH)
            .cloned()
            .collect();
        if !missing.is_empty() {
            let fetched = self.fetch_events_from_room(room_id, &missing).await;
            if !fetched.is_empty() {
                let version = self.room_version(room_id).await?;
                // Auth events are stored as outliers (checked against their own).
                Box::pin(self.handle_outliers(room_id, &version, fetched)).await?;
                stored = self.store.get_events_by_ids(&ids).await?;
            }
        }
        let mut auth = StateMap::new();
        for id in &pdu.auth_events {
            let Some(event) = stored.iter().find(|s| s.event_id == id.as_str()) else {
                return Ok(Err(format!("its auth event {id} is unknown")));
            };
            if let Some(reason) = &event.rejected_reason {
                return Ok(Err(format!("its auth event {id} was rejected ({reason})")));
            }
            let p = Pdu::from_stored(event)?;
            if let Some(k) = &p.state_key {
                auth.insert((p.kind.to_string().into(), k.clone()), p);
            }
        }
        if let Some(create) = stored.iter().find(|s| s.event_type == "m.room.create") {
            auth.entry((StateEventType::RoomCreate, String::new())).or_insert(Pdu::from_stored(create)?);
        }
        Ok(Ok(auth))
    }

    /// These state events, parsed, as a state map.
    pub(super) async fn pdus_of_ids(&self, ids: &[String]) -> Result<StateMap> {
        let mut map = StateMap::new();
        for event in self.store.get_events_by_ids(ids).await? {
            let pdu = Pdu::from_stored(&event)?;
            map.insert((event.event_type.as_str().into(), event.state_key.clone().unwrap_or_default()), pdu);
        }
        Ok(map)
    }
}

/// A PDU whose format and id were checked, waiting for its signatures' check.
pub(super) struct PendingPdu {
    event_id: OwnedEventId,
    pdu: CanonicalJsonObject,
    rules: RoomVersionRules,
    trusted: bool,
}

impl PendingPdu {
    /// Checks the signatures the spec requires (refused if one fails) and the content
    /// hash (the redacted form kept if it does not match); returns the id, the JSON to
    /// store and the parsed event.
    pub(super) async fn await_keys(self, services: &Services) -> Result<(OwnedEventId, String, Pdu)> {
        let mut pdu = self.pdu;
        if !self.trusted {
            let servers = ruma::signatures::required_server_signatures_to_verify_event(&pdu, &self.rules.signatures)
                .map_err(|e| Error::forbidden(format!("Cannot verify the PDU: {e}")))?;
            let keys = services.event_signing_keys(&servers).await?;
            match ruma::signatures::verify_event(&keys, &pdu, &self.rules) {
                Ok(Verified::All) => {}
                Ok(Verified::Signatures) => {
                    tracing::info!(event_id = %self.event_id, "content hash mismatch: storing the redacted event");
                    pdu = ruma::canonical_json::redact(pdu, &self.rules.redaction, None)
                        .map_err(|e| Error::bad_json(format!("Cannot redact the PDU: {e}")))?;
                }
                Err(e) => return Err(Error::forbidden(format!("Bad signature on {}: {e}", self.event_id))),
            }
        }
        // What is stored is the PDU as sent, without what only travels with it.
        pdu.remove("unsigned");
        let json = serde_json::to_string(&pdu).map_err(Error::internal)?;
        let parsed = Pdu::parse(self.event_id.as_str(), &json).map_err(|e| Error::bad_json(e.to_string()))?;
        Ok((self.event_id, json, parsed))
    }
}

/// The create event's id when the room id names it (room version 12).
pub(super) fn create_event_id(room_id: &RoomId, rules: &RoomVersionRules) -> Option<OwnedEventId> {
    rules
        .authorization
        .room_create_event_id_as_room_id
        .then(|| OwnedEventId::try_from(format!("${}", room_id.strip_sigil())).ok())
        .flatten()
}

/// The (type, state key) pairs the auth rules read for `pdu`, with the create event.
pub(super) fn auth_keys(rules: &RoomVersionRules, pdu: &Pdu) -> Result<Vec<(String, String)>> {
    let mut keys: Vec<(String, String)> = state_res::auth_types_for_event(
        &pdu.kind,
        &pdu.sender,
        pdu.state_key.as_deref(),
        &pdu.content,
        &rules.authorization,
    )
    .map_err(|e| Error::bad_json(format!("Invalid event content: {e}")))?
    .into_iter()
    .map(|(t, k)| (t.to_string(), k))
    .collect();
    keys.push(("m.room.create".to_owned(), String::new()));
    Ok(keys)
}

/// Runs the auth rules on `pdu`: the state-independent ones with `auth` (its auth
/// events) for lookups, the state-dependent ones against `state`.
pub(super) fn check_against(
    rules: &RoomVersionRules,
    pdu: &Pdu,
    auth: &StateMap,
    state: &StateMap,
) -> std::result::Result<(), String> {
    let by_id: HashMap<&EventId, &Pdu> =
        auth.values().chain(state.values()).map(|p| (p.event_id.as_ref(), p)).collect();
    state_res::check_state_independent_auth_rules(&rules.authorization, pdu, |id: &EventId| {
        by_id.get(id).map(|p| (*p).clone())
    })?;
    if pdu.kind == TimelineEventType::RoomCreate {
        return Ok(());
    }
    state_res::check_state_dependent_auth_rules(&rules.authorization, pdu, |t: &StateEventType, k: &str| {
        state.get(&(t.clone(), k.to_owned())).cloned()
    })
}
