//! The outbound queues against a misbehaving peer: a loopback HTTPS server (the test
//! CA's certificate for 127.0.0.1) that answers `PUT /send/{txnId}` as each test
//! scripts it. What Convo's sender does with 400, 413, 429 and 500 answers.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::{
    backend_tests,
    common::{Backend, TestServer},
    federation::{TRUSTING, federating_with, services},
};

/// One transaction as the peer saw it, and the status it answered.
#[derive(Clone, Debug)]
struct Seen {
    txn_id: String,
    body: Value,
    status: u16,
    at: Instant,
}

impl Seen {
    /// The `n` of each EDU it held.
    fn edus(&self) -> Vec<i64> {
        self.body["edus"].as_array().into_iter().flatten().filter_map(|e| e["content"]["n"].as_i64()).collect()
    }

    fn pdus(&self) -> Vec<String> {
        self.body["pdus"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["content"]["body"].as_str())
            .map(str::to_owned)
            .collect()
    }

    fn len(&self) -> usize {
        self.body["pdus"].as_array().map_or(0, Vec::len) + self.body["edus"].as_array().map_or(0, Vec::len)
    }
}

/// How the peer answers a transaction: given it and the transactions seen before it,
/// a status and a JSON body.
type Script = Box<dyn Fn(&Value, &[Seen]) -> (u16, Value) + Send + Sync>;

/// A peer server on loopback that answers `/send` by its script and records what it saw.
struct Peer {
    name: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Peer {
    async fn start(script: Script) -> Self {
        let certs_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/certs");
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(certs_dir.join("server.pem")).unwrap().map(Result::unwrap).collect();
        let key = PrivateKeyDer::from_pem_file(certs_dir.join("server.key")).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let name = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let script = Arc::new(script);
        let recorded = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (acceptor, script, seen) = (acceptor.clone(), script.clone(), recorded.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let Some((path, body)) = read_request(&mut tls).await else { return };
                    let (status, answer) = match path.strip_prefix("/_matrix/federation/v1/send/") {
                        Some(txn_id) => {
                            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            let mut seen = seen.lock().unwrap();
                            let (status, answer) = script(&body, &seen);
                            seen.push(Seen { txn_id: txn_id.to_owned(), body, status, at: Instant::now() });
                            (status, answer)
                        }
                        None => (404, json!({"errcode": "M_UNRECOGNIZED", "error": "not here"})),
                    };
                    let answer = answer.to_string();
                    let head = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                         Connection: close\r\n\r\n",
                        answer.len()
                    );
                    let _ = tls.write_all(head.as_bytes()).await;
                    let _ = tls.write_all(answer.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        Peer { name, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Reads one HTTP/1.1 request: its path and its body (by `Content-Length`), bounded.
async fn read_request(tls: &mut (impl AsyncReadExt + Unpin)) -> Option<(String, Vec<u8>)> {
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if data.len() > 64 * 1024 {
            return None;
        }
        match tls.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
    let path = head.split_whitespace().nth(1)?.to_owned();
    let length: usize = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = data[head_end..].to_vec();
    while body.len() < length && body.len() <= 16 * 1024 * 1024 {
        match tls.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => body.extend_from_slice(&buf[..n]),
        }
    }
    Some((path, body))
}

fn ok() -> (u16, Value) {
    (200, json!({"pdus": {}}))
}

fn error(status: u16, errcode: &str) -> (u16, Value) {
    (status, json!({"errcode": errcode, "error": "scripted refusal"}))
}

/// Whether a transaction holds the EDU numbered `n`.
fn holds(txn: &Value, n: i64) -> bool {
    txn["edus"].as_array().into_iter().flatten().any(|e| e["content"]["n"] == n)
}

fn edu(n: i64) -> Value {
    json!({"edu_type": "org.example.test", "content": {"n": n}})
}

/// Queues EDUs numbered `numbers` for `peer` at positions 1, 2, ... (before any the
/// sender numbers itself), without waking its sender: they all wait for one batch.
async fn queue_edus(server: &TestServer, peer: &Peer, numbers: impl IntoIterator<Item = i64>) {
    for (position, n) in numbers.into_iter().enumerate() {
        let store = &services(server).store;
        store
            .enqueue_federation_edu(std::slice::from_ref(&peer.name), position as i64 + 1, &edu(n).to_string(), None)
            .await
            .unwrap();
    }
}

/// Queues one more EDU the usual way, which starts the peer's sender.
async fn wake(server: &TestServer, peer: &Peer, n: i64) {
    let destination = peer.name.as_str().try_into().unwrap();
    services(server).send_edu(&[destination], &edu(n), None).await.unwrap();
}

/// Waits (at most 20 s) until nothing is queued for `peer` any more.
async fn wait_drained(server: &TestServer, peer: &Peer) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while services(server).store.count_federation_outbox(&peer.name).await.unwrap() > 0 {
        assert!(Instant::now() < deadline, "the queue for {} did not drain; it saw {:#?}", peer.name, peer.seen());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn permanent_refusals_are_dropped_and_413_is_split(backend: Backend) {
    let a = federating_with(backend, TRUSTING, |c| c.federation.max_retry_interval_ms = 60_000).await;

    // A peer that refuses (400) any transaction holding EDU 1: that batch (EDUs 1 to
    // 100) is dropped after one try, and the next one (101, 102) goes at once.
    let picky = Peer::start(Box::new(|txn, _| if holds(txn, 1) { error(400, "M_BAD_JSON") } else { ok() })).await;
    queue_edus(&a, &picky, 1..=101).await;
    wake(&a, &picky, 102).await;

    // A peer that takes at most two items at once, and never EDU 13 (413 each time).
    let small = Peer::start(Box::new(|txn, _| {
        let len = txn["pdus"].as_array().map_or(0, Vec::len) + txn["edus"].as_array().map_or(0, Vec::len);
        if holds(txn, 13) || len > 2 { error(413, "M_TOO_LARGE") } else { ok() }
    }))
    .await;
    let (_, token, _) = a.register("alice").await;
    let room = a.create_room(&token, json!({})).await;
    for text in ["p1", "p2"] {
        let id = a.send_text(&token, &room, text).await;
        let position = services(&a).store.get_event(&id).await.unwrap().unwrap().stream_ordering;
        services(&a).store.enqueue_federation_pdu(std::slice::from_ref(&small.name), position, &id).await.unwrap();
    }
    queue_edus(&a, &small, 11..=15).await;
    wake(&a, &small, 16).await;

    wait_drained(&a, &picky).await;
    let seen = picky.seen();
    let refused: Vec<&Seen> = seen.iter().filter(|s| s.status == 400).collect();
    assert_eq!(refused.len(), 1, "the refused batch is not sent again: {seen:#?}");
    assert_eq!(refused[0].edus(), (1..=100).collect::<Vec<_>>());
    let delivered: Vec<i64> = seen.iter().filter(|s| s.status == 200).flat_map(Seen::edus).collect();
    assert_eq!(delivered, vec![101, 102], "what came after the refused batch is delivered");

    wait_drained(&a, &small).await;
    let seen = small.seen();
    let delivered: Vec<&Seen> = seen.iter().filter(|s| s.status == 200).collect();
    assert!(delivered.iter().all(|s| s.len() <= 2), "{seen:#?}");
    let pdus: Vec<String> = delivered.iter().flat_map(|s| s.pdus()).collect();
    assert_eq!(pdus, vec!["p1", "p2"], "each PDU once, in order");
    let edus: Vec<i64> = delivered.iter().flat_map(|s| s.edus()).collect();
    assert_eq!(edus, vec![11, 12, 14, 15, 16], "each EDU but 13 once, in order");
    // EDU 13 was tried alone, once, then dropped.
    let alone: Vec<&Seen> = seen.iter().filter(|s| s.len() == 1 && s.edus() == vec![13]).collect();
    assert_eq!(alone.len(), 1, "{seen:#?}");
    assert_eq!(alone[0].status, 413);
    // Each try has its own transaction id: those items' positions.
    let mut ids: Vec<&str> = seen.iter().map(|s| s.txn_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), seen.len(), "{seen:#?}");
    a.stop().await;
}

async fn transient_failures_are_retried_until_delivered(backend: Backend) {
    let a = federating_with(backend, TRUSTING, |c| c.federation.max_retry_interval_ms = 100).await;

    // 500 twice, then taken: the same transaction each time.
    let flaky = Peer::start(Box::new(|_, seen| if seen.len() < 2 { error(500, "M_UNKNOWN") } else { ok() })).await;
    wake(&a, &flaky, 1).await;

    // 429 asking for 1.5 s (more than the 100 ms backoff), then taken.
    let busy = Peer::start(Box::new(|_, seen| {
        if seen.is_empty() {
            (429, json!({"errcode": "M_LIMIT_EXCEEDED", "error": "slow down", "retry_after_ms": 1500}))
        } else {
            ok()
        }
    }))
    .await;
    wake(&a, &busy, 2).await;

    wait_drained(&a, &flaky).await;
    let seen = flaky.seen();
    assert_eq!(seen.iter().map(|s| s.status).collect::<Vec<_>>(), vec![500, 500, 200], "{seen:#?}");
    assert!(seen.iter().all(|s| s.txn_id == seen[0].txn_id && s.edus() == vec![1]), "{seen:#?}");

    wait_drained(&a, &busy).await;
    let seen = busy.seen();
    assert_eq!(seen.iter().map(|s| s.status).collect::<Vec<_>>(), vec![429, 200], "{seen:#?}");
    assert_eq!(seen[1].txn_id, seen[0].txn_id);
    let waited = seen[1].at - seen[0].at;
    assert!(waited >= Duration::from_millis(1500), "retried after {waited:?}, before the 1.5 s asked");
    a.stop().await;
}

backend_tests!(permanent_refusals_are_dropped_and_413_is_split, transient_failures_are_retried_until_delivered);
