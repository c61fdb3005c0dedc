//! `/keys/signatures/upload` with real ed25519 keys: which key may sign which, bad
//! signatures reported in `failures` and not stored, parallel uploads; and
//! `unsigned.device_display_name` in `/keys/query`.

use base64::{Engine, engine::general_purpose::STANDARD_NO_PAD};
use ed25519_dalek::{Signer, SigningKey};
use reqwest::StatusCode;
use ruma::CanonicalJsonObject;
use serde_json::{Value, json};

use crate::{
    backend_tests,
    common::{Backend, TestServer},
};

fn signing_key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn public(key: &SigningKey) -> String {
    STANDARD_NO_PAD.encode(key.verifying_key().to_bytes())
}

/// Signs `object` (without its `signatures` and `unsigned`) as `user` with `key`, named
/// `ed25519:{key_name}`.
fn sign(object: &mut Value, user: &str, key_name: &str, key: &SigningKey) {
    let canonical: CanonicalJsonObject = serde_json::from_value(object.clone()).unwrap();
    let message = ruma::signatures::to_canonical_json_string_for_signing(&canonical).unwrap();
    let signature = STANDARD_NO_PAD.encode(key.sign(message.as_bytes()).to_bytes());
    if !object["signatures"].is_object() {
        object["signatures"] = json!({});
    }
    if !object["signatures"][user].is_object() {
        object["signatures"][user] = json!({});
    }
    object["signatures"][user][format!("ed25519:{key_name}")] = json!(signature);
}

/// A device's keys, self-signed with its ed25519 key.
fn device_keys(user: &str, device: &str, key: &SigningKey) -> Value {
    let mut keys = json!({
        "user_id": user,
        "device_id": device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            format!("curve25519:{device}"): "3C5BFWi2Y8MaVvjM8M22DBmh24PmgR0nPvJOIArzgyI",
            format!("ed25519:{device}"): public(key),
        },
    });
    sign(&mut keys, user, device, key);
    keys
}

fn cross_key(user: &str, usage: &str, key: &SigningKey) -> Value {
    json!({"user_id": user, "usage": [usage], "keys": {format!("ed25519:{}", public(key)): public(key)}})
}

/// A user's cross-signing keys: master, self-signing and user-signing.
struct CrossKeys {
    master: SigningKey,
    self_signing: SigningKey,
    user_signing: SigningKey,
}

impl CrossKeys {
    fn new(seed: u8) -> Self {
        CrossKeys {
            master: signing_key(seed),
            self_signing: signing_key(seed + 1),
            user_signing: signing_key(seed + 2),
        }
    }

    fn master_json(&self, user: &str) -> Value {
        cross_key(user, "master", &self.master)
    }

    /// Uploads the three keys (the first upload needs no password).
    async fn upload(&self, server: &TestServer, user: &str, token: &str) {
        let master_pub = public(&self.master);
        let mut ssk = cross_key(user, "self_signing", &self.self_signing);
        sign(&mut ssk, user, &master_pub, &self.master);
        let mut usk = cross_key(user, "user_signing", &self.user_signing);
        sign(&mut usk, user, &master_pub, &self.master);
        let body = json!({"master_key": self.master_json(user), "self_signing_key": ssk, "user_signing_key": usk});
        let (status, body) = server.post("/_matrix/client/v3/keys/device_signing/upload", Some(token), body).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
}

async fn upload_device(server: &TestServer, user: &str, token: &str, device: &str, key: &SigningKey) {
    let upload = json!({"device_keys": device_keys(user, device, key)});
    let (status, body) = server.post("/_matrix/client/v3/keys/upload", Some(token), upload).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

async fn upload_signatures(server: &TestServer, token: &str, body: Value) -> Value {
    let (status, body) = server.post("/_matrix/client/v3/keys/signatures/upload", Some(token), body).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn query(server: &TestServer, token: &str, user: &str) -> Value {
    let body = json!({"device_keys": {user: []}});
    let (status, body) = server.post("/_matrix/client/v3/keys/query", Some(token), body).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn signatures_are_checked(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_id, alice, alice_dev) = server.register("alice").await;
    let (bob_id, bob, _) = server.register("bob").await;
    let device_key = signing_key(1);
    upload_device(&server, &alice_id, &alice, &alice_dev, &device_key).await;
    let alice_keys = CrossKeys::new(10);
    alice_keys.upload(&server, &alice_id, &alice).await;
    let bob_keys = CrossKeys::new(20);
    bob_keys.upload(&server, &bob_id, &bob).await;
    let (ssk_pub, master_pub) = (public(&alice_keys.self_signing), public(&alice_keys.master));
    let ssk_id = format!("ed25519:{ssk_pub}");

    // Alice's device signed by her self-signing key: stored, seen by bob.
    let mut device = device_keys(&alice_id, &alice_dev, &device_key);
    sign(&mut device, &alice_id, &ssk_pub, &alice_keys.self_signing);
    let body = upload_signatures(&server, &alice, json!({alice_id.clone(): {alice_dev.clone(): device}})).await;
    assert_eq!(body["failures"], json!({}), "{body}");
    let seen = query(&server, &bob, &alice_id).await;
    let sigs = &seen["device_keys"][&alice_id][&alice_dev]["signatures"][&alice_id];
    assert!(sigs[&ssk_id].is_string(), "{seen}");
    assert!(sigs[format!("ed25519:{alice_dev}")].is_string(), "the device's own signature stays: {seen}");

    // Refused, and not stored: a signature by another key under the self-signing
    // key's name, a good signature over other content, and a signature by a key that
    // may not sign devices (the master key).
    let mut forged = device_keys(&alice_id, &alice_dev, &device_key);
    forged["signatures"][&alice_id].as_object_mut().unwrap().remove(&ssk_id);
    let mut fake = forged.clone();
    let mut by_other_key = forged.clone();
    sign(&mut by_other_key, &alice_id, &ssk_pub, &signing_key(99));
    let mut altered = forged.clone();
    altered["algorithms"] = json!(["m.megolm.v1.aes-sha2"]);
    sign(&mut altered, &alice_id, &ssk_pub, &alice_keys.self_signing);
    altered["algorithms"] = forged["algorithms"].clone();
    sign(&mut fake, &alice_id, &master_pub, &alice_keys.master);
    for (what, object) in [("another key", by_other_key), ("other content", altered), ("the master key", fake)] {
        let body = upload_signatures(&server, &alice, json!({alice_id.clone(): {alice_dev.clone(): object}})).await;
        assert_eq!(body["failures"][&alice_id][&alice_dev]["errcode"], "M_INVALID_SIGNATURE", "{what}: {body}");
    }
    let seen = query(&server, &bob, &alice_id).await;
    let sigs = seen["device_keys"][&alice_id][&alice_dev]["signatures"][&alice_id].as_object().unwrap().clone();
    assert_eq!(sigs.len(), 2, "only the device's and the good self-signing signature: {seen}");
    let mut good_again = device_keys(&alice_id, &alice_dev, &device_key);
    sign(&mut good_again, &alice_id, &ssk_pub, &alice_keys.self_signing);
    assert_eq!(sigs[&ssk_id], good_again["signatures"][&alice_id][&ssk_id], "{seen}");

    // Alice's master key signed by her device: stored; by an unknown key: refused.
    let mut master = alice_keys.master_json(&alice_id);
    sign(&mut master, &alice_id, &alice_dev, &device_key);
    let mut unknown = alice_keys.master_json(&alice_id);
    sign(&mut unknown, &alice_id, "OTHERDEVICE", &signing_key(98));
    let body = upload_signatures(&server, &alice, json!({alice_id.clone(): {master_pub.clone(): master}})).await;
    assert_eq!(body["failures"], json!({}), "{body}");
    let body = upload_signatures(&server, &alice, json!({alice_id.clone(): {master_pub.clone(): unknown}})).await;
    assert_eq!(body["failures"][&alice_id][&master_pub]["errcode"], "M_INVALID_SIGNATURE", "{body}");
    let seen = query(&server, &bob, &alice_id).await;
    let master_sigs = &seen["master_keys"][&alice_id]["signatures"][&alice_id];
    assert!(master_sigs[format!("ed25519:{alice_dev}")].is_string(), "{seen}");
    assert!(master_sigs.get("ed25519:OTHERDEVICE").is_none(), "{seen}");

    // Bob signs alice's master key with his user-signing key: stored, seen by alice.
    // With his master key, or on alice's device: refused.
    let bob_usk = public(&bob_keys.user_signing);
    let mut trusted = alice_keys.master_json(&alice_id);
    sign(&mut trusted, &bob_id, &bob_usk, &bob_keys.user_signing);
    let body = upload_signatures(&server, &bob, json!({alice_id.clone(): {master_pub.clone(): trusted}})).await;
    assert_eq!(body["failures"], json!({}), "{body}");
    let mut by_master = alice_keys.master_json(&alice_id);
    sign(&mut by_master, &bob_id, &public(&bob_keys.master), &bob_keys.master);
    let mut on_device = device_keys(&alice_id, &alice_dev, &device_key);
    sign(&mut on_device, &bob_id, &bob_usk, &bob_keys.user_signing);
    let both = json!({alice_id.clone(): {master_pub.clone(): by_master, alice_dev.clone(): on_device}});
    let body = upload_signatures(&server, &bob, both).await;
    assert_eq!(body["failures"][&alice_id][&master_pub]["errcode"], "M_INVALID_SIGNATURE", "{body}");
    assert_eq!(body["failures"][&alice_id][&alice_dev]["errcode"], "M_INVALID_SIGNATURE", "{body}");
    let seen = query(&server, &alice, &alice_id).await;
    let bob_sigs = seen["master_keys"][&alice_id]["signatures"][&bob_id].as_object().unwrap().clone();
    assert_eq!(bob_sigs.keys().collect::<Vec<_>>(), [&format!("ed25519:{bob_usk}")], "{seen}");
    assert!(seen["device_keys"][&alice_id][&alice_dev]["signatures"].get(&bob_id).is_none(), "{seen}");
    server.stop().await;
}

async fn parallel_signature_uploads_all_survive(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_id, first, first_dev) = server.register("alice").await;
    let alice_keys = CrossKeys::new(10);
    alice_keys.upload(&server, &alice_id, &first).await;
    // Five devices with keys.
    let mut devices = vec![(first, first_dev, signing_key(1))];
    for i in 2..=5u8 {
        let (token, device) = server.login("alice", None).await;
        devices.push((token, device, signing_key(i)));
    }
    for (token, device, key) in &devices {
        upload_device(&server, &alice_id, token, device, key).await;
    }
    // At once: each device signed by the self-signing key, and the master key signed by
    // each device.
    let (ssk_pub, master_pub) = (public(&alice_keys.self_signing), public(&alice_keys.master));
    let mut uploads = Vec::new();
    for (token, device, key) in &devices {
        let mut signed = device_keys(&alice_id, device, key);
        sign(&mut signed, &alice_id, &ssk_pub, &alice_keys.self_signing);
        uploads.push(upload_signatures(&server, token, json!({alice_id.clone(): {device.clone(): signed}})));
        let mut master = alice_keys.master_json(&alice_id);
        sign(&mut master, &alice_id, device, key);
        uploads.push(upload_signatures(&server, token, json!({alice_id.clone(): {master_pub.clone(): master}})));
    }
    for body in futures_util::future::join_all(uploads).await {
        assert_eq!(body["failures"], json!({}), "{body}");
    }
    let seen = query(&server, &devices[0].0, &alice_id).await;
    for (_, device, _) in &devices {
        let sigs = &seen["device_keys"][&alice_id][device]["signatures"][&alice_id];
        assert!(sigs[format!("ed25519:{ssk_pub}")].is_string(), "{device}: {seen}");
        assert!(sigs[format!("ed25519:{device}")].is_string(), "{device}: {seen}");
        let master_sigs = &seen["master_keys"][&alice_id]["signatures"][&alice_id];
        assert!(master_sigs[format!("ed25519:{device}")].is_string(), "{device}: {seen}");
    }
    server.stop().await;
}

async fn device_display_names_in_key_queries(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_id, alice, alice_dev) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    upload_device(&server, &alice_id, &alice, &alice_dev, &signing_key(1)).await;
    let path = format!("/_matrix/client/v3/devices/{alice_dev}");
    let (status, body) = server.put(&path, Some(&alice), json!({"display_name": "Alice's laptop"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for (who, token) in [("alice herself", &alice), ("bob", &bob)] {
        let seen = query(&server, token, &alice_id).await;
        let keys = &seen["device_keys"][&alice_id][&alice_dev];
        assert_eq!(keys["unsigned"]["device_display_name"], "Alice's laptop", "{who}: {seen}");
        // The signed part is as uploaded: the device's signature still verifies.
        assert_eq!(keys["keys"], device_keys(&alice_id, &alice_dev, &signing_key(1))["keys"], "{who}: {seen}");
    }
    server.stop().await;
}

backend_tests!(signatures_are_checked, parallel_signature_uploads_all_survive, device_display_names_in_key_queries);
