//! Statements of one write transaction whose results are not read, sent to SQLite
//! together: one multi-statement query is one round trip to the connection's thread,
//! where each statement on its own is a hand-off there and back, which costs more than
//! most of these statements take to run (the profile in `docs/performance.md`, issue 13).
//! On PostgreSQL each statement runs when it is added, as before.
//!
//! Only `?` placeholders (`push_bind`) go into a batch: sqlx numbers them across the
//! statements of one query. A statement whose result is read, or that must see the
//! batch's writes, flushes the batch first (`flush_batch!`), so statements run in the
//! order the code gives them. A failed statement ends the query with its error, and the
//! transaction is rolled back by its caller.
//!
//! sqlx 0.9 still runs several statements in one prepared query on SQLite, but calls it
//! deprecated (launchbadge/sqlx#3108; only `fetch_many` warns). Should a later sqlx drop
//! it, `together: false` makes every batch run one statement at a time, as on
//! PostgreSQL.

/// The statements gathered so far (see the module comment).
pub(crate) struct Batch<DB: sqlx::Database> {
    pub(crate) query: sqlx::QueryBuilder<DB>,
    pub(crate) statements: usize,
    /// SQLite: gathered. PostgreSQL: each runs when added.
    pub(crate) together: bool,
}

impl<DB: sqlx::Database> Batch<DB> {
    /// A batch for the transaction `_tx`.
    pub(crate) fn of(_tx: &sqlx::Transaction<'_, DB>) -> Self {
        Batch { query: sqlx::QueryBuilder::new(""), statements: 0, together: DB::NAME == "SQLite" }
    }
}

/// Adds one statement to `$batch`, built by `$build` (a closure over the
/// `&mut QueryBuilder`), or runs it in `$tx` at once on PostgreSQL.
macro_rules! batched {
    ($tx:expr, $batch:expr, $build:expr) => {{
        let batch = &mut $batch;
        if batch.together {
            if batch.statements > 0 {
                batch.query.push(";\n");
            }
            ($build)(&mut batch.query);
            batch.statements += 1;
        } else {
            let mut query = sqlx::QueryBuilder::new("");
            ($build)(&mut query);
            query.build().execute(&mut *$tx).await?;
        }
    }};
}
pub(crate) use batched;

/// Runs the statements gathered in `$batch`, in `$tx`, as one query.
macro_rules! flush_batch {
    ($tx:expr, $batch:expr) => {{
        let batch = &mut $batch;
        if batch.statements > 0 {
            batch.query.build().execute(&mut *$tx).await?;
            batch.query.reset();
            batch.statements = 0;
        }
    }};
}
pub(crate) use flush_batch;

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::{Connection, SqliteConnection};

    /// Inserts `rows` and multiplies `b` by ten, all in one batch, and commits.
    async fn write(conn: &mut SqliteConnection, rows: &[(&'static str, i64)]) -> Result<(), sqlx::Error> {
        let mut tx = conn.begin().await?;
        let mut batch = Batch::of(&tx);
        assert!(batch.together);
        for (k, v) in rows {
            batched!(tx, batch, |q: &mut sqlx::QueryBuilder<_>| {
                q.push("INSERT INTO t (k, v) VALUES (").push_bind(*k).push(", ").push_bind(*v).push(")");
            });
        }
        batched!(tx, batch, |q: &mut sqlx::QueryBuilder<_>| {
            q.push("UPDATE t SET v = v * ").push_bind(10_i64).push(" WHERE k = ").push_bind("b");
        });
        assert_eq!(batch.statements, rows.len() + 1);
        flush_batch!(tx, batch);
        assert_eq!(batch.statements, 0);
        tx.commit().await
    }

    /// Values bound in several statements of one batch land where each statement put
    /// them, and a failing statement takes the transaction's earlier writes with it.
    #[tokio::test]
    async fn sqlite_batch_binds_across_statements_and_fails_whole() -> Result<(), sqlx::Error> {
        let mut conn = SqliteConnection::connect("sqlite::memory:").await?;
        sqlx::query("CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER NOT NULL)").execute(&mut conn).await?;
        write(&mut conn, &[("a", 1), ("b", 2), ("c", 3)]).await?;
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT k, v FROM t ORDER BY k").fetch_all(&mut conn).await?;
        assert_eq!(rows, vec![("a".into(), 1), ("b".into(), 20), ("c".into(), 3)]);
        // "a" again fails the second statement: "d" before it is not kept either.
        assert!(write(&mut conn, &[("d", 4), ("a", 5)]).await.is_err(), "a duplicate key must fail the batch");
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT k, v FROM t ORDER BY k").fetch_all(&mut conn).await?;
        assert_eq!(rows, vec![("a".into(), 1), ("b".into(), 20), ("c".into(), 3)]);
        Ok(())
    }
}
