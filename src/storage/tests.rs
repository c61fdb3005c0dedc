//! Storage conformance tests, run on SQLite always and on PostgreSQL when
//! `TEST_POSTGRES_URL` is set (a fresh database per test; with `REQUIRE_POSTGRES=1`,
//! as CI sets it, a missing URL fails instead of skipping). Each `async fn name(store)`
//! listed in `storage_tests!` runs once per backend. The check-then-act methods are
//! run concurrently here, as the API tests do through HTTP.

use futures_util::future::join_all;

use super::{NewSession, NewUser, Store};

/// A store on a fresh database, and what to clean up after it.
struct TestStore {
    store: Store,
    _dir: Option<tempfile::TempDir>,
    /// The admin URL and the name of the PostgreSQL database made for the test.
    pg: Option<(String, String)>,
}

impl TestStore {
    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        TestStore { store: Store::open(&url, 4).await.unwrap(), _dir: Some(dir), pg: None }
    }

    async fn postgres() -> Option<Self> {
        use sqlx::Connection;
        let admin_url = match std::env::var("TEST_POSTGRES_URL") {
            Ok(url) if !url.is_empty() => url,
            _ if std::env::var("REQUIRE_POSTGRES").as_deref() == Ok("1") => {
                panic!("REQUIRE_POSTGRES=1 but TEST_POSTGRES_URL is not set")
            }
            _ => {
                eprintln!("TEST_POSTGRES_URL is not set: skipping the PostgreSQL run of this test");
                return None;
            }
        };
        let name = format!("convo_storage_{}", crate::service::generate_registration_token().to_lowercase());
        let mut conn = sqlx::PgConnection::connect(&admin_url).await.expect("connect to TEST_POSTGRES_URL");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await.unwrap();
        conn.close().await.ok();
        let (base, _) = admin_url.rsplit_once('/').expect("TEST_POSTGRES_URL ends in /DATABASE");
        let store = Store::open(&format!("{base}/{name}"), 8).await.unwrap();
        Some(TestStore { store, _dir: None, pg: Some((admin_url, name)) })
    }

    async fn close(self) {
        self.store.close().await;
        if let Some((admin_url, name)) = self.pg {
            use sqlx::Connection;
            if let Ok(mut conn) = sqlx::PgConnection::connect(&admin_url).await {
                let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                let _ = sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&mut conn).await;
            }
        }
    }
}

macro_rules! storage_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    let t = super::TestStore::sqlite().await;
                    assert_eq!(t.store.dialect(), crate::storage::Dialect::Sqlite);
                    super::$name(&t.store).await;
                    t.close().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    if let Some(t) = super::TestStore::postgres().await {
                        assert_eq!(t.store.dialect(), crate::storage::Dialect::Postgres);
                        super::$name(&t.store).await;
                        t.close().await;
                    }
                }
            )*
        }
    };
}

fn new_user(user_id: &str) -> NewUser<'_> {
    NewUser {
        user_id,
        password_hash: None,
        is_admin: false,
        displayname: Some("a"),
        created_ts: 1,
        session: None,
        registration_token: None,
        uiaa_session: None,
    }
}

async fn new_uiaa_session(store: &Store, id: &str) {
    store
        .create_uiaa_session(&super::UiaaSession {
            session_id: id.to_owned(),
            purpose: "register".into(),
            user_id: None,
            completed: Vec::new(),
            registration_token: None,
            created_ts: 1,
        })
        .await
        .unwrap();
}

async fn duplicate_user_is_user_in_use(store: &Store) {
    store.create_user(new_user("@a:x")).await.unwrap();
    assert_eq!(store.create_user(new_user("@a:x")).await.unwrap_err().errcode(), "M_USER_IN_USE");
    assert!(store.user_exists("@a:x").await.unwrap());
}

async fn registration_token_uses_are_taken_atomically(store: &Store) {
    store.create_registration_token("two", Some(2), None, 0).await.unwrap();
    store.create_registration_token("expired", None, Some(5), 0).await.unwrap();
    let ids: Vec<String> = (0..10).map(|i| format!("session{i}")).collect();
    for id in &ids {
        new_uiaa_session(store, id).await;
    }
    // Ten sessions reserve at once: two get the token.
    let reserved = join_all(ids.iter().map(|id| store.reserve_registration_token(id, "two", 10))).await;
    let winners: Vec<&String> =
        ids.iter().zip(&reserved).filter(|(_, r)| *r.as_ref().unwrap()).map(|(id, _)| id).collect();
    assert_eq!(winners.len(), 2);
    let info = store.get_registration_token("two").await.unwrap().unwrap();
    assert_eq!((info.completed, info.pending), (0, 2));
    assert!(!store.reserve_registration_token("session0", "expired", 10).await.unwrap(), "expired");
    assert!(!store.reserve_registration_token("session0", "unknown", 10).await.unwrap(), "unknown");

    // Finishing takes the use conditionally: however many sessions try, two accounts.
    let users: Vec<String> = (0..10).map(|i| format!("@u{i}:x")).collect();
    let creations = users.iter().zip(&ids).map(|(user, id)| {
        store.create_user(NewUser { registration_token: Some("two"), uiaa_session: Some(id), ..new_user(user) })
    });
    let results = join_all(creations).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 2);
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(r.errcode(), "M_FORBIDDEN");
    }
    let info = store.get_registration_token("two").await.unwrap().unwrap();
    assert_eq!(info.completed, 2);

    // One UIA session makes one account.
    store.create_registration_token("many", None, None, 0).await.unwrap();
    new_uiaa_session(store, "once").await;
    let creations = (0..5).map(|i| format!("@once{i}:x")).collect::<Vec<_>>();
    let results = join_all(creations.iter().map(|user| {
        store.create_user(NewUser { registration_token: Some("many"), uiaa_session: Some("once"), ..new_user(user) })
    }))
    .await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
    assert_eq!(store.get_registration_token("many").await.unwrap().unwrap().completed, 1);
}

async fn a_refresh_token_has_one_live_successor(store: &Store) {
    store
        .create_user(NewUser {
            session: Some(NewSession {
                user_id: "@r:x",
                device_id: "DEV",
                display_name: None,
                access_token_hash: "access0",
                refresh_token_hash: Some("refresh0"),
                expires_ts: Some(100),
                created_ts: 1,
                ip: None,
            }),
            ..new_user("@r:x")
        })
        .await
        .unwrap();
    let hashes: Vec<(String, String)> = (1..=10).map(|i| (format!("access{i}"), format!("refresh{i}"))).collect();
    let refreshes = hashes.iter().map(|(a, r)| store.refresh_session("refresh0", a, r, 100, 2));
    for result in join_all(refreshes).await {
        assert_eq!(result.unwrap(), Some(("@r:x".to_owned(), "DEV".to_owned())));
    }
    let mut live = 0;
    for (access, _) in &hashes {
        live += usize::from(store.find_access_token(access).await.unwrap().is_some());
    }
    assert_eq!(live, 1, "one of ten refreshes leaves a valid access token");
    // The token issued with the original refresh token lives until a successor is used.
    assert!(store.find_access_token("access0").await.unwrap().is_some());
    assert_eq!(store.refresh_session("unknown", "a", "r", 100, 2).await.unwrap(), None);
}

async fn account_data_changes_do_not_undo_each_other(store: &Store) {
    let keys: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
    let updates = keys.iter().map(|key| {
        store.update_account_data("@a:x", "!r:x", "m.tag", move |current| {
            let mut value: serde_json::Value =
                current.map_or(serde_json::json!({}), |c| serde_json::from_str(c).unwrap());
            value[key.as_str()] = serde_json::json!(1);
            Ok(Some(value.to_string()))
        })
    });
    for result in join_all(updates).await {
        assert!(result.unwrap().is_some());
    }
    let stored: serde_json::Value =
        serde_json::from_str(&store.get_account_data("@a:x", "!r:x", "m.tag").await.unwrap().unwrap()).unwrap();
    assert_eq!(stored.as_object().unwrap().len(), 20, "{stored}");
    // `None` leaves the entry as it is.
    assert_eq!(store.update_account_data("@a:x", "!r:x", "m.tag", |_| Ok(None)).await.unwrap(), None);
}

async fn profile_limit_holds_under_concurrency(store: &Store) {
    store.create_user(new_user("@p:x")).await.unwrap();
    // Each field is 100 bytes; the check allows 1,000 bytes of profile in all.
    let fields: Vec<String> = (0..20).map(|i| format!("f{i:02}")).collect();
    let value = serde_json::json!("v".repeat(100));
    let sets = fields.iter().map(|field| {
        store.update_profile_field("@p:x", field, Some(&value), |profile| {
            if serde_json::to_vec(profile).unwrap().len() > 1000 {
                Err(crate::error::Error::too_large("full"))
            } else {
                Ok(())
            }
        })
    });
    let accepted = join_all(sets).await.iter().filter(|r| r.is_ok()).count();
    let profile = store.get_profile("@p:x").await.unwrap().unwrap();
    assert!(serde_json::to_vec(&profile).unwrap().len() <= 1000, "{profile:?}");
    assert_eq!(profile.len(), accepted + 1, "the display name and the accepted fields");
    assert_eq!(
        store.update_profile_field("@nobody:x", "f", Some(&value), |_| Ok(())).await.unwrap_err().errcode(),
        "M_NOT_FOUND"
    );
}

async fn federation_outbox_keeps_order_limits_and_expiry(store: &Store) {
    let both = vec!["a.test".to_owned(), "b.test".to_owned()];
    for pos in 1..=5 {
        store.enqueue_federation_edu(&both, pos, &format!("{{\"n\":{pos}}}"), None).await.unwrap();
    }
    // A typing notice that expired before it could be sent is dropped, not sent.
    store.enqueue_federation_edu(&both[..1], 6, "{\"typing\":true}", Some(1_000)).await.unwrap();
    store.enqueue_federation_edu(&both[..1], 7, "{\"typing\":false}", Some(10_000)).await.unwrap();
    let batch = store.get_federation_batch("a.test", 50, 3, 5_000).await.unwrap();
    assert!(batch.pdus.is_empty());
    assert_eq!(batch.edus.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(batch.edus[0].1, "{\"n\":1}");
    store.delete_federation_sent("a.test", &[], &[1, 2, 3]).await.unwrap();
    let batch = store.get_federation_batch("a.test", 50, 100, 5_000).await.unwrap();
    assert_eq!(batch.edus.iter().map(|e| e.0).collect::<Vec<_>>(), vec![4, 5, 7]);
    // The other destination's queue is its own.
    assert_eq!(store.count_federation_outbox("b.test").await.unwrap(), 5);
    let (pending, max_edu) = store.get_federation_outbox_state().await.unwrap();
    assert_eq!(pending, vec!["a.test".to_owned(), "b.test".to_owned()]);
    assert_eq!(max_edu, 7);
    store.delete_federation_sent("a.test", &[], &[4, 5, 7]).await.unwrap();
    assert!(store.get_federation_batch("a.test", 50, 100, 5_000).await.unwrap().is_empty());
    // Queuing the same item twice keeps one copy.
    store.enqueue_federation_edu(&both[1..], 5, "{}", None).await.unwrap();
    assert_eq!(store.count_federation_outbox("b.test").await.unwrap(), 5);
}

/// PDUs are queued after their events commit, and positions commit out of order: a
/// PDU with a lower position queued while a batch is out stays queued.
async fn federation_outbox_keeps_what_was_queued_behind_a_batch(store: &Store) {
    let dest = vec!["a.test".to_owned()];
    store.enqueue_federation_pdu(&dest, 10, "$ten").await.unwrap();
    store.enqueue_federation_pdu(&dest, 12, "$twelve").await.unwrap();
    // The batch joins on the events table: store the three events' rows.
    for id in ["$ten", "$eleven", "$twelve"] {
        store
            .persist_outliers(&[super::Outlier {
                event_id: id,
                room_id: "!r:x",
                sender: "@s:x",
                event_type: "m.room.message",
                state_key: None,
                depth: 1,
                origin_server_ts: 1,
                json: "{}",
                prev_events: &[],
                auth_events: &[],
                rejected_reason: None,
            }])
            .await
            .unwrap();
    }
    let batch = store.get_federation_batch("a.test", 50, 100, 0).await.unwrap();
    assert_eq!(batch.pdus.iter().map(|p| p.0).collect::<Vec<_>>(), vec![10, 12]);
    // The event at 11 committed last: its PDU is queued while the batch is out.
    store.enqueue_federation_pdu(&dest, 11, "$eleven").await.unwrap();
    store.delete_federation_sent("a.test", &[10, 12], &[]).await.unwrap();
    let batch = store.get_federation_batch("a.test", 50, 100, 0).await.unwrap();
    assert_eq!(batch.pdus.iter().map(|p| (p.0, p.1.as_str())).collect::<Vec<_>>(), vec![(11, "$eleven")]);
}

storage_tests!(
    federation_outbox_keeps_what_was_queued_behind_a_batch,
    federation_outbox_keeps_order_limits_and_expiry,
    duplicate_user_is_user_in_use,
    registration_token_uses_are_taken_atomically,
    a_refresh_token_has_one_live_successor,
    account_data_changes_do_not_undo_each_other,
    profile_limit_holds_under_concurrency,
);

/// The WAL's checkpoint comes at the first check once 256 positions were written, else
/// five seconds after the first write; never at a check before either.
#[test]
fn checkpoint_is_due_after_enough_positions_or_time() {
    use super::checkpoint_due;
    use std::time::Duration;
    let s = Duration::from_secs;
    assert!(checkpoint_due(s(1), 256), "a busy server: at the first check");
    assert!(!checkpoint_due(s(1), 255));
    assert!(!checkpoint_due(s(4), 1));
    assert!(checkpoint_due(s(5), 1), "a quiet server: five seconds after a write");
    assert!(checkpoint_due(s(5), 0));
}
