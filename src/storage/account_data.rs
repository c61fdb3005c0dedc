//! Storage of account data, global (`room_id` = '') and per room. Each change takes a
//! stream position, so incremental sync can find it.

use super::changes::{Change, Kind};
use super::{Store, on_pool, stream};
use crate::error::Result;

/// Writes one entry at stream position `$pos`, inside transaction `$tx`.
macro_rules! upsert_account_data {
    ($tx:expr, $user_id:expr, $room_id:expr, $data_type:expr, $content:expr, $pos:expr) => {
        sqlx::query(
            "INSERT INTO account_data (user_id, room_id, data_type, content, stream_pos) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (user_id, room_id, data_type) DO UPDATE
             SET content = excluded.content, stream_pos = excluded.stream_pos",
        )
        .bind($user_id)
        .bind($room_id)
        .bind($data_type)
        .bind($content)
        .bind($pos)
        .execute(&mut *$tx)
        .await?
    };
}

impl Store {
    /// The JSON content of one account data entry.
    pub async fn get_account_data(&self, user_id: &str, room_id: &str, data_type: &str) -> Result<Option<String>> {
        on_pool!(self, read, |pool| {
            let row: Option<(String,)> = sqlx::query_as(
                "SELECT content FROM account_data WHERE user_id = $1 AND room_id = $2 AND data_type = $3",
            )
            .bind(user_id)
            .bind(room_id)
            .bind(data_type)
            .fetch_optional(pool)
            .await?;
            Ok(row.map(|(content,)| content))
        })
    }

    /// Sets an entry; returns its stream position. Takes the user's lock (see
    /// `update_account_data`), so that it lands before or after a change, not inside it.
    pub async fn set_account_data(&self, user_id: &str, room_id: &str, data_type: &str, content: &str) -> Result<i64> {
        let positions = self.take_positions_for(1, &[Change::new(Kind::AccountData, user_id)]).await?;
        let pos = positions.first();
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            super::users::lock_user!(&mut *tx, user_id);
            upsert_account_data!(tx, user_id, room_id, data_type, content, pos);
            stream::commit(tx, Some(positions)).await?;
            Ok(pos)
        })
    }

    /// Reads, changes and writes one entry in one transaction: `change` gets the
    /// current JSON content (if any) and answers the new one, or `None` to leave it.
    /// The user's lock is taken first (`users::lock_user`), so concurrent writes of
    /// the user's account data run one after the other and none is lost. Returns the
    /// new stream position.
    pub async fn update_account_data<F>(
        &self,
        user_id: &str,
        room_id: &str,
        data_type: &str,
        change: F,
    ) -> Result<Option<i64>>
    where
        F: FnOnce(Option<&str>) -> Result<Option<String>>,
    {
        let positions = self.take_positions_for(1, &[Change::new(Kind::AccountData, user_id)]).await?;
        let pos = positions.first();
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            super::users::lock_user!(&mut *tx, user_id);
            let current: Option<(String,)> = sqlx::query_as(
                "SELECT content FROM account_data WHERE user_id = $1 AND room_id = $2 AND data_type = $3",
            )
            .bind(user_id)
            .bind(room_id)
            .bind(data_type)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(content) = change(current.as_ref().map(|c| c.0.as_str()))? else {
                return Ok(None);
            };
            upsert_account_data!(tx, user_id, room_id, data_type, &content, pos);
            stream::commit(tx, Some(positions)).await?;
            Ok(Some(pos))
        })
    }

    /// Entries changed after `since`, up to `until`: (room id or '', type, JSON content).
    pub async fn get_account_data_since(
        &self,
        user_id: &str,
        since: i64,
        until: i64,
    ) -> Result<Vec<(String, String, String)>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as(
                "SELECT room_id, data_type, content FROM account_data
                 WHERE user_id = $1 AND stream_pos > $2 AND stream_pos <= $3",
            )
            .bind(user_id)
            .bind(since)
            .bind(until)
            .fetch_all(pool)
            .await?)
        })
    }
}
