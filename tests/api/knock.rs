//! Knocking: a user asks to join a room whose join rules allow it, and a member with the
//! power to invite lets them in (an invite), or refuses (a kick); the knocker may
//! retract (leave). On one server, and between two Convo servers (make_knock,
//! send_knock, the invite that accepts, the kick that refuses, the leave that retracts).

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::{
    backend_tests,
    common::{Backend, TestServer, assert_error},
    federation::{TRUSTING, fed_request, federating, name, sign},
};

backend_tests!(
    a_local_knock_is_seen_by_members_and_accepted_by_an_invite,
    a_local_knock_is_refused_by_a_kick_and_can_be_retracted,
    who_may_not_knock_is_refused,
    knock_restricted_rooms_take_knocks_from_version_10,
    parallel_knocks_all_land,
    a_user_knocks_on_a_room_of_another_server_and_is_let_in,
    a_remote_knock_is_refused_by_a_kick_and_can_be_retracted,
    make_and_send_knock_refuse_what_the_room_does_not_allow,
    members_of_an_allowed_room_join_a_restricted_room,
    a_restricted_room_of_another_server_is_joined_through_an_allowed_room,
    a_rescinded_remote_invite_goes_away,
    a_pending_membership_ends_once_when_ends_race,
);

/// Syncs (long-polling) from `since` until `pick` finds something in a response, for
/// at most 20 s; answers it and the response's `next_batch`.
async fn sync_until<T>(
    server: &TestServer,
    token: &str,
    since: Option<String>,
    what: &str,
    pick: impl Fn(&Value) -> Option<T>,
) -> (T, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut since = since;
    loop {
        let sync = server.sync(token, since.as_deref(), "timeout=2000").await;
        let next = sync["next_batch"].as_str().unwrap().to_owned();
        if let Some(found) = pick(&sync) {
            return (found, next);
        }
        assert!(Instant::now() < deadline, "{what} did not happen within 20 s; last sync: {sync}");
        since = Some(next);
    }
}

/// A room (of `version`) whose join rule is `join_rule`, created by `token`'s user.
async fn room_with_rule(server: &TestServer, token: &str, version: &str, join_rule: Value) -> String {
    server
        .create_room(
            token,
            json!({
                "room_version": version,
                "name": "Knock knock",
                "initial_state": [{"type": "m.room.join_rules", "state_key": "", "content": join_rule}],
            }),
        )
        .await
}

async fn knock(server: &TestServer, token: &str, room: &str, query: &str) -> (StatusCode, Value) {
    server.post(&format!("/_matrix/client/v3/knock/{room}{query}"), Some(token), json!({"reason": "let me in"})).await
}

/// `user`'s membership in `room` as `token`'s user sees it in `/members`.
async fn membership(server: &TestServer, token: &str, room: &str, user: &str) -> Option<String> {
    let (status, body) = server.get(&format!("/_matrix/client/v3/rooms/{room}/members"), Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["state_key"] == user)
        .map(|m| m["content"]["membership"].as_str().unwrap().to_owned())
}

/// The knock section's stripped state for `room`, if the sync has it.
fn knock_state(sync: &Value, room: &str) -> Option<Vec<Value>> {
    sync["rooms"]["knock"][room]["knock_state"]["events"].as_array().cloned()
}

#[track_caller]
fn assert_knock_state(state: &[Value], user: &str) {
    let kinds: Vec<&str> = state.iter().filter_map(|e| e["type"].as_str()).collect();
    assert!(kinds.contains(&"m.room.create"), "the create event: {state:?}");
    let rules = state.iter().find(|e| e["type"] == "m.room.join_rules").expect("the join rules");
    assert!(rules["content"]["join_rule"].as_str().unwrap().starts_with("knock"), "{rules}");
    assert_eq!(state.iter().find(|e| e["type"] == "m.room.name").expect("the name")["content"]["name"], "Knock knock");
    let own =
        state.iter().find(|e| e["type"] == "m.room.member" && e["state_key"] == user).expect("the user's own knock");
    assert_eq!(own["content"]["membership"], "knock");
    assert_eq!(own["content"]["reason"], "let me in");
    for event in state {
        let mut keys: Vec<&str> = event.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["content", "sender", "state_key", "type"], "stripped state only: {event}");
    }
}

async fn a_local_knock_is_seen_by_members_and_accepted_by_an_invite(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, alice_token, _) = server.register("alice").await;
    let (bob, bob_token, _) = server.register("bob").await;
    let room = room_with_rule(&server, &alice_token, "12", json!({"join_rule": "knock"})).await;
    let alice_since = server.sync(&alice_token, None, "").await["next_batch"].as_str().unwrap().to_owned();

    let (status, body) = knock(&server, &bob_token, &room, "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["room_id"], room.as_str());

    // Bob's client shows the room under `knock`, with the stripped state and his knock.
    let sync = server.sync(&bob_token, None, "").await;
    let state = knock_state(&sync, &room).unwrap_or_else(|| panic!("no knock section: {sync}"));
    assert_knock_state(&state, &bob);
    assert!(sync["rooms"]["join"].get(&room).is_none() && sync["rooms"]["invite"].get(&room).is_none());
    let bob_since = sync["next_batch"].as_str().unwrap().to_owned();

    // Alice (who may invite) sees the knock in the room's timeline and member list.
    let (knock_event, _) = sync_until(&server, &alice_token, Some(alice_since), "alice seeing the knock", |s| {
        s["rooms"]["join"][&room]["timeline"]["events"]
            .as_array()?
            .iter()
            .find(|e| e["type"] == "m.room.member" && e["state_key"] == bob.as_str())
            .cloned()
    })
    .await;
    assert_eq!(knock_event["content"]["membership"], "knock");
    assert_eq!(knock_event["content"]["reason"], "let me in");
    assert_eq!(membership(&server, &alice_token, &room, &bob).await.as_deref(), Some("knock"));
    // While knocking, Bob sees no history (the room's is `shared`: for members) and may
    // not send.
    let (status, page) = server.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b"), Some(&bob_token)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    for event in page["chunk"].as_array().unwrap() {
        assert_eq!(event["state_key"], bob.as_str(), "only his own knock: {page}");
    }
    let send = server
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/k1"),
            Some(&bob_token),
            json!({"msgtype": "m.text", "body": "hi"}),
        )
        .await;
    assert_error(&send, StatusCode::FORBIDDEN, "M_FORBIDDEN");

    // Alice accepts: an invite. Bob's room moves from `knock` to `invite`, then he joins.
    let (status, body) = server
        .post(&format!("/_matrix/client/v3/rooms/{room}/invite"), Some(&alice_token), json!({"user_id": bob}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (invite, bob_since) = sync_until(&server, &bob_token, Some(bob_since), "bob's invite", |s| {
        s["rooms"]["invite"][&room]["invite_state"]["events"].as_array().cloned()
    })
    .await;
    let own = invite.iter().find(|e| e["type"] == "m.room.member" && e["state_key"] == bob.as_str()).unwrap();
    assert_eq!(own["content"]["membership"], "invite");
    assert_eq!(own["sender"], alice.as_str());
    server.join(&bob_token, &room).await;
    let (joined, _) =
        sync_until(&server, &bob_token, Some(bob_since), "bob's join", |s| s["rooms"]["join"].get(&room).cloned())
            .await;
    assert!(joined["timeline"]["events"].as_array().unwrap().iter().any(|e| e["type"] == "m.room.member"
        && e["state_key"] == bob.as_str()
        && e["content"]["membership"] == "join"));
    assert_eq!(membership(&server, &alice_token, &room, &bob).await.as_deref(), Some("join"));
    server.stop().await;
}

async fn a_local_knock_is_refused_by_a_kick_and_can_be_retracted(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice_token, _) = server.register("alice").await;
    let (bob, bob_token, _) = server.register("bob").await;
    let room = room_with_rule(&server, &alice_token, "11", json!({"join_rule": "knock"})).await;
    let (status, body) = knock(&server, &bob_token, &room, "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let since = server.sync(&bob_token, None, "").await["next_batch"].as_str().unwrap().to_owned();

    // Refused: a kick. Bob's room moves to `leave`, with the kick in its timeline.
    let (status, body) = server
        .post(
            &format!("/_matrix/client/v3/rooms/{room}/kick"),
            Some(&alice_token),
            json!({"user_id": bob, "reason": "not now"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (left, since) =
        sync_until(&server, &bob_token, Some(since), "bob's refusal", |s| s["rooms"]["leave"].get(&room).cloned())
            .await;
    let kick = left["timeline"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "m.room.member" && e["state_key"] == bob.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("the kick in the left room's timeline: {left}"));
    assert_eq!(kick["content"]["membership"], "leave");
    assert_eq!(kick["content"]["reason"], "not now");
    assert_eq!(membership(&server, &alice_token, &room, &bob).await.as_deref(), Some("leave"));

    // Bob knocks again, then thinks better of it: a leave retracts the knock.
    let (status, body) = knock(&server, &bob_token, &room, "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, since) =
        sync_until(&server, &bob_token, Some(since), "bob's second knock", |s| knock_state(s, &room)).await;
    server.leave(&bob_token, &room).await;
    sync_until(&server, &bob_token, Some(since), "bob's retraction", |s| s["rooms"]["leave"].get(&room).cloned()).await;
    assert_eq!(membership(&server, &alice_token, &room, &bob).await.as_deref(), Some("leave"));
    let sync = server.sync(&bob_token, None, "").await;
    assert!(knock_state(&sync, &room).is_none(), "no knock left: {sync}");
    server.stop().await;
}

async fn who_may_not_knock_is_refused(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice_token, _) = server.register("alice").await;
    let (bob, bob_token, _) = server.register("bob").await;
    let (carol, carol_token, _) = server.register("carol").await;
    let (dave, dave_token, _) = server.register("dave").await;

    // Join rules that do not take knocks.
    let public = server.create_room(&alice_token, json!({"preset": "public_chat"})).await;
    assert_error(&knock(&server, &bob_token, &public, "").await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let private = server.create_room(&alice_token, json!({"preset": "private_chat"})).await;
    assert_error(&knock(&server, &bob_token, &private, "").await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    // Room version 6 has no knocking at all.
    let v6 = server.create_room(&alice_token, json!({"room_version": "6"})).await;
    assert_error(&knock(&server, &bob_token, &v6, "").await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let v6_knock = server
        .post(
            "/_matrix/client/v3/createRoom",
            Some(&alice_token),
            json!({"room_version": "6", "initial_state": [
                {"type": "m.room.join_rules", "state_key": "", "content": {"join_rule": "knock"}}]}),
        )
        .await;
    assert_error(&v6_knock, StatusCode::BAD_REQUEST, "M_BAD_JSON");

    // A knock room: members, the invited and the banned may not knock.
    let room = room_with_rule(&server, &alice_token, "12", json!({"join_rule": "knock"})).await;
    assert_error(&knock(&server, &alice_token, &room, "").await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let invite = |user: String| {
        let (server, token, room) = (&server, alice_token.clone(), room.clone());
        async move {
            let path = format!("/_matrix/client/v3/rooms/{room}/invite");
            let (status, body) = server.post(&path, Some(&token), json!({"user_id": user})).await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
    };
    invite(carol.clone()).await;
    assert_error(&knock(&server, &carol_token, &room, "").await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let (status, body) = server
        .post(&format!("/_matrix/client/v3/rooms/{room}/ban"), Some(&alice_token), json!({"user_id": dave}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_error(&knock(&server, &dave_token, &room, "").await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    assert_eq!(membership(&server, &alice_token, &room, &dave).await.as_deref(), Some("ban"));

    // Only who may invite accepts a knock: Carol joins with power 0 (inviting needs 50
    // here) and may not let Bob in.
    server.join(&carol_token, &room).await;
    let (status, body) = server
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.power_levels"),
            Some(&alice_token),
            json!({"invite": 50}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = knock(&server, &bob_token, &room, "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let refused = server
        .post(&format!("/_matrix/client/v3/rooms/{room}/invite"), Some(&carol_token), json!({"user_id": bob}))
        .await;
    assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    assert_eq!(membership(&server, &alice_token, &room, &bob).await.as_deref(), Some("knock"));

    // Rooms that do not exist, here or anywhere this server can ask.
    let unknown = format!("!nowhere:{}", server_name(&server));
    assert_error(&knock(&server, &bob_token, &unknown, "").await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let alias = format!("%23nowhere:{}", server_name(&server));
    assert_error(&knock(&server, &bob_token, &alias, "").await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let bad = server.post("/_matrix/client/v3/knock/not-a-room", Some(&bob_token), json!({})).await;
    assert_eq!(bad.0, StatusCode::BAD_REQUEST, "{}", bad.1);
    let anonymous = server.post(&format!("/_matrix/client/v3/knock/{room}"), None, json!({})).await;
    assert_error(&anonymous, StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN");
    server.stop().await;
}

fn server_name(server: &TestServer) -> String {
    server.running.as_ref().unwrap().services.server_name().to_string()
}

async fn knock_restricted_rooms_take_knocks_from_version_10(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice_token, _) = server.register("alice").await;
    let (bob, bob_token, _) = server.register("bob").await;
    let space = server.create_room(&alice_token, json!({})).await;
    let rule = json!({"join_rule": "knock_restricted", "allow": [{"type": "m.room_membership", "room_id": space}]});
    // Version 9 knows no `knock_restricted`.
    let refused = server
        .post(
            "/_matrix/client/v3/createRoom",
            Some(&alice_token),
            json!({"room_version": "9", "initial_state": [
                {"type": "m.room.join_rules", "state_key": "", "content": rule.clone()}]}),
        )
        .await;
    assert_error(&refused, StatusCode::BAD_REQUEST, "M_BAD_JSON");
    // Versions 7 and later take knocks under `knock`.
    let v7 = room_with_rule(&server, &alice_token, "7", json!({"join_rule": "knock"})).await;
    let (status, body) = knock(&server, &bob_token, &v7, "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(membership(&server, &alice_token, &v7, &bob).await.as_deref(), Some("knock"));

    for version in ["10", "12"] {
        let room = room_with_rule(&server, &alice_token, version, rule.clone()).await;
        // Bob is in no allowed room: he may not join, but he may knock.
        let (status, _) =
            server.post(&format!("/_matrix/client/v3/rooms/{room}/join"), Some(&bob_token), json!({})).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "v{version}: a join without an invite or an allowed room");
        let (status, body) = knock(&server, &bob_token, &room, "").await;
        assert_eq!(status, StatusCode::OK, "v{version}: {body}");
        let sync = server.sync(&bob_token, None, "").await;
        assert_knock_state(&knock_state(&sync, &room).unwrap_or_else(|| panic!("v{version}: {sync}")), &bob);
        let (status, body) = server
            .post(&format!("/_matrix/client/v3/rooms/{room}/invite"), Some(&alice_token), json!({"user_id": bob}))
            .await;
        assert_eq!(status, StatusCode::OK, "v{version}: {body}");
        server.join(&bob_token, &room).await;
        assert_eq!(membership(&server, &alice_token, &room, &bob).await.as_deref(), Some("join"));
    }
    server.stop().await;
}

async fn parallel_knocks_all_land(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice_token, _) = server.register("alice").await;
    let room = room_with_rule(&server, &alice_token, "12", json!({"join_rule": "knock"})).await;
    let mut users = Vec::new();
    for i in 0..5 {
        users.push(server.register(&format!("knocker{i}")).await);
    }
    // Five users at once, and the first of them three times over.
    let mut knocks = Vec::new();
    for (_, token, _) in &users {
        knocks.push(knock(&server, token, &room, ""));
    }
    for _ in 0..2 {
        knocks.push(knock(&server, &users[0].1, &room, ""));
    }
    for (status, body) in futures_util::future::join_all(knocks).await {
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    for (user, _, _) in &users {
        assert_eq!(membership(&server, &alice_token, &room, user).await.as_deref(), Some("knock"), "{user}");
    }
    // And an invite racing a retraction ends one way or the other, never both.
    let (user, token, _) = &users[1];
    let (invite_path, leave_path) =
        (format!("/_matrix/client/v3/rooms/{room}/invite"), format!("/_matrix/client/v3/rooms/{room}/leave"));
    let invite = server.post(&invite_path, Some(&alice_token), json!({"user_id": user}));
    let leave = server.post(&leave_path, Some(token), json!({}));
    let (invited, left) = futures_util::join!(invite, leave);
    let now = membership(&server, &alice_token, &room, user).await.unwrap();
    match (invited.0, left.0) {
        (StatusCode::OK, StatusCode::OK) => assert!(now == "leave" || now == "invite", "{now}"),
        (StatusCode::OK, _) => assert_eq!(now, "invite"),
        (_, StatusCode::OK) => assert_eq!(now, "leave"),
        other => panic!("neither went through: {other:?} {invited:?} {left:?}"),
    }
    server.stop().await;
}

async fn a_user_knocks_on_a_room_of_another_server_and_is_let_in(backend: Backend) {
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend, TRUSTING).await;
    let (alice, alice_token, _) = a.register("alice").await;
    let (bob, bob_token, _) = b.register("bob").await;
    let room = a
        .create_room(
            &alice_token,
            json!({
                "name": "Knock knock",
                "room_alias_name": "knockers",
                "initial_state": [{"type": "m.room.join_rules", "state_key": "", "content": {"join_rule": "knock"}}],
            }),
        )
        .await;

    // By alias: Bob's server finds the room and the servers to knock through.
    let alias = format!("%23knockers:{}", name(&a));
    let (status, body) = knock(&b, &bob_token, &alias, "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["room_id"], room.as_str());
    // Bob's server is not in the room: it shows the stripped state A's server answered.
    let sync = b.sync(&bob_token, None, "").await;
    let state = knock_state(&sync, &room).unwrap_or_else(|| panic!("no knock section: {sync}"));
    assert_knock_state(&state, &bob);
    let since = sync["next_batch"].as_str().unwrap().to_owned();
    // Alice's server has the knock in the room.
    assert_eq!(membership(&a, &alice_token, &room, &bob).await.as_deref(), Some("knock"));

    // Alice lets Bob in: the invite reaches his server, he joins through hers, they chat.
    let (status, body) =
        a.post(&format!("/_matrix/client/v3/rooms/{room}/invite"), Some(&alice_token), json!({"user_id": bob})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (invite, since) = sync_until(&b, &bob_token, Some(since), "bob's invite", |s| {
        s["rooms"]["invite"][&room]["invite_state"]["events"].as_array().cloned()
    })
    .await;
    let own = invite.iter().find(|e| e["type"] == "m.room.member" && e["state_key"] == bob.as_str()).unwrap();
    assert_eq!(own["sender"], alice.as_str());
    let (status, body) = b.post(&format!("/_matrix/client/v3/rooms/{room}/join"), Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    sync_until(&b, &bob_token, Some(since), "bob's join", |s| s["rooms"]["join"].get(&room).cloned()).await;
    assert_eq!(membership(&a, &alice_token, &room, &bob).await.as_deref(), Some("join"));
    b.send_text(&bob_token, &room, "thanks for letting me in").await;
    sync_until(&a, &alice_token, None, "bob's message on alice's server", |s| {
        s["rooms"]["join"][&room]["timeline"]["events"]
            .as_array()?
            .iter()
            .find(|e| e["content"]["body"] == "thanks for letting me in")
            .cloned()
    })
    .await;
    a.stop().await;
    b.stop().await;
}

async fn a_remote_knock_is_refused_by_a_kick_and_can_be_retracted(backend: Backend) {
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend, TRUSTING).await;
    let (_, alice_token, _) = a.register("alice").await;
    let (bob, bob_token, _) = b.register("bob").await;
    let room = room_with_rule(&a, &alice_token, "12", json!({"join_rule": "knock"})).await;
    let via = format!("?via={}", name(&a));
    let (status, body) = knock(&b, &bob_token, &room, &via).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let since = b.sync(&bob_token, None, "").await["next_batch"].as_str().unwrap().to_owned();

    // Alice refuses: the kick reaches Bob's server, which is not in the room.
    let (status, body) = a
        .post(
            &format!("/_matrix/client/v3/rooms/{room}/kick"),
            Some(&alice_token),
            json!({"user_id": bob, "reason": "not now"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (left, since) =
        sync_until(&b, &bob_token, Some(since), "bob's refusal", |s| s["rooms"]["leave"].get(&room).cloned()).await;
    let kick = left["timeline"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "m.room.member" && e["state_key"] == bob.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("the kick in the left room's timeline: {left}"));
    assert_eq!(kick["content"]["reason"], "not now");
    assert!(knock_state(&b.sync(&bob_token, None, "").await, &room).is_none());

    // Bob knocks again and retracts: his server leaves through Alice's.
    let (status, body) = knock(&b, &bob_token, &room, &via).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(membership(&a, &alice_token, &room, &bob).await.as_deref(), Some("knock"));
    let (_, since) = sync_until(&b, &bob_token, Some(since), "bob's second knock", |s| knock_state(s, &room)).await;
    let (status, body) = b.post(&format!("/_matrix/client/v3/rooms/{room}/leave"), Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    sync_until(&b, &bob_token, Some(since), "bob's retraction", |s| s["rooms"]["leave"].get(&room).cloned()).await;
    assert_eq!(membership(&a, &alice_token, &room, &bob).await.as_deref(), Some("leave"));
    let sync = b.sync(&bob_token, None, "").await;
    assert!(knock_state(&sync, &room).is_none() && sync["rooms"]["invite"].get(&room).is_none(), "{sync}");
    a.stop().await;
    b.stop().await;
}

async fn make_and_send_knock_refuse_what_the_room_does_not_allow(backend: Backend) {
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend, TRUSTING).await;
    let (_, alice_token, _) = a.register("alice").await;
    let (_, bob_token, _) = b.register("bob").await;
    let bob = format!("@bob:{}", name(&b));
    let a_name = name(&a).to_string();
    let make_knock = |room: String, ver: &'static str| {
        let path = format!("/_matrix/federation/v1/make_knock/{room}/{bob}?{ver}");
        let header = sign(&b, &a_name, "GET", &path, None);
        let a = &a;
        async move { fed_request(a, Method::GET, &path, None, Some(&header)).await }
    };

    let room = room_with_rule(&a, &alice_token, "12", json!({"join_rule": "knock"})).await;
    let (status, body) = make_knock(room.clone(), "ver=11&ver=12").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["room_version"], "12");
    assert_eq!(body["event"]["content"]["membership"], "knock");
    assert_eq!(body["event"]["state_key"], bob.as_str());
    // A server that does not support the room's version is told which it is.
    let result = make_knock(room.clone(), "ver=10&ver=11").await;
    assert_error(&result, StatusCode::BAD_REQUEST, "M_INCOMPATIBLE_ROOM_VERSION");
    assert_eq!(result.1["room_version"], "12");
    // A room whose join rules take no knocks, and one too old for knocking.
    let public = a.create_room(&alice_token, json!({"preset": "public_chat"})).await;
    assert_error(&make_knock(public.clone(), "ver=12").await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let v6 = a.create_room(&alice_token, json!({"room_version": "6", "preset": "public_chat"})).await;
    let result = make_knock(v6.clone(), "ver=6&ver=12").await;
    assert_error(&result, StatusCode::BAD_REQUEST, "M_INCOMPATIBLE_ROOM_VERSION");
    assert_eq!(result.1["room_version"], "6");
    // Through the client API of Bob's server, those refusals reach Bob.
    let via = format!("?via={}", name(&a));
    assert_error(&knock(&b, &bob_token, &public, &via).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let result = knock(&b, &bob_token, &v6, &via).await;
    assert_error(&result, StatusCode::BAD_REQUEST, "M_INCOMPATIBLE_ROOM_VERSION");
    // A room Alice's server does not know, and a server not asked for the user of another.
    let unknown = format!("!nowhere:{}", name(&a));
    assert_error(&knock(&b, &bob_token, &unknown, "").await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let path = format!("/_matrix/federation/v1/make_knock/{room}/@mallory:{}?ver=12", name(&a));
    let header = sign(&b, &a_name, "GET", &path, None);
    let result = fed_request(&a, Method::GET, &path, None, Some(&header)).await;
    assert_error(&result, StatusCode::FORBIDDEN, "M_FORBIDDEN");

    // send_knock takes only a knock, of the sending server's own user.
    let (_, template) = make_knock(room.clone(), "ver=12").await;
    let mut event: ruma::CanonicalJsonObject = serde_json::from_value(template["event"].clone()).unwrap();
    event.insert("content".into(), serde_json::from_value(json!({"membership": "join"})).unwrap());
    let rules = ruma::RoomVersionId::V12.rules().unwrap();
    let key = &crate::federation::services(&b).signing_key;
    ruma::signatures::hash_and_sign_event(name(&b).as_str(), key, &mut event, &rules.redaction).unwrap();
    let id = format!("${}", ruma::signatures::reference_hash(&event, &rules).unwrap());
    let body = serde_json::to_value(&event).unwrap();
    let path = format!("/_matrix/federation/v1/send_knock/{room}/{id}");
    let header = sign(&b, &a_name, "PUT", &path, Some(&body));
    let result = fed_request(&a, Method::PUT, &path, Some(&body), Some(&header)).await;
    assert_eq!(result.0, StatusCode::BAD_REQUEST, "a join sent as a knock: {}", result.1);
    assert_eq!(membership(&a, &alice_token, &room, &bob).await, None);

    // An ACL that denies Bob's server (every server here has an IP-literal name) keeps
    // its knocks out.
    let (status, body) = a
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.server_acl"),
            Some(&alice_token),
            json!({"allow": ["*"], "deny": [], "allow_ip_literals": false}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_error(&make_knock(room.clone(), "ver=12").await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    a.stop().await;
    b.stop().await;
}

/// Waits (at most 20 s) until `server` has `user`'s membership in `room` as `wanted`.
async fn wait_for_membership(server: &TestServer, token: &str, room: &str, user: &str, wanted: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut since = None;
    while membership(server, token, room, user).await.as_deref() != Some(wanted) {
        assert!(Instant::now() < deadline, "{user} not {wanted} in {room} within 20 s");
        // Wait for the next change the server's user hears of, not for a fixed time.
        let sync = server.sync(token, since.as_deref(), "timeout=1000").await;
        since = sync["next_batch"].as_str().map(str::to_owned);
    }
}

/// `user`'s member event in `room` as `token`'s user reads it.
async fn member_event(server: &TestServer, token: &str, room: &str, user: &str) -> Value {
    let path = format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/{user}?format=event");
    let (status, body) = server.get(&path, Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn members_of_an_allowed_room_join_a_restricted_room(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, alice_token, _) = server.register("alice").await;
    let (bob, bob_token, _) = server.register("bob").await;
    let (_, carol_token, _) = server.register("carol").await;
    let space = server.create_room(&alice_token, json!({"preset": "public_chat"})).await;
    server.join(&bob_token, &space).await;
    let allow = json!([{"type": "m.room_membership", "room_id": space}]);
    for (version, rule) in [("8", "restricted"), ("10", "knock_restricted"), ("12", "knock_restricted")] {
        let room = room_with_rule(&server, &alice_token, version, json!({"join_rule": rule, "allow": allow})).await;
        // Bob is in the allowed room: he joins, and Alice (who may invite) vouches.
        let (status, body) =
            server.post(&format!("/_matrix/client/v3/rooms/{room}/join"), Some(&bob_token), json!({})).await;
        assert_eq!(status, StatusCode::OK, "v{version} {rule}: {body}");
        let join = member_event(&server, &alice_token, &room, &bob).await;
        assert_eq!(join["content"]["membership"], "join");
        assert_eq!(join["content"]["join_authorised_via_users_server"], alice.as_str(), "{join}");
        // Carol is not: refused, though she may knock where the rule says so.
        let refused =
            server.post(&format!("/_matrix/client/v3/rooms/{room}/join"), Some(&carol_token), json!({})).await;
        assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");
        let knocked = knock(&server, &carol_token, &room, "").await;
        if rule == "knock_restricted" {
            assert_eq!(knocked.0, StatusCode::OK, "v{version}: {}", knocked.1);
        } else {
            assert_error(&knocked, StatusCode::FORBIDDEN, "M_FORBIDDEN");
        }
    }
    server.stop().await;
}

async fn a_restricted_room_of_another_server_is_joined_through_an_allowed_room(backend: Backend) {
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend, TRUSTING).await;
    let (alice, alice_token, _) = a.register("alice").await;
    let (bob, bob_token, _) = b.register("bob").await;
    let (dave, dave_token, _) = b.register("dave").await;
    let space = a.create_room(&alice_token, json!({"preset": "public_chat"})).await;
    let via = format!("?via={}", name(&a));
    let (status, body) = b.post(&format!("/_matrix/client/v3/join/{space}{via}"), Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let allow = json!([{"type": "m.room_membership", "room_id": space}]);
    let room = room_with_rule(&a, &alice_token, "12", json!({"join_rule": "knock_restricted", "allow": allow})).await;

    // Bob's server joins through Alice's, which sees Bob in the space and vouches.
    let (status, body) = b.post(&format!("/_matrix/client/v3/join/{room}{via}"), Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(membership(&a, &alice_token, &room, &bob).await.as_deref(), Some("join"));
    let join = member_event(&a, &alice_token, &room, &bob).await;
    assert_eq!(join["content"]["join_authorised_via_users_server"], alice.as_str(), "{join}");
    let on_b = member_event(&b, &bob_token, &room, &bob).await;
    assert_eq!(on_b["event_id"], join["event_id"], "the same join on both servers");

    // Dave is not in the space: refused (Alice's server's answer, relayed); he may knock.
    let refused = b.post(&format!("/_matrix/client/v3/join/{room}{via}"), Some(&dave_token), json!({})).await;
    assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    assert_eq!(knock(&b, &dave_token, &room, &via).await.0, StatusCode::OK);

    // A join naming Alice as its voucher, sent for a user no longer in the space, is
    // refused at send_join: the voucher's server checks again before signing.
    let a_name = name(&a).to_string();
    let (_, carol_token, _) = b.register("carol").await;
    let carol = format!("@carol:{}", name(&b));
    b.join(&carol_token, &space).await;
    wait_for_membership(&a, &alice_token, &space, &carol, "join").await;
    let path = format!("/_matrix/federation/v1/make_join/{room}/{carol}?ver=12");
    let header = sign(&b, &a_name, "GET", &path, None);
    let (status, template) = fed_request(&a, Method::GET, &path, None, Some(&header)).await;
    assert_eq!(status, StatusCode::OK, "{template}");
    assert_eq!(template["event"]["content"]["join_authorised_via_users_server"], alice.as_str());
    b.leave(&carol_token, &space).await;
    wait_for_membership(&a, &alice_token, &space, &carol, "leave").await;
    let mut event: ruma::CanonicalJsonObject = serde_json::from_value(template["event"].clone()).unwrap();
    let rules = ruma::RoomVersionId::V12.rules().unwrap();
    let key = &crate::federation::services(&b).signing_key;
    ruma::signatures::hash_and_sign_event(name(&b).as_str(), key, &mut event, &rules.redaction).unwrap();
    let id = format!("${}", ruma::signatures::reference_hash(&event, &rules).unwrap());
    let body = serde_json::to_value(&event).unwrap();
    let path = format!("/_matrix/federation/v2/send_join/{room}/{id}");
    let header = sign(&b, &a_name, "PUT", &path, Some(&body));
    let result = fed_request(&a, Method::PUT, &path, Some(&body), Some(&header)).await;
    assert_error(&result, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    assert_ne!(membership(&a, &alice_token, &room, &carol).await.as_deref(), Some("join"));
    assert_eq!(membership(&a, &alice_token, &room, &dave).await.as_deref(), Some("knock"));
    a.stop().await;
    b.stop().await;
}

async fn a_rescinded_remote_invite_goes_away(backend: Backend) {
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend, TRUSTING).await;
    let (_, alice_token, _) = a.register("alice").await;
    let (bob, bob_token, _) = b.register("bob").await;
    let room = a.create_room(&alice_token, json!({"preset": "private_chat", "invite": [bob.clone()]})).await;
    let (_, since) =
        sync_until(&b, &bob_token, None, "bob's invite", |s| s["rooms"]["invite"].get(&room).cloned()).await;
    // Alice changes her mind: the kick reaches Bob's server, which is not in the room.
    let (status, body) =
        a.post(&format!("/_matrix/client/v3/rooms/{room}/kick"), Some(&alice_token), json!({"user_id": bob})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (left, _) =
        sync_until(&b, &bob_token, Some(since), "the rescinded invite", |s| s["rooms"]["leave"].get(&room).cloned())
            .await;
    assert!(
        left["timeline"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["state_key"] == bob.as_str() && e["content"]["membership"] == "leave")
    );
    let sync = b.sync(&bob_token, None, "").await;
    assert!(sync["rooms"]["invite"].get(&room).is_none(), "{sync}");
    // Bob cannot join on the strength of it any more.
    let refused =
        b.post(&format!("/_matrix/client/v3/join/{room}?via={}", name(&a)), Some(&bob_token), json!({})).await;
    assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    a.stop().await;
    b.stop().await;
}

/// Out-of-band memberships end once: of several leaves that race for one pending knock
/// (a refusal arriving while the user retracts), one ends it and the rest change nothing.
async fn a_pending_membership_ends_once_when_ends_race(backend: Backend) {
    use convo::storage::RemoteMembership;
    let server = TestServer::start(backend).await;
    let (bob, _, _) = server.register("bob").await;
    let store = &server.running.as_ref().unwrap().services.store;
    let (room, json) = ("!elsewhere:example.org", r#"{"type":"m.room.member"}"#);
    let membership = |event_id: &'static str, membership: &'static str, only_if_pending: bool| RemoteMembership {
        event_id,
        room_id: room,
        sender: &bob,
        user_id: &bob,
        membership,
        depth: 1,
        origin_server_ts: 1,
        json,
        stripped_state: Some("[]"),
        only_if_pending,
    };
    store.insert_room_if_missing(room, "12", &bob).await.unwrap();
    assert!(store.store_remote_membership(&membership("$knock", "knock", false)).await.unwrap().is_some());
    let ends = ["$leave1", "$leave2", "$leave3", "$leave4", "$leave5"];
    let records: Vec<RemoteMembership> = ends.iter().map(|id| membership(id, "leave", true)).collect();
    let results = futures_util::future::join_all(records.iter().map(|m| store.store_remote_membership(m))).await;
    let ended: Vec<&str> =
        results.iter().zip(ends).filter(|(r, _)| r.as_ref().unwrap().is_some()).map(|(_, id)| id).collect();
    assert_eq!(ended.len(), 1, "exactly one ends the knock: {ended:?}");
    let row = store.get_membership(room, &bob).await.unwrap().unwrap();
    assert_eq!((row.membership.as_str(), row.event_id.as_str()), ("leave", ended[0]));
    server.stop().await;
}
