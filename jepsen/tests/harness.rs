//! The short fault-injection suite, against real `raftmap agent` processes in network
//! namespaces: the register workload under each nemesis alone and under all of them together
//! (overlapping), the set and kernel-map workloads, and the checker catching the anomalies of
//! a node deliberately serving reads without read-index. Runs one at a time (two cores).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use raftmap_jepsen::nemesis::Fault;
use raftmap_jepsen::run::{run, Report, RunConfig, Workload};

/// One run at a time: each starts a cluster of its own.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Cargo's output directory for this build profile (`target/<profile>`): this test runs from
/// its `deps/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// The `raftmap` binary cargo built next to this test's directory.
fn raftmap_bin() -> PathBuf {
    if let Some(b) = std::env::var_os("RAFTMAP_BIN") {
        return b.into();
    }
    let bin = profile_dir().join("raftmap");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace (cargo test --workspace)",
        bin.display()
    );
    bin
}

fn config(workload: Workload, nodes: u64, faults: &[Fault], secs: u64, seed: u64) -> RunConfig {
    RunConfig {
        workload,
        bin: raftmap_bin(),
        nodes,
        time_limit: Duration::from_secs(secs),
        keys: 4,
        clients: 6,
        faults: faults.to_vec(),
        seed,
        unsafe_local_reads: false,
        loopback: false,
        agent_args: Vec::new(),
    }
}

/// Runs `cfg` and checks what every run must show: real network namespaces, each asked-for
/// fault injected at least once (and for membership, carried out at least once), enough load.
async fn run_checked(cfg: RunConfig, min_ok: usize) -> Report {
    let _turn = ONE_AT_A_TIME.lock().await;
    let report = run(&cfg).await.unwrap();
    if !report.valid && !cfg.unsafe_local_reads {
        // Keep the evidence of a failing run (history, node logs, the checker's findings)
        // where CI can collect it: target/<profile>/jepsen-failures/.
        let out = profile_dir().join(format!(
            "jepsen-failures/{:?}-seed{}-{}",
            cfg.workload,
            cfg.seed,
            std::process::id()
        ));
        match report.write_to(&out) {
            Ok(()) => eprintln!("failing run's output in {}", out.display()),
            Err(e) => eprintln!(
                "could not keep the failing run's output in {}: {e}",
                out.display()
            ),
        }
    }
    assert_eq!(report.network, "netns", "the nodes must run in namespaces");
    let missing = report.faults_not_carried_out(&cfg.faults);
    assert!(
        missing.is_empty(),
        "{missing:?} never carried out (seed {}): {:#?}",
        cfg.seed,
        report.fault_log
    );
    assert!(
        report.ops_ok >= min_ok,
        "too little load: {} ok (seed {})",
        report.ops_ok,
        cfg.seed
    );
    report
}

async fn register_stays_linearizable(nodes: u64, faults: &[Fault], secs: u64, seed: u64) {
    let report = run_checked(config(Workload::Register, nodes, faults, secs, seed), 150).await;
    assert!(
        report.linearizable && report.valid,
        "anomalies under {faults:?} (seed {seed}): {:#?}\nsmallest failing: {:#?}",
        report.anomalies,
        report.smallest_failing
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_under_partitions_of_every_shape_is_linearizable() {
    register_stays_linearizable(5, &[Fault::Partition], 12, 21).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_under_kills_is_linearizable() {
    register_stays_linearizable(3, &[Fault::Kill], 8, 22).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_under_pauses_is_linearizable() {
    register_stays_linearizable(3, &[Fault::Pause], 8, 23).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_under_membership_changes_is_linearizable() {
    register_stays_linearizable(3, &[Fault::Membership], 10, 24).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_under_overlapping_faults_of_every_kind_is_linearizable() {
    let all = [
        Fault::Partition,
        Fault::Kill,
        Fault::Pause,
        Fault::Membership,
    ];
    register_stays_linearizable(3, &all, 15, 7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_reads_served_without_read_index() {
    // The broken mode shows in a read that reaches a paused follower after it resumes and
    // before it catches up, so each pause is a chance, not a certainty: 6 s with 6 clients
    // (4 pauses) found 2-5 anomalous keys a run and, once in about thirty runs, none. 12 s
    // with 12 clients (9 pauses, twice the reads) finds 6-10, so a run without one is
    // vanishingly rare.
    let mut cfg = config(Workload::Register, 3, &[Fault::Pause], 12, 8);
    cfg.clients = 12;
    cfg.unsafe_local_reads = true;
    let report = run_checked(cfg, 100).await;
    // Which operation the search reports first depends on the history (a stale read can make
    // a later write impossible to place); what matters is that the anomaly is found, and that
    // the shrunk sub-history still shows it.
    assert!(!report.linearizable, "stale local reads went unnoticed");
    assert!(!report.valid);
    assert!(!report.smallest_failing.is_empty());
    for (ops, v) in report.smallest_failing.iter().zip(&report.anomalies) {
        let raftmap_jepsen::Verdict::NotLinearizable { key, .. } = v else {
            unreachable!()
        };
        assert_ne!(
            raftmap_jepsen::check_key(*key, ops),
            raftmap_jepsen::Verdict::Linearizable,
            "the smallest failing sub-history must still fail"
        );
        let all = report.history.iter().filter(|e| e.key == *key).count() / 2;
        assert!(
            ops.len() < all,
            "nothing was shrunk: {} of {all}",
            ops.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_under_kills_partitions_and_membership_loses_no_acknowledged_add() {
    let faults = [Fault::Kill, Fault::Partition, Fault::Membership];
    let report = run_checked(config(Workload::Set, 3, &faults, 10, 9), 200).await;
    let set = report.set.as_ref().unwrap();
    assert!(
        set.lost.is_empty(),
        "lost acknowledged adds: {:?}",
        set.lost
    );
    assert!(
        set.unexpected.is_empty(),
        "unexpected elements: {:?}",
        set.unexpected
    );
    assert!(report.valid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_maps_converge_in_log_order_under_every_fault() {
    if !raftmap_ebpf_hooks::bpf_or_skip("kernel_maps_converge_in_log_order_under_every_fault") {
        return;
    }
    let faults = [
        Fault::Kill,
        Fault::Pause,
        Fault::Partition,
        Fault::Membership,
    ];
    let report = run_checked(config(Workload::KernelMap, 3, &faults, 12, 10), 1000).await;
    let k = report.kernel.as_ref().unwrap();
    assert!(k.converged, "kernel maps did not converge: {k:#?}");
    assert!(
        k.lost.is_empty(),
        "lost kernel writes (node, key, value): {:?}\nfaults: {:#?}",
        k.lost,
        report.fault_log
    );
    assert!(
        k.out_of_order.is_empty(),
        "a node's kernel map left the log's order: {:?}",
        k.out_of_order
    );
    assert!(k.divergent_indexes.is_empty(), "{:?}", k.divergent_indexes);
    // Enough material for the order check to mean something. With TLS on two cores a 12 s
    // run commits 6000-8500 changes and checks 440-940 sampled states; a tenth of the
    // changes, or less than half the fewest states, is a run that did not do its work.
    assert!(k.committed_changes > 600 && k.observations > 200, "{k:#?}");
    assert!(report.valid);
}
