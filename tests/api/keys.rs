//! End-to-end encryption keys: upload, query, claim, and the counts in `/sync`.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{
    backend_tests,
    common::{Backend, TestServer, assert_error},
};

/// Device keys as a client uploads them (fixed, well-formed key strings; the signature
/// is not checked by these tests). Shared by the tests that upload keys.
pub(crate) fn device_keys(user: &str, device: &str) -> Value {
    json!({
        "user_id": user,
        "device_id": device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            format!("curve25519:{device}"): "3C5BFWi2Y8MaVvjM8M22DBmh24PmgR0nPvJOIArzgyI",
            format!("ed25519:{device}"): "lEuiRJBit0IG6nUf5pUzWTUEsRVVe/HJkoKuEww9ULI",
        },
        "signatures": {user: {format!("ed25519:{device}"): "dSO80A01XiigH3uBiDVx/EjzaoycHcjq9lfQX0uWsqxl2giMIiSPR8a4d291W1ihKJL/a+myXS367WT6NAIcBA"}},
    })
}

fn otk(key: &str) -> Value {
    json!({"key": key, "signatures": {}})
}

async fn upload_query_claim(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_id, alice, alice_dev) = server.register("alice").await;
    let (bob_id, bob, _) = server.register("bob").await;

    // Upload: device keys, two one-time keys, a fallback key; the counts come back.
    let upload = json!({
        "device_keys": device_keys(&alice_id, &alice_dev),
        "one_time_keys": {"signed_curve25519:AAAAAQ": otk("one"), "signed_curve25519:AAAAAg": otk("two")},
        "fallback_keys": {"signed_curve25519:AAAAAw": {"key": "fallback", "fallback": true, "signatures": {}}},
    });
    let (status, body) = server.post("/_matrix/client/v3/keys/upload", Some(&alice), upload).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["one_time_key_counts"], json!({"signed_curve25519": 2}));
    let sync = server.sync(&alice, None, "").await;
    assert_eq!(sync["device_one_time_keys_count"], json!({"signed_curve25519": 2}), "{sync}");
    assert_eq!(sync["device_unused_fallback_key_types"], json!(["signed_curve25519"]));

    // Nobody publishes keys for another device or user.
    let other = json!({"device_keys": device_keys(&alice_id, "SOMEOTHER")});
    assert_error(
        &server.post("/_matrix/client/v3/keys/upload", Some(&alice), other).await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_PARAM",
    );
    let theirs = json!({"device_keys": device_keys(&alice_id, &alice_dev)});
    assert_error(
        &server.post("/_matrix/client/v3/keys/upload", Some(&bob), theirs).await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_PARAM",
    );
    assert_error(
        &server.post("/_matrix/client/v3/keys/upload", Some(&alice), json!({"device_keys": {"user_id": 5}})).await,
        StatusCode::BAD_REQUEST,
        "M_BAD_JSON",
    );

    // Query: bob gets alice's device keys as uploaded, signatures included.
    let (status, body) =
        server.post("/_matrix/client/v3/keys/query", Some(&bob), json!({"device_keys": {alice_id.clone(): []}})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["device_keys"][&alice_id][&alice_dev], device_keys(&alice_id, &alice_dev));
    let (_, body) = server
        .post("/_matrix/client/v3/keys/query", Some(&bob), json!({"device_keys": {alice_id.clone(): ["NOPE"]}}))
        .await;
    assert_eq!(body["device_keys"][&alice_id], json!({}));

    // Claim: each one-time key once, then the fallback key (again and again).
    let claim = json!({"one_time_keys": {alice_id.clone(): {alice_dev.clone(): "signed_curve25519"}}});
    let mut seen = Vec::new();
    for _ in 0..4 {
        let (status, body) = server.post("/_matrix/client/v3/keys/claim", Some(&bob), claim.clone()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let keys = body["one_time_keys"][&alice_id][&alice_dev].as_object().unwrap().clone();
        assert_eq!(keys.len(), 1);
        seen.push(keys.values().next().unwrap()["key"].as_str().unwrap().to_owned());
    }
    assert_eq!(seen, ["one", "two", "fallback", "fallback"]);
    let sync = server.sync(&alice, None, "").await;
    assert!(sync["device_one_time_keys_count"].as_object().is_none_or(|c| c.is_empty()), "{sync}");
    assert_eq!(sync["device_unused_fallback_key_types"], json!([]));
    // A device without keys, or an unknown one, gives nothing.
    let (_, body) = server
        .post(
            "/_matrix/client/v3/keys/claim",
            Some(&alice),
            json!({"one_time_keys": {bob_id: {"X": "signed_curve25519"}}}),
        )
        .await;
    assert_eq!(body["one_time_keys"], json!({}));

    // Logging out deletes the device and its keys.
    assert_eq!(server.post("/_matrix/client/v3/logout", Some(&alice), json!({})).await.0, StatusCode::OK);
    let (_, body) =
        server.post("/_matrix/client/v3/keys/query", Some(&bob), json!({"device_keys": {alice_id.clone(): []}})).await;
    assert_eq!(body["device_keys"][&alice_id], json!({}));
    server.stop().await;
}

fn to_device_events(sync: &Value) -> Vec<Value> {
    sync["to_device"]["events"].as_array().cloned().unwrap_or_default()
}

async fn send_to_device(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_id, alice, _) = server.register("alice").await;
    let (bob_id, bob, bob_dev) = server.register("bob").await;
    let (bob2, bob_dev2) = server.login("bob", None).await;
    let since = server.sync(&bob, None, "").await["next_batch"].as_str().unwrap().to_owned();
    let since2 = server.sync(&bob2, None, "").await["next_batch"].as_str().unwrap().to_owned();

    // A waiting sync of bob's first device wakes with the message for it.
    let path = |txn: &str| format!("/_matrix/client/v3/sendToDevice/m.room.encrypted/{txn}");
    let one = json!({"messages": {bob_id.clone(): {bob_dev.clone(): {"ciphertext": "for device one"}}}});
    let waiting = {
        let (http, base, bob, since) = (server.http.clone(), server.base.clone(), bob.clone(), since.clone());
        tokio::spawn(async move {
            http.get(format!("{base}/_matrix/client/v3/sync?since={since}&timeout=10000"))
                .bearer_auth(bob)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    server.wait_for_waiting_syncs(&bob_id, 1).await;
    let started = std::time::Instant::now();
    assert_eq!(server.put(&path("t1"), Some(&alice), one.clone()).await.0, StatusCode::OK);
    let sync = waiting.await.unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "woken by the message, not by its timeout");
    let events = to_device_events(&sync);
    assert_eq!(events.len(), 1, "{sync}");
    assert_eq!(
        (&events[0]["sender"], &events[0]["type"], &events[0]["content"]["ciphertext"]),
        (&json!(alice_id), &json!("m.room.encrypted"), &json!("for device one"))
    );
    // Until acknowledged (by syncing from a later token), a message is delivered again.
    let replay = server.sync(&bob, Some(&since), "").await;
    assert_eq!(to_device_events(&replay).len(), 1);
    // The same transaction again is not delivered twice, and acknowledged messages go.
    assert_eq!(server.put(&path("t1"), Some(&alice), one).await.0, StatusCode::OK);
    let next = sync["next_batch"].as_str().unwrap().to_owned();
    let again = server.sync(&bob, Some(&next), "timeout=300").await;
    assert!(to_device_events(&again).is_empty(), "{again}");
    let replay = server.sync(&bob, Some(&since), "").await;
    assert!(to_device_events(&replay).is_empty(), "deleted once acknowledged: {replay}");
    // The other device got nothing of it.
    let other = server.sync(&bob2, Some(&since2), "timeout=300").await;
    assert!(to_device_events(&other).is_empty(), "{other}");

    // `*` reaches every device of the user.
    let all = json!({"messages": {bob_id.clone(): {"*": {"hello": "all"}}}});
    assert_eq!(server.put("/_matrix/client/v3/sendToDevice/m.dummy/t2", Some(&alice), all).await.0, StatusCode::OK);
    for (token, since) in [(&bob, &next), (&bob2, &since2)] {
        let sync = server.sync(token, Some(since), "timeout=5000").await;
        let events = to_device_events(&sync);
        assert_eq!(events.len(), 1, "{sync}");
        assert_eq!(events[0]["content"]["hello"], "all");
    }
    let _ = bob_dev2;
    server.stop().await;
}

fn changed(sync: &Value) -> Vec<String> {
    let list = sync["device_lists"]["changed"].as_array().cloned().unwrap_or_default();
    list.iter().map(|u| u.as_str().unwrap().to_owned()).collect()
}

async fn device_lists(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_id, alice, alice_dev) = server.register("alice").await;
    let (bob_id, bob, _) = server.register("bob").await;
    let (carol_id, carol, carol_dev) = server.register("carol").await;
    let room_id = server.create_room(&alice, json!({"invite": [bob_id.clone()]})).await;
    server.join(&bob, &room_id).await;
    let since = server.sync(&bob, None, "").await["next_batch"].as_str().unwrap().to_owned();

    // Alice publishes her device keys: bob's waiting sync wakes and names her.
    let waiting = {
        let (http, base, bob, since) = (server.http.clone(), server.base.clone(), bob.clone(), since.clone());
        tokio::spawn(async move {
            let url = format!("{base}/_matrix/client/v3/sync?since={since}&timeout=10000");
            http.get(url).bearer_auth(bob).send().await.unwrap().json::<Value>().await.unwrap()
        })
    };
    server.wait_for_waiting_syncs(&bob_id, 1).await;
    let started = std::time::Instant::now();
    let upload = json!({"device_keys": device_keys(&alice_id, &alice_dev)});
    assert_eq!(server.post("/_matrix/client/v3/keys/upload", Some(&alice), upload).await.0, StatusCode::OK);
    // Carol shares no room with bob: her keys are none of his business.
    let upload = json!({"device_keys": device_keys(&carol_id, &carol_dev)});
    assert_eq!(server.post("/_matrix/client/v3/keys/upload", Some(&carol), upload).await.0, StatusCode::OK);
    let sync = waiting.await.unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "woken by the upload, not by its timeout");
    assert_eq!(changed(&sync), vec![alice_id.clone()], "{sync}");
    let next = sync["next_batch"].as_str().unwrap().to_owned();

    // A device going away is a change too; /keys/changes tells the same for a span.
    let (token2, _) = server.login("alice", None).await;
    assert_eq!(server.post("/_matrix/client/v3/logout", Some(&token2), json!({})).await.0, StatusCode::OK);
    let sync = server.sync(&bob, Some(&next), "timeout=5000").await;
    assert_eq!(changed(&sync), vec![alice_id.clone()], "{sync}");
    let to = sync["next_batch"].as_str().unwrap();
    let (status, body) = server.get(&format!("/_matrix/client/v3/keys/changes?from={since}&to={to}"), Some(&bob)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["changed"], json!([alice_id]));
    // Nothing new: no device_lists at all.
    let quiet = server.sync(&bob, Some(to), "timeout=300").await;
    assert!(changed(&quiet).is_empty(), "{quiet}");
    server.stop().await;
}

fn cross_key(user: &str, usage: &str, public: &str) -> Value {
    json!({"user_id": user, "usage": [usage], "keys": {format!("ed25519:{public}"): public}})
}

async fn cross_signing(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_id, alice, alice_dev) = server.register("alice").await;
    let (bob_id, bob, _) = server.register("bob").await;
    let upload = json!({"device_keys": device_keys(&alice_id, &alice_dev)});
    assert_eq!(server.post("/_matrix/client/v3/keys/upload", Some(&alice), upload).await.0, StatusCode::OK);

    // The first master key needs no password; the keys must be alice's own.
    let path = "/_matrix/client/v3/keys/device_signing/upload";
    let keys = json!({
        "master_key": cross_key(&alice_id, "master", "MASTERpub"),
        "self_signing_key": cross_key(&alice_id, "self_signing", "SELFpub"),
        "user_signing_key": cross_key(&alice_id, "user_signing", "USERpub"),
    });
    let wrong = json!({"master_key": cross_key(&bob_id, "master", "X")});
    assert_error(&server.post(path, Some(&alice), wrong).await, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    assert_eq!(server.post(path, Some(&alice), keys.clone()).await.0, StatusCode::OK);
    // Replacing them takes the password.
    let (status, body) = server.post(path, Some(&alice), keys.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let mut with_auth = keys.clone();
    with_auth["auth"] = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"},
        "password": crate::common::PASSWORD, "session": body["session"]});
    assert_eq!(server.post(path, Some(&alice), with_auth).await.0, StatusCode::OK);

    // Bob sees alice's master and self-signing keys, not her user-signing key.
    let query = json!({"device_keys": {alice_id.clone(): []}});
    let (_, seen) = server.post("/_matrix/client/v3/keys/query", Some(&bob), query.clone()).await;
    assert_eq!(seen["master_keys"][&alice_id]["usage"], json!(["master"]));
    assert_eq!(seen["self_signing_keys"][&alice_id]["usage"], json!(["self_signing"]));
    assert!(seen["user_signing_keys"].get(&alice_id).is_none(), "{seen}");
    let (_, own) = server.post("/_matrix/client/v3/keys/query", Some(&alice), query.clone()).await;
    assert_eq!(own["user_signing_keys"][&alice_id]["usage"], json!(["user_signing"]));

    server.stop().await;
}

fn room<'a>(sync: &'a Value, room_id: &str) -> &'a Value {
    &sync["rooms"]["join"][room_id]
}

fn left(sync: &Value) -> Vec<String> {
    let list = sync["device_lists"]["left"].as_array().cloned().unwrap_or_default();
    list.iter().map(|u| u.as_str().unwrap().to_owned()).collect()
}

fn encrypted(invite: &[&str]) -> Value {
    json!({
        "invite": invite,
        "initial_state": [{"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}],
    })
}

/// `device_lists.left` names users with whom no encrypted room is shared any more
/// (they leave, or the user leaves); `/keys/changes` tells the same.
async fn device_lists_left(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_id, alice, _) = server.register("alice").await;
    let (bob_id, bob, _) = server.register("bob").await;
    let (carol_id, carol, _) = server.register("carol").await;
    let first = server.create_room(&alice, encrypted(&[&bob_id])).await;
    let second = server.create_room(&alice, encrypted(&[&bob_id])).await;
    let plain = server.create_room(&alice, json!({"invite": [bob_id.clone()]})).await;
    let carols = server.create_room(&carol, encrypted(&[&bob_id])).await;
    for room in [&first, &second, &plain, &carols] {
        server.join(&bob, room).await;
    }
    let start = server.sync(&bob, None, "").await["next_batch"].as_str().unwrap().to_owned();

    // Alice leaves one encrypted room: they still share the other.
    server.leave(&alice, &first).await;
    let sync = server.sync(&bob, Some(&start), "timeout=10000").await;
    assert!(left(&sync).is_empty(), "{sync}");
    // She leaves the other: only an unencrypted room is left in common.
    let since = sync["next_batch"].as_str().unwrap().to_owned();
    server.leave(&alice, &second).await;
    let sync = server.sync(&bob, Some(&since), "timeout=10000").await;
    assert_eq!(left(&sync), vec![alice_id.clone()], "{sync}");
    assert!(changed(&sync).is_empty(), "{sync}");
    let to = sync["next_batch"].as_str().unwrap().to_owned();
    let (status, body) = server.get(&format!("/_matrix/client/v3/keys/changes?from={start}&to={to}"), Some(&bob)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["left"], json!([alice_id]));
    // Alice's side: she left bob behind.
    let alice_sync = server.sync(&alice, Some(&start), "").await;
    assert_eq!(left(&alice_sync), vec![bob_id.clone()], "{alice_sync}");

    // Bob leaves carol's room, the only one they shared: she is left.
    server.leave(&bob, &carols).await;
    let sync = server.sync(&bob, Some(&to), "timeout=10000").await;
    assert_eq!(left(&sync), vec![carol_id.clone()], "{sync}");
    // Nothing more: no device_lists at all.
    let next = sync["next_batch"].as_str().unwrap().to_owned();
    let quiet = server.sync(&bob, Some(&next), "").await;
    assert!(quiet.get("device_lists").is_none_or(|d| d["left"].as_array().is_none_or(Vec::is_empty)), "{quiet}");
    server.stop().await;
}

/// `device_lists.changed` names users who newly share an encrypted room: the user
/// joins a room they are in, or a shared room turns encrypted.
async fn device_lists_new_encrypted_peers(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_id, alice, _) = server.register("alice").await;
    let (bob_id, bob, _) = server.register("bob").await;
    let (carol_id, carol, _) = server.register("carol").await;
    let plain = server.create_room(&alice, json!({"invite": [bob_id.clone()]})).await;
    server.join(&bob, &plain).await;
    let (dave_id, dave, _) = server.register("dave").await;
    let carols = server.create_room(&carol, encrypted(&[&bob_id, &dave_id])).await;
    let since = server.sync(&bob, None, "").await["next_batch"].as_str().unwrap().to_owned();

    // Bob joins carol's encrypted room: her devices are new to him.
    server.join(&bob, &carols).await;
    let sync = server.sync(&bob, Some(&since), "timeout=10000").await;
    assert_eq!(changed(&sync), vec![carol_id.clone()], "{sync}");
    assert!(left(&sync).is_empty(), "{sync}");
    // Dave joins it after bob: he is new to track.
    let since = sync["next_batch"].as_str().unwrap().to_owned();
    server.join(&dave, &carols).await;
    let sync = server.sync(&bob, Some(&since), "timeout=10000").await;
    assert_eq!(changed(&sync), vec![dave_id.clone()], "{sync}");
    // A profile change, bob's own or another's, is not a new join.
    let since = sync["next_batch"].as_str().unwrap().to_owned();
    for (user, token) in [(&bob_id, &bob), (&carol_id, &carol)] {
        let displayname = format!("/_matrix/client/v3/profile/{user}/displayname");
        assert_eq!(server.put(&displayname, Some(token), json!({"displayname": "New name"})).await.0, StatusCode::OK);
    }
    let sync = server.sync(&bob, Some(&since), "timeout=10000").await;
    assert!(room(&sync, &carols).is_object(), "the profile changes are in the sync: {sync}");
    assert!(changed(&sync).is_empty(), "{sync}");

    // The unencrypted room shared with alice turns encrypted: she is new to track.
    let since = sync["next_batch"].as_str().unwrap().to_owned();
    let encryption = format!("/_matrix/client/v3/rooms/{plain}/state/m.room.encryption/");
    let (status, body) = server.put(&encryption, Some(&alice), json!({"algorithm": "m.megolm.v1.aes-sha2"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let sync = server.sync(&bob, Some(&since), "timeout=10000").await;
    assert_eq!(changed(&sync), vec![alice_id.clone()], "{sync}");
    server.stop().await;
}

async fn key_queries_and_claims_are_bounded(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_id, alice, alice_dev) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    let upload = json!({"device_keys": device_keys(&alice_id, &alice_dev)});
    assert_eq!(server.post("/_matrix/client/v3/keys/upload", Some(&alice), upload).await.0, StatusCode::OK);

    // Up to 1000 users in one query; alice's keys come back among them.
    let mut users: serde_json::Map<String, Value> = (0..999).map(|i| (format!("@u{i}:localhost"), json!([]))).collect();
    users.insert(alice_id.clone(), json!([]));
    let (status, body) = server.post("/_matrix/client/v3/keys/query", Some(&bob), json!({"device_keys": users})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["device_keys"][&alice_id][&alice_dev], device_keys(&alice_id, &alice_dev));
    assert_eq!(body["device_keys"].as_object().unwrap().len(), 1000);
    // One more is too many.
    users.insert("@one-more:localhost".into(), json!([]));
    assert_error(
        &server.post("/_matrix/client/v3/keys/query", Some(&bob), json!({"device_keys": users})).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "M_TOO_LARGE",
    );
    // So are more than 1000 named devices.
    let devices: Vec<String> = (0..1001).map(|i| format!("D{i}")).collect();
    assert_error(
        &server
            .post("/_matrix/client/v3/keys/query", Some(&bob), json!({"device_keys": {alice_id.clone(): devices}}))
            .await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "M_TOO_LARGE",
    );
    // And more than 1000 devices in one claim.
    let claims: serde_json::Map<String, Value> =
        (0..1001).map(|i| (format!("D{i}"), json!("signed_curve25519"))).collect();
    assert_error(
        &server
            .post("/_matrix/client/v3/keys/claim", Some(&bob), json!({"one_time_keys": {alice_id.clone(): claims}}))
            .await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "M_TOO_LARGE",
    );
    server.stop().await;
}

async fn parallel_claims_get_distinct_keys(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_id, alice, alice_dev) = server.register("alice").await;
    let (_, phone, phone_dev) = {
        let (token, device) = server.login("alice", None).await;
        (alice_id.clone(), token, device)
    };
    let (_, bob, _) = server.register("bob").await;
    for (token, device, prefix) in [(&alice, &alice_dev, "a"), (&phone, &phone_dev, "p")] {
        let one_time: serde_json::Map<String, Value> =
            (0..8).map(|i| (format!("signed_curve25519:{prefix}{i}"), otk(&format!("{prefix}{i}")))).collect();
        let upload = json!({
            "device_keys": device_keys(&alice_id, device),
            "one_time_keys": one_time,
            "fallback_keys": {format!("signed_curve25519:{prefix}F"): {"key": "fallback", "fallback": true, "signatures": {}}},
        });
        let (status, body) = server.post("/_matrix/client/v3/keys/upload", Some(token), upload).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // Eight claims at once, each for both devices: sixteen distinct one-time keys,
    // no fallback key while one-time keys are left.
    let claim = json!({"one_time_keys": {alice_id.clone(): {alice_dev.clone(): "signed_curve25519", phone_dev.clone(): "signed_curve25519"}}});
    let claims = (0..8).map(|_| server.post("/_matrix/client/v3/keys/claim", Some(&bob), claim.clone()));
    let mut keys = Vec::new();
    for (status, body) in futures_util::future::join_all(claims).await {
        assert_eq!(status, StatusCode::OK, "{body}");
        for device in [&alice_dev, &phone_dev] {
            let got = body["one_time_keys"][&alice_id][device].as_object().unwrap();
            assert_eq!(got.len(), 1, "{body}");
            keys.push(got.values().next().unwrap()["key"].as_str().unwrap().to_owned());
        }
    }
    keys.sort();
    let mut expected: Vec<String> = (0..8).flat_map(|i| [format!("a{i}"), format!("p{i}")]).collect();
    expected.sort();
    assert_eq!(keys, expected);
    // Then the fallback keys.
    let (_, body) = server.post("/_matrix/client/v3/keys/claim", Some(&bob), claim).await;
    let fallback = body["one_time_keys"][&alice_id][&alice_dev].as_object().unwrap();
    assert_eq!(fallback.values().next().unwrap()["key"], "fallback", "{body}");
    server.stop().await;
}

async fn first_master_key_is_set_once(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_id, alice, _) = server.register("alice").await;
    // Five first uploads at once, no password: one master key is set, the others are
    // asked for the password (they would replace it).
    let uploads = (0..5).map(|i| {
        let key = json!({"user_id": alice_id, "usage": ["master"], "keys": {format!("ed25519:M{i}"): format!("M{i}")}});
        server.post("/_matrix/client/v3/keys/device_signing/upload", Some(&alice), json!({"master_key": key}))
    });
    let results = futures_util::future::join_all(uploads).await;
    assert_eq!(results.iter().filter(|r| r.0 == StatusCode::OK).count(), 1, "{results:?}");
    for (status, body) in results.iter().filter(|r| r.0 != StatusCode::OK) {
        assert_eq!(*status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(body["flows"], json!([{"stages": ["m.login.password"]}]), "{body}");
    }
    server.stop().await;
}

async fn claimed_device_is_woken(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_id, alice, alice_dev) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    let upload = json!({
        "device_keys": device_keys(&alice_id, &alice_dev),
        "one_time_keys": {"signed_curve25519:AAAAAQ": otk("one"), "signed_curve25519:AAAAAg": otk("two")},
    });
    assert_eq!(server.post("/_matrix/client/v3/keys/upload", Some(&alice), upload).await.0, StatusCode::OK);
    let since = server.sync(&alice, None, "").await["next_batch"].as_str().unwrap().to_owned();
    let claim = json!({"one_time_keys": {alice_id.clone(): {alice_dev.clone(): "signed_curve25519"}}});

    // Alice's device waits for news; bob's claim wakes it with the new count.
    let waiting = {
        let (http, base, token, since) = (reqwest::Client::new(), server.base.clone(), alice.clone(), since.clone());
        tokio::spawn(async move {
            let url = format!("{base}/_matrix/client/v3/sync?since={since}&timeout=60000");
            http.get(url).bearer_auth(token).send().await.unwrap().json::<Value>().await.unwrap()
        })
    };
    server.wait_for_waiting_syncs(&alice_id, 1).await;
    let started = std::time::Instant::now();
    assert_eq!(server.post("/_matrix/client/v3/keys/claim", Some(&bob), claim.clone()).await.0, StatusCode::OK);
    let sync = tokio::time::timeout(std::time::Duration::from_secs(20), waiting)
        .await
        .expect("woken by the claim, not by its 60 s timeout")
        .unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    assert_eq!(sync["device_one_time_keys_count"], json!({"signed_curve25519": 1}), "{sync}");

    // A claim between two syncs: the next one answers at once.
    let since = sync["next_batch"].as_str().unwrap().to_owned();
    assert_eq!(server.post("/_matrix/client/v3/keys/claim", Some(&bob), claim).await.0, StatusCode::OK);
    let sync =
        tokio::time::timeout(std::time::Duration::from_secs(20), server.sync(&alice, Some(&since), "timeout=60000"))
            .await
            .expect("answered at once");
    assert!(sync["device_one_time_keys_count"].as_object().is_none_or(|c| c.is_empty()), "{sync}");
    // Nothing new after that: the sync waits its (short) timeout.
    let since = sync["next_batch"].as_str().unwrap().to_owned();
    let started = std::time::Instant::now();
    server.sync(&alice, Some(&since), "timeout=500").await;
    assert!(started.elapsed() >= std::time::Duration::from_millis(500), "a claim wakes a sync once");
    server.stop().await;
}

backend_tests!(
    claimed_device_is_woken,
    first_master_key_is_set_once,
    upload_query_claim,
    send_to_device,
    device_lists,
    cross_signing,
    device_lists_left,
    device_lists_new_encrypted_peers,
    key_queries_and_claims_are_bounded,
    parallel_claims_get_distinct_keys,
);
