//! Talking to launched nodes: clients, waits on their status, bootstrapping a cluster, and the
//! plain HTTP of their metrics and probes.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use raftmap_storage::NodeId;

use super::{LaunchError, Launcher, Result};
use crate::client::Client;
use crate::error::NodeError;

impl Launcher {
    /// Client connected to node `id`.
    pub async fn client(&self, id: NodeId) -> Result<Client> {
        let addr = self.node(id)?.api_addr.clone();
        Ok(Client::connect(&[addr], &self.security()).await?)
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
                return Err(LaunchError::Timeout {
                    id,
                    what: what.to_string(),
                    timeout,
                    last,
                    log: self.log_tail(id, 20),
                });
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
                return Err(LaunchError::Exited {
                    id,
                    context: context.to_string(),
                    log: self.log_tail(id, 20),
                });
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
    pub async fn bootstrap(&mut self, voters: u64, learners: u64, timeout: Duration) -> Result<()> {
        self.spawn(1, None, false)?;
        self.wait_up(1, timeout).await?;
        self.client(1)
            .await?
            .admin()
            .init(crate::proto::InitRequest {})
            .await
            .map_err(NodeError::from)?;
        for id in 2..=voters {
            self.spawn(id, Some(1), false)?;
        }
        for id in voters + 1..=voters + learners {
            self.spawn(id, Some(1), true)?;
        }
        let total = (voters + learners) as usize;
        let nvoters = voters as usize;
        for id in self.ids() {
            self.wait_for(id, timeout, "see the full membership and be ready", |s| {
                s.ready
                    && s.members.len() == total
                    && s.members.iter().filter(|m| m.voter).count() == nvoters
            })
            .await?;
        }
        Ok(())
    }
}

/// A plain HTTP GET of `path` at `addr` (a node's metrics address): the status code and the
/// body.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    get(std::net::TcpStream::connect(addr)?, addr, path)
}

/// [`http_get`] within `timeout` for connecting, and again for each read and write (as a
/// Kubernetes probe is made).
pub fn http_get_within(
    addr: std::net::SocketAddr,
    path: &str,
    timeout: std::time::Duration,
) -> std::io::Result<(u16, String)> {
    let s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    get(s, &addr.to_string(), path)
}

fn get(mut s: std::net::TcpStream, addr: &str, path: &str) -> std::io::Result<(u16, String)> {
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
