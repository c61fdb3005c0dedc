//! The load tool's `search` scenario: one user fills one room with `--search-fill`
//! messages of words drawn (deterministically) from a made-up word list, then searches
//! for single words of the list, one request at a time, for at most `--search-queries`
//! requests and `--search-seconds` seconds per variant: rank order and recent order
//! without context (the search alone), and rank order with the context Element asks for
//! (one event either side, with profiles). Reported per variant: latency median and p99,
//! and the mean number of results counted per query.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::{Api, Args, Meter, Outcome, Res, ms, pct, r2, sorted};

/// Options of the search scenario (flattened into the tool's arguments).
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct SearchArgs {
    /// search: messages in the searched room.
    #[arg(long, default_value_t = 100_000)]
    search_fill: usize,
    /// search: words in the word list (each message has 8; a word is in about
    /// fill * 8 / words messages).
    #[arg(long, default_value_t = 2_000)]
    search_words: usize,
    /// search: concurrent senders while filling.
    #[arg(long, default_value_t = 8)]
    search_fill_concurrency: usize,
    /// search: most queries per variant.
    #[arg(long, default_value_t = 200)]
    search_queries: usize,
    /// search: most seconds of querying per variant.
    #[arg(long, default_value_t = 20)]
    search_seconds: u64,
    /// search: hard deadline of the whole scenario, fill included, in seconds (filling
    /// 100,000 messages takes minutes: `--scenario-timeout` is too short for it).
    #[arg(long, default_value_t = 1_800)]
    pub(crate) search_timeout: u64,
}

/// A deterministic generator (xorshift), so that runs and servers see the same text.
struct Words {
    list: Vec<String>,
    state: u64,
}

impl Words {
    fn new(n: usize) -> Words {
        const ONSETS: [&str; 16] = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch", "sh"];
        const VOWELS: [&str; 6] = ["a", "e", "i", "o", "u", "ai"];
        // Three syllables: 96^3 distinct words, far more than any list asks.
        let syllable = |i: usize| format!("{}{}", ONSETS[i % 16], VOWELS[(i / 16) % 6]);
        let list =
            (0..n.max(1)).map(|i| format!("{}{}{}", syllable(i), syllable(i / 96 + 7), syllable(i * 7 + 3))).collect();
        Words { list, state: 0x9E37_79B9_7F4A_7C15 }
    }

    fn next(&mut self) -> usize {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        (self.state % self.list.len() as u64) as usize
    }

    fn word(&mut self) -> String {
        let i = self.next();
        self.list[i].clone()
    }

    fn sentence(&mut self, n: usize) -> String {
        (0..n).map(|_| self.word()).collect::<Vec<_>>().join(" ")
    }
}

pub(crate) async fn scenario_search(api: &Api, a: &Args, run: &str, tck: f64) -> Res<Vec<Outcome>> {
    let s = &a.search;
    let users = api.register_many(&format!("{run}q"), 1, 1).await?;
    let user = users[0].clone();
    let room = api.create_room(&user, "search").await?;

    // Fill: the sentences are made up front so every sender draws from one sequence.
    let mut words = Words::new(s.search_words);
    let sentences: Arc<Vec<String>> = Arc::new((0..s.search_fill).map(|_| words.sentence(8)).collect());
    let fill_started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..s.search_fill_concurrency.max(1) {
        let (api, user, room, next, sentences) =
            (api.clone(), user.clone(), room.clone(), next.clone(), sentences.clone());
        let txn = format!("{run}-s");
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= sentences.len() {
                    return Ok::<(), String>(());
                }
                api.send(&user, &room, &format!("{txn}-{i}"), &sentences[i]).await?;
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let fill_s = fill_started.elapsed().as_secs_f64();

    let variants: [(&str, Value); 3] = [
        ("search rank", json!({"order_by": "rank", "event_context": {"before_limit": 0, "after_limit": 0}})),
        ("search recent", json!({"order_by": "recent", "event_context": {"before_limit": 0, "after_limit": 0}})),
        (
            "search rank+context",
            json!({"order_by": "rank", "event_context": {"before_limit": 1, "after_limit": 1, "include_profile": true}}),
        ),
    ];
    let mut outs = Vec::new();
    for (name, extra) in variants {
        let mut out = Outcome::new(name);
        let deadline = Instant::now() + Duration::from_secs(s.search_seconds);
        let meter = Meter::start(a.server_pid, tck);
        let (mut lat, mut counts, mut errors) = (Vec::new(), 0u64, 0usize);
        let mut query_words = Words::new(s.search_words);
        for _ in 0..s.search_queries {
            if Instant::now() >= deadline {
                break;
            }
            let word = query_words.word();
            let mut criteria = json!({"search_term": word, "filter": {"rooms": [room], "limit": 10}});
            if let (Some(c), Some(e)) = (criteria.as_object_mut(), extra.as_object()) {
                c.extend(e.clone());
            }
            let body = json!({"search_categories": {"room_events": criteria}});
            let t = Instant::now();
            match api.ok(reqwest::Method::POST, "/_matrix/client/v3/search", Some(&user.token), Some(&body)).await {
                Ok(v) => {
                    lat.push(ms(t.elapsed()));
                    let found = &v["search_categories"]["room_events"];
                    counts += found["count"].as_u64().unwrap_or(0);
                    if found["results"].as_array().is_none_or(Vec::is_empty) {
                        errors += 1;
                        if errors <= 3 {
                            eprintln!("search for {word} found nothing: {v}");
                        }
                    }
                }
                Err(e) => {
                    errors += 1;
                    if errors <= 3 {
                        eprintln!("search error: {e}");
                    }
                }
            }
        }
        let m = meter.stop();
        let lat = sorted(lat);
        out.put("room_messages", s.search_fill);
        out.put("fill_s", r2(fill_s));
        out.put("queries", lat.len());
        out.put("errors", errors);
        out.put("results_counted_mean", r2(counts as f64 / lat.len().max(1) as f64));
        out.put("latency_p50_ms", r2(pct(&lat, 50.0)));
        out.put("latency_p99_ms", r2(pct(&lat, 99.0)));
        if let Some(c) = m.cpu_s {
            out.put("server_cpu_ms_per_query", r2(1000.0 * c / lat.len().max(1) as f64));
        }
        out.measured = Some(m);
        if lat.is_empty() {
            out.error = Some(format!("no search answered ({errors} errors)"));
        }
        outs.push(out);
    }
    Ok(outs)
}

#[cfg(test)]
mod tests {
    use super::Words;

    #[test]
    fn the_word_list_is_distinct_and_deterministic() {
        let words = Words::new(2_000);
        let mut unique = words.list.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 2_000);
        assert!(words.list.iter().all(|w| w.chars().all(|c| c.is_ascii_lowercase())));
        let (mut a, mut b) = (Words::new(2_000), Words::new(2_000));
        assert_eq!(a.sentence(8), b.sentence(8));
    }
}
