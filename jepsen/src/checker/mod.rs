//! Linearizability of register histories: the Wing–Gong search with Lowe's memoisation (the
//! algorithm of Knossos and Porcupine), run separately for each key.
//!
//! The search walks the operations in time order, trying to place each one at a point between
//! its invocation and its completion so that the register's sequential behaviour explains every
//! result. Configurations already explored — the set of operations placed so far and the
//! register's value — are remembered, which keeps the search polynomial on real histories.
//! Operations whose outcome is unknown may be placed anywhere after their invocation, or not at
//! all.
//!
//! Many operations of unknown outcome on one key can still make the search explode, so it runs
//! within a [`Budget`] (configurations remembered, and time): past it the verdict is
//! [`Verdict::Unknown`], which fails a run as loudly as an anomaly. The harness keeps keys
//! small (it moves clients to fresh keys after a bounded number of operations), so real runs
//! stay far inside it.

use std::collections::{BTreeMap, HashSet};

use crate::history::{Func, Operation};

/// The register's value (`None`: absent).
type State = Option<i64>;

/// How much the search of one key may take.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Configurations remembered (each is the set of operations placed and a value: about
    /// `ops / 8 + 48` bytes).
    pub max_configs: usize,
    pub max_time: std::time::Duration,
}

impl Default for Budget {
    /// About 1 GiB of memory at a thousand operations on a key, and 20 seconds.
    fn default() -> Self {
        Self {
            max_configs: 4_000_000,
            max_time: std::time::Duration::from_secs(20),
        }
    }
}

/// The checker's verdict on one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// The search ran out of its budget before it could decide: the history is neither shown
    /// linearizable nor shown not to be.
    Unknown {
        key: u64,
        ops: usize,
        reason: String,
    },
    /// No order explains the results. `op` is the operation that could not be placed before it
    /// completed, `placed` the longest sequence of operations placed before the search gave up
    /// (a witness of how far an explanation gets), `concurrent` the operations overlapping `op`.
    NotLinearizable {
        key: u64,
        op: Operation,
        placed: Vec<Operation>,
        concurrent: Vec<Operation>,
    },
}

/// Applies `f` to `state`: whether its result is possible, and the state after it.
fn step(state: State, f: &Func) -> Option<State> {
    match f {
        Func::Read(v) => (*v == state).then_some(state),
        Func::Write(v) => Some(Some(*v)),
        Func::Cas([from, to]) => (state == Some(*from)).then_some(Some(*to)),
        Func::Delete => Some(None),
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    op: usize,
    call: bool,
    prev: usize,
    next: usize,
}

/// A bitset over the operations of one key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Self {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
}

/// Checks one key's operations within the default budget.
pub fn check_key(key: u64, ops: &[Operation]) -> Verdict {
    check_key_within(key, ops, Budget::default())
}

/// Checks one key's operations within `budget`.
pub fn check_key_within(key: u64, ops: &[Operation], budget: Budget) -> Verdict {
    let started = std::time::Instant::now();
    let n = ops.len();
    if n == 0 {
        return Verdict::Linearizable;
    }
    // Entries: a call and a return per operation, in time order (calls first on ties, so that
    // operations touching at an instant count as concurrent). Unknown outcomes return at the end.
    let mut order: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, o) in ops.iter().enumerate() {
        order.push((o.call, true, i));
        order.push((o.ret.unwrap_or(u64::MAX), false, i));
    }
    order.sort_by_key(|&(t, call, i)| (t, !call, i));
    // A doubly linked list over `entries`, with a sentinel head at index 0.
    let mut entries = vec![Entry {
        op: usize::MAX,
        call: false,
        prev: 0,
        next: 1,
    }];
    let mut ret_of = vec![0; n];
    for (k, &(_, call, i)) in order.iter().enumerate() {
        let idx = k + 1;
        entries.push(Entry {
            op: i,
            call,
            prev: idx - 1,
            next: idx + 1,
        });
        if !call {
            ret_of[i] = idx;
        }
    }
    let end = entries.len();
    let known = |i: usize| ops[i].ret.is_some();

    let lift = |e: &mut Vec<Entry>, idx: usize| {
        let (p, nx) = (e[idx].prev, e[idx].next);
        e[p].next = nx;
        if nx < end {
            e[nx].prev = p;
        }
    };
    let unlift = |e: &mut Vec<Entry>, idx: usize| {
        let (p, nx) = (e[idx].prev, e[idx].next);
        e[p].next = idx;
        if nx < end {
            e[nx].prev = idx;
        }
    };

    let mut state: State = None;
    let mut placed = Bits::new(n);
    let mut cache: HashSet<(Bits, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut best: Vec<usize> = Vec::new();
    let mut cur = entries[0].next;
    let mut steps = 0u64;
    while cur < end {
        steps += 1;
        if steps % 4096 == 0 {
            let over = if cache.len() > budget.max_configs {
                Some(format!(
                    "more than {} configurations to remember",
                    budget.max_configs
                ))
            } else if started.elapsed() > budget.max_time {
                Some(format!("more than {:?} of search", budget.max_time))
            } else {
                None
            };
            if let Some(reason) = over {
                return Verdict::Unknown {
                    key,
                    ops: n,
                    reason,
                };
            }
        }
        let e = entries[cur];
        // Two unplaced operations of unknown outcome with the same function are
        // interchangeable (neither must return, and the earlier one may go wherever the later
        // one can): only the earlier of them is tried.
        let twin = e.call && !known(e.op) && {
            let mut c = entries[0].next;
            let mut found = false;
            while c != cur {
                let x = entries[c];
                if x.call && !known(x.op) && ops[x.op].f == ops[e.op].f {
                    found = true;
                    break;
                }
                c = x.next;
            }
            found
        };
        if e.call && !twin {
            if let Some(next_state) = step(state, &ops[e.op].f) {
                let mut with = placed.clone();
                with.set(e.op);
                if cache.insert((with.clone(), next_state)) {
                    stack.push((cur, state));
                    state = next_state;
                    placed = with;
                    lift(&mut entries, cur);
                    lift(&mut entries, ret_of[e.op]);
                    if stack.len() > best.len() {
                        best = stack.iter().map(|&(c, _)| entries[c].op).collect();
                    }
                    cur = entries[0].next;
                    continue;
                }
            }
            cur = e.next;
        } else if e.call {
            cur = e.next;
        } else if !known(e.op) {
            // Only operations of unknown outcome are left unplaced: they need not have happened.
            return Verdict::Linearizable;
        } else {
            // An operation completed before it could be placed: undo the last placement.
            let Some((c, prev_state)) = stack.pop() else {
                return not_linearizable(key, ops, &best);
            };
            let op = entries[c].op;
            state = prev_state;
            placed.clear(op);
            unlift(&mut entries, ret_of[op]);
            unlift(&mut entries, c);
            cur = entries[c].next;
        }
    }
    Verdict::Linearizable
}

/// Reports a failure: the furthest the search got, and the first operation to complete that it
/// could not place after it.
fn not_linearizable(key: u64, ops: &[Operation], best: &[usize]) -> Verdict {
    let in_best: HashSet<usize> = best.iter().copied().collect();
    let op = (0..ops.len())
        .filter(|i| !in_best.contains(i) && ops[*i].ret.is_some())
        .min_by_key(|&i| ops[i].ret)
        .map_or_else(|| ops[0].clone(), |i| ops[i].clone());
    let ret = op.ret.unwrap_or(u64::MAX);
    let concurrent = ops
        .iter()
        .filter(|o| o.id != op.id && o.call <= ret && o.ret.unwrap_or(u64::MAX) >= op.call)
        .cloned()
        .collect();
    Verdict::NotLinearizable {
        key,
        op,
        placed: best.iter().map(|&i| ops[i].clone()).collect(),
        concurrent,
    }
}

/// Checks every key of a history; returns the verdict for each key that is not shown
/// linearizable (not linearizable, or undecided within the budget).
pub fn check(ops: &[Operation]) -> Vec<Verdict> {
    let mut by_key: BTreeMap<u64, Vec<Operation>> = BTreeMap::new();
    for o in ops {
        by_key.entry(o.key).or_default().push(o.clone());
    }
    by_key
        .into_iter()
        .map(|(k, ops)| check_key(k, &ops))
        .filter(|v| *v != Verdict::Linearizable)
        .collect()
}

/// The smallest sub-history of one key's operations found within `budget` that is still not
/// linearizable (the input itself if it is linearizable or nothing smaller fails).
///
/// First everything invoked after the failing operation completed is dropped (it cannot be
/// needed to show that operation impossible), then chunks and single operations are removed
/// while the rest still fails: delta debugging, ending 1-minimal when the budget allows (no
/// single operation can be removed). A sub-history keeps the write of every value its reads
/// and compare-and-swaps saw: dropping it would "explain" the failure by a value from nowhere.
pub fn shrink(key: u64, ops: &[Operation], budget: std::time::Duration) -> Vec<Operation> {
    let deadline = std::time::Instant::now() + budget;
    let closed = |o: &[Operation]| {
        let written: HashSet<i64> = o
            .iter()
            .filter_map(|x| match x.f {
                Func::Write(v) | Func::Cas([_, v]) => Some(v),
                _ => None,
            })
            .collect();
        o.iter().all(|x| match x.f {
            Func::Read(Some(v)) | Func::Cas([v, _]) => written.contains(&v),
            _ => true,
        })
    };
    let fails =
        |o: &[Operation]| closed(o) && matches!(check_key(key, o), Verdict::NotLinearizable { .. });
    let mut cur: Vec<Operation> = ops.to_vec();
    if let Verdict::NotLinearizable { op, .. } = check_key(key, &cur) {
        if let Some(ret) = op.ret {
            let cut: Vec<Operation> = cur.iter().filter(|o| o.call <= ret).cloned().collect();
            if fails(&cut) {
                cur = cut;
            }
        }
    } else {
        return cur;
    }
    let mut chunk = cur.len().div_ceil(2).max(1);
    loop {
        let mut removed_any = false;
        let mut i = 0;
        while i < cur.len() {
            if std::time::Instant::now() > deadline {
                return cur;
            }
            let end = (i + chunk).min(cur.len());
            let trial: Vec<Operation> = cur[..i].iter().chain(&cur[end..]).cloned().collect();
            if !trial.is_empty() && fails(&trial) {
                cur = trial;
                removed_any = true;
            } else {
                i += chunk;
            }
        }
        if chunk == 1 && !removed_any {
            return cur;
        }
        if !removed_any {
            chunk = chunk.div_ceil(2);
        }
    }
}

#[cfg(test)]
mod tests;
