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

    /// Thread-aware notification and highlight counts of a user in several rooms at
    /// once: by room, then by thread root (`""` for the main timeline: events in no
    /// thread). `floors` gives each room's position counts start after (the user's
    /// unthreaded receipt, or join); `cuts` (room, thread root or `""`, position) the
    /// threaded receipts above it: a thread counts only after its own.
    pub async fn count_thread_notifications_in_rooms(
        &self,
        user_id: &str,
        floors: &[(&str, i64)],
        cuts: &[(&str, &str, i64)],
    ) -> Result<HashMap<String, HashMap<String, (i64, i64)>>> {
        let mut counts: HashMap<String, HashMap<String, (i64, i64)>> = HashMap::new();
        // Never an empty VALUES list: a row no room matches.
        let mut cut_rows: Vec<(&str, &str, i64)> = vec![("", "", 0)];
        cut_rows.extend_from_slice(cuts);
        for chunk in floors.chunks(400) {
            let rows: Vec<(String, String, i64, i64)> = on_pool!(self, read, |pool| {
                let mut query = sqlx::QueryBuilder::new("WITH after_pos (room_id, pos) AS (");
                query.push_values(chunk, |mut row, (room, pos)| {
                    row.push_bind(*room).push_bind(*pos);
                });
                query.push("), cuts (room_id, thread, pos) AS (");
                query.push_values(&cut_rows, |mut row, (room, thread, pos)| {
                    row.push_bind(*room).push_bind(*thread).push_bind(*pos);
                });
                query.push(
                    ") SELECT p.room_id, COALESCE(r.relates_to, '') AS thread, COUNT(*), COALESCE(SUM(p.highlight), 0)
                     FROM event_push_actions p
                     JOIN after_pos a ON a.room_id = p.room_id
                     JOIN events e ON e.stream_ordering = p.stream_pos
                     LEFT JOIN event_relations r ON r.event_id = p.event_id AND r.rel_type = 'm.thread'
                     LEFT JOIN cuts c ON c.room_id = p.room_id AND c.thread = COALESCE(r.relates_to, '')
                     WHERE p.user_id = ",
                );
                query.push_bind(user_id);
                query.push(
                    " AND p.stream_pos > a.pos AND (c.pos IS NULL OR p.stream_pos > c.pos) AND e.redacted_by IS NULL
                     GROUP BY p.room_id, COALESCE(r.relates_to, '')",
                );
                query.build_query_as().fetch_all(pool).await?
            });
            for (room, thread, n, h) in rows {
                counts.entry(room).or_default().insert(thread, (n, h));
            }
        }
        Ok(counts)
    }
}
