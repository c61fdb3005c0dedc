//! Storage of push actions: which events notify, and which highlight, which users
//! (written with the event, in `persist_event`), and the unread counts kept from them
//! (`unread_counts`, migration 0024): incremented in the event's transaction
//! (`count_push_actions!`), decremented when a counted event is redacted
//! (`uncount_redacted!`), recomputed when a read receipt moves (`recount_unread!`),
//! dropped when a membership stops being a join (`forget_unread!`), and read by `/sync`
//! (`get_unread_counts`).
//!
//! Rows: thread `""` is the whole room, counted after the latest of the join and every
//! read receipt of the user there; `"main"` the main timeline and a thread root's id
//! that thread, each counted after the latest of the join, the unthreaded receipt and
//! that thread's receipt. `after_pos` is where a row counts from. A recount keeps the
//! `""` and `"main"` rows (at zero too) and the threads' rows that count. Whoever changes a
//! user's rows in a room first writes (and so locks, on PostgreSQL) the user's `""` row
//! there, so that a receipt's recount and an event's increment never interleave.

use std::collections::HashMap;

use super::{Store, live::UnreadRow, on_pool};
use crate::error::Result;

/// Users per statement when counting an event's push actions.
pub(crate) const COUNT_ROWS: usize = 2_000;

/// Counts a new event's push actions (`$actions`, at stream position `$pos`, in thread
/// `$thread`: `Some(root)`, or `None` for the main timeline) in its users' unread
/// counts, in the event's transaction. Each user's `""` row is written (locked) first;
/// a row counts the event only if it is after the row's position. Rows that exist are
/// updated by one statement per scope (the usual case: a receipt's recount keeps the
/// `""` and `"main"` rows, so only a new member's rows and a thread's first rows are
/// missing); a missing row is made with the position the receipts and the membership
/// give (backfilled history is before it: it never counts).
macro_rules! count_push_actions {
    ($tx:expr, $batch:expr, $room:expr, $pos:expr, $thread:expr, $actions:expr) => {{
        let room: &str = $room;
        let pos: i64 = $pos;
        let thread: &str = $thread.unwrap_or("main");
        let actions: &[$crate::storage::PushActionRow] = $actions;
        let mut groups: Vec<(bool, Vec<&str>)> = Vec::with_capacity(2);
        for highlight in [true, false] {
            let mut users: Vec<&str> =
                actions.iter().filter(|a| a.highlight == highlight).map(|a| a.user_id.as_str()).collect();
            users.sort_unstable();
            users.dedup();
            if !users.is_empty() {
                groups.push((highlight, users));
            }
        }
        for scope in ["", thread] {
            for (highlight, users) in &groups {
                let highlight = i64::from(*highlight);
                for chunk in users.chunks($crate::storage::push::COUNT_ROWS) {
                    // On SQLite (one writer) the rows that exist are counted by the update
                    // and the others inserted where none is, both in the batch
                    // (`batch.rs`), without reading which were updated.
                    let together = $batch.together;
                    let mut query = sqlx::QueryBuilder::new("");
                    if together {
                        if $batch.statements > 0 {
                            $batch.query.push(";\n");
                        }
                        $batch.statements += 2;
                    }
                    let query = if together { &mut $batch.query } else { &mut query };
                    query.push("UPDATE unread_counts SET notifs = notifs + CASE WHEN after_pos < ");
                    query.push_bind(pos);
                    query.push(" THEN 1 ELSE 0 END, highlights = highlights + CASE WHEN after_pos < ");
                    query.push_bind(pos);
                    query.push(" THEN ");
                    query.push_bind(highlight);
                    query.push(" ELSE 0 END WHERE room_id = ");
                    query.push_bind(room);
                    query.push(" AND thread_id = ");
                    query.push_bind(scope);
                    query.push(" AND user_id IN (");
                    let mut list = query.separated(", ");
                    for user in chunk {
                        list.push_bind(*user);
                    }
                    // The users without a row are made from the receipts and the membership.
                    // A `""` row may be made meanwhile by a receipt's recount (on
                    // PostgreSQL; it did not see this event): the rows updated here are
                    // returned, and the others are inserted with `ON CONFLICT` counting
                    // the event. A thread's row cannot be (the user's `""` row is locked
                    // by now): the rows that exist are left out of the insert.
                    let missing: Vec<&str> = if together {
                        query.push(");\n");
                        chunk.to_vec()
                    } else if scope.is_empty() {
                        query.push(") RETURNING user_id");
                        let updated: Vec<(String,)> = query.build_query_as().fetch_all(&mut *$tx).await?;
                        if updated.len() >= chunk.len() {
                            continue;
                        }
                        let updated: std::collections::HashSet<&str> = updated.iter().map(|u| u.0.as_str()).collect();
                        chunk.iter().copied().filter(|u| !updated.contains(u)).collect()
                    } else {
                        query.push(")");
                        if query.build().execute(&mut *$tx).await?.rows_affected() >= chunk.len() as u64 {
                            continue;
                        }
                        chunk.to_vec()
                    };
                    let mut insert = sqlx::QueryBuilder::new("");
                    let query = if together { &mut $batch.query } else { &mut insert };
                    query.push(
                        "INSERT INTO unread_counts (user_id, room_id, thread_id, after_pos, notifs, highlights)
                         SELECT user_id, room_id, ",
                    );
                    query.push_bind(scope);
                    if scope.is_empty() {
                        // Every user's row, counting or not: the lock a receipt's recount waits on.
                        query.push(", floor, CASE WHEN floor < ");
                        query.push_bind(pos);
                        query.push(" THEN 1 ELSE 0 END, CASE WHEN floor < ");
                        query.push_bind(pos);
                        query.push(" THEN ");
                        query.push_bind(highlight);
                        query.push(" ELSE 0 END");
                    } else {
                        query.push(", floor, 1, ");
                        query.push_bind(highlight);
                    }
                    query.push(
                        " FROM (SELECT m.user_id, m.room_id, (SELECT MAX(x) FROM (
                             SELECT m.stream_ordering AS x
                             UNION ALL SELECT e.stream_ordering FROM receipts r JOIN events e ON e.event_id = r.event_id
                             WHERE r.room_id = m.room_id AND r.user_id = m.user_id",
                    );
                    if !scope.is_empty() {
                        query.push(" AND r.thread_id IN ('', ");
                        query.push_bind(scope);
                        query.push(")");
                    }
                    query.push(") f) AS floor FROM memberships m WHERE m.room_id = ");
                    query.push_bind(room);
                    query.push(" AND m.user_id IN (");
                    let mut list = query.separated(", ");
                    for user in &missing {
                        list.push_bind(*user);
                    }
                    if !scope.is_empty() || together {
                        query.push(
                            ") AND NOT EXISTS (SELECT 1 FROM unread_counts u
                                 WHERE u.user_id = m.user_id AND u.room_id = m.room_id AND u.thread_id = ",
                        );
                        query.push_bind(scope);
                    }
                    if scope.is_empty() {
                        query.push(
                            ")) w WHERE TRUE
                             ON CONFLICT (user_id, room_id, thread_id) DO UPDATE SET
                             notifs = unread_counts.notifs + CASE WHEN unread_counts.after_pos < ",
                        );
                        query.push_bind(pos);
                        query.push(
                            " THEN 1 ELSE 0 END,
                             highlights = unread_counts.highlights + CASE WHEN unread_counts.after_pos < ",
                        );
                        query.push_bind(pos);
                        query.push(" THEN ");
                        query.push_bind(highlight);
                        query.push(" ELSE 0 END");
                    } else {
                        query.push(")) w WHERE floor < ");
                        query.push_bind(pos);
                        query.push(
                            " ON CONFLICT (user_id, room_id, thread_id) DO UPDATE SET
                             notifs = unread_counts.notifs + 1, highlights = unread_counts.highlights + ",
                        );
                        query.push_bind(highlight);
                        query.push(" WHERE unread_counts.after_pos < ");
                        query.push_bind(pos);
                    }
                    if !together {
                        query.build().execute(&mut *$tx).await?;
                    }
                }
            }
        }
    }};
}
pub(crate) use count_push_actions;

/// Takes event `$target`, just redacted, out of the unread counts that count it (call
/// before its relations go). The `""` rows of all its users are written first (locked).
macro_rules! uncount_redacted {
    ($tx:expr, $target:expr) => {{
        let target: &str = $target;
        let at: Option<(String, Option<i64>)> =
            sqlx::query_as("SELECT room_id, stream_ordering FROM events WHERE event_id = $1")
                .bind(target)
                .fetch_optional(&mut *$tx)
                .await?;
        if let Some((room, Some(pos))) = at {
            let thread: Option<(String,)> =
                sqlx::query_as("SELECT relates_to FROM event_relations WHERE event_id = $1 AND rel_type = 'm.thread'")
                    .bind(target)
                    .fetch_optional(&mut *$tx)
                    .await?;
            let thread = thread.map_or_else(|| "main".to_owned(), |t| t.0);
            for scope in ["", thread.as_str()] {
                sqlx::query(
                    "UPDATE unread_counts SET
                         notifs = notifs - CASE WHEN unread_counts.after_pos < $3 THEN 1 ELSE 0 END,
                         highlights = highlights - CASE WHEN unread_counts.after_pos < $3 THEN p.highlight ELSE 0 END
                     FROM event_push_actions p
                     WHERE unread_counts.room_id = $1 AND unread_counts.thread_id = $2
                       AND ($2 = '' OR unread_counts.after_pos < $3)
                       AND p.user_id = unread_counts.user_id AND p.room_id = $1 AND p.stream_pos = $3",
                )
                .bind(&room)
                .bind(scope)
                .bind(pos)
                .execute(&mut *$tx)
                .await?;
            }
        }
    }};
}
pub(crate) use uncount_redacted;

/// Drops a user's unread counts in a room (the membership stopped being a join: a
/// rejoin counts from the join again).
macro_rules! forget_unread {
    ($tx:expr, $room:expr, $user:expr) => {{
        sqlx::query("DELETE FROM unread_counts WHERE user_id = $1 AND room_id = $2")
            .bind($user)
            .bind($room)
            .execute(&mut *$tx)
            .await?;
    }};
}
pub(crate) use forget_unread;

/// Recounts a user's unread counts in a room from `event_push_actions` after the
/// positions the receipts (as stored in this transaction) and the join give: one
/// counting query bounded by what is after the earliest of them. The user's `""` row
/// is written (locked) first, so that an event's increment waits for the recount or
/// the recount sees it.
macro_rules! recount_unread {
    ($tx:expr, $user:expr, $room:expr) => {{
        let user: &str = $user;
        let room: &str = $room;
        sqlx::query(
            "INSERT INTO unread_counts (user_id, room_id, thread_id, after_pos, notifs, highlights)
             VALUES ($1, $2, '', 0, 0, 0)
             ON CONFLICT (user_id, room_id, thread_id) DO UPDATE SET notifs = unread_counts.notifs",
        )
        .bind(user)
        .bind(room)
        .execute(&mut *$tx)
        .await?;
        sqlx::query("DELETE FROM unread_counts WHERE user_id = $1 AND room_id = $2 AND thread_id <> ''")
            .bind(user)
            .bind(room)
            .execute(&mut *$tx)
            .await?;
        let joined: Option<(i64,)> = sqlx::query_as(
            "SELECT stream_ordering FROM memberships WHERE room_id = $1 AND user_id = $2 AND membership = 'join'",
        )
        .bind(room)
        .bind(user)
        .fetch_optional(&mut *$tx)
        .await?;
        match joined {
            None => $crate::storage::push::forget_unread!($tx, room, user),
            Some((joined,)) => {
                let receipts: Vec<(String, i64)> = sqlx::query_as(
                    "SELECT r.thread_id, MAX(e.stream_ordering) FROM receipts r JOIN events e ON e.event_id = r.event_id
                     WHERE r.room_id = $1 AND r.user_id = $2 AND e.stream_ordering IS NOT NULL GROUP BY r.thread_id",
                )
                .bind(room)
                .bind(user)
                .fetch_all(&mut *$tx)
                .await?;
                let floors = $crate::storage::push::UnreadFloors::new(joined, &receipts);
                // Never an empty VALUES list: a row no thread matches.
                let mut cut_rows: Vec<(&str, i64)> = vec![("", 0)];
                cut_rows.extend(floors.cuts.iter().map(|(t, p)| (t.as_str(), *p)));
                let mut query = sqlx::QueryBuilder::new("WITH cuts (thread, pos) AS (");
                query.push_values(&cut_rows, |mut row, (thread, pos)| {
                    row.push_bind(*thread).push_bind(*pos);
                });
                query.push(
                    ") SELECT t.thread,
                         COALESCE(SUM(CASE WHEN c.pos IS NULL OR t.stream_pos > c.pos THEN 1 ELSE 0 END), 0),
                         COALESCE(SUM(CASE WHEN c.pos IS NULL OR t.stream_pos > c.pos THEN t.highlight ELSE 0 END), 0),
                         COALESCE(SUM(CASE WHEN t.stream_pos > ",
                );
                query.push_bind(floors.room);
                query.push(" THEN 1 ELSE 0 END), 0), COALESCE(SUM(CASE WHEN t.stream_pos > ");
                query.push_bind(floors.room);
                query.push(
                    " THEN t.highlight ELSE 0 END), 0)
                     FROM (SELECT COALESCE(r.relates_to, 'main') AS thread, p.stream_pos, p.highlight
                           FROM event_push_actions p
                           JOIN events e ON e.stream_ordering = p.stream_pos
                           LEFT JOIN event_relations r ON r.event_id = p.event_id AND r.rel_type = 'm.thread'
                           WHERE p.user_id = ",
                );
                query.push_bind(user);
                query.push(" AND p.room_id = ");
                query.push_bind(room);
                query.push(" AND p.stream_pos > ");
                query.push_bind(floors.base);
                query.push(
                    " AND e.redacted_by IS NULL) t
                     LEFT JOIN cuts c ON c.thread = t.thread
                     GROUP BY t.thread",
                );
                let mut rows: Vec<(String, i64, i64, i64, i64)> = query.build_query_as().fetch_all(&mut *$tx).await?;
                let (mut room_n, mut room_h) = (0, 0);
                if !rows.iter().any(|r| r.0 == "main") {
                    // The main timeline's row is kept even at zero: the next event there
                    // updates it rather than making it.
                    rows.push(("main".to_owned(), 0, 0, 0, 0));
                }
                for (thread, n, h, rn, rh) in &rows {
                    room_n += rn;
                    room_h += rh;
                    if *n == 0 && *h == 0 && thread != "main" {
                        continue;
                    }
                    sqlx::query(
                        "INSERT INTO unread_counts (user_id, room_id, thread_id, after_pos, notifs, highlights)
                         VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .bind(user)
                    .bind(room)
                    .bind(thread)
                    .bind(floors.of(thread))
                    .bind(n)
                    .bind(h)
                    .execute(&mut *$tx)
                    .await?;
                }
                sqlx::query(
                    "UPDATE unread_counts SET after_pos = $3, notifs = $4, highlights = $5
                     WHERE user_id = $1 AND room_id = $2 AND thread_id = ''",
                )
                .bind(user)
                .bind(room)
                .bind(floors.room)
                .bind(room_n)
                .bind(room_h)
                .execute(&mut *$tx)
                .await?;
            }
        }
    }};
}
pub(crate) use recount_unread;

/// Where a user's unread counts in a room start: `room` for the whole room (the latest
/// of the join and every receipt), `base` for the main timeline and threads (the latest
/// of the join and the unthreaded receipt), and `cuts` the threads (`"main"` or a root)
/// whose own receipt is later than `base`.
pub(crate) struct UnreadFloors {
    pub room: i64,
    pub base: i64,
    pub cuts: Vec<(String, i64)>,
}

impl UnreadFloors {
    pub(crate) fn new(joined: i64, receipts: &[(String, i64)]) -> Self {
        let room = receipts.iter().map(|(_, p)| *p).fold(joined, i64::max);
        let base = receipts.iter().filter(|(t, _)| t.is_empty()).map(|(_, p)| *p).fold(joined, i64::max);
        let cuts = receipts.iter().filter(|(t, p)| !t.is_empty() && *p > base).map(|(t, p)| (t.clone(), *p)).collect();
        UnreadFloors { room, base, cuts }
    }

    /// Where the row of `thread` (`"main"` or a root) counts from.
    pub(crate) fn of(&self, thread: &str) -> i64 {
        self.cuts.iter().find(|(t, _)| t == thread).map_or(self.base, |(_, p)| *p)
    }
}

impl Store {
    /// A user's kept unread counts in several rooms at once, one indexed query per 500
    /// rooms: (room, thread, notifications, highlights), rows that count only. Thread
    /// `""` (the whole room) when `by_thread` is false; otherwise `"main"` and thread
    /// roots.
    pub async fn get_unread_counts(
        &self,
        user_id: &str,
        room_ids: &[&str],
        by_thread: bool,
    ) -> Result<Vec<(String, String, i64, i64)>> {
        if !by_thread {
            return self.get_room_unread_counts(user_id, room_ids).await;
        }
        let mut counts = Vec::new();
        for chunk in room_ids.chunks(500) {
            let rows: Vec<(String, String, i64, i64)> = on_pool!(self, read, |pool| {
                let mut query = sqlx::QueryBuilder::new(
                    "SELECT room_id, thread_id, notifs, highlights FROM unread_counts WHERE user_id = ",
                );
                query.push_bind(user_id);
                query.push(" AND room_id IN (");
                let mut list = query.separated(", ");
                for id in chunk {
                    list.push_bind(*id);
                }
                query.push(if by_thread { ") AND thread_id <> ''" } else { ") AND thread_id = ''" });
                query.push(" AND (notifs <> 0 OR highlights <> 0)");
                query.build_query_as().fetch_all(pool).await?
            });
            counts.extend(rows);
        }
        Ok(counts)
    }

    /// The `""` rows of `get_unread_counts`, from the rooms' kept counts where they are
    /// kept (`live.rs`), else read (rows that do not count too, and the rooms without
    /// one) and kept.
    async fn get_room_unread_counts(
        &self,
        user_id: &str,
        room_ids: &[&str],
    ) -> Result<Vec<(String, String, i64, i64)>> {
        let noted = self.live.note();
        let (mut known, missing) = self.live.unread(user_id, room_ids);
        for chunk in missing.chunks(500) {
            let rows: Vec<(String, i64, i64, i64)> = on_pool!(self, read, |pool| {
                let mut query = sqlx::QueryBuilder::new(
                    "SELECT room_id, after_pos, notifs, highlights FROM unread_counts WHERE user_id = ",
                );
                query.push_bind(user_id);
                query.push(" AND thread_id = '' AND room_id IN (");
                let mut list = query.separated(", ");
                for id in chunk {
                    list.push_bind(id.as_str());
                }
                query.push(")");
                query.build_query_as().fetch_all(pool).await?
            });
            let mut rows: HashMap<String, UnreadRow> = rows
                .into_iter()
                .map(|(room, after_pos, notifs, highlights)| (room, UnreadRow { after_pos, notifs, highlights }))
                .collect();
            for room in chunk {
                let row = rows.remove(room);
                self.live.keep_unread(user_id, room, row, noted);
                known.push((room.clone(), row));
            }
        }
        Ok(known
            .into_iter()
            .filter_map(|(room, row)| row.filter(|r| r.notifs != 0 || r.highlights != 0).map(|r| (room, r)))
            .map(|(room, r)| (room, String::new(), r.notifs, r.highlights))
            .collect())
    }

    /// Fills `unread_counts` for data stored before migration 0024, once (recorded as
    /// `unread_counts` in `server_info`), at start: every joined user with push actions
    /// in a room is recounted there, in one transaction.
    pub(crate) async fn fill_unread_counts(&self) -> Result<()> {
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            let done: Option<(String,)> = sqlx::query_as("SELECT value FROM server_info WHERE key = 'unread_counts'")
                .fetch_optional(&mut *tx)
                .await?;
            if done.is_some() {
                return Ok(());
            }
            let pairs: Vec<(String, String)> = sqlx::query_as(
                "SELECT m.user_id, m.room_id FROM memberships m WHERE m.membership = 'join' AND EXISTS (
                     SELECT 1 FROM event_push_actions p WHERE p.user_id = m.user_id AND p.room_id = m.room_id)",
            )
            .fetch_all(&mut *tx)
            .await?;
            for (user, room) in &pairs {
                recount_unread!(tx, user, room);
            }
            sqlx::query("INSERT INTO server_info (key, value) VALUES ('unread_counts', 'filled')")
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        })
    }
}
