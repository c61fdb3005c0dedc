//! Dehydrated devices (MSC3814): put, get, replace, delete, and the to-device messages
//! queued for one while no client is online.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::{
    backend_tests,
    common::{Backend, TestServer, assert_error},
};

pub(crate) const PATH: &str = "/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device";

pub(crate) fn dehydrated(user: &str, device: &str, pickle: &str) -> Value {
    json!({
        "device_id": device,
        "initial_device_display_name": "Backup device",
        "device_data": {"algorithm": "org.matrix.msc3814.v1.olm", "device_pickle": pickle},
        "device_keys": {
            "user_id": user,
            "device_id": device,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": {format!("curve25519:{device}"): "curve", format!("ed25519:{device}"): "ed"},
            "dehydrated": true,
            "signatures": {},
        },
        "one_time_keys": {"signed_curve25519:AAAAAQ": {"key": "otk", "signatures": {}}},
    })
}

async fn devices_of(server: &TestServer, token: &str, user: &str) -> Vec<String> {
    let body = json!({"device_keys": {user: []}});
    let (_, seen) = server.post("/_matrix/client/v3/keys/query", Some(token), body).await;
    seen["device_keys"][user].as_object().map(|d| d.keys().cloned().collect()).unwrap_or_default()
}

async fn events(server: &TestServer, token: &str, device: &str, next_batch: Option<&str>) -> (StatusCode, Value) {
    let body = match next_batch {
        Some(token) => json!({"next_batch": token}),
        None => json!({}),
    };
    server.post(&format!("{PATH}/{device}/events"), Some(token), body).await
}

async fn dehydrated_device_lifecycle(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_id, alice, alice_dev) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    assert_error(&server.get(PATH, Some(&alice)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");

    let (status, body) = server.put(PATH, Some(&alice), dehydrated(&alice_id, "DEHYDRATED1", "pickle1")).await;
    assert_eq!((status, &body["device_id"]), (StatusCode::OK, &json!("DEHYDRATED1")), "{body}");
    let (status, body) = server.get(PATH, Some(&alice)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["device_id"], "DEHYDRATED1");
    assert_eq!(body["device_data"]["device_pickle"], "pickle1");
    // Others see the device and can claim its one-time key.
    assert!(devices_of(&server, &bob, &alice_id).await.contains(&"DEHYDRATED1".to_owned()));
    let claim = json!({"one_time_keys": {alice_id.clone(): {"DEHYDRATED1": "signed_curve25519"}}});
    let (_, claimed) = server.post("/_matrix/client/v3/keys/claim", Some(&bob), claim).await;
    assert_eq!(claimed["one_time_keys"][&alice_id]["DEHYDRATED1"]["signed_curve25519:AAAAAQ"]["key"], "otk");

    // Bob sends it three messages; a new login of alice reads them, then acknowledges.
    for i in 0..3 {
        let path = format!("/_matrix/client/v3/sendToDevice/m.room.encrypted/t{i}");
        let body = json!({"messages": {alice_id.clone(): {"DEHYDRATED1": {"n": i}}}});
        assert_eq!(server.put(&path, Some(&bob), body).await.0, StatusCode::OK);
    }
    let (status, first) = events(&server, &alice, "DEHYDRATED1", None).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let got: Vec<Value> = first["events"].as_array().unwrap().iter().map(|e| e["content"]["n"].clone()).collect();
    assert_eq!(got, [json!(0), json!(1), json!(2)], "{first}");
    let next = first["next_batch"].as_str().unwrap().to_owned();
    let (_, rest) = events(&server, &alice, "DEHYDRATED1", Some(&next)).await;
    assert_eq!(rest["events"], json!([]), "{rest}");
    let (_, again) = events(&server, &alice, "DEHYDRATED1", None).await;
    assert_eq!(again["events"], json!([]), "acknowledged messages are gone: {again}");
    // Only the user's dehydrated device.
    assert_error(&events(&server, &alice, &alice_dev, None).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    assert_error(&events(&server, &bob, "DEHYDRATED1", None).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");

    // A new dehydrated device replaces the old one; a real device's id is refused.
    let taken = server.put(PATH, Some(&alice), dehydrated(&alice_id, &alice_dev, "p")).await;
    assert_error(&taken, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let (status, body) = server.put(PATH, Some(&alice), dehydrated(&alice_id, "DEHYDRATED2", "pickle2")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(server.get(PATH, Some(&alice)).await.1["device_data"]["device_pickle"], "pickle2");
    let devices = devices_of(&server, &bob, &alice_id).await;
    assert!(devices.contains(&"DEHYDRATED2".to_owned()) && !devices.contains(&"DEHYDRATED1".to_owned()), "{devices:?}");
    // Keys for another user or device are refused.
    let mut wrong = dehydrated(&alice_id, "DEHYDRATED3", "p");
    wrong["device_keys"]["device_id"] = json!("OTHER");
    assert_error(&server.put(PATH, Some(&alice), wrong).await, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");

    // Delete: gone, with its keys; a second delete finds nothing.
    let (status, body) = server.request(Method::DELETE, PATH, Some(&alice), None).await;
    assert_eq!((status, &body["device_id"]), (StatusCode::OK, &json!("DEHYDRATED2")), "{body}");
    assert_error(&server.get(PATH, Some(&alice)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    assert_error(&server.request(Method::DELETE, PATH, Some(&alice), None).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    assert_eq!(devices_of(&server, &bob, &alice_id).await, Vec::<String>::new());
    server.stop().await;
}

backend_tests!(dehydrated_device_lifecycle);
