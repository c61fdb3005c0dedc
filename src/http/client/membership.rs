//! Membership endpoints: join, knock, invite, leave, forget, kick, ban, unban, and
//! the member lists.

use std::collections::BTreeMap;

use axum::{Router, extract::State};
use ruma::{
    OwnedRoomId, RoomOrAliasId,
    api::client::{
        knock::knock_room,
        membership::{
            ban_user, forget_room, get_member_events, invite_user, join_room_by_id, join_room_by_id_or_alias,
            joined_members, joined_rooms, kick_user, leave_room, unban_user,
        },
    },
};
use serde_json::Value as JsonValue;

use crate::{
    error::{Error, Result},
    http::{
        AppState, route,
        ruma::{Ruma, RumaResponse},
    },
    service::rooms::format::Viewer,
};

/// # `POST /_matrix/client/v3/rooms/{roomId}/join`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3roomsroomidjoin>
async fn join_room_by_id(
    State(services): State<AppState>,
    req: Ruma<join_room_by_id::v3::Request>,
) -> Result<RumaResponse<join_room_by_id::v3::Response>> {
    let user = &req.session()?.user_id;
    services.join_room_via(&req.body.room_id, user, req.body.reason.clone(), &[]).await?;
    Ok(join_room_by_id::v3::Response::new(req.body.room_id.clone()).into())
}

/// # `POST /_matrix/client/v3/join/{roomIdOrAlias}`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3joinroomidoralias>
async fn join_room_by_id_or_alias(
    State(services): State<AppState>,
    req: Ruma<join_room_by_id_or_alias::v3::Request>,
) -> Result<RumaResponse<join_room_by_id_or_alias::v3::Response>> {
    let target: &RoomOrAliasId = &req.body.room_id_or_alias;
    let mut via = req.body.via.clone();
    let room_id: OwnedRoomId = match <&ruma::RoomId>::try_from(target) {
        Ok(room_id) => room_id.to_owned(),
        Err(alias) => {
            let (room_id, servers) = services.lookup_alias(alias).await?;
            via.extend(servers);
            room_id
        }
    };
    services.join_room_via(&room_id, &req.session()?.user_id, req.body.reason.clone(), &via).await?;
    Ok(join_room_by_id_or_alias::v3::Response::new(room_id).into())
}

/// # `POST /_matrix/client/v3/knock/{roomIdOrAlias}`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3knockroomidoralias>
async fn knock_room(
    State(services): State<AppState>,
    req: Ruma<knock_room::v3::Request>,
) -> Result<RumaResponse<knock_room::v3::Response>> {
    let target: &RoomOrAliasId = &req.body.room_id_or_alias;
    // `via`, or the deprecated `server_name` (ruma reads either into `via`).
    let mut via = req.body.via.clone();
    let room_id: OwnedRoomId = match <&ruma::RoomId>::try_from(target) {
        Ok(room_id) => room_id.to_owned(),
        Err(alias) => {
            let (room_id, servers) = services.lookup_alias(alias).await?;
            via.extend(servers);
            room_id
        }
    };
    services.knock_room_via(&room_id, &req.session()?.user_id, req.body.reason.clone(), &via).await?;
    Ok(knock_room::v3::Response::new(room_id).into())
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/invite`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3roomsroomidinvite>
async fn invite_user(
    State(services): State<AppState>,
    req: Ruma<invite_user::v3::Request>,
) -> Result<RumaResponse<invite_user::v3::Response>> {
    let session = req.session()?;
    let invite_user::v3::InvitationRecipient::UserId(recipient) = &req.body.recipient else {
        return Err(Error::matrix(
            axum::http::StatusCode::BAD_REQUEST,
            ruma::api::error::ErrorKind::ThreepidMediumNotSupported,
            "Third-party invites are not supported",
        ));
    };
    services.invite(&req.body.room_id, &session.user_id, &recipient.user_id, recipient.reason.clone(), false).await?;
    Ok(invite_user::v3::Response::new().into())
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/leave`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3roomsroomidleave>
async fn leave_room(
    State(services): State<AppState>,
    req: Ruma<leave_room::v3::Request>,
) -> Result<RumaResponse<leave_room::v3::Response>> {
    services.leave_room(&req.body.room_id, &req.session()?.user_id, req.body.reason.clone()).await?;
    Ok(leave_room::v3::Response::new().into())
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/forget`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3roomsroomidforget>
async fn forget_room(
    State(services): State<AppState>,
    req: Ruma<forget_room::v3::Request>,
) -> Result<RumaResponse<forget_room::v3::Response>> {
    services.forget_room(&req.body.room_id, &req.session()?.user_id).await?;
    Ok(forget_room::v3::Response::new().into())
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/kick`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3roomsroomidkick>
async fn kick_user(
    State(services): State<AppState>,
    req: Ruma<kick_user::v3::Request>,
) -> Result<RumaResponse<kick_user::v3::Response>> {
    let b = &req.body;
    services.kick(&b.room_id, &req.session()?.user_id, &b.user_id, b.reason.clone()).await?;
    Ok(kick_user::v3::Response::new().into())
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/ban`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3roomsroomidban>
async fn ban_user(
    State(services): State<AppState>,
    req: Ruma<ban_user::v3::Request>,
) -> Result<RumaResponse<ban_user::v3::Response>> {
    let b = &req.body;
    services.ban(&b.room_id, &req.session()?.user_id, &b.user_id, b.reason.clone()).await?;
    Ok(ban_user::v3::Response::new().into())
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/unban`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3roomsroomidunban>
async fn unban_user(
    State(services): State<AppState>,
    req: Ruma<unban_user::v3::Request>,
) -> Result<RumaResponse<unban_user::v3::Response>> {
    let b = &req.body;
    services.unban(&b.room_id, &req.session()?.user_id, &b.user_id, b.reason.clone()).await?;
    Ok(unban_user::v3::Response::new().into())
}

/// # `GET /_matrix/client/v3/joined_rooms`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3joined_rooms>
async fn joined_rooms(
    State(services): State<AppState>,
    req: Ruma<joined_rooms::v3::Request>,
) -> Result<RumaResponse<joined_rooms::v3::Response>> {
    Ok(joined_rooms::v3::Response::new(services.joined_rooms(&req.session()?.user_id).await?).into())
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/members`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3roomsroomidmembers>
async fn get_member_events(
    State(services): State<AppState>,
    req: Ruma<get_member_events::v3::Request>,
) -> Result<RumaResponse<get_member_events::v3::Response>> {
    let session = req.session()?;
    let b = &req.body;
    for filter in [&b.membership, &b.not_membership].into_iter().flatten() {
        if !matches!(filter.as_str(), "join" | "invite" | "knock" | "leave" | "ban") {
            return Err(Error::invalid_param(format!("Unknown membership {:?}", filter.as_str())));
        }
    }
    let events = services.room_members(&b.room_id, &session.user_id, b.at.as_deref()).await?;
    let viewer = Some(Viewer { user_id: &session.user_id, device_id: Some(&session.device_id) });
    let mut chunk = Vec::new();
    for (stored, event) in events.iter().zip(services.client_events(&events, viewer, true).await?) {
        let membership = crate::service::rooms::messages::membership_of(&stored.json);
        if b.membership.as_ref().is_some_and(|m| m.as_str() != membership) {
            continue;
        }
        if b.not_membership.as_ref().is_some_and(|m| m.as_str() == membership) {
            continue;
        }
        chunk.push(event);
    }
    Ok(get_member_events::v3::Response::new(chunk).into())
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/joined_members`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3roomsroomidjoined_members>
async fn joined_members(
    State(services): State<AppState>,
    req: Ruma<joined_members::v3::Request>,
) -> Result<RumaResponse<joined_members::v3::Response>> {
    let session = req.session()?;
    services.require_joined(&req.body.room_id, &session.user_id).await?;
    let events = services.room_members(&req.body.room_id, &session.user_id, None).await?;
    let mut joined = BTreeMap::new();
    for event in events {
        let json: JsonValue = serde_json::from_str(&event.json).map_err(Error::internal)?;
        if json["content"]["membership"] != "join" {
            continue;
        }
        let Ok(user_id) = ruma::OwnedUserId::try_from(event.state_key.clone().unwrap_or_default()) else { continue };
        let mut member = joined_members::v3::RoomMember::new();
        member.display_name = json["content"]["displayname"].as_str().map(str::to_owned);
        member.avatar_url = json["content"]["avatar_url"].as_str().map(Into::into);
        joined.insert(user_id, member);
    }
    Ok(joined_members::v3::Response::new(joined).into())
}

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<join_room_by_id::v3::Request, _, _>(router, join_room_by_id);
    let router = route::<join_room_by_id_or_alias::v3::Request, _, _>(router, join_room_by_id_or_alias);
    let router = route::<knock_room::v3::Request, _, _>(router, knock_room);
    let router = route::<invite_user::v3::Request, _, _>(router, invite_user);
    let router = route::<leave_room::v3::Request, _, _>(router, leave_room);
    let router = route::<forget_room::v3::Request, _, _>(router, forget_room);
    let router = route::<kick_user::v3::Request, _, _>(router, kick_user);
    let router = route::<ban_user::v3::Request, _, _>(router, ban_user);
    let router = route::<unban_user::v3::Request, _, _>(router, unban_user);
    let router = route::<joined_rooms::v3::Request, _, _>(router, joined_rooms);
    let router = route::<get_member_events::v3::Request, _, _>(router, get_member_events);
    route::<joined_members::v3::Request, _, _>(router, joined_members)
}
