//! Storage of the outbound federation queues (`federation_outbox`): what each
//! destination server has still to receive, read in batches and deleted once taken.

use super::{Store, on_pool};
use crate::error::Result;

/// One batch for one destination, oldest first.
#[derive(Debug, Default)]
pub struct OutboxBatch {
    /// PDUs: position, event id and the event's JSON.
    pub pdus: Vec<(i64, String, String)>,
    /// EDUs: position and the EDU's JSON.
    pub edus: Vec<(i64, String)>,
}

impl OutboxBatch {
    pub fn is_empty(&self) -> bool {
        self.pdus.is_empty() && self.edus.is_empty()
    }
}

impl Store {
    /// Queues a local event for each of `destinations`, at the event's stream position.
    pub async fn enqueue_federation_pdu(&self, destinations: &[String], position: i64, event_id: &str) -> Result<()> {
        self.enqueue_federation(destinations, "pdu", position, Some(event_id), None, None).await
    }

    /// Queues an EDU for each of `destinations` at `position` (the sender's EDU counter).
    pub async fn enqueue_federation_edu(
        &self,
        destinations: &[String],
        position: i64,
        edu_json: &str,
        expires_ms: Option<i64>,
    ) -> Result<()> {
        self.enqueue_federation(destinations, "edu", position, None, Some(edu_json), expires_ms).await
    }

    /// One row per destination, in one statement per 500; a row already queued stays.
    async fn enqueue_federation(
        &self,
        destinations: &[String],
        kind: &str,
        position: i64,
        event_id: Option<&str>,
        edu_json: Option<&str>,
        expires_ms: Option<i64>,
    ) -> Result<()> {
        if destinations.is_empty() {
            return Ok(());
        }
        on_pool!(self, write, |pool| {
            for chunk in destinations.chunks(500) {
                let mut query = sqlx::QueryBuilder::new(
                    "INSERT INTO federation_outbox (destination, kind, position, event_id, edu_json, expires_ms) ",
                );
                query.push_values(chunk, |mut row, destination| {
                    row.push_bind(destination)
                        .push_bind(kind)
                        .push_bind(position)
                        .push_bind(event_id)
                        .push_bind(edu_json)
                        .push_bind(expires_ms);
                });
                query.push(" ON CONFLICT DO NOTHING");
                query.build().execute(pool).await?;
            }
            Ok(())
        })
    }

    /// The oldest queued items for `destination`: at most `max_pdus` PDUs and
    /// `max_edus` EDUs. EDUs past their expiry are deleted instead of returned.
    pub async fn get_federation_batch(
        &self,
        destination: &str,
        max_pdus: i64,
        max_edus: i64,
        now_ms: i64,
    ) -> Result<OutboxBatch> {
        let expired = on_pool!(self, write, |pool| {
            sqlx::query(
                "DELETE FROM federation_outbox WHERE destination = $1 AND kind = 'edu' AND expires_ms IS NOT NULL
                   AND expires_ms < $2",
            )
            .bind(destination)
            .bind(now_ms)
            .execute(pool)
            .await?
            .rows_affected()
        });
        if expired > 0 {
            tracing::debug!(destination, expired, "dropped expired EDUs");
        }
        on_pool!(self, read, |pool| {
            let pdus: Vec<(i64, String, String)> = sqlx::query_as(
                "SELECT o.position, o.event_id, e.json FROM federation_outbox o JOIN events e ON e.event_id = o.event_id
                 WHERE o.destination = $1 AND o.kind = 'pdu' ORDER BY o.position LIMIT $2",
            )
            .bind(destination)
            .bind(max_pdus)
            .fetch_all(pool)
            .await?;
            let edus: Vec<(i64, String)> = sqlx::query_as(
                "SELECT position, edu_json FROM federation_outbox
                 WHERE destination = $1 AND kind = 'edu' ORDER BY position LIMIT $2",
            )
            .bind(destination)
            .bind(max_edus)
            .fetch_all(pool)
            .await?;
            Ok(OutboxBatch { pdus, edus })
        })
    }

    /// Deletes what a destination has taken: the PDUs and EDUs at these positions.
    /// Exactly those: a PDU is queued after its event commits, so one with a lower
    /// position may be queued after a batch was read, and must stay.
    pub async fn delete_federation_sent(&self, destination: &str, pdus: &[i64], edus: &[i64]) -> Result<()> {
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            for (kind, positions) in [("pdu", pdus), ("edu", edus)] {
                for chunk in positions.chunks(500) {
                    let mut query = sqlx::QueryBuilder::new("DELETE FROM federation_outbox WHERE destination = ");
                    query.push_bind(destination).push(" AND kind = ").push_bind(kind).push(" AND position IN (");
                    let mut list = query.separated(", ");
                    for position in chunk {
                        list.push_bind(*position);
                    }
                    query.push(")");
                    query.build().execute(&mut *tx).await?;
                }
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// The destinations with something queued (to start their senders after a restart),
    /// and the largest EDU position used (to go on from it).
    pub async fn get_federation_outbox_state(&self) -> Result<(Vec<String>, i64)> {
        on_pool!(self, read, |pool| {
            let destinations: Vec<(String,)> =
                sqlx::query_as("SELECT DISTINCT destination FROM federation_outbox ORDER BY destination")
                    .fetch_all(pool)
                    .await?;
            let (max_edu,): (Option<i64>,) =
                sqlx::query_as("SELECT MAX(position) FROM federation_outbox WHERE kind = 'edu'")
                    .fetch_one(pool)
                    .await?;
            Ok((destinations.into_iter().map(|d| d.0).collect(), max_edu.unwrap_or(0)))
        })
    }

    /// How many items are queued for `destination` (tests and the admin's view).
    pub async fn count_federation_outbox(&self, destination: &str) -> Result<i64> {
        on_pool!(self, read, |pool| {
            let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM federation_outbox WHERE destination = $1")
                .bind(destination)
                .fetch_one(pool)
                .await?;
            Ok(n)
        })
    }
}

impl Store {
    /// The answer given to a transaction from `origin` already processed.
    pub async fn get_inbound_txn(&self, origin: &str, txn_id: &str) -> Result<Option<String>> {
        on_pool!(self, read, |pool| {
            let row: Option<(String,)> =
                sqlx::query_as("SELECT response FROM federation_inbound_txns WHERE origin = $1 AND txn_id = $2")
                    .bind(origin)
                    .bind(txn_id)
                    .fetch_optional(pool)
                    .await?;
            Ok(row.map(|r| r.0))
        })
    }

    /// Records a processed transaction and its answer; forgets those older than
    /// `forget_before_ts`.
    pub async fn record_inbound_txn(
        &self,
        origin: &str,
        txn_id: &str,
        response: &str,
        now_ts: i64,
        forget_before_ts: i64,
    ) -> Result<()> {
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            sqlx::query(
                "INSERT INTO federation_inbound_txns (origin, txn_id, response, received_ts) VALUES ($1, $2, $3, $4)
                 ON CONFLICT DO NOTHING",
            )
            .bind(origin)
            .bind(txn_id)
            .bind(response)
            .bind(now_ts)
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM federation_inbound_txns WHERE received_ts < $1")
                .bind(forget_before_ts)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        })
    }
}
