//! Making certificates (`raftmap certs`): a cluster CA, node and client certificates signed by
//! it, written as identity directories (`ca.crt`, `tls.crt`, `tls.key`), and a description of
//! what a certificate holds.

use std::net::IpAddr;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

use super::material::{parse_certs, CertFacts, CA_FILE, CERT_FILE, KEY_FILE};
use super::{unix, Principal, Subject, TlsError};

/// The CA's private key, next to its `ca.crt`; it never goes into an identity directory.
pub const CA_KEY_FILE: &str = "ca.key";

/// When a certificate is valid.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From five minutes ago (clocks differ) for `days` days.
    pub fn days(days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - time::Duration::minutes(5),
            not_after: now + time::Duration::days(i64::from(days)),
        }
    }
}

/// A certificate and its key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

fn err(e: rcgen::Error) -> TlsError {
    TlsError::Issue(e.to_string())
}

fn uri_san(p: &Principal) -> Result<SanType, TlsError> {
    Ok(SanType::URI(p.uri().try_into().map_err(err)?))
}

/// A new self-signed CA for `cluster`.
pub fn new_ca(cluster: &str, validity: Validity) -> Result<Issued, TlsError> {
    super::check_name("cluster", cluster).map_err(TlsError::Identity)?;
    let key = KeyPair::generate().map_err(err)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("raftmap CA {cluster}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![uri_san(&Principal::authority(cluster))?];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let cert = params.self_signed(&key).map_err(err)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Reads the CA in `ca_dir`: its certificate's PEM, its key's and its cluster. The directory
/// is `raftmap certs ca`'s (`ca.crt`, `ca.key`) or a cert-manager CA Secret's (`tls.crt` the
/// CA, `tls.key` its key).
pub fn read_ca(ca_dir: &Path) -> Result<(String, String, String), TlsError> {
    let read = |name: &str| {
        let path = ca_dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| TlsError::Io { path, source })
    };
    let (cert_file, key_file) = match ca_dir.join(CA_KEY_FILE).exists() {
        false if ca_dir.join(CA_KEY_FILE_ALT).exists() => (CERT_FILE, CA_KEY_FILE_ALT),
        _ => (CA_FILE, CA_KEY_FILE),
    };
    let (cert, key) = (read(cert_file)?, read(key_file)?);
    let path = ca_dir.join(cert_file);
    let der = parse_certs(&path, cert.as_bytes())?;
    let facts = CertFacts::of(&der[0]).map_err(|problem| TlsError::Files {
        path: path.clone(),
        problem,
    })?;
    let p = facts.principal().map_err(|problem| TlsError::Files {
        path: path.clone(),
        problem,
    })?;
    if p.subject != Subject::Authority || !facts.is_ca {
        return Err(TlsError::Files {
            path,
            problem: format!("is not a raftmap CA certificate (it is {p})"),
        });
    }
    Ok((cert, key, p.cluster))
}

/// The CA key's file in cert-manager's layout (a CA Certificate's Secret: `tls.crt` is the CA,
/// `tls.key` its key).
const CA_KEY_FILE_ALT: &str = KEY_FILE;

/// How long the node certificates a node issues (`--ca-dir`, enrollment) are valid.
pub const NODE_CERT_DAYS: u32 = 90;

/// A certificate for `who`, signed by the CA in `ca_dir`. Node certificates serve and connect
/// (server and client use); client certificates only connect. `dns` and `ips` add names for
/// tools that check addresses; raftmap itself checks the identity.
pub fn issue(
    ca_dir: &Path,
    who: &Principal,
    validity: Validity,
    dns: &[String],
    ips: &[IpAddr],
) -> Result<Issued, TlsError> {
    let key = KeyPair::generate().map_err(err)?;
    let cert_pem = sign(ca_dir, who, validity, dns, ips, &key)?;
    Ok(Issued {
        cert_pem,
        key_pem: key.serialize_pem(),
    })
}

/// A new key and a certificate signing request for `who` (a node asking to be enrolled).
pub fn request(who: &Principal) -> Result<(String, String), TlsError> {
    let key = KeyPair::generate().map_err(err)?;
    // What the certificate will say is the signer's to decide; the request carries the key
    // and, for the logs, the identity asked for.
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![uri_san(who)?];
    let csr = params.serialize_request(&key).map_err(err)?;
    Ok((csr.pem().map_err(err)?, key.serialize_pem()))
}

/// A certificate for `who` over the public key of the signing request `csr_pem`. Only the key
/// is taken from the request: what the certificate says comes from `who`.
pub fn sign_request(
    ca_dir: &Path,
    who: &Principal,
    validity: Validity,
    csr_pem: &str,
) -> Result<String, TlsError> {
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| TlsError::Issue(format!("the certificate signing request: {e}")))?;
    sign(ca_dir, who, validity, &[], &[], &csr.public_key)
}

fn sign(
    ca_dir: &Path,
    who: &Principal,
    validity: Validity,
    dns: &[String],
    ips: &[IpAddr],
    key: &impl rcgen::PublicKeyData,
) -> Result<String, TlsError> {
    let (ca_pem, ca_key_pem, cluster) = read_ca(ca_dir)?;
    if who.cluster != cluster {
        return Err(TlsError::Identity(format!(
            "the CA in {} is for cluster {cluster}, not {}",
            ca_dir.display(),
            who.cluster
        )));
    }
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(err)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(err)?;
    let cert = params(who, validity, dns, ips)?
        .signed_by(key, &issuer)
        .map_err(err)?;
    Ok(cert.pem())
}

fn params(
    who: &Principal,
    validity: Validity,
    dns: &[String],
    ips: &[IpAddr],
) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let (cn, ekus) = match &who.subject {
        Subject::Node(id) => (
            format!("raftmap node {id}"),
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        ),
        Subject::Client { role, name } => (
            format!("{name} ({role})"),
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        ),
        Subject::Enroller { name } => (
            format!("{name} (enrollment)"),
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        ),
        Subject::Authority => {
            return Err(TlsError::Identity(
                "a CA is made with `raftmap certs ca`".into(),
            ))
        }
    };
    params.distinguished_name.push(DnType::CommonName, cn);
    params
        .distinguished_name
        .push(DnType::OrganizationName, format!("raftmap {}", who.cluster));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = ekus;
    params.use_authority_key_identifier_extension = true;
    params.subject_alt_names = vec![uri_san(who)?];
    for d in dns {
        params
            .subject_alt_names
            .push(SanType::DnsName(d.clone().try_into().map_err(err)?));
    }
    params
        .subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    Ok(params)
}

/// Writes a file whole (through a temporary file and a rename, so a reader never sees half of
/// it), readable by the owner only if `secret`. Refuses to replace a file unless `replace`.
pub fn write_file(path: &Path, data: &str, secret: bool, replace: bool) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let io = |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    };
    if !replace && path.exists() {
        return Err(TlsError::Files {
            path: path.to_path_buf(),
            problem: "exists already (pass --force to replace it)".into(),
        });
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    let mode = if secret { 0o600 } else { 0o644 };
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io)?;
    tmp.write_all(data.as_bytes()).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Writes a CA's directory: `ca.key` (owner only) and `ca.crt`.
pub fn write_ca(dir: &Path, ca: &Issued, replace: bool) -> Result<(), TlsError> {
    write_file(&dir.join(CA_KEY_FILE), &ca.key_pem, true, replace)?;
    write_file(&dir.join(CA_FILE), &ca.cert_pem, false, replace)
}

/// Writes an identity directory: `ca.crt` (the CAs to trust), `tls.crt` and `tls.key`. The key
/// goes first, so a reader that sees the new certificate sees its key.
pub fn write_identity(
    out: &Path,
    trust_pem: &str,
    issued: &Issued,
    replace: bool,
) -> Result<(), TlsError> {
    write_file(&out.join(KEY_FILE), &issued.key_pem, true, replace)?;
    write_file(&out.join(CERT_FILE), &issued.cert_pem, false, replace)?;
    write_file(&out.join(CA_FILE), trust_pem, false, replace)
}

/// What the certificates of a PEM file (or an identity directory's `tls.crt` and `ca.crt`) hold.
pub fn describe(path: &Path) -> Result<String, TlsError> {
    let files: Vec<std::path::PathBuf> = if path.is_dir() {
        [CERT_FILE, CA_FILE]
            .iter()
            .map(|f| path.join(f))
            .filter(|p| p.exists())
            .collect()
    } else {
        vec![path.to_path_buf()]
    };
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let mut out = String::new();
    for f in files {
        let pem = std::fs::read(&f).map_err(|source| TlsError::Io {
            path: f.clone(),
            source,
        })?;
        for der in parse_certs(&f, &pem)? {
            let c = CertFacts::of(&der).map_err(|problem| TlsError::Files {
                path: f.clone(),
                problem,
            })?;
            let who = c
                .principal()
                .map_or_else(|e| format!("no raftmap identity: {e}"), |p| p.to_string());
            let left = c.not_after - now;
            let state = if left < 0 {
                "EXPIRED".to_string()
            } else if c.not_before > now {
                "NOT VALID YET".to_string()
            } else {
                format!("valid, {} days left", left / 86_400)
            };
            out.push_str(&format!(
                "{}\n  identity:   {who}\n  subject:    {}\n  issuer:     {}\n  valid:      {} to {} ({state})\n  serial:     {}\n",
                f.display(),
                c.subject,
                c.issuer,
                unix(c.not_before),
                unix(c.not_after),
                c.serial,
            ));
            for (what, list) in [("uri", &c.uris), ("dns", &c.dns), ("ip", &c.ips)] {
                if !list.is_empty() {
                    out.push_str(&format!("  {what:<11} {}\n", list.join(", ")));
                }
            }
        }
    }
    Ok(out)
}
