//! What the services of one node share: its Raft handle, state, log, proposer, metrics and
//! kernel sync, its readiness, and the membership as Raft sees it. The node (`node.rs`) builds
//! it; the gRPC services, the HTTP probes and the consistency checks read it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::error::{LinearizableReadError, RaftError};
use raftmap_storage::{LogStore, NodeId, NodeInfo, Raft, StateView};
use tokio::sync::watch;

use crate::error::{NodeError, Result};
use crate::kernel::KernelSync;
use crate::lock::lock;
use crate::metrics::Metrics;
use crate::propose::{Batcher, Proposer};

/// State shared by the services of one node.
pub struct NodeShared {
    pub(crate) id: NodeId,
    pub(crate) info: NodeInfo,
    /// The cluster CA's directory (`--ca-dir`): this node issues node certificates.
    pub(crate) ca_dir: Option<std::path::PathBuf>,
    /// Whether the node id was drawn at random (`--node-id auto`), so that a join refused for
    /// it may draw another.
    pub(crate) auto_id: bool,
    /// The host this node runs on, recorded with its membership (`--node-name`).
    pub(crate) node_name: Option<String>,
    pub(crate) raft: Raft,
    pub(crate) view: StateView,
    pub(crate) log: LogStore,
    pub(crate) proposer: Proposer,
    pub(crate) batcher: Batcher,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) kernel: Arc<KernelSync>,
    /// One permit per watch stream being served.
    pub(crate) watchers: Arc<tokio::sync::Semaphore>,
    pub(crate) max_watchers: usize,
    /// Where incoming snapshots are spooled (the data dir).
    pub(crate) data_dir: PathBuf,
    pub(crate) max_snapshot_bytes: u64,
    /// Held while a snapshot is being received: one at a time.
    pub(crate) receiving_snapshot: tokio::sync::Mutex<()>,
    /// Set once the node cannot go on (its Raft core stopped: a storage error such as a full
    /// disk, or a panic): `/healthz` fails and the daemon exits with this reason.
    pub(crate) fatal: watch::Sender<Option<String>>,
    /// What the consistency checks found wrong (`consistency.rs`), if anything.
    pub(crate) corrupt: std::sync::Mutex<Option<String>>,
    /// This node's own disk failed its check: it is not ready.
    pub(crate) disk_corrupt: std::sync::atomic::AtomicBool,
    /// Senders of Raft messages that this node's membership does not list yet but a member
    /// confirmed.
    pub(crate) confirmed: std::sync::Mutex<std::collections::BTreeSet<NodeId>>,
    /// Senders no member listed, and when they were last asked about.
    pub(crate) unknown: std::sync::Mutex<BTreeMap<NodeId, Instant>>,
    pub(crate) unsafe_local_reads: bool,
    /// This node's certificates (or none: `--insecure`, loopback).
    pub(crate) security: crate::tls::Security,
    /// When an append (a heartbeat, at least) from a leader last arrived.
    pub(crate) heard: Heard,
    /// How long without one a node that does not lead stays ready.
    pub(crate) ready_silence: Duration,
}

/// When something last happened, cheap to note from a hot path.
#[derive(Debug)]
pub(crate) struct Heard {
    base: Instant,
    /// Milliseconds after `base`; `NEVER` until noted.
    at: std::sync::atomic::AtomicU64,
}

const NEVER: u64 = u64::MAX;

impl Default for Heard {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            at: std::sync::atomic::AtomicU64::new(NEVER),
        }
    }
}

impl Heard {
    pub(crate) fn note(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.at.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long ago it was last noted; `None` if never since the process started.
    pub(crate) fn last(&self) -> Option<Duration> {
        match self.at.load(std::sync::atomic::Ordering::Relaxed) {
            NEVER => None,
            ms => Some(
                self.base
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms)),
            ),
        }
    }

    /// How long ago it was last noted, or the struct made.
    pub(crate) fn ago(&self) -> Duration {
        self.last().unwrap_or_else(|| self.base.elapsed())
    }
}

/// How long a node that does not lead may go without an append from the leader and still
/// count as ready: its maps may be stale past that (a partition, or a removal it does not know
/// of yet). At least 5 s, and 10 heartbeats.
pub(crate) fn ready_silence(heartbeat: Duration) -> Duration {
    (heartbeat * 10).max(Duration::from_secs(5))
}

impl std::fmt::Debug for NodeShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeShared")
            .field("id", &self.id)
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl NodeShared {
    /// True when this node may serve traffic: it is a member, a leader is known, it has applied
    /// everything it knows to be committed, and its kernel maps are reconciled.
    pub fn ready(&self) -> bool {
        self.readiness().is_ok()
    }

    /// Whether this node's own view of the membership lists it. Asked of the Raft core, not
    /// read from its metrics, which a node that has just started may not have published yet.
    pub(crate) async fn is_member(&self) -> Result<bool> {
        let id = self.id;
        self.raft
            .with_raft_state(move |st| {
                st.membership_state
                    .effective()
                    .membership()
                    .get_node(&id)
                    .is_some()
            })
            .await
            .map_err(|e| NodeError::Internal(format!("raft: {e}")))
    }

    /// [`Self::ready`], or why not.
    pub fn readiness(&self) -> std::result::Result<(), String> {
        if let Some(reason) = self.fatal.borrow().clone() {
            return Err(format!("failed: {reason}"));
        }
        if self.disk_corrupt.load(std::sync::atomic::Ordering::Acquire) {
            return Err(format!(
                "corrupt: {}",
                self.corrupt_finding().unwrap_or_default()
            ));
        }
        let m = self.raft.metrics().borrow_watched().clone();
        if m.membership_config
            .membership()
            .get_node(&self.id)
            .is_none()
        {
            return Err("not a member of a cluster (yet)".into());
        }
        if m.current_leader.is_none() {
            return Err("no leader known".into());
        }
        // The committed index below is the one this node knows: it is the cluster's only once
        // the leader has spoken to this process (after a restart, say).
        if m.current_leader != Some(self.id) {
            match self.heard.last() {
                None => {
                    return Err(
                        "waiting for the leader's first append since this node started".into(),
                    )
                }
                Some(ago) if ago > self.ready_silence => {
                    return Err(format!(
                        "no append from the leader for {:.1}s",
                        ago.as_secs_f64()
                    ))
                }
                Some(_) => {}
            }
        }
        let applied = m.last_applied.map_or(0, |l| l.index);
        let committed = self.log.committed_index().unwrap_or(0);
        if applied < committed {
            return Err(format!(
                "catching up: applied index {applied} of {committed} committed"
            ));
        }
        match self.kernel.not_ready() {
            Some(reason) => Err(reason),
            None => Ok(()),
        }
    }

    /// Admin client for the leader's API, or `None` when this node leads. The call is
    /// forwarded for the caller `req` was granted to.
    pub(crate) async fn leader_admin<T>(
        &self,
        req: &tonic::Request<T>,
    ) -> Result<Option<crate::pool::AdminRpc>> {
        let leader = self
            .proposer
            .wait_for_leader(Instant::now() + Duration::from_secs(5))
            .await?;
        if leader == self.id {
            return Ok(None);
        }
        let node = self.proposer.member(leader)?;
        let granted = req.extensions().get::<crate::service::Granted>();
        let caller = granted.and_then(crate::service::Granted::principal);
        Ok(Some(self.proposer.pool.admin(
            leader,
            &node.api_addr,
            caller,
        )?))
    }

    /// Hands this node's leadership to the voter whose log matches it furthest and waits up to
    /// `wait` until another node leads (before a leader removes itself, so that it need not
    /// manage a change that takes it out, and before it stops). Returns the new leader.
    pub(crate) async fn hand_over_leadership(&self, wait: Duration) -> Result<NodeId> {
        // Voters of the newest configuration only: mid-change, a voter of the old one may be
        // on its way out.
        let voters = newest_voters(&self.raft);
        let target = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow_watched();
            let matched = |id: &NodeId| {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(id).cloned().flatten())
            };
            let retired = self.view.cluster().retired;
            voters
                .into_iter()
                .filter(|id| *id != self.id && !retired.contains(id))
                .max_by_key(matched)
        };
        let Some(target) = target else {
            return Err(NodeError::Unavailable(
                "no other voter to hand leadership to".into(),
            ));
        };
        self.raft
            .trigger()
            .transfer_leader(target)
            .await
            .map_err(|e| NodeError::Unavailable(format!("raft: {e}")))?;
        let me = self.id;
        let new = self
            .raft
            .wait(Some(wait))
            .metrics(
                |m| m.current_leader.is_some_and(|l| l != me),
                "another node leads",
            )
            .await;
        match new {
            Ok(m) => Ok(m.current_leader.unwrap_or(target)),
            Err(openraft::metrics::WaitError::ShuttingDown) => {
                Err(NodeError::Unavailable("raft has shut down".into()))
            }
            Err(openraft::metrics::WaitError::Timeout(..)) => Err(NodeError::Unavailable(format!(
                "leadership did not pass to node {target} within {wait:?}; retry"
            ))),
        }
    }

    /// Waits until this node has applied everything committed before the call (read-index).
    pub(crate) async fn read_barrier(&self) -> Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let leader = self.proposer.wait_for_leader(deadline).await?;
            let index = if leader == self.id {
                match self
                    .raft
                    .ensure_linearizable(openraft::ReadPolicy::ReadIndex)
                    .await
                {
                    Ok(l) => return Ok(l.index()),
                    Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(_))) => None,
                    Err(e) => {
                        return Err(NodeError::Unavailable(format!(
                            "cannot confirm leadership for a linearizable read: {e}"
                        )))
                    }
                }
            } else {
                let addr = self.proposer.node_addr(leader)?;
                match self
                    .proposer
                    .pool
                    .peer(leader, &addr)?
                    .read_index(raftmap_proto::ReadIndexRequest {})
                    .await
                {
                    Ok(r) => Some(r.into_inner().read_index),
                    Err(s) if s.code() == tonic::Code::FailedPrecondition => None,
                    Err(s) => {
                        return Err(NodeError::Unavailable(format!(
                            "leader {leader} at {addr} did not answer the read-index request: {}",
                            s.message()
                        )))
                    }
                }
            };
            match index {
                Some(i) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if self.view.wait_applied(i, left).await {
                        return Ok(i);
                    }
                    return Err(NodeError::Timeout(format!(
                        "this node did not apply up to index {i} in time"
                    )));
                }
                None if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                None => {
                    return Err(NodeError::Unavailable(
                        "leadership kept moving; no linearizable read".into(),
                    ))
                }
            }
        }
    }

    /// The cluster's id: as initialised, or (before this node knows it) the one its
    /// certificate names.
    pub(crate) fn cluster_id(&self) -> String {
        self.proposer.pool.cluster().to_string()
    }

    pub(crate) fn confirmed_peers(&self, id: NodeId) -> bool {
        lock(&self.confirmed).contains(&id)
    }

    /// Whether the members were asked about `id` in the last five seconds and none knew it.
    pub(crate) fn recently_unknown(&self, id: NodeId) -> bool {
        lock(&self.unknown)
            .get(&id)
            .is_some_and(|t| t.elapsed() < Duration::from_secs(5))
    }

    pub(crate) fn note_unknown(&self, id: NodeId) {
        let mut unknown = lock(&self.unknown);
        unknown.retain(|_, t| t.elapsed() < Duration::from_secs(60));
        unknown.insert(id, Instant::now());
    }

    pub(crate) fn confirm_peer(&self, id: NodeId) {
        lock(&self.confirmed).insert(id);
    }

    /// What the consistency checks found wrong, if anything.
    pub(crate) fn corrupt_finding(&self) -> Option<String> {
        lock(&self.corrupt).clone()
    }

    /// What the checks of peer messages need to know about this node.
    pub(crate) fn peer_context(&self, sender: Option<NodeId>) -> crate::peer_check::PeerContext {
        crate::peer_check::PeerContext {
            me: self.id,
            sender,
            retired: self.view.cluster().retired,
            committed: self.raft.metrics().borrow_watched().local_committed,
        }
    }
}

/// The voters of the newest configuration (while a change is under way, the one it moves to):
/// what the next membership change is computed from.
pub(crate) fn newest_voters(raft: &Raft) -> std::collections::BTreeSet<NodeId> {
    let metrics = raft.metrics();
    let m = metrics.borrow_watched();
    m.membership_config
        .membership()
        .get_joint_config()
        .last()
        .cloned()
        .unwrap_or_default()
}

/// Nodes of the current configuration: id -> (info, voter?).
pub(crate) fn members(raft: &Raft) -> (BTreeMap<NodeId, (NodeInfo, bool)>, Option<NodeId>) {
    let m = raft.metrics().borrow_watched().clone();
    let membership = m.membership_config.membership();
    let voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
    let nodes = membership
        .nodes()
        .map(|(id, n)| (*id, (n.clone(), voters.contains(id))))
        .collect();
    (nodes, m.current_leader)
}
