//! The client JSON served from cut-out client forms is the JSON the code before them
//! made by parsing and re-serialising each PDU (kept here as `old_format_events`), for
//! a few hundred varied stored events on both backends (state events replacing others,
//! redacted events and redactions of both forms, own events with transaction ids,
//! edits, threads and references, with and without `room_id`, for several viewers); a
//! redaction after an event's client form was cached is served redacted; and the
//! per-event CPU of both (`format_cpu_per_event`, ignored: a measurement).

use std::{collections::HashMap, sync::Arc};

use ruma::{DeviceId, UserId};
use serde_json::{Map, Value as JsonValue, json};

use super::Viewer;
use crate::{
    config::Config,
    error::{Error, Result},
    service::{Services, now_ms},
    storage::{
        Store, StoredEvent,
        test_db::{TestBind, TestDb},
    },
};

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

impl Services {
    /// Client-format events, with what the server adds to `unsigned`:
    /// `redacted_because` on redacted events, and `replaces_state`, `prev_content` and
    /// `prev_sender` on state events that replaced another (clients read the DM's
    /// inviter, and membership and profile changes, from them). One read for all of
    /// the related events.
    /// `client_events`; `with_threads` false for the latest events of threads (one
    /// level: a thread's latest event is not itself a thread root, and a loop made by
    /// another server cannot recurse).
    pub(super) async fn old_format_events(
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
        let relations = self.old_bundled_relations(events, viewer, with_room_id, with_threads).await?;
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
    async fn old_bundled_relations(
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
        let found = self.store.get_bundled_relations(&parents, viewer.map(|v| v.user_id.as_str()), &[]).await?;
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
            let formatted = Box::pin(self.old_format_events(&latest, viewer, with_room_id, false)).await?;
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
}

/// One stored row.
struct Row {
    id: String,
    sender: &'static str,
    kind: &'static str,
    state_key: Option<String>,
    content: JsonValue,
    redacts: Option<String>,
    redacted_by: Option<String>,
    txn: Option<(&'static str, String)>,
    replaces_state: Option<String>,
    relation: Option<(String, &'static str)>,
}

fn pdu(row: &Row, ts: i64) -> String {
    let mut pdu = json!({
        "type": row.kind,
        "content": row.content,
        "sender": row.sender,
        "origin_server_ts": ts,
        "room_id": "!r:x",
        "depth": ts,
        "auth_events": ["$a"],
        "prev_events": ["$p"],
        "hashes": {"sha256": "abc"},
        "signatures": {"x": {"ed25519:1": "sig"}},
        "unsigned": {"age_ts": 5},
    });
    if let Some(key) = &row.state_key {
        pdu["state_key"] = json!(key);
    }
    if let Some(target) = &row.redacts {
        pdu["redacts"] = json!(target);
    }
    pdu.to_string()
}

/// `n` stored events in memory, the rows of `rows()` in turn, ids `{prefix}{i}`.
fn stored_events(n: usize, prefix: &str) -> Vec<StoredEvent> {
    let rows = rows();
    (0..n)
        .map(|i| {
            let row = &rows[i % rows.len()];
            StoredEvent {
                stream_ordering: i as i64,
                position: Some(i as i64),
                event_id: format!("{prefix}{i}"),
                room_id: "!r:x".into(),
                sender: row.sender.into(),
                event_type: row.kind.into(),
                state_key: row.state_key.clone(),
                depth: i as i64,
                origin_server_ts: 1,
                state_group: 1,
                json: pdu(row, 1),
                redacted_by: None,
                txn_device_id: None,
                txn_id: None,
                replaces_state: None,
                rejected_reason: None,
                related: false,
            }
        })
        .collect()
}

/// A few hundred varied events of room `!r:x`.
fn rows() -> Vec<Row> {
    let senders = ["@a:x", "@b:x", "@c:x"];
    let mut rows: Vec<Row> = Vec::new();
    let mut members: HashMap<String, String> = HashMap::new();
    let mut messages: Vec<usize> = Vec::new();
    for i in 0..360usize {
        let sender = senders[i % 3];
        let mut row = Row {
            id: format!("$e{i}"),
            sender,
            kind: "m.room.message",
            state_key: None,
            content: json!({"msgtype": "m.text", "body": format!("message \"{i}\" é\u{1F600}"), "n": i}),
            redacts: None,
            redacted_by: None,
            txn: None,
            replaces_state: None,
            relation: None,
        };
        let parent = messages.get(i * 7 % messages.len().max(1)).copied();
        match (i % 12, parent) {
            (0 | 6, _) => {
                let key = format!("@u{}:x", i % 5);
                row.kind = "m.room.member";
                row.content =
                    json!({"membership": if i % 24 == 0 { "join" } else { "leave" }, "displayname": format!("n{i}")});
                row.replaces_state = members.insert(key.clone(), row.id.clone());
                row.state_key = Some(key);
            }
            (1, Some(target)) if rows[target].redacted_by.is_none() => {
                row.kind = "m.room.redaction";
                let target_id = rows[target].id.clone();
                // Both forms: the target at the top (versions before 11) or in the content.
                if i % 24 == 1 {
                    row.redacts = Some(target_id.clone());
                    row.content = json!({"reason": "spam"});
                } else {
                    row.content = json!({"redacts": target_id, "reason": "spam"});
                }
                rows[target].redacted_by = Some(row.id.clone());
                rows[target].content = json!({});
                rows[target].relation = None;
            }
            (2, Some(parent)) => {
                row.sender = rows[parent].sender;
                row.content = json!({"body": "* edit", "m.new_content": {"body": format!("edit {i}")},
                    "m.relates_to": {"rel_type": "m.replace", "event_id": rows[parent].id}});
                row.relation = Some((rows[parent].id.clone(), "m.replace"));
            }
            (3 | 8, Some(parent)) => {
                row.content = json!({"body": format!("in thread {i}"),
                    "m.relates_to": {"rel_type": "m.thread", "event_id": rows[parent].id}});
                row.relation = Some((rows[parent].id.clone(), "m.thread"));
            }
            (4, Some(parent)) => {
                row.content =
                    json!({"body": "ref", "m.relates_to": {"rel_type": "m.reference", "event_id": rows[parent].id}});
                row.relation = Some((rows[parent].id.clone(), "m.reference"));
            }
            (5, _) => {
                row.kind = "m.room.topic";
                row.state_key = Some(String::new());
                row.content = json!({"topic": format!("topic {i}")});
                row.replaces_state = members.insert("topic".into(), row.id.clone());
            }
            _ => messages.push(i),
        }
        if i % 4 == 1 {
            row.txn = Some((if i % 8 == 1 { "DEV" } else { "OTHER" }, format!("txn{i}")));
        }
        rows.push(row);
    }
    rows
}

async fn store_rows(store: &Store, rows: &[Row]) {
    use TestBind::{Int, Text};
    let base = now_ms() - 1_000_000;
    let sql = "INSERT INTO rooms (room_id, room_version, creator, created_ts) VALUES ('!r:x', '11', '@a:x', 1)";
    store.execute_for_test(sql, vec![]).await;
    for (i, row) in rows.iter().enumerate() {
        let ts = base + i as i64 * 1000;
        store
            .execute_for_test(
                "INSERT INTO events (stream_ordering, event_id, room_id, sender, event_type, state_key, depth,
                     origin_server_ts, state_group, json, redacted_by, txn_device_id, txn_id, replaces_state)
                 VALUES ($1, $2, '!r:x', $3, $4, $5, $1, $6, 1, $7, $8, $9, $10, $11)",
                vec![
                    Int(i as i64 + 1),
                    Text(Some(row.id.clone())),
                    Text(Some(row.sender.into())),
                    Text(Some(row.kind.into())),
                    Text(row.state_key.clone()),
                    Int(ts),
                    Text(Some(pdu(row, ts))),
                    Text(row.redacted_by.clone()),
                    Text(row.txn.as_ref().map(|t| t.0.into())),
                    Text(row.txn.as_ref().map(|t| t.1.clone())),
                    Text(row.replaces_state.clone()),
                ],
            )
            .await;
        if let Some((parent, rel_type)) = &row.relation {
            store
                .execute_for_test(
                    "INSERT INTO event_relations (event_id, relates_to, rel_type, event_type, sender, room_id)
                     VALUES ($1, $2, $3, $4, $5, '!r:x')",
                    vec![
                        Text(Some(row.id.clone())),
                        Text(Some(parent.clone())),
                        Text(Some((*rel_type).into())),
                        Text(Some(row.kind.into())),
                        Text(Some(row.sender.into())),
                    ],
                )
                .await;
        }
    }
    // As migration 0027 and the persist path set it.
    let sql = "UPDATE events SET related = TRUE WHERE event_id IN (SELECT relates_to FROM event_relations)";
    store.execute_for_test(sql, vec![]).await;
}

/// Removes every `unsigned.age` (a time), checking that it was there.
fn without_ages(value: &mut JsonValue) {
    if let JsonValue::Object(map) = value {
        if let Some(JsonValue::Object(unsigned)) = map.get_mut("unsigned") {
            assert!(unsigned.remove("age").is_some_and(|a| a.is_i64()), "no age in {unsigned:?}");
        }
        for v in map.values_mut() {
            without_ages(v);
        }
    }
}

async fn new_json(
    services: &Services,
    events: &[StoredEvent],
    viewer: Option<Viewer<'_>>,
    room: bool,
) -> Vec<JsonValue> {
    let raw = services.client_events::<()>(events, viewer, room).await.unwrap();
    raw.iter().map(|r| serde_json::from_str(r.json().get()).unwrap()).collect()
}

async fn same_as_before(postgres: bool) {
    let Some((store, db)) = TestDb::open(postgres).await else { return };
    let rows = rows();
    store_rows(&store, &rows).await;
    let config = Config { data_dir: db.dir().join("data"), ..Config::default() };
    let services = Services::new(Arc::new(config), store, "http://127.0.0.1".into()).unwrap();
    let positions: Vec<i64> = (1..=rows.len() as i64).collect();
    let mut events = services.store.get_events_by_positions(&positions).await.unwrap();
    events.sort_by_key(|e| e.stream_ordering);
    assert_eq!(events.len(), rows.len());
    let (a, b): (&UserId, &UserId) = ("@a:x".try_into().unwrap(), "@b:x".try_into().unwrap());
    let dev: &DeviceId = "DEV".into();
    let viewers =
        [None, Some(Viewer { user_id: a, device_id: Some(dev) }), Some(Viewer { user_id: b, device_id: None })];
    let mut seen = HashMap::<&str, usize>::new();
    for viewer in viewers {
        for room in [true, false] {
            // Whole, and in pages of 20 (pages without related events skip the bundled read).
            for page in std::iter::once(&events[..]).chain(events.chunks(20)) {
                let mut old = services.old_format_events(page, viewer, room, true).await.unwrap();
                let mut new = new_json(&services, page, viewer, room).await;
                assert_eq!(old.len(), new.len());
                for (old, new) in old.iter_mut().zip(&mut new) {
                    without_ages(old);
                    without_ages(new);
                    assert_eq!(old, new);
                    let unsigned = &new["unsigned"];
                    for key in ["transaction_id", "redacted_because", "prev_content", "m.relations"] {
                        if unsigned.get(key).is_some() {
                            *seen.entry(key).or_default() += 1;
                        }
                    }
                    if unsigned.get("m.relations").is_some_and(|r| r.get("m.thread").is_some()) {
                        *seen.entry("m.thread").or_default() += 1;
                    }
                    if unsigned.get("m.relations").is_some_and(|r| r.get("m.replace").is_some()) {
                        *seen.entry("m.replace").or_default() += 1;
                    }
                    assert_eq!(new.get("room_id").is_some(), room);
                }
            }
        }
    }
    // The comparison covered every kind of addition.
    for key in ["transaction_id", "redacted_because", "prev_content", "m.relations", "m.thread", "m.replace"] {
        assert!(seen.get(key).is_some_and(|n| *n > 0), "no {key} compared: {seen:?}");
    }

    // A redaction after the message's client form was made and cached.
    let target = events.iter().find(|e| e.redacted_by.is_none() && e.event_type == "m.room.message").unwrap().clone();
    let before = new_json(&services, std::slice::from_ref(&target), None, true).await;
    assert!(before[0]["content"]["body"].is_string());
    assert!(!services.client_forms.is_empty());
    let redaction = events.iter().find(|e| e.event_type == "m.room.redaction").unwrap();
    let mut redacted: JsonValue = serde_json::from_str(&target.json).unwrap();
    redacted["content"] = json!({});
    let sql = "UPDATE events SET json = $2, redacted_by = $3 WHERE event_id = $1";
    let binds = [&target.event_id, &redacted.to_string(), &redaction.event_id];
    services.store.execute_for_test(sql, binds.iter().map(|s| TestBind::Text(Some((*s).clone()))).collect()).await;
    let reread = services.store.get_events_by_ids(std::slice::from_ref(&target.event_id)).await.unwrap();
    let mut after = new_json(&services, &reread, None, true).await;
    assert_eq!(after[0]["content"], json!({}));
    assert_eq!(after[0]["unsigned"]["redacted_because"]["event_id"], json!(redaction.event_id));
    let mut old = services.old_format_events(&reread, None, true, true).await.unwrap();
    without_ages(&mut old[0]);
    without_ages(&mut after[0]);
    assert_eq!(old, after);
    services.store.close().await;
    db.drop_database().await;
}

/// Filled past its bound (a few events' worth), the cache stays under it and serves the
/// same forms as one that keeps everything; the estimate of a form is not below the heap
/// it takes (counted by the tests' allocator), nor far above it.
#[test]
fn client_forms_stay_under_their_bound() {
    use crate::service::cache::heap::bytes_of;
    let events = stored_events(400, "$event");
    let small = super::ClientForms::with_bound(8_000);
    let large = super::ClientForms::with_bound(64 << 20);
    let json = |form: &super::ClientForm, event: &StoredEvent, unsigned: &super::Unsigned<'_>| {
        super::serve(event, form, true, unsigned).unwrap().get().to_owned()
    };
    for round in 0..3 {
        for chunk in events.chunks(7) {
            let refs: Vec<&StoredEvent> = chunk.iter().collect();
            let (got, want) = (small.get(&refs).unwrap(), large.get(&refs).unwrap());
            for ((event, got), want) in chunk.iter().zip(&got).zip(&want) {
                let unsigned = super::Unsigned::base(event, None);
                assert_eq!(json(got, event, &unsigned), json(want, event, &unsigned), "round {round}");
            }
            assert!(small.bytes() <= 8_000, "{} bytes", small.bytes());
        }
    }
    assert!(small.len() < 60 && large.len() == 400, "{} and {}", small.len(), large.len());
    for event in events.iter().take(30) {
        let mut estimate = 0;
        let taken = bytes_of(|| {
            let form = std::sync::Arc::new(super::ClientForm::of(event).unwrap());
            estimate = form.size();
            form
        });
        eprintln!("{}: estimate {estimate}, taken {taken}", event.event_type);
        assert!(estimate >= taken && estimate < 3 * taken, "{}: estimate {estimate}, taken {taken}", event.event_type);
    }
}

#[tokio::test]
async fn sqlite_client_forms_serve_the_json_of_before() {
    same_as_before(false).await;
}

#[tokio::test]
async fn postgres_client_forms_serve_the_json_of_before() {
    same_as_before(true).await;
}

/// CPU per formatted event, old (parse, copy, re-serialise) and new (cut out once,
/// then written out), over 10,000 events in memory:
/// `cargo nextest run -E 'test(format_cpu_per_event)' --run-ignored only --no-capture`.
#[tokio::test]
#[ignore = "a measurement"]
async fn format_cpu_per_event() {
    let events = stored_events(10_000, "$x");
    let start = std::time::Instant::now();
    for event in &events {
        let value = base_client_event(event, None, false).unwrap();
        std::hint::black_box(serde_json::value::to_raw_value(&value).unwrap());
    }
    let old = start.elapsed();
    let forms = super::ClientForms::with_bound(64 << 20);
    let refs: Vec<&StoredEvent> = events.iter().collect();
    let start = std::time::Instant::now();
    let made = forms.get(&refs).unwrap();
    let cut = start.elapsed();
    let start = std::time::Instant::now();
    for (event, form) in events.iter().zip(&made) {
        std::hint::black_box(super::serve(event, form, false, &super::Unsigned::base(event, None)).unwrap());
    }
    let served = start.elapsed();
    let start = std::time::Instant::now();
    let cached = forms.get(&refs).unwrap();
    let hit = start.elapsed();
    assert_eq!(cached.len(), events.len());
    let per = |d: std::time::Duration| d.as_nanos() as f64 / events.len() as f64 / 1000.0;
    println!(
        "per event: old {:.2} µs; new: cut out {:.2} µs (once), served {:.2} µs, cache hit {:.2} µs",
        per(old),
        per(cut),
        per(served),
        per(hit)
    );
}
