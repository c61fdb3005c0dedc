//! Federation transport and trust: two (or more) Convo servers on loopback, each
//! serving federation over TLS with a certificate from the test CA (`tests/certs/`),
//! named by their IP literal and federation port.

use std::{path::PathBuf, sync::Arc};

use base64::{Engine, engine::general_purpose::STANDARD_NO_PAD};
use convo::service::Services;
use reqwest::{Method, StatusCode};
use ruma::{
    CanonicalJsonObject, OwnedServerName,
    api::federation::authentication::{XMatrix, XMatrixSigningInput},
    serde::Base64,
    signatures::{PublicKeyMap, PublicKeySet, verify_json},
};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use serde_json::{Value, json};

use crate::{
    backend_tests,
    common::{Backend, TestServer, assert_error},
};

fn certs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/certs")
}

/// A loopback port free right now (for a server name that must be known before start).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// How a test server trusts others.
#[derive(Clone, Copy)]
pub(crate) struct Trust {
    pub test_ca: bool,
    pub allow_private: bool,
    pub skip_verify: bool,
}

pub(crate) const TRUSTING: Trust = Trust { test_ca: true, allow_private: true, skip_verify: false };

/// A server named `127.0.0.1:PORT`, serving federation over TLS on that port.
pub(crate) async fn federating(backend: Backend, trust: Trust) -> TestServer {
    federating_with(backend, trust, |_| {}).await
}

/// `federating` with more configuration.
pub(crate) async fn federating_with(
    backend: Backend,
    trust: Trust,
    tweak: impl FnOnce(&mut convo::config::Config),
) -> TestServer {
    let port = free_port();
    TestServer::start_with(backend, |c| {
        c.server_name = format!("127.0.0.1:{port}").try_into().unwrap();
        c.listeners.federation = format!("127.0.0.1:{port}").parse().unwrap();
        c.listeners.federation_tls_certificate = certs().join("server.pem");
        c.listeners.federation_tls_key = certs().join("server.key");
        if trust.test_ca {
            c.federation.extra_ca_file = certs().join("ca.pem");
        }
        c.federation.allow_private_destinations = trust.allow_private;
        c.federation.skip_tls_verify = trust.skip_verify;
        tweak(c);
    })
    .await
}

pub(crate) fn services(server: &TestServer) -> &Arc<Services> {
    &server.running.as_ref().unwrap().services
}

pub(crate) fn name(server: &TestServer) -> OwnedServerName {
    services(server).server_name().clone()
}

/// The federation listener's base URL.
fn fed_base(server: &TestServer) -> String {
    format!("https://{}", server.running.as_ref().unwrap().federation_addr.expect("federation is on"))
}

/// An HTTPS client that trusts the test CA only.
fn https() -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(certs().join("ca.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder().tls_backend_preconfigured(config).build().unwrap()
}

/// A request to `server`'s federation listener, with an optional `Authorization`.
pub(crate) async fn fed_request(
    server: &TestServer,
    method: Method,
    path: &str,
    body: Option<&Value>,
    authorization: Option<&str>,
) -> (StatusCode, Value) {
    let mut request = https().request(method, format!("{}{path}", fed_base(server)));
    if let Some(auth) = authorization {
        request = request.header("authorization", auth);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.expect("federation request sent");
    let status = response.status();
    let bytes = response.bytes().await.unwrap();
    (status, if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).expect("JSON") })
}

/// The `X-Matrix` header `origin` would send for this request to `destination`.
pub(crate) fn sign(origin: &TestServer, destination: &str, method: &str, path: &str, body: Option<&Value>) -> String {
    let bytes = body.map(|b| serde_json::to_vec(b).unwrap()).unwrap_or_default();
    let request = http::Request::builder().method(method).uri(path).body(bytes).unwrap();
    let key = &services(origin).signing_key;
    let input = XMatrixSigningInput::new(name(origin), destination.try_into().unwrap(), key);
    XMatrix::sign_http_request(&request, input).unwrap().to_string()
}

/// Checks that `object` carries a valid signature of `entity` by one of `keys`.
#[track_caller]
fn assert_signed_by(object: &Value, entity: &str, keys: &Value) {
    let set: PublicKeySet = keys
        .as_object()
        .unwrap()
        .iter()
        .map(|(id, k)| (id.clone(), Base64::parse(k["key"].as_str().unwrap()).unwrap()))
        .collect();
    let mut canonical: CanonicalJsonObject = serde_json::from_value(object.clone()).unwrap();
    let signatures = canonical.get_mut("signatures").unwrap();
    let ruma::CanonicalJsonValue::Object(signatures) = signatures else { panic!("signatures is an object") };
    assert!(signatures.contains_key(entity), "no signature of {entity}: {object}");
    signatures.retain(|e, _| e == entity);
    verify_json(&PublicKeyMap::from([(entity.to_owned(), set)]), &canonical)
        .unwrap_or_else(|e| panic!("{entity}'s signature does not verify: {e}"));
}

async fn federation_listener_serves_tls_and_only_federation_paths(backend: Backend) {
    let b = federating_with(backend, TRUSTING, |c| c.limits.header_read_timeout_ms = 500).await;
    // A connection that never starts its TLS handshake holds nothing up, and is closed
    // after limits.header_read_timeout_ms.
    let mut stalled =
        tokio::net::TcpStream::connect(b.running.as_ref().unwrap().federation_addr.unwrap()).await.unwrap();
    let (status, body) = fed_request(&b, Method::GET, "/_matrix/federation/v1/version", None, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["server"]["name"], "Convo");
    let mut buf = [0u8; 16];
    let read =
        tokio::time::timeout(std::time::Duration::from_secs(10), tokio::io::AsyncReadExt::read(&mut stalled, &mut buf))
            .await
            .expect("the stalled handshake is cut");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    let (status, keys) = fed_request(&b, Method::GET, "/_matrix/key/v2/server", None, None).await;
    assert_eq!(status, StatusCode::OK, "{keys}");
    assert_eq!(keys["server_name"], name(&b).as_str());
    assert_eq!(keys["old_verify_keys"], json!({}));
    let now = convo::service::now_ms();
    let valid_until = keys["valid_until_ts"].as_i64().unwrap();
    assert!(valid_until > now + 6 * 86_400_000 && valid_until <= now + 7 * 86_400_000 + 60_000, "{keys}");
    let key_id = format!("ed25519:{}", services(&b).signing_key.version());
    let expected = STANDARD_NO_PAD.encode(services(&b).signing_key.public_key());
    assert_eq!(keys["verify_keys"][&key_id]["key"], expected, "{keys}");
    assert_signed_by(&keys, name(&b).as_str(), &keys["verify_keys"]);

    // Client paths are not served on the federation listener, nor federation paths on
    // the client listener.
    let result = fed_request(&b, Method::GET, "/_matrix/client/versions", None, None).await;
    assert_error(&result, StatusCode::NOT_FOUND, "M_UNRECOGNIZED");
    let result = b.get("/_matrix/key/v2/server", None).await;
    assert_error(&result, StatusCode::NOT_FOUND, "M_UNRECOGNIZED");
    b.stop().await;
}

async fn remote_keys_are_fetched_once_and_cached(backend: Backend) {
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend, TRUSTING).await;
    let (_, published) = fed_request(&b, Method::GET, "/_matrix/key/v2/server", None, None).await;
    let key_id = format!("ed25519:{}", services(&b).signing_key.version());

    // Concurrent lookups make one request.
    let lookups: Vec<_> = (0..5)
        .map(|_| {
            let services = services(&a).clone();
            let (server, key_id) = (name(&b), key_id.clone());
            tokio::spawn(async move { services.server_key(&server, &key_id).await })
        })
        .collect();
    for lookup in lookups {
        let key = lookup.await.unwrap().expect("B's key");
        assert_eq!(key.encode(), published["verify_keys"][&key_id]["key"].as_str().unwrap());
    }
    assert_eq!(services(&a).federation.keys.requests_sent(), 1);

    // A second lookup uses the cache; A's own key is known without asking.
    let map = services(&a).server_public_keys(&[name(&b), name(&a)]).await.unwrap();
    assert_eq!(map[name(&b).as_str()][&key_id].encode(), published["verify_keys"][&key_id]["key"].as_str().unwrap());
    let own_id = format!("ed25519:{}", services(&a).signing_key.version());
    let own_key = STANDARD_NO_PAD.encode(services(&a).signing_key.public_key());
    assert_eq!(map[name(&a).as_str()][&own_id].encode(), own_key);
    assert_eq!(services(&a).federation.keys.requests_sent(), 1);

    // The cache is in the database: after a restart, still no request.
    let mut a = a;
    a.restart().await;
    services(&a).server_key(&name(&b), &key_id).await.unwrap();
    assert_eq!(services(&a).federation.keys.requests_sent(), 0);

    // An unknown key id of a known server is fetched again, but not at once a second
    // time (requests naming made-up key ids cannot make A hammer B).
    let err = services(&a).server_key(&name(&b), "ed25519:nope").await.unwrap_err();
    assert!(err.to_string().contains("does not publish"), "{err}");
    assert_eq!(services(&a).federation.keys.requests_sent(), 1);
    let err = services(&a).server_key(&name(&b), "ed25519:nope2").await.unwrap_err();
    assert!(err.to_string().contains("fetched"), "{err}");
    assert_eq!(services(&a).federation.keys.requests_sent(), 1);

    // Once the stored key's validity has passed, it is fetched again.
    let mut stored = services(&a).store.get_server_signing_keys(name(&b).as_str()).await.unwrap();
    assert_eq!(stored.len(), 1, "{stored:?}");
    stored[0].valid_until_ts = convo::service::now_ms() - 1;
    let response = convo::storage::StoredKeyResponse { response: "{}".into(), valid_until_ts: 0 };
    services(&a).store.store_server_keys(name(&b).as_str(), &stored, &response, 0).await.unwrap();
    // (An older response never replaces a newer one.)
    let kept = services(&a).store.get_server_key_response(name(&b).as_str()).await.unwrap().unwrap();
    assert_ne!(kept.response, "{}");
    let mut a = a;
    a.restart().await; // forgets when B was last fetched
    services(&a).server_key(&name(&b), &key_id).await.unwrap();
    assert_eq!(services(&a).federation.keys.requests_sent(), 1);
    let stored = services(&a).store.get_server_signing_keys(name(&b).as_str()).await.unwrap();
    assert!(stored[0].valid_until_ts > convo::service::now_ms() + 86_400_000, "{stored:?}");
    a.stop().await;
    b.stop().await;
}

async fn a_failed_key_fetch_is_backed_off(backend: Backend) {
    let a = federating(backend, TRUSTING).await;
    // Nothing listens there.
    let gone: OwnedServerName = format!("127.0.0.1:{}", free_port()).try_into().unwrap();
    let err = services(&a).server_key(&gone, "ed25519:x").await.unwrap_err();
    assert_eq!(err.errcode(), "M_UNKNOWN", "{err}");
    assert_eq!(services(&a).federation.keys.requests_sent(), 1);
    let err = services(&a).server_key(&gone, "ed25519:x").await.unwrap_err();
    assert!(err.to_string().contains("next try"), "{err}");
    assert_eq!(services(&a).federation.keys.requests_sent(), 1);
    a.stop().await;
}

async fn the_notary_answers_with_both_signatures(backend: Backend) {
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend, TRUSTING).await;
    let (_, a_keys) = fed_request(&a, Method::GET, "/_matrix/key/v2/server", None, None).await;
    let (_, b_keys) = fed_request(&b, Method::GET, "/_matrix/key/v2/server", None, None).await;
    let (b_name, a_name) = (name(&b).to_string(), name(&a).to_string());

    let query = json!({"server_keys": {b_name.clone(): {}}});
    let (status, body) = fed_request(&a, Method::POST, "/_matrix/key/v2/query", Some(&query), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let answers = body["server_keys"].as_array().unwrap();
    assert_eq!(answers.len(), 1, "{body}");
    assert_eq!(answers[0]["server_name"], b_name.as_str());
    assert_eq!(answers[0]["verify_keys"], b_keys["verify_keys"]);
    assert_signed_by(&answers[0], &b_name, &b_keys["verify_keys"]);
    assert_signed_by(&answers[0], &a_name, &a_keys["verify_keys"]);

    let (status, body) = fed_request(&a, Method::GET, &format!("/_matrix/key/v2/query/{b_name}"), None, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let answers = body["server_keys"].as_array().unwrap();
    assert_eq!(answers.len(), 1, "{body}");
    assert_signed_by(&answers[0], &b_name, &b_keys["verify_keys"]);
    assert_signed_by(&answers[0], &a_name, &a_keys["verify_keys"]);
    // One fetch served both answers.
    assert_eq!(services(&a).federation.keys.requests_sent(), 1);

    // A server that cannot be reached is left out.
    let gone = format!("127.0.0.1:{}", free_port());
    let query = json!({"server_keys": {gone: {}}});
    let (status, body) = fed_request(&a, Method::POST, "/_matrix/key/v2/query", Some(&query), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["server_keys"], json!([]));
    // Queries are bounded.
    let many: serde_json::Map<String, Value> =
        (0..101).map(|i| (format!("127.0.0.1:{}", 1000 + i), json!({}))).collect();
    let result =
        fed_request(&a, Method::POST, "/_matrix/key/v2/query", Some(&json!({"server_keys": many})), None).await;
    assert_error(&result, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    a.stop().await;
    b.stop().await;
}

async fn remote_profiles_aliases_and_directories_are_found(backend: Backend) {
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend, TRUSTING).await;
    let (alice, alice_token, _) = a.register("alice").await;
    let (bob, bob_token, _) = b.register("bob").await;
    let (status, body) = b
        .put(
            &format!("/_matrix/client/v3/profile/{bob}/displayname"),
            Some(&bob_token),
            json!({"displayname": "Bob B"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let room = b
        .create_room(&bob_token, json!({"room_alias_name": "bobs", "visibility": "public", "name": "Bob's room"}))
        .await;
    let b_name = name(&b).to_string();

    let (status, body) = a.get(&format!("/_matrix/client/v3/profile/{bob}"), Some(&alice_token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["displayname"], "Bob B");
    let (status, body) = a.get(&format!("/_matrix/client/v3/profile/{bob}/displayname"), Some(&alice_token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"displayname": "Bob B"}));
    let result = a.get(&format!("/_matrix/client/v3/profile/@nobody:{b_name}"), Some(&alice_token)).await;
    assert_error(&result, StatusCode::NOT_FOUND, "M_NOT_FOUND");

    let (status, body) =
        a.get(&format!("/_matrix/client/v3/directory/room/%23bobs:{b_name}"), Some(&alice_token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"room_id": room, "servers": [b_name]}));
    let result = a.get(&format!("/_matrix/client/v3/directory/room/%23nothing:{b_name}"), Some(&alice_token)).await;
    assert_error(&result, StatusCode::NOT_FOUND, "M_NOT_FOUND");

    let (status, body) = a.get(&format!("/_matrix/client/v3/publicRooms?server={b_name}"), Some(&alice_token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["chunk"][0]["room_id"], room.as_str(), "{body}");
    assert_eq!(body["chunk"][0]["name"], "Bob's room");
    let (status, body) = a
        .post(
            &format!("/_matrix/client/v3/publicRooms?server={b_name}"),
            Some(&alice_token),
            json!({"filter": {"generic_search_term": "bob"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["chunk"][0]["room_id"], room.as_str(), "{body}");
    let (status, body) = a
        .post(
            &format!("/_matrix/client/v3/publicRooms?server={b_name}"),
            Some(&alice_token),
            json!({"filter": {"generic_search_term": "zzz"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["chunk"], json!([]), "{body}");
    // The other direction: B asks A.
    let (status, body) = b.get(&format!("/_matrix/client/v3/profile/{alice}"), Some(&bob_token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    a.stop().await;
    b.stop().await;
}

async fn requests_without_a_valid_x_matrix_signature_are_refused(backend: Backend) {
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend, TRUSTING).await;
    let (bob, _, _) = b.register("bob").await;
    let b_name = name(&b).to_string();
    let path = format!("/_matrix/federation/v1/query/profile?user_id={}", bob.replace('@', "%40").replace(':', "%3A"));

    let valid = sign(&a, &b_name, "GET", &path, None);
    let (status, body) = fed_request(&b, Method::GET, &path, None, Some(&valid)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["displayname"], "bob", "{body}");

    let unauthorized = |result: (StatusCode, Value), what: &str| {
        assert_error(&result, StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED");
        eprintln!("{what}: {}", result.1["error"]);
    };
    unauthorized(fed_request(&b, Method::GET, &path, None, None).await, "no header");
    unauthorized(fed_request(&b, Method::GET, &path, None, Some("X-Matrix garbage")).await, "malformed");
    unauthorized(fed_request(&b, Method::GET, &path, None, Some("Bearer abc")).await, "another scheme");
    let elsewhere = sign(&a, "127.0.0.1:1", "GET", &path, None);
    unauthorized(fed_request(&b, Method::GET, &path, None, Some(&elsewhere)).await, "wrong destination");
    let wrong_key = valid.replace(&format!("ed25519:{}", services(&a).signing_key.version()), "ed25519:other");
    assert_ne!(wrong_key, valid);
    unauthorized(fed_request(&b, Method::GET, &path, None, Some(&wrong_key)).await, "wrong key");
    let other_path = sign(&a, &b_name, "GET", "/_matrix/federation/v1/query/profile?user_id=%40x%3Ay", None);
    unauthorized(fed_request(&b, Method::GET, &path, None, Some(&other_path)).await, "bad signature");
    let posted = sign(&a, &b_name, "POST", &path, None);
    unauthorized(fed_request(&b, Method::GET, &path, None, Some(&posted)).await, "signed for another method");
    // A signed body must be the body sent.
    let filter = json!({"filter": {"generic_search_term": "x"}});
    let signed = sign(&a, &b_name, "POST", "/_matrix/federation/v1/publicRooms", Some(&filter));
    let (status, body) =
        fed_request(&b, Method::POST, "/_matrix/federation/v1/publicRooms", Some(&filter), Some(&signed)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let other = json!({"filter": {"generic_search_term": "y"}});
    unauthorized(
        fed_request(&b, Method::POST, "/_matrix/federation/v1/publicRooms", Some(&other), Some(&signed)).await,
        "another body",
    );
    a.stop().await;
    b.stop().await;
}

async fn untrusted_certificates_and_private_addresses_are_refused(backend: Backend) {
    let b = federating(backend.clone(), TRUSTING).await;
    let untrusting = federating(backend.clone(), Trust { test_ca: false, ..TRUSTING }).await;
    let strict = federating(backend, Trust { allow_private: false, ..TRUSTING }).await;
    let (bob, _, _) = b.register("bob").await;

    let (_, token, _) = untrusting.register("carol").await;
    let result = untrusting.get(&format!("/_matrix/client/v3/profile/{bob}"), Some(&token)).await;
    assert_error(&result, StatusCode::BAD_GATEWAY, "M_UNKNOWN");
    let message = result.1["error"].as_str().unwrap();
    assert!(message.contains("certificate") || message.contains("UnknownIssuer"), "{message}");

    let (_, token, _) = strict.register("dave").await;
    let result = strict.get(&format!("/_matrix/client/v3/profile/{bob}"), Some(&token)).await;
    assert_error(&result, StatusCode::BAD_GATEWAY, "M_UNKNOWN");
    let message = result.1["error"].as_str().unwrap();
    assert!(message.contains("non-public"), "{message}");
    let result = strict.get(&format!("/_matrix/client/v3/publicRooms?server={}", name(&b)), Some(&token)).await;
    assert_error(&result, StatusCode::BAD_GATEWAY, "M_UNKNOWN");

    // skip_tls_verify (tests only) trusts any certificate.
    let careless = federating(Backend::Sqlite, Trust { test_ca: false, skip_verify: true, ..TRUSTING }).await;
    let (_, token, _) = careless.register("erin").await;
    let (status, body) = careless.get(&format!("/_matrix/client/v3/profile/{bob}"), Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    careless.stop().await;
    b.stop().await;
    untrusting.stop().await;
    strict.stop().await;
}

async fn names_are_not_looked_up_when_resolving_is_off(backend: Backend) {
    // Tests run with `federation.resolve_names = false`: a server name that needs DNS is
    // refused at once (403), and nothing is looked up.
    let a = federating(backend, TRUSTING).await;
    let (_, token, _) = a.register("alice").await;
    let result = a.get("/_matrix/client/v3/profile/@bob:example.org", Some(&token)).await;
    assert_error(&result, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    assert!(result.1["error"].as_str().unwrap().contains("resolve_names"), "{}", result.1);
    let result = a.get("/_matrix/client/v3/directory/room/%23room:example.org", Some(&token)).await;
    assert_error(&result, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    // A join through such servers only: refused as they were (not a 502).
    let result = a.post("/_matrix/client/v3/join/!room:example.org?via=example.net", Some(&token), json!({})).await;
    assert_error(&result, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    a.stop().await;
}

backend_tests!(
    names_are_not_looked_up_when_resolving_is_off,
    federation_listener_serves_tls_and_only_federation_paths,
    remote_keys_are_fetched_once_and_cached,
    a_failed_key_fetch_is_backed_off,
    the_notary_answers_with_both_signatures,
    remote_profiles_aliases_and_directories_are_found,
    requests_without_a_valid_x_matrix_signature_are_refused,
    untrusted_certificates_and_private_addresses_are_refused,
);
