//! Server-side key backups (`room_keys`): the versions a user creates and the room keys
//! their clients store in the current one. The keys are encrypted by the client; the
//! server only checks their shape, keeps the better key of each session (by the spec's
//! rule, in the database) and hands them back to the user's other logins.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use ruma::{
    OwnedRoomId, UInt, UserId,
    api::{
        client::backup::{BackupAlgorithm, KeyBackupData, RoomKeyBackup},
        error::{ErrorKind, WrongRoomKeysVersionErrorData},
    },
    serde::Raw,
};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::Services;
use crate::{
    error::{Error, Result},
    storage::{BackupKey, BackupScope, BackupVersion, BackupWriteRefused},
};

/// The backup algorithms the spec defines (and so the only ones Convo stores).
const ALGORITHMS: [&str; 1] = ["m.megolm_backup.v1.curve25519-aes-sha2"];

/// Sessions one upload may carry (Element uploads a few hundred at a time).
const MAX_KEYS_PER_UPLOAD: usize = 10_000;

/// What a backup version says about itself, as clients read it.
pub struct BackupInfo {
    pub algorithm: Raw<BackupAlgorithm>,
    pub count: UInt,
    pub etag: String,
    pub version: String,
}

/// A backup's `algorithm` and `auth_data`, checked as the spec describes them.
#[derive(Deserialize)]
struct AlgorithmBody {
    algorithm: String,
    auth_data: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    version: Option<String>,
}

/// The metadata of a backed-up key that the replacement rule reads; `session_data`
/// is the client's encrypted blob, kept as uploaded.
#[derive(Deserialize)]
struct KeyMetadata {
    first_message_index: UInt,
    forwarded_count: UInt,
    is_verified: bool,
    #[allow(dead_code)]
    session_data: serde_json::Map<String, serde_json::Value>,
}

fn parse_algorithm(raw: &Raw<BackupAlgorithm>) -> Result<AlgorithmBody> {
    let body: AlgorithmBody = serde_json::from_str(raw.json().get())
        .map_err(|e| Error::bad_json(format!("Invalid backup algorithm: {e}")))?;
    if !ALGORITHMS.contains(&body.algorithm.as_str()) {
        return Err(Error::invalid_param(format!("Unsupported backup algorithm {}", body.algorithm)));
    }
    if !body.auth_data.get("public_key").is_some_and(serde_json::Value::is_string) {
        return Err(Error::bad_json("auth_data.public_key must be a string"));
    }
    Ok(body)
}

/// A version named by a client: versions are numbers; anything else names none.
fn parse_version(version: &str) -> Option<i64> {
    version.parse().ok().filter(|v| *v > 0 && !version.starts_with(['+', '0']))
}

fn unknown_version() -> Error {
    Error::not_found("Unknown backup version")
}

fn uint(n: i64) -> UInt {
    UInt::new(n.max(0) as u64).unwrap_or_default()
}

impl Services {
    /// `POST /room_keys/version`: a new backup version, which becomes the current one.
    pub async fn create_backup_version(&self, user: &UserId, algorithm: &Raw<BackupAlgorithm>) -> Result<String> {
        let body = parse_algorithm(algorithm)?;
        let auth_data = serde_json::to_string(&body.auth_data).map_err(Error::internal)?;
        let version = self.store.create_backup_version(user.as_str(), &body.algorithm, &auth_data).await?;
        Ok(version.to_string())
    }

    /// `GET /room_keys/version[/{version}]`: the named version, or the current one.
    pub async fn get_backup_version(&self, user: &UserId, version: Option<&str>) -> Result<BackupInfo> {
        let version = match version {
            Some(v) => Some(parse_version(v).ok_or_else(unknown_version)?),
            None => None,
        };
        let found = self.store.get_backup_version(user.as_str(), version).await?;
        let BackupVersion { version, algorithm, auth_data, etag, count } = found.ok_or_else(|| match version {
            Some(_) => unknown_version(),
            None => Error::not_found("No current backup version"),
        })?;
        let algorithm = serde_json::to_string(&algorithm).map_err(Error::internal)?;
        let json = format!(r#"{{"algorithm":{algorithm},"auth_data":{auth_data}}}"#);
        Ok(BackupInfo {
            algorithm: Raw::from_json(RawValue::from_string(json).map_err(Error::internal)?),
            count: uint(count),
            etag: etag.to_string(),
            version: version.to_string(),
        })
    }

    /// `PUT /room_keys/version/{version}`: replaces the version's `auth_data`; its
    /// algorithm (and the body's `version`, if given) must stay the same.
    pub async fn update_backup_version(
        &self,
        user: &UserId,
        version: &str,
        algorithm: &Raw<BackupAlgorithm>,
    ) -> Result<()> {
        let body = parse_algorithm(algorithm)?;
        if body.version.as_ref().is_some_and(|v| v != version) {
            return Err(Error::invalid_param("The version in the body does not match the one in the path"));
        }
        let number = parse_version(version).ok_or_else(unknown_version)?;
        let auth_data = serde_json::to_string(&body.auth_data).map_err(Error::internal)?;
        match self.store.update_backup_version(user.as_str(), number, &body.algorithm, &auth_data).await? {
            None => Err(unknown_version()),
            Some(false) => Err(Error::invalid_param("The algorithm does not match the backup's algorithm")),
            Some(true) => Ok(()),
        }
    }

    /// `DELETE /room_keys/version/{version}`: the version and its keys. Deleting a
    /// version deleted before succeeds.
    pub async fn delete_backup_version(&self, user: &UserId, version: &str) -> Result<()> {
        let number = parse_version(version).ok_or_else(unknown_version)?;
        if self.store.delete_backup_version(user.as_str(), number).await? { Ok(()) } else { Err(unknown_version()) }
    }

    /// `PUT /room_keys/keys[/{roomId}[/{sessionId}]]`: stores keys into the current
    /// version, each kept only if better than the stored key of its session. Answers
    /// the version's new etag and key count.
    pub async fn add_backup_keys(
        &self,
        user: &UserId,
        version: &str,
        rooms: &BTreeMap<OwnedRoomId, BTreeMap<&str, &Raw<KeyBackupData>>>,
    ) -> Result<(String, UInt)> {
        let total: usize = rooms.values().map(BTreeMap::len).sum();
        if total > MAX_KEYS_PER_UPLOAD {
            return Err(Error::too_large(format!("At most {MAX_KEYS_PER_UPLOAD} keys per upload")));
        }
        let mut keys = Vec::with_capacity(total);
        for (room, sessions) in rooms {
            for (session, raw) in sessions {
                let meta: KeyMetadata = serde_json::from_str(raw.json().get())
                    .map_err(|e| Error::bad_json(format!("Invalid key data for session {session}: {e}")))?;
                keys.push(BackupKey {
                    room_id: room.as_str(),
                    session_id: session,
                    first_message_index: i64::from(meta.first_message_index),
                    forwarded_count: i64::from(meta.forwarded_count),
                    is_verified: meta.is_verified,
                    json: raw.json().get(),
                });
            }
        }
        match self.store.add_backup_keys(user.as_str(), parse_version(version), &keys).await? {
            Ok((etag, count)) => Ok((etag.to_string(), uint(count))),
            Err(BackupWriteRefused::NoBackup) => Err(unknown_version()),
            Err(BackupWriteRefused::WrongVersion(current)) => Err(Error::matrix(
                StatusCode::FORBIDDEN,
                ErrorKind::WrongRoomKeysVersion(WrongRoomKeysVersionErrorData::new(current.to_string())),
                format!("Keys can only be stored in the current backup version ({current})"),
            )),
        }
    }

    /// `GET /room_keys/keys[/{roomId}[/{sessionId}]]`: the version's keys in `scope`, by
    /// room and session.
    pub async fn get_backup_keys(
        &self,
        user: &UserId,
        version: &str,
        scope: BackupScope<'_>,
    ) -> Result<BTreeMap<OwnedRoomId, RoomKeyBackup>> {
        let number = parse_version(version).ok_or_else(unknown_version)?;
        let rows = self.store.get_backup_keys(user.as_str(), number, scope).await?.ok_or_else(unknown_version)?;
        let mut rooms: BTreeMap<OwnedRoomId, RoomKeyBackup> = BTreeMap::new();
        for (room, session, json) in rows {
            let room = OwnedRoomId::try_from(room).map_err(Error::internal)?;
            let data = Raw::from_json(RawValue::from_string(json).map_err(Error::internal)?);
            rooms.entry(room).or_insert_with(|| RoomKeyBackup::new(BTreeMap::new())).sessions.insert(session, data);
        }
        Ok(rooms)
    }

    /// `DELETE /room_keys/keys[/{roomId}[/{sessionId}]]`: answers the version's new etag
    /// and key count.
    pub async fn delete_backup_keys(
        &self,
        user: &UserId,
        version: &str,
        scope: BackupScope<'_>,
    ) -> Result<(String, UInt)> {
        let number = parse_version(version).ok_or_else(unknown_version)?;
        let (etag, count) =
            self.store.delete_backup_keys(user.as_str(), number, scope).await?.ok_or_else(unknown_version)?;
        Ok((etag.to_string(), uint(count)))
    }
}
