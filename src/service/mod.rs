//! Services: the Matrix logic of Convo. They know ruma types and the `Store`, nothing
//! of axum or SQL. `Services` is built once per server and shared as an `Arc`; each
//! file adds the methods of one area (users, sessions, UIA, profile, account data).

mod account_data;
pub mod cache;
mod cross_signing;
mod dehydrated_devices;
pub mod directory;
pub mod e2e;
mod ephemeral;
pub mod federation;
mod ids;
mod key_backups;
pub mod media;
mod notifications;
mod openid;
mod password;
mod profile;
mod push;
mod push_sender;
mod pushers;
mod ratelimit;
pub mod rooms;
mod search;
mod server_keys;
mod sessions;
pub mod sync;
mod uiaa;
mod users;
mod voip;

use std::{
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use ruma::{OwnedServerName, RoomVersionId};
use tokio::sync::Semaphore;

pub use self::{
    dehydrated_devices::NewDehydratedDevice,
    ids::{generate_registration_token, hash_token},
    ratelimit::{RateLimitKind, RateLimiter},
    sessions::{IssuedSession, Session},
    users::{LoginRequest, RegisterOutcome, RegisterRequest},
};
use self::{
    ephemeral::Typing,
    rooms::{MemberCache, RoomLocks},
    sync::notifier::{LocalNotifier, Notifier, WaitingSyncs},
};
use crate::{config::Config, storage::Store};

/// The room versions Convo can create and join: 6 to 12 (ruma does not implement the
/// older algorithms).
pub const SUPPORTED_ROOM_VERSIONS: [RoomVersionId; 7] = [
    RoomVersionId::V6,
    RoomVersionId::V7,
    RoomVersionId::V8,
    RoomVersionId::V9,
    RoomVersionId::V10,
    RoomVersionId::V11,
    RoomVersionId::V12,
];

pub fn rooms_supported(version: &RoomVersionId) -> bool {
    SUPPORTED_ROOM_VERSIONS.contains(version)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

pub struct Services {
    pub config: Arc<Config>,
    pub store: Store,
    pub rate_limiter: RateLimiter,
    /// The client API's URL, for `/.well-known/matrix/client`.
    pub public_baseurl: String,
    /// Bounds concurrent argon2 work: each hash holds its memory and a core.
    hashing: Semaphore,
    /// The server's ed25519 key, which signs every event it makes.
    pub signing_key: ruma::signatures::Ed25519KeyPair,
    /// Wakes waiting `/sync`s.
    pub notifier: Box<dyn Notifier>,
    /// `/sync` requests waiting on the notifier (tests wait on it).
    pub waiting_syncs: WaitingSyncs,
    /// Room summaries' member figures (`sync/summaries.rs`).
    pub summaries: sync::Summaries,
    pub room_locks: RoomLocks,
    /// Held while a local user joins a room through another server, so that a second
    /// local user waits and then joins here instead of running a second send_join.
    pub remote_joins: RoomLocks,
    /// Held while a room is upgraded, so that upgrades of one room run one at a time
    /// (a second one finds the first's tombstone).
    pub upgrades: RoomLocks,
    /// Each room's forward extremities and state group, kept under the room lock.
    pub room_heads: rooms::append::RoomHeads,
    pub member_cache: MemberCache,
    /// The client forms of recently served events (`rooms/format.rs`).
    pub client_forms: rooms::format::ClientForms,
    /// Membership and history visibility by (state group, user) (`rooms/visibility.rs`).
    pub group_visibility: rooms::visibility::GroupVisibility,
    pub typing: Typing,
    /// Local users' presence as last written or read (`ephemeral.rs`).
    pub presence_seen: ephemeral::PresenceSeen,
    /// Room versions, which never change, by room.
    pub room_versions: std::sync::Mutex<std::collections::HashMap<ruma::OwnedRoomId, RoomVersionId>>,
    /// Push rulesets of recent recipients of events.
    pub ruleset_cache: notifications::RulesetCache,
    /// Joined counts and local members' display names, for evaluating push rules.
    pub push_members_cache: notifications::PushMembersCache,
    /// The outbound federation queues' senders, one per destination.
    pub federation_sender: federation::sender::FederationSender,
    pub push_sender: push_sender::PushSender,
    /// Federation: the outbound client and the key fetcher.
    pub federation: federation::Federation,
    /// The media repository: files, upload waiters, thumbnailing.
    pub media: media::Media,
    /// Turns true when the server begins to shut down: waiting `/sync`s answer at once.
    shutting_down: tokio::sync::watch::Sender<bool>,
    /// Keys trusted without asking: our own, and those tests add. Other servers' keys
    /// come from the key service (`federation/keys.rs`).
    pub known_keys: Arc<rooms::pipeline::KnownKeys>,
}

impl Services {
    pub fn new(config: Arc<Config>, store: Store, public_baseurl: String) -> Result<Arc<Self>, String> {
        let hashing = Semaphore::new(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2));
        let signing_key = server_keys::load_or_generate(&config.data_dir.join("signing.key"))?;
        let federation = federation::Federation::new(&config.federation)?;
        let push_sender = push_sender::PushSender::new(&config.push)?;
        let known_keys = Arc::new(rooms::pipeline::KnownKeys::new(
            config.server_name.as_str(),
            &format!("ed25519:{}", signing_key.version()),
            &signing_key.public_key(),
        ));
        let notifier = Box::new(LocalNotifier::new(store.stream_watch()));
        let budget = cache::CacheBudget::new(&config.caches);
        store.live.set_max_bytes(budget.bytes(cache::shares::LIVE_TAILS));
        Ok(Arc::new(Services {
            media: media::Media::new(&config.media),
            federation,
            known_keys,
            rate_limiter: RateLimiter::new(config.rate_limits.clone()),
            config,
            store,
            public_baseurl,
            hashing,
            signing_key,
            notifier,
            waiting_syncs: Default::default(),
            summaries: Default::default(),
            room_locks: RoomLocks::default(),
            remote_joins: RoomLocks::default(),
            upgrades: RoomLocks::default(),
            room_heads: Default::default(),
            member_cache: MemberCache::new(budget.bytes(cache::shares::ROOM_MEMBERS)),
            client_forms: rooms::format::ClientForms::with_bound(budget.bytes(cache::shares::CLIENT_FORMS)),
            group_visibility: cache::ByteCache::new(
                budget.bytes(cache::shares::GROUP_VISIBILITY),
                rooms::visibility::weigh_group_visibility,
            ),
            typing: Typing::default(),
            presence_seen: ephemeral::PresenceSeen::default(),
            room_versions: Default::default(),
            ruleset_cache: notifications::RulesetCache::new(
                budget.bytes(cache::shares::PUSH_RULESETS),
                budget.bytes(cache::shares::PUSH_TEMPLATES),
            ),
            push_members_cache: notifications::PushMembersCache::new(budget.bytes(cache::shares::PUSH_MEMBERS)),
            federation_sender: Default::default(),
            push_sender,
            shutting_down: tokio::sync::watch::channel(false).0,
        }))
    }

    /// Ends every long-poll under way (and any that starts later), so that a graceful
    /// shutdown does not wait out their timeouts.
    pub fn begin_shutdown(&self) {
        self.shutting_down.send_replace(true);
    }

    /// Resolves once the server has begun to shut down.
    pub async fn shutdown_started(&self) {
        let mut rx = self.shutting_down.subscribe();
        let _ = rx.wait_for(|down| *down).await;
    }

    /// On first start in token mode, when no registration token exists at all, makes
    /// one so that the first account can be created. Returns it, for printing.
    pub async fn ensure_first_registration_token(&self) -> crate::error::Result<Option<String>> {
        if self.config.registration.mode != crate::config::RegistrationMode::Token
            || !self.config.registration.tokens.is_empty()
            || !self.store.list_registration_tokens().await?.is_empty()
        {
            return Ok(None);
        }
        let token = generate_registration_token();
        self.store.create_registration_token(&token, Some(1), None, now_ms()).await?;
        Ok(Some(token))
    }

    pub fn server_name(&self) -> &OwnedServerName {
        &self.config.server_name
    }
}
