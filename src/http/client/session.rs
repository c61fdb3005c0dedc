//! Login and logout: `login` (GET and POST), `refresh`, `logout`, `logout/all`.

use axum::{Router, extract::State};
use ruma::api::client::{
    session::{
        get_login_types::{
            self,
            v3::{LoginType, PasswordLoginType},
        },
        login::{self, v3::LoginInfo},
        logout, logout_all, refresh_token,
    },
    uiaa::UserIdentifier,
};

use crate::{
    error::{Error, Result},
    http::{
        AppState, route,
        ruma::{Ruma, RumaResponse},
    },
    service::LoginRequest,
};

/// # `GET /_matrix/client/v3/login`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3login>
async fn get_login_types(_: Ruma<get_login_types::v3::Request>) -> Result<RumaResponse<get_login_types::v3::Response>> {
    Ok(get_login_types::v3::Response::new(vec![LoginType::Password(PasswordLoginType::new())]).into())
}

/// # `POST /_matrix/client/v3/login`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3login>
#[allow(deprecated)] // the legacy `user` field is still sent by older clients
async fn login(
    State(services): State<AppState>,
    req: Ruma<login::v3::Request>,
) -> Result<RumaResponse<login::v3::Response>> {
    let body = req.body;
    let LoginInfo::Password(password) = body.login_info else {
        return Err(Error::unknown(
            axum::http::StatusCode::BAD_REQUEST,
            "Unsupported login type; use m.login.password",
        ));
    };
    let user = match (password.identifier, password.user) {
        (Some(UserIdentifier::Matrix(id)), _) => id.user,
        (None, Some(user)) => user,
        (Some(_), _) => return Err(Error::forbidden("Only m.id.user identifiers are supported")),
        (None, None) => return Err(Error::missing_param("An identifier is required")),
    };
    let (user_id, issued) = services
        .login_password(
            LoginRequest {
                user,
                password: password.password,
                device_id: body.device_id,
                initial_device_display_name: body.initial_device_display_name,
                refresh_token: body.refresh_token,
            },
            &req.client_ip,
        )
        .await?;
    let mut response = login::v3::Response::new(user_id, issued.access_token, issued.device_id);
    response.refresh_token = issued.refresh_token;
    response.expires_in = issued.expires_in;
    Ok(response.into())
}

/// # `POST /_matrix/client/v3/refresh`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3refresh>
async fn refresh(
    State(services): State<AppState>,
    req: Ruma<refresh_token::v3::Request>,
) -> Result<RumaResponse<refresh_token::v3::Response>> {
    let issued = services.refresh(&req.body.refresh_token).await?;
    let mut response = refresh_token::v3::Response::new(issued.access_token);
    response.refresh_token = issued.refresh_token;
    response.expires_in_ms = issued.expires_in;
    Ok(response.into())
}

/// # `POST /_matrix/client/v3/logout`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3logout>
async fn logout(
    State(services): State<AppState>,
    req: Ruma<logout::v3::Request>,
) -> Result<RumaResponse<logout::v3::Response>> {
    services.logout(req.session()?).await?;
    Ok(logout::v3::Response::new().into())
}

/// # `POST /_matrix/client/v3/logout/all`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3logoutall>
async fn logout_all(
    State(services): State<AppState>,
    req: Ruma<logout_all::v3::Request>,
) -> Result<RumaResponse<logout_all::v3::Response>> {
    services.logout_all(req.session()?.user_id.as_str()).await?;
    Ok(logout_all::v3::Response::new().into())
}

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<get_login_types::v3::Request, _, _>(router, get_login_types);
    let router = route::<login::v3::Request, _, _>(router, login);
    let router = route::<refresh_token::v3::Request, _, _>(router, refresh);
    let router = route::<logout::v3::Request, _, _>(router, logout);
    route::<logout_all::v3::Request, _, _>(router, logout_all)
}
