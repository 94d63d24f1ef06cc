//! Consistency checks, as etcd's hash check does: replicas compared with each other, and each
//! replica with its own disk.
//!
//! - **Across replicas**: every state machine records its digest at each checkpoint index
//!   (every `CHECKPOINT_EVERY` entries). The leader gathers the members' checkpoints (from
//!   their status) and compares the digests at the newest index they share; a node that differs
//!   from the rest is named.
//! - **Against the disk**: each node reads its whole state back from a consistent snapshot of
//!   its database and compares it with the digest it kept while applying; a mismatch is a
//!   corrupt disk, and the node stops reporting ready.
//!
//! Either finding sets `raftmap_corrupt` to 1 and shows in `raftmap status`, and stays until
//! the node restarts: a replica that diverged needs an operator (replace it: remove it and add
//! a fresh node).

use std::sync::Arc;
use std::time::Duration;

use raftmap_proto as pb;

use crate::lock::lock;
use crate::shared::{members, NodeShared};

/// Runs both checks on their intervals until the node stops.
pub(crate) async fn run(shared: Arc<NodeShared>, across: Duration, disk: Duration) {
    let mut across_tick = tokio::time::interval(across);
    let mut disk_tick = tokio::time::interval(disk);
    across_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    disk_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = across_tick.tick() => compare_replicas(&shared).await,
            _ = disk_tick.tick() => verify_disk(&shared).await,
        }
    }
}

/// Records a finding: logged once, kept for status and the metric. `own`: this node's disk is
/// corrupt, so it is not ready either.
fn found(shared: &NodeShared, finding: String, own: bool) {
    if own {
        shared
            .disk_corrupt
            .store(true, std::sync::atomic::Ordering::Release);
    }
    let mut corrupt = lock(&shared.corrupt);
    if corrupt.as_deref() != Some(finding.as_str()) {
        tracing::error!(finding = %finding, "consistency check failed");
        *corrupt = Some(finding);
        shared.metrics.corrupt.set(1);
    }
}

/// On the leader: the members' checkpoints, compared.
async fn compare_replicas(shared: &NodeShared) {
    let (nodes, leader) = members(&shared.raft);
    if leader != Some(shared.id) {
        return;
    }
    let mut reports = vec![(shared.id, shared.view.checkpoints())];
    for (id, (info, _)) in nodes {
        if id == shared.id {
            continue;
        }
        let Ok(mut admin) = shared.proposer.pool.admin(id, &info.api_addr, None) else {
            continue;
        };
        let call = admin.status(pb::StatusRequest {});
        // A node that does not answer is left out of this round.
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), call).await {
            let cps = r
                .into_inner()
                .checkpoints
                .into_iter()
                .map(|c| (c.index, c.digest))
                .collect();
            reports.push((id, cps));
        }
    }
    if let Some(d) = raftmap_storage::disagreement(&reports) {
        found(shared, format!("replicas disagree: {d}"), false);
    }
}

/// This node's state read back from disk against the digest it kept.
async fn verify_disk(shared: &NodeShared) {
    let view = shared.view.clone();
    let checked = tokio::task::spawn_blocking(move || view.verify_disk()).await;
    match checked {
        Ok(Ok(r)) if r.matches() => {
            tracing::debug!(index = r.applied, entries = r.entries, "the state on disk matches its digest");
        }
        Ok(Ok(r)) => found(
            shared,
            format!(
                "node {}: the {} entries read back from disk at index {} have digest {:016x}, but applying them gave {:016x}: this node's disk is corrupt",
                shared.id, r.entries, r.applied, r.actual, r.stored
            ),
            true,
        ),
        Ok(Err(e)) => found(
            shared,
            format!("node {}: reading the state back from disk failed: {e}", shared.id),
            true,
        ),
        Err(e) => tracing::warn!(error = %e, "the disk check did not finish"),
    }
}
