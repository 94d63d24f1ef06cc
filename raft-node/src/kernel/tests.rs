//! The sync's rules as scenarios, without root: each node is a `MapState` over an in-memory
//! kernel map ([`FakeMap`]), driven through the same rules and the same writer the daemon uses.
//! One scenario per invariant of the design (one order, no echo, no regression on the origin
//! node, a refused change undone, a snapshot installed by diff, the restart merge).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use foldhash::HashMap;
use raftmap_ebpf_hooks::KernelChange;

use super::map_ops::{FakeMap, MapOps};
use super::state::{Captured, MapState, Sighting, Writes};
use super::writer::Writer;

fn kv(pairs: &[(u8, u8)]) -> HashMap<Vec<u8>, Vec<u8>> {
    pairs.iter().map(|&(k, v)| (vec![k], vec![v])).collect()
}

fn sorted(pairs: &[(u8, u8)]) -> BTreeMap<Vec<u8>, Vec<u8>> {
    pairs.iter().map(|&(k, v)| (vec![k], vec![v])).collect()
}

fn change(k: u8, v: Option<u8>) -> KernelChange {
    KernelChange {
        key: vec![k],
        value: v.map(|v| vec![v]),
    }
}

/// One node's view of one map.
pub(super) struct Node {
    pub st: MapState,
    pub map: Arc<FakeMap>,
    pub gens: AtomicU64,
}

impl Node {
    pub(super) fn new(contents: &[(u8, u8)]) -> Self {
        let map = Arc::new(FakeMap::new(1, 1, 1, 64));
        for &(k, v) in contents {
            map.local_write(&[k], Some(&[v]));
        }
        let mut st = MapState::default();
        st.reset(kv(contents));
        st.kmap = Some(map.clone());
        Node {
            st,
            map,
            gens: AtomicU64::new(0),
        }
    }

    pub(super) fn write(&mut self, changes: &[KernelChange]) {
        let writer = Writer {
            kmap: self.map.as_ref(),
            echoes: None,
            note: false,
        };
        writer.write(&mut self.st, &Writes::of(changes));
    }

    /// A program or a process on this node writes the kernel map.
    pub(super) fn local(&self, k: u8, v: Option<u8>) {
        self.map
            .local_write(&[k], v.map(|v| [v]).as_ref().map(|v| &v[..]));
    }

    /// A whole scan: walk minus shadow, captured.
    pub(super) fn scan(&mut self) -> Vec<Captured> {
        let mut retry = self.st.begin_scan();
        let walked = self.map.walk().unwrap();
        let mut differ = Vec::new();
        let found = self.st.compare(walked.iter(), &mut retry, &mut differ);
        let keys: foldhash::HashSet<&[u8]> = walked.iter().map(|(k, _)| k).collect();
        let look = self.st.must_look_for_deletes(found);
        let changes = self.st.end_scan(differ, look.then_some(&keys), retry);
        self.st.capture(changes, &self.gens)
    }

    /// Applies a committed entry.
    pub(super) fn apply(&mut self, captured_here: bool, changes: &[KernelChange]) -> u64 {
        let borrowed = changes
            .iter()
            .map(|c| (c.key.as_slice(), c.value.as_deref()))
            .collect();
        let (w, deferred) = self.st.apply_committed(captured_here, borrowed);
        let owned: Vec<KernelChange> = w
            .deletes
            .iter()
            .map(|k| KernelChange {
                key: k.to_vec(),
                value: None,
            })
            .chain(w.puts.iter().map(|(k, v)| KernelChange {
                key: k.to_vec(),
                value: Some(v.to_vec()),
            }))
            .collect();
        self.write(&owned);
        deferred
    }

    pub(super) fn settle(&mut self, index: u64) {
        let w = self.st.settle_committed(index);
        self.write(&w);
    }

    pub(super) fn kernel(&self) -> BTreeMap<Vec<u8>, Vec<u8>> {
        self.map.contents()
    }
}

pub(super) fn changes_of(c: &[Captured]) -> Vec<KernelChange> {
    c.iter().map(|c| c.change.clone()).collect()
}

#[test]
fn committed_changes_reach_the_kernel_in_log_order_the_last_one_winning() {
    let mut n = Node::new(&[(1, 1)]);
    n.apply(false, &[change(1, Some(2)), change(2, Some(2))]);
    n.apply(
        false,
        &[change(1, Some(3)), change(1, None), change(2, Some(4))],
    );
    assert_eq!(n.kernel(), sorted(&[(2, 4)]));
    // Collapsed: one write per key per entry, the delete of 1 and the last value of 2.
    let writes = n.map.take_writes();
    assert_eq!(writes.len(), 4, "{writes:?}");
    assert_eq!(writes[2..], [(vec![1], None), (vec![2], Some(vec![4]))]);
}

#[test]
fn the_appliers_writes_are_never_captured_back() {
    let mut n = Node::new(&[]);
    n.apply(false, &[change(1, Some(1)), change(2, Some(2))]);
    n.apply(false, &[change(1, None)]);
    assert!(
        n.scan().is_empty(),
        "an applied change was taken for a local one"
    );
    // A real local change is captured, and only it.
    n.local(3, Some(3));
    assert_eq!(changes_of(&n.scan()), vec![change(3, Some(3))]);
}

#[test]
fn a_local_change_is_never_overwritten_by_an_older_committed_value() {
    let mut n = Node::new(&[(1, 1)]);
    n.local(1, Some(5));
    let ours = n.scan();
    // Another node's write to the key, committed before ours, reaches this node meanwhile.
    assert_eq!(n.apply(false, &[change(1, Some(3))]), 1, "deferred");
    assert_eq!(n.kernel(), sorted(&[(1, 5)]));
    // Ours commits after it (index 11) and settles: the kernel keeps the local value.
    n.st.committed_at(&ours, 11);
    n.apply(true, &changes_of(&ours));
    n.settle(11);
    assert_eq!(n.kernel(), sorted(&[(1, 5)]));
    assert!(n.map.take_writes().is_empty(), "the kernel went back to 3");
    assert!(n.st.pending.is_empty());
}

#[test]
fn a_settled_key_takes_the_last_committed_value_when_the_log_ended_elsewhere() {
    let mut n = Node::new(&[]);
    n.local(1, Some(5));
    let ours = n.scan();
    // The applier reaches our entry (10) and a later one from another node (11) before our
    // proposal's answer arrives.
    n.apply(true, &changes_of(&ours));
    n.apply(false, &[change(1, Some(7))]);
    assert_eq!(n.kernel(), sorted(&[(1, 5)]), "written over a pending key");
    n.st.committed_at(&ours, 10);
    n.settle(10);
    assert_eq!(n.kernel(), sorted(&[(1, 7)]));
    assert!(n.scan().is_empty());
}

#[test]
fn a_change_the_cluster_refuses_is_undone_and_a_refused_batch_is_split() {
    let mut n = Node::new(&[(1, 1)]);
    n.local(1, Some(2));
    n.local(9, Some(9));
    let batch = n.scan();
    assert_eq!(batch.len(), 2);
    // Refused as a batch: proposed again, each alone.
    n.st.refused_in_batch(&batch);
    let again = n.scan();
    assert_eq!(changes_of(&again), changes_of(&batch));
    assert!(again.iter().all(|c| c.alone));
    // Key 9 is refused alone (a full map, say): undone to its committed value (absent); key 1
    // commits.
    let nine = again.iter().find(|c| c.change.key == [9]).unwrap();
    let undo = n.st.settle_refused(nine, None);
    n.write(&undo.into_iter().collect::<Vec<_>>());
    let one: Vec<Captured> = again.into_iter().filter(|c| c.change.key == [1]).collect();
    n.st.committed_at(&one, 4);
    n.apply(true, &changes_of(&one));
    n.settle(4);
    assert_eq!(n.kernel(), sorted(&[(1, 2)]));
    assert!(n.scan().is_empty());
}

#[test]
fn a_change_that_did_not_commit_is_proposed_again_with_the_kernels_value() {
    let mut n = Node::new(&[]);
    n.local(1, Some(1));
    let first = n.scan();
    n.st.not_committed(&first);
    // Changed again meanwhile: the retry proposes what the kernel holds now.
    n.local(1, Some(2));
    assert_eq!(changes_of(&n.scan()), vec![change(1, Some(2))]);
    // Deleted meanwhile: the retry is a delete.
    let mut m = Node::new(&[]);
    m.local(1, Some(1));
    let first = m.scan();
    m.st.not_committed(&first);
    m.local(1, None);
    assert_eq!(changes_of(&m.scan()), vec![change(1, None)]);
}

#[test]
fn a_scan_proposes_deletes_before_puts() {
    let mut n = Node::new(&[(1, 1), (2, 2)]);
    n.local(1, None);
    n.local(0, Some(9));
    let c = changes_of(&n.scan());
    assert_eq!(c, vec![change(1, None), change(0, Some(9))]);
}

#[test]
fn a_snapshot_is_installed_by_diff_and_no_entry_is_missing_in_between() {
    let mut n = Node::new(&[(1, 1), (2, 2), (3, 3), (5, 5)]);
    // Key 5 has a local change on its way: it keeps it.
    n.local(5, Some(6));
    let ours = n.scan();
    let kernel: HashMap<Vec<u8>, Vec<u8>> = n.map.walk().unwrap().into_map();
    let fixes = n.st.install(&kernel, kv(&[(1, 1), (2, 9), (4, 4), (5, 0)]));
    n.write(&fixes);
    assert_eq!(n.kernel(), sorted(&[(1, 1), (2, 9), (4, 4), (5, 6)]));
    let writes = n.map.take_writes();
    // Only what differs was written; no key both sides hold was ever deleted.
    assert_eq!(
        writes,
        vec![
            (vec![3], None),
            (vec![2], Some(vec![9])),
            (vec![4], Some(vec![4]))
        ]
    );
    // The local change commits after the snapshot: it stays.
    n.st.committed_at(&ours, 20);
    n.apply(true, &changes_of(&ours));
    n.settle(20);
    assert_eq!(n.kernel(), sorted(&[(1, 1), (2, 9), (4, 4), (5, 6)]));
    assert!(n.scan().is_empty());
}

#[test]
fn the_restart_merge_keeps_what_changed_while_down_and_takes_the_log_for_the_rest() {
    // Committed when the daemon stopped (the base), and the kernel map then.
    let base = kv(&[(1, 1), (2, 2), (3, 3), (6, 6)]);
    // While it was down: a program changed 1 and deleted 3; the log changed 2, added 4, and
    // set 6 to a value the kernel also happens to hold now (not a local change).
    let kernel = kv(&[(1, 5), (2, 2), (6, 8)]);
    let committed = kv(&[(1, 1), (2, 7), (3, 3), (4, 4), (6, 8)]);
    let logged: HashMap<Vec<u8>, Vec<Option<Vec<u8>>>> = [
        (vec![2], vec![Some(vec![7])]),
        (vec![4], vec![Some(vec![4])]),
        (vec![6], vec![Some(vec![8])]),
    ]
    .into_iter()
    .collect();
    let mut st = MapState::default();
    st.reset(committed);
    let m = st.merge(Sighting::Outlived, Some(&base), &kernel, &logged);
    assert_eq!(m.propose, vec![change(1, Some(5)), change(3, None)]);
    assert_eq!(m.write, vec![change(2, Some(7)), change(4, Some(4))]);
}

#[test]
fn a_new_map_is_adopted_and_a_recreated_one_refilled_nothing_deleted() {
    let kernel = kv(&[(1, 5), (9, 9)]);
    let mut st = MapState::default();
    st.reset(kv(&[(1, 1), (2, 2)]));
    let adopt = st.merge(Sighting::New, None, &kernel, &HashMap::default());
    assert_eq!(adopt.propose, vec![change(1, Some(5)), change(9, Some(9))]);
    assert_eq!(adopt.write, vec![change(2, Some(2))]);
    let refill = st.merge(Sighting::Recreated, None, &kernel, &HashMap::default());
    assert!(refill.propose.is_empty());
    assert_eq!(
        refill.write,
        vec![change(1, Some(1)), change(2, Some(2)), change(9, None)]
    );
}

#[test]
fn a_commit_the_kernel_refuses_leaves_the_shadow_as_the_kernel_is() {
    // A full map: the committed put of a new key fails; the shadow must not claim it, or the
    // scan would never see the difference (and with it take a delete to the cluster).
    let map = Arc::new(FakeMap::new(1, 1, 1, 1));
    map.local_write(&[1], Some(&[1]));
    let mut n = Node {
        st: MapState::default(),
        map,
        gens: AtomicU64::new(0),
    };
    n.st.reset(kv(&[(1, 1)]));
    n.st.kmap = Some(n.map.clone());
    n.apply(false, &[change(2, Some(2))]);
    assert_eq!(n.kernel(), sorted(&[(1, 1)]));
    assert!(n.st.shadow.get([2u8].as_slice()).is_none());
    // A delete and a put in one entry: the delete makes the room first.
    n.apply(false, &[change(3, Some(3)), change(1, None)]);
    assert_eq!(n.kernel(), sorted(&[(3, 3)]));
}
