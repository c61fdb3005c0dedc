//! Storage of relations between events (`event_relations`, migration 0023): which event
//! relates to which (`m.relates_to`), by what `rel_type`. Rows are written by
//! `persist.rs` in the event's own transaction (and removed there when the event is
//! redacted); this file reads them: a parent's children a page at a time (`/relations`),
//! a room's threads by latest activity (`/threads`), and the aggregations bundled into
//! a page of events (`unsigned.m.relations`). Only events in the room's history count
//! (outliers, rejected and soft-failed events have no stream position). A parent's
//! `related` flag (migration 0027) is set with its first relation row, so that pages
//! nobody relates to skip the bundled read, and cleared when its last child is
//! redacted (`unrelate!`).

use std::collections::HashMap;

use serde::Deserialize;

use super::{Store, StoredEvent, events::select_events, on_pool};
use crate::error::Result;

/// The relation an event's content declares: (parent event id, rel_type).
pub(crate) fn relation_of(json: &str) -> Option<(String, String)> {
    #[derive(Deserialize)]
    struct Pdu {
        #[serde(default)]
        content: Option<Content>,
    }
    #[derive(Deserialize)]
    struct Content {
        #[serde(rename = "m.relates_to", default)]
        relates_to: Option<RelatesTo>,
    }
    #[derive(Deserialize)]
    struct RelatesTo {
        #[serde(default)]
        rel_type: Option<serde_json::Value>,
        #[serde(default)]
        event_id: Option<serde_json::Value>,
    }
    let pdu: Pdu = serde_json::from_str(json).ok()?;
    let relates_to = pdu.content?.relates_to?;
    match (relates_to.event_id?, relates_to.rel_type?) {
        (serde_json::Value::String(id), serde_json::Value::String(rel)) if !id.is_empty() && !rel.is_empty() => {
            Some((id, rel))
        }
        _ => None,
    }
}

/// Writes the relation row of an event just stored in transaction `$tx` (its `NewEvent`
/// is `$e`), unless the event is redacted (a held redaction applied as it was stored).
macro_rules! insert_relation {
    ($tx:expr, $batch:expr, $e:expr) => {{
        let e: &NewEvent<'_> = $e;
        if let Some((parent, rel_type)) = super::relations::relation_of(e.json) {
            // It reads what it writes: the batch goes first (`batch.rs`).
            $crate::storage::batch::flush_batch!($tx, $batch);
            sqlx::query(
                "INSERT INTO event_relations (event_id, relates_to, rel_type, event_type, sender, room_id)
                 SELECT $1, $2, $3, $4, $5, $6 WHERE NOT EXISTS (
                     SELECT 1 FROM events WHERE event_id = $1 AND redacted_by IS NOT NULL)
                 ON CONFLICT DO NOTHING",
            )
            .bind(e.event_id)
            .bind(&parent)
            .bind(rel_type)
            .bind(e.event_type)
            .bind(e.sender)
            .bind(e.room_id)
            .execute(&mut *$tx)
            .await?;
            // The parent's flag, read under a share lock on PostgreSQL: a redaction that
            // clears it (`unrelate!`) holds the row's lock while it checks for children,
            // so either it sees this child or this read sees its cleared flag.
            let postgres = super::relations::is_postgres(&$tx);
            let related: Option<(bool,)> = sqlx::query_as(if postgres {
                "SELECT related FROM events WHERE event_id = $1 FOR SHARE"
            } else {
                "SELECT related FROM events WHERE event_id = $1"
            })
            .bind(&parent)
            .fetch_optional(&mut *$tx)
            .await?;
            if related == Some((false,)) {
                sqlx::query("UPDATE events SET related = TRUE WHERE event_id = $1")
                    .bind(&parent)
                    .execute(&mut *$tx)
                    .await?;
            }
        }
    }};
}
pub(crate) use insert_relation;

/// Whether a transaction is PostgreSQL's (the row locks that SQLite, one writer, has no
/// syntax for).
pub(crate) fn is_postgres<DB: sqlx::Database>(_: &sqlx::Transaction<'_, DB>) -> bool {
    DB::NAME == "PostgreSQL"
}

/// Removes the relation row of `$target`, just redacted in transaction `$tx` (a
/// redacted event has no `m.relates_to`), and clears its parent's `related` flag when
/// that was the parent's last child. On PostgreSQL the parent's row is locked first, and
/// the check runs in a statement of its own (a fresh snapshot): a child being added at
/// the same time either committed before it (and is seen) or waits on the lock in
/// `insert_relation!` and sets the flag again.
macro_rules! unrelate {
    ($tx:expr, $target:expr) => {{
        let parent: Option<(String,)> =
            sqlx::query_as("DELETE FROM event_relations WHERE event_id = $1 RETURNING relates_to")
                .bind($target)
                .fetch_optional(&mut *$tx)
                .await?;
        if let Some((parent,)) = parent {
            if $crate::storage::relations::is_postgres(&$tx) {
                sqlx::query("SELECT 1 FROM events WHERE event_id = $1 FOR NO KEY UPDATE")
                    .bind(&parent)
                    .execute(&mut *$tx)
                    .await?;
            }
            sqlx::query(
                "UPDATE events SET related = FALSE WHERE event_id = $1 AND related
                 AND NOT EXISTS (SELECT 1 FROM event_relations WHERE relates_to = $1)",
            )
            .bind(&parent)
            .execute(&mut *$tx)
            .await?;
        }
    }};
}
pub(crate) use unrelate;

/// Which children of a parent `/relations` asks for.
pub struct RelationQuery<'a> {
    pub room_id: &'a str,
    pub parent: &'a str,
    pub rel_type: Option<&'a str>,
    pub event_type: Option<&'a str>,
    /// Also children of children, down to this many levels (1: direct children only).
    pub depth: i64,
    /// Stream positions strictly below (backwards) or above (forwards) this one.
    pub from: Option<i64>,
    /// Stream positions not past this one (included).
    pub to: Option<i64>,
    pub backwards: bool,
    pub limit: i64,
}

/// The aggregations of one thread root.
#[derive(Clone, Debug)]
pub struct ThreadSummary {
    pub count: i64,
    /// The stream position of the thread's latest event.
    pub latest_position: i64,
    /// Whether the viewer sent an event in the thread.
    pub participated: bool,
}

/// The relations bundled with a page of events.
#[derive(Default, Debug)]
pub struct BundledRelations {
    /// By thread root.
    pub threads: HashMap<String, ThreadSummary>,
    /// By original: its valid replacements (same sender and type), as (event id,
    /// origin_server_ts).
    pub replacements: HashMap<String, Vec<(String, i64)>>,
    /// By parent: the events referencing it, oldest first.
    pub references: HashMap<String, Vec<String>>,
}

/// Adds ` AND r.sender NOT IN (...)` to `$query` for a viewer's ignored users
/// (`$ignored`; nothing when none).
macro_rules! push_not_ignored {
    ($query:expr, $ignored:expr) => {{
        let ignored: &[String] = $ignored;
        if !ignored.is_empty() {
            $query.push(" AND r.sender NOT IN (");
            let mut list = $query.separated(", ");
            for user in ignored {
                list.push_bind(user);
            }
            $query.push(")");
        }
    }};
}

impl Store {
    /// The event `event_id` relates to, and how (`rel_type`), if it relates to one.
    pub async fn get_relation_parent(&self, event_id: &str) -> Result<Option<(String, String)>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as("SELECT relates_to, rel_type FROM event_relations WHERE event_id = $1")
                .bind(event_id)
                .fetch_optional(pool)
                .await?)
        })
    }

    /// A page of the children of a parent event (with the filters of `q`), in stream
    /// order (newest first when backwards), at most `q.limit`.
    pub async fn get_relations(&self, q: &RelationQuery<'_>) -> Result<Vec<StoredEvent>> {
        on_pool!(self, read, |pool| {
            let mut query = sqlx::QueryBuilder::new(
                "WITH RECURSIVE related(event_id, rel_type, event_type, level) AS (
                     SELECT event_id, rel_type, event_type, 1 FROM event_relations WHERE relates_to = ",
            );
            query.push_bind(q.parent);
            query.push(" AND room_id = ");
            query.push_bind(q.room_id);
            query.push(
                " UNION SELECT r.event_id, r.rel_type, r.event_type, p.level + 1 FROM event_relations r
                  JOIN related p ON r.relates_to = p.event_id WHERE p.level < ",
            );
            query.push_bind(q.depth.max(1));
            query.push(")");
            query.push(select_events!("WHERE event_id IN (SELECT event_id FROM related WHERE 1 = 1"));
            if let Some(rel_type) = q.rel_type {
                query.push(" AND rel_type = ").push_bind(rel_type);
            }
            if let Some(event_type) = q.event_type {
                query.push(" AND event_type = ").push_bind(event_type);
            }
            query.push(") AND stream_ordering IS NOT NULL AND room_id = ").push_bind(q.room_id);
            match (q.backwards, q.from, q.to) {
                (true, from, to) => {
                    if let Some(from) = from {
                        query.push(" AND stream_ordering < ").push_bind(from);
                    }
                    if let Some(to) = to {
                        query.push(" AND stream_ordering >= ").push_bind(to);
                    }
                    query.push(" ORDER BY stream_ordering DESC");
                }
                (false, from, to) => {
                    if let Some(from) = from {
                        query.push(" AND stream_ordering > ").push_bind(from);
                    }
                    if let Some(to) = to {
                        query.push(" AND stream_ordering <= ").push_bind(to);
                    }
                    query.push(" ORDER BY stream_ordering ASC");
                }
            }
            query.push(" LIMIT ").push_bind(q.limit);
            Ok(query.build_query_as().fetch_all(pool).await?)
        })
    }

    /// A page of a room's thread roots, by latest activity (the stream position of the
    /// thread's newest event), newest first, below `before`; with `participant`, only
    /// the threads that user started or posted in. Events of `ignored` senders do not
    /// count (a thread with only theirs is left out). Returns (root id, latest position).
    pub async fn get_threads(
        &self,
        room_id: &str,
        before: Option<i64>,
        participant: Option<&str>,
        ignored: &[String],
        limit: i64,
    ) -> Result<Vec<(String, i64)>> {
        on_pool!(self, read, |pool| {
            let mut query = sqlx::QueryBuilder::new(
                "SELECT r.relates_to, MAX(e.stream_ordering) AS latest FROM event_relations r
                 JOIN events e ON e.event_id = r.event_id
                 WHERE r.room_id = ",
            );
            query.push_bind(room_id);
            query.push(" AND r.rel_type = 'm.thread' AND e.stream_ordering IS NOT NULL");
            push_not_ignored!(query, ignored);
            query.push(" GROUP BY r.relates_to HAVING 1 = 1");
            if let Some(before) = before {
                query.push(" AND MAX(e.stream_ordering) < ").push_bind(before);
            }
            if let Some(user) = participant {
                query.push(" AND (SUM(CASE WHEN r.sender = ").push_bind(user);
                query.push(" THEN 1 ELSE 0 END) > 0 OR EXISTS (SELECT 1 FROM events root WHERE root.event_id = r.relates_to AND root.sender = ");
                query.push_bind(user);
                query.push("))");
            }
            query.push(" ORDER BY latest DESC LIMIT ").push_bind(limit);
            Ok(query.build_query_as().fetch_all(pool).await?)
        })
    }

    /// The thread summaries, replacements and references of a page of events, for a
    /// viewer (who may have taken part in a thread, and whose `ignored` users' thread
    /// events neither count nor are the latest): two queries for the whole page.
    pub async fn get_bundled_relations(
        &self,
        parents: &[String],
        viewer: Option<&str>,
        ignored: &[String],
    ) -> Result<BundledRelations> {
        let mut out = BundledRelations::default();
        for chunk in parents.chunks(400) {
            let threads: Vec<(String, i64, i64, i64)> = on_pool!(self, read, |pool| {
                let mut query = sqlx::QueryBuilder::new(
                    "SELECT r.relates_to, COUNT(*), MAX(e.stream_ordering), SUM(CASE WHEN r.sender = ",
                );
                query.push_bind(viewer.unwrap_or_default());
                query.push(
                    " THEN 1 ELSE 0 END) FROM event_relations r JOIN events e ON e.event_id = r.event_id
                      WHERE r.rel_type = 'm.thread' AND e.stream_ordering IS NOT NULL AND r.relates_to IN (",
                );
                let mut list = query.separated(", ");
                for id in chunk {
                    list.push_bind(id);
                }
                query.push(")");
                push_not_ignored!(query, ignored);
                query.push(" GROUP BY r.relates_to");
                query.build_query_as().fetch_all(pool).await?
            });
            for (root, count, latest_position, mine) in threads {
                out.threads.insert(root, ThreadSummary { count, latest_position, participated: mine > 0 });
            }
            // Edits count only from the original's sender and with its type (the spec's
            // validity rules); references from anyone.
            let others: Vec<(String, String, String, i64)> = on_pool!(self, read, |pool| {
                let mut query = sqlx::QueryBuilder::new(
                    "SELECT r.relates_to, r.rel_type, r.event_id, e.origin_server_ts FROM event_relations r
                     JOIN events e ON e.event_id = r.event_id
                     JOIN events o ON o.event_id = r.relates_to
                     WHERE e.stream_ordering IS NOT NULL
                       AND ((r.rel_type = 'm.replace' AND r.sender = o.sender AND r.event_type = o.event_type
                             AND o.state_key IS NULL AND e.state_key IS NULL)
                            OR r.rel_type = 'm.reference')
                       AND r.relates_to IN (",
                );
                let mut list = query.separated(", ");
                for id in chunk {
                    list.push_bind(id);
                }
                query.push(") ORDER BY e.stream_ordering");
                query.build_query_as().fetch_all(pool).await?
            });
            for (parent, rel_type, event_id, ts) in others {
                if rel_type == "m.replace" {
                    out.replacements.entry(parent).or_default().push((event_id, ts));
                } else {
                    out.references.entry(parent).or_default().push(event_id);
                }
            }
        }
        Ok(out)
    }

    /// Events by stream position (unknown positions are skipped).
    pub async fn get_events_by_positions(&self, positions: &[i64]) -> Result<Vec<StoredEvent>> {
        let mut found = Vec::with_capacity(positions.len());
        for chunk in positions.chunks(500) {
            let rows: Vec<StoredEvent> = on_pool!(self, read, |pool| {
                let mut query = sqlx::QueryBuilder::new(select_events!("WHERE stream_ordering IN ("));
                let mut list = query.separated(", ");
                for p in chunk {
                    list.push_bind(*p);
                }
                query.push(")");
                query.build_query_as().fetch_all(pool).await?
            });
            found.extend(rows);
        }
        Ok(found)
    }

    /// Fills `event_relations` from the JSON of events stored before migration 0023,
    /// once (recorded as `relations` in `server_info`), at start, in pages of 1,000
    /// events, in one transaction.
    pub(crate) async fn fill_relations(&self) -> Result<()> {
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            let done: Option<(String,)> = sqlx::query_as("SELECT value FROM server_info WHERE key = 'relations'")
                .fetch_optional(&mut *tx)
                .await?;
            if done.is_some() {
                return Ok(());
            }
            let mut after = String::new();
            loop {
                let page: Vec<(String, String, String, String, String)> = sqlx::query_as(
                    "SELECT event_id, room_id, event_type, sender, json FROM events
                     WHERE event_id > $1 AND stream_ordering IS NOT NULL AND redacted_by IS NULL
                     ORDER BY event_id LIMIT 1000",
                )
                .bind(&after)
                .fetch_all(&mut *tx)
                .await?;
                let Some(last) = page.last() else { break };
                after = last.0.clone();
                for (event_id, room_id, event_type, sender, json) in &page {
                    let Some((parent, rel_type)) = relation_of(json) else { continue };
                    sqlx::query(
                        "INSERT INTO event_relations (event_id, relates_to, rel_type, event_type, sender, room_id)
                         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                    )
                    .bind(event_id)
                    .bind(parent)
                    .bind(rel_type)
                    .bind(event_type)
                    .bind(sender)
                    .bind(room_id)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            // The parents' flags (migration 0027 set those of the rows it found).
            sqlx::query(
                "UPDATE events SET related = TRUE WHERE NOT related
                 AND event_id IN (SELECT relates_to FROM event_relations)",
            )
            .execute(&mut *tx)
            .await?;
            sqlx::query("INSERT INTO server_info (key, value) VALUES ('relations', 'filled')")
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::relation_of;

    #[test]
    fn relation_of_reads_rel_type_and_parent() {
        let json = r#"{"content":{"m.relates_to":{"rel_type":"m.thread","event_id":"$root"}}}"#;
        assert_eq!(relation_of(json), Some(("$root".to_owned(), "m.thread".to_owned())));
        // A reply without a rel_type, a bad event id, no content: no relation.
        assert_eq!(relation_of(r#"{"content":{"m.relates_to":{"m.in_reply_to":{"event_id":"$x"}}}}"#), None);
        assert_eq!(relation_of(r#"{"content":{"m.relates_to":{"rel_type":"m.replace","event_id":5}}}"#), None);
        assert_eq!(relation_of(r#"{"type":"m.room.message"}"#), None);
        assert_eq!(relation_of(r#"{"content":{"m.relates_to":"x"}}"#), None);
    }
}
