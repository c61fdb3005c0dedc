//! `createRoom`: the create event, the creator's join, power levels, presets, alias,
//! initial state, name, topic and invites, in the order the spec gives, built in memory
//! and stored in one transaction.

use std::collections::BTreeMap;

use ruma::{
    OwnedRoomAliasId, OwnedRoomId, OwnedUserId, RoomAliasId, RoomVersionId, UserId, events::TimelineEventType,
    room_version_rules::RoomVersionRules,
};
use serde_json::{Map, Value as JsonValue, json};

use super::{
    append::{LocalEvent, RoomHead, rules_for},
    build::{BuiltEvent, StateMap},
};
use crate::{
    error::{Error, Result},
    service::{Services, now_ms, rooms_supported},
    storage::{NewEvent, NewRoom, PushOutcome, RoomCreated},
};

/// `createRoom`, as the service sees it.
#[derive(Default)]
pub struct CreateRoom {
    pub preset: Option<String>,
    pub public: bool,
    pub name: Option<String>,
    pub topic: Option<String>,
    pub room_alias_name: Option<String>,
    pub invite: Vec<OwnedUserId>,
    pub is_direct: bool,
    /// (type, state key, content) of `initial_state`.
    pub initial_state: Vec<(String, String, JsonValue)>,
    pub power_level_content_override: Option<Map<String, JsonValue>>,
    pub creation_content: Option<Map<String, JsonValue>>,
    pub room_version: Option<RoomVersionId>,
}

/// Most users `createRoom` invites at once, and most `initial_state` events: a room is
/// built in memory and stored in one transaction, so both are bounded.
pub const MAX_CREATE_INVITES: usize = 100;
pub const MAX_INITIAL_STATE: usize = 100;

/// Attempts at a free room id: room version 12 names a room by its create event's
/// hash, so two identical `createRoom` calls in the same millisecond would collide.
const CREATE_ATTEMPTS: i64 = 5;

impl Services {
    /// `createRoom`: everything is checked first, then the room's events are built in
    /// memory, each checked against the auth rules, and stored in one transaction.
    /// A refused request leaves nothing behind.
    pub async fn create_room(&self, creator: &UserId, req: CreateRoom) -> Result<OwnedRoomId> {
        let version = req.room_version.clone().unwrap_or_else(|| self.config.rooms.default_room_version.clone());
        if !rooms_supported(&version) {
            return Err(Error::matrix(
                axum::http::StatusCode::BAD_REQUEST,
                ruma::api::error::ErrorKind::UnsupportedRoomVersion,
                format!("Room version {version} is not supported; use 6 to 12"),
            ));
        }
        let rules = rules_for(&version)?;
        if req.invite.len() > MAX_CREATE_INVITES {
            return Err(Error::invalid_param(format!("createRoom invites at most {MAX_CREATE_INVITES} users")));
        }
        if req.initial_state.len() > MAX_INITIAL_STATE {
            return Err(Error::invalid_param(format!("initial_state holds at most {MAX_INITIAL_STATE} events")));
        }
        let preset = match req.preset.as_deref() {
            Some(p @ ("private_chat" | "public_chat" | "trusted_private_chat")) => p.to_owned(),
            Some(other) => return Err(Error::bad_json(format!("Unknown preset {other}"))),
            None if req.public => "public_chat".into(),
            None => "private_chat".into(),
        };
        let alias = match &req.room_alias_name {
            Some(name) => Some(self.check_new_alias(name).await?),
            None => None,
        };
        let creator_profile = self.store.get_profile(creator.as_str()).await?.unwrap_or_default();
        // Users of other servers are invited once the room exists, through their servers.
        let (local_invites, remote_invites): (Vec<OwnedUserId>, Vec<OwnedUserId>) =
            req.invite.iter().cloned().partition(|u| u.server_name() == self.server_name());
        let mut invitee_profiles = Vec::with_capacity(local_invites.len());
        for invitee in &local_invites {
            match self.store.get_profile(invitee.as_str()).await? {
                Some(profile) => invitee_profiles.push(profile),
                None => return Err(Error::not_found(format!("No user {invitee} on this server"))),
            }
        }
        for (event_type, _, _) in &req.initial_state {
            if matches!(event_type.as_str(), "m.room.create" | "m.room.member") {
                return Err(Error::bad_json(format!("initial_state cannot contain {event_type}")));
            }
        }
        let trusted = preset == "trusted_private_chat";
        let creators_are_special = rules.authorization.explicitly_privilege_room_creators;

        // The create event's content.
        let mut create = req.creation_content.clone().unwrap_or_default();
        create.insert("room_version".into(), json!(version.as_str()));
        if !rules.authorization.use_room_create_sender {
            create.insert("creator".into(), json!(creator));
        } else {
            create.remove("creator");
        }
        if creators_are_special && trusted && !req.invite.is_empty() {
            create.insert("additional_creators".into(), json!(req.invite));
        }

        // The rest, in the order the spec gives: the creator's join, power levels (the
        // defaults, the preset, then the client's override), alias, presets' state,
        // initial_state, name, topic, then the invites.
        let mut users = Map::new();
        if !creators_are_special {
            users.insert(creator.to_string(), json!(100));
            if trusted {
                for invitee in &req.invite {
                    users.insert(invitee.to_string(), json!(100));
                }
            }
        }
        let mut power_levels = json!({
            "users": users,
            "users_default": 0,
            "events": {
                "m.room.name": 50, "m.room.avatar": 50, "m.room.topic": 50, "m.room.canonical_alias": 50,
                "m.room.power_levels": 100, "m.room.history_visibility": 100, "m.room.tombstone": 100,
                "m.room.server_acl": 100, "m.room.encryption": 100,
            },
            "events_default": 0,
            "state_default": 50,
            "ban": 50, "kick": 50, "redact": 50, "invite": 0,
            "notifications": {"room": 50},
        });
        if let Some(overrides) = &req.power_level_content_override {
            for (key, value) in overrides {
                power_levels[key] = value.clone();
            }
        }
        let mut state: Vec<(String, String, JsonValue)> =
            vec![("m.room.power_levels".into(), String::new(), power_levels)];
        if let Some(alias) = &alias {
            state.push(("m.room.canonical_alias".into(), String::new(), json!({"alias": alias})));
        }
        let join_rule = if preset == "public_chat" { "public" } else { "invite" };
        state.push(("m.room.join_rules".into(), String::new(), json!({"join_rule": join_rule})));
        state.push(("m.room.history_visibility".into(), String::new(), json!({"history_visibility": "shared"})));
        let guest_access = if preset == "public_chat" { "forbidden" } else { "can_join" };
        state.push(("m.room.guest_access".into(), String::new(), json!({"guest_access": guest_access})));
        for (event_type, state_key, content) in req.initial_state {
            upsert(&mut state, event_type, state_key, content);
        }
        if let Some(name) = req.name {
            upsert(&mut state, "m.room.name".into(), String::new(), json!({"name": name}));
        }
        if let Some(topic) = req.topic {
            upsert(&mut state, "m.room.topic".into(), String::new(), json!({"topic": topic}));
        }

        let mut events = vec![LocalEvent {
            sender: creator,
            kind: TimelineEventType::RoomMember,
            state_key: Some(creator.to_string()),
            content: JsonValue::Object(member_content("join", &creator_profile, false)),
            txn: None,
            redacts: None,
        }];
        events.extend(state.into_iter().map(|(event_type, state_key, content)| LocalEvent {
            sender: creator,
            kind: TimelineEventType::from(event_type.as_str()),
            state_key: Some(state_key),
            content,
            txn: None,
            redacts: None,
        }));
        events.extend(local_invites.iter().zip(&invitee_profiles).map(|(invitee, profile)| LocalEvent {
            sender: creator,
            kind: TimelineEventType::RoomMember,
            state_key: Some(invitee.to_string()),
            content: JsonValue::Object(member_content("invite", profile, req.is_direct)),
            txn: None,
            redacts: None,
        }));

        let mut ts = now_ms();
        for _ in 0..CREATE_ATTEMPTS {
            let (room_id, built) = self.build_room(creator, &rules, create.clone(), ts, &events)?;
            let _guard = self.room_locks.lock(&room_id).await;
            let room = NewRoom {
                room_id: room_id.as_str(),
                version: version.as_str(),
                creator: creator.as_str(),
                created_ts: ts,
                alias: alias.as_ref().map(|a| a.as_str()),
                published: req.public,
            };
            let types: Vec<String> = built.iter().map(|b| b.pdu.kind.to_string()).collect();
            let new_events: Vec<NewEvent<'_>> = built
                .iter()
                .zip(&types)
                .map(|(b, event_type)| NewEvent {
                    event_id: b.event_id.as_str(),
                    room_id: room_id.as_str(),
                    sender: creator.as_str(),
                    event_type,
                    state_key: b.pdu.state_key.as_deref(),
                    depth: b.depth,
                    origin_server_ts: b.pdu.origin_server_ts.get().into(),
                    json: &b.json,
                    prev_events: &b.prev_events,
                    membership: b.membership.as_deref(),
                    redactions: &[],
                    txn: None,
                    // Only the creator is joined, and nobody is notified of their own events.
                    push: PushOutcome::none(),
                    auth_events: &b.auth_events,
                    dag: Default::default(),
                })
                .collect();
            let (_positions, state_group) = match self.store.create_room(room, &new_events).await? {
                RoomCreated::Stored(positions, state_group) => (positions, state_group),
                RoomCreated::RoomIdTaken => {
                    // Another room took this id in the same millisecond: a later
                    // timestamp makes another id.
                    ts = now_ms().max(ts + 1);
                    continue;
                }
            };
            let last = built.last().expect("a room has events");
            self.room_heads
                .set(&room_id, RoomHead { extremities: vec![(last.event_id.to_string(), last.depth)], state_group });
            drop(_guard);
            self.forget_member_cache(&room_id);
            let mut to_wake = vec![creator.to_owned()];
            to_wake.extend(local_invites.iter().cloned());
            self.notifier.notify_users(&to_wake);
            tracing::info!(room_id = %room_id, creator = %creator, version = %version, "created a room");
            for invitee in &remote_invites {
                let content = member_content("invite", &BTreeMap::new(), req.is_direct);
                if let Err(e) = self.invite_remote_user(&room_id, creator, invitee, content).await {
                    // The room exists; the creator can invite again.
                    tracing::warn!(%room_id, %invitee, error = %e, "could not invite a user of another server");
                }
            }
            return Ok(room_id);
        }
        Err(Error::internal("no free room id after several attempts"))
    }

    /// Builds a new room's events in memory, each on top of the last and checked
    /// against the state the ones before it made: the create event, then `events`.
    fn build_room(
        &self,
        creator: &UserId,
        rules: &RoomVersionRules,
        create: Map<String, JsonValue>,
        ts: i64,
        events: &[LocalEvent<'_>],
    ) -> Result<(OwnedRoomId, Vec<BuiltEvent>)> {
        let (room_id, create) = self.build_create_event(creator, rules, create, ts)?;
        let mut state = StateMap::new();
        let mut built = vec![create];
        for event in events {
            let last = built.last().expect("the create event is first");
            if let Some(key) = last.state_entry() {
                state.insert(key, last.pdu.clone());
            }
            let prev = [(last.event_id.to_string(), last.depth)];
            built.push(self.build_event(&room_id, rules, &prev, event, &state)?);
        }
        Ok((room_id, built))
    }

    /// Checks that `#name:server` is free; `M_ROOM_IN_USE` if not.
    pub async fn check_new_alias(&self, localpart: &str) -> Result<OwnedRoomAliasId> {
        if localpart.is_empty() || localpart.contains(':') || localpart.chars().any(char::is_whitespace) {
            return Err(Error::invalid_param("An alias name may not be empty, nor contain ':' or spaces"));
        }
        let alias = RoomAliasId::parse(format!("#{localpart}:{}", self.server_name()))
            .map_err(|e| Error::invalid_param(format!("Invalid alias: {e}")))?;
        if self.store.get_room_alias(alias.as_str()).await?.is_some() {
            return Err(Error::room_in_use(format!("The alias {alias} is taken")));
        }
        Ok(alias)
    }
}

/// A member event's content, with the member's profile as clients expect it.
fn member_content(membership: &str, profile: &BTreeMap<String, JsonValue>, is_direct: bool) -> Map<String, JsonValue> {
    let mut content = Map::new();
    content.insert("membership".into(), json!(membership));
    for field in ["displayname", "avatar_url"] {
        if let Some(value) = profile.get(field) {
            content.insert(field.to_owned(), value.clone());
        }
    }
    if is_direct {
        content.insert("is_direct".into(), json!(true));
    }
    content
}

fn upsert(state: &mut Vec<(String, String, JsonValue)>, event_type: String, state_key: String, content: JsonValue) {
    match state.iter_mut().find(|(t, k, _)| *t == event_type && *k == state_key) {
        Some(entry) => entry.2 = content,
        None => state.push((event_type, state_key, content)),
    }
}
