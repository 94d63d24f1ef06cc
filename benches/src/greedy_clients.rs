//! What greedy and broken clients cost a 3-node cluster, against the same cluster without them
//! in the same run:
//!
//! - **Watchers**: 1,000 watch streams opened on one node and never read (past the cap of 256
//!   they are refused with RESOURCE_EXHAUSTED), plus one client process that opens a watch and is
//!   then frozen with SIGSTOP. Figures: how many were refused, the node's memory, and the write
//!   latency other clients see, with and without them.
//! - **Compare-and-swap**: a batch of failing compare-and-swaps against keys with 64 KiB values
//!   (each would list its 64 KiB actual value): the answer's size and every node's memory.
//!
//! ```text
//! cargo build --release --bin raftmap --bin greedy-clients
//! target/release/greedy-clients --seconds 5
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use raftmap_bench::{percentile, raftmap_bin, us};
use raftmap_jepsen::cluster::{ClusterOptions, LaunchOptions, LocalCluster};
use raftmap_node::proto as pb;
use raftmap_node::storage::MapSchema;

#[derive(Parser, Debug)]
struct Args {
    /// Seconds of writes in each of the two latency runs.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Watch streams to open and never read.
    #[arg(long, default_value_t = 1000)]
    watchers: usize,
    /// Keys of 64 KiB for the compare-and-swap case (also the batch's size).
    #[arg(long, default_value_t = 2000)]
    cas_keys: u64,
    #[arg(long)]
    raftmap: Option<PathBuf>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// (Internal) open a watch on API address ADDR and hold it: the process to freeze.
    #[arg(long, hide = true)]
    hold_watch: Option<String>,
    /// (Internal) the client certificate for --hold-watch.
    #[arg(long, hide = true)]
    hold_watch_tls: Option<PathBuf>,
}

/// Resident memory now and at its peak (kB) of a node's process.
fn rss_kb(c: &LocalCluster, id: u64) -> Result<(u64, u64)> {
    let pid = c.node(id)?.pid().context("node not running")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

/// Writes from four clients (spread over the nodes) for `secs`: per-write latencies, sorted.
async fn write_latencies(c: &LocalCluster, secs: u64, run: u64) -> Result<Vec<Duration>> {
    let end = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let client = c.client(1 + w % 3).await?;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0u64;
            while Instant::now() < end {
                let k = (run << 56) | (w << 40) | i;
                let t = Instant::now();
                if client
                    .put("m", k.to_be_bytes().to_vec(), i.to_be_bytes().to_vec())
                    .await
                    .is_ok()
                {
                    lat.push(t.elapsed());
                }
                i += 1;
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    all.sort_unstable();
    Ok(all)
}

async fn hold_watch(addr: &str, tls: Option<&std::path::Path>) -> Result<()> {
    let security = match tls {
        Some(d) => raftmap_node::tls::Security::from_dir(d)?,
        None => raftmap_node::tls::Security::insecure(),
    };
    let client = raftmap_node::Client::connect(&[addr.to_string()], &security).await?;
    let mut stream = client
        .kv()
        .watch(pb::WatchRequest {
            map: "m".into(),
            after_index: 0,
        })
        .await?
        .into_inner();
    let _ = stream.message().await?;
    println!("holding");
    // Frozen from outside from here on; never reads again.
    tokio::time::sleep(Duration::from_secs(3600)).await;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(addr) = &args.hold_watch {
        return hold_watch(addr, args.hold_watch_tls.as_deref()).await;
    }
    let opts = ClusterOptions {
        launch: LaunchOptions {
            bin: raftmap_bin(args.raftmap.as_deref())?,
            agent_args: vec![],
            log_filter: "warn".into(),
            node_args: Default::default(),
            tls: true,
        },
        netns: false,
    };
    let c = LocalCluster::start(opts, 3, 0, Duration::from_secs(60)).await?;
    let client = c.client(1).await?;
    client.declare(&MapSchema::hash("m", 8, 8, 1 << 20)).await?;
    client
        .declare(&MapSchema::hash("big", 8, 64 * 1024, 1 << 20))
        .await?;

    // Watchers.
    let base = write_latencies(&c, args.seconds, 1).await?;
    let (rss0, _) = rss_kb(&c, 1)?;
    // The frozen one first: a process of its own, stopped once its watch is open.
    let mut frozen = std::process::Command::new(std::env::current_exe()?)
        .args(["--hold-watch", &c.node(1)?.api_addr])
        .args(
            c.security()
                .dir()
                .map(|d| vec!["--hold-watch-tls".into(), d.display().to_string()])
                .unwrap_or_default(),
        )
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    {
        use std::io::BufRead;
        let out = frozen.stdout.take().context("no stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line)?;
        anyhow::ensure!(
            line.trim() == "holding",
            "the frozen watcher did not start: {line:?}"
        );
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(frozen.id() as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )?;
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..args.watchers {
        match client
            .kv()
            .watch(pb::WatchRequest {
                map: "m".into(),
                after_index: 0,
            })
            .await
        {
            Ok(s) => held.push(s.into_inner()),
            Err(s) if s.code() == tonic::Code::ResourceExhausted => refused += 1,
            Err(s) => anyhow::bail!("watch: {s}"),
        }
    }
    let loaded = write_latencies(&c, args.seconds, 2).await?;
    let (rss1, hwm1) = rss_kb(&c, 1)?;
    let _ = frozen.kill();
    let _ = frozen.wait();
    drop(held);
    let p = |v: &[Duration], q| us(percentile(v, q));
    println!(
        "| writes from 4 clients | writes | p50 | p99 |\n|---|---:|---:|---:|\n| no watchers | {} | {:.0} us | {:.0} us |\n| {} watchers asked ({} refused, RESOURCE_EXHAUSTED) + 1 frozen | {} | {:.0} us | {:.0} us |",
        base.len(),
        p(&base, 0.5),
        p(&base, 0.99),
        args.watchers,
        refused,
        loaded.len(),
        p(&loaded, 0.5),
        p(&loaded, 0.99)
    );
    let ratio = p(&loaded, 0.99) / p(&base, 0.99).max(1.0);
    println!(
        "p99 with the watchers / without: {ratio:.2}x; node 1 RSS {} MiB -> {} MiB (peak {} MiB)",
        rss0 / 1024,
        rss1 / 1024,
        hwm1 / 1024
    );

    // Compare-and-swap against 64 KiB values.
    for chunk in (0..args.cas_keys).collect::<Vec<_>>().chunks(120) {
        let ops = chunk
            .iter()
            .map(|&i| raftmap_node::put("big", i.to_be_bytes().to_vec(), vec![i as u8; 64 * 1024]))
            .collect();
        client.write(ops).await?;
    }
    let before: Vec<(u64, u64)> = (1..=3).map(|id| rss_kb(&c, id)).collect::<Result<_>>()?;
    let ops = (0..args.cas_keys.min(10_000))
        .map(|i| {
            pb::op::Op::Cas(pb::CompareAndSwap {
                map: "big".into(),
                key: i.to_be_bytes().to_vec(),
                expected: None,
                new_value: None,
            })
        })
        .collect();
    let r = client.write(ops).await?;
    let after: Vec<(u64, u64)> = (1..=3).map(|id| rss_kb(&c, id)).collect::<Result<_>>()?;
    let listed: usize = r
        .mismatches
        .iter()
        .map(|m| m.actual.as_ref().map_or(0, Vec::len))
        .sum();
    let growth: Vec<u64> = before
        .iter()
        .zip(&after)
        .map(|((_, h0), (_, h1))| h1.saturating_sub(*h0) / 1024)
        .collect();
    println!(
        "{} failing compare-and-swaps over 64 KiB values: {} mismatches listed ({} KiB of values), {} omitted; peak RSS growth per node {:?} MiB (unbounded, the answer alone would be {} MiB)",
        args.cas_keys.min(10_000),
        r.mismatches.len(),
        listed / 1024,
        r.mismatches_omitted,
        growth,
        args.cas_keys.min(10_000) * 64 / 1024
    );
    if let Some(path) = &args.json {
        let j = serde_json::json!({
            "watchers": {"asked": args.watchers, "refused": refused,
                "p50_us_without": p(&base, 0.5), "p99_us_without": p(&base, 0.99),
                "p50_us_with": p(&loaded, 0.5), "p99_us_with": p(&loaded, 0.99),
                "p99_ratio": ratio, "rss_mib_before": rss0 / 1024, "rss_mib_after": rss1 / 1024},
            "cas": {"ops": args.cas_keys.min(10_000), "listed": r.mismatches.len(),
                "listed_kib": listed / 1024, "omitted": r.mismatches_omitted,
                "peak_rss_growth_mib": growth},
        });
        std::fs::write(path, serde_json::to_string_pretty(&j)?)?;
    }
    Ok(())
}
