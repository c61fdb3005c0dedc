//! Turning stored PDUs into the client format: the client sees `event_id`, `type`,
//! `content`, `sender`, `origin_server_ts`, `state_key` and `unsigned` (with its own
//! `transaction_id`, `redacted_because` on redacted events, and `replaces_state`,
//! `prev_content` and `prev_sender` on state events), never hashes, signatures or the
//! DAG fields. Events that others relate to carry the server's aggregations in
//! `unsigned.m.relations`: `m.thread` (the latest event, formatted the same way, the
//! count, and whether the viewer took part), `m.replace` (the latest valid edit, whole:
//! the client applies its `m.new_content`, the server does not) and `m.reference` (the
//! ids of the events referencing it); two queries per page (`get_bundled_relations`).

use std::collections::HashMap;

use ruma::{DeviceId, UserId, serde::Raw};
use serde_json::{Map, Value as JsonValue, json, value::to_raw_value};

use crate::{
    error::{Error, Result},
    service::{Services, now_ms},
    storage::StoredEvent,
};

/// Who is looking: a sender sees the transaction id of its own device's events.
#[derive(Clone, Copy)]
pub struct Viewer<'a> {
    pub user_id: &'a UserId,
    pub device_id: Option<&'a DeviceId>,
}

const CLIENT_FIELDS: [&str; 7] = ["type", "content", "sender", "origin_server_ts", "state_key", "redacts", "room_id"];

fn base_client_event(
    event: &StoredEvent,
    viewer: Option<Viewer<'_>>,
    with_room_id: bool,
) -> Result<Map<String, JsonValue>> {
    let pdu: Map<String, JsonValue> = serde_json::from_str(&event.json).map_err(Error::internal)?;
    let mut out = Map::new();
    for field in CLIENT_FIELDS {
        if let Some(v) = pdu.get(field) {
            out.insert(field.to_owned(), v.clone());
        }
    }
    out.insert("event_id".into(), json!(event.event_id));
    if with_room_id {
        out.insert("room_id".into(), json!(event.room_id));
    } else {
        out.remove("room_id");
    }
    if event.event_type == "m.room.redaction"
        && !out.contains_key("redacts")
        && let Some(target) = pdu.get("content").and_then(|c| c.get("redacts"))
    {
        out.insert("redacts".into(), target.clone());
    }
    let mut unsigned = Map::new();
    unsigned.insert("age".into(), json!((now_ms() - event.origin_server_ts).max(0)));
    if let (Some(viewer), Some(txn_id), Some(device)) = (viewer, &event.txn_id, &event.txn_device_id)
        && viewer.user_id.as_str() == event.sender
        && viewer.device_id.is_some_and(|d| d.as_str() == device)
    {
        unsigned.insert("transaction_id".into(), json!(txn_id));
    }
    out.insert("unsigned".into(), JsonValue::Object(unsigned));
    Ok(out)
}

pub fn to_raw<T>(value: JsonValue) -> Result<Raw<T>> {
    Ok(Raw::from_json(to_raw_value(&value).map_err(Error::internal)?))
}

impl Services {
    /// Client-format events, with what the server adds to `unsigned`:
    /// `redacted_because` on redacted events, and `replaces_state`, `prev_content` and
    /// `prev_sender` on state events that replaced another (clients read the DM's
    /// inviter, and membership and profile changes, from them). One read for all of
    /// the related events.
    pub async fn client_events(
        &self,
        events: &[StoredEvent],
        viewer: Option<Viewer<'_>>,
        with_room_id: bool,
    ) -> Result<Vec<JsonValue>> {
        self.format_events(events, viewer, with_room_id, true).await
    }

    /// `client_events`; `with_threads` false for the latest events of threads (one
    /// level: a thread's latest event is not itself a thread root, and a loop made by
    /// another server cannot recurse).
    async fn format_events(
        &self,
        events: &[StoredEvent],
        viewer: Option<Viewer<'_>>,
        with_room_id: bool,
        with_threads: bool,
    ) -> Result<Vec<JsonValue>> {
        let mut related_ids: Vec<String> =
            events.iter().flat_map(|e| e.redacted_by.iter().chain(&e.replaces_state)).cloned().collect();
        related_ids.sort_unstable();
        related_ids.dedup();
        let related: HashMap<String, StoredEvent> = if related_ids.is_empty() {
            HashMap::new()
        } else {
            self.store.get_events_by_ids(&related_ids).await?.into_iter().map(|e| (e.event_id.clone(), e)).collect()
        };
        let relations = self.bundled_relations(events, viewer, with_room_id, with_threads).await?;
        let mut out = Vec::with_capacity(events.len());
        for event in events {
            let mut value = base_client_event(event, viewer, with_room_id)?;
            let Some(JsonValue::Object(unsigned)) = value.get_mut("unsigned") else {
                return Err(Error::internal("client event without unsigned"));
            };
            if let Some(redaction) = event.redacted_by.as_ref().and_then(|id| related.get(id)) {
                let because = base_client_event(redaction, None, with_room_id)?;
                unsigned.insert("redacted_because".into(), JsonValue::Object(because));
            }
            if let Some(replaced_id) = event.replaces_state.as_ref().filter(|_| event.state_key.is_some()) {
                unsigned.insert("replaces_state".into(), json!(replaced_id));
                if let Some(replaced) = related.get(replaced_id) {
                    let pdu: JsonValue = serde_json::from_str(&replaced.json).map_err(Error::internal)?;
                    unsigned.insert("prev_content".into(), pdu.get("content").cloned().unwrap_or_else(|| json!({})));
                    unsigned.insert("prev_sender".into(), json!(replaced.sender));
                }
            }
            if let Some(bundled) = relations.get(&event.event_id) {
                unsigned.insert("m.relations".into(), bundled.clone());
            }
            out.push(JsonValue::Object(value));
        }
        Ok(out)
    }

    /// The `unsigned.m.relations` of each of `events` that has any, by event id.
    async fn bundled_relations(
        &self,
        events: &[StoredEvent],
        viewer: Option<Viewer<'_>>,
        with_room_id: bool,
        with_threads: bool,
    ) -> Result<HashMap<String, JsonValue>> {
        // State events and redacted ones are not related to (a redacted event keeps its
        // relations, but clients show nothing of it).
        let parents: Vec<String> = events
            .iter()
            .filter(|e| e.state_key.is_none() && e.redacted_by.is_none() && e.position.is_some())
            .map(|e| e.event_id.clone())
            .collect();
        let mut out: HashMap<String, Map<String, JsonValue>> = HashMap::new();
        if parents.is_empty() {
            return Ok(HashMap::new());
        }
        let found = self.store.get_bundled_relations(&parents, viewer.map(|v| v.user_id.as_str())).await?;
        // The latest edit of each event: the newest by origin_server_ts, then event id.
        let latest_edits: HashMap<&String, &String> = found
            .replacements
            .iter()
            .filter_map(|(parent, edits)| {
                edits.iter().max_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0))).map(|(id, _)| (parent, id))
            })
            .collect();
        let edit_ids: Vec<String> = latest_edits.values().map(|id| (*id).clone()).collect();
        let edits: HashMap<String, StoredEvent> = if edit_ids.is_empty() {
            HashMap::new()
        } else {
            self.store.get_events_by_ids(&edit_ids).await?.into_iter().map(|e| (e.event_id.clone(), e)).collect()
        };
        for (parent, edit_id) in latest_edits {
            if let Some(edit) = edits.get(edit_id) {
                let edit = base_client_event(edit, viewer, with_room_id)?;
                out.entry(parent.clone()).or_default().insert("m.replace".into(), JsonValue::Object(edit));
            }
        }
        for (parent, ids) in &found.references {
            let chunk: Vec<JsonValue> = ids.iter().map(|id| json!({ "event_id": id })).collect();
            out.entry(parent.clone()).or_default().insert("m.reference".into(), json!({ "chunk": chunk }));
        }
        if with_threads && !found.threads.is_empty() {
            let positions: Vec<i64> = found.threads.values().map(|t| t.latest_position).collect();
            let latest = self.store.get_events_by_positions(&positions).await?;
            let formatted = Box::pin(self.format_events(&latest, viewer, with_room_id, false)).await?;
            let by_position: HashMap<i64, JsonValue> =
                latest.iter().map(|e| e.stream_ordering).zip(formatted).collect();
            for (root, summary) in &found.threads {
                let Some(latest_event) = by_position.get(&summary.latest_position) else { continue };
                // The root's sender took part too.
                let root_sender = events.iter().find(|e| &e.event_id == root).map(|e| e.sender.as_str());
                let participated =
                    summary.participated || viewer.is_some_and(|v| Some(v.user_id.as_str()) == root_sender);
                out.entry(root.clone()).or_default().insert(
                    "m.thread".into(),
                    json!({
                        "latest_event": latest_event,
                        "count": summary.count,
                        "current_user_participated": participated,
                    }),
                );
            }
        }
        Ok(out.into_iter().map(|(k, v)| (k, JsonValue::Object(v))).collect())
    }

    pub async fn client_event(
        &self,
        event: &StoredEvent,
        viewer: Option<Viewer<'_>>,
        with_room_id: bool,
    ) -> Result<JsonValue> {
        Ok(self.client_events(std::slice::from_ref(event), viewer, with_room_id).await?.remove(0))
    }
}
