//! The set workload's checker: the final read against what was attempted and acknowledged.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::clients::{value_of, MAP};
use crate::cluster::LocalCluster;
use crate::error::RunError;
use crate::history::{Event, EventType, Func};

/// The set workload's verdict.
#[derive(Debug, Default, Serialize)]
pub struct SetResult {
    pub attempted: usize,
    pub acknowledged: usize,
    pub final_size: usize,
    /// Acknowledged adds missing from the final read.
    pub lost: Vec<i64>,
    /// Elements in the final read that nobody tried to add.
    pub unexpected: Vec<i64>,
    /// Adds of unknown outcome that did take effect.
    pub recovered: usize,
}

/// The set's final read (linearizable, retried until the healed cluster answers), compared with
/// what was attempted and acknowledged.
pub(crate) async fn check_set(
    cluster: &LocalCluster,
    history: &[Event],
) -> Result<SetResult, RunError> {
    use std::collections::BTreeSet;
    let element = |e: &Event| match e.f {
        Func::Write(v) => Some(v),
        _ => None,
    };
    let of = |k: EventType| -> BTreeSet<i64> {
        history
            .iter()
            .filter(|e| e.kind == k)
            .filter_map(element)
            .collect()
    };
    let (attempted, acked, unknown) = (
        of(EventType::Invoke),
        of(EventType::Ok),
        of(EventType::Info),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let final_read: BTreeSet<i64> = loop {
        let mut last = None;
        for id in cluster.ids() {
            match cluster.client(id).await {
                Ok(c) => match c.dump(MAP, true).await {
                    Ok((_, _, entries)) => {
                        last = Some(entries.iter().filter_map(|(k, _)| value_of(k)).collect());
                        break;
                    }
                    Err(e) => note_retry(&e),
                },
                Err(e) => note_retry(&e),
            }
        }
        if let Some(r) = last {
            break r;
        }
        if Instant::now() > deadline {
            return Err(RunError::Cluster(raftmap_node::NodeError::Timeout(
                "no node answered the final read".into(),
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    Ok(SetResult {
        attempted: attempted.len(),
        acknowledged: acked.len(),
        final_size: final_read.len(),
        lost: acked.difference(&final_read).copied().collect(),
        unexpected: final_read.difference(&attempted).copied().collect(),
        recovered: unknown.intersection(&final_read).count(),
    })
}

/// A failed attempt at the final read (retried).
fn note_retry(e: &dyn std::fmt::Display) {
    eprintln!("final read: {e}; retrying");
}
