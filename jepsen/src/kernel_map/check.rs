//! The kernel-map checks: convergence of every member's kernel map to the committed contents,
//! each node's order of values against the log's, and lost writes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{KernelMaps, NodeId, Samples, Stream, Value, KMAP};
use crate::cluster::LocalCluster;
use crate::history::{EventType, Func};
use crate::nemesis::{Fault, FaultWindow, Members};

/// What the kernel-map checks found.
#[derive(Debug, Default, Serialize)]
pub struct KernelMapResult {
    pub writes: usize,
    pub deletes: usize,
    /// Log entries with changes to the map, and the changes, as the streams recorded them.
    pub committed_entries: usize,
    pub committed_changes: usize,
    /// Stream restarts that skipped changes (the order below is then less complete).
    pub stream_gaps: usize,
    /// Two nodes delivered different changes at the same log index.
    pub divergent_indexes: Vec<u64>,
    /// For each of those: which nodes delivered what (`(key, value)` pairs, cut short or not).
    pub divergences: Vec<String>,
    /// Every member's kernel map equals the committed contents after healing.
    pub converged: bool,
    /// Members whose kernel map still differed from the committed contents at the end, and
    /// what each of them and the others said of themselves then (role, term, indexes,
    /// membership).
    pub unconverged: Vec<NodeId>,
    pub statuses: Vec<String>,
    pub final_entries: usize,
    /// Values written into a kernel map that never entered the log, without excuse.
    pub lost: Vec<(NodeId, u64, i64)>,
    /// Values replaced by a later write on their node before capture, or whose node was
    /// removed (allowed).
    pub coalesced: usize,
    /// Values never committed because a write to the same key committed after them replaced
    /// them on their node (allowed: last committed writer wins).
    pub superseded: usize,
    /// `(node, key, first value out of order)`: a node showed values in an order the log does
    /// not have.
    pub out_of_order: Vec<(NodeId, u64, String)>,
    /// Sampled changes checked against the committed order.
    pub observations: usize,
    /// What the checks looked at, for investigation: each node's sampled values per key
    /// (`"node/key"`: `[time ns, value]`), and the committed order per key.
    #[serde(skip)]
    pub evidence: Evidence,
}

/// The raw observations behind a kernel-map verdict.
#[derive(Default, Serialize)]
pub struct Evidence {
    pub samples: BTreeMap<String, Vec<(u64, u64, Value)>>,
    pub committed: BTreeMap<u64, Vec<Value>>,
}

/// A summary: the whole of it is in `kernel-evidence.json`, not in a failure message.
impl std::fmt::Debug for Evidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Evidence {{ {} sampled series, {} keys committed }}",
            self.samples.len(),
            self.committed.len()
        )
    }
}

impl KernelMapResult {
    pub fn valid(&self) -> bool {
        self.converged
            && self.lost.is_empty()
            && self.out_of_order.is_empty()
            && self.divergent_indexes.is_empty()
    }
}

/// Waits until every current member's kernel map equals the committed contents read through
/// one of them (linearizably). Returns the members whose map still differs (none: converged)
/// and the committed entries.
pub async fn converge(
    cluster: &LocalCluster,
    members: &Members,
    maps: &KernelMaps,
    within: Duration,
) -> (Vec<NodeId>, usize) {
    let deadline = Instant::now() + within;
    loop {
        let mut committed: Option<HashMap<Vec<u8>, Vec<u8>>> = None;
        for id in members.ids() {
            if let Ok(c) = cluster.client(id).await {
                if let Ok(Ok((_, _, e))) =
                    tokio::time::timeout(Duration::from_secs(2), c.dump(KMAP, true)).await
                {
                    committed = Some(e.into_iter().collect());
                    break;
                }
            }
        }
        let differ: Vec<NodeId> = maps
            .current()
            .iter()
            .filter(|(_, m)| {
                committed
                    .as_ref()
                    .is_none_or(|c| !m.entries().is_ok_and(|e| e == *c))
            })
            .map(|(id, _)| *id)
            .collect();
        let entries = committed.map_or(0, |c| c.len());
        if differ.is_empty() || Instant::now() > deadline {
            return (differ, entries);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What each of `ids` says of itself: role, term, indexes, membership, watched maps.
pub async fn statuses(cluster: &LocalCluster, ids: &[NodeId]) -> Vec<String> {
    let mut out = Vec::new();
    for &id in ids {
        let status = match cluster.client(id).await {
            Ok(c) => match tokio::time::timeout(Duration::from_secs(1), c.status()).await {
                Ok(Ok(s)) => format!(
                    "n{id}: {} of term {}, leader {}, log {} committed {} applied {}, members {:?}, watched {:?}",
                    s.role,
                    s.term,
                    s.leader_id,
                    s.last_log_index,
                    s.committed_index,
                    s.applied_index,
                    s.members.iter().map(|m| (m.node_id, m.voter)).collect::<Vec<_>>(),
                    s.watched.iter().map(|w| &w.state).collect::<Vec<_>>()
                ),
                other => format!("n{id}: no status ({other:?})"),
            },
            Err(e) => format!("n{id}: unreachable ({e})"),
        };
        out.push(status);
    }
    out
}

/// Is `seen` a subsequence of `order`? If not, the first element of `seen` that cannot be
/// matched.
pub(super) fn subsequence<T: PartialEq + Copy>(seen: &[T], order: &[T]) -> Result<(), T> {
    let mut it = order.iter();
    for s in seen {
        if !it.any(|o| o == s) {
            return Err(*s);
        }
    }
    Ok(())
}

/// A node's own write or delete: invoked, completed, what.
type LocalOp<'a> = (u64, u64, &'a Func);

/// Runs the order and lost-write checks over what the observers recorded.
pub fn check(
    history: &[crate::history::Event],
    samples: &Samples,
    streams: &[Stream],
    faults: &[FaultWindow],
    converged: (Vec<NodeId>, usize),
) -> KernelMapResult {
    let mut r = KernelMapResult {
        converged: converged.0.is_empty(),
        unconverged: converged.0,
        final_entries: converged.1,
        stream_gaps: streams.iter().map(|s| s.gaps).sum(),
        ..Default::default()
    };
    // The committed order: the union of the streams by index, which must agree; and when each
    // value was first seen committed.
    let mut committed_at: HashMap<i64, u64> = HashMap::new();
    // Committed deletes, `(key, index)` -> when first seen.
    let mut deleted_at: BTreeMap<(u64, u64), u64> = BTreeMap::new();
    // When each node applied each value (its own stream's record; streams report after the
    // node has written its kernel map).
    let mut applied_at: HashMap<(NodeId, i64), u64> = HashMap::new();
    // Per index: its changes, and whether the copy kept may have been cut short.
    let mut by_index: BTreeMap<u64, (Vec<(u64, Value)>, bool)> = BTreeMap::new();
    // Which node's stream the copy in `by_index` came from.
    let mut kept_from: BTreeMap<u64, NodeId> = BTreeMap::new();
    for s in streams {
        let mut mine: BTreeMap<u64, Vec<(u64, Value)>> = BTreeMap::new();
        for &(i, k, v, t) in &s.changes {
            mine.entry(i).or_default().push((k, v));
            if let Some(v) = v {
                applied_at.entry((s.node, v)).or_insert(t);
            }
            let at = match v {
                Some(v) => committed_at.entry(v).or_insert(t),
                None => deleted_at.entry((k, i)).or_insert(t),
            };
            *at = (*at).min(t);
        }
        for (i, ch) in mine {
            let cut = s.cut.contains(&i);
            match by_index.get_mut(&i) {
                // A copy cut short is a prefix of the whole one; anything else differs.
                Some((other, other_cut)) if *other_cut && ch.starts_with(other) => {
                    *other = ch;
                    *other_cut = cut;
                    kept_from.insert(i, s.node);
                }
                Some((other, other_cut)) if *other != ch && !(cut && other.starts_with(&ch)) => {
                    r.divergent_indexes.push(i);
                    r.divergences.push(format!(
                        "index {i}: node {} delivered {other:?}{}, node {} delivered {ch:?}{}",
                        kept_from.get(&i).copied().unwrap_or_default(),
                        if *other_cut { " (cut short)" } else { "" },
                        s.node,
                        if cut { " (cut short)" } else { "" },
                    ));
                }
                Some(_) => {}
                None => {
                    by_index.insert(i, (ch, cut));
                    kept_from.insert(i, s.node);
                }
            }
        }
    }
    r.committed_entries = by_index.len();
    let mut order: BTreeMap<u64, Vec<Value>> = BTreeMap::new();
    for (ch, _) in by_index.values() {
        for &(k, v) in ch {
            let seq = order.entry(k).or_insert_with(|| vec![None]);
            r.committed_changes += 1;
            if seq.last() != Some(&v) {
                seq.push(v);
            }
        }
    }
    let committed_values: BTreeSet<i64> = order.values().flatten().flatten().copied().collect();
    // Nodes removed from the cluster, and when: their uncommitted local writes go with them.
    let removals: Vec<(NodeId, u64)> = faults
        .iter()
        .filter(|f| f.fault == Fault::Membership && f.error.is_none())
        .filter_map(|f| {
            let n = f
                .what
                .strip_prefix("membership remove n")
                .or_else(|| f.what.strip_prefix("membership replace n"))?;
            let n = n
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()?;
            // Writes up to the end of the removal: the writers pick nodes until it is done.
            Some((n, f.end))
        })
        .collect();
    // Each node's own writes, per key, in time order: `(invoked, completed, function)`.
    let mut local: BTreeMap<(NodeId, u64), Vec<LocalOp>> = BTreeMap::new();
    let mut invoked: HashMap<u64, u64> = HashMap::new();
    for e in history {
        match (e.kind, e.node) {
            (EventType::Invoke, Some(_)) => {
                invoked.insert(e.process, e.time);
            }
            (EventType::Ok, Some(node)) => {
                let start = invoked.remove(&e.process).unwrap_or(e.time);
                local
                    .entry((node, e.key))
                    .or_default()
                    .push((start, e.time, &e.f));
            }
            _ => {}
        }
    }
    // Whether a write of `v` to `key` on `node`, done at `t`, was superseded by a write to the
    // key committed after it (DESIGN invariant 3 allows that: the write may then never enter
    // the log). The first other value the node's map showed for the key after the write
    // decides: a value first seen committed after `t`, or absent with a delete of the key
    // first seen committed after `t`. (First seen: an observer may learn of a commit a little
    // late, never early.)
    let superseded = |node: NodeId, key: u64, v: i64, t: u64| -> bool {
        let next = samples
            .get(&(node, key))
            .and_then(|seen| seen.iter().find(|&&(t0, _, val)| t0 >= t && val != Some(v)));
        match next {
            Some(&(_, _, Some(r))) => committed_at.get(&r).is_some_and(|&c| c > t),
            Some(&(_, _, None)) => deleted_at
                .range((key, 0)..=(key, u64::MAX))
                .any(|(_, &c)| c > t),
            None => false,
        }
    };
    // A node's own write that never entered the log is fine when a later (or concurrent)
    // write on the same node replaced it before it was captured (raftmap replicates states: changes to one key
    // between two reads of the ring buffer coalesce), when the node was removed, or when a
    // later committed write superseded it; otherwise it is lost.
    for (&(node, key), ops) in &local {
        for (i, &(start, t, f)) in ops.iter().enumerate() {
            match f {
                Func::Write(v) => {
                    r.writes += 1;
                    if committed_values.contains(v) {
                        continue;
                    }
                    // Replaced: another write or delete of the key on the node completed after
                    // this one, or overlapped it and took effect (its value, or a delete of the
                    // key, committed after this write began): two calls that overlap reach the
                    // kernel in either order, whichever returns first.
                    let took_effect = |g: &Func| match g {
                        Func::Write(w) => committed_values.contains(w),
                        Func::Delete => deleted_at
                            .range((key, 0)..=(key, u64::MAX))
                            .any(|(_, &c)| c > start),
                        _ => false,
                    };
                    let replaced = ops.iter().enumerate().any(|(j, &(_, end, g))| {
                        j != i && (end > t || (end > start && took_effect(g)))
                    });
                    let removed = removals.iter().any(|&(n, at)| n == node && at >= t);
                    if replaced || removed {
                        r.coalesced += 1;
                    } else if superseded(node, key, *v, t) {
                        r.superseded += 1;
                    } else {
                        r.lost.push((node, key, *v));
                    }
                }
                Func::Delete => r.deletes += 1,
                _ => {}
            }
        }
    }
    for (&(node, key), seen) in samples {
        let empty = vec![None];
        let committed = order.get(&key).unwrap_or(&empty);
        let ops: &[LocalOp] = local.get(&(node, key)).map_or(&[], Vec::as_slice);
        let own = |v: i64| ops.iter().any(|(_, _, f)| **f == Func::Write(v));
        // Could the node's own delete explain an absent key read in [t0, t1]: one that started
        // before the read ended, with no own write certainly between it and the read (started
        // after the delete completed, completed before the read began).
        // Per own delete: its start, and the earliest completion of an own write begun after it.
        let deletes: Vec<(u64, u64)> = ops
            .iter()
            .filter(|(_, _, f)| **f == Func::Delete)
            .map(|&(ds, de, _)| {
                let overwritten = ops
                    .iter()
                    .filter(|(ws, _, g)| matches!(g, Func::Write(_)) && *ws > de)
                    .map(|(_, we, _)| *we)
                    .min()
                    .unwrap_or(u64::MAX);
                (ds, overwritten)
            })
            .collect();
        let own_delete =
            |t0: u64, t1: u64| deletes.iter().any(|&(ds, over)| ds <= t1 && over >= t0);
        let mut kept: Vec<Value> = seen
            .iter()
            .filter(|(t0, t1, v)| match v {
                // The node's own write, seen before the node applied it from the log: a
                // transient local state, which the order does not cover (older committed
                // values the node had yet to apply may go over it; it comes back when the node
                // applies it). Committed elsewhere is not enough: a lagging node may hold it
                // before its backlog. An entry the node's stream missed (it restarted from
                // the node's contents) leaves the value out.
                Some(v) if own(*v) => applied_at.get(&(node, *v)).is_some_and(|c| c <= t0),
                Some(_) => true,
                None => !own_delete(*t0, *t1),
            })
            .map(|s| s.2)
            .collect();
        // What was left out may have separated two equal values: one state, not two.
        kept.dedup();
        r.observations += kept.len();
        if let Err(v) = subsequence(&kept, committed) {
            let show = |v: &Value| v.map_or("absent".into(), |v| v.to_string());
            let at = kept.iter().position(|k| *k == v).unwrap_or(0);
            let before: Vec<String> = kept[at.saturating_sub(3)..at].iter().map(show).collect();
            let in_log = committed.iter().position(|c| *c == v);
            r.out_of_order.push((
                node,
                key,
                format!(
                    "{} after [{}]; {}",
                    show(&v),
                    before.join(", "),
                    match in_log {
                        Some(p) => format!("log position {p} of {}", committed.len()),
                        None => "not in the log".into(),
                    }
                ),
            ));
        }
    }
    r.evidence = Evidence {
        samples: samples
            .iter()
            .map(|((n, k), v)| (format!("{n}/{k}"), v.clone()))
            .collect(),
        committed: order,
    };
    r
}
