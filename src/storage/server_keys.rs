//! Storage of other servers' signing keys (federation): the keys by server and key id
//! with their validity, and each server's latest signed key response, kept as received
//! for notary answers. The checks (signatures, server name) are the service's.

use super::{Store, on_pool};
use crate::error::Result;

/// One stored public key of another server.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredServerKey {
    pub key_id: String,
    /// Unpadded base64, as servers publish it.
    pub public_key: String,
    pub valid_until_ts: i64,
    /// Set for keys the server lists as old (`old_verify_keys`).
    pub expired_ts: Option<i64>,
}

/// A server's signed key response as it was received.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredKeyResponse {
    pub response: String,
    pub valid_until_ts: i64,
}

impl Store {
    /// The keys known for `server_name`.
    pub async fn get_server_signing_keys(&self, server_name: &str) -> Result<Vec<StoredServerKey>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as(
                "SELECT key_id, public_key, valid_until_ts, expired_ts FROM server_signing_keys \
                 WHERE server_name = $1 ORDER BY key_id",
            )
            .bind(server_name)
            .fetch_all(pool)
            .await?)
        })
    }

    /// The latest signed key response of `server_name`, if one was fetched.
    pub async fn get_server_key_response(&self, server_name: &str) -> Result<Option<StoredKeyResponse>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as("SELECT response, valid_until_ts FROM server_key_responses WHERE server_name = $1")
                .bind(server_name)
                .fetch_optional(pool)
                .await?)
        })
    }

    /// Records a checked key response of `server_name` and its keys, in one
    /// transaction. A key already known is updated (its validity may have grown). An
    /// older response (lower `valid_until_ts`) never replaces a newer one.
    pub async fn store_server_keys(
        &self,
        server_name: &str,
        keys: &[StoredServerKey],
        response: &StoredKeyResponse,
        fetched_ts: i64,
    ) -> Result<()> {
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            for key in keys {
                sqlx::query(
                    "INSERT INTO server_signing_keys \
                     (server_name, key_id, public_key, valid_until_ts, expired_ts, fetched_ts) \
                     VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (server_name, key_id) DO UPDATE SET public_key = excluded.public_key, \
                     valid_until_ts = excluded.valid_until_ts, expired_ts = excluded.expired_ts, \
                     fetched_ts = excluded.fetched_ts",
                )
                .bind(server_name)
                .bind(&key.key_id)
                .bind(&key.public_key)
                .bind(key.valid_until_ts)
                .bind(key.expired_ts)
                .bind(fetched_ts)
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query(
                "INSERT INTO server_key_responses (server_name, response, valid_until_ts, fetched_ts) \
                 VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (server_name) DO UPDATE SET response = excluded.response, \
                 valid_until_ts = excluded.valid_until_ts, fetched_ts = excluded.fetched_ts \
                 WHERE server_key_responses.valid_until_ts <= excluded.valid_until_ts",
            )
            .bind(server_name)
            .bind(&response.response)
            .bind(response.valid_until_ts)
            .bind(fetched_ts)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }
}
