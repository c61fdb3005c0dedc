//! End-to-end encryption: keys (upload, query, claim) and send-to-device messages.

use axum::{
    Json, Router,
    extract::State,
    response::{IntoResponse, Response},
};
use ruma::api::client::{
    keys::{claim_keys, get_key_changes, get_keys, upload_keys, upload_signatures, upload_signing_keys},
    to_device::send_event_to_device,
};
use serde_json::json;

use crate::service::federation::e2e::MAX_REMOTE_KEY_WAIT;
use crate::{
    error::Result,
    http::{
        AppState, route,
        ruma::{Ruma, RumaResponse},
    },
    service::rooms::messages::parse_position,
};

/// # `POST /_matrix/client/v3/keys/upload`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3keysupload>
async fn upload_keys(
    State(services): State<AppState>,
    req: Ruma<upload_keys::v3::Request>,
) -> Result<RumaResponse<upload_keys::v3::Response>> {
    let session = req.session()?;
    let b = &req.body;
    let counts = services.upload_keys(session, b.device_keys.as_ref(), &b.one_time_keys, &b.fallback_keys).await?;
    Ok(upload_keys::v3::Response::new(counts).into())
}

/// # `POST /_matrix/client/v3/keys/query`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3keysquery>
///
/// With the users' cross-signing keys (user-signing keys only for the requester).
async fn get_keys(
    State(services): State<AppState>,
    req: Ruma<get_keys::v3::Request>,
) -> Result<RumaResponse<get_keys::v3::Response>> {
    let session = req.session()?;
    let wait = req.body.timeout.unwrap_or(MAX_REMOTE_KEY_WAIT);
    let (found, failures) = services.query_keys_everywhere(&session.user_id, &req.body.device_keys, wait).await?;
    let mut response = get_keys::v3::Response::new();
    response.failures = failures;
    response.device_keys = found.device_keys;
    response.master_keys = found.master_keys;
    response.self_signing_keys = found.self_signing_keys;
    response.user_signing_keys = found.user_signing_keys;
    Ok(response.into())
}

/// # `POST /_matrix/client/v3/keys/claim`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3keysclaim>
async fn claim_keys(
    State(services): State<AppState>,
    req: Ruma<claim_keys::v3::Request>,
) -> Result<RumaResponse<claim_keys::v3::Response>> {
    req.session()?;
    let mut claimed = services.claim_keys(&req.body.one_time_keys).await?;
    let wait = req.body.timeout.unwrap_or(MAX_REMOTE_KEY_WAIT);
    let (remote, failures) = services.claim_remote_keys(&req.body.one_time_keys, wait).await;
    claimed.extend(remote);
    let mut response = claim_keys::v3::Response::new(claimed);
    response.failures = failures;
    Ok(response.into())
}

/// # `PUT /_matrix/client/v3/sendToDevice/{eventType}/{txnId}`
/// <https://spec.matrix.org/v1.19/client-server-api/#put_matrixclientv3sendtodeviceeventtypetxnid>
async fn send_to_device(
    State(services): State<AppState>,
    req: Ruma<send_event_to_device::v3::Request>,
) -> Result<RumaResponse<send_event_to_device::v3::Response>> {
    let session = req.session()?;
    let b = &req.body;
    services.send_to_device(session, &b.event_type.to_string(), b.txn_id.as_str(), &b.messages).await?;
    Ok(send_event_to_device::v3::Response::new().into())
}

/// # `GET /_matrix/client/v3/keys/changes`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3keyschanges>
async fn get_key_changes(
    State(services): State<AppState>,
    req: Ruma<get_key_changes::v3::Request>,
) -> Result<RumaResponse<get_key_changes::v3::Response>> {
    let session = req.session()?;
    let from = parse_position(&req.body.from)?;
    let to = parse_position(&req.body.to)?;
    let (changed, left) = services.device_list_changes(&session.user_id, from, to, true).await?;
    Ok(get_key_changes::v3::Response::new(changed, left).into())
}

/// # `POST /_matrix/client/v3/keys/device_signing/upload`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3keysdevice_signingupload>
async fn upload_signing_keys(
    State(services): State<AppState>,
    req: Ruma<upload_signing_keys::v3::Request>,
) -> Result<RumaResponse<upload_signing_keys::v3::Response>> {
    let session = req.session()?;
    let b = &req.body;
    let keys = [b.master_key.as_ref(), b.self_signing_key.as_ref(), b.user_signing_key.as_ref()];
    services.upload_signing_keys(session, b.auth.as_ref(), keys, &req.client_ip).await?;
    Ok(upload_signing_keys::v3::Response::new().into())
}

/// # `POST /_matrix/client/v3/keys/signatures/upload`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3keyssignaturesupload>
async fn upload_signatures(
    State(services): State<AppState>,
    req: Ruma<upload_signatures::v3::Request>,
) -> Result<Response> {
    let session = req.session()?;
    let signed = req
        .body
        .signed_keys
        .iter()
        .map(|(user, keys)| {
            let objects = keys.iter().map(|(id, json)| (id.to_owned(), json.to_owned())).collect();
            (user.clone(), objects)
        })
        .collect();
    let failures = services.upload_signatures(session, &signed).await?;
    Ok(Json(json!({"failures": failures})).into_response())
}

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<upload_signing_keys::v3::Request, _, _>(router, upload_signing_keys);
    let router = route::<upload_signatures::v3::Request, _, _>(router, upload_signatures);
    let router = route::<get_key_changes::v3::Request, _, _>(router, get_key_changes);
    let router = route::<send_event_to_device::v3::Request, _, _>(router, send_to_device);
    let router = route::<upload_keys::v3::Request, _, _>(router, upload_keys);
    let router = route::<get_keys::v3::Request, _, _>(router, get_keys);
    route::<claim_keys::v3::Request, _, _>(router, claim_keys)
}
