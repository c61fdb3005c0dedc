//! Storage of account data, global (`room_id` = '') and per room.

use super::{Store, on_pool};
use crate::error::Result;

impl Store {
    /// The JSON content of one account data entry.
    pub async fn get_account_data(
        &self,
        user_id: &str,
        room_id: &str,
        data_type: &str,
    ) -> Result<Option<String>> {
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

    pub async fn set_account_data(
        &self,
        user_id: &str,
        room_id: &str,
        data_type: &str,
        content: &str,
    ) -> Result<()> {
        on_pool!(self, write, |pool| {
            sqlx::query(
                "INSERT INTO account_data (user_id, room_id, data_type, content) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (user_id, room_id, data_type) DO UPDATE SET content = excluded.content",
            )
            .bind(user_id)
            .bind(room_id)
            .bind(data_type)
            .bind(content)
            .execute(pool)
            .await?;
            Ok(())
        })
    }
}
