//! Real kernel maps kept identical across nodes: three `raftmap agent` processes on one kernel,
//! each watching its own pinned BPF map (scan capture on this kernel). Needs root and bpffs;
//! under RAFTMAP_REQUIRE_BPF=1 (CI) a missing capability fails instead of skipping.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use raftmap_ebpf_hooks::{bpf_or_skip, KernelMap, MapKind, UpdateFlags};
use raftmap_jepsen::cluster::{ClusterOptions, LaunchOptions, LocalCluster};
use raftmap_node::Client;

const T: Duration = Duration::from_secs(60);
const CONVERGE: Duration = Duration::from_secs(20);

/// One pinned map per node, unpinned when dropped.
struct NodeMaps {
    pins: BTreeMap<u64, PathBuf>,
}

impl NodeMaps {
    fn create(tag: &str, nodes: &[u64], key: u32, value: u32) -> Self {
        Self::create_sized(tag, nodes, key, value, 4096)
    }

    fn create_sized(tag: &str, nodes: &[u64], key: u32, value: u32, max: u32) -> Self {
        let mut pins = BTreeMap::new();
        for &n in nodes {
            let pin = raftmap_ebpf_hooks::bpffs()
                .join(format!("raftmap-it-{}-{tag}-{n}", std::process::id()));
            let _ = std::fs::remove_file(&pin);
            KernelMap::create(MapKind::Hash, key, value, max, "rm_it")
                .unwrap()
                .pin(&pin)
                .unwrap();
            pins.insert(n, pin);
        }
        Self { pins }
    }

    fn open(&self, n: u64) -> KernelMap {
        KernelMap::open_pinned(&self.pins[&n]).unwrap()
    }

    fn args(&self, map: &str) -> BTreeMap<u64, Vec<String>> {
        self.args_scanning(map, Duration::from_millis(20))
    }

    /// Agent arguments watching each node's map, scanning it every `every`.
    fn args_scanning(&self, map: &str, every: Duration) -> BTreeMap<u64, Vec<String>> {
        self.pins
            .iter()
            .map(|(n, p)| {
                (
                    *n,
                    vec![
                        "--watch".to_string(),
                        format!("{map}={}", p.display()),
                        "--scan-interval-ms".into(),
                        every.as_millis().to_string(),
                    ],
                )
            })
            .collect()
    }
}

impl Drop for NodeMaps {
    fn drop(&mut self) {
        for p in self.pins.values() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn opts(node_args: BTreeMap<u64, Vec<String>>) -> ClusterOptions {
    ClusterOptions {
        launch: LaunchOptions {
            bin: env!("CARGO_BIN_EXE_raftmap").into(),
            agent_args: vec![],
            log_filter: "info,openraft=warn".into(),
            node_args,
            tls: true,
        },
        netns: false,
    }
}

fn k(i: u64) -> Vec<u8> {
    i.to_be_bytes().to_vec()
}

/// Waits until every listed node's kernel map equals `expected` (or, with `None`, until they all
/// equal each other and the committed state read through `client`).
async fn converge(
    maps: &NodeMaps,
    nodes: &[u64],
    client: &Client,
    what: &str,
) -> HashMap<Vec<u8>, Vec<u8>> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let committed: HashMap<_, _> = client
            .dump("ct", true)
            .await
            .unwrap()
            .2
            .into_iter()
            .collect();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_maps_follow_the_log_across_nodes_restarts_and_recreation() {
    if !bpf_or_skip("kernel_maps_follow_the_log_across_nodes_restarts_and_recreation") {
        return;
    }
    let maps = NodeMaps::create("sync", &[1, 2, 3], 8, 8);
    let mut c = LocalCluster::start(opts(maps.args("ct")), 3, 0, T)
        .await
        .unwrap();
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
    c.wait_ready(2, T).await.unwrap();
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
    c.wait_for(2, T, "catch up without its map", |s| {
        s.applied_index >= target
    })
    .await
    .unwrap();
    m2.pin(&maps.pins[&2]).unwrap();
    c.wait_ready(2, T).await.unwrap();
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_map_with_another_schema_is_refused_and_left_alone() {
    if !bpf_or_skip("a_kernel_map_with_another_schema_is_refused_and_left_alone") {
        return;
    }
    let maps = NodeMaps::create("schema", &[1], 8, 8);
    let odd = NodeMaps::create("schema-odd", &[2], 8, 16);
    let mut args = maps.args("ct");
    args.extend(odd.args("ct"));
    let mut c = LocalCluster::start(opts(args), 1, 0, T).await.unwrap();
    let client = c.client(1).await.unwrap();
    client.put("ct", k(1), k(1)).await.unwrap();
    c.spawn(2, Some(1), true).unwrap();
    c.wait_for(2, T, "refuse its kernel map", |s| {
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
    assert!(
        odd.open(2).entries().unwrap().is_empty(),
        "a refused map was written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_workload_on_every_node_converges_byte_for_byte() {
    if !bpf_or_skip("random_workload_on_every_node_converges_byte_for_byte") {
        return;
    }
    let maps = NodeMaps::create("random", &[1, 2, 3], 8, 8);
    let c = LocalCluster::start(opts(maps.args("ct")), 3, 0, T)
        .await
        .unwrap();
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
    for round in 0..400u64 {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_learner_adopts_its_map_and_gets_a_snapshot_without_losing_entries() {
    if !bpf_or_skip("a_new_learner_adopts_its_map_and_gets_a_snapshot_without_losing_entries") {
        return;
    }
    let maps = NodeMaps::create("snap", &[1, 2, 3, 4], 8, 8);
    let mut o = opts(maps.args("ct"));
    o.launch.agent_args = vec!["--snapshot-logs".into(), "50".into()];
    let mut c = LocalCluster::start(o, 3, 0, T).await.unwrap();
    let client = c.client(1).await.unwrap();
    // One entry per write: several snapshots, and the log is purged.
    for i in 0..300u64 {
        client.put("ct", k(i), k(i + 1)).await.unwrap();
    }
    c.wait_for(1, T, "purge its log", |s| s.purged_index > 0)
        .await
        .unwrap();

    // The learner's map already holds some of the entries, as after an earlier life.
    let held: Vec<u64> = (0..300).step_by(7).collect();
    let m4 = maps.open(4);
    for &i in &held {
        m4.update(&k(i), &k(i + 1), UpdateFlags::Any).unwrap();
    }
    // Watch them from a second thread for the whole install.
    let (stop, watcher) = watch_entries(
        maps.pins[&4].clone(),
        held.iter().map(|&i| (k(i), k(i + 1))).collect(),
    );
    c.spawn(4, Some(1), true).unwrap();
    c.wait_ready(4, T).await.unwrap();
    let m = converge(&maps, &[1, 2, 3, 4], &client, "learner after snapshot").await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let checks = watcher
        .join()
        .expect("a held entry disappeared during the install");
    assert!(checks > 0);
    assert_eq!(m.len(), 300);
    let st = c.client(4).await.unwrap().status().await.unwrap();
    assert!(
        st.snapshot_index > 0,
        "the learner did not get a snapshot: {st:?}"
    );
}

/// Watches `held` keys of a kernel map from a thread until stopped; panics if one is ever
/// missing or has another value.
fn watch_entries(
    pin: PathBuf,
    held: Vec<(Vec<u8>, Vec<u8>)>,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<u64>,
) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let handle = std::thread::spawn(move || {
        let m = KernelMap::open_pinned(&pin).unwrap();
        let mut checks = 0u64;
        while !s.load(std::sync::atomic::Ordering::SeqCst) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_back_after_the_log_was_purged_installs_the_snapshot_by_diff() {
    if !bpf_or_skip("a_learner_back_after_the_log_was_purged_installs_the_snapshot_by_diff") {
        return;
    }
    let maps = NodeMaps::create("resnap", &[1, 2, 3, 4], 8, 8);
    let mut o = opts(maps.args("ct"));
    o.launch.agent_args = vec!["--snapshot-logs".into(), "50".into()];
    let mut c = LocalCluster::start(o, 3, 1, T).await.unwrap();
    let client = c.client(1).await.unwrap();
    for i in 0..50u64 {
        client.put("ct", k(i), k(i)).await.unwrap();
    }
    converge(&maps, &[1, 2, 3, 4], &client, "before the learner stops").await;
    c.kill(4).unwrap();
    // While it is down: overwrite half of what it holds, add more, and purge the log.
    for i in 25..350u64 {
        client.put("ct", k(i), k(i + 1000)).await.unwrap();
    }
    c.wait_for(1, T, "purge past the learner", |s| s.purged_index > 60)
        .await
        .unwrap();
    let kept: Vec<_> = (0..25u64).map(|i| (k(i), k(i))).collect();
    let (stop, watcher) = watch_entries(maps.pins[&4].clone(), kept);
    c.restart(4).unwrap();
    let m = converge(&maps, &[1, 2, 3, 4], &client, "learner back").await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(
        watcher
            .join()
            .expect("an entry the learner kept vanished during the install")
            > 0
    );
    assert_eq!(m.len(), 350);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syscall_capture_replicates_without_waiting_for_a_scan() {
    if !bpf_or_skip("syscall_capture_replicates_without_waiting_for_a_scan") {
        return;
    }
    let maps = NodeMaps::create("events", &[1, 2, 3], 8, 8);
    // Scans every ten minutes: only event-driven capture can carry these changes in time.
    let args = maps.args_scanning("ct", Duration::from_secs(600));
    let c = LocalCluster::start(opts(args), 3, 0, T).await.unwrap();
    let client = c.client(1).await.unwrap();
    let st = c.client(2).await.unwrap().status().await.unwrap();
    assert!(
        ["syscall", "fexit"].contains(&st.watched[0].backend.as_str()),
        "an event-driven backend loads on this kernel: {st:?}"
    );

    // From this process (a bpf(2) client like any other).
    maps.open(2)
        .update(&k(1), &k(10), UpdateFlags::Any)
        .unwrap();
    let m = converge(&maps, &[1, 2, 3], &client, "syscall update").await;
    assert_eq!(m.get(&k(1)), Some(&k(10)));
    // From bpftool.
    let pin = maps.pins[&3].display().to_string();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>();
    let mut update = vec![
        "map".to_string(),
        "update".into(),
        "pinned".into(),
        pin.clone(),
        "key".into(),
        "hex".into(),
    ];
    update.extend(hex(&k(2)));
    update.extend(["value".into(), "hex".into()]);
    update.extend(hex(&k(20)));
    let ok = std::process::Command::new("bpftool")
        .args(&update)
        .status()
        .unwrap()
        .success();
    assert!(ok, "bpftool update");
    let m = converge(&maps, &[1, 2, 3], &client, "bpftool update").await;
    assert_eq!(m.get(&k(2)), Some(&k(20)));
    // A delete, and a failed update that must not be replicated.
    assert!(maps.open(1).delete(&k(1)).unwrap());
    assert!(maps
        .open(1)
        .update(&k(2), &k(99), UpdateFlags::NoExist)
        .is_err());
    let m = converge(&maps, &[1, 2, 3], &client, "delete").await;
    assert_eq!(m.len(), 1);
    assert_eq!(m.get(&k(2)), Some(&k(20)));
    // A batch syscall: the capture program does not decode it element by element, it counts it,
    // and the node scans at once.
    let (a, b, c3) = (k(5), k(6), k(7));
    maps.open(3)
        .update_batch(&[(&a, &k(50)), (&b, &k(60)), (&c3, &k(70))])
        .unwrap();
    let m = converge(&maps, &[1, 2, 3], &client, "batch update").await;
    assert_eq!(m.get(&k(6)), Some(&k(60)));
}

/// Waits until `cond` holds, or fails the test naming `what`.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + CONVERGE;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {CONVERGE:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_write_that_could_not_commit_outlives_the_backlog_and_commits_later() {
    if !bpf_or_skip("a_local_write_that_could_not_commit_outlives_the_backlog_and_commits_later") {
        return;
    }
    let maps = NodeMaps::create("retry", &[1, 2, 3], 8, 8);
    // Scans every ten minutes: the local write is captured from its event, and only the
    // retry of its failed proposal can propose it again.
    let args = maps.args_scanning("ct", Duration::from_secs(600));
    let mut c = LocalCluster::start(opts(args), 3, 0, T).await.unwrap();
    // Node 3 falls behind: key 1 takes values it does not apply.
    c.pause(3).unwrap();
    for v in 1..=20 {
        maps.open(1).update(&k(1), &k(v), UpdateFlags::Any).unwrap();
    }
    let on_2 = maps.open(2);
    wait_until("node 2 applies the last value", || {
        on_2.lookup(&k(1)).ok().flatten() == Some(k(20))
    })
    .await;
    // The others go down; node 3 comes back alone, and a program writes its map.
    c.kill(1).unwrap();
    c.kill(2).unwrap();
    c.resume(3).unwrap();
    maps.open(3)
        .update(&k(1), &k(999), UpdateFlags::Any)
        .unwrap();
    wait_until("node 3 reports its write did not commit", || {
        c.counter(3, "raftmap_kernel_uncommitted_total")
            .is_ok_and(|n| n >= 1.0)
    })
    .await;
    // The others come back, and node 3 applies the values it missed (older than its write).
    c.restart(1).unwrap();
    c.restart(2).unwrap();
    c.wait_ready(1, T).await.unwrap();
    let client = c.client(1).await.unwrap();
    let m = converge(&maps, &[1, 2, 3], &client, "after the others came back").await;
    assert_eq!(
        m.get(&k(1)),
        Some(&k(999)),
        "node 3's local write, made after the others' last commit, is the key's last value"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bpf_program_writes_replicate() {
    if !bpf_or_skip("bpf_program_writes_replicate") {
        return;
    }
    use raftmap_ebpf_hooks::{Conntrack, CT_KEY_SIZE, CT_VALUE_SIZE};
    // Node 1 runs the conntrack XDP program; nodes 2 and 3 have maps of the same layout.
    let dir = |n: u64| {
        raftmap_ebpf_hooks::bpffs().join(format!("raftmap-it-{}-prog-{n}", std::process::id()))
    };
    let maps = NodeMaps {
        pins: (1..=3).map(|n| (n, dir(n))).collect(),
    };
    for p in maps.pins.values() {
        let _ = std::fs::remove_file(p);
    }
    let mut prog = Conntrack::load(&maps.pins[&1]).unwrap();
    for n in [2, 3] {
        KernelMap::create(MapKind::LruHash, CT_KEY_SIZE, CT_VALUE_SIZE, 65536, "ct")
            .unwrap()
            .pin(&maps.pins[&n])
            .unwrap();
    }
    let c = LocalCluster::start(opts(maps.args("ct")), 3, 0, T)
        .await
        .unwrap();
    let client = c.client(1).await.unwrap();
    for i in 0..100u16 {
        let frame = Conntrack::frame([10, 0, 0, 1], [10, 0, 0, 2], 10_000 + i, 443, true);
        prog.run(&frame).unwrap();
        if i % 10 == 0 {
            prog.run(&frame).unwrap(); // counted in place
        }
    }
    let m = converge(&maps, &[1, 2, 3], &client, "program writes").await;
    assert_eq!(m.len(), 100);
    let v = &m[&Conntrack::key([10, 0, 0, 1], [10, 0, 0, 2], 10_000, 443, true)];
    assert_eq!(
        u64::from_ne_bytes(v[..8].try_into().unwrap()),
        2,
        "in-place count replicated"
    );

    // The program removes a flow on FIN: deletions by a BPF program reach the other nodes too.
    for i in 0..10u16 {
        let mut fin = Conntrack::frame([10, 0, 0, 1], [10, 0, 0, 2], 10_000 + i, 443, true);
        fin[47] = 0x11; // FIN, ACK
        prog.run(&fin).unwrap();
    }
    let m = converge(&maps, &[1, 2, 3], &client, "program deletes").await;
    assert_eq!(m.len(), 90);
    assert!(!m.contains_key(&Conntrack::key(
        [10, 0, 0, 1],
        [10, 0, 0, 2],
        10_000,
        443,
        true
    )));
}

/// A map full of entries before raftmap starts (the normal case for conntrack, NAT and load
/// balancer tables): one agent watches it, the cluster is initialised, a second agent joins.
/// Every entry ends up in both kernel maps, byte for byte, and none is undone.
async fn a_prefilled_map_is_adopted_whole(tag: &str, value_size: u32, entries: u32) {
    let maps = NodeMaps::create_sized(tag, &[1, 2], 16, value_size, entries * 2);
    let origin = maps.open(1);
    let contents: HashMap<Vec<u8>, Vec<u8>> = (0..entries)
        .map(|i| {
            let mut key = vec![0u8; 16];
            key[..4].copy_from_slice(&i.to_be_bytes());
            let value: Vec<u8> = (0..value_size).map(|j| (i + j) as u8).collect();
            (key, value)
        })
        .collect();
    let pairs: Vec<(&[u8], &[u8])> = contents
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    for chunk in pairs.chunks(256) {
        origin.update_batch(chunk).unwrap();
    }
    assert_eq!(origin.entries().unwrap().len(), entries as usize);
    let mut c = LocalCluster::start(
        opts(maps.args_scanning("ct", Duration::from_millis(200))),
        2,
        0,
        T,
    )
    .await
    .unwrap();
    for n in [1, 2] {
        c.wait_ready(n, T).await.unwrap();
    }
    let client = c.client(2).await.unwrap();
    let m = converge(&maps, &[1, 2], &client, "pre-filled map").await;
    assert!(
        m == contents,
        "the committed state is not the pre-filled map"
    );
    for n in [1, 2] {
        let log = c.log_tail(n, 10_000);
        assert!(
            !log.contains("undoing"),
            "node {n} undid captured changes:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_prefilled_with_20k_entries_of_1_kib_is_adopted_whole() {
    if !bpf_or_skip("a_map_prefilled_with_20k_entries_of_1_kib_is_adopted_whole") {
        return;
    }
    a_prefilled_map_is_adopted_whole("fill1k", 1024, 20_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_prefilled_with_2k_entries_of_16_kib_is_adopted_whole() {
    if !bpf_or_skip("a_map_prefilled_with_2k_entries_of_16_kib_is_adopted_whole") {
        return;
    }
    // Values too large for capture events: the scan alone captures this map.
    a_prefilled_map_is_adopted_whole("fill16k", 16 * 1024, 2_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maps_that_cannot_be_synced_make_readyz_fail_with_their_reasons() {
    if !bpf_or_skip("maps_that_cannot_be_synced_make_readyz_fail_with_their_reasons") {
        return;
    }
    let maps = NodeMaps::create("ready", &[1], 8, 8);
    let odd = NodeMaps::create("ready-odd", &[1], 8, 8);
    let pin = |what: &str| {
        raftmap_ebpf_hooks::bpffs().join(format!("raftmap-it-{}-ready-{what}", std::process::id()))
    };
    let (percpu, missing) = (pin("percpu"), pin("missing"));
    let _ = std::fs::remove_file(&percpu);
    let created = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&percpu)
        .args([
            "type",
            "percpu_hash",
            "key",
            "8",
            "value",
            "8",
            "entries",
            "16",
        ])
        .args(["name", "rm_it_pcpu"])
        .status()
        .unwrap();
    assert!(created.success(), "bpftool map create");
    struct Unpin(PathBuf);
    impl Drop for Unpin {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _unpin = Unpin(percpu.clone());
    let mut c = LocalCluster::start(opts(maps.args("ct")), 1, 0, T)
        .await
        .unwrap();
    let client = c.client(1).await.unwrap();
    // The cluster knows "odd" with 16-byte values; this node's map has 8.
    client
        .declare(&raftmap_node::storage::MapSchema::hash("odd", 8, 16, 4096))
        .await
        .unwrap();
    let watch = |map: &str, at: &std::path::Path| {
        vec!["--watch".to_string(), format!("{map}={}", at.display())]
    };
    let mut args = maps.args("ct").remove(&1).unwrap();
    args.extend(watch("odd", &odd.pins[&1]));
    args.extend(watch("pcpu", &percpu));
    args.extend(watch("gone", &missing));
    c.set_node_args(1, args);
    c.kill(1).unwrap();
    c.restart(1).unwrap();
    c.wait_for(1, T, "report every watched map's state", |s| {
        s.watched.len() == 4
            && s.watched.iter().filter(|w| w.state != "synced").count() == 3
            && s.watched
                .iter()
                .all(|w| !w.state.starts_with("waiting: looking"))
    })
    .await
    .unwrap();
    let st = c.client(1).await.unwrap().status().await.unwrap();
    let state = |map: &str| {
        st.watched
            .iter()
            .find(|w| w.map == map)
            .map(|w| w.state.clone())
            .unwrap()
    };
    assert_eq!(state("ct"), "synced");
    assert!(
        state("odd").contains("value 16 B") && state("odd").contains("value 8 B"),
        "{}",
        state("odd")
    );
    assert!(state("pcpu").contains("PerCpuHash"), "{}", state("pcpu"));
    assert!(state("gone").contains("cannot open"), "{}", state("gone"));
    assert!(!st.ready);
    let addr = c.node(1).unwrap().metrics_addr.clone();
    let (code, body) = raftmap_jepsen::cluster::http_get(&addr, "/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    for (map, why) in [
        ("odd", "refused"),
        ("pcpu", "PerCpuHash"),
        ("gone", "cannot open"),
    ] {
        assert!(
            body.contains(&format!("map {map}")) && body.contains(why),
            "{body}"
        );
    }
    // The CLI shows the per-map states too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_raftmap"))
        .args(["status", "--endpoints", &c.node(1).unwrap().api_addr])
        .env("RAFTMAP_TLS_DIR", c.security().dir().unwrap())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    // And the certificate each node serves with.
    assert!(table.contains("spiffe://raftmap/local/node/1"), "{table}");
    for map in ["ct", "odd", "pcpu", "gone"] {
        assert!(table.contains(map), "{table}");
    }
    assert!(table.contains("not ready"), "{table}");
}
