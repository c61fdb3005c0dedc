//! Events and state for other servers in a room: `event`, `state`, `state_ids`,
//! `event_auth` and `get_missing_events`. Each answers only a server with a member
//! joined to the event's room, and never rejected events; `event` and `state` refuse
//! an event the server may not see by the state at it, `get_missing_events` hands such
//! events out redacted (`visibility.rs`).

use std::collections::BTreeSet;

use ruma::{EventId, OwnedEventId, RoomId, ServerName};
use serde_json::value::RawValue;

use crate::{
    error::{Error, Result},
    service::{Services, rooms::pdu::Pdu},
    storage::StoredEvent,
};

/// Most events `get_missing_events` answers.
const MAX_MISSING: usize = 50;
/// Most events of an auth chain served.
const MAX_AUTH_CHAIN: i64 = 100_000;

fn raw(event: &StoredEvent) -> Result<Box<RawValue>> {
    RawValue::from_string(event.json.clone()).map_err(Error::internal)
}

impl Services {
    /// Refuses `origin` unless one of its users is joined to `room_id`.
    pub(crate) async fn require_server_in_room(&self, origin: &ServerName, room_id: &RoomId) -> Result<()> {
        self.room_version(room_id).await?;
        let joined = self.room_remote_servers(room_id).await?;
        if joined.iter().any(|s| s == origin) {
            self.require_server_allowed(room_id, origin).await
        } else {
            Err(Error::forbidden("Your server has no member in this room"))
        }
    }

    /// An event of a room `origin` is in, as stored (not rejected).
    async fn event_for(&self, origin: &ServerName, event_id: &EventId) -> Result<StoredEvent> {
        let event = self
            .store
            .get_event(event_id.as_str())
            .await?
            .filter(|e| e.rejected_reason.is_none())
            .ok_or_else(|| Error::not_found("No such event"))?;
        let room_id = ruma::OwnedRoomId::try_from(event.room_id.as_str()).map_err(Error::internal)?;
        self.require_server_in_room(origin, &room_id).await?;
        Ok(event)
    }

    /// `GET /event/{eventId}`: refused when `origin` may not see it by the state at it.
    pub async fn serve_event(&self, origin: &ServerName, event_id: &EventId) -> Result<Box<RawValue>> {
        let event = self.event_for(origin, event_id).await?;
        self.require_visible_to_server(origin, &event).await?;
        raw(&event)
    }

    /// Refuses `origin` an event it may not see by the state at it.
    async fn require_visible_to_server(&self, origin: &ServerName, event: &StoredEvent) -> Result<()> {
        if self.visible_to_server(origin, std::slice::from_ref(event)).await?.contains(&event.event_id) {
            Ok(())
        } else {
            Err(Error::forbidden("Your server may not see that event"))
        }
    }

    /// `GET /state_ids/{roomId}?event_id=`: the ids of the state before the event, and
    /// of its auth chain. With `full`, the events themselves (`GET /state`).
    pub async fn serve_state(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<(Vec<StoredEvent>, Vec<StoredEvent>)> {
        let event = self.event_for(origin, event_id).await?;
        if event.room_id != room_id.as_str() {
            return Err(Error::not_found("No such event in this room"));
        }
        self.require_visible_to_server(origin, &event).await?;
        let group = self
            .state_group_before(&event)
            .await?
            .filter(|g| *g != 0)
            .ok_or_else(|| Error::not_found("The state at that event is not known here"))?;
        let state = self.state_events_at(group).await?;
        let ids: Vec<String> = state.iter().map(|e| e.event_id.clone()).collect();
        let chain_ids = self.store.get_auth_chain(&ids, MAX_AUTH_CHAIN).await?;
        let chain = self.store.get_events_by_ids(&chain_ids).await?;
        Ok((state, chain))
    }

    /// `GET /event_auth/{roomId}/{eventId}`: the event's auth chain.
    pub async fn serve_event_auth(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<Vec<Box<RawValue>>> {
        let event = self.event_for(origin, event_id).await?;
        if event.room_id != room_id.as_str() {
            return Err(Error::not_found("No such event in this room"));
        }
        let chain_ids = self.store.get_auth_chain(std::slice::from_ref(&event.event_id), MAX_AUTH_CHAIN).await?;
        self.store.get_events_by_ids(&chain_ids).await?.iter().map(raw).collect()
    }

    /// `POST /get_missing_events/{roomId}`: events before `latest` (walking prev
    /// events back) that are not `earliest` nor before them, at least `min_depth` deep,
    /// oldest first, at most `limit`.
    pub async fn serve_missing_events(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        earliest: &[OwnedEventId],
        latest: &[OwnedEventId],
        limit: usize,
        min_depth: i64,
    ) -> Result<Vec<Box<RawValue>>> {
        self.require_server_in_room(origin, room_id).await?;
        let limit = limit.clamp(1, MAX_MISSING);
        let mut seen: BTreeSet<String> = earliest.iter().map(|e| e.to_string()).collect();
        seen.extend(latest.iter().map(|e| e.to_string()));
        let mut frontier: Vec<String> = Vec::new();
        for event in self.store.get_events_by_ids(&latest.iter().map(|e| e.to_string()).collect::<Vec<_>>()).await? {
            if event.room_id == room_id.as_str()
                && let Ok(pdu) = Pdu::from_stored(&event)
            {
                frontier.extend(pdu.prev_events.iter().map(|p| p.to_string()));
            }
        }
        let mut found: Vec<StoredEvent> = Vec::new();
        while !frontier.is_empty() && found.len() < limit {
            frontier.retain(|id| seen.insert(id.clone()));
            let mut next = Vec::new();
            for event in self.store.get_events_by_ids(&frontier).await? {
                if event.room_id != room_id.as_str() || event.rejected_reason.is_some() || event.depth < min_depth {
                    continue;
                }
                if let Ok(pdu) = Pdu::from_stored(&event) {
                    next.extend(pdu.prev_events.iter().map(|p| p.to_string()));
                }
                found.push(event);
            }
            frontier = next;
        }
        // The nearest ones to `latest` are the ones that matter: keep those, oldest first.
        found.sort_by_key(|e| std::cmp::Reverse(e.depth));
        found.truncate(limit);
        found.reverse();
        let version = self.room_version(room_id).await?;
        self.redact_invisible_for_server(origin, &version, found).await?.iter().map(raw).collect()
    }
}

/// Most servers asked for one missing event, and the longest the whole fetch may take
/// (it runs under the room's lock, from the event pipeline).
const FETCH_SERVERS: usize = 3;
const FETCH_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

impl Services {
    /// Events this server misses (the auth events of a PDU), asked of the room's other
    /// servers (`GET /event`), each id from the first server that has it; all at once,
    /// bounded in time. Answers what came (unchecked: the pipeline checks it).
    pub async fn fetch_events_from_room(
        &self,
        room_id: &RoomId,
        event_ids: &[OwnedEventId],
    ) -> Vec<ruma::CanonicalJsonObject> {
        use ruma::api::federation::event::get_event::v1 as get_event;
        let servers = match self.room_remote_servers(room_id).await {
            Ok(servers) => servers,
            Err(_) => return Vec::new(),
        };
        if servers.is_empty() {
            return Vec::new();
        }
        let fetches = event_ids.iter().map(|id| {
            let servers = servers.clone();
            async move {
                for server in servers.iter().take(FETCH_SERVERS) {
                    match self.send_federation_request(server, get_event::Request::new(id.clone())).await {
                        Ok(response) => return serde_json::from_str(response.pdu.get()).ok(),
                        Err(e) => tracing::debug!(%server, event_id = %id, error = %e, "could not fetch an event"),
                    }
                }
                None
            }
        });
        tokio::time::timeout(FETCH_DEADLINE, futures_util::future::join_all(fetches))
            .await
            .map(|found| found.into_iter().flatten().collect())
            .unwrap_or_default()
    }
}
