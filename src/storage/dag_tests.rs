//! Migration 0011 on data stored before it: a database migrated to 0010 with a room in
//! it is opened by the current code, which rebuilds `events` and fills the DAG's edges
//! from the stored JSON once. On SQLite always, on PostgreSQL with `TEST_POSTGRES_URL`.

use super::{Store, test_db::TestDb};

/// The statements that store a small room as the code before 0011 did.
const OLD_ROOM: &[&str] = &[
    "INSERT INTO rooms (room_id, room_version, creator, created_ts) VALUES ('!r:x', '11', '@a:x', 1)",
    r#"INSERT INTO events (stream_ordering, event_id, room_id, sender, event_type, state_key, depth, origin_server_ts,
        state_group, json) VALUES (1, '$create', '!r:x', '@a:x', 'm.room.create', '', 1, 1, 1,
        '{"auth_events":[],"prev_events":[],"type":"m.room.create"}')"#,
    r#"INSERT INTO events (stream_ordering, event_id, room_id, sender, event_type, state_key, depth, origin_server_ts,
        state_group, json) VALUES (2, '$join', '!r:x', '@a:x', 'm.room.member', '@a:x', 2, 2, 2,
        '{"auth_events":["$create"],"prev_events":["$create"],"type":"m.room.member"}')"#,
    r#"INSERT INTO events (stream_ordering, event_id, room_id, sender, event_type, state_key, depth, origin_server_ts,
        state_group, json, txn_device_id, txn_id, txn_scope) VALUES (3, '$msg', '!r:x', '@a:x', 'm.room.message', NULL,
        3, 3, 2, '{"auth_events":["$create","$join"],"prev_events":["$join"],"type":"m.room.message"}', 'D', 't1',
        'send/!r:x/m.room.message')"#,
    "INSERT INTO state_groups (group_id, room_id, prev_group, is_snapshot, chain_length) VALUES (1, '!r:x', NULL, TRUE, 0)",
    "INSERT INTO state_groups (group_id, room_id, prev_group, is_snapshot, chain_length) VALUES (2, '!r:x', 1, FALSE, 1)",
    "INSERT INTO forward_extremities (room_id, event_id) VALUES ('!r:x', '$msg')",
    "UPDATE stream_position SET pos = 3",
];

async fn check_migrated(store: &Store, next_group: i64) {
    let events = store.get_events_by_ids(&["$create".into(), "$join".into(), "$msg".into()]).await.unwrap();
    assert_eq!(events.iter().map(|e| e.position).collect::<Vec<_>>(), [Some(1), Some(2), Some(3)]);
    assert_eq!(events[2].state_group, 2);
    assert_eq!(store.get_event_status("$msg").await.unwrap(), Some((false, None, false)));
    assert_eq!(
        store.find_txn_event("@a:x", "D", "send/!r:x/m.room.message", "t1").await.unwrap().as_deref(),
        Some("$msg")
    );
    let mut chain = store.get_auth_chain(&["$msg".into()], 100).await.unwrap();
    chain.sort();
    assert_eq!(chain, ["$create", "$join"]);
    assert!(store.has_stored_children("$join").await.unwrap(), "prev edges filled");
    assert!(!store.has_stored_children("$msg").await.unwrap());
    // State groups count on from the highest one stored (on PostgreSQL, past the block
    // of ids the store before reserved: a restart leaves a gap).
    let group =
        store.insert_state_group("!r:x", &[("m.room.create".into(), String::new(), "$create".into())]).await.unwrap();
    if store.dialect() == super::Dialect::Postgres {
        assert!(group >= next_group, "{group} < {next_group}");
    } else {
        assert_eq!(group, next_group);
    }
    assert_eq!(store.get_room_head("!r:x").await.unwrap(), [("$msg".to_owned(), 3, 2)]);
}

/// On SQLite always; on PostgreSQL with `TEST_POSTGRES_URL`.
async fn from_before(postgres: bool) {
    let Some((url, db)) = TestDb::migrated_to(postgres, 10, OLD_ROOM).await else { return };
    let store = Store::open(&url, 2).await.unwrap();
    check_migrated(&store, 3).await;
    store.close().await;
    // Opening again neither fails nor fills twice.
    let store = Store::open(&url, 2).await.unwrap();
    check_migrated(&store, 4).await;
    store.close().await;
    db.drop_database().await;
}

#[tokio::test]
async fn sqlite_data_from_before_0011_is_migrated() {
    from_before(false).await;
}

#[tokio::test]
async fn postgres_data_from_before_0011_is_migrated() {
    from_before(true).await;
}
