//! The linearizability checker's tests: hand-built histories, known anomalies, the budget.

use super::*;
use crate::history::{operations, Event, EventType};

/// Builds a history from `(process, type, f, time)`.
fn h(events: &[(u64, EventType, Func, u64)]) -> Vec<Operation> {
    let evs: Vec<Event> = events
        .iter()
        .map(|(p, k, f, t)| Event {
            process: *p,
            kind: *k,
            f: f.clone(),
            key: 1,
            time: *t,
            node: None,
        })
        .collect();
    operations(&evs).unwrap()
}
use EventType::*;
use Func::*;

#[test]
fn sequential_history_is_linearizable() {
    let ops = h(&[
        (0, Invoke, Write(1), 0),
        (0, Ok, Write(1), 1),
        (0, Invoke, Read(None), 2),
        (0, Ok, Read(Some(1)), 3),
        (0, Invoke, Cas([1, 2]), 4),
        (0, Ok, Cas([1, 2]), 5),
        (0, Invoke, Read(None), 6),
        (0, Ok, Read(Some(2)), 7),
    ]);
    assert_eq!(check(&ops), vec![]);
}

#[test]
fn a_stale_read_after_a_completed_write_is_caught() {
    let ops = h(&[
        (0, Invoke, Write(1), 0),
        (0, Ok, Write(1), 1),
        (1, Invoke, Write(2), 2),
        (1, Ok, Write(2), 3),
        (2, Invoke, Read(None), 4),
        (2, Ok, Read(Some(1)), 5),
    ]);
    let v = check(&ops);
    assert_eq!(v.len(), 1);
    match &v[0] {
        Verdict::NotLinearizable { op, placed, .. } => {
            assert_eq!(op.f, Read(Some(1)));
            assert_eq!(placed.len(), 2, "both writes could be placed: {placed:?}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn concurrent_operations_may_take_effect_in_either_order() {
    // The read overlaps the write: it may see the old or the new value.
    for seen in [None, Some(1)] {
        let ops = h(&[
            (0, Invoke, Write(1), 0),
            (1, Invoke, Read(None), 1),
            (1, Ok, Read(seen), 2),
            (0, Ok, Write(1), 3),
        ]);
        assert_eq!(check(&ops), vec![], "read {seen:?}");
    }
}

#[test]
fn unknown_outcomes_may_or_may_not_have_happened_but_not_both() {
    let base = [(0, Invoke, Write(1), 0), (0, Info, Write(1), 1)];
    let read =
        |p: u64, v: Option<i64>, t: u64| [(p, Invoke, Read(None), t), (p, Ok, Read(v), t + 1)];
    // Never happened, or happened: both fine on their own.
    for v in [None, Some(1)] {
        let mut evs = base.to_vec();
        evs.extend(read(1, v, 5));
        assert_eq!(check(&h(&evs)), vec![], "{v:?}");
    }
    // Seen, then unseen: impossible.
    let mut evs = base.to_vec();
    evs.extend(read(1, Some(1), 5));
    evs.extend(read(2, None, 10));
    assert_eq!(check(&h(&evs)).len(), 1);
}

#[test]
fn failed_operations_did_not_happen() {
    let ops = h(&[
        (0, Invoke, Cas([5, 6]), 0),
        (0, Fail, Cas([5, 6]), 1),
        (1, Invoke, Read(None), 2),
        (1, Ok, Read(None), 3),
    ]);
    assert_eq!(check(&ops), vec![]);
}

/// A simulated atomic register under concurrent clients: every history it produces is
/// linearizable, however long and concurrent.
#[test]
fn long_valid_concurrent_histories_are_linearizable() {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut reg: Option<i64> = None;
    let mut events = Vec::new();
    let mut open: Vec<Option<(Func, u64)>> = vec![None; 5];
    for t in 1..=4000u64 {
        let p = rnd(5) as usize;
        match open[p].take() {
            None => {
                let f = match rnd(3) {
                    0 => Read(None),
                    1 => Write(rnd(4) as i64),
                    _ => Cas([rnd(4) as i64, rnd(4) as i64]),
                };
                events.push(Event {
                    process: p as u64,
                    kind: Invoke,
                    f: f.clone(),
                    key: 1,
                    time: t,
                    node: None,
                });
                // Takes effect atomically now; completes later.
                let (kind, done) = match f {
                    Read(_) => (Ok, Read(reg)),
                    Write(v) => {
                        reg = Some(v);
                        (Ok, Write(v))
                    }
                    Cas([a, b]) if reg == Some(a) => {
                        reg = Some(b);
                        (Ok, Cas([a, b]))
                    }
                    Cas(c) => (Fail, Cas(c)),
                    Delete => {
                        reg = None;
                        (Ok, Delete)
                    }
                };
                open[p] = Some((done.clone(), if kind == Ok { 0 } else { 1 }));
            }
            Some((done, failed)) => {
                let kind = if failed == 1 { Fail } else { Ok };
                events.push(Event {
                    process: p as u64,
                    kind,
                    f: done,
                    key: 1,
                    time: t,
                    node: None,
                });
            }
        }
    }
    let ops = operations(&events).unwrap();
    assert!(ops.len() > 1000);
    assert_eq!(check(&ops), vec![]);
    // The same history with one read made stale is not.
    let mut bad = ops.clone();
    let i = bad
        .iter()
        .rposition(|o| matches!(o.f, Read(Some(_))) && o.ret.is_some())
        .unwrap();
    if let Read(Some(v)) = bad[i].f {
        bad[i].f = Read(Some(v + 100));
    }
    assert_eq!(check(&bad).len(), 1);
}

#[test]
fn a_search_past_its_budget_is_undecided_not_valid() {
    // Many concurrent writes of unknown outcome and reads: a large search space.
    let mut ev = Vec::new();
    for p in 0..40u64 {
        ev.push((p, Invoke, Write(p as i64), p));
        ev.push((p, Info, Write(p as i64), 1000 + p));
    }
    for p in 40..80u64 {
        ev.push((p, Invoke, Read(None), 2000 + p));
        ev.push((p, Ok, Read(Some((p % 40) as i64)), 3000 + p));
    }
    let ops = h(&ev);
    let tight = Budget {
        max_configs: 10_000,
        max_time: std::time::Duration::from_secs(5),
    };
    match check_key_within(1, &ops, tight) {
        Verdict::Unknown { reason, .. } => {
            assert!(reason.contains("configurations"), "{reason}")
        }
        other => panic!("expected an undecided verdict, got {other:?}"),
    }
}

#[test]
fn shrinking_keeps_only_the_operations_that_explain_the_anomaly() {
    // A stale read buried in a long sequential history: write 1, read 1, ..., write 2,
    // then a read of 1 after write 2 completed.
    let mut ev = Vec::new();
    let mut t = 0;
    for i in 0..30 {
        ev.push((0, Invoke, Write(i), t));
        ev.push((0, Ok, Write(i), t + 1));
        ev.push((1, Invoke, Read(None), t + 2));
        ev.push((1, Ok, Read(Some(i)), t + 3));
        t += 4;
    }
    ev.push((1, Invoke, Read(None), t));
    ev.push((1, Ok, Read(Some(5)), t + 1));
    let ops = h(&ev);
    assert_eq!(check(&ops).len(), 1);
    let small = shrink(1, &ops, std::time::Duration::from_secs(10));
    // Write 5, a later write, and the stale read: nothing less fails.
    assert_eq!(small.len(), 3, "{small:?}");
    assert!(small.iter().any(|o| o.f == Write(5)));
    assert_ne!(check_key(1, &small), Verdict::Linearizable);
    assert!(small.iter().any(|o| o.f == Read(Some(5))));
}
