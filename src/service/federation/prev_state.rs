//! The state before a PDU from another server whose prev events this server has no
//! state for, once `get_missing_events` has filled what it could (`transactions.rs`):
//! for each such prev, the sender is asked for the state at it (`/state_ids`), the
//! events of that state and of its auth chain this server lacks are fetched (`/event`
//! for a few, `/state` for many) and stored as outliers, and the state after the prev
//! is that state plus the prev itself when it is a state event. The pipeline resolves
//! those states with the states after the PDU's other prevs; the missing prevs become
//! backward extremities. Bounded in count and time; when the state cannot be had, a
//! live PDU is refused (nothing stored) rather than placed on a state it does not have;
//! backfilled history is placed on the current state, checked by its auth events only.

use std::{collections::HashSet, time::Duration};

use futures_util::StreamExt;
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, RoomId, RoomVersionId, ServerName,
    api::federation::event::{get_event, get_room_state, get_room_state_ids},
};

use crate::{
    error::{Error, Result},
    service::{
        Services,
        rooms::pipeline::{Arrival, IdState, PduOutcome},
    },
    storage::StoredEvent,
};

/// Most prevs of one PDU whose state is asked for (PDUs name at most 20 prevs).
const MAX_PREVS: usize = 20;
/// Most ids a `/state_ids` answer may hold (state plus auth chain).
const MAX_STATE_IDS: usize = 200_000;
/// Up to this many missing events are fetched one by one (`/event`); more, and the
/// whole state is asked for (`/state`).
const MAX_EVENT_FETCHES: usize = 100;
/// `/event` requests in flight at once.
const CONCURRENT_FETCHES: usize = 10;
/// The longest the state before one PDU may take to get.
const DEADLINE: Duration = Duration::from_secs(20);

impl Services {
    /// Checks and stores a PDU `origin` sent (live, or by backfill), first getting from
    /// `origin` the state at those of its prevs this server has no state for (see the
    /// module comment). `Err`: refused, nothing stored (as `handle_pdu`), or the state
    /// before it could not be had. Backfilled history whose state cannot be had is
    /// still stored, checked against its auth events only (`handle_pdu`).
    ///
    /// `stored`: the PDU's prev events and itself as stored, when the caller read them
    /// (`read_prevs`); they are read here otherwise. Either way once: the pipeline
    /// reuses them.
    pub(crate) async fn handle_remote_pdu(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        version: &RoomVersionId,
        pdu: CanonicalJsonObject,
        arrival: Arrival,
        stored: Option<Vec<StoredEvent>>,
    ) -> Result<PduOutcome> {
        let prevs = prev_ids_of(&pdu);
        let rules = crate::service::rooms::append::rules_for(version)?;
        let event_id = ruma::signatures::reference_hash(&pdu, &rules)
            .ok()
            .and_then(|hash| OwnedEventId::try_from(format!("${hash}")).ok());
        let stored = match stored {
            Some(stored) => stored,
            None => self.read_prevs(event_id.as_ref(), &prevs).await?,
        };
        let stateless = prevs_without_state(event_id.as_ref(), &prevs, &stored);
        if stateless.is_empty() {
            return self.handle_pdu_with_prevs(room_id, version, pdu, arrival, None, stored).await;
        }
        let states = tokio::time::timeout(DEADLINE, async {
            let mut states = Vec::with_capacity(stateless.len());
            for prev in stateless.iter().take(MAX_PREVS) {
                states.push(self.state_after_remote_event(origin, room_id, version, prev).await?);
            }
            Ok::<_, Error>(states)
        })
        .await
        .unwrap_or_else(|_| Err(Error::federation("it took too long")));
        let states = match states {
            Ok(states) => states,
            // The database does not answer: the whole transaction fails, and comes again.
            Err(e @ Error::Unavailable(_)) => return Err(e),
            Err(e) if arrival == Arrival::Backfill => {
                tracing::debug!(%origin, %room_id, error = %e, "no state before a backfilled event");
                return self.handle_pdu_with_prevs(room_id, version, pdu, arrival, None, stored).await;
            }
            Err(e) => {
                return Err(Error::federation(format!(
                    "Cannot get the state before the event from {origin}: {}",
                    e.message()
                )));
            }
        };
        self.handle_pdu_with_prevs(room_id, version, pdu, arrival, Some(states), stored).await
    }

    /// A PDU's prev events (`prevs`) and the event itself (`event_id`) as stored: one
    /// read, which the pipeline reuses.
    pub(crate) async fn read_prevs(
        &self,
        event_id: Option<&OwnedEventId>,
        prevs: &[OwnedEventId],
    ) -> Result<Vec<StoredEvent>> {
        let ids: Vec<String> = prevs.iter().chain(event_id).map(|p| p.to_string()).collect();
        self.store.get_events_by_ids(&ids).await
    }
}

/// The prev event ids a PDU names (those that are valid ids).
pub(crate) fn prev_ids_of(pdu: &CanonicalJsonObject) -> Vec<OwnedEventId> {
    match pdu.get("prev_events") {
        Some(CanonicalJsonValue::Array(ids)) => {
            ids.iter().filter_map(|v| v.as_str()).filter_map(|id| OwnedEventId::try_from(id).ok()).collect()
        }
        _ => Vec::new(),
    }
}

/// Those of `prevs` without a state here (`stored`: as `read_prevs` read them): not
/// stored, or stored as outliers (rejected ones have no state to give, and are left
/// out). None when the event itself is already in the room (it is a duplicate: nothing
/// to fetch).
pub(crate) fn prevs_without_state(
    event_id: Option<&OwnedEventId>,
    prevs: &[OwnedEventId],
    stored: &[StoredEvent],
) -> Vec<OwnedEventId> {
    if let Some(id) = event_id
        && stored.iter().any(|e| e.event_id == id.as_str() && (e.state_group != 0 || e.rejected_reason.is_some()))
    {
        return Vec::new();
    }
    prevs
        .iter()
        .filter(|p| match stored.iter().find(|e| e.event_id == p.as_str()) {
            None => true,
            Some(e) => e.state_group == 0 && e.rejected_reason.is_none(),
        })
        .cloned()
        .collect()
}

impl Services {
    /// The state after `event_id` as `origin` has it: `/state_ids` at it, the events of
    /// that state and its auth chain fetched and stored as outliers where missing, plus
    /// the event itself if it is a state event. `Err` when an event of the state could
    /// not be had.
    async fn state_after_remote_event(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        version: &RoomVersionId,
        event_id: &OwnedEventId,
    ) -> Result<IdState> {
        let ids = self
            .send_federation_request(origin, get_room_state_ids::v1::Request::new(event_id.clone(), room_id.to_owned()))
            .await?;
        if ids.pdu_ids.len() + ids.auth_chain_ids.len() > MAX_STATE_IDS {
            return Err(Error::federation(format!("{origin} named more than {MAX_STATE_IDS} events at {event_id}")));
        }
        let mut wanted: Vec<String> =
            ids.pdu_ids.iter().chain(&ids.auth_chain_ids).chain([event_id]).map(|id| id.to_string()).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let stored: HashSet<String> = self.store.stored_event_ids(&wanted).await?.into_iter().collect();
        let missing: Vec<OwnedEventId> = wanted
            .iter()
            .filter(|id| !stored.contains(*id))
            .filter_map(|id| OwnedEventId::try_from(id.as_str()).ok())
            .collect();
        if !missing.is_empty() {
            let fetched = if missing.len() <= MAX_EVENT_FETCHES {
                self.fetch_events_from(origin, &missing).await
            } else {
                let mut fetched = self.fetch_state_from(origin, room_id, event_id, &missing).await?;
                if missing.contains(event_id) {
                    fetched.extend(self.fetch_events_from(origin, std::slice::from_ref(event_id)).await);
                }
                fetched
            };
            tracing::debug!(%origin, %room_id, at = %event_id, missing = missing.len(), fetched = fetched.len(),
                "fetched the state at a prev event");
            self.handle_outliers(room_id, version, fetched).await?;
        }

        let mut state_ids: Vec<String> = ids.pdu_ids.iter().map(|id| id.to_string()).collect();
        state_ids.push(event_id.to_string());
        let events = self.store.get_events_by_ids(&state_ids).await?;
        let mut state = IdState::new();
        for id in &ids.pdu_ids {
            let Some(event) = events.iter().find(|e| e.event_id == id.as_str()) else {
                return Err(Error::federation(format!("{origin} did not give the state event {id} at {event_id}")));
            };
            if event.room_id != room_id.as_str() || event.rejected_reason.is_some() {
                continue;
            }
            if let Some(state_key) = &event.state_key {
                state.insert((event.event_type.clone(), state_key.clone()), event.event_id.clone());
            }
        }
        // The state after the prev: with the prev itself, if it is a state event.
        if let Some(prev) = events.iter().find(|e| e.event_id == event_id.as_str())
            && prev.rejected_reason.is_none()
            && prev.room_id == room_id.as_str()
            && let Some(state_key) = &prev.state_key
        {
            state.insert((prev.event_type.clone(), state_key.clone()), prev.event_id.clone());
        }
        Ok(state)
    }

    /// These events from `origin` (`GET /event`), a few at a time; those it does not
    /// give are left out.
    async fn fetch_events_from(&self, origin: &ServerName, ids: &[OwnedEventId]) -> Vec<CanonicalJsonObject> {
        futures_util::stream::iter(ids.iter().cloned())
            .map(|id| async move {
                match self.send_federation_request(origin, get_event::v1::Request::new(id.clone())).await {
                    Ok(response) => serde_json::from_str::<CanonicalJsonObject>(response.pdu.get()).ok(),
                    Err(e) => {
                        tracing::debug!(%origin, event_id = %id, error = %e, "could not fetch an event");
                        None
                    }
                }
            })
            .buffer_unordered(CONCURRENT_FETCHES)
            .filter_map(|found| async move { found })
            .collect()
            .await
    }

    /// The state at `event_id` and its auth chain from `origin` (`GET /state`), only
    /// the `missing` ones.
    async fn fetch_state_from(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &OwnedEventId,
        missing: &[OwnedEventId],
    ) -> Result<Vec<CanonicalJsonObject>> {
        let response = self
            .send_federation_request(origin, get_room_state::v1::Request::new(event_id.clone(), room_id.to_owned()))
            .await?;
        let version = self.room_version(room_id).await?;
        let rules = crate::service::rooms::append::rules_for(&version)?;
        let missing: HashSet<&str> = missing.iter().map(|id| id.as_str()).collect();
        Ok(response
            .pdus
            .iter()
            .chain(&response.auth_chain)
            .filter_map(|raw| serde_json::from_str::<CanonicalJsonObject>(raw.get()).ok())
            .filter(|object| {
                ruma::signatures::reference_hash(object, &rules)
                    .is_ok_and(|hash| missing.contains(format!("${hash}").as_str()))
            })
            .collect())
    }
}
