//! Hybrid timestamps: wall-clock milliseconds in the high bits and an 18-bit
//! logical counter in the low bits (the layout Milvus uses), so a user's
//! `AS OF '2026-11-24 10:00:00'` names a real instant.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A hybrid timestamp; also the dataflow's timely time.
pub type Timestamp = u64;

/// Bits of the logical counter.
pub const LOGICAL_BITS: u32 = 18;
const LOGICAL_MASK: u64 = (1 << LOGICAL_BITS) - 1;

/// Composes a timestamp from milliseconds since the Unix epoch and a logical counter.
pub fn compose(physical_ms: u64, logical: u64) -> Timestamp {
    (physical_ms << LOGICAL_BITS) | (logical & LOGICAL_MASK)
}

/// Milliseconds since the Unix epoch of a timestamp.
pub fn physical_ms(ts: Timestamp) -> u64 {
    ts >> LOGICAL_BITS
}

/// The logical counter of a timestamp.
pub fn logical(ts: Timestamp) -> u64 {
    ts & LOGICAL_MASK
}

/// The wall clock now, in milliseconds since the Unix epoch.
pub fn wall_clock_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The timestamp `duration` before `ts` (saturating at zero).
pub fn before(ts: Timestamp, duration: Duration) -> Timestamp {
    ts.saturating_sub((duration.as_millis() as u64) << LOGICAL_BITS)
}

/// The timestamp of a wall-clock instant with logical counter zero.
pub fn from_system_time(time: SystemTime) -> Timestamp {
    let ms = time.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    compose(ms, 0)
}

/// The timestamp oracle: hands out strictly increasing hybrid timestamps that
/// track the wall clock and never go back, even if the clock does.
#[derive(Debug, Default)]
pub struct Tso {
    last: AtomicU64,
}

impl Tso {
    /// An oracle whose first timestamp is above `floor` (the largest timestamp
    /// already used, for example found in the log on restart).
    pub fn new(floor: Timestamp) -> Self {
        Tso { last: AtomicU64::new(floor) }
    }

    /// Reserves `n >= 1` consecutive timestamps and returns the first.
    pub fn allocate(&self, n: u64) -> Timestamp {
        let n = n.max(1);
        let mut last = self.last.load(Ordering::Acquire);
        loop {
            let first = compose(wall_clock_ms(), 0).max(last + 1);
            match self.last.compare_exchange_weak(last, first + n - 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return first,
                Err(actual) => last = actual,
            }
        }
    }

    /// The smallest timestamp a later [`Tso::allocate`] can return; nothing is reserved.
    pub fn next_possible(&self) -> Timestamp {
        compose(wall_clock_ms(), 0).max(self.last.load(Ordering::Acquire) + 1)
    }

    /// The last timestamp handed out.
    pub fn last(&self) -> Timestamp {
        self.last.load(Ordering::Acquire)
    }

    /// Makes sure every later timestamp is above `ts`.
    pub fn observe(&self, ts: Timestamp) {
        self.last.fetch_max(ts, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_round_trips() {
        let ts = compose(1_700_000_000_000, 5);
        assert_eq!(physical_ms(ts), 1_700_000_000_000);
        assert_eq!(logical(ts), 5);
    }

    #[test]
    fn tso_is_strictly_increasing_and_reserves_ranges() {
        let tso = Tso::new(compose(wall_clock_ms() + 10_000, 0));
        let a = tso.allocate(1);
        let b = tso.allocate(10);
        let c = tso.allocate(1);
        assert!(a < b);
        assert_eq!(c, b + 10);
        assert!(tso.next_possible() > c);
    }
}
