//! The write path of room events: `persist_event` stores one event whose place in the
//! DAG, the stream and the room's state the pipeline (`service/rooms/pipeline/`) has
//! decided; `persist_outliers` stores a batch of events without state (a join's state
//! and auth chain); `create_room` stores a new room's first events, all or nothing.
//! Each is one transaction: stream positions, the event rows, prev and auth edges,
//! state groups, `current_state` and memberships (by delta), forward and backward
//! extremities, push actions, relations (`event_relations`), redactions and the search
//! index (`search.rs`).

use super::changes::{Change, Kind};
use super::{
    Store, StoredEvent,
    batch::{Batch, batched, flush_batch},
    events::take_counter,
    on_pool,
    push::{close_push_span, count_push_actions, forget_unread, insert_push_group, move_push_spans, uncount_redacted},
    relations::{insert_relation, unrelate},
    search::{index_for_search, unindex_for_search},
    stream::{self, Positions},
};
use crate::error::{Error, Result};

/// Everything needed to store one new event.
pub struct NewEvent<'a> {
    pub event_id: &'a str,
    pub room_id: &'a str,
    pub sender: &'a str,
    pub event_type: &'a str,
    pub state_key: Option<&'a str>,
    pub depth: i64,
    pub origin_server_ts: i64,
    pub json: &'a str,
    pub prev_events: &'a [String],
    pub auth_events: &'a [String],
    /// For `m.room.member` events: the membership it sets.
    pub membership: Option<&'a str>,
    /// Redactions this event makes or undergoes (see `Redaction`).
    pub redactions: &'a [Redaction<'a>],
    /// A client send's transaction: device, scope (the endpoint's path) and id.
    pub txn: Option<EventTxn<'a>>,
    /// What the push rules of the room's local members answered (`PushOutcome`).
    pub push: &'a super::PushOutcome,
    /// Where the event goes in the DAG, the stream and the room's state.
    pub dag: Dag<'a>,
}

/// A redaction stored with an event (applied only if the event is accepted into the
/// room, except `HeldBy`).
#[derive(Clone, Copy, Debug)]
pub enum Redaction<'a> {
    /// The event is a redaction that applies to `target`, stored: the target's JSON
    /// becomes `redacted_json` (its content is gone from storage).
    Apply { target: &'a str, redacted_json: &'a str },
    /// The event is a redaction whose target is not stored yet: held in
    /// `pending_redactions` until it comes.
    Hold { target: &'a str },
    /// The event is the target of the held redaction `by`, which applies: it is stored
    /// as `redacted_json`, and the redactions held for it are done with.
    HeldBy { by: &'a str, redacted_json: &'a str },
}

/// (type, state key, event id): one entry of a room state.
pub type StateEntry = (String, String, String);

/// Where an event goes: the pipeline decides, `persist_event` writes. The default is a
/// local event appended on top of the room's only forward extremity and current state.
pub struct Dag<'a> {
    pub position: Position,
    /// Stored without state (a join's state or auth chain): no state group, no stream
    /// position, not an extremity.
    pub outlier: bool,
    /// Why the event failed the auth rules: stored, never state, never seen by clients.
    pub rejected_reason: Option<&'a str>,
    /// Passed auth but not against the room's current state: stored with its state,
    /// never seen by clients, not an extremity.
    pub soft_failed: bool,
    /// The state before the event.
    pub state_before: StateBefore<'a>,
    /// How the room's current state changes.
    pub current: CurrentChange<'a>,
    /// How forward and backward extremities change.
    pub extremities: ExtremityChange,
    /// `unsigned.replaces_state`: `None` reads it from `current_state` (the state before
    /// a linear append), `Some` gives it (from the state before the event).
    pub replaces_state: Option<Option<&'a str>>,
    /// The event is stored as an outlier and now joins the room (it came live or by
    /// backfill): its row is updated, its edges are there already.
    pub from_outlier: bool,
    /// The room's current state group before the event (0: none). Where the event
    /// leaves the current state unchanged, it is recorded as the state at its position
    /// (`room_current_groups`).
    pub current_before: i64,
}

impl Default for Dag<'_> {
    fn default() -> Self {
        Dag {
            position: Position::Live,
            outlier: false,
            rejected_reason: None,
            soft_failed: false,
            state_before: StateBefore::None,
            current: CurrentChange::Append,
            extremities: ExtremityChange::Linear,
            replaces_state: None,
            from_outlier: false,
            current_before: 0,
        }
    }
}

/// Which counter numbers an event.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Position {
    /// The next live stream position (wakes `/sync`).
    Live,
    /// The next backfill position (-1, -2, ...): before the live stream.
    Backfill,
    /// None: outliers, rejected and soft-failed events.
    None,
}

/// The state before an event.
pub enum StateBefore<'a> {
    /// None: a create event, an outlier or a rejected event.
    None,
    /// An existing state group.
    Group(i64),
    /// A state resolved from several prev events': written as a new snapshot group.
    Resolved(&'a [StateEntry]),
}

/// How the room's current state changes with an event.
pub enum CurrentChange<'a> {
    Unchanged,
    /// The event's state before was the current state and it is the only forward
    /// extremity after: a state event takes its place in `current_state` (and
    /// `memberships`), a message changes nothing.
    Append,
    /// The current state changed by this delta (after state resolution): entries set or
    /// removed, with the memberships they set, (user, membership, event id; one per
    /// user); and, when
    /// the new current state is no event's state (several forward extremities), the full
    /// state to write as the room's current state group.
    Delta {
        set: &'a [StateEntry],
        removed: &'a [(String, String)],
        memberships: &'a [(String, String, String)],
        group: Option<&'a [StateEntry]>,
    },
}

/// How extremities change with an event.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ExtremityChange {
    /// A local event on top of the forward extremities it names: they are replaced by it
    /// (one statement when it names the only one).
    Linear,
    /// Any other accepted event: its prevs stop being forward extremities, it becomes
    /// one unless a stored event names it as prev (a child that arrived first); prevs not
    /// stored become backward extremities, and it stops being one.
    General,
    /// Backfilled history: as `General`, but it never becomes a forward extremity itself
    /// (it is older than the room's head, and its children come after it).
    Backward,
    /// Outliers, rejected and soft-failed events leave forward extremities alone (a stored
    /// event still stops being a backward extremity).
    Unchanged,
}

/// The transaction id of a client send, unique per device and endpoint path.
#[derive(Clone, Copy)]
pub struct EventTxn<'a> {
    pub device_id: &'a str,
    pub scope: &'a str,
    pub txn_id: &'a str,
}

/// A room about to be created with its first events.
pub struct NewRoom<'a> {
    pub room_id: &'a str,
    pub version: &'a str,
    pub creator: &'a str,
    pub created_ts: i64,
    /// A local alias pointing at the room, made in the same transaction.
    pub alias: Option<&'a str>,
    /// Listed in the public room directory.
    pub published: bool,
}

/// Where an event was stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoredAt {
    /// Its stream position (`None` outside the stream).
    pub position: Option<i64>,
    /// The state group after it (`None` for outliers and rejected events).
    pub state_group: Option<i64>,
    /// The state group written for the room's new current state, if any.
    pub current_group: Option<i64>,
}

/// What storing one event did.
pub enum Persisted {
    Stored(StoredAt),
    /// An event with this id was already stored (at this position, 0 outside the
    /// stream): nothing changed.
    Duplicate(i64),
    /// The device already used this transaction id on this endpoint: nothing changed.
    TxnTaken,
}

/// What creating a room did.
pub enum RoomCreated {
    /// Stored; the stream positions of the events, in order, and the room's state group.
    Stored(Vec<i64>, i64),
    /// Another room already has this id (room version 12 derives it from the create
    /// event): nothing was stored, build the room again.
    RoomIdTaken,
}

/// An event stored without state, in a batch.
pub struct Outlier<'a> {
    pub event_id: &'a str,
    pub room_id: &'a str,
    pub sender: &'a str,
    pub event_type: &'a str,
    pub state_key: Option<&'a str>,
    pub depth: i64,
    pub origin_server_ts: i64,
    pub json: &'a str,
    pub prev_events: &'a [String],
    pub auth_events: &'a [String],
    pub rejected_reason: Option<&'a str>,
}

/// After this many deltas a state group is written as a full snapshot.
const MAX_STATE_CHAIN: i64 = 64;

/// Rows per multi-row insert of events (9 values each) and push actions (5), under
/// SQLite's 32,766 bound values per statement.
const BATCH_ROWS: usize = 2_000;
/// Rows per multi-row insert of edges, state entries and memberships (at most 5 values
/// each).
const SMALL_ROWS: usize = 5_000;
/// Outliers per transaction: a `send_join` answer of 10,000 events takes two.
const OUTLIERS_PER_TX: usize = 5_000;

/// Writes `$entries` (`&[StateEntry]`) as a new snapshot state group of room `$room`;
/// evaluates to its id (from the reserved blocks `$blocks` when they have one).
macro_rules! insert_snapshot_group {
    ($tx:expr, $blocks:expr, $room:expr, $entries:expr) => {{
        let entries: &[StateEntry] = $entries;
        let group = take_counter!($tx, $blocks, "state_group");
        sqlx::query(
            "INSERT INTO state_groups (group_id, room_id, prev_group, is_snapshot, chain_length)
             VALUES ($1, $2, NULL, TRUE, 0)",
        )
        .bind(group)
        .bind($room)
        .execute(&mut *$tx)
        .await?;
        for chunk in entries.chunks(SMALL_ROWS) {
            let mut query =
                sqlx::QueryBuilder::new("INSERT INTO state_group_entries (group_id, event_type, state_key, event_id) ");
            query.push_values(chunk, |mut row, (t, k, id)| {
                row.push_bind(group).push_bind(t).push_bind(k).push_bind(id);
            });
            query.build().execute(&mut *$tx).await?;
        }
        group
    }};
}

/// Writes the prev and auth edges of an event (or many: `$rows` is
/// `&[(event_id, room_id, prevs, auths)]`), in `$batch` (`batch.rs`).
macro_rules! insert_edges {
    ($tx:expr, $batch:expr, $rows:expr) => {{
        let rows: &[(&str, &str, &[String], &[String])] = $rows;
        let edges: Vec<(&str, &str, &str)> =
            rows.iter().flat_map(|(id, room, prevs, _)| prevs.iter().map(move |p| (*id, p.as_str(), *room))).collect();
        for chunk in edges.chunks(SMALL_ROWS) {
            batched!($tx, $batch, |query: &mut sqlx::QueryBuilder<_>| {
                query.push("INSERT INTO event_edges (event_id, prev_event_id, room_id) ");
                query.push_values(chunk, |mut row, (id, prev, room)| {
                    row.push_bind(*id).push_bind(*prev).push_bind(*room);
                });
                query.push(" ON CONFLICT DO NOTHING");
            });
        }
        let auth: Vec<(&str, &str)> =
            rows.iter().flat_map(|(id, _, _, auths)| auths.iter().map(move |a| (*id, a.as_str()))).collect();
        for chunk in auth.chunks(SMALL_ROWS) {
            batched!($tx, $batch, |query: &mut sqlx::QueryBuilder<_>| {
                query.push("INSERT INTO event_auth (event_id, auth_event_id) ");
                query.push_values(chunk, |mut row, (id, auth)| {
                    row.push_bind(*id).push_bind(*auth);
                });
                query.push(" ON CONFLICT DO NOTHING");
            });
        }
    }};
}

/// Whether a transaction is PostgreSQL's (for the few statements whose text differs).
fn is_postgres<DB: sqlx::Database>(_: &sqlx::Transaction<'_, DB>) -> bool {
    DB::NAME == "PostgreSQL"
}

/// The insert of one event row (18 parameters).
macro_rules! insert_event_sql {
    () => {
        "INSERT INTO events (stream_ordering, event_id, room_id, sender, event_type, state_key, depth,
             origin_server_ts, state_group, json, redacted_by, txn_device_id, txn_scope, txn_id, replaces_state,
             outlier, rejected_reason, soft_failed, related)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, NULL, $11, $12, $13,
             CASE WHEN $14 THEN (SELECT event_id FROM current_state
                 WHERE room_id = $3 AND event_type = $5 AND state_key = $6) ELSE $15 END,
             $16, $17, $18, EXISTS (SELECT 1 FROM event_relations WHERE relates_to = $2))
         ON CONFLICT DO NOTHING"
    };
}

/// Stores `$e` (a `NewEvent`) in transaction `$tx`, at live stream position `$live`
/// (taken before the transaction for a `Position::Live` event). Evaluates to
/// `Some(StoredAt)`, or `None` when the event id or transaction id was taken (the
/// caller rolls back).
macro_rules! insert_event {
    ($tx:expr, $blocks:expr, $e:expr, $live:expr) => {{
        let e: &NewEvent<'_> = $e;
        let d = &e.dag;
        let pos: Option<i64> = match d.position {
            Position::Live => {
                Some($live.ok_or_else(|| Error::internal("a live event without a stream position"))?)
            }
            Position::Backfill => Some(take_counter!($tx, $blocks, "backfill")),
            Position::None => None,
        };
        let before: Option<i64> = match d.state_before {
            StateBefore::None => None,
            StateBefore::Group(group) => Some(group),
            StateBefore::Resolved(entries) => Some(insert_snapshot_group!($tx, $blocks, e.room_id, entries)),
        };
        let has_state = !d.outlier && d.rejected_reason.is_none();
        // A state event starts a new group: the group before plus itself.
        let after: Option<i64> = match (has_state, e.state_key) {
            (false, _) => None,
            (true, None) => before,
            (true, Some(_)) => Some(take_counter!($tx, $blocks, "state_group")),
        };
        let replaces_from_current = d.replaces_state.is_none() && e.state_key.is_some();
        // On PostgreSQL the event and its edges are one statement (one round trip, as
        // many as before edges were stored); SQLite runs in process and takes three.
        let postgres = is_postgres(&$tx);
        let sql = if postgres {
            concat!(
                "WITH ins AS (",
                insert_event_sql!(),
                " RETURNING event_id, replaces_state, related),
                 edges AS (INSERT INTO event_edges (event_id, prev_event_id, room_id)
                     SELECT ins.event_id, p.value, $3 FROM ins, jsonb_array_elements_text(CAST($19 AS jsonb)) AS p(value)
                     ON CONFLICT DO NOTHING),
                 auth AS (INSERT INTO event_auth (event_id, auth_event_id)
                     SELECT ins.event_id, a.value FROM ins, jsonb_array_elements_text(CAST($20 AS jsonb)) AS a(value)
                     ON CONFLICT DO NOTHING)
                 SELECT replaces_state, related FROM ins"
            )
        } else {
            concat!(insert_event_sql!(), " RETURNING replaces_state, related")
        };
        let query = sqlx::query_as::<_, (Option<String>, bool)>(sql)
            .bind(pos)
            .bind(e.event_id)
            .bind(e.room_id)
            .bind(e.sender)
            .bind(e.event_type)
            .bind(e.state_key)
            .bind(e.depth)
            .bind(e.origin_server_ts)
            .bind(after)
            .bind(e.json)
            .bind(e.txn.map(|t| t.device_id))
            .bind(e.txn.map(|t| t.scope))
            .bind(e.txn.map(|t| t.txn_id))
            .bind(replaces_from_current)
            .bind(d.replaces_state.flatten())
            .bind(d.outlier)
            .bind(d.rejected_reason)
            .bind(d.soft_failed);
        let inserted = if d.from_outlier {
            sqlx::query_as::<_, (Option<String>, bool)>(
                "UPDATE events SET stream_ordering = $2, state_group = $3, outlier = FALSE, rejected_reason = $4,
                     soft_failed = $5, replaces_state = $6,
                     related = EXISTS (SELECT 1 FROM event_relations WHERE relates_to = $1)
                 WHERE event_id = $1 AND outlier
                 RETURNING replaces_state, related",
            )
            .bind(e.event_id)
            .bind(pos)
            .bind(after)
            .bind(d.rejected_reason)
            .bind(d.soft_failed)
            .bind(d.replaces_state.flatten())
            .fetch_optional(&mut *$tx)
            .await?
        } else if postgres {
            let prevs = serde_json::to_string(e.prev_events).map_err(Error::internal)?;
            let auths = serde_json::to_string(e.auth_events).map_err(Error::internal)?;
            query.bind(prevs).bind(auths).fetch_optional(&mut *$tx).await?
        } else {
            query.fetch_optional(&mut *$tx).await?
        };
        // What the database computed of the row, for the rooms' live tails (`live.rs`).
        if let Some((replaces_state, related)) = inserted {
            // What follows is gathered into as few round trips as the results read allow
            // (`batch.rs`): a message is one.
            let mut batch = Batch::of(&$tx);
            if !postgres && !d.from_outlier {
                insert_edges!($tx, batch, &[(e.event_id, e.room_id, e.prev_events, e.auth_events)]);
            }
            // Searchable: events in the room's history that clients see (`event_search`).
            if let (Some(p), true) = (pos, has_state && !d.soft_failed) {
                index_for_search!($tx, batch, e, p);
            }
            // State events read what they write next.
            if e.state_key.is_some() || matches!(d.current, CurrentChange::Delta { .. }) {
                flush_batch!($tx, batch);
            }
            if let (Some(group), Some(state_key)) = (after.filter(|_| e.state_key.is_some()), e.state_key) {
                // The new group is a delta on the group before, or every so often (and for
                // the first) a full snapshot copied from it: the newest entry of each key
                // along the chain (a window, not a correlated NOT EXISTS, which SQLite ran
                // as a scan of every group's entries per entry copied).
                let (snapshot,): (bool,) = sqlx::query_as(
                    "INSERT INTO state_groups (group_id, room_id, prev_group, is_snapshot, chain_length)
                     SELECT $1, $2, $3, COALESCE(p.chain_length + 1 >= $4, TRUE),
                         CASE WHEN COALESCE(p.chain_length + 1 >= $4, TRUE) THEN 0 ELSE p.chain_length + 1 END
                     FROM (SELECT 1 AS one) x LEFT JOIN state_groups p ON p.group_id = $3
                     RETURNING is_snapshot",
                )
                .bind(group)
                .bind(e.room_id)
                .bind(before)
                .bind(MAX_STATE_CHAIN)
                .fetch_one(&mut *$tx)
                .await?;
                if let (true, Some(before)) = (snapshot, before) {
                    sqlx::query(
                        "WITH RECURSIVE chain(group_id, prev_group, snap, n) AS (
                             SELECT group_id, prev_group, is_snapshot, CAST(0 AS BIGINT) FROM state_groups
                             WHERE group_id = $2
                             UNION ALL
                             SELECT g.group_id, g.prev_group, g.is_snapshot, c.n + 1
                             FROM state_groups g JOIN chain c ON g.group_id = c.prev_group WHERE NOT c.snap
                         )
                         INSERT INTO state_group_entries (group_id, event_type, state_key, event_id)
                         SELECT $1, event_type, state_key, event_id FROM (
                             SELECT s.event_type, s.state_key, s.event_id, ROW_NUMBER() OVER (
                                 PARTITION BY s.event_type, s.state_key ORDER BY c.n) AS newest
                             FROM chain c JOIN state_group_entries s ON s.group_id = c.group_id
                         ) ranked
                         WHERE newest = 1 AND NOT (event_type = $3 AND state_key = $4)",
                    )
                    .bind(group)
                    .bind(before)
                    .bind(e.event_type)
                    .bind(state_key)
                    .execute(&mut *$tx)
                    .await?;
                }
                sqlx::query(
                    "INSERT INTO state_group_entries (group_id, event_type, state_key, event_id) VALUES ($1, $2, $3, $4)",
                )
                .bind(group)
                .bind(e.event_type)
                .bind(state_key)
                .bind(e.event_id)
                .execute(&mut *$tx)
                .await?;
            }
            let mut current_group = None;
            match &d.current {
                CurrentChange::Unchanged => {}
                CurrentChange::Append => {
                    if let Some(state_key) = e.state_key {
                        sqlx::query(
                            "INSERT INTO current_state (room_id, event_type, state_key, event_id) VALUES ($1, $2, $3, $4)
                             ON CONFLICT (room_id, event_type, state_key) DO UPDATE SET event_id = excluded.event_id",
                        )
                        .bind(e.room_id)
                        .bind(e.event_type)
                        .bind(state_key)
                        .bind(e.event_id)
                        .execute(&mut *$tx)
                        .await?;
                    }
                    if let (Some(membership), Some(user_id)) = (e.membership, e.state_key) {
                        sqlx::query(
                            "INSERT INTO memberships (room_id, user_id, membership, event_id, stream_ordering, forgotten)
                             VALUES ($1, $2, $3, $4, $5, FALSE)
                             ON CONFLICT (room_id, user_id) DO UPDATE SET membership = excluded.membership,
                                event_id = excluded.event_id, stream_ordering = excluded.stream_ordering,
                                forgotten = FALSE",
                        )
                        .bind(e.room_id)
                        .bind(user_id)
                        .bind(membership)
                        .bind(e.event_id)
                        .bind(pos.unwrap_or(0))
                        .execute(&mut *$tx)
                        .await?;
                        if membership != "join" {
                            forget_unread!($tx, e.room_id, user_id);
                            close_push_span!($tx, e.room_id, user_id, pos.unwrap_or(0));
                        }
                    }
                }
                CurrentChange::Delta { set, removed, memberships, group } => {
                    for (t, k) in removed.iter() {
                        sqlx::query("DELETE FROM current_state WHERE room_id = $1 AND event_type = $2 AND state_key = $3")
                            .bind(e.room_id)
                            .bind(t)
                            .bind(k)
                            .execute(&mut *$tx)
                            .await?;
                        if t == "m.room.member" {
                            sqlx::query("DELETE FROM memberships WHERE room_id = $1 AND user_id = $2")
                                .bind(e.room_id)
                                .bind(k)
                                .execute(&mut *$tx)
                                .await?;
                            forget_unread!($tx, e.room_id, k);
                            close_push_span!($tx, e.room_id, k, pos.unwrap_or(0));
                        }
                    }
                    // Multi-row upserts: a join to a remote room sets its whole state here.
                    for chunk in set.chunks(SMALL_ROWS) {
                        let mut query = sqlx::QueryBuilder::new(
                            "INSERT INTO current_state (room_id, event_type, state_key, event_id) ",
                        );
                        query.push_values(chunk, |mut row, (t, k, id)| {
                            row.push_bind(e.room_id).push_bind(t).push_bind(k).push_bind(id);
                        });
                        query.push(
                            " ON CONFLICT (room_id, event_type, state_key) DO UPDATE SET event_id = excluded.event_id",
                        );
                        query.build().execute(&mut *$tx).await?;
                    }
                    // The membership changes at this event's position, so that /sync sees it
                    // (an event that changes the current state is accepted: it has one).
                    let at = pos.ok_or_else(|| Error::internal("a state change without a stream position"))?;
                    for chunk in memberships.chunks(SMALL_ROWS) {
                        let mut query = sqlx::QueryBuilder::new(
                            "INSERT INTO memberships (room_id, user_id, membership, event_id, stream_ordering, forgotten) ",
                        );
                        query.push_values(chunk, |mut row, (user_id, membership, event_id)| {
                            row.push_bind(e.room_id)
                                .push_bind(user_id)
                                .push_bind(membership)
                                .push_bind(event_id)
                                .push_bind(at)
                                .push("FALSE");
                        });
                        query.push(
                            " ON CONFLICT (room_id, user_id) DO UPDATE SET membership = excluded.membership,
                                event_id = excluded.event_id, stream_ordering = excluded.stream_ordering,
                                forgotten = FALSE",
                        );
                        query.build().execute(&mut *$tx).await?;
                        for (user_id, _, _) in chunk.iter().filter(|(_, membership, _)| membership != "join") {
                            forget_unread!($tx, e.room_id, user_id);
                            close_push_span!($tx, e.room_id, user_id, at);
                        }
                    }
                    if let Some(entries) = group {
                        current_group = Some(insert_snapshot_group!($tx, $blocks, e.room_id, entries));
                    }
                }
            }
            if let Some(pos) = pos {
                for chunk in e.push.own.chunks(BATCH_ROWS) {
                    batched!($tx, batch, |query: &mut sqlx::QueryBuilder<_>| {
                        query.push(
                            "INSERT INTO event_push_actions (user_id, room_id, stream_pos, event_id, highlight, actions,
                                notifies, group_notifs, group_highlights) ",
                        );
                        query.push_values(chunk, |mut row, a| {
                            row.push_bind(&a.user_id)
                                .push_bind(e.room_id)
                                .push_bind(pos)
                                .push_bind(e.event_id)
                                .push_bind(i32::from(a.highlight))
                                .push_bind(&a.actions)
                                .push_bind(i32::from(a.notifies))
                                .push_bind(i32::from(a.group_notifs))
                                .push_bind(i32::from(a.group_highlight));
                        });
                    });
                    // The pushes to send for it, in the same transaction (`service/push_sender.rs`).
                    let notified: Vec<&super::PushActionRow> = chunk.iter().filter(|a| a.notifies).collect();
                    if !notified.is_empty() {
                        super::pushers::enqueue_event_pushes!($tx, batch, &notified, e.room_id, e.event_id, pos);
                    }
                }
                // An event that comes redacted (a held redaction) counts for nobody.
                if !e.redactions.iter().any(|r| matches!(r, Redaction::HeldBy { .. })) {
                    for group in &e.push.groups {
                        insert_push_group!($tx, batch, e.room_id, pos, e.event_id, group);
                        super::pushers::enqueue_group_pushes!($tx, batch, e.room_id, e.event_id, pos, group.template);
                    }
                }
            }
            match d.extremities {
                ExtremityChange::Linear if batch.together => {
                    // Its prevs are replaced by it, in the batch: two statements, one
                    // round trip with the rest.
                    if !e.prev_events.is_empty() {
                    batched!($tx, batch, |query: &mut sqlx::QueryBuilder<_>| {
                        query.push("DELETE FROM forward_extremities WHERE room_id = ");
                        query.push_bind(e.room_id);
                        query.push(" AND event_id IN (");
                        let mut prevs = query.separated(", ");
                        for prev in e.prev_events {
                            prevs.push_bind(prev);
                        }
                        query.push(")");
                    });
                    }
                    batched!($tx, batch, |query: &mut sqlx::QueryBuilder<_>| {
                        query.push("INSERT INTO forward_extremities (room_id, event_id) VALUES (");
                        query.push_bind(e.room_id);
                        query.push(", ");
                        query.push_bind(e.event_id);
                        query.push(")");
                    });
                }
                ExtremityChange::Linear => {
                    // The usual case, one prev event that was the only extremity, is one statement.
                    let replaced = match e.prev_events {
                        [only] => {
                            sqlx::query(
                                "UPDATE forward_extremities SET event_id = $3 WHERE room_id = $1 AND event_id = $2",
                            )
                            .bind(e.room_id)
                            .bind(only)
                            .bind(e.event_id)
                            .execute(&mut *$tx)
                            .await?
                            .rows_affected()
                                == 1
                        }
                        _ => false,
                    };
                    if !replaced {
                        for prev in e.prev_events {
                            sqlx::query("DELETE FROM forward_extremities WHERE room_id = $1 AND event_id = $2")
                                .bind(e.room_id)
                                .bind(prev)
                                .execute(&mut *$tx)
                                .await?;
                        }
                        sqlx::query("INSERT INTO forward_extremities (room_id, event_id) VALUES ($1, $2)")
                            .bind(e.room_id)
                            .bind(e.event_id)
                            .execute(&mut *$tx)
                            .await?;
                    }
                }
                ExtremityChange::General | ExtremityChange::Backward => {
                    flush_batch!($tx, batch);
                    for prev in e.prev_events {
                        sqlx::query("DELETE FROM forward_extremities WHERE room_id = $1 AND event_id = $2")
                            .bind(e.room_id)
                            .bind(prev)
                            .execute(&mut *$tx)
                            .await?;
                        sqlx::query(
                            "INSERT INTO backward_extremities (room_id, event_id)
                             SELECT $1, $2 WHERE NOT EXISTS (
                                 SELECT 1 FROM events WHERE event_id = $2 AND NOT outlier)
                             ON CONFLICT DO NOTHING",
                        )
                        .bind(e.room_id)
                        .bind(prev)
                        .execute(&mut *$tx)
                        .await?;
                    }
                    if d.extremities == ExtremityChange::General {
                        sqlx::query(
                            "INSERT INTO forward_extremities (room_id, event_id)
                             SELECT $1, $2 WHERE NOT EXISTS (
                                 SELECT 1 FROM event_edges c JOIN events e ON e.event_id = c.event_id
                                 WHERE c.prev_event_id = $2 AND NOT e.outlier AND e.rejected_reason IS NULL
                                   AND NOT e.soft_failed)
                             ON CONFLICT DO NOTHING",
                        )
                        .bind(e.room_id)
                        .bind(e.event_id)
                        .execute(&mut *$tx)
                        .await?;
                    }
                }
                ExtremityChange::Unchanged => {}
            }
            if d.extremities != ExtremityChange::Linear && !d.outlier {
                flush_batch!($tx, batch);
                sqlx::query("DELETE FROM backward_extremities WHERE room_id = $1 AND event_id = $2")
                    .bind(e.room_id)
                    .bind(e.event_id)
                    .execute(&mut *$tx)
                    .await?;
            }
            if !e.redactions.is_empty() {
                flush_batch!($tx, batch);
            }
            for redaction in e.redactions {
                match *redaction {
                    Redaction::Apply { target, redacted_json } if has_state && !d.soft_failed => {
                        if sqlx::query(
                            "UPDATE events SET json = $2, redacted_by = $3 WHERE event_id = $1 AND redacted_by IS NULL",
                        )
                        .bind(target)
                        .bind(redacted_json)
                        .bind(e.event_id)
                        .execute(&mut *$tx)
                        .await?
                        .rows_affected()
                            == 1
                        {
                            uncount_redacted!($tx, target);
                        }
                        // A redacted event has no `m.relates_to`: it leaves its parent's relations.
                        unrelate!($tx, target);
                        unindex_for_search!($tx, target);
                    }
                    Redaction::Hold { target } if has_state && !d.soft_failed => {
                        sqlx::query(
                            "INSERT INTO pending_redactions (target_id, redaction_id, room_id) VALUES ($1, $2, $3)
                             ON CONFLICT DO NOTHING",
                        )
                        .bind(target)
                        .bind(e.event_id)
                        .bind(e.room_id)
                        .execute(&mut *$tx)
                        .await?;
                    }
                    Redaction::HeldBy { by, redacted_json } => {
                        sqlx::query(
                            "UPDATE events SET json = $2, redacted_by = $3 WHERE event_id = $1 AND redacted_by IS NULL",
                        )
                        .bind(e.event_id)
                        .bind(redacted_json)
                        .bind(by)
                        .execute(&mut *$tx)
                        .await?;
                        sqlx::query("DELETE FROM pending_redactions WHERE target_id = $1")
                            .bind(e.event_id)
                            .execute(&mut *$tx)
                            .await?;
                        unindex_for_search!($tx, e.event_id);
                    }
                    Redaction::Apply { .. } | Redaction::Hold { .. } => {}
                }
            }
            if pos.is_some() {
                insert_relation!($tx, batch, e);
            }
            // The kept unread counts, unless the event came redacted (a held redaction).
            if let Some(pos) = pos
                && !e.push.own.is_empty()
                && !e.redactions.iter().any(|r| matches!(r, Redaction::HeldBy { .. }))
            {
                let thread = super::relations::relation_of(e.json)
                    .and_then(|(parent, rel_type)| (rel_type == "m.thread").then_some(parent));
                count_push_actions!($tx, batch, e.room_id, pos, thread.as_deref(), &e.push.own);
            }
            // Members whose template changes with the event: after their counts took it in.
            if let Some(pos) = pos
                && !e.push.spans.is_empty()
            {
                flush_batch!($tx, batch);
                move_push_spans!($tx, e.room_id, pos, &e.push.spans);
            }
            // The room's current state at this position, where it is not the event's own.
            let current_after = match &d.current {
                CurrentChange::Unchanged => Some(d.current_before).filter(|g| *g != 0),
                CurrentChange::Delta { group: Some(_), .. } => current_group,
                CurrentChange::Append | CurrentChange::Delta { group: None, .. } => None,
            };
            if let (Some(p), Some(current), true) = (pos, current_after, has_state && !d.soft_failed)
                && Some(current) != after
            {
                flush_batch!($tx, batch);
                sqlx::query(
                    "INSERT INTO room_current_groups (room_id, stream_ordering, group_id) VALUES ($1, $2, $3)
                     ON CONFLICT DO NOTHING",
                )
                .bind(e.room_id)
                .bind(p)
                .bind(current)
                .execute(&mut *$tx)
                .await?;
            }
            flush_batch!($tx, batch);
            Some((StoredAt { position: pos, state_group: after, current_group }, replaces_state, related))
        } else {
            None
        }
    }};
}

/// Brings the room's live tail and kept unread counts (`live.rs`) up to the event just
/// committed: a plain event in the stream is appended and counted; an event that redacts,
/// comes redacted, leaves the stream's order or changes memberships drops what it may
/// have changed otherwise.
fn follow_in_live_tail(
    live: &super::live::LiveWriting<'_>,
    e: &NewEvent<'_>,
    at: StoredAt,
    replaces_state: Option<String>,
    related: bool,
) {
    let d = &e.dag;
    let live_pos = at.position.filter(|_| d.position == Position::Live);
    if !e.redactions.is_empty() || d.from_outlier || d.outlier {
        live.drop_tail(e.room_id);
        live.drop_unread(e.room_id, None);
        return;
    }
    // A membership that ends forgets its counts (`forget_unread!`): a membership other
    // than a join, or any change by state resolution. A join, a name or a topic keeps
    // them (a new member's row is made by the database when an event first counts).
    if e.membership.is_some_and(|m| m != "join") || matches!(d.current, CurrentChange::Delta { .. }) {
        live.drop_unread(e.room_id, None);
    }
    match live_pos {
        Some(pos) => {
            let parent = super::relations::relation_of(e.json).map(|(parent, _)| parent);
            live.append(
                StoredEvent {
                    stream_ordering: pos,
                    position: Some(pos),
                    event_id: e.event_id.to_owned(),
                    room_id: e.room_id.to_owned(),
                    sender: e.sender.to_owned(),
                    event_type: e.event_type.to_owned(),
                    state_key: e.state_key.map(str::to_owned),
                    depth: e.depth,
                    origin_server_ts: e.origin_server_ts,
                    state_group: at.state_group.unwrap_or(0),
                    json: e.json.to_owned(),
                    redacted_by: None,
                    txn_device_id: e.txn.map(|t| t.device_id.to_owned()),
                    txn_id: e.txn.map(|t| t.txn_id.to_owned()),
                    replaces_state,
                    rejected_reason: d.rejected_reason.map(str::to_owned),
                    related,
                },
                parent.as_deref(),
            );
            if !e.push.own.is_empty() {
                let mut users: Vec<(&str, (i64, i64))> =
                    e.push.own.iter().map(|a| (a.user_id.as_str(), a.delta())).collect();
                // As `count_push_actions!`: once per user.
                users.sort_unstable();
                users.dedup_by(|a, b| a.0 == b.0);
                live.count(e.room_id, pos, &users);
            }
            if !e.push.groups.is_empty() {
                let groups: Vec<(i64, bool)> = e.push.groups.iter().map(|g| (g.template, g.highlight)).collect();
                live.count_groups(e.room_id, &groups);
            }
            // Their rows were rebased by the database.
            for span in &e.push.spans {
                live.drop_unread(e.room_id, Some(&span.user_id));
            }
        }
        // Outside the live stream (backfilled history): nothing a tail holds, but the
        // counts may have moved.
        None => live.drop_unread(e.room_id, None),
    }
}

/// What storing `events` changes for `/sync` (`changes.rs`): their rooms, and device
/// lists when a room turns encrypted (its members become new to track).
fn event_changes(events: &[NewEvent<'_>]) -> Vec<Change> {
    let mut changes: Vec<Change> = Vec::new();
    for e in events {
        if !changes.iter().any(|c| c.kind == Kind::Room && c.key == e.room_id) {
            changes.push(Change::new(Kind::Room, e.room_id));
        }
        if e.event_type == "m.room.encryption" {
            changes.push(Change::new(Kind::DeviceLists, ""));
        }
        let members_change = e.membership.is_some() || matches!(e.dag.current, CurrentChange::Delta { .. });
        if members_change && !changes.iter().any(|c| c.kind == Kind::RoomMembers && c.key == e.room_id) {
            changes.push(Change::new(Kind::RoomMembers, e.room_id));
        }
    }
    changes
}

impl Store {
    /// Stores an event where `e.dag` says. Storing the same event again, or another event
    /// with a transaction id the device already used on the same endpoint, changes
    /// nothing.
    pub async fn persist_event(&self, e: NewEvent<'_>) -> Result<Persisted> {
        // Memberships, the current state and what decides visibility change only with
        // state events, by state resolution, or (their JSON) by redactions (read caches);
        // a message appended changes none.
        let _writing =
            (e.state_key.is_some() || matches!(e.dag.current, CurrentChange::Delta { .. }) || !e.redactions.is_empty())
                .then(|| self.state_writing());
        // Before the position: the room's live tail follows the write (`live.rs`).
        let live_writing = self.live.begin([e.room_id]);
        let positions: Option<Positions> = if e.dag.position == Position::Live {
            Some(self.take_positions_for(1, &event_changes(std::slice::from_ref(&e))).await?)
        } else {
            None
        };
        let live = positions.as_ref().map(Positions::first);
        // At most three state groups (before, after, the current state) and one
        // backfill position, reserved outside the transaction (PostgreSQL).
        self.reserve_counters(3, i64::from(e.dag.position == Position::Backfill)).await?;
        let stored = on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            match insert_event!(tx, &self.counters, &e, live) {
                Some((at, replaces_state, related)) => {
                    stream::commit(tx, positions).await?;
                    Some((at, replaces_state, related))
                }
                None => None,
            }
        });
        let Some((at, replaces_state, related)) = stored else {
            live_writing.settle();
            // Nothing was written: say which of the two unique keys was taken.
            return Ok(match self.get_event(e.event_id).await? {
                Some(existing) => Persisted::Duplicate(existing.stream_ordering),
                None => Persisted::TxnTaken,
            });
        };
        follow_in_live_tail(&live_writing, &e, at, replaces_state, related);
        live_writing.settle();
        Ok(Persisted::Stored(at))
    }

    /// Stores a batch of events without state (a join's state and auth chain), with
    /// their edges, in one transaction per 5,000 events (inserts of 2,000 rows): no stream
    /// positions, no state groups, no extremities. Events already stored are left as
    /// they are. Returns how many were new.
    pub async fn persist_outliers(&self, events: &[Outlier<'_>]) -> Result<u64> {
        let mut added = 0;
        for batch in events.chunks(OUTLIERS_PER_TX) {
            added += on_pool!(self, write, |pool| {
                let mut tx = pool.begin().await?;
                let mut n = 0;
                for chunk in batch.chunks(BATCH_ROWS) {
                    let mut query = sqlx::QueryBuilder::new(
                        "INSERT INTO events (event_id, room_id, sender, event_type, state_key, depth, origin_server_ts,
                             json, rejected_reason, outlier, soft_failed) ",
                    );
                    query.push_values(chunk, |mut row, o| {
                        row.push_bind(o.event_id)
                            .push_bind(o.room_id)
                            .push_bind(o.sender)
                            .push_bind(o.event_type)
                            .push_bind(o.state_key)
                            .push_bind(o.depth)
                            .push_bind(o.origin_server_ts)
                            .push_bind(o.json)
                            .push_bind(o.rejected_reason)
                            .push("TRUE")
                            .push("FALSE");
                    });
                    query.push(" ON CONFLICT DO NOTHING");
                    n += query.build().execute(&mut *tx).await?.rows_affected();
                }
                let rows: Vec<(&str, &str, &[String], &[String])> =
                    batch.iter().map(|o| (o.event_id, o.room_id, o.prev_events, o.auth_events)).collect();
                let mut edges = Batch::of(&tx);
                insert_edges!(tx, edges, &rows);
                flush_batch!(tx, edges);
                tx.commit().await?;
                n
            });
        }
        Ok(added)
    }

    /// Records a room this server joins from elsewhere (no events yet); nothing changes
    /// if it is known.
    pub async fn insert_room_if_missing(&self, room_id: &str, version: &str, creator: &str) -> Result<()> {
        on_pool!(self, write, |pool| {
            sqlx::query(
                "INSERT INTO rooms (room_id, room_version, creator, created_ts, published) VALUES ($1, $2, $3, $4, FALSE)
                 ON CONFLICT DO NOTHING",
            )
            .bind(room_id)
            .bind(version)
            .bind(creator)
            .bind(crate::service::now_ms())
            .execute(pool)
            .await?;
            Ok(())
        })
    }

    /// Writes a room state (a join event's state before, from a `send_join` answer) as
    /// a new snapshot state group; returns its id.
    pub async fn insert_state_group(&self, room_id: &str, entries: &[StateEntry]) -> Result<i64> {
        self.reserve_counters(1, 0).await?;
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            let group = insert_snapshot_group!(tx, &self.counters, room_id, entries);
            tx.commit().await?;
            Ok(group)
        })
    }

    /// Creates a room with its first events (the create event first, each on top of the
    /// one before; their `dag` is ignored), all in one transaction: a room is stored
    /// whole or not at all.
    pub async fn create_room(&self, room: NewRoom<'_>, events: &[NewEvent<'_>]) -> Result<RoomCreated> {
        let _writing = self.state_writing();
        // Nothing of a new room is kept: a read from before it was made is dropped.
        let live = self.live.begin([room.room_id]);
        live.drop_tail(room.room_id);
        live.drop_unread(room.room_id, None);
        let positions = self.take_positions_for(events.len() as i64, &event_changes(events)).await?;
        self.reserve_counters(events.len() as i64, 0).await?;
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            let inserted = sqlx::query(
                "INSERT INTO rooms (room_id, room_version, creator, created_ts, published) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT DO NOTHING",
            )
            .bind(room.room_id)
            .bind(room.version)
            .bind(room.creator)
            .bind(room.created_ts)
            .bind(room.published)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if inserted == 0 {
                return Ok(RoomCreated::RoomIdTaken);
            }
            if let Some(alias) = room.alias {
                let inserted = sqlx::query(
                    "INSERT INTO room_aliases (alias, room_id, creator) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                )
                .bind(alias)
                .bind(room.room_id)
                .bind(room.creator)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if inserted == 0 {
                    return Err(Error::room_in_use(format!("The alias {alias} is taken")));
                }
            }
            let mut group = None;
            let mut stored_at = Vec::with_capacity(events.len());
            for (i, e) in events.iter().enumerate() {
                let e = NewEvent {
                    dag: Dag { state_before: group.map_or(StateBefore::None, StateBefore::Group), ..Dag::default() },
                    ..*e
                };
                let Some((at, _, _)) = insert_event!(tx, &self.counters, &e, Some(positions.nth(i)?)) else {
                    return Err(Error::internal(format!("event {} of a new room is already stored", e.event_id)));
                };
                stored_at.push(at.position.unwrap_or(0));
                group = at.state_group;
            }
            stream::commit(tx, Some(positions)).await?;
            Ok(RoomCreated::Stored(stored_at, group.ok_or_else(|| Error::internal("a new room without state"))?))
        })
    }
}

impl Store {
    /// Fills `event_edges` and `event_auth` from the JSON of events stored before
    /// migration 0011, once (recorded as `dag_edges` in `server_info`). SQL cannot read
    /// JSON arrays with one text on both backends, so it is done here, at start, in
    /// pages of 1,000 events, in one transaction.
    pub(crate) async fn fill_dag_edges(&self) -> Result<()> {
        #[derive(serde::Deserialize)]
        struct Edges {
            #[serde(default)]
            prev_events: Vec<String>,
            #[serde(default)]
            auth_events: Vec<String>,
        }
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            let done: Option<(String,)> = sqlx::query_as("SELECT value FROM server_info WHERE key = 'dag_edges'")
                .fetch_optional(&mut *tx)
                .await?;
            if done.is_some() {
                return Ok(());
            }
            let mut after = String::new();
            loop {
                let page: Vec<(String, String, String)> = sqlx::query_as(
                    "SELECT event_id, room_id, json FROM events WHERE event_id > $1 ORDER BY event_id LIMIT 1000",
                )
                .bind(&after)
                .fetch_all(&mut *tx)
                .await?;
                let Some(last) = page.last() else { break };
                after = last.0.clone();
                let parsed: Vec<(&str, &str, Edges)> = page
                    .iter()
                    .map(|(id, room, json)| {
                        let edges = serde_json::from_str(json)
                            .map_err(|e| Error::internal(format!("bad stored PDU {id}: {e}")))?;
                        Ok((id.as_str(), room.as_str(), edges))
                    })
                    .collect::<Result<_>>()?;
                let rows: Vec<(&str, &str, &[String], &[String])> = parsed
                    .iter()
                    .map(|(id, room, e)| (*id, *room, e.prev_events.as_slice(), e.auth_events.as_slice()))
                    .collect();
                let mut edges = Batch::of(&tx);
                insert_edges!(tx, edges, &rows);
                flush_batch!(tx, edges);
            }
            sqlx::query("INSERT INTO server_info (key, value) VALUES ('dag_edges', 'filled')")
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        })
    }
}
