//! Availability, checked and not only safety: when the run served nothing, and whether the
//! cluster serves again once every fault is healed.
//!
//! A run ends with a heal-and-recover phase: every fault has been ended, and every live member
//! must then take a write and answer a linearizable read of it within [`RECOVERY_BOUND`], or the
//! run fails. During the run, stretches of [`OUTAGE`] or more in which no client operation
//! succeeded are reported with the faults in effect.

use std::time::{Duration, Instant};

use crate::cluster::LocalCluster;
use raftmap_node::storage::MapSchema;
use serde::Serialize;

use crate::history::{Event, EventType};
use crate::nemesis::FaultWindow;

/// How long the healed cluster has to serve every live member again. Leader election takes
/// 1.25-1.5 s here after a leader's death, a restarted node catches up in well under a
/// second, and an overloaded two-core machine stretches both: 30 s is ample for a healthy
/// cluster and still fails one that is stuck.
pub const RECOVERY_BOUND: Duration = Duration::from_secs(30);

/// The shortest stretch without a successful operation that counts as an outage.
pub const OUTAGE: Duration = Duration::from_secs(1);

/// The map the recovery phase writes (kept apart from the workloads' maps).
const RECOVERY_MAP: &str = "jepsen_recovery";

/// How the healed cluster came back.
#[derive(Debug, Clone, Serialize)]
pub struct Recovery {
    pub bound_s: f64,
    /// Seconds until every live member had served a write and a linearizable read.
    pub took_s: Option<f64>,
    /// The members that did not, with the last error each gave.
    pub failed: Vec<String>,
}

impl Recovery {
    pub fn ok(&self) -> bool {
        self.failed.is_empty()
    }
}

/// A stretch of the run in which no client operation succeeded.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outage {
    /// Seconds since the start of the run.
    pub start_s: f64,
    pub length_s: f64,
    /// The faults in effect at some point of it.
    pub faults: Vec<String>,
}

/// Waits until every member in `ids` takes a write and answers a linearizable read of it, each
/// through itself, within `bound`.
pub async fn recover(cluster: &LocalCluster, ids: &[u64], bound: Duration) -> Recovery {
    let started = Instant::now();
    let deadline = started + bound;
    let mut failed = Vec::new();
    let mut declared = false;
    for &id in ids {
        let mut last = String::from("no answer");
        let mut served = false;
        while Instant::now() < deadline {
            match serve_once(cluster, id, &mut declared).await {
                Ok(()) => {
                    served = true;
                    break;
                }
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !served {
            failed.push(format!("node {id}: {last}"));
        }
    }
    Recovery {
        bound_s: bound.as_secs_f64(),
        took_s: failed.is_empty().then(|| started.elapsed().as_secs_f64()),
        failed,
    }
}

/// One write through node `id` and a linearizable read of it through the same node.
async fn serve_once(cluster: &LocalCluster, id: u64, declared: &mut bool) -> Result<(), String> {
    let call = async {
        let client = cluster.client(id).await.map_err(|e| e.to_string())?;
        if !*declared {
            client
                .declare(&MapSchema::hash(RECOVERY_MAP, 8, 8, 1024))
                .await
                .map_err(|e| e.to_string())?;
            *declared = true;
        }
        let (key, value) = (
            id.to_be_bytes().to_vec(),
            rand::random::<u64>().to_be_bytes(),
        );
        client
            .put(RECOVERY_MAP, key.clone(), value.to_vec())
            .await
            .map_err(|e| e.to_string())?;
        match client.get(RECOVERY_MAP, key, true).await {
            Ok(Some(v)) if v == value => Ok(()),
            Ok(other) => Err(format!("read back {other:?} after writing {value:?}")),
            Err(e) => Err(e.to_string()),
        }
    };
    tokio::time::timeout(Duration::from_secs(3), call)
        .await
        .unwrap_or_else(|_| Err("no answer within 3 s".into()))
}

/// The stretches of at least `min` between `start` and `end` (nanoseconds of the run) in which
/// no client operation completed successfully, with the faults that overlap each.
pub fn outages(
    history: &[Event],
    faults: &[FaultWindow],
    (start, end): (u64, u64),
    min: Duration,
) -> Vec<Outage> {
    let mut oks: Vec<u64> = history
        .iter()
        .filter(|e| e.kind == EventType::Ok && e.node.is_none())
        .map(|e| e.time)
        .filter(|t| (start..=end).contains(t))
        .collect();
    oks.sort_unstable();
    let bounds = std::iter::once(start)
        .chain(oks)
        .chain(std::iter::once(end));
    let mut out = Vec::new();
    let mut prev: Option<u64> = None;
    for t in bounds {
        if let Some(p) = prev {
            if t.saturating_sub(p) >= min.as_nanos() as u64 {
                let faults = faults
                    .iter()
                    .filter(|w| w.start <= t && w.end >= p)
                    .map(|w| w.what.clone())
                    .collect();
                out.push(Outage {
                    start_s: p as f64 / 1e9,
                    length_s: (t - p) as f64 / 1e9,
                    faults,
                });
            }
        }
        prev = Some(t);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Func;

    fn ok(t_ms: u64) -> Event {
        Event {
            process: 0,
            kind: EventType::Ok,
            f: Func::Write(1),
            key: 0,
            time: t_ms * 1_000_000,
            node: None,
        }
    }

    #[test]
    fn stretches_without_a_success_are_outages_with_their_faults() {
        let history = vec![ok(100), ok(300), ok(2_500), ok(2_600)];
        let faults = vec![FaultWindow {
            fault: crate::nemesis::Fault::Kill,
            what: "kill n1".into(),
            start: 200_000_000,
            end: 1_000_000_000,
            error: None,
        }];
        let o = outages(&history, &faults, (0, 4_000_000_000), OUTAGE);
        assert_eq!(o.len(), 2, "{o:?}");
        assert_eq!(o[0].start_s, 0.3);
        assert!((o[0].length_s - 2.2).abs() < 1e-9);
        assert_eq!(o[0].faults, vec!["kill n1".to_string()]);
        // The end of the load counts too: 2.6 s to 4 s served nothing.
        assert!((o[1].length_s - 1.4).abs() < 1e-9 && o[1].faults.is_empty());
        assert!(outages(
            &history,
            &faults,
            (0, 2_600_000_000),
            Duration::from_secs(3)
        )
        .is_empty());
    }
}
