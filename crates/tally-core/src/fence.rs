//! Whether this process may still make a partition's writes visible.
//!
//! A worker owns a partition through a lease it renews in NATS (see the ingest crate's
//! `ownership`). Every renewal moves the partition's [`Fence`] to a deadline that falls
//! before the lease can expire on the server; the lake checks the fence right before a
//! file becomes visible (its rename) and refuses once the deadline has passed. So a worker
//! that stalls, is cut off from NATS or has lost its lease writes nothing after another
//! worker may have taken the partition over.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// The instant fence deadlines count from.
fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn nanos(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(base()).as_nanos()).unwrap_or(u64::MAX - 1)
}

/// A deadline for a partition's writes. Clones are the same fence: a renewal or a revoke
/// through one is seen through all.
#[derive(Debug, Clone)]
pub struct Fence {
    /// Nanoseconds after [`base`]; `u64::MAX`: no deadline (no lease in use).
    until: Arc<AtomicU64>,
}

impl Fence {
    /// A fence that never closes: the partition is not guarded by a lease.
    pub fn open() -> Fence {
        Fence {
            until: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }

    /// A fence that holds until `deadline`.
    pub fn until(deadline: Instant) -> Fence {
        Fence {
            until: Arc::new(AtomicU64::new(nanos(deadline))),
        }
    }

    /// Moves the deadline (a renewed lease); never reopens a revoked fence.
    pub fn extend(&self, deadline: Instant) {
        let to = nanos(deadline);
        let _ = self
            .until
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                (now != 0 && now < to).then_some(to)
            });
    }

    /// Closes the fence for good (the lease is lost or released).
    pub fn revoke(&self) {
        self.until.store(0, Ordering::Release);
    }

    /// Whether writes may still become visible.
    pub fn holds(&self) -> bool {
        let until = self.until.load(Ordering::Acquire);
        until == u64::MAX || nanos(Instant::now()) < until
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_fence_holds_until_its_deadline_and_never_after_a_revoke() {
        assert!(Fence::open().holds());
        let now = Instant::now();
        let fence = Fence::until(now + Duration::from_secs(60));
        assert!(fence.holds());
        assert!(!Fence::until(now).holds());
        // A renewal only moves the deadline later.
        fence.extend(now);
        assert!(fence.holds());
        fence.revoke();
        assert!(!fence.holds());
        fence.extend(now + Duration::from_secs(120));
        assert!(!fence.holds(), "a revoked fence stays closed");
        let open = Fence::open();
        let clone = open.clone();
        open.revoke();
        assert!(!clone.holds(), "a clone is the same fence");
    }
}
