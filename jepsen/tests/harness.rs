//! Short fault-injection runs against real `raftmap agent` processes: the register workload
//! under SIGKILL, SIGSTOP and network partitions (nodes in network namespaces) stays
//! linearizable, and the checker catches the anomalies of a node
//! deliberately serving reads without read-index.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use raftmap_jepsen::run::{run, Fault, RunConfig, Workload};

/// The `raftmap` binary cargo built next to this test's directory.
fn raftmap_bin() -> PathBuf {
    if let Some(b) = std::env::var_os("RAFTMAP_BIN") {
        return b.into();
    }
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("raftmap");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace (cargo test --workspace)",
        bin.display()
    );
    bin
}

fn config(seed: u64, faults: Vec<Fault>, secs: u64, unsafe_local_reads: bool) -> RunConfig {
    RunConfig {
        workload: Workload::Register,
        bin: raftmap_bin(),
        nodes: 3,
        time_limit: Duration::from_secs(secs),
        keys: 4,
        clients: 6,
        faults,
        seed,
        unsafe_local_reads,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_under_kills_pauses_and_partitions_is_linearizable() {
    let faults = vec![Fault::Kill, Fault::Pause, Fault::Partition];
    let report = run(&config(7, faults, 12, false)).await.unwrap();
    assert!(
        !report.fault_log.is_empty(),
        "the nemesis injected no fault"
    );
    assert!(report.ops_ok > 200, "too little load: {} ok", report.ops_ok);
    assert!(
        report.linearizable,
        "anomalies under kill, pause and partition (seed 7): {:#?}",
        report.anomalies
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_reads_served_without_read_index() {
    let report = run(&config(8, vec![Fault::Pause], 6, true)).await.unwrap();
    // Which operation the search reports first depends on the history (a stale read can make
    // a later write impossible to place); what matters is that the anomaly is found.
    assert!(!report.linearizable, "stale local reads went unnoticed");
    assert!(!report.anomalies.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_under_kills_and_partitions_loses_no_acknowledged_add() {
    let mut cfg = config(9, vec![Fault::Kill, Fault::Partition], 10, false);
    cfg.workload = Workload::Set;
    let report = run(&cfg).await.unwrap();
    let set = report.set.as_ref().unwrap();
    assert!(set.acknowledged > 200, "too little load: {set:?}");
    assert!(!report.fault_log.is_empty());
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
