//! What a send and a join cost as a room grows (issue 13), and what the cheaper paths
//! must keep right. `room_size_cost` is a measurement run by hand,
//! not a pass/fail test (`#[ignore]`d, so CI's time budget does not carry it).
//!
//! ```sh
//! ROOM_SIZES=10,2000 cargo nextest run --run-ignored only -E 'test(/room_size_cost/)' --no-capture
//! ```
//!
//! Members are made through the store (no password, no HTTP) and joined through the
//! membership service; the timed sends and joins go through HTTP like a client's. It
//! prints, per room size, the median time and the SQL statements (sqlx's statement
//! events) of a send, of a join, and of the first send after a join. `BENCH_POSTGRES=1`
//! runs it on PostgreSQL (`TEST_POSTGRES_URL`); `ROOM_SIZE_STATEMENTS=1` also prints
//! the statements the sends spent most time in.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tracing_subscriber::{Layer, layer::SubscriberExt};

use crate::common::{Backend, TestServer};

static STATEMENTS: AtomicUsize = AtomicUsize::new(0);

/// With `ROOM_SIZE_STATEMENTS=1`: time spent per statement text (its first 120
/// characters): runs and seconds.
static STATEMENT_TIMES: std::sync::Mutex<Option<std::collections::HashMap<String, (usize, f64)>>> =
    std::sync::Mutex::new(None);

/// Counts sqlx's statement events (each statement run logs one under `sqlx::query`).
struct CountStatements;

/// Reads a statement event's text and time.
#[derive(Default)]
struct StatementFields {
    text: String,
    secs: f64,
}

impl tracing::field::Visit for StatementFields {
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        if field.name() == "elapsed_secs" {
            self.secs = value;
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if (field.name() == "db.statement" && !value.trim().is_empty())
            || (field.name() == "summary" && self.text.is_empty())
        {
            self.text = value.split_whitespace().collect::<Vec<_>>().join(" ").chars().take(120).collect();
        }
    }

    fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
}

impl<S: tracing::Subscriber> Layer<S> for CountStatements {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() == "sqlx::query" {
            STATEMENTS.fetch_add(1, Ordering::Relaxed);
            let mut times = STATEMENT_TIMES.lock().unwrap();
            if let Some(times) = times.as_mut() {
                let mut fields = StatementFields::default();
                event.record(&mut fields);
                let entry = times.entry(fields.text).or_default();
                entry.0 += 1;
                entry.1 += fields.secs;
            }
        }
    }
}

/// Starts timing statements, when asked (`ROOM_SIZE_STATEMENTS=1`).
fn start_statement_times() {
    if std::env::var("ROOM_SIZE_STATEMENTS").as_deref() == Ok("1") {
        *STATEMENT_TIMES.lock().unwrap() = Some(Default::default());
    }
}

/// Prints the statements that took the most time since `start_statement_times`.
fn print_statement_times(what: &str) {
    let Some(times) = STATEMENT_TIMES.lock().unwrap().take() else { return };
    let mut times: Vec<(String, (usize, f64))> = times.into_iter().collect();
    times.sort_by(|a, b| b.1.1.total_cmp(&a.1.1));
    for (text, (runs, secs)) in times.into_iter().take(8) {
        eprintln!("    {what}: {:.1} ms in {runs} runs: {text}", secs * 1000.0);
    }
}

fn median(mut v: Vec<(Duration, usize)>) -> (f64, usize) {
    v.sort();
    let (d, n) = v[v.len() / 2];
    (d.as_secs_f64() * 1000.0, n)
}

async fn timed<F: std::future::Future<Output = ()>>(f: F) -> (Duration, usize) {
    let before = STATEMENTS.load(Ordering::Relaxed);
    let start = Instant::now();
    f.await;
    (start.elapsed(), STATEMENTS.load(Ordering::Relaxed) - before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, run by hand"]
async fn room_size_cost() {
    let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry().with(CountStatements));
    let sizes: Vec<usize> = std::env::var("ROOM_SIZES")
        .unwrap_or_else(|_| "10,2000".into())
        .split(',')
        .map(|s| s.trim().parse().expect("ROOM_SIZES: numbers"))
        .collect();
    let backend = if std::env::var("BENCH_POSTGRES").as_deref() == Ok("1") {
        Backend::postgres().expect("TEST_POSTGRES_URL")
    } else {
        Backend::Sqlite
    };
    let server = TestServer::start(backend).await;
    let services = server.running.as_ref().unwrap().services.clone();
    let (_, token, _) = server.register("owner").await;
    let room = server.create_room(&token, json!({"preset": "public_chat"})).await;
    let room_id = ruma::OwnedRoomId::try_from(room.as_str()).unwrap();
    // Joiners with tokens, for the timed joins through HTTP.
    let mut joiners = Vec::new();
    for i in 0..5 * sizes.len() {
        joiners.push(server.register(&format!("joiner{i}")).await.1);
    }
    let mut joiners = joiners.into_iter();
    let mut members = 1;
    let setup = Instant::now();
    for &size in &sizes {
        while members < size {
            let user = format!("@member{members}:localhost");
            services
                .store
                .create_user(convo::storage::NewUser {
                    user_id: &user,
                    password_hash: None,
                    is_admin: false,
                    displayname: Some(&format!("Member {members}")),
                    created_ts: 0,
                    session: None,
                    registration_token: None,
                    uiaa_session: None,
                })
                .await
                .unwrap();
            let user = ruma::OwnedUserId::try_from(user).unwrap();
            services.join_room(&room_id, &user, None).await.unwrap();
            members += 1;
            if members % 250 == 0 {
                eprintln!("  {members} members after {:.1} s", setup.elapsed().as_secs_f64());
            }
        }
        let mut sends = Vec::new();
        start_statement_times();
        for i in 0..15 {
            sends.push(
                timed(async {
                    server.send_text(&token, &room, &format!("hello {i}")).await;
                })
                .await,
            );
        }
        print_statement_times(&format!("N = {size}, 15 sends"));
        let mut joins = Vec::new();
        let mut after_join = Vec::new();
        start_statement_times();
        for _ in 0..5 {
            let joiner = joiners.next().unwrap();
            joins.push(timed(server.join(&joiner, &room)).await);
            after_join.push(
                timed(async {
                    server.send_text(&token, &room, "after a join").await;
                })
                .await,
            );
            members += 1;
        }
        print_statement_times(&format!("N = {size}, 5 joins and 5 sends"));
        let (send_ms, send_n) = median(sends);
        let (join_ms, join_n) = median(joins);
        let (after_ms, after_n) = median(after_join);
        eprintln!(
            "N = {size}: send {send_ms:.1} ms ({send_n} statements), join {join_ms:.1} ms ({join_n} statements), \
             send after a join {after_ms:.1} ms ({after_n} statements)"
        );
    }
    server.stop().await;
}

/// The latest notification of `token`'s user: its room's event body and actions.
async fn latest_notification(server: &TestServer, token: &str) -> Option<(String, Value)> {
    let (status, body) = server.get("/_matrix/client/v3/notifications?limit=1", Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let n = body["notifications"].as_array().unwrap().first()?.clone();
    Some((n["event"]["content"]["body"].as_str().unwrap_or_default().to_owned(), n["actions"].clone()))
}

fn sounds(actions: &Value) -> bool {
    actions.as_array().unwrap().iter().any(|a| a["set_tweak"] == "sound")
}

/// Joins and leaves change the room's member caches in place (not read again): who is
/// notified, the member count the one-to-one rule sees, mentions, and the joined count
/// and heroes that members see, all stay right across them.
async fn membership_changes_keep_push_and_counts_right(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (owner_id, owner, _) = server.register("owner").await;
    let (alice_id, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    let (carol_id, carol, _) = server.register("carol").await;
    let room = server.create_room(&owner, json!({"preset": "public_chat"})).await;
    server.join(&alice, &room).await;
    // A send loads the caches; the changes below are taken in place.
    server.send_text(&owner, &room, "two of us").await;
    let (body, actions) = latest_notification(&server, &alice).await.expect("alice is notified");
    assert_eq!(body, "two of us");
    assert!(sounds(&actions), "a room of two is one-to-one: {actions}");

    server.join(&bob, &room).await;
    server.send_text(&owner, &room, "three of us").await;
    let (body, actions) = latest_notification(&server, &bob).await.expect("bob, who just joined, is notified");
    assert_eq!(body, "three of us");
    assert!(!sounds(&actions), "a room of three is not one-to-one: {actions}");
    let (body, actions) = latest_notification(&server, &alice).await.unwrap();
    assert_eq!(body, "three of us");
    assert!(!sounds(&actions), "{actions}");

    // A mention highlights for its target only.
    let txn = convo::service::generate_registration_token();
    let (status, sent) = server
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}"),
            Some(&owner),
            json!({"msgtype": "m.text", "body": "alice!", "m.mentions": {"user_ids": [alice_id]}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{sent}");
    let sync = server.sync(&alice, None, "").await;
    assert_eq!(sync["rooms"]["join"][&room]["unread_notifications"]["highlight_count"], 1, "{sync}");
    let sync = server.sync(&bob, None, "").await;
    assert_eq!(sync["rooms"]["join"][&room]["unread_notifications"]["highlight_count"], 0, "{sync}");
    assert_eq!(sync["rooms"]["join"][&room]["unread_notifications"]["notification_count"], 2, "{sync}");

    // Bob leaves: no longer notified, and the room is one-to-one again.
    server.leave(&bob, &room).await;
    server.send_text(&owner, &room, "bob left").await;
    let (body, _) = latest_notification(&server, &bob).await.unwrap();
    assert_eq!(body, "alice!", "bob is not notified after leaving");
    let (body, actions) = latest_notification(&server, &alice).await.unwrap();
    assert_eq!(body, "bob left");
    assert!(sounds(&actions), "two joined members again: {actions}");

    // Carol joins with a long-polling sync of alice's waiting: alice sees the join.
    let since = server.sync(&alice, None, "").await["next_batch"].as_str().unwrap().to_owned();
    let path = format!("/_matrix/client/v3/sync?since={since}&timeout=10000");
    let waiting = {
        let http = server.http.clone();
        let url = format!("{}{path}", server.base);
        let alice = alice.clone();
        tokio::spawn(
            async move { http.get(url).bearer_auth(alice).send().await.unwrap().json::<Value>().await.unwrap() },
        )
    };
    server.wait_for_waiting_syncs(&alice_id, 1).await;
    server.join(&carol, &room).await;
    let woke = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("alice's sync wakes").unwrap();
    let timeline = &woke["rooms"]["join"][&room]["timeline"]["events"];
    assert!(
        timeline.as_array().unwrap().iter().any(|e| e["type"] == "m.room.member" && e["state_key"] == carol_id),
        "alice sees carol's join: {woke}"
    );
    let summary = &server.sync(&carol, None, "").await["rooms"]["join"][&room]["summary"];
    assert_eq!(summary["m.joined_member_count"], 3, "{summary}");
    // Heroes: the joined members by when they joined; not bob, who left, while
    // there are joined ones.
    assert_eq!(summary["m.heroes"], json!([owner_id, alice_id]), "{summary}");
    server.send_text(&owner, &room, "welcome carol").await;
    let (body, _) = latest_notification(&server, &carol).await.expect("carol, who just joined, is notified");
    assert_eq!(body, "welcome carol");
    server.stop().await;
}

crate::backend_tests!(membership_changes_keep_push_and_counts_right);
