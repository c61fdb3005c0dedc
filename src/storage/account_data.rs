//! Storage of account data, global (`room_id` = '') and per room. Each change takes a
//! stream position, so incremental sync can find it.

use super::{Store, events::next_stream_position, on_pool};
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

    /// Sets an entry; returns its stream position.
    pub async fn set_account_data(&self, user_id: &str, room_id: &str, data_type: &str, content: &str) -> Result<i64> {
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            let pos = next_stream_position!(tx);
            upsert_account_data!(tx, user_id, room_id, data_type, content, pos);
            tx.commit().await?;
            Ok(pos)
        })
    }

    /// Reads, changes and writes one entry in one transaction: `change` gets the
    /// current JSON content (if any) and answers the new one, or `None` to leave it.
    /// The stream position is taken first, and taking it locks its row (PostgreSQL)
    /// or holds the single writer (SQLite), so concurrent changes of the same entry
    /// run one after the other and none is lost. Returns the new stream position.
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
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            let pos = next_stream_position!(tx);
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
            tx.commit().await?;
            Ok(Some(pos))
        })
    }

    /// Entries changed after `since`: (room id or '', type, JSON content).
    pub async fn get_account_data_since(&self, user_id: &str, since: i64) -> Result<Vec<(String, String, String)>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as(
                "SELECT room_id, data_type, content FROM account_data WHERE user_id = $1 AND stream_pos > $2",
            )
            .bind(user_id)
            .bind(since)
            .fetch_all(pool)
            .await?)
        })
    }
}
