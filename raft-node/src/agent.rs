//! `raftmap agent`: the daemon's flags, its config file, and running it until a signal.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use raftmap_node::{NodeConfig, RunningNode};

#[derive(Args, Debug)]
pub(crate) struct AgentArgs {
    /// This node's id for a new data dir, stored in it: a number, or `auto` for a random one
    /// (with a node certificate, the certificate's id).
    #[arg(long)]
    pub(crate) node_id: Option<raftmap_node::NodeIdSetting>,
    /// The host this node runs on, recorded with its membership (`raftmap members` shows it).
    #[arg(long, env = "NODE_NAME")]
    pub(crate) node_name: Option<String>,
    /// Peer (Raft) address, to listen on and advertise.
    #[arg(long)]
    pub(crate) raft_addr: Option<String>,
    /// Client and admin API address.
    #[arg(long)]
    pub(crate) api_addr: Option<String>,
    /// The peer address other nodes dial, when not --raft-addr (a stable DNS name, such as a
    /// StatefulSet pod's).
    #[arg(long)]
    pub(crate) advertise_raft_addr: Option<String>,
    /// The API address other nodes and clients are told, when not --api-addr.
    #[arg(long)]
    pub(crate) advertise_api_addr: Option<String>,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long)]
    pub(crate) metrics_addr: Option<String>,
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
    /// TOML file with the same settings (flags take precedence).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// API addresses of members, comma-separated (a DNS name may stand for several, such as a
    /// headless Service): join their cluster on first start, retrying with backoff until one
    /// answers.
    #[arg(long)]
    pub(crate) join: Option<String>,
    /// With --join: stay a learner.
    #[arg(long)]
    pub(crate) learner: bool,
    /// With --join (the voters' addresses): found the cluster once N fresh voters see each
    /// other, or join it when it exists. Every voter of a new cluster gets the same N.
    #[arg(long, value_name = "N")]
    pub(crate) bootstrap_expect: Option<usize>,
    /// As leader, remove a learner not heard from for this long, such as an agent whose host
    /// is gone (default 30m; 0: never). Its id is retired; a node that comes back with an
    /// automatic id joins again under a new one.
    #[arg(long, value_name = "DURATION")]
    pub(crate) reap_learners_after: Option<raftmap_node::Silence>,
    /// As leader, while there are more voters than --bootstrap-expect (a replacement with a
    /// new id was promoted), remove a voter not heard from for this long (default 1m; 0: only
    /// one whose address a newer voter answers at). Never below --bootstrap-expect voters.
    #[arg(long, value_name = "DURATION")]
    pub(crate) reap_voters_after: Option<raftmap_node::Silence>,
    /// Acknowledge writes before the log is fsynced (faster; loses the tail on power loss).
    #[arg(long)]
    pub(crate) no_sync: bool,
    /// Build a snapshot and purge the log every N entries.
    #[arg(long)]
    pub(crate) snapshot_logs: Option<u64>,
    /// Keep a kernel map in sync: NAME=/sys/fs/bpf/PIN or NAME=KERNEL_MAP_NAME (repeatable).
    #[arg(long = "watch", value_name = "NAME=LOCATION")]
    pub(crate) watch: Vec<raftmap_node::WatchSpec>,
    /// How often watched kernel maps are scanned for changes.
    #[arg(long)]
    pub(crate) scan_interval_ms: Option<u64>,
    /// Capture backend: auto (fexit where the kernel allows it, else bpf(2) tracepoints),
    /// or fexit, syscall or scan alone; one named that the kernel refuses stops the start.
    #[arg(long, value_enum)]
    pub(crate) capture_backend: Option<raftmap_node::CaptureBackend>,
    /// Test-only: diff watched maps only once after each reconcile (they are still found,
    /// adopted and reconciled), so that the event backend alone captures changes. Production
    /// keeps the scan: it is how in-place writes and lost events are caught.
    #[arg(long, hide = true)]
    pub(crate) no_periodic_scan: bool,
    /// Most watch streams served at once (default 256); more are refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long)]
    pub(crate) max_watchers: Option<usize>,
    /// Largest snapshot accepted from a leader, in bytes (default 4 GiB); a larger one is
    /// refused and the node cannot catch up from it.
    #[arg(long)]
    pub(crate) max_snapshot_bytes: Option<u64>,
    /// Free bytes the data dir's filesystem must keep (default 64 MiB, 0 turns the check off):
    /// a node that would write with less stops with an error that says so, before the disk is
    /// full.
    #[arg(long)]
    pub(crate) min_free_disk_bytes: Option<u64>,
    /// How often the leader compares the replicas' state digests (default 10000).
    #[arg(long)]
    pub(crate) consistency_check_ms: Option<u64>,
    /// How often the node reads its whole state back from disk to check it (default 600000).
    #[arg(long)]
    pub(crate) disk_check_ms: Option<u64>,
    /// UNSAFE, for testing the fault-injection harness only: serve linearizable reads from the
    /// local state without read-index.
    #[arg(long, hide = true)]
    pub(crate) unsafe_local_reads: bool,
    /// Identity directory (ca.crt, tls.crt, tls.key; see `raftmap certs node`): mutual TLS on
    /// the peer and API ports, reloaded when the files change. A new data dir takes its node id
    /// from the certificate.
    #[arg(long, env = "RAFTMAP_TLS_DIR")]
    pub(crate) tls_dir: Option<PathBuf>,
    /// The cluster CA's directory (ca.crt and ca.key, or a cert-manager CA Secret): the node
    /// issues its own certificate (into <data dir>/tls) and signs those of new nodes. For the
    /// voters.
    #[arg(long, env = "RAFTMAP_CA_DIR")]
    pub(crate) ca_dir: Option<PathBuf>,
    /// An enrollment credential (`raftmap certs enroll`): the node has a --join member that
    /// holds the CA key sign its certificate (into <data dir>/tls). For the agents.
    #[arg(long, env = "RAFTMAP_ENROLL_DIR")]
    pub(crate) enroll_dir: Option<PathBuf>,
    /// Serve without TLS on addresses other than loopback: anyone who reaches them can write
    /// every node's maps and change the membership.
    #[arg(long)]
    pub(crate) insecure: bool,
    /// How often the leader heartbeats its followers (default 100).
    #[arg(long)]
    pub(crate) heartbeat_ms: Option<u64>,
    /// Election timeout T (default 500): a follower that last heard its leader 1.5T ago (the
    /// leader's lease) plus its own random pick in [T, 1.5T] starts an election, so a leader's
    /// death is noticed after 2.5-3 T. Shorter fails over faster and risks elections on loaded
    /// hosts.
    #[arg(long)]
    pub(crate) election_timeout_ms: Option<u64>,
}

/// A configuration the agent refuses before starting anything (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Refused(pub(crate) String);

pub(crate) async fn agent(a: AgentArgs) -> Result<()> {
    // Transparent huge pages off for the daemon (as Redis and most databases advise): the shadow
    // maps and per-batch buffers grow into fresh memory, and a fault on a fresh 2 MiB page zeroes
    // all of it at once. On the reference VM that stalled the apply path for 150-250 ms at a time
    // at 50k updates/s (p99 200-250 ms instead of 10-20 ms).
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        tracing::warn!(error = %e, "cannot turn transparent huge pages off for the daemon");
    }
    let mut cfg = match &a.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            toml::from_str::<NodeConfig>(&text)
                .with_context(|| format!("parsing {}", path.display()))?
        }
        None => NodeConfig::default(),
    };
    if a.node_id.is_some() {
        cfg.node_id = a.node_id;
    }
    if a.node_name.is_some() {
        cfg.node_name = a.node_name;
    }
    if let Some(v) = a.raft_addr {
        cfg.raft_addr = v;
    }
    if let Some(v) = a.api_addr {
        cfg.api_addr = v;
    }
    if a.advertise_raft_addr.is_some() {
        cfg.advertise_raft_addr = a.advertise_raft_addr;
    }
    if a.advertise_api_addr.is_some() {
        cfg.advertise_api_addr = a.advertise_api_addr;
    }
    if a.metrics_addr.is_some() {
        cfg.metrics_addr = a.metrics_addr;
    }
    if let Some(v) = a.data_dir {
        cfg.data_dir = v;
    }
    if a.join.is_some() {
        cfg.join = a.join;
    }
    cfg.learner |= a.learner;
    if a.bootstrap_expect.is_some() {
        cfg.bootstrap_expect = a.bootstrap_expect;
    }
    if let Some(v) = a.reap_learners_after {
        cfg.reap_learners_after = v;
    }
    if let Some(v) = a.reap_voters_after {
        cfg.reap_voters_after = v;
    }
    cfg.sync &= !a.no_sync;
    if let Some(v) = a.snapshot_logs {
        cfg.snapshot_logs = v;
    }
    cfg.watch.extend(a.watch);
    if a.unsafe_local_reads {
        tracing::warn!(
            "UNSAFE: linearizable reads are served from local state (--unsafe-local-reads)"
        );
        cfg.unsafe_local_reads = true;
    }
    if let Some(v) = a.scan_interval_ms {
        cfg.scan_interval_ms = v;
    }
    if let Some(b) = a.capture_backend {
        cfg.capture_backend = b;
    }
    if a.no_periodic_scan {
        tracing::warn!("--no-periodic-scan: watched maps are diffed only once after each reconcile; changes the capture backend misses are not repaired (tests only)");
        cfg.periodic_scan = false;
    }
    if let Some(v) = a.max_watchers {
        cfg.max_watchers = v;
    }
    if let Some(v) = a.max_snapshot_bytes {
        cfg.max_snapshot_bytes = v;
    }
    if let Some(v) = a.min_free_disk_bytes {
        cfg.min_free_disk_bytes = v;
    }
    if let Some(v) = a.consistency_check_ms {
        cfg.consistency_check_ms = v;
    }
    if let Some(v) = a.disk_check_ms {
        cfg.disk_check_ms = v;
    }
    if let Some(v) = a.heartbeat_ms {
        cfg.heartbeat_ms = v;
    }
    if let Some(v) = a.election_timeout_ms {
        cfg.election_timeout_ms = v;
    }
    if a.tls_dir.is_some() {
        cfg.tls_dir = a.tls_dir;
    }
    if a.ca_dir.is_some() {
        cfg.ca_dir = a.ca_dir;
    }
    if a.enroll_dir.is_some() {
        cfg.enroll_dir = a.enroll_dir;
    }
    cfg.insecure |= a.insecure;
    if let Some(why) = cfg.insecure_exposure() {
        return Err(Refused(why).into());
    }
    if cfg.tls_dir.is_none() && cfg.ca_dir.is_none() && cfg.enroll_dir.is_none() {
        tracing::warn!("no TLS: peers and clients are not authenticated (--tls-dir turns it on)");
    }
    let mut node = RunningNode::start(cfg).await?;
    let stop = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
    };
    let res = node.run_until(stop).await;
    tracing::info!("shutting down");
    tokio::time::timeout(Duration::from_secs(5), node.shutdown())
        .await
        .ok();
    res.map_err(Into::into)
}
