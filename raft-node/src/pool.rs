//! Shared, lazily connected channels to the other nodes, with the certificates of the moment,
//! and the headers every call between nodes carries (its cluster and node ids, and for a
//! forwarded admin call the caller it is made for).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use raftmap_proto::admin_client::AdminClient;
use raftmap_proto::peer_client::PeerClient;
use raftmap_storage::NodeId;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::error::Result;
use crate::lock::lock;
use crate::network::MAX_PEER_MESSAGE;
use crate::service::{CLUSTER_HEADER, FORWARDED_FOR_HEADER, FROM_HEADER, TO_HEADER};
use crate::tls::{Expect, Principal, Security};

/// This node's cluster id: as initialised (replicated; it never changes once set), or before
/// this node knows it, the one its certificate names. Read on every call, so cached once known.
#[derive(Debug)]
pub(crate) struct ClusterId {
    view: raftmap_storage::StateView,
    security: Security,
    known: std::sync::OnceLock<Arc<str>>,
}

impl ClusterId {
    pub(crate) fn new(view: raftmap_storage::StateView, security: Security) -> Self {
        Self {
            view,
            security,
            known: Default::default(),
        }
    }

    pub(crate) fn get(&self) -> Arc<str> {
        if let Some(k) = self.known.get() {
            return k.clone();
        }
        match self.view.cluster().cluster_id {
            Some(id) => self.known.get_or_init(|| id.into()).clone(),
            None => self
                .security
                .identity()
                .map(|p| p.cluster)
                .unwrap_or_default()
                .into(),
        }
    }
}

/// A peer client: every call carries the cluster id and the sender's and receiver's node ids.
pub(crate) type PeerRpc = PeerClient<InterceptedService<Channel, PeerHeaders>>;

/// Lazily connected, shared gRPC channels to other nodes, keyed by address and the node the
/// server must prove to be. They are made afresh once the certificates were reloaded, so new
/// connections use the new ones (calls in flight finish on the old).
#[derive(Clone)]
pub(crate) struct PeerPool {
    security: Security,
    me: NodeId,
    cluster: Arc<ClusterId>,
    channels: Arc<Mutex<Channels>>,
}

/// The certificates' generation the channels were made with, and the channels.
type Channels = (u64, HashMap<(String, Expect), Channel>);

impl std::fmt::Debug for PeerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerPool")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl PeerPool {
    pub(crate) fn new(security: Security, me: NodeId, cluster: Arc<ClusterId>) -> Self {
        Self {
            security,
            me,
            cluster,
            channels: Default::default(),
        }
    }

    /// This node's cluster id.
    pub(crate) fn cluster(&self) -> Arc<str> {
        self.cluster.get()
    }

    /// The channel to `addr` (`host:port`) whose server must be `expect`, created on first use.
    pub(crate) fn channel(&self, addr: &str, expect: Expect) -> Result<Channel> {
        let mut map = lock(&self.channels);
        let generation = self.security.generation();
        if map.0 != generation {
            *map = (generation, HashMap::new());
        }
        let key = (addr.to_string(), expect);
        if let Some(c) = map.1.get(&key) {
            return Ok(c.clone());
        }
        let ch = self.security.channel(addr, expect)?;
        map.1.insert(key, ch.clone());
        Ok(ch)
    }

    /// The peer service of node `target` at `addr`.
    pub(crate) fn peer(&self, target: NodeId, addr: &str) -> Result<PeerRpc> {
        let headers = PeerHeaders {
            from: self.me,
            to: target,
            cluster: self.cluster.clone(),
        };
        Ok(
            PeerClient::with_interceptor(self.channel(addr, Expect::Node(target))?, headers)
                .max_decoding_message_size(MAX_PEER_MESSAGE)
                .max_encoding_message_size(MAX_PEER_MESSAGE),
        )
    }

    /// The admin service of node `target` at `addr`; `forwarded_for` names the caller this
    /// node authorised, when it forwards a call.
    pub(crate) fn admin(
        &self,
        target: NodeId,
        addr: &str,
        forwarded_for: Option<&Principal>,
    ) -> Result<AdminRpc> {
        let forwarded = forwarded_for.and_then(|p| p.uri().parse().ok());
        Ok(AdminClient::with_interceptor(
            self.channel(addr, Expect::Node(target))?,
            Forwarded(forwarded),
        ))
    }
}

/// An admin client to another node.
pub(crate) type AdminRpc = AdminClient<InterceptedService<Channel, Forwarded>>;

/// Adds the peer headers (`service/authz/`) to every call.
#[derive(Clone)]
pub(crate) struct PeerHeaders {
    from: NodeId,
    to: NodeId,
    cluster: Arc<ClusterId>,
}

impl tonic::service::Interceptor for PeerHeaders {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let md = req.metadata_mut();
        md.insert(FROM_HEADER, self.from.into());
        md.insert(TO_HEADER, self.to.into());
        if let Ok(v) = self.cluster.get().parse() {
            md.insert(CLUSTER_HEADER, v);
        }
        Ok(req)
    }
}

/// Names the caller a forwarded admin call is made for.
#[derive(Clone)]
pub(crate) struct Forwarded(Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for Forwarded {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        match &self.0 {
            Some(v) => req.metadata_mut().insert(FORWARDED_FOR_HEADER, v.clone()),
            None => req.metadata_mut().remove(FORWARDED_FOR_HEADER),
        };
        Ok(req)
    }
}
