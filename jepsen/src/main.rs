//! `raftmap-jepsen test ...`: one fault-injection run, reproducible by seed; exits non-zero on
//! any anomaly.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use raftmap_jepsen::nemesis::Fault;
use raftmap_jepsen::run::{run, RunConfig, Workload};
use raftmap_jepsen::Verdict;

#[derive(Parser, Debug)]
#[command(
    name = "raftmap-jepsen",
    about = "Fault injection against a local raftmap cluster"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run one test and check its history.
    Test {
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// Seconds of load.
        #[arg(long, default_value_t = 20)]
        time_limit: u64,
        /// Workload: register (read, write, compare-and-swap per key; linearizability), set
        /// (unique adds, then a final read; lost and unexpected elements) or kernel-map (writes
        /// into the nodes' BPF maps; convergence, order, lost writes).
        #[arg(long, default_value = "register")]
        workload: Workload,
        /// Faults, comma separated: kill, pause, partition, membership. Up to two run at once.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "partition,kill,pause,membership"
        )]
        nemesis: Vec<Fault>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 4)]
        keys: u64,
        #[arg(long, default_value_t = 6)]
        clients: u64,
        /// Where the history and results go.
        #[arg(long, default_value = "jepsen-out")]
        out: PathBuf,
        /// The raftmap binary (default: next to this one).
        #[arg(long)]
        raftmap: Option<PathBuf>,
        /// Run the nodes in a deliberately unsafe mode (reads without read-index).
        #[arg(long)]
        unsafe_local_reads: bool,
        /// Run the nodes on loopback instead of network namespaces (no partitions).
        #[arg(long)]
        loopback: bool,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let Cmd::Test {
        nodes,
        time_limit,
        workload,
        nemesis,
        seed,
        keys,
        clients,
        out,
        raftmap,
        unsafe_local_reads,
        loopback,
    } = Cli::parse().cmd;
    let bin = match raftmap {
        Some(b) => b,
        None => std::env::current_exe()?
            .parent()
            .context("binary has no directory")?
            .join("raftmap"),
    };
    anyhow::ensure!(
        bin.exists(),
        "the raftmap binary is not at {}: build it first (`cargo build --bin raftmap`) or pass --raftmap PATH",
        bin.display()
    );
    let cfg = RunConfig {
        workload,
        bin,
        nodes,
        time_limit: Duration::from_secs(time_limit),
        keys,
        clients,
        faults: nemesis,
        seed,
        unsafe_local_reads,
        loopback,
    };
    let report = run(&cfg).await?;
    report
        .write_to(&out)
        .with_context(|| format!("writing the run's output to {}", out.display()))?;
    println!(
        "seed {seed}: {} ok, {} fail, {} info; {} faults injected ({}); network: {}; output in {}",
        report.ops_ok,
        report.ops_fail,
        report.ops_info,
        report.fault_log.len(),
        report
            .fault_log
            .iter()
            .map(|f| f.what.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        report.network,
        out.display()
    );
    for v in &report.anomalies {
        if let Verdict::NotLinearizable {
            key,
            op,
            concurrent,
            placed,
        } = v
        {
            println!(
                "NOT LINEARIZABLE on key {key}: {:?} by process {} at [{}, {:?}] cannot be placed after {} operations; concurrent: {:?}",
                op.f,
                op.process,
                op.call,
                op.ret,
                placed.len(),
                concurrent.iter().map(|o| (&o.f, o.process)).collect::<Vec<_>>()
            );
        }
    }
    if let Some(set) = &report.set {
        println!(
            "set: {} attempted, {} acknowledged, {} in the final read, {} lost, {} unexpected, {} of unknown outcome recovered",
            set.attempted,
            set.acknowledged,
            set.final_size,
            set.lost.len(),
            set.unexpected.len(),
            set.recovered
        );
    }
    for (i, ops) in report.smallest_failing.iter().enumerate() {
        println!(
            "smallest failing sub-history {} ({} operations):",
            i + 1,
            ops.len()
        );
        for o in ops {
            println!(
                "  process {} {:?} [{}, {:?}]",
                o.process, o.f, o.call, o.ret
            );
        }
    }
    if let Some(k) = &report.kernel {
        println!(
            "kernel maps: {} writes, {} deletes; {} committed changes in {} entries; converged: {} ({} entries); {} lost, {} replaced on their node before capture, {} superseded by a later commit, {} out of order, {} observations checked, {} divergent indexes, {} stream gaps",
            k.writes,
            k.deletes,
            k.committed_changes,
            k.committed_entries,
            k.converged,
            k.final_entries,
            k.lost.len(),
            k.coalesced,
            k.superseded,
            k.out_of_order.len(),
            k.observations,
            k.divergent_indexes.len(),
            k.stream_gaps
        );
    }
    if let Some(k) = report.kernel.as_ref().filter(|k| !k.unconverged.is_empty()) {
        println!(
            "kernel maps still differing from the committed contents: nodes {:?}",
            k.unconverged
        );
        for s in &k.statuses {
            println!("  {s}");
        }
    }
    if !report.valid {
        println!("INVALID");
        std::process::exit(1);
    }
    println!("valid");
    Ok(())
}
