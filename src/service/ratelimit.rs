//! Rate limits: token buckets per (kind, key), in memory. Keys are client addresses
//! (`ip:...`) or users (`user:...`); a failed password costs a token of both.

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
    /// Every `/login` attempt, per client address.
    Login,
    /// Every new registration (one per UIA session), username probe and token check,
    /// per client address.
    Registration,
    /// Password checks that fail (`/login` and UIA), per user and per client address.
    FailedPassword,
    /// Media uploads and reserved media ids, per user.
    MediaUpload,
}

pub struct RateLimiter {
    config: RateLimits,
    buckets: Mutex<HashMap<(RateLimitKind, String), (f64, Instant)>>,
}

/// Past this many tracked keys, full buckets are forgotten.
const MAX_TRACKED: usize = 10_000;

/// The key of a client address.
pub fn ip_key(ip: &str) -> String {
    format!("ip:{ip}")
}

/// The key of a user.
pub fn user_key(user: &str) -> String {
    format!("user:{user}")
}

impl RateLimiter {
    pub fn new(config: RateLimits) -> Self {
        RateLimiter { config, buckets: Mutex::new(HashMap::new()) }
    }

    fn bucket(&self, kind: RateLimitKind) -> &Bucket {
        match kind {
            RateLimitKind::Login => &self.config.login,
            RateLimitKind::Registration => &self.config.registration,
            RateLimitKind::FailedPassword => &self.config.failed_password,
            RateLimitKind::MediaUpload => &self.config.media_upload,
        }
    }

    /// Takes one token for `key`, or answers `M_LIMIT_EXCEEDED` with when to retry.
    pub fn check(&self, kind: RateLimitKind, key: &str) -> Result<()> {
        self.acquire(kind, &[key])
    }

    /// Takes one token from each of `keys`' buckets, all or none: if any bucket is
    /// empty, nothing is taken and the answer is `M_LIMIT_EXCEEDED` with the longest wait.
    pub fn acquire(&self, kind: RateLimitKind, keys: &[&str]) -> Result<()> {
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
        let mut wait: f64 = 0.0;
        for key in keys {
            let (level, at) = buckets.entry((kind, (*key).to_owned())).or_insert((capacity, now));
            *level = (*level + now.duration_since(*at).as_secs_f64() * bucket.per_second).min(capacity);
            *at = now;
            if *level < 1.0 {
                wait = wait.max((1.0 - *level) / bucket.per_second);
            }
        }
        if wait > 0.0 {
            return Err(Error::limit_exceeded(Duration::from_secs_f64(wait.max(0.001))));
        }
        for key in keys {
            if let Some((level, _)) = buckets.get_mut(&(kind, (*key).to_owned())) {
                *level -= 1.0;
            }
        }
        Ok(())
    }

    /// Gives back the tokens `acquire` took (the attempt turned out not to count,
    /// such as a password that was right).
    pub fn refund(&self, kind: RateLimitKind, keys: &[&str]) {
        if !self.config.enabled {
            return;
        }
        let capacity = f64::from(self.bucket(kind).burst);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        for key in keys {
            if let Some((level, _)) = buckets.get_mut(&(kind, (*key).to_owned())) {
                *level = (*level + 1.0).min(capacity);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter() -> RateLimiter {
        RateLimiter::new(RateLimits {
            enabled: true,
            login: Bucket { per_second: 0.001, burst: 2 },
            registration: Bucket { per_second: 1.0, burst: 1 },
            failed_password: Bucket { per_second: 0.001, burst: 2 },
            media_upload: Bucket { per_second: 1.0, burst: 1 },
        })
    }

    #[test]
    fn bucket_allows_burst_then_refuses() {
        let limiter = limiter();
        assert!(limiter.check(RateLimitKind::Login, "a").is_ok());
        assert!(limiter.check(RateLimitKind::Login, "a").is_ok());
        assert_eq!(limiter.check(RateLimitKind::Login, "a").unwrap_err().errcode(), "M_LIMIT_EXCEEDED");
        assert!(limiter.check(RateLimitKind::Login, "b").is_ok(), "keys are separate");
        assert!(limiter.check(RateLimitKind::Registration, "a").is_ok(), "kinds are separate");
    }

    #[test]
    fn acquire_takes_all_or_nothing_and_refund_gives_back() {
        let limiter = limiter();
        let kind = RateLimitKind::FailedPassword;
        limiter.acquire(kind, &["user:a", "ip:1"]).unwrap();
        limiter.acquire(kind, &["user:a", "ip:2"]).unwrap();
        // user:a is empty: nothing is taken from ip:3.
        assert_eq!(limiter.acquire(kind, &["user:a", "ip:3"]).unwrap_err().errcode(), "M_LIMIT_EXCEEDED");
        limiter.acquire(kind, &["ip:3"]).unwrap();
        limiter.acquire(kind, &["ip:3"]).unwrap();
        assert!(limiter.acquire(kind, &["ip:3"]).is_err());
        // A refund makes room again, up to the burst.
        limiter.refund(kind, &["user:a"]);
        limiter.acquire(kind, &["user:a"]).unwrap();
        assert!(limiter.acquire(kind, &["user:a"]).is_err());
    }
}
