//! Outgoing peer connections: openraft's network over the gRPC `Peer` service.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::future::BoxFuture;
use futures_util::stream::{BoxStream, StreamExt};
use openraft::error::{Fatal, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult, VoteRequest,
    VoteResponse,
};
use raftmap_proto::peer_client::PeerClient;
use raftmap_proto::RaftPayload;
use raftmap_storage::{NodeId, NodeInfo, Snapshot, TypeConfig, Vote};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::error::{decode, encode, NodeError, Result};

/// Largest peer message: a batch of log entries or one snapshot chunk.
pub(crate) const MAX_PEER_MESSAGE: usize = 256 * 1024 * 1024;

/// Lazily connected, shared gRPC channels to peers, keyed by address.
#[derive(Debug, Clone, Default)]
pub struct PeerPool {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl PeerPool {
    /// The channel to `addr` (`host:port`), created on first use.
    pub fn channel(&self, addr: &str) -> Result<Channel> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let ch = endpoint(addr)?.connect_lazy();
        map.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    pub fn peer(&self, addr: &str) -> Result<PeerClient<Channel>> {
        Ok(PeerClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_PEER_MESSAGE)
            .max_encoding_message_size(MAX_PEER_MESSAGE))
    }
}

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

    fn client(&self) -> Result<PeerClient<Channel>, Unreachable<TypeConfig>> {
        self.pool.peer(&self.addr).map_err(|e| self.unreachable(&e))
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

    async fn vote_call(
        &self,
        pre_vote: bool,
        req: &VoteRequest<TypeConfig>,
        timeout: Duration,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let data = encode(req).map_err(|e| self.unreachable(&e))?;
        let mut client = self.client()?;
        let mut request = tonic::Request::new(RaftPayload { data });
        request.set_timeout(timeout);
        let resp = if pre_vote {
            client.pre_vote(request).await
        } else {
            client.vote(request).await
        }
        .map_err(|s| self.unreachable(&s))?;
        self.answer(&resp.into_inner().data)
    }
}

/// What the peer answers on the append stream, in order, one per request.
type AppendAnswer = std::result::Result<StreamAppendResult<TypeConfig>, Fatal<TypeConfig>>;

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
            Some(Ok(Ok(_))) => Ok(AppendEntriesResponse::Success),
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
            // Requests handed to the transport and not answered yet: while there are any, a
            // silent peer is a broken stream.
            let outstanding = Arc::new(AtomicUsize::new(0));
            let sent = outstanding.clone();
            let requests = input.map(move |req| {
                sent.fetch_add(1, Ordering::Relaxed);
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
            let answers = futures_util::stream::unfold(Some(rx), move |state| {
                let outstanding = outstanding.clone();
                let addr = addr.clone();
                async move {
                    let mut rx = state?;
                    let fail = |e: &dyn std::fmt::Display| {
                        Some((
                            Err(RPCError::Unreachable(unreachable(target, &addr, e))),
                            None,
                        ))
                    };
                    let next = if outstanding.load(Ordering::Relaxed) > 0 {
                        match tokio::time::timeout(timeout, rx.message()).await {
                            Ok(r) => r,
                            Err(_) => return fail(&format!("no answer within {timeout:?}")),
                        }
                    } else {
                        rx.message().await
                    };
                    let payload = match next {
                        Ok(Some(p)) => p,
                        Ok(None) => return None,
                        Err(status) => return fail(&status),
                    };
                    outstanding.fetch_sub(1, Ordering::Relaxed);
                    match decode::<AppendAnswer>(&payload.data) {
                        Ok(Ok(result)) => Some((Ok(result), Some(rx))),
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
        self.vote_call(false, &rpc, option.hard_ttl()).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.vote_call(true, &rpc, option.hard_ttl()).await
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
        let chunks: Vec<RaftPayload> = std::iter::once(header)
            .chain(data.chunks(SNAPSHOT_CHUNK).map(<[u8]>::to_vec))
            .map(|data| RaftPayload { data })
            .collect();
        let mut client = self.client()?;
        let mut request = tonic::Request::new(futures_util::stream::iter(chunks));
        request.set_timeout(option.hard_ttl());
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
