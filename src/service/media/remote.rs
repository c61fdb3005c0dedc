//! Remote media: fetched from its server over federation
//! (`/_matrix/federation/v1/media/download`), within `media.max_upload_size` (read
//! while it streams in) and `media.remote_fetch_timeout_ms`, then kept in the local
//! cache like an upload (by content hash, no uploader).

use std::time::Duration;

use axum::http::StatusCode;
use ruma::{
    ServerName,
    api::federation::authenticated_media::{FileOrLocation, get_content},
};

use super::not_found;
use crate::{
    error::{Error, Result},
    service::{Services, now_ms},
    storage::{MediaItem, NewContent},
};

impl Services {
    /// Fetches `mxc://{server_name}/{media_id}` from its server and caches it.
    #[tracing::instrument(skip(self))]
    pub(super) async fn fetch_remote_media(&self, server_name: &ServerName, media_id: &str) -> Result<MediaItem> {
        if !self.federation.client.may_contact(server_name) {
            return Err(not_found());
        }
        let limit = self.config.media.max_upload_size;
        let timeout = Duration::from_millis(self.config.media.remote_fetch_timeout_ms);
        let request = get_content::v1::Request::new(media_id.to_owned());
        let send = self.federation.client.send_with_limit(
            self.server_name(),
            &self.signing_key,
            server_name,
            request,
            Some(limit),
        );
        let response = tokio::time::timeout(timeout, send)
            .await
            .map_err(|_| {
                Error::unknown(StatusCode::GATEWAY_TIMEOUT, format!("{server_name} did not send the media in time"))
            })?
            .map_err(Error::relayed)?;
        let content = match response.content {
            FileOrLocation::File(content) => content,
            _ => {
                return Err(Error::federation(format!(
                    "{server_name} answered with a redirect, which Convo does not follow for media"
                )));
            }
        };
        let content_type =
            content.content_type.filter(|t| t.len() <= 255 && t.is_ascii() && !t.contains(char::is_control));
        let file_name = content
            .content_disposition
            .and_then(|d| d.filename)
            .filter(|n| n.len() <= 255 && !n.contains(char::is_control));
        let staged = self.media.files.stage_bytes(content.file).await?;
        let hash = staged.hash.clone();
        let new = NewContent {
            content_hash: &hash,
            content_type: content_type.as_deref(),
            file_name: file_name.as_deref(),
            size: staged.size as i64,
        };
        let insert = async {
            self.store.insert_remote_media(server_name.as_str(), media_id, &new, now_ms()).await?;
            Ok(true)
        };
        self.place_and_store(staged, insert).await?;
        self.store.get_media(server_name.as_str(), media_id).await?.ok_or_else(not_found)
    }
}
