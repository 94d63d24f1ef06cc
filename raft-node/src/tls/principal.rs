//! Who a certificate speaks for: a node of a cluster, or a client with a role. The identity is
//! a URI subject alternative name in SPIFFE form, so that it is independent of addresses:
//!
//! ```text
//! spiffe://raftmap/<cluster>/node/<id>
//! spiffe://raftmap/<cluster>/client/<role>/<name>
//! spiffe://raftmap/<cluster>/enroll/<name>        (may only obtain node certificates)
//! spiffe://raftmap/<cluster>                      (the cluster's CA)
//! ```

use std::fmt;
use std::str::FromStr;

use raftmap_storage::NodeId;

use super::TlsError;

const PREFIX: &str = "spiffe://raftmap/";

/// What a client certificate allows, each role including the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// get, dump, list, watch, status, members.
    Reader,
    /// Also put, delete, compare-and-swap, declare.
    Writer,
    /// Also init, add-learner, promote, remove, map drop.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Writer => "writer",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, TlsError> {
        match s {
            "reader" => Ok(Role::Reader),
            "writer" => Ok(Role::Writer),
            "admin" => Ok(Role::Admin),
            other => Err(TlsError::Identity(format!(
                "unknown role {other:?} (reader, writer or admin)"
            ))),
        }
    }
}

/// The party a certificate names within its cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    /// A raftmap node: it may speak Raft, forward what its clients were allowed, and join.
    Node(NodeId),
    Client {
        role: Role,
        name: String,
    },
    /// A credential new nodes share to obtain their own node certificates from a node that
    /// holds the CA key (an agent DaemonSet's bootstrap Secret); it may do nothing else.
    Enroller {
        name: String,
    },
    /// The cluster's certificate authority.
    Authority,
}

/// A certificate's identity: its cluster and subject.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal {
    pub cluster: String,
    pub subject: Subject,
}

impl Principal {
    pub fn node(cluster: &str, id: NodeId) -> Self {
        Self {
            cluster: cluster.into(),
            subject: Subject::Node(id),
        }
    }

    pub fn client(cluster: &str, role: Role, name: &str) -> Self {
        Self {
            cluster: cluster.into(),
            subject: Subject::Client {
                role,
                name: name.into(),
            },
        }
    }

    pub fn enroller(cluster: &str, name: &str) -> Self {
        Self {
            cluster: cluster.into(),
            subject: Subject::Enroller { name: name.into() },
        }
    }

    pub fn authority(cluster: &str) -> Self {
        Self {
            cluster: cluster.into(),
            subject: Subject::Authority,
        }
    }

    /// The node id, for a node.
    pub fn node_id(&self) -> Option<NodeId> {
        match self.subject {
            Subject::Node(id) => Some(id),
            _ => None,
        }
    }

    /// The URI this identity is written as.
    pub fn uri(&self) -> String {
        match &self.subject {
            Subject::Node(id) => format!("{PREFIX}{}/node/{id}", self.cluster),
            Subject::Client { role, name } => {
                format!("{PREFIX}{}/client/{role}/{name}", self.cluster)
            }
            Subject::Enroller { name } => format!("{PREFIX}{}/enroll/{name}", self.cluster),
            Subject::Authority => format!("{PREFIX}{}", self.cluster),
        }
    }

    /// Parses a URI written by [`Principal::uri`].
    pub fn parse(uri: &str) -> Result<Self, TlsError> {
        let bad =
            |why: &str| TlsError::Identity(format!("{uri:?} is not a raftmap identity: {why}"));
        let rest = uri
            .strip_prefix(PREFIX)
            .ok_or_else(|| bad("it does not start with spiffe://raftmap/"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let cluster = parts[0];
        check_name("cluster", cluster).map_err(|e| bad(&e))?;
        let subject = match parts[1..] {
            [] => Subject::Authority,
            ["node", id] => Subject::Node(
                id.parse::<NodeId>()
                    .ok()
                    .filter(|id| *id > 0)
                    .ok_or_else(|| bad("the node id is not a number of 1 or more"))?,
            ),
            ["client", role, name] => {
                check_name("client name", name).map_err(|e| bad(&e))?;
                Subject::Client {
                    role: role.parse().map_err(|e: TlsError| bad(&e.to_string()))?,
                    name: name.into(),
                }
            }
            ["enroll", name] => {
                check_name("enrollment name", name).map_err(|e| bad(&e))?;
                Subject::Enroller { name: name.into() }
            }
            _ => {
                return Err(bad(
                    "expected .../node/<id>, .../client/<role>/<name> or .../enroll/<name>",
                ))
            }
        };
        Ok(Self {
            cluster: cluster.into(),
            subject,
        })
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.subject {
            Subject::Node(id) => write!(f, "node {id} of cluster {}", self.cluster),
            Subject::Client { role, name } => {
                write!(f, "client {name} ({role}) of cluster {}", self.cluster)
            }
            Subject::Enroller { name } => {
                write!(
                    f,
                    "enrollment credential {name} of cluster {}",
                    self.cluster
                )
            }
            Subject::Authority => write!(f, "the CA of cluster {}", self.cluster),
        }
    }
}

/// Cluster and client names: 1-63 of `a-z 0-9 - _ .`, as Kubernetes names allow.
pub fn check_name(what: &str, s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {s:?} must be 1 to 63 characters of a-z, 0-9, '-', '_' and '.'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_through_their_uri() {
        for p in [
            Principal::node("prod-eu", 7),
            Principal::client("prod-eu", Role::Writer, "lb-controller"),
            Principal::enroller("prod-eu", "agents"),
            Principal::authority("prod-eu"),
        ] {
            assert_eq!(Principal::parse(&p.uri()).unwrap(), p);
        }
        assert_eq!(Principal::node("c1", 3).uri(), "spiffe://raftmap/c1/node/3");
    }

    #[test]
    fn malformed_identities_are_refused_with_the_reason() {
        for (uri, why) in [
            ("spiffe://other/c1/node/3", "does not start"),
            ("spiffe://raftmap/c1/node/0", "node id"),
            ("spiffe://raftmap/c1/node/x", "node id"),
            ("spiffe://raftmap/C1/node/3", "cluster"),
            ("spiffe://raftmap/c1/client/root/ops", "unknown role"),
            ("spiffe://raftmap/c1/client/admin", "expected"),
            ("spiffe://raftmap/c1/node/3/extra", "expected"),
            ("spiffe://raftmap//node/3", "cluster"),
        ] {
            let e = Principal::parse(uri).unwrap_err().to_string();
            assert!(e.contains(why), "{uri}: {e}");
        }
    }

    #[test]
    fn roles_include_the_ones_below() {
        assert!(Role::Admin > Role::Writer && Role::Writer > Role::Reader);
    }
}
