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
    pub push: Push,
    pub caches: Caches,
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
    /// PostgreSQL: how long a request waits for a database connection, in milliseconds.
    /// Past it (the database is down or overloaded) the request gets `503` with
    /// `Retry-After`, instead of hanging.
    pub acquire_timeout_ms: u64,
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
    /// Largest upload, in bytes (`413 M_TOO_LARGE` past it, checked while the body
    /// streams in). Also the largest remote media fetched over federation.
    pub max_upload_size: u64,
    /// Most bytes of media each local user may have stored (the sum of their uploads).
    /// 0: no quota. Past it an upload gets `403 M_FORBIDDEN`.
    pub user_quota_bytes: u64,
    /// Most ids a user may hold from `POST /_matrix/media/v1/create` that are neither
    /// uploaded nor expired (`429 M_LIMIT_EXCEEDED` past it).
    pub max_pending_uploads: u32,
    /// How long an id from `POST /_matrix/media/v1/create` waits for its upload, in
    /// milliseconds (`unused_expires_at`).
    pub unused_expiry_ms: u64,
    /// Serve the legacy unauthenticated `/_matrix/media/v3/download`, `/thumbnail`
    /// and `/config` (frozen by Matrix 1.11; older clients still use them). Off: they
    /// answer `404 M_NOT_FOUND`, and only `/_matrix/client/v1/media/*` serves media.
    pub legacy_unauthenticated: bool,
    /// Largest width or height, in pixels, of an image Convo decodes to make a
    /// thumbnail. Larger images get no thumbnail (`400`).
    pub max_image_dimension: u32,
    /// Most memory, in bytes, that decoding one image may allocate (a decompression
    /// bomb is refused before it is decoded).
    pub max_image_alloc: u64,
    /// Longest time fetching one remote media item may take, in milliseconds.
    pub remote_fetch_timeout_ms: u64,
    /// URL previews (`/_matrix/client/v1/media/preview_url`). Off: that endpoint
    /// answers `404 M_NOT_FOUND`. On: only public addresses are fetched (unless
    /// `federation.allow_private_destinations`), within the size and time below.
    pub url_preview_enabled: bool,
    /// Largest page read for a URL preview, in bytes.
    pub url_preview_max_size: u64,
    /// Longest time a URL preview may take, in milliseconds.
    pub url_preview_timeout_ms: u64,
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

/// Push notifications: how pushes reach push gateways (`service/push_sender.rs`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Push {
    /// Allow pushers whose gateway URL names (or resolves to) a private or loopback
    /// address (tests, or a gateway on the same network). Off: such pushes are refused.
    pub allow_private_destinations: bool,
    /// Longest time one request to a push gateway may take in all, in milliseconds.
    pub request_timeout_ms: u64,
    /// The first wait before retrying a push that failed, in milliseconds; each further
    /// failure of the same pusher doubles it, up to `max_retry_interval_ms`.
    pub retry_initial_ms: u64,
    /// The longest wait between retries of a failing pusher, in milliseconds.
    pub max_retry_interval_ms: u64,
    /// Attempts at one push before it is given up (and logged); the next one is tried.
    pub max_attempts: u32,
    /// Most pushers one account may have (each notifying event is posted to each): a
    /// further `POST /pushers/set` answers `403 M_FORBIDDEN`.
    pub max_pushers_per_user: u32,
}

impl Default for Push {
    fn default() -> Self {
        Self {
            allow_private_destinations: false,
            request_timeout_ms: 10_000,
            retry_initial_ms: 1_000,
            max_retry_interval_ms: 3_600_000,
            max_attempts: 30,
            max_pushers_per_user: 100,
        }
    }
}

/// In-memory caches (`service/cache.rs`): one ceiling for all of them, in estimated bytes.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Caches {
    /// The most the caches may hold together, in MiB (estimated: each cache weighs its
    /// entries). It is shared out as: served events' client form 50%, push rulesets 10%,
    /// their templates 15%, rooms' members for push rules 15%, rooms' joined local
    /// members 10%. Past its share a cache forgets its least recently used entries (two
    /// generations), which are read from the database again when next needed. May be
    /// fractional; 0 caches nothing.
    pub memory_mb: f64,
}

impl Default for Caches {
    fn default() -> Self {
        Self { memory_mb: 64.0 }
    }
}

/// Request limits.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest JSON request body, in bytes (`M_TOO_LARGE` past it). Media uploads use
    /// `media.max_upload_size`.
    pub max_request_body: usize,
    /// Largest request body on the federation listener, in bytes: a transaction holds
    /// up to 50 PDUs of 64 KiB and 100 EDUs.
    pub max_federation_request_body: usize,
    /// Longest wait for a request's headers, in milliseconds: from the connection's
    /// opening for its first request, else from the request's first byte. Past it the
    /// connection is closed.
    pub header_read_timeout_ms: u64,
    /// Longest wait for a request's whole body once its headers have arrived, in
    /// milliseconds. Past it the request gets `408` and the connection is closed.
    pub body_read_timeout_ms: u64,
    /// How long a connection may stay open with no request under way (HTTP keep-alive),
    /// or with a response its client does not read, in milliseconds. A long-polling
    /// `/sync` is a request under way: never cut.
    pub idle_timeout_ms: u64,
    /// Most client connections open at once. Past it, new connections wait (in the
    /// system's listen queue) until one closes.
    pub max_connections: u32,
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
    /// Media uploads (`/upload` and `/create`), per user.
    pub media_upload: Bucket,
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
    /// Look server names up (DNS, `.well-known`). Off: only IP-literal server names
    /// are contacted, so nothing leaves the machine to find a server (test networks).
    pub resolve_names: bool,
    /// Served as `m.server` in `/.well-known/matrix/server` on the client listener, to
    /// delegate federation for `server_name` to another host and port (for example
    /// `matrix.example.org:443`). Empty: that path answers `404 M_NOT_FOUND`.
    pub well_known_server: String,
    /// The longest wait between retries of a destination that fails, in milliseconds.
    pub max_retry_interval_ms: u64,
    /// How long other servers may cache this server's signing key, in milliseconds
    /// (`valid_until_ts` of `GET /_matrix/key/v2/server`).
    pub key_validity_ms: u64,
    /// Longest wait to connect to another server (TCP and TLS), in milliseconds.
    pub connect_timeout_ms: u64,
    /// Longest wait for the next bytes of another server's response, in milliseconds.
    pub read_timeout_ms: u64,
    /// Longest time one outbound request may take in all, in milliseconds.
    pub request_timeout_ms: u64,
    /// Largest response body accepted from another server, in bytes.
    pub max_response_body: u64,
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
            push: Push::default(),
            caches: Caches::default(),
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
        Self { url: String::new(), pool_size: 8, acquire_timeout_ms: 3_000 }
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
        Self {
            path: PathBuf::new(),
            max_upload_size: 50 * 1024 * 1024,
            user_quota_bytes: 0,
            max_pending_uploads: 10,
            unused_expiry_ms: 86_400_000,
            legacy_unauthenticated: true,
            max_image_dimension: 12_000,
            max_image_alloc: 256 * 1024 * 1024,
            remote_fetch_timeout_ms: 60_000,
            url_preview_enabled: false,
            url_preview_max_size: 1024 * 1024,
            url_preview_timeout_ms: 10_000,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_body: 1024 * 1024,
            max_federation_request_body: 16 * 1024 * 1024,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 60_000,
            idle_timeout_ms: 30_000,
            max_connections: 4096,
        }
    }
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            enabled: true,
            login: Bucket { per_second: 0.2, burst: 5 },
            registration: Bucket { per_second: 0.1, burst: 3 },
            failed_password: Bucket { per_second: 0.1, burst: 5 },
            media_upload: Bucket { per_second: 1.0, burst: 20 },
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
        Self {
            extra_ca_file: PathBuf::new(),
            skip_tls_verify: false,
            allow_private_destinations: false,
            resolve_names: true,
            well_known_server: String::new(),
            max_retry_interval_ms: 3_600_000,
            key_validity_ms: 7 * 86_400_000,
            connect_timeout_ms: 10_000,
            read_timeout_ms: 30_000,
            request_timeout_ms: 60_000,
            max_response_body: 64 * 1024 * 1024,
        }
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
        let defaults = toml::Value::try_from(Config::default()).ok();
        for (name, raw) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(str::to_lowercase).collect();
            let default = defaults.as_ref().and_then(|d| path.iter().try_fold(d, |v, key| v.get(key)));
            set_path(&mut table, &path, parse_env_value(&raw, default))
                .map_err(|e| ConfigError(format!("environment variable {name}: {e}")))?;
        }
        // A section given in part (`CONVO_RATE_LIMITS__LOGIN__BURST=9` alone) keeps the
        // defaults of its other keys.
        if let Some(toml::Value::Table(defaults)) = &defaults {
            fill_from_defaults(&mut table, defaults);
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
        let known = ["sqlite:", "postgres://", "postgresql://"];
        if !url.is_empty() && !known.iter().any(|scheme| url.starts_with(scheme)) {
            return Err(ConfigError("config key `database.url`: must start with sqlite:// or postgres://".into()));
        }
        check_numeric_ranges(self)?;
        check_log_filter(&self.logging.level).map_err(|e| ConfigError(format!("config key `logging.level`: {e}")))?;
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
        let delegated = &self.federation.well_known_server;
        if !delegated.is_empty() && ruma::ServerName::parse(delegated).is_err() {
            return Err(ConfigError(format!(
                "config key `federation.well_known_server`: {delegated:?} is not a server name (host or host:port)"
            )));
        }
        if u64::from(self.password_hashing.memory_kib) < 8 * u64::from(self.password_hashing.parallelism) {
            return Err(ConfigError(
                "config key `password_hashing.memory_kib`: argon2 needs at least 8 KiB per lane (8 × parallelism)"
                    .into(),
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

/// Reads an environment value by the type of the key's default (`default`): a key whose
/// default is a string stays a string, even if it looks like a number
/// (`CONVO_SERVER_NAME=123`, `CONVO_ROOMS__DEFAULT_ROOM_VERSION=11`); numbers, booleans
/// and arrays are parsed as TOML (`8`, `true`, `["a", "b"]`). A key with no default
/// (unknown, or optional) is read as TOML when it parses, else as a string; an
/// unparsable value stays a string, so that the error names the key and the type.
fn parse_env_value(raw: &str, default: Option<&toml::Value>) -> toml::Value {
    let as_string = || toml::Value::String(raw.to_owned());
    let as_toml =
        || toml::from_str::<BTreeMap<String, toml::Value>>(&format!("v = {raw}")).ok().and_then(|mut m| m.remove("v"));
    match default {
        Some(toml::Value::String(_)) => as_string(),
        // `per_second = 1` is a float key given an integer.
        Some(toml::Value::Float(_)) => match as_toml() {
            Some(toml::Value::Integer(i)) => toml::Value::Float(i as f64),
            other => other.unwrap_or_else(as_string),
        },
        _ => as_toml().unwrap_or_else(as_string),
    }
}

/// The allowed range of every numeric key, inclusive. `*` stands for any one section
/// (the buckets of `[rate_limits]`). Every numeric key needs an entry: a unit test
/// walks the defaults and fails on a key that has none, so add one with a new key.
const NUMERIC_RANGES: &[(&str, f64, f64)] = &[
    ("database.pool_size", 1.0, 10_000.0),
    ("database.acquire_timeout_ms", 100.0, 600_000.0),
    ("password_policy.min_length", 0.0, 1024.0),
    // argon2id: at most 4 GiB per hash; lanes run one after the other on one thread.
    ("password_hashing.memory_kib", 8.0, 4_194_304.0),
    ("password_hashing.iterations", 1.0, 64.0),
    ("password_hashing.parallelism", 1.0, 64.0),
    ("sessions.access_token_lifetime_ms", 1_000.0, TEN_YEARS_MS),
    ("media.max_upload_size", 1.0, 1_099_511_627_776.0),
    ("media.user_quota_bytes", 0.0, 1_125_899_906_842_624.0),
    ("media.max_pending_uploads", 1.0, 100_000.0),
    ("media.unused_expiry_ms", 1_000.0, 30.0 * 86_400_000.0),
    ("media.max_image_dimension", 1.0, 100_000.0),
    ("media.max_image_alloc", 1_048_576.0, 17_179_869_184.0),
    ("media.remote_fetch_timeout_ms", 100.0, 3_600_000.0),
    ("media.url_preview_max_size", 1024.0, 104_857_600.0),
    ("media.url_preview_timeout_ms", 100.0, 600_000.0),
    ("limits.max_request_body", 256.0, 1_073_741_824.0),
    ("limits.max_federation_request_body", 65_536.0, 1_073_741_824.0),
    ("limits.header_read_timeout_ms", 100.0, 3_600_000.0),
    ("limits.body_read_timeout_ms", 100.0, 3_600_000.0),
    ("limits.idle_timeout_ms", 100.0, 3_600_000.0),
    ("limits.max_connections", 1.0, 1_000_000.0),
    // Below one per 11 days the wait for a token no longer fits a timer.
    ("rate_limits.*.per_second", 0.000_001, 1_000_000.0),
    ("rate_limits.*.burst", 1.0, 1_000_000.0),
    ("voip.turn_user_lifetime_ms", 1_000.0, TEN_YEARS_MS),
    ("federation.max_retry_interval_ms", 100.0, 7.0 * 86_400_000.0),
    // At least an hour: other servers refetch keys at most this often.
    ("federation.key_validity_ms", 3_600_000.0, 365.0 * 86_400_000.0),
    ("federation.connect_timeout_ms", 100.0, 600_000.0),
    ("federation.read_timeout_ms", 100.0, 3_600_000.0),
    ("federation.request_timeout_ms", 100.0, 3_600_000.0),
    ("federation.max_response_body", 1024.0, 1_073_741_824.0),
    ("push.request_timeout_ms", 100.0, 600_000.0),
    ("push.retry_initial_ms", 10.0, 3_600_000.0),
    ("push.max_retry_interval_ms", 10.0, 7.0 * 86_400_000.0),
    ("push.max_attempts", 1.0, 1000.0),
    ("push.max_pushers_per_user", 1.0, 10_000.0),
    ("caches.memory_mb", 0.0, 1_048_576.0),
];
const TEN_YEARS_MS: f64 = 10.0 * 365.0 * 86_400_000.0;

/// The range that applies to the numeric key at `path` (`a.b.c`).
fn numeric_range(path: &str) -> Option<(f64, f64)> {
    NUMERIC_RANGES.iter().find_map(|&(pattern, min, max)| {
        let mut keys = path.split('.');
        let matches = pattern.split('.').all(|p| keys.next().is_some_and(|k| p == "*" || p == k));
        (matches && keys.next().is_none()).then_some((min, max))
    })
}

/// Every numeric leaf of `value` with its path.
fn numeric_leaves(value: &toml::Value, path: &str, out: &mut Vec<(String, f64)>) {
    match value {
        toml::Value::Integer(i) => out.push((path.to_owned(), *i as f64)),
        toml::Value::Float(f) => out.push((path.to_owned(), *f)),
        toml::Value::Table(table) => {
            for (key, value) in table {
                let path = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                numeric_leaves(value, &path, out);
            }
        }
        _ => {}
    }
}

/// Checks every numeric key against `NUMERIC_RANGES` (NaN and infinities are out of
/// every range).
fn check_numeric_ranges(config: &Config) -> Result<(), ConfigError> {
    let value = toml::Value::try_from(config).map_err(|e| ConfigError(format!("configuration: {e}")))?;
    let mut leaves = Vec::new();
    numeric_leaves(&value, "", &mut leaves);
    for (path, v) in leaves {
        if let Some((min, max)) = numeric_range(&path)
            && !(min <= v && v <= max)
        {
            return Err(ConfigError(format!("config key `{path}`: {v} is out of range ({min} to {max})")));
        }
    }
    Ok(())
}

/// A `tracing` filter that logs what it seems to say: it must parse, and each directive
/// without `=` must be a level (`EnvFilter` would read a bare `verbose` as a target
/// name, and log nothing else at all).
fn check_log_filter(filter: &str) -> Result<(), String> {
    const HINT: &str = "use a level (trace, debug, info, warn, error, off) or target=level, e.g. `convo=debug,info`";
    if filter.trim().is_empty() {
        return Err(format!("empty filter: {HINT}"));
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .map_err(|e| format!("`{filter}` is not a filter ({e}): {HINT}"))?;
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if !directive.contains(['=', '[']) && directive.parse::<tracing_subscriber::filter::LevelFilter>().is_err() {
            return Err(format!("`{directive}` is not a level: {HINT}"));
        }
    }
    Ok(())
}

/// Adds to `table` every key of `defaults` it lacks, section by section.
fn fill_from_defaults(table: &mut toml::Table, defaults: &toml::Table) {
    for (key, default) in defaults {
        match (table.get_mut(key), default) {
            (None, _) => {
                table.insert(key.clone(), default.clone());
            }
            (Some(toml::Value::Table(section)), toml::Value::Table(default)) => fill_from_defaults(section, default),
            _ => {}
        }
    }
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
        // Every key is in the example (the loader fills in missing keys from the defaults).
        let example: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let mut filled = example.clone();
        let toml::Value::Table(defaults) = toml::Value::try_from(Config::default()).unwrap() else { unreachable!() };
        fill_from_defaults(&mut filled, &defaults);
        assert_eq!(filled, example, "config.example.toml lacks keys");
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

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn env_values_are_read_by_the_type_of_their_key() {
        // String keys stay strings even when they look like numbers or booleans.
        let c = Config::load(
            None,
            env(&[
                ("CONVO_ROOMS__DEFAULT_ROOM_VERSION", "11"),
                ("CONVO_SERVER_NAME", "123"),
                ("CONVO_LOGGING__LEVEL", "info"),
                ("CONVO_VOIP__TURN_PASSWORD", "true"),
                ("CONVO_VOIP__TURN_USERNAME", "1.5"),
                ("CONVO_LISTENERS__PUBLIC_BASEURL", "[x]"),
            ]),
        )
        .unwrap();
        assert_eq!(c.rooms.default_room_version, RoomVersionId::V11);
        assert_eq!(c.server_name.as_str(), "123");
        assert_eq!(c.voip.turn_password, "true");
        assert_eq!(c.voip.turn_username, "1.5");
        assert_eq!(c.listeners.public_baseurl, "[x]");

        // Numbers, booleans and arrays are parsed; a float key takes an integer.
        let c = Config::load(
            None,
            env(&[
                ("CONVO_LIMITS__MAX_CONNECTIONS", "12"),
                ("CONVO_RATE_LIMITS__ENABLED", "false"),
                ("CONVO_RATE_LIMITS__LOGIN__PER_SECOND", "2"),
                ("CONVO_RATE_LIMITS__REGISTRATION__PER_SECOND", "0.5"),
                ("CONVO_VOIP__TURN_URIS", r#"["turn:a", "turn:b"]"#),
            ]),
        )
        .unwrap();
        assert_eq!(c.limits.max_connections, 12);
        assert!(!c.rate_limits.enabled);
        assert_eq!(c.rate_limits.login.per_second, 2.0);
        assert_eq!(c.rate_limits.registration.per_second, 0.5);
        assert_eq!(c.voip.turn_uris, vec!["turn:a", "turn:b"]);

        // A number key given words names the key and the expected type.
        let err = Config::load(None, env(&[("CONVO_DATABASE__POOL_SIZE", "eight")])).unwrap_err();
        assert!(err.0.contains("database.pool_size") && err.0.contains("expected"), "{err}");
    }

    #[test]
    fn every_numeric_key_has_a_range() {
        let mut leaves = Vec::new();
        numeric_leaves(&toml::Value::try_from(Config::default()).unwrap(), "", &mut leaves);
        assert!(leaves.len() >= 15, "{leaves:?}");
        for (path, value) in leaves {
            let (min, max) =
                numeric_range(&path).unwrap_or_else(|| panic!("add a range for `{path}` to NUMERIC_RANGES"));
            assert!(min <= value && value <= max, "the default of `{path}` ({value}) is outside {min}..={max}");
        }
    }

    #[test]
    fn numeric_keys_out_of_range_are_refused() {
        for (key, value) in [
            ("CONVO_PASSWORD_HASHING__PARALLELISM", "0"),
            ("CONVO_PASSWORD_HASHING__ITERATIONS", "0"),
            ("CONVO_PASSWORD_HASHING__MEMORY_KIB", "4"),
            ("CONVO_RATE_LIMITS__LOGIN__PER_SECOND", "1e-30"),
            ("CONVO_RATE_LIMITS__LOGIN__PER_SECOND", "nan"),
            ("CONVO_RATE_LIMITS__REGISTRATION__PER_SECOND", "inf"),
            ("CONVO_RATE_LIMITS__REGISTRATION__BURST", "0"),
            ("CONVO_DATABASE__POOL_SIZE", "0"),
            ("CONVO_DATABASE__ACQUIRE_TIMEOUT_MS", "0"),
            ("CONVO_SESSIONS__ACCESS_TOKEN_LIFETIME_MS", "0"),
            ("CONVO_LIMITS__MAX_REQUEST_BODY", "0"),
            ("CONVO_LIMITS__HEADER_READ_TIMEOUT_MS", "0"),
            ("CONVO_LIMITS__BODY_READ_TIMEOUT_MS", "0"),
            ("CONVO_LIMITS__IDLE_TIMEOUT_MS", "0"),
            ("CONVO_LIMITS__MAX_CONNECTIONS", "0"),
            ("CONVO_MEDIA__MAX_UPLOAD_SIZE", "0"),
            ("CONVO_VOIP__TURN_USER_LIFETIME_MS", "0"),
        ] {
            let err = Config::load(None, env(&[(key, value)])).expect_err(key);
            let path = key.trim_start_matches("CONVO_").to_lowercase().replace("__", ".");
            assert!(err.0.contains(&format!("`{path}`")), "{key}={value}: {err}");
        }
        // memory_kib must cover 8 KiB per lane.
        let err = Config::load(
            None,
            env(&[("CONVO_PASSWORD_HASHING__MEMORY_KIB", "16"), ("CONVO_PASSWORD_HASHING__PARALLELISM", "4")]),
        )
        .unwrap_err();
        assert!(err.0.contains("password_hashing.memory_kib"), "{err}");
        // The edges of a range are allowed.
        Config::load(
            None,
            env(&[("CONVO_PASSWORD_HASHING__PARALLELISM", "1"), ("CONVO_RATE_LIMITS__LOGIN__PER_SECOND", "0.000001")]),
        )
        .unwrap();
    }

    #[test]
    fn log_filters_must_say_what_they_mean() {
        for ok in
            ["info", "WARN", "convo=debug,info", "convo=debug", "off", "info,ruma_state_res=warn", "convo[sync]=trace"]
        {
            Config::load(None, env(&[("CONVO_LOGGING__LEVEL", ok)])).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["verbose", "info,verbose", "", "convo=loud", "convo", "=info"] {
            let err = Config::load(None, env(&[("CONVO_LOGGING__LEVEL", bad)])).expect_err(bad);
            assert!(err.0.contains("logging.level"), "{bad}: {err}");
        }
    }

    #[test]
    fn well_known_server_must_be_a_server_name() {
        for ok in ["", "matrix.example.org", "matrix.example.org:443", "[::1]:8448", "10.0.0.1"] {
            let c = Config::load(None, env(&[("CONVO_FEDERATION__WELL_KNOWN_SERVER", ok)])).unwrap();
            assert_eq!(c.federation.well_known_server, ok);
        }
        for bad in ["https://matrix.example.org", "matrix.example.org:99999", "a b", "host:"] {
            let err = Config::load(None, env(&[("CONVO_FEDERATION__WELL_KNOWN_SERVER", bad)])).expect_err(bad);
            assert!(err.0.contains("federation.well_known_server"), "{bad}: {err}");
        }
    }
}
