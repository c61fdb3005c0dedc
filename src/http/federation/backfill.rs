//! `GET /_matrix/federation/v1/backfill/{roomId}`: older history for another server.

use axum::{Router, extract::State};
use ruma::api::federation::backfill::get_backfill::v1 as get_backfill;

use super::super::{AppState, route, ruma::RumaResponse, xmatrix::Federated};
use crate::error::Result;

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    route::<get_backfill::Request, _, _>(router, get_backfill)
}

/// # `GET /_matrix/federation/v1/backfill/{roomId}`
/// [spec](https://spec.matrix.org/v1.19/server-server-api/#get_matrixfederationv1backfillroomid)
pub async fn get_backfill(
    State(services): State<AppState>,
    request: Federated<get_backfill::Request>,
) -> Result<RumaResponse<get_backfill::Response>> {
    let origin = request.origin()?.clone();
    let b = request.body;
    let limit = usize::try_from(u64::from(b.limit)).unwrap_or(usize::MAX);
    Ok(RumaResponse(services.serve_backfill(&origin, &b.room_id, &b.v, limit).await?))
}
