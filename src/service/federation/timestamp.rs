//! Asking other servers for the event of a room nearest a moment
//! (`GET /timestamp_to_event/{roomId}`), when the history here may lack it, and
//! fetching the event one names (`GET /event`) into the room's history as backfill.
//! Servers are asked in the order they joined (the longest in the room first: the
//! likeliest to have old history), a few at most, all within a deadline.

use std::{collections::HashMap, time::Duration};

use ruma::{
    MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedServerName, RoomId, ServerName, UInt,
    api::{
        Direction,
        federation::event::{get_event::v1 as get_event, get_event_by_timestamp::v1 as by_timestamp},
    },
};

use crate::{
    service::{
        Services,
        rooms::pipeline::{Arrival, PduOutcome},
    },
    storage::StoredEvent,
};

/// Most servers asked for one answer.
const MAX_SERVERS: usize = 3;
/// How long asking, and then fetching the event, may take in all (each).
const DEADLINE: Duration = Duration::from_secs(10);

impl Services {
    /// The room's other servers, those whose users have been joined longest first.
    async fn servers_by_seniority(&self, room_id: &RoomId) -> Vec<OwnedServerName> {
        let members = match self.store.get_room_members(room_id.as_str(), Some("join")).await {
            Ok(members) => members,
            Err(_) => return Vec::new(),
        };
        let mut first: HashMap<OwnedServerName, i64> = HashMap::new();
        for m in members {
            if let Ok(user) = ruma::UserId::parse(m.user_id.as_str())
                && user.server_name() != self.server_name()
            {
                let at = first.entry(user.server_name().to_owned()).or_insert(i64::MAX);
                *at = (*at).min(m.stream_ordering);
            }
        }
        let mut servers: Vec<(i64, OwnedServerName)> = first.into_iter().map(|(s, at)| (at, s)).collect();
        servers.sort();
        servers.into_iter().map(|(_, s)| s).collect()
    }

    /// Asks the room's servers in turn for the event nearest `ts`; answers the first
    /// answer: the server, the event and its time. `None` when none answered in time.
    pub(crate) async fn ask_timestamp_to_event(
        &self,
        room_id: &RoomId,
        ts: i64,
        forwards: bool,
    ) -> Option<(OwnedServerName, OwnedEventId, i64)> {
        let servers = self.servers_by_seniority(room_id).await;
        let at = MilliSecondsSinceUnixEpoch(UInt::new(ts.max(0) as u64).unwrap_or_default());
        let dir = if forwards { Direction::Forward } else { Direction::Backward };
        let ask = async {
            for server in servers.iter().take(MAX_SERVERS) {
                let request = by_timestamp::Request::new(room_id.to_owned(), at, dir);
                match self.send_federation_request(server, request).await {
                    Ok(found) => {
                        let remote_ts = i64::try_from(u64::from(found.origin_server_ts.0)).unwrap_or(i64::MAX);
                        return Some((server.clone(), found.event_id, remote_ts));
                    }
                    Err(e) => tracing::debug!(%room_id, %server, error = %e, "timestamp_to_event failed"),
                }
            }
            None
        };
        tokio::time::timeout(DEADLINE, ask).await.ok().flatten()
    }

    /// The event `event_id` of `room_id` in the room's history here: as stored, or
    /// fetched from `server` and taken in as backfill. `None` when it cannot be had
    /// (not sent in time, of another room, refused by the checks).
    pub(crate) async fn fetch_nearer_event(
        &self,
        room_id: &RoomId,
        server: &ServerName,
        event_id: &OwnedEventId,
    ) -> Option<StoredEvent> {
        let in_history = |e: &StoredEvent| e.room_id == room_id.as_str() && e.position.is_some();
        if let Ok(Some(stored)) = self.store.get_event(event_id.as_str()).await
            && in_history(&stored)
        {
            return Some(stored);
        }
        let version = self.room_version(room_id).await.ok()?;
        let fetch = self.send_federation_request(server, get_event::Request::new(event_id.clone()));
        let response = match tokio::time::timeout(DEADLINE, fetch).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                tracing::info!(%room_id, %server, %event_id, error = %e, "could not fetch the event nearest a time");
                return None;
            }
            Err(_) => return None,
        };
        let pdu: ruma::CanonicalJsonObject = serde_json::from_str(response.pdu.get()).ok()?;
        if pdu.get("room_id").and_then(|r| r.as_str()) != Some(room_id.as_str()) {
            return None;
        }
        match self.handle_pdu(room_id, &version, pdu, Arrival::Backfill).await {
            Ok(PduOutcome::Accepted { event_id: stored, .. } | PduOutcome::Duplicate { event_id: stored })
                if stored == *event_id => {}
            Ok(other) => {
                tracing::info!(%room_id, %server, ?other, "the event nearest a time was not taken in");
                return None;
            }
            Err(e) => {
                tracing::info!(%room_id, %server, error = %e, "the event nearest a time was refused");
                return None;
            }
        }
        self.store.get_event(event_id.as_str()).await.ok().flatten().filter(in_history)
    }
}
