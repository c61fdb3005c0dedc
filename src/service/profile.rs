//! Profiles: display name, avatar and the extended profile fields (spec 1.16).

use axum::http::StatusCode;
use ruma::{UserId, api::error::ErrorKind, profile::UserProfile};
use serde_json::Value as JsonValue;

use super::{Services, Session};
use crate::error::{Error, Result};

/// Largest serialized profile, as the spec says (64 KiB): `M_PROFILE_TOO_LARGE`.
const MAX_PROFILE_BYTES: usize = 65_536;
/// Longest profile field name, as the spec says (255 bytes): `M_KEY_TOO_LARGE`.
const MAX_FIELD_NAME_BYTES: usize = 255;
/// Longest display name, in characters.
const MAX_DISPLAYNAME_CHARS: usize = 256;
/// Longest avatar URL, in bytes.
const MAX_AVATAR_URL_BYTES: usize = 1024;

/// The rules for one field's name and value, before anything is stored.
fn check_profile_field(field: &str, value: &JsonValue) -> Result<()> {
    if field.is_empty() {
        return Err(Error::invalid_param("Profile field names must not be empty"));
    }
    if field.len() > MAX_FIELD_NAME_BYTES {
        return Err(Error::matrix(
            StatusCode::BAD_REQUEST,
            ErrorKind::KeyTooLarge,
            format!("Profile field names are {MAX_FIELD_NAME_BYTES} bytes at most"),
        ));
    }
    match (field, value) {
        (_, JsonValue::Null) => {}
        ("displayname", JsonValue::String(name)) if name.chars().count() > MAX_DISPLAYNAME_CHARS => {
            return Err(Error::invalid_param(format!("Display names are {MAX_DISPLAYNAME_CHARS} characters at most")));
        }
        ("avatar_url", JsonValue::String(url)) if url.len() > MAX_AVATAR_URL_BYTES => {
            return Err(Error::invalid_param(format!("avatar_url is {MAX_AVATAR_URL_BYTES} bytes at most")));
        }
        ("avatar_url", JsonValue::String(url)) if !url.is_empty() && !url.starts_with("mxc://") => {
            return Err(Error::invalid_param("avatar_url must be an mxc:// URI"));
        }
        ("displayname" | "avatar_url", v) if !v.is_string() => {
            return Err(Error::bad_json(format!("{field} must be a string")));
        }
        _ => {}
    }
    Ok(())
}

impl Services {
    /// A local user's whole profile; `M_NOT_FOUND` if there is no such user.
    pub async fn get_profile(&self, user_id: &UserId) -> Result<UserProfile> {
        let fields = self
            .store
            .get_profile(user_id.as_str())
            .await?
            .ok_or_else(|| Error::not_found("No such user on this server"))?;
        let mut profile = UserProfile::new();
        for (field, value) in fields {
            profile.set(field, value);
        }
        Ok(profile)
    }

    /// Sets one field of the caller's own profile.
    pub async fn set_profile_field(
        &self,
        session: &Session,
        user_id: &UserId,
        field: &str,
        value: JsonValue,
    ) -> Result<()> {
        if user_id != session.user_id {
            return Err(Error::forbidden("You can only change your own profile"));
        }
        check_profile_field(field, &value)?;
        let value = (!value.is_null()).then_some(value);
        self.store
            .update_profile_field(user_id.as_str(), field, value.as_ref(), |profile| {
                if serde_json::to_vec(profile).map_err(Error::internal)?.len() > MAX_PROFILE_BYTES {
                    return Err(Error::matrix(
                        StatusCode::BAD_REQUEST,
                        ErrorKind::ProfileTooLarge,
                        "The profile would be larger than 64 KiB",
                    ));
                }
                Ok(())
            })
            .await?;
        if matches!(field, "displayname" | "avatar_url") {
            self.propagate_profile(user_id).await?;
        }
        Ok(())
    }

    /// Members carry their name and avatar in each room: after a change, a new
    /// `m.room.member` join event in every joined room shows it to the others.
    async fn propagate_profile(&self, user_id: &UserId) -> Result<()> {
        for room_id in self.joined_rooms(user_id).await? {
            // `set_membership` fills in the profile.
            let mut content = serde_json::Map::new();
            content.insert("membership".into(), JsonValue::from("join"));
            if let Err(e) = self.set_membership(&room_id, user_id, user_id, content).await {
                tracing::warn!(room_id = %room_id, error = %e, "could not update the profile in a room");
            }
        }
        Ok(())
    }

    pub async fn delete_profile_field(&self, session: &Session, user_id: &UserId, field: &str) -> Result<()> {
        if user_id != session.user_id {
            return Err(Error::forbidden("You can only change your own profile"));
        }
        self.store.delete_profile_field(user_id.as_str(), field).await?;
        if matches!(field, "displayname" | "avatar_url") {
            self.propagate_profile(user_id).await?;
        }
        Ok(())
    }
}
