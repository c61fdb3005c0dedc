//! Push rules and the small endpoints Element calls at start.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::{
    backend_tests,
    common::{Backend, TestServer, assert_error},
};

async fn push_rules_start_from_defaults_and_change(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (status, rules) = server.get("/_matrix/client/v3/pushrules/", Some(&alice)).await;
    assert_eq!(status, StatusCode::OK);
    // The spec's server-default rules, in the spec's order; no content rules (the
    // spec no longer has `.m.rule.contains_user_name`).
    let ids = |kind: &str| -> Vec<String> {
        rules["global"][kind]
            .as_array()
            .map(|a| a.iter().map(|r| r["rule_id"].as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    assert_eq!(
        ids("override"),
        [
            ".m.rule.master",
            ".m.rule.suppress_notices",
            ".m.rule.invite_for_me",
            ".m.rule.member_event",
            ".m.rule.is_user_mention",
            ".m.rule.is_room_mention",
            ".m.rule.tombstone",
            ".m.rule.reaction",
            ".m.rule.room.server_acl",
            ".m.rule.suppress_edits",
        ],
        "{rules}"
    );
    assert_eq!(
        ids("underride"),
        [
            ".m.rule.call",
            ".m.rule.encrypted_room_one_to_one",
            ".m.rule.room_one_to_one",
            ".m.rule.message",
            ".m.rule.encrypted",
        ],
        "{rules}"
    );
    assert_eq!(ids("content"), Vec::<String>::new(), "{rules}");
    let message = rules["global"]["underride"].as_array().unwrap().iter().find(|r| r["rule_id"] == ".m.rule.message");
    assert_eq!(message.unwrap()["actions"], json!(["notify"]), "{rules}");
    // A content rule of the user's own is served back as written.
    let content_rule = "/_matrix/client/v3/pushrules/global/content/cats";
    let (status, body) =
        server.put(content_rule, Some(&alice), json!({"pattern": "cat*", "actions": ["notify"]})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, rules) = server.get("/_matrix/client/v3/pushrules/", Some(&alice)).await;
    let content = rules["global"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 1, "{rules}");
    assert_eq!(
        (content[0]["rule_id"].clone(), content[0]["pattern"].clone(), content[0]["enabled"].clone()),
        (json!("cats"), json!("cat*"), json!(true))
    );
    assert_eq!(server.request(Method::DELETE, content_rule, Some(&alice), None).await.0, StatusCode::OK);

    // Initial sync carries them as account data.
    let (_, sync) = server.get("/_matrix/client/v3/sync", Some(&alice)).await;
    assert!(sync["account_data"]["events"].as_array().unwrap().iter().any(|e| e["type"] == "m.push_rules"));

    // Mute everything, then undo.
    let master = "/_matrix/client/v3/pushrules/global/override/.m.rule.master/enabled";
    assert_eq!(server.put(master, Some(&alice), json!({"enabled": true})).await.0, StatusCode::OK);
    assert_eq!(server.get(master, Some(&alice)).await.1["enabled"], true);
    assert_eq!(server.put(master, Some(&alice), json!({"enabled": false})).await.0, StatusCode::OK);

    // A rule of the user's own.
    let rule = "/_matrix/client/v3/pushrules/global/room/!abc:localhost";
    assert_eq!(server.put(rule, Some(&alice), json!({"actions": []})).await.0, StatusCode::OK);
    let (status, got) = server.get(rule, Some(&alice)).await;
    assert_eq!((status, got["rule_id"].clone()), (StatusCode::OK, json!("!abc:localhost")));
    assert_eq!(server.request(Method::DELETE, rule, Some(&alice), None).await.0, StatusCode::OK);
    assert_error(&server.get(rule, Some(&alice)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    assert_error(
        &server
            .put(
                "/_matrix/client/v3/pushrules/global/override/.m.rule.nope/enabled",
                Some(&alice),
                json!({"enabled": true}),
            )
            .await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );

    let (status, pushers) = server.get("/_matrix/client/v3/pushers", Some(&alice)).await;
    assert_eq!((status, pushers), (StatusCode::OK, json!({"pushers": []})));
    let (status, protocols) = server.get("/_matrix/client/v3/thirdparty/protocols", Some(&alice)).await;
    assert_eq!((status, protocols), (StatusCode::OK, json!({})));
    server.stop().await;
}

/// Bob's unread counts in a room, from a fresh initial sync.
async fn counts(server: &TestServer, token: &str, room_id: &str) -> (u64, u64) {
    let sync = server.sync(token, None, "").await;
    let unread = &sync["rooms"]["join"][room_id]["unread_notifications"];
    (unread["notification_count"].as_u64().unwrap(), unread["highlight_count"].as_u64().unwrap())
}

async fn unread_counts_follow_push_rules(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    let room_id = server.create_room(&alice, json!({"invite": ["@bob:localhost"]})).await;
    server.join(&bob, &room_id).await;
    let send = |txn: &str| format!("/_matrix/client/v3/rooms/{room_id}/send/m.room.message/{txn}");

    // A plain message notifies; a mention of bob and an @room by the admin highlight.
    let plain = server.send_text(&alice, &room_id, "hello all").await;
    assert_eq!(counts(&server, &bob, &room_id).await, (1, 0));
    let mention = json!({"msgtype": "m.text", "body": "bob: look", "m.mentions": {"user_ids": ["@bob:localhost"]}});
    assert_eq!(server.put(&send("m1"), Some(&alice), mention).await.0, StatusCode::OK);
    let at_room = json!({"msgtype": "m.text", "body": "@room lunch", "m.mentions": {"room": true}});
    assert_eq!(server.put(&send("m2"), Some(&alice), at_room).await.0, StatusCode::OK);
    assert_eq!(counts(&server, &bob, &room_id).await, (3, 2));
    // Nothing the user sends counts for themselves.
    assert_eq!(counts(&server, &alice, &room_id).await, (0, 0));
    // Without power, bob's @room is a plain notification for alice.
    let at_room = json!({"msgtype": "m.text", "body": "@room me too", "m.mentions": {"room": true}});
    assert_eq!(server.put(&send("b1"), Some(&bob), at_room).await.0, StatusCode::OK);
    assert_eq!(counts(&server, &alice, &room_id).await, (1, 0));

    // A redacted message no longer counts.
    let (status, _) =
        server.put(&format!("/_matrix/client/v3/rooms/{room_id}/redact/{plain}/r1"), Some(&alice), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(counts(&server, &bob, &room_id).await, (2, 2));

    // Bob turns on the master rule (mutes everything): new messages do not count.
    let (status, _) = server
        .put(
            "/_matrix/client/v3/pushrules/global/override/.m.rule.master/enabled",
            Some(&bob),
            json!({"enabled": true}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let last = server.send_text(&alice, &room_id, "muted for bob").await;
    assert_eq!(counts(&server, &bob, &room_id).await, (2, 2));

    // Reading up to the last event clears the counts.
    let (status, _) =
        server.post(&format!("/_matrix/client/v3/rooms/{room_id}/receipt/m.read/{last}"), Some(&bob), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(counts(&server, &bob, &room_id).await, (0, 0));
    server.stop().await;
}

async fn turn_server_credentials(backend: Backend) {
    // Without a TURN server: `{}`, as clients expect.
    let server = TestServer::start(backend.clone()).await;
    let (_, alice, _) = server.register("alice").await;
    let (status, body) = server.get("/_matrix/client/v3/voip/turnServer", Some(&alice)).await;
    assert_eq!((status, body), (StatusCode::OK, json!({})));
    assert_error(
        &server.get("/_matrix/client/v3/voip/turnServer", None).await,
        StatusCode::UNAUTHORIZED,
        "M_MISSING_TOKEN",
    );
    server.stop().await;

    // With a shared secret: per-user credentials that the TURN server can check alone.
    let server = TestServer::start_with(backend, |c| {
        c.voip.turn_uris = vec!["turn:turn.example.org:3478?transport=udp".into()];
        c.voip.turn_shared_secret = "s3cret".into();
        c.voip.turn_user_lifetime_ms = 3_600_000;
    })
    .await;
    let (alice_id, alice, _) = server.register("alice").await;
    let (status, body) = server.get("/_matrix/client/v3/voip/turnServer", Some(&alice)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["uris"], json!(["turn:turn.example.org:3478?transport=udp"]));
    assert_eq!(body["ttl"], 3600);
    let username = body["username"].as_str().unwrap();
    let (expiry, user) = username.split_once(':').unwrap();
    assert_eq!(user, alice_id);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let expiry: u64 = expiry.parse().unwrap();
    assert!(expiry > now + 3500 && expiry <= now + 3601, "expiry {expiry}, now {now}");
    use base64::Engine;
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(b"s3cret").unwrap();
    mac.update(username.as_bytes());
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    assert_eq!(body["password"], expected.as_str());
    server.stop().await;
}

async fn concurrent_push_rule_changes_all_survive(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let paths: Vec<String> =
        (0..10).map(|i| format!("/_matrix/client/v3/pushrules/global/room/!r{i}:localhost")).collect();
    let puts = paths.iter().map(|p| server.put(p, Some(&alice), json!({"actions": []})));
    for (status, body) in futures_util::future::join_all(puts).await {
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (_, rules) = server.get("/_matrix/client/v3/pushrules/", Some(&alice)).await;
    let mut ids: Vec<&str> =
        rules["global"]["room"].as_array().unwrap().iter().map(|r| r["rule_id"].as_str().unwrap()).collect();
    ids.sort();
    let mut expected: Vec<String> = (0..10).map(|i| format!("!r{i}:localhost")).collect();
    expected.sort();
    assert_eq!(ids, expected.iter().map(String::as_str).collect::<Vec<_>>(), "{rules}");
    server.stop().await;
}

backend_tests!(
    push_rules_start_from_defaults_and_change,
    unread_counts_follow_push_rules,
    turn_server_credentials,
    concurrent_push_rule_changes_all_survive
);
