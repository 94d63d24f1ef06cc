//! `raftmap demo`: a local cluster of separate processes, a workload, and proof of convergence.

mod kernel;

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use raftmap_ebpf_hooks::KernelMap;
use raftmap_node::launcher::{LaunchOptions, Launcher as LocalCluster};
use raftmap_node::proto as pb;
use raftmap_node::put;
use raftmap_node::storage::{MapSchema, MapType};

use crate::table::status_table;
use kernel::{kernel_workload, KernelDemo};

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
    /// Plaintext, unauthenticated ports instead of mutual TLS with certificates made for the
    /// demo.
    #[arg(long)]
    insecure: bool,
}

pub(super) const MAP: &str = "conntrack";

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
        tls: !args.insecure,
        ..LaunchOptions::new(bin)
    };
    let work = async {
        let mut cluster = LocalCluster::new(opts)?;
        cluster
            .bootstrap(args.voters, args.learners, Duration::from_secs(60))
            .await?;
        println!("data dirs and logs under {}", cluster.dir().display());
        match cluster.tls_dir(1) {
            Some(_) => println!(
                "mutual TLS on every port: CA, node and client certificates under {}/pki",
                cluster.dir().display()
            ),
            None => println!("--insecure: plaintext, unauthenticated ports"),
        }
        match kernel.as_mut() {
            Some(k) => kernel_workload(&mut cluster, k, &args).await?,
            None => workload(&mut cluster, &args).await?,
        }
        if args.keep_running {
            println!(
                "cluster keeps running; endpoints: {}",
                cluster.endpoints().join(",")
            );
            let tls = match cluster.pki() {
                Some(_) => format!(" --tls-dir {}/pki/admin", cluster.dir().display()),
                None => String::new(),
            };
            println!(
                "try: raftmap status --endpoints {}{tls}",
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
pub(super) async fn converged(
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

/// FNV-1a over the entries, to show equality at a glance.
pub(super) fn digest(entries: &[(Vec<u8>, Vec<u8>)]) -> u64 {
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
