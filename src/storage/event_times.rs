//! A room's history by time (`origin_server_ts`), for `timestamp_to_event`: the events
//! nearest a moment, and whether a gap in the history here lies near it.

use super::{Store, StoredEvent, on_pool};
use crate::error::Result;

impl Store {
    /// Up to `limit` events of a room's history (events with a stream position: not
    /// outliers, rejected or soft-failed ones) from `(ts, stream)` on, exclusive of that
    /// point: forwards, in increasing (`origin_server_ts`, stream position); backwards,
    /// decreasing. Start at `(ts, i64::MIN)` forwards or `(ts, i64::MAX)` backwards to
    /// include events at `ts` itself.
    pub async fn get_room_events_by_time(
        &self,
        room_id: &str,
        from: (i64, i64),
        forwards: bool,
        limit: i64,
    ) -> Result<Vec<StoredEvent>> {
        // The range on `origin_server_ts` alone walks the index; the tie on the same
        // millisecond is a filter.
        let sql = if forwards {
            super::events::select_events!(
                "WHERE room_id = $1 AND stream_ordering IS NOT NULL AND origin_server_ts >= $2
                   AND NOT (origin_server_ts = $2 AND stream_ordering <= $3)
                 ORDER BY origin_server_ts, stream_ordering LIMIT $4"
            )
        } else {
            super::events::select_events!(
                "WHERE room_id = $1 AND stream_ordering IS NOT NULL AND origin_server_ts <= $2
                   AND NOT (origin_server_ts = $2 AND stream_ordering >= $3)
                 ORDER BY origin_server_ts DESC, stream_ordering DESC LIMIT $4"
            )
        };
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as(sql).bind(room_id).bind(from.0).bind(from.1).bind(limit).fetch_all(pool).await?)
        })
    }

    /// Whether the room's history here has a gap (a backward extremity: a prev event
    /// named but not stored) just before an event sent between `from_ts` and `to_ts`
    /// (inclusive): events missing there could be nearer a moment in that span than
    /// what is stored.
    pub async fn has_gap_between(&self, room_id: &str, from_ts: i64, to_ts: i64) -> Result<bool> {
        on_pool!(self, read, |pool| {
            let row: Option<(i32,)> = sqlx::query_as(
                "SELECT 1 FROM backward_extremities b
                 JOIN event_edges g ON g.prev_event_id = b.event_id
                 JOIN events e ON e.event_id = g.event_id
                 WHERE b.room_id = $1 AND e.stream_ordering IS NOT NULL
                   AND e.origin_server_ts >= $2 AND e.origin_server_ts <= $3
                 LIMIT 1",
            )
            .bind(room_id)
            .bind(from_ts)
            .bind(to_ts)
            .fetch_optional(pool)
            .await?;
            Ok(row.is_some())
        })
    }
}
