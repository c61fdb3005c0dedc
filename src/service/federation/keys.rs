//! Server signing keys across servers: this server's published key response
//! (`GET /_matrix/key/v2/server`), other servers' keys (fetched from the origin,
//! checked, cached in the database until `valid_until_ts`; concurrent fetches for one
//! server coalesce into one request; a failed fetch is backed off), and notary answers
//! (`/_matrix/key/v2/query`: the origin's own response with our signature added).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD_NO_PAD};
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, MilliSecondsSinceUnixEpoch, OwnedServerName, ServerName,
    api::federation::discovery::{ServerSigningKeys, get_remote_server_keys_batch::v2::QueryCriteria, get_server_keys},
    serde::{Base64, Raw},
    signatures::{PublicKeyMap, PublicKeySet, sign_json, verify_json},
};

use crate::{
    error::{Error, Result},
    service::{Services, now_ms},
    storage::{StoredKeyResponse, StoredServerKey},
};

/// The first wait after a failed key fetch; it doubles with each failure.
const FIRST_BACKOFF: Duration = Duration::from_secs(10);
/// The longest wait between key fetches that fail.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// After a successful fetch, the shortest wait before fetching the same server's keys
/// again for a key it did not list (so that requests naming unknown key ids cannot
/// make this server hammer the origin).
const MIN_REFETCH: Duration = Duration::from_secs(60);

/// In-memory state of the key fetcher (the keys themselves live in the database).
#[derive(Default)]
pub struct KeyFetcher {
    /// One lock per server being fetched: concurrent callers wait for the first
    /// fetch, then read its result from the database.
    fetching: Mutex<HashMap<OwnedServerName, Arc<tokio::sync::Mutex<()>>>>,
    /// Servers whose last fetch failed: no new fetch before the instant, and how many
    /// fetches failed in a row.
    backoff: Mutex<HashMap<OwnedServerName, (Instant, u32)>>,
    /// When each server's keys were last fetched successfully.
    fetched: Mutex<HashMap<OwnedServerName, Instant>>,
    /// How many key requests were sent to other servers (tests read it).
    requests: AtomicU64,
}

impl KeyFetcher {
    /// How many key requests this server has sent to other servers.
    pub fn requests_sent(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// The id of this server's key (`ed25519:VERSION`).
pub fn own_key_id(key: &ruma::signatures::Ed25519KeyPair) -> String {
    format!("ed25519:{}", key.version())
}

impl Services {
    /// This server's key response, signed with its key, valid for
    /// `federation.key_validity_ms` from now.
    pub fn own_server_keys(&self) -> Result<Raw<ServerSigningKeys>> {
        let valid_until = now_ms() + self.config.federation.key_validity_ms as i64;
        let key = STANDARD_NO_PAD.encode(self.signing_key.public_key());
        let mut object = CanonicalJsonObject::new();
        object.insert("server_name".into(), self.server_name().as_str().into());
        object.insert(
            "verify_keys".into(),
            CanonicalJsonValue::Object(BTreeMap::from([(
                own_key_id(&self.signing_key),
                CanonicalJsonValue::Object(BTreeMap::from([("key".to_owned(), key.into())])),
            )])),
        );
        // Empty until key rotation exists.
        object.insert("old_verify_keys".into(), CanonicalJsonValue::Object(BTreeMap::new()));
        object.insert(
            "valid_until_ts".into(),
            CanonicalJsonValue::Integer(ruma::Int::try_from(valid_until).map_err(Error::internal)?),
        );
        sign_json(self.server_name().as_str(), &self.signing_key, &mut object)
            .map_err(|e| Error::internal(format!("cannot sign our key response: {e}")))?;
        to_raw(&object)
    }

    /// The public keys of `servers` (current and old ones), fetched where none is
    /// valid now, for checking signatures on events. A server whose keys cannot be
    /// had is left out of the map (checking its signatures then fails), and logged.
    pub async fn server_public_keys(&self, servers: &[OwnedServerName]) -> Result<PublicKeyMap> {
        let mut map = PublicKeyMap::new();
        for server in servers {
            match self.stored_keys(server, true).await {
                Ok(keys) => {
                    let set: PublicKeySet =
                        keys.into_iter().filter_map(|k| Some((k.key_id, Base64::parse(&k.public_key).ok()?))).collect();
                    map.insert(server.to_string(), set);
                }
                Err(Error::Unavailable(e)) => return Err(Error::Unavailable(e)),
                Err(e) => tracing::info!(%server, error = %e, "no signing keys for a server"),
            }
        }
        Ok(map)
    }

    /// The public key `key_id` of `server`, valid now (fetched when unknown or
    /// expired), for checking a request's `X-Matrix` signature.
    pub async fn server_key(&self, server: &ServerName, key_id: &str) -> Result<Base64> {
        let now = now_ms();
        let usable = |keys: &[StoredServerKey]| {
            keys.iter()
                .find(|k| k.key_id == key_id && k.expired_ts.is_none() && k.valid_until_ts > now)
                .and_then(|k| Base64::parse(&k.public_key).ok())
        };
        let keys = self.store.get_server_signing_keys(server.as_str()).await?;
        if let Some(key) = usable(&keys) {
            return Ok(key);
        }
        self.fetch_server_keys(server, |keys| usable(keys).is_some()).await?;
        let keys = self.store.get_server_signing_keys(server.as_str()).await?;
        usable(&keys).ok_or_else(|| Error::federation(format!("{server} does not publish the key {key_id}")))
    }

    /// The stored keys of `server`; fetched first when none is valid now (and
    /// `fetch` is set).
    async fn stored_keys(&self, server: &ServerName, fetch: bool) -> Result<Vec<StoredServerKey>> {
        let now = now_ms();
        let has_current =
            |keys: &[StoredServerKey]| keys.iter().any(|k| k.expired_ts.is_none() && k.valid_until_ts > now);
        let keys = self.store.get_server_signing_keys(server.as_str()).await?;
        if has_current(&keys) || !fetch {
            return Ok(keys);
        }
        self.fetch_server_keys(server, has_current).await?;
        self.store.get_server_signing_keys(server.as_str()).await
    }

    /// Fetches `server`'s keys from the server itself, unless another caller already
    /// did so while this one waited (`satisfied` says whether the stored keys will do)
    /// or the server's last fetch failed too recently.
    async fn fetch_server_keys(
        &self,
        server: &ServerName,
        satisfied: impl Fn(&[StoredServerKey]) -> bool,
    ) -> Result<()> {
        let fetcher = &self.federation.keys;
        let lock =
            fetcher.fetching.lock().unwrap_or_else(|e| e.into_inner()).entry(server.to_owned()).or_default().clone();
        let _guard = lock.lock().await;
        // Another caller may have fetched while this one waited.
        if satisfied(&self.store.get_server_signing_keys(server.as_str()).await?) {
            return Ok(());
        }
        if let Some((until, failures)) = fetcher.backoff.lock().unwrap_or_else(|e| e.into_inner()).get(server).copied()
            && Instant::now() < until
        {
            return Err(Error::federation(format!(
                "cannot get {server}'s signing keys: {failures} fetch(es) failed, next try in {} s",
                until.saturating_duration_since(Instant::now()).as_secs().max(1)
            )));
        }
        if let Some(at) = fetcher.fetched.lock().unwrap_or_else(|e| e.into_inner()).get(server).copied()
            && at.elapsed() < MIN_REFETCH
        {
            return Err(Error::federation(format!(
                "{server}'s keys were fetched {} s ago and do not include the key asked for",
                at.elapsed().as_secs()
            )));
        }
        fetcher.requests.fetch_add(1, Ordering::Relaxed);
        let result = self.fetch_and_store(server).await;
        let mut backoff = fetcher.backoff.lock().unwrap_or_else(|e| e.into_inner());
        match &result {
            Ok(()) => {
                backoff.remove(server);
                fetcher.fetched.lock().unwrap_or_else(|e| e.into_inner()).insert(server.to_owned(), Instant::now());
            }
            Err(e) => {
                let failures = backoff.get(server).map_or(0, |(_, n)| *n) + 1;
                let wait = FIRST_BACKOFF.saturating_mul(1 << (failures - 1).min(16)).min(MAX_BACKOFF);
                tracing::info!(%server, error = %e, wait_s = wait.as_secs(), "fetching a server's signing keys failed");
                backoff.insert(server.to_owned(), (Instant::now() + wait, failures));
            }
        }
        drop(backoff);
        fetcher.fetching.lock().unwrap_or_else(|e| e.into_inner()).remove(server);
        result
    }

    /// One request to `server`'s `/_matrix/key/v2/server`; the answer is checked and
    /// stored.
    async fn fetch_and_store(&self, server: &ServerName) -> Result<()> {
        let response = self
            .federation
            .client
            .send(self.server_name(), &self.signing_key, server, get_server_keys::v2::Request::new())
            .await?;
        let (keys, stored) = check_key_response(server, &response.server_key)?;
        self.store.store_server_keys(server.as_str(), &keys, &stored, now_ms()).await
    }

    /// Notary: the key responses of the servers asked about, each as its origin signed
    /// it plus our signature. Fetched from the origin when what is stored does not meet
    /// `minimum_valid_until_ts` (or is no longer valid). Servers that cannot be reached
    /// are left out, as the spec says.
    pub async fn notary_server_keys(
        &self,
        queries: BTreeMap<OwnedServerName, BTreeMap<ruma::OwnedServerSigningKeyId, QueryCriteria>>,
    ) -> Result<Vec<Raw<ServerSigningKeys>>> {
        let mut answers = Vec::new();
        for (server, criteria) in queries {
            let wanted_until = criteria
                .values()
                .filter_map(|c| c.minimum_valid_until_ts)
                .max()
                .map_or(now_ms(), |ts| millis(ts).max(now_ms()));
            if server == *self.server_name() {
                answers.push(self.own_server_keys()?);
                continue;
            }
            let fresh =
                |stored: &Option<StoredKeyResponse>| stored.as_ref().is_some_and(|r| r.valid_until_ts >= wanted_until);
            let mut stored = self.store.get_server_key_response(server.as_str()).await?;
            if !fresh(&stored) {
                let satisfied = |_: &[StoredServerKey]| false;
                match self.fetch_server_keys(&server, satisfied).await {
                    Ok(()) => stored = self.store.get_server_key_response(server.as_str()).await?,
                    Err(Error::Unavailable(e)) => return Err(Error::Unavailable(e)),
                    Err(e) => tracing::info!(%server, error = %e, "notary: cannot fetch a server's keys"),
                }
            }
            // What is stored, even if older than asked for, is still the origin's
            // signed word: the asking server judges its validity.
            if let Some(stored) = stored {
                let mut object: CanonicalJsonObject = serde_json::from_str(&stored.response)
                    .map_err(|e| Error::internal(format!("stored key response of {server}: {e}")))?;
                sign_json(self.server_name().as_str(), &self.signing_key, &mut object)
                    .map_err(|e| Error::internal(format!("cannot sign a notary answer: {e}")))?;
                answers.push(to_raw(&object)?);
            }
        }
        Ok(answers)
    }
}

/// Checks a key response of `server`: it names `server`, it is signed by `server`
/// with a key it lists, and its keys are well-formed. Returns its keys and itself.
pub fn check_key_response(
    server: &ServerName,
    raw: &Raw<ServerSigningKeys>,
) -> Result<(Vec<StoredServerKey>, StoredKeyResponse)> {
    let bad = |why: String| Error::federation(format!("{server}'s key response: {why}"));
    let keys: ServerSigningKeys = raw.deserialize().map_err(|e| bad(format!("not a key response: {e}")))?;
    if keys.server_name != server {
        return Err(bad(format!("it is for {}", keys.server_name)));
    }
    let mut object: CanonicalJsonObject =
        serde_json::from_str(raw.json().get()).map_err(|e| bad(format!("not canonical JSON: {e}")))?;
    let own: PublicKeySet = keys.verify_keys.iter().map(|(id, k)| (id.to_string(), k.key.clone())).collect();
    // Only the origin's own signature counts here (a notary's may be there too).
    if let Some(CanonicalJsonValue::Object(signatures)) = object.get_mut("signatures") {
        signatures.retain(|entity, _| entity == server.as_str());
    }
    let map = PublicKeyMap::from([(server.to_string(), own)]);
    verify_json(&map, &object).map_err(|e| bad(format!("bad self-signature: {e}")))?;
    let valid_until_ts = millis(keys.valid_until_ts);
    let mut stored: Vec<StoredServerKey> = keys
        .verify_keys
        .iter()
        .map(|(id, k)| StoredServerKey {
            key_id: id.to_string(),
            public_key: k.key.encode(),
            valid_until_ts,
            expired_ts: None,
        })
        .collect();
    stored.extend(keys.old_verify_keys.iter().map(|(id, k)| StoredServerKey {
        key_id: id.to_string(),
        public_key: k.key.encode(),
        valid_until_ts: millis(k.expired_ts),
        expired_ts: Some(millis(k.expired_ts)),
    }));
    Ok((stored, StoredKeyResponse { response: raw.json().get().to_owned(), valid_until_ts }))
}

fn millis(ts: MilliSecondsSinceUnixEpoch) -> i64 {
    i64::try_from(u64::from(ts.get())).unwrap_or(i64::MAX)
}

fn to_raw<T>(object: &CanonicalJsonObject) -> Result<Raw<T>> {
    let json = serde_json::to_string(object).map_err(Error::internal)?;
    let value = serde_json::value::RawValue::from_string(json).map_err(Error::internal)?;
    Ok(Raw::from_json(value))
}
