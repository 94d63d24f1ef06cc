//! The ceiling of one leader: every learner is one more AppendEntries stream from the leader.
//! Three voters in network namespaces take a fixed write rate through the API while learners
//! are added (1, 2, 4, 8, ...); for each count the bench reports what the leader spends: CPU
//! (user + system time of its process) and bytes sent (its veth, so TLS, HTTP/2, TCP and IP
//! included), the marginal cost of one learner against the run with none (measured in the same
//! run), and that cost per replicated write. `deploy/README.md` turns these into learners per
//! leader at a given write rate and NIC.
//!
//! ```text
//! cargo build --release --bin raftmap --bin fanout
//! target/release/fanout --learners 0,1,2,4,8,16 --rate 2000 --seconds 5
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use raftmap_jepsen::cluster::{ClusterOptions, LaunchOptions, LocalCluster};
use raftmap_node::storage::{MapSchema, NodeId};

#[derive(Parser, Debug)]
struct Args {
    /// Learner counts to measure, ascending (0 is the baseline the others are compared with).
    #[arg(long, value_delimiter = ',', default_value = "0,1,2,4,8,16")]
    learners: Vec<usize>,
    /// Writes per second offered to the cluster (one put each).
    #[arg(long, default_value_t = 2000)]
    rate: u64,
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
    cpu: f64,
    egress: f64,
    p50: Duration,
}

/// Offers `rate` writes per second for `secs` through a client of the leader; measures the
/// leader's CPU and egress meanwhile.
async fn measure(
    cluster: &LocalCluster,
    leader: NodeId,
    args: &Args,
    learners: usize,
    round: u64,
) -> Result<Sample> {
    let pid = cluster.node(leader)?.pid().context("the leader runs")?;
    let client = cluster.client(leader).await?;
    let (cpu0, tx0) = (cpu_time(pid)?, sent_bytes(cluster, leader)?);
    let start = Instant::now();
    let every = Duration::from_secs_f64(1.0 / args.rate as f64);
    let total = args.rate * args.seconds;
    let mut tasks = tokio::task::JoinSet::new();
    let value = vec![0x5a; args.value_size];
    for i in 0..total {
        // Paced by the clock, not by the answers: an open loop, as kernel writes are.
        let due = start + every * i as u32;
        tokio::time::sleep_until(due.into()).await;
        let (c, value) = (client.clone(), value.clone());
        let mut key = vec![0u8; 16];
        key[..8].copy_from_slice(&round.to_be_bytes());
        key[8..].copy_from_slice(&i.to_be_bytes());
        tasks.spawn(async move {
            let t = Instant::now();
            c.put("fanout", key, value).await.map(|_| t.elapsed())
        });
    }
    let mut lat = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(d) = r? {
            lat.push(d);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let (cpu, tx) = (cpu_time(pid)? - cpu0, sent_bytes(cluster, leader)? - tx0);
    lat.sort();
    Ok(Sample {
        learners,
        writes_per_sec: lat.len() as f64 / secs,
        cpu: cpu.as_secs_f64() / secs,
        egress: tx as f64 / secs,
        p50: raftmap_bench::percentile(&lat, 0.5),
    })
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
        "3 voters with mutual TLS in network namespaces; {} writes/s of a 16 B key and {} B value offered; {} s per count",
        args.rate, args.value_size, args.seconds
    );
    println!();
    println!("| learners | writes/s | p50 | leader CPU (cores) | leader egress (MB/s) | per learner: CPU (cores) | per learner: egress (KB/s) | per learner and write: CPU | per learner and write: bytes |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut samples: Vec<Sample> = Vec::new();
    let mut json = Vec::new();
    let mut next_id = 4;
    for (round, &n) in args.learners.iter().enumerate() {
        while (next_id - 4) < n as u64 {
            cluster.spawn(next_id, Some(1), true)?;
            cluster.wait_ready(next_id, Duration::from_secs(60)).await?;
            next_id += 1;
        }
        let leader = cluster
            .leader(&[1, 2, 3])
            .await
            .context("no voter says it leads")?;
        let s = measure(&cluster, leader, &args, n, round as u64).await?;
        let base = samples.first().filter(|b| b.learners == 0);
        let (cpu_each, egress_each) = match base {
            Some(b) if n > 0 => ((s.cpu - b.cpu) / n as f64, (s.egress - b.egress) / n as f64),
            _ => (f64::NAN, f64::NAN),
        };
        let rate = s.writes_per_sec.max(1.0);
        println!(
            "| {n} | {:.0} | {:.1} ms | {:.3} | {:.2} | {:.4} | {:.1} | {:.1} us | {:.0} B |",
            s.writes_per_sec,
            s.p50.as_secs_f64() * 1e3,
            s.cpu,
            s.egress / 1e6,
            cpu_each,
            egress_each / 1e3,
            cpu_each / rate * 1e6,
            egress_each / rate,
        );
        json.push(serde_json::json!({
            "learners": n, "writes_per_sec": s.writes_per_sec, "p50_us": raftmap_bench::us(s.p50),
            "leader_cpu_cores": s.cpu, "leader_egress_bytes_per_sec": s.egress,
            "per_learner_cpu_cores": cpu_each, "per_learner_egress_bytes_per_sec": egress_each,
            "per_learner_write_cpu_us": cpu_each / rate * 1e6, "per_learner_write_bytes": egress_each / rate,
        }));
        samples.push(s);
    }
    if let (Some(b), Some(last)) = (samples.first(), samples.last()) {
        if b.learners == 0 && last.learners > 0 {
            let n = last.learners as f64;
            let rate = last.writes_per_sec.max(1.0);
            let cpu_w = (last.cpu - b.cpu) / n / rate;
            let bytes_w = (last.egress - b.egress) / n / rate;
            println!();
            println!(
                "one learner costs the leader {:.1} us of CPU and {:.0} bytes on the wire per replicated write (marginal, over {} learners)",
                cpu_w * 1e6,
                bytes_w,
                last.learners
            );
            for (rate, nic) in [(10_000.0, 1.25e9), (100_000.0, 1.25e9), (10_000.0, 3.125e9)] {
                println!(
                    "  at {rate:.0} writes/s: a {:.0} Gb/s NIC carries {:.0} learners; one core of leader CPU serves {:.0}",
                    nic * 8.0 / 1e9,
                    nic / (bytes_w * rate),
                    1.0 / (cpu_w * rate)
                );
            }
        }
    }
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    }
    cluster.stop_all();
    Ok(())
}
