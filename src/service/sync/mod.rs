//! `/sync`: initial and incremental sync with long-polling. A request first computes
//! what changed since its token; when nothing did, it waits on the notifier (no
//! polling) until something for its user happens or the timeout passes.
//!
//! Tokens are `s{stream position}_{typing serial}`: everything persistent (events,
//! account data, receipts, presence) shares the stream, so tokens survive restarts.

pub mod notifier;

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use futures_util::{StreamExt, TryStreamExt, stream};
use ruma::{
    OwnedRoomId, OwnedUserId, RoomId, UInt,
    api::client::sync::sync_events::{
        UnreadNotificationsCount,
        v3::{
            Ephemeral, GlobalAccountData, InviteState, InvitedRoom, JoinedRoom, LeftRoom, Presence, Response,
            RoomAccountData, RoomSummary, State, StateEvents, Timeline,
        },
    },
};
use serde_json::{Value as JsonValue, json};

use super::{
    Services, Session,
    rooms::{
        format::{Viewer, to_raw},
        messages::parse_position,
    },
};
use crate::{
    error::{Error, Result},
    storage::{MembershipRow, StoredEvent},
};

/// The parts of a filter that sync honours.
#[derive(Clone, Debug)]
pub struct SyncFilter {
    pub timeline_limit: usize,
    pub lazy_load_members: bool,
    pub include_leave: bool,
    pub rooms: Option<Vec<String>>,
    pub not_rooms: Vec<String>,
}

impl Default for SyncFilter {
    fn default() -> Self {
        SyncFilter {
            timeline_limit: 10,
            lazy_load_members: false,
            include_leave: false,
            rooms: None,
            not_rooms: Vec::new(),
        }
    }
}

pub struct SyncRequest {
    pub since: Option<String>,
    pub timeout: Duration,
    pub full_state: bool,
    pub filter: SyncFilter,
    pub set_presence: Option<String>,
}

/// The longest a sync waits, whatever the client asks.
/// Joined rooms of one sync built at the same time.
const JOINED_ROOMS_AT_ONCE: usize = 4;

/// What a joined room's sync entry is made from.
struct JoinedWork {
    room_id: OwnedRoomId,
    /// Stream position of the user's join (unread counts start there before a receipt).
    joined_at: i64,
    /// Joined and invited members.
    members: (i64, i64),
    /// Notifying and highlighting events since the user's read receipt.
    unread: (i64, i64),
    initial: bool,
    has_events: bool,
    typing: Option<Vec<OwnedUserId>>,
    receipts: Vec<JsonValue>,
    account: Vec<(String, String, String)>,
}

const MAX_TIMEOUT: Duration = Duration::from_secs(300);

/// Event types of the stripped state shown with an invite.
const STRIPPED_TYPES: [&str; 7] = [
    "m.room.create",
    "m.room.join_rules",
    "m.room.name",
    "m.room.avatar",
    "m.room.canonical_alias",
    "m.room.encryption",
    "m.room.topic",
];

struct Since {
    pos: i64,
    typing: u64,
}

fn parse_since(token: &str) -> Result<Since> {
    let pos = parse_position(token)?;
    let typing = token.split('_').nth(1).and_then(|t| t.parse().ok()).unwrap_or(0);
    Ok(Since { pos, typing })
}

fn is_empty(r: &Response) -> bool {
    r.rooms.join.is_empty()
        && r.rooms.invite.is_empty()
        && r.rooms.leave.is_empty()
        && r.account_data.events.is_empty()
        && r.presence.events.is_empty()
        && r.to_device.events.is_empty()
        && r.device_lists.changed.is_empty()
}

impl Services {
    pub async fn sync(&self, session: &Session, req: SyncRequest) -> Result<Response> {
        let since = req.since.as_deref().map(parse_since).transpose()?;
        if let Some(presence) = &req.set_presence {
            self.set_presence(&session.user_id, presence, None).await?;
        } else {
            self.set_presence(&session.user_id, "online", None).await?;
        }
        let mut wake = self.notifier.subscribe(&session.user_id);
        let deadline = Instant::now() + req.timeout.min(MAX_TIMEOUT);
        loop {
            let response = self.build_sync(session, since.as_ref(), &req).await?;
            if since.is_none() || req.full_state || !is_empty(&response) || Instant::now() >= deadline {
                return Ok(response);
            }
            tokio::select! {
                woken = tokio::time::timeout_at(deadline.into(), wake.changed()) => {
                    if woken.is_err() {
                        return Ok(response);
                    }
                }
                () = self.shutdown_started() => return Ok(response),
            }
        }
    }

    async fn build_sync(&self, session: &Session, since: Option<&Since>, req: &SyncRequest) -> Result<Response> {
        let user = &session.user_id;
        let typing_serial = self.typing.serial();
        let head = self.store.current_stream_position().await?;
        let since_pos = since.map(|s| s.pos).unwrap_or(0);
        let mut response = Response::new(format!("s{head}_{typing_serial}"));

        let changed_rooms: Option<BTreeMap<String, i64>> = match since {
            Some(s) => Some(self.store.get_rooms_changed_since(s.pos).await?.into_iter().collect()),
            None => None,
        };
        let filter = &req.filter;
        let wanted = |room: &str| {
            filter.rooms.as_ref().is_none_or(|r| r.iter().any(|x| x == room))
                && !filter.not_rooms.iter().any(|x| x == room)
        };
        let memberships: Vec<MembershipRow> = self.store.get_user_memberships(user.as_str()).await?;
        let room_account_data = self.store.get_account_data_since(user.as_str(), since_pos).await?;
        let mut receipts_by_room = self.receipt_events(user, since_pos).await?;

        // Joined rooms are built concurrently (each is a few independent queries); the
        // rest in order.
        let mut joined_work = Vec::new();
        for m in memberships.iter().filter(|m| wanted(&m.room_id) && m.stream_ordering <= head) {
            let room_id = OwnedRoomId::try_from(m.room_id.as_str()).map_err(Error::internal)?;
            let membership_changed = m.stream_ordering > since_pos;
            match m.membership.as_str() {
                "join" => {
                    let has_events = changed_rooms.as_ref().is_none_or(|c| c.contains_key(&m.room_id));
                    let typing = self.typing.typing_since(&room_id, since.map(|s| s.typing));
                    let receipts = receipts_by_room.remove(&m.room_id).unwrap_or_default();
                    let account: Vec<(String, String, String)> =
                        room_account_data.iter().filter(|(r, _, _)| *r == m.room_id).cloned().collect();
                    let initial = since.is_none() || membership_changed || req.full_state;
                    if !initial && !has_events && typing.is_none() && receipts.is_empty() && account.is_empty() {
                        continue;
                    }
                    joined_work.push(JoinedWork {
                        room_id,
                        joined_at: m.stream_ordering,
                        initial,
                        has_events,
                        typing,
                        receipts,
                        account,
                        members: (0, 0),
                        unread: (0, 0),
                    });
                }
                "invite" if since.is_none() || membership_changed => {
                    let mut invited = InvitedRoom::new();
                    invited.invite_state = InviteState::from(self.stripped_state(&room_id, &m.event_id).await?);
                    response.rooms.invite.insert(room_id, invited);
                }
                "leave" | "ban"
                    if (since.is_some() && membership_changed) || (since.is_none() && filter.include_leave) =>
                {
                    let left = self.left_room(session, &room_id, m, since_pos, filter).await?;
                    response.rooms.leave.insert(room_id, left);
                }
                _ => {}
            }
        }
        self.fill_counts(user, &mut joined_work).await?;
        let joined: Vec<(OwnedRoomId, JoinedRoom)> = stream::iter(joined_work)
            .map(|work| self.joined_room(session, work, since_pos, head, filter))
            .buffered(JOINED_ROOMS_AT_ONCE)
            .try_collect()
            .await?;
        response.rooms.join.extend(joined);

        let mut global = Vec::new();
        for (room, data_type, content) in &room_account_data {
            if room.is_empty() {
                let content: JsonValue = serde_json::from_str(content).map_err(Error::internal)?;
                global.push(to_raw(json!({"type": data_type, "content": content}))?);
            }
        }
        if since.is_none() && !room_account_data.iter().any(|(r, t, _)| r.is_empty() && t == "m.push_rules") {
            // Clients read their push rules from the initial sync.
            let rules = self.push_rules(user).await?;
            global.push(to_raw(json!({"type": "m.push_rules", "content": {"global": rules}}))?);
        }
        response.account_data = GlobalAccountData::new();
        response.account_data.events = global;
        response.to_device.events = self.to_device_events(session, since.map(|s| s.pos), head).await?;
        if let Some(since) = since {
            response.device_lists.changed = self.device_list_changes(user, since.pos, head).await?;
        }
        let (one_time_keys, fallback_keys) = self.key_status(session).await?;
        response.device_one_time_keys_count = one_time_keys;
        response.device_unused_fallback_key_types = Some(fallback_keys);
        let presence = self.presence_events(user, since_pos).await?;
        response.presence = Presence::new();
        response.presence.events = presence.into_iter().map(to_raw).collect::<Result<_>>()?;
        Ok(response)
    }

    /// One room of the `join` section.
    async fn joined_room(
        &self,
        session: &Session,
        work: JoinedWork,
        since_pos: i64,
        head: i64,
        filter: &SyncFilter,
    ) -> Result<(OwnedRoomId, JoinedRoom)> {
        let JoinedWork { room_id, initial, has_events, typing, receipts, account, members, unread, .. } = work;
        let user = &session.user_id;
        let mut joined = JoinedRoom::new();
        if initial || has_events {
            let (timeline, state) = self.room_timeline(session, &room_id, since_pos, head, initial, filter).await?;
            joined.timeline = timeline;
            joined.state = State::Before(state);
        }
        let mut ephemeral = Vec::new();
        if let Some(users) = typing {
            ephemeral.push(to_raw(json!({"type": "m.typing", "content": {"user_ids": users}}))?);
        }
        for receipt in receipts {
            ephemeral.push(to_raw(receipt)?);
        }
        joined.ephemeral = Ephemeral::new();
        joined.ephemeral.events = ephemeral;
        joined.account_data = room_account_data_section(&account.iter().collect::<Vec<_>>())?;
        joined.summary = self.room_summary(&room_id, user, members).await?;
        let mut counts = UnreadNotificationsCount::new();
        counts.notification_count = UInt::new(unread.0.max(0) as u64);
        counts.highlight_count = UInt::new(unread.1.max(0) as u64);
        joined.unread_notifications = counts;
        Ok((room_id, joined))
    }

    /// The timeline of a joined room and the state before it.
    async fn room_timeline(
        &self,
        session: &Session,
        room_id: &RoomId,
        since: i64,
        head: i64,
        initial: bool,
        filter: &SyncFilter,
    ) -> Result<(Timeline, StateEvents)> {
        let user = &session.user_id;
        let limit = filter.timeline_limit.clamp(1, 500);
        let floor = if initial { 0 } else { since };
        let mut events = self.store.get_room_events(room_id.as_str(), floor, head, (limit + 1) as i64, true).await?;
        let limited = events.len() > limit;
        events.truncate(limit);
        events.reverse();
        let mut vis = self.visibility_for(room_id, user).await?;
        let mut visible = Vec::with_capacity(events.len());
        for e in events {
            if self.may_see(&mut vis, user, &e).await? {
                visible.push(e);
            }
        }
        let start = visible.first().map(|e| e.stream_ordering - 1).unwrap_or(head);
        let viewer = Viewer { user_id: user, device_id: Some(&session.device_id) };

        // State up to the start of the timeline.
        let mut state: Vec<StoredEvent> = if initial {
            match visible.first() {
                Some(first) => match self.state_group_before(first).await? {
                    Some(group) => self.state_events_at(group).await?,
                    None => Vec::new(),
                },
                None => self.store.get_current_state_events(room_id.as_str(), &[]).await?,
            }
        } else if limited {
            // The state events that happened in the gap, the last of each key.
            let gap = self.store.get_room_state_events_between(room_id.as_str(), since, start).await?;
            let mut latest: BTreeMap<(String, String), StoredEvent> = BTreeMap::new();
            for e in gap {
                latest.insert((e.event_type.clone(), e.state_key.clone().unwrap_or_default()), e);
            }
            latest.into_values().collect()
        } else {
            Vec::new()
        };
        if filter.lazy_load_members {
            let mut wanted: Vec<&str> = visible.iter().map(|e| e.sender.as_str()).collect();
            wanted.push(user.as_str());
            state.retain(|e| {
                e.event_type != "m.room.member" || e.state_key.as_deref().is_some_and(|k| wanted.contains(&k))
            });
            if !initial {
                // Members who speak in the timeline and whose member event the client may not have.
                let have: Vec<String> = state.iter().filter_map(|e| e.state_key.clone()).collect();
                let missing: Vec<StoredEvent> = self
                    .member_events_for(room_id, &visible)
                    .await?
                    .into_iter()
                    .filter(|e| e.state_key.as_ref().is_some_and(|k| !have.contains(k)) && e.stream_ordering <= start)
                    .collect();
                if limited {
                    state.extend(missing);
                }
            }
        }
        let timeline_events = self.client_events(&visible, Some(viewer), false).await?;
        let state_events = self.client_events(&state, Some(viewer), false).await?;
        let mut timeline = Timeline::new();
        timeline.limited = limited;
        timeline.prev_batch = Some(format!("t{start}"));
        timeline.events = timeline_events.into_iter().map(to_raw).collect::<Result<_>>()?;
        let mut state = StateEvents::new();
        state.events = state_events.into_iter().map(to_raw).collect::<Result<_>>()?;
        Ok((timeline, state))
    }

    async fn left_room(
        &self,
        session: &Session,
        room_id: &RoomId,
        m: &MembershipRow,
        since: i64,
        filter: &SyncFilter,
    ) -> Result<LeftRoom> {
        // The timeline runs up to the leave (or ban) event, not past it.
        let (timeline, state) =
            self.room_timeline(session, room_id, since, m.stream_ordering, since == 0, filter).await?;
        let mut left = LeftRoom::new();
        left.timeline = timeline;
        left.state = State::Before(state);
        Ok(left)
    }

    /// Member counts and unread counts of every room about to be built, a few queries
    /// for all of them instead of several per room.
    async fn fill_counts(&self, user: &ruma::UserId, work: &mut [JoinedWork]) -> Result<()> {
        if work.is_empty() {
            return Ok(());
        }
        let room_ids: Vec<&str> = work.iter().map(|w| w.room_id.as_str()).collect();
        let members = self.store.count_members_in_rooms(&room_ids).await?;
        let read: HashMap<String, i64> =
            self.store.get_read_positions(user.as_str(), &room_ids).await?.into_iter().collect();
        let after: Vec<(&str, i64)> = work
            .iter()
            .map(|w| (w.room_id.as_str(), read.get(w.room_id.as_str()).copied().unwrap_or(w.joined_at)))
            .collect();
        let unread = self.store.count_notifications_in_rooms(user.as_str(), &after).await?;
        for w in work.iter_mut() {
            w.members = members.get(w.room_id.as_str()).copied().unwrap_or_default();
            w.unread = unread.get(w.room_id.as_str()).copied().unwrap_or_default();
        }
        Ok(())
    }

    async fn room_summary(&self, room_id: &RoomId, user: &ruma::UserId, members: (i64, i64)) -> Result<RoomSummary> {
        let (joined, invited) = members;
        let heroes = self.store.get_room_heroes(room_id.as_str(), user.as_str(), 5).await?;
        let mut summary = RoomSummary::new();
        summary.heroes = heroes.into_iter().filter_map(|h| OwnedUserId::try_from(h).ok()).collect();
        summary.joined_member_count = UInt::new(joined as u64);
        summary.invited_member_count = UInt::new(invited as u64);
        Ok(summary)
    }

    /// Stripped state for an invite: a few room state events, and the invite itself.
    async fn stripped_state(
        &self,
        room_id: &RoomId,
        invite_event_id: &str,
    ) -> Result<Vec<ruma::serde::Raw<ruma::events::AnyStrippedStateEvent>>> {
        let mut events = self.store.get_current_state_events(room_id.as_str(), &STRIPPED_TYPES).await?;
        if let Some(invite) = self.store.get_event(invite_event_id).await? {
            // The inviter's own member event too: clients show the inviter's name and
            // avatar from it (without it Element calls the invite "Empty room").
            let inviter = [("m.room.member".to_owned(), invite.sender.clone())];
            if invite.state_key.as_deref() != Some(invite.sender.as_str()) {
                events.extend(self.store.get_current_state_entries(room_id.as_str(), &inviter).await?);
            }
            events.push(invite);
        }
        events
            .iter()
            .map(|e| {
                let pdu: JsonValue = serde_json::from_str(&e.json).map_err(Error::internal)?;
                to_raw(json!({
                    "type": e.event_type,
                    "state_key": e.state_key,
                    "sender": e.sender,
                    "content": pdu["content"],
                }))
            })
            .collect()
    }
}

fn room_account_data_section(entries: &[&(String, String, String)]) -> Result<RoomAccountData> {
    let mut events = Vec::new();
    for (_, data_type, content) in entries {
        let content: JsonValue = serde_json::from_str(content).map_err(Error::internal)?;
        events.push(to_raw(json!({"type": data_type, "content": content}))?);
    }
    let mut data = RoomAccountData::new();
    data.events = events;
    Ok(data)
}

impl Services {
    /// Stores a filter; returns its id.
    pub async fn create_filter(
        &self,
        user: &ruma::UserId,
        filter: &ruma::api::client::filter::FilterDefinition,
    ) -> Result<String> {
        let json = serde_json::to_string(filter).map_err(Error::internal)?;
        Ok(self.store.create_filter(user.as_str(), &json).await?.to_string())
    }

    /// A stored filter; `M_NOT_FOUND` if unknown.
    pub async fn get_filter(
        &self,
        user: &ruma::UserId,
        id: &str,
    ) -> Result<ruma::api::client::filter::FilterDefinition> {
        let id: i64 = id.parse().map_err(|_| Error::not_found("No such filter"))?;
        let json = self.store.get_filter(user.as_str(), id).await?.ok_or_else(|| Error::not_found("No such filter"))?;
        serde_json::from_str(&json).map_err(Error::internal)
    }
}
