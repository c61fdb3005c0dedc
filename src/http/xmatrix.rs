//! `Federated<T>`: the extractor for server-server requests. It refuses bad input as
//! `Ruma<T>` does (path and query checks, body limit, JSON checks), and for endpoints
//! whose ruma metadata says `ServerSignatures` it requires a valid `X-Matrix`
//! authorization (`Services::authenticate_server`): the origin is then known to the
//! handler. Key endpoints and `version` need no signature.

use axum::extract::{FromRequest, FromRequestParts, RawPathParams, Request};
use ruma::{
    OwnedServerName,
    api::{
        IncomingRequest, IncomingRequestExt, auth_scheme::NoAuthentication,
        federation::authentication::ServerSignatures, path_builder::PathBuilder,
    },
};

use super::{
    AppState,
    ruma::{check_path_and_query, json_has_nul, read_body, request_error},
};
use crate::error::{Error, Result};

/// Whether an endpoint's authentication scheme needs a server signature.
pub trait ServerAuth {
    const SIGNED: bool;
}
impl ServerAuth for ServerSignatures {
    const SIGNED: bool = true;
}
impl ServerAuth for NoAuthentication {
    const SIGNED: bool = false;
}

/// A parsed server-server request and, for signed endpoints, its origin.
pub struct Federated<T> {
    pub body: T,
    /// The authenticated origin; always `Some` on endpoints that require a signature.
    pub origin: Option<OwnedServerName>,
}

impl<T> Federated<T> {
    /// The origin of a signed request.
    pub fn origin(&self) -> Result<&OwnedServerName> {
        self.origin.as_ref().ok_or_else(|| Error::unauthorized("This endpoint needs an X-Matrix signature"))
    }
}

impl<T> FromRequest<AppState> for Federated<T>
where
    T: IncomingRequest + 'static,
    T::Authentication: ServerAuth,
{
    type Rejection = Error;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = req.into_parts();
        let params = RawPathParams::from_request_parts(&mut parts, state)
            .await
            .map_err(|e| Error::invalid_param(format!("Invalid path: {e}")))?;
        check_path_and_query(
            &params.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect::<Vec<_>>(),
            parts.uri.query(),
        )?;
        let mut args: Vec<String> = params.iter().map(|(_, v)| v.to_owned()).collect();
        let expected = T::PATH_BUILDER.all_paths().next().map_or(0, |p| p.matches('{').count());
        args.resize(expected.max(args.len()), String::new());

        let bytes = read_body(&parts, body, state.config.limits.max_federation_request_body).await?;
        if !bytes.is_empty() && serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_err() {
            return Err(Error::not_json("The request body is not valid JSON"));
        }
        if json_has_nul(&bytes) {
            return Err(Error::bad_json("Strings in the request body may not contain NUL characters"));
        }
        if bytes.iter().find(|b| !b.is_ascii_whitespace()).is_some_and(|b| *b != b'{') {
            return Err(Error::bad_json("The request body must be a JSON object"));
        }
        let origin = if <T::Authentication as ServerAuth>::SIGNED {
            let mut signed = http::Request::new(bytes.as_ref());
            *signed.method_mut() = parts.method.clone();
            *signed.uri_mut() = parts.uri.clone();
            *signed.headers_mut() = parts.headers.clone();
            Some(state.authenticate_server(&signed).await?)
        } else {
            None
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let body = T::try_from_http_request(axum::http::Request::from_parts(parts, bytes.as_ref()), &args)
            .map_err(request_error)?;
        Ok(Federated { body, origin })
    }
}
