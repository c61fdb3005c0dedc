//! The load tool's issue-13 scenarios (cost that grows with room size or history):
//!
//! - `--prefill-events N`: a set-up phase before the chosen scenarios. The users those
//!   scenarios measure (`sends`, `fanout`, `sync-cpu`, and the sender of `large-room`)
//!   are registered up front into a pool and joined to a few rooms; then
//!   `--prefill-senders` other users, who never send read receipts (the tool sends none
//!   at all), send N messages into those rooms with concurrent workers. The measured
//!   users so start with a long unread history on a database that holds N events.
//! - `large-room`: a room of `--large-room-members` members, built by joins of
//!   `--large-room-join-concurrency` users at once (join p50 as the room grows, at 250,
//!   500, 1,000, 2,000... members); then, one request at a time, sends, joins of new
//!   users and each new user's lazy-loading initial `/sync`, in that room and in a room
//!   of `--large-room-small-members` for comparison.
//! - `sync-cpu`: the server CPU of an incremental `/sync` that carries one new event: one
//!   user long-polls, another sends one message at a time; the CPU of as many sends
//!   alone (nobody syncing) is measured first and subtracted.
//!
//! - `request-floor`: the server CPU of requests that do nothing (`GET
//!   /_matrix/client/versions`), paced like the fan-out: `--floor-burst` at once,
//!   `--floor-rate` times a second. What a fan-out message costs a server that wakes
//!   for it before any Matrix work: the floor under the fan-out's CPU per message.
//!
//! Every loop is bounded in count; each scenario has an overall deadline.

use std::{
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::json;

use super::{Api, Args, Meter, Outcome, Res, User, ms, pct, r2, sorted};

/// Options of the issue-13 scenarios (flattened into the tool's arguments).
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct ScaleArgs {
    /// prefill: messages sent before the chosen scenarios into rooms their measured users
    /// are in, by users who never send read receipts (0: no prefill).
    #[arg(long, default_value_t = 0)]
    pub(crate) prefill_events: usize,
    /// prefill: rooms the messages go to (measured user i joins room i % rooms).
    #[arg(long, default_value_t = 4)]
    prefill_rooms: usize,
    /// prefill: users who send the messages (members of every prefill room).
    #[arg(long, default_value_t = 8)]
    prefill_senders: usize,
    /// prefill: concurrent senders.
    #[arg(long, default_value_t = 16)]
    prefill_concurrency: usize,
    /// prefill: hard deadline of the prefill phase (registration included), in seconds.
    #[arg(long, default_value_t = 3_600)]
    pub(crate) prefill_timeout: u64,

    /// large-room: members of the large room.
    #[arg(long, default_value_t = 10_000)]
    large_room_members: usize,
    /// large-room: members of the comparison room.
    #[arg(long, default_value_t = 10)]
    large_room_small_members: usize,
    /// large-room: users joining at once while the large room is built.
    #[arg(long, default_value_t = 16)]
    large_room_join_concurrency: usize,
    /// large-room: messages sent one at a time into each room.
    #[arg(long, default_value_t = 100)]
    large_room_sends: usize,
    /// large-room: new users joining each room one at a time (each then makes one
    /// lazy-loading initial sync).
    #[arg(long, default_value_t = 30)]
    large_room_joins: usize,
    /// large-room: hard deadline of the whole scenario (registration of every member
    /// included), in seconds.
    #[arg(long, default_value_t = 7_200)]
    pub(crate) large_room_timeout: u64,

    /// sync-cpu: messages (and woken syncs) measured.
    #[arg(long, default_value_t = 500)]
    sync_cpu_count: usize,
    /// sync-cpu: milliseconds between a sync's request and the send that wakes it (lets
    /// the long-poll park on the server; idle time, not CPU).
    #[arg(long, default_value_t = 5)]
    sync_cpu_gap_ms: u64,

    /// request-floor: ticks per second (a fan-out message is one tick).
    #[arg(long, default_value_t = 20.0)]
    floor_rate: f64,
    /// request-floor: requests per tick, at once, each on its own connection (a fan-out
    /// message in a room of 5 is one send and 4 woken syncs answered, plus the senders'
    /// own).
    #[arg(long, default_value_t = 6)]
    floor_burst: usize,
    /// request-floor: seconds of ticks.
    #[arg(long, default_value_t = 10)]
    floor_seconds: u64,
}

// ---------------------------------------------------------------- helpers

/// Users registered by the prefill phase, handed out to the scenarios that follow.
static POOL: Mutex<Vec<User>> = Mutex::new(Vec::new());

/// `n` users: from the prefill pool first, then freshly registered.
pub(crate) async fn users(api: &Api, prefix: &str, n: usize, concurrency: usize) -> Res<Vec<User>> {
    let mut out: Vec<User> = {
        let mut pool = POOL.lock().unwrap();
        let k = n.min(pool.len());
        pool.drain(..k).collect()
    };
    if out.len() < n {
        out.extend(api.register_many(prefix, n - out.len(), concurrency).await?);
    }
    Ok(out)
}

/// Runs `f(0..n)` with `concurrency` workers; the results in index order.
pub(crate) async fn par_each<T, F, Fut>(n: usize, concurrency: usize, f: F) -> Res<Vec<T>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Res<T>> + Send + 'static,
{
    let f = Arc::new(f);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.clamp(1, n.max(1)) {
        let (f, next) = (f.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, String>(got);
                }
                got.push((i, f(i).await?));
            }
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.map_err(|e| e.to_string())??);
    }
    all.sort_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, v)| v).collect())
}

fn put_cpu_per(out: &mut Outcome, key: &str, cpu_s: Option<f64>, n: usize) {
    if let Some(c) = cpu_s {
        out.put(key, r2(1000.0 * c / n.max(1) as f64));
    }
}

// ---------------------------------------------------------------- prefill

/// How many measured users the chosen scenarios take from the pool.
pub(crate) fn pooled_users(a: &Args) -> usize {
    a.scenarios
        .iter()
        .map(|s| match s.as_str() {
            "sends" => a.sends_users.max(1),
            "fanout" => a.fanout_rooms * a.fanout_room_size,
            "sync-cpu" => 2,
            "large-room" => 1,
            _ => 0,
        })
        .sum()
}

/// The prefill phase: registers the pool and sends `--prefill-events` into its rooms.
pub(crate) async fn prefill(api: &Api, a: &Args, run: &str, tck: f64) -> Res<Outcome> {
    let s = &a.scale;
    let mut out = Outcome::new("prefill");
    let conc = a.register_concurrency;
    let n_rooms = s.prefill_rooms.max(1);
    let t = Instant::now();
    let senders = api.register_many(&format!("{run}ps"), s.prefill_senders.max(1), conc).await?;
    let members = api.register_many(&format!("{run}pm"), pooled_users(a), conc).await?;
    let register_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let mut rooms = Vec::new();
    for r in 0..n_rooms {
        rooms.push(api.create_room(&senders[0], &format!("prefill {r}")).await?);
    }
    let rooms = Arc::new(rooms);
    // Every sender joins every room; measured user i joins room i % rooms.
    let mut joins: Vec<(User, usize)> = Vec::new();
    for u in &senders[1..] {
        joins.extend((0..n_rooms).map(|r| (u.clone(), r)));
    }
    joins.extend(members.iter().enumerate().map(|(i, u)| (u.clone(), i % n_rooms)));
    let joins = Arc::new(joins);
    let (api2, rooms2, joins2) = (api.clone(), rooms.clone(), joins.clone());
    par_each(joins.len(), 16, move |i| {
        let (api, rooms, joins) = (api2.clone(), rooms2.clone(), joins2.clone());
        async move { api.join(&joins[i].0, &rooms[joins[i].1]).await }
    })
    .await?;
    let join_s = t.elapsed().as_secs_f64();

    let meter = Meter::start(a.server_pid, tck);
    api.fill(&senders, &rooms, s.prefill_events, s.prefill_concurrency, &format!("{run}-p")).await?;
    let m = meter.stop();
    out.put("events", s.prefill_events);
    out.put("rooms", n_rooms);
    out.put("senders", senders.len());
    out.put("concurrency", s.prefill_concurrency);
    out.put("measured_users_in_rooms", members.len());
    out.put("register_s", r2(register_s));
    out.put("join_s", r2(join_s));
    out.put("fill_s", r2(m.wall_s));
    out.put("events_per_s", r2(s.prefill_events as f64 / m.wall_s));
    put_cpu_per(&mut out, "server_cpu_ms_per_event", m.cpu_s, s.prefill_events);
    out.measured = Some(m);
    *POOL.lock().unwrap() = members;
    Ok(out)
}

// ---------------------------------------------------------------- large-room

/// Room sizes at which the build reports the join p50: 250, 500, 1,000... and the end.
fn checkpoints(members: usize) -> Vec<usize> {
    let mut c = Vec::new();
    let mut k = 250;
    while k < members {
        c.push(k);
        k *= 2;
    }
    c.push(members);
    c
}

/// Sends, joins of new users and their lazy-loading initial syncs, one at a time.
async fn one_at_a_time(
    api: &Api,
    a: &Args,
    tck: f64,
    (owner, room): (&User, &str),
    newcomers: &[User],
    label: &str,
    txn: &str,
) -> Res<Outcome> {
    let s = &a.scale;
    let mut out = Outcome::new(label);
    // Sends.
    let meter = Meter::start(a.server_pid, tck);
    let mut send = Vec::new();
    for i in 0..s.large_room_sends {
        let t = Instant::now();
        api.send(owner, room, &format!("{txn}-{i}"), &format!("large-room message {i}")).await?;
        send.push(ms(t.elapsed()));
    }
    let ms_send = meter.stop();
    // Joins of new users.
    let meter = Meter::start(a.server_pid, tck);
    let mut join = Vec::new();
    for u in newcomers {
        let t = Instant::now();
        api.join(u, room).await?;
        join.push(ms(t.elapsed()));
    }
    let ms_join = meter.stop();
    // Each new member's lazy-loading initial sync.
    let filter = json!({"room": {"state": {"lazy_load_members": true}, "timeline": {"limit": 20}}}).to_string();
    let meter = Meter::start(a.server_pid, tck);
    let (mut lazy, mut members_max, mut bytes_max) = (Vec::new(), 0usize, 0usize);
    for u in newcomers {
        let t = Instant::now();
        let v = api.sync(u, None, 0, Some(&filter)).await?;
        lazy.push(ms(t.elapsed()));
        let r = &v["rooms"]["join"][room];
        if r.is_null() {
            return Err(format!("{label}: the new member's initial sync has no room {room}"));
        }
        let members = r["state"]["events"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(r["timeline"]["events"].as_array().into_iter().flatten())
            .filter(|e| e["type"] == "m.room.member")
            .count();
        members_max = members_max.max(members);
        bytes_max = bytes_max.max(v.to_string().len());
    }
    let ms_lazy = meter.stop();
    let (send, join, lazy) = (sorted(send), sorted(join), sorted(lazy));
    out.put("sends", send.len());
    out.put("send_p50_ms", r2(pct(&send, 50.0)));
    out.put("send_p99_ms", r2(pct(&send, 99.0)));
    put_cpu_per(&mut out, "server_cpu_ms_per_send", ms_send.cpu_s, send.len());
    out.put("joins", join.len());
    out.put("join_p50_ms", r2(pct(&join, 50.0)));
    out.put("join_p99_ms", r2(pct(&join, 99.0)));
    put_cpu_per(&mut out, "server_cpu_ms_per_join", ms_join.cpu_s, join.len());
    out.put("lazy_syncs", lazy.len());
    out.put("lazy_sync_p50_ms", r2(pct(&lazy, 50.0)));
    out.put("lazy_sync_p99_ms", r2(pct(&lazy, 99.0)));
    put_cpu_per(&mut out, "server_cpu_ms_per_lazy_sync", ms_lazy.cpu_s, lazy.len());
    // Lazy loading works when this stays near the timeline's senders, not the room size.
    out.put("lazy_sync_member_events_max", members_max);
    out.put("lazy_sync_bytes_max", bytes_max);
    // The RSS columns are those of the send phase (the phase timed first).
    out.measured = Some(ms_send);
    Ok(out)
}

pub(crate) async fn scenario_large_room(api: &Api, a: &Args, run: &str, tck: f64) -> Res<Vec<Outcome>> {
    let s = &a.scale;
    let total = s.large_room_members.max(2);
    let small = s.large_room_small_members.clamp(2, total);
    let newcomers_n = s.large_room_joins;
    let owner = users(api, &format!("{run}lo"), 1, 1).await?.remove(0);

    // Registration: the members and the newcomers of both rooms, concurrently.
    let meter = Meter::start(a.server_pid, tck);
    let registered = api.register_many(&format!("{run}l"), total - 1 + 2 * newcomers_n, a.register_concurrency).await?;
    let reg = meter.stop();
    let members: Arc<Vec<User>> = Arc::new(registered[..total - 1].to_vec());
    let new_large = &registered[total - 1..total - 1 + newcomers_n];
    let new_small = &registered[total - 1 + newcomers_n..];

    // The build: joins of `concurrency` users at once; (index of the join, latency).
    let room = api.create_room(&owner, "large room").await?;
    let meter = Meter::start(a.server_pid, tck);
    let lat: Arc<Mutex<Vec<(usize, f64)>>> = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let (api2, room2, members2, lat2) = (api.clone(), room.clone(), members.clone(), lat.clone());
    par_each(members.len(), s.large_room_join_concurrency, move |i| {
        let (api, room, members, lat) = (api2.clone(), room2.clone(), members2.clone(), lat2.clone());
        async move {
            let t = Instant::now();
            api.join(&members[i], &room).await?;
            lat.lock().unwrap().push((i, ms(t.elapsed())));
            Ok(())
        }
    })
    .await?;
    let build = meter.stop();
    let lat = std::mem::take(&mut *lat.lock().unwrap());
    let mut out = Outcome::new(&format!("large-room build ({total} members)"));
    out.put("members", total);
    out.put("join_concurrency", s.large_room_join_concurrency);
    out.put("users_registered", registered.len());
    out.put("register_s", r2(reg.wall_s));
    put_cpu_per(&mut out, "server_cpu_ms_per_registration", reg.cpu_s, registered.len());
    out.put("build_s", r2(build.wall_s));
    out.put("joins_per_s", r2(lat.len() as f64 / build.wall_s));
    put_cpu_per(&mut out, "server_cpu_ms_per_join", build.cpu_s, lat.len());
    // Join i takes the room from i + 1 to i + 2 members; "at c members" is the p50 of
    // the joins that took the room through its last 10 % before c.
    for c in checkpoints(total) {
        let lo = (c * 9 / 10).saturating_sub(2);
        let window: Vec<f64> = lat.iter().filter(|(i, _)| *i >= lo && *i + 2 <= c).map(|(_, l)| *l).collect();
        if !window.is_empty() {
            out.put(&format!("join_p50_ms_at_{c}"), r2(pct(&sorted(window), 50.0)));
        }
    }
    let all = sorted(lat.iter().map(|(_, l)| *l).collect());
    out.put("join_p50_ms", r2(pct(&all, 50.0)));
    out.put("join_p99_ms", r2(pct(&all, 99.0)));
    out.measured = Some(build);
    let mut outs = vec![out];

    // One at a time, in the large room and in a room of `small` (members reused).
    let large = one_at_a_time(
        api,
        a,
        tck,
        (&owner, &room),
        new_large,
        &format!("large-room {total} members"),
        &format!("{run}-ll"),
    )
    .await?;
    let small_room = api.create_room(&owner, "small room").await?;
    for u in &members[..small - 1] {
        api.join(u, &small_room).await?;
    }
    let mut smallo = one_at_a_time(
        api,
        a,
        tck,
        (&owner, &small_room),
        new_small,
        &format!("large-room comparison: {small} members"),
        &format!("{run}-ls"),
    )
    .await?;
    // How many times the small room's figure the large room's is (targets: within 2x).
    let get = |o: &Outcome, k: &str| o.metrics.iter().find(|(n, _)| n == k).and_then(|(_, v)| v.as_f64());
    for k in ["send_p50_ms", "join_p50_ms", "lazy_sync_p50_ms"] {
        if let (Some(l), Some(sm)) = (get(&large, k), get(&smallo, k))
            && sm > 0.0
        {
            smallo.put(&format!("large_over_small_{k}"), r2(l / sm));
        }
    }
    outs.push(large);
    outs.push(smallo);
    Ok(outs)
}

// ---------------------------------------------------------------- sync-cpu

pub(crate) async fn scenario_sync_cpu(api: &Api, a: &Args, run: &str, tck: f64) -> Res<Outcome> {
    let s = &a.scale;
    let k = s.sync_cpu_count.max(1);
    let mut out = Outcome::new("sync-cpu");
    let us = users(api, &format!("{run}c"), 2, 2).await?;
    let (reader, sender) = (us[0].clone(), us[1].clone());
    let room = api.create_room(&sender, "sync-cpu").await?;
    api.join(&reader, &room).await?;
    let filter = json!({"room": {"timeline": {"limit": 10}}}).to_string();

    // The sends alone, nobody syncing.
    let meter = Meter::start(a.server_pid, tck);
    for i in 0..k {
        api.send(&sender, &room, &format!("{run}-ca{i}"), &format!("alone {i}")).await?;
    }
    let alone = meter.stop();
    let Some(alone_cpu) = alone.cpu_s else {
        return Err("sync-cpu needs --server-pid (it measures server CPU)".into());
    };

    // Catch up, then one long-poll woken by one send, k times.
    let v = api.sync(&reader, None, 0, Some(&filter)).await?;
    let mut since = v["next_batch"].as_str().ok_or("sync: no next_batch")?.to_owned();
    let (mut lat, mut syncs, mut events, mut empty) = (Vec::new(), 0usize, 0usize, 0usize);
    let gap = Duration::from_millis(s.sync_cpu_gap_ms);
    let meter = Meter::start(a.server_pid, tck);
    for i in 0..k {
        let body = format!("{run}-cw{i} woken");
        let poll = {
            let (api, reader, since, filter) = (api.clone(), reader.clone(), since.clone(), filter.clone());
            tokio::spawn(async move { api.sync(&reader, Some(&since), 30_000, Some(&filter)).await })
        };
        tokio::time::sleep(gap).await;
        let t = Instant::now();
        api.send(&sender, &room, &format!("{run}-cw{i}"), &body).await?;
        let mut next = Some(poll);
        // Bounded: the sync that carries the message, after at most 10 that do not.
        for _ in 0..10 {
            let Some(p) = next.take() else { break };
            let v = p.await.map_err(|e| e.to_string())??;
            syncs += 1;
            since = v["next_batch"].as_str().ok_or("sync: no next_batch")?.to_owned();
            let bodies = super::timeline_bodies(&v);
            events += bodies.len();
            if bodies.contains(&body) {
                lat.push(ms(t.elapsed()));
                break;
            }
            empty += 1;
            let (api, reader, since, filter) = (api.clone(), reader.clone(), since.clone(), filter.clone());
            next = Some(tokio::spawn(async move { api.sync(&reader, Some(&since), 30_000, Some(&filter)).await }));
        }
    }
    let woken = meter.stop();
    let lat = sorted(lat);
    out.put("messages", k);
    out.put("server_cpu_ms_per_send_alone", r2(1000.0 * alone_cpu / k as f64));
    if let Some(c) = woken.cpu_s {
        out.put("server_cpu_ms_per_send_and_sync", r2(1000.0 * c / k as f64));
        // The target's figure: what the woken sync adds to a send.
        out.put("server_cpu_ms_per_woken_sync", r2(1000.0 * (c - alone_cpu) / k as f64));
    }
    out.put("syncs", syncs);
    out.put("syncs_without_the_message", empty);
    out.put("messages_delivered", lat.len());
    out.put("timeline_messages_per_sync", r2(events as f64 / syncs.max(1) as f64));
    out.put("send_to_sync_p50_ms", r2(pct(&lat, 50.0)));
    out.put("send_to_sync_p99_ms", r2(pct(&lat, 99.0)));
    out.measured = Some(woken);
    if lat.len() < k {
        out.error = Some(format!("{} of {k} messages never reached the long-poll", k - lat.len()));
    }
    Ok(out)
}

/// `request-floor` (see the module comment).
pub(crate) async fn scenario_request_floor(api: &Api, a: &Args, tck: f64) -> Res<Outcome> {
    let s = &a.scale;
    let mut out = Outcome::new("request-floor");
    let ticks = (s.floor_rate * s.floor_seconds as f64).round().max(1.0) as usize;
    let burst = s.floor_burst.max(1);
    let path = "/_matrix/client/versions";
    // `burst` requests at once: the tool's client opens a connection for each and keeps
    // them (as long-polls keep theirs), the first burst unmeasured.
    let burst_of_requests = || {
        futures_util::future::join_all((0..burst).map(|_| async {
            let t = Instant::now();
            api.ok(reqwest::Method::GET, path, None, None).await.map(|_| ms(t.elapsed()))
        }))
    };
    for answer in burst_of_requests().await {
        answer?;
    }
    let interval = Duration::from_secs_f64(1.0 / s.floor_rate.max(0.1));
    let mut lat = Vec::with_capacity(ticks * burst);
    let meter = Meter::start(a.server_pid, tck);
    let t0 = tokio::time::Instant::now();
    for i in 0..ticks {
        tokio::time::sleep_until(t0 + interval * i as u32).await;
        for answer in burst_of_requests().await {
            lat.push(answer?);
        }
    }
    let m = meter.stop();
    let lat = sorted(lat);
    out.put("ticks", ticks);
    out.put("requests", lat.len());
    if let Some(c) = m.cpu_s {
        out.put("server_cpu_us_per_request", r2(1e6 * c / lat.len().max(1) as f64));
        out.put("server_cpu_ms_per_tick", r2(1000.0 * c / ticks as f64));
    }
    out.put("request_p50_ms", r2(pct(&lat, 50.0)));
    out.put("request_p99_ms", r2(pct(&lat, 99.0)));
    out.measured = Some(m);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::checkpoints;

    #[test]
    fn checkpoints_double_from_250_and_end_at_the_room_size() {
        assert_eq!(checkpoints(10_000), vec![250, 500, 1_000, 2_000, 4_000, 8_000, 10_000]);
        assert_eq!(checkpoints(500), vec![250, 500]);
        assert_eq!(checkpoints(100), vec![100]);
    }
}
