//! Who may call what: one layer in front of every gRPC service, deciding each call from the
//! caller's certificate (established once per connection, `tls/transport.rs`), the method and,
//! on the peer port, the cluster and node ids every peer call carries.
//!
//! | caller                      | may call                                                       |
//! |-----------------------------|----------------------------------------------------------------|
//! | client `reader`             | Kv: Get, Dump, ListMaps, Watch; Admin: Status, Members         |
//! | client `writer`             | the above and Kv.Write (put, delete, CAS, declare)             |
//! | client `admin`              | the above and Admin: Init, AddLearner, Promote, Remove, DropMap|
//! | node, on the peer port      | every Peer call, as itself, if it is a member (or this node has none yet) |
//! | node, on the API port       | AddLearner and Promote of itself (joining), IssueNodeCertificate of itself (renewal), Status, Members |
//! | enrollment credential       | IssueNodeCertificate for a new node id, nothing else           |
//! | member node, forwarding     | what the caller it forwards for may call (`raftmap-forwarded-for`) |
//!
//! Authorization happens on the node a client reached, as in etcd, where members forward
//! proposals after checking their callers: a member's certificate is trusted to vouch for the
//! clients it authorised. Without TLS (`--insecure`, loopback) every caller may call
//! everything; the peer ids are still checked.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use http::HeaderMap;
use raftmap_storage::NodeId;
use tonic::Status;

use crate::shared::NodeShared;
use crate::tls::{Auth, Caller, Principal, Role, Subject};

/// Headers of every peer call: the sender's cluster id, its node id and the receiver's.
pub(crate) const CLUSTER_HEADER: &str = "raftmap-cluster";
pub(crate) const FROM_HEADER: &str = "raftmap-from";
pub(crate) const TO_HEADER: &str = "raftmap-to";
/// On a call a member forwards: the identity (URI) of the caller it authorised.
pub(crate) const FORWARDED_FOR_HEADER: &str = "raftmap-forwarded-for";

/// Which listener a call came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Port {
    Peer,
    Api,
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Only nodes, as themselves.
    Peer,
    Role(Role),
}

/// The method's requirement; `None` for a method raftmap does not serve.
fn need(path: &str) -> Option<Need> {
    let (service, method) = path.strip_prefix("/raftmap.v1.")?.split_once('/')?;
    Some(match (service, method) {
        ("Peer", _) => Need::Peer,
        ("Kv", "Write") => Need::Role(Role::Writer),
        ("Kv", "Get" | "Dump" | "ListMaps" | "Watch") => Need::Role(Role::Reader),
        ("Admin", "Status" | "Members") => Need::Role(Role::Reader),
        (
            "Admin",
            "Init" | "AddLearner" | "Promote" | "Remove" | "DropMap" | "IssueNodeCertificate",
        ) => Need::Role(Role::Admin),
        _ => return None,
    })
}

/// Methods a node's own certificate may call on the API port.
fn node_may(method: &str) -> bool {
    matches!(
        method,
        "/raftmap.v1.Admin/AddLearner"
            | "/raftmap.v1.Admin/Promote"
            | "/raftmap.v1.Admin/IssueNodeCertificate"
            | "/raftmap.v1.Admin/Status"
            | "/raftmap.v1.Admin/Members"
    )
}

/// The one method an enrollment credential may call.
const ENROLL_METHOD: &str = "/raftmap.v1.Admin/IssueNodeCertificate";

/// Who a call was granted to (a request extension for the handlers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Granted {
    /// No TLS: callers are not authenticated.
    Anyone,
    /// A peer call from this node.
    Peer(NodeId),
    /// A client, or a node on the API port, calling for itself.
    Direct(Principal),
    /// A member forwarding for the caller it authorised.
    Forwarded { via: NodeId, caller: Principal },
}

impl Granted {
    /// The identity the call acts for.
    pub(crate) fn principal(&self) -> Option<&Principal> {
        match self {
            Granted::Direct(p) | Granted::Forwarded { caller: p, .. } => Some(p),
            Granted::Anyone | Granted::Peer(_) => None,
        }
    }
}

/// A node's certificate may add and promote only itself.
pub(crate) fn check_self(granted: Option<&Granted>, node_id: NodeId) -> Result<(), Status> {
    match granted.and_then(Granted::principal).map(|p| &p.subject) {
        Some(Subject::Node(id)) if *id != node_id => Err(Status::permission_denied(format!(
            "node {id}'s certificate may add or promote only node {id}, not node {node_id}"
        ))),
        _ => Ok(()),
    }
}

/// What the decision needs to know about this node.
#[derive(Debug, Clone)]
pub(crate) struct Local {
    pub(crate) me: NodeId,
    /// This cluster's id; empty while unknown (a node without TLS before it joins).
    pub(crate) cluster: Arc<str>,
}

/// The decision, before the membership check a peer (or forwarding) call also needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Decision {
    pub(crate) granted: Granted,
    /// This node must be a member (or this node know no membership yet).
    pub(crate) member: Option<NodeId>,
}

fn header<'a>(md: &'a HeaderMap, name: &str) -> Option<&'a str> {
    md.get(name).and_then(|v| v.to_str().ok())
}

fn header_id(md: &HeaderMap, name: &str) -> Result<NodeId, Status> {
    header(md, name)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            Status::invalid_argument(format!("a peer call without a valid {name} header"))
        })
}

/// Decides a call: `Err` is the refusal to send back.
pub(crate) fn decide(
    port: Port,
    path: &str,
    auth: &Auth,
    md: &HeaderMap,
    local: &Local,
) -> Result<Decision, Status> {
    let need = match (port, need(path)) {
        (Port::Peer, Some(Need::Peer)) => Need::Peer,
        (Port::Api, Some(n @ Need::Role(_))) => n,
        _ => {
            return Err(Status::unimplemented(format!(
                "{path} is not served on this port"
            )))
        }
    };
    let principal =
        match auth {
            Auth::Insecure => None,
            Auth::NoCertificate => return Err(Status::unauthenticated(
                "this node requires a client certificate (mutual TLS): give the client --tls-dir \
                 with a certificate from `raftmap certs client`",
            )),
            Auth::Invalid(why) => {
                return Err(Status::unauthenticated(format!(
                    "the client certificate was refused: {why}"
                )))
            }
            Auth::Verified(p) => {
                if !local.cluster.is_empty() && *p.cluster != *local.cluster {
                    return Err(Status::permission_denied(format!(
                        "the certificate is for cluster {}, this is cluster {}",
                        p.cluster, local.cluster
                    )));
                }
                Some(p)
            }
        };
    match need {
        Need::Peer => peer(md, principal, local),
        Need::Role(role) => api(path, role, md, principal, local),
    }
}

fn peer(md: &HeaderMap, principal: Option<&Principal>, local: &Local) -> Result<Decision, Status> {
    let from = header_id(md, FROM_HEADER)?;
    let to = header_id(md, TO_HEADER)?;
    let cluster = header(md, CLUSTER_HEADER).unwrap_or_default();
    if !cluster.is_empty() && !local.cluster.is_empty() && *cluster != *local.cluster {
        tracing::warn!(ours = %local.cluster, theirs = %cluster, from, "refused a peer call from another cluster");
        return Err(Status::permission_denied(format!(
            "the call comes from cluster {cluster}, this is cluster {}",
            local.cluster
        )));
    }
    if to != local.me {
        return Err(Status::permission_denied(format!(
            "the call is meant for node {to}, this is node {} (a reused address?)",
            local.me
        )));
    }
    if from == local.me {
        return Err(Status::permission_denied(format!(
            "the call claims to come from node {from}, which is this node"
        )));
    }
    if let Some(p) = principal {
        match p.subject {
            Subject::Node(id) if id == from => {}
            Subject::Node(id) => {
                return Err(Status::permission_denied(format!(
                    "the certificate is node {id}'s, the call claims to come from node {from}"
                )))
            }
            _ => {
                return Err(Status::permission_denied(format!(
                    "{p} may not speak the peer protocol: only nodes do"
                )))
            }
        }
    }
    let member = principal.map(|_| from);
    Ok(Decision {
        granted: Granted::Peer(from),
        member,
    })
}

fn api(
    path: &str,
    role: Role,
    md: &HeaderMap,
    principal: Option<&Principal>,
    local: &Local,
) -> Result<Decision, Status> {
    let Some(p) = principal else {
        return Ok(Decision {
            granted: Granted::Anyone,
            member: None,
        });
    };
    let allowed = |who: &Principal| -> Result<(), Status> {
        match &who.subject {
            Subject::Client { role: has, .. } if *has >= role => Ok(()),
            Subject::Client { .. } => Err(Status::permission_denied(format!(
                "{who} may not call {path}: it needs the {role} role"
            ))),
            Subject::Node(_) if node_may(path) => Ok(()),
            Subject::Node(_) => Err(Status::permission_denied(format!(
                "a node's certificate may join and read status, not call {path} (it needs the {role} role)"
            ))),
            Subject::Enroller { .. } if path == ENROLL_METHOD => Ok(()),
            Subject::Enroller { .. } => Err(Status::permission_denied(format!(
                "{who} may only obtain node certificates, not call {path}"
            ))),
            Subject::Authority => Err(Status::permission_denied("a CA certificate is not a caller")),
        }
    };
    match (&p.subject, header(md, FORWARDED_FOR_HEADER)) {
        (Subject::Node(via), Some(uri)) => {
            let caller = Principal::parse(uri)
                .map_err(|e| Status::invalid_argument(format!("{FORWARDED_FOR_HEADER}: {e}")))?;
            if caller.cluster != p.cluster {
                return Err(Status::permission_denied(format!(
                    "node {via} forwards for {caller}, which is not of cluster {}",
                    p.cluster
                )));
            }
            allowed(&caller)?;
            let _ = local;
            Ok(Decision {
                granted: Granted::Forwarded { via: *via, caller },
                member: Some(*via),
            })
        }
        _ => {
            allowed(p)?;
            Ok(Decision {
                granted: Granted::Direct(p.clone()),
                member: None,
            })
        }
    }
}

/// The layer: decides every call before its service sees it.
#[derive(Debug, Clone)]
pub(crate) struct AuthzLayer {
    pub(crate) shared: Arc<NodeShared>,
    pub(crate) port: Port,
}

impl<S> tower::Layer<S> for AuthzLayer {
    type Service = Authz<S>;
    fn layer(&self, inner: S) -> Authz<S> {
        Authz {
            inner,
            shared: self.shared.clone(),
            port: self.port,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Authz<S> {
    inner: S,
    shared: Arc<NodeShared>,
    port: Port,
}

impl<S, B> tower::Service<http::Request<B>> for Authz<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The clone that was made ready is the one to call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        let port = self.port;
        Box::pin(async move {
            let caller = req.extensions().get::<Caller>().cloned();
            // Every connection comes with its caller (`tls::incoming`); should one not, it
            // counts as unauthenticated when this node runs TLS: closed, not open.
            let unknown = match shared.security.is_tls() {
                true => Auth::NoCertificate,
                false => Auth::Insecure,
            };
            let auth = caller.as_ref().map_or(unknown, |c| (*c.auth).clone());
            let local = Local {
                me: shared.id,
                cluster: shared.proposer.pool.cluster(),
            };
            let decision = decide(port, req.uri().path(), &auth, req.headers(), &local);
            let decision = match decision {
                Ok(d) => match d.member {
                    Some(id) => crate::service::peer::known_sender(&shared, id)
                        .await
                        .map(|()| d)
                        .map_err(Status::permission_denied),
                    None => Ok(d),
                },
                Err(e) => Err(e),
            };
            match decision {
                Ok(d) => {
                    if !matches!(d.granted, Granted::Forwarded { .. }) {
                        req.headers_mut().remove(FORWARDED_FOR_HEADER);
                    }
                    req.extensions_mut().insert(d.granted);
                    inner.call(req).await
                }
                Err(status) => {
                    shared.metrics.refused_calls.inc();
                    let from = caller
                        .and_then(|c| c.addr)
                        .map(|a| a.to_string())
                        .unwrap_or_default();
                    tracing::info!(path = %req.uri().path(), from = %from, code = ?status.code(), reason = %status.message(), "refused a call");
                    Ok(status.into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests;
