//! Notifications: each new room event is run through the push rules of the room's
//! local members (other than its sender); who it notifies, and for whom it highlights,
//! is recorded with the event (with the actions of the rule that matched), and `/sync`
//! counts those records after the user's read receipt (`storage/push.rs`).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use ruma::{
    Int, OwnedRoomId, OwnedUserId, RoomId, UInt, UserId,
    events::StateEventType,
    power_levels::NotificationPowerLevels,
    push::{Action, PushConditionPowerLevelsCtx, PushConditionRoomCtx, Ruleset},
    room_version_rules::{RoomPowerLevelsRules, RoomVersionRules},
    serde::Raw,
};
use serde_json::{Value as JsonValue, value::RawValue};

use super::{Services, rooms::pdu::Pdu};
use crate::{
    error::{Error, Result},
    storage::PushActionRow,
};

/// Rulesets of users who recently received events, so that every event does not
/// read each recipient's `m.push_rules` again. Dropped for a user whose rules change.
#[derive(Default)]
pub struct RulesetCache {
    users: Mutex<HashMap<OwnedUserId, Arc<Ruleset>>>,
}

/// Per room: the joined count and the local members' display names in the room.
pub struct RoomPushMembers {
    joined_count: UInt,
    names: HashMap<OwnedUserId, String>,
}

/// `RoomPushMembers` by room; dropped, like the member cache, on membership changes.
#[derive(Default)]
pub struct PushMembersCache {
    rooms: Mutex<HashMap<OwnedRoomId, Arc<RoomPushMembers>>>,
    generation: AtomicU64,
}

impl PushMembersCache {
    pub fn forget(&self, room_id: &RoomId) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        rooms.remove(room_id);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
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

    /// Evaluates a new event for each local member of its room (other than its
    /// sender): the members it notifies, with whether it highlights for them. `state`
    /// is the room state the event is authorized against (it holds the create and
    /// power levels events); the caller stores the result with the event.
    pub(crate) async fn push_actions_for(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        pdu_json: &str,
        state: &HashMap<(StateEventType, String), Pdu>,
        rules: &RoomVersionRules,
    ) -> Result<Vec<PushActionRow>> {
        let members = self.room_push_members(room_id).await?;
        if members.names.keys().all(|u| u.as_str() == sender.as_str()) {
            return Ok(Vec::new());
        }
        let event: Raw<JsonValue> =
            Raw::from_json(RawValue::from_string(pdu_json.to_owned()).map_err(Error::internal)?);
        let power_levels = push_power_levels(state, rules);
        let mut notified = Vec::new();
        for (user, name) in members.names.iter().filter(|(u, _)| u.as_str() != sender.as_str()) {
            let rules = self.cached_push_rules(user).await?;
            let mut ctx =
                PushConditionRoomCtx::new(room_id.to_owned(), members.joined_count, user.clone(), name.clone());
            ctx.power_levels = Some(power_levels.clone());
            let actions = rules.get_actions(&event, &ctx).await;
            if actions.iter().any(Action::should_notify) {
                notified.push(PushActionRow {
                    user_id: user.to_string(),
                    highlight: actions.iter().any(Action::is_highlight),
                    actions: serde_json::to_string(actions).map_err(Error::internal)?,
                });
            }
        }
        Ok(notified)
    }

    /// The room's joined count and its local members' display names, cached until the
    /// room's membership changes (see `forget_member_cache`).
    async fn room_push_members(&self, room_id: &RoomId) -> Result<Arc<RoomPushMembers>> {
        let generation = {
            let cache = self.push_members_cache.rooms.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(members) = cache.get(room_id) {
                return Ok(members.clone());
            }
            self.push_members_cache.generation.load(Ordering::Acquire)
        };
        let local = self.joined_local_members(room_id).await?;
        let (joined, _) = self.store.count_room_members(room_id.as_str()).await?;
        let users: Vec<&OwnedUserId> = local.iter().collect();
        let mut names = self.display_names(room_id, &users).await?;
        let members = Arc::new(RoomPushMembers {
            joined_count: UInt::new(joined.max(0) as u64).unwrap_or(UInt::MAX),
            names: local
                .iter()
                .map(|u| (u.clone(), names.remove(u.as_str()).unwrap_or_else(|| u.localpart().to_owned())))
                .collect(),
        });
        let mut cache = self.push_members_cache.rooms.lock().unwrap_or_else(|e| e.into_inner());
        if self.push_members_cache.generation.load(Ordering::Acquire) == generation {
            cache.insert(room_id.to_owned(), members.clone());
        }
        Ok(members)
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
}

/// The room's power levels as the push rule conditions need them, from the state the
/// event is checked against.
fn push_power_levels(
    state: &HashMap<(StateEventType, String), Pdu>,
    rules: &RoomVersionRules,
) -> PushConditionPowerLevelsCtx {
    let content = |kind: StateEventType| -> JsonValue {
        state
            .get(&(kind, String::new()))
            .and_then(|pdu| serde_json::from_str(pdu.content.get()).ok())
            .unwrap_or(JsonValue::Null)
    };
    let pl = content(StateEventType::RoomPowerLevels);
    let users: BTreeMap<OwnedUserId, Int> = serde_json::from_value(pl["users"].clone()).unwrap_or_default();
    let users_default = pl["users_default"].as_i64().and_then(Int::new).unwrap_or_default();
    let notifications: NotificationPowerLevels = serde_json::from_value(pl["notifications"].clone())
        .or_else(|_| serde_json::from_value(serde_json::json!({})))
        .expect("the defaults of NotificationPowerLevels deserialize from {}");
    let mut creators = Vec::new();
    if let Some(create) = state.get(&(StateEventType::RoomCreate, String::new())) {
        creators.push(create.sender.clone());
        if let Some(more) = content(StateEventType::RoomCreate)["additional_creators"].as_array() {
            creators.extend(more.iter().filter_map(|c| c.as_str()).filter_map(|c| OwnedUserId::try_from(c).ok()));
        }
    }
    PushConditionPowerLevelsCtx::new(
        users,
        users_default,
        notifications,
        RoomPowerLevelsRules::new(&rules.authorization, creators),
    )
}
