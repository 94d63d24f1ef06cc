//! Joining a cluster on a node's first start: as a learner through any member, then promoted
//! once caught up.

use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use raftmap_proto::admin_client::AdminClient;

use crate::error::Result;
use crate::shared::NodeShared;
use crate::tls::Expect;

/// First start with `--join`: become a learner through any member, then (unless `learner`) ask
/// to be promoted once caught up. A restarted member skips all of it.
pub(crate) async fn join_cluster(shared: &NodeShared, join: &str, learner: bool) -> Result<()> {
    let already = shared
        .raft
        .metrics()
        .borrow_watched()
        .membership_config
        .membership()
        .get_node(&shared.id)
        .is_some();
    if already {
        tracing::info!("already a member; not joining again");
        return Ok(());
    }
    let ch = shared.security.channel(join, Expect::AnyNode)?;
    let mut admin = AdminClient::new(ch);
    let req = raftmap_proto::AddLearnerRequest {
        node_id: shared.id,
        raft_addr: shared.info.raft_addr.clone(),
        api_addr: shared.info.api_addr.clone(),
        cluster_id: shared.cluster_id(),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match admin.add_learner(req.clone()).await {
            Ok(_) => break,
            Err(s) if s.code() == tonic::Code::AlreadyExists && is_self(shared, &s) => break,
            Err(s) if retryable(&s) && Instant::now() < deadline => {
                tracing::warn!(error = %s.message(), "add-learner not accepted yet; retrying");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(s) => return Err(s.into()),
        }
    }
    tracing::info!(node = shared.id, "joined as a learner");
    if learner {
        return Ok(());
    }
    loop {
        let req = raftmap_proto::PromoteRequest {
            node_id: shared.id,
            max_lag: 0,
        };
        match admin.promote(req).await {
            Ok(_) => {
                tracing::info!(node = shared.id, "promoted to voter");
                return Ok(());
            }
            // NOT_FOUND: the leader's view of the membership may not show the learner yet.
            Err(s)
                if (retryable(&s)
                    || matches!(
                        s.code(),
                        tonic::Code::FailedPrecondition | tonic::Code::NotFound
                    ))
                    && Instant::now() < deadline =>
            {
                tracing::info!(reason = %s.message(), "not promoted yet; retrying");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(s) => return Err(s.into()),
        }
    }
}

fn retryable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
    )
}

fn is_self(shared: &NodeShared, s: &tonic::Status) -> bool {
    // The leader names the member's addresses; a retry of our own earlier request matches.
    s.message().contains(&shared.info.raft_addr) && s.message().contains("already a member")
}
