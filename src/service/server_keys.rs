//! The server's ed25519 signing key: generated at first start, kept in
//! `data_dir/signing.key` as `ed25519 KEY_ID BASE64_SEED`, loaded at every start.

use std::path::Path;

use base64::{Engine, engine::general_purpose::STANDARD_NO_PAD};
use ed25519_dalek::{SigningKey, pkcs8::EncodePrivateKey};
use ruma::signatures::Ed25519KeyPair;

/// Loads the key at `path`, or creates it. Returns the key pair and its id (`ed25519:a_xxxx`).
pub fn load_or_generate(path: &Path) -> Result<Ed25519KeyPair, String> {
    let (version, seed) = if path.exists() {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let parts: Vec<&str> = text.split_whitespace().collect();
        let [algorithm, version, seed] = parts[..] else {
            return Err(format!("{}: expected `ed25519 KEY_ID SEED`", path.display()));
        };
        if algorithm != "ed25519" {
            return Err(format!("{}: only ed25519 keys are supported", path.display()));
        }
        let seed = STANDARD_NO_PAD
            .decode(seed.trim_end_matches('='))
            .map_err(|e| format!("{}: bad key: {e}", path.display()))?;
        let seed: [u8; 32] = seed.try_into().map_err(|_| format!("{}: the key must be 32 bytes", path.display()))?;
        (version.to_owned(), seed)
    } else {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| format!("no randomness for the signing key: {e}"))?;
        let version = format!("a_{}", &super::ids::generate_session_id()[..4]);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        let line = format!("ed25519 {version} {}\n", STANDARD_NO_PAD.encode(seed));
        write_private(path, &line).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        tracing::info!(key = %path.display(), "generated the server signing key");
        (version, seed)
    };
    let der = SigningKey::from_bytes(&seed).to_pkcs8_der().map_err(|e| e.to_string())?;
    Ed25519KeyPair::from_der(der.as_bytes(), version).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(unix)]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(text.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)
}
