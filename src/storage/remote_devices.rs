//! Storage of other servers' users' device lists (`remote_device_lists`): a copy kept
//! up to date by their servers' device list updates, marked stale when one was missed.

use super::{Store, on_pool};
use crate::error::Result;

/// A remote user's device list as stored.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct RemoteDeviceList {
    pub stream_id: i64,
    /// JSON object: device id to device keys.
    pub devices: String,
    pub master_key: Option<String>,
    pub self_signing_key: Option<String>,
    pub stale: bool,
}

/// One device's change, from an `m.device_list_update`.
pub struct DeviceUpdate<'a> {
    pub stream_id: i64,
    pub prev_ids: &'a [i64],
    pub device_id: &'a str,
    /// The device's new keys (none: unchanged, or deleted).
    pub keys: Option<&'a str>,
    pub deleted: bool,
}

impl Store {
    pub async fn get_remote_device_list(&self, user_id: &str) -> Result<Option<RemoteDeviceList>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as(
                "SELECT stream_id, devices, master_key, self_signing_key, stale FROM remote_device_lists
                 WHERE user_id = $1",
            )
            .bind(user_id)
            .fetch_optional(pool)
            .await?)
        })
    }

    /// Stores a user's whole device list, as fetched from their server (fresh).
    pub async fn put_remote_device_list(&self, user_id: &str, list: &RemoteDeviceList) -> Result<()> {
        on_pool!(self, write, |pool| {
            sqlx::query(
                "INSERT INTO remote_device_lists (user_id, stream_id, devices, master_key, self_signing_key, stale)
                 VALUES ($1, $2, $3, $4, $5, FALSE)
                 ON CONFLICT (user_id) DO UPDATE SET stream_id = excluded.stream_id, devices = excluded.devices,
                     master_key = excluded.master_key, self_signing_key = excluded.self_signing_key, stale = FALSE",
            )
            .bind(user_id)
            .bind(list.stream_id)
            .bind(&list.devices)
            .bind(&list.master_key)
            .bind(&list.self_signing_key)
            .execute(pool)
            .await?;
            Ok(())
        })
    }

    /// Applies one device's update to a stored list, in one transaction, when the list
    /// is fresh and has seen one of the update's `prev_ids` (or the update is not newer
    /// than it); otherwise marks the list stale. `change` gets the devices' JSON and
    /// answers the new one. Returns whether the update was applied; nothing happens to
    /// a list not stored.
    pub async fn apply_remote_device_update<F>(
        &self,
        user_id: &str,
        update: &DeviceUpdate<'_>,
        change: F,
    ) -> Result<bool>
    where
        F: FnOnce(&str) -> Result<String>,
    {
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            // A write first: it holds the row (PostgreSQL) or the writer (SQLite) for the
            // read-modify-write below.
            let locked = sqlx::query("UPDATE remote_device_lists SET stale = stale WHERE user_id = $1")
                .bind(user_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if locked == 0 {
                return Ok(false);
            }
            let (stream_id, devices, stale): (i64, String, bool) =
                sqlx::query_as("SELECT stream_id, devices, stale FROM remote_device_lists WHERE user_id = $1")
                    .bind(user_id)
                    .fetch_one(&mut *tx)
                    .await?;
            if stale || update.stream_id <= stream_id {
                // Stale: the next use fetches it all. Not newer: already applied.
                tx.commit().await?;
                return Ok(update.stream_id <= stream_id && !stale);
            }
            if !update.prev_ids.contains(&stream_id) {
                sqlx::query("UPDATE remote_device_lists SET stale = TRUE WHERE user_id = $1")
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                return Ok(false);
            }
            let devices = change(&devices)?;
            sqlx::query("UPDATE remote_device_lists SET devices = $2, stream_id = $3 WHERE user_id = $1")
                .bind(user_id)
                .bind(devices)
                .bind(update.stream_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    /// Replaces a stored list's cross-signing keys (those given).
    pub async fn update_remote_signing_keys(
        &self,
        user_id: &str,
        master_key: Option<&str>,
        self_signing_key: Option<&str>,
    ) -> Result<()> {
        on_pool!(self, write, |pool| {
            sqlx::query(
                "UPDATE remote_device_lists SET master_key = COALESCE($2, master_key),
                     self_signing_key = COALESCE($3, self_signing_key) WHERE user_id = $1",
            )
            .bind(user_id)
            .bind(master_key)
            .bind(self_signing_key)
            .execute(pool)
            .await?;
            Ok(())
        })
    }

    /// Marks these users' stored lists stale.
    pub async fn mark_remote_device_lists_stale(&self, user_ids: &[String]) -> Result<()> {
        if user_ids.is_empty() {
            return Ok(());
        }
        on_pool!(self, write, |pool| {
            let mut query = sqlx::QueryBuilder::new("UPDATE remote_device_lists SET stale = TRUE WHERE user_id IN (");
            let mut list = query.separated(", ");
            for id in user_ids {
                list.push_bind(id);
            }
            query.push(")");
            query.build().execute(pool).await?;
            Ok(())
        })
    }

    /// Marks stale the stored lists of the users joined to `room_id`.
    pub async fn mark_room_remote_device_lists_stale(&self, room_id: &str) -> Result<()> {
        on_pool!(self, write, |pool| {
            sqlx::query(
                "UPDATE remote_device_lists SET stale = TRUE WHERE user_id IN
                     (SELECT user_id FROM memberships WHERE room_id = $1 AND membership = 'join')",
            )
            .bind(room_id)
            .execute(pool)
            .await?;
            Ok(())
        })
    }

    /// Whether a local user is joined to a room `user_id` is joined to.
    pub async fn shares_room_with_local_user(&self, user_id: &str) -> Result<bool> {
        on_pool!(self, read, |pool| {
            let row: Option<(i32,)> = sqlx::query_as(
                "SELECT 1 FROM memberships a JOIN memberships b ON b.room_id = a.room_id
                 JOIN users u ON u.user_id = b.user_id
                 WHERE a.user_id = $1 AND a.membership = 'join' AND b.membership = 'join' LIMIT 1",
            )
            .bind(user_id)
            .fetch_optional(pool)
            .await?;
            Ok(row.is_some())
        })
    }
}
