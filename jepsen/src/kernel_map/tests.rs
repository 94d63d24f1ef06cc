//! The kernel-map checker's tests: convergence, order and loss on hand-built evidence.

use super::check::subsequence;
use super::*;
use crate::nemesis::{Fault, FaultWindow};

#[test]
fn subsequence_finds_the_first_value_out_of_order() {
    let order = [None, Some(1), Some(2), None, Some(3)];
    assert_eq!(subsequence(&[None, Some(2), Some(3)], &order), Ok(()));
    assert_eq!(subsequence(&[None, None, Some(3)], &order), Ok(()));
    // Going back to 1 after 2 is not in the log's order.
    assert_eq!(subsequence(&[Some(2), Some(1)], &order), Err(Some(1)));
    assert_eq!(subsequence(&[Some(4)], &order), Err(Some(4)));
}

fn window(what: &str, start: u64) -> FaultWindow {
    FaultWindow {
        fault: Fault::Membership,
        what: what.into(),
        start,
        end: start + 1,
        error: None,
    }
}

fn ok(node: u64, key: u64, f: Func, time: u64) -> crate::history::Event {
    crate::history::Event {
        process: 0,
        kind: EventType::Ok,
        f,
        key,
        time,
        node: Some(node),
    }
}

#[test]
fn a_write_missing_from_the_log_is_lost_unless_replaced_superseded_or_its_node_removed() {
    let streams = [Stream {
        changes: vec![(5, 1, Some(10), 2), (6, 1, Some(12), 5)],
        ..Default::default()
    }];
    let mut history = vec![
        ok(1, 1, Func::Write(10), 1),
        ok(2, 1, Func::Write(11), 2),
        ok(1, 1, Func::Write(12), 3),
    ];
    // Node 2's 11 gives way to 10, committed before 11 was written, and never commits.
    let mut samples = Samples::new();
    samples.insert(
        (2, 1),
        vec![
            (0, 0, None),
            (2, 2, Some(11)),
            (4, 4, Some(10)),
            (9, 9, Some(12)),
        ],
    );
    samples.insert(
        (1, 1),
        vec![(0, 0, None), (1, 1, Some(10)), (3, 3, Some(12))],
    );
    let r = check(&history, &samples, &streams, &[], (vec![], 1));
    assert_eq!(r.lost, vec![(2, 1, 11)]);
    assert!(!r.valid());
    // Replaced by 12, committed after 11 was written: superseded, not lost.
    let mut later = samples.clone();
    later.insert(
        (2, 1),
        vec![(0, 0, None), (2, 2, Some(11)), (9, 9, Some(12))],
    );
    let r = check(&history, &later, &streams, &[], (vec![], 1));
    assert!(r.valid(), "{r:?}");
    assert_eq!(r.superseded, 1);
    // Deleted by a delete committed after it: superseded too.
    let deleted = [Stream {
        changes: vec![(5, 1, Some(10), 2), (6, 1, None, 5)],
        ..Default::default()
    }];
    later.insert((2, 1), vec![(0, 0, None), (2, 2, Some(11)), (9, 9, None)]);
    later.insert((1, 1), vec![(0, 0, None), (1, 1, Some(10)), (6, 6, None)]);
    let r = check(&history[..2], &later, &deleted, &[], (vec![], 1));
    assert!(r.valid(), "{r:?}");
    assert_eq!(r.superseded, 1);
    // Node 2 was removed after writing 11: its local state went with it.
    let r = check(
        &history,
        &samples,
        &streams,
        &[window("membership remove n2", 5)],
        (vec![], 1),
    );
    assert!(r.valid(), "{r:?}");
    assert_eq!(r.coalesced, 1);
    // The same when it was replaced by a new node.
    let r = check(
        &history,
        &samples,
        &streams,
        &[window("membership replace n2 with n5", 5)],
        (vec![], 1),
    );
    assert!(r.valid(), "{r:?}");
    // Or node 2 wrote again before capturing 11: coalesced, and 11 is a local state only.
    history.push(ok(2, 1, Func::Write(12), 4));
    let r = check(&history, &samples, &streams, &[], (vec![], 1));
    assert!(r.valid(), "{r:?}");
    // A node that shows the log's values backwards is caught.
    samples.insert(
        (3, 1),
        vec![(0, 0, None), (7, 7, Some(12)), (8, 8, Some(10))],
    );
    let r = check(&history, &samples, &streams, &[], (vec![], 1));
    assert_eq!(r.out_of_order.len(), 1);
    assert!(
        r.out_of_order[0].2.starts_with("10 after [absent, 12]"),
        "{r:?}"
    );
    // Absent, an own transient write, absent again: one absent state, not two.
    samples.remove(&(3, 1));
    samples.insert(
        (1, 1),
        vec![
            (0, 0, None),
            (1, 1, Some(10)),
            (2, 2, None),
            (3, 3, Some(12)),
        ],
    );
    let mut h2 = history.clone();
    h2.push(ok(1, 1, Func::Write(10), 1));
    let streams = [Stream {
        changes: vec![(5, 1, Some(10), 9), (6, 1, Some(12), 9)],
        ..Default::default()
    }];
    let r = check(&h2, &samples, &streams, &[], (vec![], 1));
    assert!(r.out_of_order.is_empty(), "{r:?}");
}

fn event(process: u64, kind: EventType, f: Func, time: u64) -> crate::history::Event {
    crate::history::Event {
        process,
        kind,
        f,
        key: 1,
        time,
        node: Some(1),
    }
}

#[test]
fn of_two_overlapping_writes_either_may_reach_the_map_last() {
    // Writers 1 and 2 write key 1 on node 1 at the same time; 2's call returns first, 1's a
    // little later, but 1's update reached the map first and 2's replaced it before capture:
    // only 21 is committed.
    let streams = [Stream {
        changes: vec![(5, 1, Some(21), 14)],
        ..Default::default()
    }];
    let mut samples = Samples::new();
    samples.insert((1, 1), vec![(0, 0, None), (13, 13, Some(21))]);
    let overlapping = vec![
        event(1, EventType::Invoke, Func::Write(20), 10),
        event(2, EventType::Invoke, Func::Write(21), 11),
        event(2, EventType::Ok, Func::Write(21), 12),
        event(1, EventType::Ok, Func::Write(20), 15),
    ];
    let r = check(&overlapping, &samples, &streams, &[], (vec![], 1));
    assert!(r.valid(), "{r:?}");
    assert_eq!(r.coalesced, 1);
    // Invoked after 21's call returned, 20 came after it: never committed, it is lost.
    let after = vec![
        event(2, EventType::Invoke, Func::Write(21), 11),
        event(2, EventType::Ok, Func::Write(21), 12),
        event(1, EventType::Invoke, Func::Write(20), 13),
        event(1, EventType::Ok, Func::Write(20), 15),
    ];
    let r = check(&after, &samples, &streams, &[], (vec![], 1));
    assert_eq!(r.lost, vec![(1, 1, 20)]);
    // Overlapping, and neither committed: they do not excuse each other; the one that returned
    // last is lost.
    let neither = [Stream::default()];
    let mut none_seen = Samples::new();
    none_seen.insert((1, 1), vec![(0, 0, None)]);
    let r = check(&overlapping, &none_seen, &neither, &[], (vec![], 1));
    assert_eq!(r.lost, vec![(1, 1, 20)], "{r:?}");
}

#[test]
fn streams_that_disagree_on_an_index_are_reported() {
    let a = Stream {
        changes: vec![(5, 1, Some(10), 0)],
        ..Default::default()
    };
    let b = Stream {
        changes: vec![(5, 1, Some(11), 0)],
        ..Default::default()
    };
    let r = check(&[], &Samples::new(), &[a, b], &[], (vec![], 0));
    assert_eq!(r.divergent_indexes, vec![5]);
}

#[test]
fn an_index_cut_short_by_a_broken_stream_still_counts_and_a_whole_copy_completes_it() {
    // Node A recorded index 5 whole; node B's stream broke after the first change of it.
    let whole = Stream {
        changes: vec![(5, 1, Some(10), 0), (5, 2, Some(20), 0)],
        ..Default::default()
    };
    let cut = Stream {
        changes: vec![(4, 1, Some(9), 0), (5, 1, Some(10), 0)],
        cut: BTreeSet::from([5]),
        ..Default::default()
    };
    for streams in [[whole.clone(), cut.clone()], [cut.clone(), whole.clone()]] {
        let r = check(&[], &Samples::new(), &streams, &[], (vec![], 0));
        assert!(r.divergent_indexes.is_empty(), "{r:?}");
        assert_eq!(r.committed_changes, 3, "{r:?}");
        assert_eq!(r.evidence.committed[&2], vec![None, Some(20)]);
    }
    // Only the cut copy: what arrived of the index is committed and counts.
    let r = check(&[], &Samples::new(), &[cut], &[], (vec![], 0));
    assert_eq!(r.evidence.committed[&1], vec![None, Some(9), Some(10)]);
    // A cut copy that is not a prefix of the whole one is a divergence.
    let other = Stream {
        changes: vec![(5, 1, Some(11), 0)],
        cut: BTreeSet::from([5]),
        ..Default::default()
    };
    let r = check(&[], &Samples::new(), &[whole, other], &[], (vec![], 0));
    assert_eq!(r.divergent_indexes, vec![5]);
}

#[test]
fn an_own_write_shown_before_the_node_applied_it_is_transient_even_if_committed_elsewhere() {
    // Key 1's log: 3 (index 4), then node 2's own 7 (index 5). Node 1 applied both by t=2;
    // node 2, lagging, wrote 7 at t=2, and applied index 4 at t=5 and index 5 at t=8.
    let streams = [
        Stream {
            node: 1,
            changes: vec![(4, 1, Some(3), 1), (5, 1, Some(7), 2)],
            ..Default::default()
        },
        Stream {
            node: 2,
            changes: vec![(4, 1, Some(3), 5), (5, 1, Some(7), 8)],
            ..Default::default()
        },
    ];
    let history = [ok(2, 1, Func::Write(7), 2)];
    let mut samples = Samples::new();
    samples.insert(
        (2, 1),
        vec![
            (0, 0, None),
            (3, 3, Some(7)),
            (5, 5, Some(3)),
            (8, 8, Some(7)),
        ],
    );
    let r = check(&history, &samples, &streams, &[], (vec![], 1));
    assert!(r.valid(), "{r:?}");
    // Once node 2 has applied 7, going back to 3 leaves the log's order.
    samples.insert(
        (2, 1),
        vec![(0, 0, None), (9, 9, Some(7)), (10, 10, Some(3))],
    );
    let r = check(&history, &samples, &streams, &[], (vec![], 1));
    assert_eq!(r.out_of_order.len(), 1, "{r:?}");
    assert!(r.out_of_order[0].2.starts_with("3 after ["), "{r:?}");
}
