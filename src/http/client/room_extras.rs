//! Room upgrades, reports of events and rooms, mutual rooms (MSC2666) and room
//! summaries (MSC3266).

use axum::{Router, extract::State};
use ruma::api::client::{
    membership::get_mutual_rooms,
    room::{get_summary, report_content, report_room, upgrade_room},
};

use crate::{
    error::Result,
    http::{
        AppState, route,
        ruma::{Ruma, RumaResponse},
    },
};

/// # `POST /_matrix/client/v3/rooms/{roomId}/upgrade`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3roomsroomidupgrade>
async fn upgrade_room(
    State(services): State<AppState>,
    req: Ruma<upgrade_room::v3::Request>,
) -> Result<RumaResponse<upgrade_room::v3::Response>> {
    let session = req.session()?;
    let b = &req.body;
    let new_room = services.upgrade_room(&session.user_id, &b.room_id, &b.new_version, &b.additional_creators).await?;
    Ok(upgrade_room::v3::Response::new(new_room).into())
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/report/{eventId}`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3roomsroomidreporteventid>
async fn report_content(
    State(services): State<AppState>,
    req: Ruma<report_content::v3::Request>,
) -> Result<RumaResponse<report_content::v3::Response>> {
    let session = req.session()?;
    let b = &req.body;
    services.report_event(&session.user_id, &b.room_id, &b.event_id, b.reason.as_deref()).await?;
    Ok(report_content::v3::Response::new().into())
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/report`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3roomsroomidreport>
async fn report_room(
    State(services): State<AppState>,
    req: Ruma<report_room::v3::Request>,
) -> Result<RumaResponse<report_room::v3::Response>> {
    let session = req.session()?;
    services.report_room(&session.user_id, &req.body.room_id, &req.body.reason).await?;
    Ok(report_room::v3::Response::new().into())
}

/// # `GET /_matrix/client/unstable/uk.half-shot.msc2666/user/mutual_rooms`
/// <https://github.com/matrix-org/matrix-spec-proposals/pull/2666>
async fn get_mutual_rooms_unstable(
    State(services): State<AppState>,
    req: Ruma<get_mutual_rooms::unstable::Request>,
) -> Result<RumaResponse<get_mutual_rooms::unstable::Response>> {
    let session = req.session()?;
    let (_, rooms, next) = services.mutual_rooms(&session.user_id, &req.body.user_id, req.body.from.as_deref()).await?;
    let mut response = get_mutual_rooms::unstable::Response::new(rooms);
    response.next_batch = next;
    Ok(response.into())
}

/// # `GET /_matrix/client/v1/mutual_rooms`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv1mutual_rooms>
async fn get_mutual_rooms_v1(
    State(services): State<AppState>,
    req: Ruma<get_mutual_rooms::v1::Request>,
) -> Result<RumaResponse<get_mutual_rooms::v1::Response>> {
    let session = req.session()?;
    let (count, rooms, next) =
        services.mutual_rooms(&session.user_id, &req.body.user_id, req.body.from.as_deref()).await?;
    let mut response = get_mutual_rooms::v1::Response::new(ruma::UInt::try_from(count).unwrap_or_default(), rooms);
    response.next_batch = next;
    Ok(response.into())
}

/// # `GET /_matrix/client/v1/room_summary/{roomIdOrAlias}`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv1room_summaryroomidoralias>
async fn get_summary(
    State(services): State<AppState>,
    req: Ruma<get_summary::v1::Request>,
) -> Result<RumaResponse<get_summary::v1::Response>> {
    let user = req.session.as_ref().map(|s| &*s.user_id);
    let (summary, membership) = services.room_summary_for(user, &req.body.room_id_or_alias).await?;
    let mut response = get_summary::v1::Response::new(summary);
    response.membership = membership;
    Ok(response.into())
}

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<get_summary::v1::Request, _, _>(router, get_summary);
    let router = route::<upgrade_room::v3::Request, _, _>(router, upgrade_room);
    let router = route::<report_content::v3::Request, _, _>(router, report_content);
    let router = route::<report_room::v3::Request, _, _>(router, report_room);
    let router = route::<get_mutual_rooms::unstable::Request, _, _>(router, get_mutual_rooms_unstable);
    route::<get_mutual_rooms::v1::Request, _, _>(router, get_mutual_rooms_v1)
}
