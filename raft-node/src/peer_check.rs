//! Checks of what a peer sends, made before openraft sees it.
//!
//! openraft trusts its peers: a message that no correct cluster could produce (a snapshot
//! whose last log id is newer than the vote that sends it, entries out of order) trips an
//! assertion inside its core and stops it. Every peer message is checked here first, and one
//! that fails is refused with INVALID_ARGUMENT naming the problem; nothing reaches the log or
//! the state machine. The sender a message names must be the node the call is from (its
//! headers, proven by its certificate with TLS: `service/authz/`), not this node, and not
//! a node id that was removed and retired.

use raftmap_storage::{Entry, LogId, NodeId, SnapshotMeta, Vote};

/// What a node knows that the checks need.
#[derive(Debug, Clone, Default)]
pub(crate) struct PeerContext {
    pub(crate) me: NodeId,
    /// The node the call came from, as its headers (and with TLS its certificate) say.
    pub(crate) sender: Option<NodeId>,
    /// Node ids removed from the cluster; they never speak again.
    pub(crate) retired: Vec<NodeId>,
    /// The last log id this node knows is committed.
    pub(crate) committed: Option<LogId>,
}

/// Why a peer message was refused.
pub(crate) type Refusal = String;

fn check_sender(ctx: &PeerContext, what: &str, id: NodeId) -> Result<(), Refusal> {
    if let Some(sender) = ctx.sender.filter(|s| *s != id) {
        return Err(format!(
            "{what} claims to come from node {id}, the call is node {sender}'s"
        ));
    }
    if id == ctx.me {
        return Err(format!(
            "{what} claims to come from node {id}, which is this node"
        ));
    }
    if ctx.retired.contains(&id) {
        return Err(format!(
            "{what} comes from node {id}, which was removed from the cluster"
        ));
    }
    Ok(())
}

/// A log id can only come from a leader whose vote is at most `vote`.
fn check_log_id(what: &str, log_id: Option<&LogId>, vote: &Vote) -> Result<(), Refusal> {
    match log_id {
        Some(l) if l.leader_id > vote.leader_id => Err(format!(
            "{what} {}-{} is newer than the sender's vote (term {}, node {})",
            l.leader_id.term, l.index, vote.leader_id.term, vote.leader_id.node_id
        )),
        _ => Ok(()),
    }
}

/// Vote and PreVote requests.
pub(crate) fn check_vote(
    ctx: &PeerContext,
    vote: &Vote,
    last_log_id: Option<&LogId>,
) -> Result<(), Refusal> {
    check_sender(ctx, "a vote request", vote.leader_id.node_id)?;
    check_log_id("the candidate's last log id", last_log_id, vote)
}

/// A leader handing its leadership on: the sender is the leader, and the log it expects the
/// next leader to hold is no newer than its vote.
pub(crate) fn check_transfer(
    ctx: &PeerContext,
    vote: &Vote,
    last_log_id: Option<&LogId>,
) -> Result<(), Refusal> {
    check_sender(ctx, "a leadership transfer", vote.leader_id.node_id)?;
    check_log_id("the transfer's last log id", last_log_id, vote)
}

/// AppendEntries: entries contiguous after `prev_log_id`, in log order, none newer than the
/// leader's vote, each payload within the log entry limits.
pub(crate) fn check_append(
    ctx: &PeerContext,
    vote: &Vote,
    prev_log_id: Option<&LogId>,
    entries: &[Entry],
    leader_commit: Option<&LogId>,
) -> Result<(), Refusal> {
    check_sender(ctx, "an append", vote.leader_id.node_id)?;
    check_log_id("the previous log id", prev_log_id, vote)?;
    check_log_id("the leader's commit", leader_commit, vote)?;
    let mut prev = prev_log_id.copied();
    for e in entries {
        let expected = prev.map_or(0, |p| p.index + 1);
        if e.log_id.index != expected {
            return Err(format!(
                "append entries are not contiguous: entry {} where {expected} was due",
                e.log_id.index
            ));
        }
        if prev.is_some_and(|p| p.leader_id > e.log_id.leader_id) {
            return Err(format!(
                "append entry {} has an older term than the entry before it",
                e.log_id.index
            ));
        }
        check_log_id("an appended entry", Some(&e.log_id), vote)?;
        if let openraft::EntryPayload::Normal(p) = &e.payload {
            p.check_size()
                .map_err(|err| format!("append entry {}: {err}", e.log_id.index))?;
        }
        prev = Some(e.log_id);
    }
    Ok(())
}

/// The header of an InstallSnapshot stream.
pub(crate) fn check_snapshot_header(
    ctx: &PeerContext,
    vote: &Vote,
    meta: &SnapshotMeta,
) -> Result<(), Refusal> {
    check_sender(ctx, "a snapshot", vote.leader_id.node_id)?;
    let Some(last) = meta.last_log_id else {
        return Err("a snapshot that ends at no log id".into());
    };
    check_log_id("the snapshot's last log id", Some(&last), vote)?;
    if let Some(m) = meta.last_membership.log_id() {
        if m > &last {
            return Err(format!(
                "the snapshot's membership ({}-{}) is newer than its last log id ({}-{})",
                m.leader_id.term, m.index, last.leader_id.term, last.index
            ));
        }
    }
    // Newer than what this node committed, but not further along the log: it contradicts
    // committed entries.
    if let Some(c) = ctx.committed {
        if last > c && last.index <= c.index {
            return Err(format!(
                "the snapshot ends at {}-{}, which contradicts this node's committed log at {}-{}",
                last.leader_id.term, last.index, c.leader_id.term, c.index
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::vote::leader_id_adv::LeaderId;
    use raftmap_storage::{ClientBatch, Op, Proposal, Source, StoredMembership};

    fn vote(term: u64, node: NodeId) -> Vote {
        Vote::new(term, node)
    }

    fn log_id(term: u64, node: NodeId, index: u64) -> LogId {
        LogId::new(
            LeaderId {
                term,
                node_id: node,
            },
            index,
        )
    }

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: log_id(term, 1, index),
            payload: openraft::EntryPayload::Blank,
        }
    }

    fn ctx() -> PeerContext {
        PeerContext {
            me: 2,
            sender: None,
            retired: vec![9],
            committed: Some(log_id(3, 1, 100)),
        }
    }

    #[test]
    fn a_message_must_name_the_node_the_call_comes_from() {
        let from_3 = PeerContext {
            sender: Some(3),
            ..ctx()
        };
        let vote = Vote::new(4, 1);
        let e = check_vote(&from_3, &vote, None).unwrap_err();
        assert!(
            e.contains("claims to come from node 1, the call is node 3's"),
            "{e}"
        );
        assert!(check_vote(&from_3, &Vote::new(4, 3), None).is_ok());
    }

    fn meta(last: LogId) -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: Some(last),
            last_membership: StoredMembership::default(),
        }
    }

    #[test]
    fn a_snapshot_newer_than_its_vote_is_refused() {
        // Vote term T+1, last log id term T+5: openraft would stop on its assertion.
        let e = check_snapshot_header(&ctx(), &vote(4, 1), &meta(log_id(8, 1, 200))).unwrap_err();
        assert!(e.contains("newer than the sender's vote"), "{e}");
        check_snapshot_header(&ctx(), &vote(8, 1), &meta(log_id(8, 1, 200))).unwrap();
    }

    #[test]
    fn a_snapshot_that_contradicts_the_committed_log_is_refused() {
        let e = check_snapshot_header(&ctx(), &vote(5, 1), &meta(log_id(5, 1, 90))).unwrap_err();
        assert!(e.contains("contradicts"), "{e}");
    }

    #[test]
    fn messages_from_this_node_or_a_retired_one_are_refused() {
        let e = check_vote(&ctx(), &vote(9, 2), None).unwrap_err();
        assert!(e.contains("this node"), "{e}");
        let e = check_append(&ctx(), &vote(9, 9), None, &[], None).unwrap_err();
        assert!(e.contains("removed"), "{e}");
        check_vote(&ctx(), &vote(9, 3), Some(&log_id(9, 3, 5))).unwrap();
        let e = check_vote(&ctx(), &vote(9, 3), Some(&log_id(10, 3, 5))).unwrap_err();
        assert!(e.contains("newer than the sender's vote"), "{e}");
    }

    #[test]
    fn appends_out_of_order_or_oversized_are_refused() {
        let prev = log_id(3, 1, 10);
        check_append(
            &ctx(),
            &vote(3, 1),
            Some(&prev),
            &[entry(3, 11), entry(3, 12)],
            None,
        )
        .unwrap();
        let e = check_append(&ctx(), &vote(3, 1), Some(&prev), &[entry(3, 12)], None).unwrap_err();
        assert!(e.contains("not contiguous"), "{e}");
        let e = check_append(&ctx(), &vote(3, 1), Some(&prev), &[entry(4, 11)], None).unwrap_err();
        assert!(e.contains("newer than the sender's vote"), "{e}");
        let e = check_append(
            &ctx(),
            &vote(3, 1),
            Some(&log_id(3, 1, 10)),
            &[entry(2, 11)],
            None,
        )
        .unwrap_err();
        assert!(e.contains("older term"), "{e}");
        let huge = Proposal {
            batches: vec![ClientBatch {
                origin: 1,
                seq: 1,
                source: Source::Api,
                ops: (0..raftmap_storage::MAX_BATCH_OPS + 1)
                    .map(|i| Op::Delete {
                        map: "m".into(),
                        key: i.to_be_bytes().to_vec(),
                    })
                    .collect(),
            }],
            admin: vec![],
        };
        let e = check_append(
            &ctx(),
            &vote(3, 1),
            Some(&prev),
            &[Entry {
                log_id: log_id(3, 1, 11),
                payload: openraft::EntryPayload::Normal(huge),
            }],
            None,
        )
        .unwrap_err();
        assert!(e.contains("too large"), "{e}");
    }
}
