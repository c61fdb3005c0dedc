//! Server-side search (`POST /search`, room events): rank and recent order, filters,
//! pagination, context and state, redactions leaving the index, what a user who left
//! may find, hostile search terms and bad input, and the index filled at start from
//! events stored before it.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{
    backend_tests,
    common::{Backend, TestServer, assert_error},
};

backend_tests!(
    rank_and_recent_order,
    filters_narrow_the_search,
    next_batch_pages_through_every_result,
    context_profiles_state_groups_and_highlights,
    a_redacted_message_is_no_longer_found,
    a_user_who_left_finds_what_was_sent_before_leaving_only,
    hostile_terms_and_bad_input_never_fail_the_server,
    events_stored_before_the_index_are_found,
);

const SEARCH: &str = "/_matrix/client/v3/search";

/// Searches with `criteria` (the `room_events` object); answers the `room_events`.
async fn search(server: &TestServer, token: &str, criteria: Value, next_batch: Option<&str>) -> Value {
    let path = match next_batch {
        Some(batch) => format!("{SEARCH}?next_batch={batch}"),
        None => SEARCH.to_owned(),
    };
    let (status, body) = server.post(&path, Some(token), json!({"search_categories": {"room_events": criteria}})).await;
    assert_eq!(status, StatusCode::OK, "search: {body}");
    body["search_categories"]["room_events"].clone()
}

/// The bodies of the results, in order.
fn found(room_events: &Value) -> Vec<String> {
    room_events["results"]
        .as_array()
        .map(|results| {
            results
                .iter()
                .map(|r| {
                    let content = &r["result"]["content"];
                    content["body"]
                        .as_str()
                        .or(content["topic"].as_str())
                        .or(content["name"].as_str())
                        .unwrap()
                        .to_owned()
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn rank_and_recent_order(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, token, _) = server.register("alice").await;
    let room = server.create_room(&token, json!({})).await;
    for text in [
        "apple banana cherry grape kiwi lemon mango",
        "apple apple apple",
        "apple pear plum quince raisin",
        "nothing to see here",
    ] {
        server.send_text(&token, &room, text).await;
    }
    let by_rank = search(&server, &token, json!({"search_term": "apple"}), None).await;
    let ranked = found(&by_rank);
    assert_eq!(ranked.len(), 3, "{by_rank}");
    assert_eq!(ranked[0], "apple apple apple", "the closest match first: {by_rank}");
    let ranks: Vec<f64> = by_rank["results"].as_array().unwrap().iter().map(|r| r["rank"].as_f64().unwrap()).collect();
    assert!(ranks.windows(2).all(|w| w[0] >= w[1]), "ranks go down: {ranks:?}");
    assert_eq!(by_rank["count"], 3);

    let by_time = search(&server, &token, json!({"search_term": "apple", "order_by": "recent"}), None).await;
    assert_eq!(
        found(&by_time),
        vec!["apple pear plum quince raisin", "apple apple apple", "apple banana cherry grape kiwi lemon mango"]
    );
    // Words are matched as prefixes, case aside, and all words are required.
    let prefix = search(&server, &token, json!({"search_term": "APP quin", "order_by": "recent"}), None).await;
    assert_eq!(found(&prefix), vec!["apple pear plum quince raisin"]);
    let none = search(&server, &token, json!({"search_term": "apple durian"}), None).await;
    assert_eq!((found(&none).len(), &none["count"]), (0, &json!(0)), "{none}");
    server.stop().await;
}

async fn filters_narrow_the_search(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, alice_token, _) = server.register("alice").await;
    let (bob, bob_token, _) = server.register("bob").await;
    let first = server.create_room(&alice_token, json!({"preset": "public_chat", "topic": "walrus facts"})).await;
    let second = server.create_room(&alice_token, json!({"preset": "public_chat", "name": "walrus club"})).await;
    server.join(&bob_token, &first).await;
    server.join(&bob_token, &second).await;
    server.send_text(&alice_token, &first, "walrus by alice in first").await;
    server.send_text(&bob_token, &first, "walrus by bob in first").await;
    server.send_text(&alice_token, &second, "walrus by alice in second").await;
    let term = |filter: Value| json!({"search_term": "walrus", "order_by": "recent", "filter": filter});

    let all = search(&server, &bob_token, term(json!({})), None).await;
    assert_eq!(found(&all).len(), 5, "three messages, a topic and a name: {all}");
    let in_first = search(&server, &bob_token, term(json!({"rooms": [first]})), None).await;
    assert_eq!(found(&in_first), vec!["walrus by bob in first", "walrus by alice in first", "walrus facts"]);
    let not_first = search(&server, &bob_token, term(json!({"not_rooms": [first]})), None).await;
    assert_eq!(found(&not_first), vec!["walrus by alice in second", "walrus club"]);
    let by_bob = search(&server, &bob_token, term(json!({"senders": [bob]})), None).await;
    assert_eq!(found(&by_bob), vec!["walrus by bob in first"]);
    let not_alice = search(&server, &bob_token, term(json!({"not_senders": [alice]})), None).await;
    assert_eq!(found(&not_alice), vec!["walrus by bob in first"]);
    let messages = search(&server, &bob_token, term(json!({"types": ["m.room.message"]})), None).await;
    assert_eq!(found(&messages).len(), 3, "{messages}");
    let not_messages = search(&server, &bob_token, term(json!({"not_types": ["m.room.message"]})), None).await;
    assert_eq!(found(&not_messages), vec!["walrus club", "walrus facts"]);
    let wildcard = search(&server, &bob_token, term(json!({"types": ["m.room.t*"]})), None).await;
    assert_eq!(found(&wildcard), vec!["walrus facts"]);
    let limited = search(&server, &bob_token, term(json!({"limit": 2})), None).await;
    assert_eq!(found(&limited).len(), 2);
    assert!(limited["next_batch"].is_string(), "{limited}");
    assert_eq!(limited["count"], 5);

    let keys = json!({"search_term": "walrus", "order_by": "recent", "keys": ["content.topic", "content.name"]});
    assert_eq!(found(&search(&server, &bob_token, keys, None).await), vec!["walrus club", "walrus facts"]);
    let body = json!({"search_term": "walrus", "keys": ["content.body"], "filter": {"rooms": [second]}});
    assert_eq!(found(&search(&server, &bob_token, body, None).await), vec!["walrus by alice in second"]);

    // Someone in neither room finds nothing.
    let (_, carol_token, _) = server.register("carol").await;
    let carol = search(&server, &carol_token, term(json!({})), None).await;
    assert_eq!((found(&carol).len(), &carol["count"]), (0, &json!(0)), "{carol}");
    server.stop().await;
}

async fn next_batch_pages_through_every_result(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, token, _) = server.register("alice").await;
    let room = server.create_room(&token, json!({})).await;
    for i in 0..23 {
        server.send_text(&token, &room, &format!("page item {i}")).await;
    }
    for order in ["recent", "rank"] {
        let mut seen = Vec::new();
        let mut batch: Option<String> = None;
        for pages in 1.. {
            assert!(pages <= 3, "23 results in pages of 10 take 3 pages ({order})");
            let criteria = json!({"search_term": "item", "order_by": order, "filter": {"limit": 10}});
            let page = search(&server, &token, criteria, batch.as_deref()).await;
            assert_eq!(page["count"], 23, "{page}");
            seen.extend(found(&page));
            match page["next_batch"].as_str() {
                Some(next) => batch = Some(next.to_owned()),
                None => break,
            }
        }
        let mut expected: Vec<String> = (0..23).map(|i| format!("page item {i}")).collect();
        if order == "recent" {
            expected.reverse();
            assert_eq!(seen, expected, "newest first, each once");
        } else {
            seen.sort();
            expected.sort();
            assert_eq!(seen, expected, "each once");
        }
    }
    // A token of the other order, or made up, is refused.
    let recent = search(&server, &token, json!({"search_term": "item", "order_by": "recent"}), None).await;
    let token_of_recent = recent["next_batch"].as_str().unwrap().to_owned();
    for bad in [token_of_recent.as_str(), "nonsense", "r", "b1x", "%FF"] {
        let body = json!({"search_categories": {"room_events": {"search_term": "item", "order_by": "rank"}}});
        let result = server.post(&format!("{SEARCH}?next_batch={bad}"), Some(&token), body).await;
        assert_error(&result, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    }
    server.stop().await;
}

async fn context_profiles_state_groups_and_highlights(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, alice_token, _) = server.register("alice").await;
    let (bob, bob_token, _) = server.register("bob").await;
    let room = server.create_room(&alice_token, json!({"preset": "public_chat", "name": "Zoo"})).await;
    server.join(&bob_token, &room).await;
    let (status, body) = server
        .put(
            &format!("/_matrix/client/v3/profile/{alice}/displayname"),
            Some(&alice_token),
            json!({"displayname": "Alice A."}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    server.send_text(&alice_token, &room, "one").await;
    server.send_text(&bob_token, &room, "two").await;
    let hit = server.send_text(&alice_token, &room, "Otters are playful").await;
    server.send_text(&bob_token, &room, "three").await;
    server.send_text(&alice_token, &room, "four").await;
    let other = server.create_room(&bob_token, json!({})).await;
    server.send_text(&bob_token, &other, "an otter elsewhere").await;

    let criteria = json!({
        "search_term": "otter",
        "order_by": "recent",
        "event_context": {"before_limit": 2, "after_limit": 1, "include_profile": true},
        "include_state": true,
        "groupings": {"group_by": [{"key": "room_id"}, {"key": "sender"}]},
    });
    let result = search(&server, &bob_token, criteria, None).await;
    let results = result["results"].as_array().unwrap();
    assert_eq!(found(&result), vec!["an otter elsewhere", "Otters are playful"]);
    let ours = &results[1];
    assert_eq!(ours["result"]["event_id"], hit.as_str());
    assert_eq!(ours["result"]["room_id"], room.as_str());
    let context = &ours["context"];
    let bodies = |events: &Value| -> Vec<String> {
        events.as_array().unwrap().iter().map(|e| e["content"]["body"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(bodies(&context["events_before"]), vec!["two", "one"], "{context}");
    assert_eq!(bodies(&context["events_after"]), vec!["three"], "{context}");
    assert!(context["start"].is_string() && context["end"].is_string(), "{context}");
    assert_eq!(context["profile_info"][&alice]["displayname"], "Alice A.", "{context}");
    assert_eq!(context["profile_info"][&bob]["displayname"], "bob", "{context}");
    // The tokens page on from the context with /messages.
    let start = context["start"].as_str().unwrap();
    let (status, page) = server
        .get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&from={start}&limit=50"), Some(&bob_token))
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(!page["chunk"].as_array().unwrap().iter().any(|e| e["content"]["body"] == "one"), "{page}");

    // The state of each room in the results.
    let state = result["state"][&room].as_array().expect("the room's state");
    assert!(state.iter().any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Zoo"), "{state:?}");
    assert!(state.iter().any(|e| e["type"] == "m.room.member" && e["state_key"] == bob.as_str()));
    assert!(result["state"][&other].is_array(), "{result}");

    // Groups by room and by sender, each with its results and order.
    let by_room = &result["groups"]["room_id"];
    assert_eq!(by_room[&room]["results"], json!([hit]));
    assert_eq!(by_room[&other]["order"], 1);
    assert_eq!(by_room[&room]["order"], 2);
    assert_eq!(result["groups"]["sender"][&alice]["results"], json!([hit]));
    assert_eq!(result["groups"]["sender"][&bob]["results"].as_array().unwrap().len(), 1);

    // Highlights: the word searched for and the words it matched.
    let highlights: Vec<&str> = result["highlights"].as_array().unwrap().iter().map(|h| h.as_str().unwrap()).collect();
    for word in ["otter", "Otters"] {
        assert!(highlights.contains(&word), "{highlights:?}");
    }

    // Without context asked for, the default (5 each side) is given.
    let plain = search(&server, &bob_token, json!({"search_term": "otters"}), None).await;
    let context = &plain["results"][0]["context"];
    assert_eq!(bodies(&context["events_after"]), vec!["three", "four"], "{plain}");
    server.stop().await;
}

async fn a_redacted_message_is_no_longer_found(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, token, _) = server.register("alice").await;
    let room = server.create_room(&token, json!({})).await;
    let secret = server.send_text(&token, &room, "the password is swordfish").await;
    server.send_text(&token, &room, "swordfish is a fish").await;
    let before = search(&server, &token, json!({"search_term": "swordfish"}), None).await;
    assert_eq!(found(&before).len(), 2);
    let (status, body) = server
        .put(&format!("/_matrix/client/v3/rooms/{room}/redact/{secret}/r1"), Some(&token), json!({"reason": "oops"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let after = search(&server, &token, json!({"search_term": "swordfish"}), None).await;
    assert_eq!(found(&after), vec!["swordfish is a fish"]);
    assert_eq!(after["count"], 1);
    let password = search(&server, &token, json!({"search_term": "password"}), None).await;
    assert_eq!(password["count"], 0, "{password}");
    server.stop().await;
}

async fn a_user_who_left_finds_what_was_sent_before_leaving_only(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice_token, _) = server.register("alice").await;
    let (_, bob_token, _) = server.register("bob").await;
    let room = server
        .create_room(
            &alice_token,
            json!({"preset": "public_chat", "initial_state": [
                {"type": "m.room.history_visibility", "state_key": "", "content": {"history_visibility": "joined"}}]}),
        )
        .await;
    server.send_text(&alice_token, &room, "heron before bob joined").await;
    server.join(&bob_token, &room).await;
    server.send_text(&alice_token, &room, "heron while bob is here").await;
    server.leave(&bob_token, &room).await;
    server.send_text(&alice_token, &room, "heron after bob left").await;

    let bob_sees = search(&server, &bob_token, json!({"search_term": "heron", "order_by": "recent"}), None).await;
    assert_eq!(found(&bob_sees), vec!["heron while bob is here"]);
    assert_eq!(bob_sees["count"], 1);
    let alice_sees = search(&server, &alice_token, json!({"search_term": "heron"}), None).await;
    assert_eq!(found(&alice_sees).len(), 3);

    // The context of what bob finds stops where his view of the room does.
    let criteria = json!({"search_term": "heron", "event_context": {"before_limit": 5, "after_limit": 5}});
    let with_context = search(&server, &bob_token, criteria, None).await;
    let context = &with_context["results"][0]["context"];
    let shown = context.to_string();
    assert!(!shown.contains("heron after bob left") && !shown.contains("heron before bob joined"), "{context}");
    server.stop().await;
}

async fn hostile_terms_and_bad_input_never_fail_the_server(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, token, _) = server.register("alice").await;
    let room = server.create_room(&token, json!({})).await;
    server.send_text(&token, &room, "quote\" star* near NEAR(a b) col:on it's (paren) -minus ^caret").await;
    let terms = [
        "\"",
        "\"unbalanced",
        "*",
        "star*",
        "NEAR",
        "NEAR(a b)",
        "NEAR(",
        "col:on",
        ":",
        "value:x",
        "a AND",
        "OR OR",
        "NOT",
        "-minus",
        "^caret",
        "(paren",
        "it's",
        "'",
        "\\",
        "&|!<->",
        "a:* & b",
        "%",
        "_",
        "",
        "   ",
        "🦀",
        "Grüße",
    ];
    for term in terms {
        let body = json!({"search_categories": {"room_events": {"search_term": term}}});
        let (status, answer) = server.post(SEARCH, Some(&token), body).await;
        assert_eq!(status, StatusCode::OK, "{term:?}: {answer}");
    }
    let long = "x".repeat(10_000) + &" y".repeat(2_000);
    let body = json!({"search_categories": {"room_events": {"search_term": long}}});
    let (status, answer) = server.post(SEARCH, Some(&token), body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    // A NUL is refused as every request body's (not a 500).
    let body = json!({"search_categories": {"room_events": {"search_term": "a\u{0}b"}}});
    assert_error(&server.post(SEARCH, Some(&token), body).await, StatusCode::BAD_REQUEST, "M_BAD_JSON");
    // The words of a hostile term are still found.
    let near = search(&server, &token, json!({"search_term": "NEAR(a b)"}), None).await;
    assert_eq!(found(&near).len(), 1, "{near}");
    let quoted = search(&server, &token, json!({"search_term": "\"col:on"}), None).await;
    assert_eq!(found(&quoted).len(), 1, "{quoted}");

    // Bad input: the spec's errcodes.
    let bad = |body: Value| server.post(SEARCH, Some(&token), body);
    assert_error(&bad(json!({"search_categories": {}})).await, StatusCode::BAD_REQUEST, "M_BAD_JSON");
    assert_error(
        &bad(json!({"search_categories": {"groups": {"search_term": "x"}}})).await,
        StatusCode::BAD_REQUEST,
        "M_BAD_JSON",
    );
    assert_error(&bad(json!({})).await, StatusCode::BAD_REQUEST, "M_BAD_JSON");
    let criteria = |extra: Value| {
        let mut c = json!({"search_term": "x"});
        c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        json!({"search_categories": {"room_events": c}})
    };
    for extra in [
        json!({"search_term": 5}),
        json!({"order_by": "sideways"}),
        json!({"keys": ["content.secret"]}),
        json!({"keys": "content.body"}),
        json!({"filter": {"limit": -1}}),
        json!({"filter": {"rooms": "!a:b"}}),
        json!({"filter": {"senders": ["not a user"]}}),
        json!({"filter": "nope"}),
        json!({"event_context": {"before_limit": -3}}),
        json!({"groupings": {"group_by": [{"key": "colour"}]}}),
    ] {
        let result = bad(criteria(extra.clone())).await;
        assert_eq!(result.0, StatusCode::BAD_REQUEST, "{extra}: {}", result.1);
        assert!(["M_BAD_JSON", "M_INVALID_PARAM"].contains(&result.1["errcode"].as_str().unwrap_or("")), "{extra}");
    }
    // A huge limit is capped, not refused.
    let capped = search(&server, &token, json!({"search_term": "near", "filter": {"limit": 1_000_000}}), None).await;
    assert_eq!(found(&capped).len(), 1);
    server.stop().await;
}

async fn events_stored_before_the_index_are_found(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let (_, token, _) = server.register("alice").await;
    let room = server.create_room(&token, json!({"topic": "badgers"})).await;
    server.send_text(&token, &room, "badgers dig setts").await;
    let redacted = server.send_text(&token, &room, "badgers were here").await;
    let (status, body) =
        server.put(&format!("/_matrix/client/v3/rooms/{room}/redact/{redacted}/r1"), Some(&token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // As a database from before migration 0022: no index rows, the fill not done.
    let url = server.config().database.url.clone();
    server.running.take().unwrap().stop().await;
    forget_search_index(&url).await;
    server.restart().await;
    let result = search(&server, &token, json!({"search_term": "badgers", "order_by": "recent"}), None).await;
    assert_eq!(found(&result), vec!["badgers dig setts", "badgers"], "{result}");
    // New events are indexed as before.
    server.send_text(&token, &room, "badgers again").await;
    let result = search(&server, &token, json!({"search_term": "badgers"}), None).await;
    assert_eq!(result["count"], 3, "{result}");
    server.stop().await;
}

async fn forget_search_index(url: &str) {
    use sqlx::Connection;
    let statements = ["DELETE FROM event_search", "DELETE FROM server_info WHERE key = 'event_search'"];
    if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
        for statement in statements {
            sqlx::query(statement).execute(&mut conn).await.unwrap();
        }
        let (left,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM event_search_fts").fetch_one(&mut conn).await.unwrap();
        assert_eq!(left, 0, "the full-text rows go with their rows");
        conn.close().await.unwrap();
    } else {
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        for statement in statements {
            sqlx::query(statement).execute(&mut conn).await.unwrap();
        }
        conn.close().await.unwrap();
    }
}
