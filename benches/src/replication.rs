//! End-to-end replication of kernel map writes on a local 3-node cluster: a writer process
//! updates node 1's BPF map at fixed rates (and flat out), raftmap captures, commits and applies
//! each change to nodes 2 and 3's maps, and a prober measures how long each sampled write takes
//! to be visible in a remote kernel map (the writer stamps each value with CLOCK_MONOTONIC).
//! Next to it, in the same run: the floor (one fsync p99 plus one loopback round trip p99) and
//! the naive sync raftmap replaces (every captured update sent to each peer as one gRPC call
//! over a new connection, no consensus). raftmap runs with mutual TLS and without (`--tls`),
//! in alternating rounds (`--rounds`), and the cost of TLS is printed as the median over rounds
//! of each round's difference.
//!
//! ```text
//! cargo build --release --bin raftmap --bin kernel-replication
//! target/release/kernel-replication --rates 1000,10000,50000,100000,max --seconds 5
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use raftmap_bench::{median_range, monotonic_ns, percentile, tight_timer, us, Floor};
use raftmap_ebpf_hooks::{Capture, HookError, KernelMap, MapKind, UpdateFlags};
use raftmap_jepsen::cluster::{ClusterOptions, LaunchOptions, LocalCluster};
use raftmap_node::proto as pb;

#[derive(Parser, Debug)]
struct Args {
    /// Write rates per second, comma separated; `max` writes flat out.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000,10000,50000,100000,max"
    )]
    rates: Vec<String>,
    /// Seconds of writing per rate.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Durability modes to run: on (fsync before acknowledging, the default) and/or off.
    #[arg(long, value_delimiter = ',', default_value = "on,off")]
    fsync: Vec<String>,
    /// Transport modes to run: on (mutual TLS, the default) and/or off (plaintext).
    #[arg(long, value_delimiter = ',', default_value = "on,off")]
    tls: Vec<String>,
    /// Rounds of every mode; each round reverses the order of the transport modes, and the
    /// TLS figures are medians over rounds of each round's difference.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Seconds of the naive baseline (0: skip it).
    #[arg(long, default_value_t = 5)]
    naive_seconds: u64,
    /// The raftmap binary (default: next to this one).
    #[arg(long)]
    raftmap: Option<std::path::PathBuf>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// (Internal) Be the writer: update the map with this name.
    #[arg(long, hide = true)]
    child_write: Option<String>,
    #[arg(long, hide = true, default_value_t = 0)]
    child_rate: u64,
    #[arg(long, hide = true, default_value_t = 0)]
    child_prefix: u64,
}

/// Key `i` of run `prefix` (big-endian: keys of one run sort together).
fn key_of(prefix: u64, i: u64) -> [u8; 8] {
    ((prefix << 40) | i).to_be_bytes()
}

/// How often the probe looks for the key it waits for: the resolution of the latencies, and
/// light enough not to take a core from the daemons it measures.
const PROBE_POLL: Duration = Duration::from_micros(100);

/// Most entries a map holds (every write is a new key).
const MAP_ENTRIES: u32 = 1 << 21;

/// The writer process: `rate` updates per second (0: flat out) for `secs`, each value stamped
/// with the monotonic clock; prints how many it wrote.
fn child_write(name: &str, rate: u64, secs: u64, prefix: u64) -> Result<()> {
    tight_timer();
    let map = KernelMap::open_by_name(name)?;
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(secs);
    let mut i = 0u64;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        // Paced in bursts every half millisecond: what is due by now.
        let due = if rate == 0 {
            i + 512
        } else {
            ((now - t0).as_secs_f64() * rate as f64) as u64 + 1
        };
        while i < due {
            match map.update(
                &key_of(prefix, i),
                &monotonic_ns().to_le_bytes(),
                UpdateFlags::Any,
            ) {
                Ok(()) => i += 1,
                // Flat out, a writer may fill the map (the naive baseline's, whose sync takes
                // almost no CPU): it stops there; its rate is over the time it wrote.
                Err(HookError::Syscall { source, .. })
                    if rate == 0
                        && source.raw_os_error() == Some(nix::errno::Errno::E2BIG as i32) =>
                {
                    eprintln!("writer: map {name} full after {i} writes; stopping");
                    println!("{i}");
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        }
        if rate != 0 {
            std::thread::sleep(Duration::from_micros(500));
        }
    }
    println!("{i}");
    Ok(())
}

/// Runs the writer process against map `name`; returns it (its stdout holds the count).
fn spawn_writer(name: &str, rate: u64, secs: u64, prefix: u64) -> Result<std::process::Child> {
    Ok(std::process::Command::new(std::env::current_exe()?)
        .args(["--child-write", name, "--seconds", &secs.to_string()])
        .args(["--child-rate", &rate.to_string()])
        .args(["--child-prefix", &prefix.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()?)
}

fn wait_writer(child: std::process::Child) -> Result<u64> {
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("the writer failed: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// Probes every `step`-th key of run `prefix` in `remotes` until `written` (set when the writer
/// is done) is reached; returns the latencies from the write to visibility.
fn probe(
    remotes: Vec<Arc<KernelMap>>,
    prefix: u64,
    step: u64,
    written: Arc<AtomicU64>,
    give_up: Arc<AtomicBool>,
) -> Vec<Duration> {
    tight_timer();
    let mut lat = Vec::new();
    let mut j = 0u64;
    'keys: while j < written.load(Ordering::Acquire) {
        for m in &remotes {
            loop {
                if give_up.load(Ordering::Relaxed) {
                    break 'keys;
                }
                match m.lookup(&key_of(prefix, j)) {
                    Ok(Some(v)) => {
                        let stamp = u64::from_le_bytes(v.try_into().unwrap_or([0; 8]));
                        lat.push(Duration::from_nanos(monotonic_ns().saturating_sub(stamp)));
                        break;
                    }
                    _ if j >= written.load(Ordering::Acquire) => break 'keys,
                    _ => std::thread::sleep(PROBE_POLL),
                }
            }
        }
        j += step;
    }
    lat
}

/// Waits until key `last` of run `prefix` is in every map; when it got there.
fn wait_visible(
    maps: &[Arc<KernelMap>],
    prefix: u64,
    last: u64,
    within: Duration,
) -> Option<Instant> {
    let deadline = Instant::now() + within;
    for m in maps {
        while !matches!(m.lookup(&key_of(prefix, last)), Ok(Some(_))) {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    Some(Instant::now())
}

/// One measured run.
#[derive(Debug)]
struct Run {
    round: usize,
    system: String,
    fsync: Option<bool>,
    tls: Option<bool>,
    rate: String,
    written: u64,
    write_rate: f64,
    applied_rate: f64,
    visible: u64,
    p50: Duration,
    p99: Duration,
    p999: Duration,
}

/// Writes into `source` at `rate` for `secs` and measures visibility in `remotes`.
async fn measure(
    source: &str,
    remotes: &[Arc<KernelMap>],
    rate: u64,
    secs: u64,
    prefix: u64,
    drain: Duration,
) -> Result<(u64, f64, f64, u64, Vec<Duration>)> {
    let written = Arc::new(AtomicU64::new(u64::MAX));
    let give_up = Arc::new(AtomicBool::new(false));
    // About 500 samples a second: the probe shares the machine with the cluster.
    let step = if rate == 0 { 400 } else { (rate / 500).max(1) };
    let before: Vec<usize> = remotes
        .iter()
        .map(|m| m.entries().map(|e| e.len()).unwrap_or(0))
        .collect();
    let t0 = Instant::now();
    let writer = spawn_writer(source, rate, secs, prefix)?;
    let prober = {
        let (r, w, g) = (remotes.to_vec(), written.clone(), give_up.clone());
        std::thread::spawn(move || probe(r, prefix, step, w, g))
    };
    let n = tokio::task::spawn_blocking(move || wait_writer(writer)).await??;
    let wrote = t0.elapsed();
    written.store(n, Ordering::Release);
    let maps = remotes.to_vec();
    let seen = tokio::task::spawn_blocking(move || {
        wait_visible(&maps, prefix, n.saturating_sub(1), drain)
    })
    .await?;
    give_up.store(true, Ordering::Relaxed);
    let mut lat = prober.join().unwrap_or_default();
    lat.sort();
    let visible = remotes
        .iter()
        .zip(&before)
        .map(|(m, b)| m.entries().map(|e| e.len().saturating_sub(*b)).unwrap_or(0) as u64)
        .min()
        .unwrap_or(0);
    let applied_rate = match seen {
        Some(t) => visible as f64 / (t - t0).as_secs_f64(),
        // Not everything arrived within the drain time: what did, over the whole window.
        None => visible as f64 / (wrote + drain).as_secs_f64(),
    };
    Ok((
        n,
        n as f64 / wrote.as_secs_f64(),
        applied_rate,
        visible,
        lat,
    ))
}

fn rate_of(s: &str) -> Result<u64> {
    if s == "max" {
        return Ok(0);
    }
    s.parse()
        .with_context(|| format!("rate {s:?}: a number of updates per second, or max"))
}

/// Kernel maps for a run, named uniquely among loaded maps.
fn make_maps(tag: &str, n: u64) -> Result<Vec<(String, Arc<KernelMap>)>> {
    (1..=n)
        .map(|i| {
            let name = format!("rr{}{tag}{i}", std::process::id() % 100_000);
            let m = KernelMap::create(MapKind::Hash, 8, 8, MAP_ENTRIES, &name)?;
            Ok((name, Arc::new(m)))
        })
        .collect()
}

async fn raftmap_runs(
    args: &Args,
    bin: &std::path::Path,
    fsync: bool,
    tls: bool,
    floor: &mut Option<Floor>,
    out: &mut Vec<Run>,
) -> Result<()> {
    let tag = format!(
        "{}{}",
        if fsync { "s" } else { "n" },
        if tls { "t" } else { "p" }
    );
    let maps = make_maps(&tag, 3)?;
    let mut agent_args = vec![
        "--snapshot-logs".to_string(),
        "1000000".into(),
        "--scan-interval-ms".into(),
        "1000".into(),
    ];
    if !fsync {
        agent_args.push("--no-sync".into());
    }
    let node_args = maps
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            (
                i as u64 + 1,
                vec!["--watch".to_string(), format!("bench={name}")],
            )
        })
        .collect();
    let mut cluster = LocalCluster::start(
        ClusterOptions {
            launch: LaunchOptions {
                bin: bin.to_path_buf(),
                agent_args,
                log_filter: "warn".into(),
                node_args,
                tls,
            },
            netns: false,
        },
        3,
        0,
        Duration::from_secs(60),
    )
    .await?;
    for id in cluster.ids() {
        cluster
            .wait_for(id, Duration::from_secs(30), "sync its kernel map", |s| {
                s.watched.iter().all(|w| w.state == "synced")
            })
            .await?;
    }
    if floor.is_none() {
        *floor = Some(Floor::measure(cluster.dir())?);
    }
    let remotes: Vec<Arc<KernelMap>> = maps[1..].iter().map(|(_, m)| m.clone()).collect();
    for (i, r) in args.rates.iter().enumerate() {
        let rate = rate_of(r)?;
        let prefix = i as u64 + 1;
        let (n, wr, ar, visible, lat) = measure(
            &maps[0].0,
            &remotes,
            rate,
            args.seconds,
            prefix,
            Duration::from_secs(60),
        )
        .await?;
        // Where the changes went, per node: the first place to look when a figure is off.
        let metrics: Vec<String> = cluster
            .ids()
            .into_iter()
            .filter_map(|id| cluster.node(id).ok().map(|n| n.metrics_addr.clone()))
            .collect();
        let mut diag = Vec::new();
        for name in [
            "raftmap_kernel_captured_total",
            "raftmap_kernel_capture_lost_total",
            "raftmap_kernel_scan_repairs_total",
            "raftmap_kernel_applied_total",
            "raftmap_proposals_total",
            "raftmap_proposed_ops_total",
        ] {
            let per_node: Vec<String> = metrics
                .iter()
                .map(|a| {
                    raftmap_bench::scrape_counter(std::slice::from_ref(a), name)
                        .map_or("?".into(), |v| format!("{v:.0}"))
                })
                .collect();
            diag.push(format!(
                "{}={}",
                name.trim_start_matches("raftmap_")
                    .trim_end_matches("_total"),
                per_node.join("/")
            ));
        }
        eprintln!(
            "fsync {fsync} rate {r}: {} (cumulative, nodes 1/2/3)",
            diag.join(" ")
        );
        out.push(Run {
            round: 0,
            system: "raftmap".into(),
            fsync: Some(fsync),
            tls: Some(tls),
            rate: r.clone(),
            written: n,
            write_rate: wr,
            applied_rate: ar,
            visible,
            p50: percentile(&lat, 0.5),
            p99: percentile(&lat, 0.99),
            p999: percentile(&lat, 0.999),
        });
    }
    cluster.stop_all();
    Ok(())
}

// ---------------------------------------------------------------- the naive baseline

type Stream<T> = tokio_stream::wrappers::ReceiverStream<Result<T, tonic::Status>>;

/// A peer of the naive sync: writes every put it is sent into its kernel map.
struct NaivePeer(Arc<KernelMap>);

#[tonic::async_trait]
impl pb::kv_server::Kv for NaivePeer {
    async fn write(
        &self,
        req: tonic::Request<pb::WriteRequest>,
    ) -> Result<tonic::Response<pb::WriteResponse>, tonic::Status> {
        for op in req.into_inner().ops {
            if let Some(pb::op::Op::Put(p)) = op.op {
                self.0
                    .update(&p.key, &p.value, UpdateFlags::Any)
                    .map_err(|e| tonic::Status::internal(e.to_string()))?;
            }
        }
        Ok(tonic::Response::new(pb::WriteResponse {
            succeeded: true,
            ..Default::default()
        }))
    }
    async fn get(
        &self,
        _: tonic::Request<pb::GetRequest>,
    ) -> Result<tonic::Response<pb::GetResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("naive peer"))
    }
    type DumpStream = Stream<pb::DumpResponse>;
    async fn dump(
        &self,
        _: tonic::Request<pb::DumpRequest>,
    ) -> Result<tonic::Response<Self::DumpStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("naive peer"))
    }
    async fn list_maps(
        &self,
        _: tonic::Request<pb::ListMapsRequest>,
    ) -> Result<tonic::Response<pb::ListMapsResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("naive peer"))
    }
    type WatchStream = Stream<pb::WatchEvent>;
    async fn watch(
        &self,
        _: tonic::Request<pb::WatchRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("naive peer"))
    }
}

/// Each update `cap` captures, sent to each peer as one call over a new connection.
async fn naive_sync(
    mut cap: Capture,
    peers: Vec<String>,
    stop: Arc<AtomicBool>,
    lost: Arc<Mutex<u64>>,
) -> Result<()> {
    let mut events = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if tokio::time::timeout(Duration::from_millis(50), cap.next_events(&mut events))
            .await
            .is_err()
        {
            continue;
        }
        for ev in events.drain(..) {
            let Some(value) = ev.value else { continue };
            for addr in &peers {
                let ch = raftmap_node::endpoint(addr)?.connect().await?;
                let mut kv = pb::kv_client::KvClient::new(ch);
                kv.write(pb::WriteRequest {
                    ops: vec![pb::Op {
                        op: Some(pb::op::Op::Put(pb::Put {
                            map: "naive".into(),
                            key: ev.key.clone(),
                            value: value.clone(),
                        })),
                    }],
                })
                .await?;
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
        }
    }
    *lost.lock().unwrap_or_else(|p| p.into_inner()) = cap.drops().map(|d| d.0).unwrap_or(0);
    Ok(())
}

async fn naive_run(secs: u64) -> Result<(Run, u64)> {
    let maps = make_maps("v", 3)?;
    let mut peers = Vec::new();
    for (_, m) in &maps[1..] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        peers.push(listener.local_addr()?.to_string());
        let svc = pb::kv_server::KvServer::new(NaivePeer(m.clone()));
        // TCP_NODELAY on both ends, as raftmap has: a baseline, not a strawman.
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            |s| {
                if let Ok(s) = &s {
                    let _ = s.set_nodelay(true);
                }
                s
            },
        );
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(incoming),
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let lost = Arc::new(Mutex::new(0));
    // Attached and watching before the first write.
    let mut cap = Capture::syscall()?;
    cap.watch(maps[0].1.layout().id)?;
    let sync = tokio::spawn(naive_sync(cap, peers, stop.clone(), lost.clone()));
    let remotes: Vec<Arc<KernelMap>> = maps[1..].iter().map(|(_, m)| m.clone()).collect();
    // Flat out for `secs`; what reached both peers by the end of the window is its throughput.
    let (n, wr, _, _, lat) = measure(&maps[0].0, &remotes, 0, secs, 1, Duration::ZERO).await?;
    let visible = remotes
        .iter()
        .map(|m| m.entries().map(|e| e.len()).unwrap_or(0) as u64)
        .min()
        .unwrap_or(0);
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(5), sync).await;
    let lost = *lost.lock().unwrap_or_else(|p| p.into_inner());
    Ok((
        Run {
            round: 0,
            system: "naive".into(),
            fsync: None,
            tls: None,
            rate: "max".into(),
            written: n,
            write_rate: wr,
            applied_rate: visible as f64 / secs as f64,
            visible,
            p50: percentile(&lat, 0.5),
            p99: percentile(&lat, 0.99),
            p999: percentile(&lat, 0.999),
        },
        lost,
    ))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(name) = &args.child_write {
        return child_write(name, args.child_rate, args.seconds, args.child_prefix);
    }
    raftmap_ebpf_hooks::probe_bpf().map_err(anyhow::Error::msg)?;
    let bin = raftmap_bench::raftmap_bin(args.raftmap.as_deref())?;
    let mut runs = Vec::new();
    let mut floor = None;
    let on_off = |flag: &str, v: &str| match v {
        "on" => Ok(true),
        "off" => Ok(false),
        other => bail!("--{flag} {other:?}: expected on or off"),
    };
    for round in 0..args.rounds {
        let mut transports: Vec<&String> = args.tls.iter().collect();
        if round % 2 == 1 {
            transports.reverse();
        }
        for f in &args.fsync {
            for t in &transports {
                let (fsync, tls) = (on_off("fsync", f)?, on_off("tls", t)?);
                let first = runs.len();
                raftmap_runs(&args, &bin, fsync, tls, &mut floor, &mut runs).await?;
                for r in &mut runs[first..] {
                    r.round = round;
                }
            }
        }
    }
    let mut naive_lost = 0;
    if args.naive_seconds > 0 {
        let (r, lost) = naive_run(args.naive_seconds).await?;
        naive_lost = lost;
        runs.push(r);
    }
    let floor = floor.context("no raftmap run")?;
    let naive = runs
        .iter()
        .find(|r| r.system == "naive")
        .map(|r| r.applied_rate);
    println!("floor (same run): {}", floor.describe());
    println!();
    println!("| round | system | fsync | tls | rate/s | written/s | applied on every node/s | x naive | p50 us | p99 us | p99.9 us | p99 / floor p99 |");
    println!("|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut json = Vec::new();
    for r in &runs {
        let fs = r.fsync.unwrap_or(false);
        let vs_floor = r.p99.as_secs_f64() / floor.p99(fs).as_secs_f64();
        let vs_naive = naive.map(|n| r.applied_rate / n.max(1e-9));
        println!(
            "| {} | {} | {} | {} | {} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {:.0} | {} |",
            r.round,
            r.system,
            r.fsync.map_or("-", |f| if f { "on" } else { "off" }),
            r.tls.map_or("-", |f| if f { "on" } else { "off" }),
            r.rate,
            r.write_rate,
            r.applied_rate,
            vs_naive.map_or("-".into(), |x| format!("{x:.0}x")),
            us(r.p50),
            us(r.p99),
            us(r.p999),
            if r.system == "raftmap" {
                format!("{vs_floor:.1}x")
            } else {
                "-".into()
            },
        );
        json.push(serde_json::json!({
            "round": r.round, "system": r.system, "fsync": r.fsync, "tls": r.tls, "rate": r.rate, "written": r.written,
            "written_per_sec": r.write_rate, "applied_per_sec": r.applied_rate, "visible": r.visible,
            "p50_us": us(r.p50), "p99_us": us(r.p99), "p999_us": us(r.p999),
            "floor_p99_us": us(floor.p99(fs)), "x_naive": vs_naive,
        }));
    }
    println!();
    // TLS on against off, round by round (the two ran next to each other), then the median.
    // (fsync, rate) -> each round's (throughput ratio, p50 difference, p99 difference).
    type Diffs = Vec<(f64, f64, f64)>;
    let mut pairs: std::collections::BTreeMap<(Option<bool>, &str), Diffs> = Default::default();
    for on in runs.iter().filter(|r| r.tls == Some(true)) {
        let off = runs.iter().find(|r| {
            r.tls == Some(false) && r.fsync == on.fsync && r.rate == on.rate && r.round == on.round
        });
        if let Some(off) = off {
            pairs.entry((on.fsync, &on.rate)).or_default().push((
                on.applied_rate / off.applied_rate.max(1e-9),
                us(on.p50) - us(off.p50),
                us(on.p99) - us(off.p99),
            ));
        }
    }
    for ((fsync, rate), v) in &pairs {
        let (t, t0, t1) = median_range(v.iter().map(|p| p.0).collect());
        let (p50, p50a, p50b) = median_range(v.iter().map(|p| p.1).collect());
        let (p99, _, _) = median_range(v.iter().map(|p| p.2).collect());
        println!(
            "fsync {}, rate {rate}: TLS on/off over {} rounds: applied throughput {t:.2}x ({t0:.2}..{t1:.2}x), p50 {p50:+.0} us ({p50a:+.0}..{p50b:+.0} us), p99 {p99:+.0} us",
            fsync.map_or("-", |f| if f { "on" } else { "off" }),
            v.len(),
        );
    }
    println!(
        "floor p99: {:.0} us with fsync (fsync p99 + RTT p99), {:.0} us without (RTT p99); naive: {} captured updates lost to a full ring buffer",
        us(floor.p99(true)),
        us(floor.p99(false)),
        naive_lost
    );
    if let Some(path) = &args.json {
        let j = serde_json::json!({ "floor": {
            "fsync_p50_us": us(floor.fsync50), "fsync_p99_us": us(floor.fsync99),
            "rtt_p50_us": us(floor.rtt50), "rtt_p99_us": us(floor.rtt99) }, "runs": json });
        std::fs::write(path, serde_json::to_string_pretty(&j)?)?;
    }
    Ok(())
}
