//! Real kernel maps kept identical across nodes: three `raftmap agent` processes on one kernel,
//! each watching its own pinned BPF map (the syscall backend and the scan on this kernel; the
//! shared scenarios run with fexit alone in `tests/fexit.rs`). Needs root and bpffs; under
//! RAFTMAP_REQUIRE_BPF=1 (CI) a missing capability fails instead of skipping.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod kernel_sync;

use std::collections::HashMap;
use std::time::Duration;

use kernel_sync::{conntrack_maps, converge, k, opts, wait_until, watch_entries, Mode, NodeMaps};
use raftmap_ebpf_hooks::{bpf_or_skip, Conntrack, UpdateFlags};
use raftmap_jepsen::cluster::LocalCluster;

const T: Duration = Duration::from_secs(60);
const HOST: Mode = Mode::Host;

/// The scenarios shared with the fexit guests, on this machine.
macro_rules! shared {
    ($($name:ident $(($($arg:expr),*))?;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            if !bpf_or_skip(stringify!($name)) {
                return;
            }
            kernel_sync::$name(HOST $($(, $arg)*)?).await;
        }
    )*};
}

shared! {
    kernel_maps_follow_the_log_across_nodes_restarts_and_recreation;
    a_kernel_map_with_another_schema_is_refused_and_left_alone;
    random_workload_on_every_node_converges_byte_for_byte(400);
    a_learner_back_after_the_log_was_purged_installs_the_snapshot_by_diff(350, 1, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_learner_adopts_its_map_and_gets_a_snapshot_without_losing_entries() {
    if !bpf_or_skip("a_new_learner_adopts_its_map_and_gets_a_snapshot_without_losing_entries") {
        return;
    }
    let maps = NodeMaps::create(HOST, "snap", &[1, 2, 3, 4], 8, 8);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syscall_capture_replicates_without_waiting_for_a_scan() {
    if !bpf_or_skip("syscall_capture_replicates_without_waiting_for_a_scan") {
        return;
    }
    let maps = NodeMaps::create(HOST, "events", &[1, 2, 3], 8, 8);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_write_that_could_not_commit_outlives_the_backlog_and_commits_later() {
    if !bpf_or_skip("a_local_write_that_could_not_commit_outlives_the_backlog_and_commits_later") {
        return;
    }
    let maps = NodeMaps::create(HOST, "retry", &[1, 2, 3], 8, 8);
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
    wait_until(HOST, "node 2 applies the last value", || {
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
    wait_until(HOST, "node 3 reports its write did not commit", || {
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

/// A map full of entries before raftmap starts (the normal case for conntrack, NAT and load
/// balancer tables): one agent watches it, the cluster is initialised, a second agent joins.
/// Every entry ends up in both kernel maps, byte for byte, and none is undone.
async fn a_prefilled_map_is_adopted_whole(tag: &str, value_size: u32, entries: u32) {
    let maps = NodeMaps::create_sized(HOST, tag, &[1, 2], 16, value_size, entries * 2);
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
    let maps = NodeMaps::create(HOST, "ready", &[1], 8, 8);
    let odd = NodeMaps::create(HOST, "ready-odd", &[1], 8, 8);
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
    struct Unpin(std::path::PathBuf);
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

/// A BPF program's inserts, in-place counts (found by the scan) and deletes reach the other
/// nodes, and keep doing so after an outage of the whole cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bpf_program_writes_replicate() {
    if !bpf_or_skip("bpf_program_writes_replicate") {
        return;
    }
    let mode = HOST;
    let (maps, mut progs) = conntrack_maps(mode, "prog", &[1, 2, 3], &[1], 65536);
    let prog = progs.get_mut(&1).unwrap();
    let mut c = LocalCluster::start(opts(maps.args("ct")), 3, 0, mode.t())
        .await
        .unwrap();
    maps.expect_backend(&mut c, &[1, 2, 3]).await;
    let client = c.client(1).await.unwrap();
    for i in 0..100u16 {
        let frame = Conntrack::frame([10, 0, 0, 1], [10, 0, 0, 2], 10_000 + i, 443, true);
        prog.run(&frame).unwrap();
        if i % 10 == 0 {
            prog.run(&frame).unwrap(); // counted in place: no hook sees it, the scan does
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
        prog.run(&Conntrack::fin_frame(
            [10, 0, 0, 1],
            [10, 0, 0, 2],
            10_000 + i,
            443,
        ))
        .unwrap();
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

    // The whole cluster goes down while node 1's program opens flows. Node 1 comes back
    // first: proposing what changed meanwhile waits for a leader, which appears once the
    // others are back, 3 s later. From then on node 1's scan runs at its interval again (it
    // once paused nine times as long as that wait, missing the program's writes meanwhile).
    let flow = |i: u16| Conntrack::frame([10, 0, 0, 1], [10, 0, 0, 2], 20_000 + i, 443, true);
    for n in [1, 2, 3] {
        c.kill(n).unwrap();
    }
    for i in 0..10 {
        prog.run(&flow(i)).unwrap();
    }
    c.restart(1).unwrap();
    c.wait_up(1, mode.t()).await.unwrap();
    // The outage's length is the scenario (not a wait for a condition): the longer node 1's
    // merge waits for a leader, the longer the old pacing paused its scan (nine times as long).
    tokio::time::sleep(Duration::from_secs(3)).await;
    for n in [2, 3] {
        c.restart(n).unwrap();
        c.wait_up(n, mode.t()).await.unwrap();
    }
    let client = c.client(2).await.unwrap();
    let m = converge(&maps, &[1, 2, 3], &client, "flows opened during the outage").await;
    assert_eq!(m.len(), 100);
    for i in 10..20 {
        prog.run(&flow(i)).unwrap();
    }
    let m = converge(&maps, &[1, 2, 3], &client, "flows opened after the outage").await;
    assert_eq!(m.len(), 110);
}
