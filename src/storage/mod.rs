//! Storage: the only module that speaks SQL or imports sqlx.
//!
//! `Store` offers domain-level methods (`create_user`, `find_access_token`, ...), each
//! one statement or one transaction. The same SQL text serves SQLite and PostgreSQL
//! (both accept `$1` placeholders, `ON CONFLICT`, `RETURNING`); where the dialects
//! differ a method says so with `self.dialect()`. The `on_pool!` macro compiles each
//! method body once per backend. SQLite writes go through a single connection, so
//! writers queue in process instead of failing with `SQLITE_BUSY`.

mod account_data;
mod batch;
pub mod changes;
mod dehydrated_devices;
mod directory;
mod e2e;
mod ephemeral;
mod event_times;
mod events;
mod federation_outbox;
mod key_backups;
pub(crate) mod live;
mod media;
mod memberships;
mod openid;
mod persist;
mod push;
mod pushers;
pub(crate) mod read_cache;
mod redactions;
mod registration_tokens;
mod relations;
mod remote_devices;
mod remote_rooms;
mod reports;
pub(crate) mod search;
mod server_info;
mod server_keys;
mod sessions;
mod stream;
mod uiaa;
mod users;

use std::{collections::HashMap, str::FromStr, time::Duration};

use sqlx::{
    Connection,
    postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions},
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous},
};

pub use self::{
    directory::PublishedRoom,
    e2e::{NewKey, NewToDevice, SignedKeyChanges},
    ephemeral::{PresenceRow, ReceiptRow},
    events::StoredEvent,
    federation_outbox::OutboxBatch,
    key_backups::{BackupKey, BackupScope, BackupVersion, BackupWriteRefused},
    media::{MediaItem, MediaThumbnail, NewContent, UploadRefusal},
    memberships::MembershipRow,
    persist::{
        CurrentChange, Dag, EventTxn, ExtremityChange, NewEvent, NewRoom, Outlier, Persisted, Position, Redaction,
        RoomCreated, StateBefore, StateEntry, StoredAt,
    },
    pushers::{NotificationRow, PushActionRow, PushGroupRow, PushOutcome, PusherRow, QueuedPush, SpanChange},
    registration_tokens::RegistrationTokenInfo,
    relations::{BundledRelations, RelationQuery, ThreadSummary},
    remote_devices::{DeviceUpdate, RemoteDeviceList},
    remote_rooms::RemoteMembership,
    reports::ReportRow,
    search::{MAX_SEARCH_RANGES, SEARCH_KEYS, SearchHit, SearchOrder, SearchQuery},
    server_keys::{StoredKeyResponse, StoredServerKey},
    sessions::{DeviceInfo, NewSession, TokenInfo},
    stream::{HeldPosition, StreamWatch},
    uiaa::UiaaSession,
    users::{NewUser, UserAuth},
};
use crate::error::Error;

/// Runs `$body` with `$pool` bound to the right pool of the store's backend.
/// `read` uses the shared pool; `write` uses the SQLite writer (or the PostgreSQL pool).
macro_rules! on_pool {
    ($store:expr, read, |$pool:ident| $body:expr) => {{
        $store.statements.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match &$store.db {
            $crate::storage::Db::Sqlite { read, .. } => {
                let $pool = read;
                $body
            }
            $crate::storage::Db::Postgres(pg) => {
                let $pool = pg;
                $body
            }
        }
    }};
    ($store:expr, write, |$pool:ident| $body:expr) => {{
        $store.statements.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match &$store.db {
            $crate::storage::Db::Sqlite { write, .. } => {
                let $pool = write;
                $body
            }
            $crate::storage::Db::Postgres(pg) => {
                let $pool = pg;
                $body
            }
        }
    }};
}
pub(crate) use on_pool;

pub(crate) enum Db {
    Sqlite { read: SqlitePool, write: SqlitePool },
    Postgres(PgPool),
}

/// Which SQL dialect a store speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// The database behind Convo.
pub struct Store {
    pub(crate) db: Db,
    /// The live stream's positions and its persisted-up-to mark (`stream.rs`).
    pub(crate) stream: stream::Stream,
    /// Database round trips begun (`on_pool!` uses), for tests that pin how many
    /// statements a path runs.
    pub(crate) statements: std::sync::atomic::AtomicU64,
    /// What changed where, for `/sync` to skip streams that did not move (`changes.rs`).
    pub(crate) changes: changes::ChangeIndex,
    /// State group ids and backfill positions reserved ahead (PostgreSQL; `events.rs`).
    pub(crate) counters: events::CounterBlocks,
    /// Hot reads kept in memory (`read_cache.rs`).
    pub(crate) caches: ReadCaches,
    /// Each room's newest events and kept unread counts, in memory (`live.rs`).
    pub(crate) live: live::Live,
}

/// How long writes gather in the WAL before it is checkpointed, at most.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);
/// How often the checkpoint task looks at how much was written meanwhile.
const CHECKPOINT_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Stream positions written after which the WAL is checkpointed at the next check: a
/// busy server checkpoints about once a second, a quiet one every five seconds.
const CHECKPOINT_AFTER_POSITIONS: i64 = 256;

/// Whether the WAL is checkpointed at a check made `waited` after the first write since
/// the last checkpoint, `written` stream positions later.
fn checkpoint_due(waited: Duration, written: i64) -> bool {
    waited >= CHECKPOINT_EVERY || written >= CHECKPOINT_AFTER_POSITIONS
}

/// Checkpoints SQLite's WAL into the database file in the background, at most
/// `CHECKPOINT_EVERY` after a write (sooner once `CHECKPOINT_AFTER_POSITIONS` were
/// written). A checkpoint run by a commit (SQLite's automatic one) held the one writer,
/// and so every send, for up to 0.3 s. Here a passive checkpoint on a read connection
/// first copies what the WAL holds while writers go on; then a second one, on the write
/// connection (so that no frame is added meanwhile), copies the few frames written
/// during the first. Only a checkpoint that reaches the WAL's end lets the next write
/// transaction start the WAL over: under steady writes the first alone never did, and
/// the WAL grew without end (10 GB in 45 s of 16 concurrent senders, every write past
/// the end of the file, which the kernel zeroes first). Each checkpoint syncs both
/// files, and copies a page written by many commits once: with a checkpoint a second,
/// `fsync` alone was 2.9 % of the server's CPU samples in the fan-out at 20 messages a
/// second, and five seconds cut its CPU per message by 7 % (issue 13). Ends when the
/// store's stream is gone or the pools close.
async fn checkpoint_wal(read: SqlitePool, write: SqlitePool, mut mark: tokio::sync::watch::Receiver<i64>) {
    const PASSIVE: &str = "PRAGMA wal_checkpoint(PASSIVE)";
    while mark.changed().await.is_ok() {
        let from = *mark.borrow_and_update();
        // Checked now and then (no wake per write).
        let mut waited = Duration::ZERO;
        loop {
            tokio::time::sleep(CHECKPOINT_CHECK_EVERY).await;
            waited += CHECKPOINT_CHECK_EVERY;
            if checkpoint_due(waited, *mark.borrow() - from) {
                break;
            }
        }
        if read.is_closed() || write.is_closed() {
            return;
        }
        if let Err(e) = sqlx::query(PASSIVE).execute(&read).await {
            tracing::warn!(error = %e, "could not checkpoint the database's WAL");
            continue;
        }
        let Ok(mut writer) = write.acquire().await else { return };
        if let Err(e) = sqlx::query(PASSIVE).execute(&mut *writer).await {
            tracing::warn!(error = %e, "could not finish checkpointing the database's WAL");
        }
    }
}

/// How long a cached access token answers without asking the database again.
pub const TOKEN_CACHE_TTL: Duration = Duration::from_secs(5);

/// The events that decide what a user may see in a room: (position, type, JSON).
pub(crate) type VisibilityRows = std::sync::Arc<Vec<(i64, String, String)>>;
/// A device's unclaimed one-time keys by algorithm and unused fallback key algorithms.
pub(crate) type KeyStatus = (HashMap<String, i64>, Vec<String>);

/// The store's read caches (`read_cache.rs`), with what each holds.
pub(crate) struct ReadCaches {
    /// Access token hash -> what the token stands for. Written by logins, logouts,
    /// refreshes, device changes, password changes and deactivations.
    pub(crate) tokens: read_cache::ReadCache<String, std::sync::Arc<TokenInfo>>,
    /// User -> their memberships. Written with state events and by remote invites,
    /// rejections and forgetting.
    pub(crate) memberships: read_cache::ReadCache<String, std::sync::Arc<Vec<MembershipRow>>>,
    /// (room, user) -> the events that decide what the user may see there (their
    /// member events, the room's history visibility). Written with state events.
    pub(crate) visibility: read_cache::ReadCache<(String, String), VisibilityRows>,
    /// (user, device) -> unclaimed one-time keys by algorithm, unused fallback key
    /// algorithms. Written by uploads, claims and device deletions.
    pub(crate) key_status: read_cache::ReadCache<(String, String), KeyStatus>,
    /// (room, type, state key) -> the room's current state event there (`None`: none),
    /// as the auth rules of every event sent read it. Written with state events and
    /// redactions.
    pub(crate) current_state: read_cache::ReadCache<StateKey, Option<std::sync::Arc<StoredEvent>>>,
}

/// (room, type, state key).
pub(crate) type StateKey = (String, String, String);

/// A write of sessions or devices in flight: the token and key status caches hold
/// nothing until it ends (`read_cache.rs`).
pub(crate) type DevicesWriting<'a> =
    (read_cache::Writing<'a, String, std::sync::Arc<TokenInfo>>, read_cache::Writing<'a, (String, String), KeyStatus>);

/// A write of memberships, state events or redactions in flight (`read_cache.rs`).
pub(crate) type StateWriting<'a> = (
    read_cache::Writing<'a, String, std::sync::Arc<Vec<MembershipRow>>>,
    read_cache::Writing<'a, (String, String), VisibilityRows>,
    read_cache::Writing<'a, StateKey, Option<std::sync::Arc<StoredEvent>>>,
);

impl Store {
    pub(crate) fn devices_writing(&self) -> DevicesWriting<'_> {
        (self.caches.tokens.begin(), self.caches.key_status.begin())
    }

    pub(crate) fn state_writing(&self) -> StateWriting<'_> {
        (self.caches.memberships.begin(), self.caches.visibility.begin(), self.caches.current_state.begin())
    }
}

impl Default for ReadCaches {
    fn default() -> Self {
        ReadCaches {
            // `convo admin reset-password` ends sessions from another process: a
            // running server stops taking them within this time.
            tokens: read_cache::ReadCache::new(100_000, Some(TOKEN_CACHE_TTL)),
            memberships: read_cache::ReadCache::new(50_000, None),
            visibility: read_cache::ReadCache::new(100_000, None),
            key_status: read_cache::ReadCache::new(100_000, None),
            current_state: read_cache::ReadCache::new(16_384, None),
        }
    }
}

impl From<sqlx::Error> for Error {
    /// A database that does not answer (no connection within the acquire timeout, a
    /// lost connection, PostgreSQL shutting down or refusing connections) is
    /// `Unavailable` (503), anything else `Internal` (500).
    fn from(e: sqlx::Error) -> Self {
        let unavailable = match &e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            // What a connection cut while it starts looks like to sqlx.
            | sqlx::Error::Protocol(_) => true,
            // SQLSTATE class 08 (connection exception), 57P01-57P03 (shutting down,
            // cannot connect now), 53300 (too many connections).
            sqlx::Error::Database(db) => {
                db.code().is_some_and(|code| code.starts_with("08") || code.starts_with("57P0") || code == "53300")
            }
            _ => false,
        };
        if unavailable {
            Error::Unavailable(format!("database: {e}"))
        } else {
            Error::Internal(format!("database: {e}"))
        }
    }
}

/// Whether a database error is a unique-constraint violation.
pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

impl Store {
    /// How many database round trips (`on_pool!` blocks: one statement, or one
    /// transaction) this store has begun: tests pin a path's cost with it.
    #[doc(hidden)]
    pub fn statements_run(&self) -> u64 {
        self.statements.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Opens (creating if needed) the database at `url` and runs the migrations.
    pub async fn open(url: &str, pool_size: u32) -> Result<Self, String> {
        Self::open_with(url, pool_size, Duration::from_secs(3)).await
    }

    /// `open`, with how long a PostgreSQL request waits for a connection before it
    /// fails (with `Error::Unavailable`) instead of hanging while the database is down.
    pub async fn open_with(url: &str, pool_size: u32, acquire_timeout: Duration) -> Result<Self, String> {
        if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(|e| format!("database.url: {e}"))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .foreign_keys(true)
                .busy_timeout(Duration::from_secs(10))
                // The WAL is checkpointed by a task of its own (`checkpoint_wal`), not by
                // the commit that happens to pass 1,000 pages.
                .pragma("wal_autocheckpoint", "0")
                // A WAL that grew in a burst is cut back to this when it starts over.
                .pragma("journal_size_limit", (64 << 20).to_string());
            if let Some(parent) = options.get_filename().parent()
                && !parent.as_os_str().is_empty()
            {
                std::fs::create_dir_all(parent)
                    .map_err(|e| format!("database.url: cannot create {}: {e}", parent.display()))?;
            }
            // No ping before a connection is handed out: SQLite runs in process, and each
            // ping is a round trip to the connection's thread, as costly as a statement
            // (sqlx still pings on release, off the request's path).
            let write = SqlitePoolOptions::new()
                .max_connections(1)
                .test_before_acquire(false)
                .connect_with(options.clone())
                .await
                .map_err(|e| format!("database.url: cannot open {url}: {e}"))?;
            sqlx::migrate!().run(&write).await.map_err(|e| format!("database migration failed: {e}"))?;
            let read = SqlitePoolOptions::new()
                .max_connections(pool_size)
                .test_before_acquire(false)
                .connect_with(options)
                .await
                .map_err(|e| format!("database.url: cannot open {url}: {e}"))?;
            let (reserved,): (i64,) = sqlx::query_as(stream::RESERVED_SQL)
                .fetch_one(&write)
                .await
                .map_err(|e| format!("cannot read the stream position: {e}"))?;
            let checkpointing = (read.clone(), write.clone());
            let store = Store {
                db: Db::Sqlite { read, write },
                stream: stream::Stream::new(reserved),
                changes: changes::ChangeIndex::new(reserved),
                statements: Default::default(),
                counters: Default::default(),
                caches: ReadCaches::default(),
                live: live::Live::new(live::DEFAULT_MAX_BYTES),
            };
            tokio::spawn(checkpoint_wal(checkpointing.0, checkpointing.1, store.stream.subscribe_mark()));
            store.fill_dag_edges().await.map_err(|e| format!("database migration failed: {e}"))?;
            store.fill_relations().await.map_err(|e| format!("database migration failed: {e}"))?;
            store.ensure_search_index().await.map_err(|e| format!("database migration failed: {e}"))?;
            store.fill_unread_counts().await.map_err(|e| format!("database migration failed: {e}"))?;
            Ok(store)
        } else {
            // One direct connection first: a pool hides the cause behind a timeout.
            let options = PgConnectOptions::from_str(url).map_err(|e| format!("database.url: {e}"))?;
            let probe = tokio::time::timeout(Duration::from_secs(10), PgConnection::connect_with(&options))
                .await
                .map_err(|_| "database.url: PostgreSQL did not answer within 10 s".to_owned())?
                .map_err(|e| format!("database.url: cannot connect to PostgreSQL: {e}"))?;
            let _ = probe.close().await;
            let pool = PgPoolOptions::new()
                .max_connections(pool_size)
                .acquire_timeout(acquire_timeout)
                .connect(url)
                .await
                .map_err(|e| format!("database.url: cannot connect to PostgreSQL: {e}"))?;
            sqlx::migrate!().run(&pool).await.map_err(|e| format!("database migration failed: {e}"))?;
            let (reserved,): (i64,) = sqlx::query_as(stream::RESERVED_SQL)
                .fetch_one(&pool)
                .await
                .map_err(|e| format!("cannot read the stream position: {e}"))?;
            let store = Store {
                db: Db::Postgres(pool),
                stream: stream::Stream::new(reserved),
                changes: changes::ChangeIndex::new(reserved),
                statements: Default::default(),
                counters: Default::default(),
                caches: ReadCaches::default(),
                live: live::Live::new(live::DEFAULT_MAX_BYTES),
            };
            store.fill_dag_edges().await.map_err(|e| format!("database migration failed: {e}"))?;
            store.fill_relations().await.map_err(|e| format!("database migration failed: {e}"))?;
            store.ensure_search_index().await.map_err(|e| format!("database migration failed: {e}"))?;
            store.fill_unread_counts().await.map_err(|e| format!("database migration failed: {e}"))?;
            Ok(store)
        }
    }

    pub fn dialect(&self) -> Dialect {
        match self.db {
            Db::Sqlite { .. } => Dialect::Sqlite,
            Db::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Closes every connection (used at shutdown so SQLite checkpoints its WAL).
    pub async fn close(&self) {
        match &self.db {
            Db::Sqlite { read, write } => {
                read.close().await;
                write.close().await;
            }
            Db::Postgres(pool) => pool.close().await,
        }
    }
}

#[cfg(test)]
mod dag_tests;
#[cfg(test)]
mod push_actions_migration_tests;
#[cfg(test)]
mod relations_tests;
#[cfg(test)]
pub(crate) mod test_db;
#[cfg(test)]
mod tests;
