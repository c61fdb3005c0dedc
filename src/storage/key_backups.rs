//! Storage of server-side key backups (`room_keys`): backup versions and the room keys
//! in them. Every write that depends on which version is current checks it in the
//! same transaction, holding the version's row, so a key never lands in a version
//! being deleted and concurrent uploads never lose a better key.

use super::{Store, on_pool};
use crate::error::Result;

/// A backup version as stored, with the number of keys in it.
pub struct BackupVersion {
    pub version: i64,
    pub algorithm: String,
    pub auth_data: String,
    pub etag: i64,
    pub count: i64,
}

/// One room key to back up: where it belongs, the fields the replacement rule
/// compares, and the key data as uploaded (JSON).
pub struct BackupKey<'a> {
    pub room_id: &'a str,
    pub session_id: &'a str,
    pub first_message_index: i64,
    pub forwarded_count: i64,
    pub is_verified: bool,
    pub json: &'a str,
}

/// Which keys of a version a read or delete is about.
#[derive(Clone, Copy)]
pub enum BackupScope<'a> {
    All,
    Room(&'a str),
    Session(&'a str, &'a str),
}

impl<'a> BackupScope<'a> {
    /// The room and session bound as `$3` and `$4` of `IN_SCOPE` (`None`: any).
    fn args(self) -> [Option<&'a str>; 2] {
        match self {
            BackupScope::All => [None, None],
            BackupScope::Room(room) => [Some(room), None],
            BackupScope::Session(room, session) => [Some(room), Some(session)],
        }
    }
}

/// Why keys could not be stored: no backup at all, or not the current version (the
/// current one given).
pub enum BackupWriteRefused {
    NoBackup,
    WrongVersion(i64),
}

/// Locks the version's row if it is the user's current one (the newest not deleted)
/// and answers its etag.
const LOCK_CURRENT_SQL: &str = "UPDATE room_key_backup_versions SET etag = etag
     WHERE user_id = $1 AND version = $2 AND NOT deleted AND NOT EXISTS (
         SELECT 1 FROM room_key_backup_versions newer
         WHERE newer.user_id = $1 AND newer.version > $2 AND NOT newer.deleted)
     RETURNING etag";

/// Locks the version's row if it exists and is not deleted; answers its etag.
const LOCK_LIVE_SQL: &str = "UPDATE room_key_backup_versions SET etag = etag
     WHERE user_id = $1 AND version = $2 AND NOT deleted RETURNING etag";

const BUMP_ETAG_SQL: &str =
    "UPDATE room_key_backup_versions SET etag = etag + 1 WHERE user_id = $1 AND version = $2 RETURNING etag";

/// The keys of version `$2` of user `$1` in room `$3` and session `$4`, each if given.
macro_rules! in_scope {
    () => {
        "user_id = $1 AND version = $2 AND ($3 IS NULL OR room_id = $3) AND ($4 IS NULL OR session_id = $4)"
    };
}

const COUNT_SQL: &str = "SELECT COUNT(*) FROM room_key_backup_keys WHERE user_id = $1 AND version = $2";

/// Stores a key unless the stored one is better by the spec's rule: a verified key
/// over an unverified one, then the lower `first_message_index`, then the lower
/// `forwarded_count` (equal keys keep the stored one).
const UPSERT_KEY_SQL: &str = "INSERT INTO room_key_backup_keys
     (user_id, version, room_id, session_id, first_message_index, forwarded_count, is_verified, json)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
     ON CONFLICT (user_id, version, room_id, session_id) DO UPDATE SET
         first_message_index = excluded.first_message_index,
         forwarded_count = excluded.forwarded_count,
         is_verified = excluded.is_verified,
         json = excluded.json
     WHERE (excluded.is_verified AND NOT room_key_backup_keys.is_verified)
        OR (excluded.is_verified = room_key_backup_keys.is_verified
            AND (excluded.first_message_index < room_key_backup_keys.first_message_index
                 OR (excluded.first_message_index = room_key_backup_keys.first_message_index
                     AND excluded.forwarded_count < room_key_backup_keys.forwarded_count)))";

impl Store {
    /// Creates the user's next backup version (one more than any they ever had), which
    /// becomes the current one.
    pub async fn create_backup_version(&self, user_id: &str, algorithm: &str, auth_data: &str) -> Result<i64> {
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            // Two creations at once would pick the same number.
            super::users::lock_user!(&mut *tx, user_id);
            let (version,): (i64,) = sqlx::query_as(
                "INSERT INTO room_key_backup_versions (user_id, version, algorithm, auth_data, etag, deleted)
                 SELECT $1, COALESCE(MAX(version), 0) + 1, $2, $3, 0, FALSE
                 FROM room_key_backup_versions WHERE user_id = $1
                 RETURNING version",
            )
            .bind(user_id)
            .bind(algorithm)
            .bind(auth_data)
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(version)
        })
    }

    /// A version that is not deleted (`None`: the current one), with its key count.
    pub async fn get_backup_version(&self, user_id: &str, version: Option<i64>) -> Result<Option<BackupVersion>> {
        let row: Option<(i64, String, String, i64, i64)> = on_pool!(self, read, |pool| {
            sqlx::query_as(
                "SELECT v.version, v.algorithm, v.auth_data, v.etag,
                     (SELECT COUNT(*) FROM room_key_backup_keys k WHERE k.user_id = v.user_id AND k.version = v.version)
                 FROM room_key_backup_versions v
                 WHERE v.user_id = $1 AND NOT v.deleted AND ($2 IS NULL OR v.version = $2)
                 ORDER BY v.version DESC LIMIT 1",
            )
            .bind(user_id)
            .bind(version)
            .fetch_optional(pool)
            .await?
        });
        Ok(row.map(|(version, algorithm, auth_data, etag, count)| BackupVersion {
            version,
            algorithm,
            auth_data,
            etag,
            count,
        }))
    }

    /// Replaces a live version's `auth_data` if its algorithm is `algorithm`. Answers
    /// `None` when the version does not exist (or was deleted), else whether the
    /// algorithm matched (and the update happened).
    pub async fn update_backup_version(
        &self,
        user_id: &str,
        version: i64,
        algorithm: &str,
        auth_data: &str,
    ) -> Result<Option<bool>> {
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            let current: Option<(String,)> = sqlx::query_as(
                "UPDATE room_key_backup_versions SET etag = etag
                 WHERE user_id = $1 AND version = $2 AND NOT deleted RETURNING algorithm",
            )
            .bind(user_id)
            .bind(version)
            .fetch_optional(&mut *tx)
            .await?;
            let Some((stored,)) = current else { return Ok(None) };
            if stored != algorithm {
                return Ok(Some(false));
            }
            sqlx::query("UPDATE room_key_backup_versions SET auth_data = $3 WHERE user_id = $1 AND version = $2")
                .bind(user_id)
                .bind(version)
                .bind(auth_data)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(Some(true))
        })
    }

    /// Deletes a version and its keys. `false` when the user never had that version;
    /// deleting a deleted version again succeeds.
    pub async fn delete_backup_version(&self, user_id: &str, version: i64) -> Result<bool> {
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            // The version's row first: an upload into it holds the row, so it either
            // finishes before (and its keys go too) or finds the version deleted.
            let found =
                sqlx::query("UPDATE room_key_backup_versions SET deleted = TRUE WHERE user_id = $1 AND version = $2")
                    .bind(user_id)
                    .bind(version)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected()
                    > 0;
            sqlx::query("DELETE FROM room_key_backup_keys WHERE user_id = $1 AND version = $2")
                .bind(user_id)
                .bind(version)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(found)
        })
    }

    /// Stores keys into the user's current version, each replacing the stored key of
    /// its session only if better (see `UPSERT_KEY_SQL`), in one transaction that holds
    /// the version's row. Answers the new etag and key count, or why nothing was stored.
    pub async fn add_backup_keys(
        &self,
        user_id: &str,
        version: Option<i64>,
        keys: &[BackupKey<'_>],
    ) -> Result<Result<(i64, i64), BackupWriteRefused>> {
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            let locked: Option<(i64,)> = match version {
                Some(version) => {
                    sqlx::query_as(LOCK_CURRENT_SQL).bind(user_id).bind(version).fetch_optional(&mut *tx).await?
                }
                None => None,
            };
            let Some((mut etag,)) = locked else {
                let current: (Option<i64>,) = sqlx::query_as(
                    "SELECT MAX(version) FROM room_key_backup_versions WHERE user_id = $1 AND NOT deleted",
                )
                .bind(user_id)
                .fetch_one(&mut *tx)
                .await?;
                return Ok(Err(current.0.map_or(BackupWriteRefused::NoBackup, BackupWriteRefused::WrongVersion)));
            };
            let version = version.unwrap_or_default();
            let mut changed = 0;
            for key in keys {
                changed += sqlx::query(UPSERT_KEY_SQL)
                    .bind(user_id)
                    .bind(version)
                    .bind(key.room_id)
                    .bind(key.session_id)
                    .bind(key.first_message_index)
                    .bind(key.forwarded_count)
                    .bind(key.is_verified)
                    .bind(key.json)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            }
            if changed > 0 {
                (etag,) = sqlx::query_as(BUMP_ETAG_SQL).bind(user_id).bind(version).fetch_one(&mut *tx).await?;
            }
            let (count,): (i64,) = sqlx::query_as(COUNT_SQL).bind(user_id).bind(version).fetch_one(&mut *tx).await?;
            tx.commit().await?;
            Ok(Ok((etag, count)))
        })
    }

    /// The keys of a live version in `scope`, as (room, session, JSON); `None` when
    /// the version does not exist or was deleted.
    pub async fn get_backup_keys(
        &self,
        user_id: &str,
        version: i64,
        scope: BackupScope<'_>,
    ) -> Result<Option<Vec<(String, String, String)>>> {
        let [a, b] = scope.args();
        on_pool!(self, read, |pool| {
            let mut tx = pool.begin().await?;
            let live: Option<(i64,)> = sqlx::query_as(
                "SELECT etag FROM room_key_backup_versions WHERE user_id = $1 AND version = $2 AND NOT deleted",
            )
            .bind(user_id)
            .bind(version)
            .fetch_optional(&mut *tx)
            .await?;
            if live.is_none() {
                return Ok(None);
            }
            let rows = sqlx::query_as(concat!(
                "SELECT room_id, session_id, json FROM room_key_backup_keys WHERE ",
                in_scope!(),
                " ORDER BY room_id, session_id"
            ))
            .bind(user_id)
            .bind(version)
            .bind(a)
            .bind(b)
            .fetch_all(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(Some(rows))
        })
    }

    /// Deletes a live version's keys in `scope`; answers the new etag and key count,
    /// or `None` when the version does not exist or was deleted.
    pub async fn delete_backup_keys(
        &self,
        user_id: &str,
        version: i64,
        scope: BackupScope<'_>,
    ) -> Result<Option<(i64, i64)>> {
        let [a, b] = scope.args();
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            let locked: Option<(i64,)> =
                sqlx::query_as(LOCK_LIVE_SQL).bind(user_id).bind(version).fetch_optional(&mut *tx).await?;
            let Some((mut etag,)) = locked else { return Ok(None) };
            let deleted = sqlx::query(concat!("DELETE FROM room_key_backup_keys WHERE ", in_scope!()))
                .bind(user_id)
                .bind(version)
                .bind(a)
                .bind(b)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if deleted > 0 {
                (etag,) = sqlx::query_as(BUMP_ETAG_SQL).bind(user_id).bind(version).fetch_one(&mut *tx).await?;
            }
            let (count,): (i64,) = sqlx::query_as(COUNT_SQL).bind(user_id).bind(version).fetch_one(&mut *tx).await?;
            tx.commit().await?;
            Ok(Some((etag, count)))
        })
    }
}
