//! The `Peer` service: Raft messages between nodes (checked before openraft sees them),
//! snapshots spooled to disk, and proposals forwarded to the leader.

use std::pin::Pin;
use std::sync::Arc;

use openraft::async_runtime::WatchReceiver;
use openraft::error::RaftError;
use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
use raftmap_proto as pb;
use raftmap_storage::{AdminOp, NodeId, Proposal, TypeConfig};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::GrpcResult;
use crate::error::{decode, encode, ProposeError};
use crate::network::SnapshotHeader;
use crate::peer_check;
use crate::shared::{members, NodeShared};

#[derive(Debug)]
pub(crate) struct PeerService {
    shared: Arc<NodeShared>,
}

impl PeerService {
    pub(crate) fn new(shared: Arc<NodeShared>) -> Self {
        Self { shared }
    }
}

impl PeerService {
    async fn check_vote(
        &self,
        sender: Option<NodeId>,
        rpc: &VoteRequest<TypeConfig>,
    ) -> Result<(), String> {
        peer_check::check_vote(
            &self.shared.peer_context(sender),
            &rpc.vote,
            rpc.last_log_id.as_ref(),
        )?;
        known_sender(&self.shared, rpc.vote.leader_id.node_id).await
    }

    /// A proposal another node forwards: within the log entry limits, and with no
    /// administrative record but the retirement of a node no longer in the membership (a
    /// removal whose leader lost its leadership before it recorded the retirement) and a
    /// member's own name.
    fn check_forwarded(&self, p: &Proposal, from: Option<NodeId>) -> Result<(), String> {
        p.check_size().map_err(|e| e.to_string())?;
        let (nodes, _) = members(&self.shared.raft);
        for a in &p.admin {
            match a {
                AdminOp::RetireNode { node_id } if !nodes.contains_key(node_id) => {}
                AdminOp::NameNode { node_id, .. }
                    if from == Some(*node_id) && nodes.contains_key(node_id) => {}
                other => {
                    return Err(format!(
                        "a forwarded proposal may not carry the administrative record {other:?}"
                    ))
                }
            }
        }
        Ok(())
    }
}

/// Longest wait for the next message of a snapshot transfer.
const SNAPSHOT_IDLE: std::time::Duration = std::time::Duration::from_secs(10);
/// After `SNAPSHOT_GRACE`, a snapshot transfer must have kept this average rate (bytes/s).
const SNAPSHOT_MIN_RATE: u64 = 1024 * 1024;
const SNAPSHOT_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Receives the data messages of a snapshot transfer into a temporary file in `dir` (removed
/// when done), then reads them back whole.
async fn receive_snapshot(
    parts: &mut tonic::Streaming<pb::RaftPayload>,
    dir: &std::path::Path,
    cap: u64,
) -> Result<Vec<u8>, Status> {
    use std::io::{Read, Seek, Write};
    let io = |e: std::io::Error| {
        Status::internal(format!("spooling a snapshot in {}: {e}", dir.display()))
    };
    let mut file = tempfile::Builder::new()
        .prefix("snapshot-incoming-")
        .tempfile_in(dir)
        .map_err(io)?;
    let started = std::time::Instant::now();
    let mut total = 0u64;
    loop {
        let next = match tokio::time::timeout(SNAPSHOT_IDLE, parts.message()).await {
            Ok(m) => m?,
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "snapshot transfer stalled: no data for {SNAPSHOT_IDLE:?} after {total} bytes"
                )))
            }
        };
        let Some(chunk) = next else { break };
        total += chunk.data.len() as u64;
        if total > cap {
            return Err(Status::resource_exhausted(format!(
                "snapshot larger than this node accepts ({cap} bytes, --max-snapshot-bytes)"
            )));
        }
        let elapsed = started.elapsed();
        if elapsed > SNAPSHOT_GRACE && total < SNAPSHOT_MIN_RATE * elapsed.as_secs() {
            return Err(Status::deadline_exceeded(format!(
                "snapshot transfer too slow: {total} bytes in {elapsed:?}"
            )));
        }
        file.write_all(&chunk.data).map_err(io)?;
    }
    let mut data = Vec::with_capacity(total as usize);
    let f = file.as_file_mut();
    f.rewind().map_err(io)?;
    f.read_to_end(&mut data).map_err(io)?;
    Ok(data)
}

/// Whether `id` may speak Raft to this node: a node of its membership (voter or learner, any
/// config of a joint one), or one that a member this node knows confirms (a node behind the
/// log does not know of members added since; the answer is remembered). A node that knows no
/// membership yet (a learner before its first append) takes any sender. Proves nothing
/// against a sender that lies about its id: that needs authenticated peers.
pub(super) async fn known_sender(shared: &NodeShared, id: NodeId) -> Result<(), String> {
    // The common case, on every append: a member. Read in place (no copy of the metrics).
    let listed = {
        let metrics = shared.raft.metrics();
        let m = metrics.borrow_watched();
        let membership = m.membership_config.membership();
        membership.get_node(&id).is_some() || membership.nodes().next().is_none()
    };
    if listed || shared.confirmed_peers(id) {
        return Ok(());
    }
    let (nodes, _) = members(&shared.raft);
    let refusal =
        || format!("node {id} is not a member, and no member this node knows of lists it");
    // A removed node keeps campaigning for a while: its members were asked a moment ago.
    if shared.recently_unknown(id) {
        return Err(refusal());
    }
    for (node, (info, _)) in nodes.iter().filter(|(n, _)| **n != shared.id) {
        let Ok(mut admin) = shared.proposer.pool.admin(*node, &info.api_addr, None) else {
            continue;
        };
        let call = admin.members(pb::MembersRequest {});
        if let Ok(Ok(r)) = tokio::time::timeout(std::time::Duration::from_secs(1), call).await {
            if r.get_ref().members.iter().any(|m| m.node_id == id) {
                shared.confirm_peer(id);
                return Ok(());
            }
        }
    }
    shared.note_unknown(id);
    Err(refusal())
}

/// Turns a failed peer check into INVALID_ARGUMENT (logged: a peer that sends such things is
/// broken or hostile).
fn refuse_peer(
    metrics: &crate::metrics::Metrics,
    what: &str,
    check: Result<(), String>,
) -> Result<(), Status> {
    check.map_err(|reason| {
        metrics.refused_peer_messages.inc();
        tracing::warn!(reason = %reason, "refused a peer {what}");
        Status::invalid_argument(format!("refused {what}: {reason}"))
    })
}

/// The node a peer call comes from, as the authorization layer established it.
fn sender<T>(req: &Request<T>) -> Option<NodeId> {
    match req.extensions().get::<super::Granted>() {
        Some(super::Granted::Peer(id)) => Some(*id),
        _ => None,
    }
}

fn payload<T: serde::Serialize>(v: &T) -> GrpcResult<pb::RaftPayload> {
    Ok(Response::new(pb::RaftPayload { data: encode(v)? }))
}

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerService {
    async fn vote(&self, req: Request<pb::RaftPayload>) -> GrpcResult<pb::RaftPayload> {
        let from = sender(&req);
        let rpc: VoteRequest<TypeConfig> = decode(&req.into_inner().data)?;
        refuse_peer(
            &self.shared.metrics,
            "vote",
            self.check_vote(from, &rpc).await,
        )?;
        payload(&self.shared.raft.vote(rpc).await)
    }

    async fn pre_vote(&self, req: Request<pb::RaftPayload>) -> GrpcResult<pb::RaftPayload> {
        let from = sender(&req);
        let rpc: VoteRequest<TypeConfig> = decode(&req.into_inner().data)?;
        refuse_peer(
            &self.shared.metrics,
            "pre-vote",
            self.check_vote(from, &rpc).await,
        )?;
        payload(&self.shared.raft.pre_vote(rpc).await)
    }

    type AppendEntriesStream =
        Pin<Box<dyn Stream<Item = Result<pb::RaftPayload, Status>> + Send + 'static>>;

    /// The requests on the stream go into openraft's append pipeline as they arrive; each
    /// answer goes back, in order, once the entries it covers are durable here.
    async fn append_entries(
        &self,
        req: Request<tonic::Streaming<pb::RaftPayload>>,
    ) -> GrpcResult<Self::AppendEntriesStream> {
        use tokio_stream::StreamExt;
        // A message that fails to decode or to pass the checks ends the input: the answers
        // stop short and the leader, missing answers, opens a new stream.
        let shared = self.shared.clone();
        let from = sender(&req);
        let requests = req
            .into_inner()
            .then(move |m| {
                let shared = shared.clone();
                async move {
                    match m.map(|m| decode::<AppendEntriesRequest<TypeConfig>>(&m.data)) {
                        Ok(Ok(rpc)) => {
                            let checked = match peer_check::check_append(
                                &shared.peer_context(from),
                                &rpc.vote,
                                rpc.prev_log_id.as_ref(),
                                &rpc.entries,
                                rpc.leader_commit.as_ref(),
                            ) {
                                Ok(()) => known_sender(&shared, rpc.vote.leader_id.node_id).await,
                                Err(e) => Err(e),
                            };
                            match checked {
                                Ok(()) => {
                                    shared.heard.note();
                                    Some(rpc)
                                }
                                Err(e) => {
                                    shared.metrics.refused_peer_messages.inc();
                                    tracing::warn!(reason = %e, "refused an append; closing the stream");
                                    None
                                }
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "malformed append request; closing the stream");
                            None
                        }
                        Err(_) => None,
                    }
                }
            })
            .take_while(Option::is_some)
            .filter_map(|r| r);
        let answers = self.shared.raft.stream_append(requests).map(|answer| {
            Ok(pb::RaftPayload {
                data: encode(&answer)?,
            })
        });
        Ok(Response::new(Box::pin(answers)))
    }

    /// A whole snapshot on one stream: the header, checked at once, then the data, spooled
    /// to a file in the data dir (never held in memory while it arrives) within a size cap
    /// and a pace (no message for `SNAPSHOT_IDLE`, or less than `SNAPSHOT_MIN_RATE` on
    /// average, ends it); its checksum and contents are checked before Raft sees any of it.
    async fn install_snapshot(
        &self,
        req: Request<tonic::Streaming<pb::RaftPayload>>,
    ) -> GrpcResult<pb::RaftPayload> {
        let s = &self.shared;
        let Ok(_receiving) = s.receiving_snapshot.try_lock() else {
            return Err(Status::unavailable(
                "another snapshot is being received; retry",
            ));
        };
        let from = sender(&req);
        let mut parts = req.into_inner();
        let first = match tokio::time::timeout(SNAPSHOT_IDLE, parts.message()).await {
            Ok(m) => m?,
            Err(_) => return Err(Status::deadline_exceeded("no snapshot header in time")),
        };
        let Some(first) = first else {
            return Err(Status::invalid_argument("empty snapshot transfer"));
        };
        let header: SnapshotHeader = decode(&first.data)?;
        let checked = match peer_check::check_snapshot_header(
            &s.peer_context(from),
            &header.vote,
            &header.meta,
        ) {
            Ok(()) => known_sender(s, header.vote.leader_id.node_id).await,
            Err(e) => Err(e),
        };
        refuse_peer(&s.metrics, "snapshot", checked)?;
        let data = receive_snapshot(&mut parts, &s.data_dir, s.max_snapshot_bytes).await;
        let data = data.inspect_err(|e| {
            s.metrics.refused_peer_messages.inc();
            tracing::warn!(error = %e.message(), "refused a snapshot transfer");
        })?;
        refuse_peer(
            &s.metrics,
            "snapshot",
            raftmap_storage::check_snapshot_data(&data).map_err(|e| e.to_string()),
        )?;
        let snapshot = raftmap_storage::Snapshot {
            meta: header.meta,
            snapshot: std::io::Cursor::new(data),
        };
        payload(&s.raft.install_full_snapshot(header.vote, snapshot).await)
    }

    async fn propose(&self, req: Request<pb::RaftPayload>) -> GrpcResult<pb::RaftPayload> {
        let from = sender(&req);
        let proposal: Proposal = decode(&req.into_inner().data)?;
        refuse_peer(
            &self.shared.metrics,
            "forwarded proposal",
            self.check_forwarded(&proposal, from),
        )?;
        let res: Result<_, ProposeError> = self.shared.proposer.append_local(proposal).await;
        payload(&res)
    }

    async fn transfer_leader(&self, req: Request<pb::RaftPayload>) -> GrpcResult<pb::RaftPayload> {
        let from = sender(&req);
        let rpc: TransferLeaderRequest<TypeConfig> = decode(&req.into_inner().data)?;
        let vote = rpc.from_leader();
        let checked =
            peer_check::check_transfer(&self.shared.peer_context(from), vote, rpc.last_log_id());
        let checked = match checked {
            Ok(()) => known_sender(&self.shared, vote.leader_id.node_id).await,
            Err(e) => Err(e),
        };
        refuse_peer(&self.shared.metrics, "leadership transfer", checked)?;
        let res = self.shared.raft.handle_transfer_leader(rpc).await;
        payload(&res.map_err(RaftError::<TypeConfig>::Fatal))
    }

    async fn read_index(
        &self,
        _req: Request<pb::ReadIndexRequest>,
    ) -> GrpcResult<pb::ReadIndexResponse> {
        match self
            .shared
            .raft
            .get_read_log_id(openraft::ReadPolicy::ReadIndex)
            .await
        {
            Ok((read, _applied)) => Ok(Response::new(pb::ReadIndexResponse {
                read_index: read.index(),
            })),
            Err(RaftError::APIError(e)) => Err(Status::failed_precondition(e.to_string())),
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }
}
