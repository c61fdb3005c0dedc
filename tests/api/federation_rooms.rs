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
pub(crate) async fn wait_for_message(server: &TestServer, token: &str, room: &str, body: &str) -> Vec<Value> {
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

backend_tests!(
    a_user_joins_a_room_on_another_server_and_they_chat,
    a_direct_chat_with_a_user_of_another_server,
    a_declined_remote_invite_goes_away,
    the_stripped_state_of_an_invite_is_checked,
    a_late_joiner_pages_back_through_earlier_history,
    a_late_joiner_gets_what_users_banned_since_said,
    events_and_state_are_served_to_servers_in_the_room,
    history_a_server_may_not_see_comes_redacted,
    a_gap_in_what_arrives_is_filled_from_the_sender,
    bad_pdus_are_refused_and_the_room_is_unaffected,
    a_server_the_acl_denies_is_not_heard,
    conflicting_state_sent_at_once_resolves_the_same_everywhere,
    users_joining_a_remote_room_at_once_all_get_its_messages,
);

/// Several users of B join a room of A at the same moment (B is not in the room yet).
/// Each must end up joined on both servers with its join in B's history, and get the
/// room's next message in `/sync`. (Two remote joins at once used to both go through
/// send_join: the second answer's state carried the first join as an outlier, without a
/// stream position, and that user's `/sync` never showed the room's new messages.)
async fn users_joining_a_remote_room_at_once_all_get_its_messages(backend: Backend) {
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend, TRUSTING).await;
    let (_, alice_token, _) = a.register("alice").await;
    let room = a.create_room(&alice_token, json!({"preset": "public_chat"})).await;
    let mut bobs = Vec::new();
    for i in 0..4 {
        bobs.push(b.register(&format!("bob{i}")).await);
    }
    let path = format!("/_matrix/client/v3/join/{room}?via={}", name(&a));
    let joins = bobs.iter().map(|(_, token, _)| b.post(&path, Some(token), json!({})));
    for (status, body) in futures_util::future::join_all(joins).await {
        assert_eq!(status, StatusCode::OK, "join through A: {body}");
    }
    let members = format!("/_matrix/client/v3/rooms/{room}/joined_members");
    let (_, on_b) = b.get(&members, Some(&bobs[0].1)).await;
    for (bob, _, _) in &bobs {
        assert!(on_b["joined"].get(bob).is_some(), "{bob} joined on B: {on_b}");
    }
    // A hears of the joins B made on its own through /send: wait for all four.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, on_a) = a.get(&members, Some(&alice_token)).await;
        if bobs.iter().all(|(bob, _, _)| on_a["joined"].get(bob).is_some()) {
            break;
        }
        assert!(Instant::now() < deadline, "not every bob joined on A within 20 s: {on_a}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sent = a.send_text(&alice_token, &room, "hello all").await;
    for (bob, token, _) in &bobs {
        let seen = wait_for_message(&b, token, &room, "hello all").await;
        assert!(seen.iter().any(|e| e["event_id"] == sent.as_str()), "{bob} got A's event id");
        // Its own join is in the room's history on B, as the others see it.
        let (status, body) =
            b.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=50"), Some(token)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let joins: Vec<&Value> = body["chunk"]
            .as_array()
            .map(|c| c.iter().filter(|e| e["type"] == "m.room.member").collect())
            .unwrap_or_default();
        for (other, _, _) in &bobs {
            assert!(
                joins.iter().any(|e| e["state_key"] == other.as_str() && e["content"]["membership"] == "join"),
                "{bob} sees {other}'s join in /messages on B: {body}"
            );
        }
    }
    a.stop().await;
    b.stop().await;
}

/// Syncs until the user has an invite to `room`; answers its stripped state.
async fn wait_for_invite(server: &TestServer, token: &str, room: &str) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut since: Option<String> = None;
    loop {
        let sync = server.sync(token, since.as_deref(), "timeout=2000").await;
        if let Some(events) = sync["rooms"]["invite"][room]["invite_state"]["events"].as_array() {
            return events.clone();
        }
        assert!(Instant::now() < deadline, "no invite to {room} within 20 s");
        since = sync["next_batch"].as_str().map(str::to_owned);
    }
}

async fn a_direct_chat_with_a_user_of_another_server(backend: Backend) {
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend, TRUSTING).await;
    let (alice, alice_token, _) = a.register("alice").await;
    let (bob, bob_token, _) = b.register("bob").await;
    let (status, body) = a
        .put(
            &format!("/_matrix/client/v3/profile/{alice}/displayname"),
            Some(&alice_token),
            json!({"displayname": "Alice A"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = a
        .post(
            "/_matrix/client/v3/createRoom",
            Some(&alice_token),
            json!({"preset": "trusted_private_chat", "is_direct": true, "invite": [bob.clone()]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let room = body["room_id"].as_str().unwrap().to_owned();

    // Bob's server shows the invite with the state Alice's server sent along.
    let state = wait_for_invite(&b, &bob_token, &room).await;
    let invite =
        state.iter().find(|e| e["type"] == "m.room.member" && e["state_key"] == bob.as_str()).expect("the invite");
    assert_eq!(invite["sender"], alice.as_str());
    assert_eq!(invite["content"]["membership"], "invite");
    assert_eq!(invite["content"]["is_direct"], true);
    assert!(state.iter().any(|e| e["type"] == "m.room.create"), "{state:?}");
    let inviter = state.iter().find(|e| e["type"] == "m.room.member" && e["state_key"] == alice.as_str());
    assert_eq!(inviter.expect("the inviter's member event")["content"]["displayname"], "Alice A");
    // Alice's server has the invite in the room.
    let (_, members) = a.get(&format!("/_matrix/client/v3/rooms/{room}/members"), Some(&alice_token)).await;
    let memberships: Vec<(String, String)> = members["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["state_key"].as_str().unwrap().to_owned(), m["content"]["membership"].as_str().unwrap().to_owned()))
        .collect();
    assert!(memberships.contains(&(bob.clone(), "invite".to_owned())), "{memberships:?}");

    // Bob accepts (his server finds the way through the inviter's), and they chat.
    let (status, body) = b.post(&format!("/_matrix/client/v3/rooms/{room}/join"), Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "accepting the invite: {body}");
    let from_bob = b.send_text(&bob_token, &room, "hi alice").await;
    let seen = wait_for_message(&a, &alice_token, &room, "hi alice").await;
    assert!(seen.iter().any(|e| e["event_id"] == from_bob.as_str()));
    let from_alice = a.send_text(&alice_token, &room, "hi bob").await;
    let seen = wait_for_message(&b, &bob_token, &room, "hi bob").await;
    assert!(seen.iter().any(|e| e["event_id"] == from_alice.as_str()));
    a.stop().await;
    b.stop().await;
}

async fn a_declined_remote_invite_goes_away(backend: Backend) {
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend, TRUSTING).await;
    let (_, alice_token, _) = a.register("alice").await;
    let (bob, bob_token, _) = b.register("bob").await;
    let room = a.create_room(&alice_token, json!({"invite": [bob.clone()]})).await;
    wait_for_invite(&b, &bob_token, &room).await;
    let (status, body) = b.post(&format!("/_matrix/client/v3/rooms/{room}/leave"), Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let sync = b.sync(&bob_token, None, "").await;
    assert!(sync["rooms"]["invite"].get(&room).is_none(), "{sync}");
    // Alice's server heard of it (make_leave/send_leave through it).
    let (_, members) = a.get(&format!("/_matrix/client/v3/rooms/{room}/members"), Some(&alice_token)).await;
    let bobs = members["chunk"].as_array().unwrap().iter().find(|m| m["state_key"] == bob.as_str()).cloned();
    assert_eq!(bobs.expect("bob's member event")["content"]["membership"], "leave", "{members}");
    a.stop().await;
    b.stop().await;
}

async fn a_late_joiner_pages_back_through_earlier_history(backend: Backend) {
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend, TRUSTING).await;
    let (_, alice_token, _) = a.register("alice").await;
    let (_, bob_token, _) = b.register("bob").await;
    let room = a.create_room(&alice_token, json!({"preset": "public_chat"})).await;
    let mut sent = Vec::new();
    for i in 0..30 {
        sent.push(a.send_text(&alice_token, &room, &format!("early {i}")).await);
    }
    let (status, body) =
        b.post(&format!("/_matrix/client/v3/join/{room}?via={}", name(&a)), Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Paging back from now reaches what was said before Bob's server was in the room.
    let seen = messages_paging_back(&b, &bob_token, &room).await;
    assert_eq!(seen, sent, "every earlier message, oldest first, with the ids Alice's server gave them");
    a.stop().await;
    b.stop().await;
}

/// The ids of the room's messages as `token`'s user pages back through them from now
/// (backfilling), oldest first.
async fn messages_paging_back(server: &TestServer, token: &str, room: &str) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    let mut from: Option<String> = None;
    for _ in 0..10 {
        let mut path = format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=20");
        if let Some(from) = &from {
            path.push_str(&format!("&from={from}"));
        }
        let (status, page) = server.get(&path, Some(token)).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        for event in page["chunk"].as_array().unwrap() {
            if event["type"] == "m.room.message" {
                seen.push(event["event_id"].as_str().unwrap().to_owned());
            }
        }
        match page["end"].as_str() {
            Some(end) => from = Some(end.to_owned()),
            None => break,
        }
    }
    seen.reverse();
    seen
}

/// History backfilled by a late joiner is checked against the state at each event, not
/// the room's state now: what Carol said before she was banned is part of the history
/// Bob's server pages back through. (Backfilled events whose prevs had no state here
/// were checked against the current state, where Carol is banned, and rejected; so was
/// the create event, and all that followed it.)
async fn a_late_joiner_gets_what_users_banned_since_said(backend: Backend) {
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend, TRUSTING).await;
    let (_, alice_token, _) = a.register("alice").await;
    let (carol, carol_token, _) = a.register("carol").await;
    let (_, bob_token, _) = b.register("bob").await;
    let room = a.create_room(&alice_token, json!({"preset": "public_chat"})).await;
    // More than one backfill's worth before Carol comes: the first backfill's oldest
    // event has prevs B has never seen, and B asks A for the state there.
    let mut sent = Vec::new();
    for i in 0..110 {
        sent.push(a.send_text(&alice_token, &room, &format!("before carol {i}")).await);
    }
    let (status, body) = a.post(&format!("/_matrix/client/v3/join/{room}"), Some(&carol_token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for i in 0..30 {
        let (token, who) = if i % 3 == 0 { (&carol_token, "carol") } else { (&alice_token, "alice") };
        sent.push(a.send_text(token, &room, &format!("{who} {i}")).await);
    }
    let (status, body) =
        a.post(&format!("/_matrix/client/v3/rooms/{room}/ban"), Some(&alice_token), json!({"user_id": carol})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for i in 30..35 {
        sent.push(a.send_text(&alice_token, &room, &format!("alice {i}")).await);
    }
    let (status, body) =
        b.post(&format!("/_matrix/client/v3/join/{room}?via={}", name(&a)), Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let seen = messages_paging_back(&b, &bob_token, &room).await;
    assert_eq!(seen, sent, "every earlier message, Carol's included, oldest first");
    a.stop().await;
    b.stop().await;
}

/// With `joined` history, what was said before a server's users joined reaches that
/// server only redacted (backfill, get_missing_events), and `event` and
/// `timestamp_to_event` refuse it.
async fn history_a_server_may_not_see_comes_redacted(backend: Backend) {
    use reqwest::Method;

    use crate::federation::{fed_request, sign};
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend, TRUSTING).await;
    let (_, alice_token, _) = a.register("alice").await;
    let (_, bob_token, _) = b.register("bob").await;
    let room = a
        .create_room(
            &alice_token,
            json!({"preset": "public_chat", "initial_state": [
                {"type": "m.room.history_visibility", "state_key": "", "content": {"history_visibility": "joined"}}
            ]}),
        )
        .await;
    let secret = a.send_text(&alice_token, &room, "before bob's server").await;
    let (status, _) =
        b.post(&format!("/_matrix/client/v3/join/{room}?via={}", name(&a)), Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let open = a.send_text(&alice_token, &room, "after bob joined").await;
    let a_name = name(&a).to_string();
    let ask = |method: Method, path: String, body: Option<Value>| {
        let header = sign(&b, &a_name, method.as_str(), &path, body.as_ref());
        let a = &a;
        async move { fed_request(a, method, &path, body.as_ref(), Some(&header)).await }
    };

    let (status, body) = ask(Method::GET, format!("/_matrix/federation/v1/event/{secret}"), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["errcode"], "M_FORBIDDEN");
    let (status, body) = ask(Method::GET, format!("/_matrix/federation/v1/event/{open}"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["pdus"][0]["content"]["body"], "after bob joined");

    let (status, body) =
        ask(Method::GET, format!("/_matrix/federation/v1/backfill/{room}?v={open}&limit=50"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let pdus = body["pdus"].as_array().unwrap();
    let by_body = |pdus: &[Value], text: &str| pdus.iter().any(|p| p["content"]["body"] == text);
    let redacted_messages = |pdus: &[Value]| -> Vec<Value> {
        pdus.iter().filter(|p| p["type"] == "m.room.message" && p["content"] == json!({})).cloned().collect()
    };
    assert!(!by_body(pdus, "before bob's server"), "the hidden message's content leaked: {body}");
    assert!(by_body(pdus, "after bob joined"), "{body}");
    let redacted = redacted_messages(pdus);
    assert_eq!(redacted.len(), 1, "the hidden message is in the backfill, redacted: {body}");
    // Still signed and hashed as the original: the receiver can check it.
    assert!(redacted[0]["hashes"]["sha256"].is_string() && redacted[0]["signatures"].is_object(), "{body}");

    // timestamp_to_event never names it either way.
    let (status, hidden) = a.get(&format!("/_matrix/client/v3/rooms/{room}/event/{secret}"), Some(&alice_token)).await;
    assert_eq!(status, StatusCode::OK, "{hidden}");
    let at = hidden["origin_server_ts"].as_i64().unwrap();
    for dir in ["f", "b"] {
        let (status, body) =
            ask(Method::GET, format!("/_matrix/federation/v1/timestamp_to_event/{room}?ts={at}&dir={dir}"), None).await;
        assert!(status == StatusCode::OK || status == StatusCode::NOT_FOUND, "{status} {body}");
        assert_ne!(body["event_id"], secret.as_str(), "dir={dir}: the hidden event was named: {body}");
    }

    let missing = json!({"earliest_events": [], "latest_events": [open], "limit": 50, "min_depth": 0});
    let (status, body) =
        ask(Method::POST, format!("/_matrix/federation/v1/get_missing_events/{room}"), Some(missing)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let events = body["events"].as_array().unwrap();
    assert!(!by_body(events, "before bob's server"), "{body}");
    assert_eq!(redacted_messages(events).len(), 1, "{body}");
    a.stop().await;
    b.stop().await;
}

async fn events_and_state_are_served_to_servers_in_the_room(backend: Backend) {
    use reqwest::Method;

    use crate::federation::{fed_request, sign};
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend.clone(), TRUSTING).await;
    let c = federating(backend, TRUSTING).await;
    let (_, alice_token, _) = a.register("alice").await;
    let (_, bob_token, _) = b.register("bob").await;
    let room = a.create_room(&alice_token, json!({"preset": "public_chat"})).await;
    let first = a.send_text(&alice_token, &room, "one").await;
    let (status, _) =
        b.post(&format!("/_matrix/client/v3/join/{room}?via={}", name(&a)), Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let second = a.send_text(&alice_token, &room, "two").await;
    let third = a.send_text(&alice_token, &room, "three").await;
    let a_name = name(&a).to_string();
    let ask = |server: &TestServer, method: Method, path: String, body: Option<Value>| {
        let header = sign(server, &a_name, method.as_str(), &path, body.as_ref());
        let a = &a;
        async move { fed_request(a, method, &path, body.as_ref(), Some(&header)).await }
    };

    let (status, body) = ask(&b, Method::GET, format!("/_matrix/federation/v1/event/{second}"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["pdus"][0]["content"]["body"], "two");
    let (status, body) =
        ask(&b, Method::GET, format!("/_matrix/federation/v1/state_ids/{room}?event_id={third}"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["pdu_ids"].as_array().unwrap().len() >= 5, "{body}");
    assert!(!body["auth_chain_ids"].as_array().unwrap().is_empty(), "{body}");
    let (status, body) =
        ask(&b, Method::GET, format!("/_matrix/federation/v1/state/{room}?event_id={third}"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["pdus"].as_array().unwrap().iter().any(|e| e["type"] == "m.room.create"), "{body}");
    let (status, body) = ask(&b, Method::GET, format!("/_matrix/federation/v1/event_auth/{room}/{third}"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["auth_chain"].as_array().unwrap().iter().any(|e| e["type"] == "m.room.power_levels"), "{body}");
    let missing = json!({"earliest_events": [first], "latest_events": [third], "limit": 10, "min_depth": 0});
    let (status, body) =
        ask(&b, Method::POST, format!("/_matrix/federation/v1/get_missing_events/{room}"), Some(missing.clone())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let bodies: Vec<&str> =
        body["events"].as_array().unwrap().iter().filter_map(|e| e["content"]["body"].as_str()).collect();
    assert_eq!(bodies, vec!["two"], "between the first and the third, oldest first: {body}");

    // A server with nobody in the room gets none of it.
    let result = ask(&c, Method::GET, format!("/_matrix/federation/v1/event/{second}"), None).await;
    assert_eq!(result.0, StatusCode::FORBIDDEN, "{}", result.1);
    let result =
        ask(&c, Method::POST, format!("/_matrix/federation/v1/get_missing_events/{room}"), Some(missing)).await;
    assert_eq!(result.0, StatusCode::FORBIDDEN, "{}", result.1);
    a.stop().await;
    b.stop().await;
    c.stop().await;
}

async fn a_gap_in_what_arrives_is_filled_from_the_sender(backend: Backend) {
    use crate::federation::services;
    let a = crate::federation::federating_with(backend.clone(), TRUSTING, |c| c.federation.max_retry_interval_ms = 300)
        .await;
    let mut b = federating(backend, TRUSTING).await;
    let (_, alice_token, _) = a.register("alice").await;
    let (_, bob_token, _) = b.register("bob").await;
    let room = a.create_room(&alice_token, json!({"preset": "public_chat"})).await;
    let (status, _) =
        b.post(&format!("/_matrix/client/v3/join/{room}?via={}", name(&a)), Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let b_name = name(&b).to_string();
    b.pause().await;
    let mut sent = Vec::new();
    for i in 0..3 {
        sent.push(a.send_text(&alice_token, &room, &format!("lost {i}")).await);
    }
    // Those never reach B through the queue (as if A had lost them)...
    let queued = services(&a).store.get_federation_batch(&b_name, 1000, 1000, 0).await.unwrap();
    let pdus: Vec<i64> = queued.pdus.iter().map(|p| p.0).collect();
    let edus: Vec<i64> = queued.edus.iter().map(|e| e.0).collect();
    services(&a).store.delete_federation_sent(&b_name, &pdus, &edus).await.unwrap();
    b.resume().await;
    // ...but the next one names the last of them, and B fetches what it misses.
    sent.push(a.send_text(&alice_token, &room, "after the gap").await);
    // They arrive live, in /sync (not later by backfill), in order.
    let seen = wait_for_message(&b, &bob_token, &room, "after the gap").await;
    let ids: Vec<String> = seen
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, sent, "the lost messages, then the one after them, in order");
    a.stop().await;
    b.stop().await;
}

#[allow(clippy::too_many_arguments)]
/// A PDU from `b`'s user `sender` in `room` (on `a`), on top of `a`'s latest event,
/// with the auth events the rules ask for; signed with `key` (B's own, or another).
pub(crate) async fn remote_pdu(
    a: &TestServer,
    alice_token: &str,
    room: &str,
    sender: &str,
    kind: &str,
    state_key: Option<&str>,
    content: Value,
    key: &ruma::signatures::Ed25519KeyPair,
    key_server: &str,
) -> (String, ruma::CanonicalJsonObject) {
    let (_, state) = a.get(&format!("/_matrix/client/v3/rooms/{room}/state"), Some(alice_token)).await;
    let find = |t: &str, k: &str| {
        state.as_array().unwrap().iter().find(|e| e["type"] == t && e["state_key"] == k).map(|e| e["event_id"].clone())
    };
    let auth: Vec<Value> =
        [find("m.room.power_levels", ""), find("m.room.member", sender)].into_iter().flatten().collect();
    let (_, page) = a.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=1"), Some(alice_token)).await;
    let last = &page["chunk"][0];
    let mut pdu = json!({
        "room_id": room, "sender": sender, "type": kind, "content": content,
        "origin_server_ts": 1_700_000_000_000u64, "depth": 100,
        "prev_events": [last["event_id"]], "auth_events": auth,
    });
    if let Some(k) = state_key {
        pdu["state_key"] = json!(k);
    }
    let mut object: ruma::CanonicalJsonObject = serde_json::from_value(pdu).unwrap();
    let rules = ruma::RoomVersionId::V12.rules().unwrap();
    ruma::signatures::hash_and_sign_event(key_server, key, &mut object, &rules.redaction).unwrap();
    let id = format!("${}", ruma::signatures::reference_hash(&object, &rules).unwrap());
    (id, object)
}

async fn bad_pdus_are_refused_and_the_room_is_unaffected(backend: Backend) {
    use reqwest::Method;

    use crate::federation::{fed_request, services, sign};
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend, TRUSTING).await;
    let (_, alice_token, _) = a.register("alice").await;
    let (bob, bob_token, _) = b.register("bob").await;
    let room = a.create_room(&alice_token, json!({"preset": "public_chat", "room_version": "12"})).await;
    let (status, _) =
        b.post(&format!("/_matrix/client/v3/join/{room}?via={}", name(&a)), Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let b_name = name(&b).to_string();
    let b_key = &services(&b).signing_key;
    let other_key = ruma::signatures::Ed25519KeyPair::from_der(
        &ruma::signatures::Ed25519KeyPair::generate(),
        b_key.version().to_owned(),
    )
    .unwrap();
    let msg = |body: &str| json!({"msgtype": "m.text", "body": body});

    let (good, good_pdu) =
        remote_pdu(&a, &alice_token, &room, &bob, "m.room.message", None, msg("fine"), b_key, &b_name).await;
    let (forged, forged_pdu) =
        remote_pdu(&a, &alice_token, &room, &bob, "m.room.message", None, msg("forged"), &other_key, &b_name).await;
    let (tampered, mut tampered_pdu) =
        remote_pdu(&a, &alice_token, &room, &bob, "m.room.message", None, msg("original"), b_key, &b_name).await;
    // The content changes after signing: the hash no longer matches (the signature,
    // over the redacted form, still does).
    tampered_pdu.insert("content".into(), serde_json::from_value(msg("tampered")).unwrap());
    let pl = json!({"users": {bob.clone(): 100}, "users_default": 0});
    let (grab, grab_pdu) =
        remote_pdu(&a, &alice_token, &room, &bob, "m.room.power_levels", Some(""), pl, b_key, &b_name).await;

    let txn = json!({
        "origin": b_name, "origin_server_ts": 1_700_000_000_000u64,
        "pdus": [good_pdu, forged_pdu, tampered_pdu, grab_pdu],
    });
    let path = "/_matrix/federation/v1/send/bad1";
    let header = sign(&b, name(&a).as_str(), "PUT", path, Some(&txn));
    let (status, body) = fed_request(&a, Method::PUT, path, Some(&txn), Some(&header)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let results = &body["pdus"];
    assert_eq!(results[&good], json!({}), "{body}");
    assert!(results[&forged]["error"].is_string(), "a bad signature is refused: {body}");
    assert!(results[&grab]["error"].is_string(), "power levels bob may not set are rejected: {body}");

    let get = |id: &str| {
        let path = format!("/_matrix/client/v3/rooms/{room}/event/{id}");
        let (a, token) = (&a, alice_token.clone());
        async move { a.get(&path, Some(&token)).await }
    };
    assert_eq!(get(&good).await.1["content"]["body"], "fine");
    assert_eq!(get(&forged).await.0, StatusCode::NOT_FOUND);
    let (status, stored) = get(&tampered).await;
    assert_eq!(status, StatusCode::OK, "{stored}");
    assert_eq!(stored["content"], json!({}), "kept only in its redacted form");
    assert_eq!(get(&grab).await.0, StatusCode::NOT_FOUND);
    let (_, levels) =
        a.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.power_levels"), Some(&alice_token)).await;
    assert!(levels["users"].get(&bob).is_none(), "the room's power levels are unchanged: {levels}");
    a.stop().await;
    b.stop().await;
}

async fn a_server_the_acl_denies_is_not_heard(backend: Backend) {
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend, TRUSTING).await;
    let (_, alice_token, _) = a.register("alice").await;
    let (bob, bob_token, _) = b.register("bob").await;
    let room = a.create_room(&alice_token, json!({"preset": "public_chat"})).await;
    let (status, _) =
        b.post(&format!("/_matrix/client/v3/join/{room}?via={}", name(&a)), Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    b.send_text(&bob_token, &room, "before the acl").await;
    wait_for_message(&a, &alice_token, &room, "before the acl").await;

    // Every server here has an IP-literal name: this ACL denies Bob's server (and, as
    // Bob's server sees it, Alice's; each judges only what others send).
    let (status, body) = a
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.server_acl/"),
            Some(&alice_token),
            json!({"allow": ["*"], "deny": [], "allow_ip_literals": false}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let denied = b.send_text(&bob_token, &room, "after the acl").await;
    let (status, _) = b
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/typing/{bob}"),
            Some(&bob_token),
            json!({"typing": true, "timeout": 30000}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    // Once B's queue for A is empty, A has answered the transaction holding both.
    let a_name = name(&a).to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    while crate::federation::services(&b).store.count_federation_outbox(&a_name).await.unwrap() > 0 {
        assert!(Instant::now() < deadline, "B's queue for A did not drain");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _) = a.get(&format!("/_matrix/client/v3/rooms/{room}/event/{denied}"), Some(&alice_token)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "an event from a denied server is not taken in");
    let sync = a.sync(&alice_token, None, "").await;
    let typing = &sync["rooms"]["join"][&room]["ephemeral"]["events"];
    assert!(
        !typing
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["content"]["user_ids"].as_array().is_some_and(|u| !u.is_empty())),
        "nobody typing: {typing}"
    );
    a.stop().await;
    b.stop().await;
}

/// An event of `sender` on top of `prev`, with the given auth events, signed by
/// `server`'s key: what that server would send.
#[allow(clippy::too_many_arguments)]
fn signed_event(
    server: &TestServer,
    room: &str,
    sender: &str,
    kind: &str,
    content: Value,
    prev: &str,
    depth: u64,
    auth: &[String],
) -> ruma::CanonicalJsonObject {
    use crate::federation::services;
    let pdu = json!({
        "room_id": room, "sender": sender, "type": kind, "state_key": "", "content": content,
        "origin_server_ts": 1_800_000_000_000u64, "depth": depth, "prev_events": [prev], "auth_events": auth,
    });
    let mut object: ruma::CanonicalJsonObject = serde_json::from_value(pdu).unwrap();
    let rules = ruma::RoomVersionId::V11.rules().unwrap();
    let key = &services(server).signing_key;
    ruma::signatures::hash_and_sign_event(name(server).as_str(), key, &mut object, &rules.redaction).unwrap();
    object
}

async fn conflicting_state_sent_at_once_resolves_the_same_everywhere(backend: Backend) {
    use convo::service::rooms::pipeline::Arrival;

    use crate::federation::services;
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend, TRUSTING).await;
    let (alice, alice_token, _) = a.register("alice").await;
    let (bob, bob_token, _) = b.register("bob").await;
    let room =
        a.create_room(&alice_token, json!({"preset": "public_chat", "room_version": "11", "topic": "old"})).await;
    let (status, _) =
        b.post(&format!("/_matrix/client/v3/join/{room}?via={}", name(&a)), Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    // Bob becomes a moderator (enough to change the topic); both servers see it.
    let (_, mut levels) =
        a.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.power_levels"), Some(&alice_token)).await;
    levels["users"][&bob] = json!(50);
    let (status, body) = a
        .put(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.power_levels/"), Some(&alice_token), levels.clone())
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let promoted = body["event_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, now) =
            b.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.power_levels"), Some(&bob_token)).await;
        if now["users"][&bob] == 50 {
            break;
        }
        assert!(Instant::now() < deadline, "bob's server never saw his promotion");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // At once, on the same head: Alice demotes Bob, and Bob changes the topic.
    let room_id = ruma::OwnedRoomId::try_from(room.as_str()).unwrap();
    let head = services(&a).store.get_room_head(&room).await.unwrap();
    assert_eq!(head.len(), 1);
    let (prev, depth) = (head[0].0.clone(), head[0].1 as u64 + 1);
    let (_, state) = a.get(&format!("/_matrix/client/v3/rooms/{room}/state"), Some(&alice_token)).await;
    let id_of = |t: &str, k: &str| {
        state.as_array().unwrap().iter().find(|e| e["type"] == t && e["state_key"] == k).unwrap()["event_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let create = id_of("m.room.create", "");
    let mut demoted = levels.clone();
    demoted["users"][&bob] = json!(0);
    let demotion = signed_event(
        &a,
        &room,
        &alice,
        "m.room.power_levels",
        demoted,
        &prev,
        depth,
        &[create.clone(), promoted.clone(), id_of("m.room.member", &alice)],
    );
    let topic = signed_event(
        &b,
        &room,
        &bob,
        "m.room.topic",
        json!({"topic": "bob's"}),
        &prev,
        depth,
        &[create, promoted, id_of("m.room.member", &bob)],
    );
    // Each server takes its own first, then the other's (as if they crossed on the wire).
    let version = ruma::RoomVersionId::V11;
    let (sa, sb) = (services(&a), services(&b));
    let outcomes = [
        sa.handle_pdu(&room_id, &version, demotion.clone(), Arrival::Local).await.unwrap(),
        sb.handle_pdu(&room_id, &version, topic.clone(), Arrival::Local).await.unwrap(),
        sa.handle_pdu(&room_id, &version, topic, Arrival::Live).await.unwrap(),
        sb.handle_pdu(&room_id, &version, demotion, Arrival::Live).await.unwrap(),
    ];
    assert!(!format!("{outcomes:?}").contains("Rejected"), "each is allowed on its own branch: {outcomes:?}");

    // Power levels come first in resolution: Bob is demoted, so his topic does not hold.
    for (server, token) in [(&a, &alice_token), (&b, &bob_token)] {
        let (_, levels) =
            server.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.power_levels"), Some(token)).await;
        assert_eq!(levels["users"][&bob], 0, "bob demoted on {}", name(server));
        let (_, topic) = server.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.topic"), Some(token)).await;
        assert_eq!(topic["topic"], "old", "the topic on {}", name(server));
    }
    a.stop().await;
    b.stop().await;
}

/// In a room of version 12, the state another server sends with an invite must be
/// the room's own signed PDUs, the create event among them (Matrix 1.16):
/// `M_INVALID_PARAM` otherwise, and the invite is not shown to the user.
async fn the_stripped_state_of_an_invite_is_checked(backend: Backend) {
    use reqwest::Method;
    use ruma::RoomVersionId;

    use crate::{
        dag::sign_pdu,
        federation::{fed_request, services, sign},
    };
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend, TRUSTING).await;
    let (alice, alice_token, _) = a.register("alice").await;
    let (bob, bob_token, _) = b.register("bob").await;
    let room = a.create_room(&alice_token, json!({"preset": "private_chat", "room_version": "12"})).await;
    let create_id = format!("${}", room.trim_start_matches('!'));
    let create_json = services(&a).store.get_event(&create_id).await.unwrap().expect("the create event").json;
    let create: Value = serde_json::from_str(&create_json).unwrap();
    let a_name = name(&a).to_string();
    let b_name = name(&b).to_string();
    let invite_with = |state: Vec<Value>, n: i64| {
        let (event_id, pdu) = sign_pdu(
            &a_name,
            &services(&a).signing_key,
            json!({"type": "m.room.member", "state_key": bob, "sender": alice, "room_id": room,
                   "content": {"membership": "invite"}, "origin_server_ts": 1_700_000_000_000i64 + n,
                   "depth": 5, "prev_events": [create_id], "auth_events": []}),
            &RoomVersionId::V12,
        );
        let body = json!({"room_version": "12", "event": pdu, "invite_room_state": state});
        (format!("/_matrix/federation/v2/invite/{room}/{event_id}"), body)
    };
    let put = |(path, body): (String, Value)| {
        let header = sign(&a, &b_name, "PUT", &path, Some(&body));
        let b = &b;
        async move { fed_request(b, Method::PUT, &path, Some(&body), Some(&header)).await }
    };

    let mut tampered = create.clone();
    tampered["content"]["room_version"] = json!("11");
    let stripped = json!({"type": "m.room.create", "state_key": "", "sender": alice, "content": create["content"]});
    let mut other_room = create.clone();
    other_room["room_id"] = json!("!elsewhere:example.org");
    for (n, (state, why)) in [
        (vec![], "no create event"),
        (vec![tampered], "a create event whose content was changed"),
        (vec![stripped], "a stripped event, not a PDU"),
        (vec![create.clone(), other_room], "a PDU said to be of another room"),
    ]
    .into_iter()
    .enumerate()
    {
        let (status, body) = put(invite_with(state, n as i64)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{why}: {body}");
        assert_eq!(body["errcode"], "M_INVALID_PARAM", "{why}: {body}");
    }
    let sync = b.sync(&bob_token, None, "").await;
    assert!(sync["rooms"]["invite"].get(&room).is_none(), "a refused invite was shown: {sync}");

    // The room's own create event, as signed: the invite is taken, and shown with it.
    let (status, body) = put(invite_with(vec![create.clone()], 10)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let sync = b.sync(&bob_token, None, "").await;
    let shown = sync["rooms"]["invite"][&room]["invite_state"]["events"].as_array().cloned().unwrap_or_default();
    assert!(shown.iter().any(|e| e["type"] == "m.room.create"), "{sync}");
    a.stop().await;
    b.stop().await;
}
