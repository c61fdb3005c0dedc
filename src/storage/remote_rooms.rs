//! Rooms this server learns of from other servers (joined through federation), and
//! memberships of local users in rooms this server is not in: invites received, knocks
//! sent, and what ends them (a declined invite, a retracted or refused knock).

use super::{Store, on_pool, stream};
use crate::error::Result;

/// A local user's membership event in a room this server is not in (no state to place
/// it in: it is stored as an outlier).
pub struct RemoteMembership<'a> {
    pub event_id: &'a str,
    pub room_id: &'a str,
    pub sender: &'a str,
    /// The local user the event is about.
    pub user_id: &'a str,
    /// `invite`, `knock`, `leave` or `ban`.
    pub membership: &'a str,
    pub depth: i64,
    pub origin_server_ts: i64,
    /// The event as signed.
    pub json: &'a str,
    /// The stripped state that came with an invite or a knock, a JSON array.
    pub stripped_state: Option<&'a str>,
    /// Change the user's membership only while it is an invite or a knock (a refused
    /// knock, a rescinded invite: not a join that happened meanwhile).
    pub only_if_pending: bool,
}

impl Store {
    /// Stores a local user's membership event in a room this server is not in: the
    /// event (an outlier; storing it again changes nothing), then in one transaction the
    /// user's membership at a new stream position (so that `/sync` shows it) and the
    /// stripped state to show with it. Answers the position, or `None` when nothing
    /// changed (`only_if_pending`, and the user's membership was neither).
    pub async fn store_remote_membership(&self, m: &RemoteMembership<'_>) -> Result<Option<i64>> {
        self.persist_outliers(&[super::Outlier {
            event_id: m.event_id,
            room_id: m.room_id,
            sender: m.sender,
            event_type: "m.room.member",
            state_key: Some(m.user_id),
            depth: m.depth,
            origin_server_ts: m.origin_server_ts,
            json: m.json,
            prev_events: &[],
            auth_events: &[],
            rejected_reason: None,
        }])
        .await?;
        let _writing = self.state_writing();
        let positions = self.take_positions(1).await?;
        let pos = positions.first();
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            let sql = if m.only_if_pending {
                "UPDATE memberships SET membership = $3, event_id = $4, stream_ordering = $5, forgotten = FALSE
                 WHERE room_id = $1 AND user_id = $2 AND membership IN ('invite', 'knock') AND event_id <> $4"
            } else {
                "INSERT INTO memberships (room_id, user_id, membership, event_id, stream_ordering, forgotten)
                 VALUES ($1, $2, $3, $4, $5, FALSE)
                 ON CONFLICT (room_id, user_id) DO UPDATE SET membership = excluded.membership,
                    event_id = excluded.event_id, stream_ordering = excluded.stream_ordering, forgotten = FALSE"
            };
            let changed = sqlx::query(sql)
                .bind(m.room_id)
                .bind(m.user_id)
                .bind(m.membership)
                .bind(m.event_id)
                .bind(pos)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if changed == 0 {
                tx.rollback().await?;
                return Ok(None);
            }
            if let Some(state) = m.stripped_state {
                sqlx::query(
                    "INSERT INTO invite_states (event_id, room_id, user_id, stripped_state) VALUES ($1, $2, $3, $4)
                     ON CONFLICT DO NOTHING",
                )
                .bind(m.event_id)
                .bind(m.room_id)
                .bind(m.user_id)
                .bind(state)
                .execute(&mut *tx)
                .await?;
            }
            stream::commit(tx, Some(positions)).await?;
            Ok(Some(pos))
        })
    }

    /// The stripped state stored with a remote invite or knock, if `event_id` is one.
    pub async fn get_invite_state(&self, event_id: &str) -> Result<Option<String>> {
        on_pool!(self, read, |pool| {
            let row: Option<(String,)> = sqlx::query_as("SELECT stripped_state FROM invite_states WHERE event_id = $1")
                .bind(event_id)
                .fetch_optional(pool)
                .await?;
            Ok(row.map(|r| r.0))
        })
    }

    /// Marks a remote invite or knock ended here when the other server could not be told
    /// (the user left it before joining): the membership becomes `leave`, keeping its
    /// event, at a new stream position.
    pub async fn decline_remote_membership(&self, room_id: &str, user_id: &str, event_id: &str) -> Result<i64> {
        let _writing = self.state_writing();
        let positions = self.take_positions(1).await?;
        let pos = positions.first();
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            sqlx::query(
                "UPDATE memberships SET membership = 'leave', stream_ordering = $4
                 WHERE room_id = $1 AND user_id = $2 AND event_id = $3 AND membership IN ('invite', 'knock')",
            )
            .bind(room_id)
            .bind(user_id)
            .bind(event_id)
            .bind(pos)
            .execute(&mut *tx)
            .await?;
            stream::commit(tx, Some(positions)).await?;
            Ok(pos)
        })
    }
}
