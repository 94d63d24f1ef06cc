//! Node certificates a node obtains for itself, so that nodes with automatic ids (a DaemonSet,
//! a StatefulSet whose volumes come and go) need no certificate made for them in advance:
//!
//! - `--ca-dir DIR` (the voters): the cluster CA's certificate and key; the node issues its own
//!   certificate and signs those of new nodes (`Admin/IssueNodeCertificate`).
//! - `--enroll-dir DIR` (the agents): an enrollment credential (`raftmap certs enroll`) shared by
//!   every new node; the node sends a signing request for its id to the `--join` members, and
//!   one that holds the CA key signs it. As kubelet's TLS bootstrap and Consul's auto-encrypt,
//!   the private key never leaves the node.
//!
//! Either way the node keeps its identity in `<data dir>/tls` (`ca.crt`, `tls.crt`, `tls.key`),
//! renews its certificate when less than a third of its life is left, and copies the trusted
//! CAs again whenever the source's `ca.crt` changes (a CA rotation), so the running node's
//! reload takes both up.

use std::path::{Path, PathBuf};
use std::time::Duration;

use raftmap_proto::admin_client::AdminClient;
use raftmap_storage::NodeId;

use crate::error::{NodeError, Result};
use crate::join::{join_addresses, Backoff};
use crate::shared::NodeShared;
use crate::tls::issue::{self, Issued, Validity, NODE_CERT_DAYS};
use crate::tls::{Expect, Principal, Security, Subject, CA_FILE, CERT_FILE};

/// Where a provisioned identity lives, inside the data dir.
pub(crate) const TLS_SUBDIR: &str = "tls";
/// How often a provisioned identity is looked at for renewal and CA changes.
const CHECK_EVERY: Duration = Duration::from_secs(30);

/// Where this node's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Provision {
    /// Issued here, with the CA key in this directory.
    Ca(PathBuf),
    /// Signed by a member that holds the CA key, asked with the credential in this directory.
    Enroll(PathBuf),
}

impl Provision {
    /// The directory whose `ca.crt` the node trusts.
    fn source(&self) -> &Path {
        match self {
            Provision::Ca(d) | Provision::Enroll(d) => d,
        }
    }

    /// The identity directory a provisioned node uses.
    pub(crate) fn tls_dir(data_dir: &Path) -> PathBuf {
        data_dir.join(TLS_SUBDIR)
    }

    /// The id named by the usable node certificate already in `tls_dir`, if any.
    pub(crate) fn existing_id(tls_dir: &Path) -> Option<NodeId> {
        Security::from_dir(tls_dir).ok()?.identity()?.node_id()
    }

    /// Makes sure `tls_dir` holds a usable certificate of node `id`: keeps one that is there,
    /// or obtains one (with `Enroll`, from the `join` members, waiting for as long as it takes).
    pub(crate) async fn ensure(
        &self,
        tls_dir: &Path,
        id: NodeId,
        join: Option<&str>,
    ) -> Result<()> {
        if Self::existing_id(tls_dir) == Some(id) {
            return self.sync_trust(tls_dir);
        }
        let issued = match self {
            Provision::Ca(ca) => issue_here(ca, id)?,
            Provision::Enroll(dir) => {
                let join = join.ok_or_else(|| {
                    NodeError::BadRequest(
                        "--enroll-dir needs --join: the members that sign node certificates".into(),
                    )
                })?;
                let credential = Security::from_dir(dir)?;
                match credential.identity().map(|p| p.subject) {
                    Some(Subject::Enroller { .. }) => {}
                    other => {
                        return Err(NodeError::BadRequest(format!(
                            "{} does not hold an enrollment credential ({}): make one with `raftmap certs enroll`",
                            dir.display(),
                            other.map_or("no certificate".into(), |s| format!("{s:?}"))
                        )))
                    }
                }
                request_signature(&credential, join, id).await?
            }
        };
        self.write(tls_dir, &issued)?;
        tracing::info!(node = id, dir = %tls_dir.display(), "obtained this node's certificate");
        Ok(())
    }

    fn write(&self, tls_dir: &Path, issued: &Issued) -> Result<()> {
        let trust = read(&self.source().join(CA_FILE))?;
        issue::write_identity(tls_dir, &trust, issued, true)?;
        Ok(())
    }

    /// Copies the source's `ca.crt` when it changed (CAs rotated in or out).
    fn sync_trust(&self, tls_dir: &Path) -> Result<()> {
        let trust = read(&self.source().join(CA_FILE))?;
        if read(&tls_dir.join(CA_FILE)).ok().as_deref() != Some(trust.as_str()) {
            issue::write_file(&tls_dir.join(CA_FILE), &trust, false, true)?;
            tracing::info!(from = %self.source().display(), "the trusted CAs changed; copied them");
        }
        Ok(())
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| NodeError::BadRequest(format!("cannot read {}: {e}", path.display())))
}

fn issue_here(ca: &Path, id: NodeId) -> Result<Issued> {
    let (_, _, cluster) = issue::read_ca(ca)?;
    Ok(issue::issue(
        ca,
        &Principal::node(&cluster, id),
        Validity::days(NODE_CERT_DAYS),
        &[],
        &[],
    )?)
}

/// Asks the `join` members in turn to sign a certificate of node `id`, connecting as
/// `credential`, until one does. A refusal of the id itself (taken) is returned at once.
async fn request_signature(credential: &Security, join: &str, id: NodeId) -> Result<Issued> {
    let cluster = credential.identity().map(|p| p.cluster).unwrap_or_default();
    let (csr_pem, key_pem) = issue::request(&Principal::node(&cluster, id))?;
    let addrs = join_addresses(join)?;
    let mut backoff = Backoff::default();
    loop {
        let mut why = Vec::new();
        for addr in &addrs {
            let req = raftmap_proto::IssueNodeCertificateRequest {
                node_id: id,
                csr_pem: csr_pem.clone(),
            };
            let ch = credential.channel(addr, Expect::AnyNode)?;
            match AdminClient::new(ch).issue_node_certificate(req).await {
                Ok(r) => {
                    return Ok(Issued {
                        cert_pem: r.into_inner().cert_pem,
                        key_pem,
                    })
                }
                Err(s) if s.code() == tonic::Code::AlreadyExists => return Err(s.into()),
                // Unavailable, no CA key there, a refusal to look at: try the next one.
                Err(s) => why.push(format!("{addr}: {}", s.message())),
            }
        }
        let wait = backoff.next();
        tracing::warn!(reasons = %why.join("; "), retry_in = ?wait, "no member signed this node's certificate yet; retrying");
        tokio::time::sleep(wait).await;
    }
}

/// Keeps a provisioned identity current for as long as the node runs: renews the certificate
/// when a third of its life is left (through the members, with its own certificate, for an
/// enrolled node) and follows CA changes. The node's reload loop picks the files up.
pub(crate) async fn maintain(
    shared: std::sync::Arc<NodeShared>,
    p: Provision,
    join: Option<String>,
) {
    let tls_dir = Provision::tls_dir(&shared.data_dir);
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        if let Err(e) = p.sync_trust(&tls_dir) {
            tracing::warn!(error = %e, "cannot follow the trusted CAs");
        }
        if !renewal_due(&tls_dir) {
            continue;
        }
        let issued = match &p {
            Provision::Ca(ca) => issue_here(ca, shared.id),
            Provision::Enroll(_) => match &join {
                Some(j) => request_signature(&shared.security, j, shared.id).await,
                None => continue,
            },
        };
        match issued.and_then(|i| p.write(&tls_dir, &i)) {
            Ok(()) => tracing::info!("renewed this node's certificate"),
            Err(e) => {
                tracing::warn!(error = %e, "renewing this node's certificate failed; retrying")
            }
        }
    }
}

/// Whether less than a third of the certificate's validity is left.
fn renewal_due(tls_dir: &Path) -> bool {
    let Ok(pem) = std::fs::read(tls_dir.join(CERT_FILE)) else {
        return true;
    };
    let Some((not_before, not_after)) = crate::tls::validity_of(&pem) else {
        return true;
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    now > not_after - (not_after - not_before) / 3
}
