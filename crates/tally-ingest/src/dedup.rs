//! The worker's own duplicate check on event ids.
//!
//! JetStream's duplicate window catches a message published twice with the same
//! `Nats-Msg-Id`, but a batch message's id covers the whole batch: an event repeated in
//! another batch reaches the worker. Each partition keeps the ids it has seen in two
//! generations of a hash set; when the young one fills, the old one is dropped. The
//! horizon is therefore at least `capacity` distinct ids per partition, and memory stays
//! at most `2 × capacity × 16` bytes (plus the table's slack).

use hashbrown::HashSet;

/// A compact key: the id's 128-bit XXH3 hash (ids are compared as exact strings; a
/// collision between two distinct ids is as unlikely as between two random UUIDs).
fn key(id: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(id.as_bytes())
}

pub struct Dedup {
    young: HashSet<u128, foldhash::fast::FixedState>,
    old: HashSet<u128, foldhash::fast::FixedState>,
    capacity: usize,
}

impl Dedup {
    pub fn new(capacity: usize) -> Self {
        Self {
            young: HashSet::with_hasher(foldhash::fast::FixedState::default()),
            old: HashSet::with_hasher(foldhash::fast::FixedState::default()),
            capacity: capacity.max(1),
        }
    }

    /// The ids remembered, oldest generation first, for a checkpoint.
    pub fn export(&self) -> Vec<u128> {
        self.old.iter().chain(self.young.iter()).copied().collect()
    }

    /// Remembers ids exported by [`Dedup::export`], as the newest generation (or two).
    pub fn restore(&mut self, keys: &[u128]) {
        for &k in keys {
            self.insert(k);
        }
    }

    /// Records an id; `false` if it was seen before within the horizon.
    pub fn first_time(&mut self, id: &str) -> bool {
        self.insert(key(id))
    }

    fn insert(&mut self, k: u128) -> bool {
        if self.old.contains(&k) || !self.young.insert(k) {
            return false;
        }
        if self.young.len() >= self.capacity {
            self.old = std::mem::take(&mut self.young);
            self.young.reserve(self.capacity.min(1 << 16));
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_inside_the_horizon_are_caught() {
        let mut d = Dedup::new(3);
        for id in ["a", "b", "01935e1c-7a3b-7c2d-9e4f-0a1b2c3d4e5f"] {
            assert!(d.first_time(id));
        }
        // The young set rolled over into the old one; both are still checked.
        assert!(!d.first_time("a"));
        assert!(!d.first_time("01935e1c-7a3b-7c2d-9e4f-0a1b2c3d4e5f"));
        assert!(d.first_time("c"));
        assert!(d.first_time("d"));
        assert!(d.first_time("e"));
        // Two rollovers later, "a" is past the horizon.
        assert!(d.first_time("f"));
        assert!(d.first_time("a"));
    }

    #[test]
    fn a_restored_set_catches_what_the_exported_one_did() {
        let mut d = Dedup::new(4);
        for id in ["a", "b", "c", "d", "e"] {
            assert!(d.first_time(id));
        }
        let mut restored = Dedup::new(4);
        restored.restore(&d.export());
        for id in ["a", "b", "c", "d", "e"] {
            assert!(!restored.first_time(id), "{id}");
        }
        assert!(restored.first_time("f"));
    }
}
