//! Prometheus metrics of a node, served at `/metrics` with liveness and readiness probes.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The node's metrics. Cheap to share (`Arc`); every field is atomic.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub is_leader: Gauge,
    pub term: Gauge,
    pub last_log_index: Gauge,
    pub committed_index: Gauge,
    pub applied_index: Gauge,
    pub proposals: Counter,
    pub proposed_ops: Counter,
    pub forwarded_proposals: Counter,
    pub rejected_batches: Counter,
    pub refused_peer_messages: Counter,
    pub refused_calls: Counter,
    pub cert_reloads: Counter,
    pub autopilot_removals: Counter,
    /// Seconds until the certificate (`cert="tls"`) and the first trusted CA (`cert="ca"`)
    /// expire.
    pub cert_expiry: Family<Vec<(String, String)>, Gauge>,
    pub corrupt: Gauge,
    pub batch_ops: Histogram,
    pub commit_latency: Histogram,
}

impl Metrics {
    /// The node's metrics; `more` registers those of other parts (the kernel sync's).
    pub fn new(more: impl FnOnce(&mut Registry)) -> Arc<Self> {
        let mut registry = Registry::with_prefix("raftmap");
        let m = Metrics {
            is_leader: Gauge::default(),
            term: Gauge::default(),
            last_log_index: Gauge::default(),
            committed_index: Gauge::default(),
            applied_index: Gauge::default(),
            proposals: Counter::default(),
            proposed_ops: Counter::default(),
            forwarded_proposals: Counter::default(),
            rejected_batches: Counter::default(),
            refused_peer_messages: Counter::default(),
            refused_calls: Counter::default(),
            cert_reloads: Counter::default(),
            autopilot_removals: Counter::default(),
            cert_expiry: Family::default(),
            corrupt: Gauge::default(),
            batch_ops: Histogram::new(exponential_buckets(1.0, 4.0, 9)),
            commit_latency: Histogram::new(exponential_buckets(0.000_05, 2.0, 18)),
            registry: Registry::default(),
        };
        registry.register(
            "is_leader",
            "1 when this node is the Raft leader",
            m.is_leader.clone(),
        );
        registry.register("term", "Current Raft term", m.term.clone());
        registry.register(
            "last_log_index",
            "Index of the last log entry",
            m.last_log_index.clone(),
        );
        registry.register(
            "committed_index",
            "Highest committed log index known",
            m.committed_index.clone(),
        );
        registry.register(
            "applied_index",
            "Index of the last applied log entry",
            m.applied_index.clone(),
        );
        registry.register(
            "proposals",
            "Log entries proposed by this node (group-committed batches)",
            m.proposals.clone(),
        );
        registry.register(
            "proposed_ops",
            "Client operations carried by this node's proposals",
            m.proposed_ops.clone(),
        );
        registry.register(
            "forwarded_proposals",
            "Proposals this node forwarded to the leader",
            m.forwarded_proposals.clone(),
        );
        registry.register(
            "rejected_batches",
            "Client batches refused as invalid",
            m.rejected_batches.clone(),
        );
        registry.register(
            "refused_peer_messages",
            "Peer messages refused before they reached Raft (malformed, impossible, oversized)",
            m.refused_peer_messages.clone(),
        );
        registry.register(
            "refused_calls",
            "Calls refused by authentication or authorization (no or invalid certificate, missing role, non-member peer, wrong cluster or node id)",
            m.refused_calls.clone(),
        );
        registry.register(
            "cert_reloads",
            "Times new certificate files were loaded (a rotation)",
            m.cert_reloads.clone(),
        );
        registry.register(
            "autopilot_removals",
            "Members this node removed as leader because they were gone (a silent learner, a replaced or surplus voter)",
            m.autopilot_removals.clone(),
        );
        registry.register(
            "cert_expiry_seconds",
            "Seconds until this node's certificate (cert=\"tls\") and the first CA it trusts (cert=\"ca\") expire",
            m.cert_expiry.clone(),
        );
        registry.register(
            "corrupt",
            "1 once a consistency check found replicas that disagree or a corrupt disk here (raftmap status says which)",
            m.corrupt.clone(),
        );
        registry.register(
            "batch_ops",
            "Operations per proposed log entry",
            m.batch_ops.clone(),
        );
        registry.register(
            "commit_latency_seconds",
            "Time from proposing an entry to its being applied",
            m.commit_latency.clone(),
        );
        more(&mut registry);
        Arc::new(Metrics { registry, ..m })
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
