//! Speaking the peer protocol as a given node, for tests that forge peer messages.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use raftmap_jepsen::cluster::LocalCluster;
use raftmap_node::proto as pb;
use raftmap_node::tls::{Expect, Security};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The headers every peer call carries.
#[derive(Debug, Clone)]
pub struct Headers {
    pub cluster: String,
    pub from: u64,
    pub to: u64,
}

impl tonic::service::Interceptor for Headers {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let md = req.metadata_mut();
        md.insert("raftmap-cluster", self.cluster.parse().unwrap());
        md.insert("raftmap-from", self.from.to_string().parse().unwrap());
        md.insert("raftmap-to", self.to.to_string().parse().unwrap());
        Ok(req)
    }
}

pub type Peer = pb::peer_client::PeerClient<InterceptedService<Channel, Headers>>;

/// A peer client of node `target` presenting `security`'s certificate and saying it is node
/// `from` of `cluster`.
pub async fn peer_with(
    c: &LocalCluster,
    target: u64,
    security: &Security,
    headers: Headers,
) -> Peer {
    let addr = c.node(target).unwrap().raft_addr.clone();
    let ch = security.connect(&addr, Expect::Node(target)).await.unwrap();
    pb::peer_client::PeerClient::with_interceptor(ch, headers)
        .max_encoding_message_size(64 << 20)
        .max_decoding_message_size(64 << 20)
}

/// Node `from`'s certificate, as the launcher made it.
pub fn node_security(c: &LocalCluster, from: u64) -> Security {
    Security::from_dir(c.tls_dir(from).expect("the cluster runs TLS")).unwrap()
}

/// A peer client of node `target` speaking as node `from` (with its certificate).
pub async fn peer_as(c: &LocalCluster, target: u64, from: u64) -> Peer {
    let headers = Headers {
        cluster: c.pki().unwrap().cluster().to_string(),
        from,
        to: target,
    };
    peer_with(c, target, &node_security(c, from), headers).await
}
