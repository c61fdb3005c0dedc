//! The persist pipeline with PDUs from another server: a made-up `remote.test` with its
//! own ed25519 key signs events that are fed to `Services::handle_pdu` in process, and
//! what local users see is read through the client API.

use std::sync::Arc;

use convo::service::{
    Services,
    rooms::pipeline::{Arrival, PduOutcome},
};
use reqwest::StatusCode;
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedRoomId, RoomVersionId,
    signatures::{Ed25519KeyPair, hash_and_sign_event, reference_hash},
};
use serde_json::{Value, json};

use crate::{
    backend_tests,
    common::{Backend, TestServer, bodies},
};

const REMOTE: &str = "remote.test";

/// Another server: its key, trusted by the server under test.
struct Remote {
    key: Ed25519KeyPair,
    services: Arc<Services>,
    room: OwnedRoomId,
    version: RoomVersionId,
}

fn new_key() -> Ed25519KeyPair {
    let doc = Ed25519KeyPair::generate();
    Ed25519KeyPair::from_der(&doc, "1".to_owned()).unwrap()
}

/// A PDU being written by `remote.test`.
struct Draft {
    sender: String,
    kind: &'static str,
    state_key: Option<String>,
    content: Value,
    prev: Vec<String>,
    auth: Vec<String>,
    ts: i64,
}

impl Remote {
    async fn new(server: &TestServer, room: &str) -> Self {
        let services = server.running.as_ref().unwrap().services.clone();
        let key = new_key();
        services.known_keys.add(REMOTE, "ed25519:1", &key.public_key());
        let room = OwnedRoomId::try_from(room).unwrap();
        let version = services.room_version(&room).await.unwrap();
        Remote { key, services, room, version }
    }

    fn user(name: &str) -> String {
        format!("@{name}:{REMOTE}")
    }

    /// The current state event id of (type, key).
    async fn state_id(&self, kind: &str, key: &str) -> String {
        self.services.store.get_current_state_event(self.room.as_str(), kind, key).await.unwrap().unwrap().event_id
    }

    async fn head(&self) -> Vec<String> {
        let mut ids: Vec<String> =
            self.services.store.get_room_head(self.room.as_str()).await.unwrap().into_iter().map(|r| r.0).collect();
        ids.sort();
        ids
    }

    /// Signs a draft with `key`; answers the event id and the PDU.
    async fn sign_with(&self, key: &Ed25519KeyPair, d: Draft) -> (String, CanonicalJsonObject) {
        self.sign_at(key, d, None).await
    }

    /// Signs a draft at `depth` (by default one more than its deepest stored prev).
    async fn sign_at(&self, key: &Ed25519KeyPair, d: Draft, depth: Option<i64>) -> (String, CanonicalJsonObject) {
        let mut deepest = 0;
        for prev in &d.prev {
            if let Some(e) = self.services.store.get_event(prev).await.unwrap() {
                deepest = deepest.max(e.depth);
            }
        }
        let depth = depth.unwrap_or(deepest + 1) - 1;
        let mut value = json!({
            "type": d.kind,
            "sender": d.sender,
            "content": d.content,
            "origin_server_ts": d.ts,
            "depth": depth + 1,
            "prev_events": d.prev,
            "auth_events": d.auth,
            "room_id": self.room,
        });
        if let Some(k) = d.state_key {
            value["state_key"] = json!(k);
        }
        let CanonicalJsonValue::Object(mut obj) = CanonicalJsonValue::try_from(value).unwrap() else { unreachable!() };
        let rules = self.version.rules().unwrap();
        hash_and_sign_event(REMOTE, key, &mut obj, &rules.redaction).unwrap();
        let id = format!("${}", reference_hash(&obj, &rules).unwrap());
        (id, obj)
    }

    async fn sign(&self, d: Draft) -> (String, CanonicalJsonObject) {
        self.sign_with(&self.key, d).await
    }

    async fn feed(&self, pdu: CanonicalJsonObject, arrival: Arrival) -> PduOutcome {
        self.services.handle_pdu(&self.room, &self.version, pdu, arrival).await.unwrap()
    }

    /// A remote user joins a public room on top of the current head.
    async fn join(&self, name: &str, ts: i64) -> String {
        let mut auth =
            vec![self.state_id("m.room.join_rules", "").await, self.state_id("m.room.power_levels", "").await];
        auth.extend(self.create_if_listed().await);
        let user = Self::user(name);
        let (id, pdu) = self
            .sign(Draft {
                sender: user.clone(),
                kind: "m.room.member",
                state_key: Some(user),
                content: json!({"membership": "join", "displayname": name}),
                prev: self.head().await,
                auth,
                ts,
            })
            .await;
        assert!(matches!(self.feed(pdu, Arrival::Live).await, PduOutcome::Accepted { .. }));
        id
    }

    /// The create event's id, in room versions that list it among auth events (before 12).
    async fn create_if_listed(&self) -> Option<String> {
        let listed = !self.version.rules().unwrap().authorization.room_create_event_id_as_room_id;
        if listed { Some(self.state_id("m.room.create", "").await) } else { None }
    }

    /// A message draft from a joined remote user on top of `prev`.
    async fn message(&self, name: &str, body: &str, prev: Vec<String>, ts: i64) -> Draft {
        let user = Self::user(name);
        Draft {
            auth: vec![self.state_id("m.room.power_levels", "").await, self.state_id("m.room.member", &user).await],
            sender: user,
            kind: "m.room.message",
            state_key: None,
            content: json!({"msgtype": "m.text", "body": body}),
            prev,
            ts,
        }
    }
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// A public room of `@alice:localhost`, and the remote server.
async fn public_room(server: &TestServer, extra: Value) -> (String, String, Remote) {
    let (_, alice, _) = server.register("alice").await;
    let mut body = json!({"preset": "public_chat"});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    let room = server.create_room(&alice, body).await;
    let remote = Remote::new(server, &room).await;
    (alice, room, remote)
}

fn timeline_of<'a>(sync: &'a Value, room: &str) -> &'a Value {
    &sync["rooms"]["join"][room]["timeline"]["events"]
}

async fn remote_message_reaches_sync_and_messages(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, room, remote) = public_room(&server, json!({})).await;
    let first = server.sync(&alice, None, "").await;
    let since = first["next_batch"].as_str().unwrap().to_owned();

    remote.join("rita", now()).await;
    let (id, pdu) = remote.sign(remote.message("rita", "hello from afar", remote.head().await, now()).await).await;
    let outcome = remote.feed(pdu, Arrival::Live).await;
    assert!(matches!(&outcome, PduOutcome::Accepted { position: Some(p), .. } if *p > 0), "{outcome:?}");

    let sync = server.sync(&alice, Some(&since), "").await;
    assert_eq!(bodies(timeline_of(&sync, &room)), ["hello from afar"], "{sync}");
    assert_eq!(sync["rooms"]["join"][&room]["unread_notifications"]["notification_count"], 1, "push rules ran: {sync}");
    let (_, messages) =
        server.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=10"), Some(&alice)).await;
    assert_eq!(messages["chunk"][0]["event_id"], id, "{messages}");
    let (status, members) = server.get(&format!("/_matrix/client/v3/rooms/{room}/joined_members"), Some(&alice)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(members["joined"].get(Remote::user("rita")).is_some(), "{members}");
    assert_eq!(remote.head().await, [id]);
}

async fn fork_and_merge_resolve_state(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, room, remote) = public_room(&server, json!({})).await;
    let join = remote.join("rita", now()).await;
    let rita = Remote::user("rita");
    let base = now();
    // Two branches on top of the join, each renaming rita.
    let mut branches = Vec::new();
    for (name, ts) in [("Rita A", base + 1), ("Rita B", base + 2)] {
        let (id, pdu) = remote
            .sign(Draft {
                sender: rita.clone(),
                kind: "m.room.member",
                state_key: Some(rita.clone()),
                content: json!({"membership": "join", "displayname": name}),
                prev: vec![join.clone()],
                auth: vec![
                    remote.state_id("m.room.join_rules", "").await,
                    remote.state_id("m.room.power_levels", "").await,
                    join.clone(),
                ],
                ts,
            })
            .await;
        let outcome = remote.feed(pdu, Arrival::Live).await;
        assert!(matches!(outcome, PduOutcome::Accepted { .. }), "{outcome:?}");
        branches.push(id);
    }
    let mut both = branches.clone();
    both.sort();
    assert_eq!(remote.head().await, both, "a fork has two forward extremities");
    // What each rename replaced is the state before it (the join), not the room's
    // current state when it arrived (the other rename, for the second).
    for id in &branches {
        let stored = remote.services.store.get_event(id).await.unwrap().unwrap();
        assert_eq!(stored.replaces_state.as_deref(), Some(join.as_str()));
    }
    // Both renames conflict: state res v2 orders them by timestamp; the later one wins.
    let (_, name) =
        server.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/{rita}"), Some(&alice)).await;
    assert_eq!(name["displayname"], "Rita B", "{name}");

    // A merge event names both: one extremity, its state resolved from both branches.
    let mut draft = remote.message("rita", "merged", both.clone(), base + 3).await;
    draft.auth = vec![remote.state_id("m.room.power_levels", "").await, branches[1].clone()];
    let (merge, pdu) = remote.sign(draft).await;
    let outcome = remote.feed(pdu, Arrival::Live).await;
    assert!(matches!(outcome, PduOutcome::Accepted { .. }), "{outcome:?}");
    assert_eq!(remote.head().await, std::slice::from_ref(&merge));
    let (_, name) =
        server.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/{rita}"), Some(&alice)).await;
    assert_eq!(name["displayname"], "Rita B", "{name}");

    // A local send after the merge builds on the merge alone.
    let local = server.send_text(&alice, &room, "after the merge").await;
    let stored = remote.services.store.get_event(&local).await.unwrap().unwrap();
    let prevs: Value = serde_json::from_str::<Value>(&stored.json).unwrap()["prev_events"].clone();
    assert_eq!(prevs, json!([merge]));
}

async fn conflicting_power_levels_resolve_by_spec(backend: Backend) {
    let server = TestServer::start(backend).await;
    let rita = Remote::user("rita");
    let ron = Remote::user("ron");
    let (alice, room, remote) = public_room(
        &server,
        json!({"power_level_content_override": {
            "users": {rita.clone(): 100, ron.clone(): 50},
            "events": {"m.room.power_levels": 50},
        }}),
    )
    .await;
    let base = now();
    let rita_join = remote.join("rita", base).await;
    let ron_join = remote.join("ron", base + 1).await;
    let pl = remote.services.store.get_current_state_event(&room, "m.room.power_levels", "").await.unwrap().unwrap();
    let pl_content = serde_json::from_str::<Value>(&pl.json).unwrap()["content"].clone();
    let fork = remote.head().await;
    // On one branch Ron (50) raises the default level; on the other, later, Rita (100)
    // takes Ron's power away. Ron's arrives first (so neither is soft-failed).
    let mut by_ron = pl_content.clone();
    by_ron["users_default"] = json!(10);
    let mut by_rita = pl_content.clone();
    by_rita["users"][ron.as_str()] = json!(0);
    let mut made = Vec::new();
    for (sender, join, content, ts) in [(&ron, &ron_join, by_ron, base + 10), (&rita, &rita_join, by_rita, base + 20)] {
        let (id, pdu) = remote
            .sign(Draft {
                sender: sender.clone(),
                kind: "m.room.power_levels",
                state_key: Some(String::new()),
                content,
                prev: fork.clone(),
                auth: vec![pl.event_id.clone(), join.clone()],
                ts,
            })
            .await;
        let outcome = remote.feed(pdu, Arrival::Live).await;
        assert!(matches!(outcome, PduOutcome::Accepted { .. }), "{outcome:?}");
        made.push(id);
    }
    assert_eq!(remote.head().await.len(), 2);
    // State res v2 applies power events from the most powerful sender first: Rita's
    // change applies, after which Ron has no power, so his change fails the iterative
    // auth checks, although it was sent first.
    let (_, levels) =
        server.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.power_levels/"), Some(&alice)).await;
    assert_eq!(levels["users"][ron.as_str()], 0, "{levels}");
    assert_eq!(levels["users_default"], 0, "{levels}");
    assert_eq!(remote.state_id("m.room.power_levels", "").await, made[1]);
}

/// The full auth chain of each state holds the state's own events (ruma's own tests and
/// Synapse count it so). Ron joins at level 0 and is promoted to 100 by Alice; then, at
/// the same fork, Ron changes the levels (earlier) and Alice changes them another way
/// (later). Ron's join is in both states, so it is not in the auth difference: the two
/// changes are ordered by time, Ron's first, and Alice's, applied last, stands. (Counting
/// only auth events, Ron's join, sent at level 0, would sort Ron's change after Alice's.)
async fn auth_difference_counts_the_states_own_events(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ron = Remote::user("ron");
    let (alice, room, remote) = public_room(&server, json!({"room_version": "11"})).await;
    let base = now() - 60_000;
    let ron_join = remote.join("ron", base).await;
    let mut levels = serde_json::from_str::<Value>(
        &remote.services.store.get_current_state_event(&room, "m.room.power_levels", "").await.unwrap().unwrap().json,
    )
    .unwrap()["content"]
        .clone();
    levels["users"][ron.as_str()] = json!(100);
    let (status, _) = server
        .put(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.power_levels/"), Some(&alice), levels.clone())
        .await;
    assert_eq!(status, StatusCode::OK);
    let promoted = remote.state_id("m.room.power_levels", "").await;
    let fork = remote.head().await;
    // Alice's client, which syncs again once it is all over (see the end).
    let filter = "filter=%7B%22room%22%3A%7B%22timeline%22%3A%7B%22limit%22%3A1%7D%7D%7D";
    let since = server.sync(&alice, None, filter).await["next_batch"].as_str().unwrap().to_owned();

    let mut by_alice = levels.clone();
    by_alice["events"]["m.room.topic"] = json!(100);
    let (status, body) = server
        .put(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.power_levels/"), Some(&alice), by_alice)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let alices = body["event_id"].as_str().unwrap().to_owned();
    let mut by_ron = levels.clone();
    by_ron["users_default"] = json!(10);
    let (rons, pdu) = remote
        .sign(Draft {
            sender: ron.clone(),
            kind: "m.room.power_levels",
            state_key: Some(String::new()),
            content: by_ron,
            prev: fork,
            auth: [promoted, ron_join].into_iter().chain(remote.create_if_listed().await).collect(),
            ts: base + 10,
        })
        .await;
    let outcome = remote.feed(pdu, Arrival::Live).await;
    assert!(matches!(outcome, PduOutcome::Accepted { .. }), "{outcome:?}");
    assert_eq!(remote.head().await.len(), 2);
    assert_eq!(remote.state_id("m.room.power_levels", "").await, alices, "Ron's change is {rons}");
    let (_, now_levels) =
        server.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.power_levels/"), Some(&alice)).await;
    assert_eq!(now_levels["events"]["m.room.topic"], 100, "{now_levels}");
    assert_eq!(now_levels.get("users_default").cloned().unwrap_or(json!(0)), 0, "{now_levels}");

    // A limited incremental sync reports the resolved levels (Alice's, which came first
    // on the stream), not the last ones to arrive (Ron's).
    server.send_text(&alice, &room, "after the merge").await;
    let sync = server.sync(&alice, Some(&since), filter).await;
    let joined = &sync["rooms"]["join"][&room];
    assert_eq!(joined["timeline"]["limited"], true, "{sync}");
    let levels: Vec<&Value> =
        joined["state"]["events"].as_array().unwrap().iter().filter(|e| e["type"] == "m.room.power_levels").collect();
    assert_eq!(levels.len(), 1, "{sync}");
    assert_eq!(levels[0]["event_id"], alices.as_str(), "{sync}");
}

async fn child_before_parent_leaves_the_right_extremities(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, room, remote) = public_room(&server, json!({})).await;
    let join = remote.join("rita", now()).await;
    let (parent, parent_pdu) = remote.sign(remote.message("rita", "parent", vec![join.clone()], now()).await).await;
    let parent_depth = parent_pdu.get("depth").and_then(|d| d.as_integer()).map(i64::from).unwrap();
    let draft = remote.message("rita", "child", vec![parent.clone()], now() + 1).await;
    let (child, child_pdu) = remote.sign_at(&remote.key, draft, Some(parent_depth + 1)).await;
    assert!(matches!(remote.feed(child_pdu, Arrival::Live).await, PduOutcome::Accepted { .. }));
    let mut expected = vec![join.clone(), child.clone()];
    expected.sort();
    assert_eq!(remote.head().await, expected, "the join has no stored child yet");
    assert_eq!(remote.services.store.get_backward_extremities(&room).await.unwrap(), std::slice::from_ref(&parent));

    assert!(matches!(remote.feed(parent_pdu, Arrival::Live).await, PduOutcome::Accepted { .. }));
    assert_eq!(
        remote.head().await,
        std::slice::from_ref(&child),
        "the parent is not an extremity: its child is stored"
    );
    assert!(remote.services.store.get_backward_extremities(&room).await.unwrap().is_empty());
    let (_, messages) =
        server.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=10"), Some(&alice)).await;
    let got = bodies(&messages["chunk"]);
    assert!(got.contains(&"parent".to_owned()) && got.contains(&"child".to_owned()), "{messages}");
}

async fn bad_signatures_hashes_and_auth(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, room, remote) = public_room(&server, json!({})).await;
    let join = remote.join("rita", now()).await;
    let first = server.sync(&alice, None, "").await;
    let since = first["next_batch"].as_str().unwrap().to_owned();

    // Signed with a key remote.test does not have: refused, nothing stored.
    let (forged, pdu) =
        remote.sign_with(&new_key(), remote.message("rita", "forged", vec![join.clone()], now()).await).await;
    let err = remote.services.handle_pdu(&remote.room, &remote.version, pdu, Arrival::Live).await.unwrap_err();
    assert!(err.to_string().contains("signature"), "{err}");
    assert!(remote.services.store.get_event(&forged).await.unwrap().is_none());

    // A content that does not match its hash: stored redacted.
    let (tampered, mut pdu) = remote.sign(remote.message("rita", "original", vec![join.clone()], now()).await).await;
    pdu.insert(
        "content".into(),
        CanonicalJsonValue::try_from(json!({"msgtype": "m.text", "body": "tampered"})).unwrap(),
    );
    assert!(matches!(remote.feed(pdu, Arrival::Live).await, PduOutcome::Accepted { .. }));
    let stored = remote.services.store.get_event(&tampered).await.unwrap().unwrap();
    assert_eq!(serde_json::from_str::<Value>(&stored.json).unwrap()["content"], json!({}), "{}", stored.json);

    // A stranger's message: fails auth against its own auth events, stored as rejected.
    let stranger = Remote::user("stranger");
    let (rejected, pdu) = remote
        .sign(Draft {
            sender: stranger,
            kind: "m.room.message",
            state_key: None,
            content: json!({"msgtype": "m.text", "body": "let me in"}),
            prev: remote.head().await,
            auth: vec![remote.state_id("m.room.power_levels", "").await],
            ts: now(),
        })
        .await;
    let outcome = remote.feed(pdu, Arrival::Live).await;
    assert!(matches!(&outcome, PduOutcome::Rejected { .. }), "{outcome:?}");
    let status = remote.services.store.get_event_status(&rejected).await.unwrap().unwrap();
    assert!(status.1.is_some(), "stored with the reason");
    assert!(!remote.head().await.contains(&rejected), "a rejected event is no extremity");

    // Rita (power 0) makes herself admin: rejected; an event citing it as an auth event
    // is rejected too.
    let pl = remote.state_id("m.room.power_levels", "").await;
    let mut content = serde_json::from_str::<Value>(&remote.services.store.get_event(&pl).await.unwrap().unwrap().json)
        .unwrap()["content"]
        .clone();
    content["users"][Remote::user("rita")] = json!(100);
    let (coup, pdu) = remote
        .sign(Draft {
            sender: Remote::user("rita"),
            kind: "m.room.power_levels",
            state_key: Some(String::new()),
            content,
            prev: remote.head().await,
            auth: vec![pl.clone(), join.clone()],
            ts: now(),
        })
        .await;
    assert!(matches!(remote.feed(pdu, Arrival::Live).await, PduOutcome::Rejected { .. }));
    assert_eq!(remote.state_id("m.room.power_levels", "").await, pl, "a rejected event is never state");
    let mut draft = remote.message("rita", "by my new power", remote.head().await, now()).await;
    draft.auth = vec![coup.clone(), join.clone()];
    let (_, pdu) = remote.sign(draft).await;
    let outcome = remote.feed(pdu, Arrival::Live).await;
    assert!(matches!(&outcome, PduOutcome::Rejected { reason, .. } if reason.contains(&coup)), "{outcome:?}");

    let sync = server.sync(&alice, Some(&since), "").await;
    let seen: Vec<&str> =
        timeline_of(&sync, &room).as_array().unwrap().iter().filter_map(|e| e["event_id"].as_str()).collect();
    assert_eq!(seen, [tampered.as_str()], "only the redacted one reaches /sync: {sync}");
    let (_, event) = server.get(&format!("/_matrix/client/v3/rooms/{room}/event/{tampered}"), Some(&alice)).await;
    assert_eq!(event["content"], json!({}), "{event}");
    let (status, _) = server.get(&format!("/_matrix/client/v3/rooms/{room}/event/{rejected}"), Some(&alice)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "a rejected event is not served to clients");
}

async fn soft_failed_event_is_hidden(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, room, remote) = public_room(&server, json!({})).await;
    let join = remote.join("rita", now()).await;
    let old_levels = remote.state_id("m.room.power_levels", "").await;
    // Messages now need power 50, which rita lacks.
    let (_, mut levels) =
        server.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.power_levels/"), Some(&alice)).await;
    levels["events"]["m.room.message"] = json!(50);
    let (status, body) =
        server.put(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.power_levels/"), Some(&alice), levels).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let first = server.sync(&alice, None, "").await;
    let since = first["next_batch"].as_str().unwrap().to_owned();
    let head = remote.head().await;

    // Sent on top of her join (anyone could send messages then): passes against its auth
    // events and the state before it, fails against the room's current state.
    let mut draft = remote.message("rita", "from the past", vec![join.clone()], now()).await;
    draft.auth = vec![old_levels, join.clone()];
    let (id, pdu) = remote.sign(draft).await;
    let outcome = remote.feed(pdu, Arrival::Live).await;
    assert_eq!(outcome, PduOutcome::SoftFailed { event_id: id.clone().try_into().unwrap() });
    assert_eq!(remote.head().await, head, "a soft-failed event is no extremity");
    let status = remote.services.store.get_event_status(&id).await.unwrap().unwrap();
    assert!(status.2 && status.1.is_none());
    let sync = server.sync(&alice, Some(&since), "timeout=0").await;
    assert!(bodies(timeline_of(&sync, &room)).is_empty(), "{sync}");
    let (status, _) = server.get(&format!("/_matrix/client/v3/rooms/{room}/event/{id}"), Some(&alice)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Nor can a client put a receipt on it (and its syncs keep working).
    let (status, _) =
        server.post(&format!("/_matrix/client/v3/rooms/{room}/receipt/m.read/{id}"), Some(&alice), json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    server.sync(&alice, Some(&since), "timeout=0").await;
}

async fn duplicate_pdu_is_a_no_op(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_alice, _room, remote) = public_room(&server, json!({})).await;
    let join = remote.join("rita", now()).await;
    let (id, pdu) = remote.sign(remote.message("rita", "once", vec![join], now()).await).await;
    let first = remote.feed(pdu.clone(), Arrival::Live).await;
    let position = remote.services.store.current_stream_position().await.unwrap();
    let again = remote.feed(pdu, Arrival::Live).await;
    assert!(matches!(first, PduOutcome::Accepted { .. }));
    assert_eq!(again, PduOutcome::Duplicate { event_id: id.try_into().unwrap() });
    assert_eq!(remote.services.store.current_stream_position().await.unwrap(), position);
}

async fn outliers_take_no_positions_and_wake_no_sync(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_alice, room, remote) = public_room(&server, json!({})).await;
    let services = &remote.services;
    let alice = ruma::OwnedUserId::try_from("@alice:localhost").unwrap();
    let mut woken = services.notifier.subscribe(&alice);
    woken.mark_unchanged();
    let position = services.store.current_stream_position().await.unwrap();
    let head = remote.head().await;
    let auth = vec![remote.state_id("m.room.join_rules", "").await, remote.state_id("m.room.power_levels", "").await];

    // A join's state: 2,100 members (more than one multi-row insert), a stranger's message failing
    // auth, and one event signed by an unknown key.
    let mut pdus = Vec::new();
    let mut ids = Vec::new();
    for i in 0..2100 {
        let user = Remote::user(&format!("m{i}"));
        let (id, pdu) = remote
            .sign(Draft {
                sender: user.clone(),
                kind: "m.room.member",
                state_key: Some(user),
                content: json!({"membership": "join"}),
                prev: head.clone(),
                auth: auth.clone(),
                ts: now(),
            })
            .await;
        ids.push(id);
        pdus.push(pdu);
    }
    let (stranger, pdu) = remote
        .sign(Draft {
            sender: Remote::user("stranger"),
            kind: "m.room.message",
            state_key: None,
            content: json!({"body": "hi"}),
            prev: head.clone(),
            auth: vec![auth[1].clone()],
            ts: now(),
        })
        .await;
    pdus.push(pdu);
    let forged_draft = Draft {
        sender: Remote::user("m0"),
        kind: "m.room.message",
        state_key: None,
        content: json!({"body": "forged"}),
        prev: head.clone(),
        auth: vec![auth[1].clone(), ids[0].clone()],
        ts: now(),
    };
    let (_, forged) = remote.sign_with(&new_key(), forged_draft).await;
    pdus.push(forged);

    // A power levels change by a member without power (rejected), and after it in the
    // batch but before it in order, an event citing it as an auth event (rejected too).
    let (coup, coup_pdu) = remote
        .sign(Draft {
            sender: Remote::user("m0"),
            kind: "m.room.power_levels",
            state_key: Some(String::new()),
            content: json!({"users": {Remote::user("m0"): 100}}),
            prev: head.clone(),
            auth: vec![auth[1].clone(), ids[0].clone()],
            ts: now(),
        })
        .await;
    let (_, follower) = remote
        .sign(Draft {
            sender: Remote::user("m1"),
            kind: "m.room.topic",
            state_key: Some(String::new()),
            content: json!({"topic": "mine now"}),
            prev: vec![coup.clone()],
            auth: vec![coup.clone(), ids[1].clone()],
            ts: now(),
        })
        .await;
    pdus.push(follower);
    pdus.push(coup_pdu);

    let started = std::time::Instant::now();
    let mut outcomes = services.handle_outliers(&remote.room, &remote.version, pdus).await.unwrap();
    let coup_outcome = outcomes.pop().unwrap().unwrap();
    let follower_outcome = outcomes.pop().unwrap().unwrap();
    assert!(matches!(coup_outcome, PduOutcome::Rejected { .. }), "{coup_outcome:?}");
    assert!(
        matches!(&follower_outcome, PduOutcome::Rejected { reason, .. } if reason.contains(&coup)),
        "{follower_outcome:?}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "{:?}", started.elapsed());
    assert_eq!(outcomes.len(), 2102);
    assert!(outcomes[..2100].iter().all(|o| matches!(o, Ok(PduOutcome::Accepted { position: None, .. }))));
    assert!(matches!(&outcomes[2100], Ok(PduOutcome::Rejected { event_id, .. }) if *event_id == stranger));
    assert!(outcomes[2101].is_err(), "a bad signature is refused");

    assert_eq!(services.store.current_stream_position().await.unwrap(), position, "no stream positions");
    assert!(!woken.has_changed().unwrap(), "no /sync woken");
    assert_eq!(remote.head().await, head, "outliers are no extremities");
    assert_eq!(services.store.get_event_status(&ids[2099]).await.unwrap(), Some((true, None, false)));
    let (status, _) = server.get(&format!("/_matrix/client/v3/rooms/{room}/event/{}", ids[0]), Some(&_alice)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "outliers are not served to clients");

    // The join's state before, from the state list, as one group.
    let mut state: Vec<(String, String, String)> = services
        .store
        .get_current_state_events(&room, &[])
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.event_type, e.state_key.unwrap_or_default(), e.event_id))
        .collect();
    state.extend(
        ids.iter().enumerate().map(|(i, id)| ("m.room.member".into(), Remote::user(&format!("m{i}")), id.clone())),
    );
    let group = services.store_state_group(&remote.room, &state).await.unwrap();
    assert_eq!(services.store.get_state_group(group, None, None).await.unwrap().len(), state.len());

    // The check above can fail: a live event does wake the room's members.
    remote.join("rita", now()).await;
    assert!(woken.has_changed().unwrap());
}

async fn backfilled_history_sorts_before_the_stream(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, room, remote) = public_room(&server, json!({})).await;
    let join = remote.join("rita", now()).await;
    let services = &remote.services;
    let (parent, parent_pdu) = remote.sign(remote.message("rita", "older", vec![join.clone()], now()).await).await;
    let parent_depth = parent_pdu.get("depth").and_then(|d| d.as_integer()).map(i64::from).unwrap();
    let draft = remote.message("rita", "newer", vec![parent.clone()], now() + 1).await;
    let (child, child_pdu) = remote.sign_at(&remote.key, draft, Some(parent_depth + 1)).await;
    assert!(matches!(remote.feed(child_pdu, Arrival::Live).await, PduOutcome::Accepted { .. }));

    // The gap is filled by backfill: a position before the live stream, no wake-up.
    let alice_id = ruma::OwnedUserId::try_from("@alice:localhost").unwrap();
    let mut woken = services.notifier.subscribe(&alice_id);
    woken.mark_unchanged();
    let position = services.store.current_stream_position().await.unwrap();
    let outcome = remote.feed(parent_pdu, Arrival::Backfill).await;
    assert!(matches!(outcome, PduOutcome::Accepted { position: Some(p), .. } if p < 0), "{outcome:?}");
    assert_eq!(services.store.current_stream_position().await.unwrap(), position);
    assert!(!woken.has_changed().unwrap(), "backfill wakes no /sync");
    assert_eq!(remote.head().await, std::slice::from_ref(&child));
    assert!(services.store.get_backward_extremities(&room).await.unwrap().is_empty());

    // /messages pages by topology: the backfilled event sits between its child and its
    // parent, one page at a time through the `end` tokens.
    let mut seen = Vec::new();
    let mut from: Option<String> = None;
    for _ in 0..3 {
        let mut path = format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=1");
        if let Some(from) = &from {
            path.push_str(&format!("&from={from}"));
        }
        let (status, page) = server.get(&path, Some(&alice)).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        seen.push(page["chunk"][0]["event_id"].as_str().unwrap().to_owned());
        from = Some(page["end"].as_str().unwrap().to_owned());
    }
    assert_eq!(seen, [child.clone(), parent.clone(), join.clone()]);

    // A stream token (as /sync's prev_batch, or /messages gave before) still works.
    let child_pos = services.store.get_event(&child).await.unwrap().unwrap().stream_ordering;
    for token in [format!("t{child_pos}"), format!("s{child_pos}_0")] {
        let (status, page) = server
            .get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=2&from={token}"), Some(&alice))
            .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let ids: Vec<&str> =
            page["chunk"].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap()).collect();
        assert_eq!(ids, [child.as_str(), parent.as_str()], "{token}");
    }
    // And forwards from the join: parent, then child.
    let join_event = services.store.get_event(&join).await.unwrap().unwrap();
    let from = format!("t{}-{}", join_event.depth, join_event.stream_ordering);
    let (_, page) =
        server.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=f&limit=5&from={from}"), Some(&alice)).await;
    let ids: Vec<&str> = page["chunk"].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap()).collect();
    assert_eq!(ids, [parent.as_str(), child.as_str()], "{page}");
    // /context of the backfilled event.
    let (status, context) =
        server.get(&format!("/_matrix/client/v3/rooms/{room}/context/{parent}?limit=2"), Some(&alice)).await;
    assert_eq!(status, StatusCode::OK, "{context}");
    assert_eq!(context["events_before"][0]["event_id"], join, "{context}");
    assert_eq!(context["events_after"][0]["event_id"], child, "{context}");
}

async fn membership_follows_resolution_not_arrival(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, room, remote) = public_room(&server, json!({})).await;
    let join = remote.join("rita", now()).await;
    let rita = Remote::user("rita");
    let base = now();
    // Two branches: a rename sent later arrives first, a leave sent earlier arrives last.
    // State res v2 orders the two (neither is a power event) by time: the rename wins.
    let drafts = [
        (json!({"membership": "join", "displayname": "Rita"}), base + 20),
        (json!({"membership": "leave"}), base + 10),
    ];
    for (content, ts) in drafts {
        let (_, pdu) = remote
            .sign(Draft {
                sender: rita.clone(),
                kind: "m.room.member",
                state_key: Some(rita.clone()),
                content: content.clone(),
                prev: vec![join.clone()],
                auth: if content["membership"] == "join" {
                    vec![
                        remote.state_id("m.room.join_rules", "").await,
                        remote.state_id("m.room.power_levels", "").await,
                        join.clone(),
                    ]
                } else {
                    vec![remote.state_id("m.room.power_levels", "").await, join.clone()]
                },
                ts,
            })
            .await;
        let outcome = remote.feed(pdu, Arrival::Live).await;
        assert!(matches!(outcome, PduOutcome::Accepted { .. }), "{outcome:?}");
    }
    assert_eq!(remote.head().await.len(), 2);
    let membership = remote.services.store.get_membership(&room, &rita).await.unwrap().unwrap();
    assert_eq!(membership.membership, "join", "not the last arrival's leave");
    let (_, members) = server.get(&format!("/_matrix/client/v3/rooms/{room}/joined_members"), Some(&alice)).await;
    assert_eq!(members["joined"][rita.as_str()]["display_name"], "Rita", "{members}");
}

async fn parallel_pdus_and_local_sends_keep_the_head_true(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, room, remote) = public_room(&server, json!({})).await;
    let join = remote.join("rita", now()).await;
    let (id, pdu) = remote.sign(remote.message("rita", "once", vec![join.clone()], now()).await).await;
    // The same PDU eight times at once (a retried /send) while alice sends four messages.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (services, room_id, version, pdu) =
            (remote.services.clone(), remote.room.clone(), remote.version.clone(), pdu.clone());
        tasks.spawn(async move { Some(services.handle_pdu(&room_id, &version, pdu, Arrival::Live).await.unwrap()) });
    }
    for i in 0..4 {
        let (base, http, alice, room) = (server.base.clone(), server.http.clone(), alice.clone(), room.clone());
        tasks.spawn(async move {
            let url = format!("{base}/_matrix/client/v3/rooms/{room}/send/m.room.message/par{i}");
            let resp =
                http.put(url).bearer_auth(alice).json(&json!({"msgtype": "m.text", "body": "local"})).send().await;
            assert_eq!(resp.unwrap().status(), StatusCode::OK);
            None
        });
    }
    let mut outcomes = Vec::new();
    while let Some(outcome) = tasks.join_next().await {
        outcomes.extend(outcome.unwrap());
    }
    let accepted = outcomes.iter().filter(|o| matches!(o, PduOutcome::Accepted { .. })).count();
    let duplicates = outcomes.iter().filter(|o| matches!(o, PduOutcome::Duplicate { .. })).count();
    assert_eq!((accepted, duplicates), (1, 7), "{outcomes:?}");

    // The cached head and the database agree, and a local send merges whatever forked.
    let last = server.send_text(&alice, &room, "after").await;
    assert_eq!(remote.head().await, std::slice::from_ref(&last));
    let (_, messages) =
        server.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=20"), Some(&alice)).await;
    let ids: Vec<&str> =
        messages["chunk"].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap()).collect();
    assert_eq!(ids.iter().filter(|e| **e == id).count(), 1, "{messages}");
    assert_eq!(bodies(&messages["chunk"]).iter().filter(|b| *b == "local").count(), 4);
}

async fn backfilled_history_follows_the_visibility_in_its_state(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, room, remote) = public_room(
        &server,
        json!({"initial_state": [{"type": "m.room.history_visibility", "state_key": "", "content": {"history_visibility": "joined"}}]}),
    )
    .await;
    let join = remote.join("rita", now()).await;
    let (parent, parent_pdu) = remote.sign(remote.message("rita", "before bob", vec![join.clone()], now()).await).await;
    let parent_depth = parent_pdu.get("depth").and_then(|d| d.as_integer()).map(i64::from).unwrap();
    let draft = remote.message("rita", "also before bob", vec![parent.clone()], now() + 1).await;
    let (_, child_pdu) = remote.sign_at(&remote.key, draft, Some(parent_depth + 1)).await;
    assert!(matches!(remote.feed(child_pdu, Arrival::Live).await, PduOutcome::Accepted { .. }));
    let (_, bob, _) = server.register("bob").await;
    server.join(&bob, &room).await;
    // Backfilled after bob joined: its position sorts before everything, but its state
    // says the room showed history to members only, and bob was not one.
    assert!(matches!(remote.feed(parent_pdu, Arrival::Backfill).await, PduOutcome::Accepted { .. }));

    let (_, page) = server.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=50"), Some(&bob)).await;
    let got = bodies(&page["chunk"]);
    assert!(!got.iter().any(|b| b.contains("before bob")), "{page}");
    let (status, _) = server.get(&format!("/_matrix/client/v3/rooms/{room}/event/{parent}"), Some(&bob)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Alice was joined then: she sees both.
    let (_, page) = server.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=50"), Some(&alice)).await;
    assert_eq!(bodies(&page["chunk"]), ["also before bob", "before bob"], "{page}");
}

/// Signs a PDU as `server` with `key`; answers its id and the PDU.
pub(crate) fn sign_pdu(
    server: &str,
    key: &Ed25519KeyPair,
    value: Value,
    version: &RoomVersionId,
) -> (String, CanonicalJsonObject) {
    let CanonicalJsonValue::Object(mut obj) = CanonicalJsonValue::try_from(value).unwrap() else { unreachable!() };
    let rules = version.rules().unwrap();
    hash_and_sign_event(server, key, &mut obj, &rules.redaction).unwrap();
    (format!("${}", reference_hash(&obj, &rules).unwrap()), obj)
}

async fn joining_a_remote_room(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (bob_id, bob, _) = server.register("bob").await;
    let services = server.running.as_ref().unwrap().services.clone();
    let key = new_key();
    services.known_keys.add(REMOTE, "ed25519:1", &key.public_key());
    let version = RoomVersionId::V12;
    let rita = Remote::user("rita");
    let ts = now();
    // remote.test's room: create, rita's join, power levels, public join rules.
    let event = |kind: &str, state_key: &str, content: Value, depth: i64, prev: &[&str], auth: &[&str]| {
        json!({"type": kind, "state_key": state_key, "sender": rita, "content": content, "origin_server_ts": ts + depth,
               "depth": depth, "prev_events": prev, "auth_events": auth})
    };
    let (create, create_pdu) =
        sign_pdu(REMOTE, &key, event("m.room.create", "", json!({"room_version": "12"}), 1, &[], &[]), &version);
    let room = OwnedRoomId::try_from(format!("!{}", &create[1..])).unwrap();
    let in_room = |mut v: Value| {
        v["room_id"] = json!(room);
        v
    };
    let (rita_join, rita_join_pdu) = sign_pdu(
        REMOTE,
        &key,
        in_room(event("m.room.member", &rita, json!({"membership": "join"}), 2, &[&create], &[])),
        &version,
    );
    let (pl, pl_pdu) = sign_pdu(
        REMOTE,
        &key,
        in_room(event("m.room.power_levels", "", json!({"users_default": 0}), 3, &[&rita_join], &[&rita_join])),
        &version,
    );
    let (jr, jr_pdu) = sign_pdu(
        REMOTE,
        &key,
        in_room(event("m.room.join_rules", "", json!({"join_rule": "public"}), 4, &[&pl], &[&pl, &rita_join])),
        &version,
    );
    // 300 more members, so that the join sets a large state.
    let mut members = Vec::new();
    for i in 0..300 {
        let user = Remote::user(&format!("m{i}"));
        let value = json!({"type": "m.room.member", "state_key": user, "sender": user, "content": {"membership": "join"},
               "origin_server_ts": ts + 5, "depth": 5, "prev_events": [jr], "auth_events": [jr, pl], "room_id": room});
        let (id, pdu) = sign_pdu(REMOTE, &key, value, &version);
        members.push((user, id, pdu));
    }
    // Bob's join, as make_join gives it and this server signs it.
    let (join, join_pdu) = sign_pdu(
        "localhost",
        &services.signing_key,
        json!({"type": "m.room.member", "state_key": bob_id, "sender": bob_id, "content": {"membership": "join"},
               "origin_server_ts": ts + 5, "depth": 5, "prev_events": [jr], "auth_events": [jr, pl], "room_id": room}),
        &version,
    );

    // What a send_join answer gives: the state and auth chain as outliers, the state
    // before the join as a group, then the join itself.
    services.ensure_remote_room(&room, &version, &ruma::OwnedUserId::try_from(rita.as_str()).unwrap()).await.unwrap();
    let outcomes = services
        .handle_outliers(&room, &version, vec![create_pdu, rita_join_pdu, pl_pdu, jr_pdu.clone()])
        .await
        .unwrap();
    let member_outcomes =
        services.handle_outliers(&room, &version, members.iter().map(|m| m.2.clone()).collect()).await.unwrap();
    assert!(member_outcomes.iter().all(|o| matches!(o, Ok(PduOutcome::Accepted { .. }))));
    assert!(outcomes.iter().all(|o| matches!(o, Ok(PduOutcome::Accepted { position: None, .. }))), "{outcomes:?}");
    let state: Vec<(String, String, String)> = vec![
        ("m.room.create".into(), String::new(), create.clone()),
        ("m.room.member".into(), rita.clone(), rita_join.clone()),
        ("m.room.power_levels".into(), String::new(), pl.clone()),
        ("m.room.join_rules".into(), String::new(), jr.clone()),
    ];
    let mut state = state;
    state.extend(members.iter().map(|(user, id, _)| ("m.room.member".to_owned(), user.clone(), id.clone())));
    let group = services.store_state_group(&room, &state).await.unwrap();
    let outcome = services.handle_join_pdu(&room, &version, join_pdu, group).await.unwrap();
    assert!(matches!(outcome, PduOutcome::Accepted { position: Some(_), .. }), "{outcome:?}");

    let remote = Remote { key, services: services.clone(), room: room.clone(), version: version.clone() };
    assert_eq!(remote.head().await, std::slice::from_ref(&join));
    assert_eq!(services.store.get_backward_extremities(room.as_str()).await.unwrap(), std::slice::from_ref(&jr));
    let sync = server.sync(&bob, None, "").await;
    let joined = &sync["rooms"]["join"][room.as_str()];
    let state_ids: Vec<&str> = joined["state"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .chain(joined["timeline"]["events"].as_array().unwrap())
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    for id in [&create, &rita_join, &pl, &jr, &join] {
        assert!(state_ids.contains(&id.as_str()), "{id} in {sync}");
    }
    let since = sync["next_batch"].as_str().unwrap().to_owned();
    let (_, members) = server.get(&format!("/_matrix/client/v3/rooms/{room}/joined_members"), Some(&bob)).await;
    assert_eq!(members["joined"].as_object().unwrap().len(), 302, "{members}");

    // Rita's next message reaches bob.
    let (_, pdu) = remote.sign(remote.message("rita", "welcome", vec![join.clone()], now()).await).await;
    assert!(matches!(remote.feed(pdu, Arrival::Live).await, PduOutcome::Accepted { .. }));
    let sync = server.sync(&bob, Some(&since), "").await;
    assert_eq!(bodies(timeline_of(&sync, room.as_str())), ["welcome"], "{sync}");

    // Backfill brings the join rules event again: the outlier joins the room's history,
    // before the stream, and backfill goes on from its prev.
    let outcome = remote.feed(jr_pdu, Arrival::Backfill).await;
    assert!(matches!(outcome, PduOutcome::Accepted { position: Some(p), .. } if p < 0), "{outcome:?}");
    assert_eq!(services.store.get_event_status(&jr).await.unwrap(), Some((false, None, false)));
    assert_eq!(services.store.get_backward_extremities(room.as_str()).await.unwrap(), std::slice::from_ref(&pl));
    assert_eq!(remote.head().await.len(), 1, "backfill leaves the forward extremities alone");
    let (_, page) = server.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=10"), Some(&bob)).await;
    let ids: Vec<&str> = page["chunk"].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap()).collect();
    assert_eq!(&ids[1..], [join.as_str(), jr.as_str()], "{page}");
}

backend_tests!(
    remote_message_reaches_sync_and_messages,
    fork_and_merge_resolve_state,
    conflicting_power_levels_resolve_by_spec,
    auth_difference_counts_the_states_own_events,
    child_before_parent_leaves_the_right_extremities,
    bad_signatures_hashes_and_auth,
    soft_failed_event_is_hidden,
    duplicate_pdu_is_a_no_op,
    outliers_take_no_positions_and_wake_no_sync,
    backfilled_history_sorts_before_the_stream,
    membership_follows_resolution_not_arrival,
    parallel_pdus_and_local_sends_keep_the_head_true,
    backfilled_history_follows_the_visibility_in_its_state,
    joining_a_remote_room,
    a_state_snapshot_costs_the_rooms_state_not_the_servers,
    backfilled_events_never_become_forward_extremities,
    remote_and_backfilled_messages_are_searchable_as_their_state_allows,
    soft_failed_messages_are_not_searchable,
);

/// Backfill brings history oldest first, so each backfilled event arrives before its
/// child. It must not become a forward extremity meanwhile: local events would name
/// old history as their prev, and every backfilled event would cost a state resolution
/// against the current state (a page of 100 took 1.5 s after joining a room of 1,000).
async fn backfilled_events_never_become_forward_extremities(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, room, remote) = public_room(&server, json!({})).await;
    let join = remote.join("rita", now()).await;
    let services = &remote.services;
    // rita's m1 <- m2 <- m3; m3 comes live (m2 is missing), then m1 and m2 by backfill.
    let (m1, m1_pdu) = remote.sign(remote.message("rita", "m1", vec![join.clone()], now()).await).await;
    let depth = |pdu: &CanonicalJsonObject| pdu.get("depth").and_then(|d| d.as_integer()).map(i64::from).unwrap();
    let (m2, m2_pdu) = remote
        .sign_at(&remote.key, remote.message("rita", "m2", vec![m1.clone()], now()).await, Some(depth(&m1_pdu) + 1))
        .await;
    let (m3, m3_pdu) = remote
        .sign_at(&remote.key, remote.message("rita", "m3", vec![m2.clone()], now()).await, Some(depth(&m2_pdu) + 1))
        .await;
    assert!(matches!(remote.feed(m3_pdu, Arrival::Live).await, PduOutcome::Accepted { .. }));
    let mut tips = vec![join.clone(), m3.clone()];
    tips.sort();
    assert_eq!(remote.head().await, tips, "m3's ancestors are not known yet");

    let outcome = remote.feed(m1_pdu, Arrival::Backfill).await;
    assert!(matches!(outcome, PduOutcome::Accepted { position: Some(p), .. } if p < 0), "{outcome:?}");
    assert_eq!(remote.head().await, std::slice::from_ref(&m3), "m1 (its child m2 not here yet) is no extremity");
    // A local message now names m3 alone.
    let sent = server.send_text(&alice, &room, "after the first backfill").await;
    let stored = services.store.get_event(&sent).await.unwrap().unwrap();
    let prevs: Value = serde_json::from_str::<Value>(&stored.json).unwrap()["prev_events"].clone();
    assert_eq!(prevs, json!([m3]), "{}", stored.json);

    let outcome = remote.feed(m2_pdu, Arrival::Backfill).await;
    assert!(matches!(outcome, PduOutcome::Accepted { position: Some(p), .. } if p < 0), "{outcome:?}");
    assert_eq!(remote.head().await, std::slice::from_ref(&sent));
    let (_, page) = server.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=4"), Some(&alice)).await;
    assert_eq!(bodies(&page["chunk"]), ["after the first backfill", "m3", "m2", "m1"], "{page}");
}

/// Every 64th state event of a room starts a new full copy of the room's state (a
/// snapshot group) from the chain of deltas before it. That copy must cost the size of
/// the room's state, not of every state entry on the server: it runs in the writer's
/// transaction. (It used to be a correlated `NOT EXISTS` that SQLite planned as a scan of
/// all of `state_group_entries` for each entry copied: over a second in a room of 600
/// members, growing with the server's history.)
async fn a_state_snapshot_costs_the_rooms_state_not_the_servers(backend: Backend) {
    let server = TestServer::start(backend).await;
    let services = server.running.as_ref().unwrap().services.clone();
    // Other rooms' state on the server: 60,000 entries.
    for g in 0..12 {
        let entries: Vec<(String, String, String)> = (0..5000)
            .map(|i| ("m.room.member".to_owned(), format!("@u{i}:elsewhere.test"), format!("$g{g}e{i}")))
            .collect();
        services.store.insert_state_group(&format!("!other{g}:elsewhere.test"), &entries).await.unwrap();
    }
    let (_, alice, _) = server.register("alice").await;
    let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    // 320 state events of distinct keys: the room's state grows to 325 entries, and a
    // snapshot is made every 64 of them.
    let mut slowest = std::time::Duration::ZERO;
    for i in 0..320 {
        let t = std::time::Instant::now();
        let path = format!("/_matrix/client/v3/rooms/{room}/state/org.example.setting/key{i}");
        let (status, body) = server.put(&path, Some(&alice), json!({"value": i})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        slowest = slowest.max(t.elapsed());
    }
    assert!(slowest < std::time::Duration::from_secs(2), "the slowest state event took {slowest:?}");
    // The room's newest group, snapshot or delta, holds the whole state.
    let head = services.store.get_room_head(&room).await.unwrap();
    let state = services.store.get_state_group(head[0].2, None, None).await.unwrap();
    assert_eq!(state.iter().filter(|(t, _, _)| t == "org.example.setting").count(), 320);
    let last = state.iter().find(|(t, k, _)| t == "org.example.setting" && k == "key319").map(|(_, _, id)| id.clone());
    assert_eq!(last, Some(head[0].0.clone()), "{state:?}");
    for kind in ["m.room.create", "m.room.power_levels", "m.room.join_rules", "m.room.history_visibility"] {
        assert!(state.iter().any(|(t, _, _)| t == kind), "{kind} in {state:?}");
    }
    assert!(state.iter().any(|(t, k, _)| t == "m.room.member" && k.starts_with("@alice:")), "{state:?}");
}

/// `POST /search` finds messages from another server, live and backfilled (indexed in
/// their own transaction like local ones), each as its own state allows.
async fn remote_and_backfilled_messages_are_searchable_as_their_state_allows(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, room, remote) = public_room(
        &server,
        json!({"initial_state": [{"type": "m.room.history_visibility", "state_key": "", "content": {"history_visibility": "joined"}}]}),
    )
    .await;
    let join = remote.join("rita", now()).await;
    let (parent, parent_pdu) =
        remote.sign(remote.message("rita", "narwhal older", vec![join.clone()], now()).await).await;
    let parent_depth = parent_pdu.get("depth").and_then(|d| d.as_integer()).map(i64::from).unwrap();
    let draft = remote.message("rita", "narwhal newer", vec![parent.clone()], now() + 1).await;
    let (child, child_pdu) = remote.sign_at(&remote.key, draft, Some(parent_depth + 1)).await;
    assert!(matches!(remote.feed(child_pdu, Arrival::Live).await, PduOutcome::Accepted { .. }));
    let (_, bob, _) = server.register("bob").await;
    server.join(&bob, &room).await;
    assert!(matches!(remote.feed(parent_pdu, Arrival::Backfill).await, PduOutcome::Accepted { .. }));

    let search = |token: String| {
        let server = &server;
        async move {
            let body = json!({"search_categories": {"room_events": {"search_term": "narwhal", "order_by": "recent"}}});
            let (status, found) = server.post("/_matrix/client/v3/search", Some(&token), body).await;
            assert_eq!(status, StatusCode::OK, "{found}");
            let results = found["search_categories"]["room_events"]["results"].as_array().cloned().unwrap_or_default();
            results.iter().map(|r| r["result"]["event_id"].as_str().unwrap().to_owned()).collect::<Vec<_>>()
        }
    };
    // Alice was there: the live one, then the backfilled one (its position is older).
    assert_eq!(search(alice.clone()).await, [child.clone(), parent.clone()]);
    // Bob joined after both, and the room shows history to members only: the backfilled
    // one's position sorts before his join, but its state says he was not a member.
    assert!(search(bob.clone()).await.is_empty());
}

/// A soft-failed message is stored but never shown: search does not find it either.
async fn soft_failed_messages_are_not_searchable(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, room, remote) = public_room(&server, json!({})).await;
    let join = remote.join("rita", now()).await;
    let old_levels = remote.state_id("m.room.power_levels", "").await;
    let (_, mut levels) =
        server.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.power_levels/"), Some(&alice)).await;
    levels["events"]["m.room.message"] = json!(50);
    let (status, body) =
        server.put(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.power_levels/"), Some(&alice), levels).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut draft = remote.message("rita", "okapi from the past", vec![join.clone()], now()).await;
    draft.auth = vec![old_levels, join.clone()];
    let (id, pdu) = remote.sign(draft).await;
    assert_eq!(remote.feed(pdu, Arrival::Live).await, PduOutcome::SoftFailed { event_id: id.try_into().unwrap() });
    server.send_text(&alice, &room, "okapi from alice").await;

    let body = json!({"search_categories": {"room_events": {"search_term": "okapi"}}});
    let (status, found) = server.post("/_matrix/client/v3/search", Some(&alice), body).await;
    assert_eq!(status, StatusCode::OK, "{found}");
    let found = &found["search_categories"]["room_events"];
    assert_eq!(found["count"], 1, "{found}");
    assert_eq!(found["results"][0]["result"]["content"]["body"], "okapi from alice", "{found}");
}
