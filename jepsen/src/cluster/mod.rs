//! Local clusters for tests and fault injection: the daemon's [`Launcher`] (agent processes on
//! loopback), or each node in a network namespace of its own so that the network between them
//! can be partitioned; and pauses (SIGSTOP) of any node. Everything a cluster made is removed
//! when it is dropped, including on panic.

mod netns;

use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use raftmap_node::launcher::Launcher;
pub use raftmap_node::launcher::{http_get, scrape_counter, LaunchError, LaunchOptions, LocalNode};
use raftmap_node::storage::NodeId;

use netns::InNamespaces;
pub use netns::Netns;

/// What can go wrong running a local cluster.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error("test network: {0}")]
    Net(String),
    #[error("partitions need the nodes in network namespaces (netns)")]
    NoNetns,
    #[error("node {id} did not exit within {timeout:?} of SIGTERM")]
    Stuck { id: NodeId, timeout: Duration },
    #[error("signalling node {id}: {source}")]
    Signal {
        id: NodeId,
        #[source]
        source: nix::Error,
    },
}

pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

/// How the nodes are started: the launcher's options, and where the nodes run.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub launch: LaunchOptions,
    /// Run each node in a network namespace of its own, joined by veth pairs to a bridge, so
    /// that the network between them can be partitioned (needs root, `ip` and `nft`).
    pub netns: bool,
}

impl ClusterOptions {
    /// Nodes of `bin` on loopback, logging at info (openraft at warn), no extra arguments.
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Self {
            launch: LaunchOptions::new(bin),
            netns: false,
        }
    }
}

/// Nodes on loopback or in network namespaces, under one temporary directory. Everything the
/// [`Launcher`] does (spawn, restart, kill, wait, clients, logs) is available through it.
#[derive(Debug)]
pub struct LocalCluster {
    /// Declared before `net` so that processes die before their namespaces go.
    launcher: Launcher,
    net: Option<Arc<Netns>>,
}

impl Deref for LocalCluster {
    type Target = Launcher;
    fn deref(&self) -> &Launcher {
        &self.launcher
    }
}

impl DerefMut for LocalCluster {
    fn deref_mut(&mut self) -> &mut Launcher {
        &mut self.launcher
    }
}

impl LocalCluster {
    pub fn new(opts: ClusterOptions) -> Result<Self> {
        let launch = opts.launch;
        if !opts.netns {
            return Ok(Self {
                launcher: Launcher::new(launch)?,
                net: None,
            });
        }
        let net = Arc::new(Netns::new()?);
        let launcher = Launcher::with_placement(launch, Box::new(InNamespaces(net.clone())))?;
        Ok(Self {
            launcher,
            net: Some(net),
        })
    }

    /// Starts `voters` voters and `learners` learners (ids 1..), initialises the cluster on
    /// node 1 and waits until every node is a caught-up member.
    pub async fn start(
        opts: ClusterOptions,
        voters: u64,
        learners: u64,
        timeout: Duration,
    ) -> Result<Self> {
        let mut c = Self::new(opts)?;
        c.launcher.bootstrap(voters, learners, timeout).await?;
        Ok(c)
    }

    /// Whether this process can put nodes in network namespaces (root, `ip netns`, veth and
    /// bridges): creates and removes a throwaway bridge to find out.
    pub fn netns_available() -> bool {
        Netns::new().is_ok()
    }

    /// The test network, when the nodes run in network namespaces.
    pub fn netns(&self) -> Option<&Netns> {
        self.net.as_deref()
    }

    /// Whether the nodes run in network namespaces (partitions possible).
    pub fn has_netns(&self) -> bool {
        self.net.is_some()
    }

    /// Partitions the network into `groups`: a node only hears nodes of its own group (clients
    /// still reach every node). Needs `netns`.
    pub fn partition(&mut self, groups: &[Vec<NodeId>]) -> Result<()> {
        let mut grudges = BTreeMap::new();
        for g in groups {
            let others: Vec<NodeId> = groups
                .iter()
                .filter(|o| *o != g)
                .flatten()
                .copied()
                .collect();
            for id in g {
                grudges.insert(*id, others.clone());
            }
        }
        self.cut(&grudges)
    }

    /// Cuts links of any shape (bridges, rings): each node in `grudges` drops every packet from
    /// the nodes listed for it, other nodes are left as they are. A TCP connection needs both
    /// directions, so one side's grudge cuts the link.
    pub fn cut(&mut self, grudges: &BTreeMap<NodeId, Vec<NodeId>>) -> Result<()> {
        let net = self.net.as_ref().ok_or(HarnessError::NoNetns)?;
        for (id, from) in grudges {
            net.block(*id, from)?;
        }
        Ok(())
    }

    /// Removes every partition.
    pub fn heal(&mut self) -> Result<()> {
        if let Some(net) = &self.net {
            for id in net.nodes() {
                net.block(id, &[])?;
            }
        }
        Ok(())
    }

    /// SIGSTOP: the process freezes with its sockets open (a GC pause, a stalled VM).
    pub fn pause(&mut self, id: NodeId) -> Result<()> {
        self.signal(id, nix::sys::signal::Signal::SIGSTOP)
    }

    /// SIGCONT after [`LocalCluster::pause`].
    pub fn resume(&mut self, id: NodeId) -> Result<()> {
        self.signal(id, nix::sys::signal::Signal::SIGCONT)
    }

    fn signal(&mut self, id: NodeId, sig: nix::sys::signal::Signal) -> Result<()> {
        let pid = self
            .launcher
            .node(id)?
            .pid()
            .ok_or(LaunchError::NotRunning { id })?;
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        nix::sys::signal::kill(pid, sig).map_err(|source| HarnessError::Signal { id, source })
    }

    /// SIGTERM, as Kubernetes stops a pod, then waits up to `timeout` for the process to exit
    /// (SIGKILL after that). Returns how it exited.
    pub fn terminate(&mut self, id: NodeId, timeout: Duration) -> Result<std::process::ExitStatus> {
        self.signal(id, nix::sys::signal::Signal::SIGTERM)?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.launcher.node_mut(id)?.exit_status() {
                // Stopped on purpose, as after a kill: not a node that died.
                self.launcher.kill(id)?;
                return Ok(status);
            }
            if std::time::Instant::now() > deadline {
                self.launcher.kill(id)?;
                return Err(HarnessError::Stuck { id, timeout });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills every node (resuming paused ones first, so that they die at once).
    pub fn stop_all(&mut self) {
        for id in self.launcher.ids() {
            let _ = self.resume(id);
        }
        self.launcher.stop_all();
    }
}
