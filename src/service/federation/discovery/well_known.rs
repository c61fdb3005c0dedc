//! Step 3 of server discovery: `GET https://<hostname>/.well-known/matrix/server`, its
//! redirects, its bounded body, its `m.server` and how long its answer (or its error)
//! is kept. Which name that answer leads to is `discovery`'s business.

use std::{
    net::IpAddr,
    time::{Duration, SystemTime},
};

use reqwest::{
    StatusCode,
    header::{CACHE_CONTROL, EXPIRES, HeaderMap},
};
use ruma::{OwnedServerName, ServerName};

use super::is_public;

/// At most this many redirects are followed.
pub(super) const MAX_REDIRECTS: usize = 5;
/// A body longer than this is not a valid answer.
pub(super) const MAX_BODY: usize = 8 * 1024;
/// The whole request, redirects included, gives up after this.
pub(super) const TIMEOUT: Duration = Duration::from_secs(10);
/// How long a valid answer is kept when its headers say nothing (the spec's default).
pub(super) const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long a valid answer is kept at most (the spec's recommendation), and at least
/// (an answer that says "do not cache" would otherwise be fetched for every request).
pub(super) const MAX_TTL: Duration = Duration::from_secs(48 * 3600);
pub(super) const MIN_TTL: Duration = Duration::from_secs(5 * 60);
/// How long a definite "no delegation" (404, another 4xx, a bad body) is kept.
pub(super) const INVALID_TTL: Duration = Duration::from_secs(3600);
/// A failure that may pass (no connection, timeout, 5xx) is kept for this long, doubled
/// with each failure in a row up to `INVALID_TTL`.
pub(super) const TRANSIENT_TTL: Duration = Duration::from_secs(2 * 60);

/// What a `.well-known` request said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Answer {
    /// A valid `m.server`, kept for the duration.
    Delegated(OwnedServerName, Duration),
    /// A definite answer that is not a delegation: go on with SRV records.
    Invalid(String),
    /// No answer this time (connection, timeout, server error): go on with SRV
    /// records, and ask again sooner than after an invalid answer.
    Failed(String),
}

/// The redirect rule for `.well-known` requests: HTTPS only, no loops, at most
/// `MAX_REDIRECTS`, and no IP literal the private-address rule refuses (names go
/// through the resolver's checked DNS, which refuses those addresses itself).
pub(super) fn redirect_policy(allow_private: bool) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() > MAX_REDIRECTS {
            return attempt.error("too many redirects");
        }
        if attempt.previous().contains(attempt.url()) {
            return attempt.error("redirect loop");
        }
        if attempt.url().scheme() != "https" {
            return attempt.error("redirect to a URL that is not https");
        }
        let host = attempt.url().host_str().unwrap_or_default();
        if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>()
            && !allow_private
            && !is_public(ip)
        {
            return attempt.error(format!("redirect to the non-public address {ip}"));
        }
        attempt.follow()
    })
}

/// Asks `https://<hostname>/.well-known/matrix/server`.
pub(super) async fn fetch(http: &reqwest::Client, hostname: &str) -> Answer {
    let url = format!("https://{hostname}/.well-known/matrix/server");
    let mut response = match http.get(&url).send().await {
        Ok(response) => response,
        Err(e) => return Answer::Failed(format!("{url}: {}", error_chain(&e))),
    };
    let status = response.status();
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        return Answer::Failed(format!("{url}: status {status}"));
    }
    if status != StatusCode::OK {
        return Answer::Invalid(format!("{url}: status {status}"));
    }
    if response.content_length().is_some_and(|n| n > MAX_BODY as u64) {
        return Answer::Invalid(format!("{url}: body over {MAX_BODY} bytes"));
    }
    let ttl = cache_ttl(response.headers(), SystemTime::now());
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY {
                    return Answer::Invalid(format!("{url}: body over {MAX_BODY} bytes"));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => return Answer::Failed(format!("{url}: {}", error_chain(&e))),
        }
    }
    match parse(&body) {
        Ok(server) => Answer::Delegated(server, ttl),
        Err(e) => Answer::Invalid(format!("{url}: {e}")),
    }
}

/// The `m.server` of a body: JSON whatever its `Content-Type`, a valid server name.
pub(super) fn parse(body: &[u8]) -> Result<OwnedServerName, String> {
    let json: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let server = json.get("m.server").ok_or("no m.server")?.as_str().ok_or("m.server is not a string")?;
    ServerName::parse(server).map_err(|e| format!("m.server {server:?} is not a server name: {e}"))
}

/// How long a valid answer is kept: `Cache-Control: max-age` (`s-maxage` is for shared
/// caches), else `Expires`, else a day; `no-store` or `no-cache` mean the minimum; all
/// within `MIN_TTL..=MAX_TTL`.
pub(super) fn cache_ttl(headers: &HeaderMap, now: SystemTime) -> Duration {
    let mut max_age = None;
    for value in headers.get_all(CACHE_CONTROL).iter().filter_map(|v| v.to_str().ok()) {
        for directive in value.split(',').map(str::trim) {
            let (name, arg) = directive.split_once('=').unwrap_or((directive, ""));
            match name.trim().to_ascii_lowercase().as_str() {
                "no-store" | "no-cache" => return MIN_TTL,
                "max-age" => max_age = arg.trim().trim_matches('"').parse::<u64>().ok().map(Duration::from_secs),
                _ => {}
            }
        }
    }
    let ttl = max_age.or_else(|| {
        // An unparsable `Expires` means "already expired" (RFC 9111, 5.3).
        let expires = headers.get(EXPIRES)?;
        let expires =
            expires.to_str().ok().and_then(|v| httpdate::parse_http_date(v).ok()).unwrap_or(SystemTime::UNIX_EPOCH);
        Some(expires.duration_since(now).unwrap_or_default())
    });
    ttl.unwrap_or(DEFAULT_TTL).clamp(MIN_TTL, MAX_TTL)
}

/// An error with its sources, which say what actually went wrong (reqwest's own
/// message is only "error sending request").
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;

    fn headers(pairs: &[(reqwest::header::HeaderName, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(name.clone(), HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn cache_lifetime_follows_the_headers_within_bounds() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let hours = |h: u64| Duration::from_secs(h * 3600);
        assert_eq!(cache_ttl(&headers(&[]), now), DEFAULT_TTL);
        assert_eq!(cache_ttl(&headers(&[(CACHE_CONTROL, "public, max-age=7200")]), now), hours(2));
        assert_eq!(cache_ttl(&headers(&[(CACHE_CONTROL, "max-age=31536000")]), now), MAX_TTL);
        assert_eq!(cache_ttl(&headers(&[(CACHE_CONTROL, "max-age=3")]), now), MIN_TTL);
        assert_eq!(cache_ttl(&headers(&[(CACHE_CONTROL, "max-age=7200, no-store")]), now), MIN_TTL);
        let in_three_hours = httpdate::fmt_http_date(now + hours(3));
        assert_eq!(cache_ttl(&headers(&[(EXPIRES, &in_three_hours)]), now), hours(3));
        // max-age wins over Expires; a bad or past Expires is the minimum.
        assert_eq!(cache_ttl(&headers(&[(EXPIRES, &in_three_hours), (CACHE_CONTROL, "max-age=3600")]), now), hours(1));
        assert_eq!(cache_ttl(&headers(&[(EXPIRES, "0")]), now), MIN_TTL);
        assert_eq!(cache_ttl(&headers(&[(EXPIRES, "Thu, 01 Jan 1970 00:00:00 GMT")]), now), MIN_TTL);
    }

    #[test]
    fn m_server_must_be_a_server_name() {
        assert_eq!(parse(br#"{"m.server": "matrix.example.org:443"}"#).unwrap(), "matrix.example.org:443");
        assert_eq!(parse(br#"{"m.server": "[::1]"}"#).unwrap(), "[::1]");
        for bad in [
            &br#"{"m.server": "https://matrix.example.org"}"#[..],
            br#"{"m.server": "host:99999"}"#,
            br#"{"m.server": ""}"#,
            br#"{"m.server": 7}"#,
            br#"{"m.homeserver": "x.org"}"#,
            br#"["x.org"]"#,
            b"<html>",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
