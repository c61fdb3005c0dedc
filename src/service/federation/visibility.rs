//! Which events of a room another server may see, by the state at each event (the
//! server-server spec's history visibility for servers): with `shared` or
//! `world_readable` history every event; with `invited`, those at which one of the
//! server's users was invited or joined; with `joined`, those at which one was joined.
//! Member events about the server's own users are always visible to it. `backfill` and
//! `get_missing_events` hand out the events a server may not see redacted (so that the
//! DAG stays whole), `event` refuses them.

use std::collections::{HashMap, HashSet};

use ruma::{CanonicalJsonObject, RoomVersionId, ServerName};
use serde_json::Value as JsonValue;

use crate::{
    error::{Error, Result},
    service::{Services, rooms::append::rules_for},
    storage::StoredEvent,
};

fn content_field(json: &str, field: &str) -> Option<String> {
    serde_json::from_str::<JsonValue>(json).ok().and_then(|v| v["content"][field].as_str().map(str::to_owned))
}

/// Whether `user_id` (a full Matrix user id) belongs to `server`.
fn of_server(user_id: &str, server: &ServerName) -> bool {
    user_id.split_once(':').is_some_and(|(_, s)| s == server.as_str())
}

impl Services {
    /// The ids of those of `events` (of one room) that `server` may see.
    pub(crate) async fn visible_to_server(
        &self,
        server: &ServerName,
        events: &[StoredEvent],
    ) -> Result<HashSet<String>> {
        let mut by_group: HashMap<i64, bool> = HashMap::new();
        let mut visible = HashSet::new();
        for event in events {
            let own_member =
                event.event_type == "m.room.member" && event.state_key.as_deref().is_some_and(|k| of_server(k, server));
            let allowed = own_member || {
                // The state at the event (for a state event, the state before it: a
                // visibility change is judged by the visibility it replaces).
                let group = self.state_group_before(event).await?.unwrap_or(0);
                match by_group.get(&group) {
                    Some(allowed) => *allowed,
                    None => {
                        let allowed = self.group_visible_to_server(group, server).await?;
                        by_group.insert(group, allowed);
                        allowed
                    }
                }
            };
            if allowed {
                visible.insert(event.event_id.clone());
            }
        }
        Ok(visible)
    }

    /// Whether `server` may see events whose state is `group` (0: none known, in which
    /// case the room's history is taken as `shared`, the spec's default).
    async fn group_visible_to_server(&self, group: i64, server: &ServerName) -> Result<bool> {
        if group == 0 {
            return Ok(true);
        }
        let history =
            match self.store.get_state_group(group, Some("m.room.history_visibility"), Some("")).await?.first() {
                Some((_, _, id)) => self
                    .store
                    .get_event(id)
                    .await?
                    .and_then(|e| content_field(&e.json, "history_visibility"))
                    .unwrap_or_else(|| "shared".to_owned()),
                None => "shared".to_owned(),
            };
        let accepted: &[&str] = match history.as_str() {
            "invited" => &["invite", "join"],
            "joined" => &["join"],
            _ => return Ok(true),
        };
        let members: Vec<String> = self
            .store
            .get_state_group(group, Some("m.room.member"), None)
            .await?
            .into_iter()
            .filter(|(_, key, _)| of_server(key, server))
            .map(|(_, _, id)| id)
            .collect();
        Ok(self
            .store
            .get_events_by_ids(&members)
            .await?
            .iter()
            .any(|e| content_field(&e.json, "membership").is_some_and(|m| accepted.contains(&m.as_str()))))
    }

    /// `events` (of one room of `version`) as `server` may have them: the ones it may
    /// not see redacted.
    pub(crate) async fn redact_invisible_for_server(
        &self,
        server: &ServerName,
        version: &RoomVersionId,
        mut events: Vec<StoredEvent>,
    ) -> Result<Vec<StoredEvent>> {
        let visible = self.visible_to_server(server, &events).await?;
        if visible.len() == events.len() {
            return Ok(events);
        }
        let rules = rules_for(version)?;
        for event in events.iter_mut().filter(|e| !visible.contains(&e.event_id)) {
            let obj: CanonicalJsonObject = serde_json::from_str(&event.json).map_err(Error::internal)?;
            let redacted = ruma::canonical_json::redact(obj, &rules.redaction, None).map_err(Error::internal)?;
            event.json = serde_json::to_string(&redacted).map_err(Error::internal)?;
        }
        Ok(events)
    }
}
