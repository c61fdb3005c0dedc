//! Login, tokens, logout, refresh and the login rate limit.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::{
    backend_tests,
    common::{Backend, PASSWORD, TestServer, assert_error},
};

const LOGIN: &str = "/_matrix/client/v3/login";
const WHOAMI: &str = "/_matrix/client/v3/account/whoami";

fn password_login(user: &str, password: &str) -> serde_json::Value {
    json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": password})
}

async fn login_variants_and_whoami(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (status, body) = server.get(LOGIN, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["flows"], json!([{"type": "m.login.password"}]));

    server.register("alice").await;
    // By localpart, by full user id, in another case, and with the legacy `user` field.
    for user in ["alice", "@alice:localhost", "ALICE"] {
        let (status, body) = server.post(LOGIN, None, password_login(user, PASSWORD)).await;
        assert_eq!(status, StatusCode::OK, "{user}: {body}");
        assert_eq!(body["user_id"], "@alice:localhost");
        let (status, me) = server.get(WHOAMI, body["access_token"].as_str()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(me["user_id"], "@alice:localhost");
        assert_eq!(me["device_id"], body["device_id"]);
        assert_ne!(me["is_guest"], true);
    }
    let (status, _) =
        server.post(LOGIN, None, json!({"type": "m.login.password", "user": "alice", "password": PASSWORD})).await;
    assert_eq!(status, StatusCode::OK);

    assert_error(
        &server.post(LOGIN, None, password_login("alice", "Wrong-Pass-123")).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    assert_error(
        &server.post(LOGIN, None, password_login("nobody", PASSWORD)).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    assert_error(
        &server.post(LOGIN, None, password_login("@alice:elsewhere.org", PASSWORD)).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    assert_error(
        &server.post(LOGIN, None, json!({"type": "m.login.token", "token": "abc"})).await,
        StatusCode::BAD_REQUEST,
        "M_UNKNOWN",
    );
    server.stop().await;
}

async fn tokens_missing_unknown_and_logout(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, token, _) = server.register("bob").await;
    assert_error(&server.get(WHOAMI, None).await, StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN");
    let unknown = server.get(WHOAMI, Some("cva_not_a_real_token")).await;
    assert_error(&unknown, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
    assert_ne!(unknown.1["soft_logout"], true);

    // The deprecated query parameter still works.
    let (status, _) = server.get(&format!("{WHOAMI}?access_token={token}"), None).await;
    assert_eq!(status, StatusCode::OK);

    // Device reuse: logging in again with the same device id keeps one device.
    let (t2, d2) = server.login("bob", Some("LAPTOP")).await;
    let (t3, d3) = server.login("bob", Some("LAPTOP")).await;
    assert_eq!((d2.as_str(), d3.as_str()), ("LAPTOP", "LAPTOP"));
    let (_, devices) = server.get("/_matrix/client/v3/devices", Some(&t3)).await;
    assert_eq!(devices["devices"].as_array().unwrap().len(), 2, "{devices}");

    // Logout removes the device and every token it had.
    let (status, _) = server.post("/_matrix/client/v3/logout", Some(&t2), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_error(&server.get(WHOAMI, Some(&t2)).await, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
    assert_error(&server.get(WHOAMI, Some(&t3)).await, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
    assert_eq!(server.get(WHOAMI, Some(&token)).await.0, StatusCode::OK);

    // Logout all removes everything.
    let (t4, _) = server.login("bob", None).await;
    let (status, _) = server.post("/_matrix/client/v3/logout/all", Some(&t4), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    for t in [&token, &t4] {
        assert_error(&server.get(WHOAMI, Some(t)).await, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
    }
    let (_, devices) = server.get("/_matrix/client/v3/devices", Some(&server.login("bob", None).await.0)).await;
    assert_eq!(devices["devices"].as_array().unwrap().len(), 1);
    server.stop().await;
}

async fn refresh_tokens_rotate_and_expire(backend: Backend) {
    let server = TestServer::start_with(backend, |c| c.sessions.access_token_lifetime_ms = 1500).await;
    server.register("carol").await;
    let mut body = password_login("carol", PASSWORD);
    body["refresh_token"] = json!(true);
    let issued = std::time::Instant::now();
    // The server dates tokens by the wall clock, which may be stepped against the
    // monotonic one (a CI machine's clock being set): "not early" is measured by it.
    let issued_wall = std::time::SystemTime::now();
    let (status, login) = server.post(LOGIN, None, body).await;
    assert_eq!(status, StatusCode::OK, "{login}");
    assert_eq!(login["expires_in_ms"], 1500);
    let access = login["access_token"].as_str().unwrap().to_owned();
    let refresh = login["refresh_token"].as_str().unwrap().to_owned();
    assert_eq!(server.get(WHOAMI, Some(&access)).await.0, StatusCode::OK);

    // The token works until its lifetime is over, then stops (polled, at most 10 s).
    let expired = loop {
        let answer = server.get(WHOAMI, Some(&access)).await;
        if answer.0 != StatusCode::OK {
            break answer;
        }
        assert!(issued.elapsed() < std::time::Duration::from_secs(10), "the access token never expired");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let lived = issued_wall.elapsed().unwrap_or_default();
    assert!(lived >= std::time::Duration::from_millis(1500), "expired early: {lived:?}");
    assert_error(&expired, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
    assert_eq!(expired.1["soft_logout"], true);

    let (status, refreshed) = server.post("/_matrix/client/v3/refresh", None, json!({"refresh_token": refresh})).await;
    assert_eq!(status, StatusCode::OK, "{refreshed}");
    let access2 = refreshed["access_token"].as_str().unwrap().to_owned();
    let refresh2 = refreshed["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(refresh2, refresh);
    // Until the new tokens are used, the old refresh token still works (a lost response
    // must not lock the client out)...
    let (status, again) = server.post("/_matrix/client/v3/refresh", None, json!({"refresh_token": refresh})).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    // ...using the new access token retires it.
    let access3 = again["access_token"].as_str().unwrap().to_owned();
    assert_eq!(server.get(WHOAMI, Some(&access3)).await.0, StatusCode::OK);
    assert_error(
        &server.post("/_matrix/client/v3/refresh", None, json!({"refresh_token": refresh})).await,
        StatusCode::UNAUTHORIZED,
        "M_UNKNOWN_TOKEN",
    );
    // The second refresh with the old token revoked what the first one issued.
    assert_error(&server.get(WHOAMI, Some(&access2)).await, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
    assert_error(
        &server.post("/_matrix/client/v3/refresh", None, json!({"refresh_token": refresh2})).await,
        StatusCode::UNAUTHORIZED,
        "M_UNKNOWN_TOKEN",
    );
    assert_error(
        &server.post("/_matrix/client/v3/refresh", None, json!({"refresh_token": "cvr_bogus"})).await,
        StatusCode::UNAUTHORIZED,
        "M_UNKNOWN_TOKEN",
    );
    server.stop().await;
}

async fn login_is_rate_limited(backend: Backend) {
    let server = TestServer::start_with(backend, |c| {
        c.rate_limits.enabled = true;
        c.rate_limits.login.burst = 3;
        c.rate_limits.login.per_second = 0.01;
        c.rate_limits.registration.burst = 10;
    })
    .await;
    server.register("dave").await;
    for _ in 0..3 {
        assert_error(
            &server.post(LOGIN, None, password_login("dave", "Wrong-Pass-123")).await,
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
        );
    }
    let limited = server.post(LOGIN, None, password_login("dave", PASSWORD)).await;
    assert_error(&limited, StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED");
    assert!(limited.1["retry_after_ms"].as_u64().unwrap() > 0);
    server.stop().await;
}

async fn parallel_refreshes_leave_one_session(backend: Backend) {
    let server = TestServer::start(backend).await;
    server.register("erin").await;
    let mut body = password_login("erin", PASSWORD);
    body["refresh_token"] = json!(true);
    let (_, login) = server.post(LOGIN, None, body).await;
    let refresh = login["refresh_token"].as_str().unwrap().to_owned();

    let attempts =
        (0..10).map(|_| server.post("/_matrix/client/v3/refresh", None, json!({"refresh_token": refresh.clone()})));
    let results = futures_util::future::join_all(attempts).await;
    let mut issued = Vec::new();
    for (status, body) in &results {
        match *status {
            StatusCode::OK => issued.push((
                body["access_token"].as_str().unwrap().to_owned(),
                body["refresh_token"].as_str().unwrap().to_owned(),
            )),
            _ => assert_error(&(*status, body.clone()), StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN"),
        }
    }
    assert!(!issued.is_empty());
    // However many answers there were, one session lives on.
    let mut live_access = 0;
    for (access, _) in &issued {
        let result = server.get(WHOAMI, Some(access)).await;
        if result.0 == StatusCode::OK {
            live_access += 1;
        } else {
            assert_error(&result, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
        }
    }
    assert_eq!(live_access, 1, "one of {} refreshes stays valid", issued.len());
    let mut live_refresh = 0;
    for (_, token) in &issued {
        let result = server.post("/_matrix/client/v3/refresh", None, json!({"refresh_token": token})).await;
        if result.0 == StatusCode::OK {
            live_refresh += 1;
        } else {
            assert_error(&result, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
        }
    }
    assert_eq!(live_refresh, 1);
    // The refresh token they all used is spent.
    assert_error(
        &server.post("/_matrix/client/v3/refresh", None, json!({"refresh_token": refresh})).await,
        StatusCode::UNAUTHORIZED,
        "M_UNKNOWN_TOKEN",
    );
    server.stop().await;
}

/// Logs in from `address` (as a proxy would say with `X-Forwarded-For`).
async fn login_from(server: &TestServer, address: &str, user: &str, password: &str) -> (StatusCode, serde_json::Value) {
    server
        .request_with_headers(
            Method::POST,
            LOGIN,
            None,
            Some(password_login(user, password)),
            &[("x-forwarded-for", address)],
        )
        .await
}

async fn wrong_passwords_are_limited_per_user_and_address(backend: Backend) {
    let server = TestServer::start_with(backend, |c| {
        c.rate_limits.enabled = true;
        c.rate_limits.login.burst = 1000;
        c.rate_limits.failed_password.burst = 3;
        c.rate_limits.failed_password.per_second = 0.001;
        c.rate_limits.registration.burst = 100;
        c.listeners.trusted_proxies = vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
    })
    .await;
    for name in ["fay", "gus", "hal"] {
        server.register(name).await;
    }
    // Right passwords cost nothing.
    for _ in 0..5 {
        assert_eq!(login_from(&server, "192.0.2.1", "fay", PASSWORD).await.0, StatusCode::OK);
    }
    // Three wrong ones for fay, from three addresses: then fay is limited everywhere,
    // even with the right password.
    for address in ["192.0.2.2", "192.0.2.3", "192.0.2.4"] {
        assert_error(
            &login_from(&server, address, "fay", "Wrong-Pass-123").await,
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
        );
    }
    let limited = login_from(&server, "192.0.2.5", "fay", PASSWORD).await;
    assert_error(&limited, StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED");
    assert!(limited.1["retry_after_ms"].as_u64().unwrap() > 0);
    // Per address too: three wrong guesses at several users from one address.
    assert_error(&login_from(&server, "198.51.100.9", "gus", "Wrong-1a").await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    assert_error(&login_from(&server, "198.51.100.9", "hal", "Wrong-1a").await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    assert_error(
        &login_from(&server, "198.51.100.9", "nobody", "Wrong-1a").await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    assert_error(
        &login_from(&server, "198.51.100.9", "gus", PASSWORD).await,
        StatusCode::TOO_MANY_REQUESTS,
        "M_LIMIT_EXCEEDED",
    );
    // gus himself is fine from elsewhere.
    assert_eq!(login_from(&server, "198.51.100.10", "gus", PASSWORD).await.0, StatusCode::OK);
    server.stop().await;
}

async fn forwarded_address_only_from_trusted_proxies(backend: Backend) {
    let tweak = |trusted: bool| {
        move |c: &mut convo::config::Config| {
            c.rate_limits.enabled = true;
            c.rate_limits.login.burst = 1;
            c.rate_limits.login.per_second = 0.001;
            if trusted {
                c.listeners.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap(), "::1".parse().unwrap()];
            }
        }
    };
    // No trusted proxies: a client's X-Forwarded-For is ignored, so it cannot dodge
    // the limit by naming another address, nor set its "last seen" address.
    let server = TestServer::start_with(backend.clone(), tweak(false)).await;
    server.register("ida").await;
    let (status, body) = login_from(&server, "203.0.113.1", "ida", PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let token = body["access_token"].as_str().unwrap().to_owned();
    let (_, devices) = server.get("/_matrix/client/v3/devices", Some(&token)).await;
    let seen: Vec<&str> =
        devices["devices"].as_array().unwrap().iter().filter_map(|d| d["last_seen_ip"].as_str()).collect();
    assert!(seen.iter().all(|ip| *ip == "127.0.0.1" || *ip == "::1"), "{devices}");
    assert_error(
        &login_from(&server, "203.0.113.2", "ida", PASSWORD).await,
        StatusCode::TOO_MANY_REQUESTS,
        "M_LIMIT_EXCEEDED",
    );
    server.stop().await;

    // Behind a trusted proxy: each client has its own bucket, and the address is the
    // right-most one the proxy did not add itself (the left one here is forged).
    let server = TestServer::start_with(backend, tweak(true)).await;
    server.register("jo").await;
    let (status, body) = login_from(&server, "6.6.6.6, 203.0.113.1", "jo", PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (token, device) = (body["access_token"].as_str().unwrap(), body["device_id"].as_str().unwrap());
    let (_, got) = server.get(&format!("/_matrix/client/v3/devices/{device}"), Some(token)).await;
    assert_eq!(got["last_seen_ip"], "203.0.113.1", "{got}");
    assert_eq!(login_from(&server, "203.0.113.2", "jo", PASSWORD).await.0, StatusCode::OK);
    assert_error(
        &login_from(&server, "203.0.113.2", "jo", PASSWORD).await,
        StatusCode::TOO_MANY_REQUESTS,
        "M_LIMIT_EXCEEDED",
    );
    server.stop().await;
}

backend_tests!(
    login_variants_and_whoami,
    tokens_missing_unknown_and_logout,
    refresh_tokens_rotate_and_expire,
    login_is_rate_limited,
    parallel_refreshes_leave_one_session,
    wrong_passwords_are_limited_per_user_and_address,
    forwarded_address_only_from_trusted_proxies
);
