//! Sending and reading events: `send`, `state`, `redact`, `messages`.

use axum::{Router, extract::State};
use ruma::api::{
    Direction,
    client::{
        message::{get_message_events, send_message_event},
        redact::redact_event,
        state::{get_state_event_for_key, get_state_events, send_state_event},
    },
};
use serde_json::Value as JsonValue;

use super::rooms::event_filter;
use crate::{
    error::{Error, Result},
    http::{
        AppState, route,
        ruma::{Ruma, RumaResponse},
    },
    service::rooms::format::Viewer,
};

fn content_of(raw: &serde_json::value::RawValue) -> Result<JsonValue> {
    match serde_json::from_str(raw.get()) {
        Ok(v @ JsonValue::Object(_)) => Ok(v),
        _ => Err(Error::bad_json("The event content must be a JSON object")),
    }
}

/// # `PUT /_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}`
/// <https://spec.matrix.org/v1.19/client-server-api/#put_matrixclientv3roomsroomidsendeventtypetxnid>
async fn send_message_event(
    State(services): State<AppState>,
    req: Ruma<send_message_event::v3::Request>,
) -> Result<RumaResponse<send_message_event::v3::Response>> {
    let session = req.session()?;
    let b = &req.body;
    let content = content_of(b.body.json())?;
    let event_id = services
        .send_message(
            &b.room_id,
            &session.user_id,
            &session.device_id,
            &b.event_type.to_string(),
            b.txn_id.as_str(),
            content,
        )
        .await?;
    Ok(send_message_event::v3::Response::new(event_id).into())
}

/// # `PUT /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}`
/// <https://spec.matrix.org/v1.19/client-server-api/#put_matrixclientv3roomsroomidstateeventtypestatekey>
async fn send_state_event(
    State(services): State<AppState>,
    req: Ruma<send_state_event::v3::Request>,
) -> Result<RumaResponse<send_state_event::v3::Response>> {
    let session = req.session()?;
    let b = &req.body;
    let content = content_of(b.body.json())?;
    let event_id =
        services.send_state(&b.room_id, &session.user_id, &b.event_type.to_string(), &b.state_key, content).await?;
    Ok(send_state_event::v3::Response::new(event_id).into())
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3roomsroomidstateeventtypestatekey>
async fn get_state_event_for_key(
    State(services): State<AppState>,
    req: Ruma<get_state_event_for_key::v3::Request>,
) -> Result<RumaResponse<get_state_event_for_key::v3::Response>> {
    let session = req.session()?;
    let b = &req.body;
    let event =
        services.room_state_event_for(&b.room_id, &session.user_id, &b.event_type.to_string(), &b.state_key).await?;
    let raw = if b.format == get_state_event_for_key::v3::StateEventFormat::Event {
        services.client_event::<()>(&event, None, true).await?.into_json()
    } else {
        let json = serde_json::from_str::<JsonValue>(&event.json).map_err(Error::internal)?["content"].take();
        serde_json::value::to_raw_value(&json).map_err(Error::internal)?
    };
    Ok(get_state_event_for_key::v3::Response::new(raw).into())
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/state`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3roomsroomidstate>
async fn get_state_events(
    State(services): State<AppState>,
    req: Ruma<get_state_events::v3::Request>,
) -> Result<RumaResponse<get_state_events::v3::Response>> {
    let session = req.session()?;
    let events = services.room_state_for(&req.body.room_id, &session.user_id).await?;
    let raw = services.client_events(&events, None, true).await?;
    Ok(get_state_events::v3::Response::new(raw).into())
}

/// # `PUT /_matrix/client/v3/rooms/{roomId}/redact/{eventId}/{txnId}`
/// <https://spec.matrix.org/v1.19/client-server-api/#put_matrixclientv3roomsroomidredacteventidtxnid>
async fn redact_event(
    State(services): State<AppState>,
    req: Ruma<redact_event::v3::Request>,
) -> Result<RumaResponse<redact_event::v3::Response>> {
    let session = req.session()?;
    let b = &req.body;
    let event_id = services
        .redact_event(
            &b.room_id,
            &session.user_id,
            &session.device_id,
            &b.event_id,
            b.txn_id.as_str(),
            b.reason.clone(),
        )
        .await?;
    Ok(redact_event::v3::Response::new(event_id).into())
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/messages`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3roomsroomidmessages>
async fn get_message_events(
    State(services): State<AppState>,
    req: Ruma<get_message_events::v3::Request>,
) -> Result<RumaResponse<get_message_events::v3::Response>> {
    let session = req.session()?;
    let b = &req.body;
    let mut filter = event_filter(&b.filter);
    let limit = b.filter.limit.map(u64::from).unwrap_or_else(|| u64::from(b.limit)).min(1000) as usize;
    if filter.types.as_ref().is_some_and(|t| t.is_empty()) {
        filter.types = None;
    }
    let page = services
        .messages(
            &b.room_id,
            &session.user_id,
            b.from.as_deref(),
            b.to.as_deref(),
            b.dir == Direction::Backward,
            limit,
            &filter,
        )
        .await?;
    let viewer = Some(Viewer { user_id: &session.user_id, device_id: Some(&session.device_id) });
    let mut response = get_message_events::v3::Response::new();
    response.start = page.start;
    response.end = page.end;
    response.chunk = services.client_events(&page.chunk, viewer, true).await?;
    response.state = services.client_events(&page.state, viewer, true).await?;
    Ok(response.into())
}

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<send_message_event::v3::Request, _, _>(router, send_message_event);
    let router = route::<send_state_event::v3::Request, _, _>(router, send_state_event);
    let router = route::<get_state_event_for_key::v3::Request, _, _>(router, get_state_event_for_key);
    let router = route::<get_state_events::v3::Request, _, _>(router, get_state_events);
    let router = route::<redact_event::v3::Request, _, _>(router, redact_event);
    route::<get_message_events::v3::Request, _, _>(router, get_message_events)
}
