//! Storage of users' reports of events and rooms (`reports`, migration 0023): written by
//! `/report`, read by `convo admin reports`.

use super::{Store, events::next_counter, on_pool};
use crate::error::Result;

/// A stored report.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct ReportRow {
    pub report_id: i64,
    pub room_id: String,
    /// `None`: a report of the room itself.
    pub event_id: Option<String>,
    pub reporter: String,
    pub reason: Option<String>,
    pub received_ts: i64,
}

impl Store {
    /// Stores a report; returns its id (from the `report` counter, so concurrent reports
    /// get distinct ids on both backends).
    pub async fn insert_report(
        &self,
        room_id: &str,
        event_id: Option<&str>,
        reporter: &str,
        reason: Option<&str>,
        received_ts: i64,
    ) -> Result<i64> {
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            let id = next_counter!(tx, "report", "1");
            sqlx::query(
                "INSERT INTO reports (report_id, room_id, event_id, reporter, reason, received_ts)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(id)
            .bind(room_id)
            .bind(event_id)
            .bind(reporter)
            .bind(reason)
            .bind(received_ts)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(id)
        })
    }

    /// The newest `limit` reports, newest first.
    pub async fn list_reports(&self, limit: i64) -> Result<Vec<ReportRow>> {
        on_pool!(self, read, |pool| {
            Ok(sqlx::query_as(
                "SELECT report_id, room_id, event_id, reporter, reason, received_ts FROM reports
                 ORDER BY report_id DESC LIMIT $1",
            )
            .bind(limit)
            .fetch_all(pool)
            .await?)
        })
    }
}
