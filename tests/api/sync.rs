//! `/sync`: long-polling, incremental sections, ephemeral events, filters, restarts.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{
    backend_tests,
    common::{Backend, TestServer, assert_error, bodies},
};

fn room<'a>(sync: &'a Value, section: &str, room_id: &str) -> &'a Value {
    &sync["rooms"][section][room_id]
}

fn ephemeral<'a>(sync: &'a Value, room_id: &str, kind: &str) -> Option<&'a Value> {
    room(sync, "join", room_id)["ephemeral"]["events"].as_array()?.iter().find(|e| e["type"] == kind)
}

/// A `/sync` as a task, so that the test can act while it waits.
fn spawn_sync(server: &TestServer, token: &str, since: &str, timeout_ms: u64) -> tokio::task::JoinHandle<Value> {
    let (http, base, token) = (server.http.clone(), server.base.clone(), token.to_owned());
    let url = format!("{base}/_matrix/client/v3/sync?since={since}&timeout={timeout_ms}");
    tokio::spawn(async move {
        let resp = http.get(url).bearer_auth(token).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.json::<Value>().await.unwrap()
    })
}

async fn long_poll_wakes_on_send_and_times_out(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (bob_id, bob, _) = server.register("bob").await;
    let room_id = server.create_room(&alice, json!({"invite": ["@bob:localhost"]})).await;
    server.join(&bob, &room_id).await;
    let initial = server.sync(&bob, None, "").await;
    let since = initial["next_batch"].as_str().unwrap().to_owned();

    // A sync waiting with timeout=10000 returns as soon as alice sends.
    let waiting = spawn_sync(&server, &bob, &since, 10_000);
    server.wait_for_waiting_syncs(&bob_id, 1).await;
    let sent_at = Instant::now();
    server.send_text(&alice, &room_id, "wake up").await;
    let sync = waiting.await.unwrap();
    assert!(sent_at.elapsed() < Duration::from_secs(5), "woken by the send, not by its timeout");
    assert_eq!(bodies(&room(&sync, "join", &room_id)["timeline"]["events"]), vec!["wake up"]);
    let next = sync["next_batch"].as_str().unwrap().to_owned();

    // Nothing new: it returns after about its timeout, with a usable token.
    let started = Instant::now();
    let quiet = server.sync(&bob, Some(&next), "timeout=1500").await;
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1400) && waited < Duration::from_secs(5), "waited {waited:?}");
    assert!(quiet["rooms"]["join"].as_object().is_none_or(|j| j.is_empty()), "{quiet}");
    assert_eq!(
        server.running.as_ref().unwrap().services.waiting_syncs.count(&ruma::UserId::parse(&bob_id).unwrap()),
        0
    );
    let again = quiet["next_batch"].as_str().unwrap();
    server.send_text(&alice, &room_id, "after the quiet").await;
    let sync = server.sync(&bob, Some(again), "timeout=5000").await;
    assert_eq!(bodies(&room(&sync, "join", &room_id)["timeline"]["events"]), vec!["after the quiet"]);

    // Shutting down answers a waiting long-poll at once instead of waiting out its timeout.
    let next = sync["next_batch"].as_str().unwrap().to_owned();
    let waiting = spawn_sync(&server, &bob, &next, 30_000);
    server.wait_for_waiting_syncs(&bob_id, 1).await;
    let stopping = Instant::now();
    server.stop().await;
    let answered = waiting.await.unwrap();
    assert!(stopping.elapsed() < Duration::from_secs(10), "the long-poll ended with the server");
    assert!(answered["next_batch"].is_string(), "{answered}");
}

async fn sections_invite_join_leave(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    let initial = server.sync(&bob, None, "").await;
    let since = initial["next_batch"].as_str().unwrap().to_owned();
    let room_id =
        server.create_room(&alice, json!({"name": "Plans", "invite": ["@bob:localhost"], "is_direct": true})).await;

    // Bob sees the invite with stripped state.
    let sync = server.sync(&bob, Some(&since), "timeout=5000").await;
    let invite = &room(&sync, "invite", &room_id)["invite_state"]["events"];
    let types: Vec<&str> = invite.as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert!(
        types.contains(&"m.room.name") && types.contains(&"m.room.member") && types.contains(&"m.room.create"),
        "{types:?}"
    );
    let member = |who: &str| {
        invite.as_array().unwrap().iter().find(|e| e["type"] == "m.room.member" && e["state_key"] == who).cloned()
    };
    let me = member("@bob:localhost").unwrap();
    assert_eq!(me["content"]["is_direct"], json!(true));
    // The inviter's member event, for the inviter's name in the invite.
    let inviter = member("@alice:localhost").expect("the inviter's member event is in the stripped state");
    assert_eq!(
        (inviter["content"]["membership"].clone(), inviter["content"]["displayname"].clone()),
        (json!("join"), json!("alice"))
    );
    let since = sync["next_batch"].as_str().unwrap().to_owned();

    // After joining: the room under join, with full state and a summary.
    server.join(&bob, &room_id).await;
    server.send_text(&alice, &room_id, "welcome").await;
    let sync = server.sync(&bob, Some(&since), "timeout=5000").await;
    let joined = room(&sync, "join", &room_id);
    assert_eq!(joined["summary"]["m.joined_member_count"], 2);
    // The room has a name: no heroes are needed to name it.
    assert_eq!(joined["summary"].get("m.heroes"), None, "{joined}");
    assert_eq!(joined["unread_notifications"]["notification_count"], 1);
    // An empty state section is left out: here the whole history fits in the timeline.
    let state_events = joined["state"]["events"].as_array().cloned().unwrap_or_default();
    let state_types: Vec<&str> = state_events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    let timeline_types: Vec<&str> =
        joined["timeline"]["events"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    let all: Vec<&str> = state_types.iter().chain(timeline_types.iter()).copied().collect();
    for t in ["m.room.create", "m.room.power_levels", "m.room.name", "m.room.join_rules"] {
        assert!(all.contains(&t), "{t} in state or timeline: {all:?}");
    }
    assert!(sync["rooms"]["invite"].as_object().is_none_or(|i| !i.contains_key(&room_id)));
    let since = sync["next_batch"].as_str().unwrap().to_owned();

    // Kicked: the room moves to leave, with the kick in the timeline.
    assert_eq!(
        server
            .post(
                &format!("/_matrix/client/v3/rooms/{room_id}/kick"),
                Some(&alice),
                json!({"user_id": "@bob:localhost"})
            )
            .await
            .0,
        StatusCode::OK
    );
    server.send_text(&alice, &room_id, "bob cannot see this").await;
    let sync = server.sync(&bob, Some(&since), "timeout=5000").await;
    let left = room(&sync, "leave", &room_id);
    assert!(left.is_object(), "{sync}");
    // Always present, even when empty: matrix-nio rejects the whole sync otherwise.
    assert!(left["state"]["events"].is_array(), "{left}");
    let last = left["timeline"]["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!((last["type"].clone(), last["content"]["membership"].clone()), (json!("m.room.member"), json!("leave")));
    assert!(!bodies(&left["timeline"]["events"]).contains(&"bob cannot see this".to_owned()));
    assert!(sync["rooms"]["join"].as_object().is_none_or(|j| !j.contains_key(&room_id)));
    server.stop().await;
}

async fn typing_receipts_and_markers(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    let room_id = server.create_room(&alice, json!({"invite": ["@bob:localhost"]})).await;
    server.join(&bob, &room_id).await;
    let event = server.send_text(&alice, &room_id, "read me").await;
    let since = server.sync(&bob, None, "").await["next_batch"].as_str().unwrap().to_owned();

    // Typing.
    let typing = format!("/_matrix/client/v3/rooms/{room_id}/typing/@alice:localhost");
    assert_eq!(server.put(&typing, Some(&alice), json!({"typing": true, "timeout": 1000})).await.0, StatusCode::OK);
    let sync = server.sync(&bob, Some(&since), "timeout=5000").await;
    assert_eq!(ephemeral(&sync, &room_id, "m.typing").unwrap()["content"]["user_ids"], json!(["@alice:localhost"]));
    let since = sync["next_batch"].as_str().unwrap().to_owned();
    // It expires by itself, and the waiting sync is woken for that.
    let sync = server.sync(&bob, Some(&since), "timeout=5000").await;
    assert_eq!(ephemeral(&sync, &room_id, "m.typing").unwrap()["content"]["user_ids"], json!([]));
    let since = sync["next_batch"].as_str().unwrap().to_owned();
    // Nobody types for someone else.
    let for_bob = format!("/_matrix/client/v3/rooms/{room_id}/typing/@bob:localhost");
    let refused = server.put(&for_bob, Some(&alice), json!({"typing": true, "timeout": 1000})).await;
    assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");

    // A public receipt reaches alice; a private one only bob.
    let receipt = |kind: &str| format!("/_matrix/client/v3/rooms/{room_id}/receipt/{kind}/{event}");
    assert_eq!(server.post(&receipt("m.read"), Some(&bob), json!({})).await.0, StatusCode::OK);
    let sync = server.sync(&alice, None, "").await;
    let receipts = ephemeral(&sync, &room_id, "m.receipt").unwrap();
    assert!(receipts["content"][&event]["m.read"]["@bob:localhost"]["ts"].as_u64().is_some(), "{receipts}");
    let alice_since = sync["next_batch"].as_str().unwrap().to_owned();
    let bob_sync = server.sync(&bob, Some(&since), "timeout=5000").await;
    assert_eq!(room(&bob_sync, "join", &room_id)["unread_notifications"]["notification_count"], 0);
    assert!(ephemeral(&bob_sync, &room_id, "m.typing").is_none(), "the refused typing notice: {bob_sync}");
    assert_eq!(server.post(&receipt("m.read.private"), Some(&bob), json!({})).await.0, StatusCode::OK);
    let sync = server.sync(&alice, Some(&alice_since), "timeout=300").await;
    assert!(ephemeral(&sync, &room_id, "m.receipt").is_none(), "private receipts stay private: {sync}");
    let bob_sync = server.sync(&bob, None, "").await;
    assert!(
        ephemeral(&bob_sync, &room_id, "m.receipt").unwrap()["content"][&event]["m.read.private"]["@bob:localhost"]
            .is_object()
    );

    // Read markers: m.fully_read lands in room account data.
    let (status, _) = server
        .post(
            &format!("/_matrix/client/v3/rooms/{room_id}/read_markers"),
            Some(&bob),
            json!({"m.fully_read": event, "m.read": event}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let bob_sync = server.sync(&bob, None, "").await;
    let data = room(&bob_sync, "join", &room_id)["account_data"]["events"].as_array().unwrap().clone();
    let fully_read = data.iter().find(|e| e["type"] == "m.fully_read").unwrap();
    assert_eq!(fully_read["content"]["event_id"], event.as_str());
    server.stop().await;
}

async fn filters_lazy_loading_and_account_data(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_id, alice, _) = server.register("alice").await;
    let (bob_id, bob, _) = server.register("bob").await;
    let room_id = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    server.join(&bob, &room_id).await;
    for i in 0..5 {
        server.send_text(&alice, &room_id, &format!("m{i}")).await;
    }
    let (status, created) = server
        .post(
            &format!("/_matrix/client/v3/user/{alice_id}/filter"),
            Some(&alice),
            json!({"room": {"timeline": {"limit": 2}, "state": {"lazy_load_members": true}}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let filter_id = created["filter_id"].as_str().unwrap().to_owned();
    let (_, stored) = server.get(&format!("/_matrix/client/v3/user/{alice_id}/filter/{filter_id}"), Some(&alice)).await;
    assert_eq!(stored["room"]["timeline"]["limit"], 2);
    let unknown = server.get(&format!("/_matrix/client/v3/user/{alice_id}/filter/99"), Some(&alice)).await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    // Filters are per user: another's is forbidden, and ids are not shared.
    let others = server.get(&format!("/_matrix/client/v3/user/{alice_id}/filter/{filter_id}"), Some(&bob)).await;
    assert_error(&others, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let own = server.get(&format!("/_matrix/client/v3/user/{bob_id}/filter/{filter_id}"), Some(&bob)).await;
    assert_error(&own, StatusCode::NOT_FOUND, "M_NOT_FOUND");

    let sync = server.sync(&alice, None, &format!("filter={filter_id}")).await;
    let joined = room(&sync, "join", &room_id);
    assert_eq!(bodies(&joined["timeline"]["events"]), vec!["m3", "m4"]);
    assert_eq!(joined["timeline"]["limited"], true);
    let prev_batch = joined["timeline"]["prev_batch"].as_str().unwrap();
    // Lazy loading: bob has not spoken, but as the room's only hero his member event
    // is sent (`lazy_loading_sends_heroes` has members who are neither).
    assert_eq!(joined["summary"]["m.heroes"], json!(["@bob:localhost"]));
    let members: Vec<&str> = joined["state"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.member")
        .map(|e| e["state_key"].as_str().unwrap())
        .collect();
    assert_eq!(members, vec!["@alice:localhost", "@bob:localhost"]);
    // prev_batch continues in /messages.
    let (_, page) = server
        .get(&format!("/_matrix/client/v3/rooms/{room_id}/messages?dir=b&limit=3&from={prev_batch}"), Some(&alice))
        .await;
    assert_eq!(bodies(&page["chunk"]), vec!["m2", "m1", "m0"]);

    // Global account data arrives in sync.
    let since = sync["next_batch"].as_str().unwrap().to_owned();
    let path = format!("/_matrix/client/v3/user/{alice_id}/account_data/m.direct");
    assert_eq!(server.put(&path, Some(&alice), json!({"@bob:localhost": [room_id]})).await.0, StatusCode::OK);
    let sync = server.sync(&alice, Some(&since), "timeout=5000").await;
    let direct =
        sync["account_data"]["events"].as_array().unwrap().iter().find(|e| e["type"] == "m.direct").unwrap().clone();
    assert_eq!(direct["content"]["@bob:localhost"][0], room_id.as_str());

    // Tags.
    let tag = format!("/_matrix/client/v3/user/{alice_id}/rooms/{room_id}/tags/m.favourite");
    assert_eq!(server.put(&tag, Some(&alice), json!({"order": 0.5})).await.0, StatusCode::OK);
    let (_, tags) = server.get(&format!("/_matrix/client/v3/user/{alice_id}/rooms/{room_id}/tags"), Some(&alice)).await;
    assert_eq!(tags["tags"]["m.favourite"]["order"], 0.5);
    server.stop().await;
}

async fn presence_and_user_directory(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_id, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    let (_, carol, _) = server.register("carol").await;
    let room_id = server.create_room(&alice, json!({"invite": ["@bob:localhost"]})).await;
    server.join(&bob, &room_id).await;
    let since = server.sync(&bob, None, "").await["next_batch"].as_str().unwrap().to_owned();
    let status_path = format!("/_matrix/client/v3/presence/{alice_id}/status");
    assert_eq!(
        server.put(&status_path, Some(&alice), json!({"presence": "unavailable", "status_msg": "lunch"})).await.0,
        StatusCode::OK
    );
    let (_, presence) = server.get(&status_path, Some(&bob)).await;
    assert_eq!((presence["presence"].clone(), presence["status_msg"].clone()), (json!("unavailable"), json!("lunch")));
    let sync = server.sync(&bob, Some(&since), "timeout=5000").await;
    let event = sync["presence"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["sender"] == alice_id.as_str())
        .unwrap()
        .clone();
    assert_eq!(event["content"]["status_msg"], "lunch");
    let refused = server.put(&status_path, Some(&bob), json!({"presence": "online"})).await;
    assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");

    // The user directory shows people who share a room, not strangers.
    let search = |who: &str| json!({"search_term": who, "limit": 10});
    let (_, found) = server.post("/_matrix/client/v3/user_directory/search", Some(&bob), search("ali")).await;
    assert_eq!(found["results"][0]["user_id"], "@alice:localhost");
    assert_eq!(found["results"][0]["display_name"], "alice");
    let (_, none) = server.post("/_matrix/client/v3/user_directory/search", Some(&carol), search("ali")).await;
    assert_eq!(none["results"], json!([]));
    server.stop().await;
}

async fn tokens_survive_a_restart(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    let room_id = server.create_room(&alice, json!({"invite": ["@bob:localhost"]})).await;
    server.join(&bob, &room_id).await;
    let since = server.sync(&bob, None, "").await["next_batch"].as_str().unwrap().to_owned();
    server.restart().await;
    server.send_text(&alice, &room_id, "after restart").await;
    let sync = server.sync(&bob, Some(&since), "timeout=5000").await;
    assert_eq!(bodies(&room(&sync, "join", &room_id)["timeline"]["events"]), vec!["after restart"]);
    server.stop().await;
}

/// `full_state`, `set_presence`, threaded receipts and the `trusted_private_chat` preset.
async fn full_state_presence_and_threaded_receipts(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_id, alice, _) = server.register("alice").await;
    let (bob_id, bob, _) = server.register("bob").await;
    let room_id = server
        .create_room(&alice, json!({"preset": "trusted_private_chat", "invite": [bob_id], "is_direct": true}))
        .await;
    server.join(&bob, &room_id).await;
    // Trusted private chat: invited users get the creator's power; in room version 12
    // that makes them additional creators. The room is invite-only.
    let (_, create) = server.get(&format!("/_matrix/client/v3/rooms/{room_id}/state/m.room.create/"), Some(&bob)).await;
    assert_eq!(create["additional_creators"], json!([bob_id]), "{create}");
    let (_, rules) =
        server.get(&format!("/_matrix/client/v3/rooms/{room_id}/state/m.room.join_rules/"), Some(&bob)).await;
    assert_eq!(rules["join_rule"], "invite");

    let event = server.send_text(&alice, &room_id, "in a thread").await;
    let first = server.sync(&bob, None, "").await;
    let since = first["next_batch"].as_str().unwrap().to_owned();

    // full_state: every state event again, even with nothing new (and no timeline).
    let full = server.sync(&bob, Some(&since), "full_state=true&timeout=0").await;
    let types = types_of(&room(&full, "join", &room_id)["state"]);
    for kind in ["m.room.create", "m.room.power_levels", "m.room.join_rules", "m.room.member"] {
        assert!(types.contains(&kind.to_owned()), "full_state lacks {kind}: {types:?}");
    }
    assert!(events_of(&room(&full, "join", &room_id)["timeline"]).is_empty(), "{full}");
    let plain = server.sync(&bob, Some(&since), "timeout=0").await;
    assert!(room(&plain, "join", &room_id).is_null(), "without full_state nothing is new: {plain}");

    // set_presence on sync: alice syncing as "unavailable" is what bob sees.
    let since_bob = plain["next_batch"].as_str().unwrap().to_owned();
    server.sync(&alice, None, "set_presence=unavailable").await;
    let (_, presence) = server.get(&format!("/_matrix/client/v3/presence/{alice_id}/status"), Some(&bob)).await;
    assert_eq!(presence["presence"], "unavailable");
    let seen = server.sync(&bob, Some(&since_bob), "timeout=5000").await;
    let event_of_alice =
        seen["presence"]["events"].as_array().unwrap().iter().find(|e| e["sender"] == alice_id.as_str());
    assert_eq!(event_of_alice.unwrap()["content"]["presence"], "unavailable", "{seen}");

    // A threaded receipt and an unthreaded one on the same event both reach alice.
    let alice_since = server.sync(&alice, None, "").await["next_batch"].as_str().unwrap().to_owned();
    let receipt = format!("/_matrix/client/v3/rooms/{room_id}/receipt/m.read/{event}");
    assert_eq!(server.post(&receipt, Some(&bob), json!({"thread_id": "main"})).await.0, StatusCode::OK);
    assert_eq!(server.post(&receipt, Some(&bob), json!({})).await.0, StatusCode::OK);
    let sync = server.sync(&alice, Some(&alice_since), "timeout=5000").await;
    let receipts: Vec<Value> = room(&sync, "join", &room_id)["ephemeral"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.receipt")
        .map(|e| e["content"][&event]["m.read"][&bob_id].clone())
        .filter(|r| r.is_object())
        .collect();
    assert_eq!(receipts.len(), 2, "{sync}");
    assert!(receipts.iter().any(|r| r["thread_id"] == "main"));
    assert!(receipts.iter().any(|r| r.get("thread_id").is_none()));
    server.stop().await;
}

/// `filter=` with an inline filter, percent-encoded.
fn filter_param(filter: &Value) -> String {
    let mut out = String::from("filter=");
    for b in filter.to_string().bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn events_of(section: &Value) -> Vec<&Value> {
    section["events"].as_array().map(|a| a.iter().collect()).unwrap_or_default()
}

fn types_of(section: &Value) -> Vec<String> {
    events_of(section).iter().map(|e| e["type"].as_str().unwrap().to_owned()).collect()
}

fn state_keys_of(section: &Value, kind: &str) -> Vec<String> {
    let mut keys: Vec<String> = events_of(section)
        .iter()
        .filter(|e| e["type"] == kind)
        .map(|e| e["state_key"].as_str().unwrap().to_owned())
        .collect();
    keys.sort();
    keys
}

/// `full_state=true` on an incremental sync: every joined room with its full state,
/// rooms without news too, while the timeline still starts at `since`.
async fn full_state_sends_every_rooms_state(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (bob_id, bob, _) = server.register("bob").await;
    let quiet = server.create_room(&alice, json!({"name": "Quiet", "invite": [bob_id]})).await;
    let busy = server.create_room(&alice, json!({"name": "Busy", "invite": [bob_id]})).await;
    server.join(&bob, &quiet).await;
    server.join(&bob, &busy).await;
    server.send_text(&alice, &quiet, "old news").await;
    server.send_text(&alice, &busy, "old news").await;
    let since = server.sync(&bob, None, "").await["next_batch"].as_str().unwrap().to_owned();
    server.send_text(&alice, &busy, "fresh").await;

    let full = server.sync(&bob, Some(&since), "full_state=true&timeout=10000").await;
    for (room_id, name) in [(&quiet, "Quiet"), (&busy, "Busy")] {
        let joined = room(&full, "join", room_id);
        let state = &joined["state"];
        let types = types_of(state);
        for kind in ["m.room.create", "m.room.power_levels", "m.room.join_rules", "m.room.name"] {
            assert!(types.contains(&kind.to_owned()), "{name}: full_state lacks {kind}: {joined}");
        }
        assert_eq!(state_keys_of(state, "m.room.member"), vec!["@alice:localhost", "@bob:localhost"], "{joined}");
        let name_event = events_of(state).into_iter().find(|e| e["type"] == "m.room.name").unwrap();
        assert_eq!(name_event["content"]["name"], name);
    }
    // The timeline follows `since`: nothing for the quiet room, only the new message
    // for the other.
    let quiet_timeline = &room(&full, "join", &quiet)["timeline"];
    assert!(events_of(quiet_timeline).is_empty(), "{quiet_timeline}");
    assert_ne!(quiet_timeline["limited"], true);
    let busy_timeline = &room(&full, "join", &busy)["timeline"];
    assert_eq!(events_of(busy_timeline).len(), 1, "{busy_timeline}");
    assert_eq!(bodies(&busy_timeline["events"]), vec!["fresh"]);
    assert_ne!(busy_timeline["limited"], true);

    // Lazy-loaded members: full state, but members only for the timeline's senders and
    // the user.
    let lazy = filter_param(&json!({"room": {"state": {"lazy_load_members": true}}}));
    let full = server.sync(&alice, Some(&since), &format!("full_state=true&{lazy}")).await;
    let quiet_state = &room(&full, "join", &quiet)["state"];
    assert!(types_of(quiet_state).contains(&"m.room.create".to_owned()), "{full}");
    assert_eq!(state_keys_of(quiet_state, "m.room.member"), vec!["@alice:localhost"]);
    server.stop().await;
}

/// The timeline filter's types, not_types, senders and not_senders; `limited` and
/// `prev_batch` count only the events that pass; state changes the filter hides still
/// reach the state section; the other sections' type filters.
async fn timeline_filters_apply(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_id, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    let room_id = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    server.join(&bob, &room_id).await;
    let ping = |token: &str, n: u32| {
        let path = format!("/_matrix/client/v3/rooms/{room_id}/send/org.example.ping/p{n}");
        let token = token.to_owned();
        let server = &server;
        async move {
            let (status, body) = server.put(&path, Some(&token), json!({"n": n})).await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
    };
    ping(&alice, 0).await;
    for i in 0..12 {
        server.send_text(&alice, &room_id, &format!("m{i}")).await;
    }
    ping(&bob, 1).await;
    ping(&alice, 2).await;
    let pings = |timeline: &Value| -> Vec<u64> {
        events_of(timeline)
            .iter()
            .map(|e| {
                assert_eq!(e["type"], "org.example.ping", "only pings pass: {timeline}");
                e["content"]["n"].as_u64().unwrap()
            })
            .collect()
    };

    // Two of three pings: limited, and prev_batch continues in /messages to the first.
    let only_pings = json!({"room": {"timeline": {"types": ["org.example.ping"], "limit": 2}}});
    let sync = server.sync(&alice, None, &filter_param(&only_pings)).await;
    let timeline = &room(&sync, "join", &room_id)["timeline"];
    assert_eq!(pings(timeline), vec![1, 2]);
    assert_eq!(timeline["limited"], true);
    let prev_batch = timeline["prev_batch"].as_str().unwrap();
    let messages_filter = filter_param(&json!({"types": ["org.example.ping"]}));
    let (status, page) = server
        .get(
            &format!("/_matrix/client/v3/rooms/{room_id}/messages?dir=b&from={prev_batch}&{messages_filter}"),
            Some(&alice),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(pings(&json!({"events": page["chunk"]})), vec![0]);

    // Everything that passes fits: not limited, though the room has more events than
    // the limit. A `*` matches any run of characters.
    let wildcard = json!({"room": {"timeline": {"types": ["org.*.ping"], "limit": 5}}});
    let sync = server.sync(&alice, None, &filter_param(&wildcard)).await;
    let timeline = &room(&sync, "join", &room_id)["timeline"];
    assert_eq!(pings(timeline), vec![0, 1, 2]);
    assert_ne!(timeline["limited"], true, "{timeline}");

    // not_types, senders, not_senders.
    let no_messages = json!({"room": {"timeline": {"not_types": ["m.room.message"], "limit": 50}}});
    let sync = server.sync(&alice, None, &filter_param(&no_messages)).await;
    let types = types_of(&room(&sync, "join", &room_id)["timeline"]);
    assert!(!types.contains(&"m.room.message".to_owned()) && types.contains(&"m.room.create".to_owned()), "{types:?}");
    assert_eq!(types.iter().filter(|t| *t == "org.example.ping").count(), 3);
    for filter in [
        json!({"room": {"timeline": {"senders": ["@bob:localhost"]}}}),
        json!({"room": {"timeline": {"not_senders": [alice_id.clone()]}}}),
    ] {
        let sync = server.sync(&alice, None, &filter_param(&filter)).await;
        let timeline = &room(&sync, "join", &room_id)["timeline"];
        let seen: Vec<(String, String)> = events_of(timeline)
            .iter()
            .map(|e| (e["sender"].as_str().unwrap().to_owned(), e["type"].as_str().unwrap().to_owned()))
            .collect();
        let bob = "@bob:localhost".to_owned();
        assert_eq!(seen, vec![(bob.clone(), "m.room.member".to_owned()), (bob, "org.example.ping".to_owned())]);
        assert_ne!(timeline["limited"], true);
    }

    // A stored filter works the same; a state change the filter hides from the
    // timeline arrives in the state section.
    let (status, created) = server
        .post(
            &format!("/_matrix/client/v3/user/{alice_id}/filter"),
            Some(&alice),
            json!({"room": {"timeline": {"types": ["org.example.ping"]}}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let stored = format!("filter={}", created["filter_id"].as_str().unwrap());
    let since = server.sync(&alice, None, &stored).await["next_batch"].as_str().unwrap().to_owned();
    let name_path = format!("/_matrix/client/v3/rooms/{room_id}/state/m.room.name/");
    assert_eq!(server.put(&name_path, Some(&alice), json!({"name": "Renamed"})).await.0, StatusCode::OK);
    server.send_text(&alice, &room_id, "not a ping").await;
    ping(&alice, 3).await;
    let sync = server.sync(&alice, Some(&since), &format!("{stored}&timeout=10000")).await;
    let joined = room(&sync, "join", &room_id);
    assert_eq!(pings(&joined["timeline"]), vec![3]);
    assert_ne!(joined["timeline"]["limited"], true);
    let names: Vec<&Value> = events_of(&joined["state"]).into_iter().filter(|e| e["type"] == "m.room.name").collect();
    assert_eq!(names.len(), 1, "the hidden rename is in the state section: {joined}");
    assert_eq!(names[0]["content"]["name"], "Renamed");

    // The state filter's types; the ephemeral, account data and presence type filters.
    let typing = format!("/_matrix/client/v3/rooms/{room_id}/typing/{alice_id}");
    assert_eq!(server.put(&typing, Some(&alice), json!({"typing": true, "timeout": 30000})).await.0, StatusCode::OK);
    server.sync(&bob, None, "").await;
    let unfiltered = server.sync(&alice, None, "").await;
    assert!(ephemeral(&unfiltered, &room_id, "m.typing").is_some(), "{unfiltered}");
    assert!(types_of(&unfiltered["account_data"]).contains(&"m.push_rules".to_owned()));
    assert!(!events_of(&unfiltered["presence"]).is_empty(), "{unfiltered}");
    let narrow = json!({
        "room": {
            "timeline": {"limit": 1},
            "state": {"types": ["m.room.name", "m.room.create"]},
            "ephemeral": {"not_types": ["m.typing"]},
        },
        "account_data": {"not_types": ["m.push_rules"]},
        "presence": {"types": ["m.nothing"]},
    });
    let sync = server.sync(&alice, None, &filter_param(&narrow)).await;
    let mut state_types = types_of(&room(&sync, "join", &room_id)["state"]);
    state_types.sort();
    assert_eq!(state_types, vec!["m.room.create", "m.room.name"], "{sync}");
    assert!(ephemeral(&sync, &room_id, "m.typing").is_none(), "{sync}");
    assert!(!types_of(&sync["account_data"]).contains(&"m.push_rules".to_owned()), "{sync}");
    assert!(events_of(&sync["presence"]).is_empty(), "{sync}");
    server.stop().await;
}

/// Lazy-loaded members: an incremental sync carries the member event of a sender the
/// client has not seen, although the timeline is not limited.
async fn lazy_loading_sends_new_speakers(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    let (_, carol, _) = server.register("carol").await;
    // Named, so that the room has no heroes whose member events would come along.
    let room_id = server.create_room(&alice, json!({"preset": "public_chat", "name": "Chat"})).await;
    server.join(&bob, &room_id).await;
    server.join(&carol, &room_id).await;
    let displayname = "/_matrix/client/v3/profile/@carol:localhost/displayname";
    assert_eq!(server.put(displayname, Some(&carol), json!({"displayname": "Carol C."})).await.0, StatusCode::OK);
    server.send_text(&alice, &room_id, "hello").await;
    let lazy = filter_param(&json!({"room": {"timeline": {"limit": 1}, "state": {"lazy_load_members": true}}}));
    let sync = server.sync(&alice, None, &lazy).await;
    let joined = room(&sync, "join", &room_id);
    assert_eq!(joined["summary"].get("m.heroes"), None, "a named room has no heroes: {joined}");
    let state = &joined["state"];
    assert!(!state_keys_of(state, "m.room.member").contains(&"@carol:localhost".to_owned()), "{state}");
    let since = sync["next_batch"].as_str().unwrap().to_owned();

    server.send_text(&carol, &room_id, "first words").await;
    let sync = server.sync(&alice, Some(&since), &format!("{lazy}&timeout=10000")).await;
    let joined = room(&sync, "join", &room_id);
    assert_eq!(bodies(&joined["timeline"]["events"]), vec!["first words"]);
    assert_ne!(joined["timeline"]["limited"], true);
    let member = events_of(&joined["state"])
        .into_iter()
        .find(|e| e["type"] == "m.room.member" && e["state_key"] == "@carol:localhost")
        .unwrap_or_else(|| panic!("carol's member event is sent: {joined}"));
    assert_eq!(member["content"]["displayname"], "Carol C.");
    assert_eq!(state_keys_of(&joined["state"], "m.room.member"), vec!["@carol:localhost"], "only the speaker's");
    server.stop().await;
}

/// A profile change is a new member event of one's own, not a new join: the next sync
/// carries just that event, not the room's history and state again.
async fn own_profile_change_is_not_a_rejoin(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (bob_id, bob, _) = server.register("bob").await;
    let room_id = server.create_room(&alice, json!({"invite": [bob_id]})).await;
    server.join(&bob, &room_id).await;
    for i in 0..12 {
        server.send_text(&alice, &room_id, &format!("m{i}")).await;
    }
    let since = server.sync(&bob, None, "").await["next_batch"].as_str().unwrap().to_owned();
    let displayname = format!("/_matrix/client/v3/profile/{bob_id}/displayname");
    assert_eq!(server.put(&displayname, Some(&bob), json!({"displayname": "Bobby"})).await.0, StatusCode::OK);
    let sync = server.sync(&bob, Some(&since), "timeout=10000").await;
    let joined = room(&sync, "join", &room_id);
    let timeline = events_of(&joined["timeline"]);
    assert_eq!(timeline.len(), 1, "{joined}");
    assert_eq!(
        (timeline[0]["type"].clone(), timeline[0]["content"]["displayname"].clone()),
        (json!("m.room.member"), json!("Bobby"))
    );
    assert_ne!(joined["timeline"]["limited"], true);
    assert!(events_of(&joined["state"]).is_empty(), "{joined}");
    server.stop().await;
}

/// An incremental sync sends a room's summary only when its members moved (the spec
/// lets an unchanged summary be left out): not for a message, but for a join, also
/// one placed by another user's request while the syncing user waited.
async fn summary_only_when_members_move(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    let (_, carol, _) = server.register("carol").await;
    let room_id = server.create_room(&alice, json!({"invite": ["@bob:localhost", "@carol:localhost"]})).await;
    server.join(&bob, &room_id).await;
    let first = server.sync(&alice, None, "").await;
    assert_eq!(room(&first, "join", &room_id)["summary"]["m.joined_member_count"], 2);
    let since = first["next_batch"].as_str().unwrap().to_owned();

    server.send_text(&bob, &room_id, "hello").await;
    let sync = server.sync(&alice, Some(&since), "timeout=5000").await;
    let joined = room(&sync, "join", &room_id);
    assert_eq!(joined["timeline"]["events"].as_array().map(Vec::len), Some(1), "{joined}");
    assert!(joined["summary"].as_object().is_none_or(|s| s.is_empty()), "no summary for a message: {joined}");
    let since = sync["next_batch"].as_str().unwrap().to_owned();

    server.join(&carol, &room_id).await;
    let sync = server.sync(&alice, Some(&since), "timeout=5000").await;
    let summary = &room(&sync, "join", &room_id)["summary"];
    assert_eq!(summary["m.joined_member_count"], 3, "{sync}");
    assert_eq!(summary["m.invited_member_count"], 0, "{sync}");
    server.stop().await;
}

/// With lazy loading, the member events of the summary's heroes are in `state` (the
/// spec's MUST: clients name unnamed rooms from them), and the other silent members'
/// are not: on an initial sync, and on an incremental one whose summary changed.
async fn lazy_loading_sends_heroes(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let room_id = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    let mut members = Vec::new();
    for i in 1..=7 {
        let (id, token, _) = server.register(&format!("m{i}")).await;
        server.join(&token, &room_id).await;
        members.push((id, token));
    }
    for i in 0..3 {
        server.send_text(&alice, &room_id, &format!("hello {i}")).await;
    }
    let lazy = filter_param(&json!({"room": {"timeline": {"limit": 2}, "state": {"lazy_load_members": true}}}));
    let sync = server.sync(&alice, None, &lazy).await;
    let joined = room(&sync, "join", &room_id);
    let heroes: Vec<String> = members[..5].iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(joined["summary"]["m.heroes"], json!(heroes), "{joined}");
    let mut expected = heroes.clone();
    expected.push("@alice:localhost".to_owned());
    expected.sort();
    // m6 and m7 joined and said nothing: left out.
    assert_eq!(state_keys_of(&joined["state"], "m.room.member"), expected, "{joined}");

    // m1 leaves: the heroes move on to m2..m6, and m6's member event (never sent
    // before) comes with the changed summary, though m6 is silent.
    let since = sync["next_batch"].as_str().unwrap().to_owned();
    server.leave(&members[0].1, &room_id).await;
    let next = server.sync(&alice, Some(&since), &lazy).await;
    let joined = room(&next, "join", &room_id);
    let heroes: Vec<String> = members[1..6].iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(joined["summary"]["m.heroes"], json!(heroes), "{joined}");
    let state = state_keys_of(&joined["state"], "m.room.member");
    assert!(state.contains(&members[5].0), "{joined}");
    assert!(!state.contains(&members[6].0), "{joined}");
    // The leave itself is in the timeline.
    let timeline = events_of(&joined["timeline"]);
    assert!(timeline.iter().any(|e| e["type"] == "m.room.member" && e["state_key"] == members[0].0.as_str()));
    server.stop().await;
}

backend_tests!(
    summary_only_when_members_move,
    lazy_loading_sends_heroes,
    full_state_presence_and_threaded_receipts,
    long_poll_wakes_on_send_and_times_out,
    sections_invite_join_leave,
    typing_receipts_and_markers,
    filters_lazy_loading_and_account_data,
    presence_and_user_directory,
    tokens_survive_a_restart,
    full_state_sends_every_rooms_state,
    timeline_filters_apply,
    lazy_loading_sends_new_speakers,
    own_profile_change_is_not_a_rejoin,
);
