//! Commit throughput and latency of a local 3-node cluster for several numbers of concurrent
//! writers, next to the physical floor measured in the same run: one fsync of 4 KiB on the
//! data dir's file system and one loopback TCP round trip. The cluster runs with mutual TLS
//! and without (`--tls on,off`, one cluster each, in the same run), in alternating rounds
//! (`--rounds`: on then off, then off then on, ...) so drift in the host hits both alike; the
//! cost of TLS is printed as the median over rounds of each round's difference.
//!
//! ```text
//! cargo build --release --bin raftmap --bin cluster-write
//! target/release/cluster-write --writers 1,64 --seconds 5 --rounds 3
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use raftmap_bench::{fsync_floor, median_range, percentile, rtt_floor, us};
use raftmap_jepsen::cluster::{ClusterOptions, LaunchOptions, LocalCluster};
use raftmap_node::storage::MapSchema;

#[derive(Parser, Debug)]
struct Args {
    /// Concurrent writers per run, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    writers: Vec<usize>,
    /// Duration of each run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Operations per write request.
    #[arg(long, default_value_t = 1)]
    ops_per_write: usize,
    /// Voters in the cluster.
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Run the nodes without fsync.
    #[arg(long)]
    no_sync: bool,
    /// The raftmap binary (default: next to this one).
    #[arg(long)]
    raftmap: Option<PathBuf>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Runs with mutual TLS (on) and plaintext (off).
    #[arg(long, value_delimiter = ',', default_value = "on,off")]
    tls: Vec<String>,
    /// Rounds of every mode and writer count; each round reverses the order of the modes.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

struct RunResult {
    writers: usize,
    ops: u64,
    errors: u64,
    secs: f64,
    p50: Duration,
    p99: Duration,
    p999: Duration,
}

async fn run(
    cluster: &LocalCluster,
    writers: usize,
    secs: u64,
    ops_per_write: usize,
    run_id: u64,
) -> Result<RunResult> {
    let ids = cluster.ids();
    let mut tasks = Vec::new();
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    for w in 0..writers {
        // Spread writers over every node; followers forward to the leader.
        let client = cluster.client(ids[w % ids.len()]).await?;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut i = 0u64;
            while Instant::now() < end {
                let ops = (0..ops_per_write)
                    .map(|j| {
                        let k = (run_id << 56) | ((w as u64) << 36) | (i << 8) | j as u64;
                        raftmap_node::put(
                            "bench",
                            k.to_be_bytes().to_vec(),
                            i.to_le_bytes().to_vec(),
                        )
                    })
                    .collect();
                let t = Instant::now();
                match client.write(ops).await {
                    Ok(_) => lat.push(t.elapsed()),
                    Err(_) => errors += 1,
                }
                i += 1;
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await?;
        all.extend(lat);
        errors += e;
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort();
    Ok(RunResult {
        writers,
        ops: (all.len() * ops_per_write) as u64,
        errors,
        secs,
        p50: percentile(&all, 0.5),
        p99: percentile(&all, 0.99),
        p999: percentile(&all, 0.999),
    })
}

/// Sum of a counter over every node's `/metrics`.
fn scrape_counter(cluster: &LocalCluster, name: &str) -> Result<f64> {
    let addrs = cluster
        .ids()
        .into_iter()
        .map(|id| Ok(cluster.node(id)?.metrics_addr.clone()))
        .collect::<Result<Vec<_>>>()?;
    Ok(raftmap_bench::scrape_counter(&addrs, name)?)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let bin = raftmap_bench::raftmap_bin(args.raftmap.as_deref())?;
    let mut agent_args = vec!["--snapshot-logs".to_string(), "100000".to_string()];
    if args.no_sync {
        agent_args.push("--no-sync".into());
    }
    let (fsync50, fsync99) = fsync_floor(&std::env::temp_dir(), 500)?;
    let (rtt50, rtt99) = rtt_floor(2000)?;
    let floor50 = fsync50 + rtt50;
    let floor99 = fsync99 + rtt99;
    println!(
        "floor (same run): fsync 4 KiB p50 {:.0} us p99 {:.0} us; loopback RTT p50 {:.0} us p99 {:.0} us; fsync on: {}",
        us(fsync50),
        us(fsync99),
        us(rtt50),
        us(rtt99),
        !args.no_sync
    );
    println!();
    println!("| tls | writers | ops/write | ops/s | ops/entry | errors | p50 us | p99 us | p99.9 us | p50 / floor | p99 / floor |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut json = Vec::new();
    let mut modes = Vec::new();
    for mode in &args.tls {
        let tls = match mode.as_str() {
            "on" => true,
            "off" => false,
            other => anyhow::bail!("--tls takes on and off, not {other:?}"),
        };
        let cluster = LocalCluster::start(
            ClusterOptions {
                launch: LaunchOptions {
                    agent_args: agent_args.clone(),
                    log_filter: "warn".into(),
                    tls,
                    ..LaunchOptions::new(bin.clone())
                },
                netns: false,
            },
            args.nodes,
            0,
            Duration::from_secs(60),
        )
        .await?;
        cluster
            .client(1)
            .await?
            .declare(&MapSchema::hash("bench", 8, 8, 1 << 24))
            .await?;
        modes.push((mode.clone(), tls, cluster));
    }
    // (writers, tls) -> (ops/s, p50) of each round.
    let mut by_mode: std::collections::BTreeMap<(usize, bool), Vec<(f64, Duration)>> =
        Default::default();
    let mut run_id = 0u64;
    for round in 0..args.rounds {
        let mut order: Vec<&(String, bool, LocalCluster)> = modes.iter().collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for (mode, tls, cluster) in order {
            for &w in &args.writers {
                run_id += 1;
                let entries0 = scrape_counter(cluster, "raftmap_proposals_total")?;
                let (csum0, ccount0) = (
                    scrape_counter(cluster, "raftmap_commit_latency_seconds_sum")?,
                    scrape_counter(cluster, "raftmap_commit_latency_seconds_count")?,
                );
                let r = run(cluster, w, args.seconds, args.ops_per_write, run_id).await?;
                let entries = scrape_counter(cluster, "raftmap_proposals_total")? - entries0;
                // Inside the daemons: from proposing an entry to its being applied on the
                // leader, the part of the client's latency that consensus and storage take.
                let commit_mean = (scrape_counter(cluster, "raftmap_commit_latency_seconds_sum")?
                    - csum0)
                    / (scrape_counter(cluster, "raftmap_commit_latency_seconds_count")? - ccount0)
                        .max(1.0);
                eprintln!(
                    "round {round}, tls {mode}, {w} writers: mean propose-to-applied inside the daemons {:.0} us",
                    commit_mean * 1e6
                );
                let per_entry = r.ops as f64 / entries.max(1.0);
                let rate = r.ops as f64 / r.secs;
                by_mode.entry((w, *tls)).or_default().push((rate, r.p50));
                println!(
                    "| {mode} | {} | {} | {:.0} | {:.1} | {} | {:.0} | {:.0} | {:.0} | {:.1}x | {:.1}x |",
                    r.writers,
                    args.ops_per_write,
                    rate,
                    per_entry,
                    r.errors,
                    us(r.p50),
                    us(r.p99),
                    us(r.p999),
                    r.p50.as_secs_f64() / floor50.as_secs_f64(),
                    r.p99.as_secs_f64() / floor99.as_secs_f64(),
                );
                json.push(serde_json::json!({
                    "round": round, "tls": tls, "writers": r.writers, "ops_per_write": args.ops_per_write, "ops_per_sec": rate, "ops_per_entry": per_entry,
                    "errors": r.errors, "p50_us": us(r.p50), "p99_us": us(r.p99), "p999_us": us(r.p999),
                    "floor_p50_us": us(floor50), "floor_p99_us": us(floor99), "fsync": !args.no_sync,
                }));
            }
        }
    }
    println!();
    for &w in &args.writers {
        let (Some(on), Some(off)) = (by_mode.get(&(w, true)), by_mode.get(&(w, false))) else {
            continue;
        };
        // Round by round: the modes of one round ran next to each other.
        let (t, t0, t1) = median_range(
            on.iter()
                .zip(off)
                .map(|(a, b)| a.0 / b.0.max(1.0))
                .collect(),
        );
        let (d, d0, d1) =
            median_range(on.iter().zip(off).map(|(a, b)| us(a.1) - us(b.1)).collect());
        println!(
            "{w} writers, TLS on/off over {} rounds: throughput {t:.2}x (rounds {t0:.2}..{t1:.2}x), p50 {d:+.0} us (rounds {d0:+.0}..{d1:+.0} us)",
            on.len().min(off.len()),
        );
    }
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}
