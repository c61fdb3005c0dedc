//! The stream: positions handed out without a lock held to commit, which then commit
//! out of order, and `/sync` tokens that never pass the persisted-up-to mark. A client
//! syncing through parallel writers of every kind sees each write once; a failed write
//! does not hold the others back; positions keep growing past a restart.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{
    backend_tests,
    common::{Backend, TestServer},
};

/// A filter with timelines long enough that no incremental sync here is `limited`.
async fn long_timeline_filter(server: &TestServer, user_id: &str, token: &str) -> String {
    let (status, body) = server
        .post(
            &format!("/_matrix/client/v3/user/{user_id}/filter"),
            Some(token),
            json!({"room": {"timeline": {"limit": 1000}}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["filter_id"].as_str().unwrap().to_owned()
}

/// What one client has seen along its chain of `since` tokens.
#[derive(Default)]
struct Seen {
    /// How many times each timeline event was seen.
    events: HashMap<String, usize>,
    /// Message bodies, how many times each.
    bodies: HashMap<String, usize>,
    /// To-device messages (by their `n`), how many times each.
    to_device: HashMap<String, usize>,
    /// Global account data of each type, each value in the order seen.
    account_data: BTreeMap<String, Vec<i64>>,
    /// The latest status message seen from each user.
    presence: HashMap<String, String>,
    /// The latest read receipt seen from each user, by room.
    receipts: HashMap<(String, String), String>,
}

impl Seen {
    /// Takes in one sync response; answers its `next_batch`.
    fn take(&mut self, sync: &Value) -> String {
        for (room_id, room) in sync["rooms"]["join"].as_object().into_iter().flatten() {
            assert_ne!(room["timeline"]["limited"], true, "a limited timeline in {room_id}: {room}");
            for event in room["timeline"]["events"].as_array().into_iter().flatten() {
                *self.events.entry(event["event_id"].as_str().unwrap().to_owned()).or_default() += 1;
                if event["type"] == "m.room.message" {
                    *self.bodies.entry(event["content"]["body"].as_str().unwrap().to_owned()).or_default() += 1;
                }
            }
            for event in room["ephemeral"]["events"].as_array().into_iter().flatten() {
                if event["type"] != "m.receipt" {
                    continue;
                }
                for (event_id, by_type) in event["content"].as_object().unwrap() {
                    for user in by_type["m.read"].as_object().into_iter().flatten().map(|(user, _)| user) {
                        self.receipts.insert((room_id.clone(), user.clone()), event_id.clone());
                    }
                }
            }
        }
        for message in sync["to_device"]["events"].as_array().into_iter().flatten() {
            *self.to_device.entry(message["content"]["n"].as_str().unwrap().to_owned()).or_default() += 1;
        }
        for data in sync["account_data"]["events"].as_array().into_iter().flatten() {
            if let Some(n) = data["content"]["n"].as_i64() {
                self.account_data.entry(data["type"].as_str().unwrap().to_owned()).or_default().push(n);
            }
        }
        for p in sync["presence"]["events"].as_array().into_iter().flatten() {
            if let Some(msg) = p["content"]["status_msg"].as_str() {
                self.presence.insert(p["sender"].as_str().unwrap().to_owned(), msg.to_owned());
            }
        }
        sync["next_batch"].as_str().unwrap().to_owned()
    }
}

const ROOMS: usize = 6;
const SENDERS: usize = 6;
const MESSAGES_EACH: usize = 20;

async fn parallel_writers_of_every_kind_are_each_seen_once(backend: Backend) {
    let server = Arc::new(TestServer::start(backend).await);
    let (watcher_id, watcher, watcher_device) = server.register("watcher").await;
    let mut senders = Vec::new();
    for i in 0..SENDERS {
        senders.push(server.register(&format!("sender{i}")).await);
    }
    let mut rooms = Vec::new();
    for r in 0..ROOMS {
        let creator = &senders[r % SENDERS];
        let invite: Vec<&str> = std::iter::once(watcher_id.as_str())
            .chain(senders.iter().map(|(id, _, _)| id.as_str()).filter(|id| *id != creator.0))
            .collect();
        let body = json!({"invite": invite, "power_level_content_override": {"events": {"m.room.topic": 0}}});
        let room = server.create_room(&creator.1, body).await;
        server.join(&watcher, &room).await;
        for (i, (_, token, _)) in senders.iter().enumerate() {
            if i != r % SENDERS {
                server.join(token, &room).await;
            }
        }
        rooms.push(room);
    }
    let filter = long_timeline_filter(&server, &watcher_id, &watcher).await;
    let mut seen = Seen::default();
    let initial = server.sync(&watcher, None, &format!("filter={filter}")).await;
    let mut since = seen.take(&initial);
    // What was there before is not what this test counts.
    seen = Seen::default();

    // The writers: each sender sends messages across the rooms, with a topic change, a
    // receipt, a to-device message and a presence change now and then; the watcher
    // itself writes account data and changes its display name (a new member event in
    // every room, which moves its memberships along the stream).
    let mut writers = Vec::new();
    for (i, (sender_id, token, _)) in senders.iter().enumerate() {
        let (server, token, rooms, sender_id) = (server.clone(), token.clone(), rooms.clone(), sender_id.clone());
        let (watcher_id, watcher_device) = (watcher_id.clone(), watcher_device.clone());
        writers.push(tokio::spawn(async move {
            let (mut last_status, mut last_receipts) = (String::new(), HashMap::new());
            for k in 0..MESSAGES_EACH {
                let room = &rooms[(i + k) % ROOMS];
                let event_id = server.send_text(&token, room, &format!("m{i}-{k}")).await;
                match k % 5 {
                    0 => {
                        let (status, body) = server
                            .put(
                                &format!("/_matrix/client/v3/rooms/{room}/state/m.room.topic"),
                                Some(&token),
                                json!({"topic": format!("t{i}-{k}")}),
                            )
                            .await;
                        assert_eq!(status, StatusCode::OK, "{body}");
                    }
                    1 => {
                        let (status, body) = server
                            .post(
                                &format!("/_matrix/client/v3/rooms/{room}/receipt/m.read/{event_id}"),
                                Some(&token),
                                json!({}),
                            )
                            .await;
                        assert_eq!(status, StatusCode::OK, "{body}");
                        last_receipts.insert(room.clone(), event_id);
                    }
                    2 => {
                        let (status, body) = server
                            .put(
                                &format!("/_matrix/client/v3/sendToDevice/m.test/t{i}-{k}"),
                                Some(&token),
                                json!({"messages": {&watcher_id: {&watcher_device: {"n": format!("d{i}-{k}")}}}}),
                            )
                            .await;
                        assert_eq!(status, StatusCode::OK, "{body}");
                    }
                    3 => {
                        last_status = format!("s{i}-{k}");
                        let (status, body) = server
                            .put(
                                &format!("/_matrix/client/v3/presence/{sender_id}/status"),
                                Some(&token),
                                json!({"presence": "online", "status_msg": last_status}),
                            )
                            .await;
                        assert_eq!(status, StatusCode::OK, "{body}");
                    }
                    _ => {}
                }
            }
            (last_status, last_receipts)
        }));
    }
    let own = {
        let (server, watcher, watcher_id) = (server.clone(), watcher.clone(), watcher_id.clone());
        tokio::spawn(async move {
            for n in 0..30i64 {
                let kind = format!("test.counter.{}", n % 3);
                let (status, body) = server
                    .put(
                        &format!("/_matrix/client/v3/user/{watcher_id}/account_data/{kind}"),
                        Some(&watcher),
                        json!({"n": n}),
                    )
                    .await;
                assert_eq!(status, StatusCode::OK, "{body}");
                if n % 10 == 5 {
                    let (status, body) = server
                        .put(
                            &format!("/_matrix/client/v3/profile/{watcher_id}/displayname"),
                            Some(&watcher),
                            json!({"displayname": format!("watcher {n}")}),
                        )
                        .await;
                    assert_eq!(status, StatusCode::OK, "{body}");
                }
            }
        })
    };

    // Meanwhile the watcher syncs incrementally, and goes on until it has everything.
    let expected_bodies: HashSet<String> =
        (0..SENDERS).flat_map(|i| (0..MESSAGES_EACH).map(move |k| format!("m{i}-{k}"))).collect();
    let expected_to_device: HashSet<String> = (0..SENDERS)
        .flat_map(|i| (0..MESSAGES_EACH).filter(|k| k % 5 == 2).map(move |k| format!("d{i}-{k}")))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut statuses = None;
    let mut own = Some(own);
    loop {
        let sync = server.sync(&watcher, Some(&since), &format!("filter={filter}&timeout=500")).await;
        since = seen.take(&sync);
        if statuses.is_none()
            && writers.iter().all(|w| w.is_finished())
            && own.as_ref().is_some_and(|o| o.is_finished())
        {
            own.take().unwrap().await.unwrap();
            let mut done = Vec::new();
            for writer in writers.drain(..) {
                done.push(writer.await.unwrap());
            }
            statuses = Some(done);
        }
        let all_in = statuses.is_some()
            && expected_bodies.iter().all(|b| seen.bodies.contains_key(b))
            && expected_to_device.iter().all(|d| seen.to_device.contains_key(d))
            && (0..3)
                .all(|c| seen.account_data.get(&format!("test.counter.{c}")).and_then(|v| v.last()) == Some(&(27 + c)));
        if all_in {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not everything reached the watcher: {} of {} messages, {} of {} to-device messages, account data {:?}",
            seen.bodies.len(),
            expected_bodies.len(),
            seen.to_device.len(),
            expected_to_device.len(),
            seen.account_data
        );
    }
    // One more sync picks up what the last writes left (receipts, presence).
    let sync = server.sync(&watcher, Some(&since), &format!("filter={filter}&timeout=0")).await;
    seen.take(&sync);

    let twice: Vec<_> = seen.events.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "timeline events seen more than once: {twice:?}");
    assert_eq!(seen.bodies.keys().cloned().collect::<HashSet<_>>(), expected_bodies);
    let twice: Vec<_> = seen.to_device.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "to-device messages seen more than once: {twice:?}");
    assert_eq!(seen.to_device.keys().cloned().collect::<HashSet<_>>(), expected_to_device);
    for (kind, values) in &seen.account_data {
        // Each change is seen once at most (changes may be folded into a later one).
        assert!(values.windows(2).all(|w| w[0] < w[1]), "{kind} went {values:?}");
    }
    let statuses = statuses.unwrap();
    for (i, (sender_id, _, _)) in senders.iter().enumerate() {
        let (last_status, last_receipts) = &statuses[i];
        assert_eq!(seen.presence.get(sender_id), Some(last_status), "the last presence of {sender_id}");
        for (room, event_id) in last_receipts {
            let receipt = seen.receipts.get(&(room.clone(), sender_id.clone()));
            assert_eq!(receipt, Some(event_id), "the last receipt of {sender_id} in {room}");
        }
    }
    stop(server).await;
}

/// Stops a server shared with tasks that have all ended.
async fn stop(server: Arc<TestServer>) {
    Arc::try_unwrap(server).ok().expect("no task holds the server").stop().await;
}

async fn a_write_still_open_holds_back_the_ones_after_it(backend: Backend) {
    let server = Arc::new(TestServer::start(backend).await);
    let (_, alice, _) = server.register("alice").await;
    let (bob_id, bob, _) = server.register("bob").await;
    let room = server.create_room(&alice, json!({"invite": [&bob_id]})).await;
    server.join(&bob, &room).await;
    let first = server.sync(&bob, None, "").await;
    let since = first["next_batch"].as_str().unwrap().to_owned();
    let store = &server.running.as_ref().unwrap().services.store;

    // A writer has taken its position and not committed yet; later ones commit.
    let held = store.hold_stream_position().await.unwrap();
    let waiting = {
        let (server, bob, since) = (server.clone(), bob.clone(), since.clone());
        tokio::spawn(async move { server.sync(&bob, Some(&since), "timeout=30000").await })
    };
    server.wait_for_waiting_syncs(&bob_id, 1).await;
    let later = server.send_text(&alice, &room, "later").await;
    let later_at = store.get_event(&later).await.unwrap().unwrap().stream_ordering;
    assert!(later_at > held.position());
    let (status, _) = server
        .put(&format!("/_matrix/client/v3/user/{bob_id}/account_data/test.later"), Some(&bob), json!({"n": 1}))
        .await;
    assert_eq!(status, StatusCode::OK);
    // Readers stop below the open position, however long it stays open.
    assert_eq!(store.current_stream_position().await.unwrap(), held.position() - 1);
    let quick = server.sync(&bob, Some(&since), "timeout=0").await;
    assert!(position_of(quick["next_batch"].as_str().unwrap()) < held.position(), "{quick}");
    assert!(quick["rooms"]["join"][&room].is_null(), "the later event is not shown yet: {quick}");
    assert!(quick["account_data"]["events"].as_array().is_none_or(|e| e.is_empty()), "{quick}");
    assert!(!waiting.is_finished(), "the long-poll is not answered past the mark");

    // Once it is let go, the mark passes them and the long-poll answers them, once.
    drop(held);
    let sync = waiting.await.unwrap();
    assert_eq!(crate::common::bodies(&sync["rooms"]["join"][&room]["timeline"]["events"]), vec!["later"]);
    let next = sync["next_batch"].as_str().unwrap();
    assert!(position_of(next) >= later_at, "{sync}");
    let mut data = Seen::default();
    data.take(&sync);
    let sync = server.sync(&bob, Some(next), "timeout=0").await;
    data.take(&sync);
    assert_eq!(data.account_data.get("test.later"), Some(&vec![1]), "{sync}");
    assert_eq!(data.bodies.len(), 1);
    stop(server).await;
}

async fn a_room_whose_membership_moved_past_the_mark_is_still_synced(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (bob_id, bob, _) = server.register("bob").await;
    let room = server.create_room(&alice, json!({"invite": [&bob_id]})).await;
    server.join(&bob, &room).await;
    let first = server.sync(&bob, None, "").await;
    let since = first["next_batch"].as_str().unwrap().to_owned();
    let store = &server.running.as_ref().unwrap().services.store;

    // Alice sends; then, behind a writer still open, bob's display name changes: his
    // membership row moves past the mark.
    server.send_text(&alice, &room, "before the rename").await;
    let held = store.hold_stream_position().await.unwrap();
    let (status, _) = server
        .put(&format!("/_matrix/client/v3/profile/{bob_id}/displayname"), Some(&bob), json!({"displayname": "B"}))
        .await;
    assert_eq!(status, StatusCode::OK);

    // The room is still bob's as of the mark: alice's message is synced now, not
    // skipped by a token that passes it.
    let sync = server.sync(&bob, Some(&since), "timeout=0").await;
    assert_eq!(
        crate::common::bodies(&sync["rooms"]["join"][&room]["timeline"]["events"]),
        vec!["before the rename"],
        "{sync}"
    );
    drop(held);
    let next = sync["next_batch"].as_str().unwrap();
    let sync = server.sync(&bob, Some(next), "timeout=5000").await;
    let events = sync["rooms"]["join"][&room]["timeline"]["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{sync}");
    assert_eq!(events[0]["content"]["displayname"], "B");
    server.stop().await;
}

/// Installs a trigger that makes every write of global account data of type
/// `test.fail` fail inside its transaction (after it took its stream position).
async fn make_account_data_writes_fail(server: &TestServer) {
    use sqlx::Connection;
    let url = &server.config().database.url;
    if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query(
            "CREATE TRIGGER test_fail BEFORE INSERT ON account_data WHEN NEW.data_type = 'test.fail'
             BEGIN SELECT RAISE(ABORT, 'test_fail'); END",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        conn.close().await.unwrap();
    } else {
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query(
            "CREATE FUNCTION test_fail() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'test_fail'; END $$",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        sqlx::query(
            "CREATE TRIGGER test_fail BEFORE INSERT ON account_data FOR EACH ROW
             WHEN (NEW.data_type = 'test.fail') EXECUTE FUNCTION test_fail()",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        conn.close().await.unwrap();
    }
}

async fn a_failed_write_does_not_hold_back_the_others(backend: Backend) {
    let server = Arc::new(TestServer::start(backend).await);
    let (alice_id, alice, _) = server.register("alice").await;
    let (bob_id, bob, _) = server.register("bob").await;
    let room = server.create_room(&alice, json!({"invite": [&bob_id]})).await;
    server.join(&bob, &room).await;
    let first = server.sync(&bob, None, "").await;
    let since = first["next_batch"].as_str().unwrap().to_owned();
    make_account_data_writes_fail(&server).await;

    // Bob waits; alice's write fails after taking a position, then she sends.
    let waiting = {
        let (server, bob, since) = (server.clone(), bob.clone(), since.clone());
        tokio::spawn(async move { server.sync(&bob, Some(&since), "timeout=20000").await })
    };
    server.wait_for_waiting_syncs(&bob_id, 1).await;
    let (status, body) = server
        .put(&format!("/_matrix/client/v3/user/{alice_id}/account_data/test.fail"), Some(&alice), json!({"x": 1}))
        .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["errcode"], "M_UNKNOWN");
    let sent_at = Instant::now();
    server.send_text(&alice, &room, "after the failure").await;
    let sync = waiting.await.unwrap();
    assert!(sent_at.elapsed() < Duration::from_secs(10), "woken by the send, not by the timeout");
    let timeline = &sync["rooms"]["join"][&room]["timeline"]["events"];
    assert_eq!(crate::common::bodies(timeline), vec!["after the failure"], "{sync}");

    // Failures in parallel with sends: every message still arrives, in one sync.
    let next = sync["next_batch"].as_str().unwrap().to_owned();
    let mut tasks = Vec::new();
    for i in 0..10 {
        let (server, alice, alice_id, room) = (server.clone(), alice.clone(), alice_id.clone(), room.clone());
        tasks.push(tokio::spawn(async move {
            let path = format!("/_matrix/client/v3/user/{alice_id}/account_data/test.fail");
            let (status, _) = server.put(&path, Some(&alice), json!({"x": i})).await;
            assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
            server.send_text(&alice, &room, &format!("parallel {i}")).await;
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let sync = server.sync(&bob, Some(&next), "timeout=0").await;
    let mut got = crate::common::bodies(&sync["rooms"]["join"][&room]["timeline"]["events"]);
    got.sort();
    let mut want: Vec<String> = (0..10).map(|i| format!("parallel {i}")).collect();
    want.sort();
    assert_eq!(got, want);
    stop(server).await;
}

/// The highest stream position stored in any table that holds one.
async fn highest_stored_position(server: &TestServer) -> i64 {
    use sqlx::Connection;
    const MAX: &str = "SELECT MAX(p) FROM (
        SELECT MAX(stream_ordering) AS p FROM events
        UNION ALL SELECT MAX(stream_ordering) FROM memberships
        UNION ALL SELECT MAX(stream_pos) FROM account_data
        UNION ALL SELECT MAX(stream_pos) FROM receipts
        UNION ALL SELECT MAX(stream_pos) FROM presence
        UNION ALL SELECT MAX(stream_pos) FROM event_push_actions
        UNION ALL SELECT MAX(stream_pos) FROM to_device_messages
        UNION ALL SELECT MAX(stream_pos) FROM device_list_changes) AS all_positions";
    let url = &server.config().database.url;
    let (max,): (Option<i64>,) = if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query_as(MAX).fetch_one(&mut conn).await.unwrap()
    } else {
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query_as(MAX).fetch_one(&mut conn).await.unwrap()
    };
    max.unwrap_or(0)
}

fn position_of(token: &str) -> i64 {
    token.trim_start_matches('s').split('_').next().unwrap().parse().unwrap()
}

async fn positions_keep_growing_across_a_restart(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let (alice_id, alice, _) = server.register("alice").await;
    let (bob_id, bob, bob_device) = server.register("bob").await;
    let room = server.create_room(&alice, json!({"invite": [&bob_id]})).await;
    server.join(&bob, &room).await;
    server.send_text(&alice, &room, "before").await;
    let first = server.sync(&bob, None, "").await;
    let mut since = first["next_batch"].as_str().unwrap().to_owned();
    // The last write before the restart is a to-device message, which bob receives and
    // then acknowledges: it is deleted, so no table holds its position any more.
    let (status, _) = server
        .put(
            "/_matrix/client/v3/sendToDevice/m.test/last",
            Some(&alice),
            json!({"messages": {&bob_id: {&bob_device: {"n": "last"}}}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let sync = server.sync(&bob, Some(&since), "timeout=5000").await;
    assert_eq!(sync["to_device"]["events"][0]["content"]["n"], "last", "{sync}");
    since = sync["next_batch"].as_str().unwrap().to_owned();
    let acked = server.sync(&bob, Some(&since), "timeout=0").await;
    assert!(acked["to_device"]["events"].as_array().is_none_or(|e| e.is_empty()), "{acked}");
    let token = acked["next_batch"].as_str().unwrap().to_owned();
    let stored = highest_stored_position(&server).await;
    assert!(position_of(&token) > stored, "the token ({token}) covers a position no table holds now ({stored})");

    server.restart().await;

    // New writes of every kind take positions past every one stored and every token.
    let after = server.send_text(&alice, &room, "after the restart").await;
    let (status, _) = server
        .put(&format!("/_matrix/client/v3/user/{alice_id}/account_data/test.after"), Some(&alice), json!({"n": 1}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server
        .put(
            "/_matrix/client/v3/sendToDevice/m.test/after",
            Some(&alice),
            json!({"messages": {&bob_id: {&bob_device: {"n": "after"}}}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let services = &server.running.as_ref().unwrap().services;
    let event = services.store.get_event(&after).await.unwrap().unwrap();
    assert!(event.stream_ordering > position_of(&token), "{} after {token}", event.stream_ordering);
    let (_, to_device) = bob_to_device_position(&server, &bob_id, &bob_device).await;
    assert!(to_device > position_of(&token), "{to_device} after {token}");

    // Bob, syncing on from his token of before the restart, gets them.
    let sync = server.sync(&bob, Some(&token), "timeout=5000").await;
    assert_eq!(crate::common::bodies(&sync["rooms"]["join"][&room]["timeline"]["events"]), vec!["after the restart"]);
    assert_eq!(sync["to_device"]["events"][0]["content"]["n"], "after", "{sync}");
    assert!(position_of(sync["next_batch"].as_str().unwrap()) >= event.stream_ordering);
    server.stop().await;
}

/// The position of a device's (only) queued to-device message.
async fn bob_to_device_position(server: &TestServer, user: &str, device: &str) -> (usize, i64) {
    let services = &server.running.as_ref().unwrap().services;
    let queued = services.store.get_to_device(user, device, i64::MAX).await.unwrap();
    (queued.len(), queued.iter().map(|q| q.0).max().unwrap_or(0))
}

backend_tests!(
    parallel_writers_of_every_kind_are_each_seen_once,
    a_write_still_open_holds_back_the_ones_after_it,
    a_room_whose_membership_moved_past_the_mark_is_still_synced,
    a_failed_write_does_not_hold_back_the_others,
    positions_keep_growing_across_a_restart,
);

/// A server on SQLite, the path of its WAL, and a user (token) with a room to send to.
async fn sqlite_server_with_a_room() -> (TestServer, std::path::PathBuf, String, String) {
    let server = TestServer::start(Backend::Sqlite).await;
    let db = server.config().database.url.trim_start_matches("sqlite://").to_owned();
    let (_, alice, _) = server.register("alice").await;
    let room = server.create_room(&alice, json!({})).await;
    (server, std::path::PathBuf::from(format!("{db}-wal")), alice, room)
}

/// SQLite's WAL is checkpointed by a task of the store's, not by the commit that passes
/// 1,000 pages (which held the one writer, and every send, for up to 0.3 s): after a
/// pause, the writer starts the WAL over instead of growing it.
#[tokio::test]
async fn sqlite_wal_is_checkpointed_in_the_background() {
    let (server, wal, alice, room) = sqlite_server_with_a_room().await;
    let mut sizes = Vec::new();
    for round in 0..3 {
        for i in 0..100 {
            server.send_text(&alice, &room, &format!("round {round} message {i}")).await;
        }
        // Longer than the checkpoint's longest wait (five seconds, for a server that
        // wrote fewer than 256 positions) and the checkpoint itself.
        tokio::time::sleep(Duration::from_millis(6_000)).await;
        sizes.push((wal_restarts(&wal), std::fs::metadata(&wal).expect("the WAL").len()));
    }
    // Each round's first write started the WAL over, so it did not grow.
    assert!(sizes[2].0 >= sizes[0].0 + 2, "the WAL did not start over each round: {sizes:?} (restarts, bytes)");
    assert!(sizes[2].1 < sizes[0].1 * 3 / 2, "the WAL grew: {sizes:?} (restarts, bytes)");
    server.stop().await;
}

/// The WAL header's checkpoint sequence number (big-endian, bytes 12..16), which SQLite
/// adds one to each time a write starts the WAL over from its beginning.
fn wal_restarts(wal: &std::path::Path) -> u32 {
    use std::io::Read;
    let mut header = [0u8; 16];
    std::fs::File::open(wal).and_then(|mut f| f.read_exact(&mut header)).expect("a WAL header");
    u32::from_be_bytes(header[12..16].try_into().unwrap())
}

/// Under steady writes too: the background checkpoint's second pass (on the write
/// connection) reaches the WAL's end, so the next write starts the WAL over. With only
/// the first pass, racing the writers, it never reached the end, and the WAL grew with
/// everything written (10 GB in 45 s of 16 concurrent senders in a release build).
/// The file's size is a high-water mark (one restart missed because a reader still
/// held old frames doubles it), so the test counts restarts in the WAL's header.
#[tokio::test]
async fn sqlite_wal_starts_over_under_steady_writes() {
    let (server, wal, alice, room) = sqlite_server_with_a_room().await;
    let start = Instant::now();
    let until = Duration::from_secs(10);
    let senders = (0..4).map(|s| {
        let (server, alice, room) = (&server, &alice, &room);
        async move {
            let mut sent = 0;
            while start.elapsed() < until {
                server.send_text(alice, room, &format!("sender {s} message {sent}")).await;
                sent += 1;
            }
            sent
        }
    });
    // Every 100 ms: when, the restarts counted so far, and the WAL's size.
    let sampler = async {
        let mut samples = Vec::new();
        while start.elapsed() < until {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let size = std::fs::metadata(&wal).expect("the WAL").len();
            samples.push((start.elapsed().as_millis(), wal_restarts(&wal), size));
        }
        samples
    };
    let (sent, samples) = tokio::join!(futures_util::future::join_all(senders), sampler);
    let sent: usize = sent.iter().sum();
    assert!(sent > 100, "only {sent} messages were sent");
    // The checkpoint runs at most five seconds after a write (sooner after 256 stream
    // positions), and the write after it starts the WAL over: in the last seven seconds
    // of steady writes (longer than a checkpoint's cycle), it started over at least once.
    let at_3s = samples.iter().take_while(|s| s.0 <= 3_000).last().expect("a sample by 3 s").1;
    let at_end = samples.last().expect("samples").1;
    assert!(
        at_end > at_3s,
        "the WAL did not start over in 7 s of steady writes ({sent} messages; ms, restarts, bytes: {samples:?})"
    );
    server.stop().await;
}
