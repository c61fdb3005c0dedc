//! Log lines that a flood could repeat (an attack cut by the timeouts, a database
//! outage answered with 503s): each kind is written at most once per interval, with the
//! number of events it stands for, so that no client can flood the log.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// One kind of event whose log line is rate-limited. Use as a `static`.
pub struct Throttle {
    interval: Duration,
    /// When a line was last written, and the events counted since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    pub const fn new(interval: Duration) -> Self {
        Self { interval, state: Mutex::new((None, 0)) }
    }

    /// Counts one event. Answers `Some(n)` when a line should be written now: `n` events
    /// happened since the last line (this one included). The first event is written at
    /// once; later ones at most once per interval.
    pub fn hit(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (last, count) = &mut *state;
        *count += 1;
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < self.interval) {
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_makes_one_line_per_interval_with_its_count() {
        let throttle = Throttle::new(Duration::from_millis(200));
        assert_eq!(throttle.hit(), Some(1));
        let written: Vec<_> = (0..10_000).filter_map(|_| throttle.hit()).collect();
        assert!(written.is_empty(), "{written:?}");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(throttle.hit(), Some(10_001));
        assert_eq!(throttle.hit(), None);
    }
}
