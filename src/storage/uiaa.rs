//! Storage of user-interactive authentication sessions.

use super::{Store, on_pool};
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct UiaaSession {
    pub session_id: String,
    pub purpose: String,
    pub user_id: Option<String>,
    pub completed: Vec<String>,
    pub registration_token: Option<String>,
    pub created_ts: i64,
}

type Row = (String, String, Option<String>, String, Option<String>, i64);

impl Store {
    pub async fn create_uiaa_session(&self, session: &UiaaSession) -> Result<()> {
        let completed = serde_json::to_string(&session.completed).map_err(Error::internal)?;
        on_pool!(self, write, |pool| {
            sqlx::query(
                "INSERT INTO uiaa_sessions (session_id, purpose, user_id, completed, registration_token, created_ts)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&session.session_id)
            .bind(&session.purpose)
            .bind(&session.user_id)
            .bind(&completed)
            .bind(&session.registration_token)
            .bind(session.created_ts)
            .execute(pool)
            .await?;
            Ok(())
        })
    }

    pub async fn get_uiaa_session(&self, session_id: &str) -> Result<Option<UiaaSession>> {
        let row: Option<Row> = on_pool!(self, read, |pool| {
            sqlx::query_as(
                "SELECT session_id, purpose, user_id, completed, registration_token, created_ts
                 FROM uiaa_sessions WHERE session_id = $1",
            )
            .bind(session_id)
            .fetch_optional(pool)
            .await?
        });
        row.map(|(session_id, purpose, user_id, completed, registration_token, created_ts)| {
            Ok(UiaaSession {
                session_id,
                purpose,
                user_id,
                completed: serde_json::from_str(&completed).map_err(Error::internal)?,
                registration_token,
                created_ts,
            })
        })
        .transpose()
    }

    /// Saves the stages completed so far and the registration token used, if any.
    pub async fn update_uiaa_session(&self, session: &UiaaSession) -> Result<()> {
        let completed = serde_json::to_string(&session.completed).map_err(Error::internal)?;
        on_pool!(self, write, |pool| {
            sqlx::query(
                "UPDATE uiaa_sessions SET completed = $2, registration_token = $3, user_id = $4 WHERE session_id = $1",
            )
            .bind(&session.session_id)
            .bind(&completed)
            .bind(&session.registration_token)
            .bind(&session.user_id)
            .execute(pool)
            .await?;
            Ok(())
        })
    }

    pub async fn delete_uiaa_session(&self, session_id: &str) -> Result<()> {
        on_pool!(self, write, |pool| {
            sqlx::query("DELETE FROM uiaa_sessions WHERE session_id = $1").bind(session_id).execute(pool).await?;
            Ok(())
        })
    }

    /// Forgets sessions started before `cutoff_ts`.
    pub async fn prune_uiaa_sessions(&self, cutoff_ts: i64) -> Result<u64> {
        on_pool!(self, write, |pool| {
            Ok(sqlx::query("DELETE FROM uiaa_sessions WHERE created_ts < $1")
                .bind(cutoff_ts)
                .execute(pool)
                .await?
                .rows_affected())
        })
    }
}
