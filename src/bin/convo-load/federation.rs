//! The load tool's federation scenarios: two homeservers, A (`--base-url`) and B
//! (`--remote-url`), of any implementation on either side, driven through the client API
//! only (plus each server's registration method). Every loop is bounded in count and time.
//!
//! - `federation-fanout`: rooms created on A by users of A (the senders), joined through
//!   A by users of B (the receivers), who long-poll B's `/sync`. Messages are sent on A
//!   at a fixed rate; the latency runs from the start of the send on A to the return of
//!   the `/sync` on B that carries it, for every (message, receiver); anything not seen
//!   within the drain time is counted as lost. It is the `fanout` measurement
//!   (`scenario_fanout`) with senders and receivers on different servers.
//! - `federation-join`: a room on A with many members (users of A, registered and joined
//!   in parallel) and many events (notices and a few topic changes), or an existing one
//!   (`--join-room`); then a fresh user of B joins it through A (`via`). Timed: until the
//!   join returns, until the room is in B's `/sync`, and until `/messages` on B has given
//!   the 50 latest events (B fetches them from A: backfill).

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::{
    Api, Args, Fanout, FanoutPhase, Meter, Outcome, PASSWORD, Res, User, enc, ms, r2, scenario_fanout, with_deadline,
};

/// Options of the federation scenarios (flattened into the tool's arguments).
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct FedArgs {
    /// Base URL of the second homeserver's client API (B), for the federation scenarios.
    #[arg(long)]
    pub(crate) remote_url: Option<String>,
    /// PID of B's process, for its CPU time.
    #[arg(long)]
    pub(crate) remote_server_pid: Option<u32>,
    /// Synapse's `registration_shared_secret` of B (see `--registration-shared-secret`).
    #[arg(long)]
    remote_registration_shared_secret: Option<String>,

    /// federation-fanout: message rates to run, messages per second, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "20")]
    fed_fanout_rates: Vec<f64>,
    /// federation-fanout: seconds of sending at each rate.
    #[arg(long, default_value_t = 30)]
    fed_fanout_seconds: u64,
    /// federation-fanout: most seconds to wait for late deliveries after the last send
    /// (the wait ends as soon as every message has been seen).
    #[arg(long, default_value_t = 60)]
    fed_fanout_drain_seconds: u64,
    /// federation-fanout: number of rooms.
    #[arg(long, default_value_t = 10)]
    fed_fanout_rooms: usize,
    /// federation-fanout: users of A per room, who send.
    #[arg(long, default_value_t = 1)]
    fed_fanout_senders: usize,
    /// federation-fanout: users of B per room, who long-poll.
    #[arg(long, default_value_t = 4)]
    fed_fanout_receivers: usize,

    /// federation-join: members of the room built on A (the creator included).
    #[arg(long, default_value_t = 1000)]
    join_members: usize,
    /// federation-join: events sent into the room after the joins (messages and topic
    /// changes), then one last message that B must see.
    #[arg(long, default_value_t = 10_000)]
    join_events: usize,
    /// federation-join: how many of those events are topic changes (state), spread evenly.
    #[arg(long, default_value_t = 20)]
    join_state_changes: usize,
    /// federation-join: the msgtype of those messages. `m.notice` by default: the default
    /// push rules notify nobody of notices, so no server writes a push action per member
    /// for each of them (with `m.text` a message in a room of 1,000 members costs both
    /// servers 1,000 of them, and building the room takes many minutes).
    #[arg(long, default_value = "m.notice")]
    join_msgtype: String,
    /// federation-join: concurrent registrations, joins and sends while building the room.
    #[arg(long, default_value_t = 8)]
    join_build_concurrency: usize,
    /// federation-join: only build the room on A (and report it), no join.
    #[arg(long)]
    join_build_only: bool,
    /// federation-join: join this existing room of A instead of building one (its id is
    /// in the `room_id` figure of the run that built it).
    #[arg(long)]
    join_room: Option<String>,
    /// federation-join: with `--join-room`, the localpart of a member on A (the
    /// `creator` figure of the build), to confirm on A that B's user has left.
    #[arg(long)]
    join_room_member: Option<String>,
    /// federation-join: with `--join-room`, the body of the room's newest message (the
    /// `last_message` figure of the build), which B must show among the latest events.
    #[arg(long)]
    join_last_message: Option<String>,
    /// federation-join: the server to join through (default: A's server name, from the
    /// user ids A hands out).
    #[arg(long)]
    join_via: Option<String>,
    /// federation-join: seconds allowed for the measured part (join, sync, /messages).
    #[arg(long, default_value_t = 300)]
    join_timeout: u64,
    /// federation-join: keep B's user in the room afterwards (by default it leaves, so
    /// that A stops sending to B and the room can be joined again from a fresh B).
    #[arg(long)]
    join_stay: bool,
}

/// Runs one federation scenario; its outcomes (one per rate for the fan-out).
pub(crate) async fn run(
    scenario: &str,
    api: &Api,
    http: &reqwest::Client,
    a: &Args,
    run: &str,
    tck: f64,
) -> Vec<Outcome> {
    let f = &a.fed;
    let Some(url) = &f.remote_url else {
        return vec![failed(scenario, "needs --remote-url (the second homeserver)".into()).await];
    };
    let remote = Api {
        http: http.clone(),
        base: url.trim_end_matches('/').to_owned(),
        shared_secret: f.remote_registration_shared_secret.clone(),
    };
    match remote.call(reqwest::Method::GET, "/_matrix/client/versions", None, None).await {
        Ok((200, _)) => {}
        other => {
            return vec![failed(scenario, format!("{}: /versions did not answer 200: {other:?}", remote.base)).await];
        }
    }
    let pids = (a.server_pid, f.remote_server_pid);
    match scenario {
        "federation-fanout" => {
            let setup =
                tokio::time::timeout(Duration::from_secs(a.scenario_timeout), fanout_setup(api, &remote, a, run));
            let fo = match setup.await {
                Ok(Ok(fo)) => fo,
                Ok(Err(e)) => return vec![failed(scenario, format!("setup: {e}")).await],
                Err(_) => return vec![failed(scenario, "setup timed out".into()).await],
            };
            let mut outs = Vec::new();
            for (k, &rate) in f.fed_fanout_rates.iter().enumerate() {
                let phase = FanoutPhase {
                    name: format!("federation-fanout@{rate}/s"),
                    rate,
                    seconds: f.fed_fanout_seconds,
                    drain_seconds: f.fed_fanout_drain_seconds,
                    timeline_limit: a.fanout_timeline_limit,
                    lazy_members: a.fanout_lazy_members,
                };
                let secs = f.fed_fanout_seconds + f.fed_fanout_drain_seconds + 180;
                let run = format!("{run}y{k}");
                outs.push(with_deadline(&phase.name, secs, scenario_fanout(&fo, &phase, pids, &run, tck)).await);
            }
            outs
        }
        _ => {
            // The build has the scenario timeout, the measured part its own.
            let secs = a.scenario_timeout + f.join_timeout;
            vec![with_deadline(scenario, secs, scenario_join(api, &remote, a, run, pids, tck)).await]
        }
    }
}

async fn failed(name: &str, e: String) -> Outcome {
    with_deadline(name, 1, async { Err(e) }).await
}

/// The server name of a user id (`@local:server`).
fn server_of(u: &User) -> Res<String> {
    u.user_id.split_once(':').map(|(_, s)| s.to_owned()).ok_or_else(|| format!("not a user id: {}", u.user_id))
}

/// Joins a room of another server through `via` (both query forms: `via` is Matrix 1.12's
/// name, `server_name` the older one), with a timeout of its own: a join over federation
/// can take longer than the client's default.
async fn join_via(api: &Api, u: &User, room: &str, via: &str, timeout: Duration) -> Res<()> {
    let url = format!("{}/_matrix/client/v3/join/{}?via={via}&server_name={via}", api.base, enc(room), via = enc(via));
    let resp = api
        .http
        .post(&url)
        .bearer_auth(&u.token)
        .json(&json!({}))
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| format!("join {room} via {via}: {e}"))?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        return Err(format!("join {room} via {via}: HTTP {status}: {body}"));
    }
    Ok(())
}

/// Runs `n` jobs with `concurrency` workers; the first error stops the workers.
async fn parallel<F, Fut>(n: usize, concurrency: usize, job: F) -> Res<()>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Res<()>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let job = Arc::new(job);
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (next, job) = (next.clone(), job.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<(), String>(());
                }
                if let Err(e) = job(i).await {
                    next.store(n, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// Waits (bounded) until `room` is among the joined rooms of `u`'s `/sync`; returns that
/// response.
async fn wait_joined_in_sync(api: &Api, u: &User, room: &str, since: Option<String>, deadline: Instant) -> Res<Value> {
    let mut since = since;
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now()).as_millis() as u64;
        let v = api.sync(u, since.as_deref(), left.min(30_000), None).await?;
        if v["rooms"]["join"].get(room).is_some() {
            return Ok(v);
        }
        since = v["next_batch"].as_str().map(str::to_owned);
    }
    Err(format!("{} did not see {room} in /sync in time", u.user_id))
}

// ---------------------------------------------------------------- federation-fanout

async fn fanout_setup(a_api: &Api, b_api: &Api, a: &Args, run: &str) -> Res<Fanout> {
    let f = &a.fed;
    let rooms_n = f.fed_fanout_rooms.max(1);
    let (ns, nr) = (f.fed_fanout_senders.max(1), f.fed_fanout_receivers.max(1));
    let senders = a_api.register_many(&format!("{run}ga"), rooms_n * ns, a.register_concurrency).await?;
    let receivers = b_api.register_many(&format!("{run}gb"), rooms_n * nr, a.register_concurrency).await?;
    let via = match &f.join_via {
        Some(v) => v.clone(),
        None => server_of(&senders[0])?,
    };
    let mut rooms = Vec::new();
    for r in 0..rooms_n {
        let room = a_api.create_room(&senders[r * ns], &format!("federation fanout {r}")).await?;
        for u in &senders[r * ns + 1..(r + 1) * ns] {
            a_api.join(u, &room).await?;
        }
        rooms.push(room);
    }
    // The receivers join through A, a few at a time.
    let (rooms_c, receivers_c, b) = (Arc::new(rooms.clone()), Arc::new(receivers.clone()), b_api.clone());
    let timeout = Duration::from_secs(a.scenario_timeout);
    parallel(rooms_n * nr, 4, move |i| {
        let (rooms, receivers, b, via) = (rooms_c.clone(), receivers_c.clone(), b.clone(), via.clone());
        async move { join_via(&b, &receivers[i], &rooms[i / nr], &via, timeout).await }
    })
    .await?;
    // Every receiver sees its room in B's /sync before anything is measured.
    let deadline = Instant::now() + Duration::from_secs(60);
    for (i, u) in receivers.iter().enumerate() {
        wait_joined_in_sync(b_api, u, &rooms[i / nr], None, deadline).await?;
    }
    let mut users: Vec<(Api, User)> = senders.into_iter().map(|u| (a_api.clone(), u)).collect();
    users.extend(receivers.into_iter().map(|u| (b_api.clone(), u)));
    let nsend = rooms_n * ns;
    Ok(Fanout {
        users,
        senders: (0..rooms_n).map(|r| (r * ns..(r + 1) * ns).collect()).collect(),
        receivers: (0..rooms_n).map(|r| (nsend + r * nr..nsend + (r + 1) * nr).collect()).collect(),
        rooms,
    })
}

// ---------------------------------------------------------------- federation-join

/// What was built on A: the room, the server to join through, and the body of the last
/// message (B must see it).
struct BuiltRoom {
    room: String,
    via: String,
    marker: Option<String>,
    /// A member of the room on A, when known.
    member: Option<User>,
}

async fn build_room(api: &Api, a: &Args, run: &str, out: &mut Outcome) -> Res<BuiltRoom> {
    let f = &a.fed;
    let conc = f.join_build_concurrency.max(1);
    let t0 = Instant::now();
    let users = api.register_many(&format!("{run}ja"), f.join_members.max(1), conc).await?;
    let t_reg = t0.elapsed();
    eprintln!("federation-join: {} users registered on A in {:.0} s", users.len(), t_reg.as_secs_f64());
    let creator = users[0].clone();
    let body = json!({"preset": "public_chat", "name": "federation join", "topic": "topic 0"});
    let v = api.ok(reqwest::Method::POST, "/_matrix/client/v3/createRoom", Some(&creator.token), Some(&body)).await?;
    let room = v["room_id"].as_str().ok_or_else(|| format!("createRoom: no room_id: {v}"))?.to_owned();
    let t1 = Instant::now();
    let (users, room_c, api_c) = (Arc::new(users), Arc::new(room.clone()), api.clone());
    let (u2, r2c, a2) = (users.clone(), room_c.clone(), api_c.clone());
    parallel(users.len() - 1, conc, move |i| {
        let (u, room, api) = (u2.clone(), r2c.clone(), a2.clone());
        async move { api.join(&u[i + 1], &room).await }
    })
    .await?;
    let t_joins = t1.elapsed();
    eprintln!("federation-join: {} joins in {:.0} s", users.len() - 1, t_joins.as_secs_f64());
    let t2 = Instant::now();
    let n = f.join_events;
    let stride = n.checked_div(f.join_state_changes).map_or(usize::MAX, |s| s.max(1));
    let tag = format!("{run}-j");
    let (u3, r3, a3, tag3, m3) = (users.clone(), room_c.clone(), api_c.clone(), tag.clone(), f.join_msgtype.clone());
    parallel(n, conc, move |i| {
        let (users, room, api, tag, msgtype) = (u3.clone(), r3.clone(), a3.clone(), tag3.clone(), m3.clone());
        async move {
            if i % stride == stride - 1 {
                let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.topic", enc(&room));
                let topic = json!({"topic": format!("topic {i}")});
                api.ok(reqwest::Method::PUT, &path, Some(&users[0].token), Some(&topic)).await.map(|_| ())
            } else {
                let u = &users[i % users.len()];
                let path = format!(
                    "/_matrix/client/v3/rooms/{}/send/m.room.message/{}",
                    enc(&room),
                    enc(&format!("{tag}{i}"))
                );
                let content =
                    json!({"msgtype": msgtype, "body": format!("history message {i}: lorem ipsum dolor sit amet")});
                api.ok(reqwest::Method::PUT, &path, Some(&u.token), Some(&content)).await.map(|_| ())
            }
        }
    })
    .await?;
    // One last message, after all the others: the newest event B must see.
    let marker = format!("last message of {run}");
    api.send(&creator, &room, &format!("{tag}-last"), &marker).await?;
    let t_events = t2.elapsed();
    eprintln!("federation-join: {} events in {:.0} s", n + 1, t_events.as_secs_f64());
    out.put("build_s", r2(t0.elapsed().as_secs_f64()));
    out.put("build_registrations_s", r2(t_reg.as_secs_f64()));
    out.put("build_joins_s", r2(t_joins.as_secs_f64()));
    out.put("build_events_s", r2(t_events.as_secs_f64()));
    out.put("build_members", users.len());
    out.put("build_events", n + 1);
    out.put("build_topic_changes", if stride == usize::MAX { 0 } else { n / stride });
    out.put("creator", creator.user_id.trim_start_matches('@').split(':').next().unwrap_or_default());
    out.put("last_message", marker.clone());
    Ok(BuiltRoom { room, via: server_of(&creator)?, marker: Some(marker), member: Some(creator) })
}

async fn scenario_join(
    a_api: &Api,
    b_api: &Api,
    a: &Args,
    run: &str,
    pids: (Option<u32>, Option<u32>),
    tck: f64,
) -> Res<Outcome> {
    let f = &a.fed;
    let mut out = Outcome::new("federation-join");
    let built = match &f.join_room {
        None => tokio::time::timeout(Duration::from_secs(a.scenario_timeout), build_room(a_api, a, run, &mut out))
            .await
            .map_err(|_| format!("building the room took more than {} s", a.scenario_timeout))??,
        Some(room) => {
            let member = match &f.join_room_member {
                Some(localpart) => Some(login(a_api, localpart).await?),
                None => None,
            };
            let via = match (&f.join_via, &member) {
                (Some(v), _) => v.clone(),
                (None, Some(m)) => server_of(m)?,
                (None, None) => server_of(&a_api.register(&format!("{run}jx")).await?)?,
            };
            BuiltRoom { room: room.clone(), via, marker: f.join_last_message.clone(), member }
        }
    };
    let room = built.room.clone();
    out.put("room_id", room.clone());
    out.put("via", built.via.clone());
    if f.join_build_only {
        return Ok(out);
    }

    let joiner = b_api.register(&format!("{run}jb")).await?;
    let first = b_api.sync(&joiner, None, 0, None).await?;
    let since = first["next_batch"].as_str().map(str::to_owned);
    let deadline = Instant::now() + Duration::from_secs(f.join_timeout);
    let meter = Meter::start(pids.0, tck).with_remote(pids.1);
    let t0 = Instant::now();
    // B's user long-polls from before the join, as a client would.
    let watcher = {
        let (b, u, room) = (b_api.clone(), joiner.clone(), room.clone());
        tokio::spawn(async move {
            let v = wait_joined_in_sync(&b, &u, &room, since, deadline).await?;
            Ok::<_, String>((Instant::now(), v))
        })
    };
    let joined = join_via(b_api, &joiner, &room, &built.via, Duration::from_secs(f.join_timeout)).await;
    let join_ms = ms(t0.elapsed());
    if let Err(e) = joined {
        watcher.abort();
        return Err(e);
    }
    let (seen_at, sync) = tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), watcher)
        .await
        .map_err(|_| "the room did not show in B's /sync in time".to_owned())?
        .map_err(|e| e.to_string())??;
    let sync_ms = ms(seen_at.duration_since(t0));
    let in_sync = &sync["rooms"]["join"][room.as_str()];
    let timeline = in_sync["timeline"]["events"].as_array().cloned().unwrap_or_default();
    let state_events = in_sync["state"]["events"].as_array().map_or(0, Vec::len);

    // The 50 latest events: the sync's timeline, then /messages backwards from its start
    // until 50 (B fetches what it lacks from A).
    let mut events: Vec<Value> = timeline.clone();
    let mut from = in_sync["timeline"]["prev_batch"].as_str().map(str::to_owned);
    let mut requests = 0;
    while events.len() < 50 && requests < 20 && Instant::now() < deadline {
        let want = 50 - events.len();
        let v = b_api.messages(&joiner, &room, from.as_deref(), want).await?;
        requests += 1;
        let chunk = v["chunk"].as_array().cloned().unwrap_or_default();
        let end = v["end"].as_str().map(str::to_owned);
        if chunk.is_empty() && end.is_none() {
            break;
        }
        events.extend(chunk);
        from = end;
    }
    let messages_ms = ms(t0.elapsed());
    let members = b_api
        .ok(
            reqwest::Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room)),
            Some(&joiner.token),
            None,
        )
        .await?;
    let m = meter.stop();

    out.put("join_ms", r2(join_ms));
    out.put("sync_seen_ms", r2(sync_ms));
    out.put("sync_state_events", state_events);
    out.put("sync_timeline_events", timeline.len());
    out.put("sync_bytes", sync.to_string().len());
    out.put("messages_50_ms", r2(messages_ms));
    out.put("messages_requests", requests);
    out.put("latest_events_seen", events.len());
    if let Some(marker) = &built.marker {
        let seen = events.iter().any(|e| e["content"]["body"].as_str() == Some(marker.as_str()));
        out.put("last_message_seen", seen);
    }
    out.put("joined_members_on_b", members["joined"].as_object().map_or(0, |m| m.len()));
    out.measured = Some(m);

    if !f.join_stay {
        let path = format!("/_matrix/client/v3/rooms/{}/leave", enc(&room));
        b_api.ok(reqwest::Method::POST, &path, Some(&joiner.token), Some(&json!({}))).await?;
        // A must know that B has left before B goes away, or it keeps B as a destination.
        if let Some(member) = &built.member {
            let t = Instant::now();
            let left = wait_not_joined(a_api, member, &room, &joiner.user_id, Duration::from_secs(30)).await?;
            out.put("leave_seen_on_a", left);
            out.put("leave_seen_on_a_ms", r2(ms(t.elapsed())));
        }
    }
    Ok(out)
}

/// Logs in with the tool's password (users it registered).
async fn login(api: &Api, localpart: &str) -> Res<User> {
    let body = json!({
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": localpart},
        "password": PASSWORD,
        "initial_device_display_name": "convo-load",
    });
    let v = api.ok(reqwest::Method::POST, "/_matrix/client/v3/login", None, Some(&body)).await?;
    let token = v["access_token"].as_str().ok_or_else(|| format!("login {localpart}: no access_token: {v}"))?;
    let user_id = v["user_id"].as_str().ok_or_else(|| format!("login {localpart}: no user_id"))?;
    Ok(User { user_id: user_id.to_owned(), token: token.to_owned() })
}

/// Polls `joined_members` as `member` until `user` is not among them (true), or the
/// time is up (false).
async fn wait_not_joined(api: &Api, member: &User, room: &str, user: &str, within: Duration) -> Res<bool> {
    let path = format!("/_matrix/client/v3/rooms/{}/joined_members", enc(room));
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let v = api.ok(reqwest::Method::GET, &path, Some(&member.token), None).await?;
        if v["joined"].get(user).is_none() {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(false)
}
