//! Rooms this server learns of from other servers (joined through federation).

use super::{Store, on_pool};
use crate::error::Result;

impl Store {
    /// Records a room joined through another server, if not known yet.
    pub async fn insert_remote_room(&self, room_id: &str, version: &str, creator: &str, now: i64) -> Result<()> {
        on_pool!(self, write, |pool| {
            sqlx::query(
                "INSERT INTO rooms (room_id, room_version, creator, created_ts, published) VALUES ($1, $2, $3, $4, FALSE)
                 ON CONFLICT DO NOTHING",
            )
            .bind(room_id)
            .bind(version)
            .bind(creator)
            .bind(now)
            .execute(pool)
            .await?;
            Ok(())
        })
    }
}
