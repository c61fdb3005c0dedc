//! Events and state of a room for another server in it: `event`, `state`,
//! `state_ids`, `event_auth`, `get_missing_events` and `timestamp_to_event`.

use axum::{Router, extract::State};
use ruma::{
    MilliSecondsSinceUnixEpoch, OwnedEventId,
    api::federation::{
        authorization::get_event_authorization::v1 as event_auth,
        event::{
            get_event::v1 as get_event, get_event_by_timestamp::v1 as by_timestamp, get_missing_events::v1 as missing,
            get_room_state::v1 as state, get_room_state_ids::v1 as state_ids,
        },
    },
};
use serde_json::value::RawValue;

use super::super::{AppState, route, ruma::RumaResponse, xmatrix::Federated};
use crate::error::{Error, Result};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<get_event::Request, _, _>(router, get_event);
    let router = route::<state::Request, _, _>(router, get_room_state);
    let router = route::<state_ids::Request, _, _>(router, get_room_state_ids);
    let router = route::<event_auth::Request, _, _>(router, get_event_authorization);
    let router = route::<by_timestamp::Request, _, _>(router, get_event_by_timestamp);
    route::<missing::Request, _, _>(router, get_missing_events)
}

/// # `GET /_matrix/federation/v1/timestamp_to_event/{roomId}`
/// [spec](https://spec.matrix.org/v1.19/server-server-api/#get_matrixfederationv1timestamp_to_eventroomid)
pub async fn get_event_by_timestamp(
    State(services): State<AppState>,
    request: Federated<by_timestamp::Request>,
) -> Result<RumaResponse<by_timestamp::Response>> {
    let origin = request.origin()?.clone();
    let b = request.body;
    let ts = i64::try_from(u64::from(b.ts.0)).map_err(|_| Error::invalid_param("ts is too large"))?;
    let forwards = b.dir == ruma::api::Direction::Forward;
    let (event_id, at) = services.serve_timestamp_to_event(&origin, &b.room_id, ts, forwards).await?;
    Ok(RumaResponse(by_timestamp::Response::new(event_id, at)))
}

/// # `GET /_matrix/federation/v1/event/{eventId}`
/// [spec](https://spec.matrix.org/v1.19/server-server-api/#get_matrixfederationv1eventeventid)
pub async fn get_event(
    State(services): State<AppState>,
    request: Federated<get_event::Request>,
) -> Result<RumaResponse<get_event::Response>> {
    let origin = request.origin()?.clone();
    let pdu = services.serve_event(&origin, &request.body.event_id).await?;
    Ok(RumaResponse(get_event::Response::new(services.server_name().clone(), MilliSecondsSinceUnixEpoch::now(), pdu)))
}

fn raws(events: &[crate::storage::StoredEvent]) -> Result<Vec<Box<RawValue>>> {
    events.iter().map(|e| RawValue::from_string(e.json.clone()).map_err(Error::internal)).collect()
}

fn ids(events: &[crate::storage::StoredEvent]) -> Vec<OwnedEventId> {
    events.iter().filter_map(|e| OwnedEventId::try_from(e.event_id.as_str()).ok()).collect()
}

/// # `GET /_matrix/federation/v1/state/{roomId}`
/// [spec](https://spec.matrix.org/v1.19/server-server-api/#get_matrixfederationv1stateroomid)
pub async fn get_room_state(
    State(services): State<AppState>,
    request: Federated<state::Request>,
) -> Result<RumaResponse<state::Response>> {
    let origin = request.origin()?.clone();
    let (state, chain) = services.serve_state(&origin, &request.body.room_id, &request.body.event_id).await?;
    Ok(RumaResponse(state::Response::new(raws(&chain)?, raws(&state)?)))
}

/// # `GET /_matrix/federation/v1/state_ids/{roomId}`
/// [spec](https://spec.matrix.org/v1.19/server-server-api/#get_matrixfederationv1state_idsroomid)
pub async fn get_room_state_ids(
    State(services): State<AppState>,
    request: Federated<state_ids::Request>,
) -> Result<RumaResponse<state_ids::Response>> {
    let origin = request.origin()?.clone();
    let (state, chain) = services.serve_state(&origin, &request.body.room_id, &request.body.event_id).await?;
    Ok(RumaResponse(state_ids::Response::new(ids(&chain), ids(&state))))
}

/// # `GET /_matrix/federation/v1/event_auth/{roomId}/{eventId}`
/// [spec](https://spec.matrix.org/v1.19/server-server-api/#get_matrixfederationv1event_authroomideventid)
pub async fn get_event_authorization(
    State(services): State<AppState>,
    request: Federated<event_auth::Request>,
) -> Result<RumaResponse<event_auth::Response>> {
    let origin = request.origin()?.clone();
    let chain = services.serve_event_auth(&origin, &request.body.room_id, &request.body.event_id).await?;
    Ok(RumaResponse(event_auth::Response::new(chain)))
}

/// # `POST /_matrix/federation/v1/get_missing_events/{roomId}`
/// [spec](https://spec.matrix.org/v1.19/server-server-api/#post_matrixfederationv1get_missing_eventsroomid)
pub async fn get_missing_events(
    State(services): State<AppState>,
    request: Federated<missing::Request>,
) -> Result<RumaResponse<missing::Response>> {
    let origin = request.origin()?.clone();
    let b = request.body;
    let limit = usize::try_from(u64::from(b.limit)).unwrap_or(usize::MAX);
    let min_depth = i64::try_from(u64::from(b.min_depth)).unwrap_or(i64::MAX);
    let events = services
        .serve_missing_events(&origin, &b.room_id, &b.earliest_events, &b.latest_events, limit, min_depth)
        .await?;
    Ok(RumaResponse(missing::Response::new(events)))
}
