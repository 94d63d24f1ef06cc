//! A cluster of `raftmap agent` processes, each with its own data dir and log under one
//! temporary directory: the demo runs nodes this way on loopback, and the fault-injection
//! harness (`raftmap-jepsen`) places them in network namespaces through [`Placement`]. Every
//! process is killed when the [`Launcher`] is dropped, including on panic. Talking to the nodes
//! (clients, waits on their status, metrics scrapes) is in `observe.rs`.

mod observe;

use std::collections::BTreeMap;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use raftmap_storage::NodeId;

use crate::error::NodeError;
use crate::tls::issue::{self, Validity};
use crate::tls::{Principal, Role, Security, CA_FILE};

/// What can go wrong running local nodes.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no local node {0}")]
    NoNode(NodeId),
    #[error("node {id} is not running")]
    NotRunning { id: NodeId },
    #[error("no free loopback port")]
    NoPort,
    #[error("node {id} exited while {context}; its log ends with:\n{log}")]
    Exited {
        id: NodeId,
        context: String,
        log: String,
    },
    #[error(
        "node {id} did not {what} within {timeout:?} (last: {last}); its log ends with:\n{log}"
    )]
    Timeout {
        id: NodeId,
        what: String,
        timeout: Duration,
        last: String,
        log: String,
    },
    #[error("placing node {id}: {reason}")]
    Placement { id: NodeId, reason: String },
    #[error(transparent)]
    Node(#[from] NodeError),
}

pub type Result<T, E = LaunchError> = std::result::Result<T, E>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LaunchError {
    let what = what.into();
    move |source| LaunchError::Io { what, source }
}

/// One agent process.
#[derive(Debug)]
pub struct LocalNode {
    pub id: NodeId,
    pub raft_addr: String,
    pub api_addr: String,
    pub metrics_addr: String,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    /// What the agent's command line is run under (`ip netns exec NS`), if anything.
    prefix: Vec<String>,
    /// Started with `--node-id auto`: `id` is the launcher's name for it, not its node id,
    /// and its certificate flags are its own arguments.
    auto: bool,
    child: Option<Child>,
}

impl LocalNode {
    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// How the process ended, once it has.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }
}

/// How the nodes are started.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// The `raftmap` binary.
    pub bin: PathBuf,
    /// Extra `raftmap agent` arguments for every node.
    pub agent_args: Vec<String>,
    /// `RUST_LOG` for the agents.
    pub log_filter: String,
    /// Extra `raftmap agent` arguments for particular nodes.
    pub node_args: BTreeMap<NodeId, Vec<String>>,
    /// Mutual TLS (the default): the launcher makes a CA, a certificate for every node and
    /// an `admin` client certificate for its own clients. Off: every node runs `--insecure`.
    pub tls: bool,
}

impl LaunchOptions {
    /// Nodes of `bin`, logging at info (openraft at warn), no extra arguments.
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Self {
            bin: bin.into(),
            agent_args: Vec::new(),
            log_filter: "info,openraft=warn".into(),
            node_args: BTreeMap::new(),
            tls: true,
        }
    }
}

/// Where a node listens, and what its command line runs under.
#[derive(Debug, Clone)]
pub struct Placed {
    pub raft_addr: String,
    pub api_addr: String,
    pub metrics_addr: String,
    pub prefix: Vec<String>,
}

/// Where new nodes go: loopback ports by default ([`Loopback`]).
pub trait Placement: std::fmt::Debug + Send {
    fn place(&mut self, id: NodeId) -> Result<Placed>;
}

/// Nodes on 127.0.0.1, on free ports.
#[derive(Debug, Default)]
pub struct Loopback;

impl Placement for Loopback {
    fn place(&mut self, _id: NodeId) -> Result<Placed> {
        Ok(Placed {
            raft_addr: free_port()?,
            api_addr: free_port()?,
            metrics_addr: free_port()?,
            prefix: Vec::new(),
        })
    }
}

/// A free loopback port below the kernel's ephemeral range (32768+), so that outgoing
/// connections never take it; each call in a process gets a different one, and processes start
/// at different offsets.
fn free_port() -> Result<String> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(7919)) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return Ok(format!("127.0.0.1:{port}"));
        }
    }
    Err(LaunchError::NoPort)
}

/// The certificates of a launched cluster: its CA and identity directories made from it.
#[derive(Debug)]
pub struct Pki {
    dir: PathBuf,
    cluster: String,
    admin: Security,
}

impl Pki {
    /// The cluster id every certificate names.
    pub const CLUSTER: &'static str = "local";

    fn new(dir: PathBuf) -> Result<Self> {
        let ca = issue::new_ca(Self::CLUSTER, Validity::days(30)).map_err(NodeError::from)?;
        issue::write_ca(&dir.join("ca"), &ca, false).map_err(NodeError::from)?;
        let mut pki = Self {
            dir,
            cluster: Self::CLUSTER.into(),
            admin: Security::insecure(),
        };
        let admin = pki.issue(
            "admin",
            &Principal::client(Self::CLUSTER, Role::Admin, "launcher"),
            Validity::days(30),
        )?;
        pki.admin = Security::from_dir(admin).map_err(NodeError::from)?;
        Ok(pki)
    }

    /// The CA's directory (`ca.crt`, `ca.key`).
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    /// An enrollment credential (`raftmap certs enroll`) for new nodes.
    pub fn enroll_dir(&self) -> Result<PathBuf> {
        self.issue(
            "enroll",
            &Principal::enroller(&self.cluster, "agents"),
            Validity::days(30),
        )
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// Issues a certificate for `who` into the identity directory `name` (replacing what it
    /// held) and returns the directory.
    pub fn issue(&self, name: &str, who: &Principal, validity: Validity) -> Result<PathBuf> {
        let out = self.dir.join(name);
        let cert =
            issue::issue(&self.ca_dir(), who, validity, &[], &[]).map_err(NodeError::from)?;
        let trust = std::fs::read_to_string(self.ca_dir().join(CA_FILE))
            .map_err(io("reading the launcher's CA"))?;
        issue::write_identity(&out, &trust, &cert, true).map_err(NodeError::from)?;
        Ok(out)
    }
}

/// Agent processes under one temporary directory.
#[derive(Debug)]
pub struct Launcher {
    opts: LaunchOptions,
    dir: tempfile::TempDir,
    nodes: BTreeMap<NodeId, LocalNode>,
    placement: Box<dyn Placement>,
    pki: Option<Pki>,
}

impl Launcher {
    /// Nodes on loopback.
    pub fn new(opts: LaunchOptions) -> Result<Self> {
        Self::with_placement(opts, Box::new(Loopback))
    }

    pub fn with_placement(opts: LaunchOptions, placement: Box<dyn Placement>) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("raftmap-cluster-")
            .tempdir()
            .map_err(io("temp dir"))?;
        let pki = match opts.tls {
            true => Some(Pki::new(dir.path().join("pki"))?),
            false => None,
        };
        Ok(Self {
            opts,
            dir,
            nodes: BTreeMap::new(),
            placement,
            pki,
        })
    }

    /// The cluster's certificates, with TLS.
    pub fn pki(&self) -> Option<&Pki> {
        self.pki.as_ref()
    }

    /// What the launcher's own clients connect with: its `admin` certificate, or plaintext.
    pub fn security(&self) -> Security {
        self.pki
            .as_ref()
            .map_or_else(Security::insecure, |p| p.admin.clone())
    }

    /// Node `id`'s identity directory, with TLS.
    pub fn tls_dir(&self, id: NodeId) -> Option<PathBuf> {
        self.pki.as_ref().map(|p| p.dir.join(format!("node-{id}")))
    }

    /// Extra agent arguments for node `id` from its next start on (a node added later).
    pub fn set_node_args(&mut self, id: NodeId, args: Vec<String>) {
        self.opts.node_args.insert(id, args);
    }

    /// Where data dirs and logs live.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn node(&self, id: NodeId) -> Result<&LocalNode> {
        self.nodes.get(&id).ok_or(LaunchError::NoNode(id))
    }

    pub fn node_mut(&mut self, id: NodeId) -> Result<&mut LocalNode> {
        self.nodes.get_mut(&id).ok_or(LaunchError::NoNode(id))
    }

    /// Node `id`'s counter `name` (the sum of its labelled series) on its `/metrics` page.
    pub fn counter(&self, id: NodeId, name: &str) -> std::io::Result<f64> {
        let addr = self
            .node(id)
            .map_err(std::io::Error::other)?
            .metrics_addr
            .clone();
        scrape_counter(&[addr], name)
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    /// API addresses of every node started so far.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.values().map(|n| n.api_addr.clone()).collect()
    }

    /// Gives node `id` its addresses, data dir and log without starting it (so that other
    /// nodes' command lines can name it first).
    pub fn place(&mut self, id: NodeId) -> Result<&LocalNode> {
        if !self.nodes.contains_key(&id) {
            let placed = self.placement.place(id)?;
            let node = LocalNode {
                id,
                raft_addr: placed.raft_addr,
                api_addr: placed.api_addr,
                metrics_addr: placed.metrics_addr,
                data_dir: self.dir.path().join(format!("node-{id}")),
                log_path: self.dir.path().join(format!("node-{id}.log")),
                prefix: placed.prefix,
                auto: false,
                child: None,
            };
            self.nodes.insert(id, node);
        }
        self.node(id)
    }

    /// Starts node `slot` (placed if it is not yet) as Kubernetes starts a pod: `--node-id
    /// auto` and `args` (its `--join`, `--bootstrap-expect`, `--ca-dir` or `--enroll-dir`),
    /// on every start. Its node id is whatever it draws; the launcher knows it as `slot`.
    pub fn spawn_auto(&mut self, slot: NodeId, args: Vec<String>) -> Result<()> {
        self.place(slot)?;
        self.node_mut(slot)?.auto = true;
        self.opts.node_args.insert(slot, args);
        self.start_process(slot, &[])
    }

    /// Starts a new node. With `join`, it joins through that node (as a learner when `learner`).
    pub fn spawn(&mut self, id: NodeId, join: Option<NodeId>, learner: bool) -> Result<()> {
        let join_addr = match join {
            Some(j) => Some(self.node(j)?.api_addr.clone()),
            None => None,
        };
        self.place(id)?;
        if let Some(pki) = &self.pki {
            pki.issue(
                &format!("node-{id}"),
                &Principal::node(pki.cluster(), id),
                Validity::days(30),
            )?;
        }
        let mut extra = Vec::new();
        if let Some(a) = join_addr {
            extra.push("--join".to_string());
            extra.push(a);
            if learner {
                extra.push("--learner".into());
            }
        }
        self.start_process(id, &extra)
    }

    /// Restarts a stopped node with its data dir (no `--join`: it is already a member).
    pub fn restart(&mut self, id: NodeId) -> Result<()> {
        self.start_process(id, &[])
    }

    fn start_process(&mut self, id: NodeId, extra: &[String]) -> Result<()> {
        let opts = self.opts.clone();
        let auto = self.node(id)?.auto;
        let security: Vec<String> = match self.tls_dir(id) {
            _ if auto && self.pki.is_some() => vec![],
            Some(d) => vec!["--tls-dir".into(), d.display().to_string()],
            None => vec!["--insecure".into()],
        };
        let node_id = if auto { "auto".into() } else { id.to_string() };
        let node = self.node_mut(id)?;
        let log_path = node.log_path.display().to_string();
        let log = File::options()
            .create(true)
            .append(true)
            .open(&node.log_path)
            .map_err(io(log_path.clone()))?;
        let log2 = log.try_clone().map_err(io(log_path))?;
        // The prefix (`ip netns exec`) and `setpriv` exec what follows them: the child's pid is
        // the agent's. The agent gets SIGKILL when the thread that started it ends, so a
        // harness that is killed leaves no agent behind.
        let mut cmd = match node.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg("setpriv");
                c
            }
            None => Command::new("setpriv"),
        };
        cmd.args(["--pdeathsig", "KILL", "--"]).arg(&opts.bin);
        let child = cmd
            .arg("agent")
            .args(["--node-id", &node_id])
            .args(["--raft-addr", &node.raft_addr])
            .args(["--api-addr", &node.api_addr])
            .args(["--metrics-addr", &node.metrics_addr])
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(&security)
            .args(extra)
            .args(&opts.agent_args)
            .args(opts.node_args.get(&id).into_iter().flatten())
            .env("RUST_LOG", &opts.log_filter)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io(format!("starting {}", opts.bin.display())))?;
        node.child = Some(child);
        Ok(())
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self, id: NodeId) -> Result<()> {
        let node = self.node_mut(id)?;
        if let Some(mut c) = node.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    }

    /// Kills every node.
    pub fn stop_all(&mut self) {
        for id in self.ids() {
            let _ = self.kill(id);
        }
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        self.stop_all();
        if std::thread::panicking() {
            for id in self.ids() {
                eprintln!(
                    "---- node {id} log (last 30 lines)\n{}",
                    self.log_tail(id, 30)
                );
            }
        }
    }
}

pub use observe::{http_get, http_get_within, scrape_counter};
