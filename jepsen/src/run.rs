//! One test run: a cluster of real `raftmap agent` processes, clients recording a history of
//! register operations through the client API, a nemesis injecting faults, and the checker.
//!
//! The nodes run on loopback, or, when partitions are asked for, each in a network namespace
//! of its own joined by veth pairs to a bridge, partitioned with nftables rules inside the
//! namespaces. Faults: SIGKILL and restart, SIGSTOP and SIGCONT, partitions into random halves.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raftmap_node::local_cluster::{ClusterOptions, LocalCluster};
use raftmap_node::proto as pb;
use raftmap_node::storage::{MapSchema, MapType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::checker::{check, Verdict};
use crate::history::{operations, Event, EventType, Func};

/// The replicated map the register workload uses.
pub const MAP: &str = "jepsen_register";

/// Faults the nemesis can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fault {
    /// SIGKILL a random node, restart it a moment later.
    Kill,
    /// SIGSTOP a random node, SIGCONT it a moment later.
    Pause,
    /// Cut the network: the leader alone, or two random halves, then heal. Runs the nodes in
    /// network namespaces.
    Partition,
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kill" => Ok(Fault::Kill),
            "pause" => Ok(Fault::Pause),
            "partition" => Ok(Fault::Partition),
            "membership" => Err("nemesis \"membership\" is not available yet (kill, pause and partition are)".into()),
            "clock" => Err("clock faults cannot be produced here: the nodes share this machine's clock, and raftmap does not read wall time for safety".into()),
            other => Err(format!("unknown nemesis {other:?}: expected kill, pause or partition")),
        }
    }
}

/// What the clients do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Reads, writes and compare-and-swaps on a few keys; checked for linearizability.
    Register,
    /// Adds of unique elements, then a final read; checked for lost and unexpected elements.
    Set,
}

impl std::str::FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "register" => Ok(Workload::Register),
            "set" => Ok(Workload::Set),
            "kernel-map" => {
                Err("workload \"kernel-map\" is not available yet (register and set are)".into())
            }
            other => Err(format!(
                "unknown workload {other:?}: expected register or set"
            )),
        }
    }
}

/// The set workload's verdict.
#[derive(Debug, Default, Serialize)]
pub struct SetResult {
    pub attempted: usize,
    pub acknowledged: usize,
    pub final_size: usize,
    /// Acknowledged adds missing from the final read.
    pub lost: Vec<i64>,
    /// Elements in the final read that nobody tried to add.
    pub unexpected: Vec<i64>,
    /// Adds of unknown outcome that did take effect.
    pub recovered: usize,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub workload: Workload,
    /// The `raftmap` binary.
    pub bin: PathBuf,
    pub nodes: u64,
    pub time_limit: Duration,
    pub keys: u64,
    pub clients: u64,
    pub faults: Vec<Fault>,
    pub seed: u64,
    /// Start the nodes with `--unsafe-local-reads` (to show the checker catches it).
    pub unsafe_local_reads: bool,
}

/// Errors that stop a run (not anomalies: those are results).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cluster: {0}")]
    Cluster(#[from] raftmap_node::NodeError),
    #[error("history: {0}")]
    History(#[from] crate::history::HistoryError),
}

/// What a run produced.
#[derive(Debug, Serialize)]
pub struct Report {
    pub seed: u64,
    pub nodes: u64,
    pub faults: Vec<Fault>,
    /// Fault windows: `(fault, node, start ns, end ns)`; for a partition the node is the
    /// isolated leader, or 0 for two random halves.
    pub fault_log: Vec<(Fault, u64, u64, u64)>,
    pub ops_ok: usize,
    pub ops_fail: usize,
    pub ops_info: usize,
    /// No anomaly: linearizable (register), nothing lost or unexpected (set).
    pub valid: bool,
    pub linearizable: bool,
    pub set: Option<SetResult>,
    #[serde(skip)]
    pub anomalies: Vec<Verdict>,
    #[serde(skip)]
    pub history: Vec<Event>,
}

struct Recorder {
    start: Instant,
    events: Mutex<Vec<Event>>,
}

impl Recorder {
    /// Records an event; returns whether it left the outcome unknown.
    fn record(&self, process: u64, kind: EventType, key: u64, f: Func) -> bool {
        let time = self.start.elapsed().as_nanos() as u64;
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        events.push(Event {
            process,
            kind,
            f,
            key,
            time,
        });
        kind == EventType::Info
    }
}

fn key_bytes(k: u64) -> Vec<u8> {
    k.to_be_bytes().to_vec()
}

fn value_of(v: &[u8]) -> Option<i64> {
    v.try_into().ok().map(i64::from_be_bytes)
}

/// How a call ended, for the history: a definite refusal is `Fail`, anything that leaves the
/// outcome open (timeout, unavailable, lost connection) is `Info`.
fn classify(s: &tonic::Status) -> EventType {
    match s.code() {
        tonic::Code::InvalidArgument | tonic::Code::NotFound | tonic::Code::FailedPrecondition => {
            EventType::Fail
        }
        _ => EventType::Info,
    }
}

/// A call bounded on the client side too: a paused server never answers, whatever the
/// deadline it was sent.
async fn within<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer in time")))
}

/// Sends a one-operation write batch; how it ended, for the history.
async fn write_one(
    kv: &mut pb::kv_client::KvClient<tonic::transport::Channel>,
    op: pb::op::Op,
    timeout: Duration,
) -> EventType {
    let mut req = tonic::Request::new(pb::WriteRequest {
        ops: vec![pb::Op { op: Some(op) }],
    });
    req.set_timeout(timeout);
    match within(timeout, kv.write(req)).await {
        Ok(r) if r.get_ref().succeeded => EventType::Ok,
        // A compare-and-swap that did not match changed nothing.
        Ok(_) => EventType::Fail,
        Err(s) => classify(&s),
    }
}

fn put(key: Vec<u8>, value: i64) -> pb::op::Op {
    pb::op::Op::Put(pb::Put {
        map: MAP.into(),
        key,
        value: value.to_be_bytes().to_vec(),
    })
}

/// One client: operations one at a time against one node, until `deadline`.
async fn client(
    process: u64,
    endpoint: String,
    workload: Workload,
    keys: u64,
    seed: u64,
    deadline: Instant,
    rec: Arc<Recorder>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let Ok(ch) = raftmap_node::endpoint(&endpoint).map(|e| e.connect_lazy()) else {
        return;
    };
    let mut kv = pb::kv_client::KvClient::new(ch);
    let mut last_unknown = false;
    let mut added: i64 = 0;
    while Instant::now() < deadline {
        if std::mem::take(&mut last_unknown) {
            // The node is down or unreachable: do not spin on it.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let key = rng.gen_range(0..keys);
        let op = match workload {
            Workload::Register => rng.gen_range(0..3),
            Workload::Set => 3,
        };
        let timeout = Duration::from_secs(2);
        match op {
            0 => {
                let _ = rec.record(process, EventType::Invoke, key, Func::Read(None));
                let mut req = tonic::Request::new(pb::GetRequest {
                    map: MAP.into(),
                    key: key_bytes(key),
                    consistency: pb::Consistency::Linearizable as i32,
                });
                req.set_timeout(timeout);
                match within(timeout, kv.get(req)).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        let v = if r.found { value_of(&r.value) } else { None };
                        let _ = rec.record(process, EventType::Ok, key, Func::Read(v));
                    }
                    Err(s) => {
                        last_unknown = rec.record(process, classify(&s), key, Func::Read(None))
                    }
                }
            }
            1 => {
                let v = rng.gen_range(0..5);
                let _ = rec.record(process, EventType::Invoke, key, Func::Write(v));
                let kind = write_one(&mut kv, put(key_bytes(key), v), timeout).await;
                last_unknown = rec.record(process, kind, key, Func::Write(v));
            }
            3 => {
                // A unique element: the process and its own counter.
                added += 1;
                let element = (process as i64) * 1_000_000_000 + added;
                let _ = rec.record(process, EventType::Invoke, 0, Func::Write(element));
                let op = put(element.to_be_bytes().to_vec(), 1);
                let kind = write_one(&mut kv, op, timeout).await;
                last_unknown = rec.record(process, kind, 0, Func::Write(element));
            }
            _ => {
                let (from, to) = (rng.gen_range(0..5), rng.gen_range(0..5));
                let f = Func::Cas([from, to]);
                let _ = rec.record(process, EventType::Invoke, key, f.clone());
                let op = pb::op::Op::Cas(pb::CompareAndSwap {
                    map: MAP.into(),
                    key: key_bytes(key),
                    expected: Some(from.to_be_bytes().to_vec()),
                    new_value: Some(to.to_be_bytes().to_vec()),
                });
                let kind = write_one(&mut kv, op, timeout).await;
                last_unknown = rec.record(process, kind, key, f);
            }
        }
    }
}

/// Runs one test.
pub async fn run(cfg: &RunConfig) -> Result<Report, RunError> {
    let mut agent_args = Vec::new();
    if cfg.unsafe_local_reads {
        agent_args.push("--unsafe-local-reads".to_string());
    }
    let opts = ClusterOptions {
        bin: cfg.bin.clone(),
        agent_args,
        log_filter: "warn".into(),
        node_args: Default::default(),
        netns: cfg.faults.contains(&Fault::Partition),
    };
    let mut cluster = LocalCluster::start(opts, cfg.nodes, 0, Duration::from_secs(60)).await?;
    cluster
        .client(1)
        .await?
        .declare(&MapSchema {
            name: MAP.into(),
            map_type: MapType::Hash,
            key_size: 8,
            value_size: 8,
            max_entries: 1 << 20,
        })
        .await?;
    let ids = cluster.ids();
    let rec = Arc::new(Recorder {
        start: Instant::now(),
        events: Mutex::new(Vec::new()),
    });
    let deadline = Instant::now() + cfg.time_limit;
    let mut tasks = Vec::new();
    for p in 0..cfg.clients {
        let endpoint = cluster
            .node(ids[(p % ids.len() as u64) as usize])?
            .api_addr
            .clone();
        tasks.push(tokio::spawn(client(
            p,
            endpoint,
            cfg.workload,
            cfg.keys,
            cfg.seed.wrapping_mul(1_000_003).wrapping_add(p),
            deadline,
            rec.clone(),
        )));
    }
    let fault_log = nemesis(&mut cluster, cfg, deadline, &rec).await?;
    for t in tasks {
        let _ = t.await;
    }
    let history = std::mem::take(&mut *rec.events.lock().unwrap_or_else(|p| p.into_inner()));
    let count = |k: EventType| history.iter().filter(|e| e.kind == k).count();
    let (anomalies, set) = match cfg.workload {
        Workload::Register => (check(&operations(&history)?), None),
        Workload::Set => (Vec::new(), Some(check_set(&cluster, &history).await?)),
    };
    let set_ok = set
        .as_ref()
        .is_none_or(|r| r.lost.is_empty() && r.unexpected.is_empty());
    Ok(Report {
        seed: cfg.seed,
        nodes: cfg.nodes,
        faults: cfg.faults.clone(),
        fault_log,
        ops_ok: count(EventType::Ok),
        ops_fail: count(EventType::Fail),
        ops_info: count(EventType::Info),
        valid: anomalies.is_empty() && set_ok,
        linearizable: anomalies.is_empty(),
        set,
        anomalies,
        history,
    })
}

/// The set's final read (linearizable, retried until the healed cluster answers), compared with
/// what was attempted and acknowledged.
async fn check_set(cluster: &LocalCluster, history: &[Event]) -> Result<SetResult, RunError> {
    use std::collections::BTreeSet;
    let element = |e: &Event| match e.f {
        Func::Write(v) => Some(v),
        _ => None,
    };
    let of = |k: EventType| -> BTreeSet<i64> {
        history
            .iter()
            .filter(|e| e.kind == k)
            .filter_map(element)
            .collect()
    };
    let (attempted, acked, unknown) = (
        of(EventType::Invoke),
        of(EventType::Ok),
        of(EventType::Info),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let final_read: BTreeSet<i64> = loop {
        let mut last = None;
        for id in cluster.ids() {
            match cluster.client(id).await {
                Ok(c) => match c.dump(MAP, true).await {
                    Ok((_, _, entries)) => {
                        last = Some(entries.iter().filter_map(|(k, _)| value_of(k)).collect());
                        break;
                    }
                    Err(e) => note_retry(&e),
                },
                Err(e) => note_retry(&e),
            }
        }
        if let Some(r) = last {
            break r;
        }
        if Instant::now() > deadline {
            return Err(RunError::Cluster(raftmap_node::NodeError::Timeout(
                "no node answered the final read".into(),
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    Ok(SetResult {
        attempted: attempted.len(),
        acknowledged: acked.len(),
        final_size: final_read.len(),
        lost: acked.difference(&final_read).copied().collect(),
        unexpected: final_read.difference(&attempted).copied().collect(),
        recovered: unknown.intersection(&final_read).count(),
    })
}

/// A failed attempt at the final read (retried).
fn note_retry(e: &raftmap_node::NodeError) {
    eprintln!("final read: {e}; retrying");
}

/// The node that says it leads, if one answers in time.
async fn leader_of(cluster: &LocalCluster) -> Option<u64> {
    for id in cluster.ids() {
        let Ok(c) = cluster.client(id).await else {
            continue;
        };
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(500), c.status()).await {
            if s.has_leader {
                return Some(s.leader_id);
            }
        }
    }
    None
}

/// Injects the configured faults until `deadline`, then heals everything.
async fn nemesis(
    cluster: &mut LocalCluster,
    cfg: &RunConfig,
    deadline: Instant,
    rec: &Recorder,
) -> Result<Vec<(Fault, u64, u64, u64)>, RunError> {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let ids = cluster.ids();
    let mut log = Vec::new();
    let now = |rec: &Recorder| rec.start.elapsed().as_nanos() as u64;
    while !cfg.faults.is_empty() {
        let quiet = Duration::from_millis(rng.gen_range(300..1200));
        if Instant::now() + quiet + Duration::from_millis(1500) > deadline {
            break;
        }
        tokio::time::sleep(quiet).await;
        let fault = cfg.faults[rng.gen_range(0..cfg.faults.len())];
        let node = ids[rng.gen_range(0..ids.len())];
        let hold = Duration::from_millis(rng.gen_range(300..1200));
        let start = now(rec);
        let mut victim = node;
        match fault {
            Fault::Kill => {
                cluster.kill(node)?;
                tokio::time::sleep(hold).await;
                cluster.restart(node)?;
            }
            Fault::Pause => {
                cluster.pause(node)?;
                tokio::time::sleep(hold).await;
                cluster.resume(node)?;
            }
            Fault::Partition => {
                // Half the time the current leader alone, otherwise two random halves.
                let leader = if rng.gen_bool(0.5) {
                    leader_of(cluster).await
                } else {
                    None
                };
                let groups = match leader {
                    Some(l) => vec![vec![l], ids.iter().copied().filter(|&i| i != l).collect()],
                    None => {
                        let mut shuffled = ids.clone();
                        for i in (1..shuffled.len()).rev() {
                            shuffled.swap(i, rng.gen_range(0..=i));
                        }
                        let cut = rng.gen_range(1..shuffled.len().max(2));
                        vec![shuffled[..cut].to_vec(), shuffled[cut..].to_vec()]
                    }
                };
                // Logged: the isolated leader, or 0 for two random halves.
                victim = leader.unwrap_or(0);
                cluster.partition(&groups)?;
                tokio::time::sleep(hold).await;
                cluster.heal()?;
            }
        }
        log.push((fault, victim, start, now(rec)));
    }
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::sleep(left).await;
    Ok(log)
}
