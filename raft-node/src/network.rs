//! Outgoing peer connections: openraft's network over the gRPC `Peer` service (the channels
//! come from `pool.rs`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::future::Future;

use futures_util::future::BoxFuture;
use futures_util::stream::{BoxStream, StreamExt};
use openraft::error::{Fatal, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use raftmap_proto::RaftPayload;
use raftmap_storage::{NodeId, NodeInfo, Snapshot, TypeConfig, Vote};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Endpoint;

use crate::error::{decode, encode, NodeError, Result};
use crate::lock::lock;
use crate::pool::{PeerPool, PeerRpc};

/// Largest peer message: a batch of log entries (at most 16 MiB of them, or one entry of at
/// most 16 MiB of operations: `APPEND_BYTES`, `MAX_PROPOSAL_BYTES`) or one snapshot chunk.
pub(crate) const MAX_PEER_MESSAGE: usize = 64 * 1024 * 1024;

/// A gRPC endpoint for `host:port` with raftmap's transport settings.
pub fn endpoint(addr: &str) -> Result<Endpoint> {
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Ok(Endpoint::from_shared(uri)
        .map_err(|e| NodeError::BadRequest(format!("invalid address {addr:?}: {e}")))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5)))
}

/// The longest an append may wait for its answer before the stream counts as broken. openraft
/// passes the heartbeat interval; an append of a full batch to a loaded follower (an fsync of
/// megabytes) can take longer, and a broken stream sends replication into its backoff.
const MIN_APPEND_TIMEOUT: Duration = Duration::from_secs(2);

/// Bytes of snapshot data per message of a snapshot transfer.
const SNAPSHOT_CHUNK: usize = 4 * 1024 * 1024;
/// The slowest transfer rate, in bytes a second, a snapshot's deadline allows for.
const SNAPSHOT_MIN_RATE: usize = 8 * 1024 * 1024;

/// Retry delays towards an unreachable peer: doubling from the first to the last. A restarted
/// follower is caught up within about the first delay instead of waiting out a long constant
/// delay.
const RETRY_FIRST: Duration = Duration::from_millis(25);
const RETRY_MAX: Duration = Duration::from_millis(500);

/// openraft network factory.
#[derive(Debug, Clone)]
pub struct Network {
    pub(crate) pool: PeerPool,
}

/// Connection to one peer.
#[derive(Debug)]
pub struct PeerConnection {
    target: NodeId,
    addr: String,
    pool: PeerPool,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> Self::Network {
        PeerConnection {
            target,
            addr: node.raft_addr.clone(),
            pool: self.pool.clone(),
        }
    }
}

/// The error openraft gets for a transport failure (or an answer it cannot use): it retries
/// after its backoff.
fn unreachable(target: NodeId, addr: &str, e: &dyn std::fmt::Display) -> Unreachable<TypeConfig> {
    Unreachable::new(&std::io::Error::other(format!(
        "node {target} at {addr}: {e}"
    )))
}

impl PeerConnection {
    fn unreachable(&self, e: &dyn std::fmt::Display) -> Unreachable<TypeConfig> {
        unreachable(self.target, &self.addr, e)
    }

    fn client(&self) -> Result<PeerRpc, Unreachable<TypeConfig>> {
        self.pool
            .peer(self.target, &self.addr)
            .map_err(|e| self.unreachable(&e))
    }

    /// The peer's answer: openraft's result, encoded. An error the peer's Raft returned (it
    /// is shutting down) is, to this node, a peer it cannot use right now.
    fn answer<Resp>(&self, data: &[u8]) -> Result<Resp, RPCError<TypeConfig>>
    where
        Resp: DeserializeOwned,
    {
        let result: std::result::Result<Resp, RaftError<TypeConfig>> =
            decode(data).map_err(|e| self.unreachable(&e))?;
        result.map_err(|e| RPCError::Unreachable(self.unreachable(&e)))
    }

    /// One request, one answer: `req` encoded, sent by `method` within `timeout`.
    async fn unary<Req, Resp>(
        &self,
        method: Unary,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        let data = encode(req).map_err(|e| self.unreachable(&e))?;
        let mut client = self.client()?;
        let mut request = tonic::Request::new(RaftPayload { data });
        request.set_timeout(timeout);
        let resp = match method {
            Unary::Vote => client.vote(request).await,
            Unary::PreVote => client.pre_vote(request).await,
            Unary::TransferLeader => client.transfer_leader(request).await,
        }
        .map_err(|s| self.unreachable(&s))?;
        self.answer(&resp.into_inner().data)
    }
}

/// The single-message Peer calls.
#[derive(Debug, Clone, Copy)]
enum Unary {
    Vote,
    PreVote,
    TransferLeader,
}

/// What the peer answers on the append stream, in order, one per request.
type AppendAnswer = std::result::Result<StreamAppendResult<TypeConfig>, Fatal<TypeConfig>>;

/// The appends of one stream that are sent and not answered yet, by when each was sent: a
/// peer that leaves the oldest unanswered for too long fails the stream.
#[derive(Debug, Default)]
struct Pending {
    sent_at: Mutex<std::collections::VecDeque<tokio::time::Instant>>,
    /// Wakes an answer wait that started with nothing outstanding.
    more: tokio::sync::Notify,
}

impl Pending {
    fn sent(&self) {
        lock(&self.sent_at).push_back(tokio::time::Instant::now());
        self.more.notify_one();
    }

    /// The next answer; `Ok(None)` when the peer ended the stream.
    async fn answer(
        &self,
        rx: &mut tonic::Streaming<RaftPayload>,
        timeout: Duration,
    ) -> std::result::Result<Option<RaftPayload>, String> {
        loop {
            let oldest = lock(&self.sent_at).front().copied();
            // `message()` may be abandoned and called again without losing a message.
            let next = match oldest {
                None => tokio::select! {
                    m = rx.message() => m,
                    () = self.more.notified() => continue,
                },
                Some(at) => match tokio::time::timeout_at(at + timeout, rx.message()).await {
                    Ok(m) => m,
                    Err(_) => return Err(format!("no answer within {timeout:?}")),
                },
            };
            return match next {
                Ok(Some(p)) => {
                    lock(&self.sent_at).pop_front();
                    Ok(Some(p))
                }
                Ok(None) => Ok(None),
                Err(status) => Err(status.to_string()),
            };
        }
    }
}

/// A snapshot transfer's first message; the snapshot's bytes follow in later messages.
#[derive(Debug, Serialize, serde::Deserialize)]
pub(crate) struct SnapshotHeader {
    pub(crate) vote: Vote,
    pub(crate) meta: raftmap_storage::SnapshotMeta,
}

impl RaftNetworkV2<TypeConfig> for PeerConnection {
    type SnapshotData = std::io::Cursor<Vec<u8>>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        // Only used outside replication streams: one request on a stream of its own.
        let prev = rpc.prev_log_id;
        let last = rpc.entries.last().map(|e| e.log_id).or(prev);
        let (target, addr) = (self.target, self.addr.clone());
        let mut answers = self
            .stream_append(futures_util::stream::iter([rpc]), option)
            .await?;
        match answers.next().await {
            Some(Ok(Ok(matched))) if matched == last => Ok(AppendEntriesResponse::Success),
            Some(Ok(Ok(matched))) => Ok(AppendEntriesResponse::PartialSuccess(matched)),
            Some(Ok(Err(openraft::raft::StreamAppendError::Conflict(_)))) => {
                Ok(AppendEntriesResponse::Conflict)
            }
            Some(Ok(Err(openraft::raft::StreamAppendError::HigherVote(v)))) => {
                Ok(AppendEntriesResponse::HigherVote(v))
            }
            Some(Err(e)) => Err(e),
            None => Err(RPCError::Unreachable(unreachable(
                target,
                &addr,
                &format!(
                    "append stream ended without an answer (entries after {prev:?} up to {last:?})"
                ),
            ))),
        }
    }

    /// Appends as a pipeline on one gRPC stream: each request goes out as soon as openraft
    /// produces it, without waiting for the answer to the one before; the peer answers them in
    /// order as its log persists them.
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<
            BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>,
            RPCError<TypeConfig>,
        >,
    >
    where
        S: futures_util::Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        Box::pin(async move {
            let timeout = option.hard_ttl().max(MIN_APPEND_TIMEOUT);
            let pending = Arc::new(Pending::default());
            // Dropping the answers (openraft ends a session, or an answer failed) ends the
            // requests too: the transport sends nothing more from this session, and the peer
            // sees its input end. Without this, the upload would go on pulling appends that
            // belong to openraft's next session and their answers would be lost.
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let mut input = input.take_until(stopped);
            // Wait for the first append before connecting: openraft delays it while its
            // backoff for this peer runs, and connecting first would retry a dead peer in a
            // tight loop (each failed connect ends the session before any request is asked
            // for, so the backoff never gets a turn).
            let Some(first) = input.next().await else {
                return Ok(futures_util::stream::empty().boxed());
            };
            let sent = pending.clone();
            let requests = futures_util::stream::once(std::future::ready(first))
                .chain(input)
                .map(move |req| {
                    sent.sent();
                    // Encoding a request into memory does not fail; should it, the peer gets an
                    // empty message, rejects the stream, and replication starts a new one.
                    let data = encode(&req).unwrap_or_default();
                    RaftPayload { data }
                });
            let mut client = self.client()?;
            let rx = client
                .append_entries(requests)
                .await
                .map_err(|s| self.unreachable(&s))?
                .into_inner();
            let (target, addr) = (self.target, self.addr.clone());
            let answers = futures_util::stream::unfold(Some((rx, stop)), move |state| {
                let pending = pending.clone();
                let addr = addr.clone();
                async move {
                    let (mut rx, stop) = state?;
                    let fail = |e: &dyn std::fmt::Display| {
                        Some((
                            Err(RPCError::Unreachable(unreachable(target, &addr, e))),
                            None,
                        ))
                    };
                    let payload = match pending.answer(&mut rx, timeout).await {
                        Ok(Some(p)) => p,
                        Ok(None) => return None,
                        Err(e) => return fail(&e),
                    };
                    match decode::<AppendAnswer>(&payload.data) {
                        Ok(Ok(result)) => Some((Ok(result), Some((rx, stop)))),
                        Ok(Err(fatal)) => fail(&fatal),
                        Err(e) => fail(&e),
                    }
                }
            });
            Ok(answers.boxed())
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(Unary::Vote, &rpc, option.hard_ttl()).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(Unary::PreVote, &rpc, option.hard_ttl()).await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(Unary::TransferLeader, &req, option.hard_ttl())
            .await
    }

    /// The whole snapshot on one client stream: a header (the leader's vote and the
    /// snapshot's metadata), then the data in chunks; the peer installs it once all arrived.
    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let header = SnapshotHeader {
            vote,
            meta: snapshot.meta,
        };
        let header = encode(&header).map_err(|e| self.unreachable(&e))?;
        let data = snapshot.snapshot.into_inner();
        // The whole transfer and the peer's install must fit in the deadline: openraft's
        // timeout plus time for the data at a modest 8 MiB/s, so a large snapshot on a slow
        // link is not cut off and retried forever.
        let deadline = option.hard_ttl()
            + Duration::from_secs_f64(data.len() as f64 / SNAPSHOT_MIN_RATE as f64);
        // One chunk copied at a time, as the transport asks for it.
        let count = data.len().div_ceil(SNAPSHOT_CHUNK);
        let chunks = futures_util::stream::once(std::future::ready(RaftPayload { data: header }))
            .chain(futures_util::stream::iter(0..count).map(move |i| {
                let end = ((i + 1) * SNAPSHOT_CHUNK).min(data.len());
                RaftPayload {
                    data: data[i * SNAPSHOT_CHUNK..end].to_vec(),
                }
            }));
        let mut client = self.client()?;
        let mut request = tonic::Request::new(chunks);
        request.set_timeout(deadline);
        let call = client.install_snapshot(request);
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            resp = call => {
                let resp = resp.map_err(|s| self.unreachable(&s))?;
                let answer: std::result::Result<SnapshotResponse<TypeConfig>, Fatal<TypeConfig>> =
                    decode(&resp.into_inner().data).map_err(|e| self.unreachable(&e))?;
                answer.map_err(|e| StreamingError::Unreachable(self.unreachable(&e)))
            }
        }
    }

    fn backoff(&self) -> Option<Backoff> {
        Some(Backoff::new(std::iter::successors(
            Some(RETRY_FIRST),
            |d| Some((*d * 2).min(RETRY_MAX)),
        )))
    }
}
