//! `PUT /_matrix/federation/v1/send/{txnId}`: transactions of PDUs and EDUs from
//! other servers.

use axum::{Router, extract::State};
use ruma::api::federation::transactions::send_transaction_message::v1 as send;

use super::super::{AppState, route, ruma::RumaResponse, xmatrix::Federated};
use crate::error::{Error, Result};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    route::<send::Request, _, _>(router, send_transaction_message)
}

/// # `PUT /_matrix/federation/v1/send/{txnId}`
/// [spec](https://spec.matrix.org/v1.19/server-server-api/#put_matrixfederationv1sendtxnid)
pub async fn send_transaction_message(
    State(services): State<AppState>,
    request: Federated<send::Request>,
) -> Result<RumaResponse<send::Response>> {
    let origin = request.origin()?.clone();
    let body = request.body;
    if body.origin != origin {
        return Err(Error::forbidden("The transaction's origin is not the server that signed the request"));
    }
    let results = services.receive_transaction(&origin, &body.transaction_id, &body.pdus, &body.edus).await?;
    Ok(RumaResponse(send::Response::new(results)))
}
