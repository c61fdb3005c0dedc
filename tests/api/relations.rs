//! Relations, threads and the rest of what Element calls (issue 12): `/relations`
//! paging and filters, `/threads`, bundled aggregations (`m.thread`, `m.replace`,
//! `m.reference`) wherever events are served, thread-aware unread counts, room
//! upgrades, reports, mutual rooms.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{
    backend_tests,
    common::{Backend, TestServer, assert_error},
};

/// Sends an event with any content; answers its id.
async fn send(server: &TestServer, token: &str, room: &str, event_type: &str, content: Value) -> String {
    let txn = convo::service::generate_registration_token();
    let (status, body) =
        server.put(&format!("/_matrix/client/v3/rooms/{room}/send/{event_type}/{txn}"), Some(token), content).await;
    assert_eq!(status, StatusCode::OK, "send: {body}");
    body["event_id"].as_str().unwrap().to_owned()
}

async fn thread_reply(server: &TestServer, token: &str, room: &str, root: &str, text: &str) -> String {
    let content = json!({
        "msgtype": "m.text", "body": text,
        "m.relates_to": {"rel_type": "m.thread", "event_id": root, "is_falling_back": true,
            "m.in_reply_to": {"event_id": root}},
    });
    send(server, token, room, "m.room.message", content).await
}

async fn edit(server: &TestServer, token: &str, room: &str, original: &str, text: &str) -> String {
    let content = json!({
        "msgtype": "m.text", "body": format!("* {text}"),
        "m.new_content": {"msgtype": "m.text", "body": text},
        "m.relates_to": {"rel_type": "m.replace", "event_id": original},
    });
    send(server, token, room, "m.room.message", content).await
}

async fn get_event(server: &TestServer, token: &str, room: &str, event: &str) -> Value {
    let (status, body) = server.get(&format!("/_matrix/client/v3/rooms/{room}/event/{event}"), Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

fn ids(chunk: &Value) -> Vec<String> {
    chunk.as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap().to_owned()).collect()
}

/// Two users in a public room.
async fn room_of_two(server: &TestServer) -> (String, String, String) {
    let (_, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    server.join(&bob, &room).await;
    (alice, bob, room)
}

async fn relations_are_paged_and_filtered(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, bob, room) = room_of_two(&server).await;
    let (_, carol, _) = server.register("carol").await;
    let root = server.send_text(&alice, &room, "root").await;
    let mut replies = Vec::new();
    for i in 0..5 {
        replies
            .push(thread_reply(&server, if i % 2 == 0 { &alice } else { &bob }, &room, &root, &format!("r{i}")).await);
    }
    let fix = edit(&server, &alice, &room, &root, "root, edited").await;
    let reference = send(
        &server,
        &bob,
        &room,
        "m.room.message",
        json!({"msgtype": "m.text", "body": "see",
            "m.relates_to": {"rel_type": "m.reference", "event_id": root}}),
    )
    .await;
    let reaction = send(
        &server,
        &bob,
        &room,
        "m.reaction",
        json!({"m.relates_to":
        {"rel_type": "m.annotation", "event_id": root, "key": "👍"}}),
    )
    .await;
    let base = format!("/_matrix/client/v1/rooms/{room}/relations/{root}");

    // All children, newest first, two at a time.
    let mut seen = Vec::new();
    let mut from: Option<String> = None;
    for _ in 0..10 {
        let path = match &from {
            Some(f) => format!("{base}?limit=2&from={f}"),
            None => format!("{base}?limit=2"),
        };
        let (status, body) = server.get(&path, Some(&bob)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        seen.extend(ids(&body["chunk"]));
        match body["next_batch"].as_str() {
            Some(next) => from = Some(next.to_owned()),
            None => break,
        }
    }
    let mut expected: Vec<String> = replies.clone();
    expected.extend([fix.clone(), reference.clone(), reaction.clone()]);
    expected.reverse();
    assert_eq!(seen, expected, "every child once, newest first");

    // Forwards, and by rel_type and event type.
    let (_, body) = server.get(&format!("{base}?dir=f&limit=3"), Some(&bob)).await;
    assert_eq!(ids(&body["chunk"]), replies[..3]);
    let (_, body) = server.get(&format!("{base}/m.thread"), Some(&bob)).await;
    let mut newest_first = replies.clone();
    newest_first.reverse();
    assert_eq!(ids(&body["chunk"]), newest_first);
    assert!(body["next_batch"].is_null(), "{body}");
    let (_, body) = server.get(&format!("{base}/m.annotation/m.reaction"), Some(&bob)).await;
    assert_eq!(ids(&body["chunk"]), [reaction.as_str()]);
    let (_, body) = server.get(&format!("{base}/m.annotation/m.room.message"), Some(&bob)).await;
    assert_eq!(ids(&body["chunk"]), Vec::<String>::new());

    // Recursion: a reaction to a thread reply is a grandchild of the root.
    let grandchild = send(
        &server,
        &alice,
        &room,
        "m.reaction",
        json!({"m.relates_to":
        {"rel_type": "m.annotation", "event_id": replies[0], "key": "x"}}),
    )
    .await;
    let (_, body) = server.get(&format!("{base}/m.annotation"), Some(&bob)).await;
    assert_eq!(ids(&body["chunk"]), [reaction.as_str()]);
    let (_, body) = server.get(&format!("{base}/m.annotation?recurse=true"), Some(&bob)).await;
    assert_eq!(ids(&body["chunk"]), [grandchild, reaction.clone()]);
    assert_eq!(body["recursion_depth"], 3);

    // Someone who may not see the parent gets a 404; an unknown parent too.
    assert_error(&server.get(&base, Some(&carol)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let unknown = format!("/_matrix/client/v1/rooms/{room}/relations/$nope");
    assert_error(&server.get(&unknown, Some(&bob)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    assert_error(
        &server.get(&format!("{base}?from=zzz"), Some(&bob)).await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_PARAM",
    );

    // A redacted child leaves the relations.
    let (status, body) =
        server.put(&format!("/_matrix/client/v3/rooms/{room}/redact/{reaction}/t1"), Some(&bob), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, body) = server.get(&format!("{base}/m.annotation"), Some(&bob)).await;
    assert_eq!(ids(&body["chunk"]), Vec::<String>::new());
    server.stop().await;
}

async fn history_visibility_hides_relations(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    let (status, _) = server
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.history_visibility/"),
            Some(&alice),
            json!({"history_visibility": "joined"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let root = server.send_text(&alice, &room, "before bob").await;
    let early = thread_reply(&server, &alice, &room, &root, "also before bob").await;
    server.join(&bob, &room).await;
    // Bob may not see the root: 404.
    let base = format!("/_matrix/client/v1/rooms/{room}/relations/{root}");
    assert_error(&server.get(&base, Some(&bob)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    // A root bob sees, with a reply from before he joined: only the later reply.
    let root2 = server.send_text(&alice, &room, "after bob").await;
    let late = thread_reply(&server, &alice, &room, &root2, "seen").await;
    let (status, body) = server.get(&format!("/_matrix/client/v1/rooms/{room}/relations/{root2}"), Some(&bob)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(ids(&body["chunk"]), [late]);
    assert_ne!(early, root2);
    server.stop().await;
}

async fn thread_aggregation_after_replies(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, bob, room) = room_of_two(&server).await;
    let (_, carol, _) = server.register("carol").await;
    server.join(&carol, &room).await;
    let root = server.send_text(&alice, &room, "root").await;
    let plain = server.send_text(&alice, &room, "no thread").await;
    thread_reply(&server, &bob, &room, &root, "one").await;
    let last = thread_reply(&server, &bob, &room, &root, "two").await;

    for (token, participated) in [(&alice, true), (&bob, true), (&carol, false)] {
        let event = get_event(&server, token, &room, &root).await;
        let thread = &event["unsigned"]["m.relations"]["m.thread"];
        assert_eq!(thread["count"], 2, "{event}");
        assert_eq!(thread["latest_event"]["event_id"], last.as_str(), "{event}");
        assert_eq!(thread["latest_event"]["content"]["body"], "two");
        assert_eq!(thread["current_user_participated"], participated, "{event}");
    }
    let event = get_event(&server, &alice, &room, &plain).await;
    assert!(event["unsigned"].get("m.relations").is_none(), "{event}");

    // The same in /messages, /context and the /sync timeline.
    let (_, body) = server.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=10"), Some(&carol)).await;
    let in_messages = body["chunk"].as_array().unwrap().iter().find(|e| e["event_id"] == root.as_str()).unwrap();
    assert_eq!(in_messages["unsigned"]["m.relations"]["m.thread"]["count"], 2, "{in_messages}");
    let (_, body) = server.get(&format!("/_matrix/client/v3/rooms/{room}/context/{root}?limit=2"), Some(&carol)).await;
    assert_eq!(body["event"]["unsigned"]["m.relations"]["m.thread"]["count"], 2, "{body}");
    let sync = server.sync(&carol, None, "filter={\"room\":{\"timeline\":{\"limit\":10}}}").await;
    let timeline = &sync["rooms"]["join"][&room]["timeline"]["events"];
    let in_sync = timeline.as_array().unwrap().iter().find(|e| e["event_id"] == root.as_str()).unwrap();
    assert_eq!(in_sync["unsigned"]["m.relations"]["m.thread"]["latest_event"]["event_id"], last.as_str());

    // A thread cannot start from an event that relates to another: 400 M_UNKNOWN.
    let content = json!({"msgtype": "m.text", "body": "nested",
        "m.relates_to": {"rel_type": "m.thread", "event_id": last}});
    let txn = convo::service::generate_registration_token();
    let result =
        server.put(&format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}"), Some(&bob), content).await;
    assert_error(&result, StatusCode::BAD_REQUEST, "M_UNKNOWN");
    server.stop().await;
}

async fn edits_and_references_are_bundled(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, bob, room) = room_of_two(&server).await;
    let original = server.send_text(&alice, &room, "helo").await;
    let first = edit(&server, &alice, &room, &original, "hello").await;
    let second = edit(&server, &alice, &room, &original, "hello!").await;
    // An edit by someone else is not valid: ignored.
    edit(&server, &bob, &room, &original, "hijacked").await;
    let reference = send(
        &server,
        &bob,
        &room,
        "m.room.message",
        json!({"msgtype": "m.text", "body": "ref",
        "m.relates_to": {"rel_type": "m.reference", "event_id": original}}),
    )
    .await;

    let event = get_event(&server, &bob, &room, &original).await;
    let relations = &event["unsigned"]["m.relations"];
    assert_eq!(relations["m.replace"]["event_id"], second.as_str(), "{event}");
    assert_eq!(relations["m.replace"]["sender"], event["sender"]);
    assert!(relations["m.replace"]["origin_server_ts"].is_i64());
    // The content is the original's: the client applies the edit.
    assert_eq!(event["content"]["body"], "helo");
    assert_eq!(relations["m.reference"]["chunk"], json!([{"event_id": reference}]));

    // Redacting the latest edit brings back the one before.
    let (status, _) =
        server.put(&format!("/_matrix/client/v3/rooms/{room}/redact/{second}/t1"), Some(&alice), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let event = get_event(&server, &bob, &room, &original).await;
    assert_eq!(event["unsigned"]["m.relations"]["m.replace"]["event_id"], first.as_str(), "{event}");
    server.stop().await;
}

async fn threads_list_by_latest_activity(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, bob, room) = room_of_two(&server).await;
    let (_, carol, _) = server.register("carol").await;
    let older = server.send_text(&alice, &room, "thread 1").await;
    let newer = server.send_text(&alice, &room, "thread 2").await;
    let third = server.send_text(&bob, &room, "thread 3").await;
    thread_reply(&server, &alice, &room, &older, "a").await;
    thread_reply(&server, &alice, &room, &newer, "b").await;
    thread_reply(&server, &alice, &room, &third, "c").await;
    // New activity in the oldest thread puts it first.
    thread_reply(&server, &bob, &room, &older, "d").await;
    let base = format!("/_matrix/client/v1/rooms/{room}/threads");
    let (status, body) = server.get(&base, Some(&bob)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(ids(&body["chunk"]), [older.clone(), third.clone(), newer.clone()]);
    assert_eq!(body["chunk"][0]["unsigned"]["m.relations"]["m.thread"]["count"], 2);
    // Paging.
    let (_, page1) = server.get(&format!("{base}?limit=2"), Some(&bob)).await;
    assert_eq!(ids(&page1["chunk"]), [older.clone(), third.clone()]);
    let next = page1["next_batch"].as_str().expect("a next page");
    let (_, page2) = server.get(&format!("{base}?limit=2&from={next}"), Some(&bob)).await;
    assert_eq!(ids(&page2["chunk"]), [newer.as_str()]);
    assert!(page2["next_batch"].is_null());
    // Bob took part in `older` (a reply) and `third` (its root) only.
    let (_, body) = server.get(&format!("{base}?include=participated"), Some(&bob)).await;
    assert_eq!(ids(&body["chunk"]), [older, third]);
    // Not in the room: refused.
    assert_error(&server.get(&base, Some(&carol)).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    server.stop().await;
}

fn counts(sync: &Value, room: &str) -> (Value, Value) {
    let joined = &sync["rooms"]["join"][room];
    (joined["unread_notifications"]["notification_count"].clone(), joined["unread_thread_notifications"].clone())
}

async fn thread_aware_unread_counts(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, bob, room) = room_of_two(&server).await;
    let root = server.send_text(&alice, &room, "root").await;
    server.send_text(&alice, &room, "main 2").await;
    thread_reply(&server, &alice, &room, &root, "t1").await;
    let last_in_thread = thread_reply(&server, &alice, &room, &root, "t2").await;
    let threaded = "filter={\"room\":{\"timeline\":{\"unread_thread_notifications\":true}}}";

    // Without the filter flag: everything in one count.
    let sync = server.sync(&bob, None, "").await;
    let (main, threads) = counts(&sync, &room);
    assert_eq!(main, 4, "{sync}");
    assert!(threads.is_null() || threads == json!({}), "{threads}");
    // With it: the main timeline's count leaves the thread out.
    let sync = server.sync(&bob, None, threaded).await;
    let (main, threads) = counts(&sync, &room);
    assert_eq!(main, 2, "{sync}");
    assert_eq!(threads[&root]["notification_count"], 2, "{threads}");

    // A receipt in the thread resets its count only.
    let (status, body) = server
        .post(
            &format!("/_matrix/client/v3/rooms/{room}/receipt/m.read/{last_in_thread}"),
            Some(&bob),
            json!({"thread_id": root}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let sync = server.sync(&bob, None, threaded).await;
    let (main, threads) = counts(&sync, &room);
    assert_eq!(main, 2, "{sync}");
    assert!(threads.get(&root).is_none(), "{threads}");
    // A main receipt resets the main timeline, and a new thread reply counts again.
    let (status, _) = server
        .post(
            &format!("/_matrix/client/v3/rooms/{room}/receipt/m.read/{root}"),
            Some(&bob),
            json!({"thread_id": "main"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    thread_reply(&server, &alice, &room, &root, "t3").await;
    let sync = server.sync(&bob, None, threaded).await;
    let (_, threads) = counts(&sync, &room);
    assert_eq!(threads[&root]["notification_count"], 1, "{threads}");
    // `main` was read at the root: the message after it still counts.
    let (main, _) = counts(&sync, &room);
    assert_eq!(main, 1, "{sync}");

    // A threaded receipt names an event of its thread: the root, a reply, or an event
    // relating to a reply; anything else is refused.
    let reaction = send(
        &server,
        &alice,
        &room,
        "m.reaction",
        json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": last_in_thread, "key": "+1"}}),
    )
    .await;
    let main_message = server.send_text(&alice, &room, "main 3").await;
    for (event, thread, ok) in [
        (&root, root.as_str(), true),
        (&last_in_thread, root.as_str(), true),
        (&reaction, root.as_str(), true),
        (&main_message, root.as_str(), false),
        (&last_in_thread, main_message.as_str(), false),
        (&main_message, "main", true),
    ] {
        let (status, body) = server
            .post(
                &format!("/_matrix/client/v3/rooms/{room}/receipt/m.read/{event}"),
                Some(&bob),
                json!({"thread_id": thread}),
            )
            .await;
        if ok {
            assert_eq!(status, StatusCode::OK, "{event} in {thread}: {body}");
        } else {
            assert_error(&(status, body), StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
        }
    }
    server.stop().await;
}

async fn upgrade_copies_state_and_tombstones(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_id, alice, _) = server.register("alice").await;
    let (bob_id, bob, _) = server.register("bob").await;
    let (carol_id, _, _) = server.register("carol").await;
    let room = server
        .create_room(
            &alice,
            json!({"preset": "public_chat", "room_version": "10", "name": "Old", "topic": "Talk",
                "room_alias_name": "lobby"}),
        )
        .await;
    server.join(&bob, &room).await;
    let put_state = |event_type: &str, content: Value| {
        let (server, alice, room) = (&server, alice.clone(), room.clone());
        let path = format!("/_matrix/client/v3/rooms/{room}/state/{event_type}/");
        async move {
            let (status, body) = server.put(&path, Some(&alice), content).await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
    };
    let (_, levels) =
        server.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.power_levels/"), Some(&alice)).await;
    let mut levels = levels;
    levels["users"][&bob_id] = json!(40);
    put_state("m.room.power_levels", levels).await;
    put_state("m.room.encryption", json!({"algorithm": "m.megolm.v1.aes-sha2"})).await;
    let (status, _) =
        server.post(&format!("/_matrix/client/v3/rooms/{room}/ban"), Some(&alice), json!({"user_id": carol_id})).await;
    assert_eq!(status, StatusCode::OK);

    // Bob lacks the power to send the tombstone; an unknown version is refused.
    let upgrade = format!("/_matrix/client/v3/rooms/{room}/upgrade");
    assert_error(
        &server.post(&upgrade, Some(&bob), json!({"new_version": "11"})).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    assert_error(
        &server.post(&upgrade, Some(&alice), json!({"new_version": "99"})).await,
        StatusCode::BAD_REQUEST,
        "M_UNSUPPORTED_ROOM_VERSION",
    );

    let (status, body) = server.post(&upgrade, Some(&alice), json!({"new_version": "11"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let new_room = body["replacement_room"].as_str().unwrap().to_owned();
    let state = |room: String, event_type: &'static str| {
        let (server, alice) = (&server, alice.clone());
        async move {
            let path = format!("/_matrix/client/v3/rooms/{room}/state/{event_type}/");
            server.get(&path, Some(&alice)).await
        }
    };
    let (_, create) = state(new_room.clone(), "m.room.create").await;
    assert_eq!(create["predecessor"]["room_id"], room.as_str(), "{create}");
    assert_eq!(create["room_version"], "11");
    assert_eq!(state(new_room.clone(), "m.room.name").await.1["name"], "Old");
    assert_eq!(state(new_room.clone(), "m.room.topic").await.1["topic"], "Talk");
    assert_eq!(state(new_room.clone(), "m.room.join_rules").await.1["join_rule"], "public");
    assert_eq!(state(new_room.clone(), "m.room.encryption").await.1["algorithm"], "m.megolm.v1.aes-sha2");
    let (_, new_levels) = state(new_room.clone(), "m.room.power_levels").await;
    assert_eq!(new_levels["users"][&bob_id], 40, "{new_levels}");
    assert_eq!(new_levels["users"][&alice_id], 100, "{new_levels}");
    let (status, ban) =
        server.get(&format!("/_matrix/client/v3/rooms/{new_room}/state/m.room.member/{carol_id}"), Some(&alice)).await;
    assert_eq!(status, StatusCode::OK, "{ban}");
    assert_eq!(ban["membership"], "ban");

    // The alias and canonical alias moved; the old room is tombstoned and muted.
    let (_, alias) = server.get("/_matrix/client/v3/directory/room/%23lobby:localhost", None).await;
    assert_eq!(alias["room_id"], new_room.as_str(), "{alias}");
    assert_eq!(state(new_room.clone(), "m.room.canonical_alias").await.1["alias"], "#lobby:localhost");
    let (_, old_alias) = state(room.clone(), "m.room.canonical_alias").await;
    assert!(old_alias.get("alias").is_none(), "{old_alias}");
    let (_, tombstone) = state(room.clone(), "m.room.tombstone").await;
    assert_eq!(tombstone["replacement_room"], new_room.as_str(), "{tombstone}");
    let (_, old_levels) = state(room.clone(), "m.room.power_levels").await;
    assert_eq!(old_levels["events_default"], 50, "{old_levels}");
    assert_eq!(old_levels["invite"], 50, "{old_levels}");
    let txn = convo::service::generate_registration_token();
    let result = server
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}"),
            Some(&bob),
            json!({"msgtype": "m.text", "body": "still here?"}),
        )
        .await;
    assert_error(&result, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    // Bob can follow into the new room.
    server.join(&bob, &new_room).await;

    // To version 12: the creator ranks above everyone and is not listed in `users`.
    let (status, body) = server
        .post(&format!("/_matrix/client/v3/rooms/{new_room}/upgrade"), Some(&alice), json!({"new_version": "12"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let newest = body["replacement_room"].as_str().unwrap().to_owned();
    let (_, levels) = state(newest.clone(), "m.room.power_levels").await;
    assert!(levels["users"].get(&alice_id).is_none(), "{levels}");
    assert_eq!(levels["users"][&bob_id], 40, "{levels}");
    server.stop().await;
}

async fn reports_are_stored_and_listed(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, bob, room) = room_of_two(&server).await;
    let (_, carol, _) = server.register("carol").await;
    let event = server.send_text(&alice, &room, "spam").await;
    let (status, body) = server
        .post(
            &format!("/_matrix/client/v3/rooms/{room}/report/{event}"),
            Some(&bob),
            json!({"reason": "spam\twith a tab", "score": -100}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = server
        .post(&format!("/_matrix/client/v3/rooms/{room}/report"), Some(&bob), json!({"reason": "bad room"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // What the reporter may not see cannot be reported.
    assert_error(
        &server.post(&format!("/_matrix/client/v3/rooms/{room}/report/{event}"), Some(&carol), json!({})).await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );
    assert_error(
        &server.post(&format!("/_matrix/client/v3/rooms/{room}/report"), Some(&carol), json!({"reason": "x"})).await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );

    let command = convo::admin::AdminCommand::Reports { limit: 10 };
    let out = convo::admin::run(server.config().clone(), command).await.expect("admin reports");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[1].contains(&room) && lines[1].contains("\t-\t@bob:localhost\tbad room"), "{out}");
    assert!(lines[2].contains(&event) && lines[2].ends_with("@bob:localhost\tspam with a tab"), "{out}");
    server.stop().await;
}

async fn concurrent_reports_get_distinct_ids(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, bob, room) = room_of_two(&server).await;
    let event = server.send_text(&alice, &room, "spam").await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8 {
        let (http, base, token, room, event) =
            (server.http.clone(), server.base.clone(), bob.clone(), room.clone(), event.clone());
        tasks.spawn(async move {
            http.post(format!("{base}/_matrix/client/v3/rooms/{room}/report/{event}"))
                .bearer_auth(token)
                .json(&json!({"reason": format!("r{i}")}))
                .send()
                .await
                .unwrap()
                .status()
        });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.unwrap(), StatusCode::OK);
    }
    let command = convo::admin::AdminCommand::Reports { limit: 100 };
    let out = convo::admin::run(server.config().clone(), command).await.expect("admin reports");
    let mut ids: Vec<&str> = out.lines().skip(1).map(|l| l.split('\t').next().unwrap()).collect();
    assert_eq!(ids.len(), 8, "{out}");
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 8, "distinct ids: {out}");
    server.stop().await;
}

async fn mutual_rooms_lists_shared_joined_rooms(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, bob, room) = room_of_two(&server).await;
    let (carol_id, carol, _) = server.register("carol").await;
    let _alone = server.create_room(&alice, json!({})).await;
    let left = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    server.join(&bob, &left).await;
    server.leave(&bob, &left).await;
    let (_, bob_id) = {
        let (_, body) = server.get("/_matrix/client/v3/account/whoami", Some(&bob)).await;
        ((), body["user_id"].as_str().unwrap().to_owned())
    };
    for path in [
        format!("/_matrix/client/unstable/uk.half-shot.msc2666/user/mutual_rooms?user_id={bob_id}"),
        format!("/_matrix/client/v1/mutual_rooms?user_id={bob_id}"),
    ] {
        let (status, body) = server.get(&path, Some(&alice)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["joined"], json!([room]), "{path}: {body}");
    }
    let (_, body) = server.get(&format!("/_matrix/client/v1/mutual_rooms?user_id={carol_id}"), Some(&alice)).await;
    assert_eq!(body["joined"], json!([]));
    assert_eq!(body["count"], 0);
    let _ = carol;
    server.stop().await;
}

async fn room_summaries_for_members_and_open_rooms(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (bob_id, bob, _) = server.register("bob").await;
    let public = server
        .create_room(
            &alice,
            json!({"preset": "public_chat", "name": "Lobby", "topic": "Hi", "room_alias_name": "lobby"}),
        )
        .await;
    let private = server.create_room(&alice, json!({"preset": "private_chat", "name": "Secret"})).await;
    for path in [
        format!("/_matrix/client/v1/room_summary/{public}"),
        "/_matrix/client/v1/room_summary/%23lobby:localhost".to_owned(),
        format!("/_matrix/client/unstable/im.nheko.summary/rooms/{public}/summary"),
    ] {
        let (status, body) = server.get(&path, Some(&bob)).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        assert_eq!(body["room_id"], public.as_str());
        assert_eq!(body["name"], "Lobby");
        assert_eq!(body["topic"], "Hi");
        assert_eq!(body["canonical_alias"], "#lobby:localhost");
        assert_eq!(body["num_joined_members"], 1);
        // ruma leaves out `public`, the field's default.
        assert!(body["join_rule"] == "public" || body.get("join_rule").is_none(), "{body}");
        assert_eq!(body["world_readable"], false);
        assert_eq!(body["membership"], "leave", "{body}");
        assert!(body["room_version"].is_string(), "{body}");
    }
    // Without a token: open rooms only, and no membership.
    let (status, body) = server.get(&format!("/_matrix/client/v1/room_summary/{public}"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.get("membership").is_none(), "{body}");
    let private_path = format!("/_matrix/client/v1/room_summary/{private}");
    assert_error(&server.get(&private_path, None).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    // A private room: not for outsiders, but for the invited.
    assert_error(&server.get(&private_path, Some(&bob)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let (status, _) = server
        .post(&format!("/_matrix/client/v3/rooms/{private}/invite"), Some(&alice), json!({"user_id": bob_id}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = server.get(&private_path, Some(&bob)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["membership"], "invite");
    assert_eq!(body["join_rule"], "invite");
    let unknown = "/_matrix/client/v1/room_summary/%23nowhere:localhost";
    assert_error(&server.get(unknown, Some(&bob)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    server.stop().await;
}

/// A thread as a viewer who ignores a user sees it: that user's events neither count
/// nor are the latest, a thread with only their replies is not listed, and a root they
/// sent is listed redacted; other viewers see everything.
async fn ignored_users_leave_threads(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, bob, room) = room_of_two(&server).await;
    let (_, carol, _) = server.register("carol").await;
    server.join(&carol, &room).await;
    let root = server.send_text(&alice, &room, "root").await;
    let carols_root = server.send_text(&carol, &room, "carol's root").await;
    let only_carol = server.send_text(&alice, &room, "only carol answers").await;
    let from_bob = thread_reply(&server, &bob, &room, &root, "bob").await;
    thread_reply(&server, &bob, &room, &carols_root, "bob to carol").await;
    let from_carol = thread_reply(&server, &carol, &room, &root, "carol").await;
    thread_reply(&server, &carol, &room, &only_carol, "carol again").await;
    let (status, body) = server
        .put(
            "/_matrix/client/v3/user/@alice:localhost/account_data/m.ignored_user_list",
            Some(&alice),
            json!({"ignored_users": {"@carol:localhost": {}}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let thread_of = |event: &Value| event["unsigned"]["m.relations"]["m.thread"].clone();
    let seen = thread_of(&get_event(&server, &alice, &room, &root).await);
    assert_eq!((seen["count"].clone(), seen["latest_event"]["event_id"].clone()), (json!(1), json!(from_bob)));
    let seen = thread_of(&get_event(&server, &bob, &room, &root).await);
    assert_eq!((seen["count"].clone(), seen["latest_event"]["event_id"].clone()), (json!(2), json!(from_carol)));
    let event = get_event(&server, &alice, &room, &only_carol).await;
    assert!(event["unsigned"]["m.relations"].get("m.thread").is_none(), "{event}");
    // In a /messages page too.
    let (_, body) = server.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=20"), Some(&alice)).await;
    let in_page = body["chunk"].as_array().unwrap().iter().find(|e| e["event_id"] == root.as_str()).unwrap();
    assert_eq!(thread_of(in_page)["count"], 1, "{in_page}");

    let base = format!("/_matrix/client/v1/rooms/{room}/threads");
    let (status, body) = server.get(&base, Some(&alice)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(ids(&body["chunk"]), [carols_root.clone(), root.clone()], "by bob's latest replies");
    assert_eq!(body["chunk"][0]["content"], json!({}), "carol's root redacted: {body}");
    assert_eq!(body["chunk"][0]["sender"], "@carol:localhost");
    let (_, body) = server.get(&base, Some(&bob)).await;
    assert_eq!(ids(&body["chunk"]), [only_carol, root, carols_root.clone()]);
    assert_eq!(body["chunk"][2]["content"]["body"], "carol's root", "{body}");
    let event = get_event(&server, &bob, &room, &carols_root).await;
    assert_eq!(event["content"]["body"], "carol's root", "{event}");
    server.stop().await;
}

/// Whether the stored event says something relates to it (`events.related`).
async fn related_flag(server: &TestServer, event: &str) -> bool {
    crate::federation::services(server).store.get_event(event).await.unwrap().unwrap().related
}

async fn redact(server: &TestServer, token: &str, room: &str, event: &str) {
    let txn = convo::service::generate_registration_token();
    let (status, body) =
        server.put(&format!("/_matrix/client/v3/rooms/{room}/redact/{event}/{txn}"), Some(token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// The `related` flag is cleared when the last child of an event is redacted (not
/// before), set again by a new child, and a child sent while the last one is redacted
/// (in parallel) always leaves it set; the bundled aggregations follow.
async fn the_related_flag_follows_redacted_children(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, bob, room) = room_of_two(&server).await;
    let root = server.send_text(&alice, &room, "root").await;
    assert!(!related_flag(&server, &root).await);
    let reply = thread_reply(&server, &bob, &room, &root, "reply").await;
    let reference = send(
        &server,
        &bob,
        &room,
        "m.room.message",
        json!({"msgtype": "m.text", "body": "ref", "m.relates_to": {"rel_type": "m.reference", "event_id": root}}),
    )
    .await;
    assert!(related_flag(&server, &root).await);
    redact(&server, &bob, &room, &reply).await;
    assert!(related_flag(&server, &root).await, "one child left");
    let event = get_event(&server, &alice, &room, &root).await;
    assert!(event["unsigned"]["m.relations"].get("m.thread").is_none(), "{event}");
    assert_eq!(event["unsigned"]["m.relations"]["m.reference"]["chunk"], json!([{"event_id": reference}]));
    redact(&server, &bob, &room, &reference).await;
    assert!(!related_flag(&server, &root).await, "no child left");
    let event = get_event(&server, &alice, &room, &root).await;
    assert!(event["unsigned"].get("m.relations").is_none(), "{event}");

    // A new child while the last one is redacted, at once: the flag stays with the new one.
    let mut last = thread_reply(&server, &bob, &room, &root, "again").await;
    for i in 0..8 {
        let text = format!("round {i}");
        let ((), next) =
            tokio::join!(redact(&server, &alice, &room, &last), thread_reply(&server, &bob, &room, &root, &text));
        last = next;
        assert!(related_flag(&server, &root).await, "round {i}");
        let event = get_event(&server, &bob, &room, &root).await;
        let thread = &event["unsigned"]["m.relations"]["m.thread"];
        assert_eq!((thread["count"].clone(), thread["latest_event"]["event_id"].clone()), (json!(1), json!(last)));
    }
    server.stop().await;
}

backend_tests!(
    relations_are_paged_and_filtered,
    history_visibility_hides_relations,
    thread_aggregation_after_replies,
    edits_and_references_are_bundled,
    threads_list_by_latest_activity,
    thread_aware_unread_counts,
    upgrade_copies_state_and_tombstones,
    upgrades_sent_at_once_make_one_room,
    reports_are_stored_and_listed,
    concurrent_reports_get_distinct_ids,
    mutual_rooms_lists_shared_joined_rooms,
    room_summaries_for_members_and_open_rooms,
    ignored_users_leave_threads,
    the_related_flag_follows_redacted_children,
    synced_events_follow_edits_and_redactions,
);

fn timeline_event<'a>(sync: &'a Value, room: &str, event: &str) -> &'a Value {
    let events = sync["rooms"]["join"][room]["timeline"]["events"].as_array().expect("a timeline");
    events.iter().find(|e| e["event_id"] == event).unwrap_or_else(|| panic!("{event} not in {sync}"))
}

/// `/sync` serves a room's newest events from memory (`storage/live.rs`): what happens
/// to an event kept there after it was sent shows in the next sync as it does in the
/// database: an edit is bundled with it, a redaction empties it, whether the sync is
/// initial or incremental, while the same events come from the database after a restart.
async fn synced_events_follow_edits_and_redactions(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let (alice, bob, room) = room_of_two(&server).await;
    let original = server.send_text(&alice, &room, "first").await;
    let filter = "filter=%7B%22room%22%3A%7B%22timeline%22%3A%7B%22limit%22%3A20%7D%7D%7D";
    let first = server.sync(&bob, None, filter).await;
    assert!(timeline_event(&first, &room, &original)["unsigned"].get("m.relations").is_none(), "{first}");
    let since = first["next_batch"].as_str().unwrap().to_owned();

    let replacement = edit(&server, &alice, &room, &original, "second").await;
    for sync in [server.sync(&bob, None, filter).await, server.sync(&bob, Some(&since), "timeout=0").await] {
        let events = sync["rooms"]["join"][&room]["timeline"]["events"].as_array().unwrap().clone();
        assert!(events.iter().any(|e| e["event_id"] == replacement.as_str()), "{sync}");
    }
    let initial = server.sync(&bob, None, filter).await;
    let bundled = &timeline_event(&initial, &room, &original)["unsigned"]["m.relations"]["m.replace"];
    assert_eq!(bundled["event_id"], replacement.as_str(), "{initial}");

    redact(&server, &alice, &room, &original).await;
    let check = |sync: &Value| {
        let event = timeline_event(sync, &room, &original);
        assert_eq!(event["content"], json!({}), "{sync}");
        assert!(event["unsigned"]["redacted_because"].is_object(), "{sync}");
    };
    check(&server.sync(&bob, None, filter).await);
    server.restart().await;
    check(&server.sync(&bob, None, filter).await);
    server.stop().await;
}

/// Several upgrades of one room at once make one new room: every answer names it, and
/// the old room has one tombstone.
async fn upgrades_sent_at_once_make_one_room(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let room = server.create_room(&alice, json!({"preset": "private_chat", "room_version": "10"})).await;
    let path = format!("/_matrix/client/v3/rooms/{room}/upgrade");
    let answers =
        futures_util::future::join_all((0..4).map(|_| server.post(&path, Some(&alice), json!({"new_version": "11"}))))
            .await;
    let mut new_rooms: Vec<String> = answers
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, StatusCode::OK, "{body}");
            body["replacement_room"].as_str().unwrap().to_owned()
        })
        .collect();
    new_rooms.dedup();
    assert_eq!(new_rooms.len(), 1, "one new room for all: {new_rooms:?}");
    let (status, messages) =
        server.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=100"), Some(&alice)).await;
    assert_eq!(status, StatusCode::OK, "{messages}");
    let tombstones = messages["chunk"].as_array().unwrap().iter().filter(|e| e["type"] == "m.room.tombstone").count();
    assert_eq!(tombstones, 1, "{messages}");
}
