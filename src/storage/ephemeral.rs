//! Storage of read receipts, presence and filters. A read receipt recounts the user's
//! kept unread counts in its room in the same transaction (`push.rs`).

use super::changes::{Change, Kind};
use super::{Dialect, Store, on_pool, push::recount_unread, stream};
use crate::error::{Error, Result};

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct ReceiptRow {
    pub room_id: String,
    pub user_id: String,
    pub receipt_type: String,
    pub thread_id: String,
    pub event_id: String,
    pub ts: i64,
}

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct PresenceRow {
    pub user_id: String,
    pub state: String,
    pub status_msg: Option<String>,
    pub last_active_ts: i64,
}

impl Store {
    /// Stores a receipt (replacing the user's previous one of that type and thread) and
    /// recounts the user's unread counts in the room, in one transaction.
    pub async fn set_receipt(&self, r: &ReceiptRow) -> Result<i64> {
        // The recount changes the user's kept counts (`live.rs`): read again after it.
        let live = self.live.begin([r.room_id.as_str()]);
        live.drop_unread(&r.room_id, Some(&r.user_id));
        let positions = self.take_positions_for(1, &[Change::new(Kind::Receipts, &r.room_id)]).await?;
        let pos = positions.first();
        let stored: Result<i64> = on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            // The user's "" count row first: it is the lock an event's increment takes.
            sqlx::query(
                "INSERT INTO unread_counts (user_id, room_id, thread_id, after_pos, notifs, highlights)
                 VALUES ($1, $2, '', 0, 0, 0)
                 ON CONFLICT (user_id, room_id, thread_id) DO UPDATE SET notifs = unread_counts.notifs",
            )
            .bind(&r.user_id)
            .bind(&r.room_id)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO receipts (room_id, user_id, receipt_type, thread_id, event_id, ts, stream_pos)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (room_id, user_id, receipt_type, thread_id) DO UPDATE
                 SET event_id = excluded.event_id, ts = excluded.ts, stream_pos = excluded.stream_pos",
            )
            .bind(&r.room_id)
            .bind(&r.user_id)
            .bind(&r.receipt_type)
            .bind(&r.thread_id)
            .bind(&r.event_id)
            .bind(r.ts)
            .bind(pos)
            .execute(&mut *tx)
            .await?;
            recount_unread!(tx, &r.user_id, &r.room_id);
            stream::commit(tx, Some(positions)).await?;
            Ok(pos)
        });
        // The room's tail is as it was; the user's counts are read again.
        live.settle();
        stored
    }

    /// The stream position of the event a user last read in a room (public or private receipt).
    /// The stream position of the user's latest read receipt in each of `room_ids`
    /// that has one.
    pub async fn get_read_positions(&self, user_id: &str, room_ids: &[&str]) -> Result<Vec<(String, i64)>> {
        let mut positions = Vec::new();
        for chunk in room_ids.chunks(500) {
            let rows: Vec<(String, i64)> = on_pool!(self, read, |pool| {
                let mut query = sqlx::QueryBuilder::new(
                    "SELECT r.room_id, MAX(e.stream_ordering) FROM receipts r JOIN events e ON e.event_id = r.event_id
                     WHERE e.stream_ordering IS NOT NULL AND r.user_id = ",
                );
                query.push_bind(user_id);
                query.push(" AND r.room_id IN (");
                let mut list = query.separated(", ");
                for id in chunk {
                    list.push_bind(*id);
                }
                query.push(") GROUP BY r.room_id");
                query.build_query_as().fetch_all(pool).await?
            });
            positions.extend(rows);
        }
        Ok(positions)
    }

    /// The stream position of the user's latest read receipt per thread (`""`:
    /// unthreaded, `"main"`, or a thread root) in each of `room_ids`: (room, thread,
    /// position).
    pub async fn get_thread_read_positions(
        &self,
        user_id: &str,
        room_ids: &[&str],
    ) -> Result<Vec<(String, String, i64)>> {
        let mut positions = Vec::new();
        for chunk in room_ids.chunks(500) {
            let rows: Vec<(String, String, i64)> = on_pool!(self, read, |pool| {
                let mut query = sqlx::QueryBuilder::new(
                    "SELECT r.room_id, r.thread_id, MAX(e.stream_ordering) FROM receipts r
                     JOIN events e ON e.event_id = r.event_id
                     WHERE e.stream_ordering IS NOT NULL AND r.user_id = ",
                );
                query.push_bind(user_id);
                query.push(" AND r.room_id IN (");
                let mut list = query.separated(", ");
                for id in chunk {
                    list.push_bind(*id);
                }
                query.push(") GROUP BY r.room_id, r.thread_id");
                query.build_query_as().fetch_all(pool).await?
            });
            positions.extend(rows);
        }
        Ok(positions)
    }

    /// Sets a user's presence; `status_msg` `None` keeps the stored message (in the
    /// same statement, so a concurrent change of it is not undone).
    pub async fn set_presence(
        &self,
        user_id: &str,
        state: &str,
        status_msg: Option<Option<&str>>,
        now: i64,
    ) -> Result<i64> {
        let positions = self.take_positions_for(1, &[Change::new(Kind::Presence, "")]).await?;
        let pos = positions.first();
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            sqlx::query(
                "INSERT INTO presence (user_id, state, status_msg, last_active_ts, stream_pos) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (user_id) DO UPDATE SET state = excluded.state,
                    status_msg = CASE WHEN $6 THEN excluded.status_msg ELSE presence.status_msg END,
                    last_active_ts = excluded.last_active_ts, stream_pos = excluded.stream_pos",
            )
            .bind(user_id)
            .bind(state)
            .bind(status_msg.flatten())
            .bind(now)
            .bind(pos)
            .bind(status_msg.is_some())
            .execute(&mut *tx)
            .await?;
            stream::commit(tx, Some(positions)).await?;
            Ok(pos)
        })
    }

    /// Moves a user's `last_active_ts` to `now` without a new stream position (nobody
    /// is told: a refresh of activity is not news), if their stored state and message
    /// are still `state` and `status_msg`. `false` when they are not (a full
    /// `set_presence` is then due).
    pub async fn refresh_presence(
        &self,
        user_id: &str,
        state: &str,
        status_msg: Option<&str>,
        now: i64,
    ) -> Result<bool> {
        on_pool!(self, write, |pool| {
            let updated = sqlx::query(
                "UPDATE presence SET last_active_ts = $4
                 WHERE user_id = $1 AND state = $2 AND status_msg IS NOT DISTINCT FROM $3 AND last_active_ts <= $4",
            )
            .bind(user_id)
            .bind(state)
            .bind(status_msg)
            .bind(now)
            .execute(pool)
            .await?
            .rows_affected();
            Ok(updated == 1)
        })
    }

    pub async fn get_presence(&self, user_id: &str) -> Result<Option<PresenceRow>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as("SELECT user_id, state, status_msg, last_active_ts FROM presence WHERE user_id = $1")
                .bind(user_id)
                .fetch_optional(pool)
                .await?)
        })
    }

    /// Whether two users are both joined to some room.
    pub async fn users_share_room(&self, a: &str, b: &str) -> Result<bool> {
        on_pool!(self, read, |pool| {
            let row: Option<(i32,)> = sqlx::query_as(
                "SELECT 1 FROM memberships x JOIN memberships y ON y.room_id = x.room_id
                 WHERE x.user_id = $1 AND x.membership = 'join' AND y.user_id = $2 AND y.membership = 'join'
                 LIMIT 1",
            )
            .bind(a)
            .bind(b)
            .fetch_optional(pool)
            .await?;
            Ok(row.is_some())
        })
    }

    /// Presence changes after `since` (up to `until`) of users who share a joined room
    /// with `user_id`. The rows come back as one JSON array in one row: on SQLite each
    /// row of a result is a hand-off from the connection's thread (a wake-up there and
    /// back), which cost more than the row itself when a sync in a room of 1,000
    /// carries everyone's coming online (issue 13).
    pub async fn get_presence_since(&self, user_id: &str, since: i64, until: i64) -> Result<Vec<PresenceRow>> {
        const FROM: &str = " FROM presence p
             WHERE p.stream_pos > $2 AND p.stream_pos <= $3 AND (p.user_id = $1 OR EXISTS (
                 SELECT 1 FROM memberships a JOIN memberships b ON a.room_id = b.room_id
                 WHERE a.user_id = $1 AND a.membership = 'join' AND b.user_id = p.user_id AND b.membership = 'join'))";
        let sql = match self.dialect() {
            Dialect::Sqlite => {
                format!("SELECT json_group_array(json_array(p.user_id, p.state, p.status_msg, p.last_active_ts)){FROM}")
            }
            Dialect::Postgres => format!(
                "SELECT CAST(COALESCE(json_agg(json_build_array(p.user_id, p.state, p.status_msg, p.last_active_ts)),
                     '[]') AS TEXT){FROM}"
            ),
        };
        let (rows,): (String,) = on_pool!(self, read, |pool| {
            sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(user_id).bind(since).bind(until).fetch_one(pool).await?
        });
        let rows: Vec<(String, String, Option<String>, i64)> =
            serde_json::from_str(&rows).map_err(|e| Error::internal(format!("presence rows: {e}")))?;
        Ok(rows
            .into_iter()
            .map(|(user_id, state, status_msg, last_active_ts)| PresenceRow {
                user_id,
                state,
                status_msg,
                last_active_ts,
            })
            .collect())
    }

    /// Stores a filter; returns its id (per user, counting from 0).
    pub async fn create_filter(&self, user_id: &str, json: &str) -> Result<i64> {
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            let (next,): (i64,) =
                sqlx::query_as("SELECT COALESCE(MAX(filter_id) + 1, 0) FROM filters WHERE user_id = $1")
                    .bind(user_id)
                    .fetch_one(&mut *tx)
                    .await?;
            sqlx::query("INSERT INTO filters (user_id, filter_id, json) VALUES ($1, $2, $3)")
                .bind(user_id)
                .bind(next)
                .bind(json)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(next)
        })
    }

    pub async fn get_filter(&self, user_id: &str, filter_id: i64) -> Result<Option<String>> {
        on_pool!(self, read, |pool| {
            let row: Option<(String,)> =
                sqlx::query_as("SELECT json FROM filters WHERE user_id = $1 AND filter_id = $2")
                    .bind(user_id)
                    .bind(filter_id)
                    .fetch_optional(pool)
                    .await?;
            Ok(row.map(|r| r.0))
        })
    }

    /// The rooms with events after `since`: (room, latest position, latest position of
    /// a member event, if any), in one query.
    pub async fn get_rooms_changed_since(&self, since: i64, until: i64) -> Result<Vec<(String, i64, Option<i64>)>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as(
                // Materialized, so that the planner takes the range of new events from the
                // stream_ordering index instead of scanning every event by room.
                "WITH recent AS MATERIALIZED (
                     SELECT room_id, stream_ordering, event_type FROM events
                     WHERE stream_ordering > $1 AND stream_ordering <= $2)
                 SELECT room_id, MAX(stream_ordering),
                        MAX(CASE WHEN event_type = 'm.room.member' THEN stream_ordering END)
                 FROM recent GROUP BY room_id",
            )
            .bind(since)
            .bind(until)
            .fetch_all(pool)
            .await?)
        })
    }
}

impl Store {
    /// Receipts newer than `since` (up to `until`) in every room `user_id` is joined
    /// to, in one query.
    pub async fn get_receipts_for_user_rooms(&self, user_id: &str, since: i64, until: i64) -> Result<Vec<ReceiptRow>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as(
                "SELECT r.room_id, r.user_id, r.receipt_type, r.thread_id, r.event_id, r.ts FROM receipts r
                 JOIN memberships m ON m.room_id = r.room_id AND m.user_id = $1 AND m.membership = 'join'
                 WHERE r.stream_pos > $2 AND r.stream_pos <= $3",
            )
            .bind(user_id)
            .bind(since)
            .bind(until)
            .fetch_all(pool)
            .await?)
        })
    }
}
