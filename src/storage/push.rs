//! Storage of push actions: which events notify, and which highlight, which users.

use super::{Store, on_pool};
use crate::error::Result;

impl Store {
    /// Records that the event at `stream_pos` notifies each of `users` (with whether it
    /// highlights for them).
    pub async fn insert_push_actions(
        &self,
        room_id: &str,
        event_id: &str,
        stream_pos: i64,
        users: &[(String, bool)],
    ) -> Result<()> {
        for chunk in users.chunks(500) {
            on_pool!(self, write, |pool| {
                let mut query = sqlx::QueryBuilder::new(
                    "INSERT INTO event_push_actions (user_id, room_id, stream_pos, event_id, highlight) ",
                );
                query.push_values(chunk, |mut row, (user, highlight)| {
                    row.push_bind(user)
                        .push_bind(room_id)
                        .push_bind(stream_pos)
                        .push_bind(event_id)
                        .push_bind(i32::from(*highlight));
                });
                query.push(" ON CONFLICT DO NOTHING");
                query.build().execute(pool).await?;
            });
        }
        Ok(())
    }

    /// How many events after `after` notify the user in a room, and how many of them
    /// highlight; redacted events no longer count.
    pub async fn count_notifications(&self, room_id: &str, user_id: &str, after: i64) -> Result<(i64, i64)> {
        on_pool!(self, read, |pool| {
            let row: (i64, i64) = sqlx::query_as(
                "SELECT COUNT(*), COALESCE(SUM(p.highlight), 0) FROM event_push_actions p
                 JOIN events e ON e.stream_ordering = p.stream_pos
                 WHERE p.user_id = $1 AND p.room_id = $2 AND p.stream_pos > $3 AND e.redacted_by IS NULL",
            )
            .bind(user_id)
            .bind(room_id)
            .bind(after)
            .fetch_one(pool)
            .await?;
            Ok(row)
        })
    }
}
