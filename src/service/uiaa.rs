//! User-interactive authentication (UIA): sessions, flows and the stages Convo offers
//! (`m.login.password`, `m.login.registration_token`, `m.login.dummy`).

use ruma::{
    UserId,
    api::{
        client::uiaa::{AuthData, AuthFlow, AuthType, UiaaInfo, UserIdentifier},
        error::{ErrorKind, StandardErrorBody},
    },
};
use serde_json::value::to_raw_value;

use super::{Services, ids::generate_session_id, now_ms};
use crate::{
    error::{Error, Result},
    storage::UiaaSession,
};

/// How long a UIA session may take.
const SESSION_LIFETIME_MS: i64 = 30 * 60 * 1000;

/// The authenticated user a UIA round concerns, and the endpoint it guards.
pub struct UiaaContext<'a> {
    pub purpose: &'static str,
    pub flows: Vec<Vec<AuthType>>,
    pub user: Option<&'a UserId>,
    /// The client's address: wrong passwords are limited per user and per address.
    pub client_ip: &'a str,
}

impl Services {
    /// One round of UIA. Returns the session once a whole flow is complete; otherwise
    /// `Error::Uiaa` (401) with the flows, the session and what is completed, plus an
    /// `auth_error` when the stage just tried failed.
    pub async fn check_uiaa(&self, ctx: &UiaaContext<'_>, auth: Option<&AuthData>) -> Result<UiaaSession> {
        let now = now_ms();
        self.store.prune_uiaa_sessions(now - SESSION_LIFETIME_MS).await?;

        let mut session = match auth.and_then(AuthData::session) {
            Some(id) => {
                let session = self.store.get_uiaa_session(id).await?.ok_or_else(|| {
                    Error::unknown(axum::http::StatusCode::BAD_REQUEST, "Unknown or expired UIA session")
                })?;
                if session.purpose != ctx.purpose || session.user_id.as_deref() != ctx.user.map(UserId::as_str) {
                    return Err(Error::forbidden("That UIA session belongs to another request"));
                }
                session
            }
            None => {
                let session = UiaaSession {
                    session_id: generate_session_id(),
                    purpose: ctx.purpose.to_owned(),
                    user_id: ctx.user.map(|u| u.to_string()),
                    completed: Vec::new(),
                    registration_token: None,
                    created_ts: now,
                };
                self.store.create_uiaa_session(&session).await?;
                session
            }
        };

        let Some(auth) = auth else {
            return Err(self.uiaa_error(ctx, &session, None));
        };
        if let Some(stage) = auth.auth_type()
            && !ctx.flows.iter().any(|flow| flow.contains(&stage))
        {
            return Err(Error::bad_json(format!("Authentication type {stage} is not offered here")));
        }
        if matches!(auth, AuthData::FallbackAcknowledgement(_)) {
            // The client believes a stage was done out of band; Convo has no such
            // stages, so this only reports where the session stands.
        } else {
            self.apply_stage(ctx, &mut session, auth).await?;
        }
        let done = ctx.flows.iter().any(|flow| flow.iter().all(|s| session.completed.contains(&s.to_string())));
        if done { Ok(session) } else { Err(self.uiaa_error(ctx, &session, None)) }
    }

    /// Runs one stage and records it in the session if it passed.
    async fn apply_stage(&self, ctx: &UiaaContext<'_>, session: &mut UiaaSession, auth: &AuthData) -> Result<()> {
        match self.run_stage(ctx, session, auth).await {
            Ok(stage) => {
                if !session.completed.contains(&stage.to_string()) {
                    session.completed.push(stage.to_string());
                }
                self.store.update_uiaa_session(session).await?;
            }
            // A rate limit is the answer itself (429), not a failed stage.
            Err(e @ Error::Matrix { kind: ErrorKind::LimitExceeded(_), .. }) => return Err(e),
            Err(Error::Matrix { kind, message, .. }) => {
                return Err(self.uiaa_error(ctx, session, Some(StandardErrorBody::new(kind, message))));
            }
            Err(other) => return Err(other),
        }
        Ok(())
    }

    /// Checks one stage and says which it was.
    async fn run_stage(&self, ctx: &UiaaContext<'_>, session: &mut UiaaSession, auth: &AuthData) -> Result<AuthType> {
        match auth {
            AuthData::Dummy(_) => Ok(AuthType::Dummy),
            AuthData::RegistrationToken(t) => {
                let retried = session.registration_token.as_deref() == Some(t.token.as_str());
                let is_static = self.config.registration.tokens.contains(&t.token);
                // A stored token's use is reserved for this session atomically, so
                // that concurrent registrations cannot all pass with the last use.
                if !retried
                    && !is_static
                    && !self.store.reserve_registration_token(&session.session_id, &t.token, now_ms()).await?
                {
                    return Err(Error::forbidden("Invalid registration token"));
                }
                session.registration_token = Some(t.token.clone());
                Ok(AuthType::RegistrationToken)
            }
            AuthData::Password(p) => {
                let user =
                    ctx.user.ok_or_else(|| Error::forbidden("Password authentication needs a signed-in user"))?;
                let named = match &p.identifier {
                    UserIdentifier::Matrix(id) => self.resolve_user(&id.user).ok(),
                    _ => None,
                };
                if named.as_deref() != Some(user) {
                    return Err(Error::forbidden("Invalid username or password"));
                }
                let hash = self.store.get_user_auth(user.as_str()).await?.and_then(|u| u.password_hash);
                if !self.check_password_limited(user, hash.as_deref(), &p.password, ctx.client_ip).await? {
                    return Err(Error::forbidden("Invalid username or password"));
                }
                Ok(AuthType::Password)
            }
            other => Err(Error::bad_json(format!(
                "Unsupported authentication type {}",
                other.auth_type().map(|t| t.to_string()).unwrap_or_default()
            ))),
        }
    }

    fn uiaa_error(&self, ctx: &UiaaContext<'_>, session: &UiaaSession, auth_error: Option<StandardErrorBody>) -> Error {
        let mut info = UiaaInfo::new(ctx.flows.iter().map(|stages| AuthFlow::new(stages.clone())).collect());
        info.completed = session.completed.iter().map(|s| AuthType::from(s.as_str())).collect();
        info.session = Some(session.session_id.clone());
        info.params = to_raw_value(&serde_json::json!({})).ok();
        info.auth_error = auth_error.map(Box::new);
        Error::Uiaa(Box::new(info))
    }

    /// Whether a registration token may be used now: configured statically, or stored,
    /// not expired and not used up (counting registrations in progress). Informative
    /// only: the use itself is reserved atomically at the token stage.
    pub async fn registration_token_valid(&self, token: &str) -> Result<bool> {
        if self.config.registration.tokens.iter().any(|t| t == token) {
            return Ok(true);
        }
        let Some(info) = self.store.get_registration_token(token).await? else {
            return Ok(false);
        };
        if info.expiry_ts.is_some_and(|expiry| expiry <= now_ms()) {
            return Ok(false);
        }
        Ok(info.uses_allowed.is_none_or(|allowed| info.completed + info.pending < allowed))
    }
}
