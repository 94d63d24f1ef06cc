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
        /// Keys in use at a time. Register runs move clients to a fresh key after 100
        /// operations on one, so that each key's history stays decidable.
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
        /// One more argument for every node (repeat it), such as
        /// `--agent-arg=--capture-backend=fexit`.
        #[arg(long = "agent-arg", allow_hyphen_values = true)]
        agent_args: Vec<String>,
    },
    /// Check a register history written by an earlier run (`history.jsonl`) for
    /// linearizability again, key by key; exits non-zero unless every key is shown
    /// linearizable.
    Check {
        history: PathBuf,
        /// Seconds the search of one key may take.
        #[arg(long, default_value_t = 20)]
        key_time_limit: u64,
    },
}

/// `raftmap-jepsen check`.
fn check_history(path: &std::path::Path, key_time_limit: u64) -> Result<()> {
    use raftmap_jepsen::{check_key_within, operations, parse, Budget};
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let ops = operations(&parse(&text)?)?;
    let mut keys: std::collections::BTreeMap<u64, Vec<_>> = Default::default();
    for o in ops {
        keys.entry(o.key).or_default().push(o);
    }
    let budget = Budget {
        max_time: Duration::from_secs(key_time_limit),
        ..Budget::default()
    };
    let mut bad = 0;
    for (key, ops) in &keys {
        let started = std::time::Instant::now();
        let verdict = check_key_within(*key, ops, budget);
        let took = started.elapsed();
        match verdict {
            Verdict::Linearizable => {
                println!(
                    "key {key}: {} operations, linearizable ({took:.2?})",
                    ops.len()
                )
            }
            Verdict::Unknown { reason, .. } => {
                bad += 1;
                println!("key {key}: {} operations, UNDECIDED ({reason})", ops.len());
            }
            Verdict::NotLinearizable { op, .. } => {
                bad += 1;
                println!(
                    "key {key}: {} operations, NOT LINEARIZABLE at {:?} by process {}",
                    ops.len(),
                    op.f,
                    op.process
                );
            }
        }
    }
    if bad > 0 {
        println!(
            "INVALID: {bad} of {} keys not shown linearizable",
            keys.len()
        );
        std::process::exit(1);
    }
    println!("valid: {} keys", keys.len());
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let cmd = Cli::parse().cmd;
    if let Cmd::Check {
        history,
        key_time_limit,
    } = &cmd
    {
        return check_history(history, *key_time_limit);
    }
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
        agent_args,
    } = cmd
    else {
        return Ok(());
    };
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
        agent_args,
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
        if let Verdict::Unknown { key, ops, reason } = v {
            println!(
                "UNDECIDED on key {key}: the linearizability search of its {ops} operations stopped ({reason}); the run proves nothing about it"
            );
        }
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
    match report.recovery.took_s {
        Some(t) => println!(
            "recovery: every live member served a write and a linearizable read {t:.2} s after the faults were healed (bound {} s)",
            report.recovery.bound_s
        ),
        None => println!(
            "NOT RECOVERED within {} s of the faults being healed: {}",
            report.recovery.bound_s,
            report.recovery.failed.join("; ")
        ),
    }
    if !report.outages.is_empty() {
        let total: f64 = report.outages.iter().map(|o| o.length_s).sum();
        println!(
            "no operation succeeded for {total:.1} s in {} stretches of 1 s or more (results.json has each, with its faults)",
            report.outages.len()
        );
    }
    if !report.valid {
        println!("INVALID");
        std::process::exit(1);
    }
    println!("valid");
    Ok(())
}
