//! Migration 0023 on data stored before it: events with relations stored by the code
//! before it are indexed from their JSON at the first start, once; redacted events and
//! events outside the room's history are not. On SQLite always, on PostgreSQL with
//! `TEST_POSTGRES_URL`.

use std::borrow::Cow;

use super::{RelationQuery, Store};

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

fn migrations_to_0022() -> sqlx::migrate::Migrator {
    let mut migrator = sqlx::migrate!();
    migrator.migrations = Cow::Owned(migrator.migrations.iter().filter(|m| m.version <= 22).cloned().collect());
    migrator
}

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

#[tokio::test]
async fn sqlite_relations_from_before_0023_are_filled() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    {
        use std::str::FromStr;
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(&url).unwrap().create_if_missing(true);
        let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
        migrations_to_0022().run(&pool).await.unwrap();
        for sql in OLD_EVENTS {
            sqlx::query(*sql).execute(&pool).await.unwrap();
        }
        pool.close().await;
    }
    let store = Store::open(&url, 2).await.unwrap();
    check_filled(&store).await;
    store.close().await;
    // Opening again neither fails nor fills twice.
    let store = Store::open(&url, 2).await.unwrap();
    check_filled(&store).await;
    store.close().await;
}

#[tokio::test]
async fn postgres_relations_from_before_0023_are_filled() {
    use sqlx::Connection;
    let admin_url = match std::env::var("TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => url,
        _ if std::env::var("REQUIRE_POSTGRES").as_deref() == Ok("1") => {
            panic!("REQUIRE_POSTGRES=1 but TEST_POSTGRES_URL is not set")
        }
        _ => return,
    };
    let name = format!("convo_storage_{}", crate::service::generate_registration_token().to_lowercase());
    let mut conn = sqlx::PgConnection::connect(&admin_url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await.unwrap();
    let (base, _) = admin_url.rsplit_once('/').unwrap();
    let url = format!("{base}/{name}");
    {
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        migrations_to_0022().run(&pool).await.unwrap();
        for sql in OLD_EVENTS {
            sqlx::query(*sql).execute(&pool).await.unwrap();
        }
        pool.close().await;
    }
    let store = Store::open(&url, 2).await.unwrap();
    check_filled(&store).await;
    store.close().await;
    let store = Store::open(&url, 2).await.unwrap();
    check_filled(&store).await;
    store.close().await;
    let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
    let _ = sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&mut conn).await;
}
