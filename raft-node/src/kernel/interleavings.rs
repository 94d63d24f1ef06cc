//! The sync's rules under random interleavings of two nodes' local writes, scans, commits,
//! applies, answers and lost proposals.

use std::collections::BTreeMap;

use foldhash::HashMap;
use raftmap_ebpf_hooks::KernelChange;

use super::state::Captured;
use super::tests::{changes_of, Node};

/// A tiny deterministic generator, so that a failing interleaving can be replayed.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// A proposal on its way: the node that captured it and what it carries.
struct Proposal {
    origin: usize,
    captured: Vec<Captured>,
}

/// Two nodes, random local writes, scans, commits, applies, answers and lost proposals, in
/// random orders: both kernel maps end with the committed state, and no node ever proposes a
/// value that is not a local write still to be sent (a stale value proposed again would undo
/// a newer committed write: a lost write).
#[test]
fn every_node_ends_with_the_committed_state_whatever_the_interleaving() {
    for seed in 0..200 {
        let mut rng = Lcg(seed);
        let mut nodes = vec![Node::new(&[]), Node::new(&[])];
        let mut queued: Vec<Proposal> = Vec::new();
        // The log: origin and changes; each node's next entry to apply; answers on their way;
        // each node's local writes not yet proposed (or proposed and lost).
        let mut log: Vec<(usize, Vec<KernelChange>)> = Vec::new();
        let mut next = [0usize; 2];
        let mut answers: Vec<(usize, Vec<Captured>, u64)> = Vec::new();
        let mut unsent: [HashMap<Vec<u8>, Option<Vec<u8>>>; 2] = Default::default();
        let mut step = |nodes: &mut Vec<Node>, rng: &mut Lcg, quiet: bool| {
            let x = rng.below(2) as usize;
            match rng.below(if quiet { 5 } else { 6 }) {
                0 => {
                    let c = nodes[x].scan();
                    for c in &c {
                        let k = &c.change.key;
                        assert_eq!(
                            unsent[x].get(k),
                            Some(&c.change.value),
                            "seed {seed}: node {x} proposed {:?} for key {k:?}, not a local write",
                            c.change.value
                        );
                        unsent[x].remove(k);
                    }
                    if !c.is_empty() {
                        queued.push(Proposal {
                            origin: x,
                            captured: c,
                        });
                    }
                }
                1 if !queued.is_empty() => {
                    let p = queued.remove(0);
                    log.push((p.origin, changes_of(&p.captured)));
                    answers.push((p.origin, p.captured, log.len() as u64));
                }
                2 if next[x] < log.len() => {
                    let (origin, changes) = log[next[x]].clone();
                    next[x] += 1;
                    nodes[x].apply(origin == x, &changes);
                    nodes[x].settle(next[x] as u64);
                }
                3 if !answers.is_empty() => {
                    let (origin, captured, index) = answers.remove(0);
                    let n = &mut nodes[origin];
                    n.st.committed_at(&captured, index);
                    if next[origin] as u64 >= index {
                        n.settle(index);
                    }
                }
                4 if !queued.is_empty() && rng.below(4) == 0 => {
                    // A proposal lost with its leader: its changes are to be sent again (those
                    // not superseded by a newer capture or local write).
                    let p = queued.remove(0);
                    for c in p
                        .captured
                        .iter()
                        .filter(|c| nodes[p.origin].st.is_latest(c))
                    {
                        unsent[p.origin]
                            .entry(c.change.key.clone())
                            .or_insert_with(|| c.change.value.clone());
                    }
                    nodes[p.origin].st.not_committed(&p.captured);
                }
                5 => {
                    let k = rng.below(4) as u8;
                    let v = (rng.below(3) != 0).then(|| rng.below(200) as u8);
                    nodes[x].local(k, v);
                    unsent[x].insert(vec![k], v.map(|v| vec![v]));
                }
                _ => {}
            }
        };
        for _ in 0..300 {
            step(&mut nodes, &mut rng, false);
        }
        // No more local writes: everything in flight drains.
        for _ in 0..3000 {
            step(&mut nodes, &mut rng, true);
        }
        let mut committed: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for (_, changes) in &log {
            for c in changes {
                match &c.value {
                    Some(v) => committed.insert(c.key.clone(), v.clone()),
                    None => committed.remove(&c.key),
                };
            }
        }
        assert!(
            queued.is_empty() && answers.is_empty(),
            "seed {seed}: not drained"
        );
        for (i, n) in nodes.iter().enumerate() {
            assert_eq!(
                next[i],
                log.len(),
                "seed {seed}: node {i} did not apply all"
            );
            assert_eq!(n.kernel(), committed, "seed {seed}: node {i}");
        }
    }
}
