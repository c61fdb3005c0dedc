//! `/sync` and filters.

use std::time::Duration;

use axum::{
    Router,
    body::Body,
    extract::State,
    response::{IntoResponse, Response},
};
use ruma::api::{
    OutgoingResponseExt,
    client::{
        filter::{Filter as TypeFilter, FilterDefinition, LazyLoadOptions, create_filter, get_filter},
        sync::sync_events::{self, v3::Filter},
    },
};
use serde_json::{Value, json};

use crate::{
    error::{Error, Result},
    http::{
        AppState, route,
        ruma::{Ruma, RumaResponse},
    },
    service::{
        rooms::messages::EventFilter,
        sync::{SyncFilter, SyncRequest},
    },
};

use super::rooms::event_filter;

fn sync_filter(def: &FilterDefinition) -> SyncFilter {
    let room = &def.room;
    SyncFilter {
        timeline_limit: room.timeline.limit.map(|l| u64::from(l) as usize).unwrap_or(10),
        lazy_load_members: matches!(room.state.lazy_load_options, LazyLoadOptions::Enabled { .. }),
        include_leave: room.include_leave,
        rooms: room.rooms.as_ref().map(|r| r.iter().map(ToString::to_string).collect()),
        not_rooms: room.not_rooms.iter().map(ToString::to_string).collect(),
        timeline: event_filter(&room.timeline),
        state: event_filter(&room.state),
        ephemeral: event_filter(&room.ephemeral),
        room_account_data: event_filter(&room.account_data),
        account_data: type_filter(&def.account_data),
        presence: type_filter(&def.presence),
        unread_thread_notifications: room.timeline.unread_thread_notifications,
    }
}

/// The type and sender fields of a filter for events outside rooms.
fn type_filter(f: &TypeFilter) -> EventFilter {
    EventFilter {
        types: f.types.clone(),
        not_types: f.not_types.clone(),
        senders: f.senders.as_ref().map(|s| s.iter().map(ToString::to_string).collect()),
        not_senders: f.not_senders.iter().map(ToString::to_string).collect(),
        lazy_load_members: false,
    }
}

/// # `GET /_matrix/client/v3/sync`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3sync>
async fn sync_events(State(services): State<AppState>, req: Ruma<sync_events::v3::Request>) -> Result<Response> {
    let session = req.session()?;
    let b = &req.body;
    let filter = match &b.filter {
        None => SyncFilter::default(),
        Some(Filter::FilterDefinition(def)) => sync_filter(def),
        Some(Filter::FilterId(id)) => sync_filter(&services.get_filter(&session.user_id, id).await?),
        Some(_) => SyncFilter::default(),
    };
    let request = SyncRequest {
        since: b.since.clone(),
        timeout: b.timeout.unwrap_or(Duration::ZERO),
        full_state: b.full_state,
        filter,
        set_presence: Some(b.set_presence.to_string()),
    };
    Ok(with_explicit_leave_sections(services.sync(session, request).await?))
}

/// matrix-nio rejects a whole sync response when a room under `rooms.leave` lacks
/// `state.events` (and validates `timeline` the same way), which ruma leaves out when
/// empty; other servers always send them. Only responses with left rooms are rewritten.
fn with_explicit_leave_sections(resp: sync_events::v3::Response) -> Response {
    if resp.rooms.leave.is_empty() {
        return RumaResponse(resp).into_response();
    }
    let (mut parts, body) = match resp.try_into_http_response::<Vec<u8>>() {
        Ok(http) => http.into_parts(),
        Err(e) => return Error::internal(format!("could not serialize a response: {e}")).into_response(),
    };
    let Ok(mut json) = serde_json::from_slice::<Value>(&body) else {
        return Response::from_parts(parts, Body::from(body));
    };
    if let Some(leave) = json.pointer_mut("/rooms/leave").and_then(Value::as_object_mut) {
        for room in leave.values_mut().filter_map(Value::as_object_mut) {
            for section in ["state", "timeline"] {
                if let Some(s) = room.entry(section).or_insert_with(|| json!({})).as_object_mut() {
                    s.entry("events").or_insert_with(|| json!([]));
                }
            }
        }
    }
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    match serde_json::to_vec(&json) {
        Ok(bytes) => Response::from_parts(parts, Body::from(bytes)),
        Err(e) => Error::internal(format!("could not serialize a response: {e}")).into_response(),
    }
}

/// # `POST /_matrix/client/v3/user/{userId}/filter`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3useruseridfilter>
async fn create_filter(
    State(services): State<AppState>,
    req: Ruma<create_filter::v3::Request>,
) -> Result<RumaResponse<create_filter::v3::Response>> {
    let session = req.session()?;
    if req.body.user_id != session.user_id {
        return Err(Error::forbidden("You can only create filters for yourself"));
    }
    let id = services.create_filter(&session.user_id, &req.body.filter).await?;
    Ok(create_filter::v3::Response::new(id).into())
}

/// # `GET /_matrix/client/v3/user/{userId}/filter/{filterId}`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3useruseridfilterfilterid>
async fn get_filter(
    State(services): State<AppState>,
    req: Ruma<get_filter::v3::Request>,
) -> Result<RumaResponse<get_filter::v3::Response>> {
    let session = req.session()?;
    if req.body.user_id != session.user_id {
        return Err(Error::forbidden("You can only read your own filters"));
    }
    let filter = services.get_filter(&session.user_id, &req.body.filter_id).await?;
    Ok(get_filter::v3::Response::new(filter).into())
}

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<sync_events::v3::Request, _, _>(router, sync_events);
    let router = route::<create_filter::v3::Request, _, _>(router, create_filter);
    route::<get_filter::v3::Request, _, _>(router, get_filter)
}
