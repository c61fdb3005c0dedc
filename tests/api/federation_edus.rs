//! EDUs and end-to-end encryption keys across two Convo servers: to-device messages,
//! key queries and claims of remote users, and a server that is down while messages
//! for it are queued.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{
    backend_tests,
    common::{Backend, TestServer},
    federation::{TRUSTING, federating, name, services},
    keys::device_keys,
};

/// Syncs (long-polling) until the device's to-device events are not empty, for at
/// most 20 s; answers them.
async fn wait_for_to_device(server: &TestServer, token: &str) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut since: Option<String> = None;
    loop {
        let sync = server.sync(token, since.as_deref(), "timeout=2000").await;
        let events = sync["to_device"]["events"].as_array().cloned().unwrap_or_default();
        if !events.is_empty() {
            return events;
        }
        assert!(Instant::now() < deadline, "no to-device message arrived within 20 s");
        since = sync["next_batch"].as_str().map(str::to_owned);
    }
}

/// Waits until `server`'s queue for `destination` is empty (at most 20 s).
async fn wait_for_empty_queue(server: &TestServer, destination: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while services(server).store.count_federation_outbox(destination).await.unwrap() > 0 {
        assert!(Instant::now() < deadline, "the queue for {destination} did not drain within 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn to_device_messages_reach_users_of_other_servers(backend: Backend) {
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend, TRUSTING).await;
    let (alice, alice_token, _) = a.register("alice").await;
    let (bob, bob_token, bob_device) = b.register("bob").await;
    let body = json!({"messages": {bob.clone(): {bob_device.clone(): {"secret": "for bob's device"}}}});
    let (status, answer) =
        a.put("/_matrix/client/v3/sendToDevice/m.room_key_request/txn1", Some(&alice_token), body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let events = wait_for_to_device(&b, &bob_token).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["sender"], alice.as_str());
    assert_eq!(events[0]["type"], "m.room_key_request");
    assert_eq!(events[0]["content"], json!({"secret": "for bob's device"}));
    wait_for_empty_queue(&a, name(&b).as_str()).await;

    // The same transaction id again sends nothing again.
    let (status, _) = a.put("/_matrix/client/v3/sendToDevice/m.room_key_request/txn1", Some(&alice_token), body).await;
    assert_eq!(status, StatusCode::OK);
    let again = json!({"messages": {bob.clone(): {"*": {"n": 2}}}});
    let (status, _) = a.put("/_matrix/client/v3/sendToDevice/m.dummy/txn2", Some(&alice_token), again).await;
    assert_eq!(status, StatusCode::OK);
    let first = b.sync(&bob_token, None, "").await;
    let since = first["next_batch"].as_str().unwrap().to_owned();
    let mut events = first["to_device"]["events"].as_array().cloned().unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !events.iter().any(|e| e["type"] == "m.dummy") {
        assert!(Instant::now() < deadline, "the second message did not arrive");
        let sync = b.sync(&bob_token, Some(&since), "timeout=2000").await;
        events.extend(sync["to_device"]["events"].as_array().cloned().unwrap_or_default());
    }
    let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(types.iter().filter(|t| **t == "m.room_key_request").count(), 1, "{events:?}");
    a.stop().await;
    b.stop().await;
}

async fn keys_of_remote_users_are_queried_and_claimed(backend: Backend) {
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend, TRUSTING).await;
    let (_, alice_token, _) = a.register("alice").await;
    let (bob, bob_token, bob_device) = b.register("bob").await;
    let upload = json!({
        "device_keys": device_keys(&bob, &bob_device),
        "one_time_keys": {"signed_curve25519:AAAAAQ": {"key": "one", "signatures": {}}},
    });
    let (status, body) = b.post("/_matrix/client/v3/keys/upload", Some(&bob_token), upload).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // A server nobody runs: reported in `failures`, the rest still answered.
    let gone = format!("@ghost:127.0.0.1:{}", free_port());
    let query = json!({"device_keys": {bob.clone(): [], gone.clone(): []}, "timeout": 5000});
    let (status, body) = a.post("/_matrix/client/v3/keys/query", Some(&alice_token), query).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["device_keys"][&bob][&bob_device], device_keys(&bob, &bob_device), "{body}");
    let gone_server = gone.split_once(':').unwrap().1;
    assert!(body["failures"][gone_server].is_object(), "{body}");
    assert!(body["failures"].get(name(&b).as_str()).is_none(), "{body}");

    let claim = json!({"one_time_keys": {bob.clone(): {bob_device.clone(): "signed_curve25519"}}});
    let (status, body) = a.post("/_matrix/client/v3/keys/claim", Some(&alice_token), claim.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["one_time_keys"][&bob][&bob_device]["signed_curve25519:AAAAAQ"]["key"], "one", "{body}");
    // Each one-time key is handed out once, across servers too.
    let (_, body) = a.post("/_matrix/client/v3/keys/claim", Some(&alice_token), claim).await;
    assert!(body["one_time_keys"].get(&bob).is_none_or(|d| d.get(&bob_device).is_none()), "{body}");
    a.stop().await;
    b.stop().await;
}

/// A copy of a remote user's device list is kept while a room is shared: fetched whole
/// (`user/devices`) at the first query, kept current by device list updates (so a
/// query is answered while the user's server is down), fetched again after an update
/// whose `prev_id` was missed, and marked stale when the user leaves.
async fn remote_device_lists_are_kept_current(backend: Backend) {
    use reqwest::Method;

    use crate::federation::{fed_request, sign};
    let a = federating(backend.clone(), TRUSTING).await;
    let mut b = federating(backend, TRUSTING).await;
    let (_, alice_token, _) = a.register("alice").await;
    let (bob, bob_token, bob_device) = b.register("bob").await;
    let (status, _) = b
        .post(
            "/_matrix/client/v3/keys/upload",
            Some(&bob_token),
            json!({"device_keys": device_keys(&bob, &bob_device)}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let room = a.create_room(&alice_token, json!({"preset": "public_chat"})).await;
    let (status, _) =
        b.post(&format!("/_matrix/client/v3/join/{room}?via={}", name(&a)), Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let query = json!({"device_keys": {bob.clone(): []}, "timeout": 5000});
    let devices_of = |body: &Value| -> Vec<String> {
        let mut ids: Vec<String> =
            body["device_keys"][&bob].as_object().map(|d| d.keys().cloned().collect()).unwrap_or_default();
        ids.sort();
        ids
    };

    let (status, body) = a.post("/_matrix/client/v3/keys/query", Some(&alice_token), query.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(devices_of(&body), vec![bob_device.clone()], "{body}");
    let store = &services(&a).store;
    let copy = store.get_remote_device_list(&bob).await.unwrap().expect("a copy is kept");
    assert!(!copy.stale);

    // Bob's new device reaches the copy through a device list update.
    let (second_token, second_device) = b.login("bob", Some("SECOND")).await;
    let (status, _) = b
        .post(
            "/_matrix/client/v3/keys/upload",
            Some(&second_token),
            json!({"device_keys": device_keys(&bob, &second_device)}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let copy = store.get_remote_device_list(&bob).await.unwrap().unwrap();
        if copy.devices.contains(&second_device) {
            assert!(!copy.stale, "applied in order, not marked stale");
            break;
        }
        assert!(Instant::now() < deadline, "the update never reached the copy: {copy:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Answered from the copy while Bob's server is down.
    b.pause().await;
    let (status, body) = a.post("/_matrix/client/v3/keys/query", Some(&alice_token), query.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut both = vec![bob_device.clone(), second_device.clone()];
    both.sort();
    assert_eq!(devices_of(&body), both, "{body}");
    assert_eq!(body["device_keys"][&bob][&second_device], device_keys(&bob, &second_device), "{body}");
    assert!(body["failures"].as_object().is_none_or(|f| f.is_empty()), "{body}");
    b.resume().await;

    // An update whose previous one was missed makes the copy stale; the next query
    // fetches it whole again.
    let copy = store.get_remote_device_list(&bob).await.unwrap().unwrap();
    let a_name = name(&a).to_string();
    let txn = json!({
        "origin": name(&b), "origin_server_ts": 1,
        "pdus": [],
        "edus": [{"edu_type": "m.device_list_update", "content": {
            "user_id": bob, "device_id": "PHANTOM", "stream_id": copy.stream_id + 100,
            "prev_id": [copy.stream_id + 99], "deleted": false,
            "keys": device_keys(&bob, "PHANTOM"),
        }}],
    });
    let path = "/_matrix/federation/v1/send/missed-one";
    let header = sign(&b, &a_name, "PUT", path, Some(&txn));
    let (status, body) = fed_request(&a, Method::PUT, path, Some(&txn), Some(&header)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let copy = store.get_remote_device_list(&bob).await.unwrap().unwrap();
    assert!(copy.stale && !copy.devices.contains("PHANTOM"), "{copy:?}");
    let (_, body) = a.post("/_matrix/client/v3/keys/query", Some(&alice_token), query.clone()).await;
    assert_eq!(devices_of(&body), both, "fetched again from Bob's server: {body}");
    assert!(!store.get_remote_device_list(&bob).await.unwrap().unwrap().stale);

    // Once Bob leaves, updates stop: the copy is stale.
    b.leave(&bob_token, &room).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !store.get_remote_device_list(&bob).await.unwrap().unwrap().stale {
        assert!(Instant::now() < deadline, "the copy was not marked stale after Bob left");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.stop().await;
    b.stop().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn messages_for_a_server_that_is_down_wait_for_it(backend: Backend) {
    let a = crate::federation::federating_with(backend.clone(), TRUSTING, |c| {
        c.federation.max_retry_interval_ms = 300;
    })
    .await;
    let mut b = federating(backend, TRUSTING).await;
    let (_, alice_token, _) = a.register("alice").await;
    let (bob, bob_token, bob_device) = b.register("bob").await;
    let b_name = name(&b).to_string();
    b.pause().await;

    for i in 0..3 {
        let body = json!({"messages": {bob.clone(): {bob_device.clone(): {"n": i}}}});
        let path = format!("/_matrix/client/v3/sendToDevice/m.dummy/down{i}");
        let (status, answer) = a.put(&path, Some(&alice_token), body).await;
        assert_eq!(status, StatusCode::OK, "sending while the other server is down: {answer}");
    }
    // Kept while the destination fails, not dropped.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(services(&a).store.count_federation_outbox(&b_name).await.unwrap(), 3);

    b.resume().await;
    wait_for_empty_queue(&a, &b_name).await;
    let mut numbers = Vec::new();
    let mut since: Option<String> = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while numbers.len() < 3 {
        assert!(Instant::now() < deadline, "got {numbers:?} only");
        let sync = b.sync(&bob_token, since.as_deref(), "timeout=1000").await;
        for event in sync["to_device"]["events"].as_array().cloned().unwrap_or_default() {
            numbers.push(event["content"]["n"].as_i64().unwrap());
        }
        since = sync["next_batch"].as_str().map(str::to_owned);
    }
    assert_eq!(numbers, vec![0, 1, 2], "in the order sent");
    a.stop().await;
    b.stop().await;
}

/// Replacing a dehydrated device with one of another id: a user of another server
/// who queries the keys sees the new device and no longer the old one.
async fn a_replaced_dehydrated_device_leaves_remote_copies(backend: Backend) {
    use crate::dehydrated_devices::{PATH, dehydrated};
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend, TRUSTING).await;
    let (_, alice_token, _) = a.register("alice").await;
    let (bob, bob_token, _) = b.register("bob").await;
    let (status, body) = b.put(PATH, Some(&bob_token), dehydrated(&bob, "DEHYDRATED1", "one")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let room = a.create_room(&alice_token, json!({"preset": "public_chat"})).await;
    let (status, _) =
        b.post(&format!("/_matrix/client/v3/join/{room}?via={}", name(&a)), Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let query = json!({"device_keys": {bob.clone(): []}, "timeout": 5000});
    let devices = |body: &Value| -> Vec<String> {
        body["device_keys"][&bob].as_object().map(|d| d.keys().cloned().collect()).unwrap_or_default()
    };
    let (status, body) = a.post("/_matrix/client/v3/keys/query", Some(&alice_token), query.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(devices(&body), vec!["DEHYDRATED1"], "{body}");

    let (status, body) = b.put(PATH, Some(&bob_token), dehydrated(&bob, "DEHYDRATED2", "two")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = a.post("/_matrix/client/v3/keys/query", Some(&alice_token), query.clone()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if devices(&body) == vec!["DEHYDRATED2"] {
            break;
        }
        assert!(Instant::now() < deadline, "the replacement never reached alice: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.stop().await;
    b.stop().await;
}

/// Waits until `user`'s copy in `store` (read without a query, which would fetch it)
/// has `present` and not `gone`; it must never be stale meanwhile.
async fn applied(store: &convo::storage::Store, user: &str, present: &str, gone: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let copy = store.get_remote_device_list(user).await.unwrap().unwrap();
        assert!(!copy.stale, "the copy was marked stale (an update named an unknown prev_id): {copy:?}");
        if copy.devices.contains(present) && gone.is_none_or(|g| !copy.devices.contains(g)) {
            return;
        }
        assert!(Instant::now() < deadline, "the update never reached the copy: {copy:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Device list updates name as `prev_id` only ids the receiver was given: an operation
/// that records two changes (a dehydrated device: its row, then its keys) and one that
/// replaces a device (a deletion, then a new device) reach the other server's copy as
/// updates it applies, never marking it stale (which would fetch the whole list again).
async fn device_list_updates_chain_without_a_refetch(backend: Backend) {
    use crate::dehydrated_devices::{PATH, dehydrated};
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend, TRUSTING).await;
    let (_, alice_token, _) = a.register("alice").await;
    let (bob, bob_token, bob_device) = b.register("bob").await;
    let (status, _) = b
        .post(
            "/_matrix/client/v3/keys/upload",
            Some(&bob_token),
            json!({"device_keys": device_keys(&bob, &bob_device)}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let room = a.create_room(&alice_token, json!({"preset": "public_chat"})).await;
    let (status, _) =
        b.post(&format!("/_matrix/client/v3/join/{room}?via={}", name(&a)), Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let query = json!({"device_keys": {bob.clone(): []}, "timeout": 5000});
    let (status, body) = a.post("/_matrix/client/v3/keys/query", Some(&alice_token), query).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let store = &services(&a).store;
    assert!(!store.get_remote_device_list(&bob).await.unwrap().expect("a copy is kept").stale);

    let (status, body) = b.put(PATH, Some(&bob_token), dehydrated(&bob, "DEHYDRATED1", "one")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    applied(store, &bob, "DEHYDRATED1", None).await;
    let (status, body) = b.put(PATH, Some(&bob_token), dehydrated(&bob, "DEHYDRATED2", "two")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    applied(store, &bob, "DEHYDRATED2", Some("DEHYDRATED1")).await;
    let (second_token, second_device) = b.login("bob", Some("SECOND")).await;
    let (status, _) = b
        .post(
            "/_matrix/client/v3/keys/upload",
            Some(&second_token),
            json!({"device_keys": device_keys(&bob, &second_device)}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    applied(store, &bob, "SECOND", None).await;
    // Two devices' keys at once: each update gets an id of its own after the other's.
    let (third_token, third_device) = b.login("bob", Some("THIRD")).await;
    let (fourth_token, fourth_device) = b.login("bob", Some("FOURTH")).await;
    let upload = |token: String, device: String| {
        let (b, bob) = (&b, &bob);
        async move {
            let body = json!({"device_keys": device_keys(bob, &device)});
            let (status, _) = b.post("/_matrix/client/v3/keys/upload", Some(&token), body).await;
            assert_eq!(status, StatusCode::OK);
        }
    };
    tokio::join!(upload(third_token, third_device), upload(fourth_token, fourth_device));
    applied(store, &bob, "THIRD", None).await;
    applied(store, &bob, "FOURTH", None).await;
    a.stop().await;
    b.stop().await;
}

backend_tests!(
    to_device_messages_reach_users_of_other_servers,
    keys_of_remote_users_are_queried_and_claimed,
    messages_for_a_server_that_is_down_wait_for_it,
    remote_device_lists_are_kept_current,
    a_replaced_dehydrated_device_leaves_remote_copies,
    device_list_updates_chain_without_a_refetch,
);
