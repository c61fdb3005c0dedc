//! Storage of dehydrated devices (MSC3814): at most one per user, a device row without
//! tokens plus the client's encrypted `device_data`.

use super::{Store, on_pool, sessions::SessionTx, stream};
use crate::error::{Error, Result};

impl Store {
    /// Makes `device_id` the user's dehydrated device, replacing (deleting) the one
    /// before, in one transaction. `M_INVALID_PARAM` when the id names another device
    /// of the user. Its keys are stored afterwards (`upload_e2e_keys`). Answers the id
    /// of the device replaced, when it was another.
    pub async fn put_dehydrated_device(
        &self,
        user_id: &str,
        device_id: &str,
        display_name: Option<&str>,
        device_data: &str,
        created_ts: i64,
    ) -> Result<Option<String>> {
        let _writing = self.devices_writing();
        let positions = self.take_positions(1).await?;
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            // The user's lock, taken first by every writer of the user's devices.
            super::e2e::record_device_list_change!(&mut *tx, user_id, positions.first());
            let previous: Option<(String,)> =
                sqlx::query_as("SELECT device_id FROM dehydrated_devices WHERE user_id = $1")
                    .bind(user_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            let taken: Option<(i32,)> = sqlx::query_as("SELECT 1 FROM devices WHERE user_id = $1 AND device_id = $2")
                .bind(user_id)
                .bind(device_id)
                .fetch_optional(&mut *tx)
                .await?;
            if taken.is_some() && previous.as_ref().is_none_or(|p| p.0 != device_id) {
                return Err(Error::invalid_param("That device id is taken by another of your devices"));
            }
            if let Some((previous,)) = &previous {
                tx.delete_devices(user_id, Some(previous), None, positions.first()).await?;
            }
            sqlx::query("INSERT INTO devices (user_id, device_id, display_name, created_ts) VALUES ($1, $2, $3, $4)")
                .bind(user_id)
                .bind(device_id)
                .bind(display_name)
                .bind(created_ts)
                .execute(&mut *tx)
                .await?;
            sqlx::query("INSERT INTO dehydrated_devices (user_id, device_id, device_data) VALUES ($1, $2, $3)")
                .bind(user_id)
                .bind(device_id)
                .bind(device_data)
                .execute(&mut *tx)
                .await?;
            stream::commit(tx, Some(positions)).await?;
            Ok(previous.map(|p| p.0).filter(|p| p != device_id))
        })
    }

    /// The user's dehydrated device: its id and `device_data` (JSON).
    pub async fn get_dehydrated_device(&self, user_id: &str) -> Result<Option<(String, String)>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as("SELECT device_id, device_data FROM dehydrated_devices WHERE user_id = $1")
                .bind(user_id)
                .fetch_optional(pool)
                .await?)
        })
    }

    /// Deletes the user's dehydrated device (the device, its keys and messages); answers
    /// its id, `None` if there was none.
    pub async fn delete_dehydrated_device(&self, user_id: &str) -> Result<Option<String>> {
        let _writing = self.devices_writing();
        let positions = self.take_positions(1).await?;
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            super::e2e::record_device_list_change!(&mut *tx, user_id, positions.first());
            let found: Option<(String,)> =
                sqlx::query_as("SELECT device_id FROM dehydrated_devices WHERE user_id = $1")
                    .bind(user_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            let Some((device_id,)) = found else { return Ok(None) };
            tx.delete_devices(user_id, Some(&device_id), None, positions.first()).await?;
            stream::commit(tx, Some(positions)).await?;
            Ok(Some(device_id))
        })
    }
}
