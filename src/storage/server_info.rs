//! Storage of facts about the server itself (`server_info`): the server name its data
//! belongs to.

use super::{Store, on_pool};
use crate::error::Result;

impl Store {
    /// The server name this database belongs to. At the first start it is recorded:
    /// `name`, or, for a database made before names were recorded, the server part of
    /// an existing user id.
    pub async fn record_server_name(&self, name: &str) -> Result<String> {
        on_pool!(self, write, |pool| {
            let existing_user: Option<(String,)> =
                sqlx::query_as("SELECT user_id FROM users LIMIT 1").fetch_optional(pool).await?;
            let inferred = existing_user.as_ref().and_then(|(id,)| id.split_once(':')).map(|(_, server)| server);
            sqlx::query("INSERT INTO server_info (key, value) VALUES ('server_name', $1) ON CONFLICT (key) DO NOTHING")
                .bind(inferred.unwrap_or(name))
                .execute(pool)
                .await?;
            let (recorded,): (String,) =
                sqlx::query_as("SELECT value FROM server_info WHERE key = 'server_name'").fetch_one(pool).await?;
            Ok(recorded)
        })
    }

    /// Whether the database answers (a trivial query), for `/health`.
    pub async fn ping(&self) -> Result<()> {
        on_pool!(self, read, |pool| {
            sqlx::query("SELECT 1").execute(pool).await?;
            Ok(())
        })
    }
}
