//! Operations: the server name bound to the data, one server per data dir, `/health`,
//! and a database outage answered with fast `503`s.

use std::{
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use convo::server::start;
use reqwest::StatusCode;
use serde_json::json;
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

use crate::common::{Backend, TestServer, assert_error};

const BIN: &str = env!("CARGO_BIN_EXE_convo");

async fn changing_the_server_name_is_refused(backend: Backend) {
    let mut server = TestServer::start(backend.clone()).await;
    let (user, token, _) = server.register("alice").await;
    let config = server.config().clone();
    server.running.take().unwrap().stop().await;

    let mut renamed = config.clone();
    renamed.server_name = "other.example".try_into().unwrap();
    let err = start(renamed.clone()).await.err().expect("a start with another server name is refused");
    assert!(err.contains("`other.example`") && err.contains("`localhost`"), "{err}");

    // A database from before names were recorded: the name comes from its users.
    forget_recorded_name(&config.database.url).await;
    let err = start(renamed).await.err().expect("refused from the users' ids too");
    assert!(err.contains("`other.example`") && err.contains("`localhost`"), "{err}");

    // The right name starts, and the user is still there.
    server.restart().await;
    let (status, body) = server.get("/_matrix/client/v3/account/whoami", Some(&token)).await;
    assert_eq!((status, body["user_id"].as_str()), (StatusCode::OK, Some(user.as_str())), "{body}");
    server.stop().await;
}

async fn forget_recorded_name(url: &str) {
    use sqlx::Connection;
    if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query("DELETE FROM server_info").execute(&mut conn).await.unwrap();
        conn.close().await.unwrap();
    } else {
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query("DELETE FROM server_info").execute(&mut conn).await.unwrap();
        conn.close().await.unwrap();
    }
}

async fn a_second_server_on_the_same_data_dir_is_refused(backend: Backend) {
    let server = TestServer::start(backend).await;
    let config = server.config().clone();
    let data_dir = config.data_dir.display().to_string();

    // In the same process...
    let err = start(config.clone()).await.err().expect("a second server in this process is refused");
    assert!(err.contains(&data_dir) && err.contains("in use"), "{err}");
    assert!(err.contains(&format!("process {}", std::process::id())), "{err}");

    // ...and as another process, while `convo admin` still works on the same data.
    let run = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .env_remove("RUST_LOG")
            .env("CONVO_DATA_DIR", &config.data_dir)
            .env("CONVO_DATABASE__URL", &config.database.url)
            .env("CONVO_LISTENERS__CLIENT", "127.0.0.1:0")
            .output()
            .unwrap()
    };
    let other = run(&[]);
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success(), "a second convo process started: {stderr}");
    assert!(stderr.contains(&data_dir) && stderr.contains("in use by another Convo server"), "{stderr}");
    let admin = run(&["admin", "registration-token", "create", "--token", "while-running"]);
    assert!(admin.status.success(), "{}", String::from_utf8_lossy(&admin.stderr));
    let list = run(&["admin", "registration-token", "list"]);
    assert!(String::from_utf8_lossy(&list.stdout).contains("while-running"), "{list:?}");

    // Once stopped, the data dir is free again.
    let mut server = server;
    server.running.take().unwrap().stop().await;
    let again = start(config).await.expect("the lock is released at stop");
    again.stop().await;
    server.stop().await;
}

async fn health_says_the_database_answers(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (status, body) = server.get("/health", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"status": "ok", "database": "ok"}));
    server.stop().await;
}

crate::backend_tests!(
    changing_the_server_name_is_refused,
    a_second_server_on_the_same_data_dir_is_refused,
    health_says_the_database_answers,
);

/// A TCP proxy on loopback in front of PostgreSQL that the test can cut (closing every
/// connection and refusing new ones) and restore.
struct CuttableProxy {
    addr: std::net::SocketAddr,
    up: Arc<Mutex<bool>>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl CuttableProxy {
    async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(Mutex::new(true));
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let (up, links) = (up.clone(), links.clone());
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if !*up.lock().unwrap() {
                        continue; // dropped: the connection is closed at once
                    }
                    let target = target.clone();
                    links.lock().unwrap().push(tokio::spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(&target).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    }));
                }
            }
        });
        Self { addr, up, links, accept }
    }

    fn cut(&self) {
        *self.up.lock().unwrap() = false;
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    fn restore(&self) {
        *self.up.lock().unwrap() = true;
    }
}

/// PostgreSQL stops answering: requests that need it get `503` with `Retry-After`
/// within the acquire timeout (not a 10 s wait and a 500), `/versions` keeps
/// answering, `/health` says so, and all is well again once it is back.
#[tokio::test]
async fn a_database_outage_gets_fast_503s_and_health_says_so() {
    let Some(backend) = Backend::postgres() else { return };
    let Backend::Postgres(admin_url) = &backend else { unreachable!() };
    // The host and port of TEST_POSTGRES_URL, e.g. 127.0.0.1:55432.
    let target = admin_url.split('@').nth(1).unwrap().split('/').next().unwrap().to_owned();
    let proxy = CuttableProxy::start(target.clone()).await;
    let proxy_addr = proxy.addr.to_string();
    let server = TestServer::start_with(backend, |c| {
        c.database.url = c.database.url.replace(&target, &proxy_addr);
        c.database.acquire_timeout_ms = 2_000;
    })
    .await;
    let (_, token, _) = server.register("patient").await;
    let http = reqwest::Client::new();
    let get = |path: &str, token: Option<&str>| {
        let mut request = http.get(format!("{}{path}", server.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };

    proxy.cut();
    for path in ["/_matrix/client/v3/account/whoami", "/_matrix/client/v3/joined_rooms"] {
        let sent = Instant::now();
        let response = get(path, Some(&token)).await.unwrap();
        let took = sent.elapsed();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
        assert!(response.headers().get("retry-after").is_some(), "{path}: no Retry-After");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_error(&(StatusCode::SERVICE_UNAVAILABLE, body), StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN");
        assert!(took < Duration::from_secs(5), "{path}: answered after {took:?}");
    }
    for token in [None, Some(token.as_str())] {
        let response = get("/_matrix/client/versions", token).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "/versions with token {token:?}");
    }
    let response = get("/health", None).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().get("retry-after").is_some());
    assert_eq!(response.json::<serde_json::Value>().await.unwrap()["status"], "unavailable");

    proxy.restore();
    let back = Instant::now();
    loop {
        let response = get("/health", None).await.unwrap();
        if response.status() == StatusCode::OK {
            break;
        }
        assert!(back.elapsed() < Duration::from_secs(20), "the server did not reconnect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let response = get("/_matrix/client/v3/account/whoami", Some(&token)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    proxy.accept.abort();
    server.stop().await;
}
