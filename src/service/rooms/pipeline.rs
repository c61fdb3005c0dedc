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
//! the room's servers (`fetch_events_from_room`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::RwLock,
};

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, EventId, OwnedEventId, OwnedServerName, OwnedUserId, RoomId,
    RoomVersionId, UserId,
    events::{StateEventType, TimelineEventType},
    room_version_rules::RoomVersionRules,
    serde::Base64,
    signatures::{PublicKeyMap, Verified},
    state_res::{self, utils::event_id_set::EventIdSet},
};

use super::{
    append::{RoomHead, rules_for},
    build::StateMap,
    pdu::Pdu,
};
use crate::{
    error::{Error, Result},
    service::Services,
    storage::{
        CurrentChange, Dag, ExtremityChange, NewEvent, Outlier, Persisted, Position, StateBefore, StateEntry, StoredAt,
    },
};

/// Keys known without asking anyone: our own, and any added with `add`.
pub struct KnownKeys {
    keys: RwLock<PublicKeyMap>,
}

impl KnownKeys {
    pub fn new(server: &str, key_id: &str, public_key: &[u8]) -> Self {
        let keys = KnownKeys { keys: RwLock::new(BTreeMap::new()) };
        keys.add(server, key_id, public_key);
        keys
    }

    /// Trusts `public_key` as `server`'s key `key_id` (such as "ed25519:1").
    pub fn add(&self, server: &str, key_id: &str, public_key: &[u8]) {
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        keys.entry(server.to_owned()).or_default().insert(key_id.to_owned(), Base64::new(public_key.to_vec()));
    }

    /// The known keys of those of `servers` that have some.
    pub fn public_keys(&self, servers: &BTreeSet<OwnedServerName>) -> PublicKeyMap {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.iter()
            .filter(|(s, _)| servers.iter().any(|n| n.as_str() == s.as_str()))
            .map(|(s, k)| (s.clone(), k.clone()))
            .collect()
    }
}

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

/// An event ready to be placed: checked, with what to store alongside it.
pub(crate) struct Placing<'a> {
    pub event_id: &'a str,
    pub json: &'a str,
    pub pdu: &'a Pdu,
    pub membership: Option<&'a str>,
    pub redaction: Option<(&'a str, &'a str)>,
    pub txn: Option<crate::storage::EventTxn<'a>>,
    pub push_actions: &'a [(String, bool)],
    pub position: Position,
    pub rejected_reason: Option<&'a str>,
    pub soft_failed: bool,
    /// Built here on top of the forward extremities it names (no child can exist).
    pub local: bool,
    /// Stored as an outlier until now.
    pub from_outlier: bool,
}

/// The state before an event, as the pipeline found it.
pub(crate) enum Before {
    /// A state group (the state after the one prev, or the current state).
    Group(i64),
    /// Resolved from several prevs' states.
    Resolved(IdState),
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
        self.handle_pdu_at(room_id, version, pdu, arrival, None).await
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
        self.handle_pdu_at(room_id, version, join, Arrival::Live, Some(state_before)).await
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
        state_before: Option<i64>,
    ) -> Result<PduOutcome> {
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
        let known = self.store.get_events_by_ids(&prev_ids).await?;
        if known.len() < prev_ids.len() {
            let missing: Vec<OwnedEventId> = parsed
                .prev_events
                .iter()
                .filter(|p| !known.iter().any(|k| k.event_id == p.as_str()))
                .take(MAX_FETCH)
                .cloned()
                .collect();
            // Missing prevs are fetched before this, outside the room's lock, by the
            // receiver of `/send` (`federation/transactions.rs`, `get_missing_events`);
            // what is still missing becomes a backward extremity.
            tracing::debug!(event_id = %event_id, missing = missing.len(), "placing an event with unknown prevs");
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
        let before = match prev_groups.as_slice() {
            _ if state_before.is_some() => Before::Group(state_before.unwrap_or_default()),
            // TODO(federation): with no prev event's state known, the spec wants the
            // state at the event from the sender (`/state_ids`, then `/event` for the
            // ones we miss). Until that fetch plugs in here, the room's current state
            // stands in for it.
            [] => Before::Group(head.state_group),
            [one] => Before::Group(*one),
            several => {
                let mut states = Vec::with_capacity(several.len());
                for group in several {
                    states.push(self.group_state(*group).await?);
                }
                Before::Resolved(self.resolve_states(room_id, &rules, states, None).await?)
            }
        };
        // Only the entries the auth rules read are loaded (the room may have many members).
        let keys = auth_keys(&rules, &parsed)?;
        if rejected.is_none() {
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
            Some(target) => self.remote_redaction(target, &parsed, room_id, &rules).await?,
            None => None,
        };
        let push_actions = match (accepted_live, &auth_events) {
            (true, Ok(auth)) => {
                self.push_actions_for(room_id, &parsed.sender, &json, auth, &rules).await.unwrap_or_else(|e| {
                    tracing::warn!(event_id = %event_id, error = %e, "could not evaluate push rules");
                    Vec::new()
                })
            }
            _ => Vec::new(),
        };
        let placing = Placing {
            event_id: event_id.as_str(),
            json: &json,
            pdu: &parsed,
            membership: membership.as_deref(),
            redaction: redaction.as_ref().map(|(id, json)| (id.as_str(), json.as_str())),
            txn: None,
            push_actions: &push_actions,
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

    /// Stores a batch of events without state (a `send_join` answer's state and auth
    /// chain): each checked for format, signatures and content hash (refused ones are
    /// left out), then against its own auth events where those are in the batch or
    /// stored (failures stored as rejected), all in a few transactions, without stream
    /// positions, state groups or wake-ups. Returns what became of each, in order; an
    /// `Err` in the list is an event refused outright.
    pub async fn handle_outliers(
        &self,
        room_id: &RoomId,
        version: &RoomVersionId,
        pdus: Vec<CanonicalJsonObject>,
    ) -> Result<Vec<Result<PduOutcome>>> {
        let rules = rules_for(version)?;
        let mut checked = Vec::with_capacity(pdus.len());
        let mut results: Vec<Option<Result<PduOutcome>>> = Vec::with_capacity(pdus.len());
        for pdu in pdus {
            match self.check_pdu(room_id, &rules, pdu, Arrival::Outlier) {
                Ok(pending) => match pending.await_keys(self).await {
                    Ok(c) => {
                        checked.push(c);
                        results.push(None);
                    }
                    Err(e) => results.push(Some(Err(e))),
                },
                Err(e) => results.push(Some(Err(e))),
            }
        }
        let mut outcomes = self.store_outliers(room_id, &rules, checked).await?.into_iter();
        Ok(results.into_iter().map(|r| r.unwrap_or_else(|| Ok(outcomes.next().expect("one outcome each")))).collect())
    }

    /// Writes the state before a join event (from a `send_join` answer, its events
    /// stored as outliers) as a state group; returns its id.
    pub async fn store_state_group(&self, room_id: &RoomId, state: &[StateEntry]) -> Result<i64> {
        self.store.insert_state_group(room_id.as_str(), state).await
    }

    /// Auth-checks checked outliers against their auth events (in the batch or stored)
    /// and stores them in one go.
    async fn store_outliers(
        &self,
        room_id: &RoomId,
        rules: &RoomVersionRules,
        events: Vec<(OwnedEventId, String, Pdu)>,
    ) -> Result<Vec<PduOutcome>> {
        let in_batch: HashMap<&EventId, &Pdu> = events.iter().map(|(id, _, p)| (id.as_ref(), p)).collect();
        let mut wanted: Vec<String> = events
            .iter()
            .flat_map(|(_, _, p)| p.auth_events.iter())
            .filter(|a| !in_batch.contains_key::<EventId>(a.as_ref()))
            .map(|a| a.to_string())
            .collect();
        if let Some(create) = create_event_id(room_id, rules) {
            wanted.push(create.to_string());
        }
        wanted.sort();
        wanted.dedup();
        let stored_events = self.store.get_events_by_ids(&wanted).await?;
        let stored_rejected: HashSet<&str> =
            stored_events.iter().filter(|e| e.rejected_reason.is_some()).map(|e| e.event_id.as_str()).collect();
        let stored: HashMap<OwnedEventId, Pdu> =
            stored_events.iter().filter_map(|e| Pdu::from_stored(e).ok().map(|p| (p.event_id.clone(), p))).collect();
        let create_id = create_event_id(room_id, rules);
        // Checked with auth events first (a send_join answer is in no particular order),
        // so that an event whose auth event was rejected is rejected too.
        let index: HashMap<&EventId, usize> =
            events.iter().enumerate().map(|(i, (id, _, _))| (id.as_ref(), i)).collect();
        let mut order = Vec::with_capacity(events.len());
        let mut placed = vec![false; events.len()];
        for start in 0..events.len() {
            // Iterative depth-first walk down the auth events within the batch.
            let mut stack = vec![(start, false)];
            while let Some((i, children_done)) = stack.pop() {
                if placed[i] {
                    continue;
                }
                if children_done {
                    placed[i] = true;
                    order.push(i);
                    continue;
                }
                stack.push((i, true));
                for auth in &events[i].2.auth_events {
                    if let Some(&j) = index.get::<EventId>(auth.as_ref())
                        && !placed[j]
                        && stack.len() <= events.len() * 2
                    {
                        stack.push((j, false));
                    }
                }
            }
        }
        let mut reasons: Vec<Option<String>> = vec![None; events.len()];
        for i in order {
            let pdu = &events[i].2;
            let lookup = |id: &EventId| in_batch.get(id).map(|p| (*p).clone()).or_else(|| stored.get(id).cloned());
            let rejected_auth = pdu.auth_events.iter().find(|a| {
                index.get::<EventId>(a.as_ref()).is_some_and(|&j| reasons[j].is_some())
                    || stored_rejected.contains(a.as_str())
            });
            let mut auth = StateMap::new();
            let mut missing = false;
            for id in pdu.auth_events.iter().chain(create_id.as_ref()) {
                match lookup(id) {
                    Some(p) => {
                        if let Some(k) = &p.state_key {
                            auth.insert((p.kind.to_string().into(), k.clone()), p);
                        }
                    }
                    None => missing |= pdu.auth_events.contains(id),
                }
            }
            reasons[i] = if let Some(id) = rejected_auth {
                Some(format!("its auth event {id} was rejected"))
            } else if missing {
                // TODO(federation): fetch the auth events a `send_join` answer lacks.
                Some("some of its auth events are unknown".to_owned())
            } else if pdu.kind == TimelineEventType::RoomCreate {
                state_res::check_state_independent_auth_rules(&rules.authorization, pdu, lookup).err()
            } else {
                check_against(rules, pdu, &auth, &auth).err()
            };
        }
        let types: Vec<String> = events.iter().map(|(_, _, p)| p.kind.to_string()).collect();
        let prevs: Vec<Vec<String>> =
            events.iter().map(|(_, _, p)| p.prev_events.iter().map(|e| e.to_string()).collect()).collect();
        let auths: Vec<Vec<String>> =
            events.iter().map(|(_, _, p)| p.auth_events.iter().map(|e| e.to_string()).collect()).collect();
        let senders: Vec<String> = events.iter().map(|(_, _, p)| p.sender.to_string()).collect();
        let rows: Vec<Outlier<'_>> = events
            .iter()
            .enumerate()
            .map(|(i, (id, json, p))| Outlier {
                event_id: id.as_str(),
                room_id: room_id.as_str(),
                sender: &senders[i],
                event_type: &types[i],
                state_key: p.state_key.as_deref(),
                depth: i64::try_from(u64::from(p.depth)).unwrap_or(i64::MAX),
                origin_server_ts: p.origin_server_ts.get().into(),
                json,
                prev_events: &prevs[i],
                auth_events: &auths[i],
                rejected_reason: reasons[i].as_deref(),
            })
            .collect();
        self.store.persist_outliers(&rows).await?;
        Ok(events
            .into_iter()
            .zip(reasons)
            .map(|((event_id, _, _), reason)| match reason {
                Some(reason) => PduOutcome::Rejected { event_id, reason },
                None => PduOutcome::Accepted { event_id, position: None },
            })
            .collect())
    }

    /// Format, event id and room of a PDU, before its signatures are checked.
    fn check_pdu(
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
    async fn load_auth_events(
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
    async fn pdus_of_ids(&self, ids: &[String]) -> Result<StateMap> {
        let mut map = StateMap::new();
        for event in self.store.get_events_by_ids(ids).await? {
            let pdu = Pdu::from_stored(&event)?;
            map.insert((event.event_type.as_str().into(), event.state_key.clone().unwrap_or_default()), pdu);
        }
        Ok(map)
    }

    /// The full state of a group.
    pub(crate) async fn group_state(&self, group: i64) -> Result<IdState> {
        Ok(self.store.get_state_group(group, None, None).await?.into_iter().map(|(t, k, id)| ((t, k), id)).collect())
    }

    /// The room's head: cached, or read back (forward extremities with depths, and the
    /// current state's group: the one extremity's, or resolved over several and written
    /// as a group). Call under the room's lock.
    pub(crate) async fn room_head(&self, room_id: &RoomId, rules: &RoomVersionRules) -> Result<RoomHead> {
        if let Some(head) = self.room_heads.get(room_id) {
            return Ok(head);
        }
        let rows = self.store.get_room_head(room_id.as_str()).await?;
        let mut groups: Vec<i64> = rows.iter().map(|r| r.2).filter(|g| *g != 0).collect();
        groups.sort_unstable();
        groups.dedup();
        let state_group = match groups.as_slice() {
            [] => return Err(Error::not_found("Unknown room")),
            [one] => *one,
            several => {
                let mut states = Vec::with_capacity(several.len());
                for group in several {
                    states.push(self.group_state(*group).await?);
                }
                let resolved = self.resolve_states(room_id, rules, states, None).await?;
                self.store.insert_state_group(room_id.as_str(), &to_entries(&resolved)).await?
            }
        };
        let head = RoomHead { extremities: rows.into_iter().map(|r| (r.0, r.1)).collect(), state_group };
        self.room_heads.set(room_id, head.clone());
        Ok(head)
    }

    /// Places a checked event in the DAG, the stream and the room's state, and stores
    /// it: the state before it (`before`, whose full state `before_state` the caller may
    /// already have read), its extremities, and the room's new current state (unchanged,
    /// the event's own state when it becomes the only forward extremity, or resolved over
    /// several). Updates `RoomHeads` (dropped when storing fails). Call under the room's
    /// lock with its head.
    pub(crate) async fn place_event(
        &self,
        room_id: &RoomId,
        rules: &RoomVersionRules,
        head: RoomHead,
        before: Before,
        before_state: Option<IdState>,
        e: Placing<'_>,
    ) -> Result<Persisted> {
        let accepted = e.rejected_reason.is_none() && !e.soft_failed;
        let prevs: Vec<String> = e.pdu.prev_events.iter().map(|p| p.to_string()).collect();
        let auths: Vec<String> = e.pdu.auth_events.iter().map(|p| p.to_string()).collect();
        let event_type = e.pdu.kind.to_string();
        let state_key = e.pdu.state_key.as_deref();
        let depth = i64::try_from(u64::from(e.pdu.depth)).unwrap_or(i64::MAX);

        // The forward extremities after it.
        let mut extremities: Vec<(String, i64)> = head.extremities.clone();
        let becomes_extremity = accepted && (e.local || !self.store.has_stored_children(e.event_id).await?);
        if accepted {
            extremities.retain(|(id, _)| !prevs.contains(id));
            if becomes_extremity {
                extremities.push((e.event_id.to_owned(), depth));
            }
        }
        let unchanged_extremities = extremities.is_empty() || {
            let mut a: Vec<&str> = extremities.iter().map(|x| x.0.as_str()).collect();
            let mut b: Vec<&str> = head.extremities.iter().map(|x| x.0.as_str()).collect();
            a.sort_unstable();
            b.sort_unstable();
            a == b
        };
        let linear =
            matches!(before, Before::Group(g) if g == head.state_group) && extremities.len() == 1 && becomes_extremity;

        // The room's current state after it, as a delta.
        let mut before_state = before_state;
        let mut set: Vec<StateEntry> = Vec::new();
        let mut removed: Vec<(String, String)> = Vec::new();
        let mut memberships: Vec<(String, String, String)> = Vec::new();
        let mut current_group: Option<Vec<StateEntry>> = None;
        let resolve_current = accepted && !linear && !unchanged_extremities;
        if resolve_current {
            let mut after = match before_state.take() {
                Some(state) => state,
                None => match &before {
                    Before::Group(g) => self.group_state(*g).await?,
                    Before::Resolved(state) => state.clone(),
                },
            };
            before_state = Some(after.clone());
            if let Some(k) = state_key {
                after.insert((event_type.clone(), k.to_owned()), e.event_id.to_owned());
            }
            let new_current = if extremities.len() == 1 && becomes_extremity {
                after
            } else {
                let mut states = Vec::with_capacity(extremities.len());
                let groups = self
                    .store
                    .get_state_groups_of(&extremities.iter().map(|x| x.0.clone()).collect::<Vec<_>>())
                    .await?;
                for (id, group) in groups {
                    if id == e.event_id {
                        continue;
                    }
                    states.push(self.group_state(group).await?);
                }
                if becomes_extremity {
                    states.push(after);
                }
                let resolved = self.resolve_states(room_id, rules, states, Some(e.pdu)).await?;
                current_group = Some(to_entries(&resolved));
                resolved
            };
            let old = self.group_state(head.state_group).await?;
            for (key, id) in &new_current {
                if old.get(key) != Some(id) {
                    set.push((key.0.clone(), key.1.clone(), id.clone()));
                }
            }
            removed = old.keys().filter(|k| !new_current.contains_key(*k)).cloned().collect();
            let member_ids: Vec<String> =
                set.iter().filter(|(t, _, _)| t == "m.room.member").map(|(_, _, id)| id.clone()).collect();
            for event in self.store.get_events_by_ids(&member_ids).await? {
                if let Some(user) = event.state_key.clone() {
                    memberships.push((user, super::messages::membership_of(&event.json), event.event_id.clone()));
                }
            }
            if e.membership.is_some() && member_ids.iter().any(|id| id == e.event_id) {
                // Its own row is written from `set` too (the event is not stored yet, or
                // stored as an outlier).
                if let (Some(user), Some(m)) = (state_key, e.membership) {
                    memberships.retain(|(u, _, _)| u != user);
                    memberships.push((user.to_owned(), m.to_owned(), e.event_id.to_owned()));
                }
            }
        }
        let replaces_state = match (state_key, &before_state, linear) {
            (Some(k), Some(state), _) => Some(state.get(&(event_type.clone(), k.to_owned())).map(String::as_str)),
            (Some(_), None, true) => None,
            (Some(k), None, false) => {
                let state = match &before {
                    Before::Group(g) => self.group_state(*g).await?,
                    Before::Resolved(state) => state.clone(),
                };
                before_state = Some(state);
                let state = before_state.as_ref().expect("just set");
                Some(state.get(&(event_type.clone(), k.to_owned())).map(String::as_str))
            }
            (None, _, _) => Some(None),
        };
        let resolved_before = match &before {
            Before::Resolved(state) => Some(to_entries(state)),
            Before::Group(_) => None,
        };
        let dag = Dag {
            position: e.position,
            outlier: false,
            rejected_reason: e.rejected_reason,
            soft_failed: e.soft_failed,
            state_before: match (&before, &resolved_before) {
                _ if e.rejected_reason.is_some() => StateBefore::None,
                (Before::Group(g), _) => StateBefore::Group(*g),
                (Before::Resolved(_), Some(entries)) => StateBefore::Resolved(entries),
                (Before::Resolved(_), None) => StateBefore::None,
            },
            current: if !accepted || (unchanged_extremities && !linear) {
                CurrentChange::Unchanged
            } else if linear {
                CurrentChange::Append
            } else {
                CurrentChange::Delta {
                    set: &set,
                    removed: &removed,
                    memberships: &memberships,
                    group: current_group.as_deref(),
                }
            },
            extremities: match (accepted, e.local && !resolve_current) {
                (false, _) => ExtremityChange::Unchanged,
                (true, true) => ExtremityChange::Linear,
                (true, false) => ExtremityChange::General,
            },
            replaces_state,
            from_outlier: e.from_outlier,
        };
        let persisted = self
            .store
            .persist_event(NewEvent {
                event_id: e.event_id,
                room_id: room_id.as_str(),
                sender: e.pdu.sender.as_str(),
                event_type: &event_type,
                state_key,
                depth,
                origin_server_ts: e.pdu.origin_server_ts.get().into(),
                json: e.json,
                prev_events: &prevs,
                auth_events: &auths,
                membership: e.membership,
                redaction: e.redaction,
                txn: e.txn,
                push_actions: e.push_actions,
                dag,
            })
            .await;
        match &persisted {
            Ok(Persisted::Stored(StoredAt { state_group, current_group, .. })) => {
                if accepted {
                    let state_group = if linear || (extremities.len() == 1 && becomes_extremity) {
                        state_group.unwrap_or(head.state_group)
                    } else {
                        current_group.unwrap_or(head.state_group)
                    };
                    self.room_heads.set(room_id, RoomHead { extremities, state_group });
                }
                if accepted && (e.membership.is_some() || !memberships.is_empty()) {
                    self.forget_member_cache(room_id);
                }
            }
            // Whatever happened, the database says what the head is.
            _ => self.room_heads.forget(room_id),
        }
        persisted
    }

    /// Wakes the `/sync`s of the room's local members (and of a local member event's
    /// target, who may not be joined).
    pub(crate) async fn wake_for_event(
        &self,
        room_id: &RoomId,
        state_key: Option<&str>,
        is_member: bool,
    ) -> Result<()> {
        self.notifier.notify_users(&self.joined_local_members(room_id).await?);
        if let Some(target) = state_key.filter(|_| is_member)
            && let Ok(target) = OwnedUserId::try_from(target)
            && target.server_name() == self.server_name()
        {
            // Invited, left, kicked or banned users are no longer (or not yet) joined.
            self.notifier.notify_users(&[target]);
        }
        Ok(())
    }

    /// The redacted JSON of a remote redaction's target, when the redaction may apply
    /// without reading power levels: the target was sent from the redaction sender's
    /// server.
    async fn remote_redaction(
        &self,
        target: &EventId,
        redaction: &Pdu,
        room_id: &RoomId,
        rules: &RoomVersionRules,
    ) -> Result<Option<(String, String)>> {
        let Some(stored) = self.store.get_event(target.as_str()).await? else { return Ok(None) };
        let same_server = OwnedUserId::try_from(stored.sender.as_str())
            .is_ok_and(|s| s.server_name() == redaction.sender.server_name());
        // TODO(federation): a moderator's redaction of another server's event (power
        // levels at the redaction) is not applied yet.
        if !same_server {
            return Ok(None);
        }
        self.redacted_json_of(target.as_str(), room_id, rules).await
    }

    /// State resolution v2 (ruma's) over several states, with their auth chains read
    /// from `event_auth`. States that agree need no resolution. `pending` is the event
    /// being stored, when its state is among them (it is not in the database yet).
    pub(crate) async fn resolve_states(
        &self,
        room_id: &RoomId,
        rules: &RoomVersionRules,
        states: Vec<IdState>,
        pending: Option<&Pdu>,
    ) -> Result<IdState> {
        let Some(first) = states.first() else { return Ok(IdState::new()) };
        if states.iter().all(|s| s == first) {
            return Ok(first.clone());
        }
        let mut chains: Vec<EventIdSet<OwnedEventId>> = Vec::with_capacity(states.len());
        let mut all: HashSet<String> = HashSet::new();
        for state in &states {
            let mut ids: Vec<String> = state.values().cloned().collect();
            // The pending event's auth chain is its auth events and theirs.
            let pending_auth: Vec<String> = pending
                .filter(|p| ids.iter().any(|id| id == p.event_id.as_str()))
                .map(|p| p.auth_events.iter().map(|a| a.to_string()).collect())
                .unwrap_or_default();
            ids.extend(pending_auth.iter().cloned());
            let mut chain = self.store.get_auth_chain(&ids, MAX_AUTH_CHAIN).await?;
            chain.extend(pending_auth);
            ids.truncate(state.len());
            if chain.len() as i64 >= MAX_AUTH_CHAIN {
                return Err(Error::internal(format!("auth chain of a state in {room_id} too long to resolve")));
            }
            all.extend(ids);
            all.extend(chain.iter().cloned());
            chains.push(chain.into_iter().filter_map(|id| OwnedEventId::try_from(id).ok()).collect());
        }
        let all: Vec<String> = all.into_iter().collect();
        let mut events: HashMap<OwnedEventId, Pdu> = self
            .store
            .get_events_by_ids(&all)
            .await?
            .iter()
            .filter_map(|e| Pdu::from_stored(e).ok().map(|p| (p.event_id.clone(), p)))
            .collect();
        if let Some(p) = pending {
            events.insert(p.event_id.clone(), p.clone());
        }
        let maps: Vec<state_res::StateMap<OwnedEventId>> = states
            .iter()
            .map(|s| {
                s.iter()
                    .filter_map(|((t, k), id)| {
                        OwnedEventId::try_from(id.as_str()).ok().map(|id| ((t.as_str().into(), k.clone()), id))
                    })
                    .collect()
            })
            .collect();
        let resolved = state_res::resolve(
            &rules.authorization,
            rules.state_res.v2_rules().ok_or_else(|| Error::internal("no state resolution v2 rules"))?,
            &maps,
            chains,
            |id: &EventId| events.get(id).cloned(),
            |conflicted: &state_res::StateMap<Vec<OwnedEventId>>| {
                Some(conflicted_subgraph(conflicted, &events).into_iter().collect())
            },
        )
        .map_err(|e| Error::internal(format!("state resolution failed in {room_id}: {e}")))?;
        Ok(resolved.into_iter().map(|((t, k), id)| ((t.to_string(), k), id.to_string())).collect())
    }
}

/// A PDU whose format and id were checked, waiting for its signatures' check.
struct PendingPdu {
    event_id: OwnedEventId,
    pdu: CanonicalJsonObject,
    rules: RoomVersionRules,
    trusted: bool,
}

impl PendingPdu {
    /// Checks the signatures the spec requires (refused if one fails) and the content
    /// hash (the redacted form kept if it does not match); returns the id, the JSON to
    /// store and the parsed event.
    async fn await_keys(self, services: &Services) -> Result<(OwnedEventId, String, Pdu)> {
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
fn create_event_id(room_id: &RoomId, rules: &RoomVersionRules) -> Option<OwnedEventId> {
    rules
        .authorization
        .room_create_event_id_as_room_id
        .then(|| OwnedEventId::try_from(format!("${}", room_id.strip_sigil())).ok())
        .flatten()
}

/// The (type, state key) pairs the auth rules read for `pdu`, with the create event.
fn auth_keys(rules: &RoomVersionRules, pdu: &Pdu) -> Result<Vec<(String, String)>> {
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
fn check_against(
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

/// The conflicted state subgraph (room v12): every event on an `auth_events` path from
/// one conflicted state event to another, endpoints included, from the loaded events.
fn conflicted_subgraph(
    conflicted: &state_res::StateMap<Vec<OwnedEventId>>,
    events: &HashMap<OwnedEventId, Pdu>,
) -> HashSet<OwnedEventId> {
    let starts: HashSet<&EventId> = conflicted.values().flatten().map(|id| id.as_ref()).collect();
    // Events reachable from a conflicted event through one or more auth edges, and the
    // auth edges among them reversed.
    let mut reachable: HashSet<&EventId> = HashSet::new();
    let mut children: HashMap<&EventId, Vec<&EventId>> = HashMap::new();
    let mut stack: Vec<&EventId> = starts.iter().copied().collect();
    let mut visited: HashSet<&EventId> = starts.clone();
    while let Some(id) = stack.pop() {
        if let Some(pdu) = events.get(id) {
            for auth in &pdu.auth_events {
                children.entry(auth.as_ref()).or_default().push(id);
                reachable.insert(auth.as_ref());
                if visited.insert(auth.as_ref()) {
                    stack.push(auth.as_ref());
                }
            }
        }
    }
    // Walking the reversed edges up from the conflicted events finds the events that
    // lead to one: those also reachable from one lie on a path between two.
    let mut leads: HashSet<&EventId> = HashSet::new();
    let mut stack: Vec<&EventId> = starts.iter().copied().collect();
    while let Some(id) = stack.pop() {
        for child in children.get(id).into_iter().flatten() {
            if leads.insert(child) {
                stack.push(child);
            }
        }
    }
    let mut subgraph: HashSet<OwnedEventId> = starts.iter().map(|id| (*id).to_owned()).collect();
    subgraph.extend(reachable.into_iter().filter(|id| leads.contains(id)).map(|id| id.to_owned()));
    subgraph
}
