//! Outbound federation queues: per destination server, the PDUs and EDUs it has still
//! to receive, kept in the database (`federation_outbox`) so that nothing is lost over a
//! restart, and sent by one task per destination in `PUT /send/{txnId}` transactions of
//! at most 50 PDUs and 100 EDUs, oldest first. A destination that fails (unreachable,
//! `5xx`, `429`) is retried with exponential backoff, or after the wait a `429` names;
//! a transaction it refuses for good (another `4xx`) is dropped, after trying a `413`
//! in halves, so that it never holds up the queue. Each destination has its own task,
//! so a slow or dead server never delays the others. When a server contacts us, its
//! backoff ends at once (it is back).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use ruma::{
    MilliSecondsSinceUnixEpoch, OwnedRoomId, OwnedServerName, OwnedTransactionId, RoomId, ServerName,
    api::federation::transactions::send_transaction_message, serde::Raw,
};
use serde_json::value::RawValue;
use tokio::sync::Notify;

use crate::{
    error::{Error, Result},
    service::{Services, now_ms},
    storage::OutboxBatch,
};

/// Most PDUs in one transaction (the spec's limit).
pub const MAX_PDUS_PER_TXN: i64 = 50;
/// Most EDUs in one transaction (the spec's limit).
pub const MAX_EDUS_PER_TXN: i64 = 100;
/// The first retry after a failure; each further failure doubles it, up to the
/// configured `federation.max_retry_interval_ms`.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// The longest wait a `429` answer's `retry_after_ms` is honoured for.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Rooms whose remote servers are cached (the cache starts over past it).
const ROOM_SERVERS_CACHED: usize = 10_000;

/// The senders of all destinations.
#[derive(Default)]
pub struct FederationSender {
    services: Mutex<Weak<Services>>,
    destinations: Mutex<HashMap<OwnedServerName, Arc<Destination>>>,
    /// Rooms recently backfilled in vain.
    pub(crate) backfill: super::backfill::BackfillAttempts,
    /// Serialises each origin's inbound transactions.
    pub(crate) inbound: super::transactions::InboundLocks,
    /// The remote servers in each room, dropped when the room's membership changes.
    room_servers: Mutex<HashMap<OwnedRoomId, Arc<Vec<OwnedServerName>>>>,
    /// The last EDU position handed out. Positions only grow, also across restarts (they
    /// start from the clock in microseconds), so a transaction id is never reused.
    edu_position: AtomicI64,
}

/// One destination's sender: a wake-up for new items or an early retry.
struct Destination {
    wake: Notify,
    /// Set when the server contacted us: retry now instead of waiting out the backoff.
    back: std::sync::atomic::AtomicBool,
}

impl FederationSender {
    fn next_edu_position(&self) -> i64 {
        self.edu_position.fetch_add(1, Ordering::AcqRel) + 1
    }
}

impl Services {
    /// Starts the senders of the destinations that still have something queued (after a
    /// restart). Called once the server is up.
    pub async fn start_federation_sender(self: &Arc<Self>) -> Result<()> {
        *self.federation_sender.services.lock().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(self);
        let (pending, max_edu) = self.store.get_federation_outbox_state().await?;
        let clock_us = now_ms().saturating_mul(1000);
        self.federation_sender.edu_position.store(max_edu.max(clock_us), Ordering::Release);
        for destination in pending {
            match OwnedServerName::try_from(destination.as_str()) {
                Ok(server) => self.wake_destination(&server),
                Err(e) => tracing::warn!(%destination, error = %e, "a queued destination is not a server name"),
            }
        }
        Ok(())
    }

    /// The remote servers with joined members in a room (the destinations of its events
    /// and EDUs). Cached per room until its membership changes.
    pub async fn room_remote_servers(&self, room_id: &RoomId) -> Result<Arc<Vec<OwnedServerName>>> {
        let generation = {
            let cache = self.federation_sender.room_servers.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(servers) = cache.get(room_id) {
                return Ok(servers.clone());
            }
            self.member_generation()
        };
        let members = self.store.get_room_members(room_id.as_str(), Some("join")).await?;
        let mut servers: Vec<OwnedServerName> = members
            .iter()
            .filter_map(|m| ruma::UserId::parse(m.user_id.as_str()).ok())
            .map(|u| u.server_name().to_owned())
            .filter(|s| s != self.server_name())
            .collect();
        servers.sort();
        servers.dedup();
        let servers = Arc::new(servers);
        let mut cache = self.federation_sender.room_servers.lock().unwrap_or_else(|e| e.into_inner());
        if self.member_generation() == generation {
            if cache.len() >= ROOM_SERVERS_CACHED {
                cache.clear();
            }
            cache.insert(room_id.to_owned(), servers.clone());
        }
        Ok(servers)
    }

    pub(crate) fn forget_room_servers(&self, room_id: &RoomId) {
        self.federation_sender.room_servers.lock().unwrap_or_else(|e| e.into_inner()).remove(room_id);
    }

    /// Sends a local event just stored to the other servers in the room, and to the
    /// server of the user a membership event is about (a kicked or banned user's server
    /// is no longer in the room, but must hear of it). A failure to queue is logged: the
    /// event is stored, and those servers catch up when they next ask for it.
    pub async fn federate_local_event(
        &self,
        room_id: &RoomId,
        event_id: &str,
        position: i64,
        membership_target: Option<&str>,
    ) {
        let result = async {
            let mut servers = self.room_remote_servers(room_id).await?.as_ref().clone();
            if let Some(target) = membership_target.and_then(|t| ruma::UserId::parse(t).ok())
                && !servers.iter().any(|s| s == target.server_name())
            {
                servers.push(target.server_name().to_owned());
            }
            self.send_pdu(&servers, position, event_id).await
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(%room_id, event_id, error = %e, "could not queue an event for other servers");
        }
    }

    /// Queues a stored local event (at stream position `position`) for `destinations`
    /// and wakes their senders.
    pub async fn send_pdu(&self, destinations: &[OwnedServerName], position: i64, event_id: &str) -> Result<()> {
        let destinations: Vec<OwnedServerName> = destinations
            .iter()
            .filter(|d| *d != self.server_name() && self.federation.client.may_contact(d))
            .cloned()
            .collect();
        if destinations.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = destinations.iter().map(|d| d.to_string()).collect();
        self.store.enqueue_federation_pdu(&names, position, event_id).await?;
        for destination in &destinations {
            self.wake_destination(destination);
        }
        Ok(())
    }

    /// Queues an EDU (`{"edu_type": ..., "content": ...}`) for `destinations`. One with a
    /// `lifetime` (typing) is dropped instead of sent once it is older than that.
    pub async fn send_edu(
        &self,
        destinations: &[OwnedServerName],
        edu: &serde_json::Value,
        lifetime: Option<Duration>,
    ) -> Result<()> {
        let names: Vec<String> = destinations
            .iter()
            .filter(|d| *d != self.server_name() && self.federation.client.may_contact(d))
            .map(|d| d.to_string())
            .collect();
        if names.is_empty() {
            return Ok(());
        }
        let position = self.federation_sender.next_edu_position();
        let expires = lifetime.map(|l| now_ms() + l.as_millis() as i64);
        self.store.enqueue_federation_edu(&names, position, &edu.to_string(), expires).await?;
        for name in &names {
            if let Ok(server) = OwnedServerName::try_from(name.as_str()) {
                self.wake_destination(&server);
            }
        }
        Ok(())
    }

    /// A server contacted us: it is up, so its queue is retried now.
    pub fn destination_is_back(&self, server: &ServerName) {
        let found = self.federation_sender.destinations.lock().unwrap_or_else(|e| e.into_inner()).get(server).cloned();
        if let Some(destination) = found {
            destination.back.store(true, Ordering::Release);
            destination.wake.notify_one();
        }
    }

    /// Wakes the sender of `server`, starting it if it is not running.
    fn wake_destination(&self, server: &ServerName) {
        let mut destinations = self.federation_sender.destinations.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(destination) = destinations.get(server) {
            destination.wake.notify_one();
            return;
        }
        let Some(services) = self.federation_sender.services.lock().unwrap_or_else(|e| e.into_inner()).upgrade() else {
            // Not started yet: `start_federation_sender` picks the queue up.
            return;
        };
        let destination = Arc::new(Destination { wake: Notify::new(), back: Default::default() });
        destinations.insert(server.to_owned(), destination.clone());
        let server = server.to_owned();
        tokio::spawn(async move {
            tokio::select! {
                _ = services.shutdown_started() => {}
                _ = services.run_destination(&server, &destination) => {}
            }
        });
    }

    /// A destination's sender: sends what is queued, waits for more, backs off on a
    /// failure that may pass (as long as a `429` asks, when it says).
    async fn run_destination(&self, server: &ServerName, destination: &Destination) {
        let max_retry = Duration::from_millis(self.config.federation.max_retry_interval_ms);
        let mut retry = FIRST_RETRY.min(max_retry);
        loop {
            let batch = match self
                .store
                .get_federation_batch(server.as_str(), MAX_PDUS_PER_TXN, MAX_EDUS_PER_TXN, now_ms())
                .await
            {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::warn!(destination = %server, error = %e, "cannot read the federation queue");
                    tokio::time::sleep(retry).await;
                    continue;
                }
            };
            if batch.is_empty() {
                destination.wake.notified().await;
                continue;
            }
            match self.deliver_batch(server, batch).await {
                Ok(()) => retry = FIRST_RETRY.min(max_retry),
                Err(e) => {
                    let asked = match &e {
                        Error::Remote(remote) => remote.retry_after().map(|after| after.min(MAX_RETRY_AFTER)),
                        _ => None,
                    };
                    let wait = asked.unwrap_or(retry);
                    tracing::info!(destination = %server, error = %e, retry_in_ms = wait.as_millis() as u64,
                        "federation transaction failed; will retry");
                    if asked.is_some() {
                        // The server said when: an early sign of life does not cut it short.
                        tokio::time::sleep(wait).await;
                    } else {
                        // Wait out the backoff, unless the server shows it is back.
                        let _ = tokio::time::timeout(wait, async {
                            loop {
                                destination.wake.notified().await;
                                if destination.back.swap(false, Ordering::AcqRel) {
                                    break;
                                }
                            }
                        })
                        .await;
                    }
                    retry = (retry * 2).min(max_retry);
                }
            }
        }
    }

    /// Sends a batch and dequeues what the destination took or refused for good. A
    /// batch refused as too large (`413`) is sent again in halves, down to single items;
    /// one refused with another 4xx (`400`, `401`, `403`, `404`, a single item's `413`;
    /// not `408` or `429`) is dropped with a warning: sending it again would not change
    /// the answer, and it must not hold up what comes after it. `Err` is a failure that
    /// may pass (unreachable, `5xx`, `429`): what was not taken stays queued.
    async fn deliver_batch(&self, server: &ServerName, batch: OutboxBatch) -> Result<()> {
        // Parts still to send, the next one last.
        let mut parts = vec![batch];
        while let Some(part) = parts.pop() {
            match self.send_batch(server, &part).await {
                Ok(()) => {}
                Err(Error::Remote(remote))
                    if remote.status == http::StatusCode::PAYLOAD_TOO_LARGE && batch_len(&part) > 1 =>
                {
                    tracing::info!(destination = %server, items = batch_len(&part),
                        "the destination refused a transaction as too large; sending it in halves");
                    let (first, second) = halves(part);
                    parts.push(second);
                    parts.push(first);
                    continue;
                }
                Err(Error::Remote(remote)) if remote.is_permanent() => {
                    tracing::warn!(destination = %server, status = remote.status.as_u16(), errcode = %remote.errcode,
                        message = %remote.message, pdus = part.pdus.len(), edus = part.edus.len(),
                        "the destination refused a transaction; dropping it");
                }
                Err(e) => return Err(e),
            }
            // Exactly the positions sent: an item queued meanwhile with a lower position
            // (its event committed later) stays queued.
            let pdus: Vec<i64> = part.pdus.iter().map(|p| p.0).collect();
            let edus: Vec<i64> = part.edus.iter().map(|e| e.0).collect();
            if let Err(e) = self.store.delete_federation_sent(server.as_str(), &pdus, &edus).await {
                tracing::warn!(destination = %server, error = %e, "cannot dequeue a sent transaction");
            }
        }
        Ok(())
    }

    /// Sends one batch as a transaction. Its id is made from the positions it holds, so
    /// a retry of the same batch has the same id (the receiver then ignores a second
    /// copy) and a different batch never does.
    async fn send_batch(&self, server: &ServerName, batch: &OutboxBatch) -> Result<()> {
        let txn_id = transaction_id(batch);
        let mut request = send_transaction_message::v1::Request::new(
            txn_id.clone(),
            self.server_name().clone(),
            MilliSecondsSinceUnixEpoch::now(),
        );
        for (_, event_id, json) in &batch.pdus {
            let pdu = RawValue::from_string(json.clone())
                .map_err(|e| Error::internal(format!("stored event {event_id} is not JSON: {e}")))?;
            request.pdus.push(pdu);
        }
        for (_, json) in &batch.edus {
            let edu = RawValue::from_string(json.clone())
                .map_err(|e| Error::internal(format!("queued EDU is not JSON: {e}")))?;
            request.edus.push(Raw::from_json(edu));
        }
        let response = self.send_federation_request(server, request).await?;
        for (event_id, result) in response.pdus {
            if let Err(reason) = result {
                tracing::info!(destination = %server, %event_id, %reason, "the destination refused a PDU");
            }
        }
        tracing::debug!(destination = %server, %txn_id, pdus = batch.pdus.len(), edus = batch.edus.len(),
            "federation transaction sent");
        Ok(())
    }
}

/// How many PDUs and EDUs a batch holds.
fn batch_len(batch: &OutboxBatch) -> usize {
    batch.pdus.len() + batch.edus.len()
}

/// A batch cut in two, PDUs then EDUs, the first half the larger: each half holds the
/// oldest items of each kind before the other half's.
fn halves(mut batch: OutboxBatch) -> (OutboxBatch, OutboxBatch) {
    let first_len = batch_len(&batch).div_ceil(2);
    let first_pdus = first_len.min(batch.pdus.len());
    let first_edus = first_len - first_pdus;
    let second = OutboxBatch { pdus: batch.pdus.split_off(first_pdus), edus: batch.edus.split_off(first_edus) };
    (batch, second)
}

/// `{first}-{last}` PDU positions and `{first}-{last}` EDU positions: unique per batch.
fn transaction_id(batch: &OutboxBatch) -> OwnedTransactionId {
    let span = |first: Option<i64>, last: Option<i64>| match (first, last) {
        (Some(a), Some(b)) => format!("{a}-{b}"),
        _ => "0".to_owned(),
    };
    let pdus = span(batch.pdus.first().map(|p| p.0), batch.pdus.last().map(|p| p.0));
    let edus = span(batch.edus.first().map(|e| e.0), batch.edus.last().map(|e| e.0));
    OwnedTransactionId::from(format!("c{pdus}.{edus}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_ids_name_their_positions() {
        let batch = OutboxBatch {
            pdus: vec![(5, "$a".into(), "{}".into()), (9, "$b".into(), "{}".into())],
            edus: vec![(1_000_001, "{}".into())],
        };
        assert_eq!(transaction_id(&batch).as_str(), "c5-9.1000001-1000001");
        let only_edus = OutboxBatch { pdus: vec![], edus: vec![(3, "{}".into()), (4, "{}".into())] };
        assert_eq!(transaction_id(&only_edus).as_str(), "c0.3-4");
    }

    #[test]
    fn halves_keep_each_kind_in_order() {
        let pdu = |p: i64| (p, format!("${p}"), "{}".to_owned());
        let edu = |p: i64| (p, "{}".to_owned());
        let batch = OutboxBatch { pdus: vec![pdu(1), pdu(2)], edus: vec![edu(10), edu(11), edu(12)] };
        let (first, second) = halves(batch);
        assert_eq!((first.pdus.len(), first.edus.len()), (2, 1));
        assert_eq!(first.edus[0].0, 10);
        assert_eq!((second.pdus.len(), second.edus.len()), (0, 2));
        assert_eq!(second.edus[0].0, 11);
        let (first, second) = halves(OutboxBatch { pdus: vec![pdu(1), pdu(2), pdu(3)], edus: vec![edu(9)] });
        assert_eq!(first.pdus.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!((second.pdus.len(), second.edus.len()), (1, 1));
        let (first, second) = halves(OutboxBatch { pdus: vec![pdu(1)], edus: vec![edu(9)] });
        assert_eq!((batch_len(&first), batch_len(&second)), (1, 1));
        assert_eq!(first.pdus[0].0, 1);
    }
}
