//! Profiles: the whole profile and single fields (display name, avatar, extended fields).

use axum::{Router, extract::State};
use ruma::api::client::profile::{delete_profile_field, get_profile, get_profile_field, set_profile_field};

use crate::{
    error::{Error, Result},
    http::{
        AppState, route,
        ruma::{Ruma, RumaResponse},
    },
};

/// # `GET /_matrix/client/v3/profile/{userId}`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3profileuserid>
async fn get_profile(
    State(services): State<AppState>,
    req: Ruma<get_profile::v3::Request>,
) -> Result<RumaResponse<get_profile::v3::Response>> {
    let profile = services.lookup_profile(&req.body.user_id, None).await?;
    Ok(get_profile::v3::Response::from_iter(profile.iter().map(|(k, v)| (k.clone(), v.clone()))).into())
}

/// # `GET /_matrix/client/v3/profile/{userId}/{keyName}`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3profileuseridkeyname>
async fn get_profile_field(
    State(services): State<AppState>,
    req: Ruma<get_profile_field::v3::Request>,
) -> Result<RumaResponse<get_profile_field::v3::Response>> {
    let field = req.body.field.as_str();
    let profile = services.lookup_profile(&req.body.user_id, Some(field)).await?;
    let value = profile.get(field).ok_or_else(|| Error::not_found(format!("The profile has no {field}")))?;
    let value = ruma::profile::ProfileFieldValue::new(field, value.clone()).map_err(Error::internal)?;
    Ok(get_profile_field::v3::Response::new(value).into())
}

/// # `PUT /_matrix/client/v3/profile/{userId}/{keyName}`
/// <https://spec.matrix.org/v1.19/client-server-api/#put_matrixclientv3profileuseridkeyname>
async fn set_profile_field(
    State(services): State<AppState>,
    req: Ruma<set_profile_field::v3::Request>,
) -> Result<RumaResponse<set_profile_field::v3::Response>> {
    let session = req.session()?;
    let value = &req.body.value;
    services
        .set_profile_field(session, &req.body.user_id, value.field_name().as_str(), value.value().into_owned())
        .await?;
    Ok(set_profile_field::v3::Response::new().into())
}

/// # `DELETE /_matrix/client/v3/profile/{userId}/{keyName}`
/// <https://spec.matrix.org/v1.19/client-server-api/#delete_matrixclientv3profileuseridkeyname>
async fn delete_profile_field(
    State(services): State<AppState>,
    req: Ruma<delete_profile_field::v3::Request>,
) -> Result<RumaResponse<delete_profile_field::v3::Response>> {
    let session = req.session()?;
    services.delete_profile_field(session, &req.body.user_id, req.body.field.as_str()).await?;
    Ok(delete_profile_field::v3::Response::new().into())
}

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<get_profile::v3::Request, _, _>(router, get_profile);
    let router = route::<get_profile_field::v3::Request, _, _>(router, get_profile_field);
    let router = route::<set_profile_field::v3::Request, _, _>(router, set_profile_field);
    route::<delete_profile_field::v3::Request, _, _>(router, delete_profile_field)
}
