//! OpenID tokens: made for a user, traded by other services for the user's id until
//! they expire. Stored as SHA-256 hashes only.

use super::{Store, on_pool};
use crate::error::Result;

impl Store {
    /// Stores a new token (its hash) of `user_id`, valid until `expires_ts`, and deletes
    /// the tokens that expired before `now`, in one transaction.
    pub async fn create_openid_token(&self, token_hash: &str, user_id: &str, expires_ts: i64, now: i64) -> Result<()> {
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            sqlx::query("DELETE FROM openid_tokens WHERE expires_ts < $1").bind(now).execute(&mut *tx).await?;
            sqlx::query("INSERT INTO openid_tokens (token_hash, user_id, expires_ts) VALUES ($1, $2, $3)")
                .bind(token_hash)
                .bind(user_id)
                .bind(expires_ts)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// The user of a token that has not expired at `now` (and whose account is active).
    pub async fn find_openid_token(&self, token_hash: &str, now: i64) -> Result<Option<String>> {
        on_pool!(self, read, |pool| {
            let row: Option<(String,)> = sqlx::query_as(
                "SELECT o.user_id FROM openid_tokens o JOIN users u ON u.user_id = o.user_id
                 WHERE o.token_hash = $1 AND o.expires_ts > $2 AND NOT u.deactivated",
            )
            .bind(token_hash)
            .bind(now)
            .fetch_optional(pool)
            .await?;
            Ok(row.map(|r| r.0))
        })
    }
}
