//! Storage of room aliases and the public room directory.

use super::{Store, is_unique_violation, on_pool};
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

    /// Published rooms, largest first: (room id, joined members).
    pub async fn list_published_rooms(&self) -> Result<Vec<(String, i64)>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as(
                "SELECT r.room_id, (SELECT COUNT(*) FROM memberships m WHERE m.room_id = r.room_id AND m.membership = 'join') AS n
                 FROM rooms r WHERE r.published ORDER BY n DESC, r.room_id",
            )
            .fetch_all(pool)
            .await?)
        })
    }
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
        let pattern = format!("%{}%", term.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_"));
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
