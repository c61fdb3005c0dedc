//! The write path of room events: `persist_event` stores one event that passed the auth
//! checks, `create_room` stores a new room's first events, all or nothing. Both run
//! one transaction that takes stream positions, writes state groups, `current_state`,
//! memberships, forward extremities, push actions and redactions.

use super::{Store, events::next_stream_position, on_pool};
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
    /// For `m.room.member` events: the membership it sets.
    pub membership: Option<&'a str>,
    /// A redaction to apply: the target event and its redacted JSON.
    pub redaction: Option<(&'a str, &'a str)>,
    /// A client send's transaction: device, scope (the endpoint's path) and id.
    pub txn: Option<EventTxn<'a>>,
    /// Local users the event notifies, with whether it highlights for them.
    pub push_actions: &'a [(String, bool)],
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

/// What storing one event did.
pub enum Persisted {
    /// Stored at this stream position.
    Stored(i64),
    /// An event with this id was already stored (at this position): nothing changed.
    Duplicate(i64),
    /// The device already used this transaction id on this endpoint: nothing changed.
    TxnTaken,
}

/// What creating a room did.
pub enum RoomCreated {
    /// Stored; the stream positions of the events, in order.
    Stored(Vec<i64>),
    /// Another room already has this id (room version 12 derives it from the create
    /// event): nothing was stored, build the room again.
    RoomIdTaken,
}

/// After this many deltas a state group is written as a full snapshot.
const MAX_STATE_CHAIN: i64 = 64;

/// Stores `$e` (a `NewEvent`) in transaction `$tx` on top of state group `$group`
/// (`None` only for a create event). Evaluates to `Some((position, state group after))`,
/// or `None` when the event id or transaction id was taken (the caller rolls back).
macro_rules! insert_event {
    ($tx:expr, $e:expr, $group:expr) => {{
        let e: &NewEvent<'_> = $e;
        let prev_group: Option<i64> = $group;
        let pos = next_stream_position!($tx);
        let inserted = sqlx::query(
            "INSERT INTO events (stream_ordering, event_id, room_id, sender, event_type, state_key, depth,
                 origin_server_ts, state_group, json, redacted_by, txn_device_id, txn_scope, txn_id, replaces_state)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, NULL, $11, $12, $13,
                 (SELECT event_id FROM current_state WHERE room_id = $3 AND event_type = $5 AND state_key = $6))
             ON CONFLICT DO NOTHING",
        )
        .bind(pos)
        .bind(e.event_id)
        .bind(e.room_id)
        .bind(e.sender)
        .bind(e.event_type)
        .bind(e.state_key)
        .bind(e.depth)
        .bind(e.origin_server_ts)
        // A state event starts a new group, named by its position.
        .bind(if e.state_key.is_some() { Some(pos) } else { prev_group })
        .bind(e.json)
        .bind(e.txn.map(|t| t.device_id))
        .bind(e.txn.map(|t| t.scope))
        .bind(e.txn.map(|t| t.txn_id))
        .execute(&mut *$tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            None
        } else {
            let group = match (e.state_key, prev_group) {
                (Some(state_key), prev) => {
                    let chain: Option<(i64,)> = match prev {
                        Some(p) => {
                            sqlx::query_as("SELECT chain_length FROM state_groups WHERE group_id = $1")
                                .bind(p)
                                .fetch_optional(&mut *$tx)
                                .await?
                        }
                        None => None,
                    };
                    let snapshot = chain.is_none_or(|(n,)| n + 1 >= MAX_STATE_CHAIN);
                    let length = if snapshot { 0 } else { chain.map_or(0, |c| c.0) + 1 };
                    sqlx::query(
                        "INSERT INTO state_groups (group_id, room_id, prev_group, is_snapshot, chain_length)
                         VALUES ($1, $2, $3, $4, $5)",
                    )
                    .bind(pos)
                    .bind(e.room_id)
                    .bind(prev)
                    .bind(snapshot)
                    .bind(length)
                    .execute(&mut *$tx)
                    .await?;
                    if snapshot {
                        sqlx::query(
                            "INSERT INTO state_group_entries (group_id, event_type, state_key, event_id)
                             SELECT $1, event_type, state_key, event_id FROM current_state
                             WHERE room_id = $2 AND NOT (event_type = $3 AND state_key = $4)",
                        )
                        .bind(pos)
                        .bind(e.room_id)
                        .bind(e.event_type)
                        .bind(state_key)
                        .execute(&mut *$tx)
                        .await?;
                    }
                    sqlx::query(
                        "INSERT INTO state_group_entries (group_id, event_type, state_key, event_id) VALUES ($1, $2, $3, $4)",
                    )
                    .bind(pos)
                    .bind(e.event_type)
                    .bind(state_key)
                    .bind(e.event_id)
                    .execute(&mut *$tx)
                    .await?;
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
                    pos
                }
                (None, Some(prev)) => prev,
                (None, None) => return Err(Error::internal("a non-state event needs room state")),
            };
            for chunk in e.push_actions.chunks(500) {
                let mut query = sqlx::QueryBuilder::new(
                    "INSERT INTO event_push_actions (user_id, room_id, stream_pos, event_id, highlight) ",
                );
                query.push_values(chunk, |mut row, (user, highlight)| {
                    row.push_bind(user)
                        .push_bind(e.room_id)
                        .push_bind(pos)
                        .push_bind(e.event_id)
                        .push_bind(i32::from(*highlight));
                });
                query.build().execute(&mut *$tx).await?;
            }
            if let (Some(membership), Some(user_id)) = (e.membership, e.state_key) {
                sqlx::query(
                    "INSERT INTO memberships (room_id, user_id, membership, event_id, stream_ordering, forgotten)
                     VALUES ($1, $2, $3, $4, $5, FALSE)
                     ON CONFLICT (room_id, user_id) DO UPDATE SET membership = excluded.membership,
                        event_id = excluded.event_id, stream_ordering = excluded.stream_ordering, forgotten = FALSE",
                )
                .bind(e.room_id)
                .bind(user_id)
                .bind(membership)
                .bind(e.event_id)
                .bind(pos)
                .execute(&mut *$tx)
                .await?;
            }
            // The usual case, one prev event that was the only extremity, is one statement.
            let replaced = match e.prev_events {
                [only] => {
                    sqlx::query("UPDATE forward_extremities SET event_id = $3 WHERE room_id = $1 AND event_id = $2")
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
            if let Some((target, redacted_json)) = e.redaction {
                sqlx::query(
                    "UPDATE events SET json = $2, redacted_by = $3 WHERE event_id = $1 AND redacted_by IS NULL",
                )
                .bind(target)
                .bind(redacted_json)
                .bind(e.event_id)
                .execute(&mut *$tx)
                .await?;
            }
            Some((pos, group))
        }
    }};
}

impl Store {
    /// Stores an event that passed the auth checks, on top of the room's state group
    /// `prev_state_group`. Storing the same event again, or another event with a
    /// transaction id the device already used on the same endpoint, changes nothing.
    pub async fn persist_event(&self, prev_state_group: i64, e: NewEvent<'_>) -> Result<Persisted> {
        let stored = on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            match insert_event!(tx, &e, Some(prev_state_group)) {
                Some((pos, _)) => {
                    tx.commit().await?;
                    Some(pos)
                }
                None => None,
            }
        });
        if let Some(pos) = stored {
            return Ok(Persisted::Stored(pos));
        }
        // Nothing was written: say which of the two unique keys was taken.
        Ok(match self.get_event(e.event_id).await? {
            Some(existing) => Persisted::Duplicate(existing.stream_ordering),
            None => Persisted::TxnTaken,
        })
    }

    /// Creates a room with its first events (the create event first), all in one
    /// transaction: a room is stored whole or not at all.
    pub async fn create_room(&self, room: NewRoom<'_>, events: &[NewEvent<'_>]) -> Result<RoomCreated> {
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
            let mut positions = Vec::with_capacity(events.len());
            for e in events {
                let Some((pos, after)) = insert_event!(tx, e, group) else {
                    return Err(Error::internal(format!("event {} of a new room is already stored", e.event_id)));
                };
                positions.push(pos);
                group = Some(after);
            }
            tx.commit().await?;
            Ok(RoomCreated::Stored(positions))
        })
    }
}
