//! `raftmap certs`: a cluster CA, node and client certificates as identity directories
//! (`ca.crt`, `tls.crt`, `tls.key`, the layout of a Kubernetes TLS Secret), and what a
//! certificate holds.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;
use raftmap_node::tls::issue::{self, Validity, CA_KEY_FILE};
use raftmap_node::tls::{Principal, Role, Security, CA_FILE};

#[derive(Subcommand, Debug)]
pub(crate) enum CertsCmd {
    /// Create the CA of a cluster: DIR/ca.crt and DIR/ca.key (keep the key offline).
    Ca {
        /// The cluster's id; it becomes the id `raftmap cluster init` gives the cluster.
        #[arg(long)]
        cluster: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a node's certificate into an identity directory.
    Node {
        /// The CA's directory (ca.crt, ca.key).
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        node_id: u64,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// DNS names to add, for tools that check them (raftmap checks the identity).
        #[arg(long, value_delimiter = ',')]
        dns: Vec<String>,
        /// IP addresses to add, for tools that check them.
        #[arg(long, value_delimiter = ',')]
        ip: Vec<IpAddr>,
        /// More CA certificates for the directory to trust (a CA being rotated in or out).
        #[arg(long)]
        also_trust: Vec<PathBuf>,
        #[arg(long)]
        force: bool,
    },
    /// Issue a client's certificate, with its role, into an identity directory.
    Client {
        #[arg(long)]
        ca: PathBuf,
        /// reader (get, dump, list, watch, status, members), writer (and put, delete, CAS,
        /// declare) or admin (and init, add-learner, promote, remove, map drop).
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// The client's name (shown in logs).
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 365)]
        days: u32,
        #[arg(long)]
        also_trust: Vec<PathBuf>,
        #[arg(long)]
        force: bool,
    },
    /// Issue the credential new nodes share to obtain their node certificates (`raftmap agent
    /// --enroll-dir`) from a node holding the CA key (`--ca-dir`); it may do nothing else.
    Enroll {
        #[arg(long)]
        ca: PathBuf,
        /// The credential's name (shown in logs), for example the DaemonSet's.
        #[arg(long, default_value = "agents")]
        name: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 365)]
        days: u32,
        #[arg(long)]
        also_trust: Vec<PathBuf>,
        #[arg(long)]
        force: bool,
    },
    /// Print what a certificate file, or an identity directory, holds and whether it is usable.
    Show { path: PathBuf },
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
        .map_err(|e: raftmap_node::tls::TlsError| e.to_string())
}

pub(crate) fn run(cmd: CertsCmd) -> Result<()> {
    match cmd {
        CertsCmd::Ca {
            cluster,
            out,
            days,
            force,
        } => {
            let ca = issue::new_ca(&cluster, Validity::days(days))?;
            issue::write_ca(&out, &ca, force)?;
            println!(
                "created the CA of cluster {cluster} in {} (keep {CA_KEY_FILE} secret)",
                out.display()
            );
        }
        CertsCmd::Node {
            ca,
            node_id,
            out,
            days,
            dns,
            ip,
            also_trust,
            force,
        } => {
            let (_, _, cluster) = issue::read_ca(&ca)?;
            let who = Principal::node(&cluster, node_id);
            let cert = issue::issue(&ca, &who, Validity::days(days), &dns, &ip)?;
            write(&ca, &out, &also_trust, &cert, force, &who)?;
        }
        CertsCmd::Client {
            ca,
            role,
            name,
            out,
            days,
            also_trust,
            force,
        } => {
            raftmap_node::tls::check_name("client name", &name).map_err(anyhow::Error::msg)?;
            let (_, _, cluster) = issue::read_ca(&ca)?;
            let who = Principal::client(&cluster, role, &name);
            let cert = issue::issue(&ca, &who, Validity::days(days), &[], &[])?;
            write(&ca, &out, &also_trust, &cert, force, &who)?;
        }
        CertsCmd::Enroll {
            ca,
            name,
            out,
            days,
            also_trust,
            force,
        } => {
            raftmap_node::tls::check_name("enrollment name", &name).map_err(anyhow::Error::msg)?;
            let (_, _, cluster) = issue::read_ca(&ca)?;
            let who = Principal::enroller(&cluster, &name);
            let cert = issue::issue(&ca, &who, Validity::days(days), &[], &[])?;
            write(&ca, &out, &also_trust, &cert, force, &who)?;
        }
        CertsCmd::Show { path } => {
            print!("{}", issue::describe(&path)?);
            if path.is_dir() {
                match Security::from_dir(&path) {
                    Ok(_) => println!(
                        "usable: the key fits, the certificate chains to ca.crt and is valid"
                    ),
                    Err(e) => println!("NOT USABLE: {e}"),
                }
            }
        }
    }
    Ok(())
}

/// Writes an identity directory trusting the issuing CA and `also_trust`, and checks it loads.
fn write(
    ca: &Path,
    out: &Path,
    also_trust: &[PathBuf],
    cert: &issue::Issued,
    force: bool,
    who: &Principal,
) -> Result<()> {
    let mut trust = std::fs::read_to_string(ca.join(CA_FILE))
        .with_context(|| format!("reading {}", ca.join(CA_FILE).display()))?;
    for f in also_trust {
        trust.push_str(
            &std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
        );
    }
    issue::write_identity(out, &trust, cert, force)?;
    Security::from_dir(out).with_context(|| format!("checking {}", out.display()))?;
    println!("issued {who} ({}) into {}", who.uri(), out.display());
    Ok(())
}
