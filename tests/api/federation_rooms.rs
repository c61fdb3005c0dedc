//! Rooms across two Convo servers: a user joins a room of the other server through
//! make_join/send_join, then messages flow both ways through `/send`, with the same
//! event ids on both servers.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{
    backend_tests,
    common::{Backend, TestServer, bodies},
    federation::{TRUSTING, federating, name},
};

/// Syncs (long-polling) until `room`'s timeline shows a message with `body`, for at most
/// 20 s; answers the room's timeline events seen so far.
async fn wait_for_message(server: &TestServer, token: &str, room: &str, body: &str) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut since: Option<String> = None;
    let mut seen = Vec::new();
    loop {
        let sync = server.sync(token, since.as_deref(), "timeout=2000").await;
        if let Some(events) = sync["rooms"]["join"][room]["timeline"]["events"].as_array() {
            seen.extend(events.iter().cloned());
        }
        if bodies(&Value::Array(seen.clone())).iter().any(|b| b == body) {
            return seen;
        }
        assert!(Instant::now() < deadline, "{body:?} did not arrive within 20 s; saw {seen:?}");
        since = sync["next_batch"].as_str().map(str::to_owned);
    }
}

async fn a_user_joins_a_room_on_another_server_and_they_chat(backend: Backend) {
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend, TRUSTING).await;
    let (alice, alice_token, _) = a.register("alice").await;
    let (bob, bob_token, _) = b.register("bob").await;
    let room = a.create_room(&alice_token, json!({"preset": "public_chat", "name": "Across"})).await;
    a.send_text(&alice_token, &room, "before bob").await;

    let (status, body) =
        b.post(&format!("/_matrix/client/v3/join/{room}?via={}", name(&a)), Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "join through A: {body}");
    assert_eq!(body["room_id"], room.as_str());

    // Bob's server knows the room now: its name and both members.
    let (status, body) = b.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.name"), Some(&bob_token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["name"], "Across");
    let (status, members) = b.get(&format!("/_matrix/client/v3/rooms/{room}/joined_members"), Some(&bob_token)).await;
    assert_eq!(status, StatusCode::OK, "{members}");
    assert!(members["joined"].get(&alice).is_some() && members["joined"].get(&bob).is_some(), "{members}");
    // Alice's server saw the join.
    let (_, members) = a.get(&format!("/_matrix/client/v3/rooms/{room}/joined_members"), Some(&alice_token)).await;
    assert!(members["joined"].get(&bob).is_some(), "{members}");

    // Messages both ways.
    let from_alice = a.send_text(&alice_token, &room, "hello bob").await;
    let seen = wait_for_message(&b, &bob_token, &room, "hello bob").await;
    assert!(seen.iter().any(|e| e["event_id"] == from_alice.as_str()), "same event id on both servers");
    let from_bob = b.send_text(&bob_token, &room, "hello alice").await;
    let seen = wait_for_message(&a, &alice_token, &room, "hello alice").await;
    let on_a = seen.iter().find(|e| e["event_id"] == from_bob.as_str()).expect("bob's event id on A");
    assert_eq!(on_a["sender"], bob.as_str());
    a.stop().await;
    b.stop().await;
}

backend_tests!(a_user_joins_a_room_on_another_server_and_they_chat);
