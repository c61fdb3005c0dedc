//! Template rows (`push_groups`, issue 13): an event that singles out none of a room's
//! members writes one row per template of push rules that it notifies, whatever the
//! room's size, and every member's counts, `/notifications` and receipts follow from
//! it as from rows of their own: after mentions, receipts, a redaction, a member who
//! mutes the room, a leave and a rejoin, and a restart (counts read cold).

use reqwest::StatusCode;
use serde_json::json;

use crate::{
    backend_tests,
    common::{Backend, TestServer},
    unread::{count_from_scratch, counts, mention, notifications, put_rule, receipt},
};

backend_tests!(one_row_per_template_counts_for_every_member);

/// One number from the server's database.
async fn db_count(url: &str, sql: &str) -> i64 {
    use sqlx::Connection;
    if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(&mut conn).await.unwrap()
    } else {
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(&mut conn).await.unwrap()
    }
}

/// Rows of their own and template rows stored so far.
async fn rows(url: &str) -> (i64, i64) {
    (
        db_count(url, "SELECT COUNT(*) FROM event_push_actions").await,
        db_count(url, "SELECT COUNT(*) FROM push_groups").await,
    )
}

async fn one_row_per_template_counts_for_every_member(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let url = server.config().database.url.clone();
    let (alice_id, alice, _) = server.register("alice").await;
    let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    let mut members = Vec::new();
    for i in 0..8 {
        let (id, token, _) = server.register(&format!("member{i}")).await;
        server.join(&token, &room).await;
        members.push((id, token));
    }
    // The first message after the joins opens the last member's span.
    let opening = server.send_text(&alice, &room, "opening").await;

    // Five plain messages for nine members: a template row each, and the sender's own
    // row (their message never counts for them).
    let before = rows(&url).await;
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(server.send_text(&alice, &room, &format!("message {i}")).await);
    }
    let after = rows(&url).await;
    assert_eq!((after.0 - before.0, after.1 - before.1), (5, 5), "rows per plain message");
    for (id, token) in &members {
        assert_eq!(counts(&server, token, &room, "").await.0, (6, 0), "{id}");
    }
    assert_eq!(counts(&server, &alice, &room, "").await.0, (0, 0), "the sender");

    // A mention: a row of its target's own (and the sender's), the others by the template.
    let (m3_id, m3) = &members[3];
    let before = rows(&url).await;
    let mentioned = mention(&server, &alice, &room, m3_id).await;
    let after = rows(&url).await;
    assert_eq!((after.0 - before.0, after.1 - before.1), (2, 1));
    assert_eq!(counts(&server, m3, &room, "").await.0, (7, 1));
    assert_eq!(counts(&server, &members[0].1, &room, "").await.0, (7, 0));

    // A receipt at the third message: the fourth, fifth and the mention are left.
    let m1 = &members[1].1;
    receipt(&server, m1, &room, "m.read", &sent[2], None).await;
    assert_eq!(counts(&server, m1, &room, "").await.0, (3, 0));

    // A redaction of a template row's event comes off every count that holds it: of
    // those whose count took the row in through the template (member0) and through a
    // recount (member1's receipt came after it); not of those who read it.
    let (m5_id, m5) = &members[5];
    receipt(&server, m5, &room, "m.read", &mentioned, None).await;
    let (status, body) =
        server.put(&format!("/_matrix/client/v3/rooms/{room}/redact/{}/r1", sent[4]), Some(&alice), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(counts(&server, &members[0].1, &room, "").await.0, (6, 0));
    assert_eq!(counts(&server, m1, &room, "").await.0, (2, 0));
    assert_eq!(counts(&server, m3, &room, "").await.0, (6, 1));
    assert_eq!(counts(&server, m5, &room, "").await.0, (0, 0), "{m5_id}");

    // Member2 mutes the room: their count stops (their template changed with the next
    // event), the others' goes on.
    let (m2_id, m2) = &members[2];
    put_rule(&server, m2, &format!("room/{room}"), json!({"actions": []})).await;
    server.send_text(&alice, &room, "after the mute").await;
    server.send_text(&alice, &room, "and again").await;
    assert_eq!(counts(&server, m2, &room, "").await.0, (6, 0), "{m2_id}");
    assert_eq!(counts(&server, &members[0].1, &room, "").await.0, (8, 0));

    // Member4 leaves and comes back: only what came after the rejoin counts.
    let (m4_id, m4) = &members[4];
    server.leave(m4, &room).await;
    let away = server.send_text(&alice, &room, "while member4 is away").await;
    server.join(m4, &room).await;
    let back = server.send_text(&alice, &room, "welcome back").await;
    let latest = server.send_text(&alice, &room, "latest").await;
    assert_eq!(counts(&server, m4, &room, "").await.0, (2, 0), "{m4_id}");
    let listed: Vec<String> = notifications(&server, m4).await.into_iter().map(|n| n.0).collect();
    assert!(listed.starts_with(&[latest.clone(), back.clone()]), "{listed:?}");
    assert!(!listed.contains(&away), "not notified while away: {listed:?}");
    assert!(listed.contains(&opening), "what came before the leave stays listed: {listed:?}");
    assert!(!listed.contains(&sent[4]), "the redacted event is not listed: {listed:?}");

    // `/notifications`: the template rows, the mention highlighted for its target only.
    let n3 = notifications(&server, m3).await;
    assert_eq!(n3.len(), 11, "{n3:?}");
    assert_eq!(n3.iter().filter(|n| n.1).map(|n| &n.0).collect::<Vec<_>>(), [&mentioned]);
    assert!(notifications(&server, &members[0].1).await.iter().all(|n| !n.1));
    assert!(notifications(&server, &alice).await.is_empty(), "the sender is notified of nothing");

    // Every count as counted from scratch, and the same after a restart (read cold).
    let mut expected = Vec::new();
    for (id, token) in &members {
        let count = counts(&server, token, &room, "").await.0;
        assert_eq!(count_from_scratch(&url, id, &room).await, count, "{id} from scratch");
        expected.push(count);
    }
    assert_eq!(count_from_scratch(&url, &alice_id, &room).await, (0, 0));
    server.restart().await;
    for ((id, token), expected) in members.iter().zip(&expected) {
        assert_eq!(counts(&server, token, &room, "").await.0, *expected, "{id} after a restart");
    }
    server.stop().await;
}
