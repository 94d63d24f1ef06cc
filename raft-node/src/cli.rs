//! The command line: every subcommand and flag of `raftmap`.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use raftmap_node::storage::MapType;

use raftmap_node::tls::Security;
use raftmap_node::Client;

use crate::agent::AgentArgs;
use crate::certs::CertsCmd;
use crate::demo;

#[derive(Parser, Debug)]
#[command(
    name = "raftmap",
    version,
    about = "Keeps BPF hash maps identical across a cluster, in one Raft order"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct Conn {
    /// API addresses of cluster members, comma separated; the first reachable one is used.
    #[arg(
        long,
        env = "RAFTMAP_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7401",
        global = true
    )]
    pub(crate) endpoints: Vec<String>,
    /// Identity directory of a client certificate (`ca.crt`, `tls.crt`, `tls.key`; see
    /// `raftmap certs client`); without it, plaintext.
    #[arg(long, env = "RAFTMAP_TLS_DIR", global = true)]
    pub(crate) tls_dir: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
    pub(crate) output: Output,
}

impl Conn {
    /// The certificates to connect with.
    pub(crate) fn security(&self) -> Result<Security> {
        match &self.tls_dir {
            Some(d) => Ok(Security::from_dir(d)?),
            None => Ok(Security::insecure()),
        }
    }

    /// A client of the first endpoint that answers.
    pub(crate) async fn client(&self) -> Result<Client> {
        Ok(Client::connect(&self.endpoints, &self.security()?).await?)
    }

    /// A client of one endpoint.
    pub(crate) async fn client_of(&self, endpoint: &str) -> Result<Client> {
        Ok(Client::connect(&[endpoint.to_string()], &self.security()?).await?)
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Cmd {
    /// Run a node (the daemon).
    Agent(Box<AgentArgs>),
    /// Cluster-wide operations.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Add a node as a learner (it receives the log but does not vote).
    AddLearner {
        #[arg(long)]
        node_id: u64,
        #[arg(long)]
        raft_addr: String,
        #[arg(long)]
        api_addr: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Make a caught-up learner a voter.
    Promote {
        node_id: u64,
        /// Most entries the learner may lag behind and still be promoted (0: 1000).
        #[arg(long, default_value_t = 0)]
        max_lag: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Remove a node from the cluster; its id is never used again. A voter is not removed when
    /// fewer than three voters would remain (a cluster of two cannot lose one): add a voter
    /// first, or pass --force.
    Remove {
        node_id: u64,
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// List the members.
    Members {
        #[command(flatten)]
        conn: Conn,
    },
    /// Show each endpoint's own view: role, term, log indexes, readiness.
    Status {
        #[command(flatten)]
        conn: Conn,
    },
    /// Read and write replicated maps.
    Map {
        #[command(subcommand)]
        cmd: MapCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Start a local cluster as separate processes, run a workload, show that every node
    /// converged, and clean up.
    Demo(demo::DemoArgs),
    /// Make and inspect certificates: a cluster CA, node and client certificates.
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
}

impl Cmd {
    /// How a client command connects; `None` for the others.
    pub(crate) fn conn(&self) -> Option<&Conn> {
        match self {
            Cmd::Cluster { conn, .. }
            | Cmd::AddLearner { conn, .. }
            | Cmd::Promote { conn, .. }
            | Cmd::Remove { conn, .. }
            | Cmd::Members { conn }
            | Cmd::Status { conn }
            | Cmd::Map { conn, .. } => Some(conn),
            Cmd::Agent(_) | Cmd::Demo(_) | Cmd::Certs { .. } => None,
        }
    }
}

#[derive(Subcommand, Debug)]
pub(crate) enum ClusterCmd {
    /// Make the node at the first endpoint the single voter of a new cluster.
    Init,
}

#[derive(Subcommand, Debug)]
pub(crate) enum MapCmd {
    /// Declare a map and its schema (idempotent for an identical schema).
    Declare {
        name: String,
        #[arg(long = "type", value_parser = parse_map_type, default_value = "hash")]
        map_type: MapType,
        #[arg(long)]
        key_size: u32,
        #[arg(long)]
        value_size: u32,
        #[arg(long, default_value_t = 65536)]
        max_entries: u32,
    },
    /// List declared maps with their entry counts.
    List,
    /// Set a key (key and value in hex).
    Put {
        map: String,
        key: String,
        value: String,
    },
    /// Read a key (hex); linearizable unless --local.
    Get {
        map: String,
        key: String,
        #[arg(long)]
        local: bool,
    },
    /// Delete a key (hex).
    Delete { map: String, key: String },
    /// Print every entry; linearizable unless --local.
    Dump {
        map: String,
        #[arg(long)]
        local: bool,
    },
    /// Remove a map and every entry of it (refused while any node watches it).
    Drop { map: String },
}

pub(crate) fn parse_map_type(s: &str) -> Result<MapType, String> {
    s.parse()
        .map_err(|e: raftmap_node::storage::ValidationError| e.to_string())
}

pub(crate) fn parse_hex(what: &str, s: &str) -> Result<Vec<u8>> {
    let t = s.strip_prefix("0x").unwrap_or(s);
    hex::decode(t).with_context(|| format!("{what} {s:?} is not hex"))
}

/// Whether `addr` answers, but not as a plaintext HTTP/2 server would: the HTTP/2 preface and
/// an empty SETTINGS frame get a SETTINGS frame back from a plaintext gRPC server, and a TLS
/// alert or a closed connection from a TLS one.
pub(crate) fn speaks_tls(addr: &str) -> bool {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let timeout = std::time::Duration::from_secs(1);
    let Some(sa) = addr.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
        return false;
    };
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&sa, timeout) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    if s.write_all(&hello).is_err() {
        return false;
    }
    let mut frame = [0u8; 9];
    match s.read_exact(&mut frame) {
        Ok(()) => frame[3] != 4,
        Err(e) => e.kind() == std::io::ErrorKind::UnexpectedEof,
    }
}
