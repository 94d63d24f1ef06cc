//! Outgoing peer connections: openraft's network over the gRPC `Peer` service.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use raftmap_proto::peer_client::PeerClient;
use raftmap_proto::RaftPayload;
use raftmap_storage::{NodeId, NodeInfo, TypeConfig};
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

/// The shortest time an append carrying entries may take before it counts as failed.
const MIN_APPEND_TIMEOUT: Duration = Duration::from_secs(2);

/// Retry delays towards an unreachable peer: doubling from the first to the last. A restarted
/// follower is caught up within about the first delay instead of openraft's constant 500 ms; a
/// lagging follower, in turn, is what makes a later election slow (its candidacies with a stale
/// log keep raising the term until a node with the whole log times out first).
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
    /// The open append stream, if any: taken for a call and put back only when the call got
    /// its answer, so an abandoned call (timeout, cancelled) never leaves an unread answer.
    appends: Option<AppendStream>,
}

/// One `AppendEntries` stream: requests go in through `tx`, answers come back in order on `rx`.
#[derive(Debug)]
struct AppendStream {
    tx: tokio::sync::mpsc::Sender<RaftPayload>,
    rx: tonic::Streaming<RaftPayload>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> Self::Network {
        PeerConnection {
            target,
            addr: node.raft_addr.clone(),
            pool: self.pool.clone(),
            appends: None,
        }
    }
}

type RpcResult<T, E = openraft::error::Infallible> =
    std::result::Result<T, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>;

impl PeerConnection {
    /// The error openraft gets for a transport failure: it retries after its backoff.
    fn unreachable<E: std::error::Error>(
        &self,
        e: &dyn std::fmt::Display,
    ) -> RPCError<NodeId, NodeInfo, RaftError<NodeId, E>> {
        RPCError::Unreachable(Unreachable::new(&std::io::Error::other(format!(
            "node {} at {}: {e}",
            self.target, self.addr
        ))))
    }

    /// The peer's answer: openraft's result, encoded (the peer's own error is a remote error).
    // The error is openraft's own RPC error, which the RaftNetwork methods return as it is.
    #[allow(clippy::result_large_err)]
    fn answer<Resp, E>(&self, data: &[u8]) -> RpcResult<Resp, E>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let result: std::result::Result<Resp, RaftError<NodeId, E>> =
            decode(data).map_err(|e| self.unreachable(&e))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn call<Req, Resp, E>(
        &self,
        which: Rpc,
        req: &Req,
        timeout: Duration,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let data = encode(req).map_err(|e| self.unreachable(&e))?;
        let mut client = self
            .pool
            .peer(&self.addr)
            .map_err(|e| self.unreachable(&e))?;
        let mut request = tonic::Request::new(RaftPayload { data });
        request.set_timeout(timeout);
        let resp = match which {
            Rpc::Vote => client.vote(request).await,
            Rpc::Snapshot => client.install_snapshot(request).await,
        }
        .map_err(|s| self.unreachable(&s))?;
        self.answer(&resp.into_inner().data)
    }

    /// An append over this peer's append stream (opened on first use and after any failure).
    async fn append(
        &mut self,
        rpc: &AppendEntriesRequest<TypeConfig>,
        timeout: Duration,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let data = encode(rpc).map_err(|e| self.unreachable(&e))?;
        let stream = self.appends.take();
        let pool = self.pool.clone();
        let addr = self.addr.clone();
        let exchange = async move {
            let mut s = match stream {
                Some(s) => s,
                None => {
                    let (tx, rx) = tokio::sync::mpsc::channel(1);
                    let mut client = pool.peer(&addr).map_err(|e| e.to_string())?;
                    let resp = client
                        .append_entries(tokio_stream::wrappers::ReceiverStream::new(rx))
                        .await
                        .map_err(|e| e.to_string())?;
                    AppendStream {
                        tx,
                        rx: resp.into_inner(),
                    }
                }
            };
            s.tx.send(RaftPayload { data })
                .await
                .map_err(|_| "append stream closed".to_string())?;
            match s.rx.message().await {
                Ok(Some(p)) => Ok((s, p)),
                Ok(None) => Err("append stream ended".to_string()),
                Err(e) => Err(e.to_string()),
            }
        };
        let (s, p) = match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return Err(self.unreachable(&e)),
            Err(_) => return Err(self.unreachable(&format!("no answer within {timeout:?}"))),
        };
        self.appends = Some(s);
        self.answer(&p.data)
    }
}

#[derive(Debug, Clone, Copy)]
enum Rpc {
    Vote,
    Snapshot,
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        // openraft bounds an append by the heartbeat interval; a full batch to a busy follower
        // (an fsync of megabytes under load) can take longer, and a timed-out append sends
        // replication into a half-second backoff. Entries carry data: give them time.
        let ttl = if rpc.entries.is_empty() {
            option.hard_ttl()
        } else {
            option.hard_ttl().max(MIN_APPEND_TIMEOUT)
        };
        self.append(&rpc, ttl).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call(Rpc::Snapshot, &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        self.call(Rpc::Vote, &rpc, option.hard_ttl()).await
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::successors(Some(RETRY_FIRST), |d| {
            Some((*d * 2).min(RETRY_MAX))
        }))
    }
}
