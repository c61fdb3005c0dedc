//! Migration 0023 on data stored before it: events with relations stored by the code
//! before it are indexed from their JSON at the first start, once; redacted events and
//! events outside the room's history are not. On SQLite always, on PostgreSQL with
//! `TEST_POSTGRES_URL`.

use super::{RelationQuery, Store, test_db::TestDb};

/// Events as the code before 0023 stored them (no `event_relations` rows).
const OLD_EVENTS: &[&str] = &[
    "INSERT INTO rooms (room_id, room_version, creator, created_ts) VALUES ('!r:x', '11', '@a:x', 1)",
    r#"INSERT INTO events (stream_ordering, event_id, room_id, sender, event_type, state_key, depth, origin_server_ts,
        state_group, json) VALUES (1, '$root', '!r:x', '@a:x', 'm.room.message', NULL, 1, 1, 1,
        '{"content":{"body":"root"}}')"#,
    r#"INSERT INTO events (stream_ordering, event_id, room_id, sender, event_type, state_key, depth, origin_server_ts,
        state_group, json) VALUES (2, '$reply', '!r:x', '@b:x', 'm.room.message', NULL, 2, 2, 1,
        '{"content":{"body":"r","m.relates_to":{"rel_type":"m.thread","event_id":"$root"}}}')"#,
    // Redacted (its JSON would have lost `m.relates_to`; here it kept it, to show the
    // fill goes by `redacted_by`).
    r#"INSERT INTO events (stream_ordering, event_id, room_id, sender, event_type, state_key, depth, origin_server_ts,
        state_group, json, redacted_by) VALUES (3, '$gone', '!r:x', '@b:x', 'm.room.message', NULL, 3, 3, 1,
        '{"content":{"m.relates_to":{"rel_type":"m.thread","event_id":"$root"}}}', '$redaction')"#,
    // An outlier: not in the room's history.
    r#"INSERT INTO events (stream_ordering, event_id, room_id, sender, event_type, state_key, depth, origin_server_ts,
        state_group, json, outlier) VALUES (NULL, '$outlier', '!r:x', '@b:x', 'm.room.message', NULL, 4, 4, NULL,
        '{"content":{"m.relates_to":{"rel_type":"m.thread","event_id":"$root"}}}', TRUE)"#,
    r#"INSERT INTO events (stream_ordering, event_id, room_id, sender, event_type, state_key, depth, origin_server_ts,
        state_group, json) VALUES (5, '$edit', '!r:x', '@a:x', 'm.room.message', NULL, 5, 5, 1,
        '{"content":{"m.relates_to":{"rel_type":"m.replace","event_id":"$root"}}}')"#,
    "UPDATE stream_position SET pos = 5",
];

async fn check_filled(store: &Store) {
    let query = RelationQuery {
        room_id: "!r:x",
        parent: "$root",
        rel_type: None,
        event_type: None,
        depth: 1,
        from: None,
        to: None,
        backwards: false,
        limit: 10,
    };
    let children: Vec<String> = store.get_relations(&query).await.unwrap().into_iter().map(|e| e.event_id).collect();
    assert_eq!(children, ["$reply", "$edit"]);
    assert_eq!(store.get_threads("!r:x", None, None, &[], 10).await.unwrap(), [("$root".to_owned(), 2)]);
    let bundled = store.get_bundled_relations(&["$root".to_owned()], Some("@b:x"), &[]).await.unwrap();
    let thread = &bundled.threads["$root"];
    assert_eq!((thread.count, thread.latest_position, thread.participated), (1, 2, true));
    assert_eq!(bundled.replacements["$root"], [("$edit".to_owned(), 5)]);
}

/// On SQLite always; on PostgreSQL with `TEST_POSTGRES_URL`.
async fn from_before(postgres: bool) {
    let Some((url, db)) = TestDb::migrated_to(postgres, 22, OLD_EVENTS).await else { return };
    let store = Store::open(&url, 2).await.unwrap();
    check_filled(&store).await;
    store.close().await;
    // Opening again neither fails nor fills twice.
    let store = Store::open(&url, 2).await.unwrap();
    check_filled(&store).await;
    store.close().await;
    db.drop_database().await;
}

#[tokio::test]
async fn sqlite_relations_from_before_0023_are_filled() {
    from_before(false).await;
}

#[tokio::test]
async fn postgres_relations_from_before_0023_are_filled() {
    from_before(true).await;
}
