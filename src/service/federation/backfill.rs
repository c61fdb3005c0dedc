//! History across servers. Serving: `GET /backfill/{roomId}` walks the DAG back from the
//! events asked for (their prev events, newest first), for a server with a member in
//! the room; the events it may not see by the state at each (`visibility.rs`) come
//! redacted. Asking: when a user pages back past the
//! oldest event this server has of a room it joined late, the room's backward
//! extremities are asked of a server in the room, and what comes back goes through
//! the event pipeline as backfill (positions before the live stream, no wake-ups).

use std::{
    collections::{BTreeSet, HashMap},
    sync::Mutex,
    time::{Duration, Instant},
};

use ruma::{
    MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, RoomId, ServerName, UInt,
    api::federation::backfill::get_backfill::v1 as get_backfill,
};
use serde_json::value::RawValue;

use crate::{
    error::{Error, Result},
    service::{
        Services,
        rooms::{
            pdu::Pdu,
            pipeline::{Arrival, PduOutcome},
        },
    },
};

/// Most events served or asked for in one backfill.
const MAX_BACKFILL: usize = 100;
/// Most backward extremities named in one request.
const MAX_FROM: usize = 20;
/// Most servers asked in turn for one backfill.
const MAX_SERVERS: usize = 3;
/// A room is not backfilled again within this long after an attempt that brought
/// nothing (its history may simply end there).
const EMPTY_COOLDOWN: Duration = Duration::from_secs(30);

/// When each room was last backfilled in vain.
#[derive(Default)]
pub struct BackfillAttempts {
    rooms: Mutex<HashMap<OwnedRoomId, Instant>>,
}

impl Services {
    /// `GET /backfill/{roomId}?v=...&limit=`: up to `limit` events from `from` back,
    /// for `origin`.
    pub async fn serve_backfill(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        from: &[OwnedEventId],
        limit: usize,
    ) -> Result<get_backfill::Response> {
        self.require_server_in_room(origin, room_id).await?;
        let version = self.room_version(room_id).await?;
        let limit = limit.clamp(1, MAX_BACKFILL);
        let mut seen: BTreeSet<String> = BTreeSet::new();
        let mut frontier: Vec<String> = from.iter().take(MAX_FROM).map(|e| e.to_string()).collect();
        let mut found = Vec::new();
        while !frontier.is_empty() && found.len() < limit {
            frontier.retain(|id| seen.insert(id.clone()));
            let events = self.store.get_events_by_ids(&frontier).await?;
            let mut next = Vec::new();
            for event in events {
                if event.room_id != room_id.as_str() || event.rejected_reason.is_some() {
                    continue;
                }
                if let Ok(pdu) = Pdu::from_stored(&event) {
                    next.extend(pdu.prev_events.iter().map(|p| p.to_string()));
                }
                found.push(event);
            }
            frontier = next;
        }
        found.sort_by_key(|e| std::cmp::Reverse(e.depth));
        found.truncate(limit);
        // What the asking server may not see by the state at each event, it gets redacted.
        let mut pdus = Vec::new();
        for event in self.redact_invisible_for_server(origin, &version, found).await? {
            pdus.push(RawValue::from_string(event.json).map_err(Error::internal)?);
        }
        Ok(get_backfill::Response::new(self.server_name().clone(), MilliSecondsSinceUnixEpoch::now(), pdus))
    }

    /// Fetches older history of `room_id` from another server in it, from the room's
    /// backward extremities; answers how many events were stored.
    pub async fn backfill_room(&self, room_id: &RoomId) -> Result<usize> {
        {
            let attempts = self.federation_sender.backfill.rooms.lock().unwrap_or_else(|e| e.into_inner());
            if attempts.get(room_id).is_some_and(|at| at.elapsed() < EMPTY_COOLDOWN) {
                return Ok(0);
            }
        }
        let extremities = self.store.get_backward_extremities(room_id.as_str()).await?;
        if extremities.is_empty() {
            return Ok(0);
        }
        let from: Vec<OwnedEventId> =
            extremities.iter().filter_map(|e| OwnedEventId::try_from(e.as_str()).ok()).take(MAX_FROM).collect();
        let version = self.room_version(room_id).await?;
        let servers = self.room_remote_servers(room_id).await?;
        let mut stored = 0;
        for server in servers.iter().take(MAX_SERVERS) {
            let started = Instant::now();
            let request = get_backfill::Request::new(
                room_id.to_owned(),
                from.clone(),
                UInt::new(MAX_BACKFILL as u64).unwrap_or_default(),
            );
            let response = match self.send_federation_request(server, request).await {
                Ok(response) => response,
                Err(e) => {
                    tracing::info!(%room_id, %server, error = %e, "backfill failed");
                    continue;
                }
            };
            let request_ms = started.elapsed().as_millis() as u64;
            for pdu in super::oldest_first(&response.pdus, MAX_BACKFILL) {
                match self.handle_remote_pdu(server, room_id, &version, pdu, Arrival::Backfill, None).await {
                    Ok(PduOutcome::Accepted { .. }) => stored += 1,
                    Ok(_) => {}
                    Err(e) => tracing::debug!(%room_id, %server, error = %e, "a backfilled event was refused"),
                }
            }
            tracing::debug!(%room_id, %server, received = response.pdus.len(), stored, request_ms,
                stored_ms = started.elapsed().as_millis() as u64 - request_ms, "backfilled");
            if stored > 0 {
                break;
            }
        }
        if stored == 0 {
            let mut attempts = self.federation_sender.backfill.rooms.lock().unwrap_or_else(|e| e.into_inner());
            if attempts.len() >= 10_000 {
                attempts.retain(|_, at| at.elapsed() < EMPTY_COOLDOWN);
            }
            attempts.insert(room_id.to_owned(), Instant::now());
        }
        Ok(stored)
    }
}
