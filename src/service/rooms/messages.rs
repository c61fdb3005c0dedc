//! Sending and reading room events: send (idempotent per device and transaction id),
//! state, redaction (with the room's power levels), single events, `/messages` and
//! `/context`, each filtered by history visibility.

use ruma::{DeviceId, EventId, OwnedEventId, RoomId, UserId, events::TimelineEventType};
use serde_json::{Value as JsonValue, json};

use super::append::{ClientTxn, LocalEvent};
use crate::{
    error::{Error, Result},
    service::Services,
    storage::StoredEvent,
};

/// A page of `/messages`.
pub struct MessagesPage {
    pub chunk: Vec<StoredEvent>,
    pub start: String,
    pub end: Option<String>,
    pub state: Vec<StoredEvent>,
}

/// Most events one `/messages` request reads, whatever its filter matches.
const MAX_SCANNED: usize = 5_000;

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

/// Reads the stream position out of a pagination or sync token (`s12_3`, `t12`, `12`,
/// or a topological `t4-12`).
pub fn parse_position(token: &str) -> Result<i64> {
    match parse_token(token)? {
        Token::Stream(pos) | Token::Topological(_, pos) => Ok(pos),
    }
}

/// A pagination token: a stream position (sync tokens `s12_3`, and `t12` or `12` as
/// `/messages` gave them before it paged by topology), or a topological position
/// `t{depth}-{stream}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token {
    Stream(i64),
    Topological(i64, i64),
}

pub fn parse_token(token: &str) -> Result<Token> {
    let invalid = || Error::invalid_param("Invalid pagination token");
    if let Some(rest) = token.strip_prefix('t')
        && let Some((depth, stream)) = rest.split_once('-')
    {
        return Ok(Token::Topological(depth.parse().map_err(|_| invalid())?, stream.parse().map_err(|_| invalid())?));
    }
    token
        .trim_start_matches(['s', 't'])
        .split('_')
        .next()
        .and_then(|n| n.parse().ok())
        .map(Token::Stream)
        .ok_or_else(invalid)
}

fn topological_token((depth, stream): (i64, i64)) -> String {
    format!("t{depth}-{stream}")
}

/// Below every topological position (depths start at 1).
const BOTTOM: (i64, i64) = (0, i64::MIN);

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
        // Transaction ids are scoped to the device and the endpoint's path. A retry is
        // answered with the first event: the unique index refuses to store it again
        // (`append_event` then answers with the first), and a retry that can no longer be
        // built (the sender has left since) finds the first below. The first send of a
        // transaction id, the usual case, costs no lookup.
        let scope = format!("send/{room_id}/{event_type}");
        let sent = async {
            // No separate membership check: the auth rules refuse events from
            // non-members (M_FORBIDDEN), from the state `append_event` reads anyway. An
            // unknown room looks the same as one the user is not in.
            match self.room_version(room_id).await {
                Err(Error::Matrix { status: axum::http::StatusCode::NOT_FOUND, .. }) => {
                    return Err(Error::forbidden("You are not in this room"));
                }
                other => other.map(drop)?,
            }
            self.check_thread_root(room_id, &content).await?;
            let event = LocalEvent {
                sender,
                kind: TimelineEventType::from(event_type),
                state_key: None,
                content,
                txn: Some(ClientTxn { device_id: device, scope: scope.clone(), txn_id }),
                redacts: None,
            };
            self.append_event(room_id, event).await
        };
        match sent.await {
            Ok(appended) => Ok(appended.event_id),
            Err(e) => match self.store.find_txn_event(sender.as_str(), device.as_str(), &scope, txn_id).await? {
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
        let version = self.room_version(room_id).await?;
        let rules = super::append::rules_for(&version)?;
        Ok((user_power_level(&create, &pl, user, &rules)?, pl))
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
        let scope = format!("redact/{room_id}/{target}");
        if let Some(existing) = self.store.find_txn_event(sender.as_str(), device.as_str(), &scope, txn_id).await? {
            return OwnedEventId::try_from(existing).map_err(Error::internal);
        }
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
                    txn: Some(ClientTxn { device_id: device, scope, txn_id }),
                    redacts: Some(target.to_owned()),
                },
            )
            .await?;
        Ok(appended.event_id)
    }

    /// `GET /rooms/{roomId}/event/{eventId}`.
    pub async fn get_event_for(&self, room_id: &RoomId, user: &UserId, event_id: &EventId) -> Result<StoredEvent> {
        let event = self.store.get_event(event_id.as_str()).await?;
        // Outliers, rejected and soft-failed events (outside the stream) are not shown.
        let event = event
            .filter(|e| e.room_id == room_id.as_str() && e.position.is_some())
            .ok_or_else(|| Error::not_found("No such event"))?;
        let vis = self.visibility_for(room_id, user).await?;
        if vis.memberships.is_empty()
            || !vis.may_see(user, &event)
            || !self.visible_by_state(user, &vis, &[&event]).await?.contains(&event.event_id)
        {
            return Err(Error::not_found("No such event, or you may not see it"));
        }
        Ok(event)
    }

    /// `GET /rooms/{roomId}/messages`. Reads only the stretches of history the user may
    /// see, and at most `MAX_SCANNED` events per request: a page that stops short of
    /// `limit` for that reason still carries an `end` token to go on from.
    #[allow(clippy::too_many_arguments)]
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
        let page = self.messages_here(room_id, user, from, to, backwards, limit, filter).await?;
        if !backwards || page.end.is_some() || to.is_some() {
            return Ok(page);
        }
        // The start of what this server has: a room joined late has older history on
        // the servers that were there.
        match self.backfill_room(room_id).await {
            Ok(0) => Ok(page),
            Ok(_) => self.messages_here(room_id, user, from, to, backwards, limit, filter).await,
            Err(e) => {
                tracing::info!(%room_id, error = %e, "could not backfill");
                Ok(page)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn messages_here(
        &self,
        room_id: &RoomId,
        user: &UserId,
        from: Option<&str>,
        to: Option<&str>,
        backwards: bool,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<MessagesPage> {
        let vis = self.visibility_for(room_id, user).await?;
        if vis.memberships.is_empty() {
            return Err(Error::forbidden("You are not a member of this room"));
        }
        let limit = limit.clamp(1, 1000);
        let from_pos = match from {
            Some(token) => self.topological(room_id, parse_token(token)?).await?,
            None if backwards => (i64::MAX, i64::MAX),
            None => BOTTOM,
        };
        let to_pos = match to {
            Some(token) => Some(self.topological(room_id, parse_token(token)?).await?),
            None => None,
        };
        // Only the stretches of the stream the user may see are read (a handful: they
        // change only at the user's member events and visibility changes).
        let ranges = vis.visible_ranges();
        let ranges: &[(i64, i64)] = if ranges.len() <= 50 { &ranges } else { &[] };
        let mut chunk = Vec::new();
        let mut cursor = from_pos;
        let mut scanned = 0;
        let mut cut_short = false;
        while chunk.len() < limit {
            if scanned >= MAX_SCANNED {
                cut_short = true;
                break;
            }
            // A page where everything is visible takes one read of `limit` events; one
            // that skips some reads twice as many at a time after the first.
            let wanted = if scanned == 0 { limit } else { limit * 2 };
            let batch_size = wanted.min(MAX_SCANNED - scanned) as i64;
            let batch = self
                .store
                .get_room_events_topological(room_id.as_str(), cursor, to_pos, ranges, batch_size, backwards)
                .await?;
            scanned += batch.len();
            let exhausted = (batch.len() as i64) < batch_size;
            let candidates: Vec<&StoredEvent> =
                batch.iter().filter(|e| filter.matches(e) && vis.may_see(user, e)).collect();
            let visible = self.visible_by_state(user, &vis, &candidates).await?;
            for event in batch {
                let at = (event.depth, event.stream_ordering);
                // Backwards, the next page starts just below this event.
                cursor = if backwards { (at.0, at.1 - 1) } else { at };
                if visible.contains(&event.event_id) {
                    chunk.push(event);
                    if chunk.len() == limit {
                        break;
                    }
                }
            }
            if exhausted {
                break;
            }
        }
        // A full page may have more behind it; a short one means the room's history is
        // exhausted, unless the scan stopped at its bound.
        let end = (chunk.len() == limit || cut_short).then(|| topological_token(cursor));
        let state = if filter.lazy_load_members { self.member_events_for(room_id, &chunk).await? } else { Vec::new() };
        let start = match from {
            Some(token) => token.to_owned(),
            // Now, as a stream token: paging forwards from it later finds what came after.
            None if backwards => format!("t{}", self.store.current_stream_position().await?),
            None => topological_token(from_pos),
        };
        Ok(MessagesPage { chunk, start, end, state })
    }

    /// The topological position of a token: a stream token stands for the room's latest
    /// event at or before it.
    async fn topological(&self, room_id: &RoomId, token: Token) -> Result<(i64, i64)> {
        match token {
            Token::Topological(depth, stream) => Ok((depth, stream)),
            Token::Stream(pos) => {
                Ok(self.store.get_topological_position(room_id.as_str(), pos).await?.unwrap_or(BOTTOM))
            }
        }
    }

    /// The current member events of the senders of `events` (lazy-loading members).
    pub async fn member_events_for(&self, room_id: &RoomId, events: &[StoredEvent]) -> Result<Vec<StoredEvent>> {
        let senders: Vec<&str> = events.iter().map(|e| e.sender.as_str()).collect();
        self.member_events_of(room_id, senders).await
    }

    /// The current member events of `users` (repeats allowed).
    pub async fn member_events_of(&self, room_id: &RoomId, mut users: Vec<&str>) -> Result<Vec<StoredEvent>> {
        users.sort_unstable();
        users.dedup();
        let keys: Vec<(String, String)> = users.iter().map(|u| ("m.room.member".to_owned(), (*u).to_owned())).collect();
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
            .messages(
                room_id,
                user,
                Some(&topological_token((event.depth, event.stream_ordering - 1))),
                None,
                true,
                half.max(1),
                filter,
            )
            .await?;
        let after = self
            .messages(
                room_id,
                user,
                Some(&topological_token((event.depth, event.stream_ordering))),
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

/// A user's power level from a room's create event and power levels content (`{}`
/// when there is none): creators of v12 rooms rank above everyone, and without power
/// levels the creator has 100.
pub(crate) fn user_power_level(
    create: &StoredEvent,
    pl: &JsonValue,
    user: &UserId,
    rules: &ruma::room_version_rules::RoomVersionRules,
) -> Result<i64> {
    if rules.authorization.explicitly_privilege_room_creators {
        let create_json: JsonValue = serde_json::from_str(&create.json).map_err(Error::internal)?;
        let additional = create_json["content"]["additional_creators"].as_array().cloned().unwrap_or_default();
        if create.sender == user.as_str() || additional.iter().any(|c| c == user.as_str()) {
            return Ok(i64::MAX);
        }
    }
    Ok(pl["users"][user.as_str()].as_i64().or_else(|| pl["users_default"].as_i64()).unwrap_or_else(|| {
        if pl.as_object().is_none_or(|o| o.is_empty()) && create.sender == user.as_str() { 100 } else { 0 }
    }))
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
