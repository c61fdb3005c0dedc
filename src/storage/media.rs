//! The media repository's rows: media items (local uploads, reserved ids and cached
//! remote media) and their thumbnails. Files live on disk (`service/media/files.rs`);
//! this module only knows their content hashes.

use super::{Dialect, Store, on_pool};
use crate::error::Result;

/// One media item.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct MediaItem {
    pub server_name: String,
    pub media_id: String,
    /// `None` while a created id waits for its upload.
    pub content_hash: Option<String>,
    pub content_type: Option<String>,
    pub file_name: Option<String>,
    pub size: i64,
    pub uploader: Option<String>,
    pub created_ts: i64,
    pub unused_expires_ts: Option<i64>,
    pub quarantined: bool,
}

/// Stored content: what an upload or a remote fetch adds.
#[derive(Clone, Debug)]
pub struct NewContent<'a> {
    pub content_hash: &'a str,
    pub content_type: Option<&'a str>,
    pub file_name: Option<&'a str>,
    pub size: i64,
}

/// One cached thumbnail.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct MediaThumbnail {
    pub width: i64,
    pub height: i64,
    pub method: String,
    pub content_hash: String,
    pub content_type: String,
    pub size: i64,
}

/// Why the upload to a created id was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadRefusal {
    /// No such id (or it expired unused).
    Unknown,
    /// Another user created it.
    NotCreator,
    /// Its content is already there.
    AlreadyUploaded,
    /// The uploader's quota would be exceeded.
    OverQuota,
}

const COLUMNS: &str = "server_name, media_id, content_hash, content_type, file_name, size, uploader, created_ts, \
                       unused_expires_ts, quarantined";

/// PostgreSQL: locks the uploader's row until the transaction ends, so that the quota
/// and pending-upload checks of one user run one after the other (SQLite's writer is
/// one connection already, and does not know `FOR UPDATE`).
const LOCK_UPLOADER: &str = "SELECT user_id FROM users WHERE user_id = $1 FOR UPDATE";

impl Store {
    /// Stores a complete local upload, if the uploader's stored bytes plus this one
    /// stay within `quota` (0: no quota). Answers false when over quota.
    pub async fn insert_media(
        &self,
        server_name: &str,
        media_id: &str,
        content: &NewContent<'_>,
        uploader: &str,
        quota: u64,
        now: i64,
    ) -> Result<bool> {
        let dialect = self.dialect();
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            if quota > 0 {
                if dialect == Dialect::Postgres {
                    sqlx::query(LOCK_UPLOADER).bind(uploader).execute(&mut *tx).await?;
                }
                let (used,): (i64,) = sqlx::query_as(
                    "SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM media WHERE uploader = $1 AND server_name = $2",
                )
                .bind(uploader)
                .bind(server_name)
                .fetch_one(&mut *tx)
                .await?;
                if used.saturating_add(content.size) as u64 > quota {
                    return Ok(false);
                }
            }
            sqlx::query(
                "INSERT INTO media (server_name, media_id, content_hash, content_type, file_name, size, uploader,
                                    created_ts)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(server_name)
            .bind(media_id)
            .bind(content.content_hash)
            .bind(content.content_type)
            .bind(content.file_name)
            .bind(content.size)
            .bind(uploader)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    /// Reserves an id for a later upload by `uploader`, unless they already have
    /// `max_pending` reservations that are neither used nor expired at `now` (false).
    pub async fn create_pending_media(
        &self,
        server_name: &str,
        media_id: &str,
        uploader: &str,
        expires_ts: i64,
        max_pending: i64,
        now: i64,
    ) -> Result<bool> {
        on_pool!(self, write, |pool| {
            // The count and the insert cannot be split by another request of the same
            // user (SQLite: one writer; PostgreSQL: `LOCK_UPLOADER`).
            let mut tx = pool.begin().await?;
            if self.dialect() == Dialect::Postgres {
                sqlx::query(LOCK_UPLOADER).bind(uploader).execute(&mut *tx).await?;
            }
            let inserted = sqlx::query(
                "INSERT INTO media (server_name, media_id, uploader, created_ts, unused_expires_ts)
                 SELECT $1, $2, $3, $4, $5
                 WHERE (SELECT COUNT(*) FROM media WHERE uploader = $3 AND content_hash IS NULL
                          AND unused_expires_ts > $4) < $6",
            )
            .bind(server_name)
            .bind(media_id)
            .bind(uploader)
            .bind(now)
            .bind(expires_ts)
            .bind(max_pending)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            Ok(inserted == 1)
        })
    }

    /// Fills in the content of a created id: only its creator, only once, only before
    /// it expires, and within the creator's quota (0: none). One conditional UPDATE in
    /// a transaction; the refusal says why.
    pub async fn fill_pending_media(
        &self,
        server_name: &str,
        media_id: &str,
        content: &NewContent<'_>,
        uploader: &str,
        quota: u64,
        now: i64,
    ) -> Result<Result<(), UploadRefusal>> {
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            if self.dialect() == Dialect::Postgres {
                sqlx::query(LOCK_UPLOADER).bind(uploader).execute(&mut *tx).await?;
            }
            let updated = sqlx::query(
                "UPDATE media SET content_hash = $3, content_type = $4, file_name = $5, size = $6,
                                  unused_expires_ts = NULL
                 WHERE server_name = $1 AND media_id = $2 AND uploader = $7 AND content_hash IS NULL
                   AND unused_expires_ts > $8
                   AND ($9 = 0 OR (SELECT COALESCE(SUM(size), 0) FROM media
                                   WHERE uploader = $7 AND server_name = $1) + $6 <= $9)",
            )
            .bind(server_name)
            .bind(media_id)
            .bind(content.content_hash)
            .bind(content.content_type)
            .bind(content.file_name)
            .bind(content.size)
            .bind(uploader)
            .bind(now)
            .bind(quota.min(i64::MAX as u64) as i64)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated == 1 {
                tx.commit().await?;
                return Ok(Ok(()));
            }
            let row: Option<(Option<String>, Option<String>, Option<i64>)> = sqlx::query_as(
                "SELECT uploader, content_hash, unused_expires_ts FROM media WHERE server_name = $1 AND media_id = $2",
            )
            .bind(server_name)
            .bind(media_id)
            .fetch_optional(&mut *tx)
            .await?;
            tx.rollback().await?;
            Ok(Err(match row {
                None => UploadRefusal::Unknown,
                Some((creator, _, _)) if creator.as_deref() != Some(uploader) => UploadRefusal::NotCreator,
                Some((_, Some(_), _)) => UploadRefusal::AlreadyUploaded,
                Some((_, None, expires)) if expires.is_none_or(|e| e <= now) => UploadRefusal::Unknown,
                Some(_) => UploadRefusal::OverQuota,
            }))
        })
    }

    /// Stores another server's media in the cache (nothing if it is there already).
    pub async fn insert_remote_media(
        &self,
        server_name: &str,
        media_id: &str,
        content: &NewContent<'_>,
        now: i64,
    ) -> Result<()> {
        on_pool!(self, write, |pool| {
            sqlx::query(
                "INSERT INTO media (server_name, media_id, content_hash, content_type, file_name, size, created_ts)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (server_name, media_id) DO NOTHING",
            )
            .bind(server_name)
            .bind(media_id)
            .bind(content.content_hash)
            .bind(content.content_type)
            .bind(content.file_name)
            .bind(content.size)
            .bind(now)
            .execute(pool)
            .await?;
            Ok(())
        })
    }

    /// One media item.
    pub async fn get_media(&self, server_name: &str, media_id: &str) -> Result<Option<MediaItem>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM media WHERE server_name = $1 AND media_id = $2"
            )))
            .bind(server_name)
            .bind(media_id)
            .fetch_optional(pool)
            .await?)
        })
    }

    /// A user's uploads, newest first (at most `limit`).
    pub async fn list_user_media(&self, user_id: &str, limit: i64) -> Result<Vec<MediaItem>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM media WHERE uploader = $1 ORDER BY created_ts DESC, media_id LIMIT $2"
            )))
            .bind(user_id)
            .bind(limit)
            .fetch_all(pool)
            .await?)
        })
    }

    /// Quarantines (or releases) an item; false if there is none.
    pub async fn set_media_quarantined(&self, server_name: &str, media_id: &str, quarantined: bool) -> Result<bool> {
        on_pool!(self, write, |pool| {
            let done = sqlx::query("UPDATE media SET quarantined = $3 WHERE server_name = $1 AND media_id = $2")
                .bind(server_name)
                .bind(media_id)
                .bind(quarantined)
                .execute(pool)
                .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    /// Deletes an item and its thumbnails, in one transaction. Answers the content
    /// hashes (of the item and its thumbnails) that no other row names any more: their
    /// files can go. `None` if there was no such item.
    pub async fn delete_media(&self, server_name: &str, media_id: &str) -> Result<Option<Vec<String>>> {
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            let item: Option<(Option<String>,)> =
                sqlx::query_as("DELETE FROM media WHERE server_name = $1 AND media_id = $2 RETURNING content_hash")
                    .bind(server_name)
                    .bind(media_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            let Some((hash,)) = item else {
                return Ok(None);
            };
            let thumbs: Vec<(String,)> = sqlx::query_as(
                "DELETE FROM media_thumbnails WHERE server_name = $1 AND media_id = $2 RETURNING content_hash",
            )
            .bind(server_name)
            .bind(media_id)
            .fetch_all(&mut *tx)
            .await?;
            let mut orphans = Vec::new();
            for hash in hash.into_iter().chain(thumbs.into_iter().map(|t| t.0)) {
                let (used,): (i64,) = sqlx::query_as(
                    "SELECT (SELECT COUNT(*) FROM media WHERE content_hash = $1)
                          + (SELECT COUNT(*) FROM media_thumbnails WHERE content_hash = $1)",
                )
                .bind(&hash)
                .fetch_one(&mut *tx)
                .await?;
                if used == 0 && !orphans.contains(&hash) {
                    orphans.push(hash);
                }
            }
            tx.commit().await?;
            Ok(Some(orphans))
        })
    }

    /// Whether any item or thumbnail names `content_hash`.
    pub async fn media_hash_in_use(&self, content_hash: &str) -> Result<bool> {
        on_pool!(self, read, |pool| {
            let (used,): (bool,) = sqlx::query_as(
                "SELECT EXISTS (SELECT 1 FROM media WHERE content_hash = $1)
                     OR EXISTS (SELECT 1 FROM media_thumbnails WHERE content_hash = $1)",
            )
            .bind(content_hash)
            .fetch_one(pool)
            .await?;
            Ok(used)
        })
    }

    /// The cached thumbnail of an item at one size and method.
    pub async fn get_media_thumbnail(
        &self,
        server_name: &str,
        media_id: &str,
        width: i64,
        height: i64,
        method: &str,
    ) -> Result<Option<MediaThumbnail>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as(
                "SELECT width, height, method, content_hash, content_type, size FROM media_thumbnails
                 WHERE server_name = $1 AND media_id = $2 AND width = $3 AND height = $4 AND method = $5",
            )
            .bind(server_name)
            .bind(media_id)
            .bind(width)
            .bind(height)
            .bind(method)
            .fetch_optional(pool)
            .await?)
        })
    }

    /// Records a thumbnail (the first one made wins; the same size made twice at
    /// once is the same picture). False when the item is gone, or had it already.
    pub async fn insert_media_thumbnail(
        &self,
        server_name: &str,
        media_id: &str,
        thumb: &MediaThumbnail,
    ) -> Result<bool> {
        on_pool!(self, write, |pool| {
            let done = sqlx::query(
                "INSERT INTO media_thumbnails (server_name, media_id, width, height, method, content_hash,
                                               content_type, size)
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8
                 WHERE EXISTS (SELECT 1 FROM media WHERE server_name = $1 AND media_id = $2)
                 ON CONFLICT (server_name, media_id, width, height, method) DO NOTHING",
            )
            .bind(server_name)
            .bind(media_id)
            .bind(thumb.width)
            .bind(thumb.height)
            .bind(&thumb.method)
            .bind(&thumb.content_hash)
            .bind(&thumb.content_type)
            .bind(thumb.size)
            .execute(pool)
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }
}
