//! The kernel half of the demo: each node's conntrack map written by a real XDP program
//! (`BPF_PROG_TEST_RUN`), convergence checked in every node's kernel map, and the latency from
//! a kernel write to the remote maps.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use raftmap_ebpf_hooks::{Conntrack, KernelMap, UpdateFlags};
use raftmap_node::launcher::Launcher as LocalCluster;

use super::{converged, digest, DemoArgs, MAP};
use crate::table::status_table;

/// One conntrack program and its pinned map per node, removed on drop.
pub(super) struct KernelDemo {
    dir: PathBuf,
    programs: BTreeMap<u64, Conntrack>,
}

impl KernelDemo {
    pub(super) fn load(nodes: u64) -> Result<Self> {
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

    pub(super) fn agent_args(&self) -> BTreeMap<u64, Vec<String>> {
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
pub(super) async fn kernel_workload(
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
