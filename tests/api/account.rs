//! Password change and deactivation, the limits on password checks in UIA, account
//! data and tags, and the limits on names.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

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
    let (status, body) = server.post("/_matrix/client/v3/account/deactivate", Some(&token), json!({})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["flows"], json!([{"stages": ["m.login.password"]}]));
    assert!(body["session"].is_string(), "{body}");
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

/// An endpoint guarded by password UIA, for `uia_password_checks_are_limited`.
struct Guarded {
    method: Method,
    path: String,
    body: Value,
}

/// Sends `guarded` with `password` in its UIA session, from `address` (the server
/// trusts the loopback proxy's `X-Forwarded-For`).
async fn try_password(
    server: &TestServer,
    token: &str,
    user: &str,
    guarded: &Guarded,
    session: &str,
    password: &str,
    address: &str,
) -> (StatusCode, Value) {
    let mut body = guarded.body.clone();
    body["auth"] = json!({"type": "m.login.password", "session": session, "password": password,
                          "identifier": {"type": "m.id.user", "user": user}});
    server
        .request_with_headers(
            guarded.method.clone(),
            &guarded.path,
            Some(token),
            Some(body),
            &[("x-forwarded-for", address)],
        )
        .await
}

/// The endpoints guarded by password UIA, for `user` with `device`.
fn guarded_endpoints(user_id: &str, device: &str) -> Vec<Guarded> {
    vec![
        Guarded {
            method: Method::POST,
            path: "/_matrix/client/v3/account/password".into(),
            body: json!({"new_password": NEW_PASSWORD}),
        },
        Guarded {
            method: Method::POST,
            path: "/_matrix/client/v3/delete_devices".into(),
            body: json!({"devices": [device]}),
        },
        Guarded { method: Method::DELETE, path: format!("/_matrix/client/v3/devices/{device}"), body: json!({}) },
        Guarded { method: Method::POST, path: "/_matrix/client/v3/account/deactivate".into(), body: json!({}) },
        Guarded {
            method: Method::POST,
            path: "/_matrix/client/v3/keys/device_signing/upload".into(),
            body: json!({"master_key": {"user_id": user_id, "usage": ["master"], "keys": {"ed25519:M2": "M2"}}}),
        },
    ]
}

/// Registers `name` with a master key (so that replacing it takes the password).
async fn user_with_master_key(server: &TestServer, name: &str) -> (String, String, String) {
    let (user_id, token, device) = server.register(name).await;
    let master = json!({"master_key": {"user_id": user_id, "usage": ["master"], "keys": {"ed25519:M": "M"}}});
    let (status, body) = server.post("/_matrix/client/v3/keys/device_signing/upload", Some(&token), master).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    (user_id, token, device)
}

async fn uia_password_checks_are_limited(backend: Backend) {
    let server = TestServer::start_with(backend, |c| {
        c.rate_limits.enabled = true;
        c.rate_limits.failed_password.burst = 3;
        c.rate_limits.failed_password.per_second = 0.001;
        c.rate_limits.registration.burst = 100;
        c.listeners.trusted_proxies = vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
    })
    .await;
    // Each endpoint, for a user of its own and from an address of its own: twenty
    // wrong passwords at once get three 401s (wrong password), then 429s.
    for i in 0..5 {
        let name = format!("user{i}");
        let (user_id, token, device) = user_with_master_key(&server, &name).await;
        let g = &guarded_endpoints(&user_id, &device)[i];
        let (status, first) = server.request(g.method.clone(), &g.path, Some(&token), Some(g.body.clone())).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{}: {first}", g.path);
        let session = first["session"].as_str().unwrap().to_owned();
        let address = format!("192.0.2.{}", 10 + i);
        let tries = (0..20).map(|_| try_password(&server, &token, &name, g, &session, "Wrong-Pass-123", &address));
        let results = futures_util::future::join_all(tries).await;
        for r in &results {
            let errcode = if r.0 == StatusCode::UNAUTHORIZED { "M_FORBIDDEN" } else { "M_LIMIT_EXCEEDED" };
            assert_eq!(r.1["errcode"], errcode, "{}: {r:?}", g.path);
        }
        let wrong = results.iter().filter(|r| r.0 == StatusCode::UNAUTHORIZED).count();
        let limited = results.iter().filter(|r| r.0 == StatusCode::TOO_MANY_REQUESTS).count();
        assert_eq!((wrong, limited), (3, 17), "{}", g.path);
        // Nothing happened: the account still works.
        assert_eq!(server.get("/_matrix/client/v3/account/whoami", Some(&token)).await.0, StatusCode::OK);
    }

    // Per address: another user's wrong password from an address that is used up
    // is refused before it is checked.
    let (alice_id, alice, alice_device) = user_with_master_key(&server, "alice").await;
    let g = &guarded_endpoints(&alice_id, &alice_device)[0];
    let (_, first) = server.request(g.method.clone(), &g.path, Some(&alice), Some(g.body.clone())).await;
    let session = first["session"].as_str().unwrap().to_owned();
    let result = try_password(&server, &alice, "alice", g, &session, "Wrong-Pass-123", "192.0.2.10").await;
    assert_error(&result, StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED");

    // Per user: three wrong passwords from three addresses, then even the right one
    // from a fourth is refused, on every guarded endpoint.
    for address in ["198.51.100.1", "198.51.100.2", "198.51.100.3"] {
        let result = try_password(&server, &alice, "alice", g, &session, "Wrong-Pass-123", address).await;
        assert_eq!((result.0, &result.1["errcode"]), (StatusCode::UNAUTHORIZED, &json!("M_FORBIDDEN")), "{result:?}");
    }
    for g in &guarded_endpoints(&alice_id, &alice_device) {
        let (_, first) = server.request(g.method.clone(), &g.path, Some(&alice), Some(g.body.clone())).await;
        let session = first["session"].as_str().unwrap().to_owned();
        let result = try_password(&server, &alice, "alice", g, &session, PASSWORD, "198.51.100.4").await;
        assert_error(&result, StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED");
    }
    assert_eq!(server.get("/_matrix/client/v3/account/whoami", Some(&alice)).await.0, StatusCode::OK);
    server.stop().await;
}

async fn concurrent_tag_writes_all_survive(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_id, alice, _) = server.register("alice").await;
    let room = server.create_room(&alice, json!({})).await;
    let tags = format!("/_matrix/client/v3/user/{alice_id}/rooms/{room}/tags");
    let paths: Vec<String> = (0..20).map(|i| format!("{tags}/u.tag{i}")).collect();
    let puts = paths.iter().enumerate().map(|(i, p)| server.put(p, Some(&alice), json!({"order": i as f64 / 20.0})));
    for (status, body) in futures_util::future::join_all(puts).await {
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (status, body) = server.get(&tags, Some(&alice)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let got = body["tags"].as_object().unwrap();
    assert_eq!(got.len(), 20, "every tag survives: {body}");
    assert_eq!(got["u.tag10"]["order"], 0.5);

    // Removing half of them at once leaves exactly the other half.
    let deletes = paths[..10].iter().map(|p| server.request(Method::DELETE, p, Some(&alice), None));
    for (status, body) in futures_util::future::join_all(deletes).await {
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (_, body) = server.get(&tags, Some(&alice)).await;
    let mut names: Vec<&String> = body["tags"].as_object().unwrap().keys().collect();
    names.sort();
    let mut expected: Vec<String> = (10..20).map(|i| format!("u.tag{i}")).collect();
    expected.sort();
    assert_eq!(names, expected.iter().collect::<Vec<_>>());
    server.stop().await;
}

async fn names_over_limits_are_refused(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice_id, alice, device) = server.register("alice").await;
    let room = server.create_room(&alice, json!({})).await;
    let long = |n: usize| "x".repeat(n);
    let profile = |field: &str| format!("/_matrix/client/v3/profile/{alice_id}/{field}");
    let account_data = |t: &str| format!("/_matrix/client/v3/user/{alice_id}/account_data/{t}");
    let room_data = |t: &str| format!("/_matrix/client/v3/user/{alice_id}/rooms/{room}/account_data/{t}");
    let tag = |t: &str| format!("/_matrix/client/v3/user/{alice_id}/rooms/{room}/tags/{t}");
    let login = |extra: Value| {
        let mut body = json!({"type": "m.login.password", "password": PASSWORD,
                              "identifier": {"type": "m.id.user", "user": "alice"}});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let presence = format!("/_matrix/client/v3/presence/{alice_id}/status");
    let big_field = json!({"org.example.big": long(40_000)});
    assert_eq!(server.put(&profile("org.example.big"), Some(&alice), big_field).await.0, StatusCode::OK);

    // (what, method, path, body, status, errcode) over the limit, and the same at the
    // limit (None: not checked at the limit).
    type Case = (&'static str, Method, String, Value, StatusCode, &'static str, Option<(String, Value)>);
    let cases: Vec<Case> = vec![
        (
            "display name of 257 characters",
            Method::PUT,
            profile("displayname"),
            json!({"displayname": "é".repeat(257)}),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
            Some((profile("displayname"), json!({"displayname": "é".repeat(256)}))),
        ),
        (
            "avatar URL of 1025 bytes",
            Method::PUT,
            profile("avatar_url"),
            json!({"avatar_url": format!("mxc://localhost/{}", long(1025 - 16))}),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
            Some((profile("avatar_url"), json!({"avatar_url": format!("mxc://localhost/{}", long(1024 - 16))}))),
        ),
        (
            "profile field name of 256 bytes",
            Method::PUT,
            profile(&long(256)),
            json!({long(256): "v"}),
            StatusCode::BAD_REQUEST,
            "M_KEY_TOO_LARGE",
            Some((profile(&long(255)), json!({long(255): "v"}))),
        ),
        (
            "profile over 64 KiB",
            Method::PUT,
            profile("org.example.more"),
            json!({"org.example.more": long(30_000)}),
            StatusCode::BAD_REQUEST,
            "M_PROFILE_TOO_LARGE",
            None,
        ),
        (
            "device display name of 101 characters",
            Method::PUT,
            format!("/_matrix/client/v3/devices/{device}"),
            json!({"display_name": long(101)}),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
            Some((format!("/_matrix/client/v3/devices/{device}"), json!({"display_name": long(100)}))),
        ),
        (
            "initial device display name of 101 characters at login",
            Method::POST,
            "/_matrix/client/v3/login".into(),
            login(json!({"initial_device_display_name": long(101)})),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
            Some(("/_matrix/client/v3/login".into(), login(json!({"initial_device_display_name": long(100)})))),
        ),
        (
            "device id of 256 bytes at login",
            Method::POST,
            "/_matrix/client/v3/login".into(),
            login(json!({"device_id": long(256)})),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
            Some(("/_matrix/client/v3/login".into(), login(json!({"device_id": long(255)})))),
        ),
        (
            "initial device display name of 101 characters at registration",
            Method::POST,
            "/_matrix/client/v3/register".into(),
            json!({"username": "newbie", "password": PASSWORD, "initial_device_display_name": long(101),
                   "auth": {"type": "m.login.dummy"}}),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
            None,
        ),
        (
            "presence status_msg of 1025 bytes",
            Method::PUT,
            presence.clone(),
            json!({"presence": "online", "status_msg": long(1025)}),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
            Some((presence.clone(), json!({"presence": "online", "status_msg": long(1024)}))),
        ),
        (
            "global account data type of 256 bytes",
            Method::PUT,
            account_data(&long(256)),
            json!({}),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
            Some((account_data(&long(255)), json!({}))),
        ),
        (
            "room account data type of 256 bytes",
            Method::PUT,
            room_data(&long(256)),
            json!({}),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
            Some((room_data(&long(255)), json!({}))),
        ),
        (
            "account data over 64 KiB",
            Method::PUT,
            account_data("org.example.big"),
            json!({"x": long(70_000)}),
            StatusCode::PAYLOAD_TOO_LARGE,
            "M_TOO_LARGE",
            None,
        ),
        (
            "tag of 256 bytes",
            Method::PUT,
            tag(&long(256)),
            json!({}),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
            Some((tag(&long(255)), json!({}))),
        ),
    ];
    for (what, method, path, body, status, errcode, at_limit) in cases {
        let result = server.request(method.clone(), &path, Some(&alice), Some(body)).await;
        assert_eq!((result.0, result.1["errcode"].as_str()), (status, Some(errcode)), "{what}: {}", result.1);
        assert!(result.1["error"].is_string(), "{what}");
        if let Some((path, body)) = at_limit {
            let result = server.request(method, &path, Some(&alice), Some(body)).await;
            assert_eq!(result.0, StatusCode::OK, "{what}, at the limit: {}", result.1);
        }
    }
    // Nothing over a limit was stored.
    let (_, stored) = server.get(&format!("/_matrix/client/v3/profile/{alice_id}"), None).await;
    assert!(stored.get("org.example.more").is_none(), "{stored}");
    assert_eq!(stored["displayname"].as_str().unwrap().chars().count(), 256);
    assert!(!server.running.as_ref().unwrap().services.store.user_exists("@newbie:localhost").await.unwrap());

    // Tags: many names, each under the limit, still cannot grow a room's tags past 64 KiB.
    let mut refused = None;
    for i in 0..400 {
        let result = server.put(&tag(&format!("u.{i:03}{}", long(240))), Some(&alice), json!({})).await;
        if result.0 != StatusCode::OK {
            refused = Some(result);
            break;
        }
    }
    let refused = refused.expect("the tags hit their limit");
    assert_error(&refused, StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE");
    server.stop().await;
}

backend_tests!(
    change_password_signs_out_other_devices,
    deactivation,
    account_data,
    uia_password_checks_are_limited,
    concurrent_tag_writes_all_survive,
    names_over_limits_are_refused
);
