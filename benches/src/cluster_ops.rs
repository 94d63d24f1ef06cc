//! Operations an operator waits on, timed on a local 3-node cluster (fsync on): a learner
//! joining a cluster that holds 1M entries until its kernel map holds them all; SIGKILL of the
//! leader under write load until writes commit again; and each node's memory and disk at that
//! size.
//!
//! ```text
//! cargo build --release --bin raftmap --bin cluster-ops
//! target/release/cluster-ops --entries 1000000 --failovers 3
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use raftmap_ebpf_hooks::{KernelMap, MapKind};
use raftmap_jepsen::cluster::{ClusterOptions, LaunchOptions, LocalCluster};
use raftmap_node::proto as pb;
use raftmap_node::storage::MapSchema;

#[derive(Parser, Debug)]
struct Args {
    /// Entries in the map before the learner joins.
    #[arg(long, default_value_t = 1_000_000)]
    entries: u64,
    /// Leader kills to time.
    #[arg(long, default_value_t = 3)]
    failovers: usize,
    /// The raftmap binary (default: next to this one).
    #[arg(long)]
    raftmap: Option<std::path::PathBuf>,
    /// Extra `raftmap agent` arguments, e.g. `--agent-arg=--election-timeout-ms=250`.
    #[arg(long, allow_hyphen_values = true)]
    agent_arg: Vec<String>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

const MAP: &str = "ops";

fn key(i: u64) -> Vec<u8> {
    i.to_be_bytes().to_vec()
}

/// Fills the map with `n` entries through the API: 8 writers, 1000 operations per write.
async fn fill(cluster: &LocalCluster, n: u64) -> Result<Duration> {
    let t0 = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let client = cluster.client(1 + w % 3).await?;
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let start = next.fetch_add(1000, Ordering::Relaxed);
                if start >= n {
                    return Ok::<_, anyhow::Error>(());
                }
                let ops = (start..(start + 1000).min(n))
                    .map(|i| raftmap_node::put(MAP, key(i), key(i * 7)))
                    .collect();
                client.write(ops).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(t0.elapsed())
}

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Bytes under `dir`.
fn disk_bytes(dir: &std::path::Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Kills the leader while writers keep writing through the other nodes; the time from the
/// kill until a write commits again (the longest any writer waited).
async fn failover(cluster: &mut LocalCluster, round: u64) -> Result<(u64, Duration)> {
    let ids = cluster.ids();
    // A healthy cluster: one leader that every node agrees on (a restarted node may call itself
    // leader of its old term for a moment), and every node's log caught up with it (the node
    // killed last round has just restarted; losing the leader while another node lags is a
    // second fault, and a slower election).
    let deadline = Instant::now() + Duration::from_secs(30);
    let old = loop {
        let l = cluster.leader(&ids).await;
        let mut statuses = Vec::new();
        for &id in &ids {
            if let Ok(c) = cluster.client(id).await {
                statuses.extend(c.status().await.ok());
            }
        }
        let committed = statuses.iter().map(|s| s.committed_index).max();
        let agree = l.is_some()
            && statuses.len() == ids.len()
            && statuses.iter().all(|s| {
                s.has_leader && Some(s.leader_id) == l && Some(s.last_log_index) >= committed
            });
        match l {
            Some(l) if agree => break l,
            _ if Instant::now() > deadline => {
                bail!("the nodes did not agree on a leader with every log caught up")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let survivors: Vec<u64> = ids.iter().copied().filter(|&i| i != old).collect();
    let killed_at: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    // Writers that have committed a write: the kill waits until every one of them is going.
    let going = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for (w, &id) in survivors.iter().cycle().take(4).enumerate() {
        let addr = cluster.node(id)?.api_addr.clone();
        let (killed_at, going) = (killed_at.clone(), going.clone());
        let security = cluster.security();
        writers.push(tokio::spawn(async move {
            let ch = security.channel(&addr, raftmap_node::tls::Expect::AnyNode)?;
            let mut kv = pb::kv_client::KvClient::new(ch);
            let mut first_after: Option<Instant> = None;
            let mut committed_once = false;
            let mut i = 0u64;
            // Until a write sent after the kill commits (or 20 s after the kill).
            loop {
                let k = *killed_at.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(k) = k {
                    if first_after.is_some() || k.elapsed() > Duration::from_secs(20) {
                        break;
                    }
                }
                i += 1;
                let k = (round << 48) | ((w as u64) << 32) | i;
                let mut req = tonic::Request::new(pb::WriteRequest {
                    ops: vec![pb::Op {
                        op: Some(raftmap_node::put(MAP, key(k), key(k))),
                    }],
                });
                req.set_timeout(Duration::from_secs(5));
                let sent = Instant::now();
                if kv.write(req).await.is_ok() {
                    if !std::mem::replace(&mut committed_once, true) {
                        going.fetch_add(1, Ordering::Relaxed);
                    }
                    let k = *killed_at.lock().unwrap_or_else(|p| p.into_inner());
                    // A write sent after the kill and committed: the cluster is back.
                    if let Some(k) = k {
                        if sent > k && first_after.is_none() {
                            first_after = Some(Instant::now());
                        }
                    }
                } else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            Ok::<_, anyhow::Error>(first_after)
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while going.load(Ordering::Relaxed) < writers.len() as u64 {
        if Instant::now() > deadline {
            bail!("the writers did not get a write committed before the kill");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    *killed_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    let t_kill = Instant::now();
    cluster.kill(old)?;
    let mut worst = Duration::ZERO;
    for w in writers {
        match w.await?? {
            Some(t) => worst = worst.max(t - t_kill),
            None => bail!("a writer saw no write commit within 20 s of killing the leader"),
        }
    }
    cluster.restart(old)?;
    cluster.wait_ready(old, Duration::from_secs(60)).await?;
    Ok((old, worst))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    raftmap_ebpf_hooks::probe_bpf().map_err(anyhow::Error::msg)?;
    let bin = raftmap_bench::raftmap_bin(args.raftmap.as_deref())?;
    let max_entries = (args.entries * 2).next_power_of_two().min(1 << 26) as u32;
    let learner_map_name = format!("rmops{}", std::process::id() % 100_000);
    let learner_map = KernelMap::create(MapKind::Hash, 8, 8, max_entries, &learner_map_name)?;
    let mut node_args = std::collections::BTreeMap::new();
    node_args.insert(
        4,
        vec!["--watch".to_string(), format!("{MAP}={learner_map_name}")],
    );
    let mut cluster = LocalCluster::start(
        ClusterOptions {
            launch: LaunchOptions {
                bin,
                agent_args: args.agent_arg.clone(),
                log_filter: "warn".into(),
                node_args,
                tls: true,
            },
            netns: false,
        },
        3,
        0,
        Duration::from_secs(60),
    )
    .await?;
    cluster
        .client(1)
        .await?
        .declare(&MapSchema::hash(MAP, 8, 8, max_entries))
        .await?;
    let filled = fill(&cluster, args.entries).await?;
    println!(
        "filled {} entries through the API in {:.1} s ({:.0} ops/s)",
        args.entries,
        filled.as_secs_f64(),
        args.entries as f64 / filled.as_secs_f64()
    );

    // Catch-up: a learner with an empty kernel map joins; until its map holds every entry.
    let t0 = Instant::now();
    cluster.spawn(4, Some(1), true)?;
    let deadline = t0 + Duration::from_secs(300);
    let mut ready_at = None;
    let synced_at = loop {
        if ready_at.is_none() {
            if let Ok(c) = cluster.client(4).await {
                if matches!(c.status().await, Ok(s) if s.ready) {
                    ready_at = Some(t0.elapsed());
                }
            }
        }
        if learner_map.entries().map(|e| e.len() as u64).unwrap_or(0) >= args.entries {
            break t0.elapsed();
        }
        if Instant::now() > deadline {
            bail!("the learner's kernel map did not fill within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "learner: kernel map holds all {} entries {:.2} s after it started (ready after {:.2} s)",
        args.entries,
        synced_at.as_secs_f64(),
        ready_at.unwrap_or(synced_at).as_secs_f64()
    );

    // Footprint at this size.
    println!();
    println!("| node | role | RSS MiB | disk MiB |");
    println!("|---:|---|---:|---:|");
    let mut footprint = Vec::new();
    for id in cluster.ids() {
        let node = cluster.node(id)?;
        let pid = node.pid().unwrap_or(0);
        let (rss, disk) = (rss_bytes(pid), disk_bytes(&node.data_dir));
        let role = if id == 4 {
            "learner (kernel map)"
        } else {
            "voter"
        };
        println!(
            "| {id} | {role} | {:.0} | {:.0} |",
            rss as f64 / (1 << 20) as f64,
            disk as f64 / (1 << 20) as f64
        );
        footprint.push(
            serde_json::json!({"node": id, "role": role, "rss_bytes": rss, "disk_bytes": disk}),
        );
    }

    // Failover.
    println!();
    let mut times = Vec::new();
    for round in 0..args.failovers {
        let (old, t) = failover(&mut cluster, round as u64 + 1).await?;
        println!(
            "failover {}: killed leader n{old}; writes committed again after {:.0} ms",
            round + 1,
            t.as_secs_f64() * 1e3
        );
        times.push(t);
    }
    times.sort();
    if let (Some(median), Some(max)) = (times.get(times.len() / 2), times.last()) {
        println!(
            "failover: median {:.0} ms, max {:.0} ms (agent arguments: {})",
            median.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3,
            if args.agent_arg.is_empty() {
                "defaults: heartbeat 100 ms, election timeout 500 ms".to_string()
            } else {
                args.agent_arg.join(" ")
            }
        );
    }
    if let Some(path) = &args.json {
        let j = serde_json::json!({
            "entries": args.entries, "fill_secs": filled.as_secs_f64(),
            "learner_synced_secs": synced_at.as_secs_f64(),
            "learner_ready_secs": ready_at.map(|d| d.as_secs_f64()),
            "footprint": footprint,
            "failover_ms": times.iter().map(|t| t.as_secs_f64() * 1e3).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&j)?)?;
    }
    cluster.stop_all();
    Ok(())
}
