//! Queries other servers make: the server's version, a user's profile, a room alias,
//! the public room directory, and who owns an OpenID token.

use axum::{Router, extract::State};
use ruma::{
    UInt,
    api::federation::{
        directory::{get_public_rooms, get_public_rooms_filtered},
        discovery::get_server_version::v1 as version,
        openid::get_openid_userinfo::v1 as userinfo,
        query::{get_profile_information::v1 as profile, get_room_information::v1 as directory},
    },
};

use super::super::{AppState, client::directory::chunk, route, ruma::RumaResponse, xmatrix::Federated};
use crate::error::Result;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<version::Request, _, _>(router, get_server_version);
    let router = route::<profile::Request, _, _>(router, get_profile_information);
    let router = route::<directory::Request, _, _>(router, get_room_information);
    let router = route::<get_public_rooms::v1::Request, _, _>(router, get_public_rooms);
    let router = route::<userinfo::Request, _, _>(router, get_openid_userinfo);
    route::<get_public_rooms_filtered::v1::Request, _, _>(router, get_public_rooms_filtered)
}

/// # `GET /_matrix/federation/v1/openid/userinfo`
/// [spec](https://spec.matrix.org/v1.19/server-server-api/#get_matrixfederationv1openiduserinfo)
///
/// No X-Matrix: the token is the credential.
pub async fn get_openid_userinfo(
    State(services): State<AppState>,
    request: Federated<userinfo::Request>,
) -> Result<RumaResponse<userinfo::Response>> {
    Ok(RumaResponse(userinfo::Response::new(services.openid_userinfo(&request.body.access_token).await?)))
}

/// # `GET /_matrix/federation/v1/version`
/// [spec](https://spec.matrix.org/v1.19/server-server-api/#get_matrixfederationv1version)
pub async fn get_server_version(
    State(_): State<AppState>,
    _: Federated<version::Request>,
) -> Result<RumaResponse<version::Response>> {
    let mut server = version::Server::new();
    server.name = Some("Convo".to_owned());
    server.version = Some(env!("CARGO_PKG_VERSION").to_owned());
    let mut response = version::Response::new();
    response.server = Some(server);
    Ok(RumaResponse(response))
}

/// # `GET /_matrix/federation/v1/query/profile`
/// [spec](https://spec.matrix.org/v1.19/server-server-api/#get_matrixfederationv1queryprofile)
pub async fn get_profile_information(
    State(services): State<AppState>,
    request: Federated<profile::Request>,
) -> Result<RumaResponse<profile::Response>> {
    let profile = services.query_profile(&request.body.user_id, request.body.field.as_ref()).await?;
    Ok(RumaResponse(profile.into()))
}

/// # `GET /_matrix/federation/v1/query/directory`
/// [spec](https://spec.matrix.org/v1.19/server-server-api/#get_matrixfederationv1querydirectory)
pub async fn get_room_information(
    State(services): State<AppState>,
    request: Federated<directory::Request>,
) -> Result<RumaResponse<directory::Response>> {
    let (room_id, servers) = services.query_directory(&request.body.room_alias).await?;
    Ok(RumaResponse(directory::Response::new(room_id, servers)))
}

/// # `GET /_matrix/federation/v1/publicRooms`
/// [spec](https://spec.matrix.org/v1.19/server-server-api/#get_matrixfederationv1publicrooms)
pub async fn get_public_rooms(
    State(services): State<AppState>,
    request: Federated<get_public_rooms::v1::Request>,
) -> Result<RumaResponse<get_public_rooms::v1::Response>> {
    let b = &request.body;
    let (rooms, next, prev, total) =
        services.public_rooms(None, b.since.as_deref(), b.limit.map(|l| u64::from(l) as usize)).await?;
    let mut response = get_public_rooms::v1::Response::new();
    response.chunk = rooms.into_iter().map(chunk).collect();
    response.next_batch = next;
    response.prev_batch = prev;
    response.total_room_count_estimate = UInt::new(total as u64);
    Ok(RumaResponse(response))
}

/// # `POST /_matrix/federation/v1/publicRooms`
/// [spec](https://spec.matrix.org/v1.19/server-server-api/#post_matrixfederationv1publicrooms)
pub async fn get_public_rooms_filtered(
    State(services): State<AppState>,
    request: Federated<get_public_rooms_filtered::v1::Request>,
) -> Result<RumaResponse<get_public_rooms_filtered::v1::Response>> {
    let b = &request.body;
    let (rooms, next, prev, total) = services
        .public_rooms(
            b.filter.generic_search_term.as_deref(),
            b.since.as_deref(),
            b.limit.map(|l| u64::from(l) as usize),
        )
        .await?;
    let mut response = get_public_rooms_filtered::v1::Response::new();
    response.chunk = rooms.into_iter().map(chunk).collect();
    response.next_batch = next;
    response.prev_batch = prev;
    response.total_room_count_estimate = UInt::new(total as u64);
    Ok(RumaResponse(response))
}
