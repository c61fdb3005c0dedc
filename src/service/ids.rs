//! Random identifiers and secrets: access, refresh and OpenID tokens (256 bits), device ids,
//! UIA session ids, registration tokens; and the hash under which tokens are stored.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use sha2::{Digest, Sha256};

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the operating system's random source works");
    bytes
}

/// `N` characters drawn uniformly from `alphabet` (which has at most 256 symbols).
fn random_string(alphabet: &[u8], n: usize) -> String {
    let limit = 256 - 256 % alphabet.len(); // reject values that would bias the draw
    let mut out = String::with_capacity(n);
    while out.len() < n {
        for b in random_bytes::<32>() {
            if (b as usize) < limit && out.len() < n {
                out.push(alphabet[b as usize % alphabet.len()] as char);
            }
        }
    }
    out
}

/// An access token: 256 random bits, URL-safe base64, with a recognisable prefix.
pub fn generate_access_token() -> String {
    format!("cva_{}", URL_SAFE_NO_PAD.encode(random_bytes::<32>()))
}

/// A refresh token: 256 random bits.
pub fn generate_refresh_token() -> String {
    format!("cvr_{}", URL_SAFE_NO_PAD.encode(random_bytes::<32>()))
}

/// An OpenID token (for other services to learn who the user is): 256 random bits.
pub fn generate_openid_token() -> String {
    format!("cvo_{}", URL_SAFE_NO_PAD.encode(random_bytes::<32>()))
}

/// How a token is stored: hex SHA-256. Tokens are random, so no salt is needed.
pub fn hash_token(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn generate_device_id() -> String {
    random_string(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", 10)
}

pub fn generate_session_id() -> String {
    random_string(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789", 32)
}

/// A registration token: 20 characters of the spec's allowed set (about 119 bits).
pub fn generate_registration_token() -> String {
    random_string(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789", 20)
}

/// A localpart for a registration that names none.
pub fn generate_localpart() -> String {
    format!("u{}", random_string(b"abcdefghijklmnopqrstuvwxyz0123456789", 12))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_hashed() {
        let a = generate_access_token();
        assert_eq!(a.len(), 4 + 43);
        assert_ne!(a, generate_access_token());
        assert_eq!(hash_token("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(generate_device_id().len(), 10);
        assert!(generate_registration_token().chars().all(|c| c.is_ascii_alphanumeric()));
    }
}
