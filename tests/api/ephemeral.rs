//! Presence visibility and typing notices.

use reqwest::StatusCode;
use serde_json::json;

use crate::{
    backend_tests,
    common::{Backend, TestServer, assert_error},
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

backend_tests!(presence_of_strangers_is_refused, typing_notices_start_no_task_each);
