//! Mutual TLS for every gRPC port, with identities in the certificates.
//!
//! A [`Security`] is either insecure (plaintext, for loopback development and `--insecure`)
//! or an identity directory (`ca.crt`, `tls.crt`, `tls.key`: a Kubernetes TLS Secret with its
//! CA, as cert-manager writes it) that is read again whenever its files change, so a rotated
//! Secret is used without a restart: new connections use the new files, calls in flight finish
//! on the connections they started on. What a certificate may do is decided per call
//! (`service/authz/`); who it is comes from [`Principal`]. `raftmap certs` makes the
//! certificates ([`issue`]).

pub mod issue;
mod material;
mod principal;
mod transport;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use raftmap_storage::NodeId;
use tonic::transport::Channel;

pub(crate) use material::unix;
pub use material::{CA_FILE, CERT_FILE, KEY_FILE};
pub use principal::{check_name, Principal, Role, Subject};
pub(crate) use transport::{incoming, Auth, Caller, Conn};

use material::Material;

/// What can go wrong with certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file of an identity directory cannot be used as it is.
    #[error("{}: {problem}", path.display())]
    Files { path: PathBuf, problem: String },
    #[error("{0}")]
    Identity(String),
    /// Making a certificate failed.
    #[error("issuing a certificate: {0}")]
    Issue(String),
    #[error("TLS connection to {addr}: {problem}")]
    Connect { addr: String, problem: String },
}

/// Which server a connection must reach, by the identity its certificate names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Expect {
    /// This node, and no other (a peer whose id is known).
    Node(NodeId),
    /// Any node of the cluster (a client given addresses).
    AnyNode,
}

/// How this process's connections are secured: plaintext, or the identity of a directory.
#[derive(Debug, Clone, Default)]
pub struct Security {
    tls: Option<Arc<TlsDir>>,
}

#[derive(Debug)]
struct TlsDir {
    dir: PathBuf,
    current: RwLock<Arc<Material>>,
    /// Counts loads; connection pools start afresh when it changes.
    generation: std::sync::atomic::AtomicU64,
}

impl Security {
    /// Plaintext connections, no identities: every caller may do everything.
    pub fn insecure() -> Self {
        Self { tls: None }
    }

    /// The identity in `dir` (`ca.crt`, `tls.crt`, `tls.key`), checked: the key fits the
    /// certificate, which chains to the CA and is valid now, and names a raftmap identity.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, TlsError> {
        let dir = dir.as_ref().to_path_buf();
        let files = material::read_files(&dir)?;
        let m = material::load(&dir, files)?;
        Ok(Self {
            tls: Some(Arc::new(TlsDir {
                dir,
                current: RwLock::new(Arc::new(m)),
                generation: Default::default(),
            })),
        })
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The identity directory, with TLS.
    pub fn dir(&self) -> Option<&Path> {
        self.tls.as_deref().map(|t| t.dir.as_path())
    }

    fn material(&self) -> Option<Arc<Material>> {
        let t = self.tls.as_ref()?;
        let m = t.current.read().unwrap_or_else(|p| p.into_inner());
        Some(m.clone())
    }

    /// Whose certificate this process presents (none insecure, or with only a `ca.crt`).
    pub fn identity(&self) -> Option<Principal> {
        self.material().and_then(|m| m.me.clone())
    }

    /// When this process's certificate and its first CA expire (Unix seconds).
    pub fn expiry(&self) -> Option<(i64, i64)> {
        self.material().map(|m| (m.not_after, m.ca_not_after))
    }

    /// Changes with every reload; 0 when insecure.
    pub fn generation(&self) -> u64 {
        self.tls.as_ref().map_or(0, |t| {
            t.generation.load(std::sync::atomic::Ordering::Acquire)
        })
    }

    /// Reads the directory again and, if its files changed and make a usable identity, uses
    /// them from now on. `Ok(false)`: nothing changed. A directory caught half-written (a key
    /// that does not fit the certificate yet) is an error and changes nothing.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let Some(t) = &self.tls else {
            return Ok(false);
        };
        let files = material::read_files(&t.dir)?;
        if self.material().is_some_and(|m| m.files == files) {
            return Ok(false);
        }
        let m = material::load(&t.dir, files)?;
        let old = self.identity();
        if old != m.me {
            return Err(TlsError::Identity(format!(
                "the new certificate in {} is for {}, this process is {}: not used",
                t.dir.display(),
                m.me.map_or_else(|| "no one".to_string(), |p| p.to_string()),
                old.map_or_else(|| "no one".to_string(), |p| p.to_string())
            )));
        }
        *t.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(m);
        t.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(true)
    }

    /// [`Security::reload`], logging what it found: a new identity at info, a directory
    /// that cannot be used at warn (once per distinct problem, remembered in `last_error`).
    /// True when new certificates are in use.
    pub fn reload_logged(&self, last_error: &mut String) -> bool {
        match self.reload() {
            Ok(true) => {
                last_error.clear();
                let (cert, ca) = self.expiry().unwrap_or_default();
                tracing::info!(dir = %self.dir().unwrap_or(Path::new("")).display(), expires = %unix(cert), ca_expires = %unix(ca), "loaded new certificates");
                true
            }
            Ok(false) => false,
            Err(e) => {
                let msg = e.to_string();
                if msg != *last_error {
                    tracing::warn!(error = %msg, "new certificates not used; the current ones stay");
                    *last_error = msg;
                }
                false
            }
        }
    }

    /// Reloads every `every` while the runtime runs (a long-lived client's rotation).
    pub fn watch(&self, every: Duration) -> Option<tokio::task::JoinHandle<()>> {
        self.tls.as_ref()?;
        let me = self.clone();
        Some(tokio::spawn(async move {
            let mut last_error = String::new();
            loop {
                tokio::time::sleep(every).await;
                me.reload_logged(&mut last_error);
            }
        }))
    }

    /// A lazily connected channel to `addr` (`host:port`) whose server must be `expect`.
    pub fn channel(&self, addr: &str, expect: Expect) -> Result<Channel, crate::NodeError> {
        let ep = crate::network::endpoint(addr)?;
        Ok(match &self.tls {
            None => ep.connect_lazy(),
            Some(_) => ep.connect_with_connector_lazy(transport::Connector::new(
                self.clone(),
                addr,
                expect,
            )),
        })
    }

    /// A channel to `addr`, connected now.
    pub async fn connect(&self, addr: &str, expect: Expect) -> Result<Channel, crate::NodeError> {
        let ep = crate::network::endpoint(addr)?;
        let r = match &self.tls {
            None => ep.connect().await,
            Some(_) => {
                ep.connect_with_connector(transport::Connector::new(self.clone(), addr, expect))
                    .await
            }
        };
        r.map_err(|e| {
            crate::NodeError::Unavailable(format!("{addr}: {}", crate::client::source_chain(&e)))
        })
    }
}

/// When the first certificate of a PEM file becomes valid and expires (Unix seconds).
pub(crate) fn validity_of(pem: &[u8]) -> Option<(i64, i64)> {
    let der = material::parse_certs(Path::new("tls.crt"), pem).ok()?;
    let facts = material::CertFacts::of(der.first()?).ok()?;
    Some((facts.not_before, facts.not_after))
}
