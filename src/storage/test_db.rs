//! Test support for tests outside `storage/` (which must not speak sqlx): a store on a
//! fresh database of either backend, and raw SQL to lay out rows as older code or
//! other paths stored them.

use super::Store;

/// What to drop after a store on a fresh database.
pub(crate) struct TestDb {
    _dir: tempfile::TempDir,
    pg: Option<(String, String)>,
}

/// A value bound to a test statement.
pub(crate) enum TestBind {
    Int(i64),
    Text(Option<String>),
}

impl TestDb {
    /// SQLite in a temporary directory, or (with `postgres`) a new PostgreSQL database
    /// on `TEST_POSTGRES_URL`: `None` when it is not set (a failure with
    /// `REQUIRE_POSTGRES=1`).
    pub(crate) async fn open(postgres: bool) -> Option<(Store, Self)> {
        let (url, db) = Self::empty(postgres).await?;
        Some((Store::open(&url, 2).await.unwrap(), db))
    }

    /// A new empty database (no tables): its URL, and what to drop after it. `None` as
    /// `open`.
    async fn empty(postgres: bool) -> Option<(String, Self)> {
        let dir = tempfile::tempdir().unwrap();
        if !postgres {
            let url = format!("sqlite://{}", dir.path().join("t.db").display());
            return Some((url, TestDb { _dir: dir, pg: None }));
        }
        use sqlx::Connection;
        let admin_url = match std::env::var("TEST_POSTGRES_URL") {
            Ok(url) if !url.is_empty() => url,
            _ if std::env::var("REQUIRE_POSTGRES").as_deref() == Ok("1") => {
                panic!("REQUIRE_POSTGRES=1 but TEST_POSTGRES_URL is not set")
            }
            _ => return None,
        };
        let name = format!("convo_test_db_{}", crate::service::generate_registration_token().to_lowercase());
        let mut conn = sqlx::PgConnection::connect(&admin_url).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await.unwrap();
        conn.close().await.ok();
        let (base, _) = admin_url.rsplit_once('/').unwrap();
        Some((format!("{base}/{name}"), TestDb { _dir: dir, pg: Some((admin_url, name)) }))
    }

    /// A new database migrated only up to migration `version`, holding what `rows` store
    /// (as the code of that time did): its URL (for `Store::open`, which runs the later
    /// migrations), and what to drop after it. `None` as `open`.
    pub(crate) async fn migrated_to(postgres: bool, version: i64, rows: &[&str]) -> Option<(String, Self)> {
        let (url, db) = Self::empty(postgres).await?;
        let mut migrator = sqlx::migrate!();
        migrator.migrations =
            std::borrow::Cow::Owned(migrator.migrations.iter().filter(|m| m.version <= version).cloned().collect());
        macro_rules! fill {
            ($pool:expr) => {{
                let pool = $pool;
                migrator.run(&pool).await.unwrap();
                for sql in rows {
                    sqlx::query(sqlx::AssertSqlSafe(*sql)).execute(&pool).await.unwrap();
                }
                pool.close().await;
            }};
        }
        if postgres {
            fill!(sqlx::PgPool::connect(&url).await.unwrap());
        } else {
            use std::str::FromStr;
            let options = sqlx::sqlite::SqliteConnectOptions::from_str(&url).unwrap().create_if_missing(true);
            fill!(sqlx::SqlitePool::connect_with(options).await.unwrap());
        }
        Some((url, db))
    }

    /// A directory that lives as long as the database.
    pub(crate) fn dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    /// Drops the PostgreSQL database (after the store is closed).
    pub(crate) async fn drop_database(self) {
        use sqlx::Connection;
        if let Some((admin_url, name)) = self.pg
            && let Ok(mut conn) = sqlx::PgConnection::connect(&admin_url).await
        {
            let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
            let _ = sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&mut conn).await;
        }
    }
}

impl Store {
    /// Runs one statement with `binds` ($1, $2...), on the write pool.
    pub(crate) async fn execute_for_test(&self, sql: &str, binds: Vec<TestBind>) {
        on_pool!(self, write, |pool| {
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for bind in &binds {
                query = match bind {
                    TestBind::Int(i) => query.bind(*i),
                    TestBind::Text(t) => query.bind(t.clone()),
                };
            }
            query.execute(pool).await.unwrap();
        })
    }
}
