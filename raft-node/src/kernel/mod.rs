//! Keeping this node's kernel maps in the committed order.
//!
//! For each watched map the node keeps a *shadow* (what it believes the kernel map holds) and
//! *marks* (local changes on their way through the log). The files follow the pipeline:
//!
//! ```text
//! capture.rs   fexit / syscall events ─┐
//! scan.rs      walk minus shadow ──────┴─> state/ (shadow, marks) ─> submit.rs ─> Batcher
//!                                                                                     │ log
//! apply.rs     ApplyHook: committed changes, snapshots ─> state/ ─> writer.rs ─> kernel map
//! reconcile.rs first sight of a map: adopt, refill, restart merge (same rules, same writer)
//! ```
//!
//! `state/` holds every decision as pure code (tested without root in `tests.rs`);
//! `writer.rs` is the only code that writes a kernel map, through the `map_ops.rs` seam;
//! `spec.rs` says which maps are watched and how they are known again; `metrics.rs` counts.

mod apply;
mod capture;
#[cfg(test)]
mod interleavings;
mod map_ops;
mod metrics;
mod reconcile;
mod scan;
mod spec;
mod state;
mod submit;
#[cfg(test)]
mod tests;
mod writer;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};

use foldhash::HashMap;
use raftmap_ebpf_hooks::{Backend, EchoFilter, MAX_EVENT_KEY, MAX_EVENT_VALUE};
use raftmap_storage::{NodeId, StateView};
use tokio::sync::{mpsc, Notify};

pub use metrics::KernelMetrics;
pub(crate) use spec::parse_recorded_ids;
pub use spec::WatchSpec;

use crate::error::{NodeError, Result};
use crate::lock::lock;
use map_ops::MapOps;
use state::MapState;
use writer::Writer;

/// A watched map as status shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchedState {
    pub map: String,
    pub location: String,
    pub state: MapSyncState,
    pub backend: Backend,
    pub entries: u64,
    /// Local changes the cluster refused and that were undone, and the last reason.
    pub refusals: u64,
    pub last_refusal: Option<String>,
}

/// Where a watched map stands, for status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapSyncState {
    /// Not opened yet (missing, or not reconciled yet).
    Waiting(String),
    /// Kernel map and committed state are being kept identical.
    Synced,
    /// The kernel map does not match the cluster's schema; not synced.
    Refused(String),
}

#[derive(Debug)]
struct Watched {
    spec: WatchSpec,
    state: Mutex<MapState>,
}

/// The kernel side of one node.
#[derive(Debug)]
pub struct KernelSync {
    me: NodeId,
    maps: BTreeMap<String, Watched>,
    ids_book: spec::IdBook,
    /// The event-driven backend in use (the scan always runs too).
    backend: Mutex<Backend>,
    /// Commands to the event loop, which owns the capture programs.
    capture_cmds: OnceLock<mpsc::UnboundedSender<capture::CaptureCmd>>,
    /// Kernel map id -> watched map name, for routing events.
    ids: Mutex<HashMap<u32, String>>,
    /// Wakes the scan loop early (events were lost, or could not be decoded).
    scan_now: Notify,
    /// The applier's own writes, to recognise them among fexit events (which report every
    /// writer; the syscall backend leaves raftmap's process out in the kernel).
    echoes: Mutex<EchoFilter>,
    /// Capture generation counter (see `state::Mark::gen`).
    gen: AtomicU64,
    /// Highest log index the apply hook has seen.
    hooked_index: AtomicU64,
    pub metrics: Arc<KernelMetrics>,
}

/// Which capture backend to use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CaptureBackend {
    /// fexit where the kernel allows it, else the bpf(2) tracepoints, else the scan alone.
    #[default]
    Auto,
    /// fexit only: the node does not start where the kernel refuses it.
    Fexit,
    /// The bpf(2) tracepoints only (BPF programs' writes are left to the scan).
    Syscall,
    /// The scan alone.
    Scan,
}

/// How a node captures changes to its watched maps.
#[derive(Debug, Clone, Copy)]
pub struct CaptureSettings {
    pub backend: CaptureBackend,
    /// How often each map is scanned.
    pub interval: std::time::Duration,
    /// Off only in tests: maps are found and reconciled but diffed only once after each
    /// reconcile.
    pub periodic_scan: bool,
}

impl KernelSync {
    pub fn new(me: NodeId, specs: &[WatchSpec], data_dir: &Path) -> Result<Arc<Self>> {
        let mut maps = BTreeMap::new();
        for spec in specs {
            if maps.contains_key(&spec.map) {
                return Err(NodeError::BadRequest(format!(
                    "map {} is watched twice",
                    spec.map
                )));
            }
            maps.insert(
                spec.map.clone(),
                Watched {
                    spec: spec.clone(),
                    state: Mutex::new(MapState::default()),
                },
            );
        }
        Ok(Arc::new(Self {
            me,
            maps,
            ids_book: spec::IdBook::new(data_dir),
            backend: Mutex::new(Backend::Scan),
            capture_cmds: OnceLock::new(),
            ids: Mutex::new(HashMap::default()),
            scan_now: Notify::new(),
            echoes: Mutex::new(EchoFilter::default()),
            gen: AtomicU64::new(0),
            hooked_index: AtomicU64::new(0),
            metrics: Arc::new(KernelMetrics::default()),
        }))
    }

    /// Records each watched map's committed contents before Raft applies anything, as the base
    /// of the restart merge, and from then on holds committed changes until the map is
    /// reconciled.
    pub fn set_base(&self, view: &StateView) -> Result<()> {
        for (name, w) in &self.maps {
            let base = view.scan(name, None, usize::MAX).map_err(NodeError::from)?;
            let mut st = lock(&w.state);
            st.base = Some(base.into_iter().collect());
            st.reconciling = true;
        }
        Ok(())
    }

    /// Starts capturing: the event-driven backend `settings` ask for (the best one that
    /// loads, by default), and the scan loop, which reconciles each map and then scans it every
    /// `settings.interval` (at once when events were lost). Fails when the backend asked for
    /// by name does not load.
    pub fn start(
        self: &Arc<Self>,
        view: StateView,
        batcher: crate::propose::Batcher,
        settings: CaptureSettings,
    ) -> Result<()> {
        if self.maps.is_empty() {
            return Ok(());
        }
        self.start_capture(&view, &batcher, &settings)?;
        self.start_scans(view, batcher, settings.interval, settings.periodic_scan);
        Ok(())
    }

    /// Each watched map's state.
    pub fn states(&self) -> Vec<WatchedState> {
        self.maps
            .iter()
            .map(|(name, w)| {
                let st = lock(&w.state);
                let state = match (&st.refused, &st.kmap, &st.open_error) {
                    (Some(r), _, _) => MapSyncState::Refused(r.clone()),
                    (None, Some(_), _) => MapSyncState::Synced,
                    (None, None, Some(e)) => MapSyncState::Waiting(format!("cannot open it: {e}")),
                    (None, None, None) => {
                        MapSyncState::Waiting(format!("looking for {}", w.spec.location()))
                    }
                };
                WatchedState {
                    map: name.clone(),
                    location: w.spec.location(),
                    state,
                    backend: match &st.kmap {
                        Some(m) => self.backend_for(m.as_ref()),
                        None => self.backend(),
                    },
                    entries: st.entries,
                    refusals: st.refusals,
                    last_refusal: st.last_refusal.clone(),
                }
            })
            .collect()
    }

    /// Why this node's kernel maps are not all in sync (`None`: they are).
    pub fn not_ready(&self) -> Option<String> {
        let reasons: Vec<String> = self
            .states()
            .into_iter()
            .filter_map(|w| match w.state {
                MapSyncState::Synced => None,
                MapSyncState::Waiting(r) => Some(format!("map {} waiting: {r}", w.map)),
                MapSyncState::Refused(r) => Some(format!("map {} refused: {r}", w.map)),
            })
            .collect();
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }

    /// The capture backend in use for maps whose keys and values fit its events.
    pub fn backend(&self) -> Backend {
        *lock(&self.backend)
    }

    /// The backend that captures `map`'s changes: keys and values too large for the event
    /// records are left to the scan.
    fn backend_for(&self, map: &dyn MapOps) -> Backend {
        let l = map.layout();
        if l.key_size <= MAX_EVENT_KEY && l.value_size <= MAX_EVENT_VALUE {
            self.backend()
        } else {
            Backend::Scan
        }
    }

    /// The labels of `name`'s metrics.
    fn label(&self, name: &str, st: &MapState) -> Vec<(String, String)> {
        let backend = match &st.kmap {
            Some(m) => self.backend_for(m.as_ref()),
            None => self.backend(),
        };
        metrics::label(name, backend)
    }

    fn set_backend(&self, b: Backend) {
        let mut cur = lock(&self.backend);
        self.metrics
            .backend
            .get_or_create(&metrics::backend_label(*cur))
            .set(0);
        *cur = b;
        self.metrics
            .backend
            .get_or_create(&metrics::backend_label(b))
            .set(1);
    }

    /// The writer for `kmap`: writes are registered as expected echoes when the backend
    /// reports raftmap's own writes to this map (fexit does, for maps whose keys and values fit
    /// events), and noted as recently applied when any event backend captures it.
    fn writer<'a>(&'a self, kmap: &'a dyn MapOps) -> Writer<'a> {
        let backend = self.backend_for(kmap);
        Writer {
            kmap,
            echoes: (backend == Backend::Fexit).then_some(&self.echoes),
            note: backend != Backend::Scan,
        }
    }
}
