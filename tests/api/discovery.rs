//! Discovery, errors for unknown endpoints and bad input, CORS.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::{
    backend_tests,
    common::{Backend, TestServer, assert_error},
};

async fn versions_well_known_and_capabilities(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (status, body) = server.get("/_matrix/client/versions", None).await;
    assert_eq!(status, StatusCode::OK);
    let versions: Vec<&str> = body["versions"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(versions.contains(&"v1.1") && versions.contains(&"v1.11"), "{versions:?}");
    // Element sets up cross-signing only when this is advertised; nothing unimplemented is.
    assert_eq!(body["unstable_features"], json!({"org.matrix.e2e_cross_signing": true}), "{body}");

    let (status, body) = server.get("/.well-known/matrix/client", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["m.homeserver"]["base_url"], server.base);

    let (_, token, _) = server.register("alice").await;
    let (status, body) = server.get("/_matrix/client/v3/capabilities", Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let caps = &body["capabilities"];
    // Absent means enabled; ruma leaves the default out.
    assert_ne!(caps["m.change_password"]["enabled"], false);
    assert_eq!(caps["m.3pid_changes"]["enabled"], false);
    assert_eq!(caps["m.room_versions"]["default"], "12");
    assert_eq!(caps["m.room_versions"]["available"]["6"], "stable");
    assert!(caps["m.room_versions"]["available"].get("5").is_none());
    assert_error(
        &server.get("/_matrix/client/v3/capabilities", None).await,
        StatusCode::UNAUTHORIZED,
        "M_MISSING_TOKEN",
    );
    server.stop().await;
}

async fn unknown_endpoints_and_bad_input(backend: Backend) {
    let server = TestServer::start_with(backend, |c| c.limits.max_request_body = 4096).await;
    assert_error(&server.get("/_matrix/client/v3/no_such_thing", None).await, StatusCode::NOT_FOUND, "M_UNRECOGNIZED");
    assert_error(
        &server.request(Method::DELETE, "/_matrix/client/v3/login", None, None).await,
        StatusCode::METHOD_NOT_ALLOWED,
        "M_UNRECOGNIZED",
    );

    // Not JSON at all.
    let resp =
        server.http.post(format!("{}/_matrix/client/v3/login", server.base)).body("{not json").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["errcode"], "M_NOT_JSON");

    // JSON of the wrong shape.
    assert_error(
        &server.post("/_matrix/client/v3/login", None, json!({"type": 7})).await,
        StatusCode::BAD_REQUEST,
        "M_BAD_JSON",
    );
    assert_error(
        &server.post("/_matrix/client/v3/register", None, json!({"username": ["x"]})).await,
        StatusCode::BAD_REQUEST,
        "M_BAD_JSON",
    );

    // JSON that is not an object: serde would read a struct from an array by position.
    let (_, token, _) = server.register("carol").await;
    let room = server.create_room(&token, json!({})).await;
    for body in [json!(["bye"]), json!([null, null]), json!("x"), json!(3)] {
        let leave = server.post(&format!("/_matrix/client/v3/rooms/{room}/leave"), Some(&token), body.clone()).await;
        assert_error(&leave, StatusCode::BAD_REQUEST, "M_BAD_JSON");
    }
    let (_, rooms) = server.get("/_matrix/client/v3/joined_rooms", Some(&token)).await;
    assert_eq!(rooms["joined_rooms"], json!([room]), "still in the room");

    // Too large.
    let big = "x".repeat(10_000);
    assert_error(
        &server.post("/_matrix/client/v3/register", None, json!({"username": big})).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "M_TOO_LARGE",
    );

    // A bad identifier in the path.
    let (_, token, _) = server.register("bob").await;
    assert_error(
        &server.get("/_matrix/client/v3/profile/not-a-user-id", Some(&token)).await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_PARAM",
    );
    server.stop().await;
}

async fn cors_on_every_endpoint(backend: Backend) {
    let server = TestServer::start(backend).await;
    let preflight = server
        .http
        .request(Method::OPTIONS, format!("{}/_matrix/client/v3/login", server.base))
        .header("Origin", "https://app.element.io")
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "authorization, content-type")
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    let headers = preflight.headers();
    assert_eq!(headers["access-control-allow-origin"], "*");
    let methods = headers["access-control-allow-methods"].to_str().unwrap();
    assert!(methods.contains("POST") && methods.contains("PUT") && methods.contains("DELETE"), "{methods}");
    let allowed = headers["access-control-allow-headers"].to_str().unwrap().to_lowercase();
    assert!(allowed.contains("authorization") && allowed.contains("content-type"), "{allowed}");

    for path in ["/_matrix/client/versions", "/_matrix/client/v3/nothing_here"] {
        let resp = server
            .http
            .get(format!("{}{path}", server.base))
            .header("Origin", "https://app.element.io")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["access-control-allow-origin"], "*", "{path}");
    }
    server.stop().await;
}

/// `/.well-known/matrix/server` delegates federation when configured, else is a 404.
async fn well_known_server_delegation(backend: Backend) {
    let server = TestServer::start(backend.clone()).await;
    assert_error(&server.get("/.well-known/matrix/server", None).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    server.stop().await;

    let server =
        TestServer::start_with(backend, |c| c.federation.well_known_server = "matrix.example.org:443".into()).await;
    let response = server.http.get(format!("{}/.well-known/matrix/server", server.base)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body, json!({"m.server": "matrix.example.org:443"}));
    // Only GET (and HEAD) are served.
    assert_error(
        &server.request(Method::POST, "/.well-known/matrix/server", None, Some(json!({}))).await,
        StatusCode::METHOD_NOT_ALLOWED,
        "M_UNRECOGNIZED",
    );
    server.stop().await;
}

backend_tests!(
    versions_well_known_and_capabilities,
    unknown_endpoints_and_bad_input,
    cors_on_every_endpoint,
    well_known_server_delegation
);
