//! URL previews (`/_matrix/client/v1/media/preview_url`): off by default.

use crate::{
    error::{Error, Result},
    service::Services,
};

impl Services {
    /// The OpenGraph data of a page, when URL previews are on.
    pub async fn preview_url(&self, _url: &str) -> Result<serde_json::Map<String, serde_json::Value>> {
        if !self.config.media.url_preview_enabled {
            return Err(Error::not_found("URL previews are turned off on this server"));
        }
        Err(Error::not_found("URL previews are not available yet"))
    }
}
