//! Rooms: creation, membership and power, sending, state, redaction, history.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::{
    backend_tests,
    common::{Backend, TestServer, assert_error, bodies, urlencode},
};

async fn create_room_presets_and_state(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    let room = server
        .create_room(
            &alice,
            json!({
                "preset": "public_chat", "name": "Lobby", "topic": "Say hi", "room_alias_name": "lobby",
                "visibility": "public",
                "initial_state": [{"type": "m.room.history_visibility", "state_key": "", "content": {"history_visibility": "world_readable"}}],
                "power_level_content_override": {"events_default": 10},
                "creation_content": {"m.federate": false},
            }),
        )
        .await;
    let state = |t: &str| format!("/_matrix/client/v3/rooms/{room}/state/{t}/");
    assert_eq!(server.get(&state("m.room.name"), Some(&alice)).await.1, json!({"name": "Lobby"}));
    assert_eq!(server.get(&state("m.room.topic"), Some(&alice)).await.1["topic"], "Say hi");
    assert_eq!(server.get(&state("m.room.join_rules"), Some(&alice)).await.1["join_rule"], "public");
    assert_eq!(
        server.get(&state("m.room.history_visibility"), Some(&alice)).await.1["history_visibility"],
        "world_readable"
    );
    assert_eq!(server.get(&state("m.room.canonical_alias"), Some(&alice)).await.1["alias"], "#lobby:localhost");
    let create = server.get(&state("m.room.create"), Some(&alice)).await.1;
    assert_eq!((create["room_version"].clone(), create["m.federate"].clone()), (json!("12"), json!(false)));
    let pl = server.get(&state("m.room.power_levels"), Some(&alice)).await.1;
    assert_eq!(pl["events_default"], 10);
    assert_error(&server.get(&state("m.room.avatar"), Some(&alice)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");

    // The alias resolves, the room is in the public directory, and anyone may join it.
    let (status, body) = server.get("/_matrix/client/v3/directory/room/%23lobby:localhost", None).await;
    assert_eq!((status, body["room_id"].clone()), (StatusCode::OK, json!(room)));
    let (_, public) = server.get("/_matrix/client/v3/publicRooms", None).await;
    assert_eq!(public["chunk"][0]["room_id"], room.as_str());
    assert_eq!(public["chunk"][0]["name"], "Lobby");
    assert_eq!(public["chunk"][0]["num_joined_members"], 1);
    let (status, body) = server.post("/_matrix/client/v3/join/%23lobby:localhost", Some(&bob), json!({})).await;
    assert_eq!((status, body["room_id"].clone()), (StatusCode::OK, json!(room)));
    let (_, joined) = server.get(&format!("/_matrix/client/v3/rooms/{room}/joined_members"), Some(&bob)).await;
    assert_eq!(joined["joined"]["@bob:localhost"]["display_name"], "bob");
    assert_eq!(joined["joined"].as_object().unwrap().len(), 2);
    let (_, rooms) = server.get("/_matrix/client/v3/joined_rooms", Some(&bob)).await;
    assert_eq!(rooms["joined_rooms"], json!([room]));

    // Search the public directory.
    let (status, found) = server
        .post("/_matrix/client/v3/publicRooms", Some(&bob), json!({"filter": {"generic_search_term": "LOBBY"}}))
        .await;
    assert_eq!((status, found["chunk"].as_array().unwrap().len()), (StatusCode::OK, 1));
    let (_, none) = server
        .post("/_matrix/client/v3/publicRooms", Some(&bob), json!({"filter": {"generic_search_term": "nothing"}}))
        .await;
    assert_eq!(none["chunk"], json!([]));

    // events_default 10: bob (0) may not talk; alias taken.
    let txn = "/_matrix/client/v3/rooms/ROOM/send/m.room.message/t1".replace("ROOM", &room);
    assert_error(
        &server.put(&txn, Some(&bob), json!({"body": "hi", "msgtype": "m.text"})).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    assert_error(
        &server.post("/_matrix/client/v3/createRoom", Some(&bob), json!({"room_alias_name": "lobby"})).await,
        StatusCode::BAD_REQUEST,
        "M_ROOM_IN_USE",
    );
    assert_error(
        &server.post("/_matrix/client/v3/createRoom", Some(&bob), json!({"room_version": "5"})).await,
        StatusCode::BAD_REQUEST,
        "M_UNSUPPORTED_ROOM_VERSION",
    );
    server.stop().await;
}

async fn every_supported_room_version(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    for version in ["6", "7", "8", "9", "10", "11", "12"] {
        let room = server.create_room(&alice, json!({"room_version": version, "invite": ["@bob:localhost"]})).await;
        server.join(&bob, &room).await;
        let event = server.send_text(&bob, &room, &format!("hello v{version}")).await;
        let (status, body) = server
            .put(
                &format!("/_matrix/client/v3/rooms/{room}/redact/{event}/r{version}"),
                Some(&alice),
                json!({"reason": "mod"}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "v{version}: {body}");
        let (_, redacted) = server.get(&format!("/_matrix/client/v3/rooms/{room}/event/{event}"), Some(&bob)).await;
        assert_eq!(redacted["content"], json!({}), "v{version}");
        assert_eq!(redacted["unsigned"]["redacted_because"]["content"]["reason"], "mod");
        let (status, body) = server
            .post(&format!("/_matrix/client/v3/rooms/{room}/kick"), Some(&alice), json!({"user_id": "@bob:localhost"}))
            .await;
        assert_eq!(status, StatusCode::OK, "v{version}: {body}");
        let (_, create) =
            server.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.create/"), Some(&alice)).await;
        assert_eq!(create["room_version"], version);
    }
    server.stop().await;
}

async fn membership_and_power(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    let (_, carol, _) = server.register("carol").await;
    let room = server.create_room(&alice, json!({"preset": "private_chat", "name": "Team"})).await;
    let path = |what: &str| format!("/_matrix/client/v3/rooms/{room}/{what}");

    // A non-member cannot send, nor join an invite-only room.
    assert_error(
        &server.put(&path("send/m.room.message/x1"), Some(&bob), json!({"msgtype": "m.text", "body": "hi"})).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    assert_error(&server.post(&path("join"), Some(&bob), json!({})).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    assert_error(&server.get(&path("messages?dir=b"), Some(&bob)).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    assert_error(&server.get(&path("state"), Some(&bob)).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");

    // Invite, join.
    assert_eq!(
        server.post(&path("invite"), Some(&alice), json!({"user_id": "@bob:localhost"})).await.0,
        StatusCode::OK
    );
    assert_eq!(
        server.post(&path("invite"), Some(&alice), json!({"user_id": "@carol:localhost"})).await.0,
        StatusCode::OK
    );
    assert_error(
        &server.post(&path("invite"), Some(&alice), json!({"user_id": "@nobody:localhost"})).await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );
    server.join(&bob, &room).await;
    // A POST with no body at all (as matrix-nio sends for join) reads as `{}`.
    let joined = server.request(Method::POST, &path("join"), Some(&carol), None).await;
    assert_eq!(joined.0, StatusCode::OK, "{joined:?}");
    assert_eq!(joined.1["room_id"], room.as_str());

    // Without power, bob cannot kick, ban, or change the power levels or the name.
    assert_error(
        &server.post(&path("kick"), Some(&bob), json!({"user_id": "@carol:localhost"})).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    assert_error(
        &server.post(&path("ban"), Some(&bob), json!({"user_id": "@carol:localhost"})).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    let (_, mut pl) = server.get(&path("state/m.room.power_levels/"), Some(&bob)).await;
    pl["users"]["@bob:localhost"] = json!(100);
    assert_error(
        &server.put(&path("state/m.room.power_levels/"), Some(&bob), pl.clone()).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    assert_error(
        &server.put(&path("state/m.room.name/"), Some(&bob), json!({"name": "Mine"})).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );

    // The creator can; then bob (now a moderator at 50) can kick carol.
    pl["users"]["@bob:localhost"] = json!(50);
    let (status, body) = server.put(&path("state/m.room.power_levels/"), Some(&alice), pl).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        server.post(&path("kick"), Some(&bob), json!({"user_id": "@carol:localhost", "reason": "spam"})).await.0,
        StatusCode::OK
    );
    let (_, member) = server.get(&path("state/m.room.member/@carol:localhost"), Some(&alice)).await;
    assert_eq!((member["membership"].clone(), member["reason"].clone()), (json!("leave"), json!("spam")));

    // A banned user cannot rejoin, even when invited, until unbanned.
    assert_eq!(server.post(&path("ban"), Some(&alice), json!({"user_id": "@carol:localhost"})).await.0, StatusCode::OK);
    assert_error(&server.post(&path("join"), Some(&carol), json!({})).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    assert_error(
        &server.post(&path("invite"), Some(&alice), json!({"user_id": "@carol:localhost"})).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    assert_eq!(
        server.post(&path("unban"), Some(&alice), json!({"user_id": "@carol:localhost"})).await.0,
        StatusCode::OK
    );
    assert_eq!(
        server.post(&path("invite"), Some(&alice), json!({"user_id": "@carol:localhost"})).await.0,
        StatusCode::OK
    );
    server.join(&carol, &room).await;

    // Members list with filters.
    let (_, members) = server.get(&path("members?membership=join"), Some(&alice)).await;
    assert_eq!(members["chunk"].as_array().unwrap().len(), 3);
    let (_, not_joined) = server.get(&path("members?not_membership=join"), Some(&alice)).await;
    assert_eq!(not_joined["chunk"], json!([]));
    for bogus in ["members?membership=bogus", "members?not_membership=", "members?membership="] {
        assert_error(&server.get(&path(bogus), Some(&alice)).await, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    }

    // Leave and forget.
    assert_error(&server.post(&path("forget"), Some(&carol), json!({})).await, StatusCode::BAD_REQUEST, "M_UNKNOWN");
    assert_eq!(server.post(&path("leave"), Some(&carol), json!({})).await.0, StatusCode::OK);
    assert_error(&server.post(&path("leave"), Some(&carol), json!({})).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    assert_eq!(server.post(&path("forget"), Some(&carol), json!({})).await.0, StatusCode::OK);
    let (_, rooms) = server.get("/_matrix/client/v3/joined_rooms", Some(&carol)).await;
    assert_eq!(rooms["joined_rooms"], json!([]));
    server.stop().await;
}

/// The same client transaction sent many times at once is one event: every answer
/// names it, and the room's history holds it once (the transaction id's unique key
/// decides the race inside the event's transaction).
async fn parallel_sends_of_one_transaction_are_one_event(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let room = server.create_room(&alice, json!({})).await;
    for round in 0..3 {
        let send = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/race-{round}");
        let body = json!({"msgtype": "m.text", "body": format!("once {round}")});
        let answers =
            futures_util::future::join_all((0..8).map(|_| server.put(&send, Some(&alice), body.clone()))).await;
        let first = answers[0].1["event_id"].clone();
        assert!(first.is_string(), "{}", answers[0].1);
        for (status, answer) in &answers {
            assert_eq!(*status, StatusCode::OK, "{answer}");
            assert_eq!(answer["event_id"], first, "one transaction, one event");
        }
    }
    let (status, page) =
        server.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=50"), Some(&alice)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let bodies: Vec<&str> = page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["content"]["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, vec!["once 2", "once 1", "once 0"]);
    // The room still takes messages: the head moved once per transaction.
    let (status, body) = server
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/after"),
            Some(&alice),
            json!({"msgtype": "m.text", "body": "after"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    server.stop().await;
}

async fn send_is_idempotent_and_redaction_erases(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    let room = server.create_room(&alice, json!({"invite": ["@bob:localhost"]})).await;
    server.join(&bob, &room).await;
    let send = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/same-txn");
    let first = server.put(&send, Some(&alice), json!({"msgtype": "m.text", "body": "secret plans"})).await;
    let second = server.put(&send, Some(&alice), json!({"msgtype": "m.text", "body": "secret plans"})).await;
    assert_eq!(first.0, StatusCode::OK);
    assert_eq!(first.1["event_id"], second.1["event_id"], "same transaction, same event");
    let event_id = first.1["event_id"].as_str().unwrap().to_owned();
    // Another device's same txn id is another event.
    let (other_device, _) = server.login("alice", None).await;
    let third = server.put(&send, Some(&other_device), json!({"msgtype": "m.text", "body": "secret plans"})).await;
    assert_eq!(third.0, StatusCode::OK, "{}", third.1);
    assert!(third.1["event_id"].is_string() && third.1["event_id"] != first.1["event_id"], "{}", third.1);

    // Bob may not redact alice's message (redact level 50); alice may.
    let redact = |txn: &str| format!("/_matrix/client/v3/rooms/{room}/redact/{event_id}/{txn}");
    assert_error(&server.put(&redact("r1"), Some(&bob), json!({})).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let (status, body) = server.put(&redact("r2"), Some(&alice), json!({"reason": "leaked"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let stored = server.running.as_ref().unwrap().services.store.get_event(&event_id).await.unwrap().unwrap();
    assert!(!stored.json.contains("secret plans"), "redacted content is gone from storage: {}", stored.json);
    assert!(stored.redacted_by.is_some());
    let (_, seen) = server.get(&format!("/_matrix/client/v3/rooms/{room}/event/{event_id}"), Some(&bob)).await;
    assert_eq!(seen["content"], json!({}));

    // Bad content.
    assert_error(
        &server
            .put(&format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/f1"), Some(&alice), json!({"body": 1.5}))
            .await,
        StatusCode::BAD_REQUEST,
        "M_BAD_JSON",
    );
    let huge = "x".repeat(70_000);
    let too_big = server
        .put(&format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/big"), Some(&alice), json!({"body": huge}))
        .await;
    assert_error(&too_big, StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE");
    assert_error(
        &server.get(&format!("/_matrix/client/v3/rooms/{room}/event/$nope"), Some(&alice)).await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );
    assert_error(
        &server
            .put(
                "/_matrix/client/v3/rooms/!unknown:localhost/send/m.room.message/u1",
                Some(&alice),
                json!({"body": "x"}),
            )
            .await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    server.stop().await;
}

async fn history_pagination_and_visibility(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    let (_, carol, _) = server.register("carol").await;
    let room = server
        .create_room(
            &alice,
            json!({"preset": "public_chat", "initial_state": [{"type": "m.room.history_visibility", "state_key": "", "content": {"history_visibility": "joined"}}]}),
        )
        .await;
    for i in 0..5 {
        server.send_text(&alice, &room, &format!("before {i}")).await;
    }
    server.join(&bob, &room).await;
    for i in 0..25 {
        server.send_text(&alice, &room, &format!("after {i}")).await;
    }
    // Backwards in pages of 10: newest first, without the messages from before bob joined.
    let mut seen = Vec::new();
    let mut from: Option<String> = None;
    for _ in 0..10 {
        let mut path = format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=10");
        if let Some(f) = &from {
            path.push_str(&format!("&from={f}"));
        }
        let (status, page) = server.get(&path, Some(&bob)).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        seen.extend(bodies(&page["chunk"]));
        match page["end"].as_str() {
            Some(end) => from = Some(end.to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> = (0..25).rev().map(|i| format!("after {i}")).collect();
    assert_eq!(seen, expected, "joined visibility hides history from before the join");

    // Alice sees everything; forwards from the start gives the chronological order.
    let (_, page) =
        server.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=f&limit=100"), Some(&alice)).await;
    let all = bodies(&page["chunk"]);
    assert_eq!(all.len(), 30);
    assert_eq!(all[0], "before 0");
    assert_eq!(all[29], "after 24");

    // A filter on type.
    let filter = r#"{"types":["m.room.member"]}"#;
    let (_, members) = server
        .get(
            &format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=50&filter={}", urlencode(filter)),
            Some(&alice),
        )
        .await;
    assert!(members["chunk"].as_array().unwrap().iter().all(|e| e["type"] == "m.room.member"));
    assert_eq!(members["chunk"].as_array().unwrap().len(), 2);

    // Context around a message.
    let (_, page) = server.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=3"), Some(&alice)).await;
    let middle = page["chunk"][1]["event_id"].as_str().unwrap().to_owned();
    let (status, ctx) =
        server.get(&format!("/_matrix/client/v3/rooms/{room}/context/{middle}?limit=4"), Some(&alice)).await;
    assert_eq!(status, StatusCode::OK, "{ctx}");
    assert_eq!(ctx["event"]["content"]["body"], "after 23");
    assert_eq!(bodies(&ctx["events_before"]), vec!["after 22", "after 21"]);
    assert_eq!(bodies(&ctx["events_after"]), vec!["after 24"]);
    assert!(ctx["state"].as_array().unwrap().iter().any(|e| e["type"] == "m.room.create"));

    // Carol, who never joined, sees nothing.
    assert_error(
        &server.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b"), Some(&carol)).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    server.stop().await;
}

async fn aliases_and_directory_permissions(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    server.join(&bob, &room).await;
    let alias = "/_matrix/client/v3/directory/room/%23team:localhost";
    assert_eq!(server.put(alias, Some(&bob), json!({"room_id": room})).await.0, StatusCode::OK);
    assert_error(&server.put(alias, Some(&alice), json!({"room_id": room})).await, StatusCode::CONFLICT, "M_UNKNOWN");
    let (_, aliases) = server.get(&format!("/_matrix/client/v3/rooms/{room}/aliases"), Some(&alice)).await;
    assert_eq!(aliases["aliases"], json!(["#team:localhost"]));

    // canonical_alias must point to aliases of this room.
    let canonical = format!("/_matrix/client/v3/rooms/{room}/state/m.room.canonical_alias/");
    assert_error(
        &server.put(&canonical, Some(&alice), json!({"alias": "#other:localhost"})).await,
        StatusCode::BAD_REQUEST,
        "M_BAD_ALIAS",
    );
    assert_eq!(server.put(&canonical, Some(&alice), json!({"alias": "#team:localhost"})).await.0, StatusCode::OK);

    // Publishing needs power; alice (creator) may, bob may not.
    let list = format!("/_matrix/client/v3/directory/list/room/{room}");
    assert_eq!(server.get(&list, None).await.1["visibility"], "private");
    assert_error(
        &server.put(&list, Some(&bob), json!({"visibility": "public"})).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    assert_eq!(server.put(&list, Some(&alice), json!({"visibility": "public"})).await.0, StatusCode::OK);
    assert_eq!(server.get(&list, None).await.1["visibility"], "public");

    // Deleting an alias: its creator may; others only with power.
    let (_, carol, _) = server.register("carol").await;
    assert_error(
        &server.request(reqwest::Method::DELETE, alias, Some(&carol), None).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    assert_eq!(server.request(reqwest::Method::DELETE, alias, Some(&bob), None).await.0, StatusCode::OK);
    assert_error(&server.get(alias, None).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    server.stop().await;
}

async fn public_rooms_paginate(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    for i in 0..5 {
        server
            .create_room(&alice, json!({"visibility": "public", "preset": "public_chat", "name": format!("Room {i}")}))
            .await;
    }
    server.create_room(&alice, json!({"name": "Hidden"})).await;
    let mut names = Vec::new();
    let mut since: Option<String> = None;
    for _ in 0..5 {
        let path = match &since {
            Some(s) => format!("/_matrix/client/v3/publicRooms?limit=2&since={s}"),
            None => "/_matrix/client/v3/publicRooms?limit=2".to_owned(),
        };
        let (status, page) = server.get(&path, None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert_eq!(page["total_room_count_estimate"], 5);
        names.extend(page["chunk"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap().to_owned()));
        match page["next_batch"].as_str() {
            Some(next) => since = Some(next.to_owned()),
            None => break,
        }
    }
    names.sort();
    assert_eq!(names, vec!["Room 0", "Room 1", "Room 2", "Room 3", "Room 4"]);

    // Search by name, topic or alias, in the database: `%` and `_` are plain characters.
    server
        .create_room(
            &alice,
            json!({"visibility": "public", "preset": "public_chat", "name": "100% Rust_club",
                   "topic": "Ferris", "room_alias_name": "rustaceans"}),
        )
        .await;
    let search = |term: &str| json!({"filter": {"generic_search_term": term}, "limit": 10});
    let found = |page: &serde_json::Value| -> Vec<String> {
        page["chunk"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap().to_owned()).collect()
    };
    for term in ["100%", "rust_", "ferris", "RUSTACEANS"] {
        let (status, page) = server.post("/_matrix/client/v3/publicRooms", Some(&alice), search(term)).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert_eq!(found(&page), vec!["100% Rust_club"], "{term}: {page}");
        assert_eq!(page["total_room_count_estimate"], 1);
        let room = &page["chunk"][0];
        assert_eq!(room["topic"], "Ferris");
        assert_eq!(room["canonical_alias"], "#rustaceans:localhost");
        // `join_rule` defaults to public when absent (ruma leaves the default out).
        assert!(room.get("join_rule").is_none_or(|j| j == "public"), "{room}");
        assert_eq!(room["world_readable"], false);
        assert_eq!(room["num_joined_members"], 1);
    }
    for term in ["1%rust", "m_0", "nothing"] {
        let (_, page) = server.post("/_matrix/client/v3/publicRooms", Some(&alice), search(term)).await;
        assert_eq!(found(&page), Vec::<String>::new(), "{term}: {page}");
    }
    let (_, page) = server.post("/_matrix/client/v3/publicRooms", Some(&alice), search("room")).await;
    assert_eq!(page["total_room_count_estimate"], 5, "{page}");
    // Search terms are bounded, in both directories; never a 500.
    let long = "a".repeat(100_000);
    assert_error(
        &server.post("/_matrix/client/v3/publicRooms", Some(&alice), search(&long)).await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_PARAM",
    );
    let user_search = json!({"search_term": long, "limit": 5});
    assert_error(
        &server.post("/_matrix/client/v3/user_directory/search", Some(&alice), user_search).await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_PARAM",
    );
    let (status, users) =
        server.post("/_matrix/client/v3/user_directory/search", Some(&alice), json!({"search_term": "%"})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(users["results"], json!([]), "`%` is not a wildcard: {users}");
    server.stop().await;
}

backend_tests!(
    public_rooms_paginate,
    create_room_presets_and_state,
    every_supported_room_version,
    membership_and_power,
    send_is_idempotent_and_redaction_erases,
    parallel_sends_of_one_transaction_are_one_event,
    history_pagination_and_visibility,
    aliases_and_directory_permissions,
);
