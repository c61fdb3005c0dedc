//! Relations and threads: `/relations/{eventId}[/{relType}[/{eventType}]]` and
//! `/threads`.

use axum::{Router, extract::State};
use ruma::{
    RoomId, UserId,
    api::{
        Direction,
        client::{
            relations::{
                get_relating_events, get_relating_events_with_rel_type,
                get_relating_events_with_rel_type_and_event_type,
            },
            threads::get_threads,
        },
    },
    serde::Raw,
};

use crate::{
    error::Result,
    http::{
        AppState, route,
        ruma::{Ruma, RumaResponse},
    },
    service::{
        Services,
        rooms::{
            format::Viewer,
            relations::{RECURSION_DEPTH, RelationsRequest},
        },
    },
    storage::StoredEvent,
};

/// A page of relations, formatted: (chunk, next_batch, recursion_depth).
type Formatted<T> = (Vec<Raw<T>>, Option<String>, Option<ruma::UInt>);

#[allow(clippy::too_many_arguments)]
async fn relations_page<T>(
    services: &Services,
    room_id: &RoomId,
    user: &UserId,
    device: &ruma::DeviceId,
    parent: &ruma::EventId,
    r: RelationsRequest<'_>,
) -> Result<Formatted<T>> {
    let recurse = r.recurse;
    let page = services.relations(room_id, user, parent, &r).await?;
    let viewer = Some(Viewer { user_id: user, device_id: Some(device) });
    let chunk = format(services, &page.chunk, viewer).await?;
    Ok((chunk, page.next_batch, recurse.then(|| ruma::UInt::from(RECURSION_DEPTH as u32))))
}

async fn format<T>(services: &Services, events: &[StoredEvent], viewer: Option<Viewer<'_>>) -> Result<Vec<Raw<T>>> {
    services.client_events(events, viewer, true).await
}

fn limit(limit: Option<ruma::UInt>) -> usize {
    limit.map_or(50, |l| u64::from(l).min(1000) as usize)
}

/// # `GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv1roomsroomidrelationseventid>
async fn get_relating_events(
    State(services): State<AppState>,
    req: Ruma<get_relating_events::v1::Request>,
) -> Result<RumaResponse<get_relating_events::v1::Response>> {
    let session = req.session()?;
    let b = &req.body;
    let r = RelationsRequest {
        rel_type: None,
        event_type: None,
        from: b.from.as_deref(),
        to: b.to.as_deref(),
        backwards: b.dir == Direction::Backward,
        limit: limit(b.limit),
        recurse: b.recurse,
    };
    let (chunk, next_batch, depth) =
        relations_page(&services, &b.room_id, &session.user_id, &session.device_id, &b.event_id, r).await?;
    let mut response = get_relating_events::v1::Response::new(chunk);
    response.next_batch = next_batch;
    response.recursion_depth = depth;
    Ok(response.into())
}

/// # `GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}/{relType}`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv1roomsroomidrelationseventidreltype>
async fn get_relating_events_with_rel_type(
    State(services): State<AppState>,
    req: Ruma<get_relating_events_with_rel_type::v1::Request>,
) -> Result<RumaResponse<get_relating_events_with_rel_type::v1::Response>> {
    let session = req.session()?;
    let b = &req.body;
    let r = RelationsRequest {
        rel_type: Some(b.rel_type.as_str()),
        event_type: None,
        from: b.from.as_deref(),
        to: b.to.as_deref(),
        backwards: b.dir == Direction::Backward,
        limit: limit(b.limit),
        recurse: b.recurse,
    };
    let (chunk, next_batch, depth) =
        relations_page(&services, &b.room_id, &session.user_id, &session.device_id, &b.event_id, r).await?;
    let mut response = get_relating_events_with_rel_type::v1::Response::new(chunk);
    response.next_batch = next_batch;
    response.recursion_depth = depth;
    Ok(response.into())
}

/// # `GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}/{relType}/{eventType}`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv1roomsroomidrelationseventidreltypeeventtype>
async fn get_relating_events_with_rel_type_and_event_type(
    State(services): State<AppState>,
    req: Ruma<get_relating_events_with_rel_type_and_event_type::v1::Request>,
) -> Result<RumaResponse<get_relating_events_with_rel_type_and_event_type::v1::Response>> {
    let session = req.session()?;
    let b = &req.body;
    let event_type = b.event_type.to_string();
    let r = RelationsRequest {
        rel_type: Some(b.rel_type.as_str()),
        event_type: Some(&event_type),
        from: b.from.as_deref(),
        to: b.to.as_deref(),
        backwards: b.dir == Direction::Backward,
        limit: limit(b.limit),
        recurse: b.recurse,
    };
    let (chunk, next_batch, depth) =
        relations_page(&services, &b.room_id, &session.user_id, &session.device_id, &b.event_id, r).await?;
    let mut response = get_relating_events_with_rel_type_and_event_type::v1::Response::new(chunk);
    response.next_batch = next_batch;
    response.recursion_depth = depth;
    Ok(response.into())
}

/// # `GET /_matrix/client/v1/rooms/{roomId}/threads`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv1roomsroomidthreads>
async fn get_threads(
    State(services): State<AppState>,
    req: Ruma<get_threads::v1::Request>,
) -> Result<RumaResponse<get_threads::v1::Response>> {
    let session = req.session()?;
    let b = &req.body;
    let participated = b.include == get_threads::v1::IncludeThreads::Participated;
    let page = services.threads(&b.room_id, &session.user_id, participated, b.from.as_deref(), limit(b.limit)).await?;
    let viewer = Some(Viewer { user_id: &session.user_id, device_id: Some(&session.device_id) });
    let mut response = get_threads::v1::Response::new(format(&services, &page.chunk, viewer).await?);
    response.next_batch = page.next_batch;
    Ok(response.into())
}

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<get_relating_events::v1::Request, _, _>(router, get_relating_events);
    let router =
        route::<get_relating_events_with_rel_type::v1::Request, _, _>(router, get_relating_events_with_rel_type);
    let router = route::<get_relating_events_with_rel_type_and_event_type::v1::Request, _, _>(
        router,
        get_relating_events_with_rel_type_and_event_type,
    );
    route::<get_threads::v1::Request, _, _>(router, get_threads)
}
