//! A cluster of `raftmap agent` processes on loopback, each with its own data dir: the demo, the
//! integration tests and the fault-injection harness all run nodes this way. Every process is
//! killed when the [`LocalCluster`] is dropped, including on panic.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use raftmap_storage::NodeId;

use crate::client::Client;
use crate::error::{NodeError, Result};

/// One agent process.
#[derive(Debug)]
pub struct LocalNode {
    pub id: NodeId,
    pub raft_addr: String,
    pub api_addr: String,
    pub metrics_addr: String,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
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
pub struct ClusterOptions {
    /// The `raftmap` binary.
    pub bin: PathBuf,
    /// Extra `raftmap agent` arguments for every node.
    pub agent_args: Vec<String>,
    /// `RUST_LOG` for the agents.
    pub log_filter: String,
    /// Extra `raftmap agent` arguments for particular nodes.
    pub node_args: BTreeMap<NodeId, Vec<String>>,
    /// Run each node in a network namespace of its own, joined by veth pairs to a bridge, so
    /// that the network between them can be partitioned (needs root, `ip` and `nft`).
    pub netns: bool,
}

/// The test network: a bridge in the caller's namespace, one namespace per node.
///
/// Names and subnets are unique for the life of the machine: a random tag checked to be free
/// (no link, namespace or registry entry uses it), and a /24 no interface holds an address in.
/// Both are taken under a machine-wide lock, and each live network is registered under
/// [`REGISTRY`] with its creator's pid: a network whose creator died without cleaning up (a
/// SIGKILLed harness) is removed by the next one that starts.
#[derive(Debug)]
struct Netns {
    /// Unique prefix for interface and namespace names: `rm` and 8 hex digits, so that the
    /// longest interface name (`{tag}h{id}`, ids below 10,000) fits in 15 bytes.
    tag: String,
    /// The test subnet 10.A.B.0/24 as (A, B).
    subnet: (u8, u8),
    nodes: Vec<NodeId>,
}

/// Where live test networks are registered (one file per tag, holding the creator's identity).
const REGISTRY: &str = "/run/raftmap-test-net";

/// How long cleanup waits for the kernel to release a network's interfaces.
const RELEASE_WAIT: Duration = Duration::from_secs(10);

fn net_error(what: impl std::fmt::Display) -> NodeError {
    NodeError::Internal(format!("test network: {what}"))
}

fn run_ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| net_error(format!("running ip: {e}")))?;
    if !out.status.success() {
        return Err(net_error(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// A process's identity that survives pid reuse: its pid and its start time (field 22 of
/// `/proc/PID/stat`, after the parenthesised command name).
fn process_identity(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let start = stat.rsplit_once(')')?.1.split_whitespace().nth(19)?;
    Some(format!("{pid} {start}"))
}

/// The names in a directory (none when it cannot be read).
fn dir_names(dir: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Names of the network interfaces in this namespace.
fn links() -> Vec<String> {
    dir_names("/sys/class/net")
}

/// Names of the named network namespaces.
fn namespaces() -> Vec<String> {
    dir_names("/run/netns")
}

/// The (A, B) of every 10.A.B.0/24 that an interface of this namespace has an address in.
fn subnets_in_use() -> Result<HashSet<(u8, u8)>> {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .map_err(|e| net_error(format!("running ip: {e}")))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|w| {
            let mut o = w.split('/').next()?.split('.');
            (o.next()? == "10").then_some(())?;
            Some((o.next()?.parse().ok()?, o.next()?.parse().ok()?))
        })
        .collect())
}

/// Removes whatever a test network with this tag left: its namespaces, its interfaces (a
/// veth's host side takes its peer with it) and its registry entry; then waits until the
/// kernel has released the names.
fn remove_network(tag: &str) {
    let mine = |name: &str| {
        name.strip_prefix(tag)
            .is_some_and(|rest| rest.starts_with(['b', 'h', 'n', '-']))
    };
    for link in links().into_iter().filter(|l| mine(l)) {
        let _ = run_ip(&["link", "del", &link]);
    }
    for ns in namespaces().into_iter().filter(|n| mine(n)) {
        let _ = run_ip(&["netns", "del", &ns]);
    }
    let deadline = Instant::now() + RELEASE_WAIT;
    while links().iter().any(|l| mine(l)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(Path::new(REGISTRY).join(tag));
}

impl Netns {
    fn new() -> Result<Self> {
        use rand::Rng;
        std::fs::create_dir_all(REGISTRY).map_err(|e| net_error(format!("{REGISTRY}: {e}")))?;
        let lock = File::create(Path::new(REGISTRY).join(".lock"))
            .map_err(|e| net_error(format!("{REGISTRY}/.lock: {e}")))?;
        // Held until this function returns: tags and subnets are checked and taken atomically
        // with respect to every other process doing the same.
        let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| net_error(format!("locking {REGISTRY}/.lock: {e}")))?;
        Self::sweep();
        let (links, namespaces) = (links(), namespaces());
        let registered: HashSet<String> = dir_names(REGISTRY).into_iter().collect();
        let mut rng = rand::thread_rng();
        let tag = (0..1000)
            .map(|_| format!("rm{:08x}", rng.gen::<u32>()))
            .find(|t| {
                !registered.contains(t)
                    && !links.iter().chain(&namespaces).any(|n| n.starts_with(t))
            })
            .ok_or_else(|| net_error("no free interface name"))?;
        let used = subnets_in_use()?;
        let free: Vec<(u8, u8)> = (201..=209u8)
            .flat_map(|a| (1..=254u8).map(move |b| (a, b)))
            .filter(|s| !used.contains(s))
            .collect();
        let subnet = *free
            .get(rng.gen_range(0..free.len().max(1)))
            .ok_or_else(|| net_error("no free subnet in 10.201-209.0.0/16"))?;
        let me = process_identity(std::process::id())
            .ok_or_else(|| net_error("cannot read this process's start time"))?;
        std::fs::write(Path::new(REGISTRY).join(&tag), me)
            .map_err(|e| net_error(format!("registering {tag}: {e}")))?;
        let net = Self {
            tag,
            subnet,
            nodes: Vec::new(),
        };
        // From here on, dropping `net` removes whatever was made.
        let bridge = net.bridge();
        run_ip(&["link", "add", &bridge, "type", "bridge"])?;
        run_ip(&[
            "addr",
            "add",
            &format!("{}.1/24", net.prefix()),
            "dev",
            &bridge,
        ])?;
        run_ip(&["link", "set", &bridge, "up"])?;
        Ok(net)
    }

    /// Removes the networks of registered creators that are gone.
    fn sweep() {
        let Ok(dir) = std::fs::read_dir(REGISTRY) else {
            return;
        };
        for entry in dir.filter_map(std::result::Result::ok) {
            let Ok(tag) = entry.file_name().into_string() else {
                continue;
            };
            if tag.starts_with('.') {
                continue;
            }
            let owner = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let alive = owner
                .split_whitespace()
                .next()
                .and_then(|p| p.parse::<u32>().ok())
                .and_then(process_identity)
                .is_some_and(|now| now == owner.trim());
            if !alive {
                remove_network(&tag);
            }
        }
    }

    fn prefix(&self) -> String {
        format!("10.{}.{}", self.subnet.0, self.subnet.1)
    }

    fn bridge(&self) -> String {
        format!("{}b", self.tag)
    }

    fn ns(&self, id: NodeId) -> String {
        format!("{}-{id}", self.tag)
    }

    fn ip(&self, id: NodeId) -> String {
        format!("{}.{}", self.prefix(), 10 + id)
    }

    fn add_node(&mut self, id: NodeId) -> Result<()> {
        if id >= 240 {
            return Err(net_error(format!(
                "node id {id}: test networks hold node ids below 240"
            )));
        }
        let (ns, host, inner) = (
            self.ns(id),
            format!("{}h{id}", self.tag),
            format!("{}n{id}", self.tag),
        );
        run_ip(&["netns", "add", &ns])?;
        self.nodes.push(id);
        run_ip(&["link", "add", &host, "type", "veth", "peer", "name", &inner])?;
        run_ip(&["link", "set", &inner, "netns", &ns])?;
        run_ip(&["link", "set", &host, "master", &self.bridge(), "up"])?;
        run_ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", self.ip(id)),
            "dev",
            &inner,
        ])?;
        run_ip(&["-n", &ns, "link", "set", &inner, "up"])?;
        run_ip(&["-n", &ns, "link", "set", "lo", "up"])
    }

    /// Makes node `id` drop every packet from the nodes in `from` (empty: heal).
    fn block(&self, id: NodeId, from: &[NodeId]) -> Result<()> {
        let ns = self.ns(id);
        // Removing a table that is not there fails; that is the healed state already.
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "nft",
                "delete",
                "table",
                "inet",
                "raftmap_partition",
            ])
            .output();
        if from.is_empty() {
            return Ok(());
        }
        let addrs: Vec<String> = from.iter().map(|n| self.ip(*n)).collect();
        let rules = format!(
            "table inet raftmap_partition {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    ip saddr {{ {} }} drop\n  }}\n}}\n",
            addrs.join(", ")
        );
        let out = (|| {
            use std::io::Write;
            let mut child = Command::new("ip")
                .args(["netns", "exec", &ns, "nft", "-f", "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(rules.as_bytes())?;
            }
            child.wait_with_output()
        })()
        .map_err(|e| net_error(format!("running nft: {e}")))?;
        if !out.status.success() {
            return Err(net_error(format!(
                "nft in {ns}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove_network(&self.tag);
    }
}

/// Nodes on loopback (or in network namespaces) under one temporary directory.
#[derive(Debug)]
pub struct LocalCluster {
    opts: ClusterOptions,
    dir: tempfile::TempDir,
    nodes: BTreeMap<NodeId, LocalNode>,
    /// Declared after `nodes` so that processes die before their namespaces go.
    net: Option<Netns>,
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
    Err(NodeError::Internal("no free loopback port".into()))
}

impl ClusterOptions {
    /// Nodes of `bin` on loopback, logging at info (openraft at warn), no extra arguments.
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Self {
            bin: bin.into(),
            agent_args: Vec::new(),
            log_filter: "info,openraft=warn".into(),
            node_args: BTreeMap::new(),
            netns: false,
        }
    }
}

impl LocalCluster {
    pub fn new(opts: ClusterOptions) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("raftmap-cluster-")
            .tempdir()
            .map_err(|e| NodeError::Internal(format!("temp dir: {e}")))?;
        let net = if opts.netns {
            Some(Netns::new()?)
        } else {
            None
        };
        Ok(Self {
            opts,
            dir,
            nodes: BTreeMap::new(),
            net,
        })
    }

    /// Whether this process can put nodes in network namespaces (root, `ip netns`, veth and
    /// bridges): creates and removes a throwaway bridge to find out.
    pub fn netns_available() -> bool {
        Netns::new().is_ok()
    }

    /// Extra agent arguments for node `id` from its next start on (a node added later).
    pub fn set_node_args(&mut self, id: NodeId, args: Vec<String>) {
        self.opts.node_args.insert(id, args);
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
        let net = self
            .net
            .as_ref()
            .ok_or_else(|| NodeError::FailedPrecondition("partitions need netns".into()))?;
        for (id, from) in grudges {
            net.block(*id, from)?;
        }
        Ok(())
    }

    /// Removes every partition.
    pub fn heal(&mut self) -> Result<()> {
        if let Some(net) = &self.net {
            for id in net.nodes.clone() {
                net.block(id, &[])?;
            }
        }
        Ok(())
    }

    /// Where data dirs and logs live.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn node(&self, id: NodeId) -> Result<&LocalNode> {
        self.nodes
            .get(&id)
            .ok_or_else(|| NodeError::NotFound(format!("no local node {id}")))
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

    pub fn node_mut(&mut self, id: NodeId) -> Result<&mut LocalNode> {
        self.nodes
            .get_mut(&id)
            .ok_or_else(|| NodeError::NotFound(format!("no local node {id}")))
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    /// API addresses of every node started so far.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.values().map(|n| n.api_addr.clone()).collect()
    }

    /// Starts a new node. With `join`, it joins through that node (as a learner when `learner`).
    pub fn spawn(&mut self, id: NodeId, join: Option<NodeId>, learner: bool) -> Result<()> {
        let join_addr = match join {
            Some(j) => Some(self.node(j)?.api_addr.clone()),
            None => None,
        };
        let (raft_addr, api_addr, metrics_addr) = match self.net.as_mut() {
            Some(net) => {
                net.add_node(id)?;
                let ip = net.ip(id);
                (
                    format!("{ip}:7400"),
                    format!("{ip}:7401"),
                    format!("{ip}:7402"),
                )
            }
            None => (free_port()?, free_port()?, free_port()?),
        };
        let node = LocalNode {
            id,
            raft_addr,
            api_addr,
            metrics_addr,
            data_dir: self.dir.path().join(format!("node-{id}")),
            log_path: self.dir.path().join(format!("node-{id}.log")),
            child: None,
        };
        self.nodes.insert(id, node);
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
        let log_path = self.node(id)?.log_path.clone();
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| NodeError::Internal(format!("{}: {e}", log_path.display())))?;
        let log2 = log
            .try_clone()
            .map_err(|e| NodeError::Internal(format!("{}: {e}", log_path.display())))?;
        // `ip netns exec` and `setpriv` exec what follows them: the child's pid is the agent's.
        // The agent gets SIGKILL when the thread that started it ends, so a harness that is
        // killed leaves no agent behind.
        let mut cmd = match &self.net {
            Some(net) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &net.ns(id), "setpriv"]);
                c
            }
            None => Command::new("setpriv"),
        };
        cmd.args(["--pdeathsig", "KILL", "--"]).arg(&opts.bin);
        let node = self.node_mut(id)?;
        let child = cmd
            .arg("agent")
            .args(["--node-id", &id.to_string()])
            .args(["--raft-addr", &node.raft_addr])
            .args(["--api-addr", &node.api_addr])
            .args(["--metrics-addr", &node.metrics_addr])
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(extra)
            .args(&opts.agent_args)
            .args(opts.node_args.get(&id).into_iter().flatten())
            .env("RUST_LOG", &opts.log_filter)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| NodeError::Internal(format!("starting {}: {e}", opts.bin.display())))?;
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

    /// SIGSTOP: the process freezes with its sockets open (a GC pause, a stalled VM).
    pub fn pause(&mut self, id: NodeId) -> Result<()> {
        self.signal(id, nix::sys::signal::Signal::SIGSTOP)
    }

    /// SIGCONT after [`LocalCluster::pause`].
    pub fn resume(&mut self, id: NodeId) -> Result<()> {
        self.signal(id, nix::sys::signal::Signal::SIGCONT)
    }

    fn signal(&mut self, id: NodeId, sig: nix::sys::signal::Signal) -> Result<()> {
        let node = self.node_mut(id)?;
        let Some(child) = node.child.as_ref() else {
            return Err(NodeError::FailedPrecondition(format!(
                "node {id} is not running"
            )));
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, sig)
            .map_err(|e| NodeError::Internal(format!("signalling node {id}: {e}")))
    }

    /// Client connected to node `id`.
    pub async fn client(&self, id: NodeId) -> Result<Client> {
        Client::connect(&[self.node(id)?.api_addr.clone()]).await
    }

    /// The node among `ids` whose own status says it leads, asking each for at most 500 ms
    /// (a paused node does not answer); `None` when none does right now.
    pub async fn leader(&self, ids: &[NodeId]) -> Option<NodeId> {
        for &id in ids {
            let Ok(c) = self.client(id).await else {
                continue;
            };
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(500), c.status()).await {
                if s.role == "leader" {
                    return Some(id);
                }
            }
        }
        None
    }

    /// Waits until node `id` answers its status call, or fails with its log's tail.
    pub async fn wait_up(&mut self, id: NodeId, timeout: Duration) -> Result<()> {
        self.wait_for(id, timeout, "answer status", |_| true).await
    }

    /// Waits until node `id` reports ready (member, leader known, caught up).
    pub async fn wait_ready(&mut self, id: NodeId, timeout: Duration) -> Result<()> {
        self.wait_for(id, timeout, "become ready", |s| s.ready)
            .await
    }

    /// Waits until `cond` holds for node `id`'s status.
    pub async fn wait_for(
        &mut self,
        id: NodeId,
        timeout: Duration,
        what: &str,
        cond: impl Fn(&crate::proto::StatusResponse) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive(&format!("waiting for node {id} to {what}"))?;
            let last = match self.client(id).await {
                Ok(c) => match c.status().await {
                    Ok(s) if cond(&s) => return Ok(()),
                    Ok(s) => format!("{s:?}"),
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(NodeError::Timeout(format!(
                    "node {id} did not {what} within {timeout:?} (last: {last}); its log ends with:\n{}",
                    self.log_tail(id, 20)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every node in `ids` has applied at least `index`.
    pub async fn wait_applied(
        &mut self,
        ids: &[NodeId],
        index: u64,
        timeout: Duration,
    ) -> Result<()> {
        for &id in ids {
            self.wait_for(id, timeout, &format!("apply index {index}"), |s| {
                s.applied_index >= index
            })
            .await?;
        }
        Ok(())
    }

    /// Fails if a node that was started (and not killed on purpose) has exited.
    pub fn check_alive(&mut self, context: &str) -> Result<()> {
        for id in self.ids() {
            let node = self.node_mut(id)?;
            if node.child.is_some() && !node.is_running() {
                return Err(NodeError::Internal(format!(
                    "node {id} exited while {context}; its log ends with:\n{}",
                    self.log_tail(id, 20)
                )));
            }
        }
        Ok(())
    }

    /// The last `lines` lines of node `id`'s log.
    pub fn log_tail(&self, id: NodeId, lines: usize) -> String {
        let Ok(node) = self.node(id) else {
            return String::new();
        };
        let text = std::fs::read_to_string(&node.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
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
        c.spawn(1, None, false)?;
        c.wait_up(1, timeout).await?;
        c.client(1)
            .await?
            .admin()
            .init(crate::proto::InitRequest {})
            .await?;
        for id in 2..=voters {
            c.spawn(id, Some(1), false)?;
        }
        for id in voters + 1..=voters + learners {
            c.spawn(id, Some(1), true)?;
        }
        let total = (voters + learners) as usize;
        let nvoters = voters as usize;
        for id in c.ids() {
            c.wait_for(id, timeout, "see the full membership and be ready", |s| {
                s.ready
                    && s.members.len() == total
                    && s.members.iter().filter(|m| m.voter).count() == nvoters
            })
            .await?;
        }
        Ok(c)
    }

    /// Kills every node (resuming paused ones first, so that they die at once).
    pub fn stop_all(&mut self) {
        for id in self.ids() {
            let _ = self.resume(id);
            let _ = self.kill(id);
        }
    }
}

impl Drop for LocalCluster {
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

/// A plain HTTP GET of `path` at `addr` (a node's metrics address): the status code and the
/// body.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {text:.80}")))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((code, body.to_string()))
}

/// Sum of a counter (every labelled series of it) over the `/metrics` pages at `addrs`.
pub fn scrape_counter(addrs: &[String], name: &str) -> std::io::Result<f64> {
    let mut total = 0.0;
    for addr in addrs {
        let (_, body) = http_get(addr, "/metrics")?;
        // `name value` or `name{labels} value`: every series of the family.
        total += body
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(name)?;
                let rest = match rest.strip_prefix('{') {
                    Some(r) => r.split_once("} ")?.1,
                    None => rest.strip_prefix(' ')?,
                };
                rest.trim().parse::<f64>().ok()
            })
            .sum::<f64>();
    }
    Ok(total)
}
