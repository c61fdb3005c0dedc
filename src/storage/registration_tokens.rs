//! Storage of registration tokens (`m.login.registration_token`).

use super::{Store, is_unique_violation, on_pool};
use crate::error::{Error, Result};

/// A registration token and how much of it is used. `pending` counts registrations
/// that have passed the token stage but not finished: each holds a reservation of one
/// use until it finishes or its UIA session expires.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct RegistrationTokenInfo {
    pub token: String,
    pub uses_allowed: Option<i64>,
    pub pending: i64,
    pub completed: i64,
    pub expiry_ts: Option<i64>,
    pub created_ts: i64,
}

macro_rules! select_tokens {
    ($tail:literal) => {
        concat!(
            "SELECT t.token, t.uses_allowed, t.completed, t.expiry_ts, t.created_ts,
        (SELECT COUNT(*) FROM uiaa_sessions s WHERE s.registration_token = t.token) AS pending
     FROM registration_tokens t ",
            $tail
        )
    };
}

impl Store {
    /// Adds a token; `M_INVALID_PARAM` if it exists already.
    pub async fn create_registration_token(
        &self,
        token: &str,
        uses_allowed: Option<i64>,
        expiry_ts: Option<i64>,
        now: i64,
    ) -> Result<()> {
        on_pool!(self, write, |pool| {
            let result = sqlx::query(
                "INSERT INTO registration_tokens (token, uses_allowed, completed, expiry_ts, created_ts)
                 VALUES ($1, $2, 0, $3, $4)",
            )
            .bind(token)
            .bind(uses_allowed)
            .bind(expiry_ts)
            .bind(now)
            .execute(pool)
            .await;
            match result {
                Err(e) if is_unique_violation(&e) => {
                    Err(Error::invalid_param("That registration token exists already"))
                }
                other => other.map(|_| ()).map_err(Into::into),
            }
        })
    }

    pub async fn get_registration_token(&self, token: &str) -> Result<Option<RegistrationTokenInfo>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as(select_tokens!("WHERE t.token = $1")).bind(token).fetch_optional(pool).await?)
        })
    }

    pub async fn list_registration_tokens(&self) -> Result<Vec<RegistrationTokenInfo>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as(select_tokens!("ORDER BY t.created_ts, t.token")).fetch_all(pool).await?)
        })
    }

    /// Reserves one use of `token` for the registration UIA session `session_id`, in one
    /// transaction: the token must exist, not have expired, and have a use left after
    /// the registrations completed and those reserved by other sessions. The token's
    /// row is locked first (PostgreSQL: a row lock; SQLite: the single writer), so
    /// concurrent reservations queue and each counts the ones before it. `false` (and
    /// nothing changed) when the token cannot be used. A session's earlier reservation
    /// of another token is released, as the session names one token.
    pub async fn reserve_registration_token(&self, session_id: &str, token: &str, now: i64) -> Result<bool> {
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            let row: Option<(Option<i64>, i64)> = sqlx::query_as(
                "UPDATE registration_tokens SET completed = completed
                 WHERE token = $1 AND (expiry_ts IS NULL OR expiry_ts > $2)
                 RETURNING uses_allowed, completed",
            )
            .bind(token)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            let Some((uses_allowed, completed)) = row else {
                return Ok(false);
            };
            let (pending,): (i64,) =
                sqlx::query_as("SELECT COUNT(*) FROM uiaa_sessions WHERE registration_token = $1 AND session_id <> $2")
                    .bind(token)
                    .bind(session_id)
                    .fetch_one(&mut *tx)
                    .await?;
            if uses_allowed.is_some_and(|allowed| completed + pending >= allowed) {
                return Ok(false);
            }
            let updated = sqlx::query("UPDATE uiaa_sessions SET registration_token = $2 WHERE session_id = $1")
                .bind(session_id)
                .bind(token)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if updated == 0 {
                return Ok(false);
            }
            tx.commit().await?;
            Ok(true)
        })
    }

    /// Removes a token; `false` if there was none.
    pub async fn delete_registration_token(&self, token: &str) -> Result<bool> {
        on_pool!(self, write, |pool| {
            let n = sqlx::query("DELETE FROM registration_tokens WHERE token = $1")
                .bind(token)
                .execute(pool)
                .await?
                .rows_affected();
            Ok(n > 0)
        })
    }
}
