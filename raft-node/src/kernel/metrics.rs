//! The kernel sync's Prometheus metrics, per watched map and capture backend.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use raftmap_ebpf_hooks::Backend;

type Labels = Vec<(String, String)>;

/// Per-map kernel metrics.
#[derive(Debug, Default)]
pub struct KernelMetrics {
    pub captured: Family<Labels, Counter>,
    pub applied: Family<Labels, Counter>,
    pub deferred: Family<Labels, Counter>,
    pub apply_errors: Family<Labels, Counter>,
    pub scan_repairs: Family<Labels, Counter>,
    pub uncommitted: Family<Labels, Counter>,
    /// Local changes the cluster refused (schema, a full map), undone in the kernel map.
    pub refused: Family<Labels, Counter>,
    /// Local writes the applier overwrote before they were captured, written back.
    pub restored: Family<Labels, Counter>,
    pub entries: Family<Labels, Gauge>,
    pub ring_drops: Family<Labels, Counter>,
    pub echoes: Family<Labels, Counter>,
    /// LRU evictions seen by the fexit backend, by cause: `applier` (kept local) or `other`
    /// (replicated as deletes).
    pub evictions: Family<Labels, Counter>,
    /// Committed entries this node's kernel no longer held, deleted to make room in a full
    /// LRU map for this node's new entries.
    pub room_deletes: Family<Labels, Counter>,
    /// 1 for the capture backend in use.
    pub backend: Family<Labels, Gauge>,
}

/// The labels of a map's metrics: its name and the backend that captures its changes.
pub(super) fn label(map: &str, backend: Backend) -> Labels {
    vec![
        ("map".into(), map.into()),
        ("backend".into(), backend.to_string()),
    ]
}

/// The labels of an eviction counter: its map and whether the applier caused it.
pub(super) fn eviction_label(map: &str, by_applier: bool) -> Labels {
    vec![
        ("map".into(), map.into()),
        (
            "cause".into(),
            if by_applier { "applier" } else { "other" }.into(),
        ),
    ]
}

/// The label of a backend-wide metric.
pub(super) fn backend_label(backend: Backend) -> Labels {
    vec![("backend".into(), backend.to_string())]
}

impl KernelMetrics {
    /// Registers every metric in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "kernel_captured",
            "Kernel map changes captured and proposed",
            self.captured.clone(),
        );
        registry.register(
            "kernel_applied",
            "Committed changes written to the kernel map",
            self.applied.clone(),
        );
        registry.register(
            "kernel_deferred",
            "Committed changes not written because a newer local change to the key is on its way",
            self.deferred.clone(),
        );
        registry.register(
            "kernel_apply_errors",
            "Kernel map writes that failed",
            self.apply_errors.clone(),
        );
        registry.register(
            "kernel_uncommitted",
            "Captured changes whose proposal did not commit (no leader, a lost answer); each is proposed again",
            self.uncommitted.clone(),
        );
        registry.register(
            "kernel_refused",
            "Local kernel map changes the cluster refused (the map's schema, a full map) and that were undone in the kernel map",
            self.refused.clone(),
        );
        registry.register(
            "kernel_restored",
            "Local kernel map writes the applier overwrote before they were captured, written back",
            self.restored.clone(),
        );
        registry.register(
            "kernel_scan_repairs",
            "Kernel map entries rewritten by reconciliation",
            self.scan_repairs.clone(),
        );
        registry.register(
            "kernel_entries",
            "Entries in the kernel map at the last scan",
            self.entries.clone(),
        );
        registry.register(
            "kernel_capture_lost",
            "Capture events lost (ring buffer full, unreadable memory) or not forwarded (batch syscalls, oversize entries); each makes the daemon scan at once",
            self.ring_drops.clone(),
        );
        registry.register(
            "kernel_capture_backend",
            "1 for the capture backend in use (scan, syscall or fexit)",
            self.backend.clone(),
        );
        registry.register(
            "kernel_evictions",
            "LRU evictions from watched maps (fexit backend), by cause: those the applier's writes caused stay local, the others replicate as deletes",
            self.evictions.clone(),
        );
        registry.register(
            "kernel_room_deletes",
            "Committed entries of a full LRU map that this node's kernel had evicted, deleted with this node's new entries to make room for them",
            self.room_deletes.clone(),
        );
        registry.register(
            "kernel_echoes",
            "Capture events recognised as this daemon's own applies and dropped",
            self.echoes.clone(),
        );
    }
}
