//! Redactions held until the event they redact arrives (`pending_redactions`). They are
//! written with the redaction (`persist_event`, `Redaction::Hold`) and taken when the
//! target is stored live (`Redaction::HeldBy`) or as an outlier (`apply_held_redaction`).
//! A redaction applied takes its target out of the search index.

use super::{Store, on_pool, relations::unrelate, search::unindex_for_search};
use crate::error::Result;

impl Store {
    /// The redactions held for any of `targets`: (target, redaction) pairs.
    pub async fn get_held_redactions(&self, targets: &[String]) -> Result<Vec<(String, String)>> {
        let mut found = Vec::new();
        for chunk in targets.chunks(500) {
            let rows: Vec<(String, String)> = on_pool!(self, read, |pool| {
                let mut query = sqlx::QueryBuilder::new(
                    "SELECT target_id, redaction_id FROM pending_redactions WHERE target_id IN (",
                );
                let mut list = query.separated(", ");
                for id in chunk {
                    list.push_bind(id);
                }
                query.push(") ORDER BY target_id, redaction_id");
                query.build_query_as().fetch_all(pool).await?
            });
            found.extend(rows);
        }
        Ok(found)
    }

    /// Applies a held redaction to its target, stored since (`redacted_json`: the
    /// target's redacted form; `None`: the redactions held for it do not apply), and
    /// forgets the redactions held for it. One transaction.
    pub async fn apply_held_redaction(&self, target: &str, applied: Option<(&str, &str)>) -> Result<()> {
        // A state event's JSON may change (the current state cache).
        let _writing = self.state_writing();
        // The target's room is not known here: every room's live tail waits (`live.rs`).
        let _live = self.live.begin_all();
        on_pool!(self, write, |pool| {
            let mut tx = pool.begin().await?;
            if let Some((by, redacted_json)) = applied {
                sqlx::query(
                    "UPDATE events SET json = $2, redacted_by = $3 WHERE event_id = $1 AND redacted_by IS NULL",
                )
                .bind(target)
                .bind(redacted_json)
                .bind(by)
                .execute(&mut *tx)
                .await?;
                unrelate!(tx, target);
                unindex_for_search!(tx, target);
            }
            sqlx::query("DELETE FROM pending_redactions WHERE target_id = $1").bind(target).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(())
        })
    }
}
