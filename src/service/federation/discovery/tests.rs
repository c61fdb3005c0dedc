//! Discovery against loopback only: a tiny DNS server on a UDP port (answers built with
//! hickory-proto's message types) and a tiny HTTPS server (tokio-rustls, the throwaway
//! certificates of `tests/certs/discovery/`) serving `/.well-known/matrix/server`.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Mutex,
};

use hickory_resolver::{
    config::{ConnectionConfig, NameServerConfig, ResolveHosts},
    proto::{
        op::{Message, MessageType, Metadata, ResponseCode},
        rr::{Name, RData, Record, RecordType, rdata},
    },
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, UdpSocket},
};

use super::*;

const TTL: u32 = 3600;

/// The records the test DNS server holds, by fully qualified name and type.
type Zone = HashMap<(String, RecordType), Vec<RData>>;

/// A DNS server for `.example`/`.test` names, counting the questions it gets.
struct Dns {
    addr: SocketAddr,
    records: Arc<Mutex<Zone>>,
    queries: Arc<Mutex<Vec<(String, RecordType)>>>,
}

impl Dns {
    async fn start() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let records: Arc<Mutex<Zone>> = Arc::default();
        let queries: Arc<Mutex<Vec<(String, RecordType)>>> = Arc::default();
        let (r, q) = (records.clone(), queries.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else { return };
                let Ok(request) = Message::from_vec(&buf[..n]) else { continue };
                let Some(query) = request.queries.first().cloned() else { continue };
                let name = query.name().to_ascii().to_ascii_lowercase();
                q.lock().unwrap().push((name.clone(), query.query_type()));
                let mut response = Message::response(request.metadata.id, request.metadata.op_code);
                response.metadata = Metadata::response_from_request(&request.metadata);
                response.metadata.message_type = MessageType::Response;
                response.metadata.authoritative = true;
                response.add_query(query.clone());
                {
                    let records = r.lock().unwrap();
                    match records.get(&(name.clone(), query.query_type())) {
                        Some(answers) => {
                            for data in answers {
                                response.add_answer(Record::from_rdata(query.name().clone(), TTL, data.clone()));
                            }
                        }
                        None if !records.keys().any(|(n, _)| *n == name) => {
                            response.metadata.response_code = ResponseCode::NXDomain;
                        }
                        None => {}
                    }
                }
                let _ = socket.send_to(&response.to_vec().unwrap(), peer).await;
            }
        });
        Self { addr, records, queries }
    }

    fn add(&self, name: &str, data: RData) {
        let key = (format!("{name}."), data.record_type());
        self.records.lock().unwrap().entry(key).or_default().push(data);
    }

    fn a(&self, name: &str, ip: [u8; 4]) {
        self.add(name, RData::A(rdata::A(Ipv4Addr::from(ip))));
    }

    fn srv(&self, name: &str, priority: u16, weight: u16, port: u16, target: &str) {
        let target = if target.is_empty() { Name::root() } else { Name::from_ascii(format!("{target}.")).unwrap() };
        let srv = rdata::SRV::new(priority, weight, port, target);
        self.add(name, RData::SRV(srv));
    }

    fn query_count(&self) -> usize {
        self.queries.lock().unwrap().len()
    }

    fn asked(&self, name: &str, kind: RecordType) -> usize {
        let name = format!("{name}.");
        self.queries.lock().unwrap().iter().filter(|(n, t)| *n == name && *t == kind).count()
    }
}

/// One canned HTTP answer.
#[derive(Clone)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

fn ok_json(body: &str) -> Reply {
    Reply { status: 200, headers: vec![], body: body.to_owned() }
}

fn certs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/certs/discovery")
}

/// An HTTPS server on loopback answering by `Host` header and path, recording each
/// request's `Host` header and path.
struct Https {
    port: u16,
    routes: Arc<Mutex<HashMap<(String, String), Reply>>>,
    requests: Arc<Mutex<Vec<(String, String)>>>,
}

impl Https {
    async fn start() -> Self {
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(certs_dir().join("leaf.pem")).unwrap().map(Result::unwrap).collect();
        let key = PrivateKeyDer::from_pem_file(certs_dir().join("leaf.key")).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let routes: Arc<Mutex<HashMap<(String, String), Reply>>> = Arc::default();
        let requests: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let (routes2, requests2) = (routes.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (acceptor, routes, requests) = (acceptor.clone(), routes2.clone(), requests2.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let path = head.split_whitespace().nth(1).unwrap_or_default().to_owned();
                    let host = head
                        .lines()
                        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("host")))
                        .map(|(_, v)| v.trim().to_owned())
                        .unwrap_or_default();
                    requests.lock().unwrap().push((host.clone(), path.clone()));
                    let reply = routes.lock().unwrap().get(&(host, path)).cloned().unwrap_or(Reply {
                        status: 404,
                        headers: vec![],
                        body: r#"{"errcode":"M_NOT_FOUND"}"#.into(),
                    });
                    let mut out = format!(
                        "HTTP/1.1 {} X\r\nContent-Length: {}\r\nContent-Type: application/json\r\nConnection: close\r\n",
                        reply.status,
                        reply.body.len()
                    );
                    for (k, v) in &reply.headers {
                        out.push_str(&format!("{k}: {v}\r\n"));
                    }
                    out.push_str("\r\n");
                    out.push_str(&reply.body);
                    let _ = tls.write_all(out.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        Self { port, routes, requests }
    }

    fn route(&self, host: &str, path: &str, reply: Reply) {
        self.routes.lock().unwrap().insert((host.to_owned(), path.to_owned()), reply);
    }

    fn well_known(&self, host: &str, reply: Reply) {
        self.route(host, "/.well-known/matrix/server", reply);
    }

    fn requests(&self) -> Vec<(String, String)> {
        self.requests.lock().unwrap().clone()
    }
}

/// A client that trusts the test CA only.
fn http() -> reqwest::ClientBuilder {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(certs_dir().join("ca.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder().tls_backend_preconfigured(config)
}

fn resolver(dns: &Dns, https: &Https, allow_private: bool) -> Resolver {
    let mut udp = ConnectionConfig::udp();
    udp.port = dns.addr.port();
    let config = ResolverConfig::from_name_servers(vec![NameServerConfig::new(dns.addr.ip(), true, vec![udp])]);
    let mut opts = ResolverOpts::default();
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 1;
    // Only our cache: every lookup it lets through reaches the test server.
    opts.cache_size = 0;
    opts.use_hosts_file = ResolveHosts::Never;
    let settings = Settings {
        allow_private,
        dns: Some((config, opts)),
        capacity: 100,
        well_known_port: https.port,
        resolve_names: true,
    };
    Resolver::new(http(), settings).unwrap()
}

async fn setup() -> (Dns, Https) {
    (Dns::start().await, Https::start().await)
}

fn name(s: &str) -> &ServerName {
    <&ServerName>::try_from(s).unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// How long the resolver keeps `server`'s outcome from now, and its failure count.
async fn cached(resolver: &Resolver, server: &str) -> Option<(Duration, u32)> {
    let slot = resolver.destinations.slot(&name(server).to_owned());
    let entry = slot.lock().await;
    entry.as_ref().map(|e| (e.expires.saturating_duration_since(Instant::now()), e.failures))
}

#[test]
fn private_and_loopback_addresses_are_not_public() {
    for ip in [
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.1",
        "172.16.5.5",
        "169.254.1.1",
        "::1",
        "fd00::1",
        "fe80::1",
        "100.64.0.1",
        "::ffff:127.0.0.1",
        "0.0.0.0",
    ] {
        assert!(!is_public(ip.parse().unwrap()), "{ip} should not be public");
    }
    for ip in ["1.1.1.1", "8.8.8.8", "2a00:1450::1"] {
        assert!(is_public(ip.parse().unwrap()), "{ip} should be public");
    }
}

#[tokio::test]
async fn step_1_ip_literals_connect_straight_there_when_allowed() {
    let (dns, https) = setup().await;
    let strict = resolver(&dns, &https, false);
    let err = strict.resolve(name("127.0.0.1:8449")).await.unwrap_err();
    assert!(err.to_string().contains("non-public"), "{err}");
    let lax = resolver(&dns, &https, true);
    let d = lax.resolve(name("127.0.0.1:8449")).await.unwrap();
    assert_eq!(
        d,
        Destination {
            tls_name: "127.0.0.1".into(),
            port: 8449,
            host_header: "127.0.0.1:8449".into(),
            addrs: vec![addr("127.0.0.1:8449")],
        }
    );
    let d = lax.resolve(name("[::1]")).await.unwrap();
    assert_eq!((d.tls_name.as_str(), d.port, d.host_header.as_str()), ("::1", DEFAULT_PORT, "[::1]"));
    assert_eq!(d.addrs, [addr("[::1]:8448")]);
    assert_eq!(d.base_url(), "https://[::1]:8448");
    // A public literal needs no switch.
    let d = strict.resolve(name("1.2.3.4")).await.unwrap();
    assert_eq!((d.host_header.as_str(), d.addrs.as_slice()), ("1.2.3.4", &[addr("1.2.3.4:8448")][..]));
    assert_eq!(dns.query_count(), 0);
    assert!(https.requests().is_empty());
}

#[tokio::test]
async fn step_2_explicit_port_uses_address_records_and_keeps_the_port_in_host() {
    let (dns, https) = setup().await;
    dns.a("explicit.example", [1, 2, 3, 4]);
    dns.srv("_matrix-fed._tcp.explicit.example", 0, 0, 9999, "elsewhere.example");
    let r = resolver(&dns, &https, false);
    let d = r.resolve(name("explicit.example:8449")).await.unwrap();
    assert_eq!(
        d,
        Destination {
            tls_name: "explicit.example".into(),
            port: 8449,
            host_header: "explicit.example:8449".into(),
            addrs: vec![addr("1.2.3.4:8449")],
        }
    );
    // Neither `.well-known` nor SRV is consulted.
    assert!(https.requests().is_empty());
    assert_eq!(dns.asked("_matrix-fed._tcp.explicit.example", RecordType::SRV), 0);
}

#[tokio::test]
async fn step_3_well_known_delegations_and_their_host_and_certificate_names() {
    let (dns, https) = setup().await;
    // The hosts serving `.well-known` (certificates valid for them) are on loopback.
    for host in ["wk.test", "delegated.test", "srv.test", "legacy.test", "plain.test"] {
        dns.a(host, [127, 0, 0, 1]);
    }
    // 3.1: an IP literal, with a port.
    https.well_known("wk.test", ok_json(r#"{"m.server": "5.6.7.8:8451"}"#));
    // 3.2: a name with a port.
    https.well_known("delegated.test", ok_json(r#"{"m.server": "target.example:8450"}"#));
    dns.a("target.example", [5, 6, 7, 9]);
    // 3.3: a name without a port, with `_matrix-fed._tcp` (preferred over `_matrix._tcp`).
    https.well_known("srv.test", ok_json(r#"{"m.server": "fed.example"}"#));
    dns.srv("_matrix-fed._tcp.fed.example", 10, 0, 8500, "backup.example");
    dns.srv("_matrix-fed._tcp.fed.example", 5, 0, 8501, "primary.example");
    dns.srv("_matrix._tcp.fed.example", 0, 0, 9999, "legacy-target.example");
    dns.a("primary.example", [5, 0, 0, 1]);
    dns.a("backup.example", [5, 0, 0, 2]);
    // 3.4: only the deprecated `_matrix._tcp`.
    https.well_known("legacy.test", ok_json(r#"{"m.server": "old.example"}"#));
    dns.srv("_matrix._tcp.old.example", 0, 0, 8502, "old-target.example");
    dns.a("old-target.example", [5, 0, 0, 3]);
    // 3.5: no SRV at all: its addresses on 8448.
    https.well_known("plain.test", ok_json(r#"{"m.server": "bare.example"}"#));
    dns.a("bare.example", [5, 0, 0, 4]);

    let r = resolver(&dns, &https, true);
    let d = r.resolve(name("wk.test")).await.unwrap();
    assert_eq!(
        d,
        Destination {
            tls_name: "5.6.7.8".into(),
            port: 8451,
            host_header: "5.6.7.8:8451".into(),
            addrs: vec![addr("5.6.7.8:8451")],
        }
    );
    let d = r.resolve(name("delegated.test")).await.unwrap();
    assert_eq!(
        d,
        Destination {
            tls_name: "target.example".into(),
            port: 8450,
            host_header: "target.example:8450".into(),
            addrs: vec![addr("5.6.7.9:8450")],
        }
    );
    let d = r.resolve(name("srv.test")).await.unwrap();
    assert_eq!(
        d,
        Destination {
            tls_name: "fed.example".into(),
            port: 8501,
            host_header: "fed.example".into(),
            addrs: vec![addr("5.0.0.1:8501"), addr("5.0.0.2:8500")],
        }
    );
    assert_eq!(dns.asked("_matrix._tcp.fed.example", RecordType::SRV), 0);
    let d = r.resolve(name("legacy.test")).await.unwrap();
    assert_eq!(
        d,
        Destination {
            tls_name: "old.example".into(),
            port: 8502,
            host_header: "old.example".into(),
            addrs: vec![addr("5.0.0.3:8502")],
        }
    );
    let d = r.resolve(name("plain.test")).await.unwrap();
    assert_eq!(
        d,
        Destination {
            tls_name: "bare.example".into(),
            port: 8448,
            host_header: "bare.example".into(),
            addrs: vec![addr("5.0.0.4:8448")],
        }
    );
    // Each `.well-known` was asked of its own hostname, with a bare `Host` header.
    let mut hosts: Vec<String> = https.requests().into_iter().map(|(host, _)| host).collect();
    hosts.sort();
    assert_eq!(hosts, ["delegated.test", "legacy.test", "plain.test", "srv.test", "wk.test"]);
    assert!(https.requests().iter().all(|(_, path)| path == "/.well-known/matrix/server"));

    // Cached: resolving them all again asks nothing of DNS or HTTPS.
    let (queries, requests) = (dns.query_count(), https.requests().len());
    for host in ["wk.test", "delegated.test", "srv.test", "legacy.test", "plain.test"] {
        r.resolve(name(host)).await.unwrap();
    }
    assert_eq!((dns.query_count(), https.requests().len()), (queries, requests));
    // The destination is kept for the DNS TTL here (an hour, under the well-known's day).
    let (ttl, failures) = cached(&r, "delegated.test").await.unwrap();
    assert!(ttl > Duration::from_secs(3500) && ttl <= Duration::from_secs(3600), "{ttl:?}");
    assert_eq!(failures, 0);
}

#[tokio::test]
async fn well_known_cache_headers_bound_the_destination_and_outlive_it() {
    let (dns, https) = setup().await;
    dns.a("wk.test", [127, 0, 0, 1]);
    dns.a("target.example", [5, 6, 7, 9]);
    let mut reply = ok_json(r#"{"m.server": "target.example:8450"}"#);
    reply.headers.push(("Cache-Control".into(), "max-age=600".into()));
    https.well_known("wk.test", reply);
    let r = resolver(&dns, &https, true);
    r.resolve(name("wk.test")).await.unwrap();
    let (ttl, _) = cached(&r, "wk.test").await.unwrap();
    assert!(ttl > Duration::from_secs(590) && ttl <= Duration::from_secs(600), "{ttl:?}");
    // The destination expires, the well-known answer has not: only DNS is asked again.
    r.destinations.expire_all();
    let queries = dns.asked("target.example", RecordType::A);
    r.resolve(name("wk.test")).await.unwrap();
    assert_eq!(https.requests().len(), 1);
    assert_eq!(dns.asked("target.example", RecordType::A), queries + 1);
    // Both expired: asked again.
    r.destinations.expire_all();
    r.well_known.expire_all();
    r.resolve(name("wk.test")).await.unwrap();
    assert_eq!(https.requests().len(), 2);
}

#[tokio::test]
async fn steps_4_to_6_without_a_well_known() {
    let (dns, https) = setup().await;
    // Step 4: `.well-known` answers 404; `_matrix-fed._tcp` of the server name itself.
    dns.a("bad.test", [127, 0, 0, 1]);
    dns.srv("_matrix-fed._tcp.bad.test", 0, 0, 8600, "t4.example");
    dns.a("t4.example", [5, 0, 0, 5]);
    // Step 5: no host for `.well-known` at all; only `_matrix._tcp`.
    dns.srv("_matrix._tcp.s5.example", 0, 0, 8601, "t5.example");
    dns.a("t5.example", [5, 0, 0, 6]);
    // Step 6: `.well-known` is not JSON; no SRV; the name's addresses on 8448.
    dns.a("plain.test", [127, 0, 0, 1]);
    https.well_known("plain.test", Reply { status: 200, headers: vec![], body: "<html>hello</html>".into() });
    // A well-known that would delegate, behind a certificate for another name: ignored.
    dns.a("wrong.test", [127, 0, 0, 1]);
    https.well_known("wrong.test", ok_json(r#"{"m.server": "evil.example:1"}"#));
    dns.add("wrong.test", RData::AAAA(rdata::AAAA("2a00::7".parse().unwrap())));

    let r = resolver(&dns, &https, true);
    let d = r.resolve(name("bad.test")).await.unwrap();
    assert_eq!(
        d,
        Destination {
            tls_name: "bad.test".into(),
            port: 8600,
            host_header: "bad.test".into(),
            addrs: vec![addr("5.0.0.5:8600")],
        }
    );
    let d = r.resolve(name("s5.example")).await.unwrap();
    assert_eq!(
        d,
        Destination {
            tls_name: "s5.example".into(),
            port: 8601,
            host_header: "s5.example".into(),
            addrs: vec![addr("5.0.0.6:8601")],
        }
    );
    let d = r.resolve(name("plain.test")).await.unwrap();
    assert_eq!(
        d,
        Destination {
            tls_name: "plain.test".into(),
            port: 8448,
            host_header: "plain.test".into(),
            addrs: vec![addr("127.0.0.1:8448")],
        }
    );
    let d = r.resolve(name("wrong.test")).await.unwrap();
    assert_eq!(d.tls_name, "wrong.test");
    assert_eq!(d.host_header, "wrong.test");
    assert!(d.addrs.iter().all(|a| a.port() == 8448), "{d:?}");
    // The TLS handshake with wrong.test failed before any request was made.
    assert!(!https.requests().iter().any(|(host, _)| host == "wrong.test"), "{:?}", https.requests());
    assert!(https.requests().iter().any(|(host, _)| host == "bad.test"));
}

#[tokio::test]
async fn well_known_redirects_are_followed_but_not_in_loops() {
    let (dns, https) = setup().await;
    dns.a("redirect.test", [127, 0, 0, 1]);
    dns.a("wk.test", [127, 0, 0, 1]);
    let redirect = |to: &str| Reply { status: 301, headers: vec![("Location".into(), to.into())], body: String::new() };
    https.well_known("redirect.test", redirect("https://wk.test/moved"));
    https.route("wk.test", "/moved", ok_json(r#"{"m.server": "moved.example:1234"}"#));
    dns.a("moved.example", [5, 0, 0, 7]);
    dns.a("loop.test", [127, 0, 0, 1]);
    https.well_known("loop.test", redirect("/a"));
    https.route("loop.test", "/a", redirect("/b"));
    https.route("loop.test", "/b", redirect("/a"));
    // A redirect to a loopback IP literal is refused without the switch.
    dns.a("private.test", [5, 0, 0, 8]);

    let r = resolver(&dns, &https, true);
    let d = r.resolve(name("redirect.test")).await.unwrap();
    assert_eq!((d.tls_name.as_str(), d.host_header.as_str()), ("moved.example", "moved.example:1234"));
    assert_eq!(d.addrs, [addr("5.0.0.7:1234")]);
    // The loop ends the well-known step: the name's own address on 8448.
    let d = r.resolve(name("loop.test")).await.unwrap();
    assert_eq!((d.tls_name.as_str(), d.addrs.as_slice()), ("loop.test", &[addr("127.0.0.1:8448")][..]));
    let loop_requests = https.requests().iter().filter(|(h, _)| h == "loop.test").count();
    assert_eq!(loop_requests, 3, "{:?}", https.requests());
}

#[tokio::test]
async fn concurrent_lookups_of_one_name_are_done_once() {
    let (dns, https) = setup().await;
    dns.a("srv.test", [127, 0, 0, 1]);
    https.well_known("srv.test", ok_json(r#"{"m.server": "fed.example"}"#));
    dns.srv("_matrix-fed._tcp.fed.example", 0, 0, 8500, "primary.example");
    dns.a("primary.example", [5, 0, 0, 1]);
    let r = Arc::new(resolver(&dns, &https, true));
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let r = r.clone();
            tokio::spawn(async move { r.resolve(name("srv.test")).await.unwrap() })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().addrs, [addr("5.0.0.1:8500")]);
    }
    assert_eq!(https.requests().len(), 1);
    assert_eq!(dns.asked("_matrix-fed._tcp.fed.example", RecordType::SRV), 1);
    assert_eq!(dns.asked("primary.example", RecordType::A), 1);
}

#[tokio::test]
async fn failures_are_backed_off_and_grow() {
    let (dns, https) = setup().await;
    let r = resolver(&dns, &https, true);
    let err = r.resolve(name("nowhere.example")).await.unwrap_err();
    assert!(err.to_string().contains("nowhere.example has no address"), "{err}");
    let queries = dns.query_count();
    assert!(queries > 0);
    // Within the backoff: the same error, and no query.
    let again = r.resolve(name("nowhere.example")).await.unwrap_err();
    assert_eq!(again.to_string(), err.to_string());
    assert_eq!(dns.query_count(), queries);
    let (wait, failures) = cached(&r, "nowhere.example").await.unwrap();
    assert_eq!(failures, 1);
    assert!(wait <= FAILURE_BACKOFF && wait > FAILURE_BACKOFF - Duration::from_secs(5), "{wait:?}");
    // After it: looked up again, failing again, and waiting twice as long.
    r.destinations.expire_all();
    r.well_known.expire_all();
    r.resolve(name("nowhere.example")).await.unwrap_err();
    assert!(dns.query_count() > queries);
    let (wait, failures) = cached(&r, "nowhere.example").await.unwrap();
    assert_eq!(failures, 2);
    assert!(wait > FAILURE_BACKOFF && wait <= 2 * FAILURE_BACKOFF, "{wait:?}");
    // Once it resolves, the count starts over.
    dns.a("nowhere.example", [5, 0, 0, 9]);
    r.destinations.expire_all();
    r.resolve(name("nowhere.example")).await.unwrap();
    assert_eq!(cached(&r, "nowhere.example").await.unwrap().1, 0);
}

#[tokio::test]
async fn private_addresses_are_refused_without_the_switch_whichever_step_found_them() {
    let (dns, https) = setup().await;
    // A `.well-known` on loopback that would delegate to a public address.
    dns.a("private.test", [127, 0, 0, 1]);
    https.well_known("private.test", ok_json(r#"{"m.server": "public.example:8448"}"#));
    dns.a("public.example", [5, 0, 0, 10]);
    // SRV targets: one private, one public.
    dns.srv("_matrix-fed._tcp.mixed.example", 0, 0, 8448, "lan.example");
    dns.srv("_matrix-fed._tcp.mixed.example", 1, 0, 8448, "wan.example");
    dns.a("lan.example", [192, 168, 1, 2]);
    dns.a("wan.example", [5, 0, 0, 11]);
    // Only private addresses behind an SRV record.
    dns.srv("_matrix-fed._tcp.lan-only.example", 0, 0, 8448, "lan.example");
    // An explicit port on a name with a private and a public address.
    dns.a("both.example", [10, 0, 0, 1]);
    dns.a("both.example", [5, 0, 0, 12]);

    let strict = resolver(&dns, &https, false);
    // The well-known host is on loopback: not even asked. Then its A record is refused.
    let err = strict.resolve(name("private.test")).await.unwrap_err();
    assert!(
        err.to_string().contains("private.test resolves only to non-public addresses (127.0.0.1)")
            && err.to_string().contains("allow_private_destinations"),
        "{err}"
    );
    assert!(https.requests().is_empty());
    let d = strict.resolve(name("mixed.example")).await.unwrap();
    assert_eq!(d.addrs, [addr("5.0.0.11:8448")]);
    let err = strict.resolve(name("lan-only.example")).await.unwrap_err();
    assert!(err.to_string().contains("non-public addresses (192.168.1.2)"), "{err}");
    let d = strict.resolve(name("both.example:8448")).await.unwrap();
    assert_eq!(d.addrs, [addr("5.0.0.12:8448")]);

    let lax = resolver(&dns, &https, true);
    let d = lax.resolve(name("private.test")).await.unwrap();
    assert_eq!(d.addrs, [addr("5.0.0.10:8448")]);
    assert_eq!(https.requests(), [("private.test".to_owned(), "/.well-known/matrix/server".to_owned())]);
    let d = lax.resolve(name("lan-only.example")).await.unwrap();
    assert_eq!(d.addrs, [addr("192.168.1.2:8448")]);
    let d = lax.resolve(name("both.example:8448")).await.unwrap();
    assert_eq!(d.addrs.len(), 2);
}

/// How long the resolver keeps `hostname`'s `.well-known` answer, and its failure count.
async fn well_known_cached(resolver: &Resolver, hostname: &str) -> (Duration, u32) {
    let slot = resolver.well_known.slot(&hostname.to_owned());
    let entry = slot.lock().await;
    let entry = entry.as_ref().unwrap();
    (entry.expires.saturating_duration_since(Instant::now()), entry.failures)
}

#[tokio::test]
async fn well_known_errors_are_kept_an_hour_or_backed_off_when_they_may_pass() {
    let (dns, https) = setup().await;
    for host in ["bad.test", "wk.test", "plain.test"] {
        dns.a(host, [127, 0, 0, 1]);
    }
    // bad.test serves no `.well-known`: a definite "no delegation" (404).
    // A failure that may pass: 503.
    https.well_known("wk.test", Reply { status: 503, headers: vec![], body: String::new() });
    // A body over the bound, however valid: not a delegation.
    let padding = " ".repeat(well_known::MAX_BODY);
    https.well_known("plain.test", ok_json(&format!(r#"{{"m.server": "evil.example:1"{padding}}}"#)));
    let r = resolver(&dns, &https, true);
    for host in ["bad.test", "wk.test", "plain.test"] {
        let d = r.resolve(name(host)).await.unwrap();
        assert_eq!((d.tls_name.as_str(), d.port), (host, DEFAULT_PORT), "{d:?}");
    }
    let hour = well_known::INVALID_TTL;
    let (ttl, _) = well_known_cached(&r, "bad.test").await;
    assert!(ttl > hour - Duration::from_secs(10) && ttl <= hour, "{ttl:?}");
    let (ttl, _) = well_known_cached(&r, "plain.test").await;
    assert!(ttl > hour - Duration::from_secs(10) && ttl <= hour, "{ttl:?}");
    let (ttl, failures) = well_known_cached(&r, "wk.test").await;
    assert_eq!(failures, 1);
    assert!(ttl <= well_known::TRANSIENT_TTL && ttl > well_known::TRANSIENT_TTL / 2, "{ttl:?}");
    // Failing again: kept twice as long; answering again: kept as its headers say.
    r.destinations.expire_all();
    r.well_known.expire_all();
    r.resolve(name("wk.test")).await.unwrap();
    let (ttl, failures) = well_known_cached(&r, "wk.test").await;
    assert_eq!(failures, 2);
    assert!(ttl > well_known::TRANSIENT_TTL && ttl <= 2 * well_known::TRANSIENT_TTL, "{ttl:?}");
    https.well_known("wk.test", ok_json(r#"{"m.server": "target.example:8450"}"#));
    dns.a("target.example", [5, 6, 7, 9]);
    r.destinations.expire_all();
    r.well_known.expire_all();
    assert_eq!(r.resolve(name("wk.test")).await.unwrap().tls_name, "target.example");
    let (ttl, failures) = well_known_cached(&r, "wk.test").await;
    assert_eq!(failures, 0);
    assert!(ttl > well_known::DEFAULT_TTL - Duration::from_secs(10), "{ttl:?}");
}

#[tokio::test]
async fn an_srv_target_of_dot_means_no_federation() {
    let (dns, https) = setup().await;
    dns.srv("_matrix-fed._tcp.closed.example", 0, 0, 0, "");
    dns.a("closed.example", [5, 0, 0, 13]);
    let r = resolver(&dns, &https, true);
    let err = r.resolve(name("closed.example")).await.unwrap_err();
    assert!(err.to_string().contains("offers no federation"), "{err}");
}
