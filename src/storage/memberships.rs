//! Storage of room memberships: who is in which room, as of the latest state.

use std::collections::HashMap;

use super::{Store, on_pool};
use crate::error::Result;

/// One user's membership in one room.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct MembershipRow {
    pub room_id: String,
    pub user_id: String,
    pub membership: String,
    pub event_id: String,
    pub stream_ordering: i64,
}

impl Store {
    /// A user's rooms (not forgotten), with membership.
    /// Kept in the memberships cache (`read_cache.rs`).
    pub async fn get_user_memberships(&self, user_id: &str) -> Result<Vec<MembershipRow>> {
        if let Some(rows) = self.caches.memberships.get(user_id) {
            return Ok(rows.as_ref().clone());
        }
        let epoch = self.caches.memberships.epoch();
        let rows: Vec<MembershipRow> = on_pool!(self, read, |pool| {
            sqlx::query_as(
                "SELECT room_id, user_id, membership, event_id, stream_ordering FROM memberships
                 WHERE user_id = $1 AND NOT forgotten",
            )
            .bind(user_id)
            .fetch_all(pool)
            .await?
        });
        self.caches.memberships.keep(user_id.to_owned(), std::sync::Arc::new(rows.clone()), epoch);
        Ok(rows)
    }

    pub async fn get_membership(&self, room_id: &str, user_id: &str) -> Result<Option<MembershipRow>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as(
                "SELECT room_id, user_id, membership, event_id, stream_ordering FROM memberships
                 WHERE room_id = $1 AND user_id = $2",
            )
            .bind(room_id)
            .bind(user_id)
            .fetch_optional(pool)
            .await?)
        })
    }

    /// Members of a room with the given membership (all if `None`).
    pub async fn get_room_members(&self, room_id: &str, membership: Option<&str>) -> Result<Vec<MembershipRow>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as(
                "SELECT room_id, user_id, membership, event_id, stream_ordering FROM memberships
                 WHERE room_id = $1 AND ($2 IS NULL OR membership = $2) ORDER BY user_id",
            )
            .bind(room_id)
            .bind(membership)
            .fetch_all(pool)
            .await?)
        })
    }

    /// Joined and invited counts of a room.
    pub async fn count_room_members(&self, room_id: &str) -> Result<(i64, i64)> {
        on_pool!(self, read, |pool| {
            let rows: Vec<(String, i64)> = sqlx::query_as(
                "SELECT membership, COUNT(*) FROM memberships WHERE room_id = $1 AND membership IN ('join', 'invite')
                 GROUP BY membership",
            )
            .bind(room_id)
            .fetch_all(pool)
            .await?;
            let count = |m: &str| rows.iter().find(|r| r.0 == m).map_or(0, |r| r.1);
            Ok((count("join"), count("invite")))
        })
    }

    /// Joined and invited counts of several rooms in one query (rooms without either
    /// are left out).
    pub async fn count_members_in_rooms(&self, room_ids: &[&str]) -> Result<HashMap<String, (i64, i64)>> {
        let mut counts: HashMap<String, (i64, i64)> = HashMap::new();
        for chunk in room_ids.chunks(500) {
            let rows: Vec<(String, String, i64)> = on_pool!(self, read, |pool| {
                let mut query = sqlx::QueryBuilder::new(
                    "SELECT room_id, membership, COUNT(*) FROM memberships
                     WHERE membership IN ('join', 'invite') AND room_id IN (",
                );
                let mut list = query.separated(", ");
                for id in chunk {
                    list.push_bind(*id);
                }
                query.push(") GROUP BY room_id, membership");
                query.build_query_as().fetch_all(pool).await?
            });
            for (room, membership, n) in rows {
                let entry = counts.entry(room).or_default();
                if membership == "join" {
                    entry.0 = n;
                } else {
                    entry.1 = n;
                }
            }
        }
        Ok(counts)
    }

    /// Up to `limit` members other than `user_id` for room summaries, in the order of
    /// their membership's position: the joined and invited ones, or, when there are
    /// none, those who left or were banned (the spec's heroes). Read along the room's
    /// memberships by position, the read ends at `limit`: sorting them all by kind
    /// first read every member of a room of 10,000 (2.5 ms).
    pub async fn get_room_heroes(&self, room_id: &str, user_id: &str, limit: i64) -> Result<Vec<String>> {
        for current in [true, false] {
            let rows: Vec<(String,)> = on_pool!(self, read, |pool| {
                sqlx::query_as(
                    "SELECT user_id FROM memberships WHERE room_id = $1 AND user_id <> $2
                       AND (membership IN ('join', 'invite')) = $3
                     ORDER BY stream_ordering LIMIT $4",
                )
                .bind(room_id)
                .bind(user_id)
                .bind(current)
                .bind(limit)
                .fetch_all(pool)
                .await?
            });
            if !rows.is_empty() {
                return Ok(rows.into_iter().map(|r| r.0).collect());
            }
        }
        Ok(Vec::new())
    }

    /// Marks a left room as forgotten for a user.
    pub async fn forget_room(&self, room_id: &str, user_id: &str) -> Result<()> {
        let _writing = self.caches.memberships.begin();
        on_pool!(self, write, |pool| {
            sqlx::query("UPDATE memberships SET forgotten = TRUE WHERE room_id = $1 AND user_id = $2")
                .bind(room_id)
                .bind(user_id)
                .execute(pool)
                .await?;
            Ok(())
        })
    }
}

impl Store {
    /// The rooms `user_id` is joined to whose membership row changed after `since`, each
    /// with the JSON of the user's latest member event at `since` (`None` if they had
    /// none then): a join, or only a profile change of someone already in.
    pub async fn get_joined_rooms_changed_since(
        &self,
        user_id: &str,
        since: i64,
    ) -> Result<Vec<(String, Option<String>)>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as(
                "SELECT m.room_id, (
                     SELECT e.json FROM events e
                     WHERE e.room_id = m.room_id AND e.state_key = $1 AND e.event_type = 'm.room.member'
                       AND e.stream_ordering <= $2
                     ORDER BY e.stream_ordering DESC LIMIT 1)
                 FROM memberships m
                 WHERE m.user_id = $1 AND m.membership = 'join' AND m.stream_ordering > $2",
            )
            .bind(user_id)
            .bind(since)
            .fetch_all(pool)
            .await?)
        })
    }
}

impl Store {
    /// The rooms both users are joined to, by room id (MSC2666 mutual rooms).
    pub async fn get_mutual_rooms(&self, a: &str, b: &str) -> Result<Vec<String>> {
        on_pool!(self, read, |pool| {
            let rows: Vec<(String,)> = sqlx::query_as(
                "SELECT m1.room_id FROM memberships m1 JOIN memberships m2 ON m2.room_id = m1.room_id
                 WHERE m1.user_id = $1 AND m2.user_id = $2 AND m1.membership = 'join' AND m2.membership = 'join'
                 ORDER BY m1.room_id",
            )
            .bind(a)
            .bind(b)
            .fetch_all(pool)
            .await?;
            Ok(rows.into_iter().map(|r| r.0).collect())
        })
    }
}
