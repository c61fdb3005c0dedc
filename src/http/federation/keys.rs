//! Server keys: this server's published key, and the notary endpoints that hand out
//! other servers' keys with our signature added.

use axum::extract::State;
use ruma::api::federation::discovery::{
    get_remote_server_keys::v2 as remote_one, get_remote_server_keys_batch::v2 as remote_batch,
    get_server_keys::v2 as server_keys,
};

use super::super::{AppState, ruma::RumaResponse, xmatrix::Federated};
use crate::error::Result;

/// # `GET /_matrix/key/v2/server`
/// [spec](https://spec.matrix.org/v1.19/server-server-api/#get_matrixkeyv2server)
pub async fn get_server_keys(
    State(services): State<AppState>,
    _: Federated<server_keys::Request>,
) -> Result<RumaResponse<server_keys::Response>> {
    Ok(RumaResponse(server_keys::Response::new(services.own_server_keys()?)))
}

/// # `POST /_matrix/key/v2/query`
/// [spec](https://spec.matrix.org/v1.19/server-server-api/#post_matrixkeyv2query)
pub async fn get_remote_server_keys_batch(
    State(services): State<AppState>,
    request: Federated<remote_batch::Request>,
) -> Result<RumaResponse<remote_batch::Response>> {
    let keys = services.notary_server_keys(request.body.server_keys).await?;
    Ok(RumaResponse(remote_batch::Response::new(keys)))
}

/// # `GET /_matrix/key/v2/query/{serverName}`
/// [spec](https://spec.matrix.org/v1.19/server-server-api/#get_matrixkeyv2queryservername)
pub async fn get_remote_server_keys(
    State(services): State<AppState>,
    request: Federated<remote_one::Request>,
) -> Result<RumaResponse<remote_one::Response>> {
    let mut criteria = remote_batch::QueryCriteria::new();
    criteria.minimum_valid_until_ts = Some(request.body.minimum_valid_until_ts);
    // No key id: all of the server's keys. The criteria ride on a placeholder id.
    let key_id = ruma::OwnedServerSigningKeyId::try_from("ed25519:any").expect("a valid key id");
    let query = [(request.body.server_name, [(key_id, criteria)].into())].into();
    let keys = services.notary_server_keys(query).await?;
    Ok(RumaResponse(remote_one::Response::new(keys)))
}
