//! The keys the register workload works on, after Jepsen's independent keys: a few at a time,
//! each retired after a bounded number of operations, or of operations whose outcome is
//! unknown, and replaced by a fresh one. The search has to consider every subset of the
//! unknown outcomes as having happened, so their number per key is what keeps it tractable,
//! however long the run and however many faults it has.

use std::sync::Mutex;

use crate::lock::lock;

/// Operations a key takes before clients move on to a fresh one...
pub const OPS_PER_KEY: u64 = 100;
/// ...or operations of unknown outcome.
pub const UNKNOWN_PER_KEY: u64 = 8;

/// `slots` keys in use at a time.
#[derive(Debug)]
pub struct KeyPool {
    per_key: u64,
    unknown_per_key: u64,
    /// The slots and the next fresh key.
    slots: Mutex<(Vec<Slot>, u64)>,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    key: u64,
    ops: u64,
    unknown: u64,
}

impl KeyPool {
    pub fn new(slots: u64, per_key: u64, unknown_per_key: u64) -> Self {
        let keys = (0..slots)
            .map(|key| Slot {
                key,
                ops: 0,
                unknown: 0,
            })
            .collect();
        Self {
            per_key: per_key.max(1),
            unknown_per_key: unknown_per_key.max(1),
            slots: Mutex::new((keys, slots)),
        }
    }

    /// An operation on `key` ended with an unknown outcome.
    pub fn unknown(&self, key: u64) {
        let mut guard = lock(&self.slots);
        if let Some(s) = guard.0.iter_mut().find(|s| s.key == key) {
            s.unknown += 1;
        }
    }

    /// The key for the next operation on `slot` (taken modulo the number of slots).
    pub fn next(&self, slot: u64) -> u64 {
        let mut guard = lock(&self.slots);
        let (slots, fresh) = &mut *guard;
        if slots.is_empty() {
            return 0;
        }
        let i = (slot % slots.len() as u64) as usize;
        if slots[i].ops >= self.per_key || slots[i].unknown >= self.unknown_per_key {
            slots[i] = Slot {
                key: *fresh,
                ops: 0,
                unknown: 0,
            };
            *fresh += 1;
        }
        slots[i].ops += 1;
        slots[i].key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_takes_a_bounded_number_of_operations() {
        let pool = KeyPool::new(2, 3, 100);
        let keys: Vec<u64> = (0..12).map(|i| pool.next(i)).collect();
        let mut counts = std::collections::BTreeMap::new();
        for k in &keys {
            *counts.entry(*k).or_insert(0) += 1;
        }
        assert!(counts.values().all(|&c| c <= 3), "{counts:?}");
        assert_eq!(counts.len(), 4, "fresh keys replace used ones: {counts:?}");
    }

    #[test]
    fn a_key_with_enough_unknown_outcomes_is_retired() {
        let pool = KeyPool::new(1, 100, 2);
        let k = pool.next(0);
        pool.unknown(k);
        assert_eq!(pool.next(0), k);
        pool.unknown(k);
        assert_ne!(pool.next(0), k);
    }
}
