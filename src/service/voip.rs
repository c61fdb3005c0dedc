//! Voice and video calls: TURN credentials for clients. Call signalling itself is
//! ordinary room events (`m.call.*`), which need nothing from the server.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::{Engine, engine::general_purpose::STANDARD};
use hmac::{Hmac, KeyInit, Mac};
use ruma::UserId;
use sha1::Sha1;

use super::Services;

/// What a client needs to use the TURN server.
#[derive(Debug, PartialEq)]
pub struct TurnCredentials {
    pub username: String,
    pub password: String,
    pub uris: Vec<String>,
    pub ttl: Duration,
}

impl Services {
    /// The TURN server and this user's credentials for it; `None` without a TURN
    /// server in the config.
    ///
    /// With a shared secret the credentials follow the TURN REST API convention that
    /// coturn implements: the username is `{expiry in unix seconds}:{user id}` and the
    /// password is base64(HMAC-SHA1(secret, username)), so the TURN server can check
    /// them without asking Convo.
    pub fn turn_credentials(&self, user: &UserId) -> Option<TurnCredentials> {
        let voip = &self.config.voip;
        if voip.turn_uris.is_empty() {
            return None;
        }
        let ttl = Duration::from_millis(voip.turn_user_lifetime_ms);
        if voip.turn_shared_secret.is_empty() {
            return Some(TurnCredentials {
                username: voip.turn_username.clone(),
                password: voip.turn_password.clone(),
                uris: voip.turn_uris.clone(),
                ttl,
            });
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let username = format!("{}:{user}", (now + ttl).as_secs());
        Some(TurnCredentials {
            password: turn_password(&voip.turn_shared_secret, &username),
            username,
            uris: voip.turn_uris.clone(),
            ttl,
        })
    }
}

/// base64(HMAC-SHA1(secret, username)).
fn turn_password(secret: &str, username: &str) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(username.as_bytes());
    STANDARD.encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turn_password_is_hmac_sha1_base64() {
        // RFC 2202 test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(turn_password("Jefe", "what do ya want for nothing?"), "7/zfauXrL6LSdBbV8YTfnCWafHk=");
    }
}
