//! Founding a cluster: `raftmap cluster init` on one node, or `--bootstrap-expect N` on every
//! voter, which found the cluster themselves once N fresh voters see each other (rqlite's and
//! Consul's semantics, with no one-off job).
//!
//! The rule that keeps it to one cluster: a voter founds only when every `--join` address
//! resolves, every endpoint behind them answers, all of them are fresh (no membership), and there are exactly N distinct nodes among them; then the one with the lowest id
//! founds it with all N as voters, and the others wait to hear from it. A node that finds any
//! member of an existing cluster joins it instead, as a new node, so a voter that lost its disk
//! never starts a second cluster.

use std::collections::BTreeMap;
use std::time::Duration;

use raftmap_proto::admin_client::AdminClient;
use raftmap_storage::{AdminOp, NodeId, NodeInfo, Proposal};

use crate::error::{NodeError, Result};
use crate::shared::NodeShared;
use crate::tls::Expect;

/// How often fresh voters look at each other while they wait.
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// How long one look at one endpoint may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Makes this node's Raft the first configuration of a new cluster with `nodes` as voters and
/// records the cluster's identity. Returns the cluster id.
pub(crate) async fn found_cluster(
    shared: &NodeShared,
    nodes: BTreeMap<NodeId, NodeInfo>,
) -> Result<String> {
    shared
        .raft
        .initialize(nodes)
        .await
        .map_err(|e| NodeError::FailedPrecondition(format!("init refused: {e}")))?;
    // With TLS the cluster is the one its certificates were made for.
    let cluster_id = shared
        .security
        .identity()
        .map_or_else(|| format!("{:016x}", rand::random::<u64>()), |p| p.cluster);
    shared
        .proposer
        .propose(Proposal {
            batches: vec![],
            admin: vec![AdminOp::InitCluster {
                cluster_id: cluster_id.clone(),
            }],
        })
        .await?;
    tracing::info!(cluster = %cluster_id, node = shared.id, "founded a new cluster");
    Ok(cluster_id)
}

/// What one look at the `--join` endpoints found.
#[derive(Debug, PartialEq)]
enum Seen {
    /// Some endpoint did not resolve or answer, or too few or too many fresh nodes: wait.
    Waiting(String),
    /// Exactly the expected number of fresh nodes (this one included).
    Fresh(BTreeMap<NodeId, NodeInfo>),
    /// A member of an existing cluster answered; whether it lists this node.
    Cluster { lists_us: bool },
}

/// `--bootstrap-expect n` with `--join join`: found the cluster, wait to be part of it, or
/// join the existing one.
pub(crate) async fn bootstrap_expect(shared: &NodeShared, join: &str, n: usize) -> Result<()> {
    let addrs = crate::join::join_addresses(join)?;
    let mut last = String::new();
    loop {
        if shared
            .raft
            .is_initialized()
            .await
            .map_err(|e| NodeError::Internal(e.to_string()))?
        {
            if shared.is_member().await? {
                tracing::info!("part of a cluster; bootstrap done");
                return Ok(());
            }
            // The log of a cluster this node was removed from, kept under a new id: join it.
            tracing::info!("holding the log of a cluster that does not list this node: joining it as a new node");
            return crate::join::join_cluster(shared, join, false).await;
        }
        match look(shared, &addrs, n).await {
            Seen::Fresh(nodes) if nodes.keys().next() == Some(&shared.id) => {
                let ids: Vec<_> = nodes.keys().copied().collect();
                tracing::info!(voters = ?ids, "found the expected fresh voters; founding the cluster");
                found_cluster(shared, nodes).await?;
                return Ok(());
            }
            Seen::Fresh(nodes) => {
                let founder = nodes.keys().next().copied().unwrap_or_default();
                let why =
                    format!("waiting for node {founder} (the lowest id) to found the cluster");
                log_once(&mut last, why);
            }
            Seen::Cluster { lists_us: true } => {
                log_once(
                    &mut last,
                    "listed in the cluster's membership; waiting to hear from its leader".into(),
                );
            }
            Seen::Cluster { lists_us: false } => {
                tracing::info!("a cluster exists already: joining it as a new node");
                return crate::join::join_cluster(shared, join, false).await;
            }
            Seen::Waiting(why) => log_once(&mut last, why),
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

fn log_once(last: &mut String, why: String) {
    if *last != why {
        tracing::info!(reason = %why, "bootstrap: not founding the cluster yet");
        *last = why;
    }
}

/// Resolves every address and asks every endpoint behind them for its status.
async fn look(shared: &NodeShared, addrs: &[String], n: usize) -> Seen {
    let mut fresh = BTreeMap::from([(shared.id, shared.info.clone())]);
    for addr in addrs {
        let endpoints = match tokio::net::lookup_host(addr.as_str()).await {
            Ok(e) => e.collect::<Vec<_>>(),
            Err(e) => return Seen::Waiting(format!("{addr} does not resolve: {e}")),
        };
        for ep in endpoints {
            let ep = ep.to_string();
            let status = async {
                let ch = shared.security.channel(&ep, Expect::AnyNode)?;
                let r = AdminClient::new(ch)
                    .status(raftmap_proto::StatusRequest {})
                    .await?;
                Ok::<_, NodeError>(r.into_inner())
            };
            let st = match tokio::time::timeout(PROBE_TIMEOUT, status).await {
                Ok(Ok(st)) => st,
                Ok(Err(e)) => return Seen::Waiting(format!("{addr} ({ep}) does not answer: {e}")),
                Err(_) => {
                    return Seen::Waiting(format!(
                        "{addr} ({ep}) does not answer within {PROBE_TIMEOUT:?}"
                    ))
                }
            };
            // (With TLS a fresh node names its certificate's cluster already: the membership
            // tells.)
            if !st.members.is_empty() {
                return Seen::Cluster {
                    lists_us: st.members.iter().any(|m| m.node_id == shared.id),
                };
            }
            fresh.insert(
                st.node_id,
                NodeInfo {
                    raft_addr: st.raft_addr,
                    api_addr: st.api_addr,
                },
            );
        }
    }
    if fresh.len() == n {
        Seen::Fresh(fresh)
    } else {
        Seen::Waiting(format!(
            "{} fresh voters see each other ({:?}), --bootstrap-expect is {n}",
            fresh.len(),
            fresh.keys().collect::<Vec<_>>()
        ))
    }
}
