//! Membership changes under load, as an operator makes them: a fresh node joins as a learner,
//! is promoted, then an old voter is removed; an answer that was lost is settled by asking.

use std::time::{Duration, Instant};

use raftmap_node::proto as pb;
use rand::Rng;

use super::{Nemesis, NodeId};
use crate::error::RunError;

impl Nemesis<'_> {
    /// Waits until node `id` reports ready, ending the other faults on time meanwhile; the last
    /// thing it said when it did not within `within`.
    pub(super) async fn wait_ready(&mut self, id: NodeId, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            // Not listening yet is not an answer either: the node is still starting.
            match self.cluster.client(id).await {
                Ok(client) => {
                    let status = async move {
                        tokio::time::timeout(Duration::from_millis(500), client.status()).await
                    };
                    match self.meanwhile(status).await.map_err(|e| e.to_string())? {
                        Ok(Ok(s)) if s.ready => return Ok(()),
                        Ok(Ok(s)) => last = format!("not ready: {}", s.not_ready_reason),
                        Ok(Err(e)) => last = e.to_string(),
                        Err(_) => last = "no answer within 500 ms".into(),
                    }
                }
                Err(e) => last = e.to_string(),
            }
            let pause = tokio::time::sleep(Duration::from_millis(50));
            self.meanwhile(pause).await.map_err(|e| e.to_string())?;
        }
        Err(format!(
            "node {id} was not ready within {within:?} ({last})"
        ))
    }

    /// An admin call through node `via`, bounded in time, ending the other faults on time
    /// meanwhile; the error as text.
    pub(super) async fn admin<F, Fut>(
        &mut self,
        via: NodeId,
        within: Duration,
        call: F,
    ) -> Result<(), String>
    where
        F: FnOnce(pb::admin_client::AdminClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<(), tonic::Status>>,
    {
        let client = self.cluster.client(via).await.map_err(|e| e.to_string())?;
        let work = tokio::time::timeout(within, call(client.admin()));
        match self.meanwhile(work).await.map_err(|e| e.to_string())? {
            Ok(Ok(())) => Ok(()),
            Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), first_line(s.message()))),
            Err(_) => Err(format!("no answer within {within:?}")),
        }
    }

    /// Whether the cluster's leader counts `id` among its members (voter or learner). Gone is
    /// final once two answers in a row from the same leader say so; still there is only the
    /// last answer when `within` has passed (a change in flight lists the node until its
    /// last step commits). `None`: no leader answered.
    pub(super) async fn is_member(&self, id: NodeId, within: Duration) -> Option<bool> {
        let deadline = Instant::now() + within;
        let mut last: Option<(NodeId, bool)> = None;
        while Instant::now() < deadline {
            for via in self.free_nodes() {
                let Some(r) = self.members_seen_by(via).await else {
                    continue;
                };
                if !r.has_leader {
                    continue;
                }
                let Some(l) = self.members_seen_by(r.leader_id).await else {
                    continue;
                };
                if l.has_leader && l.leader_id == r.leader_id {
                    let now = (l.leader_id, l.members.iter().any(|m| m.node_id == id));
                    if last == Some(now) && !now.1 {
                        return Some(false);
                    }
                    last = Some(now);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        last.map(|(_, member)| member)
    }

    /// Node `via`'s own view of the membership, if it answers within a second.
    pub(super) async fn members_seen_by(&self, via: NodeId) -> Option<pb::MembersResponse> {
        let client = self.cluster.client(via).await.ok()?;
        let mut admin = client.admin();
        let call = admin.members(pb::MembersRequest {});
        match tokio::time::timeout(Duration::from_secs(1), call).await {
            Ok(Ok(r)) => Some(r.into_inner()),
            _ => None,
        }
    }

    /// Replaces a voter, as an operator would: a fresh node joins as a learner, is promoted
    /// once ready, and only then is a voter that is not under another fault removed, so the
    /// number of voters never wears down. Returns what was done and, if the cluster refused a
    /// step or did not answer in time, why.
    pub(super) async fn change_membership(&mut self) -> Result<(String, Option<String>), RunError> {
        let within = Duration::from_secs(8);
        let id = self.next_id;
        self.next_id += 1;
        let args = self.setup.prepare(id)?;
        self.cluster.set_node_args(id, args);
        // Join through a member that is not killed or paused right now.
        let free = self.free_nodes();
        let ids = self.members.ids();
        let via = free.first().copied().unwrap_or(ids[0]);
        self.cluster.spawn(id, Some(via), true)?;
        let added = format!("membership add n{id}");
        if let Err(e) = self.wait_ready(id, within).await {
            // A node that could not join is stopped and forgotten.
            self.cluster.kill(id)?;
            self.setup.removed(id);
            return Ok((added, Some(first_line(&e))));
        }
        let api = self.cluster.node(id)?.api_addr.clone();
        self.setup.joined(id, &api);
        // Even a learner takes client requests (forwarded): it is a member now.
        self.members.add(id, api);
        let promoted = self
            .admin(via, within, |mut a| async move {
                a.promote(pb::PromoteRequest {
                    node_id: id,
                    max_lag: 1000,
                })
                .await
                .map(|_| ())
            })
            .await;
        if let Err(e) = promoted {
            // It stays a learner; no voter is taken out for it.
            return Ok((format!("{added}, promote"), Some(e)));
        }
        let candidates: Vec<NodeId> = self
            .free_nodes()
            .into_iter()
            .filter(|&n| n != id && n != via)
            .collect();
        if candidates.is_empty() {
            return Ok((format!("{added} (no voter free to replace)"), None));
        }
        let victim = candidates[self.rng.gen_range(0..candidates.len())];
        let what = format!("membership replace n{victim} with n{id}");
        let removed = self
            .admin(via, within, |mut a| async move {
                a.remove(pb::RemoveRequest {
                    node_id: victim,
                    force: false,
                })
                .await
                .map(|_| ())
            })
            .await;
        match removed {
            Ok(()) => {
                self.forget(victim)?;
                Ok((what, None))
            }
            // Unanswered or refused: the removal may still have been committed (a lost
            // answer, a leader that changed after appending it). Ask the leader.
            Err(e) => match self.is_member(victim, Duration::from_secs(3)).await {
                Some(false) => {
                    self.forget(victim)?;
                    Ok((format!("{what} ({e}; found removed)"), None))
                }
                _ => {
                    self.unsure.push(victim);
                    Ok((what, Some(e)))
                }
            },
        }
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_string()
}
