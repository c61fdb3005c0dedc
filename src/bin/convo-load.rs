//! `convo-load`: a small load generator for any Matrix homeserver (Convo, Synapse, ...).
//!
//! It registers fresh users, then runs bounded scenarios against the client-server API and prints a table (and, with
//! `--json FILE`, the same figures as JSON):
//!
//! - `sends`: N users in one room (or `--sends-rooms` rooms), C concurrent senders, a
//!   fixed number of messages; sends per second and send latency p50/p99.
//! - `fanout`: 50 users in 10 rooms of 5, every user long-polling `/sync`
//!   (timeout 30000, small timeline limit), messages sent open-loop at fixed rates for
//!   a fixed duration; send-to-sync delivery latency per recipient (from the start of
//!   the send request to the return of the `/sync` that contains the event, sender
//!   excluded) and delivered/expected. Only acknowledged sends are expected; limited
//!   timelines (messages a client would have to page back for), presence updates and
//!   deliveries slower than 50 ms (with when they were sent) are counted too.
//! - `initial-sync`: one user in R rooms of M messages; time of a full initial `/sync`
//!   (several repetitions, median).
//! - `messages`: pages of 50 backwards over a room with many messages; pages per second.
//! - `federation-fanout` and `federation-join` (`federation.rs`): two homeservers
//!   (`--base-url` is A, `--remote-url` is B) federating; send-to-remote-sync latency,
//!   and the time for a user of B to join a large room of A.
//! - `large-room`, `sync-cpu` and the `--prefill-events` set-up phase (`scale.rs`):
//!   joins, sends and lazy-loading initial syncs in a room of 10,000 members against a
//!   room of 10; the server CPU of one woken incremental `/sync`; a long unread history
//!   for the measured users before the scenarios run.
//!
//! Users are registered with open registration (UIA `m.login.dummy`), or, given
//! `--registration-shared-secret` (`--remote-registration-shared-secret` for B), with
//! Synapse's shared-secret admin registration.
//!
//! With `--server-pid PID` each scenario also reports the server's CPU time
//! (utime+stime from /proc/PID/stat, before/after the measured phase), its peak RSS
//! during the phase (VmRSS sampled every 10 ms) and VmHWM (peak RSS since the server
//! started, setup included), plus the CPU time of the load tool itself and of every
//! other process on the machine during the phase (from /proc/stat), so that a busy
//! machine shows in the figures.
//! Every loop is bounded in count and in time; each scenario has an overall deadline.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use clap::Parser;
use serde_json::{Value, json};

#[path = "convo-load/federation.rs"]
mod federation;
#[path = "convo-load/media.rs"]
mod media;
#[path = "convo-load/scale.rs"]
mod scale;
#[path = "convo-load/search.rs"]
mod search;

const PASSWORD: &str = "Correct-Horse-42";

#[derive(Parser, Debug, Clone)]
#[command(about = "Load generator for Matrix homeservers (sends, sync fan-out, initial sync, /messages)")]
struct Args {
    /// Base URL of the homeserver's client API.
    #[arg(long, default_value = "http://127.0.0.1:8008")]
    base_url: String,
    /// PID of the server process, for CPU time and peak RSS from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// A label for the report (e.g. "convo" or "synapse").
    #[arg(long, default_value = "server")]
    label: String,
    /// Scenarios to run, comma separated: sends, fanout, initial-sync, messages,
    /// federation-fanout, federation-join (the last two need `--remote-url`), search,
    /// media, large-room, sync-cpu, request-floor.
    #[arg(long, value_delimiter = ',', default_value = "sends,fanout,initial-sync,messages")]
    scenarios: Vec<String>,
    /// Synapse's `registration_shared_secret` of the server at `--base-url`: register
    /// through `/_synapse/admin/v1/register` instead of open registration.
    #[arg(long)]
    registration_shared_secret: Option<String>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<String>,
    /// Hard deadline of each scenario (setup included), in seconds.
    #[arg(long, default_value_t = 180)]
    scenario_timeout: u64,
    /// Concurrent registrations during setup.
    #[arg(long, default_value_t = 4)]
    register_concurrency: usize,

    /// sends: users in the room.
    #[arg(long, default_value_t = 8)]
    sends_users: usize,
    /// sends: rooms the messages go to (sender i sends into room i % rooms). 1 is the
    /// target's scenario; more rooms show how much the per-room ordering costs.
    #[arg(long, default_value_t = 1)]
    sends_rooms: usize,
    /// sends: concurrent senders.
    #[arg(long, default_value_t = 8)]
    sends_concurrency: usize,
    /// sends: messages to send.
    #[arg(long, default_value_t = 2000)]
    sends_count: usize,
    /// sends: stop sending after this many seconds even if the count is not reached.
    #[arg(long, default_value_t = 60)]
    sends_max_seconds: u64,

    /// fanout: message rates to run, messages per second, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "5,20,100")]
    fanout_rates: Vec<f64>,
    /// fanout: seconds of sending at each rate.
    #[arg(long, default_value_t = 10)]
    fanout_seconds: u64,
    /// fanout: number of rooms.
    #[arg(long, default_value_t = 10)]
    fanout_rooms: usize,
    /// fanout: users per room (each user is in one room).
    #[arg(long, default_value_t = 5)]
    fanout_room_size: usize,
    /// fanout: timeline limit in the sync filter.
    #[arg(long, default_value_t = 10)]
    fanout_timeline_limit: u32,
    /// fanout: seconds to wait for late deliveries after the last send.
    #[arg(long, default_value_t = 5)]
    fanout_drain_seconds: u64,
    /// fanout: lazy-load room members in the sync filter, as Element does (in a large
    /// room an initial sync then carries only the members the timeline needs).
    #[arg(long)]
    fanout_lazy_members: bool,

    /// initial-sync: rooms the user is in.
    #[arg(long, default_value_t = 20)]
    initial_rooms: usize,
    /// initial-sync: messages per room.
    #[arg(long, default_value_t = 50)]
    initial_messages: usize,
    /// initial-sync: repetitions (the median is reported).
    #[arg(long, default_value_t = 10)]
    initial_reps: usize,

    /// messages: messages in the room that is paginated.
    #[arg(long, default_value_t = 1000)]
    messages_fill: usize,
    /// messages: events per page.
    #[arg(long, default_value_t = 50)]
    messages_page: usize,
    /// messages: most pages to fetch.
    #[arg(long, default_value_t = 5000)]
    messages_pages: usize,
    /// messages: most seconds of paginating.
    #[arg(long, default_value_t = 10)]
    messages_seconds: u64,
    /// messages: concurrent paginating clients.
    #[arg(long, default_value_t = 1)]
    messages_concurrency: usize,

    #[command(flatten)]
    fed: federation::FedArgs,

    #[command(flatten)]
    search: search::SearchArgs,

    #[command(flatten)]
    media: media::MediaArgs,

    #[command(flatten)]
    scale: scale::ScaleArgs,
}

type Res<T> = Result<T, String>;

#[derive(Clone, Debug)]
struct User {
    user_id: String,
    token: String,
}

#[derive(Clone)]
struct Api {
    http: reqwest::Client,
    base: String,
    /// Synapse's registration shared secret, when registration goes through its admin API.
    shared_secret: Option<String>,
}

fn enc(s: &str) -> String {
    // Percent-encode everything but unreserved characters (path segments, query values).
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Api {
    /// One request; retries (bounded) on 429 after the server's retry_after_ms.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Res<(u16, Value)> {
        let url = format!("{}{}", self.base, path);
        for _attempt in 0..20 {
            let mut req = self.http.request(method.clone(), &url);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = req.send().await.map_err(|e| format!("{method} {path}: {e}"))?;
            let status = resp.status().as_u16();
            let bytes = resp.bytes().await.map_err(|e| format!("{method} {path}: body: {e}"))?;
            let value: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&bytes)}))
            };
            if status == 429 {
                let wait = value["retry_after_ms"].as_u64().unwrap_or(500).min(5000);
                tokio::time::sleep(Duration::from_millis(wait)).await;
                continue;
            }
            return Ok((status, value));
        }
        Err(format!("{method} {path}: still rate limited after 20 attempts"))
    }

    async fn ok(&self, method: reqwest::Method, path: &str, token: Option<&str>, body: Option<&Value>) -> Res<Value> {
        let (status, v) = self.call(method.clone(), path, token, body).await?;
        if status != 200 {
            return Err(format!("{method} {path}: HTTP {status}: {v}"));
        }
        Ok(v)
    }

    async fn register(&self, username: &str) -> Res<User> {
        if let Some(secret) = &self.shared_secret {
            return self.register_with_shared_secret(username, secret).await;
        }
        let mut body = json!({
            "username": username,
            "password": PASSWORD,
            "initial_device_display_name": "convo-load",
        });
        let path = "/_matrix/client/v3/register";
        let (status, v) = self.call(reqwest::Method::POST, path, None, Some(&body)).await?;
        let v = match status {
            200 => v,
            401 => {
                let mut auth = json!({"type": "m.login.dummy"});
                if let Some(s) = v["session"].as_str() {
                    auth["session"] = json!(s);
                }
                body["auth"] = auth;
                self.ok(reqwest::Method::POST, path, None, Some(&body)).await?
            }
            _ => return Err(format!("register {username}: HTTP {status}: {v}")),
        };
        let token = v["access_token"].as_str().ok_or_else(|| format!("register {username}: no access_token: {v}"))?;
        let user_id = v["user_id"].as_str().ok_or_else(|| format!("register {username}: no user_id"))?;
        Ok(User { user_id: user_id.to_owned(), token: token.to_owned() })
    }

    /// Synapse's shared-secret registration: a nonce, then the user with an HMAC-SHA1
    /// over `nonce NUL username NUL password NUL notadmin`.
    async fn register_with_shared_secret(&self, username: &str, secret: &str) -> Res<User> {
        use hmac::{Hmac, KeyInit, Mac};
        let path = "/_synapse/admin/v1/register";
        let v = self.ok(reqwest::Method::GET, path, None, None).await?;
        let nonce = v["nonce"].as_str().ok_or_else(|| format!("register {username}: no nonce: {v}"))?;
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).map_err(|e| e.to_string())?;
        mac.update(format!("{nonce}\0{username}\0{PASSWORD}\0notadmin").as_bytes());
        let digest: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        let body = json!({"nonce": nonce, "username": username, "password": PASSWORD, "admin": false, "mac": digest});
        let v = self.ok(reqwest::Method::POST, path, None, Some(&body)).await?;
        let token = v["access_token"].as_str().ok_or_else(|| format!("register {username}: no access_token: {v}"))?;
        let user_id = v["user_id"].as_str().ok_or_else(|| format!("register {username}: no user_id"))?;
        Ok(User { user_id: user_id.to_owned(), token: token.to_owned() })
    }

    async fn register_many(&self, prefix: &str, n: usize, concurrency: usize) -> Res<Vec<User>> {
        let next = Arc::new(AtomicUsize::new(0));
        let out: Arc<Mutex<Vec<Option<User>>>> = Arc::new(Mutex::new(vec![None; n]));
        let mut tasks = Vec::new();
        for _ in 0..concurrency.max(1) {
            let (api, next, out, prefix) = (self.clone(), next.clone(), out.clone(), prefix.to_owned());
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return Ok::<(), String>(());
                    }
                    let u = api.register(&format!("{prefix}{i}")).await?;
                    out.lock().unwrap()[i] = Some(u);
                }
            }));
        }
        for t in tasks {
            t.await.map_err(|e| e.to_string())??;
        }
        let v = std::mem::take(&mut *out.lock().unwrap());
        Ok(v.into_iter().map(|u| u.expect("registered")).collect())
    }

    async fn create_room(&self, u: &User, name: &str) -> Res<String> {
        let body = json!({"preset": "public_chat", "name": name});
        let v = self.ok(reqwest::Method::POST, "/_matrix/client/v3/createRoom", Some(&u.token), Some(&body)).await?;
        v["room_id"].as_str().map(str::to_owned).ok_or_else(|| format!("createRoom: no room_id: {v}"))
    }

    async fn join(&self, u: &User, room: &str) -> Res<()> {
        let path = format!("/_matrix/client/v3/join/{}", enc(room));
        self.ok(reqwest::Method::POST, &path, Some(&u.token), Some(&json!({}))).await.map(|_| ())
    }

    async fn send(&self, u: &User, room: &str, txn: &str, body: &str) -> Res<String> {
        let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{}", enc(room), enc(txn));
        let content = json!({"msgtype": "m.text", "body": body});
        let v = self.ok(reqwest::Method::PUT, &path, Some(&u.token), Some(&content)).await?;
        v["event_id"].as_str().map(str::to_owned).ok_or_else(|| format!("send: no event_id: {v}"))
    }

    /// `/sync`; returns the response and its size in bytes.
    async fn sync(&self, u: &User, since: Option<&str>, timeout_ms: u64, filter: Option<&str>) -> Res<Value> {
        let mut path = format!("/_matrix/client/v3/sync?timeout={timeout_ms}");
        if let Some(s) = since {
            path.push_str(&format!("&since={}", enc(s)));
        }
        if let Some(f) = filter {
            path.push_str(&format!("&filter={}", enc(f)));
        }
        self.ok(reqwest::Method::GET, &path, Some(&u.token), None).await
    }

    async fn messages(&self, u: &User, room: &str, from: Option<&str>, limit: usize) -> Res<Value> {
        let mut path = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit={limit}", enc(room));
        if let Some(f) = from {
            path.push_str(&format!("&from={}", enc(f)));
        }
        self.ok(reqwest::Method::GET, &path, Some(&u.token), None).await
    }

    /// Sends `count` messages into `rooms` (round robin) with `concurrency` workers.
    async fn fill(&self, users: &[User], rooms: &[String], count: usize, concurrency: usize, tag: &str) -> Res<()> {
        let next = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for w in 0..concurrency.max(1) {
            let (api, next, users, rooms, tag) =
                (self.clone(), next.clone(), users.to_vec(), rooms.to_vec(), tag.to_owned());
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return Ok::<(), String>(());
                    }
                    let u = &users[w % users.len()];
                    let room = &rooms[i % rooms.len()];
                    api.send(
                        u,
                        room,
                        &format!("{tag}-{i}"),
                        &format!("fill message {i} of {tag}: lorem ipsum dolor sit amet"),
                    )
                    .await?;
                }
            }));
        }
        for t in tasks {
            t.await.map_err(|e| e.to_string())??;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- /proc measurements

fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process, in seconds.
fn proc_cpu(pid: u32, tck: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: field 3 (state) is f[0]; utime is field 14, stime field 15.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / tck)
}

fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok())
}

/// Bytes the process has passed to write calls (`wchar` in /proc/PID/io): files and
/// sockets alike; for a send into a large room, mostly its database's WAL.
fn proc_written_bytes(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines().find_map(|l| l.strip_prefix("wchar:")).and_then(|v| v.trim().parse().ok())
}

/// Busy and total jiffies of the whole machine (first line of /proc/stat).
fn machine_jiffies() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<f64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).unwrap_or(&0.0);
    Some((total - idle, total))
}

/// Samples the server's VmRSS every 10 ms in the background: the largest value seen
/// since the last `take`. (VmHWM is kept for the whole life of the process, so the
/// per-phase peak comes from sampling and the run-wide peak from VmHWM.)
#[derive(Clone)]
struct RssSampler {
    peak_kb: Arc<AtomicU64>,
}

impl RssSampler {
    fn spawn(pid: Option<u32>) -> RssSampler {
        let peak_kb = Arc::new(AtomicU64::new(0));
        if let Some(pid) = pid {
            let p = peak_kb.clone();
            tokio::spawn(async move {
                // Bounded: stops when the process is gone or after 24 hours.
                for _ in 0..(24 * 3600 * 100) {
                    match proc_status_kb(pid, "VmRSS:") {
                        Some(kb) => {
                            p.fetch_max(kb, Ordering::Relaxed);
                        }
                        None => return,
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
        }
        RssSampler { peak_kb }
    }
    fn reset(&self, kb: u64) {
        self.peak_kb.store(kb, Ordering::Relaxed);
    }
    fn peak_mb(&self) -> f64 {
        self.peak_kb.load(Ordering::Relaxed) as f64 / 1024.0
    }
}

static SAMPLER: std::sync::OnceLock<RssSampler> = std::sync::OnceLock::new();

struct Meter {
    pid: Option<u32>,
    tck: f64,
    cpu0: Option<f64>,
    self_cpu0: Option<f64>,
    machine0: Option<(f64, f64)>,
    t0: Instant,
    rss0_mb: Option<f64>,
    written0: Option<u64>,
    /// The second server of a federation scenario, and its CPU time at the start.
    remote: Option<(u32, f64)>,
}

struct Measured {
    rss_start_mb: Option<f64>,
    wall_s: f64,
    cpu_s: Option<f64>,
    /// Largest sampled VmRSS during the measured phase.
    peak_rss_mb: Option<f64>,
    /// VmHWM: the largest RSS since the server started (setup phases included).
    hwm_mb: Option<f64>,
    rss_mb: Option<f64>,
    /// CPU seconds of the load tool itself during the phase.
    tool_cpu_s: Option<f64>,
    /// CPU seconds used on the machine by everything else (not server, not tool).
    other_cpu_s: Option<f64>,
    /// CPU seconds of the second server (federation scenarios), not in `other_cpu_s`.
    remote_cpu_s: Option<f64>,
    /// MB the server passed to write calls during the phase (`proc_written_bytes`).
    written_mb: Option<f64>,
}

impl Meter {
    fn start(pid: Option<u32>, tck: f64) -> Meter {
        let rss0 = pid.and_then(|p| proc_status_kb(p, "VmRSS:"));
        if let (Some(s), Some(kb)) = (SAMPLER.get(), rss0) {
            s.reset(kb);
        }
        Meter {
            pid,
            tck,
            cpu0: pid.and_then(|p| proc_cpu(p, tck)),
            self_cpu0: proc_cpu(std::process::id(), tck),
            machine0: machine_jiffies(),
            t0: Instant::now(),
            rss0_mb: rss0.map(|k| k as f64 / 1024.0),
            written0: pid.and_then(proc_written_bytes),
            remote: None,
        }
    }
    /// Also measures the CPU time of a second server (B of a federation scenario).
    fn with_remote(mut self, pid: Option<u32>) -> Meter {
        self.remote = pid.and_then(|p| Some((p, proc_cpu(p, self.tck)?)));
        self
    }
    fn stop(&self) -> Measured {
        let wall_s = self.t0.elapsed().as_secs_f64();
        let cpu_s = match (self.pid.and_then(|p| proc_cpu(p, self.tck)), self.cpu0) {
            (Some(b), Some(a)) => Some(b - a),
            _ => None,
        };
        let tool_cpu_s = match (proc_cpu(std::process::id(), self.tck), self.self_cpu0) {
            (Some(b), Some(a)) => Some(b - a),
            _ => None,
        };
        let remote_cpu_s = self.remote.and_then(|(p, c0)| Some(proc_cpu(p, self.tck)? - c0));
        let other_cpu_s = match (machine_jiffies(), self.machine0, cpu_s, tool_cpu_s) {
            (Some((b, _)), Some((a, _)), Some(c), Some(t)) => {
                Some(((b - a) / self.tck - c - t - remote_cpu_s.unwrap_or(0.0)).max(0.0))
            }
            _ => None,
        };
        let rss_mb = self.pid.and_then(|p| proc_status_kb(p, "VmRSS:")).map(|k| k as f64 / 1024.0);
        let hwm_mb = self.pid.and_then(|p| proc_status_kb(p, "VmHWM:")).map(|k| k as f64 / 1024.0);
        let peak_rss_mb = match (self.pid, SAMPLER.get()) {
            (Some(_), Some(s)) => Some(s.peak_mb().max(rss_mb.unwrap_or(0.0))),
            _ => None,
        };
        let written_mb = match (self.pid.and_then(proc_written_bytes), self.written0) {
            (Some(b), Some(a)) => Some(b.saturating_sub(a) as f64 / 1e6),
            _ => None,
        };
        Measured {
            written_mb,
            rss_start_mb: self.rss0_mb,
            wall_s,
            cpu_s,
            peak_rss_mb,
            hwm_mb,
            rss_mb,
            tool_cpu_s,
            other_cpu_s,
            remote_cpu_s,
        }
    }
}

// ---------------------------------------------------------------- results

struct Outcome {
    name: String,
    metrics: Vec<(String, Value)>,
    measured: Option<Measured>,
    error: Option<String>,
}

impl Outcome {
    fn new(name: &str) -> Outcome {
        Outcome { name: name.to_owned(), metrics: Vec::new(), measured: None, error: None }
    }
    fn put(&mut self, key: &str, v: impl Into<Value>) {
        self.metrics.push((key.to_owned(), v.into()));
    }
    fn to_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("scenario".into(), json!(self.name));
        for (k, v) in &self.metrics {
            m.insert(k.clone(), v.clone());
        }
        if let Some(x) = &self.measured {
            m.insert("wall_s".into(), json!(x.wall_s));
            m.insert("server_cpu_s".into(), json!(x.cpu_s));
            m.insert("server_cpu_pct".into(), json!(x.cpu_s.map(|c| 100.0 * c / x.wall_s)));
            m.insert("server_peak_rss_mb".into(), json!(x.peak_rss_mb));
            m.insert("server_hwm_since_start_mb".into(), json!(x.hwm_mb));
            m.insert("server_rss_mb".into(), json!(x.rss_mb));
            m.insert("server_rss_start_mb".into(), json!(x.rss_start_mb));
            m.insert("tool_cpu_s".into(), json!(x.tool_cpu_s));
            m.insert("other_cpu_s".into(), json!(x.other_cpu_s));
            m.insert("server_written_mb".into(), json!(x.written_mb));
            if x.remote_cpu_s.is_some() {
                m.insert("remote_server_cpu_s".into(), json!(x.remote_cpu_s));
            }
        }
        if let Some(e) = &self.error {
            m.insert("error".into(), json!(e));
        }
        Value::Object(m)
    }
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn r2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

// ---------------------------------------------------------------- scenarios

async fn scenario_sends(api: &Api, a: &Args, run: &str, tck: f64) -> Res<Outcome> {
    let mut out = Outcome::new("sends");
    let users = scale::users(api, &format!("{run}s"), a.sends_users.max(1), a.register_concurrency).await?;
    let mut rooms = Vec::new();
    for r in 0..a.sends_rooms.max(1) {
        let room = api.create_room(&users[0], &format!("sends {r}")).await?;
        for u in &users[1..] {
            api.join(u, &room).await?;
        }
        rooms.push(room);
    }
    let count = a.sends_count;
    let deadline = Instant::now() + Duration::from_secs(a.sends_max_seconds);
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let meter = Meter::start(a.server_pid, tck);
    let mut tasks = Vec::new();
    for w in 0..a.sends_concurrency.max(1) {
        let (api, next, errors, room, u) =
            (api.clone(), next.clone(), errors.clone(), rooms[w % rooms.len()].clone(), users[w % users.len()].clone());
        let run = run.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count || Instant::now() >= deadline {
                    return lat;
                }
                let t = Instant::now();
                match api.send(&u, &room, &format!("{run}-s{i}"), &format!("message {i}: the quick brown fox")).await {
                    Ok(_) => lat.push(ms(t.elapsed())),
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("send error: {e}");
                        }
                    }
                }
            }
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.map_err(|e| e.to_string())?);
    }
    let m = meter.stop();
    let lat = sorted(lat);
    out.put("users", users.len());
    out.put("rooms", rooms.len());
    out.put("concurrency", a.sends_concurrency);
    out.put("sent_ok", lat.len());
    out.put("errors", errors.load(Ordering::Relaxed));
    out.put("sends_per_s", r2(lat.len() as f64 / m.wall_s));
    out.put("latency_p50_ms", r2(pct(&lat, 50.0)));
    out.put("latency_p99_ms", r2(pct(&lat, 99.0)));
    out.put("latency_max_ms", r2(pct(&lat, 100.0)));
    if let Some(c) = m.cpu_s {
        out.put("server_cpu_ms_per_send", r2(1000.0 * c / lat.len().max(1) as f64));
    }
    out.measured = Some(m);
    Ok(out)
}

/// Events of type m.room.message in the joined rooms' timelines: (room, body).
fn timeline_bodies(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(rooms) = v["rooms"]["join"].as_object() {
        for room in rooms.values() {
            if let Some(evs) = room["timeline"]["events"].as_array() {
                for e in evs {
                    if e["type"] == "m.room.message"
                        && let Some(b) = e["content"]["body"].as_str()
                    {
                        out.push(b.to_owned());
                    }
                }
            }
        }
    }
    out
}

/// A fan-out set-up: rooms, the users in them (each with the API of its own server),
/// and for each room who sends into it and who long-polls for it. On one server every
/// member does both; across federation users of A send and users of B receive.
struct Fanout {
    users: Vec<(Api, User)>,
    rooms: Vec<String>,
    /// Per room, indices into `users`.
    senders: Vec<Vec<usize>>,
    receivers: Vec<Vec<usize>>,
}

async fn fanout_setup(api: &Api, a: &Args, run: &str) -> Res<Fanout> {
    let n = a.fanout_rooms * a.fanout_room_size;
    let users = Arc::new(scale::users(api, &format!("{run}f"), n, a.register_concurrency).await?);
    let size = a.fanout_room_size;
    let members: Vec<Vec<usize>> = (0..a.fanout_rooms).map(|r| (r * size..(r + 1) * size).collect()).collect();
    // Rooms are set up 16 at a time (1,000 users in 200 rooms take long one by one).
    let (api2, users2) = (api.clone(), users.clone());
    let rooms = scale::par_each(a.fanout_rooms, 16, move |r| {
        let (api, users) = (api2.clone(), users2.clone());
        async move {
            let room = api.create_room(&users[r * size], &format!("fanout {r}")).await?;
            for u in &users[r * size + 1..(r + 1) * size] {
                api.join(u, &room).await?;
            }
            Ok(room)
        }
    })
    .await?;
    let users = Arc::try_unwrap(users).unwrap_or_else(|u| (*u).clone());
    Ok(Fanout {
        users: users.into_iter().map(|u| (api.clone(), u)).collect(),
        rooms,
        senders: members.clone(),
        receivers: members,
    })
}

/// One measured fan-out phase: `rate` messages per second for `seconds`, then up to
/// `drain_seconds` for the last deliveries.
struct FanoutPhase {
    name: String,
    rate: f64,
    seconds: u64,
    drain_seconds: u64,
    timeline_limit: u32,
    lazy_members: bool,
}

async fn scenario_fanout(
    f: &Fanout,
    p: &FanoutPhase,
    pids: (Option<u32>, Option<u32>),
    run: &str,
    tck: f64,
) -> Res<Outcome> {
    let rate = p.rate;
    let mut out = Outcome::new(&p.name);
    let mut filter = json!({"room": {"timeline": {"limit": p.timeline_limit}}});
    if p.lazy_members {
        filter["room"]["state"] = json!({"lazy_load_members": true});
    }
    let filter = filter.to_string();
    // `run` is unique per rate in the list (a repeated rate must not reuse txn ids).
    let tag = format!("{run}-r{rate}:");
    // Every user that long-polls, once.
    let mut listeners: Vec<usize> = f.receivers.iter().flatten().copied().collect();
    listeners.sort_unstable();
    listeners.dedup();
    // Initial sync of every listener, for its next_batch (8 at a time).
    let who: Arc<Vec<(Api, User)>> = Arc::new(listeners.iter().map(|&ui| f.users[ui].clone()).collect());
    let filter2 = filter.clone();
    let since = scale::par_each(who.len(), 8, move |i| {
        let (who, filter) = (who.clone(), filter2.clone());
        async move {
            let (api, u) = &who[i];
            let v = api.sync(u, None, 0, Some(&filter)).await?;
            v["next_batch"].as_str().map(str::to_owned).ok_or_else(|| "sync: no next_batch".to_owned())
        }
    })
    .await?;
    // Message number -> (send start, sender, room).
    type SentAt = HashMap<u64, (Instant, usize, usize)>;
    let sent_at: Arc<Mutex<SentAt>> = Arc::new(Mutex::new(HashMap::new()));
    let received: Arc<Mutex<Vec<(usize, u64, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let syncs = Arc::new(AtomicU64::new(0));
    let sync_errors = Arc::new(AtomicU64::new(0));
    let limited = Arc::new(AtomicU64::new(0));
    let presence = Arc::new(AtomicU64::new(0));
    // Long-polls requested at least once (every listener's first one is in flight).
    let polling = Arc::new(AtomicUsize::new(0));
    let mut loops = Vec::new();
    for (&ui, s) in listeners.iter().zip(since) {
        let (api, u) = f.users[ui].clone();
        let polling = polling.clone();
        let (filter, tag, received, stop, syncs, sync_errors, limited, presence) = (
            filter.clone(),
            tag.clone(),
            received.clone(),
            stop.clone(),
            syncs.clone(),
            sync_errors.clone(),
            limited.clone(),
            presence.clone(),
        );
        loops.push(tokio::spawn(async move {
            let mut since = s;
            // Bounded: at most 100000 syncs per user; stopped by the flag or by abort.
            for k in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if k == 0 {
                    polling.fetch_add(1, Ordering::Relaxed);
                }
                match api.sync(&u, Some(&since), 30_000, Some(&filter)).await {
                    Ok(v) => {
                        let now = Instant::now();
                        syncs.fetch_add(1, Ordering::Relaxed);
                        if let Some(rooms) = v["rooms"]["join"].as_object() {
                            let n = rooms.values().filter(|r| r["timeline"]["limited"] == true).count();
                            limited.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        let p = v["presence"]["events"].as_array().map_or(0, Vec::len);
                        presence.fetch_add(p as u64, Ordering::Relaxed);
                        let mut got = Vec::new();
                        for b in timeline_bodies(&v) {
                            if let Some(seq) = b
                                .strip_prefix(&tag)
                                .and_then(|r| r.split(' ').next())
                                .and_then(|x| x.parse::<u64>().ok())
                            {
                                got.push((ui, seq, now));
                            }
                        }
                        received.lock().unwrap().extend(got);
                        if let Some(nb) = v["next_batch"].as_str() {
                            since = nb.to_owned();
                        }
                    }
                    Err(e) => {
                        if sync_errors.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("sync error: {e}");
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }));
    }
    // Let every long-poll park on the server: every first request sent (bounded), then 1 s.
    for _ in 0..3000 {
        if polling.load(Ordering::Relaxed) >= listeners.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Then until the syncs settle: no long-poll returned for a whole second (the
    // users' first syncs marked them online, and in a large room every member's
    // long-poll carries the others' presence), at most 60 s.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let settling = Instant::now();
    for _ in 0..60 {
        let before = syncs.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        if syncs.load(Ordering::Relaxed) == before {
            break;
        }
    }
    // Seconds the long-polls kept returning before the phase (1 when they were quiet at once).
    out.put("settle_s", (settling.elapsed().as_secs_f64() * 10.0).round() / 10.0);
    out.put("settle_syncs", syncs.load(Ordering::Relaxed));
    out.put("settle_presence_events", presence.load(Ordering::Relaxed));
    syncs.store(0, Ordering::Relaxed);
    limited.store(0, Ordering::Relaxed);
    presence.store(0, Ordering::Relaxed);

    let total = (rate * p.seconds as f64).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let send_errors = Arc::new(AtomicUsize::new(0));
    let send_lat: Arc<Mutex<Vec<f64>>> = Arc::new(Mutex::new(Vec::new()));
    let acked: Arc<Mutex<HashSet<u64>>> = Arc::new(Mutex::new(HashSet::new()));
    let meter = Meter::start(pids.0, tck).with_remote(pids.1);
    let t0 = tokio::time::Instant::now();
    let phase_start = Instant::now();
    let mut senders = Vec::new();
    for i in 0..total {
        tokio::time::sleep_until(t0 + interval * i as u32).await;
        let r = (i as usize) % f.rooms.len();
        let in_room = &f.senders[r];
        let si = in_room[(i as usize / f.rooms.len()) % in_room.len()];
        let (api, u) = f.users[si].clone();
        let (room, sent_at, send_errors, send_lat, acked) =
            (f.rooms[r].clone(), sent_at.clone(), send_errors.clone(), send_lat.clone(), acked.clone());
        let body = format!("{tag}{i} fan-out message");
        let txn = format!("{tag}{i}");
        senders.push(tokio::spawn(async move {
            let t = Instant::now();
            sent_at.lock().unwrap().insert(i, (t, si, r));
            match api.send(&u, &room, &txn, &body).await {
                Ok(_) => {
                    send_lat.lock().unwrap().push(ms(t.elapsed()));
                    acked.lock().unwrap().insert(i);
                }
                Err(e) => {
                    if send_errors.fetch_add(1, Ordering::Relaxed) < 3 {
                        eprintln!("send error: {e}");
                    }
                }
            }
        }));
    }
    let send_phase = t0.elapsed().as_secs_f64();
    // Every send has 60 s in all after the send phase (a slow server queues them);
    // what is still running then is abandoned and counted as unfinished.
    let senders_deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut unfinished = 0u64;
    for s in senders {
        if tokio::time::timeout_at(senders_deadline, s).await.is_err() {
            unfinished += 1;
        }
    }
    let send_wait = t0.elapsed().as_secs_f64() - send_phase;
    // Only acknowledged sends are expected to be delivered, to each receiver of the
    // room but the sender.
    sent_at.lock().unwrap().retain(|i, _| acked.lock().unwrap().contains(i));
    let sent_ok = sent_at.lock().unwrap().len() as u64;
    let expected: u64 = sent_at
        .lock()
        .unwrap()
        .values()
        .map(|&(_, si, r)| f.receivers[r].iter().filter(|&&u| u != si).count() as u64)
        .sum();
    // Wait (bounded) for the last deliveries.
    let drain_deadline = Instant::now() + Duration::from_secs(p.drain_seconds);
    loop {
        let delivered = {
            let sa = sent_at.lock().unwrap();
            let rec = received.lock().unwrap();
            rec.iter()
                .filter(|(u, s, _)| sa.get(s).is_some_and(|(_, si, _)| si != u))
                .map(|(u, s, _)| (*u, *s))
                .collect::<HashSet<_>>()
                .len() as u64
        };
        if delivered >= expected || Instant::now() >= drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = meter.stop();
    stop.store(true, Ordering::Relaxed);
    for l in &loops {
        l.abort();
    }
    let syncs_done = syncs.load(Ordering::Relaxed);

    let sa = sent_at.lock().unwrap().clone();
    let rec = received.lock().unwrap().clone();
    let mut seen = HashSet::new();
    let mut lat = Vec::new();
    let mut duplicates = 0u64;
    // When (seconds into the phase) the messages were sent whose delivery took > 50 ms.
    let mut slow: Vec<f64> = Vec::new();
    for (u, s, at) in rec {
        let Some((t, si, _)) = sa.get(&s) else { continue };
        if *si == u {
            continue;
        }
        if !seen.insert((u, s)) {
            duplicates += 1;
            continue;
        }
        let l = ms(at.saturating_duration_since(*t));
        if l > 50.0 {
            slow.push(t.saturating_duration_since(phase_start).as_secs_f64());
        }
        lat.push(l);
    }
    let lat = sorted(lat);
    let slat = sorted(send_lat.lock().unwrap().clone());
    // The lost deliveries, by message: "message(room): receivers that never saw it".
    let mut lost_detail = Vec::new();
    let mut seqs: Vec<&u64> = sa.keys().collect();
    seqs.sort_unstable();
    for s in seqs {
        let (_, si, r) = sa[s];
        let missing: Vec<String> =
            f.receivers[r].iter().filter(|&&u| u != si && !seen.contains(&(u, *s))).map(|u| u.to_string()).collect();
        if !missing.is_empty() {
            lost_detail.push(format!("{s}(room {r}): {}", missing.join(",")));
        }
    }
    out.put("rate_per_s", rate);
    out.put("send_phase_s", r2(send_phase));
    out.put("sent_ok", sent_ok);
    out.put("send_errors", send_errors.load(Ordering::Relaxed));
    out.put("sends_unfinished", unfinished);
    out.put("send_wait_after_phase_s", r2(send_wait));
    out.put("expected", expected);
    out.put("delivered", lat.len());
    out.put("delivered_pct", r2(100.0 * lat.len() as f64 / expected.max(1) as f64));
    // (message, receiver) pairs never seen in a timeline within the drain time.
    out.put("lost", expected.saturating_sub(lat.len() as u64));
    if !lost_detail.is_empty() {
        out.put("lost_messages", lost_detail.len());
        let shown: Vec<String> = lost_detail.into_iter().take(20).collect();
        out.put("lost_first_20", shown.join("; "));
    }
    out.put("duplicates", duplicates);
    out.put("delivery_p50_ms", r2(pct(&lat, 50.0)));
    out.put("delivery_p90_ms", r2(pct(&lat, 90.0)));
    out.put("delivery_p99_ms", r2(pct(&lat, 99.0)));
    out.put("delivery_max_ms", r2(pct(&lat, 100.0)));
    out.put("deliveries_over_50ms", slow.len());
    if !slow.is_empty() {
        let slow = sorted(slow);
        out.put("over_50ms_sent_between_s", format!("{:.2}..{:.2}", slow[0], slow[slow.len() - 1]));
    }
    out.put("send_p50_ms", r2(pct(&slat, 50.0)));
    out.put("send_p99_ms", r2(pct(&slat, 99.0)));
    out.put("listeners", listeners.len());
    out.put("rooms", f.rooms.len());
    if let Some(c) = m.cpu_s {
        out.put("server_cpu_ms_per_message", r2(1000.0 * c / sent_ok.max(1) as f64));
    }
    if let Some(c) = m.tool_cpu_s {
        // The load tool's own share of a core: it must stay well below the machine's.
        out.put("load_tool_cpu_pct", r2(100.0 * c / m.wall_s));
    }
    out.put("sync_returns", syncs_done);
    out.put("sync_errors", sync_errors.load(Ordering::Relaxed));
    // A limited timeline means the client would have to page back for what it missed.
    out.put("limited_timelines", limited.load(Ordering::Relaxed));
    // Presence updates received by the long-polls during the phase (each one is a
    // sync response that a message did not cause).
    out.put("presence_events", presence.load(Ordering::Relaxed));
    out.measured = Some(m);
    Ok(out)
}

async fn scenario_initial_sync(api: &Api, a: &Args, run: &str, tck: f64) -> Res<Outcome> {
    let mut out = Outcome::new("initial-sync");
    let users = api.register_many(&format!("{run}i"), 1, 1).await?;
    let mut rooms = Vec::new();
    for r in 0..a.initial_rooms {
        rooms.push(api.create_room(&users[0], &format!("initial {r}")).await?);
    }
    api.fill(&users, &rooms, a.initial_rooms * a.initial_messages, 8, &format!("{run}-i")).await?;
    let meter = Meter::start(a.server_pid, tck);
    let mut times = Vec::new();
    let mut rooms_seen = 0;
    let mut events_seen = 0;
    let mut bytes = 0usize;
    for rep in 0..a.initial_reps.max(1) {
        // A distinct filter each time, so no server-side response cache (Synapse keeps
        // sync responses for a while) can answer; it excludes one room that does not exist.
        let filter = json!({"room": {"not_rooms": [format!("!nonexistent{rep}:invalid.example")]}}).to_string();
        let t = Instant::now();
        let v = api.sync(&users[0], None, 0, Some(&filter)).await?;
        times.push(ms(t.elapsed()));
        let joined = v["rooms"]["join"].as_object().map(|m| m.len()).unwrap_or(0);
        rooms_seen = joined;
        events_seen = v["rooms"]["join"]
            .as_object()
            .map(|m| {
                m.values()
                    .map(|r| {
                        r["timeline"]["events"].as_array().map_or(0, Vec::len)
                            + r["state"]["events"].as_array().map_or(0, Vec::len)
                    })
                    .sum()
            })
            .unwrap_or(0);
        bytes = v.to_string().len();
    }
    let m = meter.stop();
    let first = times[0];
    let t = sorted(times);
    out.put("rooms", a.initial_rooms);
    out.put("messages_per_room", a.initial_messages);
    out.put("reps", t.len());
    out.put("median_ms", r2(pct(&t, 50.0)));
    out.put("min_ms", r2(t[0]));
    out.put("max_ms", r2(t[t.len() - 1]));
    out.put("first_ms", r2(first));
    out.put("rooms_in_response", rooms_seen);
    out.put("events_in_response", events_seen);
    out.put("response_bytes", bytes);
    if let Some(c) = m.cpu_s {
        out.put("server_cpu_ms_per_sync", r2(1000.0 * c / t.len() as f64));
    }
    out.measured = Some(m);
    Ok(out)
}

async fn scenario_messages(api: &Api, a: &Args, run: &str, tck: f64) -> Res<Outcome> {
    let mut out = Outcome::new("messages");
    let users = api.register_many(&format!("{run}m"), 1, 1).await?;
    let room = api.create_room(&users[0], "messages").await?;
    api.fill(&users, std::slice::from_ref(&room), a.messages_fill, 8, &format!("{run}-m")).await?;
    // Some servers want a `from` token: take the sync's next_batch as the top.
    let top: Option<String> = match api.messages(&users[0], &room, None, 1).await {
        Ok(_) => None,
        Err(_) => {
            let v = api.sync(&users[0], None, 0, Some(r#"{"room":{"timeline":{"limit":1}}}"#)).await?;
            v["next_batch"].as_str().map(str::to_owned)
        }
    };
    let page = a.messages_page;
    let deadline = Instant::now() + Duration::from_secs(a.messages_seconds);
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let meter = Meter::start(a.server_pid, tck);
    let mut tasks = Vec::new();
    for _ in 0..a.messages_concurrency.max(1) {
        let (api, u, room, top, next, errors) =
            (api.clone(), users[0].clone(), room.clone(), top.clone(), next.clone(), errors.clone());
        let max_pages = a.messages_pages;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut events = 0usize;
            let mut from = top.clone();
            loop {
                if next.fetch_add(1, Ordering::Relaxed) >= max_pages || Instant::now() >= deadline {
                    return (lat, events);
                }
                let t = Instant::now();
                match api.messages(&u, &room, from.as_deref(), page).await {
                    Ok(v) => {
                        lat.push(ms(t.elapsed()));
                        let n = v["chunk"].as_array().map_or(0, Vec::len);
                        events += n;
                        from = match v["end"].as_str() {
                            Some(end) if n == page => Some(end.to_owned()),
                            // The start of the room: begin again from the top.
                            _ => top.clone(),
                        };
                    }
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("messages error: {e}");
                        }
                        from = top.clone();
                    }
                }
            }
        }));
    }
    let mut lat = Vec::new();
    let mut events = 0;
    for t in tasks {
        let (l, e) = t.await.map_err(|e| e.to_string())?;
        lat.extend(l);
        events += e;
    }
    let m = meter.stop();
    let lat = sorted(lat);
    out.put("room_messages", a.messages_fill);
    out.put("page_size", page);
    out.put("concurrency", a.messages_concurrency);
    out.put("pages", lat.len());
    out.put("errors", errors.load(Ordering::Relaxed));
    out.put("pages_per_s", r2(lat.len() as f64 / m.wall_s));
    out.put("events_per_page", r2(events as f64 / lat.len().max(1) as f64));
    out.put("latency_p50_ms", r2(pct(&lat, 50.0)));
    out.put("latency_p99_ms", r2(pct(&lat, 99.0)));
    if let Some(c) = m.cpu_s {
        out.put("server_cpu_ms_per_page", r2(1000.0 * c / lat.len().max(1) as f64));
    }
    out.measured = Some(m);
    Ok(out)
}

// ---------------------------------------------------------------- output

fn fmt_v(v: &Value) -> String {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.2}"),
            _ => n.to_string(),
        },
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn print_table(label: &str, base: &str, outs: &[Outcome]) {
    println!();
    println!("== convo-load results: {label} ({base}) ==");
    for o in outs {
        println!();
        println!("-- {} --", o.name);
        let mut rows: Vec<(String, String)> = o.metrics.iter().map(|(k, v)| (k.clone(), fmt_v(v))).collect();
        if let Some(m) = &o.measured {
            rows.push(("wall_s (measured phase)".into(), format!("{:.2}", m.wall_s)));
            rows.push(("server_cpu_s".into(), m.cpu_s.map_or("-".into(), |c| format!("{c:.2}"))));
            rows.push((
                "server_cpu_pct".into(),
                m.cpu_s.map_or("-".into(), |c| format!("{:.0}%", 100.0 * c / m.wall_s)),
            ));
            rows.push((
                "server_peak_rss_mb (phase, sampled)".into(),
                m.peak_rss_mb.map_or("-".into(), |c| format!("{c:.1}")),
            ));
            rows.push(("server_vmhwm_mb (since start)".into(), m.hwm_mb.map_or("-".into(), |c| format!("{c:.1}"))));
            rows.push(("server_rss_mb (start)".into(), m.rss_start_mb.map_or("-".into(), |c| format!("{c:.1}"))));
            rows.push(("server_rss_mb (end)".into(), m.rss_mb.map_or("-".into(), |c| format!("{c:.1}"))));
            rows.push(("load_tool_cpu_s".into(), m.tool_cpu_s.map_or("-".into(), |c| format!("{c:.2}"))));
            rows.push(("other_processes_cpu_s".into(), m.other_cpu_s.map_or("-".into(), |c| format!("{c:.2}"))));
            rows.push((
                "server_written_mb (write calls)".into(),
                m.written_mb.map_or("-".into(), |c| format!("{c:.1}")),
            ));
            if let Some(c) = m.remote_cpu_s {
                rows.push(("remote_server_cpu_s".into(), format!("{c:.2}")));
            }
        }
        if let Some(e) = &o.error {
            rows.push(("ERROR".into(), e.clone()));
        }
        let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in rows {
            println!("  {k:<w$}  {v}");
        }
    }
}

async fn with_deadline<F: std::future::Future<Output = Res<Outcome>>>(name: &str, secs: u64, f: F) -> Outcome {
    let r = match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(r) => r,
        Err(_) => Err(format!("scenario did not finish within {secs} s")),
    };
    r.unwrap_or_else(|e| {
        eprintln!("{name}: FAILED: {e}");
        let mut o = Outcome::new(name);
        o.error = Some(e);
        o
    })
}

/// 1,000 long-polling users need more sockets than the usual soft limit of 1,024: raise
/// the soft limit of open files to the hard limit (Linux; elsewhere nothing happens).
fn raise_open_files_limit() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: getrlimit and setrlimit only read and write the struct we pass.
    unsafe {
        let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                eprintln!("could not raise the open files limit");
            }
        }
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let a = Args::parse();
    raise_open_files_limit();
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_idle_timeout(Duration::from_secs(90))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot build the HTTP client: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let api = Api {
        http: http.clone(),
        base: a.base_url.trim_end_matches('/').to_owned(),
        shared_secret: a.registration_shared_secret.clone(),
    };
    match api.call(reqwest::Method::GET, "/_matrix/client/versions", None, None).await {
        Ok((200, _)) => {}
        other => {
            eprintln!("{}: /_matrix/client/versions did not answer 200: {other:?}", api.base);
            return std::process::ExitCode::FAILURE;
        }
    }
    let tck = clk_tck();
    let _ = SAMPLER.set(RssSampler::spawn(a.server_pid));
    // Unique, lowercase user names per run.
    let run =
        format!("lt{}", SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() % 100_000_000).unwrap_or(0));
    let mut outs = Vec::new();
    if a.scale.prefill_events > 0 {
        eprintln!("[{}] prefill: {} events ...", a.label, a.scale.prefill_events);
        outs.push(with_deadline("prefill", a.scale.prefill_timeout, scale::prefill(&api, &a, &run, tck)).await);
    }
    for s in &a.scenarios {
        eprintln!("[{}] running {s} ...", a.label);
        match s.as_str() {
            "sends" => outs.push(with_deadline("sends", a.scenario_timeout, scenario_sends(&api, &a, &run, tck)).await),
            "fanout" => {
                let setup =
                    tokio::time::timeout(Duration::from_secs(a.scenario_timeout), fanout_setup(&api, &a, &run)).await;
                match setup {
                    Ok(Ok(f)) => {
                        for (k, &rate) in a.fanout_rates.iter().enumerate() {
                            let phase = FanoutPhase {
                                name: format!("fanout@{rate}/s"),
                                rate,
                                seconds: a.fanout_seconds,
                                drain_seconds: a.fanout_drain_seconds,
                                timeline_limit: a.fanout_timeline_limit,
                                lazy_members: a.fanout_lazy_members,
                            };
                            let secs = a.fanout_seconds + a.fanout_drain_seconds + 180;
                            let pids = (a.server_pid, None);
                            let run = format!("{run}x{k}");
                            outs.push(
                                with_deadline(&phase.name, secs, scenario_fanout(&f, &phase, pids, &run, tck)).await,
                            );
                        }
                    }
                    Ok(Err(e)) => outs.push(with_deadline("fanout", 1, async { Err(format!("setup: {e}")) }).await),
                    Err(_) => outs.push(with_deadline("fanout", 1, async { Err("setup timed out".to_owned()) }).await),
                }
            }
            "initial-sync" => outs.push(
                with_deadline("initial-sync", a.scenario_timeout, scenario_initial_sync(&api, &a, &run, tck)).await,
            ),
            "messages" => {
                outs.push(with_deadline("messages", a.scenario_timeout, scenario_messages(&api, &a, &run, tck)).await)
            }
            "federation-fanout" | "federation-join" => {
                outs.extend(federation::run(s, &api, &http, &a, &run, tck).await)
            }
            "search" => {
                let secs = a.search.search_timeout;
                match tokio::time::timeout(Duration::from_secs(secs), search::scenario_search(&api, &a, &run, tck))
                    .await
                {
                    Ok(Ok(found)) => outs.extend(found),
                    Ok(Err(e)) => outs.push(with_deadline("search", 1, async { Err(e) }).await),
                    Err(_) => {
                        let e = format!("scenario did not finish within {secs} s");
                        outs.push(with_deadline("search", 1, async { Err(e) }).await)
                    }
                }
            }
            "media" => match tokio::time::timeout(
                Duration::from_secs(a.scenario_timeout),
                media::scenario_media(&api, &a, &run, tck),
            )
            .await
            {
                Ok(Ok(found)) => outs.extend(found),
                Ok(Err(e)) => outs.push(with_deadline("media", 1, async { Err(e) }).await),
                Err(_) => {
                    let e = format!("scenario did not finish within {} s", a.scenario_timeout);
                    outs.push(with_deadline("media", 1, async { Err(e) }).await)
                }
            },
            "large-room" => match tokio::time::timeout(
                Duration::from_secs(a.scale.large_room_timeout),
                scale::scenario_large_room(&api, &a, &run, tck),
            )
            .await
            {
                Ok(Ok(found)) => outs.extend(found),
                Ok(Err(e)) => outs.push(with_deadline("large-room", 1, async { Err(e) }).await),
                Err(_) => {
                    let e = format!("scenario did not finish within {} s", a.scale.large_room_timeout);
                    outs.push(with_deadline("large-room", 1, async { Err(e) }).await)
                }
            },
            "sync-cpu" => outs.push(
                with_deadline("sync-cpu", a.scenario_timeout, scale::scenario_sync_cpu(&api, &a, &run, tck)).await,
            ),
            "request-floor" => outs.push(
                with_deadline("request-floor", a.scenario_timeout, scale::scenario_request_floor(&api, &a, tck)).await,
            ),
            other => eprintln!(
                "unknown scenario {other:?} (sends, fanout, initial-sync, messages, federation-fanout, federation-join, \
                 search, media, large-room, sync-cpu, request-floor)"
            ),
        }
    }
    print_table(&a.label, &api.base, &outs);
    if let Some(path) = &a.json {
        let doc = json!({
            "label": a.label,
            "base_url": api.base,
            "server_pid": a.server_pid,
            "remote_url": a.fed.remote_url,
            "remote_server_pid": a.fed.remote_server_pid,
            "results": outs.iter().map(Outcome::to_json).collect::<Vec<_>>(),
        });
        if let Err(e) = std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap_or_default()) {
            eprintln!("cannot write {path}: {e}");
        }
    }
    if outs.iter().any(|o| o.error.is_some()) {
        std::process::ExitCode::from(2)
    } else {
        std::process::ExitCode::SUCCESS
    }
}
