//! PDUs from another server that need more than themselves: redactions of another
//! server's events (power levels at the redaction, and a redaction that comes before
//! its target), the state at an event whose prev events cannot be fetched, and auth
//! events the receiver does not have. Two (or three) Convo servers in process.

use std::time::{Duration, Instant};

use convo::service::rooms::pipeline::{Arrival, PduOutcome};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{
    backend_tests,
    common::{Backend, TestServer},
    federation::{TRUSTING, federating, name, services},
    federation_rooms::{remote_pdu, wait_for_message},
};

/// Joins `token`'s user on `server` to `room` (on `through`, with `through_token`),
/// and waits until `through` has the join (a server already in the room joins
/// locally, and sends the join on).
async fn join(server: &TestServer, token: &str, room: &str, through: &TestServer, through_token: &str) {
    let (status, body) =
        server.post(&format!("/_matrix/client/v3/join/{room}?via={}", name(through)), Some(token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "join through {}: {body}", name(through));
    let (_, whoami) = server.get("/_matrix/client/v3/account/whoami", Some(token)).await;
    let user = whoami["user_id"].as_str().unwrap().to_owned();
    wait_until("the join reaches the room's server", || async {
        let (_, members) =
            through.get(&format!("/_matrix/client/v3/rooms/{room}/joined_members"), Some(through_token)).await;
        members["joined"].get(&user).is_some()
    })
    .await;
}

/// An event as a user of `server` sees it.
async fn event(server: &TestServer, token: &str, room: &str, id: &str) -> Value {
    let (status, body) = server.get(&format!("/_matrix/client/v3/rooms/{room}/event/{id}"), Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{id}: {body}");
    body
}

/// Polls `check` every 20 ms until it holds, for at most 20 s.
async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within 20 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn text(body: &str) -> Value {
    json!({"msgtype": "m.text", "body": body})
}

async fn redactions_from_another_server_need_the_power_to_redact(backend: Backend) {
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend, TRUSTING).await;
    let (alice, alice_token, _) = a.register("alice").await;
    let (bob, bob_token, _) = b.register("bob").await;
    let (dave, dave_token, _) = b.register("dave").await;
    let room = a.create_room(&alice_token, json!({"preset": "public_chat", "room_version": "12"})).await;
    join(&b, &bob_token, &room, &a, &alice_token).await;
    join(&b, &dave_token, &room, &a, &alice_token).await;
    let room_id = ruma::OwnedRoomId::try_from(room.as_str()).unwrap();
    let v12 = ruma::RoomVersionId::V12;
    let (a_name, b_name) = (name(&a).to_string(), name(&b).to_string());
    let (a_key, b_key) = (&services(&a).signing_key, &services(&b).signing_key);

    // Dave (no power) redacts Alice's message: his redaction is an event of the room,
    // but Alice's message keeps its content on A.
    let first = a.send_text(&alice_token, &room, "first").await;
    let (id, pdu) =
        remote_pdu(&a, &alice_token, &room, &dave, "m.room.redaction", None, json!({"redacts": first}), b_key, &b_name)
            .await;
    let outcome = services(&a).handle_pdu(&room_id, &v12, pdu, Arrival::Live).await.unwrap();
    assert!(matches!(outcome, PduOutcome::Accepted { .. }), "{outcome:?}");
    assert_eq!(event(&a, &alice_token, &room, &id).await["type"], "m.room.redaction");
    assert_eq!(event(&a, &alice_token, &room, &first).await["content"]["body"], "first", "not redacted");

    // Bob becomes a moderator (the redact level, 50) and redacts Alice's next message
    // through his own server, which sends the redaction to A: A applies it.
    let second = a.send_text(&alice_token, &room, "second").await;
    let (_, mut levels) =
        a.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.power_levels"), Some(&alice_token)).await;
    assert_eq!(levels["redact"], 50, "{levels}");
    levels["users"][&bob] = json!(50);
    let (status, body) =
        a.put(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.power_levels/"), Some(&alice_token), levels).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_until("bob's server sees his promotion", || async {
        let (_, levels) =
            b.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.power_levels"), Some(&bob_token)).await;
        levels["users"][&bob] == 50
    })
    .await;
    let (status, body) =
        b.put(&format!("/_matrix/client/v3/rooms/{room}/redact/{second}/t1"), Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let redaction = body["event_id"].as_str().unwrap().to_owned();
    wait_until("A applies the moderator's redaction", || async {
        event(&a, &alice_token, &room, &second).await["content"] == json!({})
    })
    .await;
    let redacted = event(&a, &alice_token, &room, &second).await;
    assert_eq!(redacted["unsigned"]["redacted_because"]["event_id"], redaction.as_str(), "{redacted}");
    assert_eq!(event(&a, &alice_token, &room, &first).await["content"]["body"], "first", "still not redacted");

    // A redaction that comes before its target: held, then applied when the target
    // comes (the moderator's), or not (Dave's). The targets are Alice's, made here as
    // her server would and given to A afterwards.
    let mut held = Vec::new();
    for (redactor, body) in [(&bob, "third"), (&dave, "fourth")] {
        let (target, target_pdu) =
            remote_pdu(&a, &alice_token, &room, &alice, "m.room.message", None, text(body), a_key, &a_name).await;
        let (_, redaction_pdu) = remote_pdu(
            &a,
            &alice_token,
            &room,
            redactor,
            "m.room.redaction",
            None,
            json!({"redacts": target}),
            b_key,
            &b_name,
        )
        .await;
        let outcome = services(&a).handle_pdu(&room_id, &v12, redaction_pdu, Arrival::Live).await.unwrap();
        assert!(matches!(outcome, PduOutcome::Accepted { .. }), "{outcome:?}");
        held.push((target, target_pdu));
    }
    for (target, pdu) in held.clone() {
        let outcome = services(&a).handle_pdu(&room_id, &v12, pdu, Arrival::Live).await.unwrap();
        assert!(matches!(outcome, PduOutcome::Accepted { .. }), "{target}: {outcome:?}");
    }
    let third = event(&a, &alice_token, &room, &held[0].0).await;
    assert_eq!(third["content"], json!({}), "the moderator's held redaction applies: {third}");
    assert!(third["unsigned"]["redacted_because"]["sender"] == bob.as_str(), "{third}");
    let fourth = event(&a, &alice_token, &room, &held[1].0).await;
    assert_eq!(fourth["content"]["body"], "fourth", "Dave's held redaction does not: {fourth}");
    // Bob's own messages are his server's to redact, with or without power.
    let from_bob = b.send_text(&bob_token, &room, "bob's").await;
    wait_for_message(&a, &alice_token, &room, "bob's").await;
    let (status, _) =
        b.put(&format!("/_matrix/client/v3/rooms/{room}/redact/{from_bob}/t2"), Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    wait_until("A applies bob's redaction of his own message", || async {
        event(&a, &alice_token, &room, &from_bob).await["content"] == json!({})
    })
    .await;
    a.stop().await;
    b.stop().await;
}

async fn the_state_at_a_gap_get_missing_events_cannot_fill_comes_from_the_sender(backend: Backend) {
    let a = crate::federation::federating_with(backend.clone(), TRUSTING, |c| c.federation.max_retry_interval_ms = 300)
        .await;
    let mut b = federating(backend, TRUSTING).await;
    let (_, alice_token, _) = a.register("alice").await;
    let (bob, bob_token, _) = b.register("bob").await;
    let (carol, carol_token, _) = b.register("carol").await;
    let room = a.create_room(&alice_token, json!({"preset": "public_chat"})).await;
    join(&b, &bob_token, &room, &a, &alice_token).await;
    join(&b, &carol_token, &room, &a, &alice_token).await;
    let b_name = name(&b).to_string();

    // While B is down, Carol is banned and 25 messages follow: more than B asks for
    // with get_missing_events (20), so the ban is beyond what it fetches.
    b.pause().await;
    let (status, body) =
        a.post(&format!("/_matrix/client/v3/rooms/{room}/ban"), Some(&alice_token), json!({"user_id": carol})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for i in 0..25 {
        a.send_text(&alice_token, &room, &format!("gap {i}")).await;
    }
    // None of it reaches B through the queue (as if A had lost it)...
    let store = &services(&a).store;
    loop {
        let batch = store.get_federation_batch(&b_name, 50, 100, 0).await.unwrap();
        if batch.pdus.is_empty() && batch.edus.is_empty() {
            break;
        }
        let pdus: Vec<i64> = batch.pdus.iter().map(|p| p.0).collect();
        let edus: Vec<i64> = batch.edus.iter().map(|e| e.0).collect();
        store.delete_federation_sent(&b_name, &pdus, &edus).await.unwrap();
    }
    b.resume().await;
    // ...and the next message names the last of them.
    a.send_text(&alice_token, &room, "after the gap").await;
    let seen = wait_for_message(&b, &bob_token, &room, "after the gap").await;
    let bodies: Vec<&str> = seen.iter().filter_map(|e| e["content"]["body"].as_str()).collect();
    assert!(bodies.contains(&"gap 24") && !bodies.contains(&"gap 0"), "the last 20 are fetched: {bodies:?}");

    // B placed the oldest of those on the state A gave for its unknown prev: Carol is
    // banned there, and so in B's current state.
    let (status, member) =
        b.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/{carol}"), Some(&bob_token)).await;
    assert_eq!(status, StatusCode::OK, "{member}");
    assert_eq!(member["membership"], "ban", "{member}");
    let (_, members) = b.get(&format!("/_matrix/client/v3/rooms/{room}/joined_members"), Some(&bob_token)).await;
    assert!(members["joined"].get(&carol).is_none() && members["joined"].get(&bob).is_some(), "{members}");
    let (status, body) = b
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/t1"),
            Some(&carol_token),
            text("still here?"),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "carol is banned on B too: {body}");
    a.stop().await;
    b.stop().await;
}

/// A v12 PDU of `sender` on top of `prev` with these auth events, signed by `server`.
#[allow(clippy::too_many_arguments)]
fn build_pdu(
    server: &TestServer,
    room: &str,
    sender: &str,
    kind: &str,
    state_key: Option<&str>,
    content: Value,
    prev: &[&str],
    auth: &[&str],
) -> (String, ruma::CanonicalJsonObject) {
    let mut pdu = json!({
        "room_id": room, "sender": sender, "type": kind, "content": content,
        "origin_server_ts": convo::service::now_ms(), "depth": 1000, "prev_events": prev, "auth_events": auth,
    });
    if let Some(k) = state_key {
        pdu["state_key"] = json!(k);
    }
    let mut object: ruma::CanonicalJsonObject = serde_json::from_value(pdu).unwrap();
    let rules = ruma::RoomVersionId::V12.rules().unwrap();
    let key = &services(server).signing_key;
    ruma::signatures::hash_and_sign_event(name(server).as_str(), key, &mut object, &rules.redaction).unwrap();
    let id = format!("${}", ruma::signatures::reference_hash(&object, &rules).unwrap());
    (id, object)
}

/// The id of the current state event (`kind`, `key`) as `token`'s user on `server` sees it.
async fn state_id(server: &TestServer, token: &str, room: &str, kind: &str, key: &str) -> String {
    let (_, state) = server.get(&format!("/_matrix/client/v3/rooms/{room}/state"), Some(token)).await;
    let event = state.as_array().unwrap().iter().find(|e| e["type"] == kind && e["state_key"] == key);
    event.unwrap_or_else(|| panic!("no {kind} {key} in {state}"))["event_id"].as_str().unwrap().to_owned()
}

/// `fetch_events_from_room`: a PDU naming an auth event the receiver lacks is accepted
/// once that event is fetched from the room's other server. When that server cannot
/// be reached, the PDU is rejected (stored as rejected, for good: the same PDU again is
/// a duplicate), as the pipeline intends: it is judged once, on what can be had then.
async fn missing_auth_events_are_fetched_from_the_room_servers(backend: Backend) {
    use crate::federation::{fed_request, sign};
    let a = federating(backend.clone(), TRUSTING).await;
    let mut b = federating(backend, TRUSTING).await;
    let (_, alice_token, _) = a.register("alice").await;
    let (bob, bob_token, _) = b.register("bob").await;
    let room = a.create_room(&alice_token, json!({"preset": "public_chat", "room_version": "12"})).await;
    join(&b, &bob_token, &room, &a, &alice_token).await;
    let room_id = ruma::OwnedRoomId::try_from(room.as_str()).unwrap();
    let v12 = ruma::RoomVersionId::V12;
    let levels = state_id(&a, &alice_token, &room, "m.room.power_levels", "").await;
    let join_event = state_id(&a, &alice_token, &room, "m.room.member", &bob).await;
    let join_rules = state_id(&a, &alice_token, &room, "m.room.join_rules", "").await;

    // Bob's server stores a profile change of his that A never gets...
    let member = |name: &str| {
        build_pdu(
            &b,
            &room,
            &bob,
            "m.room.member",
            Some(&bob),
            json!({"membership": "join", "displayname": name}),
            &[&join_event],
            &[&levels, &join_event, &join_rules],
        )
    };
    let (renamed, renamed_pdu) = member("Bob Two");
    let outcome = services(&b).handle_pdu(&room_id, &v12, renamed_pdu, Arrival::Live).await.unwrap();
    assert!(matches!(outcome, PduOutcome::Accepted { .. }), "{outcome:?}");
    assert!(services(&a).store.get_event_status(&renamed).await.unwrap().is_none());
    // ...then a message whose auth events name it.
    let (message, message_pdu) =
        build_pdu(&b, &room, &bob, "m.room.message", None, text("hi"), &[&join_event], &[&levels, &renamed]);
    let outcome = services(&a).handle_pdu(&room_id, &v12, message_pdu, Arrival::Live).await.unwrap();
    assert!(matches!(outcome, PduOutcome::Accepted { .. }), "{outcome:?}");
    assert_eq!(event(&a, &alice_token, &room, &message).await["content"]["body"], "hi");
    let status = services(&a).store.get_event_status(&renamed).await.unwrap();
    assert_eq!(status, Some((true, None, false)), "the fetched auth event is kept as an outlier");

    // A PDU whose prev neither A nor its sender has: the state before it cannot be
    // had, so A refuses it and stores nothing.
    let nowhere = format!("${}", "A".repeat(43));
    let (orphan, orphan_pdu) =
        build_pdu(&b, &room, &bob, "m.room.message", None, text("orphan"), &[&nowhere], &[&levels, &join_event]);
    let txn = json!({"origin": name(&b), "origin_server_ts": convo::service::now_ms(), "pdus": [orphan_pdu]});
    let path = "/_matrix/federation/v1/send/orphan1";
    let header = sign(&b, name(&a).as_str(), "PUT", path, Some(&txn));
    let (status, body) = fed_request(&a, reqwest::Method::PUT, path, Some(&txn), Some(&header)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["pdus"][&orphan]["error"].as_str().is_some_and(|e| e.contains("state")), "{body}");
    assert!(services(&a).store.get_event_status(&orphan).await.unwrap().is_none(), "nothing stored");

    // With B down, the auth event cannot be fetched: the message is rejected.
    let (renamed_again, renamed_again_pdu) = member("Bob Three");
    services(&b).handle_pdu(&room_id, &v12, renamed_again_pdu, Arrival::Live).await.unwrap();
    let (unlucky, unlucky_pdu) =
        build_pdu(&b, &room, &bob, "m.room.message", None, text("lost"), &[&join_event], &[&levels, &renamed_again]);
    b.pause().await;
    let started = Instant::now();
    let outcome = services(&a).handle_pdu(&room_id, &v12, unlucky_pdu.clone(), Arrival::Live).await.unwrap();
    let PduOutcome::Rejected { reason, .. } = &outcome else { panic!("{outcome:?}") };
    assert!(reason.contains(&renamed_again) && reason.contains("unknown"), "{reason}");
    assert!(started.elapsed() < Duration::from_secs(15), "the fetch is bounded: {:?}", started.elapsed());
    let (status, _) = a.get(&format!("/_matrix/client/v3/rooms/{room}/event/{unlucky}"), Some(&alice_token)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "a rejected event is not shown");
    // It stays rejected when it comes again with B back.
    b.resume().await;
    let outcome = services(&a).handle_pdu(&room_id, &v12, unlucky_pdu, Arrival::Live).await.unwrap();
    assert!(matches!(outcome, PduOutcome::Duplicate { .. }), "{outcome:?}");
    a.stop().await;
    b.stop().await;
}

/// A parent that arrives over federation after the child relating to it (sent by
/// another server in two transactions, child first) is stored with its `related` flag,
/// so its bundled thread is served.
async fn a_parent_that_arrives_after_its_child_is_flagged(backend: Backend) {
    use crate::federation::{fed_request, sign};
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend, TRUSTING).await;
    let (_, alice_token, _) = a.register("alice").await;
    let (bob, bob_token, _) = b.register("bob").await;
    let room = a.create_room(&alice_token, json!({"preset": "public_chat"})).await;
    join(&b, &bob_token, &room, &a, &alice_token).await;
    let (_, page) = a.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=1"), Some(&alice_token)).await;
    let head = page["chunk"][0]["event_id"].as_str().unwrap().to_owned();
    let power = state_id(&a, &alice_token, &room, "m.room.power_levels", "").await;
    let member = state_id(&a, &alice_token, &room, "m.room.member", &bob).await;
    let auth = [power.as_str(), member.as_str()];
    let (parent_id, parent) = build_pdu(&b, &room, &bob, "m.room.message", None, text("the parent"), &[&head], &auth);
    let mut reply = text("the child");
    reply["m.relates_to"] = json!({"rel_type": "m.thread", "event_id": parent_id});
    let (child_id, child) = build_pdu(&b, &room, &bob, "m.room.message", None, reply, &[&head], &auth);
    for (txn, pdu) in [("child-first", &child), ("parent-second", &parent)] {
        let path = format!("/_matrix/federation/v1/send/{txn}");
        let body = json!({"origin": name(&b).as_str(), "origin_server_ts": convo::service::now_ms(), "pdus": [pdu]});
        let auth_header = sign(&b, name(&a).as_str(), "PUT", &path, Some(&body));
        let (status, answer) = fed_request(&a, reqwest::Method::PUT, &path, Some(&body), Some(&auth_header)).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["pdus"].as_object().unwrap().values().next().unwrap(), &json!({}), "{answer}");
    }
    let stored = services(&a).store.get_event(&parent_id).await.unwrap().unwrap();
    assert!(stored.related, "the parent is flagged");
    let seen = event(&a, &alice_token, &room, &parent_id).await;
    let thread = &seen["unsigned"]["m.relations"]["m.thread"];
    assert_eq!((thread["count"].clone(), thread["latest_event"]["event_id"].clone()), (json!(1), json!(child_id)));
    a.stop().await;
    b.stop().await;
}

/// The round trips to the database (`statements_run`: statements and transactions) of
/// one `/send` carrying one message whose prev event is known: the fewest over five
/// (background work can only add). The prev events are read once, not three times.
async fn a_pdu_with_known_prevs_reads_them_once(backend: Backend) {
    use crate::federation::{fed_request, sign};
    let a = federating(backend.clone(), TRUSTING).await;
    let b = federating(backend, TRUSTING).await;
    let (_, alice_token, _) = a.register("alice").await;
    let (bob, bob_token, _) = b.register("bob").await;
    let room = a.create_room(&alice_token, json!({"preset": "public_chat"})).await;
    join(&b, &bob_token, &room, &a, &alice_token).await;
    let (_, page) = a.get(&format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=1"), Some(&alice_token)).await;
    let mut head = page["chunk"][0]["event_id"].as_str().unwrap().to_owned();
    let power = state_id(&a, &alice_token, &room, "m.room.power_levels", "").await;
    let member = state_id(&a, &alice_token, &room, "m.room.member", &bob).await;
    let store = &services(&a).store;
    let mut fewest = u64::MAX;
    for i in 0..5 {
        let (id, pdu) = build_pdu(
            &b,
            &room,
            &bob,
            "m.room.message",
            None,
            text(&format!("message {i}")),
            &[&head],
            &[&power, &member],
        );
        let path = format!("/_matrix/federation/v1/send/cost-{i}");
        let body = json!({"origin": name(&b).as_str(), "origin_server_ts": convo::service::now_ms(), "pdus": [pdu]});
        let auth_header = sign(&b, name(&a).as_str(), "PUT", &path, Some(&body));
        let before = store.statements_run();
        let (status, answer) = fed_request(&a, reqwest::Method::PUT, &path, Some(&body), Some(&auth_header)).await;
        let used = store.statements_run() - before;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["pdus"][&id], json!({}), "{answer}");
        fewest = fewest.min(used);
        head = id;
    }
    println!("round trips of a /send of one message with known prevs: {fewest}");
    assert!(fewest <= MAX_SEND_ROUND_TRIPS, "{fewest} round trips");
    a.stop().await;
    b.stop().await;
}

/// What `a_pdu_with_known_prevs_reads_them_once` allows (15 when the prevs were read
/// three times: by the gap check, the check for prevs without state, and the pipeline).
const MAX_SEND_ROUND_TRIPS: u64 = 13;

backend_tests!(
    missing_auth_events_are_fetched_from_the_room_servers,
    redactions_from_another_server_need_the_power_to_redact,
    the_state_at_a_gap_get_missing_events_cannot_fill_comes_from_the_sender,
    a_parent_that_arrives_after_its_child_is_flagged,
    a_pdu_with_known_prevs_reads_them_once,
);
