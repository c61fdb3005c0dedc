//! Registration: token and open modes, username and password rules, UIA sessions.

use convo::config::RegistrationMode;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{
    backend_tests,
    common::{Backend, PASSWORD, TestServer, assert_error},
};

const REGISTER: &str = "/_matrix/client/v3/register";

async fn token_registration_flow(backend: Backend) {
    let server = TestServer::start_with(backend, |c| {
        c.registration.mode = RegistrationMode::Token;
        c.registration.tokens = vec!["static-token".into()];
    })
    .await;
    let store = &server.running.as_ref().unwrap().services.store;
    store.create_registration_token("one-use", Some(1), None, 0).await.unwrap();

    // Without auth: 401 with the token flow and a session.
    let (status, body) = server.post(REGISTER, None, json!({"username": "alice", "password": PASSWORD})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["flows"], json!([{"stages": ["m.login.registration_token", "m.login.dummy"]}]));
    let session = body["session"].as_str().unwrap().to_owned();

    // A wrong token: 401 again, with M_FORBIDDEN, nothing completed.
    let (status, body) = server
        .post(
            REGISTER,
            None,
            json!({"username": "alice", "password": PASSWORD,
                   "auth": {"type": "m.login.registration_token", "token": "wrong", "session": session}}),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["errcode"], "M_FORBIDDEN");
    assert_eq!(body["session"], session.as_str());

    // Validity endpoint.
    let valid = |t: &str| format!("/_matrix/client/v1/register/m.login.registration_token/validity?token={t}");
    assert_eq!(server.get(&valid("one-use"), None).await.1["valid"], true);
    assert_eq!(server.get(&valid("static-token"), None).await.1["valid"], true);
    assert_eq!(server.get(&valid("nope"), None).await.1["valid"], false);

    // The right token passes the token stage; while that registration is pending,
    // the one-use token cannot start another.
    let (status, body) = server
        .post(
            REGISTER,
            None,
            json!({"username": "alice", "password": PASSWORD,
                   "auth": {"type": "m.login.registration_token", "token": "one-use", "session": session}}),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["completed"], json!(["m.login.registration_token"]));
    let info = store.get_registration_token("one-use").await.unwrap().unwrap();
    assert_eq!((info.completed, info.pending), (0, 1));
    assert_eq!(server.get(&valid("one-use"), None).await.1["valid"], false);

    // The dummy stage completes registration.
    let (status, body) = server
        .post(
            REGISTER,
            None,
            json!({"username": "alice", "password": PASSWORD, "initial_device_display_name": "Alice's phone",
                   "auth": {"type": "m.login.dummy", "session": session}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user_id"], "@alice:localhost");
    let token = body["access_token"].as_str().unwrap();
    assert!(token.len() >= 43, "tokens carry 256 bits");
    let device = body["device_id"].as_str().unwrap();
    let (_, devices) = server.get("/_matrix/client/v3/devices", Some(token)).await;
    assert_eq!(devices["devices"][0]["device_id"], device);
    assert_eq!(devices["devices"][0]["display_name"], "Alice's phone");

    // The one-use token is now spent; the static one is not.
    assert_eq!(server.get(&valid("one-use"), None).await.1["valid"], false);
    let info = store.get_registration_token("one-use").await.unwrap().unwrap();
    assert_eq!((info.completed, info.pending), (1, 0));
    let (status, body) = server
        .post(
            REGISTER,
            None,
            json!({"username": "bob", "password": PASSWORD,
              "auth": {"type": "m.login.registration_token", "token": "one-use"}}),
        )
        .await;
    assert_eq!((status, &body["errcode"]), (StatusCode::UNAUTHORIZED, &json!("M_FORBIDDEN")), "{body}");
    let (status, body) = server
        .post(
            REGISTER,
            None,
            json!({"username": "bob", "password": PASSWORD,
              "auth": {"type": "m.login.registration_token", "token": "static-token"}}),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let bob_session = body["session"].clone();
    let (status, body) = server
        .post(
            REGISTER,
            None,
            json!({"username": "bob", "password": PASSWORD,
              "auth": {"type": "m.login.dummy", "session": bob_session}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // The dummy stage alone is not enough in token mode.
    let (status, body) = server
        .post(REGISTER, None, json!({"username": "carol", "password": PASSWORD, "auth": {"type": "m.login.dummy"}}))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["completed"], json!(["m.login.dummy"]));
    assert!(!server.running.as_ref().unwrap().services.store.user_exists("@carol:localhost").await.unwrap());

    // An auth object with neither type nor session reads as "no auth yet" (matrix-nio).
    let (status, body) = server
        .post(
            REGISTER,
            None,
            json!({"username": "carol", "password": PASSWORD, "auth": {"initial_device_display_name": "x"}}),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body["session"].is_string());
    // An unknown session is refused.
    assert_error(
        &server
            .post(
                REGISTER,
                None,
                json!({"username": "carol", "password": PASSWORD,
                     "auth": {"type": "m.login.dummy", "session": "no-such-session"}}),
            )
            .await,
        StatusCode::BAD_REQUEST,
        "M_UNKNOWN",
    );
    server.stop().await;
}

async fn open_and_closed_modes(backend: Backend) {
    let server = TestServer::start(backend.clone()).await;
    let (status, body) = server.post(REGISTER, None, json!({"username": "dan", "password": PASSWORD})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["flows"], json!([{"stages": ["m.login.dummy"]}]));
    // Element asks for the flows with an empty body before showing its form.
    let (status, body) = server.post(REGISTER, None, json!({})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["flows"], json!([{"stages": ["m.login.dummy"]}]));
    assert!(body["session"].is_string());
    let (user_id, _, _) = server.register("dan").await;
    assert_eq!(user_id, "@dan:localhost");

    // No username: one is made up.
    let (status, body) =
        server.post(REGISTER, None, json!({"password": PASSWORD, "auth": {"type": "m.login.dummy"}})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["user_id"].as_str().unwrap().ends_with(":localhost"));

    // inhibit_login: an account, no token.
    let (status, body) = server
        .post(
            REGISTER,
            None,
            json!({"username": "erin", "password": PASSWORD, "inhibit_login": true, "auth": {"type": "m.login.dummy"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user_id"], "@erin:localhost");
    assert!(body["access_token"].is_null() && body["device_id"].is_null(), "{body}");
    server.login("erin", None).await;

    // Guests are not allowed.
    assert_error(
        &server.post(&format!("{REGISTER}?kind=guest"), None, json!({})).await,
        StatusCode::FORBIDDEN,
        "M_GUEST_ACCESS_FORBIDDEN",
    );
    server.stop().await;

    let closed = TestServer::start_with(backend, |c| c.registration.mode = RegistrationMode::Closed).await;
    assert_error(
        &closed
            .post(REGISTER, None, json!({"username": "x", "password": PASSWORD, "auth": {"type": "m.login.dummy"}}))
            .await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    closed.stop().await;
}

async fn username_and_password_rules(backend: Backend) {
    let server = TestServer::start(backend).await;
    let attempt = |name: Value, password: &str| json!({"username": name, "password": password, "auth": {"type": "m.login.dummy"}});
    for bad in ["Alice", "with space", "_reserved", "ünïcode", "", "a:b"] {
        assert_error(
            &server.post(REGISTER, None, attempt(json!(bad), PASSWORD)).await,
            StatusCode::BAD_REQUEST,
            "M_INVALID_USERNAME",
        );
    }
    assert_error(
        &server.post(REGISTER, None, attempt(json!("x".repeat(300)), PASSWORD)).await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_USERNAME",
    );
    for weak in ["short1A", "nouppercase123", "NOLOWERCASE123", "NoDigitsAtAll", "Frank-12345"] {
        assert_error(
            &server.post(REGISTER, None, attempt(json!("frank"), weak)).await,
            StatusCode::BAD_REQUEST,
            "M_WEAK_PASSWORD",
        );
    }
    assert_error(
        &server.post(REGISTER, None, json!({"username": "frank", "auth": {"type": "m.login.dummy"}})).await,
        StatusCode::BAD_REQUEST,
        "M_MISSING_PARAM",
    );
    server.register("frank").await;
    assert_error(
        &server.post(REGISTER, None, attempt(json!("frank"), PASSWORD)).await,
        StatusCode::BAD_REQUEST,
        "M_USER_IN_USE",
    );

    let available = |n: &str| format!("/_matrix/client/v3/register/available?username={n}");
    let (status, body) = server.get(&available("grace"), None).await;
    assert_eq!((status, body["available"].clone()), (StatusCode::OK, json!(true)));
    assert_error(&server.get(&available("frank"), None).await, StatusCode::BAD_REQUEST, "M_USER_IN_USE");
    assert_error(&server.get(&available("Grace"), None).await, StatusCode::BAD_REQUEST, "M_INVALID_USERNAME");
    server.stop().await;
}

async fn registration_is_rate_limited(backend: Backend) {
    let server = TestServer::start_with(backend, |c| {
        c.rate_limits.enabled = true;
        c.rate_limits.registration.burst = 2;
        c.rate_limits.registration.per_second = 0.01;
    })
    .await;
    for _ in 0..2 {
        let (status, _) = server.get("/_matrix/client/v3/register/available?username=zed", None).await;
        assert_eq!(status, StatusCode::OK);
    }
    let limited = server.get("/_matrix/client/v3/register/available?username=zed", None).await;
    assert_error(&limited, StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED");
    assert!(limited.1["retry_after_ms"].as_u64().unwrap() > 1000, "{}", limited.1);
    server.stop().await;
}

/// One whole registration with a token, as Element does it: the flows, the token
/// stage, the dummy stage. Answers the final status and body.
async fn register_with_token(server: &TestServer, name: &str, token: &str) -> (StatusCode, Value) {
    let (status, body) = server.post(REGISTER, None, json!({"username": name, "password": PASSWORD})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let session = body["session"].as_str().unwrap().to_owned();
    let (status, body) = server
        .post(
            REGISTER,
            None,
            json!({"username": name, "password": PASSWORD,
                   "auth": {"type": "m.login.registration_token", "token": token, "session": session}}),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    if body["completed"] != json!(["m.login.registration_token"]) {
        // Refused at the token stage.
        assert_eq!(body["errcode"], "M_FORBIDDEN", "{body}");
        return (status, body);
    }
    server
        .post(
            REGISTER,
            None,
            json!({"username": name, "password": PASSWORD, "auth": {"type": "m.login.dummy", "session": session}}),
        )
        .await
}

/// Ten registrations at once with `token`: answers how many made an account.
async fn parallel_registrations(server: &TestServer, prefix: &str, token: &str) -> usize {
    let names: Vec<String> = (0..10).map(|i| format!("{prefix}{i}")).collect();
    let attempts = names.iter().map(|name| register_with_token(server, name, token));
    let results = futures_util::future::join_all(attempts).await;
    let made = results.iter().filter(|(status, _)| *status == StatusCode::OK).count();
    for (status, body) in results.iter().filter(|(status, _)| *status != StatusCode::OK) {
        // Refused, never a server error.
        assert!(status.is_client_error(), "{status} {body}");
        assert_eq!(body["errcode"], "M_FORBIDDEN", "{body}");
    }
    made
}

async fn token_uses_hold_under_concurrency(backend: Backend) {
    let server = TestServer::start_with(backend, |c| c.registration.mode = RegistrationMode::Token).await;
    let running = server.running.as_ref().unwrap();
    let store = &running.services.store;
    // The one-use token made at first start.
    let first = running.first_registration_token.clone().expect("a first token in token mode");
    assert_eq!(parallel_registrations(&server, "first", &first).await, 1);
    let info = store.get_registration_token(&first).await.unwrap().unwrap();
    assert_eq!((info.completed, info.pending), (1, 0));

    store.create_registration_token("one-use", Some(1), None, 0).await.unwrap();
    store.create_registration_token("three-uses", Some(3), None, 0).await.unwrap();
    assert_eq!(parallel_registrations(&server, "one", "one-use").await, 1);
    assert_eq!(parallel_registrations(&server, "three", "three-uses").await, 3);
    for (token, uses) in [("one-use", 1), ("three-uses", 3)] {
        let info = store.get_registration_token(token).await.unwrap().unwrap();
        assert_eq!((info.completed, info.pending), (uses, 0), "{token}");
    }
    // Spent: nobody else gets in.
    assert_eq!(register_with_token(&server, "late", "three-uses").await.1["errcode"], "M_FORBIDDEN");
    server.stop().await;
}

async fn one_uia_session_makes_one_account(backend: Backend) {
    let server = TestServer::start_with(backend, |c| c.registration.mode = RegistrationMode::Token).await;
    let store = &server.running.as_ref().unwrap().services.store;
    store.create_registration_token("three-uses", Some(3), None, 0).await.unwrap();
    let (_, body) = server.post(REGISTER, None, json!({"username": "first", "password": PASSWORD})).await;
    let session = body["session"].as_str().unwrap().to_owned();
    let (_, body) = server
        .post(
            REGISTER,
            None,
            json!({"username": "first", "password": PASSWORD,
                   "auth": {"type": "m.login.registration_token", "token": "three-uses", "session": session}}),
        )
        .await;
    assert_eq!(body["completed"], json!(["m.login.registration_token"]), "{body}");
    // Five requests finish the same session at once, each with another name.
    let finish = (0..10).map(|i| {
        server.post(
            REGISTER,
            None,
            json!({"username": format!("name{i}"), "password": PASSWORD,
                   "auth": {"type": "m.login.dummy", "session": session}}),
        )
    });
    let results = futures_util::future::join_all(finish).await;
    assert_eq!(results.iter().filter(|(status, _)| *status == StatusCode::OK).count(), 1, "{results:?}");
    for result in results.iter().filter(|(status, _)| *status != StatusCode::OK) {
        assert_error(result, StatusCode::BAD_REQUEST, "M_UNKNOWN");
    }
    let info = store.get_registration_token("three-uses").await.unwrap().unwrap();
    assert_eq!((info.completed, info.pending), (1, 0));
    server.stop().await;
}

async fn a_registration_counts_once_against_the_limit(backend: Backend) {
    let server = TestServer::start_with(backend, |c| {
        c.registration.mode = RegistrationMode::Token;
        c.registration.tokens = vec!["static-token".into()];
        c.rate_limits.enabled = true;
        c.rate_limits.registration.burst = 2;
        c.rate_limits.registration.per_second = 0.001;
    })
    .await;
    // Two registrations of three requests each fit in a burst of two.
    for name in ["ann", "ben"] {
        let (status, body) = register_with_token(&server, name, "static-token").await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // A third one is refused when it starts...
    let limited = server.post(REGISTER, None, json!({"username": "cat", "password": PASSWORD})).await;
    assert_error(&limited, StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED");
    // ...also when it names a session that does not exist.
    let bogus = json!({"username": "cat", "password": PASSWORD, "auth": {"type": "m.login.dummy", "session": "nope"}});
    assert_error(&server.post(REGISTER, None, bogus).await, StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED");
    server.stop().await;
}

backend_tests!(
    token_registration_flow,
    open_and_closed_modes,
    username_and_password_rules,
    registration_is_rate_limited,
    token_uses_hold_under_concurrency,
    one_uia_session_makes_one_account,
    a_registration_counts_once_against_the_limit
);
