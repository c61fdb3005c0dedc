//! Queries other servers make: the server's version, and (below) profiles, room
//! aliases and the public room directory.

use axum::{Router, extract::State};
use ruma::api::federation::discovery::get_server_version::v1 as version;

use super::super::{AppState, route, ruma::RumaResponse, xmatrix::Federated};
use crate::error::Result;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    route::<version::Request, _, _>(router, get_server_version)
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
