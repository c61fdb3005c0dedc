//! The account: `whoami`, `account/password`, `account/deactivate`, `account/3pid`,
//! and OpenID tokens (`user/{userId}/openid/request_token`).

use axum::{Router, extract::State};
use ruma::{
    api::client::account::{
        ThirdPartyIdRemovalStatus, change_password, deactivate, get_3pids, request_openid_token, whoami,
    },
    authentication::TokenType,
};

use crate::{
    error::Result,
    http::{
        AppState, route,
        ruma::{Ruma, RumaResponse},
    },
};

/// # `GET /_matrix/client/v3/account/whoami`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3accountwhoami>
async fn whoami(req: Ruma<whoami::v3::Request>) -> Result<RumaResponse<whoami::v3::Response>> {
    let session = req.session()?;
    let mut response = whoami::v3::Response::new(session.user_id.clone(), false);
    response.device_id = Some(session.device_id.clone());
    Ok(response.into())
}

/// # `POST /_matrix/client/v3/account/password`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3accountpassword>
async fn change_password(
    State(services): State<AppState>,
    req: Ruma<change_password::v3::Request>,
) -> Result<RumaResponse<change_password::v3::Response>> {
    let session = req.session()?;
    let body = &req.body;
    services
        .change_password(session, &body.new_password, body.logout_devices, body.auth.as_ref(), &req.client_ip)
        .await?;
    Ok(change_password::v3::Response::new().into())
}

/// # `POST /_matrix/client/v3/account/deactivate`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3accountdeactivate>
async fn deactivate(
    State(services): State<AppState>,
    req: Ruma<deactivate::v3::Request>,
) -> Result<RumaResponse<deactivate::v3::Response>> {
    let session = req.session()?;
    services.deactivate(&session.user_id, req.body.erase, req.body.auth.as_ref(), &req.client_ip).await?;
    Ok(deactivate::v3::Response::new(ThirdPartyIdRemovalStatus::NoSupport).into())
}

/// # `GET /_matrix/client/v3/account/3pid`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3account3pid>
///
/// Convo does not bind e-mail addresses or phone numbers: the list is empty.
async fn get_3pids(req: Ruma<get_3pids::v3::Request>) -> Result<RumaResponse<get_3pids::v3::Response>> {
    req.session()?;
    Ok(get_3pids::v3::Response::new(Vec::new()).into())
}

/// # `POST /_matrix/client/v3/user/{userId}/openid/request_token`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3useruseridopenidrequest_token>
async fn request_openid_token(
    State(services): State<AppState>,
    req: Ruma<request_openid_token::v3::Request>,
) -> Result<RumaResponse<request_openid_token::v3::Response>> {
    let (token, expires_in) = services.request_openid_token(&req.session()?.user_id, &req.body.user_id).await?;
    let server = services.server_name().clone();
    Ok(request_openid_token::v3::Response::new(token, TokenType::Bearer, server, expires_in).into())
}

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<whoami::v3::Request, _, _>(router, whoami);
    let router = route::<change_password::v3::Request, _, _>(router, change_password);
    let router = route::<deactivate::v3::Request, _, _>(router, deactivate);
    let router = route::<request_openid_token::v3::Request, _, _>(router, request_openid_token);
    route::<get_3pids::v3::Request, _, _>(router, get_3pids)
}
