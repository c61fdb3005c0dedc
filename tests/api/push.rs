//! Push rules and the small endpoints Element calls at start.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::{
    backend_tests,
    common::{Backend, TestServer, assert_error},
};

async fn push_rules_start_from_defaults_and_change(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (status, rules) = server.get("/_matrix/client/v3/pushrules/", Some(&alice)).await;
    assert_eq!(status, StatusCode::OK);
    let overrides = rules["global"]["override"].as_array().unwrap();
    assert!(overrides.iter().any(|r| r["rule_id"] == ".m.rule.master"), "{rules}");
    let content_rules = rules["global"]["content"].as_array().cloned().unwrap_or_default();
    let underride = rules["global"]["underride"].as_array().unwrap();
    assert!(underride.iter().any(|r| r["rule_id"] == ".m.rule.message") || !content_rules.is_empty());

    // Initial sync carries them as account data.
    let (_, sync) = server.get("/_matrix/client/v3/sync", Some(&alice)).await;
    assert!(sync["account_data"]["events"].as_array().unwrap().iter().any(|e| e["type"] == "m.push_rules"));

    // Mute everything, then undo.
    let master = "/_matrix/client/v3/pushrules/global/override/.m.rule.master/enabled";
    assert_eq!(server.put(master, Some(&alice), json!({"enabled": true})).await.0, StatusCode::OK);
    assert_eq!(server.get(master, Some(&alice)).await.1["enabled"], true);
    assert_eq!(server.put(master, Some(&alice), json!({"enabled": false})).await.0, StatusCode::OK);

    // A rule of the user's own.
    let rule = "/_matrix/client/v3/pushrules/global/room/!abc:localhost";
    assert_eq!(server.put(rule, Some(&alice), json!({"actions": []})).await.0, StatusCode::OK);
    let (status, got) = server.get(rule, Some(&alice)).await;
    assert_eq!((status, got["rule_id"].clone()), (StatusCode::OK, json!("!abc:localhost")));
    assert_eq!(server.request(Method::DELETE, rule, Some(&alice), None).await.0, StatusCode::OK);
    assert_error(&server.get(rule, Some(&alice)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    assert_error(
        &server
            .put(
                "/_matrix/client/v3/pushrules/global/override/.m.rule.nope/enabled",
                Some(&alice),
                json!({"enabled": true}),
            )
            .await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );

    let (status, pushers) = server.get("/_matrix/client/v3/pushers", Some(&alice)).await;
    assert_eq!((status, pushers), (StatusCode::OK, json!({"pushers": []})));
    let (status, protocols) = server.get("/_matrix/client/v3/thirdparty/protocols", Some(&alice)).await;
    assert_eq!((status, protocols), (StatusCode::OK, json!({})));
    server.stop().await;
}

backend_tests!(push_rules_start_from_defaults_and_change);
