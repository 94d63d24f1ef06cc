//! The scan backend's core: what changed in a kernel map relative to what raftmap last knew.

use std::collections::HashMap;
use std::hash::BuildHasher;

/// One key's new state in the kernel (`None`: deleted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelChange {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// Changes that turn `base` (the contents raftmap last applied or captured) into `kernel` (the
/// contents now), sorted by key so that proposals are deterministic.
pub fn diff<S1: BuildHasher, S2: BuildHasher>(
    base: &HashMap<Vec<u8>, Vec<u8>, S1>,
    kernel: &HashMap<Vec<u8>, Vec<u8>, S2>,
) -> Vec<KernelChange> {
    let mut out: Vec<KernelChange> = kernel
        .iter()
        .filter(|(k, v)| base.get(*k) != Some(*v))
        .map(|(k, v)| KernelChange {
            key: k.clone(),
            value: Some(v.clone()),
        })
        .chain(
            base.keys()
                .filter(|k| !kernel.contains_key(*k))
                .map(|k| KernelChange {
                    key: k.clone(),
                    value: None,
                }),
        )
        .collect();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pairs: &[(u8, u8)]) -> HashMap<Vec<u8>, Vec<u8>> {
        pairs.iter().map(|(k, v)| (vec![*k], vec![*v])).collect()
    }

    #[test]
    fn finds_new_changed_and_deleted_keys_in_key_order() {
        let base = m(&[(1, 1), (2, 2), (3, 3)]);
        let kernel = m(&[(1, 1), (2, 9), (4, 4)]);
        assert_eq!(
            diff(&base, &kernel),
            vec![
                KernelChange {
                    key: vec![2],
                    value: Some(vec![9])
                },
                KernelChange {
                    key: vec![3],
                    value: None
                },
                KernelChange {
                    key: vec![4],
                    value: Some(vec![4])
                },
            ]
        );
        assert!(diff(&kernel, &kernel).is_empty());
    }
}
