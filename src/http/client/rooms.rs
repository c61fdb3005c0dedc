//! Rooms: `createRoom`, single events, `/context`, `timestamp_to_event`, room aliases
//! list.

use axum::{Router, extract::State};
use ruma::{
    api::client::{
        context::get_context,
        filter::{LazyLoadOptions, RoomEventFilter},
        room::{aliases, create_room, get_event_by_timestamp, get_room_event},
    },
    room::RoomType,
};
use serde_json::{Map, Value as JsonValue};

use crate::{
    error::{Error, Result},
    http::{
        AppState, route,
        ruma::{Ruma, RumaResponse},
    },
    service::rooms::{create::CreateRoom, format::Viewer, messages::EventFilter},
};

/// Converts the spec's room event filter into what the services honour.
pub fn event_filter(f: &RoomEventFilter) -> EventFilter {
    EventFilter {
        types: f.types.clone(),
        not_types: f.not_types.clone(),
        senders: f.senders.as_ref().map(|s| s.iter().map(ToString::to_string).collect()),
        not_senders: f.not_senders.iter().map(ToString::to_string).collect(),
        lazy_load_members: matches!(f.lazy_load_options, LazyLoadOptions::Enabled { .. }),
    }
}

fn object<T>(raw: &ruma::serde::Raw<T>) -> Result<Map<String, JsonValue>> {
    match serde_json::from_str(raw.json().get()) {
        Ok(JsonValue::Object(map)) => Ok(map),
        _ => Err(Error::bad_json("Expected a JSON object")),
    }
}

/// # `POST /_matrix/client/v3/createRoom`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3createroom>
async fn create_room(
    State(services): State<AppState>,
    req: Ruma<create_room::v3::Request>,
) -> Result<RumaResponse<create_room::v3::Response>> {
    let session = req.session()?;
    let b = &req.body;
    let mut initial_state = Vec::new();
    for raw in &b.initial_state {
        let event = object(raw)?;
        let event_type = event
            .get("type")
            .and_then(|t| t.as_str())
            .ok_or_else(|| Error::bad_json("initial_state events need a type"))?;
        let state_key = event.get("state_key").and_then(|k| k.as_str()).unwrap_or_default();
        let content = event.get("content").cloned().unwrap_or_else(|| JsonValue::Object(Map::new()));
        initial_state.push((event_type.to_owned(), state_key.to_owned(), content));
    }
    let mut creation_content = b.creation_content.as_ref().map(object).transpose()?;
    if let Some(content) = &mut creation_content
        && let Some(JsonValue::String(t)) = content.get("type")
        && RoomType::from(t.as_str()) == RoomType::Space
    {
        content.insert("type".into(), JsonValue::String(t.clone()));
    }
    let request = CreateRoom {
        preset: b.preset.as_ref().map(|p| p.as_str().to_owned()),
        public: b.visibility == ruma::api::client::room::Visibility::Public,
        name: b.name.clone(),
        topic: b.topic.clone(),
        room_alias_name: b.room_alias_name.clone(),
        invite: b.invite.clone(),
        is_direct: b.is_direct,
        initial_state,
        power_level_content_override: b.power_level_content_override.as_ref().map(object).transpose()?,
        creation_content,
        room_version: b.room_version.clone(),
    };
    let room_id = services.create_room(&session.user_id, request).await?;
    Ok(create_room::v3::Response::new(room_id).into())
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/event/{eventId}`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3roomsroomideventeventid>
async fn get_room_event(
    State(services): State<AppState>,
    req: Ruma<get_room_event::v3::Request>,
) -> Result<RumaResponse<get_room_event::v3::Response>> {
    let session = req.session()?;
    let event = services.get_event_for(&req.body.room_id, &session.user_id, &req.body.event_id).await?;
    let viewer = Viewer { user_id: &session.user_id, device_id: Some(&session.device_id) };
    let raw = services.client_event(&event, Some(viewer), true).await?;
    Ok(get_room_event::v3::Response::new(raw).into())
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/context/{eventId}`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3roomsroomidcontexteventid>
async fn get_context(
    State(services): State<AppState>,
    req: Ruma<get_context::v3::Request>,
) -> Result<RumaResponse<get_context::v3::Response>> {
    let session = req.session()?;
    let b = &req.body;
    let limit = u64::from(b.limit).min(100) as usize;
    let (event, before, after, state) =
        services.context(&b.room_id, &session.user_id, &b.event_id, limit, &event_filter(&b.filter)).await?;
    let viewer = Some(Viewer { user_id: &session.user_id, device_id: Some(&session.device_id) });
    let mut response = get_context::v3::Response::new();
    response.event = Some(services.client_event(&event, viewer, true).await?);
    response.events_before = services.client_events(&before.chunk, viewer, true).await?;
    response.events_after = services.client_events(&after.chunk, viewer, true).await?;
    response.start = before.end.or(Some(before.start));
    response.end = after.end.or(Some(after.start));
    let state = if !b.filter.lazy_load_options.is_disabled() {
        let mut all = before.chunk.clone();
        all.extend(after.chunk.iter().cloned());
        all.push(event.clone());
        services.member_events_for(&b.room_id, &all).await?
    } else {
        state
    };
    response.state = services.client_events(&state, viewer, true).await?;
    Ok(response.into())
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/aliases`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3roomsroomidaliases>
async fn get_room_aliases(
    State(services): State<AppState>,
    req: Ruma<aliases::v3::Request>,
) -> Result<RumaResponse<aliases::v3::Response>> {
    let aliases = services.room_aliases(&req.session()?.user_id, &req.body.room_id).await?;
    let aliases = aliases.into_iter().filter_map(|a| ruma::OwnedRoomAliasId::try_from(a).ok()).collect();
    Ok(aliases::v3::Response::new(aliases).into())
}

/// # `GET /_matrix/client/v1/rooms/{roomId}/timestamp_to_event`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv1roomsroomidtimestamp_to_event>
async fn get_event_by_timestamp(
    State(services): State<AppState>,
    req: Ruma<get_event_by_timestamp::v1::Request>,
) -> Result<RumaResponse<get_event_by_timestamp::v1::Response>> {
    let b = &req.body;
    let ts = i64::try_from(u64::from(b.ts.0)).map_err(|_| Error::invalid_param("ts is too large"))?;
    let forwards = b.dir == ruma::api::Direction::Forward;
    let (event_id, at) = services.timestamp_to_event(&b.room_id, &req.session()?.user_id, ts, forwards).await?;
    Ok(get_event_by_timestamp::v1::Response::new(event_id, at).into())
}

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<create_room::v3::Request, _, _>(router, create_room);
    let router = route::<get_room_event::v3::Request, _, _>(router, get_room_event);
    let router = route::<get_context::v3::Request, _, _>(router, get_context);
    let router = route::<get_event_by_timestamp::v1::Request, _, _>(router, get_event_by_timestamp);
    route::<aliases::v3::Request, _, _>(router, get_room_aliases)
}
