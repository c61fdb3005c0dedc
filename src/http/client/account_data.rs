//! Account data, global and per room.

use axum::{Router, extract::State};
use ruma::api::client::config::{
    get_global_account_data, get_room_account_data, set_global_account_data, set_room_account_data,
};

use crate::{
    error::Result,
    http::{
        AppState, route,
        ruma::{Ruma, RumaResponse},
    },
};

/// # `GET /_matrix/client/v3/user/{userId}/account_data/{type}`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3useruseridaccount_datatype>
async fn get_global_account_data(
    State(services): State<AppState>,
    req: Ruma<get_global_account_data::v3::Request>,
) -> Result<RumaResponse<get_global_account_data::v3::Response>> {
    let b = &req.body;
    let data = services.get_account_data(req.session()?, &b.user_id, "", &b.event_type.to_string()).await?;
    Ok(get_global_account_data::v3::Response::new(data).into())
}

/// # `PUT /_matrix/client/v3/user/{userId}/account_data/{type}`
/// <https://spec.matrix.org/v1.19/client-server-api/#put_matrixclientv3useruseridaccount_datatype>
async fn set_global_account_data(
    State(services): State<AppState>,
    req: Ruma<set_global_account_data::v3::Request>,
) -> Result<RumaResponse<set_global_account_data::v3::Response>> {
    let b = &req.body;
    services.set_account_data(req.session()?, &b.user_id, "", &b.event_type.to_string(), b.data.json()).await?;
    Ok(set_global_account_data::v3::Response::new().into())
}

/// # `GET /_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3useruseridroomsroomidaccount_datatype>
async fn get_room_account_data(
    State(services): State<AppState>,
    req: Ruma<get_room_account_data::v3::Request>,
) -> Result<RumaResponse<get_room_account_data::v3::Response>> {
    let b = &req.body;
    let data =
        services.get_account_data(req.session()?, &b.user_id, b.room_id.as_str(), &b.event_type.to_string()).await?;
    Ok(get_room_account_data::v3::Response::new(data).into())
}

/// # `PUT /_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}`
/// <https://spec.matrix.org/v1.19/client-server-api/#put_matrixclientv3useruseridroomsroomidaccount_datatype>
async fn set_room_account_data(
    State(services): State<AppState>,
    req: Ruma<set_room_account_data::v3::Request>,
) -> Result<RumaResponse<set_room_account_data::v3::Response>> {
    let b = &req.body;
    services
        .set_account_data(req.session()?, &b.user_id, b.room_id.as_str(), &b.event_type.to_string(), b.data.json())
        .await?;
    Ok(set_room_account_data::v3::Response::new().into())
}

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<get_global_account_data::v3::Request, _, _>(router, get_global_account_data);
    let router = route::<set_global_account_data::v3::Request, _, _>(router, set_global_account_data);
    let router = route::<get_room_account_data::v3::Request, _, _>(router, get_room_account_data);
    route::<set_room_account_data::v3::Request, _, _>(router, set_room_account_data)
}
