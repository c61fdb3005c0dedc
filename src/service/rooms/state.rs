//! Reading room state: current state, state at an event, and what a user may see of
//! it (members see the current state; former members the state when they left).

use ruma::{RoomId, UserId};

use crate::{
    error::{Error, Result},
    service::Services,
    storage::{MembershipRow, StoredEvent},
};

/// Which state a user may read in a room.
pub enum StateView {
    Current,
    /// The state as of this state group (when the user left or was banned), and the
    /// stream position of leaving.
    AtGroup(i64, i64),
}

impl Services {
    pub async fn membership(&self, room_id: &RoomId, user_id: &UserId) -> Result<Option<MembershipRow>> {
        self.store.get_membership(room_id.as_str(), user_id.as_str()).await
    }

    /// `M_FORBIDDEN` unless the user is joined to the room.
    pub async fn require_joined(&self, room_id: &RoomId, user_id: &UserId) -> Result<()> {
        match self.membership(room_id, user_id).await? {
            Some(m) if m.membership == "join" => Ok(()),
            _ => Err(Error::forbidden("You are not joined to this room")),
        }
    }

    /// What state `user_id` may read in a room.
    pub async fn state_view(&self, room_id: &RoomId, user_id: &UserId) -> Result<StateView> {
        match self.membership(room_id, user_id).await? {
            Some(m) if m.membership == "join" => Ok(StateView::Current),
            Some(m) if m.membership == "leave" || m.membership == "ban" => {
                let event = self
                    .store
                    .get_event(&m.event_id)
                    .await?
                    .ok_or_else(|| Error::internal("membership event missing"))?;
                Ok(StateView::AtGroup(event.state_group, event.stream_ordering))
            }
            _ => Err(Error::forbidden("You are not a member of this room")),
        }
    }

    /// The full state events of a group.
    pub async fn state_events_at(&self, group: i64) -> Result<Vec<StoredEvent>> {
        let ids: Vec<String> = self.store.get_state_group(group, None, None).await?.into_iter().map(|e| e.2).collect();
        self.store.get_events_by_ids(&ids).await
    }

    /// `state_events_at`, but of the member events only those of `members` when given
    /// (lazy-loading members: the rest are never read).
    pub async fn state_events_for(&self, group: i64, members: Option<&[&str]>) -> Result<Vec<StoredEvent>> {
        let Some(members) = members else { return self.state_events_at(group).await };
        let ids: Vec<String> =
            self.store.get_state_group_lazy(group, members).await?.into_iter().map(|e| e.2).collect();
        self.store.get_events_by_ids(&ids).await
    }

    /// One state event of a group.
    pub async fn state_event_at(&self, group: i64, event_type: &str, state_key: &str) -> Result<Option<StoredEvent>> {
        match self.store.get_state_group(group, Some(event_type), Some(state_key)).await?.pop() {
            Some((_, _, id)) => self.store.get_event(&id).await,
            None => Ok(None),
        }
    }

    /// The state group before an event (its own group, or the parent for state events).
    pub async fn state_group_before(&self, event: &StoredEvent) -> Result<Option<i64>> {
        if event.state_key.is_some() {
            self.store.get_prev_state_group(event.state_group).await
        } else {
            Ok(Some(event.state_group))
        }
    }

    /// `GET /rooms/{roomId}/state`.
    pub async fn room_state_for(&self, room_id: &RoomId, user_id: &UserId) -> Result<Vec<StoredEvent>> {
        match self.state_view(room_id, user_id).await? {
            StateView::Current => self.store.get_current_state_events(room_id.as_str(), &[]).await,
            StateView::AtGroup(group, _) => self.state_events_at(group).await,
        }
    }

    /// `GET /rooms/{roomId}/state/{type}/{key}`.
    pub async fn room_state_event_for(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
        event_type: &str,
        state_key: &str,
    ) -> Result<StoredEvent> {
        let event = match self.state_view(room_id, user_id).await? {
            StateView::Current => self.store.get_current_state_event(room_id.as_str(), event_type, state_key).await?,
            StateView::AtGroup(group, _) => self.state_event_at(group, event_type, state_key).await?,
        };
        event.ok_or_else(|| Error::not_found("No such state event"))
    }
}

impl Services {
    /// The member events of a room as `user_id` may see them: now, at a sync or
    /// pagination token (`at`), or as of leaving.
    pub async fn room_members(&self, room_id: &RoomId, user_id: &UserId, at: Option<&str>) -> Result<Vec<StoredEvent>> {
        let view = self.state_view(room_id, user_id).await?;
        let group = match (at, view) {
            (Some(token), view) => {
                let mut pos = super::messages::parse_position(token)?;
                if let StateView::AtGroup(_, left_at) = view {
                    pos = pos.min(left_at);
                }
                let latest = self.store.get_room_events(room_id.as_str(), 0, pos, 1, true).await?;
                latest.first().map(|e| e.state_group)
            }
            (None, StateView::AtGroup(group, _)) => Some(group),
            (None, StateView::Current) => None,
        };
        match group {
            Some(group) => {
                let ids: Vec<String> = self
                    .store
                    .get_state_group(group, Some("m.room.member"), None)
                    .await?
                    .into_iter()
                    .map(|e| e.2)
                    .collect();
                self.store.get_events_by_ids(&ids).await
            }
            None => self.store.get_current_state_events(room_id.as_str(), &["m.room.member"]).await,
        }
    }
}
