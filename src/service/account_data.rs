//! Account data: per-user JSON blobs, global or per room, that only the user sees.

use axum::http::StatusCode;
use ruma::{UserId, api::error::ErrorKind, serde::Raw};
use serde_json::value::RawValue;

use super::{Services, Session};
use crate::error::{Error, Result};

/// Types that clients may not set through the account data API: the server owns them.
const SERVER_MANAGED: [&str; 2] = ["m.fully_read", "m.push_rules"];

/// Longest account data type, in bytes (the spec's limit for event types).
const MAX_TYPE_BYTES: usize = 255;
/// Longest tag name, in bytes.
const MAX_TAG_BYTES: usize = 255;
/// Largest account data content (and a room's `m.tag`), in bytes.
const MAX_ACCOUNT_DATA_BYTES: usize = 65_536;

/// Refuses an empty name or one longer than `max` bytes (`M_INVALID_PARAM`).
fn check_name(what: &str, name: &str, max: usize) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid_param(format!("{what} must not be empty")));
    }
    if name.len() > max {
        return Err(Error::invalid_param(format!("{what} are {max} bytes at most")));
    }
    Ok(())
}

impl Services {
    pub async fn get_account_data<T>(
        &self,
        session: &Session,
        user_id: &UserId,
        room_id: &str,
        data_type: &str,
    ) -> Result<Raw<T>> {
        if user_id != session.user_id {
            return Err(Error::forbidden("You can only read your own account data"));
        }
        check_name("Account data types", data_type, MAX_TYPE_BYTES)?;
        let content = self
            .store
            .get_account_data(user_id.as_str(), room_id, data_type)
            .await?
            .ok_or_else(|| Error::not_found("No account data of that type"))?;
        let raw = RawValue::from_string(content).map_err(Error::internal)?;
        Ok(Raw::from_json(raw))
    }

    pub async fn set_account_data(
        &self,
        session: &Session,
        user_id: &UserId,
        room_id: &str,
        data_type: &str,
        content: &RawValue,
    ) -> Result<()> {
        if user_id != session.user_id {
            return Err(Error::forbidden("You can only set your own account data"));
        }
        check_name("Account data types", data_type, MAX_TYPE_BYTES)?;
        if SERVER_MANAGED.contains(&data_type) {
            return Err(Error::matrix(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorKind::BadJson,
                format!("{data_type} is managed by the server and cannot be set through the account data API"),
            ));
        }
        if !content.get().trim_start().starts_with('{') {
            return Err(Error::bad_json("Account data content must be a JSON object"));
        }
        if content.get().len() > MAX_ACCOUNT_DATA_BYTES {
            return Err(Error::too_large("Account data is 64 KiB at most"));
        }
        self.store.set_account_data(user_id.as_str(), room_id, data_type, content.get()).await?;
        self.notifier.notify_users(std::slice::from_ref(&session.user_id));
        Ok(())
    }
}

impl Services {
    /// The room's `m.tag` tags of the caller, as a JSON object.
    pub async fn get_tags(
        &self,
        session: &Session,
        user_id: &UserId,
        room_id: &ruma::RoomId,
    ) -> Result<serde_json::Value> {
        if user_id != session.user_id {
            return Err(Error::forbidden("You can only read your own tags"));
        }
        let content = self.store.get_account_data(user_id.as_str(), room_id.as_str(), "m.tag").await?;
        let content: serde_json::Value = match content {
            Some(c) => serde_json::from_str(&c).map_err(Error::internal)?,
            None => serde_json::json!({}),
        };
        Ok(content.get("tags").cloned().unwrap_or_else(|| serde_json::json!({})))
    }

    /// Adds (with `info`) or removes a tag: the room's `m.tag` is read, changed and
    /// written in one transaction, so concurrent changes do not undo each other.
    pub async fn set_tag(
        &self,
        session: &Session,
        user_id: &UserId,
        room_id: &ruma::RoomId,
        tag: &str,
        info: Option<serde_json::Value>,
    ) -> Result<()> {
        if user_id != session.user_id {
            return Err(Error::forbidden("You can only change your own tags"));
        }
        check_name("Tag names", tag, MAX_TAG_BYTES)?;
        let change = |current: Option<&str>| -> Result<Option<String>> {
            let mut content: serde_json::Value = match current {
                Some(c) => serde_json::from_str(c).map_err(Error::internal)?,
                None => serde_json::json!({}),
            };
            if !content.is_object() {
                content = serde_json::json!({});
            }
            if !content["tags"].is_object() {
                content["tags"] = serde_json::json!({});
            }
            let tags = content["tags"].as_object_mut().expect("made an object above");
            match info {
                Some(info) => {
                    tags.insert(tag.to_owned(), info);
                }
                None => {
                    tags.remove(tag);
                }
            }
            let content = content.to_string();
            if content.len() > MAX_ACCOUNT_DATA_BYTES {
                return Err(Error::too_large("A room's tags are 64 KiB at most"));
            }
            Ok(Some(content))
        };
        self.store.update_account_data(user_id.as_str(), room_id.as_str(), "m.tag", change).await?;
        self.notifier.notify_users(std::slice::from_ref(&session.user_id));
        Ok(())
    }
}
