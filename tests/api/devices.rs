//! Device management, with user-interactive authentication for deletion.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::{
    backend_tests,
    common::{Backend, PASSWORD, TestServer, assert_error},
};

async fn list_get_rename(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, token, device) = server.register("alice").await;
    let (status, body) = server.get(&format!("/_matrix/client/v3/devices/{device}"), Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["device_id"], device.as_str());
    assert!(body["last_seen_ts"].as_u64().unwrap() > 0, "last_seen_ts is recorded: {body}");
    assert_eq!(body["last_seen_ip"], "127.0.0.1");
    // A device without a name has no `display_name` (not `null`), as the spec says.
    assert!(body.get("display_name").is_none(), "{body}");
    let (_, list) = server.get("/_matrix/client/v3/devices", Some(&token)).await;
    assert!(list["devices"][0].get("display_name").is_none(), "{list}");

    let (status, _) = server
        .put(&format!("/_matrix/client/v3/devices/{device}"), Some(&token), json!({"display_name": "Work laptop"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, body) = server.get("/_matrix/client/v3/devices", Some(&token)).await;
    assert_eq!(body["devices"][0]["display_name"], "Work laptop");

    assert_error(
        &server.get("/_matrix/client/v3/devices/NOPE", Some(&token)).await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );
    assert_error(
        &server.put("/_matrix/client/v3/devices/NOPE", Some(&token), json!({"display_name": "x"})).await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );
    // Another user's device is invisible.
    let (_, other, _) = server.register("bob").await;
    assert_error(
        &server.get(&format!("/_matrix/client/v3/devices/{device}"), Some(&other)).await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );
    server.stop().await;
}

async fn delete_needs_password(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, token, _) = server.register("carol").await;
    let (phone_token, phone) = server.login("carol", Some("PHONE")).await;
    let path = format!("/_matrix/client/v3/devices/{phone}");

    // First: 401 with the password flow.
    let (status, body) = server.request(Method::DELETE, &path, Some(&token), Some(json!({}))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["flows"], json!([{"stages": ["m.login.password"]}]));
    let session = body["session"].as_str().unwrap().to_owned();

    // A wrong password: 401 with M_FORBIDDEN, and the device is still there.
    let wrong = json!({"auth": {"type": "m.login.password", "session": session, "password": "Wrong-Pass-1",
                                "identifier": {"type": "m.id.user", "user": "carol"}}});
    let (status, body) = server.request(Method::DELETE, &path, Some(&token), Some(wrong)).await;
    assert_eq!((status, body["errcode"].clone()), (StatusCode::UNAUTHORIZED, json!("M_FORBIDDEN")), "{body}");
    assert_eq!(server.get("/_matrix/client/v3/account/whoami", Some(&phone_token)).await.0, StatusCode::OK);

    // Someone else's password does not do either.
    server.register("mallory").await;
    let other = json!({"auth": {"type": "m.login.password", "session": session, "password": PASSWORD,
                                "identifier": {"type": "m.id.user", "user": "mallory"}}});
    let (status, body) = server.request(Method::DELETE, &path, Some(&token), Some(other)).await;
    assert_eq!((status, body["errcode"].clone()), (StatusCode::UNAUTHORIZED, json!("M_FORBIDDEN")), "{body}");
    assert!(body.get("completed").is_none_or(|c| c == &json!([])), "{body}");
    assert_eq!(server.get("/_matrix/client/v3/account/whoami", Some(&phone_token)).await.0, StatusCode::OK);

    let right = json!({"auth": {"type": "m.login.password", "session": session, "password": PASSWORD,
                                "identifier": {"type": "m.id.user", "user": "@carol:localhost"}}});
    let (status, body) = server.request(Method::DELETE, &path, Some(&token), Some(right)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_error(
        &server.get("/_matrix/client/v3/account/whoami", Some(&phone_token)).await,
        StatusCode::UNAUTHORIZED,
        "M_UNKNOWN_TOKEN",
    );
    let (_, devices) = server.get("/_matrix/client/v3/devices", Some(&token)).await;
    assert_eq!(devices["devices"].as_array().unwrap().len(), 1);

    // Bulk delete, with the password in one go.
    let (t1, d1) = server.login("carol", None).await;
    let (_, d2) = server.login("carol", None).await;
    let (status, body) = server
        .post(
            "/_matrix/client/v3/delete_devices",
            Some(&token),
            json!({"devices": [d1, d2], "auth": {"type": "m.login.password", "password": PASSWORD,
                   "identifier": {"type": "m.id.user", "user": "carol"}}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_error(
        &server.get("/_matrix/client/v3/account/whoami", Some(&t1)).await,
        StatusCode::UNAUTHORIZED,
        "M_UNKNOWN_TOKEN",
    );
    let (_, devices) = server.get("/_matrix/client/v3/devices", Some(&token)).await;
    assert_eq!(devices["devices"].as_array().unwrap().len(), 1);
    server.stop().await;
}

backend_tests!(list_get_rename, delete_needs_password);
