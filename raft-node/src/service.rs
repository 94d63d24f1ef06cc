//! gRPC services: `Peer` (between nodes), `Kv` (clients) and `Admin` (operators).

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;

use openraft::async_runtime::WatchReceiver;
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use raftmap_proto as pb;
use raftmap_storage::{
    validate_batch, AdminOp, BatchOutcome, Change, MapSchema, MapType, NodeInfo, Op, Proposal,
    SmEvent, Source, StateView, TypeConfig, ValidationError,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::error::{decode, encode, NodeError, ProposeError};
use crate::network::SnapshotHeader;
use crate::node::{members, NodeShared};
use crate::peer_check;
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use raftmap_storage::NodeId;

/// Largest client request or response message.
pub(crate) const MAX_CLIENT_MESSAGE: usize = 16 * 1024 * 1024;
/// Default and largest dump page.
const DUMP_PAGE: usize = 1000;
/// Most key and value bytes in one dump or watch page (one larger entry still goes alone),
/// well under the largest client message.
const PAGE_BYTES: usize = 4 * 1024 * 1024;
/// Fewest voters `remove` leaves without `--force`: a majority of three survives one failure.
const MIN_VOTERS: usize = 3;
/// A learner within this many entries of the leader may be promoted.
const DEFAULT_MAX_LAG: u64 = 1000;

type GrpcResult<T> = Result<Response<T>, Status>;
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

// ---------------------------------------------------------------- conversions

pub(crate) fn schema_from_pb(s: pb::MapSchema) -> Result<MapSchema, ValidationError> {
    let map_type = match pb::MapType::try_from(s.r#type) {
        Ok(pb::MapType::Hash) => MapType::Hash,
        Ok(pb::MapType::LruHash) => MapType::LruHash,
        Ok(pb::MapType::Array) => MapType::Array,
        _ => {
            return Err(ValidationError::UnknownMapType(format!(
                "enum value {}",
                s.r#type
            )))
        }
    };
    Ok(MapSchema {
        name: s.name,
        map_type,
        key_size: s.key_size,
        value_size: s.value_size,
        max_entries: s.max_entries,
    })
}

pub(crate) fn schema_to_pb(s: &MapSchema) -> pb::MapSchema {
    pb::MapSchema {
        name: s.name.clone(),
        r#type: match s.map_type {
            MapType::Hash => pb::MapType::Hash,
            MapType::LruHash => pb::MapType::LruHash,
            MapType::Array => pb::MapType::Array,
        } as i32,
        key_size: s.key_size,
        value_size: s.value_size,
        max_entries: s.max_entries,
    }
}

pub(crate) fn op_from_pb(op: pb::Op) -> Result<Op, NodeError> {
    use pb::op::Op as P;
    Ok(match op.op {
        Some(P::Declare(s)) => Op::DeclareMap(schema_from_pb(s)?),
        Some(P::Put(p)) => Op::Put {
            map: p.map,
            key: p.key,
            value: p.value,
        },
        Some(P::Delete(d)) => Op::Delete {
            map: d.map,
            key: d.key,
        },
        Some(P::Cas(c)) => Op::CompareAndSwap {
            map: c.map,
            key: c.key,
            expected: c.expected,
            new: c.new_value,
        },
        None => {
            return Err(NodeError::BadRequest(
                "operation without a kind (put, delete, cas, declare)".into(),
            ))
        }
    })
}

fn member_list(shared: &NodeShared) -> pb::MembersResponse {
    let (nodes, leader) = members(&shared.raft);
    pb::MembersResponse {
        members: nodes
            .into_iter()
            .map(|(id, (n, voter))| pb::Member {
                node_id: id,
                raft_addr: n.raft_addr,
                api_addr: n.api_addr,
                voter,
            })
            .collect(),
        leader_id: leader.unwrap_or(0),
        has_leader: leader.is_some(),
        cluster_id: shared.cluster_id(),
    }
}

// ---------------------------------------------------------------- peer

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
    async fn check_vote(&self, rpc: &VoteRequest<TypeConfig>) -> Result<(), String> {
        peer_check::check_vote(
            &self.shared.peer_context(),
            &rpc.vote,
            rpc.last_log_id.as_ref(),
        )?;
        known_sender(&self.shared, rpc.vote.leader_id.node_id).await
    }

    /// A proposal another node forwards: within the log entry limits, and with no
    /// administrative record but the one a leader that removed itself hands on (the retirement
    /// of a node no longer in the membership).
    fn check_forwarded(&self, p: &Proposal) -> Result<(), String> {
        p.check_size().map_err(|e| e.to_string())?;
        let (nodes, _) = members(&self.shared.raft);
        for a in &p.admin {
            match a {
                AdminOp::RetireNode { node_id } if !nodes.contains_key(node_id) => {}
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
async fn known_sender(shared: &NodeShared, id: NodeId) -> Result<(), String> {
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
    for (_, (info, _)) in nodes.iter().filter(|(n, _)| **n != shared.id) {
        let Ok(ch) = shared.proposer.pool.channel(&info.api_addr) else {
            continue;
        };
        let mut admin = pb::admin_client::AdminClient::new(ch);
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

fn payload<T: serde::Serialize>(v: &T) -> GrpcResult<pb::RaftPayload> {
    Ok(Response::new(pb::RaftPayload { data: encode(v)? }))
}

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerService {
    async fn vote(&self, req: Request<pb::RaftPayload>) -> GrpcResult<pb::RaftPayload> {
        let rpc: VoteRequest<TypeConfig> = decode(&req.into_inner().data)?;
        refuse_peer(&self.shared.metrics, "vote", self.check_vote(&rpc).await)?;
        payload(&self.shared.raft.vote(rpc).await)
    }

    async fn pre_vote(&self, req: Request<pb::RaftPayload>) -> GrpcResult<pb::RaftPayload> {
        let rpc: VoteRequest<TypeConfig> = decode(&req.into_inner().data)?;
        refuse_peer(
            &self.shared.metrics,
            "pre-vote",
            self.check_vote(&rpc).await,
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
        let requests = req
            .into_inner()
            .then(move |m| {
                let shared = shared.clone();
                async move {
                    match m.map(|m| decode::<AppendEntriesRequest<TypeConfig>>(&m.data)) {
                        Ok(Ok(rpc)) => {
                            let checked = match peer_check::check_append(
                                &shared.peer_context(),
                                &rpc.vote,
                                rpc.prev_log_id.as_ref(),
                                &rpc.entries,
                                rpc.leader_commit.as_ref(),
                            ) {
                                Ok(()) => known_sender(&shared, rpc.vote.leader_id.node_id).await,
                                Err(e) => Err(e),
                            };
                            match checked {
                                Ok(()) => Some(rpc),
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
            &s.peer_context(),
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
        let proposal: Proposal = decode(&req.into_inner().data)?;
        refuse_peer(
            &self.shared.metrics,
            "forwarded proposal",
            self.check_forwarded(&proposal),
        )?;
        let res: Result<_, ProposeError> = self.shared.proposer.append_local(proposal).await;
        payload(&res)
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

// ---------------------------------------------------------------- kv

/// How long a write waits, after it committed, to be applied on the node that took it.
const WRITE_VISIBLE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug)]
pub(crate) struct KvService {
    shared: Arc<NodeShared>,
}

impl KvService {
    pub(crate) fn new(shared: Arc<NodeShared>) -> Self {
        Self { shared }
    }

    async fn barrier(&self, c: i32) -> Result<u64, NodeError> {
        match pb::Consistency::try_from(c) {
            // Deliberately broken mode for the fault-injection harness's own test.
            Ok(pb::Consistency::Linearizable) if self.shared.unsafe_local_reads => {
                Ok(self.shared.view.applied_index())
            }
            Ok(pb::Consistency::Linearizable) => self.shared.read_barrier().await,
            Ok(pb::Consistency::Local) => Ok(self.shared.view.applied_index()),
            Err(_) => Err(NodeError::BadRequest(format!("unknown consistency {c}"))),
        }
    }

    fn schema(&self, map: &str) -> Result<MapSchema, NodeError> {
        self.shared.view.schema(map).ok_or_else(|| {
            NodeError::NotFound(ValidationError::UnknownMap(map.to_string()).to_string())
        })
    }
}

#[tonic::async_trait]
impl pb::kv_server::Kv for KvService {
    async fn write(&self, req: Request<pb::WriteRequest>) -> GrpcResult<pb::WriteResponse> {
        let ops = req
            .into_inner()
            .ops
            .into_iter()
            .map(op_from_pb)
            .collect::<Result<Vec<_>, _>>()?;
        // Refuse what is already known to be invalid before it reaches the log. The state
        // machine checks again at apply time, against the state at that index.
        let schemas = self.shared.view.schema_map();
        if let Err(e) = validate_batch(&ops, &schemas) {
            self.shared.metrics.rejected_batches.inc();
            return Err(NodeError::Invalid(e).into());
        }
        let out = self.shared.batcher.submit(ops, Source::Api).await?;
        // Read your writes on the node that took the write: a follower returns once it has
        // applied the entry itself, not only when the leader has.
        if !self
            .shared
            .view
            .wait_applied(out.index, WRITE_VISIBLE_WAIT)
            .await
        {
            return Err(NodeError::Timeout(format!(
                "entry {} committed but not applied on this node within {WRITE_VISIBLE_WAIT:?}",
                out.index
            ))
            .into());
        }
        match out.outcome {
            BatchOutcome::Applied => Ok(Response::new(pb::WriteResponse {
                index: out.index,
                succeeded: true,
                mismatches: vec![],
                mismatches_omitted: 0,
            })),
            BatchOutcome::CasFailed {
                mismatches,
                omitted,
            } => Ok(Response::new(pb::WriteResponse {
                index: out.index,
                succeeded: false,
                mismatches: mismatches
                    .into_iter()
                    .map(|(op_index, actual)| pb::CasMismatch { op_index, actual })
                    .collect(),
                mismatches_omitted: omitted,
            })),
            BatchOutcome::Rejected(e) => Err(NodeError::Invalid(e).into()),
        }
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> GrpcResult<pb::GetResponse> {
        let r = req.into_inner();
        let index = self.barrier(r.consistency).await?;
        let schema = self.schema(&r.map)?;
        if r.key.len() != schema.key_size as usize {
            return Err(NodeError::Invalid(ValidationError::KeySize {
                map: r.map,
                expected: schema.key_size,
                actual: r.key.len(),
            })
            .into());
        }
        let v = self
            .shared
            .view
            .get(&r.map, &r.key)
            .map_err(NodeError::from)?;
        Ok(Response::new(pb::GetResponse {
            found: v.is_some(),
            value: v.unwrap_or_default(),
            index: index.max(self.shared.view.applied_index()),
        }))
    }

    type DumpStream = BoxStream<pb::DumpResponse>;

    async fn dump(&self, req: Request<pb::DumpRequest>) -> GrpcResult<Self::DumpStream> {
        let r = req.into_inner();
        self.barrier(r.consistency).await?;
        let schema = self.schema(&r.map)?;
        let page = match r.page_size as usize {
            0 => DUMP_PAGE,
            n => n.min(DUMP_PAGE * 10),
        };
        let view = self.shared.view.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            // Pages are read one by one; the applied index reported is the one at the start.
            let index = view.applied_index();
            let mut after: Option<Vec<u8>> = None;
            let mut first = true;
            loop {
                let (entries, more) =
                    match view.scan_page(&schema.name, after.as_deref(), page, PAGE_BYTES) {
                        Ok(e) => e,
                        Err(e) => {
                            let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                            return;
                        }
                    };
                let done = !more;
                after = entries.last().map(|(k, _)| k.clone());
                let msg = pb::DumpResponse {
                    schema: first.then(|| schema_to_pb(&schema)),
                    index,
                    entries: entries
                        .into_iter()
                        .map(|(key, value)| pb::Entry { key, value })
                        .collect(),
                };
                first = false;
                if tx.send(Ok(msg)).await.is_err() || done {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_maps(
        &self,
        _req: Request<pb::ListMapsRequest>,
    ) -> GrpcResult<pb::ListMapsResponse> {
        let view = &self.shared.view;
        Ok(Response::new(pb::ListMapsResponse {
            maps: view
                .schemas()
                .iter()
                .map(|s| pb::MapInfo {
                    schema: Some(schema_to_pb(s)),
                    entries: view.entry_count(&s.name),
                })
                .collect(),
            index: view.applied_index(),
        }))
    }

    type WatchStream = BoxStream<pb::WatchEvent>;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> GrpcResult<Self::WatchStream> {
        let r = req.into_inner();
        // A map declared anywhere before the call is known here after the barrier.
        if self.shared.view.schema(&r.map).is_none() {
            self.shared.read_barrier().await?;
        }
        let schema = self.schema(&r.map)?;
        let Ok(permit) = self.shared.watchers.clone().try_acquire_owned() else {
            return Err(Status::resource_exhausted(format!(
                "node {} already serves its most watch streams ({}); retry later or watch through another node",
                self.shared.id,
                self.shared.max_watchers
            )));
        };
        let view = self.shared.view.clone();
        if r.after_index > 0 && view.events_since(r.after_index).is_none() {
            return Err(Status::out_of_range(format!(
                "changes after index {} are no longer held; watch from 0 to start with the current contents",
                r.after_index
            )));
        }
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        tokio::spawn(async move {
            // Held for as long as the stream is served.
            let _permit = permit;
            watch_stream(view, schema.name, r.after_index, tx).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Watch events queued for one client; with the pages and the held entries of the state
/// machine this bounds what a watcher that does not read costs.
const WATCH_QUEUE: usize = 64;

type WatchTx = mpsc::Sender<Result<pb::WatchEvent, Status>>;

/// Serves one watch stream: the map's contents (from index 0) or the changes after
/// `after_index`, then every change as it is applied, until the client goes away. Changes come
/// from the state machine's held entries, so a watcher that falls behind catches up from them
/// or, once they are gone, is told to watch again.
async fn watch_stream(view: StateView, map: String, after_index: u64, tx: WatchTx) {
    let mut sent = after_index;
    if after_index == 0 {
        // The contents page by page (bounded in bytes); changes applied meanwhile are in the
        // held entries after `sent` and follow.
        sent = view.applied_index();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let (page, more) = match view.scan_page(&map, after.as_deref(), DUMP_PAGE, PAGE_BYTES) {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                    return;
                }
            };
            after = page.last().map(|(k, _)| k.clone());
            for (key, value) in page {
                let put = pb::watch_event::Event::Put(pb::Put {
                    map: map.clone(),
                    key,
                    value,
                });
                if !send_watch(&tx, sent, put).await {
                    return;
                }
            }
            if !more {
                break;
            }
        }
    }
    loop {
        let Some(events) = view.events_since(sent) else {
            let status = if view.last_snapshot_installed() > sent {
                Status::aborted(format!(
                    "this node installed a snapshot at index {}; watch again from 0",
                    view.last_snapshot_installed()
                ))
            } else {
                Status::data_loss(format!(
                    "the watcher fell behind: changes after index {sent} are no longer held; watch again from 0"
                ))
            };
            let _ = tx.send(Err(status)).await;
            return;
        };
        for ev in events {
            if let SmEvent::Applied { index, changes, .. } = &*ev {
                for c in changes {
                    let event = match c {
                        Change::Put { map: m, key, value } if *m == map => {
                            pb::watch_event::Event::Put(pb::Put {
                                map: m.clone(),
                                key: key.clone(),
                                value: value.clone(),
                            })
                        }
                        Change::Delete { map: m, key } if *m == map => {
                            pb::watch_event::Event::Delete(pb::Delete {
                                map: m.clone(),
                                key: key.clone(),
                            })
                        }
                        Change::Drop(m) if *m == map => {
                            let _ = tx
                                .send(Err(Status::not_found(format!(
                                    "map {map} was dropped at index {index}"
                                ))))
                                .await;
                            return;
                        }
                        _ => continue,
                    };
                    if !send_watch(&tx, *index, event).await {
                        return;
                    }
                }
            }
            sent = ev.index();
        }
        tokio::select! {
            // A client that went away ends the stream even while nothing is applied.
            _ = tx.closed() => return,
            more = view.wait_past(sent) => if !more { return },
        }
    }
}

/// Sends one watch event; false once the client is gone.
async fn send_watch(tx: &WatchTx, index: u64, event: pb::watch_event::Event) -> bool {
    tx.send(Ok(pb::WatchEvent {
        index,
        event: Some(event),
    }))
    .await
    .is_ok()
}

// ---------------------------------------------------------------- admin

#[derive(Debug)]
pub(crate) struct AdminService {
    shared: Arc<NodeShared>,
}

impl AdminService {
    pub(crate) fn new(shared: Arc<NodeShared>) -> Self {
        Self { shared }
    }
}

fn membership_error(e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> Status {
    match e {
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => match c {
            ChangeMembershipError::InProgress(p) => Status::unavailable(format!(
                "another membership change is in progress ({p}); retry"
            )),
            other => Status::failed_precondition(other.to_string()),
        },
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
            Status::unavailable("leadership changed during the request; retry")
        }
        other => Status::unavailable(other.to_string()),
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn init(&self, _req: Request<pb::InitRequest>) -> GrpcResult<pb::InitResponse> {
        let s = &self.shared;
        let initialized = s
            .raft
            .is_initialized()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        if initialized {
            let id = s.cluster_id();
            return Err(Status::failed_precondition(format!(
                "node {} is already part of a cluster{}; init runs once, on one node of a new cluster",
                s.id,
                if id.is_empty() { String::new() } else { format!(" ({id})") }
            )));
        }
        let mut nodes = std::collections::BTreeMap::new();
        nodes.insert(s.id, s.info.clone());
        s.raft
            .initialize(nodes)
            .await
            .map_err(|e| Status::failed_precondition(format!("init refused: {e}")))?;
        let cluster_id = format!("{:016x}", rand::random::<u64>());
        s.proposer
            .propose(Proposal {
                batches: vec![],
                admin: vec![AdminOp::InitCluster {
                    cluster_id: cluster_id.clone(),
                }],
            })
            .await?;
        tracing::info!(cluster = %cluster_id, node = s.id, "initialised a new cluster");
        Ok(Response::new(pb::InitResponse {
            cluster_id: s.cluster_id(),
            node_id: s.id,
        }))
    }

    async fn add_learner(
        &self,
        req: Request<pb::AddLearnerRequest>,
    ) -> GrpcResult<pb::MembersResponse> {
        let s = &self.shared;
        if let Some(mut leader) = s.leader_admin().await? {
            return leader.add_learner(req).await;
        }
        let r = req.into_inner();
        if r.node_id == 0 {
            return Err(Status::invalid_argument(
                "node id 0 is reserved; use 1 or more",
            ));
        }
        crate::node::parse_addr(&r.raft_addr)?;
        crate::node::parse_addr(&r.api_addr)?;
        let ours = s.cluster_id();
        if !r.cluster_id.is_empty() && r.cluster_id != ours {
            return Err(Status::failed_precondition(format!(
                "node {} holds data of cluster {}, this is cluster {ours}: use a fresh data dir and a new node id",
                r.node_id, r.cluster_id
            )));
        }
        let (nodes, _) = members(&s.raft);
        if let Some((n, _)) = nodes.get(&r.node_id) {
            return Err(Status::already_exists(format!(
                "node id {} is already a member ({n}); node ids are never reused",
                r.node_id
            )));
        }
        if s.view.cluster().retired.contains(&r.node_id) {
            return Err(Status::already_exists(format!(
                "node id {} was removed from this cluster and cannot be reused; pick a new id",
                r.node_id
            )));
        }
        let info = NodeInfo {
            raft_addr: r.raft_addr,
            api_addr: r.api_addr,
        };
        s.raft
            .add_learner(r.node_id, info, false)
            .await
            .map_err(membership_error)?;
        tracing::info!(node = r.node_id, "added learner");
        Ok(Response::new(member_list(s)))
    }

    async fn drop_map(&self, req: Request<pb::DropMapRequest>) -> GrpcResult<pb::DropMapResponse> {
        let s = &self.shared;
        if let Some(mut leader) = s.leader_admin().await? {
            return leader.drop_map(req).await;
        }
        let map = req.into_inner().map;
        if s.view.schema(&map).is_none() {
            s.read_barrier().await?;
            if s.view.schema(&map).is_none() {
                return Err(NodeError::NotFound(
                    ValidationError::UnknownMap(map.clone()).to_string(),
                )
                .into());
            }
        }
        // Refused while any member keeps a kernel map of it in sync (the map would be declared
        // again from that kernel map), or cannot say whether it does.
        let (nodes, _) = members(&s.raft);
        for (id, (info, _)) in nodes {
            let watched: Vec<(String, String)> = if id == s.id {
                s.kernel
                    .states()
                    .into_iter()
                    .map(|w| (w.map, w.location))
                    .collect()
            } else {
                let ch = s.proposer.pool.channel(&info.api_addr)?;
                let mut admin = pb::admin_client::AdminClient::new(ch);
                let call = admin.status(pb::StatusRequest {});
                match tokio::time::timeout(std::time::Duration::from_secs(3), call).await {
                    Ok(Ok(r)) => r
                        .into_inner()
                        .watched
                        .into_iter()
                        .map(|w| (w.map, w.location))
                        .collect(),
                    Ok(Err(e)) => {
                        return Err(Status::unavailable(format!(
                            "cannot confirm that node {id} does not watch map {map} ({}); retry once it answers",
                            e.message()
                        )))
                    }
                    Err(_) => {
                        return Err(Status::unavailable(format!(
                            "cannot confirm that node {id} does not watch map {map}: it did not answer; retry once it answers"
                        )))
                    }
                }
            };
            if let Some((_, location)) = watched.iter().find(|(m, _)| *m == map) {
                return Err(Status::failed_precondition(format!(
                    "node {id} watches map {map} (kernel map {location}); stop watching it there first"
                )));
            }
        }
        let out = s
            .batcher
            .submit(vec![Op::DropMap { map: map.clone() }], Source::Api)
            .await?;
        match out.outcome {
            BatchOutcome::Applied => {
                tracing::info!(map = %map, index = out.index, "dropped map");
                Ok(Response::new(pb::DropMapResponse { index: out.index }))
            }
            BatchOutcome::Rejected(e) => Err(NodeError::Invalid(e).into()),
            BatchOutcome::CasFailed { .. } => Err(Status::internal("a drop does not compare")),
        }
    }

    async fn promote(&self, req: Request<pb::PromoteRequest>) -> GrpcResult<pb::MembersResponse> {
        let s = &self.shared;
        if let Some(mut leader) = s.leader_admin().await? {
            return leader.promote(req).await;
        }
        let r = req.into_inner();
        let (nodes, _) = members(&s.raft);
        match nodes.get(&r.node_id) {
            None => {
                return Err(Status::not_found(format!(
                    "node {} is not a member; add-learner first",
                    r.node_id
                )))
            }
            Some((_, true)) => return Ok(Response::new(member_list(s))),
            Some((_, false)) => {}
        }
        let max_lag = if r.max_lag == 0 {
            DEFAULT_MAX_LAG
        } else {
            r.max_lag
        };
        let m = s.raft.metrics().borrow_watched().clone();
        let last = m.last_log_index.unwrap_or(0);
        let matched = m
            .replication
            .as_ref()
            .and_then(|r2| r2.get(&r.node_id).cloned().flatten())
            .map(|l| l.index);
        match matched {
            Some(i) if last.saturating_sub(i) <= max_lag => {}
            other => {
                return Err(Status::failed_precondition(format!(
                    "learner {} has not caught up: it holds the log up to {} of {last} (allowed lag {max_lag}); wait and retry",
                    r.node_id,
                    other.map_or("nothing".to_string(), |i| i.to_string()),
                )))
            }
        }
        s.raft
            .change_membership(
                ChangeMembers::AddVoterIds(BTreeSet::from([r.node_id])),
                false,
            )
            .await
            .map_err(membership_error)?;
        tracing::info!(node = r.node_id, "promoted learner to voter");
        Ok(Response::new(member_list(s)))
    }

    async fn remove(&self, req: Request<pb::RemoveRequest>) -> GrpcResult<pb::MembersResponse> {
        let s = &self.shared;
        if let Some(mut leader) = s.leader_admin().await? {
            return leader.remove(req).await;
        }
        let r = req.into_inner();
        let (nodes, _) = members(&s.raft);
        let voters = nodes.values().filter(|(_, v)| *v).count();
        let change = match nodes.get(&r.node_id) {
            None => {
                return Err(Status::not_found(format!(
                    "node {} is not a member",
                    r.node_id
                )))
            }
            Some((_, true)) if voters == 1 => {
                return Err(Status::failed_precondition(format!(
                    "node {} is the only voter; removing it would leave no cluster",
                    r.node_id
                )))
            }
            Some((_, true)) if voters - 1 < MIN_VOTERS && !r.force => {
                return Err(Status::failed_precondition(format!(
                    "removing voter {} would leave {} voters, and a cluster needs {MIN_VOTERS} to survive the loss of one; add a voter first, or remove it anyway with --force",
                    r.node_id,
                    voters - 1
                )))
            }
            Some((_, true)) => ChangeMembers::RemoveVoters(BTreeSet::from([r.node_id])),
            Some((_, false)) => ChangeMembers::RemoveNodes(BTreeSet::from([r.node_id])),
        };
        s.raft
            .change_membership(change, false)
            .await
            .map_err(membership_error)?;
        // Record the id as retired so it is never reused. Goes through the log like any write
        // (forwarded if this node just stepped down by removing itself).
        s.proposer
            .propose(Proposal {
                batches: vec![],
                admin: vec![AdminOp::RetireNode { node_id: r.node_id }],
            })
            .await?;
        tracing::info!(node = r.node_id, "removed node");
        Ok(Response::new(member_list(s)))
    }

    async fn members(&self, _req: Request<pb::MembersRequest>) -> GrpcResult<pb::MembersResponse> {
        Ok(Response::new(member_list(&self.shared)))
    }

    async fn status(&self, _req: Request<pb::StatusRequest>) -> GrpcResult<pb::StatusResponse> {
        let s = &self.shared;
        let m = s.raft.metrics().borrow_watched().clone();
        let role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        let list = member_list(s);
        let readiness = s.readiness();
        Ok(Response::new(pb::StatusResponse {
            node_id: s.id,
            cluster_id: list.cluster_id.clone(),
            role: role.into(),
            has_leader: m.current_leader.is_some(),
            leader_id: m.current_leader.unwrap_or(0),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            committed_index: s.log.committed_index().unwrap_or(0),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            purged_index: m.purged.map_or(0, |l| l.index),
            members: list.members,
            ready: readiness.is_ok(),
            not_ready_reason: readiness.err().unwrap_or_default(),
            corrupt: s.corrupt_finding().unwrap_or_default(),
            checkpoints: s
                .view
                .checkpoints()
                .into_iter()
                .map(|(index, digest)| pb::Checkpoint { index, digest })
                .collect(),
            raft_addr: s.info.raft_addr.clone(),
            api_addr: s.info.api_addr.clone(),
            watched: s
                .kernel
                .states()
                .into_iter()
                .map(|w| pb::WatchedMap {
                    map: w.map,
                    location: w.location,
                    state: match w.state {
                        crate::kernel::MapSyncState::Synced => "synced".into(),
                        crate::kernel::MapSyncState::Waiting(r) => format!("waiting: {r}"),
                        crate::kernel::MapSyncState::Refused(r) => format!("refused: {r}"),
                    },
                    backend: w.backend.to_string(),
                    entries: w.entries,
                    refused_changes: w.refusals,
                    last_refusal: w.last_refusal.unwrap_or_default(),
                })
                .collect(),
        }))
    }
}
