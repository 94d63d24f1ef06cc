//! The `Admin` service: init, membership changes, map drop, members and status.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use raftmap_proto as pb;
use raftmap_storage::{
    AdminOp, BatchOutcome, NodeId, NodeInfo, Op, Proposal, Source, TypeConfig, ValidationError,
};
use tonic::{Request, Response, Status};

use super::{check_self, GrpcResult, DEFAULT_MAX_LAG, MIN_VOTERS};
use crate::error::NodeError;
use crate::shared::{members, NodeShared};

fn member_list(shared: &NodeShared) -> pb::MembersResponse {
    let (nodes, leader) = members(&shared.raft);
    let names = shared.view.cluster().names;
    pb::MembersResponse {
        members: nodes
            .into_iter()
            .map(|(id, (n, voter))| pb::Member {
                node_id: id,
                raft_addr: n.raft_addr,
                api_addr: n.api_addr,
                voter,
                node_name: names.get(&id).cloned().unwrap_or_default(),
            })
            .collect(),
        leader_id: leader.unwrap_or(0),
        has_leader: leader.is_some(),
        cluster_id: shared.cluster_id(),
    }
}

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

/// How long a membership change waits for the leader to commit a change it inherited.
const SETTLE_WAIT: Duration = Duration::from_secs(5);
/// How long a leader removing itself waits for its successor.
const HANDOVER_WAIT: Duration = Duration::from_secs(10);
/// How long a membership change keeps following the leadership when it moves under it.
const LEADER_CHANGE_WAIT: Duration = Duration::from_secs(10);

/// Why a membership change made on this node did not happen.
#[derive(Debug)]
enum Change {
    /// This node does not lead (any more): nothing was changed, the leader should make it.
    NotLeader,
    Refused(Status),
}

impl From<Status> for Change {
    fn from(s: Status) -> Self {
        Change::Refused(s)
    }
}

impl From<NodeError> for Change {
    fn from(e: NodeError) -> Self {
        Change::Refused(e.into())
    }
}

impl From<Change> for Status {
    fn from(c: Change) -> Self {
        match c {
            Change::NotLeader => {
                Status::unavailable("leadership changed during the request; retry")
            }
            Change::Refused(s) => s,
        }
    }
}

/// Waits (up to `SETTLE_WAIT`) until the last membership change has committed: a leader
/// elected while a change was under way commits it with its first entry.
async fn settle(s: &NodeShared) -> Result<(), Change> {
    let settled = s
        .raft
        .wait(Some(SETTLE_WAIT))
        .metrics(
            |m| m.committed_membership_config.log_id() == m.membership_config.log_id(),
            "the last membership change commits",
        )
        .await;
    if let Err(openraft::metrics::WaitError::ShuttingDown) = settled {
        return Err(Status::unavailable("raft has shut down").into());
    }
    Ok(())
}

/// Changes the membership (on the leader), once an inherited change has committed instead of
/// failing because of it.
async fn change_membership(
    s: &NodeShared,
    change: ChangeMembers<NodeId, NodeInfo>,
) -> Result<(), Change> {
    settle(s).await?;
    // Still unsettled: openraft refuses the change with the reason.
    match s.raft.change_membership(change, false).await {
        Ok(done) => {
            // The answer lists the members from the metrics, which the Raft core publishes a
            // moment after it answers: wait for them to show the change.
            let _ = s
                .raft
                .wait(Some(SETTLE_WAIT))
                .metrics(
                    |m| m.membership_config.log_id().as_ref() >= Some(&done.log_id),
                    "the metrics show the new membership",
                )
                .await;
            Ok(())
        }
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(Change::NotLeader),
        Err(e) => Err(membership_error(e).into()),
    }
}

/// Whether to try a membership change again: it reached a node that no longer leads, and
/// there is time to find the one that does.
async fn retry_change(
    outcome: &Result<Response<pb::MembersResponse>, Change>,
    deadline: Instant,
) -> bool {
    if matches!(outcome, Err(Change::NotLeader)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        return true;
    }
    false
}

/// The membership change that removes `r.node_id`, or why it is refused (checked before a
/// leader removing itself hands leadership on, so a refusal changes nothing). Voters are
/// counted in the newest configuration, the one a change is made from. `floor`: the fewest
/// voters an automatic removal may leave.
fn removal(
    s: &NodeShared,
    r: &pb::RemoveRequest,
    floor: Option<usize>,
) -> Result<ChangeMembers<NodeId, NodeInfo>, Status> {
    let (nodes, _) = members(&s.raft);
    let voters = crate::shared::newest_voters(&s.raft).len();
    let id = r.node_id;
    match nodes.get(&id) {
        None => Err(Status::not_found(format!("node {id} is not a member"))),
        Some((_, true)) if voters == 1 => Err(Status::failed_precondition(format!(
            "node {id} is the only voter; removing it would leave no cluster"
        ))),
        Some((_, true)) if floor.is_some_and(|f| voters - 1 < f) => {
            Err(Status::failed_precondition(format!(
                "removing voter {id} would leave {} voters, fewer than the {} configured",
                voters - 1,
                floor.unwrap_or_default()
            )))
        }
        Some((_, true)) if voters - 1 < MIN_VOTERS && !r.force => {
            Err(Status::failed_precondition(format!(
                "removing voter {id} would leave {} voters, and a cluster needs {MIN_VOTERS} to survive the loss of one; add a voter first, or remove it anyway with --force",
                voters - 1
            )))
        }
        Some((_, true)) => Ok(ChangeMembers::RemoveVoters(BTreeSet::from([id]))),
        Some((_, false)) => Ok(ChangeMembers::RemoveNodes(BTreeSet::from([id]))),
    }
}

impl AdminService {
    /// Promotes a learner on this node, the leader.
    async fn promote_here(
        &self,
        r: &pb::PromoteRequest,
    ) -> Result<Response<pb::MembersResponse>, Change> {
        let s = &self.shared;
        let (nodes, _) = members(&s.raft);
        match nodes.get(&r.node_id) {
            None => {
                return Err(Status::not_found(format!(
                    "node {} is not a member; add-learner first",
                    r.node_id
                ))
                .into())
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
                ))
                .into())
            }
        }
        change_membership(s, ChangeMembers::AddVoterIds(BTreeSet::from([r.node_id]))).await?;
        tracing::info!(node = r.node_id, "promoted learner to voter");
        Ok(Response::new(member_list(s)))
    }

    /// Removes a node on this node, the leader (never itself: it hands leadership on first).
    async fn remove_here(
        &self,
        r: &pb::RemoveRequest,
    ) -> Result<Response<pb::MembersResponse>, Change> {
        let s = &self.shared;
        remove_checked(s, r, None).await?;
        tracing::info!(node = r.node_id, "removed node");
        Ok(Response::new(member_list(s)))
    }
}

/// Removes a member (on the leader, never itself) and retires its id, checked against the
/// membership once an inherited change has committed.
async fn remove_checked(
    s: &NodeShared,
    r: &pb::RemoveRequest,
    floor: Option<usize>,
) -> Result<(), Change> {
    settle(s).await?;
    let change = removal(s, r, floor)?;
    // The id is retired first, so that no node can join under it again (add_learner refuses
    // retired ids) in the moment between its removal and its retirement, or for ever if this
    // node loses leadership between the two. Goes through the log like any write.
    s.proposer
        .propose(Proposal {
            batches: vec![],
            admin: vec![AdminOp::RetireNode { node_id: r.node_id }],
        })
        .await?;
    change_membership(s, change).await
}

/// Removes member `node_id` and retires its id, on this node, the leader: the automatic
/// removals of `autopilot.rs`, which leave at least `floor` voters.
pub(crate) async fn remove_member(
    s: &NodeShared,
    node_id: NodeId,
    floor: Option<usize>,
) -> Result<(), Status> {
    let r = pb::RemoveRequest {
        node_id,
        force: true,
    };
    remove_checked(s, &r, floor).await.map_err(Status::from)
}

/// The `raftmap-reason` metadata of an ALREADY_EXISTS answer to AddLearner: `member` (the id
/// is a member) or `retired` (it was removed and is never used again), for a joining node to
/// act on without reading the message.
pub(crate) const REASON_HEADER: &str = "raftmap-reason";
pub(crate) const REASON_MEMBER: &str = "member";
pub(crate) const REASON_RETIRED: &str = "retired";

fn already_exists(message: String, reason: &'static str) -> Status {
    let mut status = Status::already_exists(message);
    status.metadata_mut().insert(
        REASON_HEADER,
        tonic::metadata::MetadataValue::from_static(reason),
    );
    status
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn issue_node_certificate(
        &self,
        req: Request<pb::IssueNodeCertificateRequest>,
    ) -> GrpcResult<pb::IssueNodeCertificateResponse> {
        use crate::tls::issue::{self, Validity, NODE_CERT_DAYS};
        use crate::tls::{Principal, Subject};
        let s = &self.shared;
        let Some(ca_dir) = &s.ca_dir else {
            return Err(Status::failed_precondition(format!(
                "node {} holds no CA key (--ca-dir): node certificates come from the nodes that do",
                s.id
            )));
        };
        let caller = req
            .extensions()
            .get::<super::Granted>()
            .and_then(super::Granted::principal)
            .cloned();
        let r = req.into_inner();
        if r.node_id == 0 {
            return Err(Status::invalid_argument(
                "node id 0 is reserved; use 1 or more",
            ));
        }
        let renewal = match caller.as_ref().map(|p| &p.subject) {
            Some(Subject::Node(id)) if *id == r.node_id => true,
            Some(Subject::Node(id)) => {
                return Err(Status::permission_denied(format!(
                    "node {id} may renew only its own certificate, not node {}'s",
                    r.node_id
                )))
            }
            _ => false,
        };
        if !renewal {
            let (nodes, _) = members(&s.raft);
            if nodes.contains_key(&r.node_id) || s.view.cluster().retired.contains(&r.node_id) {
                return Err(Status::already_exists(format!(
                    "node id {} is or was a member of this cluster; a new node needs an id never used",
                    r.node_id
                )));
            }
        }
        let (_, _, cluster) =
            issue::read_ca(ca_dir).map_err(|e| Status::internal(e.to_string()))?;
        let who = Principal::node(&cluster, r.node_id);
        let cert_pem =
            issue::sign_request(ca_dir, &who, Validity::days(NODE_CERT_DAYS), &r.csr_pem)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(
            node = r.node_id,
            renewal,
            caller = %caller.map_or_else(|| "anyone (no TLS)".to_string(), |p| p.to_string()),
            "issued a node certificate"
        );
        Ok(Response::new(pb::IssueNodeCertificateResponse {
            cert_pem,
            cluster_id: cluster,
        }))
    }

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
        let nodes = std::collections::BTreeMap::from([(s.id, s.info.clone())]);
        crate::bootstrap::found_cluster(s, nodes).await?;
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
        check_self(req.extensions().get(), req.get_ref().node_id)?;
        if let Some(mut leader) = s.leader_admin(&req).await? {
            return leader.add_learner(req).await;
        }
        let r = req.into_inner();
        if r.node_id == 0 {
            return Err(Status::invalid_argument(
                "node id 0 is reserved; use 1 or more",
            ));
        }
        crate::wire::check_member_addr(&r.raft_addr)?;
        crate::wire::check_member_addr(&r.api_addr)?;
        let ours = s.cluster_id();
        if !r.cluster_id.is_empty() && r.cluster_id != ours {
            return Err(Status::failed_precondition(format!(
                "node {} holds data of cluster {}, this is cluster {ours}: use a fresh data dir and a new node id",
                r.node_id, r.cluster_id
            )));
        }
        let (nodes, _) = members(&s.raft);
        // Retired first: an id on its way out is both for a moment.
        if s.view.cluster().retired.contains(&r.node_id) {
            return Err(already_exists(
                format!(
                    "node id {} was removed from this cluster and cannot be reused; pick a new id",
                    r.node_id
                ),
                REASON_RETIRED,
            ));
        }
        if let Some((n, _)) = nodes.get(&r.node_id) {
            return Err(already_exists(
                format!(
                    "node id {} is already a member ({n}); node ids are never reused",
                    r.node_id
                ),
                REASON_MEMBER,
            ));
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
        if let Some(mut leader) = s.leader_admin(&req).await? {
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
                let mut admin = s.proposer.pool.admin(id, &info.api_addr, None)?;
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
        check_self(req.extensions().get(), req.get_ref().node_id)?;
        let deadline = Instant::now() + LEADER_CHANGE_WAIT;
        loop {
            if let Some(mut leader) = self.shared.leader_admin(&req).await? {
                return leader.promote(req).await;
            }
            let outcome = self.promote_here(req.get_ref()).await;
            if !retry_change(&outcome, deadline).await {
                return outcome.map_err(Status::from);
            }
        }
    }

    async fn remove(&self, req: Request<pb::RemoveRequest>) -> GrpcResult<pb::MembersResponse> {
        let s = &self.shared;
        let deadline = Instant::now() + LEADER_CHANGE_WAIT;
        loop {
            // A leader asked to remove itself hands leadership on first and lets its
            // successor make the change, as etcd and Consul do: a leader that leaves by its
            // own change would manage a configuration it is no longer part of.
            let removing_self = req.get_ref().node_id == s.id;
            if removing_self && s.raft.metrics().borrow_watched().state.is_leader() {
                removal(s, req.get_ref(), None)?;
                let to = s.hand_over_leadership(HANDOVER_WAIT).await?;
                tracing::info!(to, "handed leadership on before removing this node");
            }
            if let Some(mut leader) = s.leader_admin(&req).await? {
                return leader.remove(req).await;
            }
            let outcome = match removing_self {
                // Leadership came back to this node: hand it on again.
                true => Err(Change::NotLeader),
                false => self.remove_here(req.get_ref()).await,
            };
            if !retry_change(&outcome, deadline).await {
                return outcome.map_err(Status::from);
            }
        }
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
            node_name: s.node_name.clone().unwrap_or_default(),
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
            tls: s.security.expiry().map(|(cert, ca)| pb::TlsInfo {
                identity: s.security.identity().map(|p| p.uri()).unwrap_or_default(),
                expires_unix: cert,
                ca_expires_unix: ca,
            }),
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
