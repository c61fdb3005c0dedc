//! Rate limits: a token bucket per (kind, client address), in memory.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::{
    config::{Bucket, RateLimits},
    error::{Error, Result},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RateLimitKind {
    Login,
    Registration,
}

pub struct RateLimiter {
    config: RateLimits,
    buckets: Mutex<HashMap<(RateLimitKind, String), (f64, Instant)>>,
}

/// Past this many tracked keys, full buckets are forgotten.
const MAX_TRACKED: usize = 10_000;

impl RateLimiter {
    pub fn new(config: RateLimits) -> Self {
        RateLimiter { config, buckets: Mutex::new(HashMap::new()) }
    }

    fn bucket(&self, kind: RateLimitKind) -> &Bucket {
        match kind {
            RateLimitKind::Login => &self.config.login,
            RateLimitKind::Registration => &self.config.registration,
        }
    }

    /// Takes one token for `key`, or answers `M_LIMIT_EXCEEDED` with when to retry.
    pub fn check(&self, kind: RateLimitKind, key: &str) -> Result<()> {
        if !self.config.enabled {
            return Ok(());
        }
        let bucket = self.bucket(kind);
        let capacity = f64::from(bucket.burst);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() > MAX_TRACKED {
            buckets.retain(|(k, _), (level, at)| {
                let b = self.bucket(*k);
                level.min(f64::from(b.burst)) + now.duration_since(*at).as_secs_f64() * b.per_second
                    < f64::from(b.burst)
            });
        }
        let (level, at) = buckets.entry((kind, key.to_owned())).or_insert((capacity, now));
        *level = (*level + now.duration_since(*at).as_secs_f64() * bucket.per_second).min(capacity);
        *at = now;
        if *level >= 1.0 {
            *level -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - *level) / bucket.per_second;
            Err(Error::limit_exceeded(Duration::from_secs_f64(wait.max(0.001))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_refuses() {
        let limiter = RateLimiter::new(RateLimits {
            enabled: true,
            login: Bucket { per_second: 0.001, burst: 2 },
            registration: Bucket { per_second: 1.0, burst: 1 },
        });
        assert!(limiter.check(RateLimitKind::Login, "a").is_ok());
        assert!(limiter.check(RateLimitKind::Login, "a").is_ok());
        assert_eq!(limiter.check(RateLimitKind::Login, "a").unwrap_err().errcode(), "M_LIMIT_EXCEEDED");
        assert!(limiter.check(RateLimitKind::Login, "b").is_ok(), "keys are separate");
        assert!(limiter.check(RateLimitKind::Registration, "a").is_ok(), "kinds are separate");
    }
}
