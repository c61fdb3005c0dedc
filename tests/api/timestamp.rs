//! `timestamp_to_event`: the event nearest a moment, in either direction, that the user
//! may see; and across servers, where a server that joined late asks one that was
//! there and fetches the event it names.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::{
    backend_tests,
    common::{Backend, TestServer, assert_error},
    federation::{TRUSTING, fed_request, federating, name, sign},
};

backend_tests!(the_nearest_event_either_way_that_the_user_may_see, a_server_that_joined_late_asks_one_that_was_there,);

/// The room's events as `token`'s user sees them, oldest first: (event id, time).
async fn history(server: &TestServer, token: &str, room: &str) -> Vec<(String, i64)> {
    let path = format!("/_matrix/client/v3/rooms/{room}/messages?dir=f&limit=1000");
    let (status, page) = server.get(&path, Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["event_id"].as_str().unwrap().to_owned(), e["origin_server_ts"].as_i64().unwrap()))
        .collect()
}

async fn nearest(server: &TestServer, token: &str, room: &str, ts: i64, dir: &str) -> (StatusCode, Value) {
    server.get(&format!("/_matrix/client/v1/rooms/{room}/timestamp_to_event?ts={ts}&dir={dir}"), Some(token)).await
}

/// What the answer must be, from the history in order: forwards, the first event at
/// or after `ts`; backwards, the last at or before.
fn expected(history: &[(String, i64)], ts: i64, forwards: bool) -> Option<(String, i64)> {
    if forwards {
        history.iter().find(|(_, at)| *at >= ts).cloned()
    } else {
        history.iter().rev().find(|(_, at)| *at <= ts).cloned()
    }
}

#[track_caller]
fn assert_answer(result: &(StatusCode, Value), want: &(String, i64)) {
    assert_eq!(result.0, StatusCode::OK, "{}", result.1);
    assert_eq!(result.1, json!({"event_id": want.0, "origin_server_ts": want.1}));
}

async fn the_nearest_event_either_way_that_the_user_may_see(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice_token, _) = server.register("alice").await;
    let (bob, bob_token, _) = server.register("bob").await;
    let (_, carol_token, _) = server.register("carol").await;
    let room = server
        .create_room(
            &alice_token,
            json!({"preset": "public_chat", "initial_state": [
                {"type": "m.room.history_visibility", "state_key": "", "content": {"history_visibility": "joined"}}]}),
        )
        .await;
    for i in 0..6 {
        server.send_text(&alice_token, &room, &format!("before bob {i}")).await;
    }
    let before = history(&server, &alice_token, &room).await;
    server.join(&bob_token, &room).await;
    for i in 0..4 {
        server.send_text(&alice_token, &room, &format!("with bob {i}")).await;
    }
    let all = history(&server, &alice_token, &room).await;
    let (first, last) = (all[0].1, all[all.len() - 1].1);

    // Every event's own time, both ways, and the room's ends.
    for (_, at) in &all {
        assert_answer(&nearest(&server, &alice_token, &room, *at, "f").await, &expected(&all, *at, true).unwrap());
        assert_answer(&nearest(&server, &alice_token, &room, *at, "b").await, &expected(&all, *at, false).unwrap());
    }
    assert_answer(&nearest(&server, &alice_token, &room, 0, "f").await, &all[0]);
    assert_answer(&nearest(&server, &alice_token, &room, last + 3_600_000, "b").await, &all[all.len() - 1]);
    assert_error(&nearest(&server, &alice_token, &room, first - 1, "b").await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    assert_error(&nearest(&server, &alice_token, &room, last + 1, "f").await, StatusCode::NOT_FOUND, "M_NOT_FOUND");

    // Bob may not see what was said before he joined (`joined` history): backwards
    // from then finds nothing; forwards from the start finds his join at the earliest.
    let bobs = history(&server, &bob_token, &room).await;
    assert!(bobs.len() < all.len(), "bob sees less: {bobs:?}");
    let before_join = before[before.len() - 1].1;
    let result = nearest(&server, &bob_token, &room, before_join, "b").await;
    match expected(&bobs, before_join, false) {
        Some(want) => assert_answer(&result, &want),
        None => assert_error(&result, StatusCode::NOT_FOUND, "M_NOT_FOUND"),
    }
    assert_answer(&nearest(&server, &bob_token, &room, 0, "f").await, &bobs[0]);
    // The first message he may not see: forwards from it, the next event he may.
    let hidden = before.iter().find(|(id, _)| !bobs.iter().any(|(b, _)| b == id)).expect("a hidden event");
    assert_answer(&nearest(&server, &bob_token, &room, hidden.1, "f").await, &expected(&bobs, hidden.1, true).unwrap());
    let (_, join) = server
        .get(&format!("/_matrix/client/v3/rooms/{room}/event/{}", bobs[bobs.len() - 5].0), Some(&bob_token))
        .await;
    assert_eq!((join["type"].as_str(), join["state_key"].as_str()), (Some("m.room.member"), Some(bob.as_str())));

    // Not a member; bad parameters.
    assert_error(&nearest(&server, &carol_token, &room, last, "b").await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let bad = nearest(&server, &alice_token, &room, last, "sideways").await;
    assert_eq!(bad.0, StatusCode::BAD_REQUEST, "{}", bad.1);
    let path = format!("/_matrix/client/v1/rooms/{room}/timestamp_to_event?dir=f");
    assert_eq!(server.get(&path, Some(&alice_token)).await.0, StatusCode::BAD_REQUEST);
    server.stop().await;
}

async fn a_server_that_joined_late_asks_one_that_was_there(backend: Backend) {
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend.clone(), TRUSTING).await;
    let c = federating(backend, TRUSTING).await;
    let (_, alice_token, _) = a.register("alice").await;
    let (_, bob_token, _) = b.register("bob").await;
    let room = a.create_room(&alice_token, json!({"preset": "public_chat"})).await;
    for i in 0..8 {
        a.send_text(&alice_token, &room, &format!("early {i}")).await;
    }
    let on_a = history(&a, &alice_token, &room).await;
    let (status, body) =
        b.post(&format!("/_matrix/client/v3/join/{room}?via={}", name(&a)), Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Bob's server has nothing from before its join: it asks Alice's, and fetches the
    // event named, so Bob can read it.
    let messages: Vec<&(String, i64)> = on_a.iter().rev().take(8).collect();
    let target = messages[4].1;
    let want = expected(&on_a, target, true).unwrap();
    assert_answer(&nearest(&b, &bob_token, &room, target, "f").await, &want);
    let (status, event) = b.get(&format!("/_matrix/client/v3/rooms/{room}/event/{}", want.0), Some(&bob_token)).await;
    assert_eq!(status, StatusCode::OK, "the event is here now: {event}");
    let want = expected(&on_a, target, false).unwrap();
    assert_answer(&nearest(&b, &bob_token, &room, target, "b").await, &want);
    let (status, context) =
        b.get(&format!("/_matrix/client/v3/rooms/{room}/context/{}?limit=4", want.0), Some(&bob_token)).await;
    assert_eq!(status, StatusCode::OK, "{context}");
    assert_eq!(context["event"]["event_id"], want.0.as_str());

    // The room goes on as before: Alice's next message reaches Bob live.
    let since = b.sync(&bob_token, None, "").await["next_batch"].as_str().unwrap().to_owned();
    let later = a.send_text(&alice_token, &room, "later").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut since = Some(since);
    loop {
        let sync = b.sync(&bob_token, since.as_deref(), "timeout=2000").await;
        let events = sync["rooms"]["join"][&room]["timeline"]["events"].as_array().cloned().unwrap_or_default();
        if events.iter().any(|e| e["event_id"] == later.as_str()) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the later message did not reach bob");
        since = sync["next_batch"].as_str().map(str::to_owned);
    }

    // Served to servers in the room only.
    let path = format!("/_matrix/federation/v1/timestamp_to_event/{room}?ts={target}&dir=f");
    let header = sign(&b, name(&a).as_str(), "GET", &path, None);
    let (status, body) = fed_request(&a, Method::GET, &path, None, Some(&header)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["event_id"], expected(&on_a, target, true).unwrap().0.as_str());
    let header = sign(&c, name(&a).as_str(), "GET", &path, None);
    let result = fed_request(&a, Method::GET, &path, None, Some(&header)).await;
    assert_error(&result, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let future = format!("/_matrix/federation/v1/timestamp_to_event/{room}?ts={}&dir=f", 4_000_000_000_000i64);
    let header = sign(&b, name(&a).as_str(), "GET", &future, None);
    let result = fed_request(&a, Method::GET, &future, None, Some(&header)).await;
    assert_error(&result, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    a.stop().await;
    b.stop().await;
    c.stop().await;
}
