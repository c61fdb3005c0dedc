//! Dehydrated devices (MSC3814, unstable `org.matrix.msc3814.v1` paths, as Element
//! uses them): put, get, delete, and the to-device messages queued for one.

use axum::{Router, extract::State};
use ruma::api::client::dehydrated_device::{
    delete_dehydrated_device, get_dehydrated_device, get_events, put_dehydrated_device,
};

use crate::{
    error::Result,
    http::{
        AppState, route,
        ruma::{Ruma, RumaResponse},
    },
    service::NewDehydratedDevice,
};

/// # `PUT /_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device`
/// <https://github.com/matrix-org/matrix-spec-proposals/pull/3814>
async fn put_dehydrated_device(
    State(services): State<AppState>,
    req: Ruma<put_dehydrated_device::unstable::Request>,
) -> Result<RumaResponse<put_dehydrated_device::unstable::Response>> {
    let session = req.session()?;
    let b = &req.body;
    let new = NewDehydratedDevice {
        device_id: &b.device_id,
        display_name: b.initial_device_display_name.as_deref(),
        device_data: &b.device_data,
        device_keys: &b.device_keys,
        one_time_keys: &b.one_time_keys,
        fallback_keys: &b.fallback_keys,
    };
    services.put_dehydrated_device(&session.user_id, new).await?;
    Ok(put_dehydrated_device::unstable::Response::new(b.device_id.clone()).into())
}

/// # `GET /_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device`
/// <https://github.com/matrix-org/matrix-spec-proposals/pull/3814>
async fn get_dehydrated_device(
    State(services): State<AppState>,
    req: Ruma<get_dehydrated_device::unstable::Request>,
) -> Result<RumaResponse<get_dehydrated_device::unstable::Response>> {
    let session = req.session()?;
    let (device_id, data) = services.get_dehydrated_device(&session.user_id).await?;
    Ok(get_dehydrated_device::unstable::Response::new(device_id, data).into())
}

/// # `DELETE /_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device`
/// <https://github.com/matrix-org/matrix-spec-proposals/pull/3814>
async fn delete_dehydrated_device(
    State(services): State<AppState>,
    req: Ruma<delete_dehydrated_device::unstable::Request>,
) -> Result<RumaResponse<delete_dehydrated_device::unstable::Response>> {
    let session = req.session()?;
    let device_id = services.delete_dehydrated_device(&session.user_id).await?;
    Ok(delete_dehydrated_device::unstable::Response::new(device_id).into())
}

/// # `POST /_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device/{deviceId}/events`
/// <https://github.com/matrix-org/matrix-spec-proposals/pull/3814>
async fn get_events(
    State(services): State<AppState>,
    req: Ruma<get_events::unstable::Request>,
) -> Result<RumaResponse<get_events::unstable::Response>> {
    let session = req.session()?;
    let b = &req.body;
    let (events, next_batch) =
        services.dehydrated_device_events(&session.user_id, b.device_id.as_str(), b.next_batch.as_deref()).await?;
    let mut response = get_events::unstable::Response::new(events);
    response.next_batch = Some(next_batch);
    Ok(response.into())
}

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<put_dehydrated_device::unstable::Request, _, _>(router, put_dehydrated_device);
    let router = route::<get_dehydrated_device::unstable::Request, _, _>(router, get_dehydrated_device);
    let router = route::<delete_dehydrated_device::unstable::Request, _, _>(router, delete_dehydrated_device);
    route::<get_events::unstable::Request, _, _>(router, get_events)
}
