//! Joining a cluster on a node's first start: as a learner through any member, then promoted
//! once caught up. `--join` names members (a comma-separated list; a DNS name may stand for
//! several, such as a headless Service); they are tried in turn, with backoff, for as long as
//! it takes (the voters may not exist yet), and every failed round says why.

use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use raftmap_proto::admin_client::AdminClient;
use tonic::transport::Channel;

use crate::error::{NodeError, Result};
use crate::shared::NodeShared;
use crate::tls::Expect;

/// Backoff between rounds over every `--join` address: doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(300);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// The members named by a `--join` value: `host:port` entries, separated by commas.
pub(crate) fn join_addresses(join: &str) -> Result<Vec<String>> {
    let addrs: Vec<String> = join
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(String::from)
        .collect();
    if addrs.is_empty() {
        return Err(NodeError::BadRequest(format!(
            "--join {join:?} names no member: give host:port[,host:port...]"
        )));
    }
    for a in &addrs {
        crate::network::endpoint(a)?;
    }
    Ok(addrs)
}

/// First start with `--join`: become a learner through any member, then (unless `learner`) ask
/// to be promoted once caught up. A restarted member skips all of it; a retry of a join that
/// already happened counts as done.
pub(crate) async fn join_cluster(shared: &NodeShared, join: &str, learner: bool) -> Result<()> {
    if shared.is_member().await? {
        tracing::info!("already a member; not joining again");
        return Ok(());
    }
    let addrs = join_addresses(join)?;
    loop {
        let members = add_self(shared, &addrs).await?;
        tracing::info!(node = shared.id, "joined as a learner");
        if learner || promote(shared, members).await? {
            return Ok(());
        }
        // The leader does not know this learner (any more): add it again.
    }
}

/// Asks the members to add this node as a learner until one answers that it is; returns the
/// channels with that one first.
async fn add_self(shared: &NodeShared, addrs: &[String]) -> Result<Vec<(Channel, String)>> {
    let req = add_request(shared);
    let mut backoff = Backoff::default();
    loop {
        let mut why = Vec::new();
        let members = channels(shared, addrs).await?;
        for (k, (ch, addr)) in members.iter().enumerate() {
            match AdminClient::new(ch.clone()).add_learner(req.clone()).await {
                Ok(_) => return Ok(rotate(members, k)),
                Err(s) => match taken(&s) {
                    // A retry of this node's own earlier request.
                    Some(Taken::Member) => return Ok(rotate(members, k)),
                    // Another node held the id this node drew, or this node was removed
                    // while its join was under way: draw again.
                    Some(Taken::Retired) if shared.auto_id => {
                        crate::identity::forget_id(&shared.data_dir)?;
                        return Err(NodeError::FailedPrecondition(format!(
                            "the cluster refused this node's automatic id {} ({}); a new one is drawn at the next start",
                            shared.id,
                            s.message()
                        )));
                    }
                    Some(Taken::Retired) => return Err(s.into()),
                    None if retryable(&s) => why.push(format!("{addr}: {}", s.message())),
                    None => return Err(s.into()),
                },
            }
        }
        let wait = backoff.next();
        tracing::warn!(reasons = %why.join("; "), retry_in = ?wait, "could not join yet; retrying");
        tokio::time::sleep(wait).await;
    }
}

fn add_request(shared: &NodeShared) -> raftmap_proto::AddLearnerRequest {
    raftmap_proto::AddLearnerRequest {
        node_id: shared.id,
        raft_addr: shared.info.raft_addr.clone(),
        api_addr: shared.info.api_addr.clone(),
        cluster_id: shared.cluster_id(),
    }
}

/// Asks to be promoted until it is (true), or until the members have answered for
/// `NOT_LISTED` that this node is not a member (false: it was removed before it caught up).
async fn promote(shared: &NodeShared, mut members: Vec<(Channel, String)>) -> Result<bool> {
    let mut backoff = Backoff::default();
    let mut not_listed: Option<std::time::Instant> = None;
    loop {
        let req = raftmap_proto::PromoteRequest {
            node_id: shared.id,
            max_lag: 0,
        };
        let (ch, addr) = &members[0];
        match AdminClient::new(ch.clone()).promote(req).await {
            Ok(_) => {
                tracing::info!(node = shared.id, "promoted to voter");
                return Ok(true);
            }
            // NOT_FOUND: the leader's view of the membership may not show the learner yet.
            Err(s)
                if retryable(&s)
                    || matches!(
                        s.code(),
                        tonic::Code::FailedPrecondition | tonic::Code::NotFound
                    ) =>
            {
                if s.code() == tonic::Code::NotFound {
                    let since = *not_listed.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() > NOT_LISTED {
                        tracing::warn!(reason = %s.message(), "not a member any more before promotion; joining again");
                        return Ok(false);
                    }
                } else {
                    not_listed = None;
                }
                let wait = backoff.next();
                tracing::info!(member = %addr, reason = %s.message(), retry_in = ?wait, "not promoted yet; retrying");
                // A member that is gone: ask the next one.
                if retryable(&s) {
                    members.rotate_left(1);
                }
                tokio::time::sleep(wait).await;
            }
            Err(s) => return Err(s.into()),
        }
    }
}

/// How long a learner waiting for promotion may be told it is not a member before it asks to
/// be added again.
const NOT_LISTED: Duration = Duration::from_secs(10);

/// What an ALREADY_EXISTS answer to this node's AddLearner says of its id.
#[derive(Debug, PartialEq, Eq)]
enum Taken {
    /// A member: this node (a retry, or a member asking whether it still is one).
    Member,
    /// Removed and never to be used again.
    Retired,
}

fn taken(s: &tonic::Status) -> Option<Taken> {
    if s.code() != tonic::Code::AlreadyExists {
        return None;
    }
    let reason = s
        .metadata()
        .get(crate::service::REASON_HEADER)
        .and_then(|v| v.to_str().ok());
    Some(match reason {
        Some(crate::service::REASON_RETIRED) => Taken::Retired,
        _ => Taken::Member,
    })
}

/// A channel to every endpoint behind the `--join` addresses, resolved now: a DNS name (a
/// headless Service) stands for every address it resolves to, and the set changes as pods
/// come and go. This node may be among them; it knows no leader before it has joined, so it
/// answers UNAVAILABLE like any member that cannot help, and the next one is asked. A name
/// that does not resolve is kept, for its error to be reported.
async fn channels(shared: &NodeShared, addrs: &[String]) -> Result<Vec<(Channel, String)>> {
    let mut out = Vec::new();
    for addr in addrs {
        let resolved: Vec<String> = match tokio::net::lookup_host(addr.as_str()).await {
            Ok(found) => found.map(|a| a.to_string()).collect(),
            Err(_) => vec![addr.clone()],
        };
        for ep in resolved {
            if !out.iter().any(|(_, e)| *e == ep) {
                out.push((shared.security.channel(&ep, Expect::AnyNode)?, ep));
            }
        }
    }
    Ok(out)
}

fn rotate<T>(mut v: Vec<T>, first: usize) -> Vec<T> {
    v.rotate_left(first);
    v
}

/// Doubling delays from `RETRY_FIRST` up to `RETRY_MAX`.
#[derive(Debug)]
pub(crate) struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(RETRY_FIRST)
    }
}

impl Backoff {
    pub(crate) fn next(&mut self) -> Duration {
        let now = self.0;
        self.0 = (self.0 * 2).min(RETRY_MAX);
        now
    }
}

/// How long a member may go without hearing from a leader before it asks the `--join`
/// members whether it is still one.
const ASK_AFTER: Duration = Duration::from_secs(10);

/// Watches for this node's removal: a member that stops hearing from any leader may have been
/// removed while it was away (an agent reaped after its host was drained). It asks the `--join`
/// members by asking to join again: for a member that is a no-op, for a node whose join was
/// lost it is the join (and the promotion, unless `learner`), and for a removed node the answer
/// is that its id is retired. Then a node with an automatic id forgets it (its data stays: the
/// base its kernel maps are merged against) and stops, to join as a new node at its next
/// start; a node with a fixed id stops with the reason. Returns only with that reason.
pub(crate) async fn watch_removal(shared: &NodeShared, join: &str, learner: bool) -> NodeError {
    let addrs = match join_addresses(join) {
        Ok(a) => a,
        Err(e) => return e,
    };
    loop {
        tokio::time::sleep(ASK_AFTER / 5).await;
        let leads = shared.raft.metrics().borrow_watched().state.is_leader();
        if leads || shared.heard.ago() < ASK_AFTER {
            continue;
        }
        let members = match channels(shared, &addrs).await {
            Ok(m) => m,
            Err(e) => return e,
        };
        for (ch, addr) in &members {
            let mut admin = AdminClient::new(ch.clone());
            let answer = admin.add_learner(add_request(shared));
            match tokio::time::timeout(Duration::from_secs(5), answer).await {
                Ok(Ok(_)) => {
                    tracing::warn!(via = %addr, "no leader was heard from and the cluster did not list this node: joined again");
                    if let Err(e) = join_cluster(shared, join, learner).await {
                        return e;
                    }
                    break;
                }
                Ok(Err(s)) => match taken(&s) {
                    Some(Taken::Member) => {
                        tracing::info!(via = %addr, silent = ?shared.heard.ago(), answer = %s.message(), "no leader heard from, but the cluster lists this node");
                        break;
                    }
                    Some(Taken::Retired) => return removed(shared, s.message()),
                    None => {
                        tracing::debug!(via = %addr, reason = %s.message(), "asking whether this node is still a member")
                    }
                },
                Err(_) => {
                    tracing::debug!(via = %addr, "asking whether this node is still a member: no answer")
                }
            }
        }
    }
}

/// The reason a removed node stops; with an automatic id it forgets the id first.
fn removed(shared: &NodeShared, answer: &str) -> NodeError {
    let id = shared.id;
    if !shared.auto_id {
        return NodeError::FailedPrecondition(format!(
            "node {id} is no longer a member of the cluster ({answer}): node ids are never reused; start this node with a new data dir and id"
        ));
    }
    if let Err(e) = crate::identity::forget_id(&shared.data_dir) {
        return e;
    }
    NodeError::FailedPrecondition(format!(
        "node {id} was removed from the cluster while it was away ({answer}): it joins again as a new node, with a new automatic id, at its next start"
    ))
}

fn retryable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_takes_a_list_of_members_and_refuses_an_empty_one() {
        assert_eq!(
            join_addresses("a:1, b:2,,c.svc:3").unwrap(),
            vec!["a:1", "b:2", "c.svc:3"]
        );
        let e = join_addresses(" , ").unwrap_err().to_string();
        assert!(e.contains("names no member"), "{e}");
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let mut b = Backoff::default();
        let waits: Vec<Duration> = (0..8).map(|_| b.next()).collect();
        assert_eq!(waits[0], RETRY_FIRST);
        assert_eq!(waits[1], RETRY_FIRST * 2);
        assert_eq!(*waits.last().unwrap(), RETRY_MAX);
    }
}
