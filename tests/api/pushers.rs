//! Pushers, `/notifications` and the HTTP pusher, with a small push gateway on
//! loopback (an axum listener in the test) recording what it receives.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, Ordering},
    },
    time::Duration,
};

use axum::{Json, Router, extract::State, routing::post};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::{
    backend_tests,
    common::{Backend, PASSWORD, TestServer, assert_error},
};

const NOTIFY: &str = "/_matrix/push/v1/notify";

/// How the test gateway answers.
const ACCEPT: u8 = 0;
const FAIL: u8 = 1;
const REJECT: u8 = 2;
/// Holds each request until `release` is notified.
const HANG: u8 = 3;

/// A push gateway on loopback: every request's body is recorded with whether it was
/// accepted.
#[derive(Clone)]
struct Gateway {
    addr: SocketAddr,
    inner: Arc<GatewayState>,
}

struct GatewayState {
    mode: AtomicU8,
    /// (body, accepted) of every request, in arrival order.
    seen: Mutex<Vec<(Value, bool)>>,
    changed: Notify,
    release: Notify,
}

async fn notify(State(state): State<Arc<GatewayState>>, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
    let mode = state.mode.load(Ordering::SeqCst);
    if mode == HANG {
        state.seen.lock().unwrap().push((body.clone(), false));
        state.changed.notify_waiters();
        state.release.notified().await;
    }
    let accepted = mode != FAIL;
    if mode != HANG {
        state.seen.lock().unwrap().push((body.clone(), accepted));
        state.changed.notify_waiters();
    }
    match mode {
        FAIL => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": "down"}))),
        REJECT => {
            let keys: Vec<Value> = body["notification"]["devices"]
                .as_array()
                .map(|d| d.iter().map(|d| d["pushkey"].clone()).collect())
                .unwrap_or_default();
            (StatusCode::OK, Json(json!({"rejected": keys})))
        }
        _ => (StatusCode::OK, Json(json!({"rejected": []}))),
    }
}

impl Gateway {
    async fn start() -> Gateway {
        let inner = Arc::new(GatewayState {
            mode: AtomicU8::new(ACCEPT),
            seen: Mutex::new(Vec::new()),
            changed: Notify::new(),
            release: Notify::new(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route(NOTIFY, post(notify)).with_state(inner.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Gateway { addr, inner }
    }

    fn url(&self) -> String {
        format!("http://{}{NOTIFY}", self.addr)
    }

    fn set_mode(&self, mode: u8) {
        self.inner.mode.store(mode, Ordering::SeqCst);
    }

    fn seen(&self) -> Vec<(Value, bool)> {
        self.inner.seen.lock().unwrap().clone()
    }

    /// The accepted notifications.
    fn delivered(&self) -> Vec<Value> {
        self.seen().into_iter().filter(|(_, ok)| *ok).map(|(b, _)| b["notification"].clone()).collect()
    }

    /// Waits (at most 10 s) until what the gateway saw satisfies `done`.
    async fn wait_until(&self, what: &str, done: impl Fn(&[(Value, bool)]) -> bool) {
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let changed = self.inner.changed.notified();
                if done(&self.seen()) {
                    return;
                }
                changed.await;
            }
        });
        waited.await.unwrap_or_else(|_| panic!("the gateway did not see {what} within 10 s: {:?}", self.seen()));
    }

    /// Waits until a notification about `event_id` was accepted; answers it.
    async fn wait_for_event(&self, event_id: &str) -> Value {
        self.wait_until(&format!("a push of {event_id}"), |seen| {
            seen.iter().any(|(b, ok)| *ok && b["notification"]["event_id"] == event_id)
        })
        .await;
        self.delivered().into_iter().find(|n| n["event_id"] == event_id).unwrap()
    }
}

/// A server whose pushers may reach loopback, with quick retries.
async fn push_server(backend: Backend, max_attempts: u32) -> TestServer {
    TestServer::start_with(backend, |c| {
        c.push.allow_private_destinations = true;
        c.push.retry_initial_ms = 50;
        c.push.max_retry_interval_ms = 200;
        c.push.request_timeout_ms = 5_000;
        c.push.max_attempts = max_attempts;
    })
    .await
}

fn pusher(url: &str, app_id: &str, pushkey: &str) -> Value {
    json!({
        "kind": "http", "app_id": app_id, "pushkey": pushkey, "app_display_name": "Test App",
        "device_display_name": "Phone", "lang": "en", "data": {"url": url},
    })
}

async fn set_pusher(server: &TestServer, token: &str, body: Value) {
    let (status, answer) = server.post("/_matrix/client/v3/pushers/set", Some(token), body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}

async fn pushers(server: &TestServer, token: &str) -> Vec<Value> {
    let (status, body) = server.get("/_matrix/client/v3/pushers", Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["pushers"].as_array().unwrap().clone()
}

/// Waits (at most 10 s) until the user's pushers number `n`.
async fn wait_for_pushers(server: &TestServer, token: &str, n: usize) {
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        let mut interval = tokio::time::interval(Duration::from_millis(20));
        loop {
            interval.tick().await;
            if pushers(server, token).await.len() == n {
                return;
            }
        }
    });
    waited.await.unwrap_or_else(|_| panic!("the user did not have {n} pushers within 10 s"));
}

async fn pushers_are_set_listed_replaced_and_removed(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    let url = "https://push.example.org/_matrix/push/v1/notify";
    let mut body = pusher(url, "org.example.app", "key-1");
    body["data"]["format"] = json!("event_id_only");
    body["data"]["custom"] = json!({"a": 1});
    body["profile_tag"] = json!("tag");
    set_pusher(&server, &alice, body.clone()).await;
    let listed = pushers(&server, &alice).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["pushkey"], "key-1");
    assert_eq!(listed[0]["kind"], "http");
    assert_eq!(listed[0]["app_display_name"], "Test App");
    assert_eq!(listed[0]["profile_tag"], "tag");
    assert_eq!(listed[0]["data"], json!({"url": url, "format": "event_id_only", "custom": {"a": 1}}));
    assert!(pushers(&server, &bob).await.is_empty(), "pushers are per user");

    // The same app id and pushkey again replaces it.
    body["device_display_name"] = json!("Tablet");
    set_pusher(&server, &alice, body.clone()).await;
    let listed = pushers(&server, &alice).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["device_display_name"], "Tablet");

    // Another user setting the same pair with `append: true` keeps alice's; without
    // it, alice's goes.
    let mut appended = pusher(url, "org.example.app", "key-1");
    appended["append"] = json!(true);
    set_pusher(&server, &bob, appended).await;
    assert_eq!((pushers(&server, &alice).await.len(), pushers(&server, &bob).await.len()), (1, 1));
    set_pusher(&server, &bob, pusher(url, "org.example.app", "key-1")).await;
    assert_eq!((pushers(&server, &alice).await.len(), pushers(&server, &bob).await.len()), (0, 1));

    // `kind: null` deletes (also one that does not exist, quietly).
    set_pusher(&server, &alice, pusher(url, "org.example.app", "key-2")).await;
    set_pusher(&server, &alice, json!({"kind": null, "app_id": "org.example.app", "pushkey": "key-2"})).await;
    set_pusher(&server, &alice, json!({"kind": null, "app_id": "org.example.app", "pushkey": "nope"})).await;
    assert!(pushers(&server, &alice).await.is_empty());
    assert_eq!(pushers(&server, &bob).await.len(), 1);
    server.stop().await;
}

async fn bad_pushers_are_refused(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let set = |body: Value| server.post("/_matrix/client/v3/pushers/set", Some(&alice), body);
    for url in [
        "https://push.example.org/notify",
        "https://push.example.org/_matrix/push/v1/notify/extra",
        "ftp://push.example.org/_matrix/push/v1/notify",
        "not a url",
        "",
        // Loopback and private addresses, unless push.allow_private_destinations.
        "http://127.0.0.1:5000/_matrix/push/v1/notify",
        "https://[::1]/_matrix/push/v1/notify",
        "https://10.1.2.3/_matrix/push/v1/notify",
        "https://localhost/_matrix/push/v1/notify",
    ] {
        let result = set(pusher(url, "org.example.app", "k")).await;
        assert_error(&result, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    }
    // An http pusher without `data.url`, or without the fields a pusher needs.
    let mut no_url = pusher("https://push.example.org/_matrix/push/v1/notify", "org.example.app", "k");
    no_url["data"] = json!({"format": "event_id_only"});
    let result = set(no_url).await;
    assert_eq!(result.0, StatusCode::BAD_REQUEST, "{}", result.1);
    assert!(matches!(result.1["errcode"].as_str(), Some("M_BAD_JSON" | "M_MISSING_PARAM")), "{}", result.1);
    let result = set(json!({"kind": "http", "app_id": "a", "pushkey": "k", "data": {"url": "https://push.example.org/_matrix/push/v1/notify"}})).await;
    assert_eq!(result.0, StatusCode::BAD_REQUEST, "{}", result.1);
    let long_app = pusher("https://push.example.org/_matrix/push/v1/notify", &"a".repeat(65), "k");
    assert_error(&set(long_app).await, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let long_key = pusher("https://push.example.org/_matrix/push/v1/notify", "org.example.app", &"k".repeat(513));
    assert_error(&set(long_key).await, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    // An email pusher needs an email address bound to the account: there is none.
    let email = json!({"kind": "email", "app_id": "m.email", "pushkey": "alice@example.org",
        "app_display_name": "Email", "device_display_name": "Email", "lang": "en", "data": {}});
    assert_error(&set(email).await, StatusCode::BAD_REQUEST, "M_THREEPID_NOT_FOUND");
    let other = json!({"kind": "carrier-pigeon", "app_id": "a", "pushkey": "k",
        "app_display_name": "x", "device_display_name": "x", "lang": "en", "data": {}});
    assert_error(&set(other).await, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    assert!(pushers(&server, &alice).await.is_empty(), "nothing refused was kept");
    server.stop().await;
}

async fn pushers_go_with_their_device(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (phone, _) = server.login("alice", None).await;
    let (tablet, tablet_device) = server.login("alice", None).await;
    let url = "https://push.example.org/_matrix/push/v1/notify";
    set_pusher(&server, &alice, pusher(url, "app", "first")).await;
    set_pusher(&server, &phone, pusher(url, "app", "phone")).await;
    set_pusher(&server, &tablet, pusher(url, "app", "tablet")).await;
    assert_eq!(pushers(&server, &alice).await.len(), 3);

    // Logging out removes the pushers that device's token set.
    let (status, _) = server.post("/_matrix/client/v3/logout", Some(&phone), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let keys: Vec<Value> = pushers(&server, &alice).await.iter().map(|p| p["pushkey"].clone()).collect();
    assert_eq!(keys, [json!("first"), json!("tablet")]);

    // So does deleting the device.
    let (status, body) = server
        .request(
            Method::DELETE,
            &format!("/_matrix/client/v3/devices/{tablet_device}"),
            Some(&alice),
            Some(json!({"auth": {"type": "m.login.password", "password": PASSWORD,
                "identifier": {"type": "m.id.user", "user": "alice"}}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let keys: Vec<Value> = pushers(&server, &alice).await.iter().map(|p| p["pushkey"].clone()).collect();
    assert_eq!(keys, [json!("first")]);
    server.stop().await;
}

/// Users setting the same app id and pushkey at once, without `append`: one of them
/// keeps it, never several.
async fn concurrent_pusher_sets_leave_one_owner(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut tokens = Vec::new();
    for i in 0..6 {
        tokens.push(server.register(&format!("user{i}")).await.1);
    }
    let url = "https://push.example.org/_matrix/push/v1/notify";
    for round in 0..3 {
        let key = format!("shared-{round}");
        let sets =
            tokens.iter().map(|t| server.post("/_matrix/client/v3/pushers/set", Some(t), pusher(url, "app", &key)));
        for (status, body) in futures_util::future::join_all(sets).await {
            assert_eq!(status, StatusCode::OK, "{body}");
        }
        let mut owners = 0;
        for t in &tokens {
            owners += pushers(&server, t).await.iter().filter(|p| p["pushkey"] == key.as_str()).count();
        }
        assert_eq!(owners, 1, "round {round}: the pushkey has one owner");
    }
    server.stop().await;
}

/// At most `push.max_pushers_per_user` pushers per account, also when set at once.
async fn pushers_per_user_are_bounded(backend: Backend) {
    let server = TestServer::start_with(backend, |c| c.push.max_pushers_per_user = 3).await;
    let (_, alice, _) = server.register("alice").await;
    let url = "https://push.example.org/_matrix/push/v1/notify";
    let sets = (0..6)
        .map(|i| server.post("/_matrix/client/v3/pushers/set", Some(&alice), pusher(url, "app", &format!("k{i}"))));
    let results = futures_util::future::join_all(sets).await;
    let ok = results.iter().filter(|r| r.0 == StatusCode::OK).count();
    assert_eq!(ok, 3, "{results:?}");
    for result in results.iter().filter(|r| r.0 != StatusCode::OK) {
        assert_error(result, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    }
    let listed = pushers(&server, &alice).await;
    assert_eq!(listed.len(), 3);
    // Replacing one of them is not one more.
    let key = listed[0]["pushkey"].as_str().unwrap();
    set_pusher(&server, &alice, pusher(url, "app", key)).await;
    set_pusher(&server, &alice, json!({"kind": null, "app_id": "app", "pushkey": key})).await;
    set_pusher(&server, &alice, pusher(url, "app", "k-new")).await;
    assert_eq!(pushers(&server, &alice).await.len(), 3);
    server.stop().await;
}

async fn a_message_is_pushed_to_the_gateway(backend: Backend) {
    let gateway = Gateway::start().await;
    let server = push_server(backend, 30).await;
    let (_, alice, _) = server.register("alice").await;
    let (bob_id, bob, _) = server.register("bob").await;
    let room_id = server.create_room(&alice, json!({"invite": [bob_id], "name": "Lunch", "is_direct": true})).await;
    server.join(&bob, &room_id).await;
    let (status, _) = server
        .put(
            "/_matrix/client/v3/profile/@alice:localhost/displayname",
            Some(&alice),
            json!({"displayname": "Alice A."}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let mut body = pusher(&gateway.url(), "org.example.app", "bob-key");
    body["data"]["extra"] = json!("for the gateway");
    set_pusher(&server, &bob, body).await;

    // A message in a one-to-one room: notify with a sound, so high priority.
    let event_id = server.send_text(&alice, &room_id, "hello bob").await;
    let n = gateway.wait_for_event(&event_id).await;
    assert_eq!(n["room_id"], room_id.as_str(), "{n}");
    assert_eq!(n["type"], "m.room.message", "{n}");
    assert_eq!(n["sender"], "@alice:localhost", "{n}");
    assert_eq!(n["sender_display_name"], "Alice A.", "{n}");
    assert_eq!(n["room_name"], "Lunch", "{n}");
    assert_eq!(n["content"], json!({"msgtype": "m.text", "body": "hello bob"}), "{n}");
    assert_eq!(n["counts"]["unread"], 1, "{n}");
    assert!(n["prio"].is_null() || n["prio"] == "high", "{n}");
    let devices = n["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 1, "{n}");
    assert_eq!(devices[0]["app_id"], "org.example.app");
    assert_eq!(devices[0]["pushkey"], "bob-key");
    assert!(devices[0]["pushkey_ts"].as_u64().is_some_and(|ts| ts > 1_600_000_000), "seconds: {n}");
    assert_eq!(devices[0]["data"], json!({"extra": "for the gateway"}), "data without url: {n}");
    assert_eq!(devices[0]["tweaks"]["sound"], "default", "{n}");
    // Alice has no pusher; her own message is not pushed to bob's twice.
    let second = server.send_text(&alice, &room_id, "are you there?").await;
    let n = gateway.wait_for_event(&second).await;
    assert_eq!(n["counts"]["unread"], 2, "{n}");
    assert_eq!(gateway.delivered().iter().filter(|n| n["event_id"] == event_id.as_str()).count(), 1);

    // Bob reads: a push with the new badge count (zero: `counts` left out), no event.
    let before = gateway.seen().len();
    let (status, _) = server
        .post(&format!("/_matrix/client/v3/rooms/{room_id}/receipt/m.read/{second}"), Some(&bob), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    gateway.wait_until("a badge update", |seen| seen.len() > before).await;
    let badge = gateway.delivered().last().unwrap().clone();
    assert!(badge["event_id"].is_null(), "{badge}");
    assert!(badge["counts"]["unread"].is_null() || badge["counts"]["unread"] == 0, "{badge}");
    assert_eq!(badge["devices"][0]["pushkey"], "bob-key", "{badge}");

    // In a room of three, a plain message notifies without a sound: low priority.
    // And an `event_id_only` pusher gets ids and counts only.
    let (carol_id, carol, _) = server.register("carol").await;
    let group = server.create_room(&alice, json!({"invite": [bob_id, carol_id]})).await;
    server.join(&bob, &group).await;
    server.join(&carol, &group).await;
    let mut only_ids = pusher(&gateway.url(), "org.example.app", "bob-ids");
    only_ids["data"]["format"] = json!("event_id_only");
    set_pusher(&server, &bob, only_ids).await;
    let plain = server.send_text(&alice, &group, "hi all").await;
    gateway
        .wait_until("both pushers' pushes", |seen| {
            seen.iter().filter(|(b, ok)| *ok && b["notification"]["event_id"] == plain.as_str()).count() == 2
        })
        .await;
    let pushes: Vec<Value> = gateway.delivered().into_iter().filter(|n| n["event_id"] == plain.as_str()).collect();
    for n in &pushes {
        assert_eq!(n["prio"], "low", "{n}");
        assert_eq!(n["room_id"], group.as_str(), "{n}");
        assert_eq!(n["counts"]["unread"], 1, "{n}");
    }
    let ids_only = pushes.iter().find(|n| n["devices"][0]["pushkey"] == "bob-ids").unwrap();
    assert!(ids_only["content"].is_null() && ids_only["sender"].is_null() && ids_only["type"].is_null(), "{ids_only}");
    assert_eq!(ids_only["devices"][0]["data"], json!({"format": "event_id_only"}), "{ids_only}");
    let full = pushes.iter().find(|n| n["devices"][0]["pushkey"] == "bob-key").unwrap();
    assert_eq!(full["content"]["body"], "hi all", "{full}");
    server.stop().await;
}

async fn a_rejected_pushkey_removes_the_pusher(backend: Backend) {
    let gateway = Gateway::start().await;
    let server = push_server(backend, 30).await;
    let (_, alice, _) = server.register("alice").await;
    let (bob_id, bob, _) = server.register("bob").await;
    let room_id = server.create_room(&alice, json!({"invite": [bob_id]})).await;
    server.join(&bob, &room_id).await;
    set_pusher(&server, &bob, pusher(&gateway.url(), "app", "stale-key")).await;
    gateway.set_mode(REJECT);
    let event_id = server.send_text(&alice, &room_id, "anyone?").await;
    gateway.wait_for_event(&event_id).await;
    wait_for_pushers(&server, &bob, 0).await;
    // Nothing more is sent to it.
    gateway.set_mode(ACCEPT);
    let seen = gateway.seen().len();
    let next = server.send_text(&alice, &room_id, "still there?").await;
    // The message is stored and counted; the gateway hears nothing (a new pusher on the
    // same gateway does, which shows the pushes have gone through by then).
    set_pusher(&server, &bob, pusher(&gateway.url(), "app", "fresh-key")).await;
    let after = server.send_text(&alice, &room_id, "hello again").await;
    gateway.wait_for_event(&after).await;
    assert!(gateway.seen()[seen..].iter().all(|(b, _)| b["notification"]["event_id"] != next.as_str()));
    assert!(gateway.seen()[seen..].iter().all(|(b, _)| b["notification"]["devices"][0]["pushkey"] == "fresh-key"));
    server.stop().await;
}

/// Pushes queued while the gateway is down are retried, survive a restart of the
/// server, and arrive in order once it is back.
async fn queued_pushes_survive_a_restart(backend: Backend) {
    let gateway = Gateway::start().await;
    let mut server = push_server(backend, 1000).await;
    let (_, alice, _) = server.register("alice").await;
    let (bob_id, bob, _) = server.register("bob").await;
    let room_id = server.create_room(&alice, json!({"invite": [bob_id]})).await;
    server.join(&bob, &room_id).await;
    set_pusher(&server, &bob, pusher(&gateway.url(), "app", "bob-key")).await;
    gateway.set_mode(FAIL);
    let first = server.send_text(&alice, &room_id, "one").await;
    let second = server.send_text(&alice, &room_id, "two").await;
    gateway.wait_until("retries of the first push", |seen| seen.len() >= 2).await;
    assert!(gateway.delivered().is_empty());

    server.restart().await;
    gateway.set_mode(ACCEPT);
    let first_push = gateway.wait_for_event(&first).await;
    gateway.wait_for_event(&second).await;
    let order: Vec<Value> = gateway.delivered().iter().map(|n| n["event_id"].clone()).collect();
    assert_eq!(order, [json!(first), json!(second)], "in order, once each");
    assert_eq!(first_push["content"]["body"], "one");
    server.stop().await;
}

/// A push that keeps failing is given up after `push.max_attempts`; the next one goes.
async fn a_failing_push_is_given_up_after_its_attempts(backend: Backend) {
    let gateway = Gateway::start().await;
    let server = push_server(backend, 3).await;
    let (_, alice, _) = server.register("alice").await;
    let (bob_id, bob, _) = server.register("bob").await;
    let room_id = server.create_room(&alice, json!({"invite": [bob_id]})).await;
    server.join(&bob, &room_id).await;
    set_pusher(&server, &bob, pusher(&gateway.url(), "app", "bob-key")).await;
    gateway.set_mode(FAIL);
    let doomed = server.send_text(&alice, &room_id, "lost").await;
    gateway.wait_until("three attempts", |seen| seen.len() >= 3).await;
    gateway.set_mode(ACCEPT);
    let next = server.send_text(&alice, &room_id, "found").await;
    gateway.wait_for_event(&next).await;
    let attempts = gateway.seen().iter().filter(|(b, _)| b["notification"]["event_id"] == doomed.as_str()).count();
    assert_eq!(attempts, 3, "bounded by push.max_attempts: {:?}", gateway.seen());
    assert!(gateway.delivered().iter().all(|n| n["event_id"] != doomed.as_str()));
    assert_eq!(pushers(&server, &bob).await.len(), 1, "a failing gateway does not lose the pusher");
    server.stop().await;
}

/// A gateway that does not answer holds up only its own pusher.
async fn a_slow_gateway_does_not_delay_others(backend: Backend) {
    let slow = Gateway::start().await;
    let fast = Gateway::start().await;
    let server = push_server(backend, 30).await;
    let (_, alice, _) = server.register("alice").await;
    let (bob_id, bob, _) = server.register("bob").await;
    let room_id = server.create_room(&alice, json!({"invite": [bob_id]})).await;
    server.join(&bob, &room_id).await;
    set_pusher(&server, &bob, pusher(&slow.url(), "app", "slow-key")).await;
    set_pusher(&server, &bob, pusher(&fast.url(), "app", "fast-key")).await;
    slow.set_mode(HANG);
    let first = server.send_text(&alice, &room_id, "one").await;
    slow.wait_until("the first push", |seen| !seen.is_empty()).await;
    let second = server.send_text(&alice, &room_id, "two").await;
    fast.wait_for_event(&first).await;
    fast.wait_for_event(&second).await;
    assert!(slow.delivered().is_empty(), "the slow gateway still holds the first push: {:?}", slow.seen());
    slow.set_mode(ACCEPT);
    slow.inner.release.notify_one();
    slow.wait_for_event(&second).await;
    server.stop().await;
}

async fn notifications_list_what_notified(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (_, alice, _) = server.register("alice").await;
    let (bob_id, bob, _) = server.register("bob").await;
    let room_id = server.create_room(&alice, json!({"invite": [bob_id]})).await;
    server.join(&bob, &room_id).await;
    let plain = server.send_text(&alice, &room_id, "hello").await;
    let (status, body) = server
        .put(
            &format!("/_matrix/client/v3/rooms/{room_id}/send/m.room.message/m1"),
            Some(&alice),
            json!({"msgtype": "m.text", "body": "bob!", "m.mentions": {"user_ids": ["@bob:localhost"]}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mention = body["event_id"].as_str().unwrap().to_owned();
    let last = server.send_text(&alice, &room_id, "bye").await;
    let (status, _) =
        server.post(&format!("/_matrix/client/v3/rooms/{room_id}/receipt/m.read/{plain}"), Some(&bob), json!({})).await;
    assert_eq!(status, StatusCode::OK);

    let (status, body) = server.get("/_matrix/client/v3/notifications", Some(&bob)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let list = body["notifications"].as_array().unwrap();
    let ids: Vec<&str> = list.iter().map(|n| n["event"]["event_id"].as_str().unwrap()).collect();
    assert_eq!(ids, [last.as_str(), mention.as_str(), plain.as_str()], "newest first: {body}");
    assert!(body["next_token"].is_null(), "{body}");
    let reads: Vec<bool> = list.iter().map(|n| n["read"].as_bool().unwrap()).collect();
    assert_eq!(reads, [false, false, true], "read up to the receipt: {body}");
    for n in list {
        assert_eq!(n["room_id"], room_id.as_str());
        assert!(n["ts"].as_u64().is_some_and(|ts| ts > 1_600_000_000_000), "{n}");
        assert!(n["actions"].as_array().unwrap().contains(&json!("notify")), "{n}");
    }
    assert_eq!(list[1]["event"]["content"]["body"], "bob!");
    let highlights = |n: &Value| {
        n["actions"].as_array().unwrap().iter().any(|a| a["set_tweak"] == "highlight" && a["value"] != false)
    };
    assert_eq!(list.iter().map(highlights).collect::<Vec<_>>(), [false, true, false], "{body}");
    // Alice's own messages never notify her.
    let (_, mine) = server.get("/_matrix/client/v3/notifications", Some(&alice)).await;
    assert_eq!(mine["notifications"], json!([]));

    // only=highlight: the mention alone.
    let (_, body) = server.get("/_matrix/client/v3/notifications?only=highlight", Some(&bob)).await;
    let ids: Vec<&str> =
        body["notifications"].as_array().unwrap().iter().map(|n| n["event"]["event_id"].as_str().unwrap()).collect();
    assert_eq!(ids, [mention.as_str()], "{body}");

    // Pages: limit and next_token, to the end.
    let mut seen = Vec::new();
    let mut from: Option<String> = None;
    for _ in 0..5 {
        let path = match &from {
            Some(token) => format!("/_matrix/client/v3/notifications?limit=1&from={token}"),
            None => "/_matrix/client/v3/notifications?limit=1".to_owned(),
        };
        let (status, body) = server.get(&path, Some(&bob)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        for n in body["notifications"].as_array().unwrap() {
            seen.push(n["event"]["event_id"].as_str().unwrap().to_owned());
        }
        match body["next_token"].as_str() {
            Some(token) => from = Some(token.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, [last.clone(), mention.clone(), plain.clone()]);
    assert_error(
        &server.get("/_matrix/client/v3/notifications?from=yesterday", Some(&bob)).await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_PARAM",
    );
    server.stop().await;
}

/// The badge (`counts`) of each push is the user's unread notifications across joined
/// rooms (as `/sync` counts them) and the missed calls among them: right after
/// messages, a read receipt, a redaction, a call invite, and leaving and rejoining
/// (counting then starts at the rejoin, not at the receipt before the leave).
async fn the_badge_follows_reads_redactions_calls_and_rejoins(backend: Backend) {
    let gateway = Gateway::start().await;
    let server = push_server(backend, 30).await;
    let (_, alice, _) = server.register("alice").await;
    let (_, bob, _) = server.register("bob").await;
    let room_id = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    server.join(&bob, &room_id).await;
    set_pusher(&server, &bob, pusher(&gateway.url(), "org.example.app", "bob-key")).await;
    let counts =
        |n: &Value| (n["counts"]["unread"].as_u64().unwrap_or(0), n["counts"]["missed_calls"].as_u64().unwrap_or(0));

    let first = server.send_text(&alice, &room_id, "one").await;
    assert_eq!(counts(&gateway.wait_for_event(&first).await), (1, 0));
    let (status, _) =
        server.post(&format!("/_matrix/client/v3/rooms/{room_id}/receipt/m.read/{first}"), Some(&bob), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let second = server.send_text(&alice, &room_id, "two").await;
    assert_eq!(counts(&gateway.wait_for_event(&second).await), (1, 0), "after the receipt");
    let third = server.send_text(&alice, &room_id, "three").await;
    assert_eq!(counts(&gateway.wait_for_event(&third).await), (2, 0));

    // A redacted message no longer counts.
    let (status, body) =
        server.put(&format!("/_matrix/client/v3/rooms/{room_id}/redact/{second}/r1"), Some(&alice), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let fourth = server.send_text(&alice, &room_id, "four").await;
    assert_eq!(counts(&gateway.wait_for_event(&fourth).await), (2, 0), "after the redaction");

    // A call invite counts, and as a missed call.
    let invite = json!({
        "call_id": "c1", "lifetime": 60_000, "version": "1", "party_id": "p1",
        "offer": {"type": "offer", "sdp": "v=0"},
    });
    let (status, body) =
        server.put(&format!("/_matrix/client/v3/rooms/{room_id}/send/m.call.invite/c1"), Some(&alice), invite).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let call = body["event_id"].as_str().unwrap().to_owned();
    assert_eq!(counts(&gateway.wait_for_event(&call).await), (3, 1), "with the call");
    let fifth = server.send_text(&alice, &room_id, "five").await;
    assert_eq!(counts(&gateway.wait_for_event(&fifth).await), (4, 1));

    // Bob leaves (his unread there go) and comes back: counting starts at the rejoin.
    server.leave(&bob, &room_id).await;
    server.join(&bob, &room_id).await;
    let sixth = server.send_text(&alice, &room_id, "six").await;
    assert_eq!(counts(&gateway.wait_for_event(&sixth).await), (1, 0), "after the rejoin");
    let sync = server.sync(&bob, None, "").await;
    assert_eq!(sync["rooms"]["join"][room_id.as_str()]["unread_notifications"]["notification_count"], 1, "{sync}");
    server.stop().await;
}

backend_tests!(
    pushers_are_set_listed_replaced_and_removed,
    bad_pushers_are_refused,
    pushers_go_with_their_device,
    concurrent_pusher_sets_leave_one_owner,
    pushers_per_user_are_bounded,
    a_message_is_pushed_to_the_gateway,
    a_rejected_pushkey_removes_the_pusher,
    queued_pushes_survive_a_restart,
    a_failing_push_is_given_up_after_its_attempts,
    a_slow_gateway_does_not_delay_others,
    notifications_list_what_notified,
    the_badge_follows_reads_redactions_calls_and_rejoins,
);
