//! The kernel-map workload: writers update and delete entries directly in the BPF maps of
//! random nodes (as a BPF program or `bpftool` would, through bpf(2)), while the faults run.
//!
//! Three observers record what happened: a sampler reads every node's kernel map every few
//! milliseconds (each node's sequence of values per key), and one watch stream per node records
//! the committed changes in log order (streams resume after a kill; they must agree index by
//! index). The checks:
//! - convergence: after healing, every member's kernel map equals the committed contents;
//! - order: each node's sequence of values per key, leaving out its own writes until the node
//!   applies them from the log (its watch stream shows them), is a subsequence of the committed
//!   order (a node never shows a state the log does not pass through, nor goes back);
//! - lost writes: every value written into a kernel map is in the committed order, unless a
//!   later write on the same node replaced it before it was captured (raftmap replicates a
//!   map's states: changes to one key between two reads of the ring buffer, or made while the
//!   daemon is down, coalesce into the last), or the node was removed from the cluster.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cluster::LocalCluster;
use raftmap_ebpf_hooks::{KernelMap, MapKind, UpdateFlags};
use raftmap_node::proto as pb;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::error::RunError;
use crate::history::Recorder;
use crate::history::{EventType, Func};
use crate::nemesis::{Fault, FaultWindow, Members, NodeSetup};

type NodeId = u64;

/// The replicated map the kernel-map workload syncs.
pub const KMAP: &str = "jepsen_kmap";

/// A key's value as a node or the log has it (`None`: absent).
type Value = Option<i64>;

/// One kernel map per node, created by the harness and found by the nodes by name (a name
/// works inside network namespaces, where bpffs is not mounted).
#[derive(Debug)]
pub struct KernelMaps {
    tag: String,
    maps: Mutex<BTreeMap<NodeId, Arc<KernelMap>>>,
    /// Every map ever created (the sampler reads removed nodes' maps too); `maps` holds the
    /// members' only.
    all: Mutex<BTreeMap<NodeId, Arc<KernelMap>>>,
    /// Once set, every node that joins gets a watch stream of its own.
    joiners: Mutex<Option<Joiners>>,
}

/// The watch streams of the nodes that joined during the run.
#[derive(Debug)]
struct Joiners {
    stop: Arc<AtomicBool>,
    rec: Arc<Recorder>,
    streams: Vec<tokio::task::JoinHandle<Stream>>,
}

impl KernelMaps {
    pub fn new() -> Self {
        use std::sync::atomic::AtomicU32;
        static RUN: AtomicU32 = AtomicU32::new(0);
        let run = RUN.fetch_add(1, Ordering::SeqCst);
        Self {
            // Kernel object names hold 15 bytes: "rj" + 5 + 1 + "n" + id.
            tag: format!("rj{:05}{}", std::process::id() % 100_000, run % 10),
            maps: Mutex::new(BTreeMap::new()),
            all: Mutex::new(BTreeMap::new()),
            joiners: Mutex::new(None),
        }
    }

    fn lock(
        m: &Mutex<BTreeMap<NodeId, Arc<KernelMap>>>,
    ) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, Arc<KernelMap>>> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The maps of the current members.
    fn current(&self) -> Vec<(NodeId, Arc<KernelMap>)> {
        Self::lock(&self.maps)
            .iter()
            .map(|(i, m)| (*i, m.clone()))
            .collect()
    }

    /// From now on, a node that joins gets a watch stream (until `stop`).
    pub fn follow_joiners(&self, stop: Arc<AtomicBool>, rec: Arc<Recorder>) {
        *self.joiners.lock().unwrap_or_else(|p| p.into_inner()) = Some(Joiners {
            stop,
            rec,
            streams: Vec::new(),
        });
    }

    /// The watch streams of the nodes that joined, to await once `stop` is set.
    pub fn joiners(&self) -> Vec<tokio::task::JoinHandle<Stream>> {
        self.joiners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
            .map(|j| std::mem::take(&mut j.streams))
            .unwrap_or_default()
    }

    fn every(&self) -> Vec<(NodeId, Arc<KernelMap>)> {
        Self::lock(&self.all)
            .iter()
            .map(|(i, m)| (*i, m.clone()))
            .collect()
    }
}

impl Default for KernelMaps {
    fn default() -> Self {
        Self::new()
    }
}

impl NodeSetup for KernelMaps {
    fn prepare(&self, id: NodeId) -> Result<Vec<String>, RunError> {
        let name = format!("{}n{id}", self.tag);
        let map = Arc::new(KernelMap::create(MapKind::Hash, 8, 8, 1024, &name)?);
        Self::lock(&self.all).insert(id, map);
        Ok(vec![
            "--watch".into(),
            format!("{KMAP}={name}"),
            "--scan-interval-ms".into(),
            "20".into(),
        ])
    }

    /// From now on the writers write into the node's map too, and its committed changes are
    /// recorded.
    fn joined(&self, id: NodeId, api: &str) {
        if let Some(m) = Self::lock(&self.all).get(&id).cloned() {
            Self::lock(&self.maps).insert(id, m);
        }
        if let Some(j) = self
            .joiners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            let (ready, _) = tokio::sync::oneshot::channel();
            j.streams.push(tokio::spawn(observer(
                id,
                api.to_string(),
                true,
                j.stop.clone(),
                ready,
                j.rec.clone(),
            )));
        }
    }

    fn removed(&self, id: NodeId) {
        Self::lock(&self.maps).remove(&id);
    }
}

fn decode(v: &[u8]) -> Value {
    v.try_into().ok().map(i64::from_be_bytes)
}

/// One writer: updates (unique values) and deletes in the maps of random current members.
pub async fn writer(
    process: u64,
    maps: Arc<KernelMaps>,
    keys: u64,
    seed: u64,
    deadline: Instant,
    rec: Arc<Recorder>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seq: i64 = 0;
    while Instant::now() < deadline {
        let current = maps.current();
        if current.is_empty() {
            return;
        }
        let (node, map) = &current[rng.gen_range(0..current.len())];
        let key = rng.gen_range(0..keys);
        let kb = key.to_be_bytes();
        if rng.gen_bool(0.15) {
            rec.record_at(process, EventType::Invoke, key, Func::Delete, Some(*node));
            let kind = match map.delete(&kb) {
                Ok(_) => EventType::Ok,
                Err(_) => EventType::Fail,
            };
            rec.record_at(process, kind, key, Func::Delete, Some(*node));
        } else {
            seq += 1;
            // Unique across the run: the writer in the high bits.
            let v = ((process as i64 + 1) << 40) | seq;
            rec.record_at(process, EventType::Invoke, key, Func::Write(v), Some(*node));
            let kind = match map.update(&kb, &v.to_be_bytes(), UpdateFlags::Any) {
                Ok(()) => EventType::Ok,
                Err(_) => EventType::Fail,
            };
            rec.record_at(process, kind, key, Func::Write(v), Some(*node));
        }
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
}

/// Per node and key, the values the kernel map showed, in order (consecutive repeats folded),
/// each with the start and end of the read that first saw it.
pub type Samples = BTreeMap<(NodeId, u64), Vec<(u64, u64, Value)>>;

/// Reads every node's kernel map until `stop`.
pub async fn sampler(
    maps: Arc<KernelMaps>,
    keys: u64,
    stop: Arc<AtomicBool>,
    rec: Arc<Recorder>,
) -> Samples {
    let mut out: Samples = BTreeMap::new();
    loop {
        let last_round = stop.load(Ordering::SeqCst);
        for (node, map) in maps.every() {
            let t0 = rec.now();
            let Ok(entries) = map.entries() else { continue };
            let t1 = rec.now();
            for key in 0..keys {
                let v = entries.get(&key.to_be_bytes()[..]).and_then(|v| decode(v));
                let seq = out.entry((node, key)).or_insert_with(|| vec![(0, 0, None)]);
                if seq.last().map(|s| s.2) != Some(v) {
                    seq.push((t0, t1, v));
                }
            }
        }
        if last_round {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

/// One node's committed changes as its watch stream delivered them: `(index, key, value,
/// time received)`.
#[derive(Debug, Default, Clone)]
pub struct Stream {
    /// The node whose applied changes these are.
    pub node: NodeId,
    pub changes: Vec<(u64, u64, Value, u64)>,
    /// Indexes whose changes may have been cut short: the last index before the stream broke.
    /// What arrived of such an index is a prefix of its changes.
    pub cut: BTreeSet<u64>,
    /// The stream had to restart from the current contents (changes in between are unseen).
    pub gaps: usize,
}

/// Follows node `addr`'s committed changes to the map until `stop`, resuming after breaks
/// (a kill, a snapshot install). Signals `ready` once connected the first time. `from_now`:
/// the node joined during the run; its stream starts after what it holds when first reached
/// (the other streams recorded how that came about).
pub async fn observer(
    node: NodeId,
    addr: String,
    from_now: bool,
    stop: Arc<AtomicBool>,
    ready: tokio::sync::oneshot::Sender<()>,
    rec: Arc<Recorder>,
) -> Stream {
    let mut s = Stream {
        node,
        ..Default::default()
    };
    let mut ready = Some(ready);
    let mut after = 0u64;
    // After a restart from the current contents: skip that dump (the first index received).
    let mut skip_first = from_now;
    while !stop.load(Ordering::SeqCst) {
        let Ok(ch) = raftmap_node::endpoint(&addr).map(|e| e.connect_lazy()) else {
            break;
        };
        let mut kv = pb::kv_client::KvClient::new(ch);
        let req = pb::WatchRequest {
            map: KMAP.into(),
            after_index: after,
        };
        let stream = tokio::time::timeout(Duration::from_secs(1), kv.watch(req)).await;
        let mut stream = match stream {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(st)) if st.code() == tonic::Code::OutOfRange => {
                // This node no longer holds the changes since `after`: start over from its
                // current contents; the other nodes' streams cover the gap.
                s.gaps += 1;
                after = 0;
                skip_first = true;
                continue;
            }
            _ => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Some(r) = ready.take() {
            let _ = r.send(());
        }
        let mut skip: Option<u64> = None;
        loop {
            let next = tokio::time::timeout(Duration::from_millis(200), stream.message()).await;
            match next {
                Ok(Ok(Some(ev))) => {
                    if std::mem::take(&mut skip_first) {
                        skip = Some(ev.index);
                    }
                    after = after.max(ev.index);
                    if skip == Some(ev.index) {
                        continue;
                    }
                    let change = match ev.event {
                        Some(pb::watch_event::Event::Put(p)) => {
                            decode(&p.key).map(|k| (k as u64, decode(&p.value)))
                        }
                        Some(pb::watch_event::Event::Delete(d)) => {
                            decode(&d.key).map(|k| (k as u64, None))
                        }
                        None => None,
                    };
                    if let Some((k, v)) = change {
                        s.changes.push((ev.index, k, v, rec.now()));
                    }
                }
                // Quiet: check for the end of the run.
                Err(_) if !stop.load(Ordering::SeqCst) => continue,
                Err(_) => break,
                // Broken or ended: the last index may have been cut short. Keep what arrived
                // of it, marked (the merge prefers a whole copy from another stream), and
                // resume after it: a restarted node no longer holds it to send again, and when
                // it was the only one that recorded it (a leader killed right after its
                // commit, the others partitioned) dropping it would lose a committed entry
                // from the order.
                Ok(_) => {
                    if s.changes.last().is_some_and(|c| c.0 == after) {
                        s.cut.insert(after);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    break;
                }
            }
        }
    }
    s
}

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
fn subsequence<T: PartialEq + Copy>(seen: &[T], order: &[T]) -> Result<(), T> {
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
                }
                Some((other, _)) if *other != ch && !(cut && other.starts_with(&ch)) => {
                    r.divergent_indexes.push(i);
                }
                Some(_) => {}
                None => {
                    by_index.insert(i, (ch, cut));
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
    // A node's own write that never entered the log is fine when a later write on the same
    // node replaced it before it was captured (raftmap replicates states: changes to one key
    // between two reads of the ring buffer coalesce), when the node was removed, or when a
    // later committed write superseded it; otherwise it is lost.
    for (&(node, key), ops) in &local {
        for (i, &(_, t, f)) in ops.iter().enumerate() {
            match f {
                Func::Write(v) => {
                    r.writes += 1;
                    if committed_values.contains(v) {
                        continue;
                    }
                    let replaced = i + 1 < ops.len();
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
