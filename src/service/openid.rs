//! OpenID tokens: a user asks for one (`/user/{userId}/openid/request_token`) to hand
//! to another service (an integration manager, a widget), which trades it with this
//! server for the user's id (`/_matrix/federation/v1/openid/userinfo`, no X-Matrix).
//! A token is 256 random bits, stored hashed, valid for an hour; it proves only who
//! the user is and grants nothing else.

use std::time::Duration;

use axum::http::StatusCode;
use ruma::{
    OwnedUserId, UserId,
    api::error::{ErrorKind, UnknownTokenErrorData},
};

use super::{
    Services,
    ids::{generate_openid_token, hash_token},
    now_ms,
};
use crate::error::{Error, Result};

/// How long an OpenID token is valid.
pub const OPENID_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

impl Services {
    /// `POST /user/{userId}/openid/request_token` by `requester`: a new token for
    /// `user`, who must be the requester (`M_FORBIDDEN` otherwise). Answers the token
    /// and how long it is valid.
    pub async fn request_openid_token(&self, requester: &UserId, user: &UserId) -> Result<(String, Duration)> {
        if requester != user {
            return Err(Error::forbidden("You may only ask for OpenID tokens of your own account"));
        }
        let lifetime = OPENID_TOKEN_LIFETIME;
        let token = self.issue_openid_token(user, now_ms() + lifetime.as_millis() as i64).await?;
        Ok((token, lifetime))
    }

    /// Makes and stores an OpenID token of `user` valid until `expires_ts` (ms since
    /// the epoch); answers it.
    pub async fn issue_openid_token(&self, user: &UserId, expires_ts: i64) -> Result<String> {
        let token = generate_openid_token();
        self.store.create_openid_token(&hash_token(&token), user.as_str(), expires_ts, now_ms()).await?;
        Ok(token)
    }

    /// `GET /openid/userinfo?access_token=`: the user of a token that has not expired;
    /// `401 M_UNKNOWN_TOKEN` otherwise.
    pub async fn openid_userinfo(&self, token: &str) -> Result<OwnedUserId> {
        let user = self.store.find_openid_token(&hash_token(token), now_ms()).await?.ok_or_else(|| {
            let kind = ErrorKind::UnknownToken(UnknownTokenErrorData::new());
            Error::matrix(StatusCode::UNAUTHORIZED, kind, "Unknown or expired OpenID token")
        })?;
        OwnedUserId::try_from(user).map_err(Error::internal)
    }
}
