//! Registration: `register`, `register/available` and registration token validity.

use axum::{Router, extract::State};
use ruma::api::client::account::{
    check_registration_token_validity, get_username_availability,
    register::{self, RegistrationKind},
};

use crate::{
    error::{Error, Result},
    http::{
        AppState, route,
        ruma::{Ruma, RumaResponse},
    },
    service::{RateLimitKind, RegisterRequest},
};

/// # `POST /_matrix/client/v3/register`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3register>
async fn register(
    State(services): State<AppState>,
    req: Ruma<register::v3::Request>,
) -> Result<RumaResponse<register::v3::Response>> {
    let body = req.body;
    let outcome = services
        .register(
            RegisterRequest {
                username: body.username,
                password: body.password,
                device_id: body.device_id,
                initial_device_display_name: body.initial_device_display_name,
                auth: body.auth,
                inhibit_login: body.inhibit_login,
                refresh_token: body.refresh_token,
                guest: body.kind == RegistrationKind::Guest,
            },
            &req.client_ip,
        )
        .await?;
    let mut response = register::v3::Response::new(outcome.user_id);
    if let Some(session) = outcome.session {
        response.access_token = Some(session.access_token);
        response.device_id = Some(session.device_id);
        response.refresh_token = session.refresh_token;
        response.expires_in = session.expires_in;
    }
    Ok(response.into())
}

/// # `GET /_matrix/client/v3/register/available`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3registeravailable>
async fn get_username_availability(
    State(services): State<AppState>,
    req: Ruma<get_username_availability::v3::Request>,
) -> Result<RumaResponse<get_username_availability::v3::Response>> {
    services.rate_limiter.check(RateLimitKind::Registration, &req.client_ip)?;
    services.check_username_available(&req.body.username).await?;
    Ok(get_username_availability::v3::Response::new(true).into())
}

/// # `GET /_matrix/client/v1/register/m.login.registration_token/validity`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv1registermloginregistration_tokenvalidity>
async fn check_registration_token_validity(
    State(services): State<AppState>,
    req: Ruma<check_registration_token_validity::v1::Request>,
) -> Result<RumaResponse<check_registration_token_validity::v1::Response>> {
    if services.config.registration.mode != crate::config::RegistrationMode::Token {
        return Err(Error::forbidden("This server does not use registration tokens"));
    }
    services.rate_limiter.check(RateLimitKind::Registration, &req.client_ip)?;
    let valid = services.registration_token_valid(&req.body.token).await?;
    Ok(check_registration_token_validity::v1::Response::new(valid).into())
}

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<register::v3::Request, _, _>(router, register);
    let router = route::<get_username_availability::v3::Request, _, _>(router, get_username_availability);
    route::<check_registration_token_validity::v1::Request, _, _>(router, check_registration_token_validity)
}
