//! Storage of pushers (`POST /pushers/set`), of the push queue the HTTP pusher sends
//! from (`service/push_sender.rs`: rows written in the notifying event's own transaction,
//! by `persist_event`), and the reads of `/notifications` and of a push's badge count.

use super::{
    Store, on_pool,
    push::{LATEST_NOTIFS, SPAN_ROWS},
    users::lock_user,
};
use crate::error::Result;

/// A local member's own answer to an event, stored with it (`event_push_actions`): the
/// event singles them out, their rules are their own, or their template changes with
/// it (see `PushOutcome`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushActionRow {
    pub user_id: String,
    /// The event notifies them (a row that does not only takes the group's answer back).
    pub notifies: bool,
    /// The actions set the `highlight` tweak.
    pub highlight: bool,
    /// The actions of the push rule that matched, as a JSON array.
    pub actions: String,
    /// What their template's group row (`PushGroupRow`) counted for them at this event:
    /// whether it notified, and highlighted.
    pub group_notifs: bool,
    pub group_highlight: bool,
}

impl PushActionRow {
    /// What the row adds to the member's counts beyond the group's: notifications and
    /// highlights.
    pub fn delta(&self) -> (i64, i64) {
        (
            i64::from(self.notifies) - i64::from(self.group_notifs),
            i64::from(self.highlight) - i64::from(self.group_highlight),
        )
    }
}

/// The answer a template's members get from an event that does not single them out,
/// when it notifies: one row (`push_groups`) for all of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushGroupRow {
    /// The template's key (a hash of its JSON: stable across restarts).
    pub template: i64,
    pub highlight: bool,
    pub actions: String,
}

/// A member whose template in the room changes with an event (`push_spans`): their
/// span closes, and one opens with `template` (`None`: their rules are their own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanChange {
    pub user_id: String,
    pub template: Option<i64>,
}

/// What an event's push rules answered for the room's local members, as stored with it:
/// one row per template whose shared answer notifies, and a row of their own for the
/// members the group rows do not answer for exactly.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PushOutcome {
    pub own: Vec<PushActionRow>,
    pub groups: Vec<PushGroupRow>,
    pub spans: Vec<SpanChange>,
}

impl PushOutcome {
    /// Nobody's answer (an event no member is evaluated for).
    pub fn none() -> &'static PushOutcome {
        static NONE: PushOutcome = PushOutcome { own: Vec::new(), groups: Vec::new(), spans: Vec::new() };
        &NONE
    }
}

/// A pusher as stored.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct PusherRow {
    pub user_id: String,
    pub app_id: String,
    pub pushkey: String,
    pub kind: String,
    pub app_display_name: String,
    pub device_display_name: String,
    pub profile_tag: Option<String>,
    pub lang: String,
    /// The JSON object the client gave, `url` included.
    pub data: String,
    /// The device whose access token set it (it goes with the device).
    pub device_id: String,
    pub pushkey_ts: i64,
}

/// A push still to send to one pusher.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct QueuedPush {
    pub position: i64,
    /// `event` (a notifying event) or `badge` (an updated unread count only).
    pub kind: String,
    pub room_id: Option<String>,
    pub event_id: Option<String>,
    pub attempts: i32,
}

/// One entry of `/notifications`.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct NotificationRow {
    pub room_id: String,
    pub stream_pos: i64,
    pub event_id: String,
    pub highlight: i32,
    /// `None` on rows stored before the actions were kept.
    pub actions: Option<String>,
    /// The user's read receipt in the room is at or after the event.
    pub read: bool,
}

/// Queues a push of a stored event (at stream position `$pos`) for every HTTP pusher
/// of the users in `$chunk` (`PushActionRow`s), inside `persist_event`'s transaction.
macro_rules! enqueue_event_pushes {
    ($tx:expr, $batch:expr, $chunk:expr, $room_id:expr, $event_id:expr, $pos:expr) => {{
        $crate::storage::batch::batched!($tx, $batch, |query: &mut sqlx::QueryBuilder<_>| {
            query.push(
                "INSERT INTO push_queue (user_id, app_id, pushkey, position, kind, room_id, event_id, attempts)
                 SELECT user_id, app_id, pushkey, ",
            );
            query.push_bind($pos);
            query.push(", 'event', ");
            query.push_bind($room_id);
            query.push(", ");
            query.push_bind($event_id);
            query.push(", 0 FROM pushers WHERE kind = 'http' AND user_id IN (");
            let mut users = query.separated(", ");
            for a in $chunk {
                users.push_bind(&a.user_id);
            }
            query.push(") ON CONFLICT DO NOTHING");
        });
    }};
}
pub(crate) use enqueue_event_pushes;

/// Queues a push of a stored event for every HTTP pusher of the members its row for
/// `$template` answers for: those whose open span in the room follows the template and
/// who have no row of their own for it (written before, in the same transaction).
/// Driven by the pushers, not by the room's members.
macro_rules! enqueue_group_pushes {
    ($tx:expr, $batch:expr, $room_id:expr, $event_id:expr, $pos:expr, $template:expr) => {{
        $crate::storage::batch::batched!($tx, $batch, |query: &mut sqlx::QueryBuilder<_>| {
            query.push(
                "INSERT INTO push_queue (user_id, app_id, pushkey, position, kind, room_id, event_id, attempts)
                 SELECT p.user_id, p.app_id, p.pushkey, ",
            );
            query.push_bind($pos);
            query.push(", 'event', ");
            query.push_bind($room_id);
            query.push(", ");
            query.push_bind($event_id);
            query.push(
                ", 0 FROM pushers p WHERE p.kind = 'http'
                 AND EXISTS (SELECT 1 FROM push_spans s WHERE s.user_id = p.user_id AND s.room_id = ",
            );
            query.push_bind($room_id);
            query.push(" AND s.to_pos IS NULL AND s.template = ");
            query.push_bind($template);
            query.push(
                ") AND NOT EXISTS (SELECT 1 FROM event_push_actions a WHERE a.user_id = p.user_id AND a.stream_pos = ",
            );
            query.push_bind($pos);
            query.push(") ON CONFLICT DO NOTHING");
        });
    }};
}
pub(crate) use enqueue_group_pushes;

impl Store {
    /// Adds or updates a pusher (keyed by user, app id and pushkey). Without `append`,
    /// the same app id and pushkey of other users go, in the same transaction (under
    /// a lock on the pair, so that two users setting it at once leave one of them).
    /// False (nothing changed) when it would be one more than the user's `max` pushers
    /// (counted under the user's lock).
    pub async fn set_pusher(&self, p: &PusherRow, append: bool, max: i64) -> Result<bool> {
        let pair = format!("pusher {} {}", p.app_id, p.pushkey);
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            lock_user!(&mut *tx, &pair);
            lock_user!(&mut *tx, &p.user_id);
            let (others,): (i64,) = sqlx::query_as(
                "SELECT COUNT(*) FROM pushers WHERE user_id = $1 AND NOT (app_id = $2 AND pushkey = $3)",
            )
            .bind(&p.user_id)
            .bind(&p.app_id)
            .bind(&p.pushkey)
            .fetch_one(&mut *tx)
            .await?;
            if others >= max {
                return Ok(false);
            }
            if !append {
                for sql in [
                    "DELETE FROM push_queue WHERE app_id = $1 AND pushkey = $2 AND user_id <> $3",
                    "DELETE FROM pushers WHERE app_id = $1 AND pushkey = $2 AND user_id <> $3",
                ] {
                    sqlx::query(sql).bind(&p.app_id).bind(&p.pushkey).bind(&p.user_id).execute(&mut *tx).await?;
                }
            }
            sqlx::query(
                "INSERT INTO pushers (user_id, app_id, pushkey, kind, app_display_name, device_display_name,
                    profile_tag, lang, data, device_id, pushkey_ts)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                 ON CONFLICT (user_id, app_id, pushkey) DO UPDATE SET kind = excluded.kind,
                    app_display_name = excluded.app_display_name,
                    device_display_name = excluded.device_display_name, profile_tag = excluded.profile_tag,
                    lang = excluded.lang, data = excluded.data, device_id = excluded.device_id,
                    pushkey_ts = excluded.pushkey_ts",
            )
            .bind(&p.user_id)
            .bind(&p.app_id)
            .bind(&p.pushkey)
            .bind(&p.kind)
            .bind(&p.app_display_name)
            .bind(&p.device_display_name)
            .bind(&p.profile_tag)
            .bind(&p.lang)
            .bind(&p.data)
            .bind(&p.device_id)
            .bind(p.pushkey_ts)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    /// Deletes a user's pusher and what it had still to send. False if there was none.
    pub async fn delete_pusher(&self, user_id: &str, app_id: &str, pushkey: &str) -> Result<bool> {
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            sqlx::query("DELETE FROM push_queue WHERE user_id = $1 AND app_id = $2 AND pushkey = $3")
                .bind(user_id)
                .bind(app_id)
                .bind(pushkey)
                .execute(&mut *tx)
                .await?;
            let n = sqlx::query("DELETE FROM pushers WHERE user_id = $1 AND app_id = $2 AND pushkey = $3")
                .bind(user_id)
                .bind(app_id)
                .bind(pushkey)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            tx.commit().await?;
            Ok(n > 0)
        })
    }

    /// A user's pushers, oldest first.
    pub async fn get_pushers(&self, user_id: &str) -> Result<Vec<PusherRow>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as("SELECT * FROM pushers WHERE user_id = $1 ORDER BY pushkey_ts, app_id, pushkey")
                .bind(user_id)
                .fetch_all(pool)
                .await?)
        })
    }

    pub async fn get_pusher(&self, user_id: &str, app_id: &str, pushkey: &str) -> Result<Option<PusherRow>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as("SELECT * FROM pushers WHERE user_id = $1 AND app_id = $2 AND pushkey = $3")
                .bind(user_id)
                .bind(app_id)
                .bind(pushkey)
                .fetch_optional(pool)
                .await?)
        })
    }

    /// (user, app id, pushkey) of every HTTP pusher: their senders start with the server.
    pub async fn get_all_http_pushers(&self) -> Result<Vec<(String, String, String)>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as("SELECT user_id, app_id, pushkey FROM pushers WHERE kind = 'http'")
                .fetch_all(pool)
                .await?)
        })
    }

    /// The oldest pushes a pusher has still to send (at most `limit`).
    pub async fn get_queued_pushes(
        &self,
        user_id: &str,
        app_id: &str,
        pushkey: &str,
        limit: i64,
    ) -> Result<Vec<QueuedPush>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as(
                "SELECT position, kind, room_id, event_id, attempts FROM push_queue
                 WHERE user_id = $1 AND app_id = $2 AND pushkey = $3 ORDER BY position LIMIT $4",
            )
            .bind(user_id)
            .bind(app_id)
            .bind(pushkey)
            .bind(limit)
            .fetch_all(pool)
            .await?)
        })
    }

    /// A push sent (or given up): it leaves the queue.
    pub async fn delete_queued_push(&self, user_id: &str, app_id: &str, pushkey: &str, position: i64) -> Result<()> {
        on_pool!(self, write, |pool| {
            sqlx::query("DELETE FROM push_queue WHERE user_id = $1 AND app_id = $2 AND pushkey = $3 AND position = $4")
                .bind(user_id)
                .bind(app_id)
                .bind(pushkey)
                .bind(position)
                .execute(pool)
                .await?;
            Ok(())
        })
    }

    /// Counts a failed attempt at a push; answers the attempts so far (0: it is gone).
    pub async fn record_push_failure(&self, user_id: &str, app_id: &str, pushkey: &str, position: i64) -> Result<i32> {
        on_pool!(self, write, |pool| {
            let row: Option<(i32,)> = sqlx::query_as(
                "UPDATE push_queue SET attempts = attempts + 1
                 WHERE user_id = $1 AND app_id = $2 AND pushkey = $3 AND position = $4 RETURNING attempts",
            )
            .bind(user_id)
            .bind(app_id)
            .bind(pushkey)
            .bind(position)
            .fetch_optional(pool)
            .await?;
            Ok(row.map(|r| r.0).unwrap_or(0))
        })
    }

    /// Queues an updated unread count (at stream position `position`) for each of the
    /// user's HTTP pushers, replacing one still queued. Answers whether any was queued.
    pub async fn enqueue_badge_pushes(&self, user_id: &str, position: i64) -> Result<bool> {
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            sqlx::query("DELETE FROM push_queue WHERE user_id = $1 AND kind = 'badge'")
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
            let n = sqlx::query(
                "INSERT INTO push_queue (user_id, app_id, pushkey, position, kind, room_id, event_id, attempts)
                 SELECT user_id, app_id, pushkey, $2, 'badge', NULL, NULL, 0 FROM pushers
                 WHERE user_id = $1 AND kind = 'http' ON CONFLICT DO NOTHING",
            )
            .bind(user_id)
            .bind(position)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            Ok(n > 0)
        })
    }

    /// The stored push actions (JSON, `None` on old rows) and highlight of a
    /// notification of a user.
    pub async fn get_push_action(
        &self,
        user_id: &str,
        room_id: &str,
        stream_pos: i64,
    ) -> Result<Option<(Option<String>, i32)>> {
        // The user's own row, else their template's row at the event.
        on_pool!(self, read, |pool| {
            let own: Option<(Option<String>, i32, i32)> = sqlx::query_as(
                "SELECT actions, highlight, notifies FROM event_push_actions
                 WHERE user_id = $1 AND room_id = $2 AND stream_pos = $3",
            )
            .bind(user_id)
            .bind(room_id)
            .bind(stream_pos)
            .fetch_optional(pool)
            .await?;
            if let Some((actions, highlight, notifies)) = own {
                return Ok((notifies == 1).then_some((actions, highlight)));
            }
            let sql = format!(
                "SELECT g.actions, g.highlight FROM {SPAN_ROWS} WHERE s.user_id = $1 AND s.room_id = $2
                     AND g.stream_pos = $3"
            );
            Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(user_id)
                .bind(room_id)
                .bind(stream_pos)
                .fetch_optional(pool)
                .await?)
        })
    }

    pub async fn has_http_pushers(&self, user_id: &str) -> Result<bool> {
        on_pool!(self, read, |pool| {
            let row: Option<(i32,)> =
                sqlx::query_as("SELECT 1 FROM pushers WHERE user_id = $1 AND kind = 'http' LIMIT 1")
                    .bind(user_id)
                    .fetch_optional(pool)
                    .await?;
            Ok(row.is_some())
        })
    }

    /// A user's unread notifications in all joined rooms, and how many of them are call
    /// invites: the `counts` of a push. The first is the sum of the kept whole-room
    /// unread counts (`unread_counts`, thread `''`: one row per room, dropped when the
    /// user leaves); the second counts, in each of those rooms, the call invites after
    /// the row's position that notified the user and are not redacted (index
    /// `events_call_invites`, then the push action's primary key). Neither grows with
    /// the unread history.
    pub async fn count_unread_for_push(&self, user_id: &str) -> Result<(i64, i64)> {
        on_pool!(self, read, |pool| {
            let sql = format!(
                "SELECT COALESCE((SELECT CAST(SUM(u.notifs + COALESCE({LATEST_NOTIFS} - u.base_notifs, 0)) AS BIGINT)
                         FROM unread_counts u WHERE u.user_id = $1 AND u.thread_id = ''), 0),
                    (SELECT COUNT(*) FROM unread_counts u
                     JOIN events e ON e.room_id = u.room_id AND e.event_type = 'm.call.invite'
                         AND e.stream_ordering > u.after_pos
                     WHERE u.user_id = $1 AND u.thread_id = '' AND e.redacted_by IS NULL
                       AND (EXISTS (SELECT 1 FROM event_push_actions p WHERE p.user_id = u.user_id
                               AND p.room_id = u.room_id AND p.stream_pos = e.stream_ordering AND p.notifies = 1)
                           OR (EXISTS (SELECT 1 FROM {SPAN_ROWS} WHERE s.user_id = u.user_id
                                   AND s.room_id = u.room_id AND g.stream_pos = e.stream_ordering)
                               AND NOT EXISTS (SELECT 1 FROM event_push_actions p WHERE p.user_id = u.user_id
                                   AND p.stream_pos = e.stream_ordering))))"
            );
            let (unread, calls): (i64, i64) =
                sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(user_id).fetch_one(pool).await?;
            Ok((unread, calls))
        })
    }

    /// A user's notifications before stream position `before` (all when `None`), newest
    /// first, at most `limit`; only highlights when asked. Redacted events are left out
    /// (as in the unread counts).
    pub async fn get_notifications(
        &self,
        user_id: &str,
        before: Option<i64>,
        limit: i64,
        only_highlight: bool,
    ) -> Result<Vec<NotificationRow>> {
        // The user's own rows that notify, and their templates' rows over their spans
        // where they have no row of their own. `read`: the user's read receipt in the
        // room (public or private) is at or after it.
        let sql = format!(
            "SELECT n.room_id, n.stream_pos, n.event_id, n.highlight, n.actions,
                COALESCE((SELECT MAX(re.stream_ordering) FROM receipts r JOIN events re ON re.event_id = r.event_id
                    WHERE r.user_id = $1 AND r.room_id = n.room_id), -1) >= n.stream_pos AS read
             FROM (SELECT p.room_id, p.stream_pos, p.event_id, p.highlight, p.actions FROM event_push_actions p
                   WHERE p.user_id = $1 AND p.notifies = 1 AND ($2 IS NULL OR p.stream_pos < $2)
                     AND ($3 = FALSE OR p.highlight = 1)
                   UNION ALL
                   SELECT g.room_id, g.stream_pos, g.event_id, g.highlight, g.actions FROM {SPAN_ROWS}
                   WHERE s.user_id = $1 AND ($2 IS NULL OR g.stream_pos < $2) AND ($3 = FALSE OR g.highlight = 1)
                     AND NOT EXISTS (SELECT 1 FROM event_push_actions o
                         WHERE o.user_id = $1 AND o.stream_pos = g.stream_pos)) n
             JOIN events e ON e.stream_ordering = n.stream_pos
             WHERE e.redacted_by IS NULL
             ORDER BY n.stream_pos DESC LIMIT $4"
        );
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str()))
                .bind(user_id)
                .bind(before)
                .bind(only_highlight)
                .bind(limit)
                .fetch_all(pool)
                .await?)
        })
    }
}
