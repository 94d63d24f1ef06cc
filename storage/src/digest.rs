//! A digest of the replicated state, for consistency checks across replicas (as etcd's hash
//! check does) and of a replica against its own disk.
//!
//! The digest is the wrapping sum, over every entry, of a 64-bit hash of its data key and value:
//! independent of order, so the state machine keeps it up to date as it applies (subtract an
//! entry's old hash, add its new one) and stores it with the applied log id in the same atomic
//! write. Two replicas at the same applied index must have the same digest; a replica whose
//! entries, read back from disk, no longer sum to its stored digest has a corrupt disk.

use std::collections::VecDeque;

use crate::db::{Db, CF_SM_DATA};
use crate::error::Result;

/// A checkpoint every this many log entries: the digest at exactly that index.
pub const CHECKPOINT_EVERY: u64 = 1000;
/// Checkpoints kept in memory.
const CHECKPOINTS_KEPT: usize = 16;

/// The hash of one entry: the CRC-32 of its key in the high half, the CRC-32 of its value,
/// seeded with the key's, in the low half.
pub(crate) fn entry_hash(data_key: &[u8], value: &[u8]) -> u64 {
    let k = crc32fast::hash(data_key);
    let mut h = crc32fast::Hasher::new_with_initial(k);
    h.update(value);
    (u64::from(k) << 32) | u64::from(h.finalize())
}

/// The digest of a whole state: every `(data key, value)`.
pub(crate) fn of_entries<'a>(entries: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> u64 {
    entries
        .into_iter()
        .fold(0u64, |d, (k, v)| d.wrapping_add(entry_hash(k, v)))
}

/// The digest of the state as it is on disk, read from a consistent RocksDB snapshot, and the
/// stored digest and applied index read from the same snapshot.
pub(crate) fn recompute(
    db: &Db,
    stored: impl Fn(&rocksdb::Snapshot<'_>) -> Result<(u64, u64)>,
) -> Result<Recomputed> {
    let snap = db.db.snapshot();
    let (applied, stored_digest) = stored(&snap)?;
    let mut digest = 0u64;
    let mut entries = 0u64;
    for item in snap.iterator_cf(db.cf(CF_SM_DATA)?, rocksdb::IteratorMode::Start) {
        let (k, v) = item?;
        digest = digest.wrapping_add(entry_hash(&k, &v));
        entries += 1;
    }
    Ok(Recomputed {
        applied,
        stored: stored_digest,
        actual: digest,
        entries,
    })
}

/// What a full read of the state found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recomputed {
    /// The applied index the read was at.
    pub applied: u64,
    /// The digest the state machine kept.
    pub stored: u64,
    /// The digest of the entries read back.
    pub actual: u64,
    pub entries: u64,
}

impl Recomputed {
    /// The disk holds what the state machine wrote.
    pub fn matches(&self) -> bool {
        self.stored == self.actual
    }
}

/// The digests at the last checkpoints (`(index, digest)`, oldest first).
#[derive(Debug, Default)]
pub(crate) struct Checkpoints(VecDeque<(u64, u64)>);

impl Checkpoints {
    pub(crate) fn push(&mut self, index: u64, digest: u64) {
        self.0.push_back((index, digest));
        while self.0.len() > CHECKPOINTS_KEPT {
            self.0.pop_front();
        }
    }

    pub(crate) fn clear(&mut self) {
        self.0.clear();
    }

    pub(crate) fn to_vec(&self) -> Vec<(u64, u64)> {
        self.0.iter().copied().collect()
    }
}

/// Compares the checkpoints several replicas reported (`(node, [(index, digest)])`): at the
/// newest index two or more of them share, the nodes whose digest differs from the most common
/// one. `None` when they agree, or share no index.
pub fn disagreement(reports: &[(u64, Vec<(u64, u64)>)]) -> Option<Disagreement> {
    use std::collections::BTreeMap;
    let mut at: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
    for (node, cps) in reports {
        for &(index, digest) in cps {
            at.entry(index).or_default().push((*node, digest));
        }
    }
    // Every shared index is compared, newest first: a node that diverged once stays diverged.
    for (index, nodes) in at.into_iter().rev().filter(|(_, n)| n.len() > 1) {
        let mut by_digest: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for (node, digest) in nodes {
            by_digest.entry(digest).or_default().push(node);
        }
        if by_digest.len() > 1 {
            let mut groups: Vec<Vec<u64>> = by_digest.into_values().collect();
            // The largest group first (ties: by node id, so the answer is stable).
            groups.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
            let agree = groups.remove(0);
            return Some(Disagreement {
                index,
                agree,
                differ: groups.into_iter().flatten().collect(),
            });
        }
    }
    None
}

/// Replicas whose state differs at the same applied index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disagreement {
    pub index: u64,
    /// The nodes with the most common digest.
    pub agree: Vec<u64>,
    /// The others.
    pub differ: Vec<u64>,
}

impl std::fmt::Display for Disagreement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "at index {} the state of node(s) {:?} differs from that of node(s) {:?}",
            self.index, self.differ, self.agree
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_does_not_depend_on_order_and_sees_one_flipped_bit() {
        let a: &[(&[u8], &[u8])] = &[(b"k1", b"v1"), (b"k2", b"v2")];
        let b: &[(&[u8], &[u8])] = &[(b"k2", b"v2"), (b"k1", b"v1")];
        assert_eq!(of_entries(a.iter().copied()), of_entries(b.iter().copied()));
        let c: &[(&[u8], &[u8])] = &[(b"k1", b"v1"), (b"k2", b"v3")];
        assert_ne!(of_entries(a.iter().copied()), of_entries(c.iter().copied()));
        // A value moved to another key is another state.
        let d: &[(&[u8], &[u8])] = &[(b"k1", b"v2"), (b"k2", b"v1")];
        assert_ne!(of_entries(a.iter().copied()), of_entries(d.iter().copied()));
    }

    #[test]
    fn the_nodes_that_differ_at_a_shared_index_are_named() {
        let reports = vec![
            (1, vec![(1000, 7), (2000, 9)]),
            (2, vec![(1000, 7), (2000, 9)]),
            (3, vec![(1000, 7), (2000, 8)]),
            (4, vec![(1000, 7)]),
        ];
        let d = disagreement(&reports).unwrap();
        assert_eq!((d.index, d.agree, d.differ), (2000, vec![1, 2], vec![3]));
        assert_eq!(disagreement(&reports[..2]), None);
        assert_eq!(
            disagreement(&[(1, vec![(1000, 1)]), (2, vec![(2000, 2)])]),
            None
        );
    }
}
