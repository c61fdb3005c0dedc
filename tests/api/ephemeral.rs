//! Presence visibility and typing notices.

use reqwest::StatusCode;
use serde_json::json;

use crate::{
    backend_tests,
    common::{Backend, TestServer, assert_error, urlencode},
};

fn status_path(user: &str) -> String {
    format!("/_matrix/client/v3/presence/{user}/status")
}

async fn presence_of_strangers_is_refused(backend: Backend) {
    let server = TestServer::start(backend.clone()).await;
    let (alice_id, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    let (status, body) = server
        .put(&status_path(&alice_id), Some(&alice), json!({"presence": "online", "status_msg": "at the zoo"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Her own presence, always.
    let (status, own) = server.get(&status_path(&alice_id), Some(&alice)).await;
    assert_eq!((status, own["status_msg"].clone()), (StatusCode::OK, json!("at the zoo")), "{own}");
    // Bob shares no room with her: refused, and no word of where she is.
    let refused = server.get(&status_path(&alice_id), Some(&bob)).await;
    assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    assert!(refused.1.get("status_msg").is_none(), "{}", refused.1);
    // Nor does a user who does not exist answer differently (no probing for accounts).
    assert_error(
        &server.get(&status_path("@nobody:localhost"), Some(&bob)).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );

    // In a room together: served.
    let room = server.create_room(&alice, json!({"invite": ["@bob:localhost"]})).await;
    assert_error(&server.get(&status_path(&alice_id), Some(&bob)).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    server.join(&bob, &room).await;
    let (status, seen) = server.get(&status_path(&alice_id), Some(&bob)).await;
    assert_eq!(
        (status, seen["presence"].clone(), seen["status_msg"].clone()),
        (StatusCode::OK, json!("online"), json!("at the zoo"))
    );
    // Once he leaves, refused again.
    let (status, _) = server.post(&format!("/_matrix/client/v3/rooms/{room}/leave"), Some(&bob), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_error(&server.get(&status_path(&alice_id), Some(&bob)).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    server.stop().await;

    // A server that shares presence with everyone.
    let server = TestServer::start_with(backend, |c| c.presence.visible_without_shared_room = true).await;
    let (alice_id, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    server.put(&status_path(&alice_id), Some(&alice), json!({"presence": "online", "status_msg": "hi"})).await;
    let (status, seen) = server.get(&status_path(&alice_id), Some(&bob)).await;
    assert_eq!((status, seen["status_msg"].clone()), (StatusCode::OK, json!("hi")));
    assert_error(
        &server.get(&status_path("@nobody:localhost"), Some(&bob)).await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );
    server.stop().await;
}

async fn typing_notices_start_no_task_each(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_id, alice, _) = server.register("alice").await;
    let room = server.create_room(&alice, json!({})).await;
    let typing = format!("/_matrix/client/v3/rooms/{room}/typing/{alice_id}");
    let put = || server.put(&typing, Some(&alice), json!({"typing": true, "timeout": 120000}));
    assert_eq!(put().await.0, StatusCode::OK);
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    for _ in 0..100 {
        let (status, body) = put().await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let after = metrics.num_alive_tasks();
    assert!(after <= before + 5, "100 typing notices left {} more tasks", after.saturating_sub(before));
    assert_eq!(server.running.as_ref().unwrap().services.typing.active(), 1);

    // Not in the room, or someone else's typing: refused.
    let (_, bob, _) = server.register("bob").await;
    assert_error(
        &server
            .put(
                &format!("/_matrix/client/v3/rooms/{room}/typing/@bob:localhost"),
                Some(&bob),
                json!({"typing": true, "timeout": 1000}),
            )
            .await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    assert_error(
        &server.put(&typing, Some(&bob), json!({"typing": true, "timeout": 1000})).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    server.stop().await;
}

/// A sync carries the presence of everyone who shares a room with the user, each as its
/// own `m.presence` event with the spec's fields, never a stranger's; the filter's
/// `presence.not_senders` is honoured.
async fn sync_carries_the_presence_of_room_peers_only(backend: Backend) {
    let server = TestServer::start(backend.clone()).await;
    let (_, alice, _) = server.register("alice").await;
    let room_id = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    let since = server.sync(&alice, None, "").await["next_batch"].as_str().unwrap().to_owned();
    let mut peers = Vec::new();
    for i in 0..12 {
        let (id, token, _) = server.register(&format!("peer{i}")).await;
        server.join(&token, &room_id).await;
        peers.push((id, token));
    }
    let (stranger_id, stranger, _) = server.register("stranger").await;
    server.sync(&stranger, None, "").await;
    // The first peer goes away with a message; the others come online by syncing.
    let (away_id, away) = &peers[0];
    let away_status = json!({"presence": "unavailable", "status_msg": "lunch"});
    assert_eq!(server.put(&status_path(away_id), Some(away), away_status).await.0, StatusCode::OK);
    for (_, token) in &peers[1..] {
        server.sync(token, None, "").await;
    }
    let (muted_id, _) = &peers[1];
    let filter = json!({"presence": {"not_senders": [muted_id]}}).to_string();
    let extra = format!("timeout=0&filter={}", urlencode(&filter));
    let sync = server.sync(&alice, Some(&since), &extra).await;
    let events = sync["presence"]["events"].as_array().unwrap();
    let mut senders: Vec<&str> = events.iter().map(|e| e["sender"].as_str().unwrap()).collect();
    senders.sort_unstable();
    let mut expected: Vec<&str> = peers.iter().map(|(id, _)| id.as_str()).filter(|id| id != muted_id).collect();
    expected.sort_unstable();
    assert_eq!(senders, expected, "every peer but the filtered one, once, and not {stranger_id}");
    for event in events {
        assert_eq!(event["type"], "m.presence", "{event}");
        let content = &event["content"];
        assert!(content["last_active_ago"].as_i64().is_some_and(|ago| ago >= 0), "{event}");
        if event["sender"] == away_id.as_str() {
            assert_eq!(content["presence"], "unavailable", "{event}");
            assert_eq!(content["currently_active"], false, "{event}");
            assert_eq!(content["status_msg"], "lunch", "{event}");
        } else {
            assert_eq!(content["presence"], "online", "{event}");
            assert_eq!(content["currently_active"], true, "{event}");
            assert!(content.get("status_msg").is_none(), "no message, no key: {event}");
        }
    }
    server.stop().await;
}

backend_tests!(
    presence_of_strangers_is_refused,
    typing_notices_start_no_task_each,
    sync_carries_the_presence_of_room_peers_only
);
