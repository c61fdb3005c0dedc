//! End-to-end encryption keys of this server's users, for other servers:
//! `user/keys/query`, `user/keys/claim` and `user/devices/{userId}`.

use axum::{Router, extract::State};
use ruma::api::federation::{
    device::get_devices::v1 as get_devices,
    keys::{claim_keys::v1 as claim, get_keys::v1 as query},
};

use super::super::{AppState, route, ruma::RumaResponse, xmatrix::Federated};
use crate::error::Result;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<query::Request, _, _>(router, get_keys);
    let router = route::<claim::Request, _, _>(router, claim_keys);
    route::<get_devices::Request, _, _>(router, get_user_devices)
}

/// # `POST /_matrix/federation/v1/user/keys/query`
/// [spec](https://spec.matrix.org/v1.19/server-server-api/#post_matrixfederationv1userkeysquery)
///
/// Only this server's users; never user-signing keys.
pub async fn get_keys(
    State(services): State<AppState>,
    request: Federated<query::Request>,
) -> Result<RumaResponse<query::Response>> {
    let origin = request.origin()?.clone();
    let requested = request.body.device_keys;
    // A requester of another server: `query_keys` gives user-signing keys only to the
    // requester's own user, which is never one of ours here.
    let requester = ruma::UserId::parse(format!("@_federation:{origin}"))
        .map_err(|e| crate::error::Error::internal(format!("origin {origin}: {e}")))?;
    let found = services.query_keys(&requester, &requested).await?;
    let mut response = query::Response::new(found.device_keys);
    response.master_keys = found.master_keys;
    response.self_signing_keys = found.self_signing_keys;
    Ok(RumaResponse(response))
}

/// # `POST /_matrix/federation/v1/user/keys/claim`
/// [spec](https://spec.matrix.org/v1.19/server-server-api/#post_matrixfederationv1userkeysclaim)
pub async fn claim_keys(
    State(services): State<AppState>,
    request: Federated<claim::Request>,
) -> Result<RumaResponse<claim::Response>> {
    request.origin()?;
    let claimed = services.claim_keys(&request.body.one_time_keys).await?;
    Ok(RumaResponse(claim::Response::new(claimed)))
}

/// # `GET /_matrix/federation/v1/user/devices/{userId}`
/// [spec](https://spec.matrix.org/v1.19/server-server-api/#get_matrixfederationv1userdevicesuserid)
pub async fn get_user_devices(
    State(services): State<AppState>,
    request: Federated<get_devices::Request>,
) -> Result<RumaResponse<get_devices::Response>> {
    let origin = request.origin()?.clone();
    Ok(RumaResponse(services.federation_user_devices(&origin, &request.body.user_id).await?))
}
