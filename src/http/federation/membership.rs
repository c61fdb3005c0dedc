//! Membership across servers: `make_join`, `send_join` (v2), `invite` (v2),
//! `make_leave`, `send_leave` (v2), `make_knock` and `send_knock`.

use axum::{Router, extract::State};
use ruma::api::federation::membership::{
    create_invite::v2 as invite, create_join_event::v2 as send_join, create_knock_event::v1 as send_knock,
    create_leave_event::v2 as send_leave, prepare_join_event::v1 as make_join, prepare_knock_event::v1 as make_knock,
    prepare_leave_event::v1 as make_leave,
};

use super::super::{AppState, route, ruma::RumaResponse, xmatrix::Federated};
use crate::error::Result;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<make_join::Request, _, _>(router, make_join);
    let router = route::<send_join::Request, _, _>(router, send_join);
    let router = route::<invite::Request, _, _>(router, create_invite);
    let router = route::<make_leave::Request, _, _>(router, make_leave);
    let router = route::<send_leave::Request, _, _>(router, send_leave);
    let router = route::<make_knock::Request, _, _>(router, make_knock);
    route::<send_knock::Request, _, _>(router, send_knock)
}

/// # `GET /_matrix/federation/v1/make_join/{roomId}/{userId}`
/// [spec](https://spec.matrix.org/v1.19/server-server-api/#get_matrixfederationv1make_joinroomiduserid)
pub async fn make_join(
    State(services): State<AppState>,
    request: Federated<make_join::Request>,
) -> Result<RumaResponse<make_join::Response>> {
    let origin = request.origin()?.clone();
    let body = request.body;
    let (version, event) = services.make_join_template(&origin, &body.room_id, &body.user_id, &body.ver).await?;
    let mut response = make_join::Response::new(event);
    response.room_version = Some(version);
    Ok(RumaResponse(response))
}

/// # `PUT /_matrix/federation/v2/send_join/{roomId}/{eventId}`
/// [spec](https://spec.matrix.org/v1.19/server-server-api/#put_matrixfederationv2send_joinroomideventid)
pub async fn send_join(
    State(services): State<AppState>,
    request: Federated<send_join::Request>,
) -> Result<RumaResponse<send_join::Response>> {
    let origin = request.origin()?.clone();
    let body = request.body;
    let state = services.accept_send_join(&origin, &body.room_id, &body.event_id, &body.pdu).await?;
    Ok(RumaResponse(send_join::Response::new(state)))
}

/// # `PUT /_matrix/federation/v2/invite/{roomId}/{eventId}`
/// [spec](https://spec.matrix.org/v1.19/server-server-api/#put_matrixfederationv2inviteroomideventid)
pub async fn create_invite(
    State(services): State<AppState>,
    request: Federated<invite::Request>,
) -> Result<RumaResponse<invite::Response>> {
    let origin = request.origin()?.clone();
    let b = request.body;
    let signed = services
        .accept_remote_invite(&origin, &b.room_id, &b.event_id, &b.room_version, &b.event, &b.invite_room_state)
        .await?;
    Ok(RumaResponse(invite::Response::new(signed)))
}

/// # `GET /_matrix/federation/v1/make_leave/{roomId}/{userId}`
/// [spec](https://spec.matrix.org/v1.19/server-server-api/#get_matrixfederationv1make_leaveroomiduserid)
pub async fn make_leave(
    State(services): State<AppState>,
    request: Federated<make_leave::Request>,
) -> Result<RumaResponse<make_leave::Response>> {
    let origin = request.origin()?.clone();
    let (version, event) = services.make_leave_template(&origin, &request.body.room_id, &request.body.user_id).await?;
    Ok(RumaResponse(make_leave::Response::new(Some(version), event)))
}

/// # `PUT /_matrix/federation/v2/send_leave/{roomId}/{eventId}`
/// [spec](https://spec.matrix.org/v1.19/server-server-api/#put_matrixfederationv2send_leaveroomideventid)
pub async fn send_leave(
    State(services): State<AppState>,
    request: Federated<send_leave::Request>,
) -> Result<RumaResponse<send_leave::Response>> {
    let origin = request.origin()?.clone();
    let b = request.body;
    services.accept_send_leave(&origin, &b.room_id, &b.event_id, &b.pdu).await?;
    Ok(RumaResponse(send_leave::Response::new()))
}

/// # `GET /_matrix/federation/v1/make_knock/{roomId}/{userId}`
/// [spec](https://spec.matrix.org/v1.19/server-server-api/#get_matrixfederationv1make_knockroomiduserid)
pub async fn make_knock(
    State(services): State<AppState>,
    request: Federated<make_knock::Request>,
) -> Result<RumaResponse<make_knock::Response>> {
    let origin = request.origin()?.clone();
    let b = request.body;
    let (version, event) = services.make_knock_template(&origin, &b.room_id, &b.user_id, &b.ver).await?;
    Ok(RumaResponse(make_knock::Response::new(version, event)))
}

/// # `PUT /_matrix/federation/v1/send_knock/{roomId}/{eventId}`
/// [spec](https://spec.matrix.org/v1.19/server-server-api/#put_matrixfederationv1send_knockroomideventid)
pub async fn send_knock(
    State(services): State<AppState>,
    request: Federated<send_knock::Request>,
) -> Result<RumaResponse<send_knock::Response>> {
    let origin = request.origin()?.clone();
    let b = request.body;
    let state = services.accept_send_knock(&origin, &b.room_id, &b.event_id, &b.pdu).await?;
    Ok(RumaResponse(send_knock::Response::new(state)))
}
