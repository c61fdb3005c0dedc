//! Inbound `PUT /send/{txnId}`: a transaction of PDUs and EDUs from another server.
//! Transactions from one origin are handled one at a time; one already handled is
//! answered from the record of it without being applied again (the sender retries
//! when it did not get our answer). Each PDU gets its own result; EDUs are applied
//! after the PDUs, as the spec orders.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use ruma::{
    OwnedEventId, OwnedServerName, ServerName, TransactionId, api::federation::transactions::edu::Edu, serde::Raw,
};
use serde_json::value::RawValue;
use tokio::sync::Mutex as AsyncMutex;

use crate::{
    error::{Error, Result},
    service::{Services, now_ms, rooms::pipeline::Arrival},
};

/// Most PDUs and EDUs one transaction may hold (the spec's limits).
const MAX_PDUS: usize = 50;
const MAX_EDUS: usize = 100;
/// How long a handled transaction is remembered.
const REMEMBER_MS: i64 = 24 * 3600 * 1000;

/// The per-PDU results of a transaction.
pub type PduResults = BTreeMap<OwnedEventId, Result<(), String>>;

/// One lock per origin server, so that its transactions are handled in order.
#[derive(Default)]
pub struct InboundLocks {
    locks: Mutex<HashMap<OwnedServerName, Arc<AsyncMutex<()>>>>,
}

impl InboundLocks {
    async fn lock(&self, origin: &ServerName) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            if locks.len() > 10_000 {
                locks.retain(|_, l| Arc::strong_count(l) > 1);
            }
            locks.entry(origin.to_owned()).or_default().clone()
        };
        lock.lock_owned().await
    }
}

impl Services {
    /// Handles one transaction from `origin` and answers each PDU's result.
    pub async fn receive_transaction(
        self: &Arc<Self>,
        origin: &ServerName,
        txn_id: &TransactionId,
        pdus: &[Box<RawValue>],
        edus: &[Raw<Edu>],
    ) -> Result<PduResults> {
        if pdus.len() > MAX_PDUS || edus.len() > MAX_EDUS {
            return Err(Error::too_large(format!("A transaction holds at most {MAX_PDUS} PDUs and {MAX_EDUS} EDUs")));
        }
        // The server is up: whatever we queued for it can go now.
        self.destination_is_back(origin);
        let _guard = self.federation_sender.inbound.lock(origin).await;
        if let Some(answer) = self.store.get_inbound_txn(origin.as_str(), txn_id.as_str()).await? {
            let results: BTreeMap<OwnedEventId, StoredResult> =
                serde_json::from_str(&answer).map_err(Error::internal)?;
            return Ok(results.into_iter().map(|(id, r)| (id, r.into())).collect());
        }
        let mut results = PduResults::new();
        // The rooms' server ACLs, read once per room of the transaction (an ACL that
        // comes in this transaction applies from the next one).
        let mut allowed: HashMap<ruma::OwnedRoomId, bool> = HashMap::new();
        for pdu in pdus {
            match self.receive_pdu(origin, pdu, &mut allowed).await {
                Ok((event_id, result)) => {
                    results.insert(event_id, result);
                }
                // The database is down: the whole transaction fails, and is sent again.
                Err(e @ Error::Unavailable(_)) => return Err(e),
                Err(e) => tracing::debug!(%origin, error = %e, "dropping a PDU that names no event"),
            }
        }
        for edu in edus {
            if let Err(e) = self.handle_edu(origin, edu).await {
                tracing::warn!(%origin, error = %e, "could not apply an EDU");
            }
        }
        let stored: BTreeMap<&OwnedEventId, StoredResult> =
            results.iter().map(|(id, r)| (id, StoredResult::from(r))).collect();
        let now = now_ms();
        self.store
            .record_inbound_txn(
                origin.as_str(),
                txn_id.as_str(),
                &serde_json::to_string(&stored).map_err(Error::internal)?,
                now,
                now - REMEMBER_MS,
            )
            .await?;
        Ok(results)
    }
}

impl Services {
    /// Checks and stores one PDU of a transaction. `Err` when not even its event id can
    /// be known (no room, or a room we do not know: its version decides the id).
    async fn receive_pdu(
        &self,
        origin: &ServerName,
        pdu: &RawValue,
        allowed: &mut HashMap<ruma::OwnedRoomId, bool>,
    ) -> Result<(OwnedEventId, Result<(), String>)> {
        let object: ruma::CanonicalJsonObject = serde_json::from_str(pdu.get())
            .map_err(|e| Error::bad_json(format!("a PDU is not canonical JSON: {e}")))?;
        let room_id = object
            .get("room_id")
            .and_then(|v| v.as_str())
            .and_then(|r| ruma::OwnedRoomId::try_from(r).ok())
            .ok_or_else(|| Error::bad_json("a PDU without a valid room_id"))?;
        let version = self.room_version(&room_id).await?;
        let rules = crate::service::rooms::append::rules_for(&version)?;
        let event_id = ruma::signatures::reference_hash(&object, &rules)
            .ok()
            .and_then(|hash| OwnedEventId::try_from(format!("${hash}")).ok())
            .ok_or_else(|| Error::bad_json("cannot compute the PDU's event id"))?;
        use crate::service::rooms::pipeline::PduOutcome;
        let may = match allowed.get(&room_id) {
            Some(may) => *may,
            None => {
                let may = self.server_allowed_in_room(&room_id, origin).await?;
                allowed.insert(room_id.clone(), may);
                may
            }
        };
        if !may {
            return Ok((event_id, Err(format!("The room's server ACL denies {origin}"))));
        }
        // A refused knock or rescinded invite of a local user, in a room we are not in.
        if let Some(result) =
            self.receive_out_of_band_membership(origin, &room_id, &version, event_id.as_str(), &object).await?
        {
            return Ok((event_id, result));
        }
        // The PDU's prev events and itself, read once: to see whether there is a gap,
        // which of them lack a state, and by the pipeline (again only after a gap was
        // filled, which stores some).
        let prevs = super::prev_state::prev_ids_of(&object);
        let mut stored = self.read_prevs(Some(&event_id), &prevs).await?;
        if self.fill_gap(origin, &room_id, &version, &event_id, &prevs, &stored).await {
            stored = self.read_prevs(Some(&event_id), &prevs).await?;
        }
        let result = match self.handle_remote_pdu(origin, &room_id, &version, object, Arrival::Live, Some(stored)).await
        {
            Ok(PduOutcome::Rejected { reason, .. }) => Err(reason),
            Ok(_) => Ok(()),
            Err(e @ Error::Unavailable(_)) => return Err(e),
            Err(e) => {
                tracing::info!(%origin, %event_id, error = %e, "refused a PDU");
                Err(e.message())
            }
        };
        Ok((event_id, result))
    }
}

/// Most events asked for to fill a gap before one PDU.
const MAX_GAP: u32 = 20;

impl Services {
    /// When a PDU names prev events this server does not have (`stored`: its prevs as
    /// stored), asks its origin for the events between our forward extremities and it
    /// (`get_missing_events`), and takes them in first, oldest first, so the PDU lands
    /// on its real history. A failure here only means the PDU is placed without them.
    /// Answers whether it asked (and so may have stored some).
    async fn fill_gap(
        &self,
        origin: &ServerName,
        room_id: &ruma::RoomId,
        version: &ruma::RoomVersionId,
        event_id: &ruma::EventId,
        prevs: &[OwnedEventId],
        stored: &[crate::storage::StoredEvent],
    ) -> bool {
        use ruma::api::federation::event::get_missing_events::v1 as missing;
        if prevs.iter().all(|p| stored.iter().any(|e| e.event_id == p.as_str())) {
            return false;
        }
        let earliest: Vec<OwnedEventId> = match self.store.get_room_head(room_id.as_str()).await {
            Ok(head) => head.into_iter().filter_map(|(id, _, _)| OwnedEventId::try_from(id).ok()).collect(),
            Err(_) => return false,
        };
        let mut request = missing::Request::new(room_id.to_owned(), earliest, vec![event_id.to_owned()]);
        request.limit = MAX_GAP.into();
        let events = match self.send_federation_request(origin, request).await {
            Ok(response) => response.events,
            Err(e) => {
                tracing::info!(%origin, %room_id, error = %e, "could not fetch the events before a PDU");
                return false;
            }
        };
        for pdu in super::oldest_first(&events, MAX_GAP as usize) {
            // The oldest may need the state at its own prevs, fetched from the origin.
            // When one fails, so would the next (built on it): the PDU itself then asks
            // for the state at its prevs.
            if let Err(e) = self.handle_remote_pdu(origin, room_id, version, pdu, Arrival::Live, None).await {
                tracing::info!(%origin, %room_id, error = %e, "a missing event was refused");
                break;
            }
        }
        true
    }
}

/// A PDU's result as recorded.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl From<&Result<(), String>> for StoredResult {
    fn from(r: &Result<(), String>) -> Self {
        StoredResult { error: r.as_ref().err().cloned() }
    }
}

impl From<StoredResult> for Result<(), String> {
    fn from(r: StoredResult) -> Self {
        match r.error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
