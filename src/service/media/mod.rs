//! The media repository: uploads (at once, or an id first and the bytes later),
//! downloads of local and remote media (fetched over federation and cached),
//! thumbnails made on demand and cached, quarantine and deletion. Files are stored by
//! content hash (`files.rs`); rows live in the `media` tables (`storage/media.rs`). It
//! knows nothing of HTTP: bodies come in as a stream of bytes, files go out as open
//! files for the HTTP layer to stream.

mod files;
pub mod preview;
mod remote;
pub mod thumbnail;

use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use futures_util::Stream;
use ruma::{OwnedMxcUri, ServerName, api::error::ErrorKind};
use tokio::sync::{Notify, RwLock, Semaphore};

use self::{
    files::{MediaFiles, Staged},
    thumbnail::{DecodeLimits, Made, Method},
};
use super::{RateLimitKind, Services, Session, now_ms, ratelimit::user_key};
use crate::{
    config::Media as MediaConfig,
    error::{Error, Result},
    storage::{MediaItem, MediaThumbnail, NewContent, UploadRefusal},
};

/// The longest a download waits for the upload of a created id (`timeout_ms`).
const MAX_WAIT: Duration = Duration::from_secs(60);

/// The longest file name and content type kept with an upload.
const MAX_META_LEN: usize = 255;

/// The media repository's state in one server.
pub struct Media {
    files: MediaFiles,
    /// Shared from placing a file until its row is stored; alone while a file no row
    /// names any more is removed. So a file is never removed under an upload that is
    /// about to name it.
    placing: RwLock<()>,
    /// Wakes downloads waiting for the upload of a created id.
    uploaded: Notify,
    /// How many downloads wait for an upload right now (tests wait on it).
    waiting: tokio::sync::watch::Sender<usize>,
    /// Bounds concurrent thumbnail decoding (each holds a core and its memory).
    thumbnailing: Semaphore,
}

impl Media {
    /// Resolves once `n` downloads wait for the upload of a created id.
    pub async fn wait_for_waiting_downloads(&self, n: usize) {
        let _ = self.waiting.subscribe().wait_for(|w| *w >= n).await;
    }

    pub fn new(config: &MediaConfig) -> Self {
        Self {
            files: MediaFiles::new(config.path.clone()),
            placing: RwLock::new(()),
            uploaded: Notify::new(),
            waiting: tokio::sync::watch::channel(0).0,
            thumbnailing: Semaphore::new(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)),
        }
    }
}

/// What an upload says about itself.
#[derive(Clone, Debug, Default)]
pub struct UploadMeta {
    pub content_type: Option<String>,
    pub file_name: Option<String>,
}

/// Content to serve: an open file and what to say about it.
pub struct MediaContent {
    pub file: tokio::fs::File,
    pub size: u64,
    pub content_type: String,
    pub file_name: Option<String>,
}

/// What a media request may do besides reading local media.
#[derive(Clone, Copy, Debug)]
pub struct Fetch {
    /// How long to wait for the upload of a created id (`timeout_ms`).
    pub wait: Duration,
    /// Whether remote media may be fetched over federation (`allow_remote`).
    pub allow_remote: bool,
}

/// The spec's media id grammar: `[A-Za-z0-9_-]+`.
pub fn valid_media_id(media_id: &str) -> bool {
    !media_id.is_empty()
        && media_id.len() <= 255
        && media_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn check_media_id(media_id: &str) -> Result<()> {
    if valid_media_id(media_id) {
        Ok(())
    } else {
        Err(Error::invalid_param("A media id is 1 to 255 characters of A-Z a-z 0-9 _ -"))
    }
}

/// A content type or file name fit to keep and send back in a header: at most 255
/// bytes, no control characters; a content type must also look like `type/subtype`.
fn check_meta(meta: UploadMeta) -> Result<UploadMeta> {
    let clean = |s: &str| s.len() <= MAX_META_LEN && !s.chars().any(char::is_control);
    if let Some(t) = &meta.content_type
        && (!clean(t) || !t.is_ascii() || !t.contains('/'))
    {
        return Err(Error::invalid_param("The Content-Type is not a media type (type/subtype, at most 255 bytes)"));
    }
    if let Some(name) = &meta.file_name
        && !clean(name)
    {
        return Err(Error::invalid_param("The file name is at most 255 bytes, without control characters"));
    }
    Ok(meta)
}

fn not_found() -> Error {
    Error::not_found("Media not found")
}

impl Services {
    fn decode_limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_dimension: self.config.media.max_image_dimension,
            max_alloc: self.config.media.max_image_alloc,
        }
    }

    /// Places a staged file and runs `store` (which names it in the database) under the
    /// shared placing lock. If `store` fails or declines (false), the file is removed
    /// again unless another row names it.
    async fn place_and_store<F>(&self, staged: Staged, store: F) -> Result<bool>
    where
        F: Future<Output = Result<bool>>,
    {
        let hash = staged.hash.clone();
        let stored = {
            let _shared = self.media.placing.read().await;
            self.media.files.place(staged).await?;
            store.await
        };
        if !matches!(stored, Ok(true)) {
            self.remove_if_orphaned(&hash).await?;
        }
        stored
    }

    /// Removes the file of `hash` if no row names it.
    async fn remove_if_orphaned(&self, hash: &str) -> Result<()> {
        let _alone = self.media.placing.write().await;
        if !self.store.media_hash_in_use(hash).await? {
            self.media.files.remove(hash).await?;
        }
        Ok(())
    }

    /// `POST /_matrix/media/v3/upload`: stores `body` (cut at `media.max_upload_size`)
    /// and answers its new `mxc://` URI.
    #[tracing::instrument(skip_all, fields(user = %session.user_id))]
    pub async fn upload_media<S>(&self, session: &Session, meta: UploadMeta, body: S) -> Result<OwnedMxcUri>
    where
        S: Stream<Item = Result<Bytes>> + Unpin,
    {
        let meta = check_meta(meta)?;
        self.rate_limiter.check(RateLimitKind::MediaUpload, &user_key(session.user_id.as_str()))?;
        let staged = self.media.files.stage(body, self.config.media.max_upload_size).await?;
        let media_id = super::ids::generate_session_id();
        let content = NewContent {
            content_hash: &staged.hash.clone(),
            content_type: meta.content_type.as_deref(),
            file_name: meta.file_name.as_deref(),
            size: staged.size as i64,
        };
        let server = self.server_name().as_str();
        let quota = self.config.media.user_quota_bytes;
        let insert = self.store.insert_media(server, &media_id, &content, session.user_id.as_str(), quota, now_ms());
        if !self.place_and_store(staged, insert).await? {
            return Err(over_quota(quota));
        }
        Ok(OwnedMxcUri::from(format!("mxc://{server}/{media_id}")))
    }

    /// `POST /_matrix/media/v1/create`: reserves an id for a later upload by this user,
    /// until it expires. Answers the URI and when it expires.
    pub async fn create_media_id(&self, session: &Session) -> Result<(OwnedMxcUri, i64)> {
        let user = session.user_id.as_str();
        self.rate_limiter.check(RateLimitKind::MediaUpload, &user_key(user))?;
        let media_id = super::ids::generate_session_id();
        let now = now_ms();
        let expires = now + self.config.media.unused_expiry_ms as i64;
        let server = self.server_name().as_str();
        let max_pending = i64::from(self.config.media.max_pending_uploads);
        if !self.store.create_pending_media(server, &media_id, user, expires, max_pending, now).await? {
            return Err(Error::matrix(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorKind::LimitExceeded(Default::default()),
                format!("You have {max_pending} media ids waiting for their upload already"),
            ));
        }
        Ok((OwnedMxcUri::from(format!("mxc://{server}/{media_id}")), expires))
    }

    /// `PUT /_matrix/media/v3/upload/{serverName}/{mediaId}`: the bytes of a created id,
    /// by its creator, once, before it expires (the last check is atomic with the write).
    #[tracing::instrument(skip_all, fields(user = %session.user_id, %media_id))]
    pub async fn upload_created_media<S>(
        &self,
        session: &Session,
        server_name: &ServerName,
        media_id: &str,
        meta: UploadMeta,
        body: S,
    ) -> Result<()>
    where
        S: Stream<Item = Result<Bytes>> + Unpin,
    {
        check_media_id(media_id)?;
        let meta = check_meta(meta)?;
        let user = session.user_id.as_str();
        if server_name != self.server_name() {
            return Err(Error::forbidden("Media of other servers cannot be uploaded here"));
        }
        // Refuse early what will be refused anyway, before reading the body.
        let item = self.store.get_media(server_name.as_str(), media_id).await?.ok_or_else(not_found)?;
        let now = now_ms();
        refusal(&item, user, now).map_or(Ok(()), |r| Err(upload_refused(r, 0)))?;
        self.rate_limiter.check(RateLimitKind::MediaUpload, &user_key(user))?;
        let staged = self.media.files.stage(body, self.config.media.max_upload_size).await?;
        let content = NewContent {
            content_hash: &staged.hash.clone(),
            content_type: meta.content_type.as_deref(),
            file_name: meta.file_name.as_deref(),
            size: staged.size as i64,
        };
        let quota = self.config.media.user_quota_bytes;
        let mut refused = None;
        let fill = async {
            match self.store.fill_pending_media(server_name.as_str(), media_id, &content, user, quota, now_ms()).await?
            {
                Ok(()) => Ok(true),
                Err(reason) => {
                    refused = Some(reason);
                    Ok(false)
                }
            }
        };
        let filled = self.place_and_store(staged, fill).await?;
        if let Some(reason) = refused.filter(|_| !filled) {
            return Err(upload_refused(reason, quota));
        }
        self.media.uploaded.notify_waiters();
        Ok(())
    }

    /// The stored item `server_name`/`media_id` once its content is there: local media
    /// (waiting up to `fetch.wait` for the upload of a created id), or remote media from
    /// the cache or fetched over federation. Quarantined media is not found.
    async fn ready_media(&self, server_name: &ServerName, media_id: &str, fetch: Fetch) -> Result<MediaItem> {
        check_media_id(media_id)?;
        let local = server_name == self.server_name();
        let deadline = tokio::time::Instant::now() + fetch.wait.min(MAX_WAIT);
        loop {
            let notified = self.media.uploaded.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let item = self.store.get_media(server_name.as_str(), media_id).await?;
            let item = match item {
                Some(item) => item,
                None if local || !fetch.allow_remote => return Err(not_found()),
                None => self.fetch_remote_media(server_name, media_id).await?,
            };
            if item.quarantined {
                return Err(not_found());
            }
            if item.content_hash.is_some() {
                return Ok(item);
            }
            if item.unused_expires_ts.is_none_or(|at| at <= now_ms()) {
                return Err(not_found());
            }
            self.media.waiting.send_modify(|w| *w += 1);
            let woken = tokio::time::timeout_at(deadline, notified).await;
            self.media.waiting.send_modify(|w| *w -= 1);
            if woken.is_err() {
                return Err(Error::matrix(
                    StatusCode::GATEWAY_TIMEOUT,
                    ErrorKind::NotYetUploaded,
                    "The content has not been uploaded yet",
                ));
            }
        }
    }

    /// Opens the file of `hash`: a row whose file is gone is logged and not found.
    async fn open_content(&self, hash: &str) -> Result<(tokio::fs::File, u64)> {
        let Some(file) = self.media.files.open(hash).await? else {
            tracing::warn!(hash, "a media row names a file that is not in the media store");
            return Err(not_found());
        };
        let size = file.metadata().await.map_err(Error::internal)?.len();
        Ok((file, size))
    }

    /// A media item's content, to stream to a client.
    pub async fn media_content(&self, server_name: &ServerName, media_id: &str, fetch: Fetch) -> Result<MediaContent> {
        let item = self.ready_media(server_name, media_id, fetch).await?;
        let (file, size) = self.open_content(item.content_hash.as_deref().unwrap_or_default()).await?;
        Ok(MediaContent {
            file,
            size,
            content_type: item.content_type.unwrap_or_else(|| "application/octet-stream".to_owned()),
            file_name: item.file_name,
        })
    }

    /// A thumbnail of a media item of at least `width` × `height` (one of the spec's
    /// sizes, made on first request and cached), or the original when it is no larger,
    /// or when `animated` is asked and the original is an animated type.
    pub async fn media_thumbnail(
        &self,
        server_name: &ServerName,
        media_id: &str,
        (width, height): (u32, u32),
        method: Method,
        animated: bool,
        fetch: Fetch,
    ) -> Result<MediaContent> {
        if width == 0 || height == 0 {
            return Err(Error::invalid_param("width and height must be at least 1"));
        }
        let item = self.ready_media(server_name, media_id, fetch).await?;
        let hash = item.content_hash.clone().unwrap_or_default();
        let path = self.media.files.file_path(&hash)?;
        if animated {
            let sniff = path.clone();
            let mime =
                tokio::task::spawn_blocking(move || thumbnail::animated_type(&sniff)).await.map_err(Error::internal)?;
            if let Some(mime) = mime {
                let (file, size) = self.open_content(&hash).await?;
                return Ok(MediaContent { file, size, content_type: mime.to_owned(), file_name: None });
            }
        }
        let (tw, th) = thumbnail::pick(width, height, method);
        let (server, method_name) = (server_name.as_str(), method.as_str());
        let cached = |thumb: Option<MediaThumbnail>| async move {
            let Some(thumb) = thumb else { return Ok::<_, Error>(None) };
            Ok(self.media.files.open(&thumb.content_hash).await?.map(|file| MediaContent {
                file,
                size: thumb.size as u64,
                content_type: thumb.content_type.clone(),
                file_name: None,
            }))
        };
        let lookup = || self.store.get_media_thumbnail(server, media_id, i64::from(tw), i64::from(th), method_name);
        if let Some(content) = cached(lookup().await?).await? {
            return Ok(content);
        }
        let _permit = self.media.thumbnailing.acquire().await.map_err(Error::internal)?;
        // Another request may have made it while this one waited.
        if let Some(content) = cached(lookup().await?).await? {
            return Ok(content);
        }
        let limits = self.decode_limits();
        let made = tokio::task::spawn_blocking(move || thumbnail::make(&path, tw, th, method, limits))
            .await
            .map_err(Error::internal)??;
        let thumb = match made {
            // The original is its own thumbnail: recorded as one (it names the same file).
            Made::Original(mime) => {
                let size = self.open_content(&hash).await?.1;
                let thumb = MediaThumbnail {
                    width: i64::from(tw),
                    height: i64::from(th),
                    method: method_name.to_owned(),
                    content_hash: hash,
                    content_type: mime.to_owned(),
                    size: size as i64,
                };
                self.store.insert_media_thumbnail(server, media_id, &thumb).await?;
                thumb
            }
            Made::Thumbnail(bytes, mime) => {
                let staged = self.media.files.stage_bytes(bytes).await?;
                let thumb = MediaThumbnail {
                    width: i64::from(tw),
                    height: i64::from(th),
                    method: method_name.to_owned(),
                    content_hash: staged.hash.clone(),
                    content_type: mime.to_owned(),
                    size: staged.size as i64,
                };
                let insert = self.store.insert_media_thumbnail(server, media_id, &thumb);
                self.place_and_store(staged, insert).await?;
                thumb
            }
        };
        let (file, size) = self.open_content(&thumb.content_hash).await?;
        Ok(MediaContent { file, size, content_type: thumb.content_type, file_name: None })
    }

    /// Parses an `mxc://server/id` given to `convo admin`.
    fn parse_mxc(mxc: &str) -> Result<(String, String)> {
        let uri = <&ruma::MxcUri>::from(mxc);
        let (server, id) = uri.parts().map_err(|e| Error::invalid_param(format!("{mxc} is not an mxc:// URI: {e}")))?;
        check_media_id(id)?;
        Ok((server.to_string(), id.to_owned()))
    }

    /// Quarantines (or releases) a media item: while quarantined, it is not found.
    pub async fn quarantine_media(&self, mxc: &str, quarantined: bool) -> Result<()> {
        let (server, id) = Self::parse_mxc(mxc)?;
        if !self.store.set_media_quarantined(&server, &id, quarantined).await? {
            return Err(Error::not_found(format!("No media {mxc}")));
        }
        Ok(())
    }

    /// Deletes a media item and its thumbnails; files no other item names are removed.
    pub async fn delete_media(&self, mxc: &str) -> Result<()> {
        let (server, id) = Self::parse_mxc(mxc)?;
        let orphans =
            self.store.delete_media(&server, &id).await?.ok_or_else(|| Error::not_found(format!("No media {mxc}")))?;
        for hash in orphans {
            self.remove_if_orphaned(&hash).await?;
        }
        Ok(())
    }

    /// A user's uploads, newest first (at most `limit`).
    pub async fn list_user_media(&self, user_id: &str, limit: i64) -> Result<Vec<MediaItem>> {
        self.store.list_user_media(user_id, limit).await
    }
}

/// Why an upload to `item` by `user` would be refused now, if it would.
fn refusal(item: &MediaItem, user: &str, now: i64) -> Option<UploadRefusal> {
    if item.uploader.as_deref() != Some(user) {
        Some(UploadRefusal::NotCreator)
    } else if item.content_hash.is_some() {
        Some(UploadRefusal::AlreadyUploaded)
    } else if item.unused_expires_ts.is_none_or(|at| at <= now) {
        Some(UploadRefusal::Unknown)
    } else {
        None
    }
}

fn over_quota(quota: u64) -> Error {
    Error::forbidden(format!("This upload would pass your media quota of {quota} bytes"))
}

fn upload_refused(reason: UploadRefusal, quota: u64) -> Error {
    match reason {
        UploadRefusal::Unknown => Error::not_found("No such media id, or it expired unused"),
        UploadRefusal::NotCreator => Error::forbidden("Only the user who created this media id may upload to it"),
        UploadRefusal::AlreadyUploaded => Error::matrix(
            StatusCode::CONFLICT,
            ErrorKind::CannotOverwriteMedia,
            "The content of this media id has been uploaded already",
        ),
        UploadRefusal::OverQuota => over_quota(quota),
    }
}
