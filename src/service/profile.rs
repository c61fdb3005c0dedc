//! Profiles: display name, avatar and the extended profile fields (spec 1.16).

use ruma::{UserId, profile::UserProfile};
use serde_json::Value as JsonValue;

use super::{Services, Session};
use crate::error::{Error, Result};

/// Largest serialized profile, as the spec suggests (64 KiB).
const MAX_PROFILE_BYTES: usize = 65_536;

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
        match (field, &value) {
            ("displayname", JsonValue::String(name)) if name.chars().count() > 256 => {
                return Err(Error::invalid_param("Display names are 256 characters at most"));
            }
            ("avatar_url", JsonValue::String(url)) if !url.is_empty() && !url.starts_with("mxc://") => {
                return Err(Error::invalid_param("avatar_url must be an mxc:// URI"));
            }
            _ => {}
        }
        if field.len() > 255 {
            return Err(Error::invalid_param("Profile field names are 255 bytes at most"));
        }
        let mut profile = self.store.get_profile(user_id.as_str()).await?.unwrap_or_default();
        profile.insert(field.to_owned(), value.clone());
        if serde_json::to_vec(&profile).map_err(Error::internal)?.len() > MAX_PROFILE_BYTES {
            return Err(Error::too_large("The profile would be larger than 64 KiB"));
        }
        if value.is_null() {
            self.store.delete_profile_field(user_id.as_str(), field).await?;
        } else {
            self.store.set_profile_field(user_id.as_str(), field, &value).await?;
        }
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
