//! Getting client batches into the log: group commit, then append on the leader or forward to it.
//!
//! Group commit batches naturally: a proposal takes whatever arrived while earlier proposals were
//! in flight, up to a size bound. An idle node therefore proposes a single write at once, with
//! no added wait, and a busy one amortises one fsync and one round trip over many writes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, RaftError};
use raftmap_storage::{
    ApplyResult, BatchOutcome, ClientBatch, NodeId, NodeInfo, Op, Proposal, Raft, Source,
};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::error::{decode, encode, NodeError, ProposeError, Result};
use crate::metrics::Metrics;
use crate::pool::PeerPool;

/// How long a proposal may wait for a leader before failing with UNAVAILABLE.
const LEADER_WAIT: Duration = Duration::from_secs(10);

/// Group-commit bounds.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Most client operations in one log entry (a single larger client batch still goes alone).
    pub max_ops: usize,
    /// Most key and value bytes in one log entry.
    pub max_bytes: usize,
    /// Proposals in flight at once; more waiting work makes the next one larger.
    pub max_in_flight: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_ops: 20_000,
            max_bytes: 4 * 1024 * 1024,
            max_in_flight: 1,
        }
    }
}

/// Appends proposals on the leader, or forwards them to it.
#[derive(Clone)]
pub struct Proposer {
    pub(crate) raft: Raft,
    pub(crate) id: NodeId,
    pub(crate) pool: PeerPool,
    pub(crate) metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Proposer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proposer")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Proposer {
    /// Proposes one log entry and waits until it is applied here (when leader) or on the leader.
    /// Returns the entry's index and the state machine's response.
    pub async fn propose(&self, proposal: Proposal) -> Result<(u64, ApplyResult)> {
        let deadline = Instant::now() + LEADER_WAIT;
        let ops = proposal.op_count() as u64;
        let started = Instant::now();
        loop {
            let leader = self.wait_for_leader(deadline).await?;
            let res = if leader == self.id {
                self.append_local(proposal.clone()).await
            } else {
                self.metrics.forwarded_proposals.inc();
                self.forward(leader, &proposal).await?
            };
            match res {
                Ok(r) => {
                    self.metrics.proposals.inc();
                    self.metrics.proposed_ops.inc_by(ops);
                    self.metrics.batch_ops.observe(ops as f64);
                    self.metrics
                        .commit_latency
                        .observe(started.elapsed().as_secs_f64());
                    return Ok(r);
                }
                // Not appended anywhere: safe to retry once the leader is known.
                Err(ProposeError::NotLeader { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(ProposeError::NotLeader { leader }) => {
                    return Err(NodeError::Unavailable(format!(
                        "no leader accepted the write within {LEADER_WAIT:?} (last known leader: {leader:?})"
                    )))
                }
                Err(ProposeError::Failed(m)) => return Err(NodeError::Unavailable(m)),
            }
        }
    }

    /// Appends on this node, which must be the leader.
    pub(crate) async fn append_local(
        &self,
        proposal: Proposal,
    ) -> std::result::Result<(u64, ApplyResult), ProposeError> {
        match self.raft.client_write(proposal).await {
            Ok(resp) => Ok((resp.log_id.index, resp.data)),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(ProposeError::NotLeader {
                    leader: f.leader_id,
                })
            }
            Err(e) => Err(ProposeError::Failed(format!("raft: {e}"))),
        }
    }

    async fn forward(
        &self,
        leader: NodeId,
        proposal: &Proposal,
    ) -> Result<std::result::Result<(u64, ApplyResult), ProposeError>> {
        let addr = self.node_addr(leader)?;
        let data = encode(proposal)?;
        let mut client = self.pool.peer(leader, &addr)?;
        let resp = client
            .propose(raftmap_proto::RaftPayload { data })
            .await
            .map_err(|s| {
                NodeError::Unavailable(format!(
                    "forwarding to leader {leader} at {addr} failed ({}); the write may or may not have been applied",
                    s.message()
                ))
            })?;
        decode(&resp.into_inner().data)
    }

    /// How to reach a member, as the current membership says.
    pub(crate) fn member(&self, id: NodeId) -> Result<NodeInfo> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        m.membership_config
            .membership()
            .get_node(&id)
            .cloned()
            .ok_or_else(|| NodeError::Unavailable(format!("node {id} is not in the membership")))
    }

    /// Raft address of a member.
    pub(crate) fn node_addr(&self, id: NodeId) -> Result<String> {
        Ok(self.member(id)?.raft_addr)
    }

    /// The current leader, waiting for one to be elected until `deadline`.
    pub async fn wait_for_leader(&self, deadline: Instant) -> Result<NodeId> {
        let mut rx = self.raft.metrics();
        loop {
            if let Some(l) = rx.borrow_and_update().current_leader {
                return Ok(l);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(NodeError::Unavailable("raft has shut down".into())),
                Err(_) => {
                    return Err(NodeError::Unavailable(
                        "no leader: the cluster has no quorum or is not initialised (raftmap cluster init)".into(),
                    ))
                }
            }
        }
    }
}

/// The outcome of one client batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteOutcome {
    pub index: u64,
    pub outcome: BatchOutcome,
}

struct Pending {
    ops: Vec<Op>,
    source: Source,
    bytes: usize,
    reply: oneshot::Sender<Result<WriteOutcome>>,
}

/// Group commit: coalesces concurrently submitted client batches into log entries.
#[derive(Debug, Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Pending>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pending({} ops)", self.ops.len())
    }
}

impl Batcher {
    /// Starts the batching task.
    pub fn start(proposer: Proposer, cfg: BatchConfig) -> Self {
        // Peers refuse entries over the log entry limits (`Proposal::check_size`).
        let cfg = BatchConfig {
            max_ops: cfg.max_ops.min(raftmap_storage::MAX_PROPOSAL_OPS),
            max_bytes: cfg.max_bytes.min(raftmap_storage::MAX_PROPOSAL_BYTES),
            ..cfg
        };
        let (tx, rx) = mpsc::channel(65_536);
        tokio::spawn(run(proposer, cfg, rx));
        Self { tx }
    }

    /// Submits one client batch and waits for its outcome.
    pub async fn submit(&self, ops: Vec<Op>, source: Source) -> Result<WriteOutcome> {
        self.enqueue(ops, source).await?.wait().await
    }

    /// Queues one client batch behind every batch queued before it (batches reach the log in
    /// the order they were queued) and returns at once; the outcome arrives in the ticket.
    pub async fn enqueue(&self, ops: Vec<Op>, source: Source) -> Result<Ticket> {
        let bytes = ops.iter().map(op_bytes).sum();
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Pending {
                ops,
                source,
                bytes,
                reply,
            })
            .await
            .map_err(|_| NodeError::Unavailable("node is shutting down".into()))?;
        Ok(Ticket(rx))
    }
}

/// Where a queued batch's outcome arrives.
#[derive(Debug)]
pub struct Ticket(oneshot::Receiver<Result<WriteOutcome>>);

impl Ticket {
    pub async fn wait(self) -> Result<WriteOutcome> {
        self.0
            .await
            .map_err(|_| NodeError::Unavailable("node is shutting down".into()))?
    }
}

fn op_bytes(op: &Op) -> usize {
    match op {
        Op::DeclareMap(_) | Op::DropMap { .. } => 64,
        Op::Put { key, value, .. } => key.len() + value.len() + 16,
        Op::Delete { key, .. } => key.len() + 16,
        Op::CompareAndSwap {
            key, expected, new, ..
        } => {
            key.len()
                + expected.as_ref().map_or(0, Vec::len)
                + new.as_ref().map_or(0, Vec::len)
                + 16
        }
    }
}

async fn run(proposer: Proposer, cfg: BatchConfig, mut rx: mpsc::Receiver<Pending>) {
    let slots = Arc::new(Semaphore::new(cfg.max_in_flight.max(1)));
    // Sequence numbers increase across restarts: start from the wall clock in microseconds.
    let seq = Arc::new(AtomicU64::new(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64),
    ));
    let mut carry: Option<Pending> = None;
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        // While every slot is busy, more work queues up and the next entry grows.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (mut ops, mut bytes) = (first.ops.len(), first.bytes);
        let mut items = vec![first];
        while ops < cfg.max_ops && bytes < cfg.max_bytes {
            match rx.try_recv() {
                Ok(p) => {
                    if ops + p.ops.len() > cfg.max_ops || bytes + p.bytes > cfg.max_bytes {
                        carry = Some(p);
                        break;
                    }
                    ops += p.ops.len();
                    bytes += p.bytes;
                    items.push(p);
                }
                Err(_) => break,
            }
        }
        let proposer = proposer.clone();
        let seq = seq.clone();
        tokio::spawn(async move {
            let mut replies = Vec::with_capacity(items.len());
            let mut proposal = Proposal::default();
            for p in items {
                proposal.batches.push(ClientBatch {
                    origin: proposer.id,
                    seq: seq.fetch_add(1, Ordering::Relaxed),
                    source: p.source,
                    ops: p.ops,
                });
                replies.push(p.reply);
            }
            match proposer.propose(proposal).await {
                Ok((index, result)) => {
                    for (reply, outcome) in replies.into_iter().zip(result.outcomes) {
                        if matches!(outcome, BatchOutcome::Rejected(_)) {
                            proposer.metrics.rejected_batches.inc();
                        }
                        let _ = reply.send(Ok(WriteOutcome { index, outcome }));
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    for reply in replies {
                        let _ = reply.send(Err(NodeError::Unavailable(msg.clone())));
                    }
                }
            }
            drop(permit);
        });
    }
}
