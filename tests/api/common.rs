//! The test harness: starts a real Convo on an ephemeral loopback port with a fresh
//! database (a SQLite file in a temporary folder, or a new PostgreSQL database) and
//! speaks HTTP to it.

use std::sync::Once;

use convo::{
    config::{Config, RegistrationMode},
    server::{RunningServer, start},
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Which database a test runs on.
#[derive(Clone, Debug)]
pub enum Backend {
    Sqlite,
    /// The URL of a PostgreSQL database in which the role may create databases.
    Postgres(String),
}

impl Backend {
    /// PostgreSQL from `TEST_POSTGRES_URL`, or `None` (skip) when unset. With
    /// `REQUIRE_POSTGRES=1` (as CI sets it) a missing URL fails the test instead.
    pub fn postgres() -> Option<Backend> {
        match std::env::var("TEST_POSTGRES_URL") {
            Ok(url) if !url.is_empty() => Some(Backend::Postgres(url)),
            _ if std::env::var("REQUIRE_POSTGRES").as_deref() == Ok("1") => {
                panic!("REQUIRE_POSTGRES=1 but TEST_POSTGRES_URL is not set")
            }
            _ => {
                eprintln!("TEST_POSTGRES_URL is not set: skipping the PostgreSQL run of this test");
                None
            }
        }
    }
}

/// Runs each named `async fn name(backend: Backend)` once on SQLite and once on PostgreSQL.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    if let Some(backend) = $crate::common::Backend::postgres() {
                        super::$name(backend).await
                    }
                }
            )*
        }
    };
}

pub const PASSWORD: &str = "Correct-Horse-42";

pub struct TestServer {
    pub base: String,
    pub http: reqwest::Client,
    pub running: Option<RunningServer>,
    config: Config,
    _dir: tempfile::TempDir,
    pg_database: Option<(String, String)>,
}

pub fn install_crypto() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        // RUST_LOG=convo=debug shows the server's logs in a failing test's output.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    });
}

/// A configuration for tests: open registration, cheap hashing, no rate limits.
pub fn test_config(dir: &std::path::Path) -> Config {
    let mut config = Config { data_dir: dir.join("data"), ..Config::default() };
    config.listeners.client = "127.0.0.1:0".parse().unwrap();
    config.registration.mode = RegistrationMode::Open;
    config.password_hashing.memory_kib = 256;
    config.password_hashing.iterations = 1;
    config.rate_limits.enabled = false;
    // Tests reach only loopback: no DNS lookups for other servers.
    config.federation.resolve_names = false;
    config
}

async fn create_pg_database(admin_url: &str) -> (String, String) {
    use sqlx::Connection;
    let name = format!("convo_test_{}", convo::service::generate_registration_token().to_lowercase());
    let mut conn = sqlx::PgConnection::connect(admin_url).await.expect("connect to TEST_POSTGRES_URL");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await.unwrap();
    conn.close().await.ok();
    let (base, _) = admin_url.rsplit_once('/').expect("TEST_POSTGRES_URL ends in /DATABASE");
    (format!("{base}/{name}"), name)
}

impl TestServer {
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(backend, |_| {}).await
    }

    pub async fn start_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> Self {
        install_crypto();
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path());
        let mut pg_database = None;
        if let Backend::Postgres(admin_url) = &backend {
            let (url, name) = create_pg_database(admin_url).await;
            config.database.url = url;
            pg_database = Some((admin_url.clone(), name));
        }
        tweak(&mut config);
        let config = config.resolved();
        let running = start(config.clone()).await.expect("server starts");
        TestServer {
            base: format!("http://{}", running.client_addr),
            http: reqwest::Client::new(),
            running: Some(running),
            config,
            _dir: dir,
            pg_database,
        }
    }

    /// Stops the server and starts it again on the same database (a new port).
    pub async fn restart(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
        let running = start(self.config.clone()).await.expect("server restarts");
        self.base = format!("http://{}", running.client_addr);
        self.running = Some(running);
    }

    /// Stops the server, keeping its data, until `resume` (a server that is down).
    pub async fn pause(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
    }

    /// Starts a paused server again on the same data (and the same federation port).
    pub async fn resume(&mut self) {
        assert!(self.running.is_none(), "the server is running");
        let running = start(self.config.clone()).await.expect("server starts again");
        self.base = format!("http://{}", running.client_addr);
        self.running = Some(running);
    }

    /// The configuration the server runs with (its data dir, its database).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The running server's services, for tests that look at its in-memory state.
    pub fn services(&self) -> &std::sync::Arc<convo::service::Services> {
        &self.running.as_ref().expect("the server is running").services
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
        if let Some((admin_url, name)) = self.pg_database.take() {
            use sqlx::Connection;
            if let Ok(mut conn) = sqlx::PgConnection::connect(&admin_url).await {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                    .execute(&mut conn)
                    .await;
            }
        }
    }

    /// Sends a request; answers the status and the JSON body (`null` if none).
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.request_with_headers(method, path, token, body, &[]).await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        self.request(Method::GET, path, token, None).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        self.request(Method::POST, path, token, Some(body)).await
    }

    pub async fn put(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        self.request(Method::PUT, path, token, Some(body)).await
    }

    /// Registers `name` on an open-registration server; answers (user id, token, device id).
    pub async fn register(&self, name: &str) -> (String, String, String) {
        let (status, body) = self
            .post(
                "/_matrix/client/v3/register",
                None,
                json!({"username": name, "password": PASSWORD, "auth": {"type": "m.login.dummy"}}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        (
            body["user_id"].as_str().unwrap().to_owned(),
            body["access_token"].as_str().unwrap().to_owned(),
            body["device_id"].as_str().unwrap().to_owned(),
        )
    }

    /// Logs in with the test password; answers (token, device id).
    pub async fn login(&self, user: &str, device_id: Option<&str>) -> (String, String) {
        let mut body = json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user},
            "password": PASSWORD,
        });
        if let Some(d) = device_id {
            body["device_id"] = json!(d);
        }
        let (status, body) = self.post("/_matrix/client/v3/login", None, body).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        (body["access_token"].as_str().unwrap().to_owned(), body["device_id"].as_str().unwrap().to_owned())
    }
}

impl TestServer {
    /// `request` with extra headers (such as `X-Forwarded-For`).
    pub async fn request_with_headers(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{}", self.base, path));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status();
        let bytes = resp.bytes().await.unwrap();
        let value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).expect("JSON response") };
        (status, value)
    }
}

/// Asserts a Matrix error: status and errcode.
#[track_caller]
pub fn assert_error(result: &(StatusCode, Value), status: StatusCode, errcode: &str) {
    assert_eq!(result.0, status, "unexpected status, body: {}", result.1);
    assert_eq!(result.1["errcode"], errcode, "unexpected errcode, body: {}", result.1);
    assert!(result.1["error"].is_string(), "errors carry a message: {}", result.1);
}

impl TestServer {
    /// Creates a room; answers its id.
    pub async fn create_room(&self, token: &str, body: Value) -> String {
        let (status, body) = self.post("/_matrix/client/v3/createRoom", Some(token), body).await;
        assert_eq!(status, StatusCode::OK, "createRoom: {body}");
        body["room_id"].as_str().unwrap().to_owned()
    }

    /// Sends an `m.room.message` text; answers the event id.
    pub async fn send_text(&self, token: &str, room: &str, text: &str) -> String {
        let txn = convo::service::generate_registration_token();
        let (status, body) = self
            .put(
                &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}"),
                Some(token),
                json!({"msgtype": "m.text", "body": text}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "send: {body}");
        body["event_id"].as_str().unwrap().to_owned()
    }

    pub async fn join(&self, token: &str, room: &str) {
        let (status, body) = self.post(&format!("/_matrix/client/v3/rooms/{room}/join"), Some(token), json!({})).await;
        assert_eq!(status, StatusCode::OK, "join: {body}");
    }

    pub async fn leave(&self, token: &str, room: &str) {
        let (status, body) = self.post(&format!("/_matrix/client/v3/rooms/{room}/leave"), Some(token), json!({})).await;
        assert_eq!(status, StatusCode::OK, "leave: {body}");
    }

    /// `/sync` with optional `since` and query extras.
    pub async fn sync(&self, token: &str, since: Option<&str>, extra: &str) -> Value {
        let mut path = String::from("/_matrix/client/v3/sync?");
        if let Some(since) = since {
            path.push_str(&format!("since={since}&"));
        }
        path.push_str(extra);
        let (status, body) = self.get(&path, Some(token)).await;
        assert_eq!(status, StatusCode::OK, "sync: {body}");
        body
    }
}

impl TestServer {
    /// Waits (at most 10 s) until `n` `/sync` requests of `user_id` are parked waiting
    /// for news, so that what the test does next is what wakes them.
    pub async fn wait_for_waiting_syncs(&self, user_id: &str, n: usize) {
        let services = &self.running.as_ref().expect("the server is running").services;
        let user = ruma::OwnedUserId::try_from(user_id).expect("a user id");
        let waited =
            tokio::time::timeout(std::time::Duration::from_secs(10), services.waiting_syncs.wait_for(&user, n));
        waited.await.unwrap_or_else(|_| panic!("{n} syncs of {user_id} did not start waiting within 10 s"));
    }
}

/// The bodies of the `m.room.message` events of a timeline.
/// `s` percent-encoded for a query string (every byte but ASCII letters and digits).
pub fn urlencode(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

pub fn bodies(events: &Value) -> Vec<String> {
    events
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["type"] == "m.room.message")
                .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}
