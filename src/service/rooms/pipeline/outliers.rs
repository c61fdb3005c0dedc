//! Events stored without state: a join's state and auth chain, in batches.

use std::collections::{HashMap, HashSet};

use ruma::{
    CanonicalJsonObject, EventId, OwnedEventId, RoomId, RoomVersionId, events::TimelineEventType,
    room_version_rules::RoomVersionRules, state_res,
};

use super::{Arrival, PduOutcome, check_against, create_event_id};
use crate::service::rooms::{append::rules_for, build::StateMap, pdu::Pdu};
use crate::{
    error::Result,
    service::Services,
    storage::{Outlier, StateEntry},
};

impl Services {
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
    pub(super) async fn store_outliers(
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
        // Redactions that came before them (rare: checked once per batch).
        let accepted: Vec<String> = events
            .iter()
            .zip(&reasons)
            .filter(|(_, reason)| reason.is_none())
            .map(|((id, _, _), _)| id.to_string())
            .collect();
        self.apply_held_redactions(room_id, rules, &accepted).await?;
        Ok(events
            .into_iter()
            .zip(reasons)
            .map(|((event_id, _, _), reason)| match reason {
                Some(reason) => PduOutcome::Rejected { event_id, reason },
                None => PduOutcome::Accepted { event_id, position: None },
            })
            .collect())
    }
}
