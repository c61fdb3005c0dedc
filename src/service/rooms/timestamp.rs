//! `timestamp_to_event`: the event of a room nearest a moment, in one direction. A
//! client gets the nearest event it may see. When the history here may lack nearer
//! events (a gap next to the answer: the room was joined late, or events never
//! arrived), the servers in the room are asked (`federation/timestamp.rs`), and a
//! nearer event one of them names is fetched and stored as backfill, so that the
//! client can go on with `/context`. Other servers get the nearest event here.

use ruma::{MilliSecondsSinceUnixEpoch, OwnedEventId, RoomId, ServerName, UInt, UserId};

use super::visibility::Visibility;
use crate::{
    error::{Error, Result},
    service::Services,
    storage::StoredEvent,
};

/// Events read per query while looking for one the user may see.
const PAGE: i64 = 100;
/// Most events read for one answer (a user who may see little of a long history).
const MAX_SCANNED: usize = 2000;

/// Who asks, and so which events count.
#[derive(Clone, Copy)]
enum Viewer<'a> {
    /// A user, with their memberships in the room.
    User(&'a UserId, &'a Visibility),
    /// Another server: the events it may see by the state at each
    /// (`federation/visibility.rs`).
    Server(&'a ServerName),
}

/// The nearest event found, as answered: its id and time.
pub type Nearest = (OwnedEventId, MilliSecondsSinceUnixEpoch);

fn answer(event: &StoredEvent) -> Result<Nearest> {
    let at = MilliSecondsSinceUnixEpoch(UInt::new(event.origin_server_ts.max(0) as u64).unwrap_or_default());
    Ok((OwnedEventId::try_from(event.event_id.as_str()).map_err(Error::internal)?, at))
}

fn not_found(ts: i64, forwards: bool) -> Error {
    let direction = if forwards { "forwards" } else { "backwards" };
    Error::not_found(format!("No event found from {ts} {direction}"))
}

impl Services {
    /// `GET /rooms/{roomId}/timestamp_to_event?ts=&dir=` for `user` (a member, or one
    /// who was): the nearest event at or after `ts` (`forwards`) or at or before it that
    /// the user may see; `M_NOT_FOUND` when there is none.
    pub async fn timestamp_to_event(
        &self,
        room_id: &RoomId,
        user: &UserId,
        ts: i64,
        forwards: bool,
    ) -> Result<Nearest> {
        let vis = self.visibility_for(room_id, user).await?;
        if vis.memberships.is_empty() {
            return Err(Error::forbidden("You are not a member of this room"));
        }
        let local = self.nearest_event(room_id, ts, forwards, Viewer::User(user, &vis)).await?;
        // Events missing before a stored one could be nearer: ask the room's servers.
        let gap = match &local {
            None => self.store.has_gap_between(room_id.as_str(), i64::MIN, i64::MAX).await?,
            Some(e) if forwards => self.store.has_gap_between(room_id.as_str(), ts, e.origin_server_ts).await?,
            Some(e) => self.store.has_gap_between(room_id.as_str(), e.origin_server_ts + 1, i64::MAX).await?,
        };
        if gap && let Some((server, event_id, remote_ts)) = self.ask_timestamp_to_event(room_id, ts, forwards).await {
            let in_direction = if forwards { remote_ts >= ts } else { remote_ts <= ts };
            let nearer = local.as_ref().is_none_or(|e| (remote_ts - ts).abs() < (e.origin_server_ts - ts).abs());
            if in_direction
                && nearer
                && let Some(event) = self.fetch_nearer_event(room_id, &server, &event_id).await
                && self.may_see_event(user, &vis, &event).await?
            {
                return answer(&event);
            }
        }
        local.as_ref().map(answer).transpose()?.ok_or_else(|| not_found(ts, forwards))
    }

    /// `GET /timestamp_to_event/{roomId}` for `origin`, a server in the room: the
    /// nearest event of the room's history here that it may see.
    pub async fn serve_timestamp_to_event(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        ts: i64,
        forwards: bool,
    ) -> Result<Nearest> {
        self.require_server_in_room(origin, room_id).await?;
        let nearest = self.nearest_event(room_id, ts, forwards, Viewer::Server(origin)).await?;
        nearest.as_ref().map(answer).transpose()?.ok_or_else(|| not_found(ts, forwards))
    }

    /// The event of the room's history here nearest `ts` in the direction (see the
    /// module comment) that `viewer` may see.
    async fn nearest_event(
        &self,
        room_id: &RoomId,
        ts: i64,
        forwards: bool,
        viewer: Viewer<'_>,
    ) -> Result<Option<StoredEvent>> {
        let mut from = (ts, if forwards { i64::MIN } else { i64::MAX });
        let mut scanned = 0;
        while scanned < MAX_SCANNED {
            let batch = self.store.get_room_events_by_time(room_id.as_str(), from, forwards, PAGE).await?;
            scanned += batch.len();
            let visible = match viewer {
                Viewer::User(user, vis) => {
                    let candidates: Vec<&StoredEvent> = batch.iter().filter(|e| vis.may_see(user, e)).collect();
                    self.visible_by_state(user, vis, &candidates).await?
                }
                Viewer::Server(server) => self.visible_to_server(server, &batch).await?,
            };
            if let Some(found) = batch.iter().find(|e| visible.contains(&e.event_id)) {
                return Ok(Some(found.clone()));
            }
            match batch.last() {
                Some(last) if batch.len() as i64 == PAGE => from = (last.origin_server_ts, last.stream_ordering),
                _ => break,
            }
        }
        Ok(None)
    }

    /// Whether `user` may see `event` (of the room `vis` was read for).
    async fn may_see_event(&self, user: &UserId, vis: &Visibility, event: &StoredEvent) -> Result<bool> {
        Ok(vis.may_see(user, event) && self.visible_by_state(user, vis, &[event]).await?.contains(&event.event_id))
    }
}
