//! Device management: list, get, rename and delete (with UIA).

use axum::{
    Router,
    body::Body,
    extract::State,
    response::{IntoResponse, Response},
};
use ruma::api::{
    OutgoingResponse, OutgoingResponseExt,
    client::device::{delete_device, delete_devices, get_device, get_devices, update_device},
};
use serde_json::Value as JsonValue;

use crate::{
    error::{Error, Result},
    http::{
        AppState, route,
        ruma::{Ruma, RumaResponse},
    },
};

/// A response holding devices. ruma's `Device` writes a device without a name or a
/// known address as `"display_name": null` (and `"last_seen_ip": null`), where the spec
/// leaves such fields out: this writes the ruma response, then drops those nulls.
struct DevicesResponse<T>(T);

fn drop_null_device_fields(device: &mut JsonValue) {
    if let Some(fields) = device.as_object_mut() {
        fields.retain(|key, value| !(value.is_null() && matches!(key.as_str(), "display_name" | "last_seen_ip")));
    }
}

impl<T: OutgoingResponse> IntoResponse for DevicesResponse<T> {
    fn into_response(self) -> Response {
        let written = self.0.try_into_http_response::<Vec<u8>>().map_err(Error::internal).and_then(|response| {
            let (parts, body) = response.into_parts();
            let mut json: JsonValue = serde_json::from_slice(&body).map_err(Error::internal)?;
            match json.get_mut("devices").and_then(JsonValue::as_array_mut) {
                Some(devices) => devices.iter_mut().for_each(drop_null_device_fields),
                None => drop_null_device_fields(&mut json),
            }
            let body = serde_json::to_vec(&json).map_err(Error::internal)?;
            Ok(Response::from_parts(parts, Body::from(body)))
        });
        written.unwrap_or_else(IntoResponse::into_response)
    }
}

/// # `GET /_matrix/client/v3/devices`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3devices>
async fn get_devices(
    State(services): State<AppState>,
    req: Ruma<get_devices::v3::Request>,
) -> Result<DevicesResponse<get_devices::v3::Response>> {
    let devices = services.list_devices(req.session()?.user_id.as_str()).await?;
    Ok(DevicesResponse(get_devices::v3::Response::new(devices)))
}

/// # `GET /_matrix/client/v3/devices/{deviceId}`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3devicesdeviceid>
async fn get_device(
    State(services): State<AppState>,
    req: Ruma<get_device::v3::Request>,
) -> Result<DevicesResponse<get_device::v3::Response>> {
    let device = services.get_device(req.session()?.user_id.as_str(), req.body.device_id.as_str()).await?;
    Ok(DevicesResponse(get_device::v3::Response::new(device)))
}

/// # `PUT /_matrix/client/v3/devices/{deviceId}`
/// <https://spec.matrix.org/v1.19/client-server-api/#put_matrixclientv3devicesdeviceid>
async fn update_device(
    State(services): State<AppState>,
    req: Ruma<update_device::v3::Request>,
) -> Result<RumaResponse<update_device::v3::Response>> {
    let session = req.session()?;
    services
        .rename_device(session.user_id.as_str(), req.body.device_id.as_str(), req.body.display_name.as_deref())
        .await?;
    Ok(update_device::v3::Response::new().into())
}

/// # `DELETE /_matrix/client/v3/devices/{deviceId}`
/// <https://spec.matrix.org/v1.19/client-server-api/#delete_matrixclientv3devicesdeviceid>
async fn delete_device(
    State(services): State<AppState>,
    req: Ruma<delete_device::v3::Request>,
) -> Result<RumaResponse<delete_device::v3::Response>> {
    let session = req.session()?;
    services.get_device(session.user_id.as_str(), req.body.device_id.as_str()).await?;
    services.require_password_uiaa("delete_devices", &session.user_id, req.body.auth.as_ref(), &req.client_ip).await?;
    services.delete_devices(session.user_id.as_str(), &[req.body.device_id.as_str()]).await?;
    Ok(delete_device::v3::Response::new().into())
}

/// # `POST /_matrix/client/v3/delete_devices`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3delete_devices>
async fn delete_devices(
    State(services): State<AppState>,
    req: Ruma<delete_devices::v3::Request>,
) -> Result<RumaResponse<delete_devices::v3::Response>> {
    let session = req.session()?;
    services.require_password_uiaa("delete_devices", &session.user_id, req.body.auth.as_ref(), &req.client_ip).await?;
    let ids: Vec<&str> = req.body.devices.iter().map(|d| d.as_str()).collect();
    services.delete_devices(session.user_id.as_str(), &ids).await?;
    Ok(delete_devices::v3::Response::new().into())
}

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<get_devices::v3::Request, _, _>(router, get_devices);
    let router = route::<get_device::v3::Request, _, _>(router, get_device);
    let router = route::<update_device::v3::Request, _, _>(router, update_device);
    let router = route::<delete_device::v3::Request, _, _>(router, delete_device);
    route::<delete_devices::v3::Request, _, _>(router, delete_devices)
}
