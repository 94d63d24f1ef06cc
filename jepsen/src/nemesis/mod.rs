//! The nemesis: faults injected into a running cluster on a schedule drawn from the run's seed.
//!
//! Faults last a few hundred milliseconds to a second and may overlap (at most two at once, of
//! different kinds), so that a pause lands during a partition or a kill during a membership
//! change. Partitions come in the shapes Jepsen uses: random halves, the leader alone, the
//! leader in a minority, a bridge (two halves that both hear one node) and a ring (each node
//! hears only its neighbours). A membership change replaces a voter as an operator would: a
//! fresh node joins as a learner, is promoted, and then an old voter is removed, so the voters
//! never wear down.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::cluster::LocalCluster;
use rand::rngs::StdRng;
use serde::Serialize;

use crate::error::RunError;
use crate::lock::lock;
use shapes::Shape;

mod injector;
mod membership;
mod shapes;

type NodeId = u64;

/// Faults the nemesis can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fault {
    /// SIGKILL a random node, restart it a moment later.
    Kill,
    /// SIGSTOP a random node, SIGCONT it a moment later.
    Pause,
    /// Cut the network into one of the partition shapes, then heal.
    Partition,
    /// Replace a voter under load: a new node joins as a learner and is promoted, then an old
    /// voter is removed.
    Membership,
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kill" => Ok(Fault::Kill),
            "pause" => Ok(Fault::Pause),
            "partition" => Ok(Fault::Partition),
            "membership" => Ok(Fault::Membership),
            "clock" | "clock-skew" => Err(format!(
                "{s:?} cannot be produced here: every node runs on this machine's one clock (a \
                 per-node clock needs a VM or time namespace per node), and raftmap takes no \
                 safety decision from wall time"
            )),
            other => Err(format!(
                "unknown nemesis {other:?}: expected kill, pause, partition or membership"
            )),
        }
    }
}

/// One fault as it happened, for the results and the pictures.
#[derive(Debug, Clone, Serialize)]
pub struct FaultWindow {
    pub fault: Fault,
    /// What exactly: `kill n2`, `partition bridge [1 2] [4 5] via 3`, `membership add n4`.
    pub what: String,
    /// Nanoseconds since the start of the run.
    pub start: u64,
    pub end: u64,
    /// Why the fault could not be carried out in full (a membership change refused while the
    /// cluster had no quorum, for example): not an anomaly, the cluster may refuse.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The cluster's current members as clients and workloads see them: nodes removed by the
/// nemesis leave, nodes it adds join.
#[derive(Debug, Default)]
pub struct Members {
    api: Mutex<BTreeMap<NodeId, String>>,
    /// What clients connect with: the cluster's admin certificate, or plaintext.
    pub security: raftmap_node::tls::Security,
}

impl Members {
    pub fn new(cluster: &LocalCluster) -> Self {
        let api = cluster
            .ids()
            .into_iter()
            .filter_map(|id| cluster.node(id).ok().map(|n| (id, n.api_addr.clone())))
            .collect();
        Self {
            api: Mutex::new(api),
            security: cluster.security(),
        }
    }

    pub fn ids(&self) -> Vec<NodeId> {
        lock(&self.api).keys().copied().collect()
    }

    /// A member's API address, chosen by `pick` among the current members.
    pub fn endpoint(&self, pick: usize) -> Option<(NodeId, String)> {
        let m = lock(&self.api);
        let n = m.len().max(1);
        m.iter().nth(pick % n).map(|(i, a)| (*i, a.clone()))
    }

    fn add(&self, id: NodeId, api: String) {
        lock(&self.api).insert(id, api);
    }

    fn remove(&self, id: NodeId) {
        lock(&self.api).remove(&id);
    }
}

/// What a node added by the membership nemesis needs besides the defaults (a kernel map to
/// watch, for the kernel-map workload), and what to forget when one is removed.
pub trait NodeSetup: Send + Sync + std::fmt::Debug {
    /// Before node `id` starts: its extra agent arguments.
    fn prepare(&self, id: NodeId) -> Result<Vec<String>, RunError>;
    /// Node `id`, serving its API at `api`, is a member (it started with the cluster, or
    /// joined).
    fn joined(&self, id: NodeId, api: &str);
    /// Node `id` left the cluster, or never made it in.
    fn removed(&self, id: NodeId);
}

/// Nothing beyond the defaults.
#[derive(Debug)]
pub struct NoSetup;

impl NodeSetup for NoSetup {
    fn prepare(&self, _: NodeId) -> Result<Vec<String>, RunError> {
        Ok(Vec::new())
    }
    fn joined(&self, _: NodeId, _: &str) {}
    fn removed(&self, _: NodeId) {}
}

/// A fault in effect, and how to end it.
#[derive(Debug)]
struct Active {
    fault: Fault,
    what: String,
    nodes: Vec<NodeId>,
    start: u64,
    until: Instant,
}

/// Most faults in effect at once.
const MAX_OVERLAP: usize = 2;

/// The nemesis of one run.
#[derive(Debug)]
pub struct Nemesis<'a> {
    cluster: &'a mut LocalCluster,
    members: &'a Members,
    setup: &'a dyn NodeSetup,
    faults: Vec<Fault>,
    rng: StdRng,
    start: Instant,
    next_id: NodeId,
    active: Vec<Active>,
    log: Vec<FaultWindow>,
    /// Members whose removal was asked for without an answer: it may have happened.
    unsure: Vec<NodeId>,
}

#[cfg(test)]
mod tests;
