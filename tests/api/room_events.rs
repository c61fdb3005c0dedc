//! Room creation built whole or not at all, concurrent creation, checks of the content
//! of state events, transaction id scopes, sizes, and the `unsigned` fields of state
//! events (`replaces_state`, `prev_content`, `prev_sender`) wherever clients read them.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{
    backend_tests,
    common::{Backend, TestServer, assert_error},
};

async fn joined_rooms(server: &TestServer, token: &str) -> Vec<Value> {
    let (status, body) = server.get("/_matrix/client/v3/joined_rooms", Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["joined_rooms"].as_array().unwrap().clone()
}

async fn concurrent_create_room_makes_distinct_rooms(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    // A bot creating rooms at once, with identical requests: room version 12 names a
    // room by its create event's hash, so same-millisecond creations would collide.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let (http, base, token) = (server.http.clone(), server.base.clone(), alice.clone());
        tasks.spawn(async move {
            let resp = http
                .post(format!("{base}/_matrix/client/v3/createRoom"))
                .bearer_auth(token)
                .json(&json!({"preset": "private_chat", "room_version": "12"}))
                .send()
                .await
                .unwrap();
            (resp.status(), resp.json::<Value>().await.unwrap())
        });
    }
    let mut ids = Vec::new();
    while let Some(result) = tasks.join_next().await {
        let (status, body) = result.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        ids.push(body["room_id"].as_str().unwrap().to_owned());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 10, "ten distinct rooms: {ids:?}");
    assert_eq!(joined_rooms(&server, &alice).await.len(), 10);
    server.stop().await;
}

async fn failed_create_room_leaves_nothing(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_id, alice, _) = server.register("alice").await;
    let create = |body: Value| {
        let server = &server;
        let alice = alice.clone();
        async move { server.post("/_matrix/client/v3/createRoom", Some(&alice), body).await }
    };
    // Too large a name: the event cannot be built.
    assert_error(&create(json!({"name": "n".repeat(70_000)})).await, StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE");
    // A local invitee who does not exist.
    let nobody = format!("@nobody:{}", alice_id.split_once(':').unwrap().1);
    assert_error(&create(json!({"invite": [nobody]})).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    // Power levels that lock the creator out of the rest of the room's set-up.
    let lock_out = json!({"users": {alice_id.clone(): 0}, "state_default": 50});
    assert_error(
        &create(json!({"room_version": "11", "power_level_content_override": lock_out, "name": "x"})).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    // Power levels that are not power levels.
    assert_error(
        &create(json!({"power_level_content_override": {"ban": "high"}})).await,
        StatusCode::BAD_REQUEST,
        "M_BAD_JSON",
    );
    // Bad initial state, after several good events.
    let initial_state = json!([
        {"type": "m.room.topic", "state_key": "", "content": {"topic": "fine"}},
        {"type": "m.room.join_rules", "state_key": "", "content": {"join_rule": 5}},
    ]);
    assert_error(&create(json!({"initial_state": initial_state})).await, StatusCode::BAD_REQUEST, "M_BAD_JSON");
    // Too many invitees or initial state events.
    let invite: Vec<String> = (0..101).map(|i| format!("@u{i}:localhost")).collect();
    assert_error(&create(json!({"invite": invite})).await, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let state: Vec<Value> =
        (0..101).map(|i| json!({"type": "m.custom", "state_key": format!("{i}"), "content": {}})).collect();
    assert_error(&create(json!({"initial_state": state})).await, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    // An alias that is taken.
    server.create_room(&alice, json!({"room_alias_name": "taken"})).await;
    assert_error(&create(json!({"room_alias_name": "taken"})).await, StatusCode::BAD_REQUEST, "M_ROOM_IN_USE");

    // Only the one good room exists, for the creator and in the database.
    assert_eq!(joined_rooms(&server, &alice).await.len(), 1);
    let sync = server.sync(&alice, None, "").await;
    assert_eq!(sync["rooms"]["join"].as_object().unwrap().len(), 1, "{sync}");
    server.stop().await;
}

async fn state_content_is_checked(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (bob_id, bob, _) = server.register("bob").await;
    let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    let state = |event_type: &str, key: &str| format!("/_matrix/client/v3/rooms/{room}/state/{event_type}/{key}");
    for (event_type, content) in [
        ("m.room.join_rules", json!({"join_rule": 5})),
        ("m.room.join_rules", json!({"join_rule": "everyone"})),
        ("m.room.power_levels", json!({"users": {"@alice:localhost": "100"}})),
        ("m.room.power_levels", json!({"events": []})),
        ("m.room.history_visibility", json!({"history_visibility": "forever"})),
        ("m.room.name", json!({"name": {"text": "x"}})),
    ] {
        let result = server.put(&state(event_type, ""), Some(&alice), content.clone()).await;
        assert_error(&result, StatusCode::BAD_REQUEST, "M_BAD_JSON");
    }
    // Nothing of it reached the room: joins and profile updates still work.
    server.join(&bob, &room).await;
    let (status, body) = server
        .put(&format!("/_matrix/client/v3/profile/{bob_id}/displayname"), Some(&bob), json!({"displayname": "Bob"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, member) = server.get(&state("m.room.member", &bob_id), Some(&alice)).await;
    assert_eq!(member["displayname"], "Bob", "{member}");
    let (_, rules) = server.get(&state("m.room.join_rules", ""), Some(&alice)).await;
    assert_eq!(rules, json!({"join_rule": "public"}));

    // The spec's 255-byte limits on event types and state keys.
    let long = "k".repeat(256);
    assert_error(
        &server.put(&state("m.custom", &long), Some(&alice), json!({})).await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_PARAM",
    );
    let send = format!("/_matrix/client/v3/rooms/{room}/send/{long}/t1");
    assert_error(&server.put(&send, Some(&alice), json!({})).await, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let initial = json!({"initial_state": [{"type": long, "state_key": "", "content": {}}]});
    assert_error(
        &server.post("/_matrix/client/v3/createRoom", Some(&alice), initial).await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_PARAM",
    );
    let fits = "k".repeat(255);
    assert_eq!(server.put(&state("m.custom", &fits), Some(&alice), json!({})).await.0, StatusCode::OK);
    server.stop().await;
}

async fn transaction_ids_are_scoped_to_the_endpoint(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    let alices_room = server.create_room(&alice, json!({})).await;
    let bobs_room = server.create_room(&bob, json!({})).await;
    let send =
        |room: &str, event_type: &str, txn: &str| format!("/_matrix/client/v3/rooms/{room}/send/{event_type}/{txn}");
    let (status, first) = server
        .put(&send(&bobs_room, "m.room.message", "dup"), Some(&bob), json!({"body": "hi", "msgtype": "m.text"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    // The same id in a room bob is not in: refused, not answered with bob's own event.
    let elsewhere = server
        .put(&send(&alices_room, "m.room.message", "dup"), Some(&bob), json!({"body": "x", "msgtype": "m.text"}))
        .await;
    assert_error(&elsewhere, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    // Another endpoint path (another event type): another event.
    let (status, other) = server.put(&send(&bobs_room, "m.custom", "dup"), Some(&bob), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{other}");
    assert_ne!(other["event_id"], first["event_id"]);
    // A retry on the same path: the first event again.
    let (status, again) = server
        .put(&send(&bobs_room, "m.room.message", "dup"), Some(&bob), json!({"body": "hi", "msgtype": "m.text"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["event_id"], first["event_id"]);
    // Redactions have their own scope.
    let target = other["event_id"].as_str().unwrap();
    let (status, redaction) =
        server.put(&format!("/_matrix/client/v3/rooms/{bobs_room}/redact/{target}/dup"), Some(&bob), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{redaction}");
    assert_ne!(redaction["event_id"], first["event_id"]);
    assert_ne!(redaction["event_id"], other["event_id"]);

    // Ten parallel retries of one new send make one event.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let (http, url, token) =
            (server.http.clone(), format!("{}{}", server.base, send(&bobs_room, "m.room.message", "par")), bob.clone());
        tasks.spawn(async move {
            let resp = http
                .put(url)
                .bearer_auth(token)
                .json(&json!({"body": "once", "msgtype": "m.text"}))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            resp.json::<Value>().await.unwrap()["event_id"].as_str().unwrap().to_owned()
        });
    }
    let mut ids = Vec::new();
    while let Some(id) = tasks.join_next().await {
        ids.push(id.unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let (_, messages) =
        server.get(&format!("/_matrix/client/v3/rooms/{bobs_room}/messages?dir=b&limit=50"), Some(&bob)).await;
    let onces = messages["chunk"].as_array().unwrap().iter().filter(|e| e["content"]["body"] == "once").count();
    assert_eq!(onces, 1, "{messages}");

    // Storing the very same event again changes nothing and is no error.
    let store = &server.running.as_ref().unwrap().services.store;
    let stored = store.get_event(&ids[0]).await.unwrap().unwrap();
    let prev_events: Vec<String> = serde_json::from_str::<Value>(&stored.json).unwrap()["prev_events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect();
    let again = store
        .persist_event(convo::storage::NewEvent {
            event_id: &stored.event_id,
            room_id: &stored.room_id,
            sender: &stored.sender,
            event_type: &stored.event_type,
            state_key: None,
            depth: stored.depth,
            origin_server_ts: stored.origin_server_ts,
            json: &stored.json,
            prev_events: &prev_events,
            membership: None,
            redactions: &[],
            txn: None,
            push: convo::storage::PushOutcome::none(),
            auth_events: &[],
            dag: convo::storage::Dag {
                state_before: convo::storage::StateBefore::Group(stored.state_group),
                ..Default::default()
            },
        })
        .await
        .unwrap();
    assert!(matches!(again, convo::storage::Persisted::Duplicate(pos) if pos == stored.stream_ordering));

    // A retry that arrives after the sender left still answers the first event.
    server.leave(&bob, &bobs_room).await;
    let retry = server
        .put(&send(&bobs_room, "m.room.message", "dup"), Some(&bob), json!({"body": "hi", "msgtype": "m.text"}))
        .await;
    assert_eq!(retry.0, StatusCode::OK, "{}", retry.1);
    assert_eq!(retry.1["event_id"], first["event_id"]);
    let new_send = server.put(&send(&bobs_room, "m.room.message", "new"), Some(&bob), json!({"body": "x"})).await;
    assert_error(&new_send, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    server.stop().await;
}

/// The `unsigned` fields that say what a state event replaced.
fn assert_replaces(event: &Value, replaced: &str, prev_content: Value, prev_sender: &str) {
    assert_eq!(event["unsigned"]["replaces_state"], replaced, "{event}");
    assert_eq!(event["unsigned"]["prev_content"], prev_content, "{event}");
    assert_eq!(event["unsigned"]["prev_sender"], prev_sender, "{event}");
}

fn find<'a>(events: &'a Value, event_id: &str) -> &'a Value {
    events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event_id"] == event_id)
        .unwrap_or_else(|| panic!("{event_id} not in {events}"))
}

async fn state_events_carry_prev_content(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_id, alice, _) = server.register("alice").await;
    let (bob_id, bob, _) = server.register("bob").await;
    // A DM as Element makes it: the invitee finds the inviter in its join's prev_sender.
    let room = server
        .create_room(&alice, json!({"preset": "trusted_private_chat", "is_direct": true, "invite": [bob_id]}))
        .await;
    let since = server.sync(&bob, None, "").await["next_batch"].as_str().unwrap().to_owned();
    let (_, invite_state) =
        server.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/{bob_id}"), Some(&alice)).await;
    assert_eq!(invite_state["membership"], "invite");
    server.join(&bob, &room).await;

    let sync = server.sync(&bob, Some(&since), "timeout=0").await;
    let timeline = &sync["rooms"]["join"][&room]["timeline"]["events"];
    let join = timeline
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "m.room.member" && e["state_key"] == bob_id && e["content"]["membership"] == "join")
        .unwrap_or_else(|| panic!("{timeline}"));
    let invite_id = join["unsigned"]["replaces_state"].as_str().unwrap_or_else(|| panic!("{join}")).to_owned();
    assert_eq!(join["unsigned"]["prev_content"]["membership"], "invite", "{join}");
    assert_eq!(join["unsigned"]["prev_content"]["is_direct"], true, "{join}");
    assert_eq!(join["unsigned"]["prev_sender"], alice_id, "{join}");
    let join_id = join["event_id"].as_str().unwrap().to_owned();
    let invite_content = join["unsigned"]["prev_content"].clone();

    // A name changed twice.
    let name_path = format!("/_matrix/client/v3/rooms/{room}/state/m.room.name/");
    let first =
        server.put(&name_path, Some(&alice), json!({"name": "one"})).await.1["event_id"].as_str().unwrap().to_owned();
    let second =
        server.put(&name_path, Some(&bob), json!({"name": "two"})).await.1["event_id"].as_str().unwrap().to_owned();

    // /event
    let (_, event) = server.get(&format!("/_matrix/client/v3/rooms/{room}/event/{second}"), Some(&alice)).await;
    assert_replaces(&event, &first, json!({"name": "one"}), &alice_id);
    let (_, event) = server.get(&format!("/_matrix/client/v3/rooms/{room}/event/{first}"), Some(&alice)).await;
    assert!(
        event["unsigned"].get("replaces_state").is_none() && event["unsigned"].get("prev_content").is_none(),
        "{event}"
    );
    // /messages
    let (_, messages) =
        server.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=20"), Some(&alice)).await;
    assert_replaces(find(&messages["chunk"], &second), &first, json!({"name": "one"}), &alice_id);
    assert_replaces(find(&messages["chunk"], &join_id), &invite_id, invite_content.clone(), &alice_id);
    // /context
    let (_, context) =
        server.get(&format!("/_matrix/client/v3/rooms/{room}/context/{first}?limit=4"), Some(&alice)).await;
    assert_replaces(&context["events_after"][0], &first, json!({"name": "one"}), &alice_id);
    assert_replaces(find(&context["state"], &second), &first, json!({"name": "one"}), &alice_id);
    // /state
    let (_, state) = server.get(&format!("/_matrix/client/v3/rooms/{room}/state"), Some(&bob)).await;
    assert_replaces(find(&state, &join_id), &invite_id, invite_content.clone(), &alice_id);
    // /members
    let (_, members) = server.get(&format!("/_matrix/client/v3/rooms/{room}/members"), Some(&bob)).await;
    assert_replaces(find(&members["chunk"], &join_id), &invite_id, invite_content, &alice_id);
    // /sync, initial (state) and incremental (timeline)
    let initial = server.sync(&alice, None, "").await;
    let state = &initial["rooms"]["join"][&room]["state"]["events"];
    let timeline = &initial["rooms"]["join"][&room]["timeline"]["events"];
    let (state, timeline) = (state.as_array().cloned().unwrap_or_default(), timeline.as_array().unwrap());
    let second_event = state.iter().chain(timeline).find(|e| e["event_id"] == second).unwrap();
    assert_replaces(second_event, &first, json!({"name": "one"}), &alice_id);
    // Messages are not state: no such fields.
    let message = server.send_text(&alice, &room, "hello").await;
    let (_, event) = server.get(&format!("/_matrix/client/v3/rooms/{room}/event/{message}"), Some(&alice)).await;
    assert!(event["unsigned"].get("prev_content").is_none(), "{event}");
    server.stop().await;
}

async fn set_topic(server: &TestServer, token: &str, room: &str, topic: &str) -> StatusCode {
    let path = format!("/_matrix/client/v3/rooms/{room}/state/m.room.topic");
    server.put(&path, Some(token), json!({"topic": topic})).await.0
}

/// State events in different rooms do not wait for each other's transactions: on
/// PostgreSQL a transaction that holds the `dag_counters` rows (as each persisted state
/// event did until it committed) does not hold up a state event in another room; on
/// both backends state changes in parallel in several rooms all land, each room ending
/// with one of its topics.
async fn state_events_in_other_rooms_do_not_wait(backend: Backend) {
    let postgres = matches!(backend, Backend::Postgres(_));
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let mut rooms = Vec::new();
    for _ in 0..4 {
        rooms.push(server.create_room(&alice, json!({})).await);
    }
    if postgres {
        let pool = sqlx::PgPool::connect(&server.config().database.url).await.unwrap();
        let mut held = pool.begin().await.unwrap();
        sqlx::query("UPDATE dag_counters SET value = value WHERE name IN ('state_group', 'backfill')")
            .execute(&mut *held)
            .await
            .unwrap();
        let topic =
            tokio::time::timeout(std::time::Duration::from_secs(10), set_topic(&server, &alice, &rooms[1], "t"));
        assert_eq!(topic.await.expect("the state event waited for another transaction"), StatusCode::OK);
        held.rollback().await.unwrap();
        pool.close().await;
    }
    let topics: Vec<(&String, String)> =
        (0..3).flat_map(|round| rooms.iter().map(move |room| (room, format!("{room} {round}")))).collect();
    let tasks = topics.iter().map(|(room, topic)| set_topic(&server, &alice, room, topic));
    for status in futures_util::future::join_all(tasks).await {
        assert_eq!(status, StatusCode::OK);
    }
    for room in &rooms {
        let (status, body) =
            server.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.topic"), Some(&alice)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body["topic"].as_str().unwrap().starts_with(room.as_str()), "{body}");
    }
    server.stop().await;
}

backend_tests!(
    concurrent_create_room_makes_distinct_rooms,
    failed_create_room_leaves_nothing,
    state_content_is_checked,
    transaction_ids_are_scoped_to_the_endpoint,
    state_events_carry_prev_content,
    state_events_in_other_rooms_do_not_wait,
);
