//! Aliases, the public room directory and the user directory.

use axum::{Router, extract::State};
use ruma::{
    UInt,
    api::client::{
        alias::{create_alias, delete_alias, get_alias},
        directory::{get_public_rooms, get_public_rooms_filtered, get_room_visibility, set_room_visibility},
        room::Visibility,
        user_directory::search_users,
    },
    directory::{PublicRoomsChunk, PublicRoomsChunkInit},
    room::JoinRuleKind,
};

use crate::{
    error::{Error, Result},
    http::{
        AppState, route,
        ruma::{Ruma, RumaResponse},
    },
    service::directory::PublicRoom,
};

/// # `PUT /_matrix/client/v3/directory/room/{roomAlias}`
/// <https://spec.matrix.org/v1.19/client-server-api/#put_matrixclientv3directoryroomroomalias>
async fn create_alias(
    State(services): State<AppState>,
    req: Ruma<create_alias::v3::Request>,
) -> Result<RumaResponse<create_alias::v3::Response>> {
    services.create_alias(&req.session()?.user_id, &req.body.room_alias, &req.body.room_id).await?;
    Ok(create_alias::v3::Response::new().into())
}

/// # `GET /_matrix/client/v3/directory/room/{roomAlias}`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3directoryroomroomalias>
async fn get_alias(
    State(services): State<AppState>,
    req: Ruma<get_alias::v3::Request>,
) -> Result<RumaResponse<get_alias::v3::Response>> {
    let (room_id, servers) = services.lookup_alias(&req.body.room_alias).await?;
    Ok(get_alias::v3::Response::new(room_id, servers).into())
}

/// # `DELETE /_matrix/client/v3/directory/room/{roomAlias}`
/// <https://spec.matrix.org/v1.19/client-server-api/#delete_matrixclientv3directoryroomroomalias>
async fn delete_alias(
    State(services): State<AppState>,
    req: Ruma<delete_alias::v3::Request>,
) -> Result<RumaResponse<delete_alias::v3::Response>> {
    services.delete_alias(&req.session()?.user_id, &req.body.room_alias).await?;
    Ok(delete_alias::v3::Response::new().into())
}

/// # `GET /_matrix/client/v3/directory/list/room/{roomId}`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3directorylistroomroomid>
async fn get_room_visibility(
    State(services): State<AppState>,
    req: Ruma<get_room_visibility::v3::Request>,
) -> Result<RumaResponse<get_room_visibility::v3::Response>> {
    let public = services.room_visibility(&req.body.room_id).await?;
    Ok(get_room_visibility::v3::Response::new(if public { Visibility::Public } else { Visibility::Private }).into())
}

/// # `PUT /_matrix/client/v3/directory/list/room/{roomId}`
/// <https://spec.matrix.org/v1.19/client-server-api/#put_matrixclientv3directorylistroomroomid>
async fn set_room_visibility(
    State(services): State<AppState>,
    req: Ruma<set_room_visibility::v3::Request>,
) -> Result<RumaResponse<set_room_visibility::v3::Response>> {
    let public = match req.body.visibility {
        Visibility::Public => true,
        Visibility::Private => false,
        _ => return Err(Error::invalid_param("visibility is public or private")),
    };
    services.set_room_visibility(&req.session()?.user_id, &req.body.room_id, public).await?;
    Ok(set_room_visibility::v3::Response::new().into())
}

/// One published room as the directory shows it (also to other servers).
pub(crate) fn chunk(room: PublicRoom) -> PublicRoomsChunk {
    let mut c = PublicRoomsChunk::from(PublicRoomsChunkInit {
        num_joined_members: UInt::new(room.joined as u64).unwrap_or_default(),
        room_id: room.room_id,
        world_readable: room.world_readable,
        guest_can_join: room.guest_can_join,
    });
    c.name = room.name;
    c.topic = room.topic;
    c.canonical_alias = room.canonical_alias.and_then(|a| a.try_into().ok());
    c.avatar_url = room.avatar_url.map(Into::into);
    c.join_rule = room.join_rule.as_deref().map(JoinRuleKind::from).unwrap_or(JoinRuleKind::Public);
    c
}

/// The other server a `publicRooms` request names, if it names one.
fn remote_server<'a>(services: &AppState, server: Option<&'a ruma::ServerName>) -> Option<&'a ruma::ServerName> {
    server.filter(|s| *s != services.server_name())
}

/// # `GET /_matrix/client/v3/publicRooms`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3publicrooms>
async fn get_public_rooms(
    State(services): State<AppState>,
    req: Ruma<get_public_rooms::v3::Request>,
) -> Result<RumaResponse<get_public_rooms::v3::Response>> {
    let b = &req.body;
    if let Some(server) = remote_server(&services, b.server.as_deref()) {
        let remote = services.remote_public_rooms(server, b.limit, b.since.clone(), None).await?;
        let mut response = get_public_rooms::v3::Response::new(remote.chunk);
        response.next_batch = remote.next_batch;
        response.prev_batch = remote.prev_batch;
        response.total_room_count_estimate = remote.total_room_count_estimate;
        return Ok(response.into());
    }
    let (rooms, next, prev, total) =
        services.public_rooms(None, b.since.as_deref(), b.limit.map(|l| u64::from(l) as usize)).await?;
    let mut response = get_public_rooms::v3::Response::new(rooms.into_iter().map(chunk).collect());
    response.next_batch = next;
    response.prev_batch = prev;
    response.total_room_count_estimate = UInt::new(total as u64);
    Ok(response.into())
}

/// # `POST /_matrix/client/v3/publicRooms`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3publicrooms>
async fn get_public_rooms_filtered(
    State(services): State<AppState>,
    req: Ruma<get_public_rooms_filtered::v3::Request>,
) -> Result<RumaResponse<get_public_rooms_filtered::v3::Response>> {
    req.session()?;
    let b = &req.body;
    if let Some(server) = remote_server(&services, b.server.as_deref()) {
        let remote = services.remote_public_rooms(server, b.limit, b.since.clone(), Some(b.filter.clone())).await?;
        let mut response = get_public_rooms_filtered::v3::Response::new();
        response.chunk = remote.chunk;
        response.next_batch = remote.next_batch;
        response.prev_batch = remote.prev_batch;
        response.total_room_count_estimate = remote.total_room_count_estimate;
        return Ok(response.into());
    }
    let (rooms, next, prev, total) = services
        .public_rooms(
            b.filter.generic_search_term.as_deref(),
            b.since.as_deref(),
            b.limit.map(|l| u64::from(l) as usize),
        )
        .await?;
    let mut response = get_public_rooms_filtered::v3::Response::new();
    response.chunk = rooms.into_iter().map(chunk).collect();
    response.next_batch = next;
    response.prev_batch = prev;
    response.total_room_count_estimate = UInt::new(total as u64);
    Ok(response.into())
}

/// # `POST /_matrix/client/v3/user_directory/search`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3user_directorysearch>
async fn search_users(
    State(services): State<AppState>,
    req: Ruma<search_users::v3::Request>,
) -> Result<RumaResponse<search_users::v3::Response>> {
    let session = req.session()?;
    let (results, limited) =
        services.search_users(&session.user_id, &req.body.search_term, u64::from(req.body.limit) as usize).await?;
    let users = results
        .into_iter()
        .filter_map(|r| {
            let mut user = search_users::v3::User::new(r["user_id"].as_str()?.try_into().ok()?);
            user.display_name = r["display_name"].as_str().map(str::to_owned);
            user.avatar_url = r["avatar_url"].as_str().map(Into::into);
            Some(user)
        })
        .collect();
    Ok(search_users::v3::Response::new(users, limited).into())
}

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<create_alias::v3::Request, _, _>(router, create_alias);
    let router = route::<get_alias::v3::Request, _, _>(router, get_alias);
    let router = route::<delete_alias::v3::Request, _, _>(router, delete_alias);
    let router = route::<get_room_visibility::v3::Request, _, _>(router, get_room_visibility);
    let router = route::<set_room_visibility::v3::Request, _, _>(router, set_room_visibility);
    let router = route::<get_public_rooms::v3::Request, _, _>(router, get_public_rooms);
    let router = route::<get_public_rooms_filtered::v3::Request, _, _>(router, get_public_rooms_filtered);
    route::<search_users::v3::Request, _, _>(router, search_users)
}
