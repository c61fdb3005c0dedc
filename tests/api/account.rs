//! Password change and deactivation.

use reqwest::StatusCode;
use serde_json::json;

use crate::{
    backend_tests,
    common::{Backend, PASSWORD, TestServer, assert_error},
};

const NEW_PASSWORD: &str = "Another-Secret-77";

fn password_auth(user: &str, password: &str) -> serde_json::Value {
    json!({"type": "m.login.password", "password": password, "identifier": {"type": "m.id.user", "user": user}})
}

async fn change_password_signs_out_other_devices(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, token, _) = server.register("alice").await;
    let (other, _) = server.login("alice", None).await;

    // UIA first.
    let (status, body) =
        server.post("/_matrix/client/v3/account/password", Some(&token), json!({"new_password": NEW_PASSWORD})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    // A weak new password is refused, and the old password still works.
    assert_error(
        &server
            .post(
                "/_matrix/client/v3/account/password",
                Some(&token),
                json!({"new_password": "weak", "auth": password_auth("alice", PASSWORD)}),
            )
            .await,
        StatusCode::BAD_REQUEST,
        "M_WEAK_PASSWORD",
    );
    let (status, body) = server
        .post(
            "/_matrix/client/v3/account/password",
            Some(&token),
            json!({"new_password": NEW_PASSWORD, "auth": password_auth("alice", PASSWORD)}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(server.get("/_matrix/client/v3/account/whoami", Some(&token)).await.0, StatusCode::OK);
    assert_error(
        &server.get("/_matrix/client/v3/account/whoami", Some(&other)).await,
        StatusCode::UNAUTHORIZED,
        "M_UNKNOWN_TOKEN",
    );

    let login = |password: &str| json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": password});
    assert_error(
        &server.post("/_matrix/client/v3/login", None, login(PASSWORD)).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    let (status, body) = server.post("/_matrix/client/v3/login", None, login(NEW_PASSWORD)).await;
    assert_eq!(status, StatusCode::OK);
    let kept = body["access_token"].as_str().unwrap().to_owned();

    // logout_devices: false keeps the others.
    let (status, _) = server
        .post(
            "/_matrix/client/v3/account/password",
            Some(&token),
            json!({"new_password": PASSWORD, "logout_devices": false, "auth": password_auth("alice", NEW_PASSWORD)}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(server.get("/_matrix/client/v3/account/whoami", Some(&kept)).await.0, StatusCode::OK);
    server.stop().await;
}

async fn deactivation(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, token, _) = server.register("bob").await;
    let (status, _) = server.post("/_matrix/client/v3/account/deactivate", Some(&token), json!({})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = server
        .post("/_matrix/client/v3/account/deactivate", Some(&token), json!({"auth": password_auth("bob", PASSWORD)}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["id_server_unbind_result"], "no-support");

    assert_error(
        &server.get("/_matrix/client/v3/account/whoami", Some(&token)).await,
        StatusCode::UNAUTHORIZED,
        "M_UNKNOWN_TOKEN",
    );
    let login =
        json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "bob"}, "password": PASSWORD});
    assert_error(
        &server.post("/_matrix/client/v3/login", None, login).await,
        StatusCode::FORBIDDEN,
        "M_USER_DEACTIVATED",
    );
    // The name stays taken.
    assert_error(
        &server.get("/_matrix/client/v3/register/available?username=bob", None).await,
        StatusCode::BAD_REQUEST,
        "M_USER_IN_USE",
    );
    // The profile is gone.
    assert_error(
        &server.get("/_matrix/client/v3/profile/@bob:localhost", None).await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );
    server.stop().await;
}

async fn account_data(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, token, _) = server.register("alice").await;
    let (_, other, _) = server.register("bob").await;
    let path = format!("/_matrix/client/v3/user/{alice}/account_data/org.example.settings");

    assert_error(&server.get(&path, Some(&token)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let (status, _) = server.put(&path, Some(&token), json!({"theme": "dark", "n": 1})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = server.get(&path, Some(&token)).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"theme": "dark", "n": 1})));
    let (status, _) = server.put(&path, Some(&token), json!({"theme": "light"})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(server.get(&path, Some(&token)).await.1, json!({"theme": "light"}));

    // Direct chats, as clients store them.
    let direct = format!("/_matrix/client/v3/user/{alice}/account_data/m.direct");
    assert_eq!(
        server.put(&direct, Some(&token), json!({"@bob:localhost": ["!room:localhost"]})).await.0,
        StatusCode::OK
    );
    assert_eq!(server.get(&direct, Some(&token)).await.1["@bob:localhost"][0], "!room:localhost");

    // Per room, separate from global.
    let room_path = format!("/_matrix/client/v3/user/{alice}/rooms/!abc:localhost/account_data/org.example.settings");
    assert_error(&server.get(&room_path, Some(&token)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    assert_eq!(server.put(&room_path, Some(&token), json!({"x": 1})).await.0, StatusCode::OK);
    assert_eq!(server.get(&room_path, Some(&token)).await.1, json!({"x": 1}));

    assert_error(&server.get(&path, Some(&other)).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    assert_error(&server.put(&path, Some(&other), json!({})).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    assert_error(
        &server
            .put(&format!("/_matrix/client/v3/user/{alice}/account_data/m.push_rules"), Some(&token), json!({}))
            .await,
        StatusCode::METHOD_NOT_ALLOWED,
        "M_BAD_JSON",
    );
    assert_error(&server.put(&path, Some(&token), json!([1, 2])).await, StatusCode::BAD_REQUEST, "M_BAD_JSON");
    server.stop().await;
}

backend_tests!(change_password_signs_out_other_devices, deactivation, account_data);
