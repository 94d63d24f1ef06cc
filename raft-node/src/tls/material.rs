//! One identity directory loaded: the CA bundle, this party's certificate chain and key, and
//! the rustls configurations made from them.
//!
//! Both sides of a connection authenticate by identity, not by address: a server accepts any
//! client certificate chain during the handshake (still proving the key with the handshake
//! signature) and judges it afterwards, so that a refused client gets a gRPC status that says
//! why; a client accepts a server only if its certificate chains to the CA and names a node of
//! its cluster.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig};

use super::principal::{Principal, Subject};
use super::TlsError;

/// The files of an identity directory, as in a Kubernetes TLS Secret with its CA.
pub const CA_FILE: &str = "ca.crt";
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";

/// The raw bytes of the three files, to notice a change.
pub(crate) type Files = [Vec<u8>; 3];

/// What one identity directory holds, ready to use.
pub(crate) struct Material {
    /// Whose certificate this is; `None` for a directory with only `ca.crt` (a client that
    /// checks the servers but has no certificate of its own).
    pub(crate) me: Option<Principal>,
    /// When this party's certificate expires (Unix seconds).
    pub(crate) not_after: i64,
    /// When the first of the trusted CAs expires (Unix seconds).
    pub(crate) ca_not_after: i64,
    pub(crate) server: Option<Arc<ServerConfig>>,
    pub(crate) client: Arc<ClientConfig>,
    client_verifier: Arc<dyn ClientCertVerifier>,
    pub(crate) files: Files,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("me", &self.me)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads the three files of `dir`; `tls.crt` and `tls.key` may both be missing (read as
/// empty).
pub(crate) fn read_files(dir: &Path) -> Result<Files, TlsError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|source| TlsError::Io { path, source })
    };
    let ca = read(CA_FILE)?;
    if !dir.join(CERT_FILE).exists() && !dir.join(KEY_FILE).exists() {
        return Ok([ca, Vec::new(), Vec::new()]);
    }
    Ok([ca, read(CERT_FILE)?, read(KEY_FILE)?])
}

/// The certificates of a PEM file.
pub(crate) fn parse_certs(
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| files_error(path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(files_error(path, "holds no certificate".into()));
    }
    Ok(certs)
}

fn files_error(path: &Path, problem: String) -> TlsError {
    TlsError::Files {
        path: path.to_path_buf(),
        problem,
    }
}

/// What a certificate says about itself.
#[derive(Debug, Clone)]
pub(crate) struct CertFacts {
    pub(crate) subject: String,
    pub(crate) issuer: String,
    pub(crate) is_ca: bool,
    pub(crate) not_before: i64,
    pub(crate) not_after: i64,
    pub(crate) uris: Vec<String>,
    pub(crate) dns: Vec<String>,
    pub(crate) ips: Vec<String>,
    pub(crate) serial: String,
}

impl CertFacts {
    pub(crate) fn of(der: &[u8]) -> Result<Self, String> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let (mut uris, mut dns, mut ips) = (Vec::new(), Vec::new(), Vec::new());
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(u) => uris.push(u.to_string()),
                    GeneralName::DNSName(d) => dns.push(d.to_string()),
                    GeneralName::IPAddress(b) => ips.push(match b.len() {
                        4 => std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string(),
                        16 => <[u8; 16]>::try_from(*b)
                            .map(|a| std::net::Ipv6Addr::from(a).to_string())
                            .unwrap_or_default(),
                        _ => hex::encode(b),
                    }),
                    _ => {}
                }
            }
        }
        Ok(Self {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            is_ca: cert.is_ca(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            uris,
            dns,
            ips,
            serial: cert.raw_serial_as_string(),
        })
    }

    /// The raftmap identity the certificate carries.
    pub(crate) fn principal(&self) -> Result<Principal, String> {
        let ours: Vec<&String> = self
            .uris
            .iter()
            .filter(|u| u.starts_with("spiffe://raftmap/"))
            .collect();
        match ours[..] {
            [uri] => Principal::parse(uri).map_err(|e| e.to_string()),
            [] => Err(format!(
                "the certificate ({}) carries no raftmap identity (a URI SAN spiffe://raftmap/...)",
                self.subject
            )),
            _ => Err("the certificate carries more than one raftmap identity".into()),
        }
    }
}

/// The identity of the end-entity certificate `der`.
pub(crate) fn principal_of(der: &[u8]) -> Result<Principal, String> {
    CertFacts::of(der)?.principal()
}

/// Loads `files` (read from `dir`) and checks that they make a usable identity: the key fits
/// the certificate, the certificate chains to the CA bundle and is within its validity, and it
/// carries a raftmap identity.
pub(crate) fn load(dir: &Path, files: Files) -> Result<Material, TlsError> {
    let provider = provider();
    let ca_path = dir.join(CA_FILE);
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    let cas = parse_certs(&ca_path, &files[0])?;
    if files[1].is_empty() && files[2].is_empty() {
        return load_verify_only(&ca_path, &cas, files, provider);
    }
    let chain = parse_certs(&cert_path, &files[1])?;
    let key = PrivateKeyDer::from_pem_slice(&files[2])
        .map_err(|e| files_error(&key_path, format!("not a PEM private key: {e}")))?;

    let (roots, ca_not_after, _) = trust(&ca_path, &cas)?;
    let leaf = CertFacts::of(&chain[0]).map_err(|e| files_error(&cert_path, e))?;
    let me = leaf.principal().map_err(|e| files_error(&cert_path, e))?;
    if me.subject == Subject::Authority {
        return Err(files_error(
            &cert_path,
            "is the CA's certificate; issue a node or client certificate with `raftmap certs`"
                .into(),
        ));
    }
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| files_error(&ca_path, e.to_string()))?;
    client_verifier
        .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
        .map_err(|e| {
            files_error(
                &cert_path,
                format!("is not valid under {}: {}", ca_path.display(), describe(&e)),
            )
        })?;

    let rustls_err = |path: &PathBuf| {
        let path = path.clone();
        move |e: rustls::Error| files_error(&path, describe(&e))
    };
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(rustls_err(&key_path))?
        .with_client_cert_verifier(Arc::new(DeferredClientAuth {
            provider: provider.clone(),
        }))
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(rustls_err(&key_path))?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    let cluster = me.cluster.clone();
    let mut client = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(rustls_err(&key_path))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ClusterServerVerifier {
            roots,
            cluster,
            provider,
        }))
        .with_client_auth_cert(chain, key)
        .map_err(rustls_err(&key_path))?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Material {
        me: Some(me),
        not_after: leaf.not_after,
        ca_not_after,
        server: Some(Arc::new(server)),
        client: Arc::new(client),
        client_verifier,
        files,
    })
}

/// The trusted CAs of `ca.crt`: the root store, when the first of them expires, and the
/// cluster a CA names (the last that names one).
fn trust(
    ca_path: &Path,
    cas: &[CertificateDer<'static>],
) -> Result<(Arc<RootCertStore>, i64, Option<String>), TlsError> {
    let mut roots = RootCertStore::empty();
    let mut cluster = None;
    let mut not_after = i64::MAX;
    for ca in cas {
        let facts = CertFacts::of(ca).map_err(|e| files_error(ca_path, e))?;
        if !facts.is_ca {
            return Err(files_error(
                ca_path,
                format!("{} is not a CA certificate", facts.subject),
            ));
        }
        not_after = not_after.min(facts.not_after);
        if let Ok(p) = facts.principal() {
            cluster = Some(p.cluster);
        }
        roots
            .add(ca.clone())
            .map_err(|e| files_error(ca_path, format!("unusable CA certificate: {e}")))?;
    }
    Ok((Arc::new(roots), not_after, cluster))
}

/// A directory with only `ca.crt`: servers are checked, no certificate is presented. The
/// cluster is the one the CA names.
fn load_verify_only(
    ca_path: &Path,
    cas: &[CertificateDer<'static>],
    files: Files,
    provider: Arc<CryptoProvider>,
) -> Result<Material, TlsError> {
    let (roots, ca_not_after, cluster) = trust(ca_path, cas)?;
    let cluster = cluster.ok_or_else(|| {
        files_error(
            ca_path,
            format!("names no raftmap cluster; add {CERT_FILE} and {KEY_FILE} to the directory"),
        )
    })?;
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| files_error(ca_path, e.to_string()))?;
    let mut client = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| files_error(ca_path, describe(&e)))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ClusterServerVerifier {
            roots,
            cluster,
            provider,
        }))
        .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Material {
        me: None,
        not_after: ca_not_after,
        ca_not_after,
        server: None,
        client: Arc::new(client),
        client_verifier,
        files,
    })
}

impl Material {
    /// Judges the certificate chain a client presented: it must chain to the CA bundle, be
    /// within its validity and carry a raftmap identity.
    pub(crate) fn judge_client(&self, chain: &[CertificateDer<'_>]) -> Result<Principal, String> {
        let (leaf, rest) = chain
            .split_first()
            .ok_or_else(|| "no client certificate".to_string())?;
        self.client_verifier
            .verify_client_cert(leaf, rest, UnixTime::now())
            .map_err(|e| describe(&e))?;
        principal_of(leaf)
    }
}

/// A rustls error in words a user can act on.
pub(crate) fn describe(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => {
            "the certificate is not signed by a trusted CA (another cluster's CA?)".into()
        }
        rustls::Error::InvalidCertificate(C::BadSignature) => {
            "the certificate is not signed by a trusted CA (its signature does not match the trusted CA of that name)".into()
        }
        rustls::Error::InvalidCertificate(C::Expired) => "the certificate has expired".into(),
        rustls::Error::InvalidCertificate(C::ExpiredContext { time, not_after }) => format!(
            "the certificate expired at {} (it is now {})",
            unix(not_after.as_secs() as i64),
            unix(time.as_secs() as i64)
        ),
        rustls::Error::InvalidCertificate(C::NotValidYet) => "the certificate is not valid yet".into(),
        rustls::Error::InvalidCertificate(C::NotValidYetContext { time, not_before }) => format!(
            "the certificate is valid only from {} (it is now {})",
            unix(not_before.as_secs() as i64),
            unix(time.as_secs() as i64)
        ),
        rustls::Error::InconsistentKeys(_) => "the private key does not belong to the certificate".into(),
        other => other.to_string(),
    }
}

/// A Unix time as RFC 3339.
pub(crate) fn unix(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

/// Server side: takes whatever chain the client presents (or none) and leaves judging it to
/// [`Material::judge_client`] after the handshake. The handshake signature is still checked,
/// so a presented certificate is proven to be the client's.
#[derive(Debug)]
struct DeferredClientAuth {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for DeferredClientAuth {
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Client side: the server must present a certificate that chains to the CA bundle and names
/// a node of this cluster. Addresses are not checked: pods and hosts change addresses, and the
/// identity is what a node is. Which node is checked once the handshake is done.
#[derive(Debug)]
struct ClusterServerVerifier {
    roots: Arc<RootCertStore>,
    cluster: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ClusterServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let p = principal_of(end_entity).map_err(rustls::Error::General)?;
        if p.cluster != self.cluster || p.node_id().is_none() {
            return Err(rustls::Error::General(format!(
                "the server presented the certificate of {p}, not of a node of cluster {}",
                self.cluster
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
