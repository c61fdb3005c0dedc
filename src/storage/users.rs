//! Storage of users and their profiles.

use std::collections::BTreeMap;

use serde_json::Value as JsonValue;

use super::changes::{Change, Kind};
use super::{Store, is_unique_violation, on_pool, sessions::SessionTx, stream};
use crate::{
    error::{Error, Result},
    storage::NewSession,
};

/// A user to create, with what registration hands out in the same transaction.
pub struct NewUser<'a> {
    pub user_id: &'a str,
    pub password_hash: Option<&'a str>,
    pub is_admin: bool,
    pub displayname: Option<&'a str>,
    pub created_ts: i64,
    /// A first device and access token, unless the client asked `inhibit_login`.
    pub session: Option<NewSession<'a>>,
    /// A registration token to count as used.
    pub registration_token: Option<&'a str>,
    /// A UIA session to close.
    pub uiaa_session: Option<&'a str>,
}

/// What login needs to know about a user.
#[derive(Debug, sqlx::FromRow)]
pub struct UserAuth {
    pub password_hash: Option<String>,
    pub is_admin: bool,
    pub deactivated: bool,
}

/// Takes the lock of `$user_id`'s account data, keys and devices until the transaction
/// ends, so that read-modify-writes of them run one after the other and none is lost:
/// on PostgreSQL an advisory transaction lock on the user id (any user id, with or
/// without a row); SQLite has a single writer and needs none. `$conn` is a `&mut`
/// connection of the transaction.
macro_rules! lock_user {
    ($conn:expr, $user_id:expr) => {{
        if $crate::storage::users::is_postgres_conn(&*$conn) {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))").bind($user_id).execute($conn).await?;
        }
    }};
}
pub(crate) use lock_user;

/// Whether a connection is PostgreSQL's.
pub(crate) fn is_postgres_conn<C: sqlx::Connection>(_: &C) -> bool {
    <C::Database as sqlx::Database>::NAME == "PostgreSQL"
}

impl Store {
    /// Creates a user; `M_USER_IN_USE` if the id is taken (also by a deactivated user).
    pub async fn create_user(&self, new: NewUser<'_>) -> Result<()> {
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            let inserted = sqlx::query(
                "INSERT INTO users (user_id, password_hash, is_admin, deactivated, created_ts) VALUES ($1, $2, $3, FALSE, $4)",
            )
            .bind(new.user_id)
            .bind(new.password_hash)
            .bind(new.is_admin)
            .bind(new.created_ts)
            .execute(&mut *tx)
            .await;
            match inserted {
                Err(e) if is_unique_violation(&e) => {
                    return Err(Error::user_in_use("User ID already taken"));
                }
                other => other?,
            };
            if let Some(name) = new.displayname {
                sqlx::query("INSERT INTO profile_fields (user_id, field, value) VALUES ($1, 'displayname', $2)")
                    .bind(new.user_id)
                    .bind(JsonValue::from(name).to_string())
                    .execute(&mut *tx)
                    .await?;
            }
            if let Some(session) = &new.session {
                tx.insert_session(session).await?;
            }
            if let Some(token) = new.registration_token {
                // The use is taken here, conditionally, whatever the UIA stage saw: a
                // token with N uses makes N accounts at most.
                let used = sqlx::query(
                    "UPDATE registration_tokens SET completed = completed + 1
                     WHERE token = $1 AND (uses_allowed IS NULL OR completed < uses_allowed)",
                )
                .bind(token)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if used == 0 {
                    return Err(Error::forbidden("The registration token is used up or was revoked"));
                }
            }
            if let Some(session_id) = new.uiaa_session {
                // One UIA session makes one account: a second request finishing the
                // same session finds it gone.
                let closed = sqlx::query("DELETE FROM uiaa_sessions WHERE session_id = $1")
                    .bind(session_id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if closed == 0 {
                    return Err(Error::unknown(
                        axum::http::StatusCode::BAD_REQUEST,
                        "Unknown or expired UIA session (it may have been used already)",
                    ));
                }
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Whether a user id is taken (by an active or a deactivated account).
    pub async fn user_exists(&self, user_id: &str) -> Result<bool> {
        on_pool!(self, read, |pool| {
            let row: Option<(String,)> = sqlx::query_as("SELECT user_id FROM users WHERE user_id = $1")
                .bind(user_id)
                .fetch_optional(pool)
                .await?;
            Ok(row.is_some())
        })
    }

    pub async fn get_user_auth(&self, user_id: &str) -> Result<Option<UserAuth>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as("SELECT password_hash, is_admin, deactivated FROM users WHERE user_id = $1")
                .bind(user_id)
                .fetch_optional(pool)
                .await?)
        })
    }

    /// Replaces a user's password hash; with `keep_device`, signs out every other
    /// device, or all of them when `keep_device` is `None` and `logout` is set.
    pub async fn set_password_hash(
        &self,
        user_id: &str,
        hash: &str,
        logout: bool,
        keep_device: Option<&str>,
    ) -> Result<bool> {
        let _writing = self.devices_writing();
        let positions =
            if logout { Some(self.take_positions_for(1, &[Change::new(Kind::DeviceLists, "")]).await?) } else { None };
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            let updated = sqlx::query("UPDATE users SET password_hash = $2 WHERE user_id = $1 AND NOT deactivated")
                .bind(user_id)
                .bind(hash)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if updated == 0 {
                return Ok(false);
            }
            if let Some(positions) = &positions {
                tx.delete_devices(user_id, None, keep_device, positions.first()).await?;
            }
            stream::commit(tx, positions).await?;
            Ok(true)
        })
    }

    /// Deactivates a user: no password, no devices or tokens, no profile; with
    /// `erase`, no account data either. The id stays taken.
    pub async fn deactivate_user(&self, user_id: &str, erase: bool) -> Result<()> {
        let _writing = self.devices_writing();
        let positions = self.take_positions(1).await?;
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            sqlx::query("UPDATE users SET deactivated = TRUE, password_hash = NULL WHERE user_id = $1")
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
            tx.delete_devices(user_id, None, None, positions.first()).await?;
            sqlx::query("DELETE FROM profile_fields WHERE user_id = $1").bind(user_id).execute(&mut *tx).await?;
            sqlx::query("DELETE FROM uiaa_sessions WHERE user_id = $1").bind(user_id).execute(&mut *tx).await?;
            if erase {
                sqlx::query("DELETE FROM account_data WHERE user_id = $1").bind(user_id).execute(&mut *tx).await?;
            }
            stream::commit(tx, Some(positions)).await?;
            Ok(())
        })
    }

    /// A user's profile fields, or `None` if no such user exists or it is deactivated.
    pub async fn get_profile(&self, user_id: &str) -> Result<Option<BTreeMap<String, JsonValue>>> {
        on_pool!(self, read, |pool| {
            let active: Option<(bool,)> = sqlx::query_as("SELECT deactivated FROM users WHERE user_id = $1")
                .bind(user_id)
                .fetch_optional(pool)
                .await?;
            if !matches!(active, Some((false,))) {
                return Ok(None);
            }
            let rows: Vec<(String, String)> =
                sqlx::query_as("SELECT field, value FROM profile_fields WHERE user_id = $1")
                    .bind(user_id)
                    .fetch_all(pool)
                    .await?;
            let mut profile = BTreeMap::new();
            for (field, value) in rows {
                let value = serde_json::from_str(&value).map_err(Error::internal)?;
                profile.insert(field, value);
            }
            Ok(Some(profile))
        })
    }

    /// Sets (or with `None`, removes) one profile field, after `check` has accepted the
    /// whole profile as it would then be, in one transaction. The user's row is locked
    /// first (PostgreSQL: a row lock; SQLite: the single writer), so concurrent
    /// changes are checked one after the other. `M_NOT_FOUND` for no active user.
    pub async fn update_profile_field<F>(
        &self,
        user_id: &str,
        field: &str,
        value: Option<&JsonValue>,
        check: F,
    ) -> Result<()>
    where
        F: FnOnce(&BTreeMap<String, JsonValue>) -> Result<()>,
    {
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            let locked = sqlx::query("UPDATE users SET created_ts = created_ts WHERE user_id = $1 AND NOT deactivated")
                .bind(user_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if locked == 0 {
                return Err(Error::not_found("No such user"));
            }
            let rows: Vec<(String, String)> =
                sqlx::query_as("SELECT field, value FROM profile_fields WHERE user_id = $1")
                    .bind(user_id)
                    .fetch_all(&mut *tx)
                    .await?;
            let mut profile = BTreeMap::new();
            for (name, value) in rows {
                profile.insert(name, serde_json::from_str(&value).map_err(Error::internal)?);
            }
            match value {
                Some(value) => profile.insert(field.to_owned(), value.clone()),
                None => profile.remove(field),
            };
            check(&profile)?;
            match value {
                Some(value) => {
                    sqlx::query(
                        "INSERT INTO profile_fields (user_id, field, value) VALUES ($1, $2, $3)
                         ON CONFLICT (user_id, field) DO UPDATE SET value = excluded.value",
                    )
                    .bind(user_id)
                    .bind(field)
                    .bind(value.to_string())
                    .execute(&mut *tx)
                    .await?;
                }
                None => {
                    sqlx::query("DELETE FROM profile_fields WHERE user_id = $1 AND field = $2")
                        .bind(user_id)
                        .bind(field)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            tx.commit().await?;
            Ok(())
        })
    }

    pub async fn delete_profile_field(&self, user_id: &str, field: &str) -> Result<()> {
        on_pool!(self, write, |pool| {
            sqlx::query("DELETE FROM profile_fields WHERE user_id = $1 AND field = $2")
                .bind(user_id)
                .bind(field)
                .execute(pool)
                .await?;
            Ok(())
        })
    }
}
