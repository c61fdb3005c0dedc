//! Typing, receipts, read markers and presence.

use axum::{Router, extract::State};
use ruma::{
    api::client::{
        presence::{get_presence, set_presence},
        read_marker::set_read_marker,
        receipt::create_receipt,
        typing::create_typing_event::{self, v3::Typing},
    },
    presence::PresenceState,
};

use crate::{
    error::{Error, Result},
    http::{
        AppState, route,
        ruma::{Ruma, RumaResponse},
    },
};

/// # `PUT /_matrix/client/v3/rooms/{roomId}/typing/{userId}`
/// <https://spec.matrix.org/v1.19/client-server-api/#put_matrixclientv3roomsroomidtypinguserid>
async fn create_typing_event(
    State(services): State<AppState>,
    req: Ruma<create_typing_event::v3::Request>,
) -> Result<RumaResponse<create_typing_event::v3::Response>> {
    let session = req.session()?;
    if req.body.user_id != session.user_id {
        return Err(Error::forbidden("You can only set your own typing state"));
    }
    let timeout = match req.body.state {
        Typing::Yes(settings) => Some(settings.timeout),
        _ => None,
    };
    services.set_typing(&req.body.room_id, &session.user_id, timeout).await?;
    Ok(create_typing_event::v3::Response::new().into())
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/receipt/{receiptType}/{eventId}`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3roomsroomidreceiptreceipttypeeventid>
async fn create_receipt(
    State(services): State<AppState>,
    req: Ruma<create_receipt::v3::Request>,
) -> Result<RumaResponse<create_receipt::v3::Response>> {
    let session = req.session()?;
    let b = &req.body;
    let thread = match &b.thread {
        ruma::events::receipt::ReceiptThread::Thread(id) => Some(id.to_string()),
        ruma::events::receipt::ReceiptThread::Main => Some("main".to_owned()),
        _ => None,
    };
    services.set_receipt(&b.room_id, &session.user_id, b.receipt_type.as_str(), &b.event_id, thread.as_deref()).await?;
    Ok(create_receipt::v3::Response::new().into())
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/read_markers`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3roomsroomidread_markers>
async fn set_read_marker(
    State(services): State<AppState>,
    req: Ruma<set_read_marker::v3::Request>,
) -> Result<RumaResponse<set_read_marker::v3::Response>> {
    let session = req.session()?;
    let b = &req.body;
    if let Some(event_id) = &b.fully_read {
        services.set_receipt(&b.room_id, &session.user_id, "m.fully_read", event_id, None).await?;
    }
    if let Some(event_id) = &b.read_receipt {
        services.set_receipt(&b.room_id, &session.user_id, "m.read", event_id, None).await?;
    }
    if let Some(event_id) = &b.private_read_receipt {
        services.set_receipt(&b.room_id, &session.user_id, "m.read.private", event_id, None).await?;
    }
    Ok(set_read_marker::v3::Response::new().into())
}

/// # `PUT /_matrix/client/v3/presence/{userId}/status`
/// <https://spec.matrix.org/v1.19/client-server-api/#put_matrixclientv3presenceuseridstatus>
async fn set_presence(
    State(services): State<AppState>,
    req: Ruma<set_presence::v3::Request>,
) -> Result<RumaResponse<set_presence::v3::Response>> {
    let session = req.session()?;
    if req.body.user_id != session.user_id {
        return Err(Error::forbidden("You can only set your own presence"));
    }
    let state = match &req.body.presence {
        PresenceState::Online => "online",
        PresenceState::Unavailable => "unavailable",
        PresenceState::Offline => "offline",
        other => return Err(Error::invalid_param(format!("Unknown presence {other}"))),
    };
    services.set_presence(&session.user_id, state, Some(req.body.status_msg.as_deref())).await?;
    Ok(set_presence::v3::Response::new().into())
}

/// # `GET /_matrix/client/v3/presence/{userId}/status`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3presenceuseridstatus>
async fn get_presence(
    State(services): State<AppState>,
    req: Ruma<get_presence::v3::Request>,
) -> Result<RumaResponse<get_presence::v3::Response>> {
    let session = req.session()?;
    let content = services.get_presence(&session.user_id, &req.body.user_id).await?;
    let state = match content["presence"].as_str().unwrap_or("offline") {
        "online" => PresenceState::Online,
        "unavailable" => PresenceState::Unavailable,
        _ => PresenceState::Offline,
    };
    let mut response = get_presence::v3::Response::new(state);
    response.status_msg = content["status_msg"].as_str().map(str::to_owned);
    response.currently_active = content["currently_active"].as_bool();
    response.last_active_ago = content["last_active_ago"].as_u64().map(std::time::Duration::from_millis);
    Ok(response.into())
}

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<create_typing_event::v3::Request, _, _>(router, create_typing_event);
    let router = route::<create_receipt::v3::Request, _, _>(router, create_receipt);
    let router = route::<set_read_marker::v3::Request, _, _>(router, set_read_marker);
    let router = route::<set_presence::v3::Request, _, _>(router, set_presence);
    route::<get_presence::v3::Request, _, _>(router, get_presence)
}
