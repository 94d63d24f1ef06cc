//! The kernel-map cluster scenarios and their helpers, shared by `tests/kernel.rs` (on this
//! machine: the syscall backend plus the scan) and `tests/fexit.rs` (in QEMU guests with
//! stock kernels: the fexit backend alone, the periodic scan off).

#![allow(dead_code)] // each test crate uses its own share of the helpers

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raftmap_ebpf_hooks::{Conntrack, KernelMap, MapKind, UpdateFlags, CT_KEY_SIZE, CT_VALUE_SIZE};
use raftmap_jepsen::cluster::{ClusterOptions, LaunchOptions, LocalCluster};
use raftmap_node::Client;

/// How the agents capture changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Whatever this kernel allows, with the scan every 20 ms (or as a scenario asks).
    Host,
    /// The fexit backend, asserted, and no periodic scan: every change must arrive as an event.
    /// Deadlines are longer: the guest is emulated (TCG), some 30 times slower.
    FexitOnly,
}

impl Mode {
    /// How long a node may take to start, join, catch up.
    pub fn t(self) -> Duration {
        match self {
            Mode::Host => Duration::from_secs(60),
            Mode::FexitOnly => Duration::from_secs(180),
        }
    }

    /// How long kernel maps may take to converge after the last write.
    pub fn converge(self) -> Duration {
        match self {
            Mode::Host => Duration::from_secs(20),
            Mode::FexitOnly => Duration::from_secs(60),
        }
    }
}

/// One pinned map per node, unpinned when dropped.
pub struct NodeMaps {
    pub pins: BTreeMap<u64, PathBuf>,
    pub mode: Mode,
}

impl NodeMaps {
    pub fn create(mode: Mode, tag: &str, nodes: &[u64], key: u32, value: u32) -> Self {
        Self::create_kind(mode, tag, nodes, MapKind::Hash, key, value, 4096)
    }

    pub fn create_sized(
        mode: Mode,
        tag: &str,
        nodes: &[u64],
        key: u32,
        value: u32,
        max: u32,
    ) -> Self {
        Self::create_kind(mode, tag, nodes, MapKind::Hash, key, value, max)
    }

    pub fn create_kind(
        mode: Mode,
        tag: &str,
        nodes: &[u64],
        kind: MapKind,
        key: u32,
        value: u32,
        max: u32,
    ) -> Self {
        let maps = Self::at(mode, tag, nodes);
        for p in maps.pins.values() {
            KernelMap::create(kind, key, value, max, "rm_it")
                .unwrap()
                .pin(p)
                .unwrap();
        }
        maps
    }

    /// The pin paths only (free), for maps something else creates.
    pub fn at(mode: Mode, tag: &str, nodes: &[u64]) -> Self {
        let pins: BTreeMap<u64, PathBuf> = nodes
            .iter()
            .map(|&n| {
                let pin = raftmap_ebpf_hooks::bpffs()
                    .join(format!("raftmap-it-{}-{tag}-{n}", std::process::id()));
                let _ = std::fs::remove_file(&pin);
                (n, pin)
            })
            .collect();
        Self { pins, mode }
    }

    pub fn open(&self, n: u64) -> KernelMap {
        KernelMap::open_pinned(&self.pins[&n]).unwrap()
    }

    pub fn args(&self, map: &str) -> BTreeMap<u64, Vec<String>> {
        self.args_scanning(map, Duration::from_millis(20))
    }

    /// Agent arguments watching each node's map, scanning it every `every` (with
    /// [`Mode::FexitOnly`], never: maps are still found and reconciled every 100 ms).
    pub fn args_scanning(&self, map: &str, every: Duration) -> BTreeMap<u64, Vec<String>> {
        self.pins
            .iter()
            .map(|(n, p)| {
                let mut args = vec!["--watch".to_string(), format!("{map}={}", p.display())];
                match self.mode {
                    Mode::Host => {
                        args.extend(["--scan-interval-ms".into(), every.as_millis().to_string()])
                    }
                    Mode::FexitOnly => args.extend([
                        "--scan-interval-ms".into(),
                        "100".into(),
                        "--no-periodic-scan".into(),
                    ]),
                }
                (*n, args)
            })
            .collect()
    }

    /// With [`Mode::FexitOnly`], waits until each node reports the fexit backend for every
    /// map it watches (and fails the test if one settles on another).
    pub async fn expect_backend(&self, c: &mut LocalCluster, nodes: &[u64]) {
        if self.mode != Mode::FexitOnly {
            return;
        }
        for &n in nodes {
            c.wait_for(n, self.mode.t(), "capture with fexit", |s| {
                !s.watched.is_empty() && s.watched.iter().all(|w| w.backend == "fexit")
            })
            .await
            .unwrap();
        }
    }
}

impl Drop for NodeMaps {
    fn drop(&mut self) {
        for p in self.pins.values() {
            let _ = std::fs::remove_file(p);
        }
    }
}

pub fn opts(node_args: BTreeMap<u64, Vec<String>>) -> ClusterOptions {
    ClusterOptions {
        launch: LaunchOptions {
            bin: env!("CARGO_BIN_EXE_raftmap").into(),
            agent_args: vec![],
            log_filter: std::env::var("RUST_LOG").unwrap_or("info,openraft=warn".into()),
            node_args,
            tls: true,
        },
        netns: false,
    }
}

pub fn k(i: u64) -> Vec<u8> {
    i.to_be_bytes().to_vec()
}

/// The committed contents of map `ct`, read linearizably.
pub async fn committed(client: &Client) -> HashMap<Vec<u8>, Vec<u8>> {
    client
        .dump("ct", true)
        .await
        .unwrap()
        .2
        .into_iter()
        .collect()
}

/// Waits until every listed node's kernel map equals the committed state read through
/// `client`, and returns that state.
pub async fn converge(
    maps: &NodeMaps,
    nodes: &[u64],
    client: &Client,
    what: &str,
) -> HashMap<Vec<u8>, Vec<u8>> {
    let deadline = Instant::now() + maps.mode.converge();
    loop {
        let committed = committed(client).await;
        let kernels: Vec<_> = nodes
            .iter()
            .map(|&n| maps.open(n).entries().unwrap())
            .collect();
        if kernels.iter().all(|m| *m == committed) {
            return committed;
        }
        if Instant::now() > deadline {
            let sizes: Vec<_> = kernels.iter().map(HashMap::len).collect();
            panic!(
                "{what}: kernel maps did not converge to the committed state ({} entries); kernel sizes {sizes:?}",
                committed.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `cond` holds, or fails the test naming `what`.
pub async fn wait_until(mode: Mode, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + mode.converge();
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {:?}",
            mode.converge()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sum of a node's metric series of `family` whose labels contain every one of `labels`
/// (`map="ct"`, say).
pub fn metric(c: &LocalCluster, n: u64, family: &str, labels: &[&str]) -> f64 {
    let addr = c.node(n).unwrap().metrics_addr.clone();
    let (_, body) = raftmap_jepsen::cluster::http_get(&addr, "/metrics").unwrap();
    body.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(family)?;
            let (labelled, value) = match rest.strip_prefix('{') {
                Some(r) => r.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            labels
                .iter()
                .all(|want| labelled.split(',').any(|l| l == *want))
                .then(|| value.trim().parse::<f64>().ok())?
        })
        .sum()
}

/// Watches `held` keys of a kernel map from a thread until stopped; panics if one is ever
/// missing or has another value.
pub fn watch_entries(
    pin: PathBuf,
    held: Vec<(Vec<u8>, Vec<u8>)>,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let handle = std::thread::spawn(move || {
        let m = KernelMap::open_pinned(&pin).unwrap();
        let mut checks = 0u64;
        while !s.load(Ordering::SeqCst) {
            for (key, value) in &held {
                assert_eq!(
                    m.lookup(key).unwrap().as_ref(),
                    Some(value),
                    "entry {key:?} vanished or changed"
                );
            }
            checks += 1;
        }
        checks
    });
    (stop, handle)
}

/// Syscall updates and deletes, failed updates, API writes, changes made while a daemon was
/// down (the restart merge, twice), and a map recreated by its program.
pub async fn kernel_maps_follow_the_log_across_nodes_restarts_and_recreation(mode: Mode) {
    let t = mode.t();
    let maps = NodeMaps::create(mode, "sync", &[1, 2, 3], 8, 8);
    let mut c = LocalCluster::start(opts(maps.args("ct")), 3, 0, t)
        .await
        .unwrap();
    maps.expect_backend(&mut c, &[1, 2, 3]).await;
    let client = c.client(1).await.unwrap();
    // The first node to see its map declared the schema from the kernel map's layout.
    let (schema, _, _) = client.dump("ct", true).await.unwrap();
    assert_eq!(
        (schema.key_size, schema.value_size, schema.max_entries),
        (8, 8, 4096)
    );
    let all = [1, 2, 3];

    // A syscall update on node 2 reaches nodes 1 and 3.
    maps.open(2)
        .update(&k(1), &k(100), UpdateFlags::Any)
        .unwrap();
    let m = converge(&maps, &all, &client, "update on node 2").await;
    assert_eq!(m.get(&k(1)), Some(&k(100)));
    // A delete on node 3 reaches the others.
    maps.open(3)
        .update(&k(2), &k(200), UpdateFlags::Any)
        .unwrap();
    converge(&maps, &all, &client, "second update").await;
    assert!(maps.open(3).delete(&k(1)).unwrap());
    let m = converge(&maps, &all, &client, "delete on node 3").await;
    assert_eq!(m.len(), 1);
    // A failed update (BPF_NOEXIST on an existing key) changes nothing anywhere.
    assert!(maps
        .open(1)
        .update(&k(2), &k(999), UpdateFlags::NoExist)
        .is_err());
    let m = converge(&maps, &all, &client, "failed update").await;
    assert_eq!(m.get(&k(2)), Some(&k(200)));
    // A write through the API lands in every kernel map.
    client.put("ct", k(3), k(300)).await.unwrap();
    let m = converge(&maps, &all, &client, "API write").await;
    assert_eq!(m.get(&k(3)), Some(&k(300)));

    // Changes made while node 2's daemon is down are replicated when it comes back, and the
    // cluster's writes in the meantime (and during its start) are not reverted by its stale map.
    c.kill(2).unwrap();
    let m2 = maps.open(2);
    m2.update(&k(4), &k(400), UpdateFlags::Any).unwrap();
    assert!(m2.delete(&k(2)).unwrap());
    for i in 10..20 {
        client.put("ct", k(i), k(i)).await.unwrap();
    }
    client.put("ct", k(3), k(333)).await.unwrap();
    c.restart(2).unwrap();
    for i in 10..20 {
        client.put("ct", k(i), k(i + 1)).await.unwrap();
    }
    c.wait_ready(2, t).await.unwrap();
    let m = converge(&maps, &all, &client, "changes while down").await;
    assert_eq!(m.get(&k(4)), Some(&k(400)));
    assert!(!m.contains_key(&k(2)));
    assert_eq!(
        m.get(&k(3)),
        Some(&k(333)),
        "a stale kernel value was proposed back"
    );
    for i in 10..20 {
        assert_eq!(m.get(&k(i)), Some(&k(i + 1)));
    }

    // Again, but node 2 catches up with the log before it finds its map again (the map is
    // unpinned meanwhile and pinned back, the same map): the entries applied meanwhile must
    // reach it, and its stale values must not be taken for changes made while it was down.
    c.kill(2).unwrap();
    let m2 = maps.open(2);
    std::fs::remove_file(&maps.pins[&2]).unwrap();
    client.put("ct", k(3), k(3333)).await.unwrap();
    m2.update(&k(5), &k(500), UpdateFlags::Any).unwrap();
    c.restart(2).unwrap();
    let target = client.status().await.unwrap().applied_index;
    c.wait_for(2, t, "catch up without its map", |s| {
        s.applied_index >= target
    })
    .await
    .unwrap();
    m2.pin(&maps.pins[&2]).unwrap();
    c.wait_ready(2, t).await.unwrap();
    let m = converge(&maps, &all, &client, "map found after catching up").await;
    assert_eq!(
        m.get(&k(3)),
        Some(&k(3333)),
        "a stale kernel value was proposed back"
    );
    assert_eq!(m.get(&k(5)), Some(&k(500)));

    // The program on node 3 restarts and recreates its map empty: node 3 refills it.
    std::fs::remove_file(&maps.pins[&3]).unwrap();
    KernelMap::create(MapKind::Hash, 8, 8, 4096, "rm_it")
        .unwrap()
        .pin(&maps.pins[&3])
        .unwrap();
    let m = converge(&maps, &all, &client, "recreated map").await;
    assert_eq!(m.len(), 13, "{m:?}");
    // And the recreated map's changes are captured again.
    maps.open(3)
        .update(&k(6), &k(600), UpdateFlags::Any)
        .unwrap();
    let m = converge(&maps, &all, &client, "update to the recreated map").await;
    assert_eq!(m.get(&k(6)), Some(&k(600)));
}

/// A node whose kernel map has another layout than the cluster's schema refuses to sync it
/// and never writes it.
pub async fn a_kernel_map_with_another_schema_is_refused_and_left_alone(mode: Mode) {
    let t = mode.t();
    let maps = NodeMaps::create(mode, "schema", &[1], 8, 8);
    let odd = NodeMaps::create(mode, "schema-odd", &[2], 8, 16);
    let mut args = maps.args("ct");
    args.extend(odd.args("ct"));
    let mut c = LocalCluster::start(opts(args), 1, 0, t).await.unwrap();
    maps.expect_backend(&mut c, &[1]).await;
    let client = c.client(1).await.unwrap();
    client.put("ct", k(1), k(1)).await.unwrap();
    c.spawn(2, Some(1), true).unwrap();
    c.wait_for(2, t, "refuse its kernel map", |s| {
        s.watched.iter().any(|w| w.state.starts_with("refused"))
    })
    .await
    .unwrap();
    let st = c.client(2).await.unwrap().status().await.unwrap();
    let state = &st.watched[0].state;
    assert!(
        state.contains("value 16 B") && state.contains("value 8 B"),
        "the refusal names both schemas: {state}"
    );
    // Committed changes are not applied to it.
    odd.open(2)
        .update(&k(7), &[7; 16], UpdateFlags::Any)
        .unwrap();
    client.put("ct", k(2), k(2)).await.unwrap();
    c.wait_applied(&[2], client.status().await.unwrap().applied_index, t)
        .await
        .unwrap();
    assert_eq!(
        odd.open(2).entries().unwrap().len(),
        1,
        "a refused map was written"
    );
}

/// A bounded random mix of kernel updates and deletes on every node and API writes.
pub async fn random_workload_on_every_node_converges_byte_for_byte(mode: Mode, rounds: u64) {
    let maps = NodeMaps::create(mode, "random", &[1, 2, 3], 8, 8);
    let mut c = LocalCluster::start(opts(maps.args("ct")), 3, 0, mode.t())
        .await
        .unwrap();
    maps.expect_backend(&mut c, &[1, 2, 3]).await;
    let client = c.client(1).await.unwrap();
    let kmaps: Vec<_> = [1, 2, 3].iter().map(|&n| maps.open(n)).collect();
    // A small deterministic generator: bounded count, no time-based loop.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..rounds {
        let r = next();
        let key = k(r % 40);
        match r % 7 {
            0 => {
                let _ = kmaps[(r / 7 % 3) as usize].delete(&key);
            }
            1 => {
                client.put("ct", key, k(round)).await.unwrap();
            }
            _ => kmaps[(r / 7 % 3) as usize]
                .update(&key, &k(round), UpdateFlags::Any)
                .unwrap(),
        }
    }
    let m = converge(&maps, &[1, 2, 3], &client, "random workload").await;
    assert!(!m.is_empty());
}

/// Writes `keys` through the API, `per_entry` of them to a log entry, each key's value given
/// by `value`.
pub async fn put_all(
    client: &Client,
    keys: std::ops::Range<u64>,
    per_entry: u64,
    value: impl Fn(u64) -> Vec<u8>,
) {
    let keys: Vec<u64> = keys.collect();
    for chunk in keys.chunks(per_entry.max(1) as usize) {
        let ops = chunk
            .iter()
            .map(|&i| raftmap_node::put("ct", k(i), value(i)))
            .collect();
        client.write(ops).await.unwrap();
    }
}

/// A learner that was down while the log moved past it gets a snapshot, installed into its
/// kernel map by diff: entries it kept are never missing, watched from a second thread.
/// `writes` keys are written, `per_entry` to a log entry, with a snapshot every
/// `snapshot_logs` entries.
pub async fn a_learner_back_after_the_log_was_purged_installs_the_snapshot_by_diff(
    mode: Mode,
    writes: u64,
    per_entry: u64,
    snapshot_logs: u64,
) {
    let t = mode.t();
    let maps = NodeMaps::create(mode, "resnap", &[1, 2, 3, 4], 8, 8);
    let mut o = opts(maps.args("ct"));
    o.launch.agent_args = vec!["--snapshot-logs".into(), snapshot_logs.to_string()];
    let mut c = LocalCluster::start(o, 3, 1, t).await.unwrap();
    maps.expect_backend(&mut c, &[1, 2, 3, 4]).await;
    let client = c.client(1).await.unwrap();
    put_all(&client, 0..50, per_entry, k).await;
    converge(&maps, &[1, 2, 3, 4], &client, "before the learner stops").await;
    let left_at = c
        .client(4)
        .await
        .unwrap()
        .status()
        .await
        .unwrap()
        .last_log_index;
    c.kill(4).unwrap();
    // While it is down: overwrite half of what it holds, add more, and purge the log past it.
    put_all(&client, 25..writes, per_entry, |i| k(i + 1000)).await;
    c.wait_for(1, t, "purge past the learner", |s| s.purged_index > left_at)
        .await
        .unwrap();
    let kept: Vec<_> = (0..25u64).map(|i| (k(i), k(i))).collect();
    let (stop, watcher) = watch_entries(maps.pins[&4].clone(), kept);
    c.restart(4).unwrap();
    let m = converge(&maps, &[1, 2, 3, 4], &client, "learner back").await;
    stop.store(true, Ordering::SeqCst);
    assert!(
        watcher
            .join()
            .expect("an entry the learner kept vanished during the install")
            > 0
    );
    assert_eq!(m.len() as u64, writes);
    // The snapshot reached the kernel map by diff: installed into the adopted map, or, when
    // it arrived before the daemon had adopted the map again, by the reconcile that adopts
    // it (the map outlived the daemon) writing what the snapshot changed.
    let log = c.log_tail(4, 200);
    assert!(log.contains("installed snapshot"), "{log}");
    assert!(
        log.contains("installed snapshot into kernel map by diff")
            || log.contains("kernel map outlived the daemon"),
        "{log}"
    );
}

/// Loads the conntrack XDP program on each listed node with a map of `max` entries pinned at
/// the node's path (the others get plain LRU maps of the same layout).
pub fn conntrack_maps(
    mode: Mode,
    tag: &str,
    nodes: &[u64],
    programs: &[u64],
    max: u32,
) -> (NodeMaps, BTreeMap<u64, Conntrack>) {
    let maps = NodeMaps::at(mode, tag, nodes);
    let mut progs = BTreeMap::new();
    for &n in nodes {
        if programs.contains(&n) {
            progs.insert(n, Conntrack::load_sized(&maps.pins[&n], max).unwrap());
        } else {
            KernelMap::create(MapKind::LruHash, CT_KEY_SIZE, CT_VALUE_SIZE, max, "ct")
                .unwrap()
                .pin(&maps.pins[&n])
                .unwrap();
        }
    }
    (maps, progs)
}
