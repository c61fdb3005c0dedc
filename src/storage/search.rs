//! The search index (`event_search`, migration 0022): which events are searchable and
//! their text, written in the event's own transaction (`persist.rs`, through
//! `index_for_search!`) and deleted when the event is redacted (`unindex_for_search!`);
//! the full-text index over it, whose SQL is the one part that differs between the
//! backends (an FTS5 table kept by triggers on SQLite, a generated `tsvector` column
//! with a GIN index on PostgreSQL), made at start; and `search_events`, one query for a
//! page of matches in the stretches of rooms a user may see, and one for their count.
//!
//! Both backends see the same words: the FTS5 tokenizer (`unicode61`) splits on
//! anything that is not a letter or a digit, and PostgreSQL's text is indexed with ASCII
//! punctuation turned into spaces (its parser would otherwise keep `example.com` or
//! `well-known` whole). A query is a list of words, each matched as a prefix, all
//! required; it is built here from words only, so no search term can reach either
//! backend's query syntax.

use super::{Dialect, Store, on_pool};
use crate::error::{Error, Result};

/// The searchable keys: (event type, key, content field).
pub const SEARCH_KEYS: [(&str, &str, &str); 3] = [
    ("m.room.message", "content.body", "body"),
    ("m.room.name", "content.name", "name"),
    ("m.room.topic", "content.topic", "topic"),
];

/// The searchable text of an event, if it has one: (key, text). Only the three
/// searchable types are parsed.
pub fn searchable_text(event_type: &str, json: &str) -> Option<(&'static str, String)> {
    let (_, key, field) = SEARCH_KEYS.iter().find(|(t, _, _)| *t == event_type)?;
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    let text = value.get("content")?.get(*field)?.as_str()?;
    (!text.trim().is_empty()).then(|| (*key, text.to_owned()))
}

/// Adds event `$e` (a `NewEvent`), stored at stream position `$pos`, to the search
/// index if it has searchable text. One statement; the full-text index follows (a
/// trigger on SQLite, a generated column on PostgreSQL).
macro_rules! index_for_search {
    ($tx:expr, $batch:expr, $e:expr, $pos:expr) => {{
        let e: &NewEvent<'_> = $e;
        if let Some((key, text)) = $crate::storage::search::searchable_text(e.event_type, e.json) {
            $crate::storage::batch::batched!($tx, $batch, |query: &mut sqlx::QueryBuilder<_>| {
                query.push(
                    "INSERT INTO event_search (event_id, stream_ordering, room_id, sender, search_key, value) VALUES (",
                );
                let mut values = query.separated(", ");
                values.push_bind(e.event_id).push_bind($pos).push_bind(e.room_id).push_bind(e.sender);
                values.push_bind(key).push_bind(text);
                query.push(") ON CONFLICT DO NOTHING");
            });
        }
    }};
}
pub(crate) use index_for_search;

/// Takes event `$id` out of the search index (it was redacted).
macro_rules! unindex_for_search {
    ($tx:expr, $id:expr) => {{
        sqlx::query("DELETE FROM event_search WHERE event_id = $1").bind($id).execute(&mut *$tx).await?;
    }};
}
pub(crate) use unindex_for_search;

/// The order of search results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SearchOrder {
    /// Best match first (then the newest).
    Rank,
    /// Newest first.
    Recent,
}

/// One search: the words, where to look, and which page.
pub struct SearchQuery<'a> {
    /// The words, each matched as a prefix, all required (letters and digits only).
    pub words: &'a [String],
    /// (room, after, up to): the stretches `(after, up_to]` of each room's stream the
    /// user may see.
    pub ranges: &'a [(String, i64, i64)],
    /// Searchable keys (`content.body`, ...).
    pub keys: &'a [&'a str],
    pub senders: Option<&'a [String]>,
    pub not_senders: &'a [String],
    pub order: SearchOrder,
    /// Recent order: only events before this stream position.
    pub before: Option<i64>,
    /// Rank order: matches skipped.
    pub offset: i64,
    pub limit: i64,
}

/// One match.
#[derive(Debug, sqlx::FromRow)]
pub struct SearchHit {
    pub event_id: String,
    pub room_id: String,
    pub stream_ordering: i64,
    /// Higher is closer.
    pub rank: f64,
    pub value: String,
}

/// Most (room, stretch) rows one search passes (3 values each, under SQLite's 32,766).
pub const MAX_SEARCH_RANGES: usize = 5_000;

/// The FTS5 match expression: each word as a quoted string and a prefix.
fn fts5_match(words: &[String]) -> String {
    words.iter().map(|w| format!("\"{}\"*", w.replace('"', "\"\""))).collect::<Vec<_>>().join(" ")
}

/// The `to_tsquery` text: each word quoted and a prefix, all required.
fn tsquery_text(words: &[String]) -> String {
    words.iter().map(|w| format!("'{}':*", w.replace('\\', "").replace('\'', "''"))).collect::<Vec<_>>().join(" & ")
}

/// What a search statement answers: a page of matches, or how many there are.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Answer {
    Page,
    Count,
}

/// Writes a search statement. The stretches the user may see are a `VALUES` list
/// (`r`). On SQLite FTS5 drives the loop (`CROSS JOIN` keeps SQLite's order), newest
/// first by rowid (the stream position), so a recent-order page stops early. On
/// PostgreSQL the matches are taken once from the GIN index (`m`, materialized: the
/// planner would otherwise also scan the room's rows for each stretch) and then kept
/// to the stretches.
fn push_search<DB: sqlx::Database>(
    query: &mut sqlx::QueryBuilder<DB>,
    q: &SearchQuery<'_>,
    answer: Answer,
    dialect: Dialect,
) where
    String: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    i64: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    query.push("WITH r(room_id, lo, hi) AS (VALUES ");
    for (i, (room, lo, hi)) in q.ranges.iter().enumerate() {
        query.push(if i == 0 { "(" } else { ", (" });
        query.push_bind(room.clone());
        query.push(", ");
        query.push_bind(*lo);
        query.push(", ");
        query.push_bind(*hi);
        query.push(")");
    }
    query.push(")");
    let before = if answer == Answer::Page { q.before } else { None };
    match dialect {
        Dialect::Sqlite => {
            query.push(match answer {
                Answer::Page => {
                    " SELECT s.event_id, s.room_id, s.stream_ordering, -event_search_fts.rank AS rank, s.value"
                }
                Answer::Count => " SELECT COUNT(*)",
            });
            query.push(" FROM event_search_fts CROSS JOIN event_search s CROSS JOIN r WHERE event_search_fts MATCH ");
            query.push_bind(fts5_match(q.words));
            query.push(" AND s.stream_ordering = event_search_fts.rowid");
            push_conditions(query, q, before);
            query.push(" AND r.room_id = s.room_id AND s.stream_ordering > r.lo AND s.stream_ordering <= r.hi");
        }
        Dialect::Postgres => {
            query.push(
                ", m AS MATERIALIZED (SELECT s.event_id, s.room_id, s.stream_ordering, s.value,
                     CAST(ts_rank(s.vector, t.query) AS DOUBLE PRECISION) AS rank
                 FROM event_search s, (SELECT to_tsquery('simple', ",
            );
            query.push_bind(tsquery_text(q.words));
            query.push(") AS query) t WHERE s.vector @@ t.query");
            push_conditions(query, q, before);
            query.push(")");
            query.push(match answer {
                Answer::Page => " SELECT s.event_id, s.room_id, s.stream_ordering, s.rank, s.value",
                Answer::Count => " SELECT COUNT(*)",
            });
            query.push(
                " FROM m s JOIN r ON r.room_id = s.room_id AND s.stream_ordering > r.lo AND s.stream_ordering <= r.hi",
            );
        }
    }
    if answer == Answer::Count {
        return;
    }
    query.push(match (q.order, dialect) {
        (SearchOrder::Recent, Dialect::Sqlite) => " ORDER BY event_search_fts.rowid DESC",
        (SearchOrder::Rank, Dialect::Sqlite) => " ORDER BY event_search_fts.rank, s.stream_ordering DESC",
        (SearchOrder::Recent, Dialect::Postgres) => " ORDER BY s.stream_ordering DESC",
        (SearchOrder::Rank, Dialect::Postgres) => " ORDER BY s.rank DESC, s.stream_ordering DESC",
    });
    query.push(" LIMIT ");
    query.push_bind(q.limit);
    query.push(" OFFSET ");
    query.push_bind(q.offset);
}

/// The conditions on an `event_search s` row: keys, senders, and (recent order) before.
fn push_conditions<DB: sqlx::Database>(query: &mut sqlx::QueryBuilder<DB>, q: &SearchQuery<'_>, before: Option<i64>)
where
    String: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    i64: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    query.push(" AND s.search_key IN (");
    let mut keys = query.separated(", ");
    for key in q.keys {
        keys.push_bind((*key).to_owned());
    }
    query.push(")");
    if let Some(senders) = q.senders {
        query.push(" AND s.sender IN (");
        let mut list = query.separated(", ");
        for sender in senders {
            list.push_bind(sender.clone());
        }
        query.push(")");
    }
    if !q.not_senders.is_empty() {
        query.push(" AND s.sender NOT IN (");
        let mut list = query.separated(", ");
        for sender in q.not_senders {
            list.push_bind(sender.clone());
        }
        query.push(")");
    }
    if let Some(before) = before {
        query.push(" AND s.stream_ordering < ");
        query.push_bind(before);
    }
}

impl Store {
    /// A page of matches of a search, in its order, and how many there are in all.
    /// Nothing is read when there are no words or no stretches to look in.
    pub async fn search_events(&self, q: &SearchQuery<'_>) -> Result<(Vec<SearchHit>, i64)> {
        if q.words.is_empty() || q.ranges.is_empty() || q.keys.is_empty() || q.limit <= 0 {
            return Ok((Vec::new(), 0));
        }
        if q.ranges.len() > MAX_SEARCH_RANGES {
            return Err(Error::internal("too many rooms to search at once"));
        }
        let dialect = self.dialect();
        on_pool!(self, read, |pool| {
            let mut page = sqlx::QueryBuilder::new("");
            push_search(&mut page, q, Answer::Page, dialect);
            let hits: Vec<SearchHit> = page.build_query_as().fetch_all(pool).await?;
            let mut count = sqlx::QueryBuilder::new("");
            push_search(&mut count, q, Answer::Count, dialect);
            let (total,): (i64,) = count.build_query_as().fetch_one(pool).await?;
            Ok((hits, total))
        })
    }
}

impl Store {
    /// Makes the full-text index over `event_search` (idempotent: run at every start)
    /// and, once, fills `event_search` from the events stored before migration 0022
    /// (recorded as `event_search` in `server_info`), in pages of 1,000 events, in one
    /// transaction.
    pub(crate) async fn ensure_search_index(&self) -> Result<()> {
        let ddl: &[&'static str] = match self.dialect() {
            Dialect::Sqlite => &[
                "CREATE VIRTUAL TABLE IF NOT EXISTS event_search_fts USING fts5(value, content='',
                     contentless_delete=1, tokenize='unicode61 remove_diacritics 0')",
                "CREATE TRIGGER IF NOT EXISTS event_search_fts_insert AFTER INSERT ON event_search BEGIN
                     INSERT INTO event_search_fts (rowid, value) VALUES (new.stream_ordering, new.value); END",
                "CREATE TRIGGER IF NOT EXISTS event_search_fts_delete AFTER DELETE ON event_search BEGIN
                     DELETE FROM event_search_fts WHERE rowid = old.stream_ordering; END",
            ],
            Dialect::Postgres => &[
                "ALTER TABLE event_search ADD COLUMN IF NOT EXISTS vector tsvector GENERATED ALWAYS AS
                     (to_tsvector('simple', regexp_replace(value, '[[:punct:]]+', ' ', 'g'))) STORED",
                "CREATE INDEX IF NOT EXISTS event_search_vector ON event_search USING GIN (vector)",
            ],
        };
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            for statement in ddl {
                sqlx::query(*statement).execute(&mut *tx).await?;
            }
            let done: Option<(String,)> = sqlx::query_as("SELECT value FROM server_info WHERE key = 'event_search'")
                .fetch_optional(&mut *tx)
                .await?;
            if done.is_none() {
                let mut after = i64::MIN;
                loop {
                    let page: Vec<(String, i64, String, String, String, String)> = sqlx::query_as(
                        "SELECT event_id, stream_ordering, room_id, sender, event_type, json FROM events
                         WHERE stream_ordering > $1 AND event_type IN ('m.room.message', 'm.room.name', 'm.room.topic')
                           AND rejected_reason IS NULL AND NOT soft_failed AND redacted_by IS NULL
                         ORDER BY stream_ordering LIMIT 1000",
                    )
                    .bind(after)
                    .fetch_all(&mut *tx)
                    .await?;
                    let Some(last) = page.last() else { break };
                    after = last.1;
                    let rows: Vec<_> = page
                        .iter()
                        .filter_map(|(id, pos, room, sender, event_type, json)| {
                            searchable_text(event_type, json).map(|(key, text)| (id, pos, room, sender, key, text))
                        })
                        .collect();
                    if rows.is_empty() {
                        continue;
                    }
                    let mut insert = sqlx::QueryBuilder::new(
                        "INSERT INTO event_search (event_id, stream_ordering, room_id, sender, search_key, value) ",
                    );
                    insert.push_values(rows, |mut row, (id, pos, room, sender, key, text)| {
                        row.push_bind(id.clone())
                            .push_bind(*pos)
                            .push_bind(room.clone())
                            .push_bind(sender.clone())
                            .push_bind(key)
                            .push_bind(text);
                    });
                    insert.push(" ON CONFLICT DO NOTHING");
                    insert.build().execute(&mut *tx).await?;
                }
                sqlx::query("INSERT INTO server_info (key, value) VALUES ('event_search', 'filled')")
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_searchable_keys_have_text() {
        let message = r#"{"type":"m.room.message","content":{"msgtype":"m.text","body":"hello there"}}"#;
        assert_eq!(searchable_text("m.room.message", message), Some(("content.body", "hello there".to_owned())));
        assert_eq!(
            searchable_text("m.room.topic", r#"{"content":{"topic":"cats"}}"#),
            Some(("content.topic", "cats".to_owned()))
        );
        // Encrypted, redacted (no body), non-string and blank bodies are not indexed.
        assert_eq!(searchable_text("m.room.encrypted", r#"{"content":{"ciphertext":"x","body":"x"}}"#), None);
        assert_eq!(searchable_text("m.room.message", r#"{"content":{}}"#), None);
        assert_eq!(searchable_text("m.room.message", r#"{"content":{"body":42}}"#), None);
        assert_eq!(searchable_text("m.room.message", r#"{"content":{"body":"  "}}"#), None);
        assert_eq!(searchable_text("m.room.message", "not json"), None);
    }

    #[test]
    fn queries_are_built_from_words_only() {
        let words = vec!["hel\"lo".to_owned(), "it's".to_owned()];
        assert_eq!(fts5_match(&words), r#""hel""lo"* "it's"*"#);
        assert_eq!(tsquery_text(&words), "'hel\"lo':* & 'it''s':*");
    }
}
