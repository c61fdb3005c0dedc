//! Notifications: each new room event is run through the push rules of the room's
//! local members (other than its sender); who it notifies, and for whom it highlights,
//! is recorded, and `/sync` counts those records after the user's read receipt.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use ruma::{
    EventId, Int, OwnedUserId, RoomId, UInt, UserId,
    api::client::sync::sync_events::UnreadNotificationsCount,
    power_levels::NotificationPowerLevels,
    push::{Action, PushConditionPowerLevelsCtx, PushConditionRoomCtx, Ruleset},
    room_version_rules::RoomPowerLevelsRules,
    serde::Raw,
};
use serde_json::{Value as JsonValue, value::RawValue};

use super::Services;
use crate::error::{Error, Result};

/// Rulesets of users who recently received events, so that every event does not
/// read each recipient's `m.push_rules` again. Dropped for a user whose rules change.
#[derive(Default)]
pub struct RulesetCache {
    users: Mutex<HashMap<OwnedUserId, Arc<Ruleset>>>,
}

/// Cached rulesets at most; the cache starts over beyond this (memory stays bounded).
const RULESET_CACHE_MAX: usize = 4096;

/// Member events looked up per query when collecting display names.
const MEMBER_CHUNK: usize = 200;

impl RulesetCache {
    pub fn forget(&self, user: &UserId) {
        self.users.lock().unwrap_or_else(|e| e.into_inner()).remove(user);
    }
}

impl Services {
    async fn cached_push_rules(&self, user: &UserId) -> Result<Arc<Ruleset>> {
        if let Some(rules) = self.ruleset_cache.users.lock().unwrap_or_else(|e| e.into_inner()).get(user) {
            return Ok(rules.clone());
        }
        let rules = Arc::new(self.push_rules(user).await?);
        let mut cache = self.ruleset_cache.users.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= RULESET_CACHE_MAX {
            cache.clear();
        }
        cache.insert(user.to_owned(), rules.clone());
        Ok(rules)
    }

    /// Evaluates a new event for each local member of its room and records the
    /// events that notify them.
    pub(crate) async fn record_push_actions(
        &self,
        room_id: &RoomId,
        event_id: &EventId,
        stream_pos: i64,
        sender: &UserId,
        pdu_json: &str,
    ) -> Result<()> {
        let members = self.joined_local_members(room_id).await?;
        let recipients: Vec<&OwnedUserId> = members.iter().filter(|u| u.as_str() != sender.as_str()).collect();
        if recipients.is_empty() {
            return Ok(());
        }
        let event: Raw<JsonValue> =
            Raw::from_json(RawValue::from_string(pdu_json.to_owned()).map_err(Error::internal)?);
        let (joined, _) = self.store.count_room_members(room_id.as_str()).await?;
        let member_count = UInt::new(joined.max(0) as u64).unwrap_or(UInt::MAX);
        let power_levels = self.push_power_levels(room_id).await?;
        let names = self.display_names(room_id, &recipients).await?;

        let mut notified = Vec::new();
        for user in recipients {
            let rules = self.cached_push_rules(user).await?;
            let mut ctx = PushConditionRoomCtx::new(
                room_id.to_owned(),
                member_count,
                user.clone(),
                names.get(user.as_str()).cloned().unwrap_or_else(|| user.localpart().to_owned()),
            );
            ctx.power_levels = Some(power_levels.clone());
            let actions = rules.get_actions(&event, &ctx).await;
            if actions.iter().any(Action::should_notify) {
                notified.push((user.to_string(), actions.iter().any(Action::is_highlight)));
            }
        }
        if !notified.is_empty() {
            self.store.insert_push_actions(room_id.as_str(), event_id.as_str(), stream_pos, &notified).await?;
        }
        Ok(())
    }

    /// The room's power levels as the push rule conditions need them.
    async fn push_power_levels(&self, room_id: &RoomId) -> Result<PushConditionPowerLevelsCtx> {
        let pl: JsonValue =
            match self.store.get_current_state_event(room_id.as_str(), "m.room.power_levels", "").await? {
                Some(e) => serde_json::from_str::<JsonValue>(&e.json).map_err(Error::internal)?["content"].take(),
                None => JsonValue::Null,
            };
        let users: BTreeMap<OwnedUserId, Int> = serde_json::from_value(pl["users"].clone()).unwrap_or_default();
        let users_default = pl["users_default"].as_i64().and_then(|v| Int::new(v)).unwrap_or_default();
        let notifications: NotificationPowerLevels = serde_json::from_value(pl["notifications"].clone())
            .or_else(|_| serde_json::from_value(serde_json::json!({})))
            .map_err(Error::internal)?;
        let version = self.room_version(room_id).await?;
        let rules = super::rooms::append::rules_for(&version)?;
        let mut creators = Vec::new();
        if let Some(create) = self.store.get_current_state_event(room_id.as_str(), "m.room.create", "").await? {
            let json: JsonValue = serde_json::from_str(&create.json).map_err(Error::internal)?;
            creators.extend(OwnedUserId::try_from(create.sender.as_str()).ok());
            if let Some(more) = json["content"]["additional_creators"].as_array() {
                creators.extend(more.iter().filter_map(|c| c.as_str()).filter_map(|c| OwnedUserId::try_from(c).ok()));
            }
        }
        Ok(PushConditionPowerLevelsCtx::new(
            users,
            users_default,
            notifications,
            RoomPowerLevelsRules::new(&rules.authorization, creators),
        ))
    }

    /// The display names that users have in a room (from their member events).
    async fn display_names(&self, room_id: &RoomId, users: &[&OwnedUserId]) -> Result<HashMap<String, String>> {
        let mut names = HashMap::with_capacity(users.len());
        for chunk in users.chunks(MEMBER_CHUNK) {
            let keys: Vec<(String, String)> =
                chunk.iter().map(|u| ("m.room.member".to_owned(), u.to_string())).collect();
            for event in self.store.get_current_state_entries(room_id.as_str(), &keys).await? {
                let json: JsonValue = serde_json::from_str(&event.json).map_err(Error::internal)?;
                if let (Some(user), Some(name)) = (event.state_key, json["content"]["displayname"].as_str()) {
                    names.insert(user, name.to_owned());
                }
            }
        }
        Ok(names)
    }

    /// A room's unread counts for a user: events that notify the user after their
    /// latest read receipt (or after their join, before any receipt).
    pub(crate) async fn unread_counts(&self, room_id: &RoomId, user: &UserId) -> Result<UnreadNotificationsCount> {
        let after = match self.store.get_read_position(room_id.as_str(), user.as_str()).await? {
            Some(pos) => pos,
            None => self.membership(room_id, user).await?.map(|m| m.stream_ordering).unwrap_or(0),
        };
        let (notifications, highlights) =
            self.store.count_notifications(room_id.as_str(), user.as_str(), after).await?;
        let mut counts = UnreadNotificationsCount::new();
        counts.notification_count = UInt::new(notifications.max(0) as u64);
        counts.highlight_count = UInt::new(highlights.max(0) as u64);
        Ok(counts)
    }
}
