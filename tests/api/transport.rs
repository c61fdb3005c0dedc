//! The client listener's transport, spoken to over raw TCP: header, body and idle
//! timeouts, the connection cap, a long-polling `/sync` that outlives the idle timeout,
//! and Matrix errors for a too-long request line or too-large headers.

use std::time::{Duration, Instant};

use convo::config::Config;
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::common::{Backend, TestServer};

/// The longest any step here may take; every wait is bounded by it.
const BOUND: Duration = Duration::from_secs(10);

async fn connect(server: &TestServer) -> TcpStream {
    TcpStream::connect(server.running.as_ref().unwrap().client_addr).await.unwrap()
}

/// A response read off a raw socket.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    head: String,
    body: Value,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim().eq_ignore_ascii_case(name).then(|| value.trim().to_owned())
        })
    }
}

/// Reads one response (head, and a `content-length` body) within `BOUND`.
async fn read_response(stream: &mut TcpStream) -> RawResponse {
    tokio::time::timeout(BOUND, async {
        let mut bytes = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = stream.read(&mut chunk).await.expect("read a response");
            assert!(n > 0, "connection closed before a response; got {:?}", String::from_utf8_lossy(&bytes));
            bytes.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(bytes[..head_end].to_vec()).unwrap();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut response = RawResponse { status, head, body: Value::Null };
        let length: usize = response.header("content-length").map_or(0, |v| v.parse().unwrap());
        while bytes.len() < head_end + length {
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed inside a body");
            bytes.extend_from_slice(&chunk[..n]);
        }
        if length > 0 {
            response.body = serde_json::from_slice(&bytes[head_end..head_end + length]).expect("a JSON body");
        }
        response
    })
    .await
    .expect("a response within the bound")
}

/// Waits (within `BOUND`) until the server closes the connection; answers when.
async fn wait_closed(stream: &mut TcpStream) -> Instant {
    tokio::time::timeout(BOUND, async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the server closes the connection within the bound")
}

fn short_timeouts(c: &mut Config) {
    c.limits.header_read_timeout_ms = 300;
    c.limits.body_read_timeout_ms = 300;
    c.limits.idle_timeout_ms = 300;
}

const VERSIONS: &[u8] = b"GET /_matrix/client/versions HTTP/1.1\r\nHost: localhost\r\n\r\n";

#[tokio::test]
async fn a_connection_that_does_not_finish_its_headers_is_closed() {
    let server = TestServer::start_with(Backend::Sqlite, short_timeouts).await;
    // An unfinished request line, and a connection that sends nothing at all.
    let mut partial = connect(&server).await;
    let opened = Instant::now();
    partial.write_all(b"GET /_matrix/client/versions HT").await.unwrap();
    let mut silent = connect(&server).await;
    let closed = wait_closed(&mut partial).await;
    assert!(closed - opened >= Duration::from_millis(250), "closed after {:?}", closed - opened);
    wait_closed(&mut silent).await;

    // A client that keeps sending, a byte every 20 ms, is still cut: the timeout
    // covers the whole head, not the time between bytes.
    let mut trickle = connect(&server).await;
    trickle.write_all(b"GET /_matrix/client/versions HTTP/1.1\r\nX-Slow: ").await.unwrap();
    let opened = Instant::now();
    let held = loop {
        assert!(opened.elapsed() < Duration::from_secs(3), "a trickling client was held for 3 s");
        let mut chunk = [0u8; 64];
        match trickle.try_read(&mut chunk) {
            Ok(0) => break opened.elapsed(),
            Ok(_) => panic!("an unfinished head was answered"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break opened.elapsed(),
        }
        if trickle.write_all(b"x").await.is_err() {
            break opened.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(held >= Duration::from_millis(250), "cut after {held:?}");

    // The server still answers.
    let mut fresh = connect(&server).await;
    fresh.write_all(VERSIONS).await.unwrap();
    assert_eq!(read_response(&mut fresh).await.status, 200);
    server.stop().await;
}

#[tokio::test]
async fn a_body_that_does_not_arrive_gets_408_and_a_huge_one_413_at_once() {
    let server = TestServer::start_with(Backend::Sqlite, short_timeouts).await;
    // Content-Length 100 (allowed) but only 7 bytes: 408 when the body timeout passes.
    let mut stream = connect(&server).await;
    let sent = Instant::now();
    stream
        .write_all(
            b"POST /_matrix/client/v3/login HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"type\"",
        )
        .await
        .unwrap();
    let response = read_response(&mut stream).await;
    assert_eq!(response.status, 408, "{response:?}");
    assert_eq!(response.body["errcode"], "M_UNKNOWN", "{response:?}");
    assert!(sent.elapsed() >= Duration::from_millis(250));
    wait_closed(&mut stream).await;

    server.stop().await;

    // Content-Length 100,000,000 and 7 bytes, with a long body timeout: refused at once
    // from the declared length, and the connection closed.
    let server = TestServer::start_with(Backend::Sqlite, |c| c.limits.body_read_timeout_ms = 60_000).await;
    for path in ["/_matrix/client/v3/login", "/_matrix/client/versions"] {
        let mut stream = connect(&server).await;
        let sent = Instant::now();
        stream
            .write_all(
                format!(
                    "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
                     Content-Length: 100000000\r\n\r\n{{\"type\""
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let response = read_response(&mut stream).await;
        // The login endpoint reads bodies (413); /versions takes no POST (405).
        let (status, errcode) = if path.ends_with("login") { (413, "M_TOO_LARGE") } else { (405, "M_UNRECOGNIZED") };
        assert_eq!(response.status, status, "{path}: {response:?}");
        assert_eq!(response.body["errcode"], errcode, "{path}: {response:?}");
        let closed = wait_closed(&mut stream).await;
        assert!(closed - sent < Duration::from_secs(5), "{path}: held {:?}", closed - sent);
    }
    server.stop().await;
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let server = TestServer::start_with(Backend::Sqlite, |c| {
        c.limits.header_read_timeout_ms = 5_000;
        c.limits.idle_timeout_ms = 300;
    })
    .await;
    let mut stream = connect(&server).await;
    // Two requests on one connection (keep-alive), then nothing.
    for _ in 0..2 {
        stream.write_all(VERSIONS).await.unwrap();
        assert_eq!(read_response(&mut stream).await.status, 200);
    }
    let answered = Instant::now();
    let closed = wait_closed(&mut stream).await;
    assert!(closed - answered >= Duration::from_millis(250), "closed after {:?}", closed - answered);
    assert!(closed - answered < Duration::from_millis(4_000), "the header timeout is not what closed it");
    server.stop().await;
}

/// A long-polling `/sync` waits with no bytes moving, for longer than every timeout:
/// it is a request under way, and is answered when its own timeout ends.
async fn long_polling_sync_outlives_the_idle_timeout(backend: Backend) {
    let server = TestServer::start_with(backend, short_timeouts).await;
    let (_, token, _) = server.register("poller").await;
    let since = server.sync(&token, None, "").await["next_batch"].as_str().unwrap().to_owned();
    let mut stream = connect(&server).await;
    let sent = Instant::now();
    stream
        .write_all(
            format!(
                "GET /_matrix/client/v3/sync?since={since}&timeout=1500 HTTP/1.1\r\nHost: localhost\r\n\
                 Authorization: Bearer {token}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let response = read_response(&mut stream).await;
    assert_eq!(response.status, 200, "{response:?}");
    assert!(response.body["next_batch"].is_string(), "{response:?}");
    assert!(sent.elapsed() >= Duration::from_millis(1_400), "answered after {:?}", sent.elapsed());
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut() {
    let server = TestServer::start_with(Backend::Sqlite, |c| {
        c.limits.header_read_timeout_ms = 5_000;
        c.limits.idle_timeout_ms = 300;
    })
    .await;
    // A small receive window, and pipelined requests, sent on and on, whose responses
    // the client never reads: the server's writes stall. (Each request is padded so that
    // no system buffer can swallow them all: an uncut server would wait forever, and so
    // would this writer.)
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(server.running.as_ref().unwrap().client_addr).await.unwrap();
    let request =
        format!("GET /_matrix/client/versions HTTP/1.1\r\nHost: localhost\r\nX-Pad: {}\r\n\r\n", "p".repeat(1_000))
            .repeat(100);
    let sent = Instant::now();
    let held = tokio::time::timeout(BOUND, async {
        loop {
            if stream.write_all(request.as_bytes()).await.is_err() {
                return sent.elapsed();
            }
        }
    })
    .await
    .expect("the server cuts a client that does not read its responses");
    assert!(held >= Duration::from_millis(300), "cut after {held:?}");
    server.stop().await;
}

#[tokio::test]
async fn connections_past_the_cap_wait_for_a_free_slot() {
    let server = TestServer::start_with(Backend::Sqlite, |c| {
        c.limits.max_connections = 2;
        c.limits.header_read_timeout_ms = 500;
    })
    .await;
    let running = server.running.as_ref().unwrap();
    let mut first = connect(&server).await;
    let mut second = connect(&server).await;
    let start = Instant::now();
    while running.connections.open() < 2 {
        assert!(start.elapsed() < BOUND, "the two connections were not accepted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A third client connects (the system queues it) and sends a whole request: it is
    // answered only once one of the two silent connections is cut.
    let mut third = connect(&server).await;
    third.write_all(VERSIONS).await.unwrap();
    let response = tokio::spawn(async move {
        let response = read_response(&mut third).await;
        (response, Instant::now())
    });
    let first_closed = wait_closed(&mut first).await;
    wait_closed(&mut second).await;
    let (response, answered) = response.await.unwrap();
    assert_eq!(response.status, 200);
    assert!(answered >= first_closed, "the third connection was served while two were open");
    assert!(running.connections.open() <= 2);
    server.stop().await;
}

#[tokio::test]
async fn too_long_request_lines_and_too_large_headers_get_matrix_errors() {
    let server = TestServer::start(Backend::Sqlite).await;
    let long_user = format!("@{}:localhost", "a".repeat(100_000));
    let too_long = format!("GET /_matrix/client/v3/profile/{long_user} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let big_header =
        format!("GET /_matrix/client/versions HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n", "b".repeat(70_000));
    let many_headers = format!(
        "GET /_matrix/client/versions HTTP/1.1\r\nHost: localhost\r\n{}\r\n",
        (0..150).map(|i| format!("X-H{i}: 1\r\n")).collect::<String>()
    );
    for (name, request, status) in
        [("URI", &too_long, 414), ("header bytes", &big_header, 431), ("header count", &many_headers, 431)]
    {
        // On a fresh connection, and after a first request on a kept-alive one.
        for warm in [false, true] {
            let mut stream = connect(&server).await;
            if warm {
                stream.write_all(VERSIONS).await.unwrap();
                assert_eq!(read_response(&mut stream).await.status, 200);
            }
            stream.write_all(request.as_bytes()).await.unwrap();
            let response = read_response(&mut stream).await;
            assert_eq!(response.status, status, "{name}, warm {warm}: {response:?}");
            assert_eq!(response.header("content-type").as_deref(), Some("application/json"), "{name}");
            assert_eq!(response.body["errcode"], "M_TOO_LARGE", "{name}: {response:?}");
            assert!(response.body["error"].is_string(), "{name}: {response:?}");
            wait_closed(&mut stream).await;
        }
    }
    // Within the limits, a long request line is served as usual.
    let (status, _) = server.get(&format!("/_matrix/client/versions?pad={}", "p".repeat(20_000)), None).await;
    assert_eq!(status, 200);
    server.stop().await;
}

crate::backend_tests!(long_polling_sync_outlives_the_idle_timeout);
