//! `/sync`: long-polling, incremental sections, ephemeral events, filters, restarts.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{
    backend_tests,
    common::{Backend, TestServer, bodies},
};

fn room<'a>(sync: &'a Value, section: &str, room_id: &str) -> &'a Value {
    &sync["rooms"][section][room_id]
}

fn ephemeral<'a>(sync: &'a Value, room_id: &str, kind: &str) -> Option<&'a Value> {
    room(sync, "join", room_id)["ephemeral"]["events"].as_array()?.iter().find(|e| e["type"] == kind)
}

async fn long_poll_wakes_on_send_and_times_out(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    let room_id = server.create_room(&alice, json!({"invite": ["@bob:localhost"]})).await;
    server.join(&bob, &room_id).await;
    let initial = server.sync(&bob, None, "").await;
    let since = initial["next_batch"].as_str().unwrap().to_owned();

    // A sync waiting with timeout=10000 returns as soon as alice sends.
    let sender = {
        let (http, base, alice, room_id) = (server.http.clone(), server.base.clone(), alice.clone(), room_id.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let sent_at = Instant::now();
            let resp = http
                .put(format!("{base}/_matrix/client/v3/rooms/{room_id}/send/m.room.message/lp1"))
                .bearer_auth(alice)
                .json(&json!({"msgtype": "m.text", "body": "wake up"}))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            sent_at
        })
    };
    let sync = server.sync(&bob, Some(&since), "timeout=10000").await;
    let returned_at = Instant::now();
    let sent_at = sender.await.unwrap();
    assert!(returned_at.duration_since(sent_at) < Duration::from_secs(1), "woken within a second of the send");
    assert_eq!(bodies(&room(&sync, "join", &room_id)["timeline"]["events"]), vec!["wake up"]);
    let next = sync["next_batch"].as_str().unwrap().to_owned();

    // Nothing new: it returns after about its timeout, with a usable token.
    let started = Instant::now();
    let quiet = server.sync(&bob, Some(&next), "timeout=1500").await;
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1400) && waited < Duration::from_secs(5), "waited {waited:?}");
    assert!(quiet["rooms"]["join"].as_object().is_none_or(|j| j.is_empty()), "{quiet}");
    let again = quiet["next_batch"].as_str().unwrap();
    server.send_text(&alice, &room_id, "after the quiet").await;
    let sync = server.sync(&bob, Some(again), "timeout=5000").await;
    assert_eq!(bodies(&room(&sync, "join", &room_id)["timeline"]["events"]), vec!["after the quiet"]);

    // Shutting down answers a waiting long-poll at once instead of waiting out its timeout.
    let next = sync["next_batch"].as_str().unwrap().to_owned();
    let waiting = {
        let (http, base, bob) = (server.http.clone(), server.base.clone(), bob.clone());
        tokio::spawn(async move {
            let resp = http
                .get(format!("{base}/_matrix/client/v3/sync?since={next}&timeout=30000"))
                .bearer_auth(bob)
                .send()
                .await
                .unwrap();
            (resp.status(), Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = Instant::now();
    server.stop().await;
    let (status, answered) = waiting.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(answered.duration_since(stopping) < Duration::from_secs(3), "the long-poll ended with the server");
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
    assert_eq!(joined["summary"]["m.heroes"], json!(["@alice:localhost"]));
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
    crate::common::assert_error(
        &server
            .put(
                &format!("/_matrix/client/v3/rooms/{room_id}/typing/@bob:localhost"),
                Some(&alice),
                json!({"typing": true, "timeout": 1000}),
            )
            .await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );

    // A public receipt reaches alice; a private one only bob.
    let receipt = |kind: &str| format!("/_matrix/client/v3/rooms/{room_id}/receipt/{kind}/{event}");
    assert_eq!(server.post(&receipt("m.read"), Some(&bob), json!({})).await.0, StatusCode::OK);
    let sync = server.sync(&alice, None, "").await;
    let receipts = ephemeral(&sync, &room_id, "m.receipt").unwrap();
    assert!(receipts["content"][&event]["m.read"]["@bob:localhost"]["ts"].as_u64().is_some(), "{receipts}");
    let alice_since = sync["next_batch"].as_str().unwrap().to_owned();
    let bob_sync = server.sync(&bob, Some(&since), "timeout=5000").await;
    assert_eq!(room(&bob_sync, "join", &room_id)["unread_notifications"]["notification_count"], 0);
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
    let (_, bob, _) = server.register("bob").await;
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
    let (status, _) = server.get(&format!("/_matrix/client/v3/user/{alice_id}/filter/99"), Some(&alice)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let sync = server.sync(&alice, None, &format!("filter={filter_id}")).await;
    let joined = room(&sync, "join", &room_id);
    assert_eq!(bodies(&joined["timeline"]["events"]), vec!["m3", "m4"]);
    assert_eq!(joined["timeline"]["limited"], true);
    let prev_batch = joined["timeline"]["prev_batch"].as_str().unwrap();
    // Lazy loading: bob has not spoken, so his member event is not sent.
    let members: Vec<&str> = joined["state"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.member")
        .map(|e| e["state_key"].as_str().unwrap())
        .collect();
    assert_eq!(members, vec!["@alice:localhost"]);
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
    crate::common::assert_error(
        &server.put(&status_path, Some(&bob), json!({"presence": "online"})).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );

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

    // full_state: every state event again, even with nothing new.
    let full = server.sync(&bob, Some(&since), "full_state=true&timeout=0").await;
    let state = room(&full, "join", &room_id)["state"]["events"].as_array().cloned().unwrap_or_default();
    let timeline = room(&full, "join", &room_id)["timeline"]["events"].as_array().cloned().unwrap_or_default();
    let types: Vec<&str> = state.iter().chain(timeline.iter()).filter_map(|e| e["type"].as_str()).collect();
    for kind in ["m.room.create", "m.room.power_levels", "m.room.join_rules", "m.room.member"] {
        assert!(types.contains(&kind), "full_state lacks {kind}: {types:?}");
    }
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

backend_tests!(
    full_state_presence_and_threaded_receipts,
    long_poll_wakes_on_send_and_times_out,
    sections_invite_join_leave,
    typing_receipts_and_markers,
    filters_lazy_loading_and_account_data,
    presence_and_user_directory,
    tokens_survive_a_restart,
);
