//! The live stream's positions and the persisted-up-to mark.
//!
//! Positions are handed out in process (Convo is one process: the data dir is locked)
//! from blocks reserved in the database: `stream_position.pos` is the highest position
//! ever reserved, raised by `BLOCK` in a statement of its own before any position of a
//! new block is handed out. So no writer holds a lock on a shared row until it commits,
//! and writers of different rooms no longer wait for each other. A position is taken
//! before the writer's transaction begins (on SQLite the one writer connection may be
//! needed to reserve the next block).
//!
//! Positions may then commit out of order. Readers stop at the mark: the highest
//! position below which every position handed out has committed or been abandoned
//! (its transaction failed or was dropped). `Positions` is the claim on a batch of
//! positions; it is let go after the commit (`commit`), or when it is dropped with a
//! transaction that did not commit, so a failed writer never holds the mark back.
//!
//! After a restart, positions go on past the reserved ceiling, which is at least every
//! position ever handed out: past every stored one, and past deleted rows (delivered
//! to-device messages) and abandoned positions that a client may hold in a token,
//! which no scan of the tables could see.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::watch;

use super::{
    Store,
    changes::{self, Change, Kind},
    on_pool,
};
use crate::error::{Error, Result};

/// Positions reserved in the database at a time: one short write per `BLOCK` positions,
/// and at most `BLOCK` positions skipped at a restart.
const BLOCK: i64 = 100;

/// Reads the highest position reserved so far (at start).
pub(super) const RESERVED_SQL: &str = "SELECT pos FROM stream_position WHERE id = 1";

/// The bookkeeping behind the mark, without I/O.
#[derive(Debug)]
struct Tracker {
    /// The next position to hand out.
    next: i64,
    /// The highest position reserved in the database: those up to it may be handed out.
    reserved: i64,
    /// Batches handed out whose transactions have not finished: first position -> size.
    in_flight: BTreeMap<i64, i64>,
    /// The highest position finished (committed or abandoned).
    finished: i64,
}

impl Tracker {
    /// Everything up to `reserved` is finished (the state at start).
    fn new(reserved: i64) -> Self {
        Tracker { next: reserved + 1, reserved, in_flight: BTreeMap::new(), finished: reserved }
    }

    /// The first of `n` consecutive positions, or `None` when the reserve is short.
    fn take(&mut self, n: i64) -> Option<i64> {
        if self.next + n - 1 > self.reserved {
            return None;
        }
        let first = self.next;
        self.next += n;
        self.in_flight.insert(first, n);
        Some(first)
    }

    /// The batch starting at `first` has committed or been abandoned.
    fn finish(&mut self, first: i64) {
        if let Some(n) = self.in_flight.remove(&first) {
            self.finished = self.finished.max(first + n - 1);
        }
    }

    /// The database reserved `first..=last`. Positions below `first` not handed out yet
    /// were reserved by no one else only if `first` follows on: skip them otherwise.
    fn reserve(&mut self, first: i64, last: i64) {
        self.next = self.next.max(first);
        self.reserved = self.reserved.max(last);
    }

    /// Every position up to the mark has committed or been abandoned.
    fn mark(&self) -> i64 {
        self.in_flight.first_key_value().map_or(self.next - 1, |(first, _)| first - 1)
    }
}

struct Shared {
    tracker: Mutex<Tracker>,
    /// The mark, for readers that wait for it to move.
    mark: watch::Sender<i64>,
    /// One reservation of a new block at a time.
    reserving: tokio::sync::Mutex<()>,
}

impl Shared {
    fn tracker(&self) -> MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes the tracker's mark (it never goes down).
    fn publish(&self, tracker: &Tracker) {
        let mark = tracker.mark();
        self.mark.send_if_modified(|m| {
            let moved = mark > *m;
            if moved {
                *m = mark;
            }
            moved
        });
    }
}

/// The stream's positions of one store.
pub(crate) struct Stream {
    shared: Arc<Shared>,
}

impl Stream {
    /// A stream whose positions up to `reserved` are all finished.
    pub(crate) fn new(reserved: i64) -> Self {
        Stream {
            shared: Arc::new(Shared {
                tracker: Mutex::new(Tracker::new(reserved)),
                mark: watch::channel(reserved).0,
                reserving: tokio::sync::Mutex::new(()),
            }),
        }
    }

    fn try_take(&self, n: i64) -> Option<Positions> {
        let first = self.shared.tracker().take(n)?;
        Some(Positions { shared: Arc::clone(&self.shared), first, count: n })
    }

    fn reserve(&self, first: i64, last: i64) {
        let mut tracker = self.shared.tracker();
        tracker.reserve(first, last);
        self.shared.publish(&tracker);
    }

    fn mark(&self) -> i64 {
        *self.shared.mark.borrow()
    }

    /// The mark's channel, for a task that must not keep the stream alive.
    pub(crate) fn subscribe_mark(&self) -> watch::Receiver<i64> {
        self.shared.mark.subscribe()
    }

    fn watch(&self) -> StreamWatch {
        StreamWatch { shared: Arc::clone(&self.shared) }
    }
}

/// The mark, for those who wait for it to move (the notifier). No I/O.
#[derive(Clone)]
pub struct StreamWatch {
    shared: Arc<Shared>,
}

impl StreamWatch {
    /// The persisted-up-to mark.
    pub fn mark(&self) -> i64 {
        *self.shared.mark.borrow()
    }

    /// The highest position whose writer has finished (committed, or abandoned). A
    /// write that has just committed is at or below it, but may be above the mark.
    pub fn finished(&self) -> i64 {
        self.shared.tracker().finished
    }

    /// Resolves once the mark has reached `position`.
    pub async fn reached(&self, position: i64) {
        let _ = self.shared.mark.subscribe().wait_for(|mark| *mark >= position).await;
    }
}

impl Default for StreamWatch {
    /// The mark of a stream of its own, with nothing in flight (unit tests).
    fn default() -> Self {
        Stream::new(0).watch()
    }
}

/// A claim on consecutive stream positions for one transaction. Dropping it lets the
/// positions go (the transaction did not commit: they are abandoned); `commit` lets
/// them go once the transaction has committed.
#[must_use]
pub(crate) struct Positions {
    shared: Arc<Shared>,
    first: i64,
    count: i64,
}

impl Positions {
    /// The first position.
    pub(crate) fn first(&self) -> i64 {
        self.first
    }

    /// The `i`th position (from 0).
    pub(crate) fn nth(&self, i: usize) -> Result<i64> {
        let i = i64::try_from(i).map_err(Error::internal)?;
        if i >= self.count {
            return Err(Error::internal(format!("stream position {i} of a batch of {}", self.count)));
        }
        Ok(self.first + i)
    }
}

impl Drop for Positions {
    fn drop(&mut self) {
        let mut tracker = self.shared.tracker();
        tracker.finish(self.first);
        self.shared.publish(&tracker);
    }
}

/// A position held by `Store::hold_stream_position`.
#[doc(hidden)]
pub struct HeldPosition(Positions);

impl HeldPosition {
    pub fn position(&self) -> i64 {
        self.0.first()
    }
}

/// Commits `tx`, then lets `positions` go, in a task of its own: a request dropped while
/// it waits here (its client went away) cannot let the positions go before the commit
/// has landed, which would let readers pass rows that appear after them.
pub(crate) async fn commit<DB: sqlx::Database>(
    tx: sqlx::Transaction<'static, DB>,
    positions: Option<Positions>,
) -> Result<()> {
    let Some(positions) = positions else {
        tx.commit().await?;
        return Ok(());
    };
    tokio::spawn(async move {
        let committed = tx.commit().await;
        drop(positions);
        committed
    })
    .await
    .map_err(|e| Error::internal(format!("a commit's task failed: {e}")))??;
    Ok(())
}

impl Store {
    /// Takes `n` (at least 1) consecutive live stream positions for a write about to
    /// begin: take them before `pool.begin()`, and commit with `stream::commit`.
    /// It records an unclassified change (`changes.rs`): writers of what `/sync` reads
    /// say what they write with `take_positions_for`.
    pub(crate) async fn take_positions(&self, n: i64) -> Result<Positions> {
        self.take_positions_for(n, &[Change::new(Kind::Any, "")]).await
    }

    /// `take_positions`, recording `changes` at the batch's last position in the
    /// change index before the write begins (so before the mark can pass it).
    pub(crate) async fn take_positions_for(&self, n: i64, changes: &[Change]) -> Result<Positions> {
        let positions = self.take_positions_unrecorded(n).await?;
        self.changes.record(changes, positions.first + positions.count - 1);
        Ok(positions)
    }

    async fn take_positions_unrecorded(&self, n: i64) -> Result<Positions> {
        if n < 1 {
            return Err(Error::internal(format!("{n} stream positions asked for")));
        }
        loop {
            if let Some(positions) = self.stream.try_take(n) {
                return Ok(positions);
            }
            let _reserving = self.stream.shared.reserving.lock().await;
            if let Some(positions) = self.stream.try_take(n) {
                return Ok(positions);
            }
            let want = BLOCK.max(n);
            let (last,): (i64,) = on_pool!(self, write, |pool| {
                sqlx::query_as("UPDATE stream_position SET pos = pos + $1 WHERE id = 1 RETURNING pos")
                    .bind(want)
                    .fetch_one(pool)
                    .await?
            });
            self.stream.reserve(last - want + 1, last);
        }
    }

    /// The persisted-up-to mark: every position up to it has committed or been
    /// abandoned, so a reader that stops there never skips a row that commits later.
    /// `/sync` tokens never pass it.
    pub async fn current_stream_position(&self) -> Result<i64> {
        Ok(self.stream.mark())
    }

    /// Takes a stream position and holds it until the answer is dropped, as a writer
    /// does between taking its position and committing: a stand-in for a slow writer
    /// in tests.
    #[doc(hidden)]
    pub async fn hold_stream_position(&self) -> Result<HeldPosition> {
        Ok(HeldPosition(self.take_positions(1).await?))
    }

    /// The change index (`changes.rs`): read the mark first, then ask it.
    pub fn changes(&self) -> &changes::ChangeIndex {
        &self.changes
    }

    /// The mark, to wait on.
    pub fn stream_watch(&self) -> StreamWatch {
        self.stream.watch()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark_waits_for_the_lowest_open_position() {
        let mut t = Tracker::new(10);
        t.reserve(11, 20);
        assert_eq!(t.mark(), 10);
        let a = t.take(1).unwrap();
        let b = t.take(1).unwrap();
        let c = t.take(1).unwrap();
        assert_eq!((a, b, c), (11, 12, 13));
        assert_eq!(t.mark(), 10, "nothing finished");
        // Out of order: the later ones commit first.
        t.finish(c);
        t.finish(b);
        assert_eq!(t.mark(), 10, "11 is still open, so 12 and 13 stay hidden");
        assert_eq!(t.finished, 13);
        t.finish(a);
        assert_eq!(t.mark(), 13);
    }

    #[test]
    fn an_abandoned_position_does_not_hold_the_mark() {
        let mut t = Tracker::new(0);
        t.reserve(1, 100);
        let failed = t.take(1).unwrap();
        let ok = t.take(1).unwrap();
        t.finish(ok);
        assert_eq!(t.mark(), 0);
        // The failed transaction lets its position go like a committed one.
        t.finish(failed);
        assert_eq!(t.mark(), 2);
        // Later writers go on past it.
        let next = t.take(1).unwrap();
        assert_eq!(next, 3);
        assert_eq!(t.mark(), 2);
        t.finish(next);
        assert_eq!(t.mark(), 3);
    }

    #[test]
    fn batches_finish_whole() {
        let mut t = Tracker::new(0);
        t.reserve(1, 100);
        let room = t.take(5).unwrap();
        let message = t.take(1).unwrap();
        assert_eq!((room, message), (1, 6));
        t.finish(message);
        assert_eq!(t.mark(), 0, "the room's five events are not committed");
        t.finish(room);
        assert_eq!(t.mark(), 6);
        assert_eq!(t.finished, 6);
    }

    #[test]
    fn positions_stop_at_the_reserve() {
        let mut t = Tracker::new(7);
        assert_eq!(t.take(1), None, "nothing reserved past 7 yet");
        t.reserve(8, 9);
        assert_eq!(t.take(3), None, "a batch does not straddle the reserve");
        assert_eq!(t.take(2), Some(8));
        assert_eq!(t.take(1), None);
        // Someone else took 10..=19: this store goes on from 20.
        t.reserve(20, 29);
        assert_eq!(t.take(1), Some(20));
        assert_eq!(t.mark(), 7);
    }

    #[tokio::test]
    async fn positions_let_go_on_drop_and_waiters_wait_for_the_mark() {
        let stream = Stream::new(0);
        stream.reserve(1, 100);
        let watch = stream.watch();
        let first = stream.try_take(1).unwrap();
        let second = stream.try_take(1).unwrap();
        assert_eq!((first.first(), second.first()), (1, 2));
        drop(second);
        assert_eq!((watch.mark(), watch.finished()), (0, 2));
        // Whoever waits for the second to be visible waits for the first too.
        let mut waiting = Box::pin(watch.reached(watch.finished()));
        assert!(futures_poll_once(&mut waiting).await.is_none(), "1 is still open");
        drop(first);
        waiting.await;
        assert_eq!(watch.mark(), 2);
    }

    /// Polls a future once: its output if it is ready.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut *f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
