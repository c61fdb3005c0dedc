//! Reports of events and rooms by users (`/report`), stored for the server's admins
//! (`convo admin reports`). Only what the reporter may see can be reported: an event
//! they may not see, or a room they are not in, is `404 M_NOT_FOUND`, as for one that
//! does not exist.

use ruma::{EventId, RoomId, UserId};

use crate::{
    error::{Error, Result},
    service::{Services, now_ms},
};

/// Longest reason kept (longer ones are cut).
const MAX_REASON_CHARS: usize = 1_000;

fn clip(reason: Option<&str>) -> Option<String> {
    reason.map(|r| r.chars().take(MAX_REASON_CHARS).collect())
}

impl Services {
    /// `POST /rooms/{roomId}/report/{eventId}`; returns the report's id.
    pub async fn report_event(
        &self,
        reporter: &UserId,
        room_id: &RoomId,
        event_id: &EventId,
        reason: Option<&str>,
    ) -> Result<i64> {
        self.get_event_for(room_id, reporter, event_id).await?;
        let reason = clip(reason);
        let id = self
            .store
            .insert_report(room_id.as_str(), Some(event_id.as_str()), reporter.as_str(), reason.as_deref(), now_ms())
            .await?;
        tracing::info!(report_id = id, %room_id, %event_id, %reporter, "an event was reported");
        Ok(id)
    }

    /// `POST /rooms/{roomId}/report`; returns the report's id.
    pub async fn report_room(&self, reporter: &UserId, room_id: &RoomId, reason: &str) -> Result<i64> {
        let membership = self.store.get_membership(room_id.as_str(), reporter.as_str()).await?;
        if membership.is_none_or(|m| m.membership != "join") {
            return Err(Error::not_found("No such room, or you are not in it"));
        }
        let reason = clip(Some(reason));
        let id =
            self.store.insert_report(room_id.as_str(), None, reporter.as_str(), reason.as_deref(), now_ms()).await?;
        tracing::info!(report_id = id, %room_id, %reporter, "a room was reported");
        Ok(id)
    }

    /// The rooms `user` and `other` are both joined to: how many, a page of 100 after
    /// `from` (a room id), and the token of the next page (MSC2666).
    pub async fn mutual_rooms(
        &self,
        user: &UserId,
        other: &UserId,
        from: Option<&str>,
    ) -> Result<(usize, Vec<ruma::OwnedRoomId>, Option<String>)> {
        const PAGE: usize = 100;
        if user == other {
            return Err(Error::invalid_param("Mutual rooms are asked with another user"));
        }
        let all = self.store.get_mutual_rooms(user.as_str(), other.as_str()).await?;
        let count = all.len();
        let page: Vec<String> =
            all.into_iter().filter(|r| from.is_none_or(|f| r.as_str() > f)).take(PAGE + 1).collect();
        let next = (page.len() > PAGE).then(|| page[PAGE - 1].clone());
        let rooms = page.into_iter().take(PAGE).filter_map(|r| ruma::OwnedRoomId::try_from(r).ok()).collect();
        Ok((count, rooms, next))
    }
}
