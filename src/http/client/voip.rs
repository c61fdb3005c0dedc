//! Voice and video calls: the TURN server.

use axum::{
    Json, Router,
    extract::State,
    response::{IntoResponse, Response},
};
use ruma::api::client::voip::get_turn_server_info;

use crate::{
    error::Result,
    http::{
        AppState, route,
        ruma::{Ruma, RumaResponse},
    },
};

/// # `GET /_matrix/client/v3/voip/turnServer`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3voipturnserver>
///
/// Without a TURN server in the config the answer is `{}`, as other servers give and
/// clients expect (an empty `uris` list makes some WebRTC stacks fail).
async fn get_turn_server(
    State(services): State<AppState>,
    req: Ruma<get_turn_server_info::v3::Request>,
) -> Result<Response> {
    let session = req.session()?;
    Ok(match services.turn_credentials(&session.user_id) {
        Some(c) => {
            RumaResponse(get_turn_server_info::v3::Response::new(c.username, c.password, c.uris, c.ttl)).into_response()
        }
        None => Json(serde_json::json!({})).into_response(),
    })
}

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    route::<get_turn_server_info::v3::Request, _, _>(router, get_turn_server)
}
