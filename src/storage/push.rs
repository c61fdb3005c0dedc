//! Storage of push actions: which events notify, and which highlight, which users
//! (written with the event, in `persist_event`).

use super::{Store, on_pool};
use crate::error::Result;

impl Store {
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
