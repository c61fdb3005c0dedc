//! Storage of push actions: which events notify, and which highlight, which users
//! (written with the event, in `persist_event`).

use std::collections::HashMap;

use super::{Store, on_pool};
use crate::error::Result;

impl Store {
    /// Notification and highlight counts of a user in several rooms at once, each
    /// room counted after its own position (read receipt or join).
    pub async fn count_notifications_in_rooms(
        &self,
        user_id: &str,
        after: &[(&str, i64)],
    ) -> Result<HashMap<String, (i64, i64)>> {
        let mut counts = HashMap::new();
        for chunk in after.chunks(400) {
            let rows: Vec<(String, i64, i64)> = on_pool!(self, read, |pool| {
                let mut query = sqlx::QueryBuilder::new("WITH after_pos (room_id, pos) AS (");
                query.push_values(chunk, |mut row, (room, pos)| {
                    row.push_bind(*room).push_bind(*pos);
                });
                query.push(
                    ") SELECT p.room_id, COUNT(*), COALESCE(SUM(p.highlight), 0) FROM event_push_actions p
                     JOIN after_pos a ON a.room_id = p.room_id
                     JOIN events e ON e.stream_ordering = p.stream_pos
                     WHERE p.user_id = ",
                );
                query.push_bind(user_id);
                query.push(" AND p.stream_pos > a.pos AND e.redacted_by IS NULL GROUP BY p.room_id");
                query.build_query_as().fetch_all(pool).await?
            });
            counts.extend(rows.into_iter().map(|(room, n, h)| (room, (n, h))));
        }
        Ok(counts)
    }
}
