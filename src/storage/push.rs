//! Storage of push actions: which events notify, and which highlight, which users
//! (written with the event, in `persist_event`: a template row per template whose
//! members' shared answer notifies, `insert_push_group!`, and rows of their own for the
//! others, migration 0030), the spans that say which template counts for whom
//! (`move_push_spans!`, `close_push_span!`), and the unread counts kept from them
//! (`unread_counts`, migration 0024): their own part incremented in the event's
//! transaction (`count_push_actions!`) and their template's part followed through its
//! cumulative counts, decremented when a counted event is redacted
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

/// Appends to `$query` (after its select list) the rows `(user_id, room_id, floor)` of
/// `$users` joined to `$room` (one whose membership ended with the event being stored
/// gets no row back): `floor` is where a new row of theirs in `$scope` counts
/// from (the latest of their join and their receipts there: all receipts for `""`,
/// unthreaded and that thread's for a thread). Leaves the user list open.
macro_rules! push_floors {
    ($query:expr, $scope:expr, $room:expr, $users:expr) => {{
        let scope: &str = $scope;
        $query.push(
            " FROM (SELECT m.user_id, m.room_id, (SELECT MAX(x) FROM (
                 SELECT m.stream_ordering AS x
                 UNION ALL SELECT e.stream_ordering FROM receipts r JOIN events e ON e.event_id = r.event_id
                 WHERE r.room_id = m.room_id AND r.user_id = m.user_id",
        );
        if !scope.is_empty() {
            $query.push(" AND r.thread_id IN ('', ");
            $query.push_bind(scope);
            $query.push(")");
        }
        $query.push(") f) AS floor FROM memberships m WHERE m.room_id = ");
        $query.push_bind($room);
        $query.push(" AND m.membership = 'join' AND m.user_id IN (");
        let mut list = $query.separated(", ");
        for user in $users {
            list.push_bind(*user);
        }
    }};
}
pub(crate) use push_floors;

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
        // Users by what their rows add (`PushActionRow::delta`): the usual (1, 0) and
        // (1, 1), and the rarer answers that differ from their group's.
        let mut groups: Vec<((i64, i64), Vec<&str>)> = Vec::with_capacity(2);
        for a in actions {
            let delta = a.delta();
            if delta == (0, 0) {
                continue;
            }
            match groups.iter_mut().find(|(d, _)| *d == delta) {
                Some((_, users)) => users.push(a.user_id.as_str()),
                None => groups.push((delta, vec![a.user_id.as_str()])),
            }
        }
        for (_, users) in &mut groups {
            users.sort_unstable();
            users.dedup();
        }
        for scope in ["", thread] {
            for ((notifs, highlight), users) in &groups {
                let (notifs, highlight) = (*notifs, *highlight);
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
                    query.push(" THEN ");
                    query.push_bind(notifs);
                    query.push(" ELSE 0 END, highlights = highlights + CASE WHEN after_pos < ");
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
                        query.push(" THEN ");
                        query.push_bind(notifs);
                        query.push(" ELSE 0 END, CASE WHEN floor < ");
                        query.push_bind(pos);
                        query.push(" THEN ");
                        query.push_bind(highlight);
                        query.push(" ELSE 0 END");
                    } else {
                        query.push(", floor, ");
                        query.push_bind(notifs);
                        query.push(", ");
                        query.push_bind(highlight);
                    }
                    $crate::storage::push::push_floors!(query, scope, room, &missing);
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
                        query.push(" THEN ");
                        query.push_bind(notifs);
                        query.push(
                            " ELSE 0 END,
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
                             notifs = unread_counts.notifs + ",
                        );
                        query.push_bind(notifs);
                        query.push(", highlights = unread_counts.highlights + ");
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
                // Members with a row of their own: the event counted as their own answer.
                sqlx::query(
                    "UPDATE unread_counts SET
                         notifs = notifs - CASE WHEN unread_counts.after_pos < $3 THEN p.notifies ELSE 0 END,
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
                // The others, through their template's row: the cumulative counts keep
                // it, so it comes off the stored count of each member it counted for
                // (joined with that template then, and after their row's position).
                sqlx::query(
                    "UPDATE unread_counts SET notifs = notifs - 1, highlights = highlights - g.highlight
                     FROM push_groups g
                     WHERE g.stream_pos = $3 AND g.room_id = $1
                       AND unread_counts.room_id = $1 AND unread_counts.thread_id = $2
                       AND unread_counts.after_pos < $3
                       AND EXISTS (SELECT 1 FROM push_spans s WHERE s.user_id = unread_counts.user_id
                           AND s.room_id = $1 AND s.template = g.template AND s.from_pos < $3
                           AND (s.to_pos IS NULL OR s.to_pos > $3))
                       AND NOT EXISTS (SELECT 1 FROM event_push_actions p
                           WHERE p.user_id = unread_counts.user_id AND p.stream_pos = $3)",
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

/// Writes an event's row for a template (`PushGroupRow`), with the template's cumulative
/// counts in the room up to it (the room's events are written in position order, under
/// the room's lock).
macro_rules! insert_push_group {
    ($tx:expr, $batch:expr, $room:expr, $pos:expr, $event:expr, $group:expr) => {{
        let group: &$crate::storage::PushGroupRow = $group;
        let room: &str = $room;
        let pos: i64 = $pos;
        $crate::storage::batch::batched!($tx, $batch, |query: &mut sqlx::QueryBuilder<_>| {
            query.push(
                "INSERT INTO push_groups (room_id, template, stream_pos, event_id, highlight, actions,
                     cum_notifs, cum_highlights) SELECT ",
            );
            let mut values = query.separated(", ");
            values.push_bind(room);
            values.push_bind(group.template);
            values.push_bind(pos);
            values.push_bind($event);
            values.push_bind(i32::from(group.highlight));
            values.push_bind(&group.actions);
            for (column, add) in [("cum_notifs", 1), ("cum_highlights", i64::from(group.highlight))] {
                values.push("COALESCE((SELECT ");
                values.push_unseparated(column);
                values.push_unseparated(" FROM push_groups WHERE room_id = ");
                values.push_bind_unseparated(room);
                values.push_unseparated(" AND template = ");
                values.push_bind_unseparated(group.template);
                values.push_unseparated(" ORDER BY stream_pos DESC LIMIT 1), 0) + ");
                values.push_bind_unseparated(add);
            }
        });
    }};
}
pub(crate) use insert_push_group;

/// Closes a member's open span in a room after position `$at` (the membership ended
/// there: the event itself was evaluated for them as a member).
macro_rules! close_push_span {
    ($tx:expr, $room:expr, $user:expr, $at:expr) => {{
        let at: i64 = $at;
        sqlx::query("UPDATE push_spans SET to_pos = $3 WHERE user_id = $1 AND room_id = $2 AND to_pos IS NULL")
            .bind($user)
            .bind($room)
            .bind(at + 1)
            .execute(&mut *$tx)
            .await?;
    }};
}
pub(crate) use close_push_span;

/// The members of `$changes` change template in the room at position `$pos` (after the
/// event's own rows were counted): each one's open span closes and one opens with the
/// new template; their `""` and `"main"` rows are made if missing (from the receipts and
/// the membership, as `count_push_actions!` does), take in what the old template's
/// rows counted since their base, and start from the new template's counts now.
macro_rules! move_push_spans {
    ($tx:expr, $room:expr, $pos:expr, $changes:expr) => {{
        let room: &str = $room;
        let pos: i64 = $pos;
        let changes: &[$crate::storage::SpanChange] = $changes;
        let mut by_template: Vec<(Option<i64>, Vec<&str>)> = Vec::new();
        for change in changes {
            match by_template.iter_mut().find(|(t, _)| *t == change.template) {
                Some((_, users)) => users.push(change.user_id.as_str()),
                None => by_template.push((change.template, vec![change.user_id.as_str()])),
            }
        }
        for (template, users) in &by_template {
            let template: Option<i64> = *template;
            for chunk in users.chunks($crate::storage::push::COUNT_ROWS) {
                // The old span still answers for this event (the event's own rows were
                // written against it); the new one from the next.
                let mut query = sqlx::QueryBuilder::new("UPDATE push_spans SET to_pos = ");
                query.push_bind(pos + 1);
                query.push(" WHERE room_id = ");
                query.push_bind(room);
                query.push(" AND to_pos IS NULL AND user_id IN (");
                let mut list = query.separated(", ");
                for user in chunk {
                    list.push_bind(*user);
                }
                query.push(")");
                query.build().execute(&mut *$tx).await?;
                if let Some(template) = template {
                    let mut query =
                        sqlx::QueryBuilder::new("INSERT INTO push_spans (user_id, room_id, template, from_pos) ");
                    query.push_values(chunk, |mut row, user| {
                        row.push_bind(*user).push_bind(room).push_bind(template).push_bind(pos);
                    });
                    query.push(" ON CONFLICT DO NOTHING");
                    query.build().execute(&mut *$tx).await?;
                }
                for scope in ["", "main"] {
                    let mut query = sqlx::QueryBuilder::new(
                        "INSERT INTO unread_counts (user_id, room_id, thread_id, after_pos, notifs, highlights)
                         SELECT user_id, room_id, ",
                    );
                    query.push_bind(scope);
                    query.push(", floor, 0, 0");
                    $crate::storage::push::push_floors!(query, scope, room, chunk);
                    query.push(")) w WHERE TRUE ON CONFLICT (user_id, room_id, thread_id) DO NOTHING");
                    query.build().execute(&mut *$tx).await?;
                }
                let mut query = sqlx::QueryBuilder::new("UPDATE unread_counts SET ");
                for (column, base, cum) in
                    [("notifs", "base_notifs", "cum_notifs"), ("highlights", "base_highlights", "cum_highlights")]
                {
                    query.push(format!(
                        "{column} = {column} + COALESCE((SELECT g.{cum} FROM push_groups g
                             WHERE g.room_id = unread_counts.room_id AND g.template = unread_counts.template
                             ORDER BY g.stream_pos DESC LIMIT 1) - {base}, 0), "
                    ));
                    query.push(format!("{base} = COALESCE((SELECT {cum} FROM push_groups WHERE room_id = "));
                    query.push_bind(room);
                    query.push(" AND template = ");
                    query.push_bind(template);
                    query.push(" ORDER BY stream_pos DESC LIMIT 1), 0), ");
                }
                query.push("template = ");
                query.push_bind(template);
                query.push(" WHERE room_id = ");
                query.push_bind(room);
                query.push(" AND thread_id IN ('', 'main') AND user_id IN (");
                let mut list = query.separated(", ");
                for user in chunk {
                    list.push_bind(*user);
                }
                query.push(")");
                query.build().execute(&mut *$tx).await?;
            }
        }
    }};
}
pub(crate) use move_push_spans;

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
                // The template the member follows now, and its counts: its rows up to
                // these are counted below, the later ones (committing meanwhile, on
                // PostgreSQL) through the base.
                let open: Option<(i64, i64, i64, i64)> = sqlx::query_as(
                    "SELECT s.template, COALESCE(g.stream_pos, -1), COALESCE(g.cum_notifs, 0),
                         COALESCE(g.cum_highlights, 0)
                     FROM push_spans s LEFT JOIN push_groups g ON g.room_id = s.room_id AND g.template = s.template
                         AND g.stream_pos = (SELECT MAX(x.stream_pos) FROM push_groups x
                             WHERE x.room_id = s.room_id AND x.template = s.template)
                     WHERE s.user_id = $1 AND s.room_id = $2 AND s.to_pos IS NULL",
                )
                .bind(user)
                .bind(room)
                .fetch_optional(&mut *$tx)
                .await?;
                let (template, upto, base_n, base_h) = match open {
                    Some((t, upto, n, h)) => (Some(t), upto, n, h),
                    None => (None, -1, 0, 0),
                };
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
                // The template rows of the member's spans (main timeline only) where they
                // have no row of their own.
                query.push(format!(
                    " AND p.notifies = 1 AND e.redacted_by IS NULL
                     UNION ALL SELECT 'main', g.stream_pos, g.highlight
                           FROM {}
                           JOIN events e ON e.stream_ordering = g.stream_pos
                           WHERE s.user_id = ",
                    $crate::storage::push::SPAN_ROWS
                ));
                query.push_bind(user);
                query.push(" AND s.room_id = ");
                query.push_bind(room);
                query.push(" AND g.stream_pos > ");
                query.push_bind(floors.base);
                query.push(" AND (s.to_pos IS NOT NULL OR g.stream_pos <= ");
                query.push_bind(upto);
                query.push(
                    ") AND e.redacted_by IS NULL
                           AND NOT EXISTS (SELECT 1 FROM event_push_actions o
                               WHERE o.user_id = s.user_id AND o.stream_pos = g.stream_pos)) t
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
                    // The main timeline's row follows the template; a thread's never does.
                    let (template, base_n, base_h) =
                        if thread == "main" { (template, base_n, base_h) } else { (None, 0, 0) };
                    sqlx::query(
                        "INSERT INTO unread_counts (user_id, room_id, thread_id, after_pos, notifs, highlights,
                             template, base_notifs, base_highlights)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    )
                    .bind(user)
                    .bind(room)
                    .bind(thread)
                    .bind(floors.of(thread))
                    .bind(n)
                    .bind(h)
                    .bind(template)
                    .bind(base_n)
                    .bind(base_h)
                    .execute(&mut *$tx)
                    .await?;
                }
                sqlx::query(
                    "UPDATE unread_counts SET after_pos = $3, notifs = $4, highlights = $5, template = $6,
                         base_notifs = $7, base_highlights = $8
                     WHERE user_id = $1 AND room_id = $2 AND thread_id = ''",
                )
                .bind(user)
                .bind(room)
                .bind(floors.room)
                .bind(room_n)
                .bind(room_h)
                .bind(template)
                .bind(base_n)
                .bind(base_h)
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

/// The latest cumulative counts of the template a row of `unread_counts u` follows
/// (NULL when it follows none, or its template has no row yet). What the template's
/// rows counted for the row since its base is `COALESCE(latest - u.base_*, 0)`.
pub(super) const LATEST_NOTIFS: &str = "(SELECT g.cum_notifs FROM push_groups g WHERE g.room_id = u.room_id
    AND g.template = u.template ORDER BY g.stream_pos DESC LIMIT 1)";
const LATEST_HIGHLIGHTS: &str = "(SELECT g.cum_highlights FROM push_groups g WHERE g.room_id = u.room_id
    AND g.template = u.template ORDER BY g.stream_pos DESC LIMIT 1)";

/// The template rows that count for the members of their spans: span `s` and each
/// template row `g` of its template in its room after its start and before its end.
/// A member's own row for the same event (`event_push_actions`) answers instead.
pub(super) const SPAN_ROWS: &str = "push_spans s JOIN push_groups g ON g.room_id = s.room_id
    AND g.template = s.template AND g.stream_pos > s.from_pos AND (s.to_pos IS NULL OR g.stream_pos < s.to_pos)";

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
                let mut query = sqlx::QueryBuilder::new(format!(
                    "SELECT room_id, thread_id, n, h FROM (SELECT u.room_id, u.thread_id,
                         u.notifs + COALESCE({LATEST_NOTIFS} - u.base_notifs, 0) AS n,
                         u.highlights + COALESCE({LATEST_HIGHLIGHTS} - u.base_highlights, 0) AS h
                     FROM unread_counts u WHERE u.user_id = "
                ));
                query.push_bind(user_id);
                query.push(" AND u.room_id IN (");
                let mut list = query.separated(", ");
                for id in chunk {
                    list.push_bind(*id);
                }
                query.push(") AND u.thread_id <> '') c WHERE n <> 0 OR h <> 0");
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
            type Row = (String, i64, i64, i64, Option<i64>, i64, i64, Option<i64>, Option<i64>);
            let rows: Vec<Row> = on_pool!(self, read, |pool| {
                let mut query = sqlx::QueryBuilder::new(format!(
                    "SELECT room_id, after_pos, notifs, highlights, template, base_notifs, base_highlights,
                         {LATEST_NOTIFS}, {LATEST_HIGHLIGHTS}
                     FROM unread_counts u WHERE user_id = "
                ));
                query.push_bind(user_id);
                query.push(" AND thread_id = '' AND room_id IN (");
                let mut list = query.separated(", ");
                for id in chunk {
                    list.push_bind(id.as_str());
                }
                query.push(")");
                query.build_query_as().fetch_all(pool).await?
            });
            let mut rows: HashMap<String, (UnreadRow, Option<(i64, i64)>)> = rows
                .into_iter()
                .map(|(room, after_pos, notifs, highlights, template, base_notifs, base_highlights, gn, gh)| {
                    let row = UnreadRow { after_pos, notifs, highlights, template, base_notifs, base_highlights };
                    (room, (row, template.map(|_| (gn.unwrap_or(0), gh.unwrap_or(0)))))
                })
                .collect();
            for room in chunk {
                let row = rows.remove(room);
                self.live.keep_unread(user_id, room, row.map(|r| r.0), row.and_then(|r| r.1), noted);
                known.push((room.clone(), row.map(|(row, group)| row.counts(group.unwrap_or((0, 0))))));
            }
        }
        Ok(known
            .into_iter()
            .filter_map(|(room, counts)| counts.filter(|c| *c != (0, 0)).map(|c| (room, c)))
            .map(|(room, (notifs, highlights))| (room, String::new(), notifs, highlights))
            .collect())
    }

    /// The open spans of a room's members: (user, template).
    pub async fn get_open_push_spans(&self, room_id: &str) -> Result<Vec<(String, i64)>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as("SELECT user_id, template FROM push_spans WHERE room_id = $1 AND to_pos IS NULL")
                .bind(room_id)
                .fetch_all(pool)
                .await?)
        })
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
                "SELECT m.user_id, m.room_id FROM memberships m WHERE m.membership = 'join' AND (EXISTS (
                     SELECT 1 FROM event_push_actions p WHERE p.user_id = m.user_id AND p.room_id = m.room_id)
                     OR EXISTS (SELECT 1 FROM push_spans s WHERE s.user_id = m.user_id AND s.room_id = m.room_id))",
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
