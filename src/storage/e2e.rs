//! Storage of end-to-end encryption keys: device keys, one-time keys, fallback keys.

use std::collections::HashMap;

use super::changes::{Change, Kind};
use super::{Store, on_pool, stream};
use crate::error::Result;

/// Records on the stream, at position `$pos`, that `user`'s device list changed,
/// inside the caller's transaction (`$conn` is a `&mut` connection of it); other users'
/// syncs report it. It first takes the user's lock (`users::lock_user`), as every
/// writer of a user's keys and devices does, so that concurrent changes of them run
/// one after the other and none is lost.
macro_rules! record_device_list_change {
    ($conn:expr, $user:expr, $pos:expr) => {{
        $crate::storage::users::lock_user!($conn, $user);
        sqlx::query("INSERT INTO device_list_changes (user_id, stream_pos) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind($user)
            .bind($pos)
            .execute($conn)
            .await?;
    }};
}
pub(crate) use record_device_list_change;

/// Ids bound in one `IN (...)` list, well under both backends' limits on parameters.
const IN_LIST_CHUNK: usize = 1000;

/// What a signature upload replaces: cross-signing keys by type and device keys by
/// device, as (name, new JSON).
#[derive(Default)]
pub struct SignedKeyChanges {
    pub cross_signing: Vec<(String, String)>,
    pub devices: Vec<(String, String)>,
}

/// A key to store: `algorithm:id`, its algorithm, and the key object as JSON.
pub struct NewKey<'a> {
    pub key_id: &'a str,
    pub algorithm: &'a str,
    pub json: &'a str,
}

impl Store {
    /// Stores what one `/keys/upload` carries, in one transaction. Existing one-time
    /// keys with the same id are kept as they are; a fallback key replaces the
    /// device's previous one of its algorithm.
    pub async fn upload_e2e_keys(
        &self,
        user_id: &str,
        device_id: &str,
        device_keys: Option<&str>,
        one_time: &[NewKey<'_>],
        fallback: &[NewKey<'_>],
    ) -> Result<()> {
        let _writing = self.caches.key_status.begin();
        let positions = match device_keys {
            Some(_) => Some(self.take_positions_for(1, &[Change::new(Kind::DeviceLists, "")]).await?),
            None => None,
        };
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            if let (Some(json), Some(positions)) = (device_keys, &positions) {
                // The user's lock first, as every writer of device keys takes it
                // (one lock order, no deadlock).
                record_device_list_change!(&mut *tx, user_id, positions.first());
                sqlx::query(
                    "INSERT INTO e2e_device_keys (user_id, device_id, json) VALUES ($1, $2, $3)
                     ON CONFLICT (user_id, device_id) DO UPDATE SET json = excluded.json",
                )
                .bind(user_id)
                .bind(device_id)
                .bind(json)
                .execute(&mut *tx)
                .await?;
            }
            for chunk in one_time.chunks(200) {
                let mut query = sqlx::QueryBuilder::new(
                    "INSERT INTO e2e_one_time_keys (user_id, device_id, algorithm, key_id, json) ",
                );
                query.push_values(chunk, |mut row, key| {
                    row.push_bind(user_id)
                        .push_bind(device_id)
                        .push_bind(key.algorithm)
                        .push_bind(key.key_id)
                        .push_bind(key.json);
                });
                query.push(" ON CONFLICT DO NOTHING");
                query.build().execute(&mut *tx).await?;
            }
            for key in fallback {
                sqlx::query(
                    "INSERT INTO e2e_fallback_keys (user_id, device_id, algorithm, key_id, json, used)
                     VALUES ($1, $2, $3, $4, $5, FALSE)
                     ON CONFLICT (user_id, device_id, algorithm) DO UPDATE
                     SET key_id = excluded.key_id, json = excluded.json, used = FALSE",
                )
                .bind(user_id)
                .bind(device_id)
                .bind(key.algorithm)
                .bind(key.key_id)
                .bind(key.json)
                .execute(&mut *tx)
                .await?;
            }
            stream::commit(tx, positions).await?;
            Ok(())
        })
    }

    /// The stream position of the latest claim of the device's keys (0: none).
    pub async fn get_key_claim_position(&self, user_id: &str, device_id: &str) -> Result<i64> {
        let row: Option<(i64,)> = on_pool!(self, read, |pool| {
            sqlx::query_as("SELECT stream_pos FROM e2e_key_claims WHERE user_id = $1 AND device_id = $2")
                .bind(user_id)
                .bind(device_id)
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map_or(0, |r| r.0))
    }

    /// What a device's `/sync` reports of its keys, in one query: its unclaimed one-time
    /// keys by algorithm, and the algorithms of its fallback keys not handed out yet.
    /// Kept in the key status cache (`read_cache.rs`).
    pub async fn get_key_status(&self, user_id: &str, device_id: &str) -> Result<(HashMap<String, i64>, Vec<String>)> {
        let key = (user_id.to_owned(), device_id.to_owned());
        self.caches.key_status.get_or_read(key, || async {
        let rows: Vec<(String, String, i64)> = on_pool!(self, read, |pool| {
            sqlx::query_as(
                "SELECT 'one_time', algorithm, COUNT(*) FROM e2e_one_time_keys WHERE user_id = $1 AND device_id = $2
                 GROUP BY algorithm
                 UNION ALL
                 SELECT 'fallback', algorithm, 0 FROM e2e_fallback_keys WHERE user_id = $1 AND device_id = $2 AND NOT used",
            )
            .bind(user_id)
            .bind(device_id)
            .fetch_all(pool)
            .await?
        });
        let mut counts = HashMap::new();
        let mut fallback = Vec::new();
        for (kind, algorithm, n) in rows {
            if kind == "one_time" {
                counts.insert(algorithm, n);
            } else {
                fallback.push(algorithm);
            }
        }
        fallback.sort();
        Ok((counts, fallback))
        })
        .await
    }

    /// Device keys of the devices of several users, as (user id, device id, JSON), in
    /// one query per 1,000 users.
    pub async fn get_device_keys_of_users(&self, user_ids: &[&str]) -> Result<Vec<(String, String, String)>> {
        let mut keys = Vec::new();
        for chunk in user_ids.chunks(IN_LIST_CHUNK) {
            let rows: Vec<(String, String, String)> = on_pool!(self, read, |pool| {
                let mut query =
                    sqlx::QueryBuilder::new("SELECT user_id, device_id, json FROM e2e_device_keys WHERE user_id IN (");
                let mut list = query.separated(", ");
                for id in chunk {
                    list.push_bind(*id);
                }
                query.push(") ORDER BY user_id, device_id");
                query.build_query_as().fetch_all(pool).await?
            });
            keys.extend(rows);
        }
        Ok(keys)
    }

    /// The display names of the devices of several users that have one, as (user id,
    /// device id, name), in one query per 1,000 users.
    pub async fn get_device_names_of_users(&self, user_ids: &[&str]) -> Result<Vec<(String, String, String)>> {
        let mut names = Vec::new();
        for chunk in user_ids.chunks(IN_LIST_CHUNK) {
            let rows: Vec<(String, String, String)> = on_pool!(self, read, |pool| {
                let mut query = sqlx::QueryBuilder::new(
                    "SELECT user_id, device_id, display_name FROM devices
                     WHERE display_name IS NOT NULL AND user_id IN (",
                );
                let mut list = query.separated(", ");
                for id in chunk {
                    list.push_bind(*id);
                }
                query.push(")");
                query.build_query_as().fetch_all(pool).await?
            });
            names.extend(rows);
        }
        Ok(names)
    }

    /// Cross-signing keys of several users, as (user id, key type, JSON), in one query
    /// per 1,000 users.
    pub async fn get_cross_signing_keys_of_users(&self, user_ids: &[&str]) -> Result<Vec<(String, String, String)>> {
        let mut keys = Vec::new();
        for chunk in user_ids.chunks(IN_LIST_CHUNK) {
            let rows: Vec<(String, String, String)> = on_pool!(self, read, |pool| {
                let mut query = sqlx::QueryBuilder::new(
                    "SELECT user_id, key_type, json FROM e2e_cross_signing_keys WHERE user_id IN (",
                );
                let mut list = query.separated(", ");
                for id in chunk {
                    list.push_bind(*id);
                }
                query.push(")");
                query.build_query_as().fetch_all(pool).await?
            });
            keys.extend(rows);
        }
        Ok(keys)
    }

    /// Hands out one key of the given algorithm for each (user, device, algorithm), in
    /// one transaction: a one-time key (deleted as it is claimed), else the fallback
    /// key (marked used), and records the claim at a stream position (`e2e_key_claims`).
    /// Answers (key id, JSON) or `None` for each, in order.
    /// Devices are claimed from in sorted order, so concurrent claims lock rows in the
    /// same order (no deadlock); on PostgreSQL a one-time key another claim holds is
    /// skipped rather than waited for, so that claim does not fall back needlessly.
    pub async fn claim_keys(&self, wanted: &[(&str, &str, &str)]) -> Result<Vec<Option<(String, String)>>> {
        let _writing = self.caches.key_status.begin();
        let claim_one_time = match self.dialect() {
            super::Dialect::Sqlite => {
                "DELETE FROM e2e_one_time_keys WHERE (user_id, device_id, key_id) IN (
                     SELECT user_id, device_id, key_id FROM e2e_one_time_keys
                     WHERE user_id = $1 AND device_id = $2 AND algorithm = $3 ORDER BY key_id LIMIT 1)
                 RETURNING key_id, json"
            }
            super::Dialect::Postgres => {
                "DELETE FROM e2e_one_time_keys WHERE (user_id, device_id, key_id) IN (
                     SELECT user_id, device_id, key_id FROM e2e_one_time_keys
                     WHERE user_id = $1 AND device_id = $2 AND algorithm = $3 ORDER BY key_id LIMIT 1
                     FOR UPDATE SKIP LOCKED)
                 RETURNING key_id, json"
            }
        };
        let mut order: Vec<usize> = (0..wanted.len()).collect();
        order.sort_by_key(|&i| wanted[i]);
        let claims: Vec<Change> = wanted.iter().map(|w| Change::new(Kind::KeyClaims, w.0)).collect();
        let positions = self.take_positions_for(1, &claims).await?;
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            let mut claimed = vec![None; wanted.len()];
            for i in order {
                let (user_id, device_id, algorithm) = wanted[i];
                let one_time: Option<(String, String)> = sqlx::query_as(claim_one_time)
                    .bind(user_id)
                    .bind(device_id)
                    .bind(algorithm)
                    .fetch_optional(&mut *tx)
                    .await?;
                claimed[i] = match one_time {
                    Some(key) => Some(key),
                    None => {
                        sqlx::query_as(
                            "UPDATE e2e_fallback_keys SET used = TRUE
                         WHERE user_id = $1 AND device_id = $2 AND algorithm = $3
                         RETURNING key_id, json",
                        )
                        .bind(user_id)
                        .bind(device_id)
                        .bind(algorithm)
                        .fetch_optional(&mut *tx)
                        .await?
                    }
                };
                if claimed[i].is_some() {
                    // The device's `/sync` answers with its new counts.
                    sqlx::query(
                        "INSERT INTO e2e_key_claims (user_id, device_id, stream_pos) VALUES ($1, $2, $3)
                         ON CONFLICT (user_id, device_id) DO UPDATE SET stream_pos = excluded.stream_pos",
                    )
                    .bind(user_id)
                    .bind(device_id)
                    .bind(positions.first())
                    .execute(&mut *tx)
                    .await?;
                }
            }
            stream::commit(tx, Some(positions)).await?;
            Ok(claimed)
        })
    }
}

/// A to-device message for one device.
pub struct NewToDevice<'a> {
    pub user_id: &'a str,
    pub device_id: &'a str,
    pub content: &'a str,
}

impl Store {
    /// Queues one sendToDevice request's messages; `None` when the sender's device
    /// already sent this transaction id (nothing is queued again).
    pub async fn queue_to_device(
        &self,
        sender: &str,
        sender_device: &str,
        txn_id: &str,
        event_type: &str,
        messages: &[NewToDevice<'_>],
    ) -> Result<Option<i64>> {
        let recipients: Vec<Change> = messages.iter().map(|m| Change::new(Kind::ToDevice, m.user_id)).collect();
        let positions = self.take_positions_for(1, &recipients).await?;
        let pos = positions.first();
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            let fresh = sqlx::query(
                "INSERT INTO to_device_txns (sender, sender_device, txn_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            )
            .bind(sender)
            .bind(sender_device)
            .bind(txn_id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if !fresh {
                return Ok(None);
            }
            let rows: Vec<(i32, &NewToDevice<'_>)> = messages.iter().enumerate().map(|(i, m)| (i as i32, m)).collect();
            for chunk in rows.chunks(200) {
                let mut query = sqlx::QueryBuilder::new(
                    "INSERT INTO to_device_messages
                     (recipient_user, recipient_device, stream_pos, seq, sender, event_type, content) ",
                );
                query.push_values(chunk, |mut row, (seq, m)| {
                    row.push_bind(m.user_id)
                        .push_bind(m.device_id)
                        .push_bind(pos)
                        .push_bind(*seq)
                        .push_bind(sender)
                        .push_bind(event_type)
                        .push_bind(m.content);
                });
                query.build().execute(&mut *tx).await?;
            }
            stream::commit(tx, Some(positions)).await?;
            Ok(Some(pos))
        })
    }

    /// The device's queued messages up to `head`, oldest first, as (position, sender,
    /// type, content).
    pub async fn get_to_device(
        &self,
        user_id: &str,
        device_id: &str,
        head: i64,
    ) -> Result<Vec<(i64, String, String, String)>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as(
                "SELECT stream_pos, sender, event_type, content FROM to_device_messages
                 WHERE recipient_user = $1 AND recipient_device = $2 AND stream_pos <= $3
                 ORDER BY stream_pos, seq",
            )
            .bind(user_id)
            .bind(device_id)
            .bind(head)
            .fetch_all(pool)
            .await?)
        })
    }

    /// Drops the device's messages up to `acked` (it has synced from a later token).
    pub async fn delete_to_device(&self, user_id: &str, device_id: &str, acked: i64) -> Result<()> {
        on_pool!(self, write, |pool| {
            sqlx::query(
                "DELETE FROM to_device_messages WHERE recipient_user = $1 AND recipient_device = $2 AND stream_pos <= $3",
            )
            .bind(user_id)
            .bind(device_id)
            .bind(acked)
            .execute(pool)
            .await?;
            Ok(())
        })
    }

    /// Users whose device list changed after `from` (up to `to`) and who are `user_id`
    /// or share a joined room with them, and the members of `user_id`'s rooms that
    /// turned encrypted in that span.
    pub async fn get_device_list_changes(&self, user_id: &str, from: i64, to: i64) -> Result<Vec<String>> {
        on_pool!(self, read, |pool| {
            let rows: Vec<(String,)> = sqlx::query_as(
                "SELECT c.user_id FROM device_list_changes c
                 WHERE c.stream_pos > $2 AND c.stream_pos <= $3 AND (c.user_id = $1 OR EXISTS (
                     SELECT 1 FROM memberships mine JOIN memberships theirs ON theirs.room_id = mine.room_id
                     WHERE mine.user_id = $1 AND mine.membership = 'join'
                       AND theirs.user_id = c.user_id AND theirs.membership = 'join'))
                 UNION
                 SELECT theirs.user_id FROM memberships mine
                 JOIN current_state enc ON enc.room_id = mine.room_id
                   AND enc.event_type = 'm.room.encryption' AND enc.state_key = ''
                 JOIN events e ON e.event_id = enc.event_id
                 JOIN memberships theirs ON theirs.room_id = mine.room_id
                 WHERE mine.user_id = $1 AND mine.membership = 'join' AND theirs.membership = 'join'
                   AND theirs.user_id <> $1 AND e.stream_ordering > $2 AND e.stream_ordering <= $3",
            )
            .bind(user_id)
            .bind(from)
            .bind(to)
            .fetch_all(pool)
            .await?;
            Ok(rows.into_iter().map(|r| r.0).collect())
        })
    }

    /// The joined members (`user_id` too) of `user_id`'s encrypted rooms whose
    /// membership row changed after `from` (up to `to`), as (room, user, JSON of their
    /// latest member event at `from`, `None` if they had none): whether they were in
    /// the room already, or only changed their profile.
    pub async fn get_encrypted_member_changes(
        &self,
        user_id: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, String, Option<String>)>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as(
                "SELECT theirs.room_id, theirs.user_id, (
                     SELECT e.json FROM events e
                     WHERE e.room_id = theirs.room_id AND e.state_key = theirs.user_id
                       AND e.event_type = 'm.room.member' AND e.stream_ordering <= $2
                     ORDER BY e.stream_ordering DESC LIMIT 1)
                 FROM memberships mine
                 JOIN current_state enc ON enc.room_id = mine.room_id
                   AND enc.event_type = 'm.room.encryption' AND enc.state_key = ''
                 JOIN memberships theirs ON theirs.room_id = mine.room_id
                 WHERE mine.user_id = $1 AND mine.membership = 'join' AND theirs.membership = 'join'
                   AND theirs.stream_ordering > $2 AND theirs.stream_ordering <= $3",
            )
            .bind(user_id)
            .bind(from)
            .bind(to)
            .fetch_all(pool)
            .await?)
        })
    }

    /// Users with whom `user_id` shares no joined encrypted room any more, among those
    /// whose membership ended in the span after `from` (up to `to`): members of the
    /// encrypted rooms `user_id` left or was removed from, and users who left or were
    /// removed from encrypted rooms `user_id` is in.
    pub async fn get_device_list_left(&self, user_id: &str, from: i64, to: i64) -> Result<Vec<String>> {
        on_pool!(self, read, |pool| {
            let rows: Vec<(String,)> = sqlx::query_as(
                "SELECT c.user_id FROM (
                     SELECT theirs.user_id FROM memberships mine
                     JOIN current_state enc ON enc.room_id = mine.room_id
                       AND enc.event_type = 'm.room.encryption' AND enc.state_key = ''
                     JOIN memberships theirs ON theirs.room_id = mine.room_id
                     WHERE mine.user_id = $1 AND mine.membership IN ('leave', 'ban')
                       AND mine.stream_ordering > $2 AND mine.stream_ordering <= $3
                       AND (theirs.membership = 'join' OR theirs.stream_ordering > $2)
                     UNION
                     SELECT theirs.user_id FROM memberships mine
                     JOIN current_state enc ON enc.room_id = mine.room_id
                       AND enc.event_type = 'm.room.encryption' AND enc.state_key = ''
                     JOIN memberships theirs ON theirs.room_id = mine.room_id
                     WHERE mine.user_id = $1 AND mine.membership = 'join' AND theirs.membership IN ('leave', 'ban')
                       AND theirs.stream_ordering > $2 AND theirs.stream_ordering <= $3
                 ) c
                 WHERE c.user_id <> $1 AND NOT EXISTS (
                     SELECT 1 FROM memberships m2
                     JOIN current_state e2 ON e2.room_id = m2.room_id
                       AND e2.event_type = 'm.room.encryption' AND e2.state_key = ''
                     JOIN memberships t2 ON t2.room_id = m2.room_id
                     WHERE m2.user_id = $1 AND m2.membership = 'join'
                       AND t2.user_id = c.user_id AND t2.membership = 'join')",
            )
            .bind(user_id)
            .bind(from)
            .bind(to)
            .fetch_all(pool)
            .await?;
            Ok(rows.into_iter().map(|r| r.0).collect())
        })
    }

    /// A user's cross-signing keys, as (key type, JSON).
    pub async fn get_cross_signing_keys(&self, user_id: &str) -> Result<Vec<(String, String)>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as("SELECT key_type, json FROM e2e_cross_signing_keys WHERE user_id = $1")
                .bind(user_id)
                .fetch_all(pool)
                .await?)
        })
    }

    /// Reads a user's device keys and cross-signing keys (as (device id or key type,
    /// JSON)), lets `change` answer which to replace, and writes those, in one
    /// transaction that locks the user first: concurrent changes of a user's keys
    /// (signature uploads, key uploads, device deletions, which take the lock first
    /// too) run one after the other, and none is lost. `false` when `change` replaced
    /// nothing.
    pub async fn update_signed_keys<F>(&self, user_id: &str, change: F) -> Result<bool>
    where
        F: FnOnce(&[(String, String)], &[(String, String)]) -> Result<SignedKeyChanges>,
    {
        let positions = self.take_positions_for(1, &[Change::new(Kind::DeviceLists, "")]).await?;
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            record_device_list_change!(&mut *tx, user_id, positions.first());
            let devices: Vec<(String, String)> =
                sqlx::query_as("SELECT device_id, json FROM e2e_device_keys WHERE user_id = $1 ORDER BY device_id")
                    .bind(user_id)
                    .fetch_all(&mut *tx)
                    .await?;
            let cross: Vec<(String, String)> =
                sqlx::query_as("SELECT key_type, json FROM e2e_cross_signing_keys WHERE user_id = $1")
                    .bind(user_id)
                    .fetch_all(&mut *tx)
                    .await?;
            let changes = change(&devices, &cross)?;
            if changes.cross_signing.is_empty() && changes.devices.is_empty() {
                return Ok(false);
            }
            for (key_type, json) in &changes.cross_signing {
                sqlx::query("UPDATE e2e_cross_signing_keys SET json = $3 WHERE user_id = $1 AND key_type = $2")
                    .bind(user_id)
                    .bind(key_type)
                    .bind(json)
                    .execute(&mut *tx)
                    .await?;
            }
            for (device_id, json) in &changes.devices {
                sqlx::query("UPDATE e2e_device_keys SET json = $3 WHERE user_id = $1 AND device_id = $2")
                    .bind(user_id)
                    .bind(device_id)
                    .bind(json)
                    .execute(&mut *tx)
                    .await?;
            }
            stream::commit(tx, Some(positions)).await?;
            Ok(true)
        })
    }

    /// Stores (or replaces) a user's cross-signing keys by type, and records the
    /// change on the stream, in one transaction. With `only_if_no_master`, nothing is
    /// stored (`false`) if the user has a master key by then: the caller checked that
    /// none existed, and replacing one takes the password.
    pub async fn store_cross_signing_keys(
        &self,
        user_id: &str,
        keys: &[(&str, &str)],
        only_if_no_master: bool,
    ) -> Result<bool> {
        let positions = self.take_positions_for(1, &[Change::new(Kind::DeviceLists, "")]).await?;
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            record_device_list_change!(&mut *tx, user_id, positions.first());
            if only_if_no_master {
                let master: Option<(i32,)> =
                    sqlx::query_as("SELECT 1 FROM e2e_cross_signing_keys WHERE user_id = $1 AND key_type = 'master'")
                        .bind(user_id)
                        .fetch_optional(&mut *tx)
                        .await?;
                if master.is_some() {
                    return Ok(false);
                }
            }
            for (key_type, json) in keys {
                sqlx::query(
                    "INSERT INTO e2e_cross_signing_keys (user_id, key_type, json) VALUES ($1, $2, $3)
                     ON CONFLICT (user_id, key_type) DO UPDATE SET json = excluded.json",
                )
                .bind(user_id)
                .bind(*key_type)
                .bind(*json)
                .execute(&mut *tx)
                .await?;
            }
            stream::commit(tx, Some(positions)).await?;
            Ok(true)
        })
    }
}

impl Store {
    /// Records that a remote user's devices or cross-signing keys changed (their server
    /// told us), so that local users who share a room with them re-query the keys.
    pub async fn record_remote_device_list_change(&self, user_id: &str) -> Result<()> {
        let positions = self.take_positions_for(1, &[Change::new(Kind::DeviceLists, "")]).await?;
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            record_device_list_change!(&mut *tx, user_id, positions.first());
            stream::commit(tx, Some(positions)).await?;
            Ok(())
        })
    }
}

/// The position of the latest change to a user's device list (0: none), the
/// `stream_id` other servers see.
macro_rules! latest_device_list_change {
    ($executor:expr, $user_id:expr) => {{
        let (latest,): (Option<i64>,) =
            sqlx::query_as("SELECT MAX(stream_pos) FROM device_list_changes WHERE user_id = $1")
                .bind($user_id)
                .fetch_one($executor)
                .await?;
        latest.unwrap_or(0)
    }};
}

impl Store {
    /// The position of the latest change to a user's device list (0: none), the
    /// `stream_id` other servers see.
    pub async fn get_device_list_stream_id(&self, user_id: &str) -> Result<i64> {
        on_pool!(self, read, |pool| Ok(latest_device_list_change!(pool, user_id)))
    }

    /// The `stream_id` of a local user's device list as `/user/devices` gives it to
    /// `destination` (the latest change, 0: none), recorded as the last id that server
    /// was given (`device_list_sent`), in one transaction under the user's lock.
    pub async fn give_device_list_stream_id(&self, user_id: &str, destination: &str) -> Result<i64> {
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            super::users::lock_user!(&mut *tx, user_id);
            let latest = latest_device_list_change!(&mut *tx, user_id);
            sqlx::query(
                "INSERT INTO device_list_sent (user_id, destination, stream_id) VALUES ($1, $2, $3)
                 ON CONFLICT (user_id, destination) DO UPDATE SET stream_id = excluded.stream_id
                 WHERE device_list_sent.stream_id < excluded.stream_id",
            )
            .bind(user_id)
            .bind(destination)
            .bind(latest)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(latest)
        })
    }

    /// The ids of a device list update of a local user for `destinations`: the latest
    /// change's position, and for each destination the last id it was given (its
    /// `prev_id`; none when it was never given one), which becomes the latest, in one
    /// transaction under the user's lock. `None` (nothing recorded) when a destination
    /// was already given the latest id: the update needs an id of its own
    /// (`record_bare_device_list_change`), or the receiver would take it as already seen.
    pub async fn take_device_list_update_ids(
        &self,
        user_id: &str,
        destinations: &[String],
    ) -> Result<Option<(i64, HashMap<String, i64>)>> {
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            super::users::lock_user!(&mut *tx, user_id);
            let latest = latest_device_list_change!(&mut *tx, user_id);
            let mut given = HashMap::new();
            for chunk in destinations.chunks(IN_LIST_CHUNK) {
                let mut query =
                    sqlx::QueryBuilder::new("SELECT destination, stream_id FROM device_list_sent WHERE user_id = ");
                query.push_bind(user_id);
                query.push(" AND destination IN (");
                let mut list = query.separated(", ");
                for d in chunk {
                    list.push_bind(d);
                }
                query.push(")");
                let rows: Vec<(String, i64)> = query.build_query_as().fetch_all(&mut *tx).await?;
                given.extend(rows);
            }
            if given.values().any(|id| *id >= latest) {
                return Ok(None);
            }
            for chunk in destinations.chunks(IN_LIST_CHUNK) {
                let mut query =
                    sqlx::QueryBuilder::new("INSERT INTO device_list_sent (user_id, destination, stream_id) ");
                query.push_values(chunk, |mut row, d| {
                    row.push_bind(user_id).push_bind(d).push_bind(latest);
                });
                query.push(
                    " ON CONFLICT (user_id, destination) DO UPDATE SET stream_id = excluded.stream_id
                     WHERE device_list_sent.stream_id < excluded.stream_id",
                );
                query.build().execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(Some((latest, given)))
        })
    }

    /// Records a change of a local user's device list that has no write of its own (a
    /// device list update that needs an id of its own), at a new stream position.
    pub async fn record_bare_device_list_change(&self, user_id: &str) -> Result<()> {
        self.record_remote_device_list_change(user_id).await
    }
}
