//! The test network: a bridge, a network namespace per node joined to it by a veth pair, and
//! partitions as nftables rules inside the namespaces.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raftmap_node::launcher::{LaunchError, Placed, Placement};
use raftmap_node::storage::NodeId;

use super::{HarnessError, Result};
use crate::lock::lock;

/// The test network: a bridge in the caller's namespace, one namespace per node. The caller
/// reaches every node's address through the bridge; a node's namespace is at
/// [`Netns::path`], for programs that join it themselves (a container runtime).
///
/// Names and subnets are unique for the life of the machine: a random tag checked to be free
/// (no link, namespace or registry entry uses it), and a /24 no interface holds an address in.
/// Both are taken under a machine-wide lock, and each live network is registered under
/// [`REGISTRY`] with its creator's pid: a network whose creator died without cleaning up (a
/// SIGKILLed harness) is removed by the next one that starts.
#[derive(Debug)]
pub struct Netns {
    /// Unique prefix for interface and namespace names: `rm` and 8 hex digits, so that the
    /// longest interface name (`{tag}h{id}`, ids below 10,000) fits in 15 bytes.
    tag: String,
    /// The test subnet 10.A.B.0/24 as (A, B).
    subnet: (u8, u8),
    nodes: Mutex<Vec<NodeId>>,
}

/// Where live test networks are registered (one file per tag, holding the creator's identity).
const REGISTRY: &str = "/run/raftmap-test-net";

/// How long cleanup waits for the kernel to release a network's interfaces.
const RELEASE_WAIT: Duration = Duration::from_secs(10);

fn net_error(what: impl std::fmt::Display) -> HarnessError {
    HarnessError::Net(what.to_string())
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
    /// A new network with its bridge (root, `ip`, veth and bridges).
    pub fn new() -> Result<Self> {
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
            nodes: Mutex::new(Vec::new()),
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

    /// Node `id`'s namespace name.
    pub fn ns(&self, id: NodeId) -> String {
        format!("{}-{id}", self.tag)
    }

    /// Where node `id`'s namespace is mounted (`ip netns`).
    pub fn path(&self, id: NodeId) -> std::path::PathBuf {
        Path::new("/run/netns").join(self.ns(id))
    }

    /// Node `id`'s address.
    pub fn ip(&self, id: NodeId) -> String {
        format!("{}.{}", self.prefix(), 10 + id)
    }

    /// The bridge side of node `id`'s veth pair, in the caller's namespace: what it receives
    /// is what the node sent (`/sys/class/net/LINK/statistics/rx_bytes`).
    pub fn host_link(&self, id: NodeId) -> String {
        format!("{}h{id}", self.tag)
    }

    /// Makes node `id`'s namespace, joined to the bridge, with its address and loopback up.
    pub fn add_node(&self, id: NodeId) -> Result<()> {
        if id >= 240 {
            return Err(net_error(format!(
                "node id {id}: test networks hold node ids below 240"
            )));
        }
        let (ns, host, inner) = (
            self.ns(id),
            self.host_link(id),
            format!("{}n{id}", self.tag),
        );
        run_ip(&["netns", "add", &ns])?;
        lock(&self.nodes).push(id);
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
    pub(super) fn block(&self, id: NodeId, from: &[NodeId]) -> Result<()> {
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

impl Netns {
    /// Nodes placed so far.
    pub(super) fn nodes(&self) -> Vec<NodeId> {
        lock(&self.nodes).clone()
    }
}

/// Places each new node in a namespace of its own, listening on its address there.
#[derive(Debug)]
pub(super) struct InNamespaces(pub Arc<Netns>);

impl Placement for InNamespaces {
    fn place(&mut self, id: NodeId) -> Result<Placed, LaunchError> {
        self.0.add_node(id).map_err(|e| LaunchError::Placement {
            id,
            reason: e.to_string(),
        })?;
        let ip = self.0.ip(id);
        Ok(Placed {
            raft_addr: format!("{ip}:7400"),
            api_addr: format!("{ip}:7401"),
            metrics_addr: format!("{ip}:7402"),
            prefix: vec!["ip".into(), "netns".into(), "exec".into(), self.0.ns(id)],
        })
    }
}
