//! Membership that runs itself, on the leader, in Consul autopilot's order: nodes are added
//! by joining (and voters promoted once caught up, `join.rs`); this removes the ones that are
//! gone.
//!
//! - A learner the leader has not heard from for `reap_learners_after` (30 minutes by
//!   default: an agent whose host was drained or deleted) is removed.
//! - A voter is removed only while there are more voters than the cluster is configured for
//!   (`--bootstrap-expect`), which happens when a replacement with a new id was promoted: the
//!   silent one is removed after `reap_voters_after`. Never below the configured count.
//! - A member that is silent while a newer member answers at its address (a pod that came
//!   back with a wiped data dir, hence a new id) has been replaced: it goes after
//!   [`REPLACED_AFTER`], under the same voter rule.
//!
//! Silence is measured from the last heartbeat the member acknowledged, or from when this
//! node became leader if it has acknowledged none since: a new leader never removes a member
//! for silence it did not see. Nothing is ever removed because a node stopped (SIGTERM).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use raftmap_storage::NodeId;
use tokio::time::Instant;

use crate::shared::NodeShared;

/// How long a member that another one has taken the address of may stay silent.
pub(crate) const REPLACED_AFTER: Duration = Duration::from_secs(10);
/// How often the leader looks.
const EVERY: Duration = Duration::from_secs(1);

/// How long a member may stay silent before it is removed, as a flag or in the config file:
/// `30m`, `90s`, `1h 30m`; `0` turns that removal off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Silence(pub Duration);

impl Silence {
    /// The limit, or `None` when the removal is off.
    pub(crate) fn limit(self) -> Option<Duration> {
        (!self.0.is_zero()).then_some(self.0)
    }
}

impl std::str::FromStr for Silence {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim() == "0" {
            return Ok(Silence(Duration::ZERO));
        }
        humantime::parse_duration(s)
            .map(Silence)
            .map_err(|e| format!("{s:?} is not a duration such as 30m, 90s or 0 (off): {e}"))
    }
}

impl std::fmt::Display for Silence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> serde::Deserialize<'de> for Silence {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// When members are removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Policy {
    /// Silence after which a learner is removed (`None`: never).
    pub(crate) learners_after: Option<Duration>,
    /// The voters the cluster is configured for; without it no voter is removed.
    pub(crate) voters: Option<usize>,
    /// Silence after which a surplus voter is removed (`None`: only a replaced one is).
    pub(crate) voters_after: Option<Duration>,
}

/// A member as the leader sees it.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub(crate) id: NodeId,
    pub(crate) voter: bool,
    pub(crate) raft_addr: String,
    /// Since the last acknowledged heartbeat (or since this node leads).
    pub(crate) silent: Duration,
}

/// The member to remove next, and why; one at a time, the most silent first. `members` are all
/// of them, the leader included.
pub(crate) fn next_removal(members: &[Seen], policy: &Policy) -> Option<(NodeId, String)> {
    let voters = members.iter().filter(|m| m.voter).count();
    let replaced = |m: &Seen| {
        m.silent >= REPLACED_AFTER
            && members.iter().any(|o| {
                o.id != m.id && o.raft_addr == m.raft_addr && o.silent < REPLACED_AFTER
                    // A voter's replacement must be a voter already: it is removed after the
                    // replacement is promoted, never before.
                    && (o.voter || !m.voter)
            })
    };
    let mut candidates: Vec<(&Seen, String)> = members
        .iter()
        .filter_map(|m| {
            let silent = humantime::format_duration(round(m.silent));
            if m.voter {
                let wanted = policy.voters?;
                if voters <= wanted {
                    return None;
                }
                if replaced(m) {
                    return Some((m, format!("voter replaced at {}: silent for {silent}, another voter answers there, and {voters} voters are more than the {wanted} configured", m.raft_addr)));
                }
                (m.silent >= policy.voters_after?).then(|| {
                    (m, format!("voter silent for {silent}, and {voters} voters are more than the {wanted} configured"))
                })
            } else if replaced(m) {
                Some((
                    m,
                    format!(
                        "learner replaced at {}: silent for {silent} while another member answers there",
                        m.raft_addr
                    ),
                ))
            } else {
                let after = policy.learners_after?;
                (m.silent >= after).then(|| (m, format!("learner silent for {silent} (the limit is {})", humantime::format_duration(after))))
            }
        })
        .collect();
    candidates.sort_by_key(|(m, _)| std::cmp::Reverse(m.silent));
    candidates.into_iter().next().map(|(m, why)| (m.id, why))
}

fn round(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

/// Runs on every node; acts while it leads.
pub(crate) async fn run(shared: Arc<NodeShared>, policy: Policy) {
    // This leadership's term, when it began, and when each member was first seen in it (a
    // member that joined later has acknowledged nothing yet: its silence counts from then).
    let mut term = None;
    let mut first_seen: BTreeMap<NodeId, Instant> = BTreeMap::new();
    loop {
        tokio::time::sleep(EVERY).await;
        let seen = {
            let metrics = shared.raft.metrics();
            let m = metrics.borrow_watched();
            if !m.state.is_leader() {
                term = None;
                continue;
            }
            let now = Instant::now();
            if term != Some(m.current_term) {
                term = Some(m.current_term);
                first_seen.clear();
            }
            // Only from a settled configuration: a change under way decides the next one.
            let membership = m.membership_config.membership();
            let joint = membership.get_joint_config();
            if joint.len() != 1
                || m.membership_config.log_id() != m.committed_membership_config.log_id()
            {
                continue;
            }
            let heard: BTreeMap<NodeId, Duration> = m
                .heartbeat
                .iter()
                .flatten()
                .filter_map(|(id, at)| Some((*id, openraft::Instant::elapsed(&**at.as_ref()?))))
                .collect();
            let voters = &joint[0];
            first_seen.retain(|id, _| membership.get_node(id).is_some());
            membership
                .nodes()
                .map(|(id, info)| {
                    let since = *first_seen.entry(*id).or_insert(now);
                    let unheard = now.saturating_duration_since(since);
                    Seen {
                        id: *id,
                        voter: voters.contains(id),
                        raft_addr: info.raft_addr.clone(),
                        // This node counts among the voters, never silent.
                        silent: match *id == shared.id {
                            true => Duration::ZERO,
                            false => heard.get(id).map_or(unheard, |ago| (*ago).min(unheard)),
                        },
                    }
                })
                .collect::<Vec<_>>()
        };
        let Some((id, why)) = next_removal(&seen, &policy) else {
            continue;
        };
        let voter = seen.iter().any(|m| m.id == id && m.voter);
        let name = shared.view.cluster().names.get(&id).cloned();
        tracing::warn!(node = id, name = name.as_deref().unwrap_or(""), reason = %why, "removing a member that is gone");
        let floor = if voter { policy.voters } else { None };
        match crate::service::remove_member(&shared, id, floor).await {
            Ok(()) => {
                shared.metrics.autopilot_removals.inc();
                tracing::warn!(node = id, "removed; its id is retired");
            }
            Err(e) => tracing::warn!(node = id, error = %e, "could not remove it yet"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn seen(id: NodeId, voter: bool, addr: &str, silent_s: u64) -> Seen {
        Seen {
            id,
            voter,
            raft_addr: addr.into(),
            silent: Duration::from_secs(silent_s),
        }
    }

    fn policy(voters: Option<usize>) -> Policy {
        Policy {
            learners_after: Some(30 * MIN),
            voters,
            voters_after: Some(MIN),
        }
    }

    #[test]
    fn silences_read_as_durations_and_zero_turns_them_off() {
        assert_eq!("30m".parse(), Ok(Silence(30 * MIN)));
        assert_eq!("1h 30m".parse(), Ok(Silence(90 * MIN)));
        assert_eq!("0".parse::<Silence>().unwrap().limit(), None);
        let e = "soon".parse::<Silence>().unwrap_err();
        assert!(e.contains("\"soon\"") && e.contains("30m"), "{e}");
        assert_eq!(Silence(90 * MIN).to_string(), "1h 30m");
    }

    #[test]
    fn a_learner_is_reaped_after_its_limit_and_not_before() {
        let mut m = vec![
            seen(1, true, "v1", 0),
            seen(2, true, "v2", 0),
            seen(3, true, "v3", 0),
            seen(10, false, "a", 29 * 60),
        ];
        assert_eq!(next_removal(&m, &policy(Some(3))), None);
        m[3].silent = 30 * MIN;
        let (id, why) = next_removal(&m, &policy(Some(3))).unwrap();
        assert_eq!(id, 10);
        assert!(why.contains("30m"), "{why}");
        let off = Policy {
            learners_after: None,
            ..policy(Some(3))
        };
        assert_eq!(next_removal(&m, &off), None);
    }

    #[test]
    fn voters_are_never_removed_down_to_fewer_than_configured() {
        // Three voters configured, the leader (1) plus two: one silent for an hour stays.
        let m = vec![
            seen(1, true, "v1", 0),
            seen(2, true, "v2", 3600),
            seen(3, true, "v3", 0),
        ];
        assert_eq!(next_removal(&m, &policy(Some(3))), None);
        // Without a configured count, no voter is ever removed.
        let m = vec![
            seen(1, true, "v1", 0),
            seen(2, true, "v2", 3600),
            seen(3, true, "v3", 0),
            seen(4, true, "v4", 0),
        ];
        assert_eq!(next_removal(&m, &policy(None)), None);
        // A surplus voter goes once silent long enough; the most silent first.
        assert_eq!(next_removal(&m, &policy(Some(3))).unwrap().0, 2);
        let m = vec![
            seen(1, true, "v1", 0),
            seen(2, true, "v2", 30),
            seen(3, true, "v3", 0),
            seen(4, true, "v4", 0),
        ];
        assert_eq!(next_removal(&m, &policy(Some(3))), None);
    }

    #[test]
    fn a_replaced_voter_goes_after_its_replacement_is_promoted() {
        // voter-2 came back with a wiped disk: new id 9 at the same address, still a learner.
        let mut m = vec![
            seen(1, true, "voter-1:7400", 0),
            seen(2, true, "voter-2:7400", 20),
            seen(3, true, "voter-3:7400", 0),
            seen(9, false, "voter-2:7400", 0),
        ];
        assert_eq!(next_removal(&m, &policy(Some(3))), None, "not yet promoted");
        m[3].voter = true;
        let (id, why) = next_removal(&m, &policy(Some(3))).unwrap();
        assert_eq!(id, 2);
        assert!(why.contains("replaced"), "{why}");
        // Silent for less than REPLACED_AFTER: a restart, not a replacement.
        m[1].silent = Duration::from_secs(5);
        assert_eq!(next_removal(&m, &policy(Some(3))), None);
    }

    #[test]
    fn a_replaced_learner_goes_long_before_its_limit() {
        let m = vec![
            seen(1, true, "v1", 0),
            seen(2, true, "v2", 0),
            seen(3, true, "v3", 0),
            seen(10, false, "10.0.0.5:7400", 11),
            seen(11, false, "10.0.0.5:7400", 0),
        ];
        assert_eq!(next_removal(&m, &policy(Some(3))).unwrap().0, 10);
        // Both silent: neither answers there, so neither replaced the other.
        let m = vec![
            seen(10, false, "10.0.0.5:7400", 11),
            seen(11, false, "10.0.0.5:7400", 12),
        ];
        assert_eq!(next_removal(&m, &policy(Some(3))), None);
    }
}
