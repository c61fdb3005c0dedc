//! OpenID: a user asks for a token (client API) and another service trades it for the
//! user's id (federation API, without X-Matrix), until it expires.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::{
    backend_tests,
    common::{Backend, assert_error},
    federation::{TRUSTING, fed_request, federating, name, services},
};

backend_tests!(a_token_names_its_user_until_it_expires, tokens_are_only_for_oneself);

async fn a_token_names_its_user_until_it_expires(backend: Backend) {
    let server = federating(backend, TRUSTING).await;
    let (alice, alice_token, _) = server.register("alice").await;
    let (bob, bob_token, _) = server.register("bob").await;
    let request = |user: &str, token: &str| {
        let (path, token) = (format!("/_matrix/client/v3/user/{user}/openid/request_token"), token.to_owned());
        let server = &server;
        async move { server.post(&path, Some(&token), json!({})).await }
    };
    let userinfo = |token: &str| {
        let path = format!("/_matrix/federation/v1/openid/userinfo?access_token={token}");
        let server = &server;
        async move { fed_request(server, Method::GET, &path, None, None).await }
    };

    let (status, body) = request(&alice, &alice_token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["matrix_server_name"], name(&server).as_str());
    assert_eq!(body["expires_in"], 3600);
    let token = body["access_token"].as_str().unwrap().to_owned();
    let (status, info) = userinfo(&token).await;
    assert_eq!(status, StatusCode::OK, "{info}");
    assert_eq!(info, json!({"sub": alice}));

    // Several at once, each its own, each naming its user.
    let asked = futures_util::future::join_all([
        request(&alice, &alice_token),
        request(&bob, &bob_token),
        request(&bob, &bob_token),
    ])
    .await;
    let mut tokens = Vec::new();
    for (status, body) in &asked {
        assert_eq!(*status, StatusCode::OK, "{body}");
        tokens.push(body["access_token"].as_str().unwrap().to_owned());
    }
    tokens.sort();
    tokens.dedup();
    assert_eq!(tokens.len(), 3, "every token is new");
    assert_eq!(userinfo(asked[1].1["access_token"].as_str().unwrap()).await.1["sub"], bob.as_str());

    // Stored hashed: the token itself is not a key of the table.
    let store = &services(&server).store;
    let now = convo::service::now_ms();
    assert_eq!(store.find_openid_token(&token, now).await.unwrap(), None);
    let hashed = convo::service::hash_token(&token);
    assert_eq!(store.find_openid_token(&hashed, now).await.unwrap().as_deref(), Some(alice.as_str()));

    // Unknown and expired tokens (one whose hour is over, made so without waiting).
    assert_error(&userinfo("cvo_nothing").await, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
    let alice_id = ruma::OwnedUserId::try_from(alice.as_str()).unwrap();
    let expired = services(&server).issue_openid_token(&alice_id, now - 1).await.unwrap();
    assert_error(&userinfo(&expired).await, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
    let (status, _) = userinfo(&token).await;
    assert_eq!(status, StatusCode::OK, "the unexpired token still works");
    // Making a token clears out expired ones.
    request(&alice, &alice_token).await;
    assert_eq!(store.find_openid_token(&convo::service::hash_token(&expired), 0).await.unwrap(), None);
    let missing = fed_request(&server, Method::GET, "/_matrix/federation/v1/openid/userinfo", None, None).await;
    assert_eq!(missing.0, StatusCode::BAD_REQUEST, "{}", missing.1);

    // A deactivated account's tokens name nobody.
    let (status, body) = server
        .post(
            "/_matrix/client/v3/account/deactivate",
            Some(&alice_token),
            json!({"auth": {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": alice},
                "password": crate::common::PASSWORD}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_error(&userinfo(&token).await, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
    server.stop().await;
}

async fn tokens_are_only_for_oneself(backend: Backend) {
    let server = federating(backend, TRUSTING).await;
    let (alice, _, _) = server.register("alice").await;
    let (_, bob_token, _) = server.register("bob").await;
    let path = format!("/_matrix/client/v3/user/{alice}/openid/request_token");
    assert_error(&server.post(&path, Some(&bob_token), json!({})).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    assert_error(&server.post(&path, None, json!({})).await, StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN");
    let bad = server.post("/_matrix/client/v3/user/not-a-user/openid/request_token", Some(&bob_token), json!({})).await;
    assert_eq!(bad.0, StatusCode::BAD_REQUEST, "{}", bad.1);
    server.stop().await;
}
