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
use std::time::{Duration, Instant};

use crate::cluster::LocalCluster;
use raftmap_node::proto as pb;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::error::RunError;

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
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, String>> {
        self.api.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.lock().keys().copied().collect()
    }

    /// A member's API address, chosen by `pick` among the current members.
    pub fn endpoint(&self, pick: usize) -> Option<(NodeId, String)> {
        let m = self.lock();
        let n = m.len().max(1);
        m.iter().nth(pick % n).map(|(i, a)| (*i, a.clone()))
    }

    fn add(&self, id: NodeId, api: String) {
        self.lock().insert(id, api);
    }

    fn remove(&self, id: NodeId) {
        self.lock().remove(&id);
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

/// The shapes of a network partition.
#[derive(Debug, Clone, Copy)]
enum Shape {
    Halves,
    LeaderAlone,
    LeaderInMinority,
    Bridge,
    Ring,
}

/// Who drops whose packets for `shape` over `ids` (the leader first when it matters); and a
/// description of the cut.
fn grudges(
    shape: Shape,
    ids: &[NodeId],
    leader: Option<NodeId>,
    rng: &mut StdRng,
) -> (BTreeMap<NodeId, Vec<NodeId>>, String) {
    let mut order = ids.to_vec();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.gen_range(0..=i));
    }
    // Put the leader first for the shapes built around it.
    if let Some(l) = leader {
        if let Some(p) = order.iter().position(|&i| i == l) {
            order.swap(0, p);
        }
    }
    let n = order.len();
    let split = |cut: usize| -> (Vec<NodeId>, Vec<NodeId>) {
        (order[..cut].to_vec(), order[cut..].to_vec())
    };
    let both_ways = |a: &[NodeId], b: &[NodeId], g: &mut BTreeMap<NodeId, Vec<NodeId>>| {
        for x in a {
            g.entry(*x).or_default().extend_from_slice(b);
        }
        for y in b {
            g.entry(*y).or_default().extend_from_slice(a);
        }
    };
    let fmt = |v: &[NodeId]| {
        v.iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut g = BTreeMap::new();
    let what = match shape {
        Shape::Halves => {
            let (a, b) = split(n / 2);
            both_ways(&a, &b, &mut g);
            format!("partition halves [{}] [{}]", fmt(&a), fmt(&b))
        }
        Shape::LeaderAlone => {
            let (a, b) = split(1);
            both_ways(&a, &b, &mut g);
            format!("partition leader alone [{}] [{}]", fmt(&a), fmt(&b))
        }
        Shape::LeaderInMinority => {
            let (a, b) = split(((n - 1) / 2).max(1));
            both_ways(&a, &b, &mut g);
            format!("partition leader in minority [{}] [{}]", fmt(&a), fmt(&b))
        }
        Shape::Bridge => {
            // The last node hears both halves; the halves do not hear each other.
            let bridge = order[n - 1];
            let (a, b) = (
                order[..(n - 1) / 2].to_vec(),
                order[(n - 1) / 2..n - 1].to_vec(),
            );
            both_ways(&a, &b, &mut g);
            format!("partition bridge [{}] [{}] via {bridge}", fmt(&a), fmt(&b))
        }
        Shape::Ring => {
            // Each node hears its two neighbours in the shuffled ring and nobody else.
            for (i, x) in order.iter().enumerate() {
                let (prev, next) = (order[(i + n - 1) % n], order[(i + 1) % n]);
                let deaf: Vec<NodeId> = order
                    .iter()
                    .copied()
                    .filter(|y| y != x && *y != prev && *y != next)
                    .collect();
                g.insert(*x, deaf);
            }
            format!("partition ring [{}]", fmt(&order))
        }
    };
    (g, what)
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

impl<'a> Nemesis<'a> {
    pub fn new(
        cluster: &'a mut LocalCluster,
        members: &'a Members,
        setup: &'a dyn NodeSetup,
        faults: &[Fault],
        seed: u64,
        start: Instant,
    ) -> Self {
        let ids = cluster.ids();
        Self {
            next_id: ids.iter().max().copied().unwrap_or(0) + 1,
            cluster,
            members,
            setup,
            faults: faults.to_vec(),
            rng: StdRng::seed_from_u64(seed),
            start,
            active: Vec::new(),
            log: Vec::new(),
            unsure: Vec::new(),
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Injects faults until `deadline`, then ends every fault still in effect; returns what
    /// happened.
    pub async fn run(mut self, deadline: Instant) -> Result<Vec<FaultWindow>, RunError> {
        // No new fault this close to the end: the cluster heals before the final reads.
        let last_start = deadline.checked_sub(Duration::from_millis(1500));
        let mut next_start = Instant::now() + self.quiet();
        while !self.faults.is_empty() {
            let now = Instant::now();
            self.end_due()?;
            if last_start.is_none_or(|l| now >= l) {
                break;
            }
            if now >= next_start && self.active.len() < MAX_OVERLAP {
                self.begin().await?;
                next_start = Instant::now() + self.quiet();
            }
            let wake = self
                .active
                .iter()
                .map(|a| a.until)
                .chain([next_start, deadline])
                .min()
                .unwrap_or(deadline);
            tokio::time::sleep_until(wake.max(Instant::now() + Duration::from_millis(5)).into())
                .await;
        }
        for a in std::mem::take(&mut self.active) {
            self.end(a)?;
        }
        tokio::time::sleep_until(deadline.into()).await;
        // Removals left in doubt: the healed cluster says whether they happened.
        let mut unsure = std::mem::take(&mut self.unsure);
        unsure.sort_unstable();
        unsure.dedup();
        // (A later request may have removed it for certain.)
        unsure.retain(|v| self.members.ids().contains(v));
        for victim in unsure {
            let start = self.now();
            if self.is_member(victim, Duration::from_secs(10)).await == Some(false) {
                self.forget(victim)?;
                self.log.push(FaultWindow {
                    fault: Fault::Membership,
                    what: format!(
                        "membership remove n{victim} (unanswered earlier; found removed)"
                    ),
                    start,
                    end: self.now(),
                    error: None,
                });
            }
        }
        Ok(self.log)
    }

    /// Ends the faults whose time is up.
    fn end_due(&mut self) -> Result<(), RunError> {
        let now = Instant::now();
        let due: Vec<usize> = (0..self.active.len())
            .filter(|&i| self.active[i].until <= now)
            .collect();
        for i in due.into_iter().rev() {
            let a = self.active.remove(i);
            self.end(a)?;
        }
        Ok(())
    }

    /// Awaits `work` (which must not hold the cluster) while ending the other faults on time:
    /// a membership change takes seconds, and a kill meant to last a second must not last them.
    async fn meanwhile<T>(
        &mut self,
        work: impl std::future::Future<Output = T>,
    ) -> Result<T, RunError> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                r = &mut work => return Ok(r),
                _ = tokio::time::sleep(Duration::from_millis(50)) => self.end_due()?,
            }
        }
    }

    /// Waits until node `id` reports ready, ending the other faults on time meanwhile; the last
    /// thing it said when it did not within `within`.
    async fn wait_ready(&mut self, id: NodeId, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            // Not listening yet is not an answer either: the node is still starting.
            match self.cluster.client(id).await {
                Ok(client) => {
                    let status = async move {
                        tokio::time::timeout(Duration::from_millis(500), client.status()).await
                    };
                    match self.meanwhile(status).await.map_err(|e| e.to_string())? {
                        Ok(Ok(s)) if s.ready => return Ok(()),
                        Ok(Ok(s)) => last = format!("not ready: {}", s.not_ready_reason),
                        Ok(Err(e)) => last = e.to_string(),
                        Err(_) => last = "no answer within 500 ms".into(),
                    }
                }
                Err(e) => last = e.to_string(),
            }
            let pause = tokio::time::sleep(Duration::from_millis(50));
            self.meanwhile(pause).await.map_err(|e| e.to_string())?;
        }
        Err(format!(
            "node {id} was not ready within {within:?} ({last})"
        ))
    }

    /// An admin call through node `via`, bounded in time, ending the other faults on time
    /// meanwhile; the error as text.
    async fn admin<F, Fut>(&mut self, via: NodeId, within: Duration, call: F) -> Result<(), String>
    where
        F: FnOnce(pb::admin_client::AdminClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<(), tonic::Status>>,
    {
        let client = self.cluster.client(via).await.map_err(|e| e.to_string())?;
        let work = tokio::time::timeout(within, call(client.admin()));
        match self.meanwhile(work).await.map_err(|e| e.to_string())? {
            Ok(Ok(())) => Ok(()),
            Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), first_line(s.message()))),
            Err(_) => Err(format!("no answer within {within:?}")),
        }
    }

    /// Whether the cluster's leader counts `id` among its members (voter or learner). Gone is
    /// final once two answers in a row from the same leader say so; still there is only the
    /// last answer when `within` has passed (a change in flight lists the node until its
    /// last step commits). `None`: no leader answered.
    async fn is_member(&self, id: NodeId, within: Duration) -> Option<bool> {
        let deadline = Instant::now() + within;
        let mut last: Option<(NodeId, bool)> = None;
        while Instant::now() < deadline {
            for via in self.free_nodes() {
                let Some(r) = self.members_seen_by(via).await else {
                    continue;
                };
                if !r.has_leader {
                    continue;
                }
                let Some(l) = self.members_seen_by(r.leader_id).await else {
                    continue;
                };
                if l.has_leader && l.leader_id == r.leader_id {
                    let now = (l.leader_id, l.members.iter().any(|m| m.node_id == id));
                    if last == Some(now) && !now.1 {
                        return Some(false);
                    }
                    last = Some(now);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        last.map(|(_, member)| member)
    }

    /// Node `via`'s own view of the membership, if it answers within a second.
    async fn members_seen_by(&self, via: NodeId) -> Option<pb::MembersResponse> {
        let client = self.cluster.client(via).await.ok()?;
        let mut admin = client.admin();
        let call = admin.members(pb::MembersRequest {});
        match tokio::time::timeout(Duration::from_secs(1), call).await {
            Ok(Ok(r)) => Some(r.into_inner()),
            _ => None,
        }
    }

    /// A node out of the cluster: stop it, and send no more work its way.
    fn forget(&mut self, id: NodeId) -> Result<(), RunError> {
        self.members.remove(id);
        self.setup.removed(id);
        self.cluster.kill(id)?;
        Ok(())
    }

    fn quiet(&mut self) -> Duration {
        Duration::from_millis(self.rng.gen_range(200..1000))
    }

    /// The nodes a kill or pause may take: current members not under a kill or pause already.
    fn free_nodes(&self) -> Vec<NodeId> {
        let busy: Vec<NodeId> = self
            .active
            .iter()
            .filter(|a| matches!(a.fault, Fault::Kill | Fault::Pause))
            .flat_map(|a| a.nodes.iter().copied())
            .collect();
        self.members
            .ids()
            .into_iter()
            .filter(|i| !busy.contains(i))
            .collect()
    }

    /// Starts one fault of a kind not already in effect.
    async fn begin(&mut self) -> Result<(), RunError> {
        let kinds: Vec<Fault> = self
            .faults
            .iter()
            .copied()
            .filter(|f| self.active.iter().all(|a| a.fault != *f))
            .collect();
        // The kind used least so far (ties drawn at random): every kind asked for comes up
        // even in a short run.
        let used = |f: Fault| {
            self.log.iter().filter(|w| w.fault == f).count()
                + self.active.iter().filter(|a| a.fault == f).count()
        };
        let Some(least) = kinds.iter().map(|f| used(*f)).min() else {
            return Ok(());
        };
        let kinds: Vec<Fault> = kinds.into_iter().filter(|f| used(*f) == least).collect();
        let fault = kinds[self.rng.gen_range(0..kinds.len())];
        let hold = Duration::from_millis(self.rng.gen_range(300..1200));
        let start = self.now();
        let (what, nodes) = match fault {
            Fault::Kill | Fault::Pause => {
                let free = self.free_nodes();
                if free.is_empty() {
                    return Ok(());
                }
                let node = free[self.rng.gen_range(0..free.len())];
                if fault == Fault::Kill {
                    self.cluster.kill(node)?;
                    (format!("kill n{node}"), vec![node])
                } else {
                    self.cluster.pause(node)?;
                    (format!("pause n{node}"), vec![node])
                }
            }
            Fault::Partition => {
                let ids = self.members.ids();
                let shapes: &[Shape] = if ids.len() >= 4 {
                    &[
                        Shape::Halves,
                        Shape::LeaderAlone,
                        Shape::LeaderInMinority,
                        Shape::Bridge,
                        Shape::Ring,
                    ]
                } else {
                    // With three nodes a ring is no cut at all and a minority is one node.
                    &[Shape::Halves, Shape::LeaderAlone, Shape::Bridge]
                };
                let shape = shapes[self.rng.gen_range(0..shapes.len())];
                let leader = match shape {
                    Shape::LeaderAlone | Shape::LeaderInMinority => self.cluster.leader(&ids).await,
                    _ => None,
                };
                let (g, what) = grudges(shape, &ids, leader, &mut self.rng);
                self.cluster.cut(&g)?;
                (what, Vec::new())
            }
            Fault::Membership => {
                let (what, error) = self.change_membership().await?;
                let end = self.now();
                self.log.push(FaultWindow {
                    fault,
                    what,
                    start,
                    end,
                    error,
                });
                return Ok(());
            }
        };
        self.active.push(Active {
            fault,
            what,
            nodes,
            start,
            until: Instant::now() + hold,
        });
        Ok(())
    }

    /// Ends a fault: restart, resume or heal.
    fn end(&mut self, a: Active) -> Result<(), RunError> {
        match a.fault {
            Fault::Kill => {
                for &n in &a.nodes {
                    self.cluster.restart(n)?;
                }
            }
            Fault::Pause => {
                for &n in &a.nodes {
                    self.cluster.resume(n)?;
                }
            }
            Fault::Partition => self.cluster.heal()?,
            Fault::Membership => {}
        }
        let end = self.now();
        self.log.push(FaultWindow {
            fault: a.fault,
            what: a.what,
            start: a.start,
            end,
            error: None,
        });
        Ok(())
    }

    /// Replaces a voter, as an operator would: a fresh node joins as a learner, is promoted
    /// once ready, and only then is a voter that is not under another fault removed, so the
    /// number of voters never wears down. Returns what was done and, if the cluster refused a
    /// step or did not answer in time, why.
    async fn change_membership(&mut self) -> Result<(String, Option<String>), RunError> {
        let within = Duration::from_secs(8);
        let id = self.next_id;
        self.next_id += 1;
        let args = self.setup.prepare(id)?;
        self.cluster.set_node_args(id, args);
        // Join through a member that is not killed or paused right now.
        let free = self.free_nodes();
        let ids = self.members.ids();
        let via = free.first().copied().unwrap_or(ids[0]);
        self.cluster.spawn(id, Some(via), true)?;
        let added = format!("membership add n{id}");
        if let Err(e) = self.wait_ready(id, within).await {
            // A node that could not join is stopped and forgotten.
            self.cluster.kill(id)?;
            self.setup.removed(id);
            return Ok((added, Some(first_line(&e))));
        }
        let api = self.cluster.node(id)?.api_addr.clone();
        self.setup.joined(id, &api);
        // Even a learner takes client requests (forwarded): it is a member now.
        self.members.add(id, api);
        let promoted = self
            .admin(via, within, |mut a| async move {
                a.promote(pb::PromoteRequest {
                    node_id: id,
                    max_lag: 1000,
                })
                .await
                .map(|_| ())
            })
            .await;
        if let Err(e) = promoted {
            // It stays a learner; no voter is taken out for it.
            return Ok((format!("{added}, promote"), Some(e)));
        }
        let candidates: Vec<NodeId> = self
            .free_nodes()
            .into_iter()
            .filter(|&n| n != id && n != via)
            .collect();
        if candidates.is_empty() {
            return Ok((format!("{added} (no voter free to replace)"), None));
        }
        let victim = candidates[self.rng.gen_range(0..candidates.len())];
        let what = format!("membership replace n{victim} with n{id}");
        let removed = self
            .admin(via, within, |mut a| async move {
                a.remove(pb::RemoveRequest {
                    node_id: victim,
                    force: false,
                })
                .await
                .map(|_| ())
            })
            .await;
        match removed {
            Ok(()) => {
                self.forget(victim)?;
                Ok((what, None))
            }
            // Unanswered or refused: the removal may still have been committed (a lost
            // answer, a leader that changed after appending it). Ask the leader.
            Err(e) => match self.is_member(victim, Duration::from_secs(3)).await {
                Some(false) => {
                    self.forget(victim)?;
                    Ok((format!("{what} ({e}; found removed)"), None))
                }
                _ => {
                    self.unsure.push(victim);
                    Ok((what, Some(e)))
                }
            },
        }
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hears(g: &BTreeMap<NodeId, Vec<NodeId>>, a: NodeId, b: NodeId) -> bool {
        !g.get(&a).is_some_and(|d| d.contains(&b)) && !g.get(&b).is_some_and(|d| d.contains(&a))
    }

    #[test]
    fn partition_shapes_cut_what_they_say() {
        let ids = [1, 2, 3, 4, 5];
        let mut rng = StdRng::seed_from_u64(1);
        let (g, what) = grudges(Shape::LeaderInMinority, &ids, Some(3), &mut rng);
        assert!(
            what.starts_with("partition leader in minority [3 "),
            "{what}"
        );
        // The leader hears exactly one other node; the majority side hears each other.
        assert_eq!(
            ids.iter().filter(|&&i| i != 3 && hears(&g, 3, i)).count(),
            1
        );

        let (g, what) = grudges(Shape::Bridge, &ids, None, &mut rng);
        let bridge: NodeId = what.rsplit(' ').next().unwrap().parse().unwrap();
        for i in ids {
            assert!(hears(&g, bridge, i), "{what}: bridge must hear {i}");
        }
        let cut = ids
            .iter()
            .flat_map(|&a| ids.iter().map(move |&b| (a, b)))
            .filter(|&(a, b)| a < b && !hears(&g, a, b))
            .count();
        assert_eq!(cut, 4, "{what}: two halves of two cut both ways");

        let (g, _) = grudges(Shape::Ring, &ids, None, &mut rng);
        for i in ids {
            let heard = ids.iter().filter(|&&j| j != i && hears(&g, i, j)).count();
            assert_eq!(heard, 2, "node {i} must hear its two neighbours only");
        }

        let (g, _) = grudges(Shape::LeaderAlone, &[1, 2, 3], Some(2), &mut rng);
        assert!(!hears(&g, 2, 1) && !hears(&g, 2, 3) && hears(&g, 1, 3));
    }

    #[test]
    fn clock_faults_are_refused_with_the_reason() {
        let e = "clock".parse::<Fault>().unwrap_err();
        assert!(e.contains("one clock"), "{e}");
        assert_eq!("membership".parse::<Fault>(), Ok(Fault::Membership));
    }
}
