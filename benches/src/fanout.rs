//! The ceiling of one leader: every learner is one more AppendEntries stream from the leader.
//! Three voters in network namespaces take a fixed write rate through the API while learners
//! are added (1, 2, 4, 8, ...); for each count the bench reports what the leader spends: CPU
//! (user + system time of its process) and bytes sent (its veth: TLS, HTTP/2, TCP and IP
//! included). Requests are paced (an open loop) and each carries `--ops-per-write` puts, so
//! that the log's entries per second stay the same across counts (the table shows them); the
//! marginal cost of one learner is the slope of a least-squares line over the counts, per
//! entry and per operation. Learners run without fsync: it is not the leader's cost, and the
//! host's two cores are shared by every process. `deploy/README.md` turns the figures into
//! learners per leader at a given write rate and NIC.
//!
//! ```text
//! cargo build --release --bin raftmap --bin fanout
//! target/release/fanout --learners 0,1,2,4,8 --rate 100 --ops-per-write 10 --seconds 5
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use raftmap_jepsen::cluster::{ClusterOptions, LaunchOptions, LocalCluster};
use raftmap_node::storage::{MapSchema, NodeId};

#[derive(Parser, Debug)]
struct Args {
    /// Learner counts to measure, ascending.
    #[arg(long, value_delimiter = ',', default_value = "0,1,2,4,8")]
    learners: Vec<usize>,
    /// Write requests per second offered to the cluster.
    #[arg(long, default_value_t = 100)]
    rate: u64,
    /// Puts per write request.
    #[arg(long, default_value_t = 10)]
    ops_per_write: u64,
    /// Value size of each put (the key is 16 bytes).
    #[arg(long, default_value_t = 64)]
    value_size: usize,
    /// Duration of each measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// The raftmap binary (default: next to this one).
    #[arg(long)]
    raftmap: Option<PathBuf>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// CPU time (user + system) of a process so far.
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("/proc/PID/stat without a command name")?
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of stat, 11 and 12 after the command name.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?
        .context("no clock tick rate")? as u64;
    Ok(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// Bytes node `id` has sent, counted on the bridge side of its veth.
fn sent_bytes(cluster: &LocalCluster, id: NodeId) -> Result<u64> {
    let link = cluster
        .netns()
        .context("the nodes run in network namespaces")?
        .host_link(id);
    let text = std::fs::read_to_string(format!("/sys/class/net/{link}/statistics/rx_bytes"))?;
    Ok(text.trim().parse()?)
}

struct Sample {
    learners: usize,
    writes_per_sec: f64,
    entries_per_sec: f64,
    cpu: f64,
    egress: f64,
    p50: Duration,
}

/// Offers `rate` write requests per second for `secs` through a client of the leader;
/// measures the leader's CPU, egress and log entries meanwhile.
async fn measure(
    cluster: &LocalCluster,
    leader: NodeId,
    args: &Args,
    learners: usize,
    round: u64,
) -> Result<Sample> {
    let node = cluster.node(leader)?;
    let pid = node.pid().context("the leader runs")?;
    let metrics = [node.metrics_addr.clone()];
    let entries = || raftmap_bench::scrape_counter(&metrics, "raftmap_proposals_total");
    let client = cluster.client(leader).await?;
    let (cpu0, tx0, e0) = (cpu_time(pid)?, sent_bytes(cluster, leader)?, entries()?);
    let start = Instant::now();
    let every = Duration::from_secs_f64(1.0 / args.rate as f64);
    let total = args.rate * args.seconds;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        // Paced by the clock, not by the answers: an open loop, as kernel writes are.
        let due = start + every * i as u32;
        tokio::time::sleep_until(due.into()).await;
        let c = client.clone();
        let ops = (0..args.ops_per_write)
            .map(|j| {
                let mut key = vec![0u8; 16];
                key[..8].copy_from_slice(&round.to_be_bytes());
                key[8..].copy_from_slice(&(i * args.ops_per_write + j).to_be_bytes());
                raftmap_node::put("fanout", key, vec![0x5a; args.value_size])
            })
            .collect();
        tasks.spawn(async move {
            let t = Instant::now();
            c.write(ops).await.map(|_| t.elapsed())
        });
    }
    let mut lat = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(d) = r? {
            lat.push(d);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_time(pid)? - cpu0;
    let tx = sent_bytes(cluster, leader)? - tx0;
    let e = entries()? - e0;
    lat.sort();
    Ok(Sample {
        learners,
        writes_per_sec: lat.len() as f64 / secs,
        entries_per_sec: e / secs,
        cpu: cpu.as_secs_f64() / secs,
        egress: tx as f64 / secs,
        p50: raftmap_bench::percentile(&lat, 0.5),
    })
}

/// The least-squares slope of `y` over `x`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (mx, my) = (
        points.iter().map(|p| p.0).sum::<f64>() / n,
        points.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let cov: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let var: f64 = points.iter().map(|(x, _)| (x - mx).powi(2)).sum();
    cov / var
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let bin = raftmap_bench::raftmap_bin(args.raftmap.as_deref())?;
    anyhow::ensure!(
        args.learners.windows(2).all(|w| w[0] < w[1]),
        "--learners must be ascending"
    );
    let mut cluster = LocalCluster::start(
        ClusterOptions {
            launch: LaunchOptions {
                agent_args: vec!["--snapshot-logs".into(), "1000000".into()],
                log_filter: "warn".into(),
                ..LaunchOptions::new(bin)
            },
            netns: true,
        },
        3,
        0,
        Duration::from_secs(60),
    )
    .await?;
    cluster
        .client(1)
        .await?
        .declare(&MapSchema::hash(
            "fanout",
            16,
            args.value_size as u32,
            1 << 24,
        ))
        .await?;
    println!(
        "3 voters with mutual TLS in network namespaces; {} write requests/s of {} puts (16 B key, {} B value) offered; {} s per count",
        args.rate, args.ops_per_write, args.value_size, args.seconds
    );
    println!();
    println!(
        "| learners | writes/s | entries/s | p50 | leader CPU (cores) | leader egress (KB/s) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    let mut samples: Vec<Sample> = Vec::new();
    let mut json = Vec::new();
    let mut next_id = 4;
    for (round, &n) in args.learners.iter().enumerate() {
        while (next_id - 4) < n as u64 {
            cluster.set_node_args(next_id, vec!["--no-sync".into()]);
            cluster.spawn(next_id, Some(1), true)?;
            cluster.wait_ready(next_id, Duration::from_secs(60)).await?;
            next_id += 1;
        }
        let leader = cluster
            .leader(&[1, 2, 3])
            .await
            .context("no voter says it leads")?;
        let s = measure(&cluster, leader, &args, n, round as u64).await?;
        println!(
            "| {n} | {:.0} | {:.0} | {:.1} ms | {:.3} | {:.0} |",
            s.writes_per_sec,
            s.entries_per_sec,
            s.p50.as_secs_f64() * 1e3,
            s.cpu,
            s.egress / 1e3,
        );
        json.push(serde_json::json!({
            "learners": n, "writes_per_sec": s.writes_per_sec, "entries_per_sec": s.entries_per_sec,
            "p50_us": raftmap_bench::us(s.p50), "leader_cpu_cores": s.cpu,
            "leader_egress_bytes_per_sec": s.egress,
        }));
        samples.push(s);
    }
    if samples.len() >= 2 {
        let points = |f: fn(&Sample) -> f64| -> Vec<(f64, f64)> {
            samples.iter().map(|s| (s.learners as f64, f(s))).collect()
        };
        let cpu = slope(&points(|s| s.cpu));
        let egress = slope(&points(|s| s.egress));
        let entries = samples.iter().map(|s| s.entries_per_sec).sum::<f64>() / samples.len() as f64;
        let ops = samples.iter().map(|s| s.writes_per_sec).sum::<f64>() / samples.len() as f64
            * args.ops_per_write as f64;
        println!();
        println!(
            "one learner (slope over {} counts) costs the leader {:.4} cores and {:.1} KB/s at {:.0} entries/s ({:.0} ops/s): {:.1} us of CPU and {:.0} bytes on the wire per entry, {:.0} bytes per operation",
            samples.len(),
            cpu,
            egress / 1e3,
            entries,
            ops,
            cpu / entries.max(1.0) * 1e6,
            egress / entries.max(1.0),
            egress / ops.max(1.0),
        );
        json.push(serde_json::json!({
            "per_learner_cpu_cores": cpu, "per_learner_egress_bytes_per_sec": egress,
            "entries_per_sec": entries, "ops_per_sec": ops,
            "per_learner_cpu_us_per_entry": cpu / entries.max(1.0) * 1e6,
            "per_learner_bytes_per_entry": egress / entries.max(1.0),
            "per_learner_bytes_per_op": egress / ops.max(1.0),
        }));
    }
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    }
    cluster.stop_all();
    Ok(())
}
