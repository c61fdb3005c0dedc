//! `/sync`: initial and incremental sync with long-polling. A request first computes
//! what changed since its token; when nothing did, it waits on the notifier (no
//! polling) until something for its user happens or the timeout passes.
//!
//! Tokens are `s{stream position}_{typing serial}`: everything persistent (events,
//! account data, receipts, presence) shares the stream, so tokens survive restarts.
//! A response covers the stream up to its persisted-up-to mark, never past it (a
//! position past it may commit before one below it), and so does its token; the
//! notifier wakes a waiting request once the mark covers what woke it.

pub mod notifier;
mod summaries;

pub use summaries::Summaries;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::{Duration, Instant},
};

use futures_util::{StreamExt, TryStreamExt, stream};
use ruma::{
    OwnedRoomId, OwnedUserId, RoomId, UInt,
    api::client::sync::sync_events::{
        UnreadNotificationsCount,
        v3::{
            Ephemeral, GlobalAccountData, InviteState, InvitedRoom, JoinedRoom, KnockState, KnockedRoom, LeftRoom,
            Presence, Response, RoomAccountData, RoomSummary, State, StateEvents, Timeline,
        },
    },
};
use serde_json::{Value as JsonValue, json};

use super::{
    Services, Session,
    rooms::{
        format::{Viewer, to_raw},
        messages::{EventFilter, membership_of, parse_position},
        visibility::content_field,
    },
};
use crate::{
    error::{Error, Result},
    storage::{
        MembershipRow, StoredEvent,
        changes::{ChangeIndex, Kind},
    },
};

/// The parts of a filter that sync honours.
#[derive(Clone, Debug)]
pub struct SyncFilter {
    pub timeline_limit: usize,
    pub lazy_load_members: bool,
    pub include_leave: bool,
    pub rooms: Option<Vec<String>>,
    pub not_rooms: Vec<String>,
    /// `room.timeline`: the events a timeline shows (and counts towards its limit).
    pub timeline: EventFilter,
    /// `room.state`: the events of the state section.
    pub state: EventFilter,
    /// `room.ephemeral`: typing and receipts, by type.
    pub ephemeral: EventFilter,
    /// `room.account_data`, by type.
    pub room_account_data: EventFilter,
    /// `account_data` (global), by type.
    pub account_data: EventFilter,
    /// `presence`, by type and sender.
    pub presence: EventFilter,
    /// `room.timeline.unread_thread_notifications`: unread counts per thread, apart
    /// from the main timeline's.
    pub unread_thread_notifications: bool,
}

impl Default for SyncFilter {
    fn default() -> Self {
        SyncFilter {
            timeline_limit: 10,
            lazy_load_members: false,
            include_leave: false,
            rooms: None,
            not_rooms: Vec::new(),
            timeline: EventFilter::default(),
            state: EventFilter::default(),
            ephemeral: EventFilter::default(),
            room_account_data: EventFilter::default(),
            account_data: EventFilter::default(),
            presence: EventFilter::default(),
            unread_thread_notifications: false,
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
    /// `full_state` was asked for: the room's whole state, whatever `since` says.
    full_state: bool,
    /// Joined and invited members and the first of them (when a summary is sent).
    members: Option<std::sync::Arc<summaries::MemberSummary>>,
    /// Notifying and highlighting events since the user's read receipt (of the main
    /// timeline only, when counts per thread are asked for).
    unread: (i64, i64),
    /// Unread counts per thread root, when the filter asks for them.
    thread_unread: Vec<(String, (i64, i64))>,
    initial: bool,
    has_events: bool,
    /// The room summary is sent: the room is new to the client, or its members may
    /// have changed since `since` (the spec lets an unchanged summary be left out).
    summary: bool,
    typing: Option<Vec<OwnedUserId>>,
    receipts: Vec<JsonValue>,
    account: Vec<(String, String, String)>,
    /// The room is here only because the change index says its events may have moved:
    /// left out if its timeline holds nothing new after all.
    unless_empty: bool,
}

const MAX_TIMEOUT: Duration = Duration::from_secs(300);

/// Events of a room one sync reads at most to fill a timeline its filter thins out;
/// when they run out, the timeline is `limited` and `prev_batch` continues from there.
const MAX_FILTERED_SCAN: usize = 1000;

/// Events read per query when the timeline filter may leave some out.
const FILTERED_PAGE: usize = 100;

/// The timeline's events as a room's history yields them under the filter.
struct TimelineScan {
    /// The events that pass the filter, oldest first.
    events: Vec<StoredEvent>,
    /// State events after `start` that the filter left out, oldest first.
    hidden_state: Vec<StoredEvent>,
    limited: bool,
    /// When `limited`: the position the timeline continues after (what lies between
    /// `since` and it is a gap).
    start: i64,
}

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

/// The streams one sync need not read: nothing changed in them for its user (or the
/// user's joined rooms) after `since`. All `false` for an initial sync.
struct Skip {
    rooms: bool,
    account_data: bool,
    receipts: bool,
    to_device: bool,
    device_lists: bool,
    presence: bool,
}

impl Skip {
    fn new(changes: &ChangeIndex, session: &Session, since: Option<&Since>, memberships: &[MembershipRow]) -> Self {
        let user = &session.user_id;
        let Some(since) = since else {
            return Skip {
                rooms: false,
                account_data: false,
                receipts: false,
                to_device: false,
                device_lists: false,
                presence: false,
            };
        };
        let joined = || memberships.iter().filter(|m| m.membership == "join").map(|m| m.room_id.as_str());
        let unchanged = |kind, keys: &mut dyn Iterator<Item = &str>| changes.unchanged(kind, keys, since.pos);
        Skip {
            rooms: unchanged(Kind::Room, &mut joined()),
            account_data: unchanged(Kind::AccountData, &mut std::iter::once(user.as_str())),
            receipts: unchanged(Kind::Receipts, &mut joined()),
            // Read, unless nothing is stored for the device: nothing came after the
            // `since` its messages were last deleted up to.
            to_device: changes
                .noted(Kind::ToDeviceAcked, &to_device_key(session))
                .is_some_and(|acked| changes.unchanged(Kind::ToDevice, [user.as_str()], acked)),
            device_lists: unchanged(Kind::DeviceLists, &mut std::iter::once("")),
            presence: unchanged(Kind::Presence, &mut std::iter::once("")),
        }
    }
}

/// The change index's key of a device's acknowledged to-device messages.
fn to_device_key(session: &Session) -> String {
    format!("{} {}", session.user_id, session.device_id)
}

fn is_empty(r: &Response) -> bool {
    r.rooms.join.is_empty()
        && r.rooms.invite.is_empty()
        && r.rooms.knock.is_empty()
        && r.rooms.leave.is_empty()
        && r.account_data.events.is_empty()
        && r.presence.events.is_empty()
        && r.to_device.events.is_empty()
        && r.device_lists.changed.is_empty()
        && r.device_lists.left.is_empty()
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
            // A claim of the device's one-time keys changed its counts: answer, so the
            // client uploads more.
            if let Some(since) = &since
                && !self.store.changes().unchanged(Kind::KeyClaims, [session.user_id.as_str()], since.pos)
                && self.keys_claimed_after(session, since.pos).await?
            {
                return Ok(response);
            }
            let _waiting = self.waiting_syncs.enter(&session.user_id);
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
        let memberships = self.memberships_at(user, head).await?;
        // Streams that did not move past `since` for this user or their rooms are not
        // read (the change index is asked after `head` was read: it covers every write
        // up to `head`).
        let skip = Skip::new(self.store.changes(), session, since, &memberships);

        // Rooms with new events, each with whether member events may be among them.
        let changes = self.store.changes();
        let rooms_from_index = since.is_some_and(|s| !skip.rooms && changes.knows(s.pos));
        let changed_rooms: Option<BTreeMap<String, bool>> = match since {
            Some(_) if skip.rooms => Some(BTreeMap::new()),
            // From the change index: the joined rooms that may have moved (a change it
            // recorded may lie past `head` or have failed; such a room is dropped below
            // when its timeline comes back empty), and whether members may have.
            Some(s) if changes.knows(s.pos) => Some(
                memberships
                    .iter()
                    .filter(|m| m.membership == "join" && !changes.unchanged(Kind::Room, [m.room_id.as_str()], s.pos))
                    .map(|m| (m.room_id.clone(), !changes.unchanged(Kind::RoomMembers, [m.room_id.as_str()], s.pos)))
                    .collect(),
            ),
            Some(s) => Some(
                self.store
                    .get_rooms_changed_since(s.pos, head)
                    .await?
                    .into_iter()
                    .map(|(room, _, member)| (room, member.is_some()))
                    .collect(),
            ),
            None => None,
        };
        let filter = &req.filter;
        let wanted = |room: &str| {
            filter.rooms.as_ref().is_none_or(|r| r.iter().any(|x| x == room))
                && !filter.not_rooms.iter().any(|x| x == room)
        };
        let room_account_data = if skip.account_data {
            Vec::new()
        } else {
            self.store.get_account_data_since(user.as_str(), since_pos, head).await?
        };
        let mut receipts_by_room =
            if skip.receipts { HashMap::new() } else { self.receipt_events(user, since_pos, head).await? };
        // Rooms whose join row changed only because the user changed their profile
        // there: not new to the client.
        let mut already_joined = HashSet::new();
        let own_joins_changed = memberships.iter().any(|m| m.stream_ordering > since_pos && m.membership == "join");
        if since.is_some() && own_joins_changed {
            for (room, before) in self.store.get_joined_rooms_changed_since(user.as_str(), since_pos).await? {
                if before.is_some_and(|json| membership_of(&json) == "join") {
                    already_joined.insert(room);
                }
            }
        }

        // Joined rooms are built concurrently (each is a few independent queries); the
        // rest in order.
        let mut joined_work = Vec::new();
        for m in memberships.iter().filter(|m| wanted(&m.room_id)) {
            let room_id = OwnedRoomId::try_from(m.room_id.as_str()).map_err(Error::internal)?;
            let membership_changed = m.stream_ordering > since_pos;
            match m.membership.as_str() {
                "join" => {
                    let has_events = changed_rooms.as_ref().is_none_or(|c| c.contains_key(&m.room_id));
                    let typing = self.typing.typing_since(&room_id, since.map(|s| s.typing));
                    let receipts = receipts_by_room.remove(&m.room_id).unwrap_or_default();
                    let account: Vec<(String, String, String)> =
                        room_account_data.iter().filter(|(r, _, _)| *r == m.room_id).cloned().collect();
                    let initial = since.is_none() || (membership_changed && !already_joined.contains(&m.room_id));
                    let quiet = !has_events && typing.is_none() && receipts.is_empty() && account.is_empty();
                    if !initial && !req.full_state && quiet {
                        continue;
                    }
                    let summary = initial
                        || req.full_state
                        || !self.store.changes().unchanged(Kind::RoomMembers, [m.room_id.as_str()], since_pos);
                    let unless_empty = rooms_from_index
                        && !initial
                        && !req.full_state
                        && typing.is_none()
                        && receipts.is_empty()
                        && account.is_empty();
                    joined_work.push(JoinedWork {
                        room_id,
                        full_state: req.full_state,
                        initial,
                        has_events,
                        summary,
                        typing,
                        receipts,
                        account,
                        unless_empty,
                        members: None,
                        unread: (0, 0),
                        thread_unread: Vec::new(),
                    });
                }
                "invite" if since.is_none() || membership_changed => {
                    let mut invited = InvitedRoom::new();
                    invited.invite_state = InviteState::from(self.stripped_state(&room_id, &m.event_id).await?);
                    response.rooms.invite.insert(room_id, invited);
                }
                "knock" if since.is_none() || membership_changed => {
                    let mut state = KnockState::new();
                    state.events = self.stripped_state(&room_id, &m.event_id).await?;
                    response.rooms.knock.insert(room_id, KnockedRoom::from(state));
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
        self.fill_counts(user, &mut joined_work, head, req.filter.unread_thread_notifications).await?;
        let joined: Vec<Option<(OwnedRoomId, JoinedRoom)>> = stream::iter(joined_work)
            .map(|work| self.joined_room(session, work, since_pos, head, filter))
            .buffered(JOINED_ROOMS_AT_ONCE)
            .try_collect()
            .await?;
        response.rooms.join.extend(joined.into_iter().flatten());

        let mut global = Vec::new();
        for (room, data_type, content) in &room_account_data {
            if room.is_empty() && filter.account_data.matches_type(data_type) {
                let content: JsonValue = serde_json::from_str(content).map_err(Error::internal)?;
                global.push(to_raw(json!({"type": data_type, "content": content}))?);
            }
        }
        if since.is_none()
            && filter.account_data.matches_type("m.push_rules")
            && !room_account_data.iter().any(|(r, t, _)| r.is_empty() && t == "m.push_rules")
        {
            // Clients read their push rules from the initial sync.
            let rules = self.push_rules(user).await?;
            global.push(to_raw(json!({"type": "m.push_rules", "content": {"global": rules}}))?);
        }
        response.account_data = GlobalAccountData::new();
        response.account_data.events = global;
        if !skip.to_device {
            response.to_device.events = self.to_device_events(session, since.map(|s| s.pos), head).await?;
            if let Some(since) = since {
                self.store.changes().note(Kind::ToDeviceAcked, &to_device_key(session), since.pos);
            }
        }
        if let Some(since) = since {
            // Who shares an encrypted room with the user changes only with membership:
            // the user's own, or a member event in one of their rooms. Most syncs (a
            // message woke them) skip those queries.
            let memberships_moved = memberships.iter().any(|m| {
                m.stream_ordering > since.pos
                    || (m.membership == "join"
                        && changed_rooms.as_ref().and_then(|c| c.get(&m.room_id)).is_some_and(|members| *members))
            });
            if memberships_moved || !skip.device_lists {
                let (changed, left) = self.device_list_changes(user, since.pos, head, memberships_moved).await?;
                response.device_lists.changed = changed;
                response.device_lists.left = left;
            }
        }
        let (one_time_keys, fallback_keys) = self.key_status(session).await?;
        response.device_one_time_keys_count = one_time_keys;
        response.device_unused_fallback_key_types = Some(fallback_keys);
        response.presence = Presence::new();
        if filter.presence.matches_type("m.presence") && !skip.presence {
            response.presence.events =
                self.presence_events(user, since_pos, head, |sender| filter.presence.matches_sender(sender)).await?;
        }
        Ok(response)
    }

    /// The user's memberships as of stream position `head`. A membership whose change
    /// lies past `head` (committed, but the mark has not reached it) is read as it was
    /// at `head`: from the user's latest member event up to there, or left out when
    /// there is none. Read as it is now, it would drop the room (or show a change) from
    /// a response whose token then skips the room's events up to `head`.
    async fn memberships_at(&self, user: &ruma::UserId, head: i64) -> Result<Vec<MembershipRow>> {
        let mut memberships = self.store.get_user_memberships(user.as_str()).await?;
        for m in memberships.iter_mut().filter(|m| m.stream_ordering > head) {
            match self.store.get_member_event_at(&m.room_id, user.as_str(), head).await? {
                Some(event) => {
                    m.membership = membership_of(&event.json);
                    m.event_id = event.event_id;
                    m.stream_ordering = event.stream_ordering;
                }
                None => m.membership.clear(),
            }
        }
        memberships.retain(|m| !m.membership.is_empty());
        Ok(memberships)
    }

    /// One room of the `join` section.
    async fn joined_room(
        &self,
        session: &Session,
        work: JoinedWork,
        since_pos: i64,
        head: i64,
        filter: &SyncFilter,
    ) -> Result<Option<(OwnedRoomId, JoinedRoom)>> {
        let JoinedWork {
            room_id,
            initial,
            full_state,
            has_events,
            summary,
            typing,
            receipts,
            account,
            members,
            unread,
            thread_unread,
            unless_empty,
            ..
        } = work;
        let user = &session.user_id;
        let mut joined = JoinedRoom::new();
        // The summary comes first: with lazy loading, its heroes' member events belong
        // in `state`.
        let summary = match members.filter(|_| summary) {
            Some(members) => Some(self.room_summary(&room_id, user, &members).await?),
            None => None,
        };
        let heroes: Vec<&str> = summary.iter().flat_map(|s| s.heroes.iter().map(|h| h.as_str())).collect();
        if initial || full_state || has_events || (filter.lazy_load_members && !heroes.is_empty()) {
            let (timeline, state) =
                self.room_timeline(session, &room_id, since_pos, head, (initial, full_state), &heroes, filter).await?;
            if unless_empty && timeline.events.is_empty() && !timeline.limited && state.events.is_empty() {
                return Ok(None);
            }
            joined.timeline = timeline;
            joined.state = State::Before(state);
        }
        let mut ephemeral = Vec::new();
        if let Some(users) = typing.filter(|_| filter.ephemeral.matches_type("m.typing")) {
            ephemeral.push(to_raw(json!({"type": "m.typing", "content": {"user_ids": users}}))?);
        }
        if filter.ephemeral.matches_type("m.receipt") {
            for receipt in receipts {
                ephemeral.push(to_raw(receipt)?);
            }
        }
        joined.ephemeral = Ephemeral::new();
        joined.ephemeral.events = ephemeral;
        let account: Vec<_> = account.iter().filter(|(_, t, _)| filter.room_account_data.matches_type(t)).collect();
        joined.account_data = room_account_data_section(&account)?;
        if let Some(summary) = summary {
            joined.summary = summary;
        }
        let mut counts = UnreadNotificationsCount::new();
        counts.notification_count = UInt::new(unread.0.max(0) as u64);
        counts.highlight_count = UInt::new(unread.1.max(0) as u64);
        joined.unread_notifications = counts;
        for (root, (notifications, highlights)) in thread_unread {
            let Ok(root) = ruma::OwnedEventId::try_from(root) else { continue };
            let mut counts = UnreadNotificationsCount::new();
            counts.notification_count = UInt::new(notifications.max(0) as u64);
            counts.highlight_count = UInt::new(highlights.max(0) as u64);
            joined.unread_thread_notifications.insert(root, counts);
        }
        Ok(Some((room_id, joined)))
    }

    /// The timeline of a room up to `end` (from `since`, or from the start when the
    /// room is new to the client) and the state before it: all of it when `initial` or
    /// `full_state`, else what changed in a gap. State changes the timeline filter leaves
    /// out are added, so that the client's idea of the state stays right. With lazy
    /// loading, the member events kept are those of the timeline's senders, the user's
    /// own and those of the summary's `heroes` (empty when no summary is sent).
    #[allow(clippy::too_many_arguments)]
    async fn room_timeline(
        &self,
        session: &Session,
        room_id: &RoomId,
        since: i64,
        end: i64,
        (initial, full_state): (bool, bool),
        heroes: &[&str],
        filter: &SyncFilter,
    ) -> Result<(Timeline, StateEvents)> {
        let user = &session.user_id;
        let limit = filter.timeline_limit.clamp(1, 500);
        let floor = if initial { 0 } else { since };
        let scan = self.scan_timeline(room_id, floor, end, limit, &filter.timeline).await?;
        let vis = self.visibility_for(room_id, user).await?;
        let mut visible = Vec::with_capacity(scan.events.len());
        for e in scan.events {
            if vis.may_see(user, &e) {
                visible.push(e);
            }
        }
        let start = match visible.first() {
            Some(first) => first.stream_ordering - 1,
            None if scan.limited => scan.start,
            None => end,
        };
        let viewer = Viewer { user_id: user, device_id: Some(&session.device_id) };

        // The state before the timeline, and the position after which the state events
        // the filter hid still count.
        let key = |e: &StoredEvent| (e.event_type.clone(), e.state_key.clone().unwrap_or_default());
        // Lazy loading keeps only the member events of the timeline's senders, the
        // user's own and the heroes' (below): the others are not read at all.
        let lazy_members: Option<Vec<&str>> = filter.lazy_load_members.then(|| {
            let mut members: Vec<&str> = visible.iter().map(|e| e.sender.as_str()).collect();
            members.push(user.as_str());
            members.extend_from_slice(heroes);
            members.sort_unstable();
            members.dedup();
            members
        });
        let (base, hidden_after): (Vec<StoredEvent>, i64) = if initial || full_state {
            match visible.first() {
                Some(first) => {
                    let before = match self.state_group_before(first).await? {
                        Some(group) => self.state_events_for(group, lazy_members.as_deref()).await?,
                        None => Vec::new(),
                    };
                    (before, first.stream_ordering - 1)
                }
                // Nothing to show: the state at the end, which holds everything.
                None => (self.state_at(room_id, end, lazy_members.as_deref()).await?, end),
            }
        } else if scan.limited {
            // The gap's state: what differs between the room's state at `since` and just
            // before the timeline (state resolution may have changed any of it).
            (self.gap_state(room_id, since, scan.start).await?, scan.start)
        } else {
            (Vec::new(), since)
        };
        let mut state: BTreeMap<(String, String), StoredEvent> = base.into_iter().map(|e| (key(&e), e)).collect();

        // A state event the filter hid, if it is the latest of its key (not followed by
        // one in the timeline), joins the state section.
        let mut latest: BTreeMap<(String, String), (bool, &StoredEvent)> = BTreeMap::new();
        let shown = visible.iter().filter(|e| e.state_key.is_some()).map(|e| (false, e));
        let hidden = scan.hidden_state.iter().map(|e| (true, e));
        let mut after: Vec<(bool, &StoredEvent)> =
            shown.chain(hidden).filter(|(_, e)| e.stream_ordering > hidden_after).collect();
        after.sort_by_key(|(_, e)| e.stream_ordering);
        for (is_hidden, e) in after {
            latest.insert(key(e), (is_hidden, e));
        }
        for (k, (is_hidden, e)) in latest {
            if is_hidden && vis.may_see(user, e) {
                state.insert(k, e.clone());
            }
        }

        if let Some(wanted) = &lazy_members {
            state.retain(|(kind, state_key), _| {
                kind != "m.room.member" || wanted.binary_search(&state_key.as_str()).is_ok()
            });
            if !initial && !full_state {
                // The member events of the timeline's senders and of the heroes, unless
                // the timeline itself carries them: the client may never have had them.
                let in_timeline: Vec<&str> = visible.iter().map(|e| e.event_id.as_str()).collect();
                let senders = visible.iter().map(|e| e.sender.as_str());
                for e in self.member_events_of(room_id, senders.chain(heroes.iter().copied()).collect()).await? {
                    let k = key(&e);
                    if e.stream_ordering <= end
                        && !in_timeline.contains(&e.event_id.as_str())
                        && !state.contains_key(&k)
                    {
                        state.insert(k, e);
                    }
                }
            }
        }
        let mut state: Vec<StoredEvent> = state.into_values().filter(|e| filter.state.matches(e)).collect();
        state.sort_by_key(|e| e.stream_ordering);

        let timeline_events = self.client_events(&visible, Some(viewer), false).await?;
        let state_events = self.client_events(&state, Some(viewer), false).await?;
        let mut timeline = Timeline::new();
        timeline.limited = scan.limited;
        timeline.prev_batch = Some(format!("t{start}"));
        timeline.events = timeline_events;
        let mut state = StateEvents::new();
        state.events = state_events;
        Ok((timeline, state))
    }

    /// Reads a room's history backwards from `end` down to `floor` for the newest
    /// `limit` events that pass `filter`. Without a restrictive filter this is one query
    /// of `limit + 1` events; with one, pages of events until `limit + 1` pass, the
    /// history runs out, or `MAX_FILTERED_SCAN` events were read.
    async fn scan_timeline(
        &self,
        room_id: &RoomId,
        floor: i64,
        end: i64,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<TimelineScan> {
        let page = if filter.is_restrictive() { (limit + 1).max(FILTERED_PAGE) } else { limit + 1 };
        let (mut events, mut hidden_state) = (Vec::new(), Vec::new());
        let (mut cursor, mut read) = (end, 0);
        let limited = 'scan: loop {
            let batch = self.store.get_recent_room_events(room_id.as_str(), floor, cursor, page as i64).await?;
            let exhausted = batch.len() < page;
            for e in batch {
                read += 1;
                if filter.matches(&e) {
                    if events.len() == limit {
                        break 'scan true;
                    }
                    cursor = e.stream_ordering - 1;
                    events.push(e);
                } else {
                    cursor = e.stream_ordering - 1;
                    if e.state_key.is_some() {
                        hidden_state.push(e);
                    }
                }
            }
            if exhausted {
                break false;
            }
            if read >= MAX_FILTERED_SCAN {
                break true;
            }
        };
        events.reverse();
        hidden_state.reverse();
        let start = if limited { events.first().map_or(cursor, |e| e.stream_ordering - 1) } else { floor };
        // What lies before `start` is the gap's (its state is read separately).
        hidden_state.retain(|e| e.stream_ordering > start);
        Ok(TimelineScan { events, hidden_state, limited, start })
    }

    /// The room's state as of stream position `end`: after its last event up to there.
    /// The state events of the room's state at `until` that are not in its state at
    /// `since`, by the difference of the two state groups.
    async fn gap_state(&self, room_id: &RoomId, since: i64, until: i64) -> Result<Vec<StoredEvent>> {
        let before = self.store.get_room_state_group_at(room_id.as_str(), since).await?;
        let after = self.store.get_room_state_group_at(room_id.as_str(), until).await?;
        if after == 0 || after == before {
            return Ok(Vec::new());
        }
        let old = if before == 0 { Default::default() } else { self.group_state(before).await? };
        let changed: Vec<String> = self
            .group_state(after)
            .await?
            .into_iter()
            .filter(|(k, id)| old.get(k) != Some(id))
            .map(|(_, id)| id)
            .collect();
        self.store.get_events_by_ids(&changed).await
    }

    /// The room's state at stream position `end` (resolved, where branches met).
    async fn state_at(&self, room_id: &RoomId, end: i64, members: Option<&[&str]>) -> Result<Vec<StoredEvent>> {
        match self.store.get_room_state_group_at(room_id.as_str(), end).await? {
            0 => Ok(Vec::new()),
            group => self.state_events_for(group, members).await,
        }
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
        let (mut timeline, state) =
            self.room_timeline(session, room_id, since, m.stream_ordering, (since == 0, false), &[], filter).await?;
        // A room this server is not in (a refused knock, a rescinded invite, a declined
        // one): the event that ended the membership is an outlier, outside the stream.
        if let Some(event) = self.store.get_event(&m.event_id).await?.filter(|e| e.position.is_none())
            && event.state_key.as_deref() == Some(session.user_id.as_str())
            && membership_of(&event.json) == m.membership
        {
            let viewer = Viewer { user_id: &session.user_id, device_id: Some(&session.device_id) };
            timeline.events.extend(self.client_events(std::slice::from_ref(&event), Some(viewer), false).await?);
        }
        let mut left = LeftRoom::new();
        left.timeline = timeline;
        left.state = State::Before(state);
        Ok(left)
    }

    /// Member counts and unread counts of every room about to be built, a few queries
    /// for all of them instead of several per room. The unread counts are the ones kept
    /// at write time (`storage/push.rs`): nothing is counted here.
    async fn fill_counts(
        &self,
        user: &ruma::UserId,
        work: &mut [JoinedWork],
        head: i64,
        by_thread: bool,
    ) -> Result<()> {
        if work.is_empty() {
            return Ok(());
        }
        let room_ids: Vec<&str> = work.iter().map(|w| w.room_id.as_str()).collect();
        let summarised: Vec<&str> = work.iter().filter(|w| w.summary).map(|w| w.room_id.as_str()).collect();
        let members =
            if summarised.is_empty() { HashMap::new() } else { self.member_summaries(&summarised, head).await? };
        if by_thread {
            for w in work.iter_mut() {
                w.members = members.get(w.room_id.as_str()).cloned();
            }
            return self.fill_thread_counts(user, work, &room_ids_owned(work)).await;
        }
        let unread: HashMap<String, (i64, i64)> = self
            .store
            .get_unread_counts(user.as_str(), &room_ids, false)
            .await?
            .into_iter()
            .map(|(room, _, n, h)| (room, (n, h)))
            .collect();
        for w in work.iter_mut() {
            w.members = members.get(w.room_id.as_str()).cloned();
            w.unread = unread.get(w.room_id.as_str()).copied().unwrap_or_default();
        }
        Ok(())
    }

    /// Unread counts by thread, as kept: an unthreaded receipt (or the join) is where
    /// every count starts; a `main` receipt moves the main timeline's start, a receipt
    /// in a thread that thread's. One query for all the rooms.
    async fn fill_thread_counts(
        &self,
        user: &ruma::UserId,
        work: &mut [JoinedWork],
        room_ids: &[String],
    ) -> Result<()> {
        let room_ids: Vec<&str> = room_ids.iter().map(String::as_str).collect();
        let mut counts: HashMap<String, HashMap<String, (i64, i64)>> = HashMap::new();
        for (room, thread, n, h) in self.store.get_unread_counts(user.as_str(), &room_ids, true).await? {
            counts.entry(room).or_default().insert(thread, (n, h));
        }
        for w in work.iter_mut() {
            let mut rooms_counts = counts.remove(w.room_id.as_str()).unwrap_or_default();
            w.unread = rooms_counts.remove("main").unwrap_or_default();
            w.thread_unread = rooms_counts.into_iter().collect();
        }
        Ok(())
    }

    /// A joined room's summary. Heroes are only for naming a room that has neither a
    /// name nor a canonical alias (the spec requires them then), so a named room has
    /// none, and with lazy loading no member events come along for them.
    async fn room_summary(
        &self,
        room_id: &RoomId,
        user: &ruma::UserId,
        members: &summaries::MemberSummary,
    ) -> Result<RoomSummary> {
        let (joined, invited) = (members.joined, members.invited);
        let naming = [("m.room.name".to_owned(), String::new()), ("m.room.canonical_alias".to_owned(), String::new())];
        let named = self.store.get_current_state_entries(room_id.as_str(), &naming).await?.iter().any(|e| {
            let field = if e.event_type == "m.room.name" { "name" } else { "alias" };
            !content_field(&e.json, field).is_empty()
        });
        let heroes = match named {
            true => Vec::new(),
            false => {
                let first = self.first_members(room_id.as_str(), members).await?;
                let heroes: Vec<String> = first.iter().filter(|m| *m != user.as_str()).take(5).cloned().collect();
                match heroes.is_empty() {
                    // Nobody else is joined or invited: those who left or were banned.
                    true => self.store.get_room_heroes(room_id.as_str(), user.as_str(), 5).await?,
                    false => heroes,
                }
            }
        };
        let mut summary = RoomSummary::new();
        summary.heroes = heroes.into_iter().filter_map(|h| OwnedUserId::try_from(h).ok()).collect();
        summary.joined_member_count = UInt::new(joined as u64);
        summary.invited_member_count = UInt::new(invited as u64);
        Ok(summary)
    }

    /// Stripped state for an invite or a knock: a few room state events, and the invite
    /// or knock itself.
    async fn stripped_state(
        &self,
        room_id: &RoomId,
        invite_event_id: &str,
    ) -> Result<Vec<ruma::serde::Raw<ruma::events::AnyStrippedStateEvent>>> {
        if let Some(state) = self.store.get_invite_state(invite_event_id).await? {
            // An invite from another server, or a knock on a room of another server: the
            // state that came along, and the invite or knock.
            let mut stripped: Vec<JsonValue> = serde_json::from_str(&state).map_err(Error::internal)?;
            if let Some(invite) = self.store.get_event(invite_event_id).await? {
                let pdu: JsonValue = serde_json::from_str(&invite.json).map_err(Error::internal)?;
                stripped.push(json!({
                    "type": invite.event_type,
                    "state_key": invite.state_key,
                    "sender": invite.sender,
                    "content": pdu["content"],
                }));
            }
            return stripped.into_iter().map(to_raw).collect();
        }
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

/// The room ids of the rooms about to be built.
fn room_ids_owned(work: &[JoinedWork]) -> Vec<String> {
    work.iter().map(|w| w.room_id.to_string()).collect()
}
