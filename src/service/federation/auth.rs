//! Inbound request authentication (server-server API, "Request Authentication"): the
//! `X-Matrix` header names the origin, the destination (this server) and the origin's
//! key; the signature must verify over the canonical JSON of method, URI (path and
//! query as sent), origin, destination and content. Every failure is
//! `401 M_UNAUTHORIZED` with the reason.

use ruma::{
    OwnedServerName, ServerName,
    api::federation::authentication::XMatrix,
    signatures::{PublicKeyMap, PublicKeySet},
};

use crate::{
    error::{Error, Result},
    service::Services,
};

impl Services {
    /// Checks `request`'s `X-Matrix` authorization; answers the origin.
    pub async fn authenticate_server(&self, request: &http::Request<&[u8]>) -> Result<OwnedServerName> {
        let header = match XMatrix::extract_from_http_headers(request.headers()) {
            Ok(header) => header,
            Err(e) => return Err(Error::unauthorized(format!("Invalid or missing X-Matrix authorization: {e}"))),
        };
        let me: &ServerName = self.server_name();
        match &header.destination {
            Some(destination) if destination != me => {
                return Err(Error::unauthorized(format!(
                    "The X-Matrix destination is {destination}, but this server is {me}"
                )));
            }
            _ => {}
        }
        if header.origin == me {
            return Err(Error::unauthorized("The X-Matrix origin is this server itself"));
        }
        let key = match self.server_key(&header.origin, header.key.as_str()).await {
            Ok(key) => key,
            Err(Error::Unavailable(e)) => return Err(Error::Unavailable(e)),
            Err(e) => {
                return Err(Error::unauthorized(format!(
                    "Cannot get the key {} of {}: {}",
                    header.key,
                    header.origin,
                    e.message()
                )));
            }
        };
        let keys =
            PublicKeyMap::from([(header.origin.to_string(), PublicKeySet::from([(header.key.to_string(), key)]))]);
        header
            .verify_http_request(request, me, &keys)
            .map_err(|e| Error::unauthorized(format!("The X-Matrix signature does not verify: {e}")))?;
        Ok(header.origin)
    }
}
