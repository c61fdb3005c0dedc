//! Rooms this server learns of from other servers (joined through federation).

use super::{Store, on_pool, stream};
use crate::error::Result;

/// An invite from another server to a room this server is not in.
pub struct RemoteInvite<'a> {
    pub event_id: &'a str,
    pub room_id: &'a str,
    pub sender: &'a str,
    pub user_id: &'a str,
    pub depth: i64,
    pub origin_server_ts: i64,
    /// The invite as signed by both servers.
    pub json: &'a str,
    /// The stripped state sent along, a JSON array.
    pub stripped_state: &'a str,
}

impl Store {
    /// Stores an invite from another server to a room this server is not in: the event
    /// (an outlier: there is no state to place it in), then in one transaction the
    /// user's membership at a new stream position (so that `/sync` shows it) and the
    /// stripped state to show with it. Answers the position.
    pub async fn store_remote_invite(&self, invite: &RemoteInvite<'_>) -> Result<i64> {
        // The event first, as any outlier (storing it again changes nothing); then the
        // membership and the state to show, together.
        self.persist_outliers(&[super::Outlier {
            event_id: invite.event_id,
            room_id: invite.room_id,
            sender: invite.sender,
            event_type: "m.room.member",
            state_key: Some(invite.user_id),
            depth: invite.depth,
            origin_server_ts: invite.origin_server_ts,
            json: invite.json,
            prev_events: &[],
            auth_events: &[],
            rejected_reason: None,
        }])
        .await?;
        let positions = self.take_positions(1).await?;
        let pos = positions.first();
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            sqlx::query(
                "INSERT INTO memberships (room_id, user_id, membership, event_id, stream_ordering, forgotten)
                 VALUES ($1, $2, 'invite', $3, $4, FALSE)
                 ON CONFLICT (room_id, user_id) DO UPDATE SET membership = excluded.membership,
                    event_id = excluded.event_id, stream_ordering = excluded.stream_ordering, forgotten = FALSE",
            )
            .bind(invite.room_id)
            .bind(invite.user_id)
            .bind(invite.event_id)
            .bind(pos)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO invite_states (event_id, room_id, user_id, stripped_state) VALUES ($1, $2, $3, $4)
                 ON CONFLICT DO NOTHING",
            )
            .bind(invite.event_id)
            .bind(invite.room_id)
            .bind(invite.user_id)
            .bind(invite.stripped_state)
            .execute(&mut *tx)
            .await?;
            stream::commit(tx, Some(positions)).await?;
            Ok(pos)
        })
    }

    /// The stripped state stored with a remote invite, if `event_id` is one.
    pub async fn get_invite_state(&self, event_id: &str) -> Result<Option<String>> {
        on_pool!(self, read, |pool| {
            let row: Option<(String,)> = sqlx::query_as("SELECT stripped_state FROM invite_states WHERE event_id = $1")
                .bind(event_id)
                .fetch_optional(pool)
                .await?;
            Ok(row.map(|r| r.0))
        })
    }

    /// Marks a remote invite declined here (the user left it before joining): the
    /// membership becomes `leave` at a new stream position.
    pub async fn decline_remote_invite(&self, room_id: &str, user_id: &str, event_id: &str) -> Result<i64> {
        let positions = self.take_positions(1).await?;
        let pos = positions.first();
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            sqlx::query(
                "UPDATE memberships SET membership = 'leave', stream_ordering = $4
                 WHERE room_id = $1 AND user_id = $2 AND event_id = $3 AND membership = 'invite'",
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
