//! Convo's configuration: one typed struct per `[section]`, loaded from built-in
//! defaults, then an optional TOML file, then `CONVO_*` environment variables.
//!
//! The doc comment on each key is its documentation; `config.example.toml` repeats
//! every key with its default and a test keeps the two in step.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use ruma::{OwnedServerName, RoomVersionId};
use serde::{Deserialize, Serialize};

/// The whole configuration.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The server name: the part after the colon in `@alice:example.org`. It cannot
    /// change once users exist.
    pub server_name: OwnedServerName,
    /// Folder for the SQLite database, media and the signing key. Created at start.
    pub data_dir: PathBuf,
    pub listeners: Listeners,
    pub database: Database,
    pub registration: Registration,
    pub password_policy: PasswordPolicy,
    pub password_hashing: PasswordHashing,
    pub sessions: Sessions,
    pub rooms: Rooms,
    pub media: Media,
    pub limits: Limits,
    pub rate_limits: RateLimits,
    pub logging: Logging,
    pub federation: Federation,
    pub voip: Voip,
    pub presence: Presence,
}

/// Where Convo listens and how clients find it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Listeners {
    /// Address of the client-server API (plain HTTP; put a TLS proxy in front for the
    /// internet). Port 0 picks a free port.
    pub client: SocketAddr,
    /// Reverse proxies whose forwarding header is believed: addresses or CIDR ranges
    /// (`"127.0.0.1"`, `"10.0.0.0/8"`, `"::1"`). The client's address is then the
    /// right-most address in that header that is not a trusted proxy. Empty: every
    /// forwarding header is ignored and the connection's address is the client's
    /// (rate limits and "last seen" use it).
    pub trusted_proxies: Vec<crate::http::client_ip::IpNet>,
    /// The header the trusted proxies write: `x-forwarded-for` or `forwarded` (RFC 7239).
    /// The other one is ignored, so a client cannot forge its address through it.
    pub forwarded_header: ForwardedHeader,
    /// Address of the server-server (federation) API, served over TLS.
    pub federation: SocketAddr,
    /// PEM certificate chain for the federation listener. Empty: federation is off.
    pub federation_tls_certificate: PathBuf,
    /// PEM private key for the federation listener.
    pub federation_tls_key: PathBuf,
    /// The URL clients use to reach the client API, advertised in
    /// `/.well-known/matrix/client`. Empty: `http://` plus the client address.
    pub public_baseurl: String,
}

/// Which forwarding header the trusted proxies set.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedHeader {
    XForwardedFor,
    Forwarded,
}

/// The database. `sqlite://PATH` (the embedded default) or `postgres://USER:PASS@HOST/DB`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Database {
    /// Empty: `sqlite://` + `data_dir` + `/convo.db`.
    pub url: String,
    /// Most connections the pool opens (readers, for SQLite; writes go through one).
    pub pool_size: u32,
}

/// Who may create an account.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Registration {
    /// `token` (a registration token is needed), `open` (anyone), `closed` (only
    /// `convo admin create-user`).
    pub mode: RegistrationMode,
    /// Tokens that are always valid, with no use limit, in addition to those made with
    /// `convo admin registration-token create`.
    pub tokens: Vec<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RegistrationMode {
    Token,
    Open,
    Closed,
}

/// What a password must look like.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PasswordPolicy {
    pub min_length: usize,
    pub require_digit: bool,
    pub require_lowercase: bool,
    pub require_uppercase: bool,
    pub require_symbol: bool,
}

/// argon2id cost. The defaults are OWASP's (19 MiB, 2 passes, 1 lane); lower them only
/// for tests. Hashes keep their parameters, so changing these is safe.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PasswordHashing {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

/// Access and refresh tokens.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Sessions {
    /// Lifetime of an access token issued with a refresh token, in milliseconds.
    /// Access tokens issued without one do not expire.
    pub access_token_lifetime_ms: u64,
}

/// Rooms.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Rooms {
    /// Room version for new rooms when the client does not ask for one.
    pub default_room_version: RoomVersionId,
}

/// The media repository.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Media {
    /// Empty: `data_dir` + `/media`.
    pub path: PathBuf,
    /// Largest upload, in bytes.
    pub max_upload_size: u64,
}

/// Voice and video calls: the TURN server that relays call media between clients
/// behind NAT. The call signalling itself travels as ordinary room events.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Voip {
    /// TURN URIs handed to clients, e.g. `turn:turn.example.org:3478?transport=udp`.
    /// Empty: no TURN server, and `/voip/turnServer` answers `{}`.
    pub turn_uris: Vec<String>,
    /// Secret shared with the TURN server (coturn's `static-auth-secret`): each user
    /// gets credentials made from it that expire after `turn_user_lifetime_ms`.
    pub turn_shared_secret: String,
    /// Fixed credentials, for a TURN server without a shared secret.
    pub turn_username: String,
    pub turn_password: String,
    /// Lifetime of credentials made from the shared secret, in milliseconds.
    pub turn_user_lifetime_ms: u64,
}

impl Default for Voip {
    fn default() -> Self {
        Self {
            turn_uris: Vec::new(),
            turn_shared_secret: String::new(),
            turn_username: String::new(),
            turn_password: String::new(),
            turn_user_lifetime_ms: 86_400_000,
        }
    }
}

/// Who may see whose presence.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Presence {
    /// Whether any signed-in user may read anyone's presence (`GET
    /// /presence/{userId}/status`). Off: only users who share a joined room with them
    /// (others get `403 M_FORBIDDEN`); one's own presence is always readable.
    pub visible_without_shared_room: bool,
}

/// Request limits.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest JSON request body, in bytes (`M_TOO_LARGE` past it). Media uploads use
    /// `media.max_upload_size`.
    pub max_request_body: usize,
}

/// Rate limits, as token buckets.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimits {
    /// Off turns every limit off (tests and benchmarks).
    pub enabled: bool,
    /// Every `/login` attempt, per client address.
    pub login: Bucket,
    /// Each registration (counted once, when its UIA session starts), username check
    /// and registration token check, per client address.
    pub registration: Bucket,
    /// Wrong passwords (at `/login` and in user-interactive auth), per user and per
    /// client address: past it, password checks answer `429 M_LIMIT_EXCEEDED`.
    pub failed_password: Bucket,
}

/// A token bucket: `burst` requests at once, refilled at `per_second`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Bucket {
    pub per_second: f64,
    pub burst: u32,
}

/// Logs, written to standard error.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Logging {
    /// A `tracing` filter such as `info` or `convo=debug,info`. `RUST_LOG` overrides it.
    pub level: String,
    /// `pretty` (for people) or `json` (for log collectors).
    pub format: LogFormat,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Outbound federation trust. All off by default; the test options are for
/// test networks of servers on one machine.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Federation {
    /// A PEM file of extra CA certificates to trust for other servers.
    pub extra_ca_file: PathBuf,
    /// Do not verify other servers' TLS certificates (tests only).
    pub skip_tls_verify: bool,
    /// Allow outbound requests to private and loopback addresses (tests only).
    pub allow_private_destinations: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server_name: "localhost".try_into().expect("valid server name"),
            data_dir: PathBuf::from("convo-data"),
            listeners: Listeners::default(),
            database: Database::default(),
            registration: Registration::default(),
            password_policy: PasswordPolicy::default(),
            password_hashing: PasswordHashing::default(),
            sessions: Sessions::default(),
            rooms: Rooms::default(),
            media: Media::default(),
            limits: Limits::default(),
            rate_limits: RateLimits::default(),
            logging: Logging::default(),
            federation: Federation::default(),
            voip: Voip::default(),
            presence: Presence::default(),
        }
    }
}

impl Default for Listeners {
    fn default() -> Self {
        Self {
            client: "127.0.0.1:8008".parse().expect("valid address"),
            trusted_proxies: Vec::new(),
            forwarded_header: ForwardedHeader::XForwardedFor,
            federation: "127.0.0.1:8448".parse().expect("valid address"),
            federation_tls_certificate: PathBuf::new(),
            federation_tls_key: PathBuf::new(),
            public_baseurl: String::new(),
        }
    }
}

impl Default for Database {
    fn default() -> Self {
        Self { url: String::new(), pool_size: 8 }
    }
}

impl Default for Registration {
    fn default() -> Self {
        Self { mode: RegistrationMode::Token, tokens: Vec::new() }
    }
}

impl Default for PasswordPolicy {
    fn default() -> Self {
        Self {
            min_length: 10,
            require_digit: true,
            require_lowercase: true,
            require_uppercase: true,
            require_symbol: false,
        }
    }
}

impl Default for PasswordHashing {
    fn default() -> Self {
        Self { memory_kib: 19_456, iterations: 2, parallelism: 1 }
    }
}

impl Default for Sessions {
    fn default() -> Self {
        Self { access_token_lifetime_ms: 5 * 60 * 1000 }
    }
}

impl Default for Rooms {
    fn default() -> Self {
        Self { default_room_version: RoomVersionId::V12 }
    }
}

impl Default for Media {
    fn default() -> Self {
        Self { path: PathBuf::new(), max_upload_size: 50 * 1024 * 1024 }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_request_body: 1024 * 1024 }
    }
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            enabled: true,
            login: Bucket { per_second: 0.2, burst: 5 },
            registration: Bucket { per_second: 0.1, burst: 3 },
            failed_password: Bucket { per_second: 0.1, burst: 5 },
        }
    }
}

impl Default for Logging {
    fn default() -> Self {
        Self { level: "info".into(), format: LogFormat::Pretty }
    }
}

impl Default for Federation {
    fn default() -> Self {
        Self { extra_ca_file: PathBuf::new(), skip_tls_verify: false, allow_private_destinations: false }
    }
}

/// A configuration that cannot be used, with the key it is about.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

const ENV_PREFIX: &str = "CONVO_";

impl Config {
    /// Loads defaults, then `file` (if any), then `CONVO_*` variables from `env`.
    pub fn load(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
                toml::from_str::<toml::Table>(&text)
                    .map_err(|e| ConfigError(format!("config file {}: {}", path.display(), e.message())))?
            }
            None => toml::Table::new(),
        };
        for (name, raw) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(str::to_lowercase).collect();
            set_path(&mut table, &path, parse_env_value(&raw))
                .map_err(|e| ConfigError(format!("environment variable {name}: {e}")))?;
        }
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let key = e.path().to_string();
            ConfigError(format!("config key `{key}`: {}", e.inner().message()))
        })?;
        config.validate()?;
        Ok(config.resolved())
    }

    /// Fills in the values derived from others (paths under `data_dir`, the base URL).
    pub fn resolved(mut self) -> Self {
        if self.database.url.is_empty() {
            self.database.url = format!("sqlite://{}", self.data_dir.join("convo.db").display());
        }
        if self.media.path.as_os_str().is_empty() {
            self.media.path = self.data_dir.join("media");
        }
        self
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let url = &self.database.url;
        if !url.is_empty()
            && !(url.starts_with("sqlite:") || url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return Err(ConfigError("config key `database.url`: must start with sqlite:// or postgres://".into()));
        }
        if self.database.pool_size == 0 {
            return Err(ConfigError("config key `database.pool_size`: must be at least 1".into()));
        }
        if self.rooms.default_room_version.rules().is_none()
            || !crate::service::rooms_supported(&self.rooms.default_room_version)
        {
            return Err(ConfigError(
                "config key `rooms.default_room_version`: Convo supports room versions 6 to 12".into(),
            ));
        }
        let tls = (&self.listeners.federation_tls_certificate, &self.listeners.federation_tls_key);
        if tls.0.as_os_str().is_empty() != tls.1.as_os_str().is_empty() {
            return Err(ConfigError(
                "config keys `listeners.federation_tls_certificate` and `listeners.federation_tls_key` must be set together".into(),
            ));
        }
        for (name, bucket) in [
            ("login", &self.rate_limits.login),
            ("registration", &self.rate_limits.registration),
            ("failed_password", &self.rate_limits.failed_password),
        ] {
            if !(bucket.per_second > 0.0) || bucket.burst == 0 {
                return Err(ConfigError(format!(
                    "config key `rate_limits.{name}`: per_second must be above 0 and burst at least 1"
                )));
            }
        }
        if self.password_hashing.memory_kib < 8 * self.password_hashing.parallelism.max(1)
            || self.password_hashing.iterations == 0
        {
            return Err(ConfigError(
                "config key `password_hashing`: memory_kib or iterations too small for argon2".into(),
            ));
        }
        Ok(())
    }

    /// The URL advertised to clients in `/.well-known/matrix/client`.
    pub fn public_baseurl(&self, bound: SocketAddr) -> String {
        if self.listeners.public_baseurl.is_empty() {
            format!("http://{bound}")
        } else {
            self.listeners.public_baseurl.trim_end_matches('/').to_owned()
        }
    }
}

/// An environment value is read as a TOML value when it is one (`8`, `true`,
/// `["a", "b"]`), else as a plain string (`127.0.0.1:8008`, `localhost`).
fn parse_env_value(raw: &str) -> toml::Value {
    toml::from_str::<BTreeMap<String, toml::Value>>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut m| m.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    match path {
        [] => Err("empty key".into()),
        [last] => {
            // A key that stands for a string stays a string even if it looks like a number.
            table.insert(last.clone(), value);
            Ok(())
        }
        [first, rest @ ..] => {
            let entry = table.entry(first.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(t) => set_path(t, rest, value),
                _ => Err(format!("`{first}` is not a section")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
        let loaded = Config::load(Some(&path), Vec::new()).expect("example parses");
        assert_eq!(loaded, Config::default().resolved());
    }

    #[test]
    fn env_overrides_file_and_names_bad_keys() {
        let env = vec![
            ("CONVO_SERVER_NAME".to_owned(), "example.org".to_owned()),
            ("CONVO_DATABASE__POOL_SIZE".to_owned(), "3".to_owned()),
            ("CONVO_REGISTRATION__TOKENS".to_owned(), r#"["a", "b"]"#.to_owned()),
            ("OTHER".to_owned(), "ignored".to_owned()),
        ];
        let c = Config::load(None, env).unwrap();
        assert_eq!(c.server_name.as_str(), "example.org");
        assert_eq!(c.database.pool_size, 3);
        assert_eq!(c.registration.tokens, vec!["a", "b"]);

        let err = Config::load(None, vec![("CONVO_DATABASE__POOLSIZE".into(), "3".into())]).unwrap_err();
        assert!(err.0.contains("database.poolsize"), "{err}");
        let err = Config::load(None, vec![("CONVO_LISTENERS__CLIENT".into(), "nonsense".into())]).unwrap_err();
        assert!(err.0.contains("listeners.client"), "{err}");
        let err = Config::load(None, vec![("CONVO_REGISTRATION__MODE".into(), "maybe".into())]).unwrap_err();
        assert!(err.0.contains("registration.mode"), "{err}");
    }
}
