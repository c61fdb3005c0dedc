//! Turning stored PDUs into the client format: the client sees `event_id`, `type`,
//! `content`, `sender`, `origin_server_ts`, `state_key` and `unsigned` (with its own
//! `transaction_id`, `redacted_because` on redacted events, and `replaces_state`,
//! `prev_content` and `prev_sender` on state events), never hashes, signatures or the
//! DAG fields. Events that others relate to carry the server's aggregations in
//! `unsigned.m.relations`: `m.thread` (the latest event, formatted the same way, the
//! count, and whether the viewer took part), `m.replace` (the latest valid edit, whole:
//! the client applies its `m.new_content`, the server does not) and `m.reference` (the
//! ids of the events referencing it).
//!
//! Served events are never parsed into a `serde_json::Value` nor re-serialised: the
//! client fields of each PDU are cut out once (borrowed `RawValue`s) into a
//! `ClientForm`, kept in a cache bounded in bytes (`ClientForms`, keyed by event id and
//! checked against the stored JSON's length and redaction, so a redaction, which
//! rewrites the JSON and sets `redacted_by` in one UPDATE, is never served from an old
//! form), and each served event is those raw fields written out verbatim with
//! `room_id` and a small per-viewer `unsigned` added. The bundled aggregations are read
//! (two queries) only for pages holding an event that something relates to, which the
//! event row says (`related`, migration 0027).

use std::{collections::HashMap, sync::Arc};

use ruma::{DeviceId, UserId, serde::Raw};
use serde::{Deserialize, Deserializer, Serialize, Serializer, ser::SerializeMap};
use serde_json::value::{RawValue, to_raw_value};

use crate::{
    error::{Error, Result},
    service::{
        Services,
        cache::{ByteCache, ENTRY_OVERHEAD, heap_str},
        now_ms,
    },
    storage::StoredEvent,
};

/// Who is looking: a sender sees the transaction id of its own device's events.
#[derive(Clone, Copy)]
pub struct Viewer<'a> {
    pub user_id: &'a UserId,
    pub device_id: Option<&'a DeviceId>,
}

pub fn to_raw<T>(value: serde_json::Value) -> Result<Raw<T>> {
    Ok(Raw::from_json(to_raw_value(&value).map_err(Error::internal)?))
}

/// The client fields of one stored PDU, as its raw JSON values (made once per event).
struct ClientForm {
    kind: Option<Box<RawValue>>,
    content: Option<Box<RawValue>>,
    sender: Option<Box<RawValue>>,
    origin_server_ts: Option<Box<RawValue>>,
    state_key: Option<Box<RawValue>>,
    redacts: Option<Box<RawValue>>,
    /// What the form was made from: the stored JSON's length, and whether it was
    /// redacted (a redaction rewrites the JSON and sets `redacted_by` together).
    json_len: usize,
    redacted: bool,
}

/// A field that is present, even as `null` (a plain `Option` would read `null` as absent).
fn present<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

impl ClientForm {
    /// Cuts the client fields out of the PDU without building a JSON tree.
    fn of(event: &StoredEvent) -> Result<Self> {
        #[derive(Deserialize)]
        struct Fields<'a> {
            #[serde(rename = "type", default, borrow, deserialize_with = "present")]
            kind: Option<&'a RawValue>,
            #[serde(default, borrow, deserialize_with = "present")]
            content: Option<&'a RawValue>,
            #[serde(default, borrow, deserialize_with = "present")]
            sender: Option<&'a RawValue>,
            #[serde(default, borrow, deserialize_with = "present")]
            origin_server_ts: Option<&'a RawValue>,
            #[serde(default, borrow, deserialize_with = "present")]
            state_key: Option<&'a RawValue>,
            #[serde(default, borrow, deserialize_with = "present")]
            redacts: Option<&'a RawValue>,
        }
        #[derive(Deserialize)]
        struct RedactionContent<'a> {
            #[serde(default, borrow, deserialize_with = "present")]
            redacts: Option<&'a RawValue>,
        }
        let fields: Fields<'_> = serde_json::from_str(&event.json).map_err(Error::internal)?;
        let mut redacts = fields.redacts;
        // Room versions 11 and later carry the target in the content only.
        if redacts.is_none()
            && event.event_type == "m.room.redaction"
            && let Some(content) = fields.content
        {
            redacts = serde_json::from_str::<RedactionContent<'_>>(content.get()).ok().and_then(|c| c.redacts);
        }
        let own = |v: Option<&RawValue>| v.map(RawValue::to_owned);
        Ok(ClientForm {
            kind: own(fields.kind),
            content: own(fields.content),
            sender: own(fields.sender),
            origin_server_ts: own(fields.origin_server_ts),
            state_key: own(fields.state_key),
            redacts: own(redacts),
            json_len: event.json.len(),
            redacted: event.redacted_by.is_some(),
        })
    }

    fn made_from(&self, event: &StoredEvent) -> bool {
        self.json_len == event.json.len() && self.redacted == event.redacted_by.is_some()
    }

    /// Bytes held, estimated: each field's text in its own box (rounded up as the
    /// allocator does, plus its header), and the form itself in its `Arc`.
    fn size(&self) -> usize {
        let fields = [&self.kind, &self.content, &self.sender, &self.origin_server_ts, &self.state_key, &self.redacts];
        let boxes: usize = fields.iter().filter_map(|f| f.as_deref()).map(|v| heap_str(v.get())).sum();
        boxes + std::mem::size_of::<ClientForm>() + 32
    }
}

/// A served event: the form's raw fields, `event_id`, `room_id` if asked and `unsigned`.
struct Served<'a> {
    form: &'a ClientForm,
    event_id: &'a str,
    room_id: Option<&'a str>,
    unsigned: &'a RawValue,
}

impl Serialize for Served<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let f = self.form;
        let mut map = s.serialize_map(None)?;
        for (name, value) in [
            ("type", &f.kind),
            ("content", &f.content),
            ("sender", &f.sender),
            ("origin_server_ts", &f.origin_server_ts),
            ("state_key", &f.state_key),
            ("redacts", &f.redacts),
        ] {
            if let Some(value) = value {
                map.serialize_entry(name, value)?;
            }
        }
        map.serialize_entry("event_id", self.event_id)?;
        if let Some(room_id) = self.room_id {
            map.serialize_entry("room_id", room_id)?;
        }
        map.serialize_entry("unsigned", self.unsigned)?;
        map.end()
    }
}

/// What the server adds for a viewer (`unsigned`).
#[derive(Serialize)]
struct Unsigned<'a> {
    age: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    transaction_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redacted_because: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replaces_state: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prev_content: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prev_sender: Option<&'a str>,
    #[serde(rename = "m.relations", skip_serializing_if = "Option::is_none")]
    relations: Option<&'a RawValue>,
}

impl<'a> Unsigned<'a> {
    /// `age`, and `transaction_id` for the sender's own device.
    fn base(event: &'a StoredEvent, viewer: Option<Viewer<'_>>) -> Self {
        let transaction_id = match (viewer, &event.txn_id, &event.txn_device_id) {
            (Some(viewer), Some(txn_id), Some(device))
                if viewer.user_id.as_str() == event.sender
                    && viewer.device_id.is_some_and(|d| d.as_str() == device) =>
            {
                Some(txn_id.as_str())
            }
            _ => None,
        };
        Unsigned {
            age: (now_ms() - event.origin_server_ts).max(0),
            transaction_id,
            redacted_because: None,
            replaces_state: None,
            prev_content: None,
            prev_sender: None,
            relations: None,
        }
    }
}

fn serve(event: &StoredEvent, form: &ClientForm, with_room_id: bool, unsigned: &Unsigned<'_>) -> Result<Box<RawValue>> {
    let unsigned = to_raw_value(unsigned).map_err(Error::internal)?;
    let served = Served {
        form,
        event_id: &event.event_id,
        room_id: with_room_id.then_some(event.room_id.as_str()),
        unsigned: &unsigned,
    };
    to_raw_value(&served).map_err(Error::internal)
}

/// Client forms of recently served events, by event id, bounded in estimated bytes
/// (`[caches] memory_mb`, `cache::shares::CLIENT_FORMS`) by a `ByteCache`. A form is
/// made from immutable data (checked with `made_from` at each hit), so it is kept
/// without a stamp.
pub struct ClientForms {
    forms: ByteCache<String, Arc<ClientForm>>,
}

#[allow(clippy::ptr_arg)] // the signature `ByteCache::new` takes
fn weigh_form(event_id: &String, form: &Arc<ClientForm>) -> usize {
    heap_str(event_id) + form.size() + ENTRY_OVERHEAD
}

impl ClientForms {
    pub fn with_bound(max_bytes: usize) -> Self {
        ClientForms { forms: ByteCache::new(max_bytes, weigh_form) }
    }

    /// The forms of `events`, made for those not cached (outside the lock).
    fn get(&self, events: &[&StoredEvent]) -> Result<Vec<Arc<ClientForm>>> {
        let mut made = Vec::new();
        let mut out = Vec::with_capacity(events.len());
        let cached = self.forms.get_many(events.iter().map(|e| e.event_id.as_str()));
        for (event, cached) in events.iter().zip(cached) {
            match cached.filter(|form| form.made_from(event)) {
                Some(form) => out.push(form),
                None => {
                    let form = Arc::new(ClientForm::of(event)?);
                    made.push((event.event_id.clone(), form.clone()));
                    out.push(form);
                }
            }
        }
        if !made.is_empty() {
            self.forms.insert_many(made);
        }
        Ok(out)
    }

    /// How many forms are held (tests).
    pub fn len(&self) -> usize {
        self.forms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Estimated bytes held.
    pub fn bytes(&self) -> usize {
        self.forms.bytes()
    }

    /// The bound, in estimated bytes.
    pub fn max_bytes(&self) -> usize {
        self.forms.max_bytes()
    }
}

/// `m.relations` of one event.
#[derive(Default, Serialize)]
struct Bundle {
    #[serde(rename = "m.replace", skip_serializing_if = "Option::is_none")]
    replace: Option<Box<RawValue>>,
    #[serde(rename = "m.reference", skip_serializing_if = "Option::is_none")]
    reference: Option<References>,
    #[serde(rename = "m.thread", skip_serializing_if = "Option::is_none")]
    thread: Option<Thread>,
}

#[derive(Serialize)]
struct References {
    chunk: Vec<ReferenceId>,
}

#[derive(Serialize)]
struct ReferenceId {
    event_id: String,
}

#[derive(Serialize)]
struct Thread {
    latest_event: Box<RawValue>,
    count: i64,
    current_user_participated: bool,
}

impl Services {
    /// Client-format events, with what the server adds to `unsigned`:
    /// `redacted_because` on redacted events, and `replaces_state`, `prev_content` and
    /// `prev_sender` on state events that replaced another (clients read the DM's
    /// inviter, and membership and profile changes, from them). One read for all of
    /// the related events. Callers that need a field read it from the `StoredEvent`.
    pub async fn client_events<T>(
        &self,
        events: &[StoredEvent],
        viewer: Option<Viewer<'_>>,
        with_room_id: bool,
    ) -> Result<Vec<Raw<T>>> {
        let formatted = self.format_events(events, viewer, with_room_id, true).await?;
        Ok(formatted.into_iter().map(Raw::from_json).collect())
    }

    pub async fn client_event<T>(
        &self,
        event: &StoredEvent,
        viewer: Option<Viewer<'_>>,
        with_room_id: bool,
    ) -> Result<Raw<T>> {
        let mut formatted = self.format_events(std::slice::from_ref(event), viewer, with_room_id, true).await?;
        formatted.pop().map(Raw::from_json).ok_or_else(|| Error::internal("no formatted event"))
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
    ) -> Result<Vec<Box<RawValue>>> {
        let mut related_ids: Vec<String> =
            events.iter().flat_map(|e| e.redacted_by.iter().chain(&e.replaces_state)).cloned().collect();
        related_ids.sort_unstable();
        related_ids.dedup();
        let related: HashMap<String, StoredEvent> = if related_ids.is_empty() {
            HashMap::new()
        } else {
            self.store.get_events_by_ids(&related_ids).await?.into_iter().map(|e| (e.event_id.clone(), e)).collect()
        };
        let mut relations = self.bundled_relations(events, viewer, with_room_id, with_threads).await?;
        let mut all: Vec<&StoredEvent> = events.iter().collect();
        all.extend(related.values());
        let forms = self.client_forms.get(&all)?;
        let related_forms: HashMap<&str, &ClientForm> =
            related.values().zip(&forms[events.len()..]).map(|(e, f)| (e.event_id.as_str(), &**f)).collect();
        let empty_content: &RawValue = serde_json::from_str("{}").map_err(Error::internal)?;
        let mut out = Vec::with_capacity(events.len());
        for (event, form) in events.iter().zip(&forms) {
            let mut unsigned = Unsigned::base(event, viewer);
            let because = match event.redacted_by.as_ref().and_then(|id| related.get(id)) {
                Some(redaction) => {
                    let form = related_forms[redaction.event_id.as_str()];
                    Some(serve(redaction, form, with_room_id, &Unsigned::base(redaction, None))?)
                }
                None => None,
            };
            unsigned.redacted_because = because.as_deref();
            if let Some(replaced_id) = event.replaces_state.as_ref().filter(|_| event.state_key.is_some()) {
                unsigned.replaces_state = Some(replaced_id);
                if let Some(replaced) = related.get(replaced_id) {
                    let form = related_forms[replaced.event_id.as_str()];
                    unsigned.prev_content = Some(form.content.as_deref().unwrap_or(empty_content));
                    unsigned.prev_sender = Some(&replaced.sender);
                }
            }
            let bundle = relations.remove(&event.event_id);
            unsigned.relations = bundle.as_deref();
            out.push(serve(event, form, with_room_id, &unsigned)?);
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
    ) -> Result<HashMap<String, Box<RawValue>>> {
        // State events and redacted ones are not related to (a redacted event keeps its
        // relations, but clients show nothing of it).
        let parents: Vec<String> = events
            .iter()
            .filter(|e| e.state_key.is_none() && e.redacted_by.is_none() && e.position.is_some() && e.related)
            .map(|e| e.event_id.clone())
            .collect();
        let mut out: HashMap<String, Bundle> = HashMap::new();
        if parents.is_empty() {
            return Ok(HashMap::new());
        }
        // Threads leave out the events of users the viewer ignores (one read, and only
        // for pages with related events).
        let ignored = match viewer {
            Some(v) => self.ignored_users(v.user_id).await?,
            None => Vec::new(),
        };
        let found = self.store.get_bundled_relations(&parents, viewer.map(|v| v.user_id.as_str()), &ignored).await?;
        // The latest edit of each event: the newest by origin_server_ts, then event id.
        let latest_edits: HashMap<&String, &String> = found
            .replacements
            .iter()
            .filter_map(|(parent, edits)| {
                edits.iter().max_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0))).map(|(id, _)| (parent, id))
            })
            .collect();
        let edit_ids: Vec<String> = latest_edits.values().map(|id| (*id).clone()).collect();
        let edits: Vec<StoredEvent> =
            if edit_ids.is_empty() { Vec::new() } else { self.store.get_events_by_ids(&edit_ids).await? };
        let edit_refs: Vec<&StoredEvent> = edits.iter().collect();
        let edit_forms = self.client_forms.get(&edit_refs)?;
        let edits: HashMap<&str, (&StoredEvent, &ClientForm)> =
            edits.iter().zip(&edit_forms).map(|(e, f)| (e.event_id.as_str(), (e, &**f))).collect();
        for (parent, edit_id) in latest_edits {
            if let Some((edit, form)) = edits.get(edit_id.as_str()) {
                let served = serve(edit, form, with_room_id, &Unsigned::base(edit, viewer))?;
                out.entry(parent.clone()).or_default().replace = Some(served);
            }
        }
        for (parent, ids) in &found.references {
            let chunk = ids.iter().map(|id| ReferenceId { event_id: id.clone() }).collect();
            out.entry(parent.clone()).or_default().reference = Some(References { chunk });
        }
        if with_threads && !found.threads.is_empty() {
            let positions: Vec<i64> = found.threads.values().map(|t| t.latest_position).collect();
            let latest = self.store.get_events_by_positions(&positions).await?;
            let formatted = Box::pin(self.format_events(&latest, viewer, with_room_id, false)).await?;
            let by_position: HashMap<i64, Box<RawValue>> =
                latest.iter().map(|e| e.stream_ordering).zip(formatted).collect();
            for (root, summary) in &found.threads {
                let Some(latest_event) = by_position.get(&summary.latest_position).cloned() else { continue };
                // The root's sender took part too.
                let root_sender = events.iter().find(|e| &e.event_id == root).map(|e| e.sender.as_str());
                let participated =
                    summary.participated || viewer.is_some_and(|v| Some(v.user_id.as_str()) == root_sender);
                out.entry(root.clone()).or_default().thread =
                    Some(Thread { latest_event, count: summary.count, current_user_participated: participated });
            }
        }
        out.into_iter().map(|(k, v)| Ok((k, to_raw_value(&v).map_err(Error::internal)?))).collect()
    }
}

#[cfg(test)]
#[path = "format_tests.rs"]
mod tests;
