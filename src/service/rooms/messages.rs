//! Sending and reading room events: send (idempotent per device and transaction id),
//! state, redaction (with the room's power levels), single events, `/messages` and
//! `/context`, each filtered by history visibility.

use std::collections::HashMap;

use ruma::{DeviceId, EventId, OwnedEventId, RoomId, UserId, events::TimelineEventType};
use serde_json::{Value as JsonValue, json};

use super::append::LocalEvent;
use crate::{
    error::{Error, Result},
    service::Services,
    storage::StoredEvent,
};

/// What a user's membership history says about which events they may see.
pub struct Visibility {
    /// (stream position, membership) of the user's member events in the room.
    memberships: Vec<(i64, String)>,
    /// History visibility per state group.
    by_group: HashMap<i64, String>,
}

/// A page of `/messages`.
pub struct MessagesPage {
    pub chunk: Vec<StoredEvent>,
    pub start: String,
    pub end: Option<String>,
    pub state: Vec<StoredEvent>,
}

/// Simple event filter fields honoured by `/messages` and `/sync`.
#[derive(Default, Clone, Debug)]
pub struct EventFilter {
    pub types: Option<Vec<String>>,
    pub not_types: Vec<String>,
    pub senders: Option<Vec<String>>,
    pub not_senders: Vec<String>,
    pub lazy_load_members: bool,
}

impl EventFilter {
    pub fn matches(&self, e: &StoredEvent) -> bool {
        self.matches_type(&e.event_type) && self.matches_sender(&e.sender)
    }

    /// Whether an event type passes `types` and `not_types`.
    pub fn matches_type(&self, event_type: &str) -> bool {
        self.types.as_ref().is_none_or(|t| t.iter().any(|p| wildcard_match(p, event_type)))
            && !self.not_types.iter().any(|p| wildcard_match(p, event_type))
    }

    /// Whether a sender passes `senders` and `not_senders`.
    pub fn matches_sender(&self, sender: &str) -> bool {
        self.senders.as_ref().is_none_or(|s| s.iter().any(|x| x == sender))
            && !self.not_senders.iter().any(|x| x == sender)
    }

    /// Whether the filter can leave any event out.
    pub fn is_restrictive(&self) -> bool {
        self.types.is_some() || !self.not_types.is_empty() || self.senders.is_some() || !self.not_senders.is_empty()
    }
}

/// Matches a filter's type pattern, in which `*` stands for any run of characters.
fn wildcard_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    // The position after the last `*` seen, and where in the text it began to match.
    let (mut pi, mut ti, mut star) = (0, 0, None);
    while ti < t.len() {
        if p.get(pi) == Some(&b'*') {
            star = Some((pi + 1, ti));
            pi += 1;
        } else if p.get(pi) == Some(&t[ti]) {
            pi += 1;
            ti += 1;
        } else if let Some((after, from)) = star {
            // Let the last `*` swallow one more character and try again.
            pi = after;
            ti = from + 1;
            star = Some((after, from + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Reads the stream position out of a pagination or sync token (`s12_3`, `t12`, `12`).
pub fn parse_position(token: &str) -> Result<i64> {
    token
        .trim_start_matches(['s', 't'])
        .split('_')
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| Error::invalid_param("Invalid pagination token"))
}

/// The membership a stored member event sets (empty if none).
pub(crate) fn membership_of(json: &str) -> String {
    serde_json::from_str::<JsonValue>(json)
        .ok()
        .and_then(|v| v["content"]["membership"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

impl Services {
    /// `PUT /rooms/{roomId}/send/{eventType}/{txnId}`.
    pub async fn send_message(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        device: &DeviceId,
        event_type: &str,
        txn_id: &str,
        content: JsonValue,
    ) -> Result<OwnedEventId> {
        // A retried transaction id is caught by the unique index on (sender, device,
        // txn id) when the event is stored, and answered below with the first event.
        // No separate membership check: the auth rules refuse events from non-members
        // (M_FORBIDDEN), from the state `append_event` reads anyway. An unknown room
        // looks the same as one the user is not in.
        match self.room_version(room_id).await {
            Err(Error::Matrix { status: axum::http::StatusCode::NOT_FOUND, .. }) => {
                return Err(Error::forbidden("You are not in this room"));
            }
            other => other.map(drop)?,
        }
        let appended = self
            .append_event(
                room_id,
                LocalEvent {
                    sender,
                    kind: TimelineEventType::from(event_type),
                    state_key: None,
                    content,
                    txn: Some((device, txn_id)),
                    redacts: None,
                },
            )
            .await;
        match appended {
            Ok(a) => Ok(a.event_id),
            Err(e) => match self.store.find_txn_event(sender.as_str(), device.as_str(), txn_id).await? {
                // A concurrent retry with the same transaction id won the race.
                Some(existing) => OwnedEventId::try_from(existing).map_err(Error::internal),
                None => Err(e),
            },
        }
    }

    /// `PUT /rooms/{roomId}/state/{eventType}/{stateKey}`. Setting the same content
    /// again returns the existing event.
    pub async fn send_state(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        event_type: &str,
        state_key: &str,
        content: JsonValue,
    ) -> Result<OwnedEventId> {
        if event_type == "m.room.member" {
            return Err(Error::bad_json("Use the membership endpoints to change m.room.member"));
        }
        if event_type == "m.room.canonical_alias" {
            self.check_canonical_alias(room_id, &content).await?;
        }
        if let Some(current) = self.store.get_current_state_event(room_id.as_str(), event_type, state_key).await? {
            let stored: JsonValue = serde_json::from_str(&current.json).map_err(Error::internal)?;
            if stored["content"] == content && stored["sender"] == sender.as_str() {
                return OwnedEventId::try_from(current.event_id).map_err(Error::internal);
            }
        }
        let appended = self
            .append_event(
                room_id,
                LocalEvent {
                    sender,
                    kind: TimelineEventType::from(event_type),
                    state_key: Some(state_key.to_owned()),
                    content,
                    txn: None,
                    redacts: None,
                },
            )
            .await?;
        Ok(appended.event_id)
    }

    /// A user's power level in a room (creators of v12 rooms rank above everyone).
    pub async fn power_level(&self, room_id: &RoomId, user: &UserId) -> Result<(i64, JsonValue)> {
        let pl = match self.store.get_current_state_event(room_id.as_str(), "m.room.power_levels", "").await? {
            Some(e) => serde_json::from_str::<JsonValue>(&e.json).map_err(Error::internal)?["content"].take(),
            None => json!({}),
        };
        let create = self
            .store
            .get_current_state_event(room_id.as_str(), "m.room.create", "")
            .await?
            .ok_or_else(|| Error::not_found("Unknown room"))?;
        let create_json: JsonValue = serde_json::from_str(&create.json).map_err(Error::internal)?;
        let version = self.room_version(room_id).await?;
        let rules = super::append::rules_for(&version)?;
        if rules.authorization.explicitly_privilege_room_creators {
            let additional = create_json["content"]["additional_creators"].as_array().cloned().unwrap_or_default();
            if create.sender == user.as_str() || additional.iter().any(|c| c == user.as_str()) {
                return Ok((i64::MAX, pl));
            }
        }
        let level = pl["users"][user.as_str()].as_i64().or_else(|| pl["users_default"].as_i64()).unwrap_or_else(|| {
            // Without power levels the creator has 100.
            if pl.as_object().is_none_or(|o| o.is_empty()) && create.sender == user.as_str() { 100 } else { 0 }
        });
        Ok((level, pl))
    }

    /// `PUT /rooms/{roomId}/redact/{eventId}/{txnId}`.
    pub async fn redact_event(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        device: &DeviceId,
        target: &EventId,
        txn_id: &str,
        reason: Option<String>,
    ) -> Result<OwnedEventId> {
        // A retried transaction id is caught by the unique index on (sender, device,
        // txn id) when the event is stored, and answered below with the first event.
        self.require_joined(room_id, sender).await?;
        let event = self.store.get_event(target.as_str()).await?;
        let event = event
            .filter(|e| e.room_id == room_id.as_str())
            .ok_or_else(|| Error::not_found("No such event in this room"))?;
        if event.sender != sender.as_str() {
            let (level, pl) = self.power_level(room_id, sender).await?;
            let needed = pl["redact"].as_i64().unwrap_or(50);
            if level < needed {
                return Err(Error::forbidden("You may only redact your own events here"));
            }
        }
        let mut content = serde_json::Map::new();
        if let Some(reason) = reason {
            content.insert("reason".into(), json!(reason));
        }
        let appended = self
            .append_event(
                room_id,
                LocalEvent {
                    sender,
                    kind: TimelineEventType::RoomRedaction,
                    state_key: None,
                    content: JsonValue::Object(content),
                    txn: Some((device, txn_id)),
                    redacts: Some(target.to_owned()),
                },
            )
            .await?;
        Ok(appended.event_id)
    }

    /// Loads what decides which events of a room `user` may see.
    pub async fn visibility_for(&self, room_id: &RoomId, user: &UserId) -> Result<Visibility> {
        let memberships = self
            .store
            .get_member_events_of(room_id.as_str(), user.as_str())
            .await?
            .into_iter()
            .map(|(pos, json)| (pos, membership_of(&json)))
            .collect();
        Ok(Visibility { memberships, by_group: HashMap::new() })
    }

    /// Whether `user` may see `event`, by the room's history visibility at the event.
    pub async fn may_see(&self, vis: &mut Visibility, user: &UserId, event: &StoredEvent) -> Result<bool> {
        // One's own membership events are always visible.
        if event.event_type == "m.room.member" && event.state_key.as_deref() == Some(user.as_str()) {
            return Ok(true);
        }
        let membership_at = vis
            .memberships
            .iter()
            .rev()
            .find(|(pos, _)| *pos < event.stream_ordering)
            .map(|(_, m)| m.as_str())
            .unwrap_or("leave");
        if membership_at == "join" {
            return Ok(true);
        }
        let group = self.state_group_before(event).await?.unwrap_or(event.state_group);
        let history = match vis.by_group.get(&group) {
            Some(h) => h.clone(),
            None => {
                let h = match self.state_event_at(group, "m.room.history_visibility", "").await? {
                    Some(e) => serde_json::from_str::<JsonValue>(&e.json).map_err(Error::internal)?["content"]["history_visibility"]
                        .as_str()
                        .unwrap_or("shared")
                        .to_owned(),
                    None => "shared".to_owned(),
                };
                vis.by_group.insert(group, h.clone());
                h
            }
        };
        Ok(match history.as_str() {
            "world_readable" => true,
            "invited" => membership_at == "invite",
            "joined" => false,
            // `shared` and anything unknown: visible if the user joined at any point after.
            _ => vis.memberships.iter().any(|(pos, m)| *pos >= event.stream_ordering && m == "join"),
        })
    }

    /// `GET /rooms/{roomId}/event/{eventId}`.
    pub async fn get_event_for(&self, room_id: &RoomId, user: &UserId, event_id: &EventId) -> Result<StoredEvent> {
        let event = self.store.get_event(event_id.as_str()).await?;
        let event = event.filter(|e| e.room_id == room_id.as_str()).ok_or_else(|| Error::not_found("No such event"))?;
        let mut vis = self.visibility_for(room_id, user).await?;
        if vis.memberships.is_empty() || !self.may_see(&mut vis, user, &event).await? {
            return Err(Error::not_found("No such event, or you may not see it"));
        }
        Ok(event)
    }

    /// `GET /rooms/{roomId}/messages`.
    pub async fn messages(
        &self,
        room_id: &RoomId,
        user: &UserId,
        from: Option<&str>,
        to: Option<&str>,
        backwards: bool,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<MessagesPage> {
        let mut vis = self.visibility_for(room_id, user).await?;
        if vis.memberships.is_empty() {
            return Err(Error::forbidden("You are not a member of this room"));
        }
        let limit = limit.clamp(1, 1000);
        let head = self.store.current_stream_position().await?;
        let from_pos = match from {
            Some(token) => parse_position(token)?,
            None if backwards => head,
            None => 0,
        };
        let to_pos = to.map(parse_position).transpose()?;
        let mut chunk = Vec::new();
        let mut cursor = from_pos;
        let mut exhausted = false;
        while chunk.len() < limit && !exhausted {
            let batch = if backwards {
                let floor = to_pos.unwrap_or(0);
                self.store.get_room_events(room_id.as_str(), floor, cursor, (limit * 2) as i64, true).await?
            } else {
                let ceiling = to_pos.unwrap_or(head);
                self.store.get_room_events(room_id.as_str(), cursor, ceiling, (limit * 2) as i64, false).await?
            };
            exhausted = batch.len() < limit * 2;
            for event in batch {
                cursor = if backwards { event.stream_ordering - 1 } else { event.stream_ordering };
                if filter.matches(&event) && self.may_see(&mut vis, user, &event).await? {
                    chunk.push(event);
                    if chunk.len() == limit {
                        break;
                    }
                }
            }
        }
        // A full page may have more behind it; a short one means the range is exhausted.
        let end = (chunk.len() == limit).then(|| format!("t{cursor}"));
        let state = if filter.lazy_load_members { self.member_events_for(room_id, &chunk).await? } else { Vec::new() };
        Ok(MessagesPage { chunk, start: format!("t{from_pos}"), end, state })
    }

    /// The current member events of the senders of `events` (lazy-loading members).
    pub async fn member_events_for(&self, room_id: &RoomId, events: &[StoredEvent]) -> Result<Vec<StoredEvent>> {
        let mut senders: Vec<&str> = events.iter().map(|e| e.sender.as_str()).collect();
        senders.sort_unstable();
        senders.dedup();
        let keys: Vec<(String, String)> =
            senders.iter().map(|s| ("m.room.member".to_owned(), (*s).to_owned())).collect();
        self.store.get_current_state_entries(room_id.as_str(), &keys).await
    }

    /// `GET /rooms/{roomId}/context/{eventId}`: events before and after, visible ones only.
    pub async fn context(
        &self,
        room_id: &RoomId,
        user: &UserId,
        event_id: &EventId,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<(StoredEvent, MessagesPage, MessagesPage, Vec<StoredEvent>)> {
        let event = self.get_event_for(room_id, user, event_id).await?;
        let half = limit / 2;
        let before = self
            .messages(room_id, user, Some(&format!("t{}", event.stream_ordering - 1)), None, true, half.max(1), filter)
            .await?;
        let after = self
            .messages(
                room_id,
                user,
                Some(&format!("t{}", event.stream_ordering)),
                None,
                false,
                (limit - half).max(1),
                filter,
            )
            .await?;
        let state = self.room_state_for(room_id, user).await?;
        Ok((event, before, after, state))
    }

    /// Validates `m.room.canonical_alias`: every alias must point at this room.
    async fn check_canonical_alias(&self, room_id: &RoomId, content: &JsonValue) -> Result<()> {
        let mut aliases: Vec<&str> = Vec::new();
        if let Some(a) = content.get("alias").and_then(|a| a.as_str()) {
            aliases.push(a);
        }
        if let Some(alt) = content.get("alt_aliases").and_then(|a| a.as_array()) {
            aliases.extend(alt.iter().filter_map(|a| a.as_str()));
        }
        for alias in aliases {
            ruma::RoomAliasId::parse(alias).map_err(|e| Error::invalid_param(format!("Invalid alias {alias}: {e}")))?;
            match self.store.get_room_alias(alias).await? {
                Some((target, _)) if target == room_id.as_str() => {}
                _ => {
                    return Err(Error::matrix(
                        axum::http::StatusCode::BAD_REQUEST,
                        ruma::api::error::ErrorKind::BadAlias,
                        format!("{alias} does not point to this room"),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::wildcard_match;

    #[test]
    fn wildcards_match_any_run_of_characters() {
        for (pattern, text, expected) in [
            ("m.room.message", "m.room.message", true),
            ("m.room.message", "m.room.messages", false),
            ("m.room.*", "m.room.name", true),
            ("m.room.*", "m.room.", true),
            ("m.*.name", "m.room.name", true),
            ("m.*.name", "m.room.topic", false),
            ("*", "anything", true),
            ("*a*b", "xxaxxbyb", true),
            ("*a*b", "xxaxxbyc", false),
            ("org.example.ping", "org.example.pin", false),
            ("", "", true),
            ("", "x", false),
        ] {
            assert_eq!(wildcard_match(pattern, text), expected, "{pattern} ~ {text}");
        }
    }
}
