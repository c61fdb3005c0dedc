//! Storage of devices, access tokens and refresh tokens.

use super::changes::{Change, Kind};
use super::{Store, on_pool, stream};
use crate::error::Result;

/// A device and its first access token (and refresh token), stored together.
pub struct NewSession<'a> {
    pub user_id: &'a str,
    pub device_id: &'a str,
    /// Set on a new device; on an existing one, replaces its name when given.
    pub display_name: Option<&'a str>,
    pub access_token_hash: &'a str,
    pub refresh_token_hash: Option<&'a str>,
    pub expires_ts: Option<i64>,
    pub created_ts: i64,
    /// The client's address: a login counts as the device being seen.
    pub ip: Option<&'a str>,
}

/// What an access token stands for.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct TokenInfo {
    pub user_id: String,
    pub device_id: String,
    pub expires_ts: Option<i64>,
    pub prev_refresh_hash: Option<String>,
    pub last_seen_ts: Option<i64>,
    pub deactivated: bool,
}

#[derive(Debug, sqlx::FromRow)]
pub struct DeviceInfo {
    pub device_id: String,
    pub display_name: Option<String>,
    pub last_seen_ts: Option<i64>,
    pub last_seen_ip: Option<String>,
}

/// Inserts (or reuses) a device and adds its tokens. Generic over the backend by
/// being a macro: the body is the same SQL on both.
macro_rules! insert_session_tx {
    ($tx:expr, $s:expr) => {{
        let s = $s;
        sqlx::query(
            "INSERT INTO devices (user_id, device_id, display_name, created_ts, last_seen_ts, last_seen_ip)
             VALUES ($1, $2, $3, $4, $4, $5)
             ON CONFLICT (user_id, device_id) DO UPDATE
             SET display_name = COALESCE(excluded.display_name, devices.display_name),
                 last_seen_ts = excluded.last_seen_ts, last_seen_ip = excluded.last_seen_ip",
        )
        .bind(s.user_id)
        .bind(s.device_id)
        .bind(s.display_name)
        .bind(s.created_ts)
        .bind(s.ip)
        .execute(&mut **$tx)
        .await?;
        sqlx::query(
            "INSERT INTO access_tokens (token_hash, user_id, device_id, created_ts, expires_ts, refresh_token_hash)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(s.access_token_hash)
        .bind(s.user_id)
        .bind(s.device_id)
        .bind(s.created_ts)
        .bind(s.expires_ts)
        .bind(s.refresh_token_hash)
        .execute(&mut **$tx)
        .await?;
        if let Some(refresh) = s.refresh_token_hash {
            sqlx::query(
                "INSERT INTO refresh_tokens (token_hash, user_id, device_id, created_ts) VALUES ($1, $2, $3, $4)",
            )
            .bind(refresh)
            .bind(s.user_id)
            .bind(s.device_id)
            .bind(s.created_ts)
            .execute(&mut **$tx)
            .await?;
        }
    }};
}

/// Deletes a user's devices (all, or all but one) with their tokens.
macro_rules! delete_devices_tx {
    ($tx:expr, $user_id:expr, $only:expr, $except:expr, $pos:expr) => {{
        let (user_id, only, except): (&str, Option<&str>, Option<&str>) = ($user_id, $only, $except);
        // Other users' clients must learn that this user's devices changed (at stream
        // position `$pos`). The user's lock first, as by every writer of device keys
        // (one lock order).
        super::e2e::record_device_list_change!(&mut **$tx, user_id, $pos);
        for sql in [
            "DELETE FROM access_tokens WHERE user_id = $1 AND ($2 IS NULL OR device_id = $2) AND ($3 IS NULL OR device_id <> $3)",
            "DELETE FROM refresh_tokens WHERE user_id = $1 AND ($2 IS NULL OR device_id = $2) AND ($3 IS NULL OR device_id <> $3)",
            "DELETE FROM devices WHERE user_id = $1 AND ($2 IS NULL OR device_id = $2) AND ($3 IS NULL OR device_id <> $3)",
            "DELETE FROM e2e_device_keys WHERE user_id = $1 AND ($2 IS NULL OR device_id = $2) AND ($3 IS NULL OR device_id <> $3)",
            "DELETE FROM e2e_one_time_keys WHERE user_id = $1 AND ($2 IS NULL OR device_id = $2) AND ($3 IS NULL OR device_id <> $3)",
            "DELETE FROM e2e_fallback_keys WHERE user_id = $1 AND ($2 IS NULL OR device_id = $2) AND ($3 IS NULL OR device_id <> $3)",
            "DELETE FROM to_device_messages WHERE recipient_user = $1 AND ($2 IS NULL OR recipient_device = $2)
             AND ($3 IS NULL OR recipient_device <> $3)",
            // The pushers the devices' access tokens set go with them (their queues first).
            "DELETE FROM push_queue WHERE user_id = $1 AND EXISTS (SELECT 1 FROM pushers p
             WHERE p.user_id = push_queue.user_id AND p.app_id = push_queue.app_id AND p.pushkey = push_queue.pushkey
             AND ($2 IS NULL OR p.device_id = $2) AND ($3 IS NULL OR p.device_id <> $3))",
            "DELETE FROM pushers WHERE user_id = $1 AND ($2 IS NULL OR device_id = $2) AND ($3 IS NULL OR device_id <> $3)",
            "DELETE FROM dehydrated_devices WHERE user_id = $1 AND ($2 IS NULL OR device_id = $2) AND ($3 IS NULL OR device_id <> $3)",
        ] {
            sqlx::query(sql).bind(user_id).bind(only).bind(except).execute(&mut **$tx).await?;
        }
    }};
}

/// The transaction operations other storage files share, for each backend's transaction.
pub(crate) trait SessionTx {
    async fn insert_session(&mut self, session: &NewSession<'_>) -> Result<()>;
    /// Deletes devices (`only` one, or all but `except`), recording the change at
    /// stream position `pos`.
    async fn delete_devices(&mut self, user_id: &str, only: Option<&str>, except: Option<&str>, pos: i64)
    -> Result<()>;
}

impl SessionTx for sqlx::Transaction<'_, sqlx::Sqlite> {
    async fn insert_session(&mut self, session: &NewSession<'_>) -> Result<()> {
        insert_session_tx!(self, session);
        Ok(())
    }
    async fn delete_devices(
        &mut self,
        user_id: &str,
        only: Option<&str>,
        except: Option<&str>,
        pos: i64,
    ) -> Result<()> {
        delete_devices_tx!(self, user_id, only, except, pos);
        Ok(())
    }
}

impl SessionTx for sqlx::Transaction<'_, sqlx::Postgres> {
    async fn insert_session(&mut self, session: &NewSession<'_>) -> Result<()> {
        insert_session_tx!(self, session);
        Ok(())
    }
    async fn delete_devices(
        &mut self,
        user_id: &str,
        only: Option<&str>,
        except: Option<&str>,
        pos: i64,
    ) -> Result<()> {
        delete_devices_tx!(self, user_id, only, except, pos);
        Ok(())
    }
}

impl Store {
    /// Stores a new login: the device (new or reused) and its tokens.
    pub async fn create_session(&self, session: NewSession<'_>) -> Result<()> {
        let _writing = self.devices_writing();
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            tx.insert_session(&session).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Looks up an access token by its hash (kept in the token cache, `read_cache.rs`).
    pub async fn find_access_token(&self, token_hash: &str) -> Result<Option<std::sync::Arc<TokenInfo>>> {
        if let Some(info) = self.caches.tokens.get(token_hash) {
            return Ok(Some(info));
        }
        let epoch = self.caches.tokens.epoch();
        let info: Option<TokenInfo> = on_pool!(self, read, |pool| {
            sqlx::query_as(
                "SELECT t.user_id, t.device_id, t.expires_ts, t.prev_refresh_hash, d.last_seen_ts, u.deactivated
                 FROM access_tokens t
                 JOIN devices d ON d.user_id = t.user_id AND d.device_id = t.device_id
                 JOIN users u ON u.user_id = t.user_id
                 WHERE t.token_hash = $1",
            )
            .bind(token_hash)
            .fetch_optional(pool)
            .await?
        });
        Ok(info.map(|info| {
            let info = std::sync::Arc::new(info);
            self.caches.tokens.keep(token_hash.to_owned(), info.clone(), epoch);
            info
        }))
    }

    /// The first use of a token obtained by refreshing revokes the refresh token it
    /// replaced, and the access tokens issued with that one.
    pub async fn retire_previous_refresh(&self, token_hash: &str, prev_refresh_hash: &str) -> Result<()> {
        let _writing = self.devices_writing();
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            sqlx::query("DELETE FROM access_tokens WHERE refresh_token_hash = $1")
                .bind(prev_refresh_hash)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM refresh_tokens WHERE token_hash = $1")
                .bind(prev_refresh_hash)
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE access_tokens SET prev_refresh_hash = NULL WHERE token_hash = $1")
                .bind(token_hash)
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE refresh_tokens SET prev_token_hash = NULL WHERE prev_token_hash = $1")
                .bind(prev_refresh_hash)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Swaps a refresh token for a new access token and refresh token. The old refresh
    /// token stays valid until one of the new tokens is used (so a client whose
    /// response was lost can retry, as the spec requires), but it has one live
    /// successor at most: refreshing with it again revokes the tokens its previous
    /// refresh issued. The refresh token's row is locked first (PostgreSQL: a row
    /// lock; SQLite: the single writer), so concurrent refreshes with one token queue
    /// and leave exactly one valid session. Returns the user and device, or `None` if
    /// the refresh token is unknown.
    pub async fn refresh_session(
        &self,
        refresh_hash: &str,
        new_access_hash: &str,
        new_refresh_hash: &str,
        expires_ts: i64,
        now: i64,
    ) -> Result<Option<(String, String)>> {
        let _writing = self.devices_writing();
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            let row: Option<(String, String, Option<String>)> = sqlx::query_as(
                "UPDATE refresh_tokens SET created_ts = created_ts WHERE token_hash = $1
                 RETURNING user_id, device_id, prev_token_hash",
            )
            .bind(refresh_hash)
            .fetch_optional(&mut *tx)
            .await?;
            let Some((user_id, device_id, prev)) = row else {
                return Ok(None);
            };
            // The unused tokens of an earlier refresh with this token go.
            for sql in [
                "DELETE FROM access_tokens WHERE prev_refresh_hash = $1",
                "DELETE FROM refresh_tokens WHERE prev_token_hash = $1",
            ] {
                sqlx::query(sql).bind(refresh_hash).execute(&mut *tx).await?;
            }
            if let Some(prev) = prev {
                // Using this refresh token retires the one it replaced.
                for sql in [
                    "DELETE FROM access_tokens WHERE refresh_token_hash = $1",
                    "DELETE FROM refresh_tokens WHERE token_hash = $1",
                ] {
                    sqlx::query(sql).bind(&prev).execute(&mut *tx).await?;
                }
            }
            sqlx::query(
                "INSERT INTO refresh_tokens (token_hash, user_id, device_id, created_ts, prev_token_hash)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(new_refresh_hash)
            .bind(&user_id)
            .bind(&device_id)
            .bind(now)
            .bind(refresh_hash)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO access_tokens
                 (token_hash, user_id, device_id, created_ts, expires_ts, refresh_token_hash, prev_refresh_hash)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(new_access_hash)
            .bind(&user_id)
            .bind(&device_id)
            .bind(now)
            .bind(expires_ts)
            .bind(new_refresh_hash)
            .bind(refresh_hash)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(Some((user_id, device_id)))
        })
    }

    /// Records when and from where a device was last seen (and so in the cached entry of
    /// the token `token_hash` that was used: only the time changes, so the caches stay).
    pub async fn touch_device(
        &self,
        token_hash: &str,
        user_id: &str,
        device_id: &str,
        ts: i64,
        ip: Option<&str>,
    ) -> Result<()> {
        on_pool!(self, write, |pool| {
            sqlx::query(
                "UPDATE devices SET last_seen_ts = $3, last_seen_ip = $4 WHERE user_id = $1 AND device_id = $2",
            )
            .bind(user_id)
            .bind(device_id)
            .bind(ts)
            .bind(ip)
            .execute(pool)
            .await?;
            Ok::<(), crate::error::Error>(())
        })?;
        self.caches.tokens.update(token_hash, |info| std::sync::Arc::make_mut(info).last_seen_ts = Some(ts));
        Ok(())
    }

    pub async fn list_devices(&self, user_id: &str) -> Result<Vec<DeviceInfo>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as(
                "SELECT device_id, display_name, last_seen_ts, last_seen_ip FROM devices
                 WHERE user_id = $1 ORDER BY device_id",
            )
            .bind(user_id)
            .fetch_all(pool)
            .await?)
        })
    }

    pub async fn get_device(&self, user_id: &str, device_id: &str) -> Result<Option<DeviceInfo>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as(
                "SELECT device_id, display_name, last_seen_ts, last_seen_ip FROM devices
                 WHERE user_id = $1 AND device_id = $2",
            )
            .bind(user_id)
            .bind(device_id)
            .fetch_optional(pool)
            .await?)
        })
    }

    /// Renames a device; `false` if it does not exist.
    pub async fn rename_device(&self, user_id: &str, device_id: &str, name: Option<&str>) -> Result<bool> {
        on_pool!(self, write, |pool| {
            let n = sqlx::query("UPDATE devices SET display_name = $3 WHERE user_id = $1 AND device_id = $2")
                .bind(user_id)
                .bind(device_id)
                .bind(name)
                .execute(pool)
                .await?
                .rows_affected();
            Ok(n > 0)
        })
    }

    /// Deletes the given devices of a user and every token they hold.
    pub async fn delete_devices(&self, user_id: &str, device_ids: &[&str]) -> Result<()> {
        let _writing = self.devices_writing();
        let positions = self.take_positions_for(1, &[Change::new(Kind::DeviceLists, "")]).await?;
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            for device_id in device_ids {
                tx.delete_devices(user_id, Some(device_id), None, positions.first()).await?;
            }
            stream::commit(tx, Some(positions)).await?;
            Ok(())
        })
    }

    /// Deletes all of a user's devices and tokens (`logout/all`).
    pub async fn delete_all_devices(&self, user_id: &str) -> Result<()> {
        let _writing = self.devices_writing();
        let positions = self.take_positions_for(1, &[Change::new(Kind::DeviceLists, "")]).await?;
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            tx.delete_devices(user_id, None, None, positions.first()).await?;
            stream::commit(tx, Some(positions)).await?;
            Ok(())
        })
    }
}
