//! What capture costs a kernel map update: nanoseconds per bpf(2) update with no hook attached,
//! then with a capture backend attached and watching the map (its events drained by a reader,
//! as the daemon does), and for an update of a map the backend does not watch. The updates come
//! from a child process (the backends ignore the daemon's own process). The baseline is
//! measured in the same run, before and after, median of several rounds.
//!
//! ```text
//! cargo build --release --bin capture-overhead
//! target/release/capture-overhead                     # syscall backend, natively
//! scripts/vm-run.sh target/release/capture-overhead --backend fexit   # in the QEMU guest
//! ```
//!
//! In the guest the CPU is emulated (TCG): absolute figures are meaningless there, the ratio
//! to the baseline measured in the same guest is the figure to read.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use raftmap_ebpf_hooks::Capture;
use raftmap_ebpf_hooks::{KernelMap, MapKind, UpdateFlags};

#[derive(Parser, Debug)]
struct Args {
    /// Capture backend: syscall or fexit.
    #[arg(long, default_value = "syscall")]
    backend: String,
    /// Updates per round.
    #[arg(long, default_value_t = 200_000)]
    updates: u64,
    /// Rounds of each kind (the median is reported).
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// (Internal) Be the writer: update the map with this name and print ns per update.
    #[arg(long, hide = true)]
    child_write: Option<String>,
}

/// Runs one round of updates in a child process; its ns per update.
fn round(name: &str, updates: u64) -> Result<f64> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(["--child-write", name, "--updates", &updates.to_string()])
        .output()?;
    if !out.status.success() {
        bail!(
            "writer failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// Nanoseconds per update of `n` updates cycling over 4096 keys.
fn ns_per_update(map: &KernelMap, n: u64) -> Result<f64> {
    let start = Instant::now();
    for i in 0..n {
        let k = (i % 4096).to_le_bytes();
        map.update(&k, &i.to_le_bytes(), UpdateFlags::Any)?;
    }
    Ok(start.elapsed().as_nanos() as f64 / n as f64)
}

/// The maps' names (unique among loaded maps while the bench runs).
const W: &str = "rm_bench_w";
const O: &str = "rm_bench_o";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(name) = &args.child_write {
        let map = KernelMap::open_by_name(name)?;
        println!("{}", ns_per_update(&map, args.updates)?);
        return Ok(());
    }
    raftmap_ebpf_hooks::probe_bpf().map_err(anyhow::Error::msg)?;
    let watched = KernelMap::create(MapKind::Hash, 8, 8, 8192, W)?;
    let other = KernelMap::create(MapKind::Hash, 8, 8, 8192, O)?;
    // Warm both maps (every key present: updates replace, as a conntrack map's mostly do).
    ns_per_update(&watched, 8192)?;
    ns_per_update(&other, 8192)?;

    let mut base = Vec::new();
    for _ in 0..args.rounds {
        base.push(round(W, args.updates)?);
    }
    let mut cap = match args.backend.as_str() {
        "syscall" => Capture::syscall(),
        "fexit" => Capture::fexit(),
        other => bail!("unknown backend {other:?}: expected syscall or fexit"),
    }
    .with_context(|| format!("attaching the {} backend", args.backend))?;
    cap.watch(watched.layout().id)?;
    // Drain events as the daemon does, on the other core.
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(AtomicU64::new(0));
    let reader = {
        let (stop, seen) = (stop.clone(), seen.clone());
        tokio::spawn(async move {
            let mut events = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let wait = cap.next_events(&mut events);
                if let Ok(Ok(())) =
                    tokio::time::timeout(std::time::Duration::from_millis(50), wait).await
                {
                    seen.fetch_add(events.len() as u64, Ordering::Relaxed);
                    events.clear();
                }
            }
            cap.drops().unwrap_or_default()
        })
    };
    let (mut hooked, mut unwatched, mut again) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        hooked.push(round(W, args.updates)?);
        unwatched.push(round(O, args.updates)?);
    }
    stop.store(true, Ordering::Relaxed);
    let drops = reader.await?;
    // The baseline once more after detaching, to show the machine did not drift.
    for _ in 0..args.rounds {
        again.push(round(W, args.updates)?);
    }
    let (b, h, u, a) = (
        median(base),
        median(hooked),
        median(unwatched),
        median(again),
    );
    let baseline = b.min(a);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    // The programs read the clock per event: a slow clocksource (emulated HPET in a TCG guest)
    // shows up in the figures.
    let clock =
        std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
            .unwrap_or_default();
    println!(
        "kernel {}; clocksource {}; backend {}; {} updates x {} rounds, median ns per bpf(2) update",
        kernel.trim(),
        clock.trim(),
        args.backend,
        args.updates,
        args.rounds
    );
    println!();
    println!("| case | ns/update | overhead ns | ratio |");
    println!("|---|---:|---:|---:|");
    println!("| no hook (before) | {b:.0} | | |");
    println!("| no hook (after) | {a:.0} | | |");
    println!(
        "| {} backend, watched map | {h:.0} | {:.0} | {:.2}x |",
        args.backend,
        h - baseline,
        h / baseline
    );
    println!(
        "| {} backend, map not watched | {u:.0} | {:.0} | {:.2}x |",
        args.backend,
        u - baseline,
        u / baseline
    );
    println!();
    println!(
        "events read: {}, lost: {}, undecoded: {}",
        seen.load(Ordering::Relaxed),
        drops.0,
        drops.1
    );
    if let Some(path) = args.json {
        let j = serde_json::json!({
            "kernel": kernel.trim(), "backend": args.backend, "updates": args.updates,
            "baseline_ns": baseline, "watched_ns": h, "unwatched_ns": u,
            "overhead_ns": h - baseline, "events": seen.load(Ordering::Relaxed), "lost": drops.0,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&j)?)?;
    }
    Ok(())
}
