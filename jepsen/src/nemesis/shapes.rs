//! The shapes of a network partition, and who drops whose packets for each.

use std::collections::BTreeMap;

use rand::Rng;

use rand::rngs::StdRng;

use super::NodeId;

/// The shapes of a network partition.
#[derive(Debug, Clone, Copy)]
pub(super) enum Shape {
    Halves,
    LeaderAlone,
    LeaderInMinority,
    Bridge,
    Ring,
}

/// Who drops whose packets for `shape` over `ids` (the leader first when it matters); and a
/// description of the cut.
pub(super) fn grudges(
    shape: Shape,
    ids: &[NodeId],
    leader: Option<NodeId>,
    rng: &mut StdRng,
) -> (BTreeMap<NodeId, Vec<NodeId>>, String) {
    let mut order = ids.to_vec();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.gen_range(0..=i));
    }
    // Put the leader first for the shapes built around it.
    if let Some(l) = leader {
        if let Some(p) = order.iter().position(|&i| i == l) {
            order.swap(0, p);
        }
    }
    let n = order.len();
    let split = |cut: usize| -> (Vec<NodeId>, Vec<NodeId>) {
        (order[..cut].to_vec(), order[cut..].to_vec())
    };
    let both_ways = |a: &[NodeId], b: &[NodeId], g: &mut BTreeMap<NodeId, Vec<NodeId>>| {
        for x in a {
            g.entry(*x).or_default().extend_from_slice(b);
        }
        for y in b {
            g.entry(*y).or_default().extend_from_slice(a);
        }
    };
    let fmt = |v: &[NodeId]| {
        v.iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut g = BTreeMap::new();
    let what = match shape {
        Shape::Halves => {
            let (a, b) = split(n / 2);
            both_ways(&a, &b, &mut g);
            format!("partition halves [{}] [{}]", fmt(&a), fmt(&b))
        }
        Shape::LeaderAlone => {
            let (a, b) = split(1);
            both_ways(&a, &b, &mut g);
            format!("partition leader alone [{}] [{}]", fmt(&a), fmt(&b))
        }
        Shape::LeaderInMinority => {
            let (a, b) = split(((n - 1) / 2).max(1));
            both_ways(&a, &b, &mut g);
            format!("partition leader in minority [{}] [{}]", fmt(&a), fmt(&b))
        }
        Shape::Bridge => {
            // The last node hears both halves; the halves do not hear each other.
            let bridge = order[n - 1];
            let (a, b) = (
                order[..(n - 1) / 2].to_vec(),
                order[(n - 1) / 2..n - 1].to_vec(),
            );
            both_ways(&a, &b, &mut g);
            format!("partition bridge [{}] [{}] via {bridge}", fmt(&a), fmt(&b))
        }
        Shape::Ring => {
            // Each node hears its two neighbours in the shuffled ring and nobody else.
            for (i, x) in order.iter().enumerate() {
                let (prev, next) = (order[(i + n - 1) % n], order[(i + 1) % n]);
                let deaf: Vec<NodeId> = order
                    .iter()
                    .copied()
                    .filter(|y| y != x && *y != prev && *y != next)
                    .collect();
                g.insert(*x, deaf);
            }
            format!("partition ring [{}]", fmt(&order))
        }
    };
    (g, what)
}
