//! Bad input at the HTTP layer, refused in one place (the `Ruma<T>` extractor) with the
//! spec's errcode on every endpoint: NUL characters in paths, queries and JSON strings,
//! path arguments over 255 bytes, and a login body that used to panic ruma.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::{Backend, PASSWORD, TestServer, assert_error};

/// A user with a room and a device, and paths built from them.
struct Fixture {
    server: TestServer,
    user: String,
    token: String,
    device: String,
    room: String,
}

async fn fixture(backend: Backend) -> Fixture {
    let server = TestServer::start(backend).await;
    let (user, token, device) = server.register("prober").await;
    let room = server.create_room(&token, json!({"name": "probe"})).await;
    Fixture { server, user, token, device, room }
}

impl Fixture {
    /// Sends each request and asserts `400` with `errcode`; then checks the server still
    /// answers this user.
    async fn assert_all(&self, requests: &[(Method, String, Option<Value>)], errcode: &str) {
        for (method, path, body) in requests {
            let result = self.server.request(method.clone(), path, Some(&self.token), body.clone()).await;
            assert_eq!(result.0, StatusCode::BAD_REQUEST, "{method} {path}: {}", result.1);
            assert_eq!(result.1["errcode"], errcode, "{method} {path}: {}", result.1);
            assert!(result.1["error"].is_string(), "{method} {path}: {}", result.1);
        }
        let (status, body) = self.server.get("/_matrix/client/v3/account/whoami", Some(&self.token)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
}

const V3: &str = "/_matrix/client/v3";

async fn nul_in_paths_and_queries_is_invalid_param(backend: Backend) {
    let f = fixture(backend).await;
    let (user, room, device) = (&f.user, &f.room, &f.device);
    let put = |path: String, body: Value| (Method::PUT, format!("{V3}{path}"), Some(body));
    let get = |path: String| (Method::GET, format!("{V3}{path}"), None);
    let text = json!({"msgtype": "m.text", "body": "hi"});
    f.assert_all(
        &[
            put(format!("/rooms/{room}/send/m.room.message%00/t1"), text.clone()),
            put(format!("/rooms/{room}/send/m.room.message/t%00"), text.clone()),
            put(format!("/rooms/{room}/state/m.room.topic/key%00"), json!({"topic": "x"})),
            put(format!("/rooms/{room}/state/x.custom%00/"), json!({})),
            put(format!("/user/{user}/account_data/x.type%00"), json!({})),
            put(format!("/user/{user}/rooms/{room}/account_data/x.type%00"), json!({})),
            put(format!("/user/{user}/rooms/{room}/tags/t%00"), json!({})),
            put(format!("/devices/{device}%00"), json!({"display_name": "x"})),
            put("/sendToDevice/x.type%00/t2".to_string(), json!({"messages": {}})),
            put("/sendToDevice/x.type/t%00".to_string(), json!({"messages": {}})),
            put(format!("/profile/{user}/x.field%00"), json!({"x.field\u{0}": "v"})),
            put("/directory/room/%23a%00:localhost".to_string(), json!({"room_id": room})),
            put(format!("/rooms/{room}/typing/{user}%00"), json!({"typing": false})),
            get("/profile/@a%00:localhost".to_string()),
            get(format!("/rooms/{room}/event/$x%00")),
            get(format!("/rooms/{room}/messages?dir=b&from=s1%00")),
            get("/sync?filter=%00".to_owned()),
            get("/publicRooms?server=a%00".to_owned()),
            get("/keys/changes?from=s1%00&to=s2".to_owned()),
            get(format!("/rooms/{room}/members?not_membership=join&at=%00")),
        ],
        "M_INVALID_PARAM",
    )
    .await;
    f.server.stop().await;
}

async fn nul_in_json_strings_is_bad_json(backend: Backend) {
    let f = fixture(backend).await;
    let (user, room, device) = (&f.user, &f.room, &f.device);
    let req = |method: Method, path: String, body: Value| (method, format!("{V3}{path}"), Some(body));
    f.assert_all(
        &[
            req(Method::PUT, format!("/presence/{user}/status"), json!({"presence": "online", "status_msg": "a\u{0}"})),
            req(Method::PUT, format!("/profile/{user}/displayname"), json!({"displayname": "a\u{0}b"})),
            req(Method::PUT, format!("/devices/{device}"), json!({"display_name": "\u{0}"})),
            req(Method::POST, "/user_directory/search".into(), json!({"search_term": "pro\u{0}"})),
            req(Method::POST, "/createRoom".into(), json!({"name": "a\u{0}"})),
            req(Method::PUT, format!("/rooms/{room}/send/m.room.message/t3"), json!({"msgtype": "m.text", "body": "\u{0}"})),
            req(Method::PUT, format!("/rooms/{room}/state/m.room.topic/"), json!({"topic": "x", "k\u{0}": 1})),
            req(Method::PUT, format!("/user/{user}/account_data/x.type"), json!({"k\u{0}": 1})),
            req(
                Method::PUT,
                "/sendToDevice/x.type/t4".into(),
                json!({"messages": {user: {"*": {"a\u{0}": 1}}}}),
            ),
            req(
                Method::POST,
                "/keys/upload".into(),
                json!({"one_time_keys": {"signed_curve25519:AA\u{0}": {"key": "k", "signatures": {}}}}),
            ),
            req(
                Method::POST,
                "/login".into(),
                json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "a\u{0}"}, "password": PASSWORD}),
            ),
        ],
        "M_BAD_JSON",
    )
    .await;
    // The same characters written any other way are fine: an escaped backslash followed by
    // `u0000` is six ordinary characters.
    let (status, body) = f
        .server
        .put(
            &format!("{V3}/rooms/{room}/send/m.room.message/t5"),
            Some(&f.token),
            json!({"msgtype": "m.text", "body": "\\u0000"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    f.server.stop().await;
}

async fn path_arguments_over_255_bytes_are_invalid_param(backend: Backend) {
    let f = fixture(backend).await;
    let (user, room, device) = (&f.user, &f.room, &f.device);
    let long = "a".repeat(256);
    let put = |path: String, body: Value| (Method::PUT, format!("{V3}{path}"), Some(body));
    let get = |path: String| (Method::GET, format!("{V3}{path}"), None);
    let text = json!({"msgtype": "m.text", "body": "hi"});
    f.assert_all(
        &[
            put(format!("/rooms/{room}/send/{long}/t1"), text.clone()),
            put(format!("/rooms/{room}/send/m.room.message/{long}"), text.clone()),
            put(format!("/rooms/{room}/state/{long}/"), json!({})),
            put(format!("/rooms/{room}/state/m.room.topic/{long}"), json!({"topic": "x"})),
            put(format!("/user/{user}/account_data/{long}"), json!({})),
            put(format!("/user/{user}/rooms/{room}/account_data/{long}"), json!({})),
            put(format!("/user/{user}/rooms/{room}/tags/{long}"), json!({})),
            put(format!("/sendToDevice/m.x/{long}"), json!({"messages": {}})),
            put(format!("/sendToDevice/{long}/t2"), json!({"messages": {}})),
            put(format!("/devices/{device}{long}"), json!({"display_name": "x"})),
            get(format!("/profile/@{}:localhost", "a".repeat(250))),
            get(format!("/rooms/!{long}:localhost/state")),
            get(format!("/rooms/{room}/event/${long}")),
            get(format!("/directory/room/%23{long}:localhost")),
        ],
        "M_INVALID_PARAM",
    )
    .await;
    // A profile field name has the spec's own errcode for this.
    let field = f.server.put(&format!("{V3}/profile/{user}/{long}"), Some(&f.token), json!({long.clone(): "v"})).await;
    assert_error(&field, StatusCode::BAD_REQUEST, "M_KEY_TOO_LARGE");
    // 255 bytes is allowed.
    let (status, body) =
        f.server.put(&format!("{V3}/user/{user}/account_data/{}", "t".repeat(255)), Some(&f.token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    f.server.stop().await;
}

/// ruma-client-api 0.25.2 panics on a login body without `type`; it was a dropped
/// connection, and is now `400 M_BAD_JSON`.
async fn login_without_a_type_is_bad_json(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (user, _, _) = server.register("typeless").await;
    for body in [
        json!({"identifier": {"type": "m.id.user", "user": user}, "password": PASSWORD}),
        json!({}),
        json!({"type": 5, "password": PASSWORD}),
    ] {
        let result = server.post("/_matrix/client/v3/login", None, body.clone()).await;
        assert_error(&result, StatusCode::BAD_REQUEST, "M_BAD_JSON");
    }
    // No body at all reads as `{}`: the same answer, not a panic.
    let resp = server.http.post(format!("{}/_matrix/client/v3/login", server.base)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(resp.json::<Value>().await.unwrap()["errcode"], "M_BAD_JSON");
    // An unknown type is the spec's `M_UNKNOWN`, and the proper body still logs in.
    let result = server.post("/_matrix/client/v3/login", None, json!({"type": "m.login.magic"})).await;
    assert_error(&result, StatusCode::BAD_REQUEST, "M_UNKNOWN");
    server.login(&user, None).await;
    server.stop().await;
}

crate::backend_tests!(
    nul_in_paths_and_queries_is_invalid_param,
    nul_in_json_strings_is_bad_json,
    path_arguments_over_255_bytes_are_invalid_param,
    login_without_a_type_is_bad_json,
);
