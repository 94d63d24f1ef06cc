//! The production capture path end to end: whole clusters on the fexit backend, in QEMU guests
//! booting Debian's stock cloud kernels (12: 6.1, 13: 6.12), since this machine's kernel
//! refuses tracing programs. `whole_clusters_on_fexit_in_stock_kernels` boots each kernel in
//! turn and runs itself there, where (seeing `RAFTMAP_VM_GUEST`) it runs every scenario of
//! [`guest_scenarios`] with the periodic scan off: every change must arrive as an event. Needs
//! the VM assets `scripts/install-deps.sh` prepares; under RAFTMAP_REQUIRE_BPF=1 their absence
//! fails the test instead of skipping it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod kernel_sync;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant};

use kernel_sync::{committed, conntrack_maps, converge, k, metric, opts, Mode, NodeMaps};
use raftmap_ebpf_hooks::{run_in_guest, Conntrack, GUEST_KERNELS};
use raftmap_jepsen::cluster::LocalCluster;
use raftmap_node::Client;

const GUEST: Mode = Mode::FexitOnly;

type Scenario = Pin<Box<dyn Future<Output = ()>>>;

/// Every scenario the guests run, by name: those of `tests/kernel.rs`, sized for an emulated
/// guest, and those only fexit can pass. (`bpf_program_writes_replicate` is left to
/// `a_program_and_the_appliers_write_the_same_lru_maps`, whose programs open and close flows on
/// every node, with no scan to find them.)
fn guest_scenarios() -> Vec<(&'static str, Scenario)> {
    vec![
        (
            "kernel_maps_follow_the_log_across_nodes_restarts_and_recreation",
            Box::pin(
                kernel_sync::kernel_maps_follow_the_log_across_nodes_restarts_and_recreation(GUEST),
            ),
        ),
        (
            "a_kernel_map_with_another_schema_is_refused_and_left_alone",
            Box::pin(
                kernel_sync::a_kernel_map_with_another_schema_is_refused_and_left_alone(GUEST),
            ),
        ),
        (
            "random_workload_on_every_node_converges_byte_for_byte",
            Box::pin(
                kernel_sync::random_workload_on_every_node_converges_byte_for_byte(GUEST, 120),
            ),
        ),
        (
            "a_learner_back_after_the_log_was_purged_installs_the_snapshot_by_diff",
            Box::pin(
                kernel_sync::a_learner_back_after_the_log_was_purged_installs_the_snapshot_by_diff(
                    GUEST, 150, 5, 10,
                ),
            ),
        ),
        (
            "a_program_and_the_appliers_write_the_same_lru_maps",
            Box::pin(a_program_and_the_appliers_write_the_same_lru_maps()),
        ),
        (
            "a_full_lru_map_evicts_locally_without_a_cascade",
            Box::pin(a_full_lru_map_evicts_locally_without_a_cascade()),
        ),
        (
            "batch_syscalls_are_captured_element_by_element",
            Box::pin(batch_syscalls_are_captured_element_by_element()),
        ),
        (
            "program_write_latency_with_fexit_and_with_the_scan",
            Box::pin(program_write_latency_with_fexit_and_with_the_scan()),
        ),
        (
            "the_kernel_map_workload_under_kills_and_pauses",
            Box::pin(the_kernel_map_workload_under_kills_and_pauses()),
        ),
    ]
}

/// The scenarios to run: all of them, or those `RAFTMAP_GUEST_SCENARIOS` names (a
/// comma-separated list, for a developer's run; the host passes it on to the guests).
fn selected_scenarios() -> Vec<(&'static str, Scenario)> {
    let only = std::env::var(ONLY).ok();
    guest_scenarios()
        .into_iter()
        .filter(|(n, _)| only.as_ref().is_none_or(|o| o.split(',').any(|w| w == *n)))
        .collect()
}

const ONLY: &str = "RAFTMAP_GUEST_SCENARIOS";

/// In the guest: runs every scenario, each on a runtime of its own, and fails naming those
/// that failed. Prints `guest-scenario: NAME ok|FAILED` for the host.
fn run_guest_scenarios() {
    let mut failed = Vec::new();
    for (name, scenario) in selected_scenarios() {
        let started = Instant::now();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(scenario)))
            .is_ok();
        drop(rt);
        println!(
            "guest-scenario: {name} {} ({:.0} s)",
            if ok { "ok" } else { "FAILED" },
            started.elapsed().as_secs_f64()
        );
        if !ok {
            failed.push(name);
        }
    }
    assert!(failed.is_empty(), "failed in the guest: {failed:?}");
}

/// A line the host test prints from the guest's output.
fn figure(what: std::fmt::Arguments<'_>) {
    println!("guest-figure: {what}");
}

fn counter(c: &LocalCluster, n: u64, family: &str, labels: &[&str]) -> u64 {
    metric(c, n, family, labels) as u64
}

/// Waits until every node has applied what the leader has, and holds nothing the committed
/// state does not (a full LRU map may hold less: the applier's own evictions stay local).
async fn settle_within_committed(
    maps: &NodeMaps,
    c: &mut LocalCluster,
    client: &Client,
    nodes: &[u64],
    what: &str,
) -> HashMap<Vec<u8>, Vec<u8>> {
    let deadline = Instant::now() + GUEST.converge();
    loop {
        let index = client.status().await.unwrap().applied_index;
        c.wait_applied(nodes, index, GUEST.t()).await.unwrap();
        let committed = committed(client).await;
        let stray: Vec<(u64, usize)> = nodes
            .iter()
            .map(|&n| {
                let extra = maps
                    .open(n)
                    .entries()
                    .unwrap()
                    .into_iter()
                    .filter(|(k, v)| committed.get(k) != Some(v))
                    .count();
                (n, extra)
            })
            .collect();
        if stray.iter().all(|(_, extra)| *extra == 0) {
            return committed;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: kernel entries that are not committed (node, count): {stray:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An XDP program on every node writes its flows into a conntrack-shaped LRU map while the
/// appliers write the same maps: every applier write is recognised as an echo and none is
/// proposed again; no program write is taken for an echo.
async fn a_program_and_the_appliers_write_the_same_lru_maps() {
    let nodes = [1, 2, 3];
    let (maps, progs) = conntrack_maps(GUEST, "mixed", &nodes, &nodes, 65536);
    let mut c = LocalCluster::start(opts(maps.args("ct")), 3, 0, GUEST.t())
        .await
        .unwrap();
    maps.expect_backend(&mut c, &nodes).await;
    let client = c.client(1).await.unwrap();
    const FLOWS: u16 = 60;
    const CLOSED: u16 = 20;
    // Each node's program sees its own flows (source 10.0.0.N): it opens them while API writes
    // reach every map through the appliers, then closes some while more API writes arrive.
    let dst = [10, 1, 0, 1];
    let mut progs: Vec<(u64, Conntrack)> = progs.into_iter().collect();
    for (phase, flows) in [(0u16, 0..FLOWS), (1, 0..CLOSED)] {
        let threads: Vec<_> = progs
            .drain(..)
            .map(|(n, mut prog)| {
                let flows = flows.clone();
                std::thread::spawn(move || {
                    let src = [10, 0, 0, n as u8];
                    for i in flows {
                        let frame = if phase == 0 {
                            Conntrack::frame(src, dst, 20_000 + i, 443, true)
                        } else {
                            Conntrack::fin_frame(src, dst, 20_000 + i, 443)
                        };
                        prog.run(&frame).unwrap();
                    }
                    (n, prog)
                })
            })
            .collect();
        for i in 0..30u16 {
            let key = Conntrack::key([10, 9, 0, 1], dst, 30_000 + 30 * phase + i, 80, true);
            client.put("ct", key, vec![i as u8; 16]).await.unwrap();
        }
        progs = threads.into_iter().map(|t| t.join().unwrap()).collect();
        converge(&maps, &nodes, &client, "programs and appliers").await;
    }
    let m = converge(&maps, &nodes, &client, "programs and appliers").await;
    assert_eq!(m.len(), 3 * usize::from(FLOWS - CLOSED) + 60);
    let mut echoes = Vec::new();
    for n in nodes {
        let captured = counter(&c, n, "raftmap_kernel_captured_total", &[]);
        let retried = counter(&c, n, "raftmap_kernel_uncommitted_total", &[]);
        let echo = counter(&c, n, "raftmap_kernel_echoes_total", &[]);
        assert_eq!(
            captured - retried,
            u64::from(FLOWS + CLOSED),
            "node {n} proposed {captured} changes ({retried} again after a failed proposal) for its program's {} (an echo proposed, or a real change dropped)",
            FLOWS + CLOSED
        );
        assert!(echo > 0, "node {n} recognised no echo");
        echoes.push(echo);
    }
    figure(format_args!(
        "program + applier writes on LRU maps: {} program changes per node proposed once each, echoes dropped per node {echoes:?}",
        FLOWS + CLOSED
    ));
}

/// Full LRU maps: the appliers' writes evict local entries, which stay local (nothing is
/// proposed: no cascade of deletes); evictions by the program that owns the map replicate as
/// deletes.
async fn a_full_lru_map_evicts_locally_without_a_cascade() {
    const MAX: u32 = 256;
    let nodes = [1, 2, 3];
    let (maps, mut progs) = conntrack_maps(GUEST, "full", &nodes, &[1], MAX);
    let mut c = LocalCluster::start(opts(maps.args("ct")), 3, 0, GUEST.t())
        .await
        .unwrap();
    maps.expect_backend(&mut c, &nodes).await;
    let client = c.client(1).await.unwrap();
    let api_key = |i: u32| Conntrack::key([10, 9, 0, 1], [10, 1, 0, 1], i as u16, 80, true);
    // The cluster fills the map, then rewrites every entry: each rewrite in a full LRU map
    // takes a free node, and the kernel evicts to find one.
    for round in 0..2u8 {
        for first in (0..MAX).step_by(32) {
            let ops = (first..first + 32)
                .map(|i| raftmap_node::put("ct", api_key(i), vec![round; 16]))
                .collect();
            client.write(ops).await.unwrap();
        }
    }
    let committed = settle_within_committed(&maps, &mut c, &client, &nodes, "rewrites").await;
    assert_eq!(
        committed.len(),
        MAX as usize,
        "an eviction was proposed as a delete"
    );
    let evictions = |c: &LocalCluster, n, cause: &str| {
        counter(
            c,
            n,
            "raftmap_kernel_evictions_total",
            &[&format!("cause=\"{cause}\"")],
        )
    };
    let by_applier: Vec<u64> = nodes.iter().map(|&n| evictions(&c, n, "applier")).collect();
    assert!(
        by_applier.iter().all(|&e| e > 0),
        "the rewrites of a full LRU map evicted nothing: {by_applier:?}"
    );
    for n in nodes {
        assert_eq!(
            counter(&c, n, "raftmap_kernel_captured_total", &[]),
            0,
            "node {n} proposed changes although only the applier wrote its map"
        );
    }

    // The program on node 1 opens more flows than its map holds: the kernel evicts for them,
    // and those evictions are node 1's own: they replicate as deletes. Where the cluster's copy
    // is fuller than node 1's map (its applier's evictions stayed local), node 1 deletes what
    // its kernel evicted to make room: none of its program's flows is refused and undone.
    let prog = progs.get_mut(&1).unwrap();
    const NEW: u16 = 300;
    let (src, dst) = ([10, 0, 0, 1], [10, 1, 0, 1]);
    for i in 0..NEW {
        prog.run(&Conntrack::frame(src, dst, 50_000 + i, 443, true))
            .unwrap();
    }
    let committed = settle_within_committed(&maps, &mut c, &client, &nodes, "program").await;
    let program_evicted = evictions(&c, 1, "other");
    assert!(program_evicted > 0, "the program's inserts evicted nothing");
    assert!(committed.len() <= MAX as usize);
    assert_eq!(
        counter(&c, 1, "raftmap_kernel_refused_total", &[]),
        0,
        "the cluster refused node 1's new flows (and node 1 undid them)"
    );
    let held_1 = maps.open(1).entries().unwrap();
    let new_held = (0..NEW)
        .filter(|&i| held_1.contains_key(&Conntrack::key(src, dst, 50_000 + i, 443, true)))
        .count();
    assert!(
        new_held > 0,
        "node 1's map kept none of its program's new flows"
    );
    let captured_1 = counter(&c, 1, "raftmap_kernel_captured_total", &[])
        - counter(&c, 1, "raftmap_kernel_uncommitted_total", &[]);
    assert!(
        captured_1 <= u64::from(NEW) + program_evicted,
        "node 1 proposed {captured_1} changes for its program's {NEW} flows and {program_evicted} evictions"
    );
    let room = counter(&c, 1, "raftmap_kernel_room_deletes_total", &[]);
    for n in [2, 3] {
        assert_eq!(
            counter(&c, n, "raftmap_kernel_captured_total", &[])
                + counter(&c, n, "raftmap_kernel_room_deletes_total", &[]),
            0,
            "node {n} proposed deletes for the evictions its applier caused (a cascade)"
        );
    }
    let by_applier_after: Vec<u64> = nodes.iter().map(|&n| evictions(&c, n, "applier")).collect();
    figure(format_args!(
        "full LRU map of {MAX}: applier-caused evictions kept local per node {by_applier_after:?}; program-caused evictions replicated as deletes {program_evicted}; entries node 1 had evicted deleted to make room {room}; {new_held} of its {NEW} new flows held; changes proposed by nodes without the program 0"
    ));
}

/// BPF_MAP_UPDATE_BATCH and BPF_MAP_DELETE_BATCH are seen element by element: nothing is
/// counted lost, and with no scan the maps converge.
async fn batch_syscalls_are_captured_element_by_element() {
    let nodes = [1, 2, 3];
    let maps = NodeMaps::create(GUEST, "batch", &nodes, 8, 8);
    let mut c = LocalCluster::start(opts(maps.args("ct")), 3, 0, GUEST.t())
        .await
        .unwrap();
    maps.expect_backend(&mut c, &nodes).await;
    let client = c.client(1).await.unwrap();
    let keys: Vec<Vec<u8>> = (0..50).map(k).collect();
    let values: Vec<Vec<u8>> = (0..50).map(|i| k(i + 100)).collect();
    let pairs: Vec<(&[u8], &[u8])> = keys
        .iter()
        .zip(&values)
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    maps.open(3).update_batch(&pairs).unwrap();
    let m = converge(&maps, &nodes, &client, "batch update").await;
    assert_eq!(m.len(), 50);
    let gone: Vec<&[u8]> = keys[..20].iter().map(Vec::as_slice).collect();
    maps.open(2).delete_batch(&gone).unwrap();
    let m = converge(&maps, &nodes, &client, "batch delete").await;
    assert_eq!(m.len(), 30);
    assert_eq!(m.get(&k(30)), Some(&k(130)));
    for n in nodes {
        assert_eq!(
            counter(&c, n, "raftmap_kernel_capture_lost_total", &[]),
            0,
            "node {n} lost or could not decode capture events"
        );
        assert_eq!(
            counter(&c, n, "raftmap_kernel_scan_repairs_total", &[]),
            0,
            "node {n} needed the scan to find changes"
        );
    }
    assert_eq!(counter(&c, 3, "raftmap_kernel_captured_total", &[]), 50);
    assert_eq!(counter(&c, 2, "raftmap_kernel_captured_total", &[]), 20);
    figure(format_args!(
        "batch syscalls: 50 updates and 20 deletes captured element by element, 0 lost, no scan"
    ));
}

/// A BPF program's write on node 1 until node 2's kernel map holds it: with fexit (an event,
/// the periodic scan off), and with the scan alone every 20 ms, which is how a program's writes
/// are captured without fexit (the syscall backend sees only bpf(2) calls; it is not attached
/// here: its sys_exit tracepoint once crashed the emulated 6.12 guest, an int3 oops in
/// syscall_exit_to_user_mode_prepare while the call site was being patched). Prints the
/// figures (emulated: the ratio is what carries over).
async fn program_write_latency_with_fexit_and_with_the_scan() {
    let mut p50 = Vec::new();
    for (backend, extra) in [
        (
            "fexit",
            &["--no-periodic-scan", "--scan-interval-ms", "100"][..],
        ),
        ("scan", &["--scan-interval-ms", "20"][..]),
    ] {
        let lat = program_write_latency(backend, extra).await;
        figure(format_args!(
            "program write on node 1 -> node 2's kernel map, {backend} backend (emulated): p50 {:.1} ms, max {:.1} ms (20 writes)",
            lat[10].as_secs_f64() * 1e3,
            lat[19].as_secs_f64() * 1e3
        ));
        p50.push(lat[10].as_secs_f64());
    }
    figure(format_args!(
        "program write latency, fexit / 20 ms scan (p50): {:.2}x",
        p50[0] / p50[1]
    ));
}

/// 20 latencies, sorted, of a program's write on node 1 reaching node 2's kernel map (one
/// voter, one learner) capturing with `backend`.
async fn program_write_latency(backend: &str, extra: &[&str]) -> Vec<Duration> {
    let (maps, mut progs) = conntrack_maps(GUEST, &format!("lat-{backend}"), &[1, 2], &[1], 65536);
    let args = maps
        .pins
        .iter()
        .map(|(n, p)| {
            let mut a = vec![
                "--watch".to_string(),
                format!("ct={}", p.display()),
                "--capture-backend".into(),
                backend.into(),
            ];
            a.extend(extra.iter().map(|x| x.to_string()));
            (*n, a)
        })
        .collect();
    let mut c = LocalCluster::start(opts(args), 1, 1, GUEST.t())
        .await
        .unwrap();
    for n in [1, 2] {
        c.wait_for(n, GUEST.t(), "capture with the backend asked for", |s| {
            s.watched.iter().all(|w| w.backend == backend)
        })
        .await
        .unwrap();
    }
    let prog = progs.get_mut(&1).unwrap();
    let remote = maps.open(2);
    let mut lat = Vec::new();
    for i in 0..20u16 {
        let (src, dst) = ([10, 7, 0, 1], [10, 1, 0, 1]);
        let key = Conntrack::key(src, dst, 40_000 + i, 443, true);
        let t0 = Instant::now();
        prog.run(&Conntrack::frame(src, dst, 40_000 + i, 443, true))
            .unwrap();
        while remote.lookup(&key).unwrap().is_none() {
            assert!(
                t0.elapsed() < GUEST.converge(),
                "flow {i} never reached node 2 ({backend})"
            );
            std::thread::sleep(Duration::from_micros(500));
        }
        lat.push(t0.elapsed());
    }
    lat.sort();
    lat
}

/// A short run of the fault-injection harness's kernel-map workload (kills and pauses, on
/// loopback), the nodes capturing with fexit alone: nothing lost, the log's order kept, every
/// kernel map converged.
async fn the_kernel_map_workload_under_kills_and_pauses() {
    use raftmap_jepsen::nemesis::Fault;
    use raftmap_jepsen::run::{run, RunConfig, Workload};
    let cfg = RunConfig {
        workload: Workload::KernelMap,
        bin: env!("CARGO_BIN_EXE_raftmap").into(),
        nodes: 3,
        time_limit: Duration::from_secs(10),
        keys: 4,
        clients: 3,
        faults: vec![Fault::Kill, Fault::Pause],
        seed: 18,
        unsafe_local_reads: false,
        loopback: true,
        agent_args: vec!["--capture-backend".into(), "fexit".into()],
    };
    let report = run(&cfg).await.unwrap();
    assert!(
        report.faults_not_carried_out(&cfg.faults).is_empty(),
        "faults never carried out: {:#?}",
        report.fault_log
    );
    let k = report.kernel.as_ref().unwrap();
    assert!(k.converged, "kernel maps did not converge: {k:#?}");
    assert!(k.lost.is_empty(), "lost kernel writes: {:?}", k.lost);
    assert!(k.out_of_order.is_empty(), "{:?}", k.out_of_order);
    assert!(
        k.divergent_indexes.is_empty(),
        "{:#?}\nstream gaps {}\n{:#?}",
        k.divergences,
        k.stream_gaps,
        report.fault_log
    );
    assert!(k.committed_changes > 50, "too little load: {k:#?}");
    assert!(report.valid);
    figure(format_args!(
        "kernel-map workload, kills and pauses, fexit: {} changes committed, {} sampled states in log order, 0 lost, converged",
        k.committed_changes, k.observations
    ));
}

/// Boots each stock kernel in turn and runs this test in it, which there runs every guest
/// scenario.
#[test]
fn whole_clusters_on_fexit_in_stock_kernels() {
    if std::env::var_os("RAFTMAP_VM_GUEST").is_some() {
        return run_guest_scenarios();
    }
    let me = std::env::current_exe().unwrap();
    let mut files = vec![
        PathBuf::from(env!("CARGO_BIN_EXE_raftmap")),
        which("setpriv"),
        which("bpftool"),
    ];
    let mut bin = me.clone();
    let mut args: Vec<String> = vec![];
    // The guest's environment is vm-run.sh's: the selection and the agents' log filter go
    // through env(1).
    let pass: Vec<String> = [ONLY, "RUST_LOG"]
        .into_iter()
        .filter_map(|k| Some(format!("{k}={}", std::env::var(k).ok()?)))
        .collect();
    if !pass.is_empty() {
        bin = which("env");
        args = pass;
        args.push(me.display().to_string());
        files.push(me);
    }
    args.extend(
        [
            "--exact",
            "whole_clusters_on_fexit_in_stock_kernels",
            "--nocapture",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let expected = selected_scenarios().len();
    assert!(
        expected > 0,
        "{ONLY} names no scenario of guest_scenarios()"
    );
    for kernel in GUEST_KERNELS {
        let started = Instant::now();
        let Some(run) = run_in_guest("fexit guests", kernel, &bin, &args, &files, 420).unwrap()
        else {
            return;
        };
        println!(
            "{kernel} ({}), {:.0} s:",
            run.kernel_release,
            started.elapsed().as_secs_f64()
        );
        for l in run.tagged("guest-") {
            println!("  {l}");
        }
        let passed = run
            .tagged("guest-scenario:")
            .filter(|l| l.contains(" ok ("))
            .count();
        assert!(
            run.success && passed == expected,
            "{passed} of {expected} guest scenarios passed on {kernel} ({}):\n{}",
            run.kernel_release,
            run.transcript()
        );
    }
}

fn which(tool: &str) -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{tool} is not on PATH (scripts/install-deps.sh installs it)"))
}
