//! `raftmap demo`: a local cluster of separate processes, a workload, and proof of convergence.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use raftmap_ebpf_hooks::{Conntrack, KernelMap, UpdateFlags};
use raftmap_node::launcher::{LaunchOptions, Launcher as LocalCluster};
use raftmap_node::proto as pb;
use raftmap_node::put;
use raftmap_node::storage::{MapSchema, MapType};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Voters to start.
    #[arg(long, default_value_t = 3)]
    voters: u64,
    /// Learners to start.
    #[arg(long, default_value_t = 1)]
    learners: u64,
    /// Connections to write (each a 16-byte key and a 16-byte value).
    #[arg(long, default_value_t = 2000)]
    entries: u32,
    /// Keep the cluster running after the workload until Ctrl-C.
    #[arg(long)]
    keep_running: bool,
    /// Replicate through the API only, even where BPF is available.
    #[arg(long)]
    no_bpf: bool,
}

const MAP: &str = "conntrack";

/// A conntrack-shaped key: IPv4 5-tuple padded to 16 bytes.
fn flow_key(i: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(16);
    k.extend_from_slice(&[10, 0, (i >> 8) as u8, i as u8]); // saddr
    k.extend_from_slice(&[10, 1, 0, 1]); // daddr
    k.extend_from_slice(&(1024 + (i % 50_000) as u16).to_be_bytes()); // sport
    k.extend_from_slice(&443u16.to_be_bytes()); // dport
    k.push(6); // TCP
    k.extend_from_slice(&[0, 0, 0]);
    k
}

fn flow_value(i: u32, state: u8) -> Vec<u8> {
    let mut v = vec![0u8; 16];
    v[0] = state;
    v[4..8].copy_from_slice(&i.to_le_bytes());
    v
}

pub async fn run(args: DemoArgs) -> Result<()> {
    if args.voters == 0 {
        bail!("--voters must be at least 1");
    }
    let bin = std::env::current_exe().context("locating the raftmap binary")?;
    let nodes = args.voters + args.learners;
    let mut kernel = if args.no_bpf {
        println!("--no-bpf: replicating through the API only");
        None
    } else {
        match raftmap_ebpf_hooks::probe_bpf() {
            Ok(()) => Some(KernelDemo::load(nodes)?),
            Err(e) => {
                println!("BPF is not available here ({e});");
                println!("falling back to the replicated store alone: writes go through the API");
                None
            }
        }
    };
    println!(
        "raftmap demo: starting {} voters and {} learner(s) as separate processes on 127.0.0.1",
        args.voters, args.learners
    );
    let opts = LaunchOptions {
        node_args: kernel
            .as_ref()
            .map(KernelDemo::agent_args)
            .unwrap_or_default(),
        ..LaunchOptions::new(bin)
    };
    let work = async {
        let mut cluster = LocalCluster::new(opts)?;
        cluster
            .bootstrap(args.voters, args.learners, Duration::from_secs(60))
            .await?;
        println!("data dirs and logs under {}", cluster.dir().display());
        match kernel.as_mut() {
            Some(k) => kernel_workload(&mut cluster, k, &args).await?,
            None => workload(&mut cluster, &args).await?,
        }
        if args.keep_running {
            println!(
                "cluster keeps running; endpoints: {}",
                cluster.endpoints().join(",")
            );
            println!(
                "try: raftmap status --endpoints {}",
                cluster.endpoints().join(",")
            );
            println!("press Ctrl-C to stop and clean up");
            std::future::pending::<()>().await;
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::select! {
        r = work => {
            r?;
            println!("stopping the cluster and removing its data");
            Ok(())
        }
        _ = tokio::signal::ctrl_c() => {
            println!("\ninterrupted: stopping the cluster and removing its data");
            Ok(())
        }
    }
}

/// One conntrack program and its pinned map per node, removed on drop.
struct KernelDemo {
    dir: PathBuf,
    programs: BTreeMap<u64, Conntrack>,
}

impl KernelDemo {
    fn load(nodes: u64) -> Result<Self> {
        let dir = raftmap_ebpf_hooks::bpffs().join(format!("raftmap-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut demo = Self {
            dir,
            programs: BTreeMap::new(),
        };
        for id in 1..=nodes {
            let prog = Conntrack::load(&demo.pin(id))?;
            demo.programs.insert(id, prog);
        }
        println!(
            "loaded the conntrack XDP program {nodes} times; node N's map is pinned at {}/node-N",
            demo.dir.display()
        );
        Ok(demo)
    }

    fn pin(&self, id: u64) -> PathBuf {
        self.dir.join(format!("node-{id}"))
    }

    fn agent_args(&self) -> BTreeMap<u64, Vec<String>> {
        self.programs
            .keys()
            .map(|&id| {
                let watch = format!("{MAP}={}", self.pin(id).display());
                (
                    id,
                    vec![
                        "--watch".into(),
                        watch,
                        "--scan-interval-ms".into(),
                        "20".into(),
                    ],
                )
            })
            .collect()
    }

    fn map(&self, id: u64) -> Result<KernelMap> {
        Ok(KernelMap::open_pinned(&self.pin(id))?)
    }
}

impl Drop for KernelDemo {
    fn drop(&mut self) {
        for id in self.programs.keys() {
            let _ = std::fs::remove_file(self.pin(*id));
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn flow(i: u32) -> ([u8; 4], [u8; 4], u16, u16, bool) {
    (
        [10, 0, (i >> 8) as u8, i as u8],
        [10, 1, 0, 1],
        1024 + (i % 50_000) as u16,
        if i % 3 == 0 { 53 } else { 443 },
        i % 3 != 0,
    )
}

/// Packets through every node's program; replication is visible in the other nodes' maps.
async fn kernel_workload(
    cluster: &mut LocalCluster,
    demo: &mut KernelDemo,
    args: &DemoArgs,
) -> Result<()> {
    let ids = cluster.ids();
    let n = ids.len() as u32;
    let started = Instant::now();
    let mut packets = 0;
    for i in 0..args.entries {
        let node = ids[(i % n) as usize];
        let (s, d, sp, dp, tcp) = flow(i);
        let prog = demo.programs.get_mut(&node).context("program per node")?;
        // One to three packets per flow: the first inserts, the others count in place.
        for _ in 0..=(i % 3) {
            prog.run(&Conntrack::frame(s, d, sp, dp, tcp))?;
            packets += 1;
        }
    }
    println!(
        "sent {packets} packets of {} flows through the XDP programs of all {n} nodes (each node sees a share)",
        args.entries
    );
    let client = cluster.client(ids[0]).await?;
    let maps: Vec<KernelMap> = ids.iter().map(|&id| demo.map(id)).collect::<Result<_>>()?;
    let contents = converged(&client, &maps, |n| n == args.entries as usize).await?;
    println!(
        "every node's kernel map holds all {} flows, {:.2?} after the first packet",
        contents.len(),
        started.elapsed()
    );
    // Close every tenth TCP flow with a FIN through the node that saw it: the program deletes it.
    let started = Instant::now();
    let mut closed = 0;
    for i in (0..args.entries).filter(|i| i % 10 == 1) {
        let (s, d, sp, dp, tcp) = flow(i);
        if tcp {
            let node = ids[(i % n) as usize];
            let prog = demo.programs.get_mut(&node).context("program per node")?;
            prog.run(&Conntrack::fin_frame(s, d, sp, dp))?;
            closed += 1;
        }
    }
    let expected = args.entries as usize - closed;
    let contents = converged(&client, &maps, |n| n == expected).await?;
    println!(
        "closed {closed} flows with TCP FINs; every node's map dropped them within {:.2?} ({} flows left)",
        started.elapsed(),
        contents.len()
    );
    for (&id, m) in ids.iter().zip(&maps) {
        let mut entries: Vec<_> = m.entries()?.into_iter().collect();
        entries.sort();
        println!(
            "node {id}: kernel map {} holds {} entries, digest {:016x}",
            demo.pin(id).display(),
            entries.len(),
            digest(&entries)
        );
    }

    // Replication latency: a new flow on the first node until it is in the last node's map,
    // written by the XDP program (captured by the scan) and through bpf(2) (captured as it
    // happens by the event-driven backend).
    let (first, last) = (ids[0], ids[ids.len() - 1]);
    let target = &maps[maps.len() - 1];
    let prog = demo.programs.get_mut(&first).context("program per node")?;
    let xdp = latency(target, 20, 1_000_000, |(s, d, sp, dp, tcp)| {
        prog.run(&Conntrack::frame(s, d, sp, dp, tcp)).map(drop)
    })
    .await?;
    let origin = &maps[0];
    let syscall = latency(target, 50, 2_000_000, |(s, d, sp, dp, tcp)| {
        origin.update(
            &Conntrack::key(s, d, sp, dp, tcp),
            &[1; 16],
            UpdateFlags::Any,
        )
    })
    .await?;
    let backend = cluster
        .client(first)
        .await?
        .status()
        .await?
        .watched
        .first()
        .map(|w| w.backend.clone())
        .unwrap_or_default();
    println!(
        "XDP program write on node {first} -> node {last}'s kernel map: p50 {:.1?}, max {:.1?} (program writes are caught by the scan, every 20 ms)",
        xdp[xdp.len() / 2],
        xdp[xdp.len() - 1]
    );
    println!(
        "bpf(2) update on node {first} -> node {last}'s kernel map: p50 {:.1?}, p90 {:.1?}, max {:.1?} (capture backend: {backend})",
        syscall[syscall.len() / 2],
        syscall[syscall.len() * 9 / 10],
        syscall[syscall.len() - 1]
    );

    bpftool_view(&demo.pin(last));

    let mut rows = Vec::new();
    for &id in &ids {
        let c = cluster.client(id).await?;
        rows.push((cluster.node(id)?.api_addr.clone(), Ok(c.status().await?)));
    }
    println!("\n{}\n", status_table(&rows));
    println!(
        "all {} nodes converged: their kernel maps are identical",
        ids.len()
    );
    Ok(())
}

async fn workload(cluster: &mut LocalCluster, args: &DemoArgs) -> Result<()> {
    let ids = cluster.ids();
    let mut clients = Vec::new();
    for &id in &ids {
        clients.push(cluster.client(id).await?);
    }
    let schema = MapSchema {
        name: MAP.into(),
        map_type: MapType::LruHash,
        key_size: 16,
        value_size: 16,
        max_entries: 65_536,
    };
    clients[0].declare(&schema).await?;
    println!("declared map {schema}");

    // Writes go through every node, learners included: non-leaders forward to the leader.
    let started = Instant::now();
    let per_batch = 100u32;
    let mut tasks = Vec::new();
    for (n, c) in clients.iter().enumerate() {
        let c = c.clone();
        let count = clients.len() as u32;
        let total = args.entries;
        tasks.push(tokio::spawn(async move {
            let mut i = n as u32 * per_batch;
            while i < total {
                let ops = (i..(i + per_batch).min(total))
                    .map(|j| put(MAP, flow_key(j), flow_value(j, 1)))
                    .collect();
                c.write(ops).await?;
                i += per_batch * count;
            }
            Ok::<_, raftmap_node::NodeError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed();
    println!(
        "wrote {} flows through all {} nodes in {:.2?} ({:.0} writes/s)",
        args.entries,
        clients.len(),
        elapsed,
        f64::from(args.entries) / elapsed.as_secs_f64()
    );
    // Close every tenth flow and move the rest to ESTABLISHED with a compare-and-swap on one.
    let closed: Vec<_> = (0..args.entries)
        .step_by(10)
        .map(|i| {
            pb::op::Op::Delete(pb::Delete {
                map: MAP.into(),
                key: flow_key(i),
            })
        })
        .collect();
    let n_closed = closed.len();
    for chunk in closed.chunks(500) {
        clients[clients.len() - 1].write(chunk.to_vec()).await?;
    }
    let cas = clients[1 % clients.len()]
        .write(vec![pb::op::Op::Cas(pb::CompareAndSwap {
            map: MAP.into(),
            key: flow_key(1),
            expected: Some(flow_value(1, 1)),
            new_value: Some(flow_value(1, 2)),
        })])
        .await?;
    println!(
        "closed {n_closed} flows; compare-and-swap on flow 1 succeeded: {}",
        cas.succeeded
    );

    let leader_status = clients[0].status().await?;
    let target = leader_status.applied_index.max(cas.index);
    cluster
        .wait_applied(&ids, target, Duration::from_secs(30))
        .await?;

    let mut rows = Vec::new();
    for &id in &ids {
        let c = cluster.client(id).await?;
        rows.push((cluster.node(id)?.api_addr.clone(), Ok(c.status().await?)));
    }
    println!("\n{}\n", status_table(&rows));

    // Every node's own copy, read locally (no forwarding), must be identical.
    let mut reference: Option<Vec<(Vec<u8>, Vec<u8>)>> = None;
    for (&id, c) in ids.iter().zip(&clients) {
        let (_, index, entries) = c.dump(MAP, false).await?;
        let digest = digest(&entries);
        println!(
            "node {id}: {} entries at index {index}, digest {digest:016x}",
            entries.len()
        );
        match &reference {
            None => reference = Some(entries),
            Some(r) if *r == entries => {}
            Some(_) => bail!("node {id} differs from node {}", ids[0]),
        }
    }
    let expected = args.entries as usize - n_closed;
    let n = reference.map_or(0, |r| r.len());
    if n != expected {
        bail!("nodes agree but hold {n} entries, expected {expected}");
    }
    println!("\nall {} nodes converged: {n} identical entries", ids.len());
    Ok(())
}

/// Waits until every kernel map equals the committed state and that holds a number of entries
/// `size_ok` accepts.
async fn converged(
    client: &raftmap_node::Client,
    maps: &[KernelMap],
    size_ok: impl Fn(usize) -> bool,
) -> Result<std::collections::HashMap<Vec<u8>, Vec<u8>>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let committed: std::collections::HashMap<_, _> =
            client.dump(MAP, true).await?.2.into_iter().collect();
        let kernels = maps
            .iter()
            .map(|m| m.entries())
            .collect::<Result<Vec<_>, _>>()?;
        if size_ok(committed.len()) && kernels.iter().all(|k| *k == committed) {
            return Ok(committed);
        }
        if Instant::now() > deadline {
            let sizes: Vec<_> = kernels.iter().map(|k| k.len()).collect();
            bail!(
                "kernel maps did not converge: committed {} entries, kernel maps {sizes:?}",
                committed.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sorted times from `write` creating a new flow (numbered from `first_flow`) until `target`
/// holds it, over `n` flows.
async fn latency(
    target: &KernelMap,
    n: u32,
    first_flow: u32,
    mut write: impl FnMut(([u8; 4], [u8; 4], u16, u16, bool)) -> raftmap_ebpf_hooks::Result<()>,
) -> Result<Vec<Duration>> {
    let mut samples = Vec::new();
    for j in 0..n {
        let f = flow(first_flow + j);
        let key = Conntrack::key(f.0, f.1, f.2, f.3, f.4);
        let t = Instant::now();
        write(f)?;
        while target.lookup(&key)?.is_none() {
            if t.elapsed() > Duration::from_secs(10) {
                bail!(
                    "flow {} did not reach the last node within 10 s",
                    first_flow + j
                );
            }
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        samples.push(t.elapsed());
    }
    samples.sort();
    Ok(samples)
}

/// What bpftool, the kernel's own tool, says about a node's map.
fn bpftool_view(pin: &std::path::Path) {
    let run = |args: &[&str]| {
        std::process::Command::new("bpftool")
            .args(args)
            .arg(pin)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let (Some(show), Some(dump)) = (
        run(&["map", "show", "pinned"]),
        run(&["-j", "map", "dump", "pinned"]),
    ) else {
        println!("(bpftool is not installed: no independent dump)");
        return;
    };
    println!("\n$ bpftool map show pinned {}", pin.display());
    for line in show.lines() {
        println!("  {}", line.trim());
    }
    let entries: Vec<serde_json::Value> = serde_json::from_str(&dump).unwrap_or_default();
    println!(
        "$ bpftool -j map dump pinned {}   ({} entries; the first 3:)",
        pin.display(),
        entries.len()
    );
    for e in entries.iter().take(3) {
        println!("  {}", e.get("formatted").unwrap_or(e));
    }
}

/// FNV-1a over the entries, to show equality at a glance.
fn digest(entries: &[(Vec<u8>, Vec<u8>)]) -> u64 {
    // Same bytes in the same order, same digest: callers sort by key.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (k, v) in entries {
        for b in k.iter().chain(v.iter()) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The `raftmap status` table.
pub fn status_table(rows: &[(String, std::result::Result<pb::StatusResponse, String>)]) -> String {
    let mut s = format!(
        "{:<22} {:<5} {:<9} {:<7} {:>5} {:>9} {:>9} {:>9} {:>9} {:<5}\n",
        "ENDPOINT",
        "ID",
        "ROLE",
        "LEADER",
        "TERM",
        "LAST LOG",
        "COMMIT",
        "APPLIED",
        "SNAPSHOT",
        "READY"
    );
    for (ep, r) in rows {
        match r {
            Ok(st) => s.push_str(&format!(
                "{:<22} {:<5} {:<9} {:<7} {:>5} {:>9} {:>9} {:>9} {:>9} {:<5}\n",
                ep,
                st.node_id,
                st.role,
                if st.has_leader {
                    st.leader_id.to_string()
                } else {
                    "-".into()
                },
                st.term,
                st.last_log_index,
                st.committed_index,
                st.applied_index,
                st.snapshot_index,
                st.ready
            )),
            Err(e) => s.push_str(&format!("{ep:<22} error: {e}\n")),
        }
    }
    for (_, st) in rows
        .iter()
        .filter_map(|(ep, r)| Some((ep, r.as_ref().ok()?)))
    {
        if !st.not_ready_reason.is_empty() {
            s.push_str(&format!(
                "node {} not ready: {}\n",
                st.node_id, st.not_ready_reason
            ));
        }
        if !st.corrupt.is_empty() {
            s.push_str(&format!("node {} CORRUPT: {}\n", st.node_id, st.corrupt));
        }
    }
    let watched: Vec<(u64, &pb::WatchedMap)> = rows
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .flat_map(|st| st.watched.iter().map(move |w| (st.node_id, w)))
        .collect();
    if !watched.is_empty() {
        s.push_str(&format!(
            "\n{:<5} {:<16} {:<8} {:>9}  {:<40} STATE\n",
            "NODE", "MAP", "BACKEND", "ENTRIES", "LOCATION"
        ));
        for (node, w) in watched {
            s.push_str(&format!(
                "{node:<5} {:<16} {:<8} {:>9}  {:<40} {}\n",
                w.map, w.backend, w.entries, w.location, w.state
            ));
            if w.refused_changes > 0 {
                s.push_str(&format!(
                    "      {} local changes refused by the cluster and undone; the last: {}\n",
                    w.refused_changes, w.last_refusal
                ));
            }
        }
    }
    s.trim_end().to_string()
}
