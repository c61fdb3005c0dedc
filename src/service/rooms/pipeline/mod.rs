//! The one persist pipeline of room events, local and remote. `handle_pdu` takes a PDU
//! of a known room (canonical JSON and the room version) and runs the spec's checks on
//! receipt in order: format, signatures of the servers that must sign, content hash
//! (a mismatch stores the redacted form), auth against the event's own auth events
//! (failure: stored as rejected), auth against the state before it (rejected), and, for
//! live events, against the room's current state (failure: soft-failed). It then places
//! the event (`place_event`, shared with local sends): the state before it (its one
//! prev's state, or state resolution over several), its state group, the room's new
//! current state and extremities, under the room's lock, with `RoomHeads` kept true.
//! `handle_outliers` stores a batch of events without state (a join's state and auth
//! chain). Keys of other servers come from `event_signing_keys` (our own and test keys
//! in `KnownKeys`, the rest from the key service); missing auth events are fetched from
//! the room's servers (`fetch_events_from_room`). The state at prevs this server lacks
//! comes from the caller (`handle_pdu_with_prev_states`: the `/send` receiver asks the
//! sender); redactions of other servers' events follow `redactions.rs`.

mod checks;
mod keys;
mod outliers;
mod place;
mod redactions;
mod resolve;

use std::collections::HashMap;

use ruma::{CanonicalJsonObject, OwnedEventId, RoomId, RoomVersionId, UserId, events::TimelineEventType, state_res};

use crate::service::rooms::{
    append::{RoomHead, rules_for},
    build::StateMap,
    pdu::Pdu,
};
use crate::{
    error::Result,
    service::Services,
    storage::{Persisted, Position, PushOutcome, Redaction, StateEntry, StoredEvent},
};

use checks::{auth_keys, check_against, create_event_id};
pub use keys::KnownKeys;
pub(crate) use place::{Before, Placing};
use redactions::RedactionPlan;

/// How a PDU reached us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// Sent by another server as it happened (`/send`): soft-failed if the room's
    /// current state refuses it; wakes `/sync`.
    Live,
    /// Old history (`/backfill`): a negative stream position, never wakes `/sync`,
    /// never soft-failed.
    Backfill,
    /// Stored without state: a join's state and auth chain, auth events fetched.
    Outlier,
    /// Built and signed here (trusted: no signature check).
    Local,
}

/// What became of a PDU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PduOutcome {
    /// Stored and part of the room (at this stream position; none for outliers).
    Accepted { event_id: OwnedEventId, position: Option<i64> },
    /// Stored, passed auth against its prevs' state but not against the current state:
    /// never sent to clients, not an extremity.
    SoftFailed { event_id: OwnedEventId },
    /// Stored as rejected (never state, never sent to clients, never an extremity).
    Rejected { event_id: OwnedEventId, reason: String },
    /// Already stored: nothing changed.
    Duplicate { event_id: OwnedEventId },
}

/// Most ids fetched for one PDU.
const MAX_FETCH: usize = 20;
/// Most events read in the auth chains of one state resolution.
const MAX_AUTH_CHAIN: i64 = 100_000;

/// A room state as event ids.
pub type IdState = HashMap<(String, String), String>;

fn to_entries(state: &IdState) -> Vec<StateEntry> {
    let mut entries: Vec<StateEntry> = state.iter().map(|((t, k), id)| (t.clone(), k.clone(), id.clone())).collect();
    entries.sort();
    entries
}

/// What a caller of `handle_pdu_at` already has: the state group before the event (our
/// join), the states after its prevs that have none here (from the sender), its prev
/// events as stored (read before the room's lock).
#[derive(Default)]
struct Given {
    state_before: Option<i64>,
    prev_states: Option<Vec<IdState>>,
    read_prevs: Option<Vec<StoredEvent>>,
}

impl Services {
    /// Checks and stores a PDU of a room this server knows (see the module comment).
    /// `Err` means the PDU was refused and nothing was stored: its format is wrong, it
    /// belongs to another room, or a signature the spec requires is missing or wrong
    /// (`M_FORBIDDEN`).
    pub async fn handle_pdu(
        &self,
        room_id: &RoomId,
        version: &RoomVersionId,
        pdu: CanonicalJsonObject,
        arrival: Arrival,
    ) -> Result<PduOutcome> {
        self.handle_pdu_at(room_id, version, pdu, arrival, Given::default()).await
    }

    /// `handle_pdu` for a PDU some of whose prev events this server has no state for
    /// (unknown, or outliers): `prev_states` are the states after those, as the sender
    /// gave them (`federation/prev_state.rs`). The state before the PDU is resolved
    /// from them and the states after its other prevs.
    pub async fn handle_pdu_with_prev_states(
        &self,
        room_id: &RoomId,
        version: &RoomVersionId,
        pdu: CanonicalJsonObject,
        arrival: Arrival,
        prev_states: Vec<IdState>,
    ) -> Result<PduOutcome> {
        self.handle_pdu_at(room_id, version, pdu, arrival, Given { prev_states: Some(prev_states), ..Given::default() })
            .await
    }

    /// `handle_pdu` (with `prev_states` when some prevs have no state here) for a PDU
    /// whose prev events were read already (`prevs`: those stored, read before the
    /// room's lock, as the receiver of `/send` does to find what it lacks): they are
    /// not read again. Safe as a stored event never loses its state group; one whose
    /// state came after the read is covered by `prev_states`.
    pub(crate) async fn handle_pdu_with_prevs(
        &self,
        room_id: &RoomId,
        version: &RoomVersionId,
        pdu: CanonicalJsonObject,
        arrival: Arrival,
        prev_states: Option<Vec<IdState>>,
        prevs: Vec<StoredEvent>,
    ) -> Result<PduOutcome> {
        self.handle_pdu_at(
            room_id,
            version,
            pdu,
            arrival,
            Given { prev_states, read_prevs: Some(prevs), ..Given::default() },
        )
        .await
    }

    /// Stores this server's join to a remote room, from a `send_join` answer: call
    /// `ensure_remote_room`, then `handle_outliers` with the answer's state and auth
    /// chain, then `store_state_group` with the state before the join (the answer's
    /// state list), then this with the join event and that group. The join is checked
    /// like any live PDU, against that state (its prevs are outliers, without state);
    /// it becomes the room's forward extremity, and the room's current state becomes
    /// the state after it (a delta from nothing: every entry).
    pub async fn handle_join_pdu(
        &self,
        room_id: &RoomId,
        version: &RoomVersionId,
        join: CanonicalJsonObject,
        state_before: i64,
    ) -> Result<PduOutcome> {
        self.handle_pdu_at(
            room_id,
            version,
            join,
            Arrival::Live,
            Given { state_before: Some(state_before), ..Given::default() },
        )
        .await
    }

    /// Records a remote room (its version and creator) before its first events are
    /// stored; nothing changes if the room is known.
    pub async fn ensure_remote_room(&self, room_id: &RoomId, version: &RoomVersionId, creator: &UserId) -> Result<()> {
        self.store.insert_room_if_missing(room_id.as_str(), version.as_str(), creator.as_str()).await
    }

    async fn handle_pdu_at(
        &self,
        room_id: &RoomId,
        version: &RoomVersionId,
        pdu: CanonicalJsonObject,
        arrival: Arrival,
        given: Given,
    ) -> Result<PduOutcome> {
        let Given { state_before, prev_states, read_prevs } = given;
        let rules = rules_for(version)?;
        let (event_id, json, parsed) = self.check_pdu(room_id, &rules, pdu, arrival)?.await_keys(self).await?;
        if arrival == Arrival::Outlier {
            return self.store_outliers(room_id, &rules, vec![(event_id, json, parsed)]).await.map(|mut o| o.remove(0));
        }
        let _guard = self.room_locks.lock(room_id).await;
        // An outlier (a join's state, an auth event) that now comes live or by backfill
        // joins the room: checked as any event, then given its state and a position.
        let from_outlier = match self.store.get_event_status(event_id.as_str()).await? {
            None => false,
            Some((true, None, _)) => true,
            Some(_) => return Ok(PduOutcome::Duplicate { event_id }),
        };

        // Auth against the event's own auth events.
        let auth_events = self.load_auth_events(room_id, &rules, &parsed).await?;
        let mut rejected = match &auth_events {
            Err(reason) => Some(reason.clone()),
            Ok(auth) => check_against(&rules, &parsed, auth, auth).err(),
        };

        // The state before the event, from its prev events.
        let head = match self.room_head(room_id, &rules).await {
            Ok(head) => head,
            // Our join to a remote room: no extremity, no current state yet (group 0).
            Err(e) if state_before.is_some() && e.errcode() == "M_NOT_FOUND" => {
                RoomHead { extremities: Vec::new(), state_group: 0 }
            }
            Err(e) => return Err(e),
        };
        let prev_ids: Vec<String> = parsed.prev_events.iter().map(|p| p.to_string()).collect();
        let known = match read_prevs {
            Some(read) => read.into_iter().filter(|e| prev_ids.contains(&e.event_id)).collect(),
            None => self.store.get_events_by_ids(&prev_ids).await?,
        };
        if known.len() < prev_ids.len() {
            // Missing prevs are fetched before this, outside the room's lock, by the
            // receiver of `/send` (`get_missing_events`, then the state at those still
            // missing: `prev_states`); they become backward extremities.
            tracing::debug!(event_id = %event_id, missing = prev_ids.len() - known.len(), "placing an event with unknown prevs");
        }
        let mut prev_groups: Vec<i64> = Vec::new();
        for prev in &known {
            // Outliers and rejected events have no state (group 0).
            if prev.state_group != 0 {
                prev_groups.push(prev.state_group);
            }
        }
        prev_groups.sort_unstable();
        prev_groups.dedup();
        let mut state_assumed = false;
        let before = match (prev_groups.as_slice(), prev_states) {
            _ if state_before.is_some() => Before::Group(state_before.unwrap_or_default()),
            // The create event (by backfill: the room was joined late): nothing before it.
            _ if parsed.prev_events.is_empty() => Before::Resolved(IdState::new()),
            // The states the sender gave for the prevs we have no state for, with those
            // of the others.
            (groups, Some(mut states)) if !states.is_empty() => {
                for group in groups {
                    states.push(self.group_state(*group).await?);
                }
                Before::Resolved(self.resolve_states(room_id, &rules, states, None).await?)
            }
            // No prev's state is known and none was fetched (backfill whose sender would
            // not give it, or a caller that does not fetch): the room's current state
            // stands in for it.
            ([], _) => {
                state_assumed = true;
                Before::Group(head.state_group)
            }
            ([one], _) => Before::Group(*one),
            (several, _) => {
                let mut states = Vec::with_capacity(several.len());
                for group in several {
                    states.push(self.group_state(*group).await?);
                }
                Before::Resolved(self.resolve_states(room_id, &rules, states, None).await?)
            }
        };
        // Only the entries the auth rules read are loaded (the room may have many members).
        let keys = auth_keys(&rules, &parsed)?;
        // Backfilled history on a stand-in state is checked against its auth events
        // only: the room's state now says nothing of what was allowed then (a user
        // banned since would have all they said rejected).
        if rejected.is_none() && !(state_assumed && arrival == Arrival::Backfill) {
            let state = match &before {
                Before::Group(group) => {
                    let ids: Vec<String> =
                        self.store.get_state_group_entries(*group, &keys).await?.into_iter().map(|e| e.2).collect();
                    self.pdus_of_ids(&ids).await?
                }
                Before::Resolved(state) => {
                    self.pdus_of_ids(&keys.iter().filter_map(|k| state.get(k).cloned()).collect::<Vec<_>>()).await?
                }
            };
            rejected = check_against(&rules, &parsed, auth_events.as_ref().unwrap_or(&state), &state).err();
        }
        let mut soft_failed = false;
        if rejected.is_none()
            && arrival == Arrival::Live
            && head.state_group != 0
            && !matches!(before, Before::Group(g) if g == head.state_group)
        {
            let mut state = StateMap::new();
            for event in self.store.get_current_state_entries(room_id.as_str(), &keys).await? {
                let pdu = Pdu::from_stored(&event)?;
                state.insert((event.event_type.as_str().into(), event.state_key.clone().unwrap_or_default()), pdu);
            }
            // Its auth events passed: they still serve the state-independent lookups.
            if let Err(reason) = check_against(&rules, &parsed, auth_events.as_ref().unwrap_or(&state), &state) {
                tracing::info!(event_id = %event_id, %reason, "soft-failed an event");
                soft_failed = true;
            }
        }
        if let Some(reason) = &rejected {
            tracing::info!(event_id = %event_id, %reason, "rejected an event");
        }

        let membership = super::messages::membership_of(&json);
        let membership = (parsed.kind == TimelineEventType::RoomMember).then_some(membership);
        let accepted_live = rejected.is_none() && !soft_failed && arrival != Arrival::Backfill;
        let redaction = match state_res::Event::redacts(&parsed).filter(|_| accepted_live) {
            Some(target) => self.plan_redaction(room_id, &rules, &parsed, target.as_str(), &before).await?,
            None => None,
        };
        // A redaction that came before this event, and may apply to it, applies now.
        let held = match arrival {
            Arrival::Local => None,
            _ => self.held_redaction_for(room_id, &rules, event_id.as_str(), &parsed.sender, &json).await?,
        };
        let mut redactions: Vec<Redaction<'_>> = Vec::new();
        match &redaction {
            Some(RedactionPlan::Apply { target, redacted_json }) => {
                redactions.push(Redaction::Apply { target, redacted_json })
            }
            Some(RedactionPlan::Hold { target }) => redactions.push(Redaction::Hold { target }),
            None => {}
        }
        if let Some((by, redacted_json)) = &held {
            redactions.push(Redaction::HeldBy { by, redacted_json });
        }
        let push_actions = match (accepted_live, &auth_events) {
            (true, Ok(auth)) => {
                self.push_actions_for(room_id, &parsed.sender, &json, auth, &rules).await.unwrap_or_else(|e| {
                    tracing::warn!(event_id = %event_id, error = %e, "could not evaluate push rules");
                    PushOutcome::default()
                })
            }
            _ => PushOutcome::default(),
        };
        let placing = Placing {
            event_id: event_id.as_str(),
            json: &json,
            pdu: &parsed,
            membership: membership.as_deref(),
            redactions: &redactions,
            txn: None,
            push: &push_actions,
            position: match (&rejected, soft_failed, arrival) {
                (Some(_), _, _) | (None, true, _) => Position::None,
                (None, false, Arrival::Backfill) => Position::Backfill,
                _ => Position::Live,
            },
            rejected_reason: rejected.as_deref(),
            soft_failed,
            local: false,
            from_outlier,
        };
        let before_state = match &before {
            Before::Resolved(state) => Some(state.clone()),
            Before::Group(_) => None,
        };
        let stored = self.place_event(room_id, &rules, head, before, before_state, placing).await?;
        drop(_guard);
        if let (Persisted::Stored(_), Some(RedactionPlan::Hold { target })) = (&stored, &redaction) {
            // The target may have been stored as an outlier meanwhile (outliers are
            // stored outside the room's lock), after looking for held redactions.
            self.apply_held_redactions(room_id, &rules, std::slice::from_ref(target)).await?;
        }
        let at = match stored {
            Persisted::Stored(at) => at,
            Persisted::Duplicate(_) | Persisted::TxnTaken => return Ok(PduOutcome::Duplicate { event_id }),
        };
        if let Some(reason) = rejected {
            return Ok(PduOutcome::Rejected { event_id, reason });
        }
        if soft_failed {
            return Ok(PduOutcome::SoftFailed { event_id });
        }
        if arrival != Arrival::Backfill {
            self.wake_for_event(room_id, parsed.state_key.as_deref(), membership.is_some()).await?;
        }
        Ok(PduOutcome::Accepted { event_id, position: at.position })
    }
}
