//! Profiles.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::{
    backend_tests,
    common::{Backend, TestServer, assert_error},
};

async fn get_and_set_profile(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, token, _) = server.register("alice").await;
    let (_, bob_token, _) = server.register("bob").await;

    // The display name starts as the localpart; the profile is public.
    let (status, body) = server.get(&format!("/_matrix/client/v3/profile/{alice}"), None).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"displayname": "alice"})));

    let displayname = format!("/_matrix/client/v3/profile/{alice}/displayname");
    let avatar = format!("/_matrix/client/v3/profile/{alice}/avatar_url");
    assert_eq!(server.put(&displayname, Some(&token), json!({"displayname": "Alice Liddell"})).await.0, StatusCode::OK);
    assert_eq!(
        server.put(&avatar, Some(&token), json!({"avatar_url": "mxc://localhost/abcdef"})).await.0,
        StatusCode::OK
    );
    assert_eq!(server.get(&displayname, None).await.1, json!({"displayname": "Alice Liddell"}));
    assert_eq!(server.get(&avatar, Some(&bob_token)).await.1, json!({"avatar_url": "mxc://localhost/abcdef"}));
    assert_eq!(
        server.get(&format!("/_matrix/client/v3/profile/{alice}"), None).await.1,
        json!({"displayname": "Alice Liddell", "avatar_url": "mxc://localhost/abcdef"})
    );

    // Extended profile fields (spec 1.16).
    let tz = format!("/_matrix/client/v3/profile/{alice}/m.tz");
    assert_eq!(server.put(&tz, Some(&token), json!({"m.tz": "Europe/London"})).await.0, StatusCode::OK);
    assert_eq!(server.get(&tz, None).await.1, json!({"m.tz": "Europe/London"}));
    assert_eq!(server.request(Method::DELETE, &tz, Some(&token), None).await.0, StatusCode::OK);
    assert_error(&server.get(&tz, None).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");

    // Only the owner may change it.
    assert_error(
        &server.put(&displayname, Some(&bob_token), json!({"displayname": "Mallory"})).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    assert_error(
        &server.put(&displayname, None, json!({"displayname": "x"})).await,
        StatusCode::UNAUTHORIZED,
        "M_MISSING_TOKEN",
    );
    assert_error(
        &server.put(&displayname, Some(&token), json!({"displayname": "x".repeat(300)})).await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_PARAM",
    );
    assert_error(
        &server.put(&avatar, Some(&token), json!({"avatar_url": "https://example.org/a.png"})).await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_PARAM",
    );
    assert_error(
        &server.get("/_matrix/client/v3/profile/@nobody:localhost", None).await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );
    assert_eq!(server.get(&displayname, None).await.1, json!({"displayname": "Alice Liddell"}));
    server.stop().await;
}

async fn profile_changes_reach_rooms(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, token, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    let room = server.create_room(&token, json!({"invite": ["@bob:localhost"]})).await;
    server.join(&bob, &room).await;
    let path = format!("/_matrix/client/v3/profile/{alice}/displayname");
    assert_eq!(server.put(&path, Some(&token), json!({"displayname": "Queen Alice"})).await.0, StatusCode::OK);
    let (_, members) = server.get(&format!("/_matrix/client/v3/rooms/{room}/joined_members"), Some(&bob)).await;
    assert_eq!(members["joined"][&alice]["display_name"], "Queen Alice");
    let (_, member) =
        server.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/{alice}"), Some(&bob)).await;
    assert_eq!((member["membership"].clone(), member["displayname"].clone()), (json!("join"), json!("Queen Alice")));
    server.stop().await;
}

backend_tests!(get_and_set_profile, profile_changes_reach_rooms);
