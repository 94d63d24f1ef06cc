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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raftmap_ebpf_hooks::{KernelMap, MapKind, UpdateFlags};
use raftmap_node::proto as pb;
use raftmap_node::tls::{Expect, Security};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::RunError;
use crate::history::Recorder;
use crate::history::{EventType, Func};
use crate::lock::lock;
use crate::nemesis::NodeSetup;

pub(super) type NodeId = u64;

/// The replicated map the kernel-map workload syncs.
pub const KMAP: &str = "jepsen_kmap";

/// A key's value as a node or the log has it (`None`: absent).
pub(super) type Value = Option<i64>;

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
    security: Security,
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

    /// The maps of the current members.
    fn current(&self) -> Vec<(NodeId, Arc<KernelMap>)> {
        lock(&self.maps)
            .iter()
            .map(|(i, m)| (*i, m.clone()))
            .collect()
    }

    /// From now on, a node that joins gets a watch stream (until `stop`).
    pub fn follow_joiners(&self, security: Security, stop: Arc<AtomicBool>, rec: Arc<Recorder>) {
        *lock(&self.joiners) = Some(Joiners {
            security,
            stop,
            rec,
            streams: Vec::new(),
        });
    }

    /// The watch streams of the nodes that joined, to await once `stop` is set.
    pub fn joiners(&self) -> Vec<tokio::task::JoinHandle<Stream>> {
        lock(&self.joiners)
            .as_mut()
            .map(|j| std::mem::take(&mut j.streams))
            .unwrap_or_default()
    }

    fn every(&self) -> Vec<(NodeId, Arc<KernelMap>)> {
        lock(&self.all)
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
        lock(&self.all).insert(id, map);
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
        if let Some(m) = lock(&self.all).get(&id).cloned() {
            lock(&self.maps).insert(id, m);
        }
        if let Some(j) = lock(&self.joiners).as_mut() {
            let (ready, _) = tokio::sync::oneshot::channel();
            j.streams.push(tokio::spawn(observer(
                j.security.clone(),
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
        lock(&self.maps).remove(&id);
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
    security: Security,
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
    if !from_now {
        // The run starts these streams before any write, so the map has no changes up to the
        // node's applied index: follow from there. (Watching from 0 begins with a dump of the
        // contents at the index of the moment the server reads them; a write that slipped in
        // before would make that dump pass for the changes of one entry.)
        if let Ok(c) = raftmap_node::Client::connect(std::slice::from_ref(&addr), &security).await {
            if let Ok(st) = c.status().await {
                after = st.applied_index;
            }
        }
    }
    // After a restart from the current contents: skip that dump (the first index received).
    let mut skip_first = from_now;
    while !stop.load(Ordering::SeqCst) {
        let Ok(ch) = security.channel(&addr, Expect::AnyNode) else {
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

mod check;
#[cfg(test)]
mod tests;

pub use check::{check, converge, statuses, Evidence, KernelMapResult};
