//! The glue between axum and ruma: `Ruma<T>` parses any ruma request type (path,
//! query, body) and authenticates its sender as the endpoint's metadata says;
//! `RumaResponse<T>` writes any ruma response.

use axum::{
    body::Body,
    extract::{FromRequest, FromRequestParts, RawPathParams, Request},
    http::{StatusCode, header::AUTHORIZATION},
    response::{IntoResponse, Response},
};
use ruma::api::{
    IncomingRequest, IncomingRequestExt, OutgoingResponse, OutgoingResponseExt,
    auth_scheme::{
        AccessToken, AccessTokenOptional, AppserviceToken, AppserviceTokenOptional, NoAccessToken, NoAuthentication,
    },
    error::{DeserializationError, ErrorKind, FromHttpRequestError},
    path_builder::PathBuilder,
};

use super::AppState;
use crate::{
    error::{Error, Result},
    service::Session,
};

/// Who must be signed in to call an endpoint.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum AuthRequirement {
    Required,
    Optional,
    /// The endpoint ignores any token (public, or appservice-only until appservices land).
    Ignored,
}

/// Maps ruma's authentication schemes to what Convo enforces.
pub trait ClientAuth {
    const REQUIREMENT: AuthRequirement;
}
impl ClientAuth for AccessToken {
    const REQUIREMENT: AuthRequirement = AuthRequirement::Required;
}
impl ClientAuth for AccessTokenOptional {
    const REQUIREMENT: AuthRequirement = AuthRequirement::Optional;
}
impl ClientAuth for NoAuthentication {
    const REQUIREMENT: AuthRequirement = AuthRequirement::Ignored;
}
impl ClientAuth for NoAccessToken {
    const REQUIREMENT: AuthRequirement = AuthRequirement::Ignored;
}
impl ClientAuth for AppserviceTokenOptional {
    const REQUIREMENT: AuthRequirement = AuthRequirement::Ignored;
}
impl ClientAuth for AppserviceToken {
    const REQUIREMENT: AuthRequirement = AuthRequirement::Required;
}

/// A parsed ruma request with its sender.
pub struct Ruma<T> {
    pub body: T,
    /// The signed-in caller; always `Some` for endpoints that require a token.
    pub session: Option<Session>,
    /// The client's address, for rate limits and "last seen".
    pub client_ip: String,
}

impl<T> Ruma<T> {
    /// The caller of an endpoint that requires authentication.
    pub fn session(&self) -> Result<&Session> {
        self.session.as_ref().ok_or_else(Error::missing_token)
    }
}

/// The access token from `Authorization: Bearer` or the deprecated `access_token` query parameter.
pub(super) fn access_token(parts: &axum::http::request::Parts) -> Result<Option<String>> {
    if let Some(value) = parts.headers.get(AUTHORIZATION) {
        let value = value.to_str().map_err(|_| Error::unknown_token(false))?;
        let token = value.strip_prefix("Bearer ").ok_or_else(|| Error::unknown_token(false))?;
        return Ok(Some(token.trim().to_owned()));
    }
    let query = parts.uri.query().unwrap_or_default();
    Ok(form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == "access_token")
        .map(|(_, value)| value.into_owned()))
}

/// Some clients (matrix-nio) open a UIA exchange with an `auth` object that has
/// neither `type` nor `session`. The spec allows omitting `type` only with a session;
/// like other servers, Convo reads such an object as "no auth yet" and answers with
/// the flows, instead of rejecting the request.
fn drop_untyped_auth(bytes: bytes::Bytes) -> bytes::Bytes {
    if !bytes.windows(6).any(|w| w == b"\"auth\"") {
        return bytes;
    }
    let Ok(serde_json::Value::Object(mut body)) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return bytes;
    };
    match body.get("auth") {
        Some(serde_json::Value::Object(auth)) if !auth.contains_key("type") && !auth.contains_key("session") => {
            body.remove("auth");
            serde_json::to_vec(&body).map(Into::into).unwrap_or(bytes)
        }
        _ => bytes,
    }
}

/// Some clients (matrix-nio's `join`, `leave`, `forget`) send POST requests whose
/// JSON body has only optional fields with no body at all. Like other servers, Convo
/// reads an empty JSON body as `{}`. Bodies of another content type (media uploads)
/// are left alone.
fn empty_json_as_object(parts: &axum::http::request::Parts, bytes: bytes::Bytes) -> bytes::Bytes {
    let json_or_untyped = parts
        .headers
        .get(axum::http::header::CONTENT_TYPE)
        .is_none_or(|v| v.to_str().is_ok_and(|v| v.trim_start().starts_with("application/json")));
    let has_body = matches!(parts.method, axum::http::Method::POST | axum::http::Method::PUT);
    if bytes.is_empty() && has_body && json_or_untyped { bytes::Bytes::from_static(b"{}") } else { bytes }
}

/// The most bytes of a path argument: the spec limits every identifier, event type,
/// state key and tag a path carries to 255 bytes (ruma's identifiers too).
const MAX_PATH_ARGUMENT: usize = 255;

/// Path arguments whose length the endpoint checks itself, because the spec gives it
/// its own errcode: a profile field name over 255 bytes is `M_KEY_TOO_LARGE`.
const LENGTH_CHECKED_BY_ENDPOINT: [&str; 1] = ["field"];

/// Rejects what no endpoint accepts and PostgreSQL cannot store, before anything is
/// parsed: a NUL character in a path argument or a query parameter, and path arguments
/// over 255 bytes (`M_INVALID_PARAM`). `args` are (name, value) pairs.
pub(super) fn check_path_and_query(args: &[(String, String)], query: Option<&str>) -> Result<()> {
    for (name, arg) in args {
        if arg.contains('\0') {
            return Err(Error::invalid_param("Path arguments may not contain NUL characters"));
        }
        if arg.len() > MAX_PATH_ARGUMENT && !LENGTH_CHECKED_BY_ENDPOINT.contains(&name.as_str()) {
            return Err(Error::invalid_param(format!(
                "Path arguments (identifiers, event types, state keys, tags, ...) are {MAX_PATH_ARGUMENT} bytes at most"
            )));
        }
    }
    let query = query.unwrap_or_default();
    if query.contains("%00")
        && form_urlencoded::parse(query.as_bytes()).any(|(k, v)| k.contains('\0') || v.contains('\0'))
    {
        return Err(Error::invalid_param("Query parameters may not contain NUL characters"));
    }
    Ok(())
}

/// Whether JSON text (already known to be valid) holds a NUL character in a string
/// (key or value): valid JSON can carry one only as the escape `\u0000`.
pub(super) fn json_has_nul(bytes: &[u8]) -> bool {
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if bytes.get(i + 1..i + 6) == Some(&b"u0000"[..]) {
                return true;
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    false
}

/// Request bodies that ruma would panic on rather than reject: ruma-client-api 0.25.2's
/// login request indexes the JSON object with `type` (`session/login.rs`), so a body
/// without it is refused here, as the missing required field it is.
fn check_known_ruma_panics<T: 'static>(bytes: &[u8]) -> Result<()> {
    use std::any::TypeId;
    if TypeId::of::<T>() == TypeId::of::<ruma::api::client::session::login::v3::Request>()
        && let Ok(serde_json::Value::Object(body)) = serde_json::from_slice::<serde_json::Value>(bytes)
        && !body.contains_key("type")
    {
        return Err(Error::bad_json("Invalid request body: missing field `type` (the login type)"));
    }
    Ok(())
}

/// Reads the body within `limit` bytes and the transport's body timeout.
pub(super) async fn read_body(parts: &axum::http::request::Parts, body: Body, limit: usize) -> Result<bytes::Bytes> {
    let too_large = || Error::too_large(format!("Request bodies are {limit} bytes at most"));
    let declared =
        parts.headers.get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        if let Some(timeout) = super::transport::body_timeout(&e) {
            Error::matrix(StatusCode::REQUEST_TIMEOUT, ErrorKind::Unknown, format!("{timeout}"))
        } else if is_length_limit(&e) {
            too_large()
        } else {
            Error::matrix(StatusCode::BAD_REQUEST, ErrorKind::Unknown, "Could not read the request body")
        }
    })
}

fn is_length_limit(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        current = e.source();
    }
    false
}

/// Maps a parse failure to the spec's errcode: bodies that are not JSON get
/// `M_NOT_JSON`, JSON of the wrong shape `M_BAD_JSON`, bad path or query values
/// `M_INVALID_PARAM`.
pub(super) fn request_error(e: FromHttpRequestError) -> Error {
    match e {
        FromHttpRequestError::MethodMismatch { .. } => {
            Error::unrecognized(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed on this endpoint")
        }
        FromHttpRequestError::Deserialization(d) => match d {
            DeserializationError::Json(e) => Error::bad_json(format!("Invalid request body: {e}")),
            DeserializationError::Query(e) => Error::invalid_param(format!("Invalid query parameter: {e}")),
            DeserializationError::Ident(e) => Error::invalid_param(format!("Invalid identifier: {e}")),
            other => Error::bad_json(format!("Invalid request: {other}")),
        },
        other => Error::bad_json(format!("Invalid request: {other}")),
    }
}

impl<T> FromRequest<AppState> for Ruma<T>
where
    T: IncomingRequest + 'static,
    T::Authentication: ClientAuth,
{
    type Rejection = Error;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = req.into_parts();
        let client_ip = super::client_ip::client_ip(&parts, &state.config.listeners);
        let params = RawPathParams::from_request_parts(&mut parts, state)
            .await
            .map_err(|e| Error::invalid_param(format!("Invalid path: {e}")))?;
        check_path_and_query(
            &params.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect::<Vec<_>>(),
            parts.uri.query(),
        )?;
        let mut args: Vec<String> = params.iter().map(|(_, v)| v.to_owned()).collect();
        // Routes registered without a trailing empty state key lack its argument.
        let expected = T::PATH_BUILDER.all_paths().next().map_or(0, |p| p.matches('{').count());
        args.resize(expected.max(args.len()), String::new());

        let session = match (T::Authentication::REQUIREMENT, access_token(&parts)?) {
            (AuthRequirement::Ignored, _) | (AuthRequirement::Optional, None) => None,
            (AuthRequirement::Required, None) => return Err(Error::missing_token()),
            (AuthRequirement::Optional, Some(token)) => match state.authenticate(&token, Some(&client_ip)).await {
                // A token that cannot be checked while the database is down is ignored
                // where it is optional, so that `/versions` keeps answering.
                Err(Error::Unavailable(_)) => None,
                result => Some(result?),
            },
            (_, Some(token)) => Some(state.authenticate(&token, Some(&client_ip)).await?),
        };

        let bytes = read_body(&parts, body, state.config.limits.max_request_body).await?;
        if !bytes.is_empty() && serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_err() {
            return Err(Error::not_json("The request body is not valid JSON"));
        }
        if json_has_nul(&bytes) {
            return Err(Error::bad_json("Strings in the request body may not contain NUL characters"));
        }
        // Every JSON body of the API is an object; serde would read a struct from an
        // array by position (`["bye"]` as a leave reason).
        if bytes.iter().find(|b| !b.is_ascii_whitespace()).is_some_and(|b| *b != b'{') {
            return Err(Error::bad_json("The request body must be a JSON object"));
        }
        // After an empty body has become `{}`: ruma would parse that too.
        let bytes = drop_untyped_auth(empty_json_as_object(&parts, bytes));
        check_known_ruma_panics::<T>(&bytes)?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let body = T::try_from_http_request(axum::http::Request::from_parts(parts, bytes.as_ref()), &args)
            .map_err(request_error)?;
        Ok(Ruma { body, session, client_ip })
    }
}

/// Any ruma response, written as the spec says.
pub struct RumaResponse<T>(pub T);

impl<T: OutgoingResponse> IntoResponse for RumaResponse<T> {
    fn into_response(self) -> Response {
        match self.0.try_into_http_response::<Vec<u8>>() {
            Ok(response) => response.map(Body::from),
            Err(e) => Error::internal(format!("could not serialize a response: {e}")).into_response(),
        }
    }
}

impl<T> From<T> for RumaResponse<T> {
    fn from(value: T) -> Self {
        RumaResponse(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_is_found_in_json_strings_only_as_an_escape() {
        assert!(json_has_nul(br#"{"a": "x\u0000y"}"#));
        assert!(json_has_nul(br#"{"a\u0000": 1}"#));
        assert!(json_has_nul(br#"["\\\u0000"]"#));
        assert!(!json_has_nul(br#"{"a": "x\\u0000y"}"#));
        assert!(!json_has_nul(br#"{"a": "\u0001"}"#));
        assert!(!json_has_nul(br#"{"u0000": 0}"#));
    }
}
