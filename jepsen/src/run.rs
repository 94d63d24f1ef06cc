//! One test run: a cluster of real `raftmap agent` processes, clients recording a history
//! through the client API (or writing straight into kernel maps), the nemesis injecting faults,
//! and the checks.
//!
//! Each node runs in a network namespace of its own, joined by a veth pair to a bridge, so that
//! partitions are real packet drops (nftables rules inside the namespaces). Where namespaces
//! cannot be made (no root, no `ip`), the nodes run on loopback, the report says so, and
//! partitions are refused.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::{ClusterOptions, LaunchOptions, LocalCluster};
use raftmap_node::storage::MapSchema;
use serde::Serialize;

use crate::availability::{outages, recover, Outage, Recovery, OUTAGE, RECOVERY_BOUND};
use crate::checker::{check, shrink, Verdict};
use crate::clients::client;
pub use crate::clients::{Workload, MAP};
pub use crate::error::RunError;
use crate::history::Recorder;
use crate::history::{operations, Event, EventType, Operation};
use crate::kernel_map::{self, KernelMapResult, KernelMaps};
use crate::keys::{KeyPool, OPS_PER_KEY, UNKNOWN_PER_KEY};
use crate::nemesis::{Fault, FaultWindow, Members, Nemesis, NoSetup, NodeSetup};
use crate::set_check::check_set;
pub use crate::set_check::SetResult;

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
    /// Run the nodes on loopback even where network namespaces are available.
    pub loopback: bool,
    /// More arguments for every node (`--capture-backend fexit`, say).
    pub agent_args: Vec<String>,
}

/// What a run produced.
#[derive(Debug, Serialize)]
pub struct Report {
    pub seed: u64,
    pub nodes: u64,
    pub workload: Workload,
    pub faults: Vec<Fault>,
    /// `netns` (a namespace per node, veth to a bridge) or why the nodes ran on loopback.
    pub network: String,
    /// Every fault as it happened, in the order they ended.
    pub fault_log: Vec<FaultWindow>,
    pub ops_ok: usize,
    pub ops_fail: usize,
    pub ops_info: usize,
    /// No anomaly: linearizable (register), nothing lost or unexpected (set), converged in
    /// order with nothing lost (kernel-map).
    pub valid: bool,
    pub linearizable: bool,
    pub set: Option<SetResult>,
    pub kernel: Option<KernelMapResult>,
    /// For each key that is not linearizable, the smallest sub-history found that still is
    /// not.
    pub smallest_failing: Vec<Vec<Operation>>,
    /// Once every fault was healed: whether, and how soon, every live member served again.
    pub recovery: Recovery,
    /// Stretches of the load in which no client operation succeeded (API workloads; kernel
    /// writes never wait for the cluster).
    pub outages: Vec<Outage>,
    #[serde(skip)]
    pub anomalies: Vec<Verdict>,
    #[serde(skip)]
    pub history: Vec<Event>,
    /// Each node's log (stdout and stderr of `raftmap agent`, warnings and errors), by node id.
    #[serde(skip)]
    pub node_logs: Vec<(raftmap_node::storage::NodeId, String)>,
}

impl Report {
    /// The faults of `wanted` that were never carried out (none injected without an error).
    pub fn faults_not_carried_out(&self, wanted: &[Fault]) -> Vec<Fault> {
        wanted
            .iter()
            .filter(|f| {
                !self
                    .fault_log
                    .iter()
                    .any(|w| w.fault == **f && w.error.is_none())
            })
            .copied()
            .collect()
    }

    /// Writes everything the run produced into `out` (created if needed): `history.jsonl`, one
    /// log per node, `results.json`, the kernel-map evidence (`kernel-evidence.json`) and the
    /// latency and fault timelines as SVG.
    pub fn write_to(&self, out: &std::path::Path) -> std::io::Result<()> {
        std::fs::create_dir_all(out)?;
        let mut history = String::new();
        for e in &self.history {
            history += &serde_json::to_string(e).map_err(std::io::Error::other)?;
            history.push('\n');
        }
        std::fs::write(out.join("history.jsonl"), history)?;
        for (id, log) in &self.node_logs {
            std::fs::write(out.join(format!("node-{id}.log")), log)?;
        }
        std::fs::write(
            out.join("results.json"),
            serde_json::to_string_pretty(self).map_err(std::io::Error::other)?,
        )?;
        if let Some(k) = &self.kernel {
            std::fs::write(
                out.join("kernel-evidence.json"),
                serde_json::to_string(&k.evidence).map_err(std::io::Error::other)?,
            )?;
        }
        std::fs::write(
            out.join("latency.svg"),
            crate::plot::latency_svg(&self.history, &self.fault_log, &self.outages),
        )?;
        std::fs::write(
            out.join("timeline.svg"),
            crate::plot::timeline_svg(&self.history, &self.fault_log, &self.outages),
        )
    }
}

/// Where the nodes run: network namespaces when this process can make them.
fn network(cfg: &RunConfig) -> Result<(bool, String), RunError> {
    let partitions = cfg.faults.contains(&Fault::Partition);
    if cfg.loopback {
        if partitions {
            return Err(RunError::Config(
                "partitions need network namespaces; drop --loopback".into(),
            ));
        }
        return Ok((false, "loopback (asked for)".into()));
    }
    if LocalCluster::netns_available() {
        return Ok((true, "netns".into()));
    }
    if partitions {
        return Err(RunError::Config(
            "partitions need network namespaces, which this process cannot create (root and `ip` from iproute2 are needed)".into(),
        ));
    }
    Ok((
        false,
        "loopback (network namespaces unavailable: root and iproute2 are needed)".into(),
    ))
}

/// Runs one test.
pub async fn run(cfg: &RunConfig) -> Result<Report, RunError> {
    if cfg.nodes < 1 {
        return Err(RunError::Config("--nodes must be at least 1".into()));
    }
    let (netns, network) = network(cfg)?;
    let mut agent_args = cfg.agent_args.clone();
    if cfg.unsafe_local_reads {
        agent_args.push("--unsafe-local-reads".to_string());
    }
    let kernel = (cfg.workload == Workload::KernelMap).then(|| Arc::new(KernelMaps::new()));
    let setup: Arc<dyn NodeSetup> = match &kernel {
        Some(k) => k.clone(),
        None => Arc::new(NoSetup),
    };
    let mut node_args = std::collections::BTreeMap::new();
    for id in 1..=cfg.nodes {
        node_args.insert(id, setup.prepare(id)?);
    }
    let opts = ClusterOptions {
        launch: LaunchOptions {
            bin: cfg.bin.clone(),
            agent_args,
            log_filter: "warn,raftmap_node::kernel=info,raftmap_storage=info".into(),
            node_args,
            // As users deploy it: the launcher makes the CA and every certificate.
            tls: true,
        },
        netns,
    };
    let mut cluster = LocalCluster::start(opts, cfg.nodes, 0, Duration::from_secs(60)).await?;
    // Whatever fails once the nodes run, the error carries the end of each node's log.
    drive(cfg, &mut cluster, setup.as_ref(), kernel, network)
        .await
        .map_err(|e| RunError::Aborted {
            logs: cluster
                .ids()
                .into_iter()
                .map(|id| format!("--- node {id} ---\n{}", cluster.log_tail(id, 30)))
                .collect::<Vec<_>>()
                .join("\n"),
            error: Box::new(e),
        })
}

/// The run once the nodes are up: load, faults, checks.
async fn drive(
    cfg: &RunConfig,
    cluster: &mut LocalCluster,
    setup: &dyn NodeSetup,
    kernel: Option<Arc<KernelMaps>>,
    network: String,
) -> Result<Report, RunError> {
    let ids = cluster.ids();
    for &id in &ids {
        setup.joined(id, &cluster.node(id)?.api_addr);
    }
    if kernel.is_some() {
        // The nodes declare the map from their kernel maps' layout.
        for &id in &ids {
            cluster
                .wait_for(id, Duration::from_secs(30), "sync its kernel map", |s| {
                    !s.watched.is_empty() && s.watched.iter().all(|w| w.state == "synced")
                })
                .await?;
        }
    } else {
        cluster
            .client(1)
            .await?
            .declare(&MapSchema::hash(MAP, 8, 8, 1 << 20))
            .await?;
    }
    let members = Arc::new(Members::new(cluster));
    let rec = Arc::new(Recorder::new());
    let stop = Arc::new(AtomicBool::new(false));
    // Kernel-map runs: one committed-order stream per node and a sampler, before any write.
    let mut observers = Vec::new();
    let mut sampler = None;
    if let Some(maps) = &kernel {
        for &id in &ids {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let addr = cluster.node(id)?.api_addr.clone();
            observers.push(tokio::spawn(kernel_map::observer(
                cluster.security(),
                id,
                addr,
                false,
                stop.clone(),
                tx,
                rec.clone(),
            )));
            tokio::time::timeout(Duration::from_secs(10), rx)
                .await
                .map_err(|_| RunError::Config(format!("node {id} did not start a watch")))?
                .map_err(|_| RunError::Config(format!("node {id}'s watch ended")))?;
        }
        // Nodes that join later get a stream too, from the moment they join.
        maps.follow_joiners(cluster.security(), stop.clone(), rec.clone());
        sampler = Some(tokio::spawn(kernel_map::sampler(
            maps.clone(),
            cfg.keys,
            stop.clone(),
            rec.clone(),
        )));
    }
    let deadline = Instant::now() + cfg.time_limit;
    let key_pool = Arc::new(KeyPool::new(cfg.keys, OPS_PER_KEY, UNKNOWN_PER_KEY));
    let load_start = rec.now();
    let mut tasks = Vec::new();
    for p in 0..cfg.clients {
        let seed = cfg.seed.wrapping_mul(1_000_003).wrapping_add(p);
        tasks.push(match &kernel {
            Some(maps) => tokio::spawn(kernel_map::writer(
                p,
                maps.clone(),
                cfg.keys,
                seed,
                deadline,
                rec.clone(),
            )),
            None => tokio::spawn(client(
                p,
                members.clone(),
                cfg.workload,
                key_pool.clone(),
                seed,
                deadline,
                rec.clone(),
            )),
        });
    }
    let nemesis = Nemesis::new(cluster, &members, setup, &cfg.faults, cfg.seed, rec.start());
    let fault_log = nemesis.run(deadline).await?;
    for t in tasks {
        let _ = t.await;
    }
    // The clients stop at the deadline (the nemesis may still be settling a removal after it).
    let load_end = deadline.saturating_duration_since(rec.start()).as_nanos() as u64;
    // Every fault is healed: the cluster must serve every live member again, in time.
    let recovery = recover(cluster, &members.ids(), RECOVERY_BOUND).await;
    let mut kernel_result = None;
    if let Some(maps) = &kernel {
        let (unconverged, entries) =
            kernel_map::converge(cluster, &members, maps, Duration::from_secs(30)).await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let samples = match sampler {
            Some(s) => s.await.unwrap_or_default(),
            None => Default::default(),
        };
        let mut streams = Vec::new();
        for o in observers.into_iter().chain(maps.joiners()) {
            if let Ok(s) = o.await {
                streams.push(s);
            }
        }
        let history = rec.take();
        let mut result = kernel_map::check(
            &history,
            &samples,
            &streams,
            &fault_log,
            (unconverged, entries),
        );
        if !result.converged {
            result.statuses = kernel_map::statuses(cluster, &members.ids()).await;
        }
        kernel_result = Some(result);
        rec.extend(history);
    }
    let history = rec.take();
    let count = |k: EventType| history.iter().filter(|e| e.kind == k).count();
    let outages = match cfg.workload {
        Workload::KernelMap => Vec::new(),
        _ => outages(&history, &fault_log, (load_start, load_end), OUTAGE),
    };
    let (anomalies, set) = match cfg.workload {
        Workload::Register => (check(&operations(&history)?), None),
        Workload::Set => (Vec::new(), Some(check_set(cluster, &history).await?)),
        Workload::KernelMap => (Vec::new(), None),
    };
    let smallest_failing = if anomalies.is_empty() {
        Vec::new()
    } else {
        let ops = operations(&history)?;
        anomalies
            .iter()
            .filter_map(|v| match v {
                Verdict::NotLinearizable { key, .. } => Some(*key),
                Verdict::Linearizable | Verdict::Unknown { .. } => None,
            })
            .map(|key| {
                let of_key: Vec<Operation> = ops.iter().filter(|o| o.key == key).cloned().collect();
                shrink(key, &of_key, Duration::from_secs(10))
            })
            .collect()
    };
    let set_ok = set
        .as_ref()
        .is_none_or(|r| r.lost.is_empty() && r.unexpected.is_empty());
    let kernel_ok = kernel_result.as_ref().is_none_or(KernelMapResult::valid);
    let node_logs = cluster
        .ids()
        .into_iter()
        .filter_map(|id| {
            let path = &cluster.node(id).ok()?.log_path;
            Some((id, std::fs::read_to_string(path).unwrap_or_default()))
        })
        .collect();
    Ok(Report {
        seed: cfg.seed,
        nodes: cfg.nodes,
        workload: cfg.workload,
        faults: cfg.faults.clone(),
        network,
        fault_log,
        ops_ok: count(EventType::Ok),
        ops_fail: count(EventType::Fail),
        ops_info: count(EventType::Info),
        valid: anomalies.is_empty() && set_ok && kernel_ok && recovery.ok(),
        linearizable: anomalies.is_empty(),
        set,
        kernel: kernel_result,
        smallest_failing,
        recovery,
        outages,
        anomalies,
        history,
        node_logs,
    })
}
