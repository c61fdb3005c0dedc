//! Storage of room aliases and the public room directory.

use super::{Dialect, Store, is_unique_violation, on_pool};
use crate::error::{Error, Result};

impl Store {
    /// Adds an alias; `M_ROOM_IN_USE` if taken.
    pub async fn create_room_alias(&self, alias: &str, room_id: &str, creator: &str) -> Result<()> {
        on_pool!(self, write, |pool| {
            let result = sqlx::query("INSERT INTO room_aliases (alias, room_id, creator) VALUES ($1, $2, $3)")
                .bind(alias)
                .bind(room_id)
                .bind(creator)
                .execute(pool)
                .await;
            match result {
                Err(e) if is_unique_violation(&e) => Err(Error::matrix(
                    axum::http::StatusCode::CONFLICT,
                    ruma::api::error::ErrorKind::Unknown,
                    format!("The alias {alias} exists already"),
                )),
                other => other.map(|_| ()).map_err(Into::into),
            }
        })
    }

    /// The room and creator of an alias.
    pub async fn get_room_alias(&self, alias: &str) -> Result<Option<(String, String)>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as("SELECT room_id, creator FROM room_aliases WHERE alias = $1")
                .bind(alias)
                .fetch_optional(pool)
                .await?)
        })
    }

    pub async fn delete_room_alias(&self, alias: &str) -> Result<bool> {
        on_pool!(self, write, |pool| {
            let n = sqlx::query("DELETE FROM room_aliases WHERE alias = $1")
                .bind(alias)
                .execute(pool)
                .await?
                .rows_affected();
            Ok(n > 0)
        })
    }

    pub async fn get_aliases_of_room(&self, room_id: &str) -> Result<Vec<String>> {
        on_pool!(self, read, |pool| {
            let rows: Vec<(String,)> =
                sqlx::query_as("SELECT alias FROM room_aliases WHERE room_id = $1 ORDER BY alias")
                    .bind(room_id)
                    .fetch_all(pool)
                    .await?;
            Ok(rows.into_iter().map(|r| r.0).collect())
        })
    }

    pub async fn set_room_published(&self, room_id: &str, published: bool) -> Result<()> {
        on_pool!(self, write, |pool| {
            sqlx::query("UPDATE rooms SET published = $2 WHERE room_id = $1")
                .bind(room_id)
                .bind(published)
                .execute(pool)
                .await?;
            Ok(())
        })
    }

    pub async fn is_room_published(&self, room_id: &str) -> Result<Option<bool>> {
        on_pool!(self, read, |pool| {
            let row: Option<(bool,)> = sqlx::query_as("SELECT published FROM rooms WHERE room_id = $1")
                .bind(room_id)
                .fetch_optional(pool)
                .await?;
            Ok(row.map(|r| r.0))
        })
    }

    /// One page of the published rooms, largest first, whose name, topic or canonical
    /// alias contains `term` (lower case), and how many match in all: one query.
    pub async fn get_published_rooms(
        &self,
        term: Option<&str>,
        offset: i64,
        limit: i64,
    ) -> Result<(Vec<PublishedRoom>, i64)> {
        // The one place where the dialects differ: reading a field of the JSON content.
        let field = |event_type: &str, field: &str| {
            let value = match self.dialect() {
                Dialect::Sqlite => format!("CAST(json_extract(e.json, '$.content.{field}') AS TEXT)"),
                Dialect::Postgres => format!("(CAST(e.json AS jsonb) -> 'content' ->> '{field}')"),
            };
            format!(
                "(SELECT {value} FROM current_state c JOIN events e ON e.event_id = c.event_id
                  WHERE c.room_id = r.room_id AND c.event_type = '{event_type}' AND c.state_key = '')"
            )
        };
        let sql = format!(
            "WITH published AS (
                 SELECT r.room_id,
                        (SELECT COUNT(*) FROM memberships m WHERE m.room_id = r.room_id AND m.membership = 'join') AS joined,
                        {name} AS name, {topic} AS topic, {alias} AS canonical_alias, {avatar} AS avatar_url,
                        {history} AS history_visibility, {guests} AS guest_access, {join_rule} AS join_rule
                 FROM rooms r WHERE r.published
             )
             SELECT room_id, joined, name, topic, canonical_alias, avatar_url, history_visibility, guest_access,
                    join_rule, COUNT(*) OVER () AS total
             FROM published
             WHERE $1 IS NULL OR LOWER(COALESCE(name, '') || ' ' || COALESCE(topic, '') || ' ' || COALESCE(canonical_alias, ''))
                   LIKE $1 ESCAPE '\\'
             ORDER BY joined DESC, room_id LIMIT $2 OFFSET $3",
            name = field("m.room.name", "name"),
            topic = field("m.room.topic", "topic"),
            alias = field("m.room.canonical_alias", "alias"),
            avatar = field("m.room.avatar", "url"),
            history = field("m.room.history_visibility", "history_visibility"),
            guests = field("m.room.guest_access", "guest_access"),
            join_rule = field("m.room.join_rules", "join_rule"),
        );
        let pattern = term.map(like_pattern);
        let rows: Vec<PublishedRoom> = on_pool!(self, read, |pool| {
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(pattern.as_deref())
                .bind(limit)
                .bind(offset)
                .fetch_all(pool)
                .await?
        });
        let total = rows.first().map_or(0, |r| r.total);
        Ok((rows, total))
    }
}

/// A `LIKE` pattern matching any text that contains `term`, with `\` as the escape.
fn like_pattern(term: &str) -> String {
    format!("%{}%", term.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_"))
}

/// A published room as the room directory shows it.
#[derive(Debug, sqlx::FromRow)]
pub struct PublishedRoom {
    pub room_id: String,
    pub joined: i64,
    pub name: Option<String>,
    pub topic: Option<String>,
    pub canonical_alias: Option<String>,
    pub avatar_url: Option<String>,
    pub history_visibility: Option<String>,
    pub guest_access: Option<String>,
    pub join_rule: Option<String>,
    /// How many rooms match in all.
    pub total: i64,
}

impl Store {
    /// Users visible to `searcher` (sharing a joined room, or in a published room)
    /// whose id or display name contains `term` (lower case): (id, name, avatar).
    pub async fn search_user_directory(
        &self,
        searcher: &str,
        term: &str,
        limit: i64,
    ) -> Result<Vec<(String, Option<String>, Option<String>)>> {
        let pattern = like_pattern(term);
        let rows: Vec<(String, Option<String>, Option<String>)> = on_pool!(self, read, |pool| {
            sqlx::query_as(
                "SELECT u.user_id,
                        (SELECT value FROM profile_fields p WHERE p.user_id = u.user_id AND p.field = 'displayname'),
                        (SELECT value FROM profile_fields p WHERE p.user_id = u.user_id AND p.field = 'avatar_url')
                 FROM users u
                 WHERE NOT u.deactivated
                   AND (LOWER(u.user_id) LIKE $2 ESCAPE '\\' OR EXISTS (
                        SELECT 1 FROM profile_fields p WHERE p.user_id = u.user_id AND p.field = 'displayname'
                        AND LOWER(p.value) LIKE $2 ESCAPE '\\'))
                   AND (u.user_id = $1 OR EXISTS (
                        SELECT 1 FROM memberships b WHERE b.user_id = u.user_id AND b.membership = 'join' AND (
                            EXISTS (SELECT 1 FROM memberships a WHERE a.room_id = b.room_id AND a.user_id = $1 AND a.membership = 'join')
                            OR EXISTS (SELECT 1 FROM rooms r WHERE r.room_id = b.room_id AND r.published))))
                 ORDER BY u.user_id LIMIT $3",
            )
            .bind(searcher)
            .bind(&pattern)
            .bind(limit)
            .fetch_all(pool)
            .await?
        });
        // Profile values are stored as JSON strings.
        let unquote = |v: Option<String>| v.and_then(|s| serde_json::from_str::<String>(&s).ok());
        Ok(rows.into_iter().map(|(id, name, avatar)| (id, unquote(name), unquote(avatar))).collect())
    }
}

impl Store {
    /// Points every local alias of `from` at `to` (a room upgrade); returns how many.
    pub async fn move_room_aliases(&self, from: &str, to: &str) -> Result<u64> {
        on_pool!(self, write, |pool| {
            Ok(sqlx::query("UPDATE room_aliases SET room_id = $2 WHERE room_id = $1")
                .bind(from)
                .bind(to)
                .execute(pool)
                .await?
                .rows_affected())
        })
    }
}
