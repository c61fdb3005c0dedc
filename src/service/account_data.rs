//! Account data: per-user JSON blobs, global or per room, that only the user sees.

use axum::http::StatusCode;
use ruma::{UserId, api::error::ErrorKind, serde::Raw};
use serde_json::value::RawValue;

use super::{Services, Session};
use crate::error::{Error, Result};

/// Types that clients may not set through the account data API: the server owns them.
const SERVER_MANAGED: [&str; 2] = ["m.fully_read", "m.push_rules"];

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
        if content.get().len() > 65_536 {
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

    /// Adds (with `info`) or removes a tag.
    pub async fn set_tag(
        &self,
        session: &Session,
        user_id: &UserId,
        room_id: &ruma::RoomId,
        tag: &str,
        info: Option<serde_json::Value>,
    ) -> Result<()> {
        let mut tags = self.get_tags(session, user_id, room_id).await?;
        let map = tags.as_object_mut().ok_or_else(|| Error::internal("m.tag is not an object"))?;
        match info {
            Some(info) => {
                map.insert(tag.to_owned(), info);
            }
            None => {
                map.remove(tag);
            }
        }
        let content = serde_json::json!({"tags": tags}).to_string();
        self.store.set_account_data(user_id.as_str(), room_id.as_str(), "m.tag", &content).await?;
        self.notifier.notify_users(std::slice::from_ref(&session.user_id));
        Ok(())
    }
}
