//! `raftmap`: the daemon (`raftmap agent`), the operator CLI and the local demo.

mod demo;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use raftmap_node::proto as pb;
use raftmap_node::storage::{MapSchema, MapType};
use raftmap_node::{Client, NodeConfig, RunningNode};
use serde_json::json;

// The daemon allocates a key and a value per replicated change on every hop; mimalloc's
// thread-local free lists make that markedly cheaper than glibc malloc under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "raftmap",
    version,
    about = "Keeps BPF hash maps identical across a cluster, in one Raft order"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Debug, Clone)]
struct Conn {
    /// API addresses of cluster members, comma separated; the first reachable one is used.
    #[arg(
        long,
        env = "RAFTMAP_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7401",
        global = true
    )]
    endpoints: Vec<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a node (the daemon).
    Agent(Box<AgentArgs>),
    /// Cluster-wide operations.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Add a node as a learner (it receives the log but does not vote).
    AddLearner {
        #[arg(long)]
        node_id: u64,
        #[arg(long)]
        raft_addr: String,
        #[arg(long)]
        api_addr: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Make a caught-up learner a voter.
    Promote {
        node_id: u64,
        /// Most entries the learner may lag behind and still be promoted (0: 1000).
        #[arg(long, default_value_t = 0)]
        max_lag: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Remove a node from the cluster; its id is never used again. A voter is not removed when
    /// fewer than three voters would remain (a cluster of two cannot lose one): add a voter
    /// first, or pass --force.
    Remove {
        node_id: u64,
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// List the members.
    Members {
        #[command(flatten)]
        conn: Conn,
    },
    /// Show each endpoint's own view: role, term, log indexes, readiness.
    Status {
        #[command(flatten)]
        conn: Conn,
    },
    /// Read and write replicated maps.
    Map {
        #[command(subcommand)]
        cmd: MapCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Start a local cluster as separate processes, run a workload, show that every node
    /// converged, and clean up.
    Demo(demo::DemoArgs),
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Make the node at the first endpoint the single voter of a new cluster.
    Init,
}

#[derive(Subcommand, Debug)]
enum MapCmd {
    /// Declare a map and its schema (idempotent for an identical schema).
    Declare {
        name: String,
        #[arg(long = "type", value_parser = parse_map_type, default_value = "hash")]
        map_type: MapType,
        #[arg(long)]
        key_size: u32,
        #[arg(long)]
        value_size: u32,
        #[arg(long, default_value_t = 65536)]
        max_entries: u32,
    },
    /// List declared maps with their entry counts.
    List,
    /// Set a key (key and value in hex).
    Put {
        map: String,
        key: String,
        value: String,
    },
    /// Read a key (hex); linearizable unless --local.
    Get {
        map: String,
        key: String,
        #[arg(long)]
        local: bool,
    },
    /// Delete a key (hex).
    Delete { map: String, key: String },
    /// Print every entry; linearizable unless --local.
    Dump {
        map: String,
        #[arg(long)]
        local: bool,
    },
    /// Remove a map and every entry of it (refused while any node watches it).
    Drop { map: String },
}

#[derive(Args, Debug)]
struct AgentArgs {
    /// This node's id (required for a new data dir, then stored in it).
    #[arg(long)]
    node_id: Option<u64>,
    /// Peer (Raft) address, to listen on and advertise.
    #[arg(long)]
    raft_addr: Option<String>,
    /// Client and admin API address.
    #[arg(long)]
    api_addr: Option<String>,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long)]
    metrics_addr: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// TOML file with the same settings (flags take precedence).
    #[arg(long)]
    config: Option<PathBuf>,
    /// API address of a member: join its cluster on first start.
    #[arg(long)]
    join: Option<String>,
    /// With --join: stay a learner.
    #[arg(long)]
    learner: bool,
    /// Acknowledge writes before the log is fsynced (faster; loses the tail on power loss).
    #[arg(long)]
    no_sync: bool,
    /// Build a snapshot and purge the log every N entries.
    #[arg(long)]
    snapshot_logs: Option<u64>,
    /// Keep a kernel map in sync: NAME=/sys/fs/bpf/PIN or NAME=KERNEL_MAP_NAME (repeatable).
    #[arg(long = "watch", value_name = "NAME=LOCATION")]
    watch: Vec<raftmap_node::WatchSpec>,
    /// How often watched kernel maps are scanned for changes.
    #[arg(long)]
    scan_interval_ms: Option<u64>,
    /// Most watch streams served at once (default 256); more are refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long)]
    max_watchers: Option<usize>,
    /// Largest snapshot accepted from a leader, in bytes (default 4 GiB); a larger one is
    /// refused and the node cannot catch up from it.
    #[arg(long)]
    max_snapshot_bytes: Option<u64>,
    /// Free bytes the data dir's filesystem must keep (default 64 MiB, 0 turns the check off):
    /// a node that would write with less stops with an error that says so, before the disk is
    /// full.
    #[arg(long)]
    min_free_disk_bytes: Option<u64>,
    /// How often the leader compares the replicas' state digests (default 10000).
    #[arg(long)]
    consistency_check_ms: Option<u64>,
    /// How often the node reads its whole state back from disk to check it (default 600000).
    #[arg(long)]
    disk_check_ms: Option<u64>,
    /// UNSAFE, for testing the fault-injection harness only: serve linearizable reads from the
    /// local state without read-index.
    #[arg(long, hide = true)]
    unsafe_local_reads: bool,
    /// How often the leader heartbeats its followers (default 100).
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// Election timeout T (default 500): a follower that last heard its leader 1.5T ago (the
    /// leader's lease) plus its own random pick in [T, 1.5T] starts an election, so a leader's
    /// death is noticed after 2.5-3 T. Shorter fails over faster and risks elections on loaded
    /// hosts.
    #[arg(long)]
    election_timeout_ms: Option<u64>,
}

fn parse_map_type(s: &str) -> Result<MapType, String> {
    s.parse()
        .map_err(|e: raftmap_node::storage::ValidationError| e.to_string())
}

fn parse_hex(what: &str, s: &str) -> Result<Vec<u8>> {
    let t = s.strip_prefix("0x").unwrap_or(s);
    hex::decode(t).with_context(|| format!("{what} {s:?} is not hex"))
}

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let res = rt.block_on(run(cli));
    if let Err(e) = &res {
        eprintln!("error: {e:#}");
    }
    // Tasks still running hold the database: stop them (which closes it) before the process
    // exits, or RocksDB closes during exit, after its static state is gone, and aborts.
    rt.shutdown_timeout(Duration::from_secs(5));
    if res.is_err() {
        std::process::exit(1);
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::env::var_os("NO_COLOR").is_none())
        .with_writer(std::io::stderr)
        .init();
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Agent(a) => {
            init_tracing();
            agent(*a).await
        }
        Cmd::Demo(a) => demo::run(a).await,
        Cmd::Cluster {
            cmd: ClusterCmd::Init,
            conn,
        } => {
            let c = Client::connect(&conn.endpoints).await?;
            let r = c
                .admin()
                .init(pb::InitRequest {})
                .await
                .map_err(from_status)?
                .into_inner();
            print(
                conn.output,
                json!({"cluster_id": r.cluster_id, "node_id": r.node_id}),
                || {
                    format!(
                        "initialised cluster {} with node {} as its first voter",
                        r.cluster_id, r.node_id
                    )
                },
            );
            Ok(())
        }
        Cmd::AddLearner {
            node_id,
            raft_addr,
            api_addr,
            conn,
        } => {
            let c = Client::connect(&conn.endpoints).await?;
            let r = c
                .admin()
                .add_learner(pb::AddLearnerRequest {
                    node_id,
                    raft_addr,
                    api_addr,
                    cluster_id: String::new(),
                })
                .await
                .map_err(from_status)?
                .into_inner();
            print_members(conn.output, &r);
            Ok(())
        }
        Cmd::Promote {
            node_id,
            max_lag,
            conn,
        } => {
            let c = Client::connect(&conn.endpoints).await?;
            let r = c
                .admin()
                .promote(pb::PromoteRequest { node_id, max_lag })
                .await
                .map_err(from_status)?
                .into_inner();
            print_members(conn.output, &r);
            Ok(())
        }
        Cmd::Remove {
            node_id,
            force,
            conn,
        } => {
            let c = Client::connect(&conn.endpoints).await?;
            let r = c
                .admin()
                .remove(pb::RemoveRequest { node_id, force })
                .await
                .map_err(from_status)?
                .into_inner();
            print_members(conn.output, &r);
            Ok(())
        }
        Cmd::Members { conn } => {
            let c = Client::connect(&conn.endpoints).await?;
            print_members(conn.output, &c.members().await?);
            Ok(())
        }
        Cmd::Status { conn } => status(&conn).await,
        Cmd::Map { cmd, conn } => map(cmd, &conn).await,
    }
}

fn from_status(s: tonic::Status) -> anyhow::Error {
    anyhow::Error::new(raftmap_node::NodeError::from(s))
}

fn print(output: Output, j: serde_json::Value, table: impl FnOnce() -> String) {
    match output {
        Output::Json => println!("{j}"),
        Output::Table => println!("{}", table()),
    }
}

fn print_members(output: Output, r: &pb::MembersResponse) {
    let rows: Vec<_> = r
        .members
        .iter()
        .map(|m| {
            json!({"node_id": m.node_id, "raft_addr": m.raft_addr, "api_addr": m.api_addr,
                   "role": if m.voter { "voter" } else { "learner" },
                   "leader": r.has_leader && r.leader_id == m.node_id})
        })
        .collect();
    print(
        output,
        json!({"cluster_id": r.cluster_id, "members": rows}),
        || {
            let mut s = format!(
                "{:<6} {:<8} {:<7} {:<22} {:<22}\n",
                "ID", "ROLE", "LEADER", "RAFT", "API"
            );
            for m in &r.members {
                s.push_str(&format!(
                    "{:<6} {:<8} {:<7} {:<22} {:<22}\n",
                    m.node_id,
                    if m.voter { "voter" } else { "learner" },
                    if r.has_leader && r.leader_id == m.node_id {
                        "*"
                    } else {
                        ""
                    },
                    m.raft_addr,
                    m.api_addr
                ));
            }
            s.trim_end().to_string()
        },
    );
}

/// Status of every endpoint (each answers for itself).
async fn status(conn: &Conn) -> Result<()> {
    let mut rows = Vec::new();
    let mut failures = 0;
    for ep in &conn.endpoints {
        let res = async {
            let c = Client::connect(std::slice::from_ref(ep)).await?;
            c.status().await
        }
        .await;
        match res {
            Ok(s) => rows.push((ep.clone(), Ok(s))),
            Err(e) => {
                failures += 1;
                rows.push((ep.clone(), Err(e.to_string())));
            }
        }
    }
    let j: Vec<_> = rows
        .iter()
        .map(|(ep, r)| match r {
            Ok(s) => json!({"endpoint": ep, "node_id": s.node_id, "cluster_id": s.cluster_id, "role": s.role,
                "leader_id": s.has_leader.then_some(s.leader_id), "term": s.term,
                "last_log_index": s.last_log_index, "committed_index": s.committed_index,
                "applied_index": s.applied_index, "snapshot_index": s.snapshot_index,
                "purged_index": s.purged_index, "ready": s.ready,
                "not_ready_reason": (!s.not_ready_reason.is_empty()).then_some(&s.not_ready_reason),
                "corrupt": (!s.corrupt.is_empty()).then_some(&s.corrupt),
                "watched": s.watched.iter().map(|w| json!({"map": w.map, "location": w.location,
                    "backend": w.backend, "entries": w.entries, "state": w.state,
                    "refused_changes": w.refused_changes,
                    "last_refusal": (!w.last_refusal.is_empty()).then_some(&w.last_refusal)})).collect::<Vec<_>>()}),
            Err(e) => json!({"endpoint": ep, "error": e}),
        })
        .collect();
    print(conn.output, json!(j), || demo::status_table(&rows));
    if failures == rows.len() {
        bail!("no endpoint answered");
    }
    Ok(())
}

async fn map(cmd: MapCmd, conn: &Conn) -> Result<()> {
    // Check the arguments before touching the network.
    match &cmd {
        MapCmd::Put { key, value, .. } => {
            parse_hex("key", key)?;
            parse_hex("value", value)?;
        }
        MapCmd::Get { key, .. } | MapCmd::Delete { key, .. } => {
            parse_hex("key", key)?;
        }
        _ => {}
    }
    let c = Client::connect(&conn.endpoints).await?;
    match cmd {
        MapCmd::Declare {
            name,
            map_type,
            key_size,
            value_size,
            max_entries,
        } => {
            let schema = MapSchema {
                name,
                map_type,
                key_size,
                value_size,
                max_entries,
            };
            let r = c.declare(&schema).await?;
            print(conn.output, json!({"index": r.index}), || {
                format!("declared {schema} at index {}", r.index)
            });
        }
        MapCmd::List => {
            let r = c
                .kv()
                .list_maps(pb::ListMapsRequest {})
                .await
                .map_err(from_status)?
                .into_inner();
            let j: Vec<_> = r
                .maps
                .iter()
                .filter_map(|m| m.schema.as_ref().map(|s| (s, m.entries)))
                .map(|(s, n)| {
                    json!({"name": s.name, "type": type_name(s.r#type), "key_size": s.key_size,
                    "value_size": s.value_size, "max_entries": s.max_entries, "entries": n})
                })
                .collect();
            print(conn.output, json!(j), || {
                let mut out = format!(
                    "{:<24} {:<9} {:>8} {:>10} {:>11} {:>9}\n",
                    "NAME", "TYPE", "KEY", "VALUE", "MAX", "ENTRIES"
                );
                for m in &r.maps {
                    if let Some(s) = &m.schema {
                        out.push_str(&format!(
                            "{:<24} {:<9} {:>8} {:>10} {:>11} {:>9}\n",
                            s.name,
                            type_name(s.r#type),
                            s.key_size,
                            s.value_size,
                            s.max_entries,
                            m.entries
                        ));
                    }
                }
                out.trim_end().to_string()
            });
        }
        MapCmd::Put { map, key, value } => {
            let r = c
                .put(&map, parse_hex("key", &key)?, parse_hex("value", &value)?)
                .await?;
            print(conn.output, json!({"index": r.index}), || {
                format!("OK (index {})", r.index)
            });
        }
        MapCmd::Get { map, key, local } => {
            match c.get(&map, parse_hex("key", &key)?, !local).await? {
                Some(v) => print(
                    conn.output,
                    json!({"key": key, "value": hex::encode(&v)}),
                    || hex::encode(&v),
                ),
                None => bail!("key {key} not found in map {map}"),
            }
        }
        MapCmd::Delete { map, key } => {
            let r = c.delete(&map, parse_hex("key", &key)?).await?;
            print(conn.output, json!({"index": r.index}), || {
                format!("OK (index {})", r.index)
            });
        }
        MapCmd::Dump { map, local } => {
            let (_, index, entries) = c.dump(&map, !local).await?;
            let j: Vec<_> = entries
                .iter()
                .map(|(k, v)| json!({"key": hex::encode(k), "value": hex::encode(v)}))
                .collect();
            print(conn.output, json!({"index": index, "entries": j}), || {
                let mut out = String::new();
                for (k, v) in &entries {
                    out.push_str(&format!("{} {}\n", hex::encode(k), hex::encode(v)));
                }
                out.push_str(&format!("# {} entries at index {index}", entries.len()));
                out
            });
        }
        MapCmd::Drop { map } => {
            let r = c
                .admin()
                .drop_map(pb::DropMapRequest { map: map.clone() })
                .await
                .map_err(from_status)?
                .into_inner();
            print(conn.output, json!({"map": map, "index": r.index}), || {
                format!("dropped map {map} at index {}", r.index)
            });
        }
    }
    Ok(())
}

fn type_name(t: i32) -> &'static str {
    match pb::MapType::try_from(t) {
        Ok(pb::MapType::Hash) => "hash",
        Ok(pb::MapType::LruHash) => "lru_hash",
        Ok(pb::MapType::Array) => "array",
        _ => "unknown",
    }
}

async fn agent(a: AgentArgs) -> Result<()> {
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
    if let Some(v) = a.raft_addr {
        cfg.raft_addr = v;
    }
    if let Some(v) = a.api_addr {
        cfg.api_addr = v;
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
