//! Accounts: registration, password login, password changes, deactivation, and the
//! rules for user names.

use ruma::{
    OwnedDeviceId, OwnedUserId, UserId,
    api::client::uiaa::{AuthData, AuthType},
};

use super::{
    IssuedSession, RateLimitKind, Services, Session,
    ids::{generate_localpart, hash_token},
    now_ms,
    password::check_policy,
    ratelimit::{ip_key, user_key},
    sessions::check_device_fields,
    uiaa::UiaaContext,
};
use crate::{
    config::RegistrationMode,
    error::{Error, Result},
    storage::NewUser,
};

/// `POST /register`, as the service sees it.
pub struct RegisterRequest {
    pub username: Option<String>,
    pub password: Option<String>,
    pub device_id: Option<OwnedDeviceId>,
    pub initial_device_display_name: Option<String>,
    pub auth: Option<AuthData>,
    pub inhibit_login: bool,
    pub refresh_token: bool,
    pub guest: bool,
}

pub struct RegisterOutcome {
    pub user_id: OwnedUserId,
    pub session: Option<IssuedSession>,
}

/// `POST /login` with `m.login.password`, as the service sees it.
pub struct LoginRequest {
    /// A user id or a localpart.
    pub user: String,
    pub password: String,
    pub device_id: Option<OwnedDeviceId>,
    pub initial_device_display_name: Option<String>,
    pub refresh_token: bool,
}

/// Characters allowed in the localparts of new users (the spec's user id grammar).
fn valid_localpart_char(c: char) -> bool {
    matches!(c, 'a'..='z' | '0'..='9' | '.' | '_' | '=' | '-' | '/' | '+')
}

impl Services {
    /// Checks a wished-for localpart and builds the user id (`M_INVALID_USERNAME`).
    pub fn user_id_for_new_localpart(&self, localpart: &str) -> Result<OwnedUserId> {
        if localpart.is_empty() {
            return Err(Error::invalid_username("The user name must not be empty"));
        }
        if let Some(bad) = localpart.chars().find(|c| !valid_localpart_char(*c)) {
            return Err(Error::invalid_username(format!(
                "User names may contain only a-z, 0-9 and . _ = - / +; found {bad:?}"
            )));
        }
        if localpart.starts_with('_') {
            return Err(Error::invalid_username("User names starting with '_' are reserved"));
        }
        let user_id = format!("@{localpart}:{}", self.server_name());
        if user_id.len() > 255 {
            return Err(Error::invalid_username("The user id would be longer than 255 bytes"));
        }
        UserId::parse(user_id).map_err(|e| Error::invalid_username(e.to_string()))
    }

    /// Resolves what a client typed at login (`@alice:server` or `alice`) to a local
    /// user id. Localparts are matched case-insensitively, as registration stores them
    /// in lower case.
    pub fn resolve_user(&self, user: &str) -> Result<OwnedUserId> {
        let user_id = if user.starts_with('@') {
            let parsed = UserId::parse(user).map_err(|_| Error::forbidden("Invalid username or password"))?;
            let localpart = parsed.localpart().to_lowercase();
            UserId::parse(format!("@{localpart}:{}", parsed.server_name()))
                .map_err(|_| Error::forbidden("Invalid username or password"))?
        } else {
            UserId::parse(format!("@{}:{}", user.to_lowercase(), self.server_name()))
                .map_err(|_| Error::forbidden("Invalid username or password"))?
        };
        if user_id.server_name() != self.server_name() {
            return Err(Error::forbidden("That user is not on this server"));
        }
        Ok(user_id)
    }

    /// `GET /register/available`: `M_USER_IN_USE` or `M_INVALID_USERNAME` if not.
    pub async fn check_username_available(&self, localpart: &str) -> Result<OwnedUserId> {
        let user_id = self.user_id_for_new_localpart(localpart)?;
        if self.store.user_exists(user_id.as_str()).await? {
            return Err(Error::user_in_use("That user name is taken"));
        }
        Ok(user_id)
    }

    fn registration_flows(&self) -> Result<Vec<Vec<AuthType>>> {
        match self.config.registration.mode {
            // The dummy stage after the token is what clients written against Synapse
            // expect (matrix-nio's register_with_token sends it as a third request).
            RegistrationMode::Token => Ok(vec![vec![AuthType::RegistrationToken, AuthType::Dummy]]),
            RegistrationMode::Open => Ok(vec![vec![AuthType::Dummy]]),
            RegistrationMode::Closed => Err(Error::forbidden("Registration is closed on this server")),
        }
    }

    /// `POST /register`: checks the name and password first when given (so the client
    /// learns of a taken name or a weak password before any token is spent), then UIA,
    /// then creates the account.
    pub async fn register(&self, req: RegisterRequest, client_ip: &str) -> Result<RegisterOutcome> {
        if req.guest {
            return Err(Error::guest_access_forbidden());
        }
        let flows = self.registration_flows()?;
        // A registration counts once against the limit: when its UIA session starts.
        // Later requests of a known session are not counted again.
        let known_session = match req.auth.as_ref().and_then(AuthData::session) {
            Some(id) => self.store.get_uiaa_session(id).await?.is_some_and(|s| s.purpose == "register"),
            None => false,
        };
        if !known_session {
            self.rate_limiter.check(RateLimitKind::Registration, client_ip)?;
        }
        let user_id = match &req.username {
            Some(name) => self.check_username_available(name).await?,
            None => self.check_username_available(&generate_localpart()).await?,
        };
        if let Some(password) = req.password.as_deref() {
            check_policy(&self.config.password_policy, password, user_id.localpart())?;
        }
        check_device_fields(req.device_id.as_deref().map(|d| d.as_str()), req.initial_device_display_name.as_deref())?;

        // A request without a password still gets the flows: Element asks for them
        // with an empty body before it shows its registration form.
        let ctx = UiaaContext { purpose: "register", flows, user: None, client_ip };
        let session = self.check_uiaa(&ctx, req.auth.as_ref()).await?;
        // Tokens from the configuration have no use count.
        let counted_token =
            session.registration_token.as_deref().filter(|t| !self.config.registration.tokens.iter().any(|s| s == t));
        let password = req.password.as_deref().ok_or_else(|| Error::missing_param("A password is required"))?;

        let hash = self.hash_password(password).await?;
        let issued = (!req.inhibit_login).then(|| self.new_tokens(req.device_id.clone(), req.refresh_token));
        let hashes = issued.as_ref().map(|i| (hash_token(&i.access_token), i.refresh_token.as_deref().map(hash_token)));
        let session_row = match (&issued, &hashes) {
            (Some(i), Some(h)) => {
                Some(self.session_row(user_id.as_str(), i, h, req.initial_device_display_name.as_deref(), client_ip))
            }
            _ => None,
        };
        self.store
            .create_user(NewUser {
                user_id: user_id.as_str(),
                password_hash: Some(&hash),
                is_admin: false,
                displayname: Some(user_id.localpart()),
                created_ts: now_ms(),
                session: session_row,
                registration_token: counted_token,
                uiaa_session: Some(&session.session_id),
            })
            .await?;
        tracing::info!(user_id = %user_id, "registered a new user");
        Ok(RegisterOutcome { user_id, session: issued })
    }

    /// `POST /login` with a password.
    pub async fn login_password(&self, req: LoginRequest, client_ip: &str) -> Result<(OwnedUserId, IssuedSession)> {
        self.rate_limiter.check(RateLimitKind::Login, client_ip)?;
        let user_id = self.resolve_user(&req.user)?;
        let user = self.store.get_user_auth(user_id.as_str()).await?;
        let hash = user.as_ref().and_then(|u| u.password_hash.as_deref());
        let ok = self.check_password_limited(&user_id, hash, &req.password, client_ip).await?;
        if user.as_ref().is_some_and(|u| u.deactivated) {
            return Err(Error::user_deactivated());
        }
        if !ok {
            return Err(Error::forbidden("Invalid username or password"));
        }
        let issued = self
            .issue_session(
                user_id.as_str(),
                req.device_id,
                req.initial_device_display_name.as_deref(),
                req.refresh_token,
                client_ip,
            )
            .await?;
        tracing::info!(user_id = %user_id, device_id = %issued.device_id, "logged in");
        Ok((user_id, issued))
    }

    fn password_flows() -> Vec<Vec<AuthType>> {
        vec![vec![AuthType::Password]]
    }

    /// Checks a password against a user's hash (`None`: no such user or no password,
    /// which still spends one hash). Checks are limited per user and per client
    /// address: each takes a token of both buckets before hashing, and a right
    /// password gives them back, so only failures count and parallel guesses are
    /// bounded too.
    pub(super) async fn check_password_limited(
        &self,
        user: &UserId,
        hash: Option<&str>,
        password: &str,
        client_ip: &str,
    ) -> Result<bool> {
        let keys = [user_key(user.as_str()), ip_key(client_ip)];
        let keys = [keys[0].as_str(), keys[1].as_str()];
        self.rate_limiter.acquire(RateLimitKind::FailedPassword, &keys)?;
        let ok = self.verify_password(hash, password).await;
        match ok {
            Ok(false) => tracing::info!(user_id = %user, client_ip, "wrong password"),
            _ => self.rate_limiter.refund(RateLimitKind::FailedPassword, &keys),
        }
        ok
    }

    /// UIA with the user's password, for endpoints that change the account.
    pub async fn require_password_uiaa(
        &self,
        purpose: &'static str,
        user: &UserId,
        auth: Option<&AuthData>,
        client_ip: &str,
    ) -> Result<()> {
        let ctx = UiaaContext { purpose, flows: Self::password_flows(), user: Some(user), client_ip };
        let session = self.check_uiaa(&ctx, auth).await?;
        self.store.delete_uiaa_session(&session.session_id).await
    }

    /// `POST /account/password`.
    pub async fn change_password(
        &self,
        session: &Session,
        new_password: &str,
        logout_devices: bool,
        auth: Option<&AuthData>,
        client_ip: &str,
    ) -> Result<()> {
        self.require_password_uiaa("change_password", &session.user_id, auth, client_ip).await?;
        check_policy(&self.config.password_policy, new_password, session.user_id.localpart())?;
        let hash = self.hash_password(new_password).await?;
        self.store
            .set_password_hash(session.user_id.as_str(), &hash, logout_devices, Some(session.device_id.as_str()))
            .await?;
        Ok(())
    }

    /// `POST /account/deactivate`.
    pub async fn deactivate(&self, user: &UserId, erase: bool, auth: Option<&AuthData>, client_ip: &str) -> Result<()> {
        self.require_password_uiaa("deactivate", user, auth, client_ip).await?;
        self.store.deactivate_user(user.as_str(), erase).await?;
        tracing::info!(user_id = %user, erase, "deactivated a user");
        Ok(())
    }

    /// `convo admin create-user`: no UIA, no rate limit, same name and password rules.
    pub async fn create_user_admin(&self, localpart: &str, password: &str, is_admin: bool) -> Result<OwnedUserId> {
        let user_id = self.check_username_available(localpart).await?;
        check_policy(&self.config.password_policy, password, user_id.localpart())?;
        let hash = self.hash_password(password).await?;
        self.store
            .create_user(NewUser {
                user_id: user_id.as_str(),
                password_hash: Some(&hash),
                is_admin,
                displayname: Some(user_id.localpart()),
                created_ts: now_ms(),
                session: None,
                registration_token: None,
                uiaa_session: None,
            })
            .await?;
        Ok(user_id)
    }

    /// `convo admin reset-password`: sets a password and signs out every device.
    pub async fn reset_password_admin(&self, user: &str, password: &str) -> Result<OwnedUserId> {
        let user_id = self.resolve_user(user).map_err(|_| Error::not_found("No such user"))?;
        check_policy(&self.config.password_policy, password, user_id.localpart())?;
        let hash = self.hash_password(password).await?;
        if !self.store.set_password_hash(user_id.as_str(), &hash, true, None).await? {
            return Err(Error::not_found("No such active user"));
        }
        Ok(user_id)
    }
}
