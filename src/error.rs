//! The one error type of Convo, and its single mapping to Matrix errcodes and HTTP
//! statuses. Services and storage return `Error`; only `IntoResponse` below turns it
//! into bytes on the wire.

use std::time::Duration;

use axum::http::StatusCode;
use axum::{
    body::Body,
    response::{IntoResponse, Response},
};
use ruma::api::{
    OutgoingResponseExt,
    client::uiaa::{UiaaInfo, UiaaResponse},
    error::{ErrorBody, ErrorKind, LimitExceededErrorData, RetryAfter, StandardErrorBody, UnknownTokenErrorData},
};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Matrix error for the client: errcode, message and the status the spec gives it.
    #[error("{status} {kind:?}: {message}")]
    Matrix { status: StatusCode, kind: ErrorKind, message: String },
    /// User-interactive authentication is needed (401 with flows and session).
    #[error("user-interactive authentication required")]
    Uiaa(Box<UiaaInfo>),
    /// Something failed on our side. Logged with its detail, shown as `M_UNKNOWN`.
    #[error("internal error: {0}")]
    Internal(String),
    /// What Convo depends on (the database) does not answer: `503` with `Retry-After`
    /// and `M_UNKNOWN`. The detail is logged (at most a line every few seconds).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Another homeserver answered with an error. Kept whole (status, errcode, message)
    /// so that callers can tell a refusal from a failure; clients see `404 M_NOT_FOUND`
    /// relayed as it is, anything else as `502 M_UNKNOWN` naming the server and what it
    /// said.
    #[error("{}", .0.describe())]
    Remote(Box<RemoteError>),
}

/// What another homeserver answered when it refused a request.
#[derive(Debug, Clone)]
pub struct RemoteError {
    /// The server that answered.
    pub server: String,
    /// Its HTTP status.
    pub status: StatusCode,
    /// Its Matrix error (`M_UNKNOWN` with no Matrix body).
    pub kind: ErrorKind,
    /// Its errcode as sent, or `(no Matrix error)`.
    pub errcode: String,
    pub message: String,
}

impl RemoteError {
    /// A remote `404 M_NOT_FOUND` (a missing profile, alias or event): relayed as it is.
    fn is_relayed_not_found(&self) -> bool {
        self.status == StatusCode::NOT_FOUND && self.errcode == "M_NOT_FOUND"
    }

    /// The other server's refusal of what our user asked (a join, a knock), which the
    /// spec asks to pass on: `403 M_FORBIDDEN`, and `400 M_INCOMPATIBLE_ROOM_VERSION`
    /// with the room version.
    fn is_relayed_refusal(&self) -> bool {
        matches!(
            (self.status, &self.kind),
            (StatusCode::FORBIDDEN, ErrorKind::Forbidden)
                | (StatusCode::BAD_REQUEST, ErrorKind::IncompatibleRoomVersion(_))
        )
    }

    fn describe(&self) -> String {
        if self.is_relayed_not_found() || self.is_relayed_refusal() {
            format!("{}: {}", self.server, self.message)
        } else {
            format!("{} answered {} {}: {}", self.server, self.status.as_u16(), self.errcode, self.message)
        }
    }

    /// A refusal that sending the same request again will not change: a 4xx other than
    /// `408 Request Timeout` and `429 Too Many Requests`.
    pub fn is_permanent(&self) -> bool {
        self.status.is_client_error()
            && self.status != StatusCode::REQUEST_TIMEOUT
            && self.status != StatusCode::TOO_MANY_REQUESTS
    }

    /// How long a `429` asks us to wait (`Retry-After` or `retry_after_ms`).
    pub fn retry_after(&self) -> Option<Duration> {
        match &self.kind {
            ErrorKind::LimitExceeded(LimitExceededErrorData { retry_after: Some(after), .. })
                if self.status == StatusCode::TOO_MANY_REQUESTS =>
            {
                Some(match after {
                    RetryAfter::Delay(delay) => *delay,
                    RetryAfter::DateTime(at) => at.duration_since(std::time::SystemTime::now()).unwrap_or_default(),
                })
            }
            _ => None,
        }
    }
}

/// What a `503` tells clients to wait before trying again.
pub const RETRY_AFTER_UNAVAILABLE: Duration = Duration::from_secs(5);

impl Error {
    pub fn matrix(status: StatusCode, kind: ErrorKind, message: impl Into<String>) -> Self {
        Error::Matrix { status, kind, message: message.into() }
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::matrix(StatusCode::FORBIDDEN, ErrorKind::Forbidden, message)
    }
    pub fn bad_json(message: impl Into<String>) -> Self {
        Self::matrix(StatusCode::BAD_REQUEST, ErrorKind::BadJson, message)
    }
    pub fn not_json(message: impl Into<String>) -> Self {
        Self::matrix(StatusCode::BAD_REQUEST, ErrorKind::NotJson, message)
    }
    pub fn invalid_param(message: impl Into<String>) -> Self {
        Self::matrix(StatusCode::BAD_REQUEST, ErrorKind::InvalidParam, message)
    }
    pub fn missing_param(message: impl Into<String>) -> Self {
        Self::matrix(StatusCode::BAD_REQUEST, ErrorKind::MissingParam, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::matrix(StatusCode::NOT_FOUND, ErrorKind::NotFound, message)
    }
    pub fn unrecognized(status: StatusCode, message: impl Into<String>) -> Self {
        Self::matrix(status, ErrorKind::Unrecognized, message)
    }
    /// Another homeserver could not be reached or gave a bad answer: `502 M_UNKNOWN`.
    pub fn federation(message: impl Into<String>) -> Self {
        Self::matrix(StatusCode::BAD_GATEWAY, ErrorKind::Unknown, message)
    }
    /// A federation request without a valid `X-Matrix` signature: `401 M_UNAUTHORIZED`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::matrix(StatusCode::UNAUTHORIZED, ErrorKind::Unauthorized, message)
    }
    pub fn unknown(status: StatusCode, message: impl Into<String>) -> Self {
        Self::matrix(status, ErrorKind::Unknown, message)
    }
    pub fn missing_token() -> Self {
        Self::matrix(StatusCode::UNAUTHORIZED, ErrorKind::MissingToken, "Missing access token")
    }
    pub fn unknown_token(soft_logout: bool) -> Self {
        Self::matrix(
            StatusCode::UNAUTHORIZED,
            ErrorKind::UnknownToken({
                let mut data = UnknownTokenErrorData::new();
                data.soft_logout = soft_logout;
                data
            }),
            if soft_logout { "Access token has expired" } else { "Unknown access token" },
        )
    }
    pub fn user_in_use(message: impl Into<String>) -> Self {
        Self::matrix(StatusCode::BAD_REQUEST, ErrorKind::UserInUse, message)
    }
    pub fn room_in_use(message: impl Into<String>) -> Self {
        Self::matrix(StatusCode::BAD_REQUEST, ErrorKind::RoomInUse, message)
    }
    pub fn invalid_username(message: impl Into<String>) -> Self {
        Self::matrix(StatusCode::BAD_REQUEST, ErrorKind::InvalidUsername, message)
    }
    pub fn weak_password(message: impl Into<String>) -> Self {
        Self::matrix(StatusCode::BAD_REQUEST, ErrorKind::WeakPassword, message)
    }
    pub fn user_deactivated() -> Self {
        Self::matrix(StatusCode::FORBIDDEN, ErrorKind::UserDeactivated, "This account has been deactivated")
    }
    pub fn guest_access_forbidden() -> Self {
        Self::matrix(
            StatusCode::FORBIDDEN,
            ErrorKind::GuestAccessForbidden,
            "Guest access is not enabled on this server",
        )
    }
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::matrix(StatusCode::PAYLOAD_TOO_LARGE, ErrorKind::TooLarge, message)
    }
    pub fn limit_exceeded(retry_after: Duration) -> Self {
        Self::matrix(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::LimitExceeded({
                let mut data = LimitExceededErrorData::new();
                data.retry_after = Some(RetryAfter::Delay(retry_after));
                data
            }),
            "Too many requests; try again later",
        )
    }
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        Error::Internal(detail.to_string())
    }
    pub fn unavailable(detail: impl std::fmt::Display) -> Self {
        Error::Unavailable(detail.to_string())
    }

    /// What the client is told (for quoting in another error).
    pub fn message(&self) -> String {
        match self {
            Error::Matrix { message, .. } => message.clone(),
            Error::Uiaa(_) => "user-interactive authentication required".into(),
            Error::Internal(_) => "internal error".into(),
            Error::Unavailable(_) => "temporarily unavailable".into(),
            Error::Remote(remote) => remote.describe(),
        }
    }

    /// The Matrix errcode, for logs and tests.
    pub fn errcode(&self) -> String {
        match self {
            Error::Matrix { kind, .. } => kind.errcode().to_string(),
            Error::Uiaa(_) => "UIAA".into(),
            Error::Internal(_) | Error::Unavailable(_) => "M_UNKNOWN".into(),
            Error::Remote(remote) if remote.is_relayed_not_found() => "M_NOT_FOUND".into(),
            Error::Remote(_) => "M_UNKNOWN".into(),
        }
    }

    /// What a client is shown for this error, as an `Error::Matrix`: another server's
    /// error becomes `404 M_NOT_FOUND`, its refusal of a join or knock (`403`, `400
    /// M_INCOMPATIBLE_ROOM_VERSION`) as it is, else `502 M_UNKNOWN`; the rest unchanged.
    pub fn relayed(self) -> Self {
        match self {
            Error::Remote(remote) if remote.is_relayed_not_found() => Error::not_found(remote.describe()),
            Error::Remote(remote) if remote.is_relayed_refusal() => {
                let message = remote.describe();
                Error::matrix(remote.status, remote.kind, message)
            }
            Error::Remote(remote) => Error::federation(remote.describe()),
            other => other,
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let result = match self {
            // Shown as the `Error::Matrix` it relays to.
            remote @ Error::Remote(_) => return remote.relayed().into_response(),
            Error::Matrix { status, kind, message } => {
                let body = ErrorBody::Standard(StandardErrorBody::new(kind, message));
                ruma::api::error::Error::new(status, body).try_into_http_response::<Vec<u8>>()
            }
            Error::Uiaa(info) => UiaaResponse::AuthResponse(*info).try_into_http_response::<Vec<u8>>(),
            Error::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                let body =
                    ErrorBody::Standard(StandardErrorBody::new(ErrorKind::Unknown, "Internal server error".into()));
                ruma::api::error::Error::new(StatusCode::INTERNAL_SERVER_ERROR, body)
                    .try_into_http_response::<Vec<u8>>()
            }
            Error::Unavailable(detail) => {
                static LOG: crate::logging::Throttle = crate::logging::Throttle::new(Duration::from_secs(10));
                if let Some(count) = LOG.hit() {
                    tracing::warn!(%detail, count, "answering 503: the database does not answer (count: since the last line)");
                }
                let body = ErrorBody::Standard(StandardErrorBody::new(
                    ErrorKind::Unknown,
                    "The server cannot reach its database; try again later".into(),
                ));
                ruma::api::error::Error::new(StatusCode::SERVICE_UNAVAILABLE, body)
                    .try_into_http_response::<Vec<u8>>()
                    .map(|mut response| {
                        response
                            .headers_mut()
                            .insert(axum::http::header::RETRY_AFTER, RETRY_AFTER_UNAVAILABLE.as_secs().into());
                        response
                    })
            }
        };
        match result {
            Ok(response) => response.map(Body::from),
            Err(e) => {
                tracing::error!(error = %e, "could not serialize an error response");
                (StatusCode::INTERNAL_SERVER_ERROR, r#"{"errcode":"M_UNKNOWN","error":"Internal server error"}"#)
                    .into_response()
            }
        }
    }
}
