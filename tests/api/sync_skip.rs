//! What a woken `/sync` reads (issue 13): only the streams that moved past its `since`
//! (the change index), and presence written only when it changes.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{
    backend_tests,
    common::{Backend, TestServer, bodies},
    keys::device_keys,
};

fn statements(server: &TestServer) -> u64 {
    server.running.as_ref().expect("running").services.store.statements_run()
}

fn token(sync: &Value) -> String {
    sync["next_batch"].as_str().expect("a next_batch").to_owned()
}

/// A `/sync` as a task, so that the test can act while it waits.
fn spawn_sync(server: &TestServer, token: &str, since: &str) -> tokio::task::JoinHandle<Value> {
    let (http, base, token) = (server.http.clone(), server.base.clone(), token.to_owned());
    let url = format!("{base}/_matrix/client/v3/sync?since={since}&timeout=10000");
    tokio::spawn(async move {
        let resp = http.get(url).bearer_auth(token).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.json::<Value>().await.unwrap()
    })
}

fn ephemeral<'a>(sync: &'a Value, room_id: &str, kind: &str) -> Option<&'a Value> {
    sync["rooms"]["join"][room_id]["ephemeral"]["events"].as_array()?.iter().find(|e| e["type"] == kind)
}

/// An incremental sync that carries one new message in one of the user's rooms (what a
/// sync woken by that message builds) runs a handful of statements, not one per stream.
async fn woken_sync_with_one_message_reads_little(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    let room_id = server.create_room(&alice, json!({"invite": ["@bob:localhost"]})).await;
    server.join(&bob, &room_id).await;
    // A second room of bob's that stays quiet.
    let quiet = server.create_room(&alice, json!({"invite": ["@bob:localhost"]})).await;
    server.join(&bob, &quiet).await;
    let mut since = token(&server.sync(&bob, None, "").await);
    // Incremental syncs settle presence and what the joins left.
    since = token(&server.sync(&bob, Some(&since), "timeout=0").await);
    since = token(&server.sync(&bob, Some(&since), "timeout=0").await);

    // The same sync with the change index answering "may have changed" to all (every
    // stream read, as before it), then with it; a few rounds of each, timed.
    let changes = server.running.as_ref().unwrap().services.store.changes();
    let mut used = [0u64; 2];
    let mut took = [Duration::ZERO; 2];
    const ROUNDS: u32 = 20;
    for i in 0..ROUNDS {
        // Alternated, so that the room's growth weighs on both alike.
        for (mode, off) in [(0, true), (1, false)] {
            changes.set_off(off);
            let text = format!("message {mode}.{i}");
            server.send_text(&alice, &room_id, &text).await;
            let before = statements(&server);
            let started = Instant::now();
            tracing::debug!("counted sync {i} {mode} begins");
            let sync = server.sync(&bob, Some(&since), "timeout=0").await;
            tracing::debug!("counted sync {i} {mode} ends");
            took[mode] += started.elapsed();
            used[mode] = statements(&server) - before;
            assert_eq!(bodies(&sync["rooms"]["join"][&room_id]["timeline"]["events"]), vec![text]);
            assert!(sync["rooms"]["join"].get(&quiet).is_none(), "{sync}");
            since = token(&sync);
        }
    }
    eprintln!(
        "one incremental sync with one new message: {} statements, {:?} each without the change index; {} statements, {:?} each with it",
        used[0],
        took[0] / ROUNDS,
        used[1],
        took[1] / ROUNDS
    );
    assert!(used[1] < used[0], "the index saves statements: {used:?}");
    // None: the rooms that moved come from the change index, the timeline and the
    // unread counts from the room's live tail (`storage/live.rs`), the access token,
    // memberships, visibility and key counts from the store's read caches (a message
    // does not empty them).
    assert_eq!(used[1], 0, "statements");
    server.stop().await;
}

/// A room the change index says may have moved (a change recorded for a write that has
/// not reached the mark, or failed) but whose timeline has nothing new is left out,
/// and the sync waits for what comes next.
async fn a_room_that_did_not_move_after_all_is_left_out(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    let room_id = server.create_room(&alice, json!({"invite": ["@bob:localhost"]})).await;
    server.join(&bob, &room_id).await;
    let mut since = token(&server.sync(&bob, None, "").await);
    since = token(&server.sync(&bob, Some(&since), "timeout=0").await);
    let services = &server.running.as_ref().unwrap().services;
    let head = services.store.current_stream_position().await.unwrap();
    // A change at a position nobody will commit.
    services.store.changes().note(convo::storage::changes::Kind::Room, &room_id, head + 1_000);

    let sync = server.sync(&bob, Some(&since), "timeout=0").await;
    assert!(sync["rooms"]["join"].get(&room_id).is_none(), "{sync}");
    let waiting = spawn_sync(&server, &bob, &token(&sync));
    server.wait_for_waiting_syncs("@bob:localhost", 1).await;
    server.send_text(&alice, &room_id, "now").await;
    let woken = waiting.await.unwrap();
    assert_eq!(bodies(&woken["rooms"]["join"][&room_id]["timeline"]["events"]), vec!["now".to_owned()]);
    server.stop().await;
}

/// Every stream a sync reads wakes a waiting sync and is in what it answers, also when
/// the index lets the other streams be skipped.
async fn every_stream_wakes_a_waiting_sync(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_id, alice, alice_dev) = server.register("alice").await;
    let (bob_id, bob, bob_dev) = server.register("bob").await;
    let room_id = server.create_room(&alice, json!({"invite": [bob_id.clone()]})).await;
    server.join(&bob, &room_id).await;
    let event = server.send_text(&alice, &room_id, "read me").await;
    let mut since = token(&server.sync(&bob, None, "").await);
    since = token(&server.sync(&bob, Some(&since), "timeout=0").await);

    // Runs `act` while a sync of bob's waits, and gives what woke it.
    macro_rules! woken_by {
        ($what:expr, $act:expr) => {{
            let waiting = spawn_sync(&server, &bob, &since);
            server.wait_for_waiting_syncs(&bob_id, 1).await;
            let started = Instant::now();
            $act;
            let sync = waiting.await.unwrap();
            assert!(started.elapsed() < Duration::from_secs(5), "{}: woken, not timed out: {sync}", $what);
            since = token(&sync);
            sync
        }};
    }

    let sync = woken_by!("a message", server.send_text(&alice, &room_id, "hello").await);
    assert_eq!(bodies(&sync["rooms"]["join"][&room_id]["timeline"]["events"]), vec!["hello"]);

    let receipt = format!("/_matrix/client/v3/rooms/{room_id}/receipt/m.read/{event}");
    let sync =
        woken_by!("a receipt", assert_eq!(server.post(&receipt, Some(&alice), json!({})).await.0, StatusCode::OK));
    let receipts = ephemeral(&sync, &room_id, "m.receipt").unwrap_or_else(|| panic!("a receipt: {sync}"));
    assert!(receipts["content"][&event]["m.read"][&alice_id].is_object(), "{receipts}");

    let global = format!("/_matrix/client/v3/user/{bob_id}/account_data/org.example.global");
    let sync = woken_by!(
        "global account data",
        assert_eq!(server.put(&global, Some(&bob), json!({"a": 1})).await.0, StatusCode::OK)
    );
    let events = sync["account_data"]["events"].as_array().cloned().unwrap_or_default();
    assert!(events.iter().any(|e| e["type"] == "org.example.global" && e["content"]["a"] == 1), "{sync}");

    let per_room = format!("/_matrix/client/v3/user/{bob_id}/rooms/{room_id}/account_data/org.example.room");
    let sync = woken_by!(
        "room account data",
        assert_eq!(server.put(&per_room, Some(&bob), json!({"b": 2})).await.0, StatusCode::OK)
    );
    let events = sync["rooms"]["join"][&room_id]["account_data"]["events"].as_array().cloned().unwrap_or_default();
    assert!(events.iter().any(|e| e["type"] == "org.example.room" && e["content"]["b"] == 2), "{sync}");

    let to_device = json!({"messages": {bob_id.clone(): {bob_dev.clone(): {"ciphertext": "psst"}}}});
    let before_to_device = since.clone();
    let sync = woken_by!(
        "a to-device message",
        assert_eq!(
            server.put("/_matrix/client/v3/sendToDevice/m.room.encrypted/t1", Some(&alice), to_device).await.0,
            StatusCode::OK
        )
    );
    let events = sync["to_device"]["events"].as_array().cloned().unwrap_or_default();
    assert_eq!(events.len(), 1, "{sync}");
    assert_eq!(events[0]["content"]["ciphertext"], "psst");

    let upload = json!({"device_keys": device_keys(&alice_id, &alice_dev)});
    let sync = woken_by!(
        "a device list change",
        assert_eq!(server.post("/_matrix/client/v3/keys/upload", Some(&alice), upload).await.0, StatusCode::OK)
    );
    assert_eq!(sync["device_lists"]["changed"], json!([alice_id.clone()]), "{sync}");
    // Acknowledged by the sync since then, the to-device message was deleted: even a
    // token from before it no longer shows it.
    let sync = server.sync(&bob, Some(&before_to_device), "timeout=0").await;
    assert!(sync["to_device"]["events"].as_array().is_none_or(|e| e.is_empty()), "{sync}");

    let status = format!("/_matrix/client/v3/presence/{alice_id}/status");
    let sync = woken_by!(
        "presence",
        assert_eq!(
            server.put(&status, Some(&alice), json!({"presence": "unavailable", "status_msg": "away"})).await.0,
            StatusCode::OK
        )
    );
    let events = sync["presence"]["events"].as_array().cloned().unwrap_or_default();
    let alice_presence = events.iter().find(|e| e["sender"] == alice_id.as_str()).unwrap_or_else(|| panic!("{sync}"));
    assert_eq!(alice_presence["content"]["status_msg"], "away");

    let typing = format!("/_matrix/client/v3/rooms/{room_id}/typing/{alice_id}");
    let sync = woken_by!(
        "typing",
        assert_eq!(
            server.put(&typing, Some(&alice), json!({"typing": true, "timeout": 30000})).await.0,
            StatusCode::OK
        )
    );
    assert_eq!(ephemeral(&sync, &room_id, "m.typing").unwrap()["content"]["user_ids"], json!([alice_id.clone()]));

    let other = server.create_room(&alice, json!({})).await;
    let invite = json!({"user_id": bob_id.clone()});
    let sync = woken_by!(
        "an invite",
        assert_eq!(
            server.post(&format!("/_matrix/client/v3/rooms/{other}/invite"), Some(&alice), invite).await.0,
            StatusCode::OK
        )
    );
    assert!(sync["rooms"]["invite"].get(&other).is_some(), "{sync}");
    let sync = woken_by!("a join", server.join(&bob, &other).await);
    assert!(sync["rooms"]["join"].get(&other).is_some(), "{sync}");
    assert!(since.starts_with('s'), "{since}");
    server.stop().await;
}

/// After a restart the index knows nothing of what came before: a `since` from before
/// the restart reads every stream and gets what changed, before and after it.
async fn since_from_before_a_restart_reads_everything(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let (alice_id, alice, _) = server.register("alice").await;
    let (bob_id, bob, bob_dev) = server.register("bob").await;
    let room_id = server.create_room(&alice, json!({"invite": [bob_id.clone()]})).await;
    server.join(&bob, &room_id).await;
    let event = server.send_text(&alice, &room_id, "read me").await;
    let mut since = token(&server.sync(&bob, None, "").await);
    since = token(&server.sync(&bob, Some(&since), "timeout=0").await);

    let receipt = format!("/_matrix/client/v3/rooms/{room_id}/receipt/m.read/{event}");
    assert_eq!(server.post(&receipt, Some(&alice), json!({})).await.0, StatusCode::OK);
    let global = format!("/_matrix/client/v3/user/{bob_id}/account_data/org.example.global");
    assert_eq!(server.put(&global, Some(&bob), json!({"a": 1})).await.0, StatusCode::OK);
    let to_device = json!({"messages": {bob_id.clone(): {bob_dev.clone(): {"ciphertext": "psst"}}}});
    let path = "/_matrix/client/v3/sendToDevice/m.room.encrypted/t1";
    assert_eq!(server.put(path, Some(&alice), to_device).await.0, StatusCode::OK);
    let status = format!("/_matrix/client/v3/presence/{alice_id}/status");
    assert_eq!(server.put(&status, Some(&alice), json!({"presence": "unavailable"})).await.0, StatusCode::OK);
    server.restart().await;
    server.send_text(&alice, &room_id, "after restart").await;

    let sync = server.sync(&bob, Some(&since), "timeout=0").await;
    assert_eq!(bodies(&sync["rooms"]["join"][&room_id]["timeline"]["events"]), vec!["after restart"]);
    let receipts = ephemeral(&sync, &room_id, "m.receipt").unwrap_or_else(|| panic!("a receipt: {sync}"));
    assert!(receipts["content"][&event]["m.read"][&alice_id].is_object(), "{receipts}");
    let events = sync["account_data"]["events"].as_array().cloned().unwrap_or_default();
    assert!(events.iter().any(|e| e["type"] == "org.example.global"), "{sync}");
    assert_eq!(sync["to_device"]["events"].as_array().map(Vec::len), Some(1), "{sync}");
    let events = sync["presence"]["events"].as_array().cloned().unwrap_or_default();
    assert!(
        events.iter().any(|e| e["sender"] == alice_id.as_str() && e["content"]["presence"] == "unavailable"),
        "{sync}"
    );
    server.stop().await;
}

/// A sync that changes nothing of the user's presence writes none and wakes nobody:
/// the presence stream does not move, and the user's peers' waiting syncs sleep on.
async fn unchanged_presence_is_not_written(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_id, alice, _) = server.register("alice").await;
    let (bob_id, bob, _) = server.register("bob").await;
    let room_id = server.create_room(&alice, json!({"invite": [bob_id.clone()]})).await;
    server.join(&bob, &room_id).await;
    let alice_since = token(&server.sync(&alice, None, "").await);
    let mut since = token(&server.sync(&bob, None, "").await);
    since = token(&server.sync(&bob, Some(&since), "timeout=0").await);

    // Bob waits; alice syncs again and again, online as before: nothing to tell bob.
    let waiting = spawn_sync(&server, &bob, &since);
    server.wait_for_waiting_syncs(&bob_id, 1).await;
    let mut alice_next = alice_since.clone();
    let before = server.running.as_ref().unwrap().services.store.current_stream_position().await.unwrap();
    for _ in 0..3 {
        alice_next = token(&server.sync(&alice, Some(&alice_next), "timeout=0").await);
    }
    let after = server.running.as_ref().unwrap().services.store.current_stream_position().await.unwrap();
    assert_eq!(before, after, "alice's syncs wrote nothing to the stream");
    // Her status changes: that is news, and it wakes bob.
    let status = format!("/_matrix/client/v3/presence/{alice_id}/status");
    assert_eq!(
        server.put(&status, Some(&alice), json!({"presence": "online", "status_msg": "hi"})).await.0,
        StatusCode::OK
    );
    let sync = waiting.await.unwrap();
    let events = sync["presence"]["events"].as_array().cloned().unwrap_or_default();
    let event = events.iter().find(|e| e["sender"] == alice_id.as_str()).unwrap_or_else(|| panic!("{sync}"));
    assert_eq!((&event["content"]["status_msg"], &event["content"]["currently_active"]), (&json!("hi"), &json!(true)));
    assert!(event["content"]["last_active_ago"].as_u64().is_some(), "{event}");
    server.stop().await;
}

/// A sync of a user whose presence is unchanged but whose stored activity is older than
/// the refresh interval refreshes it in place: the stream does not move and nobody is
/// woken, yet what others read shows the fresh activity.
async fn activity_refresh_wakes_nobody(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let (alice_id, alice, _) = server.register("alice").await;
    let (bob_id, bob, _) = server.register("bob").await;
    let room_id = server.create_room(&alice, json!({"invite": [bob_id.clone()]})).await;
    server.join(&bob, &room_id).await;
    // Alice was last active four minutes ago, online (stored as by an earlier process).
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let store = &server.running.as_ref().unwrap().services.store;
    store.set_presence(&alice_id, "online", Some(None), now - 4 * 60 * 1000).await.unwrap();
    server.restart().await;
    let mut since = token(&server.sync(&bob, None, "").await);
    since = token(&server.sync(&bob, Some(&since), "timeout=0").await);
    let store = &server.running.as_ref().unwrap().services.store;
    let status = format!("/_matrix/client/v3/presence/{alice_id}/status");
    let (_, stale) = server.get(&status, Some(&bob)).await;
    assert!(stale["last_active_ago"].as_i64().unwrap() >= 4 * 60 * 1000, "{stale}");

    let waiting = spawn_sync(&server, &bob, &since);
    server.wait_for_waiting_syncs(&bob_id, 1).await;
    let before = store.current_stream_position().await.unwrap();
    // Alice's first sync since the restart (online, as stored).
    server.sync(&alice, None, "").await;
    assert_eq!(store.current_stream_position().await.unwrap(), before, "a refresh takes no stream position");
    let (_, fresh) = server.get(&status, Some(&bob)).await;
    assert!(fresh["last_active_ago"].as_i64().unwrap() < 60 * 1000, "refreshed: {fresh}");
    assert_eq!((&fresh["presence"], &fresh["currently_active"]), (&json!("online"), &json!(true)));
    // Bob's sync was not woken for it: it is still waiting.
    assert_eq!(
        server.running.as_ref().unwrap().services.waiting_syncs.count(&ruma::UserId::parse(&bob_id).unwrap()),
        1
    );
    waiting.abort();
    server.stop().await;
}

/// A join wakes every member's sync, and each sends the room's new summary: the room's
/// members are counted by the first of them only, and every one of them sees the right
/// figures, also after the next change (and heroes without themselves).
async fn a_membership_change_is_counted_once(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_id, alice, _) = server.register("alice").await;
    let (bob_id, bob, _) = server.register("bob").await;
    let (carol_id, carol, _) = server.register("carol").await;
    let (dave_id, dave, _) = server.register("dave").await;
    server.register("erin").await;
    let room_id = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    server.join(&bob, &room_id).await;
    server.join(&carol, &room_id).await;
    let mut since = [token(&server.sync(&bob, None, "").await), token(&server.sync(&carol, None, "").await)];
    let summary = |sync: &Value| sync["rooms"]["join"][&room_id]["summary"].clone();

    server.join(&dave, &room_id).await;
    let mut used = [0u64; 2];
    for (i, who) in [&bob, &carol].into_iter().enumerate() {
        let before = statements(&server);
        let sync = server.sync(who, Some(&since[i]), "timeout=0").await;
        used[i] = statements(&server) - before;
        assert_eq!(summary(&sync)["m.joined_member_count"], 4, "{sync}");
        assert_eq!(summary(&sync)["m.invited_member_count"], 0, "{sync}");
        since[i] = token(&sync);
    }
    // Counting and reading the first members: two statements, for bob's sync only.
    assert!(used[1] + 2 <= used[0], "carol's sync reuses what bob's counted: {used:?}");

    // The next change is counted again: dave leaves, erin is invited.
    server.leave(&dave, &room_id).await;
    let invite = format!("/_matrix/client/v3/rooms/{room_id}/invite");
    let (status, body) = server.post(&invite, Some(&alice), json!({"user_id": "@erin:localhost"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for (i, (who, me)) in [(&bob, &bob_id), (&carol, &carol_id)].into_iter().enumerate() {
        let sync = server.sync(who, Some(&since[i]), "timeout=0").await;
        let summary = summary(&sync);
        assert_eq!(summary["m.joined_member_count"], 3, "{sync}");
        assert_eq!(summary["m.invited_member_count"], 1, "{sync}");
        // The heroes: the others, joined or invited, in the order they came; not dave.
        let mut heroes = vec![alice_id.as_str(), bob_id.as_str(), carol_id.as_str(), "@erin:localhost"];
        heroes.retain(|h| h != me);
        assert_eq!(summary["m.heroes"], json!(heroes), "{sync}");
        assert!(!summary["m.heroes"].as_array().unwrap().contains(&json!(dave_id)), "{sync}");
    }
    server.stop().await;
}

backend_tests!(
    a_membership_change_is_counted_once,
    activity_refresh_wakes_nobody,
    woken_sync_with_one_message_reads_little,
    a_room_that_did_not_move_after_all_is_left_out,
    every_stream_wakes_a_waiting_sync,
    since_from_before_a_restart_reads_everything,
    unchanged_presence_is_not_written,
);
