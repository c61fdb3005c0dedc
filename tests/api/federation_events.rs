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

backend_tests!(redactions_from_another_server_need_the_power_to_redact);
