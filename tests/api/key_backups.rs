//! Server-side key backups: versions, keys at the three levels, the replacement rule,
//! the current version, and parallel uploads.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::{
    backend_tests,
    common::{Backend, TestServer, assert_error},
};

const MEGOLM: &str = "m.megolm_backup.v1.curve25519-aes-sha2";

fn algorithm(public_key: &str) -> Value {
    json!({"algorithm": MEGOLM, "auth_data": {"public_key": public_key, "signatures": {}}})
}

/// Key data with the three fields the replacement rule reads; `tag` marks which
/// upload a stored key came from.
fn key(first_message_index: u64, forwarded_count: u64, is_verified: bool, tag: &str) -> Value {
    json!({
        "first_message_index": first_message_index,
        "forwarded_count": forwarded_count,
        "is_verified": is_verified,
        "session_data": {"ephemeral": "ZXBo", "ciphertext": tag, "mac": "bWFj"},
    })
}

async fn create_version(server: &TestServer, token: &str, public_key: &str) -> String {
    let (status, body) = server.post("/_matrix/client/v3/room_keys/version", Some(token), algorithm(public_key)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["version"].as_str().unwrap().to_owned()
}

async fn put_session(server: &TestServer, token: &str, version: &str, room: &str, session: &str, data: Value) -> Value {
    let path = format!("/_matrix/client/v3/room_keys/keys/{room}/{session}?version={version}");
    let (status, body) = server.put(&path, Some(token), data).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn stored_tag(server: &TestServer, token: &str, version: &str, room: &str, session: &str) -> String {
    let path = format!("/_matrix/client/v3/room_keys/keys/{room}/{session}?version={version}");
    let (status, body) = server.get(&path, Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["session_data"]["ciphertext"].as_str().unwrap().to_owned()
}

async fn versions(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    let latest = "/_matrix/client/v3/room_keys/version";
    assert_error(&server.get(latest, Some(&alice)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");

    let v1 = create_version(&server, &alice, "key1").await;
    let (status, body) = server.get(latest, Some(&alice)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["version"], v1.as_str());
    assert_eq!(body["algorithm"], MEGOLM);
    assert_eq!(body["auth_data"]["public_key"], "key1");
    assert_eq!(body["count"], 0);
    assert!(body["etag"].is_string(), "{body}");
    // Bob sees none of alice's backups.
    assert_error(&server.get(latest, Some(&bob)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let by_version = format!("/_matrix/client/v3/room_keys/version/{v1}");
    assert_error(&server.get(&by_version, Some(&bob)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");

    // A second version becomes the latest; the first stays readable by its version.
    let v2 = create_version(&server, &alice, "key2").await;
    assert_ne!(v1, v2);
    assert_eq!(server.get(latest, Some(&alice)).await.1["version"], v2.as_str());
    assert_eq!(server.get(&by_version, Some(&alice)).await.1["auth_data"]["public_key"], "key1");

    // Update: auth_data changes; the algorithm and the version may not.
    let v2_path = format!("/_matrix/client/v3/room_keys/version/{v2}");
    let mut update = algorithm("key2b");
    assert_eq!(server.put(&v2_path, Some(&alice), update.clone()).await.0, StatusCode::OK);
    assert_eq!(server.get(&v2_path, Some(&alice)).await.1["auth_data"]["public_key"], "key2b");
    update["version"] = json!(v1);
    assert_error(&server.put(&v2_path, Some(&alice), update).await, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let other = json!({"algorithm": "org.example.other", "auth_data": {"public_key": "k"}});
    assert_error(&server.put(&v2_path, Some(&alice), other.clone()).await, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    assert_error(
        &server.put("/_matrix/client/v3/room_keys/version/99", Some(&alice), algorithm("k")).await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );
    // Only the spec's algorithms, with their auth_data, are accepted.
    assert_error(&server.post(latest, Some(&alice), other).await, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let no_key = json!({"algorithm": MEGOLM, "auth_data": {}});
    assert_error(&server.post(latest, Some(&alice), no_key).await, StatusCode::BAD_REQUEST, "M_BAD_JSON");

    // Delete: the latest falls back to v1; deleting again succeeds; unknown is 404.
    assert_eq!(server.request(Method::DELETE, &v2_path, Some(&alice), None).await.0, StatusCode::OK);
    assert_error(&server.get(&v2_path, Some(&alice)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    assert_eq!(server.get(latest, Some(&alice)).await.1["version"], v1.as_str());
    assert_eq!(server.request(Method::DELETE, &v2_path, Some(&alice), None).await.0, StatusCode::OK);
    let unknown = server.request(Method::DELETE, "/_matrix/client/v3/room_keys/version/77", Some(&alice), None).await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let junk = server.get("/_matrix/client/v3/room_keys/version/abc", Some(&alice)).await;
    assert_error(&junk, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    // A new version never reuses a deleted one's number.
    let v3 = create_version(&server, &alice, "key3").await;
    assert!(v3 != v2 && v3 != v1, "{v1} {v2} {v3}");
    server.stop().await;
}

async fn keys_at_three_levels(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let version = create_version(&server, &alice, "pk").await;
    let (r1, r2) = ("!one:localhost", "!two:localhost");
    let all = format!("/_matrix/client/v3/room_keys/keys?version={version}");
    let upload = json!({"rooms": {
        r1: {"sessions": {"s1": key(0, 0, false, "a"), "s2": key(0, 0, false, "b")}},
        r2: {"sessions": {"s3": key(0, 0, false, "c")}},
    }});
    let (status, body) = server.put(&all, Some(&alice), upload).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["count"], 3, "{body}");
    let etag1 = body["etag"].as_str().unwrap().to_owned();
    let info = server.get(&format!("/_matrix/client/v3/room_keys/version/{version}"), Some(&alice)).await.1;
    assert_eq!((info["count"].clone(), info["etag"].clone()), (json!(3), json!(etag1)), "{info}");

    // Room level.
    let room = format!("/_matrix/client/v3/room_keys/keys/{r2}?version={version}");
    let body = put_room(&server, &alice, &room, json!({"sessions": {"s4": key(1, 0, false, "d")}})).await;
    assert_eq!(body["count"], 4, "{body}");
    assert_ne!(body["etag"], etag1.as_str(), "new keys change the etag");
    // Session level.
    let body = put_session(&server, &alice, &version, r1, "s5", key(0, 0, false, "e")).await;
    assert_eq!(body["count"], 5, "{body}");

    let (_, got) = server.get(&all, Some(&alice)).await;
    assert_eq!(got["rooms"][r1]["sessions"].as_object().unwrap().len(), 3, "{got}");
    assert_eq!(got["rooms"][r2]["sessions"]["s4"]["session_data"]["ciphertext"], "d", "{got}");
    assert_eq!(got["rooms"][r2]["sessions"]["s4"]["first_message_index"], 1, "{got}");
    let (_, got) = server.get(&room, Some(&alice)).await;
    assert_eq!(got["sessions"].as_object().unwrap().keys().collect::<Vec<_>>(), ["s3", "s4"], "{got}");
    let empty = format!("/_matrix/client/v3/room_keys/keys/!none:localhost?version={version}");
    assert_eq!(server.get(&empty, Some(&alice)).await.1, json!({"sessions": {}}));
    let missing = format!("/_matrix/client/v3/room_keys/keys/{r1}/nope?version={version}");
    assert_error(&server.get(&missing, Some(&alice)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let wrong = "/_matrix/client/v3/room_keys/keys?version=42";
    assert_error(&server.get(wrong, Some(&alice)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");

    // Deletes at each level answer the new count.
    let session = format!("/_matrix/client/v3/room_keys/keys/{r1}/s5?version={version}");
    let (status, body) = server.request(Method::DELETE, &session, Some(&alice), None).await;
    assert_eq!((status, body["count"].clone()), (StatusCode::OK, json!(4)), "{body}");
    assert_error(&server.get(&session, Some(&alice)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let (_, body) = server.request(Method::DELETE, &room, Some(&alice), None).await;
    assert_eq!(body["count"], 2, "{body}");
    let (_, body) = server.request(Method::DELETE, &all, Some(&alice), None).await;
    assert_eq!(body["count"], 0, "{body}");
    assert_eq!(server.get(&all, Some(&alice)).await.1, json!({"rooms": {}}));
    server.stop().await;
}

async fn put_room(server: &TestServer, token: &str, path: &str, body: Value) -> Value {
    let (status, body) = server.put(path, Some(token), body).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn replacement_rule(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let v = create_version(&server, &alice, "pk").await;
    let r = "!room:localhost";
    put_session(&server, &alice, &v, r, "s", key(5, 2, false, "first")).await;
    // Worse on every count: kept out; the etag does not move.
    let before = put_session(&server, &alice, &v, r, "s", key(5, 2, false, "same")).await;
    let after = put_session(&server, &alice, &v, r, "s", key(6, 0, false, "higher-index")).await;
    assert_eq!(before["etag"], after["etag"], "nothing changed");
    assert_eq!(stored_tag(&server, &alice, &v, r, "s").await, "first");
    // A lower forwarded_count with the same index wins.
    put_session(&server, &alice, &v, r, "s", key(5, 1, false, "fewer-forwards")).await;
    assert_eq!(stored_tag(&server, &alice, &v, r, "s").await, "fewer-forwards");
    // A lower first_message_index wins even with more forwards.
    put_session(&server, &alice, &v, r, "s", key(3, 9, false, "lower-index")).await;
    assert_eq!(stored_tag(&server, &alice, &v, r, "s").await, "lower-index");
    // A verified key wins over an unverified one whatever its index...
    put_session(&server, &alice, &v, r, "s", key(50, 9, true, "verified")).await;
    assert_eq!(stored_tag(&server, &alice, &v, r, "s").await, "verified");
    // ... and an unverified one never replaces it.
    put_session(&server, &alice, &v, r, "s", key(0, 0, false, "unverified")).await;
    assert_eq!(stored_tag(&server, &alice, &v, r, "s").await, "verified");
    put_session(&server, &alice, &v, r, "s", key(10, 9, true, "verified-lower")).await;
    assert_eq!(stored_tag(&server, &alice, &v, r, "s").await, "verified-lower");
    // Malformed key data is refused.
    let path = format!("/_matrix/client/v3/room_keys/keys/{r}/s?version={v}");
    let bad = json!({"first_message_index": -1, "forwarded_count": 0, "is_verified": false, "session_data": {}});
    assert_error(&server.put(&path, Some(&alice), bad).await, StatusCode::BAD_REQUEST, "M_BAD_JSON");
    server.stop().await;
}

async fn only_the_current_version_takes_keys(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let r = "!room:localhost";
    // No backup at all: not found.
    let path = |v: &str| format!("/_matrix/client/v3/room_keys/keys/{r}/s?version={v}");
    assert_error(
        &server.put(&path("1"), Some(&alice), key(0, 0, false, "x")).await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );
    let v1 = create_version(&server, &alice, "pk1").await;
    put_session(&server, &alice, &v1, r, "s", key(0, 0, false, "in-v1")).await;
    let v2 = create_version(&server, &alice, "pk2").await;
    for old in [v1.as_str(), "999", "junk"] {
        let result = server.put(&path(old), Some(&alice), key(0, 0, false, "late")).await;
        assert_error(&result, StatusCode::FORBIDDEN, "M_WRONG_ROOM_KEYS_VERSION");
        assert_eq!(result.1["current_version"], v2.as_str(), "{}", result.1);
    }
    // The old version's keys are still readable, and untouched.
    assert_eq!(stored_tag(&server, &alice, &v1, r, "s").await, "in-v1");
    // Deleting the current version makes the previous one current again.
    let v2_path = format!("/_matrix/client/v3/room_keys/version/{v2}");
    assert_eq!(server.request(Method::DELETE, &v2_path, Some(&alice), None).await.0, StatusCode::OK);
    put_session(&server, &alice, &v1, r, "t", key(0, 0, false, "again")).await;
    server.stop().await;
}

async fn parallel_uploads_lose_nothing(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let v = create_version(&server, &alice, "pk").await;
    let r = "!room:localhost";
    // Twenty uploads at once: each brings its own session, and all of them a key for
    // the shared session, of which the one with index 0 (upload 7) is the best.
    let all = format!("/_matrix/client/v3/room_keys/keys?version={v}");
    let uploads = (0..20u64).map(|i| {
        let index = if i == 7 { 0 } else { 10 + i };
        let body = json!({"rooms": {r: {"sessions": {
            format!("own{i}"): key(0, 0, false, &format!("own{i}")),
            "shared": key(index, 0, false, &format!("shared{i}")),
        }}}});
        server.put(&all, Some(&alice), body)
    });
    let results = futures_util::future::join_all(uploads).await;
    for (status, body) in &results {
        assert_eq!(*status, StatusCode::OK, "{body}");
    }
    let (_, got) = server.get(&all, Some(&alice)).await;
    let sessions = got["rooms"][r]["sessions"].as_object().unwrap();
    assert_eq!(sessions.len(), 21, "{got}");
    assert_eq!(sessions["shared"]["session_data"]["ciphertext"], "shared7", "{got}");
    let info = server.get(&format!("/_matrix/client/v3/room_keys/version/{v}"), Some(&alice)).await.1;
    assert_eq!(info["count"], 21, "{info}");
    server.stop().await;
}

async fn upload_racing_version_delete(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    // Uploads into a version while it is deleted: each upload either lands before the
    // delete or is refused as for a version that is gone (never a 500, no deadlock),
    // and the version stays deleted.
    for round in 0..5 {
        let v = create_version(&server, &alice, &format!("pk{round}")).await;
        let all = format!("/_matrix/client/v3/room_keys/keys?version={v}");
        let uploads = (0..5).map(|i| {
            let body = json!({"rooms": {"!r:localhost": {"sessions": {format!("s{i}"): key(0, 0, false, "x")}}}});
            server.put(&all, Some(&alice), body)
        });
        let delete_path = format!("/_matrix/client/v3/room_keys/version/{v}");
        let delete = server.request(Method::DELETE, &delete_path, Some(&alice), None);
        let (results, deleted) = tokio::join!(futures_util::future::join_all(uploads), delete);
        assert_eq!(deleted.0, StatusCode::OK, "{}", deleted.1);
        for (status, body) in results {
            assert!(
                status == StatusCode::OK || status == StatusCode::NOT_FOUND || status == StatusCode::FORBIDDEN,
                "{status} {body}"
            );
        }
        assert_error(&server.get(&all, Some(&alice)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    }
    server.stop().await;
}

backend_tests!(
    versions,
    keys_at_three_levels,
    replacement_rule,
    only_the_current_version_takes_keys,
    parallel_uploads_lose_nothing,
    upload_racing_version_delete,
);
