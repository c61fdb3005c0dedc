//! Reading rooms, events, state groups and current state. Events are written only by
//! `persist.rs`.

use std::sync::Arc;

use super::{Store, on_pool};
use crate::error::Result;

/// An event as stored.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct StoredEvent {
    /// The stream position; 0 for an event outside the stream (see `position`).
    pub stream_ordering: i64,
    /// The stream position, `None` for events clients never see: outliers, rejected and
    /// soft-failed events. Negative for backfilled history.
    pub position: Option<i64>,
    pub event_id: String,
    pub room_id: String,
    pub sender: String,
    pub event_type: String,
    pub state_key: Option<String>,
    pub depth: i64,
    pub origin_server_ts: i64,
    /// The state after the event; 0 for outliers and rejected events (no such group).
    pub state_group: i64,
    pub json: String,
    pub redacted_by: Option<String>,
    pub txn_device_id: Option<String>,
    pub txn_id: Option<String>,
    /// For a state event: the state event it replaced (`unsigned.replaces_state`).
    pub replaces_state: Option<String>,
    /// Why it failed the auth rules (`None`: accepted).
    pub rejected_reason: Option<String>,
    /// Whether an event relates to it (migration 0027): false means no bundled
    /// aggregations, without asking.
    pub related: bool,
}

macro_rules! select_events {
    ($tail:literal) => {
        concat!(
            "SELECT COALESCE(stream_ordering, 0) AS stream_ordering, stream_ordering AS position, event_id, room_id, \
             sender, event_type, state_key, depth, origin_server_ts, COALESCE(state_group, 0) AS state_group, json, \
             redacted_by, txn_device_id, txn_id, replaces_state, rejected_reason, related FROM events ",
            $tail
        )
    };
}
pub(crate) use select_events;

/// The columns of `StoredEvent`, from `events e`.
macro_rules! event_columns {
    () => {
        "COALESCE(e.stream_ordering, 0) AS stream_ordering, e.stream_ordering AS position, e.event_id, e.room_id, \
         e.sender, e.event_type, e.state_key, e.depth, e.origin_server_ts, COALESCE(e.state_group, 0) AS state_group, \
         e.json, e.redacted_by, e.txn_device_id, e.txn_id, e.replaces_state, e.rejected_reason, e.related"
    };
}

/// The next value of one of the `dag_counters` (`state_group` counts up, `backfill`
/// down), under the row's lock.
macro_rules! next_counter {
    ($tx:expr, $name:literal, $step:literal) => {{
        let (value,): (i64,) = sqlx::query_as(concat!(
            "UPDATE dag_counters SET value = value + (",
            $step,
            ") WHERE name = '",
            $name,
            "' RETURNING value"
        ))
        .fetch_one(&mut *$tx)
        .await?;
        value
    }};
}
pub(crate) use next_counter;

/// Ids taken from the `state_group` and `backfill` counters at a time, on PostgreSQL.
const COUNTER_BLOCK: i64 = 64;

/// `dag_counters` values reserved ahead, in blocks, on PostgreSQL: a transaction that
/// took its state group id or backfill position with `next_counter!` held the
/// counter's row lock until it committed, so persisting any state event (or backfilled
/// event) waited for every other one in flight, in any room. The lock orders nothing
/// that needs it: state group ids need only be unique, and backfill positions need
/// only decrease within a room, whose events are persisted one at a time (the room's
/// lock); a block is handed out in order, and the next block lies beyond it. Blocks
/// are reserved in a statement of their own, before the transaction (`reserve`); a
/// transaction that finds its block empty (others took it meanwhile) falls back to
/// `next_counter!`. Ids left in a block at shutdown are never used (gaps are fine).
/// SQLite, one writer, reserves nothing.
#[derive(Default)]
pub(crate) struct CounterBlocks {
    /// (next value, values left) of `state_group` (counting up) and `backfill` (down).
    state_group: std::sync::Mutex<(i64, i64)>,
    backfill: std::sync::Mutex<(i64, i64)>,
}

impl CounterBlocks {
    fn block(&self, name: &str) -> &std::sync::Mutex<(i64, i64)> {
        if name == "backfill" { &self.backfill } else { &self.state_group }
    }

    /// The next reserved value of counter `name`, if one is left.
    pub(crate) fn take(&self, name: &str) -> Option<i64> {
        let mut block = self.block(name).lock().unwrap_or_else(|e| e.into_inner());
        if block.1 == 0 {
            return None;
        }
        let value = block.0;
        block.0 += if name == "backfill" { -1 } else { 1 };
        block.1 -= 1;
        Some(value)
    }

    fn left(&self, name: &str) -> i64 {
        self.block(name).lock().unwrap_or_else(|e| e.into_inner()).1
    }
}

/// The next value of counter `$name` (`"state_group"` or `"backfill"`): from the
/// store's reserved block (`$blocks`, a `&CounterBlocks`) when it has one, else under
/// the row's lock in the transaction (`next_counter!`).
macro_rules! take_counter {
    ($tx:expr, $blocks:expr, "state_group") => {{
        match $blocks.take("state_group") {
            Some(value) => value,
            None => $crate::storage::events::next_counter!($tx, "state_group", "1"),
        }
    }};
    ($tx:expr, $blocks:expr, "backfill") => {{
        match $blocks.take("backfill") {
            Some(value) => value,
            None => $crate::storage::events::next_counter!($tx, "backfill", "-1"),
        }
    }};
}
pub(crate) use take_counter;

impl Store {
    /// On PostgreSQL, makes sure the reserved blocks hold at least `state_groups` state
    /// group ids and `backfill` backfill positions, reserving a new block (one
    /// statement, its own transaction) for a counter that has fewer. Call before the
    /// transaction that takes them.
    pub(crate) async fn reserve_counters(&self, state_groups: i64, backfill: i64) -> Result<()> {
        if self.dialect() != super::Dialect::Postgres {
            return Ok(());
        }
        for (name, needed) in [("state_group", state_groups), ("backfill", backfill)] {
            if needed == 0 || self.counters.left(name) >= needed {
                continue;
            }
            let size = needed.max(COUNTER_BLOCK);
            let step = if name == "backfill" { -size } else { size };
            let (last,): (i64,) = on_pool!(self, write, |pool| {
                sqlx::query_as("UPDATE dag_counters SET value = value + $1 WHERE name = $2 RETURNING value")
                    .bind(step)
                    .bind(name)
                    .fetch_one(pool)
                    .await?
            });
            // The block is the values up to `last`, counted from the first.
            let first = last - step + if name == "backfill" { -1 } else { 1 };
            *self.counters.block(name).lock().unwrap_or_else(|e| e.into_inner()) = (first, size);
        }
        Ok(())
    }
}

impl Store {
    pub async fn get_room_version(&self, room_id: &str) -> Result<Option<String>> {
        on_pool!(self, read, |pool| {
            let row: Option<(String,)> = sqlx::query_as("SELECT room_version FROM rooms WHERE room_id = $1")
                .bind(room_id)
                .fetch_optional(pool)
                .await?;
            Ok(row.map(|r| r.0))
        })
    }

    /// The room's forward extremities with their depths and state groups (the state
    /// after each); empty for an unknown room.
    pub async fn get_room_head(&self, room_id: &str) -> Result<Vec<(String, i64, i64)>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as(
                "SELECT f.event_id, e.depth, COALESCE(e.state_group, 0) FROM forward_extremities f
                 JOIN events e ON e.event_id = f.event_id WHERE f.room_id = $1",
            )
            .bind(room_id)
            .fetch_all(pool)
            .await?)
        })
    }

    /// The room's backward extremities: prev events named by stored events but not
    /// stored themselves.
    pub async fn get_backward_extremities(&self, room_id: &str) -> Result<Vec<String>> {
        on_pool!(self, read, |pool| {
            let rows: Vec<(String,)> =
                sqlx::query_as("SELECT event_id FROM backward_extremities WHERE room_id = $1 ORDER BY event_id")
                    .bind(room_id)
                    .fetch_all(pool)
                    .await?;
            Ok(rows.into_iter().map(|r| r.0).collect())
        })
    }

    /// How an event was stored: (outlier, rejected reason, soft-failed).
    pub async fn get_event_status(&self, event_id: &str) -> Result<Option<(bool, Option<String>, bool)>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as("SELECT outlier, rejected_reason, soft_failed FROM events WHERE event_id = $1")
                .bind(event_id)
                .fetch_optional(pool)
                .await?)
        })
    }

    /// The auth chain of a set of events (every event reachable through `auth_events`,
    /// the starting events left out unless reached), walked down `event_auth` by one
    /// recursive query. An auth chain holds the room's create, power levels, join rules
    /// and the member events of the senders along it: in rooms of many members it can
    /// reach tens of thousands of events, so the walk stops at `limit` ids (the caller
    /// treats a full answer as an error rather than resolve state from half a chain).
    pub async fn get_auth_chain(&self, event_ids: &[String], limit: i64) -> Result<Vec<String>> {
        if event_ids.is_empty() {
            return Ok(Vec::new());
        }
        on_pool!(self, read, |pool| {
            let mut query = sqlx::QueryBuilder::new(
                "WITH RECURSIVE chain(event_id) AS (SELECT auth_event_id FROM event_auth WHERE event_id IN (",
            );
            let mut list = query.separated(", ");
            for id in event_ids {
                list.push_bind(id);
            }
            query.push(
                ") UNION SELECT a.auth_event_id FROM event_auth a JOIN chain c ON a.event_id = c.event_id)
                 SELECT event_id FROM chain LIMIT ",
            );
            query.push_bind(limit);
            let rows: Vec<(String,)> = query.build_query_as().fetch_all(pool).await?;
            Ok(rows.into_iter().map(|r| r.0).collect())
        })
    }

    /// Whether a stored event that is part of the room (not an outlier, accepted, not
    /// soft-failed) names `event_id` as a prev event: a child that arrived first.
    pub async fn has_stored_children(&self, event_id: &str) -> Result<bool> {
        on_pool!(self, read, |pool| {
            let row: Option<(String,)> = sqlx::query_as(
                "SELECT c.event_id FROM event_edges c JOIN events e ON e.event_id = c.event_id
                 WHERE c.prev_event_id = $1 AND NOT e.outlier AND e.rejected_reason IS NULL AND NOT e.soft_failed
                 LIMIT 1",
            )
            .bind(event_id)
            .fetch_optional(pool)
            .await?;
            Ok(row.is_some())
        })
    }

    /// The state groups (state after) of these events, for those that have one.
    pub async fn get_state_groups_of(&self, event_ids: &[String]) -> Result<Vec<(String, i64)>> {
        let mut found = Vec::new();
        for chunk in event_ids.chunks(500) {
            let rows: Vec<(String, i64)> = on_pool!(self, read, |pool| {
                let mut query = sqlx::QueryBuilder::new(
                    "SELECT event_id, state_group FROM events WHERE state_group IS NOT NULL AND event_id IN (",
                );
                let mut list = query.separated(", ");
                for id in chunk {
                    list.push_bind(id);
                }
                query.push(")");
                query.build_query_as().fetch_all(pool).await?
            });
            found.extend(rows);
        }
        Ok(found)
    }

    /// Which of these events are stored (as anything, outliers included).
    pub async fn stored_event_ids(&self, event_ids: &[String]) -> Result<Vec<String>> {
        let mut found = Vec::new();
        for chunk in event_ids.chunks(500) {
            let rows: Vec<(String,)> = on_pool!(self, read, |pool| {
                let mut query = sqlx::QueryBuilder::new("SELECT event_id FROM events WHERE event_id IN (");
                let mut list = query.separated(", ");
                for id in chunk {
                    list.push_bind(id);
                }
                query.push(")");
                query.build_query_as().fetch_all(pool).await?
            });
            found.extend(rows.into_iter().map(|r| r.0));
        }
        Ok(found)
    }

    pub async fn get_event(&self, event_id: &str) -> Result<Option<StoredEvent>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as(select_events!("WHERE event_id = $1")).bind(event_id).fetch_optional(pool).await?)
        })
    }

    /// The current state events of a room whose type is one of `types` (all if empty).
    pub async fn get_current_state_events(&self, room_id: &str, types: &[&str]) -> Result<Vec<StoredEvent>> {
        on_pool!(self, read, |pool| {
            let rows: Vec<StoredEvent> = sqlx::query_as(concat!(
                "SELECT ",
                event_columns!(),
                " FROM current_state c JOIN events e ON e.event_id = c.event_id WHERE c.room_id = $1"
            ))
            .bind(room_id)
            .fetch_all(pool)
            .await?;
            Ok(rows.into_iter().filter(|e| types.is_empty() || types.contains(&e.event_type.as_str())).collect())
        })
    }

    /// Current state events of the given (type, state key) pairs, in one query, or none
    /// when the current state cache (`ReadCaches::current_state`) has them all.
    pub async fn get_current_state_entries(
        &self,
        room_id: &str,
        keys: &[(String, String)],
    ) -> Result<Vec<StoredEvent>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let cache = &self.caches.current_state;
        let key = |(t, k): &(String, String)| (room_id.to_owned(), t.clone(), k.clone());
        let cached: Option<Vec<Option<Arc<StoredEvent>>>> = keys.iter().map(|k| cache.get(&key(k))).collect();
        if let Some(cached) = cached {
            return Ok(cached.into_iter().flatten().map(|e| StoredEvent::clone(&e)).collect());
        }
        let epoch = cache.epoch();
        let rows: Vec<StoredEvent> = on_pool!(self, read, |pool| {
            let mut query = sqlx::QueryBuilder::new(concat!(
                "SELECT ",
                event_columns!(),
                " FROM current_state c JOIN events e ON e.event_id = c.event_id WHERE ("
            ));
            for (i, (event_type, state_key)) in keys.iter().enumerate() {
                if i > 0 {
                    query.push(" OR ");
                }
                // The room in each term: SQLite, without statistics, would otherwise
                // read the whole room's state by its first key column and test each
                // row (1.5 ms in a room of 10,000 members), where this is one index
                // search per pair.
                query.push("(c.room_id = ");
                query.push_bind(room_id);
                query.push(" AND c.event_type = ");
                query.push_bind(event_type);
                query.push(" AND c.state_key = ");
                query.push_bind(state_key);
                query.push(")");
            }
            query.push(")");
            query.build_query_as().fetch_all(pool).await?
        });
        for k in keys {
            let found = rows.iter().find(|e| e.event_type == k.0 && e.state_key.as_deref() == Some(k.1.as_str()));
            cache.keep(key(k), found.map(|e| Arc::new(e.clone())), epoch);
        }
        Ok(rows)
    }

    /// The current state event of (type, state key), through the current state cache.
    pub async fn get_current_state_event(
        &self,
        room_id: &str,
        event_type: &str,
        state_key: &str,
    ) -> Result<Option<StoredEvent>> {
        let key = (room_id.to_owned(), event_type.to_owned(), state_key.to_owned());
        let row = self.caches.current_state.get_or_read(key, || async {
            let row: Option<StoredEvent> = on_pool!(self, read, |pool| {
                sqlx::query_as(concat!(
                    "SELECT ",
                    event_columns!(),
                    " FROM current_state c JOIN events e ON e.event_id = c.event_id
                 WHERE c.room_id = $1 AND c.event_type = $2 AND c.state_key = $3"
                ))
                .bind(room_id)
                .bind(event_type)
                .bind(state_key)
                .fetch_optional(pool)
                .await?
            });
            Ok::<_, crate::error::Error>(row.map(Arc::new))
        });
        Ok(row.await?.map(|e| StoredEvent::clone(&e)))
    }

    /// The state of a group as (type, state key, event id), optionally of one type
    /// (and state key) only.
    pub async fn get_state_group(
        &self,
        group: i64,
        event_type: Option<&str>,
        state_key: Option<&str>,
    ) -> Result<Vec<(String, String, String)>> {
        let rows: Vec<(String, String, String, i64)> = on_pool!(self, read, |pool| {
            sqlx::query_as(
                "WITH RECURSIVE chain(group_id, prev_group, snap, n) AS (
                     SELECT group_id, prev_group, is_snapshot, CAST(0 AS BIGINT) FROM state_groups WHERE group_id = $1
                     UNION ALL
                     SELECT g.group_id, g.prev_group, g.is_snapshot, c.n + 1
                     FROM state_groups g JOIN chain c ON g.group_id = c.prev_group WHERE NOT c.snap
                 )
                 SELECT s.event_type, s.state_key, s.event_id, c.n FROM state_group_entries s
                 JOIN chain c ON s.group_id = c.group_id
                 WHERE ($2 IS NULL OR s.event_type = $2) AND ($3 IS NULL OR s.state_key = $3)
                 ORDER BY c.n",
            )
            .bind(group)
            .bind(event_type)
            .bind(state_key)
            .fetch_all(pool)
            .await?
        });
        Ok(newest_entries(rows))
    }

    /// The entries of a group's state that a lazy-loading client is sent: everything
    /// but member events, and the member events of `members`, as (type, state key, event
    /// id). The group's other members are filtered out in the database: a room of
    /// 10,000 members does not send 10,000 rows across.
    pub async fn get_state_group_lazy(&self, group: i64, members: &[&str]) -> Result<Vec<(String, String, String)>> {
        let rows: Vec<(String, String, String, i64)> = on_pool!(self, read, |pool| {
            // Three searches of the entries' key, each of its own range: the types
            // before and after `m.room.member`, and the members asked for. One `<>`
            // or `OR` over the group would read every member entry of the snapshot.
            // `CROSS JOIN`: SQLite (3.51) would otherwise read the members asked for
            // from every group of every room, and look each up in the chain.
            const ENTRIES: &str = " SELECT s.event_type, s.state_key, s.event_id, c.n FROM chain c
                 CROSS JOIN state_group_entries s WHERE s.group_id = c.group_id AND s.event_type ";
            let mut query = state_chain(group);
            query.push(ENTRIES);
            query.push("< 'm.room.member' UNION ALL");
            query.push(ENTRIES);
            query.push("> 'm.room.member'");
            if !members.is_empty() {
                query.push(" UNION ALL");
                query.push(ENTRIES);
                query.push("= 'm.room.member' AND s.state_key IN (");
                let mut list = query.separated(", ");
                for member in members {
                    list.push_bind(*member);
                }
                query.push(")");
            }
            query.push(" ORDER BY n");
            query.build_query_as().fetch_all(pool).await?
        });
        Ok(newest_entries(rows))
    }

    /// The entries of a group's state with these (type, state key) pairs, as (type,
    /// state key, event id), in one query.
    pub async fn get_state_group_entries(
        &self,
        group: i64,
        keys: &[(String, String)],
    ) -> Result<Vec<(String, String, String)>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(String, String, String, i64)> = on_pool!(self, read, |pool| {
            let mut query = state_chain(group);
            query.push(
                " SELECT s.event_type, s.state_key, s.event_id, c.n FROM state_group_entries s
                 JOIN chain c ON s.group_id = c.group_id WHERE (",
            );
            for (i, (event_type, state_key)) in keys.iter().enumerate() {
                if i > 0 {
                    query.push(" OR ");
                }
                query.push("(s.event_type = ");
                query.push_bind(event_type);
                query.push(" AND s.state_key = ");
                query.push_bind(state_key);
                query.push(")");
            }
            query.push(") ORDER BY c.n");
            query.build_query_as().fetch_all(pool).await?
        });
        Ok(newest_entries(rows))
    }

    /// The parent of a state group (the state before a state event).
    pub async fn get_prev_state_group(&self, group: i64) -> Result<Option<i64>> {
        on_pool!(self, read, |pool| {
            let row: Option<(Option<i64>,)> = sqlx::query_as("SELECT prev_group FROM state_groups WHERE group_id = $1")
                .bind(group)
                .fetch_optional(pool)
                .await?;
            Ok(row.and_then(|r| r.0))
        })
    }

    /// Events by id, in the order asked (unknown ids are skipped); one query per 500.
    pub async fn get_events_by_ids(&self, ids: &[String]) -> Result<Vec<StoredEvent>> {
        let mut found: std::collections::HashMap<String, StoredEvent> =
            std::collections::HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let rows: Vec<StoredEvent> = on_pool!(self, read, |pool| {
                let mut query = sqlx::QueryBuilder::new(select_events!("WHERE event_id IN ("));
                let mut list = query.separated(", ");
                for id in chunk {
                    list.push_bind(id);
                }
                query.push(")");
                query.build_query_as().fetch_all(pool).await?
            });
            found.extend(rows.into_iter().map(|e| (e.event_id.clone(), e)));
        }
        Ok(ids.iter().filter_map(|id| found.remove(id)).collect())
    }

    /// The event a device sent with a transaction id on an endpoint (`scope`), if any.
    pub async fn find_txn_event(
        &self,
        sender: &str,
        device_id: &str,
        scope: &str,
        txn_id: &str,
    ) -> Result<Option<String>> {
        on_pool!(self, read, |pool| {
            let row: Option<(String,)> = sqlx::query_as(
                "SELECT event_id FROM events
                 WHERE sender = $1 AND txn_device_id = $2 AND txn_scope = $3 AND txn_id = $4",
            )
            .bind(sender)
            .bind(device_id)
            .bind(scope)
            .bind(txn_id)
            .fetch_optional(pool)
            .await?;
            Ok(row.map(|r| r.0))
        })
    }

    /// Events of a room with `after < stream_ordering <= until`, newest first when
    /// `backwards`, at most `limit`.
    pub async fn get_room_events(
        &self,
        room_id: &str,
        after: i64,
        until: i64,
        limit: i64,
        backwards: bool,
    ) -> Result<Vec<StoredEvent>> {
        on_pool!(self, read, |pool| {
            let sql = if backwards {
                select_events!(
                    "WHERE room_id = $1 AND stream_ordering > $2 AND stream_ordering <= $3 ORDER BY stream_ordering DESC LIMIT $4"
                )
            } else {
                select_events!(
                    "WHERE room_id = $1 AND stream_ordering > $2 AND stream_ordering <= $3 ORDER BY stream_ordering ASC LIMIT $4"
                )
            };
            Ok(sqlx::query_as(sql).bind(room_id).bind(after).bind(until).bind(limit).fetch_all(pool).await?)
        })
    }

    /// `get_room_events` backwards, from the room's live tail when it holds the range
    /// (`live.rs`): a `/sync` woken by a message reads nothing. A miss reads the room's
    /// newest events into the tail first, when no write of the room is in flight.
    pub async fn get_recent_room_events(
        &self,
        room_id: &str,
        after: i64,
        until: i64,
        limit: i64,
    ) -> Result<Vec<StoredEvent>> {
        let wanted = usize::try_from(limit).unwrap_or(0);
        if let Some(events) = self.live.tail_events(room_id, after, until, wanted) {
            return Ok(events);
        }
        if after >= 0 && wanted <= super::live::TAIL_LEN && self.live.may_keep(room_id) {
            let noted = self.live.note();
            let newest = self.get_room_events(room_id, 0, i64::MAX, super::live::TAIL_LEN as i64, true).await?;
            let answer: Vec<StoredEvent> = newest
                .iter()
                .filter(|e| e.stream_ordering > after && e.stream_ordering <= until)
                .take(wanted)
                .cloned()
                .collect();
            // The newest events answer when they reach down to `after` or fill the page
            // (events past `until` are skipped above them).
            let reaches = newest.len() < super::live::TAIL_LEN
                || newest.last().is_some_and(|e| e.stream_ordering <= after)
                || answer.len() == wanted;
            self.live.keep_tail(room_id, newest, noted);
            if reaches {
                return Ok(answer);
            }
        }
        self.get_room_events(room_id, after, until, limit, true).await
    }

    /// Events of a room in topological order (depth, then stream position), from `from`
    /// (included when going backwards, excluded going forwards) towards `to` (excluded
    /// backwards, included forwards), only those whose stream position lies in one of
    /// `ranges` (`(after, up_to]`; all if empty), at most `limit`.
    #[allow(clippy::too_many_arguments)]
    pub async fn get_room_events_topological(
        &self,
        room_id: &str,
        from: (i64, i64),
        to: Option<(i64, i64)>,
        ranges: &[(i64, i64)],
        limit: i64,
        backwards: bool,
    ) -> Result<Vec<StoredEvent>> {
        on_pool!(self, read, |pool| {
            let mut query = sqlx::QueryBuilder::new(select_events!("WHERE room_id = "));
            query.push_bind(room_id);
            // Row values, so that both databases bound their scan of the topological
            // index by the position (an OR of depth and stream conditions makes
            // PostgreSQL filter the index from the room's end).
            query.push(" AND stream_ordering IS NOT NULL AND (depth, stream_ordering) ");
            query.push(if backwards { "<= (" } else { "> (" });
            query.push_bind(from.0);
            query.push(", ");
            query.push_bind(from.1);
            query.push(")");
            if let Some(to) = to {
                query.push(" AND (depth, stream_ordering) ");
                query.push(if backwards { "> (" } else { "<= (" });
                query.push_bind(to.0);
                query.push(", ");
                query.push_bind(to.1);
                query.push(")");
            }
            if !ranges.is_empty() {
                // `+`: the ranges filter; were they an index bound, SQLite would read the
                // room's events by stream position and sort them all by depth.
                query.push(" AND (");
                for (i, (after, up_to)) in ranges.iter().enumerate() {
                    if i > 0 {
                        query.push(" OR ");
                    }
                    query.push("(+stream_ordering > ");
                    query.push_bind(*after);
                    query.push(" AND +stream_ordering <= ");
                    query.push_bind(*up_to);
                    query.push(")");
                }
                query.push(")");
            }
            query.push(if backwards {
                " ORDER BY depth DESC, stream_ordering DESC LIMIT "
            } else {
                " ORDER BY depth ASC, stream_ordering ASC LIMIT "
            });
            query.push_bind(limit);
            Ok(query.build_query_as().fetch_all(pool).await?)
        })
    }

    /// The topological position (depth, stream position) of a room's latest event at or
    /// before stream position `pos`, to turn a stream token into a topological one.
    pub async fn get_topological_position(&self, room_id: &str, pos: i64) -> Result<Option<(i64, i64)>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as(
                "SELECT depth, stream_ordering FROM events
                 WHERE room_id = $1 AND stream_ordering IS NOT NULL AND stream_ordering <= $2
                 ORDER BY stream_ordering DESC LIMIT 1",
            )
            .bind(room_id)
            .bind(pos)
            .fetch_optional(pool)
            .await?)
        })
    }

    /// The room's current state group at stream position `at`: after the room's last
    /// event up to `at`, its `room_current_groups` entry, else its own (0: none).
    pub async fn get_room_state_group_at(&self, room_id: &str, at: i64) -> Result<i64> {
        on_pool!(self, read, |pool| {
            let row: Option<(i64,)> = sqlx::query_as(
                "SELECT COALESCE(c.group_id, e.state_group, 0) FROM events e
                 LEFT JOIN room_current_groups c ON c.room_id = e.room_id AND c.stream_ordering = e.stream_ordering
                 WHERE e.room_id = $1 AND e.stream_ordering > 0 AND e.stream_ordering <= $2
                 ORDER BY e.stream_ordering DESC LIMIT 1",
            )
            .bind(room_id)
            .bind(at)
            .fetch_optional(pool)
            .await?;
            Ok(row.map_or(0, |r| r.0))
        })
    }

    /// A user's latest member event in a room at stream position `until` or before.
    pub async fn get_member_event_at(&self, room_id: &str, user_id: &str, until: i64) -> Result<Option<StoredEvent>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as(select_events!(
                "WHERE room_id = $1 AND state_key = $2 AND event_type = 'm.room.member' AND stream_ordering <= $3
                 ORDER BY stream_ordering DESC LIMIT 1"
            ))
            .bind(room_id)
            .bind(user_id)
            .bind(until)
            .fetch_optional(pool)
            .await?)
        })
    }
}

impl Store {
    /// What decides which events of a room a user may see, in one query, oldest first:
    /// (stream position, type, JSON) of the user's member events and of the room's
    /// history visibility changes.
    /// Kept in the visibility cache (`read_cache.rs`).
    pub async fn get_visibility_events(
        &self,
        room_id: &str,
        user_id: &str,
    ) -> Result<std::sync::Arc<Vec<(i64, String, String)>>> {
        let key = (room_id.to_owned(), user_id.to_owned());
        self.caches
            .visibility
            .get_or_read(key, || async {
                let rows: Vec<(i64, String, String)> = on_pool!(self, read, |pool| {
                    // Two indexed reads merged (an OR would make SQLite scan the room's events).
                    sqlx::query_as(
                        "SELECT stream_ordering, event_type, json FROM events
                 WHERE room_id = $1 AND state_key = $2 AND event_type = 'm.room.member' AND stream_ordering IS NOT NULL
                 UNION ALL
                 SELECT stream_ordering, event_type, json FROM events
                 WHERE room_id = $1 AND state_key = '' AND event_type = 'm.room.history_visibility'
                   AND stream_ordering IS NOT NULL
                 ORDER BY 1",
                    )
                    .bind(room_id)
                    .bind(user_id)
                    .fetch_all(pool)
                    .await?
                });
                Ok(std::sync::Arc::new(rows))
            })
            .await
    }
}

/// The rows of a state chain's entries (type, state key, event id, distance from the
/// group), nearest first: the newest entry of each key.
fn newest_entries(rows: Vec<(String, String, String, i64)>) -> Vec<(String, String, String)> {
    let mut seen = std::collections::HashSet::new();
    rows.into_iter()
        .filter(|(t, k, _, _)| seen.insert((t.clone(), k.clone())))
        .map(|(t, k, id, _)| (t, k, id))
        .collect()
}

/// A query that begins with `chain`: `group` and the groups it is a delta on, back to
/// its snapshot, each with its distance `n` from `group`.
fn state_chain<DB: sqlx::Database>(group: i64) -> sqlx::QueryBuilder<DB>
where
    i64: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    let mut query = sqlx::QueryBuilder::new(
        "WITH RECURSIVE chain(group_id, prev_group, snap, n) AS (
             SELECT group_id, prev_group, is_snapshot, CAST(0 AS BIGINT) FROM state_groups WHERE group_id = ",
    );
    query.push_bind(group);
    query.push(
        " UNION ALL
         SELECT g.group_id, g.prev_group, g.is_snapshot, c.n + 1
         FROM state_groups g JOIN chain c ON g.group_id = c.prev_group WHERE NOT c.snap
         )",
    );
    query
}
