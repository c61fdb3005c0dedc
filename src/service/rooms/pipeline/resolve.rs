//! State resolution over several states, with auth chains from `event_auth`.

use std::collections::{HashMap, HashSet};

use ruma::{
    EventId, OwnedEventId, RoomId,
    room_version_rules::RoomVersionRules,
    state_res::{self, utils::event_id_set::EventIdSet},
};

use super::{IdState, MAX_AUTH_CHAIN};
use crate::service::rooms::pdu::Pdu;
use crate::{
    error::{Error, Result},
    service::Services,
};

impl Services {
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
            // The full auth chain of a state holds its own events too (as Synapse and
            // ruma's own tests count it): an event in one state and in the chain of
            // another is then not in the auth difference.
            chain.extend(ids.iter().cloned());
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

/// The conflicted state subgraph (room v12): every event on an `auth_events` path from
/// one conflicted state event to another, endpoints included, from the loaded events.
pub(super) fn conflicted_subgraph(
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
