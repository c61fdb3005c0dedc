//! Migration 0029 on data stored before it: push actions keep their rows (and their
//! actions) when the table is rebuilt with the primary key (user, position), and every
//! read of them answers as before. On SQLite always, on PostgreSQL with
//! `TEST_POSTGRES_URL`.

use super::{Store, test_db::TestDb};

/// Two rooms' events and the push actions the code before 0029 stored for them.
const OLD_ROWS: &[&str] = &[
    "INSERT INTO rooms (room_id, room_version, creator, created_ts) VALUES ('!r:x', '11', '@a:x', 1)",
    "INSERT INTO rooms (room_id, room_version, creator, created_ts) VALUES ('!s:x', '11', '@a:x', 1)",
    r#"INSERT INTO events (stream_ordering, event_id, room_id, sender, event_type, state_key, depth, origin_server_ts,
        state_group, json) VALUES (1, '$one', '!r:x', '@a:x', 'm.room.message', NULL, 1, 1, 1, '{"content":{}}')"#,
    r#"INSERT INTO events (stream_ordering, event_id, room_id, sender, event_type, state_key, depth, origin_server_ts,
        state_group, json) VALUES (2, '$two', '!s:x', '@a:x', 'm.room.message', NULL, 1, 2, 1, '{"content":{}}')"#,
    r#"INSERT INTO event_push_actions (user_id, room_id, stream_pos, event_id, highlight, actions)
        VALUES ('@b:x', '!r:x', 1, '$one', 0, '["notify"]')"#,
    r#"INSERT INTO event_push_actions (user_id, room_id, stream_pos, event_id, highlight, actions)
        VALUES ('@b:x', '!s:x', 2, '$two', 1, NULL)"#,
    r#"INSERT INTO event_push_actions (user_id, room_id, stream_pos, event_id, highlight, actions)
        VALUES ('@c:x', '!s:x', 2, '$two', 0, '["notify"]')"#,
    "UPDATE stream_position SET pos = 2",
];

async fn check_kept(store: &Store) {
    let rows = store.get_notifications("@b:x", None, 10, false).await.unwrap();
    let got: Vec<(&str, i64, &str, i32, Option<&str>)> = rows
        .iter()
        .map(|r| (r.room_id.as_str(), r.stream_pos, r.event_id.as_str(), r.highlight, r.actions.as_deref()))
        .collect();
    assert_eq!(got, [("!s:x", 2, "$two", 1, None), ("!r:x", 1, "$one", 0, Some("[\"notify\"]"))]);
    let highlights = store.get_notifications("@b:x", None, 10, true).await.unwrap();
    assert_eq!(highlights.iter().map(|r| r.stream_pos).collect::<Vec<_>>(), [2]);
    assert_eq!(store.get_push_action("@c:x", "!s:x", 2).await.unwrap(), Some((Some("[\"notify\"]".to_owned()), 0)));
    // The room is checked on the row, not only the user and position.
    assert_eq!(store.get_push_action("@c:x", "!r:x", 2).await.unwrap(), None);
}

/// On SQLite always; on PostgreSQL with `TEST_POSTGRES_URL`.
async fn from_before(postgres: bool) {
    let Some((url, db)) = TestDb::migrated_to(postgres, 28, OLD_ROWS).await else { return };
    let store = Store::open(&url, 2).await.unwrap();
    check_kept(&store).await;
    store.close().await;
    db.drop_database().await;
}

#[tokio::test]
async fn sqlite_push_actions_from_before_0029_are_kept() {
    from_before(false).await;
}

#[tokio::test]
async fn postgres_push_actions_from_before_0029_are_kept() {
    from_before(true).await;
}
