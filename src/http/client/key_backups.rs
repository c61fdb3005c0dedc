//! Server-side key backups: `room_keys/version` and `room_keys/keys` at its three
//! levels (all rooms, one room, one session).

use std::collections::BTreeMap;

use axum::{Router, extract::State};
use ruma::api::client::backup::{
    add_backup_keys, add_backup_keys_for_room, add_backup_keys_for_session, create_backup_version, delete_backup_keys,
    delete_backup_keys_for_room, delete_backup_keys_for_session, delete_backup_version, get_backup_info,
    get_backup_keys, get_backup_keys_for_room, get_backup_keys_for_session, get_latest_backup_info,
    update_backup_version,
};

use crate::{
    error::{Error, Result},
    http::{
        AppState, route,
        ruma::{Ruma, RumaResponse},
    },
    storage::BackupScope,
};

/// # `POST /_matrix/client/v3/room_keys/version`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3room_keysversion>
async fn create_backup_version(
    State(services): State<AppState>,
    req: Ruma<create_backup_version::v3::Request>,
) -> Result<RumaResponse<create_backup_version::v3::Response>> {
    let session = req.session()?;
    let version = services.create_backup_version(&session.user_id, &req.body.algorithm).await?;
    Ok(create_backup_version::v3::Response::new(version).into())
}

/// # `GET /_matrix/client/v3/room_keys/version`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3room_keysversion>
async fn get_latest_backup_info(
    State(services): State<AppState>,
    req: Ruma<get_latest_backup_info::v3::Request>,
) -> Result<RumaResponse<get_latest_backup_info::v3::Response>> {
    let session = req.session()?;
    let info = services.get_backup_version(&session.user_id, None).await?;
    Ok(get_latest_backup_info::v3::Response::new(info.algorithm, info.count, info.etag, info.version).into())
}

/// # `GET /_matrix/client/v3/room_keys/version/{version}`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3room_keysversionversion>
async fn get_backup_info(
    State(services): State<AppState>,
    req: Ruma<get_backup_info::v3::Request>,
) -> Result<RumaResponse<get_backup_info::v3::Response>> {
    let session = req.session()?;
    let info = services.get_backup_version(&session.user_id, Some(&req.body.version)).await?;
    Ok(get_backup_info::v3::Response::new(info.algorithm, info.count, info.etag, info.version).into())
}

/// # `PUT /_matrix/client/v3/room_keys/version/{version}`
/// <https://spec.matrix.org/v1.19/client-server-api/#put_matrixclientv3room_keysversionversion>
async fn update_backup_version(
    State(services): State<AppState>,
    req: Ruma<update_backup_version::v3::Request>,
) -> Result<RumaResponse<update_backup_version::v3::Response>> {
    let session = req.session()?;
    services.update_backup_version(&session.user_id, &req.body.version, &req.body.algorithm).await?;
    Ok(update_backup_version::v3::Response::new().into())
}

/// # `DELETE /_matrix/client/v3/room_keys/version/{version}`
/// <https://spec.matrix.org/v1.19/client-server-api/#delete_matrixclientv3room_keysversionversion>
async fn delete_backup_version(
    State(services): State<AppState>,
    req: Ruma<delete_backup_version::v3::Request>,
) -> Result<RumaResponse<delete_backup_version::v3::Response>> {
    let session = req.session()?;
    services.delete_backup_version(&session.user_id, &req.body.version).await?;
    Ok(delete_backup_version::v3::Response::new().into())
}

/// # `PUT /_matrix/client/v3/room_keys/keys`
/// <https://spec.matrix.org/v1.19/client-server-api/#put_matrixclientv3room_keyskeys>
async fn add_backup_keys(
    State(services): State<AppState>,
    req: Ruma<add_backup_keys::v3::Request>,
) -> Result<RumaResponse<add_backup_keys::v3::Response>> {
    let session = req.session()?;
    let rooms = req
        .body
        .rooms
        .iter()
        .map(|(room, backup)| (room.clone(), backup.sessions.iter().map(|(s, k)| (s.as_str(), k)).collect()))
        .collect();
    let (etag, count) = services.add_backup_keys(&session.user_id, &req.body.version, &rooms).await?;
    Ok(add_backup_keys::v3::Response::new(etag, count).into())
}

/// # `PUT /_matrix/client/v3/room_keys/keys/{roomId}`
/// <https://spec.matrix.org/v1.19/client-server-api/#put_matrixclientv3room_keyskeysroomid>
async fn add_backup_keys_for_room(
    State(services): State<AppState>,
    req: Ruma<add_backup_keys_for_room::v3::Request>,
) -> Result<RumaResponse<add_backup_keys_for_room::v3::Response>> {
    let session = req.session()?;
    let b = &req.body;
    let sessions = b.sessions.iter().map(|(s, k)| (s.as_str(), k)).collect();
    let rooms = BTreeMap::from([(b.room_id.clone(), sessions)]);
    let (etag, count) = services.add_backup_keys(&session.user_id, &b.version, &rooms).await?;
    Ok(add_backup_keys_for_room::v3::Response::new(etag, count).into())
}

/// # `PUT /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}`
/// <https://spec.matrix.org/v1.19/client-server-api/#put_matrixclientv3room_keyskeysroomidsessionid>
async fn add_backup_keys_for_session(
    State(services): State<AppState>,
    req: Ruma<add_backup_keys_for_session::v3::Request>,
) -> Result<RumaResponse<add_backup_keys_for_session::v3::Response>> {
    let session = req.session()?;
    let b = &req.body;
    let sessions = BTreeMap::from([(b.session_id.as_str(), &b.session_data)]);
    let rooms = BTreeMap::from([(b.room_id.clone(), sessions)]);
    let (etag, count) = services.add_backup_keys(&session.user_id, &b.version, &rooms).await?;
    Ok(add_backup_keys_for_session::v3::Response::new(etag, count).into())
}

/// # `GET /_matrix/client/v3/room_keys/keys`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3room_keyskeys>
async fn get_backup_keys(
    State(services): State<AppState>,
    req: Ruma<get_backup_keys::v3::Request>,
) -> Result<RumaResponse<get_backup_keys::v3::Response>> {
    let session = req.session()?;
    let rooms = services.get_backup_keys(&session.user_id, &req.body.version, BackupScope::All).await?;
    Ok(get_backup_keys::v3::Response::new(rooms).into())
}

/// # `GET /_matrix/client/v3/room_keys/keys/{roomId}`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3room_keyskeysroomid>
async fn get_backup_keys_for_room(
    State(services): State<AppState>,
    req: Ruma<get_backup_keys_for_room::v3::Request>,
) -> Result<RumaResponse<get_backup_keys_for_room::v3::Response>> {
    let session = req.session()?;
    let b = &req.body;
    let scope = BackupScope::Room(b.room_id.as_str());
    let mut rooms = services.get_backup_keys(&session.user_id, &b.version, scope).await?;
    let sessions = rooms.remove(&b.room_id).map(|r| r.sessions).unwrap_or_default();
    Ok(get_backup_keys_for_room::v3::Response::new(sessions).into())
}

/// # `GET /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3room_keyskeysroomidsessionid>
async fn get_backup_keys_for_session(
    State(services): State<AppState>,
    req: Ruma<get_backup_keys_for_session::v3::Request>,
) -> Result<RumaResponse<get_backup_keys_for_session::v3::Response>> {
    let session = req.session()?;
    let b = &req.body;
    let scope = BackupScope::Session(b.room_id.as_str(), &b.session_id);
    let mut rooms = services.get_backup_keys(&session.user_id, &b.version, scope).await?;
    let key = rooms
        .remove(&b.room_id)
        .and_then(|mut r| r.sessions.remove(&b.session_id))
        .ok_or_else(|| Error::not_found("No key for that session in the backup"))?;
    Ok(get_backup_keys_for_session::v3::Response::new(key).into())
}

/// # `DELETE /_matrix/client/v3/room_keys/keys`
/// <https://spec.matrix.org/v1.19/client-server-api/#delete_matrixclientv3room_keyskeys>
async fn delete_backup_keys(
    State(services): State<AppState>,
    req: Ruma<delete_backup_keys::v3::Request>,
) -> Result<RumaResponse<delete_backup_keys::v3::Response>> {
    let session = req.session()?;
    let (etag, count) = services.delete_backup_keys(&session.user_id, &req.body.version, BackupScope::All).await?;
    Ok(delete_backup_keys::v3::Response::new(etag, count).into())
}

/// # `DELETE /_matrix/client/v3/room_keys/keys/{roomId}`
/// <https://spec.matrix.org/v1.19/client-server-api/#delete_matrixclientv3room_keyskeysroomid>
async fn delete_backup_keys_for_room(
    State(services): State<AppState>,
    req: Ruma<delete_backup_keys_for_room::v3::Request>,
) -> Result<RumaResponse<delete_backup_keys_for_room::v3::Response>> {
    let session = req.session()?;
    let b = &req.body;
    let scope = BackupScope::Room(b.room_id.as_str());
    let (etag, count) = services.delete_backup_keys(&session.user_id, &b.version, scope).await?;
    Ok(delete_backup_keys_for_room::v3::Response::new(etag, count).into())
}

/// # `DELETE /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}`
/// <https://spec.matrix.org/v1.19/client-server-api/#delete_matrixclientv3room_keyskeysroomidsessionid>
async fn delete_backup_keys_for_session(
    State(services): State<AppState>,
    req: Ruma<delete_backup_keys_for_session::v3::Request>,
) -> Result<RumaResponse<delete_backup_keys_for_session::v3::Response>> {
    let session = req.session()?;
    let b = &req.body;
    let scope = BackupScope::Session(b.room_id.as_str(), &b.session_id);
    let (etag, count) = services.delete_backup_keys(&session.user_id, &b.version, scope).await?;
    Ok(delete_backup_keys_for_session::v3::Response::new(etag, count).into())
}

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<create_backup_version::v3::Request, _, _>(router, create_backup_version);
    let router = route::<get_latest_backup_info::v3::Request, _, _>(router, get_latest_backup_info);
    let router = route::<get_backup_info::v3::Request, _, _>(router, get_backup_info);
    let router = route::<update_backup_version::v3::Request, _, _>(router, update_backup_version);
    let router = route::<delete_backup_version::v3::Request, _, _>(router, delete_backup_version);
    let router = route::<add_backup_keys::v3::Request, _, _>(router, add_backup_keys);
    let router = route::<add_backup_keys_for_room::v3::Request, _, _>(router, add_backup_keys_for_room);
    let router = route::<add_backup_keys_for_session::v3::Request, _, _>(router, add_backup_keys_for_session);
    let router = route::<get_backup_keys::v3::Request, _, _>(router, get_backup_keys);
    let router = route::<get_backup_keys_for_room::v3::Request, _, _>(router, get_backup_keys_for_room);
    let router = route::<get_backup_keys_for_session::v3::Request, _, _>(router, get_backup_keys_for_session);
    let router = route::<delete_backup_keys::v3::Request, _, _>(router, delete_backup_keys);
    let router = route::<delete_backup_keys_for_room::v3::Request, _, _>(router, delete_backup_keys_for_room);
    route::<delete_backup_keys_for_session::v3::Request, _, _>(router, delete_backup_keys_for_session)
}
