//! The node-wide memory budget for request bodies and responses held in memory.
//!
//! Every request that buffers data (a KV body, a KV value, scan page or batch answer,
//! an S3 XML body) reserves its bytes here first, for as long as the data lives (until the response
//! body is fully sent); when the budget is exhausted the request is refused at once
//! with `SlowDown` (HTTP 503) instead of queueing, so a flood of requests or slow
//! readers cannot grow the node's memory past the budget. Streamed object data (S3
//! GET/PUT, in 1 MiB pieces) is not counted here.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A semaphore whose permits are bytes.
#[derive(Clone)]
pub struct MemoryBudget {
    bytes: Arc<Semaphore>,
    total: usize,
}

/// Bytes reserved from a [`MemoryBudget`]; given back when dropped.
#[derive(Debug)]
pub struct Reservation(Option<OwnedSemaphorePermit>);

impl MemoryBudget {
    pub fn new(total: u64) -> Self {
        let total = usize::try_from(total)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Self {
            bytes: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// Reserves `bytes`, or None when they are not available right now.
    pub fn try_reserve(&self, bytes: usize) -> Option<Reservation> {
        if bytes == 0 {
            return Some(Reservation(None));
        }
        let n = u32::try_from(bytes).ok()?;
        self.bytes
            .clone()
            .try_acquire_many_owned(n)
            .ok()
            .map(|p| Reservation(Some(p)))
    }

    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }

    pub fn total(&self) -> usize {
        self.total
    }
}

impl Reservation {
    /// Gives back everything above `bytes`.
    pub fn shrink_to(&mut self, bytes: usize) {
        if let Some(p) = &mut self.0 {
            let held = p.num_permits();
            if held > bytes {
                drop(p.split(held - bytes));
            }
        }
    }

    pub fn bytes(&self) -> usize {
        self.0.as_ref().map_or(0, |p| p.num_permits())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_bounded_and_given_back() {
        let b = MemoryBudget::new(100);
        let mut r1 = b.try_reserve(60).unwrap();
        assert!(b.try_reserve(60).is_none(), "over budget");
        r1.shrink_to(10);
        assert_eq!(r1.bytes(), 10);
        let r2 = b.try_reserve(90).unwrap();
        assert_eq!(b.available(), 0);
        drop((r1, r2));
        assert_eq!(b.available(), 100);
        assert!(b.try_reserve(101).is_none());
        assert_eq!(b.try_reserve(0).unwrap().bytes(), 0);
    }
}
